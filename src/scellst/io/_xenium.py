"""10x Xenium output (cells, nucleus boundaries, counts) with an H&E image registered to it, in one SpatialData."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import Attr, Col, Key
from .._logging import logger
from .._utils import record_attr, set_microns_per_pixel

if TYPE_CHECKING:
    from spatialdata import SpatialData

XENIUM_CELLS = Key.XENIUM_CELLS
XENIUM_NUCLEI = Key.XENIUM_NUCLEI
XENIUM_TABLE = Key.XENIUM_TABLE
_CONTROL_PREFIXES = ("NegControl", "BLANK", "Unassigned", "antisense", "DeprecatedCodeword", "Intergenic")


def _first(folder: Path, stem: str) -> Path | None:
    for suffix in (".parquet", ".csv.gz", ".csv"):
        p = folder / f"{stem}{suffix}"
        if p.exists():
            return p
    return None


def _read_df(path: Path) -> pd.DataFrame:
    df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    df = df.drop(columns=[c for c in df.columns if c.startswith("Unnamed") or c == ""], errors="ignore")
    if "cell_id" in df and df["cell_id"].dtype == object:
        df["cell_id"] = df["cell_id"].map(lambda v: v.decode() if isinstance(v, bytes) else v)
    df["cell_id"] = df["cell_id"].astype(str)
    return df


def _polygons(df: pd.DataFrame) -> pd.Series:
    from shapely.geometry import Polygon

    out = {}
    for cid, g in df.groupby("cell_id", sort=False):
        xy = g[["vertex_x", "vertex_y"]].to_numpy(dtype=float)
        if len(xy) >= 3:
            poly = Polygon(xy)
            out[cid] = poly if poly.is_valid else poly.buffer(0)
    return pd.Series(out, dtype=object)


def read_alignment(alignment: Any) -> np.ndarray:
    """A 3x3 H&E-pixel -> Xenium-pixel matrix from an array or a 10x ``*_imagealignment.csv`` file."""
    if isinstance(alignment, str | Path):
        p = Path(alignment)
        if not p.exists():
            raise FileNotFoundError(f"Alignment file {str(p)!r} does not exist.")
        m = np.loadtxt(p, delimiter=",")
    else:
        m = np.asarray(alignment, dtype=float)
    if m.shape == (2, 3):
        m = np.vstack([m, [0, 0, 1]])
    if m.shape != (3, 3) or not np.isfinite(m).all() or abs(np.linalg.det(m[:2, :2])) < 1e-12:
        raise ValueError(f"The alignment must be an invertible 3x3 (or 2x3) affine matrix, got shape {m.shape}.")
    return m


def xenium(
    path: str | Path,
    *,
    he_image: Any = None,
    alignment: Any = None,
    pixel_size: float | None = None,
    image_key: str = Key.IMAGE,
    cells_key: str = XENIUM_CELLS,
    nuclei_key: str = XENIUM_NUCLEI,
    table_key: str = XENIUM_TABLE,
) -> SpatialData:
    """Read a Xenium output folder and, optionally, the H&E of the same section registered to it.

    The cells (circles of the cell area at the centroids, or polygons), the nucleus boundaries and the cell x gene
    counts (controls removed) come from the 10x files: ``cell_feature_matrix.h5`` (or ``transcripts``), ``cells``,
    ``cell_boundaries`` and ``nucleus_boundaries`` (``.parquet``, ``.csv.gz`` or ``.csv``). Like spatialdata-io,
    the shapes keep micron coordinates and map to the ``global`` coordinate system of Xenium morphology pixels
    (``pixel_size`` um, from ``experiment.xenium``). The H&E is registered by the 10x alignment matrix (H&E pixels ->
    Xenium pixels), so H&E nuclei and Xenium cells share ``global``, and its microns per pixel are derived.

    Parameters
    ----------
    path
        The Xenium output folder.
    he_image
        H&E image (path, array or DataArray) of the same section, or ``None``.
    alignment
        3x3 matrix or the 10x ``*_he_imagealignment.csv`` mapping H&E pixels to Xenium pixels; required with
        ``he_image`` (use ``np.eye(3)`` when the H&E is already on the Xenium pixel grid).
    pixel_size
        Xenium pixel size in microns (default: from ``experiment.xenium``, else 0.2125).
    image_key, cells_key, nuclei_key, table_key
        Names of the elements written.

    Returns
    -------
    A SpatialData with ``shapes[cells_key]``, ``shapes[nuclei_key]`` (when boundaries exist), ``tables[table_key]``
    (cells x genes, raw counts, annotating ``cells_key``; ``obsm['spatial']`` centroids in microns) and
    ``images[image_key]`` when an H&E is given.
    """
    import anndata as ad
    import geopandas as gpd
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Affine, Scale

    from ._readers import _parse_image

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"Xenium folder {str(folder)!r} does not exist.")
    spec_file = folder / "experiment.xenium"
    if pixel_size is None:
        pixel_size = (
            float(json.loads(spec_file.read_text()).get("pixel_size", 0.2125)) if spec_file.exists() else 0.2125
        )
    to_global = {"global": Scale([1.0 / pixel_size, 1.0 / pixel_size], axes=("x", "y"))}

    # counts
    h5 = folder / "cell_feature_matrix.h5"
    tx_file = _first(folder, "transcripts")
    if h5.exists():
        counts = _read_10x_h5(h5)
    elif tx_file is not None:
        counts = _counts_from_transcripts(_read_df(tx_file))
    else:
        raise FileNotFoundError(
            f"{str(folder)!r} has neither cell_feature_matrix.h5 nor a transcripts file; is it a Xenium output folder?"
        )
    keep = ~counts.var_names.str.startswith(_CONTROL_PREFIXES)
    counts = counts[:, keep].copy()
    counts.var_names_make_unique()

    # positions
    cells_file = _first(folder, "cells")
    nuc_file = _first(folder, "nucleus_boundaries")
    cell_b_file = _first(folder, "cell_boundaries")
    nuclei = _polygons(_read_df(nuc_file)) if nuc_file is not None else pd.Series(dtype=object)
    cell_polys = _polygons(_read_df(cell_b_file)) if cell_b_file is not None else pd.Series(dtype=object)
    if cells_file is not None:
        meta = _read_df(cells_file).set_index("cell_id")
        centroids = meta[["x_centroid", "y_centroid"]]
        area = meta["cell_area"] if "cell_area" in meta else None
    else:
        source = cell_polys if len(cell_polys) else nuclei
        if not len(source):
            raise FileNotFoundError(f"{str(folder)!r} has no cells file and no boundaries: cell positions unknown.")
        centroids = pd.DataFrame(
            {"x_centroid": [g.centroid.x for g in source], "y_centroid": [g.centroid.y for g in source]},
            index=source.index,
        )
        area = pd.Series([g.area for g in source], index=source.index)
    ids = counts.obs_names.intersection(centroids.index)
    if len(ids) == 0:
        raise ValueError("No cell id is shared by the count matrix and the cell positions.")
    if len(ids) < counts.n_obs:
        logger.warning(f"{counts.n_obs - len(ids):,} cells have counts but no position; they are left out.")
    counts = counts[ids].copy()
    xy = centroids.loc[ids].to_numpy(dtype=float)
    radius = np.sqrt(area.loc[ids].to_numpy(dtype=float) / np.pi) if area is not None else np.full(len(ids), 5.0)

    from shapely.geometry import Point

    cells_gdf = gpd.GeoDataFrame(
        {Col.RADIUS: radius}, geometry=[Point(x, y) for x, y in xy], index=pd.Index(ids.astype(str), name="cell_id")
    )
    shapes = {cells_key: ShapesModel.parse(cells_gdf, transformations=to_global)}
    if len(nuclei):
        ngdf = gpd.GeoDataFrame(geometry=list(nuclei.to_numpy()), index=pd.Index(nuclei.index, name="cell_id"))
        shapes[nuclei_key] = ShapesModel.parse(ngdf, transformations=to_global)
    counts.obs = pd.DataFrame(
        {"cell_id": pd.Categorical(ids.astype(str)), Col.REGION: pd.Categorical([cells_key] * len(ids))},
        index=ids.astype(str),
    )
    counts.obsm["spatial"] = xy
    counts.uns[Attr.ROOT] = {"source": str(folder), "pixel_size_um": pixel_size, "units": "microns"}
    table = TableModel.parse(
        ad.AnnData(
            X=counts.X,
            obs=counts.obs,
            var=pd.DataFrame(index=counts.var_names),
            obsm=dict(counts.obsm),
            uns=dict(counts.uns),
        ),
        region=cells_key,
        region_key=Col.REGION,
        instance_key="cell_id",
    )
    images = {}
    he_mpp = None
    if he_image is not None:
        if alignment is None:
            raise ValueError(
                "An H&E image needs `alignment`: the 10x `*_he_imagealignment.csv` (H&E pixels -> Xenium pixels) or a "
                "3x3 matrix; pass `np.eye(3)` if the H&E is already on the Xenium pixel grid."
            )
        m = read_alignment(alignment)
        he_mpp = pixel_size * float(np.sqrt(abs(np.linalg.det(m[:2, :2]))))
        img = _parse_image(he_image, microns_per_pixel=he_mpp, chunks=1024)
        from spatialdata.transformations import set_transformation

        set_transformation(img, Affine(m, input_axes=("x", "y"), output_axes=("x", "y")), to_coordinate_system="global")
        images[image_key] = img
    sdata = SpatialData(images=images, shapes=shapes, tables={table_key: table})
    record_attr(sdata, Attr.XENIUM, "pixel_size_um", float(pixel_size))  # read_nuclei(format="xenium") follows it
    if he_mpp is not None:
        set_microns_per_pixel(sdata, image_key, microns_per_pixel=he_mpp)
    logger.info(
        f"Read Xenium {folder.name}: {table.n_obs:,} cells x {table.n_vars} genes, {len(nuclei):,} nucleus outlines"
        + (f", H&E at {he_mpp:.3f} um/px" if he_mpp else "")
    )
    return sdata


def _counts_from_transcripts(tx: pd.DataFrame):
    """Cell x gene counts from a transcripts table (assigned, quality-passing molecules)."""
    import anndata as ad
    import scipy.sparse as sp

    tx = tx[~tx["cell_id"].isin(["UNASSIGNED", "-1", "0"])]
    if "qv" in tx:
        tx = tx[tx["qv"] >= 20]
    cells = pd.Index(sorted(tx["cell_id"].unique()))
    genes = pd.Index(sorted(tx["feature_name"].astype(str).unique()))
    rows = cells.get_indexer(tx["cell_id"])
    cols = genes.get_indexer(tx["feature_name"].astype(str))
    x = sp.csr_matrix((np.ones(len(tx), dtype=np.float32), (rows, cols)), shape=(len(cells), len(genes)))
    x.sum_duplicates()
    return ad.AnnData(X=x, obs=pd.DataFrame(index=cells.astype(str)), var=pd.DataFrame(index=genes))


def _read_10x_h5(path: Path):
    """A 10x HDF5 feature-barcode matrix (gene expression features only) as cells x genes."""
    import anndata as ad
    import h5py
    import scipy.sparse as sp

    def text(values) -> np.ndarray:
        return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values])

    with h5py.File(path, "r") as f:
        if "matrix" not in f:
            raise ValueError(f"{str(path)!r} is not a 10x feature-barcode matrix (no 'matrix' group).")
        m = f["matrix"]
        shape = tuple(int(v) for v in m["shape"][()])  # some writers store the shape as floats
        x = sp.csc_matrix((m["data"][()], m["indices"][()], m["indptr"][()]), shape=shape).T.tocsr()
        names = text(m["features"]["name"][()])
        types = text(m["features"]["feature_type"][()]) if "feature_type" in m["features"] else None
        barcodes = text(m["barcodes"][()])
    keep = np.ones(len(names), dtype=bool) if types is None else (types == "Gene Expression")
    var = pd.DataFrame(index=pd.Index(names[keep]))
    return ad.AnnData(X=x[:, keep].astype(np.float32), obs=pd.DataFrame(index=pd.Index(barcodes)), var=var)


def tissue_fraction(sdata: SpatialData, image_key: str, rows: np.ndarray, cols: np.ndarray) -> float:
    """Fraction of positions (level-0 pixels) that fall on stained tissue rather than glass, from a coarse level."""
    from .._utils import to_rgb_uint8
    from ..im._segment import _pyramid

    levels = _pyramid(sdata, image_key)
    arr, factor = levels[-1]
    rgb = to_rgb_uint8(np.asarray(arr.data.compute() if hasattr(arr.data, "compute") else arr.data))
    tissue = rgb.astype(float).mean(axis=-1) < 215
    r = np.clip((np.asarray(rows) / factor).astype(int), 0, tissue.shape[0] - 1)
    c = np.clip((np.asarray(cols) / factor).astype(int), 0, tissue.shape[1] - 1)
    inside = (rows >= 0) & (cols >= 0) & (rows < tissue.shape[0] * factor) & (cols < tissue.shape[1] * factor)
    return float((tissue[r, c] & inside).mean()) if len(r) else 0.0


def add_cells(
    sdata: SpatialData,
    cells: Any,
    *,
    row_key: str,
    col_key: str,
    image_key: str | None = None,
    radius_um: float = 5.0,
    key_added: str = "cells",
    table_key: str | None = None,
    overwrite: bool = False,
) -> None:
    """Add single cells given by pixel positions on an H&E image (e.g. HEST or DeepSpot exports) as shapes + table.

    Naming the **row** and **column** columns explicitly avoids the most common mistake with such files: ``x``/``y``
    columns that are really row/column (or the reverse). After placing the cells, the fraction that falls on
    stained tissue is checked, and a warning suggests swapping ``row_key`` and ``col_key`` when it is low.

    Parameters
    ----------
    sdata
        The SpatialData with the image.
    cells
        Cells x genes AnnData (raw counts) with the pixel positions in ``obs``.
    row_key, col_key
        ``obs`` columns with the row (vertical) and column (horizontal) of each cell, in level-0 pixels of the image.
    image_key
        The image; ``None`` for the only image.
    radius_um
        Radius of the circles drawn for the cells, in microns.
    key_added
        Name of the cell shapes.
    table_key
        Name of the table (default ``f"{key_added}_table"``).
    overwrite
        Replace existing elements with these names.

    Returns
    -------
    Nothing; adds ``shapes[key_added]`` (circles in the image's pixel frame, with its transformations) and
    ``tables[table_key]`` annotating them (``obsm['spatial']``: centroids as (x, y) pixels).
    """
    import anndata as ad
    import geopandas as gpd
    from shapely.geometry import Point
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import get_transformation

    from .._utils import check_writable, get_key, get_microns_per_pixel, write_element

    image_key = get_key(sdata, "images", image_key, what="H&E image")
    table_key = table_key or f"{key_added}_table"
    for key in (key_added, table_key):
        check_writable(sdata, key, overwrite=overwrite)
    for col in (row_key, col_key):
        if col not in cells.obs:
            raise KeyError(f"`cells.obs` has no column {col!r}; columns: {list(cells.obs.columns)}.")
    rows = pd.to_numeric(cells.obs[row_key]).to_numpy(dtype=float)
    cols = pd.to_numeric(cells.obs[col_key]).to_numpy(dtype=float)
    if not (np.isfinite(rows).all() and np.isfinite(cols).all()):
        raise ValueError(f"`{row_key}`/`{col_key}` contain NaN or infinite positions.")
    frac = tissue_fraction(sdata, image_key, rows, cols)
    swapped = tissue_fraction(sdata, image_key, cols, rows)
    if frac < 0.8 and swapped > frac + 0.15:
        logger.warning(
            f"Only {frac:.0%} of the cells fall on tissue, {swapped:.0%} with rows and columns swapped: "
            f"`row_key={row_key!r}` and `col_key={col_key!r}` are probably the other way round."
        )
    mpp = get_microns_per_pixel(sdata, image_key)
    ids = cells.obs_names.astype(str)
    gdf = gpd.GeoDataFrame(
        {"radius": np.full(len(ids), radius_um / mpp)},
        geometry=[Point(c, r) for r, c in zip(rows, cols, strict=True)],
        index=pd.Index(ids, name="cell_id"),
    )
    shapes = ShapesModel.parse(gdf, transformations=get_transformation(sdata.images[image_key], get_all=True))
    obs = pd.DataFrame({"cell_id": pd.Categorical(ids), Col.REGION: pd.Categorical([key_added] * len(ids))}, index=ids)
    table = ad.AnnData(X=cells.X, obs=obs, var=pd.DataFrame(index=cells.var_names.astype(str)))
    table.obsm["spatial"] = np.column_stack([cols, rows])
    table.uns[Attr.ROOT] = {"on_tissue_fraction": frac, "image_key": image_key}
    table = TableModel.parse(table, region=key_added, region_key=Col.REGION, instance_key="cell_id")
    write_element(sdata, key_added, shapes, overwrite=overwrite, what=f"{len(ids):,} cells ({frac:.0%} on tissue)")
    write_element(sdata, table_key, table, overwrite=overwrite, what=f"{table.n_obs:,} cells x {table.n_vars} genes")
