"""Scalar random draws for planning, cheaper than NumPy's scalar methods and bit for bit
the same numbers.

A plan draws a few dozen scalars per tumor; ``Generator.uniform(lo, hi)`` for one scalar
costs about 4x ``Generator.random()`` in call overhead, and computes ``lo + (hi - lo) * u``
from the same double ``u`` (NumPy's ``random_uniform``). :func:`uniform` is that
expression on ``rng.random()``: the same value, and the same one draw from the stream.
"""

from __future__ import annotations

import math

import numpy as np


def uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    """``float(rng.uniform(lo, hi))``, bit for bit (one double drawn), with its errors."""
    lo = float(lo)
    span = float(hi) - lo
    if not math.isfinite(span):
        raise OverflowError("high - low range exceeds valid bounds")
    if span < 0:
        raise ValueError("high - low < 0")
    return lo + span * rng.random()
