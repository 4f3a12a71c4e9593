"""Markdown tables over the arms of several ``isgd compare`` directories (the ablations of
docs/results.md), from their raw per-run records — finished comparisons or running ones.

    .venv/bin/python scripts/ablation_table.py runs/abl-a runs/abl-b runs/abl-bn [--early 0.985]

Outcome, per arm: seeds done; passes to each comparison's target and to the ``--early`` one
(median [min–max], a miss counts as ∞) with the median of the per-seed ratios
``passes_sgd / passes_arm`` against the ``sgd`` arm of the *same* comparison and seed; the test
accuracy averaged over the last 5 evaluations (less noisy than the last one); extra passes.

Mechanics, per arm (medians over seeds): trigger rate, extra iterations per trigger, the share of
triggers that got the batch down to the limit, the last
complete epoch's CV (σ/mean) of the batch losses (claim C2), the Spearman ρ of the batch losses
between consecutive epochs (claim C1), and the chart's limit over the epoch mean loss split into
its trend and tail parts (``isgd.reporting.compare_report.mechanics``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from isgd.experiments.records import aggregate, load_records, speedup, time_to_target
from isgd.reporting.compare_report import mechanics
from isgd.reporting.plots import summarize_claims
from isgd.training import runio


def spread(values: list[float], spec: str) -> str:
    a = aggregate(values)
    if not a["n"]:
        return "—"
    text = f"{format(a['median'], spec)} [{format(a['min'], spec)}–{format(a['max'], spec)}]"
    return text + (f" ({a['missed']} missed)" if a["missed"] else "")


def median(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.median(values)) if values else math.nan


def per_run(record: dict, early: float) -> dict:
    run_dir = Path(record["run_dir"])
    metrics = list(runio.read_jsonl(run_dir / "metrics.jsonl"))
    claims = next(iter(summarize_claims([run_dir]).values()))
    return {
        **record,
        "passes_early": time_to_target(metrics, early)["passes"],
        "last5": 100 * float(np.mean([m["test/accuracy"] for m in metrics[-5:]])),
        "cv": claims["loss_cv"][-1] if claims["loss_cv"] else math.nan,
        "rho": claims["spearman_consecutive_mean"],
        **mechanics(run_dir),
    }


def paired(runs: list[dict], base: dict[int, dict], key: str) -> float:
    ratios = [speedup(base[r["seed"]][key], r[key])["ratio"] for r in runs if r["seed"] in base]
    return aggregate([x for x in ratios if not math.isnan(x)])["median"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--early", type=float, default=0.985, help="a second target (0.985)")
    parser.add_argument("--baseline", default="sgd", help="arm the paired ratios divide (sgd)")
    args = parser.parse_args()
    rows = []
    for directory in args.dirs:
        records = [per_run(r, args.early) for r in load_records(directory)]
        base = {r["seed"]: r for r in records if r["arm"] == args.baseline}
        for arm in dict.fromkeys(r["arm"] for r in records):
            rs = [r for r in records if r["arm"] == arm]
            rows.append((directory.name, arm, rs, base))
    target = load_records(args.dirs[0])[0]["target"]
    print(
        f"| comparison | arm | seeds | passes to {100 * target:g} % | paired ratio | passes to "
        f"{100 * args.early:g} % | paired ratio | test acc %, last 5 evals | extra passes |"
    )
    print("|---|---|---:|---|---:|---|---:|---|---:|")
    for name, arm, rs, base in rows:
        print(
            f"| {name} | {arm} | {len(rs)} "
            f"| {spread([r['passes_to_target'] for r in rs], '.0f')} "
            f"| {paired(rs, base, 'passes_to_target'):.3f} "
            f"| {spread([r['passes_early'] for r in rs], '.0f')} "
            f"| {paired(rs, base, 'passes_early'):.3f} "
            f"| {spread([r['last5'] for r in rs], '.3f')} "
            f"| {median([r['extra_passes'] for r in rs]):.0f} |"
        )
    print()
    print(
        "| comparison | arm | trigger % | extra iters per trigger | triggers reaching the limit % "
        "| last-epoch CV | ρ epoch to epoch | limit ÷ epoch mean = trend × tail |"
    )
    print("|---|---|---:|---:|---:|---|---:|---|")
    for name, arm, rs, _ in rows:
        m = {k: median([r[k] for r in rs]) for k in ("extra_per_trigger", "rho", "reached_limit")}
        print(
            f"| {name} | {arm} | {100 * median([r['trigger_rate'] for r in rs]):.2f} "
            f"| {m['extra_per_trigger']:.1f} | {100 * m['reached_limit']:.0f} "
            f"| {spread([r['cv'] for r in rs], '.3f')} "
            f"| {m['rho']:.3f} | {median([r['limit_over_mean'] for r in rs]):.2f} = "
            f"{median([r['window_over_mean'] for r in rs]):.2f} × "
            f"{median([r['limit_over_window_mean'] for r in rs]):.2f} |"
        )


if __name__ == "__main__":
    main()
