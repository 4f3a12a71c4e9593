"""How run directories name the metric they are judged by.

A run writes ``test/metric`` (``val/metric`` with a validation split) at each evaluation and
``metric/name``, ``metric/higher_is_better`` in its summary; runs written before workloads named
their metric have ``test/accuracy`` alone and read as accuracy, higher is better. Shared by the
records (:mod:`isgd.experiments.records`), the reports and the figures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["PERCENT_METRICS", "label", "metric_key", "metric_of"]

from isgd.training.workload import PERCENT_METRICS


def metric_key(metrics: Sequence[Mapping[str, Any]]) -> str:
    """The evaluations' metric key: ``val/metric`` in a run with a validation split (its
    evaluations read it; the test split is read once, for the summary), else ``test/metric``,
    or ``test/accuracy`` in runs written before workloads named their own metric."""
    for key in ("val/metric", "test/metric"):
        if any(key in m for m in metrics):
            return key
    return "test/accuracy"


def metric_of(summary: Mapping[str, Any]) -> tuple[str, bool]:
    """The run's metric name and direction; a summary without them is accuracy, higher is
    better."""
    name = str(summary.get("metric/name", "accuracy"))
    return name, bool(summary.get("metric/higher_is_better", True))


def label(metric: str) -> str:
    """The metric's name in prose: ``bits_per_char`` → ``bits per char``."""
    return metric.replace("_", " ")
