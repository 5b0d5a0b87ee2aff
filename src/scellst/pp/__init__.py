"""Preprocessing: nucleus segmentation and cell-to-spot assignment."""

from ._assign import assign_cells
from ._segment import segment_nuclei

__all__ = ["assign_cells", "segment_nuclei"]
