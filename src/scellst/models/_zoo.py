"""The torch networks of the registered models (imported only when a network is built).

Every network maps standardised cell features (and, for some, a spot context) to non-negative per-cell expression,
and implements ``spots(t, spot_idx, cell_index, bag_index)``: the predictions of a batch of spots, which the losses
compare to the measured spots. ``t`` holds the training tensors: ``x`` (cells), ``spot_x`` (mean cell features of
every spot), ``nb_x`` (mean of the neighbouring spots) and ``nbr`` (indices of the nearest spots).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._ops import bag_mean


def _mlp(n_in: int, hidden: tuple[int, ...], n_out: int | None, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = n_in
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    if n_out is not None:
        layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


class _Head(nn.Module):
    """Shared output handling: softplus times a per-gene scale, optional NB dispersion, bias initialisation."""

    needs_context = False

    def _init_head(self, config, last: nn.Linear, output_bias, output_scale) -> None:
        scale = torch.ones(config.n_genes) if output_scale is None else torch.as_tensor(output_scale).float()
        self.register_buffer("output_scale", scale)
        self.softplus = nn.Softplus()
        if config.loss == "nb":
            self.log_theta = nn.Parameter(torch.full((config.n_genes,), 2.0))
        if output_bias is not None:
            with torch.no_grad():
                last.bias.copy_(torch.as_tensor(output_bias).float())


class MILNet(_Head):
    """sCellST: an MLP per cell (ReLU hidden layers, softplus output); a spot is the mean of its cells."""

    def __init__(self, config, output_bias=None, output_scale=None) -> None:
        super().__init__()
        self.mlp = _mlp(config.n_features, config.hidden, config.n_genes, config.dropout)
        self._init_head(config, self.mlp[-1], output_bias, output_scale)

    def forward(self, x, ctx=None):
        return self.softplus(self.mlp(x)) * self.output_scale

    def spots(self, t, spot_idx, cell_index, bag_index, weight=None):
        return bag_mean(self(t["x"][cell_index]), bag_index, len(spot_idx), weight)


class CPNNNet(_Head):
    """CPNN: per-cell weights over cell types (softmax) times the types' expression prototypes.

    Cell expression is ``gain * (weights @ prototypes) + offset`` (the offset only on log-normalised targets), so
    the platform difference between the single-cell reference and the spots is a per-gene gain; with
    ``mixing="rates"`` the types are mixed as rates and the result log-transformed. Spots are the mean of their
    cells.
    """

    def __init__(self, config, output_bias=None, output_scale=None, prototypes=None, scale=None, log_gain=None) -> None:
        super().__init__()
        n_types = int(config.options["n_types"])
        self.mixing = config.options.get("mixing", "log")
        if self.mixing == "rates":  # MSE on log values, types mixed as rates: log1p(gain * w @ rates) / scale
            self.register_buffer("scale", torch.ones(config.n_genes) if scale is None else torch.as_tensor(scale))
        self.mlp = _mlp(config.n_features, config.hidden, n_types, config.dropout)
        protos = torch.zeros(n_types, config.n_genes) if prototypes is None else torch.as_tensor(prototypes).float()
        self.register_buffer("prototypes", protos)
        gain = torch.zeros(config.n_genes) if log_gain is None else torch.as_tensor(log_gain).float()
        self.log_gain = nn.Parameter(gain)
        self.offset = nn.Parameter(torch.zeros(config.n_genes), requires_grad=config.loss not in ("nb", "poisson"))
        if config.loss == "nb":
            self.log_theta = nn.Parameter(torch.full((config.n_genes,), 2.0))

    def weights(self, x):
        """Per-cell composition weights over the types (rows sum to one)."""
        return torch.softmax(self.mlp(x), dim=1)

    def forward(self, x, ctx=None):
        mixed = torch.exp(self.log_gain) * (self.weights(x) @ self.prototypes)
        if self.mixing == "rates":
            return torch.log1p(mixed) / self.scale + self.offset
        return mixed + self.offset

    def spots(self, t, spot_idx, cell_index, bag_index, weight=None):
        return bag_mean(self(t["x"][cell_index]), bag_index, len(spot_idx), weight)


class DeepSpot2CellNet(_Head):
    """DeepSpot2Cell: a DeepSet per cell over (cell, its spot's mean embedding, the neighbouring spots' mean).

    Each of the three inputs has its own encoder; their outputs are concatenated and decoded to the cell's
    expression; the cells of a spot are averaged as in sCellST (the mean of log-normalised values for the MSE and
    cosine losses, the mean rate for the count losses, which the loss scales by the spot's library size).
    """

    needs_context = True

    def __init__(self, config, output_bias=None, output_scale=None) -> None:
        super().__init__()
        d, width = config.n_features, config.hidden[0]
        self.cell = _mlp(d, (width, width), None, config.dropout)
        self.spot = _mlp(d, (width,), None, config.dropout)
        self.neighbours = _mlp(d, (width,), None, config.dropout)
        self.decoder = _mlp(3 * width, tuple(config.hidden[1:]), config.n_genes, config.dropout)
        self._init_head(config, self.decoder[-1], output_bias, output_scale)

    def forward(self, x, ctx):
        d = x.shape[1]
        h = torch.cat([self.cell(x), self.spot(ctx[:, :d]), self.neighbours(ctx[:, d:])], dim=1)
        return self.softplus(self.decoder(h)) * self.output_scale

    def spots(self, t, spot_idx, cell_index, bag_index, weight=None):
        sidx = torch.as_tensor(spot_idx, device=t["x"].device)[bag_index]
        ctx = torch.cat([t["spot_x"][sidx], t["nb_x"][sidx]], dim=1)
        return bag_mean(self(t["x"][cell_index], ctx), bag_index, len(spot_idx), weight)


class MISOTeacher(_Head):
    """MISO's spot model: each spot's pooled cell embedding attends to its ``k`` nearest spots (itself included).

    Multi-head scaled dot-product attention restricted to the neighbourhood, a residual connection and layer norm,
    then an MLP to the genes. Trained with the per-slide cosine loss; a per-gene linear calibration fitted after
    training (``cal_gain``, ``cal_offset``) puts its outputs back into the units of the targets.
    """

    def __init__(self, config, output_bias=None, output_scale=None) -> None:
        super().__init__()
        width = config.hidden[0]
        self.n_heads = int(config.options.get("n_heads", 4))
        if width % self.n_heads:
            raise ValueError(f"The hidden width {width} must be divisible by the number of heads {self.n_heads}.")
        self.encoder = _mlp(config.n_features, (width, width), None, config.dropout)
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.decoder = _mlp(width, tuple(config.hidden[1:]), config.n_genes, config.dropout)
        self._init_head(config, self.decoder[-1], output_bias, output_scale)
        self.register_buffer("cal_gain", torch.ones(config.n_genes))
        self.register_buffer("cal_offset", torch.zeros(config.n_genes))

    def attend(self, spot_x, nbr, idx):
        """Raw outputs (before calibration) for spots ``idx``, given every spot's features and neighbours."""
        h = self.encoder(spot_x)
        b, k = len(idx), nbr.shape[1]
        hd = h.shape[1] // self.n_heads
        q = self.q(h[idx]).view(b, self.n_heads, 1, hd)
        neigh = h[nbr[idx]]  # b x k x width
        keys = self.k(neigh).view(b, k, self.n_heads, hd).transpose(1, 2)
        values = self.v(neigh).view(b, k, self.n_heads, hd).transpose(1, 2)
        attn = torch.softmax((q @ keys.transpose(-1, -2)) / math.sqrt(hd), dim=-1)  # b x heads x 1 x k
        mixed = (attn @ values).reshape(b, -1)
        z = self.norm(h[idx] + self.out(mixed))
        return self.softplus(self.decoder(z)) * self.output_scale

    def forward(self, spot_x, nbr, idx=None):
        idx = torch.arange(len(spot_x), device=spot_x.device) if idx is None else idx
        return self.attend(spot_x, nbr, idx) * self.cal_gain + self.cal_offset

    def spots(self, t, spot_idx, cell_index, bag_index, weight=None):  # spots pool their cells (unweighted)
        idx = torch.as_tensor(spot_idx, device=t["x"].device)
        return self.attend(t["spot_x"], t["nbr"], idx)


NETWORKS = {
    "scellst": MILNet,
    "cpnn": CPNNNet,
    "deepspot2cell": DeepSpot2CellNet,
    "miso_teacher": MISOTeacher,
}
