"""Torch models. Importing this namespace does not import torch; building or running a model does."""

from ._mil import MILConfig, ScellstModel, bag_mean, build_network

__all__ = ["MILConfig", "ScellstModel", "bag_mean", "build_network"]
