"""Components of the training loop: each observes the loop's events and owns its state.

:meth:`isgd.training.train.Trainer.train_iteration` calls, for every callback in order:

==================================  ==============================================================
``on_run_start(trainer)``           before the loop (a resumed run: before its next step)
``on_step_end(trainer, record)``    after each iteration; ``record`` is its ``steps.jsonl`` line
``on_evaluation(trainer, record)``  after each evaluation; ``record`` is its ``metrics.jsonl`` line
``on_checkpoint(trainer)``          before a checkpoint is written: what it covers is on disk
``on_run_end(trainer)``             last, always (after an error too): release what was opened
==================================  ==============================================================

OLMo-core's ``Callback(Stateful)`` is the model: a callback that carries state across a resume
returns it from :meth:`Callback.state_dict` and takes it back in :meth:`Callback.load_state_dict`;
the checkpoint holds it under the class's name. The trainer's own, in order: :class:`RunRecords`
(the files), :class:`ProgressDisplay` (the terminal), :class:`RankAgreement` (data parallel); a
caller's come after them (``Trainer(..., callbacks=[...])``). When to evaluate and to checkpoint
is the loop's own text, not a callback. A callback may end the run early with
``trainer.cancel_run(reason)`` (the batch study stops a run at its target so).
"""

from __future__ import annotations

import contextlib
import logging
import math
import struct
import sys
import zlib
from time import perf_counter
from typing import TYPE_CHECKING, Any

from isgd.errors import RunError
from isgd.training import distributed, runio

if TYPE_CHECKING:
    from isgd.training.train import Trainer

__all__ = [
    "Callback",
    "ProgressDisplay",
    "RankAgreement",
    "RunRecords",
]

log = logging.getLogger(__name__)

TENSORBOARD_KEYS = ("test/loss", "test/accuracy", "train/loss", "lr", "isgd/triggers")
# and the workload's metric under its own name: test/<name>, test/<name>_vs_passes


class Callback:
    """A component of the loop; every hook does nothing unless overridden, and a callback
    without state returns ``{}`` from :meth:`state_dict` (nothing is checkpointed for it)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def on_run_start(self, trainer: Trainer) -> None:
        pass

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        pass

    def on_evaluation(self, trainer: Trainer, record: dict[str, Any]) -> None:
        pass

    def on_checkpoint(self, trainer: Trainer) -> None:
        pass

    def on_run_end(self, trainer: Trainer) -> None:
        pass


class RunRecords(Callback):
    """``steps.jsonl``, ``metrics.jsonl`` and TensorBoard events, on rank 0 only.

    A line is flushed with each evaluation and before each checkpoint, so that a checkpoint never
    covers records that are not on disk; :meth:`close` raises :class:`runio.WriteError` when the
    last lines cannot be written (the loop then reports it), :meth:`on_run_end` never does.
    """

    def __init__(self) -> None:
        self._files: dict[str, runio.JsonlWriter] = {}
        self._tb: Any = None
        self.step_records = True

    def on_run_start(self, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        self.step_records = trainer.config.step_records
        if trainer.config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # on resume, drop the events logged after the checkpoint (they are redone)
            purge = trainer.state.iteration + 1 if trainer.state.iteration else None
            self._tb = SummaryWriter(str(trainer.run_dir / "tb"), purge_step=purge)
        for name in ("metrics", "steps"):
            self._files[name] = runio.JsonlWriter(trainer.run_dir / f"{name}.jsonl")

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if self.step_records and "steps" in self._files:
            self._files["steps"].write(record)

    def on_evaluation(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if "metrics" not in self._files:
            return
        self._files["metrics"].write(record)
        self._files["metrics"].flush()
        if self._tb is not None:
            for key in TENSORBOARD_KEYS:
                if record.get(key) is not None:
                    self._tb.add_scalar(key, record[key], record["iteration"])
            split = trainer.watched  # test, or val with a validation split
            value, metric = record[f"{split}/metric"], f"{split}/{trainer.metric.name}"
            if metric not in TENSORBOARD_KEYS:
                self._tb.add_scalar(metric, value, record["iteration"])
            self._tb.add_scalar(f"{metric}_vs_passes", value, record["passes"])
            self._tb.flush()

    def on_checkpoint(self, trainer: Trainer) -> None:
        self.flush()

    def flush(self) -> None:
        for f in self._files.values():
            f.flush()

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def on_run_end(self, trainer: Trainer) -> None:
        for f in self._files.values():
            with contextlib.suppress(RunError):  # already failed and reported
                f.close()
        self._files = {}
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class ProgressDisplay(Callback):
    """A progress bar (status every 20 iterations) on a terminal, plain status lines every
    ``log_every`` iterations otherwise, and one line per evaluation (no bar off rank 0).

    Both show the ETA of the whole run from the ``EARLY``-th iteration on (a few seconds in):
    the remaining iterations at this session's wall-clock seconds per iteration (evaluations left
    out) plus the evaluations still due at the measured cost of one (the one at iteration 0 is
    the first measurement).

    ``enabled``: show the bar (None: when stderr is a terminal); set before the run starts.
    """

    EARLY = 10  # iterations into the session: the first status line, with the first ETA

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = enabled
        self._bar: Any = None
        self._start = self._mark = self._eval_total = 0.0
        self._evals = self._start_iteration = 0

    def on_run_start(self, trainer: Trainer) -> None:
        from tqdm.auto import tqdm

        enabled = self.enabled if trainer.is_main else False
        if enabled is None:
            enabled = sys.stderr.isatty()
        self._bar = tqdm(
            total=trainer.total,
            initial=trainer.state.iteration,
            disable=not enabled,
            unit="it",
            dynamic_ncols=True,
            mininterval=0.5,
            # not tqdm's remaining time, which takes the evaluation at iteration 0 for the pace
            # of the first iterations: the postfix shows the run's ETA (eta_seconds)
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
        )
        self._start = self._mark = perf_counter()
        self._eval_total, self._evals = 0.0, 0
        self._start_iteration = trainer.state.iteration

    def eta_seconds(self, trainer: Trainer) -> float | None:
        """Seconds left in the run: the remaining iterations and evaluations at this session's
        pace; None before the first iteration of the session."""
        done = trainer.state.iteration - self._start_iteration
        if done <= 0:
            return None
        stepping = perf_counter() - self._start - self._eval_total
        per_eval = self._eval_total / self._evals if self._evals else 0.0
        return (trainer.total - trainer.state.iteration) * stepping / done + per_eval * (
            evaluations_left(trainer.state.iteration, trainer.total, trainer.config.eval_every)
        )

    def eta_text(self, trainer: Trainer) -> str:
        eta = self.eta_seconds(trainer)
        return "ETA -" if eta is None else f"ETA {format_duration(eta)}"

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        bar, iteration = self._bar, trainer.state.iteration
        bar.update(1)
        early = iteration - self._start_iteration == self.EARLY
        if bar.disable and (early or iteration % trainer.config.log_every == 0):
            log.info("%s", trainer.status_line())
        elif not bar.disable and (early or iteration % 20 == 0):
            status = f"{self.eta_text(trainer)} | {trainer.status_line(short=True)}"
            bar.set_postfix_str(status, refresh=False)
        self._mark = perf_counter()  # an evaluation due now starts after the display

    def on_evaluation(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self._eval_total += perf_counter() - self._mark
        self._evals += 1
        if record["iteration"]:
            log.info(
                "eval at iter %d: %s %s, %s loss %.4f (%.1f s of training)",
                record["iteration"],
                trainer.watched,
                trainer.metric.format(record[f"{trainer.watched}/metric"]),
                trainer.watched,
                record[f"{trainer.watched}/loss"],
                record["time/train_seconds"],
            )

    def on_run_end(self, trainer: Trainer) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def evaluations_left(iteration: int, total: int, eval_every: int) -> int:
    """Evaluations after ``iteration``: every ``eval_every`` iterations and at the last one
    (:meth:`isgd.training.train.Trainer.train_iteration`)."""
    if iteration >= total:
        return 0
    return total // eval_every - iteration // eval_every + (1 if total % eval_every else 0)


def format_duration(seconds: float) -> str:
    """``45s``, ``4m10s``, ``1h02m``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class RankAgreement(Callback):
    """Under data parallelism, proof that every rank took the same steps: a CRC32 of every
    step's decision (iteration, ψ, triggered, extra iterations, ψ after them) and, at every
    checkpoint and at the end of the run, a comparison across ranks (a collective) of the
    weights, the optimizer state, the control chart and that CRC. A mismatch stops the run.
    Does nothing in one process."""

    def __init__(self) -> None:
        self.digest = 0
        self.checks = 0

    def state_dict(self) -> dict[str, Any]:
        return {"digest": self.digest, "checks": self.checks} if self.digest else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.digest, self.checks = state.get("digest", 0), state.get("checks", 0)

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if trainer.dist is None:
            return
        after = record["loss_after"]
        packed = struct.pack(
            "<qd?qd",
            record["iteration"],
            record["loss"],
            bool(record["triggered"]),
            int(record["extra_iters"]),
            math.nan if after is None else after,
        )
        self.digest = zlib.crc32(packed, self.digest)

    def on_checkpoint(self, trainer: Trainer) -> None:
        self.check(trainer)

    def check(self, trainer: Trainer) -> None:
        if trainer.dist is None:
            return
        st = trainer.state
        fingerprint = distributed.digest(
            [p.detach() for p in trainer.model.parameters()],
            trainer.optimizer.state_dict(),  # the base optimizer's, the chart, the counters
            [st.iteration, self.digest],
        )
        distributed.check_identical(
            trainer.dist,
            fingerprint,
            f"the weights, optimizer state, control chart and decisions at iteration "
            f"{st.iteration}",
        )
        self.checks += 1
