from __future__ import annotations

import math

import pytest

from isgd.training.config import (
    PRESETS,
    ConfigError,
    TrainConfig,
    dump_toml,
    load_toml,
    lr_factor,
    resolve_config,
)


def test_lenet_mnist_preset_is_the_caffe_solver():
    c = resolve_config("lenet-mnist")
    assert (c.dataset, c.model, c.batch_size, c.lr, c.momentum, c.weight_decay) == (
        "mnist",
        "lenet",
        64,
        0.01,
        0.9,
        5e-4,
    )
    assert (c.lr_policy, c.gamma, c.power, c.iters, c.normalize) == (
        "inv",
        1e-4,
        0.75,
        10_000,
        "scale",
    )
    assert c.preset == "lenet-mnist"


def test_cifar10_quick_preset_has_two_learning_rate_stages():
    c = resolve_config("cifar10-quick")
    assert c.iters == 5000 and c.batch_size == 100 and c.weight_decay == 0.004
    assert lr_factor(c, 3999, c.iters) == 1.0
    assert lr_factor(c, 4000, c.iters) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "policy, extra, t, expected",
    [
        ("fixed", {}, 12345, 1.0),
        ("inv", dict(gamma=1e-4, power=0.75), 10_000, 2.0**-0.75),
        ("step", dict(gamma=0.1, step_size=100), 250, 0.01),
        ("multistep", dict(gamma=0.5, milestones=[10, 20]), 15, 0.5),
        ("multistep", dict(gamma=0.5, milestones=[10, 20]), 20, 0.25),
        ("cosine", {}, 500, 0.5),
        ("cosine", {}, 1000, 0.0),
    ],
)
def test_lr_policies(policy, extra, t, expected):
    c = resolve_config(overrides=dict(lr_policy=policy, **extra))
    # Python floats (float64) in lr_factor, no torch kernel: float64 tolerance
    assert lr_factor(c, t, 1000) == pytest.approx(expected, abs=1e-12)


def test_precedence_preset_then_file_then_command_line(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("lr = 0.5\niters = 7\n")
    c = resolve_config("lenet-mnist", f, {"iters": 9})
    assert (c.lr, c.iters, c.batch_size) == (0.5, 9, 64)


def test_toml_round_trip(tmp_path):
    c = resolve_config("cifar10-quick", overrides={"optimizer": "isgd-adam", "eps": 0.0})
    f = tmp_path / "c.toml"
    f.write_text(dump_toml(c))
    assert resolve_config(config_file=f) == c
    assert set(load_toml(f)) == set(TrainConfig().to_dict())


@pytest.mark.parametrize(
    "values, message",
    [
        ({"learning_rate": 0.1}, "unknown config key in test: learning_rate"),
        ({"iters": "10"}, "invalid iters: '10' (expected int)"),
        ({"iters": 1.5}, "invalid iters: 1.5 (expected int)"),
        ({"augment": 1}, "invalid augment: 1 (expected bool)"),
        ({"lr": True}, "invalid lr: True (expected float)"),
        ({"milestones": [1, "2"]}, "invalid milestones: '2' (expected int)"),
        ({"milestones": 3}, "invalid milestones: 3 (expected a list of int)"),
    ],
)
def test_unknown_keys_and_wrong_types_are_named(values, message):
    from isgd.training.config import apply

    with pytest.raises(ConfigError) as info:
        apply(TrainConfig(), values, "test")
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"lr": -0.1}, "invalid lr: -0.1"),
        ({"lr": math.inf}, "invalid lr: inf"),
        ({"momentum": 1.0}, "invalid momentum: 1.0 (must be < 1)"),
        ({"batch_size": 0}, "invalid batch_size: 0"),
        ({"sigma_factor": 0.0}, "invalid sigma_factor: 0.0"),
        ({"max_extra_iters": -1}, "invalid max_extra_iters: -1"),
        ({"optimizer": "rmsprop"}, "invalid optimizer: 'rmsprop'"),
        ({"lr_policy": "poly"}, "invalid lr_policy: 'poly'"),
        ({"lr_policy": "multistep"}, "invalid milestones: []"),
        ({"milestones": [20, 10], "lr_policy": "multistep"}, "invalid milestones: [20, 10]"),
        ({"target": -1.0}, "invalid target: -1.0"),
        ({"target": math.nan}, "invalid target: nan"),
    ],
)
def test_out_of_range_values(overrides, message):
    with pytest.raises(ConfigError) as info:
        resolve_config(overrides=overrides)
    assert str(info.value).startswith(message)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown preset: 'x'"):
        resolve_config("x")
    assert set(PRESETS) == {
        "lenet-mnist",
        "cifar10-quick",
        "alexnet-imagenet",
        "charlm-shakespeare",
    }


def test_a_preset_named_in_the_file_is_applied_beneath_it(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('preset = "cifar10-quick"\nlr = 0.002\n')
    config = resolve_config(config_file=path)
    assert (config.preset, config.model, config.dataset) == (
        "cifar10-quick",
        "cifar10-quick",
        "cifar10",
    )
    assert config.lr == 0.002 and config.milestones == [4000]


def test_iters_on_the_command_line_replaces_epochs_from_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("epochs = 2.0\n")
    assert resolve_config(config_file=path).epochs == 2.0
    config = resolve_config(config_file=path, overrides={"iters": 20})
    assert (config.iters, config.epochs) == (20, 0.0)


@pytest.mark.parametrize(
    "keys, full_end",
    [
        (dict(lr_policy="inv", gamma=1e-4, power=0.75), (1 + 1e-4 * 9999) ** -0.75),
        (dict(lr_policy="step", gamma=0.1, step_size=4000), 0.01),
        (dict(lr_policy="multistep", gamma=0.1, milestones=[5000, 7500]), 0.01),
        (dict(lr_policy="cosine"), 0.5 * (1 + math.cos(math.pi * 9999 / 10_000))),
    ],
)
def test_a_budget_compresses_the_schedule_and_decays_it_fully(keys, full_end):
    """A quarter budget runs 2,500 of 10,000 iterations and ends as decayed as the full run: the
    policy read at t / 0.25 (cosine: over the compressed length), not the full run cut short."""
    full = resolve_config(overrides=dict(iters=10_000, **keys))
    quarter = resolve_config(overrides=dict(iters=10_000, budget=0.25, **keys))
    # lr_factor is Python floats (float64), no torch kernel: float64 tolerances hold on any CPU
    assert lr_factor(full, 9999, 10_000) == pytest.approx(full_end, rel=1e-12)
    if keys["lr_policy"] == "cosine":  # over its own 2,500 iterations
        assert lr_factor(quarter, 2499, 2500) == pytest.approx(
            0.5 * (1 + math.cos(math.pi * 2499 / 2500)), rel=1e-12
        )
    else:
        assert lr_factor(quarter, 2499, 2500) == pytest.approx(
            lr_factor(full, 9996, 10_000), rel=1e-12
        )
    # the drops come at a quarter of their iterations: step 4000 -> 1000, milestone 5000 -> 1250
    if keys["lr_policy"] == "step":
        assert [lr_factor(quarter, t, 2500) for t in (999, 1000, 1999, 2000)] == pytest.approx(
            [1.0, 0.1, 0.1, 0.01]
        )
    if keys["lr_policy"] == "multistep":
        assert [lr_factor(quarter, t, 2500) for t in (1249, 1250, 1874, 1875)] == pytest.approx(
            [1.0, 0.1, 0.1, 0.01]
        )
    if keys["lr_policy"] == "inv":  # at t' = 1000 the factor of the full run at 4000
        assert lr_factor(quarter, 1000, 2500) == pytest.approx(
            (1 + 1e-4 * 4000) ** -0.75, rel=1e-12
        )


def test_the_full_budget_leaves_the_schedule_as_it_was():
    config = resolve_config("lenet-mnist")
    assert config.budget == 1.0
    for t in (0, 1, 777, 9999):  # the same float, not an approximation of it
        assert lr_factor(config, t, 10_000) == (1.0 + 1e-4 * t) ** -0.75
    for wrong in (0.0, 101.0, math.inf):
        with pytest.raises(ConfigError, match=r"invalid budget: .* \(a fraction > 0 of the"):
            resolve_config(overrides={"budget": wrong})
    # above 1 the schedule is stretched: the full run's decay, at 1.5 times the iterations
    longer = resolve_config("lenet-mnist", overrides={"budget": 1.5})
    assert lr_factor(longer, 14_997, 15_000) == pytest.approx(lr_factor(config, 9_998, 10_000))
