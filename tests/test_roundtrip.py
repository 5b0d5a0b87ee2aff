from __future__ import annotations

import numpy as np
import pytest

import scellst

from .conftest import fresh_copy


@pytest.fixture(scope="module")
def predicted(processed, model):
    sdata = fresh_copy(processed)
    scellst.tl.predict(sdata, model)
    return sdata


def test_zarr_roundtrip(predicted, tmp_path):
    import spatialdata as sd

    store = tmp_path / "out.zarr"
    predicted.write(store)
    back = sd.read_zarr(store)
    for key in ("nuclei_embeddings", "nuclei_expression", "spots_predicted", "spots_counts"):
        assert key in back.tables
        np.testing.assert_allclose(
            np.asarray(back.tables[key].X.todense() if hasattr(back.tables[key].X, "todense") else back.tables[key].X),
            np.asarray(
                predicted.tables[key].X.todense()
                if hasattr(predicted.tables[key].X, "todense")
                else predicted.tables[key].X
            ),
        )
    assert len(back.shapes["nuclei"]) == len(predicted.shapes["nuclei"])
    assert back.attrs["scellst"]["microns_per_pixel"]["he"] == 0.5
    assert back.tables["nuclei_expression"].uns["scellst"]["function"] == "predict"
    lab = np.asarray(back.labels["nuclei_labels"].data[:300, :300])
    assert lab.max() > 0


def test_backed_object_writes_new_elements_to_disk(predicted, tmp_path):
    import spatialdata as sd

    store = tmp_path / "backed.zarr"
    base = fresh_copy(predicted)
    del base.tables["nuclei_expression"], base.tables["spots_predicted"]
    base.write(store)
    backed = sd.read_zarr(store)
    model = scellst.tl.train(backed, max_epochs=2, show_progress_bar=False)
    scellst.tl.predict(backed, model)
    again = sd.read_zarr(store)
    assert "nuclei_expression" in again.tables
    with pytest.raises(ValueError, match="already exists"):
        scellst.tl.predict(backed, model)
    scellst.tl.predict(backed, model, overwrite=True)
    assert sd.read_zarr(store).tables["nuclei_expression"].n_obs == len(backed.shapes["nuclei"])


def test_predicted_table_works_with_scanpy_and_squidpy(predicted):
    import scanpy as sc
    import squidpy as sq

    adata = predicted.tables["nuclei_expression"].copy()
    adata.obs["in_spot"] = adata.obs["spot_id"].notna().map({True: "in", False: "out"}).astype("category")
    sc.tl.rank_genes_groups(adata, "in_spot", method="wilcoxon")
    assert "rank_genes_groups" in adata.uns
    sq.gr.spatial_neighbors(adata, coord_type="generic", n_neighs=6)
    assert adata.obsp["spatial_connectivities"].shape == (adata.n_obs, adata.n_obs)


def test_expression_plot(predicted, tmp_path):
    from matplotlib.image import imread

    out = tmp_path / "expr.png"
    fig = scellst.pl.expression(predicted, ["EPCAM", "PTPRC"], truth_key="true_expression", save=out)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels[:3]] == [
        "EPCAM: true cells",
        "EPCAM: measured spots",
        "EPCAM: predicted cells",
    ]
    assert len(panels) == 6
    assert all(ax.get_xlabel() == "x (µm)" for ax in panels)
    # one colour bar per gene, on the gene's shared scale, and a scale bar in each panel
    colourbars = [ax for ax in fig.axes if "log1p(CP10k)" in ax.get_ylabel()]
    assert len(colourbars) == 2
    assert all(any("µm" in t.get_text() for t in ax.findobj(lambda a: hasattr(a, "get_text"))) for ax in panels)
    img = imread(out)
    assert img.shape[0] > 500
    assert img[..., :3].std() > 0.05
    with pytest.raises(KeyError, match="not predicted"):
        scellst.pl.expression(predicted, ["NOPE"])
