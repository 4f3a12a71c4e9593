"""scripts/claim_table.py: the C1/C2 and mechanics tables of docs/results.md from known records."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "claim_table.py"


def _load():
    spec = importlib.util.spec_from_file_location("claim_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(arm, seed, rho, cv, **mech):
    return {
        "comparison": "mnist",
        "arm": arm,
        "seed": seed,
        "trigger_rate": 0.0 if arm == "sgd" else 0.013,
        "c1_rho_consecutive": rho,
        "c1_rho_first_last": rho / 2,
        "c2_loss_std": [0.5, 0.01 * cv],
        "c2_loss_cv": [0.9, cv],
        "c2_loss_max_sigma": [3.0, 10 * cv],
        "above_limit": 0.014,
        "extra_per_trigger": None if arm == "sgd" else 1.0,
        "reached_limit": None if arm == "sgd" else 0.85,
        "batch_loss_drop": None if arm == "sgd" else 0.3,
        "epoch_trend": 0.8,
        "limit_over_mean": 5.2,
        "window_over_mean": 1.12,
        "limit_over_window_mean": 4.64,
        **mech,
    }


def test_tables_give_median_and_range_over_seeds_of_the_last_epoch(tmp_path):
    rows = [_row("sgd", s, rho, cv) for s, (rho, cv) in enumerate([(0.93, 1.4), (0.91, 1.5)])]
    rows += [_row("isgd", s, 0.92, cv) for s, cv in enumerate([1.2, 1.35, 1.25])]
    path = tmp_path / "claims.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = _load().tables([path]).splitlines()
    assert lines[2] == (
        "| mnist | sgd | 2 | 0.920 [0.910–0.930] | 0.46 [0.46–0.47] | 0.0145 [0.0140–0.0150] "
        "| 1.450 [1.400–1.500] | 14.5 [14.0–15.0] |"
    )
    assert lines[3].startswith("| mnist | isgd | 3 | 0.920 [0.920–0.920] ")
    assert "| 1.250 [1.200–1.350] | 12.5 [12.0–13.5] |" in lines[3]
    # paired with sgd on seeds 0 and 1: CV differences −0.2 and −0.15, t(1) interval
    assert lines[7] == (
        "| mnist | isgd − sgd | 2 | -0.175 [-0.493, +0.143] | 0.09 "
        "| -1.750 [-4.927, +1.427] | 0.09 |"
    )
    mech = lines[-2:]
    assert mech[0] == "| mnist | sgd | 0.00 | 1.40 | — | — | — | 0.80 | 5.20 = 1.12 × 4.64 |"
    assert mech[1] == "| mnist | isgd | 1.30 | 1.40 | 1.0 | 85 | 30 | 0.80 | 5.20 = 1.12 × 4.64 |"
