"""ISGD — Inconsistent Stochastic Gradient Descent (Wang, Yang, Min, Chakradhar, 2017) for PyTorch.

>>> import isgd
>>> opt = isgd.ISGD(model.parameters(), lr=0.01, momentum=0.9, window=n_b)  # doctest: +SKIP


The library is this package's top level and imports torch only: :mod:`isgd.optim` (ISGD, the
paper's method), :mod:`isgd.closures` (a closure from the loss), :mod:`isgd.solvers` (its inner
solvers), :mod:`isgd.amp` (GradScaler), :mod:`isgd.batchnorm`, :mod:`isgd.forward_only` (a
variant), :mod:`isgd.spc` (the control chart), :mod:`isgd.sampler` (fixed-cycle batches, one
process or split across ranks), :mod:`isgd.collective` (the all-reduce that makes ranks decide
alike) and :mod:`isgd.errors`.
Everything else — data, training, comparisons, reports, the command line — is the application
built on it (``docs/design.md``); ``import isgd`` loads none of it.
"""

from isgd.closures import loss_closure
from isgd.forward_only import ForwardOnlyISGD
from isgd.optim import INNER_SOLVERS, ISGD, ISGDStats, StepRecord, frozen_batchnorm_stats
from isgd.sampler import DistributedFixedCycleBatchSampler, FixedCycleBatchSampler
from isgd.spc import LossControlChart

__all__ = [
    "INNER_SOLVERS",
    "ISGD",
    "DistributedFixedCycleBatchSampler",
    "FixedCycleBatchSampler",
    "ForwardOnlyISGD",
    "ISGDStats",
    "LossControlChart",
    "StepRecord",
    "frozen_batchnorm_stats",
    "loss_closure",
]
__version__ = "0.1.0"
