"""Benchmarking: spot- and cell-level evaluation, cross-validation, simulation, Xenium comparison, segmentation scores."""

from ..im._segmentation_metrics import evaluate_segmentation
from ._evaluate import cross_validate, evaluate
from ._metrics import metrics_per_gene
from ._simulation import SimulatedSpots, benchmark_simulation, simulate_spots
from ._xenium import compare_xenium, match_cells

__all__ = [
    "SimulatedSpots",
    "benchmark_simulation",
    "compare_xenium",
    "cross_validate",
    "evaluate",
    "evaluate_segmentation",
    "match_cells",
    "metrics_per_gene",
    "simulate_spots",
]
