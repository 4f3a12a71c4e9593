"""ISGD's relatives as arms: SkipStep, Selective Backprop and their random controls.

Each rule on a synthetic stream (which steps are skipped or selected, what is charged), SkipStep
with an infinite σ factor bit-identical to its base optimizer, end-to-end runs of ``isgd train``
that check the recorded counters, and the rank consistency of both on 2 gloo ranks.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from isgd.cli import main
from isgd.errors import ConfigError
from isgd.experiments import Workload
from isgd.experiments.budgets import cost
from isgd.experiments.compare import Arm, _random_control, parse_arm, skips_work
from isgd.experiments.records import run_record
from isgd.training import runio
from isgd.training.config import OPTIMIZERS, TrainConfig, resolve_config
from isgd.training.optimizer import build_optimizer
from isgd.training.relatives import (
    SkipRule,
    SkipStepISGD,
    per_example_losses,
    random_draw,
    select_at_random,
    select_by_loss,
    selecting,
)
from tests.fixtures import join_gloo, leave_rank, run_two_ranks
from tests.training.test_workload import CLASSIFIER as PLAIN_CLASSIFIER

# test_workload's classifier, with BatchNorm (the rewound statistics of a skipped step are
# exercised too)
CLASSIFIER = PLAIN_CLASSIFIER.replace(
    "nn.Linear(12, 16), nn.ReLU()", "nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU()"
)
assert CLASSIFIER != PLAIN_CLASSIFIER
ITERS, BATCH, N_TRAIN = 60, 32, 320  # 10 batches per epoch
SKIPPED = "skipstep/skipped"


@pytest.fixture
def classifier(tmp_path) -> str:
    path = tmp_path / "wl.py"
    path.write_text(textwrap.dedent(CLASSIFIER))
    return f"{path}:workload"


def _train(spec: str, out: Path, *extra: str) -> dict:
    argv = ["train", "--workload", spec, "--out", str(out), "--iters", str(ITERS)]
    argv += ["--eval-every", "20", "--checkpoint-every", "30", "--batch-size", str(BATCH)]
    argv += ["--lr", "0.05", "--threads", "1", "--no-progress", "--no-tensorboard", *extra]
    assert main(argv) == 0
    return runio.read_json(out / "summary.json")


def _steps(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------ names and keys
def test_optimizer_names_and_keys():
    for name in ("adamw", "isgd-adamw", "skipstep", "skipstep-adamw", "selective-backprop"):
        assert name in OPTIMIZERS
    assert parse_arm("selective-backprop:keep=0.25") == Arm(
        "selective-backprop", {"optimizer": "selective-backprop", "keep": 0.25}
    )
    config = resolve_config(overrides=dict(optimizer="isgd-adamw", lr=1e-3, weight_decay=0.1))
    opt = build_optimizer(config, nn.Linear(2, 2), n_b=10)
    assert type(opt.base_optimizer) is torch.optim.AdamW and opt.max_extra_iters == 5
    assert opt.param_groups[0]["weight_decay"] == 0.1
    cases = [
        (dict(optimizer="skipstep", random_skip_steps=0.1), "random_skip_steps"),
        (dict(optimizer="isgd", random_keep=0.5), "random_keep"),
        (dict(optimizer="selective-backprop", keep=0.0), "keep"),
        (dict(optimizer="selective-backprop", keep_start=0.9, keep_end=0.5), "keep_end"),
        (dict(optimizer="skipstep", skip_sigma_factor=float("nan")), "skip_sigma_factor"),
    ]
    for overrides, key in cases:
        with pytest.raises(ConfigError, match=f"^invalid {key}: "):
            resolve_config(overrides=overrides)
    with pytest.raises(ConfigError, match="one process only"):  # as the forward-only variant
        config = resolve_config(overrides=dict(optimizer="sgd", random_skip_steps=0.1))
        build_optimizer(config, nn.Linear(2, 2), n_b=10, data_parallel=True, total=100)


# ------------------------------------------------------------------------------ SkipStep
def test_skip_rule_on_a_synthetic_stream_of_losses():
    # window N = 8: acts from max(2, N/2) = 4 losses on, this one counted
    rule = SkipRule(sigma_factor=6, window=8)
    stream = [1.0, 100.0, 1.1, 0.9, 1.0, 1.05, 100.0, 100.0]
    # 100 at step 1: too few losses; at step 6 (window 1.0 ... 1.05 and the first 100): 100 −
    # 20.8 ≈ 79 < 6 × 44: kept; the second 100 follows a skipped 100 that joined the window
    assert [rule.judge(x) for x in stream] == [False] * 8
    rule = SkipRule(sigma_factor=6, window=8)
    stream = [1.0, 1.1, 0.9, 1.0, 100.0, 100.0, 1.0]
    assert [rule.judge(x) for x in stream] == [False, False, False, False, True, False, False]
    assert list(rule.losses) == stream  # every loss joins the window, the skipped one too
    # the window slides: the spike leaves it after N + 1 more losses
    rule = SkipRule(sigma_factor=3, window=4)
    decisions = [rule.judge(x) for x in [1.0, 1.2, 0.8, 5.0, 1.0, 1.1, 0.9, 1.0, 1.1, 5.0]]
    assert decisions == [False, False, False, True] + [False] * 5 + [True]
    # a gradient norm beyond its own band skips a step with an ordinary loss
    rule = SkipRule(sigma_factor=3, window=4)
    norms = [2.0, 2.2, 1.8, 9.0]
    assert [rule.judge(1.0 + i / 10, g) for i, g in enumerate(norms)] == [False] * 3 + [True]
    # k = ∞ never skips, even on a window of equal losses (σ = 0)
    rule = SkipRule(sigma_factor=math.inf, window=4)
    assert not any(rule.judge(x, x) for x in [1.0, 1.0, 1.0, 1.0, 1e30])


def test_a_skipped_step_changes_neither_the_weights_nor_the_base_optimizers_state():
    torch.manual_seed(0)
    for base, kwargs in [(torch.optim.SGD, dict(momentum=0.9)), (torch.optim.AdamW, {})]:
        model = nn.Linear(4, 1)
        opt = SkipStepISGD(
            model.parameters(), base, rule=SkipRule(3, 4), grad_norm=True, window=4,
            max_extra_iters=0, lr=0.01, weight_decay=1e-3, **kwargs,
        )  # fmt: skip
        x = torch.randn(8, 4)

        def closure(scale: float):
            def run():
                opt.zero_grad()
                loss = F.mse_loss(model(x), scale * x.sum(1, keepdim=True))
                loss.backward()
                return loss

            return run

        for _ in range(4):
            opt.step(closure(1.0))
        before = [p.detach().clone() for p in model.parameters()]
        state = copy.deepcopy(opt.base_optimizer.state_dict()["state"])
        opt.step(closure(100.0))  # a loss and a gradient far beyond the window's
        assert opt.stats.last.skipped and opt.skipped == 1 and opt.stats.nonfinite == 0
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        after = opt.base_optimizer.state_dict()["state"]
        assert state.keys() == after.keys() and all(
            state[i].keys() == after[i].keys()
            and all(torch.equal(state[i][k], after[i][k]) for k in state[i])
            for i in state
        )  # momentum buffers; Adam's moments and step count
        opt.step(closure(1.0))  # the next ordinary step is applied
        assert not opt.stats.last.skipped
        assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        restored = SkipStepISGD(
            nn.Linear(4, 1).parameters(), base, rule=SkipRule(3, 4), window=4,
            max_extra_iters=0, lr=0.01, **kwargs,
        )  # fmt: skip
        restored.load_state_dict(opt.state_dict())
        assert restored.skipped == 1 and list(restored.rule.losses) == list(opt.rule.losses)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_skipstep_with_an_infinite_sigma_factor_is_its_base_optimizer_bit_for_bit(
    classifier, tmp_path, base
):
    skipstep = "skipstep" if base == "sgd" else f"skipstep-{base}"
    flags = ["--skip-sigma-factor", "inf", "--skip-grad-norm", "--skip-window", "4"]
    summary = _train(classifier, tmp_path / "skip", "--optimizer", skipstep, *flags)
    _train(classifier, tmp_path / "base", "--optimizer", base)
    assert summary["skipstep/skipped"] == 0
    assert (tmp_path / "skip" / "model.pt").read_bytes() == (
        tmp_path / "base" / "model.pt"
    ).read_bytes()


def test_skipstep_run_records_its_skipped_steps_and_resumes_bit_identically(classifier, tmp_path):
    flags = ["--optimizer", "skipstep", "--skip-sigma-factor", "0.5", "--skip-window", "8"]
    summary = _train(classifier, tmp_path / "whole", *flags)
    steps = _steps(tmp_path / "whole")
    skipped = [s["iteration"] for s in steps if s["skipped"]]
    assert 0 < len(skipped) == summary["skipstep/skipped"] < ITERS
    assert min(skipped) >= 4  # the window acts from max(2, 8 / 2) losses on
    assert summary["passes"] == summary["backward_passes"] == ITERS  # a skip runs its backward
    assert summary["nonfinite/skipped"] == 0
    # a checkpoint at 30, then the rest: the window and the count come back with the optimizer
    cut = tmp_path / "cut"
    _train(classifier, cut, *flags, "--iters", "30")
    (cut / "summary.json").unlink()
    (cut / "model.pt").unlink()
    (cut / "config.toml").write_text(
        (cut / "config.toml").read_text().replace("iters = 30", f"iters = {ITERS}")
    )
    assert main(["train", "--resume", str(cut), "--no-progress"]) == 0
    assert (cut / "model.pt").read_bytes() == (tmp_path / "whole" / "model.pt").read_bytes()
    assert runio.read_json(cut / "summary.json")["skipstep/skipped"] == len(skipped)


# ------------------------------------------------------------------------------ selective backprop
def test_selective_backprop_schedule_is_composers():
    config = TrainConfig(optimizer="selective-backprop")  # start 0.5, end 0.9, interrupt 2
    # 20 iterations of 5 batches: selecting in [10, 18), on batches 0, 2, 4 of an epoch
    assert [t for t in range(20) if selecting(config, t, 20, t % 5)] == [10, 12, 14, 15, 17]
    every = TrainConfig(keep_interrupt=0, keep_start=0.0, keep_end=0.25)
    assert [t for t in range(20) if selecting(every, t, 20, t % 5)] == [0, 1, 2, 3, 4]
    assert not any(selecting(TrainConfig(keep=1.0), t, 20, t % 5) for t in range(20))


def test_selection_by_loss_keeps_higher_losses_more_often():
    losses = torch.tensor([0.3, 2.0, 0.1, 1.0])  # ranks by loss: 2, 0, 3, 1
    counts = torch.zeros(4)
    for seed in range(2000):
        rows = select_by_loss(losses, 2, 0.5, torch.Generator().manual_seed(seed))
        assert len(rows) == 2 and rows.tolist() == sorted(set(rows.tolist()))
        counts[rows] += 1
    # keep ½: drawn by percentile weights 1:3:5:7 without replacement
    assert counts[1] > counts[3] > counts[0] > counts[2] > 0
    assert counts.sum() == 4000
    same = [select_by_loss(losses, 2, 0.5, torch.Generator().manual_seed(3)) for _ in "ab"]
    assert torch.equal(*same)
    rows = select_at_random(10, 4, torch.Generator().manual_seed(0))
    assert len(set(rows.tolist())) == 4 and rows.tolist() == sorted(rows.tolist())


def test_per_example_losses_need_a_loss_that_gives_them():
    out, y = torch.randn(4, 3, 5), torch.randint(0, 3, (4, 5))  # 4 sequences of 5 tokens
    per_example = per_example_losses(F.cross_entropy, out, y)
    assert per_example.shape == (4,)
    torch.testing.assert_close(per_example.mean(), F.cross_entropy(out, y))
    with pytest.raises(ConfigError, match=r"gives \(\), not one value per example"):
        per_example_losses(lambda o, t, reduction: o.sum(), out, y)


def test_selective_backprop_run_charges_the_selection_forward_and_the_kept_half(
    classifier, tmp_path
):
    run = tmp_path / "sb"
    summary = _train(classifier, run, "--optimizer", "selective-backprop")
    # 60 iterations of 10 batches: selecting in [30, 54) on even batch ids, 16 of 32 kept
    selected = [t for t in range(ITERS) if 30 <= t < 54 and t % 2 == 0]
    steps = _steps(run)
    assert [s["iteration"] - 1 for s in steps if s["kept"]] == selected
    assert {s["kept"] for s in steps} == {None, 16}
    assert summary["passes"] == ITERS + len(selected)  # + one selection forward each
    assert summary["backward_passes"] == ITERS
    assert summary["backward_batches"] == ITERS - len(selected) / 2
    assert summary["selective_backprop/selection_forwards"] == len(selected)
    record = run_record("sb", 0, run, 0.5)
    assert cost(record, "compute", 1 / 3) == pytest.approx(54 + 12 / 3)
    assert cost(record, "passes") == 12 + 54
    # the random control: as many samples on the same steps, at random, no selection forward
    control = _random_control(Arm("sb", {"optimizer": "selective-backprop"}), resolve_config(
        overrides={"optimizer": "selective-backprop"}), record, {})  # fmt: skip
    assert control.overrides == {"optimizer": "sgd", "random_keep": 0.5}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in control.overrides.items()]
    summary = _train(classifier, tmp_path / "random", *flags)
    steps = _steps(tmp_path / "random")
    assert [s["iteration"] - 1 for s in steps if s["kept"]] == selected
    assert summary["passes"] == summary["backward_passes"] == ITERS
    assert summary["backward_batches"] == ITERS - len(selected) / 2
    assert cost(run_record("r", 0, tmp_path / "random", 0.5), "compute") == 54


def test_selective_backprop_resumes_bit_identically(classifier, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    summary = _train(
        classifier, whole, "--optimizer", "selective-backprop", "--checkpoint-every", "40"
    )
    # the run as a kill after its checkpoint at 40 (5 selecting steps in) leaves it; not a
    # shorter run: the schedule is a fraction of the run's length
    shutil.copytree(whole, cut)
    (cut / "summary.json").unlink()
    (cut / "model.pt").unlink()
    assert main(["train", "--resume", str(cut), "--no-progress"]) == 0
    assert (cut / "model.pt").read_bytes() == (whole / "model.pt").read_bytes()
    resumed = runio.read_json(cut / "summary.json")
    keys = ("passes", "backward_passes", "backward_batches", "selective_backprop/dropped_samples")
    assert {k: resumed[k] for k in keys} == {k: summary[k] for k in keys}


def test_selective_backprop_refuses_a_loss_without_per_example_values(tmp_path, capsys):
    text = CLASSIFIER.replace(
        "train=make(320, g)", "loss=lambda out, y: torch.nn.functional.cross_entropy(out, y), "
        "train=make(320, g)"
    )  # fmt: skip
    (tmp_path / "mean_only.py").write_text(textwrap.dedent(text))
    argv = ["train", "--workload", f"{tmp_path / 'mean_only.py'}:workload", "--optimizer"]
    argv += ["selective-backprop", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the workload's loss must take reduction='none'" in err[0], err
    assert not (tmp_path / "run").exists()


def test_weighted_loss_gives_per_example_losses(tmp_path):
    from functools import partial

    from isgd.training.data_setup import _weighted_cross_entropy

    logits, y, w = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([1, 2, 3.0])
    loss = partial(_weighted_cross_entropy, weight=w)
    torch.testing.assert_close(per_example_losses(loss, logits, y).mean(), loss(logits, y))


# ------------------------------------------------------------------------------ random controls
def test_random_draws_make_exactly_the_count_uniformly():
    def drawn(seed: int, total: int, count: int) -> list[int]:
        steps = []
        for t in range(total):
            if random_draw(seed, t, total, count - len(steps)):
                steps.append(t)
        return steps

    runs = [drawn(seed, 50, 7) for seed in range(300)]
    assert all(len(r) == 7 for r in runs)
    assert len({tuple(r) for r in runs}) == 300  # seeded: the seeds draw differently
    assert drawn(5, 50, 7) == runs[5]  # ... and the same seed alike
    mean = sum(t for r in runs for t in r) / (300 * 7)
    assert abs(mean - 24.5) < 1.5  # uniform over the 50 steps (sd of the mean ≈ 0.5)
    assert drawn(0, 10, 10) == list(range(10)) and drawn(0, 10, 0) == []


@pytest.mark.parametrize("optimizer", ["sgd", "isgd"])
def test_random_skip_makes_that_many_forward_only_steps(classifier, tmp_path, optimizer):
    summary = _train(
        classifier, tmp_path / "r", "--optimizer", optimizer, "--random-skip-steps", "0.1"
    )
    steps = _steps(tmp_path / "r")
    assert summary["isgd/forward_only"] == sum(s["forward_only"] for s in steps) == 6
    assert summary["passes"] - summary["backward_passes"] >= 6  # each a forward only


def test_random_controls_of_skipstep_and_the_forward_only_variant(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    runio.write_json(run / "summary.json", {"iterations": 400, "skipstep/skipped": 9})
    skip = Arm("ss", {"optimizer": "skipstep-adamw", "skip_sigma_factor": 3})
    config = resolve_config(overrides=skip.overrides)
    assert skips_work(config)
    control = _random_control(skip, config, {"run_dir": str(run)}, {"ss": 0.01})
    assert control.name == "random-skip@ss"
    assert control.overrides["optimizer"] == "adamw" and control.overrides["lr"] == 0.01
    assert control.overrides["random_skip_steps"] * 400 == 9
    runio.write_json(run / "summary.json", {"iterations": 400, "isgd/forward_only": 40})
    variant = Arm("fo", {"optimizer": "isgd", "lower_quantile": 0.2})
    control = _random_control(variant, resolve_config(overrides=variant.overrides), {
        "run_dir": str(run)}, {})  # fmt: skip
    assert control.overrides == {
        "optimizer": "isgd", "lower_quantile": 0.0, "random_skip_steps": 0.1
    }  # fmt: skip
    assert not skips_work(resolve_config(overrides={"optimizer": "isgd"}))


# ------------------------------------------------------------------------------ 2 gloo ranks
def _spiky_workload() -> Workload:
    """Regression where 1 sample in 23 has a target 40 off: the batch (and the rank) holding it
    has a loss spike; the other rank's local loss does not."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(368, 6, generator=g)
    y = x @ torch.randn(6, 1, generator=g) + 0.1 * torch.randn(368, 1, generator=g)
    y[::23] += 40.0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    test = TensorDataset(x[:32], y[:32])
    return Workload(model=model, train=TensorDataset(x, y), test=test, loss=F.mse_loss,
                    metric="loss")  # fmt: skip


def _rank_worker(rank: int, world: int, init: str, out: str) -> None:
    from isgd.training.callbacks import Callback
    from isgd.training.distributed import DistContext
    from isgd.training.lifecycle import prepare_run_dir
    from isgd.training.train import Trainer

    class Local(Callback):  # this rank's own loss and the decision, per step
        def __init__(self) -> None:
            self.lines: list[tuple[float, bool, object]] = []

        def on_step_end(self, trainer, record) -> None:
            local = float(trainer._regular_loss)
            self.lines.append((local, record["skipped"], record.get("kept")))

    join_gloo(rank, world, init)
    ctx = DistContext(rank, world, rank, torch.device("cpu"), 60.0)
    results = {}
    common = dict(batch_size=16, lr=0.02, lr_policy="fixed", iters=40, eval_every=40,
                  checkpoint_every=20, threads=1, tensorboard=False, log_every=1000)  # fmt: skip
    arms = {
        "skipstep": dict(optimizer="skipstep", skip_sigma_factor=3.0, skip_window=8),
        "selective-backprop": dict(optimizer="selective-backprop", keep_start=0.25),
    }
    for name, keys in arms.items():
        config = resolve_config(overrides={**common, **keys})
        local = Local()
        run_dir = Path(out) / name
        if rank == 0:
            prepare_run_dir(run_dir)
        torch.distributed.barrier()
        trainer = Trainer(config, run_dir, workload=_spiky_workload(), dist=ctx, callbacks=[local])
        summary = trainer.run(progress=False)  # checks weights, optimizer state, decisions alike
        results[name] = {
            "lines": local.lines,
            "params": [p.detach().flatten().tolist() for p in trainer.model.parameters()],
            "summary": {k: summary.get(k) for k in ("passes", "backward_batches", SKIPPED)},
            "checked": summary["distributed/ranks_checked"],
        }
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(results))
    torch.distributed.barrier()
    leave_rank()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return run_two_ranks(_rank_worker, tmp_path_factory.mktemp("relatives"), timeout=120)


def test_skipstep_decides_alike_on_two_ranks_from_the_mean_loss(two_ranks):
    lines = [r["skipstep"]["lines"] for r in two_ranks]
    decisions = [[skipped for _, skipped, _ in rank] for rank in lines]
    assert decisions[0] == decisions[1] and sum(decisions[0]) >= 2
    assert two_ranks[0]["skipstep"]["params"] == two_ranks[1]["skipstep"]["params"]
    assert two_ranks[0]["skipstep"]["checked"] >= 2  # the trainer's own rank checks passed
    # judged on each rank's own loss, the rule would have decided otherwise on some rank
    local = []
    for rank in lines:
        rule = SkipRule(3.0, 8)
        local.append([rule.judge(loss) for loss, _, _ in rank])
    assert local[0] != decisions[0] or local[1] != decisions[0]


def test_selective_backprop_steps_alike_on_two_ranks(two_ranks):
    kept = [[k for _, _, k in r["selective-backprop"]["lines"]] for r in two_ranks]
    # each rank keeps 4 of its 8 samples: 8 of 16 on every selecting step, on both ranks
    assert kept[0] == kept[1] and set(kept[0]) == {None, 8}
    assert (
        two_ranks[0]["selective-backprop"]["params"] == two_ranks[1]["selective-backprop"]["params"]
    )
    n = kept[0].count(8)
    assert two_ranks[0]["selective-backprop"]["summary"] == {
        "passes": 40 + n, "backward_batches": 40 - n / 2, "skipstep/skipped": None
    }  # fmt: skip


# ------------------------------------------------------------------------------ isgd compare
@pytest.mark.slow  # 10 training runs and the report: ≈ 10 s
def test_compare_adds_each_skipping_arms_random_control_at_its_compute(classifier, tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", "--workload", classifier, "--target", "0.5", "--seeds", "1"]
    argv += ["--arm", "sgd", "--arm", "skipstep:skip_sigma_factor=0.5,skip_window=8"]
    argv += ["--arm", "selective-backprop:keep=0.25", "--equal-compute", "--budgets", "0.5,1"]
    argv += ["--iters", str(ITERS), "--eval-every", "30", "--batch-size", str(BATCH)]
    argv += ["--lr", "0.05", "--threads", "1", "--no-progress", "--no-tensorboard"]
    assert main([*argv, "--out", str(out)]) == 0
    records = {(r["arm"], r["budget"]): r for r in runio.read_jsonl(out / "runs.jsonl")}
    controls = ["random-skip@skipstep", "random-skip@selective-backprop"]
    assert {arm for arm, _ in records} == {"sgd", "skipstep", "selective-backprop", *controls}
    for budget in (0.5, 1.0):  # at every budget, sized from the arm's run of that budget
        skipped = runio.read_json(Path(records["skipstep", budget]["run_dir"]) / "summary.json")
        control = records["random-skip@skipstep", budget]
        assert 0 < control["forward_only"] == skipped["skipstep/skipped"]
        sb, random = records["selective-backprop", budget], records[controls[1], budget]
        assert random["backward_batches"] == sb["backward_batches"] < sb["backward_passes"]
        assert random["passes"] < sb["passes"]  # no selection forwards
    summary = runio.read_json(out / "summary.json")
    assert set(controls) <= set(summary["quality_vs_cost"]["arms"])
