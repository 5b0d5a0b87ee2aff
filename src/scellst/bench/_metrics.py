"""Per-gene metrics between predicted and measured expression."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def _pearson_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    denom = np.sqrt((a**2).sum(axis=0) * (b**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=0) / denom
    r[denom < 1e-12] = np.nan
    return r


def metrics_per_gene(pred: np.ndarray, true: np.ndarray, genes: Sequence[str]) -> pd.DataFrame:
    """Pearson, Spearman, RMSE and MAE per gene (columns of ``pred`` and ``true``; rows are observations).

    Correlations of a gene that is constant in either input are NaN (undefined), and are skipped by ``mean()``.
    """
    from scipy.stats import rankdata

    pred = np.asarray(pred, dtype=float)
    true = np.asarray(true, dtype=float)
    if pred.shape != true.shape:
        raise ValueError(f"Shapes differ: predictions {pred.shape} vs truth {true.shape}.")
    if pred.shape[1] != len(genes):
        raise ValueError(f"{len(genes)} gene names for {pred.shape[1]} columns.")
    err = pred - true
    return pd.DataFrame(
        {
            "pearson": _pearson_columns(pred, true),
            "spearman": _pearson_columns(rankdata(pred, axis=0), rankdata(true, axis=0)),
            "rmse": np.sqrt((err**2).mean(axis=0)),
            "mae": np.abs(err).mean(axis=0),
        },
        index=pd.Index(list(genes), name="gene"),
    )
