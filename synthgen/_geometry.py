"""Small host-side matrices shared by every backend: B-spline weights, Gaussian kernels.

Everything a render needs per axis (B-spline weights of the control grid, Gaussian lattice
weights of the texture, the blur kernel) is a small matrix computed here on the host in
float64 and handed to a backend as float32. The per-voxel work is then separable contractions
and one fused pass per tumor box.
"""

from __future__ import annotations

import functools
import math

import numpy as np

__all__ = [
    "binary",
    "blur_band",
    "bspline_weights",
    "dense_displacement",
    "gaussian_band",
    "gaussian_kernel1d",
    "gaussian_matrix",
    "prefilter",
    "sample_step",
    "to_band",
]


def _cubic_bspline(x: np.ndarray) -> np.ndarray:
    """The centred cubic B-spline basis function beta3(x)."""
    ax = np.abs(x)
    inner = 2.0 / 3.0 - ax * ax + 0.5 * ax * ax * ax
    c = np.maximum(2.0 - ax, 0.0)
    return np.where(ax < 1, inner, c * c * c / 6.0)


@functools.lru_cache(maxsize=16)
def _prefilter_matrix(g: int) -> np.ndarray:
    """``P`` with ``coefficients = P @ values`` for an interpolating cubic spline on ``g``
    samples with mirror boundaries (``scipy.ndimage.spline_filter1d(mode='mirror')``)."""
    # Interpolation condition: sum_a c_a * beta3(i - a) (with mirrored a) = v_i.
    a = np.zeros((g, g))
    for i in range(g):
        for j in range(-3, g + 3):
            jj = int(_mirror(np.int64(j), g))
            a[i, jj] += _cubic_bspline(np.array([i - j], dtype=float))[0]
    return np.linalg.inv(a)


def _mirror(j, g: int):
    """Whole-sample symmetric index folding (scipy's ``mirror``): -1 -> 1, g -> g - 2."""
    if g == 1:
        return np.zeros_like(j)
    period = 2 * (g - 1)
    j = np.abs(j) % period
    return np.where(j >= g, period - j, j)


def prefilter(g: int) -> np.ndarray:
    """The (cached, read-only) interpolation prefilter of ``g`` control points."""
    p = _prefilter_matrix(g)
    p.flags.writeable = False
    return p


def bspline_weights(t: np.ndarray, g: int, *, prefilter: bool = True) -> np.ndarray:
    """Weights mapping ``g`` control values to a cubic spline evaluated at positions ``t``.

    Args:
        t: Positions in control-index units (``0`` is the first control point, ``g - 1``
            the last); positions outside ``[0, g - 1]`` are clamped to it.
        g: Number of control points along the axis.
        prefilter: Interpolating spline (passes through the control values, mirror
            boundaries, as ``scipy.ndimage.map_coordinates(order=3, mode='mirror')``); with
            ``False`` the approximating B-spline of the raw values.

    Returns:
        ``(len(t), g)`` float64 matrix ``W`` with ``values_at_t = W @ control_values``.
    """
    t = np.clip(np.asarray(t, dtype=np.float64), 0.0, g - 1.0)
    w = np.zeros((t.shape[0], g))
    base = np.floor(t).astype(np.int64)
    rows = np.arange(t.shape[0])
    for off in range(-1, 3):
        j = base + off
        w[rows, _mirror(j, g)] += _cubic_bspline(t - j)
    if prefilter:
        w = w @ _prefilter_matrix(g)
    return w


def dense_displacement(
    control: np.ndarray, shape: tuple[int, int, int], *, prefilter: bool = True
) -> np.ndarray:
    """Dense displacement field of a control grid spanning the whole array (reference).

    Control point ``a`` of an axis of length ``n`` with ``g`` control points sits at voxel
    ``a * (n - 1) / (g - 1)``: the first and last on the array's borders. This is the slow,
    obviously-correct oracle; renders use the separable form inside the fused kernels.

    Args:
        control: ``(3, g0, g1, g2)`` control displacements (any unit; the result has the same).
        shape: Output grid ``(n0, n1, n2)``.
        prefilter: See :func:`bspline_weights`.

    Returns:
        ``(3, n0, n1, n2)`` float64 displacement.
    """
    control = np.asarray(control, dtype=np.float64)
    ws = []
    for ax in range(3):
        n, g = shape[ax], control.shape[ax + 1]
        t = np.arange(n) * ((g - 1) / (n - 1) if n > 1 else 0.0)
        ws.append(bspline_weights(t, g, prefilter=prefilter))
    return np.einsum("cabe,ia,jb,ke->cijk", control, ws[0], ws[1], ws[2], optimize=True)


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """Normalised 1-D Gaussian kernel (``sigma`` in voxels), as ``scipy.ndimage`` builds it."""
    if sigma <= 1e-3:
        return np.ones(1)
    r = int(truncate * sigma + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_matrix(
    out_pos: np.ndarray,
    in_pos: np.ndarray,
    sigma: float,
    *,
    normalise_rows: bool = False,
    truncate: float = 4.0,
) -> np.ndarray:
    """Gaussian weights ``exp(-(x_o - y_i)^2 / (2 sigma^2))`` truncated at ``truncate`` sigma.

    Args:
        out_pos: Output positions (mm).
        in_pos: Lattice positions (mm).
        sigma: Standard deviation (mm).
        normalise_rows: Make each row sum to one.

    Returns:
        ``(len(out_pos), len(in_pos))`` float64 matrix.
    """
    d = (np.asarray(out_pos, dtype=np.float64)[:, None] - np.asarray(in_pos)[None, :]) / sigma
    m = np.exp(-0.5 * d * d)
    m[np.abs(d) > truncate] = 0.0
    if normalise_rows:
        s = m.sum(axis=1, keepdims=True)
        m = m / np.where(s > 0, s, 1.0)
    return m


def to_band(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Band form of a matrix whose non-zeros sit in one contiguous run per row.

    Returns ``(start, weights)``: row ``o`` has ``weights[o, t]`` at column ``start[o] + t``
    (``int64 (n,)`` and ``float32 (n, K)``, zero-padded; ``start + K <= m.shape[1]``).
    """
    _n, ncol = m.shape
    nz = m != 0
    has = nz.any(axis=1)
    first = np.where(has, nz.argmax(axis=1), 0)
    last = np.where(has, ncol - 1 - nz[:, ::-1].argmax(axis=1), 0)
    k = int(max(1, (last - first + 1).max()))
    k = min(k, ncol)
    start = np.minimum(first, ncol - k).astype(np.int64)
    cols = start[:, None] + np.arange(k)[None, :]
    w = np.take_along_axis(m, cols, axis=1).astype(np.float32)
    return start, np.ascontiguousarray(w)


def blur_band(n: int, sigma_vox: float, truncate: float = 3.0):
    """Band form of a zero-padded Gaussian blur of ``n`` samples (``sigma`` in voxels).

    The kernel is normalised over its full support, as ``scipy.ndimage.gaussian_filter`` with
    ``mode='constant'`` does; rows near the ends simply lose the weights that fall outside.
    """
    k = gaussian_kernel1d(sigma_vox, truncate)
    r = (k.size - 1) // 2
    m = np.zeros((n, n))
    for o in range(n):
        a, b = max(0, o - r), min(n, o + r + 1)
        m[o, a:b] = k[a - o + r : b - o + r]
    return to_band(m)


def gaussian_band(
    out_pos: np.ndarray, lat0: int, n_lat: int, step: float, sigma: float, truncate: float
) -> tuple[np.ndarray, np.ndarray]:
    """Band form (see :func:`to_band`) of ``gaussian_matrix(out_pos, (lat0 + arange(n_lat)) *
    step, sigma, truncate=truncate)``, built directly (no dense matrix)."""
    out_pos = np.asarray(out_pos, dtype=np.float64)
    kk = min(n_lat, math.floor(2.0 * truncate * sigma / step) + 2)
    first = np.ceil((out_pos - truncate * sigma) / step - 1e-9).astype(np.int64) - lat0
    start = np.clip(first, 0, n_lat - kk)
    cols = lat0 + start[:, None] + np.arange(kk)[None, :]
    d = (out_pos[:, None] - cols * step) / sigma
    w = np.exp(-0.5 * d * d)
    w[np.abs(d) > truncate] = 0.0
    return start, w.astype(np.float32)


def lattice_range(lo: float, hi: float, step: float, margin: float) -> np.ndarray:
    """Integer lattice indices ``j`` whose positions ``j * step`` cover
    ``[lo - margin, hi + margin]``."""
    a = math.floor((lo - margin) / step)
    b = math.ceil((hi + margin) / step)
    return np.arange(a, b + 1, dtype=np.int64)


def binary(a) -> np.ndarray:
    """A region of a mask as a NumPy bool array: bool as is, numbers ``> 0.5`` (CuPy and
    torch regions are copied to the host)."""
    if hasattr(a, "get") and not isinstance(a, np.ndarray):  # CuPy
        a = a.get()
    elif hasattr(a, "detach"):  # torch
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    return a if a.dtype == np.bool_ else a > 0.5


def sample_step(count: int, target: int = 20000) -> int:
    """The stride per axis that leaves about ``target`` of ``count`` voxels (at least 1)."""
    return max(1, round((count / float(target)) ** (1.0 / 3.0)))
