r"""The inner solver: the update of ISGD's extra iterations, with :math:`\nabla\phi` in ``p.grad``.

The paper says "solve the subproblem" and no more. ``"base"`` (the default) is the reading we
take: the base optimizer's own step, its momentum buffer, weight decay and state shared with the
regular steps. The two ablations (``docs/algorithm.md``, *the inner solver*):

- ``"gd"``: :math:`w \leftarrow w - \zeta\,\nabla\phi`, ζ the group's ``lr``; no momentum, no
  weight decay, the base's state untouched;
- ``"momentum"``: :math:`v \leftarrow \mu v + \nabla\phi,\; w \leftarrow w - \zeta v` with the
  group's ``momentum`` μ and a velocity :math:`v` of its own, zero at every triggered step.

:func:`momentum_ratio` is the diagnostic ``ISGD(diagnostics=True)`` records: how much of an extra
iteration's update is the velocity, how much the chase of the limit.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.optim import Optimizer

from isgd.collective import Shards, local

__all__ = ["INNER_SOLVERS", "InnerSolver", "make_solver", "momentum_ratio"]

INNER_SOLVERS = ("base", "gd", "momentum")


class InnerSolver:
    """``"base"``: the base optimizer's step. A solver lives for one triggered step (ISGD makes a
    fresh one at every trigger), so its state starts afresh there."""

    name = "base"

    def __init__(self, base: Optimizer) -> None:
        self.base = base

    def step(self) -> None:
        self.base.step()

    def velocity(self, group: int, index: int, p: Tensor) -> Tensor | None:
        """The velocity :math:`v` of parameter ``p`` (the ``index``-th of group ``group``) that the
        next update applies as :math:`\\mu v`; ``None``: none yet."""
        return self.base.state.get(p, {}).get("momentum_buffer")

    @property
    def has_velocity(self) -> bool:
        """False when the update has no velocity to compare with ∇φ (Adam's moments are not one)."""
        return isinstance(self.base, torch.optim.SGD)

    def add_param_group(self, params: list[Tensor]) -> None:
        """A parameter group joined in the middle of a triggered step."""


class GradientDescent(InnerSolver):
    """``"gd"``: ``w ← w − lr·∇φ`` per group."""

    name = "gd"

    @torch.no_grad()
    def step(self) -> None:
        for group in self.base.param_groups:
            params = [local(p) for p in group["params"] if p.grad is not None]
            grads = [local(p.grad) for p in group["params"] if p.grad is not None]
            torch._foreach_add_(params, grads, alpha=-float(group["lr"]))

    def velocity(self, group: int, index: int, p: Tensor) -> Tensor | None:
        return None

    @property
    def has_velocity(self) -> bool:
        return True  # zero: the ratio is 0


class HeavyBall(InnerSolver):
    """``"momentum"``: ``v ← μ·v + ∇φ; w ← w − lr·v``, ``v`` its own (zero at the trigger)."""

    name = "momentum"

    def __init__(self, base: Optimizer) -> None:
        super().__init__(base)
        self.v: list[list[Tensor]] | None = None  # per group, per parameter; made on first use

    def buffers(self) -> list[list[Tensor]]:
        if self.v is None:
            self.v = [[torch.zeros_like(p) for p in g["params"]] for g in self.base.param_groups]
        return self.v

    @torch.no_grad()
    def step(self) -> None:
        velocity = self.buffers()
        for i, group in enumerate(self.base.param_groups):
            params = [local(p) for p in group["params"] if p.grad is not None]
            grads = [local(p.grad) for p in group["params"] if p.grad is not None]
            v = [local(velocity[i][j]) for j, p in enumerate(group["params"]) if p.grad is not None]
            torch._foreach_mul_(v, float(group.get("momentum", 0.0)))
            torch._foreach_add_(v, grads)
            torch._foreach_add_(params, v, alpha=-float(group["lr"]))

    def velocity(self, group: int, index: int, p: Tensor) -> Tensor | None:
        return None if self.v is None else self.v[group][index]

    @property
    def has_velocity(self) -> bool:
        return True

    def add_param_group(self, params: list[Tensor]) -> None:
        if self.v is not None:
            self.v.append([torch.zeros_like(p) for p in params])


_SOLVERS: dict[str, type[InnerSolver]] = {
    "base": InnerSolver,
    "gd": GradientDescent,
    "momentum": HeavyBall,
}


def make_solver(name: str, base: Optimizer) -> InnerSolver:
    """The solver named ``name`` (one of :data:`INNER_SOLVERS`) around ``base``."""
    if name not in _SOLVERS:
        raise ValueError(f"Invalid inner_solver: {name!r} (one of {', '.join(INNER_SOLVERS)})")
    return _SOLVERS[name](base)


def momentum_ratio(solver: InnerSolver, shards: Shards) -> float | None:
    """‖μ·v‖ / ‖∇φ‖ of the update about to be applied, over all parameters with a gradient
    (``None``: no velocity to compare with, no gradient, or ∇φ = 0); the whole model's norms
    under sharding (``shards``). Norms only, no copies; one host sync."""
    if not solver.has_velocity:
        return None
    grads, owners, momentum_norms = [], [], []
    for i, group in enumerate(solver.base.param_groups):
        mu = float(group.get("momentum", 0.0) or 0.0)
        buffers, buffer_owners = [], []
        for j, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            grads.append(p.grad)
            owners.append(p)
            v = solver.velocity(i, j, p)
            if v is not None:
                buffers.append(v)
                buffer_owners.append(p)
        if mu:  # ‖μ·v‖ = μ‖v‖ (0 without buffers; every rank asks: a collective when sharded)
            momentum_norms.append(mu * shards.norm(buffers, buffer_owners))
    g = shards.norm(grads, owners)  # 0 without gradients: the ratio is not finite, None
    m = torch.stack([n.to(g.device) for n in momentum_norms]).norm() if momentum_norms else 0.0
    ratio = float(m / g)  # the one host sync; ∇φ = 0 gives inf/NaN, not recorded
    return ratio if math.isfinite(ratio) else None
