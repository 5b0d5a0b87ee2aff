"""Batch-agnostic contrastive learning of image and expression (after TPIRBAE).

Two networks, trained one after the other by :func:`scellst.tl.train_contrastive`:

- a gene encoder: a variational autoencoder of spot counts whose decoder is given the spot's batch (slide), so that
  the latent mean does not need to carry the batch to reconstruct the counts (as in scVI); the latent mean is the
  expression target of the spot;
- an image encoder: an MLP applied to every cell's image features, averaged over the cells of the spot and
  projected; it is trained with a symmetric InfoNCE loss (CLIP) to find its spot's expression latent among the other
  spots of the batch. The per-cell output of the MLP is the learned cell embedding.

Importing this module does not import torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._ops import bag_mean

CONTRASTIVE_KIND = "scellst-contrastive"
CONTRASTIVE_FORMAT = 1


@dataclass
class ContrastiveConfig:
    """Sizes and settings of the two encoders."""

    n_features: int  # image features per cell (the base embedding)
    n_genes: int
    n_batches: int
    batch_agnostic: bool = True  # the gene decoder is conditioned on the batch
    latent_dim: int = 16
    gene_hidden: int = 128
    embedding_dim: int = 64  # the learned cell embedding
    projection_dim: int = 32
    image_hidden: int = 256
    dropout: float = 0.1
    temperature: float = 0.1


def build_gene_vae(config: ContrastiveConfig):
    """The gene encoder: log1p CP10k of the genes -> latent mean and log-variance; decoder -> NB means of the counts."""
    import torch
    from torch import nn

    n_cond = config.n_batches if config.batch_agnostic else 0

    class GeneVAE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            h = config.gene_hidden
            self.encoder = nn.Sequential(
                nn.Linear(config.n_genes, h), nn.LayerNorm(h), nn.ReLU(), nn.Dropout(config.dropout)
            )
            self.mean = nn.Linear(h, config.latent_dim)
            self.log_var = nn.Linear(h, config.latent_dim)
            self.decoder = nn.Sequential(nn.Linear(config.latent_dim + n_cond, h), nn.LayerNorm(h), nn.ReLU())
            self.rate = nn.Linear(h, config.n_genes)
            self.log_theta = nn.Parameter(torch.zeros(max(n_cond, 1), config.n_genes))

        def encode(self, counts):
            lib = counts.sum(dim=1, keepdim=True).clamp(min=1.0)
            hidden = self.encoder(torch.log1p(counts / lib * 1e4))
            return self.mean(hidden), self.log_var(hidden).clamp(-10, 10)

        def decode(self, z, batch, lib):
            inputs = z
            if n_cond:
                inputs = torch.cat([z, nn.functional.one_hot(batch, n_cond).to(z.dtype)], dim=1)
            rate = torch.softmax(self.rate(self.decoder(inputs)), dim=1)
            log_theta = self.log_theta[batch] if n_cond else self.log_theta.expand(len(z), -1)
            return rate * lib, log_theta

        def loss(self, counts, batch, kl_weight: float = 1.0):
            """Negative ELBO per spot: NB reconstruction (summed over genes) + ``kl_weight`` x KL."""
            from ._losses import nb_nll

            mean, log_var = self.encode(counts)
            z = mean + torch.randn_like(mean) * torch.exp(0.5 * log_var) if self.training else mean
            mu, log_theta = self.decode(z, batch, counts.sum(dim=1, keepdim=True))
            recon = nb_nll(mu, counts, log_theta) * counts.shape[1]
            kl = -0.5 * (1 + log_var - mean**2 - log_var.exp()).sum(dim=1).mean()
            return recon + kl_weight * kl

    return GeneVAE()


def build_contrastive_heads(config: ContrastiveConfig):
    """The image encoder (cell MLP + spot projection) and the projection of the gene latent."""
    import torch
    from torch import nn

    class ContrastiveHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            h = config.image_hidden
            self.cell = nn.Sequential(
                nn.Linear(config.n_features, h),
                nn.LayerNorm(h),
                nn.ReLU(),
                nn.Dropout(config.dropout),
                nn.Linear(h, config.embedding_dim),
            )
            self.image_projection = nn.Sequential(nn.ReLU(), nn.Linear(config.embedding_dim, config.projection_dim))
            self.gene_projection = nn.Sequential(
                nn.Linear(config.latent_dim, config.gene_hidden),
                nn.ReLU(),
                nn.Linear(config.gene_hidden, config.projection_dim),
            )

        def spots(self, x_cells, bag_index, n_bags: int, weight=None):
            """Unit-length image projections of the spots (weighted mean of their cells' embeddings)."""
            pooled = bag_mean(self.cell(x_cells), bag_index, n_bags, weight)
            return nn.functional.normalize(self.image_projection(pooled), dim=1)

        def genes(self, latent):
            return nn.functional.normalize(self.gene_projection(latent), dim=1)

        def loss(self, image, genes):
            """Symmetric InfoNCE: each spot's image must find its own expression among the batch, and back."""
            logits = image @ genes.T / config.temperature
            target = torch.arange(len(image), device=image.device)
            return 0.5 * (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target))

    return ContrastiveHeads()


@dataclass
class ContrastiveModel:
    """A trained contrastive image-expression model and what is needed to embed the cells of a new slide.

    ``feature_names`` and ``base`` describe the cell features the image encoder reads (the table of
    :func:`scellst.im.embed_cells` it was trained on: its method, ring and neighbourhood radii); new slides must be
    embedded the same way. Features are scaled per slide (``embedding_scaling``) as for the MIL learner.
    """

    config: ContrastiveConfig
    genes: list[str]
    batches: list[str]
    feature_names: list[str]
    base: dict[str, Any]
    embedding_scaling: str
    heads: Any = field(repr=False)
    gene_vae: Any = field(repr=False)
    history: dict[str, list[float]] = field(default_factory=dict, repr=False)
    params: dict[str, Any] = field(default_factory=dict)

    def embed(self, x: np.ndarray, *, batch_size: int = 65_536) -> np.ndarray:
        """The learned embedding of cells whose features ``x`` are already scaled (cells x ``embedding_dim``)."""
        import torch

        self.heads.eval()
        out = []
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                chunk = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size], dtype=np.float32))
                out.append(self.heads.cell(chunk).numpy())
        if not out:
            return np.zeros((0, self.config.embedding_dim), np.float32)
        return np.concatenate(out).astype(np.float32)

    def expression_latent(self, counts: np.ndarray) -> np.ndarray:
        """The gene encoder's latent mean of spots (raw counts of :attr:`genes`, spots x genes)."""
        import torch

        self.gene_vae.eval()
        with torch.inference_mode():
            mean, _ = self.gene_vae.encode(torch.from_numpy(np.asarray(counts, dtype=np.float32)))
        return mean.numpy()

    def save(self, path: str | Path) -> Path:
        """Write the model (weights and plain settings, no pickled code); reload with :meth:`load`."""
        payload = {
            "kind": CONTRASTIVE_KIND,
            "format": CONTRASTIVE_FORMAT,
            "config": asdict(self.config),
            "genes": list(self.genes),
            "batches": list(self.batches),
            "feature_names": list(self.feature_names),
            "base": _plain(self.base),
            "embedding_scaling": self.embedding_scaling,
            "heads": self.heads.state_dict(),
            "gene_vae": self.gene_vae.state_dict(),
            "history": {k: [float(v) for v in vals] for k, vals in self.history.items()},
            "params": _plain(self.params),
        }
        from ._io import save_payload

        return save_payload(payload, path)

    @classmethod
    def load(cls, path: str | Path) -> ContrastiveModel:
        """Read a model written by :meth:`save` (weights only: a file cannot run code when it is opened)."""
        from ._io import load_payload

        payload = load_payload(path, what="scellst contrastive model file")
        if payload.get("kind") != CONTRASTIVE_KIND:
            raise ValueError(f"{str(path)!r} is not a scellst contrastive model (from `scellst.tl.train_contrastive`).")
        if payload.get("format", 0) > CONTRASTIVE_FORMAT:
            raise ValueError(f"{str(path)!r} was written by a newer scellst; upgrade scellst to read it.")
        config = ContrastiveConfig(**payload["config"])
        heads, vae = build_contrastive_heads(config), build_gene_vae(config)
        heads.load_state_dict(payload["heads"])
        vae.load_state_dict(payload["gene_vae"])
        return cls(
            config=config,
            genes=list(payload["genes"]),
            batches=list(payload["batches"]),
            feature_names=list(payload["feature_names"]),
            base=dict(payload["base"]),
            embedding_scaling=str(payload["embedding_scaling"]),
            heads=heads,
            gene_vae=vae,
            history={k: list(v) for k, v in payload.get("history", {}).items()},
            params=dict(payload.get("params", {})),
        )


def is_contrastive_file(path: Any) -> bool:
    """Whether ``path`` is a file written by :meth:`ContrastiveModel.save` (reads it with ``weights_only``)."""
    if not isinstance(path, str | Path) or not Path(path).is_file():
        return False
    from ._io import load_payload

    try:
        return load_payload(path, what="model file").get("kind") == CONTRASTIVE_KIND
    except ValueError:
        return False


def _plain(value: Any) -> Any:
    """``value`` as plain Python data (lists, dicts, str, float, int, bool, None) for a weights-only file."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
