"""HER2ST: train sCellST on sections C2-C4, predict C5, report spot-level Pearson over the top HVGs.

Usage (from the repository root, with ../shared/data present):

    python benchmarks/her2st_loso.py [--train C2 C3 C4] [--test C5] [--n-genes 50] [--cache benchmarks/results]

Prints the mean Pearson/Spearman on the held-out section for the model and for the same model trained on
shuffled spot labels (spot expression permuted across spots within each training section), the time of each
stage and the peak memory.
"""

from __future__ import annotations

import argparse
import resource
import time
import warnings
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore")


def prepare(section: str, data: Path, cache: Path):
    import spatialdata as sd

    import scellst

    store = cache / f"her2st_{section}.zarr"
    if store.exists():
        return sd.read_zarr(store), {}
    times = {}
    t = time.perf_counter()
    sdata = scellst.datasets.her2st(section, path=data / "her2st")
    times["read"] = time.perf_counter() - t
    t = time.perf_counter()
    scellst.pp.segment_nuclei(sdata, show_progress_bar=False)
    times["segment"] = time.perf_counter() - t
    scellst.pp.assign_cells(sdata)
    t = time.perf_counter()
    scellst.tl.embed_cells(sdata, show_progress_bar=False)
    times["embed"] = time.perf_counter() - t
    cache.mkdir(parents=True, exist_ok=True)
    sdata.write(store)
    return sd.read_zarr(store), times


def main() -> None:
    import scellst

    parser = argparse.ArgumentParser()
    parser.add_argument("--train", nargs="+", default=["C2", "C3", "C4"])
    parser.add_argument("--test", default="C5")
    parser.add_argument("--n-genes", type=int, default=50)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    slides = {}
    for s in [*args.train, args.test]:
        slides[s], times = prepare(s, args.data, args.cache)
        n = len(slides[s].shapes["nuclei"])
        img = slides[s].images["he"]["scale0"].image.shape
        cells = slides[s].tables["spots_counts"].obs["n_cells"]
        msg = ", ".join(f"{k} {v:.1f} s" for k, v in times.items()) or "cached"
        print(f"{s}: image {img[2]}x{img[1]} px, {n:,} nuclei, median {cells.median():.0f} per spot ({msg})")

    train = [slides[s] for s in args.train]
    test = slides[args.test]
    results = {}
    for label in ("model", "shuffled spot labels"):
        originals = []
        if label != "model":
            rng = np.random.default_rng(args.seed)
            for s in train:
                t = s.tables["spots_counts"]
                originals.append(t.X)
                t.X = t.X[rng.permutation(t.n_obs)]
        t0 = time.perf_counter()
        model = scellst.tl.train(train, n_top_genes=args.n_genes, seed=args.seed, show_progress_bar=False)
        dt = time.perf_counter() - t0
        for s, x in zip(train, originals, strict=False):
            s.tables["spots_counts"].X = x
        scellst.tl.predict(test, model, overwrite=True)
        corr = scellst.tl.evaluate(test)
        results[label] = corr
        print(
            f"{label:>22}: mean Pearson {corr['pearson'].mean():.3f}, mean Spearman {corr['spearman'].mean():.3f} "
            f"on {args.test} over {len(corr)} genes (train {dt:.0f} s, best epoch {model.params['best_epoch']})"
        )
    top = results["model"].sort_values("pearson", ascending=False).head(10)
    print("best genes:", ", ".join(f"{g} {r:.2f}" for g, r in top["pearson"].items()))
    print(f"peak memory (max RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.2f} GiB")


if __name__ == "__main__":
    main()
