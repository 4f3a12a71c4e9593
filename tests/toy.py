"""Two small models and a fixed-cycle data set whose noisy-label batches make ISGD trigger.

``mlp`` (≈1.2k weights, milliseconds a step) carries the fast numerics tests; ``small_cnn`` (a
convolution, as the paper's models) carries one end-to-end case per property in the slow set.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

N_BATCHES = 12
BATCH = 16
NOISY_BATCHES = (3,)  # labels are pure noise: its loss stays above the others


def small_cnn(seed: int = 0, batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(1, 6, 3)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(6))
    layers += [nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 3 * 3, 10)]
    return nn.Sequential(*layers)


def mlp(seed: int = 0, batchnorm: bool = False) -> nn.Module:
    """8×8 → 16 hidden → 10 classes; ``batchnorm`` puts a BatchNorm1d after the hidden layer."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(64, 16)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.ReLU(), nn.Linear(16, 10)]
    return nn.Sequential(*layers)


MODELS = {"mlp": mlp, "cnn": small_cnn}


def batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``N_BATCHES`` fixed batches of 8×8 images; labels from a fixed random teacher, except the
    ``NOISY_BATCHES`` whose labels are random."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(64, 10, generator=g)
    data = []
    for j in range(N_BATCHES):
        x = torch.randn(BATCH, 1, 8, 8, generator=g)
        y = (x.flatten(1) @ teacher).argmax(1)
        if j in NOISY_BATCHES:
            y = torch.randint(0, 10, (BATCH,), generator=g)
        data.append((x, y))
    return data


def make_closure(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, zero_grad: Callable[[], None], log=None
) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if log is not None:
            log.append(loss.item())
        return loss

    return closure


def scaled_closure(model, opt, x, y, scaler, poison=None, gradient=None):
    """The AMP closure: back-propagates ``scaler.scale(loss)``; ``poison(call)`` True puts an inf
    into the gradients of that call (counted per step from 1), after backward (so after DDP's
    all-reduce): into ``gradient(model)``, by default the first parameter's gradient."""
    calls = 0

    def closure():
        nonlocal calls
        calls += 1
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if poison is not None and poison(calls):
            grad = gradient(model) if gradient else next(model.parameters()).grad
            grad.view(-1)[0] = math.inf
        return loss

    return closure
