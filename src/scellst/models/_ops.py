"""Small torch operations shared by the networks and the learner (no imports of other scellst modules)."""

from __future__ import annotations


def bag_mean(cell_out, bag_index, n_bags: int):
    """Mean of cell predictions within each bag (``bag_index`` gives the bag of each cell)."""
    import torch

    sums = torch.zeros(n_bags, cell_out.shape[1], dtype=cell_out.dtype, device=cell_out.device)
    sums.index_add_(0, bag_index, cell_out)
    counts = torch.bincount(bag_index, minlength=n_bags).clamp(min=1).to(cell_out.dtype)
    return sums / counts[:, None]
