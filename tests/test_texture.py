"""Texture statistics (REFERENCE section 2), counter-based hash, and the CPU kernels.

The kernels are checked against slow, obviously-correct references: the NumPy hash, dense
einsum contractions, ``scipy.ndimage.gaussian_filter`` and ``scipy.stats.binom``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage, stats

from synthgen import _cpu_kernels as kern
from synthgen._geometry import blur_band, gaussian_kernel1d, gaussian_matrix, to_band
from synthgen._hash import (
    _mix32_int,
    derive_seed,
    mix32,
    stream_key,
    uniform_from_index,
)
from synthgen._texture import (
    STREAM_BERNOULLI,
    STREAM_NOISE,
    contract_dense,
    lattice_index,
    texture_box,
)

BOX_1MM = [np.arange(-50.0, 50.0, 1.0)] * 3  # 100^3 voxels at 1 mm around the tumor centre
BOX_ANISO = [np.arange(-50.0, 50.0, 0.7), np.arange(-50.0, 50.0, 0.7), np.arange(-50.0, 50.0, 5.0)]


def _params(sigma_a: float, sigma_b: float) -> dict[str, float]:
    return {
        "sigma_a_mm": float(sigma_a),
        "sigma_b_mm": float(sigma_b),
        "scale": 0.2,
        "base": 0.05,
        "u0": 0.525,
        "threshold": 0.12,
        "range_sd": 4.5,
    }


def _lag_autocorr(t: np.ndarray, lag: int) -> float:
    """Lag autocorrelation (in voxels), averaged over the three axes."""
    x = t.astype(np.float64) - t.mean()
    var = x.var()
    if var == 0:  # a flat field has no correlation structure
        return 0.0
    n = x.shape[0]
    acs = []
    for axis in range(3):
        a = np.take(x, np.arange(0, n - lag), axis=axis)
        b = np.take(x, np.arange(lag, n), axis=axis)
        acs.append(float((a * b).mean() / var))
    return float(np.mean(acs))


_TEXTURES: dict[tuple, np.ndarray] = {}


def _texture(sigma_a: float, sigma_b: float, seed: int = 11, grid: str = "iso") -> np.ndarray:
    key = (sigma_a, sigma_b, seed, grid)
    if key not in _TEXTURES:
        pos = BOX_1MM if grid == "iso" else BOX_ANISO
        _TEXTURES[key] = texture_box(seed, _params(sigma_a, sigma_b), pos)
    return _TEXTURES[key]


# ------------------------------------------------------------------------- texture statistics


@pytest.mark.parametrize(("sa", "sb"), [(3, 4), (15, 4), (15, 7)])
def test_texture_mean_std_range(sa: int, sb: int) -> None:
    t = _texture(sa, sb)
    assert t.shape == (100, 100, 100)
    assert t.dtype == np.float32
    assert np.isfinite(t).all()
    assert t.min() >= 0.0 and t.max() <= 1.0
    assert 0.47 <= float(t.mean()) <= 0.55
    assert 0.015 <= float(t.std()) <= 0.10
    # REFERENCE: 1st-99th percentile about 0.31-0.65
    p1, p99 = np.percentile(t, [1, 99])
    assert 0.2 < p1 < 0.5 < p99 < 0.8


def test_texture_std_increases_with_sigma_a() -> None:
    lo, hi = _texture(3, 4), _texture(15, 4)
    assert float(hi.std()) > float(lo.std()) * 1.2


def test_texture_lag5_autocorrelation() -> None:
    ac_fine = _lag_autocorr(_texture(3, 4), 5)
    assert 0.65 <= ac_fine <= 0.82, ac_fine
    for sa, sb in ((15, 4), (15, 7)):
        ac = _lag_autocorr(_texture(sa, sb), 5)
        assert ac > 0.9, (sa, sb, ac)


def test_texture_is_deterministic_and_seeded() -> None:
    a = texture_box(11, _params(9, 4), BOX_1MM)
    assert a.tobytes() == texture_box(11, _params(9, 4), BOX_1MM).tobytes()
    b = texture_box(12, _params(9, 4), BOX_1MM)
    assert not np.array_equal(a, b)
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.2


@pytest.mark.parametrize(("sa", "sb"), [(3, 4), (15, 7)])
def test_texture_is_in_physical_units(sa: int, sb: int) -> None:
    """The same texture on a 0.7 x 0.7 x 5 mm grid: same statistics, same values."""
    iso = _texture(sa, sb)
    aniso = _texture(sa, sb, grid="aniso")
    assert aniso.shape == (143, 143, 20)
    assert aniso.min() >= 0.0 and aniso.max() <= 1.0
    assert abs(float(aniso.mean()) - float(iso.mean())) < 0.01
    assert float(aniso.std()) == pytest.approx(float(iso.std()), rel=0.15)
    # positions both grids share: x, y = -50 + 7 i mm (0.7 mm grid: every 10th), z = -50 + 5 k
    ii = np.arange(0, 100, 7)
    kk = np.arange(0, 100, 5)
    a = aniso[np.ix_(ii * 10 // 7, ii * 10 // 7, kk // 5)]
    b = iso[np.ix_(ii, ii, kk)]
    np.testing.assert_allclose(BOX_ANISO[0][ii * 10 // 7], BOX_1MM[0][ii], atol=1e-9)
    np.testing.assert_allclose(BOX_ANISO[2][kk // 5], BOX_1MM[2][kk], atol=1e-9)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99
    np.testing.assert_allclose(a, b, atol=0.03)


# ------------------------------------------------------------------------------ the hash


def test_mix32_numpy_matches_python() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2**32, size=1000, dtype=np.uint64).astype(np.uint32)
    x[:3] = (0, 1, 2**32 - 1)
    ref = np.array([_mix32_int(int(v)) for v in x], dtype=np.uint32)
    np.testing.assert_array_equal(mix32(x), ref)
    assert len(np.unique(mix32(np.arange(100000, dtype=np.uint32)))) == 100000  # bijection


def test_derive_seed_and_stream_key() -> None:
    seeds = [derive_seed(7, i) for i in range(1000)]
    assert len(set(seeds)) == 1000
    assert all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(7, 3) == derive_seed(7, 3) != derive_seed(8, 3)
    assert derive_seed(2**64 + 7, 3) == derive_seed(7, 3)  # 64-bit seeds
    k = [stream_key(123, s) for s in (STREAM_NOISE, STREAM_BERNOULLI)]
    assert k[0] != k[1]
    assert all(0 <= v < 2**32 for key in k for v in key)


def test_lattice_index_packs_coordinates() -> None:
    i = np.array([-512, -1, 0, 511])
    idx = lattice_index(i, i, i)
    assert idx.dtype == np.uint32 and idx.shape == (4, 4, 4)
    assert idx[0, 0, 0] == 0
    assert idx[2, 2, 2] == (512 << 20) | (512 << 10) | 512
    assert idx[3, 0, 1] == (1023 << 20) | (0 << 10) | 511
    assert len(np.unique(idx)) == 64
    with pytest.raises(ValueError, match="exceeds"):
        lattice_index(np.array([512]), np.array([0]), np.array([0]))


@pytest.mark.parametrize("seed", [0, 1, 2**62 + 12345])
@pytest.mark.parametrize("stream", [STREAM_NOISE, STREAM_BERNOULLI])
def test_numba_hash_is_bit_identical_to_numpy(seed: int, stream: int) -> None:
    key = stream_key(derive_seed(seed, 0), stream)
    for a0, n0, a1, n1, a2, n2 in ((-512, 7, -3, 11, 500, 12), (-20, 40, -20, 40, -20, 40)):
        got = kern.lattice_uniform(key[0], key[1], a0, n0, a1, n1, a2, n2, np.float32(0.0))
        idx = lattice_index(np.arange(a0, a0 + n0), np.arange(a1, a1 + n1), np.arange(a2, a2 + n2))
        ref = uniform_from_index(key, idx)
        assert got.dtype == ref.dtype == np.float32
        np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))
        shifted = kern.lattice_uniform(key[0], key[1], a0, n0, a1, n1, a2, n2, np.float32(0.5))
        np.testing.assert_array_equal(shifted, ref - np.float32(0.5))


def _uniforms(key, n_side: int = 47) -> np.ndarray:
    c = np.arange(-(n_side // 2), n_side - n_side // 2)
    return uniform_from_index(key, lattice_index(c, c, c)).ravel()  # 103,823 values


def test_numpy_uniforms_are_uniform() -> None:
    u = _uniforms(stream_key(derive_seed(42, 0), STREAM_NOISE))
    assert u.size > 100_000
    assert u.min() >= 0.0 and u.max() < 1.0
    se = 1.0 / np.sqrt(12.0 * u.size)
    assert abs(float(u.mean()) - 0.5) < 5 * se
    assert float(u.var()) == pytest.approx(1.0 / 12.0, rel=0.02)
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    # neighbours along the fastest index and other streams are uncorrelated
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.02
    v = _uniforms(stream_key(derive_seed(42, 0), STREAM_BERNOULLI))
    assert abs(np.corrcoef(u, v)[0, 1]) < 0.02


def test_numba_uniforms_are_uniform() -> None:
    key = stream_key(derive_seed(42, 1), STREAM_NOISE)
    u = kern.lattice_uniform(key[0], key[1], -23, 47, -23, 47, -23, 47, np.float32(0.0)).ravel()
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(float(u.mean()) - 0.5) < 5.0 / np.sqrt(12.0 * u.size)
    assert stats.kstest(u, "uniform").pvalue > 1e-3


# ---------------------------------------------------------------------- Bernoulli block sums


def _block_sums(z, base, scale, zscale, key, b, n_cells, norms=None):
    if norms is None:
        norms = [np.ones(s) for s in z.shape]
    inv = [1.0 / n for n in norms]
    return kern.block_sums(
        z, inv[0], inv[1], inv[2], zscale, base, scale,
        key[0], key[1], b[0], b[1], b[2], n_cells,
    )  # fmt: skip


@pytest.mark.parametrize(("n_cells", "p"), [(8, 0.15), (27, 0.15), (8, 0.5), (1, 0.3)])
def test_block_sums_have_the_binomial_moments(n_cells: int, p: float) -> None:
    shape = (50, 50, 50)
    z = np.zeros(shape, dtype=np.float32)  # p = base + scale * 0.5 everywhere
    key = stream_key(derive_seed(3, 0), STREAM_BERNOULLI)
    frac = _block_sums(z, p - 0.05, 0.1, 0.1, key, (-25, -25, -25), n_cells)
    assert frac.shape == shape and frac.dtype == np.float32
    # the success fraction of n Bernoulli(p) cells: mean p, variance p (1 - p) / n
    dist = stats.binom(n_cells, p)
    s = frac.astype(np.float64) * n_cells
    se = np.sqrt(dist.var() / s.size)
    assert abs(s.mean() - dist.mean()) < 5 * se
    assert s.var() == pytest.approx(dist.var(), rel=0.03)
    # a pure function of the block's counter-based uniform
    u = uniform_from_index(key, lattice_index(*(np.arange(-25, 25),) * 3)).astype(np.float64)
    ref = p + np.sqrt(p * (1 - p) / n_cells) * np.sqrt(12.0) * (u - 0.5)
    np.testing.assert_allclose(frac, ref, atol=1e-6)


def test_block_sums_follow_the_probability_field() -> None:
    rng = np.random.default_rng(5)
    shape = (30, 24, 20)
    z = rng.normal(0.0, 2.0, size=shape).astype(np.float32)
    norms = [rng.uniform(0.5, 2.0, size=n) for n in shape]
    base, scale, zscale, n_cells = 0.05, 0.2, 0.4, 8
    key = stream_key(derive_seed(9, 2), STREAM_BERNOULLI)
    frac = _block_sums(z, base, scale, zscale, key, (3, -7, 100), n_cells, norms)
    nrm = norms[0][:, None, None] * norms[1][None, :, None] * norms[2][None, None, :]
    p = base + scale * np.clip(0.5 + zscale * z.astype(np.float64) / nrm, 0.0, 1.0)
    idx = lattice_index(np.arange(3, 33), np.arange(-7, 17), np.arange(100, 120))
    u = uniform_from_index(key, idx).astype(np.float64)
    ref = p + np.sqrt(p * (1 - p) / n_cells) * np.sqrt(12.0) * (u - 0.5)
    np.testing.assert_allclose(frac, ref, atol=1e-5)
    # p = 0 and p = 1 are exact
    ones = _block_sums(z, 1.0, 0.0, zscale, key, (0, 0, 0), n_cells)
    zeros = _block_sums(z, 0.0, 0.0, zscale, key, (0, 0, 0), n_cells)
    assert np.all(ones == 1.0) and np.all(zeros == 0.0)


# --------------------------------------------------------------------------- contractions


def _dense_from_band(start: np.ndarray, w: np.ndarray, ncol: int) -> np.ndarray:
    m = np.zeros((start.size, ncol))
    for o in range(start.size):
        m[o, start[o] : start[o] + w.shape[1]] = w[o]
    return m


@pytest.mark.parametrize("seed", [0, 1])
def test_band_contract3_matches_dense(seed: int) -> None:
    rng = np.random.default_rng(seed)
    core = rng.standard_normal((21, 17, 13)).astype(np.float32)
    mats = []
    for n_in, n_out, sigma in ((21, 15, 1.7), (17, 19, 2.5), (13, 9, 0.9)):
        in_pos = np.arange(n_in) * 1.5
        out_pos = rng.uniform(-2.0, n_in * 1.5 + 2.0, size=n_out)
        m = gaussian_matrix(out_pos, in_pos, sigma) * rng.uniform(0.5, 1.5, size=(n_out, 1))
        mats.append(m)
    bands = [to_band(m) for m in mats]
    for (s, w), m in zip(bands, mats, strict=True):
        assert s.dtype == np.int64 and w.dtype == np.float32
        np.testing.assert_allclose(_dense_from_band(s, w, m.shape[1]), m, rtol=1e-6, atol=1e-7)
    got = kern.band_contract3(core, *bands[0], *bands[1], *bands[2])
    dense = [_dense_from_band(s, w, m.shape[1]) for (s, w), m in zip(bands, mats, strict=True)]
    ref = contract_dense(core.astype(np.float64), *dense)
    assert got.shape == (15, 19, 9) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_band_contract3_blur_matches_gaussian_filter() -> None:
    rng = np.random.default_rng(2)
    core = rng.standard_normal((24, 20, 16)).astype(np.float32)
    sig = (1.3, 0.7, 2.2)
    bands = [blur_band(n, s) for n, s in zip(core.shape, sig, strict=True)]
    got = kern.band_contract3(core, *bands[0], *bands[1], *bands[2])
    ref = ndimage.gaussian_filter(core.astype(np.float64), sig, mode="constant", truncate=3.0)
    np.testing.assert_allclose(got, ref, atol=2e-5)


@pytest.mark.parametrize("shape", [(30, 25, 20), (9, 40, 7)])
def test_toeplitz_contract3_matches_gaussian_filter(shape) -> None:
    rng = np.random.default_rng(3)
    core = rng.standard_normal(shape).astype(np.float32)
    sig = (1.2, 0.8, 2.0)
    ks = [gaussian_kernel1d(s, 3.0).astype(np.float32) for s in sig]
    r = [(k.size - 1) // 2 for k in ks]
    got = kern.toeplitz_contract3(
        core, -r[0], ks[0], shape[0], -r[1], ks[1], shape[1], -r[2], ks[2], shape[2]
    )
    ref = ndimage.gaussian_filter(core.astype(np.float64), sig, mode="constant", truncate=3.0)
    assert got.shape == shape and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=2e-5)
    # a binary mask, as the edge blur uses it
    mask = rng.random(shape) < 0.1
    got = kern.toeplitz_contract3(
        mask.view(np.uint8), -r[0], ks[0], shape[0], -r[1], ks[1], shape[1], -r[2], ks[2], shape[2]
    )
    ref = ndimage.gaussian_filter(mask.astype(np.float64), sig, mode="constant", truncate=3.0)
    np.testing.assert_allclose(got, ref, atol=2e-6)


def test_toeplitz_contract3_general_offsets_match_dense() -> None:
    """Other offsets and output sizes (the texture's block-to-grid smoothing)."""
    rng = np.random.default_rng(4)
    core = rng.random((26, 22, 18)).astype(np.float32)
    ks = [rng.random(n).astype(np.float32) for n in (5, 7, 3)]
    offs = (0, 3, -4)
    outs = (20, 14, 25)
    mats = []
    for k, off, n_out, n_in in zip(ks, offs, outs, core.shape, strict=True):
        m = np.zeros((n_out, n_in))
        for i in range(n_out):
            for t in range(k.size):
                if 0 <= i + off + t < n_in:
                    m[i, i + off + t] = k[t]
        mats.append(m)
    got = kern.toeplitz_contract3(
        core, offs[0], ks[0], outs[0], offs[1], ks[1], outs[1], offs[2], ks[2], outs[2]
    )
    ref = contract_dense(core.astype(np.float64), *mats)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_numba_band_and_interp_helpers_match_references() -> None:
    from synthgen._geometry import gaussian_band
    from synthgen._texture import interp_coords

    rng = np.random.default_rng(11)
    for sigma, step in ((3.0, 2.0), (15.0, 15.0), (4.0, 2.0), (7.0, 3.0)):
        pos = np.sort(rng.uniform(-60.0, 60.0, size=41))
        lat0, n_lat = -int(90 / step), int(180 / step)
        s_ref, w_ref = gaussian_band(pos, lat0, n_lat, step, sigma, 3.0)
        s_nb, w_nb = kern.gaussian_band_nb(pos, lat0, n_lat, step, sigma, 3.0)
        np.testing.assert_array_equal(s_nb, s_ref)
        np.testing.assert_allclose(w_nb, w_ref, atol=1e-6)
    pos = np.linspace(-20.3, 31.7, 57)
    i_ref, f_ref = interp_coords(pos, -22.0, 2.0, 30)
    i_nb, f_nb = kern.interp_coords_nb(pos, -22.0, 2.0, 30)
    np.testing.assert_array_equal(i_nb, i_ref)
    np.testing.assert_allclose(f_nb, f_ref, atol=1e-6)


def test_stream_keys_of_many_seeds_are_stream_key() -> None:
    from synthgen._hash import stream_keys

    rng = np.random.default_rng(5)
    seeds = [int(s) for s in rng.integers(0, 2**63 - 1, size=500)] + [0, 1, 2**63 - 1, 2**64 + 3]
    for stream in (STREAM_NOISE, STREAM_BERNOULLI, 9):
        want = np.array([stream_key(s, stream) for s in seeds])
        np.testing.assert_array_equal(stream_keys(seeds, stream), want)
    both = stream_keys(seeds, STREAM_NOISE, STREAM_BERNOULLI)
    np.testing.assert_array_equal(both[:, 2:], [stream_key(s, STREAM_BERNOULLI) for s in seeds])
    # in range (converted as they are), negative (wrapped), NumPy integers, a generator
    for few in (seeds[:7], [-1, -(2**63), 5], [np.int64(-3), np.uint64(2**64 - 1)]):
        want = np.array([stream_key(int(s), 9) for s in few])
        np.testing.assert_array_equal(stream_keys(few, 9), want)
        np.testing.assert_array_equal(stream_keys(iter(few), 9), want)


def test_axis_tables_match_the_lattice_reference() -> None:
    """The per-axis texture tables of one numba call (many axes at once: the GPU driver's
    call) are the reference construction per axis: lattice_range for blocks and noise
    lattice, _geometry.gaussian_band for the bands, NumPy's row norms. The same rows alone
    (the CPU path's call) give the same numbers."""
    from synthgen._geometry import gaussian_band, lattice_range
    from synthgen._texture import axis_tables, block_size_mm

    rng = np.random.default_rng(3)
    m = 300
    sb = rng.uniform(1.0, 20.0, m)
    sb[::4] = np.round(sb[::4])
    sa = rng.uniform(0.4, 20.0, m)
    h_b = np.array([block_size_mm(float(s)) for s in sb])
    o_lo, o_hi = rng.integers(-60, 1, m), rng.integers(0, 60, m)
    ints, origin, starts, weights, inv = axis_tables(o_lo, o_hi, h_b, sa, sb)
    for q in range(m):
        hb = int(h_b[q])
        blocks = lattice_range(int(o_lo[q]) * hb, int(o_hi[q]) * hb, hb, 3.0 * sb[q])
        h_a = max(sa[q], float(hb))
        centres = blocks * float(hb)
        lat = lattice_range(centres[0], centres[-1], h_a, 3.0 * sa[q])
        s_ref, w_ref = gaussian_band(centres, int(lat[0]), lat.size, h_a, sa[q], 3.0)
        lat0, n_lat, b0, nbk, offs, n_out, kk, row, woff = ints[q]
        assert (lat0, n_lat, b0, nbk) == (lat[0], lat.size, blocks[0], blocks.size)
        assert offs == o_lo[q] - np.floor(3.0 * sb[q] / hb) - b0
        assert n_out == o_hi[q] - o_lo[q] + 1 and origin[q] == o_lo[q] * float(hb)
        assert kk == w_ref.shape[1]
        np.testing.assert_array_equal(starts[row : row + nbk], s_ref)
        w = weights[woff : woff + nbk * kk].reshape(nbk, kk)
        np.testing.assert_allclose(w, w_ref, rtol=1e-6, atol=1e-7)
        norm = 1.0 / np.sqrt((w.astype(np.float64) ** 2).sum(axis=1))
        np.testing.assert_array_equal(inv[row : row + nbk], norm)  # NumPy's summation order
        one = axis_tables(o_lo[q : q + 1], o_hi[q : q + 1], h_b[q : q + 1], sa[q : q + 1],
                          sb[q : q + 1])  # fmt: skip
        np.testing.assert_array_equal(one[3], w.ravel())
        np.testing.assert_array_equal(one[4], inv[row : row + nbk])


def test_axis_tables_whole_mm_sigma_table_is_the_exp_per_weight() -> None:
    """Whole-millimetre sigma_a (every preset's) takes the table path of axis_tables_nb (a
    Gaussian per integer distance, not an exp per weight; a row equal to an earlier one
    copied from it): the same bytes as the per-weight band of gaussian_band_nb and NumPy's
    row norms, clamped edge rows and wide lattices included, rows of many sigmas in any
    order."""
    from synthgen._cpu_kernels import gaussian_band_nb
    from synthgen._texture import axis_tables, block_size_mm

    rng = np.random.default_rng(11)
    m = 400
    sa = rng.choice([1.0, 2.0, 3.0, 6.0, 9.0, 12.0, 15.0, 40.0], m)
    sb = rng.choice([2.0, 4.0, 7.0, 9.0, 16.0], m)
    h_b = np.array([block_size_mm(float(s)) for s in sb])
    o_lo = rng.integers(-80, 1, m)
    o_hi = o_lo + rng.integers(0, 90, m)
    ints, _, starts, weights, inv = axis_tables(o_lo, o_hi, h_b, sa, sb)
    for q in range(m):
        lat0, n_lat, b0, nbk, _, _, kk, row, woff = (int(x) for x in ints[q])
        centres = (b0 + np.arange(nbk)) * float(h_b[q])
        s_ref, w_ref = gaussian_band_nb(centres, lat0, n_lat, max(sa[q], float(h_b[q])), sa[q],
                                        3.0)  # fmt: skip
        assert kk == w_ref.shape[1]
        np.testing.assert_array_equal(starts[row : row + nbk], s_ref)
        assert weights[woff : woff + nbk * kk].tobytes() == w_ref.tobytes()
        norm = 1.0 / np.sqrt((w_ref.astype(np.float64) ** 2).sum(axis=1))
        assert inv[row : row + nbk].tobytes() == norm.tobytes()


def test_texture_axes_of_tumor_boxes_are_the_references() -> None:
    """The GPU driver's one call from tumor boxes to per-axis tables: block sizes
    (block_sizes_mm), grid ranges (grid_index_range) and the tables of axis_tables."""
    from synthgen._cpu_kernels import texture_axes_nb
    from synthgen._geometry import lattice_range
    from synthgen._texture import axis_tables, block_sizes_mm, grid_index_range

    rng = np.random.default_rng(12)
    n = 50
    sa = np.where(rng.random(n) < 0.5, rng.choice([3.0, 6.0, 15.0], n), rng.uniform(0.5, 9, n))
    sb = rng.uniform(0.5, 12.0, n)
    lo = -rng.uniform(0, 40, (n, 3))
    hi = rng.uniform(0, 40, (n, 3))
    fields, origin, h_b, starts, weights, inv, ok = texture_axes_nb(lo, hi, sa, sb)
    assert ok.all()
    np.testing.assert_array_equal(h_b, block_sizes_mm(sb))
    o_lo, o_hi = grid_index_range(lo, hi, h_b[:, None])
    for q in range(n):  # the rules themselves: lattice_range(lo, hi, h_b, h_b), floor(sb / 2)
        assert h_b[q] == max(1, math.floor(sb[q] / 2.0))
        for a in range(3):
            lat = lattice_range(lo[q, a], hi[q, a], float(h_b[q]), float(h_b[q]))
            assert (o_lo[q, a], o_hi[q, a]) == (lat[0], lat[-1])
    ints, origin_r, starts_r, weights_r, inv_r = axis_tables(
        o_lo.ravel(), o_hi.ravel(), np.repeat(h_b, 3), np.repeat(sa, 3), np.repeat(sb, 3)
    )
    np.testing.assert_array_equal(fields, np.moveaxis(ints.reshape(n, 3, 9), 2, 0))
    np.testing.assert_array_equal(origin, origin_r.reshape(n, 3))
    for got, want in ((starts, starts_r), (weights, weights_r), (inv, inv_r)):
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes()


def test_texture_scalars_of_many_tumors_are_the_recipes_scalars() -> None:
    """The texture scalars and block sizes of many tumors in one call (texture_consts, the
    compiled function the GPU driver calls too) are, bit for bit, the per-tumor formulas."""
    from synthgen._texture import (
        block_size_mm,
        block_sizes_mm,
        texture_consts,
        texture_params,
    )

    rng = np.random.default_rng(8)
    prms = [{"sigma_a_mm": float(rng.uniform(0.5, 9)), "sigma_b_mm": float(rng.uniform(0.3, 12)),
             "range_sd": float(rng.uniform(0.5, 3)), "base": float(rng.uniform(0, 1)),
             "scale": float(rng.uniform(0, 1)), "threshold": float(rng.uniform(0, 1)),
             "u0": float(rng.uniform(0, 1))} for _ in range(300)]  # fmt: skip
    P = texture_params(prms)
    h_b = block_sizes_mm(P[:, 1])
    assert h_b.tolist() == [block_size_mm(p["sigma_b_mm"]) for p in prms]
    h_c, got = texture_consts(P)
    for q, p in enumerate(prms):
        want = (math.sqrt(12.0) / (2.0 * p["range_sd"]), p["base"], p["scale"],
                float(h_b[q] ** 3), p["threshold"], p["u0"])  # fmt: skip
        assert got[q].tolist() == list(want)
    h_nb, got_nb = kern.texture_consts_nb(P)  # (the GPU driver's: both in one compiled call)
    assert h_nb.tolist() == h_b.tolist() and got_nb.tolist() == got.tolist()
    assert h_c.tolist() == h_b.tolist()


def test_axis_tables_refuse_lattices_beyond_the_hash_range() -> None:
    from synthgen._texture import axis_tables

    with pytest.raises(ValueError, match="512 cells"):
        axis_tables([-600], [10], [1], [2.0], [2.0])


def test_trilinear_box_is_sample_trilinear_bit_for_bit() -> None:
    """The one-pass trilinear kernel that wall tumors sample their texture with gives the
    NumPy reference's float32 values exactly: grids and boxes of random shapes, positions
    inside, on and beyond the grid (clamped), anisotropic spacing."""
    from synthgen._cpu_kernels import trilinear_box
    from synthgen._texture import interp_coords, sample_trilinear

    rng = np.random.default_rng(5)
    for _ in range(60):
        grid = rng.random(tuple(int(n) for n in rng.integers(2, 9, 3))).astype(np.float32)
        origin = tuple(float(x) for x in rng.uniform(-20, 0, 3))
        step = float(rng.uniform(1.5, 6.0))
        pos = [np.sort(rng.uniform(origin[a] - 3, origin[a] + step * grid.shape[a] + 3,
                                   int(rng.integers(1, 14)))) for a in range(3)]  # fmt: skip
        want = sample_trilinear(grid, origin, step, pos)
        idx = [interp_coords(pos[a], origin[a], step, grid.shape[a]) for a in range(3)]
        got = trilinear_box(grid, *(x for ix in idx for x in ix))
        assert got.dtype == np.float32
        assert got.tobytes() == want.tobytes()
