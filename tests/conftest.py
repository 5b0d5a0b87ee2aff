from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared real data. Missing data is a failure, never a skip (CI always has it)."""
    path = Path(os.environ.get("SCELLST_DATA_DIR", REPO.parent / "shared" / "data"))
    if not path.exists():
        pytest.fail(f"Real test data not found at {path}; set SCELLST_DATA_DIR to the shared data folder.")
    return path


@pytest.fixture(scope="session")
def tissue():
    """A small seeded synthetic tissue (never modified by tests; copy what you change)."""
    from scellst.datasets import synthetic_tissue

    return synthetic_tissue(seed=1, size_um=(900.0, 900.0))


@pytest.fixture(scope="session")
def processed(tissue):
    """The tissue after segmentation, assignment and embedding."""
    from spatialdata import SpatialData

    import scellst

    sdata = SpatialData(
        images=dict(tissue.images), shapes=dict(tissue.shapes), tables={k: v.copy() for k, v in tissue.tables.items()}
    )
    sdata.attrs.update(tissue.attrs)
    scellst.im.segment_nuclei(sdata, show_progress_bar=False)
    scellst.pp.assign_cells(sdata)
    scellst.im.embed_cells(sdata, show_progress_bar=False)
    return sdata


@pytest.fixture(scope="session")
def model(processed):
    import scellst

    return scellst.tl.train(processed, seed=0, lr=1e-3, max_epochs=150, show_progress_bar=False)


def fresh_copy(sdata):
    """A shallow SpatialData copy whose tables and shapes can be modified without touching the fixture."""
    from spatialdata import SpatialData

    out = SpatialData(
        images=dict(sdata.images),
        labels=dict(sdata.labels),
        shapes={k: v.copy() for k, v in sdata.shapes.items()},
        tables={k: v.copy() for k, v in sdata.tables.items()},
    )
    out.attrs.update({k: (dict(v) if isinstance(v, dict) else v) for k, v in sdata.attrs.items()})
    return out
