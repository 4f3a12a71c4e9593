r"""ISGD's relatives as arms of ``isgd compare``: SkipStep, Selective Backprop, random controls.

Methods that spend training effort unevenly by loss, measured beside ISGD under one protocol
(``docs/design.md``, *The relatives*). They live in the application: the library stays ISGD's.
Every arm is still one :class:`isgd.ISGD` (``max_extra_iters=0`` over a plain base), stepped by
the trainer's closure; what differs is a rule, here:

- ``skipstep[-BASE]`` — OLMo-core's ``SkipStepOptimizer`` (:class:`SkipRule`,
  :class:`SkipStepISGD`): no update (no parameter change, no base-optimizer state change) on a
  step whose loss, and with ``skip_grad_norm`` whose gradient norm, is above mean + k·σ of a
  rolling window of the previous steps.
- ``selective-backprop[-BASE]`` — Composer's ``SelectiveBackprop`` (:class:`SubsetStep`): a
  no-grad forward gives per-example losses, a fraction ``keep`` of the batch drawn by loss
  percentile is back-propagated, on Composer's schedule (:func:`selecting`).
- the random controls, the same amount of skipped work chosen at random, seeded from the run's
  seed: ``random_skip_steps`` (:class:`RandomSkipISGD`: that fraction of the steps
  forward-only — the control of the forward-only variant and of SkipStep) and ``random_keep``
  (:class:`SubsetStep` with a random subset on the selective-backprop schedule).

**Charged compute.** ``passes`` and ``backward_passes`` count passes over training batches as
for every arm: a selective-backprop step is two passes, the selection forward (no backward) and
the training pass (a backward). A pass on part of a batch is weighed by ``backward_batches``: the
backward passes, each counting the fraction of the batch it trained on (selective-backprop and
``random_keep`` runs record it; :func:`isgd.experiments.budgets.cost` charges it).
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections import deque
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from isgd.batchnorm import frozen_batchnorm_stats
from isgd.errors import ConfigError
from isgd.optim import ISGD, StepRecord
from isgd.spc import finite_loss

if TYPE_CHECKING:
    from collections.abc import Callable

    from isgd.training.config import TrainConfig
    from isgd.training.train import Trainer

__all__ = [
    "RandomSkipISGD",
    "SkipRule",
    "SkipStepISGD",
    "StepStrategy",
    "SubsetStep",
    "base_family",
    "check_config",
    "per_example_losses",
    "random_draw",
    "select_at_random",
    "select_by_loss",
    "selecting",
    "skips_updates",
    "step_strategy",
]

METHODS = ("isgd", "skipstep", "selective-backprop")  # METHOD[-BASE]; alone: over sgd


def base_family(optimizer: str) -> tuple[str, str]:
    """``(method, base)`` of an optimizer name: ``"skipstep-adamw"`` → ``("skipstep", "adamw")``,
    ``"isgd"`` → ``("isgd", "sgd")``, ``"adam"`` → ``("", "adam")``."""
    for method in METHODS:
        if optimizer == method:
            return method, "sgd"
        if optimizer.startswith(method + "-"):
            return method, optimizer[len(method) + 1 :]
    return "", optimizer


def skips_updates(config: TrainConfig) -> bool:
    """The arm skips some steps' updates (SkipStep, ``random_skip_steps``): BatchNorm's running
    statistics of such a step are put back, as for a skipped or forward-only ISGD step."""
    return base_family(config.optimizer)[0] == "skipstep" or config.random_skip_steps > 0


def check_config(config: TrainConfig, need: Callable[[bool, str, str], None]) -> None:
    """The relatives' keys, checked for :meth:`TrainConfig.validate` (``need(ok, key, what)``)."""
    method = base_family(config.optimizer)[0]
    k = config.skip_sigma_factor
    need(k > 0, "skip_sigma_factor", "a number > 0 (inf: never skip)")  # NaN fails too
    need(config.skip_window >= 2, "skip_window", "losses in the rolling window, >= 2")
    need(0 < config.keep <= 1, "keep", "the fraction of a batch back-propagated, in (0, 1]")
    for key in ("keep_start", "keep_end"):
        need(0 <= getattr(config, key) <= 1, key, "a fraction of the run in [0, 1]")
    need(config.keep_start <= config.keep_end, "keep_end", "must be >= keep_start")
    need(config.keep_interrupt >= 0, "keep_interrupt", "every N-th batch whole, >= 0 (0: none)")
    need(0 <= config.random_skip_steps <= 1, "random_skip_steps", "a fraction of the steps")
    need(0 <= config.random_keep < 1, "random_keep", "a fraction of a batch in [0, 1) (0: off)")
    if config.random_skip_steps > 0:
        others = method in ("skipstep", "selective-backprop") or config.lower_quantile > 0
        need(
            not (others or config.random_keep > 0),
            "random_skip_steps",
            "the random control of one rule: not with skipstep, selective-backprop, "
            "lower_quantile or random_keep",
        )
    if config.random_keep > 0:
        need(
            method == "",
            "random_keep",
            "the random control of selective-backprop: over a plain optimizer (sgd, nesterov, "
            "adam, adamw)",
        )


# ---------------------------------------------------------------------- random draws
def _seed(tag: str, seed: int, step: int) -> int:
    """A 63-bit seed for draw ``step`` of stream ``tag`` of the run's ``seed`` (stateless: a
    resumed run draws the same; every rank draws the same)."""
    digest = hashlib.sha256(f"isgd:{tag}:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _uniform(tag: str, seed: int, step: int) -> float:
    """A uniform number in [0, 1) for draw ``step`` of stream ``tag``."""
    return (_seed(tag, seed, step) >> 10) / 2.0**53


def _generator(tag: str, seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(tag, seed, step))


def random_draw(seed: int, step: int, total: int, left: int) -> bool:
    r"""Selection sampling (Knuth's algorithm S), stateless: step :math:`t` of :math:`T`, with
    :math:`\ell` draws left to make, is drawn when :math:`u_t\,(T - t) < \ell`, :math:`u_t`
    uniform from ``(seed, t)``. Drawing along a run makes exactly the :math:`c` draws it starts
    with (any :math:`\ell \ge T - t` draws every step left), every :math:`c`-subset alike."""
    return left > 0 and _uniform("random-skip", seed, step) * max(total - step, 1) < left


# ---------------------------------------------------------------------- SkipStep
class SkipRule:
    r"""OLMo-core's ``SkipStepOptimizer`` rule on a stream of losses (and gradient norms).

    Step :math:`t` with loss :math:`\psi_t` (and gradient norm :math:`g_t`) is *skipped* when

    .. math::
        n_t \ge \max(2, \lfloor N/2 \rfloor) \;\wedge\;
        \big(\psi_t - \bar\psi > k\,s_\psi \;\vee\; g_t - \bar g > k\,s_g\big)

    where :math:`\bar\psi, s_\psi` are the mean and the sample standard deviation (n − 1) of the
    up to :math:`N` losses before :math:`\psi_t`, :math:`n_t` the losses held counting
    :math:`\psi_t` (and at least 2 before it), and the norm's term is there only when norms are
    given. As in OLMo-core, every step's loss joins the window, a skipped step's too;
    :math:`k = \infty` never skips. Defaults: :math:`k = 6`, :math:`N = 128`.
    """

    def __init__(self, sigma_factor: float = 6.0, window: int = 128) -> None:
        self.sigma_factor, self.window = float(sigma_factor), int(window)
        self.losses: deque[float] = deque(maxlen=self.window + 1)
        self.norms: deque[float] = deque(maxlen=self.window + 1)

    def judge(self, loss: float, grad_norm: float | None = None) -> bool:
        """Add ``loss`` (and ``grad_norm``) to the window; whether this step is skipped."""
        self.losses.append(float(loss))
        if grad_norm is not None:
            self.norms.append(float(grad_norm))
        if len(self.losses) < max(2, self.window // 2) or math.isinf(self.sigma_factor):
            return False
        return self._above(self.losses) or (grad_norm is not None and self._above(self.norms))

    def _above(self, values: deque[float]) -> bool:
        *before, latest = values
        if len(before) < 2:  # no σ yet (OLMo-core's NaN σ would skip: a window N < 6 only)
            return False
        mean = math.fsum(before) / len(before)
        var = math.fsum((v - mean) ** 2 for v in before) / (len(before) - 1)
        return latest - mean > self.sigma_factor * math.sqrt(var)

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "norms": list(self.norms)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses = deque(map(float, state["losses"]), maxlen=self.window + 1)
        self.norms = deque(map(float, state["norms"]), maxlen=self.window + 1)


class SkipStepISGD(ISGD):
    """The base optimizer (``ISGD(base, max_extra_iters=0)``) with :class:`SkipRule`: a step it
    skips is marked ``skipped`` in the step record and ISGD applies no update (so neither the
    parameters nor the base optimizer's state change: momentum, Adam's moments and step count).

    The rule reads ψ as :meth:`ISGD.observe` judges it — under data parallelism the
    process-group mean (:class:`isgd.collective.LossSync`) — and the norm of the gradients after
    the backward pass (DDP's averaged ones, the whole model's under sharding): every rank skips
    alike. Counted in :attr:`skipped`; the window and the count are in ``state_dict()``.
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        *,
        rule: SkipRule,
        grad_norm: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, base_optimizer, **kwargs)
        self.rule, self.grad_norm = rule, grad_norm
        self.skipped = 0

    def observe(
        self, loss: Tensor | float, *, weight: float | None = None, found_inf: Tensor | None = None
    ) -> int:
        n_extra = super().observe(loss, weight=weight, found_inf=found_inf)
        record = self.stats.last
        if not record.skipped:  # a non-finite loss is ISGD's to skip, and stays out of the window
            norm = self._grad_norm() if self.grad_norm else None
            if self.rule.judge(record.loss, norm):
                record.skipped = True
                self.skipped += 1
        return n_extra

    def _grad_norm(self) -> float:
        params = [p for p in self._params() if p.grad is not None]
        return float(self.shards.norm([p.grad for p in params], params))  # type: ignore[misc]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["skipstep"] = {"rule": self.rule.state_dict(), "skipped": self.skipped}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("skipstep", None)
        super().load_state_dict(state_dict)
        if saved is not None:
            self.rule.load_state_dict(saved["rule"])
            self.skipped = int(saved["skipped"])


# ---------------------------------------------------------------------- random forward-only steps
class RandomSkipISGD(ISGD):
    r"""ISGD, or the base (``max_extra_iters=0``), with ``count`` of its ``total`` steps
    forward-only, drawn at random: the random control of the forward-only variant (same number of
    backward passes skipped) and of SkipStep (same number of updates skipped).

    The steps are drawn by :func:`random_draw` with the forward-only steps made so far
    (``stats.forward_only``; resumed with the optimizer). A drawn step is forward-only as the
    variant's are: :meth:`well_trained` tells the closure before its ``backward()``, ψ joins the
    chart, no update, counted in ``stats.forward_only``; ISGD does not trigger on it. A drawn
    step whose loss is not finite is not forward-only (ISGD's ``nonfinite`` policy acts) and its
    draw is carried to the later steps. One process only (as the variant: a DDP forward needs its
    backward).
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        *,
        count: int,
        total: int,
        seed: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, base_optimizer, **kwargs)
        self.count, self.total, self.seed = int(count), int(total), int(seed)

    def drawn(self) -> bool:
        """Whether the step about to be observed is drawn to be forward-only."""
        left = self.count - self.stats.forward_only
        return random_draw(self.seed, self.stats.steps, self.total, left)

    @torch.no_grad()
    def well_trained(self, loss: Tensor | float, *, weight: float | None = None) -> bool:
        if self.in_extra_iteration:
            return super().well_trained(loss, weight=weight)
        return self.drawn() and finite_loss(float(loss))

    def _judge(self, psi: float, any_inf: bool) -> StepRecord:
        record = super()._judge(psi, any_inf)
        if self.drawn() and not any_inf and finite_loss(psi):
            record.triggered, record.forward_only = False, True
        return record


# ---------------------------------------------------------------------- selective backprop
def selecting(config: TrainConfig, iteration: int, total: int, batch_id: int) -> bool:
    r"""Composer's ``should_selective_backprop``: iteration t (0-based) of ``total`` selects when

    .. math:: \text{start} \le t/T < \text{end} \;\wedge\; (I = 0 \vee (b + 1) \bmod I \ne 0)

    with b the batch's position in its epoch and I ``keep_interrupt`` (2: every other batch is
    whole); never when ``keep`` is 1."""
    fraction = config.random_keep or config.keep
    if fraction >= 1 or not config.keep_start <= iteration / total < config.keep_end:
        return False
    interrupt = config.keep_interrupt
    return interrupt == 0 or (batch_id + 1) % interrupt != 0


def select_by_loss(losses: Tensor, k: int, keep: float, generator: torch.Generator) -> Tensor:
    r"""Composer's ``select_using_loss``: ``k`` of the ``n`` examples, drawn without replacement
    by loss percentile — rank i (0 the lowest loss) with weight
    :math:`((i + \tfrac12)/n)^{1/\text{keep} - 1}` (keep = ½: proportional to the percentile),
    so the higher losses are kept more often, not always. The indices, in batch order."""
    n = len(losses)
    order = torch.argsort(losses.detach().float().cpu(), stable=True)
    percentile = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    ranks = torch.multinomial(percentile ** (1 / keep - 1), k, generator=generator)
    return order[ranks].sort().values.to(losses.device)


def select_at_random(n: int, k: int, generator: torch.Generator, device: Any = None) -> Tensor:
    """``k`` of ``n`` examples uniformly at random, without replacement, in batch order."""
    return torch.randperm(n, generator=generator)[:k].sort().values.to(device)


def per_example_losses(loss: Callable[..., Tensor], output: Tensor, target: Tensor) -> Tensor:
    """``loss(output, target, reduction="none")`` as one loss per example (a sequence's terms
    averaged); ConfigError when it does not give one per example."""
    values = loss(output, target, reduction="none")
    n = len(target)
    if not isinstance(values, Tensor) or values.dim() == 0 or values.shape[0] != n:
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ConfigError(
            f"selective-backprop: loss(output, target, reduction='none') gives {shape}, not one "
            f"value per example of the batch of {n}"
        )
    return values.reshape(n, -1).mean(1) if values.dim() > 1 else values


def _takes_reduction(loss: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(loss).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "reduction" or p.kind is p.VAR_KEYWORD for p in parameters)


class StepStrategy:
    """How the trainer takes one step on a batch (picked once, :func:`step_strategy`); the
    default is ISGD's closure step, :meth:`isgd.training.train.Trainer.step`."""

    forward_passes = 0  # passes over training batches the strategy adds to the optimizer's

    def step(self, trainer: Trainer, x: Tensor, y: Tensor) -> StepRecord:
        return trainer.step(x, y)

    def line(self) -> dict[str, Any]:
        """Fields of this strategy in the last step's ``steps.jsonl`` line."""
        return {}

    def figures(self, trainer: Trainer) -> dict[str, Any]:
        """Cumulative figures for ``metrics.jsonl`` and ``summary.json``."""
        opt = trainer.optimizer
        return {"skipstep/skipped": opt.skipped} if isinstance(opt, SkipStepISGD) else {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class SubsetStep(StepStrategy):
    r"""Selective backprop's step (``by_loss``), or its random control (``random_keep``).

    On a step :func:`selecting` picks, each rank keeps :math:`k_r = \lfloor f\,n_r \rfloor` of
    its :math:`n_r` samples (f: ``keep`` or ``random_keep``) — drawn by :func:`select_by_loss`
    from the per-example losses of a no-grad forward pass over its batch (counted as a pass
    without backward; BatchNorm in training mode, its running statistics left as they were), or
    by :func:`select_at_random` (no selection forward) — and ISGD's closure step trains on the
    :math:`K = \sum_r k_r` kept samples (the mean loss over them). Every other step trains on
    the whole batch. Draws are seeded from ``(seed, iteration)``.
    """

    def __init__(self, trainer: Trainer, by_loss: bool) -> None:
        config = trainer.config
        self.by_loss = by_loss
        fraction = config.keep if by_loss else config.random_keep
        self.kept = [int(fraction * n) for n in trainer.sizes]
        if min(self.kept) < 1:
            key = "keep" if by_loss else "random_keep"
            raise ConfigError(
                f"invalid {key}: {fraction:g} keeps no sample of a batch of {min(trainer.sizes)} "
                f"(per process); give {key} >= {1 / min(trainer.sizes):.3g}"
            )
        if by_loss and not _takes_reduction(trainer.workload.loss):
            raise ConfigError(
                "selective-backprop needs per-example losses: the workload's loss must take "
                "reduction='none' (as torch.nn.functional.cross_entropy and mse_loss do)"
            )
        self.rank = 0 if trainer.dist is None else trainer.dist.rank
        self.forward_passes = 0  # selection forwards
        self.dropped = 0  # samples of training passes left out, all ranks together
        self._last: int | None = None

    def step(self, trainer: Trainer, x: Tensor, y: Tensor) -> StepRecord:
        t = trainer.state.iteration
        self._last = None
        if not selecting(trainer.config, t, trainer.total, t % trainer.n_b):
            return trainer.step(x, y)
        generator = _generator("keep", trainer.config.seed, t)
        k = self.kept[self.rank]
        if self.by_loss:
            model = trainer.model
            with torch.no_grad(), frozen_batchnorm_stats():
                losses = per_example_losses(trainer.workload.loss, model(x), y)
            self.forward_passes += 1
            rows = select_by_loss(losses, k, trainer.config.keep, generator)
        else:
            rows = select_at_random(len(y), k, generator, y.device)
        kept = sum(self.kept)
        record = trainer.step(x[rows], y[rows], samples=kept)
        self.dropped += trainer.config.batch_size - kept
        self._last = kept
        return record

    def line(self) -> dict[str, Any]:
        return {"kept": self._last}

    def figures(self, trainer: Trainer) -> dict[str, Any]:
        backward = trainer.optimizer.stats.backward_passes
        name = "selective_backprop" if self.by_loss else "random_keep"
        return {
            "backward_batches": backward - self.dropped / trainer.config.batch_size,
            f"{name}/selection_forwards": self.forward_passes,
            f"{name}/dropped_samples": self.dropped,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"forward_passes": self.forward_passes, "dropped": self.dropped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.forward_passes = int(state.get("forward_passes", 0))
        self.dropped = int(state.get("dropped", 0))


def step_strategy(trainer: Trainer) -> StepStrategy:
    """The trainer's step: :class:`SubsetStep` for selective backprop and ``random_keep``,
    else ISGD's closure step."""
    config = trainer.config
    if base_family(config.optimizer)[0] == "selective-backprop":
        return SubsetStep(trainer, by_loss=True)
    if config.random_keep > 0:
        return SubsetStep(trainer, by_loss=False)
    return StepStrategy()


def optimizer_class(
    config: TrainConfig, total: int | None, data_parallel: bool
) -> tuple[type[ISGD], dict[str, Any]] | None:
    """The ISGD subclass of a relative and its keyword arguments (``None``: not a relative's)."""
    if base_family(config.optimizer)[0] == "skipstep":
        rule = SkipRule(config.skip_sigma_factor, config.skip_window)
        return SkipStepISGD, {"rule": rule, "grad_norm": config.skip_grad_norm}
    if config.random_skip_steps > 0:
        if data_parallel:
            raise ConfigError(
                "invalid random_skip_steps: its forward-only steps run in one process only (a "
                "DDP forward without its backward is not supported here); drop --nproc"
            )
        if total is None:
            raise ValueError("random_skip_steps needs the run's length (total)")
        count = round(config.random_skip_steps * total)
        return RandomSkipISGD, {"count": count, "total": total, "seed": config.seed}
    return None
