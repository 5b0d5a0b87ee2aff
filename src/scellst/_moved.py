"""Names that moved to another namespace keep working from the old one, with a FutureWarning (deprecate, don't break)."""

from __future__ import annotations

import importlib
import warnings
from typing import Any

MOVED = {
    "pp": {"segment_nuclei": "im"},
    "tl": {
        **dict.fromkeys(
            (
                "CellCrops",
                "StainNormalizer",
                "cell_crops",
                "embed_cells",
                "neighbourhood_features",
                "registration_shifts",
                "segmentation_tiles",
                "self_train_segmenter",
                "shape_features",
                "train_segmenter",
                "train_ssl",
            ),
            "im",
        ),
        **dict.fromkeys(
            (
                "SimulatedSpots",
                "benchmark_simulation",
                "compare_xenium",
                "cross_validate",
                "evaluate",
                "evaluate_segmentation",
                "match_cells",
                "metrics_per_gene",
                "simulate_spots",
            ),
            "bench",
        ),
    },
}


def moved_attribute(namespace: str, name: str) -> Any:
    """The object ``scellst.{namespace}.{name}`` now found in its new namespace, with a FutureWarning."""
    target = MOVED.get(namespace, {}).get(name)
    if target is None:
        raise AttributeError(f"module 'scellst.{namespace}' has no attribute {name!r}")
    warnings.warn(
        f"`scellst.{namespace}.{name}` moved to `scellst.{target}.{name}`; the old name will be removed in a "
        "future release.",
        FutureWarning,
        stacklevel=3,
    )
    return getattr(importlib.import_module(f"scellst.{target}"), name)
