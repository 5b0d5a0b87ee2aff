"""Model-specific training steps: CPNN prototypes, model options, and MISO's teacher and distillation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import TARGET_SUM
from .._logging import logger

if TYPE_CHECKING:
    from anndata import AnnData

    from ..models import MILConfig
    from ._train import TrainingData


def context_arrays(config, data: TrainingData) -> dict[str, np.ndarray]:
    """Spot-level inputs of the models that look beyond the cell: spot means and the spot graph (per slide)."""
    from ..models._context import neighbour_means, spot_means, spot_neighbors
    from ..models._registry import get_model

    if not get_model(config.architecture).needs_context:
        return {}
    spot_x = spot_means(data.x, data.bags)
    nbr = spot_neighbors(data.spot_xy, int(config.options.get("k_neighbors", 7)), groups=data.slide_of_spot)
    return {"spot_x": spot_x, "nb_x": neighbour_means(spot_x, nbr), "nbr": nbr}


def model_options(model: str, model_params: Mapping[str, Any] | None) -> dict[str, Any]:
    """The registered defaults of ``model`` updated with ``model_params``, validated against its declaration."""
    from ..models._registry import get_model

    spec = get_model(model)
    params = dict(model_params or {})
    allowed = spec.accepted_options()
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown} for model {model!r}; it accepts {sorted(allowed) or 'none'}.")
    opts = {k: v for k, v in spec.defaults.items() if k not in ("n_models", "lr")}
    opts.update(params)
    if "k_neighbors" in opts and int(opts["k_neighbors"]) < 1:
        raise ValueError(f"`k_neighbors` must be at least 1, got {opts['k_neighbors']}.")
    if opts.get("ensemble", "mean") not in ("mean", "median"):
        raise ValueError(f"`ensemble` must be 'mean' or 'median', got {opts['ensemble']!r}.")
    return opts


def default_n_models(model: str) -> int:
    """Ensemble size when the user gives none (DeepSpot2Cell: a small ensemble, as in its paper)."""
    from ..models._registry import get_model

    return int(get_model(model).defaults.get("n_models", 1))


def default_lr(model: str) -> float:
    """Learning rate when the user gives none (CPNN's softmax over types converges faster with 1e-3)."""
    from ..models._registry import get_model

    return float(get_model(model).defaults.get("lr", 1e-4))


def reference_genes(reference: AnnData | None) -> set[str] | None:
    """Genes of a CPNN reference (``None`` without one)."""
    return None if reference is None else {str(g) for g in reference.var_names}


def type_prototypes(
    reference: AnnData, groupby: str, genes: Sequence[str], *, layer: str | None = None
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Mean expression of each cell type of an annotated single-cell reference, over ``genes``.

    The reference holds raw counts (in ``layer``, ``layers['counts']`` when present, else ``X``); each cell is
    normalised to 10,000 counts over all its genes. Returns the type names, the per-type mean of ``log1p`` of the
    normalised counts (types x genes) and the per-type mean normalised rate (types x genes).
    """
    import scipy.sparse as sp

    if groupby not in reference.obs:
        raise KeyError(
            f"The reference has no column {groupby!r} in obs; pass `groupby=` the cell-type column "
            f"(columns: {list(reference.obs.columns)[:10]})."
        )
    labels = reference.obs[groupby]
    if labels.isna().any():
        raise ValueError(f"{int(labels.isna().sum())} reference cells have no {groupby!r}; drop them first.")
    missing = [g for g in genes if g not in reference.var_names]
    if missing:
        raise ValueError(
            f"{len(missing)} genes are not in the reference (e.g. {missing[:5]}); CPNN can only learn genes the "
            "reference measures: pass `genes=` a subset of the reference genes (with `genes=None`, `tl.train` "
            "selects them among the shared genes)."
        )
    if layer is None and "counts" in reference.layers:
        layer = "counts"
    x = reference.layers[layer] if layer is not None else reference.X
    x = x.tocsr() if sp.issparse(x) else np.asarray(x)
    values = x.data if sp.issparse(x) else x
    if np.isnan(values).any() or (values < 0).any():
        raise ValueError("The reference expression has NaN or negative values; CPNN needs raw counts.")
    if not np.allclose(values, np.round(values)):
        raise ValueError(
            "The reference does not hold raw counts (non-integer values); put counts in `layers['counts']` or "
            "pass `model_params={'layer': ...}`."
        )
    lib = np.asarray(x.sum(axis=1)).ravel()
    empty = lib <= 0
    if empty.all():
        raise ValueError("Every reference cell has zero counts.")
    if empty.any():
        logger.warning(f"CPNN: {int(empty.sum())} reference cells without counts are ignored")
        x, lib, labels = x[~empty], lib[~empty], labels[~empty]
    cols = reference.var_names.get_indexer(list(genes))
    sub = x[:, cols]
    sub = sub.toarray() if sp.issparse(sub) else np.asarray(sub)
    rate = sub / lib[:, None] * TARGET_SUM
    types = [str(t) for t in pd.unique(labels.astype(str))]
    types.sort()
    codes = pd.Categorical(labels.astype(str), categories=types).codes
    small = [t for i, t in enumerate(types) if (codes == i).sum() < 5]
    if small:
        logger.warning(f"CPNN reference types with fewer than 5 cells give noisy prototypes: {small}")
    log_proto = np.stack([np.log1p(rate[codes == i]).mean(axis=0) for i in range(len(types))])
    rate_proto = np.stack([rate[codes == i].mean(axis=0) for i in range(len(types))])
    return types, log_proto.astype(np.float32), rate_proto.astype(np.float32)


def cpnn_setup(config: MILConfig, data, *, genes, reference, groupby, opts) -> tuple[MILConfig, dict]:
    """Config and initial values of a CPNN model (prototypes in the units of the loss's targets).

    When types are mixed as rates, each gene's gain starts at the ratio of the spots' mean rate to the types' mean
    rate: references normalised over a small panel (Xenium) have rates far above those of whole-transcriptome spots.
    """
    from ..models import COUNT_LOSSES

    if reference is None or groupby is None:
        raise ValueError(
            "model='cpnn' needs an annotated single-cell reference: pass `reference=<AnnData of counts>` and "
            "`groupby=<cell-type column>`."
        )
    types, log_proto, rate_proto = type_prototypes(reference, groupby, genes, layer=opts.get("layer"))
    mixing = opts.get("mixing", "rates")
    init: dict[str, Any] = {}
    gene_scale = data.slide_scale.mean(axis=0).astype(np.float32)
    if mixing not in ("log", "rates"):
        raise ValueError(f"CPNN `mixing` must be 'log' or 'rates', got {mixing!r}.")
    if config.loss in COUNT_LOSSES or mixing == "rates":
        protos = rate_proto
        spot_rate = (data.counts / np.maximum(data.library, 1e-12)[:, None] * TARGET_SUM).mean(axis=0)
        init["log_gain"] = np.log(np.maximum(spot_rate, 1e-6) / np.maximum(rate_proto.mean(axis=0), 1e-6))
        if config.loss in COUNT_LOSSES:
            mixing = "counts"
        else:
            init["scale"] = gene_scale
    else:
        protos = log_proto / gene_scale[None, :]
    options = {**config.options, "n_types": len(types), "cell_types": types, "mixing": mixing}
    config = replace(config, architecture="cpnn", options=options)
    return config, {"prototypes": protos, **init}


def calibrate(raw: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene least-squares ``gain, offset`` with ``gain * raw + offset ~ target``."""
    r = raw - raw.mean(axis=0)
    t = target - target.mean(axis=0)
    var = (r**2).sum(axis=0)
    gain = np.where(var > 1e-12, (r * t).sum(axis=0) / np.maximum(var, 1e-12), 0.0)
    offset = target.mean(axis=0) - gain * raw.mean(axis=0)
    return gain.astype(np.float32), offset.astype(np.float32)


def fit_miso_teachers(config: MILConfig, data, *, members_fn, opts, settings) -> tuple[dict, Any]:
    """Train MISO's spot attention model(s) and return the extras to store and the student's training data.

    Each teacher is trained with the per-slide cosine loss (all spots of a slide in one step), then calibrated per
    gene to the training targets; the members' mean prediction on every training spot becomes the pseudo-label of
    the cell-level student.
    """
    import torch

    from ..models import build_network

    teacher_cfg = replace(
        config,
        architecture="_miso_teacher",
        loss="cosine",
        options={"k_neighbors": int(opts["k_neighbors"]), "n_heads": int(opts["n_heads"])},
    )
    teacher_settings = replace(settings, lr=float(opts["teacher_lr"]), patience=int(opts["teacher_patience"]))
    members, histories, best_epochs, _ = members_fn(teacher_cfg, data, teacher_settings, "teacher")
    arrays = {k: torch.from_numpy(v) for k, v in context_arrays(teacher_cfg, data).items()}
    preds, calibrated = [], []
    for state in members:
        net = build_network(teacher_cfg)
        net.load_state_dict(state)
        net.eval()
        with torch.no_grad():
            raw = net.attend(arrays["spot_x"], arrays["nbr"], torch.arange(len(data.bags))).numpy()
        gain, offset = calibrate(raw, data.scaled)
        state = {**state, "cal_gain": torch.from_numpy(gain), "cal_offset": torch.from_numpy(offset)}
        calibrated.append(state)
        preds.append(raw * gain + offset)
    pseudo = np.mean(preds, axis=0).astype(np.float32)
    agreement = np.nanmean(
        [np.corrcoef(pseudo[:, g], data.scaled[:, g])[0, 1] for g in range(pseudo.shape[1]) if pseudo[:, g].std() > 0]
    )
    logger.info(f"MISO teacher: mean Pearson of its calibrated predictions on the training spots {agreement:.3f}")
    student_data = replace(data, lognorm=pseudo * data.slide_scale[data.slide_of_spot])
    extras = {
        "teacher_config": asdict(teacher_cfg),
        "teacher_members": calibrated,
        "teacher_history": histories,
        "teacher_best_epochs": best_epochs,
    }
    return extras, student_data
