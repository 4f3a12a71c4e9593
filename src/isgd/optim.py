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

stopping as soon as :math:`\psi_w(d_t) \le \text{limit}`. Which steps is ``inner_solver``:
the base optimizer's own update, sharing its momentum buffer (``"base"``, the default), plain
gradient descent :math:`w \leftarrow w - \zeta\,\nabla\phi` with the group's learning rate
:math:`\zeta` (``"gd"``), or heavy-ball momentum on φ with a buffer started afresh at every
triggered step (``"momentum"``). See ``docs/algorithm.md`` for the
mapping between the paper's symbols and the arguments below.

(Why one module of ~740 lines: it is one algorithm. The closure form is written with the
closure-free methods, the GradScaler paths and the inner solvers are branches of the same step,
and the BatchNorm guard is used by both forms; split, a reader would follow one update across
files. Half of the lines are docstrings.)
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any, SupportsIndex

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState
from torch.optim import Optimizer

from isgd._numbers import is_real as _is_real
from isgd.collective import LossSync
from isgd.spc import (
    MAX_LOSS,
    LossControlChart,
    check_counter,
    check_same_window,
    finite_loss,
)

__all__ = [
    "INNER_SOLVERS",
    "ISGD",
    "NONFINITE",
    "ISGDStats",
    "StepRecord",
    "frozen_batchnorm_stats",
]

LossClosure = Callable[[], Tensor]
INNER_SOLVERS = ("base", "gd", "momentum")  # the update of the extra iterations (see ISGD)
NONFINITE = ("raise", "skip")  # what a NaN/inf regular loss does (see ISGD)


@dataclass
class StepRecord:
    """What happened in the last step (the regular loss ψ and the chart it was judged against)."""

    loss: float = math.nan  # ψ_w(d_t) of the regular pass
    mean: float | None = None  # the chart before ψ joined it
    sigma: float | None = None
    limit: float | None = None
    triggered: bool = False  # ψ > limit with a full window
    skipped: bool = False  # a GradScaler found inf/NaN gradients: no update this step
    extra_iters: int = 0  # subproblem updates applied
    loss_after: float | None = None  # last ψ evaluated on d_t in the extra iterations
    # ‖momentum term‖ / ‖∇φ‖ in the subproblem updates (mean over them; None: none, or no
    # momentum-SGD base): how much of an extra iteration is the velocity, how much the chase
    momentum_ratio: float | None = None
    # the variant's lower limit (lower_quantile of the window) and whether ψ fell below it:
    # a forward-only step, no backward wanted and no update applied
    lower_limit: float | None = None
    forward_only: bool = False


@dataclass
class ISGDStats:
    """Cumulative counters; ``passes`` counts every loss evaluation (forward, and backward where
    the loop ran one), the extra iterations included."""

    steps: int = 0
    triggers: int = 0
    nonfinite: int = 0  # steps skipped for a NaN/inf loss (nonfinite="skip")
    extra_iters: int = 0
    passes: int = 0
    forward_only: int = 0  # steps below the lower limit (variant): passes without a backward
    last: StepRecord = field(default_factory=StepRecord)

    @property
    def backward_passes(self) -> int:
        """Passes that wanted a backward: all but the forward-only steps'."""
        return self.passes - self.forward_only

    @property
    def trigger_rate(self) -> float:
        return self.triggers / self.steps if self.steps else 0.0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; everything is checked before anything changes
        (the counters are integers >= 0)."""
        if not isinstance(state, dict):
            raise TypeError(f"Invalid stats: {type(state).__name__} (an ISGDStats.state_dict())")
        missing = {"steps", "triggers", "extra_iters", "passes", "last"} - set(state)
        if missing:
            raise ValueError(
                f"Invalid stats: missing {sorted(missing)} (an ISGDStats.state_dict())"
            )
        counters = {
            name: check_counter(state.get(name, 0), f"stats.{name}")  # absent before the variant
            for name in ("steps", "triggers", "extra_iters", "passes", "forward_only", "nonfinite")
        }
        last = state["last"]
        known = {f.name for f in fields(StepRecord)}
        if not isinstance(last, dict) or not set(last) <= known:
            what = sorted(set(last) - known) if isinstance(last, dict) else type(last).__name__
            raise ValueError(f"Invalid stats.last: {what} (the fields of a StepRecord)")
        for name, value in counters.items():
            setattr(self, name, value)
        self.last = StepRecord(**last)


class ISGD(Optimizer):
    r"""Inconsistent SGD around a base optimizer.

    Per step, with ψ the regular loss of batch :math:`d_t` and :math:`w_{t-1}` the weights before
    the step::

        ψ ← closure();  decide  triggered = (chart full and ψ > limit)   # limit: before ψ joins
        w ← base_step(w, ∇ψ)
        if triggered, repeat up to max_extra_iters times:
            ψ' ← closure();  if ψ' ≤ limit: break
            w ← inner_step(w, (ψ' − limit)·∇ψ' + (ε/n_w)·(w − w_{t−1}))   # base_step by default
        chart ← chart + ψ

    **Variant, not the paper's method** (``lower_quantile`` = q > 0): the patent's abstract (US
    10,572,800 B2) also promises fewer iterations for well-trained batches. With q > 0, a step
    whose ψ is below the lower limit — the q-quantile of the window, read before ψ joins — is
    *forward-only*: ψ joins the chart, no update is applied, and :meth:`well_trained` tells the
    loop beforehand so that it can skip ``backward()`` (the compute saved). The paper's ISGD is
    q = 0, the default.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim`` optimizer.
        base_optimizer: the optimizer *class* whose update rule ISGD applies (``torch.optim.SGD``
            by default; SGD with momentum or Nesterov, Adam and AdamW are tested).
        window: batches per epoch :math:`n_b`; the chart holds the last ``window`` losses. An
            integer (``int``, ``numpy.int64``, ...) in [2, 2**31 − 1] (``isgd.spc.MAX_WINDOW``).
            The first ``window`` steps fill the chart and are plain base-optimizer steps, so a
            window longer than the run makes ISGD the base optimizer throughout. Structural: a
            state saved with another window is refused by :meth:`load_state_dict`.
        sigma_factor: ``k`` in ``limit = mean + k·sigma`` (default 3).
        max_extra_iters: the paper's ``stop``: extra iterations at most per triggered step.
            0 makes ISGD exactly the base optimizer. Default 5 (the paper is silent; see
            ``docs/algorithm.md``).
        eps: the conservative weight :math:`\varepsilon` ("preferably 0.1" in the paper).
        inner_solver: the update of the extra iterations. ``"base"`` (default): the base
            optimizer's step with ∇φ as the gradient (its momentum buffer, weight decay and
            state shared with the regular steps). ``"gd"``: ``w ← w − lr·∇φ``, no momentum, no
            weight decay, the base's state untouched (the reading that the paper's solver is
            gradient descent on φ with step ζ). ``"momentum"``: ``v ← μ·v + ∇φ; w ← w − lr·v``
            with the group's ``momentum`` μ and ``v`` zeroed at each triggered step. The paper
            does not say which; ``docs/algorithm.md`` has the measurement.
        lower_quantile: q of the variant above (0: off, the paper's method; else in (0, 1)).
        nonfinite: a NaN or infinite regular loss (without a GradScaler, whose found-inf steps
            are skipped as it would) — ``"raise"`` (default): ``FloatingPointError`` before any
            update or state change; ``"skip"``: no update, the loss stays out of the chart, the
            step is counted in ``stats.nonfinite`` and marked ``skipped`` (OLMo-core's
            skip-step does the same for loss spikes). A loss of magnitude above 1e100
            (``isgd.spc.MAX_LOSS``: the chart's float64 sums of squares would overflow) counts
            as non-finite.
        freeze_bn_stats: keep BatchNorm running statistics unchanged by the extra passes
            (the regular pass still updates them). Works by watching module calls while the
            extra iterations run, so no model needs to be passed.
        process_group, sync_loss: which loss the decisions read (:class:`isgd.collective.LossSync`).
            By default (``sync_loss=None``), when ``torch.distributed`` is initialised with more
            than one process, every decision reads the process-group mean of the ranks' losses —
            one all-reduce of three scalars per pass — so all ranks take the same decisions and
            their collectives stay matched. ``sync_loss=False`` opts out, for loops that already
            pass a loss that is the same on every rank; ``process_group`` names a group other
            than the default one.
        **base_kwargs: hyper-parameters of the base optimizer (``lr``, ``momentum``, ...).

    The closure given to :meth:`step` must zero the gradients, compute the batch loss, call
    ``backward()`` and return the loss — the same contract as ``torch.optim.LBFGS`` (it is called
    several times per step on a triggered batch). Gradient accumulation belongs *inside* the
    closure (zero once, back-propagate every micro-batch, return their mean loss); gradients
    accumulated before :meth:`step` would be discarded by the closure's ``zero_grad`` and are
    refused. Mixed precision: ``step(closure, grad_scaler=scaler)``, or ``scaler.step(opt,
    closure)``, with a closure that back-propagates ``scaler.scale(loss)``. For loops that own
    ``backward()`` use :meth:`observe`, then a bare :meth:`step`, then :meth:`above_limit` and
    :meth:`subproblem_grad_` for the extra iterations; see ``docs/integrations.md``.

    With ``lower_quantile`` the closure may ask ``opt.well_trained(loss)`` after its forward
    pass and return the loss without ``backward()`` when it is True; ISGD then applies no update.
    The forward pass of such a step has already updated BatchNorm running statistics; a loop
    that wants them untouched restores them (the trainer does).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = ISGD(model.parameters(), lr=0.1, momentum=0.9, window=100)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.cross_entropy(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: type[Optimizer] = torch.optim.SGD,
        *,
        window: int,
        sigma_factor: float = 3.0,
        max_extra_iters: int = 5,
        eps: float = 0.1,
        inner_solver: str = "base",
        lower_quantile: float = 0.0,
        nonfinite: str = "raise",
        freeze_bn_stats: bool = True,
        process_group: Any = None,
        sync_loss: bool | None = None,
        **base_kwargs: Any,
    ) -> None:
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer)):
            raise TypeError(
                f"Invalid base_optimizer: {base_optimizer!r} (must be a torch.optim.Optimizer "
                "subclass such as torch.optim.SGD, not an instance)"
            )
        if base_optimizer is ISGD or base_optimizer is torch.optim.LBFGS:
            raise TypeError(f"Invalid base_optimizer: {base_optimizer.__name__} cannot be wrapped")
        lr = base_kwargs.get("lr")
        _check_lr(lr)
        hyper = _check_hyper_parameters(
            max_extra_iters, eps, inner_solver, lower_quantile, nonfinite, freeze_bn_stats
        )
        self.chart = LossControlChart(window, sigma_factor)  # validates window, sigma_factor
        self.sync = LossSync(process_group, sync_loss)

        super().__init__(params, dict(base_kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        # One list of groups for both: LR schedulers, zero_grad and add_param_group see the same.
        self.param_groups = self.base_optimizer.param_groups
        self.defaults = self.base_optimizer.defaults

        self.max_extra_iters: int = hyper["max_extra_iters"]
        self.eps: float = hyper["eps"]
        self.inner_solver: str = hyper["inner_solver"]
        self.lower_quantile: float = hyper["lower_quantile"]
        self.nonfinite: str = hyper["nonfinite"]
        self.freeze_bn_stats: bool = hyper["freeze_bn_stats"]
        self.stats = ISGDStats()
        self._w_prev: list[Tensor] | None = None  # w_{t−1}, allocated on the first trigger
        self._v: list[list[Tensor]] | None = None  # inner_solver="momentum": φ's own velocity
        self._ratios: list[float] = []  # momentum ratios of the step in progress
        self._limit: float | None = None  # the limit of the step in progress (None: no trigger)
        self._psi: float | None = None  # the last extra-iteration loss reported
        self._weight: float | None = None  # this rank's weight in the mean loss of the step
        self._observed = False  # observe() ran and the step's update is still to come
        self._judged: tuple[object, float, StepRecord] | None = (
            None  # well_trained()'s (loss, ψ, decision)
        )
        #: True while step() re-runs the closure for an extra iteration (loggers skip those passes)
        self.in_extra_iteration = False
        self._grad_marks: list[int | None] | None = None  # p.grad versions step() left behind

    # ------------------------------------------------------------------ hyper-parameters
    @property
    def window(self) -> int:
        return self.chart.window

    @property
    def sigma_factor(self) -> float:
        return self.chart.sigma_factor

    @property
    def n_w(self) -> int:
        """Number of weights :math:`n_w` (all elements of all parameters in all groups)."""
        return sum(p.numel() for group in self.param_groups for p in group["params"])

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

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
                ``grad_scaler`` if one is used) and returns it; called once more per extra
                iteration. ``None`` is the closure-free form: the loop has back-propagated and
                called :meth:`observe`; ``step()`` then applies the base update.
            weight: this rank's weight in the process-group mean of the loss (its sample count
                when ranks hold batches of different sizes); ignored in a single process.
            grad_scaler: a ``torch.amp.GradScaler``; gradients of every pass are unscaled and
                checked for inf/NaN before ISGD uses them. Inf in the regular pass skips the
                update (on every rank alike) as ``GradScaler.step`` would; inf in an extra
                iteration ends the extra iterations. Call ``grad_scaler.update()`` after.
        """
        if closure is None:
            self._closure_free_step(grad_scaler)
            return None
        if grad_scaler is None and getattr(self, "grad_scale", None) is not None:
            raise RuntimeError(
                "ISGD.step(closure) was called by a GradScaler that does not hand itself over "
                "(a wrapper changed step's signature, as accelerate's AcceleratedOptimizer does "
                "under fp16): call the ISGD optimizer's step(closure, grad_scaler=scaler) "
                "directly, then scaler.update()"
            )
        self._refuse_outside_grads()
        with torch.enable_grad():
            loss = closure()
        _check_loss(loss)
        found_inf = _unscale_once(grad_scaler, self)
        n_extra = self.observe(loss, weight=weight, found_inf=found_inf)
        self._observed = False
        if not (self.stats.last.skipped or self.stats.last.forward_only):
            self.base_optimizer.step()
        for _ in range(n_extra):
            with self.extra_pass(), torch.enable_grad():
                loss_i = closure()
            _check_loss(loss_i)
            found_inf = None if grad_scaler is None else self.unscale_(grad_scaler)
            if not self.above_limit(loss_i, found_inf=found_inf):
                break
            self.subproblem_grad_()
            self.subproblem_step_()
        self._grad_marks = [None if p.grad is None else p.grad._version for p in self._params()]
        return loss

    def _closure_free_step(self, grad_scaler: torch.amp.GradScaler | None) -> None:
        if not self._observed and grad_scaler is not None:
            raise TypeError(
                "Invalid closure: None (GradScaler.step(opt) without a closure cannot re-run the "
                "batch for ISGD's extra iterations: call opt.step(closure, grad_scaler=scaler) "
                "with a closure that back-propagates scaler.scale(loss), or opt.observe(loss) "
                "before scaler.step(opt) in a loop that owns backward())"
            )
        if not self._observed:
            raise TypeError(
                "Invalid closure: None (ISGD.step needs a closure that zeroes the gradients, "
                "computes the batch loss, calls backward() and returns the loss, or, in a loop "
                "that owns backward(), opt.observe(loss) before a bare opt.step(); frameworks: "
                "see isgd.integrations)"
            )
        self._observed = False
        if self.stats.last.forward_only or self.stats.last.skipped:
            return None  # no update; gradients, if the loop computed them anyway, are ignored
        if grad_scaler is not None:  # GradScaler.step(opt) handed itself over
            found_inf = _unscale_once(grad_scaler, self)
        else:  # GradScaler's attribute protocol (found_inf / grad_scale set on the optimizer)
            found_inf = _unscale_by(self._grads(), getattr(self, "grad_scale", None))
            outer = getattr(self, "found_inf", None)
            if outer is not None:
                found_inf = outer if found_inf is None else found_inf + outer
        if found_inf is not None and float(found_inf) > 0:
            self._skip_step()
            return None
        self.base_optimizer.step()
        return None

    # ------------------------------------------------------------------ closure-free form
    @torch.no_grad()
    def observe(
        self,
        loss: Tensor | float,
        *,
        weight: float | None = None,
        found_inf: Tensor | None = None,
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
        _check_loss(loss, "ISGD.observe(loss)", allow_number=True)
        judged = None  # well_trained() synced and judged this loss already: not twice
        if self._judged is not None and self._judged[0] is loss and found_inf is None:
            _, psi, judged = self._judged
            any_inf = False
        else:
            psi, any_inf = self.sync(loss, weight, found_inf)
        self._judged = None
        if not finite_loss(psi) and not any_inf and self.nonfinite == "raise":
            beyond = f" (beyond ±{MAX_LOSS:g}: non-finite for ISGD)" if math.isfinite(psi) else ""
            raise FloatingPointError(
                f"ISGD: the batch loss is {psi}{beyond} at step {self.stats.steps + 1}; no update "
                "was applied and nothing changed. Lower the learning rate or check the batch; "
                "ISGD(nonfinite='skip') skips such steps instead (counted in stats.nonfinite)"
            )
        self._weight = weight
        record = judged or self._judge(psi, any_inf)
        if not finite_loss(psi) and not any_inf:  # nonfinite="skip"
            record.skipped = True
            self.stats.nonfinite += 1
        self.chart.update(psi)

        self.stats.steps += 1
        self.stats.passes += 1
        self.stats.forward_only += record.forward_only
        self.stats.last = record
        self._psi = None
        self._observed = True
        if not record.triggered:
            self._limit = None
            return 0
        self.stats.triggers += 1
        self._limit = record.limit
        self._v, self._ratios = None, []
        if self.eps > 0:
            self._snapshot_w_prev()
        return self.max_extra_iters

    def _judge(self, psi: float, any_inf: bool) -> StepRecord:
        """The decision on ψ against the chart as it stands (before ψ joins it)."""
        mean, sigma, limit = self.chart.statistics()
        finite = not any_inf and finite_loss(psi)
        triggered = finite and self.max_extra_iters > 0 and limit is not None and psi > limit
        lower = self.chart.quantile(self.lower_quantile) if self.lower_quantile > 0 else None
        forward_only = finite and not triggered and lower is not None and psi < lower
        return StepRecord(
            psi, mean, sigma, limit, triggered, skipped=any_inf, lower_limit=lower,
            forward_only=forward_only,
        )  # fmt: skip

    @torch.no_grad()
    def well_trained(self, loss: Tensor | float, *, weight: float | None = None) -> bool:
        """True when the regular loss ψ is below the variant's lower limit (``lower_quantile``
        of the window): the step about to be observed will be forward-only, so the loop can
        skip ``backward()``. Always False with ``lower_quantile`` = 0 (no sync, no host read).
        Call it with the loss that :meth:`observe` (or the closure's return) will report; under
        data parallelism every rank must call it (one all-reduce, reused by :meth:`observe`)."""
        if self.lower_quantile <= 0:
            return False
        psi, any_inf = self.sync(loss, weight, None)
        record = self._judge(psi, any_inf)
        self._judged = (loss, psi, record)
        return record.forward_only

    def above_limit(self, loss: Tensor | float, *, found_inf: Tensor | None = None) -> bool:
        """Report the loss ψ' of an extra iteration; True while it is still above the limit.

        When True, the loop runs backward (if not done yet), calls :meth:`subproblem_grad_` and
        the base optimizer's step; when False it stops the extra iterations. ψ' is the
        process-group mean under data parallelism (one all-reduce, with ``found_inf``: non-finite
        gradients on any rank also stop the extra iterations on every rank).
        """
        if self._limit is None:
            raise RuntimeError("above_limit() called outside a triggered step (see observe())")
        psi, any_inf = self.sync(loss, self._weight, found_inf)  # the stop rule needs ψ'
        self.stats.passes += 1
        self.stats.last.loss_after = psi
        self._psi = psi
        return not any_inf and psi > self._limit

    def _skip_step(self) -> None:
        """The update of the step just observed is not applied (non-finite gradients)."""
        record = self.stats.last
        if record.triggered:
            self.stats.triggers -= 1
        record.triggered, record.skipped = False, True
        self._limit = None

    def _refuse_outside_grads(self) -> None:
        """Gradients back-propagated since the last step would be zeroed by the closure."""
        marks = self._grad_marks
        params = self._params()
        touched = [
            p.grad
            for i, p in enumerate(params)
            if p.grad is not None
            and (marks is None or len(marks) != len(params) or marks[i] != p.grad._version)
        ]
        if touched and bool(torch.stack(torch._foreach_norm(touched)).sum() > 0):
            raise RuntimeError(
                "ISGD.step(closure): the parameters hold gradients back-propagated outside the "
                "closure (gradient accumulation?), which the closure's zero_grad() would discard; "
                "run every micro-batch inside the closure (docs/integrations.md#gradient-"
                "accumulation), or zero the gradients before step()"
            )

    def _grads(self) -> list[Tensor]:
        return [p.grad for p in self._params() if p.grad is not None]

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
        return _unscale_by(self._grads(), torch.tensor(grad_scaler.get_scale()))

    @torch.no_grad()
    def subproblem_grad_(self) -> None:
        r"""Turn the gradients :math:`\nabla\psi'` in ``p.grad`` into the subproblem's gradient

        .. math:: (\psi' - \text{limit})\,\nabla\psi' + \frac{\varepsilon}{n_w}(w - w_{t-1})

        in place, with ψ' the loss last given to :meth:`above_limit`. Gradients must be unscaled
        (call ``GradScaler.unscale_`` first under mixed precision).
        """
        if self._limit is None or self._psi is None:
            raise RuntimeError("subproblem_grad_() needs a loss reported by above_limit() first")
        params = [p for p in self._params() if p.grad is not None]
        grads = [p.grad for p in params if p.grad is not None]
        torch._foreach_mul_(grads, self._psi - self._limit)
        if self.eps > 0 and self._w_prev is not None:
            prev = [w for p, w in zip(self._params(), self._w_prev) if p.grad is not None]
            torch._foreach_add_(grads, torch._foreach_sub(params, prev), alpha=self.eps / self.n_w)
        self._psi = None
        self.stats.extra_iters += 1
        self.stats.last.extra_iters += 1

    @torch.no_grad()
    def subproblem_step_(self) -> None:
        """Apply the ``inner_solver``'s update with the subproblem gradient in ``p.grad`` (after
        :meth:`subproblem_grad_`). For ``"base"`` this is ``base_optimizer.step()``, which a loop
        under a GradScaler may call through ``scaler.step(opt.base_optimizer)`` instead."""
        self._record_momentum_ratio()
        if self.inner_solver == "base":
            self.base_optimizer.step()
            return
        velocity = self._velocity() if self.inner_solver == "momentum" else None
        for i, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            direction = [p.grad for p in params if p.grad is not None]
            if velocity is not None:
                v = [velocity[i][j] for j, p in enumerate(group["params"]) if p.grad is not None]
                torch._foreach_mul_(v, float(group.get("momentum", 0.0)))
                torch._foreach_add_(v, direction)
                direction = v
            lr = group["lr"]
            torch._foreach_add_(params, direction, alpha=-float(lr))

    def _velocity(self) -> list[list[Tensor]]:  # per group, per parameter
        if self._v is None:
            self._v = [[torch.zeros_like(p) for p in g["params"]] for g in self.param_groups]
        return self._v

    def _record_momentum_ratio(self) -> None:
        """‖momentum term‖ / ‖∇φ‖ of the update about to be applied, kept for the step record.
        Only in extra iterations; norms only (no copies) and one host sync."""
        if self.inner_solver == "base" and not isinstance(self.base_optimizer, torch.optim.SGD):
            return  # no velocity to compare with (Adam's moments are not one)
        grads, momentum_norms = [], []
        for i, group in enumerate(self.param_groups):
            mu = float(group.get("momentum", 0.0) or 0.0)
            buffers = []
            for j, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                grads.append(p.grad)
                if self.inner_solver == "momentum" and self._v is not None:
                    buffers.append(self._v[i][j])
                elif self.inner_solver == "base":
                    buf = self.base_optimizer.state.get(p, {}).get("momentum_buffer")
                    if buf is not None:
                        buffers.append(buf)
            if buffers and mu:  # ‖μ·v‖ = μ‖v‖; "gd" has none
                momentum_norms.append(mu * torch.stack(torch._foreach_norm(buffers)).norm())
        if not grads:
            return
        g = torch.stack(torch._foreach_norm(grads)).norm()
        m = torch.stack(momentum_norms).norm() if momentum_norms else g.new_zeros(())
        ratio = float(m / g)  # the one host sync; ∇φ = 0 gives inf/NaN, not recorded
        if math.isfinite(ratio):
            self._ratios.append(ratio)
            self.stats.last.momentum_ratio = sum(self._ratios) / len(self._ratios)

    def _snapshot_w_prev(self) -> None:
        params = self._params()
        if (
            self._w_prev is None
            or any(
                w.shape != p.shape or w.device != p.device or w.dtype != p.dtype
                for w, p in zip(self._w_prev, params)
            )
            or len(self._w_prev) != len(params)
        ):
            self._w_prev = [
                torch.empty_like(p, memory_format=torch.preserve_format) for p in params
            ]
        torch._foreach_copy_(self._w_prev, [p.detach() for p in params])

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Base optimizer state, the chart and the counters: enough to resume bit-identically."""
        return {
            "base": self.base_optimizer.state_dict(),
            "chart": self.chart.state_dict(),
            "stats": self.stats.state_dict(),
            "isgd": {
                "window": self.window,
                "sigma_factor": self.sigma_factor,
                "max_extra_iters": self.max_extra_iters,
                "eps": self.eps,
                "inner_solver": self.inner_solver,
                "lower_quantile": self.lower_quantile,
                "nonfinite": self.nonfinite,
                "freeze_bn_stats": self.freeze_bn_stats,
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output. The whole state is checked before anything
        changes (the base optimizer's by ``torch.optim``). The window is structural: a state
        saved with another window is refused. The other saved hyper-parameters win over the
        constructor's, as ``param_groups``' do in ``torch.optim`` (older files lack some)."""
        if not isinstance(state_dict, dict):
            raise TypeError(
                f"Invalid state_dict: {type(state_dict).__name__} (an ISGD.state_dict())"
            )
        missing = {"base", "chart", "stats"} - set(state_dict)
        if missing:
            raise ValueError(
                f"not an ISGD state_dict: missing {sorted(missing)} (a plain optimizer's "
                "state_dict goes to ISGD.base_optimizer.load_state_dict)"
            )
        saved = state_dict.get("isgd", {})
        chart_state = state_dict["chart"]
        if not isinstance(saved, dict):
            raise TypeError(f"Invalid isgd: {type(saved).__name__} (the saved hyper-parameters)")
        for where in (saved, chart_state):
            if isinstance(where, dict) and "window" in where:
                check_same_window(where["window"], self.window, "this optimizer")
        LossControlChart(self.window).load_state_dict(chart_state)  # checks it, changes nothing
        ISGDStats().load_state_dict(state_dict["stats"])  # the same
        hyper = _check_hyper_parameters(*(saved.get(k, getattr(self, k)) for k in _HYPER))
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.param_groups = self.base_optimizer.param_groups
        self.chart.load_state_dict(chart_state)  # sigma_factor with it
        self.stats.load_state_dict(state_dict["stats"])
        for name, value in hyper.items():
            setattr(self, name, value)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group, as for any ``torch.optim`` optimizer — also mid-training: the
        new parameters join :math:`n_w`, the snapshot :math:`w_{t-1}` of a step in progress and
        ``inner_solver="momentum"``'s velocity, and gradients they hold already (back-propagated
        before they joined) are not mistaken for gradients accumulated outside the closure."""
        if isinstance(param_group, dict):
            _check_lr(param_group.get("lr"))
        if not hasattr(self, "base_optimizer"):  # called by Optimizer.__init__
            super().add_param_group(param_group)
            return
        self.base_optimizer.add_param_group(param_group)
        new = self.param_groups[-1]["params"]
        if self._grad_marks is not None:
            self._grad_marks += [None if p.grad is None else p.grad._version for p in new]
        if self._w_prev is not None:  # w_{t-1} of the new parameters: as they are
            self._w_prev += [p.detach().clone(memory_format=torch.preserve_format) for p in new]
        if self._v is not None:
            self._v.append([torch.zeros_like(p) for p in new])

    def __repr__(self) -> str:
        return (
            f"ISGD(base={type(self.base_optimizer).__name__}, window={self.window}, "
            f"sigma_factor={self.sigma_factor}, max_extra_iters={self.max_extra_iters}, "
            f"eps={self.eps}, inner_solver={self.inner_solver!r}, "
            f"lower_quantile={self.lower_quantile}, nonfinite={self.nonfinite!r}, "
            f"freeze_bn_stats={self.freeze_bn_stats}, "
            f"groups={self.base_optimizer.param_groups!r})"
        )


@contextlib.contextmanager
def frozen_batchnorm_stats() -> Iterator[None]:
    """Inside this block, BatchNorm/InstanceNorm running statistics end as they started.

    Every normalisation module that runs in training mode with ``track_running_stats`` has its
    ``running_mean``, ``running_var`` and ``num_batches_tracked`` saved and restored on exit.
    Batch statistics are still used for normalisation, exactly as in the regular pass.
    Implemented with a global forward pre-hook, so it needs no model reference: the first call of
    a module not seen yet saves every normalisation module *under* it, so a model compiled with
    ``torch.compile`` (whose submodules run inside the graph, without hooks) is covered through
    the one call of its ``OptimizedModule``.
    """
    seen: set[int] = set()
    saved: list[tuple[Tensor, Tensor]] = []

    def hook(module: torch.nn.Module, _args: Any) -> None:
        if id(module) in seen:
            return
        for sub in module.modules():
            if id(sub) in seen:
                continue
            seen.add(id(sub))
            if isinstance(sub, torch.nn.modules.batchnorm._NormBase) and sub.track_running_stats:
                buffers = (sub.running_mean, sub.running_var, sub.num_batches_tracked)
                saved.extend((b, b.detach().clone()) for b in buffers if b is not None)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
        with torch.no_grad():
            for buffer, copy in saved:
                buffer.copy_(copy)


def _check_loss(loss: object, where: str = "closure result", allow_number: bool = False) -> None:
    if allow_number and _is_real(loss):
        return
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        what = type(loss).__name__ if not isinstance(loss, Tensor) else f"shape {tuple(loss.shape)}"
        raise TypeError(
            f"Invalid {where}: {what} (the batch loss must be a one-element tensor"
            + (" or a number" if allow_number else "")
            + "; the closure computes it, calls backward() and returns it)"
        )


def _unscale_once(scaler: torch.amp.GradScaler | None, opt: Optimizer) -> Tensor | None:
    """The scaler's own unscale of this step (unless the loop already called it): gradients
    unscaled in place, the found-inf flag it recorded returned."""
    if scaler is None or not scaler.is_enabled():
        return None
    state = scaler._per_optimizer_states[id(opt)]
    if state["stage"] is OptState.READY:
        scaler.unscale_(opt)
    flags = list(state["found_inf_per_device"].values())
    return torch.stack([f.to(flags[0].device) for f in flags]).sum() if flags else None


def _unscale_by(grads: list[Tensor], scale: Tensor | None) -> Tensor | None:
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


def _check_lr(lr: object) -> None:
    if lr is not None and not (isinstance(lr, Tensor) or (_is_real(lr) and lr >= 0)):
        raise ValueError(f"Invalid lr: {lr!r} (must be a number >= 0)")


def _check_hyper_parameters(
    max_extra_iters: object,
    eps: object,
    inner_solver: object,
    lower_quantile: object,
    nonfinite: object,
    freeze_bn_stats: object,
) -> dict[str, Any]:
    """ISGD's hyper-parameters but the window and sigma_factor (the chart's), checked and
    normalised (``numpy.int64(5)`` → 5); the constructor's and :meth:`ISGD.load_state_dict`'s."""
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
    if not _is_real(lower_quantile) or not 0 <= lower_quantile < 1:
        raise ValueError(
            f"Invalid lower_quantile: {lower_quantile!r} (0: off, else a fraction in (0, 1))"
        )
    if nonfinite not in NONFINITE:
        raise ValueError(f"Invalid nonfinite: {nonfinite!r} (one of {', '.join(NONFINITE)})")
    kind = type(freeze_bn_stats)
    if not (isinstance(freeze_bn_stats, bool) or (kind.__module__, kind.__name__) in _NP_BOOLS):
        raise TypeError(f"Invalid freeze_bn_stats: {freeze_bn_stats!r} (must be True or False)")
    return {
        "max_extra_iters": operator.index(max_extra_iters),
        "eps": float(eps),
        "inner_solver": str(inner_solver),
        "lower_quantile": float(lower_quantile),
        "nonfinite": str(nonfinite),
        "freeze_bn_stats": bool(freeze_bn_stats),
    }


# the saved hyper-parameters, in _check_hyper_parameters' order
_HYPER = "max_extra_iters", "eps", "inner_solver", "lower_quantile", "nonfinite", "freeze_bn_stats"
_NP_BOOLS = {("numpy", "bool"), ("numpy", "bool_")}  # NumPy's booleans, without importing it
