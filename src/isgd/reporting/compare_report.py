"""The report and figures of an ``isgd compare`` directory.

Its length is the report's sections (summary table, noise notes, paired ratios and differences,
how ISGD behaved, the runs) and one function per figure; all read the same records and summary.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from isgd.training import runio

__all__ = ["write_figures", "write_report"]

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def _curves(records: Sequence[dict[str, Any]], arm: str, x_key: str):
    """Per run of ``arm``: (x, test error %) arrays from its metrics.jsonl."""
    out = []
    for r in records:
        if r["arm"] != arm:
            continue
        metrics = list(runio.read_jsonl(Path(r["run_dir"]) / "metrics.jsonl"))
        x = np.array([m[x_key] for m in metrics], dtype=float)
        err = np.array([100 * (1 - m["test/accuracy"]) for m in metrics], dtype=float)
        out.append((x, err))
    return out


def _band(curves, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Median, min and max over runs of the test error interpolated on ``grid`` (NaN outside a
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
    fig = Figure(figsize=(10, 5.2), layout="constrained")
    ax = fig.add_subplot()
    for colour, arm in zip(COLOURS * 4, arms):
        curves = _curves(records, arm, x_key)
        if not curves:
            continue
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
    if target:
        ax.axhline(100 * (1 - target), color="k", ls="--", lw=1, label=f"target {100 * target:g}%")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test error (%), log scale")
    ax.set_title(f"Test error against {xlabel.split(' (')[0]}: median and min–max band over seeds")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if note:
        fig.supxlabel(note, fontsize=9, color="#444444")
    return _save(fig, path)


def _time_to_target_figure(records, arms, path: Path) -> Path:
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, key, label in zip(
        axes,
        ("time_to_target", "passes_to_target"),
        ("train seconds to target", "passes to target"),
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


def idle_arms(result: dict[str, Any]) -> list[str]:
    """The ISGD arms that never triggered in any seed: the computation of their base optimizer."""
    specs = result.get("arms_spec", {})
    return [
        name
        for name, a in result["arms"].items()
        if str(specs.get(name, {}).get("optimizer", "")).startswith("isgd")
        and a["trigger_rate"]["n"]
        and a["trigger_rate"]["max"] == 0
    ]


def noise_notes(result: dict[str, Any]) -> list[str]:
    """One sentence per arm whose difference from the baseline a reader must not take for a
    result: an ISGD arm that never triggered, or paired intervals that contain 1."""
    base, idle, notes = result["baseline"], idle_arms(result), []
    for name, arm in result["arms"].items():
        if name == base:
            continue
        if name in idle:
            notes.append(
                f"{name} never triggered: the same computation as {base}; any gap is noise"
            )
            continue
        paired = arm.get("paired", {})
        inside = [
            what
            for what in ("passes", "seconds")
            if what in paired and paired[what]["low"] <= 1 <= paired[what]["high"]
        ]
        if inside:
            notes.append(
                f"{name} vs {base}: within the seeds' noise in {' and '.join(inside)} "
                "(paired 95 % interval contains 1)"
            )
    return notes


def write_figures(out: Path, records, arms: Sequence[str], notes: Sequence[str] = ()) -> list[Path]:
    """The comparison's figures; ``notes`` (:func:`noise_notes`) are printed under the curves."""
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
            note,
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


# ---------------------------------------------------------------------- mechanics
def mechanics(run_dir: Path) -> dict[str, float]:
    """How ISGD behaved in one run, from ``steps.jsonl`` (the evidence for *why* it helps or not).

    ``above_limit``: share of steps after the first epoch whose loss was above the limit (for SGD
    the monitoring limit: how often ISGD *would* have triggered); ``extra_per_trigger``: extra
    iterations per triggered step; ``reached_limit``: share of triggered steps whose batch loss got
    down to the limit before ``max_extra_iters`` ran out; ``batch_loss_drop``: median relative drop
    of a triggered batch's loss over its extra iterations; ``epoch_trend``: median ratio of an
    epoch's mean batch loss to the previous epoch's (below 1: the loss falls, so the window of the
    last epoch sits above the current losses); ``limit_over_mean``: median ratio of the limit to
    the current epoch's mean batch loss. It is the product of two parts, each a median ratio:
    ``window_over_mean``, the chart window's mean loss over the current epoch's (the trend: above 1
    when the loss falls) and ``limit_over_window_mean`` = 1 + k·σ/mean of the window (the tail of
    the batch-loss distribution). The window length is read from the records: the number of steps
    before the first limit.
    """
    steps = [s for s in runio.read_jsonl(Path(run_dir) / "steps.jsonl") if not s.get("skipped")]
    judged = [s for s in steps if s["limit"] is not None]
    window = next((i for i, s in enumerate(steps) if s["limit"] is not None), 0)
    losses = np.cumsum([0.0] + [s["loss"] for s in steps])
    window_mean = [
        (losses[i] - losses[i - window]) / window
        for i, s in enumerate(steps)
        if s["limit"] is not None and i >= window > 0
    ]
    above = [s for s in judged if s["loss"] > s["limit"]]
    triggered = [s for s in steps if s["triggered"]]
    after = [s for s in triggered if s["loss_after"] is not None]
    by_epoch: dict[int, list[float]] = {}
    for s in steps:
        by_epoch.setdefault(s["epoch"], []).append(s["loss"])
    means = {e: float(np.mean(v)) for e, v in by_epoch.items()}
    trend = [means[e] / means[e - 1] for e in sorted(means) if e - 1 in means]
    ratio = [s["limit"] / means[s["epoch"]] for s in judged]

    def median(values: list[float]) -> float:
        return float(np.median(values)) if values else math.nan

    return {
        "above_limit": len(above) / len(judged) if judged else math.nan,
        "extra_per_trigger": median([s["extra_iters"] for s in triggered]),
        "reached_limit": (
            sum(s["loss_after"] <= s["limit"] for s in after) / len(triggered)
            if triggered
            else math.nan
        ),
        "batch_loss_drop": median([(s["loss"] - s["loss_after"]) / s["loss"] for s in after]),
        "epoch_trend": median(trend),
        "limit_over_mean": median(ratio),
        "window_over_mean": median([m / means[s["epoch"]] for s, m in zip(judged, window_mean)]),
        "limit_over_window_mean": median([s["limit"] / m for s, m in zip(judged, window_mean)]),
    }


def _mechanics_table(records, arms: Sequence[str]) -> list[str]:
    lines = [
        "| arm | loss above limit (%) | extra iters per trigger | triggers that reached the "
        "limit (%) | drop of a triggered batch's loss (%) | epoch-to-epoch loss ratio "
        "| limit ÷ epoch mean loss | = window mean ÷ epoch mean (trend) | × limit ÷ window mean "
        "(tail, 1 + kσ/mean) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm in arms:
        rows = [mechanics(Path(r["run_dir"])) for r in records if r["arm"] == arm]
        if not rows:
            continue
        m = {
            k: float(np.nanmedian([row[k] for row in rows]))
            if any(math.isfinite(row[k]) for row in rows)
            else math.nan
            for k in rows[0]
        }
        lines.append(
            f"| {arm} | {_num(100 * m['above_limit'], '.2f')} | {_num(m['extra_per_trigger'])} "
            f"| {_num(100 * m['reached_limit'])} | {_num(100 * m['batch_loss_drop'])} "
            f"| {_num(m['epoch_trend'], '.3f')} | {_num(m['limit_over_mean'], '.2f')} "
            f"| {_num(m['window_over_mean'], '.2f')} | {_num(m['limit_over_window_mean'], '.2f')} |"
        )
    return lines


# ---------------------------------------------------------------------- report
def _num(x: float, spec: str = ".1f") -> str:
    if isinstance(x, float) and math.isnan(x):
        return "—"
    if isinstance(x, float) and math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return format(x, spec)


def _spread(agg: dict[str, float], spec: str = ".1f", scale: float = 1.0) -> str:
    s = lambda v: _num(v * scale if math.isfinite(v) else v, spec)  # noqa: E731
    missed = f", {agg['missed']}/{agg['n']} missed" if agg.get("missed") else ""
    return f"{s(agg['median'])} [{s(agg['min'])}–{s(agg['max'])}]{missed}"


def _paired_section(arms: dict[str, Any], base: str) -> list[str]:
    """Per arm against the baseline: paired ratios with 95 % intervals, and what they exclude."""
    paired = {name: a["paired"] for name, a in arms.items() if "paired" in a}
    if not paired:
        return []
    lines = [
        "",
        f"## Paired against {base}: ratio {base}/arm per seed, geometric mean and 95 % interval",
        "",
        "Same seed, same initialisation and batch order: the ratio is taken seed by seed, then "
        "averaged on the log scale with a Student-t interval (`isgd.experiments.paired`). Above 1: "
        "the arm needs less. Seconds come from a shared machine; passes are the figure to read.",
        "",
        "| arm | passes ratio [95 % CI] | p | seconds ratio [95 % CI] | p | pairs |",
        "|---|---|---|---|---|---|",
    ]

    def cell(r: dict[str, Any]) -> str:
        return f"{_num(r['ratio'], '.3f')} [{_num(r['low'], '.3f')}–{_num(r['high'], '.3f')}]"

    for name, p in paired.items():
        pp, ps = p["passes"], p["seconds"]
        missed = f" ({pp['censored']} missed)" if pp["censored"] else ""
        lines.append(
            f"| {name} | {cell(pp)} | {_num(pp['p_value'], '.2g')} | {cell(ps)} "
            f"| {_num(ps['p_value'], '.2g')} | {pp['n']}{missed} |"
        )
    lines.append("")
    lines += [f"- {p['passes']['sentence']}" for p in paired.values()]
    lines += [
        "",
        f"### Final accuracy, paired: arm − {base} in percentage points, 95 % interval",
        "",
        "On a fixed budget the question is how good the model ends, not how fast it gets there. "
        "Balanced accuracy is the mean of the per-class recalls on the test set (the plain "
        "accuracy when the test set is balanced).",
        "",
        "| arm | final accuracy, arm − base [95 % CI] | p | balanced accuracy, arm − base "
        "[95 % CI] | p |",
        "|---|---|---|---|---|",
    ]

    def diff_cell(r: dict[str, Any]) -> str:
        f = lambda x: _num(100 * x if math.isfinite(x) else x, "+.2f")  # noqa: E731
        return f"{f(r['difference'])} [{f(r['low'])} – {f(r['high'])}]"

    for name, p in paired.items():
        if "final_accuracy" not in p:  # a summary from before the paired differences
            continue
        fa, fb = p["final_accuracy"], p["final_balanced_accuracy"]
        lines.append(
            f"| {name} | {diff_cell(fa)} | {_num(fa['p_value'], '.2g')} | {diff_cell(fb)} "
            f"| {_num(fb['p_value'], '.2g')} |"
        )
    lines.append("")
    lines += [
        f"- {p['final_balanced_accuracy']['sentence']}"
        for p in paired.values()
        if "final_balanced_accuracy" in p
    ]
    return lines


def _never_triggered_note(result: dict[str, Any]) -> list[str]:
    """Say so when an ISGD arm never acted: its differences are then noise by construction."""
    idle = idle_arms(result)
    if not idle:
        return []
    return [
        "",
        f"**{', '.join(idle)} never triggered** (no batch rose above the control limit — e.g. a "
        "run shorter than two epochs, whose first epoch only fills the chart): such an arm ran "
        "the same computation as its base optimizer, and any difference above is noise.",
    ]


def _machine(provenance: dict[str, Any], config: dict[str, Any]) -> str:
    """The machine the runs were timed on: the CPU, and the GPU when they ran on one."""
    cpu = (
        f"{provenance.get('cpu', '?')} ({provenance.get('cpu_count', '?')} CPUs, "
        f"{config['threads']} threads)"
    )
    if config.get("device") == "cuda":
        return f"GPU {provenance.get('cuda') or '?'} (device cuda), host {cpu}"
    return cpu


def write_report(out: Path, result: dict[str, Any], records, figures: list[Path]) -> Path:
    arms = result["arms"]
    base = result["baseline"]
    config = result["config"]
    provenance: dict[str, Any] = {}
    if records:
        prov = Path(records[0]["run_dir"]) / "provenance.json"
        provenance = json.loads(prov.read_text()) if prov.is_file() else {}
    data = provenance.get("data", config["dataset"])
    lines = [
        f"# isgd compare: {', '.join(arms)} — {data}, {config['model']}",
        "",
        f"Target test accuracy **{100 * result['target']:g}%**, seeds {result['seeds']}, "
        f"{config['iters']} iterations per run, evaluation every {config['eval_every']} "
        "iterations (untimed). For a seed, all arms share the initialisation and batch order.",
        f"Machine: {_machine(provenance, config)}, torch {provenance.get('torch', '?')}, "
        f"started {provenance.get('started', '?')}.",
        "",
        "Median [min–max] over seeds; a missed target counts as ∞. Speed-up against "
        f"**{base}**: ratio = T_{base} / T_arm, saving = (T_{base} − T_arm) / T_{base}.",
        "",
        "| arm | time to target (s) | passes to target | speed-up (time): ratio / saving "
        "| speed-up (passes): ratio / saving | paired time ratio | final accuracy (%) "
        "| trigger rate (%) | extra passes | images/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, a in arms.items():
        st, sp = a["speedup_time"], a["speedup_passes"]
        lines.append(
            f"| {name} | {_spread(a['time_to_target'])} | {_spread(a['passes_to_target'], '.0f')} "
            f"| {_num(st['ratio'], '.3f')} / {_num(100 * st['saving'], '+.1f')}% "
            f"| {_num(sp['ratio'], '.3f')} / {_num(100 * sp['saving'], '+.1f')}% "
            f"| {_spread(a['paired_time_ratio'], '.3f')} "
            f"| {_spread(a['final_accuracy'], '.2f', 100)} "
            f"| {_spread(a['trigger_rate'], '.2f', 100)} | {_spread(a['extra_passes'], '.0f')} "
            f"| {_spread(a['images_per_second'], ',.0f')} |"
        )
    lines += [
        "",
        "images/s: training images per second of training time (iterations × batch ÷ train "
        "seconds, evaluation excluded); an extra iteration costs time and brings no new image.",
    ]
    notes = noise_notes(result)
    if notes:
        lines += ["", "**Not a result — within the noise:**", ""] + [f"- {n}" for n in notes]
    if result.get("tuned_lr"):
        lines += [
            "",
            "Learning rates chosen by `--tune` (held-out accuracy on the last training "
            "samples, equal budget per arm): "
            + ", ".join(f"{k}: {v:g}" for k, v in result["tuned_lr"].items()),
        ]
    lines += _paired_section(arms, base)
    lines += _never_triggered_note(result)
    lines += ["", "## How ISGD behaved (median over seeds)", ""]
    lines += _mechanics_table(records, list(arms))
    lines += [
        "",
        "## Runs",
        "",
        "Crossings interpolated between evaluations; in brackets, the first evaluation at or "
        "above the target.",
        "",
        "| arm | seed | time to target (s) | passes to target | final acc (%) | balanced acc "
        "(%) | triggers | extra passes | forward-only steps | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        grid = r.get("passes_to_target_grid")
        lines.append(
            f"| {r['arm']} | {r['seed']} | {_num(r['time_to_target'])} "
            f"| {_num(r['passes_to_target'], '.0f')}"
            + (f" [{_num(grid, '.0f')}]" if grid is not None else "")
            + f" | {100 * r['final_accuracy']:.2f} "
            f"| {_num(100 * r.get('final_balanced_accuracy', math.nan), '.2f')} "
            f"| {r['triggers']} | {r['extra_passes']} | {r.get('forward_only', 0)} "
            f"| {r['train_seconds']:.1f} |"
        )
    lines += ["", "## Figures", ""] + [f"![{p.stem}](figures/{p.name})" for p in figures]
    path = out / "report.md"
    runio.atomic_write_text(path, "\n".join(lines) + "\n")
    return path
