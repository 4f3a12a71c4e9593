"""ISGD in the Hugging Face ``Trainer``: :class:`ISGDTrainer`.

The Trainer owns ``backward()``: it back-propagates every micro-batch of an optimizer step
(``gradient_accumulation_steps`` of them), clips, then calls ``optimizer.step()`` with no closure,
then steps the LR schedule. ISGD's extra iterations need the step's batch again, so
:class:`ISGDTrainer` keeps the micro-batches of the step in progress and, when ISGD triggers,
replays them — through the Trainer's own ``training_step``, so the loss, its scaling for
accumulation, ``accelerator.backward`` and DDP's gradient all-reduce are the Trainer's. Per
optimizer step:

1. the Trainer's micro-batches: forward/backward, their losses summed into ψ (the Trainer's
   reported loss for the step);
2. the Trainer's clipping (``max_grad_norm``) of ∇ψ;
3. ``ISGD.observe(ψ)`` (the process-group mean under DDP), then the Trainer's
   ``optimizer.step()``: ISGD's closure-free step, the base update (skipped with the scaler's
   inf, as the Trainer expects);
4. on a triggered step, up to ``max_extra_iters`` times: replay the micro-batches (ψ′, ∇ψ′;
   BatchNorm statistics frozen), stop once ψ′ ≤ limit, clip ∇ψ′ to ``max_grad_norm``, form ∇φ,
   apply the base update;
5. the Trainer's LR schedule step — once per regular step, not after a step the scaler
   skipped — and its logging, to which ISGD's statistics are added (``ISGDStats.metrics()``:
   the names and meanings ``isgd train`` and Lightning's ``ISGDCallback`` log too, e.g.
   ``isgd/triggers``, ``isgd/extra_iters``).

fp16 (accelerate's ``GradScaler``): the regular pass's found-inf flag (the scaler's, from the
Trainer's unscale before clipping) goes to ``observe`` with ψ, so an inf on any rank makes the
step a skipped one everywhere; the replays unscale with ``ISGD.unscale_`` (an inf ends them);
and the scaler's ``update()``, which accelerate's optimizer wrapper would call right after the
base update, waits until the replays are done and reads the OR of every pass's flag, as
``ISGD.step(closure, grad_scaler=...)`` does (:mod:`isgd.amp`).

The training batches come in ISGD's fixed cycle (one permutation, seeded by ``args.seed``, the same
every epoch) unless ``fixed_cycle=False``. Pass the optimizer in: ``optimizers=(isgd.ISGD(...),
None)``; ``window=None`` takes the optimizer steps per epoch from the Trainer (a given window
the run cannot fill is warned about). FSDP and DeepSpeed are refused when the Trainer is built,
in one line (ISGD's sharded training is a loop of one's own: ``docs/integrations.md``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType, parse_flag_from_env
from torch.utils.data import Sampler
from transformers import Trainer, TrainerCallback

from isgd import amp
from isgd.optim import ISGD

__all__ = ["ISGDTrainer"]

log = logging.getLogger(__name__)

_SHARDED = (
    "ISGDTrainer supports one process and DDP, not {engine}: the Trainer builds the optimizer "
    "inside the sharding engine and owns its step; for sharded training run ISGD in a loop of "
    "your own with FSDP2's fully_shard (docs/integrations.md#sharded-training)"
)


def _refuse_sharding(args: Any) -> None:
    """FSDP or DeepSpeed asked for by the ``TrainingArguments`` or by ``accelerate launch``:
    refused in one line, before the Trainer refuses the optimizer passed in, for another
    reason."""
    for engine, asked in (
        ("FSDP", bool(getattr(args, "fsdp", None)) or parse_flag_from_env("ACCELERATE_USE_FSDP")),
        ("DeepSpeed", bool(getattr(args, "deepspeed", None))
         or parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")),
    ):  # fmt: skip
        if asked:
            raise ValueError(_SHARDED.format(engine=engine))


class ISGDTrainer(Trainer):
    """A ``transformers.Trainer`` that runs ISGD's extra iterations (see the module docstring).

    Args:
        *args, **kwargs: as for ``Trainer``; ``optimizers=(isgd.ISGD(...), scheduler or None)``.
        fixed_cycle: visit the training samples in one fixed order every epoch, as ISGD's
            control chart assumes (default True); False keeps the Trainer's shuffling.
    """

    def __init__(self, *args: Any, fixed_cycle: bool = True, **kwargs: Any) -> None:
        _refuse_sharding(kwargs.get("args", args[1] if len(args) > 1 else None))
        super().__init__(*args, **kwargs)
        self.fixed_cycle = fixed_cycle
        self._isgd_micro: list[tuple[Any, Any]] = []  # the step's micro-batches
        self._isgd_loss: torch.Tensor | None = None  # their summed loss: ψ
        self._isgd_model: torch.nn.Module | None = None  # the wrapped model the loop trains
        self._isgd_replaying = False
        self.add_callback(_ISGDSteps(self))

    @property
    def isgd(self) -> ISGD:
        """The ISGD optimizer under the Trainer's (accelerate's) wrapper."""
        opt: Any = self.optimizer
        while not isinstance(opt, ISGD) and hasattr(opt, "optimizer"):
            opt = opt.optimizer
        if not isinstance(opt, ISGD):
            raise ValueError(
                f"ISGDTrainer needs an isgd.ISGD optimizer, got {type(opt).__name__}: pass "
                "optimizers=(isgd.ISGD(model.parameters(), window=..., lr=...), None)"
            )
        return opt

    def _get_train_sampler(self, train_dataset: Any = None) -> Sampler | None:
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if not self.fixed_cycle or dataset is None or not hasattr(dataset, "__len__"):
            return super()._get_train_sampler(train_dataset)
        return _FixedOrder(len(dataset), seed=self.args.seed)

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        # transformers 5: after accelerator.prepare, before the LR scheduler wraps the wrapper's
        # step; under fp16 ISGD takes over accelerate's optimizer step (_ISGDTrainerOptimizer)
        _hand_over(self.optimizer)
        return super().create_scheduler(num_training_steps, optimizer)

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not self._isgd_replaying:
            self._isgd_model = model
            self._isgd_micro.append((inputs, num_items_in_batch))
            self._isgd_loss = loss if self._isgd_loss is None else self._isgd_loss + loss
        return loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self.optimizer is not None:
            logs = {**logs, **self.isgd.stats.metrics()}
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ the ISGD parts of a step
    def _isgd_observe(self) -> None:
        """After the Trainer's clipping, before its optimizer.step(): judge ψ."""
        if self._isgd_loss is None:
            raise RuntimeError("ISGDTrainer: an optimizer step without a training_step")
        opt = self.isgd
        # fp16: the Trainer's clipping unscaled the gradients (GradScaler.unscale_, which records
        # the found-inf flag); the flag travels with ψ, so every rank skips alike
        found_inf = amp.scaler_found_inf(self.accelerator.scaler, opt)
        opt.observe(self._isgd_loss, found_inf=found_inf)

    def _isgd_after_step(self) -> None:
        """After the base update, before the LR schedule: the extra iterations, if triggered,
        then (fp16) the scaler's update for the whole step."""
        try:
            self._isgd_extra_iterations()
        finally:
            if isinstance(self.optimizer, _ISGDTrainerOptimizer):
                self.optimizer.update_scaler()

    def _isgd_extra_iterations(self) -> None:
        """The extra iterations of a triggered step: replays of the step's micro-batches."""
        opt, model = self.isgd, self._isgd_model
        micro, self._isgd_micro, self._isgd_loss = self._isgd_micro, [], None
        if model is None or not opt.stats.last.triggered:
            return
        if self.accelerator.optimizer_step_was_skipped:
            return
        scaler = self.accelerator.scaler
        for _ in range(opt.max_extra_iters):
            model.zero_grad()
            with opt.extra_pass():
                psi = self._isgd_replay(model, micro)
            found_inf = None if scaler is None else opt.unscale_(scaler)
            if not opt.above_limit(psi, found_inf=found_inf):
                break
            if self.args.max_grad_norm and self.args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)
            opt.subproblem_grad_()
            opt.subproblem_step_()  # the base optimizer's step unless inner_solver says otherwise

    def _isgd_replay(self, model: torch.nn.Module, micro: list[tuple[Any, Any]]) -> torch.Tensor:
        """ψ′ and ∇ψ′: the step's micro-batches again, through the Trainer's training_step (DDP
        all-reduces the gradients at the last one, as in the regular pass)."""
        self._isgd_replaying = True
        try:
            total = None
            for i, (inputs, num_items) in enumerate(micro):
                last = i == len(micro) - 1
                with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                    loss = super().training_step(model, inputs, num_items)
                total = loss if total is None else total + loss
        finally:
            self._isgd_replaying = False
        if total is None:
            raise ValueError("ISGDTrainer: a step without micro-batches cannot be replayed")
        return total


class _ISGDSteps(TrainerCallback):
    """The Trainer's hooks around ``optimizer.step()``, handed to :class:`ISGDTrainer`."""

    def __init__(self, trainer: ISGDTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        opt = trainer.isgd  # refuses a non-ISGD optimizer, in one line
        sharded = (DistributedType.DEEPSPEED, DistributedType.FSDP)
        if trainer.accelerator.distributed_type in sharded:  # any other route to them
            engine = trainer.accelerator.distributed_type.value
            raise ValueError(_SHARDED.format(engine=engine))
        wrapper = trainer.optimizer
        _hand_over(wrapper)  # transformers 4 prepares the optimizer after create_scheduler
        if getattr(wrapper, "scaler", None) is not None and not _takes_scaler(wrapper):
            raise RuntimeError(  # create_scheduler() hands it over: an override skipped it
                "ISGDTrainer: under fp16 ISGD takes over accelerate's optimizer step in "
                f"create_scheduler(), and this Trainer's optimizer.step() "
                f"({type(wrapper).__name__}) goes elsewhere: an override of create_scheduler "
                "must call super().create_scheduler()"
            )
        loader = kwargs.get("train_dataloader")
        per_epoch = None
        if loader is not None and hasattr(loader, "__len__"):
            n, k = len(loader), args.gradient_accumulation_steps
            per_epoch = max(1, n // k + int(n % k > 0))  # the Trainer's own count
        if opt.window is None:
            if per_epoch is None or per_epoch < 2:
                raise ValueError(
                    f"ISGD(window=None) needs optimizer steps per epoch >= 2 to take the window "
                    f"from, and this Trainer has {per_epoch or 'no epoch length'}: pass "
                    "ISGD(window=...)"
                )
            opt.set_window(per_epoch)
        elif per_epoch is not None and per_epoch != opt.window:
            log.warning(
                "ISGD's window is %d but an epoch has %d optimizer steps: the control chart "
                "covers %s one epoch (the paper's choice is one epoch; window=None takes it)",
                opt.window, per_epoch, "more than" if opt.window > per_epoch else "less than",
            )  # fmt: skip
        if 0 < state.max_steps < opt.window:
            log.warning(
                "ISGD's window is %d but this run has %d optimizer steps: the control chart "
                "never fills, so ISGD never triggers",
                opt.window, state.max_steps,
            )  # fmt: skip

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._isgd_observe()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._isgd_after_step()


def _hand_over(wrapper: Any) -> None:
    """Under fp16 (accelerate's optimizer wrapper with a GradScaler), ISGD steps the scaler:
    the wrapper becomes an :class:`_ISGDTrainerOptimizer`, the same object (accelerate's lists
    keep it)."""
    if type(wrapper) is AcceleratedOptimizer and wrapper.scaler is not None:
        wrapper.__class__ = _ISGDTrainerOptimizer


def _takes_scaler(wrapper: Any) -> bool:
    """The Trainer's ``optimizer.step()`` reaches :meth:`_ISGDTrainerOptimizer.step` (an LR
    scheduler made before the hand-over would call accelerate's own ``step``)."""
    step = getattr(wrapper, "step", None)
    return isinstance(wrapper, _ISGDTrainerOptimizer) and (
        getattr(step, "__func__", None) is _ISGDTrainerOptimizer.step
        or getattr(step, "__wrapped__", None) is _ISGDTrainerOptimizer.step
    )


class _ISGDTrainerOptimizer(AcceleratedOptimizer):
    """accelerate's optimizer wrapper around ISGD under fp16 (a ``GradScaler``), as
    :class:`ISGDTrainer` steps it: accelerate's own ``step`` hides the scaler from ISGD and calls
    ``scaler.update()`` at once, before the extra iterations, so that an inf in a replay would
    not back the scale off, and reports no skipped step to the LR schedule (ISGD is called
    either way). Here the Trainer's bare ``step()`` is ``ISGD.step(grad_scaler=scaler)`` (the
    base update, or none after an inf), and :meth:`update_scaler` runs after the replays."""

    optimizer: ISGD

    def step(self, closure: Any = None) -> Any:
        if not self.gradient_state.sync_gradients:  # as accelerate: no step mid-accumulation
            return None
        result = self.optimizer.step(closure, grad_scaler=self.scaler)
        self._is_overflow = self.optimizer.stats.last.skipped  # the Trainer's LR schedule reads it
        return result

    def update_scaler(self) -> None:
        """The step's ``scaler.update()``, with the found-inf flag of all its passes on all
        ranks (ISGD's decision: :func:`isgd.amp.share_found_inf`)."""
        opt, scaler = self.optimizer, self.scaler
        amp.share_found_inf(scaler, opt, opt.sync.last_inf)
        scaler.update()


class _FixedOrder(Sampler[int]):
    """One seeded permutation of ``range(n)``, the same every epoch (ISGD's fixed cycle)."""

    def __init__(self, n: int, seed: int) -> None:
        self.order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)
