"""The "when does it help" table of docs/results.md, from ``isgd compare`` directories.

    .venv/bin/python scripts/when_table.py "MNIST-LT ρ=100"=docs/results/when/mnist-lt \\
        "MNIST, 20 % noisy labels"=docs/results/when/mnist-noise ... [--baseline sgd]

Per setting and arm, paired against the baseline over the seeds (``isgd.experiments.paired``,
from the committed ``runs.jsonl``): the final balanced accuracy difference (percentage points,
95 % interval), the ratio baseline/arm of passes to the target and of *backward* passes to it
(the forward-only variant's saving; equal to passes for every other arm), the share of steps
that triggered or were forward-only, and a modelled-seconds ratio for the variant: its backward
passes plus its forward-only steps at ``--forward-cost`` of a training step (measured by
``benchmarks/bench_forward_only.py``), against the baseline's passes.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

from isgd.experiments.paired import paired_difference, paired_ratio
from isgd.experiments.records import load_records


def paired(records: list[dict], base: str, arm: str, key: str, arm_key: str | None = None):
    by_seed = {r["seed"]: r for r in records if r["arm"] == base}
    rows = [(by_seed[r["seed"]], r) for r in records if r["arm"] == arm and r["seed"] in by_seed]
    return [b[key] for b, _ in rows], [a[arm_key or key] for _, a in rows]


def ratio_cell(r: dict) -> str:
    if not r["n"]:
        return "—"
    if math.isnan(r["low"]):
        return f"{r['ratio']:.3f}"
    return f"{r['ratio']:.3f} [{r['low']:.3f}–{r['high']:.3f}]"


def diff_cell(r: dict) -> str:
    if not r["n"]:
        return "—"
    pp = lambda x: f"{100 * x:+.2f}"  # noqa: E731
    if math.isnan(r["low"]):
        return pp(r["difference"])
    return f"{pp(r['difference'])} [{pp(r['low'])}, {pp(r['high'])}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("settings", nargs="+", metavar="LABEL=DIR")
    parser.add_argument("--baseline", default="sgd")
    parser.add_argument("--forward-cost", type=float, default=0.37, metavar="F")
    args = parser.parse_args()
    print(
        "| setting | arm | seeds | balanced acc., arm − base (pp) [95 % CI] | passes to target, "
        "base/arm [95 % CI] | backward passes to target, base/arm | triggered / forward-only "
        "steps (%) | modelled seconds, base/arm |"
    )
    print("|---|---|---:|---|---|---|---|---|")
    for spec in args.settings:
        label, _, directory = spec.rpartition("=")  # labels may hold "=" (ρ=100)
        records = load_records(Path(directory))
        arms = list(dict.fromkeys(r["arm"] for r in records))
        for arm in arms:
            if arm == args.baseline:
                continue
            base_acc, arm_acc = paired(records, args.baseline, arm, "final_balanced_accuracy")
            acc = paired_difference(base_acc, arm_acc)
            passes = paired_ratio(*paired(records, args.baseline, arm, "passes_to_target"))
            backward = paired_ratio(
                *paired(
                    records, args.baseline, arm, "passes_to_target", "backward_passes_to_target"
                )
            )
            runs = [r for r in records if r["arm"] == arm]
            steps = [r["iterations"] for r in runs]
            triggered = statistics.median(r["triggers"] / s for r, s in zip(runs, steps))
            forward_only = statistics.median(
                r.get("forward_only", 0) / s for r, s in zip(runs, steps)
            )
            base_p, arm_b = paired(
                records, args.baseline, arm, "passes_to_target", "backward_passes_to_target"
            )
            _, arm_p = paired(records, args.baseline, arm, "passes_to_target")
            modelled = paired_ratio(
                base_p,
                [b + args.forward_cost * (p - b) for b, p in zip(arm_b, arm_p)],
            )
            print(
                f"| {label} | {arm} | {acc['n']} | {diff_cell(acc)} | {ratio_cell(passes)} "
                f"| {ratio_cell(backward)} | {100 * triggered:.2f} / {100 * forward_only:.1f} "
                f"| {ratio_cell(modelled) if forward_only else '= passes'} |"
            )


if __name__ == "__main__":
    main()
