"""Evaluation: per-gene scores against measured spots or a known single-cell truth, and cross-validation."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._constants import TARGET_SUM, Key
from .._logging import logger
from .._utils import (
    apply_affine,
    get_key,
    get_microns_per_pixel,
    instance_ids,
    intrinsic_to_intrinsic,
    shapes_centroids,
)
from ..pp._genes import lognorm, rank_genes
from ..tl._train import FitSettings, Slide, fit_slides, prepare_slide
from ._metrics import metrics_per_gene

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from ..models import ScellstModel

_TRAIN_OPTIONS = {
    "model",
    "model_params",
    "reference",
    "groupby",
    "loss",
    "nb_parametrization",
    "n_models",
    "hidden",
    "dropout",
    "val_fraction",
    "embedding_scaling",
}
_SETTINGS_OPTIONS = {"lr", "weight_decay", "batch_size", "max_epochs", "patience", "min_delta", "device", "n_jobs"}


def evaluate(
    sdata: SpatialData,
    model: ScellstModel | None = None,
    *,
    level: Literal["spot", "cell"] = "spot",
    genes: Sequence[str] | None = None,
    spot_table_key: str = Key.SPOTS_COUNTS,
    predicted_key: str | None = None,
    shapes_key: str = Key.NUCLEI,
    spots_key: str = Key.SPOTS,
    table_key: str | None = None,
    truth_key: str = Key.TRUE_EXPRESSION,
    max_distance_um: float = 3.0,
) -> pd.DataFrame:
    """Per-gene Pearson, Spearman, RMSE and MAE of predictions, in log-normalised units.

    Parameters
    ----------
    sdata
        The SpatialData object (not modified).
    model
        A fitted model: its spot-level predictions are computed in memory from the embedding table. ``None`` uses
        the tables written by :func:`scellst.tl.predict`.
    level
        ``"spot"``: against the measured spot counts (``log1p`` of counts per 10,000, every spot with nuclei).
        ``"cell"``: against a known per-cell truth (``truth_key``, e.g. from
        :func:`scellst.datasets.synthetic_tissue`), each predicted cell matched to the nearest true cell within
        ``max_distance_um``.
    genes
        Genes to score (default: every predicted gene).
    spot_table_key
        The measured spot count table.
    predicted_key
        The prediction table when ``model`` is ``None`` (default ``"spots_predicted"`` at spot level,
        ``f"{shapes_key}_expression"`` at cell level).
    shapes_key, spots_key, table_key
        Nucleus shapes, spot shapes and embedding table (used with ``model``).
    truth_key, max_distance_um
        Truth table and matching distance for ``level="cell"``.

    Returns
    -------
    A DataFrame indexed by gene with columns ``pearson``, ``spearman``, ``rmse`` and ``mae``; at cell level,
    ``attrs['matched_fraction']`` holds the fraction of predicted cells matched to a true cell.
    """
    if level == "cell":
        if model is not None:
            raise ValueError("At cell level, run `scellst.tl.predict` first and pass `predicted_key`.")
        key = predicted_key or f"{shapes_key}{Key.EXPRESSION_SUFFIX}"
        scores, matched = _truth_scores(sdata, predicted_key=key, truth_key=truth_key, max_distance_um=max_distance_um)
        if genes is not None:
            scores = scores.loc[list(genes)]
        scores.attrs["matched_fraction"] = matched
        return scores
    if level != "spot":
        raise ValueError(f"`level` must be 'spot' or 'cell', got {level!r}.")
    if model is not None:
        slide = prepare_slide(
            sdata,
            shapes_key=shapes_key,
            table_key=table_key,
            spots_key=spots_key,
            spot_table_key=spot_table_key,
            min_spot_counts=1,
        )
        genes = list(model.genes) if genes is None else list(genes)
        pred = pd.DataFrame(model.predict_spots(slide.features, slide.bags, slide.spot_xy), columns=model.genes)
        _check_genes(genes, model.genes, slide.counts.var_names)
        return metrics_per_gene(pred[genes].to_numpy(), lognorm(slide.counts, genes), genes)
    measured = sdata.tables[get_key(sdata, "tables", spot_table_key, what="spot count table")]
    predicted = sdata.tables[get_key(sdata, "tables", predicted_key or Key.SPOTS_PREDICTED, what="spot predictions")]
    genes = list(predicted.var_names) if genes is None else list(genes)
    _check_genes(genes, predicted.var_names, measured.var_names)
    pos = pd.Index(instance_ids(measured)).get_indexer(instance_ids(predicted))
    if (pos < 0).any():
        raise ValueError("Some predicted spots are not in the measured table; were they predicted on another slide?")
    truth = lognorm(measured[pos], genes)
    return metrics_per_gene(np.asarray(predicted[:, genes].X), truth, genes)


def _check_genes(genes: Sequence[str], predicted: Sequence[str], measured: Sequence[str]) -> None:
    missing = [g for g in genes if g not in set(predicted) or g not in set(measured)]
    if missing:
        raise KeyError(f"Genes missing from the predictions or the measured table: {missing[:10]}")


def _truth_scores(
    sdata: SpatialData, *, predicted_key: str, truth_key: str, max_distance_um: float, image_key: str | None = None
) -> tuple[pd.DataFrame, float]:
    from scipy.spatial import cKDTree

    pred = sdata.tables[get_key(sdata, "tables", predicted_key, what="predicted cell table")]
    truth = sdata.tables[get_key(sdata, "tables", truth_key, what="truth table")]
    pred_region = pred.uns["spatialdata_attrs"]["region"]
    truth_region = truth.uns["spatialdata_attrs"]["region"]
    image_key = get_key(sdata, "images", image_key, what="image")
    to_truth = intrinsic_to_intrinsic(sdata, pred_region, truth_region)
    pred_xy = apply_affine(to_truth, shapes_centroids(sdata.shapes[pred_region]).astype(float))
    pred_xy = pred_xy[pd.Index(sdata.shapes[pred_region].index.astype(str)).get_indexer(instance_ids(pred))]
    truth_shapes = sdata.shapes[truth_region]
    truth_pos = pd.Index(instance_ids(truth)).get_indexer(truth_shapes.index.astype(str))
    to_image = intrinsic_to_intrinsic(sdata, truth_region, image_key)
    um_per_unit = get_microns_per_pixel(sdata, image_key) * float(np.sqrt(abs(np.linalg.det(to_image[:2, :2]))))
    dist, idx = cKDTree(shapes_centroids(truth_shapes)).query(pred_xy, k=1)
    ok = dist * um_per_unit <= max_distance_um
    genes = [g for g in pred.var_names if g in truth.var_names]
    if not genes:
        raise ValueError("The predicted and true tables share no gene.")
    full = np.asarray(truth.X)[truth_pos]  # rows aligned to the truth shapes' order
    lib = full.sum(axis=1, keepdims=True)
    gene_pos = pd.Index(truth.var_names).get_indexer(genes)
    t = np.log1p(full[:, gene_pos] / np.maximum(lib, 1e-12) * TARGET_SUM)[idx[ok]]
    return metrics_per_gene(np.asarray(pred[:, genes].X)[ok], t, genes), float(ok.mean())


def _folds(prepared: dict[str, Slide], scheme: str, n_folds: int, seed: int):
    names = list(prepared)
    if scheme == "leave_one_out":
        if len(names) < 2:
            raise ValueError("leave_one_out needs at least two slides; use scheme='single_slide' for one.")
        for test in names:
            yield test, [prepared[n] for n in names if n != test], prepared[test]
    elif scheme == "single_slide":
        from sklearn.cluster import KMeans

        for name in names:
            slide = prepared[name]
            k = min(max(n_folds * 4, n_folds), len(slide.bags))
            blocks = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(slide.spot_xy)
            group = np.random.default_rng(seed).permutation(np.arange(k) % n_folds)[blocks]
            for f in range(n_folds):
                yield f"{name}/fold{f}", [slide.subset(group != f)], slide.subset(group == f)
    else:
        raise ValueError(f"Unknown scheme {scheme!r}; use 'leave_one_out' or 'single_slide'.")


def _reference_genes(models: Mapping[str, Mapping[str, Any]]) -> set[str] | None:
    """Genes shared by every model's single-cell reference (``None`` when no model has one)."""
    refs = [opts["reference"] for opts in models.values() if opts.get("reference") is not None]
    if not refs:
        return None
    return set.intersection(*({str(g) for g in r.var_names} for r in refs))


def cross_validate(
    slides: Mapping[str, SpatialData] | Sequence[SpatialData],
    *,
    scheme: Literal["leave_one_out", "single_slide"] = "leave_one_out",
    models: Mapping[str, Mapping[str, Any]] | None = None,
    baselines: Sequence[str] = ("ridge", "spot_mlp"),
    genes: Sequence[str] | None = None,
    flavor: Literal["hvg", "svg", "rmax"] = "hvg",
    n_genes: int = 50,
    n_folds: int = 3,
    seed: int = 0,
    shapes_key: str = Key.NUCLEI,
    table_key: str | None = None,
    spots_key: str = Key.SPOTS,
    spot_table_key: str = Key.SPOTS_COUNTS,
    min_spot_counts: float = 20,
    keep_models: bool = False,
    show_progress_bar: bool = False,
) -> pd.DataFrame:
    """Cross-validate sCellST models and spot-level baselines on held-out spots, gene by gene.

    Genes are selected on the training part of each fold only. Every model is scored at spot level on the held-out
    spots with :func:`evaluate`'s metrics.

    Parameters
    ----------
    slides
        A mapping of slide names to SpatialData objects (or a list, named ``slide_0``, ...), each prepared for
        :func:`train`.
    scheme
        ``"leave_one_out"``: train on all slides but one, test on it, for each slide. ``"single_slide"``: within
        each slide, ``n_folds`` folds of whole spatial blocks of spots.
    models
        Models to run, as ``{name: train options}`` (e.g. ``{"mil_mse": {"loss": "mse"}, "mil_nb":
        {"loss": "nb"}, "miso": {"model": "miso"}}``); options are those of :func:`train` (model, model_params,
        reference, groupby, loss, n_models, lr, max_epochs, ...). Default ``{"scellst": {}}``. When a model has a
        single-cell ``reference`` (CPNN) and ``genes`` is ``None``, every model's genes are selected among the
        reference's genes, so that all models are scored on the same genes.
    baselines
        Spot-level baselines to run beside them: ``"ridge"`` and/or ``"spot_mlp"``.
    genes
        A fixed gene list; ``None`` selects ``n_genes`` genes by ``flavor`` on each fold's training spots.
    flavor, n_genes
        Gene selection.
    n_folds
        Folds per slide for ``"single_slide"``.
    seed
        Random seed of the models and folds.
    shapes_key, table_key, spots_key, spot_table_key, min_spot_counts
        As in :func:`train`.
    keep_models
        Keep the fitted models in ``attrs['models']`` (``{(fold, name): model}``), e.g. to inspect CPNN's type
        weights on each held-out slide.
    show_progress_bar
        Show the training progress bars.

    Returns
    -------
    A tidy DataFrame with one row per fold, model and gene: ``fold``, ``test``, ``model``, ``gene``, ``pearson``,
    ``spearman``, ``rmse``, ``mae`` and ``train_seconds``.
    """
    from ..tl._models import default_lr
    from ._baselines import BASELINES, fit_predict_baseline

    if not isinstance(slides, Mapping):
        slides = {f"slide_{i}": s for i, s in enumerate(slides)}
    models = dict(models) if models is not None else {"scellst": {}}
    for name, opts in models.items():
        unknown = set(opts) - _TRAIN_OPTIONS - _SETTINGS_OPTIONS
        if unknown:
            raise ValueError(f"Model {name!r}: unknown options {sorted(unknown)}.")
    for b in baselines:
        if b not in BASELINES:
            raise ValueError(f"Unknown baseline {b!r}; available: {BASELINES}.")
    prepared = {
        name: prepare_slide(
            s,
            name=name,
            shapes_key=shapes_key,
            table_key=table_key,
            spots_key=spots_key,
            spot_table_key=spot_table_key,
            min_spot_counts=min_spot_counts,
        )
        for name, s in slides.items()
    }
    shared = _reference_genes(models) if genes is None else None
    if shared is not None:
        logger.info(f"Genes are selected among the {len(shared):,} genes measured by the CPNN reference(s)")
    rows, kept = [], {}
    for fold, train, test in _folds(prepared, scheme, n_folds, seed):
        fold_genes = rank_genes(
            [s.counts if shared is None else s.counts[:, s.counts.var_names.isin(shared)] for s in train],
            [s.spot_xy for s in train],
            flavor=list(genes) if genes is not None else flavor,
            n_genes=n_genes,
        )
        present = set(test.counts.var_names)
        dropped = [g for g in fold_genes if g not in present]
        if dropped:
            logger.warning(f"{fold}: {len(dropped)} selected genes are absent from the test slide and are skipped")
            fold_genes = [g for g in fold_genes if g in present]
        truth = lognorm(test.counts, fold_genes)
        predictions: dict[str, tuple[np.ndarray, float]] = {}
        for name, opts in models.items():
            settings_kw = {k: v for k, v in opts.items() if k in _SETTINGS_OPTIONS}
            settings_kw.setdefault("lr", default_lr(opts.get("model", "scellst")))
            settings = FitSettings(**settings_kw, show_progress_bar=show_progress_bar)
            t0 = time.perf_counter()
            model = fit_slides(
                train,
                fold_genes,
                seed=seed,
                settings=settings,
                **{k: v for k, v in opts.items() if k in _TRAIN_OPTIONS},
            )
            predictions[name] = (
                model.predict_spots(test.features, test.bags, test.spot_xy),
                time.perf_counter() - t0,
            )
            if keep_models:
                kept[(fold, name)] = model
        for b in baselines:
            t0 = time.perf_counter()
            pred = fit_predict_baseline(b, train, test, fold_genes, seed=seed)
            predictions[b] = (pred, time.perf_counter() - t0)
        for name, (pred, seconds) in predictions.items():
            scores = metrics_per_gene(pred, truth, fold_genes).reset_index()
            scores.insert(0, "model", name)
            scores.insert(0, "test", test.name)
            scores.insert(0, "fold", fold)
            scores["train_seconds"] = seconds
            rows.append(scores)
        summary = ", ".join(
            f"{n} {metrics_per_gene(p, truth, fold_genes)['pearson'].mean():.3f}" for n, (p, _) in predictions.items()
        )
        logger.info(f"{fold}: mean Pearson over {len(fold_genes)} genes: {summary}")
    out = pd.concat(rows, ignore_index=True)
    if keep_models:
        out.attrs["models"] = kept
    return out
