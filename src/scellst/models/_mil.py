"""The sCellST multiple-instance model: a per-cell MLP whose predictions are averaged over the cells of a spot."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from ._losses import COUNT_LOSSES, LOSSES
from ._ops import bag_mean

FORMAT_VERSION = 3
_READABLE_VERSIONS = (2, 3)  # format 2 (scellst < 0.4) had no architecture: it is always "scellst"


@dataclass
class MILConfig:
    """Hyper-parameters of the sCellST MIL network."""

    n_features: int
    n_genes: int
    hidden: tuple[int, ...] = (256, 256, 256)
    dropout: float = 0.0
    loss: str = "mse"
    nb_parametrization: str = "mean"
    architecture: str = "scellst"
    options: dict[str, Any] = field(default_factory=dict)

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


def build_network(
    config: MILConfig,
    *,
    output_bias: np.ndarray | None = None,
    output_scale: np.ndarray | None = None,
    **init: Any,
):
    """The network of ``config.architecture`` (a registered model; ``"scellst"``: the sCellST MLP).

    For sCellST, an MLP with ReLU hidden layers and a softplus output, times a per-gene scale. ``output_bias``
    initialises the last layer's bias (so the initial output already matches the mean target and the network does
    not spend its first epochs fitting an offset); ``output_scale`` multiplies the softplus output (count losses
    predict rates of very different magnitudes per gene). For the ``"nb"`` loss the network also holds the per-gene
    log inverse dispersion ``log_theta``. ``init`` passes model-specific initial values (CPNN's ``prototypes``).
    """
    from ._registry import get_model

    network = get_model(config.architecture).network()
    return network(config, output_bias=output_bias, output_scale=output_scale, **init)


EMBEDDING_SCALINGS = ("quantile", "slide", "global")
_BLOCK_ROWS = 131_072  # cells standardised at once at prediction (numpy features)
_QUANTILE_LEVELS = (np.arange(1000) + 0.5) / 1000


def quantile_stats(features) -> np.ndarray:
    """Per-feature quantiles of one slide's raw features (1,000 levels x features), for :func:`quantile_normal`.

    The features are read (a dask array) or converted to float64 (a numpy array) 16 columns at a time, so a whole
    slide's features are never in memory at once, nor in double precision.
    """
    cols = (np.asarray(features[:, j : j + 16], dtype=np.float64) for j in range(0, features.shape[1], 16))
    return np.concatenate([np.quantile(c, _QUANTILE_LEVELS, axis=0, method="nearest") for c in cols], axis=1)


def quantile_normal(x: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """Each feature mapped through its slide's quantiles to a standard normal score (ties share their mean level).

    A monotone change of a feature between slides (a stronger stain, another scanner's colour response) leaves the
    scores unchanged, where a z-score only removes shifts and scalings.
    """
    from scipy.special import ndtri

    x = np.asarray(x, dtype=np.float64)
    out = np.empty(x.shape, dtype=np.float32)
    for j in range(x.shape[1]):
        values, inverse = np.unique(quantiles[:, j], return_inverse=True)
        levels = np.bincount(inverse, weights=_QUANTILE_LEVELS) / np.bincount(inverse)
        if len(values) == 1:
            out[:, j] = 0.0
            continue
        out[:, j] = ndtri(np.interp(x[:, j], values, levels))
    return out


def slide_stats(features, scaling: str, feature_mean: np.ndarray, feature_std: np.ndarray) -> Any:
    """What :func:`apply_scaling` needs for one slide: its quantiles, its mean and sd, or the training statistics."""
    if scaling == "quantile":
        return quantile_stats(features)
    if scaling != "slide":
        return feature_mean, feature_std
    if hasattr(features, "compute"):  # dask: one streaming pass
        import dask

        mean, std = dask.compute(features.mean(axis=0), features.std(axis=0))
        return np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    x = np.asarray(features, dtype=np.float32)
    return x.mean(axis=0), x.std(axis=0)


def apply_scaling(features, scaling: str, stats: Any) -> np.ndarray:
    """One slide's raw features scaled for the networks (the same at training and at prediction)."""
    x = np.asarray(features, dtype=np.float32)
    if scaling == "quantile":
        return quantile_normal(x, stats)
    mean, std = stats
    return ((x - mean) / np.where(std > 1e-8, std, 1.0)).astype(np.float32)


@dataclass
class ScellstModel:
    """A trained model (one network or an ensemble) and everything needed to apply it to a new slide.

    The same class holds every registered model (``model``: ``"scellst"``, ``"cpnn"``, ``"deepspot2cell"``,
    ``"miso"``); ``config.architecture`` names the per-cell network. Cell predictions come back in log-normalised
    units (``log1p`` of counts per 10,000): for the ``"mse"`` and ``"cosine"`` losses the per-gene training scale is
    inverted, for the count losses the predicted rate per 10,000 counts is log-transformed. With several members,
    predictions are the member mean (or median, for DeepSpot2Cell) and the per-cell spread is available.
    """

    config: MILConfig
    genes: list[str]
    feature_names: list[str]
    embedding_method: str
    embedding_scaling: str  # "quantile"/"slide": per-slide normal scores / z-scores; "global": training statistics
    feature_mean: np.ndarray
    feature_std: np.ndarray
    gene_scale: np.ndarray
    members: list[dict] = field(repr=False)
    history: list[dict[str, list[float]]] = field(default_factory=list, repr=False)
    params: dict[str, Any] = field(default_factory=dict)
    version: str = ""
    model: str = "scellst"
    extras: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._nets: list | None = None
        self._teachers: list | None = None

    @property
    def n_models(self) -> int:
        """Number of ensemble members."""
        return len(self.members)

    @property
    def needs_context(self) -> bool:
        """Whether cell predictions need the cells' spots or positions (DeepSpot2Cell)."""
        from ._registry import get_model

        return get_model(self.config.architecture).needs_context

    @property
    def cell_types(self) -> list[str]:
        """The reference cell types of a CPNN model (empty for other models)."""
        return list(self.config.options.get("cell_types", []))

    @staticmethod
    def _build(config: MILConfig, states: list[dict]) -> list:
        nets = []
        for state in states:
            net = build_network(config)
            net.load_state_dict(state)
            net.eval()
            nets.append(net)
        return nets

    @property
    def networks(self) -> list:
        """The torch modules of the members (built lazily, in eval mode)."""
        if self._nets is None:
            self._nets = self._build(self.config, self.members)
        return self._nets

    @property
    def teachers(self) -> list:
        """MISO's spot-level attention networks (empty for other models)."""
        if self._teachers is None:
            cfg = self.extras.get("teacher_config")
            self._teachers = [] if cfg is None else self._build(MILConfig(**cfg), self.extras["teacher_members"])
        return self._teachers

    def slide_stats(self, features) -> Any:
        """What the scaling of one slide's features needs: its quantiles, its mean and sd, or the training statistics.

        Pass it as ``stats`` to several predictions of the same slide to compute it once.
        """
        return slide_stats(features, self.embedding_scaling, self.feature_mean, self.feature_std)

    def standardize(self, features: np.ndarray, stats: Any = None) -> np.ndarray:
        """Scale raw features as during training (per-slide quantiles or z-scores, or the training statistics)."""
        stats = stats if stats is not None else self.slide_stats(features)
        return apply_scaling(features, self.embedding_scaling, stats)

    def _to_lognorm(self, raw: np.ndarray) -> np.ndarray:
        if self.config.loss in COUNT_LOSSES:
            return np.log1p(raw)
        return raw * self.gene_scale[None, :]

    def _combine(self, outs: np.ndarray) -> np.ndarray:
        if self.config.options.get("ensemble", "mean") == "median":
            return np.median(outs, axis=0)
        return outs.mean(axis=0)

    def _spot_context(self, x: np.ndarray, bags: Sequence[np.ndarray], spot_xy: np.ndarray | None) -> np.ndarray:
        """Per spot: the mean standardised features of its cells, then the mean over its neighbouring spots."""
        from ._context import neighbour_means, spot_means, spot_neighbors

        spot_x = spot_means(x, bags)
        nbr = spot_neighbors(spot_xy, int(self.config.options.get("k_neighbors", 7)), n=len(bags))
        return np.concatenate([spot_x, neighbour_means(spot_x, nbr)], axis=1)

    def cell_context(self, x: np.ndarray, context) -> np.ndarray:
        """Per-cell context: the spot context of the cell's spot (see :func:`scellst.models._context.cell_spots`)."""
        from ._context import SpotContext, cell_spots

        context = context if context is not None else SpotContext()
        cells_per_spot = float(self.params.get("median_cells_per_spot", 20))
        spot_of, bags, spot_xy = cell_spots(len(x), context, cells_per_spot=cells_per_spot)
        ctx = self._spot_context(x, bags, spot_xy)[np.maximum(spot_of, 0)]
        alone = spot_of < 0
        if alone.any():  # no spot and no position: the cell is its own context
            ctx[alone] = np.concatenate([x[alone], x[alone]], axis=1)
        return ctx.astype(np.float32)

    def _blocks(self, features, context, stats: Any = None):
        """Standardised feature blocks ``(start, stop, x, ctx)``, streamed for context-free models.

        Dask features go block by block (their row chunks), numpy features ``_BLOCK_ROWS`` rows at a time: only one
        block is standardised at once, whatever the number of cells (the scaling is row-wise, so the values are those
        of the whole matrix standardised at once).
        """
        stats = stats if stats is not None else self.slide_stats(features)
        n = features.shape[0]
        if self.needs_context:
            x = self.standardize(np.asarray(features), stats)
            yield 0, n, x, self.cell_context(x, context)
            return
        if hasattr(features, "compute"):
            bounds = np.cumsum((0, *features.chunks[0]))
        else:
            bounds = [*range(0, n, _BLOCK_ROWS), n]
        for a, b in itertools.pairwise(bounds):
            yield int(a), int(b), self.standardize(np.asarray(features[int(a) : int(b)]), stats), None

    def predict_cells(
        self,
        features,
        *,
        context=None,
        batch_size: int = 65536,
        return_std: bool = False,
        device: Any = "cpu",
        stats: Any = None,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Per-cell expression (cells x genes, log-normalised units) from the raw features of one slide.

        ``features`` may be a numpy array or a dask array; a dask array is streamed block by block (after one pass
        for the slide statistics), so the features of all cells are never in memory at once (models that need a
        spot context read them once). ``context`` (a :class:`scellst.models.SpotContext`: the cells' spots and/or
        positions) is needed by DeepSpot2Cell. Cells go through the network in batches of ``batch_size`` on
        ``device`` (a torch device or its name; the networks return to the CPU afterwards); with ``return_std`` the
        spread (standard deviation) across ensemble members is returned too. ``stats``: the slide's
        :meth:`slide_stats`, when already computed.
        """
        import torch

        n, g = features.shape[0], len(self.genes)
        mean = np.empty((n, g), dtype=np.float32)
        std = np.zeros((n, g), dtype=np.float32) if return_std else None
        if n == 0:  # no slide statistics without cells
            return (mean, std) if return_std else mean
        dev = torch.device(device)
        nets = [net.to(dev) for net in self.networks]
        try:
            with torch.no_grad():
                for b0, b1, x, ctx in self._blocks(features, context, stats):
                    for start in range(0, b1 - b0, batch_size):
                        xb = torch.from_numpy(x[start : start + batch_size]).to(dev)
                        cb = None if ctx is None else torch.from_numpy(ctx[start : start + batch_size]).to(dev)
                        outs = np.stack([self._to_lognorm(net(xb, cb).cpu().numpy()) for net in nets])
                        mean[b0 + start : b0 + start + len(xb)] = self._combine(outs)
                        if return_std:
                            std[b0 + start : b0 + start + len(xb)] = outs.std(axis=0)
        finally:
            for net in nets:
                net.cpu()
        return (mean, std) if return_std else mean

    def predict_type_weights(self, features, *, batch_size: int = 65536, stats: Any = None) -> np.ndarray:
        """CPNN: per-cell composition weights over :attr:`cell_types` (cells x types, rows sum to one).

        ``stats`` as for :meth:`predict_cells`.
        """
        import torch

        if self.config.architecture != "cpnn":
            raise ValueError(f"Only CPNN models have cell-type weights; this is a {self.model!r} model.")
        out = np.empty((features.shape[0], len(self.cell_types)), dtype=np.float32)
        with torch.no_grad():
            for b0, b1, x, _ in self._blocks(features, None, stats):
                for start in range(0, b1 - b0, batch_size):
                    xb = torch.from_numpy(x[start : start + batch_size])
                    w = np.mean([net.weights(xb).numpy() for net in self.networks], axis=0)
                    out[b0 + start : b0 + start + len(xb)] = w
        return out

    def predict_spots(
        self,
        features: np.ndarray,
        bags: Sequence[np.ndarray],
        spot_xy: np.ndarray | None = None,
        *,
        stats: Any = None,
    ) -> np.ndarray:
        """Spot-level expression (log-normalised units) for bags of cell indices into ``features`` (one slide).

        For ``"mse"``/``"cosine"`` this is the mean of the cells' log-normalised predictions (what the model was
        fitted to); for the count losses it is ``log1p`` of the mean predicted rate. ``spot_xy`` (spot centres)
        gives DeepSpot2Cell its neighbouring spots; for MISO, spot predictions come from the spot-level attention
        model (which needs ``spot_xy``), otherwise from the cell-level student. ``stats`` as for
        :meth:`predict_cells`.
        """
        import torch

        from ._context import spot_means, spot_neighbors

        # only the cells in spots are standardised (with the whole slide's statistics), in bag order
        cells = np.concatenate(bags).astype(np.int64) if len(bags) else np.zeros(0, dtype=np.int64)
        x = self.standardize(np.asarray(features[cells]), stats if stats is not None else self.slide_stats(features))
        sizes = [len(b) for b in bags]
        local = np.split(np.arange(len(cells)), np.cumsum(sizes)[:-1]) if len(bags) else []
        if self.teachers and spot_xy is not None:
            spot_x = torch.from_numpy(spot_means(x, local))
            nbr = torch.from_numpy(spot_neighbors(np.asarray(spot_xy), int(self.config.options["k_neighbors"])))
            with torch.no_grad():
                outs = np.stack([self._to_lognorm(t(spot_x, nbr).numpy()) for t in self.teachers])
            return self._combine(outs)
        bag_index = torch.from_numpy(np.repeat(np.arange(len(bags)), sizes))
        ctx = None
        if self.needs_context:
            xy = None if spot_xy is None else np.asarray(spot_xy, dtype=float)
            ctx = torch.from_numpy(self._spot_context(x, local, xy)[bag_index.numpy()])
        xc = torch.from_numpy(x)
        out = []
        with torch.no_grad():
            for net in self.networks:
                raw = bag_mean(net(xc, ctx), bag_index, len(bags)).numpy()
                out.append(self._to_lognorm(raw))
        return self._combine(np.stack(out))

    def check_compatible(self, feature_names: Sequence[str], embedding_method: str) -> None:
        """Raise a clear error when a slide's embeddings do not match those the model was trained on."""
        if embedding_method != self.embedding_method:
            raise ValueError(
                f"The model was trained on {self.embedding_method!r} embeddings but the table holds "
                f"{embedding_method!r} embeddings. Re-run `scellst.im.embed_cells(..., method="
                f"{self.embedding_method!r})` on this slide."
            )
        if list(feature_names) != list(self.feature_names):
            raise ValueError(
                f"The embedding features ({len(feature_names)}) differ from the model's ({len(self.feature_names)}); "
                "embed the slide with the same method and parameters as the training slides."
            )

    def fingerprint(self) -> str:
        """A SHA-256 digest of the saved model: equal for the same weights, genes and settings."""
        import hashlib
        import io

        buf = io.BytesIO()
        self.save(buf)
        return hashlib.sha256(buf.getvalue()).hexdigest()

    def save(self, path: str | Path | IO[bytes]) -> None:
        """Save the model to one file (weights, genes, scaling, embedding method, package version)."""
        import torch

        payload = {
            "format_version": FORMAT_VERSION,
            "model": self.model,
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
            "extras": self.extras,
        }
        torch.save(payload, path if hasattr(path, "write") else Path(path))

    @classmethod
    def load(cls, path: str | Path) -> ScellstModel:
        """Load a model saved with :meth:`save`."""
        from ._io import load_payload

        payload = load_payload(path, what="scellst model file")
        if payload.get("format_version") not in _READABLE_VERSIONS:
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
            model=payload.get("model", "scellst"),
            extras=payload.get("extras", {}),
        )
