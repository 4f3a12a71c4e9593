"""SIGINT and SIGTERM as a request to stop at the next step boundary, and how to resume."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

__all__ = ["StopSignals", "resume_hint"]


def resume_hint(run_dir: Path, nproc: int = 1) -> str:
    """The command that continues ``run_dir`` (with as many processes as it had)."""
    if nproc > 1:
        return f"isgd train --nproc {nproc} --resume {run_dir} (or the same under torchrun)"
    return f"isgd train --resume {run_dir}"


class StopSignals:
    """While active, SIGINT and SIGTERM only record a request to stop (``signum``), which the
    loop honours at the next step boundary; a second SIGINT interrupts at once. Handlers are
    installed only in the main thread (elsewhere Python cannot) and restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:  # e.g. nohup: stay ignored
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: do not wait for the step boundary
        if self.signum is None:
            self.signum = signum

    def __exit__(self, *_exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def votes(self) -> list[float]:
        """This process's request as ``[SIGINT?, SIGTERM?]``, for an all-reduce across ranks."""
        return [float(self.signum == signal.SIGINT), float(self.signum == signal.SIGTERM)]

    @staticmethod
    def from_votes(summed: list[float]) -> int | None:
        """The request every rank honours: SIGINT if any rank has one, else SIGTERM if any."""
        return signal.SIGINT if summed[0] > 0 else signal.SIGTERM if summed[1] > 0 else None
