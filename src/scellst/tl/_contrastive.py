"""Batch-agnostic contrastive learning of image and expression (after TPIRBAE): training and cell embedding."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from .._constants import Attr, Key
from .._device import resolve_device
from .._logging import logger
from .._utils import as_list, check_writable, get_key
from ..pp._genes import rank_genes
from ._train import (
    bag_tensors,
    build_training_data,
    embedding_table_key,
    prepared_slides,
    validation_mask,
)

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from ..models._contrastive import ContrastiveModel

CONTRASTIVE_SCALINGS = ("quantile", "slide")


def train_contrastive(
    sdata: SpatialData | Sequence[SpatialData],
    *,
    batches: Sequence[str] | None = None,
    batch_agnostic: bool = True,
    genes: Sequence[str] | None = None,
    n_top_genes: int = 1000,
    latent_dim: int = 16,
    embedding_dim: int = 64,
    temperature: float = 0.1,
    shapes_key: str = Key.NUCLEI,
    table_key: str | None = None,
    spots_key: str = Key.SPOTS,
    spot_table_key: str = Key.SPOTS_COUNTS,
    min_spot_counts: float = 20,
    embedding_scaling: Literal["quantile", "slide"] = "quantile",
    vae_epochs: int = 200,
    max_epochs: int = 300,
    patience: int = 30,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    val_fraction: float = 0.15,
    seed: int = 0,
    device: str = "auto",
    path: str | Path | None = None,
    show_progress_bar: bool = True,
) -> ContrastiveModel:
    """Learn cell image features that match spot expression across slides, without learning the slides' batch effects.

    After TPIRBAE. Two encoders are trained one after the other on the spots of ``sdata``:

    1. A gene encoder: a variational autoencoder of each spot's counts (``n_top_genes`` highly variable genes, negative
       binomial likelihood). With ``batch_agnostic=True`` its decoder is given the spot's batch, so the latent does
       not have to carry the batch (slide, patient, run) to reconstruct the counts, as in scVI: the latent mean is a
       batch-corrected description of the spot's expression.
    2. An image encoder: an MLP applied to every cell's image features (the table of :func:`scellst.im.embed_cells`,
       scaled per slide as for :func:`scellst.tl.train`), averaged over the cells of the spot and projected. A
       symmetric InfoNCE loss (CLIP) asks each spot's image to find its own expression latent among the other spots
       of the batch, and back. Every batch holds the same number of spots from each batch label, so that the
       negatives are not all from one slide. Training stops when the loss on held-out spatial blocks of each slide
       has not improved for ``patience`` epochs.

    The MLP's output for each cell is the learned cell embedding: write it with :func:`scellst.tl.embed_contrastive`
    (from the base table) or :func:`scellst.im.embed_cells` with ``method="encoder", encoder=<this model or its
    file>`` (from the image), then train the MIL learner on it (``tl.train(..., table_key=...)``).

    Parameters
    ----------
    sdata
        One SpatialData or a list, each with nucleus shapes assigned to spots, a cell embedding table and spot counts
        (as for :func:`scellst.tl.train`).
    batches
        The batch label of each SpatialData (e.g. the patient or the sequencing run). Default: one batch per slide.
    batch_agnostic
        Condition the gene decoder on the batch (the method). ``False`` trains the same model without the batch: the
        ablation that shows what the batch-agnostic gene encoder brings.
    genes, n_top_genes
        The genes of the gene encoder: a list, or the ``n_top_genes`` most variable (batch-aware) of the slides.
    latent_dim, embedding_dim
        Size of the expression latent and of the learned cell embedding.
    temperature
        InfoNCE temperature.
    shapes_key, table_key, spots_key, spot_table_key, min_spot_counts
        The elements read, as in :func:`scellst.tl.train` (``table_key``: the cell features; default
        ``f"{shapes_key}_embeddings"``).
    embedding_scaling
        ``"quantile"`` (per-slide normal scores, as the MIL default) or ``"slide"`` (per-slide z-scores).
    vae_epochs
        Epochs of the gene encoder (the best on the held-out spots after a KL warm-up of a quarter of them is kept).
    max_epochs, patience, batch_size, lr, weight_decay, val_fraction
        The contrastive stage: at most ``max_epochs``, early stopping after ``patience`` epochs without improvement
        of the validation loss, ``batch_size`` spots per step, AdamW with ``lr`` and ``weight_decay``, and the
        fraction of each slide's spots (in spatial blocks) held out for validation.
    seed
        Random seed.
    device
        ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    path
        Where to save the model (reload with :meth:`scellst.models.ContrastiveModel.load`).
    show_progress_bar
        Show progress bars over epochs.

    Returns
    -------
    The :class:`scellst.models.ContrastiveModel` (``history`` holds the losses, ``params`` the settings and the best
    epochs).
    """
    import torch

    from ..models._contrastive import ContrastiveConfig, ContrastiveModel, build_contrastive_heads, build_gene_vae

    if embedding_scaling not in CONTRASTIVE_SCALINGS:
        raise ValueError(f"`embedding_scaling` must be one of {CONTRASTIVE_SCALINGS}, got {embedding_scaling!r}.")
    if not 0 < val_fraction < 0.9:
        raise ValueError("`val_fraction` must be in (0, 0.9): early stopping needs held-out spots.")
    if temperature <= 0:
        raise ValueError("`temperature` must be positive.")
    sdatas = as_list(sdata)
    labels = [f"slide_{i}" for i in range(len(sdatas))] if batches is None else [str(b) for b in batches]
    if len(labels) != len(sdatas):
        raise ValueError(f"`batches` has {len(labels)} labels for {len(sdatas)} SpatialData objects; give one each.")
    slides = prepared_slides(
        sdatas,
        shapes_key=shapes_key,
        table_key=table_key,
        spots_key=spots_key,
        spot_table_key=spot_table_key,
        min_spot_counts=min_spot_counts,
    )
    names = slides[0].feature_names
    for s in slides[1:]:
        if s.feature_names != names:
            raise ValueError(
                f"The cell features differ between slides ({len(names)} vs {len(s.feature_names)} features): embed "
                "every slide with the same `scellst.im.embed_cells` settings."
            )
    n_spots = sum(len(s.bags) for s in slides)
    selected = rank_genes(
        [s.counts for s in slides],
        [s.spot_xy for s in slides],
        flavor=list(genes) if genes is not None else "hvg",
        n_genes=n_top_genes,
    )
    data = build_training_data(slides, selected, embedding_scaling)
    batch_names = list(dict.fromkeys(labels))
    batch_of_spot = np.array([batch_names.index(labels[i]) for i in data.slide_of_spot], dtype=np.int64)
    rng = np.random.default_rng(seed)
    val = validation_mask(data, val_fraction, rng)
    if val.all() or not val.any():
        raise ValueError("Too few spots to hold out validation blocks; lower or raise `val_fraction`.")
    dev = resolve_device(device)
    torch.manual_seed(seed)
    config = ContrastiveConfig(
        n_features=data.x.shape[1],
        n_genes=len(selected),
        n_batches=len(batch_names),
        batch_agnostic=batch_agnostic,
        latent_dim=latent_dim,
        embedding_dim=embedding_dim,
        temperature=temperature,
    )
    logger.info(
        f"Contrastive training on {n_spots:,} spots of {len(slides)} slide(s) ({len(batch_names)} batches, "
        f"{len(selected)} genes, {data.x.shape[1]} cell features; gene encoder "
        f"{'conditioned on the batch' if batch_agnostic else 'without the batch'})"
    )
    counts = torch.from_numpy(data.counts).to(dev)
    batch_t = torch.from_numpy(batch_of_spot).to(dev)
    vae = build_gene_vae(config).to(dev)
    vae_history, vae_best = _fit_vae(
        vae,
        counts,
        batch_t,
        val,
        epochs=vae_epochs,
        batch_size=batch_size,
        lr=lr,
        rng=rng,
        show_progress_bar=show_progress_bar,
    )
    vae.eval()
    with torch.no_grad():
        latent = vae.encode(counts)[0]
    heads = build_contrastive_heads(config).to(dev)
    history, best_epoch = _fit_heads(
        heads,
        data,
        latent,
        batch_of_spot,
        val,
        dev=dev,
        max_epochs=max_epochs,
        patience=patience,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        rng=rng,
        show_progress_bar=show_progress_bar,
    )
    table = sdatas[0].tables[embedding_table_key(sdatas[0], shapes_key, table_key)]
    base = {k: v for k, v in dict(table.uns.get(Attr.ROOT, {})).items() if k in ("method", "ring_um", "context_um")}
    model = ContrastiveModel(
        config=config,
        genes=list(selected),
        batches=batch_names,
        feature_names=list(names),
        base=base,
        embedding_scaling=embedding_scaling,
        heads=heads.cpu().eval(),
        gene_vae=vae.cpu().eval(),
        history={**vae_history, **history},
        params={
            "n_spots": n_spots,
            "n_val_spots": int(val.sum()),
            "batches": labels,
            "vae_best_epoch": vae_best,
            "best_epoch": best_epoch,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
        },
    )
    if path is not None:
        model.save(path)
        logger.info(f"Saved the contrastive model to {str(path)!r}")
    return model


def _fit_vae(vae, counts, batch, val, *, epochs, batch_size, lr, rng, show_progress_bar) -> tuple[dict, int]:
    """Train the gene encoder; keep the weights of the best validation ELBO after the KL warm-up."""
    import copy

    import torch
    from tqdm.auto import tqdm

    train_idx, val_idx = np.flatnonzero(~val), np.flatnonzero(val)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, epochs // 4)
    history: dict[str, list[float]] = {"vae_train": [], "vae_val": []}
    best, best_state, best_epoch = np.inf, copy.deepcopy(vae.state_dict()), 0
    for epoch in tqdm(range(epochs), desc="gene encoder", disable=not show_progress_bar):
        vae.train()
        kl_weight = min(1.0, (epoch + 1) / warmup)
        losses = []
        for chunk in np.array_split(rng.permutation(train_idx), max(1, len(train_idx) // batch_size)):
            idx = torch.from_numpy(chunk).to(counts.device)
            loss = vae.loss(counts[idx], batch[idx], kl_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        vae.eval()
        with torch.no_grad():
            v = torch.from_numpy(val_idx).to(counts.device)
            val_loss = float(vae.loss(counts[v], batch[v], 1.0))
        history["vae_train"].append(float(np.mean(losses)))
        history["vae_val"].append(val_loss)
        if epoch + 1 >= warmup and val_loss < best:
            best, best_state, best_epoch = val_loss, copy.deepcopy(vae.state_dict()), epoch + 1
    vae.load_state_dict(best_state)
    return history, best_epoch


def _balanced_batches(batch_of_spot: np.ndarray, idx: np.ndarray, batch_size: int, rng) -> list[np.ndarray]:
    """One epoch of steps; each step takes the same number of spots from every batch label (cycling small ones)."""
    groups = [rng.permutation(idx[batch_of_spot[idx] == b]) for b in np.unique(batch_of_spot[idx])]
    per = max(2, batch_size // len(groups))
    n_steps = max(1, int(np.ceil(len(idx) / (per * len(groups)))))
    steps = []
    for step in range(n_steps):
        parts = [np.take(g, np.arange(step * per, (step + 1) * per), mode="wrap") for g in groups]
        steps.append(np.unique(np.concatenate(parts)))
    return steps


def _bag_tensors(data, spots: np.ndarray, x, dev):
    """The features of the cells of ``spots``, the bag of each cell and its overlap weight (or None)."""
    cells, bag_index, weight = bag_tensors(data, spots, dev)
    return x[cells], bag_index, weight


def _fit_heads(
    heads,
    data,
    latent,
    batch_of_spot,
    val,
    *,
    dev,
    max_epochs,
    patience,
    batch_size,
    lr,
    weight_decay,
    rng,
    show_progress_bar,
) -> tuple[dict, int]:
    """Train the image encoder and the gene projection by InfoNCE; keep the best validation epoch."""
    import copy

    import torch
    from tqdm.auto import tqdm

    x = torch.from_numpy(data.x).to(dev)
    train_idx, val_idx = np.flatnonzero(~val), np.flatnonzero(val)
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=weight_decay)
    history: dict[str, list[float]] = {"train": [], "val": []}
    best, best_state, best_epoch, waited = np.inf, copy.deepcopy(heads.state_dict()), 0, 0
    bar = tqdm(total=max_epochs, desc="image encoder", disable=not show_progress_bar)
    val_cells, val_bags, val_weight = _bag_tensors(data, val_idx, x, dev)
    val_latent = latent[torch.from_numpy(val_idx).to(dev)]
    for epoch in range(max_epochs):
        heads.train()
        losses = []
        for spots in _balanced_batches(batch_of_spot, train_idx, batch_size, rng):
            cells, bags, weight = _bag_tensors(data, spots, x, dev)
            image = heads.spots(cells, bags, len(spots), weight)
            loss = heads.loss(image, heads.genes(latent[torch.from_numpy(spots).to(dev)]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        heads.eval()
        with torch.no_grad():
            val_loss = float(
                heads.loss(heads.spots(val_cells, val_bags, len(val_idx), val_weight), heads.genes(val_latent))
            )
        history["train"].append(float(np.mean(losses)))
        history["val"].append(val_loss)
        bar.update(1)
        bar.set_postfix(val=f"{val_loss:.3f}")
        if val_loss < best - 1e-4:
            best, best_state, best_epoch, waited = val_loss, copy.deepcopy(heads.state_dict()), epoch + 1, 0
        else:
            waited += 1
            if waited >= patience:
                break
    bar.close()
    heads.load_state_dict(best_state)
    logger.info(f"Contrastive training: best validation InfoNCE {best:.3f} at epoch {best_epoch}")
    return history, best_epoch


def embed_contrastive(
    sdata: SpatialData,
    model: ContrastiveModel | str | Path,
    shapes_key: str = Key.NUCLEI,
    *,
    table_key: str | None = None,
    key_added: str | None = None,
    overwrite: bool = False,
) -> None:
    """Write the cell embedding learned by :func:`scellst.tl.train_contrastive` for every cell of ``sdata``.

    Reads the cell features the model was trained on (``table_key``, the table of :func:`scellst.im.embed_cells`
    made with the same settings), scales them per slide as at training and applies the model's image encoder.
    Works on H&E-only slides: no expression is read.

    Parameters
    ----------
    sdata
        The SpatialData object (modified in place).
    model
        A :class:`scellst.models.ContrastiveModel` or the path of its file.
    shapes_key
        The nucleus shapes.
    table_key
        The base cell features (default ``f"{shapes_key}_embeddings"``).
    key_added
        Name of the new table (default ``f"{shapes_key}_contrastive"``).
    overwrite
        Replace an existing table with the same name.

    Returns
    -------
    Nothing; adds ``sdata.tables[key_added]`` (cells x ``embedding_dim``, ``contrastive_{i}`` features) annotating the
    nucleus shapes, with ``obs['spot_id']`` when the cells were assigned and the provenance in ``uns['scellst']``.
    """
    from ..im._contrastive import resolve_model, write_contrastive

    model = resolve_model(model)
    shapes_key = get_key(sdata, "shapes", shapes_key, what="nucleus shapes")
    key_added = key_added or f"{shapes_key}_contrastive"
    check_writable(sdata, key_added, overwrite=overwrite)
    base = sdata.tables[embedding_table_key(sdata, shapes_key, table_key)]
    write_contrastive(sdata, shapes_key, model, base, key_added=key_added, overwrite=overwrite)
