"""BatchNorm's running statistics, put back after passes that must leave no trace in them.

The extra iterations revisit one batch; counting it again in the running statistics would skew
them toward it (``docs/algorithm.md``). ``ISGD(freeze_bn_stats=True)`` runs every extra pass
inside :class:`frozen_batchnorm_stats`. A loop uses the same guard for a step whose fate is known
only after its forward pass — a skipped (non-finite) or forward-only step leaves the statistics as
they were, a regular one keeps them::

    with isgd.frozen_batchnorm_stats() as stats:
        opt.step(closure)
        if not (opt.stats.last.skipped or opt.stats.last.forward_only):
            stats.keep()  # an update was applied: this batch counts
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["frozen_batchnorm_stats"]


class frozen_batchnorm_stats:  # a context manager, named like torch.no_grad
    """Inside this block, BatchNorm/InstanceNorm running statistics end as they started —
    unless :meth:`keep` was called in it.

    Every normalisation module that runs in training mode with ``track_running_stats`` has its
    ``running_mean``, ``running_var`` and ``num_batches_tracked`` saved when it first runs in the
    block and restored on exit (an exception included). Batch statistics are still used for
    normalisation, exactly as in the regular pass. Implemented with a global forward pre-hook,
    so it needs no model reference: the first call of a module not seen yet saves every
    normalisation module *under* it, so a model compiled with ``torch.compile`` (whose
    submodules run inside the graph, without hooks) is covered through the one call of its
    ``OptimizedModule``. Blocks nest (ISGD's extra passes inside a loop's step).

    Args:
        enabled: ``False`` makes the block do nothing (no hook, no copies), as in
            ``torch.autocast(enabled=...)``, for loops that need the guard only in some runs.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.restore = enabled  #: what the exit does; :meth:`keep` sets it to False
        self._seen: set[int] = set()
        self._saved: list[tuple[Tensor, Tensor]] = []
        self._handle: Any = None

    def keep(self) -> None:
        """Let the statistics this block has computed stay: the exit restores nothing (decided
        inside the block, e.g. once the forward pass showed the step is a regular one)."""
        self.restore = False

    def __enter__(self) -> frozen_batchnorm_stats:
        if self.enabled:
            self._handle = torch.nn.modules.module.register_module_forward_pre_hook(self._save)
        return self

    def _save(self, module: torch.nn.Module, _args: Any) -> None:
        if id(module) in self._seen:
            return
        for sub in module.modules():
            if id(sub) in self._seen:
                continue
            self._seen.add(id(sub))
            if isinstance(sub, torch.nn.modules.batchnorm._NormBase) and sub.track_running_stats:
                buffers = (sub.running_mean, sub.running_var, sub.num_batches_tracked)
                self._saved.extend((b, b.detach().clone()) for b in buffers if b is not None)

    def __exit__(self, *_exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.restore and self._saved:
            with torch.no_grad():
                for buffer, copy in self._saved:
                    buffer.copy_(copy)
        self._seen.clear()
        self._saved.clear()
