"""Torch models. Importing this namespace does not import torch; building or running a model does."""

from ._context import SpotContext
from ._contrastive import ContrastiveConfig, ContrastiveModel
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
from ._mil import MILConfig, ScellstModel, build_network, inverse_softplus
from ._ops import bag_mean
from ._registry import ModelSpec, available_models, get_model, register_model
from ._unet import NucleusUNet, UNetConfig, build_unet

__all__ = [
    "ARCHITECTURES",
    "COUNT_LOSSES",
    "LOSSES",
    "CellEncoder",
    "ContrastiveConfig",
    "ContrastiveModel",
    "EncoderConfig",
    "MILConfig",
    "ModelSpec",
    "NucleusUNet",
    "ScellstModel",
    "SpotContext",
    "UNetConfig",
    "available_models",
    "bag_mean",
    "build_network",
    "build_resnet",
    "build_unet",
    "efficientnet_lite0",
    "encoder_from_module",
    "encoder_from_weights",
    "get_model",
    "inverse_softplus",
    "random_encoder",
    "register_model",
]
