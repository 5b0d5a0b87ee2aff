from __future__ import annotations

import numpy as np
import shapely
from skimage.draw import polygon as draw_polygon

from scellst.im._raster import fill_polygons


def _one_by_one(polys, values, shape, offset, keep_tiny):
    """The reference: skimage.draw.polygon per polygon, later ones over earlier ones."""
    out = np.zeros(shape, dtype=np.int32)
    oy, ox = offset
    for poly, v in zip(polys, values, strict=True):
        xy = np.asarray(poly.exterior.coords)
        rr, cc = draw_polygon(xy[:, 1] - oy, xy[:, 0] - ox, shape=shape)
        if len(rr) == 0 and keep_tiny:
            c = poly.centroid
            r0, c0 = int(round(c.y - oy)), int(round(c.x - ox))
            if 0 <= r0 < shape[0] and 0 <= c0 < shape[1]:
                rr, cc = np.array([r0]), np.array([c0])
        out[rr, cc] = v
    return out


def _random_polygons(rng, n):
    polys = []
    while len(polys) < n:
        k = rng.integers(3, 12)
        centre, radius = rng.uniform(-20, 120, 2), rng.uniform(0.2, 15)
        angle = np.sort(rng.uniform(0, 2 * np.pi, k))
        r = radius * rng.uniform(0.5, 1, k)
        pts = centre + np.column_stack([r * np.cos(angle), r * np.sin(angle)])
        grid = rng.random()
        if grid < 0.3:
            pts = np.round(pts)  # vertices and edges through pixel centres: on the boundary counts as inside
        elif grid < 0.5:
            pts = np.round(pts * 2) / 2
        poly = shapely.Polygon(pts)
        if poly.is_valid and poly.area > 0:
            polys.append(poly)
    return polys


def test_fill_polygons_matches_skimage_polygon_by_polygon():
    """Bitwise the pixels of skimage.draw.polygon: edges and vertices on pixel centres, clipping, overlaps, tiny ones."""
    rng = np.random.default_rng(0)
    polys = _random_polygons(rng, 1500)
    values = rng.permutation(np.arange(1, len(polys) + 1)).astype(np.int32)
    for offset in ((0.0, 0.0), (7.0, -3.0), (0.25, 0.5)):
        for keep_tiny in (False, True):
            want = _one_by_one(polys, values, (100, 90), offset, keep_tiny)
            got = fill_polygons(polys, values, (100, 90), offset, keep_tiny=keep_tiny)
            np.testing.assert_array_equal(got, want)
    # one polygon at a time too (nothing hidden by a later polygon)
    for poly in polys[:300]:
        want = _one_by_one([poly], [1], (100, 90), (0.0, 0.0), True)
        np.testing.assert_array_equal(fill_polygons([poly], np.array([1]), (100, 90), keep_tiny=True), want)
    assert fill_polygons([], np.zeros(0), (5, 5)).sum() == 0


def test_convex_hull_pixel_counts_equal_skimage():
    """Every label's convex hull image as skimage counts it: blobs, lines, single pixels, scattered labels."""
    from scipy import ndimage as ndi
    from skimage.morphology import convex_hull_image

    from scellst.im._raster import convex_hull_pixel_counts

    rng = np.random.default_rng(1)
    blobs = ndi.gaussian_filter((rng.random((300, 300)) > 0.6).astype(float), 2) > 0.45
    scattered = (rng.random((120, 120)) > 0.85) * rng.integers(1, 60, (120, 120))  # labels in pieces far apart
    lines = np.zeros((40, 40), dtype=np.int64)
    lines[5, 3:30], lines[8:35, 20], lines[30, 30] = 1, 2, 3  # a row, a column, one pixel
    lines[np.arange(10, 25), np.arange(2, 17)] = 4  # a diagonal
    for labels in (ndi.label(blobs)[0], scattered, lines):
        n = int(labels.max()) + 1
        rows, cols = np.nonzero(labels)
        counts = convex_hull_pixel_counts(labels[rows, cols], rows, cols, n)
        slices = ndi.find_objects(labels)
        present = [i for i in range(1, n) if slices[i - 1] is not None]
        want = [convex_hull_image(labels[slices[i - 1]] == i).sum() for i in present]
        assert len(present) > 3
        np.testing.assert_array_equal(counts[present], want)
        assert (counts[[i for i in range(n) if i not in present]] == 0).all()
    assert (convex_hull_pixel_counts(np.zeros(0), np.zeros(0), np.zeros(0), 3) == 0).all()
