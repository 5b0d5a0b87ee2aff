"""Cohorts on a dask cluster, and resume: a killed worker or process ends with the uninterrupted result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scellst import datasets, tl

TILE = 256  # small tiles: many tasks on a small slide, so that a kill lands mid-run


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Two synthetic slides on disk, a model, and the reference output of an uninterrupted threaded run."""
    root = tmp_path_factory.mktemp("cohort")
    slides = []
    for seed in (1, 2):
        sdata = datasets.synthetic_tissue(seed=seed, size_um=(600.0, 600.0))
        sdata.write(root / f"s{seed}.zarr")
        slides.append(root / f"s{seed}.zarr")
    _model, _ = tl.run_train(
        [slides[0]], root / "train", n_models=1, max_epochs=3, n_top_genes=8, write_stores=False,
        show_progress_bar=False,
    )  # fmt: skip
    runs = tl.run_predict(root / "train" / "model.pt", slides, root / "ref", tile_size=TILE, show_progress_bar=False)
    assert [r.steps[-1] for r in runs] == ["predict", "predict"]
    return {"root": root, "slides": slides, "model": root / "train" / "model.pt", "ref": root / "ref"}


def _assert_same_store(a: Path, b: Path) -> None:
    import spatialdata as sd

    x, y = sd.read_zarr(a), sd.read_zarr(b)
    assert sorted(x.shapes) == sorted(y.shapes)
    assert sorted(x.tables) == sorted(y.tables)
    assert sorted(x.labels) == sorted(y.labels)
    nx, ny = x.shapes["nuclei"], y.shapes["nuclei"]
    assert len(nx) == len(ny) > 100
    assert nx.geometry.geom_equals_exact(ny.geometry, 0).all()
    for key in x.tables:
        tx, ty = x.tables[key], y.tables[key]
        assert list(tx.obs_names) == list(ty.obs_names)
        assert list(tx.var_names) == list(ty.var_names)
        dense = [m.toarray() if hasattr(m, "toarray") else np.asarray(m) for m in (tx.X, ty.X)]
        np.testing.assert_array_equal(*dense, err_msg=key)
        pd.testing.assert_frame_equal(tx.obs, ty.obs)
    np.testing.assert_array_equal(x.labels["nuclei_labels"].values, y.labels["nuclei_labels"].values)


def _wait_for(predicate, timeout: float = 120.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_same_call_skips_finished_slides_and_refuses_other_models(cohort, tmp_path):
    runs = tl.run_predict(cohort["model"], cohort["slides"], cohort["ref"], tile_size=TILE, show_progress_bar=False)
    assert [r.steps for r in runs] == [["skipped"], ["skipped"]]
    from scellst.models import ScellstModel

    other = tmp_path / "other.pt"
    model = ScellstModel.load(cohort["model"])
    model.extras["note"] = "another model"
    model.save(other)
    with pytest.raises(FileExistsError, match="not made by this model"):
        tl.run_predict(other, cohort["slides"], cohort["ref"], tile_size=TILE, show_progress_bar=False)


def test_a_killed_worker_does_not_change_the_result(cohort, tmp_path):
    from distributed import Client, LocalCluster

    out = tmp_path / "out"
    killed = []

    def kill_a_busy_worker(client) -> None:
        tiles = out / ".s1.tiles" / "segment"
        if not _wait_for(lambda: len(list(tiles.glob("*.npz"))) >= 2):
            return
        pids = client.run(os.getpid)
        busy = [w for w, keys in client.processing().items() if keys]
        if busy:
            os.kill(pids[busy[0]], signal.SIGKILL)
            killed.append(busy[0])

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        killer = threading.Thread(target=kill_a_busy_worker, args=(client,))
        killer.start()
        runs = tl.run_predict(cohort["model"], cohort["slides"], out, tile_size=TILE, show_progress_bar=False)
        killer.join()
    assert killed, "no worker was busy when the kill came: the test did not test a worker killed mid-run"
    assert [r.steps[-1] for r in runs] == ["predict", "predict"]
    for name in ("s1", "s2"):
        _assert_same_store(out / f"{name}.zarr", cohort["ref"] / f"{name}.zarr")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["killed", "ctrl-c"])
def test_an_interrupted_command_resumes_to_the_same_result(cohort, tmp_path, sig):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "scellst", "predict", str(cohort["model"]), *map(str, cohort["slides"])]
    cmd += ["--out", str(out), "--tile-size", str(TILE), "--quiet"]
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    embed_tiles = out / ".s2.tiles" / "embed"
    reached = _wait_for(lambda: len(list(embed_tiles.glob("*.parquet"))) >= 2 or proc.poll() is not None)
    assert reached, "the run did not reach the second slide's embedding"
    assert proc.poll() is None, "the run ended before the second slide's embedding: nothing to interrupt"
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert (out / "s1.zarr").exists()
    assert not (out / "s2.zarr").exists()
    assert (out / ".s2.zarr.partial").exists()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "s1: already done by an earlier run" in again.stdout
    assert "resuming the interrupted run" in again.stderr
    assert "tiles already done" in again.stderr
    for name in ("s1", "s2"):
        _assert_same_store(out / f"{name}.zarr", cohort["ref"] / f"{name}.zarr")
    assert not list(out.glob(".*")), f"leftovers: {list(out.glob('.*'))}"


def test_ctrl_c_is_never_lost():
    """A KeyboardInterrupt swallowed by some code (a finaliser, a library) still stops the run at the next step."""
    import time

    from scellst.tl._pipeline import _ctrl_c

    before = signal.getsignal(signal.SIGINT)
    with _ctrl_c() as stop_if_interrupted:
        stop_if_interrupted()  # nothing happened yet
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
        except KeyboardInterrupt:
            pass  # lost, as inside a finaliser
        with pytest.raises(KeyboardInterrupt):
            stop_if_interrupted()
    assert signal.getsignal(signal.SIGINT) is before
