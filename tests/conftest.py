"""Shared fixtures: a tiny, learnable IDX data set in the real file format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from isgd import FixedCycleBatchSampler
from tests.fixtures import write_idx_dir


@pytest.fixture(scope="session", autouse=True)
def one_intra_op_thread():
    """The tests' models are tiny: one intra-op thread. Two threads on a loaded 2-core machine
    wait on each other at every operator (the lockstep cases took 47 s with two threads and 3 s
    with one, under the same load); code under test that sets its own thread count restores
    this one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = dict(n_train=240, n_test=60, batch=16, size=8, noisy_batch=3)


@pytest.fixture(scope="session")
def tiny_idx_dir(tmp_path_factory) -> Path:
    """8×8 images in 10 classes labelled by a fixed random teacher (so an MLP learns them);
    fixed batch 3 of the seed-0 cycle at batch size 16 gets noise labels, so ISGD triggers."""
    n_train, n_test, size = TINY["n_train"], TINY["n_test"], TINY["size"]
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(size * size, 10))

    def make(n):
        x = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        y = ((x.reshape(n, -1) / 255.0 - 0.5) @ teacher).argmax(1).astype(np.uint8)
        return x, y

    x, y = make(n_train)
    noisy = FixedCycleBatchSampler(n_train, TINY["batch"], seed=0).batch(TINY["noisy_batch"])
    y[noisy] = rng.integers(0, 10, len(noisy))
    xt, yt = make(n_test)
    directory = tmp_path_factory.mktemp("tiny-idx")
    write_idx_dir(
        directory,
        {
            "train-images-idx3-ubyte": x,
            "train-labels-idx1-ubyte": y,
            "t10k-images-idx3-ubyte": xt,
            "t10k-labels-idx1-ubyte": yt,
        },
        gz=True,
    )
    return directory


def tiny_train_argv(idx_dir: Path, out: Path, *extra: str) -> list[str]:
    """``isgd train`` on the tiny data set with an MLP, 1 thread, no progress bar, no TensorBoard;
    ``extra`` flags come last, so they override these."""
    return [
        *f"train --dataset idx:{idx_dir} --model mlp --batch-size {TINY['batch']}".split(),
        *("--lr", "0.05", "--lr-policy", "fixed", "--threads", "1"),
        *("--no-progress", "--no-tensorboard"),
        *("--out", str(out), *extra),
    ]
