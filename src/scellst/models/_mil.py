"""The sCellST multiple-instance model: a per-cell MLP whose predictions are averaged over the cells of a spot."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._losses import COUNT_LOSSES, LOSSES

FORMAT_VERSION = 2


@dataclass
class MILConfig:
    """Hyper-parameters of the sCellST MIL network."""

    n_features: int
    n_genes: int
    hidden: tuple[int, ...] = (256, 256, 256)
    dropout: float = 0.0
    loss: str = "mse"
    nb_parametrization: str = "mean"

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"Unknown loss {self.loss!r}; choose one of {LOSSES}.")
        if self.nb_parametrization not in ("mean", "total_count"):
            raise ValueError("`nb_parametrization` must be 'mean' or 'total_count'.")
        self.hidden = tuple(int(h) for h in self.hidden)


def inverse_softplus(y: np.ndarray) -> np.ndarray:
    """``x`` such that ``softplus(x) = y`` (for ``y > 0``)."""
    y = np.maximum(np.asarray(y, dtype=np.float64), 1e-6)
    return (y + np.log(-np.expm1(-y))).astype(np.float32)


def build_network(config: MILConfig, *, output_bias: np.ndarray | None = None, output_scale: np.ndarray | None = None):
    """The per-cell network: an MLP with ReLU hidden layers and a softplus output, times a per-gene scale.

    ``output_bias`` initialises the last layer's bias (so the initial output already matches the mean target and the
    network does not spend its first epochs fitting an offset); ``output_scale`` multiplies the softplus output
    (count losses predict rates of very different magnitudes per gene). For the ``"nb"`` loss the network also
    holds the per-gene log inverse dispersion ``log_theta``.
    """
    import torch
    from torch import nn

    class MILNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = []
            width = config.n_features
            for h in config.hidden:
                layers += [nn.Linear(width, h), nn.ReLU()]
                if config.dropout > 0:
                    layers.append(nn.Dropout(config.dropout))
                width = h
            layers.append(nn.Linear(width, config.n_genes))
            self.mlp = nn.Sequential(*layers)
            self.softplus = nn.Softplus()
            scale = torch.ones(config.n_genes) if output_scale is None else torch.as_tensor(output_scale).float()
            self.register_buffer("output_scale", scale)
            if config.loss == "nb":
                self.log_theta = nn.Parameter(torch.full((config.n_genes,), 2.0))
            if output_bias is not None:
                with torch.no_grad():
                    self.mlp[-1].bias.copy_(torch.as_tensor(output_bias).float())

        def forward(self, x):
            return self.softplus(self.mlp(x)) * self.output_scale

    return MILNet()


def bag_mean(cell_out, bag_index, n_bags: int):
    """Mean of cell predictions within each bag (``bag_index`` gives the bag of each cell)."""
    import torch

    sums = torch.zeros(n_bags, cell_out.shape[1], dtype=cell_out.dtype, device=cell_out.device)
    sums.index_add_(0, bag_index, cell_out)
    counts = torch.bincount(bag_index, minlength=n_bags).clamp(min=1).to(cell_out.dtype)
    return sums / counts[:, None]


@dataclass
class ScellstModel:
    """A trained sCellST model (one network or an ensemble) and everything needed to apply it to a new slide.

    Cell predictions come back in log-normalised units (``log1p`` of counts per 10,000): for the ``"mse"`` and
    ``"cosine"`` losses the per-gene training scale is inverted, for the count losses the predicted rate per 10,000
    counts is log-transformed. With several members, predictions are the member mean and the per-cell spread is
    available.
    """

    config: MILConfig
    genes: list[str]
    feature_names: list[str]
    embedding_method: str
    embedding_scaling: str  # "slide": standardise features per slide; "global": with the training statistics
    feature_mean: np.ndarray
    feature_std: np.ndarray
    gene_scale: np.ndarray
    members: list[dict] = field(repr=False)
    history: list[dict[str, list[float]]] = field(default_factory=list, repr=False)
    params: dict[str, Any] = field(default_factory=dict)
    version: str = ""

    def __post_init__(self) -> None:
        self._nets: list | None = None

    @property
    def n_models(self) -> int:
        """Number of ensemble members."""
        return len(self.members)

    @property
    def networks(self) -> list:
        """The torch modules of the members (built lazily, in eval mode)."""
        if self._nets is None:
            nets = []
            for state in self.members:
                net = build_network(self.config)
                net.load_state_dict(state)
                net.eval()
                nets.append(net)
            self._nets = nets
        return self._nets

    def _feature_stats(self, features) -> tuple[np.ndarray, np.ndarray]:
        if self.embedding_scaling != "slide":
            return self.feature_mean, self.feature_std
        if hasattr(features, "compute"):  # dask: one streaming pass
            import dask

            mean, std = dask.compute(features.mean(axis=0), features.std(axis=0))
            return np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
        x = np.asarray(features, dtype=np.float32)
        return x.mean(axis=0), x.std(axis=0)

    def standardize(self, features: np.ndarray, stats: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """Standardise raw features as during training (per slide, or with the training statistics)."""
        mean, std = stats if stats is not None else self._feature_stats(features)
        x = np.asarray(features, dtype=np.float32)
        return ((x - mean) / np.where(std > 1e-8, std, 1.0)).astype(np.float32)

    def _to_lognorm(self, raw: np.ndarray) -> np.ndarray:
        if self.config.loss in COUNT_LOSSES:
            return np.log1p(raw)
        return raw * self.gene_scale[None, :]

    def predict_cells(
        self, features, *, batch_size: int = 65536, return_std: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Per-cell expression (cells x genes, log-normalised units) from the raw features of one slide.

        ``features`` may be a numpy array or a dask array; a dask array is streamed block by block (after one pass
        for the slide statistics), so the features of all cells are never in memory at once. Cells go through the
        network in batches of ``batch_size``; with ``return_std`` the spread (standard deviation) across ensemble
        members is returned too.
        """
        import torch

        stats = self._feature_stats(features)
        n, g = features.shape[0], len(self.genes)
        mean = np.empty((n, g), dtype=np.float32)
        std = np.zeros((n, g), dtype=np.float32) if return_std else None
        if hasattr(features, "compute"):
            bounds = np.cumsum((0, *features.chunks[0]))
            blocks = ((int(a), int(b)) for a, b in itertools.pairwise(bounds))
        else:
            blocks = iter([(0, n)])
        nets = self.networks
        with torch.no_grad():
            for b0, b1 in blocks:
                x = self.standardize(np.asarray(features[b0:b1]), stats)
                for start in range(0, b1 - b0, batch_size):
                    xb = torch.from_numpy(x[start : start + batch_size])
                    outs = np.stack([self._to_lognorm(net(xb).numpy()) for net in nets])
                    mean[b0 + start : b0 + start + len(xb)] = outs.mean(axis=0)
                    if return_std:
                        std[b0 + start : b0 + start + len(xb)] = outs.std(axis=0)
        return (mean, std) if return_std else mean

    def predict_spots(self, features: np.ndarray, bags: Sequence[np.ndarray]) -> np.ndarray:
        """Spot-level expression (log-normalised units) for bags of cell indices into ``features`` (one slide).

        For ``"mse"``/``"cosine"`` this is the mean of the cells' log-normalised predictions (what the model was
        fitted to); for the count losses it is ``log1p`` of the mean predicted rate.
        """
        import torch

        x = torch.from_numpy(self.standardize(features))
        cells = np.concatenate(bags) if len(bags) else np.zeros(0, dtype=int)
        bag_index = torch.from_numpy(np.repeat(np.arange(len(bags)), [len(b) for b in bags]))
        out = []
        with torch.no_grad():
            for net in self.networks:
                raw = bag_mean(net(x[torch.from_numpy(cells)]), bag_index, len(bags)).numpy()
                out.append(np.log1p(raw) if self.config.loss in COUNT_LOSSES else raw * self.gene_scale[None, :])
        return np.mean(out, axis=0)

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
            "members": self.members,
            "history": self.history,
            "params": self.params,
            "version": self.version,
        }
        torch.save(payload, Path(path))

    @classmethod
    def load(cls, path: str | Path) -> ScellstModel:
        """Load a model saved with :meth:`save`."""
        from ._io import load_payload

        payload = load_payload(path, what="scellst model file")
        if payload.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{str(path)!r} is not a scellst model file of format {FORMAT_VERSION} "
                "(saved by an incompatible scellst version?)."
            )
        return cls(
            config=MILConfig(**payload["config"]),
            genes=payload["genes"],
            feature_names=payload["feature_names"],
            embedding_method=payload["embedding_method"],
            embedding_scaling=payload["embedding_scaling"],
            feature_mean=np.asarray(payload["feature_mean"], dtype=np.float32),
            feature_std=np.asarray(payload["feature_std"], dtype=np.float32),
            gene_scale=np.asarray(payload["gene_scale"], dtype=np.float32),
            members=payload["members"],
            history=payload["history"],
            params=payload["params"],
            version=payload["version"],
        )
