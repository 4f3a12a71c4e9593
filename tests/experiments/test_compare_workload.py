"""``isgd compare --workload``: a user's non-image model compared end to end, as a user runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from isgd.cli import main
from isgd.training import runio

ROOT = Path(__file__).resolve().parents[2]
FORECAST = f"{ROOT / 'examples' / 'forecast_workload.py'}:workload"
COMMON = ["--iters", "240", "--lr", "0.05", "--eval-every", "40", "--batch-size", "32"]
COMMON += ["--threads", "1", "--no-progress", "--no-tensorboard"]


def test_compare_runs_a_lower_is_better_workload_end_to_end(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--workload", FORECAST, "--target", "0.3", "--seeds", "2"]
    assert main([*argv, "--out", str(out), *COMMON]) == 0
    shown = capsys.readouterr().out
    summary = runio.read_json(out / "summary.json")
    assert summary["metric"] == "mse" and summary["higher_is_better"] is False
    records = list(runio.read_jsonl(out / "runs.jsonl"))
    assert sorted((r["arm"], r["seed"]) for r in records) == [
        ("isgd", 0), ("isgd", 1), ("sgd", 0), ("sgd", 1)
    ]  # fmt: skip
    for r in records:  # the crossing read downwards: the first evaluation at or below 0.3
        metrics = list(runio.read_jsonl(Path(r["run_dir"]) / "metrics.jsonl"))
        first = next(m for m in metrics if m["test/metric"] <= 0.3)
        assert r["passes_to_target_grid"] == first["passes"]
        assert metrics[0]["test/metric"] > 0.3  # so the target was crossed, not started at
    # seed s of both arms starts from the same model: the workload was built for the seed
    first_evals = {
        (r["arm"], r["seed"]): next(runio.read_jsonl(Path(r["run_dir"]) / "metrics.jsonl"))
        for r in records
    }
    for seed in (0, 1):
        assert first_evals["sgd", seed]["test/loss"] == first_evals["isgd", seed]["test/loss"]
    assert first_evals["sgd", 0]["test/loss"] != first_evals["sgd", 1]["test/loss"]
    assert "mse" in shown and "accuracy" not in shown.split("## How ISGD behaved")[0]
    title = shown.splitlines()[0]  # the workload, not the image keys it replaced
    assert title.startswith("# isgd compare: sgd, isgd — ") and "lenet" not in title, title
    assert "| samples/s |" in shown and "images" not in shown  # a row of a table is no image


def test_compare_with_a_workload_needs_a_target(tmp_path, capsys):
    rc = main(["compare", "--workload", FORECAST, "--out", str(tmp_path / "c"), *COMMON])
    err = capsys.readouterr().err
    assert rc == 2 and "sets no target: give it with --target VALUE" in err, err
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_compare_tunes_a_workload_on_a_split_of_its_training_data(tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", "--workload", FORECAST, "--target", "0.3", "--seeds", "1"]
    argv += ["--tune-lrs", "0.01,0.05", "--tune-iters", "200", "--out", str(out), *COMMON]
    assert main(argv) == 0
    plan = runio.read_json(out / "plan.json")
    assert set(plan["tuned_lr"]) == {"sgd", "isgd"}
    tuned = runio.read_json(out / "tune" / "sgd-lr0.05" / "summary.json")
    assert tuned["workload"].endswith("[tune]") and tuned["metric/name"] == "mse"


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--target", "baseline"], "--target baseline is set on a validation split"),
        (["--target", "baseline", "--validation", "500", "--seeds", "2"], "needs 3 seeds or more"),
        (["--target", "0.3", "--budgets", "0.5,1.5"], "--budgets: fractions of the run in (0, 1]"),
        (["--target", "0.3", "--budgets", "0.5,0.5"], "--budgets repeats a budget"),
        (["--target", "0.3", "--budget", "0.5"], "--budget: a comparison trains at --budgets"),
        (["--target", "0.3", "--forward-cost", "2"], "--forward-cost must be in (0, 1]"),
        (["--target", "best"], "argument --target: a number or 'baseline', got 'best'"),
    ],
)
def test_compare_protocol_options_refuse_what_they_cannot_do(extra, expected, tmp_path, capsys):
    rc = main(["compare", "--workload", FORECAST, "--out", str(tmp_path / "c"), *extra, *COMMON])
    err = capsys.readouterr().err
    assert rc == 2 and expected in err and "Traceback" not in err, err
    assert not (tmp_path / "c").exists()


def test_resuming_a_baseline_target_with_fewer_seeds_is_refused_as_a_fresh_comparison(
    tmp_path, capsys, monkeypatch
):
    from isgd.experiments import compare
    from isgd.training.config import TrainConfig

    out = tmp_path / "cmp"
    out.mkdir()
    base = TrainConfig(workload=FORECAST, validation=500)
    arms = [compare.Arm("sgd", {}), compare.Arm("isgd", {"optimizer": "isgd"})]
    compare.save_plan(
        compare.ComparisonPlan(base, arms, [0, 1, 2], 0.0, out, target_rule="baseline")
    )
    ran = []
    monkeypatch.setattr(compare, "run_comparison", lambda *a, **k: ran.append(a))
    rc = main(["compare", "--resume", str(out), "--seeds", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--target baseline needs 3 seeds or more, got 2" in err, err
    assert len(err.strip().splitlines()) == 1 and not ran
    assert runio.read_json(out / "plan.json")["seeds"] == [0, 1, 2]


@pytest.mark.slow
def test_compare_at_budgets_with_a_target_from_the_baseline(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--workload", FORECAST, "--target", "baseline", "--validation", "500"]
    argv += ["--seeds", "5", "--budgets", "0.5,1", "--lr-policy", "cosine", "--out", str(out)]
    assert main([*argv, *COMMON]) == 0
    plan, summary = (runio.read_json(out / name) for name in ("plan.json", "summary.json"))
    finals = [
        runio.read_json(out / "runs" / f"sgd-seed{s}" / "summary.json")["final/val_metric"]
        for s in range(5)
    ]
    assert plan["target"] == summary["target"] == max(finals)  # mse: the worst is the largest
    records = list(runio.read_jsonl(out / "runs.jsonl"))
    assert len(records) == 2 * 2 * 5 and {r["budget"] for r in records} == {0.5, 1.0}
    assert all(r["target"] == max(finals) for r in records)
    base_full = [r for r in records if r["arm"] == "sgd" and r["budget"] == 1.0]
    assert all(r["passes_to_target"] <= r["passes"] for r in base_full)  # every seed reached it
    half = runio.read_json(out / "runs" / "sgd-b0.5-seed0" / "summary.json")
    assert half["iterations"] == 120  # half of the 240 iterations, its schedule compressed
    quality = summary["quality_vs_cost"]
    assert (
        quality["budgets"] == [0.5, 1.0] and quality["arms"]["sgd"]["per_budget"]["0.5"]["n"] == 5
    )
    assert quality["arms"]["isgd"]["saving"]["passes"]["n"] == 5
    report = (out / "report.md").read_text()
    assert "## Quality against cost" in report and "on the validation split" in report
    assert (out / "figures" / "quality_vs_cost.png").is_file()


def test_a_resumed_comparison_gives_its_workload_the_data_dir_it_was_started_with(
    tmp_path, monkeypatch
):
    data = tmp_path / "data"
    wrapper, example = tmp_path / "wl.py", str(ROOT / "examples" / "forecast_workload.py")
    wrapper.write_text(
        "import importlib.util, os\n"
        f"spec = importlib.util.spec_from_file_location('fc', {example!r})\n"
        "fc = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(fc)\n"
        "def workload(seed):\n"
        f"    if os.environ.get('ISGD_DATA_DIR') != {str(data)!r}:\n"
        "        raise RuntimeError(f\"data in {os.environ.get('ISGD_DATA_DIR')}\")\n"
        "    return fc.workload(seed)\n"
    )
    monkeypatch.setenv("ISGD_DATA_DIR", str(tmp_path / "elsewhere"))
    out, argv = tmp_path / "cmp", ["compare", "--workload", f"{wrapper}:workload", "--seeds", "1"]
    argv += ["--target", "0.3", "--arm", "sgd", "--iters", "40", "--eval-every", "20"]
    assert main([*argv, "--data-dir", str(data), "--out", str(out), *COMMON[4:]]) == 0
    # more seeds, and no --data-dir: the plan's data directory again, not the environment's
    assert main(["compare", "--resume", str(out), "--seeds", "2", "--no-progress"]) == 0
    assert len(list(runio.read_jsonl(out / "runs.jsonl"))) == 2
    assert runio.read_json(out / "plan.json")["data_dir"] == str(data)
