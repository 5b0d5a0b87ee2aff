"""Nucleus segmentation: accuracy on MoNuSeg and CoNSeP, speed, memory on a large slide, HER2ST counts.

Usage (from the repository root, with ../shared/data present):

    python benchmarks/segmentation.py [--steps 4000] [--unet-mpp 0.25] [--base-channels 32] [--extra consep,gbm40]
                                      [--depth 3] [--encoder efficientnet-lite0] [--save-models DIR] [--crop-size 128] [--batch-size 8] [--device auto] [--num-workers 0]
                                      [--monuseg-weight 1] [--hv] [--zoom LOW HIGH] [--blur P] [--n-folds 2]
                                      [--folds 0,1] [--seed 0] [--large 20000] [--self-train] [--self-rounds 3]
                                      [--fine-tune STEPS] [--fine-tune-tiles 1,3]
                                      [--skip-unet] [--skip-monuseg] [--skip-consep] [--skip-large] [--skip-her2st]
                                      [--hgsc [MODEL ...]] [--hgsc-mpp 0.25]

1. MoNuSeg (13 tiles, manual outlines): the default classical segmenter on every tile, and U-Nets from
   ``train_segmenter`` in ``--n-folds`` folds (2: even / odd tiles), each scored only on the tiles it did not see
   (their AJI printed per tile); the 224 CoNSeP patches (colorectal) and the 40 GBM40 tiles (glioblastoma) are added
   to the training tiles (``--extra``).
2. CoNSeP (224 patches, 4 classes): classical, and a class-aware U-Net trained on the patches of images 1-7 and
   scored on images 8-14, with per-class detection F1.
3. Speed (megapixels of the input per second) and peak memory of the classical segmenter on a dask-backed synthetic
   slide of ``--large`` x ``--large`` px that is never loaded whole; then the time to cut 64 training tiles from its
   nuclei with ``scellst.im.segmentation_tiles`` (as from a Xenium section's nucleus boundaries).
4. Nuclei per spot on the HER2ST sections, and an overlay PNG (benchmarks/results/her2st_C2_overlay.png).
5. With ``--self-train``: ``self_train_segmenter`` on MoNuSeg, no annotations used for training: (a) trained on
   the 13 tiles themselves and scored on them (what a user does on a slide), (b) trained on the even / odd tiles and
   scored on the others (new slides of another organ and lab); and on the whole HER2ST section C2: training time,
   nuclei per spot and an overlay next to the classical one (benchmarks/results/her2st_C2_self_overlay.png).
6. With ``--fine-tune STEPS``: a U-Net trained on the ``--extra`` public sets only, scored on the 13 MoNuSeg tiles
   (another lab and organs), then fine-tuned (``train_segmenter(init=...)``) for STEPS steps on each fold's MoNuSeg
   tiles and scored on the fold's held-out tiles; ``--fine-tune-tiles 1,3``: on the first 1 and the first 3 tiles
   of each fold instead of all of them (how many annotated tiles are enough).
7. With ``--hgsc [MODEL ...]``: agreement of the classical segmenter (and of each model file given) with the
   reference nuclei of the two ovarian-carcinoma crops of ``histolytics_hgsc`` (a model's output, not manual
   outlines; ``--hgsc-mpp``, default 0.25 um/px, not stated with the data), another tissue and stain; overlays in benchmarks/results/hgsc_*_overlay.png.
"""

from __future__ import annotations

import argparse
import functools
import time

import numpy as np
import pandas as pd
from _common import CACHE, DATA, peak_memory_gib

METRICS = ["precision", "recall", "f1", "dice", "aji", "pq"]


def segment(image, mpp, method="classical", **kwargs):
    import scellst

    sdata = scellst.io.from_image(image, microns_per_pixel=mpp)
    scellst.im.segment_nuclei(sdata, method=method, show_progress_bar=False, **kwargs)
    labels = np.asarray(sdata.labels["nuclei_labels"].data).astype(np.int64)
    classes = sdata.shapes["nuclei"]["class"].astype(str).to_dict() if "class" in sdata.shapes["nuclei"] else None
    return labels, classes


def score(images, masks, mpps, method, true_classes=None, **kwargs):
    from scellst.bench import evaluate_segmentation

    segment(images[0], mpps[0], method, **kwargs)  # warm-up (imports, network build): not timed
    rows, seconds, mp = [], 0.0, 0.0
    for i, (img, mask, mpp) in enumerate(zip(images, masks, mpps, strict=True)):
        t0 = time.perf_counter()
        labels, classes = segment(img, mpp, method, **kwargs)
        seconds += time.perf_counter() - t0  # segmentation only, not the scoring below
        mp += img.shape[0] * img.shape[1] / 1e6
        rows.append(
            evaluate_segmentation(
                labels, mask, pred_classes=classes, true_classes=None if true_classes is None else true_classes[i]
            )
        )
    return rows, mp / seconds


def summary(rows) -> dict:
    out = pd.DataFrame(rows)[METRICS].mean().round(3).to_dict()
    if "per_class_f1" in rows[0]:
        per = pd.DataFrame([r["per_class_f1"] for r in rows])
        # pooled per-class F1 would need pooled counts; report the mean over patches that contain the class
        out.update({f"F1[{k}]": round(v, 3) for k, v in per.mean().items()})
    return out


def consep_training_set() -> tuple[list, list]:
    """The 224 CoNSeP patches (0.25 um/px) as extra training images for the MoNuSeg U-Nets."""
    import scellst

    patches = scellst.datasets.consep_patches(path=DATA / "consep")
    return [p["image"] for p in patches], [p["instances"] for p in patches]


def gbm40_training_set() -> tuple[list, list]:
    """The 40 GBM40 glioblastoma tiles (manual outlines; resolution not stated upstream, taken as 0.25 um/px)."""
    import scellst

    tiles = scellst.datasets.annotated_tiles("gbm40", path=DATA / "gbm40")
    return [t["image"] for t in tiles], [t["instances"] for t in tiles]


EXTRA_SETS = {"consep": consep_training_set, "gbm40": gbm40_training_set}


@functools.lru_cache(maxsize=1)
def extra_training_set(extra: tuple[str, ...]) -> tuple[list, list]:
    """Images and instance masks of the named ``EXTRA_SETS``, concatenated (all at 0.25 um/px).

    Cached: the MoNuSeg folds and ``--fine-tune`` in one run read the sets once.
    """
    imgs, masks = [], []
    for name in extra:
        i, m = EXTRA_SETS[name]()
        imgs, masks = imgs + i, masks + m
    return imgs, masks


def tile_arrays(tiles: list[dict]) -> tuple[list, list, list]:
    """Images, instance masks and microns per pixel of annotated tiles (``scellst.datasets.annotated_tiles``)."""
    return [t["image"] for t in tiles], [t["instances"] for t in tiles], [t["microns_per_pixel"] for t in tiles]


def monuseg_folds(n_tiles: int, n_folds: int) -> list[list[int]]:
    """Held-out tiles of each fold: fold ``k`` scores the tiles ``i`` with ``i % n_folds == (k + 1) % n_folds``.

    With two folds, fold 0 trains on the even tiles and fold 1 on the odd ones; the tiles are listed by TCGA
    code, so consecutive tiles (often the same organ) fall in different folds.
    """
    return [[i for i in range(n_tiles) if i % n_folds == (k + 1) % n_folds] for k in range(n_folds)]


def monuseg(
    unet_kwargs: dict,
    extra: list[str],
    folds: list[int],
    n_folds: int = 2,
    monuseg_weight: float = 1.0,
    seed: int = 0,
    unet: bool = True,
    save_models: str | None = None,
) -> tuple[list[dict], list[dict]]:
    """Print the classical method's and the U-Nets' scores; return the tiles and the classical row of each tile."""
    import scellst

    tiles = scellst.datasets.annotated_tiles("monuseg", path=DATA / "monuseg")
    imgs, masks, mpps = tile_arrays(tiles)
    rows, speed = score(imgs, masks, mpps, "classical")
    classical = rows
    print(f"MoNuSeg classical (13 tiles): {summary(rows)}; {speed:.2f} MP/s", flush=True)
    if not unet:
        return tiles, classical
    held_out = monuseg_folds(len(tiles), n_folds)
    all_rows, speeds = [], []
    extra_imgs, extra_masks = extra_training_set(tuple(extra))  # read once for both folds
    for k in folds:
        test = held_out[k]
        train = [i for i in range(len(tiles)) if i not in test]
        t0 = time.perf_counter()
        model = scellst.im.train_segmenter(
            [imgs[i] for i in train] + extra_imgs,
            [masks[i] for i in train] + extra_masks,
            microns_per_pixel=[mpps[i] for i in train] + [0.25] * len(extra_imgs),
            image_weights=[monuseg_weight] * len(train) + [1.0] * len(extra_imgs),
            seed=seed + k,
            show_progress_bar=False,
            **unet_kwargs,
        )
        train_s = time.perf_counter() - t0
        if save_models:
            from pathlib import Path

            Path(save_models).mkdir(parents=True, exist_ok=True)
            model.save(Path(save_models) / f"monuseg_fold{k}.pt")
        rows, speed = score([imgs[i] for i in test], [masks[i] for i in test], [mpps[i] for i in test], model)
        all_rows += rows
        speeds.append(speed)
        per_tile = ", ".join(f"{tiles[i]['name'][:12]} {r['aji']:.3f}" for i, r in zip(test, rows, strict=True))
        print(
            f"  U-Net fold {k}: trained on {len(train)} tiles in {train_s:.0f} s; "
            f"{len(test)} held-out tiles: {summary(rows)}; AJI per tile: {per_tile}",
            flush=True,
        )
    if len(folds) == n_folds:
        print(
            f"MoNuSeg U-Net (every tile scored by the model that did not see it): {summary(all_rows)}; "
            f"{np.mean(speeds):.2f} MP/s",
            flush=True,
        )
    return tiles, classical


def self_training(tiles: list[dict], classical: list[dict], rounds: int, seed: int = 0) -> None:
    """``self_train_segmenter`` on the MoNuSeg tiles (no annotations), scored on the same tiles and on held-out ones.

    ``classical`` holds the classical method's row of each tile, to compare on each fold's tiles.
    """
    import scellst

    imgs, masks, mpps = tile_arrays(tiles)
    slides = [scellst.io.from_image(i, microns_per_pixel=m) for i, m in zip(imgs, mpps, strict=True)]

    def train(idx: list[int]):
        t0 = time.perf_counter()
        kw = {"rounds": rounds, "n_patches": len(idx), "seed": seed, "show_progress_bar": False}
        model = scellst.im.self_train_segmenter([slides[i] for i in idx], **kw)
        return model, time.perf_counter() - t0

    model, train_s = train(list(range(len(tiles))))
    rows, speed = score(imgs, masks, mpps, model)
    print(
        f"MoNuSeg self-trained U-Net ({rounds} rounds, trained on the 13 tiles themselves in {train_s:.0f} s): "
        f"{summary(rows)}; {speed:.2f} MP/s",
        flush=True,
    )
    all_rows = []
    for k, test in enumerate(monuseg_folds(len(tiles), 2)):
        model, train_s = train([i for i in range(len(tiles)) if i not in test])
        rows, _ = score([imgs[i] for i in test], [masks[i] for i in test], [mpps[i] for i in test], model)
        all_rows += rows
        print(
            f"  self-trained fold {k} ({train_s:.0f} s): {len(test)} held-out tiles: {summary(rows)} "
            f"(classical on them: {summary([classical[i] for i in test])})",
            flush=True,
        )
    print(f"MoNuSeg self-trained U-Net, every tile scored by the model that did not see it: {summary(all_rows)}")


def fine_tuning(
    tiles: list[dict],
    unet_kwargs: dict,
    extra: list[str],
    fine_steps: int,
    n_tiles: list[int] | None = None,
    seed: int = 0,
) -> None:
    """A U-Net trained on the ``extra`` public sets only, scored on MoNuSeg as is, then fine-tuned on each fold's
    MoNuSeg tiles (``train_segmenter(init=...)``, ``fine_steps`` steps) and scored on the fold's held-out tiles.

    ``n_tiles``: fine-tune on the first n training tiles of each fold, for each n (``None``: all of them).
    """
    import scellst

    imgs, masks, mpps = tile_arrays(tiles)
    extra_imgs, extra_masks = extra_training_set(tuple(extra))
    t0 = time.perf_counter()
    kw = {"show_progress_bar": False, "seed": seed}
    public = scellst.im.train_segmenter(extra_imgs, extra_masks, microns_per_pixel=0.25, **kw, **unet_kwargs)
    train_s = time.perf_counter() - t0
    rows, speed = score(imgs, masks, mpps, public)
    print(
        f"MoNuSeg, U-Net trained on {'+'.join(extra)} only ({train_s:.0f} s), all 13 tiles unseen: "
        f"{summary(rows)}; {speed:.2f} MP/s",
        flush=True,
    )
    for n in n_tiles or [None]:
        _fine_tune_folds(tiles, public, rows, fine_steps, n, kw)


def _fine_tune_folds(tiles, public, public_rows, fine_steps, n, kw) -> None:
    import scellst

    imgs, masks, mpps = tile_arrays(tiles)
    tuned_rows = []
    for k, test in enumerate(monuseg_folds(len(tiles), 2)):
        train = [i for i in range(len(tiles)) if i not in test][:n]
        t0 = time.perf_counter()
        tuned = scellst.im.train_segmenter(
            [imgs[i] for i in train],
            [masks[i] for i in train],
            microns_per_pixel=[mpps[i] for i in train],
            init=public,
            n_steps=fine_steps,
            **kw,
        )
        tune_s = time.perf_counter() - t0
        fold_rows, _ = score([imgs[i] for i in test], [masks[i] for i in test], [mpps[i] for i in test], tuned)
        tuned_rows += fold_rows
        print(
            f"  fine-tuned fold {k} on {len(train)} MoNuSeg tiles ({', '.join(tiles[i]['name'][:12] for i in train)}; "
            f"{fine_steps} steps, {tune_s:.0f} s): {len(test)} held-out tiles: {summary(fold_rows)} "
            f"(before fine-tuning: {summary([public_rows[i] for i in test])})",
            flush=True,
        )
    print(
        f"MoNuSeg U-Nets fine-tuned on {'all the' if n is None else n} tiles of each fold, every tile scored by the "
        f"model that did not see it: {summary(tuned_rows)}",
        flush=True,
    )


def consep(unet_kwargs: dict, unet: bool = True) -> None:
    import scellst

    patches = scellst.datasets.consep_patches(path=DATA / "consep")
    class_names = list(scellst.datasets.CONSEP_CLASSES)
    imgs = [p["image"] for p in patches]
    masks = [p["instances"] for p in patches]
    true_cls = [p["classes"] for p in patches]
    cls_maps = []
    for p in patches:
        cmap = np.zeros_like(p["instances"])
        for i, c in p["classes"].items():
            cmap[p["instances"] == i] = class_names.index(c) + 1
        cls_maps.append(cmap)
    image_id = np.array([p["source_image"] for p in patches])
    train = np.flatnonzero(image_id <= 7)
    test = np.flatnonzero(image_id > 7)
    rows, speed = score([imgs[i] for i in test], [masks[i] for i in test], [0.25] * len(test), "classical")
    print(f"CoNSeP classical ({len(test)} patches of images 8-14): {summary(rows)}; {speed:.2f} MP/s", flush=True)
    if not unet:
        return
    t0 = time.perf_counter()
    model = scellst.im.train_segmenter(
        [imgs[i] for i in train],
        [masks[i] for i in train],
        classes=[cls_maps[i] for i in train],
        class_names=class_names,
        microns_per_pixel=0.25,
        show_progress_bar=False,
        **unet_kwargs,
    )
    train_s = time.perf_counter() - t0
    test_set = ([imgs[i] for i in test], [masks[i] for i in test], [0.25] * len(test))
    test_classes = [true_cls[i] for i in test]
    rows, speed = score(*test_set, model, true_classes=test_classes)
    print(
        f"CoNSeP class-aware U-Net (trained on {len(train)} patches in {train_s:.0f} s): {summary(rows)}; "
        f"{speed:.2f} MP/s",
        flush=True,
    )
    # a third of CoNSeP's annotated objects are under the default 8 um2 (many cut by the patch border)
    rows, _ = score(*test_set, model, true_classes=test_classes, min_area_um2=3.0)
    print(f"  same model keeping nuclei down to 3 um2: {summary(rows)}", flush=True)


def large(size: int) -> None:
    import dask.array as da

    import scellst

    tissue = scellst.datasets.synthetic_tissue(seed=3, size_um=(1000.0, 1000.0))
    block = np.asarray(tissue.images["he"]["scale0"].image)  # 2000 x 2000 at 0.5 um/px
    reps = int(np.ceil(size / block.shape[1]))
    slide = da.block([[da.from_array(block, chunks=(3, 1024, 1024))] * reps] * reps)[:, :size, :size]
    sdata = scellst.io.from_image(slide, microns_per_pixel=0.5)
    before = peak_memory_gib()
    t0 = time.perf_counter()
    scellst.im.segment_nuclei(sdata, show_progress_bar=False)
    dt = time.perf_counter() - t0
    n = len(sdata.shapes["nuclei"])
    print(
        f"Large slide {size:,} x {size:,} px (dask, {size * size / 1e6:.0f} MP): {n:,} nuclei in {dt:.0f} s = "
        f"{size * size / 1e6 / dt:.2f} MP/s; peak memory {peak_memory_gib():.2f} GiB (before: {before:.2f} GiB; the "
        f"slide would be {3 * size * size / 2**30:.1f} GiB in memory)",
        flush=True,
    )
    # training tiles from these outlines, as from a Xenium section's nucleus boundaries
    t0 = time.perf_counter()
    tiles = scellst.im.segmentation_tiles(sdata, "nuclei", max_tiles=64, show_progress_bar=False)
    dt = time.perf_counter() - t0
    print(
        f"segmentation_tiles on its {n:,} outlines: {len(tiles['images'])} tiles of 128 um in {dt:.1f} s; peak memory "
        f"{peak_memory_gib():.2f} GiB",
        flush=True,
    )


def _spot_counts(sdata, key: str) -> str:
    """Nuclei per spot of the nucleus shapes ``key``: median and 10-90 % range."""
    import scellst

    scellst.pp.assign_cells(sdata, key)
    n = sdata.tables["spots_counts"].obs["n_cells"]
    return f"median {n.median():.0f} (10-90 %: {n.quantile(0.1):.0f}-{n.quantile(0.9):.0f})"


def _overlay(sdata, labels_keys: list[str], path) -> None:
    """A 500 x 500 px crop of C2 around spot 50: the H&E, then the nucleus outlines of each label image."""
    from skimage.io import imsave
    from skimage.segmentation import find_boundaries

    spots = sdata.shapes["spots"]
    x, y = int(spots.geometry.x.iloc[50]), int(spots.geometry.y.iloc[50])
    box = (slice(y - 250, y + 250), slice(x - 250, x + 250))
    img = np.moveaxis(np.asarray(sdata.images["he"]["scale0"].image[:, box[0], box[1]]), 0, -1)
    panels = [img]
    for key in labels_keys:
        over = img.copy()
        over[find_boundaries(np.asarray(sdata.labels[key].data[box]))] = [0, 255, 0]
        panels.append(over)
    CACHE.mkdir(parents=True, exist_ok=True)
    imsave(path, np.concatenate(panels, axis=1))


def her2st(self_rounds: int | None = None) -> None:
    """Segment the four HER2ST sections afresh (not from the benchmark cache) and count nuclei per spot.

    With ``self_rounds``, also self-train a U-Net on section C2 (16 patches of 256 um) and segment C2 with it.
    """
    import scellst

    for s in ("C2", "C3", "C4", "C5"):
        sdata = scellst.datasets.her2st(s, path=DATA / "her2st")
        t0 = time.perf_counter()
        scellst.im.segment_nuclei(sdata, show_progress_bar=False)
        dt = time.perf_counter() - t0
        h, w = sdata.images["he"]["scale0"].image.shape[1:]
        print(
            f"HER2ST {s}: {len(sdata.shapes['nuclei']):,} nuclei in {dt:.0f} s ({h * w / 1e6 / dt:.2f} MP/s); per "
            f"100 um spot {_spot_counts(sdata, 'nuclei')}",
            flush=True,
        )
        if s != "C2":
            continue
        _overlay(sdata, ["nuclei_labels"], CACHE / "her2st_C2_overlay.png")
        if self_rounds:
            t0 = time.perf_counter()
            model = scellst.im.self_train_segmenter(sdata, rounds=self_rounds, show_progress_bar=False)
            train_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            scellst.im.segment_nuclei(sdata, method=model, key_added="nuclei_self", show_progress_bar=False)
            dt = time.perf_counter() - t0
            print(
                f"HER2ST C2, U-Net self-trained on it ({self_rounds} rounds, {train_s:.0f} s of training at "
                f"{model.config.microns_per_pixel:.3f} um/px): {len(sdata.shapes['nuclei_self']):,} nuclei in "
                f"{dt:.0f} s ({h * w / 1e6 / dt:.2f} MP/s); per 100 um spot {_spot_counts(sdata, 'nuclei_self')}",
                flush=True,
            )
            _overlay(sdata, ["nuclei_labels", "nuclei_self_labels"], CACHE / "her2st_C2_self_overlay.png")


def _hgsc_crops() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The two HGSC H&E crops with their reference nuclei as label images (the nest's own mask; the stroma's
    polygons drawn with ``im._raster.fill_polygons``)."""
    import geopandas as gpd
    from skimage.io import imread

    from scellst.im._raster import fill_polygons

    root = DATA / "histolytics_hgsc"
    nest = imread(root / "hgsc_nest.jpg")[..., :3]
    crops = [("nest", nest, np.load(root / "hgsc_nest_inst_mask.npz")["nuc_raster"].astype(np.int64))]
    stroma = imread(root / "hgsc_stromal_he.jpg")[..., :3]
    polys = gpd.read_parquet(root / "hgsc_stromal_cells.parquet").geometry.to_numpy()
    ref = fill_polygons(list(polys), np.arange(1, len(polys) + 1), stroma.shape[:2], (0, 0), dtype=np.int32)
    crops.append(("stroma", stroma, ref.astype(np.int64)))
    return crops


def hgsc(models: list[str], mpp: float) -> None:
    """Agreement with the HGSC reference nuclei (a model's output, not manual outlines) on another tissue and stain:
    the classical segmenter and each model file of ``models``; an overlay of the nest crop per method
    (benchmarks/results/hgsc_nest_overlay.png: H&E, reference, then each method's outlines)."""
    from skimage.io import imsave
    from skimage.segmentation import find_boundaries

    from scellst.bench import evaluate_segmentation

    methods = ["classical", *models]
    crops = _hgsc_crops()
    panels = {name: [img] for name, img, _ in crops}
    for name, img, ref in crops:
        over = img.copy()
        over[find_boundaries(ref)] = [255, 255, 0]
        panels[name].append(over)
    for method in methods:
        rows, seconds, mp = [], 0.0, 0.0
        for name, img, ref in crops:
            segment(img[:256, :256], mpp, method)  # warm-up: not timed
            t0 = time.perf_counter()
            labels, _ = segment(img, mpp, method)
            seconds += time.perf_counter() - t0
            mp += img.shape[0] * img.shape[1] / 1e6
            row = evaluate_segmentation(labels, ref)
            rows.append(row)
            over = img.copy()
            over[find_boundaries(labels)] = [0, 255, 0]
            panels[name].append(over)
            print(f"HGSC {name} ({ref.max():,} reference nuclei), {method}: {row['n_pred']:,} nuclei, "
                  + ", ".join(f"{k} {row[k]:.3f}" for k in METRICS), flush=True)  # fmt: skip
        print(f"HGSC both crops, {method}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary(rows).items())
              + f"; {mp / seconds:.2f} MP/s", flush=True)  # fmt: skip
    CACHE.mkdir(parents=True, exist_ok=True)
    for name in panels:
        imsave(CACHE / f"hgsc_{name}_overlay.png", np.concatenate(panels[name], axis=1), check_contrast=False)
    print(f"overlays: {CACHE}/hgsc_{{nest,stroma}}_overlay.png (H&E, reference in yellow, then {', '.join(methods)})")


def resolution_check() -> None:
    """The blob scale of the nuclei (``nucleus_scale_um``, the check of a too coarse microns per pixel) on every
    annotated set, at the true resolution and stated 1.5, 2 and 3x too coarse; how many would warn."""
    import xarray as xr

    import scellst
    from scellst.im import nucleus_scale_um
    from scellst.im._segment import NUCLEUS_SCALE_MAX_UM
    from scellst.io import get_microns_per_pixel, image_level0

    def lazy(rgb):
        return xr.DataArray(np.moveaxis(rgb, -1, 0), dims=("c", "y", "x"))

    sets: dict[str, list] = {}  # name -> [(image (c, y, x), true um/px), ...]
    for t in scellst.datasets.annotated_tiles("monuseg", path=DATA / "monuseg"):
        sets[f"MoNuSeg {t['name'][:12]}"] = [(lazy(t["image"]), t["microns_per_pixel"])]
    for p in scellst.datasets.consep_patches(path=DATA / "consep"):  # the patches of each original image, side by side
        sets.setdefault(f"CoNSeP image {p['source_image']}", []).append(p["image"])
    for k in [k for k in sets if k.startswith("CoNSeP")]:
        sets[k] = [(lazy(np.concatenate(sets[k][:8], axis=1)), 0.25)]
    gbm = scellst.datasets.annotated_tiles("gbm40", path=DATA / "gbm40")
    for i in range(0, len(gbm), 8):
        sets[f"GBM40 tiles {i}-{i + 7}"] = [(lazy(np.concatenate([t["image"] for t in gbm[i : i + 8]], axis=1)), 0.25)]
    for s in ("C2", "C3", "C4", "C5"):
        sdata = scellst.datasets.her2st(s, path=DATA / "her2st")
        sets[f"HER2ST {s}"] = [(image_level0(sdata, "he"), get_microns_per_pixel(sdata, "he"))]
    factors = (1.0, 1.5, 2.0, 3.0)
    warned = dict.fromkeys(factors, 0)
    for name, [(arr, mpp)] in sets.items():
        scales = [nucleus_scale_um(arr, microns_per_pixel=mpp * f) for f in factors]
        for f, sc in zip(factors, scales, strict=True):
            warned[f] += sc is not None and sc >= NUCLEUS_SCALE_MAX_UM
        readings = ", ".join(f"x{f:g} {sc:.2f} um" for f, sc in zip(factors, scales, strict=True))
        print(f"  nucleus blob scale, {name}: {readings}")
    print(
        f"Microns per pixel check (warns at a blob scale >= {NUCLEUS_SCALE_MAX_UM} um), {len(sets)} image sets: "
        + ", ".join(f"stated x{f:g}: {warned[f]} warn" for f in factors),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--unet-mpp", type=float, default=0.25, help="working resolution of the U-Nets (um/px)")
    parser.add_argument("--base-channels", type=int, default=32, help="width of the U-Nets' first level")
    parser.add_argument("--depth", type=int, default=3, help="down-sampling levels of the U-Nets")
    parser.add_argument(
        "--encoder",
        default=None,
        choices=["efficientnet-lite0", "efficientnet-lite2"],
        help="U-Nets on an ImageNet-pretrained encoder (train_segmenter(encoder=...)) instead of from scratch",
    )
    parser.add_argument("--save-models", default=None, help="folder where the MoNuSeg fold models are saved")
    parser.add_argument("--crop-size", type=int, default=128, help="train_segmenter(crop_size=...)")
    parser.add_argument("--batch-size", type=int, default=8, help="train_segmenter(batch_size=...)")
    parser.add_argument("--device", default="auto", help="train_segmenter(device=...): auto, cpu, cuda")
    parser.add_argument("--num-workers", type=int, default=0, help="train_segmenter(num_workers=...)")
    parser.add_argument(
        "--extra",
        default="consep,gbm40",
        help="extra training sets for the MoNuSeg U-Nets, comma-separated from: consep, gbm40 ('' for none)",
    )
    parser.add_argument(
        "--monuseg-weight",
        type=float,
        default=1.0,
        help="sampling weight of a MoNuSeg pixel against an --extra one (train_segmenter(image_weights=...))",
    )
    parser.add_argument(
        "--hv",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="U-Nets also predict centre offsets (train_segmenter(hv=...))",
    )
    parser.add_argument(
        "--zoom", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"), help="train_segmenter(zoom=...)"
    )
    parser.add_argument("--blur", type=float, default=0.0, help="train_segmenter(blur=...)")
    parser.add_argument(
        "--n-folds", type=int, default=2, help="MoNuSeg cross-validation folds (2: train on even / odd tiles)"
    )
    parser.add_argument(
        "--folds", default=None, help="MoNuSeg folds to train and score, comma-separated (default: all)"
    )
    parser.add_argument("--seed", type=int, default=0, help="MoNuSeg fold k trains with seed SEED + k")
    parser.add_argument("--large", type=int, default=20000)
    parser.add_argument("--self-train", action="store_true", help="also score self_train_segmenter on MoNuSeg")
    parser.add_argument("--self-rounds", type=int, default=3, help="self_train_segmenter(rounds=...)")
    parser.add_argument(
        "--fine-tune",
        type=int,
        default=0,
        metavar="STEPS",
        help="also train a U-Net on the --extra sets only and fine-tune it for STEPS steps on each MoNuSeg fold",
    )
    parser.add_argument(
        "--fine-tune-tiles",
        default=None,
        help="with --fine-tune: fine-tune on the first N MoNuSeg tiles of each fold, for each N of this "
        "comma-separated list (default: all the fold's tiles)",
    )
    parser.add_argument("--skip-unet", action="store_true", help="only the classical segmenter on MoNuSeg/CoNSeP")
    parser.add_argument("--skip-monuseg", action="store_true")
    parser.add_argument("--skip-consep", action="store_true")
    parser.add_argument("--skip-her2st", action="store_true")
    parser.add_argument("--skip-resolution", action="store_true", help="skip the microns-per-pixel check readings")
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument(
        "--hgsc",
        nargs="*",
        default=None,
        metavar="MODEL",
        help="agreement with the HGSC reference nuclei (ovarian carcinoma): classical and these model files",
    )
    parser.add_argument(
        "--hgsc-mpp",
        type=float,
        default=0.25,
        help="microns per pixel of the HGSC crops (not stated with the data; see docs/segmentation.md)",
    )
    args = parser.parse_args()
    import logging

    logging.getLogger("scellst").setLevel(logging.WARNING)
    unet_kwargs = {
        "n_steps": args.steps,
        "working_mpp": args.unet_mpp,
        "base_channels": args.base_channels,
        "depth": args.depth,
        "crop_size": args.crop_size,
        "batch_size": args.batch_size,
        "device": args.device,
        "num_workers": args.num_workers,
        "hv": args.hv,
        "encoder": args.encoder,
        "zoom": args.zoom,
        "blur": args.blur,
    }
    if not args.skip_monuseg:
        extra = [e for e in args.extra.split(",") if e]
        if unknown := set(extra) - set(EXTRA_SETS):
            parser.error(f"--extra: unknown training sets {sorted(unknown)}; choose from {sorted(EXTRA_SETS)}")
        if not 2 <= args.n_folds <= 13:
            parser.error(f"--n-folds: between 2 and 13 (the MoNuSeg tiles), got {args.n_folds}")
        all_folds = range(args.n_folds)
        folds = list(all_folds) if args.folds is None else [int(k) for k in args.folds.split(",") if k.strip()]
        if not folds or set(folds) - set(all_folds):
            parser.error(f"--folds: comma-separated from 0 to {args.n_folds - 1}, got {args.folds!r}")
        tiles, classical = monuseg(
            unet_kwargs,
            extra,
            folds,
            n_folds=args.n_folds,
            monuseg_weight=args.monuseg_weight,
            seed=args.seed,
            unet=not args.skip_unet,
            save_models=args.save_models,
        )
        if args.fine_tune:
            if not extra:
                parser.error("--fine-tune needs public training sets (--extra)")
            n_tiles = None
            if args.fine_tune_tiles is not None:
                n_tiles = [int(n) for n in args.fine_tune_tiles.split(",") if n.strip()]
                if not n_tiles or min(n_tiles) < 1:
                    parser.error(f"--fine-tune-tiles: positive tile counts, got {args.fine_tune_tiles!r}")
            fine_tuning(tiles, unet_kwargs, extra, args.fine_tune, n_tiles=n_tiles, seed=args.seed)
        if args.self_train:
            self_training(tiles, classical, args.self_rounds, seed=args.seed)
    if not args.skip_consep:
        consep(unet_kwargs, unet=not args.skip_unet)
    if not args.skip_resolution:
        resolution_check()
    if not args.skip_large:
        large(args.large)
    if not args.skip_her2st:
        her2st(args.self_rounds if args.self_train else None)
    if args.hgsc is not None:
        hgsc(args.hgsc, args.hgsc_mpp)
    print(f"peak memory (max RSS): {peak_memory_gib():.2f} GiB")


if __name__ == "__main__":
    main()
