"""Offline nucleus segmentation of H&E images, tile by tile."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._constants import Attr, Col, Key
from .._logging import logger
from .._tiles import TileCache, run_tiles
from .._utils import (
    check_writable,
    get_key,
    get_microns_per_pixel,
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
    """Parameters of the classical segmenter; every size is in microns.

    ``foreground_fraction`` scales the haematoxylin threshold for the candidate foreground, ``seed_sigma_um`` is the
    scale of the blob detector that places one seed per nucleus, and ``refine`` re-thresholds each nucleus between
    the mean haematoxylin of the ring around it (0, width ``ring_um``) and its own mean (1); 0 keeps the watershed
    regions as they are.
    """

    min_area_um2: float = 8.0
    max_area_um2: float = 250.0
    min_distance_um: float = 2.5
    smooth_um: float = 0.4
    foreground_fraction: float = 0.8
    seed_sigma_um: float = 2.0
    refine: float = 0.6
    ring_um: float = 1.5


@cache
def _hematoxylin_lut() -> np.ndarray:
    """Per-channel lookup tables of the haematoxylin optical density (Ruifrok-Johnston colour deconvolution).

    Equal to ``skimage.color.rgb2hed(rgb)[..., 0]`` for uint8 images, without the float64 logarithm of every pixel.
    """
    from skimage.color import hed_from_rgb

    v = np.maximum(np.arange(256, dtype=np.float64) / 255.0, 1e-6)
    od = np.log(v) / np.log(1e-6)
    return (od[None, :] * hed_from_rgb[:, 0][:, None]).astype(np.float32)  # (3, 256)


def _hematoxylin(rgb: np.ndarray) -> np.ndarray:
    """Haematoxylin channel of a uint8 RGB image (float32, >= 0)."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8:
        rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    lut = _hematoxylin_lut()
    return np.maximum(lut[0][rgb[..., 0]] + lut[1][rgb[..., 1]] + lut[2][rgb[..., 2]], 0)


def tissue_boxes(
    arr, *, microns_per_pixel: float, n_patches: int, patch_um: float = 128.0, seed: int = 0
) -> list[tuple[int, int, int, int]]:
    """``(y0, y1, x0, x1)`` boxes of about ``patch_um`` microns centred on tissue, in the pixels of ``arr``.

    The tissue (non-white pixels) is found on a coarse view of the lazy ``(c, y, x)`` image; ``n_patches`` boxes are
    centred on tissue pixels drawn at random. An image smaller than the boxes together gives one box, all of it.
    """
    _, h, w = arr.shape
    step = max(1, int(max(h, w) / 512))
    coarse = image_rgb_tile(arr[:, ::step, ::step], 0, None, 0, None).astype(np.float32)
    tissue = coarse.mean(axis=-1) < 215
    ys, xs = np.nonzero(tissue)
    if len(ys) < 4:
        raise ValueError(
            "No tissue found in the image (every pixel is near white). Is this an H&E image, and is it RGB with "
            "values in 0-255?"
        )
    rng = np.random.default_rng(seed)
    patch = max(64, int(round(patch_um / microns_per_pixel)))
    if h * w <= n_patches * patch**2:  # a small image: use all of it once rather than overlapping patches
        return [(0, h, 0, w)]
    boxes = []
    for i in rng.choice(len(ys), size=min(n_patches, len(ys)), replace=False):
        y0, x0 = max(ys[i] * step - patch // 2, 0), max(xs[i] * step - patch // 2, 0)
        boxes.append((y0, min(y0 + patch, h), x0, min(x0 + patch, w)))
    return boxes


def estimate_threshold(
    arr, *, microns_per_pixel: float, working_mpp: float | None = None, n_patches: int = 12, seed: int = 0
) -> float:
    """Otsu threshold of the smoothed haematoxylin channel over patches sampled in the tissue.

    ``n_patches`` patches of 128 um in the tissue (:func:`tissue_boxes`) are read at full resolution and resampled
    to the working resolution, so the threshold matches what each tile sees, and one threshold serves every tile.
    """
    from skimage.filters import gaussian, threshold_otsu

    from .._utils import resample_rgb

    work = max(working_mpp or microns_per_pixel, microns_per_pixel)
    values = []
    for y0, y1, x0, x1 in tissue_boxes(arr, microns_per_pixel=microns_per_pixel, n_patches=n_patches, seed=seed):
        rgb = resample_rgb(image_rgb_tile(arr, y0, y1, x0, x1), work / microns_per_pixel)
        hema = gaussian(_hematoxylin(rgb), sigma=max(0.4 / work, 0.5))
        values.append(hema[rgb.mean(axis=-1) < 215])
    values = np.concatenate(values)
    if values.size < 100:
        raise ValueError("Too little tissue to estimate a nucleus threshold; pass `threshold=` explicitly.")
    return float(threshold_otsu(values))


# Blob scale (sigma of the strongest Laplacian-of-Gaussian response) of H&E nuclei at the stated resolution:
# 1.0-2.2 um over 13 MoNuSeg tiles, 14 CoNSeP images, GBM40 and 4 HER2ST sections; 2.9-4.2 um for most of them when
# the stated microns per pixel are twice too coarse (benchmarks/segmentation.py prints these readings).
NUCLEUS_SCALE_MAX_UM = 3.0
_SCALE_SIGMAS_UM = 2.0 ** np.arange(0, 3.01, 0.25)  # 1 to 8 um, a quarter octave apart


def nucleus_scale_um(arr, *, microns_per_pixel: float, n_patches: int = 8, seed: int = 0) -> float | None:
    """The blob scale of the nuclei in a lazy ``(c, y, x)`` RGB image, in microns at the stated resolution.

    On ``n_patches`` tissue patches of 128 um (:func:`tissue_boxes`, seen at 0.5 um/px or coarser), the
    haematoxylin channel is filtered by scale-normalised Laplacians of Gaussians of sigma 1-8 um; the scale whose
    strongest responses (top 1 % of the tissue pixels, mean over patches) are highest is the blob scale (about the
    nucleus radius / 1.4). It does not depend on any segmentation, so it shows a wrong microns per pixel that makes
    the segmenter split nuclei into pieces of normal size. ``None`` when there is too little tissue to tell.
    :func:`scellst.im.segment_nuclei` warns when it is above ``NUCLEUS_SCALE_MAX_UM`` (3 um).

    Parameters
    ----------
    arr
        The image, e.g. :func:`scellst.io.image_level0` (read patch by patch).
    microns_per_pixel
        The stated pixel size.
    n_patches
        Tissue patches to measure.
    seed
        Seed of the patch choice.

    Returns
    -------
    The blob scale in microns, or ``None``.
    """
    from scipy import ndimage as ndi

    from .._utils import resample_rgb

    try:
        boxes = tissue_boxes(arr, microns_per_pixel=microns_per_pixel, n_patches=n_patches, seed=seed)
    except ValueError:  # no tissue: segment_nuclei says so itself
        return None
    factor = max(1.0, 0.5 / microns_per_pixel)
    mpp = microns_per_pixel * factor
    sigmas_px = _SCALE_SIGMAS_UM / mpp
    usable = sigmas_px >= 1.0  # finer blobs than a pixel are noise
    curves = []
    for box in boxes:
        rgb = resample_rgb(image_rgb_tile(arr, *box), factor)
        tissue = rgb.mean(axis=-1) < 215
        if tissue.sum() < 1000:
            continue
        hema = _hematoxylin(rgb)
        curve = np.full(len(sigmas_px), np.nan)
        for i in np.flatnonzero(usable):
            values = (-ndi.gaussian_laplace(hema, sigmas_px[i]) * sigmas_px[i] ** 2)[tissue]
            k = max(values.size // 100, 1)
            curve[i] = np.partition(values, values.size - k)[-k:].mean()
        curves.append(curve)
    if not curves or not usable.any():
        return None
    curve = np.mean(curves, axis=0)
    i = int(np.nanargmax(curve))
    log_sigma = np.log2(_SCALE_SIGMAS_UM[i])
    if 0 < i < len(curve) - 1 and np.isfinite(curve[i - 1]) and np.isfinite(curve[i + 1]):
        a, b, c = curve[i - 1], curve[i], curve[i + 1]
        if a - 2 * b + c < 0:  # parabola through the peak, in log scale
            log_sigma += 0.25 * 0.5 * (a - c) / (a - 2 * b + c)
    return float(2**log_sigma)


def _check_nucleus_scale(arr, *, microns_per_pixel: float, what: str) -> None:
    """Warn when the nuclei look too large for the stated resolution (microns per pixel too coarse)."""
    scale = nucleus_scale_um(arr, microns_per_pixel=microns_per_pixel)
    if scale is not None and scale >= NUCLEUS_SCALE_MAX_UM:
        logger.warning(
            f"The nuclei of {what} look large for its stated resolution: their blob scale reads {scale:.1f} um, "
            f"where H&E nuclei read 1-2.2 um. The microns per pixel may be too coarse (about {scale / 1.7:.1f}x; "
            "e.g. a downsampled image given the full-resolution pixel size), which splits every nucleus into "
            "pieces: check them, and set the right value with `scellst.io.set_microns_per_pixel`."
        )


def _remove_small(func, mask: np.ndarray, size: int) -> np.ndarray:
    """Call skimage's small-object/hole removal across the ``min_size`` -> ``max_size`` API change."""
    try:
        return func(mask, max_size=size)
    except TypeError:
        return func(mask, size)


def _local_maxima(score: np.ndarray, size: int, mask: np.ndarray) -> np.ndarray:
    """``(n, 2)`` positions of the maxima of ``score`` over ``size`` x ``size`` windows inside ``mask``.

    A flat maximum (a plateau of equal values) gives one position, its centre.
    """
    from scipy import ndimage as ndi

    peak = (score == ndi.maximum_filter(score, size=size)) & mask
    plateaus, n = ndi.label(peak)
    if n == 0:
        return np.zeros((0, 2), dtype=int)
    centres = np.asarray(ndi.center_of_mass(peak, plateaus, np.arange(1, n + 1)))
    return np.rint(centres).astype(int).reshape(-1, 2)


def refine_nuclei(labels: np.ndarray, hema: np.ndarray, *, level: float, ring_px: int) -> np.ndarray:
    """Re-threshold every nucleus between the mean haematoxylin of the ring around it and its own mean.

    A nucleus keeps its pixels above ``ring + level * (mean - ring)`` (holes filled), so a pale nucleus and a dark
    one each get their own boundary, and pale cytoplasm caught by a global threshold is trimmed.
    """
    from scipy import ndimage as ndi
    from skimage.morphology import disk

    n = int(labels.max())
    if n == 0:
        return labels
    grown = ndi.grey_dilation(labels, footprint=disk(max(ring_px, 1)))
    ring = np.where(labels == 0, grown, 0).ravel()
    values = hema.ravel()
    with np.errstate(invalid="ignore", divide="ignore"):
        ring_level = np.bincount(ring, weights=values, minlength=n + 1) / np.bincount(ring, minlength=n + 1)
        inside = np.bincount(labels.ravel(), weights=values, minlength=n + 1) / np.bincount(
            labels.ravel(), minlength=n + 1
        )
    ring_level = np.where(np.isfinite(ring_level), ring_level, 0.5 * inside)  # a nucleus without any ring
    cut = (ring_level + level * (inside - ring_level)).astype(np.float32)
    cut[0] = np.inf
    out = np.where((hema > cut[labels]) & (labels > 0), labels, 0).astype(np.int32)
    holes = ndi.binary_fill_holes(out > 0) & (out == 0)  # pale chromatin inside a nucleus comes back to it
    out[holes] = np.where(labels[holes] > 0, labels[holes], grown[holes])
    return out


def segment_tile(rgb: np.ndarray, *, microns_per_pixel: float, threshold: float, params: ClassicalParams) -> np.ndarray:
    """Instance labels of the nuclei in one RGB tile.

    Colour deconvolution to haematoxylin; candidate foreground above ``foreground_fraction x threshold``; one seed
    per nucleus at the maxima of a Laplacian-of-Gaussian blob filter (scale ``seed_sigma_um``, at least
    ``min_distance_um`` apart); a watershed of the haematoxylin intensity from the seeds, so that touching nuclei
    split along the paler cytoplasm between them; then each nucleus is re-thresholded locally (``refine``).
    """
    from scipy import ndimage as ndi
    from skimage.filters import gaussian
    from skimage.morphology import disk, opening, remove_small_objects
    from skimage.segmentation import watershed

    mpp = microns_per_pixel
    min_area_px = max(params.min_area_um2 / mpp**2, 4)
    raw = _hematoxylin(rgb)
    hema = gaussian(raw, sigma=max(params.smooth_um / mpp, 0.5))
    fg = hema > params.foreground_fraction * threshold
    radius = int(round(0.4 / mpp))
    if radius >= 1:
        fg = opening(fg, disk(radius))
    fg = _remove_small(remove_small_objects, fg, int(min_area_px))
    if not fg.any():
        return np.zeros(fg.shape, dtype=np.int32)
    blob = -ndi.gaussian_laplace(raw, sigma=max(params.seed_sigma_um / mpp, 1.0))
    seeds = _local_maxima(blob, 2 * max(int(round(params.min_distance_um / mpp)), 1) + 1, fg & (blob > 0))
    markers = np.zeros(fg.shape, dtype=np.int32)
    markers[tuple(seeds.T)] = np.arange(1, len(seeds) + 1)
    labels = watershed(-hema, markers, mask=fg)
    rest, _ = ndi.label(fg & (labels == 0))  # components without a seed keep their own label
    labels[rest > 0] = rest[rest > 0] + labels.max()
    if params.refine > 0:
        labels = refine_nuclei(labels, hema, level=params.refine, ring_px=int(round(params.ring_um / mpp)))
    return labels.astype(np.int32)


class ClassicalSegmenter:
    """Colour deconvolution, one global threshold, blob seeds and a watershed of the haematoxylin; at ``working_mpp``."""

    class_names: tuple[str, ...] = ()

    def __init__(self, params: ClassicalParams, threshold: float, working_mpp: float) -> None:
        self.params, self.threshold, self.working_mpp = params, threshold, working_mpp

    def __call__(self, rgb: np.ndarray) -> tuple[np.ndarray, dict | None]:
        return segment_tile(rgb, microns_per_pixel=self.working_mpp, threshold=self.threshold, params=self.params), None


class UNetSegmenter:
    """A U-Net from :func:`scellst.im.train_segmenter`, at its training resolution.

    Its post-processing keeps nuclei of at least ``min_area_um2``, the value given to :func:`segment_nuclei`
    (not the one saved with the model), so that the engine's size filter applies to every method alike.
    """

    def __init__(self, model, min_area_um2: float) -> None:
        self.model = model
        self.min_area_um2 = min_area_um2
        self.working_mpp = model.config.microns_per_pixel
        self.class_names = tuple(model.config.class_names) if model.config.n_classes else ()

    def __call__(self, rgb: np.ndarray) -> tuple[np.ndarray, dict | None]:
        return self.model.segment(rgb, min_area_um2=self.min_area_um2)


def _polygons_from_labels(
    labels: np.ndarray,
    *,
    to_level0: tuple[float, float, float],
    core: tuple[float, float, float, float],
    working_mpp: float,
    params: ClassicalParams,
    classes: dict | None = None,
) -> tuple[list, np.ndarray, list]:
    """Polygons in the level-0 pixel frame of the nuclei whose centroid lies in the tile core.

    ``to_level0 = (scale, oy, ox)`` maps working-resolution pixel centres to level-0 pixel centres:
    ``y0 = (y + 0.5) * scale - 0.5 + oy``. Outlines follow the pixel edges of each nucleus (OpenCV traces the
    boundary pixels' centres; a half-pixel mitred buffer moves it onto their outer edges), then are simplified by
    0.3 working pixels; areas and centroids are computed on the label image, so every step is vectorised but the
    contour tracing itself.
    """
    import cv2
    import shapely
    from scipy import ndimage as ndi

    scale, oy, ox = to_level0
    y0, y1, x0, x1 = core
    n = int(labels.max())
    if n == 0:
        return [], np.zeros(0), []
    flat = labels.ravel()
    count = np.bincount(flat, minlength=n + 1)[1:].astype(float)
    yy, xx = np.divmod(np.arange(flat.size), labels.shape[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = np.bincount(flat, weights=yy, minlength=n + 1)[1:] / count
        cx = np.bincount(flat, weights=xx, minlength=n + 1)[1:] / count
    area_um2 = count * working_mpp**2
    cy0, cx0 = (cy + 0.5) * scale - 0.5 + oy, (cx + 0.5) * scale - 0.5 + ox
    keep = (
        (count > 0)
        & (area_um2 >= params.min_area_um2)
        & (area_um2 <= params.max_area_um2)
        & (cy0 >= y0)
        & (cy0 < y1)
        & (cx0 >= x0)
        & (cx0 < x1)
    )
    slices = ndi.find_objects(labels)
    rings, kept = [], []
    for i in np.flatnonzero(keep) + 1:
        sl = slices[i - 1]
        contours, _ = cv2.findContours((labels[sl] == i).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        c = max(contours, key=cv2.contourArea)[:, 0, :].astype(np.float64) if contours else None
        if c is None or len(c) < 3:
            continue
        c += (sl[1].start, sl[0].start)
        rings.append(np.vstack([c, c[:1]]))
        kept.append(i)
    if not rings:
        return [], np.zeros(0), []
    ring_offsets = np.concatenate([[0], np.cumsum([len(r) for r in rings])])
    polys = shapely.from_ragged_array(
        shapely.GeometryType.POLYGON, np.concatenate(rings), (ring_offsets, np.arange(len(rings) + 1))
    )
    polys = shapely.buffer(polys, 0.5, join_style="mitre", mitre_limit=2.0)
    polys = shapely.simplify(polys, 0.3, preserve_topology=True)
    polys = shapely.transform(polys, lambda xy: (xy + 0.5) * scale - 0.5 + np.array([ox, oy]))
    good = shapely.is_valid(polys) & ~shapely.is_empty(polys)
    good &= shapely.get_type_id(polys) == shapely.GeometryType.POLYGON
    kept = np.asarray(kept)[good]
    out_classes = [classes.get(int(i), 0) for i in kept] if classes is not None else [0] * len(kept)
    return list(polys[good]), area_um2[kept - 1], out_classes


def _process_tile(data, core, to_level0, residual, segmenter, params):
    from .._utils import resample_rgb

    rgb = resample_rgb(to_rgb_uint8(np.asarray(data)), residual)
    labels, classes = segmenter(rgb)
    return _polygons_from_labels(
        labels, to_level0=to_level0, core=core, working_mpp=segmenter.working_mpp, params=params, classes=classes
    )


def render_polygons(geoms: np.ndarray, ids: np.ndarray, tree, window: tuple[int, int, int, int]) -> np.ndarray:
    """Label image ``(y1 - y0, x1 - x0)`` (uint32) of the polygons (pixel frame) that meet ``window``.

    ``tree`` is a :class:`shapely.STRtree` of ``geoms``; each polygon is drawn with its value in ``ids`` (pixel
    centres inside it; where polygons overlap, the later one wins).
    """
    from shapely import box

    from ._raster import fill_polygons

    y0, y1, x0, x1 = window
    found = tree.query(box(x0, y0, x1, y1))
    return fill_polygons(geoms[found], ids[found], (y1 - y0, x1 - x0), (y0, x0), dtype=np.uint32)


def rasterize_nuclei(gdf: gpd.GeoDataFrame, shape: tuple[int, int], *, chunks: int = 2048):
    """A lazy dask label image of the polygons (value = the shapes' integer index), rendered block by block."""
    import dask.array as da
    from shapely import STRtree

    geoms = gdf.geometry.to_numpy()
    ids = gdf.index.to_numpy().astype(np.uint32)
    tree = STRtree(geoms)

    def _render(block: np.ndarray, block_info=None) -> np.ndarray:
        (y0, y1), (x0, x1) = block_info[0]["array-location"]
        return render_polygons(geoms, ids, tree, (y0, y1, x0, x1))

    template = da.zeros(shape, chunks=(chunks, chunks), dtype=np.uint32)
    return template.map_blocks(_render, dtype=np.uint32)


def _pyramid(sdata: SpatialData, image_key: str) -> list[tuple[Any, float]]:
    """Levels of an image as ``(lazy (c, y, x) array, downscale factor relative to level 0)``."""
    import xarray as xr

    img = sdata.images[image_key]
    if not isinstance(img, xr.DataTree):
        return [(img, 1.0)]
    levels = [
        next(iter(img[k].ds.data_vars.values()))
        for k in sorted(img.children, key=lambda k: int(k.replace("scale", "") or 0))
    ]
    w0 = levels[0].shape[-1]
    return [(lvl, w0 / lvl.shape[-1]) for lvl in levels]


def check_rgb(arr, image_key: str) -> None:
    """Raise a clear error unless the ``(c, y, x)`` image has 3 (RGB) or 4 (RGBA) channels."""
    n_channels = arr.shape[0]
    if n_channels not in (3, 4):
        raise ValueError(
            f"Image {image_key!r} has {n_channels} channel(s); nucleus segmentation needs an RGB H&E image "
            "(an RGBA image is accepted, its alpha channel is ignored)."
        )


def _make_segmenter(method, *, weights, params, threshold, working_mpp, arr0, mpp):
    """The tile segmenter for ``method`` (classical, a trained U-Net, or an optional backend)."""
    from ..models._unet import NucleusUNet
    from ._backends import BACKENDS, backend_segmenter

    if isinstance(method, NucleusUNet):
        return UNetSegmenter(method, params.min_area_um2)
    if method == "classical":
        if threshold is None:
            threshold = estimate_threshold(arr0, microns_per_pixel=mpp, working_mpp=working_mpp)
        return ClassicalSegmenter(params, threshold, max(working_mpp, mpp))
    if method in BACKENDS:
        return backend_segmenter(method, weights=weights, microns_per_pixel=max(working_mpp, mpp))
    if isinstance(method, str | Path) and (Path(method).exists() or Path(method).suffix in {".pt", ".pth"}):
        return UNetSegmenter(NucleusUNet.load(method), params.min_area_um2)  # a missing file: FileNotFoundError
    raise ValueError(
        f"Unknown segmentation method {method!r}: use 'classical', the path of a model from "
        f"`scellst.im.train_segmenter`, or one of the optional backends {BACKENDS} (with `weights=`)."
    )


def _describe_segmenter(method: Any, segmenter: Any) -> dict[str, Any]:
    """What identifies a segmenter's output, for the tile cache."""
    out: dict[str, Any] = {"type": type(segmenter).__name__, "working_mpp": segmenter.working_mpp}
    if isinstance(segmenter, ClassicalSegmenter):
        out["threshold"] = float(segmenter.threshold)
    if isinstance(method, str | Path):
        path = Path(method)
        out["method"] = str(method)
        if path.is_file():
            stat = path.stat()
            out["file"] = [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
    else:
        out["method"] = f"{type(method).__module__}.{type(method).__qualname__}@{id(method)}"
    return out


def segment_nuclei(
    sdata: SpatialData,
    image_key: str | None = None,
    *,
    method: str | Path | Any = "classical",
    weights: str | Path | None = None,
    key_added: str = Key.NUCLEI,
    labels_key_added: str | None = None,
    working_mpp: float = 0.5,
    min_area_um2: float = 8.0,
    max_area_um2: float = 250.0,
    min_distance_um: float = 2.5,
    threshold: float | None = None,
    tile_size: int = 2048,
    margin_um: float = 20.0,
    tile_cache: str | Path | None = None,
    overwrite: bool = False,
    show_progress_bar: bool = True,
) -> None:
    """Segment nuclei on an H&E image, tile by tile, and store them as polygons (and a label image).

    Tiles are read from the pyramid level closest to ``working_mpp`` (then resampled to it), overlap by
    ``margin_um``, and run in parallel with dask (threads, or the active ``dask.distributed`` client); only a few
    tiles are in memory at a time. A nucleus belongs to the tile that holds its centroid, so nuclei cut by tile
    borders are kept exactly once. Two checks of the image's microns per pixel warn when they look wrong: the blob
    scale of the nuclei on a few tissue patches before segmenting (too coarse), and the
    median nucleus area after (too fine).

    Methods
    -------
    - ``"classical"`` (default, offline): colour deconvolution to haematoxylin, one Otsu threshold estimated on
      tissue patches, a morphological clean-up, one seed per nucleus from a Laplacian-of-Gaussian blob filter, a
      watershed of the haematoxylin from the seeds that splits touching nuclei, and a local re-threshold of each
      nucleus (see :func:`segment_tile`).
    - a path to a model from :func:`scellst.im.train_segmenter` (or the model object): a U-Net predicting
      foreground and a distance map, separated by watershed; class-aware models add a ``class`` column.
    - ``"stardist"``, ``"cellpose"``, ``"instanseg"``: optional backends (install the matching extra) with a local
      ``weights`` path; nothing is downloaded.

    Parameters
    ----------
    sdata
        The SpatialData object (modified in place).
    image_key
        The H&E image; ``None`` for the only image.
    method
        Segmentation method (see above).
    weights
        Local weights of an optional backend.
    key_added
        Name of the nucleus shapes.
    labels_key_added
        Name of the label image (default ``f"{key_added}_labels"``); pass ``""`` to skip it.
    working_mpp
        Resolution the classical segmenter works at, in microns per pixel (a trained model uses its own). Images
        at a finer resolution are downsampled; coarser images are used as they are.
    min_area_um2, max_area_um2
        Accepted nucleus areas, in square microns, for every method (a trained model's post-processing drops the
        objects under ``min_area_um2`` too, whatever it was saved with).
    min_distance_um
        Minimal distance between two nucleus centres (classical method).
    threshold
        Haematoxylin threshold of the classical method; ``None`` estimates it on the image.
    tile_size
        Tile size in pixels of the level that is read.
    margin_um
        Overlap between tiles, in microns (larger than a nucleus).
    tile_cache
        A folder where each finished tile is kept; run again with the same folder (after Ctrl-C, a killed worker or
        process), the finished tiles are loaded instead of recomputed, with the same result. ``None``: no cache.
    overwrite
        Replace existing elements with the same names.
    show_progress_bar
        Show a progress bar over tiles.

    Returns
    -------
    Nothing; adds ``sdata.shapes[key_added]`` (polygons in the image's level-0 pixel frame, with the image's
    transformations, index ``cell_id`` from 1, columns ``area_um2`` and, for class-aware models, ``class``) and
    ``sdata.labels[labels_key_added]`` (label value = ``cell_id``), and records the source image in
    ``sdata.attrs['scellst']``.
    """
    import geopandas as gpd
    import pandas as pd
    from spatialdata.models import Labels2DModel, ShapesModel
    from spatialdata.transformations import get_transformation

    image_key = get_key(sdata, "images", image_key, what="H&E image")
    labels_key = f"{key_added}_labels" if labels_key_added is None else labels_key_added
    check_writable(sdata, key_added, overwrite=overwrite)
    if labels_key:
        check_writable(sdata, labels_key, overwrite=overwrite)
    if min_area_um2 <= 0 or max_area_um2 <= min_area_um2:
        raise ValueError("Need 0 < min_area_um2 < max_area_um2 (square microns).")
    mpp = get_microns_per_pixel(sdata, image_key)
    levels = _pyramid(sdata, image_key)
    arr0 = levels[0][0]
    check_rgb(arr0, image_key)
    _, h, w = arr0.shape
    if mpp > 2.0:
        logger.warning(
            f"{mpp:.2f} um/px is too coarse to delineate nuclei (about 5-10 um across); expect poor segmentation. "
            "Use a higher-resolution image, or check the microns per pixel."
        )
    # read at the level closest to 0.5 um/px from below (the check works at 0.5 um/px or coarser)
    scale_arr, scale_f = max(((a, f) for a, f in levels if mpp * f <= 0.505), key=lambda t: t[1], default=levels[0])
    _check_nucleus_scale(scale_arr, microns_per_pixel=mpp * scale_f, what=f"{image_key!r} ({mpp} um/px)")
    params = ClassicalParams(min_area_um2, max_area_um2, min_distance_um)
    segmenter = _make_segmenter(
        method, weights=weights, params=params, threshold=threshold, working_mpp=working_mpp, arr0=arr0, mpp=mpp
    )
    # downscale factor from level 0; a trained model also upsamples coarser images, so that nuclei have the size in
    # pixels it learnt (the classical method works in microns at any resolution, so it never upsamples)
    target = segmenter.working_mpp / mpp
    if isinstance(segmenter, ClassicalSegmenter) or target > 1:
        target = max(target, 1.0)
    elif target < 0.8:
        logger.info(
            f"The image ({mpp:.3f} um/px) is coarser than the model's working resolution "
            f"({segmenter.working_mpp} um/px); tiles are upsampled by {1 / target:.2f}."
        )
        tile_size = max(256, int(tile_size * target))  # the upsampled tile keeps about tile_size pixels a side
    else:
        target = 1.0  # within 25 %: not worth resampling
    arr, level_factor = max(((a, f) for a, f in levels if f <= max(target, 1.0) * 1.01), key=lambda t: t[1])
    residual = target / level_factor
    _, lh, lw = arr.shape
    margin = int(np.ceil(margin_um / (mpp * level_factor)))
    tiles = tile_grid(lh, lw, tile_size)
    calls = []
    for y0, y1, x0, x1 in tiles:
        py0, py1, px0, px1 = max(y0 - margin, 0), min(y1 + margin, lh), max(x0 - margin, 0), min(x1 + margin, lw)
        data = arr.data[:, py0:py1, px0:px1]
        # the core, in level-0 pixel-centre coordinates; working pixel j maps to (j + 0.5) * scale - 0.5 + offset
        core = tuple(v * level_factor - 0.5 for v in (y0, y1, x0, x1))
        to_level0 = (residual * level_factor, py0 * level_factor, px0 * level_factor)
        calls.append((f"y{y0}_x{x0}", (data, core, to_level0, residual, segmenter, params)))
    cache = None
    if tile_cache is not None:
        fingerprint = {
            "step": "segment_nuclei",
            "image": [image_key, list(arr0.shape), mpp],
            "segmenter": _describe_segmenter(method, segmenter),
            "params": asdict(params),
            "tiling": [tile_size, margin, level_factor, residual],
        }
        cache = TileCache(tile_cache, fingerprint, "polygons")
    logger.info(
        f"Segmenting nuclei on {image_key!r} ({w:,} x {h:,} px, {mpp:.3f} um/px) with {type(segmenter).__name__} "
        f"at {mpp * target:.2f} um/px (pyramid level x{level_factor:g}) in {len(tiles)} tiles"
    )
    results = run_tiles(_process_tile, calls, cache=cache, show_progress_bar=show_progress_bar, desc="segment_nuclei")
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
    if segmenter.class_names:
        names = ["unknown", *segmenter.class_names]
        codes = np.concatenate([np.asarray(res[2], dtype=int) for res in results])
        gdf["class"] = pd.Categorical([names[c] if 0 <= c < len(names) else "unknown" for c in codes])
    _check_nucleus_sizes(gdf, (h, w), min_area_um2, max_area_um2, what=f"{image_key!r} ({mpp} um/px)")
    transformations = get_transformation(sdata.images[image_key], get_all=True)
    shapes = ShapesModel.parse(gdf, transformations=transformations)
    if labels_key:  # the label image first: a run interrupted in between has no shapes and segments again
        labels = rasterize_nuclei(gdf, (h, w))
        labels_el = Labels2DModel.parse(labels, dims=("y", "x"), transformations=transformations)
        write_element(sdata, labels_key, labels_el, overwrite=overwrite, what="nucleus label image")
    record_attr(sdata, Attr.SHAPES_SOURCE, key_added, image_key)
    write_element(sdata, key_added, shapes, overwrite=overwrite, what=f"{len(polys):,} nuclei")


MIN_NUCLEI_FOR_SIZE_CHECK = 20


def _check_nucleus_sizes(
    gdf: gpd.GeoDataFrame, shape: tuple[int, int], min_area_um2: float, max_area_um2: float, *, what: str
) -> None:
    """Warn when the median nucleus area suggests a wrong microns per pixel.

    Nuclei cut by the image border are partial, so the median is taken over the others, and only when there are
    at least ``MIN_NUCLEI_FOR_SIZE_CHECK`` of them (a small patch says little).
    """
    h, w = shape
    b = gdf.bounds  # level-0 pixel-centre frame; the image spans -0.5 .. w - 0.5
    inner = (b["minx"] > 0.5) & (b["miny"] > 0.5) & (b["maxx"] < w - 1.5) & (b["maxy"] < h - 1.5)
    if inner.sum() < MIN_NUCLEI_FOR_SIZE_CHECK:
        return
    median_area = float(gdf.loc[inner, "area_um2"].median())
    if median_area < 2 * min_area_um2 or median_area > 0.5 * max_area_um2:
        logger.warning(
            f"The median nucleus area is {median_area:.1f} um2, unusual for H&E (typically 20-60 um2): check the "
            f"microns per pixel of {what}, then whether the segmentation method suits this tissue (a model trained "
            "on other tissue can draw nuclei too small or too large: fine-tune it, see `train_segmenter(init=...)`)."
        )
