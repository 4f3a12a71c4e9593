"""Property-based tests (hypothesis) of the control chart's statistics and the FCPR sampler."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isgd import FixedCycleBatchSampler, LossControlChart

SETTINGS = settings(max_examples=75, deadline=None)

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
loss = st.one_of(finite, finite, finite, st.sampled_from([math.nan, math.inf, -math.inf]))


def expected(window_losses: list[float], k: float) -> tuple[float, float, float]:
    a = np.asarray(window_losses, dtype=np.float64)
    mean, sigma = float(a.mean()), float(a.std())  # population sigma, as the chart
    return mean, sigma, mean + k * sigma


@SETTINGS
@given(
    losses=st.lists(loss, max_size=120),
    window=st.integers(2, 20),
    k=st.floats(0.1, 5.0),
)
def test_chart_matches_numpy_on_the_last_window_of_finite_losses(losses, window, k):
    chart = LossControlChart(window, k)
    kept: list[float] = []
    refused = 0
    for x in losses:
        assert chart.update(x) is math.isfinite(x)
        if math.isfinite(x):
            kept.append(x)
        else:
            refused += 1
        last = kept[-window:]
        assert chart.losses() == last and chart.nonfinite == refused  # NaN/inf never enter
        if not last:
            assert chart.mean is None and chart.sigma is None and chart.limit is None
            continue
        mean, sigma, limit = expected(last, k)
        # O(1) running sums around a shift: error grows with the window's magnitude, not its
        # spread; sqrt turns a variance error of ~window·eps·scale² into ~1e-7·scale for sigma
        scale = max(1.0, max(abs(v) for v in kept[-2 * window :]))
        assert math.isclose(chart.mean, mean, rel_tol=1e-9, abs_tol=1e-9 * scale)
        assert math.isclose(chart.sigma, sigma, rel_tol=1e-6, abs_tol=1e-6 * scale)
        if len(last) < window:
            assert chart.limit is None and not chart.full
        else:
            assert chart.full
            assert math.isclose(chart.limit, limit, rel_tol=1e-6, abs_tol=(1e-9 + k * 1e-6) * scale)
            assert chart.statistics() == (chart.mean, chart.sigma, chart.limit)


@pytest.mark.numerics
@SETTINGS
@given(
    head=st.lists(loss, max_size=60),
    tail=st.lists(loss, max_size=60),
    window=st.integers(2, 12),
    k=st.floats(0.1, 5.0),
)
def test_chart_state_dict_round_trip_continues_identically(head, tail, window, k):
    chart = LossControlChart(window, k)
    for x in head:
        chart.update(x)
    state = copy.deepcopy(chart.state_dict())
    restored = LossControlChart(window, 1.0)  # sigma_factor comes from the state
    restored.load_state_dict(state)
    for x in tail:
        assert chart.update(x) == restored.update(x)
        assert chart.statistics() == restored.statistics()  # bit for bit
    assert chart.state_dict() == restored.state_dict()


@st.composite
def sampler_args(draw):
    drop_last = draw(st.booleans())
    batch_size = draw(st.integers(1, 40))
    n = draw(st.integers(batch_size if drop_last else 1, 300))
    return n, batch_size, draw(st.integers(0, 2**31 - 1)), drop_last, draw(st.booleans())


@SETTINGS
@given(args=sampler_args(), epochs=st.integers(1, 3))
def test_sampler_batches_partition_the_data_set(args, epochs):
    n, batch_size, seed, drop_last, reshuffle = args
    sampler = FixedCycleBatchSampler(
        n, batch_size, seed=seed, drop_last=drop_last, reshuffle=reshuffle
    )
    first = list(sampler)
    n_b = n // batch_size if drop_last else -(-n // batch_size)
    assert len(sampler) == len(first) == n_b
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        flat = [i for batch in batches for i in batch]
        assert len(flat) == len(set(flat))  # no sample twice in an epoch
        assert all(0 <= i < n for i in flat)
        assert len(flat) == (n_b * batch_size if drop_last else n)  # drops < batch_size only
        assert all(len(b) == batch_size for b in batches[:-1])
        assert 1 <= len(batches[-1]) <= batch_size
        if not reshuffle:
            assert batches == first  # the fixed cycle: same batches, same order, every epoch
        again = FixedCycleBatchSampler(
            n, batch_size, seed=seed, drop_last=drop_last, reshuffle=reshuffle
        )
        again.set_epoch(epoch)
        assert list(again) == batches  # reproducible from (seed, epoch) alone
        for batch_id in (0, n_b - 1):
            assert sampler.batch(batch_id, epoch) == batches[batch_id]
        if drop_last:
            assert sampler.epoch_batches(epoch).tolist() == batches
