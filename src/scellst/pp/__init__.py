"""Preprocessing: nucleus segmentation, cell-to-spot assignment, gene filters and gene selection."""

from ._assign import assign_cells
from ._genes import gene_filter, select_genes
from ._segment import segment_nuclei

__all__ = ["assign_cells", "gene_filter", "segment_nuclei", "select_genes"]
