"""How far can a classical (threshold + watershed) nucleus segmenter go on MoNuSeg? Two upper bounds.

Usage (from the repository root, with ../shared/data present):

    python benchmarks/classical_ceiling.py

1. Foreground: pixel Dice of the smoothed haematoxylin channel against the annotated nuclei, with the slide-wide
   Otsu threshold and with the best of 46 thresholds chosen per tile with the annotations (an oracle).
2. Splitting: instance metrics when every annotated nucleus gets one perfect seed (its centroid, from the
   annotations), grown by (a) the default's watershed of the haematoxylin inside its foreground and (b) a
   marker-controlled watershed of the haematoxylin gradient with a background marker. Whatever seed detector a
   classical method uses, it cannot beat these boundaries.
3. The default segmenter itself, for comparison (same working resolution, 0.5 um/px).

Everything runs at 0.5 um/px; labels go back to the annotation grid through polygons, as in ``segment_nuclei``.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from _common import DATA

from scellst.bench import evaluate_segmentation
from scellst.im._segment import ClassicalParams, _hematoxylin, _polygons_from_labels, rasterize_nuclei, segment_tile
from scellst.im._segmenter import resample_labels, resample_rgb

WORK = 0.5
METRICS = ["precision", "recall", "f1", "dice", "aji", "pq"]


def to_grid(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Working-resolution labels -> polygons -> labels on the annotation grid."""
    import geopandas as gpd

    scale = shape[0] / labels.shape[0]
    params = ClassicalParams(min_area_um2=0.01, max_area_um2=1e6)
    polys, areas, _ = _polygons_from_labels(
        labels, to_level0=(scale, 0.0, 0.0), core=(-1, 1e9, -1, 1e9), working_mpp=WORK, params=params
    )
    gdf = gpd.GeoDataFrame({"area_um2": areas}, geometry=polys, index=np.arange(1, len(polys) + 1))
    return np.asarray(rasterize_nuclei(gdf, shape)).astype(np.int64)


def oracle_markers(truth: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    from scipy import ndimage as ndi

    ids = np.unique(truth)[1:]
    centres = np.asarray(ndi.center_of_mass(truth > 0, truth, ids))
    markers = np.zeros(truth.shape, dtype=np.int32)
    yx = np.rint(centres).astype(int)
    markers[yx[:, 0], yx[:, 1]] = np.arange(1, len(ids) + 1)
    if keep is not None:
        markers[~keep] = 0
    return markers


def main() -> None:
    from scipy import ndimage as ndi
    from skimage.filters import gaussian, sobel, threshold_otsu
    from skimage.io import imread
    from skimage.segmentation import watershed

    root = DATA / "monuseg"
    index = json.loads((root / "index.json").read_text())
    dice_otsu, dice_best, rows = (
        [],
        [],
        {"default": [], "oracle seeds, default watershed": [], "oracle seeds, gradient": []},
    )
    for e in index:
        image = imread(root / "images" / f"{e['name']}.png")[..., :3]
        truth = imread(root / "instance_masks" / f"{e['name']}.png").astype(np.int64)
        mpp = float(e["microns_per_pixel"] or 0.25)
        rgb = resample_rgb(image, WORK / mpp)
        small = resample_labels(truth, rgb.shape[:2])
        fg_true = small > 0
        hema = gaussian(_hematoxylin(rgb), sigma=0.4 / WORK)
        tissue = rgb.mean(axis=-1) < 215
        thr = threshold_otsu(hema[tissue])

        def dice(mask, fg_true=fg_true):
            return 2 * (mask & fg_true).sum() / (mask.sum() + fg_true.sum())

        dice_otsu.append(dice(hema > thr))
        dice_best.append(max(dice(hema > q) for q in np.quantile(hema, np.linspace(0.5, 0.95, 46))))

        default = segment_tile(rgb, microns_per_pixel=WORK, threshold=thr, params=ClassicalParams())
        rows["default"].append(evaluate_segmentation(to_grid(default, truth.shape), truth))
        fg = hema > 0.8 * thr
        lab = watershed(-hema, oracle_markers(small, fg), mask=fg)
        rows["oracle seeds, default watershed"].append(evaluate_segmentation(to_grid(lab, truth.shape), truth))
        markers = ndi.grey_dilation(oracle_markers(small), size=3)
        background = int(markers.max()) + 1
        markers[(hema < 0.3 * thr) & (markers == 0)] = background
        lab = watershed(sobel(hema), markers)
        lab[lab == background] = 0
        rows["oracle seeds, gradient"].append(evaluate_segmentation(to_grid(lab, truth.shape), truth))
    print(
        f"Haematoxylin foreground pixel Dice on 13 MoNuSeg tiles: Otsu {np.mean(dice_otsu):.3f}; best threshold per "
        f"tile (oracle) {np.mean(dice_best):.3f}"
    )
    for name, r in rows.items():
        print(f"{name}: {pd.DataFrame(r)[METRICS].mean().round(3).to_dict()}")


if __name__ == "__main__":
    main()
