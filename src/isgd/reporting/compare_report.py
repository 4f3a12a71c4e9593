"""The report of an ``isgd compare`` directory.

Its length is the report's sections: what to read first (seeds that did not test an arm), the
summary table, noise notes, paired ratios and differences, how ISGD behaved, the runs; the
figures are :mod:`isgd.reporting.compare_figures`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from isgd.reporting.budget_report import budget_section
from isgd.reporting.compare_figures import (
    coinciding,
    comparison_metric,
    time_caption,
    write_figures,
)
from isgd.reporting.metric import PERCENT_METRICS
from isgd.reporting.metric import label as _label
from isgd.training import runio

__all__ = ["identical_notes", "mechanics", "noise_notes", "write_figures", "write_report"]

# --target baseline: the fewest seeds the protocol asks the target to be set from (isgd compare
# refuses fewer than 3, warns below this, and the report's target line says so)
ADVISED_BASELINE_SEEDS = 5


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


def identical_notes(result: dict[str, Any]) -> list[str]:
    """Per arm, the seeds that did not test it at the target (``identical`` of the summary:
    :func:`isgd.experiments.records.identical_computation`) — said before any table."""
    base, notes = result["baseline"], []
    for name, arm in result["arms"].items():
        identical = arm.get("identical")
        if not identical or not identical["seeds"]:
            continue
        n = len(identical["seeds"])
        if identical["idle"]:
            what = (
                "0 extra iterations and 0 forward-only steps"
                if identical.get("variant")
                else "0 extra iterations"
            )
            notes.append(
                f"{name}: ISGD did not act before the target in {len(identical['idle'])} of {n} "
                f"seeds ({what} before the crossing): these seeds do not test it"
            )
        if identical["same"]:
            notes.append(
                f"{name}: computed exactly what {base} computed up to the target in "
                f"{len(identical['same'])} of {n} seeds (equal evaluations): these seeds do not "
                "compare them"
            )
    return notes


def noise_notes(result: dict[str, Any]) -> list[str]:
    """One sentence per arm whose difference from the baseline a reader must not take for a
    result: seeds that did not test it (:func:`identical_notes`), an ISGD arm that never
    triggered, or paired intervals that contain 1."""
    base, idle, notes = result["baseline"], idle_arms(result), identical_notes(result)
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


# ---------------------------------------------------------------------- mechanics
def mechanics(run_dir: Path) -> dict[str, float]:
    """How ISGD behaved in one run, from ``steps.jsonl`` (the evidence for *why* it helps or not).

    ``above_limit``: share of steps after the first epoch whose loss was above the limit (for SGD
    the monitoring limit: how often ISGD *would* have triggered); ``extra_per_trigger``: extra
    iterations per triggered step; ``no_extra``: share of triggered steps that ran no extra
    iteration (the first check found the batch at or below the limit: no update);
    ``reached_limit``: share of triggered steps whose batch loss got down to the limit before
    ``max_extra_iters`` ran out; ``batch_loss_drop``: median relative drop
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
        "no_extra": (
            sum(s["extra_iters"] == 0 for s in triggered) / len(triggered)
            if triggered
            else math.nan
        ),
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
        "| arm | loss above limit (%) | extra iters per trigger | triggers with 0 extra iters "
        "(%) | triggers that reached the limit (%) | drop of a triggered batch's loss (%) "
        "| epoch-to-epoch loss ratio "
        "| limit ÷ epoch mean loss | = window mean ÷ epoch mean (trend) | × limit ÷ window mean "
        "(tail, 1 + kσ/mean) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
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
            f"| {_num(100 * m['no_extra'])} | {_num(100 * m['reached_limit'])} "
            f"| {_num(100 * m['batch_loss_drop'])} "
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


CENSORING = (
    "A seed where one arm missed the target counts with that arm charged its whole run (its "
    "passes or seconds at the end) — less than it would have needed, so the seed's ratio "
    "understates the advantage of the arm that reached the target: a lower bound on base/arm "
    "where only the baseline missed, an upper bound where only the arm missed. A seed where "
    "both missed is left out. The p-values: Student t on the log-ratios, and the exact two-sided "
    "Wilcoxon signed-rank test, which does not assume them normal. Detectable: the run had "
    "80 % power only for ratios outside this range (t test, the observed spread of the "
    "log-ratios)."
)


def _ratio_cell(r: dict[str, Any]) -> str:
    return f"{_num(r['ratio'], '.3f')} [{_num(r['low'], '.3f')}–{_num(r['high'], '.3f')}]"


def _pairs_cell(r: dict[str, Any], name: str, base: str) -> str:
    notes = [
        text
        for count, text in (
            (r.get("base_missed", 0), f"{r.get('base_missed')} {base} missed: bound"),
            (r.get("arm_missed", 0), f"{r.get('arm_missed')} {name} missed: bound"),
            (r.get("left_out", 0), f"{r.get('left_out')} left out"),
        )
        if count
    ]
    return f"{r['n']}" + (f" ({'; '.join(notes)})" if notes else "")


def _detectable_cell(r: dict[str, Any]) -> str:
    m = r.get("detectable", math.nan)
    return f"{1 / m:.3f}–{m:.3f}" if math.isfinite(m) and m > 1 else "—"


def _paired_section(result: dict[str, Any]) -> list[str]:
    """Per arm against the baseline: paired ratios with 95 % intervals and tests, what they
    exclude, and the paired differences of the final metric."""
    arms, base = result["arms"], result["baseline"]
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
        CENSORING,
        "",
        "| arm | passes ratio, geometric mean [95 % CI] | p (t) | p (Wilcoxon) | detectable "
        "(80 % power) | seconds ratio, geometric mean [95 % CI] | p (t) | pairs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, p in paired.items():
        pp, ps = p["passes"], p["seconds"]
        lines.append(
            f"| {name} | {_ratio_cell(pp)} | {_num(pp['p_value'], '.2g')} "
            f"| {_num(pp.get('wilcoxon_p', math.nan), '.2g')} | {_detectable_cell(pp)} "
            f"| {_ratio_cell(ps)} | {_num(ps['p_value'], '.2g')} | {_pairs_cell(pp, name, base)} |"
        )
    lines.append("")
    lines += [f"- {p['passes']['sentence']}" for p in paired.values()]
    return lines + _final_metric_section(result, paired)


def _final_metric_section(result: dict[str, Any], paired: dict[str, Any]) -> list[str]:
    """The paired differences of the final metric (and balanced accuracy, for accuracy)."""
    base, metric = result["baseline"], result.get("metric", "accuracy")
    percent = metric in PERCENT_METRICS
    unit = "percentage points" if percent else "its units"
    keys = [("final_metric", f"final {_label(metric)}")]
    if metric == "accuracy":
        keys.append(("final_balanced_accuracy", "balanced accuracy"))
    lines = [
        "",
        f"### Final {_label(metric)}, paired: arm − {base} in {unit}, 95 % interval",
        "",
        "On a fixed budget the question is how good the model ends, not how fast it gets there"
        + (
            ". Balanced accuracy is the mean of the per-class recalls on the test set (the plain "
            "accuracy when the test set is balanced)."
            if metric == "accuracy"
            else f" ({'higher' if result.get('higher_is_better', True) else 'lower'} is better)."
        ),
        "",
        "| arm | " + " | ".join(f"{label}, arm − base [95 % CI] | p" for _, label in keys) + " |",
        "|---|" + "---|---|" * len(keys),
    ]

    def diff_cell(r: dict[str, Any]) -> str:
        if percent:
            f = lambda x: _num(100 * x if math.isfinite(x) else x, "+.2f")  # noqa: E731
        else:
            f = lambda x: _num(x, "+.4g")  # noqa: E731
        return f"{f(r['difference'])} [{f(r['low'])} – {f(r['high'])}]"

    for name, p in paired.items():
        if any(key not in p for key, _ in keys):  # a summary from before these differences
            continue
        cells = [f"{diff_cell(p[key])} | {_num(p[key]['p_value'], '.2g')}" for key, _ in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    last = keys[-1][0]
    lines += [f"- {p[last]['sentence']}" for p in paired.values() if last in p]
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


def _target_line(result: dict[str, Any]) -> str:
    """The target and how it was set: ``--target baseline`` from fewer seeds than the protocol
    asks for says so (the command warned of it)."""
    metric, target = result.get("metric", "accuracy"), result["target"]
    split = "validation" if result.get("config", {}).get("validation") else "test"
    rule = ""
    if result.get("target_rule") == "baseline":
        n = len(result.get("seeds") or [])
        few = (
            f", from {n} baseline seeds; the protocol asks for {ADVISED_BASELINE_SEEDS}"
            if n < ADVISED_BASELINE_SEEDS
            else ""
        )
        rule = (
            f" (the worst final validation figure of the baseline's seeds: `--target baseline`"
            f"{few})"
        )
    if metric in PERCENT_METRICS:
        return f"Target {split} {_label(metric)} **{100 * target:g}%**{rule}"
    direction = "higher" if result.get("higher_is_better", True) else "lower"
    return f"Target {split} {_label(metric)} **{target:g}**{rule} ({direction} is better)"


def _metric_spec(metric: str) -> tuple[str, float, str]:
    """Format spec, scale and unit of the metric's values in tables."""
    return (".2f", 100.0, " (%)") if metric in PERCENT_METRICS else (".4g", 1.0, "")


def _samples(result: dict[str, Any]) -> str:
    """What a training sample is called: images for the image data sets, samples for a
    workload (a language model's windows, a user's rows)."""
    return "samples" if result.get("config", {}).get("workload") else "images"


def _summary_table(result: dict[str, Any]) -> list[str]:
    """The top table: passes and their paired interval first, then the final metric and ISGD's
    activity, then seconds — ratios of medians from a shared machine, labelled as such."""
    arms, base = result["arms"], result["baseline"]
    metric = result.get("metric", "accuracy")
    spec, scale, unit = _metric_spec(metric)
    samples = _samples(result)
    lines = [
        f"Median [min–max] over seeds; a missed target counts as ∞. Against **{base}**: the "
        f"paired ratio {base}/arm of passes, seed by seed (geometric mean [95 % CI], see below); "
        f"ratio of medians = median_{base} / median_arm and saving = (median_{base} − "
        f"median_arm) / median_{base}. Seconds are wall-clock on a shared machine: read them "
        "after the passes, as the noisier figure.",
        "",
        f"| arm | passes to target | passes, paired ratio {base}/arm [95 % CI] | passes: ratio of "
        f"medians / saving | final {_label(metric)}{unit} | trigger rate (%) | extra passes "
        "| time to target (s) | time: ratio of medians / saving (shared machine) | time: per-seed "
        f"ratio, median [min–max] | {samples}/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, a in arms.items():
        st, sp = a["speedup_time"], a["speedup_passes"]
        paired = _ratio_cell(a["paired"]["passes"]) if "paired" in a else "—"
        lines.append(
            f"| {name} | {_spread(a['passes_to_target'], '.0f')} | {paired} "
            f"| {_num(sp['ratio'], '.3f')} / {_num(100 * sp['saving'], '+.1f')}% "
            f"| {_spread(a['final_metric'], spec, scale)} "
            f"| {_spread(a['trigger_rate'], '.2f', 100)} | {_spread(a['extra_passes'], '.0f')} "
            f"| {_spread(a['time_to_target'])} "
            f"| {_num(st['ratio'], '.3f')} / {_num(100 * st['saving'], '+.1f')}% "
            f"| {_spread(a['paired_time_ratio'], '.3f')} "
            f"| {_spread(a['images_per_second'], ',.0f')} |"
        )
    return lines


def _identical_section(result: dict[str, Any]) -> list[str]:
    """Said first: seeds in which an arm computed what the baseline computed up to the target."""
    notes = identical_notes(result)
    if not notes:
        return []
    untested = [n for n, a in result["arms"].items() if (a.get("identical") or {}).get("untested")]
    lines = ["**Read this first — identical computation up to the target:**", ""]
    lines += [f"- {n}." for n in notes]
    if untested:
        lines += [
            "",
            f"No seed tests {' or '.join(untested)} against {result['baseline']}: the ratios "
            "and differences below for them are not effects of the arm.",
        ]
    return [*lines, ""]


def _runs_table(records, metric: str) -> list[str]:
    spec, scale, unit = _metric_spec(metric)
    balanced = metric == "accuracy"
    lines = [
        "## Runs",
        "",
        "Crossings interpolated between evaluations; in brackets, the first evaluation at or "
        "past the target. Extra iterations / forward-only steps by the target: ISGD's work up "
        "to that first evaluation (0 / 0: it computed what its base optimizer computes).",
        "",
        f"| arm | seed | time to target (s) | passes to target | final {_label(metric)}{unit} "
        + ("| balanced acc (%) " if balanced else "")
        + "| triggers | extra passes | forward-only steps | extra iters / forward-only by the "
        "target | train s |",
        "|---|---:|---:|---:|---:|" + ("---:|" if balanced else "") + "---:|---:|---:|---:|---:|",
    ]
    for r in records:
        grid = r.get("passes_to_target_grid")
        final = r.get("final_metric", r.get("final_accuracy", math.nan))
        before = (
            f"{r['extra_iters_to_target']} / {r.get('forward_only_to_target', 0)}"
            if r.get("extra_iters_to_target") is not None
            else "—"
        )
        lines.append(
            f"| {r['arm']} | {r['seed']} | {_num(r['time_to_target'])} "
            f"| {_num(r['passes_to_target'], '.0f')}"
            + (f" [{_num(grid, '.0f')}]" if grid is not None else "")
            + f" | {_num(scale * final, spec)} "
            + (
                f"| {_num(100 * r.get('final_balanced_accuracy', math.nan), '.2f')} "
                if balanced
                else ""
            )
            + f"| {r['triggers']} | {r['extra_passes']} | {r.get('forward_only', 0)} "
            f"| {before} | {r['train_seconds']:.1f}"
            + (f" (copy of {r['copied_from']})" if r.get("copied_from") else "")
            + " |"
        )
    if any(r.get("copied_from") for r in records):
        lines += [
            "",
            "A copy: a run whose configuration is another's of this comparison, key for key — the "
            "same computation — is copied, not trained again; its seconds are its twin's.",
        ]
    return lines


def _figures_section(records, arms: Sequence[str], figures: list[Path]) -> list[str]:
    lines = ["", "## Figures", ""]
    for path in figures:
        lines.append(f"![{path.stem}](figures/{path.name})")
        if path.name == "time_to_target.png":
            lines += ["", time_caption(records, arms).replace("\n", " "), ""]
    same = coinciding(records, arms, "evaluations")
    if same:
        metric, _ = comparison_metric(records)
        lines += [
            "",
            f"The curves of {'; '.join(same)} coincide: identical test {_label(metric)} at every "
            "evaluation of every seed.",
        ]
    return lines


def write_report(out: Path, result: dict[str, Any], records, figures: list[Path]) -> Path:
    """``report.md``: the summary's figures in words and tables; the metric is the summary's
    (``metric``, ``higher_is_better``), else its records', else accuracy."""
    arms = result["arms"]
    config = result["config"]
    metric, higher = comparison_metric(records)
    result = {"metric": metric, "higher_is_better": higher, **result}
    provenance: dict[str, Any] = {}
    if records:
        prov = Path(records[0]["run_dir"]) / "provenance.json"
        provenance = json.loads(prov.read_text()) if prov.is_file() else {}
    data = provenance.get("data", config["dataset"])
    subject = data if config.get("workload") else f"{data}, {config['model']}"  # its own model
    lines = [
        f"# isgd compare: {', '.join(arms)} — {subject}",
        "",
        f"{_target_line(result)}, seeds {result['seeds']}, "
        f"{config['iters']} iterations per run, evaluation every {config['eval_every']} "
        "iterations (untimed). For a seed, all arms share the initialisation and batch order.",
        f"Machine: {_machine(provenance, config)}, torch {provenance.get('torch', '?')}, "
        f"started {provenance.get('started', '?')}.",
        "",
    ]
    lines += _identical_section(result)
    lines += _summary_table(result)
    samples = _samples(result)
    lines += [
        "",
        f"{samples}/s: training {samples} per second of training time (iterations × batch ÷ "
        "train seconds, evaluation excluded); an extra iteration costs time and brings no new "
        f"{samples[:-1]}.",
    ]
    first = set(identical_notes(result))
    notes = [n for n in noise_notes(result) if n not in first]
    if notes:
        lines += ["", "**Not a result — within the noise:**", ""] + [f"- {n}" for n in notes]
    if result.get("tuned_lr"):
        lines += [
            "",
            "Learning rates chosen by `--tune` (held-out accuracy on the last training "
            "samples, equal budget per arm): "
            + ", ".join(f"{k}: {v:g}" for k, v in result["tuned_lr"].items()),
        ]
    lines += _paired_section(result)
    lines += budget_section(result)
    lines += _never_triggered_note(result)
    if any(str(r.get("optimizer", "")).startswith("isgd") for r in records):  # else dashes
        lines += ["", "## How ISGD behaved (median over seeds)", ""]
        lines += _mechanics_table(records, list(arms))
    lines += ["", *_runs_table(records, result["metric"])]
    lines += _figures_section(records, list(arms), figures)
    path = out / "report.md"
    runio.atomic_write_text(path, "\n".join(lines) + "\n")
    return path
