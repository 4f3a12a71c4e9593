"""The loop's side of a non-finite loss (``on_nonfinite``): ISGD skips the batch or raises
before any update (``ISGD(nonfinite=...)``); the loop stops when skipping cannot help, and
never checkpoints weights that are no longer finite. Every stop keeps the last good checkpoint
and says so (:class:`isgd.errors.NonFiniteError`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from isgd.errors import NonFiniteError
from isgd.stats import StepRecord

if TYPE_CHECKING:
    from isgd.training.train import Trainer

__all__ = ["check_weights", "error", "skipped", "weights_finite"]

log = logging.getLogger(__name__)

_MAX_SKIP_WARNINGS = 10
LOWER_LR = "start a new run with a lower --lr"


def weights_finite(trainer: Trainer) -> bool:
    """All weights and buffers finite — on every rank (a collective under ``dist``)."""
    finite = all(
        bool(torch.isfinite(v).all())
        for v in trainer.model.state_dict().values()
        if v.is_floating_point()
    )
    if trainer.dist is None:
        return finite
    flag = torch.tensor([float(finite)], device=trainer.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def error(trainer: Trainer, what: str, todo: str) -> NonFiniteError:
    """``what`` happened; the run stopped; which checkpoint is kept; ``todo``."""
    last = trainer._last_checkpoint()
    kept = f"its last good checkpoint {last} is kept" if last else "it had no checkpoint yet"
    return NonFiniteError(f"{what}; the run stopped and {kept}; {todo}")


def check_weights(trainer: Trainer, when: str) -> None:
    """Raise unless the weights are finite (``when``: at what point, and what was not written)."""
    if not weights_finite(trainer):
        raise error(trainer, f"the weights are no longer finite {when}", LOWER_LR)


def skipped(trainer: Trainer, record: StepRecord, epoch: int, batch_id: int) -> None:
    """ISGD skipped the batch (``on_nonfinite = "skip"``); stop when skipping cannot help:
    the weights themselves are no longer finite, or a whole epoch was skipped in a row."""
    st = trainer.state
    what = f"non-finite loss ({record.loss}) at iteration {st.iteration}, batch id {batch_id}"
    if not weights_finite(trainer):
        raise error(
            trainer,
            f"{what}: the weights themselves are no longer finite, so skipping batches cannot help",
            LOWER_LR,
        )
    if st.skipped_in_a_row + 1 >= trainer.n_b:
        raise error(
            trainer,
            f"{what}: the last {trainer.n_b} batches in a row (a whole epoch) had non-finite "
            "losses, so the model has diverged and skipping batches cannot help",
            LOWER_LR,
        )
    st.skipped_in_a_row += 1
    count = trainer.optimizer.stats.nonfinite
    if trainer.is_main and count <= _MAX_SKIP_WARNINGS:
        log.warning(
            "skipped %s (epoch %d)%s",
            what,
            epoch,
            "; further skipped batches are only counted (summary.json: nonfinite/skipped)"
            if count == _MAX_SKIP_WARNINGS
            else "",
        )
