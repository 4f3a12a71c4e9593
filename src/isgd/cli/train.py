"""``isgd train``: one run, a resumed run, or N processes (``--nproc``)."""

from __future__ import annotations

import argparse
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

from isgd.cli.common import (
    UsageError,
    add_config_flags,
    add_data_and_progress_flags,
    path_arg,
)
from isgd.training.config import FIELDS, PRESETS

log = logging.getLogger("isgd")
DIST_TIMEOUT = 300.0  # seconds


def add_parser(commands: Any) -> None:
    train = commands.add_parser("train", help="train a model with ISGD or a baseline")
    train.add_argument("--preset", choices=sorted(PRESETS), help="the paper's baseline solvers")
    train.add_argument(
        "--config", type=path_arg, metavar="FILE.toml", help="TOML file of configuration keys"
    )
    train.add_argument(
        "--out", type=path_arg, metavar="RUN_DIR", help="run directory (must not exist)"
    )
    train.add_argument(
        "--resume", type=path_arg, metavar="RUN_DIR", help="continue a run from its checkpoint"
    )
    add_data_and_progress_flags(train, "progress bar")
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
        metavar="SECONDS",
        help=f"a collective waiting this long for another rank fails the job (default "
        f"{DIST_TIMEOUT:g})",
    )
    add_config_flags(train)


def _default_run_dir(overrides: dict[str, Any], preset: str | None) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    workload = overrides.get("workload")
    if workload:  # FILE.py:FUNC -> FILE-FUNC
        target, _, func = str(workload).rpartition(":")
        name = f"{Path(target).stem if target.endswith('.py') else target}-{func}"
    else:
        name = preset or f"{overrides.get('dataset', 'mnist')}-{overrides.get('model', 'lenet')}"
    return Path("runs") / f"{stamp}-{name}-{overrides.get('optimizer', 'isgd')}"


def run(args: argparse.Namespace) -> int:
    import math

    from isgd.training import distributed
    from isgd.training import lifecycle as training
    from isgd.training.config import resolve_config
    from isgd.training.workload import format_metric

    overrides = {k: getattr(args, k) for k in FIELDS if k != "preset" and hasattr(args, k)}
    if args.resume:
        given = sorted(overrides) + [f for f in ("preset", "config", "out") if getattr(args, f)]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise UsageError(f"--resume continues the saved configuration; drop {flags}")
    world_size = distributed.env_world_size()
    if args.dist_timeout is None:
        args.dist_timeout = DIST_TIMEOUT
    elif world_size == 1 and (args.nproc or 1) == 1:
        raise UsageError("--dist-timeout applies to data-parallel runs (--nproc N or torchrun)")
    if not math.isfinite(args.dist_timeout) or args.dist_timeout <= 0:
        raise UsageError(f"--dist-timeout must be a number of seconds > 0, got {args.dist_timeout}")
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
        "done: test %s after %d iterations, %d passes, %.1f s of training; results in %s",
        format_metric(summary["metric/name"], summary["final/test_metric"]),
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
    from isgd.training.lifecycle import check_new_run_dir

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
