"""Held-out sections: how the default pipeline generalises to HER2ST sections it never saw (C2-C5).

Usage (from the repository root, with ../shared/data present):

    python benchmarks/generalisation.py [--parts loso ablation curve stain stability] [--sections C2 C3 C4 C5]

Every figure is a spot-level Pearson correlation per gene (mean of each spot's predicted cells against log1p CP10k
of the measured counts, spots with >= 20 counts), averaged over the top 50 HVG chosen (batch-aware) on the training
sections only, then over the held-out sections. Parts:

- ``loso``: leave-one-section-out for the default call ``tl.train(slides)`` and for each model of the registry and the
  spot-level baselines (same embeddings, same genes), per fold, with the training time per fold;
- ``ablation``: what each addition to the default brings (the cell's own features only, neighbourhood radii, one
  network instead of an ensemble, per-slide vs global feature scaling, learning rate, early stopping);
- ``curve``: the learning curve: the default trained on every subset of 1, 2 and 3 of the other sections;
- ``stain``: the drop when the held-out section is re-coloured or degraded (HED jitter, Macenko to another lab's
  stain, JPEG, blur, rescanning at 0.5 um/px), re-segmented and re-embedded, then predicted by the default;
  ``--shifts macenko_same_nuclei`` keeps the original nuclei (splits the Macenko drop into segmentation and features);
- ``stability``: the default trained on C2-C4 with two seeds, per-cell agreement within C5's spots.
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import pandas as pd
from _common import CACHE, DATA, her2st_section, peak_memory_gib

N_GENES = 50
OWN = 25  # the cell's own morphology features come first in the default embedding table


def _mean_by_fold(df: pd.DataFrame) -> pd.DataFrame:
    per_fold = df.groupby(["model", "fold"], sort=False).agg(
        pearson=("pearson", "mean"), seconds=("train_seconds", "first")
    )
    table = per_fold["pearson"].unstack("fold")
    table["mean"] = table.mean(axis=1)
    table["train s / fold"] = per_fold["seconds"].groupby("model", sort=False).mean()
    return table


def _print(title: str, table: pd.DataFrame) -> None:
    pd.set_option("display.width", 200)
    print(f"\n{title}\n{table.round(3).to_string()}", flush=True)


def part_loso(slides, seed: int) -> pd.DataFrame:
    import scellst

    models = {
        "default: tl.train(slides)": {},
        "scellst (MIL), one network": {"model": "scellst", "n_models": 1},
        "default with per-slide z-scores (before)": {"embedding_scaling": "slide"},
        "deepspot2cell": {"model": "deepspot2cell"},
        "miso": {"model": "miso"},
    }
    df = scellst.bench.cross_validate(
        slides, models=models, baselines=("ridge", "spot_mlp"), n_genes=N_GENES, seed=seed
    )
    table = _mean_by_fold(df)
    _print("Leave-one-section-out (same embeddings, same genes per fold):", table)
    base = table.loc["spot_mlp", list(slides)]
    above = (table.loc["default: tl.train(slides)", list(slides)] > base).all()
    print(f"default above the spot-MLP baseline on every fold: {bool(above)}")
    return df


def _with_table(slides, key: str, x_of) -> None:
    """Add an embedding table ``key`` to every slide (in memory), its X made from the default table by ``x_of``."""
    import anndata as ad

    for s in slides.values():
        t = s.tables["nuclei_embeddings"]
        x, names = x_of(s, t)
        new = ad.AnnData(X=x, obs=t.obs.copy(), var=pd.DataFrame(index=names), uns=dict(t.uns))
        new.obsm["spatial"] = t.obsm["spatial"]
        s.tables[key] = new


def part_ablation(slides, seed: int) -> pd.DataFrame:
    """One change at a time, on single networks (embeddings rebuilt in memory from the cells' own features)."""
    import scellst
    from scellst.im import context_feature_names
    from scellst.io import get_microns_per_pixel

    one = {"n_models": 1}

    def variant(radii):
        def x_of(s, t):
            own = np.asarray(t.X[:, :OWN])
            names = list(t.var_names[:OWN])
            if not radii:
                return own, names
            xy = np.asarray(t.obsm["spatial"]) * get_microns_per_pixel(s, "he")
            ctx = scellst.im.neighbourhood_features(xy, own, radii)
            return np.concatenate([own, ctx], axis=1), names + context_feature_names(names, radii)

        return x_of

    rows = []
    for label, radii in (
        ("own features only (25)", ()),
        ("+ neighbourhood 50 um", (50,)),
        ("+ neighbourhood 25, 50 um", (25, 50)),
        ("+ neighbourhood 50, 100, 200 um", (50, 100, 200)),
    ):
        key = "ablation_" + "_".join(str(r) for r in radii)
        _with_table(slides, key, variant(radii))
        df = scellst.bench.cross_validate(slides, models={label: one}, baselines=(), n_genes=N_GENES, seed=seed,
                                       table_key=key)  # fmt: skip
        rows.append(df)
        print(f"  {label}: {df.groupby('fold')['pearson'].mean().mean():.3f}", flush=True)
    settings = {
        "default embedding (50, 100, 200, 400 um), one network": one,
        "per-slide z-scores instead of quantiles": {**one, "embedding_scaling": "slide"},
        "global instead of per-slide feature scaling": {**one, "embedding_scaling": "global"},
        "patience 100 epochs (default 30)": {**one, "patience": 100},
    }
    rows.append(scellst.bench.cross_validate(slides, models=settings, baselines=(), n_genes=N_GENES, seed=seed))
    table = _mean_by_fold(pd.concat(rows, ignore_index=True))
    _print("Ablation on one network (each row changes one thing; the default ensembles five):", table)
    return table


def part_curve(slides, seed: int, *, genes_from: str = "fixed") -> pd.DataFrame:
    """The default trained on every subset of 1, 2, 3 of the other sections.

    ``genes_from="fixed"`` scores every subset on the same genes (the top HVG of all the other sections, chosen once
    per held-out section), so that the curve shows what more sections bring; ``"subset"`` lets each subset choose
    its own genes (what a user with fewer sections would do), whose scores are on different gene sets.
    """
    import scellst

    rows = []
    names = list(slides)
    for test in names:
        others = [n for n in names if n != test]
        fixed = scellst.pp.select_genes([slides[n] for n in others], n_genes=N_GENES)
        for k in range(1, len(others) + 1):
            for subset in itertools.combinations(others, k):
                t0 = time.perf_counter()
                train = [slides[n] for n in subset]
                genes = fixed if genes_from == "fixed" else scellst.pp.select_genes(train, n_genes=N_GENES)
                model = scellst.tl.train(train, genes=genes, seed=seed, show_progress_bar=False)
                seconds = time.perf_counter() - t0
                r = scellst.bench.evaluate(slides[test], model)["pearson"].mean()
                rows.append({"test": test, "n_sections": k, "train": "+".join(subset), "pearson": r, "seconds": seconds,
                             "best_epochs": model.params["best_epochs"]})  # fmt: skip
                print(f"  {'+'.join(subset):>10} -> {test}: {r:.3f} ({seconds:.0f} s, best epochs "
                      f"{model.params['best_epochs']})", flush=True)  # fmt: skip
    df = pd.DataFrame(rows)
    curve = df.groupby(["n_sections", "test"])["pearson"].mean().unstack("test")
    curve["mean"] = curve.mean(axis=1)
    curve["train s"] = df.groupby("n_sections")["seconds"].mean()
    _print(
        f"Learning curve, genes {genes_from} (mean over the subsets of each size; columns: held-out section):", curve
    )
    return df


def _perturbed_slide(section: str, name: str, target_rgb: np.ndarray):
    """The held-out section re-coloured or degraded, re-segmented, assigned and embedded (cached)."""
    import spatialdata as sd
    from _stain import blur, hed_jitter, jpeg, macenko_to, resample

    import scellst
    from scellst._utils import instance_ids, shapes_centroids, to_rgb_uint8
    from scellst.io import get_microns_per_pixel, image_level0

    store = CACHE / f"her2st_{section}_{name}.zarr"
    if store.exists():
        return sd.read_zarr(store)
    src = her2st_section(section, verbose=False)
    rgb = to_rgb_uint8(np.asarray(image_level0(src, "he").data))
    mpp = get_microns_per_pixel(src, "he")
    factor = 1.0
    if name == "hed_strong_h":
        out = hed_jitter(rgb, scale=(1.25, 0.8, 1.0), shift=(0.02, -0.02, 0.0))
    elif name == "hed_weak_h":
        out = hed_jitter(rgb, scale=(0.8, 1.25, 1.0), shift=(-0.02, 0.02, 0.0))
    elif name in ("macenko_other_lab", "macenko_same_nuclei"):
        out = macenko_to(rgb, target_rgb)
    elif name == "jpeg_q30":
        out = jpeg(rgb, quality=30)
    elif name == "blur_1um":
        out = blur(rgb, sigma_px=1.0 / mpp)
    elif name == "rescan_0.5um":
        factor = mpp / 0.5
        out = resample(rgb, factor)
    else:
        raise ValueError(name)
    del rgb
    table = src.tables["spots_counts"]
    x = table.X.toarray() if hasattr(table.X, "toarray") else np.asarray(table.X)
    counts = pd.DataFrame(x, index=instance_ids(table).astype(str), columns=table.var_names)
    xy = shapes_centroids(src.shapes["spots"]) * factor
    spots = pd.DataFrame(xy, columns=["x", "y"], index=src.shapes["spots"].index.astype(str)).loc[counts.index]
    new = scellst.io.from_spots(
        out, spot_xy=spots, spot_diameter_um=100.0, counts=counts, microns_per_pixel=mpp / factor
    )
    if name == "macenko_same_nuclei":  # diagnostic: the original nuclei, so only the cells' features see the stain
        from spatialdata.models import ShapesModel

        new.shapes["nuclei"] = ShapesModel.parse(src.shapes["nuclei"].copy())  # keeps its transformations
    else:
        scellst.im.segment_nuclei(new, show_progress_bar=False)
    scellst.pp.assign_cells(new)
    scellst.im.embed_cells(new, show_progress_bar=False)
    new.write(store)
    return sd.read_zarr(store)


STAIN_SHIFTS = ("hed_strong_h", "hed_weak_h", "macenko_other_lab", "jpeg_q30", "blur_1um", "rescan_0.5um")


def part_stain(slides, seed: int, *, tests, shifts=STAIN_SHIFTS) -> pd.DataFrame:
    from PIL import Image

    import scellst

    target = np.asarray(Image.open(DATA / "wsi_formats" / "tiatoolbox_target_he_tile.png").convert("RGB"))
    rows = []
    names = list(slides)
    for test in tests:
        model = scellst.tl.train([slides[n] for n in names if n != test], n_top_genes=N_GENES, seed=seed,
                                 show_progress_bar=False)  # fmt: skip
        clean = scellst.bench.evaluate(slides[test], model)["pearson"].mean()
        row = {"test": test, "original": clean}
        for shift in shifts:
            t0 = time.perf_counter()
            shifted = _perturbed_slide(test, shift, target)
            row[shift] = scellst.bench.evaluate(shifted, model)["pearson"].mean()
            n = len(shifted.shapes["nuclei"])
            print(f"  {test} {shift}: {row[shift]:.3f} (original {clean:.3f}; {n:,} nuclei; "
                  f"{time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
        rows.append(row)
    df = pd.DataFrame(rows).set_index("test")
    drop = df[list(shifts)].rsub(df["original"], axis=0)
    drop.loc["mean"] = drop.mean()
    _print("Stain shift: PCC of the original minus PCC of the shifted held-out section:", drop)
    return df


def part_stability(slides, seed: int) -> None:
    from stability import within_spot_agreement

    import scellst
    from scellst.tl import prepare_slide

    names = list(slides)
    train, test = [slides[n] for n in names[:-1]], slides[names[-1]]
    slide = prepare_slide(test, min_spot_counts=1)
    genes = scellst.pp.select_genes(train, n_genes=N_GENES)
    preds, scores = [], []
    for s in (seed, seed + 1):
        model = scellst.tl.train(train, genes=genes, seed=s, show_progress_bar=False)
        preds.append(model.predict_cells(slide.features))
        scores.append(scellst.bench.evaluate(test, model)["pearson"].mean())
    agree = within_spot_agreement(preds[0], preds[1], slide.bags)
    spread = np.mean([np.mean([p[b].std(axis=0).mean() for b in slide.bags]) for p in preds])
    between = np.mean([p.std(axis=0).mean() for p in preds])
    print(
        f"\nStability, default trained on {'+'.join(names[:-1])} with seeds {seed} and {seed + 1}, on {names[-1]}: "
        f"within-spot per-cell agreement r = {agree:.3f}; spot-level Pearson {scores[0]:.3f} / {scores[1]:.3f}; "
        f"per-cell spread within spots {spread:.3f} (sd over all cells {between:.3f}, log-normalised units)"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", nargs="+", default=["loso", "ablation", "curve", "stain", "stability"])
    parser.add_argument("--sections", nargs="+", default=["C2", "C3", "C4", "C5"])
    parser.add_argument("--stain-sections", nargs="+", default=None, help="held-out sections of the stain part")
    parser.add_argument("--shifts", nargs="+", default=list(STAIN_SHIFTS))
    parser.add_argument(
        "--curve-genes",
        choices=["fixed", "subset"],
        default="fixed",
        help="learning curve: one gene set per held-out section, or genes chosen on each subset",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    t0 = time.perf_counter()
    slides = {s: her2st_section(s) for s in args.sections}
    for part in args.parts:
        t = time.perf_counter()
        if part == "loso":
            part_loso(slides, args.seed)
        elif part == "ablation":
            part_ablation(slides, args.seed)
        elif part == "curve":
            part_curve(slides, args.seed, genes_from=args.curve_genes)
        elif part == "stain":
            part_stain(slides, args.seed, tests=args.stain_sections or args.sections, shifts=args.shifts)
        elif part == "stability":
            part_stability(slides, args.seed)
        else:
            raise SystemExit(f"unknown part {part!r}")
        print(f"[{part}: {time.perf_counter() - t:.0f} s]", flush=True)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; peak memory (max RSS) {peak_memory_gib():.2f} GiB")


if __name__ == "__main__":
    main()
