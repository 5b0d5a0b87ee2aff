"""Tools: cell embeddings, training, prediction, evaluation and segmentation models."""

from ._baselines import spot_embeddings
from ._celltypes import compare_cell_types, marker_genes, score_cell_types
from ._contrastive import embed_contrastive, train_contrastive
from ._crops import CellCrops, StainNormalizer, cell_crops
from ._embed import embed_cells, shape_features
from ._evaluate import cross_validate, evaluate
from ._metrics import metrics_per_gene
from ._neighbourhood import neighbourhood_features
from ._pipeline import SlideRun, prepare_cells, run_predict, run_train
from ._segmentation_metrics import evaluate_segmentation
from ._segmentation_tiles import registration_shifts, segmentation_tiles
from ._segmenter import train_segmenter
from ._self_segmenter import self_train_segmenter
from ._simulation import SimulatedSpots, benchmark_simulation, simulate_spots
from ._ssl import train_ssl
from ._train import load_model, predict, train
from ._xenium import compare_xenium, match_cells

__all__ = [
    "CellCrops",
    "SimulatedSpots",
    "SlideRun",
    "StainNormalizer",
    "benchmark_simulation",
    "cell_crops",
    "compare_cell_types",
    "compare_xenium",
    "cross_validate",
    "embed_cells",
    "embed_contrastive",
    "evaluate",
    "evaluate_segmentation",
    "load_model",
    "marker_genes",
    "match_cells",
    "metrics_per_gene",
    "neighbourhood_features",
    "predict",
    "prepare_cells",
    "registration_shifts",
    "run_predict",
    "run_train",
    "score_cell_types",
    "segmentation_tiles",
    "self_train_segmenter",
    "shape_features",
    "simulate_spots",
    "spot_embeddings",
    "train",
    "train_contrastive",
    "train_segmenter",
    "train_ssl",
]
