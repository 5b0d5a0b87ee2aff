"""Training the sCellST multiple-instance model on spots, and predicting single-cell expression."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from .._constants import TARGET_SUM, Col, Key
from .._logging import logger
from .._utils import (
    as_list,
    check_writable,
    get_key,
    instance_ids,
    provenance,
    shapes_centroids,
    write_element,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from ..models import ScellstModel


@dataclass
class _Slide:
    features: np.ndarray  # raw features of every cell of the slide
    bags: list[np.ndarray]  # per kept spot, indices of its cells
    counts: AnnData  # kept spots x all genes (raw counts)
    spot_xy: np.ndarray  # kept spot centres (spots' intrinsic frame)
    spot_ids: np.ndarray


def _embedding_table(sdata: SpatialData, shapes_key: str, table_key: str | None) -> str:
    key = table_key or f"{shapes_key}{Key.EMBEDDINGS_SUFFIX}"
    if key not in sdata.tables:
        raise KeyError(
            f"No embedding table {key!r}; run `scellst.tl.embed_cells(sdata, {shapes_key!r})` first "
            f"(available tables: {list(sdata.tables)})."
        )
    return key


def _check_counts(table: AnnData, name: str) -> None:
    import scipy.sparse as sp

    values = table.X.data if sp.issparse(table.X) else np.asarray(table.X)
    if np.isnan(values).any():
        raise ValueError(
            f"The spot table {name!r} contains NaN counts. Remove or fill the affected spots or genes first "
            "(e.g. `table = table[~np.isnan(table.X.toarray()).any(axis=1)]`)."
        )
    if (values < 0).any():
        raise ValueError(f"The spot table {name!r} has negative values; scellst needs raw counts.")


def _prepare_slide(
    sdata: SpatialData, *, shapes_key: str, table_key: str | None, spots_key: str, spot_table_key: str
) -> _Slide:
    emb_key = _embedding_table(sdata, shapes_key, table_key)
    spot_table_key = get_key(sdata, "tables", spot_table_key, what="spot count table")
    spots_key = get_key(sdata, "shapes", spots_key, what="spot shapes")
    emb = sdata.tables[emb_key]
    if Col.SPOT_ID not in emb.obs:
        raise ValueError(
            f"The embedding table {emb_key!r} has no 'spot_id': run `scellst.pp.assign_cells(sdata, {shapes_key!r}, "
            f"{spots_key!r})` before training."
        )
    counts = sdata.tables[spot_table_key]
    _check_counts(counts, spot_table_key)
    spot_of = emb.obs[Col.SPOT_ID].astype(object).to_numpy()
    cells_by_spot = pd.Series(np.arange(emb.n_obs)).groupby(pd.Series(spot_of).astype(str).where(pd.notna(spot_of)))
    groups = {k: v.to_numpy() for k, v in cells_by_spot}
    ids = instance_ids(counts)
    import scipy.sparse as sp

    lib = np.asarray(counts.X.sum(axis=1)).ravel() if sp.issparse(counts.X) else counts.X.sum(axis=1)
    has_cells = np.array([i in groups for i in ids])
    has_counts = lib > 0
    keep = has_cells & has_counts
    n_drop_cells, n_drop_counts = int((~has_cells).sum()), int((has_cells & ~has_counts).sum())
    if n_drop_cells or n_drop_counts:
        logger.info(
            f"{spot_table_key!r}: dropped {n_drop_cells} spots without nuclei and {n_drop_counts} spots without counts"
        )
    if not keep.any():
        raise ValueError(
            f"No spot of {spot_table_key!r} contains a nucleus of {shapes_key!r}; check the segmentation and "
            "`scellst.pp.assign_cells`."
        )
    spots = sdata.shapes[spots_key]
    centres = pd.DataFrame(shapes_centroids(spots), index=spots.index.astype(str))
    kept_ids = ids[keep]
    return _Slide(
        features=np.asarray(emb.X, dtype=np.float32),
        bags=[groups[i] for i in kept_ids],
        counts=counts[keep].copy(),
        spot_xy=centres.reindex(kept_ids).to_numpy(),
        spot_ids=kept_ids,
    )


def _lognorm(counts: AnnData, genes: Sequence[str]) -> np.ndarray:
    import scipy.sparse as sp

    x = counts.X
    lib = np.asarray(x.sum(axis=1)).ravel()
    sub = counts[:, list(genes)].X
    sub = sub.toarray() if sp.issparse(sub) else np.asarray(sub)
    return np.log1p(sub / lib[:, None] * TARGET_SUM).astype(np.float32)


def _select_genes(slides: list[_Slide], genes: Sequence[str] | None, n_top_genes: int) -> list[str]:
    import anndata as ad

    shared = set(slides[0].counts.var_names)
    for s in slides[1:]:
        shared &= set(s.counts.var_names)
    if genes is not None:
        genes = list(dict.fromkeys(genes))
        missing = [g for g in genes if g not in shared]
        if missing:
            raise KeyError(
                f"{len(missing)} requested genes are missing from the spot table(s): {missing[:10]}"
                f"{' ...' if len(missing) > 10 else ''}. Check the gene names (symbols vs Ensembl ids)."
            )
        return genes
    import scanpy as sc

    order = [g for g in slides[0].counts.var_names if g in shared]
    merged = ad.concat([s.counts[:, order] for s in slides], label="_slide", index_unique="-")
    sums = np.asarray(merged.X.sum(axis=0)).ravel()
    merged = merged[:, sums > 0].copy()
    if merged.n_vars <= n_top_genes:
        return list(merged.var_names)
    batch = "_slide" if len(slides) > 1 else None
    try:
        hvg = sc.pp.highly_variable_genes(
            merged, flavor="seurat_v3", n_top_genes=n_top_genes, batch_key=batch, inplace=False
        )
    except (ValueError, ImportError) as err:  # e.g. scikit-misc missing or degenerate loess fit
        logger.warning(
            f"seurat_v3 gene selection failed ({err}); falling back to the most variable log-normalised genes"
        )
        ln = np.log1p(merged.X.toarray() / np.asarray(merged.X.sum(axis=1)) * TARGET_SUM)
        return list(merged.var_names[np.argsort(-ln.var(axis=0))[:n_top_genes]])
    rank_col = "highly_variable_rank"
    ranked = hvg.sort_values(rank_col) if rank_col in hvg else hvg[hvg["highly_variable"]]
    return list(ranked.index[:n_top_genes])


def _spatial_blocks(xy: np.ndarray, fraction: float, rng: np.random.Generator, block_size: int = 12) -> np.ndarray:
    """Boolean validation mask made of whole spatial blocks (k-means regions of ~``block_size`` spots)."""
    from sklearn.cluster import KMeans

    n = len(xy)
    if n < 10 or fraction <= 0:
        return np.zeros(n, dtype=bool)
    k = int(np.clip(round(n / block_size), 2, n))
    blocks = KMeans(n_clusters=k, n_init=3, random_state=int(rng.integers(1 << 31))).fit_predict(xy)
    val = np.zeros(n, dtype=bool)
    for b in rng.permutation(k):
        if val.mean() >= fraction:
            break
        val[blocks == b] = True
    if val.all():
        val[blocks == blocks[0]] = False
    return val


def train(
    sdata: SpatialData | Sequence[SpatialData],
    *,
    genes: Sequence[str] | None = None,
    n_top_genes: int = 50,
    shapes_key: str = Key.NUCLEI,
    table_key: str | None = None,
    spots_key: str = Key.SPOTS,
    spot_table_key: str = Key.SPOTS_COUNTS,
    hidden: Sequence[int] = (256, 256, 256),
    dropout: float = 0.0,
    lr: float = 1e-4,
    weight_decay: float = 1e-4,
    batch_size: int = 8,
    max_epochs: int = 300,
    patience: int = 25,
    val_fraction: float = 0.15,
    embedding_scaling: Literal["slide", "global"] = "slide",
    seed: int = 0,
    device: str = "cpu",
    show_progress_bar: bool = True,
) -> ScellstModel:
    """Train the sCellST multiple-instance model: each spot is a bag of cells, a per-cell MLP predicts expression.

    The cell predictions of a spot are averaged and fitted (MSE) to the spot's ``log1p`` expression normalised to
    10,000 counts, each gene divided by its standard deviation over the training spots (no centring, so targets stay
    non-negative like the softplus output). Validation spots are whole spatial blocks, so early stopping is not
    fooled by neighbouring spots; the best epoch's weights are kept.

    Parameters
    ----------
    sdata
        One SpatialData, or a list for multi-slide training. Each needs nucleus shapes assigned to spots
        (:func:`scellst.pp.assign_cells`), an embedding table (:func:`scellst.tl.embed_cells`) and a spot count table.
    genes
        Genes to learn. ``None`` selects the ``n_top_genes`` highly variable genes (scanpy ``seurat_v3`` on the
        spot counts, batch-aware across slides).
    n_top_genes
        Number of genes selected when ``genes`` is ``None``.
    shapes_key, table_key, spots_key, spot_table_key
        Element names: nucleus shapes, embedding table (default ``f"{shapes_key}_embeddings"``), spot shapes and
        spot count table.
    hidden
        Widths of the hidden layers (the paper: three layers of 256).
    dropout
        Dropout after each hidden layer.
    lr, weight_decay
        AdamW learning rate and weight decay.
    batch_size
        Number of spots (bags) per optimisation step.
    max_epochs, patience
        Maximum epochs, and epochs without validation improvement before stopping.
    val_fraction
        Fraction of spots held out for validation, drawn as spatial blocks (``0`` disables early stopping).
    embedding_scaling
        ``"slide"`` standardises features per slide (removes slide-level stain differences; the same is done on
        new slides at prediction), ``"global"`` uses the statistics of the training cells.
    seed
        Random seed (weights, batches, validation blocks).
    device
        Torch device, e.g. ``"cpu"`` or ``"cuda"``.
    show_progress_bar
        Show a progress bar over epochs.

    Returns
    -------
    The fitted :class:`scellst.models.ScellstModel` (``model.history`` holds the loss curves).
    """
    import torch
    from tqdm.auto import tqdm

    from .. import __version__
    from ..models import MILConfig, ScellstModel, bag_mean, build_network

    if embedding_scaling not in ("slide", "global"):
        raise ValueError(f"`embedding_scaling` must be 'slide' or 'global', got {embedding_scaling!r}.")
    if not 0 <= val_fraction < 0.9:
        raise ValueError("`val_fraction` must be in [0, 0.9).")
    sdatas = as_list(sdata)
    if not sdatas:
        raise ValueError("No SpatialData given.")
    slides = [
        _prepare_slide(
            s, shapes_key=shapes_key, table_key=table_key, spots_key=spots_key, spot_table_key=spot_table_key
        )
        for s in sdatas
    ]
    feature_names = list(sdatas[0].tables[_embedding_table(sdatas[0], shapes_key, table_key)].var_names)
    methods = set()
    for s in sdatas:
        emb = s.tables[_embedding_table(s, shapes_key, table_key)]
        if list(emb.var_names) != feature_names:
            raise ValueError("The slides' embedding tables have different features; embed them the same way.")
        methods.add(emb.uns.get("scellst", {}).get("method", "unknown"))
    if len(methods) > 1:
        raise ValueError(f"The slides were embedded with different methods: {sorted(methods)}.")
    genes = _select_genes(slides, genes, n_top_genes)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)

    # features: per-slide or global standardisation
    all_feats = np.concatenate([s.features for s in slides])
    g_mean, g_std = all_feats.mean(axis=0), all_feats.std(axis=0)
    xs, ys, bags, val_mask, offset = [], [], [], [], 0
    for s in slides:
        if embedding_scaling == "slide":
            mean, std = s.features.mean(axis=0), s.features.std(axis=0)
        else:
            mean, std = g_mean, g_std
        xs.append((s.features - mean) / np.where(std > 1e-8, std, 1.0))
        ys.append(_lognorm(s.counts, genes))
        bags.extend(b + offset for b in s.bags)
        offset += s.features.shape[0]
        val_mask.append(_spatial_blocks(s.spot_xy, val_fraction, rng))
    x_all = torch.from_numpy(np.concatenate(xs).astype(np.float32)).to(device)
    y_all = np.concatenate(ys)
    val_mask = np.concatenate(val_mask)
    train_idx, val_idx = np.flatnonzero(~val_mask), np.flatnonzero(val_mask)
    scale = y_all[train_idx].std(axis=0)
    scale = np.where(scale > 1e-6, scale, 1.0).astype(np.float32)
    y_scaled = torch.from_numpy(y_all / scale).to(device)
    logger.info(
        f"Training sCellST on {len(slides)} slide(s): {len(train_idx):,} training and {len(val_idx):,} validation "
        f"spots, {sum(len(b) for b in bags):,} cells in spots, {len(genes)} genes, {len(feature_names)} features"
    )

    config = MILConfig(n_features=len(feature_names), n_genes=len(genes), hidden=tuple(hidden), dropout=dropout)
    net = build_network(config).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)

    def _batch(spot_idx: np.ndarray):
        cells = [bags[i] for i in spot_idx]
        cell_index = torch.from_numpy(np.concatenate(cells)).to(device)
        bag_index = torch.from_numpy(np.repeat(np.arange(len(cells)), [len(c) for c in cells])).to(device)
        return cell_index, bag_index

    def _loss(spot_idx: np.ndarray):
        cell_index, bag_index = _batch(spot_idx)
        pred = bag_mean(net(x_all[cell_index]), bag_index, len(spot_idx))
        return torch.mean((pred - y_scaled[torch.from_numpy(spot_idx).to(device)]) ** 2)

    history: dict[str, list[float]] = {"train_loss": [], "val_loss": []}
    best, best_state, best_epoch, wait = np.inf, None, 0, 0
    bar = tqdm(range(max_epochs), desc="train", disable=not show_progress_bar)
    for epoch in bar:
        net.train()
        perm = rng.permutation(train_idx)
        losses = []
        for start in range(0, len(perm), batch_size):
            batch = perm[start : start + batch_size]
            opt.zero_grad()
            loss = _loss(batch)
            loss.backward()
            opt.step()
            losses.append(loss.item() * len(batch))
        history["train_loss"].append(float(np.sum(losses) / len(perm)))
        if len(val_idx):
            net.eval()
            with torch.no_grad():
                val = float(_loss(val_idx).item())
            history["val_loss"].append(val)
        else:
            val = history["train_loss"][-1]
        bar.set_postfix(train=f"{history['train_loss'][-1]:.4f}", val=f"{val:.4f}")
        if val < best - 1e-5:
            best, best_epoch, wait = val, epoch, 0
            best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        else:
            wait += 1
            if len(val_idx) and wait >= patience:
                break
    bar.close()
    logger.info(f"Stopped after {epoch + 1} epochs; best validation loss {best:.4f} at epoch {best_epoch + 1}")
    params = {
        "lr": lr,
        "weight_decay": weight_decay,
        "batch_size": batch_size,
        "max_epochs": max_epochs,
        "patience": patience,
        "val_fraction": val_fraction,
        "seed": seed,
        "best_epoch": best_epoch + 1,
        "n_slides": len(slides),
        "n_train_spots": len(train_idx),
        "n_val_spots": len(val_idx),
        "loss": "mse",
        "target": "log1p(normalize_total 1e4) / per-gene std",
    }
    return ScellstModel(
        config=config,
        genes=list(genes),
        feature_names=feature_names,
        embedding_method=str(next(iter(methods))),
        embedding_scaling=embedding_scaling,
        feature_mean=g_mean.astype(np.float32),
        feature_std=g_std.astype(np.float32),
        gene_scale=scale,
        state_dict=best_state,
        history=history,
        params=params,
        version=__version__,
    )


def load_model(path: str | Path) -> ScellstModel:
    """Load a model saved with ``model.save(path)``."""
    from ..models import ScellstModel

    return ScellstModel.load(path)


def predict(
    sdata: SpatialData,
    model: ScellstModel | str | Path,
    *,
    shapes_key: str = Key.NUCLEI,
    table_key: str | None = None,
    key_added: str | None = None,
    spots_key: str | None = Key.SPOTS,
    spots_key_added: str = Key.SPOTS_PREDICTED,
    overwrite: bool = False,
) -> None:
    """Predict the expression of every cell and write it back as a table annotating the nucleus shapes.

    Works on any slide with nucleus shapes and an embedding table made the same way as the training slides,
    including H&E-only slides from :func:`scellst.io.from_image`.

    Parameters
    ----------
    sdata
        The SpatialData object (modified in place).
    model
        A fitted model, or the path of a saved one.
    shapes_key
        The nucleus shapes.
    table_key
        The embedding table (default ``f"{shapes_key}_embeddings"``).
    key_added
        Name of the predicted cell table (default ``f"{shapes_key}_expression"``).
    spots_key
        Spot shapes; when the cells were assigned to spots, spot-level predictions (the mean of each spot's cells)
        are also written. ``None`` to skip.
    spots_key_added
        Name of the spot-level prediction table.
    overwrite
        Replace existing tables with the same names.

    Returns
    -------
    Nothing; adds ``sdata.tables[key_added]`` (cells x genes, log-normalised units; ``obs['cell_id']``,
    ``obs['spot_id']`` when assigned, ``obsm['spatial']`` centroids, provenance in ``uns['scellst']``) and, when
    spots are available, ``sdata.tables[spots_key_added]`` (spots x genes, annotating the spot shapes).
    """
    import anndata as ad
    from spatialdata.models import TableModel

    from ..models import ScellstModel

    if isinstance(model, str | Path):
        model = ScellstModel.load(model)
    shapes_key = get_key(sdata, "shapes", shapes_key, what="nucleus shapes")
    emb_key = _embedding_table(sdata, shapes_key, table_key)
    key_added = key_added or f"{shapes_key}{Key.EXPRESSION_SUFFIX}"
    check_writable(sdata, key_added, overwrite=overwrite)
    emb = sdata.tables[emb_key]
    method = emb.uns.get("scellst", {}).get("method", "unknown")
    model.check_compatible(list(emb.var_names), method)
    values = model.predict_cells(np.asarray(emb.X))

    obs = emb.obs[[c for c in (Col.CELL_ID, Col.SPOT_ID) if c in emb.obs]].copy()
    obs[Col.REGION] = pd.Categorical([shapes_key] * emb.n_obs)
    table = ad.AnnData(X=values, obs=obs, var=pd.DataFrame(index=model.genes))
    table.obsm["spatial"] = np.asarray(emb.obsm["spatial"])
    table.uns["scellst"] = provenance(
        model.params,
        function="predict",
        units="log1p(counts / total * 1e4)",
        shapes_key=shapes_key,
        embedding_table=emb_key,
        embedding_method=method,
        model_version=model.version,
    )
    table = TableModel.parse(table, region=shapes_key, region_key=Col.REGION, instance_key=Col.CELL_ID)

    spot_table = None
    if spots_key is not None and spots_key in sdata.shapes and Col.SPOT_ID in obs:
        check_writable(sdata, spots_key_added, overwrite=overwrite)
        spot_of = obs[Col.SPOT_ID].astype(object)
        in_spot = pd.notna(spot_of).to_numpy()
        if in_spot.any():
            df = pd.DataFrame(values[in_spot], columns=model.genes)
            df[Col.SPOT_ID] = spot_of[in_spot].astype(str).to_numpy()
            grouped = df.groupby(Col.SPOT_ID)
            means = grouped.mean()
            sobs = pd.DataFrame(
                {
                    Col.SPOT_ID: means.index.astype(str),
                    Col.REGION: pd.Categorical([spots_key] * len(means)),
                    Col.N_CELLS: grouped.size().reindex(means.index).to_numpy(),
                },
                index=means.index.astype(str),
            )
            spot_adata = ad.AnnData(X=means.to_numpy(dtype=np.float32), obs=sobs, var=pd.DataFrame(index=model.genes))
            spot_adata.uns["scellst"] = provenance({}, function="predict", units="mean of cell predictions")
            spot_table = TableModel.parse(spot_adata, region=spots_key, region_key=Col.REGION, instance_key=Col.SPOT_ID)

    write_element(sdata, key_added, table, overwrite=overwrite, what=f"{table.n_obs:,} cells x {table.n_vars} genes")
    if spot_table is not None:
        write_element(
            sdata,
            spots_key_added,
            spot_table,
            overwrite=overwrite,
            what=f"{spot_table.n_obs:,} spots x {spot_table.n_vars} genes",
        )
