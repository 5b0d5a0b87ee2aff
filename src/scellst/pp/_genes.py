"""Spot and gene filters, and gene selection (HVG, SVG, Rmax) across one or several slides."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from .._constants import TARGET_SUM, Key
from .._logging import logger
from .._utils import as_list, get_key, instance_ids, shapes_centroids

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


def _dense(x) -> np.ndarray:
    import scipy.sparse as sp

    return x.toarray() if sp.issparse(x) else np.asarray(x)


def library_size(table: AnnData) -> np.ndarray:
    """Total counts of each spot over all genes."""
    return np.asarray(table.X.sum(axis=1)).ravel().astype(float)


def lognorm(table: AnnData, genes: Sequence[str]) -> np.ndarray:
    """``log1p`` of counts normalised to 10,000 per spot (library size over all genes), for ``genes``.

    The targets of the ``"mse"`` loss and the scale of every evaluation.

    Parameters
    ----------
    table
        A count table (spots x genes, raw counts in ``X``).
    genes
        The genes to return, in this order.

    Returns
    -------
    A dense ``float32`` array, spots x ``genes``.
    """
    lib = library_size(table)
    sub = _dense(table[:, list(genes)].X).astype(float)
    return np.log1p(sub / np.maximum(lib, 1e-12)[:, None] * TARGET_SUM).astype(np.float32)


def gene_filter(
    tables: Sequence[AnnData],
    *,
    min_counts: int = 200,
    min_spot_fraction: float = 0.1,
    exclude_mt: bool = False,
) -> list[str]:
    """Genes shared by all tables that pass the paper's filters on the pooled spots.

    A gene is kept when it has at least ``min_counts`` counts in total and is detected in at least
    ``min_spot_fraction`` of the spots; mitochondrial genes (``MT-``/``mt-``) are removed when ``exclude_mt``.
    """
    shared = list(tables[0].var_names)
    for t in tables[1:]:
        keep = set(t.var_names)
        shared = [g for g in shared if g in keep]
    if not shared:
        raise ValueError("The spot tables share no gene; check that they use the same gene identifiers.")
    total = np.zeros(len(shared))
    detected = np.zeros(len(shared))
    n_spots = 0
    for t in tables:
        x = t[:, shared].X
        total += np.asarray(x.sum(axis=0)).ravel()
        detected += np.asarray((x > 0).sum(axis=0)).ravel()
        n_spots += t.n_obs
    ok = (total >= min_counts) & (detected >= min_spot_fraction * n_spots)
    if exclude_mt:
        ok &= ~pd.Index(shared).str.upper().str.startswith("MT-")
    genes = [g for g, k in zip(shared, ok, strict=True) if k]
    logger.info(
        f"Gene filter: {len(genes):,} of {len(shared):,} shared genes kept (>= {min_counts} counts, detected in "
        f">= {min_spot_fraction:.0%} of {n_spots:,} spots{', no MT- genes' if exclude_mt else ''})"
    )
    if not genes:
        raise ValueError("No gene passes the filters; lower `min_counts` or `min_spot_fraction`.")
    return genes


MIN_HVG_SPOTS = 20  # per slide, for scanpy's seurat_v3 (a loess fit of variance on mean)
MIN_HVG_GENES = 20


def _hvg(tables: list[AnnData], genes: list[str], n_genes: int) -> pd.Series:
    import anndata as ad
    import scanpy as sc

    if min(t.n_obs for t in tables) < MIN_HVG_SPOTS or len(genes) < MIN_HVG_GENES:
        # scanpy's seurat_v3 loess can crash the interpreter (not raise) on a handful of spots or genes
        logger.warning(
            f"Too few spots ({min(t.n_obs for t in tables)}) or genes ({len(genes)}) for seurat_v3; ranking genes by "
            "the variance of log-normalised counts instead"
        )
        return pd.Series(np.concatenate([lognorm(t, genes) for t in tables]).var(axis=0), index=genes)
    merged = ad.concat([t[:, genes] for t in tables], label="_slide", index_unique="-")
    merged.X = merged.X.astype(np.float32)
    batch = "_slide" if len(tables) > 1 else None
    try:
        hvg = sc.pp.highly_variable_genes(
            merged, flavor="seurat_v3", n_top_genes=min(n_genes, len(genes)), batch_key=batch, inplace=False
        )
        hvg.index = genes
        score = -hvg["highly_variable_rank"].fillna(np.inf) if "highly_variable_rank" in hvg else hvg["variances_norm"]
    except (ValueError, ImportError) as err:  # scikit-misc missing, or a degenerate loess fit on few genes
        logger.warning(f"seurat_v3 failed ({err}); ranking genes by the variance of log-normalised counts instead")
        score = pd.Series(np.concatenate([lognorm(t, genes) for t in tables]).var(axis=0), index=genes)
    return score


def _spot_xy(sdata: SpatialData, spot_table_key: str, spots_key: str) -> np.ndarray:
    table = sdata.tables[spot_table_key]
    spots = sdata.shapes[spots_key]
    xy = pd.DataFrame(shapes_centroids(spots), index=spots.index.astype(str))
    return xy.reindex(instance_ids(table)).to_numpy()


def _svg(tables: list[AnnData], xys: list[np.ndarray], genes: list[str]) -> pd.Series:
    import anndata as ad
    import squidpy as sq

    scores = []
    for table, xy in zip(tables, xys, strict=True):
        adata = ad.AnnData(X=lognorm(table, genes), var=pd.DataFrame(index=genes))
        adata.obsm["spatial"] = np.asarray(xy, dtype=float)
        sq.gr.spatial_neighbors(adata, coord_type="generic", n_neighs=6)
        moran = sq.gr.spatial_autocorr(
            adata, mode="moran", genes=genes, n_perms=None, copy=True, show_progress_bar=False
        )
        scores.append(moran["I"].reindex(genes).fillna(0.0).clip(lower=1e-3).to_numpy())
    # geometric mean across slides: a gene must be spatially structured on every slide
    return pd.Series(np.exp(np.mean(np.log(np.stack(scores)), axis=0)), index=genes)


def rmax(tables: Sequence[AnnData], genes: Sequence[str]) -> pd.Series:
    """MISO's noise ceiling per gene: ``sqrt(max(0, 1 - mean/var))`` of raw counts, averaged over slides."""
    values = []
    for t in tables:
        x = _dense(t[:, list(genes)].X).astype(float)
        mean, var = x.mean(axis=0), x.var(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.sqrt(np.clip(1 - mean / var, 0, None))
        values.append(np.nan_to_num(r))
    return pd.Series(np.mean(values, axis=0), index=list(genes))


def select_genes(
    sdata: SpatialData | Sequence[SpatialData],
    *,
    flavor: Literal["hvg", "svg", "rmax"] | Sequence[str] = "hvg",
    n_genes: int = 50,
    spot_table_key: str = Key.SPOTS_COUNTS,
    spots_key: str = Key.SPOTS,
    min_counts: int = 200,
    min_spot_fraction: float = 0.1,
    exclude_mt: bool = False,
) -> list[str]:
    """Select the genes to learn, on the spots of one or several slides.

    Genes are first filtered as in the paper (``min_counts`` total counts, detected in ``min_spot_fraction`` of the
    spots, optionally no mitochondrial genes); then ranked by the chosen flavor.

    Parameters
    ----------
    sdata
        One SpatialData or a list (the training slides only, to avoid leaking the test slide).
    flavor
        ``"hvg"``: highly variable genes, scanpy ``seurat_v3`` on raw counts, batch-aware across slides.
        ``"svg"``: spatially variable genes, Moran's I per slide (squidpy) ranked by the geometric mean across slides.
        ``"rmax"``: MISO's noise ceiling ``sqrt(max(0, 1 - mean/var))`` on raw counts (genes whose spot-to-spot
        variance is mostly beyond Poisson noise). A list of gene names (e.g. marker genes) is validated and returned.
    n_genes
        Number of genes to return.
    spot_table_key, spots_key
        Spot count table and spot shapes (the latter for ``"svg"``).
    min_counts, min_spot_fraction, exclude_mt
        Gene filters (see :func:`gene_filter`).

    Returns
    -------
    The selected gene names, best first.
    """
    sdatas = as_list(sdata)
    if not sdatas:
        raise ValueError("No SpatialData given.")
    keys = [get_key(s, "tables", spot_table_key, what="spot count table") for s in sdatas]
    tables = [s.tables[k] for s, k in zip(sdatas, keys, strict=True)]
    xys = None
    if isinstance(flavor, str) and flavor == "svg":
        xys = [
            _spot_xy(s, k, get_key(s, "shapes", spots_key, what="spot shapes"))
            for s, k in zip(sdatas, keys, strict=True)
        ]
    return rank_genes(
        tables,
        xys,
        flavor=flavor,
        n_genes=n_genes,
        min_counts=min_counts,
        min_spot_fraction=min_spot_fraction,
        exclude_mt=exclude_mt,
    )


def rank_genes(
    tables: Sequence[AnnData],
    xys: Sequence[np.ndarray] | None,
    *,
    flavor: str | Sequence[str],
    n_genes: int,
    min_counts: int = 200,
    min_spot_fraction: float = 0.1,
    exclude_mt: bool = False,
) -> list[str]:
    """:func:`select_genes` on spot count tables (and spot positions for ``"svg"``) instead of SpatialData objects."""
    tables = list(tables)
    if not isinstance(flavor, str):
        wanted = list(dict.fromkeys(flavor))
        shared = set(tables[0].var_names).intersection(*[set(t.var_names) for t in tables[1:]])
        missing = [g for g in wanted if g not in shared]
        if missing:
            raise KeyError(
                f"{len(missing)} requested genes are missing from the spot table(s): {missing[:10]}"
                f"{' ...' if len(missing) > 10 else ''}. Check the gene names (symbols vs Ensembl ids)."
            )
        return wanted
    if n_genes < 1:
        raise ValueError("`n_genes` must be at least 1.")
    empty = [i for i, t in enumerate(tables) if t.n_obs == 0]
    if empty:
        raise ValueError(f"Spot table(s) {empty} hold no spot: check the spot table and the spots kept for training.")
    genes = gene_filter(tables, min_counts=min_counts, min_spot_fraction=min_spot_fraction, exclude_mt=exclude_mt)
    if flavor == "hvg":
        score = _hvg(tables, genes, n_genes)
    elif flavor == "svg":
        if xys is None:
            raise ValueError("Spot positions are needed for flavor='svg'.")
        score = _svg(tables, list(xys), genes)
    elif flavor == "rmax":
        score = rmax(tables, genes)
    else:
        raise ValueError(f"Unknown gene selection flavor {flavor!r}; use 'hvg', 'svg', 'rmax' or a list of genes.")
    selected = list(score.sort_values(ascending=False, kind="stable").index[:n_genes])
    if len(selected) < n_genes:
        logger.warning(
            f"Only {len(selected)} genes pass the filters, fewer than the {n_genes} asked for; lower `min_counts` / "
            "`min_spot_fraction` for more (genes with few counts are mostly noise)."
        )
    logger.info(
        f"Selected {len(selected)} genes ({flavor}): {', '.join(selected[:8])}{' ...' if len(selected) > 8 else ''}"
    )
    return selected
