"""Cell crops: fixed physical size squares around each nucleus, read lazily tile by tile, and stain normalisation."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._constants import Key
from .._logging import logger
from .._utils import (
    apply_affine,
    get_key,
    get_microns_per_pixel,
    intrinsic_to_intrinsic,
    shapes_centroids,
    source_image_key,
    to_rgb_uint8,
)

if TYPE_CHECKING:
    from spatialdata import SpatialData

StainNormMode = Literal["slide", "macenko", "imagenet", "none"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Reference H&E stain vectors (optical density, columns H and E) and 99th-percentile concentrations used by Macenko
# normalisation to map every slide onto one appearance.
_HE_REF = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
_MAX_C_REF = np.array([1.9705, 1.0308])


def crops_from_tile(
    rgb: np.ndarray, centres_yx: np.ndarray, *, side_px: float, out_px: int, fill: int = 255
) -> np.ndarray:
    """Resample squares of ``side_px`` (tile pixels) centred on ``centres_yx`` to ``(n, 3, out_px, out_px)`` uint8.

    Bilinear sampling with a Gaussian pre-filter when shrinking; outside the tile the crop is ``fill`` (white glass).
    """
    from scipy.ndimage import gaussian_filter, map_coordinates

    n = len(centres_yx)
    if n == 0:
        return np.zeros((0, 3, out_px, out_px), dtype=np.uint8)
    factor = side_px / out_px
    img = rgb.astype(np.float32)
    if factor > 1.25:
        img = gaussian_filter(img, sigma=(0.4 * factor, 0.4 * factor, 0))
    offsets = (np.arange(out_px) + 0.5) * factor - side_px / 2.0
    rows = centres_yx[:, 0, None, None] + offsets[None, :, None]
    cols = centres_yx[:, 1, None, None] + offsets[None, None, :]
    rows, cols = np.broadcast_arrays(rows, cols)
    coords = np.stack([rows.ravel(), cols.ravel()])
    out = np.empty((n, 3, out_px, out_px), dtype=np.uint8)
    for c in range(3):
        vals = map_coordinates(img[..., c], coords, order=1, mode="constant", cval=float(fill), prefilter=False)
        out[:, c] = np.clip(vals + 0.5, 0, 255).astype(np.uint8).reshape(n, out_px, out_px)
    return out


@dataclass
class CellCrops:
    """Lazy crops of one slide: a square of ``crop_um`` (x ``context``) around every nucleus, ``out_px`` wide.

    Nothing is read until iterated; :meth:`iter_tiles` reads one image tile at a time (the next one is prefetched in
    a thread), so memory stays bounded by the tile size, whatever the number of cells.
    """

    image: Any = field(repr=False)  # lazy (c, y, x) pyramid level
    ids: np.ndarray = field(repr=False)
    centres_yx: np.ndarray = field(repr=False)  # in the pixels of ``image``
    side_px: float = 0.0  # crop side in the pixels of ``image``
    out_px: int = 48
    crop_um: float = 12.0
    tile_size: int = 1024
    slide: str = "slide"

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_channels(self) -> int:
        return 3

    def _tiles(self, index: np.ndarray | None = None) -> list[np.ndarray]:
        idx = np.arange(len(self.ids)) if index is None else np.asarray(index)
        if len(idx) == 0:
            return []
        ty = (self.centres_yx[idx, 0] // self.tile_size).astype(int)
        tx = (self.centres_yx[idx, 1] // self.tile_size).astype(int)
        groups = pd.Series(np.arange(len(idx))).groupby([ty, tx]).indices
        return [idx[np.sort(v)] for _, v in sorted(groups.items())]

    def _read(self, idx: np.ndarray) -> np.ndarray:
        _, h, w = self.image.shape
        c = self.centres_yx[idx]
        margin = self.side_px / 2.0 + 2.0
        y0, x0 = max(int(np.floor(c[:, 0].min() - margin)), 0), max(int(np.floor(c[:, 1].min() - margin)), 0)
        y1, x1 = min(int(np.ceil(c[:, 0].max() + margin)) + 1, h), min(int(np.ceil(c[:, 1].max() + margin)) + 1, w)
        if y1 <= y0 or x1 <= x0:  # every centre outside the image
            return np.full((len(idx), 3, self.out_px, self.out_px), 255, dtype=np.uint8)
        data = self.image.data[:, y0:y1, x0:x1]
        if hasattr(data, "compute"):
            data = data.compute(scheduler="synchronous")
        rgb = to_rgb_uint8(np.asarray(data))
        return crops_from_tile(rgb, c - [y0, x0], side_px=self.side_px, out_px=self.out_px)

    def iter_tiles(
        self, index: np.ndarray | None = None, *, show_progress_bar: bool = False, desc: str = "crops"
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(positions, crops)`` per image tile: positions into :attr:`ids` and ``(n, 3, px, px)`` uint8."""
        from tqdm.auto import tqdm

        tiles = self._tiles(index)
        total = sum(len(t) for t in tiles)
        with (
            ThreadPoolExecutor(max_workers=1) as pool,
            tqdm(total=total, desc=desc, unit="cell", disable=not show_progress_bar) as bar,
        ):
            pending = pool.submit(self._read, tiles[0]) if tiles else None
            for i, idx in enumerate(tiles):
                crops = pending.result()
                pending = pool.submit(self._read, tiles[i + 1]) if i + 1 < len(tiles) else None
                bar.update(len(idx))
                yield idx, crops

    def get(self, index: np.ndarray) -> np.ndarray:
        """Crops of some cells, ``(n, 3, px, px)`` uint8, in the order given."""
        index = np.asarray(index)
        out = np.empty((len(index), 3, self.out_px, self.out_px), dtype=np.uint8)
        order = {int(v): i for i, v in enumerate(index)}
        for idx, crops in self.iter_tiles(index):
            out[[order[int(v)] for v in idx]] = crops
        return out

    def to_array(self, path: str | Path | None = None, *, show_progress_bar: bool = True) -> np.ndarray:
        """Materialise all crops as ``(n, 3, px, px)`` uint8: in memory, or a memory-mapped ``.npy`` at ``path``.

        With ``path`` the array lives on disk and is paged in as used (random access for SSL training) instead of
        being held in memory.
        """
        shape = (len(self), 3, self.out_px, self.out_px)
        if path is None:
            out = np.empty(shape, dtype=np.uint8)
        else:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
        for idx, crops in self.iter_tiles(show_progress_bar=show_progress_bar, desc=f"crops {self.slide}"):
            out[idx] = crops
        if path is not None:
            out.flush()
        return out

    def sample(self, n: int = 5000, *, seed: int = 0) -> np.ndarray:
        """Crops of up to ``n`` cells from a random subset of tiles (cheap slide statistics)."""
        tiles = self._tiles()
        rng = np.random.default_rng(seed)
        chosen: list[np.ndarray] = []
        count = 0
        for t in rng.permutation(len(tiles)):
            chosen.append(tiles[t])
            count += len(tiles[t])
            if count >= n:
                break
        if not chosen:
            return np.zeros((0, 3, self.out_px, self.out_px), dtype=np.uint8)
        idx = np.concatenate(chosen)
        idx = rng.choice(idx, size=min(n, len(idx)), replace=False)
        return self.get(np.sort(idx))


def cell_crops(
    sdata: SpatialData,
    shapes_key: str = Key.NUCLEI,
    *,
    image_key: str | None = None,
    crop_um: float = 12.0,
    crop_px: int = 48,
    context: float = 1.0,
    tile_size: int = 1024,
) -> CellCrops:
    """Lazy cell crops: a square of ``crop_um`` microns centred on each nucleus, resampled to ``crop_px`` pixels.

    The pyramid level closest to (and not coarser than) the crop's resolution is read. ``context > 1`` widens the
    square (and its pixel size) by that factor, the margin that rotation and resized-crop augmentations need.

    Parameters
    ----------
    sdata
        The SpatialData object with the H&E image and the nucleus shapes.
    shapes_key
        Nucleus shapes (their centroids are the crop centres).
    image_key
        The H&E image; ``None`` uses the image the shapes were segmented from, or the only image.
    crop_um
        Side of the crop in microns (the paper: 12 um).
    crop_px
        Side of the crop in pixels after resampling (the paper: 48).
    context
        Factor widening the crop for augmentation margin.
    tile_size
        Tile side in pixels of the level read.

    Returns
    -------
    A :class:`CellCrops` (iterate with :meth:`CellCrops.iter_tiles`, or :meth:`CellCrops.to_array`).
    """
    from ._segment import _pyramid

    if crop_um <= 0 or crop_px < 8:
        raise ValueError(f"`crop_um` must be positive and `crop_px` at least 8, got {crop_um} and {crop_px}.")
    if context < 1:
        raise ValueError(f"`context` must be >= 1, got {context}.")
    shapes_key = get_key(sdata, "shapes", shapes_key, what="nucleus shapes")
    image_key = source_image_key(sdata, shapes_key, image_key)
    mpp = get_microns_per_pixel(sdata, image_key)
    nuclei = sdata.shapes[shapes_key]
    if len(nuclei) == 0:
        raise ValueError(f"Shapes {shapes_key!r} are empty; segment nuclei first.")
    side_um = crop_um * context
    out_px = int(round(crop_px * context))
    target_mpp = side_um / out_px
    levels = _pyramid(sdata, image_key)
    level, factor = levels[0]
    for arr, f in levels:
        if mpp * f <= target_mpp * 1.05:
            level, factor = arr, f
    xy = apply_affine(intrinsic_to_intrinsic(sdata, shapes_key, image_key), shapes_centroids(nuclei)) / factor
    side_px = side_um / (mpp * factor)
    _, h, w = level.shape
    outside = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= w) | (xy[:, 1] >= h)
    if outside.all():
        raise ValueError(
            f"No nucleus of {shapes_key!r} lies inside image {image_key!r}; check their coordinate systems."
        )
    if outside.any():
        logger.warning(f"{int(outside.sum()):,} nuclei lie outside image {image_key!r}; their crops are blank.")
    return CellCrops(
        image=level,
        ids=nuclei.index.to_numpy(),
        centres_yx=xy[:, ::-1].copy(),
        side_px=float(side_px),
        out_px=out_px,
        crop_um=float(side_um),
        tile_size=tile_size,
        slide=image_key,
    )


@dataclass
class StainNormalizer:
    """Per-slide colour normalisation of uint8 crops into network input.

    ``"slide"`` standardises each channel by the slide's own mean and standard deviation (the sCellST paper);
    ``"macenko"`` maps the slide's H&E stain vectors onto a reference before standardising; ``"imagenet"`` uses the
    ImageNet statistics (for ImageNet-pretrained encoders); ``"none"`` only rescales to about [-2, 2].
    """

    mode: str = "slide"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    stain_matrix: list[list[float]] | None = None  # 3x2 optical-density vectors (H, E) of the slide, Macenko
    max_conc: list[float] | None = None

    @classmethod
    def fit(cls, crops: np.ndarray, mode: StainNormMode = "slide") -> StainNormalizer:
        """Fit on a sample of a slide's uint8 crops ``(n, 3, px, px)``."""
        if mode not in ("slide", "macenko", "imagenet", "none"):
            raise ValueError(f"Unknown stain normalisation {mode!r}; use 'slide', 'macenko', 'imagenet' or 'none'.")
        if mode == "imagenet":
            return cls(mode, IMAGENET_MEAN, IMAGENET_STD)
        if mode == "none" or len(crops) == 0:
            return cls("none" if mode == "none" else mode)
        norm = cls(mode)
        if mode == "macenko":
            norm.stain_matrix, norm.max_conc = _macenko_fit(crops)
            crops = norm.apply_macenko(crops)
        x = crops.astype(np.float32) / 255.0
        norm.mean = tuple(float(v) for v in x.mean(axis=(0, 2, 3)))
        norm.std = tuple(float(max(v, 1e-3)) for v in x.std(axis=(0, 2, 3)))
        return norm

    def apply_macenko(self, crops: np.ndarray) -> np.ndarray:
        """Re-render uint8 crops with the reference stain vectors."""
        if self.stain_matrix is None:
            return crops
        he = np.asarray(self.stain_matrix)
        od = -np.log((np.moveaxis(crops, 1, -1).reshape(-1, 3).astype(np.float32) + 1.0) / 256.0)
        conc = np.linalg.lstsq(he, od.T, rcond=None)[0]
        conc *= (_MAX_C_REF / np.asarray(self.max_conc))[:, None]
        rgb = 256.0 * np.exp(-(_HE_REF @ conc)) - 1.0
        rgb = np.clip(rgb.T, 0, 255).astype(np.uint8).reshape(crops.shape[0], crops.shape[2], crops.shape[3], 3)
        return np.ascontiguousarray(np.moveaxis(rgb, -1, 1))

    def __call__(self, crops: np.ndarray):
        """uint8 ``(n, 3, px, px)`` numpy or torch -> normalised float32 torch tensor."""
        import torch

        if self.mode == "macenko":
            crops = self.apply_macenko(crops.numpy() if isinstance(crops, torch.Tensor) else crops)
        x = torch.as_tensor(np.asarray(crops) if not isinstance(crops, torch.Tensor) else crops).float() / 255.0
        return self.normalise(x)

    def normalise(self, x):
        """Float tensor in [0, 1] -> standardised tensor."""
        import torch

        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "mean": list(self.mean), "std": list(self.std)}


def _macenko_fit(crops: np.ndarray, *, beta: float = 0.15, alpha: float = 1.0) -> tuple[list, list]:
    """Slide stain vectors (optical density) by the angle extremes in the plane of the two main OD directions."""
    od = -np.log((np.moveaxis(crops, 1, -1).reshape(-1, 3).astype(np.float64) + 1.0) / 256.0)
    od = od[(od > beta).all(axis=1)]
    if len(od) < 100:
        logger.warning("Too little stained tissue to fit Macenko stain vectors; using the reference vectors.")
        return _HE_REF.tolist(), _MAX_C_REF.tolist()
    _, vecs = np.linalg.eigh(np.cov(od.T))
    plane = vecs[:, 1:3]
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, alpha), np.percentile(phi, 100 - alpha)
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    he = np.column_stack([v1, v2] if v1[0] > v2[0] else [v2, v1])  # haematoxylin has the larger red OD
    he *= np.sign(he.sum(axis=0, keepdims=True))
    he /= np.linalg.norm(he, axis=0, keepdims=True)
    conc = np.linalg.lstsq(he, od.T, rcond=None)[0]
    max_c = np.maximum(np.percentile(conc, 99, axis=1), 1e-3)
    return he.tolist(), max_c.tolist()
