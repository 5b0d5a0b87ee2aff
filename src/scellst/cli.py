"""Command-line entry point: ``scellst train``, ``scellst predict``, ``scellst demo`` (also ``python -m scellst``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _echo(message: str) -> None:
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def run_demo(
    out: Path,
    *,
    seed: int = 0,
    size_um: tuple[float, float] = (1600.0, 1600.0),
    overwrite: bool = False,
    shuffled_control: bool = True,
    model: str = "scellst",
) -> dict[str, float]:
    """Synthetic tissue -> segment -> embed -> train -> predict; write a zarr store and a PNG; score the cells.

    Returns the figures it printed (mean cell-level Pearson against the true expression, and the same for a model
    trained on shuffled embeddings when ``shuffled_control`` is set). ``model`` picks a model of the registry that
    needs no reference (``"scellst"``, ``"deepspot2cell"``, ``"miso"``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np

    from . import bench, datasets, im, pl, pp, tl

    out = Path(out)
    store = out / "demo.zarr"
    if store.exists() and not overwrite:
        raise SystemExit(f"{store} already exists; pass --overwrite to replace it or choose another --out.")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sdata = datasets.synthetic_tissue(seed=seed, size_um=size_um)
    im.segment_nuclei(sdata)
    pp.assign_cells(sdata)
    im.embed_cells(sdata)
    n_genes = sdata.tables["spots_counts"].n_vars  # the synthetic tissue has 27 genes: ask for all of them
    trained = tl.train(sdata, model=model, seed=seed, n_top_genes=n_genes)
    tl.predict(sdata, trained)
    trained.save(out / "model.pt")
    cell_corr = bench.evaluate(sdata, level="cell")
    matched = cell_corr.attrs["matched_fraction"]
    spot_corr = bench.evaluate(sdata)
    results = {
        "cell_pearson": float(cell_corr["pearson"].mean()),
        "spot_pearson": float(spot_corr["pearson"].mean()),
        "matched": matched,
    }

    if shuffled_control:
        emb = sdata.tables["nuclei_embeddings"]
        original = emb.X.copy()
        emb.X = original[np.random.default_rng(seed).permutation(emb.n_obs)]
        control = tl.train(sdata, model=model, seed=seed, n_top_genes=n_genes, show_progress_bar=False)
        tl.predict(sdata, control, key_added="shuffled_expression", spots_key=None)
        emb.X = original
        shuffled = bench.evaluate(sdata, level="cell", predicted_key="shuffled_expression")
        results["shuffled_cell_pearson"] = float(shuffled["pearson"].mean())
        del sdata.tables["shuffled_expression"]

    if store.exists():
        import shutil

        shutil.rmtree(store)
    from ._utils import quiet_zarr

    with quiet_zarr():
        sdata.write(store)
    genes = [g for g in ("EPCAM", "COL1A1", "PTPRC") if g in trained.genes]
    pl.expression(sdata, genes, truth_key="true_expression", save=out / "expression.png")
    elapsed = time.perf_counter() - t0

    _echo("")
    _echo(
        f"scellst demo: synthetic tissue -> segment_nuclei -> assign_cells -> embed_cells -> train({model!r}) -> predict"
    )
    _echo(
        f"  cells: {sdata.tables['nuclei_expression'].n_obs:,} predicted, {100 * matched:.1f}% matched to a true cell"
    )
    _echo(f"  mean spot-level Pearson (held-in spots, {len(spot_corr)} genes): {results['spot_pearson']:.3f}")
    _echo(f"  mean cell-level Pearson vs true expression: {results['cell_pearson']:.3f}")
    if shuffled_control:
        _echo(f"  same, model trained on shuffled embeddings:  {results['shuffled_cell_pearson']:.3f}")
    _echo(f"  wrote {store} and {out / 'expression.png'} and {out / 'model.pt'} in {elapsed:.0f} s")
    return results


TRAIN_EXAMPLES = """examples:
  # a Space Ranger folder and its full-resolution H&E
  scellst train outs/ --fullres-image slide.tif --out run1
  # several scellst / SpatialData zarr stores, 100 genes, DeepSpot2Cell
  scellst train a.zarr b.zarr --out run2 --n-genes 100 --model deepspot2cell
  # your own gene list (one name per line)
  scellst train a.zarr --out run3 --genes genes.txt

writes run1/model.pt and run1/<slide>.zarr (the slide with nuclei, embeddings and the predicted cell table
'nuclei_expression'); input stores are only read.
"""

PREDICT_EXAMPLES = """examples:
  # H&E-only slides (microns per pixel read from the SVS/OME-TIFF metadata)
  scellst predict run1/model.pt slide1.svs slide2.svs --out predictions --export h5ad csv
  # a JPEG/PNG states no pixel size: give it
  scellst predict run1/model.pt tile.png --microns-per-pixel 0.5 --out predictions
  # a cohort on a local dask cluster of 4 worker processes, 6 GiB each
  scellst predict run1/model.pt cohort/*.svs --out predictions --workers 4 --memory-per-worker 6GiB
  # the same on a running cluster (its workers must see the slides and --out)
  scellst predict run1/model.pt cohort/*.svs --out predictions --scheduler tcp://10.0.0.1:8786

writes predictions/<slide>.zarr (whole or not at all) and, with --export, <slide>_cells.h5ad / .csv.gz.
Interrupted? Run the same command again: finished slides are skipped, a partial slide resumes where it stopped.
"""


def _command(sub, name: str, summary: str, description: str, examples: str) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with its examples, printed as written."""
    return sub.add_parser(
        name,
        help=summary,
        description=description,
        epilog=examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (never the inputs)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    cluster = p.add_mutually_exclusive_group()
    cluster.add_argument("--workers", type=int, default=None,
                         help="run the tiles on a local dask cluster of this many worker processes")  # fmt: skip
    cluster.add_argument("--scheduler", default=None,
                         help="address of a running dask scheduler (e.g. tcp://10.0.0.1:8786)")  # fmt: skip
    p.add_argument("--memory-per-worker", default="auto",
                   help="memory limit of each local worker, e.g. 4GiB (default: the machine's memory shared)")  # fmt: skip


def _cluster_kwargs(args) -> dict:
    return {"n_workers": args.workers, "scheduler": args.scheduler, "memory_limit": args.memory_per_worker}


def _train_parser(sub) -> None:
    p = _command(
        sub,
        "train",
        "train on slides with spots (Space Ranger folders or zarr stores) and predict their cells",
        "Train a model on spot transcriptomics + H&E, then write the model and the predicted slides.",
        TRAIN_EXAMPLES,
    )
    p.add_argument("slides", nargs="+", type=Path, help="Space Ranger 'outs' folders or zarr stores")
    p.add_argument("--out", type=Path, required=True, help="output folder (model.pt, <slide>.zarr)")
    p.add_argument("--fullres-image", type=Path, nargs="+", default=None,
                   help="full-resolution H&E of each Space Ranger folder, in the same order")  # fmt: skip
    genes = p.add_mutually_exclusive_group()
    genes.add_argument("--n-genes", type=int, default=50, help="number of genes to select (default: 50)")
    genes.add_argument("--genes", type=Path, default=None, help="text file with one gene name per line")
    p.add_argument("--gene-selection", default="hvg", choices=["hvg", "svg", "rmax"],
                   help="how genes are selected (default: hvg, batch-aware over the slides)")  # fmt: skip
    p.add_argument("--model", default="scellst", help="model of the registry (default: scellst)")
    p.add_argument("--n-models", type=int, default=None, help="ensemble size (default: the model's own)")
    p.add_argument("--embedding", default="morphology",
                   choices=["morphology", "shape", "ssl", "encoder", "efficientnet-lite0"],
                   help="how to embed cells of slides without embeddings (default: morphology)")  # fmt: skip
    p.add_argument("--encoder", type=Path, default=None, help="encoder file for --embedding ssl/encoder")
    p.add_argument("--max-epochs", type=int, default=None, help="maximum training epochs")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--no-stores", action="store_true", help="write the model only, not the predicted slides")
    _output_flags(p)


def _predict_parser(sub) -> None:
    p = _command(
        sub,
        "predict",
        "apply a saved model to H&E slides or stores",
        "Segment, embed and predict the cells of new slides with a saved model.",
        PREDICT_EXAMPLES,
    )
    p.add_argument("model", type=Path, help="model file written by `scellst train` or ScellstModel.save")
    p.add_argument("slides", nargs="+", type=Path, help="H&E images (SVS, NDPI, TIFF, JPEG, PNG), zarr stores, "
                   "or Space Ranger folders")  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--microns-per-pixel", type=float, default=None,
                   help="pixel size of images whose metadata states none")  # fmt: skip
    p.add_argument("--fullres-image", type=Path, nargs="+", default=None,
                   help="full-resolution H&E of each Space Ranger folder, in the same order")  # fmt: skip
    p.add_argument("--encoder", type=Path, default=None, help="encoder file of a model trained on ssl/encoder")
    p.add_argument("--export", nargs="+", default=[], choices=["h5ad", "csv"], help="also export the cell table")
    p.add_argument("--tile-size", type=int, default=2048,
                   help="tile side in pixels: one task of segmentation and embedding (default: 2048)")  # fmt: skip
    _output_flags(p)


def _run_train(args) -> None:
    from . import tl

    kwargs = {"model": args.model, "seed": args.seed, "flavor": args.gene_selection, "n_top_genes": args.n_genes}
    if args.genes is not None:
        if not args.genes.exists():
            raise SystemExit(f"Gene list {str(args.genes)!r} does not exist.")
        kwargs["genes"] = [g.strip() for g in args.genes.read_text().splitlines() if g.strip()]
    if args.n_models is not None:
        kwargs["n_models"] = args.n_models
    if args.max_epochs is not None:
        kwargs["max_epochs"] = args.max_epochs
    t0 = time.perf_counter()
    model, runs = tl.run_train(
        args.slides,
        args.out,
        fullres_images=args.fullres_image,
        embedding=args.embedding,
        encoder=args.encoder,
        write_stores=not args.no_stores,
        overwrite=args.overwrite,
        show_progress_bar=not args.quiet,
        **_cluster_kwargs(args),
        **kwargs,
    )
    _echo(f"\nscellst train: {len(runs)} slide(s), {len(model.genes)} genes, model {model.model!r}")
    for run in runs:
        _echo(f"  {run.name}: {', '.join(run.steps) or 'nothing to do'}; {run.n_cells:,} cells -> {run.store}")
    _echo(f"  wrote {args.out / 'model.pt'} in {time.perf_counter() - t0:.0f} s")


def _run_predict(args) -> None:
    from . import tl

    t0 = time.perf_counter()
    runs = tl.run_predict(
        args.model,
        args.slides,
        args.out,
        microns_per_pixel=args.microns_per_pixel,
        fullres_images=args.fullres_image,
        encoder=args.encoder,
        export=args.export,
        tile_size=args.tile_size,
        overwrite=args.overwrite,
        show_progress_bar=not args.quiet,
        **_cluster_kwargs(args),
    )
    _echo(f"\nscellst predict: {len(runs)} slide(s)")
    for run in runs:
        if run.steps == ["skipped"]:
            _echo(f"  {run.name}: already done by an earlier run -> {run.store}")
            continue
        extra = f" + {', '.join(run.exports)}" if run.exports else ""
        _echo(f"  {run.name}: {run.n_cells:,} cells in {run.seconds:.0f} s -> {run.store}{extra}")
    _echo(f"  done in {time.perf_counter() - t0:.0f} s")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``scellst`` command."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="scellst",
        description="Single-cell expression from H&E histology, trained on spot transcriptomics.",
        epilog="`scellst <command> --help` shows each command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"scellst {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _predict_parser(sub)
    demo = sub.add_parser("demo", help="run the whole pipeline on the embedded synthetic tissue")
    demo.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (default: demo_output)")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the tissue and the model")
    demo.add_argument("--overwrite", action="store_true", help="replace an existing demo store")
    demo.add_argument("--size-um", type=float, default=1600.0, help="side of the synthetic tissue in microns")
    demo.add_argument("--no-control", action="store_true", help="skip the shuffled-embedding control")
    demo.add_argument(
        "--model",
        default="scellst",
        choices=["scellst", "deepspot2cell", "miso"],
        help="model to train (default: scellst; cpnn needs a single-cell reference)",
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            _run_train(args)
        elif args.command == "predict":
            _run_predict(args)
        elif args.command == "demo":
            run_demo(
                args.out,
                seed=args.seed,
                size_um=(args.size_um, args.size_um),
                overwrite=args.overwrite,
                shuffled_control=not args.no_control,
                model=args.model,
            )
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as err:
        # a user's mistake: one clear line, no traceback (SCELLST_DEBUG=1 shows it)
        import os

        if os.environ.get("SCELLST_DEBUG"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        sys.stderr.write(f"scellst {args.command}: error: {message}\n")
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
