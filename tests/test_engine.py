"""End-to-end behaviour of plan + render on phantoms.

Geometry (tumors inside the organ, only the organ and the blur halo change), determinism
(seeds, plan JSON, in-place rendering), dtypes, labels and records, hollow organs, physical
units across voxel spacings, and the published liver recipe's size/contrast statistics on
the 1 mm benchmark phantom.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

import synthgen
from synthgen import Plan, Synthesizer, rendering
from synthgen.mass_effect import prepare_render
from synthgen.presets import load_preset

HU_MIN, HU_MAX = -1024, 3071


@pytest.fixture(scope="module")
def masks(small_phantom) -> dict[str, np.ndarray]:
    names = ("liver", "pancreas", "kidney", "colon", "esophagus", "uterus")
    return {n: small_phantom.mask(n) for n in names}


def _synth(ph, organ_mask, preset, seed, size=None, image=None, **kw):
    return synthgen.synthesize(
        ph.image if image is None else image,
        organ_mask,
        organ=preset,
        spacing=ph.spacing,
        seed=seed,
        size=size,
        **kw,
    )


def _changed(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    return before != after


def _blur_region(res, spacing) -> np.ndarray:
    """Voxels within the edge blur's reach of a tumor voxel (the blur kernels' support)."""
    sigma = max((t.blur_sigma_mm for t in res.plan.tumors), default=0.0)
    size = [2 * int(3.0 * sigma / s + 0.5) + 1 for s in spacing]
    return ndimage.maximum_filter(res.tumor_mask.view(np.uint8), size=size, mode="constant") > 0


def _boxes_region(res, shape) -> np.ndarray:
    region = np.zeros(shape, dtype=bool)
    for sl, _ in res.boxes:
        region[sl] = True
    return region


def _live_records(res):
    """Records of the tumors that touch the scan, paired with their (box, mask)."""
    live = [t for t in res.tumors if t.box]
    assert len(live) == len(res.boxes)
    return list(zip(live, res.boxes, strict=True))


# ------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize(
    ("preset", "organ", "size", "seed"),
    [
        ("liver", "liver", None, 0),
        ("liver", "liver", "large", 1),
        ("liver-classic", "liver", "mix", 2),
        ("pancreas", "pancreas", "small", 0),
        ("pancreas", "pancreas", "large", 3),
        ("uterus", "uterus", "medium", 0),
        ("kidney", "kidney", "small", 0),
        ("colon", "colon", "large", 0),
        ("esophagus", "esophagus", "medium", 1),
    ],
)
def test_clipped_tumors_stay_inside_the_organ(small_phantom, masks, preset, organ, size, seed):
    img, m = small_phantom.image, masks[organ]
    res = _synth(small_phantom, m, preset, seed, size)
    tm = res.tumor_mask
    assert tm.dtype == np.bool_ and tm.shape == img.shape
    assert tm.any(), "no tumor voxel: the test would be vacuous"
    assert all(t.clipped for t in res.tumors)
    # the organ and scan as rendered: pushed first where the preset has mass effect
    img, m = prepare_render(res.plan, img, m).image, res.organ_mask
    assert not (tm & ~m).any()
    changed = _changed(img, res.image)
    assert changed.any()
    # outside the organ the image is unchanged, byte for byte
    assert not (changed & ~m).any()
    assert res.image[~m].tobytes() == img[~m].tobytes()
    # and nothing changes outside the tumors' boxes or beyond the blur's reach
    assert not (changed & ~_boxes_region(res, img.shape)).any()
    assert not (changed & ~_blur_region(res, small_phantom.spacing)).any()


def _exophytic_seed(ph, kidney) -> int:
    for seed in range(60):
        plan = synthgen.plan(
            ph.image, kidney, organ="kidney", seed=seed, spacing=ph.spacing, size="large"
        )
        if any(not t.clip_to_organ for t in plan.tumors):
            return seed
    raise AssertionError("no exophytic kidney tumor in 60 seeds (probability 0.5 each)")


def test_kidney_exophytic_tumor_leaves_the_organ(small_phantom, masks):
    img, kid = small_phantom.image, masks["kidney"]
    seed = _exophytic_seed(small_phantom, kid)
    res = _synth(small_phantom, kid, "kidney", seed, "large")
    assert [t.clipped for t in res.tumors] == [False]
    # compare with the scan the tumor was rendered into (pushed by the preset's mass effect)
    img, kid = prepare_render(res.plan, img, kid).image, res.organ_mask
    tm = res.tumor_mask
    outside = tm & ~kid
    assert outside.any(), "an unclipped large kidney tumor grows out of the kidney"
    assert (tm & kid).any()
    assert np.all(res.label[outside] == 2)
    changed = _changed(img, res.image)
    assert (changed & outside).any()
    # changes outside the kidney stay within the blurred tumor, the rest is untouched
    region = kid | _blur_region(res, small_phantom.spacing)
    assert not (changed & ~region).any()
    assert res.image[~region].tobytes() == img[~region].tobytes()


def test_clipped_kidney_tumors_stay_inside(small_phantom, masks):
    kid = masks["kidney"]
    for seed in range(60):
        plan = synthgen.plan(
            small_phantom.image, kid, organ="kidney", seed=seed, spacing=small_phantom.spacing,
            size="large",
        )  # fmt: skip
        if all(t.clip_to_organ for t in plan.tumors):
            break
    res = synthgen.render(plan, small_phantom.image, kid)
    pre, kid = prepare_render(plan, small_phantom.image, kid).image, res.organ_mask
    assert res.tumor_mask.any()
    assert not (res.tumor_mask & ~kid).any()
    assert not (_changed(pre, res.image) & ~kid).any()


def test_tumor_boxes_hold_the_whole_tumor_and_blur(small_phantom, masks):
    """No tumor is cut by its box: the mask keeps the blur radius from every box face."""
    shape = small_phantom.image.shape
    sp = small_phantom.spacing
    for preset, organ, size in (("liver-classic", "liver", "mix"), ("kidney", "kidney", "large")):
        res = _synth(small_phantom, masks[organ], preset, 4, size)
        bbox = res.plan.organ_bbox
        for rec, (box, m) in _live_records(res):
            t = res.plan.tumors[rec.index]
            assert m.shape == tuple(s.stop - s.start for s in box)
            if not m.any():
                continue
            for a in range(3):
                r = int(3.0 * t.blur_sigma_mm / sp[a] + 0.5)
                other = tuple(b for b in range(3) if b != a)
                hit = np.flatnonzero(m.any(axis=other))
                lo_ok = hit[0] >= r or box[a].start == 0
                hi_ok = m.shape[a] - 1 - hit[-1] >= r or box[a].stop == shape[a]
                if t.clip_to_organ:  # the organ's bounding box also bounds a clipped tumor
                    lo_ok = lo_ok or box[a].start + hit[0] == bbox[a][0]
                    hi_ok = hi_ok or box[a].start + hit[-1] == bbox[a][1] - 1
                assert lo_ok and hi_ok, (preset, rec.index, a)


def test_conservative_boxes_are_the_array_arithmetic():
    """The compiled conservative boxes equal, bit for bit, the NumPy arithmetic they stand for
    (radius bound with NumPy's summation order, organ clip, scan clip, blur pad)."""
    from synthgen.rendering import BLUR_TRUNCATE, conservative_boxes

    rng = np.random.default_rng(21)
    n = 400
    q, _ = np.linalg.qr(rng.normal(size=(n, 3, 3)))
    centre = rng.integers(-5, 70, (n, 3))
    radii = rng.uniform(0.5, 40.0, (n, 3))
    blur = rng.uniform(0.1, 3.0, n)
    clip = rng.random(n) < 0.6
    disp = rng.uniform(0.0, 9.0, n)
    sp = rng.uniform(0.4, 5.0, (n, 3))
    shape = rng.integers(20, 90, (n, 3))
    boxes = [None if rng.random() < 0.3 else (rng.integers(0, 30, 3), rng.integers(30, 80, 3))
             for _ in range(n)]  # fmt: skip
    has = np.array([b is not None for b in boxes])
    ob = np.array([b if b is not None else (np.zeros(3), np.zeros(3)) for b in boxes])
    lo, hi, ok, pad = conservative_boxes((centre, q, radii, blur, clip), disp, sp, shape,
                                         (has, ob[:, 0], ob[:, 1]))  # fmt: skip
    bound = np.sqrt(((q * radii[:, None, :]) ** 2).sum(axis=2))
    r = np.ceil((bound + disp[:, None]) / sp).astype(np.int64)
    lo_r, hi_r = centre - r - 1, centre + r + 2
    for i in range(n):
        if clip[i] and boxes[i] is not None:
            lo_r[i] = np.maximum(lo_r[i], boxes[i][0])
            hi_r[i] = np.minimum(hi_r[i], boxes[i][1])
    lo_r, hi_r = np.maximum(lo_r, 0), np.minimum(hi_r, shape)
    np.testing.assert_array_equal(lo, lo_r)
    np.testing.assert_array_equal(hi, hi_r)
    np.testing.assert_array_equal(ok, (hi_r > lo_r).all(axis=1))
    np.testing.assert_array_equal(pad, np.ceil((BLUR_TRUNCATE * blur)[:, None] / sp) + 1)
    assert (~ok).any() and ok.any()


def test_plan_numbers_packed_as_numpy_converts_them(small_phantom, masks):
    """float64s (struct packing) gives np.array's float64 values for the number types a plan
    holds (Python and NumPy floats and ints, bools, NaN, infinities, -0.0); anything else is
    a TypeError, which tumor_arrays reports as a ValueError; tumor_arrays of a real plan is
    the NumPy conversion of its fields."""
    import dataclasses

    from synthgen.rendering import float64s, tumor_arrays

    vals = [1.5, -0.0, 3, True, False, np.float32(0.1), np.float64(-2.25), np.int64(-7),
            float("nan"), float("inf"), 2**52 + 1, 1e-310]  # fmt: skip
    got = float64s(vals)
    assert got.dtype == np.float64 and got.shape == (len(vals),)
    np.testing.assert_array_equal(got, np.array(vals, dtype=np.float64))
    assert np.signbit(got[1]) and float64s([]).shape == (0,)
    for bad in (["1.5"], [[1.0]], [None], [1 + 2j]):
        with pytest.raises(TypeError, match="expected numbers"):
            float64s(bad)
    plan = synthgen.plan(small_phantom.image, masks["liver"], organ="liver-classic", seed=3,
                         spacing=small_phantom.spacing, size="mix")  # fmt: skip
    ts = plan.tumors
    centre, rot, radii, blur, clip, ext = tumor_arrays(ts)
    np.testing.assert_array_equal(centre, np.array([t.center_vox for t in ts], dtype=np.int64))
    np.testing.assert_array_equal(rot, np.array([t.rotation for t in ts]).reshape(-1, 3, 3))
    np.testing.assert_array_equal(radii, np.array([t.radii_mm for t in ts]))
    np.testing.assert_array_equal(blur, np.array([t.blur_sigma_mm for t in ts]))
    np.testing.assert_array_equal(clip, np.array([t.clip_to_organ for t in ts]))
    np.testing.assert_array_equal(ext, np.array([t.control_extent_mm for t in ts]))
    odd = dataclasses.replace(ts[0], radii_mm=(1.0, "2.0", 3.0))
    with pytest.raises(ValueError, match="tumor numbers"):
        tumor_arrays([odd])


def test_control_grid_is_numpy_conversion_held_immutably():
    """ControlGrid: nested lists, tuples or real arrays (3, g0, g1, g2) as np.asarray's
    float64 values, immutable (no flag makes the array writable, no attribute is set, its
    items are tuples); it reads as the nested lists (len, indexing, iteration as tuples, ==,
    repr, tolist); none is (), [] or a (0,) array; another shape or depth, ragged lists or
    anything but real numbers are a ValueError."""
    import copy
    import pickle

    from synthgen import ControlGrid
    from synthgen.planning import _tuples

    rng = np.random.default_rng(8)
    a = rng.normal(0, 3, (3, 4, 2, 3))
    a[0, 0, 0, 0] = -0.0
    lists = a.tolist()
    for d in (lists, a, a.astype(np.float32), [*lists[:1], a[1].tolist(), a[2]],
              tuple(map(tuple, lists)), ControlGrid(a), a.astype(np.int64)):  # fmt: skip
        g = ControlGrid(d)
        ref = np.asarray(d if not isinstance(d, list) else [np.asarray(x) for x in d],
                         dtype=np.float64)  # fmt: skip
        assert g.array.dtype == np.float64 and g.shape == (3, 4, 2, 3) and len(g) == 3
        np.testing.assert_array_equal(g.array, ref)
        assert g.tolist() == ref.tolist() and g == ref.tolist()
        assert list(g) == [_tuples(x) for x in ref.tolist()] and g[1] == _tuples(ref[1].tolist())
        assert g[-1][3] == _tuples(ref[2, 3].tolist()) and type(g[0][0][0][0]) is float
        assert repr(g) == repr(ref.tolist()) and np.asarray(g) is g.array
        assert np.asarray(g, dtype=np.float32).dtype == np.float32
        assert np.array(g) is not g.array and np.array(g).flags.writeable
        with pytest.raises(ValueError, match="needs a copy"):
            g.__array__(np.float32, copy=False)
        # immutable: the array, the grid's attribute and its items
        with pytest.raises(ValueError):
            g.array.flags.writeable = True
        with pytest.raises(ValueError):
            g.array[0, 0, 0, 0] = 1.0
        with pytest.raises(AttributeError, match="immutable"):
            g.array = a
        with pytest.raises(TypeError):
            g[0][0][0][0] = 1.0  # type: ignore[index]
    g = ControlGrid(a)
    a[1, 1, 1, 1] = 99.0  # the grid holds a copy
    assert g.array[1, 1, 1, 1] != 99.0 and g != a.tolist() and g == ControlGrid(g.array)
    assert np.signbit(g.array[0, 0, 0, 0]) and g != ControlGrid(g.array[:, :, :, :2])
    assert copy.deepcopy(g) is g and pickle.loads(pickle.dumps(g)) == g
    assert not pickle.loads(pickle.dumps(g)).array.flags.writeable
    assert (g == (1,)) is False and g != "x"
    ints = ControlGrid([[[[1, 2]]], [[[3, 4]]], [[[5, 6]]]])
    assert ints.tolist() == [[[[1.0, 2.0]]], [[[3.0, 4.0]]], [[[5.0, 6.0]]]]
    for none in ([], (), np.zeros(0), ControlGrid()):
        e = ControlGrid(none)
        assert e.shape == (0,) and len(e) == 0 and e == [] and e.tolist() == []
    three = [[[[1.0]]], [[[2.0]]]]  # completed to three components below
    bad = [
        [*three, [[[1.0, 2.0]]]],  # ragged
        [[[1.0, 2.0]]] * 3,  # three levels
        [*three, [[[1.0, [2.0]]]]],  # a list where a number belongs
        [*three, [[["1.0"]]]],  # a string
        [*three, [[1.0]]],  # a number where a list belongs
        three,  # two components
        [[[[1.0]]]] * 4,  # four
        [[[]]] * 3,  # no control points
        np.zeros((3, 3, 3)),
        np.zeros((2, 3, 3, 3)),
        np.zeros((0, 3)),
        np.zeros((3, 3, 3, 3), dtype=complex),
        np.full((3, 1, 1, 1), "1.5"),
        np.full((3, 1, 1, 1), None),
        5.0,
        "abc",
        {"a": 1},
    ]
    for d in bad:
        with pytest.raises(ValueError, match="control displacements"):
            ControlGrid(d)


def test_tumor_plan_holds_its_displacements_as_a_grid(small_phantom, masks):
    """A TumorPlan's displacements are a ControlGrid (lists given are taken as one); JSON and
    to_dict write nested lists, as before, and read back equal; pickling keeps the grid; an
    invalid one fails when the plan is made, naming the tumor."""
    import dataclasses
    import pickle

    from synthgen import ControlGrid

    plan = synthgen.plan(small_phantom.image, masks["liver"], organ="liver-classic", seed=5,
                         spacing=small_phantom.spacing, size="mix")  # fmt: skip
    t = plan.tumors[0]
    assert type(t.displacement_mm) is ControlGrid
    assert t.displacement is t.displacement_mm.array and t.displacement.shape == (3, 3, 3, 3)
    text = plan.to_json()
    doc = json.loads(text)
    assert doc["tumors"][0]["displacement_mm"] == t.displacement.tolist()
    assert plan.to_dict()["tumors"][0]["displacement_mm"] == t.displacement.tolist()
    assert json.loads(json.dumps(plan.to_dict())) == doc
    back = Plan.from_json(text)
    assert back.tumors == plan.tumors and back.to_json() == text
    assert type(back.tumors[0].displacement_mm) is ControlGrid
    assert pickle.loads(pickle.dumps(plan)).tumors == plan.tumors
    lists = dataclasses.replace(t, displacement_mm=t.displacement.tolist())
    assert type(lists.displacement_mm) is ControlGrid and lists == t
    moved = t.displacement + 1.0
    t2 = dataclasses.replace(t)
    t2.displacement_mm = moved.tolist()  # assigned later: read as it is
    np.testing.assert_array_equal(t2.displacement, moved)
    with pytest.raises(ValueError, match="tumor 3: control displacements"):
        dataclasses.replace(t, index=3, displacement_mm=[[1.0, 2.0]])
    # the JSON form, pinned: nested lists of exact floats (an int given is written as float)
    tiny = dataclasses.replace(t, displacement_mm=[[[[0.5, 1]]], [[[-0.0, 2.25]]],
                                                   [[[1e-300, -3]]]])  # fmt: skip
    text = dataclasses.replace(plan, tumors=[tiny]).to_json()
    assert '"displacement_mm": [[[[0.5, 1.0]]], [[[-0.0, 2.25]]], [[[1e-300, -3.0]]]]' in text


def test_centres_follow_the_placement_rules(small_phantom, masks):
    liver = masks["liver"]
    classic = load_preset("liver-classic").placement
    for size in ("tiny", "medium", "large"):
        for seed in range(3):
            plan = synthgen.plan(
                small_phantom.image, liver, organ="liver-classic", seed=seed,
                spacing=small_phantom.spacing, size=size,
            )  # fmt: skip
            z0, z1 = plan.organ_bbox[2]
            for t in plan.tumors:
                c = t.center_vox
                # 2 mm erosion at 2.5 mm in-plane spacing: the 3x3 in-plane square is liver
                assert liver[c[0] - 1 : c[0] + 2, c[1] - 1 : c[1] + 2, c[2]].all()
                frac = (c[2] - z0) / (z1 - 1 - z0)
                eps = 0.5 / (z1 - 1 - z0)
                assert classic.z_window[0] - eps <= frac <= classic.z_window[1] + eps
    pan = masks["pancreas"]
    plan = synthgen.plan(
        small_phantom.image, pan, organ="pancreas", seed=0, spacing=small_phantom.spacing,
        size="large",
    )  # fmt: skip
    # large pancreas tumors sit at the organ voxel nearest (mm) its bounding-box centre
    c = np.array([(lo + hi - 1) // 2 for lo, hi in plan.organ_bbox])
    sp = np.asarray(small_phantom.spacing)
    (t,) = plan.tumors
    assert pan[t.center_vox]
    d2 = (((np.argwhere(pan) - c) * sp) ** 2).sum(axis=1).min()
    assert (((np.array(t.center_vox) - c) * sp) ** 2).sum() == d2


# ----------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_bytes(small_phantom, masks):
    a = _synth(small_phantom, masks["liver"], "liver-classic", 5)
    b = _synth(small_phantom, masks["liver"], "liver-classic", 5)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.label.tobytes() == b.label.tobytes()
    assert a.plan.to_json() == b.plan.to_json()
    assert [t.to_dict() for t in a.tumors] == [t.to_dict() for t in b.tumors]


def test_different_seeds_differ(small_phantom, masks):
    a = _synth(small_phantom, masks["liver"], "liver-classic", 5, "small")
    b = _synth(small_phantom, masks["liver"], "liver-classic", 6, "small")
    assert a.image.tobytes() != b.image.tobytes()
    assert a.label.tobytes() != b.label.tobytes()
    assert [t.center_vox for t in a.plan.tumors] != [t.center_vox for t in b.plan.tumors]


def test_plan_json_round_trip_reproduces_the_render(small_phantom, masks, tmp_path: Path):
    img, m = small_phantom.image, masks["liver"]
    direct = _synth(small_phantom, m, "liver", 7, "mix")
    plan = synthgen.plan(img, m, organ="liver", seed=7, spacing=small_phantom.spacing, size="mix")
    text = plan.to_json()
    assert text == direct.plan.to_json()
    again = Plan.from_json(text)
    assert again.to_json() == text
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json(indent=2), encoding="utf-8")
    from_file = Plan.from_json(path)
    assert from_file.to_json() == text
    for p in (again, from_file):
        res = synthgen.render(p, img, m)
        assert res.image.tobytes() == direct.image.tobytes()
        assert res.label.tobytes() == direct.label.tobytes()


@pytest.mark.parametrize("organ", ["liver", "liver-classic", "colon"])
def test_plan_equals_its_json_round_trip(small_phantom, masks, organ: str):
    """``Plan.from_json(p.to_json()) == p`` (and from ``to_dict``): a stored plan compares
    equal to the one it was written from. (Before: never equal, the plan's preset held
    tuples where JSON gives lists.)"""
    m = masks["colon" if organ == "colon" else "liver"]
    p = synthgen.plan(small_phantom.image, m, organ=organ, seed=3, spacing=small_phantom.spacing)
    assert Plan.from_json(p.to_json()) == p
    assert Plan.from_dict(p.to_dict()) == p
    assert Plan.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_render_does_not_depend_on_tumor_order(small_phantom, masks):
    img, m = small_phantom.image, masks["liver"]
    plan = synthgen.plan(
        img, m, organ="liver-classic", seed=2, spacing=small_phantom.spacing, size="mix"
    )
    assert len(plan.tumors) > 10
    ref = synthgen.render(plan, img, m)
    rev = Plan.from_json(plan.to_json())
    rev.tumors = rev.tumors[::-1]
    res = synthgen.render(rev, img, m)
    assert res.image.tobytes() == ref.image.tobytes()
    assert res.tumor_mask.tobytes() == ref.tumor_mask.tobytes()


# ------------------------------------------------------------------------------ out= / copies


def test_out_renders_in_place(small_phantom, masks):
    img, m = small_phantom.image, masks["liver"]
    ref = _synth(small_phantom, m, "liver-classic", 3, "mix")
    work = img.copy()
    res = _synth(small_phantom, m, "liver-classic", 3, "mix", image=work, out=work)
    assert res.image is work
    assert work.tobytes() == ref.image.tobytes()
    assert res.label.tobytes() == ref.label.tobytes()
    changed = _changed(img, work)
    assert changed.any()
    assert not (changed & ~_boxes_region(res, img.shape)).any()
    # a separate caller-owned buffer holding the image works the same
    buf = np.empty_like(img)
    buf[...] = img
    res2 = _synth(small_phantom, m, "liver-classic", 3, "mix", out=buf)
    assert res2.image is buf
    assert buf.tobytes() == ref.image.tobytes()


def test_input_is_not_modified_without_out(small_phantom, masks):
    work = small_phantom.image.copy()
    before = work.copy()
    res = _synth(small_phantom, masks["liver"], "liver-classic", 3, "large", image=work)
    assert res.image is not work
    assert not np.shares_memory(res.image, work)
    assert work.tobytes() == before.tobytes()
    assert res.image.tobytes() != before.tobytes()


# ----------------------------------------------------------------------------------- dtypes


def test_dtypes_are_preserved(small_phantom, masks):
    img, m = small_phantom.image, masks["liver"]
    r16 = _synth(small_phantom, m, "liver-classic", 3, "small")
    r32 = _synth(small_phantom, m, "liver-classic", 3, "small", image=img.astype(np.float32))
    r64 = _synth(small_phantom, m, "liver-classic", 3, "small", image=img.astype(np.float64))
    ri32 = _synth(small_phantom, m, "liver-classic", 3, "small", image=img.astype(np.int32))
    assert r16.image.dtype == np.int16
    assert r32.image.dtype == np.float32
    assert r64.image.dtype == np.float64
    assert ri32.image.dtype == np.int32
    assert r16.label.dtype == np.uint8
    tm = r16.tumor_mask
    assert tm.tobytes() == r32.tumor_mask.tobytes() == r64.tumor_mask.tobytes()
    # float output is not rounded; int16 output is the rounded float output
    f = r32.image[tm]
    assert np.any(f != np.rint(f))
    expected = np.clip(np.rint(r32.image), HU_MIN, HU_MAX).astype(np.int16)
    assert r16.image.tobytes() == expected.tobytes()
    np.testing.assert_array_equal(ri32.image, r16.image.astype(np.int32))
    np.testing.assert_allclose(r64.image, r32.image, atol=2e-3)
    assert HU_MIN <= int(r16.image.min()) and int(r16.image.max()) <= HU_MAX


def test_int16_output_is_clipped_not_wrapped(small_phantom, masks):
    m = masks["liver"]
    img = small_phantom.image.copy()
    img[m] = -1000  # darkening by 65-145 HU would go below -1024
    res = _synth(small_phantom, m, "liver-classic", 1, "large", image=img)
    assert res.image.dtype == np.int16
    vals = res.image[res.tumor_mask]
    assert vals.min() == HU_MIN
    assert vals.max() <= -1000  # no wrap-around to positive values
    assert res.image.min() >= HU_MIN


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_values_already_outside_the_ct_range_are_not_clamped_into_it(small_phantom, masks, dtype):
    """Voxels outside [-1024, 3071] before the render (a scanner's -3024 HU padding, a metal
    clip of an extended-HU scan) move by the tumor's change, bounded as in range, and are
    never clamped into the range (-3024 -> -1024 under a darkening tumor, 30000 -> 3071)."""
    m = masks["liver"]
    ph = small_phantom
    p = synthgen.plan(ph.image, m, organ="liver-classic", seed=4, spacing=ph.spacing, size="large")
    ref = rendering.render(p, ph.image.astype(dtype), m)
    changed = np.flatnonzero(ref.image != ph.image.astype(dtype))
    assert changed.size > 100
    img = ph.image.astype(dtype)
    odd_lo, odd_hi = changed[::5], changed[2::5]
    img.flat[odd_lo] = -3024
    img.flat[odd_hi] = 30000
    res = rendering.render(p, img, m)  # the same plan (planning would see the odd voxels)
    assert res.image.dtype == dtype
    # (liver-classic darkens: the padding stays where it was, the clip drops by the change)
    assert (res.image.flat[odd_lo] == -3024).all()
    drop = 30000 - res.image.flat[odd_hi].astype(np.float64)
    # (>= 0: a change under half a float32 step at 30000 leaves the value as it was)
    assert (drop >= 0).all() and (drop > 10).any() and (drop < 200).all()
    assert (res.image.flat[odd_hi] > HU_MAX).all()
    # every other voxel as before
    rest = np.ones(img.size, bool)
    rest[odd_lo] = rest[odd_hi] = False
    np.testing.assert_array_equal(res.image.ravel()[rest], ref.image.ravel()[rest])
    for t in res.tumors:
        assert t.mean_contrast_hu < 300  # (the clamp counted 26,929 HU of contrast a voxel)


def test_mask_dtypes_are_binarised(small_phantom, masks):
    m = masks["liver"]
    ref = _synth(small_phantom, m, "liver-classic", 8, "small")
    noisy = np.where(m, 0.9, 0.4).astype(np.float32)  # > 0.5 is organ
    for mask in (m.astype(np.uint8), m.astype(np.float64), noisy):
        res = _synth(small_phantom, mask, "liver-classic", 8, "small")
        assert res.image.tobytes() == ref.image.tobytes()
        assert res.label.tobytes() == ref.label.tobytes()


@pytest.mark.parametrize("preset", ["liver", "liver-classic"])  # with and without mass effect
def test_non_native_byte_order_reads_as_native(small_phantom, masks, preset):
    """Big-endian arrays (what nibabel gives for ``>i2`` files) plan and render as their
    native twins: same plan, same values; the result image is in native byte order."""
    img, m = small_phantom.image, masks["liver"]
    ref = _synth(small_phantom, m, preset, 5, "large")
    ref32 = _synth(small_phantom, m, preset, 5, "large", image=img.astype(np.float32))
    cases = [(img.astype(">i2"), m, ref), (img.astype(">f4"), m, ref32),
             (img, m.astype(">u2"), ref), (img, m.astype(">f4"), ref)]  # fmt: skip
    for image, mask, want in cases:
        res = _synth(small_phantom, mask, preset, 5, "large", image=image)
        assert res.plan.to_json() == want.plan.to_json()
        assert res.image.dtype == want.image.dtype  # native order, same kind and size
        assert res.image.tobytes() == want.image.tobytes()
        assert res.label.tobytes() == want.label.tobytes()
        assert res.tumors == want.tumors
        plan = synthgen.plan(image, mask, organ=preset, spacing=small_phantom.spacing, seed=5,
                             size="large", organ_index=synthgen.index_organ(mask))  # fmt: skip
        assert plan.to_json() == want.plan.to_json()
        again = synthgen.render(plan, image, mask)
        assert again.image.tobytes() == want.image.tobytes()
    # a big-endian out (in place, or a separate buffer) is written correctly, in its own order
    for same in (True, False):
        out = img.astype(">i2")
        res = _synth(small_phantom, m, preset, 5, "large", image=out if same else img, out=out)
        assert res.image is out and out.dtype.str == ">i2"
        np.testing.assert_array_equal(out, ref.image)
    # so is a big-endian label map
    lab, lab_ref = m.astype(">u2"), m.astype(np.uint16)
    _synth(small_phantom, m, preset, 5, "large", label_out=lab)
    _synth(small_phantom, m, preset, 5, "large", label_out=lab_ref)
    assert lab.dtype.str == ">u2" and (lab == 2).any()
    np.testing.assert_array_equal(lab, lab_ref)
    # and a batch
    res = synthgen.render_batch([ref.plan, ref.plan], [img.astype(">i2"), img], m.astype(">u2"))
    assert [r.image.tobytes() for r in res] == [ref.image.tobytes()] * 2


@pytest.mark.parametrize("preset", ["liver", "liver-classic"])
def test_float16_renders_through_float32(small_phantom, masks, preset):
    """A float16 image plans and renders as its float32 values, the result cast back."""
    m = masks["liver"]
    f16 = small_phantom.image.astype(np.float16)
    ref = _synth(small_phantom, m, preset, 5, "large", image=f16.astype(np.float32))
    res = _synth(small_phantom, m, preset, 5, "large", image=f16)
    assert res.plan.to_json() == ref.plan.to_json()
    assert res.image.dtype == np.float16
    assert res.image.tobytes() == ref.image.astype(np.float16).tobytes()
    assert res.label.tobytes() == ref.label.tobytes()
    assert (res.image != f16).any()
    out = f16.copy()  # in place
    res = _synth(small_phantom, m, preset, 5, "large", image=out, out=out)
    assert res.image is out and out.dtype == np.float16
    assert out.tobytes() == ref.image.astype(np.float16).tobytes()
    with pytest.raises(ValueError, match="out has dtype float32, image has float16"):
        _synth(small_phantom, m, preset, 5, "large", image=f16, out=f16.astype(np.float32))


# ---------------------------------------------------------------------------- labels, records


@pytest.mark.parametrize(
    ("preset", "organ", "size"), [("liver-classic", "liver", "mix"), ("kidney", "kidney", "large")]
)
def test_labels_are_consistent(small_phantom, masks, preset, organ, size):
    m = masks[organ]
    seed = _exophytic_seed(small_phantom, m) if preset == "kidney" else 2
    res = _synth(small_phantom, m, preset, seed, size)
    m = res.organ_mask  # the organ as rendered (pushed by the preset's mass effect)
    lab, tm = res.label, res.tumor_mask
    assert lab.dtype == np.uint8 and lab.shape == m.shape
    assert set(np.unique(lab).tolist()) == {0, 1, 2}
    np.testing.assert_array_equal(lab == 2, tm)
    np.testing.assert_array_equal(lab == 1, m & ~tm)
    np.testing.assert_array_equal(lab == 0, ~m & ~tm)
    # the lazily built arrays are built once
    assert res.label is lab and res.tumor_mask is tm
    out = np.zeros(m.shape, dtype=bool)
    res.write_tumor_mask(out)
    np.testing.assert_array_equal(out, tm)


def test_tumor_records(small_phantom, masks):
    img, m = small_phantom.image, masks["liver"]
    sp = small_phantom.spacing
    res = _synth(small_phantom, m, "liver-classic", 2, "mix")
    plan = res.plan
    assert len(res.tumors) == len(plan.tumors)
    union = np.zeros(m.shape, dtype=bool)
    diff = img.astype(np.float64) - res.image
    for rec, (box, mask) in _live_records(res):
        t = plan.tumors[rec.index]
        assert rec.size_class == t.size_class
        assert rec.center_vox == t.center_vox
        assert rec.radii_mm == t.radii_mm
        assert rec.contrast_hu == t.contrast_hu
        assert rec.clipped is True
        assert rec.box == [[s.start, s.stop] for s in box]
        assert rec.center_mm == pytest.approx(
            tuple(c * s for c, s in zip(t.center_vox, sp, strict=True))
        )
        assert rec.voxels == int(mask.sum())
        assert rec.volume_mm3 == pytest.approx(rec.voxels * math.prod(sp))
        union[box] |= mask
        if rec.voxels:
            assert rec.mean_contrast_hu == pytest.approx(diff[box][mask].mean(), rel=1e-9)
            assert rec.mean_contrast_hu > 0  # hypodense
            assert rec.mean_contrast_hu <= rec.contrast_hu
    np.testing.assert_array_equal(union, res.tumor_mask)
    assert sum(t.voxels for t in res.tumors) >= res.tumor_mask.sum() > 0


def test_records_report_world_centres_with_an_affine(small_phantom, masks):
    m = masks["liver"]
    res = synthgen.synthesize(
        small_phantom.image, m, organ="liver-classic", seed=1, size="small",
        affine=small_phantom.affine,
    )  # fmt: skip
    assert res.plan.spacing == small_phantom.spacing  # spacing read from the affine
    for rec in res.tumors:
        world = small_phantom.affine @ np.append(np.asarray(rec.center_vox, float), 1.0)
        assert rec.center_mm == pytest.approx(tuple(world[:3]))


def test_hyperdense_tumors_brighten(small_phantom, masks):
    """Kidney tumors are hyperdense 15% of the time: negative D, negative mean contrast."""
    kid = masks["kidney"]
    found = False
    for seed in range(40):
        plan = synthgen.plan(
            small_phantom.image, kid, organ="kidney", seed=seed, spacing=small_phantom.spacing,
            size="small",
        )  # fmt: skip
        if any(t.contrast_hu < 0 for t in plan.tumors):
            found = True
            break
    assert found
    res = synthgen.render(plan, small_phantom.image, kid)
    for rec in res.tumors:
        if rec.voxels:
            assert np.sign(rec.mean_contrast_hu) == np.sign(rec.contrast_hu)


def test_tumor_has_texture(small_phantom, masks):
    """Inside a large tumor, where the blur is 1, ``(I - I') / D`` is the texture T."""
    m = masks["liver"]
    img = small_phantom.image.astype(np.float32)
    plan = synthgen.plan(
        img, m, organ="liver-classic", seed=0, spacing=small_phantom.spacing, size="large"
    )
    plan.tumors = plan.tumors[:1]
    t = plan.tumors[0]
    res = synthgen.render(plan, img, m)
    diff = img - res.image
    # everything darkens by at most D (T <= 1, B <= 1)
    assert diff.min() >= 0.0
    assert diff.max() <= t.contrast_hu * (1 + 1e-6)
    r = [int(3.0 * t.blur_sigma_mm / s + 0.5) for s in small_phantom.spacing]
    core = ndimage.binary_erosion(res.tumor_mask, np.ones([2 * x + 1 for x in r], bool))
    assert core.sum() > 500
    tex = diff[core] / t.contrast_hu
    assert 0.35 <= float(tex.mean()) <= 0.7
    assert float(tex.std()) > 0.015, "the tumor has no texture"


# ---------------------------------------------------------------------------- hollow organs


@pytest.mark.parametrize("organ", ["colon", "esophagus"])
def test_hollow_organs_never_darken_gas(small_phantom, masks, organ):
    img, m = small_phantom.image, masks[organ]
    gas = img < -100
    assert (gas & m).sum() > 100  # the lumen holds gas
    total = 0
    for size in ("tiny", "medium", "large"):
        for seed in (0, 1):
            res = _synth(small_phantom, m, organ, seed, size)
            tm = res.tumor_mask
            total += int(tm.sum())
            # Wall tumors (synthgen._hollow) replace lumen gas with soft tissue: gas is never
            # darkened, only brightened, and no tumor voxel is left below -200 HU.
            changed = gas & (res.image != img)
            assert np.all(res.image[changed] > img[changed])
            if tm.any():
                assert res.image[tm].min() >= -200
    assert total > 0


# ------------------------------------------------------------------- physical units (spacing)


def _shape_stats(ellipsoid_scan, spacing, seeds):
    image, organ = ellipsoid_scan(spacing)
    boundary = organ & ~ndimage.binary_erosion(organ)
    ratios, volumes, extents = [], [], []
    for seed in seeds:
        res = synthgen.synthesize(
            image, organ, organ="liver-classic", spacing=spacing, seed=seed, size="medium"
        )
        for rec, (box, m) in _live_records(res):
            if not m.any() or (m & boundary[box]).any():
                continue  # clipped by the organ surface: not comparable
            r = rec.radii_mm
            ratios.append(rec.volume_mm3 / (4.0 / 3.0 * math.pi * r[0] * r[1] * r[2]))
            volumes.append(rec.volume_mm3)
            ext = []
            for a in range(3):
                hit = np.flatnonzero(m.any(axis=tuple(b for b in range(3) if b != a)))
                ext.append((hit[-1] - hit[0] + 1) * spacing[a] / (2.0 * r[a]))
            extents.append(ext)
    return np.array(ratios), np.array(volumes), np.array(extents)


def test_tumor_size_is_physical_across_spacings(ellipsoid_scan):
    """Same preset and class on 1 mm and 0.7 x 0.7 x 5 mm grids: same sizes in mm."""
    seeds = range(20)
    iso = _shape_stats(ellipsoid_scan, (1.0, 1.0, 1.0), seeds)
    aniso = _shape_stats(ellipsoid_scan, (0.7, 0.7, 5.0), seeds)
    for ratios, _, _ in (iso, aniso):
        assert ratios.size >= 20
        assert 0.7 <= np.median(ratios) <= 1.4
    assert np.median(aniso[0]) == pytest.approx(np.median(iso[0]), rel=0.15)
    assert np.median(aniso[1]) == pytest.approx(np.median(iso[1]), rel=0.25)
    ext_iso, ext_aniso = np.median(iso[2], axis=0), np.median(aniso[2], axis=0)
    assert np.all((ext_iso > 0.8) & (ext_iso < 1.3))
    np.testing.assert_allclose(ext_aniso, ext_iso, atol=0.15)


# ------------------------------------------------------- published recipe on the 1 mm phantom


LIVER_CLASSIC_SEEDS = range(6)


@pytest.fixture(scope="module")
def classic_stats(bench_phantom):
    """Per class: the plans' draws and the measured drop and halo over 6 seeds."""
    img, liver = bench_phantom.image, bench_phantom.mask("liver")
    out = {}
    for size in ("tiny", "small", "medium", "large"):
        drops, labelled, halo, runs = [], 0, 0, []
        for seed in LIVER_CLASSIC_SEEDS:
            res = synthgen.synthesize(
                img, liver, organ="liver-classic", spacing=bench_phantom.spacing, seed=seed,
                size=size,
            )  # fmt: skip
            crop = tuple(
                slice(min(b[a].start for b, _ in res.boxes), max(b[a].stop for b, _ in res.boxes))
                for a in range(3)
            )
            tm = res.tumor_mask[crop]
            diff = img[crop].astype(np.float64) - res.image[crop]
            assert not (tm & ~liver[crop]).any()
            drops.append(float(diff[tm].mean()))
            labelled += int(tm.sum())
            halo += int(np.count_nonzero((np.abs(diff) > 1.0) & ~tm))
            runs.append(res)
        out[size] = {
            "drop": float(np.mean(drops)),
            "halo_ratio": halo / labelled,
            "runs": runs,
        }
    return out


@pytest.mark.parametrize("size", ["tiny", "small", "medium", "large"])
def test_liver_classic_draws_per_class(classic_stats, size):
    cls = load_preset("liver-classic").classes[size]
    for res in classic_stats[size]["runs"]:
        assert cls.count[0] <= len(res.tumors) <= cls.count[1]
        for t in res.tumors:
            assert t.size_class == size and t.clipped
            assert all(
                r == int(r) and cls.radius_mm[0] <= r <= cls.radius_mm[1] for r in t.radii_mm
            )
            assert 65.0 <= t.contrast_hu <= 145.0
            if t.voxels:
                assert t.mean_contrast_hu > 0


def test_liver_classic_mean_drop_and_halo(classic_stats):
    """Published: mean drop 24-32 HU for tiny, 38-67 HU otherwise; tiny halo 4-5x."""
    drop = {k: v["drop"] for k, v in classic_stats.items()}
    assert 15.0 <= drop["tiny"] <= 45.0, drop
    for size in ("small", "medium", "large"):
        assert 30.0 <= drop[size] <= 80.0, drop
    assert drop["tiny"] < min(drop["small"], drop["medium"], drop["large"])
    assert classic_stats["tiny"]["halo_ratio"] > 1.5
    # the halo shrinks relative to the tumor as tumors grow
    assert classic_stats["large"]["halo_ratio"] < classic_stats["tiny"]["halo_ratio"]


# ------------------------------------------------------------------------ mix, Synthesizer


def test_size_none_draws_from_the_mix(small_phantom, masks):
    drawn = []
    for seed in range(30):
        plan = synthgen.plan(
            small_phantom.image, masks["liver"], organ="liver-classic", seed=seed,
            spacing=small_phantom.spacing,
        )  # fmt: skip
        drawn.append(plan.size_class)
        if plan.size_class != "mix":
            assert {t.size_class for t in plan.tumors} == {plan.size_class}
    assert set(drawn) <= set(load_preset("liver-classic").mix)
    assert len(set(drawn)) >= 3


def test_synthesizer_matches_synthesize(small_phantom, masks):
    img, m = small_phantom.image, masks["liver"]
    syn = Synthesizer("liver-classic", spacing=small_phantom.spacing, size="small")
    assert "liver-classic" in repr(syn)
    a = syn(img, m, seed=4)
    b = _synth(small_phantom, m, "liver-classic", 4, "small")
    assert a.image.tobytes() == b.image.tobytes()
    assert a.label.tobytes() == b.label.tobytes()
    assert syn.plan(img, m, seed=4).to_json() == b.plan.to_json()
    # per-call overrides
    c = syn(img, m, seed=4, size="large")
    d = _synth(small_phantom, m, "liver-classic", 4, "large")
    assert c.image.tobytes() == d.image.tobytes()
    work = img.copy()
    e = syn(work, m, seed=4, out=work)
    assert e.image is work and work.tobytes() == b.image.tobytes()


def test_organ_index_gives_identical_samples(small_phantom) -> None:
    img, liver = small_phantom.image, small_phantom.mask("liver")
    idx = synthgen.index_organ(liver)
    assert idx.count == int(liver.sum())
    a = synthgen.synthesize(img, liver, organ="liver", affine=small_phantom.affine, seed=5)
    b = synthgen.synthesize(
        img, liver, organ="liver", affine=small_phantom.affine, seed=5, organ_index=idx
    )
    np.testing.assert_array_equal(a.image, b.image)
    assert a.plan.to_json() == b.plan.to_json()
    with pytest.raises(ValueError, match="organ_index is for shape"):
        synthgen.synthesize(
            img[:-1], liver[:-1], organ="liver", spacing=(1, 1, 1), seed=5, organ_index=idx
        )
    with pytest.raises(ValueError, match="empty"):
        synthgen.index_organ(np.zeros((4, 4, 8), bool))
