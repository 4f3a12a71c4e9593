"""Cost of ISGD's rank-consistent decision: the all-reduce of ψ per pass, under DDP.

Two processes on gloo (127.0.0.1, one thread each), Caffe LeNet with DDP, MNIST-shaped input,
batch 64 per rank, SGD momentum 0.9 / weight decay 5e-4. Two ISGD optimizers on two DDP replicas
of the model: one judging the process-group mean of the loss (``sync_loss=None``, the default:
one all-reduce of three float64 scalars per pass), one judging the local loss (``sync_loss=False``).
Both have ``max_extra_iters=0``, so they never trigger and the local arm cannot desynchronise the
ranks: what differs is the all-reduce alone, which a triggered step pays once more per extra
iteration. Steps alternate one by one (A B, B A, ...); per repetition the ratio of median step
times ``t_sync / t_local`` is taken on rank 0, and the figure is the median over repetitions.

    python benchmarks/bench_sync.py [--reps 7] [--steps 150] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

import isgd
from isgd.models import build_model

SOLVER = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)


def worker(rank: int, world: int, init: str, reps: int, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        arms = {}
        for name, sync in (("sync", None), ("local", False)):
            model = build_model("lenet", in_channels=1, num_classes=10, image_size=28)
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            opt = isgd.ISGD(
                ddp.parameters(), window=100, max_extra_iters=0, sync_loss=sync, **SOLVER
            )
            arms[name] = (ddp, opt)
        g = torch.Generator().manual_seed(rank)
        x, y = torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)

        def step(name: str) -> float:
            ddp, opt = arms[name]

            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(ddp(x), y)
                loss.backward()
                return loss

            start = time.perf_counter()
            opt.step(closure)
            return time.perf_counter() - start

        for _ in range(20):  # warm-up
            step("sync"), step("local")
        ratios, medians = [], []
        for _ in range(reps):
            times: dict[str, list[float]] = {"sync": [], "local": []}
            for t in range(steps):
                order = ("sync", "local") if t % 2 == 0 else ("local", "sync")
                for name in order:
                    times[name].append(step(name))
            m = {k: statistics.median(v) for k, v in times.items()}
            ratios.append(m["sync"] / m["local"])
            medians.append(m)
        if rank == 0:
            result = {
                "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                f"torch {torch.__version__}",
                "load_average": os.getloadavg(),
                "world_size": world,
                "reps": reps,
                "steps": steps,
                "ratio_median": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "ratios": ratios,
                "ms_per_step_sync": 1e3 * statistics.median(m["sync"] for m in medians),
                "ms_per_step_local": 1e3 * statistics.median(m["local"] for m in medians),
            }
            with open(out, "w") as f:
                json.dump(result, f, indent=2)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "result.json")
        init = f"file://{os.path.join(tmp, 'rendezvous')}"
        mp.spawn(worker, args=(2, init, args.reps, args.steps, result_file), nprocs=2, join=True)
        with open(result_file) as f:
            result = json.load(f)
    print(
        f"sync / local step time: {result['ratio_median']:.3f} "
        f"[{result['ratio_min']:.3f}–{result['ratio_max']:.3f}] (median of {args.reps}); "
        f"{result['ms_per_step_sync']:.2f} vs {result['ms_per_step_local']:.2f} ms/step"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
