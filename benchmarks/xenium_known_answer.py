"""compare_xenium on a case with known answers: Xenium cells written from the synthetic tissue's truth.

Usage (from the repository root):

    python benchmarks/xenium_known_answer.py [--size-um 1200] [--seed 0]

Trains sCellST on the synthetic Visium-like spots, writes the true cells as a Xenium output folder in a shifted
micron frame (with the H&E alignment file), reads it back with the H&E registered, segments, embeds and predicts
the H&E nuclei, and prints the matching rate, the median matching distance and the per-gene correlations of
``scellst.bench.compare_xenium``, beside ``scellst.bench.evaluate(level="cell")`` against the same truth.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import peak_memory_gib


def main() -> None:
    import scellst
    from scellst.io import image_level0

    parser = argparse.ArgumentParser()
    parser.add_argument("--size-um", type=float, default=1200.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    t0 = time.perf_counter()
    tissue = scellst.datasets.synthetic_tissue(seed=args.seed, size_um=(args.size_um, args.size_um))
    scellst.im.segment_nuclei(tissue, show_progress_bar=False)
    scellst.pp.assign_cells(tissue)
    scellst.im.embed_cells(tissue, show_progress_bar=False)
    model = scellst.tl.train(tissue, seed=args.seed, lr=1e-3, show_progress_bar=False)
    scellst.tl.predict(tissue, model)
    cell_level = scellst.bench.evaluate(tissue, level="cell")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        scellst.datasets.write_synthetic_xenium(tissue, folder, offset_um=(250.0, -80.0))
        he = np.asarray(image_level0(tissue, "he").data.compute())
        xs = scellst.io.xenium(folder, he_image=he, alignment=folder / "he_imagealignment.csv")
    scellst.im.segment_nuclei(xs, show_progress_bar=False)
    scellst.im.embed_cells(xs, show_progress_bar=False)
    scellst.tl.predict(xs, model, spots_key=None)
    df = scellst.bench.compare_xenium(xs, max_distance_um=5.0)
    a = df.attrs
    print(
        f"{len(xs.shapes['nuclei']):,} H&E nuclei, {xs.tables['xenium_table'].n_obs:,} Xenium cells: matched "
        f"{a['matched_fraction_predicted']:.1%} of nuclei and {a['matched_fraction_xenium']:.1%} of Xenium cells, "
        f"median distance {a['median_distance_um']:.2f} um"
    )
    print(
        f"compare_xenium: mean Pearson {df['pearson'].mean():.3f}, mean Spearman {df['spearman'].mean():.3f} over "
        f"{len(df)} genes (measured = sampled true counts, log-normalised)"
    )
    print(
        f"evaluate(level='cell') on the same tissue vs the true expected expression: mean Pearson "
        f"{cell_level['pearson'].mean():.3f}"
    )
    print(f"{time.perf_counter() - t0:.0f} s; peak memory (max RSS) {peak_memory_gib():.2f} GiB")


if __name__ == "__main__":
    main()
