"""The comparison's statistics on known inputs: interpolated crossings, paired intervals, the
censoring of missed targets, the Wilcoxon test and the smallest detectable effect."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from isgd.experiments.paired import (
    crossing,
    detectable_ratio,
    difference_sentence,
    effect_sentence,
    first_reaching,
    metric_key,
    paired_difference,
    paired_ratio,
    wilcoxon_signed_rank,
)

INF = math.inf
T_975_DF4 = 2.7764451051977987  # Student t quantile 0.975 with 4 degrees of freedom (tables)
T_80_DF4 = 0.9409645772351816  # Student t quantile 0.80 with 4 degrees of freedom (tables)


def test_paired_ratio_is_the_t_interval_of_the_log_ratios():
    base, arm = [100, 120, 90, 110, 130], [90, 100, 100, 100, 120]
    logs = [math.log(b / a) for b, a in zip(base, arm)]
    mean, sd = statistics.fmean(logs), statistics.stdev(logs)
    half = T_975_DF4 * sd / math.sqrt(5)
    r = paired_ratio(base, arm)
    assert r["n"] == 5 and r["left_out"] == 0
    assert r["ratios"] == pytest.approx([100 / 90, 1.2, 0.9, 1.1, 130 / 120])
    assert r["ratio"] == pytest.approx(math.exp(mean), rel=1e-12)
    assert r["low"] == pytest.approx(math.exp(mean - half), rel=1e-12)
    assert r["high"] == pytest.approx(math.exp(mean + half), rel=1e-12)
    # pinned: 1.0742 [0.9411–1.2260], p = 0.2074 (t = 1.498 on 4 degrees of freedom)
    assert (r["ratio"], r["low"], r["high"]) == pytest.approx((1.07416, 0.94113, 1.22598), 1e-4)
    assert r["p_value"] == pytest.approx(0.20744, rel=1e-3)
    # log-ratios +0.105, +0.182, −0.105, +0.095, +0.080: |·| ranks 3.5, 5, 3.5, 2, 1 (10/9 and
    # 9/10 tie), W− = 3.5; patterns with W− ≤ 3.5: {}, {1}, {2}, {1, 2}, {3.5} twice → 2 · 6/32
    assert r["wilcoxon_p"] == 0.375 and r["wilcoxon_min_p"] == 0.0625
    assert r["detectable"] == pytest.approx(math.exp((T_975_DF4 + T_80_DF4) * sd / math.sqrt(5)))


def test_paired_ratio_without_budgets_leaves_misses_out_and_needs_two_pairs():
    r = paired_ratio([100, INF, 110, INF], [120, 100, 130, INF])
    assert (r["n"], r["left_out"], r["both_missed"]) == (2, 2, 1)
    assert (r["base_missed"], r["arm_missed"]) == (0, 0)
    one = paired_ratio([100.0], [90.0])
    assert one["ratio"] == pytest.approx(100 / 90) and math.isnan(one["low"])
    assert math.isnan(one["detectable"])
    assert "too few for an interval" in effect_sentence("isgd", "sgd", one)
    equal = paired_ratio([100, 200, 300], [100, 200, 300])
    assert (equal["low"], equal["high"], equal["p_value"]) == (1.0, 1.0, 1.0)
    assert equal["wilcoxon_p"] == 1.0  # every log-ratio 0: nothing to rank
    assert "is 1.000 in every one of 3 paired seeds" in effect_sentence("sgd2", "sgd", equal)
    with pytest.raises(ValueError, match="needs pairs"):
        paired_ratio([1.0, 2.0], [1.0])


def test_a_miss_is_charged_the_whole_run_and_never_dropped_alone():
    # seed 0: both reached; seed 1: only the baseline missed (it ran 250 passes); seed 2: only
    # the arm missed (it ran 240); seed 3: both missed
    base, arm = [100, INF, 120, INF], [80, 90, INF, INF]
    r = paired_ratio(base, arm, base_budget=[200, 250, 220, 260], arm_budget=[210, 230, 240, 270])
    assert r["ratios"] == [1.25, 250 / 90, 0.5]  # 100/80; 250/90 a lower bound; 120/240 upper
    assert (r["n"], r["base_missed"], r["arm_missed"], r["both_missed"]) == (3, 1, 1, 1)
    assert r["left_out"] == 1
    assert r["ratio"] == pytest.approx((1.25 * 250 / 90 * 0.5) ** (1 / 3), rel=1e-12)
    sentence = effect_sentence("isgd", "sgd", r)
    assert "1 where only sgd missed, charged its whole run: a lower bound on sgd/isgd" in sentence
    assert "1 where only isgd missed, charged its whole run: an upper bound" in sentence
    assert "1 where both missed, left out" in sentence
    # before: the seed where only the baseline missed was dropped, though it favours the arm
    assert paired_ratio(base, arm)["n"] == 1


def test_wilcoxon_signed_rank_by_hand():
    # |x| ranks 2 (0.1), 4 (0.2), 1 (0.05), 5 (0.3), 3 (0.15): W+ = 2 + 4 + 5 + 3 = 14, W− = 1.
    # Of the 2^5 = 32 sign patterns, W+ ≥ 14 ⇔ W− ≤ 1: {} and {1} → 2/32; two-sided 4/32.
    w = wilcoxon_signed_rank([0.1, 0.2, -0.05, 0.3, 0.15])
    assert w == {"n": 5, "w_plus": 14.0, "p_value": 0.125, "min_p": 0.0625}
    # ties share their mean rank: |x| 1, 1, 2, 2 → ranks 1.5, 1.5, 3.5, 3.5; W+ = 8.5. The 16
    # subset sums of {1.5, 1.5, 3.5, 3.5} reaching 8.5 or more: 8.5 (twice) and 10 → 3/16
    tied = wilcoxon_signed_rank([1.0, -1.0, 2.0, 2.0, 0.0])  # the zero is dropped
    assert tied == {"n": 4, "w_plus": 8.5, "p_value": 0.375, "min_p": 0.125}
    assert wilcoxon_signed_rank([0.0, 0.0])["p_value"] == 1.0
    assert math.isnan(wilcoxon_signed_rank([])["p_value"])


def test_wilcoxon_signed_rank_matches_scipy_exact():
    from scipy import stats

    rng = random.Random(3)
    for n in (6, 9, 12):
        xs = [rng.gauss(0.3, 1.0) for _ in range(n)]
        expected = stats.wilcoxon(xs, method="exact").pvalue
        assert wilcoxon_signed_rank(xs)["p_value"] == pytest.approx(expected, rel=1e-12)


def test_detectable_ratio_is_the_power_formula():
    # δ = (t_0.975,4 + t_0.80,4) · s / √n = 3.71741 · 0.1 / √5 = 0.166248 → e^δ = 1.18087
    assert detectable_ratio(0.1, 5) == pytest.approx(
        math.exp((T_975_DF4 + T_80_DF4) * 0.1 / math.sqrt(5)), rel=1e-12
    )
    assert detectable_ratio(0.1, 5) == pytest.approx(1.180865, rel=1e-6)
    assert detectable_ratio(0.0, 5) == 1.0
    assert math.isnan(detectable_ratio(0.1, 1))
    r = paired_ratio([100, 120, 90, 110, 130], [90, 100, 100, 100, 120])
    m = math.exp((T_975_DF4 + T_80_DF4) * r["sd_log"] / math.sqrt(5))  # 1.1937
    assert r["detectable"] == pytest.approx(m, rel=1e-12)
    assert (
        "The smallest effect this run could detect (80 % power): sgd/isgd outside 0.838–1.194, "
        "i.e. isgd needing 16 % fewer or 19 % more passes."
    ) in effect_sentence("isgd", "sgd", r)


def test_effect_sentence_states_what_the_interval_excludes():
    inside = effect_sentence(
        "isgd", "sgd", paired_ratio([100, 120, 90, 110, 130], [90, 100, 100, 100, 120])
    )
    assert "No difference detected" in inside
    assert "more than 18 % fewer passes" in inside and "more than 6.3 % more passes" in inside
    assert "p = 0.21 (t), 0.38 (Wilcoxon signed-rank, exact)" in inside
    assert "with 5 seeds its smallest possible p is 0.062" in inside
    faster = effect_sentence("isgd", "sgd", paired_ratio([100, 120, 110, 130], [80, 95, 90, 100]))
    assert "isgd needs fewer passes" in faster and "between 17 % and 24 %" in faster
    slower = effect_sentence(
        "isgd", "sgd", paired_ratio([80, 95, 90, 100], [100, 120, 110, 130]), "seconds"
    )
    assert "isgd needs more seconds" in slower


def test_effect_sentence_of_a_comparison_that_tests_nothing_gives_no_verdict():
    r = paired_ratio([1000.0, 1000.0, 1200.0], [1002.0, 1003.0, 1201.0])
    reason = "ISGD did not act before the target in any of the 3 seeds"
    sentence = effect_sentence("isgd", "sgd", r, "passes", reason)
    assert sentence.startswith(f"isgd vs sgd (passes): {reason} — not a test; for the record:")
    assert "needs more passes" not in sentence and "excludes" not in sentence


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


def _evals(*points, key="test/accuracy"):
    return [
        {"iteration": it, "passes": it + extra, "time/train_seconds": it / 10, key: value}
        for it, extra, value in points
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


def test_crossing_of_a_lower_is_better_metric():
    # bits per character falling 2.0 → 1.6 → 1.2: the target 1.4 is met halfway to iteration 300
    metrics = _evals((100, 0, 2.0), (200, 4, 1.6), (300, 10, 1.2), key="test/metric")
    metrics.insert(1, {"iteration": 150, "passes": 152, "time/train_seconds": 15.0})  # no metric
    assert metric_key(metrics) == "test/metric"
    hit = crossing(metrics, 1.4, higher_is_better=False)
    assert hit == pytest.approx({"iteration": 250.0, "passes": 257.0, "seconds": 25.0})
    assert crossing(metrics, 1.6, higher_is_better=False)["iteration"] == 200.0
    assert first_reaching(metrics, 1.4, higher_is_better=False) == 3
    assert math.isinf(crossing(metrics, 1.0, higher_is_better=False)["passes"])
    # read the wrong way round, the first evaluation already "reaches" it
    assert crossing(metrics, 1.4)["iteration"] == 100.0


def test_paired_difference_is_the_t_interval_of_the_differences():
    # differences 0.01, 0.02, 0.03: mean 0.02, sd 0.01, t(0.975, 2) = 4.3027 -> ±0.02484
    r = paired_difference([0.5, 0.5, 0.5, math.nan], [0.51, 0.52, 0.53, 0.9])
    assert (r["n"], r["left_out"]) == (3, 1)
    assert r["difference"] == pytest.approx(0.02)
    assert (r["low"], r["high"]) == pytest.approx((-0.0048414, 0.0448414), abs=1e-7)
    assert r["p_value"] == pytest.approx(0.07418, abs=1e-5)
    assert r["wilcoxon_p"] == 0.25  # all 3 positive: 2 · 1/8
    sentence = difference_sentence("isgd", "sgd", r, "final accuracy")
    assert "+2.00 pp [-0.48 pp – +4.48 pp]" in sentence and "No difference detected" in sentence
    higher = paired_difference([0.5, 0.5, 0.5], [0.52, 0.53, 0.54])
    assert "isgd is higher, by between" in difference_sentence("isgd", "sgd", higher)
    lower = paired_difference([0.5, 0.5, 0.5], [0.48, 0.47, 0.46])
    assert "isgd is lower, by between 0.52 pp and 5.48 pp (worse)" in difference_sentence(
        "isgd", "sgd", lower
    )
    assert "too few" in difference_sentence("isgd", "sgd", paired_difference([0.5], [0.6]))


def test_difference_sentence_in_the_metric_s_units_and_direction():
    # bits per character 1.30 → 1.28, 1.27, 1.26 (lower is better): −0.03 [−0.0548, −0.0052]
    r = paired_difference([1.3, 1.3, 1.3], [1.28, 1.27, 1.26])
    sentence = difference_sentence(
        "isgd", "sgd", r, "final bits per char", percent=False, higher_is_better=False
    )
    assert "isgd − sgd = -0.03 [-0.0548 – -0.00516]" in sentence
    assert "isgd is lower, by between 0.00516 and 0.0548 (better)." in sentence
    assert " pp" not in sentence
