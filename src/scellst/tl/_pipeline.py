"""The main job end to end on a user's own slides: what ``scellst train`` and ``scellst predict`` run."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._constants import Col, Key
from .._logging import logger
from .._utils import quiet_zarr

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from ..models import ScellstModel

EXPORT_FORMATS = ("h5ad", "csv")


@dataclass
class SlideRun:
    """What the pipeline did to one slide."""

    name: str
    source: str
    steps: list[str] = field(default_factory=list)
    n_cells: int = 0
    store: str | None = None
    exports: list[str] = field(default_factory=list)
    seconds: float = 0.0


def context_radii(feature_names: Sequence[str]) -> tuple[float, ...]:
    """The neighbourhood radii (microns) of an embedding, read back from its feature names (``density_nb{r}um``)."""
    radii = []
    for name in feature_names:
        match = re.fullmatch(r"density_nb([0-9.]+)um", name)
        if match:
            radii.append(float(match.group(1)))
    return tuple(radii)


def prepare_cells(
    sdata: SpatialData,
    *,
    method: str = "morphology",
    encoder: Any = None,
    context_um: Sequence[float] | str | None = "auto",
    show_progress_bar: bool = True,
) -> list[str]:
    """Run the steps a slide still lacks: nuclei, assignment to spots, embeddings.

    Parameters
    ----------
    sdata
        The slide (modified in place; nothing already there is replaced).
    method, encoder, context_um
        How to embed the cells when the slide has no embedding table (see :func:`scellst.tl.embed_cells`).
    show_progress_bar
        Show the progress of segmentation and embedding.

    Returns
    -------
    The steps that ran, in order (``"segment_nuclei"``, ``"assign_cells"``, ``"embed_cells"``).
    """
    from .. import pp
    from ._embed import embed_cells

    steps = []
    if Key.NUCLEI not in sdata.shapes:
        pp.segment_nuclei(sdata, show_progress_bar=show_progress_bar)
        steps.append("segment_nuclei")
    emb_key = f"{Key.NUCLEI}{Key.EMBEDDINGS_SUFFIX}"
    has_spots = Key.SPOTS in sdata.shapes
    if emb_key not in sdata.tables:
        embed_cells(
            sdata, method=method, encoder=encoder, context_um=context_um, show_progress_bar=show_progress_bar
        )  # fmt: skip
        steps.append("embed_cells")
    if has_spots and Col.SPOT_ID not in sdata.tables[emb_key].obs:
        pp.assign_cells(sdata, overwrite=True)  # the table made after an earlier assignment lacks its column
        steps.append("assign_cells")
    return steps


def _slide_name(path: Path, taken: set[str]) -> str:
    name = path.name[: -len(".zarr")] if path.name.endswith(".zarr") else path.stem if path.is_file() else path.name
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "slide"
    unique, i = name, 1
    while unique in taken:
        i += 1
        unique = f"{name}_{i}"
    taken.add(unique)
    return unique


def _check_outputs(out: Path, names: Sequence[str], *, overwrite: bool, inputs: Sequence[Path]) -> None:
    for name in names:
        target = out / f"{name}.zarr"
        if any(target.resolve() == p.resolve() for p in inputs):
            raise ValueError(
                f"{str(target)!r} is one of the input stores; scellst never writes over its input. Choose another --out."
            )
        if target.exists() and not overwrite:
            raise FileExistsError(
                f"{str(target)!r} already exists; pass overwrite=True (--overwrite) to replace it, or another --out."
            )


def write_store(sdata: SpatialData, target: Path, *, overwrite: bool) -> None:
    """Write ``sdata`` to ``target`` whole or not at all: into a temporary folder beside it, then renamed.

    An existing ``target`` is replaced only with ``overwrite`` and only once the new store is complete.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{str(target)!r} already exists; pass overwrite=True to replace it.")
    partial = target.with_name(f".{target.name}.partial")
    if partial.exists():
        shutil.rmtree(partial)
    with quiet_zarr():
        sdata.write(partial)
    sdata.path = None
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            shutil.rmtree(old)
        target.rename(old)
        partial.rename(target)
        shutil.rmtree(old)
    else:
        partial.rename(target)
    sdata.path = target


def export_cells(sdata: SpatialData, out: Path, name: str, formats: Sequence[str], key: str) -> list[str]:
    """Write the predicted cell table as ``{name}_cells.h5ad`` and/or ``{name}_cells.csv.gz`` (x, y in microns)."""
    from .._utils import get_microns_per_pixel, source_image_key

    unknown = sorted(set(formats) - set(EXPORT_FORMATS))
    if unknown:
        raise ValueError(f"Unknown export format(s) {unknown}; choose from {EXPORT_FORMATS}.")
    table = sdata.tables[key]
    written = []
    if "h5ad" in formats:
        path = out / f"{name}_cells.h5ad"
        table.write_h5ad(path)
        written.append(str(path))
    if "csv" in formats:
        import pandas as pd

        mpp = get_microns_per_pixel(sdata, source_image_key(sdata, Key.NUCLEI, None))
        xy = np.asarray(table.obsm["spatial"], dtype=float) * mpp
        frame = pd.DataFrame({"x_um": xy[:, 0], "y_um": xy[:, 1]}, index=table.obs[Col.CELL_ID].astype(str))
        if Col.SPOT_ID in table.obs:
            frame[Col.SPOT_ID] = table.obs[Col.SPOT_ID].to_numpy()
        values = pd.DataFrame(np.asarray(table.X), index=frame.index, columns=list(table.var_names))
        path = out / f"{name}_cells.csv.gz"
        pd.concat([frame, values], axis=1).rename_axis(Col.CELL_ID).to_csv(path, float_format="%.4g")
        written.append(str(path))
    return written


def _check_inputs(paths: Sequence[Path]) -> None:
    """Every input exists, before any output folder is made."""
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(
            f"{missing[0]!r} does not exist." if len(missing) == 1 else f"Missing inputs: {missing}."
        )


def _open(paths: Sequence[str | Path], images: Sequence[str | Path] | None, mpp: float | None) -> list:
    from ..io import read

    if images is not None and len(images) != len(paths):
        raise ValueError(f"{len(images)} full-resolution image(s) for {len(paths)} slide(s); give one per slide.")
    sdatas = []
    for i, p in enumerate(paths):
        sdata = read(p, fullres_image=None if images is None else images[i], microns_per_pixel=mpp)
        sdata.path = None  # an input store is only read: every change stays in memory until written to `out`
        sdatas.append(sdata)
    return sdatas


def run_train(
    slides: Sequence[str | Path],
    out: str | Path,
    *,
    fullres_images: Sequence[str | Path] | None = None,
    embedding: str = "morphology",
    encoder: Any = None,
    write_stores: bool = True,
    overwrite: bool = False,
    show_progress_bar: bool = True,
    **train_kwargs: Any,
) -> tuple[ScellstModel, list[SlideRun]]:
    """Train on slides on disk and write the model and the slides with their predicted cells.

    Each slide is read (:func:`scellst.io.read`: a zarr store, a Space Ranger folder with its full-resolution
    image, ...), gets the steps it lacks (:func:`prepare_cells`), then :func:`scellst.tl.train` runs on all of them
    and :func:`scellst.tl.predict` writes each slide's cell table. Input stores are only read.

    Parameters
    ----------
    slides
        Paths of the training slides (each with spots and counts).
    out
        Output folder: ``model.pt`` and, with ``write_stores``, ``{slide}.zarr`` per slide (each written whole or
        not at all).
    fullres_images
        One full-resolution H&E per slide, for Space Ranger folders (``None`` for stores).
    embedding, encoder
        How to embed cells of slides that have no embedding table.
    write_stores
        Predict the training slides and write them to ``out``.
    overwrite
        Replace existing outputs (never the inputs).
    show_progress_bar
        Progress bars of every step.
    train_kwargs
        Passed to :func:`scellst.tl.train` (``genes``, ``n_top_genes``, ``model``, ``n_models``, ``seed``, ...).

    Returns
    -------
    The trained model and one :class:`SlideRun` per slide.
    """
    from ._train import predict, train

    out = Path(out)
    paths = [Path(p) for p in slides]
    if not paths:
        raise ValueError("No slide given.")
    _check_inputs(paths)
    taken: set[str] = set()
    names = [_slide_name(p, taken) for p in paths]
    if (out / "model.pt").exists() and not overwrite:
        raise FileExistsError(f"{str(out / 'model.pt')!r} already exists; pass overwrite=True (--overwrite).")
    if write_stores:
        _check_outputs(out, names, overwrite=overwrite, inputs=paths)
    out.mkdir(parents=True, exist_ok=True)
    runs, sdatas = [], []
    for name, path, sdata in zip(names, paths, _open(paths, fullres_images, None), strict=True):
        t0 = time.perf_counter()
        missing = [
            k for k, kind in ((Key.SPOTS, "shapes"), (Key.SPOTS_COUNTS, "tables")) if k not in getattr(sdata, kind)
        ]
        if missing:
            raise ValueError(
                f"{str(path)!r} has no {' and no '.join(repr(m) for m in missing)}: training needs spots with counts "
                "(a Space Ranger folder, or a store made by a scellst reader)."
            )
        logger.info(f"{name}: preparing cells")
        steps = prepare_cells(sdata, method=embedding, encoder=encoder, show_progress_bar=show_progress_bar)
        runs.append(SlideRun(name=name, source=str(path), steps=steps, seconds=time.perf_counter() - t0))
        sdatas.append(sdata)
    t0 = time.perf_counter()
    model = train(sdatas, show_progress_bar=show_progress_bar, **train_kwargs)
    model.save(out / "model.pt")
    logger.info(f"Trained in {time.perf_counter() - t0:.0f} s; saved {out / 'model.pt'}")
    if write_stores:
        for run, sdata in zip(runs, sdatas, strict=True):
            t0 = time.perf_counter()
            key = f"{Key.NUCLEI}{Key.EXPRESSION_SUFFIX}"
            predict(sdata, model, overwrite=True)
            run.steps.append("predict")
            run.n_cells = int(sdata.tables[key].n_obs)
            target = out / f"{run.name}.zarr"
            write_store(sdata, target, overwrite=overwrite)
            run.store = str(target)
            run.seconds += time.perf_counter() - t0
    return model, runs


def run_predict(
    model: ScellstModel | str | Path,
    slides: Sequence[str | Path],
    out: str | Path,
    *,
    microns_per_pixel: float | None = None,
    fullres_images: Sequence[str | Path] | None = None,
    encoder: Any = None,
    export: Sequence[str] = (),
    overwrite: bool = False,
    show_progress_bar: bool = True,
) -> list[SlideRun]:
    """Apply a saved model to slides on disk (H&E-only images, stores, Space Ranger folders).

    Each slide is read, segmented and embedded the way the model's training slides were (the embedding method and
    neighbourhood radii are read from the model), predicted, and written to ``{out}/{slide}.zarr`` whole or not at
    all; ``export`` also writes the cell table as ``.h5ad`` and/or ``.csv.gz``.

    Parameters
    ----------
    model
        A fitted model or the path of a saved one.
    slides
        Paths of the slides.
    out
        Output folder.
    microns_per_pixel
        Pixel size of image files whose metadata states none.
    fullres_images
        One full-resolution H&E per slide, for Space Ranger folders.
    encoder
        The encoder file, for a model trained on ``"ssl"`` or ``"encoder"`` embeddings.
    export
        Extra formats of the cell table: ``"h5ad"``, ``"csv"``.
    overwrite
        Replace existing outputs (never the inputs).
    show_progress_bar
        Progress bars of every step.

    Returns
    -------
    One :class:`SlideRun` per slide.
    """
    from ..models import ScellstModel
    from ._train import predict

    if isinstance(model, str | Path):
        model = ScellstModel.load(model)
    unknown = sorted(set(export) - set(EXPORT_FORMATS))
    if unknown:
        raise ValueError(f"Unknown export format(s) {unknown}; choose from {EXPORT_FORMATS}.")
    method = model.embedding_method
    if method in ("ssl", "encoder") and encoder is None:
        raise ValueError(
            f"The model was trained on {method!r} embeddings: pass the same encoder file (--encoder) to embed the "
            "new slides the same way."
        )
    paths = [Path(p) for p in slides]
    if not paths:
        raise ValueError("No slide given.")
    _check_inputs(paths)
    out = Path(out)
    taken: set[str] = set()
    names = [_slide_name(p, taken) for p in paths]
    _check_outputs(out, names, overwrite=overwrite, inputs=paths)
    out.mkdir(parents=True, exist_ok=True)
    radii = context_radii(model.feature_names)
    runs = []
    for i, (name, path) in enumerate(zip(names, paths, strict=True)):
        t0 = time.perf_counter()
        logger.info(f"[{i + 1}/{len(paths)}] {name}: reading {path}")
        (sdata,) = _open([path], None if fullres_images is None else [fullres_images[i]], microns_per_pixel)
        steps = prepare_cells(
            sdata, method=method, encoder=encoder, context_um=radii, show_progress_bar=show_progress_bar
        )  # fmt: skip
        key = f"{Key.NUCLEI}{Key.EXPRESSION_SUFFIX}"
        predict(sdata, model, overwrite=True)
        steps.append("predict")
        target = out / f"{name}.zarr"
        write_store(sdata, target, overwrite=overwrite)
        run = SlideRun(
            name=name, source=str(path), steps=steps, n_cells=int(sdata.tables[key].n_obs), store=str(target)
        )
        run.exports = export_cells(sdata, out, name, export, key) if export else []
        run.seconds = time.perf_counter() - t0
        runs.append(run)
        logger.info(
            f"[{i + 1}/{len(paths)}] {name}: {run.n_cells:,} cells predicted in {run.seconds:.0f} s -> {target}"
        )
    return runs
