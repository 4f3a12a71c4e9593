"""``isgd compare``: arms × seeds, ``--resume`` and ``--retarget``."""

from __future__ import annotations

import argparse
import logging
import math
from datetime import datetime
from pathlib import Path
from typing import Any

from isgd.cli.common import (
    UsageError,
    add_config_flags,
    add_data_and_progress_flags,
    nonempty_int_list,
    path_arg,
)
from isgd.training.config import FIELDS, PRESETS

log = logging.getLogger("isgd")
MAX_SEEDS = 10_000  # --seeds N: runs per arm (each a training run); more is a typo
MIN_BASELINE_SEEDS = 3  # --target baseline: the fewest seeds a target is set from


def add_parser(commands: Any) -> None:
    compare = commands.add_parser(
        "compare", help="arms x seeds: time and passes to a target accuracy, with a report"
    )
    compare.add_argument("--preset", choices=sorted(PRESETS), help="base configuration")
    compare.add_argument(
        "--config", type=path_arg, metavar="FILE.toml", help="base configuration keys"
    )
    compare.add_argument(
        "--arm",
        action="append",
        dest="arms",
        metavar="NAME[:key=value,...]",
        help="an arm; the first is the baseline (default: sgd, isgd)",
    )
    compare.add_argument("--seeds", type=int, help="seeds 0..N-1 (default 5)")
    compare.add_argument(
        "--seed-list", type=nonempty_int_list, metavar="S,S,...", help="explicit seeds"
    )
    compare.add_argument(
        "--target",
        type=_target_arg,
        metavar="VALUE|baseline",
        help="the metric's target: an accuracy as a fraction (default: the preset's), or the "
        "workload metric's value (required with --workload); or baseline: the worst final "
        "validation metric of the baseline's seeds (needs --validation N and 3 seeds or more; the "
        "protocol asks for 5)",
    )
    compare.add_argument(
        "--budgets",
        metavar="F,F,...",
        help="train every arm at these fractions (0, 1] of the run, each with its schedule "
        "compressed and fully decayed; the report draws the final metric against cost and "
        "reads the saving at the target (default 1: the run as configured)",
    )
    compare.add_argument(
        "--forward-cost",
        type=float,
        metavar="R",
        help="a forward pass in training steps, for the modelled compute (default 1/3; "
        "benchmarks/bench_forward_only.py measures it for a model)",
    )
    compare.add_argument(
        "--tune-lrs",
        metavar="LR,LR,...",
        help="tune each arm's learning rate over these rates (> 0) first (equal budget)",
    )
    compare.add_argument(
        "--tune-iters",
        type=int,
        help="iterations per tuning trial (default: 3 epochs of the tuning split, so that "
        "ISGD acts; a budget inside ISGD's first window is refused)",
    )
    compare.add_argument(
        "--equal-compute",
        action="store_true",
        help="also train the baseline for as many iterations as each ISGD arm made training "
        "steps (its passes; with --lower-quantile, its backward passes), its schedule "
        "compressed or stretched to them and fully decayed, and each arm that "
        "skips work (skipstep, selective-backprop, lower_quantile) with a random selection of "
        "the same size (arm random-skip@ARM, at every budget)",
    )
    compare.add_argument(
        "--out", type=path_arg, metavar="DIR", help="comparison directory (must not exist)"
    )
    compare.add_argument(
        "--resume",
        type=path_arg,
        metavar="DIR",
        help="continue an interrupted comparison DIR (its plan; --seeds/--seed-list may change "
        "the seeds: more add runs, fewer summarise the first ones)",
    )
    compare.add_argument(
        "--retarget",
        type=path_arg,
        metavar="DIR",
        help="summarise a finished comparison DIR again for --target (no training)",
    )
    add_data_and_progress_flags(compare, "progress bar over all runs")
    add_config_flags(compare, skip=("target",))  # --target above: the comparison's target


def run(args: argparse.Namespace) -> int:
    from isgd.experiments.budgets import FORWARD_COST
    from isgd.experiments.compare import ComparisonPlan, parse_arm, run_comparison, skips_work
    from isgd.training.config import apply, load_toml, resolve_config

    overrides = {
        k: getattr(args, k) for k in FIELDS if k not in ("preset", "target") and hasattr(args, k)
    }
    _refuse_contradictions(args, overrides)
    if args.retarget:
        from isgd.experiments.compare import retarget

        _check_comparison_dir(Path(args.retarget))
        _check_retarget(Path(args.retarget), args.target)
        destination = retarget(Path(args.retarget), args.target)
        print((destination / "report.md").read_text().split("\n## Runs")[0])
        log.info("report and figures for target %g in %s", args.target, destination)
        return 0
    if args.resume:
        return _resume_comparison(args, overrides)
    base = resolve_config(args.preset, args.config, overrides)
    for spec in args.arms or []:
        _refuse_repeated_keys(spec)
    arms = [parse_arm(spec) for spec in (args.arms or ["sgd", "isgd"])]
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise UsageError(f"arm names must differ: {', '.join(names)}")
    file_keys = load_toml(args.config) if args.config else {}
    for key, instead in (("optimizer", "each --arm names its optimizer"), ("seed", "--seeds")):
        if key in file_keys:
            raise UsageError(
                f"{args.config} sets {key}, which isgd compare replaces ({instead}); remove it "
                "from the file"
            )
    for arm in arms:  # every arm's configuration must be valid before anything runs
        if "seed" in arm.overrides:
            raise UsageError(
                f"arm {arm.name} sets seed: all arms share the seeds (--seeds / --seed-list), "
                "which is what pairs them"
            )
        config = apply(base, arm.overrides, f"arm {arm.name}").validate()
        if config.uses_isgd and not config.epochs and config.window > config.iters:
            raise UsageError(  # as isgd train refuses it, before any arm has run
                f"arm {arm.name}: window {config.window} is longer than the run's "
                f"{config.iters} iterations: ISGD would never act; lower the window"
            )
    configs = [apply(base, a.overrides, a.name) for a in arms]
    if args.equal_compute and not any(c.uses_isgd or skips_work(c) for c in configs):
        raise UsageError(
            "--equal-compute matches an ISGD arm's passes or an arm's skipped work, but no arm "
            "uses ISGD or skips work"
        )
    n_seeds = 5 if args.seeds is None else args.seeds
    _check_seeds(args)
    seeds = args.seed_list if args.seed_list else list(range(n_seeds))
    has_target = args.target is not None or {"target", "target_accuracy"} & set(file_keys)
    if not has_target and base.workload:
        raise UsageError(
            f"{args.preset or base.workload} sets no target: give it with --target VALUE (the "
            "value of "
            "the workload's metric that counts as trained)"
        )
    if not has_target and base.dataset.startswith("idx:"):
        raise UsageError(  # the preset's target is LeNet/MNIST's, meaningless for another set
            f"--dataset {base.dataset}: give the target accuracy with --target ACC (a fraction); "
            "the preset's target is for its own data set"
        )
    target_rule = "baseline" if args.target == "baseline" else ""
    if target_rule:
        if not base.validation:
            raise UsageError(
                "--target baseline is set on a validation split: give --validation N (training "
                "samples held out, e.g. 5000)"
            )
        _check_baseline_seeds(len(seeds))
        target = 0.0
    else:
        target = args.target if args.target is not None else base.target
        if not (math.isfinite(target) and target > 0):
            raise UsageError(f"--target must be a number > 0, got {target} (e.g. 0.99 accuracy)")
    tune_lrs, tune_iters = [], 0 if args.tune_iters is None else args.tune_iters
    if args.tune_lrs:
        try:
            tune_lrs = [float(v) for v in args.tune_lrs.split(",") if v.strip()]
        except ValueError:
            raise UsageError(f"--tune-lrs: not a list of numbers: {args.tune_lrs!r}") from None
        bad = [lr for lr in tune_lrs if not (math.isfinite(lr) and lr > 0)]
        if not tune_lrs or bad:
            raise UsageError(
                f"--tune-lrs: learning rates must be finite numbers > 0, got {args.tune_lrs!r}"
            )
        if args.tune_iters is not None and tune_iters < 1:
            raise UsageError(f"--tune-iters must be >= 1, got {tune_iters}")
    budgets = _budgets(args.budgets)
    forward_cost = FORWARD_COST if args.forward_cost is None else args.forward_cost
    if not (math.isfinite(forward_cost) and 0 < forward_cost <= 1):
        raise UsageError(f"--forward-cost must be in (0, 1] training steps, got {forward_cost}")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("runs") / f"compare-{stamp}"
    plan = ComparisonPlan(
        base,
        arms,
        seeds,
        target,
        out,
        args.equal_compute,
        tune_lrs,
        tune_iters,
        args.data_dir,
        budgets,
        forward_cost,
        target_rule,
    )
    run_comparison(plan, progress=args.progress)
    return _show_report(out)


def _target_arg(text: str) -> float | str:
    if text == "baseline":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number or 'baseline', got {text!r}") from None


def _budgets(text: str | None) -> list[float]:
    """``--budgets 0.25,0.5,1``: distinct fractions in (0, 1], in increasing order."""
    if text is None:
        return [1.0]
    try:
        budgets = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--budgets: not a list of numbers: {text!r}") from None
    if not budgets or any(not 0 < b <= 1 for b in budgets):
        raise UsageError(f"--budgets: fractions of the run in (0, 1], got {text!r}")
    if len(set(budgets)) != len(budgets):
        raise UsageError(f"--budgets repeats a budget: {text!r}")
    return sorted(budgets)


def _refuse_repeated_keys(spec: str) -> None:
    """``--arm NAME:k=v,k=w``: a key given twice in one arm (the last would silently win)."""
    keys = [
        item.partition("=")[0].strip().replace("-", "_")
        for item in spec.partition(":")[2].split(",")
        if item.strip()
    ]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise UsageError(
            f"--arm {spec}: sets {', '.join(repeated)} more than once; give each key once"
        )


def _check_seeds(args: argparse.Namespace) -> None:
    """``--seeds N``: 1 <= N <= MAX_SEEDS; ``--seed-list``: each 0 <= seed < 2**32 (a run's)."""
    from isgd.training.config import MAX_SEED

    if args.seeds is not None and not 1 <= args.seeds <= MAX_SEEDS:
        raise UsageError(f"--seeds must be >= 1 and <= {MAX_SEEDS}, got {args.seeds}")
    bad = [s for s in args.seed_list or [] if not 0 <= s < MAX_SEED]
    if bad:
        raise UsageError(
            f"--seed-list: seeds must be integers with 0 <= seed < 2**32, got {bad[0]}"
        )


def _check_baseline_seeds(n: int) -> None:
    """``--target baseline`` from ``n`` seeds: fewer than the minimum refused, fewer than the
    protocol asks for warned of (the report says so too)."""
    from isgd.reporting.compare_report import ADVISED_BASELINE_SEEDS

    if n < MIN_BASELINE_SEEDS:
        raise UsageError(f"--target baseline needs {MIN_BASELINE_SEEDS} seeds or more, got {n}")
    if n < ADVISED_BASELINE_SEEDS:
        log.warning(
            "--target baseline from %d seeds: the protocol asks for %d or more (a target from "
            "fewer seeds is noisier; say so when you report it)",
            n,
            ADVISED_BASELINE_SEEDS,
        )


def _check_comparison_dir(path: Path) -> None:
    """``--retarget DIR`` reads a comparison: anything else is named as such."""
    from isgd.experiments.compare import PLAN_FILE

    if not path.exists():
        raise UsageError(f"--retarget {path}: no such directory")
    if not path.is_dir():
        raise UsageError(f"--retarget {path} is a file, not a comparison directory")
    if not (path / PLAN_FILE).is_file() and not (path / "summary.json").is_file():
        raise UsageError(
            f"--retarget {path} is not a comparison directory (no {PLAN_FILE} or summary.json); "
            "give the --out of an isgd compare"
        )


def _check_retarget(path: Path, target: float | None) -> None:
    """``--retarget DIR --target VALUE``: a target for the comparison's metric."""
    from isgd.training import runio

    summary = path / "summary.json"
    metric = runio.read_json(summary).get("metric", "accuracy") if summary.is_file() else ""
    if not isinstance(target, float) or not (math.isfinite(target) and target > 0):
        raise UsageError(f"--retarget needs --target, a number > 0, got {target}")
    if metric == "accuracy" and target > 1:
        raise UsageError(f"--retarget {path}: the target is an accuracy, a fraction in (0, 1]")


def _given(args: argparse.Namespace, overrides: dict[str, Any], *more: str) -> list[str]:
    """The flags on the command line that define a new comparison (and ``more``)."""
    names = [*overrides, "preset", "config", "arms", "out", "tune_lrs", "equal_compute"]
    names += ["budgets", "forward_cost", *more]
    return [
        "--arm" if name == "arms" else f"--{name.replace('_', '-')}"
        for name in names
        if name in overrides or getattr(args, name, None) not in (None, False, [])
    ]


def _refuse_contradictions(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    """Options that would be ignored, or that contradict each other, stop the command."""
    if "optimizer" in overrides:
        raise UsageError("--optimizer: each arm names its optimizer (--arm NAME:optimizer=...)")
    if "seed" in overrides:
        raise UsageError("--seed: a comparison runs --seeds N (0..N-1) or --seed-list S,S,...")
    if "budget" in overrides:
        raise UsageError(
            "--budget: a comparison trains at --budgets F,F,... (fractions of the run)"
        )
    if args.seeds is not None and args.seed_list:
        raise UsageError("--seeds and --seed-list: give one")
    if args.seed_list and len(set(args.seed_list)) != len(args.seed_list):
        raise UsageError(f"--seed-list repeats a seed: {args.seed_list}")
    if args.resume and args.retarget:
        raise UsageError("--resume and --retarget: give one (retarget a finished comparison)")
    if args.tune_iters is not None and not args.tune_lrs and not args.resume:
        raise UsageError("--tune-iters sets the budget of --tune-lrs, which is not given")
    if args.retarget:
        extra = _given(args, overrides, "seeds", "seed_list")
        if extra:
            raise UsageError(
                f"--retarget only re-reads finished runs for --target; drop {', '.join(extra)}"
            )


def _resume_comparison(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    import dataclasses

    from isgd.experiments.compare import load_plan, run_comparison

    given = _given(args, overrides, "target", "tune_iters")
    if given:
        raise UsageError(
            f"--resume continues the saved plan; drop {', '.join(given)} (only --seeds or "
            "--seed-list may change)"
        )
    _check_seeds(args)
    plan, _ = load_plan(Path(args.resume))
    seeds = args.seed_list or (plan.seeds if args.seeds is None else list(range(args.seeds)))
    if plan.target_rule:  # the target is set from the seeds resumed: the fresh path's minimum
        _check_baseline_seeds(len(seeds))
    plan = dataclasses.replace(plan, seeds=seeds, data_dir=args.data_dir or plan.data_dir)
    run_comparison(plan, progress=args.progress, resume=True)
    return _show_report(plan.out)


def _show_report(out: Path) -> int:
    print((out / "report.md").read_text().split("\n## Runs")[0])
    log.info("report, figures and raw records in %s", out)
    return 0
