"""Numba kernels that stand in for SciPy in planning and the wall tumors, against SciPy: the
distance transform (``synthgen._edt``: the same features and distances, bit for bit) and the
large 26-connected components of the bright-voxel check (``large_components``)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from scipy import ndimage

from synthgen._cpu_kernels import large_components
from synthgen._edt import distance_transform_edt, feature_transform


def _cases():
    rng = np.random.default_rng(11)
    spacings = [None, (1.0, 1.0, 1.0), (3.75, 3.75, 4.5), (2.5, 2.5, 3.0), (0.7, 1.9, 3.3)]
    for t in range(240):
        shape = tuple(int(n) for n in rng.integers(1, 26, 3))
        kind = t % 4
        if kind == 0:  # scattered voxels, from almost none to almost all
            m = rng.random(shape) < rng.choice([0.02, 0.3, 0.7, 0.97])
        elif kind == 1:  # blobs (an organ's component in its box)
            m = ndimage.gaussian_filter(rng.random(shape), 1.5) > rng.uniform(0.45, 0.55)
        elif kind == 2:  # a thin shell around blobs (the complement of a wall)
            b = ndimage.gaussian_filter(rng.random(shape), 1.5) > 0.5
            m = ~(b & ~ndimage.binary_erosion(b))
        else:  # a ball off centre: ties between equally near features
            c = rng.uniform(0, 1, 3) * shape
            x = np.indices(shape) - c.reshape(3, 1, 1, 1)
            m = (x**2).sum(axis=0) <= rng.uniform(1, 10) ** 2
        yield m, spacings[t % len(spacings)]
    yield np.ones((5, 6, 7), bool), (1.0, 2.0, 3.0)  # no background at all
    yield np.zeros((5, 6, 7), bool), None
    yield np.ones((1, 1, 1), bool), None


def test_distance_transform_matches_scipy_bit_for_bit():
    n = 0
    for m, sp in _cases():
        d_ref, f_ref = ndimage.distance_transform_edt(m, sampling=sp, return_indices=True)
        s = np.asarray((1.0, 1.0, 1.0) if sp is None else sp, dtype=np.float64)
        np.testing.assert_array_equal(feature_transform(np.ascontiguousarray(m), s), f_ref)
        got = distance_transform_edt(m, sampling=sp)
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, d_ref)
        n += 1
    assert n == 243
    # masks of other types, and a spacing for every axis at once
    m = ndimage.gaussian_filter(np.random.default_rng(2).random((9, 8, 7)), 1.5) > 0.5
    for mm in (m.astype(np.uint8), m.astype(np.float32) * 0.7, np.asfortranarray(m)):
        np.testing.assert_array_equal(distance_transform_edt(mm, 2.0),
                                      ndimage.distance_transform_edt(m, sampling=2.0))  # fmt: skip
    with pytest.raises(ValueError, match="3-D"):
        distance_transform_edt(np.ones((3, 3), bool))
    with pytest.raises(ValueError, match="sampling"):
        distance_transform_edt(m, (1.0, 2.0))


def test_distance_transform_split_over_threads_matches_scipy(monkeypatch):
    """Each pass's lines split into ranges run on the thread pool: the same distances as
    SciPy's for any number of parts (more than a pass has lines too), and by default from
    ``PARALLEL_VOXELS`` voxels on (a wall tumor's box; here made small)."""
    from synthgen import _edt, _pool

    cases = list(_cases())[::7]
    monkeypatch.setattr(_pool, "_NUM_THREADS", 3)
    for m, sp in cases:
        d_ref = ndimage.distance_transform_edt(m, sampling=sp)
        for parts in (2, 3, 7, 40):
            np.testing.assert_array_equal(distance_transform_edt(m, sp, parts=parts), d_ref)
    # the default split, past the (lowered) threshold: parts run on other threads
    monkeypatch.setattr(_edt, "PARALLEL_VOXELS", 1)
    seen = set()
    run = _edt.map_threads

    def spy(fn, items, work=None):
        def part(r):
            seen.add(threading.get_ident())
            time.sleep(0.001)  # (the helpers get parts even on a busy machine)
            return fn(r)

        return run(part, items, work)

    monkeypatch.setattr(_edt, "map_threads", spy)
    b = ndimage.gaussian_filter(np.random.default_rng(5).random((60, 50, 40)), 2.0) > 0.5
    m = ~(b & ~ndimage.binary_erosion(b))  # the complement of a wall, as render_wall's
    sp = (0.8, 0.8, 2.5)
    np.testing.assert_array_equal(distance_transform_edt(m, sp),
                                  ndimage.distance_transform_edt(m, sampling=sp))  # fmt: skip
    assert len(seen) > 1


def test_large_components_are_ndimage_labels_kept_by_size():
    """The voxels in 26-connected components of at least k voxels: ``ndimage.label`` with a
    full structure, sizes counted, small ones dropped (scattered voxels, blobs, chains that
    join only through corners, every size threshold from 1)."""
    rng = np.random.default_rng(4)
    for t in range(200):
        shape = tuple(int(n) for n in rng.integers(1, 22, 3))
        m = rng.random(shape) < rng.choice([0.05, 0.15, 0.3, 0.6])
        if t % 3 == 0:
            m = ndimage.gaussian_filter(rng.random(shape), 1) > 0.6
        k = int(rng.integers(1, 12))
        lab, n = ndimage.label(m, structure=np.ones((3, 3, 3), bool))
        keep = np.bincount(lab.ravel(), minlength=n + 1) >= k
        keep[0] = False
        np.testing.assert_array_equal(large_components(m, k), keep[lab])
        np.testing.assert_array_equal(large_components(np.asfortranarray(m), k), keep[lab])
    diag = np.zeros((6, 6, 6), bool)
    diag[range(6), range(6), range(6)] = True  # one component through corners only
    assert large_components(diag, 6).sum() == 6 and not large_components(diag, 7).any()
    for step in np.ndindex(3, 3, 3):  # a chain along each of the 26 neighbour offsets
        d = np.asarray(step) - 1
        if not d.any():
            continue
        chain = np.zeros((7, 7, 7), bool)
        for q in range(6):
            chain[tuple(3 + (q - 3) * d)] = True
        n = int(chain.sum())
        assert large_components(chain, n).sum() == n, d
        assert not large_components(chain, n + 1).any(), d


def test_face_dilation_is_ndimage_binary_dilation():
    """The bright-voxel check's "in or touching the organ": SciPy's binary dilation by the
    six face neighbours (border False), on boxes of any size, lines of one voxel included."""
    from synthgen._cpu_kernels import face_dilation

    rng = np.random.default_rng(9)
    face = ndimage.generate_binary_structure(3, 1)
    for _ in range(150):
        shape = tuple(int(n) for n in rng.integers(1, 16, 3))
        m = rng.random(shape) < rng.choice([0.01, 0.1, 0.4])
        np.testing.assert_array_equal(face_dilation(m), ndimage.binary_dilation(m, face))


def test_counted_medians_are_numpys():
    """Planning's medians of whole numbers (``median``, ``median_abs_dev``: counted) are
    ``np.median``'s float64 values: integer images' dtypes, whole-number float64
    differences, odd and even counts, ranges wide enough to fall back to partitioning."""
    from synthgen._cpu_kernels import median, median_abs_dev

    rng = np.random.default_rng(13)
    for t in range(400):
        n = int(rng.integers(1, 5000))
        dtype = (np.int16, np.int32, np.uint8, np.float64)[t % 4]
        hi = (2000, 10**7, 255, 300)[t % 4]
        lo = 0 if dtype == np.uint8 else -hi
        x = rng.integers(lo, hi, n).astype(dtype)
        whole = None if dtype != np.float64 else True
        med = median(x, whole)
        assert med == float(np.median(x)), (t, n, dtype)
        want = float(np.median(np.abs(x.astype(np.float64) - med)))
        assert median_abs_dev(x.astype(np.float64), med, True) == want, (t, n, dtype)
    x = rng.normal(0, 1, 999)  # not whole numbers: np.median itself
    assert median(x) == float(np.median(x))
    assert median_abs_dev(x, 0.5) == float(np.median(np.abs(x - 0.5)))


def test_component_through_a_voxel_is_its_ndimage_label():
    """A wall's component (``_hollow._component``: flood fill from the seed, or from the
    nearest set voxel when the seed is not set, cropped to its bounding box) is the voxels of
    that voxel's label; none in an empty mask."""
    from _grids import placed

    from synthgen._hollow import _component

    rng = np.random.default_rng(8)
    for t in range(150):
        shape = tuple(int(n) for n in rng.integers(1, 20, 3))
        m = ndimage.gaussian_filter(rng.random(shape), 1) > rng.uniform(0.5, 0.65)
        if t % 4 == 0:
            m = rng.random(shape) < 0.2
        seed = [int(rng.integers(-2, n + 2)) for n in shape]
        lab, n = ndimage.label(m, structure=np.ones((3, 3, 3), bool))
        s = tuple(int(np.clip(seed[a], 0, shape[a] - 1)) for a in range(3))
        if n == 0:
            assert _component(m, seed) is None
            continue
        else:
            k = lab[s]
            if k == 0:
                idx = np.argwhere(m)
                k = lab[tuple(idx[int(np.argmin(((idx - np.asarray(s)) ** 2).sum(axis=1)))])]
            want = lab == k
        np.testing.assert_array_equal(placed(shape, _component(m, seed)), want)


def test_soft_tissue_residuals_match_scipy_bit_for_bit():
    """The wall search's noise sample (``soft_residuals``): SciPy's 3x3x3 erosion of the
    soft-tissue window and ``uniform_filter(..., 3, mode="nearest")`` high-pass, the same
    float32 values in the same order, on boxes of any size (faces, lines of one voxel),
    integer and continuous HU, NaN and out-of-window voxels."""
    from synthgen._cpu_kernels import soft_residuals

    rng = np.random.default_rng(12)
    lo, hi = -150.0, 250.0
    n_res = 0
    for t in range(200):
        shape = tuple(int(n) for n in rng.integers(1, 24, 3))
        img = rng.normal(rng.uniform(-100, 200), rng.uniform(1, 120), shape)
        if t % 3 == 0:
            img = np.round(img)
        if t % 7 == 0:
            img[rng.random(shape) < 0.01] = np.nan
        img = img.astype(np.float32)
        soft = ndimage.binary_erosion((img >= lo) & (img <= hi), structure=np.ones((3, 3, 3)))
        want = (img - ndimage.uniform_filter(img, size=3, mode="nearest"))[soft]
        got = soft_residuals(img, lo, hi)
        assert got.dtype == want.dtype and got.shape == want.shape, (t, shape)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))  # (a NaN's sign aside)
        ok = ~np.isnan(want)
        assert got[ok].tobytes() == want[ok].tobytes(), (t, shape)
        n_res += got.size
    assert n_res > 50_000
    for shape in ((0, 5, 5), (5, 0, 5), (5, 5, 0)):
        assert soft_residuals(np.zeros(shape, np.float32), lo, hi).size == 0


def test_flood_fill_is_the_seeds_ndimage_label():
    """``component_box`` and ``wall_component`` (the flood fill, testing the cylinder where it
    reaches) against ``ndimage.label`` (26-connected) of the mask, and of the mask in the
    cylinder: the seed's component cropped to its box (grown by ``pad`` within the mask's),
    that box's origin, or -1 when the seed is not in; boxes touching every face included."""
    from synthgen._cpu_kernels import component_box, cylinder_mask, wall_component

    rng = np.random.default_rng(3)
    full = np.ones((3, 3, 3), bool)
    found = 0
    for _ in range(160):
        shape = tuple(int(n) for n in rng.integers(1, 24, 3))
        m = ndimage.gaussian_filter(rng.random(shape), rng.uniform(0.6, 2.0))
        m = np.ascontiguousarray(m > rng.uniform(0.42, 0.58))
        seed = tuple(int(rng.integers(0, n)) for n in shape)
        x = [np.ascontiguousarray((np.arange(n) - rng.uniform(0, n)) * rng.uniform(0.6, 3.0))
             for n in shape]  # fmt: skip
        ax = rng.normal(size=3)
        ax /= np.linalg.norm(ax)
        axial, reach = rng.uniform(2.0, 25.0), rng.uniform(2.0, 15.0)
        pad = int(rng.integers(0, 3))
        for cyl in (False, True):
            if cyl:
                got = wall_component(m, *seed, *x, *ax, axial, reach)
                inside = cylinder_mask(m, *x, *ax, axial, reach)
                p = 0
            else:
                got = component_box(m, *seed, pad)
                inside, p = m, pad
            if not inside[seed]:
                assert got[1] == -1 and got[0].size == 0
                continue
            lab, _ = ndimage.label(inside, full)
            want = lab == lab[seed]
            idx = np.nonzero(want)
            lo = [max(int(i.min()) - p, 0) for i in idx]
            hi = [min(int(i.max()) + p + 1, n) for i, n in zip(idx, shape, strict=True)]
            assert list(got[1:]) == lo
            np.testing.assert_array_equal(got[0], want[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]])
            found += 1
    assert found > 100
