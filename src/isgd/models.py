"""The paper's networks, built by name: ``build_model("lenet", in_channels, num_classes, size)``.

``lenet`` and ``cifar10-quick`` follow Caffe's prototxts layer by layer, including Caffe's
ceil-mode pooling and its weight fillers, so that step counts and learning rates from the paper's
Caffe solvers carry over. The others are the usual PyTorch layouts. :class:`CharGPT`, the
character-level language model of the ``charlm-shakespeare`` workload
(:mod:`isgd.training.workloads`), takes token sequences, not images, and is built directly.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MLP",
    "MODELS",
    "AlexNet",
    "CharGPT",
    "CifarQuick",
    "CifarResNet",
    "LeNet",
    "build_model",
    "caffe_xavier_",
]


def _pool_out(size: int, kernel: int, stride: int, padding: int = 0) -> int:
    """Output size of a Caffe (ceil-mode) pooling or, with ``kernel == stride == 1``, a conv."""
    out = math.ceil((size + 2 * padding - kernel) / stride) + 1
    if padding and (out - 1) * stride >= size + padding:  # the last window must start inside
        out -= 1
    return out


def _conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _check_size(model: str, size: int, minimum: int) -> None:
    if size < minimum:
        raise ValueError(f"{model} needs image_size >= {minimum}, got {size}")


def caffe_xavier_(weight: Tensor) -> Tensor:
    """Caffe's ``xavier`` filler (``variance_norm: FAN_IN``): U(-a, a), a = sqrt(3 / fan_in)."""
    bound = math.sqrt(3.0 / weight[0].numel())
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


class LeNet(nn.Module):
    """Caffe's MNIST LeNet: conv 20@5×5 → max-pool 2 → conv 50@5×5 → max-pool 2 → fc 500 → ReLU
    → fc. No ReLU after the convolutions, as in Caffe. 431,080 parameters at 1×28×28, 10 classes.

    Weights use Caffe's xavier filler, biases 0. ``batch_norm=True`` (``lenet-bn``) adds a
    BatchNorm after each convolution and drops those convolutions' biases, which BN's shift
    makes redundant.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        *,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        _check_size("lenet", image_size, 13)
        side = _pool_out(_pool_out(image_size - 4, 2, 2) - 4, 2, 2)
        bn = batch_norm
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 20, 5, bias=not bn),
            *([nn.BatchNorm2d(20)] if bn else []),
            nn.MaxPool2d(2, 2, ceil_mode=True),
            nn.Conv2d(20, 50, 5, bias=not bn),
            *([nn.BatchNorm2d(50)] if bn else []),
            nn.MaxPool2d(2, 2, ceil_mode=True),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(50 * side * side, 500),
            nn.ReLU(inplace=True),
            nn.Linear(500, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                caffe_xavier_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class CifarQuick(nn.Module):
    """Caffe's ``cifar10_quick``: conv 32@5×5 p2 → max-pool 3/2 → ReLU → conv 32@5×5 p2 → ReLU →
    avg-pool 3/2 → conv 64@5×5 p2 → ReLU → avg-pool 3/2 → fc 64 → fc. Pooling in Caffe's ceil
    mode (32 → 16 → 8 → 4); 145,578 parameters at 3×32×32, 10 classes.

    Caffe's fillers: gaussian std 1e-4 (conv1), 0.01 (conv2, conv3), 0.1 (both fc); biases 0.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> None:
        super().__init__()
        _check_size("cifar10-quick", image_size, 3)
        side = image_size
        for _ in range(3):
            side = _pool_out(side, 3, 2)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5, padding=2),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(32, 64, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(3, 2, ceil_mode=True),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * side * side, 64), nn.Linear(64, num_classes)
        )
        layers = [m for m in self.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
        for m, std in zip(layers, (1e-4, 0.01, 0.01, 0.1, 0.1), strict=True):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """Flatten → ``hidden`` fully connected ReLU layers → classes (PyTorch's default init)."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        *,
        hidden: Sequence[int] = (512, 256),
    ) -> None:
        super().__init__()
        if any(int(h) < 1 for h in hidden):
            raise ValueError(f"Invalid hidden widths: {tuple(hidden)}")
        widths = [in_channels * image_size * image_size, *(int(h) for h in hidden)]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in itertools.pairwise(widths):
            layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(widths[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class _BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers; option-A shortcut (stride-2 subsampling, zero-padded channels)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride, self.extra = stride, planes - in_planes

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.extra:
            half = self.extra // 2
            shortcut = F.pad(shortcut, (0, 0, 0, 0, half, self.extra - half))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """He et al. (2016) CIFAR ResNet, depth 6n+2 (``resnet20``: n = 3): conv 16 → 3 stages of n
    basic blocks (16, 32, 64 channels, stride 2 between stages) → global average pool → fc.

    Shortcuts are option A (parameter-free), as in the paper's CIFAR experiments: 269,722
    parameters for ResNet-20 with 10 classes. Global pooling makes any input size ≥ 8 work
    (1×28×28 MNIST included). Convolutions use He (fan-out) init, BN weight 1 and bias 0.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
        *,
        depth: int = 20,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"Invalid ResNet depth: {depth} (must be 6n + 2, e.g. 20, 32, 56)")
        _check_size("resnet", image_size, 8)
        n = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(True)
        )
        blocks: list[nn.Module] = []
        in_planes = 16
        for stage, planes in enumerate((16, 32, 64)):
            for i in range(n):
                blocks.append(_BasicBlock(in_planes, planes, 2 if stage and i == 0 else 1))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


class AlexNet(nn.Module):
    """AlexNet in torchvision's single-tower layout (64-192-384-256-256 convs, adaptive 6×6
    average pool, two dropout fc 4096 layers); 61,100,840 parameters at 1000 classes.
    Meant for 224×224 input; PyTorch's default init."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 1000,
        image_size: int = 224,
        *,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        side = _conv_out(image_size, 11, 4, 2)
        side = _conv_out(_conv_out(_conv_out(side, 3, 2), 3, 2), 3, 2)  # three 3/2 max-pools
        if side < 1:
            raise ValueError(f"alexnet needs image_size >= 63, got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 11, 4, 2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class _CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = (
            z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
            for z in self.qkv(x).split(c, dim=2)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = _CausalSelfAttention(width, heads)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    """A nanoGPT-style decoder over characters: token + learned position embeddings, ``layers``
    pre-LayerNorm blocks of causal self-attention (``heads`` heads) and a 4× GELU MLP, a final
    LayerNorm and a head tied to the token embedding. Input ``B×T`` token ids (``T <=
    context``), output ``B×T×vocab`` next-token logits. No dropout: a training step is a
    deterministic function of the batch, as ISGD's repeated passes over a batch assume.

    nanoGPT's initialisation: weights N(0, 0.02), the residual projections N(0, 0.02/√(2L)),
    biases 0. The defaults (vocabulary 128: the ASCII codes; context 128; 5 layers of width
    128, 4 heads) have 1,024,384 parameters.
    """

    def __init__(
        self,
        vocab: int = 128,
        context: int = 128,
        *,
        layers: int = 5,
        width: int = 128,
        heads: int = 4,
    ) -> None:
        super().__init__()
        if min(vocab, context, layers, width, heads) < 1 or width % heads:
            raise ValueError(
                f"Invalid CharGPT size: vocab {vocab}, context {context}, layers {layers}, "
                f"width {width}, heads {heads} (all >= 1, width a multiple of heads)"
            )
        self.context = context
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(_Block(width, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tokens.weight  # weight tying
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                residual = name.endswith(("attn.proj.weight", "mlp.2.weight"))
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * layers) if residual else 0.02)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"CharGPT: a sequence of {t} tokens is longer than its context")
        x = self.tokens(idx) + self.positions(torch.arange(t, device=idx.device))
        return self.head(self.ln(self.blocks(x)))


def _lenet_bn(in_channels: int, num_classes: int, image_size: int, **kwargs: Any) -> LeNet:
    return LeNet(in_channels, num_classes, image_size, batch_norm=True, **kwargs)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet": LeNet,
    "lenet-bn": _lenet_bn,
    "cifar10-quick": CifarQuick,
    "mlp": MLP,
    "resnet20": CifarResNet,
    "alexnet": AlexNet,
}


def build_model(
    name: str, in_channels: int, num_classes: int, image_size: int, **kwargs: Any
) -> nn.Module:
    """Build model ``name`` for ``in_channels``×``image_size``² inputs and ``num_classes``.

    Extra keyword arguments go to the model (``hidden`` for ``mlp``, ``depth`` for
    ``resnet20``, ``dropout`` for ``alexnet``).

    Example:
        >>> model = build_model("lenet", 1, 10, 28)
        >>> sum(p.numel() for p in model.parameters())
        431080
    """
    if name not in MODELS:
        raise ValueError(f"Unknown model: {name!r} (known: {', '.join(MODELS)})")
    for arg, value in (
        ("in_channels", in_channels),
        ("num_classes", num_classes),
        ("image_size", image_size),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"Invalid {arg} value: {value!r}")
    return MODELS[name](in_channels, num_classes, image_size, **kwargs)
