"""Evaluation of predictions against measured spots or a known single-cell truth."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import TARGET_SUM, Key
from .._utils import (
    apply_affine,
    get_key,
    get_microns_per_pixel,
    instance_ids,
    intrinsic_to_intrinsic,
    shapes_centroids,
)
from ._metrics import correlation_per_gene

if TYPE_CHECKING:
    from spatialdata import SpatialData


def spot_correlations(
    sdata: SpatialData,
    *,
    spot_table_key: str = Key.SPOTS_COUNTS,
    predicted_key: str = Key.SPOTS_PREDICTED,
    genes: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Per-gene Pearson and Spearman correlation between predicted and measured spot expression.

    Measured counts are normalised as during training (``log1p`` of counts normalised to 10,000 per spot) and
    compared with the spot-level predictions written by :func:`scellst.tl.predict` (the mean of each spot's cells).

    Parameters
    ----------
    sdata
        The SpatialData object.
    spot_table_key
        The measured spot count table.
    predicted_key
        The spot-level prediction table.
    genes
        Genes to score (default: every predicted gene).

    Returns
    -------
    A DataFrame indexed by gene with columns ``pearson`` and ``spearman``.
    """
    import scipy.sparse as sp

    measured = sdata.tables[get_key(sdata, "tables", spot_table_key, what="spot count table")]
    predicted = sdata.tables[get_key(sdata, "tables", predicted_key, what="spot prediction table")]
    genes = list(predicted.var_names) if genes is None else list(genes)
    missing = [g for g in genes if g not in predicted.var_names or g not in measured.var_names]
    if missing:
        raise KeyError(f"Genes missing from the measured or predicted table: {missing[:10]}")
    ids = pd.Index(instance_ids(predicted))
    mids = pd.Index(instance_ids(measured))
    pos = mids.get_indexer(ids)
    if (pos < 0).any():
        raise ValueError("Some predicted spots are not in the measured table; were they predicted on another slide?")
    x = measured.X
    lib = np.asarray(x.sum(axis=1)).ravel()[pos]
    sub = measured[:, genes].X
    sub = (sub.toarray() if sp.issparse(sub) else np.asarray(sub))[pos]
    truth = np.log1p(sub / np.maximum(lib, 1)[:, None] * TARGET_SUM)
    pred = np.asarray(predicted[:, genes].X)
    return correlation_per_gene(pred, truth, genes)


def truth_correlations(
    sdata: SpatialData,
    *,
    predicted_key: str = f"{Key.NUCLEI}{Key.EXPRESSION_SUFFIX}",
    truth_key: str = Key.TRUE_EXPRESSION,
    max_distance_um: float = 3.0,
    image_key: str | None = None,
) -> tuple[pd.DataFrame, float]:
    """Cell-level correlation of predictions with a known truth (e.g. :func:`scellst.datasets.synthetic_tissue`).

    Each predicted cell is matched to the nearest true cell within ``max_distance_um``; the truth is normalised
    like the training targets (``log1p`` of expression normalised to 10,000 per cell).

    Returns
    -------
    The per-gene correlations and the fraction of predicted cells that were matched.
    """
    from scipy.spatial import cKDTree

    pred = sdata.tables[get_key(sdata, "tables", predicted_key, what="predicted cell table")]
    truth = sdata.tables[get_key(sdata, "tables", truth_key, what="truth table")]
    pred_region = pred.uns["spatialdata_attrs"]["region"]
    truth_region = truth.uns["spatialdata_attrs"]["region"]
    image_key = get_key(sdata, "images", image_key, what="image")
    to_truth = intrinsic_to_intrinsic(sdata, pred_region, truth_region)
    pred_xy = apply_affine(to_truth, shapes_centroids(sdata.shapes[pred_region]).astype(float))
    pred_ids = pd.Index(sdata.shapes[pred_region].index.astype(str))
    pred_xy = pred_xy[pred_ids.get_indexer(instance_ids(pred))]
    truth_shapes = sdata.shapes[truth_region]
    truth_xy = shapes_centroids(truth_shapes)
    truth_pos = pd.Index(instance_ids(truth)).get_indexer(truth_shapes.index.astype(str))
    to_image = intrinsic_to_intrinsic(sdata, truth_region, image_key)
    um_per_unit = get_microns_per_pixel(sdata, image_key) * float(np.sqrt(abs(np.linalg.det(to_image[:2, :2]))))
    dist, idx = cKDTree(truth_xy).query(pred_xy, k=1)
    ok = dist * um_per_unit <= max_distance_um
    genes = [g for g in pred.var_names if g in truth.var_names]
    if not genes:
        raise ValueError("The predicted and true tables share no gene.")
    full = np.asarray(truth.X)[truth_pos]  # rows aligned to the truth shapes' order
    lib = full.sum(axis=1, keepdims=True)
    gene_pos = [list(truth.var_names).index(g) for g in genes]
    t = np.log1p(full[:, gene_pos] / np.maximum(lib, 1e-12) * TARGET_SUM)[idx[ok]]
    p = np.asarray(pred[:, genes].X)[ok]
    return correlation_per_gene(p, t, genes), float(ok.mean())
