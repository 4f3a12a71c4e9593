"""Checks of ISGD's arguments and of its closure contract, with messages that name the value
(as ``torch.optim``'s do)."""

from __future__ import annotations

import math
import operator
import weakref
from typing import Any, SupportsIndex

from torch import Tensor

from isgd._numbers import is_real as _is_real
from isgd.collective import Shards, local
from isgd.solvers import INNER_SOLVERS
from isgd.spc import MAX_LOSS, check_sigma_factor

NONFINITE = ("raise", "skip")  # what a NaN/inf regular loss does (see ISGD)


def check_hyper_parameters(values: dict[str, Any]) -> dict[str, Any]:
    """ISGD's hyper-parameters (but the window, the chart's) under their group keys, checked and
    normalised (``numpy.int64(5)`` → 5); other keys (a subclass's, checked by it) pass unchanged.
    ε is ``isgd_eps`` in the groups: Adam's own ``eps`` shares them."""
    max_extra_iters, eps = values["max_extra_iters"], values["isgd_eps"]
    inner_solver, nonfinite = values["inner_solver"], values["nonfinite"]
    if isinstance(max_extra_iters, bool) or not isinstance(max_extra_iters, SupportsIndex):
        raise TypeError(f"Invalid max_extra_iters: {max_extra_iters!r} (must be an integer)")
    if operator.index(max_extra_iters) < 0:
        raise ValueError(f"Invalid max_extra_iters: {max_extra_iters} (must be >= 0)")
    if not _is_real(eps) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"Invalid eps: {eps!r} (must be a finite number >= 0)")
    if inner_solver not in INNER_SOLVERS:
        raise ValueError(
            f"Invalid inner_solver: {inner_solver!r} (one of {', '.join(INNER_SOLVERS)})"
        )
    if nonfinite not in NONFINITE:
        raise ValueError(f"Invalid nonfinite: {nonfinite!r} (one of {', '.join(NONFINITE)})")
    return {
        **values,
        "sigma_factor": check_sigma_factor(values["sigma_factor"]),
        "max_extra_iters": operator.index(max_extra_iters),
        "isgd_eps": float(eps),
        "inner_solver": str(inner_solver),
        "nonfinite": str(nonfinite),
        "freeze_bn_stats": check_bool(values["freeze_bn_stats"], "freeze_bn_stats"),
    }


def check_loss(loss: object, where: str = "closure result", allow_number: bool = False) -> None:
    if allow_number and _is_real(loss):
        return
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        what = type(loss).__name__ if not isinstance(loss, Tensor) else f"shape {tuple(loss.shape)}"
        raise TypeError(
            f"Invalid {where}: {what} (the batch loss must be a one-element tensor"
            + (" or a number" if allow_number else "")
            + "; the closure computes it, calls backward() and returns it)"
        )


def check_closure_given(observed: bool, grad_scaler: object) -> None:
    """``ISGD.step()`` without a closure is the closure-free form: ``observe()`` came first."""
    if observed:
        return
    raise TypeError(
        "Invalid closure: None (GradScaler.step(opt) without a closure cannot re-run the "
        "batch for ISGD's extra iterations: call opt.step(closure, grad_scaler=scaler) "
        "with a closure that back-propagates scaler.scale(loss), or opt.observe(loss) "
        "before scaler.step(opt) in a loop that owns backward())"
        if grad_scaler is not None
        else "Invalid closure: None (ISGD.step needs a closure that zeroes the gradients, "
        "computes the batch loss, calls backward() and returns the loss, or, in a loop "
        "that owns backward(), opt.observe(loss) before a bare opt.step(); frameworks: "
        "see isgd.integrations)"
    )


#: a gradient as ISGD.step() left it: the tensor (weakly) and its version (``None``: no gradient)
GradMark = tuple[weakref.ReferenceType[Tensor], int] | None


def grad_marks(params: list[Tensor], shards: Shards) -> list[GradMark]:
    """The parameters' gradients and their versions, to tell later whether anything
    back-propagated into them since: in place (a new version; a DTensor's is its local
    shard's), or by putting another tensor there (FSDP1's gradient views). Without DTensors
    among the parameters (:attr:`Shards.dtensors`) each gradient is its own part."""
    dtensors = shards.dtensors
    return [
        None if (g := p.grad) is None else (weakref.ref(g), (local(g) if dtensors else g)._version)
        for p in params
    ]


def check_no_outside_grads(
    params: list[Tensor], marks: list[GradMark] | None, shards: Shards
) -> None:
    """Refuse gradients back-propagated since ``marks`` were taken (the last ``ISGD.step``): the
    closure's ``zero_grad()`` would discard them. Under sharding the whole gradients are judged
    (:meth:`Shards.norm`), so every rank refuses alike; under FSDP1 every step (one all-reduce:
    a rank may hold no slice of a touched gradient)."""
    if marks is None or len(marks) != len(params):
        marks = [None] * len(params)  # nothing to compare with: every gradient counts
    dtensors = shards.dtensors
    owners = [  # p.grad is not the gradient its mark saw, or has changed since
        p
        for p, mark in zip(params, marks)
        if (g := p.grad) is not None
        and (
            mark is None or mark[0]() is not g or mark[1] != (local(g) if dtensors else g)._version
        )
    ]
    touched = [p.grad for p in owners if p.grad is not None]
    if (touched or shards.group is not None) and bool(shards.norm(touched, owners) > 0):
        raise RuntimeError(
            "ISGD.step(closure): the parameters hold gradients back-propagated outside the "
            "closure (gradient accumulation?), which the closure's zero_grad() would discard; "
            "run every micro-batch inside the closure (docs/integrations.md#gradient-"
            "accumulation), or zero the gradients before step()"
        )


def nonfinite_loss_error(psi: float, step: int) -> FloatingPointError:
    """``ISGD(nonfinite="raise")``: the regular loss ψ of step ``step`` is one the chart does
    not take (:func:`isgd.spc.finite_loss`), refused before any change."""
    beyond = f" (beyond ±{MAX_LOSS:g}: non-finite for ISGD)" if math.isfinite(psi) else ""
    return FloatingPointError(
        f"ISGD: the batch loss is {psi}{beyond} at step {step}; no update was applied and "
        "nothing changed. Lower the learning rate or check the batch; ISGD(nonfinite='skip') "
        "skips such steps instead (counted in stats.nonfinite)"
    )


def check_lr(lr: object) -> None:
    if lr is not None and not (isinstance(lr, Tensor) or (_is_real(lr) and lr >= 0)):
        raise ValueError(f"Invalid lr: {lr!r} (must be a number >= 0)")


def check_bool(value: object, name: str) -> bool:
    kind = type(value)
    if not (isinstance(value, bool) or (kind.__module__, kind.__name__) in NP_BOOLS):
        raise TypeError(f"Invalid {name}: {value!r} (must be True or False)")
    return bool(value)


NP_BOOLS = {("numpy", "bool"), ("numpy", "bool_")}  # NumPy's booleans, without importing it
