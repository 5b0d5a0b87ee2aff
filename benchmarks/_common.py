"""Shared helpers of the benchmark scripts (run them from the repository root)."""

from __future__ import annotations

import resource
import shutil
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

DATA = Path("../shared/data")
CACHE = Path("benchmarks/results")


def peak_memory_gib() -> float:
    """Peak resident memory of this process so far (max RSS), in GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def her2st_section(section: str, *, data: Path = DATA, cache: Path = CACHE, verbose: bool = True):
    """A HER2ST section segmented, assigned and embedded (cached as zarr under ``cache``)."""
    import spatialdata as sd

    import scellst
    from scellst.tl._neighbourhood import DEFAULT_CONTEXT_UM

    store = cache / f"her2st_{section}.zarr"
    if store.exists():
        sdata = sd.read_zarr(store)
        made = sdata.tables["nuclei_embeddings"].uns.get("scellst", {}) if "nuclei_embeddings" in sdata.tables else {}
        if [float(r) for r in made.get("context_um", [])] == [float(r) for r in DEFAULT_CONTEXT_UM]:
            if verbose:
                print(f"{section}: cached ({len(sdata.shapes['nuclei']):,} nuclei)")
            return sdata
        if verbose:
            print(f"{section}: the cache holds an older default embedding; computing it again")
        shutil.rmtree(store)
    times = {}
    t = time.perf_counter()
    sdata = scellst.datasets.her2st(section, path=data / "her2st")
    times["read"] = time.perf_counter() - t
    t = time.perf_counter()
    scellst.pp.segment_nuclei(sdata, show_progress_bar=False)
    times["segment"] = time.perf_counter() - t
    scellst.pp.assign_cells(sdata)
    t = time.perf_counter()
    scellst.tl.embed_cells(sdata, show_progress_bar=False)
    times["embed"] = time.perf_counter() - t
    cache.mkdir(parents=True, exist_ok=True)
    sdata.write(store)
    if verbose:
        img = sdata.images["he"]["scale0"].image.shape
        cells = sdata.tables["spots_counts"].obs["n_cells"]
        msg = ", ".join(f"{k} {v:.1f} s" for k, v in times.items())
        print(
            f"{section}: image {img[2]}x{img[1]} px, {len(sdata.shapes['nuclei']):,} nuclei, "
            f"median {cells.median():.0f} per spot ({msg})"
        )
    return sd.read_zarr(store)
