"""The progress line: a first ETA for the whole run a few iterations in, counting the
evaluations still due."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from isgd.training import callbacks
from isgd.training.callbacks import ProgressDisplay, evaluations_left, format_duration
from isgd.training.config import TrainConfig
from isgd.training.lifecycle import train


def test_evaluations_left_counts_every_eval_every_and_the_last():
    assert evaluations_left(0, 5000, 500) == 10  # 500, 1000, ..., 5000
    assert evaluations_left(10, 5000, 500) == 10
    assert evaluations_left(500, 5000, 500) == 9
    assert evaluations_left(0, 1050, 500) == 3  # 500, 1000 and the last, 1050
    assert evaluations_left(1000, 1050, 500) == 1
    assert evaluations_left(1050, 1050, 500) == 0


def test_format_duration():
    assert [format_duration(s) for s in (0, 44.6, 60, 250, 3599, 3600, 7322)] == [
        "0s", "45s", "1m00s", "4m10s", "59m59s", "1h00m", "2h02m",
    ]  # fmt: skip


def test_eta_counts_remaining_iterations_and_evaluations(monkeypatch, caplog):
    """A 3 s evaluation at iteration 0, then 0.5 s per iteration: the status line at iteration
    10 (not 100) says 990 × 0.5 s + 10 evaluations × 3 s; the evaluation does not count as pace."""
    clock = [100.0]
    monkeypatch.setattr(callbacks, "perf_counter", lambda: clock[0])
    display = ProgressDisplay(enabled=False)
    state = SimpleNamespace(iteration=0)
    trainer = SimpleNamespace(
        is_main=True,
        total=1000,
        state=state,
        config=SimpleNamespace(log_every=100, eval_every=100),
    )
    trainer.status_line = lambda: f"iter {state.iteration} | {display.eta_text(trainer)}"
    caplog.set_level(logging.INFO, logger="isgd.training.callbacks")
    display.on_run_start(trainer)
    assert display.eta_text(trainer) == "ETA -"
    clock[0] += 3.0
    display.on_evaluation(trainer, {"iteration": 0})
    for _ in range(10):
        clock[0] += 0.5
        state.iteration += 1
        display.on_step_end(trainer, {})
    display.on_run_end(trainer)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["iter 10 | ETA 8m45s"]  # 495 s + 30 s
    assert display.eta_seconds(trainer) == pytest.approx(525.0)


def test_a_run_shows_its_eta_from_the_tenth_iteration(tiny_idx_dir: Path, tmp_path, caplog):
    config = TrainConfig(
        dataset=f"idx:{tiny_idx_dir}",
        model="mlp",
        batch_size=16,
        lr=0.05,
        lr_policy="fixed",
        iters=30,
        eval_every=20,
        log_every=20,
        threads=1,
        tensorboard=False,
    ).validate()
    caplog.set_level(logging.INFO, logger="isgd.training.callbacks")
    train(config, tmp_path / "run", progress=False)
    status = [r.getMessage() for r in caplog.records if r.getMessage().startswith("iter ")]
    assert [s.split()[1] for s in status] == ["10/30", "20/30"]
    assert all(re.search(r"\| ETA \d+s$", s) for s in status), status
