"""ISGD in Lightning: :class:`ISGDCallback` checks the set-up and logs ISGD's statistics.

Lightning's automatic optimisation already calls ``optimizer.step(closure=...)`` with a closure
that runs ``training_step``, ``zero_grad`` and ``backward`` — exactly the contract ISGD needs — so
ISGD returned from ``configure_optimizers`` works as it is in fp32 and ``bf16-mixed``, on one
process, under ``strategy="ddp"`` (ISGD judges the process-group mean loss, so every rank takes
the same decisions) and under ``ModelParallelStrategy`` with FSDP2's ``fully_shard`` applied in
``configure_model`` (DTensor parameters; Lightning's distributed checkpoints carry ISGD's state).
What the callback adds:

- **``precision="16-mixed"``** (a GradScaler): Lightning's own ``MixedPrecision`` runs the
  closure once, then ``GradScaler.step`` without it, so the callback puts
  :class:`ISGDMixedPrecision` in its place at setup (same scaler), which hands the closure and the
  scaler to ``ISGD.step`` — automatic and manual optimisation alike;
- **the window**: ``ISGD(window=None)`` is set to ``trainer.num_training_batches`` (the
  optimizer steps of an epoch) at train start; a window the run cannot fill (larger than
  ``trainer.estimated_stepping_batches``) is warned about, in one line;
- **refusals at setup or fit start, in one line**, for the set-ups in which ISGD cannot be
  correct: ``accumulate_grad_batches > 1`` (Lightning's closure back-propagates only the last
  micro-batch, without zeroing), a GradScaler under any other precision plugin, and
  ``strategy="fsdp"`` (FSDP1, which Lightning runs only on GPUs: ``ModelParallelStrategy`` with
  ``fully_shard`` instead);
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
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import GradClipAlgorithmType
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.optim import Optimizer

from isgd.optim import ISGD

__all__ = ["ISGDCallback", "ISGDMixedPrecision"]


class ISGDMixedPrecision(MixedPrecision):
    """Lightning's ``16-mixed`` (a GradScaler) for ISGD: the closure and the scaler go to
    ``ISGD.step(closure, grad_scaler=scaler)``, then ``scaler.update()``.

    Lightning's ``MixedPrecision`` runs the closure once and then calls ``GradScaler.step``
    without it, which leaves ISGD nothing to re-run. Here, per optimizer step: the closure
    (``training_step``, ``zero_grad``, the scaled ``backward``); ``scaler.unscale_``; the
    ``on_before_optimizer_step`` hooks and Lightning's clipping, on unscaled gradients, as
    ``MixedPrecision`` does; ISGD's decision (inf on any rank skips the update) and, when
    triggered, the extra iterations — ISGD unscales and checks each, and the clipping applies to
    their gradients too (at ``gradient_clip_val`` × the scale, before ISGD unscales: the same
    clip). ``ISGDCallback`` installs it in place of ``precision="16-mixed"``'s plugin; passing
    ``plugins=[ISGDMixedPrecision("16-mixed", "cuda")]`` does the same. Optimizers other than
    ISGD take ``MixedPrecision``'s path.
    """

    def optimizer_step(  # type: ignore[override]
        self,
        optimizer: Any,
        model: pl.LightningModule,
        closure: Callable[[], Any],
        **kwargs: Any,
    ) -> Any:
        scaler = self.scaler
        if scaler is None or not isinstance(optimizer, ISGD):
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)

        def isgd_closure() -> Any:
            loss = closure()
            if not optimizer.in_extra_iteration:  # the regular pass: MixedPrecision's order
                scaler.unscale_(optimizer)  # ISGD reads the found-inf flag it records
                self._after_closure(model, optimizer)  # type: ignore[arg-type]
            elif model.automatic_optimization and model.trainer.gradient_clip_val:
                clip = float(model.trainer.gradient_clip_val) * scaler.get_scale()
                algorithm = model.trainer.gradient_clip_algorithm or GradClipAlgorithmType.NORM
                Precision.clip_gradients(self, optimizer, clip, algorithm)  # scaled ∇ψ′
            return loss

        result = optimizer.step(isgd_closure, grad_scaler=scaler, **kwargs)
        scaler.update()
        return result

    def clip_gradients(
        self,
        optimizer: Optimizer,
        clip_val: int | float = 0.0,
        gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM,
    ) -> None:
        # MixedPrecision refuses clipping for optimizers that unscale in step(); ISGD does, and
        # the gradients are unscaled here already (see optimizer_step)
        Precision.clip_gradients(self, optimizer, clip_val, gradient_clip_algorithm)


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

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if isinstance(trainer.strategy, FSDPStrategy):
            raise MisconfigurationException(
                "ISGD does not run under Lightning's FSDPStrategy (FSDP1): use "
                "ModelParallelStrategy and apply torch.distributed.fsdp.fully_shard in "
                "configure_model (FSDP2; docs/integrations.md#sharded-training), or strategy='ddp'"
            )
        plugin = trainer.strategy.precision_plugin
        if type(plugin) is MixedPrecision and plugin.scaler is not None:  # precision="16-mixed"
            precision: Any = plugin.precision  # "16-mixed"
            isgd_plugin = ISGDMixedPrecision(precision, plugin.device, scaler=plugin.scaler)
            trainer.strategy.precision_plugin = isgd_plugin

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._optimizers = [opt for opt in trainer.optimizers if isinstance(opt, ISGD)]
        if not self._optimizers:
            raise MisconfigurationException(
                "ISGDCallback: configure_optimizers returned no isgd.ISGD optimizer"
            )
        plugin = trainer.precision_plugin
        scaler = getattr(plugin, "scaler", None)
        if scaler is not None and not isinstance(plugin, ISGDMixedPrecision):
            raise MisconfigurationException(
                f"ISGD cannot run under {type(plugin).__name__}, which steps its GradScaler "
                "without the closure: use plugins=[isgd.integrations.lightning."
                "ISGDMixedPrecision('16-mixed', 'cuda')] (or precision='16-mixed' with "
                "ISGDCallback, which installs it)"
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

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the loaders exist now: num_training_batches is the optimizer steps of an epoch
        # (accumulate_grad_batches > 1 is refused above)
        per_epoch = trainer.num_training_batches
        for opt in self._optimizers:
            if opt.window is None:
                if not math.isfinite(per_epoch) or per_epoch < 2:
                    raise MisconfigurationException(
                        f"ISGD(window=None) needs batches per epoch >= 2 to take the window "
                        f"from, and this Trainer has {per_epoch}: pass ISGD(window=...)"
                    )
                opt.set_window(int(per_epoch))
            total, window = trainer.estimated_stepping_batches, opt.window
            if window is not None and math.isfinite(total) and window > total:
                rank_zero_warn(
                    f"ISGD's window is {window} but this run has {int(total)} optimizer "
                    "steps: the control chart never fills, so ISGD never triggers (the window "
                    "is the optimizer steps of one epoch; window=None takes it from the Trainer)"
                )

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
