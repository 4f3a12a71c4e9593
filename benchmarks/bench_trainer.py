"""Throughput of ``isgd train`` (SGD) against a bare hand-written PyTorch loop.

Same model (Caffe LeNet, channels_last), data (MNIST held as a normalised tensor), batch 64, fixed
batch order, SGD with momentum 0.9 / weight decay 5e-4 and the Caffe ``inv`` LR schedule, same
threads. The trainer's figure is its own ``time/train_seconds`` (what users see: batch gather,
step, LR schedule and the per-step record, evaluation excluded); the bare loop is timed around its
steps. Blocks alternate (bare first on even repetitions); the reported figure is the median over
repetitions of ``trainer images/s ÷ bare images/s``.

    python benchmarks/bench_trainer.py [--reps 7] [--iters 600] [--threads 2] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.nn import functional as F

from isgd.data import Preprocess, load_dataset
from isgd.models import build_model
from isgd.sampler import FixedCycleBatchSampler
from isgd.training.config import lr_factor, resolve_config
from isgd.training.train import Trainer


def bare_loop(data, x_train, config, iters: int) -> float:
    """The loop a user would write by hand; returns images per second."""
    torch.manual_seed(config.seed)
    model = build_model("lenet", 1, 10, 28).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(config, t, iters))
    batches = FixedCycleBatchSampler(len(x_train), config.batch_size, seed=0).epoch_batches()
    y_train = data.y_train
    start = time.perf_counter()
    for t in range(iters):
        idx = batches[t % len(batches)]
        x, y = x_train[idx], y_train[idx]
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        loss.item()  # a loop logs its loss; the trainer reads it once per step too
    return iters * config.batch_size / (time.perf_counter() - start)


def trainer_run(data, config, iters: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(dataclasses.replace(config, iters=iters), Path(tmp), data=data)
        summary = trainer.run(progress=False)
    return summary["images_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--iters", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()

    config = resolve_config(
        "lenet-mnist",
        overrides=dict(
            optimizer="sgd",
            threads=args.threads,
            eval_every=10**9,
            checkpoint_every=10**9,
            tensorboard=False,
        ),
    )
    torch.set_num_threads(args.threads)
    data = load_dataset("mnist")
    x_train = Preprocess.for_data(data, "scale", channels_last=True)(data.x_train)

    bare_loop(data, x_train, config, 50)  # warm-up
    trainer_run(data, config, 50)
    bare, ours, ratios = [], [], []
    for rep in range(args.reps):
        if rep % 2 == 0:
            b = bare_loop(data, x_train, config, args.iters)
            o = trainer_run(data, config, args.iters)
        else:
            o = trainer_run(data, config, args.iters)
            b = bare_loop(data, x_train, config, args.iters)
        bare.append(b)
        ours.append(o)
        ratios.append(o / b)
        print(
            f"rep {rep}: bare {b:,.0f} img/s  trainer {o:,.0f} img/s  ratio {o / b:.4f}", flush=True
        )

    result = {
        "benchmark": "isgd train (sgd) vs bare PyTorch loop, Caffe LeNet, MNIST, batch 64",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "threads": args.threads,
        "torch": torch.__version__,
        "reps": args.reps,
        "iters_per_block": args.iters,
        "bare_images_per_second_median": statistics.median(bare),
        "trainer_images_per_second_median": statistics.median(ours),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
