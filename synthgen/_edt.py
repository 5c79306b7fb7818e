"""Exact Euclidean distance transform of a 3-D mask with voxel spacing (numba).

Planning a hollow-organ wall tumor measures the lumen's inscribed radius by a distance
transform of a box of the organ (``_hollow.locate_wall``, two or three a tumor), and
rendering one measures distances to its wall. ``scipy.ndimage.distance_transform_edt``
spent 65-75 ns a voxel there (a colon plan: 40 ms, 80% of it in that call). This is the same
transform, the same values bit for bit: the feature transform of Maurer, Qi and Raghavan
(IEEE PAMI 25, 2003), one pass along each axis in turn keeping, per line, the background
features whose Voronoi cells cross the line, with the same removal test, the same
tie-breaking (a feature is kept on equality, and a voxel takes the first of equally near
features) and the same floating-point operations in the same order as SciPy's
implementation of that paper, then the distance of every voxel to its feature as SciPy forms
it (offsets scaled by the spacing, squared, summed over the axes in order, square root). A
test compares features and distances with SciPy's on random masks, spacings and shapes.
"""

from __future__ import annotations

import numpy as np

from ._cpu_kernels import _OPTS, nb
from ._pool import map_threads, row_ranges

__all__ = ["distance_transform_edt"]


@nb.njit(**_OPTS)
def _line(ft, base, stride, d, e1, e2, n, s, f, g, q):
    """One line of ``n`` voxels along axis ``d`` (flat ``(3, voxels)`` features ``ft``, the
    line's first voxel at ``base``, the next ``stride`` further), whose coordinates on the
    two other axes, in axis order, are ``e1``, ``e2``: the nearest kept feature for each of
    its voxels. Scratch: ``f`` the line's features, ``g`` the kept ones (a stack of line
    positions), ``q`` per kept feature its squared offsets (scaled) on the two other axes,
    its coordinate on ``d`` and the sum of the two squares: SciPy recomputes them where it
    needs them, the same operations on the same numbers."""
    a1 = 1 if d == 0 else 0  # the two other axes, in order
    a2 = 1 if d == 2 else 2
    sd, s1, s2 = s[d], s[a1], s[a2]
    for i in range(n):  # the line's features, read before any is rewritten
        at = base + i * stride
        f[i, 0] = ft[0, at]
        f[i, 1] = ft[1, at]
        f[i, 2] = ft[2, at]
    top = -1
    for i in range(n):
        if f[i, 0] < 0:
            continue
        t1 = float(f[i, a1] - e1) * s1
        t2 = float(f[i, a2] - e2) * s2
        u1, u2 = t1 * t1, t2 * t2
        w = u1 + u2
        fd = float(f[i, d])
        while top >= 1:
            f1 = q[top, 2]
            a_ = (f1 - q[top - 1, 2]) * sd
            b_ = (fd - f1) * sd
            c_ = a_ + b_
            u = q[top - 1, 3]
            v = q[top, 3]
            if c_ * v - b_ * u - a_ * w - a_ * b_ * c_ <= 0.0:
                break
            top -= 1
        top += 1
        g[top] = i
        q[top, 0] = u1
        q[top, 1] = u2
        q[top, 2] = fd
        q[top, 3] = w
    if top < 0:
        return
    last = top
    k = 0
    for i in range(n):
        fi = float(i)
        t = (q[k, 2] - fi) * sd
        d1 = _sq(t, q[k, 0], q[k, 1], d)
        while k < last:
            t = (q[k + 1, 2] - fi) * sd
            d2 = _sq(t, q[k + 1, 0], q[k + 1, 1], d)
            if d1 <= d2:
                break
            d1 = d2
            k += 1
        at = base + i * stride
        j = g[k]
        ft[0, at] = f[j, 0]
        ft[1, at] = f[j, 1]
        ft[2, at] = f[j, 2]


@nb.njit(inline="always", **_OPTS)
def _sq(t, q1, q2, d):
    """``t`` squared (the offset along axis ``d``) and the two others' squares summed over
    the axes in order, as SciPy sums them."""
    tt = t * t
    if d == 0:
        return (tt + q1) + q2
    if d == 1:
        return (q1 + tt) + q2
    return (q1 + q2) + tt


@nb.njit(**_OPTS)
def _pass0(mask, ft, j0, j1):
    """Axis 0, the lines of ``j`` in ``[j0, j1)``. The features of a line are its own
    background voxels, none ever removed (no offsets on the other axes): each voxel takes
    the nearest, the lower one of two equally near (what the general pass computes, in two
    sweeps)."""
    n0, n1, n2 = mask.shape
    near = np.empty(n0, dtype=np.int64)
    for j in range(j0, j1):
        for k in range(n2):
            last = -1
            for i in range(n0):
                if not mask[i, j, k]:
                    last = i
                near[i] = last
            nxt = -1
            for i in range(n0 - 1, -1, -1):
                if not mask[i, j, k]:
                    nxt = i
                b = near[i]
                if b < 0 or (nxt >= 0 and nxt - i < i - b):
                    b = nxt
                at = (i * n1 + j) * n2 + k
                if b < 0:
                    ft[0, at] = -1  # (no background on the line: the others stay 0)
                else:
                    ft[0, at] = b
                    ft[1, at] = j
                    ft[2, at] = k


@nb.njit(**_OPTS)
def _pass12(mask, ft, s, d, i0, i1):
    """Axis ``d`` (1 or 2), the lines of ``i`` in ``[i0, i1)``. A line without foreground
    keeps its voxels' features (each its own, at distance 0): only lines through the
    foreground are passed."""
    _, n1, n2 = mask.shape
    m = max(n1, n2)
    f = np.empty((m, 3), dtype=np.int64)
    g = np.empty(m, dtype=np.int64)
    q = np.empty((m, 4), dtype=np.float64)
    if d == 1:
        fg = np.zeros(n2, dtype=np.bool_)
        for i in range(i0, i1):
            fg[:] = False
            for j in range(n1):
                for k in range(n2):
                    if mask[i, j, k]:
                        fg[k] = True
            for k in range(n2):
                if fg[k]:
                    _line(ft, i * n1 * n2 + k, n2, 1, i, k, n1, s, f, g, q)
    else:
        for i in range(i0, i1):
            for j in range(n1):
                base = (i * n1 + j) * n2
                for k in range(n2):
                    if mask[i, j, k]:
                        _line(ft, base, 1, 2, i, j, n2, s, f, g, q)
                        break


def feature_transform(mask, s, rows=None) -> np.ndarray:
    """``(3, *mask.shape)`` int32: for each voxel the indices of its nearest voxel where
    ``mask`` (C-contiguous bool) is False, with spacing ``s`` (``scipy.ndimage``'s
    ``return_indices``; voxels with no such voxel in reach keep first index -1). One pass
    along each axis in turn, each over ranges ``rows`` of the first axis (default one) on
    the shared thread pool: the lines of a pass are independent (each reads and writes only
    its own voxels' features), so the features do not depend on the ranges."""
    n0, n1, n2 = mask.shape
    rows = [(0, n0)] if rows is None else rows
    ft = np.zeros((3, mask.size), dtype=np.int32)
    map_threads(lambda r: _pass0(mask, ft, *r), row_ranges(n1, mask.size, 0, len(rows)))
    map_threads(lambda r: _pass12(mask, ft, s, 1, *r), rows)
    map_threads(lambda r: _pass12(mask, ft, s, 2, *r), rows)
    return ft.reshape(3, n0, n1, n2)


@nb.njit(**_OPTS)
def _distances(ft, s, out, i0, i1):
    """Each voxel's distance to its feature, for ``i`` in ``[i0, i1)``, into ``out``."""
    n1, n2 = ft.shape[2], ft.shape[3]
    for i in range(i0, i1):
        for j in range(n1):
            for k in range(n2):
                t0 = float(ft[0, i, j, k] - i) * s[0]
                t1 = float(ft[1, i, j, k] - j) * s[1]
                t2 = float(ft[2, i, j, k] - k) * s[2]
                out[i, j, k] = np.sqrt((t0 * t0 + t1 * t1) + t2 * t2)


#: Voxels from which a transform's passes run on several threads (a map on the pool costs
#: some tens of microseconds: on 2 threads a 27^3 box, a colon plan's lumen search at 3 mm,
#: took 0.84 ms in one range and 0.46 split, a 20^3 box 0.18 and 0.24;
#: ``benchmarks/bench_wall_steps.py --edt``).
PARALLEL_VOXELS = 16_384


def distance_transform_edt(mask, sampling=None, *, parts: int | None = None) -> np.ndarray:
    """``scipy.ndimage.distance_transform_edt(mask, sampling=sampling)`` of a 3-D mask,
    the same float64 values: each voxel's distance (mm for ``sampling`` in mm) to the
    nearest voxel where ``mask`` is false (0 there). Each pass's lines are split into
    ``parts`` ranges run on the shared thread pool: by default four a thread of
    :func:`synthgen.set_num_threads` from :data:`PARALLEL_VOXELS` voxels on, else one;
    ``parts=1`` runs on the calling thread alone, any other count at any size. The values
    do not depend on it."""
    m = np.asarray(mask)
    if m.ndim != 3:
        raise ValueError(f"a 3-D mask expected, got shape {m.shape}")
    m = np.ascontiguousarray(m if m.dtype == np.bool_ else m != 0)
    s = np.ones(3) if sampling is None else np.asarray(sampling, dtype=np.float64).reshape(-1)
    if s.size == 1:
        s = np.repeat(s, 3)
    if s.size != 3:
        raise ValueError(f"sampling: one value or one per axis, got {s.size}")
    s = np.ascontiguousarray(s)
    rows = row_ranges(m.shape[0], m.size, PARALLEL_VOXELS, parts)
    ft = feature_transform(m, s, rows)
    out = np.empty(m.shape, dtype=np.float64)
    map_threads(lambda r: _distances(ft, s, out, *r), rows)
    return out
