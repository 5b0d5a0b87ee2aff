"""Correlation metrics between predicted and measured expression."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def correlation_per_gene(pred: np.ndarray, true: np.ndarray, genes: Sequence[str]) -> pd.DataFrame:
    """Pearson and Spearman correlation per gene (columns of ``pred`` and ``true``, rows are observations).

    Genes that are constant in either input get NaN (a correlation is undefined there).
    """
    from scipy.stats import rankdata

    pred = np.asarray(pred, dtype=float)
    true = np.asarray(true, dtype=float)
    if pred.shape != true.shape:
        raise ValueError(f"Shapes differ: predictions {pred.shape} vs truth {true.shape}.")

    def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a = a - a.mean(axis=0)
        b = b - b.mean(axis=0)
        denom = np.sqrt((a**2).sum(axis=0) * (b**2).sum(axis=0))
        with np.errstate(invalid="ignore", divide="ignore"):
            r = (a * b).sum(axis=0) / denom
        r[denom < 1e-12] = np.nan
        return r

    return pd.DataFrame(
        {
            "pearson": _pearson(pred, true),
            "spearman": _pearson(rankdata(pred, axis=0), rankdata(true, axis=0)),
        },
        index=pd.Index(list(genes), name="gene"),
    )
