from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import scellst


def _toy(seed: int = 0, n_cells: int = 1800, n_ref: int = 900, n_genes: int = 30):
    """Cells whose features reveal their group (with noise), and a reference with 3 distinct types."""
    rng = np.random.default_rng(seed)
    groups = rng.choice(["a", "b", "c"], size=n_cells)
    centres = {"a": rng.normal(size=8), "b": rng.normal(size=8), "c": rng.normal(size=8)}
    x = np.stack([centres[g] for g in groups]) * 2 + rng.normal(size=(n_cells, 8))
    cells = ad.AnnData(
        X=x.astype(np.float32),
        obs=pd.DataFrame(
            {"klass": groups, "patch": rng.integers(0, 60, n_cells).astype(str), "image": rng.integers(0, 10, n_cells)},
            index=[f"c{i}" for i in range(n_cells)],
        ),
    )
    types = rng.choice(["T", "tumour", "fibro"], size=n_ref)
    base = rng.gamma(2.0, 1.0, size=n_genes)
    prof = {t: base * rng.lognormal(0, 1.0, size=n_genes) for t in ["T", "tumour", "fibro"]}
    counts = np.stack([rng.poisson(prof[t] * 3) for t in types]).astype(np.float32)
    reference = ad.AnnData(
        X=counts,
        obs=pd.DataFrame({"cell_type": types}, index=[f"r{i}" for i in range(n_ref)]),
        var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]),
    )
    return cells, reference


MATCH = {"a": "T", "b": "tumour", "c": "fibro"}


def test_simulate_spots_structure():
    cells, ref = _toy()
    sim = scellst.bench.simulate_spots(
        cells,
        ref,
        scenario="cell",
        groupby="klass",
        matching=MATCH,
        n_spots=200,
        cells_per_spot=10,
        spot_groups="patch",
        split_by="image",
        seed=0,
    )
    assert sim.spots.n_obs == len(sim.bags)
    assert abs(sim.spots.n_obs - 200) <= 2
    for b, row in zip(sim.bags[:20], sim.spots.X[:20], strict=False):
        np.testing.assert_allclose(sim.cells.X[b].sum(axis=0), row, rtol=1e-5)
        assert len(np.unique(cells.obs["patch"].to_numpy()[b])) == 1  # drawn within one patch
    # train and test share no image, and no spot mixes the two
    split = sim.cells.obs["split"].to_numpy()
    img = cells.obs["image"].to_numpy()
    assert not set(img[split == "train"]) & set(img[split == "test"])
    for b, s in zip(sim.bags, sim.spots.obs["split"], strict=True):
        assert (split[b] == s).all()
    # every cell got the expression of its matched type
    pd.testing.assert_series_equal(
        sim.cells.obs["matched_type"].astype(str),
        sim.cells.obs["group"].astype(str).map(MATCH),
        check_names=False,
    )


def test_simulation_scenarios_give_expected_ranking():
    cells, ref = _toy()
    scores = {}
    for scenario in ("centroid", "cell", "random"):
        sim = scellst.bench.simulate_spots(
            cells,
            ref,
            scenario=scenario,
            groupby="klass",
            matching=MATCH,
            n_spots=300,
            cells_per_spot=10,
            spot_groups="patch",
            seed=0,
        )
        df = scellst.bench.benchmark_simulation(sim, models=("mil", "supervised", "oracle"), n_hvg=20, n_markers=5)
        inst = df[(df.level == "instance") & (df.gene_set == "hvg")].set_index("model")["pearson"]
        scores[scenario] = inst
    assert scores["centroid"]["mil"] > 0.8
    assert abs(scores["random"]["mil"]) < 0.15
    assert scores["cell"]["mil"] > 0.15
    assert scores["cell"]["mil"] >= 0.7 * scores["cell"]["supervised"]
    assert scores["centroid"]["oracle"] > 0.95


def test_kmeans_groups_and_arbitrary_matching():
    cells, ref = _toy()
    sim = scellst.bench.simulate_spots(cells, ref, scenario="centroid", n_spots=50, seed=1)
    assert sim.cells.obs["group"].nunique() == 3  # one cluster per reference type
    assert sorted(t for ts in sim.matching.values() for t in ts) == ["T", "fibro", "tumour"]


def test_simulation_errors():
    cells, ref = _toy(n_cells=100, n_ref=50)
    with pytest.raises(ValueError, match="Unknown scenario"):
        scellst.bench.simulate_spots(cells, ref, scenario="mixed")
    with pytest.raises(ValueError, match="no entry in `matching`"):
        scellst.bench.simulate_spots(cells, ref, groupby="klass", matching={"a": "T"})
    with pytest.raises(ValueError, match="not in the reference"):
        scellst.bench.simulate_spots(cells, ref, groupby="klass", matching={"a": "T", "b": "B", "c": "fibro"})
    with pytest.raises(KeyError, match="no column"):
        scellst.bench.simulate_spots(cells, ref, groupby="nope")
    bad = ref.copy()
    bad.X[0, 0] = -1
    with pytest.raises(ValueError, match="raw counts"):
        scellst.bench.simulate_spots(cells, bad)


def test_dirichlet_compositions_vary():
    cells, ref = _toy()
    sim = scellst.bench.simulate_spots(
        cells, ref, groupby="klass", matching=MATCH, n_spots=300, cells_per_spot=20, composition_alpha=0.3, seed=0
    )
    groups = sim.cells.obs["group"].astype(str).to_numpy()
    top = np.array([pd.Series(groups[b]).value_counts(normalize=True).iloc[0] for b in sim.bags])
    # with a small concentration many spots are dominated by one group, unlike uniform random draws (~0.4)
    assert np.median(top) > 0.6
    assert (top < 0.6).any()
    with pytest.raises(ValueError, match="composition_alpha"):
        scellst.bench.simulate_spots(cells, ref, groupby="klass", matching=MATCH, n_spots=10, composition_alpha=-1)


def test_benchmark_simulation_runs_the_registered_models():
    cells, ref = _toy()
    sim = scellst.bench.simulate_spots(
        cells, ref, scenario="centroid", groupby="klass", matching=MATCH, n_spots=300, cells_per_spot=10, seed=0
    )
    df = scellst.bench.benchmark_simulation(
        sim,
        models=("cpnn", "deepspot2cell", "miso", "oracle"),
        reference=ref,
        groupby="cell_type",
        model_params={"miso": {"k_neighbors": 8}},
        n_hvg=20,
        n_markers=5,
    )
    inst = df[(df.level == "instance") & (df.gene_set == "hvg")].set_index("model")["pearson"]
    assert inst["cpnn"] > 0.8, inst.to_dict()
    assert inst["deepspot2cell"] > 0.6, inst.to_dict()
    assert inst["miso"] > 0.6, inst.to_dict()
    # CPNN's argmax type recovers the type each morphological group was matched to
    types = df.attrs["cpnn_types"]
    expected = sim.cells.obs.loc[types.index, "matched_type"].astype(str)
    assert (types.to_numpy() == expected.to_numpy()).mean() > 0.9
    with pytest.raises(ValueError, match="needs an annotated single-cell reference"):
        scellst.bench.benchmark_simulation(sim, models=("cpnn",))
