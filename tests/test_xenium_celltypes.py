from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import scellst
from scellst._utils import get_microns_per_pixel, image_level0, shapes_centroids

from .conftest import fresh_copy

PIXEL = 0.2125
OFFSET_UM = np.array([120.0, 40.0])


@pytest.fixture(scope="module")
def xenium_case(tissue, model, tmp_path_factory):
    """A Xenium folder made from the synthetic tissue's true cells, in a shifted micron frame, plus its H&E."""
    folder = tmp_path_factory.mktemp("xenium")
    scellst.datasets.write_synthetic_xenium(tissue, folder, offset_um=tuple(OFFSET_UM), pixel_size=PIXEL)
    he = np.asarray(image_level0(tissue, "he").data.compute())
    sdata = scellst.io.xenium(folder, he_image=he, alignment=folder / "he_imagealignment.csv")
    scellst.im.segment_nuclei(sdata, show_progress_bar=False)
    scellst.im.embed_cells(sdata, show_progress_bar=False)
    scellst.tl.predict(sdata, model, spots_key=None)
    return sdata


def test_xenium_reader_registers_he(xenium_case):
    sdata = xenium_case
    assert get_microns_per_pixel(sdata, "he") == pytest.approx(0.5)
    table = sdata.tables["xenium_table"]
    assert table.n_vars == 27
    assert table.uns["spatialdata_attrs"]["region"] == "xenium_cells"
    np.testing.assert_allclose(table.obsm["spatial"].min(axis=0), OFFSET_UM, atol=15)


def test_compare_xenium_known_answer(xenium_case, processed, model):
    sdata = fresh_copy(xenium_case)
    df = scellst.bench.compare_xenium(sdata, max_distance_um=4.0)
    # every segmented nucleus has its true cell within a few microns, at the same place after registration
    assert df.attrs["matched_fraction_predicted"] > 0.9
    assert df.attrs["median_distance_um"] < 1.5
    # the per-gene agreement is the model's cell-level accuracy: well above zero
    assert df["pearson"].mean() > 0.5
    table = sdata.tables["xenium_comparison"]
    assert table.n_vars == len(df)
    assert table.uns["spatialdata_attrs"]["region"] == "nuclei"
    with pytest.raises(ValueError, match="already exists"):
        scellst.bench.compare_xenium(sdata, max_distance_um=4.0)
    # nuclei that do not overlap the Xenium cells (wrong registration, other section): a clear error
    from spatialdata.transformations import Translation, set_transformation

    shifted = fresh_copy(xenium_case)
    set_transformation(
        shifted.shapes["nuclei"], Translation([1e6, 1e6], axes=("x", "y")), to_coordinate_system="global"
    )
    with pytest.raises(ValueError, match="registered"):
        scellst.bench.compare_xenium(shifted, max_distance_um=4.0, key_added="x")


def test_match_cells_is_one_to_one():
    a = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 10.0]])
    b = np.array([[0.2, 0.0], [0.9, 0.0], [50.0, 50.0]])
    ia, ib, d = scellst.bench.match_cells(a, b, 2.0)
    assert sorted(zip(ia.tolist(), ib.tolist(), strict=True)) == [(0, 0), (1, 1)]
    np.testing.assert_allclose(np.sort(d), [0.1, 0.2])


def _types_of_nuclei(processed):
    from scipy.spatial import cKDTree

    truth = processed.tables["true_expression"]
    cells = processed.shapes["true_cells"]
    d, idx = cKDTree(shapes_centroids(cells)).query(shapes_centroids(processed.shapes["nuclei"]))
    cell_type = pd.Series(truth.obs["cell_type"].to_numpy(), index=truth.obs["cell_id"].astype(str))
    return cell_type.reindex(cells.index.astype(str)).to_numpy()[idx], d


def test_marker_genes_and_cell_type_scores(processed, model):
    sdata = fresh_copy(processed)
    scellst.tl.predict(sdata, model)
    truth = sdata.tables["true_expression"].copy()
    truth.X = truth.layers["counts"]
    markers = scellst.tl.marker_genes(truth, groupby="cell_type", n_genes=5)
    assert set(markers) == set(truth.obs["cell_type"].astype(str))
    assert all(len(v) >= 3 for v in markers.values())
    scellst.tl.score_cell_types(sdata, markers)
    pred = sdata.tables["nuclei_expression"]
    assert {f"score_{t}" for t in markers} <= set(pred.obs.columns)
    assert isinstance(pred.obs["predicted_type"].dtype, pd.CategoricalDtype)
    true_type, d = _types_of_nuclei(sdata)
    ok = d < 4
    acc = (pred.obs["predicted_type"].astype(str).to_numpy()[ok] == true_type[ok]).mean()
    chance = pd.Series(true_type[ok]).value_counts(normalize=True).max()
    assert acc > chance + 0.2, (acc, chance)
    # by-type comparison with the reference: type-specific profiles are recovered
    df = scellst.tl.compare_cell_types(pred, truth)
    assert (df["pearson_centred"] > 0.5).mean() >= 0.6
    with pytest.raises(KeyError, match="no column"):
        scellst.tl.compare_cell_types(pred, truth, reference_groupby="type")
    with pytest.raises(ValueError, match="already holds cell-type columns"):
        scellst.tl.score_cell_types(sdata, markers)  # scores are never replaced silently
    with pytest.raises(ValueError, match="enough predicted marker"):
        scellst.tl.score_cell_types(sdata, {"x": ["NOPE1", "NOPE2", "NOPE3"]}, overwrite=True)


def _non_blank(path) -> None:
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    assert img.shape[0] > 100
    assert img[..., :3].std() > 0.05


def test_plots(xenium_case, processed, model, tmp_path):
    sdata = fresh_copy(xenium_case)
    scellst.bench.compare_xenium(sdata, max_distance_um=4.0)
    gene = str(sdata.tables["xenium_comparison"].var_names[0])
    scellst.pl.xenium_comparison(sdata, [gene], save=tmp_path / "xen.png")
    _non_blank(tmp_path / "xen.png")
    scellst.pl.gallery(sdata, [gene], n=6, save=tmp_path / "gallery.png")
    _non_blank(tmp_path / "gallery.png")
    other = fresh_copy(processed)
    scellst.tl.predict(other, model)
    ev = scellst.bench.evaluate(other)
    scellst.pl.correlations({"model": ev, "xenium": sdata.tables["xenium_comparison"].var}, save=tmp_path / "c.png")
    _non_blank(tmp_path / "c.png")
    with pytest.raises(KeyError, match="neither an obs column nor a gene"):
        scellst.pl.gallery(sdata, "nope")


def test_xenium_reader_on_real_fragments(data_dir):
    root = data_dir / "xenium_format_fixtures"
    # transcripts + boundaries only (no count matrix, no cells file): counts built from assigned molecules
    s1 = scellst.io.xenium(root / "MoleculeExperiment_xenium_V1_FF_Mouse_Brain" / "sample1")
    table = s1.tables["xenium_table"]
    assert table.n_obs == len(s1.shapes["xenium_cells"]) > 0
    assert not table.var_names.str.startswith(("NegControl", "BLANK")).any()
    xy = table.obsm["spatial"]  # microns, inside the 20 x 20 um fragment (x 4900-4920, y 6400-6420)
    assert (xy[:, 0] > 4890).all()
    assert (xy[:, 0] < 4930).all()
    assert (xy[:, 1] > 6390).all()
    assert (xy[:, 1] < 6430).all()
    nuclei = s1.shapes["xenium_nuclei"]
    assert nuclei.geometry.is_valid.all()
    assert 5 < nuclei.geometry.area.median() < 200  # um2
    # 10x HDF5 matrix (shape stored as floats) + cells.csv.gz
    s2 = scellst.io.xenium(root / "SpatialExperimentIO_Xenium_small")
    t2 = s2.tables["xenium_table"]
    assert t2.shape == (6, 4)
    np.testing.assert_allclose(t2.obsm["spatial"][0], [1898.81491699, 2540.96314697])
    with pytest.raises(ValueError, match="alignment"):
        scellst.io.xenium(root / "SpatialExperimentIO_Xenium_small", he_image=np.zeros((3, 64, 64), np.uint8))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scellst.io.xenium(root / "missing")


def test_add_cells_row_column_convention(data_dir, caplog):
    import anndata as ad

    root = data_dir / "xenium_lung_NCBI858"
    cells = ad.read_h5ad(root / "NCBI858.h5ad")
    sdata = scellst.io.from_image(root / "NCBI858.jpg", microns_per_pixel=2.125)
    # this export names the row `x_pixel` and the column `y_pixel`
    scellst.io.add_cells(sdata, cells, row_key="x_pixel", col_key="y_pixel")
    assert sdata.tables["cells_table"].uns["scellst"]["on_tissue_fraction"] > 0.9
    assert sdata.tables["cells_table"].uns["spatialdata_attrs"]["region"] == "cells"
    pt = sdata.shapes["cells"].geometry.iloc[0]
    assert pt.x == pytest.approx(cells.obs["y_pixel"].iloc[0])
    # the naive reading puts most cells on glass, and says so
    with caplog.at_level("WARNING", logger="scellst"):
        scellst.io.add_cells(sdata, cells, row_key="y_pixel", col_key="x_pixel", key_added="naive")
    assert sdata.tables["naive_table"].uns["scellst"]["on_tissue_fraction"] < 0.6
    assert "probably the other way round" in caplog.text
    with pytest.raises(ValueError, match="already exists"):
        scellst.io.add_cells(sdata, cells, row_key="x_pixel", col_key="y_pixel")
    with pytest.raises(KeyError, match="no column"):
        scellst.io.add_cells(sdata, cells, row_key="row", col_key="y_pixel", key_added="c2")
