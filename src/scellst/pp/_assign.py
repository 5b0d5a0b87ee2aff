"""Assign nuclei to spots (the bags of the multiple-instance learner)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import Col, Key
from .._logging import logger
from .._utils import (
    affine_scale,
    apply_affine,
    get_key,
    instance_ids,
    intrinsic_to_intrinsic,
    persist,
    shapes_centroids,
)

if TYPE_CHECKING:
    from spatialdata import SpatialData


def spot_membership(sdata: SpatialData, shapes_key: str, spots_key: str) -> np.ndarray:
    """For each nucleus, the id of the spot that contains its centroid (``None`` when outside every spot)."""
    from scipy.spatial import cKDTree

    spots = sdata.shapes[spots_key]
    nuclei = sdata.shapes[shapes_key]
    matrix = intrinsic_to_intrinsic(sdata, shapes_key, spots_key)
    xy = apply_affine(matrix, shapes_centroids(nuclei))
    out = np.full(len(nuclei), None, dtype=object)
    if len(xy) == 0 or len(spots) == 0:
        return out
    spot_ids = spots.index.astype(str).to_numpy()
    if (spots.geometry.geom_type == "Point").all():
        if Col.RADIUS not in spots:
            raise ValueError(f"Spot circles {spots_key!r} have no 'radius' column; parse them with ShapesModel.")
        centres = np.column_stack([spots.geometry.x.to_numpy(), spots.geometry.y.to_numpy()])
        radius = spots[Col.RADIUS].to_numpy(dtype=float)
        dist, idx = cKDTree(centres).query(xy, k=1)
        inside = dist <= radius[idx]
        out[inside] = spot_ids[idx[inside]]
    else:
        import geopandas as gpd

        pts = gpd.GeoDataFrame(geometry=gpd.points_from_xy(xy[:, 0], xy[:, 1]))
        polys = gpd.GeoDataFrame({"_sid": spot_ids}, geometry=spots.geometry.to_numpy())
        joined = gpd.sjoin(pts, polys, predicate="within", how="left")
        joined = joined[~joined.index.duplicated(keep="first")]
        sid = joined["_sid"].to_numpy()
        ok = pd.notna(sid)
        out[ok] = sid[ok]
    return out


def assign_cells(
    sdata: SpatialData,
    shapes_key: str = Key.NUCLEI,
    spots_key: str | None = Key.SPOTS,
    *,
    spot_table_key: str | None = Key.SPOTS_COUNTS,
    overwrite: bool = False,
) -> None:
    """Assign each nucleus to the spot that contains its centroid.

    Positions are compared in the spots' intrinsic frame, through a coordinate system that the nuclei and spots
    share, so images and spots at different resolutions (e.g. Visium hires vs full-res) are handled. A nucleus whose
    centroid lies within a spot's radius (or inside a spot polygon) belongs to it. Where circles overlap, the
    nearest spot centre wins; where polygons overlap, the first polygon of the spot table that contains the
    centroid wins.

    Parameters
    ----------
    sdata
        The SpatialData object (modified in place).
    shapes_key
        The nucleus shapes.
    spots_key
        The spot circles (or polygons).
    spot_table_key
        The spot table; it receives ``obs['n_cells']``. ``None`` to skip.
    overwrite
        Replace an earlier assignment of these nuclei (refused otherwise). On a disk-backed object the elements
        that receive the new columns are rewritten atomically.

    Returns
    -------
    Nothing; writes ``spot_id`` (string, missing outside spots) to ``sdata.shapes[shapes_key]`` and to
    ``obs['spot_id']`` of every table annotating those shapes, and ``obs['n_cells']`` to the spot table.
    """
    shapes_key = get_key(sdata, "shapes", shapes_key, what="nucleus shapes")
    spots_key = get_key(sdata, "shapes", spots_key, what="spot shapes")
    if shapes_key == spots_key:
        raise ValueError("`shapes_key` and `spots_key` must name different elements.")
    if Col.SPOT_ID in sdata.shapes[shapes_key].columns and not overwrite:
        raise ValueError(
            f"The nuclei of {shapes_key!r} are already assigned to spots (column 'spot_id'); pass `overwrite=True` "
            "to assign them again."
        )
    matrix = intrinsic_to_intrinsic(sdata, shapes_key, spots_key)
    spot_of = spot_membership(sdata, shapes_key, spots_key)
    nuclei = sdata.shapes[shapes_key]
    nuclei[Col.SPOT_ID] = pd.Series(spot_of, index=nuclei.index, dtype="object")
    persist(sdata, shapes_key)

    by_id = pd.Series(spot_of, index=nuclei.index.astype(str))
    for name, table in sdata.tables.items():
        attrs = table.uns.get("spatialdata_attrs", {})
        regions = attrs.get("region", [])
        regions = [regions] if isinstance(regions, str) else list(regions)
        if shapes_key in regions:
            table.obs[Col.SPOT_ID] = pd.Categorical(by_id.reindex(instance_ids(table)).to_numpy())
            persist(sdata, name)

    n_in = int(pd.notna(spot_of).sum())
    counts = pd.Series(spot_of[pd.notna(spot_of)]).value_counts()
    n_spots = len(sdata.shapes[spots_key])
    n_empty = n_spots - int((counts > 0).sum())
    if spot_table_key is not None:
        spot_table_key = get_key(sdata, "tables", spot_table_key, what="spot table")
        table = sdata.tables[spot_table_key]
        table.obs[Col.N_CELLS] = counts.reindex(instance_ids(table)).fillna(0).astype(int).to_numpy()
        persist(sdata, spot_table_key)
    scale = affine_scale(matrix)
    logger.info(
        f"Assigned {n_in:,} of {len(nuclei):,} nuclei to {n_spots - n_empty:,} spots "
        f"(median {int(counts.median()) if len(counts) else 0} nuclei per spot; {n_empty:,} spots without nuclei; "
        f"nucleus-to-spot frame scale {scale:.3g})"
    )
    if n_in == 0:
        raise ValueError(
            f"No nucleus of {shapes_key!r} falls inside a spot of {spots_key!r}. The two are probably not in the "
            "same coordinate frame: check their transformations (`spatialdata.transformations.get_transformation`)."
        )
