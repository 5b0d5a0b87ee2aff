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
    """A registered model: its network, what it needs, and the options it accepts.

    Training and prediction follow these declarations, so a model registered from outside the package is trained,
    saved, loaded and applied like the built-in ones (register it again before loading its files).

    Attributes
    ----------
    name
        The name passed as ``model=`` to :func:`scellst.tl.train`.
    network
        A function returning the ``torch.nn.Module`` class (called lazily, so that importing scellst does not
        import torch). The class takes ``(config, output_bias=None, output_scale=None)``, reads its options from
        ``config.options``, and implements ``forward(x, ctx)`` (non-negative per-cell expression) and
        ``spots(t, spot_idx, cell_index, bag_index)`` (the predictions of a batch of spots; see
        :mod:`scellst.models._zoo`).
    summary
        One line for :func:`available_models` listings and the docs.
    defaults
        Default options (``n_models`` and ``lr`` set the ensemble size and learning rate when the user gives none).
    options
        Names of the options that ``model_params`` may set (beside the defaults' names).
    needs_reference
        The model needs a single-cell reference (``reference=``, ``groupby=``).
    needs_context
        The model sees the spot context: ``t`` then holds ``spot_x`` (mean cell features of each spot), ``nb_x``
        (mean over its ``k_neighbors`` nearest spots, default 7) and ``nbr`` (their indices), and ``forward`` gets
        the cell's spot context at prediction.
    architecture
        The registered name of the per-cell network, when it is not the model's own (MISO's student is the sCellST
        MLP).
    losses
        The losses the model trains with (``None``: any of :data:`scellst.models.LOSSES`).
    prepare
        A set-up step from the training data, called as ``prepare(config, data, genes=, reference=, groupby=,
        opts=)`` and returning ``(config, init)``: the config to train (e.g. with the options learned from a
        reference) and initial values passed to the network (CPNN's prototypes). A callable or ``"module:function"``.
    teacher
        A distillation step, called as ``teacher(config, data, members_fn=, opts=, settings=)`` and returning
        ``(extras, data)``: what to store with the model and the training data of the per-cell student (its targets
        replaced by the teacher's predictions; MISO). A callable or ``"module:function"``.
    target
        What the per-cell network is fitted to, recorded in ``model.params["target"]`` (default: the loss's targets).
    """

    name: str
    network: Callable[[], type] = field(repr=False)  # returns the nn.Module class (lazy torch import)
    summary: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
    options: tuple[str, ...] = ()
    needs_reference: bool = False
    needs_context: bool = False
    architecture: str | None = None
    losses: tuple[str, ...] | None = None
    prepare: Callable[..., Any] | str | None = field(default=None, repr=False)
    teacher: Callable[..., Any] | str | None = field(default=None, repr=False)
    target: str | None = None

    def accepted_options(self) -> set[str]:
        """Option names that ``model_params`` may set."""
        return (set(self.options) | set(self.defaults)) - {"n_models", "lr"}

    def hook(self, name: str) -> Callable[..., Any] | None:
        """The ``prepare`` or ``teacher`` step as a callable (a ``"module:function"`` string is imported now)."""
        value = getattr(self, name)
        if value is None or callable(value):
            return value
        import importlib

        module, _, function = str(value).partition(":")
        return getattr(importlib.import_module(module), function)


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
        options=("layer", "mixing"),
        needs_reference=True,
        prepare="scellst.tl._models:cpnn_setup",
    )
)
register_model(
    ModelSpec(
        "deepspot2cell",
        _net("deepspot2cell"),
        "DeepSpot2Cell: DeepSet over the cell, its spot and the neighbouring spots; ensemble combined by the median",
        defaults={"k_neighbors": 7, "n_models": 3, "ensemble": "median"},
        options=("k_neighbors", "ensemble"),
        needs_context=True,
    )
)
register_model(
    ModelSpec(
        "miso",
        _net("scellst"),  # the student; the teacher is "_miso_teacher"
        "MISO: spot attention over the k nearest spots (per-slide cosine loss), distilled into a per-cell student",
        defaults={"k_neighbors": 36, "n_heads": 4, "teacher_lr": 1e-3, "teacher_patience": 100},
        options=("k_neighbors", "n_heads", "teacher_lr", "teacher_patience"),
        architecture="scellst",
        losses=("mse",),
        teacher="scellst.tl._models:fit_miso_teachers",
        target="the MISO teacher's calibrated spot predictions (log1p(counts per 1e4) / robust scale)",
    )
)
register_model(
    ModelSpec("_miso_teacher", _net("miso_teacher"), "MISO's spot-level attention model", needs_context=True)
)
