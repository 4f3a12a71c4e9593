"""The statistics of a comparison: where a run crosses the target, and paired per-seed ratios.

**Crossing.** The metric (``test/metric``; ``test/accuracy`` in runs written before workloads
named their own) is evaluated every ``eval_every`` iterations, so "the first evaluation at or past
the target" is quantised to that grid (250 iterations were ≈ 5 % of the MNIST median).
:func:`crossing` interpolates linearly between the last evaluation short of the target and the
first that reaches it — at or above it when higher is better, at or below it when lower is better
(a language model's bits per character) — the passes, seconds and iterations at which the straight
line between those two evaluations meets the target.

**Paired ratios.** For one seed every arm shares the initialisation and the batch order, so the
unit of comparison is the per-seed ratio :math:`r_s = T_{base,s} / T_{arm,s}` (> 1: the arm
needs less). Ratios are averaged on the log scale: with :math:`\\ell_s = \\log r_s` over
:math:`n` seeds,

.. math:: \\bar r = \\exp(\\bar\\ell), \\qquad
          \\exp\\big(\\bar\\ell \\pm t_{0.975,\\,n-1}\\, s_\\ell / \\sqrt n\\big)

is the geometric-mean ratio and its 95 % confidence interval (Student *t* on the log-ratios; the
two-sided p-value tests :math:`\\bar\\ell = 0`). Log-ratios of a few seeds need not be normal, so
:func:`wilcoxon_signed_rank` (exact, two-sided) is reported beside it, and
:func:`detectable_ratio` says how large an effect the run could have seen at all.

**Missed targets** are censored at the budget (:func:`paired_ratio`): the arm that missed is
charged its whole run, which is less than it would have needed, so the seed's ratio understates
the advantage of the arm that reached the target — never overstates it. A seed where both missed
is left out. :func:`effect_sentence` says in words which effects the interval excludes and which
it cannot.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from isgd.reporting.metric import PERCENT_METRICS, metric_key

__all__ = [
    "PERCENT_METRICS",
    "crossing",
    "detectable_ratio",
    "difference_sentence",
    "effect_sentence",
    "first_reaching",
    "metric_key",
    "paired_difference",
    "paired_ratio",
    "reaches",
    "wilcoxon_signed_rank",
]

CONFIDENCE = 0.95
POWER = 0.80


# ---------------------------------------------------------------------- crossing the target
def reaches(value: float | None, target: float, higher_is_better: bool = True) -> bool:
    """``value ≥ target`` (higher is better) or ``value ≤ target`` (lower is better); a missing or
    NaN value reaches nothing."""
    if value is None or math.isnan(value):
        return False
    return value >= target if higher_is_better else value <= target


def first_reaching(
    metrics: Sequence[Mapping[str, Any]],
    target: float,
    higher_is_better: bool = True,
    key: str | None = None,
) -> int | None:
    """Index of the first evaluation that reaches ``target`` (None: none does)."""
    key = key or metric_key(metrics)
    return next(
        (i for i, m in enumerate(metrics) if reaches(m.get(key), target, higher_is_better)), None
    )


def crossing(
    metrics: Sequence[Mapping[str, Any]],
    target: float,
    higher_is_better: bool = True,
    key: str | None = None,
) -> dict[str, float]:
    """Seconds, passes and iteration where the metric first reaches ``target``, interpolated
    between the two evaluations around it; ``inf`` if it never does. A first evaluation already
    at the target gives that evaluation's values (there is nothing before it to interpolate).
    An evaluation without the metric (null, NaN) is passed over."""
    key = key or metric_key(metrics)
    keys = {"seconds": "time/train_seconds", "passes": "passes", "iteration": "iteration"}
    if metrics and "backward_passes" in metrics[0]:  # passes that ran a backward (variant)
        keys["backward_passes"] = "backward_passes"
    previous: Mapping[str, Any] | None = None
    for record in metrics:
        value = record.get(key)
        if value is None or math.isnan(value):
            continue
        if reaches(value, target, higher_is_better):
            if previous is None or value == previous[key]:
                return {k: float(record[v]) for k, v in keys.items()}
            frac = (target - previous[key]) / (value - previous[key])
            return {
                k: float(previous[v]) + frac * (float(record[v]) - float(previous[v]))
                for k, v in keys.items()
            }
        previous = record
    return {k: math.inf for k in keys}


# ---------------------------------------------------------------------- tests and intervals
def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1); NaN where undefined."""
    n = len(values)
    mean = sum(values) / n if n else math.nan
    sd = math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1)) if n > 1 else math.nan
    return mean, sd


def _t_interval(values: Sequence[float], confidence: float) -> tuple[float, float, float, float]:
    """Mean, Student-t interval and two-sided p-value (mean = 0) of ``values``; the interval
    and p are NaN with fewer than 2 values."""
    from scipy import stats

    n = len(values)
    mean, sd = _mean_sd(values)
    if n < 2:
        return mean, math.nan, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    if sd > 0:
        p = float(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))
    else:
        p = 0.0 if mean != 0 else 1.0
    return mean, mean - half, mean + half, p


def wilcoxon_signed_rank(values: Sequence[float]) -> dict[str, float]:
    r"""Exact two-sided Wilcoxon signed-rank test that ``values`` are centred on 0.

    Zeros are dropped (Wilcoxon's convention) and ties in :math:`|x|` (to 1e-9 relative) share
    their mean rank.
    With :math:`W^+` the sum of the ranks of the positive values, every one of the :math:`2^n`
    sign patterns is equally likely under the null, and

    .. math:: p = \min\big(1,\ 2 \min(P(W^+ \le w),\ P(W^+ \ge w))\big),

    the probabilities counted exactly over the patterns (a recursion over the rank sums, the
    ranks doubled so that tied half ranks are integers). ``min_p`` is the smallest p these
    ranks can give, :math:`2 / 2^n` without ties: with 5 seeds 0.0625, so no 5-seed run can
    reach p < 0.05 on this test. Returns ``n`` (non-zero values), ``w_plus``, ``p_value`` and
    ``min_p``; with no value at all, NaN (all values zero: p = 1).
    """
    nonzero = [x for x in values if x != 0 and not math.isnan(x)]
    if not nonzero:
        p = math.nan if not values else 1.0
        return {"n": 0, "w_plus": 0.0, "p_value": p, "min_p": p}
    ranks = _doubled_ranks([abs(x) for x in nonzero])
    counts = [1]  # counts[s]: sign patterns whose positive doubled ranks sum to s
    for r in ranks:
        grown = counts + [0] * r
        for s, c in enumerate(counts):
            grown[s + r] += c
        counts = grown
    total = 2 ** len(ranks)
    w = sum(r for r, x in zip(ranks, nonzero) if x > 0)
    below, above = sum(counts[: w + 1]), sum(counts[w:])
    lowest = min(counts[0], counts[-1])  # the extreme patterns: all negative, all positive
    return {
        "n": len(nonzero),
        "w_plus": w / 2,
        "p_value": min(1.0, 2 * min(below, above) / total),
        "min_p": min(1.0, 2 * lowest / total),
    }


def _doubled_ranks(xs: Sequence[float]) -> list[int]:
    """Twice the 1-based ranks of ``xs``, ties sharing their mean rank (an integer once
    doubled). Values equal to 1e-9 relative are tied: log(100/90) and −log(90/100) differ in the
    last bits of a float, not in the effect they measure."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and math.isclose(xs[order[j + 1]], xs[order[i]], rel_tol=1e-9):
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + 1) + (j + 1)  # 2 × the mean of ranks i+1 … j+1
        i = j + 1
    return ranks


def detectable_ratio(
    sd: float, n: int, confidence: float = CONFIDENCE, power: float = POWER
) -> float:
    r"""The smallest geometric-mean ratio a paired run of ``n`` seeds detects with ``power``.

    With :math:`s_\ell` the standard deviation of the per-seed log-ratios, a two-sided *t* test
    at level :math:`\alpha = 1 - \text{confidence}` rejects "no effect" with probability
    ≈ ``power`` when the true mean log-ratio is

    .. math:: \delta = (t_{1-\alpha/2,\,n-1} + t_{\text{power},\,n-1})\; s_\ell / \sqrt n ,

    so effects between :math:`e^{-\delta}` and :math:`e^{\delta}` could go unseen: this returns
    :math:`e^{\delta}` (≥ 1; NaN with fewer than 2 seeds). The normal-approximation formula with
    *t* quantiles, taking the observed :math:`s_\ell` for the true one.
    """
    from scipy import stats

    if n < 2 or not math.isfinite(sd):
        return math.nan
    t_alpha = float(stats.t.ppf(0.5 + confidence / 2, n - 1))
    t_power = float(stats.t.ppf(power, n - 1))
    return math.exp((t_alpha + t_power) * sd / math.sqrt(n))


def _check_pairs(what: str, *columns: Sequence[float]) -> None:
    if len({len(c) for c in columns}) > 1:
        raise ValueError(
            f"{what} needs pairs: {', '.join(str(len(c)) for c in columns)} values per column"
        )


def _censored(
    b: float, a: float, b_budget: float | None, a_budget: float | None
) -> tuple[float, float, str]:
    """One seed's pair with a miss charged at the budget: (base, arm, what was censored)."""
    if math.isinf(b) and math.isinf(a):
        return b, a, "both"
    if math.isinf(b) and b_budget is not None and math.isfinite(b_budget):
        return b_budget, a, "base"
    if math.isinf(a) and a_budget is not None and math.isfinite(a_budget):
        return b, a_budget, "arm"
    return b, a, ""


def paired_ratio(
    base: Sequence[float],
    arm: Sequence[float],
    confidence: float = CONFIDENCE,
    *,
    base_budget: Sequence[float] | None = None,
    arm_budget: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Geometric-mean ratio ``base/arm`` over paired seeds, its interval and tests.

    A missed target is ``inf``. Given the budgets (each run's whole cost: its passes or seconds
    at the end), a seed where one arm missed is censored at the budget: the arm that missed is
    charged its whole run, less than it would have needed, so the ratio understates the
    advantage of the arm that reached the target — a lower bound on ``base/arm`` where only the
    baseline missed (``base_missed``), an upper bound where only the arm missed
    (``arm_missed``). Seeds where both missed (``both_missed``), misses without a budget and
    non-positive values are ``left_out``.

    Returns ``n`` (pairs in the interval), those counts, the per-seed ``ratios``, ``ratio``
    (geometric mean), ``low``/``high`` (the interval; NaN with fewer than 2 pairs), ``p_value``
    (t), ``wilcoxon_p`` and ``wilcoxon_min_p`` (:func:`wilcoxon_signed_rank` of the
    log-ratios), ``sd_log`` and ``detectable`` (:func:`detectable_ratio`).
    """
    n_pairs = len(base)
    base_budget = base_budget if base_budget is not None else [math.inf] * n_pairs
    arm_budget = arm_budget if arm_budget is not None else [math.inf] * n_pairs
    _check_pairs("paired_ratio", base, arm, base_budget, arm_budget)
    ratios, kinds = [], {"base": 0, "arm": 0, "both": 0}
    for b, a, bb, ab in zip(base, arm, base_budget, arm_budget):
        b, a, kind = _censored(b, a, bb, ab)
        if kind:
            kinds[kind] += 1
        if math.isfinite(b) and math.isfinite(a) and b > 0 and a > 0:
            ratios.append(b / a)
    logs = [math.log(r) for r in ratios]
    mean, low, high, p = _t_interval(logs, confidence)
    sd = _mean_sd(logs)[1]
    wilcoxon = wilcoxon_signed_rank(logs)
    return {
        "n": len(ratios),
        "left_out": n_pairs - len(ratios),
        "base_missed": kinds["base"],
        "arm_missed": kinds["arm"],
        "both_missed": kinds["both"],
        "ratios": ratios,
        "ratio": math.exp(mean),
        "low": math.exp(low),
        "high": math.exp(high),
        "p_value": p,
        "wilcoxon_p": wilcoxon["p_value"],
        "wilcoxon_min_p": wilcoxon["min_p"],
        "sd_log": sd,
        "detectable": detectable_ratio(sd, len(ratios), confidence),
        "confidence": confidence,
    }


def paired_difference(
    base: Sequence[float], arm: Sequence[float], confidence: float = CONFIDENCE
) -> dict[str, Any]:
    """Mean paired difference ``arm − base`` (e.g. of the final metric) with its Student-t
    interval, two-sided p-value and :func:`wilcoxon_signed_rank` p; pairs with a non-finite
    value are left out (``left_out``)."""
    _check_pairs("paired_difference", base, arm)
    diffs = [a - b for b, a in zip(base, arm) if math.isfinite(a) and math.isfinite(b)]
    mean, low, high, p = _t_interval(diffs, confidence)
    return {
        "n": len(diffs),
        "left_out": len(base) - len(diffs),
        "differences": diffs,
        "difference": mean,
        "low": low,
        "high": high,
        "p_value": p,
        "wilcoxon_p": wilcoxon_signed_rank(diffs)["p_value"],
        "confidence": confidence,
    }


# ---------------------------------------------------------------------- sentences
def _significant(*xs: float, signed: bool = False) -> list[str]:
    """``xs`` as plain numbers, 3 significant digits or more where two different values would
    print alike."""
    sign = "+" if signed else ""
    for digits in range(3, 10):
        out = [f"{x:{sign}.{digits}g}" for x in xs]
        if all(a == b or out[i] != out[j] for i, a in enumerate(xs) for j, b in enumerate(xs)):
            return out
    return out


def difference_sentence(
    arm: str,
    base: str,
    result: Mapping[str, Any],
    what: str = "final accuracy",
    *,
    percent: bool = True,
    higher_is_better: bool = True,
) -> str:
    """What the interval of ``arm − base`` (from :func:`paired_difference`) can and cannot
    exclude: in percentage points for a fraction (``percent``), else in the metric's units."""
    n, low, high, d = result["n"], result["low"], result["high"], result["difference"]
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{arm} vs {base} ({what}): {n} paired seed(s) — too few for an interval."
    if percent:
        fmt = lambda *xs: [f"{100 * x:+.2f} pp" for x in xs]  # noqa: E731
    else:
        fmt = lambda *xs: _significant(*xs, signed=True)  # noqa: E731
    if low == high:
        return (
            f"{arm} vs {base} ({what}): {arm} − {base} = {fmt(d)[0]} in every one of {n} paired "
            "seeds — the same computation, or a constant effect; no interval."
        )
    sd, slow, shigh = fmt(d, low, high)
    head = (
        f"{arm} vs {base} ({what}): {arm} − {base} = {sd} [{slow} – {shigh}], "
        f"{100 * result['confidence']:g} % interval over {n} paired seeds, "
        f"p = {result['p_value']:.2g}."
    )
    better = "better" if higher_is_better else "worse"
    worse = "worse" if higher_is_better else "better"
    if low > 0:
        return f"{head} {arm} is higher, by between {slow[1:]} and {shigh[1:]} ({better})."
    if high < 0:
        return f"{head} {arm} is lower, by between {shigh[1:]} and {slow[1:]} ({worse})."
    return (
        f"{head} No difference detected: the run excludes {arm} higher by more than "
        f"{shigh[1:]} and lower by more than {slow[1:]}, and cannot tell smaller differences "
        "from seed-to-seed noise."
    )


def _pcts(*xs: float) -> list[str]:
    """``xs`` (fractions) as percentages with the precision they have: two significant digits
    each (no decimals from 10 % up), more where two different values would print alike — so a
    sub-1 % effect reads 0.12 %, never 0 %."""

    def decimals(x: float) -> int:
        v = abs(100 * x)
        return 0 if v == 0 or not math.isfinite(v) else max(0, 1 - math.floor(math.log10(v)))

    extra = 0
    while True:
        out = [f"{100 * x:.{decimals(x) + extra}f} %" for x in xs]
        clash = any(
            a != b and out[i] == out[j] for i, a in enumerate(xs) for j, b in enumerate(xs) if i < j
        )
        if not clash or extra >= 6:
            return out
        extra += 1


def _ratio_digits(*xs: float) -> int:
    """Decimals (3 or more) at which the different ratios among ``xs`` print differently."""
    for d in range(3, 8):
        shown = {f"{x:.{d}f}" for x in xs}
        if len(shown) == len(set(xs)):
            return d
    return 8


def censoring_note(arm: str, base: str, result: Mapping[str, Any]) -> str:
    """How the seeds with a missed target entered the ratio ("" when none did)."""
    parts = []
    if result.get("base_missed"):
        parts.append(
            f"{result['base_missed']} where only {base} missed, charged its whole run: "
            f"a lower bound on {base}/{arm} there"
        )
    if result.get("arm_missed"):
        parts.append(
            f"{result['arm_missed']} where only {arm} missed, charged its whole run: "
            f"an upper bound on {base}/{arm} there"
        )
    if result.get("both_missed"):
        parts.append(f"{result['both_missed']} where both missed, left out")
    other = result.get("left_out", 0) - result.get("both_missed", 0)
    if other:
        parts.append(f"{other} left out (a miss with no budget, or the target met before training)")
    return f" (seeds: {'; '.join(parts)})" if parts else ""


def _tests(result: Mapping[str, Any]) -> str:
    """The p-values of the t test and, where computed, of the Wilcoxon test."""
    text = f"p = {result['p_value']:.2g} (t)"
    wp = result.get("wilcoxon_p")
    if wp is not None and math.isfinite(wp):
        text += f", {wp:.2g} (Wilcoxon signed-rank, exact)"
        least = result.get("wilcoxon_min_p", 0.0)
        if least > 1 - result.get("confidence", CONFIDENCE):
            text += f" — with {result['n']} seeds its smallest possible p is {least:.2g}"
    return text


def _detectable(arm: str, base: str, result: Mapping[str, Any], what: str) -> str:
    """The smallest effect the run could have detected (:func:`detectable_ratio`)."""
    m = result.get("detectable")
    if m is None or not math.isfinite(m) or m <= 1:
        return ""
    fewer, more = _pcts(1 - 1 / m, m - 1)
    return (
        f" The smallest effect this run could detect ({100 * POWER:g} % power): {base}/{arm} "
        f"outside {1 / m:.3f}–{m:.3f}, i.e. {arm} needing {fewer} fewer or {more} more {what}."
    )


def effect_sentence(
    arm: str,
    base: str,
    result: Mapping[str, Any],
    what: str = "passes",
    untested: str = "",
) -> str:
    """What the interval of ``base/arm`` (from :func:`paired_ratio`) can and cannot exclude.
    ``untested``: why the comparison does not test the arm at all (said first, and no verdict)."""
    n, low, high, ratio = result["n"], result["low"], result["high"], result["ratio"]
    conf = f"{100 * result.get('confidence', CONFIDENCE):g} %"
    missed = censoring_note(arm, base, result)
    lead = f"{arm} vs {base} ({what}): "
    if untested:
        lead += f"{untested} — not a test; for the record: "
    if not (math.isfinite(low) and math.isfinite(high)):
        return (
            f"{lead}{n} paired seed(s){missed} — too few for an interval; this run cannot say "
            "whether they differ."
        )
    if low == high:
        return (
            f"{lead}the ratio {base}/{arm} is {ratio:.3f} in every one of {n} paired "
            f"seeds{missed} — the same computation, or a constant effect; no interval."
        )
    d = _ratio_digits(low, ratio, high)
    head = (
        f"{lead}ratio {base}/{arm} = {ratio:.{d}f} [{low:.{d}f}–{high:.{d}f}], {conf} interval "
        f"over {n} paired seeds{missed}, {_tests(result)}."
    )
    if untested:
        return head
    if low > 1:
        saved_low, saved_high, saved = _pcts(1 - 1 / low, 1 - 1 / high, 1 - 1 / ratio)
        return (
            f"{head} {arm} needs fewer {what}: the interval excludes 1 (no effect) and "
            f"excludes {arm} needing more than {saved_high} fewer {what}; the saving lies "
            f"between {saved_low} and {saved_high} (estimate {saved})."
        )
    if high < 1:
        cost_low, cost_high, cost = _pcts(1 / high - 1, 1 / low - 1, 1 / ratio - 1)
        return (
            f"{head} {arm} needs more {what}: the interval excludes 1 (no effect) and excludes "
            f"{arm} needing more than {cost_high} more {what}; the cost lies between "
            f"{cost_low} and {cost_high} (estimate {cost})."
        )
    fewer, more = _pcts(1 - 1 / high, 1 / low - 1)
    return (
        f"{head} No difference detected: the interval contains 1 (no effect). The run excludes "
        f"{arm} needing more than {fewer} fewer {what} and {arm} needing more than {more} more "
        f"{what}; smaller effects, either way, it cannot tell from seed-to-seed noise."
        + _detectable(arm, base, result, what)
    )
