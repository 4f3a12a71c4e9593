"""Harder data (long tail, label noise), the class-weighted remedy, and the forward-only variant
of ISGD (``lower_quantile``): exact seeded constructions, steps that change nothing, counters."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.nn import functional as F

from isgd import ISGD, ForwardOnlyISGD
from isgd.data import DataSplit
from isgd.data.variants import (
    class_weights,
    flip_labels,
    long_tail_counts,
    long_tail_indices,
    make_variant,
)
from isgd.training.config import ConfigError, TrainConfig
from isgd.training.train import Evaluation, Trainer
from tests import toy


def split(n_per_class=(30, 25, 40, 35), n_test=8, seed=0, size=8) -> DataSplit:
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])
    y = y[torch.randperm(len(y), generator=g)]
    k = len(n_per_class)
    x = torch.randint(0, 256, (len(y), 1, size, size), generator=g, dtype=torch.uint8)
    x_test = torch.randint(0, 256, (n_test * k, 1, size, size), generator=g, dtype=torch.uint8)
    y_test = torch.arange(k).repeat(n_test)
    return DataSplit("toy", x, y, x_test, y_test, k)


# ------------------------------------------------------------------ long tail
def test_long_tail_counts_follow_the_exponential_profile():
    # CIFAR-10-LT with ratio 100 (Cao et al. 2019): 5000, 2997, 1796, ..., 50
    counts = long_tail_counts([5000] * 10, 100)
    assert counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert long_tail_counts([6, 9, 7], 1) == [6, 6, 6]  # n_max is the smallest class
    with pytest.raises(ValueError, match="imbalance"):
        long_tail_counts([5, 5], 0.5)


def test_long_tail_keeps_exact_seeded_counts_and_leaves_the_test_set_alone():
    data = split()
    lt = make_variant(data, imbalance=10, label_noise=0.0, seed=3)
    want = long_tail_counts([30, 25, 40, 35], 10)
    assert want == [25, 11, 5, 2]
    assert torch.bincount(lt.y_train, minlength=4).tolist() == want
    assert torch.equal(lt.x_test, data.x_test) and torch.equal(lt.y_test, data.y_test)
    # the kept samples are training samples with their own labels
    keep = long_tail_indices(data.y_train, 4, 10, seed=3)
    assert torch.equal(lt.x_train, data.x_train[keep])
    assert torch.equal(lt.y_train, data.y_train[keep])
    # seeded: the same seed keeps the same samples, another seed others
    assert torch.equal(keep, long_tail_indices(data.y_train, 4, 10, seed=3))
    assert not torch.equal(keep, long_tail_indices(data.y_train, 4, 10, seed=4))
    assert "LT ρ=10" in lt.variant
    assert make_variant(data, imbalance=1, label_noise=0, seed=0) is data


# ------------------------------------------------------------------ label noise
@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5])
def test_label_noise_flips_exactly_the_fraction_to_other_classes(fraction):
    labels = torch.arange(10).repeat(100)  # 1000 labels
    noisy = flip_labels(labels, 10, fraction, seed=7)
    changed = noisy != labels
    assert int(changed.sum()) == round(fraction * 1000)  # exact, never a flip onto itself
    assert noisy.min() >= 0 and noisy.max() < 10
    assert torch.equal(noisy, flip_labels(labels, 10, fraction, seed=7))
    if fraction:
        assert not torch.equal(noisy, flip_labels(labels, 10, fraction, seed=8))
        # uniform over the other classes: every shift 1..9 occurs
        shifts = ((noisy - labels) % 10)[changed]
        assert set(shifts.tolist()) == set(range(1, 10))


def test_noise_after_long_tail_keeps_the_test_set_and_the_images():
    data = split()
    both = make_variant(data, imbalance=5, label_noise=0.25, seed=1)
    lt = make_variant(data, imbalance=5, label_noise=0.0, seed=1)
    assert torch.equal(both.x_train, lt.x_train)
    assert int((both.y_train != lt.y_train).sum()) == round(0.25 * len(lt.y_train))
    assert torch.equal(both.y_test, data.y_test)
    assert "25 % noisy labels" in both.variant


def test_balanced_class_weights_average_one_over_the_samples():
    labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    w = class_weights(labels, 4)  # class 3 has no sample
    assert w.tolist() == pytest.approx([10 / 18, 10 / 9, 10 / 3, 0.0])
    assert float(w[labels].mean()) == pytest.approx(1.0)


def test_balanced_accuracy_is_the_mean_recall():
    correct, count = torch.tensor([9, 1, 0]), torch.tensor([10, 2, 0])  # class 2 not in the test
    sums = torch.cat([torch.tensor([12.0, 3.0, 10.0]), correct, count]).double()
    result = Evaluation.from_sums(sums, num_classes=3)
    assert result.metric == result.accuracy
    assert result.accuracy == pytest.approx(10 / 12)
    assert result.balanced_accuracy == pytest.approx((0.9 + 0.5) / 2)
    assert result.loss == pytest.approx(3.0 / 12)


def test_config_refuses_bad_values():
    for key, value in [
        ("imbalance", 0.5),
        ("imbalance", math.inf),
        ("label_noise", 1.0),
        ("label_noise", -0.1),
        ("class_weights", "inverse"),
        ("lower_quantile", 1.0),
    ]:
        with pytest.raises(ConfigError, match=key):
            TrainConfig(**{key: value}).validate()
    with pytest.raises(ConfigError, match="needs an isgd optimizer"):
        TrainConfig(optimizer="sgd", lower_quantile=0.2).validate()


# ------------------------------------------------------------------ the forward-only variant
def _state(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.base_optimizer.state_dict())


def _same(a, b) -> bool:
    (ma, oa), (mb, ob) = a, b
    same_model = all(torch.equal(ma[k], mb[k]) for k in ma)
    sa, sb = oa["state"], ob["state"]
    same_opt = sa.keys() == sb.keys() and all(
        torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i] if torch.is_tensor(sa[i][k])
    )
    return same_model and same_opt


@pytest.mark.parametrize("form", ["closure", "closure-free"])
def test_forward_only_steps_change_nothing_and_are_counted(form):
    data = toy.batches()
    model = toy.small_cnn(batchnorm=True)
    opt = ForwardOnlyISGD(
        model.parameters(), lr=0.05, momentum=0.9, window=toy.N_BATCHES, lower_quantile=0.5
    )
    seen = {True: 0, False: 0}
    for t in range(6 * toy.N_BATCHES):
        x, y = data[t % len(data)]
        norm_before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        skip = opt.well_trained(loss)
        before = _state(model, opt)
        if form == "closure":
            calls = []

            def closure(loss=loss, x=x, y=y):
                if not calls:  # the regular pass, already computed above
                    calls.append(1)
                    if not skip:
                        loss.backward()
                    return loss
                opt.zero_grad()
                again = F.cross_entropy(model(x), y)
                again.backward()
                return again

            opt.step(closure)
        else:
            opt.observe(loss)
            if not skip:
                loss.backward()
            opt.step()
            # (extra iterations of triggered steps are not run here: not the point)
        record = opt.stats.last
        assert record.forward_only == skip
        seen[skip] += 1
        if skip:
            assert record.lower_limit is not None and record.loss < record.lower_limit
            assert not record.triggered and record.extra_iters == 0
            assert _same(before, _state(model, opt)), f"step {t} changed weights or state"
            assert all(p.grad is None for p in model.parameters())  # no backward ran
            # BatchNorm statistics: the forward moved them; the loop restores them (the
            # trainer does); the optimizer itself must not have touched them further
            for k, v in norm_before.items():
                model.state_dict()[k].copy_(v)
        else:
            assert not _same(before, _state(model, opt)), f"step {t} should have updated"
    assert seen[True] >= 5 and seen[False] >= toy.N_BATCHES
    assert opt.stats.forward_only == seen[True]
    assert opt.stats.passes - opt.stats.forward_only == opt.stats.backward_passes
    # a checkpoint carries the counter and the option
    other = ForwardOnlyISGD(
        toy.small_cnn(batchnorm=True).parameters(),
        lr=0.05,
        window=toy.N_BATCHES,
        lower_quantile=0.1,
    )
    other.load_state_dict(opt.state_dict())
    assert other.lower_quantile == 0.5 and other.stats.forward_only == seen[True]


def test_well_trained_is_false_without_the_variant_and_before_the_window_fills():
    model = toy.small_cnn()
    off = ISGD(model.parameters(), lr=0.1, window=2)
    assert off.well_trained(torch.tensor(-1.0)) is False
    on = ForwardOnlyISGD(model.parameters(), lr=0.1, window=2, lower_quantile=0.5)
    on.chart.update(1.0)
    assert on.well_trained(torch.tensor(-1.0)) is False  # window not full: no lower limit
    on.chart.update(2.0)
    assert on.well_trained(torch.tensor(0.5)) is True
    assert on.well_trained(torch.tensor(1.0)) is False  # strictly below the quantile (1.0)
    with pytest.raises(ValueError, match="lower_quantile"):
        ForwardOnlyISGD(model.parameters(), lr=0.1, window=2, lower_quantile=1.0)
    with pytest.raises(TypeError, match="ForwardOnlyISGD"):  # not the paper's method: not ISGD's
        ISGD(model.parameters(), lr=0.1, window=2, lower_quantile=0.5)


def toy_config(**changes) -> TrainConfig:
    """A run on :func:`split` data (passed in; the data set's name is only recorded)."""
    keys = dict(dataset="mnist", optimizer="isgd", batch_size=16, threads=1, tensorboard=False)
    return TrainConfig(**{**keys, **changes}).validate()


def test_trainer_forward_only_steps_leave_weights_state_and_batchnorm_as_they_were(tmp_path):
    data = split(n_per_class=(40, 40, 40, 40), seed=2, size=16)
    config = toy_config(model="lenet-bn", lr=0.05, lower_quantile=0.5, channels_last=False)
    trainer = Trainer(config, tmp_path / "run", data=data)
    model, opt = trainer.model, trainer.optimizer
    assert isinstance(opt, ISGD)
    forward_only = 0
    for t in range(4 * trainer.n_b):
        _, _, x, y = trainer.batch(t)
        before = _state(model, opt)
        trainer.step(x, y)
        if opt.stats.last.forward_only:
            forward_only += 1
            assert _same(before, _state(model, opt)), f"step {t} changed something"
            assert all(p.grad is None for p in model.parameters())
    assert forward_only >= 3 and opt.stats.forward_only == forward_only
    trainer.restore_threads()


def test_trainer_records_forward_only_steps_and_backward_passes(tmp_path):
    from isgd.training import runio
    from isgd.training.lifecycle import train

    data = split(n_per_class=(40, 40, 40, 40), seed=2, size=16)
    config = toy_config(
        lr=0.01,
        lower_quantile=0.3,
        imbalance=2.0,
        label_noise=0.1,
        class_weights="balanced",
        iters=50,
        eval_every=25,
    )
    summary = train(config, tmp_path / "run", data=data, progress=False)
    steps = list(runio.read_jsonl(tmp_path / "run" / "steps.jsonl"))
    flagged = sum(bool(s.get("forward_only")) for s in steps)
    assert flagged == summary["isgd/forward_only"] > 0
    assert summary["backward_passes"] == summary["passes"] - flagged
    metrics = list(runio.read_jsonl(tmp_path / "run" / "metrics.jsonl"))
    assert metrics[-1]["backward_passes"] == summary["backward_passes"]
    assert 0 <= summary["final/test_balanced_accuracy"] <= 1
    provenance = runio.read_json(tmp_path / "run" / "provenance.json")
    assert "LT ρ=2" in provenance["data"] and "10 % noisy labels" in provenance["data"]
