"""Spot-level baselines that run through the same evaluation harness as the MIL model.

Both see only the mean scaled cell embedding of each spot (no multiple-instance learning), so they show how
much the per-cell model gains or loses at spot level.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from .._constants import Col, Key
from .._utils import get_key
from ..models._mil import apply_scaling, slide_stats
from ._train import DEFAULT_SCALING, FitSettings, Slide, TrainingData, build_training_data, fit_member, validation_mask

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

BASELINES = ("ridge", "spot_mlp")


def _spot_design(data: TrainingData) -> np.ndarray:
    n_cells = np.array([len(b) for b in data.bags], dtype=np.float32)
    return np.column_stack([data.spot_features(), np.log1p(n_cells)])


def fit_predict_baseline(
    name: str,
    train: Sequence[Slide],
    test: Slide,
    genes: Sequence[str],
    *,
    seed: int = 0,
    settings: FitSettings | None = None,
) -> np.ndarray:
    """Fit a spot-level baseline on ``train`` and predict the log-normalised expression of ``test``'s spots.

    ``"ridge"``: ridge regression (penalty chosen by efficient leave-one-out CV) on the mean cell embedding of each
    spot and its log cell count. ``"spot_mlp"``: the sCellST MLP (same layers, MSE on the same scaled targets, same
    early stopping) applied to the spot's mean embedding instead of to each cell.
    """
    train_data = build_training_data(train, genes, DEFAULT_SCALING)
    test_data = build_training_data([test], genes, DEFAULT_SCALING)
    if name == "ridge":
        from sklearn.linear_model import RidgeCV

        x_train, x_test = _spot_design(train_data), _spot_design(test_data)
        mean, std = x_train.mean(axis=0), x_train.std(axis=0)
        std = np.where(std > 1e-8, std, 1.0)
        model = RidgeCV(alphas=np.logspace(-2, 4, 13)).fit((x_train - mean) / std, train_data.lognorm)
        return model.predict((x_test - mean) / std).astype(np.float32)
    if name == "spot_mlp":
        import torch

        from ..models import MILConfig, build_network

        def _as_spots(d: TrainingData) -> TrainingData:
            x = d.spot_features().astype(np.float32)
            return replace(d, x=x, bags=[np.array([i]) for i in range(len(x))])

        spots_train, spots_test = _as_spots(train_data), _as_spots(test_data)
        config = MILConfig(n_features=spots_train.x.shape[1], n_genes=len(genes))
        settings = replace(settings or FitSettings(), show_progress_bar=False, batch_size=32)
        val = validation_mask(spots_train, 0.15, np.random.default_rng(seed))
        state, _, _ = fit_member(config, spots_train, val_mask=val, settings=settings, seed=seed, desc="spot_mlp")
        net = build_network(config)
        net.load_state_dict(state)
        net.eval()
        with torch.no_grad():
            out = net(torch.from_numpy(spots_test.x)).numpy()
        return (out * train_data.slide_scale.mean(axis=0)[None, :]).astype(np.float32)
    raise ValueError(f"Unknown baseline {name!r}; available: {BASELINES}.")


def spot_embeddings(
    sdata: SpatialData,
    shapes_key: str = Key.NUCLEI,
    *,
    table_key: str | None = None,
    spots_key: str = Key.SPOTS,
    embedding_scaling: Literal["quantile", "slide", "global"] = DEFAULT_SCALING,
) -> AnnData:
    """The mean cell embedding of each spot: the spot-level view of any cell embedding table.

    The cell features are first scaled within the slide as the learners see them (``"quantile"``: per-slide normal
    scores, the default of :func:`scellst.tl.train`; ``"slide"``: per-slide z-scores; ``"global"``: unscaled), then
    averaged over the cells of each spot (weighted by their overlap when the cells were assigned by overlap). Feeds
    spot-level classifiers or baselines, e.g. with the embedding of :func:`scellst.tl.train_contrastive`.

    Parameters
    ----------
    sdata
        A SpatialData object whose cells were assigned to spots (:func:`scellst.pp.assign_cells`) and embedded.
    shapes_key
        The nucleus shapes.
    table_key
        The cell embedding table (default ``f"{shapes_key}_embeddings"``).
    spots_key
        The spot shapes.
    embedding_scaling
        How the cell features are scaled before averaging.

    Returns
    -------
    An AnnData of the spots that hold at least one cell (in the order of the spot shapes) x the table's features,
    with ``obs['n_cells']``.
    """
    import anndata as ad

    from ..models._mil import EMBEDDING_SCALINGS
    from ._train import _spot_groups, embedding_table_key

    if embedding_scaling not in EMBEDDING_SCALINGS:
        raise ValueError(f"`embedding_scaling` must be one of {EMBEDDING_SCALINGS}, got {embedding_scaling!r}.")
    shapes_key = get_key(sdata, "shapes", shapes_key, what="nucleus shapes")
    spots_key = get_key(sdata, "shapes", spots_key, what="spot shapes")
    emb = sdata.tables[embedding_table_key(sdata, shapes_key, table_key)]
    if Col.SPOT_ID not in emb.obs:
        raise ValueError(
            f"The embedding table has no 'spot_id': run `scellst.pp.assign_cells(sdata, {shapes_key!r}, {spots_key!r})` "
            "and embed the cells again."
        )
    groups, weights = _spot_groups(sdata, emb, shapes_key, spots_key)
    raw = np.asarray(emb.X, dtype=np.float32)
    if embedding_scaling == "global":
        x = raw
    else:
        x = apply_scaling(raw, embedding_scaling, slide_stats(raw, embedding_scaling, None, None))
    spots = [s for s in sdata.shapes[spots_key].index.astype(str) if s in groups]
    out = np.zeros((len(spots), x.shape[1]), np.float32)
    for i, s in enumerate(spots):
        w = None if weights is None else weights[s]
        out[i] = np.average(x[groups[s]], axis=0, weights=w)
    obs = pd.DataFrame({"n_cells": [len(groups[s]) for s in spots]}, index=pd.Index(spots, name=None))
    return ad.AnnData(X=out, obs=obs, var=pd.DataFrame(index=list(emb.var_names)))
