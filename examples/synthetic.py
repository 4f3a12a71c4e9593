"""The examples' data: 384 vectors labelled by a fixed random teacher, in 12 fixed batches of 32,
batch 5 with noise labels — an under-trained batch for ISGD to work on."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

import isgd

N, BATCH, NOISY = 384, 32, 5


def synthetic_data(seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 64, generator=g)
    y = (x @ torch.randn(64, 10, generator=g)).argmax(1)
    noisy = isgd.FixedCycleBatchSampler(N, BATCH, seed=0).batch(NOISY)
    y[noisy] = torch.randint(0, 10, (len(noisy),), generator=g)
    return TensorDataset(x, y)
