"""Quality against cost: the charged costs, the crossing of a budget curve, the paired saving."""

from __future__ import annotations

import math

import pytest

from isgd.experiments.budgets import cost, crossing_cost, quality_vs_cost


def test_every_pass_is_charged():
    record = {"passes": 130, "backward_passes": 100, "train_seconds": 7.5}
    assert cost(record, "passes") == 130  # 100 steps with backward, 30 forwards without
    assert cost(record, "compute") == pytest.approx(100 + 30 / 3)
    assert cost(record, "compute", forward_cost=0.5) == pytest.approx(115)
    assert cost(record, "seconds") == 7.5
    with pytest.raises(ValueError, match="unknown cost 'flops'"):
        cost(record, "flops")


def test_the_crossing_of_a_budget_curve():
    curve = [(250.0, 0.90), (500.0, 0.96), (1000.0, 0.99)]
    # 0.97 lies a third of the way from 0.96 to 0.99: 500 + (1000 - 500) / 3
    assert crossing_cost(curve, 0.97) == (pytest.approx(500 + 500 / 3), "interpolated")
    assert crossing_cost(curve, 0.85) == (250.0, "at the smallest budget")
    assert crossing_cost(curve, 0.995) == (math.inf, "missed")
    # lower is better (bits per character): reached at or below the target
    loss = [(250.0, 2.4), (500.0, 2.0), (1000.0, 1.8)]
    assert crossing_cost(loss, 2.2, higher_is_better=False) == (pytest.approx(375), "interpolated")


def _records():
    """Two arms × 3 budgets × 3 seeds; the arm reaches every metric at 80 % of the baseline's
    passes (its curve is the baseline's, compressed), except seed 2 where it misses 0.97."""
    out = []
    for seed in range(3):
        for budget, passes, metric in ((0.25, 250, 0.90), (0.5, 500, 0.96), (1.0, 1000, 0.99)):
            run = {"seed": seed, "budget": budget, "train_seconds": passes / 100}
            out.append(run | {"arm": "sgd", "final_metric": metric, "passes": passes,
                              "backward_passes": passes})  # fmt: skip
            arm_metric = metric if seed < 2 else min(metric, 0.965)
            out.append(run | {"arm": "isgd", "final_metric": arm_metric, "passes": 0.8 * passes,
                              "backward_passes": 0.8 * passes})  # fmt: skip
    return out


def test_quality_against_cost_pairs_the_seeds_at_every_budget_and_at_the_target():
    result = quality_vs_cost(_records(), ["sgd", "isgd"], target=0.97)
    assert result["budgets"] == [0.25, 0.5, 1.0]
    half = result["arms"]["isgd"]["per_budget"]["0.5"]
    assert half["passes"] == 400 and half["final_metric"] == 0.96
    assert half["vs_base"]["difference"] == 0.0
    full = result["arms"]["isgd"]["per_budget"]["1"]["vs_base"]  # seed 2: 0.965 − 0.99
    assert full["differences"] == pytest.approx([0, 0, -0.025]) and full["n"] == 3
    saving = result["arms"]["isgd"]["saving"]["passes"]
    # seeds 0, 1: 666.7 vs 533.3 passes, ratio 1.25; seed 2: the arm missed, charged its
    # largest budget (800 passes): 666.7 / 800 — an upper bound on what it would need
    assert saving["n"] == 3 and saving["arm_missed"] == 1
    assert saving["ratios"] == pytest.approx([1.25, 1.25, (500 + 500 / 3) / 800])
    geometric = math.exp(sum(map(math.log, saving["ratios"])) / 3)
    assert saving["ratio"] == pytest.approx(geometric)
    assert saving["saving"] == pytest.approx(1 - 1 / geometric)
    assert saving["how"]["isgd"] == ["interpolated", "interpolated", "missed"]
    # seconds: the same for both arms at every budget: no saving
    assert result["arms"]["isgd"]["saving"]["seconds"]["ratios"][:2] == pytest.approx([1, 1])
