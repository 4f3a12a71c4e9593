"""Paired ratios with 95 % intervals from the per-run records of ``isgd compare`` directories —
the committed ``runs.jsonl`` files are enough (no run directories needed).

    .venv/bin/python scripts/paired_table.py docs/results/mnist docs/results/fashion \\
        docs/results/ablations/abl-a docs/results/ablations/abl-bn [--baseline sgd] \\
        [--key passes_to_target] [--pool isgd]

Per comparison and arm: the geometric mean of the per-seed ratios ``baseline / arm`` of ``--key``
with its Student-t 95 % interval over the seeds (``isgd.experiments.paired``), the p-values of the
t test and of the exact Wilcoxon signed-rank test, the smallest ratio the run could detect at 80 %
power, and the sentence saying which effects the interval excludes. A seed where one arm missed
the target is charged that arm's whole run (a bound; both missed: left out). ``--pool ARM`` adds
one row that pools the seeds of ``ARM`` over the comparisons given, each pair within its own
comparison and seed — and only independent seeds: a seed of a setting (data set, model,
imbalance, label noise: the comparison's ``summary.json``) already pooled from an earlier
directory is the same initialisation and batch order again, and is left out (said below the
table). Records written before crossings were interpolated hold the first evaluation at or above
the target; the table says which kind each comparison has.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from isgd.experiments.paired import effect_sentence, paired_ratio
from isgd.experiments.records import load_records

BUDGETS = {  # the whole run's cost that a missed target is charged (paired_ratio)
    "passes_to_target": "passes",
    "passes_to_target_grid": "passes",
    "time_to_target": "train_seconds",
    "time_to_target_grid": "train_seconds",
    "backward_passes_to_target": "backward_passes",
}

Pair = tuple[dict[str, Any], dict[str, Any]]


def pairs(records: list[dict], baseline: str, arm: str) -> list[Pair]:
    """(baseline record, arm record) of every seed both ran."""
    base = {r["seed"]: r for r in records if r["arm"] == baseline}
    return [(base[r["seed"]], r) for r in records if r["arm"] == arm and r["seed"] in base]


def ratio(p: list[Pair], key: str) -> dict[str, Any]:
    budget = BUDGETS.get(key)
    charged = {} if budget is None else {
        "base_budget": [float(b.get(budget, math.inf)) for b, _ in p],
        "arm_budget": [float(a.get(budget, math.inf)) for _, a in p],
    }  # fmt: skip
    return paired_ratio([b[key] for b, _ in p], [a[key] for _, a in p], **charged)


def setting(directory: Path) -> tuple[Any, ...] | None:
    """What makes two comparisons' seeds the same runs: data set, model, imbalance, label noise
    (None: no summary.json to tell)."""
    path = directory / "summary.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text()).get("config", {})
    return (
        config.get("dataset"),
        config.get("model"),
        config.get("imbalance") or 1.0,
        config.get("label_noise") or 0.0,
    )


def fmt(r: dict) -> str:
    if math.isnan(r["low"]):
        return f"{r['ratio']:.3f} [—]"
    return f"{r['ratio']:.3f} [{r['low']:.3f}–{r['high']:.3f}]"


def row(name: str, arm: str, crossing: str, r: dict) -> str:
    notes = [
        f"{r[k]} {what}"
        for k, what in (("base_missed", "base missed"), ("arm_missed", "arm missed"))
        if r[k]
    ] + ([f"{r['left_out']} left out"] if r["left_out"] else [])
    detectable = f"{1 / r['detectable']:.3f}–{r['detectable']:.3f}" if r["detectable"] > 1 else "—"
    return (
        f"| {name} | {arm} | {crossing} | {fmt(r)} | {r['p_value']:.2g} | {r['wilcoxon_p']:.2g} "
        f"| {detectable} | {r['n']}" + (f" ({', '.join(notes)})" if notes else "") + " |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--baseline", default="sgd", help="the arm the ratios divide (sgd)")
    parser.add_argument("--key", default="passes_to_target", help="record field (passes)")
    parser.add_argument("--pool", action="append", default=[], help="pool this arm's pairs")
    args = parser.parse_args()
    what = "seconds" if "time" in args.key else "passes"
    print(
        f"| comparison | arm | crossing | {args.baseline}/arm [95 % CI] | p (t) | p (Wilcoxon) "
        "| detectable (80 % power) | pairs |"
    )
    print("|---|---|---|---|---:|---:|---|---:|")
    pooled: dict[str, list[Pair]] = {a: [] for a in args.pool}
    seen: dict[str, dict[tuple[Any, ...], str]] = {a: {} for a in args.pool}
    dropped: list[str] = []
    sentences = []
    for directory in args.dirs:
        records = load_records(directory)
        interpolated = "passes_to_target_grid" in records[0] and not args.key.endswith("_grid")
        crossing = "interpolated" if interpolated else "grid"
        where = setting(directory)
        for arm in dict.fromkeys(r["arm"] for r in records):
            if arm == args.baseline:
                continue
            p = pairs(records, args.baseline, arm)
            for pair in p if arm in pooled else []:
                key = (where, pair[1]["seed"]) if where is not None else None
                if key is not None and key in seen[arm]:
                    dropped.append(f"{directory.name} seed {key[1]} (in {seen[arm][key]})")
                    continue
                if key is not None:
                    seen[arm][key] = directory.name
                pooled[arm].append(pair)
            r = ratio(p, args.key)
            print(row(directory.name, arm, crossing, r))
            sentences.append(f"- {directory.name}: {effect_sentence(arm, args.baseline, r, what)}")
    for arm, p in pooled.items():
        r = ratio(p, args.key)
        print(row("**pooled**", arm, "—", r))
        sentences.append(f"- pooled: {effect_sentence(arm, args.baseline, r, what)}")
    if dropped:
        again = "; ".join(dropped)
        print(f"\nLeft out of the pool, the same seed of the same setting again: {again}")
    print()
    print("\n".join(sentences))


if __name__ == "__main__":
    main()
