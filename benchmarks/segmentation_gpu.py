"""MoNuSeg cross-validation of ``train_segmenter`` U-Nets on a GPU, on a machine that has torch but no SpatialData.

Usage (from the repository root; the data folders hold MoNuSeg, CoNSeP and GBM40 as in ../shared/data):

    python benchmarks/segmentation_gpu.py NAME [--n-folds 2] [--folds 0,1] [--base-channels 32] [--depth 3]
                                          [--crop-size 128] [--batch-size 8] [--steps 4000 | --budget-s 520]
                                          [--hv] [--num-workers 0] [--device cuda] [--data ../shared/data]
                                          [--out benchmarks/results/segmentation_gpu]

Each fold trains one U-Net (``train_segmenter``, 0.25 um/px, the fold's MoNuSeg tiles + the 224 CoNSeP patches + the
40 GBM40 tiles, seed = fold) and scores it on the tiles it did not see; the folds and seeds are those of
``benchmarks/segmentation.py`` (fold k holds out the tiles i with ``i % n_folds == (k + 1) % n_folds``), so
``--n-folds 13`` leaves one tile out. Run several folds as separate processes to share one GPU. Each fold writes
``NAME_f<k>.json`` (settings, steps, training time, scores, AJI per held-out tile) under ``--out``;
``--summarise NAME`` prints the scores over the folds found there (every tile scored by the model that did not see
it, means over tiles as in ``benchmarks/segmentation.py``).

Why not ``benchmarks/segmentation.py --device cuda``: GPU machines often have torch but not the SpatialData stack, so
this script loads only scellst's segmentation modules (``scellst.im._segmenter``, ``scellst.models._unet``, the
metrics and ``scellst.datasets``: numpy, scipy, scikit-image, pandas, torch) without the package's top-level import.
It scores a tile as ``segment_nuclei`` does for an image smaller than one tile (2048 px): resample to the model's
resolution, segment, resample the labels back. On the saved fold-1 model of benchmarks.md both paths give F1 0.662,
AJI 0.516, PQ 0.480.

``--budget-s``: instead of ``--steps``, time 20 and 60 steps and train as many steps as fit in this many seconds
from the start of the script, keeping 170 s for the threshold calibration and scoring.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from pathlib import Path

from segmentation import monuseg_folds  # no scellst import at module level: fine without SpatialData

T0 = time.time()
SRC = Path(__file__).resolve().parents[1] / "src" / "scellst"
METRICS = ("precision", "recall", "f1", "dice", "aji", "pq")


def _load_modules():
    """scellst's segmentation modules, without ``scellst/__init__`` (which imports SpatialData)."""
    if "scellst" not in sys.modules:
        for name, sub in [("scellst", SRC), ("scellst.tl", SRC / "tl"), ("scellst.models", SRC / "models")]:
            module = types.ModuleType(name)
            module.__path__ = [str(sub)]
            sys.modules[name] = module
    from scellst import datasets
    from scellst.im._segmentation_metrics import evaluate_segmentation
    from scellst.im._segmenter import resample_labels, resample_rgb, train_segmenter
    from scellst.models._unet import NucleusUNet

    return datasets, NucleusUNet, evaluate_segmentation, resample_labels, resample_rgb, train_segmenter


def score(model, images, masks, mpps) -> list[dict]:
    """Scores of ``model`` on each tile, segmented as ``segment_nuclei`` does for an image under one tile."""
    import numpy as np

    _, _, evaluate_segmentation, resample_labels, resample_rgb, _ = _load_modules()
    rows = []
    for rgb, mask, mpp in zip(images, masks, mpps, strict=True):
        labels, _ = model.segment(resample_rgb(rgb, model.config.microns_per_pixel / mpp))
        labels = resample_labels(labels, mask.shape).astype(np.int64)
        rows.append({k: float(v) for k, v in evaluate_segmentation(labels, mask).items() if k in METRICS})
    return rows


def run_fold(args, fold: int) -> dict:
    import numpy as np

    datasets, _, _, _, _, train_segmenter = _load_modules()
    data = Path(args.data)
    tiles = datasets.annotated_tiles("monuseg", path=data / "monuseg")
    imgs, masks = [t["image"] for t in tiles], [t["instances"] for t in tiles]
    mpps = [t["microns_per_pixel"] for t in tiles]
    test = monuseg_folds(len(tiles), args.n_folds)[fold]  # the same folds as benchmarks/segmentation.py
    train = [i for i in range(len(tiles)) if i not in test]
    consep = datasets.consep_patches(path=data / "consep")
    gbm40 = datasets.annotated_tiles("gbm40", path=data / "gbm40")
    extra_imgs = [p["image"] for p in consep] + [t["image"] for t in gbm40]
    extra_masks = [p["instances"] for p in consep] + [t["instances"] for t in gbm40]
    images, instance_masks = [imgs[i] for i in train] + extra_imgs, [masks[i] for i in train] + extra_masks
    kw = {
        "microns_per_pixel": [mpps[i] for i in train] + [0.25] * len(extra_imgs),
        "working_mpp": 0.25,
        "base_channels": args.base_channels,
        "depth": args.depth,
        "hv": args.hv,
        "crop_size": args.crop_size,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "device": args.device,
        "seed": fold,
        "show_progress_bar": False,
    }
    n_steps = args.steps
    if args.budget_s is not None:
        probes = {}
        for n in (12, 20, 60):  # the first warms up (CUDA context, cuDNN autotuning)
            t = time.time()
            train_segmenter(images, instance_masks, n_steps=n, calibrate=False, **kw)
            probes[n] = time.time() - t
        diff = probes[60] - probes[20]
        rate = 40 / diff if diff > 0.2 else 60 / probes[60]
        n_steps = int(min(max(200, 0.8 * rate * (args.budget_s - (time.time() - T0) - 170)), 40000))
    t = time.time()
    model = train_segmenter(images, instance_masks, n_steps=n_steps, **kw)
    train_s = time.time() - t
    rows = score(model, [imgs[i] for i in test], [masks[i] for i in test], [mpps[i] for i in test])
    settings = {k: v for k, v in vars(args).items() if k not in ("name", "folds", "out", "data", "summarise")}
    return {
        "name": args.name,
        "fold": fold,
        **settings,
        "n_steps": n_steps,
        "train_s": round(train_s, 1),  # training and threshold calibration
        "summary": {k: float(np.mean([r[k] for r in rows])) for k in METRICS},
        "rows": {tiles[i]["name"]: r for i, r in zip(test, rows, strict=True)},
        "thresholds": [model.config.foreground_threshold, model.config.seed_threshold, model.config.hv_edge],
    }


def summarise(out: Path, name: str) -> None:
    import numpy as np

    runs = sorted((json.loads(p.read_text()) for p in out.glob(f"{name}_f*.json")), key=lambda r: r["fold"])
    if not runs:
        raise SystemExit(f"No {name}_f*.json under {out}.")
    rows = [r for run in runs for r in run["rows"].values()]
    for run in runs:
        aji = ", ".join(f"{t[:12]} {r['aji']:.3f}" for t, r in run["rows"].items())
        print(f"  {name} fold {run['fold']} ({run['n_steps']} steps, {run['train_s']:.0f} s): AJI {aji}")
    scores = {k: round(float(np.mean([r[k] for r in rows])), 3) for k in METRICS}
    print(f"{name}: {len(runs)} of {runs[0]['n_folds']} folds, {len(rows)} held-out tiles: {scores}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", help="name of the run (file prefix)")
    parser.add_argument("--n-folds", type=int, default=2)
    parser.add_argument("--folds", default=None, help="comma-separated folds to run (default: all)")
    parser.add_argument("--base-channels", type=int, default=32)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--crop-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--budget-s", type=float, default=None, help="train as many steps as fit (see above)")
    parser.add_argument("--hv", action="store_true", help="train_segmenter(hv=True)")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--out", default="benchmarks/results/segmentation_gpu")
    parser.add_argument("--summarise", action="store_true", help="only print the scores of the folds already run")
    args = parser.parse_args()
    out = Path(args.out)
    if args.summarise:
        summarise(out, args.name)
        return
    if not 2 <= args.n_folds <= 13:
        parser.error(f"--n-folds: between 2 and 13 (the MoNuSeg tiles), got {args.n_folds}")
    folds = range(args.n_folds) if args.folds is None else [int(k) for k in args.folds.split(",") if k.strip()]
    if not folds or set(folds) - set(range(args.n_folds)):
        parser.error(f"--folds: comma-separated from 0 to {args.n_folds - 1}, got {args.folds!r}")
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    for fold in folds:
        result = run_fold(args, fold)
        (out / f"{args.name}_f{fold}.json").write_text(json.dumps(result, indent=1))
        print(json.dumps({k: result[k] for k in ("name", "fold", "n_steps", "train_s", "summary")}), flush=True)


if __name__ == "__main__":
    main()
