"""ISGD's ``torch.optim`` side: the base optimizer it wraps, its hyper-parameters in the shared
``param_groups``, and its ``state_dict`` in torch's shape — the plumbing torch's optimizers leave
to their ``Optimizer`` base class, kept here so that :mod:`isgd.optim` holds the paper's method:
the parameters of all groups, and the state-initialising step ``torch.distributed.checkpoint``
runs (:meth:`WrappedOptimizer._initialising_state`) too.

ISGD's hyper-parameters (but the window, the chart's) ride in ``defaults`` and in every parameter
group, beside the base's, as ``lr`` does, and a scheduler may anneal ``sigma_factor`` as it does
``lr``. They are optimizer-wide: every group carries the same values, read from the first.

``state_dict()`` is torch's ``{"state", "param_groups"}`` (the base's state, which ``opt.state``
is too) plus ``"isgd": {"chart", "stats"}``; the first group carries the same object under
``"isgd_state"``, because ``torch.distributed.checkpoint``'s ``get/set_optimizer_state_dict`` and
``FullyShardedDataParallel.optim_state_dict`` keep only ``state`` and ``param_groups`` (the live
first group holds the key too, ``None``: the flattened form of those helpers keeps only the keys
the live groups have). :meth:`WrappedOptimizer.load_state_dict` reads either place, and the
layout before isgd 0.2, ``{"base", "chart", "stats", "isgd"}``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import LBFGS, Optimizer

from isgd._checks import check_hyper_parameters, check_lr
from isgd.collective import local
from isgd.spc import LossControlChart, check_same_window, check_window
from isgd.stats import ISGDStats

__all__ = ["STATE_KEY", "Hyper", "WrappedOptimizer"]

#: the key of ISGD's own state (the chart, the counters) in the first parameter group
STATE_KEY = "isgd_state"
#: isgd < 0.2 saved the hyper-parameters under these names (``"window"``: the chart's)
_PRE_0_2_NAMES = {"eps": "isgd_eps"}


class Hyper:
    """One of ISGD's hyper-parameters: optimizer-wide, carried by every parameter group (as
    torch's groups carry ``lr``) and read from the first."""

    def __init__(self, key: str | None = None) -> None:
        self.key = key  # the group key, if not the name

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = self.key or name

    def __get__(self, opt: Any, owner: type | None = None) -> Any:
        return self if opt is None else opt.param_groups[0][self.name]


class WrappedOptimizer(Optimizer):
    """The base class of :class:`isgd.ISGD`: a base optimizer built from its class, sharing its
    ``param_groups``; the hyper-parameters :attr:`hyper_parameters` in every group; the chart
    and the counters saved beside torch's state; the window, given or set once by
    :meth:`set_window`."""

    #: the hyper-parameters every group carries (a subclass may add its own)
    hyper_parameters: tuple[str, ...] = ()
    base_optimizer: Optimizer
    chart: LossControlChart
    stats: ISGDStats
    _window_set = False  # ISGD(window=None) until set_window()

    def _init_chart(self, window: int | None, sigma_factor: float) -> None:
        """The chart of ``window`` losses; ``None``: set later by :meth:`set_window` (until then
        an empty chart of 2 stands in, and :meth:`_begin_step` refuses to step)."""
        self.chart = LossControlChart(2 if window is None else window, sigma_factor)
        self._window_set = window is not None

    @property
    def window(self) -> int | None:
        """Batches per epoch :math:`n_b`, the chart's length; ``None`` until :meth:`set_window`
        for ``ISGD(window=None)``."""
        return self.chart.window if self._window_set else None

    def set_window(self, n: int) -> None:
        """Set the window (batches per epoch) of an ``ISGD(window=None)`` once the stack knows
        the epoch, before the first step (integrations call it at fit start). Checked as the
        constructor's ``window``; while the chart is empty it may replace any window, after
        that only the same value is accepted (the window is structural)."""
        n = check_window(n)
        if self._window_set and n == self.chart.window:
            return
        if self.chart.count or self.chart.nonfinite or self.stats.steps:
            raise ValueError(
                f"Invalid window: set_window({n}) after {self.stats.steps} steps with "
                f"window={self.window} (the window is structural: set it before the first step)"
            )
        self.chart = LossControlChart(n, self.chart.sigma_factor)
        self._window_set = True

    def _params(self) -> list[Tensor]:
        """Every parameter of every group, in order."""
        return [p for group in self.param_groups for p in group["params"]]

    def _grads(self) -> list[Tensor]:
        return [p.grad for p in self._params() if p.grad is not None]

    def _initialising_state(self) -> bool:
        """A bare ``step()`` with no ``observe()`` before it, every ``lr`` 0 and every gradient
        zero: what ``torch.distributed.checkpoint`` runs to make the base's state exist before it
        reads or loads it (``_init_optim_state``). It is the base's step: it creates that state
        and changes nothing else. Any other bare step without ``observe()`` is refused."""
        if any(float(group.get("lr", 1.0)) != 0.0 for group in self.param_groups):
            return False
        return not any(bool(local(g).any()) for g in self._grads())

    def _begin_step(self) -> None:
        """At each step's start: the window must be set; and ``_opt_called`` is marked as torch's
        LR-scheduler hook on ``step`` does (the closure-free form steps the base optimizer, not
        this one, and the scheduler would warn of a ``step()`` it never saw)."""
        if not self._window_set:
            raise RuntimeError(
                "ISGD(window=None): call opt.set_window(len(train_loader)) before the first "
                "step, or pass window=..."
            )
        self._opt_called = True

    def _hyper_from(
        self, base_optimizer: type[Optimizer], given: dict[str, Any], base_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        """Check the base optimizer class and the hyper-parameters (``given``, and a subclass's,
        popped from ``base_kwargs``); return them normalised."""
        if isinstance(base_optimizer, Optimizer):
            cls = type(base_optimizer)
            name = cls.__name__ if getattr(torch.optim, cls.__name__, None) is cls else ""
            path = f"torch.optim.{name}" if name else f"{cls.__module__}.{cls.__qualname__}"
            raise TypeError(
                f"Invalid base_optimizer: the class, not an instance ({cls.__name__}): ISGD "
                f"builds it from its hyper-parameters, ISGD(params, {path}, lr=...)"
            )
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer)):
            raise TypeError(
                f"Invalid base_optimizer: {base_optimizer!r} (must be a torch.optim.Optimizer "
                "subclass such as torch.optim.SGD, not an instance)"
            )
        if issubclass(base_optimizer, WrappedOptimizer) or base_optimizer is LBFGS:
            raise TypeError(f"Invalid base_optimizer: {base_optimizer.__name__} cannot be wrapped")
        if "lower_quantile" in base_kwargs and "lower_quantile" not in self.hyper_parameters:
            raise TypeError(
                "Invalid argument: lower_quantile (the forward-only variant, not the paper's "
                "method, is isgd.forward_only.ForwardOnlyISGD)"
            )
        check_lr(base_kwargs.get("lr"))
        given |= {k: base_kwargs.pop(k) for k in self.hyper_parameters if k in base_kwargs}
        return self._check_hyper(given)

    def _wrap(
        self,
        params: Any,
        base_optimizer: type[Optimizer],
        base_kwargs: dict[str, Any],
        hyper: dict[str, Any],
    ) -> None:
        """Build the base optimizer over ``params`` and share its groups."""
        super().__init__(params, {**base_kwargs, **hyper})
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        # One list of groups for both: LR schedulers, zero_grad and add_param_group see the same;
        # one state too (torch.distributed.checkpoint reads and initialises opt.state).
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.param_groups[0][STATE_KEY] = None  # filled by state_dict() (module docstring)
        self.defaults = {**self.base_optimizer.defaults, **hyper}
        self._check_groups(self.param_groups)

    def state_dict(self) -> dict[str, Any]:
        """torch's ``{"state", "param_groups"}`` (the base optimizer's, ISGD's hyper-parameters in
        the groups) and ``"isgd": {"chart", "stats"}``, also in the first group as
        ``"isgd_state"`` (the module docstring says why): enough to resume bit-identically."""
        state = self.base_optimizer.state_dict()
        chart = self.chart.state_dict()
        if not self._window_set:  # ISGD(window=None) before set_window(): no window yet
            chart["window"] = None
        isgd = {"chart": chart, "stats": self.stats.state_dict()}
        state["isgd"] = state["param_groups"][0][STATE_KEY] = isgd  # one object, two places
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output. The whole state is checked before anything
        changes (the base optimizer's by ``torch.optim``). The window is structural: a state
        saved with another window is refused. The saved hyper-parameters win over the
        constructor's, as ``param_groups``' do in ``torch.optim``. An ``ISGD(window=None)`` whose
        window is not set yet takes the saved one; a state saved before its window was set (an
        empty chart) fits any window."""
        if not isinstance(state_dict, dict):
            raise TypeError(
                f"Invalid state_dict: {type(state_dict).__name__} (an ISGD.state_dict())"
            )
        if "base" in state_dict:
            state_dict = self._from_pre_0_2(state_dict)
        groups = state_dict.get("param_groups")
        isgd = state_dict.get("isgd")
        if isgd is None and isinstance(groups, list) and groups and isinstance(groups[0], dict):
            isgd = groups[0].get(STATE_KEY)  # through torch.distributed.checkpoint
        missing = {"state", "param_groups"} - set(state_dict)
        if missing or not isinstance(isgd, dict) or {"chart", "stats"} - set(isgd):
            raise ValueError(
                f"not an ISGD state_dict: missing {sorted(missing) or ['isgd.chart/stats']} (a "
                "plain optimizer's state_dict goes to ISGD.base_optimizer.load_state_dict)"
            )
        chart_state, window, adopt = isgd["chart"], self.chart.window, False
        if isinstance(chart_state, dict) and chart_state.get("window") is None:
            if not chart_state.get("losses"):  # saved by an ISGD(window=None) before set_window
                chart_state = {**chart_state, "window": window}
        elif isinstance(chart_state, dict) and not self._window_set:
            window, adopt = check_window(chart_state["window"]), True  # this one's is not set
        elif isinstance(chart_state, dict):
            check_same_window(chart_state["window"], window, "this optimizer")
        LossControlChart(window).load_state_dict(chart_state)  # checks, changes nothing
        ISGDStats().load_state_dict(isgd["stats"])  # the same
        if not isinstance(groups, list) or not groups or not isinstance(groups[0], dict):
            raise ValueError("Invalid param_groups: a non-empty list of dicts (torch's layout)")
        hyper = self._check_groups(groups)
        base = {k: v for k, v in state_dict.items() if k != "isgd"}
        base["param_groups"] = [  # ISGD's state stays out of the live groups
            {k: v for k, v in g.items() if k != STATE_KEY} if isinstance(g, dict) else g
            for g in groups
        ]
        self.base_optimizer.load_state_dict(base)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.param_groups[0][STATE_KEY] = None
        for group in self.param_groups:
            group.update(hyper)  # normalised: numpy.int64(5) → 5
        if adopt:
            self._init_chart(window, hyper["sigma_factor"])
        self.chart.load_state_dict(chart_state)
        self.chart.sigma_factor = hyper["sigma_factor"]
        self.stats.load_state_dict(isgd["stats"])

    def _from_pre_0_2(self, old: dict[str, Any]) -> dict[str, Any]:
        """isgd < 0.2's ``{"base", "chart", "stats", "isgd": {hyper-parameters}}`` in this
        layout, for :meth:`load_state_dict` to check: the base's state, its groups with the
        saved hyper-parameters (this optimizer's where the file lacks one, as isgd < 0.2 read
        it; its ``lower_quantile`` 0 was the paper's method)."""
        base, saved = old["base"], old.get("isgd", {})
        if not isinstance(base, dict) or not isinstance(saved, dict):
            raise ValueError(
                "Invalid state_dict: {base, chart, stats, isgd} (isgd < 0.2's layout) with "
                f"base a {type(base).__name__} and isgd a {type(saved).__name__} (two dicts)"
            )
        hyper = {k: self.param_groups[0][k] for k in self.hyper_parameters}
        renamed = {_PRE_0_2_NAMES.get(k, k): v for k, v in saved.items()}
        quantile = renamed.pop("lower_quantile", 0.0)
        if quantile and "lower_quantile" not in hyper:
            raise ValueError(
                f"Invalid state_dict: saved with lower_quantile={quantile!r}, the forward-only "
                "variant: load it into isgd.forward_only.ForwardOnlyISGD"
            )
        if quantile:
            hyper["lower_quantile"] = quantile
        hyper |= {k: v for k, v in renamed.items() if k in hyper}
        groups = base.get("param_groups")
        if isinstance(groups, list):
            groups = [{**g, **hyper} if isinstance(g, dict) else g for g in groups]
        isgd = {"chart": old.get("chart"), "stats": old.get("stats")}
        return {"state": base.get("state", {}), "param_groups": groups, "isgd": isgd}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group, as for any ``torch.optim`` optimizer — also mid-training (the
        new parameters go to :meth:`_params_joined`). ISGD's hyper-parameters are the
        optimizer's: a group may only repeat them."""
        if isinstance(param_group, dict):
            check_lr(param_group.get("lr"))
        if not hasattr(self, "base_optimizer"):  # called by Optimizer.__init__
            super().add_param_group(param_group)
            return
        if isinstance(param_group, dict):
            param_group = {
                **{k: self.param_groups[0][k] for k in self.hyper_parameters},
                **param_group,
            }
            self._check_groups([self.param_groups[0], param_group])
        self.base_optimizer.add_param_group(param_group)
        self._params_joined(self.param_groups[-1]["params"])

    def _params_joined(self, params: list[Tensor]) -> None:
        """Parameters joined by :meth:`add_param_group` after construction."""

    def _check_groups(self, groups: list[dict[str, Any]]) -> dict[str, Any]:
        """The hyper-parameters the groups carry, checked: present, valid, the same in each."""
        first = groups[0]
        missing = [k for k in self.hyper_parameters if k not in first]
        if missing:
            raise ValueError(
                f"Invalid param_groups: missing {missing} (ISGD's hyper-parameters; a plain "
                "optimizer's state_dict goes to ISGD.base_optimizer.load_state_dict)"
            )
        hyper = self._check_hyper({k: first[k] for k in self.hyper_parameters})
        for i, group in enumerate(groups[1:], 1):
            for k in self.hyper_parameters:
                if k not in group or group[k] != first[k]:
                    raise ValueError(
                        f"Invalid param_groups[{i}]: {k}={group.get(k)!r} where the first group "
                        f"has {first[k]!r} (ISGD's hyper-parameters are optimizer-wide)"
                    )
        return hyper

    def _check_hyper(self, values: dict[str, Any]) -> dict[str, Any]:
        """The hyper-parameters checked and normalised; a subclass checks those it adds."""
        return check_hyper_parameters(values)

    def __repr__(self) -> str:
        hyper = ", ".join(f"{k}={self.param_groups[0][k]!r}" for k in self.hyper_parameters)
        return (
            f"{type(self).__name__}(base={type(self.base_optimizer).__name__}, "
            f"window={self.window}, {hyper}, groups={self.base_optimizer.param_groups!r})"
        )
