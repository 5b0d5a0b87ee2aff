"""Datasets: the embedded synthetic tissue and loaders for public data (no downloads)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ._constants import (
    ST_SPOT_DIAMETER_UM,
    ST_SPOT_PITCH_UM,
    VISIUM_SPOT_DIAMETER_UM,
    VISIUM_SPOT_PITCH_UM,
    Attr,
    Col,
    Key,
)
from ._logging import logger

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = [
    "consep",
    "consep_patches",
    "data_dir",
    "her2st",
    "synthetic_slide",
    "synthetic_tissue",
    "visium_mouse_brain",
    "write_synthetic_visium_hd",
    "write_synthetic_xenium",
    "xenium_breast_cells",
]

# Optical densities of haematoxylin and eosin (Ruifrok & Johnston), used to render H&E from stain concentrations.
_H_OD = np.array([0.65, 0.70, 0.29])
_E_OD = np.array([0.07, 0.99, 0.11])


@dataclass(frozen=True)
class _CellType:
    name: str
    axis_um: float  # mean semi-major axis
    aspect: tuple[float, float]  # range of minor/major ratio
    hematoxylin: float  # mean nuclear stain concentration
    texture: float  # chromatin heterogeneity
    halo_eosin: float  # cytoplasm eosin around the nucleus
    markers: tuple[str, ...]


_TYPES: tuple[_CellType, ...] = (
    _CellType("tumour", 4.3, (0.72, 0.95), 0.55, 0.35, 0.10, ("EPCAM", "KRT8", "KRT18", "ERBB2")),
    _CellType("fibroblast", 5.6, (0.22, 0.32), 0.85, 0.10, 0.00, ("COL1A1", "COL1A2", "DCN", "LUM")),
    _CellType("lymphocyte", 2.6, (0.85, 1.00), 1.25, 0.08, 0.00, ("PTPRC", "CD3E", "CD2", "MS4A1")),
    _CellType("macrophage", 3.8, (0.60, 0.80), 0.62, 0.20, 0.35, ("CD68", "CD163", "LYZ", "C1QA")),
    _CellType("endothelial", 4.6, (0.32, 0.45), 0.70, 0.10, 0.00, ("PECAM1", "VWF", "CDH5", "PLVAP")),
)
_PROLIFERATION = ("MKI67", "TOP2A", "CCNB1")
_HOUSEKEEPING = ("ACTB", "GAPDH", "B2M", "MALAT1")
# region -> (cell spacing in um, {type: probability})
_REGIONS = {
    "stroma": (15.0, {"fibroblast": 0.62, "endothelial": 0.16, "lymphocyte": 0.13, "macrophage": 0.09}),
    "tumour": (10.5, {"tumour": 0.88, "lymphocyte": 0.07, "macrophage": 0.05}),
    "immune": (8.0, {"lymphocyte": 0.76, "macrophage": 0.14, "fibroblast": 0.10}),
}


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    f = gaussian_filter(rng.normal(size=shape), sigma=sigma, mode="wrap")
    return (f - f.mean()) / (f.std() + 1e-12)


def _upsample(field: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from scipy.ndimage import zoom

    out = zoom(field, (shape[0] / field.shape[0], shape[1] / field.shape[1]), order=1)
    return out[: shape[0], : shape[1]]


def _hex_grid(width_um: float, height_um: float, pitch_um: float, margin_um: float) -> np.ndarray:
    dy = pitch_um * np.sqrt(3) / 2
    pts = []
    for i, y in enumerate(np.arange(margin_um, height_um - margin_um + 1e-9, dy)):
        x0 = margin_um + (pitch_um / 2 if i % 2 else 0.0)
        for x in np.arange(x0, width_um - margin_um + 1e-9, pitch_um):
            pts.append((x, y))
    return np.asarray(pts)


def _make_cells(rng: np.random.Generator, width_um: float, height_um: float, spacing_scale: float = 1.0) -> dict:
    """Tissue architecture (fields on a 5 um grid), cell positions, types and nucleus shapes, in microns."""
    # --- tissue architecture on a 5 um grid -------------------------------------------------------------------
    coarse = (max(int(height_um / 5), 8), max(int(width_um / 5), 8))
    nest = _smooth_field(rng, coarse, sigma=14)
    immune = _smooth_field(rng, coarse, sigma=6)
    flow = _smooth_field(rng, coarse, sigma=20) * np.pi

    def region_at(x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        iy = np.clip((y_um / 5).astype(int), 0, coarse[0] - 1)
        ix = np.clip((x_um / 5).astype(int), 0, coarse[1] - 1)
        reg = np.zeros(len(x_um), dtype=int)  # 0 stroma
        reg[immune[iy, ix] > 1.1] = 2
        reg[nest[iy, ix] > 0.35] = 1
        return reg

    region_names = ("stroma", "tumour", "immune")
    type_index = {t.name: i for i, t in enumerate(_TYPES)}

    # --- cells: jittered grids per region -------------------------------------------------------------------
    xs, ys, types = [], [], []
    for r, name in enumerate(region_names):
        spacing, probs = _REGIONS[name]
        spacing *= spacing_scale
        gx, gy = np.meshgrid(np.arange(spacing / 2, width_um, spacing), np.arange(spacing / 2, height_um, spacing))
        gx = gx.ravel() + rng.uniform(-0.3, 0.3, gx.size) * spacing
        gy = gy.ravel() + rng.uniform(-0.3, 0.3, gy.size) * spacing
        keep = (region_at(gx, gy) == r) & (gx > 4) & (gy > 4) & (gx < width_um - 4) & (gy < height_um - 4)
        gx, gy = gx[keep], gy[keep]
        names, p = zip(*probs.items(), strict=True)
        t = rng.choice([type_index[n] for n in names], size=gx.size, p=np.asarray(p) / np.sum(p))
        xs.append(gx)
        ys.append(gy)
        types.append(t)
    x_um, y_um, cell_type = np.concatenate(xs), np.concatenate(ys), np.concatenate(types)
    n_cells = len(x_um)
    state = rng.normal(size=n_cells)  # latent tumour state (proliferation), visible in the nucleus

    # --- morphology ------------------------------------------------------------------------------------------
    axis = np.array([_TYPES[t].axis_um for t in cell_type]) * np.exp(rng.normal(0, 0.08, n_cells))
    is_tumour = cell_type == type_index["tumour"]
    axis[is_tumour] *= np.exp(0.13 * state[is_tumour])
    lo = np.array([_TYPES[t].aspect[0] for t in cell_type])
    hi = np.array([_TYPES[t].aspect[1] for t in cell_type])
    minor = axis * rng.uniform(lo, hi)
    iy = np.clip((y_um / 5).astype(int), 0, coarse[0] - 1)
    ix = np.clip((x_um / 5).astype(int), 0, coarse[1] - 1)
    angle = np.where(np.isin(cell_type, [type_index["fibroblast"], type_index["endothelial"]]), flow[iy, ix], 0.0)
    angle = angle + rng.normal(0, 0.25, n_cells)
    angle[np.isin(cell_type, [type_index[n] for n in ("tumour", "lymphocyte", "macrophage")])] = rng.uniform(
        0, np.pi, int(np.isin(cell_type, [type_index[n] for n in ("tumour", "lymphocyte", "macrophage")]).sum())
    )
    hema = np.array([_TYPES[t].hematoxylin for t in cell_type]) * np.exp(rng.normal(0, 0.08, n_cells))
    hema[is_tumour] *= np.exp(0.12 * state[is_tumour])

    return {
        "coarse": coarse, "nest": nest, "immune": immune, "x_um": x_um, "y_um": y_um, "cell_type": cell_type,
        "state": state, "axis": axis, "minor": minor, "angle": angle, "hema": hema, "is_tumour": is_tumour,
    }  # fmt: skip


def _express(rng: np.random.Generator, cells: dict, counts_per_cell: float) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Genes, expected counts ``mu`` and sampled counts of every cell."""
    cell_type, axis, state, is_tumour = cells["cell_type"], cells["axis"], cells["state"], cells["is_tumour"]
    type_index = {t.name: i for i, t in enumerate(_TYPES)}
    n_cells = len(cell_type)
    # --- expression programs ------------------------------------------------------------------------------------
    genes = [g for t in _TYPES for g in t.markers] + list(_PROLIFERATION) + list(_HOUSEKEEPING)
    n_genes = len(genes)
    base = np.full((len(_TYPES), n_genes), 0.05)
    for ti, t in enumerate(_TYPES):
        for g in t.markers:
            base[ti, genes.index(g)] = rng.uniform(3.0, 9.0)
    for g in _PROLIFERATION:
        base[type_index["tumour"], genes.index(g)] = rng.uniform(1.0, 2.5)
        base[type_index["lymphocyte"], genes.index(g)] = 0.3
    for g in _HOUSEKEEPING:
        base[:, genes.index(g)] = rng.uniform(4.0, 10.0) * np.exp(rng.normal(0, 0.3, len(_TYPES)))
    base *= counts_per_cell / base.sum(axis=1, keepdims=True)
    size = np.exp(rng.normal(0, 0.2, n_cells)) * (axis / axis.mean()) ** 0.5
    noise = np.exp(rng.normal(0, 0.25, (n_cells, n_genes)))
    mu = base[cell_type] * size[:, None] * noise
    prolif = [genes.index(g) for g in _PROLIFERATION]
    mu[np.ix_(is_tumour, prolif)] *= np.exp(0.9 * state[is_tumour])[:, None]
    cell_counts = rng.poisson(mu)

    return genes, mu, cell_counts


def _spots(rng, cells, mu, width_um, height_um, spot_diameter_um, spot_pitch_um, dispersion) -> tuple:
    """A hexagonal grid of spots summing the expected counts of the cells centred in them, with NB noise."""
    from scipy.spatial import cKDTree

    x_um, y_um, n_genes = cells["x_um"], cells["y_um"], mu.shape[1]
    # --- spots ------------------------------------------------------------------------------------------------
    spot_um = _hex_grid(width_um, height_um, spot_pitch_um, margin_um=spot_diameter_um / 2 + 5)
    tree = cKDTree(np.column_stack([x_um, y_um]))
    members = tree.query_ball_point(spot_um, r=spot_diameter_um / 2)
    spot_mu = np.stack([mu[m].sum(axis=0) if len(m) else np.zeros(n_genes) for m in members])
    lam = rng.gamma(dispersion, spot_mu / dispersion)
    spot_counts = rng.poisson(lam).astype(np.float32)
    spot_ids = [f"spot_{i}" for i in range(len(spot_um))]
    return spot_um, spot_counts, spot_ids, members


def _cell_box(t: _CellType, a: float, cx: float, cy: float) -> tuple[int, int, int, int]:
    """The pixel box ``(x0, x1, y0, y1)`` that holds a drawn cell (nucleus and halo) of semi-major axis ``a`` px."""
    r = int(np.ceil(a * (1.9 if t.halo_eosin > 0 else 1.15))) + 2
    return int(cx) - r, int(cx) + r + 1, int(cy) - r, int(cy) + r + 1


def _draw_cell(t: _CellType, a, b, cx, cy, angle, hema, rng, window) -> tuple[np.ndarray, np.ndarray | None]:
    """Haematoxylin of an elliptic nucleus (chromatin texture from ``rng``) and its halo's eosin, over a pixel window."""
    y0, y1, x0, x1 = window
    halo = 1.9 if t.halo_eosin > 0 else 1.15
    yy, xx = np.mgrid[y0:y1, x0:x1]
    dx, dy = xx - cx, yy - cy
    ca, sa = np.cos(angle), np.sin(angle)
    u, v = dx * ca + dy * sa, -dx * sa + dy * ca
    d = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    mask = np.clip((1.06 - d) / 0.18, 0, 1)
    chromatin = 1 + t.texture * rng.normal(size=mask.shape)
    nucleus = hema * mask * np.clip(chromatin, 0.3, 2.0)
    ring = t.halo_eosin * np.clip((halo - d) / 0.3, 0, 1) * (1 - mask) if t.halo_eosin > 0 else None
    return nucleus, ring


def synthetic_tissue(
    *,
    seed: int = 0,
    size_um: tuple[float, float] = (1600.0, 1600.0),
    microns_per_pixel: float = 0.5,
    spot_diameter_um: float = VISIUM_SPOT_DIAMETER_UM,
    spot_pitch_um: float = VISIUM_SPOT_PITCH_UM,
    counts_per_cell: float = 60.0,
    dispersion: float = 20.0,
) -> SpatialData:
    """A procedurally generated H&E-like tissue with spot transcriptomics and the true expression of every cell.

    Five cell types differ in nuclear size, shape and stain (tumour, fibroblast, lymphocyte, macrophage,
    endothelial). Tumour nests, stroma and immune clusters give spatial structure. Each cell expresses its type's
    marker genes, housekeeping genes and, for tumour cells, proliferation genes that follow a latent state which
    also enlarges and darkens the nucleus (so morphology carries information beyond the type). A hexagonal grid of
    spots (Visium-like: 55 um spots at 100 um pitch by default) sums the counts of the cells whose centre lies in
    the spot, with negative-binomial noise.

    Parameters
    ----------
    seed
        Random seed; the output is deterministic per seed.
    size_um
        Tissue width and height in microns.
    microns_per_pixel
        Resolution of the rendered image.
    spot_diameter_um, spot_pitch_um
        Spot geometry.
    counts_per_cell
        Mean number of UMIs contributed by one cell.
    dispersion
        Negative-binomial inverse dispersion of spot counts (larger is closer to Poisson).

    Returns
    -------
    A SpatialData laid out as :func:`scellst.io.from_spots` builds it (``he``, ``spots``, ``spots_counts``), plus
    ``shapes['true_cells']`` (nucleus centres with ``radius``, the major semi-axis of the drawn elliptic nucleus in
    pixels, its ``minor_radius`` and ``angle``) and ``tables['true_expression']`` (cells x genes: the
    expected counts of each cell in ``X``, sampled counts in ``layers['counts']``, ``obs['cell_type']``).
    """
    from scipy.ndimage import gaussian_filter

    from .io import from_spots

    rng = np.random.default_rng(seed)
    mpp = float(microns_per_pixel)
    width_um, height_um = map(float, size_um)
    h_px, w_px = int(round(height_um / mpp)), int(round(width_um / mpp))

    cells = _make_cells(rng, width_um, height_um)
    nest, immune, x_um, y_um = cells["nest"], cells["immune"], cells["x_um"], cells["y_um"]
    cell_type, axis, minor, angle, hema = (cells[k] for k in ("cell_type", "axis", "minor", "angle", "hema"))
    n_cells = len(x_um)

    # --- render stain concentrations, then Beer-Lambert to RGB ----------------------------------------------
    region_px = _upsample(nest, (h_px, w_px)) > 0.35
    immune_px = (_upsample(immune, (h_px, w_px)) > 1.1) & ~region_px
    fibres = gaussian_filter(rng.normal(size=(h_px, w_px)).astype(np.float32), sigma=(1.0, 3.0))
    fibres /= fibres.std() + 1e-6
    eosin = np.where(region_px, 0.30, np.where(immune_px, 0.22, 0.50)).astype(np.float32)
    eosin = gaussian_filter(eosin, 2.0) * (1 + 0.25 * fibres * (~region_px))
    hema_img = np.full((h_px, w_px), 0.03, dtype=np.float32)
    for i in range(n_cells):
        t = _TYPES[cell_type[i]]
        a, b = axis[i] / mpp, minor[i] / mpp
        cx, cy = x_um[i] / mpp, y_um[i] / mpp
        x0, x1, y0, y1 = _cell_box(t, a, cx, cy)
        x0, x1, y0, y1 = max(x0, 0), min(x1, w_px), max(y0, 0), min(y1, h_px)
        nucleus, ring = _draw_cell(t, a, b, cx, cy, angle[i], hema[i], rng, (y0, y1, x0, x1))
        hema_img[y0:y1, x0:x1] = np.maximum(hema_img[y0:y1, x0:x1], nucleus)
        if ring is not None:
            eosin[y0:y1, x0:x1] += ring
    hema_img = gaussian_filter(hema_img, 0.6)
    od = hema_img[..., None] * _H_OD + eosin[..., None] * _E_OD
    rgb = 255.0 * np.exp(-od) * 0.96 + rng.normal(0, 2.5, size=od.shape)
    image = np.clip(rgb, 0, 255).astype(np.uint8)

    genes, mu, cell_counts = _express(rng, cells, counts_per_cell)
    n_genes = len(genes)
    spot_um, spot_counts, spot_ids, members = _spots(
        rng, cells, mu, width_um, height_um, spot_diameter_um, spot_pitch_um, dispersion
    )
    counts = pd.DataFrame(spot_counts, index=spot_ids, columns=genes)

    sdata = from_spots(
        image,
        spot_xy=spot_um / mpp,
        spot_diameter_um=spot_diameter_um,
        counts=counts,
        microns_per_pixel=mpp,
        chunks=1024,
    )
    _add_truth(sdata, x_um / mpp, y_um / mpp, axis / mpp, mu, cell_counts, genes, cell_type, mpp)
    sdata.shapes[Key.TRUE_CELLS]["minor_radius"] = minor / mpp  # the drawn nucleus: an ellipse of these semi-axes
    sdata.shapes[Key.TRUE_CELLS]["angle"] = angle  # its major axis, radians from x towards y (image pixels)
    sdata.tables[Key.SPOTS_COUNTS].obs[Col.N_CELLS] = np.array([len(m) for m in members])
    logger.info(
        f"Synthetic tissue (seed {seed}): {w_px:,} x {h_px:,} px, {n_cells:,} cells, {len(spot_um)} spots, "
        f"{n_genes} genes"
    )
    return sdata


def synthetic_slide(
    *,
    seed: int = 0,
    size_um: tuple[float, float] = (6250.0, 6250.0),
    microns_per_pixel: float = 0.25,
    spacing_scale: float = 1.27,
    chunks: int = 2048,
    spot_diameter_um: float = VISIUM_SPOT_DIAMETER_UM,
    spot_pitch_um: float = VISIUM_SPOT_PITCH_UM,
    counts_per_cell: float = 60.0,
    dispersion: float = 20.0,
) -> SpatialData:
    """A whole-slide synthetic tissue whose H&E is generated lazily, block by block, never whole in memory.

    The tissue of :func:`synthetic_tissue` (cell types, nuclei, expression, spots, true expression of every cell) at
    slide scale: by default a Visium capture area (6.25 mm square, 25,000 x 25,000 px at 0.25 um/px, about 150,000
    cells and 3,900 spots). The image is a dask array: each ``chunks``-pixel block is rendered when it is read, from the
    cells whose nucleus or halo meets it, with noise seeded by the block and the cell, so that reading the same block
    twice gives the same pixels. Write it to zarr to get a slide on disk (``sdata.write``, block by block).

    Parameters
    ----------
    seed
        Random seed; the output is deterministic per seed.
    size_um
        Tissue width and height in microns.
    microns_per_pixel
        Resolution of the rendered image.
    spacing_scale
        Multiplies the cell spacing of every region (1.0: the density of :func:`synthetic_tissue`).
    chunks
        Block size of the lazy image, in pixels.
    spot_diameter_um, spot_pitch_um, counts_per_cell, dispersion
        As in :func:`synthetic_tissue`.

    Returns
    -------
    As :func:`synthetic_tissue`, with a lazy ``images['he']`` (one scale).
    """
    import dask.array as da

    from .io import from_spots

    rng = np.random.default_rng(seed)
    mpp = float(microns_per_pixel)
    width_um, height_um = map(float, size_um)
    h_px, w_px = int(round(height_um / mpp)), int(round(width_um / mpp))
    cells = _make_cells(rng, width_um, height_um, spacing_scale)
    genes, mu, cell_counts = _express(rng, cells, counts_per_cell)
    spot_um, spot_counts, spot_ids, members = _spots(
        rng, cells, mu, width_um, height_um, spot_diameter_um, spot_pitch_um, dispersion
    )
    renderer = _BlockRenderer(cells, mpp, seed, (h_px, w_px))
    image = da.map_blocks(
        renderer,
        dtype=np.uint8,
        chunks=((3,), da.core.normalize_chunks(chunks, (h_px,))[0], da.core.normalize_chunks(chunks, (w_px,))[0]),
        meta=np.zeros((0, 0, 0), dtype=np.uint8),
    )
    sdata = from_spots(
        image,
        spot_xy=spot_um / mpp,
        spot_diameter_um=spot_diameter_um,
        counts=pd.DataFrame(spot_counts, index=spot_ids, columns=genes),
        microns_per_pixel=mpp,
        chunks=chunks,
    )
    x_um, y_um, axis = cells["x_um"], cells["y_um"], cells["axis"]
    _add_truth(sdata, x_um / mpp, y_um / mpp, axis / mpp, mu, cell_counts, genes, cells["cell_type"], mpp)
    sdata.shapes[Key.TRUE_CELLS]["minor_radius"] = cells["minor"] / mpp
    sdata.shapes[Key.TRUE_CELLS]["angle"] = cells["angle"]
    sdata.tables[Key.SPOTS_COUNTS].obs[Col.N_CELLS] = np.array([len(m) for m in members])
    logger.info(
        f"Synthetic slide (seed {seed}): {w_px:,} x {h_px:,} px (lazy), {len(x_um):,} cells, {len(spot_um)} spots, "
        f"{len(genes)} genes"
    )
    return sdata


class _BlockRenderer:
    """Renders one block of the lazy slide of :func:`synthetic_slide` (a picklable callable for ``map_blocks``)."""

    PAD = 8  # pixels rendered around a block so that its filters see the same neighbourhood as a whole image would

    def __init__(self, cells: dict, mpp: float, seed: int, shape: tuple[int, int]) -> None:
        self.mpp, self.seed, self.shape = mpp, seed, shape
        self.coarse, self.nest, self.immune = cells["coarse"], cells["nest"], cells["immune"]
        self.cx, self.cy = cells["x_um"] / mpp, cells["y_um"] / mpp
        self.a, self.b = cells["axis"] / mpp, cells["minor"] / mpp
        self.angle, self.hema, self.type = cells["angle"], cells["hema"], cells["cell_type"]
        halo = np.array([1.9 if _TYPES[t].halo_eosin > 0 else 1.15 for t in self.type])
        r = np.ceil(self.a * halo).astype(int) + 2
        self.x0, self.y0 = self.cx.astype(int) - r, self.cy.astype(int) - r
        self.x1, self.y1 = self.cx.astype(int) + r + 1, self.cy.astype(int) + r + 1

    def _field(self, field: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        from scipy.ndimage import map_coordinates

        h, w = self.shape
        gy = (ys + 0.5) * field.shape[0] / h - 0.5
        gx = (xs + 0.5) * field.shape[1] / w - 0.5
        yy, xx = np.meshgrid(gy, gx, indexing="ij")
        return map_coordinates(field, [yy, xx], order=1, mode="nearest")

    def __call__(self, block_info=None) -> np.ndarray:
        from scipy.ndimage import gaussian_filter

        (y0, y1), (x0, x1) = block_info[None]["array-location"][1:]
        p = self.PAD
        py0, py1, px0, px1 = y0 - p, y1 + p, x0 - p, x1 + p
        ys, xs = np.arange(py0, py1), np.arange(px0, px1)
        region = self._field(self.nest, ys, xs) > 0.35
        immune = (self._field(self.immune, ys, xs) > 1.1) & ~region
        rng = np.random.default_rng([self.seed, 1, y0, x0])
        fibres = gaussian_filter(rng.normal(size=(py1 - py0, px1 - px0)).astype(np.float32), sigma=(1.0, 3.0))
        fibres /= fibres.std() + 1e-6
        eosin = np.where(region, 0.30, np.where(immune, 0.22, 0.50)).astype(np.float32)
        eosin = gaussian_filter(eosin, 2.0) * (1 + 0.25 * fibres * (~region))
        hema_img = np.full(eosin.shape, 0.03, dtype=np.float32)
        hit = np.flatnonzero((self.x1 > px0) & (self.x0 < px1) & (self.y1 > py0) & (self.y0 < py1))
        for i in hit:
            t = _TYPES[self.type[i]]
            box = (
                self.y0[i],
                self.y1[i],
                self.x0[i],
                self.x1[i],
            )  # the whole cell: its noise is the same in every block
            cell_rng = np.random.default_rng([self.seed, 2, int(i)])
            nucleus, ring = _draw_cell(t, self.a[i], self.b[i], self.cx[i], self.cy[i], self.angle[i], self.hema[i],
                                       cell_rng, box)  # fmt: skip
            cy0, cy1 = max(box[0], py0), min(box[1], py1)
            cx0, cx1 = max(box[2], px0), min(box[3], px1)
            src = np.s_[cy0 - box[0] : cy1 - box[0], cx0 - box[2] : cx1 - box[2]]
            dst = np.s_[cy0 - py0 : cy1 - py0, cx0 - px0 : cx1 - px0]
            hema_img[dst] = np.maximum(hema_img[dst], nucleus[src])
            if ring is not None:
                eosin[dst] += ring[src]
        hema_img = gaussian_filter(hema_img, 0.6)
        od = hema_img[p:-p, p:-p, None] * _H_OD + eosin[p:-p, p:-p, None] * _E_OD
        rgb = 255.0 * np.exp(-od) * 0.96 + rng.normal(0, 2.5, size=od.shape)
        return np.clip(rgb, 0, 255).astype(np.uint8).transpose(2, 0, 1)


def _add_truth(sdata, x_px, y_px, radius_px, mu, cell_counts, genes, cell_type, mpp) -> None:
    import anndata as ad
    import geopandas as gpd
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Scale

    n = len(x_px)
    ids = np.arange(1, n + 1)
    gdf = gpd.GeoDataFrame(
        {Col.RADIUS: radius_px}, geometry=gpd.points_from_xy(x_px, y_px), index=pd.Index(ids, name=Col.CELL_ID)
    )
    sdata.shapes[Key.TRUE_CELLS] = ShapesModel.parse(gdf, transformations={"global": Scale([mpp, mpp], ("y", "x"))})
    obs = pd.DataFrame(
        {
            Col.CELL_ID: ids,
            Col.REGION: pd.Categorical([Key.TRUE_CELLS] * n),
            Col.CELL_TYPE: pd.Categorical([_TYPES[t].name for t in cell_type]),
        },
        index=ids.astype(str),
    )
    adata = ad.AnnData(X=mu.astype(np.float32), obs=obs, var=pd.DataFrame(index=genes))
    adata.layers["counts"] = cell_counts.astype(np.float32)
    adata.obsm["spatial"] = np.column_stack([x_px, y_px])
    sdata.tables[Key.TRUE_EXPRESSION] = TableModel.parse(
        adata, region=Key.TRUE_CELLS, region_key=Col.REGION, instance_key=Col.CELL_ID
    )


def _write_nucleus_outlines(path: Path, cells, ids: np.ndarray, to_um: np.ndarray, offset_um) -> None:
    """Xenium ``nucleus_boundaries`` (``cell_id``, ``vertex_x``, ``vertex_y`` in microns) of the true elliptic nuclei."""
    cells = cells.set_axis(cells.index.astype(str)).reindex(ids)
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    a, b = cells[Col.RADIUS].to_numpy()[:, None], cells["minor_radius"].to_numpy()[:, None]
    ca, sa = np.cos(cells["angle"].to_numpy())[:, None], np.sin(cells["angle"].to_numpy())[:, None]
    u, v = a * np.cos(t), b * np.sin(t)  # along the major and minor axes, pixels
    x = cells.geometry.x.to_numpy()[:, None] + u * ca - v * sa
    y = cells.geometry.y.to_numpy()[:, None] + u * sa + v * ca
    xy = np.column_stack([x.ravel(), y.ravel()]) @ to_um[:2, :2].T + to_um[:2, 2] + np.asarray(offset_um)
    pd.DataFrame({"cell_id": np.repeat(ids, len(t)), "vertex_x": xy[:, 0], "vertex_y": xy[:, 1]}).to_csv(
        path, index=False
    )


def data_dir(name: str | None = None, *, path: str | Path | None = None) -> Path:
    """Folder of a public dataset: ``path`` if given, else ``$SCELLST_DATA_DIR/<name>``, else ``../shared/data``."""
    if path is not None:
        p = Path(path)
    else:
        root = os.environ.get("SCELLST_DATA_DIR")
        p = Path(root) if root else Path.cwd().parent / "shared" / "data"
        if name is not None:
            p = p / name
    if not p.exists():
        raise FileNotFoundError(
            f"Data folder {str(p)!r} does not exist. Pass `path=` or set the SCELLST_DATA_DIR environment variable "
            "to the folder that holds the public datasets."
        )
    return p


def visium_mouse_brain(*, path: str | Path | None = None) -> SpatialData:
    """A real 10x Visium fragment: 49 spots of the V1_Adult_Mouse_Brain H&E crop (squidpy's test fixture).

    ``test_img.jpg`` (950 x 1717 px, about 0.73 um/px: the spot pitch of 100 um spans 137 px) with the raw counts of
    1,999 genes recovered exactly from the fixture's log-normalised values and the spot centres in that image. Too
    small to learn much, but real tissue, real spot geometry and real counts: the smallest end-to-end check.

    Parameters
    ----------
    path
        The ``visium_mouse_brain_crop`` folder (default: ``data_dir("visium_mouse_brain_crop")``).

    Returns
    -------
    A SpatialData from :func:`scellst.io.from_spots` (``he``, ``spots`` of 55 um, ``spots_counts``).
    """
    import pandas as pd

    from .io import from_spots

    folder = data_dir("visium_mouse_brain_crop", path=path)
    xy = pd.read_csv(folder / "DERIVED_spot_xy_in_test_img.csv", index_col=0)
    counts = pd.read_csv(folder / "DERIVED_counts_recovered_hvg1999.csv.gz", index_col=0)
    spot_xy = xy.rename(columns={"x_px": "x", "y_px": "y"})[["x", "y"]]
    return from_spots(
        folder / "test_img.jpg",
        spot_xy=spot_xy,
        spot_diameter_um=55.0,
        counts=counts,
        microns_per_pixel=VISIUM_MOUSE_BRAIN_MPP,
    )


VISIUM_MOUSE_BRAIN_MPP = 100.0 / 137.0  # Visium pitch (100 um) over the nearest-neighbour spot distance in the crop


def her2st(section: str, *, path: str | Path | None = None) -> SpatialData:
    """Read one section of the public HER2+ breast cancer Spatial Transcriptomics data (Andersson et al. 2021).

    Expects the public layout: ``images/<S>_*.jpg``, ``counts/<S>.tsv.gz`` (rows ``"{x}x{y}"``, raw counts) and
    ``spots/<S>_selection.tsv`` (array ``x``, ``y`` and ``pixel_x``, ``pixel_y``). Nothing is downloaded. The
    microns per pixel are fitted from the 200 um spot pitch; spots are 100 um across.

    Parameters
    ----------
    section
        Section name, e.g. ``"C2"``.
    path
        The ``her2st`` folder (default: ``$SCELLST_DATA_DIR/her2st`` or ``../shared/data/her2st``).

    Returns
    -------
    A SpatialData as built by :func:`scellst.io.from_spots`, with ``obs['array_x']``, ``obs['array_y']`` on the
    spot table and, when available, the stereoscope cell-type proportions in ``obsm['deconv']``.
    """
    from .io import from_spots

    root = data_dir("her2st", path=path)
    images = sorted((root / "images").glob(f"{section}_*.jpg"))
    counts_file = root / "counts" / f"{section}.tsv.gz"
    spots_file = root / "spots" / f"{section}_selection.tsv"
    if not images or not counts_file.exists() or not spots_file.exists():
        available = sorted(p.name.split(".")[0] for p in (root / "counts").glob("*.tsv.gz"))
        raise FileNotFoundError(f"Section {section!r} is incomplete or missing in {str(root)!r}; found {available}.")
    counts = pd.read_csv(counts_file, sep="\t", index_col=0)
    counts.index = counts.index.astype(str)
    spots = pd.read_csv(spots_file, sep="\t")
    if "selected" in spots:
        spots = spots[spots["selected"] == 1]
    spots.index = [f"{x}x{y}" for x, y in zip(spots["x"], spots["y"], strict=True)]
    shared = spots.index.intersection(counts.index)
    if len(shared) == 0:
        raise ValueError(f"No spot of {spots_file.name} matches a row of {counts_file.name}.")
    spots, counts = spots.loc[shared], counts.loc[shared]
    px_per_step = np.mean(
        [np.polyfit(spots["x"], spots["pixel_x"], 1)[0], np.polyfit(spots["y"], spots["pixel_y"], 1)[0]]
    )
    mpp = ST_SPOT_PITCH_UM / px_per_step
    sdata = from_spots(
        images[0],
        spot_xy=spots[["pixel_x", "pixel_y"]].rename(columns={"pixel_x": "x", "pixel_y": "y"}),
        spot_diameter_um=ST_SPOT_DIAMETER_UM,
        counts=counts,
        microns_per_pixel=mpp,
    )
    table = sdata.tables[Key.SPOTS_COUNTS]
    table.obs["array_x"] = spots["x"].to_numpy()
    table.obs["array_y"] = spots["y"].to_numpy()
    table.uns[Attr.ROOT]["section"] = section
    deconv_file = root / "deconv" / f"{section}-proportion.tsv"
    if deconv_file.exists():
        deconv = pd.read_csv(deconv_file, sep="\t", index_col=0).reindex(shared)
        table.obsm["deconv"] = deconv.fillna(0.0).set_axis(table.obs_names)
    return sdata


ANNOTATED_TILES = ("monuseg", "gbm40")


def annotated_tiles(name: str, *, path: str | Path | None = None) -> list[dict]:
    """H&E tiles with manual nucleus outlines, to train or score a segmenter (``"monuseg"`` or ``"gbm40"``).

    Reads the public layout ``images/<tile>.png``, ``instance_masks/<tile>.png`` (uint16 instance maps) and
    ``index.json`` in place; nothing is downloaded.

    - ``"monuseg"``: 13 MoNuSeg tiles (Kumar et al. 2017; TCGA, 7 organs, 1000 x 1000 px at about 0.25 um/px, taken
      from ``index.json``).
    - ``"gbm40"``: 40 glioblastoma tiles (Kong et al. 2016; 512 x 512 px). The resolution is not stated upstream;
      the nucleus sizes suggest 40x, so 0.25 um/px is assumed.

    Parameters
    ----------
    name
        Which set.
    path
        Its folder (default: ``$SCELLST_DATA_DIR/<name>`` or ``../shared/data/<name>``).

    Returns
    -------
    One dict per tile: ``name``, ``image`` (``(y, x, 3)`` uint8 RGB), ``instances`` (int64 label map, 0 background)
    and ``microns_per_pixel``.
    """
    from skimage.io import imread

    if name not in ANNOTATED_TILES:
        raise ValueError(f"Unknown tile set {name!r}; choose from {ANNOTATED_TILES}.")
    root = data_dir(name, path=path)
    index = root / "index.json"
    if not index.exists():
        raise FileNotFoundError(f"No index.json in {str(root)!r}; is this the {name} folder?")
    out = []
    for entry in json.loads(index.read_text()):
        mpp = float(entry.get("microns_per_pixel") or 0.25)
        image = imread(root / "images" / f"{entry['name']}.png")[..., :3]
        instances = imread(root / "instance_masks" / f"{entry['name']}.png").astype(np.int64)
        if instances.shape != image.shape[:2]:
            raise ValueError(f"{name} tile {entry['name']}: mask {instances.shape} and image {image.shape[:2]} differ.")
        out.append({"name": entry["name"], "image": image, "instances": instances, "microns_per_pixel": mpp})
    return out


CONSEP_CLASSES = ("other", "inflammatory", "epithelial", "spindle")


def consep_patches(*, path: str | Path | None = None) -> list[dict]:
    """The CoNSeP patches (Graham et al. 2019), one dict each.

    Keys: ``name``, ``image`` (``(256, 256, 3)`` uint8 RGB), ``instances`` (int label map), ``classes`` (instance id -> class name) and ``source_image`` (the original image
    number, for splitting by image).
    """
    import gzip

    from scipy.io import loadmat
    from skimage.io import imread

    root = data_dir("consep", path=path)
    names = sorted(p.name[: -len(".jpg")] for p in (root / "images").glob("*.jpg"))
    if not names:
        raise FileNotFoundError(f"No CoNSeP images under {str(root / 'images')!r}.")
    out = []
    for n in names:
        with gzip.open(root / "inst" / f"{n}.npy.gz") as fh:
            inst = np.load(fh).astype(np.int64)
        types = loadmat(root / "type_mat" / f"{n}.mat")["inst_type"].ravel().astype(int)
        ids = np.unique(inst)[1:]  # inst_type lists the classes in the order of the sorted instance ids
        if len(ids) != len(types):
            raise ValueError(f"CoNSeP patch {n}: {len(ids)} instances but {len(types)} class entries.")
        out.append(
            {
                "name": n,
                "image": imread(root / "images" / f"{n}.jpg")[..., :3],
                "instances": inst,
                "classes": {int(i): CONSEP_CLASSES[t - 1] for i, t in zip(ids, types, strict=True)},
                "source_image": int(n.split("_")[1]),
            }
        )
    return out


def consep(*, path: str | Path | None = None, pad_px: int = 32) -> SpatialData:
    """The 224 CoNSeP patches laid out on one mosaic image, with their annotated nuclei and classes.

    Each patch is extended by ``pad_px`` of its own mirror image on every side, so that a crop around a nucleus near
    the patch edge shows tissue (not glass, and never a neighbouring patch). The nuclei are stored as
    ``shapes['nuclei']`` with columns ``class`` (other, inflammatory, epithelial, spindle), ``source_image`` (the
    original CoNSeP image, 1-14: split by it, never by patch, since patches of one image overlap) and ``patch``.
    Resolution 0.25 um per pixel (40x).
    """
    from .io import from_image, read_nuclei

    patches = consep_patches(path=path)
    n = len(patches)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    step = 256 + 2 * pad_px
    mosaic = np.full((rows * step, cols * step, 3), 255, dtype=np.uint8)
    labels = np.zeros(mosaic.shape[:2], dtype=np.int64)
    meta = {}
    next_id = 1
    for k, p in enumerate(patches):
        y0, x0 = pad_px + (k // cols) * step, pad_px + (k % cols) * step
        padded = np.pad(p["image"], ((pad_px, pad_px), (pad_px, pad_px), (0, 0)), mode="reflect")
        mosaic[y0 - pad_px : y0 + 256 + pad_px, x0 - pad_px : x0 + 256 + pad_px] = padded
        inst = p["instances"]
        new = np.zeros_like(inst)
        for i, cls in p["classes"].items():
            new[inst == i] = next_id
            meta[next_id] = (cls, p["source_image"], p["name"])
            next_id += 1
        labels[y0 : y0 + 256, x0 : x0 + 256] = new
    sdata = from_image(mosaic, microns_per_pixel=0.25)
    read_nuclei(sdata, labels, format="labels")
    nuclei = sdata.shapes["nuclei"]
    src = nuclei["source_id"].astype(int).to_numpy()
    nuclei["class"] = pd.Categorical([meta[i][0] for i in src], categories=list(CONSEP_CLASSES))
    nuclei["source_image"] = np.array([meta[i][1] for i in src])
    nuclei["patch"] = pd.Categorical([meta[i][2] for i in src])
    return sdata


XENIUM_BREAST_TYPES = (
    "B",
    "Myeloid",
    "Endothelial",
    "Fibroblast",
    "Macrophage",
    "Malignant",
    "Epithelial",
    "Plasma",
    "T",
)


def xenium_breast_cells(*, path: str | Path | None = None) -> AnnData:
    """5,508 annotated Xenium breast-cancer cells x 280 genes (raw counts), a single-cell reference with no H&E.

    From the GHIST demo (Fu et al. 2024; 10x Xenium FFPE human breast cancer preview, Janesick et al. 2023).
    ``obs['cell_type']``: B, Myeloid, Endothelial, Fibroblast, Macrophage, Malignant, Epithelial, Plasma, T.
    """
    import anndata as ad

    root = data_dir("xenium_breast_cells", path=path)
    expr = pd.read_csv(root / "expr_mat_breast_demo.csv.gz", index_col=0)
    expr = expr.set_index("cell_id") if "cell_id" in expr.columns else expr
    types = pd.read_csv(root / "cell_types_breast_demo.csv").set_index("c_ids")["ct_idx"]
    common = expr.index.intersection(types.index)
    if len(common) == 0:
        raise ValueError(f"No cell of {root} has both expression and a cell type.")
    expr = expr.loc[common]
    names = np.asarray(XENIUM_BREAST_TYPES)[types.loc[common].to_numpy().astype(int)]
    obs = pd.DataFrame({"cell_type": pd.Categorical(names)}, index=common.astype(str))
    return ad.AnnData(X=expr.to_numpy(dtype=np.float32), obs=obs, var=pd.DataFrame(index=expr.columns.astype(str)))


def _write_10x_h5(path: Path, counts, barcodes, genes) -> None:
    """A 10x feature-barcode matrix (HDF5, Cell Ranger 3+ layout) of ``counts`` (barcodes x genes, sparse CSR)."""
    import h5py

    counts = counts.tocsr()  # its CSR arrays are those of the genes x barcodes CSC matrix that 10x stores
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = counts.data, counts.indices, counts.indptr
        g["shape"] = np.array(counts.shape[::-1], dtype=np.int64)
        g["barcodes"] = np.array([str(b).encode() for b in barcodes])
        feats = g.create_group("features")
        feats["name"] = np.array([str(v).encode() for v in genes])
        feats["id"] = feats["name"][()]
        feats["feature_type"] = np.array([b"Gene Expression"] * len(genes))
        feats["genome"] = np.array([b"synthetic"] * len(genes))


def write_synthetic_xenium(
    sdata: SpatialData,
    path: str | Path,
    *,
    offset_um: tuple[float, float] = (120.0, 40.0),
    pixel_size: float = 0.2125,
) -> np.ndarray:
    """Write the true cells of :func:`synthetic_tissue` as a Xenium output folder, with an H&E alignment file.

    The folder holds ``cells.csv.gz`` (centroids in a micron frame shifted by ``offset_um``),
    ``nucleus_boundaries.csv.gz`` (the outlines of the nuclei drawn in the H&E, 24 vertices each, same frame),
    ``cell_feature_matrix.h5`` (the true counts, 10x HDF5 layout), ``experiment.xenium`` and
    ``he_imagealignment.csv`` (H&E pixels -> Xenium pixels). Reading it back with
    ``scellst.io.xenium(path, he_image=..., alignment=path / "he_imagealignment.csv")`` gives a case where every
    answer of :func:`scellst.bench.compare_xenium` is known.

    Returns
    -------
    The 3x3 alignment matrix.
    """
    import json

    import scipy.sparse as sp

    from ._utils import affine_to_cs, get_microns_per_pixel, shapes_centroids

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    truth = sdata.tables[Key.TRUE_EXPRESSION]
    cells = sdata.shapes[Key.TRUE_CELLS]
    mpp = get_microns_per_pixel(sdata, Key.IMAGE)
    to_um = affine_to_cs(cells, "global")  # the synthetic tissue's global frame is in microns
    xy = shapes_centroids(cells) @ to_um[:2, :2].T + to_um[:2, 2] + np.asarray(offset_um)
    ids = truth.obs[Col.CELL_ID].astype(str).to_numpy()
    pos = pd.DataFrame(xy, index=cells.index.astype(str)).reindex(ids).to_numpy()
    radius = pd.Series(cells[Col.RADIUS].to_numpy(), index=cells.index.astype(str)).reindex(ids).to_numpy()
    radius_um = radius * abs(to_um[0, 0])
    pd.DataFrame(
        {"cell_id": ids, "x_centroid": pos[:, 0], "y_centroid": pos[:, 1], "cell_area": np.pi * radius_um**2}
    ).to_csv(folder / "cells.csv.gz", index=False)
    counts = sp.csr_matrix(np.round(np.asarray(truth.layers["counts"])).astype(np.int32))
    _write_10x_h5(folder / "cell_feature_matrix.h5", counts, ids, truth.var_names.astype(str))
    _write_nucleus_outlines(folder / "nucleus_boundaries.csv.gz", cells, ids, to_um, offset_um)
    (folder / "experiment.xenium").write_text(json.dumps({"pixel_size": pixel_size}))
    k = mpp / pixel_size
    alignment = np.array([[k, 0, offset_um[0] / pixel_size], [0, k, offset_um[1] / pixel_size], [0, 0, 1.0]])
    np.savetxt(folder / "he_imagealignment.csv", alignment, delimiter=",")
    return alignment


HD_BIN_SIZES_UM = (2, 8, 16)


def _hd_bin_counts(x_um, y_um, gene, n_genes: int, bin_um: float, shape: tuple[int, int]):
    """Transcripts binned on a square grid of ``bin_um`` (bins x genes CSR, row-major over ``shape`` = rows, cols)."""
    import scipy.sparse as sp

    rows, cols = shape
    r = np.clip((y_um // bin_um).astype(np.int64), 0, rows - 1)
    c = np.clip((x_um // bin_um).astype(np.int64), 0, cols - 1)
    counts = sp.coo_matrix((np.ones(len(gene), np.int32), (r * cols + c, gene)), shape=(rows * cols, n_genes))
    return counts.tocsr()


def write_synthetic_visium_hd(
    sdata: SpatialData,
    path: str | Path,
    *,
    bin_sizes_um: tuple[int, ...] = HD_BIN_SIZES_UM,
    cell_expansion_um: float = 3.0,
    cell_segmentations: bool = True,
    dataset_id: str = "synthetic_hd",
    seed: int = 0,
) -> Path:
    """Write a :func:`synthetic_tissue` as a Visium HD Space Ranger folder, with the true cells behind every bin.

    Every transcript of a true cell (``layers['counts']`` of ``tables['true_expression']``) is placed uniformly at
    random over the cell: a disk of the nucleus' major radius plus ``cell_expansion_um``. The transcripts are then
    binned on the 2 um grid of Visium HD and summed into the larger bins, as Space Ranger does. The folder holds
    ``feature_slice.h5`` (layout metadata), ``binned_outputs/square_XXXum/`` (``filtered_feature_bc_matrix.h5``,
    ``spatial/tissue_positions.parquet`` and ``spatial/scalefactors_json.json``), ``spatial/`` (hires and lowres
    images) and ``microscope_image/`` (the full-resolution H&E as TIFF), so :func:`spatialdata_io.visium_hd` and
    :func:`scellst.io.visium_hd` read it like a real capture area, and every cell's true expression is known.

    Parameters
    ----------
    sdata
        A :func:`synthetic_tissue` (with ``true_cells`` and ``true_expression``).
    path
        The folder to write (created; files in it are replaced).
    bin_sizes_um
        The bin sizes to write, multiples of 2 um.
    cell_expansion_um
        How far a cell's transcripts reach beyond its nucleus.
    cell_segmentations
        Also write Space Ranger 4's ``segmented_outputs/`` (``cell_segmentations.geojson``: each true cell's disk;
        ``filtered_feature_cell_matrix.h5``: its transcripts), an idealised cell segmentation.
    dataset_id
        The prefix of the files (``{dataset_id}_feature_slice.h5``) and the coordinate system of the reader.
    seed
        Random seed of the transcript positions.

    Returns
    -------
    The folder.
    """
    import tifffile
    from PIL import Image

    from ._utils import get_microns_per_pixel

    if any(b % 2 for b in bin_sizes_um) or not bin_sizes_um:
        raise ValueError(f"`bin_sizes_um` must be multiples of 2 um (the Visium HD grid), got {bin_sizes_um}.")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    truth = sdata.tables[Key.TRUE_EXPRESSION]
    cells = sdata.shapes[Key.TRUE_CELLS].set_axis(sdata.shapes[Key.TRUE_CELLS].index.astype(str))
    cells = cells.reindex(truth.obs[Col.CELL_ID].astype(str).to_numpy())
    mpp = get_microns_per_pixel(sdata, Key.IMAGE)
    image = sdata.images[Key.IMAGE]
    image = image["scale0"].image if hasattr(image, "keys") else image
    h_px, w_px = image.shape[1:]
    width_um, height_um = w_px * mpp, h_px * mpp

    # --- transcripts: each count of a cell at a random place of the cell ----------------------------------------
    counts = np.round(np.asarray(truth.layers["counts"])).astype(np.int64)
    cell_of, gene = np.nonzero(counts)
    reps = counts[cell_of, gene]
    cell_of, gene = np.repeat(cell_of, reps), np.repeat(gene, reps)
    radius_um = cells[Col.RADIUS].to_numpy() * mpp + cell_expansion_um
    rho = radius_um[cell_of] * np.sqrt(rng.uniform(size=len(cell_of)))
    theta = rng.uniform(0, 2 * np.pi, size=len(cell_of))
    x_um = cells.geometry.x.to_numpy()[cell_of] * mpp + rho * np.cos(theta)
    y_um = cells.geometry.y.to_numpy()[cell_of] * mpp + rho * np.sin(theta)
    inside = (x_um >= 0) & (x_um < width_um) & (y_um >= 0) & (y_um < height_um)
    x_um, y_um, gene, cell_of = x_um[inside], y_um[inside], gene[inside], cell_of[inside]

    # --- images ---------------------------------------------------------------------------------------------
    rgb = np.moveaxis(np.asarray(image), 0, -1)
    (folder / "microscope_image").mkdir(exist_ok=True)
    tifffile.imwrite(folder / "microscope_image" / "image.tif", rgb)
    hires_scalef = min(1.0, 2000.0 / max(h_px, w_px))
    lowres_scalef = min(1.0, 600.0 / max(h_px, w_px))
    (folder / "spatial").mkdir(exist_ok=True)
    for name, f in (("tissue_hires_image.png", hires_scalef), ("tissue_lowres_image.png", lowres_scalef)):
        size = (max(1, round(w_px * f)), max(1, round(h_px * f)))
        Image.fromarray(rgb).resize(size, Image.BILINEAR).save(folder / "spatial" / name)
    base_factors = {
        "tissue_hires_scalef": hires_scalef,
        "tissue_lowres_scalef": lowres_scalef,
        "microns_per_pixel": mpp,
        "regist_target_img_scalef": hires_scalef,
    }

    # --- bins -----------------------------------------------------------------------------------------------
    genes = truth.var_names.astype(str)
    for bin_um in sorted(bin_sizes_um):
        rows, cols = int(np.ceil(height_um / bin_um)), int(np.ceil(width_um / bin_um))
        name = f"square_{bin_um:03d}um"
        spatial = folder / "binned_outputs" / name / "spatial"
        spatial.mkdir(parents=True, exist_ok=True)
        matrix = _hd_bin_counts(x_um, y_um, gene, len(genes), float(bin_um), (rows, cols))
        r, c = np.divmod(np.arange(rows * cols), cols)
        barcodes = np.char.add(np.char.add(f"s_{bin_um:03d}um_", np.char.zfill(r.astype(str), 5)), "_")
        barcodes = np.char.add(np.char.add(barcodes, np.char.zfill(c.astype(str), 5)), "-1")
        _write_10x_h5(spatial.parent / "filtered_feature_bc_matrix.h5", matrix, barcodes, genes)
        pd.DataFrame(
            {
                "barcode": barcodes,
                "in_tissue": np.ones(rows * cols, dtype=np.int32),
                "array_row": r.astype(np.int32),
                "array_col": c.astype(np.int32),
                "pxl_row_in_fullres": (r + 0.5) * bin_um / mpp,
                "pxl_col_in_fullres": (c + 0.5) * bin_um / mpp,
            }
        ).to_parquet(spatial / "tissue_positions.parquet", index=False)
        factors = {**base_factors, "bin_size_um": float(bin_um), "spot_diameter_fullres": bin_um / mpp}
        (spatial / "scalefactors_json.json").write_text(json.dumps(factors))
    (folder / "spatial" / "scalefactors_json.json").write_text(
        json.dumps({**base_factors, "bin_size_um": 2.0, "spot_diameter_fullres": 2.0 / mpp})
    )
    if cell_segmentations:
        _write_hd_cells(folder / "segmented_outputs", cells, radius_um / mpp, cell_of, gene, genes, base_factors)
    _write_feature_slice(folder / f"{dataset_id}_feature_slice.h5", mpp)
    logger.info(
        f"Wrote a synthetic Visium HD folder {str(folder)!r}: {len(gene):,} transcripts of {len(cells):,} cells in "
        f"bins of {', '.join(f'{b} um' for b in sorted(bin_sizes_um))}"
    )
    return folder


def _write_hd_cells(folder: Path, cells, radius_px, cell_of, gene, genes, factors: dict) -> None:
    """Space Ranger 4 ``segmented_outputs``: the cells' outlines (GeoJSON, full-res pixels) and their counts."""
    import scipy.sparse as sp

    (folder / "spatial").mkdir(parents=True, exist_ok=True)
    n = len(cells)
    counts = sp.coo_matrix((np.ones(len(gene), np.int32), (cell_of, gene)), shape=(n, len(genes))).tocsr()
    ids = np.arange(1, n + 1)
    _write_10x_h5(folder / "filtered_feature_cell_matrix.h5", counts, [f"cellid_{i:09d}-1" for i in ids], genes)
    t = np.linspace(0, 2 * np.pi, 25)  # closed rings: the last vertex repeats the first
    t[-1] = 0.0
    x = (cells.geometry.x.to_numpy()[:, None] + radius_px[:, None] * np.cos(t)).round(2)
    y = (cells.geometry.y.to_numpy()[:, None] + radius_px[:, None] * np.sin(t)).round(2)
    features = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [np.column_stack([x[i], y[i]]).tolist()]},
            "properties": {"cell_id": int(ids[i])},
        }
        for i in range(n)
    ]
    (folder / "cell_segmentations.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps({**factors, "bin_size_um": 2.0}))


def _write_feature_slice(path: Path, mpp: float) -> None:
    """The layout metadata of Space Ranger's ``feature_slice.h5`` (file format 1.0; identity alignment)."""
    import h5py

    pitch_px = 2.0 / mpp  # 2 um bins, spot col/row -> microscope col/row
    to_microscope = [pitch_px, 0.0, 0.0, 0.0, pitch_px, 0.0, 0.0, 0.0, 1.0]
    to_spot = [1 / pitch_px, 0.0, 0.0, 0.0, 1 / pitch_px, 0.0, 0.0, 0.0, 1.0]
    identity = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    layout = {"file_format": "1.0", "transform": identity, "spot_pitch": 2.0}
    metadata = {
        "hd_layout_json": json.dumps(layout),
        "transform_matrices": {
            "spot_colrow_to_microscope_colrow": to_microscope,
            "microscope_colrow_to_spot_colrow": to_spot,
            "cytassist_colrow_to_spot_colrow": identity,
            "spot_colrow_to_cytassist_colrow": identity,
        },
    }
    with h5py.File(path, "w") as f:
        f.attrs["metadata_json"] = json.dumps(metadata)
