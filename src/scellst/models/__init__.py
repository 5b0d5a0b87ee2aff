"""Torch models. Importing this namespace does not import torch; building or running a model does."""

from ._losses import COUNT_LOSSES, LOSSES
from ._mil import MILConfig, ScellstModel, bag_mean, build_network, inverse_softplus

__all__ = ["COUNT_LOSSES", "LOSSES", "MILConfig", "ScellstModel", "bag_mean", "build_network", "inverse_softplus"]
