"""Simulation with known single-cell truth (the sCellST paper's Fig. 2) on real cell images and real cells.

Usage (from the repository root, with ../shared/data present):

    python benchmarks/simulation.py [--embedding ssl|morphology] [--n-spots 2000] [--cells-per-spot 20]
        [--scenarios centroid cell random] [--variants classes clusters]

Cell images: the CoNSeP nuclei (classes epithelial / inflammatory / spindle / other), embedded with the SSL encoder
trained by benchmarks/embeddings.py on the CoNSeP cells (trained here if missing) or with morphology features.
Expression: the Xenium breast-cancer cells (../shared/data/xenium_breast_cells, raw counts, 9 types).
Variants: ``classes`` pairs CoNSeP classes with biologically matching types (epithelial -> Malignant/Epithelial,
inflammatory -> T/B/Macrophage/Plasma/Myeloid, spindle -> Fibroblast/Endothelial; "other" cells left out);
``clusters`` uses k-means clusters of the embeddings (9, one per type) matched arbitrarily, as in the paper.
Each spot draws its group proportions from a Dirichlet(0.3) (``--composition patch``: spots drawn within CoNSeP
patches instead); train and test cells come from different CoNSeP images. Prints instance- and bag-level mean Pearson per model and gene set, and ratios to the supervised
bound and to the group-mean oracle.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
from _common import CACHE, DATA, peak_memory_gib

MATCH = {
    "epithelial": ["Malignant", "Epithelial"],
    "inflammatory": ["T", "B", "Macrophage", "Plasma", "Myeloid"],
    "spindle": ["Fibroblast", "Endothelial"],
}


def cell_table(embedding: str):
    import scellst

    sdata = scellst.datasets.consep(path=DATA / "consep")
    if embedding == "ssl":
        enc = CACHE / "ssl_consep.pt"
        if not enc.exists():
            scellst.im.train_ssl(sdata, path=enc, epochs=15, seed=0, show_progress_bar=False)
            Path(str(enc) + ".ckpt").unlink()
        scellst.im.embed_cells(sdata, method="ssl", encoder=enc, show_progress_bar=False)
    else:
        # the cells' own features: the simulated spots group cells from a mosaic of patches with no tissue layout,
        # so neighbourhood features would describe the mosaic, not the simulated spot
        scellst.im.embed_cells(sdata, context_um=None, show_progress_bar=False)
    table = sdata.tables["nuclei_embeddings"]
    nuclei = sdata.shapes["nuclei"]
    for col in ("class", "source_image", "patch"):
        table.obs[col] = nuclei[col].to_numpy()
    return table


def variant_cells(cells, variant: str):
    """The cells and grouping of a variant: CoNSeP classes (without "other") or 9 k-means clusters (the paper's)."""
    if variant == "classes":
        return cells[cells.obs["class"].astype(str) != "other"].copy(), {"groupby": "class", "matching": MATCH}
    return cells, {"groupby": None, "matching": "arbitrary", "n_clusters": 9}


def main() -> None:
    import scellst

    parser = argparse.ArgumentParser()
    parser.add_argument("--embedding", default="ssl", choices=["ssl", "morphology"])
    parser.add_argument("--n-spots", type=int, default=5000)
    parser.add_argument(
        "--composition",
        default="0.3",
        help="Dirichlet concentration of spot compositions, or 'patch' (spots drawn within CoNSeP patches)",
    )
    parser.add_argument("--cells-per-spot", type=int, default=20)
    parser.add_argument("--scenarios", nargs="+", default=["centroid", "cell", "random"])
    parser.add_argument("--variants", nargs="+", default=["classes", "clusters"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    cells = cell_table(args.embedding)
    reference = scellst.datasets.xenium_breast_cells(path=DATA / "xenium_breast_cells")
    print(
        f"cells: {cells.n_obs:,} CoNSeP nuclei ({args.embedding}, {cells.n_vars} features); reference: "
        f"{reference.n_obs:,} Xenium cells x {reference.n_vars} genes, {reference.X.sum(1).mean():.0f} counts per cell",
        flush=True,
    )
    if args.composition == "patch":
        comp = {"spot_groups": "patch", "composition_alpha": None}
    else:
        comp = {"composition_alpha": float(args.composition)}
    rows = []
    for variant in args.variants:
        sub, kw = variant_cells(cells, variant)
        for scenario in args.scenarios:
            t0 = time.perf_counter()
            sim = scellst.bench.simulate_spots(
                sub,
                reference,
                scenario=scenario,
                n_spots=args.n_spots,
                cells_per_spot=args.cells_per_spot,
                **comp,
                split_by="source_image",
                seed=args.seed,
                **kw,
            )
            df = scellst.bench.benchmark_simulation(sim, seed=args.seed)
            df.attrs = {}
            df["variant"], df["scenario"] = variant, scenario
            rows.append(df)
            inst = df[df.level == "instance"].pivot(index="model", columns="gene_set", values="pearson")
            bag = df[df.level == "bag"].pivot(index="model", columns="gene_set", values="pearson")
            print(f"\n[{variant} / {scenario}] {sim!r} ({time.perf_counter() - t0:.0f} s)", flush=True)
            print(
                pd.concat({"instance": inst, "bag": bag}, axis=1).round(3).to_string(),
                flush=True,
            )
            times = df.drop_duplicates("model").set_index("model")[["train_seconds", "best_epoch"]]
            print(
                "train seconds / best epoch:",
                ", ".join(f"{m} {r.train_seconds:.0f} s / {r.best_epoch}" for m, r in times.iterrows()),
            )
            for gs in inst.columns:
                mil, sup, ora = inst.loc["mil", gs], inst.loc["supervised", gs], inst.loc["oracle", gs]
                print(
                    f"  {gs}: MIL / supervised = {mil / sup:.2f}, MIL / oracle = {mil / ora:.2f}"
                    if scenario != "random"
                    else f"  {gs}: MIL {mil:.3f} (no signal expected)"
                )
    out = pd.concat(rows)
    name = f"simulation_{args.embedding}_{args.composition}.csv"
    out.to_csv(CACHE / name, index=False)
    print(
        f"\nwrote {CACHE / name}; total {time.perf_counter() - t_all:.0f} s; "
        f"peak memory (max RSS) {peak_memory_gib():.2f} GiB"
    )


if __name__ == "__main__":
    main()
