"""The GPU check (issue 21 §3): every CUDA path the CPU tests emulate, run for real, each recorded.

    bash scripts/gpu-check.sh [--out DIR] [--budget 420] [--only CASE,CASE] [--device cpu]

On a CUDA machine it runs, each case under its own time limit and in its own ``try`` (one failure
never ends the check): GradScaler fp16 in a plain loop (``opt.step(closure, grad_scaler=)``,
``scaler.step(opt, closure)`` and the closure-free ``observe``/``above_limit`` form), an inf
forced into the regular pass and into an extra pass, bf16 autocast, ``torch.compile``, Lightning
``16-mixed``, the Hugging Face ``ISGDTrainer`` with ``fp16``, accelerate with
``mixed_precision="fp16"`` (the documented call and the wrapper's own ``step``), the host-device
synchronisations of a non-triggering step (``torch.cuda.set_sync_debug_mode("warn")``), the
overhead of a non-triggering step against the bare optimizer (images/s, interleaved), and a
2-process NCCL run when two GPUs are present. Every triggered case forces its triggers by filling
the chart with low losses (``opt.chart.update(0.01)`` window times). It writes ``gpu-check.json``
and ``gpu-check.md`` into ``--out`` (default ``$OUT`` if set, else ``runs/gpu-check-<time>``),
rewritten after every case, so a run cut short still leaves what it measured.

Without CUDA it prints one line and exits 0. ``--device cpu`` is the smoke mode: the same cases
in their CPU forms (``GradScaler("cpu")``, bf16/fp16 autocast on the CPU, ``torch.compile`` with
``aot_eager``, Lightning's 16-mixed plugin with a CPU GradScaler, a CPU GradScaler handed to
accelerate and to the Hugging Face Trainer's accelerator, gloo for the 2-process run), so that
every code path here runs where there is no GPU.

Outcomes: ``works``; ``refused`` (ISGD or the framework declined in one line: that line);
``failed`` (the error's first line; ``known (issue N): ...`` for a failure an open issue
describes); ``skipped`` (not applicable here, a framework not installed, or out of budget);
``timeout``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import inspect
import json
import math
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
try:
    import torch
    from torch import nn
    from torch.nn import functional as F
except ImportError as exc:
    sys.exit(f"gpu-check: torch cannot be imported by {sys.executable} ({exc}): nothing checked")
try:
    import isgd
except ImportError:  # a machine where the project is not installed: use the checkout's
    sys.path.insert(0, str(ROOT / "src"))
    try:
        import isgd
    except ImportError as exc:
        sys.exit(f"gpu-check: isgd cannot be imported ({exc}): pip install -e . first")

WINDOW = 100  # large enough that forced triggers last the whole (≤ 20-step) case
STEPS = 12
SOLVER = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
KNOWN = {  # failures an open issue describes: recorded as "known (issue ...)"
    "_scale is None": "issue 21 §2: the first scaler.step(opt, closure) before the scale exists",
}


# ------------------------------------------------------------------ outcomes
class Refused(Exception):
    """ISGD or the framework declined the set-up, in one line."""


class Skipped(Exception):
    """Not applicable here (a device, a framework not installed)."""


class CaseFailed(Exception):
    """The case ran but a check on its result did not hold."""


class CaseTimeout(BaseException):  # not swallowed by a framework's `except Exception`
    pass


@dataclasses.dataclass
class Result:
    case: str
    outcome: str
    seconds: float
    detail: str
    data: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Ctx:
    device: torch.device
    compile_backend: str
    tmp: Path
    quick: bool  # smaller measurements (the CPU smoke mode)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def half(self) -> torch.dtype:
        return torch.float16


def first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0][:400] if lines else ""


def err_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(str(exc))}"


# ------------------------------------------------------------------ models and loops
def small_cnn(seed: int = 0, batchnorm: bool = False, width: int = 16) -> nn.Module:
    """3×16×16 images (3×32×32 for the overhead case), 10 classes."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(width))
    layers += [nn.ReLU(), nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(2 * width * 16, 10)]
    return nn.Sequential(*layers)


def batches(ctx: Ctx, n: int = 4, size: int = 16, batch: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(batch, 3, size, size, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
        out.append((x.to(ctx.device), y.to(ctx.device)))
    return out


def force_triggers(opt: isgd.ISGD) -> None:
    """A chart full of low losses: every step's loss is above the limit (as tests/test_optim.py)."""
    for _ in range(opt.window):
        opt.chart.update(0.01)


def never_trigger(opt: isgd.ISGD) -> None:
    """A chart whose limit (~1e3) no loss reaches: every step does the whole decision."""
    for i in range(opt.window):
        opt.chart.update(1000.0 + (i % 7))


def make_isgd(model: nn.Module, **kw: Any) -> isgd.ISGD:
    args = dict(window=WINDOW, max_extra_iters=3, **SOLVER)
    args.update(kw)
    return isgd.ISGD(model.parameters(), **args)


def finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def stats_of(opt: isgd.ISGD) -> dict[str, Any]:
    s = opt.stats
    return dict(steps=s.steps, triggers=s.triggers, extra_iters=s.extra_iters)


def need_triggers(opt: isgd.ISGD, model: nn.Module | None = None) -> dict[str, Any]:
    data = stats_of(opt)
    if not (data["triggers"] > 0 and data["extra_iters"] > 0):
        raise CaseFailed(f"forced triggers did not run extra iterations: {data}")
    if model is not None and not finite(model):
        raise CaseFailed("non-finite weights")
    return data


def scaled_closure(model, opt, x, y, scaler, dtype, device_type, poison=None):
    """The AMP closure; ``poison(call)`` True puts an inf into that call's gradients."""
    calls = 0

    def closure():
        nonlocal calls
        calls += 1
        opt.zero_grad()
        with torch.autocast(device_type, dtype=dtype):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if poison is not None and poison(calls):
            next(model.parameters()).grad.view(-1)[0] = math.inf
        return loss

    return closure


def new_scaler(ctx: Ctx, init_scale: float = 2.0**12) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(ctx.device.type, init_scale=init_scale, growth_interval=10**6)


# ------------------------------------------------------------------ the cases
def case_diagnostics_opt_in(ctx: Ctx) -> tuple[str, dict]:
    default = inspect.signature(isgd.ISGD.__init__).parameters["diagnostics"].default
    if default is not False:
        raise CaseFailed(f"ISGD(diagnostics=...) defaults to {default!r}, not False")
    ratios = {}
    for flag in (False, True):
        model = small_cnn().to(ctx.device)
        opt = make_isgd(model, diagnostics=flag)
        force_triggers(opt)
        x, y = batches(ctx, 1)[0]
        opt.step(plain_closure(model, opt, x, y))
        ratios[flag] = opt.stats.last.momentum_ratio
    if ratios[False] is not None or ratios[True] is None:
        raise CaseFailed(f"momentum_ratio off={ratios[False]!r} on={ratios[True]!r}")
    return (
        "opt-in: ISGD(diagnostics=False) by default, no momentum ratio computed (no host sync "
        f"per extra iteration); diagnostics=True records it ({ratios[True]:.3g})",
        {"default": default, "momentum_ratio_on": ratios[True]},
    )


def plain_closure(model, opt, x, y, autocast: torch.dtype | None = None, device_type="cpu"):
    def closure():
        opt.zero_grad()
        guard = (
            torch.autocast(device_type, dtype=autocast) if autocast else contextlib.nullcontext()
        )
        with guard:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def case_scaler_keyword(ctx: Ctx) -> tuple[str, dict]:
    model = small_cnn().to(ctx.device)
    opt = make_isgd(model)
    force_triggers(opt)
    scaler = new_scaler(ctx)
    for x, y in batches(ctx) * (STEPS // 4):
        closure = scaled_closure(model, opt, x, y, scaler, ctx.half, ctx.device.type)
        opt.step(closure, grad_scaler=scaler)
        scaler.update()
    data = need_triggers(opt, model) | {"scale": scaler.get_scale()}
    return f"opt.step(closure, grad_scaler=scaler), fp16 autocast: {fmt(data)}", data


def _handover(ctx: Ctx, first: bool) -> tuple[str, dict]:
    """From step 1 with isgd's scaler (``isgd.amp.GradScaler``); from step 2 with torch's."""
    model = small_cnn().to(ctx.device)
    opt = make_isgd(model)
    force_triggers(opt)
    scaler = new_scaler(ctx)
    if first:
        scaler = isgd.amp.hand_over(scaler)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's note on the hand-over protocol
        for t, (x, y) in enumerate(batches(ctx) * (STEPS // 4)):
            closure = scaled_closure(model, opt, x, y, scaler, ctx.half, ctx.device.type)
            if t == 0 and not first:  # the documented route: torch makes the scale at step 1
                opt.step(closure, grad_scaler=scaler)
            else:
                scaler.step(opt, closure)
            scaler.update()
    data = need_triggers(opt, model) | {"scale": scaler.get_scale()}
    return f"scaler.step(opt, closure) from step {1 if first else 2}: {fmt(data)}", data


def case_scaler_handover(ctx: Ctx) -> tuple[str, dict]:
    """``scaler.step(opt, closure)`` from the second step, as docs/integrations.md says."""
    return _handover(ctx, first=False)


def case_scaler_handover_first(ctx: Ctx) -> tuple[str, dict]:
    """``scaler.step(opt, closure)`` from the very first step (issue 21 §2)."""
    return _handover(ctx, first=True)


def case_scaler_closure_free(ctx: Ctx) -> tuple[str, dict]:
    """The README's loop that owns backward(): observe, scaler.step(base), above_limit, ..."""
    model = small_cnn().to(ctx.device)
    opt = make_isgd(model)
    force_triggers(opt)
    scaler = new_scaler(ctx)
    dev, dt = ctx.device.type, ctx.half
    for x, y in batches(ctx) * (STEPS // 4):
        opt.zero_grad()
        with torch.autocast(dev, dtype=dt):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        n_extra = opt.observe(loss)
        scaler.step(opt.base_optimizer)
        scaler.update()
        with isgd.frozen_batchnorm_stats():
            for _ in range(n_extra):
                with torch.autocast(dev, dtype=dt):
                    loss_i = F.cross_entropy(model(x), y)
                if not opt.above_limit(loss_i):
                    break
                opt.zero_grad()
                scaler.scale(loss_i).backward()
                scaler.unscale_(opt.base_optimizer)
                opt.subproblem_grad_()
                scaler.step(opt.base_optimizer)
                scaler.update()
    data = need_triggers(opt, model) | {"scale": scaler.get_scale()}
    return f"observe/above_limit/subproblem_grad_ + scaler.step(base): {fmt(data)}", data


def _warm_scaled(ctx: Ctx, poison_call: int):
    model = small_cnn().to(ctx.device)
    opt = make_isgd(model)
    scaler = new_scaler(ctx)
    data = batches(ctx)
    for x, y in data:  # a momentum buffer and a scale exist; the chart holds 4 losses
        opt.step(
            scaled_closure(model, opt, x, y, scaler, ctx.half, ctx.device.type), grad_scaler=scaler
        )
        scaler.update()
    force_triggers(opt)
    before = [p.detach().clone() for p in model.parameters()]
    scale = scaler.get_scale()
    x, y = data[0]
    poison = scaled_closure(
        model, opt, x, y, scaler, ctx.half, ctx.device.type, poison=lambda c: c == poison_call
    )
    opt.step(poison, grad_scaler=scaler)
    scaler.update()
    return model, opt, scaler, before, scale


def case_inf_regular(ctx: Ctx) -> tuple[str, dict]:
    model, opt, scaler, before, scale = _warm_scaled(ctx, poison_call=1)
    last = opt.stats.last
    unchanged = all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    data = dict(
        skipped=last.skipped, triggered=last.triggered, extra_iters=last.extra_iters,
        scale_before=scale, scale_after=scaler.get_scale(), weights_unchanged=unchanged,
        finite=finite(model),
    )  # fmt: skip
    if not (last.skipped and not last.triggered and last.extra_iters == 0):
        raise CaseFailed(f"the poisoned step was not skipped: {fmt(data)}")
    if not (unchanged and data["finite"]):
        raise CaseFailed(f"weights changed or non-finite: {fmt(data)}")
    if not data["scale_after"] < scale:
        raise CaseFailed(f"the scale did not back off: {fmt(data)}")
    return (
        f"inf in the regular pass: update skipped, scale {scale:g} → {data['scale_after']:g}",
        data,
    )


def case_inf_extra(ctx: Ctx) -> tuple[str, dict]:
    model, opt, scaler, _, scale = _warm_scaled(ctx, poison_call=3)  # the 2nd extra pass
    last = opt.stats.last
    data = dict(
        triggered=last.triggered, extra_iters=last.extra_iters, scale_before=scale,
        scale_after=scaler.get_scale(), finite=finite(model),
    )  # fmt: skip
    if not (last.triggered and last.extra_iters <= 1):
        raise CaseFailed(f"the extra iterations did not stop at the inf: {fmt(data)}")
    if not data["finite"]:
        raise CaseFailed(f"non-finite weights: {fmt(data)}")
    if not data["scale_after"] < scale:
        raise CaseFailed(f"an inf in an extra pass did not back off the scale: {fmt(data)}")
    return (
        f"inf in an extra pass: extra iterations stopped after {last.extra_iters}, scale "
        f"{scale:g} → {data['scale_after']:g}, weights finite",
        data,
    )


def case_bf16(ctx: Ctx) -> tuple[str, dict]:
    model = small_cnn().to(ctx.device)
    opt = make_isgd(model)
    force_triggers(opt)
    for x, y in batches(ctx) * (STEPS // 4):
        opt.step(plain_closure(model, opt, x, y, torch.bfloat16, ctx.device.type))
    data = need_triggers(opt, model)
    return f"bf16 autocast in the closure, no scaler: {fmt(data)}", data


def case_compile(ctx: Ctx) -> tuple[str, dict]:
    model = small_cnn(batchnorm=True).to(ctx.device)
    compiled = torch.compile(model, backend=ctx.compile_backend)
    opt = make_isgd(model)
    force_triggers(opt)
    bn = model[1]
    steps = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's note on global module hooks
        for x, y in batches(ctx) * 2:
            opt.step(plain_closure(compiled, opt, x, y))
            steps += 1
    data = need_triggers(opt, model) | {"backend": ctx.compile_backend}
    tracked = int(bn.num_batches_tracked)
    data["bn_batches_tracked"] = tracked
    if tracked != steps:
        raise CaseFailed(f"BatchNorm counted {tracked} batches for {steps} regular steps")
    return f"torch.compile(backend={ctx.compile_backend!r}) + BatchNorm frozen: {fmt(data)}", data


# -------- synchronisations
SYNC_MARK = "synchronizing"


def count_syncs(ctx: Ctx, fn: Callable[[], Any], repeat: int) -> float | None:
    """Host-device synchronisations per call of ``fn`` (CUDA's sync debug mode, counted as
    warnings); ``None`` on the CPU, where there is nothing to count."""
    fn()  # warm: lazy state, first-call allocations
    if ctx.cuda:
        torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if ctx.cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(repeat):
                fn()
        finally:
            if ctx.cuda:
                torch.cuda.set_sync_debug_mode("default")
    if not ctx.cuda:
        return None
    return sum(SYNC_MARK in str(w.message) for w in caught) / repeat


def case_syncs(ctx: Ctx) -> tuple[str, dict]:
    x, y = batches(ctx, 1)[0]
    arms: dict[str, Callable[[], Any]] = {}

    m0 = small_cnn().to(ctx.device)
    sgd = torch.optim.SGD(m0.parameters(), **SOLVER)

    def bare():
        sgd.zero_grad()
        F.cross_entropy(m0(x), y).backward()
        sgd.step()

    def bare_read():
        sgd.zero_grad()
        loss = F.cross_entropy(m0(x), y)
        loss.backward()
        sgd.step()
        return float(loss.detach())

    m1 = small_cnn().to(ctx.device)
    opt = make_isgd(m1)
    never_trigger(opt)
    m2 = small_cnn().to(ctx.device)
    free = make_isgd(m2)
    never_trigger(free)

    def closure_free():
        free.zero_grad()
        loss = F.cross_entropy(m2(x), y)
        loss.backward()
        free.observe(loss)
        free.step()

    m3 = small_cnn().to(ctx.device)
    scaled = make_isgd(m3)
    never_trigger(scaled)
    scaler = new_scaler(ctx)

    def isgd_scaler():
        scaled.step(
            scaled_closure(m3, scaled, x, y, scaler, ctx.half, ctx.device.type), grad_scaler=scaler
        )
        scaler.update()

    arms = {
        "sgd": bare,
        "sgd_loss_read": bare_read,
        "isgd_closure": lambda: opt.step(plain_closure(m1, opt, x, y)),
        "isgd_closure_free": closure_free,
        "isgd_grad_scaler": isgd_scaler,
    }
    # a triggered step (3 extra iterations at most), diagnostics off and on
    for flag in (False, True):
        m = small_cnn().to(ctx.device)
        o = make_isgd(m, diagnostics=flag, max_extra_iters=3)

        def triggered(m=m, o=o):
            force_triggers(o)
            o.step(plain_closure(m, o, x, y))

        arms[f"isgd_triggered_diagnostics_{'on' if flag else 'off'}"] = triggered
    repeat = 3 if ctx.quick else 10
    counts = {name: count_syncs(ctx, fn, repeat) for name, fn in arms.items()}
    if opt.stats.triggers or free.stats.triggers or scaled.stats.triggers:
        raise CaseFailed("a step meant not to trigger triggered")
    if not ctx.cuda:
        raise Skipped("n/a on cpu: no host-device synchronisation to count (counting code ran)")
    n = counts["isgd_closure"]
    detail = f"{n:g} per non-triggering ISGD step (goal 1: the loss read); " + ", ".join(
        f"{k} {v:g}" for k, v in counts.items() if k != "isgd_closure"
    )
    if n is None or n > 1:
        raise CaseFailed(detail)
    return detail, {"syncs_per_step": counts}


# -------- overhead
def case_overhead(ctx: Ctx) -> tuple[str, dict]:
    """images/s of a non-triggering ISGD step against the bare optimizer, interleaved blocks."""
    reps, steps, batch, size = (3, 5, 32, 16) if ctx.quick else (7, 50, 256, 32)
    width = 16 if ctx.quick else 32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(ctx.device)
    y = torch.randint(0, 10, (batch,), generator=g).to(ctx.device)
    models = [small_cnn(width=width).to(ctx.device) for _ in range(3)]
    sgd = torch.optim.SGD(models[0].parameters(), **SOLVER)
    sgd_read = torch.optim.SGD(models[1].parameters(), **SOLVER)
    opt = make_isgd(models[2], max_extra_iters=5)
    never_trigger(opt)

    def run_sgd():
        sgd.zero_grad()
        F.cross_entropy(models[0](x), y).backward()
        sgd.step()

    def run_sgd_read():  # the bare optimizer in a loop that reads the loss every step
        sgd_read.zero_grad()
        loss = F.cross_entropy(models[1](x), y)
        loss.backward()
        sgd_read.step()
        return float(loss.detach())

    def run_isgd():
        opt.step(plain_closure(models[2], opt, x, y))

    def block(fn) -> float:
        if ctx.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        if ctx.cuda:
            torch.cuda.synchronize()
        return steps * batch / (time.perf_counter() - start)

    arms = [run_sgd, run_sgd_read, run_isgd]
    for _ in range(2):  # warm-up (cuDNN autotuning, allocator)
        for fn in arms:
            block(fn)
    ips: dict[Any, list[float]] = {fn: [] for fn in arms}
    ratios, ratios_read = [], []
    for rep in range(reps):
        for k in range(len(arms)):  # a rotating order: drift hits every arm alike
            fn = arms[(rep + k) % len(arms)]
            ips[fn].append(block(fn))
        ratios.append(ips[run_isgd][-1] / ips[run_sgd][-1])
        ratios_read.append(ips[run_isgd][-1] / ips[run_sgd_read][-1])
    if opt.stats.triggers:
        raise CaseFailed("the timed ISGD steps triggered")
    data = dict(
        reps=reps, steps_per_block=steps, batch=batch, image=f"3x{size}x{size}",
        sgd_images_per_s=statistics.median(ips[run_sgd]),
        sgd_loss_read_images_per_s=statistics.median(ips[run_sgd_read]),
        isgd_images_per_s=statistics.median(ips[run_isgd]),
        ratio_median=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
        ratio_vs_loss_read_median=statistics.median(ratios_read),
    )  # fmt: skip
    return (
        f"small CNN, batch {batch}: SGD {data['sgd_images_per_s']:,.0f} img/s, ISGD "
        f"{data['isgd_images_per_s']:,.0f} img/s, ISGD/SGD {data['ratio_median']:.3f} (median of "
        f"{reps}, [{min(ratios):.3f}–{max(ratios):.3f}]); against SGD reading the loss each step "
        f"{data['ratio_vs_loss_read_median']:.3f}",
        data,
    )


# -------- frameworks
def need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise Skipped(f"{module} not installed (pip install 'isgd[integrations]')")


def case_lightning_16_mixed(ctx: Ctx) -> tuple[str, dict]:
    need("lightning")
    import lightning.pytorch as pl
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from isgd.integrations.lightning import ISGDCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = small_cnn()
            self.opt: isgd.ISGD | None = None

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            self.opt = make_isgd(self.net)
            force_triggers(self.opt)
            return self.opt

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            ds = torch.utils.data.TensorDataset(
                torch.randn(128, 3, 16, 16, generator=g), torch.randint(0, 10, (128,), generator=g)
            )
            return torch.utils.data.DataLoader(ds, batch_size=16)

    kwargs: dict[str, Any] = {}
    if ctx.cuda:
        kwargs.update(accelerator="gpu", devices=1, precision="16-mixed")
    else:  # the CUDA path forced on the CPU, as tests/integrations/test_lightning.py does
        from lightning.pytorch.plugins.precision import MixedPrecision

        plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
        kwargs.update(accelerator="cpu", devices=1, plugins=[plugin])
    module = Module()
    trainer = pl.Trainer(
        max_steps=8, callbacks=[ISGDCallback()], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=ctx.tmp / "pl",
        **kwargs,
    )  # fmt: skip
    try:
        trainer.fit(module)
    except MisconfigurationException as exc:
        raise Refused(first_line(str(exc))) from None
    assert module.opt is not None
    data = need_triggers(module.opt, module) | {"global_step": trainer.global_step}
    if trainer.global_step != 8:
        raise CaseFailed(f"global_step {trainer.global_step}, max_steps 8: {fmt(data)}")
    return f"Lightning precision='16-mixed', 8 steps: {fmt(data)}", data


def _reset_accelerate() -> None:
    with contextlib.suppress(Exception):
        from accelerate.state import AcceleratorState, GradientState, PartialState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()


def case_hf_fp16(ctx: Ctx) -> tuple[str, dict]:
    need("transformers")
    need("accelerate")
    import logging

    from transformers import BertConfig, BertForSequenceClassification, TrainingArguments
    from transformers.utils import logging as hf_logging

    from isgd.integrations.huggingface import ISGDTrainer

    hf_logging.set_verbosity_error()
    logging.getLogger("isgd.integrations.huggingface").setLevel(logging.ERROR)
    _reset_accelerate()
    n, length, batch = 64, 16, 8

    class Sequences(torch.utils.data.Dataset):
        def __init__(self) -> None:
            g = torch.Generator().manual_seed(0)
            self.ids = torch.randint(1, 100, (n, length), generator=g)
            self.labels = (self.ids == 7).any(1).long()

        def __len__(self) -> int:
            return n

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.labels[i]}

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=length, num_labels=2,
    )  # fmt: skip
    model = BertForSequenceClassification(config)
    opt = isgd.ISGD(model.parameters(), window=WINDOW, max_extra_iters=3, lr=0.05, momentum=0.9)
    force_triggers(opt)
    args = TrainingArguments(
        output_dir=str(ctx.tmp / "hf"), per_device_train_batch_size=batch, max_steps=10,
        max_grad_norm=1.0, learning_rate=0.05, save_strategy="no", report_to=[],
        use_cpu=not ctx.cuda, fp16=True, disable_tqdm=True, seed=0, logging_steps=5,
    )  # fmt: skip
    trainer = ISGDTrainer(model=model, args=args, train_dataset=Sequences(), optimizers=(opt, None))
    injected = False
    if trainer.accelerator.scaler is None and not ctx.cuda:  # accelerate has no CPU scaler:
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)  # hand it
        trainer.accelerator.native_amp = True  # one, and its unscale and fp16 autocast, as on CUDA
        injected = True
    try:
        trainer.train()
    except ValueError as exc:
        if "ISGDTrainer" in str(exc):
            raise Refused(first_line(str(exc))) from None
        raise
    scaler = trainer.accelerator.scaler
    data = need_triggers(opt, model) | {
        "global_step": trainer.state.global_step,
        "grad_scaler": scaler is not None,
        "scale": None if scaler is None else scaler.get_scale(),
    }
    if ctx.cuda and scaler is None:
        raise CaseFailed(f"fp16 without a GradScaler: {fmt(data)}")
    note = " (cpu: a CPU GradScaler handed to accelerate)" if injected else ""
    return f"ISGDTrainer fp16, 10 steps{note}: {fmt(data)}", data


def _accelerate_setup(ctx: Ctx):
    need("accelerate")
    from accelerate import Accelerator

    _reset_accelerate()
    accelerator = Accelerator(mixed_precision="fp16", cpu=not ctx.cuda)
    injected = False
    if accelerator.scaler is None and not ctx.cuda:  # accelerate has no CPU scaler: hand it one
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        injected = True
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = isgd.ISGD(model.parameters(), window=WINDOW, max_extra_iters=3, lr=0.05, momentum=0.9)
    force_triggers(opt)
    model, wrapped = accelerator.prepare(model, opt)
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(16, 64, generator=g).to(accelerator.device),
         torch.randint(0, 10, (16,), generator=g).to(accelerator.device))
        for _ in range(4)
    ]  # fmt: skip
    return accelerator, model, opt, wrapped, data, injected


def _acc_closure(accelerator, model, wrapped, x, y):
    def closure():
        wrapped.zero_grad()
        with accelerator.autocast():
            loss = F.cross_entropy(model(x), y)
        accelerator.backward(loss)
        return loss

    return closure


def case_accelerate_fp16(ctx: Ctx) -> tuple[str, dict]:
    """The documented call: ``opt.optimizer.step(closure, grad_scaler=accelerator.scaler)``."""
    accelerator, model, opt, wrapped, batches_, injected = _accelerate_setup(ctx)
    if accelerator.scaler is None:
        raise CaseFailed("accelerate fp16 made no GradScaler")
    for x, y in batches_ * (STEPS // 4):
        wrapped.optimizer.step(
            _acc_closure(accelerator, model, wrapped, x, y), grad_scaler=accelerator.scaler
        )
        accelerator.scaler.update()
    data = need_triggers(opt, model) | {"scale": accelerator.scaler.get_scale()}
    note = " (cpu: a CPU GradScaler handed to accelerate)" if injected else ""
    return f"opt.optimizer.step(closure, grad_scaler=accelerator.scaler){note}: {fmt(data)}", data


def case_accelerate_wrapper_step(ctx: Ctx) -> tuple[str, dict]:
    """What a user writes first: the wrapper's own ``opt.step(closure)`` under fp16."""
    accelerator, model, opt, wrapped, batches_, _ = _accelerate_setup(ctx)
    isgd.amp.hand_over(accelerator.scaler)  # the wrapper's scaler.step(opt, closure), from step 1
    try:
        for x, y in batches_ * (STEPS // 4):  # the wrapper calls scaler.update() itself
            wrapped.step(_acc_closure(accelerator, model, wrapped, x, y))
    except RuntimeError as exc:
        if "ISGD" in str(exc):
            raise Refused(first_line(str(exc))) from None
        raise
    data = need_triggers(opt, model)
    return f"AcceleratedOptimizer.step(closure) under fp16: {fmt(data)}", data


# -------- 2 processes
def _dist_worker(rank: int, world: int, init: str, out: str, backend: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(
            small_cnn().to(device), device_ids=[rank] if device.type == "cuda" else None
        )
        opt = isgd.ISGD(
            model.parameters(), window=WINDOW, max_extra_iters=3, sync_loss=True, **SOLVER
        )
        force_triggers(opt)
        g = torch.Generator().manual_seed(10 + rank)  # each rank its own data
        decisions = []
        for _ in range(8):
            x = torch.randn(16, 3, 16, 16, generator=g).to(device)
            y = torch.randint(0, 10, (16,), generator=g).to(device)
            opt.step(plain_closure(model, opt, x, y))
            last = opt.stats.last
            decisions.append((last.triggered, last.extra_iters, last.loss))
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        everyone = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(everyone, flat)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, decisions)
        if rank == 0:
            result = {
                "identical_weights": all(torch.equal(everyone[0], w) for w in everyone),
                "same_decisions": all(d == gathered[0] for d in gathered),
                "stats": stats_of(opt),
            }
            Path(out).write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's threads can abort an interpreter's teardown


def case_two_processes(ctx: Ctx, limit: float) -> tuple[str, dict]:
    import torch.multiprocessing as mp

    if ctx.cuda:
        if torch.cuda.device_count() < 2:
            raise Skipped(f"{torch.cuda.device_count()} CUDA device: the NCCL run needs 2")
        backend = "nccl"
    else:
        backend = "gloo"
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    out = ctx.tmp / "dist.json"
    init = f"file://{ctx.tmp / 'rendezvous'}"
    procs = mp.start_processes(
        _dist_worker, args=(2, init, str(out), backend), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + limit
    try:
        while not procs.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise CaseTimeout(f"the 2 ranks did not finish within {limit:.0f} s")
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.kill()
    result = json.loads(out.read_text())
    data = result["stats"] | {
        "backend": backend,
        "identical_weights": result["identical_weights"],
        "same_decisions": result["same_decisions"],
    }
    if not (data["identical_weights"] and data["same_decisions"]):
        raise CaseFailed(f"the ranks diverged: {fmt(data)}")
    if not (data["triggers"] > 0 and data["extra_iters"] > 0):
        raise CaseFailed(f"forced triggers did not run extra iterations: {fmt(data)}")
    return f"2 ranks, {backend}, sync_loss=True, forced triggers: {fmt(data)}", data


# ------------------------------------------------------------------ the runner
def fmt(data: dict[str, Any]) -> str:
    def one(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return ", ".join(f"{k} {one(v)}" for k, v in data.items())


# name, function, time limit (s) on CUDA, what it covers
CASES: list[tuple[str, Callable[..., tuple[str, dict]], float]] = [
    ("diagnostics-opt-in", case_diagnostics_opt_in, 30),
    ("gradscaler-fp16-keyword", case_scaler_keyword, 30),
    ("gradscaler-fp16-scaler.step", case_scaler_handover, 30),
    ("gradscaler-fp16-scaler.step-first", case_scaler_handover_first, 30),
    ("gradscaler-fp16-closure-free", case_scaler_closure_free, 30),
    ("gradscaler-inf-regular-pass", case_inf_regular, 30),
    ("gradscaler-inf-extra-pass", case_inf_extra, 30),
    ("bf16-autocast", case_bf16, 30),
    ("host-syncs-per-step", case_syncs, 45),
    ("overhead-vs-bare-sgd", case_overhead, 60),
    ("torch-compile", case_compile, 120),
    ("lightning-16-mixed", case_lightning_16_mixed, 60),
    ("hf-trainer-fp16", case_hf_fp16, 60),
    ("accelerate-fp16", case_accelerate_fp16, 45),
    ("accelerate-fp16-wrapper-step", case_accelerate_wrapper_step, 45),
    ("two-process-nccl", case_two_processes, 90),
]
NAMES = [name for name, _, _ in CASES]


class Runner:
    def __init__(self, out: Path, meta: dict[str, Any]) -> None:
        self.out = out
        self.meta = meta
        self.results: list[Result] = []
        self.current: tuple[str, float] | None = None
        self.lock = threading.Lock()

    def write(self, interrupted: str | None = None) -> None:
        with self.lock:
            results = list(self.results)
            if interrupted and self.current is not None:
                name, start = self.current
                results.append(Result(name, "timeout", time.monotonic() - start, interrupted))
            summary: dict[str, int] = {}
            for r in results:
                summary[r.outcome] = summary.get(r.outcome, 0) + 1
            doc = {
                **self.meta,
                "summary": summary,
                "cases": [dataclasses.asdict(r) for r in results],
            }
            if interrupted:
                doc["interrupted"] = interrupted
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "gpu-check.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
            (self.out / "gpu-check.md").write_text(markdown(doc))

    def run(self, name: str, fn: Callable[..., tuple[str, dict]], ctx: Ctx, limit: float) -> Result:
        start = time.monotonic()
        self.current = (name, start)
        data: dict[str, Any] = {}
        use_alarm = hasattr(signal, "SIGALRM") and name != "two-process-nccl"

        def on_alarm(signum, frame):
            raise CaseTimeout(f"over its {limit:.0f} s limit")

        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "gpu-check.log", "a") as log:  # the frameworks' chatter
            print(f"==== {name}", file=log, flush=True)
            previous = signal.signal(signal.SIGALRM, on_alarm) if use_alarm else None
            try:
                if use_alarm:
                    signal.setitimer(signal.ITIMER_REAL, limit)
                args = (ctx, limit) if name == "two-process-nccl" else (ctx,)
                with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                    detail, data = fn(*args)
                outcome = "works"
            except Refused as exc:
                outcome, detail = "refused", first_line(str(exc))
            except Skipped as exc:
                outcome, detail = "skipped", first_line(str(exc))
            except CaseTimeout as exc:
                outcome, detail = "timeout", first_line(str(exc))
            except CaseFailed as exc:
                outcome, detail = "failed", first_line(str(exc))
            except Exception as exc:  # every failure is a record, none ends the check
                outcome, detail = "failed", err_line(exc)
                for mark, why in KNOWN.items():
                    if mark in detail:
                        detail = f"known ({why}): {detail}"
                data = {"traceback": traceback.format_exc(limit=6).splitlines()[-8:]}
                traceback.print_exc(file=log)
            finally:
                if use_alarm:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    signal.signal(signal.SIGALRM, previous)
        if ctx.cuda:
            with contextlib.suppress(Exception):
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        result = Result(name, outcome, round(time.monotonic() - start, 2), detail, data)
        with self.lock:
            self.results.append(result)
            self.current = None
        self.write()
        print(f"gpu-check: {name:34s} {outcome:8s} {result.seconds:7.1f} s  {detail}", flush=True)
        return result


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        f"# GPU check ({doc['device']})",
        "",
        f"- date (UTC): {doc['date']}; machine: {doc['machine']}",
        f"- torch {doc['torch']}, CUDA {doc['cuda']}, {doc['gpu']}; "
        + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()),
        f"- budget {doc['budget_s']} s; summary: "
        + ", ".join(f"{k} {v}" for k, v in doc["summary"].items()),
        f"- momentum-ratio diagnostic: {doc['diagnostics_stance']}",
    ]
    if doc.get("interrupted"):
        lines.append(f"- **interrupted**: {doc['interrupted']}")
    lines += ["", "| case | outcome | seconds | detail |", "|---|---|---|---|"]
    for c in doc["cases"]:
        detail = str(c["detail"]).replace("|", "\\|")
        lines.append(f"| {c['case']} | {c['outcome']} | {c['seconds']:.1f} | {detail} |")
    return "\n".join(lines) + "\n"


def versions() -> dict[str, str]:
    out = {"isgd": getattr(isgd, "__version__", "?")}
    for name in ("lightning", "transformers", "accelerate"):
        if importlib.util.find_spec(name) is None:
            out[name] = "not installed"
            continue
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:
            out[name] = "?"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="default: $OUT, else runs/gpu-check-<time>"
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--budget", type=float, default=400.0, help="seconds for all cases")
    parser.add_argument("--only", default=None, help="comma-separated case names")
    parser.add_argument(
        "--compile-backend", default=None, help="inductor on CUDA, aot_eager on CPU"
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (cpu mode: 1)")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device (torch {torch.__version__}): nothing to check")
        return 0
    selected = NAMES if args.only is None else [s.strip() for s in args.only.split(",")]
    unknown = sorted(set(selected) - set(NAMES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {', '.join(NAMES)}")
    if args.out is None:
        env = os.environ.get("OUT")
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = Path(env) if env else ROOT / "runs" / f"gpu-check-{stamp}"
    cuda = args.device == "cuda"
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
    meta = {
        "check": "isgd gpu-check (issue 21 §3)",
        "device": f"{device.type}" + ("" if cuda else " (smoke mode)"),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else "no GPU",
        "gpus": torch.cuda.device_count() if cuda else 0,
        "versions": versions(),
        "budget_s": args.budget,
        "diagnostics_stance": (
            "opt-in, ISGD(diagnostics=False) by default: stats.last.momentum_ratio is computed "
            "(two norms and a host sync per extra iteration) only with diagnostics=True"
        ),
    }
    runner = Runner(args.out, meta)
    begin = time.monotonic()
    hard = args.budget + 30.0  # the whole check never outlives this, whatever a case does

    def watchdog() -> None:
        runner.write(interrupted=f"the check ran past {hard:.0f} s and was stopped")
        print(f"gpu-check: stopped after {hard:.0f} s; results so far in {args.out}", flush=True)
        os._exit(3)

    timer = threading.Timer(hard, watchdog)
    timer.daemon = True
    timer.start()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        ctx = Ctx(
            device=device,
            compile_backend=args.compile_backend or ("inductor" if cuda else "aot_eager"),
            tmp=Path(tmp),
            quick=not cuda,
        )
        print(f"gpu-check: {meta['device']}, {meta['gpu']}, torch {torch.__version__} → {args.out}")
        for name, fn, limit in CASES:
            if name not in selected:
                continue
            left = args.budget - (time.monotonic() - begin)
            if left < 5:
                runner.results.append(Result(name, "skipped", 0.0, "out of budget"))
                runner.write()
                continue
            runner.run(name, fn, ctx, min(limit, left))
    timer.cancel()
    runner.write()
    summary = ", ".join(
        f"{k} {v}"
        for k, v in json.loads((args.out / "gpu-check.json").read_text())["summary"].items()
    )
    print(f"gpu-check: {summary} in {time.monotonic() - begin:.0f} s; {args.out}/gpu-check.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
