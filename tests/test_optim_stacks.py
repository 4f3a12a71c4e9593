"""ISGD in the loops practitioners write: GradScaler, torch.compile, gradient accumulation,
the closure-free bare step, and a user-owned DDP loop (2 processes, gloo)."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

from isgd import ISGD, LossControlChart
from tests import toy
from tests.fixtures import leave_rank

SGD_KW = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
ISGD_KW = dict(window=toy.N_BATCHES, sigma_factor=1.5, max_extra_iters=4, eps=0.1)
STEPS = 6 * toy.N_BATCHES


def params_equal(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# ------------------------------------------------------------------ GradScaler
@pytest.mark.parametrize("how", ["keyword", "scaler.step"])
@pytest.mark.numerics
def test_grad_scaler_step_matches_fp32_bit_for_bit(how):
    """A power-of-two scale is exact: the scaled, unscaled passes give the fp32 run's weights,
    triggers and extra iterations included."""
    data = toy.batches()
    model_a, model_b = toy.small_cnn(), toy.small_cnn()
    ref = ISGD(model_a.parameters(), **SGD_KW, **ISGD_KW)
    opt = ISGD(model_b.parameters(), **SGD_KW, **ISGD_KW)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=10**6)
    for t in range(STEPS):
        x, y = data[t % len(data)]
        ref.step(toy.make_closure(model_a, x, y, ref.zero_grad))
        closure = toy.scaled_closure(model_b, opt, x, y, scaler)
        if how == "keyword" or t == 0:  # torch makes the scale at the first scaler.scale()
            opt.step(closure, grad_scaler=scaler)
        else:  # GradScaler hands itself to ISGD.step (its FutureWarning is torch's)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                scaler.step(opt, closure)
        scaler.update()
    assert ref.stats.triggers > 0 and ref.stats.extra_iters > 0
    assert opt.stats == ref.stats
    assert params_equal(model_a, model_b)
    assert scaler.get_scale() == 2.0**12


def test_grad_scaler_inf_in_the_regular_pass_skips_the_update_and_backs_off():
    data = toy.batches()
    model = toy.small_cnn()
    opt = ISGD(model.parameters(), **SGD_KW, **ISGD_KW)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=10**6)
    for t in range(STEPS):
        x, y = data[t % len(data)]
        opt.step(toy.scaled_closure(model, opt, x, y, scaler), grad_scaler=scaler)
        scaler.update()
    before = [p.clone() for p in model.parameters()]
    momentum = [opt.base_optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    x, y = data[toy.NOISY_BATCHES[0]]  # the batch that triggers
    opt.step(
        toy.scaled_closure(model, opt, x, y, scaler, poison=lambda c: c == 1), grad_scaler=scaler
    )
    scaler.update()
    assert opt.stats.last.skipped and not opt.stats.last.triggered
    assert opt.stats.last.extra_iters == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    state = [opt.base_optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
    assert all(torch.equal(m, n) for m, n in zip(state, momentum))
    assert scaler.get_scale() == 2.0**11  # the scaler saw the inf and backed off


def test_grad_scaler_inf_in_an_extra_iteration_ends_the_extra_iterations():
    data = toy.batches()
    model = toy.small_cnn()
    opt = ISGD(model.parameters(), **SGD_KW, **ISGD_KW)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=10**6)
    poisoned = 0
    for t in range(STEPS):
        x, y = data[t % len(data)]
        opt.step(
            toy.scaled_closure(model, opt, x, y, scaler, poison=lambda c: c == 3),
            grad_scaler=scaler,
        )
        scaler.update()
        if opt.stats.last.triggered and opt.stats.last.loss_after is not None:
            # the 2nd extra pass (call 3) had inf: at most one extra update was applied
            assert opt.stats.last.extra_iters <= 1
            poisoned += opt.stats.last.extra_iters == 1
    assert poisoned > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_closure_free_bare_step_through_grad_scaler():
    """A loop that owns backward(): observe(), then scaler.step(opt) — ISGD applies the update."""
    data = toy.batches()
    model_a, model_b = toy.small_cnn(), toy.small_cnn()
    kw = {**SGD_KW, **ISGD_KW, "max_extra_iters": 0}
    ref = ISGD(model_a.parameters(), **kw)
    opt = ISGD(model_b.parameters(), **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=10**6)
    for t in range(2 * toy.N_BATCHES):
        x, y = data[t % len(data)]
        ref.step(toy.make_closure(model_a, x, y, ref.zero_grad))
        opt.zero_grad()
        loss = F.cross_entropy(model_b(x), y)
        scaler.scale(loss).backward()
        opt.observe(loss)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            scaler.step(opt)
        scaler.update()
    assert params_equal(model_a, model_b)
    with pytest.raises(TypeError, match=r"Invalid closure: None .*observe\(loss\) before a bare"):
        opt.step()  # no observe() this step


def test_a_closure_must_return_a_scalar_loss():
    model = toy.small_cnn()
    opt = ISGD(model.parameters(), lr=0.1, window=4)
    with pytest.raises(TypeError, match=r"Invalid closure result: NoneType"):
        opt.step(lambda: None)
    x, y = toy.batches()[0]
    with pytest.raises(TypeError, match=r"Invalid closure result: shape \(16,\)"):
        opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"))
    with pytest.raises(TypeError, match=r"Invalid ISGD.observe\(loss\): NoneType"):
        opt.observe(None)  # type: ignore[arg-type]


def _nan_closure(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) * float("nan")
        loss.backward()
        return loss

    return closure


def test_a_nonfinite_loss_raises_before_anything_changes():
    model = toy.small_cnn()
    opt = ISGD(model.parameters(), lr=0.1, momentum=0.9, window=4)
    x, y = toy.batches()[0]
    opt.step(toy.make_closure(model, x, y, opt.zero_grad))  # a momentum buffer exists
    weights = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(FloatingPointError, match=r"the batch loss is nan at step 2; no update"):
        opt.step(_nan_closure(model, opt, x, y))
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    after = opt.state_dict()
    assert after["isgd"] == state["isgd"]
    for i, buf in state["state"].items():
        assert torch.equal(buf["momentum_buffer"], after["state"][i]["momentum_buffer"])
    with pytest.raises(FloatingPointError):  # the closure-free form alike
        opt.observe(torch.tensor(float("inf")))


def test_nonfinite_skip_skips_the_step_and_counts_it():
    model = toy.small_cnn()
    opt = ISGD(model.parameters(), lr=0.1, momentum=0.9, window=4, nonfinite="skip")
    x, y = toy.batches()[0]
    opt.step(toy.make_closure(model, x, y, opt.zero_grad))
    weights = [p.detach().clone() for p in model.parameters()]
    opt.step(_nan_closure(model, opt, x, y))
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert opt.stats.nonfinite == 1 and opt.stats.last.skipped and opt.chart.count == 1
    opt.observe(torch.tensor(float("nan")))  # closure-free: the bare step applies nothing
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert opt.stats.nonfinite == 2
    opt.step(toy.make_closure(model, x, y, opt.zero_grad))  # a finite loss trains again
    assert not all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    with pytest.raises(ValueError, match="nonfinite"):
        ISGD(model.parameters(), lr=0.1, window=4, nonfinite="ignore")


# ------------------------------------------------------------------ torch.compile
def test_freeze_bn_stats_holds_for_a_compiled_model():
    data = toy.batches()
    model = toy.small_cnn(batchnorm=True)
    compiled = torch.compile(model, backend="eager")  # dynamo runs the submodules, no hooks
    opt = ISGD(model.parameters(), **SGD_KW, **ISGD_KW)
    bn = model[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's note on global module hooks
        for t in range(STEPS):
            x, y = data[t % len(data)]
            opt.step(toy.make_closure(compiled, x, y, opt.zero_grad))
    assert opt.stats.extra_iters > 0
    assert int(bn.num_batches_tracked) == STEPS  # the regular passes only


# ------------------------------------------------------------------ gradient accumulation
def micro_batch_closure(model, opt, x, y, k):
    """The supported accumulation: every micro-batch inside the closure."""

    def closure():
        opt.zero_grad()
        total = 0.0
        for xs, ys in zip(x.chunk(k), y.chunk(k)):
            loss = F.cross_entropy(model(xs), ys) / k
            loss.backward()
            total = total + loss.detach()
        return total

    return closure


def test_accumulation_inside_the_closure_equals_one_large_batch():
    data = toy.batches()
    model_a, model_b = toy.small_cnn(), toy.small_cnn()
    big = ISGD(model_a.parameters(), **SGD_KW, **ISGD_KW)
    acc = ISGD(model_b.parameters(), **SGD_KW, **ISGD_KW)
    decisions_a, decisions_b = [], []
    for t in range(STEPS):
        x, y = data[t % len(data)]
        big.step(toy.make_closure(model_a, x, y, big.zero_grad))
        acc.step(micro_batch_closure(model_b, acc, x, y, k=4))
        decisions_a.append((big.stats.last.triggered, big.stats.last.extra_iters))
        decisions_b.append((acc.stats.last.triggered, acc.stats.last.extra_iters))
    assert big.stats.triggers > 0 and decisions_a == decisions_b
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_gradients_accumulated_outside_the_closure_are_refused():
    data = toy.batches()
    model = toy.small_cnn()
    opt = ISGD(model.parameters(), **SGD_KW, **ISGD_KW)
    x, y = data[0]
    opt.step(toy.make_closure(model, x, y, opt.zero_grad))  # grads left by step(): fine
    opt.step(toy.make_closure(model, x, y, opt.zero_grad))
    opt.zero_grad(set_to_none=False)  # zeroed in place: fine
    opt.step(toy.make_closure(model, x, y, opt.zero_grad))
    F.cross_entropy(model(x), y).backward()  # a micro-batch back-propagated outside
    with pytest.raises(RuntimeError, match=r"gradients back-propagated outside the closure"):
        opt.step(toy.make_closure(model, x, y, opt.zero_grad))
    fresh = ISGD(toy.small_cnn(1).parameters(), **SGD_KW, **ISGD_KW)
    assert fresh._grad_marks is None  # nothing to compare with on the first step: a norm > 0
    model1 = next(iter(fresh.param_groups))["params"]
    model1[0].grad = torch.ones_like(model1[0])
    with pytest.raises(RuntimeError, match=r"gradient accumulation"):
        fresh.step(lambda: torch.tensor(1.0))


# ------------------------------------------------------------------ a user-owned DDP loop
def _ddp_worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(toy.small_cnn())
        opt = ISGD(model.parameters(), **SGD_KW, **{**ISGD_KW, "sigma_factor": 0.5})
        data = toy.batches(seed=10 + rank)  # each rank its own data: the local losses differ
        local = LossControlChart(toy.N_BATCHES, 0.5)  # what a rank alone would have decided
        mine, alone = [], []
        for t in range(STEPS):
            x, y = data[t % len(data)]
            weight = len(x) + rank  # uneven weights, as for uneven per-rank batches
            loss = opt.step(toy.make_closure(model, x, y, opt.zero_grad), weight=weight)
            limit = local.limit
            alone.append(limit is not None and float(loss) > limit)
            local.update(float(loss))
            mine.append((opt.stats.last.triggered, opt.stats.last.extra_iters, opt.stats.last.loss))
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        everyone = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(everyone, flat)
        decisions, lone = [None] * world, [None] * world
        dist.all_gather_object(decisions, mine)
        dist.all_gather_object(lone, alone)
        if rank == 0:
            torch.save(
                {"weights": everyone, "decisions": decisions, "alone": lone, "stats": opt.stats},
                out,
            )
        dist.barrier()
    finally:
        dist.destroy_process_group()
    leave_rank()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2])
def test_user_ddp_loop_takes_the_same_decisions_on_every_rank(tmp_path, world):
    out = tmp_path / "result.pt"
    init = f"file://{tmp_path / 'rendezvous'}"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_ddp_worker, args=(world, init, str(out)), nprocs=world, join=True)
    result = torch.load(out, weights_only=False)
    d0, d1 = result["decisions"]
    assert d0 == d1  # same triggers, same number of extra iterations, same judged ψ
    assert result["stats"].triggers > 0 and result["stats"].extra_iters > 0
    assert result["alone"][0] != result["alone"][1]  # judged locally, they would disagree
    w0, w1 = result["weights"]
    assert torch.equal(w0, w1)


# ------------------------------------------------------------------ isgd train: no second reduction
def test_isgd_train_hands_isgd_the_global_loss_and_opts_out_of_a_second_reduction(monkeypatch):
    """The trainer's ψ is already allreduce(Σℓ)/B (with the stop votes in the same message):
    ISGD must not reduce it again, even when a process group is up."""
    from isgd.training.config import resolve_config
    from isgd.training.train import build_optimizer

    config = resolve_config(overrides={"optimizer": "isgd", "model": "mlp"})
    opt = build_optimizer(config, toy.small_cnn(), n_b=toy.N_BATCHES)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    assert not opt.sync.active()
    calls = []
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: calls.append(a))
    opt.observe(torch.tensor(1.0))
    assert calls == []
    default = ISGD(toy.small_cnn().parameters(), lr=0.1, window=4)
    assert default.sync.active()  # ... whereas a plain ISGD would reduce
