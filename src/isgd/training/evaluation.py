"""Untimed evaluation on the test split: loss, accuracy and balanced accuracy."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["Evaluation", "Prepare", "evaluate", "evaluate_sums"]

Prepare = Callable[[Tensor], Tensor]  # a uint8 batch → the network's input on its device


@dataclass
class Evaluation:
    """Test loss, accuracy and balanced accuracy (the mean of the per-class recalls, over the
    classes present in the test set)."""

    loss: float
    accuracy: float
    balanced_accuracy: float

    @classmethod
    def from_sums(cls, loss_sum: float, correct: Tensor, count: Tensor) -> Evaluation:
        """From the summed loss and per-class correct/total counts (:func:`evaluate_sums`)."""
        n = int(count.sum())
        present = count > 0
        recall = correct[present].double() / count[present].double()
        return cls(
            loss_sum / max(n, 1),
            int(correct.sum()) / max(n, 1),
            float(recall.mean()) if len(recall) else math.nan,
        )


@torch.no_grad()
def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, batch_size: int, prepare: Prepare | None = None
) -> Evaluation:
    """Mean cross-entropy, accuracy and balanced accuracy of ``model`` on ``x`` (eval mode);
    ``prepare`` turns each batch of ``x`` into the network's input (default: ``x`` already is)."""
    return Evaluation.from_sums(*evaluate_sums(model, x, y, batch_size, prepare))


@torch.no_grad()
def evaluate_sums(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_size: int,
    prepare: Prepare | None = None,
    num_classes: int | None = None,
) -> tuple[float, Tensor, Tensor]:
    """Summed cross-entropy and, per class, correct predictions and samples on ``x`` (eval
    mode; int64 tensors of ``num_classes``, default the model's output width)."""
    was_training = model.training
    model.eval()
    loss_sum = 0.0
    correct = count = None
    for start in range(0, len(x), batch_size):
        batch = x[start : start + batch_size]
        logits = model(batch if prepare is None else prepare(batch))
        target = y[start : start + batch_size]
        k = num_classes or logits.shape[1]
        if correct is None or count is None:
            correct = torch.zeros(k, dtype=torch.int64)
            count = torch.zeros(k, dtype=torch.int64)
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        hit = (logits.argmax(1) == target).cpu()
        count += torch.bincount(target.cpu(), minlength=k)
        correct += torch.bincount(target.cpu()[hit], minlength=k)
    model.train(was_training)
    if correct is None or count is None:
        k = num_classes or 0
        correct, count = torch.zeros(k, dtype=torch.int64), torch.zeros(k, dtype=torch.int64)
    return loss_sum, correct, count
