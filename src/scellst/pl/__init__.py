"""Plotting, built on spatialdata-plot."""

from ._expression import expression

__all__ = ["expression"]
