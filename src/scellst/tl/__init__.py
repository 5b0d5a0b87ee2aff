"""Tools: cell embeddings, training, prediction and evaluation."""

from ._embed import embed_cells
from ._evaluate import cross_validate, evaluate
from ._metrics import metrics_per_gene
from ._train import load_model, predict, train

__all__ = ["cross_validate", "embed_cells", "evaluate", "load_model", "metrics_per_gene", "predict", "train"]
