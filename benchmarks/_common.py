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
    from scellst.im._neighbourhood import DEFAULT_CONTEXT_UM

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
    scellst.im.segment_nuclei(sdata, show_progress_bar=False)
    times["segment"] = time.perf_counter() - t
    scellst.pp.assign_cells(sdata)
    t = time.perf_counter()
    scellst.im.embed_cells(sdata, show_progress_bar=False)
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


class PeakRSS:
    """Peak resident memory (this process and its children, e.g. dask workers) while the block runs, in GiB.

    Sampled every ``interval`` seconds by a thread, so it sees the peak of each stage, not of the whole process.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0.0
        self.start = 0.0
        self.seconds = 0.0

    def _sample(self) -> float:
        import psutil

        proc = psutil.Process()
        total = proc.memory_info().rss
        for child in proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total / 1024**3

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        import threading

        self._stop = threading.Event()
        self.start = self.peak = self._sample()  # resident memory when the block starts
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())
        self.seconds = time.perf_counter() - self._t0
