"""The records of finished runs and their statistics: one record per run directory (crossings
of the target, final accuracies, counters), and per arm the aggregates over seeds and the paired
comparison with the baseline (:mod:`isgd.experiments.paired`). No training here: ``isgd compare``
(:mod:`isgd.experiments.compare`) writes these, ``--retarget`` and the scripts re-read them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from isgd.experiments.paired import (
    crossing,
    difference_sentence,
    effect_sentence,
    paired_difference,
    paired_ratio,
)
from isgd.training import runio
from isgd.training.runio import RunError

__all__ = [
    "aggregate",
    "load_records",
    "record_line",
    "records_text",
    "run_record",
    "speedup",
    "summarize",
    "time_to_target",
]

INF = math.inf


# ---------------------------------------------------------------------- per-run figures
def time_to_target(metrics: Sequence[dict[str, Any]], target: float) -> dict[str, float]:
    """Seconds, passes and iterations at the first evaluation with accuracy ≥ ``target``."""
    for record in metrics:
        if record["test/accuracy"] >= target:
            return {
                "seconds": record["time/train_seconds"],
                "passes": float(record["passes"]),
                "iteration": float(record["iteration"]),
            }
    return {"seconds": INF, "passes": INF, "iteration": INF}


def run_record(arm: str, seed: int, run_dir: Path, target: float) -> dict[str, Any]:
    """The per-run record of a finished run directory: the target's crossing interpolated
    between evaluations (``*_to_target``) and at the first evaluation reaching it (``*_grid``)."""
    metrics = list(runio.read_jsonl(run_dir / "metrics.jsonl"))
    summary = runio.read_json(run_dir / "summary.json")
    hit, grid = crossing(metrics, target), time_to_target(metrics, target)
    return {
        "arm": arm,
        "seed": seed,
        "run_dir": str(run_dir),
        "target": target,
        "time_to_target": hit["seconds"],
        "passes_to_target": hit["passes"],
        "iterations_to_target": hit["iteration"],
        "time_to_target_grid": grid["seconds"],
        "passes_to_target_grid": grid["passes"],
        "final_accuracy": summary["final/test_accuracy"],
        "final_balanced_accuracy": summary.get("final/test_balanced_accuracy", math.nan),
        "best_accuracy": summary["best/test_accuracy"],
        "train_seconds": summary["time/train_seconds"],
        "images_per_second": summary.get("images_per_second", math.nan),
        "iterations": summary["iterations"],
        "passes": summary["passes"],
        "extra_passes": summary["passes"] - summary["iterations"],
        "forward_only": summary.get("isgd/forward_only", 0),
        "backward_passes": summary.get("backward_passes", summary["passes"]),
        "backward_passes_to_target": hit.get("backward_passes", hit["passes"]),
        "trigger_rate": summary["isgd/trigger_rate"],
        "triggers": summary["isgd/triggers"],
        "momentum_ratio": _median_momentum_ratio(run_dir),
    }


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


def summarize(records: Sequence[dict[str, Any]], arms: Sequence[str]) -> dict[str, Any]:
    """Per-arm aggregates and ratios against the first arm (the baseline)."""
    per_arm: dict[str, Any] = {}
    for name in arms:
        rs = [r for r in records if r["arm"] == name]
        per_arm[name] = {
            key: aggregate([r.get(key, math.nan) for r in rs])  # older records lack some
            for key in (
                "time_to_target",
                "passes_to_target",
                "final_accuracy",
                "final_balanced_accuracy",
                "trigger_rate",
                "forward_only",
                "extra_passes",
                "train_seconds",
                "images_per_second",
            )
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
        # paired per seed: ratio of the baseline's time to this arm's time, then the median
        paired = []
        for r in (r for r in records if r["arm"] == name):
            b = next((x for x in records if x["arm"] == arms[0] and x["seed"] == r["seed"]), None)
            if b is not None:
                paired.append(speedup(b["time_to_target"], r["time_to_target"])["ratio"])
        finite = [p for p in paired if not math.isnan(p)]
        arm["paired_time_ratio"] = aggregate(finite)
        if name != arms[0]:
            arm["paired"] = _paired(records, arms[0], name)
    return {"baseline": arms[0], "arms": per_arm}


def _paired(records: Sequence[dict[str, Any]], base: str, name: str) -> dict[str, Any]:
    """Per-seed ratios base/arm of passes and of seconds to target, with their intervals."""
    by_seed = {r["seed"]: r for r in records if r["arm"] == base}
    pairs = [(by_seed[r["seed"]], r) for r in records if r["arm"] == name and r["seed"] in by_seed]
    out: dict[str, Any] = {"seeds": [r["seed"] for _, r in pairs]}
    for what, key in (("passes", "passes_to_target"), ("seconds", "time_to_target")):
        result = paired_ratio([b[key] for b, _ in pairs], [a[key] for _, a in pairs])
        result["sentence"] = effect_sentence(name, base, result, what)
        out[what] = result
    for what, key in (
        ("final accuracy", "final_accuracy"),
        ("final balanced accuracy", "final_balanced_accuracy"),
    ):
        values = [(b.get(key, math.nan), a.get(key, math.nan)) for b, a in pairs]
        diff = paired_difference([b for b, _ in values], [a for _, a in values])
        diff["sentence"] = difference_sentence(name, base, diff, what)
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
    ``null`` numbers NaN (not recorded); ``momentum_ratio`` stays ``None``."""
    record = dict(record)
    record.pop("target_missed", None)
    for key, value in record.items():
        if value is None and key != "momentum_ratio":
            record[key] = math.inf if key in TARGET_KEYS else math.nan
    return record


def load_records(out: Path) -> list[dict[str, Any]]:
    """The records of ``out/runs.jsonl`` (this form or the older one with ``"inf"`` strings)."""
    if not (out / "runs.jsonl").is_file():
        raise RunError(f"{out} is not a comparison directory (no runs.jsonl)")
    return [_from_line(r) for r in runio.read_jsonl(out / "runs.jsonl")]
