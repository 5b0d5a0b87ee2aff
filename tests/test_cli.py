from __future__ import annotations

from scellst.cli import main, run_demo


def test_demo_end_to_end(tmp_path):
    results = run_demo(tmp_path / "demo", seed=0, size_um=(900.0, 900.0))
    assert (tmp_path / "demo" / "demo.zarr").exists()
    assert (tmp_path / "demo" / "expression.png").stat().st_size > 10_000
    assert results["cell_pearson"] > 0.4
    assert abs(results["shuffled_cell_pearson"]) < 0.15
    assert results["cell_pearson"] > results["shuffled_cell_pearson"] + 0.3


def test_demo_refuses_to_overwrite(tmp_path):
    (tmp_path / "demo.zarr").mkdir()
    import pytest

    with pytest.raises(SystemExit, match="already exists"):
        main(["demo", "--out", str(tmp_path)])


def test_demo_with_another_model(tmp_path):
    results = run_demo(tmp_path / "demo", seed=0, size_um=(700.0, 700.0), shuffled_control=False, model="miso")
    assert results["cell_pearson"] > 0.4
    import scellst

    assert scellst.tl.load_model(tmp_path / "demo" / "model.pt").model == "miso"
