"""Tools: training and prediction of single-cell expression, contrastive image-expression learning, cell types."""

from typing import Any

from ._celltypes import compare_cell_types, marker_genes, score_cell_types
from ._contrastive import embed_contrastive, train_contrastive
from ._pipeline import SlideRun, prepare_cells, run_predict, run_train
from ._spots import spot_embeddings
from ._train import FitSettings, Slide, fit_slides, load_model, predict, prepare_slide, resolve_patience, train

__all__ = [
    "FitSettings",
    "Slide",
    "SlideRun",
    "compare_cell_types",
    "embed_contrastive",
    "fit_slides",
    "load_model",
    "marker_genes",
    "predict",
    "prepare_cells",
    "prepare_slide",
    "resolve_patience",
    "run_predict",
    "run_train",
    "score_cell_types",
    "spot_embeddings",
    "train",
    "train_contrastive",
]


def __getattr__(name: str) -> Any:  # names that moved to scellst.im and scellst.bench
    from .._moved import moved_attribute

    return moved_attribute("tl", name)
