"""Untimed evaluation on the test split: the workload's loss and metric, and for a classifier
its accuracy and balanced accuracy.

An evaluation is a vector of sums (:func:`evaluate_sums`), so that data-parallel ranks each sum
their shard and one all-reduce makes the whole split's figures (:meth:`Evaluation.from_sums`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from isgd.training.workload import Workload, iter_batches

__all__ = ["Evaluation", "evaluate", "evaluate_sums"]


@dataclass
class Evaluation:
    """Test loss and metric (the means over the test samples); for a classifier (metric
    accuracy) also accuracy and balanced accuracy (the mean of the per-class recalls, over the
    classes present in the test set)."""

    loss: float
    metric: float
    accuracy: float | None = None
    balanced_accuracy: float | None = None

    @classmethod
    def from_sums(cls, sums: Tensor, num_classes: int | None = None) -> Evaluation:
        """From :func:`evaluate_sums`' vector ``[n, Σ loss, Σ metric, hits per class (K),
        samples per class (K)]``; ``num_classes`` K (``None``: not a classifier)."""
        n = max(float(sums[0]), 1.0)
        loss, metric = float(sums[1]) / n, float(sums[2]) / n
        if num_classes is None:
            return cls(loss, metric)
        correct = sums[3 : 3 + num_classes].round().long()
        count = sums[3 + num_classes :].round().long()
        present = count > 0
        recall = correct[present].double() / count[present].double()
        accuracy = int(correct.sum()) / max(int(count.sum()), 1)  # exactly hits / samples
        return cls(loss, accuracy, accuracy, float(recall.mean()) if len(recall) else math.nan)


@torch.no_grad()
def evaluate_sums(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    workload: Workload,
    device: torch.device,
) -> Tensor:
    """The float64 sums of :meth:`Evaluation.from_sums` of ``model`` (in eval mode) over
    ``batches``: each batch's mean loss and metric weighted by its samples; for a classifier
    the hits and samples per class."""
    was_training = model.training
    model.eval()
    k = workload.num_classes if workload.is_classification else None
    metric = workload.judged_by
    sums = torch.zeros(3 + 2 * (k or 0), dtype=torch.float64)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        output = model(x)
        n = len(y)
        sums[0] += n
        sums[1] += float(workload.loss(output, y)) * n
        if k is None:
            sums[2] += float(metric.fn(output, y)) * n
            continue
        hit = (output.argmax(1) == y).cpu()
        labels = y.cpu()
        sums[2] += int(hit.sum())
        sums[3 : 3 + k] += torch.bincount(labels[hit], minlength=k)[:k]
        sums[3 + k :] += torch.bincount(labels, minlength=k)[:k]
    model.train(was_training)
    return sums


def evaluate(
    model: nn.Module,
    workload: Workload,
    dataset: Dataset[Any],
    batch_size: int,
    device: torch.device,
    shard: tuple[int, int] | None = None,
) -> Evaluation:
    """:class:`Evaluation` of ``model`` on ``dataset`` (``workload.test`` or a validation
    split; or its samples ``shard`` = ``(lo, hi)``), in batches of ``batch_size``."""
    lo, hi = shard or (0, len(dataset))  # type: ignore[arg-type]
    sums = evaluate_sums(model, iter_batches(dataset, lo, hi, batch_size), workload, device)
    return Evaluation.from_sums(sums, workload.num_classes if workload.is_classification else None)
