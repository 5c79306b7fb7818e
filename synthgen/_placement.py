"""Anatomy-aware placement: keep tumors off vessels, existing lesions and each other.

Planning draws a tumor centre with the preset's placement rules and, when the preset or the
caller asks for it, rejects centres whose tumor would come too close to

* vessels: the caller's vessel mask or, without one, bright voxels in and at the organ
  (:func:`bright_vessels`), kept ``vessel_clearance_mm`` away from the tumor's ellipsoid;
* existing lesions (the caller's lesion mask), kept ``gap_mm`` away;
* the tumors already placed in the sample (unless ``confluence``): bounding spheres at least
  ``gap_mm`` apart.

Distances are in mm on the scan's (possibly anisotropic) grid. Everything is computed on the
organ's bounding box plus the largest clearance, never on the whole scan, and a candidate
is tested only against the mask voxels in its own box, so the cost grows with the organ and
the tumor, not with the scan. Each tumor gets a bounded number of draws per relaxation level
(full clearances, half, zero, then only the centre kept clear); when even the centre cannot
be placed a ``ValueError`` says which constraint failed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ._geometry import binary as _binary
from ._geometry import sample_step
from ._packed import above

__all__ = ["Constraints", "PlacementError", "bright_vessels"]


class PlacementError(ValueError):
    """No room for the preset's tumors in this organ: empty or too small, or no position
    left clear of vessels, lesions and other tumors. For a training patch beside or at the
    edge of an organ a normal outcome (the adapters leave such a sample as it is); any other
    ``ValueError`` of planning is about the caller's data or arguments."""


# Draws per relaxation level and tumor (rejection sampling, bounded).
TRIES = 48
# Clearance / gap multipliers tried in turn; after them only the centre must stay clear.
LEVELS = (1.0, 0.5, 0.0)
# Bright-voxel vessel fallback: a voxel is "vessel" when brighter than the organ median by
# more than max(K_SD robust standard deviations, MIN_DELTA_HU) and part of a connected bright
# component of at least MIN_VOXELS voxels and MIN_VOLUME_MM3 (drops noise specks).
K_SD = 3.0
MIN_DELTA_HU = 30.0
MIN_VOXELS = 4
MIN_VOLUME_MM3 = 30.0


def expand(
    bbox: Sequence[slice], shape: Sequence[int], margin_mm: float, spacing: Sequence[float]
) -> tuple[slice, slice, slice]:
    """``bbox`` grown by ``margin_mm`` (at least one voxel) per side, clipped to ``shape``."""
    out = []
    for s, n, sp in zip(bbox, shape, spacing, strict=True):
        m = math.ceil(margin_mm / sp) + 1
        out.append(slice(max(0, s.start - m), min(int(n), s.stop + m)))
    return tuple(out)  # type: ignore[return-value]


def bright_vessels(
    image: np.ndarray,
    organ_mask: np.ndarray,
    region: tuple[slice, slice, slice],
    spacing: Sequence[float],
) -> np.ndarray:
    """Voxels of ``region`` that look like enhanced vessels in or at the organ (bool).

    A voxel counts when it lies in the organ mask or touches it (face neighbour: vessels
    carved out of an organ mask count by their rim), is brighter than the organ's median by
    more than ``max(3 robust SD, 30 HU)`` (robust SD = 1.4826 x median absolute deviation of
    the organ's voxels), and belongs to a 26-connected bright component of at least 4 voxels
    and 30 mm^3. No tubularity test: any bright structure at the organ (an enhancing
    lesion, a rib touching the liver) is avoided too.
    """
    from ._cpu_kernels import face_dilation, large_components, median, median_abs_dev

    org = _binary(organ_mask[region])
    n = int(np.count_nonzero(org))
    if n == 0:
        return np.zeros(org.shape, dtype=bool)
    step = sample_step(n)
    # the image is read as a strided sample and as its test against the threshold (both
    # made on the device for an image on a GPU), not in full
    sample = tuple(slice(r.start, r.stop, step) for r in region)  # (``expand``'s slices)
    vals = np.asarray(image[sample])[org[::step, ::step, ::step]]
    if vals.size < 16:
        vals = np.asarray(image[region])[org]
    if vals.dtype.kind not in "iub":  # (an integer image's medians are counted as they are)
        vals = vals.astype(np.float64)
    med = median(vals)
    sd = 1.4826 * median_abs_dev(vals, med)
    thr = med + max(K_SD * sd, MIN_DELTA_HU)
    near = face_dilation(np.ascontiguousarray(org))  # (in the organ or touching it)
    bright = near & above(image, region, thr)
    if not bright.any():
        return bright
    vox_mm3 = float(np.prod(spacing))
    # 26-connected components of at least the size (numba: ndimage.label's components)
    return large_components(bright, max(MIN_VOXELS, math.ceil(MIN_VOLUME_MM3 / vox_mm3)))


class _MaskTerm:
    """One mask to keep clear of, cut to the constraint region (voxel offset ``origin``)."""

    def __init__(self, mask: np.ndarray, origin, spacing, clearance_mm: float, what: str):
        self.mask = mask
        self.origin = np.asarray(origin, dtype=np.int64)
        self.sp = np.asarray(spacing, dtype=np.float64)
        self.clearance = float(clearance_mm)
        self.what = what

    def _points(self, c: np.ndarray, half_mm: np.ndarray) -> np.ndarray | None:
        """Offsets (mm, from ``c``) of the mask voxels in the box ``c +- half_mm``."""
        rel = c - self.origin
        lo = np.maximum(np.floor(rel - half_mm / self.sp).astype(np.int64), 0)
        hi = np.minimum(np.ceil(rel + half_mm / self.sp).astype(np.int64) + 1, self.mask.shape)
        if np.any(hi <= lo):
            return None
        box = self.mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        if not box.any():
            return None
        idx = np.stack(np.nonzero(box), axis=1)
        return (idx + (lo - rel)) * self.sp

    def hits_ellipsoid(self, c, radii, rot, scale: float) -> bool:
        """Whether a mask voxel lies within ``scale * clearance`` of the ellipsoid.

        The ellipsoid grown by a ball of radius ``d`` lies inside the same ellipsoid scaled by
        ``1 + d / min(radii)`` (exact for a sphere): that scaled ellipsoid is tested, so the
        clearance is never less than asked for.
        """
        d = scale * self.clearance
        semi = np.asarray(radii, dtype=np.float64) * (1.0 + d / min(radii))
        half = np.sqrt(((rot * semi[None, :]) ** 2).sum(axis=1))
        pts = self._points(c, half)
        if pts is None:
            return False
        local = pts @ rot / semi
        return bool(np.any(np.einsum("ij,ij->i", local, local) <= 1.0))

    def hits_point(self, c) -> bool:
        """Whether a mask voxel lies within ``clearance`` of the centre ``c`` itself."""
        d = self.clearance
        pts = self._points(c, np.full(3, d))
        if pts is None:
            return False
        return bool(np.any(np.einsum("ij,ij->i", pts, pts) <= d * d))


@dataclass
class _Placed:
    centre_mm: np.ndarray
    radius_mm: float


class Constraints:
    """What a tumor centre must keep clear of, for one plan (see the module docstring).

    Args:
        image, organ_mask: The scan and its organ mask (read on the region only).
        bbox: The organ's bounding box.
        spacing: Voxel size, mm.
        vessel_clearance_mm: 0 disables vessel avoidance.
        gap_mm: Gap to existing lesions and, unless ``confluence``, between tumors.
        confluence: Tumors of the sample may overlap.
        vessel_mask: Vessels on the scan's grid, or ``None`` for the bright-voxel fallback.
        lesion_mask: Existing lesions on the scan's grid, or ``None``.
    """

    def __init__(
        self,
        image,
        organ_mask,
        bbox,
        spacing,
        *,
        vessel_clearance_mm: float,
        gap_mm: float,
        confluence: bool,
        vessel_mask=None,
        lesion_mask=None,
        cache: dict | None = None,
    ) -> None:
        self.sp = np.asarray(spacing, dtype=np.float64)
        self.gap = float(gap_mm)
        self.confluence = bool(confluence)
        self.terms: list[_MaskTerm] = []
        self.placed: list[_Placed] = []
        clear = float(vessel_clearance_mm)
        margin = max(clear if clear > 0 else 0.0, self.gap if lesion_mask is not None else 0.0)
        region = expand(bbox, organ_mask.shape, margin, spacing)
        origin = [s.start for s in region]
        if clear > 0:
            if vessel_mask is not None:
                _check_grid("vessel_mask", vessel_mask, organ_mask)
                vm, what = _binary(vessel_mask[region]), "the vessel mask"
            else:
                # The fallback costs a component labelling of the organ's box: computed once per
                # scan when the caller passes an OrganIndex (batch, loaders): ``cache`` is that
                # scan's entry of its cache (see planning._scan_cache).
                key = ("bright", tuple((r.start, r.stop) for r in region), tuple(self.sp))
                vm = cache.get(key) if cache is not None else None
                if vm is None:
                    vm = bright_vessels(image, organ_mask, region, spacing)
                    if cache is not None:
                        cache[key] = vm
                what = "bright (vessel-like) voxels at the organ"
            if vm.any():
                self.terms.append(_MaskTerm(vm, origin, spacing, clear, what))
        if lesion_mask is not None:
            _check_grid("lesion_mask", lesion_mask, organ_mask)
            lm = _binary(lesion_mask[region])
            if lm.any():
                self.terms.append(_MaskTerm(lm, origin, spacing, self.gap, "an existing lesion"))

    @property
    def active(self) -> bool:
        """Whether any candidate can be rejected (else the first draw is always kept)."""
        return bool(self.terms) or not self.confluence

    def _conflict(self, c_vox, radii, rot, level: int) -> str | None:
        c = np.asarray(c_vox, dtype=np.float64)
        cm = c * self.sp
        r = max(radii)
        if level < len(LEVELS):
            scale = LEVELS[level]
            if not self.confluence:
                for p in self.placed:
                    if np.linalg.norm(cm - p.centre_mm) < r + p.radius_mm + scale * self.gap:
                        return "another tumor of the sample"
            for t in self.terms:
                if t.hits_ellipsoid(c, radii, rot, scale):
                    return t.what
            return None
        # Last level: only the centre must stay clear (outside the other tumors' spheres).
        if not self.confluence:
            for p in self.placed:
                if np.linalg.norm(cm - p.centre_mm) < p.radius_mm:
                    return "another tumor of the sample"
        for t in self.terms:
            if t.hits_point(c):
                return t.what
        return None

    def place(
        self,
        draw: Callable[[np.random.Generator], tuple[int, int, int]],
        rng: np.random.Generator,
        retry_seed: Sequence[int],
        radii: Sequence[float],
        rot: np.ndarray,
        *,
        fixed: bool = False,
        label: str = "tumor",
    ) -> tuple[int, int, int]:
        """Draw centres with ``draw`` until one satisfies the constraints; record it.

        The first candidate comes from the plan's ``rng`` (exactly the unconstrained draw);
        retries come from a generator seeded with ``retry_seed``, so rejections never shift
        the plan's other random choices: with and without masks a seed gives the same
        tumors, only moved. A ``fixed`` centre (the preset places the class at the organ
        centre) is kept as is. Raises ``ValueError`` naming the constraint when no centre
        is found.
        """
        c = draw(rng)
        if not fixed and self.active and self._conflict(c, radii, rot, 0) is not None:
            retry = np.random.default_rng(list(retry_seed))
            c = None
            why: dict[str, int] = {}
            for level in range(len(LEVELS) + 1):
                for _ in range(TRIES):
                    cand = draw(retry)
                    w = self._conflict(cand, radii, rot, level)
                    if w is None:
                        c = cand
                        break
                    why[w] = why.get(w, 0) + 1
                if c is not None:
                    break
            if c is None:
                worst = max(why, key=why.__getitem__)
                raise PlacementError(
                    f"no position for {label} (radius up to {max(radii):.1f} mm): "
                    f"{(len(LEVELS) + 1) * TRIES} candidate centres all came too close to "
                    f"{worst}, even with the clearance relaxed to 0 mm and only the centre "
                    "kept clear"
                )
        self.placed.append(_Placed(np.asarray(c, dtype=np.float64) * self.sp, float(max(radii))))
        return c


def _check_grid(name: str, mask, organ_mask) -> None:
    if not hasattr(mask, "shape") or tuple(mask.shape) != tuple(organ_mask.shape):
        got = tuple(mask.shape) if hasattr(mask, "shape") else type(mask).__name__
        raise ValueError(
            f"{name} must be an array on the organ mask's grid {tuple(organ_mask.shape)}, got {got}"
        )
