"""``isgd train --nproc N``: run ``torchrun --standalone --nproc-per-node N -m isgd train ...``.

The launcher is torch's own elastic agent (``torch.distributed.run``), run in this process: it
starts N workers on this machine, each a ``python -m isgd train`` with torchrun's environment
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``, ...), watches them, and stops the
others as soon as one fails. Here its failure report becomes a :class:`DistributedError`, which
the command line prints in one line and exits with (4).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from isgd.errors import DistributedError
from isgd.training import runio
from isgd.training.distributed import first_line

__all__ = ["launch_local", "worker_argv"]

log = logging.getLogger("isgd.training.launch")

DIST_FAILED = 4  # exit code: a rank died, hung or disconnected
# exit codes of a worker that printed the cause itself: bad input, non-finite, interrupted
_OWN_REPORT = (2, 3, 130, 143)


def worker_argv(argv: Sequence[str], *, out: str | None, threads: bool) -> list[str]:
    """``argv`` without ``--nproc``, with ``--out`` (so that every rank names the same run
    directory) and ``--threads 1`` added when asked to."""
    result: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        result.append(arg)
    if out is not None:
        result += ["--out", out]
    if threads:
        result += ["--threads", "1"]
    return result


def launch_local(argv: Sequence[str], nproc: int, run_dir: Path) -> int:
    """Run ``isgd <argv>`` as ``nproc`` processes on this machine; returns the exit code, or
    raises :class:`DistributedError` when a worker failed without saying why or the launcher
    itself failed.

    On CPU each worker gets ``OMP_NUM_THREADS=1`` (unless set) and, on Linux, gloo is kept on the
    loopback interface (``GLOO_SOCKET_IFNAME=lo`` unless set).
    """
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if sys.platform.startswith("linux") and Path("/sys/class/net/lo").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    for name in list(logging.root.manager.loggerDict):  # the agent's own notes: our line says it
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    args = torchrun.parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "isgd", *argv])
    log.info(
        "launching %d processes: torchrun --standalone --nproc-per-node %d -m isgd %s",
        nproc,
        nproc,
        " ".join(argv),
    )
    try:
        torchrun.run(args)
    except ChildFailedError as err:
        return _report_failure(err, nproc, run_dir)
    except SignalException as err:  # Ctrl-C or SIGTERM to the launcher: the workers got it too
        return 128 + int(err.sigval)
    except Exception as err:  # the launcher itself failed: rendezvous, ports, spawning
        raise DistributedError(
            f"could not run {nproc} processes under torchrun "
            f"({type(err).__name__}: {first_line(err)})"
        ) from err
    return 0


def _report_failure(err, nproc: int, run_dir: Path) -> int:
    """The exit code when a worker already reported the cause (bad input, a non-finite loss, an
    interruption); else :class:`DistributedError` saying which rank ended and how, and what to
    do."""
    failures = sorted(err.failures.items())
    for _, failure in failures:
        if failure.exitcode in _OWN_REPORT:
            return failure.exitcode
    ended = [(r, f) for r, f in failures if f.exitcode != DIST_FAILED]
    # SIGTERM is how the launcher stops the other ranks once one failed: not a cause
    causes = [(r, f) for r, f in ended if f.exitcode != -signal.SIGTERM] or ended
    if not causes:  # only process-group errors, each printed by its rank
        return DIST_FAILED
    parts = []
    for rank, failure in causes:
        if failure.exitcode < 0:
            how = f"ended by {signal.Signals(-failure.exitcode).name}"
        else:
            how = f"exited with code {failure.exitcode}"
            if failure.exitcode == 1:
                how += " (its traceback is above)"
        parts.append(f"rank {rank} (pid {failure.pid}) {how}")
    last = runio.latest_checkpoint(run_dir / "checkpoints")
    kept = f"the last checkpoint is {last}" if last else "there is no checkpoint yet"
    raise DistributedError(
        f"{', '.join(parts)}, so the job of {nproc} processes stopped; {kept}; "
        f"resume with: isgd train --nproc {nproc} --resume {run_dir}"
    )
