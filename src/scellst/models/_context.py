"""Spot context of cells: spot means, spot neighbourhoods and virtual spots (numpy only, no torch).

Models that look beyond the cell (DeepSpot2Cell, MISO) need, for every spot, the mean embedding of its cells and its
nearest spots on the same slide; for every cell, the spot that provides its context. Cells outside every spot (between
Visium spots, or on an H&E-only slide) take the context of the nearest spot, or of a virtual spot: a square of the
slide holding about as many cells as a training spot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class SpotContext:
    """Where the cells of one slide sit: spots (bags of cell indices) and/or positions.

    ``spot_xy`` and ``cell_xy`` must be in the same frame when both are given (only ranks of distances are used, so
    the unit does not matter).
    """

    bags: Sequence[np.ndarray] | None = None
    spot_xy: np.ndarray | None = None
    cell_xy: np.ndarray | None = None


def spot_means(x: np.ndarray, bags: Sequence[np.ndarray]) -> np.ndarray:
    """Mean row of ``x`` over each bag (spots x features); an empty bag gives zeros."""
    import scipy.sparse as sp

    sizes = np.array([len(b) for b in bags])
    if len(bags) == 0:
        return np.zeros((0, x.shape[1]), dtype=np.float32)
    rows = np.repeat(np.arange(len(bags)), sizes)
    cols = np.concatenate([np.asarray(b, dtype=np.int64) for b in bags]) if sizes.sum() else np.zeros(0, np.int64)
    weights = 1.0 / np.maximum(sizes, 1)[rows]
    avg = sp.csr_matrix((weights, (rows, cols)), shape=(len(bags), x.shape[0]))
    return np.asarray(avg @ x, dtype=np.float32)


def spot_neighbors(spot_xy: np.ndarray | None, k: int, groups: np.ndarray | None = None, *, n: int = 0) -> np.ndarray:
    """Indices of the ``k`` nearest spots of each spot (itself first), within its group (slide).

    Returns an integer array (spots x k). A slide with fewer than ``k`` spots repeats its farthest neighbours.
    Without positions (``spot_xy=None``, ``n`` spots) every spot is its only neighbour (an ``n x 1`` array).
    """
    from scipy.spatial import cKDTree

    if k < 1:
        raise ValueError(f"The number of neighbouring spots must be at least 1, got {k}.")
    if spot_xy is None:
        return np.arange(n, dtype=np.int64)[:, None]
    n = len(spot_xy)
    groups = np.zeros(n, dtype=int) if groups is None else np.asarray(groups)
    out = np.empty((n, k), dtype=np.int64)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        kk = min(k, len(idx))
        _, nn = cKDTree(np.asarray(spot_xy, dtype=float)[idx]).query(spot_xy[idx], k=kk)
        nn = np.asarray(nn).reshape(len(idx), kk)
        # itself first (coinciding spots may come in another order), then the others by distance
        self_pos = np.arange(len(idx))
        rest = np.where(nn == self_pos[:, None], -1, nn)
        rest = np.take_along_axis(rest, np.argsort(rest == -1, axis=1, kind="stable"), axis=1)
        nn = np.column_stack([self_pos, rest[:, : kk - 1]])
        if kk < k:
            nn = np.concatenate([nn, np.repeat(nn[:, -1:], k - kk, axis=1)], axis=1)
        out[idx] = idx[nn]
    return out


def neighbour_means(spot_x: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Mean of the neighbouring spots' features, excluding the spot itself (column 0); itself when alone."""
    if neighbours.shape[1] < 2:
        return spot_x.copy()
    return spot_x[neighbours[:, 1:]].mean(axis=1).astype(np.float32)


def virtual_bags(cell_xy: np.ndarray, cells_per_spot: float) -> tuple[list[np.ndarray], np.ndarray]:
    """Square virtual spots holding about ``cells_per_spot`` cells each, from the local cell density.

    The square side is set so that a disk holding ``cells_per_spot`` cells (median distance to the
    ``cells_per_spot``-th nearest cell) has the same area. Returns the bags and their centres.
    """
    from scipy.spatial import cKDTree

    xy = np.asarray(cell_xy, dtype=float)
    if len(xy) == 0:
        return [], np.zeros((0, 2))
    m = int(max(1, min(round(cells_per_spot), len(xy) - 1)))
    if m < 1 or len(xy) < 2:
        return [np.arange(len(xy))], xy.mean(axis=0, keepdims=True)
    sample = xy[np.random.default_rng(0).choice(len(xy), size=min(len(xy), 5000), replace=False)]
    dist, _ = cKDTree(xy).query(sample, k=m + 1)
    radius = float(np.median(np.asarray(dist).reshape(len(sample), -1)[:, -1]))
    side = max(np.sqrt(np.pi) * radius, 1e-9)
    keys = np.floor((xy - xy.min(axis=0)) / side).astype(np.int64)
    _, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    order = np.argsort(inverse, kind="stable")
    splits = np.flatnonzero(np.diff(inverse[order])) + 1
    bags = np.split(order, splits)
    centres = np.stack([xy[b].mean(axis=0) for b in bags])
    return bags, centres


def cell_spots(
    n_cells: int, context: SpotContext, *, cells_per_spot: float
) -> tuple[np.ndarray, list, np.ndarray | None]:
    """The context spot of every cell, and the spots (bags, centres or ``None`` when unknown) used.

    Cells in a spot take that spot (the first one if they are in several); others take the nearest spot when cell
    and spot positions are known; with positions but no spot, virtual spots are built (:func:`virtual_bags`). Cells
    with no spot and no position get ``-1`` (their own features serve as context).
    """
    cell_xy = None if context.cell_xy is None else np.asarray(context.cell_xy, dtype=float)
    if cell_xy is not None and len(cell_xy) != n_cells:
        raise ValueError(f"`cell_xy` has {len(cell_xy)} rows for {n_cells} cells.")
    if context.bags is None or len(context.bags) == 0:
        if cell_xy is None:
            raise ValueError(
                "This model needs the cells' spots or positions for their context: pass the cells' spot assignment "
                "(`scellst.pp.assign_cells`) or centroids (obsm['spatial'] of the embedding table)."
            )
        bags, spot_xy = virtual_bags(cell_xy, cells_per_spot)
    else:
        bags = [np.asarray(b, dtype=np.int64) for b in context.bags]
        spot_xy = None if context.spot_xy is None else np.asarray(context.spot_xy, dtype=float)
    spot_of = np.full(n_cells, -1, dtype=np.int64)
    for i in range(len(bags) - 1, -1, -1):  # reverse: the first bag of a cell wins
        spot_of[bags[i]] = i
    missing = np.flatnonzero(spot_of < 0)
    if len(missing) and cell_xy is not None and context.spot_xy is not None:
        from scipy.spatial import cKDTree

        _, nearest = cKDTree(spot_xy).query(cell_xy[missing], k=1)
        spot_of[missing] = nearest
    elif len(missing) and cell_xy is not None and context.bags is not None and len(context.bags):
        extra, _extra_xy = virtual_bags(cell_xy[missing], cells_per_spot)
        base = len(bags)
        for j, b in enumerate(extra):
            spot_of[missing[b]] = base + j
        bags = bags + [missing[b] for b in extra]
        spot_xy = None  # real and virtual spots share no frame: each spot is its own neighbourhood
    return spot_of, bags, spot_xy
