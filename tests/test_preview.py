"""Tests of synthgen.preview: PNG output, reorientation, physical aspect, sample folders."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from synthgen.io import save_json, save_nifti
from synthgen.preview import (
    _canonical,
    _component_centres,
    _panels,
    _read_tumors_json,
    preview_arrays,
    write_preview,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SHAPE = (64, 56, 40)


def _scan(
    shape: tuple[int, int, int] = SHAPE, centres: list[tuple[int, int, int]] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """int16 CT (30 HU tissue, 100 HU ellipsoidal organ, 40 HU spherical tumors) and label."""
    rng = np.random.default_rng(0)
    idx = np.indices(shape, dtype=np.float32)
    mid = [(n - 1) / 2.0 for n in shape]
    q = sum(((idx[a] - mid[a]) / (0.35 * shape[a])) ** 2 for a in range(3))
    label = (q <= 1.0).astype(np.uint8)
    for c in centres or []:
        d2 = sum((idx[a] - c[a]) ** 2 for a in range(3))
        label[(d2 <= 16.0) & (label == 1)] = 2
    image = np.where(label == 1, 100, np.where(label == 2, 40, 30)).astype(np.int16)
    image += rng.normal(0.0, 5.0, shape).astype(np.int16)
    return image, label


def _read_png(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return imread(path)


def _permuted_flipped(
    arr: np.ndarray, affine: np.ndarray
) -> tuple[np.ndarray, np.ndarray, Callable]:
    """The same scan stored with axes (k, i, j), the first of them flipped; its affine and a
    map of (i, j, k) indices of the original to indices of the new array."""
    nz = arr.shape[2]
    new = np.ascontiguousarray(np.flip(arr.transpose(2, 0, 1), axis=0))
    # new[a, b, c] = arr[b, c, nz - 1 - a]
    p = np.zeros((4, 4))
    p[0, 1] = p[1, 2] = p[3, 3] = 1.0
    p[2, 0] = -1.0
    p[2, 3] = nz - 1
    return new, affine @ p, lambda c: (nz - 1 - c[2], c[0], c[1])


CENTRES = [(26, 28, 20), (38, 24, 16), (30, 32, 25)]


@pytest.fixture(scope="module")
def scan() -> tuple[np.ndarray, np.ndarray]:
    return _scan(centres=CENTRES)


def test_png_written_and_decodable(tmp_path: Path, scan: tuple[np.ndarray, np.ndarray]) -> None:
    image, label = scan
    out = preview_arrays(
        image, label, np.diag([1.5, 1.5, 2.5, 1.0]), CENTRES[:1], tmp_path / "p" / "one.png"
    )
    assert out == tmp_path / "p" / "one.png"
    png = _read_png(out)
    assert png.ndim == 3 and png.shape[2] in (3, 4)
    assert 200 <= png.shape[0] <= 600 and 600 <= png.shape[1] <= 1400  # one row of 3 panels
    assert float(png[..., :3].std()) > 0.0
    assert not list(out.parent.glob(".*.tmp"))  # atomic write left no temporary file


def test_rows_grow_with_tumors(tmp_path: Path, scan: tuple[np.ndarray, np.ndarray]) -> None:
    image, label = scan
    aff = np.diag([1.5, 1.5, 2.5, 1.0])
    one = _read_png(preview_arrays(image, label, aff, CENTRES[:1], tmp_path / "1.png"))
    three = _read_png(preview_arrays(image, label, aff, CENTRES, tmp_path / "3.png"))
    assert three.shape[1] == one.shape[1]
    assert three.shape[0] > 2.5 * one.shape[0]
    capped = _read_png(
        preview_arrays(image, label, aff, CENTRES * 3, tmp_path / "c.png", max_tumors=3)
    )
    # same rows; the title line "showing 3 of 9 tumors" adds a little height
    assert capped.shape[1] == three.shape[1]
    assert three.shape[0] < capped.shape[0] < three.shape[0] + 60


def test_no_centres_uses_organ_or_volume_centre(tmp_path: Path) -> None:
    image, label = _scan()
    png = _read_png(preview_arrays(image, label, np.eye(4), [], tmp_path / "organ.png"))
    assert float(png[..., :3].std()) > 0.0
    empty = np.zeros_like(label)
    png2 = _read_png(preview_arrays(image, empty, np.eye(4), [], tmp_path / "vol.png"))
    assert png2.shape == png.shape


def test_reorientation_maps_centre_on_permuted_flipped_affine(
    scan: tuple[np.ndarray, np.ndarray],
) -> None:
    image, _ = scan
    aff = np.diag([0.8, 0.9, 3.0, 1.0])
    aff[:3, 3] = (-20.0, 15.0, -100.0)
    new, new_aff, to_new = _permuted_flipped(image, aff)
    canon = _canonical(new_aff, new.shape)
    assert canon.shape == image.shape
    np.testing.assert_allclose(canon.spacing, (0.8, 0.9, 3.0))
    np.testing.assert_allclose(canon.affine, aff)  # back to the RAS+ original
    view = canon.view(new)
    rng = np.random.default_rng(3)
    for _ in range(20):
        c = tuple(int(rng.integers(0, n)) for n in image.shape)
        c_new = to_new(c)
        assert new[c_new] == image[c]
        m = canon.index(c_new)
        assert view[m] == image[c]  # the slice value at the mapped centre is the voxel's
        world = new_aff @ np.array([*c_new, 1.0])
        np.testing.assert_allclose(canon.affine @ np.array([*m, 1.0]), world)


def test_panels_identical_for_any_axis_order(scan: tuple[np.ndarray, np.ndarray]) -> None:
    image, label = scan
    aff = np.diag([1.5, 1.5, 2.5, 1.0])
    c = CENTRES[1]
    ref = _canonical(aff, image.shape)
    want = _panels(ref.view(image), ref.view(label), ref.spacing, ref.index(c))
    new_img, new_aff, to_new = _permuted_flipped(image, aff)
    new_lab, _, _ = _permuted_flipped(label, aff)
    canon = _canonical(new_aff, new_img.shape)
    got = _panels(canon.view(new_img), canon.view(new_lab), canon.spacing, canon.index(to_new(c)))
    for w, g in zip(want, got, strict=True):
        assert w.view == g.view
        np.testing.assert_array_equal(w.image, g.image)
        np.testing.assert_array_equal(w.label, g.label)
        assert w.extent == pytest.approx(g.extent)


def test_radiological_display_convention() -> None:
    # RAS+ grid: a bright marker at patient right (high i), anterior (high j), superior (high k)
    shape = (40, 30, 20)
    image = np.zeros(shape, dtype=np.int16)
    label = np.zeros(shape, dtype=np.uint8)
    image[30:34, 22:26, 14:18] = 1000
    canon = _canonical(np.eye(4), shape)
    axial, coronal, sagittal = _panels(image, label, canon.spacing, (32, 24, 16))
    for p, (rows, cols) in (
        (axial, (30, 40)),
        (coronal, (20, 40)),
        (sagittal, (20, 30)),
    ):
        assert p.image.shape == (rows, cols)
        r, c = np.argwhere(p.image > 500).mean(axis=0)
        assert r < rows / 2, p.view  # anterior (axial) / superior (coronal, sagittal) up
        assert c < cols / 2, p.view  # patient right (axial, coronal) / anterior on the left
    assert axial.sides[:2] == ("R", "L") and sagittal.sides[:2] == ("A", "P")


def test_anisotropic_spacing_changes_aspect(tmp_path: Path) -> None:
    image, label = _scan((48, 48, 12))
    iso = _canonical(np.diag([1.0, 1.0, 1.0, 1.0]), image.shape)
    aniso = _canonical(np.diag([0.7, 0.7, 5.0, 1.0]), image.shape)
    c = (24, 24, 6)
    p_iso = _panels(iso.view(image), iso.view(label), iso.spacing, c)
    p_an = _panels(aniso.view(image), aniso.view(label), aniso.spacing, c)

    def aspect(p):  # height / width of the drawn slice, mm / mm
        left, right, bottom, top = p.extent
        return (top - bottom) / (right - left)

    assert aspect(p_iso[1]) == pytest.approx(12 / 48)
    assert aspect(p_an[1]) == pytest.approx(12 * 5.0 / (48 * 0.7))
    assert aspect(p_an[0]) == pytest.approx(aspect(p_iso[0]))  # axial in-plane isotropic
    # the rendered figure keeps its size; only the drawn panels change shape
    a = _read_png(preview_arrays(image, label, np.diag([1.0, 1.0, 1.0, 1.0]), [c], tmp_path / "i"))
    b = _read_png(preview_arrays(image, label, np.diag([0.7, 0.7, 5.0, 1.0]), [c], tmp_path / "a"))
    assert a.shape == b.shape
    assert not np.array_equal(a, b)


def test_bad_inputs(tmp_path: Path) -> None:
    image, label = _scan()
    with pytest.raises(ValueError, match="shape"):
        preview_arrays(image, label[:-1], np.eye(4), [], tmp_path / "x.png")
    with pytest.raises(ValueError, match="outside"):
        preview_arrays(image, label, np.eye(4), [(64, 0, 0)], tmp_path / "x.png")
    with pytest.raises(ValueError, match="singular"):
        preview_arrays(image, label, np.diag([1.0, 0.0, 1.0, 1.0]), [], tmp_path / "x.png")
    with pytest.raises(ValueError, match="window"):
        preview_arrays(image, label, np.eye(4), [], tmp_path / "x.png", window=(40.0, 0.0))
    assert not (tmp_path / "x.png").exists()


def test_component_centres_largest_first() -> None:
    label = np.zeros((30, 30, 30), dtype=np.uint8)
    label[2:5, 2:5, 2:5] = 2  # 27 voxels, centre (3, 3, 3)
    label[10:20, 10:16, 20:24] = 2  # 240 voxels, centre (14.5, 12.5, 21.5)
    centres, notes = _component_centres(label, 8.0)
    np.testing.assert_allclose(centres, [(14.5, 12.5, 21.5), (3.0, 3.0, 3.0)])
    assert notes == [f"{240 * 8 / 1000:.2f} mL", f"{27 * 8 / 1000:.2f} mL"]


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory):
    import synthgen
    from synthgen.phantom import make_phantom

    ph = make_phantom((96, 80, 64), (3.0, 3.0, 4.0), seed=0)
    mask = ph.mask("liver")
    res = synthgen.synthesize(ph.image, mask, organ="liver", affine=ph.affine, seed=1)
    d = tmp_path_factory.mktemp("sample") / "liver"
    save_nifti(d / "ct.nii.gz", res.image, ph.affine)
    save_nifti(d / "label.nii.gz", res.label, ph.affine)
    doc = {"plan": res.plan.to_dict(), "tumors": [t.to_dict() for t in res.tumors]}
    save_json(d / "tumors.json", doc)
    return d, doc


def json_free_label(d: Path) -> np.ndarray:
    from synthgen.io import load_nifti

    return load_nifti(d / "label.nii.gz")[0]


def test_write_preview_on_pipeline_sample(tmp_path: Path, sample) -> None:
    d, doc = sample
    n = len(doc["tumors"])
    assert n >= 1
    out = write_preview(d)
    assert out == d / "preview.png"
    png = _read_png(out)
    assert float(png[..., :3].std()) > 0.0
    # the height is rows * 3.2 in (+ the title line) at 100 dpi
    assert png.shape[0] == pytest.approx(min(n, 6) * 320 + 35, abs=2)
    assert png.shape[1] == 960

    # multi-organ tumors.json: the same tumors listed under "organs", plus an organ without any
    multi = tmp_path / "multi"
    multi.mkdir()
    for name in ("ct.nii.gz", "label.nii.gz"):
        (multi / name).write_bytes((d / name).read_bytes())
    organs = [
        {"organ": "liver", **doc},
        {"organ": "kidney", "plan": {"tumors": []}, "tumors": []},
    ]
    (multi / "tumors.json").write_text(json.dumps({"organs": organs}), encoding="utf-8")
    centres, notes, _ = _read_tumors_json(multi / "tumors.json")
    assert centres == [tuple(float(v) for v in t["center_vox"]) for t in doc["tumors"]]
    t0 = doc["tumors"][0]
    assert notes[0].startswith("liver, d ")
    assert f"d {2 * max(t0['radii_mm']):.1f} mm" in notes[0]
    assert f"contrast {t0['mean_contrast_hu']:.0f} HU" in notes[0]
    png2 = _read_png(write_preview(multi, tmp_path / "multi.png", title=None, max_tumors=10))
    assert png2.shape[0] == pytest.approx(n * 320, abs=2)

    # without tumors.json: centroids of the tumor components
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("ct.nii.gz", "label.nii.gz"):
        (bare / name).write_bytes((d / name).read_bytes())
    from scipy import ndimage

    n_comp = ndimage.label(np.asarray(json_free_label(d)) == 2)[1]
    png3 = _read_png(write_preview(bare, title=None))
    assert (bare / "preview.png").is_file()
    assert png3.shape[0] == pytest.approx(min(n_comp, 6) * 320, abs=2)


def test_write_preview_missing_or_bad_files(tmp_path: Path, sample) -> None:
    d, _ = sample
    with pytest.raises(ValueError, match=r"ct\.nii\.gz"):
        write_preview(tmp_path)
    only_ct = tmp_path / "only_ct"
    only_ct.mkdir()
    (only_ct / "ct.nii.gz").write_bytes((d / "ct.nii.gz").read_bytes())
    with pytest.raises(ValueError, match=r"label\.nii\.gz"):
        write_preview(only_ct)
    (only_ct / "label.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match=r"label\.nii\.gz"):
        write_preview(only_ct)
    (only_ct / "label.nii.gz").write_bytes((d / "label.nii.gz").read_bytes())
    (only_ct / "tumors.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"tumors\.json"):
        write_preview(only_ct)
    assert not (only_ct / "preview.png").exists()


def test_import_does_not_import_matplotlib() -> None:
    code = "import synthgen.preview, sys; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
