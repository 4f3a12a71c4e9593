"""What the library's argument checks accept as a number: Python's and NumPy's, never a bool."""

from __future__ import annotations

import numbers
import operator
from typing import SupportsIndex, TypeGuard


def is_real(x: object) -> TypeGuard[float]:
    """A real number: Python's or NumPy's (registered with ``numbers.Real``), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def as_int(x: object) -> int | None:
    """An integral number (``int``, ``numpy.int64``, anything with ``__index__`` but a bool) as
    an int; None for anything else."""
    if isinstance(x, bool) or not isinstance(x, SupportsIndex):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None
