"""ISGD — Inconsistent Stochastic Gradient Descent (Wang, Yang, Min, Chakradhar, 2017) for PyTorch.

>>> import isgd
>>> opt = isgd.ISGD(model.parameters(), lr=0.01, momentum=0.9, window=n_b)  # doctest: +SKIP
"""

from isgd.distributed import DistributedFixedCycleBatchSampler
from isgd.optim import ISGD, ISGDStats, StepRecord, frozen_batchnorm_stats
from isgd.sampler import FixedCycleBatchSampler
from isgd.spc import LossControlChart

__all__ = [
    "ISGD",
    "DistributedFixedCycleBatchSampler",
    "FixedCycleBatchSampler",
    "ISGDStats",
    "LossControlChart",
    "StepRecord",
    "frozen_batchnorm_stats",
]
__version__ = "0.1.0"
