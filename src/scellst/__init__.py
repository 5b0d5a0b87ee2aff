"""scellst: single-cell gene expression from H&E histology, trained on spot transcriptomics, inside SpatialData."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("scellst")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

from . import bench, datasets, im, io, models, pl, pp, tl

__all__ = ["__version__", "bench", "datasets", "im", "io", "models", "pl", "pp", "tl"]
