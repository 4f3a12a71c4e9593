"""ISGD under mixed precision: the three ways a ``torch.amp.GradScaler`` meets ``ISGD.step``.

1. **keyword** — ``opt.step(closure, grad_scaler=scaler)``: ISGD unscales the regular pass's
   gradients through the scaler itself (:func:`scaler_found_inf`) and every extra pass's with the
   scaler's current scale (:func:`unscale_grads`; ``GradScaler.unscale_`` may run once per update).
2. **hand-over** — ``scaler.step(opt, closure)``: ``ISGD._step_supports_amp_scaling`` is True and
   ``step`` takes ``grad_scaler``, so the scaler calls ``opt.step(closure, grad_scaler=scaler)``:
   the keyword form.
3. **attributes** — a wrapper that hides ``grad_scaler`` from ``step``'s signature (accelerate's
   ``AcceleratedOptimizer`` under fp16) makes the scaler set ``opt.grad_scale`` and
   ``opt.found_inf`` instead (:func:`attribute_found_inf`); a bare step after ``observe()`` uses
   them. A closure is run under the scaler that called (:func:`closure_scaler`), as in form 1.

``torch.amp.GradScaler.step`` checks that its scale exists before it calls ``opt.step``, and the
scale is made by the first ``scaler.scale(loss)`` — which the closure calls only inside
``opt.step``: with torch's scaler, ``scaler.step(opt, closure)`` fails on the first step (the
keyword form ``opt.step(closure, grad_scaler=scaler)`` does not). :class:`GradScaler` is torch's
scaler whose ``step`` makes the scale first for an ISGD optimizer, as ``scaler.scale`` would (on
the parameters' device), and tells ``opt.step`` which scaler called (forms 2 and 3); it is
transparent for any other optimizer. :func:`hand_over` gives one existing scaler (accelerate's)
that ``step``. Nothing of torch is patched: only the scalers a user makes or hands over change.

Whatever the form, the found-inf flag ``scaler.update()`` reads for the step is ISGD's decision
(:func:`share_found_inf`): the process-group OR of every pass's flag (an inf in an extra pass backs
the scale off too), the same on every rank.

Everything here touches the scaler's private state (``_per_optimizer_states``, ``OptState``,
``torch._amp_foreach_non_finite_check_and_unscale_``): it is the one module to revisit when torch
changes them.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState
from torch.optim import Optimizer

from isgd._groups import WrappedOptimizer
from isgd.collective import local

__all__ = [
    "GradScaler",
    "attribute_found_inf",
    "bare_step_found_inf",
    "closure_scaler",
    "hand_over",
    "refuse_attribute_closure",
    "scaler_found_inf",
    "share_found_inf",
    "unscale_grads",
]


def scaler_found_inf(scaler: torch.amp.GradScaler | None, opt: Optimizer) -> Tensor | None:
    """The scaler's own unscale of this step (unless the loop already called it): gradients
    unscaled in place, the found-inf flag it recorded returned (``None``: no scaler, or off)."""
    if scaler is None or not scaler.is_enabled():
        return None
    state = scaler._per_optimizer_states[id(opt)]
    if state["stage"] is OptState.READY:
        scaler.unscale_(opt)
    flags = list(state["found_inf_per_device"].values())
    return torch.stack([f.to(flags[0].device) for f in flags]).sum() if flags else None


def unscale_grads(grads: list[Tensor], scale: Tensor | None) -> Tensor | None:
    """Divide ``grads`` by ``scale`` in place; the number of non-finite values found (on the CPU,
    in this rank's shards of DTensor gradients: ISGD ORs the flag across ranks), ``None`` when
    there is no scale."""
    if scale is None:
        return None
    found = torch.zeros((), device="cpu")
    by_device: dict[torch.device, list[Tensor]] = {}
    for g in map(local, grads):
        by_device.setdefault(g.device, []).append(g)
    for device, group in by_device.items():
        flag = torch.zeros(1, device=device)
        inv = scale.to(device=device, dtype=torch.float64).reciprocal().float().reshape(1)
        torch._amp_foreach_non_finite_check_and_unscale_(group, flag, inv)
        found = found + flag.cpu().sum()
    return found


def attribute_found_inf(opt: Optimizer, grads: list[Tensor]) -> Tensor | None:
    """Form 3: unscale by ``opt.grad_scale`` (unless the scaler already unscaled) and add the
    scaler's ``opt.found_inf``; ``None`` outside that form."""
    found_inf = unscale_grads(grads, getattr(opt, "grad_scale", None))
    outer = getattr(opt, "found_inf", None)
    if outer is not None:
        found_inf = outer if found_inf is None else found_inf + outer
    return found_inf


def bare_step_found_inf(
    opt: Optimizer, scaler: torch.amp.GradScaler | None, grads: list[Tensor]
) -> Tensor | None:
    """The found-inf flag of a bare ``step()`` after ``observe()``: through the scaler that
    handed itself over (form 2), else through the attributes (form 3); ``None``: neither."""
    if scaler is not None:
        return scaler_found_inf(scaler, opt)
    return attribute_found_inf(opt, grads)


def refuse_attribute_closure(opt: Optimizer) -> None:
    """A closure handed over in form 3 would run its extra passes without a scaler to unscale
    them: refused, with the call that works."""
    if getattr(opt, "grad_scale", None) is not None:
        raise RuntimeError(
            "ISGD.step(closure) was called by a GradScaler that does not hand itself over "
            "(a wrapper changed step's signature, as accelerate's AcceleratedOptimizer does "
            "under fp16): call the ISGD optimizer's step(closure, grad_scaler=scaler) "
            "directly, then scaler.update()"
        )


def closure_scaler(
    opt: Optimizer, grad_scaler: torch.amp.GradScaler | None
) -> torch.amp.GradScaler | None:
    """The scaler of ``step(closure)``: the one given, else the one whose ``step`` is calling
    (form 3, through :class:`GradScaler` or :func:`hand_over`); a form-3 call from any other is
    refused."""
    if grad_scaler is None:
        grad_scaler = getattr(opt, "_handed_scaler", None)
        if grad_scaler is None:
            refuse_attribute_closure(opt)
    return grad_scaler


def share_found_inf(scaler: torch.amp.GradScaler | None, opt: Optimizer, found: bool) -> None:
    """Make the found-inf flag ``scaler.update()`` reads for this step ``found``: the process-group
    OR of the flags of the step's passes (ISGD's decision), so that an inf in an extra pass backs
    the scale off, and every rank backs off alike (the local flags may differ: an inf a rank alone
    sees after the gradient all-reduce). No host sync."""
    if scaler is None or not scaler.is_enabled() or scaler._scale is None:
        return
    flags = scaler._per_optimizer_states[id(opt)]["found_inf_per_device"]
    if not flags:
        flags[scaler._scale.device] = torch.zeros((), device=scaler._scale.device)
    for i, flag in enumerate(flags.values()):
        flag.fill_(float(found) if i == 0 else 0.0)


def _scale_device(scaler: torch.amp.GradScaler, opt: Optimizer) -> torch.device:
    kind = scaler._device
    for group in opt.param_groups:
        for p in group["params"]:
            if p.device.type == kind:
                return p.device  # where the loss, and so scaler.scale(loss), will be
    return torch.device(kind)


def _handover_step(original: Any) -> Any:
    """``GradScaler.step`` for an ISGD optimizer: the scale made first (on the first step the
    closure that would make it has not run yet), and the scaler left on the optimizer for the
    call (:func:`closure_scaler`). Any other optimizer: ``original`` unchanged."""

    @functools.wraps(original)
    def step(scaler: torch.amp.GradScaler, optimizer: Optimizer, *args: Any, **kwargs: Any) -> Any:
        if not (isinstance(optimizer, WrappedOptimizer) and scaler.is_enabled()):
            return original(scaler, optimizer, *args, **kwargs)
        if scaler._scale is None:
            scaler._lazy_init_scale_growth_tracker(_scale_device(scaler, optimizer))
        optimizer._handed_scaler = scaler  # type: ignore[attr-defined]
        try:
            return original(scaler, optimizer, *args, **kwargs)
        finally:
            optimizer._handed_scaler = None  # type: ignore[attr-defined]

    return step


class GradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` whose ``step(opt, closure)`` works from the first step for an
    ISGD optimizer (see the module docstring); everything else is torch's."""

    step = _handover_step(torch.amp.GradScaler.step)


def hand_over(scaler: torch.amp.GradScaler) -> torch.amp.GradScaler:
    """Give ``scaler`` (one made elsewhere: accelerate's ``accelerator.scaler``) the ``step`` of
    :class:`GradScaler`, on this object only; returns it."""
    if not isinstance(scaler, GradScaler):
        handover = _handover_step(type(scaler).step)
        scaler.step = types.MethodType(handover, scaler)  # type: ignore[method-assign]
    return scaler
