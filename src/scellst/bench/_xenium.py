"""Predicted cells against Xenium cells of the same section, matched one to one in space."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import TARGET_SUM, Attr, Col, Key
from .._logging import logger
from .._utils import (
    apply_affine,
    get_key,
    intrinsic_to_intrinsic,
    provenance,
    shapes_centroids,
    write_element,
)

if TYPE_CHECKING:
    from spatialdata import SpatialData


def match_cells(xy_a: np.ndarray, xy_b: np.ndarray, max_distance: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one matching of two point sets: closest pairs first, each point used at most once.

    Returns indices into ``xy_a`` and ``xy_b`` and the distances of the matched pairs.
    """
    from scipy.spatial import cKDTree

    if len(xy_a) == 0 or len(xy_b) == 0:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0)
    pairs = cKDTree(xy_a).sparse_distance_matrix(cKDTree(xy_b), max_distance, output_type="ndarray")
    if len(pairs) == 0:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0)
    order = np.argsort(pairs["v"], kind="stable")
    used_a = np.zeros(len(xy_a), bool)
    used_b = np.zeros(len(xy_b), bool)
    ia, ib, dist = [], [], []
    for k in order:
        i, j = pairs["i"][k], pairs["j"][k]
        if not used_a[i] and not used_b[j]:
            used_a[i] = used_b[j] = True
            ia.append(i)
            ib.append(j)
            dist.append(pairs["v"][k])
    return np.asarray(ia, int), np.asarray(ib, int), np.asarray(dist, float)


def compare_xenium(
    sdata: SpatialData,
    *,
    predicted_key: str | None = None,
    shapes_key: str = Key.NUCLEI,
    xenium_table_key: str = Key.XENIUM_TABLE,
    max_distance_um: float = 5.0,
    key_added: str = "xenium_comparison",
    overwrite: bool = False,
) -> pd.DataFrame:
    """Match predicted H&E nuclei to Xenium cells of the same section and correlate their expression per gene.

    Nuclei and Xenium cells are matched one to one by centroid, closest pairs first, within ``max_distance_um``
    (computed in the Xenium cells' micron frame through a shared coordinate system). For the genes both sides have,
    Pearson and Spearman correlations over the matched cells compare the predicted values with the measured
    log-normalised counts (``log1p`` of counts per 10,000 over the panel).

    Parameters
    ----------
    sdata
        A SpatialData holding the H&E nuclei with predictions and the Xenium cells (e.g. from
        :func:`scellst.io.xenium` with the H&E registered, then segmentation, embedding and prediction).
    predicted_key
        The predicted cell table (default ``f"{shapes_key}_expression"``).
    shapes_key
        The nucleus shapes the predictions annotate.
    xenium_table_key
        The Xenium cell x gene count table; its annotated shapes give the cell positions.
    max_distance_um
        Largest centroid distance of a match, in microns.
    key_added
        Name of the table of matched cells.
    overwrite
        Replace an existing table of that name.

    Returns
    -------
    Per shared gene: ``pearson``, ``spearman``, ``n_cells``; ``attrs`` hold ``matched_fraction_predicted``,
    ``matched_fraction_xenium`` and ``median_distance_um``. Also adds ``sdata.tables[key_added]``: matched cells x
    shared genes annotating ``shapes_key``, measured values in ``X``, predictions in ``layers['predicted']``,
    ``obs['xenium_cell_id']`` and ``obs['distance_um']``, the per-gene scores in ``var``.
    """
    import anndata as ad
    import scipy.sparse as sp
    from scipy.stats import spearmanr
    from spatialdata.models import TableModel

    predicted_key = get_key(
        sdata, "tables", predicted_key or f"{shapes_key}{Key.EXPRESSION_SUFFIX}", what="predicted table"
    )
    xenium_table_key = get_key(sdata, "tables", xenium_table_key, what="Xenium table")
    pred = sdata.tables[predicted_key]
    xen = sdata.tables[xenium_table_key]
    xen_region = xen.uns["spatialdata_attrs"]["region"]
    xen_region = xen_region[0] if isinstance(xen_region, list) else xen_region
    xen_instance = xen.uns["spatialdata_attrs"]["instance_key"]
    xen_shapes = get_key(sdata, "shapes", xen_region, what="Xenium cell shapes")
    shapes_key = get_key(sdata, "shapes", shapes_key, what="nucleus shapes")
    if max_distance_um <= 0:
        raise ValueError(f"`max_distance_um` must be positive, got {max_distance_um}.")
    genes = [g for g in pred.var_names if g in set(xen.var_names)]
    if not genes:
        raise ValueError(
            f"No gene is shared by {predicted_key!r} ({pred.n_vars} genes) and {xenium_table_key!r} "
            f"({xen.n_vars} genes); train on genes of the Xenium panel (`scellst.tl.train(genes=...)`)."
        )

    # positions in the Xenium shapes' intrinsic frame (microns)
    nuclei = sdata.shapes[shapes_key]
    nuc_xy = pd.DataFrame(shapes_centroids(nuclei), index=nuclei.index.astype(str))
    to_xen = intrinsic_to_intrinsic(sdata, shapes_key, xen_shapes)
    pred_ids = pred.obs[pred.uns["spatialdata_attrs"]["instance_key"]].astype(str).to_numpy()
    xy_pred = apply_affine(to_xen, nuc_xy.reindex(pred_ids).to_numpy())
    cells = sdata.shapes[xen_shapes]
    cell_xy = pd.DataFrame(shapes_centroids(cells), index=cells.index.astype(str))
    xen_ids = xen.obs[xen_instance].astype(str).to_numpy()
    xy_xen = cell_xy.reindex(xen_ids).to_numpy()
    ok_p, ok_x = np.isfinite(xy_pred).all(1), np.isfinite(xy_xen).all(1)
    ia, ib, dist = match_cells(
        np.where(ok_p[:, None], xy_pred, 1e12), np.where(ok_x[:, None], xy_xen, -1e12), max_distance_um
    )
    frac_p = len(ia) / max(len(pred_ids), 1)
    frac_x = len(ib) / max(len(xen_ids), 1)
    if len(ia) < 3:
        raise ValueError(
            f"Only {len(ia)} nuclei lie within {max_distance_um} um of a Xenium cell. Check that the H&E is registered "
            "to the Xenium cells (`scellst.io.xenium(..., alignment=...)`; `scellst.im.registration_shifts` measures how "
            "far off it is, tile by tile, from the Xenium nucleus outlines), or compare by cell type with "
            "`scellst.tl.compare_cell_types` when the sections differ."
        )
    p = pred[ia, genes].X
    p = p.toarray() if sp.issparse(p) else np.asarray(p, dtype=np.float32)
    xall = xen.X[ib]
    xall = xall.toarray() if sp.issparse(xall) else np.asarray(xall, dtype=np.float32)
    lib = xall.sum(axis=1, keepdims=True)
    m = np.log1p(xall / np.maximum(lib, 1e-8) * TARGET_SUM)[:, xen.var_names.get_indexer(genes)].astype(np.float32)
    rows = []
    for k, g in enumerate(genes):
        a, b = p[:, k], m[:, k]
        ok = a.std() > 1e-12 and b.std() > 1e-12
        rows.append(
            {
                "gene": g,
                "pearson": float(np.corrcoef(a, b)[0, 1]) if ok else np.nan,
                "spearman": float(spearmanr(a, b).statistic) if ok else np.nan,
                "n_cells": len(a),
            }
        )
    df = pd.DataFrame(rows).set_index("gene")
    df.attrs.update(
        matched_fraction_predicted=frac_p, matched_fraction_xenium=frac_x, median_distance_um=float(np.median(dist))
    )
    obs = pd.DataFrame(
        {
            Col.CELL_ID: pred.obs[pred.uns["spatialdata_attrs"]["instance_key"]].to_numpy()[ia],
            Col.REGION: pd.Categorical([shapes_key] * len(ia)),
            "xenium_cell_id": xen_ids[ib],
            "distance_um": dist,
        },
        index=pred.obs_names[ia].astype(str),
    )
    out = ad.AnnData(X=m, obs=obs, var=df.reset_index(drop=True).set_index(pd.Index(genes)).astype(float))
    out.layers["predicted"] = p
    out.uns[Attr.ROOT] = provenance(
        {"max_distance_um": max_distance_um, **{k: float(v) for k, v in df.attrs.items()}},
        function="compare_xenium",
        predicted_key=predicted_key,
        xenium_table_key=xenium_table_key,
    )
    table = TableModel.parse(out, region=shapes_key, region_key=Col.REGION, instance_key=Col.CELL_ID)
    write_element(sdata, key_added, table, overwrite=overwrite, what=f"{len(ia):,} matched cells x {len(genes)} genes")
    logger.info(
        f"Matched {len(ia):,} nuclei to Xenium cells ({frac_p:.1%} of nuclei, {frac_x:.1%} of Xenium cells, median "
        f"{np.median(dist):.1f} um); mean Pearson over {len(genes)} genes {df['pearson'].mean():.3f}"
    )
    return df
