"""ISGD in a real Hugging Face Trainer (CPU): a tiny BERT from a config, gradient accumulation,
clipping that bites and a linear LR schedule stepped once per regular step; FSDP refused."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# the integrations extra (make test installs it); without it, skip rather than fail to collect
pytest.importorskip("transformers", reason="needs the integrations extra (.[integrations])")
# transformers' Trainer and isgd.integrations.huggingface need accelerate too
pytest.importorskip("accelerate", reason="needs the integrations extra (.[integrations])")
from transformers import TrainerCallback, TrainingArguments

from isgd import ISGD
from isgd.integrations.huggingface import ISGDTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import huggingface_example as example

pytestmark = pytest.mark.slow  # subprocesses and frameworks: make test, not test-fast


class RecordISGD(TrainerCallback):
    def __init__(self) -> None:
        self.steps: list[tuple] = []
        self.trainer = None

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        last = optimizer.optimizer.stats.last  # accelerate's wrapper → ISGD
        self.steps.append((state.global_step, last.loss, last.triggered, last.extra_iters,
                           last.loss_after, last.limit))  # fmt: skip


def weights(trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    record = RecordISGD()
    trainer = example.main(["--out", str(tmp_path_factory.mktemp("hf"))], callbacks=(record,))
    return trainer, record


def test_trainer_runs_isgd_extra_iterations_with_accumulation(run):
    trainer, record = run
    stats = trainer.isgd.stats
    steps = trainer.state.global_step
    assert steps == stats.steps == 48  # 6 epochs × 8 optimizer steps of 2 micro-batches
    assert trainer.isgd.window == 8  # window=None: the Trainer's optimizer steps per epoch
    assert stats.triggers > 0 and stats.extra_iters > 0
    for _, loss, triggered, extra, after, limit in record.steps:
        if triggered:  # the replays reached the limit, or the cap stopped them
            assert loss > limit and (extra == trainer.isgd.max_extra_iters or after <= limit)
    # the Trainer's logged loss is the regular ψ of the step (both micro-batches), not a replay's
    logged = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    for step, loss, *_ in record.steps:
        assert logged[step] == pytest.approx(loss, abs=1e-4)
    assert any("isgd/trigger_rate" in h for h in trainer.state.log_history)


def test_lr_schedule_steps_once_per_regular_step(run):
    trainer, _ = run
    assert trainer.isgd.stats.extra_iters > 0
    assert trainer.lr_scheduler.last_epoch == trainer.state.global_step
    for h in trainer.state.log_history:
        if "learning_rate" in h:  # the rate the step used, before the schedule advanced
            assert h["learning_rate"] == pytest.approx(0.05 * (1 - (h["step"] - 1) / 48))


def test_clipping_bites(run, tmp_path):
    trainer, _ = run
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert sum(n > 0.5 for n in norms) > len(norms) // 2  # pre-clip norms above max_grad_norm
    unclipped = example.main(["--out", str(tmp_path), "--max-grad-norm", "0"])
    assert not torch.allclose(weights(trainer), weights(unclipped))


def test_a_plain_optimizer_is_refused_in_one_line(tmp_path):
    model = torch.nn.Linear(2, 2)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1)
    trainer = ISGDTrainer(
        model=model, args=args, train_dataset=example.Sequences(),
        optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"ISGDTrainer needs an isgd.ISGD optimizer, got SGD"):
        trainer.train()


def test_a_window_the_run_cannot_fill_is_warned(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="isgd.integrations.huggingface"):
        trainer = example.main(["--out", str(tmp_path), "--epochs", "1", "--window", "20"])
    assert trainer.isgd.stats.triggers == 0
    assert "window is 20 but this run has 8 optimizer steps" in caplog.text


def test_fsdp_is_refused_when_the_trainer_is_built_in_one_line(tmp_path, monkeypatch):
    """TrainingArguments(fsdp=...): ISGDTrainer's refusal comes before the Trainer's own (which
    would name a route, create_optimizer, that does not make ISGD correct either)."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")  # restored after the test, whatever sets it
    model = torch.nn.Linear(2, 2)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1,
                             fsdp="full_shard")  # fmt: skip
    opt = ISGD(model.parameters(), lr=0.1, window=4)
    with pytest.raises(
        ValueError, match=r"^ISGDTrainer supports one process and DDP, not FSDP"
    ) as info:
        ISGDTrainer(
            model=model, args=args, train_dataset=example.Sequences(), optimizers=(opt, None)
        )
    assert "fully_shard" in str(info.value) and "\n" not in str(info.value)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch --use_fsdp
    plain = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1)
    with pytest.raises(ValueError, match=r"not FSDP"):
        ISGDTrainer(model, plain, train_dataset=example.Sequences(), optimizers=(opt, None))
