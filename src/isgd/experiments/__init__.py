"""Experiments over runs: ``isgd compare`` (arms × seeds, paired statistics) and
``isgd batch-study``; and what they train, a :class:`Workload` (your model and data, judged by
a :class:`Metric`)."""

from isgd.training.workload import Metric, Workload

__all__ = ["Metric", "Workload"]
