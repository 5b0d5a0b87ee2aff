"""Visium HD: the reader (through spatialdata-io, on a synthetic Space Ranger folder), overlap-weighted bags, bins
summed into cells."""

from __future__ import annotations

import anndata as ad
import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
import torch
from spatialdata import SpatialData
from spatialdata.models import ShapesModel, TableModel

import scellst
from scellst._utils import image_level0
from scellst.datasets import synthetic_tissue, write_synthetic_visium_hd


@pytest.fixture(scope="module")
def hd_tissue():
    return synthetic_tissue(seed=3, size_um=(240.0, 200.0))


@pytest.fixture(scope="module")
def hd_folder(hd_tissue, tmp_path_factory):
    return write_synthetic_visium_hd(hd_tissue, tmp_path_factory.mktemp("hd") / "outs", dataset_id="demo")


def _total(x) -> float:
    return float(x.sum())


def test_visium_hd_reader(hd_tissue, hd_folder, recwarn):
    sdata = scellst.io.visium_hd(hd_folder, bin_size=8, extra_bin_sizes=(2, 16))
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning) and "segmentations" in str(w.message)]
    assert {"spots", "spots_002um", "spots_016um", "hd_cells"} <= set(sdata.shapes)
    assert {"spots_counts", "spots_counts_002um", "spots_counts_016um", "hd_cells_counts"} <= set(sdata.tables)
    assert sdata.attrs["scellst"]["microns_per_pixel"]["he"] == pytest.approx(0.5)
    assert set(sdata.coordinate_systems) >= {"demo"}
    table = sdata.tables["spots_counts"]
    assert table.uns["scellst"]["bin_size_um"] == 8.0
    assert table.n_obs == 30 * 25  # 240 x 200 um in 8 um bins
    assert table.obs["spot_id"].iloc[0] == "s_008um_00000_00000-1"
    assert list(sdata.shapes["spots"].index[:1]) == ["s_008um_00000_00000-1"]
    # every transcript of the true cells inside the image is in each bin size, and the bins are 8 um squares
    sums = {k: _total(sdata.tables[k].X) for k in ("spots_counts", "spots_counts_002um", "spots_counts_016um")}
    assert len(set(sums.values())) == 1
    assert 0.9 * hd_tissue.tables["true_expression"].layers["counts"].sum() < sums["spots_counts"]
    assert sdata.shapes["spots"].geometry.area.median() == pytest.approx(16.0**2)  # 8 um at 0.5 um/px
    # the image is the full-resolution H&E
    assert image_level0(sdata, "he").shape == image_level0(hd_tissue, "he").shape
    # the Space Ranger cells: one per true cell, with their transcripts
    assert sdata.tables["hd_cells_counts"].n_obs == hd_tissue.tables["true_expression"].n_obs
    assert _total(sdata.tables["hd_cells_counts"].X) == sums["spots_counts"]


def test_visium_hd_reader_errors(hd_folder, tmp_path):
    with pytest.raises(ValueError, match=r"Bin sizes \[4\] um are not in .* it has \[2, 8, 16\]"):
        scellst.io.visium_hd(hd_folder, bin_size=4)
    with pytest.raises(ValueError, match="not a Visium HD"):
        scellst.io.visium_hd(tmp_path)
    with pytest.raises(FileNotFoundError):
        scellst.io.visium_hd(tmp_path / "missing")
    # scellst.io.read recognises the folder
    assert "spots_counts" in scellst.io.read(hd_folder).tables


def _two_bins() -> SpatialData:
    """Two 10 x 10 px square spots side by side, and three round nuclei: astride both, inside one, outside both."""
    squares = gpd.GeoDataFrame(geometry=[shapely.box(0, 0, 10, 10), shapely.box(10, 0, 20, 10)], index=["a", "b"])
    nuclei = gpd.GeoDataFrame(
        {"radius": [2.0, 2.0, 2.0]}, geometry=gpd.points_from_xy([10.0, 4.0, 40.0], [5.0, 5.0, 5.0]), index=[1, 2, 3]
    )
    counts = pd.DataFrame({"G": [5.0, 7.0]}, index=["a", "b"])
    table = TableModel.parse(
        ad.AnnData(
            X=counts.to_numpy(),
            obs=pd.DataFrame({"spot_id": ["a", "b"], "region": pd.Categorical(["spots"] * 2)}, index=["a", "b"]),
            var=pd.DataFrame(index=["G"]),
        ),
        region="spots",
        region_key="region",
        instance_key="spot_id",
    )
    return SpatialData(
        shapes={"spots": ShapesModel.parse(squares), "nuclei": ShapesModel.parse(nuclei)},
        tables={"spots_counts": table},
    )


def test_overlap_weights():
    sdata = _two_bins()
    pairs = scellst.pp.spot_overlaps(sdata, "nuclei", "spots")
    weights = {(int(c), s): w for c, s, w in pairs[["cell", "spot_id", "weight"]].itertuples(index=False)}
    assert weights[(0, "a")] == pytest.approx(0.5, abs=1e-6)
    assert weights[(0, "b")] == pytest.approx(0.5, abs=1e-6)
    assert weights[(1, "a")] == pytest.approx(1.0)
    assert set(weights) == {(0, "a"), (0, "b"), (1, "a")}  # the third nucleus overlaps no spot

    scellst.pp.assign_cells(sdata, rule="overlap")
    overlaps = sdata.tables["nuclei_overlaps"].obs
    assert len(overlaps) == 3
    assert set(overlaps["cell_id"]) == {"1", "2"}
    assert sdata.shapes["nuclei"]["spot_id"].tolist()[1:] == ["a", None]
    assert sdata.tables["spots_counts"].obs["n_cells"].tolist() == [2, 1]
    with pytest.raises(ValueError, match="already"):
        scellst.pp.assign_cells(sdata, rule="overlap")
    scellst.pp.assign_cells(sdata, overwrite=True)  # back to centroids: the overlaps go
    assert "nuclei_overlaps" not in sdata.tables
    with pytest.raises(ValueError, match="`rule` must be one of"):
        scellst.pp.assign_cells(sdata, rule="nearest", overwrite=True)
    with pytest.raises(ValueError, match="expand_um"):
        scellst.pp.assign_cells(sdata, expand_um=2.0, overwrite=True)


def test_weighted_bag_mean():
    from scellst.models._ops import bag_mean

    cells = torch.tensor([[1.0], [3.0], [10.0]])
    bags = torch.tensor([0, 0, 1])
    assert bag_mean(cells, bags, 2).squeeze().tolist() == [2.0, 10.0]
    weighted = bag_mean(cells, bags, 2, torch.tensor([0.75, 0.25, 0.5])).squeeze().tolist()
    assert weighted == pytest.approx([1.5, 10.0])


def test_overlap_bags_reach_training():
    from scellst.tl._train import prepare_slide

    sdata = _two_bins()
    emb = ad.AnnData(
        X=np.eye(3, dtype=np.float32),
        obs=pd.DataFrame({"cell_id": [1, 2, 3], "region": pd.Categorical(["nuclei"] * 3)}, index=["1", "2", "3"]),
    )
    sdata.tables["nuclei_embeddings"] = TableModel.parse(
        emb, region="nuclei", region_key="region", instance_key="cell_id"
    )
    scellst.pp.assign_cells(sdata, rule="overlap")
    slide = prepare_slide(sdata, min_spot_counts=1)
    bags = {s: (b.tolist(), w.tolist()) for s, b, w in zip(slide.spot_ids, slide.bags, slide.weights, strict=True)}
    assert bags["a"][0] == [0, 1]
    assert bags["a"][1] == pytest.approx([0.5, 1.0], abs=1e-6)
    assert bags["b"][0] == [0]
    assert bags["b"][1] == pytest.approx([0.5], abs=1e-6)
    assert slide.subset(np.array([False, True])).weights[0].tolist() == pytest.approx([0.5], abs=1e-6)


def test_bins_to_cells():
    sdata = _two_bins()
    nuclei = gpd.GeoDataFrame(
        geometry=[shapely.box(0, 0, 10, 10).buffer(-1), shapely.box(30, 0, 40, 10)], index=pd.Index([7, 8])
    )
    sdata.shapes["nuclei"] = ShapesModel.parse(nuclei)
    scellst.pp.bins_to_cells(sdata, "spots", "spots_counts", "nuclei")
    table = sdata.tables["cells_counts"]
    assert table.obs["spot_id"].tolist() == ["7", "8"]
    assert np.asarray(table.X.todense()).ravel().tolist() == [5.0, 0.0]  # bin a's centre is in nucleus 7
    assert table.obs["n_bins"].tolist() == [1, 0]
    with pytest.raises(ValueError, match="already exists"):
        scellst.pp.bins_to_cells(sdata, "spots", "spots_counts", "nuclei")


def test_run_train_on_a_visium_hd_folder(hd_folder, tmp_path):
    """The pipeline (and `scellst train`) reads the folder, assigns cells by overlap and trains with small-bag settings."""
    import spatialdata as sd

    model, runs = scellst.tl.run_train(
        [hd_folder], tmp_path / "run", n_models=1, max_epochs=3, n_top_genes=10, show_progress_bar=False
    )
    store = sd.read_zarr(runs[0].store)
    overlaps = store.tables["nuclei_overlaps"]
    assert overlaps.uns["scellst"]["expand_um"] == 3.0
    assert overlaps.n_obs > len(store.shapes["nuclei"])  # grown nuclei straddle several 8 um bins
    assert model.params["batch_size"] == 256
    assert model.params["lr"] == pytest.approx(1e-3)
    assert store.tables["nuclei_expression"].n_obs == len(store.shapes["nuclei"])


def test_validation_blocks_of_many_bins():
    """Above 20,000 spots the validation blocks are grid squares: fast, whole, and the asked fraction."""
    from scellst.tl._train import spatial_blocks

    r, c = np.divmod(np.arange(250 * 200), 200)
    xy = np.column_stack([c, r]).astype(float) * 16.0  # 8 um bins at 0.5 um/px
    val = spatial_blocks(xy, 0.15, np.random.default_rng(0))
    assert 0.15 <= val.mean() < 0.16
    # whole squares of about 12 bins: held-out bins have held-out neighbours
    grid = val.reshape(250, 200)
    neighbours = grid[1:-1, 1:-1] & (grid[:-2, 1:-1] | grid[2:, 1:-1] | grid[1:-1, :-2] | grid[1:-1, 2:])
    assert neighbours.sum() > 0.9 * grid[1:-1, 1:-1].sum()
