"""Paired ratios with 95 % intervals from the per-run records of ``isgd compare`` directories —
the committed ``runs.jsonl`` files are enough (no run directories needed).

    .venv/bin/python scripts/paired_table.py docs/results/mnist docs/results/fashion \\
        docs/results/ablations/abl-a docs/results/ablations/abl-bn [--baseline sgd] \\
        [--key passes_to_target] [--pool isgd]

Per comparison and arm: the geometric mean of the per-seed ratios ``baseline / arm`` of ``--key``
with its Student-t 95 % interval over the seeds (``isgd.experiments.paired``), the p-value, and the
sentence saying which effects the interval excludes. ``--pool ARM`` adds one row that pools the
seeds of ``ARM`` over all the comparisons given (each pair stays within its own comparison and
seed). Records written before crossings were interpolated hold the first evaluation at or above the
target; the table says which kind each comparison has.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from isgd.experiments.paired import effect_sentence, paired_ratio
from isgd.experiments.records import load_records


def pairs(records: list[dict], baseline: str, arm: str, key: str) -> list[tuple[float, float]]:
    base = {r["seed"]: r for r in records if r["arm"] == baseline}
    return [
        (base[r["seed"]][key], r[key]) for r in records if r["arm"] == arm and r["seed"] in base
    ]


def fmt(r: dict) -> str:
    if math.isnan(r["low"]):
        return f"{r['ratio']:.3f} [—]"
    return f"{r['ratio']:.3f} [{r['low']:.3f}–{r['high']:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--baseline", default="sgd", help="the arm the ratios divide (sgd)")
    parser.add_argument("--key", default="passes_to_target", help="record field (passes)")
    parser.add_argument("--pool", action="append", default=[], help="pool this arm's pairs")
    args = parser.parse_args()
    what = "seconds" if "time" in args.key else "passes"
    print(f"| comparison | arm | crossing | {args.baseline}/arm [95 % CI] | p | pairs |")
    print("|---|---|---|---|---:|---:|")
    pooled: dict[str, list[tuple[float, float]]] = {a: [] for a in args.pool}
    sentences = []
    for directory in args.dirs:
        records = load_records(directory)
        interpolated = "passes_to_target_grid" in records[0] and not args.key.endswith("_grid")
        crossing = "interpolated" if interpolated else "grid"
        for arm in dict.fromkeys(r["arm"] for r in records):
            if arm == args.baseline:
                continue
            p = pairs(records, args.baseline, arm, args.key)
            if arm in pooled:
                pooled[arm] += p
            r = paired_ratio([b for b, _ in p], [a for _, a in p])
            missed = f" ({r['censored']} missed)" if r["censored"] else ""
            print(
                f"| {directory.name} | {arm} | {crossing} | {fmt(r)} | {r['p_value']:.2g} "
                f"| {r['n']}{missed} |"
            )
            sentences.append(f"- {directory.name}: {effect_sentence(arm, args.baseline, r, what)}")
    for arm, p in pooled.items():
        r = paired_ratio([b for b, _ in p], [a for _, a in p])
        print(f"| **pooled** | {arm} | — | {fmt(r)} | {r['p_value']:.2g} | {r['n']} |")
        sentences.append(f"- pooled: {effect_sentence(arm, args.baseline, r, what)}")
    print()
    print("\n".join(sentences))


if __name__ == "__main__":
    main()
