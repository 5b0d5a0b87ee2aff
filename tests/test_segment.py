from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

import scellst
from scellst._utils import shapes_centroids

from .conftest import fresh_copy


def test_segmentation_recovers_synthetic_nuclei(processed):
    nuclei = processed.shapes["nuclei"]
    truth = shapes_centroids(processed.shapes["true_cells"])
    pred = shapes_centroids(nuclei)
    d, idx = cKDTree(truth).query(pred)
    matched = d * 0.5 <= 2.0  # within 2 um
    precision = matched.mean()
    recall = len(np.unique(idx[matched])) / len(truth)
    assert precision > 0.9
    assert recall > 0.85
    assert (nuclei["area_um2"] >= 8).all()
    assert list(nuclei.index[:3]) == [1, 2, 3]


def test_tiling_does_not_change_the_result(tissue):
    a, b = fresh_copy(tissue), fresh_copy(tissue)
    scellst.im.segment_nuclei(a, tile_size=4096, labels_key_added="", show_progress_bar=False)
    scellst.im.segment_nuclei(b, tile_size=300, labels_key_added="", show_progress_bar=False)
    na, nb = len(a.shapes["nuclei"]), len(b.shapes["nuclei"])
    assert abs(na - nb) <= 0.01 * na
    # every nucleus of the big tile is found once with small tiles
    ca, cb = shapes_centroids(a.shapes["nuclei"]), shapes_centroids(b.shapes["nuclei"])
    d, _ = cKDTree(cb).query(ca)
    assert (d < 1.0).mean() > 0.98
    assert "nuclei_labels" not in a.labels


def test_label_image_matches_polygons(processed):
    labels = processed.labels["nuclei_labels"]
    arr = np.asarray(labels.data[:400, :400])
    nuclei = processed.shapes["nuclei"]
    ids = set(np.unique(arr)) - {0}
    assert ids <= set(nuclei.index)
    inside = nuclei.loc[sorted(ids)]
    bounds = inside.geometry.bounds
    inside = inside[(bounds["maxx"] < 399) & (bounds["maxy"] < 399)]  # not cut by the crop
    assert len(inside) > 20
    area_px = np.bincount(arr.ravel(), minlength=nuclei.index.max() + 1)[inside.index]
    ratio = area_px / inside.geometry.area.to_numpy()
    assert np.median(ratio) == pytest.approx(1.0, abs=0.05)
    assert ratio.min() > 0.8


def test_segment_refuses_to_overwrite(processed):
    sdata = fresh_copy(processed)
    with pytest.raises(ValueError, match="already exists"):
        scellst.im.segment_nuclei(sdata, show_progress_bar=False)
    n_before = len(sdata.shapes["nuclei"])
    with pytest.raises(KeyError, match="No H&E image 'nope'"):
        scellst.im.segment_nuclei(sdata, "nope", key_added="other")
    assert len(sdata.shapes["nuclei"]) == n_before


def test_segmentation_on_real_monuseg(data_dir):
    """Real H&E: nuclei counts and detection F1 (IoU > 0.5 approximated by centroid matching) on a MoNuSeg tile."""
    import json

    from skimage.io import imread

    root = data_dir / "monuseg"
    entry = json.loads((root / "index.json").read_text())[0]
    image = imread(root / "images" / f"{entry['name']}.png")[..., :3]
    true = imread(root / "instance_masks" / f"{entry['name']}.png")
    mpp = float(entry["microns_per_pixel"])
    sdata = scellst.io.from_image(image, microns_per_pixel=mpp)
    scellst.im.segment_nuclei(sdata, show_progress_bar=False)
    pred = np.asarray(sdata.labels["nuclei_labels"].data)
    n_true = len(np.unique(true)) - 1
    n_pred = len(sdata.shapes["nuclei"])
    assert 0.5 * n_true < n_pred < 1.5 * n_true
    from scipy import ndimage as ndi

    ids = np.unique(true)[1:]
    com = np.array(ndi.center_of_mass(true > 0, true, ids))
    hit = pred[com[:, 0].astype(int), com[:, 1].astype(int)]
    recall = (hit > 0).mean()
    assert recall > 0.6


def test_hematoxylin_lookup_table_matches_skimage():
    from skimage.color import rgb2hed

    from scellst.im._segment import _hematoxylin

    rgb = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    expected = np.maximum(rgb2hed(rgb)[..., 0], 0)
    np.testing.assert_allclose(_hematoxylin(rgb), expected, atol=1e-5)


def test_local_maxima_gives_one_seed_per_plateau():
    from scellst.im._segment import _local_maxima

    score = np.zeros((40, 40), dtype=np.float32)
    score[5:8, 5:8] = 2.0  # a flat maximum
    score[30, 30] = 1.0
    score[31, 33] = 0.5  # within the window of the stronger peak
    peaks = _local_maxima(score, 7, score > 0)
    assert sorted(map(tuple, peaks)) == [(6, 6), (30, 30)]
    assert len(_local_maxima(score, 7, (score > 0) & (score < 1.5))) == 1  # the mask removes the plateau


def _stained_disc_image(centres, radius_px, size=80, pale_halo_px=0):
    """A pink background with haematoxylin-dark discs (and optionally a pale purple halo around them)."""
    yy, xx = np.mgrid[:size, :size]
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = (235, 170, 200)
    for cy, cx in centres:
        d = np.hypot(yy - cy, xx - cx)
        if pale_halo_px:
            img[d <= radius_px + pale_halo_px] = (175, 130, 190)
    for cy, cx in centres:
        img[np.hypot(yy - cy, xx - cx) <= radius_px] = (70, 40, 130)
    return img


def test_classical_seeds_split_touching_nuclei_without_a_neck():
    from scellst.im._segment import ClassicalParams, _hematoxylin, segment_tile

    # two dark discs of radius 3.5 um at 0.5 um/px whose centres are 6.5 um apart: their union has almost no neck
    img = _stained_disc_image([(40, 27), (40, 40)], radius_px=7)
    thr = float(np.quantile(_hematoxylin(img), 0.7))
    labels = segment_tile(img, microns_per_pixel=0.5, threshold=thr, params=ClassicalParams())
    assert len(np.unique(labels)) - 1 == 2
    assert labels[40, 24] != labels[40, 43]


def test_refine_trims_pale_cytoplasm_around_a_nucleus():
    from scellst.im._segment import _hematoxylin, refine_nuclei

    img = _stained_disc_image([(40, 40)], radius_px=8, pale_halo_px=6)
    hema = _hematoxylin(img)
    labels = (np.hypot(*(np.mgrid[:80, :80] - 40)) <= 14).astype(np.int32)  # nucleus + halo, as a low threshold gives
    refined = refine_nuclei(labels, hema, level=0.6, ring_px=3)
    disc = np.pi * 8**2
    assert labels.sum() > 2.5 * disc
    assert refined.sum() == pytest.approx(disc, rel=0.15)
    assert set(np.unique(refined)) == {0, 1}
