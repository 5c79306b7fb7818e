"""Mass effect: the displacement field, its warps of image and labels, and the integration.

The NumPy oracle :func:`synthgen.mass_effect.source_voxels` (source coordinate of every voxel)
and ``scipy.ndimage.map_coordinates(order=1)`` are the references of the numba kernel.
"""

from __future__ import annotations

import tracemalloc
from dataclasses import dataclass

import numpy as np
import pytest
from _grids import ramps
from scipy import ndimage

from synthgen import mass_effect as me
from synthgen._pool import set_num_threads


@dataclass
class Tumor:
    center_vox: tuple[int, int, int]
    radii_mm: tuple[float, float, float]
    rotation: tuple[float, ...] | None = None
    index: int = 0


ALWAYS = {"min_radius_mm": 0.0, "ramp_mm": 0.0}


def _rot(seed: int) -> tuple[float, ...]:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((3, 3)))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return tuple(float(x) for x in q.ravel())


def _support(field: me.MassEffectField) -> np.ndarray:
    """Voxels of the field's box that move (inside the support), by the oracle."""
    c = np.asarray(field.center_vox)
    axes = [np.arange(b.start, b.stop) - c[a] for a, b in enumerate(field.box)]
    d = np.stack(np.meshgrid(*axes, indexing="ij"))
    p = np.einsum("ab,bijk->aijk", field.metric, d)
    return (p * p).sum(axis=0) < 1.0


# --------------------------------------------------------------------------------------
# the field
# --------------------------------------------------------------------------------------


def test_fields_threshold_ramp_and_validation():
    big = Tumor((30, 30, 30), (30.0, 30.0, 30.0))
    small = Tumor((30, 30, 30), (8.0, 8.0, 8.0), index=1)
    mid = Tumor((30, 30, 30), (22.5, 22.5, 22.5), index=2)
    fields = me.mass_effect_fields([big, small, mid], (1, 1, 1), (60, 60, 60))
    assert [f.index for f in fields] == [0, 2]
    assert fields[0].strength == pytest.approx(me.DEFAULT_STRENGTH)
    # Linear ramp from DEFAULT_MIN_RADIUS_MM over DEFAULT_RAMP_MM.
    frac = (22.5 - me.DEFAULT_MIN_RADIUS_MM) / me.DEFAULT_RAMP_MM
    assert fields[1].strength == pytest.approx(me.DEFAULT_STRENGTH * frac)
    step = me.mass_effect_fields([mid], (1, 1, 1), (60, 60, 60), min_radius_mm=22.0, ramp_mm=0)
    assert step[0].strength == pytest.approx(me.DEFAULT_STRENGTH)
    for bad in ({"strength": 0.7}, {"strength": -0.1}, {"reach": 1.1}, {"reach": 3.1}):
        with pytest.raises(ValueError):
            me.mass_effect_fields([big], (1, 1, 1), (60, 60, 60), **bad)
    with pytest.raises(ValueError, match="spacing"):
        me.mass_effect_fields([big], (1, 0, 1), (60, 60, 60))


def _phi(rho: float, reach: float) -> float:
    """The radial profile of the module docstring, written out."""
    if rho <= 1.0:
        return (3 * rho - rho**3) / 2
    if rho >= reach:
        return 0.0
    tau = (rho - 1) / (reach - 1)
    return 1 - 3 * tau**2 + 2 * tau**3


@pytest.mark.parametrize("reach", [me.DEFAULT_REACH, 2.0, 2.6])
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 1.3, 2.5)])
def test_surface_displacement_is_strength_times_radius_in_mm(spacing, reach):
    r = (24.0, 30.0, 36.0)
    t = Tumor((60, 50, 40), r)
    f = me.mass_effect_fields([t], spacing, (120, 100, 80), strength=0.3, reach=reach, **ALWAYS)
    [f] = f
    c = np.asarray(t.center_vox, dtype=float)
    for a in range(3):
        # Points on the surface and beyond, along axis a (source_voxels takes a box of one).
        for rho in (0.5, 1.0, 1.2, 1.45, 1.9):
            x = c.copy()
            x[a] += rho * r[a] / spacing[a]
            d = _displacement_mm(f, x, spacing)
            # Radial (along the axis), outward, isotropic in mm: the same for every spacing.
            assert np.allclose(np.delete(d, a), 0.0, atol=1e-9)
            assert d[a] == pytest.approx(0.3 * r[a] * _phi(rho, reach), rel=1e-9, abs=1e-12)
            if rho == 1.0:
                assert d[a] == pytest.approx(0.3 * r[a], rel=1e-9)  # peak on the surface
        x = c.copy()
        x[a] += 1.001 * reach * r[a] / spacing[a]
        assert np.allclose(_displacement_mm(f, x, spacing), 0.0)  # compact support


def _displacement_mm(f, x, spacing):
    """Displacement ``x - s(x)`` in mm at a (fractional) voxel position, via the oracle."""
    frac = x - np.floor(x)
    # source_voxels works on integer grids: shift the centre instead of the point.
    g = me.MassEffectField(**{**f.__dict__, "center_vox": tuple(np.asarray(f.center_vox) - frac)})
    xi = np.floor(x).astype(int)
    s = me.source_voxels(g, tuple(slice(int(i), int(i) + 1) for i in xi))[:, 0, 0, 0]
    return (xi - s) * np.asarray(spacing)


@pytest.mark.parametrize("reach", [me.REACH_RANGE[0], me.DEFAULT_REACH, 2.0, 3.0])
def test_no_folding_jacobian_positive(reach):
    t = Tumor((40, 40, 30), (20.0, 32.0, 26.0), rotation=_rot(3))
    sp = (0.9, 0.8, 2.0)
    [f] = me.mass_effect_fields(
        [t], sp, (80, 80, 60), strength=me.MAX_STRENGTH, reach=reach, **ALWAYS
    )
    s = me.source_voxels(f)
    jac = np.empty((3, 3, *s.shape[1:]))
    for a in range(3):
        for b in range(3):
            jac[a, b] = np.gradient(s[a], axis=b)
    det = np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))
    # Analytic bound: every eigenvalue >= 1 - 1.5 strength > 0 (tissue is stretched most at
    # the centre); finite differences of a C1 map stay near it.
    assert det.min() > 0.5 * (1 - 1.5 * f.strength) ** 3 > 0
    # Source points stay inside the box (each tumor reads only its box).
    for a in range(3):
        assert s[a].min() >= f.box[a].start - 1e-9
        assert s[a].max() <= f.box[a].stop - 1 + 1e-9


# --------------------------------------------------------------------------------------
# the warp
# --------------------------------------------------------------------------------------


def test_zero_outside_the_support_and_box():
    rng = np.random.default_rng(0)
    shape = (90, 80, 70)
    image = rng.normal(0, 50, shape)
    lab = rng.integers(0, 5, shape).astype(np.uint8)
    t = Tumor((45, 38, 30), (12.0, 15.0, 10.0), rotation=_rot(1))
    res = me.apply_mass_effect(image, {"lab": lab}, [t], (1.0, 1.0, 1.5), **ALWAYS)
    [f] = res.fields
    changed = res.image != image
    outside = np.ones(shape, bool)
    outside[f.box] = False
    assert not changed[outside].any()
    assert not (res.labels["lab"] != lab)[outside].any()
    assert not changed[f.box][~_support(f)].any()
    assert changed[f.box][_support(f)].mean() > 0.9  # everything else moved


def test_outward_push_of_a_small_structure():
    shape = (100, 100, 100)
    image = np.zeros(shape, np.float32)
    lab = np.zeros(shape, np.uint8)
    # A 5^3 structure 40 mm from the tumor centre (radius 30 mm) along axis 0 and 1.
    lab[83:88, 48:53, 48:53] = 1
    lab[48:53, 18:23, 48:53] = 2
    image[lab > 0] = 100.0
    t = Tumor((50, 50, 50), (30.0, 30.0, 30.0))
    res = me.apply_mass_effect(image, lab, [t], (1.0, 1.0, 1.0), **ALWAYS)
    for v, axis, sign in ((1, 0, 1), (2, 1, -1)):
        before = np.argwhere(lab == v).mean(axis=0)
        after = np.argwhere(res.labels == v).mean(axis=0)
        moved = (after - before)[axis] * sign
        assert moved > 2.0  # pushed away from the centre, by voxels
        assert np.allclose(np.delete(after - before, axis), 0.0, atol=0.5)  # radially
        # The image's copy of the structure moved with it.
        near = np.zeros(shape, bool)
        near[tuple(slice(max(0, int(b) - 15), int(b) + 16) for b in before)] = True
        img_after = np.average(np.argwhere(near), axis=0, weights=res.image[near])
        assert np.allclose(img_after, after, atol=0.5)


@pytest.mark.parametrize("order", ["C", "F"])
def test_labels_come_from_the_image_sample_points(order):
    """Every label voxel comes from the source voxel nearest to its image sample point.

    The image channels are coordinate ramps, which trilinear interpolation reproduces exactly:
    the warped ramps are the source coordinates ``s(x)``. The label map holds a unique id per
    voxel, so its warp tells the source voxel: it must be ``floor(s(x) + 0.5)`` everywhere.
    """
    shape = (64, 56, 40)
    ids = np.arange(np.prod(shape), dtype=np.int32).reshape(shape)
    t1 = Tumor((30, 28, 20), (14.0, 18.0, 16.0), rotation=_rot(5), index=0)
    t2 = Tumor((40, 26, 22), (12.0, 12.0, 12.0), index=1)
    sp = (1.0, 0.9, 1.6)
    src = []
    lab = None
    for ramp in ramps(shape):
        ramp = np.asarray(ramp, order=order)
        lab_in = np.asarray(ids, order=order)
        res = me.apply_mass_effect(ramp, [lab_in], [t1, t2], sp, strength=0.4, **ALWAYS)
        src.append(res.image)
        if lab is not None:
            assert np.array_equal(lab, res.labels[0])  # the same for every channel
        lab = res.labels[0]
    assert len(res.fields) == 2 and len(me._clusters(res.fields)) == 1  # composed
    nearest = np.stack([np.floor(s + 0.5).astype(np.int64) for s in src])
    assert np.array_equal(np.stack(np.unravel_index(lab, shape)), nearest)
    # Multi-tumor composition: the second field's sample points are read through the first.
    moved = np.any(nearest != np.stack(np.indices(shape)), axis=0)
    assert moved.sum() > 1000


def test_kernel_matches_oracle_and_map_coordinates():
    rng = np.random.default_rng(2)
    shape = (70, 60, 50)
    image = ndimage.gaussian_filter(rng.normal(0, 100, shape), 1.5)
    t = Tumor((33, 31, 24), (16.0, 20.0, 14.0), rotation=_rot(7))
    sp = (0.9, 1.1, 1.4)
    res = me.apply_mass_effect(image, None, [t], sp, strength=0.35, **ALWAYS)
    [f] = res.fields
    s = me.source_voxels(f)
    # The oracle's sample points, as box-local coordinates, resampled by scipy.
    local = s - np.array([b.start for b in f.box])[:, None, None, None]
    ref = ndimage.map_coordinates(image[f.box], local, order=1, mode="nearest")
    assert np.allclose(res.image[f.box], ref, atol=1e-9)
    # The pure-Python twin of the kernel gives the same bytes (on six rows of the box).
    n = res.image[f.box].shape
    cen = np.array([[f.center_vox[a] - f.box[a].start for a in range(3)]])
    fargs = (cen, f.metric[None], np.array([f.strength]), np.array([f.reach]))
    outs = []
    for warp in (me._warp_rows, me._kernels()[0]):
        out = np.array(image[f.box], copy=True)
        nn = np.full(n, -2, np.int32)
        kr = np.zeros((n[0], n[1], 2), np.int64)
        src = me._padded_copy(image[f.box])
        warp(src, out, nn, kr, True, 20, 26, *fargs, False, -np.inf, np.inf)
        outs.append((out, nn, kr))
    for x, y in zip(*outs, strict=True):
        assert np.array_equal(x, y)
    assert np.array_equal(outs[0][0][:20], image[f.box][:20])  # other rows untouched
    assert np.array_equal(outs[0][0][20:26], res.image[f.box][20:26])


def test_int16_rounding_and_range():
    rng = np.random.default_rng(3)
    shape = (60, 60, 60)
    img_f = rng.uniform(-1024, 3071, shape)
    img_f[20:40, 20:40, 20:40] = 32767.0  # at the top of int16: no overflow
    img16 = np.rint(img_f).astype(np.int16)
    t = Tumor((30, 30, 30), (15.0, 15.0, 15.0))
    r16 = me.apply_mass_effect(img16, None, [t], (1, 1, 1), **ALWAYS).image
    rf = me.apply_mass_effect(img16.astype(np.float64), None, [t], (1, 1, 1), **ALWAYS).image
    assert r16.dtype == np.int16
    assert np.array_equal(r16, np.clip(np.rint(rf), -32768, 32767).astype(np.int16))
    r32 = me.apply_mass_effect(img16.astype(np.float32), None, [t], (1, 1, 1), **ALWAYS).image
    assert r32.dtype == np.float32
    assert np.allclose(r32, rf, atol=1e-2)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
def test_unsigned_images_do_not_wrap_around(dtype):
    # trilinear differences of an unsigned source wrapped (to 2**64 - x): voxels of the
    # push went to the dtype's maximum wherever a neighbour was darker
    rng = np.random.default_rng(5)
    img = rng.integers(0, 200, (40, 40, 40)).astype(dtype)
    t = Tumor((20, 20, 20), (12.0, 12.0, 12.0))
    ru = me.apply_mass_effect(img, None, [t], (1, 1, 1), **ALWAYS).image
    rf = me.apply_mass_effect(img.astype(np.float64), None, [t], (1, 1, 1), **ALWAYS).image
    assert ru.dtype == dtype
    assert np.array_equal(ru, np.rint(rf).astype(dtype))


def test_determinism_threads_inputs_untouched_and_inplace():
    rng = np.random.default_rng(4)
    shape = (96, 90, 80)
    image = rng.integers(-200, 300, shape).astype(np.int16)
    organ = rng.random(shape) > 0.5
    labs = {"organ": organ, "ids": rng.integers(0, 100, shape).astype(np.uint16)}
    keep = (image.copy(), organ.copy(), labs["ids"].copy())
    tumors = [
        Tumor((48, 45, 40), (28.0, 24.0, 26.0), _rot(0), 0),
        Tumor((40, 50, 35), (22.0, 26.0, 24.0), None, 1),
    ]
    try:
        set_num_threads(1)
        a = me.apply_mass_effect(image, labs, tumors, (1.0, 1.0, 1.2))
        set_num_threads(2)
        b = me.apply_mass_effect(image, labs, tumors, (1.0, 1.0, 1.2))
    finally:
        set_num_threads(None)
    assert np.array_equal(a.image, b.image)
    for k in labs:
        assert np.array_equal(a.labels[k], b.labels[k])
        assert a.labels[k].dtype == labs[k].dtype
    assert np.array_equal(image, keep[0]) and np.array_equal(organ, keep[1])
    assert np.array_equal(labs["ids"], keep[2])
    assert not np.array_equal(a.image, image)
    # In place: the same objects, the same result.
    img2, org2, ids2 = (x.copy() for x in keep)
    labs2 = {"organ": org2, "ids": ids2}
    c = me.apply_mass_effect(img2, labs2, tumors, (1.0, 1.0, 1.2), inplace=True)
    assert c.image is img2 and c.labels["organ"] is org2
    assert np.array_equal(img2, a.image) and np.array_equal(org2, a.labels["organ"])
    ro = keep[0].copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        me.apply_mass_effect(ro, None, tumors, (1, 1, 1), inplace=True)


def test_overlapping_tumors_compose_in_plan_order():
    rng = np.random.default_rng(5)
    image = ndimage.gaussian_filter(rng.normal(0, 100, (120, 120, 90)), 1.0)
    t1 = Tumor((40, 42, 33), (15.0, 15.0, 15.0), index=0)
    t2 = Tumor((52, 48, 36), (14.0, 16.0, 12.0), _rot(2), index=1)
    t3 = Tumor((110, 110, 80), (4.0, 4.0, 4.0), index=2)  # boxes apart from the others
    sp = (1.0, 1.0, 1.2)
    res = me.apply_mass_effect(image, None, [t1, t2, t3], sp, **ALWAYS)
    f1, f2, f3 = res.fields
    assert [len(g) for g in me._clusters(res.fields)] == [2, 1]
    # Push by t1, then by t2: the output samples the input at s1(s2(x)), resampled once.
    bb = me._bbox([f1, f2])
    s = me.source_voxels([f1, f2]) - np.array([b.start for b in bb])[:, None, None, None]
    ref = ndimage.map_coordinates(image[bb], s, order=1, mode="nearest")
    assert np.allclose(res.image[bb], ref, atol=1e-9)
    # The other order is another map.
    swapped = me.apply_mass_effect(image, None, [t2, t1], sp, **ALWAYS).image
    assert not np.allclose(swapped[bb], res.image[bb])
    # A tumor whose box meets no other box is applied on its own.
    alone = me.apply_mass_effect(image, None, [t3], sp, **ALWAYS).image
    assert np.array_equal(alone[f3.box], res.image[f3.box])


def test_label_containers():
    image = np.zeros((40, 40, 40), np.float32)
    a = np.zeros(image.shape, np.uint8)
    t = [Tumor((20, 20, 20), (10.0, 10.0, 10.0))]
    assert me.apply_mass_effect(image, None, t, (1, 1, 1), **ALWAYS).labels is None
    assert isinstance(me.apply_mass_effect(image, a, t, (1, 1, 1), **ALWAYS).labels, np.ndarray)
    assert isinstance(me.apply_mass_effect(image, (a, a), t, (1, 1, 1), **ALWAYS).labels, list)
    with pytest.raises(ValueError, match="label map"):
        me.apply_mass_effect(image, [a[:-1]], t, (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        me.apply_mass_effect(image, [a], t)


def test_cost_is_local_no_full_volume_temporary():
    """A small tumor in a large scan: only its box is touched, no scan-sized allocation."""
    shape = (400, 400, 300)  # 96 MB of int16
    image = np.zeros(shape, np.int16)
    image[195:205, 195:205, 145:155] = 100
    organ = np.zeros(shape, np.uint8)
    organ[190:210, 190:210, 140:160] = 1
    t = [Tumor((200, 200, 150), (10.0, 10.0, 10.0))]
    # Warm-up on a small copy, so that loading the compiled kernels is not traced.
    small = (image[:60, :60, :60].copy(), [organ[:60, :60, :60].copy()])
    me.apply_mass_effect(*small, [Tumor((30, 30, 30), (10.0, 10.0, 10.0))], (1, 1, 1), **ALWAYS)
    tracemalloc.start()
    try:
        res = me.apply_mass_effect(image, [organ], t, (1, 1, 1), inplace=True, **ALWAYS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    [f] = res.fields
    box_voxels = int(np.prod([b.stop - b.start for b in f.box]))
    assert box_voxels < 50**3
    assert peak < 20 * box_voxels + 1_000_000  # box-sized buffers only
    assert peak < image.nbytes / 20
    assert not image[:150].any() and not organ[:150].any()


# --------------------------------------------------------------------------------------
# integration: plan on the scan, warp, render
# --------------------------------------------------------------------------------------


def test_synthesize_with_mass_effect(ellipsoid_scan):
    import synthgen

    image, organ = ellipsoid_scan((1.5, 1.5, 1.5))
    other = (organ.astype(np.uint8) * 3).copy()
    other[:, :, : other.shape[2] // 2] = 0
    kw = {"organ": "liver-classic", "spacing": (1.5, 1.5, 1.5), "size": "large", "seed": 11}
    s1 = me.synthesize_with_mass_effect(image, organ, labels={"other": other}, **kw)
    s2 = me.synthesize_with_mass_effect(image, organ, labels={"other": other}, **kw)
    plain = synthgen.synthesize(image, organ, **kw)
    assert s1.fields, "the large class must push tissue"
    assert np.array_equal(s1.image, s2.image) and np.array_equal(s1.label, s2.label)
    assert s1.plan.to_json() == plain.plan.to_json()  # the same plan as without mass effect
    # Outside every field's box (and every tumor box) the scan is untouched.
    touched = np.zeros(image.shape, bool)
    for f in s1.fields:
        touched[f.box] = True
    for r in s1.result.tumors:
        if r.box:
            touched[tuple(slice(a, b) for a, b in r.box)] = True
    assert np.array_equal(s1.image[~touched], image[~touched])
    # The tumor label is the rendered one, inside the warped organ (or exophytic).
    lab = s1.label
    assert (lab == 2).sum() == sum(r.voxels for r in s1.result.tumors) or (lab == 2).any()
    assert s1.labels["other"].dtype == np.uint8
    assert not np.array_equal(s1.labels["other"], other)  # warped along
    # The organ around the tumor was pushed: the organ label differs from the input mask.
    assert ((lab > 0) != organ).any()
    # Strength zero: identical to plain synthesis.
    s0 = me.synthesize_with_mass_effect(image, organ, strength=0.0, **kw)
    assert not s0.fields
    assert np.array_equal(s0.image, plain.image) and np.array_equal(s0.label, plain.label)
    assert np.array_equal(image, ellipsoid_scan((1.5, 1.5, 1.5))[0])  # input untouched


def test_shape_errors_leave_the_callers_arrays_untouched(ellipsoid_scan):
    # the warp wrote into out=image before the render's shape checks raised
    import synthgen

    image, organ = ellipsoid_scan((1.5, 1.5, 1.5))
    plan = synthgen.plan(image, organ, organ="liver", spacing=(1.5,) * 3, size="large", seed=11)
    assert me.plan_fields(plan), "the large class must push tissue"
    bad = [
        (image[:-2].copy(), organ[:-2], "plan is for shape"),  # another shape
        (image.copy(), organ[:, :, :-1], "organ_mask"),  # a mismatched mask
    ]
    for im, om, msg in bad:
        before = im.copy()
        with pytest.raises(ValueError, match=msg):
            synthgen.render(plan, im, om, out=im)
        assert np.array_equal(im, before)
    im = image.copy()
    with pytest.raises(ValueError, match="out must have the image's shape"):
        synthgen.render(plan, image, organ, out=im[:-1])
    assert np.array_equal(im, image)
    f32 = image.astype(np.float32)  # refused as without mass effect, not rendered as float
    with pytest.raises(ValueError, match="out has dtype float32, image has int16"):
        synthgen.render(plan, image, organ, out=f32)
    assert np.array_equal(f32, image)
    # a batch: the second plan's mismatch fails before the first plan's warp
    a, b = image.copy(), image[:-2].copy()
    with pytest.raises(ValueError, match="plan is for shape"):
        synthgen.render_batch([plan, plan], [a, b], [organ, organ[:-2]], outs=[a, b])
    assert np.array_equal(a, image)


def test_benchmark_runs():
    out = me.benchmark(radius_mm=10.0, shape=(64, 64, 64), repeats=1)
    assert out["median_ms"] > 0 and out["box_voxels"] == 31**3


def test_array_helpers_keep_torch_subclasses_as_tensors() -> None:
    """mass_effect's copy/put treat a torch subclass (as MONAI's MetaTensor) as a tensor."""
    torch = pytest.importorskip("torch")
    from synthgen import mass_effect

    class Sub(torch.Tensor):  # a subclass from another module, as MetaTensor is
        pass

    t = torch.zeros((4, 4, 4)).as_subclass(Sub)
    c = mass_effect._copy(t)
    assert isinstance(c, torch.Tensor) and c is not t
    mass_effect._put(c, (slice(0, 2), slice(0, 2), slice(0, 2)), np.ones((2, 2, 2), np.float32))
    assert float(c.sum()) == 8.0 and float(t.sum()) == 0.0
    np.testing.assert_array_equal(mass_effect._to_host(c), c.numpy())
