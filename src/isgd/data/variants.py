"""Harder versions of a data set, built from it exactly and reproducibly: long-tailed class
imbalance and symmetric label noise. Only the training split changes; the test split is the
data set's own (balanced for every set here), so accuracy on it is the balanced measure.

**Long tail** (``imbalance`` = ρ, the "-LT" construction of Cui et al. 2019 and Cao et al. 2019):
class ``c`` of ``K`` keeps

.. math:: n_c = \\lfloor n_{max} \\cdot \\rho^{-c/(K-1)} \\rfloor,
          \\qquad n_{max} = \\min_c(\\text{samples of class } c)

training samples — class 0 the head (``n_max``), class ``K−1`` the tail (``n_max/ρ``) — drawn
at random without replacement, seeded. ρ = 1 keeps the data as it is.

**Symmetric label noise** (``label_noise`` = η): exactly ``round(η·N)`` training samples, chosen
at random, get a label drawn uniformly from the *other* ``K−1`` classes, seeded. (Some papers draw
from all ``K`` classes, so that about ``η/K`` of the chosen labels stay correct; here the fraction
of wrong labels is η exactly.) Applied after the long tail when both are asked for.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from isgd.data import DataError, DataSplit

__all__ = [
    "class_weights",
    "flip_labels",
    "long_tail_counts",
    "long_tail_indices",
    "make_variant",
    "variant_name",
]

# seeds of the two constructions are offset from the run's seed so that they never share a
# random stream with the initialisation or the batch order of the same seed
_LT_STREAM, _NOISE_STREAM = 0x4C54, 0x4E4F


def long_tail_counts(class_counts: list[int], imbalance: float) -> list[int]:
    """Samples kept per class: ``⌊n_max · ρ^(−c/(K−1))⌋`` with ``n_max`` the smallest class."""
    if not (math.isfinite(imbalance) and imbalance >= 1):
        raise ValueError(f"Invalid imbalance: {imbalance!r} (a ratio >= 1; 1: balanced)")
    k = len(class_counts)
    n_max = min(class_counts)
    if k < 2 or n_max < 1:
        raise DataError(f"a long tail needs >= 2 classes with samples, got counts {class_counts}")
    counts = [max(1, math.floor(n_max * imbalance ** (-c / (k - 1)))) for c in range(k)]
    return counts


def long_tail_indices(labels: Tensor, num_classes: int, imbalance: float, seed: int) -> Tensor:
    """Indices (sorted) of the training samples the long tail keeps; seeded, exact counts."""
    per_class = [torch.nonzero(labels == c).flatten() for c in range(num_classes)]
    counts = long_tail_counts([len(ix) for ix in per_class], imbalance)
    g = torch.Generator().manual_seed(seed * 1_000_003 + _LT_STREAM)
    kept = [ix[torch.randperm(len(ix), generator=g)[:n]] for ix, n in zip(per_class, counts)]
    return torch.cat(kept).sort().values


def flip_labels(labels: Tensor, num_classes: int, fraction: float, seed: int) -> Tensor:
    """A copy of ``labels`` with exactly ``round(fraction·N)`` of them changed, each to a class
    drawn uniformly from the other ``num_classes − 1``; seeded."""
    if not (math.isfinite(fraction) and 0 <= fraction <= 1):
        raise ValueError(f"Invalid label_noise: {fraction!r} (a fraction in [0, 1])")
    if num_classes < 2:
        raise DataError("label noise needs at least 2 classes")
    g = torch.Generator().manual_seed(seed * 1_000_003 + _NOISE_STREAM)
    n_flip = round(fraction * len(labels))
    chosen = torch.randperm(len(labels), generator=g)[:n_flip]
    shift = torch.randint(1, num_classes, (n_flip,), generator=g)  # never 0: always another class
    noisy = labels.clone()
    noisy[chosen] = (labels[chosen] + shift) % num_classes
    return noisy


def class_weights(labels: Tensor, num_classes: int) -> Tensor:
    """The usual remedy for imbalance, "balanced" class weights ``w_c = N / (K · n_c)``
    (scikit-learn's ``class_weight="balanced"``): they average 1 over the training samples, and
    a class without samples gets 0."""
    counts = torch.bincount(labels, minlength=num_classes).double()
    present = int((counts > 0).sum())
    weights = torch.where(counts > 0, len(labels) / (present * counts.clamp(min=1)), 0.0)
    return weights.float()


def variant_name(imbalance: float = 1.0, label_noise: float = 0.0) -> str:
    """What results call the construction, e.g. ``"LT ρ=100, 20 % noisy labels"`` ("" if none)."""
    parts = []
    if imbalance > 1:
        parts.append(f"LT ρ={imbalance:g}")
    if label_noise > 0:
        parts.append(f"{100 * label_noise:g} % noisy labels")
    return ", ".join(parts)


def make_variant(data: DataSplit, *, imbalance: float, label_noise: float, seed: int) -> DataSplit:
    """``data`` with a long-tailed and/or noisy training split (the test split untouched);
    ``data`` itself when neither is asked for."""
    if imbalance == 1 and label_noise == 0:
        return data
    x, y = data.x_train, data.y_train
    if imbalance != 1:
        keep = long_tail_indices(y, data.num_classes, imbalance, seed)
        x, y = x[keep], y[keep]
    if label_noise:
        y = flip_labels(y, data.num_classes, label_noise, seed)
    out = DataSplit(data.name, x, y, data.x_test, data.y_test, data.num_classes)
    base = data.variant or data.name
    out.variant = f"{base} ({variant_name(imbalance, label_noise)})"
    return out
