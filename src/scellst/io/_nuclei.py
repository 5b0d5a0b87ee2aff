"""Import nucleus segmentations (QuPath/CellViT GeoJSON, GeoParquet, HoVer-Net JSON, Xenium boundaries, label images)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._constants import Attr, Col, Key
from .._logging import logger
from .._utils import (
    check_writable,
    get_key,
    get_microns_per_pixel,
    image_level0,
    record_attr,
    scellst_attrs,
    write_element,
)

if TYPE_CHECKING:
    from spatialdata import SpatialData

_CLASS_KEYS = ("classification", "class", "class_name", "type", "cell_type", "label")


def _open_text(path: Path) -> str:
    if path.suffix == ".gz":
        with gzip.open(path, "rt") as fh:
            return fh.read()
    return path.read_text()


def _repair(geom) -> Any:
    """A valid single polygon from a possibly broken (self-intersecting, multi-part) geometry, or ``None``."""
    from shapely import make_valid
    from shapely.geometry import MultiPolygon, Polygon

    if geom is None or geom.is_empty:
        return None
    if not geom.is_valid:
        geom = make_valid(geom)
    if isinstance(geom, Polygon):
        return geom if geom.area > 0 else None
    polys = [g for g in getattr(geom, "geoms", []) if isinstance(g, Polygon | MultiPolygon)]
    polys = [p for g in polys for p in (g.geoms if isinstance(g, MultiPolygon) else [g])]
    return max(polys, key=lambda p: p.area) if polys else None


def _repair_all(geoms: list) -> tuple[list, int]:
    """Every geometry as a valid polygon (or ``None``); the number of invalid ones repaired. Vectorised checks."""
    import shapely

    arr = np.empty(len(geoms), dtype=object)
    arr[:] = geoms
    missing = np.array([g is None for g in arr], dtype=bool)
    good = np.zeros(len(arr), dtype=bool)
    present = arr[~missing]
    if len(present):
        good[~missing] = (
            shapely.is_valid(present)
            & ~shapely.is_empty(present)
            & (shapely.get_type_id(present) == shapely.GeometryType.POLYGON)
            & (shapely.area(present) > 0)
        )
    out = list(arr)
    n_fixed = 0
    for i in np.flatnonzero(~good & ~missing):
        invalid = not arr[i].is_valid
        out[i] = _repair(arr[i])
        n_fixed += int(invalid and out[i] is not None)
    for i in np.flatnonzero(missing):
        out[i] = None
    return out, n_fixed


def _class_of(props: dict) -> str | None:
    for k in _CLASS_KEYS:
        v = props.get(k)
        if isinstance(v, dict):
            v = v.get("name")
        if v is not None:
            return str(v)
    return None


def _from_geojson(path: Path) -> tuple[list, list, list]:
    from shapely.geometry import shape

    data = json.loads(_open_text(path))
    features = data.get("features", data if isinstance(data, list) else None)
    if features is None:
        raise ValueError(f"{path.name} is not a GeoJSON FeatureCollection (no 'features').")
    geoms, classes, ids = [], [], []
    for i, feat in enumerate(features):
        try:
            g = shape(feat["geometry"])
        except (KeyError, TypeError, ValueError, AttributeError):
            g = None
        geoms.append(g)
        props = feat.get("properties") or {}
        classes.append(_class_of(props))
        ids.append(feat.get("id", props.get("id", i)))
    return geoms, classes, ids


def _is_geoparquet(path: Path) -> bool:
    import pyarrow.parquet as pq

    return b"geo" in (pq.read_schema(path).metadata or {})


def _from_geoparquet(path: Path) -> tuple[list, list, list]:
    import geopandas as gpd

    gdf = gpd.read_parquet(path)
    column = next((k for k in _CLASS_KEYS if k in gdf.columns), None)
    classes = [None if pd.isna(v) else str(v) for v in gdf[column]] if column else [None] * len(gdf)
    return list(gdf.geometry.to_numpy()), classes, list(gdf.index)


def _from_hovernet(path: Path) -> tuple[list, list, list]:
    from shapely.geometry import Polygon

    data = json.loads(_open_text(path))
    if "nuc" not in data:
        raise ValueError(f"{path.name} is not a HoVer-Net JSON (no 'nuc' entry).")
    geoms, classes, ids = [], [], []
    for k, nuc in data["nuc"].items():
        contour = np.asarray(nuc.get("contour", []), dtype=float)
        geoms.append(Polygon(contour) if len(contour) >= 3 else None)
        t = nuc.get("type")
        classes.append(None if t is None else str(t))
        ids.append(k)
    return geoms, classes, ids


def _from_xenium(path: Path) -> tuple[list, list, list]:
    from shapely.geometry import Polygon

    df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    missing = {"cell_id", "vertex_x", "vertex_y"} - set(df.columns)
    if missing:
        raise ValueError(f"{path.name} lacks Xenium boundary columns {sorted(missing)}.")
    geoms, ids = [], []
    for cid, g in df.groupby("cell_id", sort=False):
        xy = g[["vertex_x", "vertex_y"]].to_numpy(dtype=float)
        geoms.append(Polygon(xy) if len(xy) >= 3 else None)
        ids.append(cid.decode() if isinstance(cid, bytes) else cid)
    return geoms, [None] * len(geoms), ids


def _from_labels(labels: np.ndarray) -> tuple[list, list, list]:
    from shapely.geometry import Polygon
    from skimage.measure import find_contours, regionprops

    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError("A label image must be a 2D integer array (0 background, one value per nucleus).")
    geoms, ids = [], []
    for r in regionprops(labels):
        contours = find_contours(np.pad(r.image, 1).astype(np.float32), 0.5)
        if not contours:
            continue
        c = max(contours, key=len)
        geoms.append(
            Polygon(np.column_stack([c[:, 1] + r.bbox[1] - 1, c[:, 0] + r.bbox[0] - 1])) if len(c) >= 4 else None
        )
        ids.append(int(r.label))
    return geoms, [None] * len(geoms), ids


def xenium_to_global(sdata: SpatialData) -> dict:
    """The transformation of Xenium micron coordinates into ``global``: one convention for every Xenium reader.

    In an object from :func:`scellst.io.xenium`, ``global`` is in Xenium morphology pixels (as in spatialdata-io):
    ``Scale(1 / pixel_size)``. In scellst's other readers ``global`` is in microns: ``Identity``.
    """
    from spatialdata.transformations import Identity, Scale

    pixel_size = scellst_attrs(sdata).get(Attr.XENIUM, {}).get("pixel_size_um")
    if pixel_size is None:
        return {"global": Identity()}
    return {"global": Scale([1.0 / float(pixel_size)] * 2, axes=("x", "y"))}


def read_nuclei(
    sdata: SpatialData,
    path: str | Path | np.ndarray,
    *,
    format: Literal["auto", "geojson", "geoparquet", "hovernet", "xenium", "labels"] = "auto",
    image_key: str | None = None,
    key_added: str = Key.NUCLEI,
    transformations: dict | None = None,
    microns_per_pixel: float | None = None,
    overwrite: bool = False,
) -> None:
    """Import an existing nucleus segmentation as nucleus shapes, keeping class labels.

    Parameters
    ----------
    sdata
        The SpatialData object (modified in place).
    path
        The file, or a label image array.
    format
        ``"geojson"`` (QuPath, CellViT exports: polygons in level-0 pixels of the image; classes from
        ``properties.classification.name``, ``class`` or ``type``), ``"geoparquet"`` (a GeoPandas/GeoParquet file
        of polygons in level-0 pixels, classes from a ``class``/``class_name``/``type`` column), ``"hovernet"`` (HoVer-Net JSON, ``nuc`` with
        contours and types), ``"xenium"`` (``nucleus_boundaries.parquet`` / ``.csv(.gz)``, vertices in microns),
        ``"labels"`` (a label image of the image's level-0 size: array, ``.npy``, ``.tif`` or ``.png``).
        ``"auto"`` guesses from the file name.
    image_key
        The H&E image the polygons refer to; pixel-frame polygons get its transformations. On an object without
        images (outlines only, e.g. a whole-slide segmentation imported without its image), pass
        ``microns_per_pixel`` instead.
    key_added
        Name of the nucleus shapes.
    transformations
        Transformations of the new shapes; default: the image's for pixel formats, and identity to ``global``
        (microns) for Xenium.
    microns_per_pixel
        Pixel size of the polygons' frame when ``sdata`` has no image: the shapes get ``Scale(microns_per_pixel)``
        to ``global`` (microns) and the pixel size is recorded for :func:`scellst.im.embed_cells` (``"shape"``).
    overwrite
        Replace existing shapes with the same name.

    Returns
    -------
    Nothing; adds ``sdata.shapes[key_added]`` (polygons; index ``cell_id`` from 1, columns ``source_id``,
    ``area_um2`` and ``class`` when the file has classes). Broken polygons are repaired (the largest valid part is
    kept) or dropped, and the counts are logged.
    """
    import geopandas as gpd
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import get_transformation

    check_writable(sdata, key_added, overwrite=overwrite)
    if len(sdata.images) == 0 and image_key is None:
        if microns_per_pixel is None or not np.isfinite(microns_per_pixel) or microns_per_pixel <= 0:
            raise ValueError(
                "This SpatialData object has no image: pass `microns_per_pixel`, the pixel size of the polygons' "
                "frame (or add the H&E image first)."
            )
    else:
        image_key = get_key(sdata, "images", image_key, what="H&E image")
    if isinstance(path, np.ndarray):
        fmt, source = "labels", path
    else:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"{str(p)!r} does not exist.")
        name = p.name.lower()
        fmt = format
        if fmt == "auto":
            if "nucleus_boundaries" in name:
                fmt = "xenium"
            elif name.endswith(".parquet"):
                fmt = "geoparquet" if _is_geoparquet(p) else "xenium"
            elif name.endswith((".geojson", ".geojson.gz")):
                fmt = "geojson"
            elif name.endswith((".json", ".json.gz")):
                fmt = "hovernet" if '"nuc"' in _open_text(p)[:2000] else "geojson"
            elif name.endswith((".npy", ".tif", ".tiff", ".png")):
                fmt = "labels"
            else:
                raise ValueError(f"Cannot guess the format of {p.name}; pass `format=`.")
        source = p
    if fmt == "geojson":
        geoms, classes, ids = _from_geojson(source)
    elif fmt == "geoparquet":
        geoms, classes, ids = _from_geoparquet(source)
    elif fmt == "hovernet":
        geoms, classes, ids = _from_hovernet(source)
    elif fmt == "xenium":
        geoms, classes, ids = _from_xenium(source)
    elif fmt == "labels":
        if image_key is None:
            raise ValueError("Importing a label image needs the image it was made on (`image_key`).")
        if not isinstance(source, np.ndarray):
            from skimage.io import imread

            source = np.load(source) if source.suffix == ".npy" else imread(source)
        arr = np.asarray(source)
        _, h, w = image_level0(sdata, image_key).shape
        if arr.shape != (h, w):
            raise ValueError(f"The label image is {arr.shape} but image {image_key!r} is {(h, w)} at level 0.")
        geoms, classes, ids = _from_labels(arr.astype(np.int64))
    else:
        raise ValueError(f"Unknown format {fmt!r}; use 'geojson', 'geoparquet', 'hovernet', 'xenium' or 'labels'.")

    n_in = len(geoms)
    repaired, n_fixed = _repair_all(geoms)
    keep = [i for i, g in enumerate(repaired) if g is not None]
    if n_fixed or len(keep) < n_in:
        logger.warning(
            f"{fmt}: repaired {n_fixed} invalid polygons and dropped {n_in - len(keep)} empty or broken ones"
        )
    if not keep:
        raise ValueError(f"No usable nucleus polygon in {getattr(source, 'name', 'the input')}.")
    gdf = gpd.GeoDataFrame(
        {"source_id": pd.Series([ids[i] for i in keep]).astype(str).to_numpy()},
        geometry=[repaired[i] for i in keep],
        index=pd.Index(np.arange(1, len(keep) + 1), name=Col.CELL_ID),
    )
    if fmt == "xenium":
        gdf["area_um2"] = gdf.geometry.area.to_numpy()
        transformations = transformations or xenium_to_global(sdata)
    elif image_key is None:
        from spatialdata.transformations import Scale

        gdf["area_um2"] = gdf.geometry.area.to_numpy() * microns_per_pixel**2
        transformations = transformations or {"global": Scale([microns_per_pixel] * 2, axes=("y", "x"))}
    else:
        gdf["area_um2"] = gdf.geometry.area.to_numpy() * get_microns_per_pixel(sdata, image_key) ** 2
        transformations = transformations or get_transformation(sdata.images[image_key], get_all=True)
    if any(classes[i] is not None for i in keep):
        gdf["class"] = pd.Categorical([classes[i] if classes[i] is not None else "unknown" for i in keep])
    shapes = ShapesModel.parse(gdf, transformations=transformations)
    write_element(sdata, key_added, shapes, overwrite=overwrite, what=f"{len(gdf):,} imported nuclei ({fmt})")
    if image_key is None:
        record_attr(sdata, Attr.MICRONS_PER_PIXEL, key_added, float(microns_per_pixel))
    else:
        record_attr(sdata, Attr.SHAPES_SOURCE, key_added, image_key)
