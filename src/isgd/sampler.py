"""Fixed Cycle Pseudo Random (FCPR) batch sampling.

The data set is shuffled once with a seeded generator and cut into ``n_b`` fixed batches that are
visited in the same order every epoch (Caffe's shuffle-once database, read sequentially). Batch
``j`` of the cycle keeps its identity — its *batch id* ``j`` — across epochs, so its loss can be
followed epoch after epoch, which is what ISGD's control chart relies on. ``reshuffle=True`` gives
ordinary per-epoch shuffling (driven by :meth:`set_epoch`) for ablations.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Iterator, Sequence, Sized

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from isgd._numbers import as_int as _as_int
from isgd._numbers import is_real as _is_real

__all__ = ["DistributedFixedCycleBatchSampler", "FixedCycleBatchSampler", "split_sizes"]


class FixedCycleBatchSampler(Sampler[list[int]]):
    """Yields the same ``n_b`` batches of indices, in the same order, every epoch.

    Args:
        data_source: the data set (anything with ``len``) or its size as an integer (``int``,
            ``numpy.int64``, ...); at least one sample.
        batch_size: samples per batch (an integer >= 1).
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
        num_samples = _num_samples(data_source)
        batch_size = _check_batch_size(batch_size)
        if _as_int(seed) is None:
            raise TypeError(f"Invalid seed: {seed!r} (must be an integer)")
        seed = operator.index(seed)
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
        value = _as_int(epoch)
        if value is None or value < 0:
            raise ValueError(f"Invalid epoch: {epoch!r} (must be an integer >= 0)")
        self.epoch = value

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
        index = _as_int(batch_id)
        if index is None or not 0 <= index < len(self):
            raise IndexError(f"Invalid batch_id: {batch_id!r} (must be in [0, {len(self)}))")
        start = index * self.batch_size
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


def _num_samples(data_source: object) -> int:
    """The size of a data set given as one (``len``) or as an integer, at least 1."""
    if isinstance(data_source, bool):
        raise TypeError(f"Invalid data_source: {data_source!r} (a data set or its size)")
    if isinstance(data_source, Sized) and not isinstance(data_source, (str, bytes)):
        try:
            n = len(data_source)
        except TypeError:  # a 0-d tensor or array: Sized by type, a number by value
            pass
        else:
            if n < 1:
                raise ValueError(
                    f"Invalid data_source: an empty {type(data_source).__name__} (the data set "
                    "must hold at least one sample)"
                )
            return n
    n_int = _as_int(data_source)
    if n_int is None:
        raise TypeError(f"Invalid data_source: {_short(data_source)} (a data set or its size)")
    if n_int < 1:
        raise ValueError(
            f"Invalid data_source: {n_int} (the size of the data set must be an integer >= 1)"
        )
    return n_int


def _check_batch_size(batch_size: object) -> int:
    value = _as_int(batch_size)
    if value is None or value < 1:
        raise ValueError(f"Invalid batch_size: {batch_size!r} (must be an integer >= 1)")
    return value


def _short(x: object) -> str:
    """``repr(x)`` for a message line: the type name when it is long or spans lines."""
    text = repr(x)
    return text if len(text) <= 60 and "\n" not in text else f"<{type(x).__name__}>"


# ---------------------------------------------------------------------- data parallel
def split_sizes(batch_size: int, shares: Sequence[float] | None, world_size: int) -> list[int]:
    """Samples of a global batch per rank: proportional to ``shares`` (even when ``None``),
    rounded by largest remainder (ties to the lower rank), summing to ``batch_size``. Every rank
    needs at least one sample."""
    if _as_int(world_size) is None or operator.index(world_size) < 1:
        raise ValueError(f"Invalid world_size: {world_size!r} (must be an integer >= 1)")
    world_size = operator.index(world_size)
    batch_size = _check_batch_size(batch_size)
    if batch_size < world_size:
        raise ValueError(
            f"Invalid batch_size: {batch_size} (a global batch must give each of the "
            f"{world_size} processes a sample)"
        )
    if shares is None:
        weights = [1.0] * world_size
    elif isinstance(shares, (str, bytes)) or not isinstance(shares, Iterable):
        raise TypeError(f"Invalid shares: {_short(shares)} (positive numbers, one per process)")
    else:
        values = list(shares)
        if not all(_is_real(s) and math.isfinite(s) and s > 0 for s in values):
            raise ValueError(
                f"Invalid shares: {_short(values)} (positive finite numbers, one per process)"
            )
        weights = [float(s) for s in values]
    if len(weights) != world_size:
        raise ValueError(f"Invalid shares: {len(weights)} shares for {world_size} processes")
    total = sum(weights)
    ideal = [batch_size * w / total for w in weights]
    sizes = [math.floor(x) for x in ideal]
    order = sorted(range(world_size), key=lambda r: (-(ideal[r] - sizes[r]), r))
    for r in order[: batch_size - sum(sizes)]:
        sizes[r] += 1
    if min(sizes) < 1:
        empty = [r for r, n in enumerate(sizes) if n < 1]
        raise ValueError(
            f"Invalid shares: {_fmt(weights)} split a global batch of {batch_size} as "
            f"{_fmt(sizes)}, leaving rank{'s' * (len(empty) > 1)} {_fmt(empty)} without a sample; "
            "use a larger --batch-size or more even shares"
        )
    return sizes


def _fmt(values: Sequence[float]) -> str:
    return ",".join(f"{v:g}" for v in values)


def rank_rows(sizes: Sequence[int], rank: int) -> slice:
    """The rows of a global batch that ``rank`` takes."""
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


class DistributedFixedCycleBatchSampler(Sampler[list[int]]):
    """Rank ``rank``'s slice of every global fixed batch of :class:`FixedCycleBatchSampler`.

    The global batches — their identity, content and order — are those of
    ``FixedCycleBatchSampler(data_source, batch_size, seed=seed, reshuffle=reshuffle)`` whatever
    ``num_replicas`` is; rank ``r`` takes ``sizes[r]`` consecutive samples of each, with
    ``sizes = split_sizes(batch_size, shares, num_replicas)``. Incomplete batches are always
    dropped (every rank needs its share of every batch).

    Args:
        data_source: the data set (anything with ``len``) or its size.
        batch_size: the *global* batch size ``B``.
        num_replicas, rank: the number of processes and this one's rank (default: from the
            initialised process group), as for ``torch.utils.data.DistributedSampler``.
        shares: relative speeds, one per rank (``[3, 1]``: rank 0 takes three quarters), or
            ``None`` for an even split.
        seed, reshuffle: as for :class:`FixedCycleBatchSampler`.

    Example:
        >>> s0 = DistributedFixedCycleBatchSampler(12, 4, num_replicas=2, rank=0, shares=[3, 1])
        >>> s1 = DistributedFixedCycleBatchSampler(12, 4, num_replicas=2, rank=1, shares=[3, 1])
        >>> whole = FixedCycleBatchSampler(12, 4)
        >>> [a + b for a, b in zip(s0, s1)] == list(whole)
        True
    """

    def __init__(
        self,
        data_source: Sized | int,
        batch_size: int,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        shares: Sequence[float] | None = None,
        seed: int = 0,
        reshuffle: bool = False,
    ) -> None:
        if num_replicas is None or rank is None:
            if not dist.is_available() or not dist.is_initialized():
                raise RuntimeError(
                    "DistributedFixedCycleBatchSampler needs num_replicas and rank, or an "
                    "initialised process group"
                )
            num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
            rank = dist.get_rank() if rank is None else rank
        replicas = _as_int(num_replicas)
        if replicas is None or replicas < 1:
            raise ValueError(f"Invalid num_replicas: {num_replicas!r} (must be an integer >= 1)")
        num_replicas = replicas
        rank_int = _as_int(rank)
        if rank_int is None or not 0 <= rank_int < num_replicas:
            raise ValueError(f"Invalid rank: {rank!r} (must be in [0, {num_replicas}))")
        rank = rank_int
        self.global_sampler = FixedCycleBatchSampler(
            data_source, batch_size, seed=seed, drop_last=True, reshuffle=reshuffle
        )
        self.num_replicas, self.rank = num_replicas, rank
        self.sizes = split_sizes(batch_size, shares, num_replicas)
        self.rows = rank_rows(self.sizes, rank)
        self.batch_size = self.global_sampler.batch_size  # global
        self.local_batch_size = self.sizes[rank]

    def __len__(self) -> int:
        """Batches per epoch, ``n_b`` — the same on every rank."""
        return len(self.global_sampler)

    def set_epoch(self, epoch: int) -> None:
        self.global_sampler.set_epoch(epoch)

    def epoch_batches(self, epoch: int | None = None) -> torch.Tensor:
        """This rank's rows of every batch of an epoch, ``n_b × sizes[rank]``."""
        return self.global_sampler.epoch_batches(epoch)[:, self.rows]

    def batch(self, batch_id: int, epoch: int | None = None) -> list[int]:
        return self.global_sampler.batch(batch_id, epoch)[self.rows]

    def __iter__(self) -> Iterator[list[int]]:
        for indices in self.global_sampler:
            yield indices[self.rows]

    def __repr__(self) -> str:
        return (
            f"DistributedFixedCycleBatchSampler(rank={self.rank}/{self.num_replicas}, "
            f"sizes={self.sizes}, global={self.global_sampler!r})"
        )
