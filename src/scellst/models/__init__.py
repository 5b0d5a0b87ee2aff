"""Torch models. Importing this namespace does not import torch; building or running a model does."""

from ._encoders import (
    ARCHITECTURES,
    CellEncoder,
    EncoderConfig,
    build_resnet,
    efficientnet_lite0,
    encoder_from_module,
    encoder_from_weights,
    random_encoder,
)
from ._losses import COUNT_LOSSES, LOSSES
from ._mil import MILConfig, ScellstModel, bag_mean, build_network, inverse_softplus
from ._unet import NucleusUNet, UNetConfig, build_unet

__all__ = [
    "ARCHITECTURES",
    "COUNT_LOSSES",
    "LOSSES",
    "CellEncoder",
    "EncoderConfig",
    "MILConfig",
    "NucleusUNet",
    "ScellstModel",
    "UNetConfig",
    "bag_mean",
    "build_network",
    "build_resnet",
    "build_unet",
    "efficientnet_lite0",
    "encoder_from_module",
    "encoder_from_weights",
    "inverse_softplus",
    "random_encoder",
]
