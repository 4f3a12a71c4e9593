"""ISGD in a real Hugging Face Trainer (CPU): a tiny BERT from a config, gradient accumulation,
clipping that bites and a linear LR schedule stepped once per regular step; FSDP refused."""

from __future__ import annotations

import math
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
    import transformers

    # transformers 5 logs the rate the step used, before the schedule advanced; 4 the rate after
    used = int(transformers.__version__.split(".")[0]) >= 5
    for h in trainer.state.log_history:
        if "learning_rate" in h:
            assert h["learning_rate"] == pytest.approx(0.05 * (1 - (h["step"] - used) / 48))


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


# ---------------------------------------------------------------- fp16, emulated on the CPU
# accelerate makes a GradScaler for fp16 only off the CPU (Accelerator: mixed_precision "fp16" and
# a device that is not "cpu"). The tests give the Trainer's accelerator, before train() prepares
# the model and the optimizer, what it makes on CUDA: the scaler (a CPU GradScaler) and
# native_amp, which turns on its unscale before clipping and autocast of the model's forward. The
# Trainer, accelerate's optimizer wrapper and ISGDTrainer then run their fp16 code as on a GPU.
FP16_STEPS = 16  # one epoch of 8 optimizer steps fills the chart; ISGD triggers in the second


class FP16Record(TrainerCallback):
    """Per step: ISGD's record, the scale after the step, the LR schedule's count, the weights."""

    def __init__(self) -> None:
        self.steps: list[tuple] = []
        self.scales: list[float] = []
        self.schedule: list[int] = []
        self.weights: list[torch.Tensor] = []
        self.trainer = None

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        last = trainer.isgd.stats.last
        self.steps.append((last.skipped, last.triggered, last.extra_iters, last.loss, last.limit))
        scaler = trainer.accelerator.scaler
        self.scales.append(None if scaler is None else scaler.get_scale())
        self.schedule.append(trainer.lr_scheduler.last_epoch)
        self.weights.append(weights(trainer).clone())


class Poisoned(ISGDTrainer):
    """An inf put into one gradient element, after backward (so after the scaler's scaling): in
    the last micro-batch of the regular pass of step ``regular`` (1-based), and in the second
    replay of the first triggered step after it that runs two replays."""

    regular = 11

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.poisoned: list[tuple[int, str]] = []
        self._calls: dict[tuple[int, bool], int] = {}
        first = next(self.model.parameters())
        first.register_hook(self._poison)

    def _poison(self, grad: torch.Tensor) -> torch.Tensor:
        step, replay = self.state.global_step + 1, self.isgd.in_extra_iteration
        calls = self._calls[step, replay] = self._calls.get((step, replay), 0) + 1
        k = self.args.gradient_accumulation_steps
        regular = not replay and step == self.regular and calls == k
        second_replay = replay and step > self.regular and calls == 2 * k
        if regular or (second_replay and not any(w == "replay" for _, w in self.poisoned)):
            self.poisoned.append((step, "replay" if replay else "regular"))
            grad = grad.clone()
            grad.view(-1)[0] = math.inf
        return grad


def fp16_run(tmp_path, *, scaler=None, autocast=False, trainer_class=ISGDTrainer):
    """The example's tiny BERT, accumulation and clipping, FP16_STEPS steps; fp16 when
    ``scaler`` is given, autocast of the forward in float16 when ``autocast``."""
    from accelerate.utils import AutocastKwargs
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=example.LENGTH, num_labels=2,
    )  # fmt: skip
    model = BertForSequenceClassification(config)
    opt = ISGD(model.parameters(), window=None, sigma_factor=0.5, lr=0.05, momentum=0.9)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=example.BATCH,
        gradient_accumulation_steps=example.ACCUMULATE, max_steps=FP16_STEPS, max_grad_norm=0.5,
        lr_scheduler_type="linear", learning_rate=0.05, save_strategy="no", report_to=[],
        use_cpu=True, fp16=scaler is not None, disable_tqdm=True, seed=0, logging_steps=100,
    )  # fmt: skip
    record = FP16Record()
    trainer = trainer_class(
        model=model, args=args, train_dataset=example.Sequences(), optimizers=(opt, None),
        callbacks=[record],
    )  # fmt: skip
    record.trainer = trainer
    if scaler is not None:  # what accelerate makes on CUDA (see above)
        accelerator = trainer.accelerator
        assert accelerator.mixed_precision == "fp16" and accelerator.scaler is None
        accelerator.scaler, accelerator.native_amp = scaler, True
        if not autocast:
            accelerator.autocast_handler = AutocastKwargs(enabled=False)
    trainer.train()
    return trainer, record


@pytest.fixture
def fresh_accelerate():
    """accelerate's state singletons, reset after an fp16 run so that other tests start clean."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    return fp16_run(tmp_path_factory.mktemp("hf-fp32"))


@pytest.mark.numerics
def test_fp16_goes_through_the_scaler_and_takes_the_fp32_decisions(
    fp32_run, tmp_path, fresh_accelerate
):
    """A large constant power-of-two scale and no inf: the scaler's path (the loss scaled by
    accelerator.backward, unscaled before clipping, ISGD's unscale_ in the replays) changes no
    number, so the fp16 run is the fp32 run: decisions, ψ, limits and weights."""
    from isgd.integrations.huggingface import _ISGDTrainerOptimizer

    _, plain = fp32_run
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=10**6)
    trainer, scaled = fp16_run(tmp_path, scaler=scaler)
    assert type(trainer.optimizer) is _ISGDTrainerOptimizer  # ISGD steps accelerate's wrapper
    assert scaler._scale is not None and scaler.get_scale() == 2.0**16  # used, never backed off
    stats = trainer.isgd.stats
    assert stats.triggers > 0 and stats.extra_iters > 0 and stats.steps == FP16_STEPS
    assert [s[:3] for s in scaled.steps] == [s[:3] for s in plain.steps]  # skip, trigger, extra
    for mine, theirs in zip(scaled.steps, plain.steps):  # ψ and the limit (once there is one)
        assert (mine[4] is None) == (theirs[4] is None)
        assert [x for x in mine[3:] if x is not None] == pytest.approx(
            [x for x in theirs[3:] if x is not None], rel=1e-6
        )
    assert scaled.schedule == plain.schedule == list(range(1, FP16_STEPS + 1))
    torch.testing.assert_close(scaled.weights[-1], plain.weights[-1])


def test_fp16_an_inf_in_a_regular_pass_and_in_a_replay_backs_the_scale_off(
    fp32_run, tmp_path, fresh_accelerate
):
    _, plain = fp32_run
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10**6)
    trainer, run = fp16_run(tmp_path, scaler=scaler, trainer_class=Poisoned)
    (regular, _), (replayed, _) = trainer.poisoned  # one each
    assert trainer.poisoned == [(Poisoned.regular, "regular"), (replayed, "replay")]
    r, e = regular - 1, replayed - 1  # indices into the per-step lists
    assert run.steps[:r] == plain.steps[:r]  # until the first inf, the fp32 run
    # the regular pass's inf: the step is skipped (no update, not a trigger), the scale halves,
    # the LR schedule does not advance (as after torch's skipped step)
    assert run.steps[r][:3] == (True, False, 0)
    assert torch.equal(run.weights[r], run.weights[r - 1])
    assert run.schedule[r] == run.schedule[r - 1] == r
    # the replay's inf: the extra iterations end (the first one's update stays), the scale halves
    # after the step, as in ISGD.step(closure, grad_scaler=...); nothing non-finite got in
    assert run.steps[e][:3] == (False, True, 1)
    assert run.scales == [2.0**10] * r + [2.0**9] * (e - r) + [2.0**8] * (FP16_STEPS - e)
    assert all(bool(torch.isfinite(w).all()) for w in run.weights)
    assert trainer.lr_scheduler.last_epoch == FP16_STEPS - 1  # one step skipped


def test_fp16_with_autocast_runs_in_half_precision(tmp_path, fresh_accelerate):
    """The whole CUDA path on the CPU: the forward autocast to float16 as well."""
    dtypes: set[torch.dtype] = set()

    class Seen(ISGDTrainer):  # the classifier's output (accelerate casts the model's to fp32)
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.model.classifier.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    trainer, run = fp16_run(tmp_path, scaler=scaler, autocast=True, trainer_class=Seen)
    assert dtypes == {torch.float16}
    stats = trainer.isgd.stats
    assert stats.steps == FP16_STEPS and stats.triggers > 0 and stats.extra_iters > 0
    assert all(bool(torch.isfinite(w).all()) for w in run.weights)
    assert trainer.lr_scheduler.last_epoch == FP16_STEPS - sum(s[0] for s in run.steps)
