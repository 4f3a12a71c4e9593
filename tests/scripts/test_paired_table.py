"""scripts/paired_table.py on the committed records: pooling keeps only independent seeds."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "paired_table.py"
RESULTS = ROOT / "docs" / "results"


def _load():
    spec = importlib.util.spec_from_file_location("paired_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_pool_counts_each_seed_of_a_setting_once(monkeypatch, capsys):
    dirs = [RESULTS / d for d in ("mnist", "fashion", "ablations/abl-a", "ablations/abl-bn")]
    argv = ["paired_table.py", *map(str, dirs), "--pool", "isgd"]
    monkeypatch.setattr(sys, "argv", argv)
    _load().main()
    out = capsys.readouterr().out
    # abl-a's isgd runs are MNIST/LeNet seeds 0-4 again (the mnist comparison's): left out, so
    # the pool is 15 pairs, not 20
    assert "| **pooled** | isgd | — | 1.029 [0.911–1.161] | 0.62 | 0.23 | 0.844–1.185 | 15 |" in out
    assert (
        "Left out of the pool, the same seed of the same setting again: abl-a seed 0 (in mnist)"
        in out
    )
    # Fashion: every seed the same sign, so Wilcoxon gives its smallest 5-seed p, 2/32
    assert "| fashion | isgd | grid | 0.996 [0.992–1.000] | 0.035 | 0.062 |" in out
