"""ISGD in an Accelerate loop: :func:`prepare`, ``accelerator.prepare`` that keeps ISGD correct.

``accelerator.prepare`` wraps ISGD in an ``AcceleratedOptimizer``, whose ``step(closure)``
passes the closure through — the closure calls ``accelerator.backward(loss)`` and ISGD re-runs
it for its extra iterations. Two of accelerate's paths would be wrong for ISGD without a word,
and :func:`prepare` closes both:

- **``accelerator.accumulate(model)``** (accelerate's own recipe for gradient accumulation)
  makes ``optimizer.step()`` a no-op on all but the last micro-batch of a batch, so the closure
  of the others never runs and each step trains on one micro-batch in ``k``; and
  ``accelerator.backward`` divides every loss by ``k``. :func:`prepare` refuses
  ``gradient_accumulation_steps > 1`` at setup, and the optimizer it returns refuses a step that
  accelerate would skip, at the first one (if the steps are changed after ``prepare``). The
  correct accumulation runs every micro-batch inside the closure
  (``accelerator.no_sync(model)`` for all but the last).
- **fp16** (``accelerator.scaler``): accelerate steps ISGD through ``GradScaler.step`` with a
  wrapper that hides the scaler from ISGD; the optimizer :func:`prepare` returns calls
  ``ISGD.step(closure, grad_scaler=accelerator.scaler)`` and ``scaler.update()`` instead, from
  the first step on, so ``opt.step(closure)`` is the loop in every precision.

Example::

    from isgd.integrations.accelerate import prepare

    model, opt = prepare(accelerator, model, isgd.ISGD(model.parameters(), window=n_b, lr=0.05))
    for x, y in loader:
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            return loss
        opt.step(closure)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer

from isgd.optim import ISGD

__all__ = ["prepare"]

ACCUMULATE = (
    "ISGD cannot run under accelerator.accumulate() with gradient_accumulation_steps={k}: "
    "accelerate skips optimizer.step() on all but the last micro-batch, so ISGD would train on "
    "one micro-batch in {k}; keep gradient_accumulation_steps=1 and run every micro-batch inside "
    "the closure (docs/integrations.md#accelerate)"
)


def prepare(accelerator: Accelerator, *args: Any, **kwargs: Any) -> Any:
    """``accelerator.prepare(*args, **kwargs)``, with every ISGD optimizer among the results
    stepped as ISGD needs (see the module docstring). Refuses
    ``accelerator.gradient_accumulation_steps > 1`` in one line."""
    k = accelerator.gradient_accumulation_steps
    if k > 1 and any(isinstance(a, ISGD) for a in args):
        raise ValueError(ACCUMULATE.format(k=k))
    prepared = accelerator.prepare(*args, **kwargs)
    for obj in prepared if isinstance(prepared, tuple) else (prepared,):
        if type(obj) is AcceleratedOptimizer and isinstance(obj.optimizer, ISGD):
            obj.__class__ = ISGDAcceleratedOptimizer  # same object: accelerate's lists keep it
    return prepared


class ISGDAcceleratedOptimizer(AcceleratedOptimizer):
    """accelerate's optimizer wrapper around ISGD, as :func:`prepare` returns it."""

    optimizer: ISGD

    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        if not self.gradient_state.sync_gradients:  # a micro-step accelerate would skip
            raise RuntimeError(ACCUMULATE.format(k=self.gradient_state.num_steps))
        if self.scaler is None:
            return self.optimizer.step(closure, **kwargs)
        result = self.optimizer.step(closure, grad_scaler=self.scaler, **kwargs)
        self.scaler.update()
        self._is_overflow = self.optimizer.stats.last.skipped
        return result
