"""Command-line entry point: ``scellst demo``."""

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

    from . import datasets, pl, pp, tl

    out = Path(out)
    store = out / "demo.zarr"
    if store.exists() and not overwrite:
        raise SystemExit(f"{store} already exists; pass --overwrite to replace it or choose another --out.")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sdata = datasets.synthetic_tissue(seed=seed, size_um=size_um)
    pp.segment_nuclei(sdata)
    pp.assign_cells(sdata)
    tl.embed_cells(sdata)
    trained = tl.train(sdata, model=model, seed=seed)
    tl.predict(sdata, trained)
    trained.save(out / "model.pt")
    cell_corr = tl.evaluate(sdata, level="cell")
    matched = cell_corr.attrs["matched_fraction"]
    spot_corr = tl.evaluate(sdata)
    results = {
        "cell_pearson": float(cell_corr["pearson"].mean()),
        "spot_pearson": float(spot_corr["pearson"].mean()),
        "matched": matched,
    }

    if shuffled_control:
        emb = sdata.tables["nuclei_embeddings"]
        original = emb.X.copy()
        emb.X = original[np.random.default_rng(seed).permutation(emb.n_obs)]
        control = tl.train(sdata, model=model, seed=seed, show_progress_bar=False)
        tl.predict(sdata, control, key_added="shuffled_expression", spots_key=None)
        emb.X = original
        shuffled = tl.evaluate(sdata, level="cell", predicted_key="shuffled_expression")
        results["shuffled_cell_pearson"] = float(shuffled["pearson"].mean())
        del sdata.tables["shuffled_expression"]

    if store.exists():
        import shutil

        shutil.rmtree(store)
    sdata.write(store)
    genes = [g for g in ("EPCAM", "COL1A1", "PTPRC") if g in trained.genes]
    pl.expression(sdata, genes, save=out / "expression.png")
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``scellst`` command."""
    parser = argparse.ArgumentParser(prog="scellst", description="Single-cell expression from H&E histology.")
    sub = parser.add_subparsers(dest="command", required=True)
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
    if args.command == "demo":
        run_demo(
            args.out,
            seed=args.seed,
            size_um=(args.size_um, args.size_um),
            overwrite=args.overwrite,
            shuffled_control=not args.no_control,
            model=args.model,
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
