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
    scellst.tl.embed_cells(sdata, "imported", show_progress_bar=False)
    assert sdata.tables["imported_embeddings"].n_obs == len(sdata.shapes["imported"])
