"""Internal helpers: element look-up, physical scale, coordinate frames and safe writes."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ._constants import Attr
from ._logging import logger

if TYPE_CHECKING:
    import geopandas as gpd
    import xarray as xr
    from anndata import AnnData
    from spatialdata import SpatialData

ElementKind = Literal["images", "labels", "points", "shapes", "tables"]
_KINDS: tuple[ElementKind, ...] = ("images", "labels", "points", "shapes", "tables")


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one, else the machine's count)."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def all_element_names(sdata: SpatialData) -> list[str]:
    """Names of every element of every type."""
    names: list[str] = []
    for kind in _KINDS:
        names.extend(getattr(sdata, kind).keys())
    return names


def get_key(sdata: SpatialData, kind: ElementKind, key: str | None, *, what: str | None = None) -> str:
    """Resolve the key of an element of one type; ``None`` means the only element of that type.

    For images, ``None`` among several means the full-resolution H&E (``"he"``, or the only image with recorded
    microns per pixel), so that the output of :func:`scellst.io.visium` (``he``, ``he_hires``, ``he_lowres``) works
    without naming it.

    Raises a :class:`KeyError` that lists the available elements when the key does not exist or is ambiguous.
    """
    elements = getattr(sdata, kind)
    what = what or kind[:-1]
    if key is None:
        if len(elements) == 1:
            return next(iter(elements.keys()))
        if len(elements) == 0:
            raise KeyError(f"The SpatialData object has no {kind}; cannot find the {what}. Add one first.")
        if kind == "images":
            default = _default_image_key(sdata)
            if default is not None:
                return default
        raise KeyError(
            f"The SpatialData object has several {kind} ({', '.join(map(repr, elements.keys()))}); "
            f"pass the key of the {what} explicitly."
        )
    if key not in elements:
        available = ", ".join(map(repr, elements.keys())) or "none"
        raise KeyError(f"No {what} {key!r} in sdata.{kind}. Available {kind}: {available}.")
    return key


def _default_image_key(sdata: SpatialData) -> str | None:
    """The full-resolution H&E among several images.

    ``"he"`` (scellst's readers), else the only image whose microns per pixel are recorded, else ``None`` (ambiguous).
    """
    from ._constants import Key

    if Key.IMAGE in sdata.images:
        return Key.IMAGE
    recorded = [k for k in scellst_attrs(sdata).get(Attr.MICRONS_PER_PIXEL, {}) if k in sdata.images]
    return recorded[0] if len(recorded) == 1 else None


def source_image_key(sdata: SpatialData, shapes_key: str, image_key: str | None) -> str:
    """The H&E image of some shapes: ``image_key`` if given, else the image they were segmented from, else the only one."""
    if image_key is None:
        image_key = scellst_attrs(sdata).get(Attr.SHAPES_SOURCE, {}).get(shapes_key)
    return get_key(sdata, "images", image_key, what="H&E image")


def scellst_attrs(sdata: SpatialData) -> dict[str, Any]:
    """The ``sdata.attrs['scellst']`` dictionary, created if missing."""
    root = sdata.attrs.get(Attr.ROOT)
    if root is None:
        root = {}
        sdata.attrs[Attr.ROOT] = root
    return root


def record_attr(sdata: SpatialData, section: str, key: str, value: Any) -> None:
    """Record ``value`` under ``sdata.attrs['scellst'][section][key]`` and persist it if the object is backed."""
    root = scellst_attrs(sdata)
    sec = dict(root.get(section, {}))
    sec[key] = value
    root[section] = sec
    if sdata.is_backed():
        sdata.write_attrs()


def set_microns_per_pixel(sdata: SpatialData, image_key: str | None = None, *, microns_per_pixel: float) -> None:
    """Record the physical pixel size of an image (level 0) in ``sdata.attrs['scellst']``.

    Parameters
    ----------
    sdata
        The SpatialData object.
    image_key
        The image; ``None`` for the only image.
    microns_per_pixel
        Size of one full-resolution pixel in microns (e.g. ``0.5`` for a 20x scan).
    """
    image_key = get_key(sdata, "images", image_key, what="image")
    mpp = float(microns_per_pixel)
    if not np.isfinite(mpp) or mpp <= 0:
        raise ValueError(f"`microns_per_pixel` must be a positive number, got {microns_per_pixel!r}.")
    if mpp > 20:
        raise ValueError(
            f"`microns_per_pixel`={mpp} is implausibly large for an H&E image (expected about 0.1-5 um per pixel). "
            "Pass the size of one full-resolution pixel in microns."
        )
    record_attr(sdata, Attr.MICRONS_PER_PIXEL, image_key, mpp)


def get_microns_per_pixel(sdata: SpatialData, image_key: str) -> float:
    """The recorded physical size of a level-0 pixel of ``image_key``, with a helpful error when it is missing.

    Parameters
    ----------
    sdata
        The SpatialData object.
    image_key
        The image.

    Returns
    -------
    Microns per full-resolution pixel (set by the scellst readers or :func:`scellst.io.set_microns_per_pixel`).
    """
    value = scellst_attrs(sdata).get(Attr.MICRONS_PER_PIXEL, {}).get(image_key)
    if value is None:
        raise ValueError(
            f"The microns per pixel of image {image_key!r} are unknown, and scellst expresses every size in microns. "
            f"Record them with `scellst.io.set_microns_per_pixel(sdata, {image_key!r}, microns_per_pixel=...)` "
            "(about 0.25 at 40x, 0.5 at 20x), or read the data with a scellst reader that derives them."
        )
    return float(value)


def image_level0(sdata: SpatialData, image_key: str) -> xr.DataArray:
    """The full-resolution level of an image as a lazy ``(c, y, x)`` DataArray (nothing is read).

    Parameters
    ----------
    sdata
        The SpatialData object.
    image_key
        The image (a single-scale image or a multiscale pyramid).

    Returns
    -------
    The level-0 array, backed by dask: read tiles of it with ``.isel(y=..., x=...)``.
    """
    import xarray as xr

    img = sdata.images[image_key]
    if isinstance(img, xr.DataTree):
        first = sorted(img.children)[0]
        arr = next(iter(img[first].ds.data_vars.values()))
    else:
        arr = img
    if tuple(arr.dims) != ("c", "y", "x"):
        raise ValueError(f"Image {image_key!r} has dims {arr.dims}; scellst expects a 2D (c, y, x) image.")
    return arr


def image_rgb_tile(arr: xr.DataArray, y0: int, y1: int | None, x0: int, x1: int | None) -> np.ndarray:
    """Read one tile of a lazy (c, y, x) image as ``(y, x, 3)`` uint8 RGB."""
    data = arr.data[:, y0:y1, x0:x1]
    if hasattr(data, "compute"):
        data = data.compute()
    return to_rgb_uint8(np.asarray(data))


def to_rgb_uint8(chw: np.ndarray) -> np.ndarray:
    """Convert a ``(c, y, x)`` array (uint8, uint16 or float) to ``(y, x, 3)`` uint8 RGB."""
    tile = np.moveaxis(np.asarray(chw), 0, -1)
    if tile.shape[-1] == 4:
        tile = tile[..., :3]
    elif tile.shape[-1] == 1:
        tile = np.repeat(tile, 3, axis=-1)
    elif tile.shape[-1] != 3:
        raise ValueError(f"Expected an RGB image with 3 channels, got {tile.shape[-1]} channels.")
    if tile.dtype != np.uint8:
        if np.issubdtype(tile.dtype, np.floating) and np.nanmax(tile, initial=0) <= 1.0:
            tile = tile * 255.0
        elif tile.dtype == np.uint16:
            tile = tile / 257.0
        tile = np.clip(tile, 0, 255).astype(np.uint8)
    return tile


def affine_to_cs(element: Any, coordinate_system: str) -> np.ndarray:
    """3x3 affine matrix (x, y) mapping an element's intrinsic frame into ``coordinate_system``."""
    from spatialdata.transformations import get_transformation

    tr = get_transformation(element, to_coordinate_system=coordinate_system)
    return np.asarray(tr.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=float)


def shared_coordinate_system(sdata: SpatialData, key_a: str, key_b: str) -> str:
    """A coordinate system that both elements are registered in (``global`` preferred)."""
    from spatialdata.transformations import get_transformation

    cs_a = set(get_transformation(sdata[key_a], get_all=True))
    cs_b = set(get_transformation(sdata[key_b], get_all=True))
    shared = cs_a & cs_b
    if not shared:
        raise ValueError(
            f"Elements {key_a!r} (coordinate systems {sorted(cs_a)}) and {key_b!r} ({sorted(cs_b)}) share no "
            "coordinate system, so their positions cannot be compared. Register them in a common one with "
            "`spatialdata.transformations.set_transformation`."
        )
    for preferred in ("global", *sorted(shared)):
        if preferred in shared:
            return preferred
    raise AssertionError("unreachable")


def intrinsic_to_intrinsic(sdata: SpatialData, src_key: str, dst_key: str) -> np.ndarray:
    """3x3 affine mapping (x, y) in the intrinsic frame of ``src_key`` into the intrinsic frame of ``dst_key``."""
    cs = shared_coordinate_system(sdata, src_key, dst_key)
    a_src = affine_to_cs(sdata[src_key], cs)
    a_dst = affine_to_cs(sdata[dst_key], cs)
    return np.linalg.inv(a_dst) @ a_src


def apply_affine(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Apply a 3x3 affine to an ``(n, 2)`` array of (x, y)."""
    xy = np.asarray(xy, dtype=float)
    return xy @ matrix[:2, :2].T + matrix[:2, 2]


def affine_scale(matrix: np.ndarray) -> float:
    """Isotropic scale factor of an affine (geometric mean of the singular values)."""
    return float(np.sqrt(abs(np.linalg.det(matrix[:2, :2]))))


def shapes_centroids(gdf: gpd.GeoDataFrame) -> np.ndarray:
    """``(n, 2)`` centroids (x, y) of points or polygons in their intrinsic frame."""
    geom = gdf.geometry
    if len(geom) == 0:
        return np.zeros((0, 2))
    if (geom.geom_type == "Point").all():
        return np.column_stack([geom.x.to_numpy(), geom.y.to_numpy()])
    c = geom.centroid
    return np.column_stack([c.x.to_numpy(), c.y.to_numpy()])


def check_writable(sdata: SpatialData, key: str, *, overwrite: bool) -> None:
    """Refuse to replace an existing element unless ``overwrite=True``."""
    if key in all_element_names(sdata) and not overwrite:
        raise ValueError(
            f"An element named {key!r} already exists in the SpatialData object. Pass `overwrite=True` to replace "
            "it, or choose another name with `key_added`."
        )


@contextmanager
def quiet_zarr():
    """Silence zarr's notice that sharding will become the default (once per element written otherwise)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autosharding.*", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*sharding.*", category=UserWarning)
        yield


def write_element(sdata: SpatialData, key: str, element: Any, *, overwrite: bool, what: str) -> None:
    """Add an element in place (and to disk for a backed object), refusing silent overwrites.

    On a backed object every element is written atomically: under a temporary name first, then renamed into place
    (swapped with the old version when there is one), so a failed or killed write never leaves a half-written
    element, and never loses the old one.
    """
    check_writable(sdata, key, overwrite=overwrite)
    with quiet_zarr():
        if sdata.is_backed():
            _replace_on_disk(sdata, key, element)
        else:
            if key in all_element_names(sdata):
                del sdata[key]
            sdata[key] = element
    logger.info(f"Added {what} to sdata[{key!r}]")


def _replace_on_disk(sdata: SpatialData, key: str, element: Any) -> None:
    """Write ``element`` as ``key`` of a backed store: whole, and without deleting the old version before the new is whole."""
    import shutil

    tmp = f"{key}_scellst_partial"
    if tmp in all_element_names(sdata):
        del sdata[tmp]
    sdata[tmp] = element
    kind = next(k for k in _KINDS if tmp in getattr(sdata, k))
    folder = Path(sdata.path) / kind
    if (folder / tmp).exists():  # left over by a killed write
        shutil.rmtree(folder / tmp)
    try:
        sdata.write_element(tmp)
    except BaseException:
        del sdata[tmp]
        shutil.rmtree(folder / tmp, ignore_errors=True)
        if sdata.has_consolidated_metadata():
            sdata.write_consolidated_metadata()
        raise
    old = folder / f".{key}.replaced"
    if old.exists():
        shutil.rmtree(old)
    if (folder / key).exists():
        (folder / key).rename(old)
    (folder / tmp).rename(folder / key)
    shutil.rmtree(old, ignore_errors=True)
    del sdata[tmp]
    if key in all_element_names(sdata):
        del sdata[key]
    sdata[key] = element
    if kind == "labels":
        _rename_label(folder, tmp, key)
    if sdata.has_consolidated_metadata():
        sdata.write_consolidated_metadata()


def _rename_label(folder: Path, tmp: str, key: str) -> None:
    """In the OME-Zarr list of labels of a store, ``tmp`` (a temporary name) becomes ``key``."""
    import json

    for meta in (folder / "zarr.json", folder / ".zattrs"):
        if not meta.exists():
            continue
        doc = json.loads(meta.read_text())
        attrs = doc.get("attributes", doc)
        for holder in (attrs, attrs.get("ome", {})):
            if isinstance(holder, dict) and isinstance(holder.get("labels"), list) and tmp in holder["labels"]:
                names = [n for n in holder["labels"] if n != tmp]
                holder["labels"] = names if key in names else [*names, key]
                meta.write_text(json.dumps(doc, indent=2))


def _elements_on_disk(sdata: SpatialData) -> set[str]:
    try:
        return {name.split("/")[-1] for name in sdata.elements_paths_on_disk()}
    except (AttributeError, ValueError, OSError):
        return set()


def provenance(params: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """A zarr-serialisable provenance record for ``table.uns['scellst']``."""
    from . import __version__

    out: dict[str, Any] = {"version": __version__}
    out.update({k: _serialisable(v) for k, v in params.items()})
    out.update({k: _serialisable(v) for k, v in extra.items()})
    return out


def _serialisable(value: Any) -> Any:
    if value is None:
        return "None"
    if isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _serialisable(v) for k, v in value.items()}
    if isinstance(value, Iterable):
        return [_serialisable(v) for v in value]
    return str(value)


def tile_grid(height: int, width: int, tile_size: int) -> list[tuple[int, int, int, int]]:
    """Core tiles ``(y0, y1, x0, x1)`` covering an image."""
    tiles = []
    for y0 in range(0, height, tile_size):
        for x0 in range(0, width, tile_size):
            tiles.append((y0, min(y0 + tile_size, height), x0, min(x0 + tile_size, width)))
    return tiles


def as_list(x: Any) -> list:
    """Wrap a single object in a list."""
    if isinstance(x, list | tuple):
        return list(x)
    return [x]


def instance_ids(table: AnnData) -> np.ndarray:
    """The instance-key column of a SpatialData table, as strings."""
    key = table.uns["spatialdata_attrs"]["instance_key"]
    return table.obs[key].astype(str).to_numpy()


def persist(sdata: SpatialData, key: str) -> None:
    """Rewrite an element that scellst modified in place (new columns) to disk when the object is backed."""
    if sdata.is_backed() and key in _elements_on_disk(sdata):
        with quiet_zarr():
            _replace_on_disk(sdata, key, sdata[key])


def resample_rgb(rgb: np.ndarray, factor: float) -> np.ndarray:
    """Resample an RGB image by ``1 / factor`` (``factor > 1`` downscales).

    Integer factors take block means (``ceil(size / factor)`` pixels along each axis; a partial last block is
    completed with copies of its edge pixels); other downscaling is anti-aliased (a triangle filter as wide as the factor) and
    upsampling (``factor < 1``) bilinear, to ``round(size / factor)`` pixels.
    """
    if abs(factor - 1) < 1e-3:
        return rgb
    if abs(factor - round(factor)) < 1e-3:
        k = int(round(factor))
        h, w = rgb.shape[:2]
        # a partial last block is padded with its own edge pixels (zeros would darken it into a false nucleus)
        padded = np.pad(rgb, ((0, -h % k), (0, -w % k), (0, 0)), mode="edge") if h % k or w % k else rgb
        if padded.dtype == np.uint8 and k * k * 255 < 2**24:
            # the block sums of uint8 values as integers, then the float32 division of a float32 mean: the same
            # values as below (sums of integers are exact in float32), without a float copy of the whole tile
            total = np.zeros((padded.shape[0] // k, padded.shape[1] // k, padded.shape[2]), dtype=np.uint32)
            for i in range(k):
                for j in range(k):
                    total += padded[i::k, j::k]
            out = total.astype(np.float32) / np.float32(k * k)
        else:
            padded = padded.astype(np.float32)
            out = padded.reshape(padded.shape[0] // k, k, padded.shape[1] // k, k, -1).mean(axis=(1, 3))
        return np.clip(np.round(out), 0, 255).astype(np.uint8)
    import torch

    h, w = rgb.shape[:2]
    size = (max(int(round(h / factor)), 1), max(int(round(w / factor)), 1))
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(rgb, -1, 0), dtype=np.float32))[None]
    # torch's anti-aliased resize: about 10x faster than skimage's Gaussian + warp on 2 cores
    y = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=factor > 1, align_corners=False)
    return y[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def resample_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resampling of a label image to ``shape``."""
    if labels.shape == tuple(shape):
        return labels
    ys = np.minimum((np.arange(shape[0]) + 0.5) * labels.shape[0] / shape[0], labels.shape[0] - 1).astype(int)
    xs = np.minimum((np.arange(shape[1]) + 0.5) * labels.shape[1] / shape[1], labels.shape[1] - 1).astype(int)
    return labels[np.ix_(ys, xs)]


def shapes_microns_per_unit(sdata: SpatialData, shapes_key: str, image_key: str | None = None) -> float:
    """Microns per coordinate unit of a shapes element: recorded at import, or through its image."""
    recorded = scellst_attrs(sdata).get(Attr.MICRONS_PER_PIXEL, {}).get(shapes_key)
    if recorded is not None and image_key is None:
        return float(recorded)
    if len(sdata.images) == 0:
        raise ValueError(
            f"The microns per pixel of {shapes_key!r} are unknown: import the outlines with "
            "`io.read_nuclei(..., microns_per_pixel=...)`, or add their H&E image."
        )
    image_key = source_image_key(sdata, shapes_key, image_key)
    return get_microns_per_pixel(sdata, image_key) * affine_scale(intrinsic_to_intrinsic(sdata, shapes_key, image_key))
