"""Offline nucleus segmentation of H&E images, tile by tile."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from .._constants import Attr, Col, Key
from .._logging import logger
from .._utils import (
    check_writable,
    get_key,
    get_microns_per_pixel,
    image_level0,
    image_rgb_tile,
    record_attr,
    tile_grid,
    to_rgb_uint8,
    write_element,
)

if TYPE_CHECKING:
    import geopandas as gpd
    from spatialdata import SpatialData


@dataclass(frozen=True)
class ClassicalParams:
    """Parameters of the classical segmenter; every size is in microns."""

    min_area_um2: float = 8.0
    max_area_um2: float = 250.0
    min_distance_um: float = 2.5
    smooth_um: float = 0.4
    threshold: float | None = None


def _hematoxylin(rgb: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2hed

    return rgb2hed(rgb)[..., 0].astype(np.float32)


def estimate_threshold(arr, *, microns_per_pixel: float, n_patches: int = 12, seed: int = 0) -> float:
    """Otsu threshold of the haematoxylin channel over full-resolution patches sampled in the tissue.

    The tissue is found on a coarse view (non-white pixels); patches are read at full resolution, so the threshold
    matches what each tile sees, and one threshold serves every tile (no tile-to-tile drift).
    """
    from skimage.filters import gaussian, threshold_otsu

    _, h, w = arr.shape
    step = max(1, int(max(h, w) / 512))
    coarse = image_rgb_tile(arr[:, ::step, ::step], 0, None, 0, None).astype(np.float32)
    tissue = coarse.mean(axis=-1) < 215
    ys, xs = np.nonzero(tissue)
    if len(ys) == 0:
        raise ValueError("No tissue found in the image (every pixel is near white); is this an H&E image?")
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(ys), size=min(n_patches, len(ys)), replace=False)
    patch = max(64, int(round(128 / microns_per_pixel)))
    values = []
    for i in pick:
        cy, cx = ys[i] * step, xs[i] * step
        y0, x0 = max(cy - patch // 2, 0), max(cx - patch // 2, 0)
        rgb = image_rgb_tile(arr, y0, min(y0 + patch, h), x0, min(x0 + patch, w))
        hema = gaussian(_hematoxylin(rgb), sigma=max(0.4 / microns_per_pixel, 0.5))
        values.append(hema[rgb.mean(axis=-1) < 215])
    values = np.concatenate(values)
    if values.size < 100:
        raise ValueError("Too little tissue to estimate a nucleus threshold; pass `threshold=` explicitly.")
    return float(threshold_otsu(values))


def _remove_small(func, mask: np.ndarray, size: int) -> np.ndarray:
    """Call skimage's small-object/hole removal across the ``min_size`` -> ``max_size`` API change."""
    try:
        return func(mask, max_size=size)
    except TypeError:
        return func(mask, size)


def segment_tile(rgb: np.ndarray, *, microns_per_pixel: float, threshold: float, params: ClassicalParams) -> np.ndarray:
    """Instance labels of the nuclei in one RGB tile (colour deconvolution, threshold, distance watershed)."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian
    from skimage.morphology import disk, opening, remove_small_holes, remove_small_objects
    from skimage.segmentation import watershed

    mpp = microns_per_pixel
    min_area_px = max(params.min_area_um2 / mpp**2, 4)
    hema = gaussian(_hematoxylin(rgb), sigma=max(params.smooth_um / mpp, 0.5))
    fg = hema > threshold
    radius = int(round(0.4 / mpp))
    if radius >= 1:
        fg = opening(fg, disk(radius))
    fg = _remove_small(remove_small_holes, fg, int(min_area_px))
    fg = _remove_small(remove_small_objects, fg, int(min_area_px))
    if not fg.any():
        return np.zeros(fg.shape, dtype=np.int32)
    dist = ndi.distance_transform_edt(fg)
    dist = gaussian(dist, sigma=max(0.5 / mpp, 0.5))
    components, _ = ndi.label(fg)
    peaks = peak_local_max(
        dist,
        min_distance=max(int(round(params.min_distance_um / mpp)), 1),
        labels=components,
        exclude_border=False,
    )
    markers = np.zeros(fg.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # components without a peak (flat plateaus) still get one seed
    missing = np.setdiff1d(np.unique(components[fg]), np.unique(components[tuple(peaks.T)]))
    if len(missing):
        com = ndi.center_of_mass(fg, components, missing)
        for j, (cy, cx) in enumerate(com):
            markers[int(cy), int(cx)] = len(peaks) + 1 + j
    labels = watershed(-dist, markers, mask=fg)
    return labels.astype(np.int32)


def _polygons_from_labels(
    labels: np.ndarray,
    *,
    offset: tuple[int, int],
    core: tuple[int, int, int, int],
    microns_per_pixel: float,
    params: ClassicalParams,
) -> tuple[list, np.ndarray]:
    """Polygons (level-0 pixel frame) of the nuclei whose centroid lies in the tile core."""
    from shapely.geometry import Polygon
    from skimage.measure import find_contours, regionprops

    oy, ox = offset
    y0, y1, x0, x1 = core
    mpp2 = microns_per_pixel**2
    polys, areas = [], []
    for r in regionprops(labels):
        area_um2 = r.area * mpp2
        if area_um2 < params.min_area_um2 or area_um2 > params.max_area_um2:
            continue
        cy, cx = r.centroid[0] + oy, r.centroid[1] + ox
        if not (y0 <= cy < y1 and x0 <= cx < x1):
            continue
        mask = np.pad(r.image, 1)
        contours = find_contours(mask.astype(np.float32), 0.5)
        if not contours:
            continue
        c = max(contours, key=len)
        if len(c) < 4:
            continue
        by, bx = r.bbox[0] - 1 + oy, r.bbox[1] - 1 + ox
        poly = Polygon(np.column_stack([c[:, 1] + bx, c[:, 0] + by]))
        poly = poly.simplify(0.3, preserve_topology=True)
        if not poly.is_valid:
            poly = poly.buffer(0)
        if poly.is_empty or poly.geom_type != "Polygon":
            continue
        polys.append(poly)
        areas.append(area_um2)
    return polys, np.asarray(areas, dtype=float)


def _process_tile(data, core, offset, mpp, threshold, params):
    rgb = to_rgb_uint8(np.asarray(data))
    labels = segment_tile(rgb, microns_per_pixel=mpp, threshold=threshold, params=params)
    return _polygons_from_labels(labels, offset=offset, core=core, microns_per_pixel=mpp, params=params)


def rasterize_nuclei(gdf: gpd.GeoDataFrame, shape: tuple[int, int], *, chunks: int = 2048):
    """A lazy dask label image of the polygons (value = the shapes' integer index), rendered block by block."""
    import dask.array as da
    from shapely import STRtree, box
    from skimage.draw import polygon as draw_polygon

    geoms = gdf.geometry.to_numpy()
    ids = gdf.index.to_numpy().astype(np.uint32)
    tree = STRtree(geoms)

    def _render(block: np.ndarray, block_info=None) -> np.ndarray:
        (y0, y1), (x0, x1) = block_info[0]["array-location"]
        out = np.zeros((y1 - y0, x1 - x0), dtype=np.uint32)
        for i in tree.query(box(x0, y0, x1, y1)):
            xy = np.asarray(geoms[i].exterior.coords)
            rr, cc = draw_polygon(xy[:, 1] - y0, xy[:, 0] - x0, shape=out.shape)
            out[rr, cc] = ids[i]
        return out

    template = da.zeros(shape, chunks=(chunks, chunks), dtype=np.uint32)
    return template.map_blocks(_render, dtype=np.uint32)


def segment_nuclei(
    sdata: SpatialData,
    image_key: str | None = None,
    *,
    method: Literal["classical"] = "classical",
    key_added: str = Key.NUCLEI,
    labels_key_added: str | None = None,
    min_area_um2: float = 8.0,
    max_area_um2: float = 250.0,
    min_distance_um: float = 2.5,
    threshold: float | None = None,
    tile_size: int = 2048,
    margin_um: float = 20.0,
    overwrite: bool = False,
    show_progress_bar: bool = True,
) -> None:
    """Segment nuclei on an H&E image, tile by tile, and store them as polygons (and a label image).

    The classical method works offline: colour deconvolution to the haematoxylin channel, one Otsu threshold
    estimated on full-resolution patches of the tissue, a morphological clean-up, then a distance-transform
    watershed that splits touching nuclei. Tiles overlap by ``margin_um``; a nucleus belongs to the tile that holds
    its centroid, so nuclei cut by tile borders are kept exactly once. Tiles run in parallel with dask (threads,
    or the active ``dask.distributed`` client); only a few tiles are in memory at a time.

    Parameters
    ----------
    sdata
        The SpatialData object (modified in place).
    image_key
        The H&E image; ``None`` for the only image.
    method
        Segmentation method. Only ``"classical"`` for now.
    key_added
        Name of the nucleus shapes.
    labels_key_added
        Name of the label image (default ``f"{key_added}_labels"``); pass ``""`` to skip it.
    min_area_um2, max_area_um2
        Accepted nucleus areas, in square microns.
    min_distance_um
        Minimal distance between two nucleus centres (controls the splitting of touching nuclei).
    threshold
        Haematoxylin threshold; ``None`` estimates it on the image.
    tile_size
        Tile size in level-0 pixels.
    margin_um
        Overlap between tiles, in microns (larger than a nucleus).
    overwrite
        Replace existing elements with the same names.
    show_progress_bar
        Show a progress bar over tiles.

    Returns
    -------
    Nothing; adds ``sdata.shapes[key_added]`` (polygons in the image's level-0 pixel frame, with the image's
    transformations, index ``cell_id`` from 1, column ``area_um2``) and ``sdata.labels[labels_key_added]``
    (label value = ``cell_id``), and records the source image in ``sdata.attrs['scellst']``.
    """
    import dask
    import geopandas as gpd
    import pandas as pd
    from spatialdata.models import Labels2DModel, ShapesModel
    from spatialdata.transformations import get_transformation

    if method != "classical":
        raise ValueError(f"Unknown segmentation method {method!r}; available: 'classical'.")
    image_key = get_key(sdata, "images", image_key, what="H&E image")
    labels_key = f"{key_added}_labels" if labels_key_added is None else labels_key_added
    check_writable(sdata, key_added, overwrite=overwrite)
    if labels_key:
        check_writable(sdata, labels_key, overwrite=overwrite)
    if min_area_um2 <= 0 or max_area_um2 <= min_area_um2:
        raise ValueError("Need 0 < min_area_um2 < max_area_um2 (square microns).")
    mpp = get_microns_per_pixel(sdata, image_key)
    arr = image_level0(sdata, image_key)
    _, h, w = arr.shape
    if threshold is None:
        threshold = estimate_threshold(arr, microns_per_pixel=mpp)
    params = ClassicalParams(min_area_um2, max_area_um2, min_distance_um, threshold=threshold)
    margin = int(np.ceil(margin_um / mpp))
    tiles = tile_grid(h, w, tile_size)
    tasks = []
    for y0, y1, x0, x1 in tiles:
        py0, py1, px0, px1 = max(y0 - margin, 0), min(y1 + margin, h), max(x0 - margin, 0), min(x1 + margin, w)
        data = arr.data[:, py0:py1, px0:px1]
        tasks.append(dask.delayed(_process_tile)(data, (y0, y1, x0, x1), (py0, px0), mpp, threshold, params))
    logger.info(
        f"Segmenting nuclei on {image_key!r} ({w:,} x {h:,} px, {mpp:.3f} um/px) in {len(tiles)} tiles, "
        f"haematoxylin threshold {threshold:.4f}"
    )
    results = _compute_with_progress(tasks, show_progress_bar=show_progress_bar, desc="segment_nuclei")
    polys = [p for res in results for p in res[0]]
    areas = np.concatenate([res[1] for res in results]) if results else np.zeros(0)
    if not polys:
        raise ValueError(
            f"No nucleus found on {image_key!r}. Check the microns per pixel ({mpp}) and the image content, or "
            "lower `threshold` / `min_area_um2`."
        )
    gdf = gpd.GeoDataFrame(
        {"area_um2": areas},
        geometry=polys,
        index=pd.Index(np.arange(1, len(polys) + 1), name=Col.CELL_ID),
    )
    transformations = get_transformation(sdata.images[image_key], get_all=True)
    shapes = ShapesModel.parse(gdf, transformations=transformations)
    write_element(sdata, key_added, shapes, overwrite=overwrite, what=f"{len(polys):,} nuclei")
    record_attr(sdata, Attr.SHAPES_SOURCE, key_added, image_key)
    if labels_key:
        labels = rasterize_nuclei(gdf, (h, w))
        labels_el = Labels2DModel.parse(labels, dims=("y", "x"), transformations=transformations)
        write_element(sdata, labels_key, labels_el, overwrite=overwrite, what="nucleus label image")
    logger.debug(f"segment_nuclei parameters: {asdict(params)}")


def _compute_with_progress(tasks: list, *, show_progress_bar: bool, desc: str) -> list:
    """Compute dask delayed tasks on the active scheduler, with a progress bar."""
    import dask

    try:
        from distributed import get_client

        client = get_client()
    except (ImportError, ValueError):
        client = None
    if client is not None:
        futures = client.compute(tasks)
        if show_progress_bar:
            from distributed import progress

            progress(futures)
        return client.gather(futures)
    if show_progress_bar:
        from tqdm.dask import TqdmCallback

        with TqdmCallback(desc=desc):
            return list(dask.compute(*tasks, scheduler="threads"))
    return list(dask.compute(*tasks, scheduler="threads"))
