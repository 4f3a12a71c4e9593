"""Statistical Process Control over batch losses: the Shewhart chart ISGD uses to spot a batch
that is under-trained.

The chart holds the last ``window`` *regular* batch losses (one epoch under fixed-cycle sampling,
FIFO) and answers

    mean  = (1/n) Σ ψ_i
    sigma = sqrt((1/n) Σ (ψ_i − mean)²)        (population sigma)
    limit = mean + k · sigma                    k = ``sigma_factor``

A loss is *above the limit* when ``ψ > limit``; the limit is read before the current loss joins
the window, and there is no limit (``None``) until the window is full — the first epoch is plain
SGD.

Updates are O(1): the chart keeps running sums of ``ψ − c`` and ``(ψ − c)²`` in float64 around a
shift ``c`` (the mean at the last exact recomputation, which keeps cancellation small), and
recomputes them exactly every ``window`` updates, so rounding errors never accumulate.
Non-finite losses never enter the window; they are counted in :attr:`nonfinite`. So are
losses of magnitude above :data:`MAX_LOSS` (1e100): their squares, summed over a window, would
overflow float64, and no training loss that large is anything but a diverged run.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch

from isgd._numbers import as_int as _as_int
from isgd._numbers import is_real as _is_real

__all__ = ["MAX_LOSS", "MAX_WINDOW", "LossControlChart", "finite_loss"]

#: Largest window: 2**31 − 1 losses (tens of GiB of Python floats once full). A window longer
#: than the run is already one in which ISGD never acts (see :class:`LossControlChart`).
MAX_WINDOW = 2**31 - 1
#: Largest loss magnitude the chart takes; beyond it a loss counts as non-finite (its square times
#: MAX_WINDOW would overflow the float64 running sums).
MAX_LOSS = 1e100


class LossControlChart:
    """A FIFO window of batch losses with mean, population sigma and an upper control limit.

    Args:
        window: number of losses in the window (ISGD uses the number of batches per epoch, n_b).
        sigma_factor: ``k`` in ``limit = mean + k · sigma`` (default 3, the Shewhart chart's).

    ``window`` is an integer (``int``, ``numpy.int64``, anything with ``__index__`` but a bool)
    in [2, :data:`MAX_WINDOW`]. The limit exists only once ``window`` losses have arrived: a
    window longer than the number of steps a run takes leaves it without a limit throughout,
    and ISGD with it is the plain base optimizer.

    Example:
        >>> chart = LossControlChart(window=3)
        >>> for loss in (1.0, 2.0, 3.0):
        ...     _ = chart.update(loss)    # True: it joined the window
        >>> round(chart.limit, 6)          # 2 + 3 · sqrt(2/3)
        4.44949
    """

    def __init__(self, window: int, sigma_factor: float = 3.0) -> None:
        window = check_window(window)
        self.window = window
        self.sigma_factor = check_sigma_factor(sigma_factor)
        self._losses: deque[float] = deque(maxlen=window)
        self._shift = 0.0  # c: the sums below are of (ψ − c) and (ψ − c)²
        self._sum = 0.0
        self._sum_sq = 0.0
        self._since_exact = 0  # updates since the last exact recomputation
        self.nonfinite = 0  # losses refused: NaN, ±inf or beyond ±MAX_LOSS

    # ------------------------------------------------------------------ updates
    def update(self, loss: float | torch.Tensor) -> bool:
        """Add one loss to the window; returns False (and counts it in :attr:`nonfinite`) if the
        loss is NaN, infinite or of magnitude above :data:`MAX_LOSS`.

        ``loss`` is a real number (Python's or NumPy's, not a bool) or a one-element real tensor
        (one host read); anything else is refused with a ``TypeError``."""
        loss = _loss_value(loss)
        if not finite_loss(loss):
            self.nonfinite += 1
            return False
        if len(self._losses) == self.window:
            old = self._losses[0] - self._shift
            self._sum -= old
            self._sum_sq -= old * old
        self._losses.append(loss)
        new = loss - self._shift
        self._sum += new
        self._sum_sq += new * new
        self._since_exact += 1
        if self._since_exact >= self.window:
            self._recompute()
        return True

    def _recompute(self) -> None:
        """Exact sums from the window, re-centred on the current mean."""
        n = len(self._losses)
        self._shift = math.fsum(self._losses) / n if n else 0.0
        centred = [x - self._shift for x in self._losses]
        self._sum = math.fsum(centred)
        self._sum_sq = math.fsum(d * d for d in centred)
        self._since_exact = 0

    def reset(self) -> None:
        """Empty the window (the non-finite counter is kept)."""
        self._losses.clear()
        self._shift = self._sum = self._sum_sq = 0.0
        self._since_exact = 0

    # ------------------------------------------------------------------ statistics
    @property
    def count(self) -> int:
        """Number of losses in the window."""
        return len(self._losses)

    @property
    def full(self) -> bool:
        return len(self._losses) == self.window

    @property
    def mean(self) -> float | None:
        n = len(self._losses)
        return self._shift + self._sum / n if n else None

    @property
    def sigma(self) -> float | None:
        """Population standard deviation of the window (0 when all losses are equal)."""
        n = len(self._losses)
        if not n:
            return None
        centred_mean = self._sum / n
        variance = self._sum_sq / n - centred_mean * centred_mean
        return math.sqrt(variance) if variance > 0.0 else 0.0

    @property
    def limit(self) -> float | None:
        """``mean + sigma_factor · sigma``; None until the window is full."""
        mean, sigma = self.mean, self.sigma
        if not self.full or mean is None or sigma is None:
            return None
        return mean + self.sigma_factor * sigma

    def statistics(self) -> tuple[float | None, float | None, float | None]:
        """``(mean, sigma, limit)`` in one call (what a step reads before its loss joins)."""
        mean, sigma = self.mean, self.sigma
        if not self.full or mean is None or sigma is None:
            return mean, sigma, None
        return mean, sigma, mean + self.sigma_factor * sigma

    def quantile(self, q: float) -> float | None:
        """The ``q``-quantile of the window (nearest rank: the ⌈q·n⌉-th smallest loss, the
        smallest for ``q`` = 0); None until the window is full. O(n log n): a sort per call."""
        if not _is_real(q) or not 0 <= q <= 1:
            raise ValueError(f"Invalid q: {q!r} (a fraction in [0, 1])")
        if not self.full:
            return None
        losses = sorted(self._losses)
        return losses[max(math.ceil(q * len(losses)) - 1, 0)]

    def above_limit(self, loss: float | torch.Tensor) -> bool:
        """True when the window is full, ``loss`` is finite (as :meth:`update` counts it) and
        ``loss > limit``."""
        loss = _loss_value(loss)
        limit = self.limit
        return limit is not None and finite_loss(loss) and loss > limit

    def losses(self) -> list[float]:
        """The losses in the window, oldest first."""
        return list(self._losses)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically, running sums included."""
        return {
            "window": self.window,
            "sigma_factor": self.sigma_factor,
            "losses": list(self._losses),
            "shift": self._shift,
            "sum": self._sum,
            "sum_sq": self._sum_sq,
            "since_exact": self._since_exact,
            "nonfinite": self.nonfinite,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output. The whole state is checked before anything
        changes; the window is structural: a state saved with another window is refused."""
        if not isinstance(state, dict):
            raise TypeError(f"Invalid state: {_short(state)} (a LossControlChart.state_dict())")
        missing = {"window", "sigma_factor", "losses"} - set(state)
        if missing:
            raise ValueError(f"LossControlChart state is missing {sorted(missing)}")
        check_same_window(state["window"], self.window, "this chart")
        sigma_factor = check_sigma_factor(state["sigma_factor"])
        losses = state["losses"]
        if not isinstance(losses, (list, tuple)) or len(losses) > self.window:
            raise ValueError(
                f"Invalid losses: {_short(losses)} (a list of at most window={self.window} "
                "finite losses)"
            )
        bad = [x for x in losses if not (_is_real(x) and finite_loss(float(x)))]
        if bad:
            raise ValueError(
                f"Invalid losses: holds {_short(bad[0])} (the window holds only finite losses "
                f"of magnitude <= {MAX_LOSS:g})"
            )
        nonfinite = check_counter(state.get("nonfinite", 0), "nonfinite")
        sums = None
        if "sum" in state:
            partial = {"shift", "sum_sq", "since_exact"} - set(state)
            if partial:
                raise ValueError(f"LossControlChart state is missing {sorted(partial)}")
            sums = tuple(_check_float(state[k], k) for k in ("shift", "sum", "sum_sq"))
            since_exact = check_counter(state["since_exact"], "since_exact")
            if since_exact >= self.window:
                raise ValueError(
                    f"Invalid since_exact: {since_exact} (must be < window={self.window})"
                )
        self.sigma_factor = sigma_factor
        self._losses = deque((float(x) for x in losses), maxlen=self.window)
        self.nonfinite = nonfinite
        if sums is not None:
            self._shift, self._sum, self._sum_sq = sums
            self._since_exact = since_exact
        else:
            self._recompute()

    def __repr__(self) -> str:
        return (
            f"LossControlChart(window={self.window}, sigma_factor={self.sigma_factor}, "
            f"count={self.count}, mean={self.mean}, sigma={self.sigma}, limit={self.limit})"
        )


def finite_loss(loss: float) -> bool:
    """A loss the chart takes: finite and of magnitude <= :data:`MAX_LOSS`."""
    return math.isfinite(loss) and abs(loss) <= MAX_LOSS


def check_window(window: object) -> int:
    """``window`` as an int in [2, MAX_WINDOW], or a ``ValueError`` naming it."""
    value = _as_int(window)
    if value is None or value < 2:
        raise ValueError(f"Invalid window: {_short(window)} (must be an integer >= 2)")
    if value > MAX_WINDOW:
        digits = len(str(value))
        what = _short(window) if digits <= 40 else f"an integer of {digits} digits"
        raise ValueError(
            f"Invalid window: {what} (must be <= {MAX_WINDOW} = 2**31 - 1; a window "
            "is the number of batches per epoch, and ISGD acts only once it has filled)"
        )
    return value


def check_same_window(saved: object, window: int, this: str) -> None:
    """Refuse a state saved with another window than ``window`` (``this``: whose it is)."""
    value = _as_int(saved)
    if value != window:
        raise ValueError(
            f"Invalid window: {_short(saved)} (the state was saved with window={_short(saved)}, "
            f"{this} has window={window}; the window is structural: load it into one built with "
            "the same window)"
        )


def check_counter(value: object, name: str) -> int:
    """A saved counter as an int >= 0, or a ``ValueError`` naming it."""
    count = _as_int(value)
    if count is None or count < 0:
        raise ValueError(f"Invalid {name}: {_short(value)} (a counter: an integer >= 0)")
    return count


def check_sigma_factor(sigma_factor: object) -> float:
    if not _is_real(sigma_factor) or not math.isfinite(sigma_factor) or sigma_factor <= 0:
        raise ValueError(f"Invalid sigma_factor: {sigma_factor!r} (must be a finite number > 0)")
    return float(sigma_factor)


def _check_float(value: object, name: str) -> float:
    if not _is_real(value) or not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {_short(value)} (must be a finite number)")
    return float(value)


def _loss_value(loss: object) -> float:
    """A loss as a float: a real number or a one-element real tensor, else ``TypeError``."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1 or loss.is_complex() or loss.dtype == torch.bool:
            what = f"a {loss.dtype} tensor of shape {tuple(loss.shape)}"
            raise TypeError(
                f"Invalid loss: {what} (must be a real number or a one-element real tensor)"
            )
        return float(loss)
    if not _is_real(loss):
        raise TypeError(
            f"Invalid loss: {_short(loss)} (must be a real number or a one-element real tensor)"
        )
    return float(loss)


def _short(x: object) -> str:
    """``repr(x)`` for a message line: the type name when it is long or spans lines."""
    text = repr(x)
    return text if len(text) <= 60 and "\n" not in text else f"<{type(x).__name__}>"
