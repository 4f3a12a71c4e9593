"""Quality against cost: every arm trained at several fractions of the budget.

A method that saves work must beat the baseline *at equal cost*, and the baseline's cost must be
spent well: at a budget fraction ``b`` every arm trains ``b`` of the configured iterations with
its learning-rate schedule compressed to them and fully decayed (``TrainConfig.budget``,
:func:`isgd.training.config.lr_factor`), not a long run cut short — the comparison of "No Train
No Gain" (Kaddour et al. 2023), where gains measured against under-decayed baselines vanished.

**Cost** is charged three ways (:func:`cost`): ``passes`` (every forward pass of a training
batch, extra iterations and stop checks included), modelled ``compute`` in training steps — a
backward pass (forward + backward) counts 1, a forward without backward ``forward_cost`` (≈ 1/3
of a step; ``benchmarks/bench_forward_only.py`` measures it for a model) — and ``seconds`` of
training (shared-machine noise included). A backward pass on part of a batch (selective
backprop's) counts that fraction of a pass: runs that make them record ``backward_batches``, the
backward passes so weighed (:mod:`isgd.training.relatives`); a selection forward is a forward
without backward over the whole batch.

**Saving at the target.** For one seed an arm's runs at the budgets give a curve of its final metric
against cost (on the validation split when the runs held one out: the split the target is set on;
the test split's final figures are the quality reported at each budget). :func:`crossing_cost` reads
where the curve reaches the target fixed in advance — linearly interpolated between the last budget
short of it and the first that reaches it; at the smallest budget already reached, that budget's
cost (an upper bound: the arm may need less); never reached, ``inf`` (censored at the largest
budget's cost by :func:`isgd.experiments.paired.paired_ratio`). The seeds' costs are paired with the
baseline's: the geometric-mean ratio ``base/arm`` with its interval, and the saving ``1 −
arm/base``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from isgd.experiments.paired import paired_difference, paired_ratio, reaches

__all__ = ["COSTS", "FORWARD_COST", "cost", "crossing_cost", "quality_vs_cost"]

FORWARD_COST = 1 / 3  # a forward pass in training steps (forward + backward ≈ 3 forwards)
COSTS = ("passes", "compute", "seconds")


def cost(record: Mapping[str, Any], kind: str, forward_cost: float = FORWARD_COST) -> float:
    """A run's whole cost: ``passes``, modelled ``compute`` (backward passes + ``forward_cost`` ×
    forwards without a backward) or training ``seconds``; a backward pass on part of a batch
    counts its fraction (``backward_batches``, where the record has it)."""
    if kind == "seconds":
        return float(record["train_seconds"])
    passes = float(record["passes"])
    backward = float(record.get("backward_passes", passes))
    weighed = record.get("backward_batches")
    weighed = backward if weighed is None or weighed != weighed else float(weighed)  # NaN: none
    if kind == "passes":
        return passes if weighed == backward else passes - backward + weighed
    if kind == "compute":
        return weighed + forward_cost * (passes - backward)
    raise ValueError(f"unknown cost {kind!r} (one of {', '.join(COSTS)})")


def crossing_cost(
    points: Sequence[tuple[float, float]], target: float, higher_is_better: bool = True
) -> tuple[float, str]:
    """Where a curve of ``(cost, final metric)`` points, in increasing cost, first reaches
    ``target``: ``(cost, how)`` with ``how`` ``"interpolated"``, ``"at the smallest budget"``
    (reached already there: at most that cost) or ``"missed"`` (``inf``)."""
    for i, (c, m) in enumerate(points):
        if not reaches(m, target, higher_is_better):
            continue
        if i == 0:
            return c, "at the smallest budget"
        c0, m0 = points[i - 1]
        if m == m0:  # pragma: no cover - m reaches, m0 does not: they differ
            return c, "interpolated"
        return c0 + (target - m0) / (m - m0) * (c - c0), "interpolated"
    return math.inf, "missed"


def quality_vs_cost(
    records: Sequence[Mapping[str, Any]],
    arms: Sequence[str],
    target: float,
    higher_is_better: bool = True,
    forward_cost: float = FORWARD_COST,
) -> dict[str, Any]:
    """Per arm and budget the median final metric and costs, the paired final-metric
    difference with the baseline (``arms[0]``) at the same budget, and per arm and cost the
    paired saving at ``target`` (:func:`crossing_cost` per seed, then
    :func:`~isgd.experiments.paired.paired_ratio`). ``records`` carry ``budget``."""
    budgets = sorted({float(r["budget"]) for r in records})
    seeds = sorted({int(r["seed"]) for r in records})
    by = {(r["arm"], float(r["budget"]), int(r["seed"])): r for r in records}
    base = arms[0]
    out: dict[str, Any] = {"budgets": budgets, "target": target, "arms": {}}
    for name in arms:
        per_budget = {}
        for b in budgets:
            rs = [by[name, b, s] for s in seeds if (name, b, s) in by]
            both = [s for s in seeds if (base, b, s) in by and (name, b, s) in by]
            pairs = [(by[base, b, s], by[name, b, s]) for s in both]
            per_budget[f"{b:g}"] = {
                "n": len(rs),
                "final_metric": _median([float(r["final_metric"]) for r in rs]),
                **{k: _median([cost(r, k, forward_cost) for r in rs]) for k in COSTS},
                "vs_base": paired_difference(
                    [float(p[0]["final_metric"]) for p in pairs],
                    [float(p[1]["final_metric"]) for p in pairs],
                )
                if name != base
                else None,
            }
        out["arms"][name] = {"per_budget": per_budget, "saving": {}}
        if name == base:
            continue
        for kind in COSTS:
            crossings = {
                (who, s): _seed_crossing(
                    by, who, s, budgets, kind, target, higher_is_better, forward_cost
                )
                for who in (base, name)
                for s in seeds
            }
            paired = [s for s in seeds if crossings[base, s] and crossings[name, s]]
            ratio = paired_ratio(
                [crossings[base, s][0] for s in paired],  # type: ignore[index]
                [crossings[name, s][0] for s in paired],  # type: ignore[index]
                base_budget=[crossings[base, s][2] for s in paired],  # type: ignore[index]
                arm_budget=[crossings[name, s][2] for s in paired],  # type: ignore[index]
            )
            ratio["how"] = {
                who: [crossings[who, s][1] for s in paired]  # type: ignore[index]
                for who in (base, name)
            }
            ratio["saving"] = 1 - 1 / ratio["ratio"] if ratio["n"] else math.nan
            out["arms"][name]["saving"][kind] = ratio
    return out


def _seed_crossing(
    by: Mapping[tuple[str, float, int], Mapping[str, Any]],
    arm: str,
    seed: int,
    budgets: Sequence[float],
    kind: str,
    target: float,
    higher_is_better: bool,
    forward_cost: float,
) -> tuple[float, str, float] | None:
    """``(crossing cost, how, largest budget's cost)`` of one arm and seed (None: a budget's
    run is missing)."""
    if any((arm, b, seed) not in by for b in budgets):
        return None
    points = [
        (cost(by[arm, b, seed], kind, forward_cost), _watched(by[arm, b, seed])) for b in budgets
    ]
    at, how = crossing_cost(points, target, higher_is_better)
    return at, how, points[-1][0]


def _watched(record: Mapping[str, Any]) -> float:
    """The final metric the target is read on: the validation split's when the run had one."""
    value = float(record.get("final_val_metric", math.nan))
    return float(record["final_metric"]) if math.isnan(value) else value


def _median(xs: Sequence[float]) -> float:
    ys = sorted(x for x in xs if not math.isnan(x))
    if not ys:
        return math.nan
    mid = len(ys) // 2
    return ys[mid] if len(ys) % 2 else (ys[mid - 1] + ys[mid]) / 2
