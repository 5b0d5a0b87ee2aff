"""Torch models. Importing this namespace does not import torch; building or running a model does."""

from ._losses import COUNT_LOSSES, LOSSES
from ._mil import MILConfig, ScellstModel, bag_mean, build_network, inverse_softplus
from ._unet import NucleusUNet, UNetConfig, build_unet

__all__ = [
    "COUNT_LOSSES",
    "LOSSES",
    "MILConfig",
    "NucleusUNet",
    "ScellstModel",
    "UNetConfig",
    "bag_mean",
    "build_network",
    "build_unet",
    "inverse_softplus",
]
