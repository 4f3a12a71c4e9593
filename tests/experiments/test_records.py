"""Records of run directories in both formats (accuracy before workloads; a named metric, higher
or lower is better) and their summary: crossings, identical computation, censored misses."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from isgd.experiments.records import (
    identical_computation,
    load_records,
    record_line,
    run_record,
    summarize,
    untested_reason,
)
from isgd.training.runio import RunError

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"

# accuracy at iterations 0, 10, 20, 30, 40 and ISGD's cumulative extra iterations there. Seed 0:
# ISGD idle until after the target (0.7, crossed between 20 and 30), its evaluations SGD's up to
# it; seed 1: it acted from the start; seed 2: SGD misses the target, ISGD reaches it.
CURVES: dict[tuple[str, int], tuple[list[float], list[int]]] = {
    ("sgd", 0): ([0.1, 0.4, 0.6, 0.8, 0.9], [0, 0, 0, 0, 0]),
    ("isgd", 0): ([0.1, 0.4, 0.6, 0.8, 0.92], [0, 0, 0, 0, 3]),
    ("sgd", 1): ([0.1, 0.3, 0.5, 0.75, 0.85], [0, 0, 0, 0, 0]),
    ("isgd", 1): ([0.1, 0.35, 0.6, 0.8, 0.88], [0, 2, 3, 4, 5]),
    ("sgd", 2): ([0.1, 0.3, 0.5, 0.6, 0.65], [0, 0, 0, 0, 0]),
    ("isgd", 2): ([0.1, 0.35, 0.55, 0.72, 0.8], [0, 1, 2, 3, 4]),
}
ITERATIONS = [0, 10, 20, 30, 40]


def bits(accuracy: float) -> float:
    """The lower-is-better reading of the same curves (a 'bits per char' of 3 − 2·accuracy)."""
    return 3.0 - 2.0 * accuracy


def write_run(path: Path, arm: str, seed: int, *, metric: str = "accuracy") -> Path:
    """A finished run directory of ``CURVES[arm, seed]``: accuracy in the format written before
    workloads (``test/accuracy``, no metric keys), ``bits_per_char`` in today's
    (``test/metric``, ``metric/*`` keys, no accuracy)."""
    values, extra = CURVES[arm, seed]
    path.mkdir(parents=True)
    rows = []
    for it, acc, ex in zip(ITERATIONS, values, extra):
        row: dict[str, Any] = {
            "iteration": it,
            "passes": it + ex,
            "backward_passes": it + ex,
            "time/train_seconds": (it + ex) / 10,
            "test/loss": round(2.5 * (1 - acc), 6),
            "isgd/extra_iters": ex,
            "isgd/forward_only": 0,
        }
        if metric == "accuracy":
            row.update({"test/accuracy": acc, "test/balanced_accuracy": acc})
        else:
            row["test/metric"] = bits(acc)
        rows.append(row)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps = []
    for k in range(1, 41):
        triggered = arm == "isgd" and k in (15 + 5 * seed, 35)
        step = {"iteration": k, "epoch": (k - 1) // 5, "batch_id": (k - 1) % 5, "loss": 1 / k,
                "limit": None if k <= 5 else 0.5, "triggered": triggered, "skipped": False,
                "extra_iters": int(triggered), "loss_after": 0.1 if triggered else None,
                "momentum_ratio": None, "forward_only": False, "passes": k}  # fmt: skip
        steps.append(step)
    (path / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    last = rows[-1]
    summary: dict[str, Any] = {
        "optimizer": arm,
        "seed": seed,
        "iterations": 40,
        "passes": last["passes"],
        "backward_passes": last["passes"],
        "n_batches_per_epoch": 5,
        "time/train_seconds": last["time/train_seconds"],
        "images_per_second": 1000.0,
        "isgd/triggers": extra[-1],
        "isgd/extra_iters": extra[-1],
        "isgd/trigger_rate": extra[-1] / 40,
        "isgd/forward_only": 0,
    }
    if metric == "accuracy":
        summary.update(
            {
                "final/test_accuracy": values[-1],
                "final/test_balanced_accuracy": values[-1],
                "best/test_accuracy": max(values),
                "target/accuracy": 0.7,
            }
        )
    else:
        summary.update(
            {
                "metric/name": metric,
                "metric/higher_is_better": False,
                "final/test_metric": bits(values[-1]),
                "best/test_metric": min(bits(v) for v in values),
                "target/metric": bits(0.7),
            }
        )
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def write_comparison(out: Path, *, metric: str = "accuracy") -> Path:
    """A finished comparison directory (sgd, isgd × seeds 0–2): for accuracy as ``isgd compare``
    left it before workloads (``runs.jsonl`` with ``"inf"`` strings, a summary without
    ``metric``), for another metric with the summary's ``metric`` and ``higher_is_better``."""
    lines = []
    for seed in (0, 1, 2):
        for arm in ("sgd", "isgd"):
            run_dir = write_run(out / "runs" / f"{arm}-seed{seed}", arm, seed, metric=metric)
            old = {"arm": arm, "seed": seed, "run_dir": str(run_dir), "target": 0.99}
            lines.append(json.dumps({**old, "time_to_target": "inf", "passes_to_target": "inf"}))
    (out / "runs.jsonl").write_text("\n".join(lines) + "\n")
    config = {"dataset": "mnist", "model": "lenet", "iters": 40, "eval_every": 10, "threads": 1}
    summary = {
        "baseline": "sgd",
        "arms": {"sgd": {}, "isgd": {}},
        "target": 0.99,
        "seeds": [0, 1, 2],
        "tuned_lr": {},
        "config": config,
        "arms_spec": {"sgd": {"optimizer": "sgd"}, "isgd": {"optimizer": "isgd"}},
    }
    if metric != "accuracy":
        summary.update(metric=metric, higher_is_better=False)
    (out / "summary.json").write_text(json.dumps(summary))
    return out


def records_of(out: Path, target: float) -> list[dict[str, Any]]:
    return [
        run_record(arm, seed, out / "runs" / f"{arm}-seed{seed}", target)
        for seed in (0, 1, 2)
        for arm in ("sgd", "isgd")
    ]


def test_an_old_run_reads_as_accuracy_higher_is_better(tmp_path):
    r = run_record("isgd", 1, write_run(tmp_path / "r", "isgd", 1), 0.7)
    assert (r["metric"], r["higher_is_better"], r["optimizer"]) == ("accuracy", True, "isgd")
    assert r["final_metric"] == r["final_accuracy"] == 0.88 and r["best_metric"] == 0.88
    # 0.6 at iteration 20 (23 passes), 0.8 at 30 (34 passes): halfway, 28.5 passes
    assert r["passes_to_target"] == pytest.approx(28.5) and r["passes_to_target_grid"] == 34
    assert r["iterations_to_target"] == pytest.approx(25.0)
    assert (r["extra_iters_to_target"], r["forward_only_to_target"]) == (4, 0)


def test_a_lower_is_better_metric_crosses_downwards(tmp_path):
    r = run_record("isgd", 1, write_run(tmp_path / "r", "isgd", 1, metric="bits_per_char"), 1.6)
    assert (r["metric"], r["higher_is_better"]) == ("bits_per_char", False)
    assert r["final_metric"] == pytest.approx(bits(0.88))
    assert math.isnan(r["final_accuracy"]) and math.isnan(r["final_balanced_accuracy"])
    assert r["passes_to_target"] == pytest.approx(28.5)  # the same crossing, read downwards
    line = json.loads(record_line(r))
    assert line["final_accuracy"] is None and line["metric"] == "bits_per_char"
    assert line["target_missed"] is False


def test_identical_computation_is_found_per_seed(tmp_path):
    out = write_comparison(tmp_path / "cmp")
    records = records_of(out, 0.7)
    identical = identical_computation(records, "sgd", "isgd")
    assert identical["idle"] == [0]  # 0 extra iterations by the first evaluation at 0.7
    assert identical["same"] == [0]  # and SGD's evaluations up to it
    assert identical["isgd"] and not identical["variant"]
    assert identical_computation(records, "sgd", "sgd")["same"] == []
    assert untested_reason("isgd", "sgd", identical) == ""  # seeds 1 and 2 test it
    # at 0.9 seed 0's ISGD has acted (3 extra iterations by iteration 40): nothing is idle
    assert identical_computation(records_of(out, 0.9), "sgd", "isgd")["idle"] == []


def test_a_comparison_that_tests_nothing_says_so_in_its_verdicts():
    def rec(arm, seed, passes, extra_before, digest):
        return dict(
            arm=arm, seed=seed, optimizer=arm, time_to_target=passes / 10.0,
            passes_to_target=float(passes), passes=100, train_seconds=10.0, final_accuracy=0.9,
            trigger_rate=0.01, extra_passes=0, extra_iters_to_target=extra_before,
            forward_only_to_target=0, evaluations_digest=digest,
        )  # fmt: skip

    records = [
        rec("sgd", 0, 50, 0, "a"),
        rec("isgd", 0, 51, 0, "a"),
        rec("sgd", 1, 60, 0, "b"),
        rec("isgd", 1, 62, 0, "b"),
    ]
    s = summarize(records, ["sgd", "isgd"])
    assert s["arms"]["isgd"]["identical"]["idle"] == [0, 1]
    sentence = s["arms"]["isgd"]["paired"]["passes"]["sentence"]
    assert sentence.startswith(
        "isgd vs sgd (passes): ISGD did not act before the target in any of the 2 seeds "
        "(0 extra iterations before the crossing) — not a test; for the record:"
    )
    assert "needs more passes" not in sentence


def test_summarize_charges_a_miss_its_whole_run(tmp_path):
    out = write_comparison(tmp_path / "cmp")
    s = summarize(records_of(out, 0.7), ["sgd", "isgd"])
    assert (s["metric"], s["higher_is_better"]) == ("accuracy", True)
    passes = s["arms"]["isgd"]["paired"]["passes"]
    # seed 0: 25/25; seed 1: 28/28.5; seed 2: SGD missed, charged its 40 passes, ISGD crossed
    # 0.7 at 22 + (0.15/0.17)·11 passes — a lower bound on sgd/isgd for that seed
    expected = [1.0, 28 / 28.5, 40 / (22 + 0.15 / 0.17 * 11)]
    assert passes["ratios"] == pytest.approx(expected, rel=1e-12)
    assert (passes["n"], passes["base_missed"], passes["left_out"]) == (3, 1, 0)
    assert passes["ratio"] == pytest.approx(math.prod(expected) ** (1 / 3), rel=1e-12)
    assert "1 where only sgd missed, charged its whole run" in passes["sentence"]
    final = s["arms"]["isgd"]["paired"]["final_metric"]
    assert final["differences"] == pytest.approx([0.02, 0.03, 0.15])


def test_summarize_refuses_runs_of_different_metrics(tmp_path):
    a = run_record("sgd", 0, write_run(tmp_path / "a", "sgd", 0), 0.7)
    b = run_record("isgd", 0, write_run(tmp_path / "b", "isgd", 0, metric="bits_per_char"), 1.6)
    with pytest.raises(RunError, match="different metrics"):
        summarize([a, b], ["sgd", "isgd"])


def test_the_committed_comparisons_still_read():
    """docs/results/rerun/mnist (runs.jsonl of 2026-12-03, before workloads) summarised again:
    accuracy, and the paired ratio that docs/results.md quotes."""
    records = load_records(RESULTS / "rerun" / "mnist")
    assert {r["metric"] for r in records} == {"accuracy"}
    s = summarize(records, ["sgd", "isgd"])
    passes = s["arms"]["isgd"]["paired"]["passes"]
    shown = tuple(round(passes[k], 3) for k in ("ratio", "low", "high"))
    assert shown == (1.010, 0.909, 1.122) and passes["n"] == 5
    assert s["arms"]["isgd"]["identical"]["idle"] == []  # no record before this had the fields
