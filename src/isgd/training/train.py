"""The training loop behind ``isgd train``: timing, untimed evaluation, checkpoints, metrics.

Data sets are held in memory as tensors; batches come from :class:`FixedCycleBatchSampler` and are
gathered by index. Only training steps are timed (``time/train_seconds``); evaluation, checkpoints
and log writes happen outside the clock. A run resumed from its last checkpoint ends with the same
``model.pt`` as an uninterrupted one (CPU; same threads).

SIGINT and SIGTERM stop the loop at the next step boundary with a checkpoint
(:class:`TrainingInterrupted`); a non-finite loss stops the run before the update is applied
(:class:`NonFiniteError`, the last good checkpoint kept) or, with ``on_nonfinite = "skip"``, skips
that batch. A file that cannot be written raises :class:`runio.WriteError`; nothing written before
is lost, and ``resume`` continues from the last checkpoint.

Data parallel (``dist``, see :mod:`isgd.training.distributed`): each rank trains its share of every
global batch under DistributedDataParallel; the loss, the stop requests and every decision that
could differ between ranks (non-finite loss, weights no longer finite) are reduced across ranks, so
all ranks step, stop and fail together. Evaluation is sharded across ranks; rank 0 alone writes
files.

Why one long module: :class:`Trainer` is one object because a checkpoint saves its state whole
(model, optimizer and chart, schedule, preprocessing RNG, progress) and a resume restores it whole;
its step has three forms (one process with and without ISGD, data parallel) that must agree to the
bit. What stands alone has moved out: the components that react to the loop's events
(:mod:`isgd.training.callbacks`), the run directory's lifecycle (:mod:`isgd.training.lifecycle`),
its files (:mod:`isgd.training.runio`) and the process group (:mod:`isgd.training.distributed`).
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from isgd.data import DataError, DataSplit, Preprocess, load_dataset
from isgd.data.variants import class_weights, make_variant
from isgd.errors import NonFiniteError, RunError
from isgd.models import build_model
from isgd.optim import ISGD, frozen_batchnorm_stats
from isgd.sampler import DistributedFixedCycleBatchSampler, FixedCycleBatchSampler
from isgd.spc import LossControlChart
from isgd.training import distributed, runio
from isgd.training.callbacks import (
    Callback,
    PeriodicCheckpoints,
    PeriodicEvaluation,
    ProgressDisplay,
    RankAgreement,
    RunRecords,
)
from isgd.training.config import (
    ConfigError,
    TrainConfig,
    lr_factor,
)
from isgd.training.distributed import DistContext, DistributedError

Prepare = Callable[[Tensor], Tensor]  # a uint8 batch → the network's input on its device

__all__ = ["NonFiniteError", "Trainer", "TrainingInterrupted", "evaluate"]

log = logging.getLogger("isgd.training.train")

# configuration keys a checkpoint cannot be resumed under once changed
_STRUCTURAL_KEYS = ("model", "dataset", "optimizer", "batch_size", "crop_size", "window")
_MAX_SKIP_WARNINGS = 10
PREPARE_ONCE_MAX_BYTES = 2**31  # a training set larger than this as float32 is prepared per batch


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run at a step boundary; a checkpoint holds its progress."""

    def __init__(self, signum: int, iteration: int, run_dir: Path, nproc: int = 1) -> None:
        self.signum, self.iteration, self.run_dir = signum, iteration, run_dir
        super().__init__(
            f"interrupted at iteration {iteration}; resume with: {resume_hint(run_dir, nproc)}"
        )


def resume_hint(run_dir: Path, nproc: int = 1) -> str:
    """The command that continues ``run_dir`` (with as many processes as it had)."""
    if nproc > 1:
        return f"isgd train --nproc {nproc} --resume {run_dir} (or the same under torchrun)"
    return f"isgd train --resume {run_dir}"


class _NonFiniteLoss(Exception):
    """Raised by :meth:`Trainer.step` before any update when the regular loss is NaN or ±inf."""

    def __init__(self, value: float) -> None:
        super().__init__(value)
        self.value = value


class _StopSignals:
    """While active, SIGINT and SIGTERM only record a request to stop (``signum``), which the
    loop honours at the next step boundary; a second SIGINT interrupts at once. Handlers are
    installed only in the main thread (elsewhere Python cannot) and restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:  # e.g. nohup: stay ignored
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: do not wait for the step boundary
        if self.signum is None:
            self.signum = signum

    def __exit__(self, *_exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()


def build_optimizer(config: TrainConfig, model: nn.Module, n_b: int) -> torch.optim.Optimizer:
    """The optimizer named by ``config.optimizer``; ``isgd-*`` wraps the matching base."""
    family = config.optimizer.removeprefix("isgd").lstrip("-") or "sgd"
    base: type[torch.optim.Optimizer]
    kwargs: dict[str, Any]
    if family == "adam":
        base, kwargs = torch.optim.Adam, dict(lr=config.lr, weight_decay=config.weight_decay)
    else:
        base = torch.optim.SGD
        kwargs = dict(
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            nesterov=family == "nesterov",
        )
    if not config.uses_isgd:
        return base(model.parameters(), **kwargs)
    return ISGD(
        model.parameters(),
        base,
        window=config.chart_window(n_b),
        sigma_factor=config.sigma_factor,
        max_extra_iters=config.max_extra_iters,
        eps=config.eps,
        inner_solver=config.inner_solver,
        lower_quantile=config.lower_quantile,
        freeze_bn_stats=config.freeze_bn_stats,
        sync_loss=False,  # the trainer hands ISGD the global ψ (distributed.global_mean_loss)
        **kwargs,
    )


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


@dataclass
class _Progress:
    """Running figures carried through checkpoints."""

    iteration: int = 0
    train_seconds: float = 0.0
    passes: int = 0
    interval_loss_sum: float = 0.0
    interval_steps: int = 0
    best_accuracy: float = 0.0
    target: dict[str, Any] = field(default_factory=dict)
    skipped: int = 0  # batches skipped for a non-finite loss (on_nonfinite = "skip")
    skipped_in_a_row: int = 0


class NonFinitePolicy:
    """``on_nonfinite``: a NaN or infinite regular loss stops the run before its update
    (``"stop"``, :class:`NonFiniteError`, the last good checkpoint kept) or skips its batch
    (``"skip"``: no update, BatchNorm statistics put back, counted). Skipping stops too when the
    weights themselves are no longer finite, or after a whole epoch of skipped batches in a row.
    The counters live in the trainer's progress, which checkpoints carry."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def handle(
        self, trainer: Trainer, loss: float, iteration: int, epoch: int, batch_id: int
    ) -> None:
        """Raise :class:`NonFiniteError`, or count the skip and undo what the forward did."""
        what = f"non-finite loss ({loss}) at iteration {iteration}, batch id {batch_id}"
        if self.mode == "stop":
            raise trainer.nonfinite_error(
                f"{what} (epoch {epoch})",
                "start a new run with a lower --lr, or with --on-nonfinite skip to skip such "
                "batches",
            )
        trainer.norm_stats.restore()  # the forward pass fed the NaNs to BatchNorm's statistics
        if not trainer.weights_finite():
            raise trainer.nonfinite_error(
                f"{what}: the weights themselves are no longer finite, so skipping batches "
                "cannot help",
                "start a new run with a lower --lr",
            )
        if trainer.state.skipped_in_a_row + 1 >= trainer.n_b:
            raise trainer.nonfinite_error(
                f"{what}: the last {trainer.n_b} batches in a row (a whole epoch) had non-finite "
                "losses, so the model has diverged and skipping batches cannot help",
                "start a new run with a lower --lr",
            )
        trainer.state.skipped += 1
        trainer.state.skipped_in_a_row += 1
        if trainer.is_main and trainer.state.skipped <= _MAX_SKIP_WARNINGS:
            log.warning(
                "skipped %s (epoch %d)%s",
                what,
                epoch,
                "; further skipped batches are only counted (summary.json: nonfinite/skipped)"
                if trainer.state.skipped == _MAX_SKIP_WARNINGS
                else "",
            )


class _NormSnapshot:
    """The running statistics of the model's normalisation layers, saved before each step and
    put back when the step must leave no trace; inert when not ``enabled`` (no copies made)."""

    def __init__(self, model: nn.Module, enabled: bool) -> None:
        self.buffers: list[Tensor] = []
        if enabled:
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._NormBase):
                    found = (module.running_mean, module.running_var, module.num_batches_tracked)
                    self.buffers += [b for b in found if b is not None]
        self.saved = [b.clone() for b in self.buffers]

    def save(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.saved, self.buffers)

    def restore(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.saved)


class Trainer:
    """One run: data, model, optimizer and run directory, ready to :meth:`run`.

    ``dist`` (a process group of several ranks) makes it one rank of a data-parallel run:
    ``shares`` (``None``, a list of relative speeds, or ``"auto"``) or ``sizes`` (samples per
    rank, e.g. from a checkpoint) split each global batch of ``config.batch_size`` samples.
    ``callbacks`` (:class:`isgd.training.callbacks.Callback`) join the trainer's own components,
    :attr:`records` (the run's files) and :attr:`display` (the progress), after them.

    torch's thread count is ``config.threads`` from construction to the end of :meth:`run` (or
    a failed construction), then back to what it was.
    """

    def __init__(self, config: TrainConfig, *args: Any, **kwargs: Any) -> None:
        self._threads_before = torch.get_num_threads()
        torch.set_num_threads(config.threads)
        try:
            self._setup(config, *args, **kwargs)
        except BaseException:
            self.restore_threads()
            raise

    def restore_threads(self) -> None:
        """Give the process back the thread count it had before this trainer."""
        torch.set_num_threads(self._threads_before)

    def _setup(
        self,
        config: TrainConfig,
        run_dir: Path,
        data: DataSplit | None = None,
        data_dir: str | None = None,
        *,
        dist: DistContext | None = None,
        shares: Any = None,
        sizes: list[int] | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.records, self.display, self.ranks = RunRecords(), ProgressDisplay(), RankAgreement()
        self.callbacks: list[Callback] = [
            self.records,
            self.display,
            self.ranks,
            PeriodicEvaluation(),  # before the checkpoint of the same iteration
            PeriodicCheckpoints(),
            *callbacks,
        ]
        self.config = config
        self.run_dir = Path(run_dir)
        self.dist = dist if dist is not None and dist.world_size > 1 else None
        self.is_main = self.dist is None or self.dist.is_main
        self.world_size = 1 if self.dist is None else self.dist.world_size
        self.device = _device(config, self.dist)
        self.data = make_variant(
            data if data is not None else _load_data(config.dataset, data_dir),
            imbalance=config.imbalance,
            label_noise=config.label_noise,
            seed=config.seed,
        )
        height, width = self.data.x_train.shape[2:]
        if height != width:
            raise DataError(
                f"{config.dataset}: the images are {height}×{width} pixels, but the models take "
                "square images (N×S×S); crop or pad them to a square"
            )
        if config.crop_size > height:
            raise ConfigError(
                f"invalid crop_size: {config.crop_size} (the {config.dataset} images are "
                f"{height}×{width} pixels)"
            )
        self.sampler: FixedCycleBatchSampler | DistributedFixedCycleBatchSampler
        self._batches: Tensor | None = None  # this epoch's batches (indices), gathered lazily
        self.sampler = FixedCycleBatchSampler(
            len(self.data.x_train), config.batch_size, seed=config.seed, reshuffle=config.reshuffle
        )
        self.n_b = len(self.sampler)
        if config.epochs > 0:
            self.total = max(1, round(config.epochs * self.n_b))
        else:
            self.total = config.iters
        if self.n_b < 2:
            raise ConfigError(
                f"invalid batch_size: {config.batch_size} (the {len(self.data.x_train)} training "
                "samples make fewer than 2 batches; ISGD's chart needs at least 2)"
            )
        self.pre = Preprocess.for_data(
            self.data,
            config.normalize,
            crop_padding=4 if config.augment and not config.crop_size else 0,
            crop_size=config.crop_size,
            random_crop=config.augment,
            flip=config.augment,
            channels_last=config.channels_last,
            seed=config.seed + 1,
        )
        # Without augmentation a small set is normalised once: a step only gathers rows. An
        # augmented set, or one whose float copy would pass 2 GiB (ImageNet, memory-mapped from
        # disk), is prepared batch by batch (the same numbers: the operations are per pixel).
        per_batch = config.augment or self.data.x_train.numel() * 4 > PREPARE_ONCE_MAX_BYTES
        self.x_train = None if per_batch else self.pre(self.data.x_train).to(self.device)
        self.y_train = self.data.y_train.to(self.device)
        self.class_weight = (
            class_weights(self.data.y_train, self.data.num_classes).to(self.device)
            if config.class_weights == "balanced"
            else None
        )
        self.x_test = self.data.x_test  # uint8; evaluation prepares it batch by batch
        self.y_test = self.data.y_test.to(self.device)

        torch.manual_seed(config.seed)  # same initialisation for every optimizer of a seed
        self.model = build_model(
            config.model,
            self.data.in_channels,
            self.data.num_classes,
            config.crop_size or self.data.image_size,
        )
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.model = self.model.to(self.device)
        self.net: nn.Module = self.model  # what the training passes call (DDP under dist)
        self.sizes = [config.batch_size]
        self.rows = slice(None)
        if self.dist is not None:
            self._setup_data_parallel(shares, sizes)
        self._stop: _StopSignals | None = None
        self._global_stop: int | None = None  # the stop request all ranks agreed on
        self.optimizer = build_optimizer(config, self.model, self.n_b)
        # SGD/Adam runs keep a chart too, for the records and plots (it never acts)
        self.chart = (
            self.optimizer.chart
            if isinstance(self.optimizer, ISGD)
            else LossControlChart(config.chart_window(self.n_b), config.sigma_factor)
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda t: lr_factor(config, t, self.total)
        )
        self.state = _Progress()
        self._checkpointed_at: int | None = None  # iteration of the last checkpoint on disk
        self.run_id: str | None = None  # provenance.json's; checkpoints carry it
        # on_nonfinite = "skip": a skipped batch must not leave its NaNs in BatchNorm statistics
        # and neither may a forward-only step of the lower_quantile variant
        self.nonfinite = NonFinitePolicy(config.on_nonfinite)
        self.norm_stats = _NormSnapshot(
            self.model, config.on_nonfinite == "skip" or config.lower_quantile > 0
        )

    def _setup_data_parallel(self, shares: Any, sizes: list[int] | None) -> None:
        """Split the global batch (even, by shares, or by measured speed), wrap the model in
        DistributedDataParallel and shard the test set."""
        d, cfg = self._ctx(), self.config
        if cfg.lower_quantile > 0:
            raise ConfigError(
                "invalid lower_quantile: the forward-only variant runs in one process only "
                "(a DDP forward without its backward is not supported here); drop --nproc or "
                "set lower_quantile = 0"
            )
        if sizes is None:
            shares = distributed.parse_shares(shares, d.world_size)
            if shares == "auto":
                shares = self._calibrate()
            sizes = distributed.split_sizes(cfg.batch_size, shares, d.world_size)
        if len(sizes) != d.world_size or sum(sizes) != cfg.batch_size:
            raise ConfigError(
                f"invalid batch split {sizes} for {d.world_size} processes and a global batch of "
                f"{cfg.batch_size}"
            )
        sampler = distributed.DistributedFixedCycleBatchSampler(
            len(self.data.x_train),
            cfg.batch_size,
            num_replicas=d.world_size,
            rank=d.rank,
            shares=sizes,
            seed=cfg.seed,
            reshuffle=cfg.reshuffle,
        )
        self.sampler = sampler
        self.sizes, self.rows = sampler.sizes, sampler.rows
        # DDP averages gradients over the W ranks: backward on (W/B)·Σ_local ℓ gives each rank
        # the full-batch mean gradient (1/B)·Σ_all ∇ℓ whatever the split.
        self._loss_scale = d.world_size / cfg.batch_size
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        n = len(self.x_test)
        lo, hi = d.rank * n // d.world_size, (d.rank + 1) * n // d.world_size
        self._test_shard = (self.x_test[lo:hi], self.y_test[lo:hi])
        if d.is_main:
            log.info(
                "data parallel: %d processes, global batch %d split %s",
                d.world_size,
                cfg.batch_size,
                ",".join(map(str, self.sizes)),
            )

    def _ctx(self) -> DistContext:
        """The process group of a data-parallel trainer (only called on that path)."""
        if self.dist is None:
            raise RuntimeError("not a data-parallel trainer")
        return self.dist

    def _calibrate(self) -> list[int]:
        """``shares = auto``: every rank times forward+backward passes on an even share of the
        first batch, leaving weights, gradients, BatchNorm statistics and RNG as they were."""
        d, cfg = self._ctx(), self.config
        even = distributed.split_sizes(cfg.batch_size, None, d.world_size)
        rows = distributed.rank_rows(even, d.rank)
        idx = self.sampler.epoch_batches(0)[0][rows]
        x = self.pre(self.data.x_train[idx]).to(self.device)
        y = self.y_train[idx.to(self.device)]
        devices = [self.device] if self.device.type == "cuda" else []

        def step() -> None:
            self.model.zero_grad(set_to_none=True)
            F.cross_entropy(self.model(x), y).backward()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)

        with torch.random.fork_rng(devices=devices), frozen_batchnorm_stats():
            speeds = distributed.calibrate_shares(d, step, len(idx))
        self.model.zero_grad(set_to_none=True)
        if d.is_main:
            log.info(
                "shares = auto: measured %s samples/s per rank",
                ", ".join(f"{s:,.0f}" for s in speeds),
            )
        return distributed.sizes_from_speeds(cfg.batch_size, speeds)

    # ------------------------------------------------------------------ one step
    def batch(self, iteration: int) -> tuple[int, int, Tensor, Tensor]:
        epoch, batch_id = divmod(iteration, self.n_b)
        if batch_id == 0 or self._batches is None:
            self._batches = self.sampler.epoch_batches(epoch)
        idx = self._batches[batch_id]
        if self.x_train is None:
            within = (self.config.batch_size, self.rows) if self.dist is not None else None
            x = self.pre(self.data.x_train[idx], train=True, within=within).to(self.device)
        else:
            x = self.x_train[idx]
        return epoch, batch_id, x, self.y_train[idx]

    def step(self, x: Tensor, y: Tensor) -> float:
        """One training step on ``(x, y)``; returns the regular loss. A non-finite regular loss
        raises :class:`_NonFiniteLoss` before ``backward`` and before any update is applied (for
        ISGD the closure's first call, which runs before the base step). A forward-only step of
        the ``lower_quantile`` variant changes nothing: no backward, no update, and the BatchNorm
        statistics its forward pass moved are put back."""
        self.norm_stats.save()  # what a skipped or forward-only step must leave as it was
        if self.dist is not None:
            return self._dist_step(x, y)
        model, opt = self.model, self.optimizer
        if isinstance(opt, ISGD):
            regular = True

            def closure() -> Tensor:
                nonlocal regular
                opt.zero_grad()
                loss = self.loss(model(x), y)
                if regular:  # the extra iterations' losses are judged by ISGD (NaN stops them)
                    regular = False
                    value = loss.item()
                    if not math.isfinite(value):
                        raise _NonFiniteLoss(value)
                    if opt.well_trained(loss):  # the variant's forward-only step
                        return loss
                loss.backward()
                return loss

            opt.step(closure)
            if opt.stats.last.forward_only:
                self.norm_stats.restore()
            return opt.stats.last.loss
        opt.zero_grad()
        loss = self.loss(model(x), y)
        value = loss.item()
        if not math.isfinite(value):
            raise _NonFiniteLoss(value)
        loss.backward()
        opt.step()
        return value

    def loss(self, logits: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
        """The training loss: cross-entropy, or with ``class_weights = "balanced"``
        ``(1/B) Σ_i w_{y_i} ℓ_i`` (weights average 1 over the training set; "sum" drops 1/B)."""
        if self.class_weight is None:
            return F.cross_entropy(logits, y, reduction=reduction)
        total = F.cross_entropy(logits, y, weight=self.class_weight, reduction="sum")
        return total if reduction == "sum" else total / len(y)

    def _dist_step(self, x: Tensor, y: Tensor) -> float:
        """One data-parallel step: every pass (the regular one and each extra iteration) is a
        DDP forward/backward on this rank's rows plus one all-reduce of the loss, in the same
        order on every rank; ISGD sees the global loss, so every rank decides alike."""
        net, opt = self.net, self.optimizer

        def loss_pass(regular: bool) -> Tensor:
            opt.zero_grad()
            loss_sum = self.loss(net(x), y, reduction="sum")
            psi = self._global_loss(loss_sum, regular)  # may raise _NonFiniteLoss: no backward
            (loss_sum * self._loss_scale).backward()  # DDP all-reduces (averages) the gradients
            return psi

        if isinstance(opt, ISGD):
            calls = 0

            def closure() -> Tensor:
                nonlocal calls
                calls += 1
                return loss_pass(calls == 1)

            opt.step(closure)
            return opt.stats.last.loss
        psi = loss_pass(True)
        opt.step()
        return float(psi)

    def _global_loss(self, loss_sum: Tensor, regular: bool) -> Tensor:
        """ψ, the same on every rank (:func:`distributed.global_mean_loss`); the regular pass
        also agrees on stopping, and a non-finite ψ stops (or skips) the step on every rank."""
        signum = self._stop.signum if regular and self._stop is not None else None
        psi, stop = distributed.global_mean_loss(
            loss_sum, self.config.batch_size, signum, with_stop=regular
        )
        if regular:
            self._global_stop = stop
            if not math.isfinite(psi):
                raise _NonFiniteLoss(psi)
        return torch.tensor(psi, dtype=torch.float64)

    def _stop_signum(self, stop: _StopSignals) -> int | None:
        """The stop request to honour now: this process's (one process), or the one all ranks
        agreed on in the last step's all-reduce (data parallel)."""
        return stop.signum if self.dist is None else self._global_stop

    # ------------------------------------------------------------------ the run
    def run(self, progress: bool | None = None) -> dict[str, Any]:
        """Train to the end and return the summary. The order of events, per iteration:
        batch → step (timed) → record (``on_step_end``) → evaluation when due
        (``on_evaluation``) → checkpoint when due (``on_checkpoint``); the components that react
        are the callbacks (:mod:`isgd.training.callbacks`).

        Raises :class:`TrainingInterrupted` after SIGINT/SIGTERM (checkpoint written),
        :class:`NonFiniteError` on a non-finite loss with ``on_nonfinite = "stop"``, and
        :class:`runio.WriteError` when a file cannot be written; in every case what was written
        before is intact and :func:`resume` continues from the last checkpoint.
        """
        self.display.enabled = progress
        try:
            self._emit("on_run_start")
            with _StopSignals() as stop:
                self._stop = stop
                if self.state.iteration == 0:
                    self.evaluate_and_record()
                self._batches = None
                while self.state.iteration < self.total and self._stop_signum(stop) is None:
                    self.train_iteration()
                signum = self._stop_signum(stop)
                if signum is not None and self.state.iteration < self.total:
                    self._interrupt(signum)
            self.records.close()  # the last lines on disk before the summary reads them
            return self._finish()
        except runio.WriteError as err:
            raise runio.WriteError(
                f"{err}; what was written before is intact: once that is fixed, continue with: "
                f"{resume_hint(self.run_dir, self.world_size)}"
            ) from None
        except RuntimeError as err:
            if self.dist is None or not distributed.is_collective_failure(err):
                raise
            raise self._distributed_error(err) from None
        finally:
            self._stop = None
            self.restore_threads()
            self._emit("on_run_end")

    def train_iteration(self) -> None:
        """One iteration: the batch and the step, timed (the non-finite policy applies to the
        step), then :meth:`after_step`."""
        st = self.state
        t = st.iteration
        start = time.perf_counter()
        epoch, batch_id, x, y = self.batch(t)
        limit = self.chart.limit  # before this loss joins (SGD runs: monitoring only)
        skipped = False
        try:
            loss = self.step(x, y)
            st.skipped_in_a_row = 0
        except _NonFiniteLoss as bad:
            self.nonfinite.handle(self, bad.value, t + 1, epoch, batch_id)
            loss, skipped = bad.value, True
        self.scheduler.step()
        if self.device.type == "cuda":  # the clock must not stop before the GPU's work has
            torch.cuda.synchronize(self.device)
        st.train_seconds += time.perf_counter() - start

        st.iteration = t + 1
        self.after_step(epoch, batch_id, loss, limit, skipped)

    def _emit(self, event: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(self, *args)

    def weights_finite(self) -> bool:
        """All weights and buffers finite — on every rank (a collective under ``dist``)."""
        finite = all(
            bool(torch.isfinite(v).all())
            for v in self.model.state_dict().values()
            if v.is_floating_point()
        )
        if self.dist is None:
            return finite
        flag = torch.tensor([float(finite)], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def nonfinite_error(self, what: str, todo: str) -> NonFiniteError:
        last = self._last_checkpoint()
        kept = f"its last good checkpoint {last} is kept" if last else "it had no checkpoint yet"
        return NonFiniteError(f"{what}; the run stopped and {kept}; {todo}")

    def _last_checkpoint(self) -> Path | None:
        return runio.latest_checkpoint(self.run_dir / "checkpoints") if self.is_main else None

    def _distributed_error(self, err: BaseException) -> DistributedError:
        """One line for a failed collective: who, where, the cause, what is kept, what to do."""
        d, st = self._ctx(), self.state
        if self.is_main:
            last = self._last_checkpoint()
            kept = f"the last checkpoint is {last}" if last else "there is no checkpoint yet"
        else:
            kept = f"rank 0 keeps the checkpoints in {self.run_dir / 'checkpoints'}"
        return DistributedError(
            f"rank {d.rank} of {d.world_size}: another rank died or stopped responding after "
            f"iteration {st.iteration} (process group error: {distributed.first_line(err)}); "
            f"{kept}; resume with: {resume_hint(self.run_dir, d.world_size)}"
        )

    def _interrupt(self, signum: int) -> None:
        """Checkpoint (unless one holds this iteration already) and raise TrainingInterrupted."""
        st = self.state
        if st.iteration > 0 and self._checkpointed_at != st.iteration:
            self.checkpoint()
        self.records.flush()
        err = TrainingInterrupted(signum, st.iteration, self.run_dir, self.world_size)
        if self.is_main:
            log.warning("%s", err)
        raise err

    def after_step(
        self, epoch: int, batch_id: int, loss: float, limit: float | None, skipped: bool = False
    ) -> None:
        """The end of iteration ``state.iteration``: its record goes to the callbacks
        (``on_step_end``), among them the evaluation and the checkpoint when they are due."""
        st = self.state
        if skipped:  # no update, no chart entry, no pass counted
            rec: dict[str, Any] = dict(triggered=False, extra_iters=0, loss_after=None)
        elif isinstance(self.optimizer, ISGD):
            s = self.optimizer.stats
            st.passes = s.passes
            rec = dict(
                triggered=s.last.triggered,
                extra_iters=s.last.extra_iters,
                loss_after=s.last.loss_after,
            )
            if s.last.forward_only:
                rec["forward_only"] = True
            if s.last.momentum_ratio is not None:
                rec["momentum_ratio"] = s.last.momentum_ratio
        else:
            self.chart.update(loss)
            st.passes += 1
            rec = dict(triggered=False, extra_iters=0, loss_after=None)
        if math.isfinite(loss):
            st.interval_loss_sum += loss
            st.interval_steps += 1
        record = dict(
            iteration=st.iteration,
            epoch=epoch,
            batch_id=batch_id,
            loss=loss,
            limit=limit,
            **rec,
            passes=st.passes,
        )
        if skipped:
            record["skipped"] = True
        self._emit("on_step_end", record)  # records, display, ranks, evaluation, checkpoint

    @property
    def decision_digest(self) -> int:
        """CRC32 of every step's decision so far under data parallelism (0 in one process);
        ranks compare it at every checkpoint and at the end (:class:`RankAgreement`)."""
        return self.ranks.digest

    def status_line(self, short: bool = False) -> str:
        """Loss, limit, triggers, images/s (and, unless ``short``, iteration and the run's ETA,
        :meth:`ProgressDisplay.eta_seconds`)."""
        st, chart = self.state, self.chart
        stats = getattr(self.optimizer, "stats", None)
        limit = chart.limit
        parts = [
            f"loss {st.interval_loss_sum / max(st.interval_steps, 1):.4f}",
            f"limit {limit:.4f}" if limit is not None else "limit -",
            f"triggers {stats.triggers if stats else 0}",
            f"{st.iteration * self.config.batch_size / max(st.train_seconds, 1e-9):,.0f} img/s",
        ]
        if short:
            return " ".join(parts)
        eta = self.display.eta_text(self)
        return f"iter {st.iteration}/{self.total} " + " | ".join(parts) + f" | {eta}"

    def evaluate_and_record(self) -> None:
        """Evaluate on the test split, update the run's best/target figures and hand the
        ``metrics.jsonl`` record to the callbacks (``on_evaluation``)."""
        cfg, st = self.config, self.state
        result = self._evaluate()
        test_loss, accuracy = result.loss, result.accuracy
        stats = getattr(self.optimizer, "stats", None)
        record = {
            "iteration": st.iteration,
            "epoch": st.iteration / self.n_b,
            "passes": st.passes,
            "time/train_seconds": st.train_seconds,
            "train/loss": (st.interval_loss_sum / st.interval_steps) if st.interval_steps else None,
            "test/loss": test_loss,
            "test/accuracy": accuracy,
            "test/balanced_accuracy": result.balanced_accuracy,
            "lr": self.optimizer.param_groups[0]["lr"],
            "isgd/triggers": stats.triggers if stats else 0,
            "isgd/extra_iters": stats.extra_iters if stats else 0,
            "backward_passes": st.passes - (stats.forward_only if stats else 0),
            "images_per_second": st.iteration * cfg.batch_size / st.train_seconds
            if st.train_seconds
            else None,
        }
        st.interval_loss_sum, st.interval_steps = 0.0, 0
        self._last_eval = record
        st.best_accuracy = max(st.best_accuracy, accuracy)
        if cfg.target_accuracy and not st.target and accuracy >= cfg.target_accuracy:
            st.target = {
                "iteration": st.iteration,
                "passes": st.passes,
                "train_seconds": st.train_seconds,
            }
        self._emit("on_evaluation", record)

    def _evaluate(self) -> Evaluation:
        """Test loss, accuracy and balanced accuracy; under ``dist`` each rank evaluates its shard
        of the test set with rank 0's BatchNorm statistics, and the sums are all-reduced."""
        cfg, k = self.config, self.data.num_classes
        if self.dist is None:
            return evaluate(
                self.model, self.x_test, self.y_test, cfg.eval_batch_size, self._prepare_test
            )
        for buffer in self.model.buffers():  # DDP syncs them at forward start, not after
            torch.distributed.broadcast(buffer, 0)
        x, y = self._test_shard
        loss_sum, correct, count = evaluate_sums(
            self.model, x, y, cfg.eval_batch_size, self._prepare_test, num_classes=k
        )
        sums = torch.cat([torch.tensor([loss_sum], dtype=torch.float64), correct, count])
        sums = sums.to(dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(sums)
        sums = sums.cpu()
        return Evaluation.from_sums(
            float(sums[0]), sums[1 : 1 + k].round().long(), sums[1 + k :].round().long()
        )

    def _prepare_test(self, x: Tensor) -> Tensor:
        return self.pre(x).to(self.device)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> None:
        """Write a checkpoint of this iteration (after ``on_checkpoint``: the records it covers
        are on disk); under ``dist`` the ranks first prove they hold the same state."""
        if not self.weights_finite():
            raise self.nonfinite_error(
                f"the weights are no longer finite at iteration {self.state.iteration} (the "
                "last loss was finite); no checkpoint was written with them",
                "start a new run with a lower --lr",
            )
        self._emit("on_checkpoint")  # every rank: the rank check is a collective
        rng_by_rank = (
            distributed.all_gather_object(self.dist, torch.get_rng_state())
            if self.dist is not None
            else None
        )
        if not self.is_main:
            self._checkpointed_at = self.state.iteration
            return
        state = {
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "chart": self.chart.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "preprocess": self.pre.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "sampler": {
                "epoch": self.state.iteration // self.n_b,
                "batch_id": self.state.iteration % self.n_b,
            },
            "progress": vars(self.state).copy(),
            "run_id": self.run_id,
        }
        if self.dist is not None:  # resuming with as many processes reuses the split and RNGs
            state["distributed"] = {
                "world_size": self.dist.world_size,
                "batch_sizes": list(self.sizes),
                "torch_rng_by_rank": rng_by_rank,
            }
        runio.save_checkpoint(self.run_dir / "checkpoints", self.state.iteration, state)
        self._checkpointed_at = self.state.iteration

    def restore(self, checkpoint: dict[str, Any], source: Path | None = None) -> None:
        """Continue from ``checkpoint`` (loaded from ``source``); the run's ``metrics.jsonl``
        and ``steps.jsonl`` are cut back to its iteration."""
        where = f"checkpoint {source}" if source else "the checkpoint"
        config_file = self.run_dir / "config.toml"
        check_checkpoint_config(checkpoint, self.config, where, config_file)
        try:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            if not isinstance(self.optimizer, ISGD):
                self.chart.load_state_dict(checkpoint["chart"])
            self.scheduler.load_state_dict(checkpoint["scheduler"])
            self.pre.load_state_dict(checkpoint["preprocess"])
            torch.set_rng_state(checkpoint["torch_rng"])
            saved = checkpoint.get("distributed") or {}
            if self.dist is not None and saved.get("world_size") == self.dist.world_size:
                torch.set_rng_state(saved["torch_rng_by_rank"][self.dist.rank])
            self.state = _Progress(**checkpoint["progress"])
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            detail = " ".join(lines[:2])[:200] if lines else repr(err)
            raise RunError(
                f"{where} does not fit the model or optimizer that {config_file} describes "
                f"({detail}); put the run's config.toml back as it was, or start a new run "
                "with --out"
            ) from None
        self._checkpointed_at = self.state.iteration
        if self.is_main:
            for name in ("metrics.jsonl", "steps.jsonl"):
                runio.truncate_jsonl(self.run_dir / name, self.state.iteration)

    def _finish(self) -> dict[str, Any]:
        cfg, st = self.config, self.state
        if not self.weights_finite():
            raise self.nonfinite_error(
                f"the weights are no longer finite after the last iteration ({st.iteration}); "
                "model.pt was not written",
                "start a new run with a lower --lr",
            )
        self.ranks.check(self)
        if self.is_main:
            runio.atomic_write_bytes(self.run_dir / "model.pt", _state_dict_bytes(self.model))
            last = list(runio.read_jsonl(self.run_dir / "metrics.jsonl"))[-1]
        else:
            last = self._last_eval
        stats = getattr(self.optimizer, "stats", None)
        summary = {
            "optimizer": cfg.optimizer,
            "preset": cfg.preset,
            "dataset": cfg.dataset,
            "model": cfg.model,
            "seed": cfg.seed,
            "iterations": st.iteration,
            "passes": st.passes,
            "epochs": st.iteration / self.n_b,
            "n_batches_per_epoch": self.n_b,
            "time/train_seconds": st.train_seconds,
            "images_per_second": st.iteration * cfg.batch_size / max(st.train_seconds, 1e-9),
            "final/test_accuracy": last["test/accuracy"],
            "final/test_balanced_accuracy": last.get("test/balanced_accuracy"),
            "final/test_loss": last["test/loss"],
            "best/test_accuracy": st.best_accuracy,
            "isgd/triggers": stats.triggers if stats else 0,
            "isgd/extra_iters": stats.extra_iters if stats else 0,
            "isgd/trigger_rate": stats.trigger_rate if stats else 0.0,
            "isgd/forward_only": stats.forward_only if stats else 0,
            "backward_passes": st.passes - (stats.forward_only if stats else 0),
            "nonfinite/skipped": st.skipped,
            "target/accuracy": cfg.target_accuracy or None,
            "target/iteration": st.target.get("iteration"),
            "target/passes": st.target.get("passes"),
            "target/train_seconds": st.target.get("train_seconds"),
        }
        if self.dist is not None:
            summary["distributed/world_size"] = self.dist.world_size
            summary["distributed/batch_sizes"] = list(self.sizes)
            summary["distributed/ranks_checked"] = self.ranks.checks
        if self.is_main:
            runio.write_json(self.run_dir / "summary.json", summary)
        return summary


def check_checkpoint_config(
    checkpoint: dict[str, Any], config: TrainConfig, where: str, config_file: Path
) -> None:
    """RunError unless ``checkpoint`` was written with the model, data set, optimizer and batch
    size of ``config`` (other keys, e.g. ``iters``, may change between resumes)."""
    saved = checkpoint.get("config")
    if not isinstance(saved, dict):
        return
    changed = [k for k in _STRUCTURAL_KEYS if k in saved and saved[k] != getattr(config, k)]
    if changed:
        was = ", ".join(f"{k} = {saved[k]!r}" for k in changed)
        now = ", ".join(f"{k} = {getattr(config, k)!r}" for k in changed)
        raise RunError(
            f"{where} was written with {was}, but {config_file} now says {now}; put the old "
            "values back to resume it, or start a new run with --out"
        )


def _device(config: TrainConfig, dist: DistContext | None) -> torch.device:
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


def _load_data(name: str, data_dir: str | None) -> DataSplit:
    try:
        return load_dataset(name, data_dir)
    except DataError as err:
        if not name.startswith("idx:"):
            raise
        raise DataError(
            f"{err}; fix or replace the IDX files in {name[4:]} (uint8 images N×H×W and "
            "labels N, raw or .gz)"
        ) from None


def _state_dict_bytes(model: nn.Module) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, buffer)
    return buffer.getvalue()
