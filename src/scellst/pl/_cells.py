"""Galleries of cell crops, per-gene correlation distributions and Xenium-vs-predicted maps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import Key
from .._utils import get_key, shapes_centroids

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from spatialdata import SpatialData


def _values(table, key: str) -> np.ndarray:
    import scipy.sparse as sp

    if key in table.obs:
        return pd.to_numeric(table.obs[key], errors="raise").to_numpy(dtype=float)
    if key in table.var_names:
        col = table[:, key].X
        return np.asarray(col.toarray() if sp.issparse(col) else col, dtype=float).ravel()
    raise KeyError(f"{key!r} is neither an obs column nor a gene of the table; obs columns: {list(table.obs.columns)}.")


def gallery(
    sdata: SpatialData,
    by: str | Sequence[str],
    *,
    table_key: str | None = None,
    shapes_key: str = Key.NUCLEI,
    image_key: str | None = None,
    n: int = 12,
    crop_um: float = 24.0,
    crop_px: int = 64,
    lowest: bool = False,
    panel_size: float = 1.0,
    save: str | Path | None = None,
) -> Figure:
    """The top-``n`` cells by a score, gene or column, as H&E crops: one row per key.

    Typical use after :func:`scellst.tl.score_cell_types`:
    ``scellst.pl.gallery(sdata, ["score_Malignant", "score_T", "score_Fibroblast"])``.

    Parameters
    ----------
    sdata
        The SpatialData (not modified).
    by
        One or several keys: numeric ``obs`` columns (scores) or genes of the table.
    table_key
        Table holding the keys (default ``f"{shapes_key}_expression"``).
    shapes_key
        Nucleus shapes (crop centres).
    image_key
        The H&E image; ``None``: the image the nuclei came from, or the only image.
    n
        Cells per row.
    crop_um, crop_px
        Physical size and pixel size of each crop (wider than the model's 12 um, to show the context).
    lowest
        Show the lowest values instead of the highest.
    panel_size
        Size of one crop in inches.
    save
        Path of an image file to write.

    Returns
    -------
    The matplotlib figure.
    """
    import matplotlib.pyplot as plt

    from ..im._crops import cell_crops

    keys = [by] if isinstance(by, str) else list(by)
    if not keys:
        raise ValueError("Pass at least one key in `by`.")
    table_key = get_key(sdata, "tables", table_key or f"{shapes_key}{Key.EXPRESSION_SUFFIX}", what="cell table")
    table = sdata.tables[table_key]
    instance = table.uns["spatialdata_attrs"]["instance_key"]
    crops = cell_crops(sdata, shapes_key, image_key=image_key, crop_um=crop_um, crop_px=crop_px)
    position = pd.Series(np.arange(len(crops.ids)), index=pd.Index(crops.ids).astype(str))
    fig, axes = plt.subplots(len(keys), n, figsize=(panel_size * n, panel_size * len(keys) + 0.3), squeeze=False)
    for r, key in enumerate(keys):
        v = _values(table, key)
        order = np.argsort(v if lowest else -v, kind="stable")
        order = order[np.isfinite(v[order])][:n]
        pos = position.reindex(table.obs[instance].astype(str).to_numpy()[order]).to_numpy()
        ok = ~np.isnan(pos)
        imgs = crops.get(pos[ok].astype(int))
        for c in range(n):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(imgs):
                ax.imshow(imgs[c].transpose(1, 2, 0))
                ax.set_title(f"{v[order][ok][c]:.2f}", fontsize=6, pad=1)
        axes[r, 0].set_ylabel(key, fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle(f"{'Lowest' if lowest else 'Top'} {n} cells ({crop_um:g} um crops)", fontsize=9)
    fig.tight_layout()
    if save is not None:
        fig.savefig(save, dpi=150)
    return fig


def correlations(
    results: pd.DataFrame | Mapping[str, pd.DataFrame | pd.Series],
    *,
    metric: str = "pearson",
    ax=None,
    save: str | Path | None = None,
) -> Figure:
    """Distributions of per-gene correlations, one box per result (e.g. per model or embedding).

    Parameters
    ----------
    results
        A per-gene DataFrame (e.g. from :func:`scellst.bench.evaluate` or :func:`scellst.bench.compare_xenium`), or a
        mapping name -> DataFrame (or Series of correlations).
    metric
        Column to plot.
    ax
        Matplotlib axes to draw into.
    save
        Path of an image file to write.

    Returns
    -------
    The matplotlib figure.
    """
    import matplotlib.pyplot as plt

    if isinstance(results, pd.DataFrame | pd.Series):
        results = {"": results}
    data, labels = [], []
    for name, res in results.items():
        s = res if isinstance(res, pd.Series) else res[metric]
        s = pd.to_numeric(s, errors="coerce").dropna()
        if s.empty:
            raise ValueError(f"No finite {metric!r} values for {name!r}.")
        data.append(s.to_numpy())
        labels.append(f"{name}\n(mean {s.mean():.2f}, n={len(s)})" if name else f"mean {s.mean():.2f}, n={len(s)}")
    if ax is None:
        fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(data), 3.2))
    else:
        fig = ax.figure
    ax.boxplot(data, showfliers=False)
    ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=8)
    rng = np.random.default_rng(0)
    for i, d in enumerate(data, start=1):
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(d)), d, s=6, alpha=0.5, color="C0")
    ax.axhline(0, color="grey", lw=0.8, ls="--")
    ax.set_ylabel(f"{metric} per gene")
    fig.tight_layout()
    if save is not None:
        fig.savefig(save, dpi=150)
    return fig


def xenium_comparison(
    sdata: SpatialData,
    genes: str | Sequence[str],
    *,
    key: str = "xenium_comparison",
    point_size: float = 4.0,
    cmap: str = "viridis",
    panel_size: float = 4.0,
    save: str | Path | None = None,
) -> Figure:
    """Measured (Xenium) beside predicted expression of the matched cells, one row per gene, in tissue space.

    Parameters
    ----------
    sdata
        The SpatialData after :func:`scellst.bench.compare_xenium` (not modified).
    genes
        Genes to show (shared by both sides).
    key
        The matched-cell table written by :func:`scellst.bench.compare_xenium`.
    point_size, cmap, panel_size
        Appearance.
    save
        Path of an image file to write.

    Returns
    -------
    The matplotlib figure.
    """
    import matplotlib.pyplot as plt

    genes = [genes] if isinstance(genes, str) else list(genes)
    key = get_key(sdata, "tables", key, what="comparison table (run `scellst.bench.compare_xenium` first)")
    table = sdata.tables[key]
    missing = [g for g in genes if g not in table.var_names]
    if missing:
        raise KeyError(f"Genes not compared: {missing}; compared genes: {list(table.var_names)[:20]}.")
    shapes_key = table.uns["spatialdata_attrs"]["region"]
    shapes = sdata.shapes[shapes_key]
    xy = pd.DataFrame(shapes_centroids(shapes), index=shapes.index.astype(str))
    xy = xy.reindex(table.obs[table.uns["spatialdata_attrs"]["instance_key"]].astype(str).to_numpy()).to_numpy()
    fig, axes = plt.subplots(len(genes), 2, figsize=(2 * panel_size, panel_size * len(genes)), squeeze=False)
    for r, g in enumerate(genes):
        k = table.var_names.get_loc(g)
        measured = np.asarray(table.X[:, k]).ravel()
        predicted = np.asarray(table.layers["predicted"][:, k]).ravel()
        for c, (vals, what) in enumerate(((measured, "Xenium measured"), (predicted, "predicted from H&E"))):
            ax = axes[r, c]
            sc = ax.scatter(xy[:, 0], xy[:, 1], c=vals, s=point_size, cmap=cmap, linewidths=0)
            ax.set_aspect("equal")
            ax.invert_yaxis()
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{g}: {what}", fontsize=9)
            fig.colorbar(sc, ax=ax, fraction=0.04)
        r_g = table.var.loc[g, "pearson"] if "pearson" in table.var else np.nan
        axes[r, 1].set_xlabel(f"Pearson r = {r_g:.2f} over {table.n_obs:,} matched cells", fontsize=8)
    fig.tight_layout()
    if save is not None:
        fig.savefig(save, dpi=130)
    return fig
