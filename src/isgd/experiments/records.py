"""The records of finished runs and their statistics: one record per run directory (crossings
of the target, final metric, counters), and per arm the aggregates over seeds and the paired
comparison with the baseline (:mod:`isgd.experiments.paired`). No training here: ``isgd compare``
(:mod:`isgd.experiments.compare`) writes these, ``--retarget`` and the scripts re-read them.

The metric is the run's own (``summary.json``'s ``metric/name`` and ``metric/higher_is_better``);
runs and records written before workloads named their metric are read as accuracy, higher is
better (:func:`with_metric`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from isgd.experiments.paired import (
    crossing,
    difference_sentence,
    effect_sentence,
    first_reaching,
    paired_difference,
    paired_ratio,
)
from isgd.reporting.metric import PERCENT_METRICS, label, metric_key, metric_of
from isgd.training import runio
from isgd.training.runio import RunError

__all__ = [
    "aggregate",
    "identical_computation",
    "load_records",
    "metric_of",
    "record_line",
    "records_text",
    "run_record",
    "speedup",
    "summarize",
    "time_to_target",
    "untested_reason",
    "with_metric",
]

INF = math.inf


# ---------------------------------------------------------------------- per-run figures
def time_to_target(
    metrics: Sequence[dict[str, Any]],
    target: float,
    higher_is_better: bool = True,
    key: str | None = None,
) -> dict[str, float]:
    """Seconds, passes and iterations at the first evaluation that reaches ``target``."""
    i = first_reaching(metrics, target, higher_is_better, key)
    if i is None:
        return {"seconds": INF, "passes": INF, "iteration": INF}
    record = metrics[i]
    return {
        "seconds": record["time/train_seconds"],
        "passes": float(record["passes"]),
        "iteration": float(record["iteration"]),
    }


def _before_target(metrics: Sequence[dict[str, Any]], index: int | None) -> dict[str, Any]:
    """What the run did up to the first evaluation at the target (the whole run if it missed):
    extra iterations (``isgd/extra_iters``; passes − iterations in runs without it, an upper
    bound), forward-only steps, and a digest of the evaluations (iteration, test loss and metric,
    not the passes: a stop check that found the batch under the limit costs a pass and changes
    nothing) — equal digests, the same model at every evaluation."""
    upto = list(metrics if index is None else metrics[: index + 1])
    if not upto:
        return {"extra_iters_to_target": None, "forward_only_to_target": None, "digest": None}
    last = upto[-1]
    extra = last.get("isgd/extra_iters", last["passes"] - last["iteration"])
    key = metric_key(metrics)
    seen = [[m["iteration"], m.get("test/loss"), m.get(key)] for m in upto]
    digest = hashlib.sha256(json.dumps(seen).encode()).hexdigest()[:16]
    return {
        "extra_iters_to_target": int(extra),
        "forward_only_to_target": int(last.get("isgd/forward_only", 0)),
        "digest": digest,
    }


def run_record(arm: str, seed: int, run_dir: Path, target: float) -> dict[str, Any]:
    """The per-run record of a finished run directory: the target's crossing interpolated
    between evaluations (``*_to_target``) and at the first evaluation reaching it (``*_grid``),
    in the direction of the run's metric."""
    metrics = list(runio.read_jsonl(run_dir / "metrics.jsonl"))
    summary = runio.read_json(run_dir / "summary.json")
    name, higher = metric_of(summary)
    key = metric_key(metrics)
    hit = crossing(metrics, target, higher, key)
    grid = time_to_target(metrics, target, higher, key)
    before = _before_target(metrics, first_reaching(metrics, target, higher, key))
    nan = math.nan
    return {
        "arm": arm,
        "seed": seed,
        "run_dir": str(run_dir),
        "optimizer": summary.get("optimizer"),
        "metric": name,
        "higher_is_better": higher,
        "target": target,
        "time_to_target": hit["seconds"],
        "passes_to_target": hit["passes"],
        "iterations_to_target": hit["iteration"],
        "time_to_target_grid": grid["seconds"],
        "passes_to_target_grid": grid["passes"],
        "extra_iters_to_target": before["extra_iters_to_target"],
        "forward_only_to_target": before["forward_only_to_target"],
        "evaluations_digest": before["digest"],
        "final_metric": summary.get("final/test_metric", summary.get("final/test_accuracy", nan)),
        "best_metric": summary.get("best/test_metric", summary.get("best/test_accuracy", nan)),
        # with a validation split: its final figure (targets are on it; the test's is read once)
        "final_val_metric": summary.get("final/val_metric", nan),
        "final_accuracy": summary.get("final/test_accuracy", nan),
        "final_balanced_accuracy": summary.get("final/test_balanced_accuracy", nan),
        "best_accuracy": summary.get("best/test_accuracy", nan),
        "train_seconds": summary["time/train_seconds"],
        "images_per_second": summary.get("images_per_second", nan),
        "iterations": summary["iterations"],
        "passes": summary["passes"],
        "extra_passes": summary["passes"] - summary["iterations"],
        "forward_only": summary.get("isgd/forward_only", 0),
        "backward_passes": summary.get("backward_passes", summary["passes"]),
        "backward_passes_to_target": hit.get("backward_passes", hit["passes"]),
        "trigger_rate": summary["isgd/trigger_rate"],
        "triggers": summary["isgd/triggers"],
        "momentum_ratio": _median_momentum_ratio(run_dir),
        # backward passes on parts of batches, each counting its fraction (selective backprop's)
        **{k: summary[k] for k in ("backward_batches",) if k in summary},
        # a copy of another run of the comparison with the same configuration (not trained)
        **_copied_from(run_dir),
    }


def _copied_from(run_dir: Path) -> dict[str, str]:
    """``{"copied_from": TWIN}`` for a copy, else nothing (no null to read back as nan)."""
    path = run_dir / "copied_from.json"
    return {"copied_from": str(runio.read_json(path)["run"])} if path.is_file() else {}


def with_metric(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` with the metric keys of records written before workloads named their metric:
    accuracy, higher is better, ``final_metric`` = ``final_accuracy``."""
    out = dict(record)
    out.setdefault("metric", "accuracy")
    out.setdefault("higher_is_better", True)
    out.setdefault("final_metric", out.get("final_accuracy", math.nan))
    out.setdefault("best_metric", out.get("best_accuracy", math.nan))
    return out


def _median_momentum_ratio(run_dir: Path) -> float | None:
    """Median over the triggered steps of ‖momentum term‖ / ‖∇φ‖ (None: no such step)."""
    path = run_dir / "steps.jsonl"
    if not path.is_file():
        return None
    ratios = sorted(
        r["momentum_ratio"] for r in runio.read_jsonl(path) if r.get("momentum_ratio") is not None
    )
    return _quantile(ratios, 0.5) if ratios else None


# ---------------------------------------------------------------------- aggregation
def aggregate(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, min and max over seeds; ``inf`` (missed target) sorts last, NaN (not
    recorded) is left out."""
    xs = sorted(v for v in values if not math.isnan(v))
    if not xs:
        return {
            "median": math.nan,
            "min": math.nan,
            "max": math.nan,
            "q25": math.nan,
            "q75": math.nan,
            "missed": 0,
            "n": 0,
        }
    return {
        "median": _quantile(xs, 0.5),
        "q25": _quantile(xs, 0.25),
        "q75": _quantile(xs, 0.75),
        "min": xs[0],
        "max": xs[-1],
        "missed": sum(math.isinf(x) for x in xs),
        "n": len(xs),
    }


def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile that stays ``inf`` (not NaN) when a neighbour is ``inf``."""
    position = q * (len(sorted_xs) - 1)
    lo, hi = math.floor(position), math.ceil(position)
    a, b = sorted_xs[lo], sorted_xs[hi]
    if lo == hi or a == b:
        return a
    if math.isinf(a) or math.isinf(b):
        return INF
    return a + (b - a) * (position - lo)


def speedup(base: float, arm: float) -> dict[str, float]:
    """Both readings of "faster": ``ratio = base / arm`` and ``saving = (base − arm) / base``.

    A missed target is ``inf``: an arm that reaches it where the baseline does not is infinitely
    faster (ratio inf, saving 1); the reverse gives ratio 0 and saving −inf; both missed: NaN.
    A target reached before training (0 s, 0 passes) is read the same way as the other end.
    """
    if math.isinf(base) and math.isinf(arm):
        return {"ratio": math.nan, "saving": math.nan}
    if math.isinf(base):
        return {"ratio": INF, "saving": 1.0}
    if math.isinf(arm):
        return {"ratio": 0.0, "saving": -INF}
    if arm == 0 or base == 0:  # reached at the first evaluation, before any training
        if arm == base:
            return {"ratio": math.nan, "saving": math.nan}
        return {"ratio": INF, "saving": 1.0} if arm == 0 else {"ratio": 0.0, "saving": -INF}
    return {"ratio": base / arm, "saving": (base - arm) / base}


AGGREGATED = (
    "time_to_target",
    "passes_to_target",
    "final_metric",
    "final_accuracy",
    "final_balanced_accuracy",
    "trigger_rate",
    "forward_only",
    "extra_passes",
    "train_seconds",
    "images_per_second",
)


def _the_metric(records: Sequence[Mapping[str, Any]]) -> tuple[str, bool]:
    """The one metric of a comparison's records (accuracy when there are none)."""
    kinds = {(r["metric"], r["higher_is_better"]) for r in records}
    if len(kinds) > 1:
        raise RunError(f"the runs of one comparison measure different metrics: {sorted(kinds)}")
    return kinds.pop() if kinds else ("accuracy", True)


def summarize(records: Sequence[dict[str, Any]], arms: Sequence[str]) -> dict[str, Any]:
    """Per-arm aggregates and ratios against the first arm (the baseline), the metric, and per
    arm the seeds that did not test it (:func:`identical_computation`)."""
    records = [with_metric(r) for r in records]
    metric, higher = _the_metric(records)
    per_arm: dict[str, Any] = {}
    for name in arms:
        rs = [r for r in records if r["arm"] == name]
        per_arm[name] = {
            key: aggregate([r.get(key, math.nan) for r in rs])  # older records lack some
            for key in AGGREGATED
        }
    base = per_arm[arms[0]]
    for name in arms:
        arm = per_arm[name]
        arm["speedup_time"] = speedup(
            base["time_to_target"]["median"], arm["time_to_target"]["median"]
        )
        arm["speedup_passes"] = speedup(
            base["passes_to_target"]["median"], arm["passes_to_target"]["median"]
        )
        # per seed: ratio of the baseline's time to this arm's time; median [min–max] of them
        paired = []
        for r in (r for r in records if r["arm"] == name):
            b = next((x for x in records if x["arm"] == arms[0] and x["seed"] == r["seed"]), None)
            if b is not None:
                paired.append(speedup(b["time_to_target"], r["time_to_target"])["ratio"])
        finite = [p for p in paired if not math.isnan(p)]
        arm["paired_time_ratio"] = aggregate(finite)
        identical = identical_computation(records, arms[0], name)
        identical["untested"] = untested_reason(name, arms[0], identical)
        arm["identical"] = identical
        if name != arms[0]:
            arm["paired"] = _paired(records, arms[0], name, identical["untested"])
    return {"baseline": arms[0], "metric": metric, "higher_is_better": higher, "arms": per_arm}


def identical_computation(
    records: Sequence[Mapping[str, Any]], base: str, name: str
) -> dict[str, Any]:
    """The seeds of arm ``name`` whose runs did not test it at the target.

    ``idle``: an ISGD arm (``optimizer`` isgd…) that ran 0 extra iterations and 0 forward-only
    steps up to the first evaluation at the target (the whole run if it missed): up to there it
    computed its base optimizer's steps. ``same``: the evaluations up to that point equal the
    baseline's of the same seed (iteration, passes, test loss and metric: the same computation).
    Records without these fields (written before) count in neither.
    """
    rs = [r for r in records if r["arm"] == name]
    is_isgd = any(str(r.get("optimizer") or "").startswith("isgd") for r in rs)
    idle = [
        r["seed"]
        for r in rs
        if is_isgd and r.get("extra_iters_to_target") == 0 and r.get("forward_only_to_target") == 0
    ]
    digests = {r["seed"]: r.get("evaluations_digest") for r in records if r["arm"] == base}
    same = [
        r["seed"]
        for r in rs
        if name != base
        and isinstance(r.get("evaluations_digest"), str)
        and r["evaluations_digest"] == digests.get(r["seed"])
    ]
    return {
        "seeds": [r["seed"] for r in rs],
        "isgd": is_isgd,
        "variant": any((r.get("forward_only") or 0) > 0 for r in rs),
        "idle": idle,
        "same": same,
    }


def untested_reason(name: str, base: str, identical: Mapping[str, Any]) -> str:
    """Why no seed of ``name`` tests it against ``base`` ("" when at least one does)."""
    seeds, idle, same = identical["seeds"], set(identical["idle"]), set(identical["same"])
    n = len(seeds)
    if not n or not set(seeds) <= idle | same:
        return ""
    if set(seeds) <= idle:
        return (
            f"ISGD did not act before the target in any of the {n} seeds ({_idle_what(identical)} "
            "before the crossing)"
        )
    if set(seeds) <= same:
        return f"{name} computed exactly what {base} computed up to the target in all {n} seeds"
    return (
        f"in each of the {n} seeds either ISGD did not act before the target or {name} computed "
        f"exactly what {base} computed up to it"
    )


def _idle_what(identical: Mapping[str, Any]) -> str:
    if identical.get("variant"):
        return "0 extra iterations and 0 forward-only steps"
    return "0 extra iterations"


def _paired(
    records: Sequence[dict[str, Any]], base: str, name: str, untested: str = ""
) -> dict[str, Any]:
    """Per-seed ratios base/arm of passes and of seconds to target, with their intervals (a miss
    censored at the run's budget), and the paired differences of the final metric."""
    by_seed = {r["seed"]: r for r in records if r["arm"] == base}
    pairs = [(by_seed[r["seed"]], r) for r in records if r["arm"] == name and r["seed"] in by_seed]
    out: dict[str, Any] = {"seeds": [r["seed"] for _, r in pairs]}
    for what, key, budget in (
        ("passes", "passes_to_target", "passes"),
        ("seconds", "time_to_target", "train_seconds"),
    ):
        result = paired_ratio(
            [b[key] for b, _ in pairs],
            [a[key] for _, a in pairs],
            base_budget=[float(b.get(budget, INF)) for b, _ in pairs],
            arm_budget=[float(a.get(budget, INF)) for _, a in pairs],
        )
        result["sentence"] = effect_sentence(name, base, result, what, untested)
        out[what] = result
    metric, higher = _the_metric([p for pair in pairs for p in pair])
    differences = [(f"final {label(metric)}", "final_metric", metric)]
    if metric == "accuracy":
        differences.append(
            ("final balanced accuracy", "final_balanced_accuracy", "balanced_accuracy")
        )
    for what, key, unit in differences:
        values = [(b.get(key, math.nan), a.get(key, math.nan)) for b, a in pairs]
        diff = paired_difference([b for b, _ in values], [a for _, a in values])
        diff["sentence"] = difference_sentence(
            name, base, diff, what, percent=unit in PERCENT_METRICS, higher_is_better=higher
        )
        out[key] = diff
    return out


# ---------------------------------------------------------------------- runs.jsonl
# A missed target is ``inf`` in memory; in ``runs.jsonl`` (strict JSON has no infinity) its
# to-target fields are ``null`` and ``"target_missed": true``. A figure not recorded (NaN) is
# ``null`` too. Files written before this (``"inf"``/``"nan"`` strings) read the same.
TARGET_KEYS = (
    "time_to_target",
    "passes_to_target",
    "iterations_to_target",
    "time_to_target_grid",
    "passes_to_target_grid",
    "backward_passes_to_target",
)
#: fields whose ``null`` means "none" or "not recorded" as such, not a number
NULLABLE = (
    "momentum_ratio",
    "optimizer",
    "extra_iters_to_target",
    "forward_only_to_target",
    "evaluations_digest",
)


def record_line(record: dict[str, Any]) -> str:
    """One ``runs.jsonl`` line: non-finite numbers as ``null``, a miss flagged."""
    out = {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()
    }
    out["target_missed"] = any(
        isinstance(record.get(k), float) and math.isinf(record[k]) for k in TARGET_KEYS
    )
    return runio.dumps(out)


def records_text(records: Sequence[dict[str, Any]]) -> str:
    return "".join(record_line(r) + "\n" for r in records)


def _from_line(record: dict[str, Any]) -> dict[str, Any]:
    """A ``runs.jsonl`` record in memory: ``null`` to-target fields ``inf`` (missed), other
    ``null`` numbers NaN (not recorded), :data:`NULLABLE` fields stay ``None``, a ``null``
    ``copied_from`` (not a copy) dropped; the metric keys of older records filled in
    (:func:`with_metric`)."""
    record = dict(record)
    record.pop("target_missed", None)
    if record.get("copied_from") is None:  # older files wrote null for "not a copy"
        record.pop("copied_from", None)
    for key, value in record.items():
        if value is None and key not in NULLABLE:
            record[key] = math.inf if key in TARGET_KEYS else math.nan
    return with_metric(record)


def load_records(out: Path) -> list[dict[str, Any]]:
    """The records of ``out/runs.jsonl`` (this form or the older one with ``"inf"`` strings)."""
    if not (out / "runs.jsonl").is_file():
        raise RunError(f"{out} is not a comparison directory (no runs.jsonl)")
    return [_from_line(r) for r in runio.read_jsonl(out / "runs.jsonl")]
