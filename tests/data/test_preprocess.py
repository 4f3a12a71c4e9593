"""Preprocess: the normalisation modes, seeded augmentation, input checks, speed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from isgd.data import DataSplit, load_idx_dir
from isgd.data.preprocess import Preprocess
from tests.fixtures import mnist_like, write_idx_dir


# ------------------------------------------------------------------------------- preprocessing
@pytest.fixture
def split(tmp_path: Path) -> DataSplit:
    write_idx_dir(tmp_path, mnist_like(n_train=64, size=12))
    return load_idx_dir(tmp_path)


def test_scale_mode_is_caffe_lenet(split: DataSplit) -> None:
    out = Preprocess("scale")(split.x_train)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, split.x_train.float() * 0.00390625, rtol=0, atol=0)
    assert (
        float(Preprocess("scale")(torch.full((1, 1, 2, 2), 255, dtype=torch.uint8)).max())
        == 255 / 256
    )


def test_standardize_and_mean_subtract(split: DataSplit) -> None:
    out = Preprocess.for_data(split, "standardize")(split.x_train)
    assert float(out.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(out.std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)
    out = Preprocess.for_data(split, "mean_subtract")(split.x_train)
    assert float(out.mean(0).abs().max()) < 1e-3  # every pixel centred, in pixel units
    assert float(out.abs().max()) > 50


def test_augmentation_is_deterministic_per_seed(split: DataSplit) -> None:
    make = lambda seed: Preprocess.for_data(split, crop_padding=3, flip=True, seed=seed)  # noqa: E731
    a, b, c = make(1), make(1), make(2)
    x = split.x_train
    out_a = a(x, train=True)
    assert out_a.shape == x.shape
    torch.testing.assert_close(out_a, b(x, train=True), rtol=0, atol=0)
    assert not torch.equal(out_a, c(x, train=True))
    state = a.state_dict()
    first = a(x, train=True)
    a.load_state_dict(state)
    torch.testing.assert_close(a(x, train=True), first, rtol=0, atol=0)
    torch.testing.assert_close(a(x), make(5)(x), rtol=0, atol=0)  # no augmentation at eval


def test_random_crop_is_a_shifted_window(split: DataSplit) -> None:
    pad = 2
    x = split.x_train[:32] | 1  # no zero pixels, so padding is visible
    out = Preprocess("scale", crop_padding=pad, seed=0).augment(x)
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    offsets = set()
    for i in range(len(x)):
        hits = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + 12, dx : dx + 12])
        ]
        assert hits, f"image {i} is not a window of its padded image"
        offsets.add(hits[0])
    assert len(offsets) > 5  # offsets differ between images


def test_flip_flips_about_half(split: DataSplit) -> None:
    x = split.x_train
    out = Preprocess("scale", flip=True, seed=3).augment(x)
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x, strict=True)]
    kept = [torch.equal(o, i) for o, i in zip(out, x, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 16 < sum(flipped) < 48


def test_channels_last_and_input_checks(split: DataSplit) -> None:
    out = Preprocess.for_data(split, channels_last=True)(split.x_train[:4])
    assert out.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="expected a uint8 N×C×H×W batch"):
        Preprocess("scale")(split.x_train.float())
    with pytest.raises(ValueError, match="Invalid preprocess mode: 'whiten'"):
        Preprocess("whiten")
    with pytest.raises(ValueError, match="Invalid crop_padding value: -1"):
        Preprocess("scale", crop_padding=-1)
    with pytest.raises(ValueError, match="standardize needs per-channel mean and std"):
        Preprocess("standardize")
    with pytest.raises(ValueError, match="standardize statistics have 3 channels, the batch has 1"):
        Preprocess("standardize", mean=(0.5,) * 3, std=(0.2,) * 3)(split.x_train)
