"""Models: shapes on natural inputs, Caffe parameter counts and fillers, forward + backward."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from isgd.models import MODELS, CharGPT, CifarQuick, LeNet, build_model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


NATURAL = [  # name, channels, classes, size, parameters (None: not pinned)
    ("lenet", 1, 10, 28, 431_080),  # Caffe's lenet_train_test.prototxt
    ("lenet-bn", 1, 10, 28, 431_080 - 70 + 140),  # conv biases dropped, BN weight + bias added
    ("cifar10-quick", 3, 10, 32, 145_578),  # Caffe's cifar10_quick_train_test.prototxt
    ("mlp", 1, 10, 28, 784 * 512 + 512 + 512 * 256 + 256 + 256 * 10 + 10),
    ("resnet20", 3, 10, 32, 269_722),  # He et al. 2016: 0.27M
    ("resnet20", 1, 10, 28, None),
]


@pytest.mark.parametrize(("name", "channels", "classes", "size", "params"), NATURAL)
def test_forward_backward_and_param_count(
    name: str, channels: int, classes: int, size: int, params: int | None
) -> None:
    torch.manual_seed(0)
    model = build_model(name, channels, classes, size)
    x = torch.randn(4, channels, size, size)
    out = model(x)
    assert out.shape == (4, classes)
    torch.nn.functional.cross_entropy(out, torch.arange(4) % classes).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    if params is not None:
        assert n_params(model) == params


def test_alexnet_shape_and_torchvision_param_count() -> None:
    model = build_model("alexnet", 3, 1000, 224).eval()
    assert n_params(model) == 61_100_840  # torchvision.models.alexnet()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 224, 224)).shape == (2, 1000)


def test_caffe_feature_map_sizes() -> None:
    assert LeNet().features(torch.zeros(1, 1, 28, 28)).shape == (1, 50, 4, 4)
    quick = CifarQuick()
    sizes = []
    x = torch.zeros(1, 3, 32, 32)
    for layer in quick.features:
        x = layer(x)
        if isinstance(layer, nn.MaxPool2d | nn.AvgPool2d):
            sizes.append(x.shape[-1])
    assert sizes == [16, 8, 4]  # Caffe's ceil-mode pooling; floor mode would give 15, 7, 3


def test_caffe_fillers() -> None:
    torch.manual_seed(0)
    lenet = LeNet()
    for layer, fan_in in zip(
        [m for m in lenet.modules() if isinstance(m, nn.Conv2d | nn.Linear)],
        (25, 500, 800, 500),
        strict=True,
    ):
        bound, largest = math.sqrt(3.0 / fan_in), float(layer.weight.detach().abs().max())
        assert 0.95 * bound < largest <= bound  # uniform up to the bound
        assert not layer.bias.any()
    quick = CifarQuick()
    layers = [m for m in quick.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    for layer, std in zip(layers, (1e-4, 0.01, 0.01, 0.1, 0.1), strict=True):
        assert float(layer.weight.detach().std()) == pytest.approx(std, rel=0.1)
        assert not layer.bias.any()


def test_models_adapt_to_data() -> None:
    assert build_model("lenet", 3, 100, 32)(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    assert build_model("cifar10-quick", 1, 10, 28)(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    mlp = build_model("mlp", 1, 10, 8, hidden=(7,))
    assert [m.out_features for m in mlp.modules() if isinstance(m, nn.Linear)] == [7, 10]
    assert n_params(build_model("resnet20", 3, 10, 32, depth=32)) > 269_722
    bn = build_model("lenet-bn", 1, 10, 28)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules()) == 2


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"Unknown model: 'vgg' \(known: " + ", ".join(MODELS)):
        build_model("vgg", 3, 10, 32)
    with pytest.raises(ValueError, match="lenet needs image_size >= 13, got 12"):
        build_model("lenet", 1, 10, 12)
    with pytest.raises(ValueError, match="alexnet needs image_size >= 63, got 62"):
        build_model("alexnet", 3, 10, 62)
    with pytest.raises(ValueError, match="Invalid num_classes value: 0"):
        build_model("lenet", 1, 0, 28)
    with pytest.raises(ValueError, match="Invalid ResNet depth: 21"):
        build_model("resnet20", 3, 10, 32, depth=21)


# -------------------------------------------------------------------------- CharGPT
def test_char_gpt_sizes_and_weight_tying() -> None:
    model = CharGPT()  # the charlm-shakespeare preset's: 5 layers of width 128, 4 heads
    assert n_params(model) == 1_024_384  # ≈ 1M; the tied head counts once
    assert model.head.weight is model.tokens.weight
    assert n_params(CharGPT(128, 16, layers=1, width=32, heads=2)) < 20_000  # the tests' size
    with torch.no_grad():
        out = model(torch.randint(0, 128, (2, 128)))
    assert out.shape == (2, 128, 128)
    kl = -out.log_softmax(-1).mean(-1) - math.log(128)  # KL(uniform || model) per position
    assert 0 <= float(kl.max()) < 0.05  # N(0, 0.02) weights: close to uniform at the start


def test_char_gpt_is_causal() -> None:
    torch.manual_seed(0)
    model = CharGPT(128, 32, layers=2, width=32, heads=4)
    for p in model.parameters():  # away from the small init, so that a leak would show
        p.data.normal_(0, 0.3)
    x = torch.randint(0, 128, (3, 32))
    changed = x.clone()
    changed[:, 20] = (x[:, 20] + 1) % 128
    a, b = model(x), model(changed)
    assert torch.allclose(a[:, :20], b[:, :20], rtol=0, atol=1e-6)  # earlier outputs: as they were
    assert not torch.allclose(a[:, 20:], b[:, 20:], atol=1e-3)  # that token and later ones move
    a.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_char_gpt_refuses_bad_sizes_and_long_sequences() -> None:
    with pytest.raises(ValueError, match="width a multiple of heads"):
        CharGPT(width=30, heads=4)
    with pytest.raises(ValueError, match="a sequence of 17 tokens is longer than its context"):
        CharGPT(128, 16, layers=1, width=8, heads=2)(torch.zeros(1, 17, dtype=torch.long))
