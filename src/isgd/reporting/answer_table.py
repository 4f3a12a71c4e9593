"""The answer in one table: method × workload → the saving at the target, or "no effect detected".

Reads the ``summary.json`` of finished comparisons (``isgd compare``; budget-matched ones with
``--budgets``) and writes one Markdown table a reader takes in at a glance: a row per arm (the
arms' names, so name them alike across comparisons: ``--arm isgd:optimizer=isgd-adamw``), a column
per comparison, and in each cell the arm's paired saving against that comparison's baseline at
the target, ``1 − arm/base`` of the cost (``compute``, ``passes`` or ``seconds``) with its 95 %
interval —

- **bold** when the interval excludes 0 (a saving, or a loss when negative) — unless seeds whose
  cost is only a bound could have made it so ("not shown"): a seed that missed the target is
  charged its whole run (less than it needed), one that reached it already at the smallest
  budget that budget's cost (at most what it needed);
- otherwise "no effect detected", with the smallest saving the run could have detected at 80 %
  power (:func:`isgd.experiments.paired.detectable_ratio`, as a saving ``1 − 1/ratio``; left out
  when the seeds' ratios do not spread at all), the estimate marked ≤ or ≥ when bounded seeds
  make it a bound;
- "1 seed: no interval" with the one seed's saving;
- "neither reached the target" when arm and baseline both missed it in every seed.

A budget-matched comparison reads the saving where each seed's quality-against-cost curve
crosses the target (:func:`isgd.experiments.budgets.quality_vs_cost`); a single-budget one reads
the paired ratio of the cost to reach the target during the run (``passes`` or ``seconds``; it
has no modelled compute, so its column is read in passes and says so). The notes under the table
say, per cell, the seeds it rests on when not all of them, the seeds left out and why, and the
seeds whose cost is a bound; an arm that computed what the baseline computed in every seed (ISGD
that never ran an extra iteration) is "not tested", the comparison's reason under the table. A
summary without paired savings (written before ``isgd compare`` recorded them) is refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from isgd.errors import RunError

__all__ = ["answer_table", "cell", "column_cost", "load_summary"]

AT_SMALLEST = "at the smallest budget"  # how budgets.crossing_cost marks a crossing at most there
KINDS = {"compute": "modelled compute", "passes": "passes", "seconds": "seconds"}
# why a bold interval in one direction cannot be shown: the seeds whose cost is a bound that way
UPPER = {
    "arm_missed": "the arm missed the target",
    "base_early": "the baseline reached it at the smallest budget",
}
LOWER = {
    "base_missed": "the baseline missed the target",
    "arm_early": "the arm reached it at the smallest budget",
}


def load_summary(comparison: Path) -> dict[str, Any]:
    """A finished comparison's ``summary.json`` with paired savings to read; one
    :class:`RunError` line otherwise."""
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
    arms = [a for name, a in summary["arms"].items() if name != summary["baseline"]]
    if not _budgeted(summary) and not any("paired" in a for a in arms):
        raise RunError(
            f"{comparison}: no paired savings at the target (a comparison summarised before isgd "
            "compare recorded them, or one with no arm besides its baseline); where its run "
            f"directories are kept, isgd compare --retarget {comparison} --target "
            f"{summary.get('target', 'VALUE')} writes a summary that has them, in "
            f"{Path(comparison) / 'target-T'}"
        )
    return summary


def workload_label(summary: Mapping[str, Any]) -> str:
    """The column's name: the preset, else the workload function, else data set and model."""
    config = summary.get("config", {})
    name = config.get("preset") or str(config.get("workload") or "").replace("\\", "/")
    name = name.rsplit("/", 1)[-1]  # a workload file's name, not its whole path
    if not name:
        name = f"{config.get('dataset', '?')}, {config.get('model', '?')}"
    return f"{name} (vs {summary['baseline']})"


def _budgeted(summary: Mapping[str, Any]) -> bool:
    """A budget-matched comparison: its savings are read on the quality-against-cost curves."""
    return len((summary.get("quality_vs_cost") or {}).get("budgets", [])) > 1


def column_cost(summary: Mapping[str, Any], cost: str) -> str:
    """The cost a comparison's column is read in: ``cost``, but ``passes`` for ``compute`` in a
    single-budget comparison (it has no modelled compute)."""
    return cost if _budgeted(summary) or cost != "compute" else "passes"


def saving_result(summary: Mapping[str, Any], arm: str, cost: str) -> dict[str, Any] | None:
    """The paired ratio ``base/arm`` behind a cell, with ``arm_early``/``base_early``: the seeds
    where that side reached the target already at the smallest budget (its cost there an upper
    bound). ``None``: the comparison did not measure it (no seed paired, unless both missed the
    target in every seed)."""
    kind = column_cost(summary, cost)
    if _budgeted(summary):
        result = summary["quality_vs_cost"]["arms"].get(arm, {}).get("saving", {}).get(kind)
    else:
        result = (summary["arms"].get(arm, {}).get("paired") or {}).get(kind)
    if not result or not (result.get("n") or _neither(result)):
        return None
    how = result.get("how", {})  # budget-matched only: per seed, how each side crossed
    early = {who: sum(h == AT_SMALLEST for h in how.get(who, [])) for who in how}
    return {
        **result,
        "arm_early": early.get(arm, 0),
        "base_early": early.get(summary["baseline"], 0),
    }


def _neither(result: Mapping[str, Any]) -> bool:
    """No seed paired because arm and baseline both missed the target in every seed."""
    both = result.get("both_missed", 0)
    return not result.get("n") and both > 0 and both == result.get("left_out", both)


def _number(x: Any) -> str:
    """A target as it was used, without float noise (6 significant digits)."""
    return f"{x:.6g}" if isinstance(x, (int, float)) else str(x)


def _pct(x: float) -> str:
    return f"{100 * x:+.1f} %" if math.isfinite(x) else "n/a"


def cell(result: Mapping[str, Any]) -> str:
    """One cell: the saving ``1 − arm/base`` with its interval, bold when the interval excludes
    0 in a direction the bounded seeds cannot fake, else "no effect detected" with the smallest
    detectable saving (none when the seeds' ratios do not spread). A seed where the arm missed
    the target is charged its whole run, less than it needed, and one where the baseline reached
    it at the smallest budget that budget's cost, at most what it needed: the saving is an upper
    bound there, so a positive one is "not shown" (the baseline's misses and the arm's crossings
    at the smallest budget make a negative one not shown, likewise)."""
    if _neither(result):
        return "neither reached the target"
    saving = 1 - 1 / result["ratio"]
    upper, lower = _bounded(result, UPPER), _bounded(result, LOWER)
    # a bound when seeds' costs are (the notes say which); bounds both ways: no direction
    bound = "≤ " if upper and not lower else "≥ " if lower and not upper else ""
    if result["n"] == 1:
        return f"1 seed: no interval ({bound}{_pct(saving)})"
    low, high = (1 - 1 / result[k] if result[k] > 0 else math.nan for k in ("low", "high"))
    interval = f"{_pct(saving)} [{_pct(low)}, {_pct(high)}]"
    if math.isfinite(low) and math.isfinite(high) and (low > 0 or high < 0):
        why = _bounded(result, UPPER if low > 0 else LOWER)
        if why:
            return f"not shown: {'≤' if low > 0 else '≥'} {interval}, {why} in some seeds"
        return f"**{bound}{interval}**"
    detectable = result.get("detectable", math.nan)
    tail = f"; detectable ≥ {100 * (1 - 1 / detectable):.1f} %" if detectable > 1 else ""
    return f"no effect detected ({bound}{interval}{tail})"


def _bounded(result: Mapping[str, Any], bounds: Mapping[str, str]) -> str:
    """Why the saving is a bound in the direction of ``bounds`` (``UPPER``/``LOWER``), or ""."""
    return " and ".join(text for key, text in bounds.items() if result.get(key))


def seeds_note(result: Mapping[str, Any], n_seeds: int) -> str:
    """What a cell rests on, said when not every seed entered it as measured: the seeds left out
    and why, and those whose cost is a bound ("" when none)."""
    n, both, left_out = result["n"], result.get("both_missed", 0), result.get("left_out", 0)
    left = {
        "where both missed the target": both,
        "with a miss and no budget, or the target met before training": left_out - both,
        "without all their runs": n_seeds - n - left_out,
    }
    parts = []
    if any(k > 0 for k in left.values()):
        why = "; ".join(f"{k} {reason}" for reason, k in left.items() if k > 0)
        parts.append(f"rests on {n} of {n_seeds} seeds (left out: {why})")
    for arm, base, what in (
        ("arm_missed", "base_missed", "did not reach the target; each is charged its whole run"),
        (
            "arm_early",
            "base_early",
            "reached it already at the smallest budget; each is charged that budget's cost",
        ),
    ):
        if result.get(arm) or result.get(base):
            parts.append(
                f"{result.get(arm, 0)} of its seeds and {result.get(base, 0)} of the baseline's "
                f"{what} (a bound)"
            )
    return "; ".join(parts)


def _labels(comparisons: Sequence[Path], summaries: Sequence[Mapping[str, Any]]) -> list[str]:
    """The default column names, one that repeats told apart by its comparison's directory
    (its name, or its path where the names repeat too)."""
    labels = [workload_label(s) for s in summaries]
    names = [Path(c).resolve().name for c in comparisons]
    out = []
    for label, name, c in zip(labels, names, comparisons):
        if labels.count(label) > 1:
            twins = [m for m, other in zip(names, labels) if other == label]
            label = f"{label} — {name if twins.count(name) == 1 else c}"
        out.append(label)
    return out


def answer_table(
    comparisons: Sequence[Path], cost: str = "compute", labels: Sequence[str] = ()
) -> str:
    """The Markdown table (with its notes) of the arms of ``comparisons`` against each
    comparison's baseline, reading the saving in ``cost`` (in passes where a single-budget
    comparison has no modelled compute, said under the table); ``labels`` name the columns
    (default: :func:`workload_label`, and the directory's name where two would read alike).
    Arms no comparison measured at the target are left out."""
    summaries = [load_summary(c) for c in comparisons]
    if labels and len(labels) != len(summaries):
        raise RunError(f"{len(labels)} labels for {len(summaries)} comparisons")
    for given, what in (
        (labels, "label"),
        ([Path(c).resolve() for c in comparisons], "comparison"),
    ):
        twice = next((x for i, x in enumerate(given) if x in given[:i]), None)
        if twice is not None:
            raise RunError(f"{what} {twice} given twice: each column needs its own")
    labels = list(labels) or _labels(comparisons, summaries)
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
            n_seeds = len(s.get("seeds") or []) or (result or {}).get("n", 0)
            note = seeds_note(result, n_seeds) if result else ""
            if note:
                notes.append(f"{arm} on {label}: {note}")
        lines.append(f"| {arm} | {' | '.join(cells)} |")
    used = [column_cost(s, cost) for s in summaries]
    other = "" if set(used) == {cost} else " (or the cost a column's note names)"
    header = (
        f"Saving in {KINDS.get(cost, cost)}{other} at the target, 1 − arm/baseline, paired over "
        "seeds (geometric mean, 95 % interval); bold: the interval excludes 0; detectable: the "
        "smallest saving the run had 80 % power to detect; —: not measured. A cell rests on "
        "every seed of its comparison unless a note says otherwise.\n\n"
    )
    targets = "".join(
        f"- {label}: target {_number(s.get('target'))} ({s.get('metric', 'accuracy')}), seeds "
        f"{s.get('seeds')}, budgets {(s.get('quality_vs_cost') or {}).get('budgets', [1.0])}"
        + (
            ""
            if kind == cost
            else f"; saving in {KINDS.get(kind, kind)} (a single-budget comparison has no "
            f"{KINDS.get(cost, cost)})"
        )
        + "\n"
        for s, label, kind in zip(summaries, labels, used)
    )
    return header + "\n".join(lines) + "\n\n" + targets + "".join(f"- {n}\n" for n in notes)
