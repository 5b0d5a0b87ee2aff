"""Visium HD: 2 um bins summed into cells (a near-single-cell training target)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import Attr, Col, Key
from .._logging import logger
from .._utils import (
    apply_affine,
    check_writable,
    get_key,
    instance_ids,
    intrinsic_to_intrinsic,
    shapes_centroids,
    shapes_microns_per_unit,
    write_element,
)

if TYPE_CHECKING:
    from spatialdata import SpatialData

_BIN_CHUNK = 500_000  # bins matched to cells at a time


def bins_to_cells(
    sdata: SpatialData,
    bins_key: str = f"{Key.SPOTS}_002um",
    bins_table_key: str = f"{Key.SPOTS_COUNTS}_002um",
    shapes_key: str = Key.NUCLEI,
    *,
    expand_um: float = 0.0,
    key_added: str = "cells",
    overwrite: bool = False,
) -> None:
    """Sum the counts of small bins (Visium HD 2 um) into the nuclei they fall in, as bin2cell does.

    A bin belongs to the nucleus whose outline contains its centre; with ``expand_um`` > 0, a bin outside every
    nucleus goes to the nearest nucleus within that distance (the nuclei grow into the cell bodies without
    overlapping one another). Bins of no nucleus are left out. The cells become spots of one nucleus each, so
    training on them (``spots_key=key_added``) fits every cell to its own measured expression.

    Parameters
    ----------
    sdata
        The SpatialData object (modified in place), with nuclei (``scellst.im.segment_nuclei``) and the bins, as
        :func:`scellst.io.visium_hd` reads them with ``extra_bin_sizes=(2,)``.
    bins_key, bins_table_key
        The bins (shapes) and their raw counts (table).
    shapes_key
        The nuclei.
    expand_um
        How far beyond its nucleus a cell collects bins, in microns (e.g. 2-4 um; 0 keeps the nuclei).
    key_added
        Name of the new shapes (the nucleus outlines, indexed by the nucleus ids) and of their table
        ``f"{key_added}_counts"``.
    overwrite
        Replace earlier elements of these names.

    Returns
    -------
    Nothing; writes ``shapes[key_added]`` and ``tables[f"{key_added}_counts"]`` (cells x genes raw counts,
    ``obs['n_bins']``). Then ``scellst.pp.assign_cells(sdata, shapes_key, key_added, spot_table_key=
    f"{key_added}_counts")`` and ``scellst.tl.train(sdata, spots_key=key_added, spot_table_key=f"{key_added}_counts")``.
    """
    import anndata as ad
    import scipy.sparse as sp
    import shapely
    from spatialdata.models import ShapesModel, TableModel

    from ._assign import _polygons

    bins_key = get_key(sdata, "shapes", bins_key, what="bin shapes")
    bins_table_key = get_key(sdata, "tables", bins_table_key, what="bin count table")
    shapes_key = get_key(sdata, "shapes", shapes_key, what="nucleus shapes")
    table_key = f"{key_added}_counts"
    for key in (key_added, table_key):
        check_writable(sdata, key, overwrite=overwrite)
    if expand_um < 0:
        raise ValueError(f"`expand_um` must be >= 0, got {expand_um}.")
    nuclei = sdata.shapes[shapes_key]
    if len(nuclei) == 0:
        raise ValueError(f"No nucleus in {shapes_key!r}: segment the nuclei first (`scellst.im.segment_nuclei`).")
    table = sdata.tables[bins_table_key]
    bins = sdata.shapes[bins_key]
    pos = pd.Index(bins.index.astype(str)).get_indexer(instance_ids(table))
    if (pos < 0).any():
        raise ValueError(f"Some rows of {bins_table_key!r} have no bin in {bins_key!r}; is it their table?")
    centres = apply_affine(intrinsic_to_intrinsic(sdata, bins_key, shapes_key), shapes_centroids(bins)[pos])
    cells = _polygons(nuclei)
    expand_px = expand_um / shapes_microns_per_unit(sdata, shapes_key) if expand_um > 0 else 0.0
    tree = shapely.STRtree(cells)
    owner = np.full(len(centres), -1, dtype=np.int64)
    for start in range(0, len(centres), _BIN_CHUNK):
        pts = shapely.points(centres[start : start + _BIN_CHUNK])
        if expand_px > 0:
            b_idx, c_idx = tree.query_nearest(pts, max_distance=expand_px, all_matches=False)
        else:
            b_idx, c_idx = tree.query(pts, predicate="within")
        first = np.unique(b_idx, return_index=True)[1]  # one nucleus per bin
        owner[start + b_idx[first]] = c_idx[first]
    has = owner >= 0
    n_cells = len(nuclei)
    assign = sp.csr_matrix(
        (np.ones(int(has.sum()), np.float32), (owner[has], np.flatnonzero(has))), shape=(n_cells, len(owner))
    )
    x = table.X if sp.issparse(table.X) else sp.csr_matrix(np.asarray(table.X))
    counts = (assign @ x).tocsr().astype(np.float32)
    n_bins = np.asarray(assign.sum(axis=1)).ravel().astype(int)
    ids = nuclei.index.astype(str).to_numpy()
    obs = pd.DataFrame(
        {Col.SPOT_ID: ids, Col.REGION: pd.Categorical([key_added] * n_cells), "n_bins": n_bins}, index=ids
    )
    adata = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=table.var_names.astype(str)))
    adata.uns[Attr.ROOT] = {"bins": bins_table_key, "expand_um": float(expand_um), "platform": "visium_hd"}
    shapes = nuclei[[nuclei.geometry.name] + ([Col.RADIUS] if Col.RADIUS in nuclei else [])].copy()
    shapes.index = pd.Index(ids, name=Col.SPOT_ID)
    shapes = ShapesModel.parse(shapes)  # the copy keeps the nuclei's transformations
    write_element(sdata, key_added, shapes, overwrite=overwrite, what=f"{n_cells:,} cells made of bins")
    write_element(
        sdata,
        table_key,
        TableModel.parse(adata, region=key_added, region_key=Col.REGION, instance_key=Col.SPOT_ID),
        overwrite=overwrite,
        what="the cells' summed bin counts",
    )
    logger.info(
        f"Summed {int(has.sum()):,} of {len(owner):,} bins into {int((n_bins > 0).sum()):,} of {n_cells:,} nuclei "
        f"(median {int(np.median(n_bins[n_bins > 0])) if (n_bins > 0).any() else 0} bins per cell, "
        f"expand_um={expand_um:g})"
    )
