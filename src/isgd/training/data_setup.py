"""The data of a :class:`isgd.training.train.Trainer`: the split and its variant, the checks of
its shape, the batch sampler (and so the run's length), the preprocessing and the tensors a
step gathers its rows from."""

from __future__ import annotations

from typing import TYPE_CHECKING

from isgd.data import DataError, DataSplit, Preprocess, load_dataset
from isgd.data.variants import class_weights, make_variant
from isgd.sampler import FixedCycleBatchSampler
from isgd.training.config import ConfigError

if TYPE_CHECKING:
    from isgd.training.train import Trainer

__all__ = ["PREPARE_ONCE_MAX_BYTES", "load_data", "setup_data"]

PREPARE_ONCE_MAX_BYTES = 2**31  # a training set larger than this as float32 is prepared per batch


def setup_data(trainer: Trainer, data: DataSplit | None, data_dir: str | None) -> None:
    """Set ``trainer``'s ``data`` (``data``, or ``config.dataset`` loaded from ``data_dir``,
    with the configured imbalance and label noise), ``sampler``, ``n_b`` (batches per epoch),
    ``total`` (iterations), ``pre`` (preprocessing), ``x_train`` (the prepared training set, or
    ``None``: prepared per batch), ``y_train``, ``class_weight``, ``x_test`` and ``y_test``."""
    config, device = trainer.config, trainer.device
    trainer.data = make_variant(
        data if data is not None else load_data(config.dataset, data_dir),
        imbalance=config.imbalance,
        label_noise=config.label_noise,
        seed=config.seed,
    )
    d = trainer.data
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
    trainer.sampler = FixedCycleBatchSampler(
        len(d.x_train), config.batch_size, seed=config.seed, reshuffle=config.reshuffle
    )
    trainer.n_b = len(trainer.sampler)
    if config.epochs > 0:
        trainer.total = max(1, round(config.epochs * trainer.n_b))
    else:
        trainer.total = config.iters
    if trainer.n_b < 2:
        raise ConfigError(
            f"invalid batch_size: {config.batch_size} (the {len(d.x_train)} training "
            "samples make fewer than 2 batches; ISGD's chart needs at least 2)"
        )
    trainer.pre = Preprocess.for_data(
        d,
        config.normalize,
        crop_padding=4 if config.augment and not config.crop_size else 0,
        crop_size=config.crop_size,
        random_crop=config.augment,
        flip=config.augment,
        channels_last=config.channels_last,
        seed=config.seed + 1,
    )
    # Without augmentation a small set is normalised once: a step only gathers rows. An
    # augmented set, or one whose float copy would pass 2 GiB (ImageNet, memory-mapped from
    # disk), is prepared batch by batch (the same numbers: the operations are per pixel).
    per_batch = config.augment or d.x_train.numel() * 4 > PREPARE_ONCE_MAX_BYTES
    trainer.x_train = None if per_batch else trainer.pre(d.x_train).to(device)
    trainer.y_train = d.y_train.to(device)
    trainer.class_weight = (
        class_weights(d.y_train, d.num_classes).to(device)
        if config.class_weights == "balanced"
        else None
    )
    trainer.x_test = d.x_test  # uint8; evaluation prepares it batch by batch
    trainer.y_test = d.y_test.to(device)


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
