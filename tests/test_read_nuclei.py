from __future__ import annotations

import json

import numpy as np
import pytest

import scellst

from .conftest import fresh_copy


def _he_only(size: int = 120):
    rng = np.random.default_rng(0)
    return scellst.io.from_image(rng.integers(150, 255, size=(size, size, 3), dtype=np.uint8), microns_per_pixel=0.5)


def test_geojson_with_classes_and_broken_polygons(tmp_path):
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("scellst").addHandler(handler)
    features = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[10, 10], [20, 10], [20, 20], [10, 20], [10, 10]]]},
            "properties": {"classification": {"name": "Tumor"}},
        },
        # a bow-tie (self-intersecting): repaired, the largest valid part kept
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[40, 40], [60, 60], [60, 40], [40, 60], [40, 40]]]},
            "properties": {"class": "Lymphocyte"},
        },
        {"type": "Feature", "geometry": None, "properties": {}},  # dropped
    ]
    path = tmp_path / "cells.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    sdata = _he_only()
    try:
        scellst.io.read_nuclei(sdata, path)
    finally:
        logging.getLogger("scellst").removeHandler(handler)
    nuclei = sdata.shapes["nuclei"]
    assert len(nuclei) == 2
    assert list(nuclei["class"]) == ["Tumor", "Lymphocyte"]
    assert nuclei.geometry.is_valid.all()
    assert nuclei["area_um2"].iloc[0] == pytest.approx(100 * 0.25)
    assert any("repaired 1 invalid polygons and dropped 1" in r.getMessage() for r in records)
    with pytest.raises(ValueError, match="already exists"):
        scellst.io.read_nuclei(sdata, path)


def test_hovernet_json_and_label_image(tmp_path):
    sdata = _he_only()
    hv = {"nuc": {"1": {"contour": [[5, 5], [15, 5], [15, 15], [5, 15]], "type": 2}}}
    (tmp_path / "hv.json").write_text(json.dumps(hv))
    scellst.io.read_nuclei(sdata, tmp_path / "hv.json", key_added="hv")
    assert list(sdata.shapes["hv"]["class"]) == ["2"]

    labels = np.zeros((120, 120), dtype=np.int32)
    labels[10:20, 10:20] = 5
    labels[50:70, 60:66] = 9
    scellst.io.read_nuclei(sdata, labels, key_added="lab")
    lab = sdata.shapes["lab"]
    assert sorted(lab["source_id"].astype(int)) == [5, 9]
    np.testing.assert_allclose(sorted(lab.geometry.area), [100, 120], rtol=0.15)
    with pytest.raises(ValueError, match="level 0"):
        scellst.io.read_nuclei(sdata, labels[:50], key_added="bad")


def test_xenium_nucleus_boundaries_in_microns(data_dir):
    path = (
        data_dir
        / "xenium_format_fixtures"
        / "MoleculeExperiment_xenium_V1_FF_Mouse_Brain"
        / "sample1"
        / "nucleus_boundaries.csv"
    )
    sdata = _he_only()
    scellst.io.read_nuclei(sdata, path, format="xenium")
    nuclei = sdata.shapes["nuclei"]
    assert len(nuclei) >= 1
    c = nuclei.geometry.iloc[0].centroid
    assert 4880 < c.x < 4940
    assert 6390 < c.y < 6430
    assert 5 < nuclei["area_um2"].median() < 200


def test_imported_nuclei_feed_the_pipeline(processed, tmp_path):
    sdata = fresh_copy(processed)
    labels = np.asarray(sdata.labels["nuclei_labels"].data[:400, :400]).astype(np.int32)
    full = np.zeros(sdata.labels["nuclei_labels"].shape, dtype=np.int32)
    full[:400, :400] = labels
    scellst.io.read_nuclei(sdata, full, key_added="imported")
    scellst.im.embed_cells(sdata, "imported", show_progress_bar=False)
    assert sdata.tables["imported_embeddings"].n_obs == len(sdata.shapes["imported"])


def test_geoparquet_outlines_without_their_image(data_dir):
    """Real model-made outlines (histolytics HGSC crop), imported with no image, embedded by shape and assigned."""
    import geopandas as gpd
    import spatialdata as sd

    path = data_dir / "histolytics_hgsc" / "hgsc_nest.parquet"
    with pytest.raises(ValueError, match="has no image: pass `microns_per_pixel`"):
        scellst.io.read_nuclei(sd.SpatialData(), path)
    sdata = sd.SpatialData()
    scellst.io.read_nuclei(sdata, path, microns_per_pixel=0.5)  # GeoParquet recognised from its metadata
    nuclei = sdata.shapes["nuclei"]
    source = gpd.read_parquet(path)
    assert 0.98 * len(source) <= len(nuclei) <= len(source)
    assert set(nuclei["class"].cat.categories) >= {"inflammatory", "connective", "neoplastic"}
    np.testing.assert_allclose(nuclei["area_um2"].median(), source.geometry.area.median() * 0.25, rtol=0.05)
    scellst.im.embed_cells(sdata, method="shape")
    emb = sdata.tables["nuclei_embeddings"]
    assert emb.n_obs == len(nuclei)
    assert emb.n_vars == 10 + 4 * 11  # own features, then density + 10 means at each of 4 radii
    assert np.isfinite(emb.X).all()
    area = emb[:, "area_um2"].X.ravel()
    np.testing.assert_allclose(area, nuclei["area_um2"].to_numpy(), rtol=1e-6)
    assert emb.uns["scellst"]["method"] == "shape"


def test_shape_features_of_ellipses_are_their_analytic_values():
    from shapely import affinity
    from shapely.geometry import Point

    a, b = 6.0, 3.0
    ellipse = affinity.scale(Point(0, 0).buffer(1.0, quad_segs=256), a, b)
    rotated = affinity.rotate(ellipse, 30, origin=(0, 0))
    far = affinity.translate(rotated, 50_000, 60_000)  # slide coordinates: no loss of precision
    feats = scellst.im.shape_features([ellipse, rotated, far], microns_per_unit=0.5)
    np.testing.assert_allclose(feats["area_um2"], np.pi * a * b * 0.25, rtol=1e-3)
    np.testing.assert_allclose(feats["major_axis_um"], 2 * a * 0.5, rtol=1e-3)  # regionprops: 4 sqrt(eigenvalue)
    np.testing.assert_allclose(feats["minor_axis_um"], 2 * b * 0.5, rtol=1e-3)
    np.testing.assert_allclose(feats["eccentricity"], np.sqrt(1 - (b / a) ** 2), rtol=1e-3)
    np.testing.assert_allclose(feats["solidity"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(feats["extent"][0], np.pi / 4, rtol=1e-3)
    assert feats["extent"][1] < feats["extent"][0]
    np.testing.assert_allclose(feats.iloc[2], feats.iloc[1], rtol=1e-6)
    np.testing.assert_allclose(feats["circularity"][0], 4 * np.pi * ellipse.area / ellipse.length**2, rtol=1e-9)
