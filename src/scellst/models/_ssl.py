"""MoCo v3 on cell crops: histology augmentations on batches, the momentum encoder and the symmetric contrastive loss."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Optical density -> haematoxylin / eosin / DAB (Ruifrok & Johnston), used for stain jitter.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])


@dataclass
class AugmentConfig:
    """Histology augmentations, applied to whole batches on the fly (each cell gets its own random draw)."""

    out_px: int = 48
    view_fraction: float = 2.0 / 3.0  # side of an unscaled view as a fraction of the context crop
    scale: tuple[float, float] = (0.6, 1.0)  # random resized crop: area fraction of the view
    max_shift: float = 0.08  # translation as a fraction of the context crop
    rotate: bool = True
    flip: bool = True
    stain_jitter: float = 0.05  # relative H / E / DAB concentration jitter (HED space)
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    jitter_p: float = 0.8
    grayscale_p: float = 0.1
    blur_p: float = 0.3
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    erase_p: float = 0.2


def augment(x, cfg: AugmentConfig, generator=None):
    """Augment a float batch in [0, 1] of context crops ``(n, 3, P, P)`` into ``(n, 3, out_px, out_px)`` views."""
    import torch
    import torch.nn.functional as F

    n = x.shape[0]
    dev, dt = x.device, x.dtype

    def u(*shape, lo=0.0, hi=1.0):
        return torch.rand(*shape, generator=generator, device=dev, dtype=dt) * (hi - lo) + lo

    # geometry: rotation, flips, resized crop and shift in one resampling
    s = torch.sqrt(u(n, lo=cfg.scale[0], hi=cfg.scale[1])) * cfg.view_fraction
    theta_r = u(n, hi=2 * math.pi) if cfg.rotate else torch.zeros(n, device=dev, dtype=dt)
    flip = torch.where(u(n) < 0.5, -1.0, 1.0).to(dt) if cfg.flip else torch.ones(n, device=dev, dtype=dt)
    cos, sin = torch.cos(theta_r) * s, torch.sin(theta_r) * s
    shift = u(n, 2, lo=-cfg.max_shift, hi=cfg.max_shift) * 2
    mat = torch.stack(
        [torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(mat, (n, 3, cfg.out_px, cfg.out_px), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    # stain jitter in haematoxylin / eosin / DAB space
    if cfg.stain_jitter > 0:
        m = torch.as_tensor(_RGB_FROM_HED, dtype=dt, device=dev)
        od = -torch.log(x.clamp(min=1e-3))
        hed = torch.einsum("nchw,cd->ndhw", od, torch.linalg.inv(m))
        alpha = u(n, 3, 1, 1, lo=1 - cfg.stain_jitter, hi=1 + cfg.stain_jitter)
        beta = u(n, 3, 1, 1, lo=-cfg.stain_jitter, hi=cfg.stain_jitter)
        od = torch.einsum("ndhw,dc->nchw", hed * alpha + beta, m)
        x = torch.exp(-od).clamp(0, 1)

    # brightness, contrast, saturation
    jit = (u(n, 1, 1, 1) < cfg.jitter_p).to(dt)
    b = 1 + jit * u(n, 1, 1, 1, lo=-cfg.brightness, hi=cfg.brightness)
    x = x * b
    gray = x.mean(dim=1, keepdim=True)
    c = 1 + jit * u(n, 1, 1, 1, lo=-cfg.contrast, hi=cfg.contrast)
    x = (x - gray.mean(dim=(2, 3), keepdim=True)) * c + gray.mean(dim=(2, 3), keepdim=True)
    sat = 1 + jit * u(n, 1, 1, 1, lo=-cfg.saturation, hi=cfg.saturation)
    gray = x.mean(dim=1, keepdim=True)
    x = (x - gray) * sat + gray
    to_gray = (u(n, 1, 1, 1) < cfg.grayscale_p).to(dt)
    x = x * (1 - to_gray) + x.mean(dim=1, keepdim=True) * to_gray
    x = x.clamp(0, 1)

    # Gaussian blur with a per-cell sigma
    if cfg.blur_p > 0:
        sigma = u(n, lo=cfg.blur_sigma[0], hi=cfg.blur_sigma[1])
        r = torch.arange(-2, 3, device=dev, dtype=dt)
        k = torch.exp(-(r[None, :] ** 2) / (2 * sigma[:, None] ** 2))
        k = k / k.sum(dim=1, keepdim=True)
        apply = u(n) < cfg.blur_p
        k = torch.where(apply[:, None], k, torch.tensor([0, 0, 1.0, 0, 0], device=dev, dtype=dt))
        xp = F.pad(x.reshape(1, n * 3, cfg.out_px, cfg.out_px), (2, 2, 2, 2), mode="replicate")
        kk = k.repeat_interleave(3, dim=0)
        xp = F.conv2d(xp, kk[:, None, None, :], groups=n * 3)
        x = F.conv2d(xp, kk[:, None, :, None], groups=n * 3).reshape(n, 3, cfg.out_px, cfg.out_px)

    # random erasing: one rectangle of 2-15 % of the view, filled with noise
    if cfg.erase_p > 0:
        area = u(n, lo=0.02, hi=0.15) * cfg.out_px**2
        aspect = torch.exp(u(n, lo=math.log(0.3), hi=math.log(3.3)))
        eh = (torch.sqrt(area * aspect)).clamp(1, cfg.out_px - 1)
        ew = (torch.sqrt(area / aspect)).clamp(1, cfg.out_px - 1)
        y0 = u(n) * (cfg.out_px - eh)
        x0 = u(n) * (cfg.out_px - ew)
        yy = torch.arange(cfg.out_px, device=dev, dtype=dt)[None, :, None]
        xx = torch.arange(cfg.out_px, device=dev, dtype=dt)[None, None, :]
        box = (yy >= y0[:, None, None]) & (yy < (y0 + eh)[:, None, None])
        box = box & (xx >= x0[:, None, None]) & (xx < (x0 + ew)[:, None, None])
        box = box & (u(n) < cfg.erase_p)[:, None, None]
        x = torch.where(box[:, None], u(n, 3, cfg.out_px, cfg.out_px), x)
    return x


def centre_view(x, cfg: AugmentConfig):
    """The un-augmented central view of context crops (what the encoder sees at inference)."""
    size = x.shape[-1]
    side = int(round(size * cfg.view_fraction))
    o = (size - side) // 2
    x = x[..., o : o + side, o : o + side]
    if side != cfg.out_px:
        import torch.nn.functional as F

        x = F.interpolate(x, size=(cfg.out_px, cfg.out_px), mode="bilinear", align_corners=False, antialias=True)
    return x


def build_moco(backbone, *, feature_dim: int, proj_hidden: int = 1024, proj_dim: int = 128):
    """MoCo v3: backbone + projector (query and momentum branches) + predictor on the query branch."""
    import copy

    import torch
    from torch import nn

    def mlp(din: int, dh: int, dout: int, last_bn: bool = True) -> nn.Sequential:
        layers = [nn.Linear(din, dh, bias=False), nn.BatchNorm1d(dh), nn.ReLU(inplace=True), nn.Linear(dh, dout)]
        if last_bn:
            layers.append(nn.BatchNorm1d(dout, affine=False))
        return nn.Sequential(*layers)

    class MoCoV3(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            self.projector = mlp(feature_dim, proj_hidden, proj_dim)
            self.predictor = mlp(proj_dim, proj_hidden, proj_dim, last_bn=False)
            self.momentum_backbone = copy.deepcopy(backbone)
            self.momentum_projector = copy.deepcopy(self.projector)
            for p in [*self.momentum_backbone.parameters(), *self.momentum_projector.parameters()]:
                p.requires_grad = False

        @torch.no_grad()
        def update_momentum(self, m: float) -> None:
            pairs = [(self.backbone, self.momentum_backbone), (self.projector, self.momentum_projector)]
            for online, target in pairs:
                for po, pt in zip(online.parameters(), target.parameters(), strict=True):
                    pt.mul_(m).add_(po.detach(), alpha=1 - m)
                for bo, bt in zip(online.buffers(), target.buffers(), strict=True):
                    bt.copy_(bo)

        def forward(self, x1, x2, temperature: float):
            q1 = self.predictor(self.projector(self.backbone(x1)))
            q2 = self.predictor(self.projector(self.backbone(x2)))
            with torch.no_grad():
                k1 = self.momentum_projector(self.momentum_backbone(x1))
                k2 = self.momentum_projector(self.momentum_backbone(x2))
            return contrastive_loss(q1, k2, temperature) + contrastive_loss(q2, k1, temperature)

    return MoCoV3()


def contrastive_loss(q, k, temperature: float):
    """InfoNCE between queries and keys of the same cells (positives on the diagonal), scaled by ``2 * temperature``."""
    import torch
    import torch.nn.functional as F

    q = F.normalize(q, dim=1)
    k = F.normalize(k, dim=1)
    logits = q @ k.T / temperature
    labels = torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(logits, labels) * (2 * temperature)


def momentum_at(step: int, total: int, base: float) -> float:
    """Cosine schedule of the momentum coefficient from ``base`` to 1 (MoCo v3)."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / max(total, 1)) + 1) / 2


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up then cosine decay."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
