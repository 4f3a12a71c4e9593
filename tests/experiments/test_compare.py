"""`isgd compare`: aggregation on known inputs, and end to end on a tiny fixture."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from isgd.cli import main
from isgd.experiments.compare import parse_arm
from isgd.experiments.records import (
    aggregate,
    load_records,
    record_line,
    speedup,
    summarize,
    time_to_target,
)
from isgd.training import runio
from isgd.training.config import ConfigError
from tests.conftest import TINY

INF = math.inf


def test_time_to_target_is_the_first_evaluation_reaching_it():
    metrics = [
        {"iteration": 0, "passes": 0, "time/train_seconds": 0.0, "test/accuracy": 0.1},
        {"iteration": 100, "passes": 120, "time/train_seconds": 2.0, "test/accuracy": 0.989},
        {"iteration": 200, "passes": 230, "time/train_seconds": 4.0, "test/accuracy": 0.991},
        {"iteration": 300, "passes": 330, "time/train_seconds": 6.0, "test/accuracy": 0.985},
    ]
    assert time_to_target(metrics, 0.99) == {"seconds": 4.0, "passes": 230.0, "iteration": 200.0}
    assert time_to_target(metrics, 0.995) == {"seconds": INF, "passes": INF, "iteration": INF}


def test_runs_jsonl_writes_a_miss_as_null_and_reads_old_files(tmp_path):
    missed = {"arm": "isgd", "seed": 0, "time_to_target": INF, "passes_to_target": INF}
    missed.update(final_balanced_accuracy=math.nan, momentum_ratio=None, final_accuracy=0.5)
    hit = {**missed, "seed": 1, "time_to_target": 3.0, "passes_to_target": 40.0}
    line = record_line(missed)
    assert json.loads(line)["time_to_target"] is None and json.loads(line)["target_missed"]
    assert json.loads(line)["final_balanced_accuracy"] is None
    assert json.loads(record_line(hit))["target_missed"] is False
    old = runio.dumps({**missed, "seed": 2})  # written before: "inf" and "nan" strings
    assert '"inf"' in old
    (tmp_path / "runs.jsonl").write_text(f"{line}\n{record_line(hit)}\n{old}\n")
    back = load_records(tmp_path)
    assert [math.isinf(r["time_to_target"]) for r in back] == [True, False, True]
    assert all(math.isnan(r["final_balanced_accuracy"]) for r in back)
    assert back[0]["momentum_ratio"] is None and "target_missed" not in back[0]
    assert back[1]["passes_to_target"] == 40.0 and back[0]["final_accuracy"] == 0.5


def test_runs_jsonl_null_copied_from_of_older_files_reads_as_not_a_copy(tmp_path):
    record = {"arm": "sgd", "seed": 0, "time_to_target": 3.0, "final_accuracy": 0.5}
    lines = [{**record, "copied_from": None}, {**record, "seed": 1, "copied_from": "sgd-seed1"}]
    (tmp_path / "runs.jsonl").write_text("".join(runio.dumps(r) + "\n" for r in lines))
    back = load_records(tmp_path)
    assert "copied_from" not in back[0] and back[1]["copied_from"] == "sgd-seed1"


def test_aggregate_median_quartiles_and_misses():
    a = aggregate([3.0, 1.0, 2.0, 5.0, 4.0])
    assert (a["median"], a["q25"], a["q75"], a["min"], a["max"]) == (3.0, 2.0, 4.0, 1.0, 5.0)
    assert a["missed"] == 0 and a["n"] == 5
    b = aggregate([1.0, INF, 2.0, INF, 3.0])
    assert b["median"] == 3.0 and b["max"] == INF and b["missed"] == 2
    c = aggregate([1.0, 2.0, INF, INF])  # median between 2 and inf is inf, never NaN
    assert c["median"] == INF
    assert aggregate([1.0, 2.0])["median"] == 1.5


@pytest.mark.parametrize(
    "base, arm, ratio, saving",
    [
        (100.0, 80.0, 1.25, 0.20),
        (100.0, 125.0, 0.8, -0.25),
        (INF, 50.0, INF, 1.0),
        (50.0, INF, 0.0, -INF),
        (10.0, 0.0, INF, 1.0),  # reached at the first evaluation, before any training
        (0.0, 10.0, 0.0, -INF),
    ],
)
def test_speedup_gives_both_readings(base, arm, ratio, saving):
    s = speedup(base, arm)
    assert s["ratio"] == pytest.approx(ratio) and s["saving"] == pytest.approx(saving)


@pytest.mark.parametrize("both", [INF, 0.0])
def test_speedup_both_missed_or_both_at_zero_is_nan(both):
    s = speedup(both, both)
    assert math.isnan(s["ratio"]) and math.isnan(s["saving"])


def test_summarize_medians_and_ratios_from_known_records():
    def rec(arm, seed, t, p, acc=0.99):
        return dict(
            arm=arm,
            seed=seed,
            time_to_target=t,
            passes_to_target=p,
            final_accuracy=acc,
            trigger_rate=0.0,
            extra_passes=0,
            train_seconds=t,
        )

    records = [
        rec("sgd", 0, 10.0, 1000),
        rec("isgd", 0, 8.0, 900),
        rec("sgd", 1, 12.0, 1200),
        rec("isgd", 1, INF, INF),
        rec("sgd", 2, 14.0, 1400),
        rec("isgd", 2, 7.0, 700),
    ]
    s = summarize(records, ["sgd", "isgd"])
    assert s["arms"]["sgd"]["time_to_target"]["median"] == 12.0
    assert s["arms"]["isgd"]["time_to_target"]["median"] == 8.0
    assert s["arms"]["isgd"]["time_to_target"]["missed"] == 1
    assert s["arms"]["isgd"]["speedup_time"]["ratio"] == pytest.approx(12.0 / 8.0)
    assert s["arms"]["isgd"]["speedup_time"]["saving"] == pytest.approx((12.0 - 8.0) / 12.0)
    assert s["arms"]["isgd"]["speedup_passes"]["ratio"] == pytest.approx(1200 / 900)
    # paired per seed: 10/8, 12/inf = 0, 14/7 → median 1.25
    assert s["arms"]["isgd"]["paired_time_ratio"]["median"] == pytest.approx(1.25)
    assert s["arms"]["sgd"]["speedup_time"]["ratio"] == 1.0


def test_parse_arm():
    assert parse_arm("sgd").overrides == {"optimizer": "sgd"}
    arm = parse_arm("k2:optimizer=isgd,sigma_factor=2,reshuffle=true")
    assert arm.name == "k2"
    assert arm.overrides == {"optimizer": "isgd", "sigma_factor": 2, "reshuffle": True}
    for bad in ("k2", "k2:sigma_factor", "a/b:optimizer=sgd", ""):
        with pytest.raises(ConfigError):
            parse_arm(bad)


@pytest.mark.slow
def test_compare_end_to_end(tiny_idx_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = (
        f"compare --dataset idx:{tiny_idx_dir} --model mlp --batch-size {TINY['batch']} "
        "--lr 0.05 --lr-policy fixed --sigma-factor 1.5 --iters 90 --eval-every 15 --threads 1 "
        f"--no-tensorboard --seeds 2 --target 0.999 --out {out} --arm sgd --arm isgd "
        "--equal-compute --no-progress"
    ).split()
    assert main(argv) == 0
    report = (out / "report.md").read_text()
    assert "| sgd |" in report and "| isgd |" in report and "sgd@isgd-passes" in report
    assert "## How ISGD behaved" in report
    records = [runio.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    assert [(r["arm"], r["seed"]) for r in records] == [
        ("sgd", 0),
        ("isgd", 0),
        ("sgd@isgd-passes", 0),
        ("isgd", 1),
        ("sgd@isgd-passes", 1),
        ("sgd", 1),
    ]
    # a 99.9% target on 60 noisy test images is out of reach: missed, written as strict JSON
    # (null and a flag, never the string "inf") and read back as infinite time
    assert all(r["time_to_target"] is None and r["target_missed"] for r in records)
    assert all(r["passes_to_target"] is None for r in records)
    assert '"inf"' not in (out / "runs.jsonl").read_text()
    assert all(math.isinf(r["time_to_target"]) for r in load_records(out))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arms"]["isgd"]["time_to_target"]["median"] == "inf"
    assert summary["arms"]["isgd"]["time_to_target"]["missed"] == 2
    # equal-compute control: SGD trained for the training steps (backward passes) ISGD used; the
    # stop checks of its extra iterations ran forward only
    extended = []
    for seed in (0, 1):
        isgd = next(r for r in records if r["arm"] == "isgd" and r["seed"] == seed)
        control = next(r for r in records if r["arm"] == "sgd@isgd-passes" and r["seed"] == seed)
        assert control["iterations"] == isgd["backward_passes"] >= 90
        assert isgd["passes"] >= isgd["backward_passes"]
        extended.append(control["iterations"] > 90)
    assert any(extended)
    # summarised again for a reachable target, without training
    assert main(["compare", "--retarget", str(out), "--target", "0.2"]) == 0
    again = json.loads((out / "target-0.2" / "summary.json").read_text())
    assert again["target"] == 0.2 and list(again["arms"]) == list(summary["arms"])
    retargeted = load_records(out / "target-0.2")
    assert any(math.isfinite(r["time_to_target"]) for r in retargeted)
    assert (out / "report.md").read_text() == report  # the original report is kept
    for name in ("error_vs_time", "error_vs_passes", "time_to_target", "loss_spread"):
        png = out / "figures" / f"{name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG"
    # the same seed gives the same initialisation and batches to every arm
    first = {}
    for arm in ("sgd", "isgd"):
        steps = (out / "runs" / f"{arm}-seed1" / "steps.jsonl").read_text().splitlines()
        first[arm] = [json.loads(s)["loss"] for s in steps[:15]]
    assert first["sgd"] == first["isgd"]


def test_compare_reachable_target_and_tuning(tiny_idx_dir, tmp_path):
    out = tmp_path / "cmp"
    argv = (
        f"compare --dataset idx:{tiny_idx_dir} --model mlp --batch-size {TINY['batch']} "
        "--lr-policy fixed --iters 90 --eval-every 15 --threads 1 --no-tensorboard --seeds 1 "
        f"--target 0.2 --tune-lrs 0.001,0.05 --tune-iters 60 --out {out} --no-progress"
    ).split()
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["tuned_lr"]) == {"sgd", "isgd"}
    assert summary["tuned_lr"] == {"sgd": 0.05, "isgd": 0.05}  # 0.001 barely moves in 60 steps
    records = [runio.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["time_to_target"]) and not r["target_missed"] for r in records)
    assert len(list((out / "tune").iterdir())) == 4


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--arm", "sgd", "--arm", "sgd"], "arm names must differ"),
        (["--arm", "x:sigma_factor=2"], "name an optimizer"),
        (["--arm", "isgd:sigma_factor=-1"], "invalid sigma_factor: -1.0"),
        (["--arm", "isgd:bogus=1"], "unknown config key in arm isgd: bogus"),
        (["--target", "99"], "invalid target: 99 (an accuracy: a fraction in (0, 1])"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--tune-lrs", "a,b"], "--tune-lrs: not a list of numbers"),
    ],
)
def test_compare_bad_input(extra, message, tmp_path, capsys):
    assert main(["compare", "--out", str(tmp_path / "x"), "--target", "0.5", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x").exists()


def test_mechanics_from_known_steps(tmp_path):
    from isgd.reporting.compare_report import mechanics

    rows = [  # epoch 0: no limit; epoch 1: mean 1.0 (epoch 0: 2.0), limit 1.5
        dict(epoch=0, loss=2.0, limit=None, triggered=False, extra_iters=0, loss_after=None),
        dict(epoch=0, loss=2.0, limit=None, triggered=False, extra_iters=0, loss_after=None),
        dict(epoch=1, loss=0.5, limit=1.5, triggered=False, extra_iters=0, loss_after=None),
        dict(epoch=1, loss=0.5, limit=1.5, triggered=False, extra_iters=0, loss_after=None),
        dict(epoch=1, loss=2.0, limit=1.5, triggered=True, extra_iters=2, loss_after=1.0),
        dict(epoch=1, loss=1.0, limit=1.5, triggered=False, extra_iters=0, loss_after=None),
    ]
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = mechanics(tmp_path)
    assert m["above_limit"] == pytest.approx(1 / 4)
    assert m["extra_per_trigger"] == 2 and m["reached_limit"] == 1.0
    assert m["batch_loss_drop"] == pytest.approx(0.5)
    assert m["epoch_trend"] == pytest.approx(1.0 / 2.0)
    assert m["limit_over_mean"] == pytest.approx(1.5)
    # window of 2 (steps before the first limit): means 2, 1.25, 0.5, 1.25 against epoch mean 1.0
    assert m["window_over_mean"] == pytest.approx(1.25)
    assert m["limit_over_window_mean"] == pytest.approx(1.2)  # median of 0.75, 1.2, 3, 1.2


@pytest.mark.slow
def test_compare_resume_continues_and_changes_seeds(tiny_idx_dir, tmp_path, capsys):
    import shutil

    def records(out):
        rows = [runio.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
        drop = ("run_dir", "time_to_target", "time_to_target_grid", "train_seconds")
        drop += ("images_per_second",)  # timed, like the seconds
        return [{k: v for k, v in r.items() if k not in drop} for r in rows]

    full = tmp_path / "full"
    argv = (
        f"compare --dataset idx:{tiny_idx_dir} --model mlp --batch-size {TINY['batch']} "
        "--lr 0.05 --lr-policy fixed --sigma-factor 1.5 --iters 90 --eval-every 15 --threads 1 "
        f"--checkpoint-every 30 --no-tensorboard --seeds 2 --target 0.3 --out {full} "
        "--arm sgd --arm isgd --no-progress"
    ).split()
    assert main(argv) == 0
    assert json.loads((full / "plan.json").read_text())["seeds"] == [0, 1]
    # an interrupted comparison: one run recorded, one cut short after its checkpoint at 60,
    # two never started, no summary
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    expected = records(full)
    isgd0_model = (full / "runs" / "isgd-seed0" / "model.pt").read_bytes()
    shutil.rmtree(full)  # the comparison was moved: its records' run_dir are stale
    lines = (cut / "runs.jsonl").read_text().splitlines(keepends=True)
    (cut / "runs.jsonl").write_text(lines[0] + lines[1][:20])  # the second line torn by a kill
    isgd0 = cut / "runs" / "isgd-seed0"
    for name in ("summary.json", "model.pt", "checkpoints/ckpt-00000090.pt"):
        (isgd0 / name).unlink(missing_ok=True)
    for name in ("isgd-seed1", "sgd-seed1"):
        shutil.rmtree(cut / "runs" / name)
    for name in ("summary.json", "report.md"):
        (cut / name).unlink()
    capsys.readouterr()
    assert main(["compare", "--resume", str(cut), "--no-progress"]) == 0
    log = capsys.readouterr().err
    assert "run 1/4 sgd seed 0" in log and "recorded earlier" in log
    assert f"resuming {isgd0} from iteration 60" in log
    assert records(cut) == expected
    assert (isgd0 / "model.pt").read_bytes() == isgd0_model
    assert (cut / "report.md").is_file()
    # fewer seeds: summarise the first only; more seeds: add runs, keep the recorded ones
    assert main(["compare", "--resume", str(cut), "--seeds", "1", "--no-progress"]) == 0
    assert [(r["arm"], r["seed"]) for r in records(cut)] == [("sgd", 0), ("isgd", 0)]
    assert json.loads((cut / "summary.json").read_text())["arms"]["sgd"]["final_accuracy"]["n"] == 1
    assert main(["compare", "--resume", str(cut), "--seed-list", "0,1,2", "--no-progress"]) == 0
    assert records(cut)[:4] == expected
    assert [(r["arm"], r["seed"]) for r in records(cut)[4:]] == [("sgd", 2), ("isgd", 2)]
    # the plan cannot change under --resume, and only a comparison can be resumed
    capsys.readouterr()
    assert main(["compare", "--resume", str(cut), "--lr", "0.1", "--arm", "sgd"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "drop --lr, --arm" in err[0], err
    assert main(["compare", "--resume", str(cut), "--tune-iters", "5"]) == 2
    assert "drop --tune-iters" in capsys.readouterr().err
    assert main(["compare", "--resume", str(tmp_path / "nothing")]) == 2
    assert "not a comparison directory" in capsys.readouterr().err


def test_compare_under_epochs_extends_the_control_and_keeps_the_tuning_budget(
    tiny_idx_dir, tmp_path, capsys
):
    base = (
        f"compare --dataset idx:{tiny_idx_dir} --model mlp --batch-size {TINY['batch']} "
        "--lr-policy fixed --epochs 6 --eval-every 15 --threads 1 --no-tensorboard --seeds 1 "
        "--sigma-factor 1.5 --target 0.2 --no-progress --tune-lrs 0.05"
    ).split()
    # a tuning budget inside ISGD's first window (12 batches of the tuning split) is refused
    out = tmp_path / "short"
    assert main([*base, "--tune-iters", "10", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid --tune-iters: 10 (ISGD cannot act" in err[0], err
    assert not out.exists()
    out = tmp_path / "cmp"
    assert main([*base, "--tune-iters", "30", "--equal-compute", "--out", str(out)]) == 0
    for arm in ("sgd", "isgd"):  # --tune-iters, not --epochs, sets the tuning runs' length
        tuned = json.loads((out / "tune" / f"{arm}-lr0.05" / "summary.json").read_text())
        assert tuned["iterations"] == 30
    records = [runio.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    isgd = next(r for r in records if r["arm"] == "isgd")
    control = next(r for r in records if r["arm"] == "sgd@isgd-passes")
    assert isgd["iterations"] == 90 and isgd["backward_passes"] > 90
    assert control["iterations"] == isgd["backward_passes"]  # extended, not cut to --epochs
    summary = json.loads((out / "summary.json").read_text())
    paired = summary["arms"]["isgd"]["paired"]
    assert paired["seeds"] == [0] and paired["passes"]["n"] == 1
    assert "too few for an interval" in (out / "report.md").read_text()


def test_equal_compute_matches_the_variant_s_backward_passes(tiny_idx_dir, tmp_path):
    out = tmp_path / "cmp"
    argv = (
        f"compare --dataset idx:{tiny_idx_dir} --model mlp --batch-size {TINY['batch']} "
        "--lr 0.05 --lr-policy fixed --iters 60 --eval-every 15 --threads 1 --no-tensorboard "
        f"--seeds 1 --target 0.2 --no-progress --equal-compute --out {out} --arm sgd "
        "--arm lq:optimizer=isgd,lower_quantile=0.3"
    ).split()
    assert main(argv) == 0
    records = {r["arm"]: r for r in runio.read_jsonl(out / "runs.jsonl")}
    lq, control = records["lq"], records["sgd@lq-passes"]
    assert lq["forward_only"] > 0 and lq["backward_passes"] < lq["passes"]
    assert control["iterations"] == control["backward_passes"] == lq["backward_passes"]


def test_tuning_budget_default_lets_isgd_act(tiny_idx_dir):
    from isgd.data import load_dataset
    from isgd.experiments.compare import Arm, ComparisonPlan, tuning_budget
    from isgd.training.config import TrainConfig

    data = load_dataset(f"idx:{tiny_idx_dir}")  # 240 training images, 200 after the hold-out
    config = TrainConfig(dataset=f"idx:{tiny_idx_dir}", batch_size=4)  # 50 batches per epoch
    plan = ComparisonPlan(config, [Arm("sgd", {"optimizer": "sgd"})], [0], 0.5, Path("unused"))
    assert tuning_budget(plan, data) == 1000  # the floor: 3 epochs are 150 iterations
    plan.base = TrainConfig(dataset=config.dataset, batch_size=1)  # 200 batches per epoch
    assert tuning_budget(plan, data) == 1000
    plan.arms.append(Arm("isgd", {"optimizer": "isgd", "window": 900}))
    assert tuning_budget(plan, data) == 900 + 2 * 200  # ISGD's window, then 2 epochs
    plan.tune_iters = 900
    with pytest.raises(ConfigError, match="after 900 iterations"):
        tuning_budget(plan, data)
    plan.tune_iters = 901
    assert tuning_budget(plan, data) == 901


def test_report_says_when_isgd_never_triggered(tiny_idx_dir, tmp_path):
    out = tmp_path / "cmp"
    argv = (
        f"compare --dataset idx:{tiny_idx_dir} --model mlp --batch-size {TINY['batch']} "
        "--lr 0.05 --lr-policy fixed --iters 12 --eval-every 6 --threads 1 --no-tensorboard "
        f"--seeds 2 --target 0.15 --out {out} --no-progress"
    ).split()
    assert main(argv) == 0  # 12 iterations: less than the first epoch, which fills the chart
    report = (out / "report.md").read_text()
    assert "**isgd never triggered**" in report and "any difference above is noise" in report
    records = [runio.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    by_arm = {(r["arm"], r["seed"]): r for r in records}
    assert all(by_arm["sgd", s]["passes"] == by_arm["isgd", s]["passes"] == 12 for s in (0, 1))
    # throughput: training images per second of training time, per run and per arm
    for r in records:
        expected = r["iterations"] * TINY["batch"] / r["train_seconds"]
        assert r["images_per_second"] == pytest.approx(expected)
    sgd = sorted(by_arm["sgd", s]["images_per_second"] for s in (0, 1))
    row = next(line for line in report.splitlines() if line.startswith("| sgd |"))
    assert row.endswith(f"| {sum(sgd) / 2:,.0f} [{sgd[0]:,.0f}–{sgd[1]:,.0f}] |")
    assert "| images/s |" in report


def test_report_names_the_gpu_the_runs_were_timed_on():
    from isgd.reporting.compare_report import _machine

    provenance = {"cpu": "x86_64", "cpu_count": 16, "cuda": "NVIDIA H200"}
    assert _machine(provenance, {"threads": 2, "device": "cpu"}) == "x86_64 (16 CPUs, 2 threads)"
    assert _machine(provenance, {"threads": 2, "device": "cuda"}) == (
        "GPU NVIDIA H200 (device cuda), host x86_64 (16 CPUs, 2 threads)"
    )


def test_noise_notes_name_idle_arms_and_intervals_that_contain_one():
    from isgd.reporting.compare_report import noise_notes

    def arm(max_rate, low, high):
        interval = {"low": low, "high": high}
        return {
            "trigger_rate": {"n": 3, "max": max_rate},
            "paired": {"passes": interval, "seconds": {"low": 1.1, "high": 1.3}},
        }

    result = {
        "baseline": "sgd",
        "arms_spec": {"isgd": {"optimizer": "isgd"}, "isgd-k1": {"optimizer": "isgd"}},
        "arms": {
            "sgd": {"trigger_rate": {"n": 3, "max": 0.0}},
            "isgd": arm(0.0, 0.9, 1.1),
            "isgd-k1": arm(0.02, 0.95, 1.2),
            "isgd-k2": arm(0.01, 1.05, 1.2),
        },
    }
    notes = noise_notes(result)
    assert notes == [
        "isgd never triggered: the same computation as sgd; any gap is noise",
        "isgd-k1 vs sgd: within the seeds' noise in passes (paired 95 % interval contains 1)",
    ]


def test_a_control_with_a_finished_run_s_configuration_is_a_copy_not_trained_again(
    tiny_idx_dir, tmp_path
):
    """SkipStep cannot skip before half its 128-step window fills, so its random control skips 0
    steps: SGD's configuration, key for key; so is SGD at the passes of an ISGD that runs no
    extra iteration. One of each pair is a copy of the other: seed 1 runs the arms in reverse
    order, so there SGD comes last and is the copy of a control."""

    def compare(out, *arms):
        argv = (
            f"compare --dataset idx:{tiny_idx_dir} --model mlp --batch-size {TINY['batch']} "
            "--lr 0.05 --lr-policy fixed --iters 60 --eval-every 15 --threads 1 "
            f"--no-tensorboard --seeds 2 --target 0.2 --no-progress --equal-compute --out {out} "
            "--arm sgd --arm skipstep --arm isgd0:optimizer=isgd,max_extra_iters=0"
        ).split()
        assert main([*argv, *arms]) == 0
        runs = out / "runs"
        copies = {d.name: runio.read_json(d / "copied_from.json")["run"] for d in runs.iterdir()
                  if (d / "copied_from.json").is_file()}  # fmt: skip
        for copy, twin in copies.items():
            assert (runs / copy / "model.pt").read_bytes() == (
                runs / twin / "model.pt"
            ).read_bytes()
            assert not (runs / copy / "checkpoints").exists()
        assert not list(runs.glob("*.copy"))
        records = {(r["arm"], r["seed"]): r for r in runio.read_jsonl(out / "runs.jsonl")}
        return copies, records, (out / "report.md").read_text()

    copies, records, report = compare(tmp_path / "cmp")
    assert copies == {
        "random-skip@skipstep-seed0": "sgd-seed0",
        "sgd@isgd0-passes-seed0": "sgd-seed0",
        "random-skip@skipstep-seed1": "sgd@isgd0-passes-seed1",
        "sgd-seed1": "sgd@isgd0-passes-seed1",
    }
    assert records["random-skip@skipstep", 0]["passes"] == records["sgd", 0]["passes"] == 60
    assert records["sgd", 1].get("copied_from") == "sgd@isgd0-passes-seed1"
    assert "(copy of sgd-seed0) |" in report and "its seconds are its twin's" in report

    # an A/A check: two arms of one configuration both train, in either order, even where a
    # control between them is a copy of the first
    copies, records, _ = compare(tmp_path / "aa", "--arm", "sgd-again:optimizer=sgd")
    assert not {"sgd-seed1", "sgd-again-seed0", "sgd-again-seed1"} & set(copies)
    assert copies["random-skip@skipstep-seed1"] == "sgd-again-seed1"
    assert records["sgd-again", 0]["final_metric"] == records["sgd", 0]["final_metric"]
    # ... and after a resume, where the controls' copies come back as records: sgd-seed1,
    # lost with its record, trains again rather than copy a copy of sgd-again
    aa = tmp_path / "aa"
    shutil.rmtree(aa / "runs" / "sgd-seed1")
    kept = [r for r in runio.read_jsonl(aa / "runs.jsonl") if (r["arm"], r["seed"]) != ("sgd", 1)]
    (aa / "runs.jsonl").write_text("".join(runio.dumps(r) + "\n" for r in kept))
    assert main(["compare", "--resume", str(aa), "--no-progress"]) == 0
    assert not (aa / "runs" / "sgd-seed1" / "copied_from.json").exists()


def test_a_copy_stopped_midway_leaves_no_run_and_is_made_again(tmp_path):
    from isgd.experiments.compare import _copy_run

    twin = tmp_path / "runs" / "sgd-seed0"
    (twin / "checkpoints").mkdir(parents=True)
    for name in ("summary.json", "metrics.jsonl", "model.pt"):
        (twin / name).write_text(name)
    run_dir = tmp_path / "runs" / "random-skip@skipstep-seed0"
    (run_dir.with_name(run_dir.name + ".copy")).mkdir()  # a copy killed midway
    (run_dir.with_name(run_dir.name + ".copy") / "summary.json").write_text("half")
    _copy_run(twin, run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "copied_from.json", "metrics.jsonl", "model.pt", "summary.json",
    ]  # fmt: skip
    assert (run_dir / "summary.json").read_text() == "summary.json"
    assert not run_dir.with_name(run_dir.name + ".copy").exists()


def test_the_equal_compute_control_is_the_baseline_compressed_or_stretched_to_the_steps():
    """The control trains the arm's steps with the baseline's schedule scaled to them and fully
    decayed (the protocol's baselines), not the full schedule cut short or run on at its end."""
    from isgd.experiments.compare import Arm, ComparisonPlan, _arm_config, _equal_compute_arm
    from isgd.training.config import TrainConfig, lr_factor

    base = TrainConfig(lr_policy="multistep", milestones=[4000], gamma=0.1, iters=5000)
    arms = [Arm("sgd", {"optimizer": "sgd"}), Arm("fo", {"optimizer": "isgd"})]
    plan = ComparisonPlan(base, arms, [0], 0.5, Path("unused"))
    for steps in (3600, 4200, 5600):  # fewer backward passes than SGD's steps, or extra passes
        config = _arm_config(plan, _equal_compute_arm(arms, arms[1], steps, {}, 5000), 0)
        assert config.optimizer == "sgd" and round(config.budget * config.iters) == steps
        drop = math.ceil(0.8 * steps)  # the drop at 4,000 of 5,000, at the same fraction
        assert lr_factor(config, drop - 1, steps) == 1.0  # t / b in floats: at most one late
        assert lr_factor(config, drop + 1, steps) == lr_factor(config, steps - 1, steps) == 0.1
    same = _arm_config(plan, _equal_compute_arm(arms, arms[1], 5000, {}, 5000), 0)
    assert same == _arm_config(plan, arms[0], 0)  # SGD's own run: copied, not trained again
