"""Fixed Cycle Pseudo Random (FCPR) batch sampling.

The data set is shuffled once with a seeded generator and cut into ``n_b`` fixed batches that are
visited in the same order every epoch (Caffe's shuffle-once database, read sequentially). Batch
``j`` of the cycle keeps its identity — its *batch id* ``j`` — across epochs, so its loss can be
followed epoch after epoch, which is what ISGD's control chart relies on. ``reshuffle=True`` gives
ordinary per-epoch shuffling (driven by :meth:`set_epoch`) for ablations.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import Sampler

__all__ = ["FixedCycleBatchSampler"]


class FixedCycleBatchSampler(Sampler[list[int]]):
    """Yields the same ``n_b`` batches of indices, in the same order, every epoch.

    Args:
        data_source: the data set (anything with ``len``) or its size as an int.
        batch_size: samples per batch.
        seed: seeds the one permutation (and, with ``reshuffle``, each epoch's).
        drop_last: drop the last, incomplete batch (default True, as Caffe's fixed batch count).
        reshuffle: draw a new permutation every epoch from ``(seed, epoch)`` — ordinary shuffling,
            for ablations. Batch ids are then positions within the epoch, not stable identities.

    Batch ``j`` of the epoch has batch id ``j``; :meth:`batch` returns it directly and
    :meth:`epoch_batches` gives the whole epoch as an ``n_b × batch_size`` tensor (when
    ``drop_last``), which a loop over in-memory tensors can index without a DataLoader.

    Example:
        >>> sampler = FixedCycleBatchSampler(10, batch_size=4, seed=0)
        >>> len(sampler)
        2
        >>> list(sampler) == list(sampler)   # the same batches every epoch
        True
    """

    def __init__(
        self,
        data_source: Sized | int,
        batch_size: int,
        *,
        seed: int = 0,
        drop_last: bool = True,
        reshuffle: bool = False,
    ) -> None:
        if isinstance(data_source, bool):
            raise TypeError(f"Invalid data_source: {data_source!r} (a data set or its size)")
        num_samples = data_source if isinstance(data_source, int) else len(data_source)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Invalid batch_size: {batch_size!r} (must be an integer >= 1)")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"Invalid seed: {seed!r} (must be an integer)")
        if num_samples < batch_size if drop_last else num_samples < 1:
            raise ValueError(
                f"Invalid batch_size: {batch_size} for a data set of {num_samples} samples "
                f"(no complete batch{' with drop_last=True' if drop_last else ''})"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = bool(drop_last)
        self.reshuffle = bool(reshuffle)
        self.epoch = 0
        self._cached: tuple[int, torch.Tensor] | None = None  # (permutation key, permutation)

    def __len__(self) -> int:
        """Number of batches per epoch, ``n_b``."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (changes the batches only with ``reshuffle=True``)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"Invalid epoch: {epoch!r} (must be an integer >= 0)")
        self.epoch = epoch

    def permutation(self, epoch: int | None = None) -> torch.Tensor:
        """The order of all samples for ``epoch`` (the current one by default)."""
        key = (self.epoch if epoch is None else epoch) if self.reshuffle else 0
        if self._cached is None or self._cached[0] != key:
            # reshuffle: a distinct, reproducible stream per (seed, epoch)
            seed = self.seed * 1_000_003 + key if self.reshuffle else self.seed
            generator = torch.Generator().manual_seed(seed)
            self._cached = (key, torch.randperm(self.num_samples, generator=generator))
        return self._cached[1]

    def epoch_batches(self, epoch: int | None = None) -> torch.Tensor:
        """All batches of an epoch as an ``n_b × batch_size`` int64 tensor (needs ``drop_last``)."""
        if not self.drop_last:
            raise ValueError("epoch_batches() needs drop_last=True (batches of equal size)")
        n_b = len(self)
        return self.permutation(epoch)[: n_b * self.batch_size].view(n_b, self.batch_size)

    def batch(self, batch_id: int, epoch: int | None = None) -> list[int]:
        """The indices of batch ``batch_id`` (0 ≤ batch_id < n_b)."""
        if not 0 <= batch_id < len(self):
            raise IndexError(f"Invalid batch_id: {batch_id} (must be in [0, {len(self)}))")
        start = batch_id * self.batch_size
        return self.permutation(epoch)[start : start + self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        permutation = self.permutation()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield permutation[start : start + self.batch_size].tolist()

    def __repr__(self) -> str:
        return (
            f"FixedCycleBatchSampler(num_samples={self.num_samples}, batch_size={self.batch_size}, "
            f"seed={self.seed}, drop_last={self.drop_last}, reshuffle={self.reshuffle})"
        )
