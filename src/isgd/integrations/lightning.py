"""ISGD in Lightning: :class:`ISGDCallback` checks the set-up and logs ISGD's statistics.

Lightning's automatic optimisation already calls ``optimizer.step(closure=...)`` with a closure
that runs ``training_step``, ``zero_grad`` and ``backward`` — exactly the contract ISGD needs — so
ISGD returned from ``configure_optimizers`` works as it is in fp32 and ``bf16-mixed``, on one
process and under ``strategy="ddp"`` (ISGD judges the process-group mean loss, so every rank takes
the same decisions). What the callback adds:

- **refusals at fit start, in one line**, for the set-ups in which ISGD cannot be correct:
  ``precision="16-mixed"`` (Lightning runs the closure once, then ``GradScaler.step`` without
  it: no extra iteration could be scaled and checked) and ``accumulate_grad_batches > 1``
  (Lightning's closure back-propagates only the last micro-batch, without zeroing);
- **the step's own loss**: ``training_step`` runs again for every extra iteration, and its
  ``self.log`` calls would make the last extra pass's loss the step's (and bias epoch means);
  the callback drops ``log`` calls made during extra iterations;
- **ISGD's statistics** through the module's logger, every step: ``ISGDStats.metrics()``, the
  names and meanings ``isgd train`` and the Hugging Face ``ISGDTrainer`` log too — cumulative
  counters (``isgd/triggers``, ``isgd/extra_iters``, ``isgd/passes``, ``isgd/trigger_rate``,
  ...) and the last step's ``isgd/loss`` (the regular ψ) and ``isgd/limit``.

Example::

    trainer = L.Trainer(max_epochs=5, callbacks=[ISGDCallback()])
    trainer.fit(module)        # module.configure_optimizers returns isgd.ISGD(...)
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.plugins.precision import MixedPrecision

from isgd.optim import ISGD

__all__ = ["ISGDCallback"]


class ISGDCallback(pl.Callback):
    """Checks that ISGD can be correct in this Trainer, and logs its statistics.

    Args:
        prefix: the logged keys' prefix.
        drop_extra_pass_logs: drop the module's ``self.log`` calls made while ISGD re-runs
            ``training_step`` for an extra iteration (default True).
    """

    def __init__(self, prefix: str = "isgd/", drop_extra_pass_logs: bool = True) -> None:
        self.prefix = prefix
        self.drop_extra_pass_logs = drop_extra_pass_logs
        self._optimizers: list[ISGD] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._optimizers = [opt for opt in trainer.optimizers if isinstance(opt, ISGD)]
        if not self._optimizers:
            raise MisconfigurationException(
                "ISGDCallback: configure_optimizers returned no isgd.ISGD optimizer"
            )
        plugin = trainer.precision_plugin
        if isinstance(plugin, MixedPrecision) and plugin.scaler is not None:
            raise MisconfigurationException(
                "ISGD cannot run under precision='16-mixed': Lightning steps its GradScaler "
                "without the closure, so extra iterations could not be scaled and checked; use "
                "precision='bf16-mixed' (no GradScaler) or '32-true', or manual optimization "
                "calling opt.step(closure, grad_scaler=scaler)"
            )
        if pl_module.automatic_optimization and trainer.accumulate_grad_batches > 1:
            raise MisconfigurationException(
                f"ISGD cannot run with accumulate_grad_batches={trainer.accumulate_grad_batches}:"
                " Lightning's closure back-propagates only the last micro-batch, so extra "
                "iterations would not see the batch; use a larger batch_size, or manual "
                "optimization with every micro-batch inside the closure"
            )
        if self.drop_extra_pass_logs:
            original, optimizers = pl_module.log, self._optimizers

            def log(*args: Any, **kwargs: Any) -> None:
                if not any(opt.in_extra_iteration for opt in optimizers):
                    original(*args, **kwargs)

            pl_module.log = log  # type: ignore[method-assign]

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        for i, opt in enumerate(self._optimizers):
            prefix = self.prefix if len(self._optimizers) == 1 else f"{self.prefix}{i}/"
            values = opt.stats.metrics(prefix)
            pl_module.log_dict(
                {k: float(v) for k, v in values.items() if math.isfinite(v)},
                on_step=True,
                on_epoch=False,
                batch_size=1,  # one value per step; identical on every rank (no sync needed)
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.__dict__.pop("log", None)  # the class's log again
