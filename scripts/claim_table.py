"""The tables of claims C1 and C2 and of ISGD's mechanics in docs/results.md, from committed
compact per-seed records (``claims.jsonl``, written by ``scripts/claim_records.py``).

    .venv/bin/python scripts/claim_table.py docs/results/rerun/*/claims.jsonl

Per comparison and arm, over seeds (median [min–max]):

- C1: the Spearman ρ of the fixed batches' losses between consecutive epochs (each run's mean
  over its epoch pairs) and between the first and the last complete epoch;
- C2: in the last complete epoch, σ and σ/mean (CV) of the batch losses, and how many σ the
  largest batch loss lies above the mean;
- C2 paired: per seed, the arm's last-epoch CV and (max − mean)/σ minus the first arm's of the
  same comparison (its baseline), mean with a 95 % Student-t interval and p-value;
- mechanics (medians): steps above the limit, extra iterations per trigger, triggers that got the
  batch down to the limit, the drop of a triggered batch's loss, the epoch-to-epoch loss ratio, and
  the limit over the epoch mean split into trend × tail.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

from isgd.experiments.paired import paired_difference
from isgd.experiments.records import aggregate


def spread(values: Sequence[float | None], spec: str, scale: float = 1.0) -> str:
    a = aggregate([math.nan if v is None else scale * v for v in values])
    if not a["n"]:
        return "—"
    return f"{format(a['median'], spec)} [{format(a['min'], spec)}–{format(a['max'], spec)}]"


def median(values: Sequence[float | None], spec: str, scale: float = 1.0) -> str:
    a = aggregate([math.nan if v is None else scale * v for v in values])
    return format(a["median"], spec) if a["n"] else "—"


def last(row: dict, key: str) -> float:
    """The last complete epoch's value of a per-epoch series (NaN: not recorded)."""
    series = row.get(key) or []
    return math.nan if not series or series[-1] is None else series[-1]


def groups(paths: Sequence[Path]) -> dict[tuple[str, str], list[dict]]:
    """(comparison, arm) → its per-seed rows, in file order."""
    out: dict[tuple[str, str], list[dict]] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            out.setdefault((row["comparison"], row["arm"]), []).append(row)
    return out


def tables(paths: Sequence[Path]) -> str:
    rows = groups(paths)
    lines = [
        "| comparison | arm | seeds | C1: ρ epoch to epoch | C1: ρ first to last epoch "
        "| C2: σ, last epoch | C2: σ / mean | C2: (max − mean) / σ |",
        "|---|---|---:|---|---|---|---|---|",
    ]
    for (comparison, arm), rs in rows.items():
        lines.append(
            f"| {comparison} | {arm} | {len(rs)} "
            f"| {spread([r['c1_rho_consecutive'] for r in rs], '.3f')} "
            f"| {spread([r['c1_rho_first_last'] for r in rs], '.2f')} "
            f"| {spread([last(r, 'c2_loss_std') for r in rs], '.4f')} "
            f"| {spread([last(r, 'c2_loss_cv') for r in rs], '.3f')} "
            f"| {spread([last(r, 'c2_loss_max_sigma') for r in rs], '.1f')} |"
        )
    lines += [
        "",
        "| comparison | arm − baseline, per seed | pairs | C2: Δ σ / mean [95 % CI] | p "
        "| C2: Δ (max − mean) / σ [95 % CI] | p |",
        "|---|---|---:|---|---:|---|---:|",
    ]
    baselines: dict[str, list[dict]] = {}  # each comparison's first arm
    for (comparison, _), rs in rows.items():
        baselines.setdefault(comparison, rs)
    for (comparison, arm), rs in rows.items():
        if rs is baselines[comparison]:
            continue
        base = {r["seed"]: r for r in baselines[comparison]}
        pairs = [(base[r["seed"]], r) for r in rs if r["seed"] in base]
        cells = []
        for key in ("c2_loss_cv", "c2_loss_max_sigma"):
            d = paired_difference(
                [last(b, key) for b, _ in pairs], [last(a, key) for _, a in pairs]
            )
            cells.append(
                f"{d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] | {d['p_value']:.2g}"
                if d["n"]
                else "— | —"
            )
        lines.append(
            f"| {comparison} | {arm} − {baselines[comparison][0]['arm']} | {len(pairs)} "
            f"| {cells[0]} | {cells[1]} |"
        )
    lines += [
        "",
        "| comparison | arm | trigger % | steps above the limit % | extra iters per trigger "
        "| triggers reaching the limit % | drop of a triggered batch's loss % "
        "| epoch mean ÷ previous | limit ÷ epoch mean = trend × tail |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (comparison, arm), rs in rows.items():
        col = lambda key, spec, scale=1.0: median([r.get(key) for r in rs], spec, scale)  # noqa: E731
        lines.append(
            f"| {comparison} | {arm} | {col('trigger_rate', '.2f', 100)} "
            f"| {col('above_limit', '.2f', 100)} | {col('extra_per_trigger', '.1f')} "
            f"| {col('reached_limit', '.0f', 100)} | {col('batch_loss_drop', '.0f', 100)} "
            f"| {col('epoch_trend', '.2f')} | {col('limit_over_mean', '.2f')} = "
            f"{col('window_over_mean', '.2f')} × {col('limit_over_window_mean', '.2f')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="claims.jsonl files")
    print(tables(parser.parse_args().files))


if __name__ == "__main__":
    main()
