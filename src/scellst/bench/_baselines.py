"""Spot-level baselines that run through the same evaluation harness as the MIL model.

Both see only the mean scaled cell embedding of each spot (no multiple-instance learning), so they show how
much the per-cell model gains or loses at spot level.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from ..tl._train import (
    DEFAULT_SCALING,
    FitSettings,
    Slide,
    TrainingData,
    build_training_data,
    fit_member,
    validation_mask,
)

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
