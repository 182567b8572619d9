"""Argument checks shared by the whole package: one wording for one mistake.

Each returns the checked value (as a plain Python type) or raises ``ValueError`` naming the
argument, what it must be, and what it got. ``bool`` is never taken for an integer.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["positive_int", "non_negative_float"]


def positive_int(value: Any, name: str) -> int:
    """``value`` as an ``int`` >= 1 (Python or NumPy integers; not ``bool``)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def non_negative_float(value: Any, name: str) -> float:
    """``value`` as a finite ``float`` >= 0 (any real number type; not ``bool``)."""
    if (isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating))
            or not math.isfinite(value) or value < 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)
