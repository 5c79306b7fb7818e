"""Bad inputs raise ValueError with a message that says what is wrong."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest

import synthgen
from synthgen import Plan, PresetError

SP = (2.5, 2.5, 3.0)


@pytest.fixture(scope="module")
def scan(small_phantom):
    return small_phantom.image, small_phantom.mask("liver")


def _synth(image, mask, **kw):
    args = {"organ": "liver-classic", "spacing": SP, "seed": 0}
    args.update(kw)
    return synthgen.synthesize(image, mask, **args)


def test_shape_mismatch(scan) -> None:
    img, m = scan
    with pytest.raises(ValueError, match=r"shape mismatch.*\(160, 128, 112\).*\(160, 128, 111\)"):
        _synth(img, m[:, :, :-1])
    with pytest.raises(ValueError, match="shape mismatch"):
        synthgen.plan(img[1:], m, organ="liver", seed=0, spacing=SP)


def test_empty_organ_mask(scan) -> None:
    img, m = scan
    with pytest.raises(ValueError, match="organ mask is empty"):
        _synth(img, np.zeros_like(m))
    # numbers are binarised at > 0.5: a mask of 0.4 is empty too
    with pytest.raises(ValueError, match="organ mask is empty"):
        _synth(img, np.where(m, 0.4, 0.0).astype(np.float32))


def test_organ_too_small_for_class(scan) -> None:
    img, _ = scan
    tiny = np.zeros(img.shape, dtype=bool)
    tiny[80, 60, 50:53] = True  # 3 voxels, 56 mm^3
    with pytest.raises(ValueError, match=r"organ too small for class 'large'.*24 mm radius"):
        _synth(img, tiny, size="large")
    with pytest.raises(ValueError, match="organ too small"):
        _synth(img, tiny, size="tiny")  # 3 mm radius: 113 mm^3 > 56 mm^3


def test_small_organ_still_takes_small_tumors(scan) -> None:
    img, _ = scan
    organ = np.zeros(img.shape, dtype=bool)
    organ[78:83, 58:63, 48:53] = True  # 5^3 voxels = 2.3 mL
    res = _synth(img, organ, size="tiny")
    assert res.tumor_mask.any()
    assert not (res.tumor_mask & ~organ).any()
    with pytest.raises(ValueError, match="organ too small for class 'large'"):
        _synth(img, organ, size="large")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_inside_organ_bbox(scan, bad: float) -> None:
    img, m = scan
    f = img.astype(np.float32)
    idx = np.argwhere(m)
    f[tuple(idx[len(idx) // 2])] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        _synth(f, m)
    # also when the bad voxel is in the bounding box but outside the organ itself
    lo = idx.min(axis=0)
    g = img.astype(np.float64)
    assert not m[tuple(lo)]
    g[tuple(lo)] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        _synth(g, m)


def test_nan_far_from_organ_is_tolerated(scan) -> None:
    img, m = scan
    f = img.astype(np.float32)
    f[0, 0, 0] = np.nan  # air corner, far outside the liver's bounding box
    res = _synth(f, m, size="small")
    assert np.isnan(res.image[0, 0, 0])
    assert np.isfinite(res.image[m]).all()


@pytest.mark.parametrize("ndim", [2, 4])
def test_non_3d_arrays(scan, ndim: int) -> None:
    img, m = scan
    if ndim == 2:
        a, b = img[:, :, 50], m[:, :, 50]
    else:
        a, b = img[None], m[None]
    with pytest.raises(ValueError, match=re.escape(f"image must be 3-D, got shape {a.shape}")):
        _synth(a, b)
    with pytest.raises(ValueError, match="organ_mask must be 3-D"):
        _synth(img, b)


def test_not_an_array(scan) -> None:
    _, m = scan
    with pytest.raises(ValueError, match="image must be an array, got list"):
        _synth([[[0.0]]], m)
    cube = np.ones((4, 4, 4), dtype=bool)
    with pytest.raises(ValueError, match="image must be numeric"):
        _synth(np.full((4, 4, 4), "a"), cube)


@pytest.mark.parametrize(
    "spacing",
    [(1.0, 0.0, 1.0), (1.0, -2.5, 3.0), (np.nan, 1.0, 1.0), (1.0, 1.0, np.inf)],
)
def test_non_positive_or_nan_spacing(scan, spacing) -> None:
    img, m = scan
    with pytest.raises(ValueError, match="spacing must be positive and finite"):
        _synth(img, m, spacing=spacing)


def test_spacing_needs_three_values(scan) -> None:
    img, m = scan
    with pytest.raises(ValueError, match="spacing must have 3 values"):
        _synth(img, m, spacing=(1.0, 1.0))


def test_no_spacing_and_no_affine(scan) -> None:
    img, m = scan
    with pytest.raises(ValueError, match=r"spacing=\.\.\.\) or an affine"):
        _synth(img, m, spacing=None)
    with pytest.raises(ValueError, match=r"affine must be 4x4"):
        _synth(img, m, spacing=None, affine=np.eye(3))
    # a singular affine gives a zero spacing
    aff = np.diag([2.5, 0.0, 3.0, 1.0])
    with pytest.raises(ValueError, match="spacing must be positive"):
        _synth(img, m, spacing=None, affine=aff)


@pytest.mark.parametrize("organ", ["lung", "liver-modern"])
def test_unknown_organ_or_preset(scan, organ: str) -> None:
    img, m = scan
    with pytest.raises(ValueError, match=f"unknown organ or preset '{organ}'") as info:
        _synth(img, m, organ=organ)
    assert "liver-classic" in str(info.value) and "pancreas" in str(info.value)
    with pytest.raises(ValueError, match="unknown organ or preset"):
        synthgen.Synthesizer(organ)


def test_invalid_preset_file(scan, tmp_path: Path) -> None:
    img, m = scan
    path = tmp_path / "bad.toml"
    path.write_text(
        'name = "bad"\norgan = "liver"\n[classes.tiny]\ncount = [3, 1]\nradius_mm = [1, 2]\n'
        "[mix]\ntiny = 1\n",
        encoding="utf-8",
    )
    with pytest.raises(PresetError, match=r"bad\.toml: \[classes\.tiny\.count\] low 3\.0"):
        _synth(img, m, organ=path)


@pytest.mark.parametrize("size", ["huge", "Tiny", ""])
def test_unknown_size_class(scan, size: str) -> None:
    img, m = scan
    with pytest.raises(ValueError, match=f"no size class '{size}'; valid: tiny, small"):
        _synth(img, m, size=size)
    with pytest.raises(ValueError, match="no size class"):
        synthgen.Synthesizer("liver", size=size)


@pytest.mark.parametrize("seed", [-1, -(2**40), 1.5, "7", None])
def test_bad_seed(scan, seed) -> None:
    img, m = scan
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        _synth(img, m, seed=seed)


def test_numpy_integer_seed_is_accepted(scan) -> None:
    img, m = scan
    a = synthgen.plan(img, m, organ="liver", seed=np.int64(5), spacing=SP)
    b = synthgen.plan(img, m, organ="liver", seed=5, spacing=SP)
    assert a.to_json() == b.to_json()


def test_render_plan_for_another_shape(scan) -> None:
    img, m = scan
    plan = synthgen.plan(img, m, organ="liver-classic", seed=0, spacing=SP, size="small")
    with pytest.raises(ValueError, match=r"plan is for shape \(160, 128, 112\), image is"):
        synthgen.render(plan, img[:, :, :100], m[:, :, :100])
    with pytest.raises(ValueError, match=r"plan is for shape"):
        synthgen.render(plan, img.transpose(1, 0, 2), m.transpose(1, 0, 2))


def test_render_bad_out(scan) -> None:
    img, m = scan
    plan = synthgen.plan(img, m, organ="liver-classic", seed=0, spacing=SP, size="small")
    with pytest.raises(ValueError, match="out has dtype float32, image has int16"):
        synthgen.render(plan, img, m, out=img.astype(np.float32))
    with pytest.raises(ValueError, match="out must be a NumPy array with the image's shape"):
        synthgen.render(plan, img, m, out=np.zeros((3, 3, 3), np.int16))
    # big-endian or float16 arrays name the caller's dtypes, nothing is written
    for image, out in ((img.astype(">i2"), img.astype(np.float32)), (img, img.astype(">f4")),
                       (img.astype(np.float16), img.astype(">i2"))):  # fmt: skip
        before = out.copy()
        with pytest.raises(ValueError, match=f"out has dtype {out.dtype}, image has {image.dtype}"):
            synthgen.render(plan, image, m, out=out)
        with pytest.raises(ValueError, match=f"out has dtype {out.dtype}, image has {image.dtype}"):
            _synth(image, m, out=out)
        assert out.tobytes() == before.tobytes()
    with pytest.raises(ValueError, match="out must be a NumPy array with the image's shape"):
        synthgen.render(plan, img.astype(">i2"), m, out=np.zeros((3, 3, 3), ">i2"))


def test_unknown_device(scan) -> None:
    img, m = scan
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        _synth(img, m, device="gpu")


def test_unsupported_plan_version(scan) -> None:
    img, m = scan
    d = synthgen.plan(img, m, organ="liver", seed=0, spacing=SP).to_dict()
    d["version"] = 99
    with pytest.raises(ValueError, match="unsupported plan version 99"):
        Plan.from_dict(d)


def test_boolean_seed_is_rejected(small_phantom) -> None:
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        synthgen.synthesize(
            small_phantom.image,
            small_phantom.mask("liver"),
            organ="liver",
            affine=small_phantom.affine,
            seed=True,
        )


def _read_only(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flags.writeable = False
    return a


def test_read_only_out_or_label_out_is_refused_before_writing(scan) -> None:
    # A read-only out raised numba's typing error from the write-back; a read-only label_out
    # raised only after the image (out) was written, and with a mass effect after the warp.
    img, m = scan
    plan = synthgen.plan(img, m, organ="liver-classic", seed=0, spacing=SP, size="small")
    ro = _read_only(img)
    with pytest.raises(ValueError, match="out is read-only"):
        synthgen.render(plan, img, m, out=ro)
    with pytest.raises(ValueError, match="out is read-only"):
        synthgen.render_batch([plan, plan], img, m, outs=[img.copy(), ro])
    with pytest.raises(ValueError, match="out is read-only"):
        _synth(img, m, out=ro)
    with pytest.raises(ValueError, match="out is read-only"):
        _synth(img.astype(np.float16), m, out=_read_only(img.astype(np.float16)))
    lab = _read_only(m.astype(np.uint8))
    for organ, size in (("liver-classic", "small"), ("liver", "large")):  # (liver: mass effect)
        out = img.copy()
        with pytest.raises(ValueError, match="label_out is read-only"):
            _synth(img, m, organ=organ, size=size, seed=1, out=out, label_out=lab)
        assert out.tobytes() == img.tobytes()


def test_read_only_out_is_refused_before_planning(scan, monkeypatch) -> None:
    img, m = scan

    def planning(*a, **k):
        raise AssertionError("planned for a read-only out")

    monkeypatch.setattr(synthgen.api, "make_plan", planning)
    with pytest.raises(ValueError, match="out is read-only"):
        _synth(img, m, out=_read_only(img))
    with pytest.raises(ValueError, match="label_out is read-only"):
        _synth(img, m, out=img.copy(), label_out=_read_only(m.astype(np.uint8)))


@pytest.mark.parametrize(
    ("field", "value", "word"),
    [
        ("radii_mm", [-4.0, 5.0, 5.0], "positive"),
        ("radii_mm", [4.0, float("nan"), 5.0], "finite"),
        ("blur_sigma_mm", float("nan"), "finite"),
        ("blur_sigma_mm", -1.0, "negative"),
        ("center_vox", [10.5, 20, 30], "integer"),
        ("rotation", [1.0, 0.0, 0.0], "9 numbers"),
        ("contrast_hu", "dark", "numbers"),
    ],
)
def test_hand_edited_plan_numbers_are_checked(scan, field, value, word) -> None:
    """A plan read from JSON has its tumors' numbers checked, naming tumor and field (a
    negative radius rendered, a NaN blur failed deep in the render)."""
    img, m = scan
    d = synthgen.plan(img, m, organ="liver-classic", seed=0, spacing=SP).to_dict()
    d["tumors"][0][field] = value
    with pytest.raises(ValueError, match=f"tumor 0: {field} .*{word}"):
        Plan.from_dict(d)


def test_plan_from_a_path_given_as_a_string(scan, tmp_path: Path) -> None:
    img, m = scan
    p = synthgen.plan(img, m, organ="liver-classic", seed=0, spacing=SP)
    f = tmp_path / "plan.json"
    f.write_text(p.to_json(), encoding="utf-8")
    assert Plan.from_json(str(f)) == p == Plan.from_json(f) == Plan.from_json(p.to_json())


def test_organ_index_of_another_type(scan) -> None:
    img, m = scan
    with pytest.raises(ValueError, match="organ_index must be an OrganIndex"):
        synthgen.plan(img, m, organ="liver-classic", seed=0, spacing=SP, organ_index=5)


def test_boolean_spacing_is_rejected(scan) -> None:
    img, m = scan
    for sp in ((True, True, True), np.ones(3, bool)):
        with pytest.raises(ValueError, match="spacing must be numbers"):
            synthgen.plan(img, m, organ="liver-classic", seed=0, spacing=sp)


def test_spacing_against_the_affine_and_8_bit_images_warn(scan) -> None:
    img, m = scan
    aff = np.diag([*SP, 1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # consistent: no warning
        synthgen.plan(img, m, organ="liver-classic", seed=0, spacing=SP, affine=aff)
    with pytest.warns(UserWarning, match="differs from the affine"):
        synthgen.plan(img, m, organ="liver-classic", seed=0, spacing=(1.0, 1.0, 1.0), affine=aff)
    with pytest.warns(UserWarning, match="cannot hold CT values"):
        synthgen.plan(np.clip(img, 0, 255).astype(np.uint8), m, organ="liver-classic", seed=0,
                      spacing=SP)  # fmt: skip


def test_no_room_is_a_placement_error_and_adapters_leave_such_patches_alone(scan) -> None:
    """Planning's "no room" errors (empty organ, organ too small) are PlacementError, a
    ValueError: the training adapters leave such a patch as it is and raise every other
    planning error (NaN in the organ, a bad affine) instead of giving no tumors."""
    from synthgen.augment import affine_for, implant_tumors
    from synthgen.planning import PlacementError

    img, m = scan
    tiny = np.zeros(img.shape, dtype=bool)
    tiny[80, 60, 50:53] = True
    with pytest.raises(PlacementError, match="organ too small"):
        _synth(img, tiny, size="large")
    with pytest.raises(PlacementError, match="organ mask is empty"):
        _synth(img, np.zeros_like(m))
    kw = dict(synthesizer=synthgen.Synthesizer("liver-classic"), organ_labels=[1], tumor_label=2,
              seed=0, affine=affine_for((1.0, 1.0, 1.0)), min_organ_voxels=0)  # fmt: skip
    empty = implant_tumors(img, np.zeros(img.shape, np.uint8), **kw)
    assert empty.plan is None and np.array_equal(empty.image, img)
    f = img.astype(np.float32)
    f[tuple(np.argwhere(m)[0])] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        implant_tumors(f, m.astype(np.uint8), **kw)
