"""HER2ST leave-one-section-out (C2-C5): sCellST-MIL (MSE, NB) beside spot-level ridge and MLP baselines.

Usage (from the repository root, with ../shared/data present):

    python benchmarks/her2st_cv.py [--gene-sets hvg:50 hvg:500 svg:50 svg:500] [--sections C2 C3 C4 C5]

For every gene set, each section is predicted by models trained on the three others (genes selected on the
training sections only). Prints one table: mean Pearson and Spearman over genes, averaged over the four folds,
and the mean training time per fold. The tidy per-gene results go to benchmarks/results/her2st_cv.csv.
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
from _common import CACHE, her2st_section, peak_memory_gib


def main() -> None:
    import scellst

    parser = argparse.ArgumentParser()
    parser.add_argument("--sections", nargs="+", default=["C2", "C3", "C4", "C5"])
    parser.add_argument("--gene-sets", nargs="+", default=["hvg:50", "hvg:500", "svg:50", "svg:500"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    slides = {s: her2st_section(s) for s in args.sections}
    models = {"sCellST-MIL (MSE)": {"loss": "mse"}, "sCellST-MIL (NB)": {"loss": "nb"}}
    frames = []
    t0 = time.perf_counter()
    for spec in args.gene_sets:
        flavor, n = spec.split(":")
        df = scellst.bench.cross_validate(
            slides, models=models, baselines=("ridge", "spot_mlp"), flavor=flavor, n_genes=int(n), seed=args.seed
        )
        df.insert(0, "genes", f"top {n} {flavor.upper()}")
        frames.append(df)
        print(f"  {spec} done after {time.perf_counter() - t0:.0f} s", flush=True)
    tidy = pd.concat(frames, ignore_index=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    tidy.to_csv(CACHE / "her2st_cv.csv", index=False)

    per_fold = tidy.groupby(["genes", "model", "fold"]).agg(
        pearson=("pearson", "mean"), spearman=("spearman", "mean"), seconds=("train_seconds", "first")
    )
    table = per_fold.groupby(["genes", "model"]).agg(
        pearson=("pearson", "mean"),
        pearson_sd=("pearson", "std"),
        spearman=("spearman", "mean"),
        train_s=("seconds", "mean"),
    )
    pd.set_option("display.width", 160)
    print("\nHER2ST leave-one-section-out, mean over genes then over the 4 held-out sections:")
    print(table.round(3).to_string())
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; peak memory (max RSS) {peak_memory_gib():.2f} GiB")


if __name__ == "__main__":
    main()
