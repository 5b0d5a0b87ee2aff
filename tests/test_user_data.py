"""A user's own data: the command line, readers that take what users have, and guards before libraries crash."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import scellst
from scellst._utils import get_key, get_microns_per_pixel
from scellst.cli import main
from tests.conftest import fresh_copy

SVS = "wsi_formats/cmu_small_region.svs"


def test_version_and_module_entry_point(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"scellst {scellst.__version__}"
    done = subprocess.run([sys.executable, "-m", "scellst", "--help"], capture_output=True, text=True, check=True)
    for command in ("train", "predict", "demo"):
        assert command in done.stdout
    done = subprocess.run([sys.executable, "-m", "scellst", "predict", "--help"], capture_output=True, text=True)
    assert "examples:" in done.stdout
    assert "--export" in done.stdout


def test_cli_train_then_predict_on_real_slides(data_dir, tmp_path):
    """`scellst train` on the real Visium fragment (a zarr store), then `scellst predict` on a real Aperio SVS."""
    import spatialdata as sd

    store = tmp_path / "mouse_brain.zarr"
    scellst.datasets.visium_mouse_brain(path=data_dir / "visium_mouse_brain_crop").write(store)
    before = sorted(p.relative_to(store).as_posix() for p in store.rglob("*"))
    args = ["train", str(store), "--out", str(tmp_path / "run"), "--n-genes", "30", "--n-models", "2", "--quiet"]
    assert main(args) == 0
    assert sorted(p.relative_to(store).as_posix() for p in store.rglob("*")) == before  # the input is only read
    model = scellst.tl.load_model(tmp_path / "run" / "model.pt")
    assert len(model.genes) == 30
    assert model.n_models == 2
    trained = sd.read_zarr(tmp_path / "run" / "mouse_brain.zarr")
    cells = trained.tables["nuclei_expression"]
    assert cells.n_obs > 1000
    assert list(cells.var_names) == model.genes
    assert "spots_predicted" in trained.tables
    # the same command again refuses to overwrite its outputs
    assert main(args) == 2

    slide = data_dir / SVS
    assert main(["predict", str(tmp_path / "run" / "model.pt"), str(slide), "--out", str(tmp_path / "pred"),
                 "--export", "h5ad", "csv", "--quiet"]) == 0  # fmt: skip
    predicted = sd.read_zarr(tmp_path / "pred" / "cmu_small_region.zarr")
    assert get_microns_per_pixel(predicted, "he") == pytest.approx(0.499)  # from the SVS metadata
    table = predicted.tables["nuclei_expression"]
    assert table.n_obs > 1000
    assert np.isfinite(np.asarray(table.X)).all()
    assert np.asarray(table.X).std(axis=0).mean() > 0  # cells differ
    csv = pd.read_csv(tmp_path / "pred" / "cmu_small_region_cells.csv.gz", index_col=0)
    assert len(csv) == table.n_obs
    assert {"x_um", "y_um", *model.genes} <= set(csv.columns)
    assert csv["x_um"].max() == pytest.approx(2220 * 0.499, rel=0.05)
    assert (tmp_path / "pred" / "cmu_small_region_cells.h5ad").exists()
    assert not list((tmp_path / "pred").glob(".*partial"))


def test_cli_reports_user_errors_in_one_line(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "missing.pt"), str(tmp_path / "x.png"), "--out", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.zarr"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "missing.zarr' does not exist" in err[0]
    assert not (tmp_path / "run").exists()  # nothing is made before the inputs are checked


def test_visium_output_works_with_default_image(data_dir):
    """`io.visium` output holds several images; the functions default to the full-resolution 'he'."""
    sdata = scellst.io.visium(data_dir / "visium_mouse_brain_crop" / "spaceranger_like", dataset_id="mb")
    assert len(sdata.images) > 1
    assert get_key(sdata, "images", None) == "he"


def test_from_image_reads_mpp_from_svs_and_accepts_image_elements(data_dir, tmp_path):
    import spatialdata as sd

    assert scellst.io.file_microns_per_pixel(data_dir / SVS) == pytest.approx(0.499)
    sdata = scellst.io.from_image(data_dir / SVS)
    assert get_microns_per_pixel(sdata, "he") == pytest.approx(0.499)
    assert sdata.images["he"]["scale0"].image.shape == (3, 2967, 2220)
    with pytest.raises(ValueError, match="microns_per_pixel"):
        scellst.io.from_image(data_dir / "visium_mouse_brain_crop" / "test_img.jpg")
    sdata.write(tmp_path / "svs.zarr")
    reopened = sd.read_zarr(tmp_path / "svs.zarr")
    again = scellst.io.from_image(reopened.images["he"], microns_per_pixel=0.499)  # a multiscale DataTree
    assert again.images["he"]["scale0"].image.shape == (3, 2967, 2220)


def test_from_spots_matches_counts_by_id(data_dir):
    folder = data_dir / "visium_mouse_brain_crop"
    xy = pd.read_csv(folder / "DERIVED_spot_xy_in_test_img.csv", index_col=0).rename(columns={"x_px": "x", "y_px": "y"})
    counts = pd.read_csv(folder / "DERIVED_counts_recovered_hvg1999.csv.gz", index_col=0)
    shuffled = counts.iloc[np.random.default_rng(0).permutation(len(counts))]
    kwargs = {"spot_diameter_um": 55.0, "microns_per_pixel": 0.73}
    image = np.zeros((1717, 950, 3), dtype=np.uint8)
    sdata = scellst.io.from_spots(image, spot_xy=xy[["x", "y"]], counts=shuffled, **kwargs)
    table = sdata.tables["spots_counts"]
    assert list(table.obs_names) == list(xy.index)
    np.testing.assert_array_equal(table.X.toarray(), counts.loc[xy.index].to_numpy())
    with pytest.raises(ValueError, match="differ"):
        scellst.io.from_spots(image, spot_xy=xy[["x", "y"]].iloc[:-1], counts=counts, **kwargs)
    with pytest.raises(ValueError, match="holds no spot"):
        scellst.io.from_spots(image, spot_xy=xy[["x", "y"]].iloc[:0], counts=counts.iloc[:0], **kwargs)


def test_spots_in_the_wrong_frame_are_refused_before_training(processed):
    """Spot centres at x0.1 (hires instead of full-res pixels) give a clear error, not a crash in scanpy."""
    from shapely import affinity

    sdata = fresh_copy(processed)
    spots = sdata.shapes["spots"]
    spots["geometry"] = [affinity.scale(g, 0.1, 0.1, origin=(0, 0)) for g in spots.geometry]
    scellst.pp.assign_cells(sdata, overwrite=True)
    with pytest.raises(ValueError, match=r"miss the tissue|overlap one another|spot\(s\) with nuclei"):
        scellst.tl.train(sdata, max_epochs=2, show_progress_bar=False)


def test_gene_selection_on_a_few_spots_does_not_crash():
    from anndata import AnnData

    rng = np.random.default_rng(0)
    table = AnnData(X=rng.poisson(20, size=(5, 40)).astype(np.float32))
    table.var_names = [f"g{i}" for i in range(40)]
    genes = scellst.pp._genes.rank_genes([table], None, flavor="hvg", n_genes=10, min_counts=1)
    assert len(genes) == 10


def test_too_few_spots_or_genes_give_clear_errors(processed):
    sdata = fresh_copy(processed)
    emb = sdata.tables["nuclei_embeddings"]
    kept = emb.obs["spot_id"].dropna().astype(str).unique()[:5]
    emb.obs["spot_id"] = emb.obs["spot_id"].where(emb.obs["spot_id"].astype(str).isin(kept))
    counts = sdata.tables["spots_counts"]
    sdata.tables["spots_counts"] = counts[counts.obs["spot_id"].astype(str).isin(kept)].copy()
    with pytest.raises(ValueError, match="at least 10 are needed"):
        scellst.tl.train(sdata, max_epochs=2, show_progress_bar=False)
    with pytest.raises(ValueError, match="No gene passes the filters"):
        scellst.tl.train(processed, min_gene_counts=10**9, max_epochs=2, show_progress_bar=False)


def test_training_bar_ends_at_the_early_stop(processed, capsys):
    """The bar counts to the epoch where early stopping ended training, not to max_epochs with an ETA of hours."""
    import re

    scellst.tl.train(processed, n_models=1, max_epochs=1000, patience=3, lr=0.05)
    final = [part for part in capsys.readouterr().err.split("\r") if "stopped early" in part]
    assert final, "the bar does not say that training stopped early"
    done = re.search(r"\| (\d+)/(\d+) ", final[-1])
    assert done is not None
    assert done.group(1) == done.group(2)
    assert int(done.group(2)) < 1000
    assert "no gain for 3 epochs" in final[-1]
