"""Cost of an ISGD step that does not trigger, against a plain ``torch.optim.SGD`` step.

Two ISGD steppers are timed against the bare optimizer: ISGD as published (``max_extra_iters=5``,
a full chart, no trigger) and ``ISGD(max_extra_iters=0)``, which is how ``isgd train`` runs its
SGD arm (one optimizer type for every arm); a fourth stepper is that arm as the trainer ran it
before (bare SGD, the loss read and a monitoring chart updated), the fair "before" of the change.

Caffe LeNet, MNIST-shaped input (1×28×28, 10 classes), batch 64, SGD with momentum 0.9 and
weight decay 5e-4 (the Caffe LeNet solver). Both optimizers run in the same process, their steps
interleaved one by one (SGD ISGD, ISGD SGD, ...) so that machine drift and other processes' bursts
hit both alike; per repetition the ratio of the median step times ``t_ISGD / t_SGD`` is taken,
and the reported figure is the median over repetitions. ISGD's chart is full and its limit far
above the losses, so every timed ISGD step does the full decision work (read the loss, judge it,
update the chart) without triggering.

Also reports the memory ISGD holds beyond the base optimizer (the ``w_prev`` copy that a triggered
step needs) and, for information, the cost of triggered steps.

    python benchmarks/bench_step.py [--reps 9] [--steps 200] [--threads 2] [--out FILE.json]

Each ratio is reported as the median over repetitions and a 95 % Student-t interval of the
geometric mean (over repetitions of the ratio of medians).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from datetime import datetime, timezone

import torch
from scipy import stats
from torch.nn import functional as F

import isgd
from isgd.models import build_model


def make(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("lenet", in_channels=1, num_classes=10, image_size=28).to(
        memory_format=torch.channels_last
    )


SOLVER = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)


def sgd_stepper(model, opt, x, y):
    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def monitored_sgd_stepper(model, opt, chart, x, y):
    """The SGD arm as ``isgd train`` ran it before every arm was an ISGD: the bare optimizer,
    the loss read on the host and a monitoring chart updated with it."""

    def step():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        chart.update(loss.item())

    return step


def isgd_stepper(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return lambda: opt.step(closure)


def interleaved(*steppers, steps: int) -> list[list[float]]:
    """Per-step times of the steppers, taking turns step by step in a rotating order (A B C,
    B C A, C A B, ...), so that machine drift and other processes' bursts hit all alike."""
    times: list[list[float]] = [[] for _ in steppers]
    clock = time.perf_counter
    for i in range(steps):
        for k in range(len(steppers)):
            which = (i + k) % len(steppers)
            start = clock()
            steppers[which]()
            times[which].append(clock() - start)
    return times


def geometric_interval(ratios: list[float]) -> tuple[float, float, float]:
    """Geometric mean of ``ratios`` and its 95 % Student-t interval (on the log ratios)."""
    logs = [math.log(r) for r in ratios]
    mean = statistics.mean(logs)
    half = stats.t.ppf(0.975, len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--steps", type=int, default=200, help="timed steps per block")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 1, 28, 28, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,), generator=g)

    sgd_model, isgd_model, zero_model, mon_model = make(), make(), make(), make()
    sgd = torch.optim.SGD(sgd_model.parameters(), **SOLVER)
    monitored = torch.optim.SGD(mon_model.parameters(), **SOLVER)
    opt = isgd.ISGD(isgd_model.parameters(), window=937, max_extra_iters=5, **SOLVER)
    for i in range(opt.window):  # a full chart whose limit (~1e3) no loss reaches
        opt.chart.update(1000.0 + (i % 7))
    zero = isgd.ISGD(zero_model.parameters(), window=937, max_extra_iters=0, **SOLVER)

    run_sgd = sgd_stepper(sgd_model, sgd, x, y)
    run_isgd = isgd_stepper(isgd_model, opt, x, y)
    run_zero = isgd_stepper(zero_model, zero, x, y)
    run_mon = monitored_sgd_stepper(mon_model, monitored, isgd.LossControlChart(937), x, y)
    interleaved(run_sgd, run_isgd, run_zero, run_mon, steps=30)  # warm-up
    ratios, ratios_mean, ratios_zero, t_sgd, t_isgd, t_zero = [], [], [], [], [], []
    t_mon, ratios_zero_mon = [], []
    for rep in range(args.reps):
        a, b, c, d = interleaved(run_sgd, run_isgd, run_zero, run_mon, steps=args.steps)
        t_mon.append(1e3 * statistics.median(d))
        t_sgd.append(1e3 * statistics.median(a))
        t_isgd.append(1e3 * statistics.median(b))
        t_zero.append(1e3 * statistics.median(c))
        ratios.append(t_isgd[-1] / t_sgd[-1])
        ratios_mean.append(sum(b) / sum(a))
        ratios_zero.append(t_zero[-1] / t_sgd[-1])
        ratios_zero_mon.append(t_zero[-1] / t_mon[-1])
        print(
            f"rep {rep}: median SGD {t_sgd[-1]:.3f} ms/step  ISGD {t_isgd[-1]:.3f}  "
            f"ISGD(max_extra_iters=0) {t_zero[-1]:.3f}  SGD+chart {t_mon[-1]:.3f}  ratios of "
            f"medians {ratios[-1]:.4f} / {ratios_zero[-1]:.4f} / {ratios_zero_mon[-1]:.4f}",
            flush=True,
        )
    assert opt.stats.triggers == 0, "the timed ISGD steps were meant not to trigger"
    assert all(
        torch.equal(p, q) for p, q in zip(sgd_model.parameters(), zero_model.parameters())
    ), "ISGD(max_extra_iters=0) must take the bare optimizer's steps, bit for bit"

    # Memory beyond the base optimizer: trigger once so w_prev exists, then count it.
    param_bytes = sum(p.numel() * p.element_size() for p in isgd_model.parameters())
    opt.chart.reset()
    for _ in range(opt.window):
        opt.chart.update(0.0)
    _, trig_times = interleaved(run_sgd, run_isgd, steps=20)
    trig_ms = 1e3 * statistics.median(trig_times)
    held = sum(w.numel() * w.element_size() for w in (opt._w_prev or []))
    base_state = sum(
        t.numel() * t.element_size()
        for s in opt.base_optimizer.state.values()
        for t in s.values()
        if torch.is_tensor(t)
    )

    result = {
        "benchmark": "ISGD non-triggered step vs torch.optim.SGD step, Caffe LeNet, batch "
        f"{args.batch}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} "
        f"{torch.get_num_threads()} threads".strip(),
        "torch": torch.__version__,
        "reps": args.reps,
        "steps_per_block": args.steps,
        "sgd_ms_per_step_median": statistics.median(t_sgd),
        "isgd_ms_per_step_median": statistics.median(t_isgd),
        "ratio_median": statistics.median(ratios),
        "ratio_of_totals_median": statistics.median(ratios_mean),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratio_geomean_ci95": geometric_interval(ratios),
        "zero_extra_ms_per_step_median": statistics.median(t_zero),
        "zero_extra_ratio_median": statistics.median(ratios_zero),
        "zero_extra_ratio_geomean_ci95": geometric_interval(ratios_zero),
        "monitored_sgd_ms_per_step_median": statistics.median(t_mon),
        "zero_extra_over_monitored_sgd_median": statistics.median(ratios_zero_mon),
        "zero_extra_over_monitored_sgd_geomean_ci95": geometric_interval(ratios_zero_mon),
        "param_bytes": param_bytes,
        "isgd_extra_bytes": held,
        "isgd_extra_over_params": held / param_bytes,
        "base_state_bytes": base_state,
        "triggered_step_ms (5 extra iters max)": trig_ms,
        "triggers_in_trigger_block": opt.stats.triggers,
        "extra_iters_in_trigger_block": opt.stats.extra_iters,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
