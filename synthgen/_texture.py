"""The published smoothed-Bernoulli texture, generated fresh for each tumor in its own box.

REFERENCE section 2: uniform noise, Gaussian-smoothed (sigma_a); min-max rescaled to a
probability field ``scale * x + base``; Bernoulli draws; Gaussian-smoothed again (sigma_b);
rescaled so that the mean of values above ``threshold`` is ``u0``; clipped to ``[0, 1]``.

How it is made cheap without changing the statistics (all positions in mm, relative to the
tumor centre, so the texture does not depend on the voxel grid or on the scan size):

* The sigma_a field is smoothed noise: noise on a lattice of spacing ``sigma_a`` summed
  with Gaussian weights has the same Gaussian autocorrelation as voxel noise filtered with
  sigma_a. It is standardised exactly (the weights' norm is separable), and the published
  min-max is replaced by its expectation over the published 420x300x320 bank: ``+-range_sd``
  standard deviations map to ``[base, base + scale]``. No reduction, no dependence on the box.
* The Bernoulli draws of 1 mm^3 cells are aggregated per block of ``h^3`` cells
  (``h = max(1, floor(sigma_b / 2))`` mm): the block's success fraction gets the exact mean
  ``p`` and variance ``p (1 - p) / h^3`` of ``h^3`` Bernoulli draws, from one counter-based
  uniform. The sigma_b smoothing is a separable Gaussian sum from block centres to a grid
  ``h`` mm apart, interpolated trilinearly to the voxels. Since that smoothing averages
  hundreds of blocks, the field has the mean, variance and autocorrelation of voxel-level
  Bernoulli noise smoothed with sigma_b (and is Gaussian by the central limit theorem, as the
  published field is).
* The final rescale is the published one, measured over the tumor's box.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ._hash import stream_key

__all__ = [
    "STREAM_BERNOULLI",
    "STREAM_NOISE",
    "TextureRecipe",
    "extent",
    "interp_coords",
    "lattice_index",
    "sample_trilinear",
    "texture_box",
    "texture_grid",
    "texture_lookup",
    "texture_recipe",
]

STREAM_NOISE = 1
STREAM_BERNOULLI = 2
_OFF = 512


def lattice_index(i: np.ndarray, j: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Pack signed lattice coordinates (|c| < 512) into the 30-bit counter of the hash."""
    for c in (i, j, k):
        if c.size and (c.min() < -_OFF or c.max() >= _OFF):
            raise ValueError("texture lattice exceeds +-512 cells; tumor box too large")
    ii = (i.astype(np.uint32) + _OFF)[:, None, None] << np.uint32(20)
    jj = (j.astype(np.uint32) + _OFF)[None, :, None] << np.uint32(10)
    kk = (k.astype(np.uint32) + _OFF)[None, None, :]
    return (ii | jj | kk).astype(np.uint32)


def contract_dense(core: np.ndarray, m0: np.ndarray, m1: np.ndarray, m2: np.ndarray):
    """Reference: ``out[i,j,k] = sum_abc core[a,b,c] m0[i,a] m1[j,b] m2[k,c]`` (float64)."""
    return np.einsum("abc,ia,jb,kc->ijk", core, m0, m1, m2, optimize=True)


def block_size_mm(sigma_b: float) -> int:
    """Edge of a Bernoulli block in mm (integer, so a block holds a whole number of cells)."""
    return int(block_sizes_mm(np.array([sigma_b]))[0])


@dataclass(frozen=True)
class TextureRecipe:
    """Every host-side number of one tumor's texture grid; a backend executes it.

    The per-element work (lattice noise, banded Gaussian sums, Bernoulli block fractions, the
    block-to-grid smoothing, the final rescale) runs on the CPU kernels
    (:func:`run_recipe`) or on the GPU (``synthgen._cuda``) from these same arrays, so the
    two backends cannot drift apart.

    Attributes:
        noise_key, bern_key: Counter-hash keys of the sigma_a noise and the Bernoulli draws.
        lattice: ``(start, size)`` of the sigma_a noise lattice per axis.
        bands: Band form ``(start, weights)`` of the lattice-to-block-centre sums per axis.
        inv_norm: ``1 / ||row||`` of each band row per axis (float64).
        zscale, base, scale: The probability field ``base + scale * clip(0.5 + zscale z)``.
        blocks0: First block index per axis; ``n_cells``: cells per block.
        kern, offs, out_shape: The block-to-grid smoothing (one kernel, offsets per axis).
        threshold, u0: The published final rescale.
        origin, step: Grid positions ``origin + step * index`` (mm from the centre).
    """

    noise_key: tuple[int, int]
    bern_key: tuple[int, int]
    lattice: tuple[tuple[int, int], ...]
    bands: tuple[tuple[np.ndarray, np.ndarray], ...]
    inv_norm: tuple[np.ndarray, ...]
    zscale: float
    base: float
    scale: float
    blocks0: tuple[int, int, int]
    block_shape: tuple[int, int, int]
    n_cells: float
    kern: np.ndarray
    offs: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    threshold: float
    u0: float
    origin: np.ndarray
    step: float


def grid_index_range(lo_mm, hi_mm, h_b) -> tuple[np.ndarray, np.ndarray]:
    """First and last index of the texture grid (block centres ``h_b`` mm apart) covering
    ``[lo_mm, hi_mm]`` plus one block (``lattice_range(lo, hi, h_b, h_b)``); arrays of any
    shape, ``h_b`` broadcast against them. Integer arrays."""
    from ._cpu_kernels import grid_ranges_nb

    lo, hi, h = np.broadcast_arrays(np.asarray(lo_mm, dtype=np.float64),
                                    np.asarray(hi_mm, dtype=np.float64),
                                    np.asarray(h_b, dtype=np.float64))  # fmt: skip
    o_lo, o_hi = grid_ranges_nb(lo.ravel(), hi.ravel(), h.ravel())
    return o_lo.reshape(lo.shape), o_hi.reshape(lo.shape)


#: The texture parameters of a plan's tumor, in the order :func:`texture_params` stacks them.
TEXTURE_KEYS = ("sigma_a_mm", "sigma_b_mm", "range_sd", "base", "scale", "threshold", "u0")


def texture_params(prms: Sequence[Mapping[str, float]]) -> np.ndarray:
    """The texture parameters of many tumors, ``(n, 7)`` float64 in :data:`TEXTURE_KEYS`
    order."""
    # one flat list (NumPy converts it in a fraction of the time nested lists take)
    return np.array([p[k] for p in prms for k in TEXTURE_KEYS],
                    dtype=np.float64).reshape(len(prms), len(TEXTURE_KEYS))  # fmt: skip


def block_sizes_mm(sigma_b: np.ndarray) -> np.ndarray:
    """:func:`block_size_mm` of an array of ``sigma_b`` (int64)."""
    from ._cpu_kernels import block_sizes_nb

    sb = np.asarray(sigma_b, dtype=np.float64)
    return block_sizes_nb(sb.ravel()).reshape(sb.shape)


def texture_consts(P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Block sizes ``h_b`` (int64, :func:`block_size_mm`) and the recipe's scalars of many
    tumors (``P`` from :func:`texture_params`), ``(n, 6)`` in the GPU table's order:
    ``(zscale, base, scale, cells per block, threshold, u0)``
    (:func:`synthgen._cpu_kernels.texture_consts_nb`, which the GPU driver calls). Uniform
    noise has variance 1/12, so ``z * sqrt(12) / norm`` is standard normal; ``zscale`` folds
    in the ``1 / (2 range_sd)`` of the probability map."""
    from ._cpu_kernels import texture_consts_nb

    return texture_consts_nb(np.ascontiguousarray(P, dtype=np.float64))


def texture_recipe(
    seed: int,
    params: Mapping[str, float],
    lo_mm: tuple[float, float, float],
    hi_mm: tuple[float, float, float],
) -> TextureRecipe:
    """The host-side part of :func:`texture_grid` (see there), for any backend.

    Everything but the seed's keys is separable per axis and depends on the box only through
    the grid's integer index range on that axis, so each axis comes from a cache
    (:func:`_axis_recipe`): tumors of similar extent share their band tables.
    """
    sb = float(params["sigma_b_mm"])
    sa = float(params["sigma_a_mm"])
    h_bs, scalars = texture_consts(texture_params([params]))
    h_b = int(h_bs[0])
    o_lo, o_hi = grid_index_range(lo_mm, hi_mm, h_b)
    axes = [_axis_recipe(int(o_lo[a]), int(o_hi[a]), h_b, sa, sb) for a in range(3)]
    zscale, base, scale, n_cells, threshold, u0 = scalars[0].tolist()
    return TextureRecipe(
        noise_key=stream_key(seed, STREAM_NOISE),
        bern_key=stream_key(seed, STREAM_BERNOULLI),
        lattice=tuple(ax[0] for ax in axes),
        bands=tuple(ax[1] for ax in axes),
        inv_norm=tuple(ax[2] for ax in axes),
        zscale=zscale,
        base=base,
        scale=scale,
        blocks0=tuple(ax[3] for ax in axes),  # type: ignore[arg-type]
        block_shape=tuple(ax[4] for ax in axes),  # type: ignore[arg-type]
        n_cells=n_cells,
        kern=_smoothing_kernel(h_b, sb),
        offs=tuple(ax[5] for ax in axes),  # type: ignore[arg-type]
        out_shape=tuple(ax[6] for ax in axes),  # type: ignore[arg-type]
        threshold=threshold,
        u0=u0,
        origin=np.array([ax[7] for ax in axes]),
        step=float(h_b),
    )


@functools.lru_cache(maxsize=4096)
def _axis_recipe(o_lo: int, o_hi: int, h_b: int, sa: float, sb: float):
    """One axis of a :class:`TextureRecipe` whose grid indices run from ``o_lo`` to ``o_hi``:
    ``((lattice start, size), (band starts, band weights), inv_norm, first block, blocks,
    grid offset, grid size, grid origin mm)``; the arrays are read-only (shared).

    The Bernoulli blocks lie within 3 sigma_b of the grid. The Bernoulli probability field is
    the block fractions ``S / h^3`` with ``p = base + scale * clip(0.5 + z / (2 range_sd), 0,
    1)``, ``z`` the standardised sigma_a noise at the block centres: a noise lattice sigma_a
    apart (never finer than the blocks), Gaussian truncated at 3 sigma, so that the normalised
    lattice sum has the Gaussian autocorrelation of voxel noise to within ~1e-4 (Poisson
    summation) at a few lattice points per axis. The numbers come from
    :func:`synthgen._cpu_kernels.axis_tables_nb`, which the GPU driver calls for all axes of a
    batch at once (:func:`axis_tables`).
    """
    t = axis_tables(np.array([o_lo]), np.array([o_hi]), np.array([h_b]), np.array([sa]),
                    np.array([sb]))  # fmt: skip
    ints, origin, starts, weights, inv = t
    lat0, n_lat, b0, nbk, offs, n_out, kk = (int(x) for x in ints[0, :7])
    w = weights.reshape(nbk, kk)
    for x in (starts, w, inv):
        x.flags.writeable = False
    return ((lat0, n_lat), (starts, w), inv, b0, nbk, offs, n_out, float(origin[0]))


def axis_tables(o_lo, o_hi, h_b, sa, sb):
    """:func:`synthgen._cpu_kernels.axis_tables_nb` for arrays of axes (see there), raising
    where a lattice leaves the hash's range."""
    from ._cpu_kernels import axis_tables_nb

    ints, origin, starts, weights, inv, ok = axis_tables_nb(
        np.asarray(o_lo, np.int64), np.asarray(o_hi, np.int64), np.asarray(h_b, np.int64),
        np.asarray(sa, np.float64), np.asarray(sb, np.float64))  # fmt: skip
    if not ok.all():
        raise ValueError("texture lattice exceeds +-512 cells; tumor box too large")
    return ints, origin, starts, weights, inv


@functools.lru_cache(maxsize=64)
def _smoothing_kernel(h_b: int, sb: float) -> np.ndarray:
    """Block sums -> grid: one Gaussian kernel per axis (same lattice), normalised."""
    r = math.floor(3.0 * sb / h_b)
    kern = np.exp(-0.5 * ((np.arange(-r, r + 1) * h_b) / sb) ** 2)
    kern = (kern / kern.sum()).astype(np.float32)
    kern.flags.writeable = False
    return kern


def block_fractions(rc: TextureRecipe, k=None) -> np.ndarray:
    """Bernoulli success fraction ``S / h^3`` of every block (float32), on the CPU kernels."""
    if k is None:
        from . import _cpu_kernels as k
    (a0, n0), (a1, n1), (a2, n2) = rc.lattice
    noise = k.lattice_uniform(rc.noise_key[0], rc.noise_key[1], a0, n0, a1, n1, a2, n2,
                              np.float32(0.5))  # fmt: skip
    b = rc.bands
    z = k.band_contract3(noise, b[0][0], b[0][1], b[1][0], b[1][1], b[2][0], b[2][1])
    return k.block_sums(
        z, rc.inv_norm[0], rc.inv_norm[1], rc.inv_norm[2], rc.zscale, rc.base, rc.scale,
        rc.bern_key[0], rc.bern_key[1], *rc.blocks0, rc.n_cells,
    )  # fmt: skip


def run_recipe(rc: TextureRecipe, k=None) -> np.ndarray:
    """Execute a :class:`TextureRecipe` on the CPU kernels: the texture grid (float32)."""
    if k is None:
        from . import _cpu_kernels as k
    s = block_fractions(rc, k)
    n = rc.out_shape
    t = k.toeplitz_contract3(
        s, rc.offs[0], rc.kern, n[0], rc.offs[1], rc.kern, n[1], rc.offs[2], rc.kern, n[2]
    )
    above = t[t > rc.threshold]
    mean = float(above.mean()) if above.size else float(t.mean())
    if mean > 0:
        t *= np.float32(rc.u0 / mean)
    np.clip(t, 0.0, 1.0, out=t)
    return t


def texture_grid(
    seed: int,
    params: Mapping[str, float],
    lo_mm: tuple[float, float, float],
    hi_mm: tuple[float, float, float],
    k=None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Texture on the block-centre grid covering ``[lo_mm, hi_mm]`` (relative to the centre).

    The field is smooth at the scale of ``sigma_b`` (>= 4 mm in the published recipe), so it is
    evaluated once per block (``h`` mm apart) and interpolated trilinearly to the voxels by the
    blend kernel; see :func:`sample_trilinear` for the reference.

    Args:
        seed: The tumor's seed (from the plan).
        params: ``sigma_a_mm``, ``sigma_b_mm``, ``scale``, ``base``, ``u0``, ``threshold``,
            ``range_sd`` (one draw of the preset's texture recipe).
        lo_mm, hi_mm: Corners of the region to cover, mm relative to the tumor centre.
        k: Kernel module (the numba CPU kernels by default).

    Returns:
        ``(grid, origin_mm, step_mm)``: float32 texture values in ``[0, 1]`` (mean about
        0.5) at positions ``origin_mm + step_mm * index`` along each axis.
    """
    rc = texture_recipe(seed, params, lo_mm, hi_mm)
    return run_recipe(rc, k), rc.origin, rc.step


def interp_coords(pos_mm: np.ndarray, origin_mm: float, step_mm: float, n: int):
    """Integer base index and fraction of each position on a grid axis (for trilinear)."""
    u = (np.asarray(pos_mm, dtype=np.float64) - origin_mm) / step_mm
    i0 = np.clip(np.floor(u).astype(np.int64), 0, max(n - 2, 0))
    f = np.clip(u - i0, 0.0, 1.0).astype(np.float32)
    return i0, f


def sample_trilinear(grid: np.ndarray, origin_mm, step_mm: float, pos) -> np.ndarray:
    """Reference trilinear interpolation of a texture grid at the voxels of a box."""
    out = np.zeros(tuple(len(p) for p in pos), dtype=np.float64)
    idx = [interp_coords(pos[a], origin_mm[a], step_mm, grid.shape[a]) for a in range(3)]
    for c0 in (0, 1):
        w0 = idx[0][1] if c0 else 1 - idx[0][1]
        for c1 in (0, 1):
            w1 = idx[1][1] if c1 else 1 - idx[1][1]
            for c2 in (0, 1):
                w2 = idx[2][1] if c2 else 1 - idx[2][1]
                v = grid[np.ix_(idx[0][0] + c0, idx[1][0] + c1, idx[2][0] + c2)]
                out += v * w0[:, None, None] * w1[None, :, None] * w2[None, None, :]
    return out.astype(np.float32)


def extent(pos) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """First and last position per axis of a box (positions in mm per axis): the corners a
    texture grid of the box covers."""
    return tuple(float(p[0]) for p in pos), tuple(float(p[-1]) for p in pos)


def texture_lookup(seed: int, params: Mapping[str, float], pos, at=None, k=None):
    """The texture grid covering a box (positions in mm per axis, ``pos``) and, per axis, the
    trilinear base index and fraction of the positions ``at`` (default: ``pos``) on it (the
    values of :func:`interp_coords`): ``(grid, ((i0, f0), (i1, f1), (i2, f2)))``, the grid
    C-contiguous float32. What every renderer samples the texture through."""
    from ._cpu_kernels import interp_coords_nb

    grid, origin, step = texture_grid(seed, params, *extent(pos), k)
    at = pos if at is None else at
    grid = np.ascontiguousarray(grid, dtype=np.float32)
    return grid, tuple(interp_coords_nb(np.asarray(at[a]), origin[a], step, grid.shape[a])
                       for a in range(3))  # fmt: skip


def texture_box(seed: int, params: Mapping[str, float], pos) -> np.ndarray:
    """Texture at the voxels of a box (positions in mm per axis): grid + trilinear."""
    from ._cpu_kernels import trilinear_box  # (sample_trilinear's values, in one pass)

    grid, idx = texture_lookup(seed, params, pos)
    return trilinear_box(grid, *(x for ix in idx for x in ix))
