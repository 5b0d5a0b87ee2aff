"""Re-coloured and degraded copies of an H&E image: a stand-in for another lab's stain and scanner.

Used by ``generalisation.py`` to measure how much a trained model loses when the held-out section looks different.
Each perturbation maps an RGB uint8 image ``(y, x, 3)`` to another (the resampling also changes its size).
"""

from __future__ import annotations

import numpy as np

# Ruifrok & Johnston's H, E, DAB optical-density directions (rows), as in scikit-image's rgb2hed
_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED = _HED / np.linalg.norm(_HED, axis=1, keepdims=True)


def _od(rgb: np.ndarray) -> np.ndarray:
    return -np.log(np.maximum(rgb.astype(np.float32), 1.0) / 255.0)


def _rgb(od: np.ndarray) -> np.ndarray:
    return np.clip(255.0 * np.exp(-od), 0, 255).astype(np.uint8)


def hed_jitter(rgb: np.ndarray, *, scale=(0.8, 1.2, 1.0), shift=(0.03, -0.03, 0.0)) -> np.ndarray:
    """Scale and shift the haematoxylin, eosin and DAB concentrations (a stronger H, weaker E stain, or the reverse)."""
    conc = _od(rgb).reshape(-1, 3) @ np.linalg.inv(_HED)
    conc = conc * np.asarray(scale, dtype=np.float32) + np.asarray(shift, dtype=np.float32)
    return _rgb((conc @ _HED).reshape(rgb.shape))


def _tissue_od(rgb: np.ndarray, max_pixels: int = 2_000_000, seed: int = 0) -> np.ndarray:
    od = _od(rgb).reshape(-1, 3)
    od = od[(od > 0.15).all(axis=1)]  # tissue, not background
    if len(od) > max_pixels:
        od = od[np.random.default_rng(seed).choice(len(od), max_pixels, replace=False)]
    return od


def macenko_stains(rgb: np.ndarray, *, alpha: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Macenko's estimate of an image's two stain directions (H first) and their 99th-percentile concentrations.

    The tissue's optical densities are projected on the plane of their two main axes; the stain directions are the
    robust extremes (``alpha`` and ``100 - alpha`` percentiles) of the angle in that plane.
    """
    od = _tissue_od(rgb)
    _, vecs = np.linalg.eigh(np.cov(od.T))
    plane = vecs[:, 1:3]  # the two largest eigenvalues
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100 - alpha])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    stains = np.stack([v1, v2]) if v1[0] > v2[0] else np.stack([v2, v1])  # haematoxylin absorbs more red
    stains = stains * np.sign(stains.sum(axis=1, keepdims=True))
    stains = stains / np.linalg.norm(stains, axis=1, keepdims=True)
    conc = np.linalg.lstsq(stains.T, od.T, rcond=None)[0]
    return stains.astype(np.float32), np.percentile(conc, 99, axis=1).astype(np.float32)


def macenko_to(rgb: np.ndarray, target: np.ndarray, *, block: int = 2048) -> np.ndarray:
    """Re-colour ``rgb`` with the stains of ``target`` (Macenko normalisation towards another slide)."""
    src, src_max = macenko_stains(rgb)
    tgt, tgt_max = macenko_stains(target)
    pinv = np.linalg.pinv(src.T)
    out = np.empty_like(rgb)
    for y in range(0, rgb.shape[0], block):  # block by block: bounded memory
        tile = rgb[y : y + block]
        conc = _od(tile).reshape(-1, 3) @ pinv.T
        conc = conc * (tgt_max / np.maximum(src_max, 1e-6))
        out[y : y + block] = _rgb((conc @ tgt).reshape(tile.shape))
    return out


def jpeg(rgb: np.ndarray, *, quality: int = 40, block: int = 2048) -> np.ndarray:
    """JPEG-compress at ``quality`` (block by block, as a tiled scanner export would)."""
    import cv2

    out = np.empty_like(rgb)
    for y in range(0, rgb.shape[0], block):
        for x in range(0, rgb.shape[1], block):
            tile = np.ascontiguousarray(rgb[y : y + block, x : x + block, ::-1])
            _ok, buf = cv2.imencode(".jpg", tile, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
            out[y : y + block, x : x + block] = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]
    return out


def blur(rgb: np.ndarray, *, sigma_px: float = 1.0) -> np.ndarray:
    """Gaussian blur (an out-of-focus scan)."""
    import cv2

    return cv2.GaussianBlur(rgb, (0, 0), sigmaX=float(sigma_px))


def resample(rgb: np.ndarray, factor: float) -> np.ndarray:
    """Rescale by ``factor`` (> 1: finer pixels, as a scanner at a higher magnification)."""
    import cv2

    h, w = rgb.shape[:2]
    return cv2.resize(rgb, (round(w * factor), round(h * factor)), interpolation=cv2.INTER_CUBIC)
