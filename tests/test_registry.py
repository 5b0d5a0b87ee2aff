"""A model registered from outside the package is trained, saved, loaded and applied without touching scellst."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import scellst
from scellst.models import ModelSpec, register_model

from .conftest import fresh_copy


def _bag_mean(cell_out, bag_index, n_bags):
    sums = torch.zeros(n_bags, cell_out.shape[1]).index_add_(0, bag_index, cell_out)
    counts = torch.zeros(n_bags).index_add_(0, bag_index, torch.ones(len(bag_index)))
    return sums / counts[:, None]


class TwoLayerWithSpot(nn.Module):
    """A third-party model: a small per-cell network that also sees its spot's mean features (context)."""

    def __init__(self, config, output_bias=None, output_scale=None):
        super().__init__()
        width = int(config.options["width"])
        self.width = width
        self.cell = nn.Sequential(nn.Linear(config.n_features, width), nn.ReLU(), nn.Linear(width, config.n_genes))
        self.spot = nn.Linear(2 * config.n_features, config.n_genes)
        self.softplus = nn.Softplus()

    def forward(self, x, ctx=None):
        out = self.cell(x)
        if ctx is not None:
            out = out + self.spot(ctx)
        return self.softplus(out)

    def spots(self, t, spot_idx, cell_index, bag_index):
        spot_of_cell = torch.as_tensor(spot_idx)[bag_index]
        ctx = torch.cat([t["spot_x"][spot_of_cell], t["nb_x"][spot_of_cell]], dim=1)
        return _bag_mean(self(t["x"][cell_index], ctx), bag_index, len(spot_idx))


@pytest.fixture(scope="module", autouse=True)
def registered():
    register_model(
        ModelSpec(
            "third_party_test",
            lambda: TwoLayerWithSpot,
            "a model from outside scellst",
            defaults={"width": 16, "n_models": 2, "lr": 1e-3},
            options=("width", "k_neighbors"),
            needs_context=True,
        ),
        overwrite=True,
    )
    yield
    from scellst.models._registry import _REGISTRY

    for name in ("third_party_test", "third_party_prepared"):
        _REGISTRY.pop(name, None)  # other test files see only the built-in models


def test_a_registered_model_trains_saves_loads_and_predicts(processed, tmp_path):
    assert "third_party_test" in scellst.models.available_models()
    sdata = fresh_copy(processed)
    model = scellst.tl.train(
        sdata, model="third_party_test", model_params={"width": 8}, max_epochs=5, show_progress_bar=False
    )
    assert model.n_models == 2  # the declared default ensemble size
    assert model.params["lr"] == pytest.approx(1e-3)  # the declared learning rate
    assert model.config.options["width"] == 8  # the option reached the network...
    assert model.networks[0].width == 8
    assert model.needs_context  # ...and the declared context is used at prediction
    model.save(tmp_path / "third.pt")
    loaded = scellst.tl.load_model(tmp_path / "third.pt")
    scellst.tl.predict(sdata, loaded)
    cells = sdata.tables["nuclei_expression"]
    assert list(cells.var_names) == model.genes
    x = np.asarray(cells.X)
    assert np.isfinite(x).all()
    assert (x >= 0).all()
    spots = scellst.bench.evaluate(sdata)
    assert spots["pearson"].notna().all()


def test_unknown_options_of_a_registered_model_are_refused(processed):
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['depth'\] for model 'third_party_test'"):
        scellst.tl.train(processed, model="third_party_test", model_params={"depth": 3}, max_epochs=1)


def test_declared_steps_and_losses_are_followed(processed):
    """A model's own set-up step (``prepare``) runs on the training data, and its declared losses are enforced."""
    from dataclasses import replace

    seen = {}

    def prepare(config, data, *, genes, reference, groupby, opts):
        seen.update(genes=list(genes), n_spots=len(data.bags), reference=reference, opts=dict(opts))
        return replace(config, options={**config.options, "width": 4}), {}

    register_model(
        ModelSpec(
            "third_party_prepared",
            lambda: TwoLayerWithSpot,
            defaults={"width": 16, "n_models": 1},
            options=("width",),
            needs_context=True,
            losses=("mse", "poisson"),
            prepare=prepare,
            target="a custom target",
        ),
        overwrite=True,
    )
    with pytest.raises(ValueError, match="trains with the loss 'mse' or 'poisson' only"):
        scellst.tl.train(processed, model="third_party_prepared", loss="nb", max_epochs=1, show_progress_bar=False)
    model = scellst.tl.train(processed, model="third_party_prepared", max_epochs=2, show_progress_bar=False)
    assert seen["genes"] == model.genes
    assert seen["n_spots"] == model.params["n_train_spots"] + model.params["n_val_spots"]
    assert seen["opts"]["width"] == 16
    assert model.networks[0].width == 4  # the config returned by `prepare` is the one trained
    assert model.params["target"] == "a custom target"
