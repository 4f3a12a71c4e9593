r"""The collectives that make data-parallel and sharded ranks decide alike.

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

Under sharded training (FSDP2, FSDP1) each rank holds a slice of every parameter as well:
:class:`Shards` makes the number of weights :math:`n_w` and the norms ISGD reads the whole
model's, and :func:`local` gives the slice the elementwise operations (the snapshot
:math:`w_{t-1}`, the conservative term, the inner solvers) run on.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from isgd._numbers import is_real as _is_real

__all__ = ["LossSync", "Shards", "local"]


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
            psi = float(loss.item() if isinstance(loss, Tensor) else loss)  # item: no detach
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
        return _collective_device(self.process_group, loss)


def _collective_device(group: Any, like: Tensor | float) -> torch.device:
    """Where a message for ``group`` must live: the current CUDA device under NCCL, else with
    ``like``."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return like.device if isinstance(like, Tensor) else torch.device("cpu")


# ------------------------------------------------------------------ sharded parameters
def is_dtensor(t: Tensor) -> bool:
    """``t`` is a DTensor. Importing ``torch.distributed.tensor`` costs most of a second, and a
    DTensor cannot exist before it is imported: the class is looked up, not imported."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's part of ``t``: a DTensor's local shard (FSDP2, tensor parallelism), ``t``
    itself otherwise. An elementwise operation on every rank's part is the operation on the
    whole; in place on the part, it changes the DTensor."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


def flattened(p: Tensor) -> bool:
    """``p`` is FSDP1's (``FullyShardedDataParallel``): a flat parameter, or an original
    parameter viewing this rank's slice of one (``use_orig_params=True``). torch marks both
    (``torch.distributed.fsdp._common_utils._is_fsdp_flattened``); neither knows its group."""
    return bool(getattr(p, "_fsdp_flattened", False))


class Shards:
    r"""How the parameters ISGD updates make up the model across ranks, so that the number of
    weights :math:`n_w` and the norms ISGD reads are the whole model's, the same on every rank.

    - **whole tensors** (one process, DDP): nothing to reduce;
    - **DTensors** (FSDP2's ``fully_shard``, tensor parallelism): each knows its mesh and
      placements: ``numel()`` is the global count, elementwise operations run on the local
      shards (:func:`local`), norms go through DTensor's own reduction (``full_tensor()``);
    - **FSDP1's flattened parameters** (``FullyShardedDataParallel``): plain tensors holding this
      rank's slice, which do not know the group that shards them: ``group``, FSDP1's
      ``process_group`` (``ISGD(..., shard_group=fsdp_model.process_group)``). Their element
      counts and squared norms are all-reduced over it (a flat parameter's padding excluded).
      Without it they are refused, in one line: a local :math:`n_w` would make the
      conservative term stronger by the number of shards, and different on every rank.
    """

    def __init__(self, group: Any, params: Sequence[Tensor]) -> None:
        if group is not None and not any(flattened(p) for p in params):
            raise ValueError(
                "Invalid shard_group: it is the group FSDP1 (FullyShardedDataParallel) shards "
                "the parameters over, and none of these is FSDP1's (DTensors, FSDP2's, know "
                "their mesh): drop it"
            )
        self.group = group
        #: some parameter is a DTensor (a tensor keeps its class: decided as the parameters
        #: join, here and in :meth:`join`); without, each tensor is its own part (:func:`local`)
        self.dtensors = any(map(is_dtensor, params))

    def join(self, params: Sequence[Tensor]) -> int:
        """Parameters added after construction (``add_param_group``): noted in
        :attr:`dtensors`; returns their :meth:`numel`."""
        self.dtensors = self.dtensors or any(map(is_dtensor, params))
        return self.numel(params)

    def numel(self, params: Sequence[Tensor]) -> int:
        """The weights of ``params`` across the ranks, each counted once (one all-reduce for
        FSDP1's: every rank must call it)."""
        whole = sum(p.numel() for p in params if not flattened(p))  # a DTensor's is global
        sliced = [p for p in params if flattened(p)]
        if not sliced:
            return whole
        if self.group is None:
            raise ValueError(
                "ISGD: these parameters are sharded by FullyShardedDataParallel (FSDP1), whose "
                "parameters do not know their group: pass ISGD(..., shard_group="
                "fsdp_model.process_group) so that n_w and the norms are the whole model's "
                "(FSDP2's fully_shard needs nothing)"
            )
        padding = sum(int(getattr(p, "_shard_numel_padded", 0)) for p in sliced)  # flat ones
        count = torch.tensor(
            [sum(p.numel() for p in sliced) - padding],
            dtype=torch.int64,
            device=_collective_device(self.group, sliced[0]),
        )
        dist.all_reduce(count, group=self.group)
        return whole + int(count.item())

    def norm(self, tensors: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
        """‖(t_1, …, t_n)‖₂ of the whole tensors, the same on every rank (0 for none);
        ``params[i]`` is the parameter ``tensors[i]`` belongs to (its gradient, its momentum
        buffer). Every rank must call it: under FSDP1 it all-reduces whatever this rank holds
        (a rank may hold no slice of them), DTensors reduce themselves."""
        whole: list[Tensor] = []
        dtensors: list[Tensor] = []
        sliced: list[Tensor] = []
        for t, p in zip(tensors, params, strict=True):
            if is_dtensor(t):
                dtensors.append(t)
            else:
                (sliced if flattened(p) else whole).append(t)
        if self.group is None and not dtensors:  # one process, DDP: torch's get_total_norm
            return _norm(whole) if whole else torch.zeros(())
        squares = [_norm(whole).square()] if whole else []
        if dtensors:
            squares.append(_norm(dtensors).full_tensor().square())  # type: ignore[attr-defined]
        if self.group is not None:
            none_here = torch.zeros((), device=_collective_device(self.group, 0.0))
            square = _norm(sliced).square() if sliced else none_here
            dist.all_reduce(square, group=self.group)
            squares.append(square)
        device = squares[0].device
        return torch.stack([s.to(device) for s in squares]).sum().sqrt()


def _norm(tensors: list[Tensor]) -> Tensor:
    """The 2-norm of the tensors together (a DTensor's partial: ``full_tensor()`` reduces it)."""
    return torch.stack(torch._foreach_norm(tensors)).norm()
