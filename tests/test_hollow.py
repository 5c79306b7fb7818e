"""Hollow organs (colon, esophagus): tumors are thickened wall segments (``synthgen._hollow``).

On the phantom (and on the TotalSegmentator example's colon, network-marked): no tumor-label
voxel below -200 HU (gas is replaced, never darkened), a wall thickening measured along the
tumor's normal that matches the plan and the preset's range, annular vs eccentric angular
coverage, polyps protruding into the lumen, texture, determinism and the plan's JSON round
trip.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import synthgen
from synthgen import Plan
from synthgen._hollow import LABEL_MIN_HU
from synthgen.phantom import make_phantom
from synthgen.presets import load_preset

HOLLOW = ("colon", "esophagus")
GAS_HU = -200.0
FINE_SPACING = (1.5, 1.5, 1.5)


@pytest.fixture(scope="module")
def fine_phantom():
    """The phantom at 1.5 mm (wall thickness measured to about a voxel)."""
    return make_phantom((256, 208, 224), FINE_SPACING, seed=0)


def _synth(img, mask, organ, seed, sp, size=None, **kw):
    return synthgen.synthesize(img, mask, organ=organ, seed=seed, spacing=sp, size=size, **kw)


def _thickness(t, organ: np.ndarray, label: np.ndarray, sp) -> tuple[float, float]:
    """(wall thickness, chord) in mm along the tumor's normal at the segment's middle.

    The chord runs through the tumor's centre along ``normal``, between the organ's outer
    boundary on the ``+normal`` side and the one on the other side; the thickness is the
    length of the tumor label's run from the ``+normal`` boundary inward."""
    w = t.wall
    c = np.asarray(w["center_vox"]) * sp
    n = np.asarray(w["normal"])
    step = 0.1
    tau = np.arange(-80.0, 80.0, step)  # mm along +normal from the centre
    pts = np.rint((c[None, :] + tau[:, None] * n[None, :]) / sp).astype(int)
    ok = np.all((pts >= 0) & (pts < np.asarray(organ.shape)), axis=1)
    inside = np.zeros(tau.size, bool)
    lab = np.zeros(tau.size, bool)
    inside[ok] = organ[tuple(pts[ok].T)]
    lab[ok] = label[tuple(pts[ok].T)]
    mid = int(np.argmin(np.abs(tau)))
    if not inside[mid]:
        mid = int(np.flatnonzero(inside)[np.argmin(np.abs(np.flatnonzero(inside) - mid))])
    hi = mid
    while hi + 1 < tau.size and inside[hi + 1]:
        hi += 1
    lo = mid
    while lo > 0 and inside[lo - 1]:
        lo -= 1
    chord = (hi - lo + 1) * step
    run = 0
    k = hi
    while k >= lo and lab[k]:
        run += 1
        k -= 1
    return run * step, chord


def _tumors(res):
    """(plan tumor, box, mask) of every rendered tumor."""
    by_box = {tuple(map(tuple, r.box)): r for r in res.tumors if r.box}
    out = []
    for box, m in res.boxes:
        rec = by_box[tuple((s.start, s.stop) for s in box)]
        out.append((res.plan.tumors[rec.index], box, m))
    return out


def _check_label(res, img) -> None:
    tm = res.tumor_mask
    assert tm.any()
    new = res.image[tm].astype(np.float64)
    assert new.min() >= LABEL_MIN_HU - 0.5 > GAS_HU  # zero voxels below -200 HU
    # gas is never darkened; what changes outside the label is the blended fringe
    changed = res.image != img
    gas = img < GAS_HU
    assert np.all(res.image[gas & changed] > img[gas & changed])


# ---------------------------------------------------------------------------- planning


@pytest.mark.parametrize("organ", HOLLOW)
def test_wall_plans_are_json_and_old_plans_still_load(small_phantom, organ):
    ph = small_phantom
    m = ph.mask(organ)
    for seed in range(4):
        plan = synthgen.plan(ph.image, m, organ=organ, seed=seed, spacing=ph.spacing)
        assert plan.tumors and all(t.kind == "wall" for t in plan.tumors)
        for t in plan.tumors:
            w = t.wall
            assert w["mode"] in ("annular", "eccentric", "polypoid")
            assert abs(np.linalg.norm(w["axis"]) - 1) < 1e-9
            assert abs(np.linalg.norm(w["normal"]) - 1) < 1e-9
            assert abs(np.dot(w["axis"], w["normal"])) < 1e-9
            assert (w["arc_deg"] == 360.0) == (w["mode"] == "annular")
            assert 0 < w["shoulder_mm"] <= 0.5 * w["half_length_mm"] + 1e-9
            # the centre lies in the organ (the lumen of the tube)
            assert m[tuple(round(v) for v in w["center_vox"])]
        back = Plan.from_json(plan.to_json())
        assert back.to_json() == plan.to_json()
        a = synthgen.render(plan, ph.image, m).image
        b = synthgen.render(back, ph.image, m).image
        assert a.tobytes() == b.tobytes()
    # a plan written before wall tumors existed (no kind / wall keys) still loads
    liver = synthgen.plan(ph.image, ph.mask("liver"), organ="liver", seed=0, spacing=ph.spacing)
    d = liver.to_dict()
    for t in d["tumors"]:
        t.pop("kind")
        t.pop("wall")
    old = Plan.from_dict(d)
    assert all(t.kind == "ellipsoid" and t.wall is None for t in old.tumors)
    assert old.to_json() == liver.to_json()


def test_wall_thickness_follows_class_or_preset(small_phantom):
    ph = small_phantom
    for organ in HOLLOW:
        p = load_preset(organ)
        m = ph.mask(organ)
        for seed in range(8):
            size = ("tiny", "small", "medium", "large")[seed % 4]
            plan = synthgen.plan(ph.image, m, organ=organ, seed=seed, spacing=ph.spacing, size=size)
            cls = p.classes[size]
            lo, hi = cls.wall_thickness_mm or p.wall.thickness_mm
            for t in plan.tumors:
                assert lo <= t.wall["thickness_mm"] <= hi
                assert cls.radius_mm[0] <= t.wall["half_length_mm"] <= cls.radius_mm[1]


# ---------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("organ", HOLLOW)
def test_no_gas_in_the_label_and_texture(small_phantom, organ):
    ph = small_phantom
    m = ph.mask(organ)
    replaced = 0
    for seed in range(8):
        res = _synth(ph.image, m, organ, seed, ph.spacing)
        _check_label(res, ph.image)
        tm = res.tumor_mask
        assert not (tm & ~m).any()  # the wall grows inward: the label stays in the organ
        assert not ((res.image != ph.image) & ~m).any()
        replaced += int((tm & (ph.image < GAS_HU)).sum())
        for t, box, mk in _tumors(res):
            if mk.sum() >= 20:
                v = res.image[box][mk].astype(np.float64)
                assert v.std() > 3.0  # texture and noise, not a flat fill
                w = t.wall
                assert abs(np.median(v) - w["tissue_hu"]) < 40.0
    assert replaced > 0  # lumen gas was replaced by tissue


def _depth(t, organ: np.ndarray, label: np.ndarray, sp) -> tuple[float, float]:
    """(thickness, inscribed radius) in mm over the flat middle of the segment: the largest
    distance from the organ's outer boundary (its EDT) of a tumor voxel, and of any organ
    voxel near the axis."""
    from scipy import ndimage

    w = t.wall
    c = np.asarray(w["center_vox"])
    half = max(w["half_length_mm"] + w["thickness_mm"], w["reach_mm"]) + 10.0
    box = tuple(
        slice(max(0, math.floor(c[a] - half / sp[a])), math.ceil(c[a] + half / sp[a]) + 1)
        for a in range(3)
    )
    org = organ[box]
    edt = ndimage.distance_transform_edt(org, sampling=sp)
    idx = np.indices(org.shape).reshape(3, -1).T + [b.start for b in box]
    x = (idx - c) * sp
    axis = np.asarray(w["axis"])
    s = x @ axis
    rho = np.linalg.norm(x - np.outer(s, axis), axis=1)
    flat = max(w["half_length_mm"] - w["shoulder_mm"], max(sp))
    mid = (np.abs(s) <= flat) & (rho <= w["reach_mm"])
    e = edt.ravel()
    lab = label[box].ravel() & mid
    return float(e[lab].max()) if lab.any() else 0.0, float(e[mid & org.ravel()].max())


@pytest.mark.parametrize("organ", HOLLOW)
def test_measured_wall_thickening_in_the_preset_range(fine_phantom, organ):
    """Over the segment's flat middle the thickened wall measures (distance from the organ's
    outer boundary) the planned thickness within a voxel and a half plus the lobulation, in
    the preset's range, unless the plan asked for more than the lumen holds (closed lumen)."""
    ph = fine_phantom
    p = load_preset(organ)
    m = ph.mask(organ)
    sp = np.asarray(ph.spacing)
    tol = 1.5 * max(FINE_SPACING)
    n_measured = n_closed = 0
    for seed in range(16):
        size = ("tiny", "small", "medium", "large")[seed % 4]
        res = _synth(ph.image, m, organ, seed, ph.spacing, size)
        _check_label(res, ph.image)
        lo, hi = p.classes[size].wall_thickness_mm or p.wall.thickness_mm
        for t, box, mk in _tumors(res):
            w = t.wall
            if w["mode"] == "polypoid":
                continue
            tm = np.zeros(m.shape, bool)
            tm[box] = mk
            got, r_in = _depth(t, m, tm, sp)
            irr = w["irregularity"]
            want = w["thickness_mm"]
            assert got <= want * (1 + irr) + tol, (seed, got, w)
            assert got <= hi * (1 + irr) + tol
            if want * (1 - irr) >= r_in - tol:  # more than the lumen holds
                n_closed += 1
                if w["mode"] == "annular":
                    assert got >= r_in - tol, (seed, got, r_in)  # the lumen is closed
                continue
            n_measured += 1
            if w["mode"] == "annular":
                assert got >= want * (1 - irr) - tol, (seed, got, w)
                assert got >= lo * (1 - irr) - tol
            else:
                assert got >= 0.5 * want, (seed, got, w)
    # the phantom esophagus is 20 mm wide: most esophageal tumors close its lumen
    assert n_measured >= (3 if organ == "colon" else 1), (n_measured, n_closed)
    assert n_measured + n_closed >= 8


def _coverage(t, label, sp, radius) -> float:
    """Share of 10-degree bins around the axis holding label voxels near the outer wall, in
    the slab through the segment's middle."""
    w = t.wall
    c = np.asarray(w["center_vox"])
    axis, n = np.asarray(w["axis"]), np.asarray(w["normal"])
    b = np.cross(axis, n)
    idx = np.argwhere(label)
    x = (idx - c) * sp
    s = x @ axis
    keep = np.abs(s) <= 1.0 * max(sp)
    x = x[keep] - np.outer(s[keep], axis)
    rho = np.linalg.norm(x, axis=1)
    x = x[rho >= 0.6 * radius]
    ang = np.degrees(np.arctan2(x @ b, x @ n)) % 360.0
    return np.unique((ang // 10).astype(int)).size / 36.0


def test_annular_vs_eccentric_coverage(fine_phantom):
    ph = fine_phantom
    m = ph.mask("colon")
    sp = np.asarray(ph.spacing)
    seen = {"annular": 0, "eccentric": 0}
    for seed in range(30):
        res = _synth(ph.image, m, "colon", seed, ph.spacing, "large")
        tm = res.tumor_mask
        for t in res.plan.tumors:
            w = t.wall
            if w["mode"] == "polypoid" or seen[w["mode"]] >= 3:
                continue
            if w["mode"] == "eccentric" and w["thickness_mm"] > 0.6 * w["radius_mm"]:
                continue  # a plaque thicker than the radius wraps around: no arc to measure
            spread = math.degrees(2.0 * w["thickness_mm"] / w["radius_mm"])
            if w["mode"] == "eccentric" and w["arc_deg"] + spread > 300.0:
                continue  # its inner edge reaches nearly around: no gap left to measure
            cov = _coverage(t, tm, sp, w["radius_mm"])
            if w["mode"] == "annular":
                assert cov >= 0.9, (seed, cov)
            else:
                assert cov <= (w["arc_deg"] + spread + 30.0) / 360.0, (seed, cov, w)
                assert cov >= 0.8 * w["arc_deg"] / 360.0 - 0.1, (seed, cov, w)
                assert cov < 0.9
            seen[w["mode"]] += 1
        if all(v >= 3 for v in seen.values()):
            break
    assert all(v >= 1 for v in seen.values()), seen


@pytest.mark.parametrize("organ", HOLLOW)
def test_polyps_protrude_into_the_lumen(fine_phantom, organ):
    ph = fine_phantom
    m = ph.mask(organ)
    sp = np.asarray(ph.spacing)
    wall_mm = {"colon": 3.0, "esophagus": 3.5}[organ]  # the phantom's wall
    found = 0
    for seed in range(60):
        plan = synthgen.plan(ph.image, m, organ=organ, seed=seed, spacing=ph.spacing, size="large")
        if not any(t.wall["mode"] == "polypoid" for t in plan.tumors):
            continue
        res = synthgen.render(plan, ph.image, m)
        _check_label(res, ph.image)
        for t in plan.tumors:
            if t.wall["mode"] != "polypoid":
                continue
            run, chord = _thickness(t, m, res.tumor_mask, sp)
            expect = min(t.wall["height_mm"], chord)
            assert run >= min(expect * (1 - t.wall["irregularity"]), chord) - 2 * max(sp)
            assert run > wall_mm + max(sp)  # beyond the wall: a mass in the lumen
            found += 1
        if found >= 2:
            break
    assert found >= 1


@pytest.mark.parametrize("organ", HOLLOW)
def test_deterministic_and_thread_independent(small_phantom, organ):
    ph = small_phantom
    m = ph.mask(organ)
    a = _synth(ph.image, m, organ, 3, ph.spacing, "medium")
    synthgen.set_num_threads(1)
    try:
        b = _synth(ph.image, m, organ, 3, ph.spacing, "medium")
    finally:
        synthgen.set_num_threads(None)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.label.tobytes() == b.label.tobytes()
    out = np.array(ph.image, copy=True)
    c = synthgen.render(a.plan, out, m, out=out)
    assert out.tobytes() == a.image.tobytes() and c.image is out


# ---------------------------------------------------------------------------- real CT


@pytest.mark.network
def test_real_colon(totalseg):
    """TotalSegmentator example (colon = label 20, mostly gas; it has no esophagus label):
    wall tumors replace gas, never a label voxel below -200 HU, thickening measured."""
    img = np.asarray(totalseg.image)
    colon = totalseg.mask(20)
    assert (img[colon] < GAS_HU).mean() > 0.3  # the lumen is gas
    sp = tuple(float(v) for v in np.linalg.norm(totalseg.affine[:3, :3], axis=0))
    n_measured = 0
    for seed in range(10):
        res = _synth(img, colon, "colon", seed, sp, affine=totalseg.affine)
        _check_label(res, img)
        tm = res.tumor_mask
        assert not (tm & ~colon).any()
        again = Plan.from_json(res.plan.to_json())
        assert synthgen.render(again, img, colon).image.tobytes() == res.image.tobytes()
        for t, box, mk in _tumors(res):
            w = t.wall
            if w["mode"] == "polypoid":
                continue
            lab = np.zeros(colon.shape, bool)
            lab[box] = mk
            got, r_in = _depth(t, colon, lab, np.asarray(sp))
            tol = 1.5 * max(sp)
            irr = w["irregularity"]
            assert got <= w["thickness_mm"] * (1 + irr) + tol, (seed, got, w)
            if w["thickness_mm"] * (1 - irr) < r_in - tol:
                n_measured += 1
                if w["mode"] == "annular":
                    assert got >= w["thickness_mm"] * (1 - irr) - tol, (seed, got, w)
    assert n_measured >= 1


def test_wall_noise_is_the_counter_hash_of_the_voxel():
    """The tissue noise of a wall tumor is a function of (tumor, voxel offset from its centre)
    only, as every per-voxel random number: two boxes that overlap agree where they overlap,
    and its SD is the planned one."""
    from synthgen._cpu_kernels import noise_box

    keys = np.array([11, 22, 0, 0], dtype=np.uint32)
    a = noise_box(keys, -10, -8, -6, 20, 16, 12, np.float32(9.0), 0.0)
    b = noise_box(keys, -4, -8, -2, 20, 10, 12, np.float32(9.0), 0.0)
    np.testing.assert_array_equal(a[6:, :10, 4:], b[:14, :, :8])
    assert abs(float(a.std()) - 9.0) < 0.5 and abs(float(a.mean())) < 0.5
    c = noise_box(np.array([11, 23, 0, 0], np.uint32), -10, -8, -6, 20, 16, 12, 9.0, 0.0)
    assert abs(np.corrcoef(a.ravel(), c.ravel())[0, 1]) < 0.05


# ------------------------------------------------- compiled kernels against NumPy references


def _outer_wall_reference(comp: np.ndarray, organ: np.ndarray) -> np.ndarray:
    """Voxels of ``comp`` with a face neighbour outside the organ (the box's faces are not
    walls: edge padding)."""
    pad = np.pad(organ, 1, mode="edge")
    n = organ.shape
    inner = np.ones(n, dtype=bool)
    for a in range(3):
        for d in (0, 2):
            sl = [slice(1, 1 + n[0]), slice(1, 1 + n[1]), slice(1, 1 + n[2])]
            sl[a] = slice(d, d + n[a])
            inner &= pad[tuple(sl)]
    return comp & ~inner


def _taper(s: np.ndarray, half: float, shoulder: float) -> np.ndarray:
    a = np.abs(s)
    flat = max(0.0, half - shoulder)
    if shoulder <= 0:
        return (a <= half).astype(np.float32)
    u = np.clip((a - flat) / shoulder, 0.0, 1.0)
    return (0.5 * (1.0 + np.cos(np.pi * u))).astype(np.float32)


def _render_wall_reference(t, box, spacing, target, organ_mask, work_dtype=np.float32):
    """``_hollow.render_wall`` as NumPy expressions over the cylinder's whole box (the
    implementation up to 6fc807a; the compiled one works on the component's box only), and
    the component in the returned box."""
    from _grids import placed

    from synthgen._cpu_kernels import bbox, noise_box
    from synthgen._edt import distance_transform_edt
    from synthgen._hash import stream_key
    from synthgen._hollow import STREAM_WALL_NOISE, _component, _coords_mm
    from synthgen._texture import texture_box

    w = t.wall
    sp = np.asarray(spacing, dtype=np.float64)
    orig = np.array(np.asarray(target[box]), dtype=work_dtype, copy=True)
    org = np.asarray(organ_mask[box])
    org = np.ascontiguousarray(org if org.dtype == np.bool_ else org > 0.5)
    c = np.asarray(w["center_vox"], dtype=np.float64)
    axis = np.asarray(w["axis"], dtype=np.float64)
    normal = np.asarray(w["normal"], dtype=np.float64)
    x = _coords_mm(box, sp, c)
    s = x[0] * axis[0] + x[1] * axis[1] + x[2] * axis[2]
    px = [x[a] - s * axis[a] for a in range(3)]
    rho = np.sqrt(px[0] ** 2 + px[1] ** 2 + px[2] ** 2)
    half, thick, mode = float(w["half_length_mm"]), float(w["thickness_mm"]), w["mode"]
    axial = max(half, 0.0) + max(thick, float(w.get("height_mm", 0.0))) + float(sp.max())
    cyl = org & (np.abs(s) <= axial) & (rho <= float(w["reach_mm"]))
    if not cyl.any():
        return None, None
    comp = placed(cyl.shape, _component(cyl, [round(c[a] - box[a].start) for a in range(3)]))
    wall = _outer_wall_reference(comp, org)
    pos = [(np.arange(box[a].start, box[a].stop) - c[a]) * sp[a] for a in range(3)]
    tex = texture_box(t.seed, t.texture, pos)
    u = np.clip((tex - 0.5) / 0.1, -1.0, 1.0)
    sigma = max(float(t.blur_sigma_mm), 1e-3)
    cosang = (px[0] * normal[0] + px[1] * normal[1] + px[2] * normal[2]) / np.maximum(rho, 1e-6)
    if mode == "polypoid":
        near = wall & (np.abs(s) <= 1.5 * sp.max()) & (cosang >= math.cos(math.radians(25.0)))
        r_w = float(np.median(rho[near])) if near.any() else float(w["radius_mm"])
        y = _coords_mm(box, sp, (c * sp + r_w * normal) / sp)
        yn = y[0] * normal[0] + y[1] * normal[1] + y[2] * normal[2]
        rb = max(half, 1e-3)
        hgt = max(float(w["height_mm"]), 1e-3) * (1.0 + float(w["irregularity"]) * u)
        rr2 = (y[0] ** 2 + y[1] ** 2 + y[2] ** 2 - yn * yn) / (rb * rb) + (yn / hgt) ** 2
        depth = (1.0 - np.sqrt(rr2)) * np.minimum(rb, hgt)
        weight = np.clip(0.5 + depth / (2.0 * sigma), 0.0, 1.0)
    else:
        if mode == "eccentric":
            wall = wall & (cosang >= math.cos(math.radians(0.5 * float(w["arc_deg"]))))
        if not wall.any():
            return None, None
        dist = distance_transform_edt(~wall, sampling=sp)
        teff = thick * _taper(s, half, float(w["shoulder_mm"])) * (1.0 + w["irregularity"] * u)
        weight = np.clip(0.5 + (teff - dist) / (2.0 * sigma), 0.0, 1.0)
        weight *= np.clip(teff / sigma, 0.0, 1.0)
    weight = np.where(comp, weight, 0.0).astype(np.float32)
    value = float(w["tissue_hu"]) + float(w["texture_gain_hu"]) * (tex - 0.5)
    if w.get("noise_hu", 0.0) > 0:
        keys = np.asarray([*stream_key(t.seed, STREAM_WALL_NOISE), 0, 0], dtype=np.uint32)
        off = [box[a].start - round(float(c[a])) for a in range(3)]
        value = value + noise_box(keys, *off, *orig.shape, np.float32(w["noise_hu"]), 0.0)
    o32 = orig.astype(np.float32, copy=False)
    delta = (weight * (o32 - value.astype(np.float32))).astype(np.float32)
    mask = (weight >= 0.5) & (o32 - delta >= LABEL_MIN_HU) & comp
    changed = delta != 0
    if not changed.any():
        return None, None
    lo0, hi0, lo1, hi1, lo2, hi2, _ = bbox(changed)
    sub = (slice(lo0, hi0 + 1), slice(lo1, hi1 + 1), slice(lo2, hi2 + 1))
    tight = tuple(slice(box[a].start + sub[a].start, box[a].start + sub[a].stop) for a in range(3))
    return (tight, orig[sub], delta[sub], mask[sub]), comp[sub]


def _wall_variants(t, ph):
    """The tumor as planned and with the numbers that take the other branches: no shoulder,
    lobulation so strong the thickness turns negative, no noise, a centre off the organ (the
    flood fill starts from the cylinder's nearest voxel)."""
    import dataclasses

    yield t
    w = dict(t.wall)
    yield dataclasses.replace(t, wall={**w, "shoulder_mm": 0.0, "noise_hu": 0.0})
    yield dataclasses.replace(t, wall={**w, "irregularity": 1.6, "height_mm": 0.5})
    c = np.asarray(w["center_vox"]) + (w["radius_mm"] + 6.0) * np.asarray(w["normal"]) / ph.spacing
    yield dataclasses.replace(t, wall={**w, "center_vox": [float(v) for v in c]})


@pytest.mark.parametrize("split", [False, True], ids=["serial", "split"])
@pytest.mark.parametrize("organ", HOLLOW)
def test_render_wall_is_the_numpy_reference_bit_for_bit(small_phantom, organ, split, monkeypatch):
    """The compiled render (flood fill testing the cylinder as it goes, the component's box,
    one pass for texture, weight, noise and change) gives the NumPy reference's box, values
    and label bit for bit, signed zeros included, for every mode and branch (the flood fill
    from the cylinder's voxel nearest an off-organ centre, no shoulders, a thickness made
    negative by the lobulation), float32 and float64 scans, bool and uint8 organ masks. Only
    outside the component, where nothing changes, is a change of 0 always +0. ``split``:
    the distance transform's passes and the blend's rows in ranges on three threads (from
    ``PARALLEL_VOXELS`` and ``BLEND_PARALLEL_VOXELS`` voxels: here every box), else all on
    one."""
    from synthgen import _cpu_kernels, _edt, _hollow, _pool
    from synthgen._hollow import render_wall, wall_box

    ranges = []
    monkeypatch.setattr(_pool, "_NUM_THREADS", 3 if split else 1)
    if split:
        monkeypatch.setattr(_edt, "PARALLEL_VOXELS", 1)
        monkeypatch.setattr(_hollow, "BLEND_PARALLEL_VOXELS", 1)
        rows = _cpu_kernels.wall_blend_rows

        def spy(*a):
            ranges.append(a[-2:])
            return rows(*a)

        monkeypatch.setattr(_cpu_kernels, "wall_blend_rows", spy)

    ph = small_phantom
    m = ph.mask(organ)
    targets = [(ph.image, np.float32), (ph.image.astype(np.float64) + 0.25, np.float64)]
    real = _cpu_kernels.wall_component
    starts = {"centre": 0, "nearest": 0}

    def counted(*a):
        r = real(*a)
        starts["centre" if r[1] >= 0 else "nearest"] += 1
        return r

    monkeypatch.setattr(_cpu_kernels, "wall_component", counted)
    seen = set()
    for seed in range(10):
        plan = synthgen.plan(ph.image, m, organ=organ, seed=seed, spacing=ph.spacing)
        for t0 in plan.tumors:
            for v, t in enumerate(_wall_variants(t0, ph)):
                box = wall_box(t, ph.spacing, m.shape)
                img, dt = targets[(seed + v) % 2]
                org = m if v % 2 else m.astype(np.uint8)
                want, comp = _render_wall_reference(t, box, ph.spacing, img, org, dt)
                got = render_wall(t, box, ph.spacing, img, org, dt)
                assert (got is None) == (want is None), (seed, v)
                if got is None:
                    continue
                seen.add((t.wall["mode"], v))
                assert got[0] == want[0]
                for g, r in zip(got[1:], want[1:], strict=True):
                    assert g.dtype == r.dtype and g.shape == r.shape
                    if r.dtype == np.float32:  # the change: a zero outside the component is +0
                        r = np.where(~comp & (r == 0), np.float32(0), r)
                    g, r = np.ascontiguousarray(g), np.ascontiguousarray(r)
                    np.testing.assert_array_equal(g.view(np.uint8), r.view(np.uint8))
    assert {mode for mode, _ in seen} == {"annular", "eccentric", "polypoid"}, seen
    assert {v for _, v in seen} == {0, 1, 2, 3}, seen  # every variant changed something
    assert starts["nearest"] >= 5 and starts["centre"] >= 30, starts
    assert any(r0 > 0 for r0, _ in ranges) == split


@pytest.mark.parametrize("organ", HOLLOW)
def test_locate_wall_on_the_components_box_is_the_whole_box(small_phantom, organ, monkeypatch):
    """Planning measures the lumen (distance transform, axis, centre, reach) on the
    component's bounding box: the same numbers as on the whole planning box."""
    from _grids import placed

    from synthgen import _hollow
    from synthgen._hollow import draw_wall, locate_wall

    ph = small_phantom
    m = ph.mask(organ)
    p = load_preset(organ)
    rng = np.random.default_rng(5)
    idx = np.argwhere(m)
    cases = []
    for _ in range(12):
        p0 = [int(v) for v in idx[int(rng.integers(len(idx)))]]
        draws = draw_wall(rng, p.wall, float(rng.uniform(5, 30)), p.wall.thickness_mm)
        cases.append((p0, draws, locate_wall(ph.image, m, p0, ph.spacing, draws)))
    real = _hollow._component

    def whole(m, seed, pad=0):  # (no crop: the component in a box as large as the planning box)
        found = real(m, seed)
        return None if found is None else (placed(m.shape, found), [0, 0, 0])

    monkeypatch.setattr(_hollow, "_component", whole)
    for p0, draws, got in cases:
        assert got == locate_wall(ph.image, m, p0, ph.spacing, draws), p0
    # (and the crop is smaller than the box: there is something to compare)
    shrunk = []

    def measured(m, seed, pad=0):
        found = real(m, seed)
        shrunk.append(any(found[0].shape[d] + 2 < m.shape[d] for d in range(3)))
        return real(m, seed, pad)

    monkeypatch.setattr(_hollow, "_component", measured)
    for p0, draws, _ in cases:
        locate_wall(ph.image, m, p0, ph.spacing, draws)
    assert shrunk and sum(shrunk) >= len(shrunk) // 2, shrunk
