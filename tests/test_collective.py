"""LossSync: the values of the one all-reduce, checked against hand-computed ones.

Two forked gloo processes on CPU exchange a handful of scalars (no model, no data): a fraction
of a second. Agreement between ranks alone would not do: a sum instead of the weighted mean,
a dropped weight or an ignored inf flag are the same on every rank too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from isgd import ISGD
from isgd.collective import LossSync
from tests.fixtures import join_gloo, leave_rank, run_two_ranks

LOSSES = (1.0, 5.0)  # rank 0, rank 1


def _calls(rank: int) -> dict[str, tuple]:
    """Every case: this rank's arguments to ``LossSync()(loss, weight, found_inf)``."""
    loss = LOSSES[rank]
    return {
        # weighted mean (3·1 + 1·5) / (3 + 1) = 2; a sum gives 8, unweighted losses 1.5 or 3
        "uneven weights": (loss, (3.0, 1.0)[rank], None),
        "uneven weights, tensor loss": (torch.tensor(loss), (3, 1)[rank], None),
        # (1·1 + 4·5) / (1 + 4) = 4.2
        "weights 1 and 4": (loss, (1.0, 4.0)[rank], None),
        # no weight: every rank weighs 1, the plain mean (1 + 5) / 2 = 3
        "no weight": (loss, None, None),
        "no weight, tensor loss": (torch.tensor([loss]), None, None),
        # GradScaler's found_inf on one rank only: every rank skips
        "inf on rank 1 only": (loss, None, torch.tensor((0.0, 1.0)[rank])),
        "inf on rank 0 only, none passed on rank 1": (
            loss,
            None,
            torch.tensor([1.0]) if rank == 0 else None,
        ),
        "no inf anywhere": (loss, None, torch.tensor(0.0)),
    }


EXPECTED = {
    "uneven weights": (2.0, False),
    "uneven weights, tensor loss": (2.0, False),
    "weights 1 and 4": (4.2, False),
    "no weight": (3.0, False),
    "no weight, tensor loss": (3.0, False),
    "inf on rank 1 only": (3.0, True),
    "inf on rank 0 only, none passed on rank 1": (3.0, True),
    "no inf anywhere": (3.0, False),
}


def _worker(rank: int, world: int, init: str, out: str) -> None:
    join_gloo(rank, world, init, timeout=30)
    try:
        results = {}
        for sync_loss in (None, True):  # None: on because the group has 2 processes
            sync = LossSync(enabled=sync_loss)
            assert sync.active()
            for case, (loss, weight, found_inf) in _calls(rank).items():
                psi, any_inf = sync(loss, weight, found_inf)
                results[f"{case} (sync_loss={sync_loss})"] = [psi, any_inf]
        # sync_loss=False: the local loss and the local flag, no collective
        results["local"] = list(LossSync(enabled=False)(LOSSES[rank], 3.0, torch.tensor(0.0)))
        results |= _carried(rank)
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    leave_rank()


def _carried(rank: int) -> dict[str, list]:
    """Values carried in the loss message: summed across ranks, the loss judged as without."""
    out: dict[str, list] = {}
    sync = LossSync()
    sync.carry([float(rank == 0), 0.0, 2.5 * (rank + 1)])  # rank 0 votes SIGINT
    out["carry: psi"] = [sync(LOSSES[rank], (3.0, 1.0)[rank])[0]]
    out["carry: sums"] = list(sync.carried or [])
    sync(LOSSES[rank])  # the next call carries nothing (a 3-value message) and keeps the sums
    out["carry: sums after a plain call"] = list(sync.carried or [])
    local = LossSync(enabled=False)
    local.carry([1, 2])
    local(LOSSES[rank])
    out["carry: local"] = list(local.carried or [])
    # through ISGD.step: the regular pass's all-reduce carries them (no collective of their own)
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    opt = ISGD(model.parameters(), lr=0.1, window=2, sync_loss=True)
    x = torch.full((4, 2), float(rank + 1))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    opt.sync.carry([0.0, float(rank == 1)])  # rank 1 votes SIGTERM
    opt.step(closure)
    out["carry: step"] = opt.sync.carried or []
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return run_two_ranks(_worker, tmp_path_factory.mktemp("loss-sync"), timeout=60)


@pytest.mark.parametrize("sync_loss", [None, True])
@pytest.mark.parametrize("case", list(EXPECTED))
def test_every_rank_gets_the_weighted_mean_and_the_or_of_the_inf_flags(two_ranks, case, sync_loss):
    key = f"{case} (sync_loss={sync_loss})"
    expected_psi, expected_inf = EXPECTED[case]
    for rank, results in enumerate(two_ranks):
        psi, any_inf = results[key]
        # LossSync's message is float64 and the inputs are exact binary fractions: float64
        # arithmetic, the same on every kernel family
        assert psi == pytest.approx(expected_psi, rel=1e-12), (rank, key)
        assert any_inf is expected_inf, (rank, key)


def test_sync_loss_false_judges_the_local_loss(two_ranks):
    assert [results["local"] for results in two_ranks] == [[1.0, False], [5.0, False]]


def test_carried_values_ride_the_loss_message_summed_across_ranks(two_ranks):
    for results in two_ranks:
        # float64 (LossSync's message): the tolerance of float64 arithmetic, as above
        assert results["carry: psi"] == [pytest.approx(2.0, rel=1e-12)]  # as without them
        assert results["carry: sums"] == [1.0, 0.0, 7.5]  # 2.5 + 5.0
        assert results["carry: sums after a plain call"] == [1.0, 0.0, 7.5]
        assert results["carry: step"] == [0.0, 1.0]
    assert [results["carry: local"] for results in two_ranks] == [[1.0, 2.0], [1.0, 2.0]]
