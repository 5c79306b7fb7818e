"""Tests for synthgen.phantom (deterministic abdominal CT phantoms)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from synthgen.phantom import LABELS, Phantom, benchmark_phantom, make_phantom

# 3 mm isotropic grid covering the full 384 x 300 x 321 mm field of view: fast (< 0.2 s).
COARSE_SHAPE = (128, 100, 107)
COARSE_SPACING = (3.0, 3.0, 3.0)

BENCH_LIVER_ML = 4.0 / 3.0 * np.pi * 85 * 70 * 65 / 1000.0  # 1620 mL


@pytest.fixture(scope="module")
def coarse() -> Phantom:
    return make_phantom(COARSE_SHAPE, COARSE_SPACING, seed=0)


@pytest.fixture(scope="module")
def default() -> Phantom:
    return make_phantom()


@pytest.fixture(scope="module")
def bench() -> Phantom:
    return benchmark_phantom()


def _centroid_mm(p: Phantom, name: str) -> np.ndarray:
    idx = np.argwhere(p.mask(name)).mean(axis=0)
    return (p.affine @ np.append(idx, 1.0))[:3]


# ------------------------------------------------------------------------------- determinism


def test_same_seed_identical_bytes(coarse: Phantom) -> None:
    again = make_phantom(COARSE_SHAPE, COARSE_SPACING, seed=0)
    assert again.image.tobytes() == coarse.image.tobytes()
    assert again.labels.tobytes() == coarse.labels.tobytes()
    np.testing.assert_array_equal(again.affine, coarse.affine)


def test_different_seed_changes_noise_only(coarse: Phantom) -> None:
    other = make_phantom(COARSE_SHAPE, COARSE_SPACING, seed=1)
    assert other.image.tobytes() != coarse.image.tobytes()
    np.testing.assert_array_equal(other.labels, coarse.labels)
    # Outside the body there is no noise: air is exactly -1000 HU for every seed.
    outside = coarse.image[:, 0, :]  # posterior edge of the FOV lies outside the body
    np.testing.assert_array_equal(outside, -1000)
    np.testing.assert_array_equal(other.image[:, 0, :], outside)


def test_global_rng_untouched_and_ignored() -> None:
    # The legacy global RNG is neither consumed nor used: noise comes from default_rng(seed).
    np.random.seed(123)  # noqa: NPY002
    state = np.random.get_state()[1].copy()  # noqa: NPY002
    a = make_phantom((40, 32, 24), (8.0, 8.0, 12.0), seed=5)
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # noqa: NPY002
    np.random.seed(999)  # noqa: NPY002
    b = make_phantom((40, 32, 24), (8.0, 8.0, 12.0), seed=5)
    assert a.image.tobytes() == b.image.tobytes()


def test_benchmark_deterministic() -> None:
    a = benchmark_phantom((64, 64, 48), seed=3)
    b = benchmark_phantom((64, 64, 48), seed=3)
    c = benchmark_phantom((64, 64, 48), seed=4)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.image.tobytes() != c.image.tobytes()


# --------------------------------------------------------------------------- layout and API


def test_dtype_shape_affine(coarse: Phantom, default: Phantom) -> None:
    for p, shape, spacing in (
        (coarse, COARSE_SHAPE, COARSE_SPACING),
        (default, (192, 160, 128), (2.0, 2.0, 2.5)),
    ):
        assert p.image.dtype == np.int16
        assert p.labels.dtype == np.uint8
        assert p.image.shape == shape
        assert p.labels.shape == shape
        assert p.spacing == spacing
        assert all(isinstance(s, float) for s in p.spacing)
        assert p.affine.dtype == np.float64
        assert p.affine.shape == (4, 4)
        np.testing.assert_allclose(np.diag(p.affine)[:3], spacing)
        np.testing.assert_allclose(p.affine[3], [0, 0, 0, 1])
        assert np.count_nonzero(p.affine[:3, :3] - np.diag(np.diag(p.affine)[:3])) == 0
        centre = (np.array(shape) - 1) / 2.0
        np.testing.assert_allclose(p.affine @ np.append(centre, 1.0), [0, 0, 0, 1], atol=1e-9)


def test_default_fov_covers_reference_fov(default: Phantom) -> None:
    fov = np.array(default.image.shape) * np.array(default.spacing)
    assert np.all(fov >= np.array([380.0, 300.0, 320.0]))


def test_label_names_and_masks(coarse: Phantom) -> None:
    expected = {
        "liver",
        "spleen",
        "pancreas",
        "kidney_left",
        "kidney_right",
        "aorta",
        "postcava",
        "hepatic_vessel",
        "colon",
        "esophagus",
        "uterus",
        "spine",
    }
    assert expected <= set(LABELS)
    assert "body" not in LABELS
    assert len(set(LABELS.values())) == len(LABELS)
    assert 0 not in LABELS.values()
    assert set(coarse.organ_names) == set(LABELS)
    assert set(np.unique(coarse.labels)) <= {0, *LABELS.values()}
    kid = coarse.mask("kidney")
    np.testing.assert_array_equal(kid, coarse.mask("kidney_left") | coarse.mask("kidney_right"))
    assert kid.dtype == bool
    assert not np.any(coarse.mask("kidney_left") & coarse.mask("kidney_right"))


def test_unknown_name_raises(coarse: Phantom) -> None:
    with pytest.raises(ValueError, match="liver") as info:
        coarse.mask("gallbladder")
    assert "kidney_left" in str(info.value)


def test_absent_structure_gives_empty_mask() -> None:
    # A thin slab around the kidneys has no uterus and no esophagus.
    p = make_phantom((96, 76, 4), (4.0, 4.0, 4.0), seed=0)
    assert not p.mask("uterus").any()
    assert "uterus" not in p.organ_names
    assert "kidney_left" in p.organ_names


# ------------------------------------------------------------------------------ anatomy / HU


@pytest.mark.parametrize(
    ("name", "lo_ml", "hi_ml"),
    [
        ("liver", 1200.0, 2000.0),
        ("spleen", 100.0, 350.0),
        ("pancreas", 40.0, 150.0),
        ("kidney_left", 100.0, 250.0),
        ("kidney_right", 100.0, 250.0),
        ("uterus", 60.0, 250.0),
        ("aorta", 30.0, 200.0),
        ("postcava", 30.0, 200.0),
        ("hepatic_vessel", 5.0, 100.0),
        ("colon", 200.0, 2000.0),
        ("esophagus", 3.0, 60.0),
        ("stomach", 100.0, 1000.0),
        ("spine", 150.0, 1000.0),
    ],
)
def test_volumes(default: Phantom, name: str, lo_ml: float, hi_ml: float) -> None:
    vol = default.volume_ml(name)
    assert lo_ml <= vol <= hi_ml, f"{name}: {vol:.1f} mL"
    expected = np.count_nonzero(default.mask(name)) * np.prod(default.spacing) / 1000.0
    assert vol == pytest.approx(expected)


@pytest.mark.parametrize(
    ("name", "lo_hu", "hi_hu"),
    [
        ("liver", 85, 115),
        ("spleen", 95, 135),
        ("pancreas", 95, 115),
        ("kidney_left", 140, 190),
        ("kidney_right", 140, 190),
        ("aorta", 160, 210),
        ("postcava", 120, 160),
        ("hepatic_vessel", 150, 200),
        ("uterus", 75, 105),
        ("spine", 200, 750),
    ],
)
def test_median_hu(default: Phantom, name: str, lo_hu: int, hi_hu: int) -> None:
    med = float(np.median(default.image[default.mask(name)]))
    assert lo_hu <= med <= hi_hu, f"{name}: median {med} HU"


def test_body_layers_and_air(default: Phantom) -> None:
    img = default.image
    assert np.all(img[:, 0, :] == -1000)  # posterior edge row of the FOV is outside the body
    assert np.all(img[0, :, :] == -1000)
    # Subcutaneous fat, muscle ring and spine bone are present with plausible HU.
    unl = img[default.labels == 0]
    assert np.count_nonzero((unl > -130) & (unl < -70)) > 0.05 * unl.size
    assert np.count_nonzero((unl > 30) & (unl < 70)) > 0.05 * unl.size
    assert np.percentile(img[default.mask("spine")], 95) > 600


def test_noise_level(default: Phantom) -> None:
    liver = default.image[default.mask("liver")].astype(np.float64)
    assert 8.0 < liver.std() < 12.0
    assert abs(liver.mean() - 100.0) < 1.5
    assert np.all(default.image >= -1024)


@pytest.mark.parametrize("name", ["colon", "esophagus"])
@pytest.mark.parametrize("which", ["coarse", "default"])
def test_hollow_organs_have_gas_and_wall(
    name: str, which: str, coarse: Phantom, default: Phantom
) -> None:
    p = coarse if which == "coarse" else default
    vals = p.image[p.mask(name)]
    assert np.count_nonzero(vals < -500) > 0, "no gas in the lumen"
    assert np.count_nonzero(vals > -50) > 0, "no wall / fluid voxels"
    if name == "colon":
        assert np.count_nonzero(vals < -500) > 0.3 * vals.size  # mostly gas
        wall = vals[vals > -50]
        assert 0 < np.median(wall) < 60


def test_anatomical_positions(coarse: Phantom) -> None:
    # RAS+: +x = patient right, +y = anterior, +z = superior.
    liver = _centroid_mm(coarse, "liver")
    spleen = _centroid_mm(coarse, "spleen")
    spine = _centroid_mm(coarse, "spine")
    assert liver[0] > 30.0 > -30.0 > spleen[0]
    assert _centroid_mm(coarse, "kidney_right")[0] > 30.0
    assert _centroid_mm(coarse, "kidney_left")[0] < -30.0
    assert spine[1] < -30.0 and abs(spine[0]) < 5.0
    assert _centroid_mm(coarse, "aorta")[0] < 0.0 < _centroid_mm(coarse, "postcava")[0]
    assert _centroid_mm(coarse, "esophagus")[2] > 80.0
    assert _centroid_mm(coarse, "uterus")[2] < -80.0
    # Hepatic vessels lie within the liver's bounding box.
    hv = np.argwhere(coarse.mask("hepatic_vessel"))
    lv = np.argwhere(coarse.mask("liver"))
    assert np.all(hv.min(0) >= lv.min(0)) and np.all(hv.max(0) <= lv.max(0))


def test_anisotropic_spacing_preserves_physical_size(default: Phantom) -> None:
    aniso = make_phantom((480, 380, 64), (0.8, 0.8, 5.0), seed=0)
    for name in ("liver", "kidney", "spleen", "pancreas"):
        ref = default.volume_ml(name)
        assert aniso.volume_ml(name) == pytest.approx(ref, rel=0.10), name
    np.testing.assert_allclose(np.diag(aniso.affine)[:3], (0.8, 0.8, 5.0))


def test_small_fov_crops(default: Phantom) -> None:
    crop = make_phantom((96, 80, 64), (2.0, 2.0, 2.5), seed=0)  # central quarter in x, y, z
    assert crop.volume_ml("aorta") < default.volume_ml("aorta")
    assert crop.volume_ml("uterus") == 0.0


def test_make_phantom_speed() -> None:
    t0 = time.perf_counter()
    make_phantom()
    assert time.perf_counter() - t0 < 3.0


# ---------------------------------------------------------------------------- benchmark


def test_benchmark_phantom(bench: Phantom) -> None:
    assert bench.image.shape == (320, 320, 224)
    assert bench.image.dtype == np.int16 and bench.labels.dtype == np.uint8
    assert bench.spacing == (1.0, 1.0, 1.0)
    assert set(np.unique(bench.labels)) == {0, LABELS["liver"]}
    assert bench.organ_names == ("liver",)
    liver = bench.mask("liver")
    assert bench.volume_ml("liver") == pytest.approx(BENCH_LIVER_ML, rel=0.03)
    assert 1550.0 < bench.volume_ml("liver") < 1700.0
    # Body elliptic cylinder: centre (160, 160), semi-axes 150 (x) and 120 (y), 25 HU.
    img = bench.image
    assert np.all(img[160, 160, :] > -500)
    assert np.all(img[5, :, :] == -1000)  # x = 5 is outside (body spans x 10..310)
    assert np.all(img[:, 30, :] == -1000)  # y = 30 is outside (body spans y 40..280)
    body = img > -500
    assert np.all(img[~body] == -1000)
    soft = img[body & ~liver].astype(np.float64)
    assert abs(np.median(soft) - 25.0) <= 1.0
    assert 9.0 < soft.std() < 11.0
    assert abs(float(np.median(img[liver])) - 100.0) <= 1.0
    body_frac = np.count_nonzero(body[:, :, 0]) / (np.pi * 150 * 120)
    assert body_frac == pytest.approx(1.0, rel=0.01)
    # Liver ellipsoid centred at (110, 150, 112).
    np.testing.assert_allclose(np.argwhere(liver).mean(axis=0), (110, 150, 112), atol=0.5)


def test_benchmark_scaling_and_custom_liver() -> None:
    p = benchmark_phantom((160, 160, 112), seed=0)
    # Body semi-axes scale to 75 x 60 voxels; the liver keeps its mm size, clipped by FOV/body.
    body_area = np.count_nonzero(p.image[:, :, 0] > -500)
    assert body_area == pytest.approx(np.pi * 75 * 60, rel=0.02)
    liver = p.mask("liver")
    assert liver.any()
    assert np.all(p.image[liver] > -500)
    assert p.volume_ml("liver") < BENCH_LIVER_ML
    q = benchmark_phantom((160, 160, 112), liver_center=(80, 80, 56), liver_semi_axes=(20, 15, 10))
    assert q.volume_ml("liver") == pytest.approx(4 / 3 * np.pi * 20 * 15 * 10 / 1000, rel=0.05)
    np.testing.assert_allclose(np.argwhere(q.mask("liver")).mean(axis=0), (80, 80, 56), atol=0.5)
