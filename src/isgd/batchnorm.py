"""The BatchNorm guard of ISGD's extra passes: running statistics end a block as they began.

The extra iterations revisit one batch; counting it again in the running statistics would skew
them toward it (``docs/algorithm.md``). ``ISGD(freeze_bn_stats=True)`` runs every extra pass
inside :func:`frozen_batchnorm_stats`; a loop may use it for passes of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["frozen_batchnorm_stats"]


@contextlib.contextmanager
def frozen_batchnorm_stats() -> Iterator[None]:
    """Inside this block, BatchNorm/InstanceNorm running statistics end as they started.

    Every normalisation module that runs in training mode with ``track_running_stats`` has its
    ``running_mean``, ``running_var`` and ``num_batches_tracked`` saved and restored on exit.
    Batch statistics are still used for normalisation, exactly as in the regular pass.
    Implemented with a global forward pre-hook, so it needs no model reference: the first call of
    a module not seen yet saves every normalisation module *under* it, so a model compiled with
    ``torch.compile`` (whose submodules run inside the graph, without hooks) is covered through
    the one call of its ``OptimizedModule``.
    """
    seen: set[int] = set()
    saved: list[tuple[Tensor, Tensor]] = []

    def hook(module: torch.nn.Module, _args: Any) -> None:
        if id(module) in seen:
            return
        for sub in module.modules():
            if id(sub) in seen:
                continue
            seen.add(id(sub))
            if isinstance(sub, torch.nn.modules.batchnorm._NormBase) and sub.track_running_stats:
                buffers = (sub.running_mean, sub.running_var, sub.num_batches_tracked)
                saved.extend((b, b.detach().clone()) for b in buffers if b is not None)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
        with torch.no_grad():
            for buffer, copy in saved:
                buffer.copy_(copy)
