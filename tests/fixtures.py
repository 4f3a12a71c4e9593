"""Small data set files written in the real on-disk formats (IDX, CIFAR-10 python and binary)."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
import sys
from pathlib import Path
from typing import NoReturn

import numpy as np

IDX_CODES = {"uint8": 0x08, "int8": 0x09, "int16": 0x0B, "int32": 0x0C, "float32": 0x0D}
IDX_CODES["float64"] = 0x0E


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of ``array``: magic (0, 0, dtype code, ndim), big-endian dims, data."""
    header = bytes([0, 0, IDX_CODES[array.dtype.name], array.ndim])
    dims = struct.pack(f">{array.ndim}I", *array.shape)
    return header + dims + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def mnist_like(n_train: int = 24, n_test: int = 10, size: int = 8, seed: int = 0) -> dict:
    """Random uint8 images and labels 0..9 under the four standard IDX names."""
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10)[::-1].astype(np.uint8),
    }


def write_idx_dir(
    directory: Path, arrays: dict, *, gz: bool = False, dotted: bool = False
) -> dict[str, str]:
    """Write ``arrays`` as IDX files; return name → md5 of the uncompressed bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    sums = {}
    for name, array in arrays.items():
        filename = name.replace("-idx", ".idx") if dotted else name
        write_idx(directory / (filename + (".gz" if gz else "")), array, gz=gz)
        sums[name] = md5(idx_bytes(array))
    return sums


CIFAR_NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def cifar_like(n_per_batch: int = 3, seed: int = 0) -> list[tuple[np.ndarray, list[int]]]:
    rng = np.random.default_rng(seed)
    return [
        (
            rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
            [(i + j) % 10 for j in range(n_per_batch)],
        )
        for i in range(len(CIFAR_NAMES))
    ]


def write_cifar_python(directory: Path, batches: list[tuple[np.ndarray, list[int]]]) -> None:
    """Pickled dicts with bytes keys, protocol 2, as in cifar-10-batches-py."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, (data, labels) in zip(CIFAR_NAMES, batches, strict=True):
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img_{j}.png".encode() for j in range(len(labels))],
        }
        with open(directory / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)


def write_cifar_binary(directory: Path, batches: list[tuple[np.ndarray, list[int]]]) -> None:
    """Records of 1 label byte + 3072 pixel bytes, as in cifar-10-batches-bin."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, (data, labels) in zip(CIFAR_NAMES, batches, strict=True):
        records = np.concatenate([np.array(labels, dtype=np.uint8)[:, None], data], axis=1)
        (directory / f"{name}.bin").write_bytes(records.tobytes())


def leave_rank() -> NoReturn:
    """End a forked or spawned rank once its work is saved. gloo's threads can abort the
    interpreter's teardown (SIGABRT, "terminate called without an active exception"), as
    isgd/__main__.py knows: flush and leave at once."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def join_gloo(rank: int, world: int, init: str, timeout: float = 30) -> None:
    """A forked rank joins the gloo group on the loopback interface, with one intra-op thread (a
    forked child must not enter the parent's OpenMP pool)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=timeout)
    )


def run_two_ranks(worker, out: Path, timeout: float) -> list[dict]:
    """Fork 2 gloo ranks of ``worker(rank, world_size, init_method, out)`` and return what each
    wrote to ``out/rank{r}.json``; skipped off Linux (gloo on the loopback interface ``lo``).
    Fork, not spawn: no second import of torch per rank (seconds)."""
    import json
    import time

    import pytest
    import torch.multiprocessing as mp

    if not sys.platform.startswith("linux"):
        pytest.skip("gloo on the loopback interface 'lo' (Linux)")
    init = f"file://{out / 'rendezvous'}"
    ranks = mp.start_processes(
        worker, args=(2, init, str(out)), nprocs=2, join=False, start_method="fork"
    )
    deadline = time.monotonic() + timeout
    while not ranks.join(timeout=1):  # raises if a rank failed
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"the 2 ranks did not finish within {timeout:g} s")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
