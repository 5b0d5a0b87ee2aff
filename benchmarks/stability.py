"""Per-cell stability of MIL predictions across seeds, for single models and ensembles (HER2ST).

Usage (from the repository root):

    python benchmarks/stability.py [--n-models 5] [--n-genes 50]

MIL only sees spot averages, so the split of a spot's expression among its cells is weakly identified. For two
models trained with different seeds (on C2-C4, predicting C5), this prints the per-gene Pearson correlation of their
per-cell predictions *within spots* (each spot's mean removed), averaged over genes, next to their spot-level scores:
for single models and for two ensembles of ``--n-models`` members each.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import her2st_section, peak_memory_gib


def within_spot_agreement(a: np.ndarray, b: np.ndarray, bags: list[np.ndarray]) -> float:
    """Mean over genes of the Pearson correlation of within-spot-centred predictions of two models."""
    from scellst.bench import metrics_per_gene

    ca = np.concatenate([a[i] - a[i].mean(axis=0) for i in bags])
    cb = np.concatenate([b[i] - b[i].mean(axis=0) for i in bags])
    return float(metrics_per_gene(ca, cb, [str(i) for i in range(a.shape[1])])["pearson"].mean())


def main() -> None:
    import scellst
    from scellst.tl import prepare_slide

    parser = argparse.ArgumentParser()
    parser.add_argument("--n-models", type=int, default=5)
    parser.add_argument("--n-genes", type=int, default=50)
    args = parser.parse_args()
    train = [her2st_section(s) for s in ("C2", "C3", "C4")]
    test = her2st_section("C5")
    slide = prepare_slide(test, min_spot_counts=1)
    genes = scellst.pp.select_genes(train, n_genes=args.n_genes)
    for label, k, seeds in (("single model", 1, (0, 1)), (f"ensemble of {args.n_models}", args.n_models, (0, 100))):
        preds, spot_scores = [], []
        t0 = time.perf_counter()
        for seed in seeds:
            model = scellst.tl.train(train, genes=genes, n_models=k, seed=seed, show_progress_bar=False)
            preds.append(model.predict_cells(slide.features))
            spot_scores.append(scellst.bench.evaluate(test, model)["pearson"].mean())
        agree = within_spot_agreement(preds[0], preds[1], slide.bags)
        overall = scellst.bench.metrics_per_gene(preds[0], preds[1], genes)["pearson"].mean()
        print(
            f"{label:>16}: within-spot per-cell agreement between seeds r = {agree:.3f} "
            f"(all cells, spot means kept: {overall:.3f}); spot-level Pearson on C5: "
            f"{spot_scores[0]:.3f} / {spot_scores[1]:.3f} ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    print(f"peak memory (max RSS): {peak_memory_gib():.2f} GiB")


if __name__ == "__main__":
    main()
