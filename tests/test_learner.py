from __future__ import annotations

import numpy as np
import pytest
import torch

import scellst
from scellst.models._losses import nb_nll

from .conftest import fresh_copy

FAST = {"lr": 1e-3, "max_epochs": 40, "show_progress_bar": False}


@pytest.mark.parametrize("loss", ["nb", "poisson", "cosine"])
def test_losses_learn_cells(processed, loss):
    sdata = fresh_copy(processed)
    # the cells' own features: on this 900 um tissue of 85 spots the default 129 features (neighbourhood up to 400 um)
    # overfit the count losses' levels (spot RMSE 1.10 with Poisson; see the closing note of the change)
    scellst.im.embed_cells(sdata, context_um=None, key_added="own", show_progress_bar=False)
    model = scellst.tl.train(sdata, loss=loss, table_key="own", **{**FAST, "max_epochs": 150})
    scellst.tl.predict(sdata, model, table_key="own")
    cells = sdata.tables["nuclei_expression"].X
    assert np.isfinite(cells).all()
    assert (cells >= 0).all()
    corr = scellst.bench.evaluate(sdata, level="cell")
    assert corr["pearson"].mean() > 0.4, loss
    if loss != "cosine":  # cosine fits patterns, not levels
        spots = scellst.bench.evaluate(sdata)
        assert spots["rmse"].mean() < 1.0


def test_nb_parametrisations_agree():
    mu = torch.tensor([[0.5, 3.0], [10.0, 0.1]])
    counts = torch.tensor([[0.0, 4.0], [12.0, 1.0]])
    log_theta = torch.tensor([0.3, 1.5])
    a = nb_nll(mu, counts, log_theta, parametrization="mean")
    b = nb_nll(mu, counts, log_theta, parametrization="total_count")
    assert float(a) == pytest.approx(float(b), rel=1e-4)


def test_mse_scaling_is_inverted(processed):
    """Predictions come back in log-normalised units, not in the per-slide scaled units of training."""
    from scellst.pp._genes import lognorm
    from scellst.tl._train import prepare_slide

    model = scellst.tl.train(processed, **{**FAST, "max_epochs": 100})
    assert model.gene_scale.min() < 0.6
    assert model.gene_scale.max() > 2
    slide = prepare_slide(processed)
    pred = model.predict_spots(slide.features, slide.bags).mean(axis=0)
    true = lognorm(slide.counts, model.genes).mean(axis=0)
    np.testing.assert_allclose(pred, true, rtol=0.1)


def test_same_seed_same_model_and_ensembles(processed):
    a = scellst.tl.train(processed, seed=3, **FAST)
    assert a.n_models == 5  # the default: an ensemble of five networks
    assert a.params["n_models"] == 5
    assert scellst.tl.train(processed, seed=3, n_models=1, **FAST).n_models == 1
    b = scellst.tl.train(processed, seed=3, **FAST)
    x = processed.tables["nuclei_embeddings"].X
    np.testing.assert_array_equal(a.predict_cells(x), b.predict_cells(x))
    c = scellst.tl.train(processed, seed=4, **FAST)
    assert not np.array_equal(a.predict_cells(x), c.predict_cells(x))

    ens = scellst.tl.train(processed, seed=3, n_models=3, **FAST)
    assert ens.n_models == 3
    assert len(ens.history) == 3
    sdata = fresh_copy(processed)
    scellst.tl.predict(sdata, ens)
    spread = sdata.tables["nuclei_expression"].layers["ensemble_std"]
    assert spread.shape == sdata.tables["nuclei_expression"].shape
    assert (spread >= 0).all()
    assert spread.mean() > 0


def test_checkpoint_resume_matches_uninterrupted_run(processed, tmp_path):
    opts = {"seed": 1, "lr": 1e-3, "patience": 1000, "show_progress_bar": False}
    full = scellst.tl.train(processed, max_epochs=20, **opts)
    scellst.tl.train(processed, max_epochs=10, checkpoint_dir=tmp_path, **opts)  # "interrupted" after 10 epochs
    assert (tmp_path / "member_0.pt").exists()
    resumed = scellst.tl.train(processed, max_epochs=20, checkpoint_dir=tmp_path, resume=True, **opts)
    assert len(resumed.history[0]["train_loss"]) == 20
    x = processed.tables["nuclei_embeddings"].X
    np.testing.assert_allclose(resumed.predict_cells(x), full.predict_cells(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="another training run"):
        scellst.tl.train(processed, max_epochs=20, checkpoint_dir=tmp_path, resume=True, loss="nb", **opts)


def test_multi_slide_training_and_filters(processed):
    model = scellst.tl.train([processed, processed], n_top_genes=12, **FAST)
    assert model.params["n_slides"] == 2
    assert len(model.genes) == 12
    assert model.params["min_gene_counts"] == 200
    assert model.params["min_spot_counts"] == 20


def test_evaluate_from_model_and_from_tables_agree(processed, model):
    sdata = fresh_copy(processed)
    scellst.tl.predict(sdata, model)
    from_tables = scellst.bench.evaluate(sdata)
    from_model = scellst.bench.evaluate(sdata, model)
    assert list(from_tables.columns) == ["pearson", "spearman", "rmse", "mae"]
    np.testing.assert_allclose(from_tables["pearson"], from_model.loc[from_tables.index, "pearson"], atol=1e-4)
    with pytest.raises(KeyError, match="missing"):
        scellst.bench.evaluate(sdata, genes=["NOPE"])


def test_cross_validate_with_baselines(processed):
    df = scellst.bench.cross_validate(
        {"a": processed, "b": processed},
        models={"mil": {"max_epochs": 30, "lr": 1e-3}},
        baselines=("ridge", "spot_mlp"),
        n_genes=10,
    )
    assert set(df["model"]) == {"mil", "ridge", "spot_mlp"}
    assert set(df["fold"]) == {"a", "b"}
    assert len(df) == 2 * 3 * 10
    assert {"pearson", "spearman", "rmse", "mae", "train_seconds"} <= set(df.columns)
    means = df.groupby("model")["pearson"].mean()
    assert (means > 0.3).all()  # the same tissue: every model must find the signal

    single = scellst.bench.cross_validate(
        {"a": processed}, scheme="single_slide", n_folds=2, models={"mil": {"max_epochs": 20, "lr": 1e-3}}, baselines=()
    )
    assert set(single["fold"]) == {"a/fold0", "a/fold1"}
    with pytest.raises(ValueError, match="at least two slides"):
        scellst.bench.cross_validate({"a": processed})


def test_prediction_streams_dask_features(model, processed):
    import dask.array as da

    x = np.asarray(processed.tables["nuclei_embeddings"].X)
    lazy = da.from_array(x, chunks=(700, x.shape[1]))
    np.testing.assert_allclose(model.predict_cells(lazy, batch_size=256), model.predict_cells(x), rtol=1e-4, atol=1e-5)


def test_prediction_streams_numpy_features_in_blocks(model, processed, monkeypatch):
    """Cells are standardised a block at a time and spots from their own cells only: the values do not change."""
    import torch

    from scellst.models import _mil

    x = np.asarray(processed.tables["nuclei_embeddings"].X)
    whole = model.predict_cells(x)
    monkeypatch.setattr(_mil, "_BLOCK_ROWS", 97)  # many blocks, the last one short
    blocks = list(model._blocks(x, None))
    assert len(blocks) == -(-len(x) // 97)
    assert [b[1] - b[0] for b in blocks[:-1]] == [97] * (len(blocks) - 1)
    np.testing.assert_array_equal(np.concatenate([b[2] for b in blocks]), model.standardize(x))
    # the network sees other batch sizes: float rounding only
    np.testing.assert_allclose(model.predict_cells(x), whole, rtol=1e-6, atol=1e-6)
    assert model.predict_cells(x[:0]).shape == (0, len(model.genes))

    rng = np.random.default_rng(0)
    bags = [rng.choice(len(x), size=k, replace=False) for k in (1, 5, 12, 30)]
    z = model.standardize(x)  # the whole slide at once, as before streaming

    def spot_means(net) -> np.ndarray:
        with torch.no_grad():
            return np.stack([net(torch.from_numpy(z[b]), None).numpy().mean(axis=0) for b in bags])

    expected = np.mean([model._to_lognorm(spot_means(net)) for net in model.networks], axis=0)
    np.testing.assert_allclose(model.predict_spots(x, bags), expected, rtol=1e-5, atol=1e-6)


def test_quantile_scaling_ignores_monotone_stain_changes(model, processed):
    """The default per-slide quantile scaling: a monotone change of every feature (a stronger stain, another scanner's
    response) gives the same scaled features and the same predictions; a z-score would not."""
    from scellst.models._mil import quantile_normal, quantile_stats

    assert model.embedding_scaling == "quantile"
    x = np.asarray(processed.tables["nuclei_embeddings"].X, dtype=np.float64)
    changed = 4.0 * np.cbrt(x) + 3.0  # monotone, non-linear
    z = quantile_normal(x, quantile_stats(x))
    # equal at the 1,000 quantile levels; between them the linear interpolation differs by a fraction of a level
    diff = np.abs(quantile_normal(changed, quantile_stats(changed)) - z)
    inner = np.abs(z) < 2.5  # in the far tails one level spans up to 0.3 normal units
    assert diff[inner].max() < 0.15
    assert diff.mean() < 0.005
    assert abs(z[inner].mean()) < 0.1
    assert 0.8 < z[inner].std() < 1.2
    pred = model.predict_cells(x)
    shift = np.abs(model.predict_cells(changed) - pred).mean()
    assert shift < 0.02 * pred.std()
    zscore = scellst.tl.train(processed, embedding_scaling="slide", n_models=1, **FAST)
    zpred = zscore.predict_cells(x)
    assert np.abs(zscore.predict_cells(changed) - zpred).mean() > 10 * shift
    with pytest.raises(ValueError, match="embedding_scaling"):
        scellst.tl.train(processed, embedding_scaling="rank", **FAST)


def test_train_resolves_its_device(processed):
    """`device="auto"` is the default; a GPU that this torch cannot use is a clear error, not a crash mid-training."""
    import inspect

    assert inspect.signature(scellst.tl.train).parameters["device"].default == "auto"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            scellst.tl.train(processed, device="cuda", max_epochs=1, show_progress_bar=False)
    with pytest.raises(ValueError, match="`device` must be"):
        scellst.tl.train(processed, device="tpu9", max_epochs=1, show_progress_bar=False)
    assert inspect.signature(scellst.tl.predict).parameters["device"].default == "auto"
    model = scellst.tl.train(processed, n_models=1, max_epochs=2, show_progress_bar=False)
    with pytest.raises(ValueError, match="`device` must be"):
        scellst.tl.predict(fresh_copy(processed), model, device="tpu9")
