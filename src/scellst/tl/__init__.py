"""Tools: cell embeddings, training, prediction and evaluation."""

from ._embed import embed_cells
from ._evaluate import spot_correlations
from ._metrics import correlation_per_gene
from ._train import load_model, predict, train

__all__ = ["correlation_per_gene", "embed_cells", "load_model", "predict", "spot_correlations", "train"]
