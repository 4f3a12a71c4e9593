"""Tables of finished runs, from their ``summary.json`` files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from isgd.reporting.metric import PERCENT_METRICS
from isgd.training.runio import RunError

__all__ = ["load_summary", "runs_table"]


def load_summary(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "summary.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{run_dir} has no summary.json (not a finished run)") from None
    except json.JSONDecodeError as err:
        raise RunError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}") from None


def _fmt(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _metric_value(name: str, value: Any) -> str:
    """A value of the metric ``name``: a percentage for accuracy, else 4 significant digits."""
    if value is None:
        return "—"
    return f"{100 * value:.2f}%" if name in PERCENT_METRICS else f"{value:.4g}"


def _row_metric(s: dict[str, Any]) -> tuple[str, Any, Any, Any]:
    """(name, final, best, target) of a summary; before workloads: accuracy."""
    name = str(s.get("metric/name", "accuracy"))
    final = s.get("final/test_metric", s.get("final/test_accuracy"))
    best = s.get("best/test_metric", s.get("best/test_accuracy"))
    return name, final, best, s.get("target/metric", s.get("target/accuracy"))


def runs_table(run_dirs: list[Path]) -> str:
    """A markdown table: one row per run, the figures a reader compares first."""
    rows = [
        "| run | optimizer | iterations | passes | train s | samples/s | metric | final | best "
        "| triggers | extra iters | to target: s / passes |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for run_dir in run_dirs:
        s = load_summary(run_dir)
        name, final, best, goal = _row_metric(s)
        target = "—"
        if goal:
            reached = s.get("target/train_seconds")
            target = f"{_metric_value(name, goal)}: " + (
                f"{reached:.1f} s / {s['target/passes']}" if reached is not None else "missed"
            )
        direction = "" if s.get("metric/higher_is_better", True) else " (lower is better)"
        rows.append(
            f"| {Path(run_dir).name} | {s['optimizer']} | {s['iterations']} | {s['passes']} "
            f"| {s['time/train_seconds']:.1f} | {_fmt(s.get('images_per_second'), ',.0f')} "
            f"| {name.replace('_', ' ')}{direction} | {_metric_value(name, final)} "
            f"| {_metric_value(name, best)} | {s['isgd/triggers']} | {s['isgd/extra_iters']} "
            f"| {target} |"
        )
    return "\n".join(rows) + "\n"
