"""Self-supervised training of a cell-crop encoder (MoCo v3) and batched encoder inference."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._constants import Key
from .._device import resolve_device
from .._logging import logger
from ._crops import CellCrops, StainNormalizer, StainNormMode, cell_crops

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from ..models._encoders import CellEncoder


def train_ssl(
    sdata: SpatialData | Sequence[SpatialData],
    shapes_key: str = Key.NUCLEI,
    *,
    path: str | Path,
    image_key: str | None = None,
    arch: str = "resnet_tiny",
    epochs: int = 20,
    batch_size: int = 256,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    temperature: float = 0.2,
    momentum: float = 0.99,
    crop_um: float = 12.0,
    crop_px: int = 48,
    stain_norm: StainNormMode = "slide",
    max_cells: int | None = None,
    cache_dir: str | Path | None = None,
    resume: bool = False,
    seed: int = 0,
    device: str = "auto",
    show_progress_bar: bool = True,
) -> CellEncoder:
    """Train a cell-crop encoder by self-supervision (MoCo v3) on the slides' own nuclei, and save it to ``path``.

    Crops of ``crop_um * 1.5`` microns around every nucleus are cut once per slide (tile by tile, into
    memory-mapped files under ``cache_dir``), normalised per slide (``stain_norm``), and two augmented views of each
    cell (rotation, flips, resized crop, H&E stain jitter, brightness/contrast/saturation, blur, random erasing) are
    pulled together by the symmetric MoCo v3 contrastive loss against a momentum encoder. A checkpoint
    (``f"{path}.ckpt"``) is written after every epoch and on interruption; ``resume=True`` continues from it.

    Parameters
    ----------
    sdata
        One SpatialData object or a list of them (one per slide), each with nucleus shapes.
    shapes_key
        The nucleus shapes in every object.
    path
        Where to write the trained encoder (load with :func:`scellst.models.CellEncoder.load`, or pass the path to
        ``scellst.im.embed_cells(..., method="ssl", encoder=path)``).
    image_key
        The H&E image; ``None`` uses the image the shapes came from, or the only image.
    arch
        Backbone: ``"resnet_tiny"`` (CPU default), ``"resnet_small"``, ``"resnet18"``, ``"resnet34"``,
        ``"resnet50"`` (GPU).
    epochs
        Passes over the cells.
    batch_size
        Cells per step (the contrastive negatives); larger is better when memory allows.
    lr
        Peak AdamW learning rate (linear warm-up over the first epoch, then cosine decay).
    weight_decay
        AdamW weight decay.
    temperature
        Softmax temperature of the contrastive loss.
    momentum
        Initial momentum of the key encoder, raised to 1 by a cosine schedule.
    crop_um
        Side of the encoder's view in microns (the paper: 12).
    crop_px
        Side of the encoder's view in pixels (the paper: 48).
    stain_norm
        Per-slide colour normalisation: ``"slide"`` (channel statistics of the slide, the paper), ``"macenko"``,
        ``"imagenet"`` or ``"none"``.
    max_cells
        Train on a random subset of this many cells (spread over the slides); ``None`` uses every cell.
    cache_dir
        Folder for the crop files (``None``: a temporary folder removed at the end). A file is reused only for the
        same cells, positions, crop geometry and image (its name is a hash of them).
    resume
        Continue from the checkpoint next to ``path``.
    seed
        Random seed (cell order, augmentations, initialisation).
    device
        ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    show_progress_bar
        Show progress bars.

    Returns
    -------
    The trained :class:`scellst.models.CellEncoder`, also written to ``path``; its ``history['loss']`` holds the
    mean loss per epoch.
    """
    import torch

    from ..models._encoders import CellEncoder, EncoderConfig, build_resnet
    from ..models._ssl import AugmentConfig, build_moco

    sdatas = [sdata] if not isinstance(sdata, Sequence) else list(sdata)
    if not sdatas:
        raise ValueError("Pass at least one SpatialData object.")
    if epochs < 1 or batch_size < 8:
        raise ValueError(f"`epochs` must be >= 1 and `batch_size` >= 8, got {epochs} and {batch_size}.")
    path = Path(path)
    ckpt = path.with_name(path.name + ".ckpt")
    if ckpt.exists() and not resume:
        raise ValueError(
            f"A checkpoint {str(ckpt)!r} exists from an earlier run. Pass `resume=True` to continue it, or delete it "
            "to start again."
        )
    dev = resolve_device(device)
    context = 1.5
    crops = [
        cell_crops(s, shapes_key, image_key=image_key, crop_um=crop_um, crop_px=crop_px, context=context)
        for s in sdatas
    ]
    rng = np.random.default_rng(seed)
    subsets = _subsample([len(c) for c in crops], max_cells, rng)
    n_total = sum(len(s) for s in subsets)
    if n_total < 16:
        raise ValueError(f"Only {n_total} cells to train on; self-supervision needs at least a few hundred.")
    batch_size = min(batch_size, n_total)
    tmp = tempfile.TemporaryDirectory(prefix="scellst_ssl_") if cache_dir is None else None
    folder = Path(tmp.name if tmp is not None else cache_dir)
    try:
        arrays, norms = [], []
        for i, (c, sub) in enumerate(zip(crops, subsets, strict=True)):
            arrays.append(_cached_crops(c, sub, folder / f"slide{i}_{_fingerprint(c, sub)}.npy", show_progress_bar))
            norms.append(_fit_normalizer(arrays[-1], stain_norm, context))
        slide_of = np.concatenate([np.full(len(s), i) for i, s in enumerate(subsets)])
        row_of = np.concatenate([np.arange(len(s)) for s in subsets])

        torch.manual_seed(seed)
        backbone = build_resnet(arch)
        model = build_moco(backbone, feature_dim=backbone.feature_dim).to(dev)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        aug = AugmentConfig(out_px=crop_px, view_fraction=1.0 / context)
        steps_per_epoch = max(n_total // batch_size, 1)
        total = epochs * steps_per_epoch
        history, start_epoch = (
            _resume(ckpt, model, opt, n_total, arch) if resume and ckpt.exists() else ({"loss": [], "seconds": []}, 0)
        )
        gen = torch.Generator(device=dev)
        logger.info(
            f"MoCo v3 on {n_total:,} cells from {len(sdatas)} slide(s): {arch}, {epochs} epochs x {steps_per_epoch} "
            f"steps of {batch_size}, on {dev}"
        )
        model.train()
        epoch = start_epoch
        run = {"n_cells": n_total, "arch": arch}
        try:
            for epoch in range(start_epoch, epochs):
                gen.manual_seed(seed * 100_003 + epoch)
                order = np.random.default_rng([seed, epoch]).permutation(n_total)
                t0 = time.perf_counter()
                batches = [order[step * batch_size : (step + 1) * batch_size] for step in range(steps_per_epoch)]
                losses = _moco_epoch(
                    model,
                    opt,
                    batches,
                    lambda b: _load_batch(b, slide_of, row_of, arrays, norms, dev),
                    aug,
                    gen,
                    first_step=epoch * steps_per_epoch,
                    total=total,
                    lr=lr,
                    momentum=momentum,
                    temperature=temperature,
                    desc=f"SSL epoch {epoch + 1}/{epochs}",
                    show_progress_bar=show_progress_bar,
                )
                history["loss"].append(float(np.mean(losses)))
                history["seconds"].append(time.perf_counter() - t0)
                logger.info(f"SSL epoch {epoch + 1}: loss {history['loss'][-1]:.4f} ({history['seconds'][-1]:.0f} s)")
                _save_checkpoint(ckpt, model, opt, history, epoch + 1, run)
        except KeyboardInterrupt:
            _save_checkpoint(ckpt, model, opt, history, epoch, run)
            logger.warning(f"Interrupted; checkpoint written to {ckpt}. Continue with `resume=True`.")
            raise
    finally:
        if tmp is not None:
            tmp.cleanup()
    config = EncoderConfig(
        arch=arch,
        crop_um=crop_um,
        crop_px=crop_px,
        stain_norm=stain_norm,
        feature_dim=backbone.feature_dim,
        source="ssl",
        extra={"epochs": epochs, "n_cells": n_total, "batch_size": batch_size, "temperature": temperature},
    )
    encoder = CellEncoder(config, model.backbone.cpu(), history=history)
    encoder.save(path)
    logger.info(f"Saved the self-supervised encoder to {path}")
    return encoder


def _resume(ckpt: Path, model, opt, n_total: int, arch: str) -> tuple[dict, int]:
    """Load a checkpoint of the same run into ``model`` and ``opt``; its history and the epoch to continue from."""
    from ..models._io import load_payload

    state = load_payload(ckpt, what="SSL checkpoint")  # plain data: no code runs on load
    if state["n_cells"] != n_total or state["arch"] != arch:
        raise ValueError(f"The checkpoint {str(ckpt)!r} belongs to another run (cells or architecture differ).")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    logger.info(f"Resumed self-supervised training from {ckpt} at epoch {state['epoch']}")
    return state["history"], state["epoch"]


def _save_checkpoint(ckpt: Path, model, opt, history: dict, epoch: int, run: dict) -> None:
    """Write the training state atomically (a temporary file, then a rename)."""
    import torch

    tmp_ck = ckpt.with_suffix(".tmp")
    torch.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "history": history, "epoch": epoch, **run}, tmp_ck
    )
    tmp_ck.replace(ckpt)


def _moco_epoch(
    model, opt, batches, load, aug, gen, *, first_step, total, lr, momentum, temperature, desc, show_progress_bar
) -> list[float]:
    """One epoch of MoCo v3: two augmented views per cell, the symmetric contrastive loss, the momentum update."""
    from tqdm.auto import tqdm

    from ..models._ssl import augment, lr_at, momentum_at

    losses: list[float] = []
    bar = tqdm(batches, desc=desc, disable=not show_progress_bar)
    for step, batch in enumerate(bar):
        g = first_step + step
        for group in opt.param_groups:
            group["lr"] = lr_at(g, total, lr, warmup=len(batches))
        x, mean, std = load(batch)
        v1 = (augment(x, aug, gen) - mean) / std
        v2 = (augment(x, aug, gen) - mean) / std
        loss = model(v1, v2, temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.update_momentum(momentum_at(g, total, momentum))
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    return losses


def _subsample(sizes: list[int], max_cells: int | None, rng: np.random.Generator) -> list[np.ndarray]:
    total = sum(sizes)
    if max_cells is None or max_cells >= total:
        return [np.arange(n) for n in sizes]
    return [np.sort(rng.choice(n, size=max(1, round(max_cells * n / total)), replace=False)) for n in sizes]


def _fingerprint(crops: CellCrops, subset: np.ndarray) -> str:
    """A short hash of the cells, their positions and the crop geometry: a cached crop file is reused only for them."""
    import hashlib

    h = hashlib.sha1()
    h.update(np.asarray(crops.ids).astype(str).astype("U").tobytes())
    h.update(np.ascontiguousarray(crops.centres_yx, dtype=np.float64).tobytes())
    h.update(np.asarray(subset, dtype=np.int64).tobytes())
    h.update(f"{crops.side_px:.6f}-{crops.out_px}-{crops.slide}-{crops.image.shape}".encode())
    return h.hexdigest()[:16]


def _cached_crops(crops: CellCrops, subset: np.ndarray, file: Path, show_progress_bar: bool) -> np.ndarray:
    shape = (len(subset), 3, crops.out_px, crops.out_px)
    if file.exists():
        arr = np.load(file, mmap_mode="r")
        if arr.shape == shape:
            return arr
    file.parent.mkdir(parents=True, exist_ok=True)
    out = np.lib.format.open_memmap(file, mode="w+", dtype=np.uint8, shape=shape)
    pos = {int(v): i for i, v in enumerate(subset)}
    for idx, block in crops.iter_tiles(subset, show_progress_bar=show_progress_bar, desc=f"crops {crops.slide}"):
        out[[pos[int(v)] for v in idx]] = block
    out.flush()
    return np.load(file, mmap_mode="r")


def _fit_normalizer(arr: np.ndarray, mode: str, context: float) -> StainNormalizer:
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(len(arr), size=min(len(arr), 5000), replace=False))
    sample = np.asarray(arr[idx])
    size = sample.shape[-1]
    side = int(round(size / context))
    o = (size - side) // 2
    return StainNormalizer.fit(np.ascontiguousarray(sample[..., o : o + side, o : o + side]), mode)


def _load_batch(batch, slide_of, row_of, arrays, norms, dev):
    import torch

    n = len(batch)
    size = arrays[0].shape[-1]
    x = np.empty((n, 3, size, size), dtype=np.uint8)
    mean = np.empty((n, 3), dtype=np.float32)
    std = np.empty((n, 3), dtype=np.float32)
    slides = slide_of[batch]
    for s in np.unique(slides):
        where = np.flatnonzero(slides == s)
        rows = row_of[batch[where]]
        order = np.argsort(rows)
        block = np.asarray(arrays[s][rows[order]])
        if norms[s].mode == "macenko":
            block = norms[s].apply_macenko(block)
        x[where[order]] = block
        mean[where], std[where] = norms[s].mean, norms[s].std
    xt = torch.from_numpy(x).to(dev).float() / 255.0
    return xt, torch.from_numpy(mean).to(dev)[:, :, None, None], torch.from_numpy(std).to(dev)[:, :, None, None]


def resolve_encoder(method: str, encoder: Any, *, seed: int = 0) -> CellEncoder:
    """The :class:`CellEncoder` for an ``embed_cells`` method."""
    from ..models import _encoders as enc

    if isinstance(encoder, enc.CellEncoder):
        return encoder
    if method == "ssl":
        if encoder is None:
            raise ValueError(
                "`method='ssl'` needs `encoder=`: the file written by `scellst.im.train_ssl` (or its return value)."
            )
        return enc.CellEncoder.load(encoder)
    if method == "random":
        return enc.random_encoder(encoder if isinstance(encoder, str) else "resnet_tiny", seed=seed)
    if method == "efficientnet-lite0":
        return enc.efficientnet_lite0()
    if method == "encoder":
        if encoder is None:
            raise ValueError("`method='encoder'` needs `encoder=`: a torch module or a local weights file.")
        if isinstance(encoder, str | Path):
            return enc.encoder_from_weights(encoder)
        return enc.encoder_from_module(encoder)
    raise ValueError(
        f"Unknown embedding method {method!r}; available: 'morphology', 'ssl', 'encoder', 'efficientnet-lite0', "
        "'random'."
    )


def encode_crops(
    encoder: CellEncoder,
    crops: CellCrops,
    *,
    batch_size: int = 512,
    device: str = "auto",
    show_progress_bar: bool = True,
) -> tuple[np.ndarray, StainNormalizer]:
    """Features ``(n_cells, d)`` of every crop, tile by tile, with the slide's own stain normaliser."""
    import torch

    dev = resolve_device(device)
    norm = StainNormalizer.fit(crops.sample(5000), encoder.config.stain_norm)
    module = encoder.module.to(dev)
    encoder.module = module
    out = np.zeros((len(crops), encoder.feature_dim), dtype=np.float32)
    for idx, block in crops.iter_tiles(show_progress_bar=show_progress_bar, desc="embed_cells"):
        for s in range(0, len(idx), batch_size):
            x = norm(block[s : s + batch_size]).to(dev)
            out[idx[s : s + batch_size]] = encoder.embed(x).float().cpu().numpy()
    if device != "cpu" and dev.type == "cuda":
        torch.cuda.empty_cache()
    return out, norm
