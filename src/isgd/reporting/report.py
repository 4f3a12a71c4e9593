"""Tables of finished runs, from their ``summary.json`` files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def runs_table(run_dirs: list[Path]) -> str:
    """A markdown table: one row per run, the figures a reader compares first."""
    rows = [
        "| run | optimizer | iterations | passes | train s | img/s | final acc % | best acc % "
        "| triggers | extra iters | to target: s / passes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for run_dir in run_dirs:
        s = load_summary(run_dir)
        target = "—"
        if s.get("target/accuracy"):
            reached = s.get("target/train_seconds")
            target = f"{100 * s['target/accuracy']:.2f}%: " + (
                f"{reached:.1f} s / {s['target/passes']}" if reached is not None else "missed"
            )
        rows.append(
            f"| {Path(run_dir).name} | {s['optimizer']} | {s['iterations']} | {s['passes']} "
            f"| {s['time/train_seconds']:.1f} | {_fmt(s.get('images_per_second'), ',.0f')} "
            f"| {100 * s['final/test_accuracy']:.2f} | {100 * s['best/test_accuracy']:.2f} "
            f"| {s['isgd/triggers']} | {s['isgd/extra_iters']} | {target} |"
        )
    return "\n".join(rows) + "\n"
