"""Marker genes from a single-cell reference, cell-type scores on predicted cells, comparison by cell type."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import TARGET_SUM, Col, Key
from .._logging import logger
from .._utils import get_key, write_element

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


def _dense(x) -> np.ndarray:
    import scipy.sparse as sp

    return (x.toarray() if sp.issparse(x) else np.asarray(x)).astype(np.float32)


def marker_genes(
    reference: AnnData, *, groupby: str, n_genes: int = 20, genes: Sequence[str] | None = None
) -> dict[str, list[str]]:
    """Top marker genes of each group of an annotated single-cell reference (raw counts in ``X``).

    Counts are normalised per cell and log-transformed; genes are ranked per group by scanpy's t-test with
    over-estimated variance (as in the sCellST paper), keeping only up-regulated genes.

    Parameters
    ----------
    reference
        Cells x genes AnnData with raw counts.
    groupby
        Cell-type column of ``reference.obs``.
    n_genes
        Markers per group.
    genes
        Restrict to these genes (e.g. the genes a model predicts).

    Returns
    -------
    Group -> list of marker genes, best first.
    """
    import anndata as ad
    import scanpy as sc

    if groupby not in reference.obs:
        raise KeyError(f"`reference.obs` has no column {groupby!r}; columns: {list(reference.obs.columns)}.")
    x = _dense(reference.X)
    if np.isnan(x).any() or (x < 0).any():
        raise ValueError("The reference must hold raw counts (no NaN, no negative values) in `X`.")
    var = reference.var_names.astype(str)
    if genes is not None:
        keep = var.isin(list(genes))
        if not keep.any():
            raise ValueError("None of `genes` is in the reference.")
        x, var = x[:, keep], var[keep]
    a = ad.AnnData(
        X=x, obs=pd.DataFrame({"g": reference.obs[groupby].astype(str).to_numpy()}), var=pd.DataFrame(index=var)
    )
    a.obs["g"] = a.obs["g"].astype("category")
    if a.obs["g"].cat.categories.size < 2:
        raise ValueError(f"`{groupby}` has fewer than two groups; markers need a comparison.")
    sc.pp.normalize_total(a, target_sum=TARGET_SUM)
    sc.pp.log1p(a)
    sc.tl.rank_genes_groups(a, "g", method="t-test_overestim_var", n_genes=min(n_genes, a.n_vars))
    res = a.uns["rank_genes_groups"]
    out = {}
    for grp in res["names"].dtype.names:
        names = [str(g) for g in res["names"][grp]]
        scores = np.asarray(res["scores"][grp], dtype=float)
        out[grp] = [g for g, s in zip(names, scores, strict=True) if s > 0][:n_genes]
    return out


def score_cell_types(
    sdata: SpatialData,
    markers: Mapping[str, Sequence[str]],
    *,
    table_key: str | None = None,
    shapes_key: str = Key.NUCLEI,
    key_prefix: str = "score_",
    key_added: str = Col.PREDICTED_TYPE,
    min_markers: int = 3,
    seed: int = 0,
    overwrite: bool = False,
) -> None:
    """Score every predicted cell for each cell type from its marker genes, and call the best-scoring type.

    The predicted expression is normalised per cell, log-transformed, scaled per gene (zero mean, unit variance,
    clipped at 10), then scored with :func:`scanpy.tl.score_genes` for each type (markers that were not predicted
    are skipped; types with fewer than ``min_markers`` predicted markers are left out, with a warning).

    Parameters
    ----------
    sdata
        The SpatialData with a predicted cell table (from :func:`scellst.tl.predict`).
    markers
        Type -> marker genes, e.g. from :func:`marker_genes`.
    table_key
        The predicted table (default ``f"{shapes_key}_expression"``).
    shapes_key
        The nucleus shapes the table annotates.
    key_prefix
        Prefix of the score columns.
    key_added
        Column of the predicted type (argmax of the scores), categorical, usable by ``squidpy.gr.nhood_enrichment``.
    min_markers
        Minimum predicted markers for a type to be scored.
    seed
        Random seed of scanpy's control-gene sampling.
    overwrite
        Replace the columns of an earlier scoring (refused otherwise).

    Returns
    -------
    Nothing; adds ``obs[f"{key_prefix}{type}"]`` and ``obs[key_added]`` to the predicted table (rewritten on disk for a
    backed object) and records the markers used in ``uns['scellst']['cell_type_markers']``.
    """
    import anndata as ad

    table_key = get_key(sdata, "tables", table_key or f"{shapes_key}{Key.EXPRESSION_SUFFIX}", what="predicted table")
    table = sdata.tables[table_key]
    earlier = [c for c in table.obs.columns if c == key_added or c in {f"{key_prefix}{t}" for t in markers}]
    if earlier and not overwrite:
        raise ValueError(
            f"The table {table_key!r} already holds cell-type columns {earlier[:5]}; pass `overwrite=True` to replace "
            "them, or another `key_prefix` / `key_added`."
        )
    pred = np.clip(_dense(table.X), 0, None)
    counts = np.expm1(pred)  # predictions are log1p of counts per 10,000
    norm = np.log1p(counts / np.maximum(counts.sum(axis=1, keepdims=True), 1e-8) * TARGET_SUM)
    mean, std = norm.mean(axis=0), norm.std(axis=0)
    scaled = np.clip((norm - mean) / np.where(std > 1e-8, std, 1.0), -10, 10)
    work = ad.AnnData(X=scaled, obs=pd.DataFrame(index=table.obs_names), var=pd.DataFrame(index=table.var_names))
    used: dict[str, list[str]] = {}
    for cell_type, genes in markers.items():
        present = [g for g in genes if g in table.var_names]
        if len(present) < min_markers:
            logger.warning(
                f"{cell_type}: only {len(present)} of its {len(genes)} markers were predicted; not scored "
                f"(need {min_markers})."
            )
            continue
        name = f"{key_prefix}{cell_type}"
        _score(work, present, name, seed)
        table.obs[name] = work.obs[name].to_numpy()
        used[str(cell_type)] = present
    if not used:
        raise ValueError(
            "No cell type has enough predicted marker genes. Train on genes that include the markers "
            "(`scellst.tl.train(genes=...)`) or lower `min_markers`."
        )
    cols = [f"{key_prefix}{t}" for t in used]
    best = np.asarray(cols)[np.argmax(table.obs[cols].to_numpy(), axis=1)]
    table.obs[key_added] = pd.Categorical([c[len(key_prefix) :] for c in best], categories=list(used))
    table.uns.setdefault("scellst", {})["cell_type_markers"] = used
    if sdata.is_backed():
        write_element(sdata, table_key, table, overwrite=True, what=f"cell-type scores of {len(used)} types")
    counts_per_type = table.obs[key_added].value_counts()
    logger.info(
        f"Scored {table.n_obs:,} cells for {len(used)} types in sdata[{table_key!r}]; predicted types: "
        + ", ".join(f"{k} {v:,}" for k, v in counts_per_type.items())
    )


def _score(work, genes: list[str], name: str, seed: int) -> None:
    """Scanpy's score_genes, with control genes from all other genes when the panel is too small to bin."""
    import scanpy as sc

    ctrl = min(50, max(work.n_vars - len(genes), 1))
    try:
        sc.tl.score_genes(work, genes, score_name=name, ctrl_size=ctrl, n_bins=25, random_state=seed)
    except RuntimeError:  # small panels: no control gene in the expression bins of the markers
        # the same score without binning: mean of the markers minus mean of random other genes
        rng = np.random.default_rng(seed)
        others = np.flatnonzero(~work.var_names.isin(genes))
        control = rng.choice(others, size=min(ctrl, len(others)), replace=False) if len(others) else []
        x = np.asarray(work.X)
        score = x[:, work.var_names.get_indexer(genes)].mean(axis=1)
        if len(control):
            score = score - x[:, control].mean(axis=1)
        work.obs[name] = score


def compare_cell_types(
    predicted: AnnData,
    reference: AnnData,
    *,
    predicted_groupby: str = Col.PREDICTED_TYPE,
    reference_groupby: str = "cell_type",
    mapping: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Compare predicted and measured cells by cell type when cells cannot be matched one to one.

    For each type, the mean predicted profile is correlated with the mean measured profile (log-normalised) over the
    shared genes: ``pearson`` on the profiles as they are, and ``pearson_centred`` after removing each gene's mean
    across types (does the model get what is *specific* to the type?).

    Parameters
    ----------
    predicted
        Predicted cells (log-normalised values, e.g. ``sdata.tables['nuclei_expression']``) with a type column.
    reference
        Measured cells (raw counts; e.g. Xenium) with a type column.
    predicted_groupby, reference_groupby
        The type columns.
    mapping
        Predicted type -> reference type, when the names differ.

    Returns
    -------
    One row per type present on both sides: ``n_predicted``, ``n_reference``, ``pearson``, ``pearson_centred``,
    ``n_genes``.
    """
    for name, a, col in (("predicted", predicted, predicted_groupby), ("reference", reference, reference_groupby)):
        if col not in a.obs:
            raise KeyError(f"`{name}.obs` has no column {col!r}; columns: {list(a.obs.columns)}.")
    genes = [g for g in predicted.var_names if g in set(reference.var_names)]
    if len(genes) < 3:
        raise ValueError(f"Only {len(genes)} genes are shared by the predicted and reference cells.")
    p = pd.DataFrame(_dense(predicted[:, genes].X), columns=genes)
    p_type = predicted.obs[predicted_groupby].astype(str).to_numpy()
    if mapping is not None:
        p_type = np.array([mapping.get(t, t) for t in p_type])
    r = _dense(reference.X)
    r = np.log1p(r / np.maximum(r.sum(axis=1, keepdims=True), 1e-8) * TARGET_SUM)
    r = pd.DataFrame(r[:, reference.var_names.get_indexer(genes)], columns=genes)
    r_type = reference.obs[reference_groupby].astype(str).to_numpy()
    types = sorted(set(p_type) & set(r_type))
    if not types:
        raise ValueError(
            f"No type is shared: predicted {sorted(set(p_type))[:10]}, reference {sorted(set(r_type))[:10]}; pass "
            "`mapping=`."
        )
    mp = p.groupby(p_type).mean().loc[types]
    mr = r.groupby(r_type).mean().loc[types]
    cp, cr = mp - mp.mean(), mr - mr.mean()
    rows = []
    for t in types:
        rows.append(
            {
                "cell_type": t,
                "n_predicted": int((p_type == t).sum()),
                "n_reference": int((r_type == t).sum()),
                "pearson": float(np.corrcoef(mp.loc[t], mr.loc[t])[0, 1]),
                "pearson_centred": float(np.corrcoef(cp.loc[t], cr.loc[t])[0, 1]) if len(types) > 1 else np.nan,
                "n_genes": len(genes),
            }
        )
    return pd.DataFrame(rows).set_index("cell_type")
