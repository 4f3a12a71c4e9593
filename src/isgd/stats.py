"""What ISGD records: the last step's :class:`StepRecord` and the cumulative :class:`ISGDStats`.

The record is the line ``isgd train`` writes to ``steps.jsonl``; :meth:`ISGDStats.metrics` gives
the names that every loop logs (``isgd train``, Lightning's callback, Hugging Face's trainer).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from isgd.spc import check_counter

__all__ = ["ISGDStats", "StepRecord"]


@dataclass
class StepRecord:
    """What happened in the last step (the regular loss ψ and the chart it was judged against)."""

    loss: float = math.nan  # ψ_w(d_t) of the regular pass
    mean: float | None = None  # the chart before ψ joined it
    sigma: float | None = None
    limit: float | None = None
    triggered: bool = False  # ψ > limit with a full window
    skipped: bool = False  # a GradScaler found inf/NaN gradients: no update this step
    extra_iters: int = 0  # subproblem updates applied
    loss_after: float | None = None  # last ψ evaluated on d_t in the extra iterations
    # ISGD(diagnostics=True): ‖momentum term‖ / ‖∇φ‖ in the subproblem updates (mean; None: off,
    # none, or no velocity): how much of an extra iteration is the velocity, how much the chase
    momentum_ratio: float | None = None
    # isgd.forward_only's lower limit (lower_quantile of the window) and whether ψ fell below
    # it: a forward-only step, no backward wanted and no update applied
    lower_limit: float | None = None
    forward_only: bool = False


@dataclass
class ISGDStats:
    """Cumulative counters. ``passes`` counts every loss evaluation (a forward, and a backward
    where the loop ran one), the extra iterations included; ``forward_passes`` those of them that
    ran no backward: forward-only steps (``isgd.forward_only``) and stop checks a closure answered
    without ``backward()`` after :meth:`ISGD.well_trained` said so."""

    steps: int = 0
    triggers: int = 0
    nonfinite: int = 0  # steps skipped for a NaN/inf loss (nonfinite="skip")
    extra_iters: int = 0
    passes: int = 0
    forward_only: int = 0  # steps below the lower limit (variant): passes without a backward
    forward_passes: int = 0  # passes without a backward: forward-only steps and stop checks
    last: StepRecord = field(default_factory=StepRecord)

    @property
    def backward_passes(self) -> int:
        """Passes that wanted a backward: all but the ``forward_passes``."""
        return self.passes - self.forward_passes

    @property
    def trigger_rate(self) -> float:
        return self.triggers / self.steps if self.steps else 0.0

    def count_step(self, record: StepRecord) -> None:
        """A step observed: ``record`` becomes :attr:`last`, its regular pass is counted (a
        forward-only step's as a pass without backward)."""
        self.steps += 1
        self.passes += 1
        self.forward_only += record.forward_only
        self.forward_passes += record.forward_only
        self.last = record

    def skip_last(self) -> None:
        """The last step's update is not applied after all (non-finite gradients found after it
        was observed): skipped, and no trigger."""
        if self.last.triggered:
            self.triggers -= 1
        self.last.triggered, self.last.skipped = False, True

    def metrics(self, prefix: str = "isgd/") -> dict[str, float]:
        """The names every loop logs (``isgd train``, Lightning's ``ISGDCallback``, Hugging
        Face's ``ISGDTrainer``), all cumulative since the start but the last step's ``loss`` (ψ)
        and ``limit`` (absent before the chart is full): ``steps``, ``triggers``,
        ``extra_iters``, ``passes``, ``backward_passes``, ``forward_only``, ``nonfinite``,
        ``trigger_rate``."""
        values: dict[str, float] = {
            "steps": self.steps,
            "triggers": self.triggers,
            "extra_iters": self.extra_iters,
            "passes": self.passes,
            "backward_passes": self.backward_passes,
            "forward_only": self.forward_only,
            "nonfinite": self.nonfinite,
            "trigger_rate": self.trigger_rate,
            "loss": self.last.loss,
        }
        if self.last.limit is not None:
            values["limit"] = self.last.limit
        return {prefix + name: value for name, value in values.items()}

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; everything is checked before anything changes
        (the counters are integers >= 0)."""
        if not isinstance(state, dict):
            raise TypeError(f"Invalid stats: {type(state).__name__} (an ISGDStats.state_dict())")
        missing = {"steps", "triggers", "extra_iters", "passes", "last"} - set(state)
        if missing:
            raise ValueError(
                f"Invalid stats: missing {sorted(missing)} (an ISGDStats.state_dict())"
            )
        counters = {
            name: check_counter(state.get(name, 0), f"stats.{name}")  # absent before the variant
            for name in (
                *("steps", "triggers", "extra_iters", "passes"),
                *("forward_only", "forward_passes", "nonfinite"),
            )
        }
        last = state["last"]
        known = {f.name for f in fields(StepRecord)}
        if not isinstance(last, dict) or not set(last) <= known:
            what = sorted(set(last) - known) if isinstance(last, dict) else type(last).__name__
            raise ValueError(f"Invalid stats.last: {what} (the fields of a StepRecord)")
        for name, value in counters.items():
            setattr(self, name, value)
        self.last = StepRecord(**last)
