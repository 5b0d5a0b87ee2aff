from __future__ import annotations

import numpy as np
import pytest

import scellst

from .conftest import fresh_copy


def test_model_learns_single_cell_expression(processed, model):
    sdata = fresh_copy(processed)
    scellst.tl.predict(sdata, model)
    corr = scellst.bench.evaluate(sdata, level="cell")
    matched = corr.attrs["matched_fraction"]
    assert matched > 0.95
    assert corr["pearson"].mean() > 0.45
    spot = scellst.bench.evaluate(sdata)
    assert spot["pearson"].mean() > 0.5
    assert model.history[0]["train_loss"][-1] < model.history[0]["train_loss"][0]
    assert model.params["n_val_spots"] > 0


def test_shuffled_embeddings_learn_nothing_per_cell(processed):
    sdata = fresh_copy(processed)
    emb = sdata.tables["nuclei_embeddings"]
    emb.X = emb.X[np.random.default_rng(0).permutation(emb.n_obs)]
    control = scellst.tl.train(sdata, seed=0, lr=1e-3, max_epochs=60, show_progress_bar=False)
    scellst.tl.predict(sdata, control)
    corr = scellst.bench.evaluate(sdata, level="cell")
    assert abs(corr["pearson"].mean()) < 0.15


def test_predict_tables(processed, model):
    sdata = fresh_copy(processed)
    scellst.tl.predict(sdata, model)
    cells = sdata.tables["nuclei_expression"]
    assert cells.n_obs == len(sdata.shapes["nuclei"])
    assert list(cells.var_names) == model.genes
    assert cells.uns["spatialdata_attrs"]["region"] == "nuclei"
    assert (cells.X >= 0).all()  # softplus output, inverse-scaled
    assert "spot_id" in cells.obs
    assert cells.obsm["spatial"].shape == (cells.n_obs, 2)
    assert cells.uns["scellst"]["units"].startswith("log1p")
    spots = sdata.tables["spots_predicted"]
    in_spot = cells.obs["spot_id"].dropna().astype(str)
    first = in_spot.iloc[0]
    mean = cells[in_spot.index[in_spot == first]].X.mean(axis=0)
    np.testing.assert_allclose(spots[spots.obs["spot_id"] == first].X.ravel(), mean, rtol=1e-5)
    with pytest.raises(ValueError, match="already exists"):
        scellst.tl.predict(sdata, model)


def test_train_input_errors(processed):
    sdata = fresh_copy(processed)
    with pytest.raises(KeyError, match="missing from the spot table"):
        scellst.tl.train(sdata, genes=["EPCAM", "NOT_A_GENE"], max_epochs=1, show_progress_bar=False)
    bad = fresh_copy(processed)
    x = bad.tables["spots_counts"].X.toarray()
    x[0, 0] = np.nan
    import scipy.sparse as sp

    bad.tables["spots_counts"].X = sp.csr_matrix(x)
    with pytest.raises(ValueError, match="NaN"):
        scellst.tl.train(bad, max_epochs=1, show_progress_bar=False)
    unassigned = fresh_copy(processed)
    del unassigned.tables["nuclei_embeddings"].obs["spot_id"]
    with pytest.raises(ValueError, match="assign_cells"):
        scellst.tl.train(unassigned, max_epochs=1, show_progress_bar=False)
    no_cells = fresh_copy(processed)
    no_cells.tables["nuclei_embeddings"].obs["spot_id"] = np.nan
    with pytest.raises(ValueError, match="No spot"):
        scellst.tl.train(no_cells, max_epochs=1, show_progress_bar=False)
    with pytest.raises(KeyError, match="embed_cells"):
        scellst.tl.train(sdata, table_key="missing", max_epochs=1, show_progress_bar=False)


def test_empty_spots_are_dropped(processed):
    sdata = fresh_copy(processed)
    emb = sdata.tables["nuclei_embeddings"]
    first = emb.obs["spot_id"].dropna().astype(str).iloc[0]
    spot_ids = emb.obs["spot_id"].astype(object)
    spot_ids[spot_ids == first] = np.nan
    emb.obs["spot_id"] = spot_ids
    model = scellst.tl.train(sdata, max_epochs=2, show_progress_bar=False)
    n_spots = sdata.tables["spots_counts"].n_obs
    assert model.params["n_train_spots"] + model.params["n_val_spots"] == n_spots - 1


def test_save_load_and_h_and_e_only_slide(processed, model, tmp_path):
    path = tmp_path / "model.pt"
    model.save(path)
    loaded = scellst.tl.load_model(path)
    assert loaded.genes == model.genes
    emb = processed.tables["nuclei_embeddings"]
    np.testing.assert_allclose(loaded.predict_cells(emb.X), model.predict_cells(emb.X), rtol=1e-5)

    # a new slide that has only an H&E image
    image = np.asarray(processed.images["he"]["scale0"].image[:, :600, :600])
    he_only = scellst.io.from_image(image, microns_per_pixel=0.5)
    scellst.im.segment_nuclei(he_only, show_progress_bar=False)
    scellst.im.embed_cells(he_only, show_progress_bar=False)
    scellst.tl.predict(he_only, path)
    table = he_only.tables["nuclei_expression"]
    assert table.n_obs == len(he_only.shapes["nuclei"])
    assert "spots_predicted" not in he_only.tables
    assert np.isfinite(table.X).all()


def test_predict_rejects_other_embeddings(processed, model):
    sdata = fresh_copy(processed)
    sdata.tables["nuclei_embeddings"].uns["scellst"]["method"] = "ssl"
    with pytest.raises(ValueError, match="morphology"):
        scellst.tl.predict(sdata, model)
    with pytest.raises(FileNotFoundError):
        scellst.tl.load_model("no_such_model.pt")


def test_load_model_rejects_other_files(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a readable scellst model file"):
        scellst.tl.load_model(junk)
    import torch

    other = tmp_path / "other.pt"
    torch.save({"format_version": 99}, other)
    with pytest.raises(ValueError, match="incompatible scellst version"):
        scellst.tl.load_model(other)


def test_parallel_members_match_sequential(processed):
    """Members trained in threads are the members trained one after the other (same torch threads per member)."""
    import torch

    n_threads = torch.get_num_threads()
    kw = {"n_models": 2, "max_epochs": 12, "seed": 3, "show_progress_bar": False}
    try:
        torch.set_num_threads(1)
        seq = scellst.tl.train(processed, n_jobs=1, **kw)
        torch.set_num_threads(2)  # two members at once: one torch thread each
        par = scellst.tl.train(processed, n_jobs=2, **kw)
    finally:
        torch.set_num_threads(n_threads)
    assert torch.get_num_threads() == n_threads
    for a, b in zip(seq.members, par.members, strict=True):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert seq.history == par.history
    assert not torch.equal(seq.members[0]["mlp.0.weight"], seq.members[1]["mlp.0.weight"])


def test_parallel_members_stop_together():
    """A failing member stops the others and its error (not a cancellation) reaches the caller."""
    from scellst.tl._train import _run_members

    stopped = []

    def one(m, cancel):
        if m == 1:
            raise ValueError("member 1 failed")
        while not cancel.wait(0.01):
            pass
        stopped.append(m)
        raise KeyboardInterrupt

    with pytest.raises(ValueError, match="member 1 failed"):
        _run_members(one, 3, 2)
    assert sorted(stopped) == [0, 2]


def test_patience_counts_steps_on_large_data(processed):
    """The default patience is 30 epochs on small data, and about 8,000 steps (at least 10 epochs) on large data."""
    resolve = scellst.tl.resolve_patience
    assert resolve(None, 1_500, 8) == 30  # HER2ST-size training sets keep the paper's rule
    assert resolve(None, 3_794, 8) == 17  # a whole Visium slide (4,464 spots, 15 % held out): 475 steps per epoch
    assert resolve(None, 1_000_000, 8) == 10
    assert resolve(None, 100_000, 256) == 21
    assert resolve(None, 1_000_000, 8, loss="cosine") == 30  # one step per slide
    assert resolve(12, 1_000_000, 8) == 12
    with pytest.raises(ValueError, match="patience"):
        resolve(0, 100, 8)
    sdata = fresh_copy(processed)
    model = scellst.tl.train(sdata, n_models=1, lr=1e-3, patience=3, max_epochs=300, show_progress_bar=False)
    assert model.params["patience"] == 3
    # training stopped exactly 3 epochs after its best one (not at the cap)
    assert len(model.history[0]["val_loss"]) == model.params["best_epoch"] + 3 < 300
    default = scellst.tl.train(sdata, n_models=1, lr=1e-3, max_epochs=2, show_progress_bar=False)
    assert default.params["patience"] == 30
