"""HER2ST held-out section at cell level: do predicted marker genes follow nuclear morphology and cell types?

Usage (from the repository root):

    python benchmarks/her2st_cells.py [--n-genes 500]

Trains sCellST on C2-C4 (top HVGs plus epithelial, immune and stromal markers) and predicts every nucleus of C5.
Prints (1) the nuclear morphology of the top-10 % cells for each marker score against all cells, and (2) the
Pearson correlation, over C5 spots, between the spot average of each predicted score and the stereoscope
proportions of the matching cell types (``her2st/deconv``).
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
from _common import her2st_section, peak_memory_gib

MARKERS = {
    "epithelial": ["EPCAM", "KRT8", "KRT18", "KRT19"],
    "immune": ["PTPRC", "CD74", "CD52", "IGKC", "JCHAIN"],
    "stromal": ["COL1A1", "COL1A2", "COL3A1", "DCN", "LUM"],
}
DECONV = {
    "epithelial": ["Epithelial"],
    "immune": ["T-cells", "B-cells", "Myeloid", "Plasma Cells"],
    "stromal": ["CAFs", "PVL", "Endothelial"],
}
MORPHOLOGY = ["area_um2", "eccentricity", "hematoxylin_mean", "neighbours_25um"]


def main() -> None:
    import scellst

    parser = argparse.ArgumentParser()
    parser.add_argument("--n-genes", type=int, default=500)
    args = parser.parse_args()
    train = [her2st_section(s) for s in ("C2", "C3", "C4")]
    test = her2st_section("C5")
    shared = set.intersection(*[set(s.tables["spots_counts"].var_names) for s in [*train, test]])
    markers = {k: [g for g in v if g in shared] for k, v in MARKERS.items()}
    genes = scellst.pp.select_genes(train, n_genes=args.n_genes)
    genes = list(dict.fromkeys(genes + [g for v in markers.values() for g in v]))
    model = scellst.tl.train(train, genes=genes, show_progress_bar=False)
    scellst.tl.predict(test, model, overwrite=True)
    cells = test.tables["nuclei_expression"]
    print(
        f"C5: {cells.n_obs:,} cells predicted; spot-level mean Pearson {scellst.bench.evaluate(test)['pearson'].mean():.3f}"
    )

    x = pd.DataFrame(cells.X, columns=cells.var_names)
    z = (x - x.mean()) / x.std().replace(0, 1)
    scores = pd.DataFrame({k: z[v].mean(axis=1) for k, v in markers.items()})
    emb = test.tables["nuclei_embeddings"]
    morph = pd.DataFrame(emb.X, columns=emb.var_names)[MORPHOLOGY]
    rows = {"all cells": morph.mean()}
    for k in markers:
        top = scores[k] >= scores[k].quantile(0.9)
        rows[f"top 10% {k}"] = morph[top.to_numpy()].mean()
    pd.set_option("display.width", 160)
    print("\nNuclear morphology of the top-scoring cells (means):")
    print(pd.DataFrame(rows).T.round(3).to_string())

    scores["spot_id"] = cells.obs["spot_id"].astype(object).to_numpy()
    per_spot = scores.dropna(subset=["spot_id"]).groupby("spot_id")[list(markers)].mean()
    deconv = test.tables["spots_counts"].obsm["deconv"]
    deconv.index = test.tables["spots_counts"].obs["spot_id"].astype(str).to_numpy()
    per_spot = per_spot.loc[per_spot.index.intersection(deconv.index)]
    print(f"\nSpot average of predicted scores vs stereoscope proportions ({len(per_spot)} C5 spots):")
    for k, types in DECONV.items():
        prop = deconv.loc[per_spot.index, types].sum(axis=1)
        r = np.corrcoef(per_spot[k], prop)[0, 1]
        print(f"  {k:>10} score vs {' + '.join(types)}: Pearson {r:.3f}")
    print(f"peak memory (max RSS): {peak_memory_gib():.2f} GiB")


if __name__ == "__main__":
    main()
