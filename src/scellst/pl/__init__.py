"""Plotting, built on spatialdata-plot and matplotlib."""

from ._cells import correlations, gallery, xenium_comparison
from ._expression import expression

__all__ = ["correlations", "expression", "gallery", "xenium_comparison"]
