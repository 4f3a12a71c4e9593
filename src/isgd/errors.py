"""The errors of isgd: one hierarchy, each a one-line message for the user, with an exit code.

::

    IsgdError                    exit 2: bad input of any kind, nothing lost
    ├── UsageError               a command line that cannot be run
    ├── ConfigError (ValueError) a configuration key or value
    ├── DataError                a data set missing, corrupt or not fetchable
    ├── PlotError                run directories that cannot be plotted
    ├── RunError                 a run directory, checkpoint or comparison
    │   ├── WriteError           a file that could not be written (what was written is intact)
    │   ├── CorruptCheckpoint    a checkpoint damaged, unreadable or another run's
    │   ├── NonFiniteError       exit 3: the loss or the weights became non-finite
    │   └── DistributedError     exit 4: a rank died, hung or the ranks disagree
    └── TrainingInterrupted      exit 128 + signal: SIGINT/SIGTERM stopped a run, checkpointed

The library raises the standard exceptions (``ValueError``, ``TypeError``) for bad arguments, as
``torch.optim`` does; these are for the application built on it. Standard library only.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "CorruptCheckpoint",
    "DataError",
    "DistributedError",
    "IsgdError",
    "NonFiniteError",
    "PlotError",
    "RunError",
    "TrainingInterrupted",
    "UsageError",
    "WriteError",
]


class IsgdError(Exception):
    """Base of isgd's errors; ``exit_code`` is what the command line exits with."""

    exit_code = 2


class UsageError(IsgdError):
    """A command line that cannot be run as given."""


class ConfigError(IsgdError, ValueError):
    """An invalid configuration key or value (also a ``ValueError``)."""


class DataError(IsgdError):
    """A data set is missing, corrupt or cannot be fetched."""


class PlotError(IsgdError):
    """Run directories that cannot be plotted or tabulated."""


class RunError(IsgdError):
    """A problem with a run directory, checkpoint or comparison directory."""


class WriteError(RunError):
    """A file of the run could not be written (full disk, permissions, ...); what was written
    before is intact."""


class CorruptCheckpoint(RunError):
    """A checkpoint that fails its integrity check, cannot be read, or belongs to another run
    (resuming moves it aside and falls back to the previous one)."""


class NonFiniteError(RunError):
    """The loss or the weights became non-finite; the last good checkpoint is kept."""

    exit_code = 3


class DistributedError(RunError):
    """The process group failed: a rank died, stopped responding, or the ranks disagree."""

    exit_code = 4


class TrainingInterrupted(IsgdError):
    """SIGINT or SIGTERM stopped a run at a step boundary; a checkpoint holds its progress.
    The command line exits with 128 + the signal's number (130, 143), as a shell would."""

    def __init__(self, signum: int, iteration: int, resume_hint: str) -> None:
        self.signum, self.iteration = signum, iteration
        self.exit_code = 128 + int(signum)
        super().__init__(f"interrupted at iteration {iteration}; resume with: {resume_hint}")
