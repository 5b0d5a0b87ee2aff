from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import scellst
from scellst._utils import get_microns_per_pixel


def _toy(n=5, genes=("A", "B")):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(200, 300, 3), dtype=np.uint8)
    xy = np.column_stack([np.linspace(20, 280, n), np.full(n, 100.0)])
    counts = pd.DataFrame(rng.poisson(5, size=(n, len(genes))), columns=list(genes), index=[f"s{i}" for i in range(n)])
    return image, xy, counts


def test_from_spots_layout():
    image, xy, counts = _toy()
    sdata = scellst.io.from_spots(image, spot_xy=xy, spot_diameter_um=55, counts=counts, microns_per_pixel=0.5)
    assert set(sdata.images) == {"he"}
    assert set(sdata.shapes) == {"spots"}
    assert set(sdata.tables) == {"spots_counts"}
    spots = sdata.shapes["spots"]
    np.testing.assert_allclose(spots["radius"], 55 / 2 / 0.5)
    assert list(spots.index) == list(counts.index)
    table = sdata.tables["spots_counts"]
    assert table.uns["spatialdata_attrs"]["region"] == "spots"
    assert list(table.obs["spot_id"]) == list(counts.index)
    np.testing.assert_array_equal(table.X.toarray(), counts.to_numpy())
    assert get_microns_per_pixel(sdata, "he") == 0.5
    # global is in microns: a pixel maps to 0.5 um
    from spatialdata.transformations import get_transformation

    m = get_transformation(spots, "global").to_affine_matrix(("x", "y"), ("x", "y"))
    np.testing.assert_allclose(m[0, 0], 0.5)


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda c: c.astype(float).replace(c.iloc[0, 0], np.nan), ValueError, "NaN"),
        (lambda c: -c, ValueError, "negative"),
    ],
)
def test_from_spots_rejects_bad_counts(mutate, error, match):
    image, xy, counts = _toy()
    with pytest.raises(error, match=match):
        scellst.io.from_spots(image, spot_xy=xy, spot_diameter_um=55, counts=mutate(counts), microns_per_pixel=0.5)


def test_from_spots_rejects_bad_geometry():
    image, xy, counts = _toy()
    with pytest.raises(ValueError, match="must match 1:1"):
        scellst.io.from_spots(image, spot_xy=xy[:4], spot_diameter_um=55, counts=counts, microns_per_pixel=0.5)
    with pytest.raises(ValueError, match="No spot centre lies inside"):
        scellst.io.from_spots(image, spot_xy=xy * 100, spot_diameter_um=55, counts=counts, microns_per_pixel=0.5)
    with pytest.raises(ValueError, match="microns_per_pixel"):
        scellst.io.from_spots(image, spot_xy=xy, spot_diameter_um=55, counts=counts, microns_per_pixel=0)
    with pytest.raises(ValueError, match="gene_names"):
        scellst.io.from_spots(image, spot_xy=xy, spot_diameter_um=55, counts=counts.to_numpy(), microns_per_pixel=0.5)


def test_from_image_and_missing_mpp():
    image, _, _ = _toy()
    sdata = scellst.io.from_image(image, microns_per_pixel=0.25)
    assert get_microns_per_pixel(sdata, "he") == 0.25
    from spatialdata import SpatialData

    bare = SpatialData(images={"he": sdata.images["he"]})
    with pytest.raises(ValueError, match="set_microns_per_pixel"):
        scellst.im.segment_nuclei(bare)
    scellst.io.set_microns_per_pixel(bare, "he", microns_per_pixel=0.25)
    assert get_microns_per_pixel(bare, "he") == 0.25
    with pytest.raises(ValueError, match="implausibly large"):
        scellst.io.set_microns_per_pixel(bare, "he", microns_per_pixel=250)


def test_visium_reader(data_dir):
    sdata = scellst.io.visium(data_dir / "visium_mouse_brain_crop" / "spaceranger_like", dataset_id="mb")
    assert "he" in sdata.images
    assert "spots" in sdata.shapes
    assert "spots_counts" in sdata.tables
    assert sdata.tables["spots_counts"].n_obs == 100
    # no full-res image: hires at 55 um / (spot_diameter_fullres * hires scale factor)
    expected = 55 / (89.42751063343188 * 0.150015)
    assert get_microns_per_pixel(sdata, "he") == pytest.approx(expected)
    # spots are in full-res pixels, the image in hires pixels: the shared coordinate system is the dataset id
    from scellst._utils import intrinsic_to_intrinsic

    m = intrinsic_to_intrinsic(sdata, "spots", "he")
    assert m[0, 0] == pytest.approx(0.150015, rel=1e-4)
    table = sdata.tables["spots_counts"]
    assert set(table.obs["spot_id"]) == set(sdata.shapes["spots"].index)


def test_her2st_reader(data_dir):
    sdata = scellst.datasets.her2st("C5", path=data_dir / "her2st")
    mpp = get_microns_per_pixel(sdata, "he")
    assert 0.66 < mpp < 0.71  # ~291 px per 200 um step
    table = sdata.tables["spots_counts"]
    assert table.n_obs > 150
    assert table.n_vars > 10_000
    assert "deconv" in table.obsm
    assert table.obsm["deconv"].shape[1] == 8
    radius_um = sdata.shapes["spots"]["radius"].iloc[0] * mpp
    assert radius_um == pytest.approx(50.0)
    with pytest.raises(FileNotFoundError, match="C9"):
        scellst.datasets.her2st("C9", path=data_dir / "her2st")
