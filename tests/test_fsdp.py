"""ISGD under sharded training: FSDP2 (``fully_shard``, DTensor parameters), FSDP1
(``FullyShardedDataParallel``, ``use_orig_params=True``) and ``torch.distributed.checkpoint``.

One process: ISGD's state through the DCP helpers and ``dcp.save``/``dcp.load`` (plain and
flattened), the bare step with which DCP initialises an optimizer's state, the refusals. Two forked
gloo ranks on CPU (slow, a few seconds) run the same ISGD training under DDP, FSDP2 and FSDP1 (each
rank its own slice of every global batch) and a DCP save → load → continue; the tests compare the
runs' decisions, the whole weights and :math:`n_w`. The conservative weight ε is large here (20) so
that the term ε/n_w·(w − w_{t−1}) moves the weights beyond the tolerance: a local :math:`n_w`
(half the model's on each rank) would fail the weight comparisons, not only the :math:`n_w` one.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.nn import functional as F

from isgd import ISGD, amp
from isgd.collective import local
from tests import toy
from tests.fixtures import join_gloo, leave_rank, run_two_ranks

SGD_KW = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
ISGD_KW = dict(window=toy.N_BATCHES, sigma_factor=0.5, max_extra_iters=4, eps=20.0)
STEPS = 5 * toy.N_BATCHES
SAVE_AT = 3 * toy.N_BATCHES  # the DCP checkpoint: after some triggers, before others
N_W = 64 * 16 + 16 + 16 * 10 + 10  # toy.mlp's weights


# ------------------------------------------------------------------ one process
def _trained(seed: int = 0, steps: int = 3 * toy.N_BATCHES) -> tuple[torch.nn.Module, ISGD]:
    model = toy.mlp(seed)
    opt = ISGD(model.parameters(), **SGD_KW, **{**ISGD_KW, "eps": 0.1})
    data = toy.batches()
    for t in range(steps):
        x, y = data[t % len(data)]
        opt.step(toy.make_closure(model, x, y, opt.zero_grad))
    return model, opt


def test_the_state_dict_has_torchs_shape_and_carries_isgds_state_in_the_first_group():
    _, opt = _trained()
    assert opt.stats.triggers > 0 and opt.state is opt.base_optimizer.state
    state = opt.state_dict()
    assert state["param_groups"][0]["isgd_state"] is state["isgd"]  # one object, two places
    assert opt.param_groups[0]["isgd_state"] is None  # the live slot (flattened DCP keeps it)
    kept = {"state": state["state"], "param_groups": state["param_groups"]}  # what DCP keeps
    fresh = ISGD(toy.mlp(1).parameters(), **SGD_KW, **ISGD_KW)
    fresh.load_state_dict(copy.deepcopy(kept))
    assert fresh.stats == opt.stats and fresh.chart.losses() == opt.chart.losses()
    assert fresh.param_groups[0]["isgd_state"] is None
    model = toy.mlp()
    osd = get_optimizer_state_dict(model, ISGD(model.parameters(), **SGD_KW, **ISGD_KW))
    assert osd["param_groups"][0]["isgd_state"]["stats"]["steps"] == 0  # no KeyError: 'state'


@pytest.mark.numerics
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
@pytest.mark.parametrize("flatten", [False, True])
def test_dcp_save_and_load_resume_the_run_bit_for_bit(tmp_path, flatten):
    """One process (no process group): get_state_dict → dcp.save → a fresh model and ISGD →
    dcp.load → set_state_dict → more steps, against the uninterrupted run."""
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    model, opt = _trained(steps=2 * toy.N_BATCHES)
    model_sd, optim_sd = get_state_dict(model, opt, options=options)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path))
    fresh_model = toy.mlp(1)
    fresh = ISGD(fresh_model.parameters(), **SGD_KW, **ISGD_KW)
    model_sd, optim_sd = get_state_dict(fresh_model, fresh, options=options)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(tmp_path))
    set_state_dict(fresh_model, fresh, model_state_dict=state["model"],
                   optim_state_dict=state["optim"], options=options)  # fmt: skip
    data = toy.batches()
    for t in range(2 * toy.N_BATCHES, 4 * toy.N_BATCHES):
        x, y = data[t % len(data)]
        opt.step(toy.make_closure(model, x, y, opt.zero_grad))
        fresh.step(toy.make_closure(fresh_model, x, y, fresh.zero_grad))
        assert fresh.stats == opt.stats  # the chart came back: the same decisions, step by step
    assert opt.stats.triggers > 0 and opt.stats.extra_iters > 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh_model.parameters()))


def test_dcps_state_initialisation_is_the_only_bare_step_without_observe():
    """DCP's ``_init_optim_state``: zero gradients, every lr 0, a bare step(): the base's
    state is made, nothing else changes. Any other bare step without observe() is refused."""
    model = toy.mlp()
    opt = ISGD(model.parameters(), **SGD_KW, **ISGD_KW)
    weights = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(TypeError, match=r"^Invalid closure: None"):
        opt.step()  # lr 0.05
    for group in opt.param_groups:
        group["lr"] = 0.0
    opt.step()
    assert all("momentum_buffer" in opt.state[p] for p in model.parameters())  # made
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert opt.stats.steps == 0 and opt.chart.count == 0
    next(model.parameters()).grad[0, 0] = 1.0  # a gradient: a forgotten closure, not DCP
    with pytest.raises(TypeError, match=r"^Invalid closure: None"):
        opt.step()


def test_shard_group_without_fsdp1_parameters_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^Invalid shard_group: .*: drop it$"):
        ISGD(toy.mlp().parameters(), **SGD_KW, **ISGD_KW, shard_group=object())


# ------------------------------------------------------------------ the ranks' runs
def _wrap(kind: str, model: torch.nn.Module) -> torch.nn.Module:
    if kind == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    if kind == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))


def _optimizer(kind: str, model: torch.nn.Module) -> ISGD:
    shard_group = model.process_group if kind == "fsdp1" else None
    return ISGD(model.parameters(), **SGD_KW, **ISGD_KW, diagnostics=True, shard_group=shard_group)


def _train(model, opt, data, steps: range) -> list[list]:
    """The steps' decisions: [triggered, extra_iters, ψ, last ψ′, limit, momentum ratio]."""
    records = []
    for t in steps:
        x, y = data[t % len(data)]
        opt.step(toy.make_closure(model, x, y, opt.zero_grad))
        last = opt.stats.last
        records.append(
            [last.triggered, last.extra_iters, last.loss, last.loss_after, last.limit,
             last.momentum_ratio]
        )  # fmt: skip
    return records


def _whole_weights(kind: str, model: torch.nn.Module) -> list[float]:
    if kind == "fsdp2":
        parts = [p.full_tensor() for p in model.parameters()]
    elif kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model):
            parts = [p.detach().clone() for p in model.parameters()]
    else:
        parts = [p.detach() for p in model.parameters()]
    return torch.cat([p.flatten() for p in parts]).tolist()


def _run(kind: str, rank: int, checkpoint: Path | None = None, **options) -> dict:
    """``STEPS`` steps under ``kind``; with ``checkpoint``, a DCP save at ``SAVE_AT`` and the
    rest of the run on a fresh model and optimizer loaded from it."""
    data = toy.batches(seed=10 + rank)  # this rank's slice of every global batch
    model = _wrap(kind, toy.mlp())
    opt = _optimizer(kind, model)
    n_w = opt.n_w
    if checkpoint is None:
        records = _train(model, opt, data, range(STEPS))
    else:
        records = _train(model, opt, data, range(SAVE_AT))
        model_sd, optim_sd = get_state_dict(model, opt, options=StateDictOptions(**options))
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(checkpoint))
        model = _wrap(kind, toy.mlp(seed=1))  # other weights: the load must replace them
        opt = _optimizer(kind, model)
        model_sd, optim_sd = get_state_dict(model, opt, options=StateDictOptions(**options))
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(checkpoint))
        set_state_dict(
            model,
            opt,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=StateDictOptions(**options),
        )
        records += _train(model, opt, data, range(SAVE_AT, STEPS))
    return {
        "records": records,
        "weights": _whole_weights(kind, model),
        "n_w": n_w,
        "stats": opt.stats.state_dict(),
    }


def _refusal(rank: int) -> str:
    """FSDP1's parameters without shard_group: the one-line message."""
    model = _wrap("fsdp1", toy.mlp())
    try:
        ISGD(model.parameters(), **SGD_KW, **ISGD_KW)
    except ValueError as err:
        return str(err)
    return "not refused"


def _outside_grads(kind: str, rank: int) -> str:
    """A backward outside the closure, then step(closure): refused on every rank alike (the
    whole gradients are judged, not this rank's shard, which may be all zero)."""
    model = _wrap(kind, toy.mlp())
    opt = _optimizer(kind, model)
    x, y = toy.batches(seed=10 + rank)[0]
    closure = toy.make_closure(model, x, y, opt.zero_grad)
    opt.step(closure)
    F.cross_entropy(model(x), y).backward()  # a micro-batch back-propagated outside step()
    try:
        opt.step(closure)
    except RuntimeError as err:
        return str(err)
    return "not refused"


# ------------------------------------------------------------------ with a GradScaler
SCALE = 2.0**12  # a power of two: scaling and unscaling change no number
POISON_REGULAR = 2 * toy.N_BATCHES + 2  # the step whose regular pass rank 1 poisons


def _scaler(kind: str) -> torch.amp.GradScaler:
    """isgd's scaler, or FSDP1's own ``ShardedGradScaler`` (it ORs its found-inf flag over the
    group itself); no growth, so that the scale changes only by back-off."""
    if kind == "sharded":
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler("cpu", init_scale=SCALE, growth_interval=10**6)
    return amp.GradScaler("cpu", init_scale=SCALE, growth_interval=10**6)


def _scaled_closure(model, opt, x, y, scaler, t: int, rank: int, replay: list[int]):
    """Back-propagates ``scaler.scale(loss)``. Rank 1 alone puts an inf into its part of a
    gradient, after backward (after the reduce-scatter: rank 0's shards stay finite): in the
    regular pass of step ``POISON_REGULAR``, and in the second extra pass of the first later
    step that runs one (its step goes into ``replay``, on every rank: the decisions are alike)."""

    def poison(calls: int) -> bool:
        regular = t == POISON_REGULAR and calls == 1
        second_extra = t > POISON_REGULAR and calls == 3 and not replay
        if second_extra:
            replay.append(t)
        return (regular or second_extra) and rank == 1

    def first_local_grad(model):
        return next(local(p.grad) for p in model.parameters() if local(p.grad).numel())

    return toy.scaled_closure(model, opt, x, y, scaler, poison, first_local_grad)


def _run_scaled(kind: str, rank: int, scaler_kind: str = "isgd") -> dict:
    """``STEPS`` steps of ``opt.step(closure, grad_scaler=scaler)`` then ``scaler.update()``
    under ``kind``, with rank 1's infs (:func:`_scaled_closure`)."""
    data = toy.batches(seed=10 + rank)
    model = _wrap(kind, toy.mlp())
    opt = _optimizer(kind, model)
    scaler = _scaler(scaler_kind)
    replay: list[int] = []
    records, scales = [], []
    for t in range(STEPS):
        x, y = data[t % len(data)]
        opt.step(_scaled_closure(model, opt, x, y, scaler, t, rank, replay), grad_scaler=scaler)
        scaler.update()
        last = opt.stats.last
        records.append([last.skipped, last.triggered, last.extra_iters, last.loss,
                        last.loss_after, last.limit])  # fmt: skip
        scales.append(scaler.get_scale())
    return {
        "records": records,
        "scales": scales,
        "replay": replay,
        "weights": _whole_weights(kind, model),
        "stats": opt.stats.state_dict(),
    }


def _worker(rank: int, world: int, init: str, out: str) -> None:
    join_gloo(rank, world, init, timeout=60)
    try:
        results: dict = {}
        for kind in ("ddp", "fsdp2", "fsdp1"):
            started = time.perf_counter()
            results[kind] = _run(kind, rank)
            results[kind]["seconds"] = time.perf_counter() - started
        for kind, scaler_kind in SCALED:
            results[f"{kind} {scaler_kind} scaler"] = _run_scaled(kind, rank, scaler_kind)
        results["fsdp2 dcp"] = _run("fsdp2", rank, Path(out, "ckpt-fsdp2"))
        results["fsdp1 dcp flattened"] = _run(
            "fsdp1", rank, Path(out, "ckpt-fsdp1"), flatten_optimizer_state_dict=True
        )
        results["fsdp1 refusal"] = _refusal(rank)
        for kind in ("fsdp2", "fsdp1"):
            results[f"{kind} outside grads"] = _outside_grads(kind, rank)
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    leave_rank()


SCALED = [("ddp", "isgd"), ("fsdp2", "isgd"), ("fsdp1", "isgd"), ("fsdp1", "sharded")]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_two_ranks(_worker, tmp_path_factory.mktemp("fsdp"), timeout=120)


def _decisions(records: list[list]) -> list[tuple]:
    return [(triggered, extra) for triggered, extra, *_ in records]


def _close(a: list, b: list) -> bool:
    return torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ the tests
@pytest.mark.slow
def test_the_reference_ddp_run_triggers_extra_iterations(ranks):
    stats = ranks[0]["ddp"]["stats"]
    assert stats["triggers"] > 0 and stats["extra_iters"] > 0
    assert ranks[0]["ddp"]["records"] == ranks[1]["ddp"]["records"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fsdp2", "fsdp1"])
def test_sharded_runs_take_ddps_decisions_and_end_with_its_weights(ranks, kind):
    ddp = ranks[0]["ddp"]
    for rank in ranks:
        run = rank[kind]
        assert run["n_w"] == N_W  # the whole model's, not this rank's shard
        assert run["stats"] == ranks[0][kind]["stats"]  # the ranks alike
        assert _decisions(run["records"]) == _decisions(ddp["records"])
        for mine, theirs in zip(run["records"], ddp["records"]):
            # ψ, ψ′, the limit and the momentum ratio (‖μv‖/‖∇φ‖ of the whole model)
            assert _close([x for x in mine[2:] if x is not None],
                          [x for x in theirs[2:] if x is not None])  # fmt: skip
        assert _close(run["weights"], ddp["weights"])


@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.parametrize("kind", ["fsdp2 dcp", "fsdp1 dcp flattened"])
def test_a_distributed_checkpoint_resumes_as_the_uninterrupted_run(ranks, kind):
    uninterrupted = ranks[0][kind.split()[0]]
    for rank in ranks:
        resumed = rank[kind]
        resumed_after = resumed["records"][SAVE_AT:]
        assert sum(triggered for triggered, *_ in resumed_after) > 0  # after the load too
        assert resumed["records"] == uninterrupted["records"]  # ψ, limits: the chart came back
        assert resumed["stats"] == uninterrupted["stats"]
        assert resumed["weights"] == uninterrupted["weights"]


@pytest.mark.slow
def test_fsdp1_without_shard_group_is_refused_in_one_line(ranks):
    message = ranks[0]["fsdp1 refusal"]
    assert message.startswith("ISGD: these parameters are sharded by FullyShardedDataParallel")
    assert "shard_group=fsdp_model.process_group" in message and "\n" not in message


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fsdp2", "fsdp1"])
def test_gradients_accumulated_outside_the_closure_are_refused_on_every_rank(ranks, kind):
    for rank in ranks:
        assert "gradients back-propagated outside the closure" in rank[f"{kind} outside grads"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fsdp2 isgd", "fsdp1 isgd", "fsdp1 sharded"])
def test_sharded_runs_with_a_grad_scaler_take_ddps_decisions_and_back_off_alike(ranks, kind):
    """``opt.step(closure, grad_scaler=scaler)`` under FSDP2 and FSDP1 (isgd's scaler, and
    FSDP1's ShardedGradScaler), with an inf on rank 1 alone in a regular pass and in an extra
    pass: the same steps as DDP with the same scaler — skipped, stopped, the scale backed off
    on both ranks alike — and DDP's weights."""
    ddp = ranks[0]["ddp isgd scaler"]
    skipped = [t for t, (skip, *_) in enumerate(ddp["records"]) if skip]
    (replay,) = ddp["replay"]
    assert skipped == [POISON_REGULAR] and not ddp["records"][POISON_REGULAR][1]
    assert ddp["records"][replay][1:3] == [True, 1]  # the extra pass's inf ended the step
    backed_off = [SCALE / 2] * (replay - POISON_REGULAR) + [SCALE / 4] * (STEPS - replay)
    assert ddp["scales"] == [SCALE] * POISON_REGULAR + backed_off
    assert ddp["stats"]["triggers"] > 1 and ddp["stats"]["extra_iters"] > 1
    for rank in ranks:
        run = rank[f"{kind} scaler"]
        assert run["scales"] == ddp["scales"] and run["replay"] == ddp["replay"]
        assert run["stats"] == ranks[0][f"{kind} scaler"]["stats"]  # the ranks alike
        # skipped, triggered, extra iterations: step by step
        assert [r[:3] for r in run["records"]] == [r[:3] for r in ddp["records"]]
        for mine, theirs in zip(run["records"], ddp["records"]):
            assert _close([x for x in mine[3:] if x is not None],
                          [x for x in theirs[3:] if x is not None])  # fmt: skip
        assert all(math.isfinite(w) for w in run["weights"])
        assert _close(run["weights"], ddp["weights"])
