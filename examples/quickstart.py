"""ISGD in a plain PyTorch loop, and the closure-free form with bfloat16 autocast + GradScaler.

A small, real training run on synthetic data (a fixed random teacher labels Gaussian images; two
fixed batches get noise labels, so their loss stays high and ISGD spends extra iterations on them).
Runs in well under a minute on 2 CPU cores:  python examples/quickstart.py
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

import isgd


def make_data(sampler: isgd.FixedCycleBatchSampler, seed: int = 0):
    """Images labelled by a fixed random teacher; fixed batches 5 and 40 get noise labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sampler.num_samples, 1, 12, 12, generator=g)
    y = (x.flatten(1) @ torch.randn(144, 10, generator=g)).argmax(1)
    for batch_id in (5, 40):
        y[sampler.batch(batch_id)] = torch.randint(0, 10, (sampler.batch_size,), generator=g)
    return x, y


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 10)
    )


def train_with_closure(epochs: int = 6) -> None:
    sampler = isgd.FixedCycleBatchSampler(4096, batch_size=64, seed=0)  # FCPR: fixed batches
    x, y = make_data(sampler)
    model = make_model()
    opt = isgd.ISGD(
        model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, window=len(sampler)
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(sampler))
    for epoch in range(epochs):
        for idx in sampler:
            xb, yb = x[idx], y[idx]

            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                return loss

            opt.step(closure)
            scheduler.step()
        s = opt.stats
        print(
            f"epoch {epoch}: loss {s.last.loss:.3f}  limit {s.last.limit or float('nan'):.3f}  "
            f"triggers {s.triggers}  extra iterations {s.extra_iters}  passes {s.passes}"
        )


def train_closure_free(epochs: int = 3) -> None:
    """The loop owns backward(): mixed precision with bfloat16 autocast and a GradScaler."""
    sampler = isgd.FixedCycleBatchSampler(4096, batch_size=64, seed=0)
    x, y = make_data(sampler)
    model = make_model()
    opt = isgd.ISGD(model.parameters(), lr=0.05, momentum=0.9, window=len(sampler))
    scaler = torch.amp.GradScaler("cpu")

    def loss_on(xb, yb):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.cross_entropy(model(xb), yb)

    for _ in range(epochs):
        for idx in sampler:
            xb, yb = x[idx], y[idx]
            opt.zero_grad()
            loss = loss_on(xb, yb)
            scaler.scale(loss).backward()
            n_extra = opt.observe(loss)  # before the step: judges ψ, remembers w_{t-1}
            scaler.step(opt.base_optimizer)
            scaler.update()
            with isgd.frozen_batchnorm_stats():
                for _ in range(n_extra):
                    loss_i = loss_on(xb, yb)
                    if not opt.above_limit(loss_i):  # at the limit: stop, no backward wasted
                        break
                    opt.zero_grad()
                    scaler.scale(loss_i).backward()
                    scaler.unscale_(opt.base_optimizer)
                    opt.subproblem_grad_()  # ∇ ← (ψ' − limit)∇ψ' + (ε/n_w)(w − w_prev)
                    scaler.step(opt.base_optimizer)
                    scaler.update()
    s = opt.stats
    print(f"closure-free, bf16: steps {s.steps}  triggers {s.triggers}  extra {s.extra_iters}")


if __name__ == "__main__":
    torch.set_num_threads(2)
    train_with_closure()
    train_closure_free()
