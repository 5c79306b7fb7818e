"""The CUDA C device functions in kernels/ against the CPU path, compiled for the host.

``kernels/hash.cuh`` is plain C++ on 32-bit words; compiled by the host C++ compiler (no GPU
needed) it must give the NumPy reference (``synthgen._hash``) and the numba kernel
(``synthgen._cpu_kernels.lattice_uniform``) bit for bit. The GPU tests of issue 3 then only
have to show that NVRTC compiles the same text to the same arithmetic.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from synthgen import _cpu_kernels as k
from synthgen._hash import mix32, stream_key, uniform_from_index

KERNELS = Path(__file__).resolve().parents[1] / "kernels"

_WRAPPER = r"""
#include "hash.cuh"
#include "shape.cuh"
#include "blend.cuh"
#include "texture.cuh"
extern "C" void sg_host_band_axis(const float* in, float* out, int n0, int n1, int n2,
                                  int axis, const long long* s, const float* w, int m, int K) {
    int o0 = axis == 0 ? m : n0, o1 = axis == 1 ? m : n1, o2 = axis == 2 ? m : n2;
    long long t = 0;
    for (int a = 0; a < o0; ++a)
        for (int b = 0; b < o1; ++b)
            for (int c = 0; c < o2; ++c, ++t) {
                if (axis == 2)
                    out[t] = sg_band_point(in + ((long long)a * n1 + b) * n2, 1, s, w, K, c);
                else if (axis == 1)
                    out[t] = sg_band_point(in + (long long)a * n1 * n2 + c, n2, s, w, K, b);
                else
                    out[t] = sg_band_point(in + (long long)b * n2 + c, (long long)n1 * n2, s, w,
                                           K, a);
            }
}
extern "C" void sg_host_block_sums(const float* z, const double* in0, const double* in1,
                                   const double* in2, double zscale, double base, double scale,
                                   sg_u32 k0, sg_u32 k1, int b0, int b1, int b2,
                                   double n_cells, int nx, int ny, int nz, float* out) {
    long long t = 0;
    for (int i = 0; i < nx; ++i)
        for (int j = 0; j < ny; ++j)
            for (int k = 0; k < nz; ++k, ++t)
                out[t] = sg_block_fraction(z[t], zscale * in0[i] * in1[j], in2[k], base, scale,
                                           k0, k1, b0 + i, b1 + j, b2 + k, 1.0 / n_cells);
}
extern "C" void sg_host_blend(const float* orig, const unsigned char* organ, float tlo,
                              float thi, const float* blur, const float* tgrid, int gy, int gz,
                              const long long* i0, const float* f0, const long long* i1,
                              const float* f1, const long long* i2, const float* f2,
                              float contrast, float organ_hu, int clipped, int nx, int ny,
                              int nz, float* delta, const float* q2, const float* app,
                              const sg_u32* keys, int off0, int off1, int off2, int app_on) {
    long long t = 0;
    for (int i = 0; i < nx; ++i)
        for (int j = 0; j < ny; ++j)
            for (int k = 0; k < nz; ++k, ++t) {
                float b = blur[t], v = orig[t];
                if (b <= 0.0f || v < tlo || v > thi) continue;
                float tex = sg_texture_at(tgrid, gy, gz, (int)i0[i], f0[i], (int)i1[j], f1[j],
                                          (int)i2[k], f2[k]);
                float d;
                if (app_on) {
                    if (!organ[t] && clipped) continue;
                    d = sg_appear_delta(v, organ[t], b, tex * contrast, q2[t], organ_hu, app,
                                        keys, off0 + i, off1 + j, off2 + k);
                } else {
                    d = sg_blend_delta(v, organ[t], b, tex, tlo, thi, contrast, organ_hu,
                                       clipped);
                }
                if (__builtin_fabsf(d) > __builtin_fabsf(delta[t])) delta[t] = d;
            }
}
extern "C" void sg_host_apply(float* out, const float* orig, const float* delta,
                              const unsigned char* mask, float cmin, float cmax, float lo,
                              float hi, int round_int, long long total, double* stats) {
    for (long long t = 0; t < total; ++t) {
        float o = orig[t], d = delta[t], w = o;
        if (d != 0.0f) { w = sg_apply(o, d, cmin, cmax, lo, hi, round_int); out[t] = w; }
        if (mask[t]) { stats[0] += 1.0; stats[1] += (double)(o - w); }
    }
}
extern "C" void sg_host_shape_mask(const float* ctrl, int g0, int g1, int g2,
                                   const float* w0, const float* w1, const float* w2,
                                   const float* pos0, const float* pos1, const float* pos2,
                                   const double* m, const unsigned char* organ,
                                   const float* image, float tlo, float thi, int clip,
                                   int nx, int ny, int nz, unsigned char* out, float* q2out) {
    long long t = 0;
    float row[3 + 3 * 8];  /* g2 <= 8 */
    for (int i = 0; i < nx; ++i)
        for (int j = 0; j < ny; ++j) {
            sg_shape_row(ctrl, g0, g1, g2, w0 + i * g0, w1 + j * g1, pos0[i], pos1[j], m, row);
            for (int k = 0; k < nz; ++k, ++t) {
                float q2 = sg_shape_q2_row(row, g2, w2 + k * g2, pos2[k], m);
                float v = image[t];
                out[t] = (q2 <= 1.0f) && (!clip || organ[t]) && v >= tlo && v <= thi;
                q2out[t] = q2;
            }
        }
}
extern "C" void sg_host_mix32(const sg_u32* x, sg_u32* out, long long n) {
    for (long long t = 0; t < n; ++t) out[t] = sg_mix32(x[t]);
}
extern "C" void sg_host_lattice_uniform(float* out, sg_u32 k0, sg_u32 k1, int a0, int n0,
                                        int a1, int n1, int a2, int n2, float shift) {
    long long t = 0;
    for (int i = 0; i < n0; ++i)
        for (int j = 0; j < n1; ++j)
            for (int k = 0; k < n2; ++k, ++t)
                out[t] = sg_uniform(k0, k1, sg_lattice_index(a0 + i, a1 + j, a2 + k)) - shift;
}
"""


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    d = tmp_path_factory.mktemp("kernels")
    src = d / "wrapper.cpp"
    src.write_text(_WRAPPER)
    lib = d / "libsghost.so"
    cmd = [cxx, "-O2", "-std=c++14", "-shared", "-fPIC", f"-I{KERNELS}", str(src), "-o", str(lib)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert r.returncode == 0, f"kernels/hash.cuh does not compile as C++:\n{r.stderr}"
    dll = ctypes.CDLL(str(lib))
    u32p = np.ctypeslib.ndpointer(np.uint32, flags="C_CONTIGUOUS")
    f32p = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
    dll.sg_host_mix32.argtypes = [u32p, u32p, ctypes.c_longlong]
    dll.sg_host_lattice_uniform.argtypes = [f32p, ctypes.c_uint32, ctypes.c_uint32]
    dll.sg_host_lattice_uniform.argtypes += [ctypes.c_int] * 6 + [ctypes.c_float]
    u8p = np.ctypeslib.ndpointer(np.uint8, flags="C_CONTIGUOUS")
    f64p = np.ctypeslib.ndpointer(np.float64, flags="C_CONTIGUOUS")
    dll.sg_host_shape_mask.argtypes = (
        [f32p] + [ctypes.c_int] * 3 + [f32p] * 6 + [f64p, u8p, f32p]
        + [ctypes.c_float] * 2 + [ctypes.c_int] * 4 + [u8p, f32p]
    )  # fmt: skip
    i64p = np.ctypeslib.ndpointer(np.int64, flags="C_CONTIGUOUS")
    dll.sg_host_blend.argtypes = (
        [f32p, u8p, ctypes.c_float, ctypes.c_float, f32p, f32p, ctypes.c_int, ctypes.c_int]
        + [i64p, f32p] * 3 + [ctypes.c_float, ctypes.c_float] + [ctypes.c_int] * 4 + [f32p]
        + [f32p, f32p, u32p] + [ctypes.c_int] * 4
    )  # fmt: skip
    dll.sg_host_apply.argtypes = (
        [f32p, f32p, f32p, u8p] + [ctypes.c_float] * 4 + [ctypes.c_int, ctypes.c_longlong, f64p]
    )  # fmt: skip
    dll.sg_host_band_axis.argtypes = (
        [f32p, f32p] + [ctypes.c_int] * 4 + [i64p, f32p, ctypes.c_int, ctypes.c_int]
    )  # fmt: skip
    dll.sg_host_block_sums.argtypes = (
        [f32p, f64p, f64p, f64p] + [ctypes.c_double] * 3 + [ctypes.c_uint32] * 2
        + [ctypes.c_int] * 3 + [ctypes.c_double] + [ctypes.c_int] * 3 + [f32p]
    )  # fmt: skip
    return dll


def test_mix32_matches_numpy(host_lib: ctypes.CDLL) -> None:
    x = np.random.default_rng(0).integers(0, 2**32, size=100_000, dtype=np.uint64)
    x = np.concatenate([x.astype(np.uint32), np.array([0, 1, 2**31, 2**32 - 1], np.uint32)])
    out = np.empty_like(x)
    host_lib.sg_host_mix32(x, out, x.size)
    np.testing.assert_array_equal(out, mix32(x))


@pytest.mark.parametrize("seed", [0, 7, 2**62 + 12345])
def test_lattice_uniform_matches_numba_and_numpy(host_lib: ctypes.CDLL, seed: int) -> None:
    k0, k1 = stream_key(seed, 3)
    a, n = (-7, 5, -512), (9, 11, 13)
    out = np.empty(n, dtype=np.float32)
    host_lib.sg_host_lattice_uniform(out, k0, k1, a[0], n[0], a[1], n[1], a[2], n[2], 0.5)
    ref = k.lattice_uniform(k0, k1, a[0], n[0], a[1], n[1], a[2], n[2], np.float32(0.5))
    np.testing.assert_array_equal(out, ref)  # bit for bit
    ii, jj, kk = np.meshgrid(*(np.arange(s) + o for o, s in zip(a, n, strict=True)), indexing="ij")
    idx = ((ii + 512) << 20) | ((jj + 512) << 10) | (kk + 512)
    np.testing.assert_array_equal(out, uniform_from_index((k0, k1), idx) - np.float32(0.5))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_shape_mask_matches_numba(host_lib: ctypes.CDLL, seed: int) -> None:
    """The fused B-spline + ellipsoid test of kernels/shape.cuh gives the numba kernel's mask
    (the same operations in the same order; the GPU kernel compiles with --fmad=false)."""
    from synthgen.phantom import make_phantom
    from synthgen.planning import make_plan
    from synthgen.rendering import _shape_inputs, tumor_box

    ph = make_phantom((96, 80, 64), (4.0, 4.0, 5.0), seed=0)
    liver = ph.mask("liver")
    plan = make_plan(ph.image, liver, organ="liver", affine=ph.affine, seed=seed, size="large")
    for t in plan.tumors:
        box = tumor_box(t, plan.spacing, plan.shape)
        pos = [
            (np.arange(box[a].start, box[a].stop) - t.center_vox[a]) * plan.spacing[a]
            for a in range(3)
        ]
        ctrl, w, pos32, m = _shape_inputs(t, pos)
        organ = np.ascontiguousarray(liver[box])
        image = np.ascontiguousarray(ph.image[box], dtype=np.float32)
        ref = np.empty(organ.shape, dtype=np.bool_)
        q2_ref = np.empty(organ.shape, dtype=np.float32)
        k.shape_mask(
            ctrl, *w, *pos32, m, organ, image, np.float32(-100), np.float32(300), True, ref, q2_ref
        )
        alone = np.empty(organ.shape, dtype=np.bool_)  # the mask does not depend on q2out
        k.shape_mask(
            ctrl, *w, *pos32, m, organ, image, np.float32(-100), np.float32(300), True, alone
        )
        np.testing.assert_array_equal(alone, ref)
        out = np.full(organ.shape, 7, dtype=np.uint8)  # poisoned: every element is written
        q2 = np.full(organ.shape, np.nan, dtype=np.float32)
        g = ctrl.shape[1:]
        host_lib.sg_host_shape_mask(
            np.ascontiguousarray(ctrl), *g, *(np.ascontiguousarray(x) for x in w),
            *(np.ascontiguousarray(p) for p in pos32), np.ascontiguousarray(m, np.float64),
            organ.view(np.uint8), image, -100.0, 300.0, 1, *organ.shape, out, q2,
        )  # fmt: skip
        assert set(np.unique(out)) <= {0, 1}
        assert ref.any()
        np.testing.assert_array_equal(out.view(np.bool_), ref)
        np.testing.assert_array_equal(q2, q2_ref)  # the squared normalised radius, bit for bit


@pytest.mark.parametrize("clipped", [True, False])
def test_blend_and_apply_match_numba(host_lib: ctypes.CDLL, clipped: bool) -> None:
    """kernels/blend.cuh: the per-voxel change and the write-back, bit for bit."""
    rng = np.random.default_rng(5 + clipped)
    n = (17, 13, 11)
    orig = rng.uniform(-200, 300, n).astype(np.float32)
    organ = rng.random(n) < 0.7
    blur = np.where(rng.random(n) < 0.2, 0, rng.random(n)).astype(np.float32)
    tgrid = rng.random((6, 5, 4)).astype(np.float32)
    ic = [
        k.interp_coords_nb(np.linspace(-20, 20, m).astype(np.float32), -25.0, 10.0, tgrid.shape[a])
        for a, m in enumerate(n)
    ]
    tlo, thi, contrast, organ_hu = np.float32(-100), np.float32(250), np.float32(40), np.float32(60)
    prior = np.where(rng.random(n) < 0.3, rng.normal(0, 20, n), 0).astype(np.float32)
    ref = prior.copy()
    k.blend_tumor(
        orig, organ, tlo, thi, blur, tgrid, *ic[0], *ic[1], *ic[2], contrast, organ_hu,
        clipped, ref,
    )  # fmt: skip
    out = prior.copy()
    none_f, none_u = np.zeros(1, np.float32), np.zeros(1, np.uint32)
    host_lib.sg_host_blend(
        orig, organ.view(np.uint8), tlo, thi, blur, tgrid, tgrid.shape[1], tgrid.shape[2],
        *(np.ascontiguousarray(x) for c in ic for x in c), contrast, organ_hu, int(clipped),
        *n, out, none_f, none_f, none_u, 0, 0, 0, 0,
    )  # fmt: skip
    assert (ref != prior).any()
    np.testing.assert_array_equal(out, ref)
    # write-back into an int16-valued image: rounding, floor/ceiling, clipping, statistics;
    # some voxels already outside [-1024, 3071] (padding, an extended-HU metal clip) where
    # the change is not 0: they move by the change within their bound, never clamped into it
    mask = organ & (ref != 0)
    orig = orig.copy()
    hit = np.flatnonzero(ref != 0)
    orig.flat[hit[::7]] = -3024.0
    orig.flat[hit[3::7]] = 30000.0
    gap = np.flatnonzero((ref != 0) & ~mask)[::5]
    orig.flat[gap] = np.nan  # no data (a float scan's NaN padding): stays NaN
    target = orig.copy()
    cnt, acc = k.apply_delta(target, orig, ref, mask, -50.0, 200.0, -1024.0, 3071.0, True)
    host_out = orig.copy()
    stats = np.zeros(2)
    host_lib.sg_host_apply(
        host_out, orig, ref, mask.view(np.uint8), -50.0, 200.0, -1024.0, 3071.0, 1,
        orig.size, stats,
    )  # fmt: skip
    np.testing.assert_array_equal(host_out, target)
    assert stats[0] == cnt and stats[1] == acc  # sequential sums: bit for bit (GPU atomics: ~1e-12)
    hi_x, lo_x = orig == 30000.0, orig == -3024.0
    up, down = ref < 0, ref > 0
    assert (hi_x & down).any() and (hi_x & up).any() and (lo_x & down).any() and (lo_x & up).any()
    np.testing.assert_array_equal(target[hi_x & down], np.rint(orig - ref)[hi_x & down])
    assert (target[hi_x & up] == 30000.0).all()  # above cmax already: not brightened further
    assert (target[lo_x & down] == -3024.0).all()  # below cmin already: not darkened further
    np.testing.assert_array_equal(target[lo_x & up], np.rint(orig - ref)[lo_x & up])
    assert gap.size and np.isnan(target.flat[gap]).all()


@pytest.mark.parametrize("round_int", [0, 1])
@pytest.mark.parametrize("bounds", [(-50.0, 200.0, -1024.0, 3071.0), (0.0, -0.0, -0.0, 0.0),
                                    (-0.0, 0.0, 0.0, -0.0)])  # fmt: skip
def test_write_back_special_values_match_numba(host_lib: ctypes.CDLL, bounds, round_int) -> None:
    """sg_apply is the numba apply_delta on special values: voxels and changes of both signs,
    zeros of both signs, infinities and NaN (an infinite voxel and change of the same sign
    make NaN, which stays), float32 images. Bit for bit against ordinary bounds; against
    bounds of 0 the same values, where the sign of a zero result may differ (fminf and fmaxf
    break a tie of zeros their own way)."""
    vals = np.array([-np.inf, -3024.0, -50.0, -1.5, -0.0, 0.0, 1e-3, 0.5, 200.0, 3071.0,
                     30000.0, np.inf, np.nan], np.float32)  # fmt: skip
    changes = np.array([-np.inf, -1e4, -5.5, -0.5, -0.0, 0.0, 1e-3, 2.5, 1e4, np.inf, np.nan],
                       np.float32)  # fmt: skip
    orig, delta = (np.ascontiguousarray(a, np.float32) for a in np.meshgrid(vals, changes))
    orig, delta = orig.reshape(1, *orig.shape), delta.reshape(1, *delta.shape)
    mask = np.ones(orig.shape, bool)
    cmin, cmax, lo, hi = bounds
    target = orig.copy()
    cnt, acc = k.apply_delta(target, orig, delta, mask, cmin, cmax, lo, hi, bool(round_int))
    host_out = orig.copy()
    stats = np.zeros(2)
    host_lib.sg_host_apply(host_out, orig, delta, mask.view(np.uint8), cmin, cmax, lo, hi,
                           round_int, orig.size, stats)  # fmt: skip
    np.testing.assert_array_equal(host_out, target)  # (NaN where NaN; -0 equals 0)
    if 0.0 not in bounds:
        np.testing.assert_array_equal(host_out.view(np.uint32), target.view(np.uint32))
    assert np.isnan(target).any() and np.isinf(target).any()
    assert stats[0] == cnt and np.array_equal(stats[1], acc, equal_nan=True)


@pytest.mark.parametrize("clipped", [True, False])
@pytest.mark.parametrize("modes", ["all", "rim", "necrosis", "specks", "noise"])
def test_appearance_blend_matches_numba(host_lib: ctypes.CDLL, clipped: bool, modes: str) -> None:
    """sg_appear_delta (rim, necrotic core, specks, counter-hash noise) is the numba
    _appear_delta, bit for bit, on random voxels, radii and parameters."""
    rng = np.random.default_rng(21 + clipped)
    n = (15, 12, 13)
    orig = rng.uniform(-200, 300, n).astype(np.float32)
    organ = rng.random(n) < 0.6
    blur = np.where(rng.random(n) < 0.1, 0, rng.random(n)).astype(np.float32)
    tgrid = rng.random((6, 5, 4)).astype(np.float32)
    q2 = rng.uniform(0, 1.4, n).astype(np.float32)
    ic = [
        k.interp_coords_nb(np.linspace(-20, 20, m).astype(np.float32), -25.0, 10.0, tgrid.shape[a])
        for a, m in enumerate(n)
    ]
    app = np.zeros(13, np.float32)
    if modes in ("all", "rim"):
        app[:3] = (0.75, 1 / 0.125, 35.0)
    if modes in ("all", "necrosis"):
        app[3:6] = (0.45, 1 / 0.2, 14.0)
    if modes in ("all", "specks"):
        app[7:11] = (0.08, 150.0, 450.0, 0.9)
    if modes in ("all", "noise", "necrosis"):
        app[11:13] = (7.3, 4.1)
    keys = np.array([stream_key(77, s)[i] for s in (3, 4, 5, 6) for i in (0, 1)], np.uint32)
    off = (-7, 3, -500)  # the lattice wraps past -512 alike on both sides
    args = (np.float32(-150), np.float32(250), blur, tgrid)
    c = (np.float32(40), np.float32(60))
    prior = np.where(rng.random(n) < 0.3, rng.normal(0, 20, n), 0).astype(np.float32)
    ref = prior.copy()
    k.blend_tumor(orig, organ, *args, *ic[0], *ic[1], *ic[2], *c, clipped, ref, q2, app, keys, *off)
    plain = prior.copy()
    k.blend_tumor(orig, organ, *args, *ic[0], *ic[1], *ic[2], *c, clipped, plain)
    out = prior.copy()
    host_lib.sg_host_blend(
        orig, organ.view(np.uint8), *args, tgrid.shape[1], tgrid.shape[2],
        *(np.ascontiguousarray(x) for cc in ic for x in cc), *c, int(clipped), *n, out,
        q2, app, keys, *off, 1,
    )  # fmt: skip
    np.testing.assert_array_equal(out, ref)
    if modes == "noise" and clipped:
        np.testing.assert_array_equal(ref, plain)  # noise only where tissue is replaced
    else:
        assert (ref != plain).sum() > 20, modes


def _band(rng: np.random.Generator, m: int, n: int, k_: int) -> tuple[np.ndarray, np.ndarray]:
    s = rng.integers(0, n - k_ + 1, size=m).astype(np.int64)
    return s, rng.normal(size=(m, k_)).astype(np.float32)


def test_band_contraction_matches_numba(host_lib: ctypes.CDLL) -> None:
    """Three sg_band_axis passes (axis 2, 1, 0) are band_contract3, bit for bit."""
    rng = np.random.default_rng(11)
    core = rng.normal(size=(9, 8, 7)).astype(np.float32)
    (s0, w0), (s1, w1), (s2, w2) = _band(rng, 6, 9, 4), _band(rng, 5, 8, 3), _band(rng, 10, 7, 5)
    ref = k.band_contract3(core, s0, w0, s1, w1, s2, w2)
    x = core
    for axis, (s, w) in ((2, (s2, w2)), (1, (s1, w1)), (0, (s0, w0))):
        shape = list(x.shape)
        shape[axis] = w.shape[0]
        y = np.full(shape, np.nan, dtype=np.float32)  # poisoned: every element is written
        host_lib.sg_host_band_axis(x, y, *x.shape, axis, s, w, *w.shape)
        x = y
    np.testing.assert_array_equal(x, ref)


def test_block_sums_match_numba(host_lib: ctypes.CDLL) -> None:
    rng = np.random.default_rng(12)
    n = (7, 6, 5)
    z = rng.normal(size=n).astype(np.float32)
    inv = [rng.uniform(0.5, 2.0, m) for m in n]
    k0, k1 = stream_key(99, 4)
    args = (0.3, 0.2, 0.5, k0, k1, -3, 4, 10, 64.0)
    ref = k.block_sums(z, *inv, *args)
    out = np.full(n, np.nan, dtype=np.float32)
    host_lib.sg_host_block_sums(z, *inv, *args, *n, out)
    np.testing.assert_array_equal(out, ref)
