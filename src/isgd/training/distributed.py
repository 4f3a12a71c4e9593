r"""Data-parallel ISGD on ``torch.distributed``: process groups, uneven shares, the distributed
fixed-cycle sampler, collective agreement and failure reporting.

Synchronous data parallelism (docs/algorithm.md). Every global fixed batch of ``B`` samples is
split across the ``W`` ranks, rank ``r`` taking ``n_r`` of them (``Σ n_r = B``; even, or by
*shares* for heterogeneous workers). Rank ``r`` back-propagates

.. math::  L_r = \frac{W}{B} \sum_{i \in r} \ell_i

and DistributedDataParallel averages the gradients over the ``W`` ranks, so every rank applies
:math:`\frac{1}{B}\sum_i \nabla\ell_i`, the full-batch mean gradient, whatever the split. The loss
the control chart sees is the global mean :math:`\psi = \frac{1}{B}\,\mathrm{allreduce}(\sum_{i
\in r} \ell_i)`: an all-reduce gives every rank the same bytes, so every rank holds the same
window, takes the same decision and runs the same number of extra iterations — whose collectives
therefore stay matched. The batch sequence comes from one :class:`FixedCycleBatchSampler` over the
global batch, so batch identity does not depend on the number of processes.
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import io
import logging
import math
import os
import pickle
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from isgd.errors import DistributedError, RunError
from isgd.sampler import DistributedFixedCycleBatchSampler, rank_rows, split_sizes

__all__ = [  # the sampler and the split live in the library (isgd.sampler), re-exported here
    "DistContext",
    "DistributedError",
    "DistributedFixedCycleBatchSampler",
    "init_from_env",
    "parse_shares",
    "rank_rows",
    "split_sizes",
]

log = logging.getLogger("isgd.training.distributed")

DEFAULT_TIMEOUT = 300.0  # seconds a collective may wait for the other ranks


# ---------------------------------------------------------------------- shares and the split
def parse_shares(text: str | Sequence[float] | None, world_size: int | None = None):
    """``"3,1"`` → ``[3.0, 1.0]``; ``""``/``None`` → ``None`` (even); ``"auto"`` → ``"auto"``.

    Shares are relative speeds, one positive number per rank; ``world_size`` (when known) must
    match their count.
    """
    if text is None or (isinstance(text, str) and text.strip() in ("", "even")):
        return None
    if isinstance(text, str) and text.strip() == "auto":
        return "auto"
    try:
        if isinstance(text, str):
            values = [float(v) for v in text.split(",")]
        else:
            values = [float(v) for v in text]
    except ValueError:
        values = []
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise ValueError(
            f"Invalid shares: {text!r} (comma-separated positive numbers, one per process, "
            "e.g. 3,1; or auto)"
        )
    if world_size is not None and len(values) != world_size:
        raise ValueError(
            f"Invalid shares: {text!r} names {len(values)} process{'es' * (len(values) != 1)}, "
            f"but the job has {world_size}"
        )
    return values


# ---------------------------------------------------------------------- the process group
@dataclass
class DistContext:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device  # where this rank's collectives on tensors run best
    timeout: float

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when not launched by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_from_env(timeout: float = DEFAULT_TIMEOUT) -> DistContext | None:
    """Join the process group that torchrun's environment describes (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); ``None`` when it describes one process.

    gloo carries CPU tensors; where CUDA is available the group is ``cpu:gloo,cuda:nccl`` (NCCL
    for GPU tensors) and this rank's current GPU is ``LOCAL_RANK``. Every collective fails after
    ``timeout`` seconds without the other ranks (a dead peer is usually noticed at once: its
    sockets close).
    """
    world_size = env_world_size()
    if world_size <= 1:
        return None
    if not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"Invalid dist_timeout: {timeout!r} (seconds, must be > 0)")
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise DistributedError(
            f"WORLD_SIZE is {world_size} but RANK is missing or not a number; launch with "
            "torchrun (or isgd train --nproc N)"
        ) from None
    backend, device = "gloo", torch.device("cpu")
    if torch.cuda.is_available() and local_rank < torch.cuda.device_count():
        torch.cuda.set_device(local_rank)
        backend, device = "cpu:gloo,cuda:nccl", torch.device("cuda", local_rank)
    try:
        dist.init_process_group(
            backend,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
    except (RuntimeError, ValueError) as err:
        raise DistributedError(
            f"rank {rank} could not join the process group of {world_size} processes "
            f"({first_line(err)}); check MASTER_ADDR/MASTER_PORT or the rendezvous endpoint"
        ) from None
    return DistContext(rank, world_size, local_rank, device, float(timeout))


def shutdown(ctx: DistContext | None, finished: bool = True) -> None:
    """Leave the process group after a barrier when every rank finished (so that none tears its
    connections down while another still uses them). After a failure, leave it as it is: tearing
    down a group whose peer died can block, and the process is about to exit anyway."""
    if ctx is None or not dist.is_initialized() or not finished:
        return
    dist.barrier()
    gc.collect()  # DDP modules left in reference cycles still hold the group: free them first
    dist.destroy_process_group()


def first_line(err: BaseException) -> str:
    """The useful part of a torch/gloo/NCCL error: its first line without the source path."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h)(?::\d+)?\]\s*", "", text)  # "[../pair.cc:537] "
    return text.split(". This is typically")[0][:240]


_COLLECTIVE_FAILURE = re.compile(
    r"gloo|nccl|connection (?:reset|closed|refused)|broken pipe|timed out|timeout|"
    r"process group|socket|peer",
    re.IGNORECASE,
)


def is_collective_failure(err: BaseException) -> bool:
    """True for an error raised by a collective whose peers died, hung or disconnected."""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(err, dist_error):
        return True
    return isinstance(err, RuntimeError) and bool(_COLLECTIVE_FAILURE.search(str(err)))


# ---------------------------------------------------------------------- agreement
def on_main(ctx: DistContext | None, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only and give every rank its result — or its exception, raised on
    every rank (marked ``mirrored`` on the others, so that only rank 0 reports it)."""
    if ctx is None:
        return fn()
    payload: list[Any] = [None, None]
    original: BaseException | None = None
    if ctx.is_main:
        try:
            payload[0] = fn()
        except Exception as err:  # handed to every rank, then raised everywhere
            original = err
            try:
                pickle.dumps(err)
                payload[1] = err
            except Exception:
                payload[1] = RunError(str(err))
    dist.broadcast_object_list(payload, src=0)
    if original is not None:
        raise original
    if payload[1] is not None:
        error = payload[1]
        error.mirrored = True
        raise error
    return payload[0]


def all_gather_object(ctx: DistContext, obj: Any) -> list[Any]:
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def digest(*objects: Any) -> str:
    """A short fingerprint of tensors, state dicts and numbers (via ``torch.save``, CPU)."""
    h = hashlib.blake2b(digest_size=12)
    for obj in objects:
        buffer = io.BytesIO()
        torch.save(_to_cpu(obj), buffer)
        h.update(buffer.getvalue())
    return h.hexdigest()


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def disagreeing_ranks(fingerprints: Sequence[str]) -> list[int]:
    """Ranks whose fingerprint differs from rank 0's."""
    return [r for r, f in enumerate(fingerprints) if f != fingerprints[0]]


def check_identical(ctx: DistContext, fingerprint: str, what: str) -> None:
    """Raise :class:`DistributedError` on every rank unless all ranks hold ``fingerprint``."""
    fingerprints = all_gather_object(ctx, fingerprint)
    differ = disagreeing_ranks(fingerprints)
    ranks = ",".join(map(str, differ))
    if differ:
        raise DistributedError(
            f"the ranks disagree on {what}: rank{'s' * (len(differ) > 1)} "
            f"{ranks} differ{'s' * (len(differ) == 1)} from rank 0 (fingerprints "
            f"{', '.join(fingerprints)}); the data-parallel run is no longer one run — "
            "please report this with the command line"
        )


# ---------------------------------------------------------------------- auto shares
def calibrate_shares(
    ctx: DistContext, step: Callable[[], None], samples: int, steps: int = 5, warmup: int = 2
) -> list[float]:
    """Each rank's speed in samples per second, from ``warmup`` + ``steps`` calls of ``step``
    (one forward and backward on ``samples`` samples), gathered so that every rank holds the same
    list — hence computes the same split."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    times.sort()
    speed = samples / max(times[len(times) // 2], 1e-9)  # median
    return [float(s) for s in all_gather_object(ctx, speed)]


def sizes_from_speeds(batch_size: int, speeds: Sequence[float]) -> list[int]:
    """The split for measured speeds (proportional); a rank too slow for one sample still gets
    one, taken from the largest share."""
    weights = [max(float(s), 1e-12) for s in speeds]
    try:
        return split_sizes(batch_size, weights, len(weights))
    except ValueError:
        if batch_size < len(weights):
            raise
    total = sum(weights)
    sizes = [max(1, math.floor(batch_size * w / total)) for w in weights]
    while sum(sizes) > batch_size:
        sizes[max(range(len(sizes)), key=lambda r: sizes[r])] -= 1
    sizes[max(range(len(sizes)), key=lambda r: weights[r])] += batch_size - sum(sizes)
    return sizes
