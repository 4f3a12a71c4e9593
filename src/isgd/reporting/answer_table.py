"""The answer in one table: method × workload → the saving at the target, or "no effect detected".

Reads the ``summary.json`` of finished comparisons (``isgd compare``; budget-matched ones with
``--budgets``) and writes one Markdown table a reader takes in at a glance: a row per arm (the
arms' names, so name them alike across comparisons: ``--arm isgd:optimizer=isgd-adamw``), a column
per comparison, and in each cell the arm's paired saving against that comparison's baseline at
the target, ``1 − arm/base`` of the cost (``compute``, ``passes`` or ``seconds``) with its 95 %
interval —

- **bold** when the interval excludes 0 (a saving, or a loss when negative) — unless seeds that
  missed the target, charged their whole run, could have made it so ("not shown");
- otherwise "no effect detected", with the smallest saving the run could have detected at 80 %
  power (:func:`isgd.experiments.paired.detectable_ratio`, as a saving ``1 − 1/ratio``).

A budget-matched comparison reads the saving where each seed's quality-against-cost curve
crosses the target (:func:`isgd.experiments.budgets.quality_vs_cost`); a single-budget one reads
the paired ratio of the cost to reach the target during the run (``passes`` or ``seconds``; it
has no modelled compute). Seeds where an arm missed the target are counted as the comparison
counts them (charged their whole run) and said under the table; an arm that computed what the
baseline computed in every seed (ISGD that never ran an extra iteration) is "not tested", the
comparison's reason under the table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from isgd.errors import RunError

__all__ = ["answer_table", "cell", "load_summary"]


def load_summary(comparison: Path) -> dict[str, Any]:
    """A finished comparison's ``summary.json``; one :class:`RunError` line otherwise."""
    from isgd.training import runio

    path = Path(comparison) / "summary.json"
    if not path.is_file():
        raise RunError(f"{comparison} has no summary.json (not a finished isgd compare directory)")
    try:
        summary = runio.read_json(path)  # "nan"/"inf" strings back to floats
    except (OSError, ValueError) as err:
        raise RunError(f"{path}: cannot be read ({err})") from None
    if not isinstance(summary, dict) or "arms" not in summary or "baseline" not in summary:
        raise RunError(f"{path} is not the summary of an isgd compare directory")
    return summary


def workload_label(summary: Mapping[str, Any]) -> str:
    """The column's name: the preset, else the workload function, else data set and model."""
    config = summary.get("config", {})
    name = config.get("preset") or config.get("workload")
    if not name:
        name = f"{config.get('dataset', '?')}, {config.get('model', '?')}"
    return f"{name} (vs {summary['baseline']})"


def saving_result(summary: Mapping[str, Any], arm: str, cost: str) -> dict[str, Any] | None:
    """The paired ratio ``base/arm`` behind a cell (``None``: the comparison did not measure it)."""
    curves = summary.get("quality_vs_cost")
    if curves and len(curves.get("budgets", [])) > 1:
        result = curves["arms"].get(arm, {}).get("saving", {}).get(cost)
        return result if result and result.get("n") else None
    paired = summary["arms"].get(arm, {}).get("paired") or {}
    result = paired.get(cost if cost in paired else "passes")
    return result if result and result.get("n") else None


def _pct(x: float) -> str:
    return f"{100 * x:+.1f} %" if math.isfinite(x) else "n/a"


def cell(result: Mapping[str, Any]) -> str:
    """One cell: the saving ``1 − arm/base`` with its interval, bold when the interval excludes
    0 in a direction the censoring cannot fake, else "no effect detected" with the smallest
    detectable saving. A seed where the arm missed the target is charged its whole run, less
    than it needed, so the saving is an upper bound there: a positive one is "not shown" (a
    baseline's misses make a negative one not shown, likewise)."""
    saving = 1 - 1 / result["ratio"]
    low, high = (1 - 1 / result[k] if result[k] > 0 else math.nan for k in ("low", "high"))
    interval = f"{_pct(saving)} [{_pct(low)}, {_pct(high)}]"
    if math.isfinite(low) and math.isfinite(high) and (low > 0 or high < 0):
        if low > 0 and result.get("arm_missed"):
            return f"not shown: ≤ {interval}, the arm missed the target in some seeds"
        if high < 0 and result.get("base_missed"):
            return f"not shown: ≥ {interval}, the baseline missed the target in some seeds"
        return f"**{interval}**"
    detectable = result.get("detectable", math.nan)
    smallest = 1 - 1 / detectable if math.isfinite(detectable) and detectable > 0 else math.nan
    tail = f"; detectable ≥ {100 * smallest:.1f} %" if math.isfinite(smallest) else ""
    return f"no effect detected ({interval}{tail})"


def answer_table(
    comparisons: Sequence[Path], cost: str = "compute", labels: Sequence[str] = ()
) -> str:
    """The Markdown table (with its notes) of the arms of ``comparisons`` against each
    comparison's baseline, reading the saving in ``cost``; ``labels`` name the columns
    (default: :func:`workload_label`). Arms no comparison measured at the target are left out."""
    summaries = [load_summary(c) for c in comparisons]
    if labels and len(labels) != len(summaries):
        raise RunError(f"{len(labels)} labels for {len(summaries)} comparisons")
    labels = list(labels) or [workload_label(s) for s in summaries]
    arms: list[str] = []
    for s in summaries:
        arms += [
            a
            for a in s["arms"]
            if a != s["baseline"] and a not in arms and saving_result(s, a, cost) is not None
        ]
    lines = [
        f"| method | {' | '.join(labels)} |",
        f"|---|{'---|' * len(labels)}",
    ]
    notes: list[str] = []
    for arm in arms:
        cells = []
        for s, label in zip(summaries, labels):
            result = saving_result(s, arm, cost) if arm in s["arms"] else None
            untested = (s["arms"].get(arm, {}).get("identical") or {}).get("untested")
            if result and untested:  # e.g. ISGD that never ran an extra iteration
                cells.append("not tested (see below)")
                notes.append(f"{arm} on {label}: not tested — {untested}")
                continue
            cells.append(cell(result) if result else "—")
            if result and (result.get("arm_missed") or result.get("base_missed")):
                notes.append(
                    f"{arm} on {label}: {result.get('arm_missed', 0)} of its seeds and "
                    f"{result.get('base_missed', 0)} of the baseline's did not reach the target; "
                    "each is charged its whole run (a bound)"
                )
        lines.append(f"| {arm} | {' | '.join(cells)} |")
    kinds = {"compute": "modelled compute", "passes": "passes", "seconds": "seconds"}
    header = (
        f"Saving in {kinds.get(cost, cost)} at the target, 1 − arm/baseline, paired over seeds "
        "(geometric mean, 95 % interval); bold: the interval excludes 0; detectable: the "
        "smallest saving the run had 80 % power to detect; —: not measured.\n\n"
    )
    targets = "".join(
        f"- {label}: target {s.get('target')} ({s.get('metric', 'accuracy')}), seeds "
        f"{s.get('seeds')}, budgets {(s.get('quality_vs_cost') or {}).get('budgets', [1.0])}\n"
        for s, label in zip(summaries, labels)
    )
    return header + "\n".join(lines) + "\n\n" + targets + "".join(f"- {n}\n" for n in notes)
