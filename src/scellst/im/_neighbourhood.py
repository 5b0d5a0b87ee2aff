"""Neighbourhood features: what surrounds each cell, as Gaussian-weighted means of its neighbours' features.

A nucleus alone says little about the tissue it sits in; the same nucleus in a tumour nest, in stroma or in an immune
infiltrate belongs to spots of very different expression. These features describe the surroundings of every cell at
a few scales, from all the cells of the slide (inside spots or not), so that they are the same at training and on
H&E-only slides. They are computed on a grid (binned sums smoothed with a Gaussian, then read back at each cell):
the cost grows with the slide's area, not with the square of its number of cells.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_CONTEXT_UM = (50.0, 100.0, 200.0, 400.0)
_BINS_PER_RADIUS = 5  # grid bin = radius / 5: fine enough for a smooth Gaussian of sd radius / 2


def context_feature_names(feature_names: Sequence[str], radii_um: Sequence[float]) -> list[str]:
    """Names of the neighbourhood features: per radius, the density then each feature's neighbourhood mean.

    The columns that :func:`scellst.im.neighbourhood_features` returns, in its order.

    Parameters
    ----------
    feature_names
        The cell's own feature names.
    radii_um
        The radii, in microns.

    Returns
    -------
    ``density_nb{r}um`` then ``{feature}_nb{r}um`` for every feature, radius by radius.
    """
    names = []
    for r in radii_um:
        tag = f"nb{float(r):g}um"
        names.append(f"density_{tag}")
        names.extend(f"{f}_{tag}" for f in feature_names)
    return names


def check_radii(radii_um: Sequence[float] | None) -> tuple[float, ...]:
    """Validated radii (microns), in the order given; ``None`` or empty gives no radius."""
    radii = tuple(float(r) for r in (radii_um or ()))
    if any(not np.isfinite(r) or r <= 0 for r in radii):
        raise ValueError(f"Neighbourhood radii must be positive numbers of microns, got {list(radii_um or ())}.")
    if len(set(radii)) != len(radii):
        raise ValueError(f"Neighbourhood radii must differ from each other, got {list(radii)}.")
    return radii


def neighbourhood_features(xy_um: np.ndarray, values: np.ndarray, radii_um: Sequence[float]) -> np.ndarray:
    """Density and Gaussian-weighted mean features of every cell's neighbourhood, at each radius.

    For each radius ``r`` (microns), cells are weighted by a Gaussian of standard deviation ``r / 2`` around each cell
    (most of the weight lies within ``r``; the cell itself included). Returns, per radius, one column of local
    density (``log1p`` of the other cells per 100 x 100 um) and one column per feature of ``values`` (the weighted mean of
    that feature over the neighbourhood), in the order of :func:`context_feature_names`.

    Parameters
    ----------
    xy_um
        Cell positions in microns (cells x 2).
    values
        Cell features (cells x features), without NaN.
    radii_um
        Neighbourhood scales in microns.

    Returns
    -------
    A float32 array of cells x ``len(radii_um) * (1 + n_features)``.
    """
    from scipy import ndimage

    xy = np.asarray(xy_um, dtype=np.float64)
    x = np.asarray(values, dtype=np.float64)
    radii = check_radii(radii_um)
    if xy.ndim != 2 or xy.shape[1] != 2 or len(xy) != len(x):
        raise ValueError(f"`xy_um` must be cells x 2 for the {len(x)} cells, got shape {xy.shape}.")
    if not np.isfinite(xy).all() or not np.isfinite(x).all():
        raise ValueError("Cell positions and features must be finite to compute neighbourhood features.")
    n, f = x.shape
    out = np.empty((n, len(radii) * (1 + f)), dtype=np.float32)
    if n == 0:
        return out
    origin = xy.min(axis=0)
    for k, r in enumerate(radii):
        step = r / _BINS_PER_RADIUS
        ij = np.floor((xy - origin) / step).astype(np.int64)
        w, h = int(ij[:, 0].max()) + 1, int(ij[:, 1].max()) + 1
        flat = ij[:, 1] * w + ij[:, 0]
        coords = np.stack([(xy[:, 1] - origin[1]) / step - 0.5, (xy[:, 0] - origin[0]) / step - 0.5])
        sigma = (r / 2.0) / step

        def smoothed(weights: np.ndarray | None, flat=flat, h=h, w=w, sigma=sigma, coords=coords) -> np.ndarray:
            grid = np.bincount(flat, weights=weights, minlength=h * w).reshape(h, w).astype(np.float32)
            grid = ndimage.gaussian_filter(grid, sigma, mode="constant")
            return ndimage.map_coordinates(grid, coords, order=1, mode="nearest")

        count = np.maximum(smoothed(None), 1e-6)
        col = k * (1 + f)
        own = 1.0 / (2 * np.pi * (r / 2.0) ** 2)  # the cell's own weight per um2, left out of its density
        out[:, col] = np.log1p(np.maximum(count / step**2 - own, 0.0) * 1e4)
        for j in range(f):
            out[:, col + 1 + j] = smoothed(x[:, j]) / count
    return out
