"""Whole slides and cohorts: time and peak memory of every stage at Visium scale, and scaling over dask workers.

Usage (from the repository root):

    python benchmarks/slide_scale.py [--parts slide members ensemble raster cohort million hgsc] [--workdir /tmp/scellst_slide_scale]
        [--reuse-slide] [--patience N] [--n-models N]

Parts:

- ``slide``: a Visium-size synthetic slide (``datasets.synthetic_slide``: 25,000 x 25,000 px at 0.25 um/px, about
  167,000 cells, generated lazily block by block and written to zarr without ever being whole in memory) through
  segment -> embed -> assign -> train -> predict, each stage on the disk-backed store. Prints each stage's time and
  peak memory (this process and its children) against the targets (<= 10 min, <= 8 GiB), the nuclei found against
  the true cells, and the cell-level Pearson of the predictions against the true expression.
- ``members``: training time per ensemble member and epoch on that slide, members one after the other
  (``n_jobs=1``) against two at a time (``n_jobs=2``).
- ``ensemble``: cell-level quality against ensemble size on that slide: one ``--n-models`` ensemble trained, the
  model of its first k members scored for every k (the first k members are exactly the k-member model).
- ``raster``: the nucleus label image of a quarter of that slide drawn polygon by polygon with
  ``skimage.draw.polygon`` and all at once (``im._raster.fill_polygons``, what ``segment_nuclei`` uses): time, and
  whether the two are identical.
- ``cohort``: ``--cohort-slides`` smaller H&E-only slides (``--cohort-size-um`` square) predicted by
  ``tl.run_predict`` with the model of ``slide`` on a ``LocalCluster`` of 1 and 2 workers: throughput and scaling.
- ``million``: 1,000,000 cells predicted and written to a zarr store (synthetic features): time and peak memory.
- ``hgsc``: the 592,349 real nucleus outlines of ``../shared/data/histolytics_hgsc/hgsc_nuclei_wsi.parquet``
  imported, assigned to a Visium grid over the slide and embedded by shape (no image): time and peak memory.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
from _common import DATA, PeakRSS

TARGET_S, TARGET_GIB = 600.0, 8.0


def _single_scale(sdata):
    """Replace the image pyramid by its level 0 (writing a lazy pyramid would render every level again)."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    img = sdata.images["he"]
    level0 = img["scale0"].image if hasattr(img, "keys") else img
    tr = get_transformation(img, get_all=True)
    sdata.images["he"] = Image2DModel.parse(
        level0.data, dims=("c", "y", "x"), c_coords=["r", "g", "b"], transformations=tr
    )
    return sdata


def _write_slide(store: Path, *, seed: int, size_um: float, he_only: bool = False) -> tuple[int, int]:
    import scellst

    sdata = _single_scale(scellst.datasets.synthetic_slide(seed=seed, size_um=(size_um, size_um)))
    if he_only:
        for key in ("spots", "true_cells"):
            del sdata.shapes[key]
        for key in list(sdata.tables):
            del sdata.tables[key]
    if store.exists():
        shutil.rmtree(store)
    sdata.write(store)
    n_cells = 0 if he_only else len(sdata.shapes["true_cells"])
    return int(np.prod(sdata.images["he"].shape[1:])), n_cells


def _cell_pearson(sdata) -> tuple[float, int, int]:
    """Mean per-gene Pearson of predicted nuclei against the true cell at the same place (within 3 um)."""
    pred = sdata.tables["nuclei_expression"]
    return _pearson_to_truth(sdata, np.asarray(pred.X), np.asarray(pred.obsm["spatial"]), list(pred.var_names))


def _pearson_to_truth(sdata, pred: np.ndarray, xy: np.ndarray, genes: list[str]) -> tuple[float, int, int]:
    """Mean per-gene Pearson of predictions at ``xy`` (pixels) against the true cell within 3 um of each."""
    from scipy.spatial import cKDTree

    truth = sdata.tables["true_expression"]
    mpp = sdata.attrs["scellst"]["microns_per_pixel"]["he"]
    tree = cKDTree(np.asarray(truth.obsm["spatial"]) * mpp)
    d, j = tree.query(xy * mpp)
    ok = d < 3.0
    cols = [i for i, g in enumerate(genes) if g in truth.var_names]
    t = np.log1p(np.asarray(truth[:, [genes[i] for i in cols]].X)[j[ok]])
    p = pred[ok][:, cols]
    r = [np.corrcoef(p[:, i], t[:, i])[0, 1] for i in range(len(cols)) if p[:, i].std() > 0 and t[:, i].std() > 0]
    return float(np.mean(r)), int(ok.sum()), len(cols)


_SLIDE_ELEMENTS = {"he", "spots", "true_cells", "spots_counts", "true_expression"}  # what _write_slide makes


def _reused_slide(store: Path):
    """The slide of an earlier run, with everything the pipeline made removed (from the store too)."""
    import spatialdata as sd

    sdata = sd.read_zarr(store)
    made = [name for _, name, _ in sdata.gen_elements() if name not in _SLIDE_ELEMENTS]
    for name in made:
        del sdata[name]  # in memory first: spatialdata refuses to delete the files of a backed element
        sdata.delete_element_from_disk(name)
    n_px = int(np.prod(sdata.images["he"].shape[1:]))
    print(f"reusing {store} (removed {', '.join(made) or 'nothing'})")
    return sdata, n_px, len(sdata.shapes["true_cells"])


def part_slide(
    work: Path, size_um: float, *, reuse: bool = False, patience: int | None = None, n_models: int | None = None
) -> None:
    import spatialdata as sd

    import scellst

    store = work / "slide.zarr"
    if reuse and (store / "shapes" / "true_cells").exists():
        sdata, n_px, n_true = _reused_slide(store)
    else:
        with PeakRSS() as m:
            n_px, n_true = _write_slide(store, seed=0, size_um=size_um)
        print(f"  generate + write to zarr (not a pipeline stage): {m.seconds:.0f} s, peak {m.peak:.2f} GiB")
        sdata = sd.read_zarr(store)
    print(f"slide: {int(np.sqrt(n_px)):,} x {int(np.sqrt(n_px)):,} px ({n_px / 1e6:.0f} MP), {n_true:,} true cells")
    stages = {}

    def stage(name, func):
        with PeakRSS() as mem:
            out = func()
        stages[name] = (mem.seconds, mem.peak)
        print(f"  {name:<8} {mem.seconds:7.1f} s   peak {mem.peak:5.2f} GiB", flush=True)
        return out

    stage("segment", lambda: scellst.im.segment_nuclei(sdata, show_progress_bar=False))
    stage("embed", lambda: scellst.im.embed_cells(sdata, show_progress_bar=False))
    stage("assign", lambda: scellst.pp.assign_cells(sdata))
    model = stage(
        "train", lambda: scellst.tl.train(sdata, patience=patience, n_models=n_models, show_progress_bar=False)
    )
    stage("predict", lambda: scellst.tl.predict(sdata, model))
    model.save(work / "model.pt")
    print(f"  training: patience {model.params['patience']} epochs, members stopped after "
          f"{[len(h['val_loss']) for h in model.history]} epochs, best epochs {model.params['best_epochs']}, "
          f"best validation losses {[round(min(h['val_loss']), 4) for h in model.history]}")  # fmt: skip
    total = sum(s for s, _ in stages.values())
    peak = max(p for _, p in stages.values())
    n_nuc = len(sdata.shapes["nuclei"])
    r, n_matched, n_genes = _cell_pearson(sdata)
    print(f"  total    {total:7.1f} s   peak {peak:5.2f} GiB   (targets <= {TARGET_S:.0f} s, <= {TARGET_GIB:.0f} GiB: "
          f"{'met' if total <= TARGET_S and peak <= TARGET_GIB else 'NOT met'})")  # fmt: skip
    print(f"  {n_nuc:,} nuclei found for {n_true:,} true cells; {n_matched:,} matched within 3 um; cell-level Pearson "
          f"against the truth {r:.3f} (mean over {n_genes} genes)")  # fmt: skip


def part_members(work: Path) -> None:
    """Training throughput of ensemble members one after the other (``n_jobs=1``) and two at a time (``n_jobs=2``).

    Two members are trained for 4 and for 12 epochs (no early stopping) on the slide of ``slide``; the difference
    removes the fixed costs (gene selection, training arrays), leaving the time per member-epoch.
    """
    import spatialdata as sd

    import scellst

    store = work / "slide.zarr"
    if not store.exists():
        raise SystemExit("Run the `slide` part first: its store holds the nuclei and embeddings trained on here.")
    sdata = sd.read_zarr(store)
    if "nuclei_embeddings" not in sdata.tables:
        raise SystemExit(f"{store} has no embeddings: run the `slide` part to its end first.")
    per_epoch = {}
    for n_jobs in (1, 2):
        times = {}
        for epochs in (4, 12):
            t0 = time.perf_counter()
            scellst.tl.train(sdata, n_models=2, n_jobs=n_jobs, max_epochs=epochs, patience=10**6,
                             show_progress_bar=False)  # fmt: skip
            times[epochs] = time.perf_counter() - t0
        per_epoch[n_jobs] = (times[12] - times[4]) / (2 * 8)
        print(f"members: n_jobs={n_jobs}: {per_epoch[n_jobs]:.2f} s per member-epoch "
              f"(2 members: {times[4]:.1f} s for 4 epochs, {times[12]:.1f} s for 12)", flush=True)  # fmt: skip
    print(f"  two members at a time: x{per_epoch[1] / per_epoch[2]:.2f} faster per epoch")


def part_ensemble(work: Path, n_models: int) -> None:
    """Quality against ensemble size on the slide (after ``slide``): one ensemble trained, its first k members scored.

    Member ``m`` is trained with seed ``seed + 1000 m`` and its own validation blocks whatever the ensemble size, so
    the first k members of one ``n_models``-member training are exactly the k-member model. Each prefix predicts every
    nucleus; the cell-level Pearson against the true expression is printed with the members' epochs.
    """
    import dataclasses

    import spatialdata as sd

    import scellst

    store = work / "slide.zarr"
    sdata = sd.read_zarr(store) if store.exists() else None
    if sdata is None or "nuclei_embeddings" not in sdata.tables or "spot_id" not in sdata["nuclei_embeddings"].obs:
        raise SystemExit(f"{store} has no assigned embeddings: run the `slide` part to its end first.")
    with PeakRSS() as mem:
        model = scellst.tl.train(sdata, n_models=n_models, show_progress_bar=False)
    epochs = [len(h["val_loss"]) for h in model.history]
    print(f"ensemble: {n_models} members trained in {mem.seconds:.0f} s, stopped after {epochs} "
          f"epochs (best {model.params['best_epochs']})", flush=True)  # fmt: skip
    emb = sdata.tables["nuclei_embeddings"]
    features, xy = np.asarray(emb[:, model.feature_names].X, dtype=np.float32), np.asarray(emb.obsm["spatial"])
    for k in range(1, n_models + 1):
        sub = dataclasses.replace(model, members=model.members[:k], history=model.history[:k])
        r, n_matched, n_genes = _pearson_to_truth(sdata, sub.predict_cells(features), xy, list(model.genes))
        share = sum(epochs[:k]) / sum(epochs)
        print(f"  first {k} member(s): cell-level Pearson {r:.4f} ({n_genes} genes, {n_matched:,} nuclei matched); "
              f"{share:.0%} of the ensemble's member-epochs", flush=True)  # fmt: skip


def part_cohort(work: Path, n_slides: int, size_um: float, workers: list[int]) -> None:
    import scellst

    model = work / "model.pt"
    if not model.exists():
        raise SystemExit("Run the `slide` part first: the cohort is predicted with its model.")
    slides, n_px = [], 0
    with PeakRSS() as m:
        for i in range(n_slides):
            store = work / "cohort" / f"slide{i}.zarr"
            store.parent.mkdir(parents=True, exist_ok=True)
            px, _ = _write_slide(store, seed=100 + i, size_um=size_um, he_only=True)
            slides.append(store)
            n_px += px
    print(f"cohort: {n_slides} H&E-only slides of {size_um / 1000:.2f} mm ({n_px / 1e6 / n_slides:.0f} MP each), "
          f"written in {m.seconds:.0f} s")  # fmt: skip
    base = None
    for w in workers:
        out = work / f"cohort_out_w{w}"
        if out.exists():
            shutil.rmtree(out)
        with PeakRSS() as mem:
            runs = scellst.tl.run_predict(
                model, slides, out, n_workers=w or None, memory_limit="4GiB", show_progress_bar=False
            )
        cells = sum(r.n_cells for r in runs)
        base = base or mem.seconds
        label = f"{w} worker(s)" if w else "threads (no cluster)"
        print(f"  {label:<20} {mem.seconds:7.1f} s   {n_px / 1e6 / mem.seconds:5.2f} MP/s   "
              f"{cells / mem.seconds:7.0f} cells/s   speed-up x{base / mem.seconds:.2f}   peak {mem.peak:5.2f} GiB "
              f"(all processes)", flush=True)  # fmt: skip


def part_raster(work: Path) -> None:
    """The nucleus label image of the slide (after ``slide``): polygons drawn one by one against all at once."""
    import spatialdata as sd
    from shapely import STRtree, box
    from skimage.draw import polygon as draw_polygon

    from scellst.im._segment import render_polygons

    nuclei = sd.read_zarr(work / "slide.zarr").shapes["nuclei"]
    geoms, ids = nuclei.geometry.to_numpy(), nuclei.index.to_numpy().astype(np.uint32)
    tree, side = STRtree(geoms), 2048
    n = int(np.ceil(25_000 / side))
    windows = [(y, min(y + side, 25_000), x, min(x + side, 25_000)) for y in range(0, n * side, side)
               for x in range(0, n * side, side)][: int(n * n / 4)]  # fmt: skip  # a quarter of the slide
    same = True
    times = {"one by one (skimage.draw.polygon)": 0.0, "all at once (im._raster.fill_polygons)": 0.0}
    for y0, y1, x0, x1 in windows:
        t = time.perf_counter()
        ref = np.zeros((y1 - y0, x1 - x0), dtype=np.uint32)
        for i in tree.query(box(x0, y0, x1, y1)):
            xy = np.asarray(geoms[i].exterior.coords)
            rr, cc = draw_polygon(xy[:, 1] - y0, xy[:, 0] - x0, shape=ref.shape)
            ref[rr, cc] = ids[i]
        t1 = time.perf_counter()
        got = render_polygons(geoms, ids, tree, (y0, y1, x0, x1))
        t2 = time.perf_counter()
        times["one by one (skimage.draw.polygon)"] += t1 - t
        times["all at once (im._raster.fill_polygons)"] += t2 - t1
        same &= bool(np.array_equal(ref, got))
    print(f"raster: the nucleus label image of {len(windows)} blocks of {side} px (a quarter of the slide), one thread")
    for name, secs in times.items():
        print(f"  {name:<40} {secs:6.1f} s")
    print(f"  identical label images: {same}")


def part_million(work: Path, n_cells: int) -> None:
    import anndata as ad
    import geopandas as gpd
    import pandas as pd
    import spatialdata as sd
    from spatialdata.models import ShapesModel, TableModel

    import scellst

    model_path = work / "model.pt"
    if not model_path.exists():
        raise SystemExit("Run the `slide` part first: the cells are predicted with its model.")
    model = scellst.models.ScellstModel.load(model_path)
    rng = np.random.default_rng(0)
    side = int(np.sqrt(n_cells)) + 1
    xy = np.column_stack([np.arange(n_cells) % side, np.arange(n_cells) // side]).astype(float) * 40.0  # 10 um apart
    ids = np.arange(1, n_cells + 1)
    shapes = gpd.GeoDataFrame({"radius": np.full(n_cells, 12.0)}, geometry=gpd.points_from_xy(xy[:, 0], xy[:, 1]),
                              index=pd.Index(ids, name="cell_id"))  # fmt: skip
    x = rng.normal(size=(n_cells, len(model.feature_names))).astype(np.float32)
    obs = pd.DataFrame({"cell_id": ids, "region": pd.Categorical(["nuclei"] * n_cells)}, index=ids.astype(str))
    table = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=model.feature_names))
    table.obsm["spatial"] = xy
    table.uns["scellst"] = {"method": model.embedding_method}
    sdata = sd.SpatialData(
        shapes={"nuclei": ShapesModel.parse(shapes)},
        tables={"nuclei_embeddings": TableModel.parse(table, region="nuclei", region_key="region", instance_key="cell_id")},
    )  # fmt: skip
    store = work / "million.zarr"
    if store.exists():
        shutil.rmtree(store)
    sdata.write(store)
    del sdata, table, x, shapes
    sdata = sd.read_zarr(store)
    with PeakRSS() as mem:
        scellst.tl.predict(sdata, model, spots_key=None)
    size = sum(f.stat().st_size for f in (store / "tables" / "nuclei_expression").rglob("*") if f.is_file())
    print(f"million: {n_cells:,} cells x {len(model.genes)} genes predicted (ensemble of {model.n_models}) and written "
          f"to zarr in {mem.seconds:.1f} s ({n_cells / mem.seconds:,.0f} cells/s), peak {mem.peak:.2f} GiB "
          f"({mem.start:.2f} GiB before: the store read back, its tables in memory), {size / 1024**2:.0f} MiB on disk")  # fmt: skip


def _visium_grid(nuclei, mpp: float):
    """Visium spots (55 um, 100 um pitch, hexagonal) over the nuclei's extent, in their pixel frame."""
    import geopandas as gpd
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import get_transformation

    x0, y0, x1, y1 = nuclei.total_bounds
    pitch = 100.0 / mpp
    rows = np.arange(y0, y1, pitch * np.sqrt(3) / 2)
    xy = np.array([(x, y) for i, y in enumerate(rows) for x in np.arange(x0 + (pitch / 2) * (i % 2), x1, pitch)])
    spots = gpd.GeoDataFrame({"radius": np.full(len(xy), 27.5 / mpp)}, geometry=gpd.points_from_xy(xy[:, 0], xy[:, 1]),
                             index=[f"spot_{i}" for i in range(len(xy))])  # fmt: skip
    return ShapesModel.parse(spots, transformations=get_transformation(nuclei, get_all=True))


def part_hgsc(work: Path) -> None:
    import spatialdata as sd

    import scellst

    path = DATA / "histolytics_hgsc" / "hgsc_nuclei_wsi.parquet"
    mpp = 0.5  # not stated by the source; nuclear sizes suggest about 0.5 um/px
    sdata = sd.SpatialData()
    with PeakRSS() as m:
        scellst.io.read_nuclei(sdata, path, microns_per_pixel=mpp)
    n = len(sdata.shapes["nuclei"])
    print(f"hgsc: {n:,} real nucleus outlines imported in {m.seconds:.1f} s, peak {m.peak:.2f} GiB")
    with PeakRSS() as m:
        sdata.shapes["spots"] = _visium_grid(sdata.shapes["nuclei"], mpp)
        scellst.pp.assign_cells(sdata, spot_table_key=None)
    spot_of = sdata.shapes["nuclei"]["spot_id"]
    print(f"  a Visium grid of {len(sdata.shapes['spots']):,} spots over the slide, {spot_of.notna().sum():,} nuclei "
          f"assigned in {m.seconds:.1f} s, peak {m.peak:.2f} GiB")  # fmt: skip
    with PeakRSS() as m:
        scellst.im.embed_cells(sdata, method="shape", show_progress_bar=False)
    emb = sdata.tables["nuclei_embeddings"]
    print(f"  embedded by shape (no image): {emb.n_obs:,} x {emb.n_vars} features in {m.seconds:.1f} s, "
          f"peak {m.peak:.2f} GiB")  # fmt: skip
    store = work / "hgsc.zarr"
    if store.exists():
        shutil.rmtree(store)
    with PeakRSS() as m:
        sdata.write(store)
    print(f"  written to zarr in {m.seconds:.1f} s, peak {m.peak:.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["slide", "members", "cohort", "million", "hgsc"],
                        choices=["slide", "members", "ensemble", "raster", "cohort", "million", "hgsc"])  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/scellst_slide_scale"))
    parser.add_argument("--size-um", type=float, default=6250.0, help="side of the slide (6,250 um: 25,000 px)")
    parser.add_argument("--cohort-slides", type=int, default=8)
    parser.add_argument("--cohort-size-um", type=float, default=1500.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="0: threads, no cluster")
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument(
        "--reuse-slide",
        action="store_true",
        help="slide: reuse the slide written by an earlier run (its derived elements are removed)",
    )
    parser.add_argument(
        "--n-models",
        type=int,
        default=None,
        help="slide: ensemble members (default: train's); ensemble: members trained (default 5)",
    )
    parser.add_argument("--patience", type=int, default=None, help="slide: the training patience (default: auto)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if "slide" in args.parts:
        part_slide(args.workdir, args.size_um, reuse=args.reuse_slide, patience=args.patience, n_models=args.n_models)
    if "members" in args.parts:
        part_members(args.workdir)
    if "ensemble" in args.parts:
        part_ensemble(args.workdir, args.n_models or 5)
    if "raster" in args.parts:
        part_raster(args.workdir)
    if "cohort" in args.parts:
        part_cohort(args.workdir, args.cohort_slides, args.cohort_size_um, args.workers)
    if "million" in args.parts:
        part_million(args.workdir, args.cells)
    if "hgsc" in args.parts:
        part_hgsc(args.workdir)
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
