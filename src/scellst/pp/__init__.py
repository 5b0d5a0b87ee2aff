"""Preprocessing: nucleus segmentation, cell-to-spot assignment, Visium HD bins, gene filters and gene selection."""

from ._assign import assign_cells, spot_overlaps
from ._bins import bins_to_cells
from ._genes import gene_filter, select_genes
from ._segment import segment_nuclei

__all__ = ["assign_cells", "bins_to_cells", "gene_filter", "segment_nuclei", "select_genes", "spot_overlaps"]
