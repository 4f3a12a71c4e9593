"""The workload of a :class:`isgd.training.train.Trainer` and how it reads its data.

Every run trains a :class:`~isgd.training.workload.Workload`: a user's (``--workload``, loaded
by :func:`isgd.training.workload.load_workload`), or the built-in image workload that the
configuration's data keys describe (:func:`image_workload`: the data set and its variant, the
preprocessing, the model). :func:`setup_data` then gives the trainer the batch sampler (and so
the run's length), the loss and the metric.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import Dataset

from isgd.data import DataError, DataSplit, Preprocess, load_dataset
from isgd.data.variants import class_weights, make_variant
from isgd.models import build_model
from isgd.sampler import FixedCycleBatchSampler
from isgd.training.config import ConfigError, TrainConfig
from isgd.training.workload import Workload, load_workload

if TYPE_CHECKING:
    from isgd.training.train import Trainer

__all__ = [
    "PREPARE_ONCE_MAX_BYTES",
    "ImageSplit",
    "build_workload",
    "image_workload",
    "load_data",
    "setup_data",
]

PREPARE_ONCE_MAX_BYTES = 2**31  # a training set larger than this as float32 is prepared per batch


class ImageSplit(Dataset[tuple[Tensor, Tensor]]):
    """One split of a built-in image data set: uint8 images made network inputs by the run's
    :class:`~isgd.data.Preprocess` (augmented in a training split), a batch at once
    (:meth:`gather`, which :func:`isgd.training.workload.collate` uses).

    ``prepare_once``: the whole split is normalised up front and a batch only gathers rows (a
    small set without augmentation: the same numbers, the operations are per pixel). Under data
    parallelism :attr:`within` is ``(global batch, this rank's rows)``: the augmentation draws
    for the whole global batch, so every split of it sees the same crops and flips."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        pre: Preprocess,
        *,
        train: bool,
        device: torch.device,
        prepare_once: bool = False,
    ) -> None:
        self.images, self.labels = images, labels.to(device)
        self.pre, self.train, self.device = pre, train, device
        self.prepared = pre(images).to(device) if prepare_once else None
        self.within: tuple[int, slice] | None = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x, y = self.gather(torch.tensor([i]))
        return x[0], y[0]

    def gather(self, index: Sequence[int] | Tensor | slice) -> tuple[Tensor, Tensor]:
        if isinstance(index, range):  # consecutive samples (evaluation): a view, not a copy
            index = slice(index.start, index.stop)
        if self.prepared is not None:
            return self.prepared[index], self.labels[index]
        within = self.within if self.train else None
        x = self.pre(self.images[index], train=self.train, within=within)
        return x.to(self.device), self.labels[index]

    def state_dict(self) -> dict[str, Tensor]:
        """The augmentation's random state (a checkpoint resumes its draws)."""
        return self.pre.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.pre.load_state_dict(state)


def _weighted_cross_entropy(
    logits: Tensor, y: Tensor, *, weight: Tensor, reduction: str = "mean"
) -> Tensor:
    """``(1/B) Σ_i w_{y_i} ℓ_i`` (the weights average 1 over the training set); with
    ``reduction="none"`` the terms ``w_{y_i} ℓ_i`` (selective backprop's per-example losses)."""
    if reduction == "none":
        return F.cross_entropy(logits, y, weight=weight, reduction="none")
    if reduction != "mean":
        raise ValueError(f"Invalid reduction: {reduction!r} (mean or none)")
    return F.cross_entropy(logits, y, weight=weight, reduction="sum") / len(y)


def image_workload(
    config: TrainConfig, data: DataSplit | None, data_dir: str | None, device: torch.device
) -> Workload:
    """The workload of the configuration's data keys: ``data`` (or ``config.dataset`` loaded
    from ``data_dir``) with the configured imbalance and label noise, preprocessed as
    configured, cross-entropy (class-weighted with ``class_weights = "balanced"``), accuracy,
    and ``config.model`` initialised from ``config.seed``."""
    d = make_variant(
        data if data is not None else load_data(config.dataset, data_dir),
        imbalance=config.imbalance,
        label_noise=config.label_noise,
        seed=config.seed,
    )
    height, width = d.x_train.shape[2:]
    if height != width:
        raise DataError(
            f"{config.dataset}: the images are {height}×{width} pixels, but the models take "
            "square images (N×S×S); crop or pad them to a square"
        )
    if config.crop_size > height:
        raise ConfigError(
            f"invalid crop_size: {config.crop_size} (the {config.dataset} images are "
            f"{height}×{width} pixels)"
        )
    pre = Preprocess.for_data(
        d,
        config.normalize,
        crop_padding=4 if config.augment and not config.crop_size else 0,
        crop_size=config.crop_size,
        random_crop=config.augment,
        flip=config.augment,
        channels_last=config.channels_last,
        seed=config.seed + 1,
    )
    # an augmented set, or one whose float copy would pass 2 GiB (ImageNet, memory-mapped from
    # disk), is prepared batch by batch
    per_batch = config.augment or d.x_train.numel() * 4 > PREPARE_ONCE_MAX_BYTES
    train = ImageSplit(
        d.x_train, d.y_train, pre, train=True, device=device, prepare_once=not per_batch
    )
    test = ImageSplit(d.x_test, d.y_test, pre, train=False, device=device)
    loss: Any = F.cross_entropy
    if config.class_weights == "balanced":
        weight = class_weights(d.y_train, d.num_classes).to(device)
        loss = partial(_weighted_cross_entropy, weight=weight)
    torch.manual_seed(config.seed)  # same initialisation for every optimizer of a seed
    model = build_model(
        config.model, d.in_channels, d.num_classes, config.crop_size or d.image_size
    )
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return Workload(model, train, test, loss, "accuracy", d.variant or d.name, d.num_classes)


def build_workload(
    config: TrainConfig, data: DataSplit | None, data_dir: str | None, device: torch.device
) -> Workload:
    """``config.workload`` loaded for ``config.seed``, or the built-in :func:`image_workload`."""
    if config.workload:
        return load_workload(config.workload, config.seed)
    return image_workload(config, data, data_dir, device)


def setup_data(trainer: Trainer, workload: Workload) -> None:
    """Set ``trainer``'s ``workload``, ``metric``, ``sampler``, ``n_b`` (batches per epoch) and
    ``total`` (iterations: ``iters`` or ``epochs``, times ``budget``) and ``validation`` (the
    last ``config.validation`` training samples, or ``None``), after checking the data make at
    least two batches and the target fits the metric."""
    config = trainer.config
    n = len(workload.train)  # type: ignore[arg-type]
    trainer.validation = None
    if config.validation:
        if config.validation >= n:
            raise ConfigError(
                f"invalid validation: {config.validation} (the training set has {n} samples)"
            )
        workload, trainer.validation = workload.split_validation(config.validation)
        n -= config.validation
    trainer.workload, trainer.metric = workload, workload.judged_by
    trainer.sampler = FixedCycleBatchSampler(
        n, config.batch_size, seed=config.seed, reshuffle=config.reshuffle
    )
    trainer.n_b = len(trainer.sampler)
    if trainer.n_b < 2:
        raise ConfigError(
            f"invalid batch_size: {config.batch_size} (the {n} training samples make fewer "
            "than 2 batches; ISGD's chart needs at least 2)"
        )
    full = max(1, round(config.epochs * trainer.n_b)) if config.epochs > 0 else config.iters
    trainer.total = full if config.budget == 1 else max(1, round(config.budget * full))
    if workload.is_classification and config.target > 1:
        raise ConfigError(f"invalid target: {config.target:g} (an accuracy: a fraction in [0, 1])")


def load_data(name: str, data_dir: str | None) -> DataSplit:
    """:func:`isgd.data.load_dataset`, with what to do about broken IDX files."""
    try:
        return load_dataset(name, data_dir)
    except DataError as err:
        if not name.startswith("idx:"):
            raise
        raise DataError(
            f"{err}; fix or replace the IDX files in {name[4:]} (uint8 images N×H×W and "
            "labels N, raw or .gz)"
        ) from None
