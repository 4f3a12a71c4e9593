"""The statistics of a comparison: where a run crosses the target, and paired per-seed ratios.

**Crossing.** Accuracy is evaluated every ``eval_every`` iterations, so "the first evaluation at
or above the target" is quantised to that grid (250 iterations were ≈ 5 % of the MNIST median).
:func:`crossing` interpolates linearly between the last evaluation below the target and the first
at or above it — the passes, seconds and iterations at which the straight line between those two
evaluations meets the target.

**Paired ratios.** For one seed every arm shares the initialisation and the batch order, so the
unit of comparison is the per-seed ratio :math:`r_s = T_{base,s} / T_{arm,s}` (> 1: the arm
needs less). Ratios are averaged on the log scale: with :math:`\\ell_s = \\log r_s` over
:math:`n` seeds,

.. math:: \\bar r = \\exp(\\bar\\ell), \\qquad
          \\exp\\big(\\bar\\ell \\pm t_{0.975,\\,n-1}\\, s_\\ell / \\sqrt n\\big)

is the geometric-mean ratio and its 95 % confidence interval (Student *t* on the log-ratios; the
two-sided p-value tests :math:`\\bar\\ell = 0`). A seed where one arm missed the target has no
finite ratio; it is counted, and the interval is over the seeds with both crossings.
:func:`effect_sentence` says in words which effects the interval excludes and which it cannot.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "crossing",
    "difference_sentence",
    "effect_sentence",
    "paired_difference",
    "paired_ratio",
]

CONFIDENCE = 0.95


def crossing(metrics: Sequence[Mapping[str, Any]], target: float) -> dict[str, float]:
    """Seconds, passes and iteration where the accuracy first reaches ``target``, interpolated
    between the two evaluations around it; ``inf`` if it never does. A first evaluation already
    at the target gives that evaluation's values (there is nothing below it to interpolate)."""
    keys = {"seconds": "time/train_seconds", "passes": "passes", "iteration": "iteration"}
    if metrics and "backward_passes" in metrics[0]:  # passes that ran a backward (variant)
        keys["backward_passes"] = "backward_passes"
    previous: Mapping[str, Any] | None = None
    for record in metrics:
        accuracy = record["test/accuracy"]
        if accuracy >= target:
            if previous is None or accuracy == previous["test/accuracy"]:
                return {k: float(record[v]) for k, v in keys.items()}
            frac = (target - previous["test/accuracy"]) / (accuracy - previous["test/accuracy"])
            return {
                k: float(previous[v]) + frac * (float(record[v]) - float(previous[v]))
                for k, v in keys.items()
            }
        previous = record
    return {k: math.inf for k in keys}


def _t_interval(values: Sequence[float], confidence: float) -> tuple[float, float, float, float]:
    """Mean, Student-t interval and two-sided p-value (mean = 0) of ``values``; the interval
    and p are NaN with fewer than 2 values."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n if n else math.nan
    if n < 2:
        return mean, math.nan, math.nan, math.nan
    sd = math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    if sd > 0:
        p = float(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))
    else:
        p = 0.0 if mean != 0 else 1.0
    return mean, mean - half, mean + half, p


def _check_pairs(what: str, base: Sequence[float], arm: Sequence[float]) -> None:
    if len(base) != len(arm):
        raise ValueError(f"{what} needs pairs: {len(base)} base values, {len(arm)} arm values")


def paired_ratio(
    base: Sequence[float], arm: Sequence[float], confidence: float = CONFIDENCE
) -> dict[str, Any]:
    """Geometric-mean ratio ``base/arm`` over paired seeds with its confidence interval.

    Returns ``n`` (pairs with both values finite and positive), ``censored`` (pairs where one or
    both arms missed), ``ratio`` (geometric mean), ``low``/``high`` (the interval; NaN with
    fewer than 2 pairs), ``p_value`` and the per-seed ``ratios``.
    """
    _check_pairs("paired_ratio", base, arm)
    ratios = [
        b / a
        for b, a in zip(base, arm)
        if math.isfinite(b) and math.isfinite(a) and b > 0 and a > 0
    ]
    mean, low, high, p = _t_interval([math.log(r) for r in ratios], confidence)
    return {
        "n": len(ratios),
        "censored": len(base) - len(ratios),
        "ratios": ratios,
        "ratio": math.exp(mean),
        "low": math.exp(low),
        "high": math.exp(high),
        "p_value": p,
        "confidence": confidence,
    }


def paired_difference(
    base: Sequence[float], arm: Sequence[float], confidence: float = CONFIDENCE
) -> dict[str, Any]:
    """Mean paired difference ``arm − base`` (e.g. of final accuracy) with its Student-t
    interval and two-sided p-value; pairs with a non-finite value are left out (``censored``)."""
    _check_pairs("paired_difference", base, arm)
    diffs = [a - b for b, a in zip(base, arm) if math.isfinite(a) and math.isfinite(b)]
    mean, low, high, p = _t_interval(diffs, confidence)
    return {
        "n": len(diffs),
        "censored": len(base) - len(diffs),
        "differences": diffs,
        "difference": mean,
        "low": low,
        "high": high,
        "p_value": p,
        "confidence": confidence,
    }


def difference_sentence(
    arm: str, base: str, result: Mapping[str, Any], what: str = "final accuracy"
) -> str:
    """What the interval of ``arm − base`` (a fraction, from :func:`paired_difference`) can and
    cannot exclude, in percentage points."""
    n, low, high, d = result["n"], result["low"], result["high"], result["difference"]
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{arm} vs {base} ({what}): {n} paired seed(s) — too few for an interval."
    pp = lambda x: f"{100 * x:+.2f} pp"  # noqa: E731
    if low == high:
        return (
            f"{arm} vs {base} ({what}): {arm} − {base} = {pp(d)} in every one of {n} paired "
            "seeds — the same computation, or a constant effect; no interval."
        )
    head = (
        f"{arm} vs {base} ({what}): {arm} − {base} = {pp(d)} [{pp(low)} – {pp(high)}], "
        f"{100 * result['confidence']:g} % interval over {n} paired seeds, "
        f"p = {result['p_value']:.2g}."
    )
    if low > 0:
        return f"{head} {arm} is higher, by between {pp(low)} and {pp(high)}."
    if high < 0:
        return f"{head} {arm} is lower, by between {pp(-high)[1:]} and {pp(-low)[1:]}."
    return (
        f"{head} No difference detected: the run excludes a gain above {pp(high)} and a loss "
        f"beyond {pp(low)}, and cannot tell smaller ones from seed-to-seed noise."
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


def effect_sentence(arm: str, base: str, result: Mapping[str, Any], what: str = "passes") -> str:
    """What the interval of ``base/arm`` (from :func:`paired_ratio`) can and cannot exclude."""
    n, low, high, ratio = result["n"], result["low"], result["high"], result["ratio"]
    conf = f"{100 * result.get('confidence', CONFIDENCE):g} %"
    missed = (
        f" ({result['censored']} seed(s) with a missed target left out)"
        if result.get("censored")
        else ""
    )
    if not (math.isfinite(low) and math.isfinite(high)):
        return (
            f"{arm} vs {base} ({what}): {n} paired seed(s) with both crossings{missed} — too few "
            "for an interval; this run cannot say whether they differ."
        )
    if low == high:
        return (
            f"{arm} vs {base} ({what}): the ratio {base}/{arm} is {ratio:.3f} in every one of "
            f"{n} paired seeds{missed} — the same computation, or a constant effect; no interval."
        )
    d = _ratio_digits(low, ratio, high)
    head = (
        f"{arm} vs {base} ({what}): ratio {base}/{arm} = {ratio:.{d}f} "
        f"[{low:.{d}f}–{high:.{d}f}], {conf} interval over {n} paired seeds{missed}, "
        f"p = {result['p_value']:.2g}."
    )
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
    )
