"""The model registry: every model that :func:`scellst.tl.train` can fit, by name.

A model is a torch network class (built lazily, so that importing scellst does not import torch) taking
``(config, output_bias=None, output_scale=None, **init)`` and implementing ``forward(x, ctx)`` (per-cell expression)
and ``spots(t, spot_idx, cell_index, bag_index)`` (per-spot predictions for the loss); see :mod:`scellst.models._zoo`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its network, a one-line summary and its default options."""

    name: str
    network: Callable[[], type] = field(repr=False)  # returns the nn.Module class (lazy torch import)
    summary: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
    needs_reference: bool = False
    needs_context: bool = False


def _net(name: str) -> Callable[[], type]:
    def get() -> type:
        from ._zoo import NETWORKS

        return NETWORKS[name]

    return get


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec, *, overwrite: bool = False) -> None:
    """Register a model under ``spec.name`` (``overwrite=True`` to replace one)."""
    if spec.name in _REGISTRY and not overwrite:
        raise ValueError(f"A model named {spec.name!r} is already registered; pass overwrite=True to replace it.")
    _REGISTRY[spec.name] = spec


def get_model(name: str) -> ModelSpec:
    """The registered model ``name``, with a clear error listing the available ones."""
    if name not in _REGISTRY:
        raise ValueError(f"Unknown model {name!r}; available models: {available_models()}.")
    return _REGISTRY[name]


def available_models() -> list[str]:
    """Names of the registered models (the public ones, not internal building blocks)."""
    return [n for n in _REGISTRY if not n.startswith("_")]


register_model(
    ModelSpec(
        "scellst",
        _net("scellst"),
        "sCellST: per-cell MLP, spot = mean of its cells (multiple-instance learning); an ensemble of 5 by default",
        defaults={"n_models": 5},
    )
)
register_model(
    ModelSpec(
        "cpnn",
        _net("cpnn"),
        "CPNN: per-cell weights over reference cell types x the types' expression prototypes",
        defaults={"lr": 1e-3, "mixing": "rates"},
        needs_reference=True,
    )
)
register_model(
    ModelSpec(
        "deepspot2cell",
        _net("deepspot2cell"),
        "DeepSpot2Cell: DeepSet over the cell, its spot and the neighbouring spots; ensemble combined by the median",
        defaults={"k_neighbors": 7, "n_models": 3, "ensemble": "median"},
        needs_context=True,
    )
)
register_model(
    ModelSpec(
        "miso",
        _net("scellst"),  # the student; the teacher is "_miso_teacher"
        "MISO: spot attention over the k nearest spots (per-slide cosine loss), distilled into a per-cell student",
        defaults={"k_neighbors": 36, "n_heads": 4},
    )
)
register_model(ModelSpec("_miso_teacher", _net("miso_teacher"), "MISO's spot-level attention model"))
