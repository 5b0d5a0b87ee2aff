"""The sCellST multiple-instance model: a per-cell MLP whose predictions are averaged over the cells of a spot."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1


@dataclass
class MILConfig:
    """Hyper-parameters of the sCellST MIL model."""

    n_features: int
    n_genes: int
    hidden: tuple[int, ...] = (256, 256, 256)
    dropout: float = 0.0


def build_network(config: MILConfig):
    """The per-cell network: MLP with ReLU hidden layers and a softplus output (non-negative expression)."""
    from torch import nn

    layers: list[Any] = []
    width = config.n_features
    for h in config.hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if config.dropout > 0:
            layers.append(nn.Dropout(config.dropout))
        width = h
    layers += [nn.Linear(width, config.n_genes), nn.Softplus()]
    return nn.Sequential(*layers)


def bag_mean(cell_out, bag_index, n_bags: int):
    """Mean of cell predictions within each bag (``bag_index`` gives the bag of each cell)."""
    import torch

    sums = torch.zeros(n_bags, cell_out.shape[1], dtype=cell_out.dtype, device=cell_out.device)
    sums.index_add_(0, bag_index, cell_out)
    counts = torch.bincount(bag_index, minlength=n_bags).clamp(min=1).to(cell_out.dtype)
    return sums / counts[:, None]


@dataclass
class ScellstModel:
    """A trained sCellST model: the network plus everything needed to apply it to a new slide.

    Predictions are returned in log-normalised units (``log1p`` of counts normalised to 10,000 per spot), the
    per-gene scaling used for training is inverted.
    """

    config: MILConfig
    genes: list[str]
    feature_names: list[str]
    embedding_method: str
    embedding_scaling: str  # "slide": standardise features per slide; "global": with the training statistics
    feature_mean: np.ndarray
    feature_std: np.ndarray
    gene_scale: np.ndarray
    state_dict: dict = field(repr=False)
    history: dict[str, list[float]] = field(default_factory=dict, repr=False)
    params: dict[str, Any] = field(default_factory=dict)
    version: str = ""

    def __post_init__(self) -> None:
        self._net = None

    @property
    def network(self):
        """The torch module (built lazily)."""
        if self._net is None:
            net = build_network(self.config)
            net.load_state_dict(self.state_dict)
            net.eval()
            self._net = net
        return self._net

    def standardize(self, features: np.ndarray) -> np.ndarray:
        """Standardise raw features as during training (per slide, or with the training statistics)."""
        x = np.asarray(features, dtype=np.float32)
        if self.embedding_scaling == "slide":
            mean, std = x.mean(axis=0), x.std(axis=0)
        else:
            mean, std = self.feature_mean, self.feature_std
        return ((x - mean) / np.where(std > 1e-8, std, 1.0)).astype(np.float32)

    def predict_cells(self, features: np.ndarray, *, batch_size: int = 65536) -> np.ndarray:
        """Per-cell expression (cells x genes, log-normalised units) from raw features of one slide."""
        import torch

        x = self.standardize(features)
        out = np.empty((x.shape[0], len(self.genes)), dtype=np.float32)
        net = self.network
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                out[start : start + batch_size] = net(torch.from_numpy(x[start : start + batch_size])).numpy()
        return out * self.gene_scale[None, :].astype(np.float32)

    def check_compatible(self, feature_names: Sequence[str], embedding_method: str) -> None:
        """Raise a clear error when a slide's embeddings do not match those the model was trained on."""
        if embedding_method != self.embedding_method:
            raise ValueError(
                f"The model was trained on {self.embedding_method!r} embeddings but the table holds "
                f"{embedding_method!r} embeddings. Re-run `scellst.tl.embed_cells(..., method="
                f"{self.embedding_method!r})` on this slide."
            )
        if list(feature_names) != list(self.feature_names):
            raise ValueError(
                f"The embedding features ({len(feature_names)}) differ from the model's ({len(self.feature_names)}); "
                "embed the slide with the same method and parameters as the training slides."
            )

    def save(self, path: str | Path) -> None:
        """Save the model to one file (weights, genes, scaling, embedding method, package version)."""
        import torch

        payload = {
            "format_version": FORMAT_VERSION,
            "config": asdict(self.config),
            "genes": list(self.genes),
            "feature_names": list(self.feature_names),
            "embedding_method": self.embedding_method,
            "embedding_scaling": self.embedding_scaling,
            "feature_mean": self.feature_mean.tolist(),
            "feature_std": self.feature_std.tolist(),
            "gene_scale": self.gene_scale.tolist(),
            "state_dict": self.state_dict,
            "history": self.history,
            "params": self.params,
            "version": self.version,
        }
        torch.save(payload, Path(path))

    @classmethod
    def load(cls, path: str | Path) -> ScellstModel:
        """Load a model saved with :meth:`save`."""
        import torch

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"Model file {str(path)!r} does not exist.")
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{str(path)!r} is not a scellst model file of a supported format.")
        cfg = payload["config"]
        cfg["hidden"] = tuple(cfg["hidden"])
        return cls(
            config=MILConfig(**cfg),
            genes=payload["genes"],
            feature_names=payload["feature_names"],
            embedding_method=payload["embedding_method"],
            embedding_scaling=payload["embedding_scaling"],
            feature_mean=np.asarray(payload["feature_mean"], dtype=np.float32),
            feature_std=np.asarray(payload["feature_std"], dtype=np.float32),
            gene_scale=np.asarray(payload["gene_scale"], dtype=np.float32),
            state_dict=payload["state_dict"],
            history=payload["history"],
            params=payload["params"],
            version=payload["version"],
        )
