"""Compact per-seed records behind claims C1/C2 and the mechanics table, from the run
directories of ``isgd compare`` comparisons — small enough to commit, unlike the step logs.

    .venv/bin/python scripts/claim_records.py runs/mnist-solver --out docs/results/X/claims.jsonl

One JSON line per run: arm, seed, trigger rate, C1 (Spearman ρ of the fixed batches' losses
between consecutive epochs, and first-to-last), C2 (σ and σ/mean of the batch losses per complete
epoch, and how many σ the largest batch loss lies above the mean), the mechanics of
``isgd.reporting.compare_report.mechanics`` (limit over the epoch mean split into trend × tail,
triggers reaching the limit, extra iterations per trigger) and the median momentum-to-∇φ ratio
of the extra iterations. Non-finite values are written as null.
``scripts/claim_table.py`` prints the tables of docs/results.md from these files.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from isgd.experiments.records import load_records
from isgd.reporting.compare_report import mechanics
from isgd.reporting.plots import summarize_claims


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def compact(record: dict, comparison: Path) -> dict:
    run_dir = comparison / "runs" / f"{record['arm']}-seed{record['seed']}"
    if not run_dir.is_dir():  # a --retarget directory: its records point at the runs
        run_dir = Path(record["run_dir"])
    claims = next(iter(summarize_claims([run_dir]).values()))
    row = {
        "comparison": comparison.name,
        "arm": record["arm"],
        "seed": record["seed"],
        "passes_to_target": record["passes_to_target"],
        "final_accuracy": record["final_accuracy"],
        "trigger_rate": record["trigger_rate"],
        "momentum_ratio": record.get("momentum_ratio"),
        "c1_rho_consecutive": claims.get("spearman_consecutive_mean"),
        "c1_rho_first_last": claims.get("spearman_first_last"),
        "c2_epochs": claims.get("epochs"),
        "c2_loss_std": claims.get("loss_std"),
        "c2_loss_cv": claims.get("loss_cv"),
        "c2_loss_max_sigma": claims.get("loss_max_sigma"),
        **mechanics(run_dir),
    }
    return {k: _finite(v) for k, v in row.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="isgd compare directories")
    parser.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    args = parser.parse_args()
    rows = [compact(r, d) for d in args.dirs for r in load_records(d)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))
    print(f"{len(rows)} records -> {args.out}")


if __name__ == "__main__":
    main()
