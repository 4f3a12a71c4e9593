"""``isgd compare``: several optimizer configurations (arms) × seeds, time and passes to a target.

Follows the benchmark literature (AlgoPerf): evaluation is untimed and on a fixed schedule shared by
all arms; time-to-target is the training seconds at the first evaluation that reaches the target,
``inf`` when the run misses it; arms are summarised by the median over seeds with the spread.
For one seed all arms share the model initialisation and the fixed batch order (both follow the
seed), and runs are interleaved (seed 0: A B, seed 1: B A, ...) so that machine drift hits every
arm alike. "X % faster" is reported both ways: ``T_base / T_arm`` and ``(T_base − T_arm) / T_base``.
The crossing of the target is interpolated between evaluations, and every arm is compared with the
baseline seed by seed, with a 95 % interval of the paired ratio (:mod:`isgd.experiments.paired`).
The records of finished runs and their summary are :mod:`isgd.experiments.records`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isgd.data import DataSplit, load_dataset
from isgd.experiments.budgets import FORWARD_COST
from isgd.experiments.records import (
    load_records,
    record_line,
    records_text,
    run_record,
    summarize,
    with_metric,
)
from isgd.training import runio
from isgd.training.config import ConfigError, TrainConfig, apply, parse_value
from isgd.training.relatives import base_family
from isgd.training.runio import RunError
from isgd.training.workload import ACCURACY, Metric, Workload, format_metric, load_workload

__all__ = [
    "Arm",
    "ComparisonPlan",
    "load_plan",
    "parse_arm",
    "retarget",
    "run_comparison",
    "tuning_budget",
]

log = logging.getLogger("isgd.experiments.compare")
PLAN_FILE = "plan.json"  # what the comparison runs, written first: --resume reads it
RANDOM_CONTROL = "random-skip@"  # the random control of arm A (--equal-compute): random-skip@A


@dataclass(frozen=True)
class Arm:
    """One optimizer configuration: a name and the config keys it sets."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)


def parse_arm(spec: str) -> Arm:
    """``NAME[:key=value,key=value]``; a NAME that is an optimizer sets ``optimizer`` too.

    >>> parse_arm("isgd-k2:optimizer=isgd,sigma_factor=2")
    Arm(name='isgd-k2', overrides={'optimizer': 'isgd', 'sigma_factor': 2})
    """
    from isgd.training.config import OPTIMIZERS

    name, _, rest = spec.partition(":")
    name = name.strip()
    if not name or any(c in name for c in "/\\ "):
        raise ConfigError(f"invalid arm: {spec!r} (expected NAME or NAME:key=value,...)")
    overrides: dict[str, Any] = {}
    if name in OPTIMIZERS:
        overrides["optimizer"] = name
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"invalid arm {spec!r}: {item!r} is not key=value")
        overrides[key.strip().replace("-", "_")] = parse_value(value.strip())
    if "optimizer" not in overrides:
        raise ConfigError(f"invalid arm {spec!r}: name an optimizer (e.g. {name}:optimizer=isgd)")
    return Arm(name, overrides)


# ---------------------------------------------------------------------- running
@dataclass
class ComparisonPlan:
    base: TrainConfig
    arms: list[Arm]
    seeds: list[int]
    target: float
    out: Path
    equal_compute: bool = False
    tune_lrs: list[float] = field(default_factory=list)
    tune_iters: int = 0  # 0: enough for ISGD to act (tuning_budget)
    data_dir: str | None = None
    # fractions of the run at which every arm trains, its schedule compressed (budgets.py)
    budgets: list[float] = field(default_factory=lambda: [1.0])
    forward_cost: float = FORWARD_COST  # a forward pass in training steps (modelled compute)
    # "baseline": the target is set from the baseline's seeds on the validation split once they
    # have run (baseline_target); "": ``target`` is given
    target_rule: str = ""

    def run_dir(self, arm: str, seed: int, budget: float = 1.0) -> Path:
        """Where one run lies: ``runs/ARM-seedS``, at a budget b < 1 ``runs/ARM-bB-seedS``."""
        name = f"{arm}-seed{seed}" if budget == 1 else f"{arm}-b{budget:g}-seed{seed}"
        return self.out / "runs" / name


def save_plan(plan: ComparisonPlan, tuned_lr: dict[str, float] | None = None) -> None:
    """``plan.json`` in the comparison directory: everything ``--resume`` needs."""
    runio.write_json(
        plan.out / PLAN_FILE,
        {
            "version": 1,
            "base": plan.base.to_dict(),
            "arms": [{"name": a.name, "overrides": a.overrides} for a in plan.arms],
            "seeds": plan.seeds,
            "target": plan.target,
            "equal_compute": plan.equal_compute,
            "tune_lrs": plan.tune_lrs,
            "tune_iters": plan.tune_iters,
            "data_dir": plan.data_dir,
            "budgets": plan.budgets,
            "forward_cost": plan.forward_cost,
            "target_rule": plan.target_rule,
            "tuned_lr": tuned_lr,
        },
    )


def load_plan(out: Path) -> tuple[ComparisonPlan, dict[str, float] | None]:
    """The plan of the comparison in ``out`` and its tuned learning rates (None: not tuned yet)."""
    path = out / PLAN_FILE
    if not path.is_file():
        raise RunError(f"{out} is not a comparison directory (no {PLAN_FILE}); nothing to resume")
    try:
        raw = json.loads(path.read_text())
        base = apply(TrainConfig(), raw["base"], str(path)).validate()
        arms = [Arm(a["name"], dict(a["overrides"])) for a in raw["arms"]]
        plan = ComparisonPlan(
            base,
            arms,
            [int(s) for s in raw["seeds"]],
            float(raw["target"]),
            out,
            bool(raw["equal_compute"]),
            [float(x) for x in raw["tune_lrs"]],
            int(raw["tune_iters"]),
            raw["data_dir"],
            [float(b) for b in raw.get("budgets", [1.0])],  # plans before budgets: the full run
            float(raw.get("forward_cost", FORWARD_COST)),
            str(raw.get("target_rule", "")),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise RunError(f"{path}: not a readable comparison plan ({e})") from e
    return plan, raw.get("tuned_lr")


def _arm_config(plan: ComparisonPlan, arm: Arm, seed: int, **extra: Any) -> TrainConfig:
    config = apply(plan.base, {**arm.overrides, **extra}, f"arm {arm.name}")
    config = dataclasses.replace(config, seed=seed, target=0.0 if plan.target_rule else plan.target)
    return config.validate()


def _n_held_out(n_train: int) -> int:
    """Training samples held out as the tuning split's test set."""
    return min(5000, n_train // 6)


def _train_size(plan: ComparisonPlan, data: DataSplit | None) -> int:
    if data is not None:
        return len(data.x_train)
    return len(load_workload(plan.base.workload, plan.seeds[0]).train)  # type: ignore[arg-type]


def _held_out(plan: ComparisonPlan, data: DataSplit | None, seed: int) -> dict[str, Any]:
    """The tuning split, as ``train``'s keyword: ``data`` or a (fresh) ``workload``."""
    if data is not None:
        return {"data": data.hold_out(_n_held_out(len(data.x_train)))}
    workload: Workload = load_workload(plan.base.workload, seed)
    return {"workload": workload.hold_out(_n_held_out(len(workload.train)))}  # type: ignore[arg-type]


def plan_metric(plan: ComparisonPlan) -> Metric:
    """The metric that judges the comparison (a workload's, or accuracy), after checking the
    target fits it (an accuracy is a fraction)."""
    metric = ACCURACY
    if plan.base.workload:
        metric = load_workload(plan.base.workload, plan.seeds[0]).judged_by
    if metric is ACCURACY and not plan.target_rule and not 0 < plan.target <= 1:
        raise ConfigError(f"invalid target: {plan.target:g} (an accuracy: a fraction in (0, 1])")
    return metric


def tuning_budget(plan: ComparisonPlan, data: DataSplit | None) -> int:
    """Iterations per tuning trial: ``plan.tune_iters``, or (0) three epochs of the tuning split
    — ISGD's chart fills in its first window, so a budget inside it would tune SGD twice.
    An explicit budget in which an ISGD arm cannot act is refused."""
    n = _train_size(plan, data)
    n_b = (n - _n_held_out(n)) // plan.base.batch_size
    configs = [_arm_config(plan, a, plan.seeds[0]) for a in plan.arms]
    isgd_windows = [c.chart_window(n_b) for c in configs if c.uses_isgd]
    if not plan.tune_iters:
        return max([1000, 3 * n_b, *(w + 2 * n_b for w in isgd_windows)])
    if isgd_windows and plan.tune_iters <= max(isgd_windows):
        raise ConfigError(
            f"invalid --tune-iters: {plan.tune_iters} (ISGD cannot act before its control chart "
            f"is full, after {max(isgd_windows)} iterations on the tuning split; give more, or "
            "leave it out for 3 epochs)"
        )
    return plan.tune_iters


def tune(plan: ComparisonPlan, data: DataSplit | None, metric: Metric, bar) -> dict[str, float]:
    """Per arm, the learning rate among ``plan.tune_lrs`` with the best held-out metric after
    :func:`tuning_budget` iterations (same budget for every arm; first seed)."""
    from isgd.training.lifecycle import train

    budget = tuning_budget(plan, data)
    sign = 1 if metric.higher_is_better else -1
    chosen: dict[str, float] = {}
    for arm in plan.arms:
        scores = {}
        for lr in plan.tune_lrs:
            config = _arm_config(plan, arm, plan.seeds[0], lr=lr, iters=budget, epochs=0.0)
            config = dataclasses.replace(config, eval_every=budget, tensorboard=False)
            run_dir = plan.out / "tune" / f"{arm.name}-lr{lr:g}"
            held_out = _held_out(plan, data, plan.seeds[0])  # a fresh model for every trial
            summary = train(config, run_dir, progress=False, **held_out)
            scores[lr] = sign * summary["final/test_metric"]
            if config.uses_isgd:
                log.info("tuning %s lr %g: %d triggers", arm.name, lr, summary["isgd/triggers"])
            bar.update(1)
        chosen[arm.name] = max(scores, key=lambda lr: (scores[lr], -lr))
        log.info(
            "tuned %s: lr %g (held-out %s)",
            arm.name,
            chosen[arm.name],
            ", ".join(
                f"{lr:g}: {format_metric(metric.name, sign * v)}" for lr, v in scores.items()
            ),
        )
    return chosen


def run_comparison(
    plan: ComparisonPlan, progress: bool | None = None, *, resume: bool = False
) -> dict[str, Any]:
    """Run every arm × seed (interleaved), then write records, summary, report and figures.

    ``resume``: ``plan.out`` holds a comparison started before (see :func:`load_plan`); its
    recorded runs are kept, an interrupted run continues from its checkpoint, the rest run. The
    plan's seeds may differ from the first invocation's: more seeds add runs, fewer summarise
    the first ones only. The directory is locked while this runs (:class:`runio.DirectoryLock`):
    a second process on it stops at once, naming this one.
    """
    from isgd.data.sources import data_dir_env

    lock = runio.DirectoryLock(plan.out, "comparison directory")
    try:
        with data_dir_env(plan.data_dir):  # a workload reads its data there too, on resume as well
            return _run_comparison(plan, progress, resume, lock)
    finally:
        lock.release()


def _run_comparison(
    plan: ComparisonPlan, progress: bool | None, resume: bool, lock: runio.DirectoryLock
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from isgd.training.lifecycle import check_new_run_dir
    from isgd.training.train import TrainingInterrupted

    done: dict[tuple[str, int, float], dict[str, Any]] = {}
    tuned: dict[str, float] | None = None
    if resume:
        lock.acquire()
        _, tuned = load_plan(plan.out)
        if (plan.out / "runs.jsonl").is_file():  # run_dir as the runs lie now (moved or not)
            for r in load_records(plan.out):
                budget = float(r.get("budget", 1.0))
                run_dir = plan.run_dir(r["arm"], r["seed"], budget)
                done[r["arm"], r["seed"], budget] = {**r, "run_dir": str(run_dir)}
        # rewritten whole: drops a line torn by a kill, so that appending goes on cleanly
        runio.atomic_write_text(plan.out / "runs.jsonl", records_text(list(done.values())))
    else:
        check_new_run_dir(plan.out)
    metric = plan_metric(plan)
    data = None if plan.base.workload else load_dataset(plan.base.dataset, plan.data_dir)
    if plan.tune_lrs and tuned is None:
        tuning_budget(plan, data)  # refuses a budget ISGD cannot act in, before any file
    plan.out.mkdir(parents=True, exist_ok=True)
    if not resume:
        lock.acquire()
        check_new_run_dir(plan.out)  # another process may have finished a comparison here
    save_plan(plan, tuned)
    n_tune = len(plan.arms) * len(plan.tune_lrs)
    n_isgd = sum(_arm_config(plan, a, plan.seeds[0]).uses_isgd for a in plan.arms)
    n_skipping = sum(skips_work(_arm_config(plan, a, plan.seeds[0])) for a in plan.arms)
    n_controls = n_isgd + n_skipping * len(plan.budgets) if plan.equal_compute else 0
    n_runs = len(plan.seeds) * (len(plan.arms) * len(plan.budgets) + n_controls)
    if progress is None:
        progress = sys.stderr.isatty()
    bar = tqdm(total=n_tune + n_runs, disable=not progress, unit="run", dynamic_ncols=True)
    if tuned is not None or not plan.tune_lrs:
        lrs = tuned or {}
        bar.update(n_tune)
    else:
        if (plan.out / "tune").exists():  # tuning was interrupted: it starts again
            import shutil

            shutil.rmtree(plan.out / "tune")
        lrs = tune(plan, data, metric, bar)
        save_plan(plan, lrs)

    arms = list(plan.arms)
    records: list[dict[str, Any]] = []
    raw = runio.JsonlWriter(plan.out / "runs.jsonl")
    started, ran = time.perf_counter(), 0

    # the finished runs: configuration, directory, and whether a control (--equal-compute)
    # trained it; a control may be a copy of any of them, an arm only of such a control (so
    # that two arms of one configuration, an A/A check, both train)
    computed: list[tuple[TrainConfig, Path, bool]] = []

    def run_one(arm: Arm, seed: int, budget: float = 1.0, control: bool = False) -> dict:
        nonlocal ran
        config, run_dir = (
            _run_config(plan, arm, seed, lrs, budget),
            plan.run_dir(arm.name, seed, budget),
        )
        record = done.get((arm.name, seed, budget))
        if record is None:  # a control and a run of its configuration: one computation, copied
            twins = (d for c, d, by in computed if c == config and (control or by))
            twin = next(twins, None)
            if twin is None:
                _train_or_continue(config, run_dir, data)
                ran += 1
            else:  # e.g. a random control of an arm that skipped nothing: the twin's computation
                _copy_run(twin, run_dir)
            target = math.nan if plan.target_rule else plan.target  # nan: set after the runs
            record = run_record(arm.name, seed, run_dir, target)
            record["budget"] = budget
            raw.write_line(record_line(record))
            raw.flush()
        # a trained control (an arm may copy it); a copy, also one an earlier invocation made,
        # is not one (so that an arm never copies a copy: two arms of one configuration train)
        computed.append((config, run_dir, control and not (run_dir / "copied_from.json").is_file()))
        records.append(record)
        bar.update(1)
        _log_run(record, len(records), n_runs, started, ran)
        return record

    full = max(plan.budgets)
    try:
        for i, seed in enumerate(plan.seeds):
            for budget in plan.budgets:
                for arm in arms if i % 2 == 0 else arms[::-1]:
                    record = run_one(arm, seed, budget)
                    config = _arm_config(plan, arm, seed)
                    if plan.equal_compute and budget == full and config.uses_isgd:
                        steps = record.get("backward_passes", record["passes"])
                        equal = _equal_compute_arm(arms, arm, steps, lrs, record["iterations"])
                        run_one(equal, seed, control=True)
                    if plan.equal_compute and skips_work(config):
                        random = _random_control(arm, config, record, lrs)
                        run_one(random, seed, budget, control=True)
    except TrainingInterrupted:
        log.info("comparison interrupted; continue it with: isgd compare --resume %s", plan.out)
        raise
    finally:
        bar.close()
        raw.close()
    if resume:  # runs.jsonl in plan order, the seeds left out of the plan dropped
        runio.atomic_write_text(plan.out / "runs.jsonl", records_text(records))
    names = [a.name for a in plan.arms] + sorted(
        {r["arm"] for r in records} - {a.name for a in plan.arms}
    )
    if plan.target_rule:  # every baseline seed has run: the target, and the records for it
        plan.target = baseline_target(plan, records, metric)
        save_plan(plan, lrs)
        records = [
            run_record(r["arm"], r["seed"], Path(r["run_dir"]), plan.target)
            | {"budget": r.get("budget", 1.0)}
            for r in records
        ]
        runio.atomic_write_text(plan.out / "runs.jsonl", records_text(records))
    at_full = [r for r in records if r.get("budget", 1.0) == full]
    result = summarize(at_full, names)
    result.update(
        target=plan.target,
        metric=metric.name,
        higher_is_better=metric.higher_is_better,
        seeds=plan.seeds,
        tuned_lr=lrs,
        config=plan.base.to_dict(),
        arms_spec={a.name: a.overrides for a in arms},
        budgets=plan.budgets,
        forward_cost=plan.forward_cost,
        target_rule=plan.target_rule,
    )
    if len(plan.budgets) > 1:
        result["quality_vs_cost"] = _quality_vs_cost(records, plan, metric.higher_is_better)
    _write_outputs(plan.out, result, at_full, names)
    return result


def baseline_target(plan: ComparisonPlan, records, metric: Metric) -> float:
    """``--target baseline``: the worst final validation metric over the baseline's seeds at
    the full budget — a quality every baseline seed reached by the end of its budget, fixed from
    the baseline alone, on data carved from the training set (the test split stays unread until
    the final report)."""
    base, full = plan.arms[0].name, max(plan.budgets)
    finals = [
        runio.read_json(Path(r["run_dir"]) / "summary.json")["final/val_metric"]
        for r in records
        if r["arm"] == base and r.get("budget", 1.0) == full
    ]
    target = min(finals) if metric.higher_is_better else max(finals)
    log.info(
        "target from the baseline: %s, the worst final validation %s of %s's %d seeds",
        format_metric(metric.name, target),
        metric.name,
        base,
        len(finals),
    )
    return float(target)


def _quality_vs_cost(records, plan: ComparisonPlan, higher_is_better: bool) -> dict[str, Any]:
    """:func:`budgets.quality_vs_cost` of the planned arms and their random controls (not the
    baseline-at-passes controls, trained at the full budget only)."""
    from isgd.experiments.budgets import quality_vs_cost

    names = _with_controls([a.name for a in plan.arms], records)
    planned = [with_metric(r) for r in records if r["arm"] in names]
    return quality_vs_cost(planned, names, plan.target, higher_is_better, plan.forward_cost)


def _run_config(
    plan: ComparisonPlan, arm: Arm, seed: int, lrs: dict[str, float], budget: float = 1.0
) -> TrainConfig:
    """The configuration ``arm`` trains with for ``seed`` at ``budget`` (its tuned rate, if any)."""
    extra: dict[str, Any] = {"lr": lrs[arm.name]} if arm.name in lrs else {}
    if budget != 1:
        extra["budget"] = budget
    return _arm_config(plan, arm, seed, **extra)


def _train_or_continue(config: TrainConfig, run_dir: Path, data: DataSplit | None) -> None:
    """Train one run, or finish it if an earlier invocation left it with a checkpoint."""
    from isgd.training.lifecycle import resume, train

    if (run_dir / "summary.json").is_file():
        return  # finished, but stopped before its record was written
    if (run_dir / "config.toml").is_file():
        resume(run_dir, data=data, progress=False)
        return
    train(config, run_dir, data=data, progress=False)


def _copy_run(twin: Path, run_dir: Path) -> None:
    """A control (``--equal-compute``) whose configuration equals a finished run's in every key
    — the same seed, data and schedule: the same computation, bit for bit where the kernels are
    deterministic, as on CPU — and a run whose configuration equals a finished control's are
    not trained twice: ``run_dir`` becomes a copy of ``twin`` (its checkpoints left out), with
    ``copied_from.json`` saying so. The copy is made beside ``run_dir`` and renamed into place:
    one stopped midway leaves no run behind."""
    import shutil

    if (run_dir / "summary.json").is_file():
        return
    log.info("%s: the configuration of %s, not trained again (a copy)", run_dir.name, twin.name)
    partial = run_dir.with_name(run_dir.name + ".copy")
    shutil.rmtree(partial, ignore_errors=True)  # a copy stopped midway
    shutil.copytree(twin, partial, ignore=shutil.ignore_patterns("checkpoints", ".lock", "*.tmp"))
    runio.write_json(
        partial / "copied_from.json",
        {"run": twin.name, "why": "identical configuration: the same computation"},
    )
    shutil.rmtree(run_dir, ignore_errors=True)  # e.g. the control's run, stopped midway
    partial.rename(run_dir)


def _write_outputs(out: Path, result: dict[str, Any], records, names: list[str]) -> None:
    from isgd.reporting.budget_report import quality_vs_cost_figure
    from isgd.reporting.compare_report import noise_notes, write_figures, write_report

    out.mkdir(parents=True, exist_ok=True)
    runio.write_json(out / "summary.json", result)
    figures = write_figures(out, records, names, noise_notes(result))
    budget_figure = quality_vs_cost_figure(result, out / "figures" / "quality_vs_cost.png")
    write_report(out, result, records, figures + ([budget_figure] if budget_figure else []))


def retarget(out: Path, target: float) -> Path:
    """Summarise a finished comparison again for another target accuracy, from its raw runs,
    into ``out/target-<target>/`` (the original report stays as it was)."""
    summary_path = out / "summary.json"
    if not summary_path.is_file():
        raise RunError(f"{out} has no summary.json (the comparison did not finish)")
    with runio.DirectoryLock(out, "comparison directory"):
        return _retarget(out, target, summary_path)


def _retarget(out: Path, target: float, summary_path: Path) -> Path:
    records = load_records(out)
    missing = [r["run_dir"] for r in records if not Path(r["run_dir"]).is_dir()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise RunError(
            f"{out}: its runs are not here ({missing[0]}{more}); --retarget reads every run's "
            "evaluations, so it needs the run directories training left (records copied "
            "without them, like docs/results, keep the summary they were written with)"
        )
    previous = runio.read_json(summary_path)
    lacking = [k for k in ("arms", "seeds", "tuned_lr", "config", "arms_spec") if k not in previous]
    if lacking:
        raise RunError(
            f"{summary_path} lacks {', '.join(lacking)} (written by an older isgd compare): "
            "--retarget cannot re-summarise it; run the comparison again"
        )
    names = list(previous["arms"])
    fresh = [
        run_record(r["arm"], r["seed"], Path(r["run_dir"]), target)
        | {"budget": r.get("budget", 1.0)}
        for r in records
    ]
    budgets = previous.get("budgets", [1.0])
    result = summarize([r for r in fresh if r["budget"] == max(budgets)], names)
    result.update({k: previous[k] for k in ("seeds", "tuned_lr", "config", "arms_spec")})
    result.update(
        target=target,
        metric=previous.get("metric", "accuracy"),  # comparisons before workloads: accuracy
        higher_is_better=previous.get("higher_is_better", True),
    )
    if len(budgets) > 1:
        from isgd.experiments.budgets import quality_vs_cost

        arms = _with_controls(list(previous["arms_spec"]), fresh)
        planned = [with_metric(r) for r in fresh if r["arm"] in arms]
        forward_cost = previous.get("forward_cost", FORWARD_COST)
        result.update(budgets=budgets, forward_cost=forward_cost)
        result["quality_vs_cost"] = quality_vs_cost(
            planned, arms, target, result["higher_is_better"], forward_cost
        )
    destination = out / f"target-{target:g}"
    _write_outputs(destination, result, [r for r in fresh if r["budget"] == max(budgets)], names)
    runio.atomic_write_text(destination / "runs.jsonl", records_text(fresh))
    return destination


def _equal_compute_arm(
    arms: list[Arm], arm: Arm, steps: int, lrs: dict[str, float], iterations: int
) -> Arm:
    """The baseline arm (with its tuned learning rate, if tuned) trained for as many iterations
    as ``arm`` made training steps (forward and backward): its passes, extra iterations included;
    for the forward-only variant, its backward passes (its forward-only steps are not charged, so
    the control gets a little less compute than the arm). ``iterations``: the arm's run's; the
    control is that run at budget ``steps / iterations``, its schedule compressed (or
    stretched) to its length and fully decayed, as the protocol's baselines are — not the full
    run cut short or run on at its final rate."""
    base = arms[0]
    overrides = {**base.overrides, "budget": steps / iterations}
    if base.name in lrs:
        overrides["lr"] = lrs[base.name]
    return Arm(f"{base.name}@{arm.name}-passes", overrides)


def skips_work(config: TrainConfig) -> bool:
    """The arm skips work by a rule (SkipStep, selective backprop, the forward-only variant):
    ``--equal-compute`` adds its random control (:func:`_random_control`)."""
    method = base_family(config.optimizer)[0]
    return method in ("skipstep", "selective-backprop") or config.lower_quantile > 0


def _random_control(
    arm: Arm, config: TrainConfig, record: dict[str, Any], lrs: dict[str, float]
) -> Arm:
    """``random-skip@ARM``: ``arm`` (its tuned learning rate too) with its rule replaced by a
    random one of the same size, measured from its run of the same seed and budget: SkipStep's
    skipped updates and the forward-only variant's forward-only steps become as many
    forward-only steps drawn at random (``random_skip_steps``), selective backprop's selection
    by loss a random one of as many samples on the same schedule (``random_keep``, no selection
    forward). A forward-only step costs SkipStep's control a backward pass less than a skipped
    update costs SkipStep: the same updates skipped, less compute."""
    method, base = base_family(config.optimizer)
    overrides = dict(arm.overrides)
    if arm.name in lrs:
        overrides["lr"] = lrs[arm.name]
    if method == "selective-backprop":
        overrides |= {"optimizer": base, "random_keep": config.keep if config.keep < 1 else 0.0}
    else:
        summary = runio.read_json(Path(record["run_dir"]) / "summary.json")
        skipped = summary.get("skipstep/skipped", 0) + summary.get("isgd/forward_only", 0)
        overrides |= {"random_skip_steps": skipped / summary["iterations"], "lower_quantile": 0.0}
        if method == "skipstep":
            overrides["optimizer"] = base
    return Arm(RANDOM_CONTROL + arm.name, overrides)


def _with_controls(names: list[str], records) -> list[str]:
    """``names`` and the random controls of theirs that ran (their cost curves are drawn too)."""
    ran = {r["arm"] for r in records}
    return names + [RANDOM_CONTROL + n for n in names if RANDOM_CONTROL + n in ran]


def _log_run(record: dict[str, Any], done: int, total: int, started: float, ran: int) -> None:
    """One line per run; the ETA extrapolates the runs trained by this invocation."""
    reached = (
        "target set once the baseline's seeds have run"
        if math.isnan(record["target"])
        else f"target at {record['time_to_target']:.1f} s / {record['passes_to_target']:.0f} passes"
        if math.isfinite(record["time_to_target"])
        else "target missed"
    )
    eta = (time.perf_counter() - started) / ran * (total - done) / 60 if ran else None
    final = float(record.get("final_metric", record["final_accuracy"]))
    log.info(
        "run %d/%d %s seed %d: %s, final %s, %s",
        done,
        total,
        record["arm"],
        record["seed"],
        reached,
        format_metric(record.get("metric", "accuracy"), final),
        f"ETA {eta:.0f} min"
        if eta is not None
        else f"a copy of {record['copied_from']}"
        if record.get("copied_from")
        else "recorded earlier",
    )
