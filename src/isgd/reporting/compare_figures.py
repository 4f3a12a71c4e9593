"""The figures of an ``isgd compare`` directory: the metric against seconds and against passes
(median and min–max band over seeds), passes and seconds to the target per seed, and the spread
of the batch losses — each with what it cannot show in a caption (seconds from a shared machine,
arms whose curves coincide).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from isgd.reporting.metric import PERCENT_METRICS, metric_key
from isgd.reporting.metric import label as _label
from isgd.training import runio

__all__ = ["coinciding", "comparison_metric", "time_caption", "write_figures"]

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def comparison_metric(records: Sequence[dict[str, Any]]) -> tuple[str, bool]:
    """The comparison's metric and direction, from its records (accuracy before workloads)."""
    if not records:
        return "accuracy", True
    return str(records[0].get("metric", "accuracy")), bool(records[0].get("higher_is_better", True))


def _evaluations(run_dir: str) -> list[dict[str, Any]]:
    return list(runio.read_jsonl(Path(run_dir) / "metrics.jsonl"))


def _curves(records: Sequence[dict[str, Any]], arm: str, x_key: str):
    """Per run of ``arm``: (x, y) arrays from its metrics.jsonl — y the test error in % for a
    fraction metric (accuracy), else the metric itself."""
    metric, _ = comparison_metric(records)
    out = []
    for r in records:
        if r["arm"] != arm:
            continue
        metrics = _evaluations(r["run_dir"])
        key = metric_key(metrics)
        rows = [m for m in metrics if m.get(key) is not None]
        x = np.array([m[x_key] for m in rows], dtype=float)
        y = np.array([m[key] for m in rows], dtype=float)
        out.append((x, 100 * (1 - y) if metric in PERCENT_METRICS else y))
    return out


def coinciding(records: Sequence[dict[str, Any]], arms: Sequence[str], key: str) -> list[str]:
    """ "A = B" for each pair of arms whose ``key`` (a record field, or ``"evaluations"``: the
    metric at every evaluation) is the same in every seed they share — curves that lie on top of
    each other."""

    def values(arm: str) -> dict[int, Any]:
        rs = [r for r in records if r["arm"] == arm]
        if key != "evaluations":
            return {r["seed"]: r.get(key) for r in rs}
        out = {}
        for r in rs:
            metrics = _evaluations(r["run_dir"])
            m = metric_key(metrics)
            out[r["seed"]] = [(e["iteration"], e.get(m)) for e in metrics]
        return out

    by_arm = {arm: values(arm) for arm in arms}
    same = []
    for i, a in enumerate(arms):
        for b in arms[i + 1 :]:
            shared = set(by_arm[a]) & set(by_arm[b])
            if shared and all(by_arm[a][s] == by_arm[b][s] for s in shared):
                same.append(f"{a} = {b}")
    return same


def _band(curves, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Median, min and max over runs of the curve interpolated on ``grid`` (NaN outside a
    run's range, so a band never extrapolates)."""
    ys = np.full((len(curves), len(grid)), np.nan)
    for i, (x, err) in enumerate(curves):
        inside = (grid >= x[0]) & (grid <= x[-1])
        ys[i, inside] = np.interp(grid[inside], x, err)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(ys, 0), np.nanmin(ys, 0), np.nanmax(ys, 0)


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)
    return path


def _error_figure(
    records, arms, x_key: str, xlabel: str, target: float, path: Path, note: str = ""
) -> Path:
    """The metric against ``x_key``, per arm the median and min–max band over seeds: the test
    error (%, log scale) for accuracy, else the metric (log scale where it spans a decade)."""
    metric, higher = comparison_metric(records)
    percent = metric in PERCENT_METRICS
    fig = Figure(figsize=(10, 5.2), layout="constrained")
    ax = fig.add_subplot()
    shown: list[np.ndarray] = []
    for colour, arm in zip(COLOURS * 4, arms):
        curves = _curves(records, arm, x_key)
        curves = [(x, y) for x, y in curves if len(x)]
        if not curves:
            continue
        shown += [y for _, y in curves]
        hi = max(x[-1] for x, _ in curves)
        grid = np.linspace(0, hi, 300)
        median, low, high = _band(curves, grid)
        ax.fill_between(grid, low, high, color=colour, alpha=0.18, linewidth=0)
        # the median of all seeds only where every seed has data (it would jump where one ends)
        common = grid <= min(x[-1] for x, _ in curves)
        ax.plot(
            grid[common],
            median[common],
            color=colour,
            lw=1.8,
            label=f"{arm} (median of {len(curves)})",
        )
    if target and percent:
        ax.axhline(100 * (1 - target), color="k", ls="--", lw=1, label=f"target {100 * target:g}%")
    elif target:
        ax.axhline(target, color="k", ls="--", lw=1, label=f"target {target:g}")
    values = np.concatenate(shown) if shown else np.zeros(0)
    values = values[np.isfinite(values)]
    log = percent or (len(values) > 0 and values.min() > 0 and values.max() / values.min() > 10)
    if log:
        ax.set_yscale("log")
    what = "test error (%)" if percent else f"test {_label(metric)}"
    direction = "" if percent else f" ({'higher' if higher else 'lower'} is better)"
    ax.set_xlabel(xlabel)
    ax.set_ylabel(what + (", log scale" if log else "") + direction)
    ax.set_title(
        f"{what[:1].upper()}{what[1:]} against {xlabel.split(' (')[0]}: median and min–max "
        "band over seeds"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if note:
        fig.supxlabel(note, fontsize=9, color="#444444")
    return _save(fig, path)


SECONDS_NOTE = (
    "Seconds: wall-clock, each run timed on its own on a shared machine — they carry the "
    "machine's load as well as the work; passes do not."
)


def time_caption(records: Sequence[dict[str, Any]], arms: Sequence[str]) -> str:
    """What time_to_target.png cannot show: seconds carry the machine's load; arms whose dots
    coincide did not differ at all."""
    lines = [SECONDS_NOTE]
    for key, what in (("passes_to_target", "passes"), ("time_to_target", "seconds")):
        if same := coinciding(records, arms, key):
            lines.append(f"Identical {what} to target in every seed: {'; '.join(same)}.")
    return "\n".join(lines)


def _time_to_target_figure(records, arms, path: Path) -> Path:
    fig = Figure(figsize=(10, 4.6), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, key, label in zip(
        axes,
        ("time_to_target", "passes_to_target"),
        ("train seconds to target (shared machine)", "passes to target"),
    ):
        finite = [r[key] for r in records if math.isfinite(r[key])]
        ceiling = 1.08 * max(finite) if finite else 1.0
        for i, (colour, arm) in enumerate(zip(COLOURS * 4, arms)):
            values = [r[key] for r in records if r["arm"] == arm]
            hit = [v for v in values if math.isfinite(v)]
            jitter = np.linspace(-0.12, 0.12, max(len(values), 1))[: len(hit)]
            ax.scatter(i + jitter, hit, color=colour, s=28, zorder=3)
            if hit:
                ax.hlines(float(np.median(hit)), i - 0.25, i + 0.25, color=colour, lw=2)
            missed = len(values) - len(hit)
            if missed:
                ax.scatter([i], [ceiling], marker="x", color=colour, s=50)
                ax.annotate(
                    f"{missed} missed",
                    (i, ceiling),
                    textcoords="offset points",
                    xytext=(6, -3),
                    fontsize=8,
                )
        ax.set_xticks(range(len(arms)), arms, rotation=20 if len(arms) > 3 else 0)
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("Per seed (dots), median of those reaching the target (bar)")
    fig.supxlabel(time_caption(records, arms), fontsize=9, color="#444444")
    return _save(fig, path)


def _spread_figure(records, arms, path: Path) -> Path:
    """loss_spread.png: per arm, the median over its seeds of each epoch's σ and CV (the epochs
    complete in every seed that has one)."""
    from isgd.reporting.plots import SpreadLine, spread_figure, summarize_claims

    lines: list[SpreadLine] = []
    for colour, arm in zip(COLOURS * 4, arms):
        runs = [Path(r["run_dir"]) for r in records if r["arm"] == arm]
        claims = [c for c in summarize_claims(runs).values() if c["epochs"]] if runs else []
        if not claims:
            continue
        epochs = sorted(set.intersection(*(set(c["epochs"]) for c in claims)))
        std, cv = (_median_over_seeds(claims, epochs, key) for key in ("loss_std", "loss_cv"))
        lines.append((arm, colour, epochs, std, cv))
    return spread_figure(lines, path, "median over seeds")


def _median_over_seeds(claims: list[dict[str, Any]], epochs: list[int], key: str) -> np.ndarray:
    """The median over seeds of the per-epoch series ``key`` at ``epochs`` (null: NaN)."""
    by_epoch = [dict(zip(c["epochs"], c[key])) for c in claims]
    table = np.array([[seed[e] for e in epochs] for seed in by_epoch], dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an epoch that is NaN in every seed
        return np.nanmedian(table, 0)


def write_figures(out: Path, records, arms: Sequence[str], notes: Sequence[str] = ()) -> list[Path]:
    """The comparison's figures; ``notes`` (:func:`noise_notes`) are printed under the curves,
    with the arms whose curves coincide."""
    same = coinciding(records, arms, "evaluations")
    metric, _ = comparison_metric(records)
    if same:
        notes = [*notes, f"identical test {_label(metric)} at every evaluation: {'; '.join(same)}"]
    note = "\n".join(notes)
    target = records[0]["target"] if records else 0.0
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    return [
        _error_figure(
            records,
            arms,
            "time/train_seconds",
            "train seconds (evaluation excluded)",
            target,
            figures / "error_vs_time.png",
            "\n".join([SECONDS_NOTE, *notes]),
        ),
        _error_figure(
            records,
            arms,
            "passes",
            "passes (forward+backward, extra iterations included)",
            target,
            figures / "error_vs_passes.png",
            note,
        ),
        _time_to_target_figure(records, arms, figures / "time_to_target.png"),
        _spread_figure(records, arms, figures / "loss_spread.png"),
    ]
