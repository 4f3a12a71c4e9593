"""The report and figures of an ``isgd batch-study`` directory (:mod:`isgd.experiments.batch_study`
measures; this writes ``report.md`` and the PNG figures from its result)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from isgd.training import runio

__all__ = ["series_name", "write_figures", "write_report"]


def series_name(series: dict[str, Any]) -> str:
    k, t = series["processes"], series["threads"]
    return f"{k} proc{'s' * (k > 1)} × {t} thread{'s' * (t > 1)}"


def _fmt_seconds(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "∞" if x == math.inf else "—"
    return f"{x:.1f}"


def write_report(plan: Any, result: dict[str, Any], figures: list[Path]) -> Path:
    tp, comb, machine = result["throughput"], result["combined"], result["machine"]
    names = [series_name(s) for s in tp["series"]]
    lines = [
        f"# Batch size and the machine — {plan.model} on {plan.dataset}",
        "",
        f"Machine: {machine['host']}, {machine['cpu_count']} CPUs ({machine['cpu']}), "
        f"torch {machine['torch']}, CUDA: {machine['cuda'] or 'none'}; "
        f"{machine['date']}; load average at the start "
        f"{' / '.join(f'{x:.2f}' for x in machine['load_average'] or [])} (1/5/15 min).",
        f"Command: `{' '.join(result['command'])}`",
        "",
        "## Throughput (images/s) against the per-process batch size",
        "",
        "| per-process batch | " + " | ".join(names) + " |",
        "|---:|" + "---:|" * len(names),
    ]
    for i, b in enumerate(plan.batch_sizes):
        cells = [f"{s['rows'][i]['images_per_second']:,.0f}" for s in tp["series"]]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Median of {plan.repeats} blocks of {plan.steps} steps after {plan.warmup} warm-up "
        "steps; synthetic tensors of the data set's shape; a step of k processes is timed on "
        "the slowest rank.",
        "",
        "Saturation (the batch after which doubling raises throughput by less than "
        f"{100 * plan.saturation:.0f} %): "
        + "; ".join(
            f"{name}: {b if b is not None else 'not within the grid'}"
            for name, b in comb["saturation"].items()
        )
        + ".",
    ]
    if tp["allreduce"]:
        sizes = [r["floats"] for r in tp["allreduce"][0]["rows"]]
        lines += [
            "",
            "## Synchronization cost: all-reduce time against parameter count",
            "",
            "| floats | "
            + " | ".join(f"{g['processes']} processes (ms)" for g in tp["allreduce"])
            + " |",
            "|---:|" + "---:|" * len(tp["allreduce"]),
        ]
        for i, n in enumerate(sizes):
            cells = [f"{1e3 * g['rows'][i]['seconds']:.3f}" for g in tp["allreduce"]]
            lines.append(f"| {n:,} | " + " | ".join(cells) + " |")
        for sync in comb["sync"]:
            estimate = (
                f"T_sync ≈ {1e3 * sync['seconds']:.2f} ms per iteration with "
                f"{sync['processes']} processes (interpolated)"
                if math.isfinite(sync["seconds"])
                else "outside the measured sizes (no estimate)"
            )
            lines.append(f"\n{plan.model}: n_w = {sync['n_w']:,} parameters → {estimate}.")
    lines += [
        "",
        f"## Time to {100 * plan.target:.1f} % test accuracy against the global batch size",
        "",
        f"Passes to target from one training run per batch ({plan.optimizer}, preset "
        f"{plan.preset}, lr and inv decay scaled linearly with the batch, budget "
        f"{plan.epochs:g} epochs, evaluated {plan.evals_per_epoch}× per epoch, seed {plan.seed}); "
        "time to target = passes × T_iter(b / k, k) from the throughput table "
        "(log–log interpolation).",
        "",
        "| global batch | lr | passes to target | epochs | "
        + " | ".join(f"T_iter ms, {n}" for n in names)
        + " | "
        + " | ".join(f"time to target s, {n}" for n in names)
        + " |",
        "|---:|---:|---:|---:|" + "---:|" * (2 * len(names)),
    ]
    for row in comb["rows"]:
        by = row["by_series"]
        steps = [
            f"{1e3 * by[n]['seconds_per_step']:.1f}"
            if math.isfinite(by[n]["seconds_per_step"])
            else "—"
            for n in names
        ]
        times = [_fmt_seconds(by[n]["seconds"]) for n in names]
        passes = row["passes_to_target"]
        missed = "diverged" if row.get("diverged") else "∞"
        lines.append(
            f"| {row['global_batch']} | {row['lr']:g} | "
            f"{passes if math.isfinite(passes) else missed} | "
            f"{_fmt_seconds(row['epochs_to_target'])} | "
            + " | ".join(steps)
            + " | "
            + " | ".join(times)
            + " |"
        )
    best = comb["best"]
    lines += [""]
    if best:
        lines.append(
            f"**Best batch size for this machine: {best['global_batch']}** ({best['series']}), "
            f"{best['seconds']:.1f} s of training to {100 * plan.target:.1f} % test accuracy."
        )
    else:
        lines.append(f"**No batch size reached {100 * plan.target:.1f} % within the budget.**")
    lines += ["", "## Figures", ""] + [f"![{f.stem}]({f.name})" for f in figures]
    path = plan.out / "report.md"
    runio.atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def write_figures(plan: Any, result: dict[str, Any]) -> list[Path]:
    """``throughput.png``, ``allreduce.png`` (with k > 1) and ``time_to_target.png``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    def axes(title: str, xlabel: str, ylabel: str, xs: Sequence[float], logy: bool = False):
        fig = Figure(figsize=(6.4, 4.2))
        ax = fig.add_subplot()
        ax.set(xscale="log", yscale="log" if logy else "linear", title=title)
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.set_xticks(xs, [f"{x:,.0f}" for x in xs])
        ax.xaxis.set_minor_formatter(NullFormatter())
        if logy:
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
        return fig, ax

    def save(fig: Figure, ax, name: str) -> Path:
        ax.legend(fontsize="small")
        FigureCanvasAgg(fig)
        fig.tight_layout()
        path = plan.out / name
        fig.savefig(path, dpi=120)
        return path

    tp, comb = result["throughput"], result["combined"]
    names = [series_name(s) for s in tp["series"]]
    fig, ax = axes("Throughput", "batch per process", "images / s", plan.batch_sizes)
    for series, name in zip(tp["series"], names):
        xs = [r["batch_per_process"] for r in series["rows"]]
        ax.plot(xs, [r["images_per_second"] for r in series["rows"]], "o-", label=name)
    paths = [save(fig, ax, "throughput.png")]
    if tp["allreduce"]:
        sizes = [r["floats"] for r in tp["allreduce"][0]["rows"]]
        fig, ax = axes("Synchronization cost", "floats all-reduced", "ms", sizes, logy=True)
        for group in tp["allreduce"]:
            ys = [1e3 * r["seconds"] for r in group["rows"]]
            ax.plot(sizes, ys, "o-", label=f"all-reduce, {group['processes']} processes")
        for sync in comb["sync"][:1]:
            ax.axvline(sync["n_w"], color="grey", ls=":", label=f"{plan.model}: n_w")
        paths.append(save(fig, ax, "allreduce.png"))
    batches = [r["global_batch"] for r in comb["rows"]]
    title = f"Time to {100 * plan.target:.1f} % test accuracy"
    fig, ax = axes(title, "global batch", "seconds of training", batches, logy=True)
    for name in names:
        ys = [r["by_series"][name]["seconds"] for r in comb["rows"]]
        ax.plot(batches, [y if math.isfinite(y) else math.nan for y in ys], "o-", label=name)
    if comb["best"]:
        ax.axvline(comb["best"]["global_batch"], color="grey", ls=":", label="best")
    ax.set_xlim(min(batches) / 1.3, max(batches) * 1.3)
    for row in comb["rows"]:  # a batch that never reached the target: say why at the bottom
        if not math.isfinite(row["passes_to_target"]):
            why = "diverged" if row.get("diverged") else "missed"
            ax.annotate(
                why,
                (row["global_batch"], 0.02),
                xycoords=("data", "axes fraction"),
                ha="center",
                color="firebrick",
            )
    paths.append(save(fig, ax, "time_to_target.png"))
    return paths
