"""Small array helpers shared by tests."""

from __future__ import annotations

import numpy as np


def ramps(shape) -> list[np.ndarray]:
    """One float64 array per axis holding that axis' voxel index (coordinate-encoding images:
    a warp's result shows where each voxel was read from)."""
    return [
        np.broadcast_to(
            np.arange(n, dtype=np.float64).reshape([n if a == b else 1 for b in range(3)]), shape
        ).copy()
        for a, n in enumerate(shape)
    ]


def placed(shape, found) -> np.ndarray:
    """A component given as ``(crop, first index per axis)`` (``_hollow._component``; ``None``:
    no component) as a bool array of ``shape``."""
    out = np.zeros(shape, dtype=bool)
    if found is not None:
        comp, lo = found
        out[tuple(slice(lo[a], lo[a] + comp.shape[a]) for a in range(3))] = comp
    return out
