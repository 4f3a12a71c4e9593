"""A workload of your own: a GRU that forecasts the next value of a time series.

Not an image model and not a classifier: the loss is the mean squared error and so is the metric
(lower is better). Train it, or compare ISGD with SGD on it, with::

    isgd train --workload examples/forecast_workload.py:workload --iters 2000 --lr 0.05
    isgd compare --workload examples/forecast_workload.py:workload --target 0.05 \\
        --iters 2000 --lr 0.05 --seeds 5

``workload(seed)`` is all isgd needs: it returns the model, the training and test sets as
map-style data sets of ``(input, target)`` pairs, the loss and the metric. The seed is set
before it is called (the model's initialisation follows it); the data here are the same for every
seed, so that seeds differ in initialisation and batch order only, as for the built-in presets.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from isgd.experiments import Metric, Workload

WINDOW = 24  # past values the model sees
SERIES, LENGTH = 32, 200  # series in the data set, values per series


def sine_mixtures(generator: torch.Generator) -> Tensor:
    """``SERIES`` series of ``LENGTH`` values: two sines of random period and phase, noise."""
    t = torch.arange(LENGTH, dtype=torch.float32)
    period = 8 + 40 * torch.rand(SERIES, 2, 1, generator=generator)
    phase = 2 * math.pi * torch.rand(SERIES, 2, 1, generator=generator)
    amplitude = 0.5 + torch.rand(SERIES, 2, 1, generator=generator)
    waves = (amplitude * torch.sin(2 * math.pi * t / period + phase)).sum(1)
    return waves + 0.1 * torch.randn(SERIES, LENGTH, generator=generator)


def windows(series: Tensor) -> TensorDataset:
    """Every ``WINDOW`` consecutive values (input, ``WINDOW × 1``) and the value after them."""
    x = series.unfold(1, WINDOW + 1, 1).reshape(-1, WINDOW + 1)
    return TensorDataset(x[:, :WINDOW, None], x[:, WINDOW:])


class Forecaster(nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.gru = nn.GRU(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.gru(x)
        return self.head(out[:, -1])


def workload(seed: int) -> Workload:
    data = sine_mixtures(torch.Generator().manual_seed(1234))  # the same data for every seed
    split = LENGTH * 3 // 4  # the last quarter of every series is the test split
    return Workload(
        model=Forecaster(),
        train=windows(data[:, :split]),
        test=windows(data[:, split - WINDOW :]),
        loss=F.mse_loss,
        metric=Metric("mse", F.mse_loss, higher_is_better=False),
    )
