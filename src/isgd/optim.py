r"""ISGD: Inconsistent Stochastic Gradient Descent (Wang, Yang, Min, Chakradhar, 2017).

ISGD wraps any ``torch.optim`` optimizer (the *base*) and shares its ``param_groups``. Each step
it makes the base's ordinary update on batch :math:`d_t`; when the batch's loss is above the
control limit of the last epoch's losses, it spends up to ``max_extra_iters`` extra iterations on
the same batch, solving

.. math::
    \min_w \; \phi(w) = \tfrac12\,(\psi_w(d_t) - \text{limit})^2
                      + \frac{\varepsilon}{2 n_w}\,\lVert w - w_{t-1}\rVert^2

by steps along

.. math::
    \nabla\phi(w) = (\psi_w(d_t) - \text{limit})\,\nabla\psi_w(d_t)
                  + \frac{\varepsilon}{n_w}\,(w - w_{t-1}),

stopping as soon as :math:`\psi_w(d_t) \le \text{limit}`. ``docs/algorithm.md`` maps the
paper's symbols to the arguments below. Beside this module: :mod:`isgd.spc` (the chart),
:mod:`isgd.solvers` (the update of the extra iterations), :mod:`isgd.amp` (GradScaler),
:mod:`isgd._groups` (parameter groups and ``state_dict``), :mod:`isgd.stats` (the step record
and counters), :mod:`isgd._checks` (the checks of arguments and of the closure contract),
:mod:`isgd.forward_only` (a variant that is not the paper's).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from isgd import amp
from isgd._checks import (
    NONFINITE,
    GradMark,
    check_bool,
    check_closure_given,
    check_loss,
    check_no_outside_grads,
    grad_marks,
    nonfinite_loss_error,
)
from isgd._groups import Hyper, WrappedOptimizer
from isgd.batchnorm import frozen_batchnorm_stats
from isgd.collective import LossSync, Shards, local
from isgd.solvers import INNER_SOLVERS, InnerSolver, make_solver, momentum_ratio
from isgd.spc import finite_loss
from isgd.stats import ISGDStats, StepRecord

__all__ = [
    "INNER_SOLVERS",
    "ISGD",
    "NONFINITE",
    "ISGDStats",
    "StepRecord",
    "frozen_batchnorm_stats",
]

LossClosure = Callable[[], Tensor]


class ISGD(WrappedOptimizer):
    r"""Inconsistent SGD around a base optimizer.

    Per step, with ψ the regular loss of batch :math:`d_t` and :math:`w_{t-1}` the weights before
    the step::

        ψ ← closure();  decide  triggered = (chart full and ψ > limit)   # limit: before ψ joins
        w ← base_step(w, ∇ψ)
        if triggered, repeat up to max_extra_iters times:
            ψ' ← closure();  if ψ' ≤ limit: break
            w ← inner_step(w, (ψ' − limit)·∇ψ' + (ε/n_w)·(w − w_{t−1}))   # base_step by default
        chart ← chart + ψ

    Args:
        params: parameters or parameter groups, as for any ``torch.optim`` optimizer.
        base_optimizer: the optimizer *class* whose update rule ISGD applies (``torch.optim.SGD``
            by default; SGD with momentum or Nesterov, Adam and AdamW are tested).
        window: batches per epoch :math:`n_b`, an integer >= 2: the chart holds the last
            ``window`` losses; the first ``window`` steps fill it and are plain base steps.
            Structural: :meth:`load_state_dict` refuses a state saved with another window.
            ``None``: the stack knows the epoch and calls :meth:`set_window` before the first step.
        sigma_factor: ``k`` in ``limit = mean + k·sigma`` (default 3).
        max_extra_iters: the paper's ``stop``: extra iterations at most per triggered step.
            0 makes ISGD exactly the base optimizer. Default 5 (see ``docs/algorithm.md``).
        eps: the conservative weight :math:`\varepsilon` ("preferably 0.1" in the paper).
        inner_solver: the update of the extra iterations (:mod:`isgd.solvers`): ``"base"``
            (default), the base optimizer's step with ∇φ as the gradient, its state shared with
            the regular steps; the ablations ``"gd"`` and ``"momentum"``.
        nonfinite: a regular loss NaN, infinite or beyond ±1e100 (a GradScaler's found-inf steps
            are skipped, as it would) — ``"raise"`` (default): ``FloatingPointError`` before any
            change; ``"skip"``: no update, out of the chart, counted in ``stats.nonfinite``.
        freeze_bn_stats: keep BatchNorm running statistics unchanged by the extra passes
            (:func:`frozen_batchnorm_stats`; the regular pass still updates them).
        diagnostics: record ``stats.last.momentum_ratio`` (:func:`isgd.solvers.momentum_ratio`,
            two norms and a host sync per extra iteration). Off by default: nothing computed.
        process_group, sync_loss: which loss the decisions read (:class:`isgd.collective.LossSync`):
            by default, with several processes, the process-group mean of the ranks' losses (one
            all-reduce per pass): every rank decides alike. ``sync_loss=False``: a global loss.
        shard_group: FSDP1 only (``FullyShardedDataParallel``): the group it shards the
            parameters over, ``fsdp_model.process_group``, so that :attr:`n_w` and the norms are
            the whole model's (:class:`isgd.collective.Shards`); FSDP1's parameters without it
            are refused. FSDP2's (``fully_shard``, DTensors) need nothing.
        **base_kwargs: hyper-parameters of the base optimizer (``lr``, ``momentum``, ...).
        ``docs/algorithm.md`` says why each default, and what the paper leaves open.

    ISGD's hyper-parameters but the window ride in every parameter group, as ``lr`` does, and
    ``state_dict()`` has torch's shape plus ``"isgd": {"chart", "stats"}``, which the first group
    carries too, so that ``torch.distributed.checkpoint`` round-trips it (:mod:`isgd._groups`).

    Sharded training: under FSDP2 (DTensor parameters) every operation on the parameters —
    the snapshot :math:`w_{t-1}`, the conservative term, the inner solvers — runs on the local
    shards, and :math:`n_w` and the norms are the whole model's, reduced by DTensor; FSDP1 needs
    ``shard_group`` (``docs/integrations.md``, *Sharded training*).

    The closure given to :meth:`step` must zero the gradients, compute the batch loss, call
    ``backward()`` and return the loss — the contract of ``torch.optim.LBFGS`` (it is called
    again per extra iteration). It may ask :meth:`well_trained` after its forward pass and, when
    True, return the loss without ``backward()``: the stop check of an extra iteration, whose
    gradient ISGD never uses (the weights are the same either way). Gradient accumulation
    belongs *inside* the closure; gradients accumulated before :meth:`step` are refused.
    Mixed precision (:mod:`isgd.amp`): ``step(closure, grad_scaler=scaler)``, or
    ``scaler.step(opt, closure)``, with a closure that back-propagates ``scaler.scale(loss)``.
    Loops that own ``backward()`` use :meth:`observe`, a bare :meth:`step`, then
    :meth:`above_limit`, :meth:`subproblem_grad_` and :meth:`subproblem_step_`
    (``docs/integrations.md``).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = ISGD(model.parameters(), lr=0.1, momentum=0.9, window=100)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.cross_entropy(model(x), y)
        ...     if opt.well_trained(loss):  # optional: a stop check needs no backward
        ...         return loss
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)
    """

    #: the hyper-parameters every group carries (a subclass may add its own)
    hyper_parameters: tuple[str, ...] = (
        *("sigma_factor", "max_extra_iters", "isgd_eps", "inner_solver", "nonfinite"),
        "freeze_bn_stats",
    )
    sigma_factor = Hyper()
    max_extra_iters = Hyper()
    eps = Hyper("isgd_eps")  # Adam's own eps shares the groups
    inner_solver = Hyper()
    nonfinite = Hyper()
    freeze_bn_stats = Hyper()

    def __init__(
        self,
        params: Any,
        base_optimizer: type[Optimizer] = torch.optim.SGD,
        *,
        window: int | None,
        sigma_factor: float = 3.0,
        max_extra_iters: int = 5,
        eps: float = 0.1,
        inner_solver: str = "base",
        nonfinite: str = "raise",
        freeze_bn_stats: bool = True,
        diagnostics: bool = False,
        process_group: Any = None,
        sync_loss: bool | None = None,
        shard_group: Any = None,
        **base_kwargs: Any,
    ) -> None:
        given: dict[str, Any] = dict(sigma_factor=sigma_factor, max_extra_iters=max_extra_iters)
        given |= dict(isgd_eps=eps, inner_solver=inner_solver, nonfinite=nonfinite)
        given |= dict(freeze_bn_stats=freeze_bn_stats)  # a subclass's arrive in base_kwargs
        hyper = self._hyper_from(base_optimizer, given, base_kwargs)  # checked (isgd._groups)
        self._init_chart(window, hyper["sigma_factor"])  # validates window (None: set_window)
        self.sync = LossSync(process_group, sync_loss)
        self.diagnostics = check_bool(diagnostics, "diagnostics")
        self._wrap(params, base_optimizer, base_kwargs, hyper)  # the base shares its groups
        params = self._params()
        self.shards = Shards(shard_group, params)  # refuses FSDP1's without the group
        self._n_w = self.shards.numel(params)

        self.stats = ISGDStats()
        self.solver: InnerSolver = make_solver(self.inner_solver, self.base_optimizer)
        self._w_prev: list[Tensor] | None = None  # w_{t−1}, allocated on the first trigger
        self._ratios: list[float] = []  # diagnostics: momentum ratios of the step in progress
        self._limit: float | None = None  # the limit of the step in progress (None: no trigger)
        self._psi: float | None = None  # the last extra-iteration loss reported
        self._weight: float | None = None  # this rank's weight in the mean loss of the step
        self._closure_weight: float | None = None  # step(weight=) while its regular closure runs
        self._observed = False  # observe() ran and the step's update is still to come
        self._judged: tuple[object, float] | None = None  # well_trained()'s (loss, ψ)
        #: True while step() re-runs the closure for an extra iteration (loggers skip those passes)
        self.in_extra_iteration = False
        self._grad_marks: list[GradMark] | None = None  # p.grad as step() left it

    @property
    def n_w(self) -> int:
        """Number of weights :math:`n_w`: all elements of all parameters in all groups — of the
        whole model under sharding (:class:`isgd.collective.Shards`)."""
        return self._n_w

    # ------------------------------------------------------------------ the step
    _step_supports_amp_scaling = True  # GradScaler.step(opt, closure) hands itself to step()

    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: LossClosure | None = None,
        *,
        weight: float | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> Tensor | None:
        """One ISGD step on the batch the closure evaluates; returns the regular loss.

        Args:
            closure: zeroes the gradients, computes the batch loss, back-propagates it (scaled by
                ``grad_scaler`` if one is used) unless :meth:`well_trained` says it need not, and
                returns it; called once more per extra iteration. ``None`` is the closure-free
                form: the loop has back-propagated and called :meth:`observe`.
            weight: this rank's weight in the process-group mean of the loss (its sample count
                when ranks hold batches of different sizes); ignored in a single process.
            grad_scaler: a ``torch.amp.GradScaler``; gradients of every pass are unscaled and
                checked for inf/NaN before ISGD uses them. Inf in the regular pass skips the
                update (on every rank alike) as ``GradScaler.step`` would; inf in an extra
                iteration ends the extra iterations. Call ``grad_scaler.update()`` after: it backs
                the scale off after an inf in any pass on any rank (:mod:`isgd.amp`).
        """
        if closure is None:
            self._closure_free_step(grad_scaler)
            return None
        self._begin_step()  # the window is set
        grad_scaler = amp.closure_scaler(self, grad_scaler)  # scaler.step(opt, closure) in form 3
        if grad_scaler is not None and getattr(closure, "unscaled", False):
            raise ValueError(
                "ISGD.step: a GradScaler, and a closure that back-propagates the unscaled loss "
                "(isgd.loss_closure without one): isgd.loss_closure(opt, loss, grad_scaler=scaler)"
            )
        check_no_outside_grads(self._params(), self._grad_marks, self.shards)
        self._closure_weight = weight  # a well_trained() in the closure judges with it
        try:
            with torch.enable_grad():
                loss = closure()
        finally:
            self._closure_weight = None
        check_loss(loss)
        found_inf = amp.scaler_found_inf(grad_scaler, self)
        n_extra = self.observe(loss, weight=weight, found_inf=found_inf)
        self._observed = False
        if not (self.stats.last.skipped or self.stats.last.forward_only):
            self.base_optimizer.step()
        for _ in range(n_extra):
            with self.extra_pass(), torch.enable_grad():
                loss_i = closure()
            check_loss(loss_i)
            no_backward = self._told_to_stop(loss_i)  # the closure skipped backward()
            unscale = grad_scaler is not None and not no_backward
            found_inf = self.unscale_(grad_scaler) if unscale else None  # type: ignore[arg-type]
            if not self.above_limit(loss_i, found_inf=found_inf):
                break
            self.subproblem_grad_()
            self.subproblem_step_()
        amp.share_found_inf(grad_scaler, self, self.sync.last_inf)  # the passes' global OR
        self._grad_marks = grad_marks(self._params(), self.shards)  # p.grad as step() leaves it
        return loss

    def _closure_free_step(self, grad_scaler: torch.amp.GradScaler | None) -> None:
        if not self._observed and self._initialising_state():
            self.base_optimizer.step()
            return
        check_closure_given(self._observed, grad_scaler)  # observe() came first
        self._observed = False
        if self.stats.last.forward_only or self.stats.last.skipped:
            return  # no update; gradients, if the loop computed them anyway, are ignored
        found_inf = amp.bare_step_found_inf(self, grad_scaler, self._grads())
        if found_inf is not None and float(found_inf) > 0:
            self.stats.skip_last()  # the update just observed is not applied
            self._limit = None
            return
        self.base_optimizer.step()

    # ------------------------------------------------------------------ closure-free form
    @torch.no_grad()
    def observe(
        self, loss: Tensor | float, *, weight: float | None = None, found_inf: Tensor | None = None
    ) -> int:
        """Report the regular loss ψ of this step, *before* the base optimizer's step.

        Judges ψ against the chart (the limit is read before ψ joins it), adds ψ to the chart,
        and, when ψ is above the limit, remembers :math:`w_{t-1}` (the current weights) for the
        conservative term. Returns the number of extra iterations the loop may run: 0, or
        ``max_extra_iters`` on a triggered step. Under data parallelism ψ is the process-group
        mean (``weight``: this rank's weight in it); ``found_inf`` (a GradScaler's flag) travels
        in the same all-reduce, and inf on any rank makes the step a skipped one everywhere.
        Reads the loss once (one host-device sync).
        """
        check_loss(loss, "ISGD.observe(loss)", allow_number=True)
        self._begin_step()  # the window is set; a scheduler sees the step
        judged, self._judged = self._judged, None  # well_trained() synced this loss already
        if judged is not None and judged[0] is loss and found_inf is None:
            psi, any_inf = judged[1], False
        else:
            psi, any_inf = self.sync(loss, weight, found_inf)
        if not finite_loss(psi) and not any_inf and self.nonfinite == "raise":
            raise nonfinite_loss_error(psi, self.stats.steps + 1)  # before any change
        self._weight = weight
        record = self._judge(psi, any_inf)
        if not finite_loss(psi) and not any_inf:  # nonfinite="skip"
            record.skipped = True
            self.stats.nonfinite += 1
        self.chart.update(psi)
        self.stats.count_step(record)
        self._psi = None
        self._observed = True
        if not record.triggered:
            self._limit = None
            return 0
        self.stats.triggers += 1
        self._limit = record.limit
        self.solver = make_solver(self.inner_solver, self.base_optimizer)  # state afresh
        self._ratios = []
        if self.eps > 0:
            self._snapshot_w_prev()
        return self.max_extra_iters

    def _judge(self, psi: float, any_inf: bool) -> StepRecord:
        """The decision on ψ against the chart as it stands (before ψ joins it)."""
        self.chart.sigma_factor = self.sigma_factor  # the groups' (a scheduler may change it)
        mean, sigma, limit = self.chart.statistics()
        finite = not any_inf and finite_loss(psi)
        triggered = finite and self.max_extra_iters > 0 and limit is not None and psi > limit
        return StepRecord(psi, mean, sigma, limit, triggered, skipped=any_inf)

    @torch.no_grad()
    def well_trained(self, loss: Tensor | float, *, weight: float | None = None) -> bool:
        """True when the pass that computed ``loss`` needs no ``backward()``: the closure may
        return the loss without it, and the pass counts in ``stats.forward_passes``.

        In the paper's method that is the stop check of an extra iteration (inside
        :meth:`extra_pass`): ψ' ≤ limit ends the extra iterations, and the gradient of that pass
        would never be used. On the regular pass it is False, at no cost (``weight`` is for
        subclasses judging that pass; extra passes use the regular pass's). Under data
        parallelism every rank must call it (one all-reduce, reused by :meth:`above_limit`)."""
        if not self.in_extra_iteration or self._limit is None:
            return False
        psi, _ = self.sync(loss, self._weight, None)
        self._judged = (loss, psi)
        return not psi > self._limit

    def _told_to_stop(self, loss: object) -> bool:
        """:meth:`well_trained` answered True for this pass: its closure ran no backward()."""
        j, limit = self._judged, self._limit
        return j is not None and j[0] is loss and limit is not None and not j[1] > limit

    def above_limit(self, loss: Tensor | float, *, found_inf: Tensor | None = None) -> bool:
        """Report the loss ψ' of an extra iteration; True while it is still above the limit.

        When True, the loop runs backward (if not done yet), calls :meth:`subproblem_grad_` and
        :meth:`subproblem_step_`; when False it stops the extra iterations. ψ' is the
        process-group mean under data parallelism (one all-reduce, with ``found_inf``: non-finite
        gradients on any rank also stop the extra iterations on every rank).
        """
        if self._limit is None:
            raise RuntimeError("above_limit() called outside a triggered step (see observe())")
        judged, self._judged = self._judged, None
        told = judged is not None and judged[0] is loss and found_inf is None
        if told:  # well_trained() judged this pass (and the closure was told the answer)
            psi, any_inf = judged[1], False  # type: ignore[index]
        else:
            psi, any_inf = self.sync(loss, self._weight, found_inf)  # the stop rule needs ψ'
        self.stats.passes += 1
        self.stats.last.loss_after = psi
        self._psi = psi
        above = not any_inf and psi > self._limit
        self.stats.forward_passes += told and not above  # a stop check without backward()
        return above

    @contextlib.contextmanager
    def extra_pass(self) -> Iterator[None]:
        """Wrap the forward/backward of one extra iteration in a loop that owns them: BatchNorm
        statistics end as they started (with ``freeze_bn_stats``), and
        :attr:`in_extra_iteration` is True inside (loggers use it to skip these passes)."""
        guard = frozen_batchnorm_stats() if self.freeze_bn_stats else contextlib.nullcontext()
        self.in_extra_iteration = True
        try:
            with guard:
                yield
        finally:
            self.in_extra_iteration = False

    def unscale_(self, grad_scaler: torch.amp.GradScaler) -> Tensor | None:
        """Divide the gradients of an extra iteration by ``grad_scaler``'s scale, in place, and
        return its found-inf flag (for :meth:`above_limit`). ``GradScaler.unscale_`` may run only
        once between updates — the regular pass's — hence this. ``None`` if the scaler is off."""
        if not grad_scaler.is_enabled():
            return None
        return amp.unscale_grads(self._grads(), torch.tensor(grad_scaler.get_scale()))

    @torch.no_grad()
    def subproblem_grad_(self) -> None:
        r"""Turn the gradients :math:`\nabla\psi'` in ``p.grad`` into the subproblem's gradient

        .. math:: (\psi' - \text{limit})\,\nabla\psi' + \frac{\varepsilon}{n_w}(w - w_{t-1})

        in place, with ψ' the loss last given to :meth:`above_limit`. Gradients must be unscaled
        (call ``GradScaler.unscale_`` first under mixed precision).
        """
        if self._limit is None or self._psi is None:
            raise RuntimeError("subproblem_grad_() needs a loss reported by above_limit() first")
        params = [local(p) for p in self._params() if p.grad is not None]  # elementwise: shards
        grads = [local(p.grad) for p in self._params() if p.grad is not None]
        torch._foreach_mul_(grads, self._psi - self._limit)
        if self.eps > 0 and self._w_prev is not None:
            prev = [w for p, w in zip(self._params(), self._w_prev) if p.grad is not None]
            torch._foreach_add_(grads, torch._foreach_sub(params, prev), alpha=self.eps / self.n_w)
        self._psi = None
        self.stats.extra_iters += 1
        self.stats.last.extra_iters += 1

    @torch.no_grad()
    def subproblem_step_(self) -> None:
        """Apply the inner solver's update with the subproblem gradient in ``p.grad`` (after
        :meth:`subproblem_grad_`). For ``"base"`` this is ``base_optimizer.step()``, which a loop
        under a GradScaler may call through ``scaler.step(opt.base_optimizer)`` instead."""
        if self.diagnostics:
            ratio = momentum_ratio(self.solver, self.shards)
            if ratio is not None:
                self._ratios.append(ratio)
                self.stats.last.momentum_ratio = sum(self._ratios) / len(self._ratios)
        self.solver.step()

    def _snapshot_w_prev(self) -> None:
        """:math:`w_{t-1}`: this rank's part of each parameter (:func:`isgd.collective.local`)."""
        params = [local(p).detach() for p in self._params()]
        layout = [(p.shape, p.device, p.dtype) for p in params]
        if self._w_prev is None or [(w.shape, w.device, w.dtype) for w in self._w_prev] != layout:
            self._w_prev = [torch.empty_like(p) for p in params]  # preserve_format
        torch._foreach_copy_(self._w_prev, params)  # w_{t-1}: one copy, reused across triggers

    def _params_joined(self, params: list[Tensor]) -> None:
        """Parameters added mid-training join :math:`n_w`, the snapshot :math:`w_{t-1}` of a
        step in progress (as they are) and the inner solver's state; gradients they hold already
        are not mistaken for gradients accumulated outside the closure."""
        self._n_w += self.shards.join(params)
        if self._grad_marks is not None:
            self._grad_marks += grad_marks(params, self.shards)
        if self._w_prev is not None:
            self._w_prev += [
                local(p).detach().clone(memory_format=torch.preserve_format) for p in params
            ]
        self.solver.add_param_group(params)
