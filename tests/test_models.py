"""The model registry: sCellST, CPNN, DeepSpot2Cell and MISO through the same train / predict / save / load calls."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import scellst
from scellst.models._context import SpotContext, cell_spots, spot_means, spot_neighbors, virtual_bags

from .conftest import fresh_copy

FAST = {"seed": 0, "lr": 1e-3, "max_epochs": 150, "show_progress_bar": False}


@pytest.fixture(scope="module")
def reference(processed):
    """The synthetic tissue's true cells as an annotated single-cell reference (counts, cell types)."""
    truth = processed.tables["true_expression"]
    ref = ad.AnnData(
        X=np.asarray(truth.layers["counts"]),
        obs=pd.DataFrame({"cell_type": truth.obs["cell_type"].astype(str).to_numpy()}),
        var=pd.DataFrame(index=truth.var_names.astype(str)),
    )
    ref.obs_names = [f"ref{i}" for i in range(ref.n_obs)]
    return ref


@pytest.fixture(scope="module")
def trained(processed, reference):
    opts = {"cpnn": {"reference": reference, "groupby": "cell_type"}}
    return {
        m: scellst.tl.train(processed, model=m, **opts.get(m, {}), **FAST) for m in scellst.models.available_models()
    }


def _true_types(sdata) -> np.ndarray:
    """The true type of each predicted cell (nearest true nucleus centre)."""
    from scipy.spatial import cKDTree

    truth = sdata.tables["true_expression"]
    true_xy = scellst._utils.shapes_centroids(sdata.shapes["true_cells"])
    order = pd.Index(sdata.shapes["true_cells"].index.astype(str)).get_indexer(scellst._utils.instance_ids(truth))
    _, idx = cKDTree(true_xy[order]).query(sdata.tables["nuclei_expression"].obsm["spatial"])
    return truth.obs["cell_type"].astype(str).to_numpy()[idx]


def test_registry_lists_models_and_rejects_unknown(processed):
    assert scellst.models.available_models() == ["scellst", "cpnn", "deepspot2cell", "miso"]
    with pytest.raises(ValueError, match=r"Unknown model 'hovernet'.*available models"):
        scellst.tl.train(processed, model="hovernet", **FAST)
    with pytest.raises(ValueError, match=r"Unknown option.*'k'.*accepts"):
        scellst.tl.train(processed, model="miso", model_params={"k": 3}, **FAST)
    with pytest.raises(ValueError, match="needs an annotated single-cell reference"):
        scellst.tl.train(processed, model="cpnn", **FAST)
    with pytest.raises(ValueError, match="registered"):
        scellst.models.register_model(scellst.models.get_model("scellst"))


@pytest.mark.parametrize(
    ("name", "cell_min"), [("scellst", 0.45), ("cpnn", 0.45), ("deepspot2cell", 0.4), ("miso", 0.45)]
)
def test_every_model_learns_single_cells(processed, trained, name, cell_min):
    model = trained[name]
    sdata = fresh_copy(processed)
    scellst.tl.predict(sdata, model)
    cells = sdata.tables["nuclei_expression"]
    assert cells.n_obs == len(sdata.shapes["nuclei"])
    assert list(cells.var_names) == model.genes
    assert np.isfinite(cells.X).all()
    cell = scellst.bench.evaluate(sdata, level="cell")["pearson"].mean()
    spot = scellst.bench.evaluate(sdata)["pearson"].mean()
    assert cell > cell_min, (name, cell)
    assert spot > 0.6, (name, spot)
    assert model.model == name
    assert model.params["model"] == name


def test_shuffled_spot_labels_learn_nothing(processed):
    """A model trained on spots whose expression is permuted must not predict cells (per model, a negative control)."""
    sdata = fresh_copy(processed)
    t = sdata.tables["spots_counts"]
    t.X = t.X[np.random.default_rng(0).permutation(t.n_obs)]
    for name in ("deepspot2cell", "miso"):
        model = scellst.tl.train(sdata, model=name, **{**FAST, "max_epochs": 60})
        scellst.tl.predict(sdata, model, overwrite=True)
        assert abs(scellst.bench.evaluate(sdata, level="cell")["pearson"].mean()) < 0.2, name


def test_save_load_gives_the_same_predictions(processed, trained, tmp_path):
    for name, model in trained.items():
        path = tmp_path / f"{name}.pt"
        model.save(path)
        loaded = scellst.tl.load_model(path)
        assert loaded.model == name
        assert loaded.n_models == model.n_models
        a, b = fresh_copy(processed), fresh_copy(processed)
        scellst.tl.predict(a, model)
        scellst.tl.predict(b, path)
        np.testing.assert_allclose(a.tables["nuclei_expression"].X, b.tables["nuclei_expression"].X, atol=1e-5)
        np.testing.assert_allclose(a.tables["spots_predicted"].X, b.tables["spots_predicted"].X, atol=1e-5)


def test_cpnn_type_weights_find_the_true_types(processed, trained, reference):
    model = trained["cpnn"]
    assert model.cell_types == sorted(reference.obs["cell_type"].unique())
    sdata = fresh_copy(processed)
    scellst.tl.predict(sdata, model)
    cells = sdata.tables["nuclei_expression"]
    weights = cells.obsm["cell_type_weights"]
    assert list(weights.columns) == model.cell_types
    np.testing.assert_allclose(weights.to_numpy().sum(axis=1), 1.0, atol=1e-5)
    truth = _true_types(sdata)
    acc = float((cells.obs["predicted_type"].astype(str).to_numpy() == truth).mean())
    chance = float(pd.Series(truth).value_counts(normalize=True).max())
    assert acc > chance + 0.2, (acc, chance)


def test_cpnn_reference_errors(processed, reference):
    bad = reference.copy()
    bad.X = np.log1p(bad.X)
    with pytest.raises(ValueError, match="raw counts"):
        scellst.tl.train(processed, model="cpnn", reference=bad, groupby="cell_type", **FAST)
    with pytest.raises(KeyError, match="no column 'type'"):
        scellst.tl.train(processed, model="cpnn", reference=reference, groupby="type", **FAST)
    small = reference[:, reference.var_names[:5]].copy()
    genes = list(reference.var_names[5:8])
    with pytest.raises(ValueError, match="not in the reference"):
        scellst.tl.train(processed, model="cpnn", reference=small, groupby="cell_type", genes=genes, **FAST)
    # without genes, they are selected among the reference's genes
    model = scellst.tl.train(
        processed, model="cpnn", reference=small, groupby="cell_type", n_top_genes=3, min_gene_counts=0, **FAST
    )
    assert set(model.genes) <= set(small.var_names)


def test_deepspot2cell_ensemble_and_context(processed, trained):
    model = trained["deepspot2cell"]
    assert model.n_models == 3
    assert model.config.options["ensemble"] == "median"
    assert model.needs_context
    # an H&E-only slide (no spots): cells get virtual spots from their positions
    sdata = fresh_copy(processed)
    emb = sdata.tables["nuclei_embeddings"]
    emb.obs = emb.obs.drop(columns="spot_id")
    scellst.tl.predict(sdata, model, spots_key=None)
    assert "spots_predicted" not in sdata.tables
    cell = scellst.bench.evaluate(sdata, level="cell")["pearson"].mean()
    assert cell > 0.35
    with pytest.raises(ValueError, match="needs the cells' spots or positions"):
        model.predict_cells(np.asarray(emb.X))


def test_miso_teacher_and_student(processed, trained):
    model = trained["miso"]
    assert len(model.teachers) == 1
    assert model.config.architecture == "scellst"
    assert model.extras["teacher_config"]["options"]["k_neighbors"] == 36
    slide = scellst.tl._train.prepare_slide(processed)
    teacher = model.predict_spots(slide.features, slide.bags, slide.spot_xy)
    student = model.predict_spots(slide.features, slide.bags)
    assert teacher.shape == student.shape == (len(slide.bags), len(model.genes))
    assert not np.allclose(teacher, student)
    truth = scellst.pp._genes.lognorm(slide.counts, model.genes)
    r = [np.corrcoef(teacher[:, g], truth[:, g])[0, 1] for g in range(len(model.genes))]
    assert np.nanmean(r) > 0.6


def test_cross_validate_and_simulation_run_every_model(processed, reference):
    df = scellst.bench.cross_validate(
        {"a": processed},
        scheme="single_slide",
        n_folds=2,
        models={
            "scellst": {"max_epochs": 40, "lr": 1e-3},
            "miso": {"model": "miso", "max_epochs": 40, "lr": 1e-3},
            "cpnn": {"model": "cpnn", "reference": reference, "groupby": "cell_type", "max_epochs": 40, "lr": 1e-3},
        },
        baselines=(),
        n_genes=10,
    )
    assert set(df["model"]) == {"scellst", "miso", "cpnn"}
    assert df.groupby(["fold", "model"])["gene"].nunique().eq(10).all()
    with pytest.raises(ValueError, match="unknown options"):
        scellst.bench.cross_validate({"a": processed}, scheme="single_slide", models={"x": {"k_neighbors": 3}})


def test_context_helpers():
    rng = np.random.default_rng(0)
    xy = rng.random((2000, 2)) * 100
    bags, _centres = virtual_bags(xy, 20)
    sizes = np.array([len(b) for b in bags])
    assert sizes.sum() == 2000
    assert 10 <= np.mean(sizes) <= 40
    assert len(np.unique(np.concatenate(bags))) == 2000
    spot_xy = np.array([[0.0, 0], [1, 0], [10, 0], [11, 0], [0, 0]])
    nbr = spot_neighbors(spot_xy, 2, groups=np.array([0, 0, 1, 1, 2]))
    np.testing.assert_array_equal(nbr[:, 0], np.arange(5))
    np.testing.assert_array_equal(nbr[:, 1], [1, 0, 3, 2, 4])  # within slides; a lone spot repeats itself
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    np.testing.assert_allclose(spot_means(x, [np.array([0, 1]), np.array([5])]), [[1, 2], [10, 11]])
    ctx = SpotContext(
        bags=[np.array([0, 1])], spot_xy=np.array([[0.0, 0]]), cell_xy=np.array([[0.0, 0], [1, 0], [5, 5]])
    )
    spot_of, _, _ = cell_spots(3, ctx, cells_per_spot=2)
    np.testing.assert_array_equal(spot_of, [0, 0, 0])  # the unassigned cell takes its nearest spot
    with pytest.raises(ValueError, match="at least 1"):
        spot_neighbors(spot_xy, 0)
