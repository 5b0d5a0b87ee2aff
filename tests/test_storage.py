"""Writes to a user's zarr store: a failed or killed replacement never loses the element on disk."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import spatialdata as sd

import scellst
from scellst._utils import write_element


@pytest.fixture
def store(tmp_path):
    sdata = scellst.datasets.synthetic_tissue(seed=0, size_um=(200, 200))
    path = tmp_path / "slide.zarr"
    sdata.write(path)
    return path


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x)


def _counts(path) -> np.ndarray:
    return _dense(sd.read_zarr(path).tables["spots_counts"].X)


def test_replacement_needs_overwrite_and_swaps_in_the_new_version(store):
    sdata = sd.read_zarr(store)
    table = sdata.tables["spots_counts"].copy()
    table.X = _dense(table.X) + 1
    with pytest.raises(ValueError, match="overwrite=True"):
        write_element(sdata, "spots_counts", table, overwrite=False, what="counts")
    before = _counts(store)
    write_element(sdata, "spots_counts", table, overwrite=True, what="counts")
    np.testing.assert_array_equal(_counts(store), before + 1)
    assert sorted(p.name for p in (store / "tables").iterdir() if p.is_dir()) == ["spots_counts", "true_expression"]


def test_failed_replacement_leaves_the_old_element_readable(store, monkeypatch):
    sdata = sd.read_zarr(store)
    before = _counts(store)
    original = sd.SpatialData.write_element

    def fail_midway(self, name, *args, **kwargs):
        original(self, name, *args, **kwargs)  # the new version is on disk under its temporary name...
        raise OSError("disk full")  # ...and the write fails before the swap

    monkeypatch.setattr(sd.SpatialData, "write_element", fail_midway)
    table = sdata.tables["spots_counts"].copy()
    table.X = _dense(table.X) * 0
    with pytest.raises(OSError, match="disk full"):
        write_element(sdata, "spots_counts", table, overwrite=True, what="counts")
    np.testing.assert_array_equal(_counts(store), before)
    assert not any("partial" in p.name for p in (store / "tables").iterdir())
    assert "spots_counts_scellst_partial" not in sdata.tables


def test_killed_replacement_leaves_the_old_element_readable(store):
    """A process killed (SIGKILL) in the middle of writing the new version: the old one is still whole on disk."""
    before = _counts(store)
    script = textwrap.dedent(
        f"""
        import os, signal
        import numpy as np
        import spatialdata as sd
        import spatialdata._io as sio
        from scellst._utils import write_element

        real = sio.write_table
        def write_then_die(*args, **kwargs):
            real(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)  # killed after part of the store was written
        sio.write_table = write_then_die
        sdata = sd.read_zarr({str(store)!r})
        table = sdata.tables["spots_counts"].copy()
        table.X = np.zeros(table.shape, dtype=np.float32)
        write_element(sdata, "spots_counts", table, overwrite=True, what="counts")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == -9, done.stderr[-2000:]
    assert (store / "tables" / "spots_counts_scellst_partial").exists()  # it died mid-replacement
    np.testing.assert_array_equal(_counts(store), before)
    # the next replacement clears the leftover and succeeds
    sdata = sd.read_zarr(store)
    write_element(sdata, "spots_counts", sdata.tables["spots_counts"].copy(), overwrite=True, what="counts")
    assert not (store / "tables" / "spots_counts_scellst_partial").exists()
    np.testing.assert_array_equal(_counts(store), before)


def test_writes_to_a_store_emit_no_zarr_warning(store):
    """zarr's sharding notice is silenced where scellst writes (it appeared ~45 times per demo run)."""
    import warnings

    sdata = sd.read_zarr(store)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_element(sdata, "spots_counts", sdata.tables["spots_counts"].copy(), overwrite=True, what="counts")
        write_element(sdata, "spots_copy", sdata.shapes["spots"].copy(), overwrite=False, what="spots")
    assert not [w for w in caught if "shard" in str(w.message)]
