"""sCellST, CPNN, DeepSpot2Cell and MISO side by side: HER2ST leave-one-section-out and the real-cell simulation.

Usage (from the repository root, with ../shared/data present):

    python benchmarks/models.py [--sections C2 C3 C4 C5] [--n-genes 50] [--variants classes clusters]
                                [--skip-her2st] [--skip-simulation]

1. HER2ST (spot level): each section is predicted by models trained on the three others (morphology embeddings,
   top HVGs selected on the training sections among the genes the CPNN reference measures, so that every model is
   scored on the same genes), with the spot-level ridge and MLP baselines beside them. Prints the mean Pearson and
   Spearman over genes (mean and sd over folds) and the mean training time per fold on this machine.
   For CPNN, the mean type weights of each held-out spot are compared with the stereoscope proportions shipped
   with HER2ST (Pearson over spots, per type, pooled over the four held-out sections).
2. Simulation (instance level, cell scenario): CoNSeP nuclei (SSL embedding) given the expression of Xenium breast
   cells of a matched type, 5,000 spots of 20 cells (Dirichlet 0.3 compositions), test cells from held-out CoNSeP
   images. Prints the per-cell Pearson on HVG and marker genes with the supervised bound and the group oracle, and
   for CPNN the argmax type of each test cell against its CoNSeP class.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from _common import CACHE, DATA, her2st_section, peak_memory_gib

# Xenium breast reference types -> CoNSeP classes, and -> HER2ST stereoscope columns
TO_CONSEP = {
    "Malignant": "epithelial",
    "Epithelial": "epithelial",
    "T": "inflammatory",
    "B": "inflammatory",
    "Macrophage": "inflammatory",
    "Plasma": "inflammatory",
    "Myeloid": "inflammatory",
    "Fibroblast": "spindle",
    "Endothelial": "spindle",
}
TO_STEREOSCOPE = {
    "Epithelial": ["Malignant", "Epithelial"],
    "T-cells": ["T"],
    "B-cells": ["B"],
    "Plasma Cells": ["Plasma"],
    "Myeloid": ["Macrophage", "Myeloid"],
    "CAFs": ["Fibroblast"],
    "Endothelial": ["Endothelial"],
}
MODEL_NAMES = {
    "scellst": "sCellST (MIL)",
    "cpnn": "CPNN",
    "deepspot2cell": "DeepSpot2Cell (3 members)",
    "miso": "MISO (teacher, spot level)",
    "ridge": "baseline: ridge on mean embedding",
    "spot_mlp": "baseline: spot MLP",
    "mil": "sCellST (MIL)",
    "supervised": "bound: supervised on true cells",
    "oracle": "bound: group oracle",
}


def her2st(args, reference) -> None:
    import scellst

    slides = {s: her2st_section(s) for s in args.sections}
    models = {
        "scellst": {},
        "cpnn": {"model": "cpnn", "reference": reference, "groupby": "cell_type"},
        "deepspot2cell": {"model": "deepspot2cell"},
        "miso": {"model": "miso"},
    }
    t0 = time.perf_counter()
    df = scellst.bench.cross_validate(
        slides,
        models=models,
        baselines=("ridge", "spot_mlp"),
        flavor="hvg",
        n_genes=args.n_genes,
        seed=args.seed,
        keep_models=True,
    )
    total = time.perf_counter() - t0
    per_fold = df.groupby(["model", "fold"]).agg(
        pearson=("pearson", "mean"), spearman=("spearman", "mean"), seconds=("train_seconds", "first")
    )
    table = per_fold.groupby("model").agg(
        pearson=("pearson", "mean"), sd=("pearson", "std"), spearman=("spearman", "mean"), train_s=("seconds", "mean")
    )
    table = table.reindex([m for m in MODEL_NAMES if m in table.index])
    table.index = [MODEL_NAMES[m] for m in table.index]
    print(
        f"\nHER2ST leave-one-section-out ({', '.join(args.sections)}), top {args.n_genes} HVG among the "
        f"{reference.n_vars} reference genes, mean over genes then folds ({total:.0f} s in all):"
    )
    print(table.round(3).to_string())
    print("per fold (Pearson):")
    print(per_fold["pearson"].unstack("fold").round(3).to_string())

    # MISO's cell-level student at spot level (the mean of its cells), for comparison with the teacher
    rows = []
    for (fold, name), model in df.attrs["models"].items():
        test = scellst.tl.prepare_slide(slides[fold], name=fold)
        genes = model.genes
        truth = scellst.pp.lognorm(test.counts, genes)
        if name == "miso":
            student = model.predict_spots(test.features, test.bags)  # no positions: the student's bag means
            rows.append(scellst.bench.metrics_per_gene(student, truth, genes)["pearson"].mean())
    print(f"MISO student (cell model, spot = mean of its cells): mean Pearson {np.mean(rows):.3f} over folds")

    # CPNN type weights against stereoscope, per type, pooled over the held-out sections
    ours, theirs = [], []
    for (fold, name), model in df.attrs["models"].items():
        if name != "cpnn":
            continue
        sdata = slides[fold]
        test = scellst.tl.prepare_slide(sdata, name=fold)
        w = model.predict_type_weights(test.features)
        per_spot = pd.DataFrame(np.stack([w[b].mean(axis=0) for b in test.bags]), columns=model.cell_types)
        per_spot.index = test.spot_ids
        counts = sdata.tables["spots_counts"]
        deconv = counts.obsm["deconv"].copy()
        deconv.index = scellst._utils.instance_ids(counts)
        shared = per_spot.index.intersection(deconv.index)
        ours.append(per_spot.loc[shared])
        theirs.append(deconv.loc[shared])
    ours, theirs = pd.concat(ours), pd.concat(theirs)
    print(f"\nCPNN mean type weight per held-out spot vs stereoscope proportion ({len(ours)} spots, 4 sections):")
    for col, types in TO_STEREOSCOPE.items():
        a = ours.reindex(columns=types, fill_value=0).sum(axis=1)
        b = theirs[col]
        print(
            f"  {col:>13} ({'+'.join(types)}): Pearson {np.corrcoef(a, b)[0, 1]:.3f}, mean weight {a.mean():.3f} vs {b.mean():.3f}"
        )
    top_ours = ours.idxmax(axis=1).map(lambda t: next(k for k, v in TO_STEREOSCOPE.items() if t in v))
    agree = (top_ours == theirs[list(TO_STEREOSCOPE)].idxmax(axis=1)).mean()
    print(f"  dominant type agrees on {agree:.1%} of spots")
    out = CACHE / "models_her2st.csv"
    df.attrs = {}
    df.to_csv(out, index=False)
    print(f"wrote {out}")


def simulation(args, reference) -> None:
    from simulation import cell_table, variant_cells

    import scellst

    cells = cell_table("ssl")
    for variant in args.variants:
        sub, kw = variant_cells(cells, variant)
        sim = scellst.bench.simulate_spots(
            sub,
            reference,
            scenario="cell",
            n_spots=5000,
            cells_per_spot=20,
            composition_alpha=0.3,
            split_by="source_image",
            seed=args.seed,
            **kw,
        )
        t0 = time.perf_counter()
        df = scellst.bench.benchmark_simulation(
            sim,
            models=("mil", "cpnn", "deepspot2cell", "miso", "supervised", "oracle"),
            reference=reference,
            groupby="cell_type",
            seed=args.seed,
        )
        inst = df[df.level == "instance"].pivot(index="model", columns="gene_set", values="pearson")
        secs = df.drop_duplicates("model").set_index("model")["train_seconds"]
        inst["train_s"] = secs
        inst = inst.reindex([m for m in MODEL_NAMES if m in inst.index])
        names = {**MODEL_NAMES, "miso": "MISO (student, cell level)", "deepspot2cell": "DeepSpot2Cell (3 members)"}
        inst.index = [names[m] for m in inst.index]
        print(f"\nSimulation [{variant} / cell] {sim!r} ({time.perf_counter() - t0:.0f} s), instance-level Pearson:")
        print(inst.round(3).to_string())
        types = df.attrs["cpnn_types"]
        consep = cells.obs["class"].astype(str).reindex(types.index)
        if consep.notna().all():
            pred = types.map(TO_CONSEP)
            keep = consep != "other"
            acc = float((pred[keep] == consep[keep]).mean())
            bal = float(pd.Series(pred[keep] == consep[keep]).groupby(consep[keep].to_numpy()).mean().mean())
            print(
                f"CPNN argmax type (mapped to CoNSeP classes) vs CoNSeP class, {int(keep.sum()):,} test cells: "
                f"accuracy {acc:.3f}, balanced {bal:.3f}; majority class {consep[keep].value_counts(normalize=True).max():.3f}"
            )
            print(pd.crosstab(consep[keep], pred[keep], normalize="index").round(2).to_string())
        df.attrs = {}
        df.to_csv(CACHE / f"models_simulation_{variant}.csv", index=False)


def main() -> None:
    import scellst

    parser = argparse.ArgumentParser()
    parser.add_argument("--sections", nargs="+", default=["C2", "C3", "C4", "C5"])
    parser.add_argument("--n-genes", type=int, default=50)
    parser.add_argument("--variants", nargs="+", default=["classes", "clusters"])
    parser.add_argument("--skip-her2st", action="store_true")
    parser.add_argument("--skip-simulation", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    reference = scellst.datasets.xenium_breast_cells(path=DATA / "xenium_breast_cells")
    t0 = time.perf_counter()
    if not args.skip_her2st:
        her2st(args, reference)
    if not args.skip_simulation:
        simulation(args, reference)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; peak memory (max RSS) {peak_memory_gib():.2f} GiB")


if __name__ == "__main__":
    main()
