"""Training the sCellST multiple-instance model on spots, and predicting single-cell expression."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._constants import TARGET_SUM, Attr, Col, Key
from .._device import resolve_device
from .._logging import logger
from .._utils import (
    apply_affine,
    as_list,
    available_cores,
    check_writable,
    get_key,
    instance_ids,
    intrinsic_to_intrinsic,
    provenance,
    shapes_centroids,
    write_element,
)
from ..pp._genes import library_size, lognorm, rank_genes
from ._models import context_arrays

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from ..models import ScellstModel


DEFAULT_SCALING = "quantile"  # cell features: per-slide normal scores (robust to monotone stain and scanner changes)


# --------------------------------------------------------------------------------------------------------------------
# data preparation
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Slide:
    """One slide's training material: raw cell features, the cells of each kept spot, and the spot counts.

    Made by :func:`scellst.tl.prepare_slide`; the input of :func:`scellst.tl.fit_slides` (the low-level training API
    behind :func:`scellst.tl.train`, for benchmarks that prepare slides once and fit many models).

    Attributes
    ----------
    name
        A label for logs.
    features
        Raw features of every cell of the slide (cells x features), before per-slide scaling.
    bags
        For each kept spot, the indices of its cells into ``features``.
    counts
        Kept spots x all genes, raw counts.
    spot_xy
        Kept spot centres (the spots' own frame).
    spot_ids
        Kept spot names.
    feature_names
        Names of the features.
    embedding_method
        The ``im.embed_cells`` method that made the features.
    weights
        For each kept spot, its cells' overlap weights (``None``: plain means, cells assigned by centroid).
    """

    name: str
    features: np.ndarray  # raw features of every cell of the slide
    bags: list[np.ndarray]  # per kept spot, indices of its cells (into ``features``)
    counts: AnnData  # kept spots x all genes (raw counts)
    spot_xy: np.ndarray  # kept spot centres (spots' intrinsic frame)
    spot_ids: np.ndarray
    feature_names: list[str] = field(default_factory=list)
    embedding_method: str = "unknown"
    weights: list[np.ndarray] | None = None  # per kept spot, its cells' overlap weights (None: plain means)

    def subset(self, mask: np.ndarray) -> Slide:
        """The same slide restricted to some of its spots."""
        idx = np.flatnonzero(mask)
        return Slide(
            name=self.name,
            features=self.features,
            bags=[self.bags[i] for i in idx],
            weights=None if self.weights is None else [self.weights[i] for i in idx],
            counts=self.counts[idx].copy(),
            spot_xy=self.spot_xy[idx],
            spot_ids=self.spot_ids[idx],
            feature_names=self.feature_names,
            embedding_method=self.embedding_method,
        )


def embedding_table_key(sdata: SpatialData, shapes_key: str, table_key: str | None) -> str:
    """Key of the embedding table, with a helpful error when it is missing."""
    key = table_key or f"{shapes_key}{Key.EMBEDDINGS_SUFFIX}"
    if key not in sdata.tables:
        raise KeyError(
            f"No embedding table {key!r}; run `scellst.im.embed_cells(sdata, {shapes_key!r})` first "
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


def _check_spot_layout(spots, name: str) -> None:
    """Refuse spots that overlap one another: their centres are then in another frame than their size.

    Capture spots and bins never overlap by more than half their radius (Visium: 100 um apart, 55 um wide;
    Visium HD bins touch). Spot centres given in hires or lowres pixels while the radius is in full-resolution pixels
    put the centres closer than one radius apart.
    """
    from scipy.spatial import cKDTree

    if len(spots) < 3:
        return
    xy = shapes_centroids(spots)
    if "radius" in spots.columns:
        radius = float(np.nanmedian(np.asarray(spots["radius"], dtype=float)))
    else:
        radius = float(np.sqrt(np.nanmedian(spots.geometry.area.to_numpy()) / np.pi))
    if not np.isfinite(radius) or radius <= 0:
        return
    dist, _ = cKDTree(xy).query(xy, k=2)
    spacing = float(np.median(dist[:, 1]))
    if spacing < radius:
        raise ValueError(
            f"{name}: neighbouring spot centres are {spacing:.3g} px apart but the spots have a radius of {radius:.3g} px, "
            "so the spots overlap one another and miss the tissue layout. The spot positions are probably in another "
            "frame than their size: give them in full-resolution pixels of the H&E (not hires/lowres pixels; check the "
            "scale factor) and check `spot_diameter_um` / `microns_per_pixel`."
        )


MIN_TRAINING_SPOTS = 10  # fewer spots cannot fit (nor select genes for) a model
MIN_SPOTS_ON_TISSUE = 0.1  # below this fraction of spots with a nucleus, the spots miss the tissue


def prepare_slide(
    sdata: SpatialData,
    *,
    name: str = "slide",
    shapes_key: str = Key.NUCLEI,
    table_key: str | None = None,
    spots_key: str = Key.SPOTS,
    spot_table_key: str = Key.SPOTS_COUNTS,
    min_spot_counts: float = 20,
) -> Slide:
    """Collect one slide's bags: the spots with at least one nucleus and ``min_spot_counts`` counts.

    The first step of :func:`scellst.tl.train`, public for benchmarks that prepare slides once and fit many models
    with :func:`scellst.tl.fit_slides`.

    Parameters
    ----------
    sdata
        A SpatialData object with assigned nuclei (:func:`scellst.pp.assign_cells`), a cell embedding table and spot
        counts.
    name
        A label for logs.
    shapes_key, table_key, spots_key, spot_table_key
        The nucleus shapes, the cell embedding table (default ``f"{shapes_key}_embeddings"``), the spot shapes and
        the spot count table.
    min_spot_counts
        Spots with fewer counts are left out.

    Returns
    -------
    The :class:`scellst.tl.Slide`.
    """
    emb_key = embedding_table_key(sdata, shapes_key, table_key)
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
    groups, weights = _spot_groups(sdata, emb, shapes_key, spots_key)
    ids = instance_ids(counts)
    lib = library_size(counts)
    has_cells = np.array([i in groups for i in ids])
    enough = lib >= min_spot_counts
    keep = has_cells & enough
    n_no_cells, n_low = int((~has_cells).sum()), int((has_cells & ~enough).sum())
    if n_no_cells or n_low:
        logger.info(
            f"{name}: dropped {n_no_cells} spots without nuclei and {n_low} spots with < {min_spot_counts:g} counts "
            f"({int(keep.sum())} of {len(ids)} spots kept)"
        )
    if not keep.any():
        raise ValueError(
            f"No spot of {spot_table_key!r} contains a nucleus of {shapes_key!r} and >= {min_spot_counts:g} counts; "
            "check the segmentation, `scellst.pp.assign_cells` and `min_spot_counts`."
        )
    if len(ids) >= MIN_TRAINING_SPOTS and has_cells.mean() < MIN_SPOTS_ON_TISSUE:
        raise ValueError(
            f"{name}: only {int(has_cells.sum())} of {len(ids)} spots contain a nucleus, so the spots miss the tissue. "
            "The spot positions are probably in another frame than the image: they must be in full-resolution "
            "pixels of the H&E (not hires/lowres pixels; check the scale factor and swapped x/y) and registered in "
            "the same coordinate system as the image. Look at both with spatialdata-plot (`render_images` then `render_shapes`)."
        )
    spots = sdata.shapes[spots_key]
    _check_spot_layout(spots, name)
    centres = pd.DataFrame(shapes_centroids(spots), index=spots.index.astype(str))
    kept_ids = ids[keep]
    return Slide(
        name=name,
        features=np.asarray(emb.X, dtype=np.float32),
        bags=[groups[i] for i in kept_ids],
        counts=counts[keep].copy(),
        spot_xy=centres.reindex(kept_ids).to_numpy(),
        spot_ids=kept_ids,
        feature_names=list(emb.var_names),
        embedding_method=str(emb.uns.get("scellst", {}).get("method", "unknown")),
        weights=None if weights is None else [weights[i] for i in kept_ids],
    )


def _group_by_spot(spot: np.ndarray, rows: np.ndarray, weight: np.ndarray | None = None) -> tuple[dict, dict | None]:
    """``{spot: rows}`` (and ``{spot: weights}``), in a few vectorised steps (Visium HD has ~700,000 spots)."""
    if len(spot) == 0:
        return {}, (None if weight is None else {})
    order = np.argsort(spot, kind="stable")
    keys, starts = np.unique(spot[order], return_index=True)
    cuts = starts[1:]
    groups = dict(zip(keys.tolist(), np.split(rows[order], cuts), strict=True))
    if weight is None:
        return groups, None
    return groups, dict(zip(keys.tolist(), np.split(weight[order], cuts), strict=True))


def _spot_groups(sdata: SpatialData, emb: AnnData, shapes_key: str, spots_key: str) -> tuple[dict, dict | None]:
    """The cells (rows of ``emb``) of each spot, and their overlap weights when the cells were assigned by overlap."""
    from ..pp._assign import overlaps_key

    o_key = overlaps_key(shapes_key)
    if o_key not in sdata.tables:
        spot_of = emb.obs[Col.SPOT_ID].astype(object).to_numpy()
        assigned = np.flatnonzero(pd.notna(spot_of))
        return _group_by_spot(spot_of[assigned].astype(str), assigned)
    pairs = sdata.tables[o_key].obs
    made_for = sdata.tables[o_key].uns.get(Attr.ROOT, {}).get("spots_key", spots_key)
    if made_for != spots_key:
        raise ValueError(
            f"tables[{o_key!r}] holds overlaps with {made_for!r}, not with {spots_key!r}: assign the cells to "
            f"{spots_key!r} again (`scellst.pp.assign_cells(..., rule='overlap', overwrite=True)`)."
        )
    rows = pd.Index(instance_ids(emb)).get_indexer(pairs[Col.CELL_ID].astype(str).to_numpy())
    ok = rows >= 0  # cells without an embedding are left out
    spot = pairs[Col.SPOT_ID].astype(str).to_numpy()[ok]
    return _group_by_spot(spot, rows[ok].astype(np.int64), pairs["weight"].to_numpy(np.float32)[ok])


def robust_scale(y: np.ndarray) -> np.ndarray:
    """Per-gene robust scale: IQR / 1.349 (the standard deviation for normal data), else std, else 1."""
    q75, q25 = np.percentile(y, [75, 25], axis=0)
    scale = (q75 - q25) / 1.349
    std = y.std(axis=0)
    scale = np.where(scale > 1e-6, scale, std)
    return np.where(scale > 1e-6, scale, 1.0).astype(np.float32)


@dataclass
class TrainingData:
    """Every slide's bags concatenated, with targets for each loss."""

    x: np.ndarray  # standardised cell features, all slides concatenated
    bags: list[np.ndarray]  # global cell indices per spot
    slide_of_spot: np.ndarray
    spot_xy: np.ndarray
    lognorm: np.ndarray  # spots x genes, log1p(counts per 10k)
    counts: np.ndarray  # spots x genes, raw counts
    library: np.ndarray  # spots, total counts over all genes
    slide_scale: np.ndarray  # slides x genes, robust scale of lognorm per slide
    feature_mean: np.ndarray
    feature_std: np.ndarray
    weights: list[np.ndarray] | None = None  # per spot, its cells' overlap weights (None: plain means)

    @property
    def scaled(self) -> np.ndarray:
        """Log-normalised targets divided by their slide's robust scale."""
        return self.lognorm / self.slide_scale[self.slide_of_spot]

    def spot_features(self) -> np.ndarray:
        """Mean standardised cell feature of each spot (for spot-level baselines)."""
        from ..models._context import spot_means

        return spot_means(self.x, self.bags)


def build_training_data(slides: Sequence[Slide], genes: Sequence[str], embedding_scaling: str) -> TrainingData:
    """Standardise features, compute targets and per-slide scales."""
    import scipy.sparse as sp

    from ..models._mil import apply_scaling, slide_stats

    all_feats = np.concatenate([s.features for s in slides])
    g_mean, g_std = all_feats.mean(axis=0), all_feats.std(axis=0)
    xs, bags, slide_of, xy, ln, raw, lib, scales, offset = [], [], [], [], [], [], [], [], 0
    for i, s in enumerate(slides):
        xs.append(
            apply_scaling(s.features, embedding_scaling, slide_stats(s.features, embedding_scaling, g_mean, g_std))
        )
        bags.extend(b + offset for b in s.bags)
        offset += s.features.shape[0]
        slide_of.append(np.full(len(s.bags), i))
        xy.append(s.spot_xy)
        y = lognorm(s.counts, genes)
        ln.append(y)
        scales.append(robust_scale(y))
        sub = s.counts[:, list(genes)].X
        raw.append((sub.toarray() if sp.issparse(sub) else np.asarray(sub)).astype(np.float32))
        lib.append(library_size(s.counts).astype(np.float32))
    return TrainingData(
        x=np.concatenate(xs).astype(np.float32),
        bags=bags,
        slide_of_spot=np.concatenate(slide_of),
        spot_xy=np.concatenate(xy),
        lognorm=np.concatenate(ln),
        counts=np.concatenate(raw),
        library=np.concatenate(lib),
        slide_scale=np.stack(scales),
        feature_mean=g_mean.astype(np.float32),
        feature_std=g_std.astype(np.float32),
        weights=_all_weights(slides),
    )


def _all_weights(slides: Sequence[Slide]) -> list[np.ndarray] | None:
    """Every spot's overlap weights (ones for slides assigned by centroid), or None when no slide has weights."""
    if all(s.weights is None for s in slides):
        return None
    return [w for s in slides for w in (s.weights or [np.ones(len(b), np.float32) for b in s.bags])]


KMEANS_MAX_SPOTS = 20_000  # above this (Visium HD bins), validation blocks are squares of a grid, not k-means regions


def _grid_blocks(xy: np.ndarray, block_size: int, rng: np.random.Generator) -> np.ndarray:
    """Block of each spot: squares of a grid holding about ``block_size`` spots (linear time, for many spots)."""
    from scipy.spatial import cKDTree

    sample = xy[rng.choice(len(xy), size=min(len(xy), 5000), replace=False)]
    spacing = float(np.median(cKDTree(xy).query(sample, k=2)[0][:, 1]))
    side = np.sqrt(block_size) * max(spacing, 1e-9)
    cell = np.floor((xy - xy.min(axis=0)) / side).astype(np.int64)
    return np.unique(cell[:, 0] * (int(cell[:, 1].max()) + 1) + cell[:, 1], return_inverse=True)[1].ravel()


def spatial_blocks(xy: np.ndarray, fraction: float, rng: np.random.Generator, block_size: int = 12) -> np.ndarray:
    """Boolean validation mask made of whole spatial blocks of about ``block_size`` spots.

    The blocks are k-means regions, or squares of a grid above ``KMEANS_MAX_SPOTS`` spots.
    """
    from sklearn.cluster import KMeans

    n = len(xy)
    if n < 10 or fraction <= 0:
        return np.zeros(n, dtype=bool)
    if n > KMEANS_MAX_SPOTS:
        blocks = _grid_blocks(xy, block_size, rng)
        k = int(blocks.max()) + 1
    else:
        k = int(np.clip(round(n / block_size), 2, n))
        blocks = KMeans(n_clusters=k, n_init=3, random_state=int(rng.integers(1 << 31))).fit_predict(xy)
    order = rng.permutation(k)
    before = np.concatenate([[0], np.cumsum(np.bincount(blocks, minlength=k)[order])[:-1]])
    chosen = order[before / n < fraction]  # blocks are added until the fraction is reached, as one at a time would
    val = np.isin(blocks, chosen)
    if val.all():
        val[blocks == blocks[0]] = False
    return val


def validation_mask(data: TrainingData, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Spatial-block validation spots, drawn within each slide."""
    mask = np.zeros(len(data.bags), dtype=bool)
    for s in np.unique(data.slide_of_spot):
        idx = np.flatnonzero(data.slide_of_spot == s)
        mask[idx] = spatial_blocks(data.spot_xy[idx], fraction, rng)
    return mask


# --------------------------------------------------------------------------------------------------------------------
# the optimisation loop
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class FitSettings:
    """Optimisation settings shared by the members of an ensemble (:func:`scellst.tl.fit_slides`).

    Attributes
    ----------
    lr, weight_decay
        AdamW learning rate and weight decay.
    batch_size
        Spots per step.
    max_epochs, patience, min_delta
        Early stopping: at most ``max_epochs``, stop after ``patience`` epochs without an improvement of the
        validation loss by ``min_delta``. ``patience=None``: chosen from the number of steps per epoch (see
        :func:`resolve_patience`).
    device
        ``"cpu"`` or ``"cuda"``.
    checkpoint_every
        Epochs between checkpoints (when a checkpoint folder is given).
    show_progress_bar
        Show a progress bar per member.
    n_jobs
        Members trained at once.
    """

    lr: float = 1e-4
    weight_decay: float = 1e-4
    batch_size: int = 8
    max_epochs: int = 1000
    patience: int | None = None
    min_delta: float = 1e-4
    device: str = "cpu"
    checkpoint_every: int = 10
    show_progress_bar: bool = True
    n_jobs: int = 1


PATIENCE_EPOCHS = 30  # the default patience, in epochs
PATIENCE_STEPS = 8000  # ... capped at about this many optimisation steps without a gain
MIN_PATIENCE = 10  # ... but never fewer epochs than this


def resolve_patience(patience: int | None, n_train_spots: int, batch_size: int, loss: str = "mse") -> int:
    """Epochs without a validation gain before training stops: ``patience``, or by default 30, fewer on large data.

    On a slide of a few hundred spots an epoch is a few dozen optimisation steps, and 30 epochs without a gain are a
    few thousand steps. On a whole Visium slide or a cohort an epoch is hundreds of steps, and 30 epochs would wait
    ten times longer for the same learning rate. The default therefore waits 30 epochs or about
    ``PATIENCE_STEPS`` (8,000) steps, whichever is fewer, and never fewer than 10 epochs. Up to about 2,100 training
    spots per epoch (batches of 8) this is 30 epochs, as before. The per-slide cosine loss takes one step per slide:
    30 epochs.
    """
    if patience is not None:
        if int(patience) < 1:
            raise ValueError(f"`patience` must be at least 1 epoch, got {patience}.")
        return int(patience)
    if loss == "cosine":
        return PATIENCE_EPOCHS
    steps = max(1, -(-int(n_train_spots) // max(int(batch_size), 1)))
    return int(max(MIN_PATIENCE, min(PATIENCE_EPOCHS, -(-PATIENCE_STEPS // steps))))


SMALL_BAG_CELLS = 4  # spots with at most this many cells (median) train with SMALL_BAG_BATCH spots per step
SMALL_BAG_BATCH, SMALL_BAG_LR_GAIN = 256, 10.0


def _small_bag_settings(slides, model: str, lr: float | None, batch_size: int | None) -> tuple[float, int]:
    """Learning rate and batch size: the given ones, else the defaults, larger for bags of one or two cells."""
    from ._models import default_lr

    sizes = [w.sum() for s in slides for w in (s.weights or [np.ones(len(b)) for b in s.bags])]
    small = float(np.median(sizes)) <= SMALL_BAG_CELLS  # cells per spot; with overlaps, the shares of cells
    chosen_lr = default_lr(model) * (SMALL_BAG_LR_GAIN if small else 1.0) if lr is None else float(lr)
    chosen_batch = (SMALL_BAG_BATCH if small else 8) if batch_size is None else int(batch_size)
    if small and (lr is None or batch_size is None):
        logger.info(
            f"The median spot holds at most {SMALL_BAG_CELLS} cells: training with {chosen_batch} spots per step and "
            f"a learning rate of {chosen_lr:g} (set `batch_size` and `lr` to choose)."
        )
    return chosen_lr, chosen_batch


def _loss_fn(config, net, data_t, spot_idx, cell_index, bag_index, weight=None):
    from ..models._losses import cosine_per_slide, mse, nb_nll, poisson_nll

    idx = torch_index(spot_idx, data_t["x"].device)
    if weight is None:
        pred = net.spots(data_t, spot_idx, cell_index, bag_index)
    else:  # cells assigned by overlap: each spot is the weighted mean of the cells it overlaps
        pred = net.spots(data_t, spot_idx, cell_index, bag_index, weight=weight)
    if config.loss == "mse":
        return mse(pred, data_t["scaled"][idx])
    if config.loss == "cosine":
        return cosine_per_slide(pred, data_t["scaled"][idx], data_t["slide"][idx])
    mu = pred * (data_t["library"][idx] / TARGET_SUM)[:, None]
    if config.loss == "nb":
        return nb_nll(mu, data_t["counts"][idx], net.log_theta, parametrization=config.nb_parametrization)
    return poisson_nll(mu, data_t["counts"][idx])


def torch_index(idx: np.ndarray, device):
    """A numpy index array as a torch tensor on ``device``."""
    import torch

    return torch.from_numpy(np.asarray(idx, dtype=np.int64)).to(device)


def _plain(value: Any) -> bool:
    """Whether a model option is plain data that a model file can hold (no objects, no arrays)."""
    if isinstance(value, str | bool | int | float) or value is None:
        return True
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    return False


def _output_init(config, data: TrainingData, train_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    from ..models import COUNT_LOSSES, inverse_softplus

    if config.loss in COUNT_LOSSES:
        rate = (data.counts[train_idx] / data.library[train_idx, None] * TARGET_SUM).mean(axis=0)
        scale = np.maximum(rate, 1e-3).astype(np.float32)
        return inverse_softplus(np.ones(config.n_genes)), scale
    return inverse_softplus(np.maximum(data.scaled[train_idx].mean(axis=0), 1e-3)), None


_SEED_LOCK = threading.Lock()  # torch's global generator, seeded per member while its network is built


def fit_member(
    config,
    data: TrainingData,
    *,
    val_mask: np.ndarray,
    settings: FitSettings,
    seed: int,
    checkpoint: Path | None = None,
    resume: bool = False,
    desc: str = "train",
    init: dict[str, Any] | None = None,
    cancel: threading.Event | None = None,
) -> tuple[dict, dict[str, list[float]], int]:
    """Train one network; returns its best weights, loss history and best epoch (1-based).

    ``init`` passes model-specific initial values to the network (CPNN's prototypes). ``cancel``, set by another
    thread, stops training at the next epoch as Ctrl-C would (checkpoint saved, ``KeyboardInterrupt`` raised).
    """
    import torch
    from tqdm.auto import tqdm

    from ..models import build_network

    device = settings.device
    rng = np.random.default_rng(seed)
    train_idx, val_idx = np.flatnonzero(~val_mask), np.flatnonzero(val_mask)
    if settings.patience is None:  # called directly (fit_slides resolves it once for all members)
        settings = replace(settings, patience=resolve_patience(None, len(train_idx), settings.batch_size, config.loss))
    bias, scale = _output_init(config, data, train_idx)
    with _SEED_LOCK:  # members trained in parallel threads each draw their initial weights from their own seed
        torch.manual_seed(seed)
        net = build_network(config, output_bias=bias, output_scale=scale, **(init or {})).to(device)
    # the fused AdamW: one kernel per step instead of about ten small operations per weight tensor, a quarter of a
    # step's time on the CPU for these small networks (measured: 2.1 -> 0.8 ms per step of 8 spots)
    fused = {"fused": True} if torch.device(device).type in ("cpu", "cuda") else {}
    opt = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, **fused)
    data_t = _data_tensors(config, data, device)
    history: dict[str, list[float]] = {"train_loss": [], "val_loss": []}
    state = {"epoch": 0, "best": np.inf, "best_epoch": 0, "wait": 0, "best_state": None, "stopped": False}
    if checkpoint is not None and resume and checkpoint.exists():
        history, state = _load_member_checkpoint(checkpoint, net, opt, rng)
        logger.info(f"{desc}: resumed from {checkpoint} at epoch {state['epoch']}")

    def save() -> None:
        if checkpoint is not None:
            _save_member_checkpoint(checkpoint, net, opt, history, state, rng)

    val_cells = bag_tensors(data, val_idx, device) if len(val_idx) else None
    bar = tqdm(total=settings.max_epochs, initial=state["epoch"], desc=desc, disable=not settings.show_progress_bar)
    try:
        while state["epoch"] < settings.max_epochs and not state["stopped"]:
            if cancel is not None and cancel.is_set():
                raise KeyboardInterrupt
            batches = _spot_batches(config, data, train_idx, rng, settings.batch_size)
            history["train_loss"].append(_train_epoch(net, opt, config, data_t, data, batches, device))
            if val_cells is not None:
                net.eval()
                with torch.no_grad():
                    val = float(_loss_fn(config, net, data_t, val_idx, *val_cells).item())
                history["val_loss"].append(val)
            else:
                val = history["train_loss"][-1]
            _early_stopping(state, val, net, settings, has_validation=val_cells is not None)
            _show_epoch(bar, state, settings, train=history["train_loss"][-1], val=val)
            if state["epoch"] % settings.checkpoint_every == 0:
                save()
    except KeyboardInterrupt:
        save()
        logger.warning(f"{desc}: interrupted at epoch {state['epoch']}; resume with `resume=True`.")
        raise
    finally:
        bar.close()
    save()
    if not state["stopped"] and val_cells is not None:
        logger.warning(
            f"{desc}: reached max_epochs={settings.max_epochs} before the validation loss converged; "
            "consider a larger `max_epochs` or learning rate."
        )
    logger.info(
        f"{desc}: {state['epoch']} epochs, best validation loss {state['best']:.4f} at epoch {state['best_epoch'] + 1}"
    )
    return state["best_state"], history, state["best_epoch"] + 1


def _data_tensors(config, data: TrainingData, device) -> dict:
    """The training arrays on the device: features, targets of every loss, slides and the model's spot context."""
    import torch

    data_t = {
        "x": torch.from_numpy(data.x).to(device),
        "scaled": torch.from_numpy(data.scaled.astype(np.float32)).to(device),
        "counts": torch.from_numpy(data.counts).to(device),
        "library": torch.from_numpy(data.library).to(device),
        "slide": torch.from_numpy(data.slide_of_spot).to(device),
    }
    data_t.update({k: torch.from_numpy(v).to(device) for k, v in context_arrays(config, data).items()})
    return data_t


def _load_member_checkpoint(checkpoint: Path, net, opt, rng: np.random.Generator) -> tuple[dict, dict]:
    """Restore a member's weights, optimiser and random states; its history and early-stopping state."""
    import torch

    from ..models._io import load_payload

    ck = load_payload(checkpoint, what="training checkpoint")  # plain data: no code runs on load
    net.load_state_dict(ck["net"])
    opt.load_state_dict(ck["opt"])
    rng.bit_generator.state = ck["rng"]
    torch.set_rng_state(ck["torch_rng"])
    return ck["history"], ck["state"]


def _save_member_checkpoint(checkpoint: Path, net, opt, history: dict, state: dict, rng) -> None:
    """Write a member's training state; atomic, so an interruption never leaves a half-written checkpoint."""
    import torch

    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    tmp = checkpoint.with_suffix(".tmp")
    torch.save(
        {
            "net": net.state_dict(),
            "opt": opt.state_dict(),
            "history": history,
            "state": state,
            "rng": rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
        },
        tmp,
    )
    tmp.replace(checkpoint)


def _spot_batches(config, data: TrainingData, idx: np.ndarray, rng, batch_size: int) -> list[np.ndarray]:
    """One epoch of spot batches: shuffled, or all spots of a slide at once for the per-slide cosine loss (MISO)."""
    if config.loss == "cosine":
        return [idx[data.slide_of_spot[idx] == s] for s in np.unique(data.slide_of_spot[idx])]
    perm = rng.permutation(idx)
    return [perm[i : i + batch_size] for i in range(0, len(perm), batch_size)]


def bag_tensors(data: TrainingData, spot_idx: np.ndarray, device):
    """The cells of some spots as tensors: their indices, the bag of each, and their overlap weights (or None)."""
    import torch

    cells = [data.bags[i] for i in spot_idx]
    cell_index = torch.from_numpy(np.concatenate(cells)).to(device)
    bag_index = torch.from_numpy(np.repeat(np.arange(len(cells)), [len(c) for c in cells])).to(device)
    if data.weights is None:
        return cell_index, bag_index, None
    weight = torch.from_numpy(np.concatenate([data.weights[i] for i in spot_idx]).astype(np.float32)).to(device)
    return cell_index, bag_index, weight


def _train_epoch(net, opt, config, data_t: dict, data: TrainingData, batches: list[np.ndarray], device) -> float:
    """One pass over the training spots; the mean loss per spot."""
    net.train()
    total, n = 0.0, 0
    for batch in batches:
        if len(batch) == 0:
            continue
        opt.zero_grad()
        loss = _loss_fn(config, net, data_t, batch, *bag_tensors(data, batch, device))
        loss.backward()
        opt.step()
        total += loss.item() * len(batch)
        n += len(batch)
    return total / max(n, 1)


def _early_stopping(state: dict, val: float, net, settings: FitSettings, *, has_validation: bool) -> None:
    """Keep the best weights; stop after ``patience`` epochs without a relative gain of ``min_delta``."""
    epoch = state["epoch"]
    if val < state["best"] - settings.min_delta * max(abs(state["best"]), 1e-8) or state["best_state"] is None:
        state.update(best=val, best_epoch=epoch, wait=0)
        state["best_state"] = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    else:
        state["wait"] += 1
        if has_validation and state["wait"] >= settings.patience:
            state["stopped"] = True
    state["epoch"] = epoch + 1


def _show_epoch(bar, state: dict, settings: FitSettings, *, train: float, val: float) -> None:
    bar.update(1)
    bar.set_postfix(
        train=f"{train:.4f}",
        val=f"{val:.4f}",
        best=f"epoch {state['best_epoch'] + 1}",
        patience=f"{state['wait']}/{settings.patience}",
    )
    if state["stopped"]:
        # the bar ends full at the stopping epoch and says why, instead of an ETA up to max_epochs
        bar.total = state["epoch"]
        bar.set_postfix_str(
            f"stopped early: no gain for {settings.patience} epochs, best epoch {state['best_epoch'] + 1}"
        )
        bar.refresh()


# --------------------------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------------------------
def _fit_members(
    config,
    data: TrainingData,
    settings: FitSettings,
    *,
    n_models: int,
    val_fraction: float,
    seed: int,
    ckdir: Path | None,
    resume: bool,
    prefix: str = "",
    init: dict[str, Any] | None = None,
) -> tuple[list[dict], list[dict], list[int], list[int]]:
    """Train ``n_models`` networks (different seeds and validation blocks): states, histories, best epochs, n_val.

    With ``settings.n_jobs > 1`` on the CPU, members train at the same time in threads that share the torch threads
    (the small per-step operations of one member cannot keep several cores busy; see :func:`_parallel_members`).
    """
    seeds = [seed + 1000 * m for m in range(n_models)]
    val_masks = [validation_mask(data, val_fraction, np.random.default_rng(s)) for s in seeds]
    desc = prefix.rstrip("_") or "train"

    def one(m: int, cancel: threading.Event | None = None):
        name = f"{prefix}member_{m}" if prefix else f"member_{m}"
        return fit_member(
            config,
            data,
            val_mask=val_masks[m],
            settings=settings,
            seed=seeds[m],
            checkpoint=None if ckdir is None else ckdir / f"{name}.pt",
            resume=resume,
            desc=f"{desc}[{m + 1}/{n_models}]" if n_models > 1 else desc,
            init=init,
            cancel=cancel,
        )

    if settings.device == "cpu":
        results = _run_members(one, n_models, _parallel_members(config, settings, n_models))
    else:
        results = [one(m) for m in range(n_models)]
    members, histories, best_epochs = (list(x) for x in zip(*results, strict=True))
    return members, histories, best_epochs, [int(v.sum()) for v in val_masks]


def _parallel_members(config, settings: FitSettings, n_models: int) -> int:
    """How many members to train at once on the CPU: in parallel only when training draws no torch random numbers.

    Threads share torch's global random generator, so a model with dropout trains its members one after the other
    (its results would otherwise depend on thread timing).
    """
    if settings.n_jobs <= 1 or n_models <= 1 or getattr(config, "dropout", 0.0) > 0:
        return 1
    return min(settings.n_jobs, n_models)


def _member_thread(n_threads: int) -> None:
    """Set up a CPU training thread: its share of the torch threads, and denormal floats flushed to zero.

    Adam's second moments of weights that barely move decay into denormal floats, on which the CPU's arithmetic is up
    to 100x slower (measured: 3x slower training). Flushing them to zero changes nothing at float32 precision. The
    setting is per thread (and inherited by the threads it starts), so it stays out of the caller's thread.
    """
    import torch

    torch.set_num_threads(n_threads)
    torch.set_flush_denormal(True)


def _run_members(one, n_models: int, n_jobs: int) -> list:
    """Run ``one(m, cancel)`` for every member in ``n_jobs`` threads; Ctrl-C stops them all (checkpoints saved).

    With ``n_jobs=1`` the members train one after the other, still in a thread of their own (see
    :func:`_member_thread`).
    """
    import concurrent.futures as cf

    import torch

    cancel = threading.Event()
    with cf.ThreadPoolExecutor(
        max_workers=n_jobs,
        thread_name_prefix="scellst-member",
        initializer=_member_thread,
        initargs=(max(1, torch.get_num_threads() // n_jobs),),
    ) as pool:
        futures = [pool.submit(one, m, cancel) for m in range(n_models)]
        try:
            pending = set(futures)
            while pending:  # a timed wait lets the main thread see Ctrl-C
                done, pending = cf.wait(pending, timeout=0.5, return_when=cf.FIRST_EXCEPTION)
                if any(f.exception() is not None for f in done):
                    break
        except KeyboardInterrupt:
            cancel.set()
            cf.wait(futures)
            raise
        cancel.set()  # a failed member stops the others
        cf.wait(futures)
        errors = [f.exception() for f in futures if f.exception() is not None]
        real = [e for e in errors if not isinstance(e, KeyboardInterrupt)]
        if errors:
            raise (real or errors)[0]
        return [f.result() for f in futures]


def _model_spec(model: str, loss: str):
    """The registered model, checked to train with ``loss``."""
    from ..models._registry import get_model

    spec = get_model(model)
    if spec.losses is not None and loss not in spec.losses:
        raise ValueError(f"{model!r} trains with the loss {' or '.join(map(repr, spec.losses))} only, got {loss!r}.")
    return spec


def fit_slides(
    slides: Sequence[Slide],
    genes: Sequence[str],
    *,
    model: str = "scellst",
    model_params: dict[str, Any] | None = None,
    reference: AnnData | None = None,
    groupby: str | None = None,
    loss: str = "mse",
    nb_parametrization: str = "mean",
    hidden: Sequence[int] = (256, 256, 256),
    dropout: float = 0.0,
    n_models: int | None = None,
    val_fraction: float = 0.15,
    embedding_scaling: str = DEFAULT_SCALING,
    seed: int = 0,
    settings: FitSettings | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    extra_params: dict[str, Any] | None = None,
) -> ScellstModel:
    """Fit a model of the registry (an ensemble by default) on slides made by :func:`scellst.tl.prepare_slide`.

    The training step of :func:`scellst.tl.train` without its input checks and gene selection, public for
    benchmarks that prepare slides once and fit many models.

    Parameters
    ----------
    slides
        Prepared slides, embedded the same way.
    genes
        The genes to learn (e.g. from :func:`scellst.pp.select_genes`).
    model, model_params, reference, groupby, loss, nb_parametrization, hidden, dropout, n_models, val_fraction
        As in :func:`scellst.tl.train`.
    embedding_scaling, seed, checkpoint_dir, resume
        As in :func:`scellst.tl.train`.
    settings
        The optimisation settings (default :class:`scellst.tl.FitSettings`).
    extra_params
        Recorded in ``model.params``.

    Returns
    -------
    The fitted :class:`scellst.models.ScellstModel`.
    """
    from .. import __version__
    from ..models import MILConfig, ScellstModel
    from ._models import default_n_models, model_options

    settings = settings or FitSettings()
    opts = model_options(model, model_params)
    n_models = default_n_models(model) if n_models is None else n_models
    feature_names = slides[0].feature_names
    for s in slides[1:]:
        if s.feature_names != feature_names:
            raise ValueError("The slides' embedding tables have different features; embed them the same way.")
    methods = {s.embedding_method for s in slides}
    if len(methods) > 1:
        raise ValueError(f"The slides were embedded with different methods: {sorted(methods)}.")
    if n_models < 1:
        raise ValueError("`n_models` must be at least 1.")
    spec = _model_spec(model, loss)
    data = build_training_data(slides, genes, embedding_scaling)
    if settings.patience is None:
        n_train = int(round(len(data.bags) * (1 - val_fraction)))
        settings = replace(settings, patience=resolve_patience(None, n_train, settings.batch_size, loss))
        if settings.patience < PATIENCE_EPOCHS:
            logger.info(
                f"{n_train:,} training spots ({-(-n_train // settings.batch_size):,} steps per epoch): early stopping "
                f"after {settings.patience} epochs without a gain instead of {PATIENCE_EPOCHS} (set `patience` to "
                "choose)."
            )
    else:
        resolve_patience(settings.patience, 0, 1)  # checks the value
    gene_scale = data.slide_scale.mean(axis=0).astype(np.float32)
    config = MILConfig(
        n_features=len(feature_names),
        n_genes=len(genes),
        hidden=tuple(hidden),
        dropout=dropout,
        loss=loss,
        nb_parametrization=nb_parametrization,
        architecture=spec.architecture or model,
        options={k: v for k, v in opts.items() if _plain(v)},  # the network reads its declared options here
    )
    init = None
    prepare, teacher = spec.hook("prepare"), spec.hook("teacher")
    if prepare is not None:
        config, init = prepare(config, data, genes=genes, reference=reference, groupby=groupby, opts=opts)
    ckdir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckdir is not None:
        ckdir.mkdir(parents=True, exist_ok=True)
        run = {"genes": list(genes), "loss": loss, "n_features": len(feature_names), "seed": seed, "model": model}
        run_file = ckdir / "run.json"
        if resume and run_file.exists() and json.loads(run_file.read_text()) != run:
            raise ValueError(
                f"The checkpoints in {str(ckdir)!r} belong to another training run (genes, loss, model or seed "
                "differ); use another `checkpoint_dir` or `resume=False`."
            )
        run_file.write_text(json.dumps(run))
    logger.info(
        f"Training {model} ({loss}) on {len(slides)} slide(s): {len(data.bags):,} spots, "
        f"{sum(len(b) for b in data.bags):,} cells in spots, {len(genes)} genes, {len(feature_names)} features"
        + (f", {n_models} ensemble members" if n_models > 1 else "")
    )

    def members_fn(cfg, d, st, prefix):
        return _fit_members(
            cfg,
            d,
            st,
            n_models=n_models,
            val_fraction=val_fraction,
            seed=seed,
            ckdir=ckdir,
            resume=resume,
            prefix=prefix,
        )

    extras: dict[str, Any] = {}
    if teacher is not None:
        extras, data = teacher(config, data, members_fn=members_fn, opts=opts, settings=settings)
    members, histories, best_epochs, n_val = _fit_members(
        config,
        data,
        settings,
        n_models=n_models,
        val_fraction=val_fraction,
        seed=seed,
        ckdir=ckdir,
        resume=resume,
        prefix="student_" if teacher is not None else "",
        init=init,
    )
    params = {
        "model": model,
        "model_params": {k: v for k, v in opts.items() if k != "layer"},
        "loss": loss,
        "nb_parametrization": nb_parametrization,
        "lr": settings.lr,
        "weight_decay": settings.weight_decay,
        "batch_size": settings.batch_size,
        "max_epochs": settings.max_epochs,
        "patience": settings.patience,
        "val_fraction": val_fraction,
        "seed": seed,
        "n_models": n_models,
        "best_epoch": best_epochs[0],
        "best_epochs": best_epochs,
        "n_slides": len(slides),
        "slides": [s.name for s in slides],
        "n_train_spots": len(data.bags) - n_val[0],
        "n_val_spots": n_val[0],
        "median_cells_per_spot": float(np.median([len(b) for b in data.bags])),
        "target": "log1p(counts per 1e4) / per-slide robust scale" if loss in ("mse", "cosine") else "raw counts",
    }
    if spec.target is not None:
        params["target"] = spec.target
    if spec.needs_reference:
        params["reference_groupby"] = groupby
    params.update(extra_params or {})
    return ScellstModel(
        config=config,
        genes=list(genes),
        feature_names=list(feature_names),
        embedding_method=next(iter(methods)),
        embedding_scaling=embedding_scaling,
        feature_mean=data.feature_mean,
        feature_std=data.feature_std,
        gene_scale=gene_scale,
        members=members,
        history=histories,
        params=params,
        version=__version__,
        model=model,
        extras=extras,
    )


def train(
    sdata: SpatialData | Sequence[SpatialData],
    *,
    model: str = "scellst",
    model_params: dict[str, Any] | None = None,
    reference: AnnData | None = None,
    groupby: str | None = None,
    genes: Sequence[str] | None = None,
    flavor: Literal["hvg", "svg", "rmax"] = "hvg",
    n_top_genes: int = 50,
    loss: Literal["mse", "nb", "poisson", "cosine"] = "mse",
    nb_parametrization: Literal["mean", "total_count"] = "mean",
    n_models: int | None = None,
    shapes_key: str = Key.NUCLEI,
    table_key: str | None = None,
    spots_key: str = Key.SPOTS,
    spot_table_key: str = Key.SPOTS_COUNTS,
    min_gene_counts: int = 200,
    min_spot_fraction: float = 0.1,
    exclude_mt: bool = False,
    min_spot_counts: float = 20,
    hidden: Sequence[int] = (256, 256, 256),
    dropout: float = 0.0,
    lr: float | None = None,
    weight_decay: float = 1e-4,
    batch_size: int | None = None,
    max_epochs: int = 1000,
    patience: int | None = None,
    val_fraction: float = 0.15,
    embedding_scaling: Literal["quantile", "slide", "global"] = DEFAULT_SCALING,
    seed: int = 0,
    device: str = "auto",
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    n_jobs: int | None = None,
    show_progress_bar: bool = True,
) -> ScellstModel:
    """Train a model of single-cell expression from spots: by default sCellST's multiple-instance learner.

    sCellST: each spot is a bag of cells, a per-cell MLP predicts expression, and the cell predictions of a spot are
    averaged and fitted to the spot's measured expression. Other models of the registry (``model=``, see
    :func:`scellst.models.available_models` and the models page of the docs) are trained through the same call
    and predict the same cell table: ``"cpnn"`` (reference cell-type prototypes), ``"deepspot2cell"`` (the cell
    with its spot and neighbouring spots) and ``"miso"`` (spot attention distilled into a cell model). Validation spots are
    whole spatial blocks of each slide, so early stopping is not fooled by neighbouring spots; training stops when
    the validation loss has not improved for ``patience`` epochs (``max_epochs`` is only a safety cap), and the best
    epoch's weights are kept. The output layer starts at the mean target, so no epochs are spent fitting an offset.

    Parameters
    ----------
    sdata
        One SpatialData, or a list for multi-slide training. Each needs nucleus shapes assigned to spots
        (:func:`scellst.pp.assign_cells`), an embedding table (:func:`scellst.im.embed_cells`) and a spot count table.
    model
        ``"scellst"`` (default), ``"cpnn"``, ``"deepspot2cell"`` or ``"miso"``.
    model_params
        Options of the model: ``deepspot2cell``: ``k_neighbors`` (neighbouring spots, default 7 = a Visium ring),
        ``ensemble`` (``"median"``/``"mean"``); ``miso``: ``k_neighbors`` (default 36), ``n_heads`` (4),
        ``teacher_lr`` (1e-3), ``teacher_patience`` (100 epochs); ``cpnn``: ``layer`` (reference counts layer).
    reference, groupby
        For ``"cpnn"``: an annotated single-cell reference (raw counts in ``layers['counts']`` or ``X``) and its
        cell-type column. With ``genes=None`` the genes are selected among those the reference measures.
    genes
        Genes to learn. ``None`` selects ``n_top_genes`` genes with :func:`scellst.pp.select_genes` (``flavor``)
        on the training slides, after the gene filters.
    flavor
        Gene selection flavor when ``genes`` is ``None``: ``"hvg"``, ``"svg"`` or ``"rmax"``.
    n_top_genes
        Number of genes selected when ``genes`` is ``None``.
    loss
        ``"mse"`` on log-normalised values scaled per gene and slide (robust scale; inverted at prediction),
        ``"nb"`` negative binomial on raw counts (learned per-gene dispersion, spot library size as size factor),
        ``"poisson"``, or ``"cosine"`` (MISO's per-slide cosine, one batch per slide). See
        :mod:`scellst.models._losses` for when to use each.
    nb_parametrization
        ``"mean"`` (mean and dispersion) or ``"total_count"`` (torch's total count and logits) for ``loss="nb"``.
    n_models
        Ensemble size: members use different seeds and validation blocks; predictions are their mean (median for
        DeepSpot2Cell) and the per-cell spread is stored by :func:`predict`. ``None``: 5 for sCellST, 3 for
        DeepSpot2Cell, else 1. Training time grows with the members; on a large slide on the CPU, ``n_models=2``
        keeps most of the ensemble's gain over one network in 40 % of the time (see the learner docs page).
    shapes_key, table_key, spots_key, spot_table_key
        Element names: nucleus shapes, embedding table (default ``f"{shapes_key}_embeddings"``), spot shapes and
        spot count table.
    min_gene_counts, min_spot_fraction, exclude_mt
        Gene filters applied before the automatic selection (paper: >= 200 counts, detected in >= 10 % of spots).
    min_spot_counts
        Spots with fewer counts (or without nuclei) are dropped (paper: 20).
    hidden, dropout
        Hidden layer widths (paper: three of 256) and dropout.
    lr, weight_decay
        AdamW learning rate (``None``: 1e-3 for CPNN, 1e-4 for the others; ten times more on small bags, see
        ``batch_size``) and weight decay.
    batch_size
        Spots (bags) per optimisation step (ignored by ``"cosine"``, which uses one slide per step). ``None``: 8
        (the paper's), or 256 when the median spot holds at most four cells (Visium HD bins, cells made of bins; with
        overlap bags, the cells' shares are summed), where batches of 8 would carry too few cells.
    max_epochs, patience
        Safety cap on epochs, and epochs without a validation improvement before stopping. ``patience=None``: 30
        epochs, or fewer on large data so that training waits about 8,000 optimisation steps (at least 10 epochs;
        see :func:`scellst.tl.resolve_patience`). Up to about 2,100 training spots this is 30 epochs.
    val_fraction
        Fraction of each slide's spots held out for validation, as spatial blocks (``0`` disables early stopping).
    embedding_scaling
        How cell features are put on a common scale, the same way on training slides and on new slides at
        prediction: ``"quantile"`` (default) maps each feature through the slide's own quantiles to a normal score
        (removes any monotone difference between slides: stain strength, scanner colour response); ``"slide"``
        z-scores each feature per slide (removes shifts and scalings only); ``"global"`` uses the statistics of the
        training cells.
    seed
        Random seed (weights, batches, validation blocks); the same seed and data give the same model.
    device
        ``"auto"`` (a CUDA GPU when torch sees one, else the CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
    checkpoint_dir
        Folder for per-member checkpoints (written every 10 epochs, on interruption and at the end).
    resume
        Continue from the checkpoints in ``checkpoint_dir``.
    n_jobs
        Ensemble members trained at the same time on the CPU (threads sharing the torch threads). ``None``: as many
        as there are CPU cores available, at most ``n_models``; ``1``: one after the other. Each member's result does
        not depend on the others, but the torch thread count per member (cores // n_jobs) can change the last digits.
        Models with dropout, and GPU training, always train members one after the other.
    show_progress_bar
        Show a progress bar over epochs.

    Returns
    -------
    The fitted :class:`scellst.models.ScellstModel` (``model.model`` names the model, ``model.history`` holds the
    loss curves of each member, ``model.params`` the settings and the filters applied).
    """
    spec = _check_train_arguments(model, model_params, loss, embedding_scaling, val_fraction)
    slides = prepared_slides(
        sdata,
        shapes_key=shapes_key,
        table_key=table_key,
        spots_key=spots_key,
        spot_table_key=spot_table_key,
        min_spot_counts=min_spot_counts,
    )
    selected = _training_genes(
        slides,
        reference if spec.needs_reference else None,
        genes=genes,
        flavor=flavor,
        n_top_genes=n_top_genes,
        min_gene_counts=min_gene_counts,
        min_spot_fraction=min_spot_fraction,
        exclude_mt=exclude_mt,
    )
    lr, batch_size = _small_bag_settings(slides, model, lr, batch_size)
    settings = FitSettings(
        lr=lr,
        weight_decay=weight_decay,
        batch_size=batch_size,
        max_epochs=max_epochs,
        patience=patience,
        device=str(resolve_device(device)),
        show_progress_bar=show_progress_bar,
        n_jobs=available_cores() if n_jobs is None else n_jobs,
    )
    filters = {
        "gene_selection": "user list" if genes is not None else flavor,
        "min_gene_counts": min_gene_counts,
        "min_spot_fraction": min_spot_fraction,
        "exclude_mt": exclude_mt,
        "min_spot_counts": min_spot_counts,
    }
    return fit_slides(
        slides,
        selected,
        model=model,
        model_params=model_params,
        reference=reference,
        groupby=groupby,
        loss=loss,
        nb_parametrization=nb_parametrization,
        hidden=hidden,
        dropout=dropout,
        n_models=n_models,
        val_fraction=val_fraction,
        embedding_scaling=embedding_scaling,
        seed=seed,
        settings=settings,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        extra_params=filters,
    )


def _check_train_arguments(model: str, model_params, loss: str, embedding_scaling: str, val_fraction: float):
    """Fail fast on an unknown model, option, loss or scaling, before any data is read; the model's declaration."""
    from ..models import LOSSES
    from ..models._mil import EMBEDDING_SCALINGS
    from ._models import model_options

    model_options(model, model_params)
    if loss not in LOSSES:
        raise ValueError(f"Unknown loss {loss!r}; choose one of {LOSSES}.")
    if embedding_scaling not in EMBEDDING_SCALINGS:
        raise ValueError(f"`embedding_scaling` must be one of {EMBEDDING_SCALINGS}, got {embedding_scaling!r}.")
    if not 0 <= val_fraction < 0.9:
        raise ValueError("`val_fraction` must be in [0, 0.9).")
    return _model_spec(model, loss)


def prepared_slides(sdata, *, shapes_key, table_key, spots_key, spot_table_key, min_spot_counts) -> list[Slide]:
    """:func:`prepare_slide` on every SpatialData, with a clear error when too few spots can train."""
    sdatas = as_list(sdata)
    if not sdatas:
        raise ValueError("No SpatialData given.")
    slides = [
        prepare_slide(
            s,
            name=f"slide_{i}",
            shapes_key=shapes_key,
            table_key=table_key,
            spots_key=spots_key,
            spot_table_key=spot_table_key,
            min_spot_counts=min_spot_counts,
        )
        for i, s in enumerate(sdatas)
    ]
    n_spots = sum(len(s.bags) for s in slides)
    if n_spots < MIN_TRAINING_SPOTS:
        raise ValueError(
            f"Only {n_spots} spot(s) with nuclei and >= {min_spot_counts:g} counts over {len(slides)} slide(s); at least "
            f"{MIN_TRAINING_SPOTS} are needed to train. Check that the spots and nuclei are in the same frame (spot "
            "positions in full-resolution pixels of the H&E), that `assign_cells` ran, and `min_spot_counts`."
        )
    return slides


def _training_genes(
    slides, reference, *, genes, flavor, n_top_genes, min_gene_counts, min_spot_fraction, exclude_mt
) -> list[str]:
    """The genes to learn: the user's list, or the top genes of ``flavor`` (among a reference's genes when given)."""
    from ._models import reference_genes

    shared = reference_genes(reference) if genes is None else None
    return rank_genes(
        [s.counts if shared is None else s.counts[:, s.counts.var_names.isin(shared)] for s in slides],
        [s.spot_xy for s in slides],
        flavor=list(genes) if genes is not None else flavor,
        n_genes=n_top_genes,
        min_counts=min_gene_counts,
        min_spot_fraction=min_spot_fraction,
        exclude_mt=exclude_mt,
    )


def load_model(path: str | Path) -> ScellstModel:
    """Load a model saved with ``model.save(path)``."""
    from ..models import ScellstModel

    return ScellstModel.load(path)


def _bags_from_obs(spot_of: pd.Series) -> tuple[list[str], list[np.ndarray]]:
    values = spot_of.astype(object).to_numpy()
    ok = pd.notna(values)
    groups = pd.Series(np.flatnonzero(ok)).groupby(pd.Series(values[ok]).astype(str).to_numpy())
    ids = [str(k) for k, _ in groups]
    return ids, [v.to_numpy() for _, v in groups]


def _spot_context(sdata: SpatialData, emb: AnnData, shapes_key: str, spots_key: str | None):
    """The cells' spots and positions, with the spot centres moved into the cells' frame (for context models)."""
    from ..models import SpotContext

    cell_xy = np.asarray(emb.obsm["spatial"], dtype=float) if "spatial" in emb.obsm else None
    if Col.SPOT_ID not in emb.obs or spots_key is None or spots_key not in sdata.shapes:
        return SpotContext(cell_xy=cell_xy)
    ids, bags = _bags_from_obs(emb.obs[Col.SPOT_ID])
    if not ids:
        return SpotContext(cell_xy=cell_xy)
    spots = sdata.shapes[spots_key]
    centres = pd.DataFrame(shapes_centroids(spots), index=spots.index.astype(str)).reindex(ids).to_numpy()
    spot_xy = apply_affine(intrinsic_to_intrinsic(sdata, spots_key, shapes_key), centres)
    return SpotContext(bags=bags, spot_xy=spot_xy, cell_xy=cell_xy)


def predict(
    sdata: SpatialData,
    model: ScellstModel | str | Path,
    *,
    shapes_key: str = Key.NUCLEI,
    table_key: str | None = None,
    key_added: str | None = None,
    spots_key: str | None = Key.SPOTS,
    spots_key_added: str = Key.SPOTS_PREDICTED,
    batch_size: int = 65536,
    device: str = "auto",
    overwrite: bool = False,
) -> None:
    """Predict the expression of every cell and write it back as a table annotating the nucleus shapes.

    Works on any slide with nucleus shapes and an embedding table made the same way as the training slides,
    including H&E-only slides from :func:`scellst.io.from_image`. Cells go through the network in batches.

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
        Spot shapes; when the cells were assigned to spots, spot-level predictions are also written. ``None`` to
        skip.
    spots_key_added
        Name of the spot-level prediction table.
    batch_size
        Cells per forward pass.
    device
        ``"auto"`` (a CUDA GPU when torch sees one, else the CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
    overwrite
        Replace existing tables with the same names.

    Models that use a spot context (DeepSpot2Cell) take each cell's spot from ``obs['spot_id']`` and the spot
    shapes; cells outside spots take the nearest spot, and on slides without spots they are grouped into virtual
    spots by position. MISO's spot table comes from its spot-level attention model.

    Returns
    -------
    Nothing; adds ``sdata.tables[key_added]`` (cells x genes, log-normalised units; ``obs['cell_id']``,
    ``obs['spot_id']`` when assigned, ``obsm['spatial']`` centroids, ``layers['ensemble_std']`` for ensembles,
    for CPNN ``obsm['cell_type_weights']`` (cells x reference types) and ``obs['predicted_type']``,
    provenance in ``uns['scellst']``) and, when spots are available, ``sdata.tables[spots_key_added]`` (spots x genes,
    annotating the spot shapes: the mean of each spot's cells, or ``log1p`` of their mean rate for count losses).
    """
    import anndata as ad
    from spatialdata.models import TableModel

    from ..models import ScellstModel

    if isinstance(model, str | Path):
        model = ScellstModel.load(model)
    shapes_key = get_key(sdata, "shapes", shapes_key, what="nucleus shapes")
    emb_key = embedding_table_key(sdata, shapes_key, table_key)
    key_added = key_added or f"{shapes_key}{Key.EXPRESSION_SUFFIX}"
    check_writable(sdata, key_added, overwrite=overwrite)
    emb = sdata.tables[emb_key]
    method = emb.uns.get("scellst", {}).get("method", "unknown")
    model.check_compatible(list(emb.var_names), method)
    features = np.asarray(emb.X)
    context = _spot_context(sdata, emb, shapes_key, spots_key) if model.needs_context or model.teachers else None
    dev = resolve_device(device)
    stats = model.slide_stats(features)  # once for the cells, the cell types and the spots
    if model.n_models > 1:
        values, spread = model.predict_cells(
            features, context=context, batch_size=batch_size, return_std=True, device=dev, stats=stats
        )
    else:
        values = model.predict_cells(features, context=context, batch_size=batch_size, device=dev, stats=stats)
        spread = None

    obs = emb.obs[[c for c in (Col.CELL_ID, Col.SPOT_ID) if c in emb.obs]].copy()
    obs[Col.REGION] = pd.Categorical([shapes_key] * emb.n_obs)
    table = ad.AnnData(X=values, obs=obs, var=pd.DataFrame(index=model.genes))
    if spread is not None:
        table.layers["ensemble_std"] = spread
    if model.cell_types:  # CPNN: the per-cell composition over the reference types
        weights = model.predict_type_weights(features, batch_size=batch_size, stats=stats)
        table.obsm["cell_type_weights"] = pd.DataFrame(weights, index=table.obs_names, columns=model.cell_types)
        table.obs[Col.PREDICTED_TYPE] = pd.Categorical(
            np.asarray(model.cell_types)[weights.argmax(axis=1)], categories=model.cell_types
        )
    table.obsm["spatial"] = np.asarray(emb.obsm["spatial"])
    table.uns[Attr.ROOT] = provenance(
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
        ids, bags = _bags_from_obs(obs[Col.SPOT_ID])
        if ids:
            spot_xy = context.spot_xy if context is not None else None
            spot_values = model.predict_spots(features, bags, spot_xy=spot_xy, stats=stats)
            sobs = pd.DataFrame(
                {
                    Col.SPOT_ID: ids,
                    Col.REGION: pd.Categorical([spots_key] * len(ids)),
                    Col.N_CELLS: [len(b) for b in bags],
                },
                index=pd.Index(ids),
            )
            spot_adata = ad.AnnData(X=spot_values.astype(np.float32), obs=sobs, var=pd.DataFrame(index=model.genes))
            spot_adata.uns[Attr.ROOT] = provenance({}, function="predict", units="log1p(counts / total * 1e4)")
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
