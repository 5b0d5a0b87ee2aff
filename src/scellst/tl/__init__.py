"""Tools: cell embeddings, training, prediction, evaluation and segmentation models."""

from ._embed import embed_cells
from ._evaluate import cross_validate, evaluate
from ._metrics import metrics_per_gene
from ._segmentation_metrics import evaluate_segmentation
from ._segmenter import train_segmenter
from ._train import load_model, predict, train

__all__ = [
    "cross_validate",
    "embed_cells",
    "evaluate",
    "evaluate_segmentation",
    "load_model",
    "metrics_per_gene",
    "predict",
    "train",
    "train_segmenter",
]
