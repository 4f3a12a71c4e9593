from __future__ import annotations

import copy
import io
import os
import platform
import re

import pytest
import torch
from torch.nn import functional as F

from isgd import ISGD, ForwardOnlyISGD, frozen_batchnorm_stats
from tests import toy
from tests.reference_isgd import ReferenceISGD

pytestmark = pytest.mark.numerics  # make test runs these under each CPU kernel family as well

SGD_KW = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
ISGD_KW = dict(window=toy.N_BATCHES, sigma_factor=1.5, max_extra_iters=4, eps=0.1)


def run(model, opt, data, steps, logs=None):
    """Train ``steps`` steps over the fixed cycle; returns per-step (triggered, extra_iters)."""
    decisions = []
    for t in range(steps):
        x, y = data[t % len(data)]
        log = [] if logs is not None else None
        opt.step(toy.make_closure(model, x, y, opt.zero_grad, log))
        if logs is not None:
            logs.append(log)
        if isinstance(opt, ISGD):
            decisions.append((opt.stats.last.triggered, opt.stats.last.extra_iters))
    return decisions


def params_equal(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# ------------------------------------------------------------------ the kernels under test
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 kernel families")
def test_the_kernel_family_is_the_one_asked_for():
    """``make test`` reruns this module under ``ATEN_CPU_CAPABILITY=default`` and ``=avx2``: this
    proves that torch dispatched to the kernels asked for (a misspelt value falls back silently)."""
    asked = os.environ.get("ATEN_CPU_CAPABILITY")
    if asked is None:
        pytest.skip("the native kernels: ATEN_CPU_CAPABILITY is not set")
    assert torch.backends.cpu.get_cpu_capability() == asked.upper()


# ------------------------------------------------------------------ max_extra_iters = 0 is the base
@pytest.mark.parametrize("kind", ["mlp", pytest.param("cnn", marks=pytest.mark.slow)])
@pytest.mark.parametrize(
    "base, kwargs",
    [
        (torch.optim.SGD, SGD_KW),
        (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
        (torch.optim.Adam, dict(lr=1e-3, weight_decay=1e-4)),
    ],
)
def test_zero_extra_iters_is_bit_identical_to_base(base, kwargs, kind):
    # the same kernels in the same order on both sides: bit-identical on any one machine
    data = toy.batches()
    model_a, model_b = toy.MODELS[kind](), toy.MODELS[kind]()
    isgd = ISGD(model_a.parameters(), base, window=toy.N_BATCHES, max_extra_iters=0, **kwargs)
    plain = base(model_b.parameters(), **kwargs)
    for t in range(300):
        x, y = data[t % len(data)]
        isgd.step(toy.make_closure(model_a, x, y, isgd.zero_grad))
        plain.zero_grad()
        F.cross_entropy(model_b(x), y).backward()
        plain.step()
    assert params_equal(model_a, model_b)
    assert isgd.stats.steps == 300 and isgd.stats.triggers == 0 and isgd.stats.passes == 300


# ------------------------------------------------------------------ lockstep with the reference
# Float32 tolerances. ISGD and the reference take the same steps by different code paths
# (torch._foreach_* over the parameter list vs one tensor at a time), and which float32 kernel a
# path gets — and so how it rounds — depends on the CPU (AVX-512, AVX2, the scalar default). One
# step differs by a few ulps (float32 eps = 1.2e-7); over 120 steps the difference compounds to
# ~1e-6 relative. So decisions (trigger or not, extra iterations, forward-only) are compared
# exactly and values to 1e-5 relative (~100 ulps): loose enough for every kernel family, tight
# enough that a wrong update — an order of the step size, ≥ 1e-3 — cannot pass.
F32_RTOL, F32_ATOL = 1e-5, 1e-6

LOCKSTEP_CASES = [  # (model, nesterov, inner solver, lower_quantile, sigma_factor)
    ("mlp", False, "base", 0.0, 1.5),
    ("mlp", True, "base", 0.0, 1.5),
    ("mlp", False, "gd", 0.0, 1.5),
    ("mlp", False, "momentum", 0.0, 1.5),
    # the forward-only variant (with the MLP, a 1σ limit so that steps trigger as well)
    ("mlp", False, "base", 0.1, 1.0),
    pytest.param("cnn", False, "base", 0.0, 1.5, marks=pytest.mark.slow),  # a convolution
    pytest.param("cnn", False, "base", 0.3, 1.5, marks=pytest.mark.slow),
]


@pytest.mark.parametrize(
    "kind, nesterov, inner_solver, lower_quantile, sigma_factor", LOCKSTEP_CASES
)
def test_lockstep_with_reference(kind, nesterov, inner_solver, lower_quantile, sigma_factor):
    data = toy.batches()
    model, ref_model = toy.MODELS[kind](), toy.MODELS[kind]()
    kw = dict(SGD_KW, nesterov=nesterov)
    variant = dict(lower_quantile=lower_quantile) if lower_quantile > 0 else {}
    opt = (ForwardOnlyISGD if lower_quantile > 0 else ISGD)(
        model.parameters(),
        **kw,
        **dict(ISGD_KW, sigma_factor=sigma_factor),
        inner_solver=inner_solver,
        **variant,
    )
    ref = ReferenceISGD(
        list(ref_model.parameters()),
        **kw,
        window=ISGD_KW["window"],
        sigma_factor=sigma_factor,
        stop=ISGD_KW["max_extra_iters"],
        eps=ISGD_KW["eps"],
        inner_solver=inner_solver,
        lower_quantile=lower_quantile,
    )
    early_stops = full_runs = forward_only = 0
    for t in range(10 * toy.N_BATCHES):
        x, y = data[t % len(data)]
        opt.step(toy.make_closure(model, x, y, opt.zero_grad))

        def ref_zero_grad():
            ref_model.zero_grad()

        d = ref.step(toy.make_closure(ref_model, x, y, ref_zero_grad))
        last = opt.stats.last
        assert (last.triggered, last.extra_iters, last.forward_only) == (
            d.triggered,
            d.extra_iters,
            d.forward_only,
        ), f"step {t}"
        forward_only += d.forward_only
        assert last.loss == pytest.approx(d.loss, rel=F32_RTOL), f"loss at step {t}"
        if d.limit is not None:
            assert last.limit == pytest.approx(d.limit, rel=F32_RTOL), f"limit at step {t}"
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(
                p, q, rtol=F32_RTOL, atol=F32_ATOL, msg=f"weights differ at {t}"
            )
        if d.triggered:
            early_stops += d.extra_iters < ISGD_KW["max_extra_iters"]
            full_runs += d.extra_iters == ISGD_KW["max_extra_iters"]
    # the test is only meaningful if both kinds of triggered step happened (with lr 0.01 the
    # momentum-free solvers' small steps never reach the limit: full runs only)
    assert opt.stats.triggers >= 3 and (full_runs >= 1 or lower_quantile > 0)
    assert early_stops >= 1 or inner_solver != "base"
    assert opt.stats.forward_only == forward_only
    assert (forward_only >= 5) == (lower_quantile > 0)


# ------------------------------------------------------------------ the extra iterations
def test_extra_passes_follow_the_stop_rule():
    data = toy.batches()
    model = toy.mlp()
    opt = ISGD(model.parameters(), **SGD_KW, **ISGD_KW)
    triggered = 0
    for t in range(10 * toy.N_BATCHES):
        x, y = data[t % len(data)]
        log: list[float] = []
        opt.step(toy.make_closure(model, x, y, opt.zero_grad, log))
        rec = opt.stats.last
        extra = log[1:]
        if not rec.triggered:
            assert extra == [] and rec.extra_iters == 0
            continue
        triggered += 1
        assert log[0] > rec.limit
        k = rec.extra_iters
        assert all(v > rec.limit for v in extra[:k])  # each update was made above the limit
        if k < ISGD_KW["max_extra_iters"]:  # stopped early: the last evaluation reached it
            assert len(extra) == k + 1 and extra[-1] <= rec.limit
        else:  # hit the cap: no evaluation after the last update
            assert len(extra) == k
        assert rec.loss_after == extra[-1]
    assert triggered >= 3


def test_subproblem_gradient_matches_autograd_of_phi():
    # float64, so that the check does not depend on the thread count's float32 rounding
    model = toy.mlp().double()
    x, y = toy.batches()[toy.NOISY_BATCHES[0]]
    x = x.double()
    opt = ISGD(model.parameters(), lr=0.1, window=2, max_extra_iters=3, eps=10.0)
    for loss in (0.1, 0.2):  # fill the chart with low losses so the real batch triggers
        opt.chart.update(loss)
    closure = toy.make_closure(model, x, y, opt.zero_grad)
    assert opt.observe(closure()) == 3
    w_prev = [p.detach().clone() for p in model.parameters()]
    limit = opt.stats.last.limit
    opt.base_optimizer.step()  # the regular update: w ≠ w_prev from here on

    # autograd of φ(w) = ½(ψ_w − limit)² + ε/(2 n_w)·‖w − w_prev‖²
    opt.zero_grad()
    psi = F.cross_entropy(model(x), y)
    prox = sum(((p - w0) ** 2).sum() for p, w0 in zip(model.parameters(), w_prev))
    phi = 0.5 * (psi - limit) ** 2 + opt.eps / (2 * opt.n_w) * prox
    expected = torch.autograd.grad(phi, list(model.parameters()))

    psi_i = closure()
    assert opt.above_limit(psi_i)
    opt.subproblem_grad_()
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-14)


# ------------------------------------------------------------------ BatchNorm
@pytest.mark.parametrize("freeze", [True, False])
def test_batchnorm_running_stats_and_extra_passes(freeze):
    model = toy.mlp(batchnorm=True)
    bn = model[2]
    x, y = toy.batches()[toy.NOISY_BATCHES[0]]
    opt = ISGD(model.parameters(), lr=0.1, window=2, max_extra_iters=3, freeze_bn_stats=freeze)
    for loss in (0.01, 0.02):
        opt.chart.update(loss)
    after_regular = {}

    calls = []

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if not calls:  # the regular pass has just updated the running statistics
            after_regular.update({k: v.clone() for k, v in bn.state_dict().items()})
        calls.append(loss.item())
        return loss

    before = {k: v.clone() for k, v in bn.state_dict().items()}
    opt.step(closure)
    assert opt.stats.last.triggered and len(calls) > 1
    assert not torch.equal(before["running_mean"], after_regular["running_mean"])
    final = bn.state_dict()
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    same = all(torch.equal(final[k], after_regular[k]) for k in buffers)
    assert same is freeze
    assert int(final["num_batches_tracked"]) == (1 if freeze else len(calls))


def test_frozen_batchnorm_stats_restores_on_error():
    model = toy.mlp(batchnorm=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"), frozen_batchnorm_stats():
        model(torch.randn(4, 1, 8, 8))
        raise RuntimeError("boom")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# ------------------------------------------------------------------ other base optimizers
@pytest.mark.parametrize(
    "base, kwargs",
    [
        (torch.optim.SGD, dict(lr=0.01, momentum=0.9, nesterov=True)),
        (torch.optim.Adam, dict(lr=3e-3)),
        (torch.optim.AdamW, dict(lr=3e-3, weight_decay=0.01)),
    ],
)
def test_any_base_optimizer_runs_extra_iterations(base, kwargs):
    data = toy.batches()
    model = toy.mlp()
    opt = ISGD(model.parameters(), base, **ISGD_KW, **kwargs)
    run(model, opt, data, 8 * toy.N_BATCHES)
    assert opt.stats.triggers > 0 and opt.stats.extra_iters > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert isinstance(opt.base_optimizer, base)


# ------------------------------------------------------------------ persistence and schedulers
def test_state_dict_round_trip_resumes_bit_identically():
    data = toy.batches()
    steps_before, steps_after = 5 * toy.N_BATCHES + 3, 4 * toy.N_BATCHES

    model = toy.mlp()
    opt = ISGD(model.parameters(), **SGD_KW, **ISGD_KW)
    run(model, opt, data, steps_before)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    # the batch order continues where it stopped
    shifted = data[steps_before % len(data) :] + data[: steps_before % len(data)]
    uninterrupted = run(model, opt, shifted, steps_after)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = toy.mlp(seed=123)
    resumed_model.load_state_dict(saved["model"])
    resumed = ISGD(resumed_model.parameters(), **SGD_KW, **ISGD_KW)
    resumed.load_state_dict(saved["opt"])
    assert resumed.stats.steps == steps_before
    decisions = run(resumed_model, resumed, shifted, steps_after)

    assert decisions == uninterrupted
    assert any(trig for trig, _ in uninterrupted)
    assert params_equal(model, resumed_model)
    assert resumed.stats == opt.stats
    assert resumed.chart.state_dict() == opt.chart.state_dict()


def test_load_state_dict_restores_every_saved_hyper_parameter():
    saved = ISGD(
        _params(), lr=0.1, window=4, sigma_factor=2.0, max_extra_iters=2, eps=0.5,
        inner_solver="gd", freeze_bn_stats=False,
    ).state_dict()  # fmt: skip
    opt = ISGD(_params(), lr=0.1, window=4)  # a different window is refused: it is structural
    opt.load_state_dict(saved)
    assert (opt.sigma_factor, opt.max_extra_iters, opt.eps) == (2.0, 2, 0.5)
    assert (opt.inner_solver, opt.freeze_bn_stats) == ("gd", False)


def test_load_state_dict_refuses_a_plain_optimizer_state():
    model = toy.mlp()
    opt = ISGD(model.parameters(), lr=0.1, window=4)
    with pytest.raises(ValueError, match="not an ISGD state_dict"):
        opt.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())


def test_lr_scheduler_drives_the_shared_param_groups():
    data = toy.batches()
    model_a, model_b = toy.mlp(), toy.mlp()
    isgd = ISGD(model_a.parameters(), **SGD_KW, window=toy.N_BATCHES, max_extra_iters=0)
    plain = torch.optim.SGD(model_b.parameters(), **SGD_KW)
    sched_a = torch.optim.lr_scheduler.StepLR(isgd, step_size=10, gamma=0.5)
    sched_b = torch.optim.lr_scheduler.StepLR(plain, step_size=10, gamma=0.5)
    for t in range(35):
        x, y = data[t % len(data)]
        isgd.step(toy.make_closure(model_a, x, y, isgd.zero_grad))
        plain.zero_grad()
        F.cross_entropy(model_b(x), y).backward()
        plain.step()
        sched_a.step()
        sched_b.step()
    assert isgd.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**3)
    assert isgd.param_groups is isgd.base_optimizer.param_groups
    assert params_equal(model_a, model_b)


# ------------------------------------------------------------------ closure-free form
def closure_free_step(model, opt, x, y):
    """The documented closure-free loop, float32, no scaler."""
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    n_extra = opt.observe(loss)
    opt.base_optimizer.step()
    with frozen_batchnorm_stats():
        for _ in range(n_extra):
            opt.zero_grad()
            loss_i = F.cross_entropy(model(x), y)
            loss_i.backward()
            if not opt.above_limit(loss_i):
                break
            opt.subproblem_grad_()
            opt.base_optimizer.step()


def test_closure_free_form_equals_step_with_closure():
    data = toy.batches()
    model_a, model_b = toy.mlp(), toy.mlp()
    opt_a = ISGD(model_a.parameters(), **SGD_KW, **ISGD_KW)
    opt_b = ISGD(model_b.parameters(), **SGD_KW, **ISGD_KW)
    for t in range(8 * toy.N_BATCHES):
        x, y = data[t % len(data)]
        opt_a.step(toy.make_closure(model_a, x, y, opt_a.zero_grad))
        closure_free_step(model_b, opt_b, x, y)
    assert opt_a.stats.triggers > 0
    assert opt_a.stats == opt_b.stats
    assert params_equal(model_a, model_b)


def test_closure_free_with_bfloat16_autocast_and_grad_scaler():
    data = toy.batches()
    model = toy.mlp()
    opt = ISGD(model.parameters(), **SGD_KW, **ISGD_KW)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)

    def loss_fn():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.cross_entropy(model(x), y)

    for t in range(8 * toy.N_BATCHES):
        x, y = data[t % len(data)]
        opt.zero_grad()
        loss = loss_fn()
        scaler.scale(loss).backward()
        n_extra = opt.observe(loss)  # before the step: w_{t-1} is remembered when triggered
        scaler.step(opt.base_optimizer)
        scaler.update()
        for _ in range(n_extra):
            loss_i = loss_fn()
            if not opt.above_limit(loss_i):  # forward only: no backward wasted at the stop
                break
            opt.zero_grad()
            scaler.scale(loss_i).backward()
            scaler.unscale_(opt.base_optimizer)
            opt.subproblem_grad_()
            scaler.step(opt.base_optimizer)
            scaler.update()
    assert opt.stats.triggers > 0 and opt.stats.extra_iters > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_closure_free_misuse_is_reported():
    model = toy.mlp()
    opt = ISGD(model.parameters(), lr=0.1, window=4)
    with pytest.raises(RuntimeError, match="outside a triggered step"):
        opt.above_limit(1.0)
    with pytest.raises(RuntimeError, match="above_limit"):
        opt.subproblem_grad_()


# ------------------------------------------------------------------ counters, memory, non-finite
def test_stats_count_every_pass_and_memory_is_one_copy():
    data = toy.batches()
    model = toy.mlp()
    opt = ISGD(model.parameters(), **SGD_KW, **ISGD_KW)
    logs: list[list[float]] = []
    run(model, opt, data, toy.N_BATCHES, logs)
    assert opt._w_prev is None  # nothing triggers in the first epoch: no copy made
    run(model, opt, data, 8 * toy.N_BATCHES, logs)
    total_passes = sum(len(log) for log in logs)
    assert opt.stats.passes == total_passes
    assert opt.stats.steps == 9 * toy.N_BATCHES
    assert opt.stats.triggers > 0
    assert sum(w.numel() for w in opt._w_prev) == opt.n_w  # exactly one copy of the weights


def test_nonfinite_loss_never_triggers_nor_enters_the_chart():
    model = toy.mlp()
    opt = ISGD(model.parameters(), lr=0.1, window=3, nonfinite="skip")
    for loss in (1.0, 1.1, 0.9):
        opt.chart.update(loss)
    before = opt.chart.state_dict()
    for bad in (float("nan"), float("inf")):
        assert opt.observe(torch.tensor(bad)) == 0
    assert opt.chart.nonfinite == 2 and opt.stats.nonfinite == 2
    assert opt.chart.losses() == before["losses"]


def test_state_dict_is_a_snapshot_of_the_chart_and_counters():
    model = toy.mlp()
    opt = ISGD(model.parameters(), lr=0.1, window=4)
    opt.chart.update(0.5)
    state = opt.state_dict()  # no copy: later steps must not change what was saved
    opt.chart.update(1.0)
    opt.stats.steps += 1
    assert state["isgd"]["chart"]["losses"] == [0.5] and state["isgd"]["stats"]["steps"] == 0


# ------------------------------------------------------------------ bad arguments
def _params():
    return toy.mlp().parameters()


BAD_ARGUMENTS = [
    (dict(lr=-0.1, window=10), ValueError, "Invalid lr: -0.1"),
    (dict(lr=0.1, window=1), ValueError, "Invalid window: 1"),
    (dict(lr=0.1, window=2.5), ValueError, "Invalid window: 2.5"),
    (dict(lr=0.1, window=10, sigma_factor=0), ValueError, "Invalid sigma_factor: 0"),
    (dict(lr=0.1, window=10, sigma_factor=-1.0), ValueError, "Invalid sigma_factor: -1.0"),
    (dict(lr=0.1, window=10, max_extra_iters=-1), ValueError, "Invalid max_extra_iters: -1"),
    (dict(lr=0.1, window=10, max_extra_iters=1.5), TypeError, "Invalid max_extra_iters: 1.5"),
    (dict(lr=0.1, window=10, eps=-0.1), ValueError, "Invalid eps: -0.1"),
    (dict(lr=0.1, window=10, eps=float("nan")), ValueError, "Invalid eps: nan"),
    (
        dict(lr=0.1, window=10, base_optimizer=torch.nn.Linear),
        TypeError,
        "Invalid base_optimizer: <class 'torch.nn.modules.linear.Linear'>",
    ),
    (dict(lr=0.1, window=10, base_optimizer="sgd"), TypeError, "Invalid base_optimizer: 'sgd'"),
    (dict(lr=0.1, window=10, momentum=-0.5), ValueError, "Invalid momentum value: -0.5"),
    (
        dict(lr=0.1, window=10**30),
        ValueError,
        f"Invalid window: {10**30} (must be <= 2147483647 = 2**31 - 1;",
    ),
    (dict(lr=0.1, window="10"), ValueError, "Invalid window: '10' (must be an integer >= 2)"),
    (dict(lr=0.1, window=10, max_extra_iters=True), TypeError, "Invalid max_extra_iters: True"),
    (dict(lr=0.1, window=10, freeze_bn_stats="no"), TypeError, "Invalid freeze_bn_stats: 'no'"),
    (dict(lr=0.1, window=10, eps="0.1"), ValueError, "Invalid eps: '0.1'"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_ARGUMENTS)
def test_bad_arguments_name_the_argument_and_value(kwargs, error, message):
    with pytest.raises(error) as info:
        ISGD(_params(), **kwargs)
    assert str(info.value).startswith(message)


def test_base_optimizer_instance_is_refused():
    params = list(_params())
    with pytest.raises(TypeError, match="not an instance"):
        ISGD(params, torch.optim.SGD(params, lr=0.1), window=4)


def test_step_without_closure():
    opt = ISGD(_params(), lr=0.1, window=4)
    with pytest.raises(TypeError, match=r"^Invalid closure: None"):
        opt.step()


# ------------------------------------------------------------------ inner solvers
def _first_triggered_step(opt, model, data):
    """Steps until one triggers; returns (step index, model and base state before it)."""
    for t in range(20 * toy.N_BATCHES):
        x, y = data[t % len(data)]
        before = (copy.deepcopy(model), copy.deepcopy(opt.base_optimizer.state_dict()))
        opt.step(toy.make_closure(model, x, y, opt.zero_grad))
        if opt.stats.last.extra_iters > 0:
            return t, before
    raise AssertionError("no step triggered")


@pytest.mark.parametrize("inner_solver", ["gd", "momentum"])
def test_own_inner_solvers_leave_the_base_state_to_the_regular_step(inner_solver):
    data = toy.batches()
    model = toy.mlp()
    opt = ISGD(model.parameters(), **SGD_KW, **ISGD_KW, inner_solver=inner_solver, diagnostics=True)
    t, (model_before, state_before) = _first_triggered_step(opt, model, data)
    plain = torch.optim.SGD(model_before.parameters(), **SGD_KW)
    plain.load_state_dict(state_before)
    x, y = data[t % len(data)]
    plain.step(toy.make_closure(model_before, x, y, plain.zero_grad))
    for p, q in zip(model.parameters(), model_before.parameters()):
        assert torch.equal(
            opt.base_optimizer.state[p]["momentum_buffer"], plain.state[q]["momentum_buffer"]
        )
        assert not torch.equal(p, q)  # ... while the extra iterations moved the weights
    ratio = opt.stats.last.momentum_ratio
    assert ratio == 0.0 if inner_solver == "gd" else ratio > 0.0


def test_momentum_ratio_of_the_shared_base_step():
    data = toy.batches()
    model = toy.mlp()
    opt = ISGD(model.parameters(), **SGD_KW, **ISGD_KW, diagnostics=True)
    _first_triggered_step(opt, model, data)
    assert opt.stats.last.momentum_ratio > 1.0  # the velocity dominates ∇φ (issue 12)
    model = toy.mlp()
    adam = ISGD(model.parameters(), torch.optim.Adam, lr=1e-3, **ISGD_KW, diagnostics=True)
    _first_triggered_step(adam, model, data)
    assert adam.stats.last.momentum_ratio is None  # no velocity to compare with


def _norm(tensors) -> float:
    return float(torch.stack([t.norm() for t in tensors]).norm())


@pytest.mark.parametrize("inner_solver", ["base", "momentum", "gd"])
def test_momentum_ratio_is_the_mean_of_mu_v_over_grad_phi(inner_solver):
    """``momentum_ratio`` = mean over a step's extra iterations of μ‖v‖/‖∇φ‖, v the velocity the
    update is about to apply (the base SGD's buffer; the own momentum solver's, zero at the
    first extra iteration; none for "gd"), recomputed here from outside the optimizer."""
    data = toy.batches()
    model = toy.mlp()
    params = list(model.parameters())
    opt = ISGD(params, **SGD_KW, **ISGD_KW, inner_solver=inner_solver, diagnostics=True)
    mu = SGD_KW["momentum"]
    ratios = []
    for t in range(10 * toy.N_BATCHES):
        x, y = data[t % len(data)]
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        n_extra = opt.observe(loss)
        opt.base_optimizer.step()
        expected, v = [], [torch.zeros_like(p) for p in params]
        for _ in range(n_extra):
            opt.zero_grad()
            loss_i = F.cross_entropy(model(x), y)
            loss_i.backward()
            if not opt.above_limit(loss_i):
                break
            opt.subproblem_grad_()
            grads = [p.grad.clone() for p in params]
            if inner_solver == "base":
                v = [opt.base_optimizer.state[p]["momentum_buffer"] for p in params]
            velocity_norm = 0.0 if inner_solver == "gd" else mu * _norm(v)
            expected.append(velocity_norm / _norm(grads))
            if inner_solver == "momentum":
                v = [mu * vi + gi for vi, gi in zip(v, grads)]
            opt.subproblem_step_()
        if expected:
            ratios.append(opt.stats.last.momentum_ratio)
            assert ratios[-1] == pytest.approx(sum(expected) / len(expected), rel=F32_RTOL), t
    assert len(ratios) >= 3
    if inner_solver == "base":  # the shared velocity dominates ∇φ (issue 12)
        assert min(ratios) > 1.0


# ------------------------------------------------------------------ add_param_group mid-training
def test_add_param_group_mid_training_joins_every_parameter_wide_quantity():
    """Unfreezing a layer mid-training (its gradients were computed all along but never used):
    the step after add_param_group runs, the new weights join n_w and the snapshot w_{t−1} of
    triggered steps, and they are trained; accumulation outside the closure is still refused."""
    data = toy.batches()
    model = toy.mlp()
    hidden, head = model[1], model[3]
    opt = ISGD(head.parameters(), **SGD_KW, **dict(ISGD_KW, sigma_factor=1.0))
    run(model, opt, data, 2 * toy.N_BATCHES)
    assert hidden.weight.grad is not None  # back-propagated, never zeroed by opt.zero_grad
    opt.add_param_group({"params": hidden.parameters(), "lr": 0.02})
    assert opt.n_w == sum(p.numel() for p in model.parameters())
    assert opt.param_groups is opt.base_optimizer.param_groups and len(opt.param_groups) == 2
    before = hidden.weight.detach().clone()
    decisions = run(model, opt, data, 4 * toy.N_BATCHES)
    assert not torch.equal(hidden.weight, before)
    assert any(extra > 0 for _, extra in decisions)  # triggered steps ran extra iterations
    assert [w.shape for w in opt._w_prev] == [p.shape for p in opt._params()]
    x, y = data[0]
    F.cross_entropy(model(x), y).backward()  # outside the closure: still refused
    with pytest.raises(RuntimeError, match="gradients back-propagated outside the closure"):
        opt.step(toy.make_closure(model, x, y, opt.zero_grad))


def test_add_param_group_inside_a_triggered_step_extends_the_snapshot():
    """Closure-free form: a group added between observe() and the extra iterations gets w_{t−1}
    (its current weights) and, with inner_solver="momentum", a velocity of its own."""
    data = toy.batches()
    model = toy.mlp()
    hidden, head = model[1], model[3]
    opt = ISGD(head.parameters(), **SGD_KW, **ISGD_KW, inner_solver="momentum")
    for t in range(20 * toy.N_BATCHES):
        x, y = data[t % len(data)]
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        n_extra = opt.observe(loss)
        opt.base_optimizer.step()
        if n_extra:
            break
    else:
        raise AssertionError("no step triggered")
    opt.solver.buffers()  # the momentum solver's buffer exists before the group joins
    opt.add_param_group({"params": hidden.parameters()})
    assert torch.equal(opt._w_prev[-2], hidden.weight) and len(opt.solver.v) == 2
    model.zero_grad()
    loss_i = F.cross_entropy(model(x), y)
    loss_i.backward()
    assert opt.above_limit(loss_i)
    opt.subproblem_grad_()
    opt.subproblem_step_()
    assert opt.stats.last.extra_iters == 1


def test_integral_numbers_are_integers():
    np = pytest.importorskip("numpy")
    opt = ISGD(_params(), lr=0.1, window=np.int64(4), max_extra_iters=np.int32(2))
    assert (opt.window, opt.max_extra_iters) == (4, 2) and type(opt.window) is int
    opt.load_state_dict(opt.state_dict())


# ------------------------------------------------------------------ the stop check without backward
def test_a_closure_may_skip_backward_at_the_stop_check_and_the_weights_are_the_same():
    """well_trained() in an extra iteration is the stop rule: a closure that returns without
    backward() when it says True trains to the same bits, and that pass counts as a forward."""
    data = toy.batches()
    model_a, model_b = toy.mlp(), toy.mlp()
    opt_a = ISGD(model_a.parameters(), **SGD_KW, **ISGD_KW)
    opt_b = ISGD(model_b.parameters(), **SGD_KW, **ISGD_KW)
    backwards = 0

    def lazy_closure(x, y):
        def closure():
            nonlocal backwards
            opt_b.zero_grad()
            loss = F.cross_entropy(model_b(x), y)
            if opt_b.well_trained(loss):
                return loss
            loss.backward()
            backwards += 1
            return loss

        return closure

    for t in range(10 * toy.N_BATCHES):
        x, y = data[t % len(data)]
        opt_a.step(toy.make_closure(model_a, x, y, opt_a.zero_grad))
        opt_b.step(lazy_closure(x, y))
        assert opt_b.stats.last == opt_a.stats.last, t
    assert params_equal(model_a, model_b)
    a, b = opt_a.stats, opt_b.stats
    assert (b.passes, b.triggers, b.extra_iters) == (a.passes, a.triggers, a.extra_iters)
    assert a.forward_passes == 0 and b.forward_passes >= 1
    assert b.backward_passes == backwards == a.passes - b.forward_passes


def test_well_trained_is_false_on_the_regular_pass():
    opt = ISGD(_params(), lr=0.1, window=2)
    for loss in (1.0, 2.0):
        opt.chart.update(loss)
    assert opt.well_trained(torch.tensor(0.0)) is False  # every batch updates the weights


# ------------------------------------------------------------------ the state_dict's layout
def test_state_dict_has_torch_layout_with_the_hyper_parameters_in_the_groups():
    opt = ISGD(_params(), torch.optim.Adam, lr=1e-3, window=4, sigma_factor=2.0, eps=0.5)
    state = opt.state_dict()
    assert set(state) == {"state", "param_groups", "isgd"} and set(state["isgd"]) == {
        "chart",
        "stats",
    }
    group = state["param_groups"][0]
    assert (group["sigma_factor"], group["isgd_eps"], group["eps"]) == (2.0, 0.5, 1e-8)
    assert opt.defaults["sigma_factor"] == 2.0 and opt.eps == 0.5


def test_a_scheduler_style_change_of_sigma_factor_moves_the_limit():
    opt = ISGD(_params(), lr=0.1, window=2, sigma_factor=3.0)
    for loss in (1.0, 2.0):
        opt.chart.update(loss)
    for group in opt.param_groups:
        group["sigma_factor"] = 1.0
    opt.observe(torch.tensor(1.5))
    assert opt.stats.last.limit == pytest.approx(1.5 + 1.0 * 0.5)


def _pre_0_2_state(opt: ISGD, **saved) -> dict:
    """``opt``'s state in isgd < 0.2's layout (the checkpoints of format 1 hold it)."""
    return {
        "base": copy.deepcopy(opt.base_optimizer.state_dict()),
        "chart": opt.chart.state_dict(),
        "stats": opt.stats.state_dict(),
        "isgd": {"window": opt.window, **saved},
    }


def test_load_state_dict_reads_the_layout_before_0_2():
    data = toy.batches()
    model = toy.mlp()
    opt = ISGD(model.parameters(), **SGD_KW, **{**ISGD_KW, "sigma_factor": 0.5})
    run(model, opt, data, 3 * toy.N_BATCHES)
    assert opt.stats.triggers > 0
    old = _pre_0_2_state(opt, sigma_factor=0.5, max_extra_iters=3, eps=0.2, lower_quantile=0.0)
    fresh = ISGD(toy.mlp().parameters(), **SGD_KW, **ISGD_KW)
    fresh.load_state_dict(old)
    assert fresh.stats == opt.stats and fresh.chart.losses() == opt.chart.losses()
    assert (fresh.max_extra_iters, fresh.eps, fresh.sigma_factor) == (3, 0.2, 0.5)
    saved, loaded = old["base"]["state"], fresh.state_dict()["state"]
    assert all(
        torch.equal(saved[i]["momentum_buffer"], loaded[i]["momentum_buffer"]) for i in saved
    )
    # a file that lacks a hyper-parameter keeps this optimizer's, as isgd < 0.2 read it
    fresh = ISGD(toy.mlp().parameters(), **SGD_KW, **{**ISGD_KW, "max_extra_iters": 2})
    fresh.load_state_dict(_pre_0_2_state(opt))
    assert fresh.max_extra_iters == 2
    with pytest.raises(ValueError, match=r"lower_quantile=0.3, the forward-only variant"):
        fresh.load_state_dict(_pre_0_2_state(opt, lower_quantile=0.3))
    variant = ForwardOnlyISGD(toy.mlp().parameters(), lower_quantile=0.1, **SGD_KW, **ISGD_KW)
    variant.load_state_dict(_pre_0_2_state(opt, lower_quantile=0.3))
    assert variant.lower_quantile == 0.3
    other = ISGD(toy.mlp().parameters(), lr=0.1, window=4)
    with pytest.raises(ValueError, match=r"Invalid window: 12 .*") as info:
        other.load_state_dict(old)
    assert "\n" not in str(info.value) and other.stats.steps == 0  # nothing changed


def test_groups_disagreeing_on_an_isgd_hyper_parameter_are_refused():
    model = toy.mlp()
    with pytest.raises(ValueError, match=r"Invalid param_groups\[1\]: sigma_factor=2.0"):
        ISGD(
            [
                {"params": model[1].parameters()},
                {"params": model[3].parameters(), "sigma_factor": 2.0},
            ],
            lr=0.1,
            window=4,
        )


def test_loss_closure_takes_the_decisions_of_the_hand_written_closure():
    """``isgd.loss_closure`` is torch's closure contract: the same run, bit for bit, as the
    closure written by hand (``toy.make_closure``), extra iterations included."""
    import isgd

    runs = []
    for by_hand in (True, False):
        model = toy.mlp()
        opt = ISGD(model.parameters(), **SGD_KW, **ISGD_KW)
        for x, y in toy.batches() * 10:
            if by_hand:
                closure = toy.make_closure(model, x, y, opt.zero_grad)
            else:
                closure = isgd.loss_closure(opt, lambda: F.cross_entropy(model(x), y))
            opt.step(closure)
        runs.append(
            (opt.stats.triggers, opt.stats.extra_iters, list(model.parameters()), opt.stats)
        )
    (triggers, extra, weights, by_hand), (triggers_2, extra_2, weights_2, built) = runs
    assert triggers > 0 and extra > 0 and (triggers, extra) == (triggers_2, extra_2)
    assert all(torch.equal(a, b) for a, b in zip(weights, weights_2))
    # ... with a backward pass less on each stop check (ψ′ ≤ limit: its gradient unused)
    assert built.forward_passes > 0 == by_hand.forward_passes
    assert built.backward_passes == by_hand.backward_passes - built.forward_passes


def test_loss_closure_refuses_a_loss_that_is_not_a_function():
    import isgd

    model = toy.mlp()
    opt = ISGD(model.parameters(), lr=0.1, window=4)
    x, y = toy.batches()[0]
    with pytest.raises(TypeError, match="loss must be a function of no arguments"):
        isgd.loss_closure(opt, F.cross_entropy(model(x), y))
    with pytest.raises(TypeError, match=r"the optimizer first, not function"):
        isgd.loss_closure(lambda: F.cross_entropy(model(x), y), opt)  # type: ignore[arg-type]
    for wrong, got in (
        (lambda: F.cross_entropy(model(x), y, reduction="none"), "shape (16,)"),
        (lambda: F.cross_entropy(model(x), y).item(), "float"),
        (lambda: F.cross_entropy(model(x), y).detach(), "shape () without grad"),
    ):
        with pytest.raises(
            TypeError, match=rf"a scalar tensor with a graph .*, not {re.escape(got)}$"
        ):
            opt.step(isgd.loss_closure(opt, wrong))


def test_loss_closure_with_a_grad_scaler_is_the_hand_written_scaled_closure():
    """``loss_closure(..., grad_scaler=s)`` back-propagates ``s.scale(ψ)``: the run of
    ``toy.scaled_closure``; built without the scaler, ISGD refuses it (gradients would be
    unscaled by a scale they never had)."""
    import isgd

    runs = []
    for by_hand in (True, False):
        model = toy.mlp()
        opt = ISGD(model.parameters(), **SGD_KW, **ISGD_KW)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10**6)
        for x, y in toy.batches() * 10:
            if by_hand:
                closure = toy.scaled_closure(model, opt, x, y, scaler)
            else:
                loss = lambda: F.cross_entropy(model(x), y)  # noqa: E731
                closure = isgd.loss_closure(opt, loss, grad_scaler=scaler)
            opt.step(closure, grad_scaler=scaler)
            scaler.update()
        runs.append((opt.stats.triggers, opt.stats.extra_iters, list(model.parameters())))
    (triggers, extra, weights), (triggers_2, extra_2, weights_2) = runs
    assert triggers > 0 and extra > 0 and (triggers, extra) == (triggers_2, extra_2)
    assert all(torch.equal(a, b) for a, b in zip(weights, weights_2))
    x, y = toy.batches()[0]
    unscaled = isgd.loss_closure(opt, lambda: F.cross_entropy(model(x), y))
    with pytest.raises(ValueError, match=r"isgd.loss_closure\(opt, loss, grad_scaler=scaler\)"):
        opt.step(unscaled, grad_scaler=scaler)


def test_a_forward_only_judgement_in_the_closure_takes_the_step_s_weight(monkeypatch):
    """``step(closure, weight=w)``: the variant's forward-only judgement inside the closure
    (``well_trained``, as ``loss_closure`` asks it) reduces ψ with ``w``, as ``observe`` would."""
    import isgd
    from isgd.collective import LossSync

    weights = []
    judge = LossSync.__call__

    def recording(self, loss, weight=None, found_inf=None):
        weights.append(weight)
        return judge(self, loss, weight, found_inf)

    monkeypatch.setattr(LossSync, "__call__", recording)
    model = toy.mlp()
    opt = ForwardOnlyISGD(model.parameters(), **SGD_KW, **ISGD_KW, lower_quantile=0.3)
    for x, y in toy.batches() * 2:
        opt.step(isgd.loss_closure(opt, lambda: F.cross_entropy(model(x), y)), weight=7.0)
    assert weights and set(weights) == {7.0}
