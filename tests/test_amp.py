"""Issue 21 §2, the library side: ``scaler.step(opt, closure)`` from the first step (and
accelerate's fp16 wrapper through it), the scaler's back-off on an inf in an extra pass and the
same back-off on every rank (2 gloo processes), ``ISGD(window=None)`` with ``set_window``, the
closure-free form under an LR scheduler, and the message for a base optimizer instance."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn import functional as F

from isgd import ISGD, amp
from tests import toy
from tests.fixtures import join_gloo, leave_rank, run_two_ranks

SGD_KW = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
ISGD_KW = dict(window=toy.N_BATCHES, sigma_factor=1.5, max_extra_iters=4, eps=0.1)
INIT_SCALE = 2.0**12


def new_scaler(kind=amp.GradScaler) -> torch.amp.GradScaler:
    """isgd's scaler by default (``scaler.step(opt, closure)`` from the first step)."""
    return kind("cpu", init_scale=INIT_SCALE, growth_interval=10**6)


def forced(opt: ISGD) -> ISGD:
    """A full chart with a limit below every loss: every step triggers."""
    for _ in range(opt.chart.window):
        opt.chart.update(0.0)
    return opt


# ------------------------------------------------------------------ scaler.step(opt, closure)
@pytest.mark.numerics
def test_scaler_step_with_a_closure_works_from_the_first_step():
    """The README's line from step 1 (torch checks the scale before ISGD's closure could make
    it): a power-of-two scale is exact, so the run equals the fp32 one."""
    data = toy.batches()
    model_a, model_b = toy.small_cnn(), toy.small_cnn()
    ref = ISGD(model_a.parameters(), **SGD_KW, **ISGD_KW)
    opt = ISGD(model_b.parameters(), **SGD_KW, **ISGD_KW)
    scaler = new_scaler()
    for t in range(3 * toy.N_BATCHES):
        x, y = data[t % len(data)]
        ref.step(toy.make_closure(model_a, x, y, ref.zero_grad))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's, on the hand-over
            scaler.step(opt, toy.scaled_closure(model_b, opt, x, y, scaler))
        scaler.update()
    assert ref.stats.triggers > 0 and opt.stats == ref.stats
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters()))
    assert scaler.get_scale() == INIT_SCALE
    assert opt._handed_scaler is None  # the hand-over ends with the call


def test_other_optimizers_meet_torchs_grad_scaler_unchanged():
    model = torch.nn.Linear(3, 1)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.ones(2, 3)).sum().backward()
    with pytest.raises(AssertionError, match="_scale is None"):
        new_scaler().step(sgd)  # torch's own check, as without isgd


def test_importing_isgd_patches_nothing_of_torch():
    """Only isgd's own scaler, or one handed over, changes: torch's class is as it was, and its
    scaler still fails the first ``scaler.step(opt, closure)`` (torch checks the scale first)."""
    assert "isgd" not in torch.amp.GradScaler.step.__module__
    model = toy.small_cnn()
    opt = ISGD(model.parameters(), **SGD_KW, **ISGD_KW)
    torch_scaler = new_scaler(torch.amp.GradScaler)
    x, y = toy.batches()[0]
    with pytest.raises(AssertionError, match="_scale is None"):
        torch_scaler.step(opt, toy.scaled_closure(model, opt, x, y, torch_scaler))
    handed = amp.hand_over(new_scaler(torch.amp.GradScaler))
    assert handed.step.__self__ is handed and "isgd" not in torch.amp.GradScaler.step.__module__
    handed.step(opt, toy.scaled_closure(model, opt, x, y, handed))  # works from the first step
    assert opt.stats.steps == 1


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def _accelerate_run(wrapper_step: bool) -> tuple[torch.nn.Module, ISGD, float]:
    from accelerate import Accelerator

    _reset_accelerate()
    accelerator = Accelerator(mixed_precision="fp16", cpu=True)
    if accelerator.scaler is None:  # accelerate makes no CPU scaler: give it torch's
        accelerator.scaler = new_scaler(torch.amp.GradScaler)
    amp.hand_over(accelerator.scaler)  # its wrapper's scaler.step(opt, closure), from step 1
    model = toy.small_cnn()
    opt = forced(ISGD(model.parameters(), window=100, max_extra_iters=3, **SGD_KW))
    model, wrapped = accelerator.prepare(model, opt)
    for x, y in toy.batches()[:6]:

        def closure(x=x, y=y):
            wrapped.zero_grad()
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            return loss

        if wrapper_step:  # what a user writes first; the wrapper calls scaler.update() itself
            wrapped.step(closure)
        else:  # the documented call
            opt.step(closure, grad_scaler=accelerator.scaler)
            accelerator.scaler.update()
    _reset_accelerate()
    return model, opt, accelerator.scaler.get_scale()


def test_accelerate_fp16_wrapper_step_with_a_closure_equals_the_documented_call():
    pytest.importorskip("accelerate")
    model_a, opt_a, scale_a = _accelerate_run(wrapper_step=False)
    model_b, opt_b, scale_b = _accelerate_run(wrapper_step=True)
    assert opt_a.stats.triggers == 6 and opt_a.stats.extra_iters > 0
    assert opt_b.stats == opt_a.stats and scale_b == scale_a
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters()))


# ------------------------------------------------------------------ the scaler's back-off
@pytest.mark.parametrize("how", ["keyword", "scaler.step"])
def test_an_inf_in_an_extra_pass_backs_the_scale_off(how):
    data = toy.batches()
    model = toy.small_cnn()
    opt = forced(ISGD(model.parameters(), **SGD_KW, **{**ISGD_KW, "window": 100}))
    scaler = new_scaler()
    x, y = data[0]
    closure = toy.scaled_closure(model, opt, x, y, scaler, poison=lambda c: c == 3)  # 2nd extra
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if how == "keyword":
            opt.step(closure, grad_scaler=scaler)
        else:
            scaler.step(opt, closure)
    scaler.update()
    assert opt.stats.last.triggered and opt.stats.last.extra_iters == 1  # stopped at the inf
    assert scaler.get_scale() == INIT_SCALE / 2  # as torch's loop backs off on a found inf
    assert all(torch.isfinite(p).all() for p in model.parameters())
    opt.step(
        toy.scaled_closure(model, opt, x, y, scaler), grad_scaler=scaler
    )  # no inf: no back-off
    scaler.update()
    assert opt.stats.last.extra_iters == 4 and scaler.get_scale() == INIT_SCALE / 2


def _ddp_worker(rank: int, world: int, init: str, out: str) -> None:
    join_gloo(rank, world, init, timeout=30)
    try:
        model = torch.nn.parallel.DistributedDataParallel(toy.small_cnn())
        opt = forced(ISGD(model.parameters(), **SGD_KW, **{**ISGD_KW, "window": 100}))
        scaler = new_scaler()
        data = toy.batches(seed=10 + rank)  # each rank its own data
        # rank 1 alone sees an inf, after DDP's all-reduce: in the regular pass of step 2, in
        # the 2nd extra pass of step 4
        poison = {2: 1, 4: 3} if rank == 1 else {}
        scales, records = [], []
        for t in range(6):
            x, y = data[t]
            call = poison.get(t)
            closure = toy.scaled_closure(model, opt, x, y, scaler, poison=lambda c, k=call: c == k)
            opt.step(closure, grad_scaler=scaler)
            scaler.update()
            scales.append(scaler.get_scale())
            last = opt.stats.last
            records.append([last.skipped, last.triggered, last.extra_iters])
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        everyone = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(everyone, flat)
        result = {
            "scales": scales,
            "records": records,
            "same_weights": all(torch.equal(everyone[0], w) for w in everyone),
            "finite": bool(torch.isfinite(flat).all()),
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    leave_rank()


def test_an_inf_one_rank_alone_sees_backs_the_scale_off_on_every_rank(tmp_path):
    r0, r1 = run_two_ranks(_ddp_worker, tmp_path, timeout=90)
    assert r0["records"] == r1["records"]
    assert r0["records"][2][0] and not r0["records"][2][1]  # the regular-pass inf: skipped
    assert r0["records"][4][1] and r0["records"][4][2] == 1  # the extra-pass inf: stopped
    assert (
        r0["scales"]
        == r1["scales"]
        == [INIT_SCALE] * 2 + [INIT_SCALE / 2] * 2 + [INIT_SCALE / 4] * 2
    )
    assert r0["same_weights"] and r0["finite"]


# ------------------------------------------------------------------ ISGD(window=None)
def test_window_none_is_set_once_before_the_first_step():
    data = toy.batches()
    model = toy.small_cnn()
    opt = ISGD(model.parameters(), window=None, **SGD_KW)
    assert opt.window is None and "window=None" in repr(opt)
    x, y = data[0]
    with pytest.raises(RuntimeError) as info:
        opt.step(toy.make_closure(model, x, y, opt.zero_grad))
    assert str(info.value) == (
        "ISGD(window=None): call opt.set_window(len(train_loader)) before the first step, or "
        "pass window=..."
    )
    with pytest.raises(RuntimeError, match=r"set_window"):
        opt.observe(1.0)  # the closure-free form too
    assert opt.stats.steps == 0 and opt.chart.count == 0
    for bad in (1, 2.5, True, None):
        with pytest.raises(ValueError, match="Invalid window"):
            opt.set_window(bad)  # type: ignore[arg-type]
    opt.set_window(toy.N_BATCHES)
    opt.set_window(toy.N_BATCHES)  # the same value again: nothing to do
    assert opt.window == opt.chart.window == toy.N_BATCHES
    for t in range(2 * toy.N_BATCHES):
        x, y = data[t % len(data)]
        opt.step(toy.make_closure(model, x, y, opt.zero_grad))
    assert opt.chart.full
    with pytest.raises(ValueError, match=r"set_window\(5\) after 24 steps with window=12"):
        opt.set_window(5)


def test_window_none_state_dict_round_trips():
    model = toy.small_cnn()
    unset = ISGD(model.parameters(), window=None, **SGD_KW)
    saved = unset.state_dict()
    # no window to save: None, not the stand-in chart's (the key stays, as distributed
    # checkpoints load only the keys a fresh optimizer's state_dict has)
    assert saved["isgd"]["chart"]["window"] is None
    other = ISGD(model.parameters(), window=None, **SGD_KW)
    other.load_state_dict(saved)
    assert other.window is None
    given = ISGD(model.parameters(), window=7, **SGD_KW)
    given.load_state_dict(saved)  # an empty chart fits any window
    assert given.window == 7

    ran = ISGD(model.parameters(), window=None, **SGD_KW)
    ran.set_window(toy.N_BATCHES)
    data = toy.batches()
    for x, y in data[:5]:
        ran.step(toy.make_closure(model, x, y, ran.zero_grad))
    state = ran.state_dict()
    assert state["isgd"]["chart"]["window"] == toy.N_BATCHES
    resumed = ISGD(model.parameters(), window=None, **SGD_KW)
    resumed.load_state_dict(state)  # the window is not set: the saved one is taken
    assert resumed.window == toy.N_BATCHES and resumed.chart.losses() == ran.chart.losses()
    resumed.set_window(toy.N_BATCHES)  # what an integration calls at fit start: no change
    with pytest.raises(ValueError, match="Invalid window"):
        ISGD(model.parameters(), window=5, **SGD_KW).load_state_dict(state)


# ------------------------------------------------------------------ LR scheduler, closure-free
def test_closure_free_loop_with_a_scheduler_emits_no_warning():
    data = toy.batches()
    model = toy.small_cnn()
    opt = forced(ISGD(model.parameters(), **SGD_KW, **{**ISGD_KW, "window": 100}))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in data[:4]:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            n_extra = opt.observe(loss)
            opt.base_optimizer.step()
            for _ in range(n_extra):
                loss_i = F.cross_entropy(model(x), y)
                if not opt.above_limit(loss_i):
                    break
                opt.zero_grad()
                loss_i.backward()
                opt.subproblem_grad_()
                opt.subproblem_step_()
            scheduler.step()
    assert opt.stats.extra_iters > 0
    assert opt.param_groups[0]["lr"] == pytest.approx(SGD_KW["lr"] / 4)


# ------------------------------------------------------------------ a base optimizer instance
def test_a_base_optimizer_instance_is_refused_in_one_line():
    model = toy.small_cnn()
    with pytest.raises(TypeError) as info:
        ISGD(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1), window=10)
    message = str(info.value)
    assert "\n" not in message and len(message) < 160
    assert "not an instance (SGD)" in message and "ISGD(params, torch.optim.SGD, lr=...)" in message

    class Custom(torch.optim.SGD):
        pass

    with pytest.raises(TypeError, match=r"\.Custom, lr=\.\.\.\)"):
        ISGD(model.parameters(), Custom(model.parameters(), lr=0.1), window=10)
