"""The optimizer of an arm, from the configuration: every arm is one :class:`isgd.ISGD`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from isgd.optim import ISGD
from isgd.training import relatives
from isgd.training.config import TrainConfig

__all__ = ["build_optimizer"]


def build_optimizer(
    config: TrainConfig,
    model: nn.Module,
    n_b: int,
    *,
    data_parallel: bool = False,
    total: int | None = None,
) -> ISGD:
    """ISGD around the base that ``config.optimizer`` names (``METHOD-BASE``, the method alone
    over SGD); ``sgd``, ``nesterov``, ``adam`` and ``adamw`` are ``ISGD(base,
    max_extra_iters=0)``, the base optimizer exactly (its chart only records), as are the
    relatives' (:mod:`isgd.training.relatives`: SkipStep's rule, the random forward-only steps of
    ``random_skip_steps`` over the run's ``total`` steps). ``data_parallel``: decisions read the
    process-group mean loss (ISGD's ``sync_loss``)."""
    family = relatives.base_family(config.optimizer)[1]
    base: type[torch.optim.Optimizer]
    kwargs: dict[str, Any]
    if family in ("adam", "adamw"):
        base = torch.optim.Adam if family == "adam" else torch.optim.AdamW
        kwargs = dict(lr=config.lr, weight_decay=config.weight_decay)
    else:
        base = torch.optim.SGD
        kwargs = dict(
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            nesterov=family == "nesterov",
        )
    optimizer: type[ISGD] = ISGD
    if config.lower_quantile > 0:  # the forward-only variant, not the paper's method
        from isgd.forward_only import ForwardOnlyISGD

        optimizer, kwargs["lower_quantile"] = ForwardOnlyISGD, config.lower_quantile
    relative = relatives.optimizer_class(config, total, data_parallel)
    if relative is not None:
        optimizer, extra = relative
        kwargs |= extra
    return optimizer(
        model.parameters(),
        base,
        window=config.chart_window(n_b),
        sigma_factor=config.sigma_factor,
        max_extra_iters=config.max_extra_iters if config.uses_isgd else 0,
        eps=config.eps,
        inner_solver=config.inner_solver,
        nonfinite=config.nonfinite,
        freeze_bn_stats=config.freeze_bn_stats,
        diagnostics=True,  # steps.jsonl records momentum_ratio
        sync_loss=data_parallel,
        **kwargs,
    )
