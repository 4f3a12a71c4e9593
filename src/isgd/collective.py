r"""The one collective that makes data-parallel ranks decide alike.

ISGD's decision — is this batch's loss above the control limit? may another extra iteration run?
— reads a loss. Under data parallelism every rank holds a different slice of the batch and so a
different local loss; judged locally, the ranks would take different decisions, run different
numbers of forward/backward passes, and DDP's gradient all-reduces would pair up across different
steps (silently wrong weights, then a hang). :class:`LossSync` replaces the local loss by the
weighted process-group mean

.. math::  \psi = \frac{\sum_r w_r\,\psi_r}{\sum_r w_r}

with one all-reduce of three float64 scalars per pass (``[w_r ψ_r, w_r, inf_r]``) — the same
bytes on every rank, hence the same decision on every rank, by construction. ``inf_r`` carries a
GradScaler's found-inf flag in the same message, so a skipped step is skipped on every rank alike.
``w_r`` is 1 unless the loop says otherwise (uneven per-rank batches: the local sample count).

A loop may send a few numbers of its own in the same message (:meth:`LossSync.carry`), e.g. the
ranks' votes to stop at the next step boundary (``isgd train``: SIGINT/SIGTERM): they ride the
next all-reduce — in ``ISGD.step``, the regular pass's — and their sums across ranks are read back
from :attr:`LossSync.carried`, with no collective of their own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from isgd._numbers import is_real as _is_real

__all__ = ["LossSync"]


class LossSync:
    """Judge the local loss, or the process-group mean (see the module docstring).

    Args:
        process_group: the data-parallel group (``None``: the default group).
        enabled: ``None`` — reduce when ``torch.distributed`` is initialised and the group has
            more than one process (checked at every call, so ISGD may be built before
            ``init_process_group``); ``True`` — always reduce (an error without a process
            group); ``False`` — never: the loop already passes a loss that is the same on every
            rank (``isgd train`` does).
    """

    def __init__(self, process_group: Any = None, enabled: bool | None = None) -> None:
        if enabled not in (None, True, False):
            raise TypeError(f"Invalid sync_loss: {enabled!r} (must be None, True or False)")
        if enabled is False and process_group is not None:
            raise ValueError("Invalid sync_loss: False with a process_group (choose one)")
        self.process_group = process_group
        self.enabled = enabled
        self._outgoing: list[float] | None = None  # carry()'s values, for the next call
        #: the sums across ranks of the values :meth:`carry` sent (``None``: not sent yet)
        self.carried: list[float] | None = None
        #: the ``any_inf`` of the last call: whether any rank's found-inf flag was set
        self.last_inf = False

    def carry(self, values: Sequence[float]) -> None:
        """Send ``values`` with the next call's all-reduce (appended to ``[wψ, w, inf]``);
        after it, :attr:`carried` holds their sums across ranks (in one process, the values
        themselves). Every rank must carry as many values, before the same call."""
        self._outgoing = [float(v) for v in values]
        self.carried = None

    def active(self) -> bool:
        if self.enabled is False:
            return False
        initialised = dist.is_available() and dist.is_initialized()
        if not initialised:
            if self.enabled or self.process_group is not None:
                raise RuntimeError(
                    "ISGD(sync_loss=True or process_group=...) needs an initialised "
                    "torch.distributed process group (call torch.distributed.init_process_group)"
                )
            return False
        return self.enabled is True or dist.get_world_size(self.process_group) > 1

    def __call__(
        self, loss: Tensor | float, weight: float | None = None, found_inf: Tensor | None = None
    ) -> tuple[float, bool]:
        """``(ψ, any_inf)``: the loss to judge and whether any rank's gradients were non-finite.
        One host-device sync (the decision needs ψ on the host), plus one all-reduce when
        active."""
        if weight is not None and not (_is_real(weight) and math.isfinite(weight) and weight > 0):
            raise ValueError(f"Invalid weight: {weight!r} (must be a finite number > 0)")
        outgoing, self._outgoing = self._outgoing, None
        if not self.active():
            if outgoing is not None:
                self.carried = outgoing
            psi = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
            self.last_inf = bool(found_inf is not None and float(found_inf) > 0)
            return psi, self.last_inf
        w = 1.0 if weight is None else float(weight)
        device = self._device(loss)
        message = torch.zeros(3 + len(outgoing or ()), dtype=torch.float64, device=device)
        message[0] = (loss.detach() if isinstance(loss, Tensor) else torch.tensor(loss)).to(
            device=device, dtype=torch.float64
        ).reshape(()) * w
        message[1] = w
        if found_inf is not None:
            message[2] = found_inf.detach().to(device=device, dtype=torch.float64).sum()
        if outgoing:
            message[3:] = torch.tensor(outgoing, dtype=torch.float64)
        dist.all_reduce(message, group=self.process_group)
        total, weights, infs, *carried = message.tolist()
        if outgoing is not None:
            self.carried = carried
        self.last_inf = infs > 0
        return total / weights, self.last_inf

    def _device(self, loss: Tensor | float) -> torch.device:
        if dist.get_backend(self.process_group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return loss.device if isinstance(loss, Tensor) else torch.device("cpu")
