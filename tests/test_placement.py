"""Anatomy-aware placement: vessel clearance (mask or bright voxels), lesion avoidance,
non-colliding tumors, the confluence flag, bounded fallback, determinism, liver-classic
unchanged, and the batch wiring of AbdomenAtlas vessel masks.

Distances are checked against an independent oracle: the Euclidean distance transform of
the avoided mask in mm (``sampling=spacing``) read at every voxel of each tumor's undeformed
ellipsoid, on strongly anisotropic grids.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time

import numpy as np
import pytest
from scipy import ndimage

import synthgen
from synthgen import _placement
from synthgen.planning import Plan, index_organ, make_plan
from synthgen.presets import load_preset

ANISO = (0.8, 0.8, 4.0)  # mm: thin in-plane, thick slices


def _preset(name: str, **placement):
    p = load_preset(name)
    return dataclasses.replace(p, placement=dataclasses.replace(p.placement, **placement))


def _with_counts(p, size: str, count: tuple[int, int]):
    c = p.classes[size]
    classes = {**p.classes, size: dataclasses.replace(c, count=count)}
    return dataclasses.replace(p, classes=classes)


def _ellipsoid_voxels(t, shape, spacing) -> np.ndarray:
    """Voxel indices (N, 3) whose centres lie in the tumor's undeformed ellipsoid."""
    sp = np.asarray(spacing)
    rot = t.rotation_matrix
    radii = np.asarray(t.radii_mm)
    half = np.sqrt(((rot * radii[None, :]) ** 2).sum(axis=1)) / sp
    c = np.asarray(t.center_vox)
    lo = np.maximum(np.floor(c - half).astype(int), 0)
    hi = np.minimum(np.ceil(c + half).astype(int) + 1, shape)
    grid = np.stack(
        np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij"), -1
    ).reshape(-1, 3)
    local = ((grid - c) * sp) @ rot / radii
    return grid[(local**2).sum(axis=1) <= 1.0]


def _min_distance(plan: Plan, dist_mm: np.ndarray) -> list[float]:
    """Per tumor: the smallest distance (mm) of its ellipsoid voxels to the avoided mask."""
    out = []
    for t in plan.tumors:
        v = _ellipsoid_voxels(t, dist_mm.shape, plan.spacing)
        out.append(float(dist_mm[tuple(v.T)].min()))
    return out


def _tube_scan(ellipsoid_scan, spacing, carve: bool = False, hu: int | None = None):
    """Ellipsoidal organ crossed by vessel tubes of 4 mm radius: three along z, two along x
    (dense enough that many tumors land within a few mm of one)."""
    image, organ = ellipsoid_scan(spacing)
    shape = organ.shape
    ax = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing, strict=True)]
    x, y, z = ax[0][:, None, None], ax[1][None, :, None], ax[2][None, None, :]
    vessel = np.zeros(shape, dtype=bool)
    for x0 in (-45.0, -5.0, 35.0):
        vessel |= (x - x0) ** 2 + (y + 10.0) ** 2 <= 16.0
    for y0, z0 in ((25.0, 5.0), (-40.0, -25.0)):
        vessel |= (y - y0) ** 2 + (z - z0) ** 2 <= 16.0
    vessel &= organ
    if hu is not None:
        image = image.copy()
        image[vessel] = hu
    if carve:
        organ = organ & ~vessel
    return image, organ, vessel


# ------------------------------------------------------------------ vessel clearance in mm


def test_mask_term_measures_mm_on_anisotropic_grid():
    mask = np.zeros((9, 9, 9), bool)
    mask[4, 4, 5] = True  # one voxel above the centre along z: 4 mm away
    for clearance, hit in ((3.9, False), (4.0, True), (6.0, True)):
        term = _placement._MaskTerm(mask, (0, 0, 0), ANISO, clearance, "v")
        assert term.hits_point(np.array([4.0, 4.0, 4.0])) is hit
    mask[:] = False
    mask[8, 4, 4] = True  # four voxels along x: 3.2 mm
    term = _placement._MaskTerm(mask, (0, 0, 0), ANISO, 3.0, "v")
    assert not term.hits_point(np.array([4.0, 4.0, 4.0]))
    assert _placement._MaskTerm(mask, (0, 0, 0), ANISO, 3.3, "v").hits_point(np.array([4, 4, 4]))
    # a 2 mm sphere reaches the voxel 3.2 mm away with a 1.25 mm clearance, not with half
    eye = np.eye(3)
    c = np.array([4.0, 4.0, 4.0])
    assert not term.hits_ellipsoid(c, (2.0, 2.0, 2.0), eye, 0.0)
    t2 = _placement._MaskTerm(mask, (0, 0, 0), ANISO, 1.25, "v")
    assert t2.hits_ellipsoid(c, (2.0, 2.0, 2.0), eye, 1.0)
    assert not t2.hits_ellipsoid(c, (2.0, 2.0, 2.0), eye, 0.5)


@pytest.mark.parametrize(
    ("spacing", "clearance"), [(ANISO, 3.0), (ANISO, 6.0), ((1.6, 1.6, 0.7), 4.0)]
)
def test_vessel_mask_clearance_is_kept_in_mm(ellipsoid_scan, spacing, clearance):
    image, organ, vessel = _tube_scan(ellipsoid_scan, spacing)
    dist = ndimage.distance_transform_edt(~vessel, sampling=spacing)
    preset = _with_counts(_preset("liver", vessel_clearance_mm=clearance), "small", (8, 10))
    free = _with_counts(_preset("liver", vessel_clearance_mm=0.0), "small", (8, 10))
    violated = 0
    for seed in range(6):
        kw = dict(seed=seed, spacing=spacing, size="small", vessel_mask=vessel)
        plan = make_plan(image, organ, organ=preset, **kw)
        assert len(plan.tumors) >= 8
        d = _min_distance(plan, dist)
        assert min(d) >= clearance, (seed, d)
        ref = make_plan(image, organ, organ=free, **kw)
        violated += sum(x < clearance for x in _min_distance(ref, dist))
    assert violated > 0  # without the clearance the same draws do come close to the vessels


def test_bright_voxels_stand_in_for_a_missing_vessel_mask(ellipsoid_scan):
    clearance = 4.0
    for carve in (False, True):  # vessels inside the organ mask, or carved out of it
        image, organ, vessel = _tube_scan(ellipsoid_scan, ANISO, carve=carve, hu=220)
        bbox, _ = synthgen.planning.organ_bbox(organ)
        region = _placement.expand(bbox, organ.shape, clearance, ANISO)
        found = _placement.bright_vessels(image, organ, region, ANISO)
        truth = vessel[region]
        # every detected voxel is vessel; the vessel is found (all of it, or its rim)
        assert found.any() and not (found & ~truth).any()
        if not carve:
            assert found.sum() >= 0.95 * truth.sum()
        dist = ndimage.distance_transform_edt(~vessel, sampling=ANISO)
        preset = _with_counts(_preset("liver", vessel_clearance_mm=clearance), "small", (4, 6))
        for seed in range(4):
            plan = make_plan(image, organ, organ=preset, seed=seed, spacing=ANISO, size="small")
            assert min(_min_distance(plan, dist)) >= clearance, (carve, seed)


def test_bright_fallback_ignores_noise_and_all_false_mask_disables_it(ellipsoid_scan):
    image, organ = ellipsoid_scan(ANISO)  # 100 HU organ, +-5 HU noise, no vessels
    bbox, _ = synthgen.planning.organ_bbox(organ)
    region = _placement.expand(bbox, organ.shape, 3.0, ANISO)
    assert not _placement.bright_vessels(image, organ, region, ANISO).any()
    image, organ, vessel = _tube_scan(ellipsoid_scan, ANISO, hu=220)
    dist = ndimage.distance_transform_edt(~vessel, sampling=ANISO)
    off = np.zeros_like(organ)
    close = 0
    for seed in range(4):
        kw = dict(seed=seed, spacing=ANISO, size="small")
        a = make_plan(image, organ, organ="liver", vessel_mask=off, **kw)
        b = make_plan(image, organ, organ=_preset("liver", vessel_clearance_mm=0.0), **kw)
        assert [t.center_vox for t in a.tumors] == [t.center_vox for t in b.tumors]
        close += sum(d < 3.0 for d in _min_distance(a, dist))
    assert close > 0  # an all-False mask really turned the bright-voxel fallback off


# ------------------------------------------------------------------ lesions and collisions


def test_existing_lesions_are_avoided(ellipsoid_scan):
    image, organ = ellipsoid_scan(ANISO)
    shape = organ.shape
    ax = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, ANISO, strict=True)]
    lesion = (ax[0][:, None, None] - 15) ** 2 + ax[1][None, :, None] ** 2 + (
        ax[2][None, None, :] ** 2
    ) <= 35.0**2
    dist = ndimage.distance_transform_edt(~lesion, sampling=ANISO)
    classic = load_preset("liver-classic")  # confluent, no vessel avoidance: lesions still
    hit = 0
    for seed in range(5):
        plan = make_plan(
            image, organ, organ=classic, seed=seed, spacing=ANISO, size="small",
            lesion_mask=lesion,
        )  # fmt: skip
        assert min(_min_distance(plan, dist)) >= classic.placement.gap_mm, seed
        free = make_plan(image, organ, organ=classic, seed=seed, spacing=ANISO, size="small")
        hit += sum(x < classic.placement.gap_mm for x in _min_distance(free, dist))
    assert hit > 0


def _sphere_gaps(plan: Plan) -> list[float]:
    sp = np.asarray(plan.spacing)
    out = []
    ts = plan.tumors
    for i in range(len(ts)):
        for j in range(i):
            d = np.linalg.norm((np.subtract(ts[i].center_vox, ts[j].center_vox)) * sp)
            out.append(float(d - max(ts[i].radii_mm) - max(ts[j].radii_mm)))
    return out


def test_tumors_do_not_collide_unless_confluent(small_phantom):
    liver = small_phantom.mask("liver")
    sp = small_phantom.spacing
    base = _with_counts(load_preset("liver"), "small", (6, 8))
    apart = dataclasses.replace(base, placement=dataclasses.replace(base.placement, gap_mm=3.0))
    merged = dataclasses.replace(
        base, placement=dataclasses.replace(base.placement, confluence=True)
    )
    overlaps = 0
    for seed in range(5):
        plan = make_plan(
            small_phantom.image, liver, organ=apart, seed=seed, spacing=sp, size="small"
        )
        assert len(plan.tumors) >= 6
        assert min(_sphere_gaps(plan)) >= 3.0, seed
        conf = make_plan(
            small_phantom.image, liver, organ=merged, seed=seed, spacing=sp, size="small"
        )
        overlaps += sum(g < 0 for g in _sphere_gaps(conf))
    assert overlaps > 0  # confluent tumors do overlap with the same draws


def test_confluence_defaults():
    assert load_preset("liver-classic").placement.confluence is True
    assert load_preset("liver-classic").placement.vessel_clearance_mm == 0.0
    for name in ("liver", "pancreas", "kidney", "colon", "esophagus", "uterus"):
        assert load_preset(name).placement.confluence is False
    for name in ("liver", "pancreas", "kidney"):
        assert load_preset(name).placement.vessel_clearance_mm > 0


# ------------------------------------------------------------------ fallback and errors


def test_crowded_organ_relaxes_then_fails_clearly(ellipsoid_scan):
    image, organ = ellipsoid_scan(ANISO)
    # vessels everywhere but a 3-slice (12 mm) slab: a 5 mm clearance fits nowhere around a
    # tiny tumor, the tumor itself does (clearance relaxed to 0) inside the slab
    mid = organ.shape[2] // 2
    vessel = organ.copy()
    vessel[:, :, mid - 1 : mid + 2] = False
    preset = _with_counts(_preset("liver", vessel_clearance_mm=5.0), "tiny", (3, 4))
    dist = ndimage.distance_transform_edt(~vessel, sampling=ANISO)
    for seed in range(3):
        plan = make_plan(
            image, organ, organ=preset, seed=seed, spacing=ANISO, size="tiny", vessel_mask=vessel
        )
        assert len(plan.tumors) >= 3
        assert all(abs(t.center_vox[2] - mid) <= 1 for t in plan.tumors)
        assert min(_min_distance(plan, dist)) > 0
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"no position for .* the vessel mask.*relaxed"):
        make_plan(
            image, organ, organ=preset, seed=0, spacing=ANISO, size="large", vessel_mask=organ
        )
    assert time.perf_counter() - t0 < 20  # bounded retries, never a hang
    with pytest.raises(ValueError, match="existing lesion"):
        make_plan(image, organ, organ="liver", seed=0, spacing=ANISO, lesion_mask=organ)
    with pytest.raises(ValueError, match="vessel_mask must be an array"):
        make_plan(image, organ, organ="liver", seed=0, spacing=ANISO, vessel_mask=organ[:-1])


def test_relaxed_placement_still_places_large_tumors(small_phantom):
    liver = small_phantom.mask("liver")
    vessels = small_phantom.mask("hepatic_vessel") | small_phantom.mask("postcava")
    for seed in range(4):
        plan = make_plan(
            small_phantom.image, liver, organ="liver", seed=seed, spacing=small_phantom.spacing,
            size="large", vessel_mask=vessels,
        )  # fmt: skip
        for t in plan.tumors:  # at worst the centre keeps the clearance
            c = np.asarray(t.center_vox)
            assert liver[tuple(c)] and not vessels[tuple(c)]


def test_organ_centre_classes_keep_the_centre(small_phantom):
    pan = small_phantom.mask("pancreas")
    aorta = small_phantom.mask("aorta")
    plan = make_plan(
        small_phantom.image, pan, organ="pancreas", seed=0, spacing=small_phantom.spacing,
        size="large", vessel_mask=aorta,
    )  # fmt: skip
    # the pancreas voxel nearest (mm) the box centre: the vessel mask does not move it
    c = np.array([(lo + hi - 1) // 2 for lo, hi in plan.organ_bbox])
    d = (((np.argwhere(pan) - c) * np.asarray(small_phantom.spacing)) ** 2).sum(axis=1)
    (t,) = plan.tumors
    assert pan[t.center_vox]
    assert (
        ((np.array(t.center_vox) - c) * np.asarray(small_phantom.spacing)) ** 2
    ).sum() == d.min()


# ------------------------------------------------------------------ determinism, classic


def test_same_seed_same_plan_with_masks(small_phantom):
    liver = small_phantom.mask("liver")
    vessels = small_phantom.mask("hepatic_vessel")
    lesion = np.zeros_like(liver)
    idx = np.argwhere(liver)
    c = idx[len(idx) // 3]
    lesion[c[0] - 3 : c[0] + 4, c[1] - 3 : c[1] + 4, c[2] - 2 : c[2] + 3] = True
    kw = dict(organ="liver", spacing=small_phantom.spacing, size="mix")
    a = make_plan(small_phantom.image, liver, seed=9, vessel_mask=vessels, lesion_mask=lesion, **kw)
    b = make_plan(small_phantom.image, liver, seed=9, vessel_mask=vessels, lesion_mask=lesion, **kw)
    assert a.to_json() == b.to_json()
    c2 = make_plan(
        small_phantom.image, liver, seed=10, vessel_mask=vessels, lesion_mask=lesion, **kw
    )
    assert a.to_json() != c2.to_json()
    assert Plan.from_json(a.to_json()).to_json() == a.to_json()


def test_avoidance_moves_tumors_and_changes_nothing_else(small_phantom):
    """Rejected draws use their own stream: with or without masks a seed gives the same
    tumors (sizes, shapes, contrast, texture), some of them moved."""
    liver = small_phantom.mask("liver")
    vessels = small_phantom.mask("hepatic_vessel") | small_phantom.mask("postcava")
    off = np.zeros_like(liver)
    moved = 0
    for seed in range(6):
        kw = dict(organ="liver", seed=seed, spacing=small_phantom.spacing, size="mix")
        a = make_plan(small_phantom.image, liver, vessel_mask=vessels, **kw).to_dict()
        b = make_plan(small_phantom.image, liver, vessel_mask=off, **kw).to_dict()
        assert len(a["tumors"]) == len(b["tumors"])
        for ta, tb in zip(a["tumors"], b["tumors"], strict=True):
            moved += ta.pop("center_vox") != tb.pop("center_vox")
            assert ta == tb
    assert moved > 0


def test_liver_classic_is_the_unconstrained_draw(small_phantom, monkeypatch):
    """liver-classic keeps the published placement: same plans with or without a vessel
    mask, and the same as drawing with every placement constraint switched off."""
    liver = small_phantom.mask("liver")
    vessels = small_phantom.mask("hepatic_vessel") | small_phantom.mask("postcava")
    sp = small_phantom.spacing
    plans = {}
    for seed in range(4):
        for size in ("mix", "large", None):
            with_v = make_plan(
                small_phantom.image, liver, organ="liver-classic", seed=seed, spacing=sp,
                size=size, vessel_mask=vessels,
            )  # fmt: skip
            plans[seed, size] = with_v.to_json()
            plain = make_plan(
                small_phantom.image, liver, organ="liver-classic", seed=seed, spacing=sp, size=size
            )
            assert plain.to_json() == plans[seed, size]
    overlap = any(
        g < 0 for k in plans if k[1] == "mix" for g in _sphere_gaps(Plan.from_json(plans[k]))
    )
    assert overlap  # confluent: mix tumors do overlap

    def unconstrained(self, draw, rng, retry_seed, radii, rot, *, fixed=False, label=""):
        return draw(rng)

    monkeypatch.setattr(_placement.Constraints, "place", unconstrained)
    for (seed, size), text in plans.items():
        ref = make_plan(
            small_phantom.image, liver, organ="liver-classic", seed=seed, spacing=sp, size=size
        )
        assert ref.to_json() == text


def test_older_plan_presets_still_read():
    d = load_preset("liver").to_dict()
    for k in ("vessel_clearance_mm", "gap_mm", "confluence"):
        d["placement"].pop(k)
    p = synthgen.presets.preset_from_dict(json.loads(json.dumps(d)))
    assert p.placement.vessel_clearance_mm == 3.0 and p.placement.confluence is False
    assert math.isclose(p.placement.gap_mm, 2.0)


def test_preset_keys_are_validated():
    d = load_preset("liver").to_dict()
    d["placement"]["vessel_clearance_mm"] = -1
    with pytest.raises(ValueError, match=r"placement\.vessel_clearance_mm"):
        synthgen.presets.preset_from_dict(d)
    d["placement"]["vessel_clearance_mm"] = 3
    d["placement"]["confluence"] = "yes"
    with pytest.raises(ValueError, match=r"placement\.confluence"):
        synthgen.presets.preset_from_dict(d)


def test_synthesizer_passes_masks(small_phantom):
    liver = small_phantom.mask("liver")
    everywhere = liver.copy()
    syn = synthgen.Synthesizer("liver", spacing=small_phantom.spacing)
    with pytest.raises(ValueError, match="existing lesion"):
        syn(small_phantom.image, liver, seed=0, lesion_mask=everywhere)
    with pytest.raises(ValueError, match="existing lesion"):
        synthgen.synthesize(
            small_phantom.image, liver, organ="liver", spacing=small_phantom.spacing, seed=0,
            lesion_mask=everywhere,
        )  # fmt: skip


# ------------------------------------------------------------------ batch wiring


def test_batch_loads_atlas_vessel_masks(tmp_path):
    from _datasets import phantom, write_dataset

    from synthgen.batch import BatchOptions, load_case
    from synthgen.layouts import discover

    root = write_dataset(tmp_path / "ds", "atlas1", n_cases=1)
    _, cases = discover(root, ["liver"])
    assert [s.path.name for s in cases[0].vessels] == ["aorta.nii.gz"]
    assert cases[0].to_dict()["vessels"][0]["path"].endswith("aorta.nii.gz")
    lc = load_case(cases[0], BatchOptions(organs=("liver",)))
    assert lc.vessels is not None and lc.vessels.dtype == bool
    assert np.array_equal(lc.vessels, phantom(0).mask("aorta"))


def test_bright_fallback_is_computed_once_per_scan_with_an_organ_index(small_phantom):
    """With an OrganIndex the fallback's labelling is cached per scan; plans are unchanged,
    and another image gets its own."""
    liver = small_phantom.mask("liver")
    idx = index_organ(liver)
    kw = dict(organ="liver", spacing=small_phantom.spacing, size="mix")
    for seed in (1, 2):
        a = make_plan(small_phantom.image, liver, seed=seed, organ_index=idx, **kw)
        b = make_plan(small_phantom.image, liver, seed=seed, **kw)
        assert a.to_json() == b.to_json()
    assert len(idx.cache) == 1
    (key,) = idx.cache
    other = small_phantom.image.copy()
    other[liver] += 5
    make_plan(other, liver, seed=1, organ_index=idx, **kw)
    assert len(idx.cache) == 1 and key not in idx.cache


def test_scalar_draws_are_numpys_bit_for_bit() -> None:
    """Planning's cheap scalar uniform is Generator.uniform: the same value and the same
    stream afterwards; the radius bound on Python floats is NumPy's."""
    from synthgen._draws import uniform
    from synthgen.planning import _row_norm

    a, b, r = np.random.default_rng(3), np.random.default_rng(3), np.random.default_rng(4)
    for i in range(20000):
        lo = float(r.uniform(-400.0, 400.0))
        hi = lo + float(r.uniform(0.0, 200.0)) * (1e-9 if i % 5 == 0 else 1.0)
        assert uniform(a, lo, hi) == float(b.uniform(lo, hi))
    assert uniform(a, 2, 9) == float(b.uniform(2, 9))  # integer bounds
    for lo, hi, err in ((2.0, 1.0, ValueError), (0.0, np.inf, OverflowError)):
        with pytest.raises(err):
            b.uniform(lo, hi)
        with pytest.raises(err):
            uniform(a, lo, hi)
    assert a.random() == b.random()
    for _ in range(2000):
        row, radii = r.normal(size=3), r.uniform(0.5, 40.0, 3)
        want = float(np.sqrt(((row * radii) ** 2).sum()))
        assert _row_norm(row.tolist(), radii.tolist()) == want


def test_compiled_seeds_and_erosion_window_are_the_reference() -> None:
    """The tumor seeds of a plan from one compiled call are derive_seed's; the placement's
    erosion test is the window's all()."""
    from synthgen._cpu_kernels import window_all
    from synthgen._hash import derive_seed, derive_seeds

    r = np.random.default_rng(9)
    for seed in [0, 1, 2**63 - 1, 2**64 - 1, *r.integers(0, 2**62, 40).tolist()]:
        n = int(r.integers(0, 60))
        assert derive_seeds(seed, n) == [derive_seed(seed, i) for i in range(n)]
    for _ in range(500):
        m = r.random((12, 9)) < 0.93
        a0, b0 = int(r.integers(0, 11)), int(r.integers(0, 8))
        a1, b1 = int(r.integers(a0 + 1, 13)), int(r.integers(b0 + 1, 10))
        assert window_all(m, a0, a1, b0, b1) == bool(m[a0:a1, b0:b1].all())
