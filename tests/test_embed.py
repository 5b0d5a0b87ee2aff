from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.spatial import cKDTree

import scellst
from scellst._utils import shapes_centroids
from scellst.im._embed import MORPHOLOGY_FEATURES
from scellst.im._neighbourhood import DEFAULT_CONTEXT_UM, context_feature_names

from .conftest import fresh_copy


def test_embedding_table_layout(processed):
    emb = processed.tables["nuclei_embeddings"]
    nuclei = processed.shapes["nuclei"]
    own = list(MORPHOLOGY_FEATURES)
    assert list(emb.var_names) == own + context_feature_names(own, DEFAULT_CONTEXT_UM)
    assert emb.uns["scellst"]["context_um"] == list(DEFAULT_CONTEXT_UM)
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
        scellst.im.embed_cells(sdata)
    with pytest.raises(ValueError, match="Unknown embedding method"):
        scellst.im.embed_cells(sdata, method="resnet", key_added="x")
    with pytest.raises(TypeError, match="polygons"):
        scellst.im.embed_cells(sdata, "spots", key_added="x")


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
        scellst.im.embed_cells(sdata, shapes_key="nuclei", show_progress_bar=False)
    assert "1 nuclei are surrounded by other nuclei" in caplog.text
    assert "outside the image" not in caplog.text
    table = sdata.tables["nuclei_embeddings"]
    bad = ~np.isfinite(np.asarray(table.X))
    assert not bad.any(), list(table.var_names[bad.any(axis=0)])
    centre = np.flatnonzero(table.obs["cell_id"].astype(int).to_numpy() == 5)[0]  # the middle square
    area = np.asarray(table[:, "area_um2"].X).ravel()
    assert area[centre] == pytest.approx(100.0, rel=0.15)  # its own features are measured, not imputed


def test_neighbourhood_features_known_answers():
    """Density of a uniform layout, means of a constant and of a two-region layout, at two radii."""
    from scellst.im import neighbourhood_features

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 2000, (8000, 2))  # 20 cells per 100 x 100 um
    left = (xy[:, 0] < 1000).astype(float)
    values = np.column_stack([np.full(len(xy), 3.0), left])
    out = neighbourhood_features(xy, values, (50, 200))
    assert out.shape == (8000, 6)
    assert out.dtype == np.float32
    inner = ((xy > 400) & (xy < 1600)).all(axis=1)
    for k in (0, 3):  # density, the cell itself excluded
        assert np.median(np.expm1(out[inner, k])) == pytest.approx(20.0, rel=0.05)
        np.testing.assert_allclose(out[:, k + 1], 3.0, rtol=1e-4)  # a constant stays constant, edges included
    # a cell far inside the left half sees only left cells; at the border, about half; wider radius -> smoother
    far_left, border = xy[:, 0] < 700, np.abs(xy[:, 0] - 1000) < 10
    assert out[far_left & inner, 2].min() > 0.99
    assert 0.35 < out[border, 2].mean() < 0.65
    near = (np.abs(xy[:, 0] - 900) < 20) & inner
    assert out[near, 5].mean() < out[near, 2].mean()  # 100 um from the border: the 200 um scale sees across it
    with pytest.raises(ValueError, match="positive"):
        neighbourhood_features(xy, values, (0,))
    with pytest.raises(ValueError, match="differ"):
        neighbourhood_features(xy, values, (50, 50))
    with pytest.raises(ValueError, match="finite"):
        neighbourhood_features(np.where(xy > 1999, np.nan, xy), values, (50,))
    assert neighbourhood_features(xy[:0], values[:0], (50,)).shape == (0, 3)


def test_embed_context_options(processed):
    """``context_um`` picks the radii; ``None`` keeps the cell's own features; the context is read from all cells."""
    sdata = fresh_copy(processed)
    scellst.im.embed_cells(sdata, key_added="own", context_um=None, show_progress_bar=False)
    scellst.im.embed_cells(sdata, key_added="ctx", context_um=[30], show_progress_bar=False)
    own, ctx = sdata.tables["own"], sdata.tables["ctx"]
    assert list(own.var_names) == list(MORPHOLOGY_FEATURES)
    assert list(ctx.var_names[: own.n_vars]) == list(own.var_names)
    assert ctx.var_names[own.n_vars] == "density_nb30um"
    assert "area_um2_nb30um" in ctx.var_names
    np.testing.assert_allclose(ctx.X[:, : own.n_vars], own.X)
    default = processed.tables["nuclei_embeddings"]
    np.testing.assert_allclose(default.X[:, : own.n_vars], own.X)
    # a cell's neighbourhood area is the local mean of its neighbours' areas: smoother than the cells' own areas
    area, nb = np.asarray(ctx[:, "area_um2"].X).ravel(), np.asarray(ctx[:, "area_um2_nb30um"].X).ravel()
    assert nb.std() < area.std()
    assert abs(nb.mean() - area.mean()) < 0.2 * area.std()
    with pytest.raises(ValueError, match="context_um"):
        scellst.im.embed_cells(sdata, key_added="bad", context_um="wide")


def test_vectorised_region_features_equal_regionprops():
    """The all-labels-at-once features are regionprops' own: touching labels, holes, image borders, split labels."""
    from skimage.measure import regionprops_table
    from skimage.segmentation import expand_labels

    from scellst.im._embed import _hed, _region_features

    rng = np.random.default_rng(3)
    seeds = np.zeros((160, 190), dtype=np.int32)
    pts = rng.integers(0, [160, 190], size=(90, 2))
    seeds[pts[:, 0], pts[:, 1]] = rng.permutation(np.arange(5, 95)) * 7  # sparse, unordered ids
    labels = expand_labels(seeds, distance=6)
    labels[rng.random(labels.shape) < 0.03] = 0  # holes and ragged borders
    labels[:, 100] = 0  # some labels split in two
    rgb = rng.integers(0, 256, size=(*labels.shape, 3), dtype=np.uint8)
    intensity = np.dstack([_hed(rgb)[..., :2], rgb / 255.0]).astype(np.float32)
    props = ("label", "area", "perimeter", "axis_major_length", "axis_minor_length", "eccentricity", "solidity",
             "extent", "intensity_mean", "intensity_max")  # fmt: skip
    want = pd.DataFrame(regionprops_table(labels, intensity_image=intensity, properties=props)).set_index("label")
    got = _region_features(labels, intensity, shape=True)
    assert list(got.index) == list(want.index)
    for col in got.columns:
        np.testing.assert_allclose(got[col], want[col], rtol=1e-5, atol=1e-6, err_msg=col)
    ring = _region_features(labels, intensity, shape=False)
    np.testing.assert_allclose(ring["intensity_mean-2"], want["intensity_mean-2"], rtol=1e-5)
    from skimage.color import rgb2hed

    np.testing.assert_allclose(_hed(rgb), rgb2hed(rgb), rtol=1e-4, atol=1e-6)
