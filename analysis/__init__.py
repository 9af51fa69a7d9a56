"""sinkscope analysis: load a run, score it with metrics, paired statistics, tables, plots, report.

Importing this package is cheap (pandas/pyarrow only); torch and the metric libraries are
imported when a metric is built. See docs/analysis.md.
"""

from __future__ import annotations

from typing import Any

from .run import RunData, RunDirError, baseline_arm, load_run
from .weights import MissingWeightsError

__all__ = [
    "MissingWeightsError",
    "RunData",
    "RunDirError",
    "baseline_arm",
    "build_report",
    "compute_metrics",
    "fid_calibration",
    "load_run",
    "write_summary",
]


def compute_metrics(*args: Any, **kwargs: Any):
    """See :func:`analysis.metrics.compute.compute_metrics`."""
    from .metrics.compute import compute_metrics as _impl

    return _impl(*args, **kwargs)


def write_summary(*args: Any, **kwargs: Any):
    """See :func:`analysis.report.write_summary`."""
    from .report import write_summary as _impl

    return _impl(*args, **kwargs)


def build_report(*args: Any, **kwargs: Any):
    """See :func:`analysis.report.build_report`."""
    from .report import build_report as _impl

    return _impl(*args, **kwargs)


def fid_calibration(*args: Any, **kwargs: Any):
    """See :func:`analysis.metrics.fid_shift.fid_calibration`."""
    from .metrics.fid_shift import fid_calibration as _impl

    return _impl(*args, **kwargs)
