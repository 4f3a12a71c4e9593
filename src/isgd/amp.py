"""ISGD under mixed precision: the three ways a ``torch.amp.GradScaler`` meets ``ISGD.step``.

1. **keyword** — ``opt.step(closure, grad_scaler=scaler)``: ISGD unscales the regular pass's
   gradients through the scaler itself (:func:`scaler_found_inf`) and every extra pass's with the
   scaler's current scale (:func:`unscale_grads`; ``GradScaler.unscale_`` may run once per update).
2. **hand-over** — ``scaler.step(opt, closure)``: ``ISGD._step_supports_amp_scaling`` is True and
   ``step`` takes ``grad_scaler``, so the scaler calls ``opt.step(closure, grad_scaler=scaler)``:
   the keyword form.
3. **attributes** — a wrapper that hides ``grad_scaler`` from ``step``'s signature (accelerate's
   ``AcceleratedOptimizer`` under fp16) makes the scaler set ``opt.grad_scale`` and
   ``opt.found_inf`` instead (:func:`attribute_found_inf`). That form cannot re-run a closure
   (:func:`refuse_attribute_closure`); a bare step after ``observe()`` works.

Everything here touches the scaler's private state (``_per_optimizer_states``, ``OptState``,
``torch._amp_foreach_non_finite_check_and_unscale_``): it is the one module to revisit when torch
changes them.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState
from torch.optim import Optimizer

__all__ = [
    "attribute_found_inf",
    "bare_step_found_inf",
    "refuse_attribute_closure",
    "scaler_found_inf",
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
    """Divide ``grads`` by ``scale`` in place; the number of non-finite values found (on the CPU),
    ``None`` when there is no scale."""
    if scale is None:
        return None
    found = torch.zeros((), device="cpu")
    by_device: dict[torch.device, list[Tensor]] = {}
    for g in grads:
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
