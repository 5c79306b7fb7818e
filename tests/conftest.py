"""Shared fixtures of the synthgen test suite.

Session-scoped so that every phantom is built once:

* ``small_phantom``: the stylised abdominal phantom at 2.5 x 2.5 x 3 mm (all organs, < 0.3 s).
* ``bench_phantom``: the 1 mm benchmark phantom (320 x 320 x 224, 1.6 L liver, ~1.5 s); only
  the distribution tests use it.
* ``ellipsoid_scan``: a factory of simple scans (one ellipsoidal organ in mm, any spacing)
  for tests that compare voxel grids.
* ``totalseg``: the TotalSegmentator example CT and label map (downloaded from PyPI once and
  cached, see ``tests/_realdata.py``); tests using it are marked ``network``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pytest

from synthgen.phantom import Phantom, benchmark_phantom, make_phantom

SMALL_SHAPE = (160, 128, 112)
SMALL_SPACING = (2.5, 2.5, 3.0)


@pytest.fixture(scope="session")
def small_phantom() -> Phantom:
    """All-organ phantom covering 400 x 320 x 336 mm at 2.5 x 2.5 x 3 mm."""
    p = make_phantom(SMALL_SHAPE, SMALL_SPACING, seed=0)
    p.image.flags.writeable = False  # shared by many tests: nobody may modify it
    return p


@pytest.fixture(scope="session")
def bench_phantom() -> Phantom:
    """The 1 mm benchmark phantom (REFERENCE section 2)."""
    p = benchmark_phantom()
    p.image.flags.writeable = False
    return p


def _ellipsoid_scan(
    spacing: Sequence[float],
    fov_mm: Sequence[float] = (200.0, 180.0, 170.0),
    semi_mm: Sequence[float] = (80.0, 70.0, 65.0),
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """int16 scan of a 100 HU ellipsoidal organ in 30 HU tissue (+-5 HU noise), any spacing.

    The organ is centred in the field of view and defined in mm, so every spacing shows the
    same organ; returns ``(image, organ_mask)``.
    """
    shape = tuple(round(f / s) for f, s in zip(fov_mm, spacing, strict=True))
    ax = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing, strict=True)]
    q = (
        (ax[0][:, None, None] / semi_mm[0]) ** 2
        + (ax[1][None, :, None] / semi_mm[1]) ** 2
        + (ax[2][None, None, :] / semi_mm[2]) ** 2
    )
    organ = q <= 1.0
    rng = np.random.default_rng(seed)
    image = np.where(organ, 100, 30).astype(np.int16)
    image += rng.integers(-5, 6, size=shape, dtype=np.int16)
    return image, organ


@pytest.fixture(scope="session")
def ellipsoid_scan() -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """Factory ``ellipsoid_scan(spacing, fov_mm=..., semi_mm=..., seed=0)``."""
    return _ellipsoid_scan


@dataclass
class RealCT:
    """The TotalSegmentator example: int16 CT, uint8 label map, affine (3 mm, RAS)."""

    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray

    def mask(self, *ids: int) -> np.ndarray:
        return np.isin(self.labels, ids)


@pytest.fixture(scope="session")
def totalseg() -> RealCT:
    """TotalSegmentator example CT + masks (pip download of the pinned sdist, cached).

    A failed download is an error; set ``SYNTHGEN_TESTS_OFFLINE=1`` to skip instead.
    """
    import nibabel as nib
    from _realdata import RealDataError, totalseg_example

    try:
        ct_path, seg_path = totalseg_example()
    except RealDataError as exc:
        if os.environ.get("SYNTHGEN_TESTS_OFFLINE") == "1":
            pytest.skip(f"real CT unavailable offline: {exc}")
        raise
    ct = nib.load(ct_path)
    seg = nib.load(seg_path)
    image = np.asarray(ct.dataobj)
    labels = np.asarray(seg.dataobj).astype(np.uint8)
    image.flags.writeable = False
    return RealCT(image=image, labels=labels, affine=np.asarray(ct.affine, dtype=np.float64))
