"""One markdown table over the arms of several ``isgd compare`` directories (the ablations of
docs/results.md), from their raw per-run records — finished or still running.

    .venv/bin/python scripts/ablation_table.py runs/abl-a runs/abl-b runs/abl-bn [--target 0.99]

Per arm: seeds done, passes to the target (median [min–max], misses counted as ∞), the median of
the per-seed ratios ``passes_sgd / passes_arm`` against the ``sgd`` arm of the *same* comparison,
final test accuracy, trigger rate, extra passes, the last complete epoch's CV (σ/mean) of the
batch losses (claim C2), the Spearman ρ of the batch losses between consecutive epochs (claim
C1) and the chart's limit over the epoch mean loss with its two parts.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from isgd.compare import Arm, aggregate, load_records, run_record, speedup
from isgd.compare_report import mechanics
from isgd.plots import summarize_claims


def spread(values: list[float], spec: str) -> str:
    a = aggregate(values)
    if not a["n"]:
        return "—"
    text = f"{format(a['median'], spec)} [{format(a['min'], spec)}–{format(a['max'], spec)}]"
    return text + (f" ({a['missed']} missed)" if a["missed"] else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--target", type=float, help="default: each comparison's own")
    parser.add_argument("--baseline", default="sgd", help="arm the paired ratios divide (sgd)")
    args = parser.parse_args()
    print(
        "| comparison | arm | seeds | passes to target | paired passes ratio base/arm | final "
        "acc % | trigger % | extra passes | last-epoch CV | ρ epoch to epoch | limit ÷ epoch mean "
        "= trend × tail |"
    )
    print("|---|---|---:|---|---:|---|---:|---:|---|---:|---|")
    for directory in args.dirs:
        records = load_records(directory)
        if args.target is not None:
            records = [
                run_record(Arm(r["arm"]), r["seed"], Path(r["run_dir"]), args.target)
                for r in records
            ]
        base = {r["seed"]: r for r in records if r["arm"] == args.baseline}
        for arm in dict.fromkeys(r["arm"] for r in records):
            rs = [r for r in records if r["arm"] == arm]
            paired = [
                speedup(base[r["seed"]]["passes_to_target"], r["passes_to_target"])["ratio"]
                for r in rs
                if r["seed"] in base
            ]
            paired = [p for p in paired if not math.isnan(p)]
            claims = summarize_claims([Path(r["run_dir"]) for r in rs]).values()
            cv = [c["loss_cv"][-1] for c in claims if c["loss_cv"]]
            rho = [c["spearman_consecutive_mean"] for c in claims]
            rho = [x for x in rho if x is not None]
            mech = [mechanics(Path(r["run_dir"])) for r in rs]

            def med(key: str, runs=mech) -> float:
                return float(np.nanmedian([m[key] for m in runs]))

            print(
                f"| {directory.name} | {arm} | {len(rs)} "
                f"| {spread([r['passes_to_target'] for r in rs], '.0f')} "
                f"| {aggregate(paired)['median']:.3f} "
                f"| {spread([100 * r['final_accuracy'] for r in rs], '.2f')} "
                f"| {100 * float(np.median([r['trigger_rate'] for r in rs])):.2f} "
                f"| {float(np.median([r['extra_passes'] for r in rs])):.0f} "
                f"| {spread(cv, '.3f')} "
                f"| {float(np.median(rho)) if rho else math.nan:.3f} "
                f"| {med('limit_over_mean'):.2f} = {med('window_over_mean'):.2f} × "
                f"{med('limit_over_window_mean'):.2f} |"
            )


if __name__ == "__main__":
    main()
