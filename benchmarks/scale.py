"""Training and prediction cost at slide scale: 1 million cells in 5,000 spots (synthetic features).

Usage (from the repository root):

    python benchmarks/scale.py [--cells 1000000] [--spots 5000] [--genes 50] [--epochs 3]

Prints the training time per epoch (every cell of every spot goes through the network each epoch), the
prediction throughput in cells per second, and the peak memory. Prediction streams a dask array of features
chunk by chunk, so the features of all cells are never in memory at once.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import peak_memory_gib


def main() -> None:
    import anndata as ad
    import dask.array as da
    import pandas as pd

    from scellst.tl import FitSettings, Slide, fit_slides

    parser = argparse.ArgumentParser()
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--spots", type=int, default=5000)
    parser.add_argument("--genes", type=int, default=50)
    parser.add_argument("--features", type=int, default=25)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    features = rng.normal(size=(args.cells, args.features)).astype(np.float32)
    bags = np.array_split(rng.permutation(args.cells), args.spots)
    w = rng.normal(size=(args.features, args.genes)).astype(np.float32) * 0.3
    rate = np.exp(features @ w)
    counts = np.stack([rng.poisson(rate[b].sum(axis=0)) for b in bags]).astype(np.float32)
    table = ad.AnnData(X=counts, var=pd.DataFrame(index=[f"g{i}" for i in range(args.genes)]))
    xy = np.column_stack([np.arange(args.spots) % 70, np.arange(args.spots) // 70]).astype(float) * 100
    slide = Slide(
        "synthetic",
        features,
        bags,
        table,
        xy,
        np.arange(args.spots).astype(str),
        [f"f{i}" for i in range(args.features)],
        "synthetic",
    )
    print(f"{args.cells:,} cells in {args.spots:,} spots ({args.cells // args.spots} per spot), {args.genes} genes")
    before = peak_memory_gib()
    t0 = time.perf_counter()
    model = fit_slides(
        [slide],
        list(table.var_names),
        settings=FitSettings(max_epochs=args.epochs, patience=10**6, show_progress_bar=False),
        val_fraction=0.1,
    )
    train_s = time.perf_counter() - t0
    print(
        f"training: {train_s / args.epochs:.1f} s per epoch (batch of 8 spots; {args.epochs} epochs in {train_s:.0f} s);"
        f" peak memory {peak_memory_gib():.2f} GiB (data alone {before:.2f} GiB)"
    )

    lazy = da.from_array(features, chunks=(100_000, args.features))
    t0 = time.perf_counter()
    out = model.predict_cells(lazy, batch_size=65536)
    dt = time.perf_counter() - t0
    print(
        f"prediction: {args.cells / dt:,.0f} cells/s ({dt:.1f} s for {out.shape[0]:,} cells x {out.shape[1]} genes,"
        " streamed in chunks of 100,000)"
    )
    print(f"peak memory (max RSS): {peak_memory_gib():.2f} GiB")


if __name__ == "__main__":
    main()
