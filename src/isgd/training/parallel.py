"""The data-parallel parts of :class:`isgd.training.train.Trainer`: the batch split, DDP, the
test shards, the agreed stop and the one-line report of a failed collective.

Each rank trains its share of every global batch under DistributedDataParallel; ISGD's own
all-reduce (:class:`isgd.collective.LossSync`, weighted by the ranks' sample counts) makes every
decision alike and carries the ranks' stop votes, by which :func:`agreed_stop` makes every rank
stop at the same step boundary.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from isgd.batchnorm import frozen_batchnorm_stats
from isgd.training import distributed
from isgd.training.config import ConfigError, TrainConfig
from isgd.training.distributed import DistContext, DistributedError
from isgd.training.evaluation import Evaluation, evaluate_sums
from isgd.training.signals import StopSignals, resume_hint
from isgd.training.workload import collate, iter_batches

if TYPE_CHECKING:
    from isgd.training.train import Trainer

__all__ = ["agreed_stop", "calibrate", "collective_error", "device_for", "evaluate_shards", "setup"]

log = logging.getLogger(__name__)


def device_for(config: TrainConfig, dist: DistContext | None) -> torch.device:
    """``config.device``; under ``dist`` on CUDA, GPU ``LOCAL_RANK``."""
    if config.device != "cuda":
        return torch.device("cpu")
    index = dist.local_rank if dist is not None else None
    if not torch.cuda.is_available() or (index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"invalid device: 'cuda' (this machine has {torch.cuda.device_count()} CUDA "
            f"device(s){'' if index is None else f'; this process needs GPU {index}'})"
        )
    return torch.device("cuda", torch.cuda.current_device() if index is None else index)


def setup(trainer: Trainer, shares: Any, sizes: list[int] | None) -> None:
    """Split the global batch (even, by shares, or by measured speed), wrap the model in
    DistributedDataParallel."""
    d, cfg = _ctx(trainer), trainer.config
    if cfg.lower_quantile > 0:
        raise ConfigError(
            "invalid lower_quantile: the forward-only variant runs in one process only "
            "(a DDP forward without its backward is not supported here); drop --nproc or "
            "set lower_quantile = 0"
        )
    if sizes is None:
        shares = distributed.parse_shares(shares, d.world_size)
        if shares == "auto":
            shares = calibrate(trainer)
        sizes = distributed.split_sizes(cfg.batch_size, shares, d.world_size)
    if len(sizes) != d.world_size or sum(sizes) != cfg.batch_size:
        raise ConfigError(
            f"invalid batch split {sizes} for {d.world_size} processes and a global batch of "
            f"{cfg.batch_size}"
        )
    sampler = distributed.DistributedFixedCycleBatchSampler(
        len(trainer.workload.train),  # type: ignore[arg-type]
        cfg.batch_size,
        num_replicas=d.world_size,
        rank=d.rank,
        shares=sizes,
        seed=cfg.seed,
        reshuffle=cfg.reshuffle,
    )
    trainer.sampler = sampler
    trainer.sizes, trainer.rows = sampler.sizes, sampler.rows
    # DDP averages gradients over the W ranks: backward on (W/B)·Σ_local ℓ gives each rank
    # the full-batch mean gradient (1/B)·Σ_all ∇ℓ whatever the split; ISGD judges the
    # ranks' mean losses weighted by their sample counts, Σ_r n_r·ψ_r / B = ψ of the batch.
    trainer._loss_scale = d.world_size / cfg.batch_size
    trainer._weight = float(sampler.local_batch_size)
    device_ids = [trainer.device.index] if trainer.device.type == "cuda" else None
    trainer.net = nn.parallel.DistributedDataParallel(trainer.model, device_ids=device_ids)
    if hasattr(trainer.workload.train, "within"):  # augmentation draws for the global batch
        trainer.workload.train.within = (cfg.batch_size, trainer.rows)
    if d.is_main:
        log.info(
            "data parallel: %d processes, global batch %d split %s",
            d.world_size,
            cfg.batch_size,
            ",".join(map(str, trainer.sizes)),
        )


def _ctx(trainer: Trainer) -> DistContext:
    """The process group of a data-parallel trainer (only called on that path)."""
    if trainer.dist is None:
        raise RuntimeError("not a data-parallel trainer")
    return trainer.dist


def calibrate(trainer: Trainer) -> list[int]:
    """``shares = auto``: every rank times forward+backward passes on an even share of the
    first batch, leaving weights, gradients, BatchNorm statistics and RNG as they were."""
    d, cfg = _ctx(trainer), trainer.config
    even = distributed.split_sizes(cfg.batch_size, None, d.world_size)
    rows = distributed.rank_rows(even, d.rank)
    idx = trainer.sampler.epoch_batches(0)[0][rows]
    train: Any = trainer.workload.train
    data_state = copy.deepcopy(train.state_dict()) if hasattr(train, "state_dict") else None
    x, y = collate(train, idx)
    if data_state is not None:  # the draws of an augmentation are the run's, not this probe's
        train.load_state_dict(data_state)
    x, y = x.to(trainer.device), y.to(trainer.device)
    devices = [trainer.device] if trainer.device.type == "cuda" else []

    def step() -> None:
        trainer.model.zero_grad(set_to_none=True)
        trainer.workload.loss(trainer.model(x), y).backward()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)

    with torch.random.fork_rng(devices=devices), frozen_batchnorm_stats():
        speeds = distributed.calibrate_shares(d, step, len(idx))
    trainer.model.zero_grad(set_to_none=True)
    if d.is_main:
        log.info(
            "shares = auto: measured %s samples/s per rank",
            ", ".join(f"{s:,.0f}" for s in speeds),
        )
    return distributed.sizes_from_speeds(cfg.batch_size, speeds)


def agreed_stop(trainer: Trainer, signals: StopSignals) -> int | None:
    """The stop request to honour now: this process's, or under data parallelism the one
    every rank agrees on. Those votes rode the last step's loss all-reduce (no collective of
    their own: :meth:`isgd.collective.LossSync.carry`), so a signal that comes after that
    step's regular pass is honoured one step later, on every rank alike."""
    if trainer.dist is None:
        return signals.signum
    votes = trainer.optimizer.sync.carried
    return None if votes is None else signals.from_votes(votes)


def collective_error(trainer: Trainer, err: BaseException) -> DistributedError:
    """One line for a failed collective: who, where, the cause, what is kept, what to do."""
    d, st = _ctx(trainer), trainer.state
    if trainer.is_main:
        last = trainer._last_checkpoint()
        kept = f"the last checkpoint is {last}" if last else "there is no checkpoint yet"
    else:
        kept = f"rank 0 keeps the checkpoints in {trainer.run_dir / 'checkpoints'}"
    return DistributedError(
        f"rank {d.rank} of {d.world_size}: another rank died or stopped responding after "
        f"iteration {st.iteration} (process group error: {distributed.first_line(err)}); "
        f"{kept}; resume with: {resume_hint(trainer.run_dir, d.world_size)}"
    )


def evaluate_shards(trainer: Trainer, dataset: Any) -> Evaluation:
    """Each rank evaluates its shard of ``dataset`` with rank 0's BatchNorm statistics; the
    sums are all-reduced."""
    workload = trainer.workload
    for buffer in trainer.model.buffers():  # DDP syncs them at forward start, not after
        torch.distributed.broadcast(buffer, 0)
    d, n = _ctx(trainer), len(dataset)
    lo, hi = d.rank * n // d.world_size, (d.rank + 1) * n // d.world_size  # this rank's shard
    batches = iter_batches(dataset, lo, hi, trainer.config.eval_batch_size)
    sums = evaluate_sums(trainer.model, batches, workload, trainer.device).to(trainer.device)
    torch.distributed.all_reduce(sums)
    k = workload.num_classes if workload.is_classification else None
    return Evaluation.from_sums(sums.cpu(), k)
