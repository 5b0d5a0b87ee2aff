"""HER2ST: train sCellST on sections C2-C4, predict C5, report spot-level Pearson over the top HVGs.

Usage (from the repository root, with ../shared/data present):

    python benchmarks/her2st_loso.py [--train C2 C3 C4] [--test C5] [--n-genes 50] [--cache benchmarks/results]

Prints the mean Pearson/Spearman on the held-out section for the model and for the same model trained on
shuffled spot labels (spot expression permuted across spots within each training section), the time of each
stage and the peak memory.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _common import her2st_section, peak_memory_gib


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

    slides = {s: her2st_section(s, data=args.data, cache=args.cache) for s in [*args.train, args.test]}

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
        corr = scellst.bench.evaluate(test)
        results[label] = corr
        print(
            f"{label:>22}: mean Pearson {corr['pearson'].mean():.3f}, mean Spearman {corr['spearman'].mean():.3f} "
            f"on {args.test} over {len(corr)} genes (train {dt:.0f} s, best epoch {model.params['best_epoch']})"
        )
    top = results["model"].sort_values("pearson", ascending=False).head(10)
    print("best genes:", ", ".join(f"{g} {r:.2f}" for g, r in top["pearson"].items()))
    print(f"peak memory (max RSS): {peak_memory_gib():.2f} GiB")


if __name__ == "__main__":
    main()
