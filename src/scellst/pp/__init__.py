"""Preprocessing: cell-to-spot assignment (bags), Visium HD bins, gene filters and gene selection."""

from typing import Any

from ._assign import assign_cells, spot_overlaps
from ._bins import bins_to_cells
from ._genes import gene_filter, lognorm, select_genes

__all__ = ["assign_cells", "bins_to_cells", "gene_filter", "lognorm", "select_genes", "spot_overlaps"]


def __getattr__(name: str) -> Any:  # names that moved to scellst.im (segment_nuclei)
    from .._moved import moved_attribute

    return moved_attribute("pp", name)
