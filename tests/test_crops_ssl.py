from __future__ import annotations

import numpy as np
import pytest

import scellst
from scellst.im._crops import StainNormalizer, crops_from_tile

from .conftest import fresh_copy


def test_crops_from_tile_exact_when_not_resampled():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, size=(100, 120, 3), dtype=np.uint8)
    # pixel (r, c) has its centre at (r, c); a 48-px square centred on 30.5 covers rows 7..54 exactly
    out = crops_from_tile(rgb, np.array([[30.5, 40.5]]), side_px=48, out_px=48)
    np.testing.assert_array_equal(out[0], rgb[7:55, 17:65].transpose(2, 0, 1))
    # outside the tile the crop is white glass
    edge = crops_from_tile(rgb, np.array([[2.5, 2.5]]), side_px=48, out_px=48)
    assert (edge[0, :, 0, 0] == 255).all()


def test_cell_crops_are_centred_on_nuclei(tissue):
    crops = scellst.im.cell_crops(tissue, "true_cells", crop_um=12, crop_px=48)
    assert crops.out_px == 48
    assert crops.side_px == pytest.approx(24.0)  # 12 um at 0.5 um/px
    x = crops.get(np.arange(300)).astype(float).mean(axis=1)  # grey
    centre = x[:, 20:28, 20:28].mean()
    corners = np.concatenate([x[:, :6, :6], x[:, -6:, -6:]], axis=1).mean()
    assert centre < corners - 20  # nuclei are darker than their surroundings
    # tile streaming visits every cell exactly once
    seen = np.concatenate([idx for idx, _ in crops.iter_tiles()])
    np.testing.assert_array_equal(np.sort(seen), np.arange(len(crops)))


def test_cell_crops_to_memmap(tissue, tmp_path):
    crops = scellst.im.cell_crops(tissue, "true_cells", crop_px=32)
    arr = crops.to_array(tmp_path / "crops.npy", show_progress_bar=False)
    assert isinstance(arr, np.memmap)
    assert arr.shape == (len(crops), 3, 32, 32)
    np.testing.assert_array_equal(np.asarray(arr[[5, 50]]), crops.get(np.array([5, 50])))


def test_cell_crops_errors(tissue):
    with pytest.raises(ValueError, match="crop_px"):
        scellst.im.cell_crops(tissue, "true_cells", crop_px=2)
    with pytest.raises(KeyError, match="Available shapes"):
        scellst.im.cell_crops(tissue, "missing")


def test_stain_normalizer(tissue):
    sample = scellst.im.cell_crops(tissue, "true_cells").sample(400)
    norm = StainNormalizer.fit(sample, "slide")
    x = norm(sample).numpy()
    np.testing.assert_allclose(x.mean(axis=(0, 2, 3)), 0, atol=1e-3)
    np.testing.assert_allclose(x.std(axis=(0, 2, 3)), 1, atol=1e-2)
    mac = StainNormalizer.fit(sample, "macenko")
    he = np.asarray(mac.stain_matrix)
    np.testing.assert_allclose(np.linalg.norm(he, axis=0), 1, atol=1e-6)
    assert he[0, 0] > he[0, 1]  # haematoxylin absorbs more red than eosin
    out = mac.apply_macenko(sample)
    assert out.shape == sample.shape
    assert out.dtype == np.uint8
    with pytest.raises(ValueError, match="Unknown stain"):
        StainNormalizer.fit(sample, "reinhard")


def _probe_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
    return float(cross_val_score(clf, x, y, cv=3).mean())


@pytest.fixture(scope="module")
def ssl_run(tissue, tmp_path_factory):
    path = tmp_path_factory.mktemp("ssl") / "encoder.pt"
    encoder = scellst.im.train_ssl(
        tissue, "true_cells", path=path, epochs=2, batch_size=128, max_cells=1500, seed=0, show_progress_bar=False
    )
    return path, encoder


def test_train_ssl_writes_a_loadable_encoder(ssl_run):
    path, encoder = ssl_run
    assert path.exists()
    assert len(encoder.history["loss"]) == 2
    assert all(np.isfinite(encoder.history["loss"]))
    loaded = scellst.models.CellEncoder.load(path)
    assert loaded.config.arch == "resnet_tiny"
    assert loaded.config.crop_um == 12.0
    assert loaded.feature_dim == 256


def test_ssl_embedding_learns_cell_types(tissue, ssl_run):
    path, _ = ssl_run
    sdata = fresh_copy(tissue)
    scellst.im.embed_cells(sdata, "true_cells", method="ssl", encoder=path, key_added="ssl", show_progress_bar=False)
    table = sdata.tables["ssl"]
    assert table.shape == (len(sdata.shapes["true_cells"]), 256)
    assert table.uns["scellst"]["encoder"]["source"] == "ssl"
    assert table.uns["spatialdata_attrs"]["region"] == "true_cells"
    y = sdata.tables["true_expression"].obs["cell_type"].astype(str).to_numpy()
    acc = _probe_accuracy(np.asarray(table.X), y)
    chance = max(np.mean(y == c) for c in np.unique(y))
    assert acc > chance + 0.2, (acc, chance)


def test_train_ssl_resume_and_guards(tissue, tmp_path):
    path = tmp_path / "enc.pt"
    kwargs = {"path": path, "batch_size": 64, "max_cells": 300, "seed": 0, "show_progress_bar": False}
    scellst.im.train_ssl(tissue, "true_cells", epochs=1, **kwargs)
    with pytest.raises(ValueError, match="resume=True"):
        scellst.im.train_ssl(tissue, "true_cells", epochs=2, **kwargs)
    enc = scellst.im.train_ssl(tissue, "true_cells", epochs=2, resume=True, **kwargs)
    assert len(enc.history["loss"]) == 2  # the first epoch came from the checkpoint
    with pytest.raises(ValueError, match="another run"):
        scellst.im.train_ssl(tissue, "true_cells", epochs=3, resume=True, arch="resnet_small", **kwargs)


def test_encoder_from_torchvision_style_weights(tmp_path):
    import torch

    net = scellst.models.build_resnet("resnet18")
    state = dict(net.state_dict())
    state["fc.weight"] = torch.zeros(1000, 512)
    state["fc.bias"] = torch.zeros(1000)
    torch.save(state, tmp_path / "resnet18.pth")
    enc = scellst.models.encoder_from_weights(tmp_path / "resnet18.pth")
    assert enc.config.arch == "resnet18"
    assert enc.feature_dim == 512
    assert enc.config.stain_norm == "imagenet"
    x = torch.rand(4, 3, 48, 48)
    torch.testing.assert_close(enc.embed(x), net.eval()(x))
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="ResNet state_dict"):
        scellst.models.encoder_from_weights(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        scellst.models.encoder_from_weights(tmp_path / "missing.pth")
    # TorchScript files load as they are
    scripted = torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()))
    scripted.save(str(tmp_path / "scripted.pt"))
    enc = scellst.models.encoder_from_weights(tmp_path / "scripted.pt")
    assert enc.feature_dim == 8
    assert enc.embed(x).shape == (4, 8)  # feature maps are average-pooled


def test_embed_cells_with_module_and_errors(tissue, tmp_path):
    import torch

    sdata = fresh_copy(tissue)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    scellst.im.embed_cells(
        sdata, "true_cells", method="encoder", encoder=module, key_added="mod", show_progress_bar=False
    )
    assert sdata.tables["mod"].shape[1] == 4
    assert list(sdata.tables["mod"].var_names[:2]) == ["encoder_0", "encoder_1"]
    with pytest.raises(ValueError, match="needs `encoder=`"):
        scellst.im.embed_cells(sdata, "true_cells", method="ssl", key_added="x")
    torch.save({"a": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a scellst encoder"):
        scellst.im.embed_cells(sdata, "true_cells", method="ssl", encoder=tmp_path / "other.pt", key_added="x")
    with pytest.raises(ValueError, match="Unknown embedding method"):
        scellst.im.embed_cells(sdata, "true_cells", method="vit", key_added="x")


def test_pretrained_efficientnet_lite0(tissue, monkeypatch):
    # the `pretrained` extra is part of the `test` extra, so this runs in CI
    sdata = fresh_copy(tissue)
    scellst.im.embed_cells(sdata, "true_cells", method="efficientnet-lite0", key_added="eff", show_progress_bar=False)
    x = np.asarray(sdata.tables["eff"].X)
    assert x.shape[1] == 1280
    assert np.isfinite(x).all()
    assert x.std() > 0
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(ImportError, match="scellst\\[pretrained\\]"):
        scellst.im.embed_cells(sdata, "true_cells", method="efficientnet-lite0", key_added="e2")


def test_crop_cache_is_keyed_by_cells(tissue):
    from scellst.im._ssl import _fingerprint

    crops = scellst.im.cell_crops(tissue, "true_cells", context=1.5)
    a = _fingerprint(crops, np.arange(100))
    assert a == _fingerprint(crops, np.arange(100))
    assert a != _fingerprint(crops, np.arange(1, 101))  # same count, other cells
    other = scellst.im.cell_crops(tissue, "true_cells", context=1.0)
    assert a != _fingerprint(other, np.arange(100))  # other geometry
