"""The comparison's statistics on known inputs: interpolated crossings and paired intervals."""

from __future__ import annotations

import math
import statistics

import pytest

from isgd.experiments.paired import (
    crossing,
    difference_sentence,
    effect_sentence,
    paired_difference,
    paired_ratio,
)

T_975_DF4 = 2.7764451051977987  # Student t quantile 0.975 with 4 degrees of freedom (tables)


def test_paired_ratio_is_the_t_interval_of_the_log_ratios():
    base, arm = [100, 120, 90, 110, 130], [90, 100, 100, 100, 120]
    logs = [math.log(b / a) for b, a in zip(base, arm)]
    mean, sd = statistics.fmean(logs), statistics.stdev(logs)
    half = T_975_DF4 * sd / math.sqrt(5)
    r = paired_ratio(base, arm)
    assert r["n"] == 5 and r["censored"] == 0
    assert r["ratios"] == pytest.approx([100 / 90, 1.2, 0.9, 1.1, 130 / 120])
    assert r["ratio"] == pytest.approx(math.exp(mean), rel=1e-12)
    assert r["low"] == pytest.approx(math.exp(mean - half), rel=1e-12)
    assert r["high"] == pytest.approx(math.exp(mean + half), rel=1e-12)
    # pinned: 1.0742 [0.9411–1.2260], p = 0.2074 (t = 1.498 on 4 degrees of freedom)
    assert (r["ratio"], r["low"], r["high"]) == pytest.approx((1.07416, 0.94113, 1.22598), 1e-4)
    assert r["p_value"] == pytest.approx(0.20744, rel=1e-3)


def test_paired_ratio_counts_missed_targets_and_needs_two_pairs():
    r = paired_ratio([100, math.inf, 110, math.inf], [120, 100, 130, math.inf])
    assert (r["n"], r["censored"]) == (2, 2)
    one = paired_ratio([100.0], [90.0])
    assert one["ratio"] == pytest.approx(100 / 90) and math.isnan(one["low"])
    assert "too few for an interval" in effect_sentence("isgd", "sgd", one)
    equal = paired_ratio([100, 200, 300], [100, 200, 300])
    assert (equal["low"], equal["high"], equal["p_value"]) == (1.0, 1.0, 1.0)
    assert "is 1.000 in every one of 3 paired seeds" in effect_sentence("sgd2", "sgd", equal)
    with pytest.raises(ValueError, match="needs pairs"):
        paired_ratio([1.0, 2.0], [1.0])


def test_effect_sentence_states_what_the_interval_excludes():
    inside = effect_sentence(
        "isgd", "sgd", paired_ratio([100, 120, 90, 110, 130], [90, 100, 100, 100, 120])
    )
    assert "No difference detected" in inside
    assert "more than 18 % fewer passes" in inside and "more than 6.3 % more passes" in inside
    faster = effect_sentence("isgd", "sgd", paired_ratio([100, 120, 110, 130], [80, 95, 90, 100]))
    assert "isgd needs fewer passes" in faster and "between 17 % and 24 %" in faster
    slower = effect_sentence(
        "isgd", "sgd", paired_ratio([80, 95, 90, 100], [100, 120, 110, 130]), "seconds"
    )
    assert "isgd needs more seconds" in slower


def test_effect_sentence_prints_sub_percent_effects_with_their_precision():
    # isgd needs 0.2-0.5 % more passes: whole percents would print "between 0 % and 0 %"
    base = [1000.0, 1000.0, 1000.0, 1000.0, 1000.0]
    arm = [1002.0, 1003.0, 1004.0, 1005.0, 1003.5]
    slower = effect_sentence("isgd", "sgd", paired_ratio(base, arm))
    assert "isgd needs more passes: the interval excludes 1 (no effect)" in slower
    assert " 0 %" not in slower and "excludes no effect" not in slower
    cost = slower.split("the cost lies between ")[1]
    low, high = cost.split(" (estimate")[0].split(" and ")
    assert low != high and low.startswith("0.") and high.startswith("0.")
    assert float(low.split()[0]) == pytest.approx(0.2, abs=0.1)
    ratio = slower.split("ratio sgd/isgd = ")[1].split(",")[0]  # 0.997 [0.995-0.998]
    assert len({ratio.split()[0], *ratio.split("[")[1].rstrip("]").split("–")}) == 3


def _evals(*points):
    return [
        {"iteration": it, "passes": it + extra, "time/train_seconds": it / 10, "test/accuracy": acc}
        for it, extra, acc in points
    ]


def test_crossing_interpolates_between_the_evaluations_around_the_target():
    metrics = _evals((100, 0, 0.50), (200, 4, 0.60), (300, 10, 0.80), (400, 12, 0.70))
    hit = crossing(metrics, 0.70)  # halfway from (200, 204 passes) to (300, 310 passes)
    assert hit == pytest.approx({"iteration": 250.0, "passes": 257.0, "seconds": 25.0})
    assert crossing(metrics, 0.80)["iteration"] == 300.0  # reached exactly at an evaluation
    assert crossing(metrics, 0.40)["iteration"] == 100.0  # first evaluation: nothing below it
    assert crossing(metrics, 0.90) == {
        "iteration": math.inf,
        "passes": math.inf,
        "seconds": math.inf,
    }


def test_paired_difference_is_the_t_interval_of_the_differences():
    # differences 0.01, 0.02, 0.03: mean 0.02, sd 0.01, t(0.975, 2) = 4.3027 -> ±0.02484
    r = paired_difference([0.5, 0.5, 0.5, math.nan], [0.51, 0.52, 0.53, 0.9])
    assert (r["n"], r["censored"]) == (3, 1)
    assert r["difference"] == pytest.approx(0.02)
    assert (r["low"], r["high"]) == pytest.approx((-0.0048414, 0.0448414), abs=1e-7)
    assert r["p_value"] == pytest.approx(0.07418, abs=1e-5)
    sentence = difference_sentence("isgd", "sgd", r, "final accuracy")
    assert "+2.00 pp [-0.48 pp – +4.48 pp]" in sentence and "No difference detected" in sentence
    higher = paired_difference([0.5, 0.5, 0.5], [0.52, 0.53, 0.54])
    assert "isgd is higher, by between" in difference_sentence("isgd", "sgd", higher)
    lower = paired_difference([0.5, 0.5, 0.5], [0.48, 0.47, 0.46])
    assert "isgd is lower, by between 0.52 pp and 5.48 pp" in difference_sentence(
        "isgd", "sgd", lower
    )
    assert "too few" in difference_sentence("isgd", "sgd", paired_difference([0.5], [0.6]))
