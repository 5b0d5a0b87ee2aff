"""Training tiles for :func:`scellst.im.train_segmenter` from nucleus outlines registered to an H&E image."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .._logging import logger
from .._utils import (
    get_key,
    get_microns_per_pixel,
    image_level0,
    image_rgb_tile,
    instance_ids,
    intrinsic_to_intrinsic,
    source_image_key,
)

if TYPE_CHECKING:
    from spatialdata import SpatialData


def segmentation_tiles(
    sdata: SpatialData,
    shapes_key: str,
    *,
    image_key: str | None = None,
    class_key: str | None = None,
    table_key: str | None = None,
    tile_um: float = 128.0,
    max_tiles: int | None = 64,
    min_nuclei: int = 10,
    region: tuple[float, float, float, float] | None = None,
    max_shift_um: float | None = 3.0,
    seed: int = 0,
    show_progress_bar: bool = True,
) -> dict[str, Any]:
    """Cut H&E tiles and their nucleus masks from outlines registered to the image, to train a segmenter.

    This trains H&E segmentation (and classification) from spatial transcriptomics: Xenium nucleus boundaries read
    with :func:`scellst.io.xenium` together with the H&E of the same section share its coordinate system, and their
    cell types (from the Xenium expression) become nucleus classes. Any outlines work: imported with
    :func:`scellst.io.read_nuclei` (QuPath, CellViT, HoVer-Net, label images) or circles.

    The outlines are mapped into the image's pixels through the coordinate system they share. Square tiles of
    ``tile_um`` microns are laid on a grid over ``region`` (default: the box around the outlines, since tissue
    outside the annotated area would teach the model to miss nuclei); tiles with at least ``min_nuclei`` nucleus
    centres are kept, at most ``max_tiles`` of them drawn at random. Each tile is read at full resolution from the
    lazy image, so memory stays at the size of the tiles.

    Registration is checked, and mended, tile by tile: the outlines are matched to the haematoxylin of the image
    (cross-correlation of the mask with the stain, within ``max_shift_um``) and, where they are off by 0.5 um or
    more, drawn at the matching place. The registration of a Xenium H&E is often a few microns off, and varies
    across the section; a nucleus is 5-10 um across, so masks off by that much teach the wrong pixels.

    Parameters
    ----------
    sdata
        SpatialData with the H&E image and the nucleus outlines.
    shapes_key
        The nucleus shapes (polygons, or circles with a ``radius`` column).
    image_key
        The H&E image; default: the image the shapes were segmented from or imported for, else the only image.
    class_key
        Nucleus class: a column of the shapes, or of a table annotating them (matched on its instance key, e.g.
        Xenium cell types in ``obs`` keyed by ``cell_id``). Nuclei without a class (missing value) still train the
        outlines but not the classes.
    table_key
        The table that holds ``class_key`` when it is not a column of the shapes; default: the tables are searched.
    tile_um
        Side of a tile in microns.
    max_tiles
        At most this many tiles (drawn at random with ``seed``); ``None``: all that qualify.
    min_nuclei
        Fewest nucleus centres in a tile for it to be kept.
    region
        ``(x0, y0, x1, y1)`` in the image's full-resolution pixels: tiles are taken inside it, e.g. one part of a
        section for training and another to test the model.
    max_shift_um
        Largest registration error looked for and mended in each tile, in microns; ``None`` or 0: use the
        outlines where they are. Shifts are logged (median and 90th percentile); when many tiles reach this
        limit, a warning says to check the registration.
    seed
        Random seed of the tile draw.
    show_progress_bar
        Show a progress bar while reading the tiles.

    Returns
    -------
    The keyword arguments of :func:`scellst.im.train_segmenter`: ``images`` (RGB uint8 tiles), ``masks`` (instance
    labels), ``microns_per_pixel``, and with ``class_key`` ``classes`` (class per pixel, 0 background or no class)
    and ``class_names``; use ``scellst.im.train_segmenter(**tiles, out=...)``.

    Examples
    --------
    >>> sdata = scellst.io.xenium("xenium_out", he_image="he.ome.tif", alignment="he_imagealignment.csv")
    >>> tiles = scellst.im.segmentation_tiles(sdata, "xenium_nuclei", image_key="he")
    >>> model = scellst.im.train_segmenter(**tiles, out="he_from_xenium.pt")
    """
    grid = _outline_tiles(
        sdata,
        shapes_key,
        image_key=image_key,
        tile_um=tile_um,
        min_nuclei=min_nuclei,
        region=region,
        max_tiles=max_tiles,
        seed=seed,
    )
    codes, class_names = _class_codes(sdata, grid.shapes_key, sdata.shapes[grid.shapes_key], class_key, table_key)
    max_px = _max_shift_px(max_shift_um, grid.mpp)
    images, masks, classes, shifts = [], [], [], []
    for ty0, tx0 in tqdm(grid.origins, desc="segmentation_tiles", disable=not show_progress_bar):
        image = grid.image(ty0, tx0)
        mask = grid.mask(ty0, tx0)
        if max_px > 0:
            dy, dx = registration_shift(image, mask, max_px=max_px, microns_per_pixel=grid.mpp)
            shifts.append((dy, dx))
            if np.hypot(dy, dx) * grid.mpp >= 0.5:  # draw the outlines where the nuclei are
                mask = grid.mask(ty0 - dy, tx0 - dx)
        images.append(image)
        masks.append(mask)
        if codes is not None:
            classes.append(np.where(mask > 0, codes[np.maximum(mask - 1, 0)], 0))
    if shifts:
        _report_shifts(np.asarray(shifts), mpp=grid.mpp, max_px=max_px, mended=True)
    logger.info(
        f"Cut {len(images)} tiles of {tile_um:g} um ({grid.side} px) from {grid.image_key!r} with "
        f"{int(grid.n_nuclei.sum()):,} nuclei of {grid.shapes_key!r}"
        + (f" in {len(class_names)} classes" if class_names else "")
    )
    return {
        "images": images,
        "masks": masks,
        "microns_per_pixel": [grid.mpp] * len(images),
        "classes": classes if codes is not None else None,
        "class_names": class_names,
    }


def registration_shifts(
    sdata: SpatialData,
    shapes_key: str,
    *,
    image_key: str | None = None,
    tile_um: float = 256.0,
    max_shift_um: float = 10.0,
    min_nuclei: int = 20,
    region: tuple[float, float, float, float] | None = None,
    max_tiles: int | None = None,
    seed: int = 0,
    show_progress_bar: bool = True,
) -> pd.DataFrame:
    """How far nucleus outlines registered to an H&E sit from its nuclei, tile by tile, across the section.

    A check of the registration of an H&E with Xenium (or any outlines in a coordinate system shared with the
    image) before comparing cells one to one (:func:`scellst.bench.compare_xenium`) or training on the outlines
    (:func:`segmentation_tiles`). In each tile the nucleus mask drawn from the outlines is cross-correlated with
    the haematoxylin of the image; the best match within ``max_shift_um`` is the local registration error.

    Parameters
    ----------
    sdata
        SpatialData with the H&E image and the nucleus outlines.
    shapes_key
        The nucleus shapes (polygons, or circles with a ``radius``), e.g. Xenium nucleus boundaries.
    image_key
        The H&E image; default: the image the shapes were segmented from or imported for, else the only image.
    tile_um
        Side of a tile in microns.
    max_shift_um
        Largest error looked for, in microns.
    min_nuclei
        Fewest nucleus centres in a tile for it to be measured.
    region
        ``(x0, y0, x1, y1)`` in the image's full-resolution pixels; default: the box around the outlines.
    max_tiles
        At most this many tiles (drawn at random with ``seed``); ``None``: every tile.
    seed
        Random seed of the tile draw.
    show_progress_bar
        Show a progress bar.

    Returns
    -------
    One row per tile: ``x``, ``y`` (its centre, in the image's full-resolution pixels), ``dx_um``, ``dy_um`` (how
    far to move the outlines to put them on the nuclei, along the image's x and y), ``shift_um`` (the length),
    ``n_nuclei``, and ``at_limit`` (the best match is at ``max_shift_um``: the error may be larger). The median and
    90th percentile of ``shift_um`` are logged, and a warning is given when many tiles are at the limit.

    Examples
    --------
    >>> shifts = scellst.im.registration_shifts(xs, "xenium_nuclei", image_key="he")
    >>> shifts.plot.scatter("x", "y", c="shift_um")  # where the registration is off
    """
    grid = _outline_tiles(
        sdata,
        shapes_key,
        image_key=image_key,
        tile_um=tile_um,
        min_nuclei=min_nuclei,
        region=region,
        max_tiles=max_tiles,
        seed=seed,
    )
    max_px = _max_shift_px(max_shift_um, grid.mpp)
    if max_px < 1:
        raise ValueError(f"`max_shift_um` ({max_shift_um}) is under one pixel ({grid.mpp:g} um).")
    shifts = np.array(
        [
            registration_shift(grid.image(y0, x0), grid.mask(y0, x0), max_px=max_px, microns_per_pixel=grid.mpp)
            for y0, x0 in tqdm(grid.origins, desc="registration_shifts", disable=not show_progress_bar)
        ]
    ).reshape(-1, 2)
    _report_shifts(shifts, mpp=grid.mpp, max_px=max_px, mended=False)
    origins = np.asarray(grid.origins, dtype=float).reshape(-1, 2)
    dy, dx = shifts[:, 0] * grid.mpp, shifts[:, 1] * grid.mpp
    return pd.DataFrame(
        {
            "x": origins[:, 1] + grid.side / 2,
            "y": origins[:, 0] + grid.side / 2,
            "dx_um": dx,
            "dy_um": dy,
            "shift_um": np.hypot(dx, dy),
            "n_nuclei": grid.n_nuclei,
            "at_limit": np.abs(shifts).max(axis=1) >= max_px,
        }
    )


@dataclass
class _OutlineTiles:
    """Nucleus outlines mapped into an image's full-resolution pixels, and the square tiles chosen over them."""

    shapes_key: str
    image_key: str
    arr: Any  # lazy (c, y, x) level 0
    mpp: float
    geoms: np.ndarray  # polygons in image pixels (x, y)
    tree: Any  # STRtree of geoms
    side: int  # tile side, pixels
    origins: list[tuple[int, int]]  # (y0, x0) of each tile
    n_nuclei: np.ndarray  # nucleus centres in each tile

    def __post_init__(self) -> None:
        self._ids = np.arange(1, len(self.geoms) + 1, dtype=np.uint32)  # mask values, in the order of the shapes

    def image(self, y0: int, x0: int) -> np.ndarray:
        """The RGB tile at ``(y0, x0)``."""
        return image_rgb_tile(self.arr, y0, y0 + self.side, x0, x0 + self.side)

    def mask(self, y0: int, x0: int) -> np.ndarray:
        """Instance labels (1.. in the order of the shapes) of the outlines in the window at ``(y0, x0)``."""
        from ._segment import render_polygons

        window = (y0, y0 + self.side, x0, x0 + self.side)
        return render_polygons(self.geoms, self._ids, self.tree, window).astype(np.int32)


def _outline_tiles(
    sdata: SpatialData,
    shapes_key: str,
    *,
    image_key: str | None,
    tile_um: float,
    min_nuclei: int,
    region: tuple[float, float, float, float] | None,
    max_tiles: int | None,
    seed: int,
) -> _OutlineTiles:
    """Map the outlines into the image's pixels and lay the tiles (see :func:`segmentation_tiles`)."""
    import shapely

    shapes_key = get_key(sdata, "shapes", shapes_key, what="nucleus shapes")
    image_key = source_image_key(sdata, shapes_key, image_key)
    if tile_um <= 0:
        raise ValueError(f"`tile_um` must be > 0 (microns), got {tile_um}.")
    if max_tiles is not None and max_tiles < 1:
        raise ValueError(f"`max_tiles` must be >= 1 or None, got {max_tiles}.")
    gdf = sdata.shapes[shapes_key]
    if len(gdf) == 0:
        raise ValueError(f"Shapes {shapes_key!r} are empty: there is no nucleus outline.")
    mpp = get_microns_per_pixel(sdata, image_key)
    arr = image_level0(sdata, image_key)
    _, h, w = arr.shape

    geoms = gdf.geometry.to_numpy()
    kinds = set(shapely.get_type_id(geoms).tolist())
    if kinds <= {0}:  # circles (points with a radius, as spatialdata requires)
        geoms = shapely.buffer(geoms, gdf["radius"].to_numpy(dtype=float), quad_segs=8)
    elif not kinds <= {3, 6}:
        raise ValueError(f"Shapes {shapes_key!r} must be nucleus polygons or circles (found geometry types {kinds}).")
    if 6 in kinds:  # a multipolygon: its largest part
        geoms = np.array(
            [max(g.geoms, key=lambda p: p.area) if g.geom_type == "MultiPolygon" else g for g in geoms], dtype=object
        )
    m = intrinsic_to_intrinsic(sdata, shapes_key, image_key)  # shapes' frame -> image pixels (x, y)
    geoms = shapely.transform(geoms, lambda xy: xy @ m[:2, :2].T + m[:2, 2])
    centres = shapely.get_coordinates(shapely.centroid(geoms))
    inside = (centres[:, 0] >= 0) & (centres[:, 0] < w) & (centres[:, 1] >= 0) & (centres[:, 1] < h)
    if inside.mean() < 0.5:
        raise ValueError(
            f"{(~inside).sum():,} of {len(geoms):,} nuclei of {shapes_key!r} fall outside image {image_key!r} "
            f"({w:,} x {h:,} px) once mapped into its pixels: check the registration (e.g. the alignment matrix of "
            "`scellst.io.xenium`) and the coordinate systems of both."
        )

    side = max(int(round(tile_um / mpp)), 16)
    if region is None:
        x0, y0 = np.floor(centres[inside].min(axis=0)).astype(int)
        x1, y1 = np.ceil(centres[inside].max(axis=0)).astype(int) + 1
    else:
        x0, y0, x1, y1 = (int(round(v)) for v in region)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    ny, nx = (y1 - y0) // side, (x1 - x0) // side
    if ny < 1 or nx < 1:
        raise ValueError(
            f"The region ({x1 - x0} x {y1 - y0} px) is smaller than one tile of {tile_um} um ({side} px): lower "
            "`tile_um` or widen `region`."
        )
    ty = np.floor((centres[:, 1] - y0) / side).astype(int)
    tx = np.floor((centres[:, 0] - x0) / side).astype(int)
    ok = (ty >= 0) & (ty < ny) & (tx >= 0) & (tx < nx)
    counts = np.bincount(ty[ok] * nx + tx[ok], minlength=ny * nx)
    chosen = np.flatnonzero(counts >= min_nuclei)
    if len(chosen) == 0:
        raise ValueError(
            f"No tile of {tile_um} um holds {min_nuclei} nuclei (most in one tile: {counts.max()}): lower "
            "`min_nuclei`, or check that the outlines cover the tissue of the image."
        )
    if max_tiles is not None and len(chosen) > max_tiles:
        chosen = np.sort(np.random.default_rng(seed).choice(chosen, size=max_tiles, replace=False))
    origins = [(int(y0 + (t // nx) * side), int(x0 + (t % nx) * side)) for t in chosen]
    return _OutlineTiles(shapes_key, image_key, arr, mpp, geoms, shapely.STRtree(geoms), side, origins, counts[chosen])


def _max_shift_px(max_shift_um: float | None, mpp: float) -> int:
    if max_shift_um is not None and max_shift_um < 0:
        raise ValueError(f"`max_shift_um` must be >= 0 (microns) or None, got {max_shift_um}.")
    return int(round((max_shift_um or 0) / mpp))


def registration_shift(
    image: np.ndarray, mask: np.ndarray, *, max_px: int, microns_per_pixel: float
) -> tuple[int, int]:
    """Shift ``(dy, dx)`` in pixels that moves the nuclei of ``mask`` onto the haematoxylin of ``image``.

    The maximum, within ``max_px`` in each direction, of the cross-correlation between the nucleus mask and the
    (lightly smoothed) haematoxylin channel, both centred and zero-padded (FFT). Recovers known shifts to within a
    pixel on MoNuSeg's manual outlines.
    """
    from scipy import ndimage as ndi

    from ._segment import _hematoxylin

    hema = ndi.gaussian_filter(_hematoxylin(image), max(0.5 / microns_per_pixel, 0.5))
    fg = (mask > 0).astype(np.float32)
    if fg.sum() == 0:
        return 0, 0
    pad = ((max_px, max_px), (max_px, max_px))
    a = np.pad(hema - hema.mean(), pad)
    b = np.pad(fg - fg.mean(), pad)
    cc = np.fft.irfft2(np.fft.rfft2(a) * np.conj(np.fft.rfft2(b)), s=a.shape)  # cc[d] = sum a(x + d) b(x)
    idx = np.r_[0 : max_px + 1, -max_px:0]  # shifts 0..max_px, then -max_px..-1 (FFT order)
    window = cc[np.ix_(idx, idx)]
    iy, ix = np.unravel_index(int(np.argmax(window)), window.shape)
    return int(idx[iy]), int(idx[ix])


def _report_shifts(shifts: np.ndarray, *, mpp: float, max_px: int, mended: bool) -> None:
    """Log the registration shifts found in the tiles; warn when many reach the search limit."""
    length = np.hypot(shifts[:, 0], shifts[:, 1]) * mpp
    at_limit = float(np.mean(np.abs(shifts).max(axis=1) >= max_px))
    logger.info(
        f"Registration of the outlines to the image: shift median {np.median(length):.2f} um, 90th percentile "
        f"{np.quantile(length, 0.9):.2f} um ({np.mean(length >= 0.5):.0%} of the tiles off by 0.5 um or more"
        + (", mended)" if mended else ")")
    )
    if at_limit > 0.25:
        logger.warning(
            f"In {at_limit:.0%} of the tiles the outlines match the nuclei best at the edge of the search "
            f"(`max_shift_um` = {max_px * mpp:.1f} um): the registration is further off than that. Check it (e.g. "
            "overlay the outlines on the H&E with spatialdata-plot), or raise `max_shift_um`."
        )


def _class_codes(
    sdata: SpatialData, shapes_key: str, gdf, class_key: str | None, table_key: str | None
) -> tuple[np.ndarray | None, list[str] | None]:
    """Class of each nucleus as codes 1..K (0: none) in the order of the shapes, and the K class names."""
    if class_key is None:
        return None, None
    if class_key in gdf.columns and table_key is None:
        values = gdf[class_key]
    else:
        keys = [table_key] if table_key is not None else list(sdata.tables.keys())
        for key in keys:
            get_key(sdata, "tables", key)
            table = sdata.tables[key]
            if class_key in table.obs:
                break
        else:
            raise KeyError(
                f"`class_key` {class_key!r} is neither a column of shapes {shapes_key!r} nor of the obs of "
                f"{'table ' + repr(table_key) if table_key else 'any table'}."
            )
        by_id = pd.Series(table.obs[class_key].to_numpy(), index=instance_ids(table).astype(str))
        by_id = by_id[~by_id.index.duplicated()]
        values = by_id.reindex(gdf.index.astype(str))
        if values.notna().sum() == 0:
            raise ValueError(
                f"No nucleus of {shapes_key!r} matches a row of table {key!r} by its instance key: are the "
                "shapes' index and the table's instance ids the same cells?"
            )
    values = pd.Series(values.to_numpy(), dtype="category")
    names = [str(c) for c in values.cat.categories]
    if not names:
        raise ValueError(f"`class_key` {class_key!r} has no values.")
    n_missing = int(values.isna().sum())
    if n_missing:
        logger.info(f"{n_missing:,} nuclei have no {class_key!r}: they train the outlines, not the classes")
    return (values.cat.codes.to_numpy() + 1).astype(np.int64), names
