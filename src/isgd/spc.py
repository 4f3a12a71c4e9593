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
Non-finite losses never enter the window; they are counted in :attr:`nonfinite`.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

__all__ = ["LossControlChart"]


class LossControlChart:
    """A FIFO window of batch losses with mean, population sigma and an upper control limit.

    Args:
        window: number of losses in the window (ISGD uses the number of batches per epoch, n_b).
        sigma_factor: ``k`` in ``limit = mean + k · sigma`` (default 3, the Shewhart chart's).

    Example:
        >>> chart = LossControlChart(window=3)
        >>> for loss in (1.0, 2.0, 3.0):
        ...     chart.update(loss)
        >>> round(chart.limit, 6)          # 2 + 3 · sqrt(2/3)
        4.44949
    """

    def __init__(self, window: int, sigma_factor: float = 3.0) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"Invalid window: {window!r} (must be an integer >= 2)")
        if not _is_real(sigma_factor) or not math.isfinite(sigma_factor) or sigma_factor <= 0:
            raise ValueError(
                f"Invalid sigma_factor: {sigma_factor!r} (must be a finite number > 0)"
            )
        self.window = window
        self.sigma_factor = float(sigma_factor)
        self._losses: deque[float] = deque(maxlen=window)
        self._shift = 0.0  # c: the sums below are of (ψ − c) and (ψ − c)²
        self._sum = 0.0
        self._sum_sq = 0.0
        self._since_exact = 0  # updates since the last exact recomputation
        self.nonfinite = 0  # losses refused because they were NaN or ±inf

    # ------------------------------------------------------------------ updates
    def update(self, loss: float) -> bool:
        """Add one loss to the window; returns False (and counts it) if the loss is not finite."""
        loss = float(loss)
        if not math.isfinite(loss):
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
        if not 0 <= q <= 1:
            raise ValueError(f"Invalid q: {q!r} (a fraction in [0, 1])")
        if not self.full:
            return None
        losses = sorted(self._losses)
        return losses[max(math.ceil(q * len(losses)) - 1, 0)]

    def above_limit(self, loss: float) -> bool:
        """True when the window is full, ``loss`` is finite and ``loss > limit``."""
        limit = self.limit
        return limit is not None and math.isfinite(loss) and loss > limit

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
        missing = {"window", "sigma_factor", "losses"} - set(state)
        if missing:
            raise ValueError(f"LossControlChart state is missing {sorted(missing)}")
        if state["window"] != self.window:
            raise ValueError(
                f"LossControlChart state has window={state['window']}, this chart has "
                f"window={self.window}"
            )
        losses = [float(x) for x in state["losses"]]
        if len(losses) > self.window or not all(math.isfinite(x) for x in losses):
            raise ValueError("LossControlChart state holds too many or non-finite losses")
        self.sigma_factor = float(state["sigma_factor"])
        self._losses = deque(losses, maxlen=self.window)
        self.nonfinite = int(state.get("nonfinite", 0))
        if "sum" in state:
            self._shift = float(state["shift"])
            self._sum = float(state["sum"])
            self._sum_sq = float(state["sum_sq"])
            self._since_exact = int(state["since_exact"])
        else:
            self._recompute()

    def __repr__(self) -> str:
        return (
            f"LossControlChart(window={self.window}, sigma_factor={self.sigma_factor}, "
            f"count={self.count}, mean={self.mean}, sigma={self.sigma}, limit={self.limit})"
        )


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
