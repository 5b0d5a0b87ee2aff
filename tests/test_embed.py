from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.spatial import cKDTree

import scellst
from scellst._utils import shapes_centroids
from scellst.tl._embed import MORPHOLOGY_FEATURES

from .conftest import fresh_copy


def test_embedding_table_layout(processed):
    emb = processed.tables["nuclei_embeddings"]
    nuclei = processed.shapes["nuclei"]
    assert list(emb.var_names) == list(MORPHOLOGY_FEATURES)
    assert emb.n_obs == len(nuclei)
    assert emb.uns["spatialdata_attrs"]["region"] == "nuclei"
    np.testing.assert_array_equal(emb.obs["cell_id"].to_numpy(), nuclei.index.to_numpy())
    assert np.isfinite(emb.X).all()
    np.testing.assert_allclose(emb.obsm["spatial"], shapes_centroids(nuclei))
    assert emb.uns["scellst"]["method"] == "morphology"
    # rasterised areas agree with polygon areas (in um2)
    area = pd.Series(emb[:, "area_um2"].X.ravel())
    np.testing.assert_allclose(area.median(), nuclei["area_um2"].median(), rtol=0.2)


def test_embeddings_separate_cell_types(processed):
    emb = processed.tables["nuclei_embeddings"]
    truth = processed.tables["true_expression"]
    d, idx = cKDTree(shapes_centroids(processed.shapes["true_cells"])).query(emb.obsm["spatial"])
    types = truth.obs["cell_type"].to_numpy()[idx]
    df = pd.DataFrame(emb.X, columns=emb.var_names)[d < 4]
    df["type"] = types[d < 4]
    means = df.groupby("type")[["area_um2", "eccentricity", "hematoxylin_mean"]].mean()
    assert means.loc["lymphocyte", "area_um2"] < means.loc["tumour", "area_um2"]
    assert means.loc["fibroblast", "eccentricity"] > means.loc["tumour", "eccentricity"]
    assert means.loc["lymphocyte", "hematoxylin_mean"] > means.loc["tumour", "hematoxylin_mean"]


def test_embed_errors(processed):
    sdata = fresh_copy(processed)
    with pytest.raises(ValueError, match="already exists"):
        scellst.tl.embed_cells(sdata)
    with pytest.raises(ValueError, match="Unknown embedding method"):
        scellst.tl.embed_cells(sdata, method="resnet", key_added="x")
    with pytest.raises(TypeError, match="polygons"):
        scellst.tl.embed_cells(sdata, "spots", key_added="x")


def test_nucleus_surrounded_by_nuclei_gets_imputed_ring_features(caplog):
    """A nucleus with no background around it (dense clusters) keeps its own features; only the ring is imputed."""
    import geopandas as gpd
    from shapely.geometry import box
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import get_transformation

    import scellst

    img = np.full((120, 120, 3), 230, dtype=np.uint8)
    img[30:90, 30:90] = (90, 60, 140)
    sdata = scellst.io.from_image(img, microns_per_pixel=0.5)
    squares = [box(30 + 20 * j, 30 + 20 * i, 50 + 20 * j, 50 + 20 * i) for i in range(3) for j in range(3)]
    gdf = gpd.GeoDataFrame(geometry=squares, index=pd.Index(np.arange(1, 10), name="cell_id"))
    sdata.shapes["nuclei"] = ShapesModel.parse(
        gdf, transformations=get_transformation(sdata.images["he"], get_all=True)
    )
    with caplog.at_level("INFO", logger="scellst"):
        scellst.tl.embed_cells(sdata, shapes_key="nuclei", show_progress_bar=False)
    assert "1 nuclei are surrounded by other nuclei" in caplog.text
    assert "outside the image" not in caplog.text
    table = sdata.tables["nuclei_embeddings"]
    bad = ~np.isfinite(np.asarray(table.X))
    assert not bad.any(), list(table.var_names[bad.any(axis=0)])
    centre = np.flatnonzero(table.obs["cell_id"].astype(int).to_numpy() == 5)[0]  # the middle square
    area = np.asarray(table[:, "area_um2"].X).ravel()
    assert area[centre] == pytest.approx(100.0, rel=0.15)  # its own features are measured, not imputed
