"""ISGD in an Accelerate loop: `isgd.integrations.accelerate.prepare` and a closure.

    python examples/accelerate_loop.py [--mixed-precision bf16] [--accumulate 2]
    torchrun --standalone --nproc-per-node 2 examples/accelerate_loop.py   # DDP, gloo on CPU
    accelerate launch --num_processes 2 examples/accelerate_loop.py

Two rules make ISGD correct here:
1. ``isgd.integrations.accelerate.prepare(accelerator, model, opt)`` in place of
   ``accelerator.prepare``: the same objects, but ``opt.step(closure)`` gives accelerate's
   GradScaler to ISGD under fp16, and ``accelerator.accumulate`` (whose skipped
   ``optimizer.step`` calls would leave ISGD one micro-batch in k) is refused in one line;
2. the closure zeroes the gradients, runs the forward, calls ``accelerator.backward`` and returns
   the loss — it runs once per regular step and once more per extra iteration; gradient
   accumulation goes *inside* it (``accelerator.no_sync`` for all micro-batches but the last).
Under DDP ISGD judges the process-group mean loss by itself, so every rank decides alike.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
from pathlib import Path

import torch
from accelerate import Accelerator
from synthetic import BATCH, N, synthetic_data
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

import isgd
from isgd.integrations.accelerate import prepare


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per batch")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", type=Path, default=None, help="write rank<r>.json here")
    args = parser.parse_args(argv)

    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    world = accelerator.num_processes
    # one global fixed batch per step, this rank's slice of it
    sampler = isgd.DistributedFixedCycleBatchSampler(
        N, BATCH, num_replicas=world, rank=accelerator.process_index
    )
    loader = DataLoader(synthetic_data(), batch_sampler=sampler)
    opt = isgd.ISGD(
        model.parameters(), torch.optim.SGD, window=len(sampler), sigma_factor=1.0,
        lr=0.05, momentum=0.9,
    )  # fmt: skip
    # the loader is ours (already split by rank): accelerate prepares the model and optimizer
    model, opt = prepare(accelerator, model, opt)

    for _epoch in range(args.epochs):
        for x, y in loader:
            x, y = x.to(accelerator.device), y.to(accelerator.device)

            def closure():
                opt.zero_grad()
                total = 0.0
                parts = list(zip(x.chunk(args.accumulate), y.chunk(args.accumulate)))
                for i, (xs, ys) in enumerate(parts):
                    last = i == len(parts) - 1
                    with contextlib.nullcontext() if last else accelerator.no_sync(model):
                        loss = F.cross_entropy(model(xs), ys) / len(parts)
                        accelerator.backward(loss)
                    total = total + loss.detach()
                return total

            opt.step(closure)  # fp16 too: prepare() hands accelerate's GradScaler to ISGD

    stats = opt.optimizer.stats
    weights = torch.cat([p.detach().flatten().float().cpu() for p in model.parameters()])
    result = {
        "rank": accelerator.process_index,
        "stats": stats.state_dict(),
        "weights_sha256": hashlib.sha256(weights.numpy().tobytes()).hexdigest(),
    }
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"rank{accelerator.process_index}.json").write_text(json.dumps(result))
    if accelerator.is_main_process:
        print(
            f"{stats.steps} steps, {stats.triggers} triggers, {stats.extra_iters} extra iterations"
        )
    accelerator.end_training()
    return result


if __name__ == "__main__":
    main()
