"""Synthesis on a real abdominal CT: the TotalSegmentator example (3 mm, int16, RAS).

Data: ``example_ct_sm.nii.gz`` / ``example_seg.nii.gz`` from the Apache-2.0 source
distribution of ``totalsegmentator==2.18.0`` (Wasserthal et al., Radiology: AI 2023), fetched
from PyPI once and cached (``tests/_realdata.py``). Label ids: 2 kidney_right, 3 kidney_left,
5 liver, 7 pancreas. The masks are the tool's predictions, fine for implanting tumors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

import synthgen
from synthgen.mass_effect import prepare_render

pytestmark = pytest.mark.network

LIVER, PANCREAS, KIDNEYS = (5,), (7,), (2, 3)


def _synth(ct, ids, preset, seed, size=None, **kw):
    m = ct.mask(*ids)
    res = synthgen.synthesize(
        ct.image, m, organ=preset, seed=seed, size=size, affine=ct.affine, **kw
    )
    return m, res


def test_fixture_is_the_documented_scan(totalseg) -> None:
    assert totalseg.image.shape == (122, 101, 30)
    assert totalseg.image.dtype == np.int16
    np.testing.assert_allclose(np.linalg.norm(totalseg.affine[:3, :3], axis=0), 3.0)
    assert int(totalseg.mask(*LIVER).sum()) == 38634
    assert int(totalseg.mask(*PANCREAS).sum()) == 644
    assert totalseg.mask(*KIDNEYS).sum() > 1000


@pytest.mark.parametrize(
    ("preset", "ids", "size", "seeds"),
    [
        ("liver", LIVER, None, (0, 1, 2)),
        ("liver", LIVER, "mix", (0,)),
        ("liver-classic", LIVER, None, (0, 1)),
        ("liver-classic", LIVER, "large", (0,)),
        ("kidney", KIDNEYS, "small", (0, 1)),
        ("pancreas", PANCREAS, "tiny", (0, 1, 2)),
        ("pancreas", PANCREAS, "small", (0, 1)),
        ("pancreas", PANCREAS, None, (0,)),
    ],
)
def test_clipped_tumors_on_real_ct(totalseg, preset, ids, size, seeds) -> None:
    for seed in seeds:
        m0, res = _synth(totalseg, ids, preset, seed, size)
        # the scan the engine rendered: warped first where the preset's mass effect pushes
        img, m = _rendered_scan(res.plan, totalseg.image, m0)
        assert res.plan.spacing == (3.0, 3.0, 3.0)  # read from the affine
        assert res.image.dtype == np.int16 and res.image.shape == img.shape
        tm = res.tumor_mask
        assert tm.any(), (preset, seed)
        assert all(t.clipped for t in res.tumors)
        assert not (tm & ~m).any()
        changed = img != res.image
        assert changed.any()
        assert not (changed & ~m).any()
        # the scan holds -1100 HU padding; what the render writes is in [-1024, 3071]
        assert -1024 <= int(res.image[changed].min()) <= int(res.image[changed].max()) <= 3071
        np.testing.assert_array_equal(res.label == 2, tm)
        np.testing.assert_array_equal(res.label == 1, m & ~tm)
        drop = img.astype(np.float64) - res.image
        for t in res.tumors:
            assert t.volume_mm3 == pytest.approx(27.0 * t.voxels)
            world = totalseg.affine @ np.append(np.asarray(t.center_vox, float), 1.0)
            assert t.center_mm == pytest.approx(tuple(world[:3]))
            if t.voxels == 0:
                continue
            box = tuple(slice(a, b) for a, b in t.box)
            assert t.mean_contrast_hu == pytest.approx(
                float(drop[box][_tumor_mask_of(res, t)].mean()), abs=1e-9
            )
            if t.contrast_hu > 0:  # hypodense: never brighter
                assert t.mean_contrast_hu >= 0
            else:
                assert t.mean_contrast_hu <= 0
        hypo = [t for t in res.tumors if t.contrast_hu > 0 and t.voxels]
        if hypo:
            weighted = sum(t.mean_contrast_hu * t.voxels for t in hypo)
            assert weighted > 0


def _rendered_scan(plan, image, organ_mask):
    """Image and organ mask as the engine saw them (after the preset's mass effect)."""
    prep = prepare_render(plan, image, organ_mask)
    return np.asarray(prep.image), np.asarray(prep.organ_mask)


def _tumor_mask_of(res, rec) -> np.ndarray:
    live = [t for t in res.tumors if t.box]
    return res.boxes[live.index(rec)][1]


def test_liver_relative_contrast_follows_the_scan(totalseg) -> None:
    """The default liver preset measures the liver (about 45 HU here) for its contrast."""
    _, res = _synth(totalseg, LIVER, "liver", 1, "medium")
    assert 30.0 <= res.plan.organ_hu <= 60.0
    pre = synthgen.load_preset("liver").contrast
    for t in res.tumors:
        d = abs(t.contrast_hu)
        assert pre.delta_hu[0] <= d <= pre.delta_hu[1]
        if d > pre.delta_hu[0]:
            f = d / (res.plan.organ_hu - pre.reference_hu)
            assert pre.fraction[0] - 1e-9 <= f <= pre.fraction[1] + 1e-9


def test_kidney_exophytic_on_real_ct(totalseg) -> None:
    kid = totalseg.mask(*KIDNEYS)
    for seed in range(40):
        plan = synthgen.plan(
            totalseg.image, kid, organ="kidney", seed=seed, affine=totalseg.affine, size="large"
        )
        if any(not t.clip_to_organ for t in plan.tumors):
            break
    else:
        raise AssertionError("no exophytic kidney tumor in 40 seeds")
    res = synthgen.render(plan, totalseg.image, kid, affine=totalseg.affine)
    image, kid = _rendered_scan(plan, totalseg.image, kid)
    assert res.image.dtype == np.int16
    tm = res.tumor_mask
    assert (tm & ~kid).any(), "an exophytic large tumor leaves the kidney"
    sigma = max(t.blur_sigma_mm for t in plan.tumors)
    r = 2 * int(3.0 * sigma / 3.0 + 0.5) + 1
    region = kid | (ndimage.maximum_filter(tm.view(np.uint8), size=r, mode="constant") > 0)
    changed = image != res.image
    assert changed.any()
    assert not (changed & ~region).any()


def test_pancreas_large_fits_the_small_real_pancreas(totalseg) -> None:
    """644 voxels (17.4 mL) pass the volume check for the large class: tumors are placed at
    the pancreas voxel nearest the bounding-box centre and clipped to the pancreas."""
    pan = totalseg.mask(*PANCREAS)
    organ_ml = 644 * 27.0 / 1000.0
    assert organ_ml > 4.0 / 3.0 * math.pi * 14.0**3 / 1000.0
    for seed in range(3):
        _, res = _synth(totalseg, PANCREAS, "pancreas", seed, "large")
        bbox = res.plan.organ_bbox
        centre = np.array([(lo + hi - 1) // 2 for lo, hi in bbox])
        (t,) = res.plan.tumors
        assert pan[t.center_vox]
        sp = np.linalg.norm(totalseg.affine[:3, :3], axis=0)
        dist = np.sqrt((((np.argwhere(pan) - centre) * sp) ** 2).sum(axis=1)).min()
        assert np.sqrt((((np.array(t.center_vox) - centre) * sp) ** 2).sum()) == dist
        assert res.tumor_mask.any()
        image, organ = _rendered_scan(res.plan, totalseg.image, pan)
        assert not (res.tumor_mask & ~organ).any()
        assert not ((image != res.image) & ~organ).any()


def test_pancreas_too_small_for_liver_classic_large(totalseg) -> None:
    """The documented 'organ too small' error: 17.4 mL is below a 24 mm tumor (57.9 mL)."""
    with pytest.raises(ValueError, match=r"organ too small for class 'large'.*17388 mm\^3"):
        _synth(totalseg, PANCREAS, "liver-classic", 0, "large")


def test_fortran_ordered_nifti_arrays_match_c_order(totalseg) -> None:
    """nibabel hands out Fortran-ordered arrays; the result does not depend on the layout."""
    assert not totalseg.image.flags.c_contiguous
    m = totalseg.mask(*LIVER)
    a = synthgen.synthesize(
        totalseg.image, m, organ="liver-classic", seed=3, size="small", affine=totalseg.affine
    )
    b = synthgen.synthesize(
        np.ascontiguousarray(totalseg.image), np.ascontiguousarray(m), organ="liver-classic",
        seed=3, size="small", affine=totalseg.affine,
    )  # fmt: skip
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    # in place into a Fortran-ordered buffer
    work = np.asfortranarray(totalseg.image.copy())
    c = synthgen.synthesize(
        work, m, organ="liver-classic", seed=3, size="small", affine=totalseg.affine, out=work
    )
    assert c.image is work
    np.testing.assert_array_equal(work, b.image)
