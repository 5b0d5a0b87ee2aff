"""Optional segmentation backends (StarDist, Cellpose, InstanSeg), used with local weights only.

These packages download weights by default; scellst never lets them: every backend needs ``weights=`` pointing to
a local copy. Install the matching extra, e.g. ``pip install "scellst[stardist]"``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

BACKENDS = ("stardist", "cellpose", "instanseg")
_EXTRAS = {
    "stardist": ("stardist", "a StarDist2D model folder (e.g. 2D_versatile_he, with config.json and weights_best.h5)"),
    "cellpose": ("cellpose", "a Cellpose model file"),
    "instanseg": ("instanseg", "an InstanSeg TorchScript model file (e.g. brightfield_nuclei.pt)"),
}


class _Backend:
    class_names: tuple[str, ...] = ()

    def __init__(self, name: str, model, microns_per_pixel: float) -> None:
        self.name, self.model, self.working_mpp = name, model, microns_per_pixel

    def __call__(self, rgb: np.ndarray) -> tuple[np.ndarray, None]:
        if self.name == "stardist":
            from csbdeep.utils import normalize

            labels, _ = self.model.predict_instances(normalize(rgb, 1, 99.8, axis=(0, 1)))
        elif self.name == "cellpose":
            labels = self.model.eval(rgb, channels=[0, 0], diameter=None)[0]
        else:
            labels, _ = self.model.eval_small_image(rgb, pixel_size=self.working_mpp, return_image_tensor=False)
            labels = np.asarray(labels).squeeze()
        return np.asarray(labels, dtype=np.int32), None


def backend_segmenter(name: str, *, weights: str | Path | None, microns_per_pixel: float) -> _Backend:
    """Build an optional backend from local weights, with errors that say what to install or pass."""
    extra, what = _EXTRAS[name]
    if weights is None:
        raise ValueError(
            f"method={name!r} needs `weights=`: the local path of {what}. scellst never downloads weights."
        )
    weights = Path(weights)
    if not weights.exists():
        raise FileNotFoundError(f"Weights {str(weights)!r} for method={name!r} do not exist.")
    try:
        if name == "stardist":
            from stardist.models import StarDist2D

            model = StarDist2D(None, name=weights.name, basedir=str(weights.parent))
        elif name == "cellpose":
            from cellpose import models

            model = models.CellposeModel(pretrained_model=str(weights), gpu=False)
        else:
            from instanseg import InstanSeg

            model = InstanSeg(str(weights), verbosity=0)
    except ImportError as err:
        raise ImportError(
            f"method={name!r} needs the optional package: pip install 'scellst[{extra}]' ({err})."
        ) from err
    return _Backend(name, model, microns_per_pixel)
