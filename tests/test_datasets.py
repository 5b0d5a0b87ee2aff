from __future__ import annotations

import numpy as np
import pytest

import scellst
from scellst.datasets import synthetic_tissue


def test_synthetic_tissue_is_deterministic_and_consistent(tissue):
    again = synthetic_tissue(seed=1, size_um=(900.0, 900.0))
    a = np.asarray(tissue.images["he"]["scale0"].image[:, :200, :200])
    b = np.asarray(again.images["he"]["scale0"].image[:, :200, :200])
    np.testing.assert_array_equal(a, b)
    truth = tissue.tables["true_expression"]
    assert set(truth.obs["cell_type"].cat.categories) == {
        "tumour",
        "fibroblast",
        "lymphocyte",
        "macrophage",
        "endothelial",
    }
    spots = tissue.tables["spots_counts"]
    assert 10 <= np.median(spots.obs["n_cells"]) <= 25  # Visium-like bags
    # marker genes follow their type
    epcam = truth[:, "EPCAM"].X.ravel()
    is_tumour = (truth.obs["cell_type"] == "tumour").to_numpy()
    assert epcam[is_tumour].mean() > 10 * epcam[~is_tumour].mean()
    other = synthetic_tissue(seed=2, size_um=(300.0, 300.0))
    assert other.tables["true_expression"].n_obs != truth.n_obs


def test_annotated_tiles(data_dir):
    """MoNuSeg and GBM40 tiles come with one instance per annotated outline and their resolution."""
    import json

    for name, n_tiles in (("monuseg", 13), ("gbm40", 40)):
        tiles = scellst.datasets.annotated_tiles(name, path=data_dir / name)
        index = json.loads((data_dir / name / "index.json").read_text())
        assert len(tiles) == n_tiles == len(index)
        for tile, entry in zip(tiles, index, strict=True):
            assert tile["image"].dtype == np.uint8
            assert tile["image"].shape == tuple(entry["shape"])
            assert len(np.unique(tile["instances"])) - 1 == entry["n_instances"]
            assert 0.2 < tile["microns_per_pixel"] < 0.3
    with pytest.raises(ValueError, match="Unknown tile set"):
        scellst.datasets.annotated_tiles("pannuke", path=data_dir)


def test_synthetic_slide_is_lazy_and_deterministic():
    import dask.array as da

    sdata = scellst.datasets.synthetic_slide(seed=4, size_um=(300.0, 260.0), microns_per_pixel=0.5, chunks=256)
    from scellst._utils import image_level0

    image = image_level0(sdata, "he")
    assert isinstance(image.data, da.Array)
    assert image.shape == (3, 520, 600)
    assert image.data.chunks[1] == (256, 256, 8)
    first, again = image.data.compute(), image.data.compute()
    np.testing.assert_array_equal(first, again)
    truth = sdata.tables["true_expression"]
    assert truth.n_obs == len(sdata.shapes["true_cells"]) > 200
    # nuclei are drawn dark where the true cells are: haematoxylin-rich pixels at the centres, not in between
    xy = np.asarray(truth.obsm["spatial"]).astype(int)
    at_cells = first[:, xy[:, 1], xy[:, 0]].mean()
    assert at_cells < first.mean() - 30
