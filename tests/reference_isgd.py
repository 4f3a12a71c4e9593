"""The test oracle: ISGD written straight from the pseudo-code of ``shared/ISGD.md`` §2–3.

Slow and plain on purpose — a Python list for the window, statistics recomputed from scratch every
step, SGD with momentum, Nesterov and weight decay spelled out per parameter (in the same
operation order as ``torch.optim.SGD``). Nothing here is shared with ``src/isgd``.

    for t = 1, 2, ...:
        d_t ← next fixed batch;  w_prev ← w
        ψ ← loss(w, d_t);  w ← base_step(w, ∇ψ)
        if window full and ψ > limit:                      # limit from the window, before ψ joins
            repeat up to `stop` times:
                ψ' ← loss(w, d_t);  if ψ' ≤ limit: break
                w ← base_step(w, (ψ' − limit)∇ψ' + (ε/n_w)(w − w_prev))
        push ψ into the window

The variant ``lower_quantile`` = q > 0 (not the paper's): when the window is full, not
triggered, and ψ is below the q-quantile of the window (the ⌈q·n⌉-th smallest loss), the step
is forward-only: no base_step, no extra iterations; ψ still joins the window.

``inner_solver`` replaces base_step in the extra iterations: "gd" is w ← w − lr·∇φ; "momentum"
is v ← μ·v + ∇φ, w ← w − lr·v with v = 0 at the start of every triggered step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Decision:
    loss: float
    limit: float | None
    triggered: bool
    extra_iters: int
    forward_only: bool = False


class ReferenceISGD:
    def __init__(
        self,
        params: list[torch.Tensor],
        *,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        window: int,
        sigma_factor: float = 3.0,
        stop: int = 5,
        eps: float = 0.1,
        inner_solver: str = "base",
        lower_quantile: float = 0.0,
    ) -> None:
        self.inner_solver = inner_solver
        self.q = lower_quantile
        self.params = list(params)
        self.lr, self.momentum, self.weight_decay, self.nesterov = (
            lr,
            momentum,
            weight_decay,
            nesterov,
        )
        self.n_b, self.k, self.stop, self.eps = window, sigma_factor, stop, eps
        self.n_w = sum(p.numel() for p in self.params)
        self.window: list[float] = []
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def limit(self) -> float | None:
        if len(self.window) < self.n_b:
            return None
        n = len(self.window)
        mean = sum(self.window) / n
        sigma = math.sqrt(sum((x - mean) ** 2 for x in self.window) / n)
        return mean + self.k * sigma

    @torch.no_grad()
    def base_step(self, grads: list[torch.Tensor]) -> None:
        for i, (p, g) in enumerate(zip(self.params, grads)):
            d_p = g
            if self.weight_decay != 0:
                d_p = d_p.add(p, alpha=self.weight_decay)
            if self.momentum != 0:
                if self.buffers[i] is None:
                    self.buffers[i] = torch.clone(d_p).detach()
                else:
                    self.buffers[i].mul_(self.momentum).add_(d_p)
                d_p = (
                    d_p.add(self.buffers[i], alpha=self.momentum)
                    if self.nesterov
                    else self.buffers[i]
                )
            p.add_(d_p, alpha=-self.lr)

    @torch.no_grad()
    def inner_step(self, grads: list[torch.Tensor], velocity: list[torch.Tensor]) -> None:
        if self.inner_solver == "base":
            self.base_step(grads)
            return
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if self.inner_solver == "momentum":
                velocity[i] = self.momentum * velocity[i] + g
                g = velocity[i]
            p.sub_(self.lr * g)

    def step(self, closure: Callable[[], torch.Tensor]) -> Decision:
        w_prev = [p.detach().clone() for p in self.params]
        psi = closure().item()
        limit = self.limit()
        decision = Decision(psi, limit, limit is not None and psi > limit, 0)
        if self.q > 0 and len(self.window) == self.n_b and not decision.triggered:
            ordered = sorted(self.window)
            lower = ordered[max(math.ceil(self.q * len(ordered)) - 1, 0)]
            decision.forward_only = psi < lower
        if not decision.forward_only:
            self.base_step([p.grad for p in self.params])
        if decision.triggered:
            velocity = [torch.zeros_like(p) for p in self.params]
            for _ in range(self.stop):
                psi_i = closure().item()
                if psi_i <= limit:
                    break
                grads = [
                    (psi_i - limit) * p.grad + (self.eps / self.n_w) * (p.detach() - w0)
                    for p, w0 in zip(self.params, w_prev)
                ]
                self.inner_step(grads, velocity)
                decision.extra_iters += 1
        self.window.append(psi)
        if len(self.window) > self.n_b:
            self.window.pop(0)
        return decision
