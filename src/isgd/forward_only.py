"""A variant of ISGD that is not the paper's method: forward-only steps for well-trained batches.

The patent's abstract (US 10,572,800 B2) also promises fewer iterations for well-trained batches.
:class:`ForwardOnlyISGD` reads that as: a step whose regular loss ψ is below the *lower limit* —
the ``lower_quantile`` q of the window, read before ψ joins it — is *forward-only*: ψ joins the
chart, no update is applied, and :meth:`ForwardOnlyISGD.well_trained` tells the closure before
its ``backward()``, so that it can skip it (the compute saved). Measured in
``docs/results.md`` (variants); ``benchmarks/bench_forward_only.py`` prices a forward-only step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from isgd._groups import Hyper
from isgd._numbers import is_real as _is_real
from isgd.optim import ISGD, StepRecord
from isgd.spc import finite_loss

__all__ = ["ForwardOnlyISGD"]


class ForwardOnlyISGD(ISGD):
    """ISGD plus forward-only steps below the ``lower_quantile`` of the window.

    Args:
        lower_quantile: q in (0, 1); a step with ψ strictly below the q-quantile of the window
            (the ⌈q·n⌉-th smallest loss) is forward-only. Carried in the parameter groups with
            ISGD's other hyper-parameters.
        params, base_optimizer, **kwargs: as for :class:`isgd.ISGD`.

    The closure asks ``opt.well_trained(loss)`` after its forward pass and returns the loss
    without ``backward()`` when it is True; ISGD then applies no update. The forward pass of such
    a step has already updated BatchNorm running statistics; a loop that wants them untouched
    restores them (the trainer does). Under data parallelism every rank must ask (one
    all-reduce, reused by the step).
    """

    hyper_parameters = (*ISGD.hyper_parameters, "lower_quantile")
    lower_quantile = Hyper()

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        *,
        lower_quantile: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, base_optimizer, lower_quantile=lower_quantile, **kwargs)

    def _check_hyper(self, values: dict[str, Any]) -> dict[str, Any]:
        q = values["lower_quantile"]
        if not _is_real(q) or not 0 < q < 1:
            raise ValueError(f"Invalid lower_quantile: {q!r} (a fraction in (0, 1))")
        return {**super()._check_hyper(values), "lower_quantile": float(q)}

    def _judge(self, psi: float, any_inf: bool) -> StepRecord:
        record = super()._judge(psi, any_inf)
        lower = self.chart.quantile(self.lower_quantile)
        finite = not any_inf and finite_loss(psi)
        record.lower_limit = lower
        record.forward_only = finite and not record.triggered and lower is not None and psi < lower
        return record

    @torch.no_grad()
    def well_trained(self, loss: Tensor | float, *, weight: float | None = None) -> bool:
        """True when the regular loss ψ is below the lower limit (the step about to be observed
        will be forward-only), or, in an extra iteration, at the stop (:meth:`ISGD.well_trained`).
        Call it with the loss that :meth:`observe` (or the closure's return) will report, and its
        weight (inside ``step(closure, weight=w)`` it defaults to that ``w``)."""
        if self.in_extra_iteration:
            return super().well_trained(loss, weight=weight)
        if weight is None:  # inside step(closure, weight=w): the step's w
            weight = self._closure_weight
        psi, any_inf = self.sync(loss, weight, None)
        self._judged = (loss, psi)
        return self._judge(psi, any_inf).forward_only
