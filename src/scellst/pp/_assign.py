"""Assign nuclei to spots (the bags of the multiple-instance learner)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import Attr, Col, Key
from .._logging import logger
from .._utils import (
    affine_scale,
    apply_affine,
    get_key,
    instance_ids,
    intrinsic_to_intrinsic,
    persist,
    shapes_centroids,
    shapes_microns_per_unit,
    write_element,
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


ASSIGN_RULES = ("centroid", "overlap")
OVERLAPS_SUFFIX = "_overlaps"  # tables[f"{shapes_key}_overlaps"]: one row per (cell, spot) pair, with its weight
_OVERLAP_CHUNK = 100_000  # cells intersected with the spots at a time


HD_EXPAND_UM = 3.0  # Visium HD: nuclei grown by this much stand for the cells whose transcripts the bins capture


def default_assignment(sdata: SpatialData, spot_table_key: str = Key.SPOTS_COUNTS) -> dict[str, Any]:
    """How the pipeline assigns cells: by overlap of nuclei grown by 3 um for Visium HD bins, else by centroid."""
    table = sdata.tables.get(spot_table_key) if spot_table_key is not None else None
    if table is not None and table.uns.get(Attr.ROOT, {}).get("platform") == "visium_hd":
        return {"rule": "overlap", "expand_um": HD_EXPAND_UM}
    return {"rule": "centroid"}


def overlaps_key(shapes_key: str) -> str:
    """Key of the table of cell-to-spot overlaps written by ``assign_cells(rule="overlap")``."""
    return f"{shapes_key}{OVERLAPS_SUFFIX}"


def _polygons(gdf, *, expand: float = 0.0):
    """The shapes of ``gdf`` as polygons (circles for points with a ``radius``), grown by ``expand`` (same units)."""
    import shapely

    geom = np.asarray(gdf.geometry.to_numpy())
    if len(geom) and (gdf.geometry.geom_type == "Point").all():
        if Col.RADIUS not in gdf:
            raise ValueError("Point shapes need a 'radius' column (parse them with ShapesModel) to compute overlaps.")
        return shapely.buffer(geom, gdf[Col.RADIUS].to_numpy(dtype=float) + expand, quad_segs=8)
    return shapely.buffer(geom, expand, quad_segs=4) if expand > 0 else geom


def spot_overlaps(sdata: SpatialData, shapes_key: str, spots_key: str, *, expand_um: float = 0.0) -> pd.DataFrame:
    """Every (cell, spot) pair whose outlines intersect, with the fraction of the cell's area inside the spot.

    Nucleus outlines (circles for point shapes), grown by ``expand_um`` to approximate the whole cell, are mapped
    into the spots' intrinsic frame and intersected with the spot circles, squares or polygons.

    Returns
    -------
    A data frame with ``cell`` (position of the cell in ``sdata.shapes[shapes_key]``), ``spot_id`` and ``weight``
    (the fraction of the cell's area inside that spot: the weights of a cell sum to 1 where the spots tile the
    tissue, like Visium HD bins, and to less where they leave gaps, like Visium spots).
    """
    import shapely

    nuclei, spots = sdata.shapes[shapes_key], sdata.shapes[spots_key]
    matrix = intrinsic_to_intrinsic(sdata, shapes_key, spots_key)
    expand_px = expand_um / shapes_microns_per_unit(sdata, shapes_key) if expand_um > 0 else 0.0
    cells = _polygons(nuclei, expand=expand_px)
    if not np.allclose(matrix, np.eye(3)):
        cells = shapely.transform(cells, lambda xy: apply_affine(matrix, xy))
    spot_geom = _polygons(spots)
    spot_ids = spots.index.astype(str).to_numpy()
    tree = shapely.STRtree(spot_geom)
    parts = []
    for start in range(0, len(cells), _OVERLAP_CHUNK):
        chunk = cells[start : start + _OVERLAP_CHUNK]
        ci, si = tree.query(chunk, predicate="intersects")
        area = shapely.area(shapely.intersection(chunk[ci], spot_geom[si]))
        whole = shapely.area(chunk[ci])
        weight = np.divide(area, whole, out=np.zeros_like(area), where=whole > 0)
        keep = weight > 1e-6
        parts.append(pd.DataFrame({"cell": ci[keep] + start, "spot_id": spot_ids[si[keep]], "weight": weight[keep]}))
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"cell": [], "spot_id": [], "weight": []})
    return out.sort_values(["cell", "spot_id"], kind="stable").reset_index(drop=True)


def _overlaps_table(pairs: pd.DataFrame, cell_ids: np.ndarray, *, expand_um: float, spots_key: str):
    import anndata as ad
    from spatialdata.models import TableModel

    obs = pd.DataFrame(
        {
            Col.CELL_ID: cell_ids[pairs["cell"].to_numpy()],
            Col.SPOT_ID: pairs["spot_id"].to_numpy(),
            "weight": pairs["weight"].to_numpy(dtype=np.float32),
        },
        index=pd.RangeIndex(len(pairs)).astype(str),
    )
    table = ad.AnnData(obs=obs)
    table.uns[Attr.ROOT] = {"rule": "overlap", "expand_um": float(expand_um), "spots_key": spots_key}
    return TableModel.parse(table)


def assign_cells(
    sdata: SpatialData,
    shapes_key: str = Key.NUCLEI,
    spots_key: str | None = Key.SPOTS,
    *,
    spot_table_key: str | None = Key.SPOTS_COUNTS,
    rule: str = "centroid",
    expand_um: float = 0.0,
    overwrite: bool = False,
) -> None:
    """Assign each nucleus to the spot that contains its centroid, or to every spot that its outline overlaps.

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
    rule
        ``"centroid"`` (sCellST): a nucleus belongs to the spot that holds its centroid; a spot's expression is the
        mean of its cells. ``"overlap"``: a cell belongs to every spot it overlaps, weighted by the fraction of its
        outline inside the spot (written to ``tables[f"{shapes_key}_overlaps"]``), and training fits each spot with
        the weighted mean of its cells. Made for bins smaller than cells (Visium HD), where most nuclei straddle
        bins; ``spot_id`` then holds the spot with the largest share of the cell.
    expand_um
        With ``rule="overlap"``: grow the nucleus outlines by this many microns to approximate the whole cell,
        whose transcripts are captured (e.g. 2-4 um, as Space Ranger 4 expands nuclei).
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
    if rule not in ASSIGN_RULES:
        raise ValueError(f"`rule` must be one of {ASSIGN_RULES}, got {rule!r}.")
    if expand_um < 0 or (expand_um > 0 and rule != "overlap"):
        raise ValueError("`expand_um` must be >= 0, and is used only with `rule='overlap'`.")
    o_key = overlaps_key(shapes_key)
    if o_key in sdata.tables and not overwrite:
        raise ValueError(f"The overlaps of {shapes_key!r} are already in tables[{o_key!r}]; pass `overwrite=True`.")
    matrix = intrinsic_to_intrinsic(sdata, shapes_key, spots_key)
    nuclei = sdata.shapes[shapes_key]
    if rule == "centroid":
        spot_of = spot_membership(sdata, shapes_key, spots_key)
        if o_key in sdata.tables:
            _drop_element(sdata, o_key)
    else:
        pairs = spot_overlaps(sdata, shapes_key, spots_key, expand_um=expand_um)
        main = pairs.sort_values(["cell", "weight"], ascending=[True, False], kind="stable").drop_duplicates("cell")
        spot_of = np.full(len(nuclei), None, dtype=object)
        spot_of[main["cell"].to_numpy()] = main["spot_id"].to_numpy()
        table = _overlaps_table(pairs, nuclei.index.astype(str).to_numpy(), expand_um=expand_um, spots_key=spots_key)
        write_element(sdata, o_key, table, overwrite=True, what=f"{len(pairs):,} cell-spot overlaps")
    nuclei[Col.SPOT_ID] = pd.Series(spot_of, index=nuclei.index, dtype="object")
    persist(sdata, shapes_key)

    by_id = pd.Series(spot_of, index=nuclei.index.astype(str))
    for name, table in list(sdata.tables.items()):  # persist() re-inserts a rewritten table
        attrs = table.uns.get("spatialdata_attrs", {})
        regions = attrs.get("region", [])
        regions = [regions] if isinstance(regions, str) else list(regions)
        if shapes_key in regions:
            table.obs[Col.SPOT_ID] = pd.Categorical(by_id.reindex(instance_ids(table)).to_numpy())
            persist(sdata, name)

    n_in = int(pd.notna(spot_of).sum())
    if rule == "overlap":
        counts = pairs["spot_id"].value_counts()  # cells overlapping each spot
    else:
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


def _drop_element(sdata: SpatialData, key: str) -> None:
    """Remove an element made by scellst (in memory, and on disk for a backed object)."""
    if sdata.is_backed() and key in {p.split("/")[-1] for p in sdata.elements_paths_on_disk()}:
        sdata.delete_element_from_disk(key)
    del sdata[key]
