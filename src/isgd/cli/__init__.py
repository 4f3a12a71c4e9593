"""``isgd`` command line: thin — parse, call the library, turn errors into one line and an exit
code (``isgd.errors``). One module per subcommand (``data``, ``train``, ``compare``,
``batch_study``, ``plot``, ``table``), each with ``add_parser(commands)`` and ``run(args) -> int``.

isgd data fetch NAME [--data-dir DIR]
isgd data pack SRC DST [--size S] [--workers N]   (an image folder → packed:DST, e.g. ImageNet)
isgd train [--preset NAME] [--config FILE.toml] [--optimizer ...] [--iters N | --epochs N] ...
isgd train --resume RUN_DIR
isgd train --nproc N ...            (or: torchrun --nproc-per-node N -m isgd train ...)
isgd plot RUN_DIR... [--out DIR]
isgd table COMPARISON_DIR... [--cost compute|passes|seconds] [--out FILE.md]
isgd batch-study [--quick] [--out DIR]
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from isgd.cli import batch_study, compare, data, plot, table, train
from isgd.cli.common import DIST_FAILED, USAGE_ERROR, Parser
from isgd.data.sources import data_dir_env
from isgd.errors import DataError, DistributedError, IsgdError

log = logging.getLogger("isgd")

# one module per subcommand, each with add_parser(commands) and run(args) -> exit code
COMMANDS = {
    "data": data,
    "train": train,
    "compare": compare,
    "batch-study": batch_study,
    "plot": plot,
    "table": table,
}


def build_parser() -> Parser:
    parser = Parser(prog="isgd", description="Inconsistent Stochastic Gradient Descent")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("--version", action="version", version=f"isgd {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in COMMANDS.values():
        module.add_parser(commands)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("isgd")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "(not installed)"


def _training_interrupted() -> tuple[type[BaseException], ...]:
    """The trainer's stop on a signal, when a command has imported it (usage errors do not)."""
    trainer = sys.modules.get("isgd.training.train")
    return (trainer.TrainingInterrupted,) if trainer else ()


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
        command = COMMANDS[args.command].run
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm(loggers=[root]), data_dir_env(getattr(args, "data_dir", None)):
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
    # a missing application dependency (ModuleNotFoundError) goes up to isgd.console.main


def _rank_count() -> int:
    from isgd.training.distributed import env_world_size

    return env_world_size()
