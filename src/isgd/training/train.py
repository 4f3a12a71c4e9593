"""The training loop behind ``isgd train``: timing, untimed evaluation, checkpoints, records.

The loop stands on the library. Every arm is one :class:`isgd.ISGD` (SGD, Nesterov, Adam and
AdamW are ``ISGD(base, max_extra_iters=0)``, bit-identical to the bare optimizer), stepped by one
closure in one process and under data parallelism (:meth:`Trainer.step`; selective backprop's
step, picked once as the run's step strategy, :mod:`isgd.training.relatives`, runs that closure
on the kept part of the batch); ISGD's collective (:class:`isgd.collective.LossSync`)
makes the ranks decide alike, its ``nonfinite`` policy drives ``on_nonfinite``, its step record
(``opt.stats.last``) is the ``steps.jsonl`` line and ``ISGDStats.metrics()`` the ``isgd/*``
figures. An iteration, in the order of :meth:`Trainer.train_iteration`: batch and step (timed)
→ record (``on_step_end``) → evaluation when due (untimed, ``on_evaluation``) → checkpoint when
due (``on_checkpoint``). The callbacks (:mod:`isgd.training.callbacks`) observe; they do not drive
the loop, though one may end it early (:meth:`Trainer.cancel_run`).

A run resumed from its last checkpoint ends with the same ``model.pt`` as an uninterrupted one
(CPU; same threads). The checkpoint is the composition of its parts' ``state_dict()``
(:meth:`Trainer.state_dict`). SIGINT and SIGTERM stop the loop at the next step boundary with a
checkpoint (:class:`TrainingInterrupted`); a non-finite loss stops the run before its update
(:class:`NonFiniteError`, the last good checkpoint kept) or, with ``on_nonfinite = "skip"``,
skips that batch. A file that cannot be written raises :class:`runio.WriteError`.

Data parallel (``dist``, :mod:`isgd.training.distributed`): each rank trains its share of every
global batch under DistributedDataParallel and ranks agree on every decision and on stopping
(ISGD's all-reduce carries the stop requests: :meth:`isgd.collective.LossSync.carry`).
Evaluation is sharded across ranks; rank 0 alone writes files.

:class:`Trainer` owns the parts a checkpoint composes; their set-up and the concerns beside the
loop are modules of their own: the data (:mod:`~isgd.training.data_setup`), the optimizer
(:mod:`~isgd.training.optimizer`), non-finite losses (:mod:`~isgd.training.nonfinite`), the
data-parallel parts (:mod:`~isgd.training.parallel`), evaluation and signals, the configuration a
checkpoint resumes under (:func:`~isgd.training.config.check_checkpoint_config`), the run's files
(:mod:`~isgd.training.runio`, ``model.pt`` too).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from isgd.batchnorm import frozen_batchnorm_stats
from isgd.data import DataSplit
from isgd.errors import NonFiniteError, RunError, TrainingInterrupted
from isgd.optim import StepRecord
from isgd.sampler import DistributedFixedCycleBatchSampler, FixedCycleBatchSampler
from isgd.spc import finite_loss
from isgd.training import distributed, nonfinite, parallel, relatives, runio
from isgd.training.callbacks import Callback, ProgressDisplay, RankAgreement, RunRecords
from isgd.training.config import TrainConfig, check_checkpoint_config, lr_factor
from isgd.training.data_setup import build_workload, setup_data
from isgd.training.distributed import DistContext
from isgd.training.evaluation import Evaluation, evaluate
from isgd.training.optimizer import build_optimizer
from isgd.training.signals import StopSignals, resume_hint
from isgd.training.workload import Metric, Workload, check_workload, collate

__all__ = [
    "Evaluation",
    "NonFiniteError",
    "TrainState",
    "Trainer",
    "TrainingInterrupted",
    "build_optimizer",
    "evaluate",
    "resume_hint",
]

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """The loop's own progress, checkpointed with it (the optimizer counts steps, triggers and
    passes itself: ``optimizer.stats``)."""

    iteration: int = 0
    train_seconds: float = 0.0
    interval_loss_sum: float = 0.0  # the finite regular losses since the last evaluation
    interval_steps: int = 0
    best_metric: float | None = None  # the best test metric so far, in its direction
    target: dict[str, Any] = field(default_factory=dict)  # where the target was reached
    skipped_in_a_row: int = 0  # batches skipped for a non-finite loss, up to this iteration

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if "best_accuracy" in state:  # a checkpoint written before workloads
            state["best_metric"] = state.pop("best_accuracy")
        vars(self).update(vars(TrainState(**state)))  # TypeError on a key it does not know


class Trainer:
    """One run: data, model, optimizer and run directory, ready to :meth:`run`.

    ``dist`` (a process group of several ranks) makes it one rank of a data-parallel run:
    ``shares`` (``None``, a list of relative speeds, or ``"auto"``) or ``sizes`` (samples per
    rank, e.g. from a checkpoint) split each global batch of ``config.batch_size`` samples.
    ``callbacks`` (:class:`isgd.training.callbacks.Callback`) join the trainer's own components,
    :attr:`records` (the run's files), :attr:`display` (the progress) and :attr:`ranks` (the
    ranks' agreement), after them.

    torch's thread count is ``config.threads`` from construction to the end of :meth:`run` (or
    a failed construction), then back to what it was.
    """

    # the workload and its reading, set by data_setup.setup_data
    workload: Workload
    metric: Metric
    validation: Any  # the validation split (a Dataset), or None: the evaluations read the test
    sampler: FixedCycleBatchSampler | DistributedFixedCycleBatchSampler
    n_b: int  # batches per epoch
    total: int  # iterations of the run

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
        workload: Workload | None = None,
        dist: DistContext | None = None,
        shares: Any = None,
        sizes: list[int] | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.records, self.display, self.ranks = RunRecords(), ProgressDisplay(), RankAgreement()
        self.callbacks: list[Callback] = [self.records, self.display, self.ranks, *callbacks]
        self.config = config
        self.run_dir = Path(run_dir)
        self.dist = dist if dist is not None and dist.world_size > 1 else None
        self.is_main = self.dist is None or self.dist.is_main
        self.world_size = 1 if self.dist is None else self.dist.world_size
        self.device = parallel.device_for(config, self.dist)
        self._batches: Tensor | None = None  # this epoch's batches (indices), gathered lazily
        if workload is None:
            workload = build_workload(config, data, data_dir, self.device)
        else:  # a Workload object from a caller: checked as one from --workload is
            workload = check_workload(workload, workload.name or "the workload")
        setup_data(self, workload)
        self.model = workload.model.to(self.device)
        self.net: nn.Module = self.model  # what the training passes call (DDP under dist)
        self.sizes = [config.batch_size]
        self.rows = slice(None)
        self._weight: float | None = None  # this rank's weight in ISGD's mean loss (dist)
        self._loss_scale = 1.0  # data parallel: W/B, see parallel.setup
        if self.dist is not None:
            parallel.setup(self, shares, sizes)
        self.optimizer = build_optimizer(
            config, self.model, self.n_b, data_parallel=self.dist is not None, total=self.total
        )
        self.strategy = relatives.step_strategy(self)  # ISGD's closure step, or selective backprop
        self.chart = self.optimizer.chart
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda t: lr_factor(config, t, self.total)
        )
        self.state = TrainState()
        self._checkpointed_at: int | None = None  # iteration of the last checkpoint on disk
        self._cancelled: str | None = None  # why the run ends early (cancel_run)
        self._signum: int | None = None  # the stop request honoured at the next boundary
        self._last_eval: dict[str, Any] = {}
        self.run_id: str | None = None  # provenance.json's; checkpoints carry it
        # a skipped batch, or a forward-only step of the lower_quantile variant, must leave
        # BatchNorm's running statistics as they were (frozen_batchnorm_stats in step())
        self._rewind_batchnorm = (
            config.on_nonfinite == "skip"
            or config.lower_quantile > 0
            or relatives.skips_updates(config)
        )
        self._signals = StopSignals()  # run() installs them; under dist, step() sends the votes

    # ------------------------------------------------------------------ one step
    def batch(self, iteration: int) -> tuple[int, int, Tensor, Tensor]:
        epoch, batch_id = divmod(iteration, self.n_b)
        if batch_id == 0 or self._batches is None:
            self._batches = self.sampler.epoch_batches(epoch)
        x, y = collate(self.workload.train, self._batches[batch_id])
        return epoch, batch_id, x.to(self.device), y.to(self.device)

    def step(self, x: Tensor, y: Tensor, samples: int | None = None) -> StepRecord:
        """One ISGD step on ``(x, y)`` — one closure, in one process and under data parallelism
        (``weight``: this rank's samples, ISGD's all-reduce does the rest); returns its record.
        ``samples``: the step trains on part of the batch (selective backprop), this many samples
        on all ranks together, and ``(x, y)`` is this rank's part of them.
        A non-finite regular loss raises ``FloatingPointError`` before any update, or (``skip``)
        is skipped by ISGD. A forward-only step (the ``lower_quantile`` variant,
        ``random_skip_steps``) runs no backward, nor does the stop check of an extra iteration
        (counted as a forward). A skipped (SkipStep's too) or forward-only step leaves BatchNorm's
        running statistics as they were."""
        opt, net = self.optimizer, self.net
        regular = True
        weight, scale = self._weight, self._loss_scale
        if samples is not None and self.dist is not None:  # ψ: the mean over the kept samples
            weight, scale = float(len(y)), self.world_size / samples

        def closure() -> Tensor:
            nonlocal regular
            opt.zero_grad()
            loss, objective = self._losses(net(x), y, scale)
            if regular:
                regular = False
                self._regular_loss = loss.detach()  # for the message of a non-finite one
            # the variant's forward-only step, or the stop check of an extra iteration (ψ' ≤
            # limit): that pass's gradient would never be used, so no backward (a forward)
            if opt.well_trained(loss, weight=weight):
                return loss
            objective.backward()
            return loss

        if self.dist is not None:  # the stop votes ride the regular pass's loss all-reduce
            opt.sync.carry(self._signals.votes())
        with frozen_batchnorm_stats(enabled=self._rewind_batchnorm) as batchnorm:
            opt.step(closure, weight=weight)
            record = opt.stats.last
            if not (record.skipped or record.forward_only):
                batchnorm.keep()  # an update was applied: the batch counts in the statistics
        return record

    def _losses(self, logits: Tensor, y: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        """(this process's mean loss ψ_r, what to back-propagate): the workload's batch mean in
        one process; under data parallelism that mean times n_r·W/B (``scale`` W/B, see
        :func:`parallel.setup`; W/K for K kept samples)."""
        loss = self.workload.loss(logits, y)
        if self.dist is None:
            return loss, loss
        return loss.detach(), loss * (len(y) * scale)

    @property
    def passes(self) -> int:
        """Passes over training batches: the optimizer's (``stats.passes``) and the step
        strategy's own (selective backprop's selection forwards, which run no backward)."""
        return self.optimizer.stats.passes + self.strategy.forward_passes

    # ------------------------------------------------------------------ the run
    def run(self, progress: bool | None = None) -> dict[str, Any]:
        """Train to the end (or to :meth:`cancel_run`) and return the summary.

        Raises :class:`TrainingInterrupted` after SIGINT/SIGTERM (checkpoint written),
        :class:`NonFiniteError` on a non-finite loss with ``on_nonfinite = "stop"``, and
        :class:`runio.WriteError` when a file cannot be written; in every case what was written
        before is intact and ``isgd train --resume`` continues from the last checkpoint.
        """
        self.display.enabled = progress
        try:
            self._emit("on_run_start")
            with self._signals:
                if self.state.iteration == 0:
                    self.evaluate_and_record()
                self._batches = None
                while self.state.iteration < self.total and self._cancelled is None:
                    self.train_iteration()
                    self._signum = parallel.agreed_stop(self, self._signals)
                    if self._signum is not None and self.state.iteration < self.total:
                        self._interrupt(self._signum)
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
            raise parallel.collective_error(self, err) from None
        finally:
            self.restore_threads()
            self._emit("on_run_end")

    def train_iteration(self) -> None:
        """One iteration: step (timed) → record → evaluation when due → checkpoint when due."""
        st, cfg = self.state, self.config
        start = time.perf_counter()
        epoch, batch_id, x, y = self.batch(st.iteration)
        try:
            record = self.strategy.step(self, x, y)
        except FloatingPointError:  # ISGD(nonfinite="raise"): nothing was updated
            raise nonfinite.error(
                self,
                f"non-finite loss ({float(self._regular_loss)}) at iteration {st.iteration + 1}, "
                f"batch id {batch_id} (epoch {epoch})",
                "start a new run with a lower --lr, or with --on-nonfinite skip to skip such "
                "batches",
            ) from None
        self.scheduler.step()
        if self.device.type == "cuda":  # the clock must not stop before the GPU's work has
            torch.cuda.synchronize(self.device)
        st.train_seconds += time.perf_counter() - start
        st.iteration += 1
        if record.skipped and not finite_loss(record.loss):  # ISGD skipped a non-finite loss
            nonfinite.skipped(self, record, epoch, batch_id)
        else:  # SkipStep's skipped steps are finite: their losses count
            st.skipped_in_a_row = 0
            if record.loss == record.loss:  # finite: ISGD skips every other
                st.interval_loss_sum += record.loss
                st.interval_steps += 1

        line = {"iteration": st.iteration, "epoch": epoch, "batch_id": batch_id}
        line |= asdict(record) | {"passes": self.passes} | self.strategy.line()
        self._emit("on_step_end", line)  # the steps.jsonl line, the display, the ranks' CRC
        if st.iteration % cfg.eval_every == 0 or st.iteration == self.total or self._cancelled:
            self.evaluate_and_record()
        due = st.iteration % cfg.checkpoint_every == 0 and st.iteration < self.total
        if due and not st.skipped_in_a_row and self._cancelled is None:
            self.checkpoint()  # none while batches are skipped: the weights may have diverged

    def cancel_run(self, reason: str) -> None:
        """End the run after this iteration (evaluated, then finished as at its last one)."""
        if self._cancelled is None:
            self._cancelled = reason
            if self.is_main:
                log.info("ending the run at iteration %d: %s", self.state.iteration, reason)

    def _emit(self, event: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(self, *args)

    def _last_checkpoint(self) -> Path | None:
        return runio.latest_checkpoint(self.run_dir / "checkpoints") if self.is_main else None

    def _interrupt(self, signum: int) -> None:
        """Checkpoint (unless one holds this iteration already) and raise TrainingInterrupted."""
        st = self.state
        if st.iteration > 0 and self._checkpointed_at != st.iteration:
            self.checkpoint()
        self.records.flush()
        err = TrainingInterrupted(signum, st.iteration, resume_hint(self.run_dir, self.world_size))
        if self.is_main:
            log.warning("%s", err)
        raise err

    @property
    def decision_digest(self) -> int:
        """CRC32 of every step's decision so far under data parallelism (0 in one process);
        ranks compare it at every checkpoint and at the end (:class:`RankAgreement`)."""
        return self.ranks.digest

    def status_line(self, short: bool = False) -> str:
        """Loss, limit, triggers, samples/s (images/s for the image data sets) and, unless
        ``short``, iteration and the run's ETA (:meth:`ProgressDisplay.eta_seconds`)."""
        st, limit = self.state, self.chart.limit
        unit = "samples/s" if self.config.workload else "img/s"
        parts = [
            f"loss {st.interval_loss_sum / max(st.interval_steps, 1):.4f}",
            f"limit {limit:.4f}" if limit is not None else "limit -",
            f"triggers {self.optimizer.stats.triggers}",
            f"{st.iteration * self.config.batch_size / max(st.train_seconds, 1e-9):,.0f} {unit}",
        ]
        if short:
            return " ".join(parts)
        eta = self.display.eta_text(self)
        return f"iter {st.iteration}/{self.total} " + " | ".join(parts) + f" | {eta}"

    @property
    def watched(self) -> str:
        """The split the evaluations during the run read: ``val`` or ``test``."""
        return "test" if self.validation is None else "val"

    def evaluate_and_record(self) -> None:
        """Evaluate on the watched split (:attr:`watched`), update the run's best/target figures
        and hand the ``metrics.jsonl`` record to the callbacks (``on_evaluation``)."""
        cfg, st, stats = self.config, self.state, self.optimizer.stats
        split = self.watched
        result = self._evaluate(self.validation if split == "val" else self.workload.test)
        record = {
            "iteration": st.iteration,
            "epoch": st.iteration / self.n_b,
            "passes": self.passes,
            "backward_passes": stats.backward_passes,
            **self.strategy.figures(self),
            "time/train_seconds": st.train_seconds,
            "train/loss": (st.interval_loss_sum / st.interval_steps) if st.interval_steps else None,
            f"{split}/loss": result.loss,
            f"{split}/metric": result.metric,
            **self._classification_figures(f"{split}/", result),
            "lr": self.optimizer.param_groups[0]["lr"],
            **stats.metrics(),
            "images_per_second": st.iteration * cfg.batch_size / st.train_seconds
            if st.train_seconds
            else None,
        }
        st.interval_loss_sum, st.interval_steps = 0.0, 0
        self._last_eval = record
        if self.metric.better(result.metric, st.best_metric):
            st.best_metric = result.metric
        if cfg.target and not st.target and self.metric.reached(result.metric, cfg.target):
            st.target = {
                "iteration": st.iteration,
                "passes": self.passes,
                "train_seconds": st.train_seconds,
            }
        self._emit("on_evaluation", record)

    def _evaluate(self, dataset: Any) -> Evaluation:
        """Loss and metric on ``dataset`` (and a classifier's accuracies); under ``dist`` each
        rank evaluates its shard with rank 0's BatchNorm statistics, and the sums are
        all-reduced."""
        if self.dist is None:
            batch = self.config.eval_batch_size
            return evaluate(self.model, self.workload, dataset, batch, self.device)
        return parallel.evaluate_shards(self, dataset)

    def _classification_figures(self, prefix: str, result: Evaluation) -> dict[str, Any]:
        """``accuracy`` and ``balanced_accuracy`` under ``prefix`` for a classifier, else none."""
        if not self.workload.is_classification:
            return {}
        return {
            f"{prefix}accuracy": result.accuracy,
            f"{prefix}balanced_accuracy": result.balanced_accuracy,
        }

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The checkpoint: its parts' ``state_dict()``s, the RNG and where it came from."""
        return {
            "config": self.config.to_dict(),
            "run_id": self.run_id,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),  # base optimizer, chart, counters
            "scheduler": self.scheduler.state_dict(),
            "data": _state_of(self.workload.train),  # e.g. the augmentation's random state
            "loop": self.state.state_dict(),
            "callbacks": {
                type(c).__name__: c.state_dict() for c in self.callbacks if c.state_dict()
            },
            "torch_rng": torch.get_rng_state(),
            **({"strategy": strategy} if (strategy := self.strategy.state_dict()) else {}),
        }

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        """Put every part back as :meth:`state_dict` saved it (the run directory aside)."""
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        data_state = checkpoint.get("data", checkpoint.get("preprocess"))  # the name before
        if data_state and hasattr(self.workload.train, "load_state_dict"):
            self.workload.train.load_state_dict(data_state)
        self.state.load_state_dict(checkpoint["loop"])
        self.strategy.load_state_dict(checkpoint.get("strategy", {}))
        for callback in self.callbacks:
            callback.load_state_dict(checkpoint["callbacks"].get(type(callback).__name__, {}))
        torch.set_rng_state(checkpoint["torch_rng"])
        saved = checkpoint.get("distributed")  # the same number of processes: their RNGs too
        if self.dist is not None and saved and saved["world_size"] == self.dist.world_size:
            torch.set_rng_state(saved["torch_rng_by_rank"][self.dist.rank])

    def checkpoint(self) -> None:
        """Write a checkpoint of this iteration (after ``on_checkpoint``: the records it covers
        are on disk); under ``dist`` the ranks first prove they hold the same state."""
        nonfinite.check_weights(
            self,
            f"at iteration {self.state.iteration} (the last loss was finite); no checkpoint "
            "was written with them",
        )
        self._emit("on_checkpoint")  # every rank: the rank check is a collective
        rng_by_rank = (
            distributed.all_gather_object(self.dist, torch.get_rng_state())
            if self.dist is not None
            else None
        )
        if self.is_main:
            state = self.state_dict()
            if self.dist is not None:  # resuming with as many processes reuses split and RNGs
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
            self.load_state_dict(checkpoint)
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

    def _final_figures(self, last: dict[str, Any]) -> dict[str, Any]:
        """The run's final and best figures. Without a validation split: the last evaluation's
        (of the test split) and the best of them; with one: the last and best on it, and the
        test split's, read now for the first and only time. A classifier's accuracies also
        under their own names, as results have always read them."""
        split, best = self.watched, self.state.best_metric
        figures = {f"final/{split}_loss": last[f"{split}/loss"]}
        figures |= {f"final/{split}_metric": last[f"{split}/metric"], f"best/{split}_metric": best}
        test = last
        if split == "val":
            result = self._evaluate(self.workload.test)
            test = {"test/loss": result.loss, "test/metric": result.metric}
            test |= self._classification_figures("test/", result)
            figures |= {"final/test_loss": test["test/loss"], "final/test_metric": result.metric}
        if self.workload.is_classification:
            figures["final/test_accuracy"] = test["test/accuracy"]
            figures["final/test_balanced_accuracy"] = test["test/balanced_accuracy"]
            figures[f"best/{split}_accuracy"] = best
            figures["target/accuracy"] = self.config.target or None
        return figures

    def _finish(self) -> dict[str, Any]:
        cfg, st, stats = self.config, self.state, self.optimizer.stats
        nonfinite.check_weights(
            self, f"after the last iteration ({st.iteration}); model.pt was not written"
        )
        self.ranks.check(self)
        if self.is_main:
            runio.atomic_write_bytes(self.run_dir / "model.pt", runio.model_bytes(self.model))
            last = list(runio.read_jsonl(self.run_dir / "metrics.jsonl"))[-1]
        else:
            last = self._last_eval
        summary = {
            "optimizer": cfg.optimizer,
            "preset": cfg.preset,
            "workload": self.workload.name,
            "dataset": cfg.dataset if not cfg.workload else None,
            "model": cfg.model if not cfg.workload else None,
            "seed": cfg.seed,
            "iterations": st.iteration,
            "passes": self.passes,
            "backward_passes": stats.backward_passes,
            **self.strategy.figures(self),
            "epochs": st.iteration / self.n_b,
            "n_batches_per_epoch": self.n_b,
            "time/train_seconds": st.train_seconds,
            "images_per_second": st.iteration * cfg.batch_size / max(st.train_seconds, 1e-9),
            "metric/name": self.metric.name,
            "metric/higher_is_better": self.metric.higher_is_better,
            "evaluated/split": "validation" if self.validation is not None else "test",
            **self._final_figures(last),
            **stats.metrics(),
            "nonfinite/skipped": stats.nonfinite,
            "target/metric": cfg.target or None,
            "target/iteration": st.target.get("iteration"),
            "target/passes": st.target.get("passes"),
            "target/train_seconds": st.target.get("train_seconds"),
        }
        if self._cancelled is not None:
            summary["ended_early"] = self._cancelled
        if self.dist is not None:
            summary["distributed/world_size"] = self.dist.world_size
            summary["distributed/batch_sizes"] = list(self.sizes)
            summary["distributed/ranks_checked"] = self.ranks.checks
        if self.is_main:
            runio.write_json(self.run_dir / "summary.json", summary)
        return summary


def _state_of(dataset: Any) -> dict[str, Any]:
    """A data set's own ``state_dict()`` (the built-in image data: its augmentation), or {}."""
    return dataset.state_dict() if hasattr(dataset, "state_dict") else {}
