"""Metric registry and the job entry point that scores a run (see docs/analysis.md)."""

from .base import Metric, UnknownMetricError, available, get_metric_class, metric_info, register
from .compute import compute_metrics

__all__ = [
    "Metric",
    "UnknownMetricError",
    "available",
    "compute_metrics",
    "get_metric_class",
    "metric_info",
    "register",
]
