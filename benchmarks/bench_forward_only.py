"""What a forward-only step of the ``lower_quantile`` variant costs, against a training step.

The variant's saving is the backward pass and the update of the steps below the lower limit. Its
forward pass is the one the trainer runs (train mode, autograd recording, loss read on the host),
so it is not free. Per model (Caffe LeNet on MNIST-shaped input, batch 64; Caffe cifar10_quick,
batch 100), both kinds of step run in one process, interleaved one by one so that load from other
processes hits both alike; per repetition the ratio of the median step times
``t_forward_only / t_training`` is taken, and the figure is the median over repetitions (with
min and max). A run's modelled seconds are then ``(steps − f + f·ratio)·t_training`` for ``f``
forward-only steps.

    python benchmarks/bench_forward_only.py [--reps 7] [--steps 60] [--threads 1] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone

import torch
from torch.nn import functional as F

from isgd.models import build_model

MODELS = {"lenet": (1, 28, 64), "cifar10-quick": (3, 32, 100)}  # channels, size, batch


def measure(name: str, reps: int, steps: int) -> dict[str, float | list[float]]:
    channels, size, batch = MODELS[name]
    torch.manual_seed(0)
    model = build_model(name, channels, 10, size).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, channels, size, size).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))

    def train_step() -> None:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.item()  # ISGD reads the loss
        loss.backward()
        opt.step()

    def forward_only() -> None:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.item()  # judged, then no backward and no update

    for _ in range(10):  # warm-up
        train_step()
        forward_only()
    ratios = []
    for _ in range(reps):
        times: dict[str, list[float]] = {"train": [], "forward": []}
        for i in range(steps):
            order = (("train", train_step), ("forward", forward_only))
            for kind, fn in order if i % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                fn()
                times[kind].append(time.perf_counter() - start)
        ratios.append(statistics.median(times["forward"]) / statistics.median(times["train"]))
    return {
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratios": ratios,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        results = {name: measure(name, args.reps, args.steps) for name in MODELS}
    finally:
        torch.set_num_threads(before)
    record = {
        "benchmark": "forward-only step / training step",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {platform.processor() or '?'}",
        "torch": torch.__version__,
        "threads": args.threads,
        "reps": args.reps,
        "steps": args.steps,
        "results": results,
    }
    for name, r in results.items():
        print(
            f"{name}: forward-only / training step = {r['ratio_median']:.3f} "
            f"[{r['ratio_min']:.3f}–{r['ratio_max']:.3f}] over {args.reps} repetitions"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
