"""Simulated spots from real cell images paired with real single-cell expression (the sCellST paper's Fig. 2).

Each cell image gets the expression of a reference single cell of a matched type, spots sum their cells' counts, the
model is trained on spots only, and its per-cell predictions are compared with the known truth.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._constants import TARGET_SUM
from .._logging import logger

if TYPE_CHECKING:
    from anndata import AnnData

Scenario = Literal["cell", "centroid", "random"]
SCENARIOS = ("cell", "centroid", "random")


@dataclass
class SimulatedSpots:
    """A simulation: cells with their image features and true expression, and spots made of them.

    Attributes
    ----------
    cells
        Cells x genes AnnData of the **true** cell expression (counts; ``layers['lognorm']`` too), with the image
        features in ``obsm['features']`` and ``obs`` columns ``group`` (morphological group), ``matched_type``
        (reference type that gave the expression), ``split`` (``train``/``test``).
    spots
        Spots x genes AnnData of summed counts; ``obs['split']`` and ``obs['n_cells']``.
    bags
        Per spot, the indices of its cells (rows of ``cells``).
    matching
        Morphological group -> reference types.
    """

    cells: AnnData
    spots: AnnData
    bags: list[np.ndarray] = field(repr=False)
    scenario: str = "cell"
    matching: dict[str, list[str]] = field(default_factory=dict)

    def __repr__(self) -> str:
        n_test = int((self.cells.obs["split"] == "test").sum())
        return (
            f"SimulatedSpots({self.scenario!r}: {self.cells.n_obs:,} cells ({n_test:,} test), {self.spots.n_obs:,} "
            f"spots, {self.cells.n_vars} genes, groups {sorted(self.matching)})"
        )


def _lognorm_dense(x: np.ndarray) -> np.ndarray:
    lib = x.sum(axis=1, keepdims=True)
    return np.log1p(x / np.maximum(lib, 1e-8) * TARGET_SUM).astype(np.float32)


def _dense(x) -> np.ndarray:
    import scipy.sparse as sp

    return (x.toarray() if sp.issparse(x) else np.asarray(x)).astype(np.float32)


def _match_groups(
    groups: Sequence[str], types: Sequence[str], matching: Mapping[str, Any] | str | None, rng: np.random.Generator
) -> dict[str, list[str]]:
    groups, types = sorted(set(groups)), sorted(set(types))
    if matching is None or matching == "arbitrary":
        # the paper: each morphological cluster gets a reference type at random (distinct while types remain)
        order = list(rng.permutation(types))
        while len(order) < len(groups):
            order += list(rng.permutation(types))
        return {str(g): [str(order[i])] for i, g in enumerate(groups)}
    if isinstance(matching, str):
        raise ValueError(f"`matching` must be a dict, 'arbitrary' or None, got {matching!r}.")
    out = {}
    for g in groups:
        if g not in matching:
            raise ValueError(f"Group {g!r} has no entry in `matching` (groups: {groups}).")
        val = [matching[g]] if isinstance(matching[g], str) else list(matching[g])
        missing = [t for t in val if t not in types]
        if missing:
            raise ValueError(f"`matching[{g!r}]` names types {missing} that are not in the reference: {types}.")
        out[str(g)] = [str(t) for t in val]
    return out


def simulate_spots(
    cells: AnnData,
    reference: AnnData,
    *,
    scenario: Scenario = "cell",
    groupby: str | None = None,
    reference_groupby: str = "cell_type",
    matching: Mapping[str, Any] | Literal["arbitrary"] | None = None,
    n_clusters: int | None = None,
    n_spots: int = 5000,
    cells_per_spot: int = 20,
    spot_groups: str | None = None,
    composition_alpha: float | None = 0.3,
    split_by: str | None = None,
    test_fraction: float = 0.3,
    seed: int = 0,
) -> SimulatedSpots:
    """Pair real cell images with real single-cell expression and build spots whose truth is known.

    Parameters
    ----------
    cells
        Cell features: an embedding table (e.g. ``sdata.tables['nuclei_embeddings']``), cells x features.
    reference
        Annotated single cells with **raw counts** in ``X`` (e.g. Xenium or scRNA-seq), cells x genes.
    scenario
        ``"centroid"``: every cell gets the mean profile of its matched type; ``"cell"``: the counts of a random
        reference cell of its matched type; ``"random"``: a random reference cell of any type (no image signal).
    groupby
        Column of ``cells.obs`` with the morphological group (e.g. a known class). ``None``: k-means clusters of the
        standardised features, as in the paper.
    reference_groupby
        Cell-type column of ``reference.obs``.
    matching
        Group -> reference type(s) (a name or a list, e.g. ``{"inflammatory": ["T", "B", "macrophage"]}``);
        ``"arbitrary"`` or ``None``: a random one-to-one assignment, as in the paper.
    n_clusters
        Number of k-means clusters when ``groupby`` is ``None`` (default: the number of reference types).
    n_spots
        Number of spots (train and test together).
    cells_per_spot
        Cells per spot.
    spot_groups
        Column of ``cells.obs`` (e.g. an image patch) within which each spot's cells are drawn, so that spots have
        realistic, varied compositions. ``None``: cells drawn from all cells.
    composition_alpha
        When set (and ``spot_groups`` is ``None``), each spot first draws its group proportions from a symmetric
        Dirichlet with this concentration (small values: spots dominated by few groups), then its cells from those
        groups. Varied compositions are what lets MIL tell the groups apart.
    split_by
        Column of ``cells.obs`` whose values are split between training and test cells (e.g. the source image), so
        no image contributes to both. ``None``: a random split of cells.
    test_fraction
        Fraction of cells (or of ``split_by`` values) held out for testing.
    seed
        Random seed.

    Returns
    -------
    A :class:`SimulatedSpots`. Spots are built separately from training and test cells; cells are reused across
    spots only when there are fewer cells than spot slots (each cell keeps one expression).
    """
    import anndata as ad

    if scenario not in SCENARIOS:
        raise ValueError(f"Unknown scenario {scenario!r}; use one of {SCENARIOS}.")
    if reference_groupby not in reference.obs:
        raise KeyError(f"`reference.obs` has no column {reference_groupby!r}; columns: {list(reference.obs.columns)}.")
    for col in (groupby, spot_groups, split_by):
        if col is not None and col not in cells.obs:
            raise KeyError(f"`cells.obs` has no column {col!r}; columns: {list(cells.obs.columns)}.")
    if cells_per_spot < 1 or n_spots < 2:
        raise ValueError("`cells_per_spot` must be >= 1 and `n_spots` >= 2.")
    if not 0 < test_fraction < 1:
        raise ValueError(f"`test_fraction` must be between 0 and 1, got {test_fraction}.")
    ref_x = _dense(reference.X)
    if np.isnan(ref_x).any() or (ref_x < 0).any():
        raise ValueError("The reference must hold raw counts (no NaN, no negative values) in `X`.")
    if np.allclose(ref_x, np.round(ref_x)) is False:
        logger.warning("The reference `X` is not integer; simulate from raw counts for realistic spots.")
    rng = np.random.default_rng(seed)
    feats = _dense(cells.X)
    n = len(feats)
    ref_types = reference.obs[reference_groupby].astype(str).to_numpy()

    if groupby is None:
        from sklearn.cluster import KMeans

        k = n_clusters or len(np.unique(ref_types))
        z = (feats - feats.mean(0)) / (feats.std(0) + 1e-8)
        labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(z)
        group = np.array([f"cluster_{i}" for i in labels])
    else:
        group = cells.obs[groupby].astype(str).to_numpy()
    match = _match_groups(group, ref_types, matching, rng)

    by_type = {t: np.flatnonzero(ref_types == t) for t in np.unique(ref_types)}
    centroids = {t: ref_x[idx].mean(axis=0) for t, idx in by_type.items()}
    expr = np.empty((n, ref_x.shape[1]), dtype=np.float32)
    matched_type = np.empty(n, dtype=object)
    for i in range(n):
        if scenario == "random":
            j = rng.integers(len(ref_x))
            matched_type[i] = ref_types[j]
            expr[i] = ref_x[j]
            continue
        t = match[group[i]][rng.integers(len(match[group[i]]))]
        matched_type[i] = t
        expr[i] = centroids[t] if scenario == "centroid" else ref_x[by_type[t][rng.integers(len(by_type[t]))]]

    # train / test split of cells
    if split_by is None:
        test = rng.random(n) < test_fraction
    else:
        values = np.unique(cells.obs[split_by].astype(str).to_numpy())
        n_test = max(1, int(round(len(values) * test_fraction)))
        if n_test >= len(values):
            raise ValueError(f"`split_by={split_by!r}` has too few values ({len(values)}) for a train/test split.")
        test_values = set(rng.choice(values, size=n_test, replace=False))
        test = cells.obs[split_by].astype(str).isin(test_values).to_numpy()
    split = np.where(test, "test", "train")

    # spots, drawn within spot groups, separately for train and test cells
    pools = cells.obs[spot_groups].astype(str).to_numpy() if spot_groups is not None else np.zeros(n, dtype=str)
    bags, spot_split = [], []
    for part in ("train", "test"):
        idx = np.flatnonzero(split == part)
        n_part = max(1, int(round(n_spots * (np.mean(split == part)))))
        if composition_alpha is not None and spot_groups is None:
            bags_part = _draw_bags_dirichlet(idx, group[idx], n_part, cells_per_spot, composition_alpha, rng)
        else:
            bags_part = _draw_bags(idx, pools[idx], n_part, cells_per_spot, rng)
        bags.extend(bags_part)
        spot_split.extend([part] * len(bags_part))
    spot_counts = np.stack([expr[b].sum(axis=0) for b in bags])

    genes = pd.Index(reference.var_names.astype(str))
    obs = pd.DataFrame(
        {"group": pd.Categorical(group), "matched_type": pd.Categorical(matched_type.astype(str)), "split": split},
        index=cells.obs_names.astype(str),
    )
    cell_ad = ad.AnnData(X=expr, obs=obs, var=pd.DataFrame(index=genes))
    cell_ad.layers["lognorm"] = _lognorm_dense(expr)
    cell_ad.obsm["features"] = feats
    spot_obs = pd.DataFrame(
        {"split": spot_split, "n_cells": [len(b) for b in bags]}, index=[f"spot_{i}" for i in range(len(bags))]
    )
    spots = ad.AnnData(X=spot_counts.astype(np.float32), obs=spot_obs, var=pd.DataFrame(index=genes))
    sim = SimulatedSpots(cell_ad, spots, bags, scenario=scenario, matching=match)
    logger.info(f"Simulated {sim!r}")
    return sim


def _draw_bags_dirichlet(
    idx: np.ndarray, groups: np.ndarray, n_bags: int, size: int, alpha: float, rng: np.random.Generator
) -> list:
    """Bags whose group proportions follow a symmetric Dirichlet; cells are used evenly within each group."""
    if alpha <= 0:
        raise ValueError(f"`composition_alpha` must be positive, got {alpha}.")
    names = np.unique(groups)
    by_group = {g: idx[groups == g] for g in names}
    queues = {g: list(rng.permutation(v)) for g, v in by_group.items()}
    bags = []
    for _ in range(n_bags):
        n_per = rng.multinomial(size, rng.dirichlet(np.full(len(names), alpha)))
        bag: list[int] = []
        for g, k in zip(names, n_per, strict=True):
            for _ in range(min(k, len(by_group[g]))):
                if not queues[g]:
                    queues[g] = list(rng.permutation(by_group[g]))
                bag.append(queues[g].pop())
        bags.append(np.array(sorted(set(bag)), dtype=int))
    return bags


def _draw_bags(idx: np.ndarray, pools: np.ndarray, n_bags: int, size: int, rng: np.random.Generator) -> list:
    """``n_bags`` bags of ``size`` cells, each from one pool; cells are used evenly before any is reused."""
    by_pool = {p: idx[pools == p] for p in np.unique(pools)}
    weights = np.array([len(v) for v in by_pool.values()], dtype=float)
    names = list(by_pool)
    queues = {p: list(rng.permutation(v)) for p, v in by_pool.items()}
    bags = []
    for p in rng.choice(len(names), size=n_bags, p=weights / weights.sum()):
        name = names[p]
        take = min(size, len(by_pool[name]))
        bag = []
        while len(bag) < take:
            if not queues[name]:
                queues[name] = list(rng.permutation(by_pool[name]))
            c = queues[name].pop()
            if c not in bag:
                bag.append(c)
        bags.append(np.array(bag, dtype=int))
    return bags


def _pearson_per_gene(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    p = pred - pred.mean(0)
    t = true - true.mean(0)
    denom = np.sqrt((p**2).sum(0) * (t**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (p * t).sum(0) / denom
    return np.where(denom > 1e-12, r, np.nan)


def benchmark_simulation(
    sim: SimulatedSpots,
    *,
    genes: Mapping[str, Sequence[str]] | None = None,
    n_hvg: int = 50,
    n_markers: int = 10,
    models: Sequence[str] = ("mil", "supervised", "mil_onehot", "oracle"),
    reference: AnnData | None = None,
    groupby: str | None = None,
    model_params: Mapping[str, Mapping[str, Any]] | None = None,
    loss: str = "mse",
    lr: float = 1e-3,
    batch_size: int = 32,
    max_epochs: int = 1000,
    patience: int = 30,
    seed: int = 0,
    show_progress_bar: bool = False,
) -> pd.DataFrame:
    """Train on the simulated spots and score per-cell (instance) and per-spot (bag) predictions on test data.

    Models: ``"mil"`` (or ``"scellst"``) the sCellST MIL on the image features (spots only); the other registered
    models ``"cpnn"`` (needs ``reference`` and ``groupby``), ``"deepspot2cell"`` and ``"miso"``, trained on the
    same spots; ``"supervised"`` the sCellST network trained on the true expression of each training cell (the
    upper bound); ``"mil_onehot"`` MIL on one-hot encodings of the morphological group instead of image features;
    ``"oracle"`` the mean true expression of the training cells of the test cell's group (the best any group-level
    predictor can do). Simulated spots have no layout: each gets a random position, so the neighbouring spots that
    DeepSpot2Cell and MISO use carry no signal here, only the spot itself does.

    Parameters
    ----------
    sim
        From :func:`simulate_spots`.
    genes
        Named gene sets to score; default: ``{"hvg": top n_hvg highly variable genes of the simulated cells,
        "markers": top n_markers marker genes per matched type}``, both from the training cells.
    n_hvg, n_markers
        Sizes of the default gene sets.
    models
        Which models to run.
    reference, groupby
        The annotated single-cell reference (counts) and its type column, for ``"cpnn"``.
    model_params
        Options per registered model, e.g. ``{"miso": {"k_neighbors": 12}}`` (see :func:`scellst.tl.train`).
    loss
        Loss of the networks (see :func:`scellst.tl.train`): ``"mse"`` (the paper) or ``"nb"`` (counts; the cells'
        rates add up to the spot, exactly as simulated spots are made).
    lr, batch_size, max_epochs, patience
        Optimisation of the networks (training stops on convergence; ``max_epochs`` is only a cap).
    seed
        Random seed.
    show_progress_bar
        Show training progress bars.

    Returns
    -------
    A tidy DataFrame: ``model``, ``gene_set``, ``level`` (``instance``/``bag``), ``pearson`` (mean over genes),
    ``n_genes``, ``train_seconds``, ``best_epoch``; with ``attrs['per_gene']`` the per-gene correlations and, for
    CPNN, ``attrs['cpnn_types']`` (the argmax reference type of every test cell) and ``attrs['cpnn_weights']``.
    """
    from ..models import SpotContext

    cells, spots = sim.cells, sim.spots
    train_cells = cells.obs["split"].to_numpy() == "train"
    test_cells = ~train_cells
    spot_train = spots.obs["split"].to_numpy() == "train"
    if genes is None:
        genes = default_gene_sets(cells[train_cells], n_hvg=n_hvg, n_markers=n_markers)
    all_genes = sorted({g for gs in genes.values() for g in gs})
    missing = [g for g in all_genes if g not in cells.var_names]
    if missing:
        raise ValueError(f"Genes not in the simulation: {missing[:5]}.")
    gi = cells.var_names.get_indexer(all_genes)
    true_cells = cells.layers["lognorm"][:, gi]
    test_bags = [b for b, tr in zip(sim.bags, spot_train, strict=True) if not tr]
    true_spots = _lognorm_dense(_dense(spots.X)[~spot_train])[:, gi]

    rows, per_gene, extra = [], {}, {}
    onehot = pd.get_dummies(cells.obs["group"]).to_numpy(dtype=np.float32)
    spot_xy = np.empty((len(sim.bags), 2))  # no layout: random positions
    spot_xy[spot_train] = np.random.default_rng(seed).random((int(spot_train.sum()), 2))
    spot_xy[~spot_train] = np.random.default_rng(seed + 1).random((int((~spot_train).sum()), 2))
    registered = ("scellst", "cpnn", "deepspot2cell", "miso")
    for name in models:
        t0 = time.perf_counter()
        best = np.nan
        if name == "oracle":
            means = (
                pd.DataFrame(true_cells[train_cells])
                .groupby(cells.obs["group"].to_numpy()[train_cells], observed=True)
                .mean()
            )
            pred = means.reindex(cells.obs["group"].to_numpy()).to_numpy(dtype=np.float32)
            pred = np.nan_to_num(pred, nan=float(np.nanmean(means.to_numpy())))
        elif name in ("mil", "mil_onehot", "supervised", *registered):
            feats = onehot if name == "mil_onehot" else cells.obsm["features"]
            if name == "supervised":
                bags = [np.array([i]) for i in np.flatnonzero(train_cells)]
                counts = _dense(cells.X)[train_cells]
                xy = np.random.default_rng(seed).random((len(bags), 2))
            else:
                bags = [b for b, tr in zip(sim.bags, spot_train, strict=True) if tr]
                counts = _dense(spots.X)[spot_train]
                xy = spot_xy[spot_train]
            # the supervised bound sees as many cells per step as MIL does
            bs = batch_size * int(np.mean([len(b) for b in sim.bags])) if name == "supervised" else batch_size
            kind = name if name in registered else "scellst"
            model = _fit(
                feats, bags, counts, cells.var_names, all_genes, xy,
                lr=lr, batch_size=bs, max_epochs=max_epochs, patience=patience, seed=seed,
                progress=show_progress_bar, name=name, loss=loss, model=kind,
                model_params=(model_params or {}).get(name), reference=reference, groupby=groupby,
            )  # fmt: skip
            x = np.asarray(feats, dtype=np.float32)
            pred = model.predict_cells(x, context=SpotContext(bags=sim.bags, spot_xy=spot_xy))
            best = model.params["best_epoch"]
            if name == "cpnn":
                weights = model.predict_type_weights(x)[test_cells]
                extra["cpnn_weights"] = pd.DataFrame(
                    weights, index=cells.obs_names[test_cells], columns=model.cell_types
                )
                extra["cpnn_types"] = pd.Series(
                    np.asarray(model.cell_types)[weights.argmax(axis=1)], index=cells.obs_names[test_cells]
                )
        else:
            raise ValueError(
                f"Unknown model {name!r}; use 'mil', 'supervised', 'mil_onehot', 'oracle' or a registered model "
                f"{registered}."
            )
        dt = time.perf_counter() - t0
        pred_spots = np.stack([pred[b].mean(axis=0) for b in test_bags])
        for level, p, t in (
            ("instance", pred[test_cells], true_cells[test_cells]),
            ("bag", pred_spots, true_spots),
        ):
            r = pd.Series(_pearson_per_gene(p, t), index=all_genes)
            for set_name, gs in genes.items():
                sub = r.reindex(list(gs))
                per_gene[(name, set_name, level)] = sub
                rows.append(
                    {
                        "model": name,
                        "gene_set": set_name,
                        "level": level,
                        "pearson": float(sub.mean(skipna=True)),
                        "n_genes": int(sub.notna().sum()),
                        "train_seconds": dt,
                        "best_epoch": best,
                    }
                )
    df = pd.DataFrame(rows)
    df.attrs["per_gene"] = per_gene
    df.attrs["scenario"] = sim.scenario
    df.attrs.update(extra)
    return df


def _fit(
    feats, bags, counts, var_names, genes, spot_xy, *, lr, batch_size, max_epochs, patience, seed, progress, name,
    loss, model="scellst", model_params=None, reference=None, groupby=None,
):  # fmt: skip
    import anndata as ad

    from ..tl._train import FitSettings, Slide, fit_slides

    slide = Slide(
        name=name,
        features=np.asarray(feats, dtype=np.float32),
        bags=list(bags),
        counts=ad.AnnData(X=counts, var=pd.DataFrame(index=pd.Index(var_names.astype(str)))),
        spot_xy=spot_xy,  # random: validation blocks are random spots
        spot_ids=np.array([f"s{i}" for i in range(len(bags))]),
        feature_names=[f"f{i}" for i in range(feats.shape[1])],
        embedding_method=name,
    )
    settings = FitSettings(
        lr=lr, batch_size=batch_size, max_epochs=max_epochs, patience=patience, show_progress_bar=progress
    )
    return fit_slides(
        [slide], list(genes), loss=loss, seed=seed, settings=settings, model=model, model_params=model_params,
        reference=reference, groupby=groupby,
    )  # fmt: skip


def default_gene_sets(cells: AnnData, *, n_hvg: int = 50, n_markers: int = 10) -> dict[str, list[str]]:
    """Highly variable genes (seurat_v3 on counts) and the top marker genes of each matched type."""
    import anndata as ad
    import scanpy as sc

    x = np.round(_dense(cells.X))  # seurat_v3 expects counts
    keep = x.sum(axis=0) > 0
    a = ad.AnnData(X=x[:, keep], obs=cells.obs[["matched_type"]].copy(), var=pd.DataFrame(index=cells.var_names[keep]))
    n_hvg = min(n_hvg, a.n_vars)
    hvg = sc.pp.highly_variable_genes(a, flavor="seurat_v3", n_top_genes=n_hvg, inplace=False)
    hvg_genes = list(hvg.sort_values("highly_variable_rank").index[:n_hvg])
    from ..tl._celltypes import marker_genes

    per_type = marker_genes(a, groupby="matched_type", n_genes=n_markers) if a.obs["matched_type"].nunique() > 1 else {}
    markers = list(dict.fromkeys(g for genes in per_type.values() for g in genes))
    return {"hvg": hvg_genes, "markers": markers}
