"""Mass effect: large tumors push the surrounding tissue outward, image and labels alike.

Each qualifying tumor (see :func:`mass_effect_fields`) gets a smooth radial displacement with
compact support, applied as a backward map: the output voxel ``x`` takes the scan's content at
the source point

    ``s(x) = c + (1 - strength * phi(rho) / rho) * (x - c)``,   ``rho = |M (x - c)|``,

where ``c`` is the tumor centre and ``M = diag(1 / radii) R^T`` maps mm offsets to the unit
coordinates of the tumor's ellipsoid (``rotation`` ``R`` and ``radii_mm`` of the plan), so
``rho = 1`` on the tumor surface. Along each ray from the centre the displacement is
``strength * phi(rho)`` times the tumor's radius in that direction, with the C1 profile

    ``phi(rho) = (3 rho - rho^3) / 2``          inside the tumor (``rho <= 1``),
    ``phi(rho) = 1 - 3 tau^2 + 2 tau^3``        ``tau = (rho - 1) / (reach - 1)`` outside,

which is 0 at the centre, peaks on the tumor surface (``phi(1) = 1``, ``phi'(1) = 0``: tissue
that lay at ``(1 - strength) r`` now touches the tumor) and falls smoothly to 0 with zero slope
at ``rho = reach`` (default 1.5 radii). Outside that support nothing moves, so all the work
stays in the box around it (its volume grows with ``reach^3``). Tissue inside the tumor is
stretched, the shell around it compressed against it.

No folding: the Jacobian of ``s`` has eigenvalues ``1 - strength * phi(rho) / rho`` (twice,
tangential) and ``1 - strength * phi'(rho)`` (radial). ``phi / rho <= 3/2`` and
``phi' <= 3/2``, so all are at least ``1 - 1.5 strength > 0`` for ``strength < 2/3``
(``MAX_STRENGTH`` is 0.5); ``phi' < 0`` outside only compresses. A map with a positive
Jacobian that is the identity outside a bounded set is a diffeomorphism. Because ``s(x)`` lies
on the segment from ``c`` to ``x``, every source point stays inside the same box: each tumor
reads and writes only its box.

Alignment of image and labels: the image is resampled trilinearly at ``s(x)``, and every label
map takes the value of the voxel nearest to the same ``s(x)`` (per axis ``floor(s + 0.5)``,
the trilinear corner of largest weight). The nearest indices are computed in the image's kernel
from the very coordinates it interpolates at and then gathered for each label map, so a label
voxel can never come from another source voxel than its image voxel.

Pipeline order: the scan and all its label maps are warped first, then the tumor is rendered on
the warped scan and warped organ mask (:func:`synthesize_with_mass_effect`). The centre is a
fixed point of the map, so the planned tumor sits where it was planned, in tissue pushed away
from it, and its label is the rendered one (no tumor mask is ever resampled).

Several tumors: the tissue is pushed by each tumor in plan order (tumor 1, then tumor 2 pushes
the result, ...), so the output samples the input at ``s_1(s_2(...s_K(x)))``. Tumors whose
boxes overlap are composed into that one map and resampled once (no repeated interpolation,
and the label alignment above holds for the composed map); tumors whose boxes do not overlap
are independent. Deterministic, independent of the number of threads.

Cost (:func:`benchmark`, ``python -m synthgen.mass_effect``; a shared 2-core dev machine, one
thread): a 30 mm sphere at 1 mm, int16 scan plus a uint8 label map, box 91^3 of which 0.39 M
voxels move: about 15 ms (warp 12 ms, label gather 0.6 ms per map). On the 1 mm benchmark
liver, "large" samples (2-3 tumors of 24-40 mm) took 33 ms plain and 96 ms with mass effect
(median of 5, same machine); "mix" 95 ms and 156 ms.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._device import array_kind
from ._pool import map_threads as _map

__all__ = [
    "DEFAULT_MIN_RADIUS_MM",
    "DEFAULT_RAMP_MM",
    "DEFAULT_REACH",
    "DEFAULT_STRENGTH",
    "MAX_STRENGTH",
    "REACH_RANGE",
    "MassEffectField",
    "MassEffectResult",
    "MassEffectSample",
    "PreparedRender",
    "apply_mass_effect",
    "benchmark",
    "mass_effect_fields",
    "plan_fields",
    "prepare_render",
    "render_plan",
    "source_voxels",
    "synthesize_with_mass_effect",
]

#: Displacement at the tumor surface as a fraction of the radius in that direction.
DEFAULT_STRENGTH = 0.25
#: Largest accepted ``strength``: keeps the smallest Jacobian eigenvalue ``1 - A`` >= 0.2
#: (the hard limit of invertibility is ``(6/7)^3 ~ 0.63``).
MAX_STRENGTH = 0.5
#: Tumors whose equivalent radius (geometric mean of the semi-axes, mm) is below this do not
#: push tissue ("large" tumors of the classic recipe have radii of 24-40 mm).
DEFAULT_MIN_RADIUS_MM = 20.0
#: The strength ramps linearly from 0 at ``min_radius_mm`` to full at ``min_radius_mm +
#: ramp_mm``, so a tumor just above the threshold does not jump to the full effect
#: (``0``: a step).
DEFAULT_RAMP_MM = 5.0
#: Support of the displacement, in tumor radii (nothing moves beyond ``reach`` radii): the
#: push decays over half a radius outside the tumor. The cost grows with ``reach^3`` (2 costs
#: 2.4x more); a smaller reach compresses the shell more (radial factor up to
#: ``1 + 1.5 strength / (reach - 1)``).
DEFAULT_REACH = 1.5
#: Accepted ``reach``, in tumor radii.
REACH_RANGE = (1.25, 3.0)


# --------------------------------------------------------------------------------------
# fields
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MassEffectField:
    """The displacement of one tumor, ready to apply.

    Attributes:
        index: The tumor's index in the plan (position in the sequence when it has none).
        center_vox: Centre, voxel indices (a fixed point of the map).
        radii_mm: The tumor's semi-axes, mm.
        strength: Effective strength (after the radius ramp): surface displacement / radius.
        reach: Support in tumor radii.
        metric: ``(3, 3)`` matrix mapping a voxel offset from the centre to the coordinates
            in which the support is the unit ball (``diag(1/r) R^T diag(spacing) / reach``;
            the tumor surface is the sphere of radius ``1 / reach``).
        box: The voxel box of the support, clipped to the scan, one slice per axis.
    """

    index: int
    center_vox: tuple[float, float, float]
    radii_mm: tuple[float, float, float]
    strength: float
    reach: float
    metric: np.ndarray
    box: tuple[slice, slice, slice]

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "center_vox": list(self.center_vox),
            "radii_mm": list(self.radii_mm),
            "strength": self.strength,
            "reach": self.reach,
            "box": [[s.start, s.stop] for s in self.box],
        }


def _tumor_list(tumors: Any) -> list:
    return list(tumors.tumors) if hasattr(tumors, "tumors") else list(tumors)


def _rotation(t: Any) -> np.ndarray:
    if hasattr(t, "rotation_matrix"):
        return np.asarray(t.rotation_matrix, dtype=np.float64).reshape(3, 3)
    rot = getattr(t, "rotation", None)
    return np.eye(3) if rot is None else np.asarray(rot, dtype=np.float64).reshape(3, 3)


def _effective_strength(r_eq: float, strength: float, min_radius_mm: float, ramp_mm: float):
    if ramp_mm > 0:
        return strength * min(1.0, max(0.0, (r_eq - min_radius_mm) / ramp_mm))
    return strength if r_eq >= min_radius_mm else 0.0


def mass_effect_fields(
    tumors: Any,
    spacing: Sequence[float],
    shape: Sequence[int],
    *,
    strength: float = DEFAULT_STRENGTH,
    min_radius_mm: float = DEFAULT_MIN_RADIUS_MM,
    ramp_mm: float = DEFAULT_RAMP_MM,
    reach: float = DEFAULT_REACH,
) -> list[MassEffectField]:
    """The displacement fields of the tumors large enough to push tissue, in plan order.

    Args:
        tumors: A :class:`synthgen.Plan` or a sequence of tumors; each needs ``center_vox``
            (voxel indices) and ``radii_mm``, and may have ``rotation`` (row-major 3x3 whose
            columns are the ellipsoid's axes in the voxel-axis frame) and ``index``.
        spacing: Voxel size in mm per array axis.
        shape: Shape of the scan (boxes are clipped to it).
        strength: Displacement at the tumor surface as a fraction of the radius
            (``0 <= strength <= MAX_STRENGTH``).
        min_radius_mm: Equivalent radius (geometric mean of the semi-axes, mm) from which a
            tumor pushes tissue.
        ramp_mm: Width of the linear ramp from no effect to full ``strength`` (0: a step).
        reach: Support of the field in tumor radii (``REACH_RANGE``).

    Returns:
        One :class:`MassEffectField` per tumor with a non-zero effect whose box meets the scan.

    Raises:
        ValueError: Bad spacing, strength, reach, radii or thresholds.
    """
    from .planning import resolve_spacing

    sp = resolve_spacing(spacing, None)
    if not 0.0 <= float(strength) <= MAX_STRENGTH:
        raise ValueError(f"strength must be in [0, {MAX_STRENGTH}], got {strength}")
    if not REACH_RANGE[0] <= float(reach) <= REACH_RANGE[1]:
        raise ValueError(f"reach must be in {list(REACH_RANGE)} (tumor radii), got {reach}")
    if min_radius_mm < 0 or ramp_mm < 0:
        raise ValueError("min_radius_mm and ramp_mm must be >= 0")
    reach = float(reach)
    out = []
    for n, t in enumerate(_tumor_list(tumors)):
        if getattr(t, "kind", "ellipsoid") != "ellipsoid":
            continue  # a hollow-organ wall tumor grows into the lumen: it pushes nothing
        radii = np.asarray(t.radii_mm, dtype=np.float64)
        if radii.shape != (3,) or np.any(radii <= 0) or not np.all(np.isfinite(radii)):
            raise ValueError(f"tumor {n}: radii_mm must be 3 positive values, got {radii}")
        r_eq = float(np.cbrt(np.prod(radii)))
        s = _effective_strength(r_eq, float(strength), float(min_radius_mm), float(ramp_mm))
        if s <= 0.0:
            continue
        rot = _rotation(t)
        c = np.asarray(t.center_vox, dtype=np.float64)
        metric = (rot.T / radii[:, None]) * np.asarray(sp)[None, :] / reach
        # Half-extent of the support's bounding box along each axis (mm), then voxels.
        half = reach * np.sqrt(((rot * radii[None, :]) ** 2).sum(axis=1))
        box = []
        for a in range(3):
            h = half[a] / sp[a]
            lo = max(0, math.floor(c[a] - h))
            hi = min(int(shape[a]), math.ceil(c[a] + h) + 1)
            box.append(slice(lo, max(lo, hi)))
        if any(b.stop <= b.start for b in box):
            continue
        out.append(
            MassEffectField(
                index=int(getattr(t, "index", n)),
                center_vox=(float(c[0]), float(c[1]), float(c[2])),
                radii_mm=(float(radii[0]), float(radii[1]), float(radii[2])),
                strength=float(s),
                reach=reach,
                metric=metric,
                box=tuple(box),  # type: ignore[arg-type]
            )
        )
    return out


def _bbox(fields: Sequence[MassEffectField]) -> tuple[slice, slice, slice]:
    return tuple(  # type: ignore[return-value]
        slice(min(f.box[a].start for f in fields), max(f.box[a].stop for f in fields))
        for a in range(3)
    )


def source_voxels(
    fields: MassEffectField | Sequence[MassEffectField], box: Sequence[slice] | None = None
) -> np.ndarray:
    """Source coordinates of a box's voxels (the reference, in NumPy float64).

    Args:
        fields: A field, or fields applied one after another in this order (the result of
            the last is the map applied first: ``s_1(s_2(...s_K(x)))``).
        box: Voxel box (default: the bounding box of the fields' boxes).

    Returns:
        ``(3, n0, n1, n2)`` voxel coordinates ``s(x)`` that the voxels of ``box`` take their
        content from (``x`` itself where nothing moves).
    """
    fields = [fields] if isinstance(fields, MassEffectField) else list(fields)
    box = _bbox(fields) if box is None else tuple(box)
    y = np.stack(
        np.meshgrid(*[np.arange(b.start, b.stop, dtype=np.float64) for b in box], indexing="ij")
    )
    for f in reversed(fields):
        c = np.asarray(f.center_vox)[:, None, None, None]
        d = y - c
        p = np.einsum("ab,bijk->aijk", f.metric, d)
        rho = f.reach * np.sqrt((p * p).sum(axis=0))
        tau = np.clip((rho - 1.0) / (f.reach - 1.0), 0.0, 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            psi = np.where(
                rho <= 1.0, 0.5 * (3.0 - rho * rho), (1.0 - tau * tau * (3.0 - 2.0 * tau)) / rho
            )
        y = c + d * (1.0 - f.strength * psi)
    return y


# --------------------------------------------------------------------------------------
# kernels (numba, single-threaded, nogil: slabs of a box run on the shared thread pool)
# --------------------------------------------------------------------------------------

_OPTS = {"cache": True, "nogil": True, "fastmath": False, "error_model": "numpy"}
_K: Any = None


def _kernels():
    """The numba-compiled kernels (compiled once, cached on disk like ``_cpu_kernels``)."""
    global _K
    if _K is None:
        from ._cpu_kernels import nb  # (sets NUMBA_CACHE_DIR before numba loads)

        global _psi
        if not hasattr(_psi, "py_func"):  # the kernel calls the compiled profile
            _psi = nb.njit(inline="always", **_OPTS)(_psi)
        _K = (nb.njit(**_OPTS)(_warp_rows), nb.njit(**_OPTS)(_gather_rows))
    return _K


def _psi(q, strength, reach):
    """``strength * phi(rho) / rho`` at ``q = (rho / reach)^2 < 1`` (see the module)."""
    r2 = reach * reach * q
    if r2 <= 1.0:
        return strength * 0.5 * (3.0 - r2)
    rho = math.sqrt(r2)
    tau = (rho - 1.0) / (reach - 1.0)
    return strength * (1.0 - tau * tau * (3.0 - 2.0 * tau)) / rho


def _warp_rows(src, dst, nn, kr, write_nn, i_lo, i_hi, cen, mts, strengths, reaches, rnd, lo, hi):
    """Warp rows ``[i_lo, i_hi)`` of a box (numba kernel; plain Python is its slow twin).

    ``src`` is a C-contiguous copy of the box padded with one edge voxel at the upper end of
    each axis (:func:`_padded_copy`), ``dst`` the box itself (written only where something
    moves). Field ``f`` has its centre at ``cen[f]`` (box voxel coordinates), ``mts[f]`` maps
    an offset from it to support coordinates (the unit ball), strength ``strengths[f]`` and
    reach ``reaches[f]``; the fields are composed, the last one applied to ``x`` first. Each
    row is walked only over the ``k`` where it crosses a support (a quadratic in ``k`` per
    field), stored in ``kr[i, j]``. Integer outputs (``rnd``) are rounded half to even and
    clipped to ``[lo, hi]``. With ``write_nn`` the flat index (in the unpadded box) of the
    trilinear corner nearest to each sample point is written to ``nn`` (-1 where nothing
    moves), for the label maps.
    """
    n0, n1, n2 = dst.shape
    last = strengths.shape[0] - 1
    p1 = src.shape[1]
    p2 = src.shape[2]
    sx = p1 * p2
    flat = src.ravel()
    top0 = n0 - 1.0
    top1 = n1 - 1.0
    top2 = n2 - 1.0
    # The last field acts on x itself: its terms are hoisted out of the rows.
    lc0 = cen[last, 0]
    lc1 = cen[last, 1]
    lc2 = cen[last, 2]
    lm = mts[last]
    ls = strengths[last]
    lr = reaches[last]
    for i in range(i_lo, i_hi):
        for j in range(n1):
            # |mt (x - c)|^2 < 1  <=>  k between the roots of a quadratic, per field.
            klo = n2
            khi = 0
            for f in range(last + 1):
                d0 = i - cen[f, 0]
                d1 = j - cen[f, 1]
                c0 = mts[f, 0, 2]
                c1 = mts[f, 1, 2]
                c2 = mts[f, 2, 2]
                a0 = mts[f, 0, 0] * d0 + mts[f, 0, 1] * d1 - c0 * cen[f, 2]
                a1 = mts[f, 1, 0] * d0 + mts[f, 1, 1] * d1 - c1 * cen[f, 2]
                a2 = mts[f, 2, 0] * d0 + mts[f, 2, 1] * d1 - c2 * cen[f, 2]
                cc = c0 * c0 + c1 * c1 + c2 * c2
                b = a0 * c0 + a1 * c1 + a2 * c2
                disc = b * b - cc * (a0 * a0 + a1 * a1 + a2 * a2 - 1.0)
                if disc > 0.0:
                    sq = math.sqrt(disc)
                    klo = min(klo, max(0, math.floor((-b - sq) / cc)))
                    khi = max(khi, min(n2, math.ceil((-b + sq) / cc) + 1))
            if khi <= klo:
                klo = 0
                khi = 0
            kr[i, j, 0] = klo
            kr[i, j, 1] = khi
            drow = dst[i, j]
            nrow = nn[i, j] if write_nn else nn[0, 0]
            e0 = i - lc0
            e1 = j - lc1
            h0 = lm[0, 0] * e0 + lm[0, 1] * e1
            h1 = lm[1, 0] * e0 + lm[1, 1] * e1
            h2 = lm[2, 0] * e0 + lm[2, 1] * e1
            for k in range(klo, khi):
                e2 = k - lc2
                q0 = h0 + lm[0, 2] * e2
                q1 = h1 + lm[1, 2] * e2
                q2 = h2 + lm[2, 2] * e2
                q = q0 * q0 + q1 * q1 + q2 * q2
                moved = q < 1.0
                y0 = float(i)
                y1 = float(j)
                y2 = float(k)
                if moved:
                    w = 1.0 - _psi(q, ls, lr)
                    y0 = lc0 + w * e0
                    y1 = lc1 + w * e1
                    y2 = lc2 + w * e2
                for f in range(last - 1, -1, -1):
                    d0 = y0 - cen[f, 0]
                    d1 = y1 - cen[f, 1]
                    d2 = y2 - cen[f, 2]
                    q0 = mts[f, 0, 0] * d0 + mts[f, 0, 1] * d1 + mts[f, 0, 2] * d2
                    q1 = mts[f, 1, 0] * d0 + mts[f, 1, 1] * d1 + mts[f, 1, 2] * d2
                    q2 = mts[f, 2, 0] * d0 + mts[f, 2, 1] * d1 + mts[f, 2, 2] * d2
                    q = q0 * q0 + q1 * q1 + q2 * q2
                    if q >= 1.0:
                        continue
                    w = 1.0 - _psi(q, strengths[f], reaches[f])
                    y0 = cen[f, 0] + w * d0
                    y1 = cen[f, 1] + w * d1
                    y2 = cen[f, 2] + w * d2
                    moved = True
                if not moved:
                    if write_nn:
                        nrow[k] = -1
                    continue
                s0 = min(max(y0, 0.0), top0)
                s1 = min(max(y1, 0.0), top1)
                s2 = min(max(y2, 0.0), top2)
                x0 = int(s0)
                x1 = int(s1)
                x2 = int(s2)
                r0 = s0 - x0
                r1 = s1 - x1
                r2 = s2 - x2
                g = (x0 * p1 + x1) * p2 + x2
                v00 = flat[g] + (flat[g + 1] - flat[g]) * r2
                g1 = g + p2
                v01 = flat[g1] + (flat[g1 + 1] - flat[g1]) * r2
                g2 = g + sx
                v10 = flat[g2] + (flat[g2 + 1] - flat[g2]) * r2
                g3 = g2 + p2
                v11 = flat[g3] + (flat[g3 + 1] - flat[g3]) * r2
                v0 = v00 + (v01 - v00) * r1
                v1 = v10 + (v11 - v10) * r1
                v = v0 + (v1 - v0) * r0
                if rnd:
                    v = min(max(np.rint(v), lo), hi)
                drow[k] = v
                if write_nn:
                    # The corner of largest weight; at the top edge r == 0, so x stays.
                    m0 = x0 + 1 if r0 >= 0.5 else x0
                    m1 = x1 + 1 if r1 >= 0.5 else x1
                    m2 = x2 + 1 if r2 >= 0.5 else x2
                    nrow[k] = (m0 * n1 + m1) * n2 + m2


def _gather_rows(src, dst, nn, kr, i_lo, i_hi):
    """``dst[v] = src.flat[nn[v]]`` on rows ``[i_lo, i_hi)``, over each row's range ``kr``
    where ``nn >= 0`` (``src`` C-contiguous)."""
    n1 = nn.shape[1]
    flat = src.ravel()
    for i in range(i_lo, i_hi):
        for j in range(n1):
            for k in range(kr[i, j, 0], kr[i, j, 1]):
                f = nn[i, j, k]
                if f >= 0:
                    dst[i, j, k] = flat[f]


def _value_range(dtype: np.dtype) -> tuple[float, float]:
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return float(info.min), float(info.max)
    return -np.inf, np.inf


_SLAB_VOXELS = 262_144  # rows per task: ~a quarter million voxels


def _padded_copy(view: np.ndarray, dtype: Any = None) -> np.ndarray:
    """C-contiguous copy of a box with its last plane repeated once along each axis (as
    ``dtype``, default the box's)."""
    n0, n1, n2 = view.shape
    out = np.empty((n0 + 1, n1 + 1, n2 + 1), dtype=view.dtype if dtype is None else dtype)
    out[:n0, :n1, :n2] = view
    out[n0, :n1, :n2] = out[n0 - 1, :n1, :n2]
    out[:, n1, :n2] = out[:, n1 - 1, :n2]
    out[:, :, n2] = out[:, :, n2 - 1]
    return out


def _clusters(fields: list[MassEffectField]) -> list[list[MassEffectField]]:
    """Groups of fields whose boxes overlap (transitively), each in plan order.

    A field reads and writes only its own box, so groups are independent; the fields of a
    group are composed into one map and resampled once.
    """
    from .rendering import _clusters as box_clusters

    return [[fields[i] for i in g] for g in box_clusters([f.box for f in fields])]


def _apply_group(
    group: list[MassEffectField], image: np.ndarray, labels: list[np.ndarray], perm
) -> None:
    """Warp a group's box of ``image`` and ``labels`` in place (arrays already permuted)."""
    warp_rows, gather_rows = _kernels()
    bb = _bbox(group)
    box = tuple(bb[a] for a in perm)
    start = np.array([b.start for b in box], dtype=np.float64)
    cen = np.array([np.asarray(f.center_vox)[list(perm)] for f in group]) - start[None, :]
    mts = np.ascontiguousarray(np.stack([f.metric[:, list(perm)] for f in group]))
    strengths = np.array([f.strength for f in group])
    reaches = np.array([f.reach for f in group])
    dst = image[box]
    n = dst.shape
    if dst.size >= 2**31:
        raise ValueError("mass-effect box too large (more than 2**31 voxels)")
    wide = None  # (numba's unsigned differences, flat[g + 1] - flat[g], would wrap)
    if dst.dtype.kind == "u":
        wide = np.int64 if dst.dtype.itemsize < 8 else np.float64
    src = _padded_copy(dst, wide)
    want_nn = bool(labels)
    nn = np.empty(n if want_nn else (1, 1, 1), dtype=np.int32)
    kr = np.empty((n[0], n[1], 2), dtype=np.int64)
    lsrc = [np.array(lab[box], order="C", copy=True) for lab in labels]  # never a view
    ldst = [lab[box] for lab in labels]
    rnd = image.dtype.kind in "iu"
    lo, hi = _value_range(image.dtype)
    rows = max(1, _SLAB_VOXELS // max(1, n[1] * n[2]))
    slabs = [(i, min(n[0], i + rows)) for i in range(0, n[0], rows)]

    def run(slab):
        i0, i1 = slab
        warp_rows(src, dst, nn, kr, want_nn, i0, i1, cen, mts, strengths, reaches, rnd, lo, hi)
        for s_lab, d_lab in zip(lsrc, ldst, strict=True):
            gather_rows(s_lab, d_lab, nn, kr, i0, i1)

    _map(run, slabs, dst.size * (1 + len(labels)))


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------


@dataclass
class MassEffectResult:
    """What :func:`apply_mass_effect` produced.

    Attributes:
        image: The warped image (the input itself when ``inplace``).
        labels: The warped label maps, in the container kind given (dict, list, one array,
            or ``None``).
        fields: The fields applied, in order.
    """

    image: np.ndarray
    labels: Any
    fields: list[MassEffectField]


def _label_list(labels: Any) -> tuple[list[np.ndarray], Any]:
    """Flat list of label arrays and a function putting a list back in the given container."""
    if labels is None:
        return [], lambda xs: None
    if isinstance(labels, np.ndarray) or getattr(labels, "ndim", None) == 3:
        return [labels], lambda xs: xs[0]  # one array (NumPy, CuPy, torch)
    if isinstance(labels, Mapping):
        keys = list(labels)
        return [labels[k] for k in keys], lambda xs: dict(zip(keys, xs, strict=True))
    return list(labels), list


def apply_mass_effect(
    image: np.ndarray,
    labels: Mapping[str, np.ndarray] | Sequence[np.ndarray] | np.ndarray | None,
    tumors: Any,
    spacing: Sequence[float] | None = None,
    *,
    strength: float = DEFAULT_STRENGTH,
    min_radius_mm: float = DEFAULT_MIN_RADIUS_MM,
    ramp_mm: float = DEFAULT_RAMP_MM,
    reach: float = DEFAULT_REACH,
    inplace: bool = False,
) -> MassEffectResult:
    """Push tissue away from each large tumor, warping the image and every label map alike.

    Only the box of each field's support is read and written (one box-sized copy of each
    array per group of overlapping tumors while it is processed); nothing scales with the
    scan except the copies made when ``inplace`` is False. Tumors push in the given order,
    overlapping ones composed into one map resampled once (see the module docstring).
    Deterministic, independent of the number of threads.

    Args:
        image: 3-D scan (HU), any real or integer dtype; integers are rounded half to even.
            Resampled trilinearly.
        labels: Label maps on the same grid (any dtype: bool, integer ids, ...): a mapping of
            name to array, a sequence of arrays, one array, or ``None``. Resampled by nearest
            neighbour from exactly the image's sample points.
        tumors: A :class:`synthgen.Plan` or a sequence of tumors (see
            :func:`mass_effect_fields`), pushing in this order.
        spacing: Voxel size in mm per array axis (default: ``tumors.spacing`` of a plan).
        strength: Displacement at the tumor surface / its radius (``[0, MAX_STRENGTH]``).
        min_radius_mm: Equivalent radius (mm) from which a tumor pushes tissue.
        ramp_mm: Ramp from no effect to full ``strength`` above ``min_radius_mm``.
        reach: Support of each field, in tumor radii.
        inplace: Modify ``image`` and the label arrays themselves (only the boxes are
            touched). Otherwise they are copied first and never modified.

    Returns:
        A :class:`MassEffectResult`.

    Raises:
        ValueError: Non-3-D or mismatched arrays, non-numeric image, missing spacing,
            read-only arrays with ``inplace``, bad parameters.
    """
    image_arr = image
    if not isinstance(image_arr, np.ndarray) or image_arr.ndim != 3:
        raise ValueError("image must be a 3-D NumPy array")
    if image_arr.dtype.kind not in "iuf":
        raise ValueError(f"image must be numeric (int or float), got dtype {image_arr.dtype}")
    labs, rebuild = _label_list(labels)
    for n, lab in enumerate(labs):
        if not isinstance(lab, np.ndarray) or lab.shape != image_arr.shape:
            raise ValueError(f"label map {n} must be a NumPy array of shape {image_arr.shape}")
    if spacing is None:
        spacing = getattr(tumors, "spacing", None)
        if spacing is None:
            raise ValueError("give spacing (mm per voxel axis) or a Plan as tumors")
    fields = mass_effect_fields(
        tumors,
        spacing,
        image_arr.shape,
        strength=strength,
        min_radius_mm=min_radius_mm,
        ramp_mm=ramp_mm,
        reach=reach,
    )
    if inplace:
        for a in (image_arr, *labs):
            if not a.flags.writeable:
                raise ValueError("inplace=True needs writeable arrays")
        img, out_labs = image_arr, labs
    else:
        img = np.array(image_arr, copy=True, order="K")
        out_labs = [np.array(lab, copy=True, order="K") for lab in labs]
    _warp_inplace(img, out_labs, fields)
    return MassEffectResult(image=img, labels=rebuild(out_labs), fields=fields)


def _warp_inplace(img: np.ndarray, labs: list[np.ndarray], fields: list[MassEffectField]):
    """Apply ``fields`` to a NumPy image and label maps in place (their boxes only)."""
    if not fields:
        return
    # Walk memory in order: a Fortran-ordered scan is processed through its transpose.
    fortran = img.flags.f_contiguous and not img.flags.c_contiguous
    perm = (2, 1, 0) if fortran else (0, 1, 2)
    img_p = img.transpose(perm)
    labs_p = [lab.transpose(perm) for lab in labs]
    for group in _clusters(fields):
        _apply_group(group, img_p, labs_p, perm)


def _shifted(f: MassEffectField, start: Sequence[int]) -> MassEffectField:
    """``f`` in the coordinates of a box starting at ``start``."""
    return dataclasses.replace(
        f,
        center_vox=tuple(float(c - s) for c, s in zip(f.center_vox, start, strict=True)),
        box=tuple(slice(b.start - s, b.stop - s) for b, s in zip(f.box, start, strict=True)),
    )


def _to_host(a: Any) -> np.ndarray:
    kind = array_kind(a)
    if kind.startswith("torch"):
        return np.ascontiguousarray(a.detach().cpu().numpy())
    if kind == "cupy":
        return np.ascontiguousarray(a.get())
    return np.array(a, copy=True, order="C")


def _put(a: Any, box: tuple[slice, ...], host: np.ndarray) -> None:
    kind = array_kind(a)
    if kind.startswith("torch"):
        import torch

        a[box] = torch.as_tensor(host).to(a.device)
    elif kind == "cupy":
        import cupy

        with a.device:  # (the copy made on the array's GPU, not on the current one)
            a[box] = cupy.asarray(host)
    else:
        a[box] = host


def _warp_any(img: Any, labs: list[Any], fields: list[MassEffectField]) -> None:
    """:func:`_warp_inplace` for arrays anywhere (NumPy, CuPy, torch): NumPy in place; all on
    one GPU, there (:func:`synthgen._mass_gpu.warp_on_device`: the same result); other
    arrays one group box at a time through the host."""
    if not fields:
        return
    if isinstance(img, np.ndarray) and all(isinstance(lab, np.ndarray) for lab in labs):
        _warp_inplace(img, labs, fields)
        return
    from ._mass_gpu import warp_on_device

    if not warp_on_device(img, labs, fields):
        _warp_by_boxes(img, labs, fields)


def _warp_by_boxes(img: Any, labs: list[Any], fields: list[MassEffectField]) -> None:
    """:func:`_warp_inplace` one group box at a time through the host: each box copied back
    (C order), warped there, written back."""
    for group in _clusters(fields):
        bb = _bbox(group)
        start = [b.start for b in bb]
        h_img = _to_host(img[bb])
        h_labs = [_to_host(lab[bb]) for lab in labs]
        _warp_inplace(h_img, h_labs, [_shifted(f, start) for f in group])
        _put(img, bb, h_img)
        for lab, h in zip(labs, h_labs, strict=True):
            _put(lab, bb, h)


def _copy(a: Any) -> Any:
    kind = array_kind(a)
    if kind.startswith("torch"):
        return a.clone()
    if kind == "cupy":
        with a.device:
            return a.copy()
    return np.array(a, copy=True, order="K")


# --------------------------------------------------------------------------------------
# integration: warp, then render
# --------------------------------------------------------------------------------------


@dataclass
class MassEffectSample:
    """A sample synthesized with mass effect.

    Attributes:
        result: The :class:`synthgen.rendering.RenderResult` of the render on the warped
            scan (its ``organ_mask`` is the warped organ mask, so ``label`` is consistent).
        labels: The other label maps, warped (container as given, ``None`` if none).
        fields: The mass-effect fields applied.
    """

    result: Any
    labels: Any
    fields: list[MassEffectField]

    @property
    def image(self) -> np.ndarray:
        return self.result.image

    @property
    def label(self) -> np.ndarray:
        return self.result.label

    @property
    def plan(self) -> Any:
        return self.result.plan


def _grown_bbox(bbox, fields: list[MassEffectField]):
    """The organ's bounding box grown by the fields' boxes (the organ only moves in them)."""
    if bbox is None or not fields:
        return bbox
    lo = [int(b[0]) for b in bbox]
    hi = [int(b[1]) for b in bbox]
    for f in fields:
        for a in range(3):
            lo[a] = min(lo[a], f.box[a].start)
            hi[a] = max(hi[a], f.box[a].stop)
    return [[lo[a], hi[a]] for a in range(3)]


def plan_fields(plan: Any, settings: Any = None) -> list[MassEffectField]:
    """The fields a plan's preset asks for (``[mass_effect]``; ``[]`` when it is off).

    Args:
        plan: A :class:`synthgen.Plan`; its preset (``plan.preset``, carried in the plan's
            JSON) holds the settings, so a stored plan replays the same warp.
        settings: A :class:`synthgen.presets.MassEffectParams` overriding the plan's
            (``synthgen batch --mass-effect``); ``None``: the plan's own.
    """
    me = plan.get_preset().mass_effect if settings is None else settings
    if not me.enabled or not plan.tumors:
        return []
    return mass_effect_fields(
        plan,
        plan.spacing,
        plan.shape,
        strength=me.strength,
        min_radius_mm=me.min_radius_mm,
        ramp_mm=me.ramp_mm,
        reach=me.reach,
    )


@dataclass
class PreparedRender:
    """A scan warped for a plan, ready to render (see :func:`prepare_render`).

    Attributes:
        plan: The plan to render: the given one, with the organ's bounding box grown by the
            fields' boxes when something moved (the organ may now reach beyond it).
        image: The image to render into (warped; ``out`` itself when given).
        organ_mask: The organ mask to render with (a warped copy when something moved).
        labels: The other label maps, warped (same container kind as given).
        fields: The fields applied (``[]``: nothing moved, arrays are the inputs).
    """

    plan: Any
    image: Any
    organ_mask: Any
    labels: Any
    fields: list[MassEffectField]


def prepare_render(
    plan: Any,
    image: Any,
    organ_mask: Any,
    *,
    labels: Any = None,
    out: Any = None,
    labels_inplace: bool = False,
    organ_inplace: bool = False,
    settings: Any = None,
    label_out: Any = None,
) -> PreparedRender:
    """Warp a scan and its labels as ``plan``'s preset asks, before rendering it.

    The image is warped into ``out`` (which holds the image, as for
    :func:`synthgen.render`) or into a copy; the organ mask into a copy (in place with
    ``organ_inplace``); ``labels`` into copies, or in place with ``labels_inplace``;
    ``label_out`` (the map the render will write the tumor label into) in place. Only the
    fields' boxes are computed; NumPy arrays are warped in place, GPU arrays (CuPy, torch
    CUDA) on their GPU (:mod:`synthgen._mass_gpu`; box by box through the host where it
    does not take them). Nothing is copied when no tumor pushes.
    """
    from .rendering import check_job, check_writable

    check_writable("out", out)  # before the warp writes into it
    check_job(plan, image, organ_mask, out)  # (the render's checks come after the warp)
    fields = plan_fields(plan, settings)
    labs, rebuild = _label_list(labels)
    if not fields:
        return PreparedRender(plan, image if out is None else out, organ_mask, labels, [])
    target = _copy(image) if out is None else out
    organ_w = organ_mask if organ_inplace else _copy(organ_mask)
    labs_w = labs if labels_inplace else [_copy(lab) for lab in labs]
    extra = [label_out] if label_out is not None else []
    _warp_any(target, [organ_w, *labs_w, *extra], fields)
    plan_r = dataclasses.replace(plan, organ_bbox=_grown_bbox(plan.organ_bbox, fields))
    return PreparedRender(plan_r, target, organ_w, rebuild(labs_w), fields)


def render_plan(
    plan: Any,
    image: Any,
    organ_mask: Any,
    *,
    labels: Any = None,
    out: Any = None,
    device: str = "auto",
    affine: np.ndarray | None = None,
    labels_inplace: bool = False,
    organ_inplace: bool = False,
    settings: Any = None,
    label_out: Any = None,
    tumor_label: int = 2,
) -> MassEffectSample:
    """Render a plan with its preset's mass effect: warp the scan and labels, then render.

    ``synthgen.render`` and ``synthgen.synthesize`` call this; it is the one to use for
    other label maps that must follow the warp (``labels``: a mapping, sequence or one
    array; see :func:`prepare_render`). The result's ``organ_mask`` (and so its ``label``)
    is the warped organ mask and its ``plan`` the plan as given. Without mass effect this is
    :func:`synthgen.rendering.render` and ``labels`` come back as given. ``label_out`` (see
    :func:`synthgen.render`) is warped in place, then gets the tumor label from the render.
    """
    from .rendering import label_arg, render

    label_out = label_arg(label_out, plan.shape, tumor_label)  # before anything is warped

    prep = prepare_render(
        plan,
        image,
        organ_mask,
        labels=labels,
        out=out,
        labels_inplace=labels_inplace,
        organ_inplace=organ_inplace,
        settings=settings,
        label_out=label_out,
    )
    lab = {"label_out": label_out, "tumor_label": tumor_label}
    if not prep.fields:
        res = render(plan, image, organ_mask, out=out, device=device, affine=affine, **lab)
        return MassEffectSample(result=res, labels=labels, fields=[])
    res = render(
        prep.plan, prep.image, prep.organ_mask, out=prep.image, device=device, affine=affine,
        **lab,
    )  # fmt: skip
    res.plan = plan
    return MassEffectSample(result=res, labels=prep.labels, fields=prep.fields)


def synthesize_with_mass_effect(
    image: np.ndarray,
    organ_mask: np.ndarray,
    *,
    organ: str | Path | Any,
    seed: int,
    spacing: Sequence[float] | None = None,
    affine: np.ndarray | None = None,
    size: str | None = None,
    labels: Mapping[str, np.ndarray] | Sequence[np.ndarray] | np.ndarray | None = None,
    strength: float = DEFAULT_STRENGTH,
    min_radius_mm: float = DEFAULT_MIN_RADIUS_MM,
    ramp_mm: float = DEFAULT_RAMP_MM,
    reach: float = DEFAULT_REACH,
    inplace: bool = False,
    device: str = "cpu",
    organ_index: Any = None,
) -> MassEffectSample:
    """:func:`synthgen.synthesize` with mass effect: plan, warp scan and labels, render.

    The plan is drawn on the original scan (same seed, same plan as without mass effect).
    The image, the organ mask and every map of ``labels`` are then warped by the large tumors'
    fields, and the plan is rendered on the warped image and organ mask, so the tumor sits in
    tissue pushed away from it and its label comes from the render itself.

    Args:
        image, organ_mask, organ, seed, spacing, affine, size, device, organ_index: As for
            :func:`synthgen.synthesize`.
        labels: Other label maps of the scan to warp along (see :func:`apply_mass_effect`).
        strength, min_radius_mm, ramp_mm, reach: See :func:`apply_mass_effect`.
        inplace: Warp and render into ``image``, ``organ_mask`` and ``labels`` themselves
            (boxes only, no full-volume copy); otherwise they are copied first.

    Returns:
        A :class:`MassEffectSample`; ``.result.plan`` is the plan as drawn.
    """
    from .api import Synthesizer
    from .presets import MassEffectParams

    settings = MassEffectParams(
        enabled=True, strength=strength, min_radius_mm=min_radius_mm, ramp_mm=ramp_mm, reach=reach
    )
    plan = Synthesizer(organ, device=device).plan(
        image,
        organ_mask,
        seed=seed,
        spacing=spacing,
        affine=affine,
        size=size,
        organ_index=organ_index,
    )
    if not inplace:  # the inputs stay untouched: copies in, warped and rendered
        image, organ_mask = _copy(image), _copy(organ_mask)
        labs, rebuild = _label_list(labels)
        labels = rebuild([_copy(lab) for lab in labs])
    return render_plan(
        plan,
        image,
        organ_mask,
        labels=labels,
        out=image,
        device=device,
        affine=affine,
        labels_inplace=True,
        organ_inplace=True,
        settings=settings,
    )


# --------------------------------------------------------------------------------------
# cost
# --------------------------------------------------------------------------------------


def benchmark(
    radius_mm: float = 30.0,
    shape: Sequence[int] = (320, 320, 224),
    repeats: int = 5,
    strength: float = DEFAULT_STRENGTH,
    reach: float = DEFAULT_REACH,
) -> dict[str, float]:
    """Time :func:`apply_mass_effect` in place on a 1 mm int16 scan plus a uint8 label map.

    Returns:
        ``{"median_ms", "min_ms", "box_voxels"}`` for one spherical tumor of ``radius_mm``
        at the centre (after a warm-up call that compiles the kernels).
    """
    rng = np.random.default_rng(0)
    image = rng.integers(-100, 200, size=tuple(shape), dtype=np.int16)
    label = (image > 50).astype(np.uint8)
    tumor = dataclasses.make_dataclass("T", ["center_vox", "radii_mm"])(
        tuple(n // 2 for n in shape), (radius_mm,) * 3
    )
    kw = {"strength": strength, "reach": reach, "min_radius_mm": 0.0, "ramp_mm": 0.0}
    kw["inplace"] = True
    res = apply_mass_effect(image, [label], [tumor], (1.0, 1.0, 1.0), **kw)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        apply_mass_effect(image, [label], [tumor], (1.0, 1.0, 1.0), **kw)
        times.append(time.perf_counter() - t0)
    return {
        "median_ms": 1e3 * float(np.median(times)),
        "min_ms": 1e3 * float(np.min(times)),
        "box_voxels": float(math.prod(s.stop - s.start for s in res.fields[0].box)),
    }


if __name__ == "__main__":  # pragma: no cover
    print(benchmark())
