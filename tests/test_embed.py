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
