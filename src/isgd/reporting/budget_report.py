"""The budget section of an ``isgd compare --budgets`` report: the final metric against cost per
arm at each budget (with the paired difference from the baseline at that budget), the saving at
the target read on the budget curves, and the figure of quality against cost.

The numbers are :func:`isgd.experiments.budgets.quality_vs_cost`'s (the comparison summary's
``quality_vs_cost``); this module only writes them down.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from isgd.reporting.metric import PERCENT_METRICS
from isgd.reporting.metric import label as _label

__all__ = ["budget_section", "quality_vs_cost_figure"]

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]
COST_NAMES = {
    "passes": "passes",
    "compute": "modelled compute (training steps)",
    "seconds": "train seconds (shared machine)",
}


def _value(metric: str, x: float) -> str:
    if math.isnan(x):
        return "—"
    return f"{100 * x:.2f}%" if metric in PERCENT_METRICS else f"{x:.4g}"


def _difference(metric: str, d: dict[str, Any] | None) -> str:
    if not d or not d["n"]:
        return "—"
    scale, unit = (100.0, " pp") if metric in PERCENT_METRICS else (1.0, "")
    if d["n"] < 2 or math.isnan(d["low"]):
        return f"{scale * d['difference']:+.3g}{unit} (n = {d['n']})"
    return (
        f"{scale * d['difference']:+.3g} [{scale * d['low']:+.3g}, {scale * d['high']:+.3g}]{unit}"
    )


def _saving(r: dict[str, Any]) -> str:
    if not r["n"]:
        return "— (no seed where both reached it)"
    if r["n"] < 2 or math.isnan(r["low"]):
        return f"{100 * r['saving']:+.1f} % (n = {r['n']})"
    low, high = 1 - 1 / r["low"], 1 - 1 / r["high"]
    return f"{100 * r['saving']:+.1f} % [{100 * low:+.1f}, {100 * high:+.1f}]"


def budget_section(result: dict[str, Any]) -> list[str]:
    """Markdown lines for ``result["quality_vs_cost"]`` (none without budgets)."""
    quality = result.get("quality_vs_cost")
    if not quality:
        return []
    metric, higher = result.get("metric", "accuracy"), result.get("higher_is_better", True)
    base = result["baseline"]
    budgets = [f"{b:g}" for b in quality["budgets"]]
    on = "validation" if result.get("target_rule") or _has_validation(result) else "test"
    lines = [
        "",
        "## Quality against cost: every arm at each budget",
        "",
        f"Each arm trained at {', '.join(budgets)} of the run, its learning-rate schedule "
        "compressed to that budget and fully decayed (not a long run cut short). Final test "
        f"{_label(metric)} (median over seeds) against what it cost (median); the difference "
        f"from {base} is paired seed by seed at the same budget, with its 95 % interval "
        f"({'higher' if higher else 'lower'} is better).",
        "",
        f"| arm | budget | final {_label(metric)} | {metric} − {base} [95 % CI] | passes | "
        "compute | seconds |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for name, arm in quality["arms"].items():
        for b in budgets:
            row = arm["per_budget"][b]
            lines.append(
                f"| {name} | {b} | {_value(metric, row['final_metric'])} | "
                f"{_difference(metric, row['vs_base'])} | {row['passes']:,.0f} | "
                f"{row['compute']:,.0f} | {row['seconds']:.1f} |"
            )
    lines += [
        "",
        f"**Saving at the target** ({_value(metric, quality['target'])} on the {on} split): per "
        "seed, the cost at which the arm's final metric across the budgets reaches the target "
        f"(interpolated between budgets), paired with {base}'s; the geometric mean of "
        f"{base}/arm gives the saving 1 − arm/{base} with its 95 % interval (positive: the arm "
        "needs less).",
        "",
        "| arm | " + " | ".join(f"saving in {COST_NAMES[k]}" for k in COST_NAMES) + " |",
        "|---|" + "---|" * len(COST_NAMES),
    ]
    notes: list[str] = []
    for name, arm in quality["arms"].items():
        if not arm["saving"]:
            continue
        cells = [_saving(arm["saving"][k]) for k in COST_NAMES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        notes += _crossing_notes(name, base, arm["saving"]["passes"])
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return lines


def _crossing_notes(name: str, base: str, r: dict[str, Any]) -> list[str]:
    """What the crossings cannot say: a target reached at the smallest budget (the cost is an
    upper bound) or never (censored at the largest budget)."""
    notes = []
    for who in (base, name):
        hows = r.get("how", {}).get(who, [])
        early = sum(h == "at the smallest budget" for h in hows)
        missed = sum(h == "missed" for h in hows)
        if early:
            notes.append(
                f"{who} reached the target already at the smallest budget in {early} of "
                f"{len(hows)} seeds: its cost there is an upper bound; give smaller budgets or "
                "a harder target to read it"
            )
        if missed:
            notes.append(
                f"{who} did not reach the target at any budget in {missed} of {len(hows)} "
                "seeds: charged its largest budget (censored)"
            )
    return notes


def _has_validation(result: dict[str, Any]) -> bool:
    return bool(result.get("config", {}).get("validation"))


def quality_vs_cost_figure(result: dict[str, Any], path: Path) -> Path | None:
    """The final test metric (median over seeds) against passes and against modelled compute,
    one line per arm through its budgets; the target as a dashed line."""
    quality = result.get("quality_vs_cost")
    if not quality:
        return None
    metric = result.get("metric", "accuracy")
    percent = metric in PERCENT_METRICS
    fig = Figure(figsize=(11, 4.6), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, kind in zip(axes, ("passes", "compute")):
        for colour, (name, arm) in zip(COLOURS * 4, quality["arms"].items()):
            rows = [arm["per_budget"][f"{b:g}"] for b in quality["budgets"]]
            xs = [r[kind] for r in rows]
            ys = [(100 * (1 - r["final_metric"]) if percent else r["final_metric"]) for r in rows]
            ax.plot(xs, ys, "o-", color=colour, label=name)
        target = quality["target"]
        if target:
            y = 100 * (1 - target) if percent else target
            ax.axhline(y, color="k", ls="--", lw=1, label="target")
        ax.set_xlabel(COST_NAMES[kind])
        ax.set_ylabel("test error (%)" if percent else f"test {_label(metric)}")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(
        "final quality against cost at each budget (median over seeds; schedules compressed)"
    )
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)
    return path
