from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from isgd import FixedCycleBatchSampler


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
