"""``isgd batch-study``: the best batch size for this machine."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from isgd.cli.common import (
    nonempty_int_list,
    path_arg,
)
from isgd.training.config import OPTIMIZERS, PRESETS

log = logging.getLogger("isgd")


def add_parser(commands: Any) -> None:
    study = commands.add_parser(
        "batch-study",
        help="throughput, sync cost and time to target against batch size on this machine",
    )
    study.add_argument(
        "--out", type=path_arg, metavar="DIR", help="study directory (must not exist)"
    )
    study.add_argument("--quick", action="store_true", help="a reduced grid (a few minutes)")
    study.add_argument("--preset", choices=sorted(PRESETS), help="default lenet-mnist")
    study.add_argument("--dataset", help="default: the preset's")
    study.add_argument("--model", help="default: the preset's")
    study.add_argument("--optimizer", choices=OPTIMIZERS, help="of the target runs (isgd)")
    study.add_argument(
        "--lr", type=float, help="lr at the preset's batch, scaled linearly (preset's)"
    )
    study.add_argument("--procs", type=nonempty_int_list, metavar="K,K,...", help="default 1,2")
    study.add_argument("--threads", type=int, help="torch threads per process (default 1)")
    study.add_argument(
        "--batch-sizes", type=nonempty_int_list, metavar="B,B,...", help="per-process batches timed"
    )
    study.add_argument(
        "--allreduce-sizes", type=nonempty_int_list, metavar="N,N,...", help="floats all-reduced"
    )
    study.add_argument(
        "--target-batches", type=nonempty_int_list, metavar="B,B,...", help="global batches trained"
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
    study.add_argument(
        "--data-dir", type=path_arg, help="default: $ISGD_DATA_DIR or ~/.cache/isgd/data"
    )


def run(args: argparse.Namespace) -> int:
    from isgd.experiments.batch_study import run_from_args

    result = run_from_args(args)
    out = Path(result["plan"]["out"])
    print((out / "report.md").read_text())
    best = result["combined"]["best"]
    log.info(
        "report, figures and raw data in %s%s",
        out,
        f"; best batch size {best['global_batch']}" if best else "",
    )
    return 0
