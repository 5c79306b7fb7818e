"""The B-spline displacement field against elasticdeform, and the spline weights.

``elasticdeform.deform_grid`` is the reference implementation of the published recipe's
smooth deformation. Its dense displacement field is recovered by deforming the coordinate
ramps ``X_k = index along axis k`` with linear interpolation: ``output(x) = X(x + d(x))`` so
``output_k(x) - x_k = d_k(x)`` wherever ``x + d(x)`` stays inside the array.

elasticdeform's wheels do not import under NumPy 2; install it from source:
``pip install --no-binary elasticdeform elasticdeform``.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from synthgen._geometry import bspline_weights, dense_displacement


def _elasticdeform_field(control: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    elasticdeform = pytest.importorskip("elasticdeform")
    ramps = []
    for axis, n in enumerate(shape):
        view = [1, 1, 1]
        view[axis] = n
        ramp = np.arange(n, dtype=np.float64).reshape(view)
        ramps.append(np.ascontiguousarray(np.broadcast_to(ramp, shape)))
    out = elasticdeform.deform_grid(ramps, control, order=1, mode="constant", cval=np.nan)
    return np.stack([o - r for o, r in zip(out, ramps, strict=True)])


@pytest.mark.parametrize(
    ("grid", "shape", "sigma"),
    [
        ((3, 3, 3), (20, 17, 15), 2.0),
        ((3, 3, 3), (41, 9, 30), 1.0),
        ((4, 4, 4), (25, 22, 19), 2.5),
        ((5, 3, 4), (31, 12, 23), 1.5),
    ],
)
def test_dense_displacement_matches_elasticdeform(grid, shape, sigma: float) -> None:
    rng = np.random.default_rng(sum(shape))
    control = rng.normal(0.0, sigma, size=(3, *grid)).astype(np.float64)
    ref = _elasticdeform_field(control, shape)
    got = dense_displacement(control, shape)
    assert got.shape == (3, *shape) and got.dtype == np.float64
    finite = np.isfinite(ref).all(axis=0)
    assert finite.mean() > 0.5, "too few voxels stay inside the array to compare"
    np.testing.assert_allclose(got[:, finite], ref[:, finite], rtol=0, atol=1e-6)
    # the comparison is not vacuous: the field is far from zero
    assert np.abs(got[:, finite]).max() > sigma


def test_elasticdeform_oracle_detects_a_wrong_convention() -> None:
    """With the approximating (non-interpolating) spline the fields must disagree."""
    rng = np.random.default_rng(0)
    control = rng.normal(0.0, 2.0, size=(3, 3, 3, 3))
    ref = _elasticdeform_field(control, (20, 17, 15))
    wrong = dense_displacement(control, (20, 17, 15), prefilter=False)
    finite = np.isfinite(ref).all(axis=0)
    assert np.abs(wrong[:, finite] - ref[:, finite]).max() > 0.1


def test_dense_displacement_passes_through_control_points() -> None:
    rng = np.random.default_rng(1)
    control = rng.normal(size=(3, 5, 3, 4))
    shape = (9, 11, 13)  # control point i at voxel i * (n - 1) / (g - 1): 2i, 5i, 4i
    d = dense_displacement(control, shape)
    np.testing.assert_allclose(d[:, ::2, ::5, ::4], control, atol=1e-12)
    # a constant control field is a constant displacement (partition of unity)
    const = np.broadcast_to(np.array([1.5, -2.0, 0.25])[:, None, None, None], (3, 4, 4, 4))
    np.testing.assert_allclose(
        dense_displacement(const, (7, 8, 9)),
        np.broadcast_to(np.array([1.5, -2.0, 0.25])[:, None, None, None], (3, 7, 8, 9)),
        atol=1e-12,
    )


@pytest.mark.parametrize("g", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("prefilter", [True, False])
def test_bspline_weights_rows_sum_to_one(g: int, prefilter: bool) -> None:
    t = np.concatenate([np.linspace(-1.0, g, 97), [0.0, g - 1.0, 0.5]])
    w = bspline_weights(t, g, prefilter=prefilter)
    assert w.shape == (t.size, g)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    # positions outside [0, g - 1] are clamped
    np.testing.assert_allclose(
        bspline_weights(np.array([-3.0, g + 2.0]), g, prefilter=prefilter),
        bspline_weights(np.array([0.0, g - 1.0]), g, prefilter=prefilter),
    )


@pytest.mark.parametrize("g", [2, 3, 4, 6])
def test_bspline_weights_interpolate_control_values(g: int) -> None:
    w = bspline_weights(np.arange(g, dtype=np.float64), g)
    np.testing.assert_allclose(w, np.eye(g), atol=1e-12)
    if g >= 3:
        # the approximating spline does not interpolate (the check above can fail)
        raw = bspline_weights(np.arange(g, dtype=np.float64), g, prefilter=False)
        assert np.abs(raw - np.eye(g)).max() > 0.1


@pytest.mark.parametrize("g", [3, 4, 7])
def test_bspline_weights_match_scipy_mirror_spline(g: int) -> None:
    rng = np.random.default_rng(g)
    values = rng.normal(size=g)
    t = rng.uniform(0.0, g - 1.0, size=200)
    ref = ndimage.map_coordinates(values, t[None, :], order=3, mode="mirror")
    np.testing.assert_allclose(bspline_weights(t, g) @ values, ref, atol=1e-10)


@pytest.mark.parametrize("g", [1, 2, 3, 4, 6])
def test_bspline_matrix_is_the_reference_weights(g: int) -> None:
    """The numba B-spline rows (the CPU's shape weights, and the oracle of the GPU's
    sg_seg_weights) are _geometry.bspline_weights (the reference) in float32."""
    from synthgen._cpu_kernels import bspline_matrix
    from synthgen._geometry import prefilter

    rng = np.random.default_rng(g)
    t = rng.uniform(-1.0, g + 1.0, 200)
    got = bspline_matrix(t, prefilter(g))
    assert got.dtype == np.float32 and got.shape == (200, g)
    # raw weights times the prefilter, summed in ascending order in float64 (no BLAS, whose
    # order and fused multiply-adds vary between machines), then rounded to float32
    raw = bspline_weights(t, g, prefilter=False)
    want = np.zeros((200, g))
    for k in range(g):
        for j in range(g):
            want[:, k] = want[:, k] + raw[:, j] * prefilter(g)[j, k]
    np.testing.assert_array_equal(got, want.astype(np.float32))
