"""Batch-agnostic contrastive image-expression learning (tl.train_contrastive)."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import fresh_copy

FAST = {"vae_epochs": 150, "max_epochs": 60, "n_top_genes": 27, "show_progress_bar": False}


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float32)


@pytest.fixture(scope="module")
def two_batches(processed):
    """The processed slide and a copy whose counts carry a strong gene-wise batch effect (same cells, same spots)."""
    shifted = fresh_copy(processed)
    rng = np.random.default_rng(0)
    table = shifted.tables["spots_counts"]
    factor = np.exp(rng.normal(0.0, 1.0, table.n_vars))
    table.X = rng.poisson(_dense(table.X) * factor).astype(np.float32)
    return processed, shifted


@pytest.fixture(scope="module")
def trained(two_batches):
    import scellst

    return scellst.tl.train_contrastive(list(two_batches), seed=0, **FAST)


def _paired_distance(model, a, b) -> float:
    """Distance between the latents of the same spot in both batches, relative to the spread of the spots."""
    za = model.expression_latent(_dense(a.tables["spots_counts"][:, model.genes].X))
    zb = model.expression_latent(_dense(b.tables["spots_counts"][:, model.genes].X))
    return float(np.linalg.norm(za - zb, axis=1).mean() / np.linalg.norm(za - za.mean(0), axis=1).mean())


def test_image_encoder_finds_the_expression_of_held_out_spots(trained):
    # InfoNCE on N spots starts at log(N) (chance); the held-out spatial blocks must be matched well above chance
    n_val = trained.params["n_val_spots"]
    chance = np.log(n_val)
    assert min(trained.history["val"]) < chance - 1.0
    assert trained.params["best_epoch"] >= 1
    assert len(trained.history["vae_val"]) == FAST["vae_epochs"]


def test_batch_conditioned_gene_encoder_removes_the_batch(two_batches, trained):
    import scellst

    plain = scellst.tl.train_contrastive(list(two_batches), batch_agnostic=False, seed=0, **FAST)
    agnostic = _paired_distance(trained, *two_batches)
    without = _paired_distance(plain, *two_batches)
    # the same spot in two batches lands close in the batch-agnostic latent, far apart without the batch covariate
    assert agnostic < 0.7 * without, (agnostic, without)


def test_embedding_round_trip_and_from_image(processed, trained, tmp_path):
    import scellst
    from scellst.models import ContrastiveModel

    path = trained.save(tmp_path / "contrastive.pt")
    loaded = ContrastiveModel.load(path)
    assert loaded.genes == trained.genes
    assert loaded.feature_names == trained.feature_names
    sdata = fresh_copy(processed)
    scellst.tl.embed_contrastive(sdata, path)
    table = sdata.tables["nuclei_contrastive"]
    assert table.shape == (len(sdata.shapes["nuclei"]), trained.config.embedding_dim)
    assert "spot_id" in table.obs
    assert np.isfinite(table.X).all()
    assert table.uns["scellst"]["method"] == "contrastive"
    # from the image alone: the base (morphology) features are computed again, then the image encoder is applied
    scellst.im.embed_cells(sdata, method="encoder", encoder=path, key_added="from_image", show_progress_bar=False)
    np.testing.assert_allclose(sdata.tables["from_image"].X, table.X, atol=1e-4)
    assert set(sdata.tables) == set(processed.tables) | {"nuclei_contrastive", "from_image"}
    with pytest.raises(ValueError, match="overwrite"):
        scellst.tl.embed_contrastive(sdata, loaded)
    # the MIL learner trains on the learned embedding
    model = scellst.tl.train(sdata, table_key="nuclei_contrastive", n_models=1, max_epochs=20, show_progress_bar=False)
    assert model.feature_names == table.var_names.tolist()


def test_spot_embeddings(processed):
    import scellst

    emb = processed.tables["nuclei_embeddings"]
    spots = scellst.tl.spot_embeddings(processed, embedding_scaling="global")
    assert spots.n_vars == emb.n_vars
    assert (spots.obs["n_cells"] > 0).all()
    order = processed.shapes["spots"].index.astype(str)
    assert list(spots.obs_names) == [s for s in order if s in set(spots.obs_names)]
    spot_of = emb.obs["spot_id"].astype(str).to_numpy()
    for spot in spots.obs_names[:3]:
        cells = np.flatnonzero(spot_of == spot)
        assert spots.obs.loc[spot, "n_cells"] == len(cells)
        np.testing.assert_allclose(spots[spot].X[0], np.asarray(emb.X)[cells].mean(axis=0), rtol=1e-4, atol=1e-5)
    scaled = scellst.tl.spot_embeddings(processed)  # per-slide normal scores: centred, unit-free
    assert np.isfinite(scaled.X).all()
    assert np.abs(scaled.X.mean(axis=0)).max() < 1.0
    with pytest.raises(ValueError, match="embedding_scaling"):
        scellst.tl.spot_embeddings(processed, embedding_scaling="minmax")


def test_input_errors(processed, trained, tmp_path):
    import scellst

    with pytest.raises(ValueError, match="one each"):
        scellst.tl.train_contrastive([processed], batches=["a", "b"], **FAST)
    with pytest.raises(ValueError, match="embedding_scaling"):
        scellst.tl.train_contrastive(processed, embedding_scaling="global", **FAST)
    sdata = fresh_copy(processed)
    emb = sdata.tables["nuclei_embeddings"]
    sdata.tables["nuclei_embeddings"] = emb[:, :10].copy()
    with pytest.raises(ValueError, match="embed_cells"):
        scellst.tl.embed_contrastive(sdata, trained)
    other = tmp_path / "other.pt"
    import torch

    torch.save({"kind": "something else"}, other)
    with pytest.raises(ValueError, match="not a scellst contrastive model"):
        scellst.models.ContrastiveModel.load(other)
    with pytest.raises(TypeError, match="ContrastiveModel"):
        scellst.tl.embed_contrastive(sdata, 3)
