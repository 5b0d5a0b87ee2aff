"""Many polygons drawn into a label image at once (the pixels of :func:`skimage.draw.polygon`, without its loop)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _group_starts(key: np.ndarray) -> np.ndarray:
    """Where each run of equal values of a sorted array starts."""
    return np.flatnonzero(np.r_[True, key[1:] != key[:-1]])


def polygon_pixels(
    polygons: Sequence, shape: tuple[int, int], offset: tuple[float, float] = (0.0, 0.0)
) -> tuple[np.ndarray, np.ndarray]:
    """The pixels inside each polygon: ``(flat pixel index, polygon number)``, polygons in order.

    A pixel belongs to a polygon when its centre is inside the polygon's exterior ring by the even-odd rule of
    :func:`skimage.draw.polygon` (a crossing counts when the scan line is at or above an edge's lower end and below
    its upper end, and strictly left of the crossing point), so the pixels are the ones ``skimage.draw.polygon``
    gives, for all the polygons at once: every edge is cut by the pixel rows it spans, and the crossings of each row
    are paired. ``offset = (y0, x0)`` is the image's top-left pixel in the polygons' frame; pixels outside ``shape``
    are left out.
    """
    import shapely

    h, w = shape
    polys = np.asarray(polygons, dtype=object)
    empty = np.zeros(0, dtype=np.int64)
    if len(polys) == 0:
        return empty, empty
    xy, ring = shapely.get_coordinates(shapely.get_exterior_ring(polys), return_index=True)
    if len(xy) == 0:
        return empty, empty
    xs, ys = xy[:, 0] - offset[1], xy[:, 1] - offset[0]
    # each vertex i closes the edge from the previous vertex j of its ring (the first closes from the ring's last)
    prev = np.arange(len(xy)) - 1
    first = _group_starts(ring)
    last = np.r_[first[1:], len(xy)] - 1
    prev[first] = last
    xi, yi, xj, yj = xs, ys, xs[prev], ys[prev]
    lo, hi = np.minimum(yi, yj), np.maximum(yi, yj)
    r0 = np.maximum(np.ceil(lo), 0).astype(np.int64)  # integer rows y with lo <= y < hi, inside the image
    r1 = np.minimum(np.ceil(hi), h).astype(np.int64)
    n_rows = np.maximum(r1 - r0, 0)
    e = np.repeat(np.arange(len(xy)), n_rows)
    y = (r0[e] + np.arange(len(e)) - np.repeat(np.cumsum(n_rows) - n_rows, n_rows)).astype(np.float64)
    x_cross = (xj[e] - xi[e]) * (y - yi[e]) / (yj[e] - yi[e]) + xi[e]
    poly = ring[e]
    order = np.lexsort((x_cross, y, poly))  # by polygon, row, then crossing
    poly, y, x_cross = poly[order], y[order].astype(np.int64), x_cross[order]
    # crossings come in pairs on every row of a closed ring: inside from the odd ones to the even ones
    c0 = np.maximum(np.ceil(x_cross[0::2]), 0).astype(np.int64)
    c1 = np.minimum(np.ceil(x_cross[1::2]), w).astype(np.int64)
    rows, owner = y[0::2], poly[0::2]
    n_px = np.maximum(c1 - c0, 0)
    start = rows * w + c0
    k = np.repeat(np.arange(len(n_px)), n_px)
    flat = start[k] + np.arange(len(k)) - np.repeat(np.cumsum(n_px) - n_px, n_px)
    b_flat, b_owner = _boundary_pixels(xi, yi, xj, yj, ring, shape)
    if len(b_flat) == 0:
        return flat, owner[k]
    flat, owner = np.concatenate([flat, b_flat]), np.concatenate([owner[k], b_owner])
    order = np.argsort(owner, kind="stable")
    return flat[order], owner[order]


def _boundary_pixels(xi, yi, xj, yj, ring, shape) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres exactly on an edge or a vertex (``skimage.draw.polygon`` counts them in): flat index, polygon."""
    h, w = shape
    flats, owners = [], []
    sloped = yi != yj
    # sloped edges: the rows they meet (ends included), where the crossing falls on a whole column
    lo, hi = np.minimum(yi, yj), np.maximum(yi, yj)
    r0 = np.maximum(np.ceil(lo), 0).astype(np.int64)
    r1 = np.minimum(np.floor(hi), h - 1).astype(np.int64)
    n_rows = np.where(sloped, np.maximum(r1 - r0 + 1, 0), 0)
    e = np.repeat(np.arange(len(xi)), n_rows)
    if len(e):
        y = (r0[e] + np.arange(len(e)) - np.repeat(np.cumsum(n_rows) - n_rows, n_rows)).astype(np.float64)
        x = (xj[e] - xi[e]) * (y - yi[e]) / (yj[e] - yi[e]) + xi[e]
        on = (x == np.round(x)) & (x >= 0) & (x < w)
        flats.append(y[on].astype(np.int64) * w + x[on].astype(np.int64))
        owners.append(ring[e[on]])
    # horizontal edges on a whole row: every whole column between their ends
    flat_edge = ~sloped & (yi == np.round(yi)) & (yi >= 0) & (yi < h)
    c0 = np.maximum(np.ceil(np.minimum(xi, xj)), 0).astype(np.int64)
    c1 = np.minimum(np.floor(np.maximum(xi, xj)), w - 1).astype(np.int64)
    n_cols = np.where(flat_edge, np.maximum(c1 - c0 + 1, 0), 0)
    e = np.repeat(np.arange(len(xi)), n_cols)
    if len(e):
        x = c0[e] + np.arange(len(e)) - np.repeat(np.cumsum(n_cols) - n_cols, n_cols)
        flats.append(yi[e].astype(np.int64) * w + x)
        owners.append(ring[e])
    # vertices on pixel centres (an edge's ends are not always met above: a vertex between two horizontal edges)
    on = (xi == np.round(xi)) & (yi == np.round(yi)) & (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    flats.append(yi[on].astype(np.int64) * w + xi[on].astype(np.int64))
    owners.append(ring[on])
    return np.concatenate(flats), np.concatenate(owners)


def fill_polygons(
    polygons: Sequence,
    values: np.ndarray,
    shape: tuple[int, int],
    offset: tuple[float, float] = (0.0, 0.0),
    *,
    dtype=np.int32,
    keep_tiny: bool = False,
) -> np.ndarray:
    """A label image of ``shape`` with each polygon's pixels (see :func:`polygon_pixels`) set to its value.

    Where polygons overlap, the later one wins, as drawing them one after the other would. ``keep_tiny``: a polygon
    that covers no pixel centre gets the pixel under its centroid (when inside the image), in its turn.
    """
    h, w = shape
    values = np.asarray(values)
    out = np.zeros(shape, dtype=dtype)
    flat, owner = polygon_pixels(polygons, shape, offset)
    if keep_tiny and len(values):
        import shapely

        drawn = np.zeros(len(values), dtype=bool)
        drawn[owner] = True
        tiny = np.flatnonzero(~drawn)
        if len(tiny):
            c = shapely.centroid(np.asarray(polygons, dtype=object)[tiny])
            r = np.round(shapely.get_y(c) - offset[0])
            col = np.round(shapely.get_x(c) - offset[1])
            ok = (r >= 0) & (r < h) & (col >= 0) & (col < w)
            extra_flat = r[ok].astype(np.int64) * w + col[ok].astype(np.int64)
            flat = np.concatenate([flat, extra_flat])
            owner = np.concatenate([owner, tiny[ok]])
            order = np.argsort(owner, kind="stable")  # back to polygon order
            flat, owner = flat[order], owner[order]
    if len(flat) == 0:
        return out
    # the last polygon at each pixel wins
    rev_flat = flat[::-1]
    pixels, last = np.unique(rev_flat, return_index=True)
    out.ravel()[pixels] = values[owner[::-1][last]]
    return out


def convex_hull_pixel_counts(label: np.ndarray, row: np.ndarray, col: np.ndarray, n: int) -> np.ndarray:
    """Pixels of each label's convex hull image, as ``skimage.morphology.convex_hull_image(mask).sum()`` counts them.

    ``label``, ``row``, ``col``: the labelled pixels (any order); returns ``n`` counts (0 for absent labels).
    skimage's hull (``offset_coordinates=True``) surrounds the midpoints of the four edges of every pixel, and its
    image holds the pixel centres inside it or on its border. Here, for all labels at once: the leftmost and rightmost
    pixel of each label in each row give the hull's points (the hull of a set is the hull of its row ends), GEOS
    gives the hulls (``shapely.convex_hull`` of a line through the points), and the centres are counted row by row,
    each hull edge cut at the pixel rows it spans. All coordinates are doubled into integers, so the border test is
    exact.
    """
    import shapely

    out = np.zeros(n, dtype=np.int64)
    label, row, col = (np.asarray(a, dtype=np.int64) for a in (label, row, col))
    if len(label) == 0:
        return out
    key = label * (int(row.max()) + 1) + row
    order = np.argsort(key, kind="stable")
    key, col = key[order], col[order]
    start = _group_starts(key)
    lab, r = label[order][start], row[order][start]
    left, right = np.minimum.reduceat(col, start), np.maximum.reduceat(col, start)
    # the midpoints of the pixel edges of the row ends, doubled: (x, y) = (2 col +- 1, 2 row) and (2 col, 2 row +- 1)
    ys = np.stack([2 * r, 2 * r - 1, 2 * r + 1, 2 * r, 2 * r - 1, 2 * r + 1], axis=1)
    xs = np.stack([2 * left - 1, 2 * left, 2 * left, 2 * right + 1, 2 * right, 2 * right], axis=1)
    labels, geom = np.unique(lab, return_inverse=True)
    points = np.column_stack([xs.ravel(), ys.ravel()]).astype(np.float64)
    hulls = shapely.convex_hull(shapely.linestrings(points, indices=np.repeat(geom, 6)))  # hull of the vertices
    xy, g = shapely.get_coordinates(hulls, return_index=True)  # closed rings: consecutive points are the edges
    xy = np.rint(xy).astype(np.int64)
    edge = np.flatnonzero(g[1:] == g[:-1])
    x0, y0, x1, y1, g = xy[edge, 0], xy[edge, 1], xy[edge + 1, 0], xy[edge + 1, 1], g[edge]
    swap = y0 > y1
    x0, x1 = np.where(swap, x1, x0), np.where(swap, x0, x1)
    y0, y1 = np.where(swap, y1, y0), np.where(swap, y0, y1)
    # every pixel row y with 2 y within the edge's span, and the pixel centres left and right of the crossing
    first, last = -((-y0) // 2), y1 // 2
    n_rows = np.maximum(last - first + 1, 0)
    e = np.repeat(np.arange(len(edge)), n_rows)
    y = first[e] + np.arange(len(e)) - np.repeat(np.cumsum(n_rows) - n_rows, n_rows)
    dy = (y1 - y0)[e]
    flat = dy == 0  # a horizontal edge on a pixel row: both ends
    num = x0[e] * dy + (x1 - x0)[e] * (2 * y - y0[e])
    den = np.where(flat, 1, 2 * dy)
    lo = np.where(flat, -((-np.minimum(x0, x1)[e]) // 2), -((-num) // den))
    hi = np.where(flat, np.maximum(x0, x1)[e] // 2, num // den)
    # per hull and row (every hull spans at least one pixel row): the centres from the leftmost crossing to the
    # rightmost
    key = g[e] * (int(y.max()) + 1) + y  # rows are >= 0: the hull of row r reaches no higher than 2 r - 1
    order = np.argsort(key, kind="stable")
    start = _group_starts(key[order])
    width = np.maximum(np.maximum.reduceat(hi[order], start) - np.minimum.reduceat(lo[order], start) + 1, 0)
    out[labels] = np.bincount(g[e][order][start], weights=width, minlength=len(labels)).astype(np.int64)
    return out
