"""The closure ISGD's ``step`` re-evaluates, built from the loss alone.

``torch.optim``'s closure contract — zero the gradients, compute the loss, back-propagate, return
the loss — is what ISGD calls once for the regular pass and again for each extra iteration on the
same batch. Most loops only need to say what the loss is:

>>> loss = opt.step(isgd.loss_closure(opt, lambda: F.nll_loss(model(x), y)))  # doctest: +SKIP

A loop with a GradScaler, micro-batches or anything else between the loss and ``backward()``
writes its closure by hand (``docs/integrations.md``).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor
from torch.optim import Optimizer

__all__ = ["loss_closure"]


def loss_closure(optimizer: Optimizer, loss: Callable[[], Tensor]) -> Callable[[], Tensor]:
    """The closure ``optimizer.zero_grad(); ψ = loss(); ψ.backward(); return ψ``.

    ``loss`` computes the batch's scalar loss from the current weights (a forward pass); it is
    called once per pass, so every extra iteration sees the weights the last one left."""
    if not callable(loss):
        raise TypeError(
            f"loss_closure(optimizer, loss): loss must be a function of no arguments returning "
            f"the batch's loss (a lambda), not {type(loss).__name__}"
        )

    def closure() -> Tensor:
        optimizer.zero_grad()
        value = loss()
        value.backward()
        return value

    return closure
