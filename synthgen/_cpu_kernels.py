"""Numba CPU kernels of the render (the CUDA C kernels mirror these one for one).

Imported lazily by the CPU backend so that ``import synthgen`` stays cheap. Each kernel works
on one tumor's box, single-threaded and without the GIL (``nogil``): the renderer runs
independent groups of tumors on a thread pool instead. That keeps small boxes free of
thread-team overhead, never oversubscribes cores in data-loader workers, and is fork-safe.
"""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np

if "NUMBA_CACHE_DIR" not in os.environ:  # the install may be read-only (site-packages, wheels)
    _pkg = os.path.dirname(os.path.abspath(__file__))
    if not os.access(_pkg, os.W_OK):
        os.environ["NUMBA_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), "synthgen-numba")

import numba as nb

__all__ = [
    "apply_delta",
    "band_contract3",
    "bbox",
    "blend_tumor",
    "block_sizes_nb",
    "blur_kernels_nb",
    "bspline_matrix",
    "component_box",
    "conservative_boxes_nb",
    "cylinder_mask",
    "face_dilation",
    "gaussian_band_nb",
    "grid_ranges_nb",
    "interp_coords_nb",
    "large_components",
    "mask_bbox",
    "median",
    "median_abs_dev",
    "merge_strongest",
    "outer_wall",
    "overlap_partners_nb",
    "shape_mask",
    "soft_residuals",
    "texture_axes_nb",
    "texture_consts_nb",
    "toeplitz_contract3",
    "trilinear_box",
    "wall_arc",
    "wall_blend_rows",
    "wall_component",
]

_OPTS = {"cache": True, "nogil": True, "fastmath": False, "error_model": "numpy"}


@nb.njit(**_OPTS)
def shape_mask(
    ctrl, w0, w1, w2, pos0, pos1, pos2, m, organ, image, tlo, thi, clip, out, q2out=None
):
    """Deformed-ellipsoid test for every voxel of a box (B-spline displacement fused in).

    Args:
        ctrl: ``(3, g0, g1, g2)`` float32 control displacements (mm).
        w0, w1, w2: ``(n, g)`` float32 B-spline weights of the voxels along each axis.
        pos0, pos1, pos2: voxel positions relative to the tumor centre along each axis (mm).
        m: ``(3, 3)`` float64, maps a displaced position (mm) to unit-sphere coordinates
            (``diag(1/r) @ R.T``).
        organ: ``(nx, ny, nz)`` bool organ mask of the box (used when ``clip``).
        image: ``(nx, ny, nz)`` image of the box: only voxels with ``tlo <= I <= thi`` (the
            tissue window) can become tumor.
        clip: intersect with the organ.
        out: ``(nx, ny, nz)`` bool, written everywhere.
        q2out: optional ``(nx, ny, nz)`` float32, receives ``|m (x + d(x))|^2`` of every voxel
            (the squared normalised radius the appearance modes of the blend read).

    A voxel ``x`` is tumor when ``|m (x + d(x))| <= 1`` with
    ``d(x) = sum_abe ctrl[:, a, b, e] w0[i, a] w1[j, b] w2[k, e]``: the ellipsoid pulled back
    through the displacement, as ``elasticdeform`` resamples an image (``out(x) = in(x + d)``).
    """
    nx, ny, nz = out.shape
    g0, g1, g2 = ctrl.shape[1], ctrl.shape[2], ctrl.shape[3]
    # q = m (x + d(x)) is affine in the axis-2 quantities (pos2[k], w2[k, :]) for fixed (i, j):
    # q_c = a_c + m_c2 pos2[k] + sum_e b_ce w2[k, e]; the inner loop is branch-free FMAs.
    m02 = np.float32(m[0, 2])
    m12 = np.float32(m[1, 2])
    m22 = np.float32(m[2, 2])
    noclip = not clip
    w2t = np.ascontiguousarray(w2.T)
    qa = np.empty(nz, dtype=np.float32)
    qb = np.empty(nz, dtype=np.float32)
    qc = np.empty(nz, dtype=np.float32)
    row = np.empty((3, g2), dtype=np.float32)
    bm = np.empty((3, g2), dtype=np.float32)
    for i in range(nx):
        for j in range(ny):
            for c in range(3):
                for e in range(g2):
                    acc = np.float32(0.0)
                    for a in range(g0):
                        wa = w0[i, a]
                        for b in range(g1):
                            acc += ctrl[c, a, b, e] * wa * w1[j, b]
                    row[c, e] = acc
            for c in range(3):
                for e in range(g2):
                    bm[c, e] = m[c, 0] * row[0, e] + m[c, 1] * row[1, e] + m[c, 2] * row[2, e]
            a0 = np.float32(m[0, 0] * pos0[i] + m[0, 1] * pos1[j])
            a1 = np.float32(m[1, 0] * pos0[i] + m[1, 1] * pos1[j])
            a2 = np.float32(m[2, 0] * pos0[i] + m[2, 1] * pos1[j])
            for k in range(nz):
                qa[k] = a0 + m02 * pos2[k]
                qb[k] = a1 + m12 * pos2[k]
                qc[k] = a2 + m22 * pos2[k]
            for e in range(g2):
                b0 = bm[0, e]
                b1 = bm[1, e]
                b2 = bm[2, e]
                we = w2t[e]
                for k in range(nz):
                    qa[k] += b0 * we[k]
                    qb[k] += b1 * we[k]
                    qc[k] += b2 * we[k]
            img_row = image[i, j]
            org_row = organ[i, j]
            out_row = out[i, j]
            for k in range(nz):
                v = img_row[k]
                out_row[k] = (
                    (qa[k] * qa[k] + qb[k] * qb[k] + qc[k] * qc[k] <= 1.0)
                    & (noclip | org_row[k])
                    & (v >= tlo)
                    & (v <= thi)
                )
            if q2out is not None:
                q_row = q2out[i, j]
                for k in range(nz):
                    q_row[k] = qa[k] * qa[k] + qb[k] * qb[k] + qc[k] * qc[k]


@nb.njit(inline="always", **_OPTS)
def _bspline_rows_into(t, prefilter, raw, out):
    """:func:`bspline_matrix` of positions ``t`` written into ``out`` (``(n, g)`` float32,
    or flat ``n * g``), ``raw`` a scratch row of ``g`` float64."""
    g = prefilter.shape[0]
    period = 2 * (g - 1)
    for r in range(t.shape[0]):
        raw[:] = 0.0
        x = min(max(t[r], 0.0), g - 1.0)
        base = int(np.floor(x))
        for off in range(-1, 3):
            j = base + off
            ax = abs(x - j)
            if ax < 1.0:
                b = 2.0 / 3.0 - ax * ax + 0.5 * ax * ax * ax
            elif ax < 2.0:
                c = 2.0 - ax
                b = c * c * c / 6.0
            else:
                continue
            if g == 1:
                jj = 0
            else:  # mirror: abs(j) % period, folded (j is within a period but for g = 2)
                jj = abs(j)
                if jj >= period:
                    jj %= period
                if jj >= g:
                    jj = period - jj
            raw[jj] += b
        # raw @ prefilter, summed in ascending order (no BLAS: the same bits on every
        # machine, and no library call per row)
        if g == 3:  # the presets' grid, unrolled
            r0, r1, r2 = raw[0], raw[1], raw[2]
            for k in range(3):
                out[r * 3 + k] = ((0.0 + r0 * prefilter[0, k]) + r1 * prefilter[1, k]) + (
                    r2 * prefilter[2, k]
                )
        else:
            for k in range(g):
                acc = 0.0
                for j in range(g):
                    acc += raw[j] * prefilter[j, k]
                out[r * g + k] = acc


@nb.njit(**_OPTS)
def bspline_matrix(t, prefilter):
    """Cubic B-spline weights of positions ``t`` (control-index units, clamped to
    ``[0, g - 1]``) on ``g`` control points with mirror boundaries, times ``prefilter``
    (``g x g``; the interpolating spline), float32 ``(n, g)``. Mirrors
    ``_geometry.bspline_weights``."""
    g = prefilter.shape[0]
    out = np.empty(t.shape[0] * g, dtype=np.float32)
    _bspline_rows_into(t, prefilter, np.zeros(g), out)
    return out.reshape(t.shape[0], g)


@nb.njit(inline="always", **_OPTS)
def _axpy(dst, w, src):
    for q in range(dst.shape[0]):
        dst[q] += w * src[q]


@nb.njit(**_OPTS)
def band_contract3(core, s0, w0, s1, w1, s2, w2):
    """Separable banded contraction ``out[i,j,k] = sum core[a,b,c] W0[i,a] W1[j,b] W2[k,c]``.

    Each ``W`` is given in band form: row ``o`` has weights ``w[o, t]`` at columns
    ``s[o] + t``. Serves both the texture's Gaussian lattice sums and the mask blur (a
    Gaussian kernel with zero padding is a band matrix). float32 in, float32 out.
    """
    na, nb_, _nc = core.shape
    n0, k0 = w0.shape
    n1, k1 = w1.shape
    n2, k2 = w2.shape
    x1 = np.empty((na, nb_, n2), dtype=np.float32)
    for a in range(na):
        for b in range(nb_):
            row = core[a, b]
            dst = x1[a, b]
            for o in range(n2):
                acc = np.float32(0.0)
                base = s2[o]
                for t in range(k2):
                    acc += w2[o, t] * row[base + t]
                dst[o] = acc
    x2 = np.zeros((na, n1, n2), dtype=np.float32)
    for a in range(na):
        for o in range(n1):
            base = s1[o]
            dst = x2[a, o]
            for t in range(k1):
                _axpy(dst, w1[o, t], x1[a, base + t])
    flat2 = x2.reshape(na, n1 * n2)
    out = np.zeros((n0, n1 * n2), dtype=np.float32)
    for o in range(n0):
        base = s0[o]
        dst = out[o]
        for t in range(k0):
            _axpy(dst, w0[o, t], flat2[base + t])
    return out.reshape(n0, n1, n2)


@nb.njit(**_OPTS)
def toeplitz_contract3(core, off0, k0, n0, off1, k1, n1, off2, k2, n2):
    """Separable correlation with one kernel per axis and zero padding.

    ``out[i,j,l] = sum_tuv k0[t] k1[u] k2[v] core[i+off0+t, j+off1+u, l+off2+v]`` for an
    output of shape ``(n0, n1, n2)``; indices outside ``core`` read as zero. This is the mask
    blur (``off = -radius``) and the texture's block-to-grid smoothing (same lattice
    spacing), and every pass runs over a contiguous axis so it vectorises.
    """
    na, nb_, nc = core.shape
    r0, r1, r2 = k0.shape[0], k1.shape[0], k2.shape[0]
    flat_core = core.reshape(na, nb_ * nc)
    y0 = np.zeros((n0, nb_ * nc), dtype=np.float32)
    for i in range(n0):
        dst = y0[i]
        for t in range(r0):
            ii = i + off0 + t
            if ii < 0 or ii >= na:
                continue
            _axpy(dst, k0[t], flat_core[ii])
    y0 = y0.reshape(n0, nb_, nc)
    y1 = np.zeros((n0, n1, nc), dtype=np.float32)
    for i in range(n0):
        for j in range(n1):
            dst = y1[i, j]
            for u in range(r1):
                jj = j + off1 + u
                if jj < 0 or jj >= nb_:
                    continue
                _axpy(dst, k1[u], y0[i, jj])
    out = np.zeros((n0, n1, n2), dtype=np.float32)
    lo_pad = max(0, -off2)
    buf_len = lo_pad + max(nc, n2 + off2 + r2) + 1
    for i in range(n0):
        buf = np.zeros(buf_len, dtype=np.float32)
        for j in range(n1):
            buf[lo_pad : lo_pad + nc] = y1[i, j]
            dst = out[i, j]
            for v in range(r2):
                base = lo_pad + off2 + v
                _axpy(dst, k2[v], buf[base : base + n2])
    return out


@nb.njit(inline="always", **_OPTS)
def _clamp01(x):
    return min(max(x, np.float32(0.0)), np.float32(1.0))


@nb.njit(inline="always", **_OPTS)
def _noise_at(keys, gi, gj, gk, sw, sc):
    """Counter-hash noise of voxel ``(gi, gj, gk)`` (lattice units from the tumor centre):
    ``sw`` x white (Irwin-Hall sum of 4 uniforms, unit variance) plus ``sc`` x correlated (the
    2x2x2 box mean of a second white lattice, unit variance, lag-1 correlation 0.5 per axis).
    Mirrors ``sg_noise_at`` of kernels/blend.cuh."""
    n = np.float32(0.0)
    if sw != 0.0:
        idx = _lattice_index(gi, gj, gk)
        k0 = keys[0]
        k1 = keys[1]
        s = (
            _uniform(k0, k1, idx)
            + _uniform(k0, np.uint32(k1 ^ np.uint32(0x85EBCA6B)), idx)
            + _uniform(k0, np.uint32(k1 ^ np.uint32(0xC2B2AE35)), idx)
            + _uniform(k0, np.uint32(k1 ^ np.uint32(0x27D4EB2F)), idx)
        )
        n = sw * ((s - np.float32(2.0)) * np.float32(1.7320508075688772))
    if sc != 0.0:
        c0 = keys[2]
        c1 = keys[3]
        s = np.float32(0.0)
        for a in range(2):
            for b in range(2):
                for c in range(2):
                    s = s + _uniform(c0, c1, _lattice_index(gi + a, gj + b, gk + c))
        n = n + sc * ((s - np.float32(4.0)) * np.float32(1.224744871391589))
    return n


@nb.njit(**_OPTS)
def noise_box(keys, o0, o1, o2, n0, n1, n2, sw, sc):
    """:func:`_noise_at` on a box: voxel ``(i, j, k)`` is lattice point ``(o0 + i, o1 + j,
    o2 + k)`` (offsets from the tumor centre), float32 ``(n0, n1, n2)``."""
    out = np.empty((n0, n1, n2), dtype=np.float32)
    for i in range(n0):
        for j in range(n1):
            for k in range(n2):
                out[i, j, k] = _noise_at(keys, o0 + i, o1 + j, o2 + k, sw, sc)
    return out


@nb.njit(inline="always", **_OPTS)
def _appear_delta(v, inside, b, td, q2, organ_hu, app, keys, gi, gj, gk):
    """The change of one voxel under the appearance modes (``app``/``keys``: see
    ``synthgen._appearance``); mirrors ``sg_appear_delta`` of kernels/blend.cuh."""
    q = np.sqrt(q2)
    if app[2] != 0.0:  # rim: the shell q >= 1 - width is brighter than the core by app[2]
        t0 = td
        td = td - app[2] * _clamp01((q - app[0]) * app[1])
        if t0 > 0.0 and td < app[6] * t0:  # keeps app[6] of a darkening: never brighter
            td = app[6] * t0
    w = np.float32(0.0)
    if app[4] > 0.0:  # necrotic core: weight 1 inside, soft edge around q = app[3]
        w = _clamp01((app[3] - q) * app[4] + np.float32(0.5))
    n = np.float32(0.0)
    if not inside or w > 0.0:  # replaced tissue carries the scan's noise
        n = _noise_at(keys, gi, gj, gk, app[11], app[12])
    if inside:
        d = td * b
    else:
        d = b * (v - organ_hu + td - n)
    if w > 0.0:
        dn = b * (v - (app[5] + n))
        d = d + w * (dn - d)
    if app[7] > 0.0 and q < app[10]:  # calcification specks: sparse voxels replaced
        idx = _lattice_index(gi, gj, gk)
        if _uniform(keys[4], keys[5], idx) < app[7]:
            d = v - (app[8] + app[9] * _uniform(keys[6], keys[7], idx))
    return d


@nb.njit(**_OPTS)
def blend_tumor(
    orig,
    organ,
    tlo,
    thi,
    blur,
    tgrid,
    i0,
    f0,
    i1,
    f1,
    i2,
    f2,
    contrast,
    organ_hu,
    clipped,
    delta,
    q2=None,
    app=None,
    keys=None,
    off0=0,
    off1=0,
    off2=0,
):
    """Merge one tumor's darkening ``T * B * D`` into the cluster's ``delta`` (max |delta|).

    ``T`` is the texture grid ``tgrid`` interpolated trilinearly (per-axis base index ``i*``
    and fraction ``f*`` of every voxel). Inside the organ (and the tissue window) the
    published formula ``I' = I - T*B*D`` holds. Outside the organ an unclipped (exophytic)
    tumor replaces tissue with tumor tissue of intensity ``organ_hu - T*D`` weighted by ``B``.

    With ``app`` (float32 parameters) and ``keys`` (uint32 hash keys) of
    :func:`synthgen._appearance.blend_params`, the appearance modes apply (rim, necrotic
    core, calcification specks, noise where tissue is replaced); they read ``q2`` (the
    squared normalised radius from :func:`shape_mask`) and the box's lattice offset
    ``off*`` from the tumor centre. Without ``app`` the published blend runs unchanged.
    """
    nx, ny, nz = orig.shape
    gz = tgrid.shape[2]
    row = np.zeros(gz, dtype=np.float32)
    c_lo = i2[0] if nz else 0
    c_hi = min(gz, i2[nz - 1] + 2) if nz else 0
    for i in range(nx):
        a0 = i0[i]
        u0 = f0[i]
        for j in range(ny):
            a1 = i1[j]
            u1 = f1[j]
            # bilinear in (i, j) once per row of the grid, then linear along k per voxel
            w00 = np.float32((1.0 - u0) * (1.0 - u1))
            w01 = np.float32((1.0 - u0) * u1)
            w10 = np.float32(u0 * (1.0 - u1))
            w11 = np.float32(u0 * u1)
            for c in range(c_lo, c_hi):
                row[c] = (
                    w00 * tgrid[a0, a1, c]
                    + w01 * tgrid[a0, a1 + 1, c]
                    + w10 * tgrid[a0 + 1, a1, c]
                    + w11 * tgrid[a0 + 1, a1 + 1, c]
                )
            brow = blur[i, j]
            orow = orig[i, j]
            grow = organ[i, j]
            drow = delta[i, j]
            for k in range(nz):
                b = brow[k]
                v = orow[k]
                if b <= 0.0 or v < tlo or v > thi:
                    continue
                inside = grow[k]
                if not inside and clipped:
                    continue
                a2 = i2[k]
                u2 = f2[k]
                td = (row[a2] + (row[a2 + 1] - row[a2]) * u2) * contrast
                if app is None:
                    if inside:
                        d = td * b
                    else:
                        d = b * (v - organ_hu + td)
                else:
                    d = _appear_delta(
                        v, inside, b, td, q2[i, j, k], organ_hu, app, keys,
                        off0 + i, off1 + j, off2 + k,
                    )  # fmt: skip
                if abs(d) > abs(drow[k]):
                    drow[k] = d


@nb.njit(**_OPTS)
def _bbox_words(words, nz):
    """Bounding box of non-zero bytes of a mask viewed as uint64 words along the last axis."""
    nx, ny, nw = words.shape
    cnt = np.zeros(nx, dtype=np.int64)
    lo1 = np.full(nx, ny, dtype=np.int64)
    hi1 = np.full(nx, -1, dtype=np.int64)
    lo2 = np.full(nx, nz, dtype=np.int64)
    hi2 = np.full(nx, -1, dtype=np.int64)
    for i in range(nx):
        c = 0
        for j in range(ny):
            first = -1
            last = -1
            for w in range(nw):
                v = words[i, j, w]
                if v != 0:
                    if first < 0:
                        first = w
                    last = w
                    # bytes are 0 or 1: their sum is the top byte of v * 0x0101..01
                    c += (v * np.uint64(0x0101010101010101)) >> np.uint64(56)
            if first < 0:
                continue
            if j < lo1[i]:
                lo1[i] = j
            hi1[i] = j
            # byte positions inside the first and last words (little endian)
            v = words[i, j, first]
            b = 0
            while (v >> np.uint64(8 * b)) & np.uint64(0xFF) == 0:
                b += 1
            lo2[i] = min(lo2[i], first * 8 + b)
            v = words[i, j, last]
            b = 7
            while (v >> np.uint64(8 * b)) & np.uint64(0xFF) == 0:
                b -= 1
            hi2[i] = max(hi2[i], last * 8 + b)
        cnt[i] = c
    return cnt, lo1, hi1, lo2, hi2


def bbox(mask: np.ndarray):
    """``(lo0, hi0, lo1, hi1, lo2, hi2, count)`` of ``mask > 0.5`` (inclusive ``hi``).

    A C-contiguous bool mask whose last axis is a multiple of 8 is scanned 8 voxels per word;
    anything else voxel by voxel (:func:`mask_bbox`). A Fortran-ordered mask (as NIfTI files
    load) is scanned through its transpose, in memory order.
    """
    if mask.flags.f_contiguous and not mask.flags.c_contiguous:
        lo2, hi2, lo1, hi1, lo0, hi0, count = bbox(mask.T)
        return (lo0, hi0, lo1, hi1, lo2, hi2, count)
    if mask.dtype != np.bool_ or not mask.flags.c_contiguous or mask.shape[2] % 8:
        return mask_bbox(mask.view(np.uint8) if mask.dtype == np.bool_ else mask)
    words = mask.view(np.uint8).reshape(mask.shape[0], mask.shape[1], -1).view(np.uint64)
    rows, lo1, hi1, lo2, hi2 = _bbox_words(words, mask.shape[2])
    hit = np.flatnonzero(rows)
    if hit.size == 0:
        return (0, -1, 0, -1, 0, -1, 0)
    sl = (slice(hit[0], hit[-1] + 1),)
    count = int(rows.sum())
    return (
        int(hit[0]),
        int(hit[-1]),
        int(lo1[sl].min()),
        int(hi1[sl].max()),
        int(lo2[sl].min()),
        int(hi2[sl].max()),
        count,
    )


@nb.njit(**_OPTS)
def mask_bbox(mask):
    """Bounding box and voxel count of ``mask > 0.5`` in one parallel pass.

    Returns ``(lo0, hi0, lo1, hi1, lo2, hi2, count)`` with inclusive ``hi``; ``count == 0``
    when the mask is empty.
    """
    nx, ny, nz = mask.shape
    cnt = np.zeros(nx, dtype=np.int64)
    lo1 = np.full(nx, ny, dtype=np.int64)
    hi1 = np.full(nx, -1, dtype=np.int64)
    lo2 = np.full(nx, nz, dtype=np.int64)
    hi2 = np.full(nx, -1, dtype=np.int64)
    for i in range(nx):
        c = 0
        a1, b1, a2, b2 = ny, -1, nz, -1
        for j in range(ny):
            for k in range(nz):
                if mask[i, j, k] > 0.5:
                    c += 1
                    if j < a1:
                        a1 = j
                    if j > b1:
                        b1 = j
                    if k < a2:
                        a2 = k
                    if k > b2:
                        b2 = k
        cnt[i] = c
        lo1[i], hi1[i], lo2[i], hi2[i] = a1, b1, a2, b2
    total = 0
    lo0, hi0 = nx, -1
    r1lo, r1hi, r2lo, r2hi = ny, -1, nz, -1
    for i in range(nx):
        if cnt[i] > 0:
            total += cnt[i]
            if i < lo0:
                lo0 = i
            hi0 = i
            r1lo = min(r1lo, lo1[i])
            r1hi = max(r1hi, hi1[i])
            r2lo = min(r2lo, lo2[i])
            r2hi = max(r2hi, hi2[i])
    return lo0, hi0, r1lo, r1hi, r2lo, r2hi, total


@nb.njit(**_OPTS)
def apply_delta(target, orig, delta, mask, cmin, cmax, lo, hi, round_int):
    """Write ``orig - delta`` into ``target`` where ``delta != 0``; measure the tumor.

    A darkened voxel never goes below ``cmin`` (a brightened one above ``cmax``) unless it
    already was; integer outputs are rounded half to even; everything is clipped to
    ``[lo, hi]`` widened to the voxel's own value: a value already outside (a scanner's
    -3024 HU padding, a metal clip of an extended-HU scan) is never clamped into the range,
    only moved by the tumor's change within its bound. A NaN voxel (no data) stays NaN.
    Voxels with ``delta == 0`` are not written.

    Returns:
        ``(count, sum of orig - written)`` over the voxels of ``mask`` (the tumor's label).
    """
    nx, ny, nz = delta.shape
    n = 0
    acc = 0.0
    for i in range(nx):
        for j in range(ny):
            trow = target[i, j]
            orow = orig[i, j]
            drow = delta[i, j]
            mrow = mask[i, j]
            for k in range(nz):
                d = drow[k]
                o = orow[k]
                w = o
                if d != 0.0:
                    v = o - d
                    if d > 0.0:
                        v = max(v, min(o, cmin))
                    else:
                        v = min(v, max(o, cmax))
                    if round_int:
                        v = np.rint(v)
                    trow[k] = min(max(v, min(o, lo)), max(o, hi))
                    w = trow[k]
                if mrow[k]:
                    n += 1
                    acc += float(o) - float(w)
    return n, acc


@nb.njit(inline="always", **_OPTS)
def _mix32(x):
    x = np.uint32(x)
    x = np.uint32(x ^ (x >> np.uint32(16)))
    x = np.uint32(x * np.uint32(0x7FEB352D))
    x = np.uint32(x ^ (x >> np.uint32(15)))
    x = np.uint32(x * np.uint32(0x846CA68B))
    x = np.uint32(x ^ (x >> np.uint32(16)))
    return x


@nb.njit(inline="always", **_OPTS)
def _uniform(k0, k1, idx):
    h = _mix32(np.uint32(_mix32(np.uint32(idx + k0)) ^ k1))
    return np.float32(h >> np.uint32(8)) * np.float32(1.0 / 16777216.0)


@nb.njit(inline="always", **_OPTS)
def _lattice_index(i, j, k):
    return np.uint32(
        (np.uint32(i + 512) << np.uint32(20))
        | (np.uint32(j + 512) << np.uint32(10))
        | np.uint32(k + 512)
    )


@nb.njit(**_OPTS)
def window_all(m, a0, a1, b0, b1):
    """``bool(m[a0:a1, b0:b1].all())`` of a 2-D bool array (the placement's erosion test)."""
    for i in range(a0, a1):
        for j in range(b0, b1):
            if not m[i, j]:
                return False
    return True


@nb.njit(**_OPTS)
def derive_seeds_nb(seed, n):
    """``_hash.derive_seed(seed, index)`` for ``index`` in ``0..n-1`` (``seed``: uint64):
    int64 array."""
    lo = np.uint32(seed & np.uint64(0xFFFFFFFF))
    hi = np.uint32(seed >> np.uint64(32))
    out = np.empty(n, dtype=np.int64)
    for index in range(n):
        c1 = np.uint32((index * 0x9E3779B9 + 1) & 0xFFFFFFFF)
        c2 = np.uint32((index * 0x9E3779B9 + 2) & 0xFFFFFFFF)
        a = _mix32(np.uint32(lo ^ _mix32(np.uint32(hi ^ _mix32(c1)))))
        b = _mix32(np.uint32(hi ^ _mix32(np.uint32(lo ^ _mix32(c2)))))
        out[index] = ((np.int64(a) << 32) | np.int64(b)) & np.int64(0x7FFFFFFFFFFFFFFF)
    return out


@nb.njit(**_OPTS)
def stream_keys_nb(seeds, streams):
    """``_hash.stream_key`` of many seeds (``uint64``) and streams: ``(n, 2 k)`` int64."""
    n = seeds.shape[0]
    out = np.empty((n, 2 * streams.shape[0]), dtype=np.int64)
    golden = np.uint32(0x9E3779B9)
    for s in range(streams.shape[0]):
        c = _mix32(np.uint32((streams[s] * 0x9E3779B9) & 0xFFFFFFFF))
        for q in range(n):
            lo = np.uint32(seeds[q] & np.uint64(0xFFFFFFFF))
            hi = np.uint32(seeds[q] >> np.uint64(32))
            k0 = _mix32(np.uint32(lo ^ _mix32(np.uint32(hi ^ c))))
            k1 = _mix32(np.uint32(hi ^ _mix32(np.uint32(k0 ^ golden))))
            out[q, 2 * s] = k0
            out[q, 2 * s + 1] = k1
    return out


@nb.njit(**_OPTS)
def lattice_uniform(k0, k1, a0, n0, a1, n1, a2, n2, shift):
    """Counter-based uniforms (minus ``shift``) on lattice points ``a + (0..n-1)`` per axis."""
    out = np.empty((n0, n1, n2), dtype=np.float32)
    key0 = np.uint32(k0)
    key1 = np.uint32(k1)
    for i in range(n0):
        for j in range(n1):
            for k in range(n2):
                out[i, j, k] = _uniform(key0, key1, _lattice_index(a0 + i, a1 + j, a2 + k)) - shift
    return out


@nb.njit(**_OPTS)
def block_sums(
    z, inv_norm0, inv_norm1, inv_norm2, zscale, base, scale, k0, k1, b0, b1, b2, n_cells
):
    """Bernoulli block fractions ``S / n`` from the smoothed noise ``z`` at block centres.

    ``p = base + scale * clip(0.5 + zscale * z * inv_norm0 inv_norm1 inv_norm2, 0, 1)``; the
    fraction of ``n`` Bernoulli(p) cells is drawn with its exact mean ``p`` and variance
    ``p (1 - p) / n`` from one counter-based uniform (key ``k0, k1``; block ``(i, j, k)`` has
    lattice index ``(b0 + i, b1 + j, b2 + k)``). The sigma_b smoothing that follows averages
    hundreds of blocks, so only these two moments reach the texture (its distribution is
    Gaussian by the central limit theorem whatever the per-block law).
    """
    nx, ny, nz = z.shape
    out = np.empty((nx, ny, nz), dtype=np.float32)
    key0 = np.uint32(k0)
    key1 = np.uint32(k1)
    inv_n = 1.0 / n_cells
    sqrt12 = np.sqrt(12.0)
    for i in range(nx):
        for j in range(ny):
            nij = zscale * inv_norm0[i] * inv_norm1[j]
            for k in range(nz):
                x = 0.5 + nij * z[i, j, k] * inv_norm2[k]
                x = min(max(x, 0.0), 1.0)
                p = base + scale * x
                u = _uniform(key0, key1, _lattice_index(b0 + i, b1 + j, b2 + k))
                sd = np.sqrt(max(p * (1.0 - p), 0.0) * inv_n)
                out[i, j, k] = p + sd * sqrt12 * (u - 0.5)
    return out


@nb.njit(**_OPTS)
def merge_strongest(dst, src):
    """``dst = src`` wherever ``src`` is the stronger change (overlapping tumors: strongest
    change wins): ``|src| > |dst|``, or equal magnitudes and ``src > dst`` (a darkening and a
    brightening of the same size: the darkening). The rule picks the same value whatever
    the order in which a voxel's changes meet, so every tumor of an overlap writes the same
    value there, in any order (the GPU's blocks run in none)."""
    nx, ny, nz = dst.shape
    for i in range(nx):
        for j in range(ny):
            for k in range(nz):
                v = src[i, j, k]
                d = dst[i, j, k]
                if abs(v) > abs(d) or (abs(v) == abs(d) and v > d):
                    dst[i, j, k] = v


@nb.njit(inline="always", **_OPTS)
def _band_into(out_pos, lat0, n_lat, step, sigma, truncate, kk, start, w, tab, big):
    """:func:`gaussian_band_nb` written into ``start`` (``n``) and ``w`` (``n * kk``, every
    element), without allocating. With ``big >= 0`` (whole-number positions, step and
    sigma), each weight is looked up in ``tab`` (:func:`_gauss_table`) by its integer
    distance instead of computed: the same operations on the same numbers."""
    for o in range(out_pos.shape[0]):
        first = int(np.ceil((out_pos[o] - truncate * sigma) / step - 1e-9)) - lat0
        st = min(max(first, 0), n_lat - kk)
        start[o] = st
        if big >= 0:
            k0 = int(out_pos[o]) - (lat0 + st) * int(step)
            for t in range(kk):
                k = k0 - t * int(step)
                w[o * kk + t] = tab[k + big] if -big <= k <= big else 0.0
        else:
            for t in range(kk):
                d = (out_pos[o] - (lat0 + st + t) * step) / sigma
                w[o * kk + t] = np.exp(-0.5 * d * d) if abs(d) <= truncate else 0.0


@nb.njit(**_OPTS)
def _np_sum(a, lo, n):
    """``np.sum(a[lo:lo + n])`` of a contiguous float64 array in NumPy's order (its pairwise
    summation: below 8 terms one by one from 0; up to 128 in eight running sums combined as
    ((0 + 1) + (2 + 3)) + ((4 + 5) + (6 + 7)), then the rest; above, the sum of two halves
    split at a multiple of 8, walked here with an explicit stack)."""
    if n <= 128:
        return _np_sum_block(a, lo, n)
    s_lo = np.empty(64, dtype=np.int64)
    s_n = np.empty(64, dtype=np.int64)
    s_stage = np.zeros(64, dtype=np.int64)
    s_left = np.empty(64)
    top = 0
    s_lo[0], s_n[0] = lo, n
    ret = 0.0
    while top >= 0:
        m = s_n[top]
        if m <= 128:
            ret = _np_sum_block(a, s_lo[top], m)
            top -= 1
            continue
        h = m // 2
        h -= h % 8
        st = s_stage[top]
        if st == 2:  # both halves done: ret holds the right one
            ret = s_left[top] + ret
            top -= 1
            continue
        if st == 1:  # the left half done
            s_left[top] = ret
        s_stage[top] = st + 1
        s_lo[top + 1] = s_lo[top] + (h if st == 1 else 0)
        s_n[top + 1] = m - h if st == 1 else h
        s_stage[top + 1] = 0
        top += 1
    return ret


@nb.njit(**_OPTS)
def _np_sum_block(a, lo, n):
    """:func:`_np_sum` of at most 128 terms."""
    if n < 8:
        res = 0.0
        for i in range(n):
            res += a[lo + i]
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = 8
    while i < n - n % 8:
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@nb.njit(**_OPTS)
def blur_kernels_nb(sigma, truncate):
    """The mask blur's float32 kernels of many ``sigma`` (voxels), packed: ``(kernels,
    offset, length)`` per sigma. Each is ``_geometry.gaussian_kernel1d(sigma, truncate)``
    (``exp(-0.5 (x / sigma)^2)`` over ``x = -r..r``, ``r = int(truncate sigma + 0.5)``,
    divided by its NumPy sum; ``[1]`` for ``sigma <= 1e-3``) rounded to float32: the same
    float64 operations in the same order (both render paths build their kernels here)."""
    m = sigma.shape[0]
    lens = np.empty(m, dtype=np.int64)
    width = 1
    for i in range(m):
        lens[i] = 1 if sigma[i] <= 1e-3 else 2 * int(truncate * sigma[i] + 0.5) + 1
        width = max(width, lens[i])
    offs = np.empty(m, dtype=np.int64)
    total = 0
    for i in range(m):
        offs[i] = total
        total += lens[i]
    out = np.empty(total, dtype=np.float32)
    k = np.empty(width)
    for i in range(m):
        s, n, o = sigma[i], lens[i], offs[i]
        if s <= 1e-3:
            out[o] = 1.0
            continue
        r = (n - 1) // 2
        for j in range(n):
            d = float(j - r) / s
            k[j] = np.exp(-0.5 * (d * d))
        tot = _np_sum(k, 0, n)
        for j in range(n):
            out[o + j] = np.float32(k[j] / tot)
    return out, offs, lens


@nb.njit(**_OPTS)
def _gauss_table(sigma, truncate):
    """The band weights of integer distances ``-big..big`` (``big = floor(truncate sigma) +
    1``; beyond, every weight is 0) for a whole-number ``sigma``, as :func:`_band_into`
    computes each: ``(table, big)``."""
    big = int(np.floor(truncate * sigma)) + 1
    tab = np.empty(2 * big + 1)
    for k in range(-big, big + 1):
        d = float(k) / sigma
        tab[k + big] = np.exp(-0.5 * d * d) if abs(d) <= truncate else 0.0
    return tab, big


@nb.njit(**_OPTS)
def gaussian_band_nb(out_pos, lat0, n_lat, step, sigma, truncate):
    """Band form of Gaussian lattice weights (see ``_geometry.gaussian_band``, the reference)."""
    n = out_pos.shape[0]
    kk = min(n_lat, int(np.floor(2.0 * truncate * sigma / step)) + 2)
    start = np.empty(n, dtype=np.int64)
    w = np.empty(n * kk, dtype=np.float32)
    _band_into(out_pos, lat0, n_lat, step, sigma, truncate, kk, start, w, np.empty(0), -1)
    return start, w.reshape(n, kk)


@nb.njit(inline="always", **_OPTS)
def _sum_squares(w):
    """``(w.astype(float64) ** 2).sum()`` of a short float32 row, in NumPy's own order
    (pairwise summation: sequential below 8 elements, 8 partial sums up to 128)."""
    n = w.shape[0]
    if n < 8:
        res = 0.0
        for i in range(n):
            x = np.float64(w[i])
            res += x * x
        return res
    if n > 128:
        raise ValueError("row too long")
    # the 8 partial sums as scalars (no allocation per row)
    r0 = np.float64(w[0]) * np.float64(w[0])
    r1 = np.float64(w[1]) * np.float64(w[1])
    r2 = np.float64(w[2]) * np.float64(w[2])
    r3 = np.float64(w[3]) * np.float64(w[3])
    r4 = np.float64(w[4]) * np.float64(w[4])
    r5 = np.float64(w[5]) * np.float64(w[5])
    r6 = np.float64(w[6]) * np.float64(w[6])
    r7 = np.float64(w[7]) * np.float64(w[7])
    i = 8
    while i < n - n % 8:
        r0 += np.float64(w[i]) * np.float64(w[i])
        r1 += np.float64(w[i + 1]) * np.float64(w[i + 1])
        r2 += np.float64(w[i + 2]) * np.float64(w[i + 2])
        r3 += np.float64(w[i + 3]) * np.float64(w[i + 3])
        r4 += np.float64(w[i + 4]) * np.float64(w[i + 4])
        r5 += np.float64(w[i + 5]) * np.float64(w[i + 5])
        r6 += np.float64(w[i + 6]) * np.float64(w[i + 6])
        r7 += np.float64(w[i + 7]) * np.float64(w[i + 7])
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        x = np.float64(w[i])
        res += x * x
        i += 1
    return res


@nb.njit(**_OPTS)
def axis_tables_nb(o_lo, o_hi, h_b, sa, sb):
    """The per-axis tables of texture recipes (``_texture._axis_recipe``, one per row: grid
    indices ``o_lo..o_hi``, block size ``h_b``, ``sigma_a``, ``sigma_b``), all in one call.

    Returns ``(ints, origin, starts, weights, inv_norm, ok)``: ``ints`` rows are (lattice
    start, lattice size, first block, blocks, grid offset, grid size, band width, row offset
    into ``starts``/``inv_norm``, offset into ``weights``); ``origin`` the grid origin (mm);
    the band starts, weights (``blocks x band width`` each) and norms of all rows packed;
    ``ok`` false where a lattice leaves the hash's +-512 cells.
    """
    m = o_lo.shape[0]
    ints = np.empty((m, 9), dtype=np.int64)
    origin = np.empty(m)
    ok = np.ones(m, dtype=np.bool_)
    n_rows = 0
    n_w = 0
    truncate = 3.0
    for q in range(m):
        hb = float(h_b[q])
        # Bernoulli blocks within 3 sigma_b of the grid (lattice_range)
        b0 = int(np.floor((o_lo[q] * h_b[q] - 3.0 * sb[q]) / hb))
        b1 = int(np.ceil((o_hi[q] * h_b[q] + 3.0 * sb[q]) / hb))
        h_a = max(sa[q], hb)
        # noise lattice covering the block centres within 3 sigma_a
        l0 = int(np.floor((b0 * hb - 3.0 * sa[q]) / h_a))
        l1 = int(np.ceil((b1 * hb + 3.0 * sa[q]) / h_a))
        n_lat = l1 - l0 + 1
        kk = min(n_lat, int(np.floor(2.0 * truncate * sa[q] / h_a)) + 2)
        r = int(np.floor(3.0 * sb[q] / hb))
        nbk = b1 - b0 + 1
        ok[q] = l0 >= -512 and l1 < 512 and b0 >= -512 and b1 < 512
        ints[q, 0] = l0
        ints[q, 1] = n_lat
        ints[q, 2] = b0
        ints[q, 3] = nbk
        ints[q, 4] = o_lo[q] - r - b0
        ints[q, 5] = o_hi[q] - o_lo[q] + 1
        ints[q, 6] = kk
        ints[q, 7] = n_rows
        ints[q, 8] = n_w
        origin[q] = o_lo[q] * hb
        n_rows += nbk
        n_w += nbk * kk
    starts = np.empty(n_rows, dtype=np.int64)
    weights = np.empty(n_w, dtype=np.float32)
    inv = np.empty(n_rows)
    centres = np.empty(max(n_rows, 1))
    # Whole-millimetre sigma_a (every preset's) and integer block sizes: block centres and
    # lattice points are whole numbers, so each weight is the Gaussian of an integer distance
    # over sigma_a, looked up in a table made once per sigma (2 K + 1 values, K = 3 sigma_a +
    # 1) instead of an exp per weight.
    tab = np.empty(0)
    tab_s = -1.0
    memo = np.empty((2, max(n_rows, 1)), dtype=np.int64)  # a row's distinct rows (scratch)
    # the rows by sigma_a (any order writes the same outputs): one table per distinct sigma
    for q in np.argsort(sa, kind="mergesort"):
        hb = float(h_b[q])
        nbk = ints[q, 3]
        kk = ints[q, 6]
        at = ints[q, 7]
        aw = ints[q, 8]
        s = sa[q]
        step = max(s, hb)
        for b in range(nbk):
            centres[at + b] = float(ints[q, 2] + b) * hb
        if ok[q] and s == np.floor(s) and step == np.floor(step) and s <= 65536.0:
            if s != tab_s:
                tab, _ = _gauss_table(s, truncate)
                tab_s = s
            _band_rows_tab(centres[at : at + nbk], ints[q, 0], ints[q, 1], int(step), truncate,
                           s, kk, starts[at : at + nbk], weights[aw : aw + nbk * kk],
                           inv[at : at + nbk], tab, memo)  # fmt: skip
            continue
        _band_into(centres[at : at + nbk], ints[q, 0], ints[q, 1], step, s, truncate, kk,
                   starts[at : at + nbk], weights[aw : aw + nbk * kk], tab, -1)  # fmt: skip
        for b in range(nbk):
            inv[at + b] = 1.0 / np.sqrt(_sum_squares(weights[aw + b * kk : aw + (b + 1) * kk]))
    return ints, origin, starts, weights, inv, ok


@nb.njit(**_OPTS)
def _band_rows_tab(out_pos, lat0, n_lat, step, truncate, sigma, kk, start, w, inv, tab, memo):
    """:func:`_band_into` with a Gaussian table (whole-number positions, ``step`` and
    ``sigma``), and each row's inverse norm (as ``axis_tables_nb`` computes it): a row's
    weights depend only on its integer offset ``k0`` from its first lattice point, so a row
    whose ``k0`` an earlier row of the call had copies that row's weights and norm instead of
    computing them (the same numbers; block centres step through a few offsets).
    ``memo``: ``(2, >= len(out_pos))`` int64 scratch (each distinct row's ``k0`` and index)."""
    big = (tab.shape[0] - 1) // 2
    n_memo = 0
    for o in range(out_pos.shape[0]):
        first = int(np.ceil((out_pos[o] - truncate * sigma) / step - 1e-9)) - lat0
        st = min(max(first, 0), n_lat - kk)
        start[o] = st
        k0 = int(out_pos[o]) - (lat0 + st) * step
        hit = -1
        for u in range(n_memo):
            if memo[0, u] == k0:
                hit = memo[1, u]
                break
        if hit >= 0:
            for t in range(kk):
                w[o * kk + t] = w[hit * kk + t]
            inv[o] = inv[hit]
            continue
        for t in range(kk):
            k = k0 - t * step
            w[o * kk + t] = tab[k + big] if -big <= k <= big else 0.0
        inv[o] = 1.0 / np.sqrt(_sum_squares(w[o * kk : (o + 1) * kk]))
        memo[0, n_memo] = k0
        memo[1, n_memo] = o
        n_memo += 1


@nb.njit(inline="always", **_OPTS)
def _block_size(sigma_b):
    """Edge of a Bernoulli block in mm for ``sigma_b`` (``_texture.block_size_mm``)."""
    return max(int(np.floor(sigma_b / 2.0)), 1)


@nb.njit(inline="always", **_OPTS)
def _grid_range(lo, hi, h_b):
    """First and last texture grid index covering ``[lo, hi]`` mm plus one block of ``h_b``
    mm (``_texture.grid_index_range``)."""
    step = float(h_b)
    return int(np.floor((lo - step) / step)), int(np.ceil((hi + step) / step))


@nb.njit(**_OPTS)
def block_sizes_nb(sigma_b):
    """:func:`_block_size` of a 1-D float64 array (int64)."""
    out = np.empty(sigma_b.shape[0], dtype=np.int64)
    for q in range(sigma_b.shape[0]):
        out[q] = _block_size(sigma_b[q])
    return out


@nb.njit(**_OPTS)
def texture_consts_nb(P):
    """Block sizes (int64, :func:`block_sizes_nb`) and the texture recipe's scalars
    (:func:`synthgen._texture.texture_consts`) of tumors with texture parameter rows ``P``
    (``(n, 7)`` float64, :func:`synthgen._texture.texture_params`), in one call."""
    n = P.shape[0]
    h_b = np.empty(n, dtype=np.int64)
    sc = np.empty((n, 6))
    r12 = math.sqrt(12.0)
    for q in range(n):
        h = _block_size(P[q, 1])
        h_b[q] = h
        sc[q, 0] = r12 / (2.0 * P[q, 2])
        sc[q, 1] = P[q, 3]
        sc[q, 2] = P[q, 4]
        sc[q, 3] = float(h * h * h)
        sc[q, 4] = P[q, 5]
        sc[q, 5] = P[q, 6]
    return h_b, sc


@nb.njit(**_OPTS)
def grid_ranges_nb(lo, hi, h_b):
    """:func:`_grid_range` of 1-D float64 arrays of one length: ``(first, last)`` int64."""
    o_lo = np.empty(lo.shape[0], dtype=np.int64)
    o_hi = np.empty(lo.shape[0], dtype=np.int64)
    for q in range(lo.shape[0]):
        o_lo[q], o_hi[q] = _grid_range(lo[q], hi[q], h_b[q])
    return o_lo, o_hi


@nb.njit(**_OPTS)
def texture_axes_nb(lo_mm, hi_mm, sa, sb):
    """:func:`axis_tables_nb` of the three axes of ``n`` tumors' texture grids, from their
    boxes (``(n, 3)`` mm from the centre) and texture sigmas (``(n,)``): the block size
    (:func:`_block_size`) and grid index range (:func:`_grid_range`) of each, in one call for
    the GPU driver.

    Returns ``(fields, origin, h_b, starts, weights, inv_norm, ok)``: ``fields`` ``(9, n, 3)``
    holds the nine integer columns of :func:`axis_tables_nb` per tumor and axis, ``origin``
    ``(n, 3)``, ``h_b`` ``(n,)`` int64; the packed tables as there.
    """
    n = lo_mm.shape[0]
    h_b = np.empty(n, dtype=np.int64)
    o_lo = np.empty(3 * n, dtype=np.int64)
    o_hi = np.empty(3 * n, dtype=np.int64)
    h3 = np.empty(3 * n, dtype=np.int64)
    sa3 = np.empty(3 * n)
    sb3 = np.empty(3 * n)
    for q in range(n):
        h = _block_size(sb[q])
        h_b[q] = h
        for a in range(3):
            o_lo[3 * q + a], o_hi[3 * q + a] = _grid_range(lo_mm[q, a], hi_mm[q, a], h)
            h3[3 * q + a] = h
            sa3[3 * q + a] = sa[q]
            sb3[3 * q + a] = sb[q]
    ints, origin, starts, weights, inv, ok = axis_tables_nb(o_lo, o_hi, h3, sa3, sb3)
    fields = np.empty((9, n, 3), dtype=np.int64)
    for f in range(9):
        for q in range(n):
            for a in range(3):
                fields[f, q, a] = ints[3 * q + a, f]
    return fields, origin.reshape(n, 3), h_b, starts, weights, inv, ok


@nb.njit(**_OPTS)
def interp_coords_nb(pos, origin, step, n):
    """Trilinear base index and fraction of positions on a grid axis (see
    ``_texture.interp_coords``, the reference)."""
    m = pos.shape[0]
    i0 = np.empty(m, dtype=np.int64)
    f = np.empty(m, dtype=np.float32)
    top = max(n - 2, 0)
    for q in range(m):
        u = (pos[q] - origin) / step
        b = min(max(int(np.floor(u)), 0), top)
        i0[q] = b
        f[q] = min(max(u - b, 0.0), 1.0)
    return i0, f


@nb.njit(**_OPTS)
def overlap_partners_nb(job_of, lo, hi):
    """Per row, the ascending rows of the same job whose boxes ``[lo, hi)`` overlap (the GPU
    merge's partners): ``(count, offset, flat)``, row ``r``'s partners
    ``flat[offset[r] : offset[r] + count[r]]``; ``flat`` holds at least one element.
    Quadratic in the rows of a job only (rows sorted by job first)."""
    n = job_of.shape[0]
    order = np.argsort(job_of, kind="mergesort")
    count = np.zeros(n, dtype=np.int64)
    # pass 1: counts; pass 2: the partners (a job's rows are contiguous in ``order``)
    off = np.zeros(n, dtype=np.int64)
    flat = np.zeros(1, dtype=np.int64)
    fill = off
    for p in range(2):
        if p == 1:
            off = np.cumsum(count) - count
            flat = np.zeros(max(int(count.sum()), 1), dtype=np.int64)
            fill = off.copy()
        s = 0
        while s < n:
            e = s
            while e < n and job_of[order[e]] == job_of[order[s]]:
                e += 1
            for x in range(s, e):
                r = order[x]
                for y in range(s, e):
                    c = order[y]
                    if c == r:
                        continue
                    hit = True
                    for a in range(3):
                        if not (lo[r, a] < hi[c, a] and lo[c, a] < hi[r, a]):
                            hit = False
                    if hit:
                        if p == 0:
                            count[r] += 1
                        else:
                            flat[fill[r]] = c
                            fill[r] += 1
            s = e
    return count, off, flat


@nb.njit(**_OPTS)
def conservative_boxes_nb(centre, rot, radii, blur, clip, disp_max, sp, shape, has_ob, ob_lo,
                          ob_hi, truncate):  # fmt: skip
    """``rendering.conservative_boxes`` (see there) of ``n`` tumors; the organ's box
    ``ob_lo``/``ob_hi`` applies where ``clip`` and ``has_ob``. Returns ``(lo, hi, ok, pad)``."""
    n = centre.shape[0]
    lo = np.empty((n, 3), dtype=np.int64)
    hi = np.empty((n, 3), dtype=np.int64)
    pad = np.empty((n, 3), dtype=np.int64)
    ok = np.empty(n, dtype=np.bool_)
    for q in range(n):
        ok[q] = True
        for a in range(3):
            # the radius bound along axis a: |row a of R diag(radii)|
            s = 0.0
            for c in range(3):
                x = rot[q, a, c] * radii[q, c]
                s += x * x
            r = int(np.ceil((np.sqrt(s) + disp_max[q]) / sp[q, a]))
            lo_a = centre[q, a] - r - 1
            hi_a = centre[q, a] + r + 2
            if clip[q] and has_ob[q]:
                lo_a = max(lo_a, ob_lo[q, a])
                hi_a = min(hi_a, ob_hi[q, a])
            lo[q, a] = max(lo_a, 0)
            hi[q, a] = min(hi_a, shape[q, a])
            pad[q, a] = int(np.ceil(truncate * blur[q] / sp[q, a])) + 1
            if hi[q, a] <= lo[q, a]:
                ok[q] = False
    return lo, hi, ok, pad


@nb.njit(**_OPTS)
def trilinear_box(grid, i0, f0, i1, f1, i2, f2):
    """:func:`synthgen._texture.sample_trilinear` in one pass, the same float32 values: per
    voxel the eight corners in its order, each ``((v * w0) * w1) * w2`` in float32 (``w`` the
    fraction or ``1 - `` it, in float32), added in float64 from 0, rounded to float32 at the
    end. ``i*``, ``f*``: each axis's base indices and fractions (``interp_coords``)."""
    out = np.empty((i0.size, i1.size, i2.size), dtype=np.float32)
    for a in range(i0.size):
        ia, fa = i0[a], f0[a]
        for b in range(i1.size):
            ib, fb = i1[b], f1[b]
            for c in range(i2.size):
                out[a, b, c] = _trilinear_at(grid, ia, fa, ib, fb, i2[c], f2[c])
    return out


@nb.njit(inline="always", **_OPTS)
def _trilinear_at(grid, ia, fa, ib, fb, ic, fc):
    """One voxel of :func:`trilinear_box` (float32)."""
    one = np.float32(1.0)
    acc = 0.0
    for c0 in range(2):
        w0 = fa if c0 else one - fa
        for c1 in range(2):
            w1 = fb if c1 else one - fb
            for c2 in range(2):
                w2 = fc if c2 else one - fc
                v = grid[ia + c0, ib + c1, ic + c2]
                acc += np.float64(((v * w0) * w1) * w2)
    return np.float32(acc)


@nb.njit(inline="always", **_OPTS)
def _root(parent, a):
    while parent[a] != a:
        parent[a] = parent[parent[a]]  # (path halving)
        a = parent[a]
    return a


def large_components(m, min_size):
    """The voxels of ``m`` (3-D bool) in 26-connected components of at least ``min_size``
    voxels (bool): ``ndimage.label`` with a full 3x3x3 structure, its sizes counted and the
    small components dropped. Work grows with the set voxels, not the box: they are listed
    in C order (``np.flatnonzero``) and joined by union-find, each to its 13 neighbours
    before it (``_components_of``)."""
    m = np.asarray(m)
    flat = np.flatnonzero(m)
    out = np.zeros(m.shape, dtype=np.bool_)
    if flat.size:
        keep = _components_of(flat, *m.shape, min_size)
        out.reshape(-1)[flat[keep]] = True
    return out


@nb.njit(**_OPTS)
def _components_of(flat, n0, n1, n2, min_size):
    """For each set voxel (flat C-order indices ``flat``, ascending, of an ``(n0, n1, n2)``
    box) whether its 26-connected component has at least ``min_size`` voxels. Each voxel
    is joined to its 13 neighbours before it in C order: those of the three rows above it
    in the previous plane and of the row before it (three voxels each), and the voxel before
    it in its row. Per such row offset a cursor into ``flat`` only moves forward (the
    voxels are visited in C order), so the work grows with the set voxels alone."""
    count = flat.size
    parent = np.arange(count)
    dis = (-1, -1, -1, 0, 0)
    djs = (-1, 0, 1, -1, 0)
    cur = np.zeros(5, dtype=np.int64)
    for a in range(count):
        f = flat[a]
        r = f // n2
        k = f - r * n2
        i = r // n1
        j = r - i * n1
        for q in range(5):
            di, dj = dis[q], djs[q]
            c = cur[q]
            first = f + (di * n1 + dj) * n2 - 1  # (column k - 1 of the neighbour row)
            while c < count and flat[c] < first:
                c += 1
            cur[q] = c
            ii, jj = i + di, j + dj
            if ii < 0 or jj < 0 or jj >= n1:
                continue
            row = (ii * n1 + jj) * n2
            kmin = max(k - 1, 0)
            kmax = min(k + 1, n2 - 1) if q < 4 else k - 1  # (its own row: only k - 1)
            b = c
            while b < count and flat[b] <= row + kmax:
                if flat[b] >= row + kmin:
                    ra, rb = _root(parent, a), _root(parent, b)
                    if ra != rb:
                        if ra < rb:
                            parent[rb] = ra
                        else:
                            parent[ra] = rb
                b += 1
    size = np.zeros(count, dtype=np.int64)
    for a in range(count):
        size[_root(parent, a)] += 1
    keep = np.empty(count, dtype=np.bool_)
    for a in range(count):
        keep[a] = size[_root(parent, a)] >= min_size
    return keep


def component_box(m, s0, s1, s2, pad=0):
    """The 26-connected component of ``m`` (3-D bool) through its set voxel ``(s0, s1, s2)``
    by a flood fill from it (the voxels ``ndimage.label`` would give that voxel's label, at a
    cost that grows with the component rather than the box): ``(comp, lo0, lo1, lo2)``, the
    component cropped to its bounding box grown by ``pad`` voxels (within ``m``) and the
    box's first index per axis (``lo0 == -1`` when the voxel is not set)."""
    none = np.empty(0)
    return _flood_fill(m, s0, s1, s2, False, none, none, none, 0.0, 0.0, 0.0, 0.0, 0.0, pad)


def wall_component(org, s0, s1, s2, x0, x1, x2, a0, a1, a2, axial, reach):
    """A wall tumor's component (``synthgen._hollow.render_wall``): the 26-connected
    component through ``(s0, s1, s2)`` of the organ voxels of its cylinder, by a flood fill
    that tests the cylinder only at the voxels it reaches, so its cost grows with the
    component rather than with the box.

    A voxel ``(i, j, k)`` of ``org`` (bool, the box) is in the cylinder when ``|s| <= axial``
    and ``rho <= reach``, ``s = x0[i] a0 + x1[j] a1 + x2[k] a2`` (``x*``: the axes' mm offsets
    from the centre, ``a*`` the axis) and ``rho`` the distance from the axis: the float64
    operations of the NumPy expressions of ``render_wall`` in their order, the same bits.

    Returns ``(comp, lo0, lo1, lo2)``: the component cropped to its bounding box (bool) and
    the box's first index per axis; ``lo0 == -1`` (and an empty ``comp``) when the seed is
    not in the cylinder.
    """
    return _flood_fill(org, s0, s1, s2, True, x0, x1, x2, a0, a1, a2, axial, reach, 0)


@nb.njit(**_OPTS)
def _flood_fill(m, s0, s1, s2, cyl, x0, x1, x2, a0, a1, a2, axial, reach, pad):
    """The 26-connected component through ``(s0, s1, s2)`` of the voxels of ``m`` (and, with
    ``cyl``, of the cylinder: ``_in_cylinder``), each voxel tested once, when first reached:
    ``(comp cropped to its bounding box grown by pad within m, lo0, lo1, lo2)``,
    ``lo0 == -1`` when the seed is not in. (The component and its box do not depend on the
    order voxels are reached in.)"""
    n0, n1, n2 = m.shape
    if not _inside(m, s0, s1, s2, cyl, x0, x1, x2, a0, a1, a2, axial, reach):
        return np.zeros((0, 0, 0), dtype=np.bool_), -1, -1, -1
    # 0: not tested, 1: in the component, 2: tested, not in; on the box grown by a voxel on
    # every side, that border "tested, not in": a voxel's neighbours are then a fixed offset
    # away in the flat array, without bounds tests (and a stack of (i, j, k) instead of flat
    # indices: no divisions)
    q1, q2 = n1 + 2, n2 + 2
    q12 = q1 * q2
    state = np.zeros((n0 + 2) * q12, dtype=np.uint8)
    for i in range(n0 + 2):
        for j in range(q1):
            if i == 0 or i == n0 + 1 or j == 0 or j == q1 - 1:
                for k in range(q2):
                    state[i * q12 + j * q2 + k] = 2
            else:
                state[i * q12 + j * q2] = 2
                state[i * q12 + j * q2 + q2 - 1] = 2
    stack = np.empty((n0 * n1 * n2, 3), dtype=np.int32)
    state[(s0 + 1) * q12 + (s1 + 1) * q2 + s2 + 1] = 1
    stack[0, 0], stack[0, 1], stack[0, 2] = s0, s1, s2
    top = 1
    lo0, hi0, lo1, hi1, lo2, hi2 = s0, s0, s1, s1, s2, s2
    while top > 0:
        top -= 1
        i, j, k = np.int64(stack[top, 0]), np.int64(stack[top, 1]), np.int64(stack[top, 2])
        lo0, hi0 = min(lo0, i), max(hi0, i)
        lo1, hi1 = min(lo1, j), max(hi1, j)
        lo2, hi2 = min(lo2, k), max(hi2, k)
        at = (i + 1) * q12 + (j + 1) * q2 + (k + 1)
        for di in range(-1, 2):
            for dj in range(-1, 2):
                row = at + di * q12 + dj * q2
                for dk in range(-1, 2):
                    if state[row + dk] == 0:
                        ii, jj, kk = i + di, j + dj, k + dk
                        if _inside(m, ii, jj, kk, cyl, x0, x1, x2, a0, a1, a2, axial, reach):
                            state[row + dk] = 1
                            stack[top, 0], stack[top, 1], stack[top, 2] = ii, jj, kk
                            top += 1
                        else:
                            state[row + dk] = 2
    lo0, lo1, lo2 = max(lo0 - pad, 0), max(lo1 - pad, 0), max(lo2 - pad, 0)
    hi0, hi1, hi2 = min(hi0 + pad, n0 - 1), min(hi1 + pad, n1 - 1), min(hi2 + pad, n2 - 1)
    comp = np.empty((hi0 - lo0 + 1, hi1 - lo1 + 1, hi2 - lo2 + 1), dtype=np.bool_)
    for i in range(lo0, hi0 + 1):
        for j in range(lo1, hi1 + 1):
            for k in range(lo2, hi2 + 1):
                comp[i - lo0, j - lo1, k - lo2] = state[(i + 1) * q12 + (j + 1) * q2 + k + 1] == 1
    return comp, lo0, lo1, lo2


@nb.njit(inline="always", **_OPTS)
def _inside(m, i, j, k, cyl, x0, x1, x2, a0, a1, a2, axial, reach):
    if cyl:
        return _in_cylinder(m, i, j, k, x0, x1, x2, a0, a1, a2, axial, reach)
    return m[i, j, k]


@nb.njit(inline="always", **_OPTS)
def _in_cylinder(org, i, j, k, x0, x1, x2, a0, a1, a2, axial, reach):
    if not org[i, j, k]:
        return False
    s, p0, p1, p2 = _axial(x0[i], x1[j], x2[k], a0, a1, a2)
    return abs(s) <= axial and np.sqrt(p0 * p0 + p1 * p1 + p2 * p2) <= reach


@nb.njit(**_OPTS)
def cylinder_mask(org, x0, x1, x2, a0, a1, a2, axial, reach):
    """The organ's voxels in the cylinder (``_in_cylinder`` at every voxel of the box): for
    the wall render's fallback when its centre is not in the cylinder."""
    n0, n1, n2 = org.shape
    out = np.zeros((n0, n1, n2), dtype=np.bool_)
    for i in range(n0):
        for j in range(n1):
            for k in range(n2):
                out[i, j, k] = _in_cylinder(org, i, j, k, x0, x1, x2, a0, a1, a2, axial, reach)
    return out


@nb.njit(inline="always", **_OPTS)
def _axial(u0, u1, u2, a0, a1, a2):
    """Offset ``(u0, u1, u2)`` (mm) split along the unit axis ``a``: ``(s, p0, p1, p2)``, its
    axial coordinate and its part across the axis (``render_wall``'s NumPy operations)."""
    s = u0 * a0 + u1 * a1 + u2 * a2
    return s, u0 - s * a0, u1 - s * a1, u2 - s * a2


@nb.njit(**_OPTS)
def outer_wall(comp, org, lo0, lo1, lo2):
    """The voxels of ``comp`` (bool, a crop of ``org``'s box starting at ``(lo0, lo1, lo2)``)
    with a face neighbour outside ``org`` (bool, the box); beyond the box's faces the box's
    edge voxel stands in (``np.pad`` ``edge``: the organ may continue past the box)."""
    n0, n1, n2 = org.shape
    c0, c1, c2 = comp.shape
    out = np.zeros((c0, c1, c2), dtype=np.bool_)
    for a in range(c0):
        for b in range(c1):
            for c in range(c2):
                if not comp[a, b, c]:
                    continue
                i, j, k = a + lo0, b + lo1, c + lo2
                out[a, b, c] = not (
                    org[max(i - 1, 0), j, k]
                    and org[min(i + 1, n0 - 1), j, k]
                    and org[i, max(j - 1, 0), k]
                    and org[i, min(j + 1, n1 - 1), k]
                    and org[i, j, max(k - 1, 0)]
                    and org[i, j, min(k + 1, n2 - 1)]
                )
    return out


@nb.njit(inline="always", **_OPTS)
def _np_clip(x, lo, hi):
    """``np.clip`` of one value: NaN stays NaN, a value equal to a bound (a zero of either
    sign at a bound of 0) stays as it is."""
    if x < lo:
        x = lo
    if x > hi:
        x = hi
    return x


@nb.njit(**_OPTS)
def wall_arc(wall, x0, x1, x2, a0, a1, a2, n0, n1, n2, smax, cmin):
    """The voxels of ``wall`` (bool, a box) with ``|s| <= smax`` and
    ``cos(angle to normal) >= cmin`` around the axis, and their distances from the axis
    (``synthgen._hollow.render_wall``'s float64 NumPy expressions, the same bits; ``x*``: the
    box's mm offsets from the centre per axis). Returns ``(mask, rho)``, ``rho`` in C order."""
    c0, c1, c2 = wall.shape
    out = np.zeros((c0, c1, c2), dtype=np.bool_)
    rho_out = np.empty(c0 * c1 * c2, dtype=np.float64)
    n = 0
    for a in range(c0):
        for b in range(c1):
            for c in range(c2):
                if not wall[a, b, c]:
                    continue
                s, p0, p1, p2 = _axial(x0[a], x1[b], x2[c], a0, a1, a2)
                rho = np.sqrt(p0 * p0 + p1 * p1 + p2 * p2)
                r = rho if (rho >= 1e-6 or np.isnan(rho)) else 1e-6
                cosang = (p0 * n0 + p1 * n1 + p2 * n2) / r
                if abs(s) <= smax and cosang >= cmin:
                    out[a, b, c] = True
                    rho_out[n] = rho
                    n += 1
    return out, rho_out[:n]


@nb.njit(**_OPTS)
def wall_blend_rows(
    comp, orig, dist, x0, x1, x2, y0, y1, y2, prm, grid, ti0, tf0, ti1, tf1, ti2, tf2, keys, off,
    delta, mask, r0, r1
):  # fmt: skip
    """A wall tumor's change on its component's box, one pass over the box (see
    ``synthgen._hollow``): the texture at the voxel (``trilinear_box``'s operations), the
    weight of the thickened wall (``dist``: distance to the outer wall, mm) or of the polyp,
    the tissue value with the scan's noise, the change and the label, in the float32 and
    float64 operations of the NumPy reference (``tests/test_hollow.py``), the same bits.

    ``prm`` (float64): mode (0 wall, 1 polyp), axis (3), normal (3), half-length, shoulder,
    thickness, irregularity, blur sigma, tissue HU, texture gain, noise HU, the polyp's base
    radius ``rb`` and height, the least written value a label voxel has. ``x*``: the box's
    mm offsets from the centre per axis, ``y*`` from the polyp's base point. ``off``: the
    box's first voxel in lattice units from the centre (the noise).

    This call does the rows ``[r0, r1)`` of the box's first axis, writing ``delta`` (the
    float32 change; zeros where not written, so 0 outside the component) and ``mask`` (the
    bool label), and returns the inclusive bounds ``(lo0, hi0, lo1, hi1, lo2, hi2)`` of the
    changed voxels among them (``hi0 < lo0`` when none changed). Each voxel's numbers are its
    own, so ranges of rows (on several threads) give the same bits.
    """
    f32 = np.float32
    c0, c1, c2 = comp.shape
    polyp = prm[0] != 0.0
    a0, a1, a2 = prm[1], prm[2], prm[3]
    n0, n1, n2 = prm[4], prm[5], prm[6]
    half, shoulder, thick, irr, sigma = prm[7], prm[8], prm[9], prm[10], prm[11]
    tissue, gain, noise_hu, rb, hgt0 = prm[12], prm[13], prm[14], prm[15], prm[16]
    label_min = f32(prm[17])
    flat = max(0.0, half - shoulder)
    two_sigma = 2.0 * sigma
    one = f32(1.0)
    lo0, hi0, lo1, hi1, lo2, hi2 = c0, -1, c1, -1, c2, -1
    for a in range(r0, r1):
        for b in range(c1):
            for c in range(c2):
                if not comp[a, b, c]:
                    continue
                tex = _trilinear_at(grid, ti0[a], tf0[a], ti1[b], tf1[b], ti2[c], tf2[c])
                u = _np_clip((tex - f32(0.5)) / f32(0.1), f32(-1.0), f32(1.0))
                if polyp:
                    yn = y0[a] * n0 + y1[b] * n1 + y2[c] * n2
                    hgt = f32(hgt0) * (one + f32(irr) * u)
                    r2 = ((y0[a] * y0[a] + y1[b] * y1[b]) + y2[c] * y2[c] - yn * yn) / (rb * rb)
                    t = yn / np.float64(hgt)
                    rr2 = r2 + t * t
                    frb = f32(rb)
                    m = frb if (frb <= hgt or np.isnan(frb)) else hgt
                    depth = (1.0 - np.sqrt(rr2)) * np.float64(m)
                    w = _np_clip(0.5 + depth / two_sigma, 0.0, 1.0)
                else:
                    s = _axial(x0[a], x1[b], x2[c], a0, a1, a2)[0]
                    aa = abs(s)
                    if shoulder <= 0:
                        taper = one if aa <= half else f32(0.0)
                    else:
                        uu = _np_clip((aa - flat) / shoulder, 0.0, 1.0)
                        taper = f32(0.5 * (1.0 + np.cos(np.pi * uu)))
                    teff = (f32(thick) * taper) * (one + f32(irr) * u)
                    w = _np_clip(0.5 + (np.float64(teff) - dist[a, b, c]) / two_sigma, 0.0, 1.0)
                    w = w * np.float64(_np_clip(teff / f32(sigma), f32(0.0), one))
                wf = f32(w)
                value = f32(tissue) + f32(gain) * (tex - f32(0.5))
                if noise_hu > 0:
                    value = value + _noise_at(
                        keys, off[0] + a, off[1] + b, off[2] + c, f32(noise_hu), 0.0
                    )
                o = f32(orig[a, b, c])
                d = wf * (o - value)
                delta[a, b, c] = d
                mask[a, b, c] = wf >= f32(0.5) and (o - d) >= label_min
                if d != 0:
                    lo0, hi0 = min(lo0, a), max(hi0, a)
                    lo1, hi1 = min(lo1, b), max(hi1, b)
                    lo2, hi2 = min(lo2, c), max(hi2, c)
    return lo0, hi0, lo1, hi1, lo2, hi2


@nb.njit(**_OPTS)
def _uniform3_axis(a, out, axis):
    """SciPy's ``uniform_filter1d(a, 3, axis, mode="nearest")`` into float32 ``out``: along
    each edge-extended line a running float64 sum of the window (the entering value less the
    leaving one added; a NaN poisons the rest of its line, as in SciPy), divided by 3."""
    n = a.shape
    m = n[axis]
    e = np.empty(m + 2, dtype=np.float64)
    o0 = n[1] * n[2] if axis == 0 else (n[2] if axis == 1 else 1)  # the axis's stride
    other = [x for x in range(3) if x != axis]
    flat_a = a.reshape(-1)
    flat_o = out.reshape(-1)
    for p in range(n[other[0]]):
        for q in range(n[other[1]]):
            idx = [0, 0, 0]
            idx[other[0]] = p
            idx[other[1]] = q
            base = (idx[0] * n[1] + idx[1]) * n[2] + idx[2]
            for t in range(m):
                e[t + 1] = np.float64(flat_a[base + t * o0])
            e[0] = e[1]
            e[m + 1] = e[m]
            tmp = (e[0] + e[1]) + e[2]
            flat_o[base] = np.float32(tmp / 3.0)
            for t in range(1, m):
                tmp += e[t + 2] - e[t - 1]
                flat_o[base + t * o0] = np.float32(tmp / 3.0)


@nb.njit(**_OPTS)
def soft_residuals(img, lo, hi):
    """The wall search's noise sample (``synthgen._hollow.locate_wall``): for the voxels of
    ``img`` (float32, C-contiguous box) whose 3x3x3 neighbourhood lies in the box and in
    ``[lo, hi]`` (SciPy's ``binary_erosion`` of the window by a 3x3x3 cube, border 0), the
    voxel less the 3x3x3 mean (SciPy's ``uniform_filter(img, 3, mode="nearest")``, float32
    between its axis passes), in C order: the NumPy and SciPy expressions' float32 values."""
    n0, n1, n2 = img.shape
    if img.size == 0:
        return np.empty(0, dtype=np.float32)
    lo, hi = np.float32(lo), np.float32(hi)  # (NumPy compares a float32 image in float32)
    u = np.empty((n0, n1, n2), dtype=np.float32)
    v = np.empty((n0, n1, n2), dtype=np.float32)
    _uniform3_axis(img, u, 0)
    _uniform3_axis(u, v, 1)
    _uniform3_axis(v, u, 2)
    # the window eroded by the 3x3x3 cube (border False), one axis at a time
    w2 = np.zeros((n0, n1, n2), dtype=np.bool_)
    for i in range(n0):
        for j in range(n1):
            for k in range(1, n2 - 1):
                w2[i, j, k] = (
                    lo <= img[i, j, k - 1] <= hi
                    and lo <= img[i, j, k] <= hi
                    and lo <= img[i, j, k + 1] <= hi
                )
    w1 = np.zeros((n0, n1, n2), dtype=np.bool_)
    for i in range(n0):
        for j in range(1, n1 - 1):
            for k in range(n2):
                w1[i, j, k] = w2[i, j - 1, k] and w2[i, j, k] and w2[i, j + 1, k]
    out = np.empty(n0 * n1 * n2, dtype=np.float32)
    c = 0
    for i in range(1, n0 - 1):
        for j in range(n1):
            for k in range(n2):
                if w1[i - 1, j, k] and w1[i, j, k] and w1[i + 1, j, k]:
                    out[c] = img[i, j, k] - u[i, j, k]
                    c += 1
    return out[:c]


@nb.njit(**_OPTS)
def face_dilation(m):
    """``m`` (3-D bool) grown by one voxel across faces (a voxel is set when it or one of its
    six face neighbours in the box is), in one pass."""
    n0, n1, n2 = m.shape
    out = np.empty((n0, n1, n2), dtype=np.bool_)
    for i in range(n0):
        for j in range(n1):
            for k in range(n2):
                out[i, j, k] = (
                    m[i, j, k]
                    or (k > 0 and m[i, j, k - 1])
                    or (k + 1 < n2 and m[i, j, k + 1])
                    or (j > 0 and m[i, j - 1, k])
                    or (j + 1 < n1 and m[i, j + 1, k])
                    or (i > 0 and m[i - 1, j, k])
                    or (i + 1 < n0 and m[i + 1, j, k])
                )
    return out


def median(x, integral: bool | None = None) -> float:
    """``float(np.median(x))`` of a 1-D array, the same float64 value, by counting when its
    values are whole numbers (``integral``; by default, when ``x`` is of an integer type)
    within a range not much wider than the array is long: O(n) with a small constant, where
    ``np.median`` partitions. The middle value, or the two middle values summed and halved
    in float64, as NumPy does."""
    x = np.asarray(x).reshape(-1)
    if integral is None:
        integral = x.dtype.kind in "iub"
    if not integral or x.size < 64:
        return float(np.median(x))
    lo, hi = x.min(), x.max()
    span = float(hi) - float(lo)
    if not span <= max(4.0 * x.size, 65536.0):  # (NaN too)
        return float(np.median(x))
    a, b = _middle_counts(x, float(lo), int(span))
    return float((a + b) / 2.0) if x.size % 2 == 0 else float(a)


def median_abs_dev(x, med: float, integral: bool | None = None) -> float:
    """``float(np.median(np.abs(x - med)))``, the same value; for whole-number ``x`` (and so
    a ``med`` that is a whole or half number, a median of them) by counting twice the
    deviations, whole numbers, and halving: exact scalings, the same bits."""
    x = np.asarray(x)
    if integral is None:
        integral = x.dtype.kind in "iub"
    t = np.abs(x - med)
    if not integral:
        return float(np.median(t))
    return median(2.0 * t, True) / 2.0


@nb.njit(**_OPTS)
def _middle_counts(x, lo, span):
    """The order statistics ``(n - 1) // 2`` and ``n // 2`` of ``x`` (whole numbers from
    ``lo`` to ``lo + span``), as float64, by counting."""
    counts = np.zeros(span + 1, dtype=np.int64)
    for v in x:
        counts[int(np.float64(v) - lo)] += 1
    n = x.size
    ka, kb = (n - 1) // 2, n // 2
    a = b = 0.0
    c = 0
    found_a = False
    for t in range(span + 1):
        c += counts[t]
        if not found_a and c > ka:
            a = lo + t
            found_a = True
        if c > kb:
            b = lo + t
            break
    return a, b
