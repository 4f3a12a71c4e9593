from __future__ import annotations

import math
import random

import numpy as np
import pytest

from isgd import LossControlChart


def exact(losses: list[float], k: float) -> tuple[float, float, float]:
    a = np.asarray(losses, dtype=np.float64)
    mean, sigma = float(a.mean()), float(a.std())  # population sigma (ddof=0)
    return mean, sigma, mean + k * sigma


def test_known_values():
    chart = LossControlChart(window=3)
    for loss in (1.0, 2.0, 3.0):
        chart.update(loss)
    assert chart.mean == pytest.approx(2.0)
    assert chart.sigma == pytest.approx(math.sqrt(2 / 3))
    assert chart.limit == pytest.approx(2.0 + 3 * math.sqrt(2 / 3))


def test_no_limit_and_no_decision_before_the_window_is_full():
    chart = LossControlChart(window=4)
    for i, loss in enumerate((1.0, 1.0, 1.0)):
        chart.update(loss)
        assert chart.limit is None and not chart.full and chart.count == i + 1
        assert not chart.above_limit(1e9)
    chart.update(1.0)
    assert chart.full and chart.limit == 1.0


def test_window_is_fifo_and_the_limit_excludes_the_current_loss():
    chart = LossControlChart(window=3, sigma_factor=2.0)
    for loss in (1.0, 2.0, 3.0):
        chart.update(loss)
    limit_before = chart.limit
    assert chart.above_limit(10.0)  # judged against (1, 2, 3) only
    chart.update(10.0)
    assert chart.losses() == [2.0, 3.0, 10.0]
    assert chart.limit != limit_before
    assert chart.limit == pytest.approx(exact([2.0, 3.0, 10.0], 2.0)[2])


@pytest.mark.parametrize("window", [937, 1000])
def test_running_statistics_match_exact_recomputation_over_a_million_updates(window):
    rng = random.Random(window)
    chart = LossControlChart(window=window)
    losses: list[float] = []
    worst = 0.0
    for t in range(1_000_000):
        # a decaying loss with noise, spikes and a large offset: hard on naive running sums
        loss = 1000.0 + 5.0 * math.exp(-t / 2e5) + rng.gauss(0, 0.05) + (rng.random() < 1e-3) * 3
        chart.update(loss)
        losses.append(loss)
        if t % 99_991 == 0 or t == 999_999:
            window_losses = losses[-window:]
            mean, sigma, _ = exact(window_losses, 3.0)
            worst = max(worst, abs(chart.mean - mean), abs(chart.sigma - sigma))
            del losses[:-window]
    assert worst < 1e-9
    assert chart.limit == pytest.approx(chart.mean + 3 * chart.sigma, abs=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_losses_never_enter(bad):
    chart = LossControlChart(window=3)
    for loss in (1.0, 2.0):
        chart.update(loss)
    assert chart.update(bad) is False
    assert chart.losses() == [1.0, 2.0] and chart.nonfinite == 1
    chart.update(3.0)
    assert chart.limit == pytest.approx(exact([1.0, 2.0, 3.0], 3.0)[2])
    assert not chart.above_limit(bad)


def test_sigma_zero():
    chart = LossControlChart(window=5)
    for _ in range(50):
        chart.update(0.7)
    assert chart.sigma == 0.0
    assert chart.limit == pytest.approx(0.7)
    assert not chart.above_limit(chart.limit)
    assert chart.above_limit(chart.limit + 1e-6)


@pytest.mark.numerics
def test_state_dict_round_trip_continues_bit_identically():
    rng = random.Random(0)
    chart = LossControlChart(window=7, sigma_factor=2.5)
    for _ in range(23):
        chart.update(rng.random())
    chart.update(float("nan"))
    clone = LossControlChart(window=7)
    clone.load_state_dict(chart.state_dict())
    for _ in range(40):
        loss = rng.random()
        chart.update(loss)
        clone.update(loss)
        assert (clone.mean, clone.sigma, clone.limit) == (chart.mean, chart.sigma, chart.limit)
    assert clone.state_dict() == chart.state_dict() and clone.nonfinite == 1


def test_load_state_dict_refuses_another_window():
    chart = LossControlChart(window=3)
    with pytest.raises(ValueError, match="window=4, this chart has window=3"):
        chart.load_state_dict(LossControlChart(window=4).state_dict())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(window=1), "Invalid window: 1 (must be an integer >= 2)"),
        (dict(window=0), "Invalid window: 0 (must be an integer >= 2)"),
        (dict(window=3.0), "Invalid window: 3.0 (must be an integer >= 2)"),
        (dict(window=True), "Invalid window: True (must be an integer >= 2)"),
        (dict(window=5, sigma_factor=0), "Invalid sigma_factor: 0 (must be a finite number > 0)"),
        (dict(window=5, sigma_factor=-3), "Invalid sigma_factor: -3 (must be a finite number > 0)"),
        (
            dict(window=5, sigma_factor=float("inf")),
            "Invalid sigma_factor: inf (must be a finite number > 0)",
        ),
        (
            dict(window=5, sigma_factor="3"),
            "Invalid sigma_factor: '3' (must be a finite number > 0)",
        ),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError) as info:
        LossControlChart(**kwargs)
    assert str(info.value) == message


def test_quantile_is_the_nearest_rank_of_a_full_window():
    chart = LossControlChart(window=5)
    for loss in (5.0, 1.0, 4.0, 2.0):
        chart.update(loss)
    assert chart.quantile(0.2) is None  # not full yet
    chart.update(3.0)
    # sorted 1, 2, 3, 4, 5: the ⌈q·5⌉-th smallest
    assert [chart.quantile(q) for q in (0.0, 0.2, 0.21, 0.5, 0.8, 1.0)] == [1, 1, 2, 3, 4, 5]
    chart.update(0.5)  # FIFO: 5.0 leaves
    assert chart.quantile(1.0) == 4.0 and chart.quantile(0.2) == 0.5
    with pytest.raises(ValueError, match="q"):
        chart.quantile(1.5)
