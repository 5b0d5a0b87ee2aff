"""Small torch operations shared by the networks and the learner (no imports of other scellst modules)."""

from __future__ import annotations


def bag_mean(cell_out, bag_index, n_bags: int, weight=None):
    """Mean of cell predictions within each bag (``bag_index`` gives the bag of each cell).

    With ``weight`` (one per cell of the bags, e.g. the fraction of the cell inside the spot), the weighted mean.
    """
    import torch

    sums = torch.zeros(n_bags, cell_out.shape[1], dtype=cell_out.dtype, device=cell_out.device)
    if weight is None:
        sums.index_add_(0, bag_index, cell_out)
        counts = torch.bincount(bag_index, minlength=n_bags).clamp(min=1).to(cell_out.dtype)
        return sums / counts[:, None]
    weight = weight.to(cell_out.dtype)
    sums.index_add_(0, bag_index, cell_out * weight[:, None])
    total = torch.zeros(n_bags, dtype=cell_out.dtype, device=cell_out.device).index_add_(0, bag_index, weight)
    return sums / total.clamp(min=1e-8)[:, None]
