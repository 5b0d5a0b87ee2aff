"""Readers that bring H&E images and spot transcriptomics into scellst's SpatialData layout."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import VISIUM_SPOT_DIAMETER_UM, Attr, Col, Key
from .._logging import logger
from .._utils import set_microns_per_pixel

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


_TIFF_SUFFIXES = {".tif", ".tiff", ".svs", ".btf", ".ndpi", ".scn"}


def _default_scale_factors(height: int, width: int, smallest: int = 1024) -> list[int]:
    factors = []
    size = max(height, width)
    while size > smallest and len(factors) < 6:
        factors.append(2)
        size //= 2
    return factors


def _load_image_array(image: Any) -> Any:
    """Return a ``(c, y, x)`` array (numpy or dask) from a path, an array or a DataArray."""
    import dask.array as da
    import xarray as xr

    if isinstance(image, str | Path):
        path = Path(image)
        if not path.exists():
            raise FileNotFoundError(f"Image file {str(path)!r} does not exist.")
        if path.suffix.lower() in _TIFF_SUFFIXES:
            import tifffile
            import zarr

            store = tifffile.imread(path, aszarr=True, level=0)
            arr = da.from_zarr(zarr.open(store, mode="r"))
        else:
            from PIL import Image

            previous = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None  # H&E scans are legitimately large
            try:
                with Image.open(path) as im:
                    arr = np.asarray(im.convert("RGB"))
            finally:
                Image.MAX_IMAGE_PIXELS = previous
        image = arr
    if isinstance(image, xr.DataTree):  # a multiscale image element (e.g. of a re-opened zarr store): its level 0
        if not image.children:
            raise ValueError("The multiscale image has no levels.")
        level = image[sorted(image.children)[0]]
        image = next(iter(level.ds.data_vars.values()))
    if isinstance(image, xr.DataArray):
        if tuple(image.dims) == ("c", "y", "x"):
            return image.data
        if tuple(image.dims) == ("y", "x", "c"):
            return image.transpose("c", "y", "x").data
        raise ValueError(f"Unsupported image dims {image.dims}; expected ('c', 'y', 'x') or ('y', 'x', 'c').")
    if not hasattr(image, "ndim"):
        raise TypeError(
            "`image` must be a path, a numpy/dask array, an xarray.DataArray or a multiscale image element "
            f"(xarray.DataTree), got {type(image)}."
        )
    if image.ndim == 2:
        image = image[None]
    elif image.ndim == 3 and image.shape[-1] in (3, 4) and image.shape[0] not in (3, 4):
        image = image.transpose(2, 0, 1)
    elif image.ndim != 3:
        raise ValueError(f"`image` must be 2D or 3D (y, x, c) / (c, y, x), got shape {image.shape}.")
    if image.shape[0] == 4:
        image = image[:3]
    return image


def file_microns_per_pixel(path: str | Path) -> float | None:
    """The microns per pixel stated in a slide file's own metadata, or ``None`` when it states none.

    Reads (without decoding any pixel) the ``MPP`` of an Aperio SVS description, the ``PhysicalSizeX`` of an
    OME-TIFF, or the TIFF resolution tags when their unit is centimetres or inches (NDPI, pyramidal TIFF). Values
    outside 0.05-20 um/px (e.g. the 72 dpi default of image editors) are ignored.
    """
    path = Path(path)
    if path.suffix.lower() not in _TIFF_SUFFIXES:
        return None
    import re

    import tifffile

    def plausible(value: float | None) -> float | None:
        return float(value) if value is not None and np.isfinite(value) and 0.05 <= value <= 20 else None

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        description = page.description or ""
        match = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", description)
        if tif.is_svs and match:
            return plausible(float(match.group(1)))
        if tif.is_ome and tif.ome_metadata:
            size = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
            unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
            factor = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4}.get(unit.group(1) if unit else "µm")
            if size and factor is not None:
                return plausible(float(size.group(1)) * factor)
        tags = page.tags
        if "XResolution" in tags and "ResolutionUnit" in tags:
            num, den = tags["XResolution"].value
            unit = int(tags["ResolutionUnit"].value)
            per_unit = {2: 25400.0, 3: 10000.0}.get(unit)  # microns per inch / per centimetre
            if per_unit is not None and num > 0 and den > 0:
                return plausible(per_unit / (num / den))
    return None


def _parse_image(image: Any, *, microns_per_pixel: float, chunks: int) -> Any:
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    arr = _load_image_array(image)
    _, h, w = arr.shape
    scale = Scale([microns_per_pixel, microns_per_pixel], axes=("y", "x"))
    return Image2DModel.parse(
        arr,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"][: arr.shape[0]] if arr.shape[0] <= 3 else None,
        scale_factors=_default_scale_factors(h, w) or None,
        chunks=(arr.shape[0], chunks, chunks),
        transformations={"global": scale},
    )


def _counts_to_anndata(counts: Any, n_spots: int, gene_names: Sequence[str] | None, spot_ids: np.ndarray) -> AnnData:
    import scipy.sparse as sp
    from anndata import AnnData

    if isinstance(counts, AnnData):
        adata = counts.copy()
    elif isinstance(counts, pd.DataFrame):
        adata = AnnData(X=counts.to_numpy(), var=pd.DataFrame(index=counts.columns.astype(str)))
    else:
        x = counts if sp.issparse(counts) else np.asarray(counts)
        if gene_names is None:
            raise ValueError("`gene_names` is required when `counts` is an array; pass one name per column.")
        if len(gene_names) != x.shape[1]:
            raise ValueError(f"`gene_names` has {len(gene_names)} entries but `counts` has {x.shape[1]} columns.")
        adata = AnnData(X=x, var=pd.DataFrame(index=pd.Index(gene_names, dtype=str)))
    if adata.n_obs != n_spots:
        raise ValueError(f"`counts` has {adata.n_obs} rows but {n_spots} spots were given; they must match 1:1.")
    x = adata.X
    values = x.data if sp.issparse(x) else np.asarray(x)
    if not np.issubdtype(values.dtype, np.number):
        raise TypeError("`counts` must be numeric.")
    if np.isnan(values).any():
        raise ValueError(
            "`counts` contains NaN values. Spot transcriptomics counts are non-negative integers; fill or drop the "
            "affected spots/genes before building the SpatialData object."
        )
    if (values < 0).any():
        raise ValueError("`counts` contains negative values; pass raw (non-negative) UMI counts, not scaled data.")
    if not np.allclose(values, np.round(values)):
        logger.warning("`counts` are not integers; scellst expects raw UMI counts (normalisation is done internally).")
    adata.X = sp.csr_matrix(x, dtype=np.float32)
    adata.var_names_make_unique()
    adata.obs_names = pd.Index(spot_ids, dtype=str)
    return adata


def _own_ids(index: pd.Index) -> np.ndarray | None:
    """Spot ids carried by an index, or ``None`` for a default ``0..n-1`` index (positions, not ids)."""
    ids = np.asarray(index).astype(str)
    if isinstance(index, pd.RangeIndex) or np.array_equal(ids, np.arange(len(ids)).astype(str)):
        return None
    return ids


def _counts_in_order(counts: Any, counts_ids: np.ndarray, spot_ids: np.ndarray) -> Any:
    """``counts`` reordered to ``spot_ids``; a clear error when the two sets of ids differ."""
    if len(set(counts_ids)) != len(counts_ids):
        raise ValueError("The spot ids of `counts` are not unique.")
    missing = [i for i in spot_ids if i not in set(counts_ids)]
    extra = sorted(set(counts_ids) - set(spot_ids))
    if missing or extra:
        raise ValueError(
            f"The spot ids of `spot_xy`/`spot_ids` and of `counts` differ: {len(missing)} spot(s) without counts "
            f"(e.g. {missing[:3]}) and {len(extra)} count row(s) without a position (e.g. {extra[:3]}). Counts are "
            "matched to spots by id; subset both to the same spots (or pass positions and counts without ids to "
            "match them by order)."
        )
    if np.array_equal(counts_ids, spot_ids):
        return counts
    order = pd.Index(counts_ids).get_indexer(spot_ids)
    return counts[order].copy() if hasattr(counts, "obs_names") else counts.iloc[order]


def from_spots(
    image: Any,
    *,
    spot_xy: np.ndarray | pd.DataFrame,
    spot_diameter_um: float,
    counts: Any,
    microns_per_pixel: float,
    gene_names: Sequence[str] | None = None,
    spot_ids: Sequence[str] | None = None,
    image_key: str = Key.IMAGE,
    spots_key: str = Key.SPOTS,
    table_key: str = Key.SPOTS_COUNTS,
    chunks: int = 1024,
) -> SpatialData:
    """Build a scellst SpatialData from any spot platform (original ST, Visium exported elsewhere, ...).

    Parameters
    ----------
    image
        H&E image: a path (TIFF read lazily, JPEG/PNG in memory), a ``(y, x, 3)`` or ``(3, y, x)`` numpy/dask
        array, or an :class:`xarray.DataArray`.
    spot_xy
        ``(n_spots, 2)`` spot centres ``(x, y)`` in full-resolution pixels of ``image`` (a DataFrame with columns
        ``x`` and ``y`` is also accepted; its index gives the spot ids).
    spot_diameter_um
        Spot diameter in microns (55 for Visium, 100 for original ST).
    counts
        Raw counts, spots x genes: an AnnData, a DataFrame (columns are genes), or an array with ``gene_names``.
    microns_per_pixel
        Size of one full-resolution pixel in microns.
    gene_names
        Gene names when ``counts`` is an array.
    spot_ids
        Spot identifiers (default: the index of a ``spot_xy`` DataFrame, else the ids of ``counts``, else
        ``0..n-1``). When both the positions and ``counts`` (AnnData obs names or DataFrame index) carry ids, counts
        are matched to spots **by id** (reordered as needed) and mismatched ids raise; without ids they are matched
        by order.
    image_key, spots_key, table_key
        Names of the image, the spot circles and the spot count table.
    chunks
        Chunk size (pixels) of the image pyramid.

    Returns
    -------
    A SpatialData with ``images[image_key]`` (a pyramid registered in ``global`` in microns),
    ``shapes[spots_key]`` (circles with a ``radius`` column, in pixels) and ``tables[table_key]`` (raw counts
    annotating the circles by ``spot_id``). The microns per pixel are recorded in ``sdata.attrs['scellst']``.
    """
    import geopandas as gpd
    from anndata import AnnData
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Scale

    mpp = float(microns_per_pixel)
    if not np.isfinite(mpp) or mpp <= 0:
        raise ValueError(f"`microns_per_pixel` must be positive, got {microns_per_pixel!r}.")
    if not np.isfinite(spot_diameter_um) or spot_diameter_um <= 0:
        raise ValueError(f"`spot_diameter_um` must be positive, got {spot_diameter_um!r}.")

    if isinstance(spot_xy, pd.DataFrame):
        missing = {"x", "y"} - set(spot_xy.columns)
        if missing:
            raise KeyError(f"`spot_xy` DataFrame needs columns 'x' and 'y'; missing {sorted(missing)}.")
        xy_ids = _own_ids(spot_xy.index)
        xy = spot_xy[["x", "y"]].to_numpy(dtype=float)
    else:
        xy = np.asarray(spot_xy, dtype=float)
        xy_ids = None
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"`spot_xy` must have shape (n_spots, 2) with columns (x, y), got {xy.shape}.")
    if xy.shape[0] == 0:
        raise ValueError("`spot_xy` holds no spot: pass one (x, y) centre per spot of `counts`.")
    if not np.isfinite(xy).all():
        raise ValueError("`spot_xy` contains NaN or infinite coordinates.")
    n = xy.shape[0]
    if spot_ids is not None:
        xy_ids = np.asarray(spot_ids).astype(str)
        if len(xy_ids) != n:
            raise ValueError(f"{len(xy_ids)} `spot_ids` for {n} spot positions; they must match 1:1.")
    counts_ids = None
    if isinstance(counts, AnnData):
        counts_ids = _own_ids(counts.obs_names)
    elif isinstance(counts, pd.DataFrame):
        counts_ids = _own_ids(counts.index)
    if xy_ids is not None and len(set(xy_ids)) != n:
        raise ValueError("Spot ids must be unique.")
    if xy_ids is not None and counts_ids is not None:
        counts = _counts_in_order(counts, counts_ids, xy_ids)  # matched by id, never by position
    ids = xy_ids if xy_ids is not None else counts_ids if counts_ids is not None else np.arange(n).astype(str)
    if len(ids) != n:
        raise ValueError(f"{len(ids)} spot ids (from `counts`) for {n} spot positions; they must match 1:1.")
    if len(set(ids)) != n:
        raise ValueError("Spot ids must be unique.")

    image_el = _parse_image(image, microns_per_pixel=mpp, chunks=chunks)
    _, h, w = image_el["scale0"].image.shape if hasattr(image_el, "children") else image_el.shape
    outside = (xy[:, 0] < 0) | (xy[:, 0] >= w) | (xy[:, 1] < 0) | (xy[:, 1] >= h)
    if outside.all():
        raise ValueError(
            f"No spot centre lies inside the image ({w} x {h} px). `spot_xy` must be (x, y) in full-resolution "
            "pixels of this image; check for swapped axes or a scale factor (hires/lowres coordinates)."
        )
    if outside.any():
        logger.warning(f"{int(outside.sum())} of {n} spot centres lie outside the image.")

    radius_px = spot_diameter_um / 2.0 / mpp
    scale = Scale([mpp, mpp], axes=("y", "x"))
    gdf = gpd.GeoDataFrame(
        {Col.RADIUS: np.full(n, radius_px)},
        geometry=gpd.points_from_xy(xy[:, 0], xy[:, 1]),
        index=pd.Index(ids, name=Col.SPOT_ID),
    )
    shapes = ShapesModel.parse(gdf, transformations={"global": scale})

    adata = _counts_to_anndata(counts, n, gene_names, ids)
    adata.obs[Col.REGION] = pd.Categorical([spots_key] * n)
    adata.obs[Col.SPOT_ID] = ids
    adata.obsm["spatial"] = xy
    adata.uns[Attr.ROOT] = {"spot_diameter_um": float(spot_diameter_um)}
    table = TableModel.parse(adata, region=spots_key, region_key=Col.REGION, instance_key=Col.SPOT_ID)

    sdata = SpatialData(images={image_key: image_el}, shapes={spots_key: shapes}, tables={table_key: table})
    set_microns_per_pixel(sdata, image_key, microns_per_pixel=mpp)
    logger.info(
        f"Built SpatialData: image {w:,} x {h:,} px at {mpp:.3f} um/px, {n:,} spots of {spot_diameter_um:g} um, "
        f"{adata.n_vars:,} genes"
    )
    return sdata


def from_image(
    image: Any,
    *,
    microns_per_pixel: float | None = None,
    image_key: str = Key.IMAGE,
    chunks: int = 1024,
) -> SpatialData:
    """Build an H&E-only SpatialData, for applying a trained model to new slides.

    Parameters
    ----------
    image
        H&E image: a path (SVS, NDPI, pyramidal/OME-TIFF read lazily from the file's full-resolution level; JPEG/PNG
        in memory), a numpy/dask array (``(y, x, 3)`` or ``(3, y, x)``), an :class:`xarray.DataArray`, or an image
        element of another SpatialData (single- or multiscale, e.g. ``sdata.images["he"]`` of a re-opened store).
    microns_per_pixel
        Size of one full-resolution pixel in microns. ``None`` reads it from the file's metadata (Aperio ``MPP``,
        OME ``PhysicalSizeX``, TIFF resolution tags) and raises when the file states none.
    image_key
        Name of the image element.
    chunks
        Chunk size (pixels) of the image pyramid.

    Returns
    -------
    A SpatialData with ``images[image_key]`` registered in ``global`` (microns); the microns per pixel are
    recorded in ``sdata.attrs['scellst']``.
    """
    from spatialdata import SpatialData

    if microns_per_pixel is None:
        microns_per_pixel = file_microns_per_pixel(image) if isinstance(image, str | Path) else None
        if microns_per_pixel is None:
            where = f"{str(image)!r} states no microns per pixel" if isinstance(image, str | Path) else "an array"
            raise ValueError(
                f"`microns_per_pixel` is needed: {where}. Pass the size of one full-resolution pixel in microns "
                "(about 0.25 at 40x, 0.5 at 20x)."
            )
        logger.info(f"Microns per pixel from the file's metadata: {microns_per_pixel:.4f}")
    mpp = float(microns_per_pixel)
    if not np.isfinite(mpp) or mpp <= 0:
        raise ValueError(f"`microns_per_pixel` must be positive, got {microns_per_pixel!r}.")
    sdata = SpatialData(images={image_key: _parse_image(image, microns_per_pixel=mpp, chunks=chunks)})
    set_microns_per_pixel(sdata, image_key, microns_per_pixel=mpp)
    return sdata


def visium(
    path: str | Path,
    *,
    fullres_image: str | Path | None = None,
    dataset_id: str | None = None,
    image_key: str = Key.IMAGE,
    spots_key: str = Key.SPOTS,
    table_key: str = Key.SPOTS_COUNTS,
    **kwargs: Any,
) -> SpatialData:
    """Read a 10x Visium Space Ranger folder through :func:`spatialdata_io.visium` into scellst's layout.

    Parameters
    ----------
    path
        The Space Ranger ``outs`` folder (with ``filtered_feature_bc_matrix.h5`` and ``spatial/``).
    fullres_image
        The full-resolution H&E used by Space Ranger. Strongly recommended: without it the ``hires`` image
        (about 2000 px, too coarse for nuclei) is used and a warning is logged.
    dataset_id
        Passed to spatialdata-io; it names the coordinate system (default: the folder name).
    image_key, spots_key, table_key
        Names given to the H&E image, the spot circles and the count table.
    kwargs
        Passed to :func:`spatialdata_io.visium`.

    Returns
    -------
    A SpatialData with ``images[image_key]``, ``shapes[spots_key]`` and ``tables[table_key]`` (raw counts). The
    microns per pixel of the image are derived from ``spot_diameter_fullres`` (a spot is 55 um) and recorded.
    """
    import spatialdata_io
    from spatialdata import SpatialData
    from spatialdata.models import TableModel

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Visium folder {str(path)!r} does not exist.")
    scalefactors_file = kwargs.get("scalefactors_file") or path / "spatial" / "scalefactors_json.json"
    if not Path(scalefactors_file).exists():
        raise FileNotFoundError(
            f"{str(scalefactors_file)!r} not found: it is needed to derive the microns per pixel. Pass "
            "`scalefactors_file=` if it lives elsewhere."
        )
    scalefactors = json.loads(Path(scalefactors_file).read_text())
    dataset_id = dataset_id or path.name
    raw = spatialdata_io.visium(path, dataset_id=dataset_id, fullres_image_file=fullres_image, **kwargs)

    d_full = float(scalefactors["spot_diameter_fullres"])
    images = dict(raw.images)
    full_key = next((k for k in images if k.endswith("_full_image")), None)
    hires_key = next((k for k in images if k.endswith("_hires_image")), None)
    lowres_key = next((k for k in images if k.endswith("_lowres_image")), None)
    if full_key is not None:
        main_key, mpp = full_key, VISIUM_SPOT_DIAMETER_UM / d_full
    elif hires_key is not None:
        main_key = hires_key
        mpp = VISIUM_SPOT_DIAMETER_UM / (d_full * float(scalefactors["tissue_hires_scalef"]))
        logger.warning(
            f"No full-resolution image given: using the hires image ({mpp:.2f} um/px). Nuclei are hard to segment "
            "at this resolution; pass `fullres_image=` for real work."
        )
    else:
        raise ValueError("The Visium folder has no image; pass `fullres_image=`.")
    new_images = {image_key: images[main_key]}
    for k, suffix in ((hires_key, "hires"), (lowres_key, "lowres")):
        if k is not None and k != main_key:
            new_images[f"{image_key}_{suffix}"] = images[k]

    if dataset_id not in raw.shapes:
        raise ValueError(f"spatialdata-io returned no spot shapes named {dataset_id!r}: {list(raw.shapes)}.")
    spots = raw.shapes[dataset_id]
    spots.index = spots.index.astype(str)
    spots.index.name = Col.SPOT_ID

    table = raw.tables["table"].copy()
    instance_key = table.uns["spatialdata_attrs"]["instance_key"]
    table.obs[Col.SPOT_ID] = table.obs[instance_key].astype(str).to_numpy()
    if instance_key != Col.SPOT_ID:
        del table.obs[instance_key]
    table.obs[Col.REGION] = pd.Categorical([spots_key] * table.n_obs)
    del table.uns["spatialdata_attrs"]
    table.uns[Attr.ROOT] = {"spot_diameter_um": VISIUM_SPOT_DIAMETER_UM, "dataset_id": dataset_id}
    table = TableModel.parse(table, region=spots_key, region_key=Col.REGION, instance_key=Col.SPOT_ID)

    sdata = SpatialData(images=new_images, shapes={spots_key: spots}, tables={table_key: table})
    set_microns_per_pixel(sdata, image_key, microns_per_pixel=mpp)
    logger.info(
        f"Read Visium {dataset_id!r}: {table.n_obs:,} spots x {table.n_vars:,} genes, image {main_key!r} -> "
        f"{image_key!r} at {mpp:.3f} um/px (coordinate system {dataset_id!r})"
    )
    return sdata


_IMAGE_SUFFIXES = _TIFF_SUFFIXES | {".jpg", ".jpeg", ".png"}


def is_zarr_store(path: str | Path) -> bool:
    """Whether ``path`` is a zarr store (a folder with ``zarr.json`` or ``.zgroup`` at its root)."""
    path = Path(path)
    return path.is_dir() and ((path / "zarr.json").exists() or (path / ".zgroup").exists())


def read(
    path: str | Path,
    *,
    fullres_image: str | Path | None = None,
    microns_per_pixel: float | None = None,
) -> SpatialData:
    """Open whatever slide a user has: a scellst/SpatialData zarr store, a Space Ranger folder, or an H&E image.

    Parameters
    ----------
    path
        A zarr store (opened lazily, never modified), a Visium Space Ranger ``outs`` folder (read by
        :func:`visium`; pass its full-resolution H&E as ``fullres_image``), a Visium HD ``outs`` folder (read by
        :func:`visium_hd`: 8 um bins become the spots), or an H&E image file (SVS, NDPI, TIFF, JPEG, PNG; read by
        :func:`from_image`, H&E-only).
    fullres_image
        The full-resolution H&E of a Space Ranger folder.
    microns_per_pixel
        For an image file: the size of one pixel in microns (default: from the file's metadata).

    Returns
    -------
    The SpatialData object.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist.")
    if is_zarr_store(path):
        import spatialdata as sd

        return sd.read_zarr(path)
    if path.is_dir():
        from ._visium_hd import is_visium_hd, visium_hd

        if is_visium_hd(path):
            return visium_hd(path, fullres_image=fullres_image)
        if (path / "spatial").is_dir() or any(path.glob("*feature_bc_matrix*")):
            return visium(path, fullres_image=fullres_image)
        raise ValueError(
            f"{str(path)!r} is a folder but neither a zarr store nor a Space Ranger folder (with `spatial/` and a "
            "feature-barcode matrix)."
        )
    if path.suffix.lower() in _IMAGE_SUFFIXES:
        return from_image(path, microns_per_pixel=microns_per_pixel)
    raise ValueError(
        f"Cannot read {str(path)!r}: pass a zarr store, a Space Ranger folder or an H&E image "
        f"({', '.join(sorted(_IMAGE_SUFFIXES))})."
    )
