"""Tile tasks: run on the active dask scheduler with a progress bar, and optionally kept on disk tile by tile.

Every whole-slide step (segmentation, morphology embedding) cuts the slide into tiles and computes one task per tile.
:func:`run_tiles` computes them on the active ``dask.distributed`` client when there is one (any cluster: a
``LocalCluster``, a scheduler address, SLURM through dask-jobqueue), otherwise on local threads. With a
:class:`TileCache`, the task that computes a tile also writes its result to the cache folder (atomically: a temporary
file renamed into place), and a later run with the same folder and the same parameters loads the finished tiles
instead of computing them again: an interrupted run (Ctrl-C, a killed worker or process) resumes where it stopped
and ends with exactly the result of an uninterrupted one. On a cluster, the folder must be on a file system that the
workers share with the client.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ._logging import logger

Codec = Literal["polygons", "frame"]
_MANIFEST = "manifest.json"


def active_client() -> Any:
    """The active ``dask.distributed`` client, or ``None``."""
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


class TileCache:
    """A folder holding the finished tiles of one step of one slide.

    Parameters
    ----------
    folder
        Where the tiles are kept (made if needed).
    fingerprint
        Everything the tiles' results depend on (step, parameters, image shape, ...), as plain data. A folder made
        with another fingerprint is emptied first, so that stale tiles never mix with new ones.
    codec
        ``"polygons"`` for a segmentation tile (polygons, areas, classes), ``"frame"`` for a data frame.
    """

    def __init__(self, folder: str | Path, fingerprint: dict[str, Any], codec: Codec) -> None:
        self.folder = Path(folder)
        self.codec = codec
        manifest = self.folder / _MANIFEST
        text = json.dumps({"codec": codec, **fingerprint}, sort_keys=True, default=str)
        if self.folder.exists():
            old = manifest.read_text() if manifest.exists() else None
            if old != text:
                logger.info(f"Tile cache {str(self.folder)!r} was made with other parameters; starting afresh.")
                shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if not manifest.exists():
            _write_atomic(manifest, text.encode())

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.{'npz' if self.codec == 'polygons' else 'parquet'}"

    def done(self) -> set[str]:
        """Names of the finished tiles."""
        suffix = ".npz" if self.codec == "polygons" else ".parquet"
        return {p.name[: -len(suffix)] for p in self.folder.glob(f"*{suffix}")}

    def load(self, name: str) -> Any:
        return _load(self.path(name), self.codec)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _save(path: Path, result: Any, codec: Codec) -> None:
    import io

    buf = io.BytesIO()
    if codec == "polygons":
        import shapely

        polys, areas, classes = result
        wkb = shapely.to_wkb(np.asarray(polys, dtype=object)) if len(polys) else np.zeros(0, dtype=object)
        sizes = np.array([len(b) for b in wkb], dtype=np.int64)
        blob = np.frombuffer(b"".join(wkb), dtype=np.uint8) if len(wkb) else np.zeros(0, dtype=np.uint8)
        np.savez(
            buf,
            wkb=blob,
            offsets=np.concatenate([[0], np.cumsum(sizes)]),
            areas=np.asarray(areas, dtype=np.float64),
            classes=np.asarray(classes, dtype=np.int64),
        )
    else:
        result.to_parquet(buf)
    _write_atomic(path, buf.getvalue())


def _load(path: Path, codec: Codec) -> Any:
    if codec == "polygons":
        import shapely

        with np.load(path, allow_pickle=False) as f:
            blob, offsets = f["wkb"].tobytes(), f["offsets"]
            wkb = [blob[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
            polys = list(shapely.from_wkb(wkb)) if wkb else []
            return polys, f["areas"], list(f["classes"])
    import pandas as pd

    return pd.read_parquet(path)


def _compute_and_keep(func: Callable, args: tuple, path: str | None, codec: Codec) -> Any:
    result = func(*args)
    if path is not None:
        _save(Path(path), result, codec)
    return result


def run_tiles(
    func: Callable,
    calls: Sequence[tuple[str, tuple]],
    *,
    cache: TileCache | None = None,
    show_progress_bar: bool = True,
    desc: str = "tiles",
) -> list:
    """Compute ``func(*args)`` for every ``(name, args)`` of ``calls``; results in the order of ``calls``.

    Tiles already in ``cache`` are loaded, the others computed on the active scheduler (and written to ``cache``).
    """
    import dask

    done = cache.done() if cache is not None else set()
    results: list[Any] = [None] * len(calls)
    todo = []
    for i, (name, args) in enumerate(calls):
        if name in done:
            results[i] = cache.load(name)
        else:
            path = str(cache.path(name)) if cache is not None else None
            codec = cache.codec if cache is not None else "frame"
            todo.append((i, dask.delayed(_compute_and_keep)(func, args, path, codec)))
    if done:
        logger.info(f"{desc}: {len(calls) - len(todo)} of {len(calls)} tiles already done, {len(todo)} to compute")
    tasks = [t for _, t in todo]
    computed = _compute(tasks, show_progress_bar=show_progress_bar, desc=desc) if tasks else []
    for (i, _), res in zip(todo, computed, strict=True):
        results[i] = res
    return results


def _compute(tasks: list, *, show_progress_bar: bool, desc: str) -> list:
    """Compute dask delayed tasks on the active scheduler, with a progress bar."""
    import dask

    client = active_client()
    if client is not None:
        futures = client.compute(tasks)
        if show_progress_bar:
            from distributed import as_completed
            from tqdm.auto import tqdm

            for _ in tqdm(as_completed(futures), total=len(futures), desc=desc):
                pass
        return client.gather(futures)
    if show_progress_bar:
        from tqdm.dask import TqdmCallback

        with TqdmCallback(desc=desc):
            return list(dask.compute(*tasks, scheduler="threads"))
    return list(dask.compute(*tasks, scheduler="threads"))
