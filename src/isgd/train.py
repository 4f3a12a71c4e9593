"""The training loop behind ``isgd train``: timing, untimed evaluation, checkpoints, metrics.

Data sets are held in memory as tensors; batches come from :class:`FixedCycleBatchSampler` and are
gathered by index. Only training steps are timed (``time/train_seconds``); evaluation, checkpoints
and log writes happen outside the clock. A run resumed from its last checkpoint ends with the same
``model.pt`` as an uninterrupted one (CPU; same threads).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from isgd import runio
from isgd.config import ConfigError, TrainConfig, dump_toml, load_toml, lr_factor, resolve_config
from isgd.data import DataSplit, Preprocess, load_dataset
from isgd.models import build_model
from isgd.optim import ISGD
from isgd.runio import RunError
from isgd.sampler import FixedCycleBatchSampler
from isgd.spc import LossControlChart

__all__ = ["Trainer", "evaluate", "train"]

log = logging.getLogger("isgd.train")


def build_optimizer(config: TrainConfig, model: nn.Module, n_b: int) -> torch.optim.Optimizer:
    """The optimizer named by ``config.optimizer``; ``isgd-*`` wraps the matching base."""
    family = config.optimizer.removeprefix("isgd").lstrip("-") or "sgd"
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
        window=n_b,
        sigma_factor=config.sigma_factor,
        max_extra_iters=config.max_extra_iters,
        eps=config.eps,
        freeze_bn_stats=config.freeze_bn_stats,
        **kwargs,
    )


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on preprocessed ``x`` (eval mode)."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(1) == target).sum())
    model.train(was_training)
    return loss_sum / len(x), correct / len(x)


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


class Trainer:
    """One run: data, model, optimizer and run directory, ready to :meth:`run`."""

    def __init__(
        self,
        config: TrainConfig,
        run_dir: Path,
        data: DataSplit | None = None,
        data_dir: str | None = None,
    ) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        torch.set_num_threads(config.threads)
        self.device = torch.device("cpu")
        self.data = data if data is not None else load_dataset(config.dataset, data_dir)
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
            crop_padding=4 if config.augment else 0,
            flip=config.augment,
            channels_last=config.channels_last,
            seed=config.seed + 1,
        )
        # Without augmentation the whole set is normalised once: a step only gathers rows.
        self.x_train = None if config.augment else self.pre(self.data.x_train)
        self.x_test = self.pre(self.data.x_test)

        torch.manual_seed(config.seed)  # same initialisation for every optimizer of a seed
        self.model = build_model(
            config.model, self.data.in_channels, self.data.num_classes, self.data.image_size
        )
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(config, self.model, self.n_b)
        # SGD/Adam runs keep a chart too, for the records and plots (it never acts)
        self.chart = (
            self.optimizer.chart
            if isinstance(self.optimizer, ISGD)
            else LossControlChart(self.n_b, config.sigma_factor)
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda t: lr_factor(config, t, self.total)
        )
        self.state = _Progress()

    # ------------------------------------------------------------------ one step
    def batch(self, iteration: int) -> tuple[int, int, Tensor, Tensor]:
        epoch, batch_id = divmod(iteration, self.n_b)
        if batch_id == 0 or self._batches is None:
            self._batches = self.sampler.epoch_batches(epoch)
        idx = self._batches[batch_id]
        if self.x_train is None:
            x = self.pre(self.data.x_train[idx], train=True)
        else:
            x = self.x_train[idx]
        return epoch, batch_id, x, self.data.y_train[idx]

    def step(self, x: Tensor, y: Tensor) -> float:
        model, opt = self.model, self.optimizer
        if isinstance(opt, ISGD):

            def closure() -> Tensor:
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
            return opt.stats.last.loss
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    # ------------------------------------------------------------------ the run
    def run(self, progress: bool | None = None) -> dict[str, Any]:
        st = self.state
        writers = self._open_writers()
        if st.iteration == 0:
            self._evaluate_and_record(writers)
        self._batches = None
        bar = _make_bar(self.total, st.iteration, progress)
        try:
            while st.iteration < self.total:
                t = st.iteration
                start = time.perf_counter()
                epoch, batch_id, x, y = self.batch(t)
                limit = self.chart.limit  # before this loss joins (SGD runs: monitoring only)
                loss = self.step(x, y)
                self.scheduler.step()
                st.train_seconds += time.perf_counter() - start

                st.iteration = t + 1
                self._after_step(writers, epoch, batch_id, loss, limit, bar)
        finally:
            bar.close()
            for w in writers.values():
                w.close()
        return self._finish()

    def _after_step(self, writers, epoch: int, batch_id: int, loss: float, limit, bar) -> None:
        cfg, st = self.config, self.state
        if isinstance(self.optimizer, ISGD):
            s = self.optimizer.stats
            st.passes = s.passes
            rec = dict(
                triggered=s.last.triggered,
                extra_iters=s.last.extra_iters,
                loss_after=s.last.loss_after,
            )
        else:
            self.chart.update(loss)
            st.passes += 1
            rec = dict(triggered=False, extra_iters=0, loss_after=None)
        if math.isfinite(loss):
            st.interval_loss_sum += loss
            st.interval_steps += 1
        if cfg.step_records:
            writers["steps"].write(
                dict(
                    iteration=st.iteration,
                    epoch=epoch,
                    batch_id=batch_id,
                    loss=loss,
                    limit=limit,
                    **rec,
                    passes=st.passes,
                )
            )
        bar.update(1)
        if bar.disable and st.iteration % cfg.log_every == 0:
            log.info("%s", self._status_line())
        elif not bar.disable and st.iteration % 20 == 0:
            bar.set_postfix_str(self._status_line(short=True), refresh=False)
        if st.iteration % cfg.eval_every == 0 or st.iteration == self.total:
            self._evaluate_and_record(writers)
        if st.iteration % cfg.checkpoint_every == 0 and st.iteration < self.total:
            self._checkpoint(writers)

    def _status_line(self, short: bool = False) -> str:
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
        eta = (self.total - st.iteration) * st.train_seconds / max(st.iteration, 1)
        return f"iter {st.iteration}/{self.total} " + " | ".join(parts) + f" | ETA {eta:.0f}s"

    def _evaluate_and_record(self, writers) -> None:
        cfg, st = self.config, self.state
        test_loss, accuracy = evaluate(
            self.model, self.x_test, self.data.y_test, cfg.eval_batch_size
        )
        stats = getattr(self.optimizer, "stats", None)
        record = {
            "iteration": st.iteration,
            "epoch": st.iteration / self.n_b,
            "passes": st.passes,
            "time/train_seconds": st.train_seconds,
            "train/loss": (st.interval_loss_sum / st.interval_steps) if st.interval_steps else None,
            "test/loss": test_loss,
            "test/accuracy": accuracy,
            "lr": self.optimizer.param_groups[0]["lr"],
            "isgd/triggers": stats.triggers if stats else 0,
            "isgd/extra_iters": stats.extra_iters if stats else 0,
            "images_per_second": st.iteration * cfg.batch_size / st.train_seconds
            if st.train_seconds
            else None,
        }
        st.interval_loss_sum, st.interval_steps = 0.0, 0
        st.best_accuracy = max(st.best_accuracy, accuracy)
        if cfg.target_accuracy and not st.target and accuracy >= cfg.target_accuracy:
            st.target = {
                "iteration": st.iteration,
                "passes": st.passes,
                "train_seconds": st.train_seconds,
            }
        writers["metrics"].write(record)
        writers["metrics"].flush()
        if self._tb is not None:
            for key in ("test/loss", "test/accuracy", "train/loss", "lr", "isgd/triggers"):
                if record[key] is not None:
                    self._tb.add_scalar(key, record[key], st.iteration)
            self._tb.add_scalar("test/accuracy_vs_passes", accuracy, st.passes)
            self._tb.flush()
        if st.iteration:
            log.info(
                "eval at iter %d: test accuracy %.2f%%, test loss %.4f (%.1f s of training)",
                st.iteration,
                100 * accuracy,
                test_loss,
                st.train_seconds,
            )

    # ------------------------------------------------------------------ files
    def _open_writers(self) -> dict[str, runio.JsonlWriter]:
        self._tb = None
        if self.config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # on resume, drop the events logged after the checkpoint (they are redone)
            purge = self.state.iteration + 1 if self.state.iteration else None
            self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=purge)
        return {
            "metrics": runio.JsonlWriter(self.run_dir / "metrics.jsonl"),
            "steps": runio.JsonlWriter(self.run_dir / "steps.jsonl"),
        }

    def _checkpoint(self, writers) -> None:
        for w in writers.values():
            w.flush()
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
        }
        runio.save_checkpoint(self.run_dir / "checkpoints", self.state.iteration, state)

    def restore(self, checkpoint: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            if not isinstance(self.optimizer, ISGD):
                self.chart.load_state_dict(checkpoint["chart"])
            self.scheduler.load_state_dict(checkpoint["scheduler"])
            self.pre.load_state_dict(checkpoint["preprocess"])
            torch.set_rng_state(checkpoint["torch_rng"])
            self.state = _Progress(**checkpoint["progress"])
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            raise RunError(
                f"checkpoint does not match this run's model or optimizer: {first}"
            ) from None
        for name in ("metrics.jsonl", "steps.jsonl"):
            runio.truncate_jsonl(self.run_dir / name, self.state.iteration)

    def _finish(self) -> dict[str, Any]:
        cfg, st = self.config, self.state
        runio.atomic_write_bytes(self.run_dir / "model.pt", _state_dict_bytes(self.model))
        stats = getattr(self.optimizer, "stats", None)
        last = list(runio.read_jsonl(self.run_dir / "metrics.jsonl"))[-1]
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
            "final/test_loss": last["test/loss"],
            "best/test_accuracy": st.best_accuracy,
            "isgd/triggers": stats.triggers if stats else 0,
            "isgd/extra_iters": stats.extra_iters if stats else 0,
            "isgd/trigger_rate": stats.trigger_rate if stats else 0.0,
            "target/accuracy": cfg.target_accuracy or None,
            "target/iteration": st.target.get("iteration"),
            "target/passes": st.target.get("passes"),
            "target/train_seconds": st.target.get("train_seconds"),
        }
        runio.write_json(self.run_dir / "summary.json", summary)
        if self._tb is not None:
            self._tb.close()
        return summary


def _state_dict_bytes(model: nn.Module) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, buffer)
    return buffer.getvalue()


def _make_bar(total: int, initial: int, progress: bool | None):
    from tqdm.auto import tqdm

    if progress is None:
        progress = sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=initial,
        disable=not progress,
        unit="it",
        dynamic_ncols=True,
        mininterval=0.5,
        smoothing=0.05,
    )


# ---------------------------------------------------------------------- entry points
def check_new_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise RunError(
            f"run directory {run_dir} already exists and is not empty; choose another --out, "
            f"or continue it with --resume {run_dir}"
        )


def prepare_run_dir(run_dir: Path) -> None:
    check_new_run_dir(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RunError(f"cannot write to run directory {run_dir}: {err.strerror}") from None


def train(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    data_dir: str | None = None,
    data: DataSplit | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train a fresh run into ``run_dir`` (which must not exist or be empty); ``data`` skips
    loading the data set (callers that train several runs on it load it once)."""
    run_dir = Path(run_dir)
    check_new_run_dir(run_dir)  # fail fast, before loading anything
    trainer = Trainer(config, run_dir, data=data, data_dir=data_dir)
    prepare_run_dir(run_dir)  # created only once data and model are known to be good
    runio.atomic_write_text(run_dir / "config.toml", dump_toml(config))
    runio.write_json(run_dir / "provenance.json", runio.provenance(config.threads))
    log.info(
        "training %s with %s on %s: %d iterations (%d batches per epoch) -> %s",
        config.model,
        config.optimizer,
        config.dataset,
        trainer.total,
        trainer.n_b,
        run_dir,
    )
    return trainer.run(progress)


def resume(
    run_dir: str | Path, *, data_dir: str | None = None, progress: bool | None = None
) -> dict[str, Any]:
    """Continue ``run_dir`` from its last checkpoint."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise RunError(f"{run_dir} is not a run directory (no config.toml); nothing to resume")
    if (run_dir / "summary.json").is_file():
        raise RunError(f"{run_dir} has finished (summary.json is there); nothing to resume")
    config = resolve_config(config_file=run_dir / "config.toml")
    config.preset = load_toml(run_dir / "config.toml").get("preset", "")
    checkpoint_path = runio.latest_checkpoint(run_dir / "checkpoints")
    trainer = Trainer(config, run_dir, data_dir=data_dir)
    if checkpoint_path is None:
        log.info("no checkpoint in %s: starting it from the beginning", run_dir)
        for name in ("metrics.jsonl", "steps.jsonl"):
            (run_dir / name).unlink(missing_ok=True)
    else:
        trainer.restore(runio.load_checkpoint(checkpoint_path))
        log.info("resuming %s from iteration %d", run_dir, trainer.state.iteration)
    return trainer.run(progress)
