"""Visium HD with known single-cell truth: 55 um spots against 16 and 8 um bins (centroid and overlap bags) and
2 um bins summed into cells; then training time and memory on a capture area of 8 um bins.

Usage (from the repository root):

    python benchmarks/visium_hd.py [--parts compare scale] [--size-um 800] [--seeds 0 1]

Parts:

- ``compare``: a :func:`scellst.datasets.synthetic_tissue` is written as a Visium HD Space Ranger folder
  (:func:`scellst.datasets.write_synthetic_visium_hd`: each true cell's transcripts spread over the cell, binned at
  2/8/16 um) and read back by :func:`scellst.io.visium_hd` (so spatialdata-io's reader runs). The nuclei are segmented
  and embedded once, on the same H&E; each way of making bags then trains the default model, predicts every cell, and
  is scored by the cell-level Pearson against the true expression (mean over the 27 genes, nuclei matched to true
  cells within 3 um). The synthetic cells spread their transcripts 3 um beyond the nucleus: the variants that grow
  nuclei by 3 um know the true cell size, those with 0 and 6 um show what a wrong guess costs.
- ``scale``: ``--bins`` 8 um bins (default 700,000: a 6.5 x 6.5 mm capture area) with one synthetic cell each,
  trained for ``--epochs`` epochs: time per epoch and peak memory.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
from _common import PeakRSS

# bins hold one or two cells and few counts: larger batches, a larger step, bins from 5 counts
BIN_TRAINING = {"batch_size": 256, "lr": 1e-3, "min_spot_counts": 5}


def _hd_slide(work: Path, size_um: float, seed: int):
    """The synthetic tissue, its HD folder read back, and the nuclei + embeddings shared by both (same pixels)."""
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity, set_transformation

    import scellst

    tissue = scellst.datasets.synthetic_tissue(seed=seed, size_um=(size_um, size_um))
    folder = work / f"hd_seed{seed}"
    if folder.exists():
        shutil.rmtree(folder)
    scellst.datasets.write_synthetic_visium_hd(tissue, folder, dataset_id="hd", seed=seed)
    hd = scellst.io.visium_hd(folder, bin_size=8, extra_bin_sizes=(2, 16))
    scellst.im.segment_nuclei(tissue, show_progress_bar=False)
    scellst.im.embed_cells(tissue, show_progress_bar=False)
    for key in ("nuclei", "true_cells"):  # same pixels as the HD image: identity to its coordinate system
        shapes = ShapesModel.parse(tissue.shapes[key].copy())
        set_transformation(shapes, {"hd": Identity()}, set_all=True)
        hd.shapes[key] = shapes
    hd.attrs["scellst"]["shapes_source"] = {"nuclei": "he"}
    for key in ("nuclei_embeddings", "true_expression"):
        table = tissue.tables[key].copy()
        del table.uns["spatialdata_attrs"]
        region = "nuclei" if key == "nuclei_embeddings" else "true_cells"
        hd.tables[key] = TableModel.parse(table, region=region, region_key="region", instance_key="cell_id")
    return tissue, hd


def _score(sdata, *, spots_key: str, spot_table_key: str, seed: int, **train_kwargs) -> tuple[float, float]:
    import scellst

    t0 = time.perf_counter()
    genes = list(sdata.tables["true_expression"].var_names)  # every variant fits and is scored on all 27 genes
    model = scellst.tl.train(sdata, spots_key=spots_key, spot_table_key=spot_table_key, genes=genes, seed=seed,
                             show_progress_bar=False, **train_kwargs)  # fmt: skip
    scellst.tl.predict(sdata, model, spots_key=None, overwrite=True)
    r = scellst.bench.evaluate(sdata, level="cell")["pearson"].mean()
    return float(r), time.perf_counter() - t0


def part_compare(work: Path, size_um: float, seeds: list[int]) -> None:
    import scellst

    rows: dict[str, list[float]] = {}

    def record(name: str, r: float, seconds: float) -> None:
        rows.setdefault(name, []).append(r)
        print(f"  {name:<48} cell-level Pearson {r:.3f}   ({seconds:.0f} s)", flush=True)

    for seed in seeds:
        with PeakRSS() as m:
            tissue, hd = _hd_slide(work, size_um, seed)
        n_true = tissue.tables["true_expression"].n_obs
        print(f"seed {seed}: {size_um:.0f} um tissue, {n_true:,} true cells, {len(hd.shapes['nuclei']):,} nuclei, "
              f"{hd.tables['spots_counts'].n_obs:,} bins of 8 um; written, read and segmented in {m.seconds:.0f} s",
              flush=True)  # fmt: skip
        for rule in ("centroid", "overlap"):
            scellst.pp.assign_cells(tissue, rule=rule, overwrite=True)
            record(f"Visium 55 um spots, {rule}", *_score(tissue, spots_key="spots", spot_table_key="spots_counts",
                                                         seed=seed))  # fmt: skip
        for size, key in ((16, "_016um"), (8, "")):
            spots, table = f"spots{key}", f"spots_counts{key}"
            for rule, expand in (("centroid", 0.0), ("overlap", 0.0), ("overlap", 3.0), ("overlap", 6.0)):
                scellst.pp.assign_cells(hd, "nuclei", spots, spot_table_key=table, rule=rule, expand_um=expand,
                                        overwrite=True)  # fmt: skip
                name = f"HD {size} um bins, {rule}" + (f" (cells: nuclei + {expand:g} um)" if expand else "")
                record(name, *_score(hd, spots_key=spots, spot_table_key=table, seed=seed, **BIN_TRAINING))
        for expand in (0.0, 3.0, 6.0):
            scellst.pp.bins_to_cells(hd, expand_um=expand, overwrite=True)
            scellst.pp.assign_cells(hd, "nuclei", "cells", spot_table_key="cells_counts", overwrite=True)
            name = f"HD 2 um bins -> cells (nuclei + {expand:g} um)"
            record(name, *_score(hd, spots_key="cells", spot_table_key="cells_counts", seed=seed, **BIN_TRAINING))
    print(f"\nmean over seeds {seeds}:")
    for name, values in rows.items():
        print(f"  {name:<48} {np.mean(values):.3f}  ({', '.join(f'{v:.3f}' for v in values)})")


def part_scale(n_bins: int, epochs: int) -> None:
    """Training on ``n_bins`` 8 um bins (one synthetic cell each; 50 genes, 64 features): time and memory."""
    import anndata as ad
    import geopandas as gpd
    import pandas as pd
    import shapely
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel

    import scellst

    rng = np.random.default_rng(0)
    side = int(np.ceil(np.sqrt(n_bins)))
    r, c = np.divmod(np.arange(n_bins), side)
    bin_px = 16.0  # 8 um at 0.5 um/px
    ids = np.array([f"s_008um_{i:05d}_{j:05d}-1" for i, j in zip(r, c, strict=True)])
    squares = shapely.box(c * bin_px, r * bin_px, (c + 1) * bin_px, (r + 1) * bin_px)
    cells_xy = np.column_stack([(c + 0.5) * bin_px, (r + 0.5) * bin_px]) + rng.normal(0, 3, (n_bins, 2))
    n_feat, n_genes = 64, 50
    feats = rng.normal(size=(n_bins, n_feat)).astype(np.float32)
    w = rng.normal(size=(n_feat, n_genes)).astype(np.float32) / 8
    lam = np.exp(np.clip(feats @ w, -3, 3)) * 2
    counts = rng.poisson(lam).astype(np.float32)
    obs = pd.DataFrame({"spot_id": ids, "region": pd.Categorical(["spots"] * n_bins)}, index=ids)
    genes = [f"G{i}" for i in range(n_genes)]
    spot_table = TableModel.parse(ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=genes)), region="spots",
                                  region_key="region", instance_key="spot_id")  # fmt: skip
    cell_ids = np.arange(1, n_bins + 1)
    nuclei = gpd.GeoDataFrame({"radius": np.full(n_bins, 8.0)}, geometry=gpd.points_from_xy(*cells_xy.T),
                              index=pd.Index(cell_ids, name="cell_id"))  # fmt: skip
    eobs = pd.DataFrame(
        {"cell_id": cell_ids, "region": pd.Categorical(["nuclei"] * n_bins)}, index=cell_ids.astype(str)
    )
    emb = TableModel.parse(ad.AnnData(X=feats, obs=eobs), region="nuclei", region_key="region", instance_key="cell_id")
    sdata = SpatialData(
        shapes={"spots": ShapesModel.parse(gpd.GeoDataFrame(geometry=squares, index=ids)),
                "nuclei": ShapesModel.parse(nuclei)},
        tables={"spots_counts": spot_table, "nuclei_embeddings": emb},
    )  # fmt: skip
    print(f"scale: {n_bins:,} bins of 8 um, {n_bins:,} cells, {n_genes} genes, {n_feat} features")
    with PeakRSS() as m:
        scellst.pp.assign_cells(sdata, rule="overlap")
    n_pairs = len(sdata.tables["nuclei_overlaps"])
    print(f"  assign_cells(rule='overlap'): {n_pairs:,} cell-bin overlaps in {m.seconds:.1f} s, peak {m.peak:.2f} GiB")
    for n_epochs in (1, 1 + epochs):
        with PeakRSS() as m:
            scellst.tl.train(sdata, n_top_genes=n_genes, max_epochs=n_epochs, patience=10**6, n_models=1,
                             show_progress_bar=False, **BIN_TRAINING)  # fmt: skip
        print(f"  train, {n_epochs} epoch(s): {m.seconds:.1f} s, peak {m.peak:.2f} GiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["compare", "scale"], choices=["compare", "scale"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/scellst_visium_hd"))
    parser.add_argument("--size-um", type=float, default=800.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--bins", type=int, default=700_000)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if "compare" in args.parts:
        part_compare(args.workdir, args.size_um, args.seeds)
    if "scale" in args.parts:
        part_scale(args.bins, args.epochs)
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
