"""The closure ISGD's ``step`` re-evaluates, built from the loss alone.

``torch.optim``'s closure contract — zero the gradients, compute the loss, back-propagate, return
the loss — is what ISGD calls once for the regular pass and again for each extra iteration on the
same batch. Most loops only need to say what the loss is:

>>> loss = opt.step(isgd.loss_closure(opt, lambda: F.nll_loss(model(x), y)))  # doctest: +SKIP

With a GradScaler: ``isgd.loss_closure(opt, loss, grad_scaler=scaler)``. A loop with
micro-batches or anything else between the loss and ``backward()`` writes its closure by hand
(``docs/integrations.md``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["loss_closure"]


def loss_closure(
    optimizer: Optimizer,
    loss: Callable[[], Tensor],
    grad_scaler: torch.amp.GradScaler | None = None,
) -> Callable[[], Tensor]:
    """The closure ``optimizer.zero_grad(); ψ = loss(); ψ.backward(); return ψ``; with
    ``grad_scaler``, ``grad_scaler.scale(ψ).backward()``, for ``step(closure,
    grad_scaler=grad_scaler)`` (ISGD refuses a scaler with a closure built without one).

    ``loss`` computes the batch's scalar loss from the current weights (a forward pass); it is
    called once per pass, so every extra iteration sees the weights the last one left. With
    ISGD the closure asks :meth:`~isgd.ISGD.well_trained` before ``backward()``: the pass that
    ends the extra iterations (ψ′ ≤ limit) returns without one, as its gradient would go
    unused — the same weights, a backward pass less."""
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"loss_closure(optimizer, loss): the optimizer first, not {type(optimizer).__name__}"
        )
    if not callable(loss):
        raise TypeError(
            f"loss_closure(optimizer, loss): loss must be a function of no arguments returning "
            f"the batch's loss (a lambda), not {type(loss).__name__}"
        )

    well_trained = getattr(optimizer, "well_trained", None)  # ISGD's stop check

    def closure() -> Tensor:
        optimizer.zero_grad()
        value = loss()
        if not isinstance(value, Tensor) or value.numel() != 1 or not value.requires_grad:
            scalar = isinstance(value, Tensor) and value.numel() == 1
            got = (
                f"shape {tuple(value.shape)}{' without grad' if scalar else ''}"
                if isinstance(value, Tensor)
                else type(value).__name__
            )
            raise TypeError(
                "loss_closure: loss() must return the batch's loss as a scalar tensor with a "
                f"graph (a mean over the batch, e.g. reduction='mean'), not {got}"
            )
        if well_trained is not None and well_trained(value):
            return value  # an extra iteration's stop check: its gradient would go unused
        (grad_scaler.scale(value) if grad_scaler is not None else value).backward()
        return value

    closure.unscaled = grad_scaler is None  # type: ignore[attr-defined]  # ISGD.step reads it
    return closure
