from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from isgd import FixedCycleBatchSampler
from isgd.sampler import DistributedFixedCycleBatchSampler, rank_rows, split_sizes


def test_identical_batches_every_epoch():
    sampler = FixedCycleBatchSampler(1000, batch_size=64, seed=3)
    first = list(sampler)
    for epoch in range(1, 4):
        sampler.set_epoch(epoch)
        assert list(sampler) == first


def test_reproducible_per_seed_and_different_across_seeds():
    a = list(FixedCycleBatchSampler(500, batch_size=50, seed=1))
    b = list(FixedCycleBatchSampler(500, batch_size=50, seed=1))
    c = list(FixedCycleBatchSampler(500, batch_size=50, seed=2))
    assert a == b and a != c


def test_no_repeats_and_length_with_drop_last():
    sampler = FixedCycleBatchSampler(1003, batch_size=10, seed=0)
    batches = list(sampler)
    assert len(sampler) == len(batches) == 100
    flat = [i for batch in batches for i in batch]
    assert len(flat) == len(set(flat)) == 1000 and all(0 <= i < 1003 for i in flat)
    assert all(len(batch) == 10 for batch in batches)


def test_keep_last_partial_batch():
    sampler = FixedCycleBatchSampler(list(range(25)), batch_size=10, drop_last=False)
    batches = list(sampler)
    assert len(sampler) == 3 and [len(b) for b in batches] == [10, 10, 5]
    assert sorted(i for b in batches for i in b) == list(range(25))


def test_batch_ids_and_epoch_tensor_agree_with_iteration():
    sampler = FixedCycleBatchSampler(300, batch_size=32, seed=5)
    batches = list(sampler)
    matrix = sampler.epoch_batches()
    assert matrix.shape == (9, 32) and matrix.dtype == torch.int64
    for batch_id, batch in enumerate(batches):
        assert sampler.batch(batch_id) == batch == matrix[batch_id].tolist()
    with pytest.raises(IndexError, match="Invalid batch_id: 9"):
        sampler.batch(9)


def test_reshuffle_changes_batches_per_epoch_reproducibly():
    sampler = FixedCycleBatchSampler(200, batch_size=20, seed=0, reshuffle=True)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch0 != epoch1
    assert sorted(map(sorted, epoch0)) != sorted(map(sorted, epoch1))  # new batch contents
    sampler.set_epoch(0)
    assert list(sampler) == epoch0
    again = FixedCycleBatchSampler(200, batch_size=20, seed=0, reshuffle=True)
    again.set_epoch(1)
    assert list(again) == epoch1


def test_works_as_a_dataloader_batch_sampler():
    data = TensorDataset(torch.arange(100).float())
    sampler = FixedCycleBatchSampler(data, batch_size=25, seed=0)
    loaded = [x.long().tolist() for (x,) in DataLoader(data, batch_sampler=sampler)]
    assert loaded == list(sampler)


@pytest.mark.parametrize(
    "args, kwargs, error, message",
    [
        ((100, 0), {}, ValueError, "Invalid batch_size: 0 (must be an integer >= 1)"),
        ((100, 2.5), {}, ValueError, "Invalid batch_size: 2.5 (must be an integer >= 1)"),
        (
            (10, 20),
            {},
            ValueError,
            "Invalid batch_size: 20 for a data set of 10 samples (no complete batch with "
            "drop_last=True)",
        ),
        ((100, 10), {"seed": "1"}, TypeError, "Invalid seed: '1' (must be an integer)"),
        ((True, 10), {}, TypeError, "Invalid data_source: True (a data set or its size)"),
    ],
)
def test_bad_arguments(args, kwargs, error, message):
    with pytest.raises(error) as info:
        FixedCycleBatchSampler(*args, **kwargs)
    assert str(info.value) == message


def test_bad_epoch():
    with pytest.raises(ValueError, match=r"^Invalid epoch: -1 \(must be an integer >= 0\)$"):
        FixedCycleBatchSampler(10, 2).set_epoch(-1)


# ---------------------------------------------------------------------- data parallel
def _ranks(world, shares=None, n=100, batch_size=12, **kwargs):
    return [
        DistributedFixedCycleBatchSampler(
            n, batch_size, num_replicas=world, rank=r, shares=shares, **kwargs
        )
        for r in range(world)
    ]


@pytest.mark.parametrize(
    ("world", "shares", "sizes"),
    [
        (1, None, [12]),
        (2, None, [6, 6]),
        (2, [3, 1], [9, 3]),
        (2, [1, 3], [3, 9]),
        (3, [1, 2, 3], [2, 4, 6]),
        (3, [2, 1, 1], [6, 3, 3]),
        (4, None, [3, 3, 3, 3]),
    ],
)
def test_rank_slices_glue_back_into_the_global_batches_in_order(world, shares, sizes):
    whole = FixedCycleBatchSampler(100, 12, seed=3)
    ranks = _ranks(world, shares, seed=3)
    starts = [sum(sizes[:r]) for r in range(world)]
    for r, s in enumerate(ranks):
        assert s.sizes == sizes and s.local_batch_size == sizes[r] and s.batch_size == 12
        assert s.rows == slice(starts[r], starts[r] + sizes[r])
        assert len(s) == len(whole) == 8  # 100 // 12 on every rank, whatever its share
        assert [len(b) for b in s] == [sizes[r]] * 8
        assert s.epoch_batches().shape == (8, sizes[r])
    epochs = [list(s) for s in ranks]
    assert [[i for part in parts for i in part] for parts in zip(*epochs)] == list(whole)
    glued = torch.cat([s.epoch_batches() for s in ranks], dim=1)
    assert torch.equal(glued, whole.epoch_batches())
    for batch_id in (0, 5, 7):
        assert [i for s in ranks for i in s.batch(batch_id)] == whole.batch(batch_id)


def test_rank_rows_are_consecutive_runs_of_the_sizes():
    assert [rank_rows([9, 3], r) for r in (0, 1)] == [slice(0, 9), slice(9, 12)]
    assert [rank_rows([2, 4, 6], r) for r in (0, 1, 2)] == [
        slice(0, 2),
        slice(2, 6),
        slice(6, 12),
    ]
    assert rank_rows([5], 0) == slice(0, 5)


def test_split_sizes_by_largest_remainder_ties_to_the_lower_rank():
    assert split_sizes(16, None, 2) == [8, 8]
    assert split_sizes(16, [3, 1], 2) == [12, 4]
    assert split_sizes(10, None, 3) == [4, 3, 3]  # remainders tie: the lowest rank gets one
    assert split_sizes(5, None, 3) == [2, 2, 1]
    assert split_sizes(10, [1, 1, 2], 3) == [3, 2, 5]  # 2.5, 2.5, 5
    assert split_sizes(7, [2, 1, 1], 3) == [3, 2, 2]  # 3.5, 1.75, 1.75: not the first ranks
    assert split_sizes(7, [1, 1, 2], 3) == [2, 2, 3]  # 1.75, 1.75, 3.5
    for shares in ([0.7, 0.2, 0.1], [1, 1, 1, 1, 5], [3.3, 1.1]):
        assert sum(split_sizes(37, shares, len(shares))) == 37


def test_split_sizes_refuse_a_rank_without_a_sample():
    with pytest.raises(ValueError) as info:
        split_sizes(4, [100, 1], 2)
    assert str(info.value) == (
        "Invalid shares: 100,1 split a global batch of 4 as 4,0, leaving rank 1 without a "
        "sample; use a larger --batch-size or more even shares"
    )
    with pytest.raises(ValueError, match=r" as 3,2,0,0, leaving ranks 2,3 without a sample;"):
        split_sizes(5, [10, 10, 1, 1], 4)  # 2.27, 2.27, 0.23, 0.23
    with pytest.raises(ValueError, match=r"^Invalid shares: 3 shares for 2 processes$"):
        split_sizes(8, [1, 1, 1], 2)
    assert split_sizes(2, None, 2) == [1, 1]


def test_distributed_epochs_follow_set_epoch_with_reshuffle_and_are_fixed_without():
    ranks = _ranks(2, [3, 1], n=40, batch_size=8, seed=1, reshuffle=True)
    whole = FixedCycleBatchSampler(40, 8, seed=1, reshuffle=True)
    epoch0 = list(whole)
    for s in (*ranks, whole):
        s.set_epoch(4)
    epoch4 = list(whole)
    assert epoch4 != epoch0
    assert [a + b for a, b in zip(*ranks)] == epoch4
    # an explicit epoch wins over the current one
    for epoch, batches in ((0, epoch0), (4, epoch4)):
        glued = torch.cat([s.epoch_batches(epoch) for s in ranks], dim=1)
        assert glued.tolist() == batches
        assert [ranks[0].batch(2, epoch) + ranks[1].batch(2, epoch)] == [batches[2]]
    fixed = _ranks(2, [3, 1], n=40, batch_size=8, seed=1)
    first = [list(s) for s in fixed]
    for s in fixed:
        s.set_epoch(4)
    assert [list(s) for s in fixed] == first
    assert [a + b for a, b in zip(*first)] == list(FixedCycleBatchSampler(40, 8, seed=1))


def test_distributed_seed_selects_the_global_permutation():
    for seed in (0, 7):
        ranks = _ranks(2, seed=seed)
        assert [a + b for a, b in zip(*ranks)] == list(FixedCycleBatchSampler(100, 12, seed=seed))
    assert list(_ranks(2, seed=7)[0]) != list(_ranks(2, seed=0)[0])


@pytest.mark.parametrize("rank", [2, -1, True, 1.0])
def test_distributed_bad_rank(rank):
    with pytest.raises(ValueError) as info:
        DistributedFixedCycleBatchSampler(100, 12, num_replicas=2, rank=rank)
    assert str(info.value) == f"Invalid rank: {rank!r} (must be in [0, 2))"


def test_distributed_rank_and_world_come_from_the_process_group(monkeypatch):
    import torch.distributed as dist

    with pytest.raises(RuntimeError, match="needs num_replicas and rank, or an initialised"):
        DistributedFixedCycleBatchSampler(100, 12)
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 3)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 2)
    s = DistributedFixedCycleBatchSampler(100, 12, shares=[1, 2, 3])
    assert (s.num_replicas, s.rank, s.sizes, s.rows) == (3, 2, [2, 4, 6], slice(6, 12))
    assert DistributedFixedCycleBatchSampler(100, 12, rank=0).num_replicas == 3
    assert DistributedFixedCycleBatchSampler(100, 12, num_replicas=4).rank == 2
