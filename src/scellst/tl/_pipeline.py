"""The main job end to end on a user's own slides: what ``scellst train`` and ``scellst predict`` run."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._constants import Attr, Col, Key
from .._logging import logger
from .._utils import quiet_zarr, scellst_attrs

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
    tile_cache: str | Path | None = None,
    tile_size: int = 2048,
    overwrite: bool = False,
    show_progress_bar: bool = True,
) -> list[str]:
    """Run the steps a slide still lacks: nuclei, embeddings, assignment to spots.

    Each step writes its elements to the slide's store as it ends when the object is backed, so a slide whose run
    was interrupted resumes at the first missing step. Cells are assigned to Visium HD bins by overlap (nuclei grown
    by 3 um), and to other spots by centroid.

    Parameters
    ----------
    sdata
        The slide (modified in place; with ``overwrite=False`` nothing already there is replaced).
    method, encoder, context_um
        How to embed the cells when the slide has no embedding table (see :func:`scellst.im.embed_cells`).
    tile_cache
        A folder for the finished tiles of segmentation and embedding (subfolders ``segment`` and ``embed``), so that
        an interrupted step resumes tile by tile (see :func:`scellst.im.segment_nuclei`).
    tile_size
        Tile side in pixels of segmentation and embedding (memory per task grows with its square).
    overwrite
        Let a step replace the leftovers of an interrupted run of itself (e.g. a label image written before the
        shapes): for stores that the pipeline made itself.
    show_progress_bar
        Show the progress of segmentation and embedding.

    Returns
    -------
    The steps that ran, in order (``"segment_nuclei"``, ``"embed_cells"``, ``"assign_cells"``).
    """
    from .. import pp
    from ..im._embed import embed_cells
    from ..im._segment import segment_nuclei
    from ..pp._assign import default_assignment

    cache = None if tile_cache is None else Path(tile_cache)
    steps = []
    if Key.NUCLEI not in sdata.shapes:
        segment_nuclei(
            sdata,
            tile_cache=None if cache is None else cache / "segment",
            tile_size=tile_size,
            overwrite=overwrite,
            show_progress_bar=show_progress_bar,
        )
        steps.append("segment_nuclei")
    emb_key = f"{Key.NUCLEI}{Key.EMBEDDINGS_SUFFIX}"
    if emb_key not in sdata.tables:
        embed_cells(
            sdata,
            method=method,
            encoder=encoder,
            context_um=context_um,
            tile_cache=None if cache is None else cache / "embed",
            tile_size=tile_size,
            overwrite=overwrite,
            show_progress_bar=show_progress_bar,
        )
        steps.append("embed_cells")
    if Key.SPOTS in sdata.shapes:
        spots_table = sdata.tables.get(Key.SPOTS_COUNTS)
        if Col.SPOT_ID not in sdata.tables[emb_key].obs or (
            spots_table is not None and Col.N_CELLS not in spots_table.obs
        ):
            # overwrite: the table made after an earlier assignment lacks its column
            pp.assign_cells(sdata, overwrite=True, **default_assignment(sdata))
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


def _check_outputs(
    out: Path,
    names: Sequence[str],
    *,
    overwrite: bool,
    inputs: Sequence[Path],
    markers: Sequence[dict] | None = None,
) -> set[str]:
    """Refuse to write over an input or an existing output; return the slides already finished by the same run.

    With ``markers`` (see :func:`run_predict`), an existing output recorded with the same marker is a finished slide
    of the same run, to be skipped rather than refused.
    """
    done = set()
    for i, name in enumerate(names):
        target = out / f"{name}.zarr"
        if any(target.resolve() == p.resolve() for p in inputs):
            raise ValueError(
                f"{str(target)!r} is one of the input stores; scellst never writes over its input. Choose another --out."
            )
        if not target.exists() or overwrite:
            continue
        if markers is not None and _stored_marker(target) == markers[i]:
            done.add(name)
            continue
        raise FileExistsError(
            f"{str(target)!r} already exists"
            + (" and was not made by this model from this slide" if markers is not None else "")
            + "; pass overwrite=True (--overwrite) to replace it, or another --out."
        )
    return done


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
    _swap_into(partial, target)
    sdata.path = target


def _swap_into(partial: Path, target: Path) -> None:
    """Rename a complete store to ``target``; an old ``target`` is moved aside first and removed only after."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            shutil.rmtree(old)
        target.rename(old)
        partial.rename(target)
        shutil.rmtree(old)
    else:
        partial.rename(target)


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
        tmp = out / f".{name}_cells.h5ad.partial"
        table.write_h5ad(tmp)
        tmp.replace(path)
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
        tmp = out / f".{name}_cells.csv.gz.partial"
        pd.concat([frame, values], axis=1).rename_axis(Col.CELL_ID).to_csv(tmp, float_format="%.4g", compression="gzip")
        tmp.replace(path)
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


def _prepare_training_slides(names, paths, fullres_images, embedding, encoder, show_progress_bar) -> tuple[list, list]:
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
    return runs, sdatas


def run_train(
    slides: Sequence[str | Path],
    out: str | Path,
    *,
    fullres_images: Sequence[str | Path] | None = None,
    embedding: str = "morphology",
    encoder: Any = None,
    write_stores: bool = True,
    n_workers: int | None = None,
    scheduler: str | None = None,
    memory_limit: str | float | None = "auto",
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
    n_workers, scheduler, memory_limit
        Where the tiles of segmentation and embedding run (see :func:`run_predict`).
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
    from .._cluster import dask_client
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
    with dask_client(n_workers, scheduler=scheduler, memory_limit=memory_limit):
        runs, sdatas = _prepare_training_slides(names, paths, fullres_images, embedding, encoder, show_progress_bar)
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
    n_workers: int | None = None,
    scheduler: str | None = None,
    memory_limit: str | float | None = "auto",
    tile_size: int = 2048,
    overwrite: bool = False,
    show_progress_bar: bool = True,
) -> list[SlideRun]:
    """Apply a saved model to slides on disk (H&E-only images, stores, Space Ranger folders), resumably.

    Each slide is read, segmented and embedded the way the model's training slides were (the embedding method and
    neighbourhood radii are read from the model), predicted, and written to ``{out}/{slide}.zarr``. The slide's
    store is built in ``{out}/.{slide}.zarr.partial``: each element is written to it as soon as it is made, and the
    finished tiles of segmentation and embedding are kept in ``{out}/.{slide}.tiles``; the store is renamed to
    ``{slide}.zarr`` only when complete, so a finished slide is whole on disk or absent.

    Resume: running the same call again after an interruption (Ctrl-C, a killed worker or process) skips the slides
    already finished with the same model and source, continues a partial slide from its last written element and
    its finished tiles, and ends with exactly the result of an uninterrupted run.

    Tiles run on a dask cluster when asked (``n_workers`` local worker processes, or a ``scheduler`` address), on the
    active ``dask.distributed`` client if there is one, otherwise on local threads; slides are processed one after
    another, each spreading its tiles over all the workers.

    Parameters
    ----------
    model
        A fitted model or the path of a saved one.
    slides
        Paths of the slides.
    out
        Output folder (on a cluster: a folder that the workers can read and write).
    microns_per_pixel
        Pixel size of image files whose metadata states none.
    fullres_images
        One full-resolution H&E per slide, for Space Ranger folders.
    encoder
        The encoder file, for a model trained on ``"ssl"`` or ``"encoder"`` embeddings.
    export
        Extra formats of the cell table: ``"h5ad"``, ``"csv"``.
    n_workers
        Start a local dask cluster of this many worker processes for the run.
    scheduler
        Address of a running dask scheduler to use instead (e.g. ``"tcp://10.0.0.1:8786"``).
    memory_limit
        Memory limit of each local worker (``"4GiB"``; ``"auto"`` shares the machine's memory).
    tile_size
        Tile side in pixels of segmentation and embedding: one task each (its memory grows with the square).
    overwrite
        Replace existing outputs (never the inputs); without it, a finished output made by the same model from the
        same source is kept and skipped, any other existing output is an error.
    show_progress_bar
        Progress bars of every step.

    Returns
    -------
    One :class:`SlideRun` per slide (``steps == ["skipped"]`` for a slide finished by an earlier run).
    """
    from .._cluster import dask_client
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
    if fullres_images is not None and len(fullres_images) != len(paths):
        raise ValueError(
            f"{len(fullres_images)} full-resolution image(s) for {len(paths)} slide(s); give one per slide."
        )
    _check_inputs(paths)
    out = Path(out)
    taken: set[str] = set()
    names = [_slide_name(p, taken) for p in paths]
    model_sha = model.fingerprint()
    markers = [
        _run_marker(model_sha, path, None if fullres_images is None else fullres_images[i], microns_per_pixel, encoder)
        for i, path in enumerate(paths)
    ]
    done = _check_outputs(out, names, overwrite=overwrite, inputs=paths, markers=markers)
    out.mkdir(parents=True, exist_ok=True)
    radii = context_radii(model.feature_names)
    runs = []
    with dask_client(n_workers, scheduler=scheduler, memory_limit=memory_limit), _ctrl_c() as stop_if_interrupted:
        for i, (name, path, marker) in enumerate(zip(names, paths, markers, strict=True)):
            target = out / f"{name}.zarr"
            if name in done:
                logger.info(f"[{i + 1}/{len(paths)}] {name}: already finished by an earlier run ({target}); skipped")
                runs.append(SlideRun(name=name, source=str(path), steps=["skipped"], store=str(target)))
                continue
            t0 = time.perf_counter()
            logger.info(f"[{i + 1}/{len(paths)}] {name}: reading {path}")
            image = None if fullres_images is None else fullres_images[i]
            sdata, steps = _open_partial(out, name, path, image, microns_per_pixel, marker)
            steps += prepare_cells(
                sdata,
                method=method,
                encoder=encoder,
                context_um=radii,
                tile_cache=out / f".{name}.tiles",
                tile_size=tile_size,
                overwrite=True,  # only ever the leftovers of an interrupted run, in the run's own partial store
                show_progress_bar=show_progress_bar,
            )
            stop_if_interrupted()
            key = f"{Key.NUCLEI}{Key.EXPRESSION_SUFFIX}"
            predict(sdata, model, overwrite=True)
            steps.append("predict")
            run = SlideRun(name=name, source=str(path), steps=steps, n_cells=int(sdata.tables[key].n_obs))
            run.exports = export_cells(sdata, out, name, export, key) if export else []
            stop_if_interrupted()  # a slide is finished only by a run that was not interrupted
            _finish(out, name, overwrite=overwrite)
            run.store = str(target)
            run.seconds = time.perf_counter() - t0
            runs.append(run)
            logger.info(
                f"[{i + 1}/{len(paths)}] {name}: {run.n_cells:,} cells predicted in {run.seconds:.0f} s -> {target}"
            )
    return runs


@contextmanager
def _ctrl_c():
    """Ctrl-C always stops the run, even when the ``KeyboardInterrupt`` it raises is lost.

    Python raises ``KeyboardInterrupt`` wherever the main thread is; when that is inside code that swallows exceptions
    (a finaliser, a library's error handling), the run would go on and finish. The handler also records the signal,
    and the pipeline checks the record between steps and before a slide is marked finished.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:
        yield lambda: None
        return
    hit = threading.Event()

    def handler(signum, frame):
        hit.set()
        raise KeyboardInterrupt

    def stop_if_interrupted() -> None:
        if hit.is_set():
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield stop_if_interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


def _run_marker(model_sha: str, path: Path, image: Any, mpp: float | None, encoder: Any) -> dict[str, Any]:
    """What a slide's output depends on: the model, the source (and its image and pixel size), the encoder."""
    enc = None
    if isinstance(encoder, str | Path):
        enc = str(Path(encoder).resolve())
    elif encoder is not None:
        enc = f"{type(encoder).__qualname__}@{id(encoder)}"  # an object in memory: never matches another run
    return {
        "model_sha256": model_sha,
        "source": str(path.resolve()),
        "fullres_image": None if image is None else str(Path(image).resolve()),
        "microns_per_pixel": mpp,
        "encoder": enc,
    }


def _stored_marker(store: Path) -> dict[str, Any] | None:
    """The run marker recorded in a store made by :func:`run_predict` (``None`` if there is none)."""
    import json

    for meta in (store / "zarr.json", store / ".zattrs"):
        if meta.exists():
            doc = json.loads(meta.read_text())
            attrs = doc.get("attributes", doc)
            return attrs.get(Attr.ROOT, {}).get(Attr.RUN)
    return None


def _open_partial(out: Path, name: str, path: Path, image: Any, mpp: float | None, marker: dict) -> tuple[Any, list]:
    """The slide's partial store, backed on disk: the one an interrupted run left, or a new copy of the input."""
    import spatialdata as sd

    partial = out / f".{name}.zarr.partial"
    if partial.exists() and _stored_marker(partial) == marker:
        logger.info(f"{name}: resuming the interrupted run from {partial}")
        with quiet_zarr():
            return sd.read_zarr(partial), ["resumed"]
    if partial.exists():
        shutil.rmtree(partial)
    (sdata,) = _open([path], None if image is None else [image], mpp)
    scellst_attrs(sdata)[Attr.RUN] = marker
    fresh = out / f".{name}.zarr.init"
    if fresh.exists():
        shutil.rmtree(fresh)
    with quiet_zarr():
        sdata.write(fresh)  # lazily, chunk by chunk; renamed once whole, so a partial store is always readable
    fresh.rename(partial)
    shutil.rmtree(out / f".{name}.tiles", ignore_errors=True)  # tiles of another run of this name
    with quiet_zarr():
        return sd.read_zarr(partial), []


def _finish(out: Path, name: str, *, overwrite: bool) -> None:
    """Rename the complete partial store to ``{name}.zarr`` (replacing an old one only with ``overwrite``)."""
    partial, target = out / f".{name}.zarr.partial", out / f"{name}.zarr"
    if target.exists() and not overwrite:
        raise FileExistsError(f"{str(target)!r} appeared during the run; pass overwrite=True to replace it.")
    _swap_into(partial, target)
    shutil.rmtree(out / f".{name}.tiles", ignore_errors=True)
