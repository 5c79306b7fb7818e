"""The demo command, the presets commands and NIfTI input/output."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from synthgen.cli import LESION_NAMES, app
from synthgen.io import load_nifti, save_nifti

runner = CliRunner()


def test_demo_writes_a_pair_per_organ(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    res = runner.invoke(
        app, ["demo", "--out", str(out), "--shape", "96,80,64", "--spacing", "4,4,5", "--seed", "3"]
    )
    assert res.exit_code == 0, res.output
    for organ in ("liver", "pancreas", "kidney", "colon", "esophagus", "uterus"):
        assert organ in res.output
        d = out / organ
        ct = nib.load(d / "ct.nii.gz")
        lab = nib.load(d / "label.nii.gz")
        assert ct.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
        assert ct.shape == lab.shape == (96, 80, 64)
        np.testing.assert_allclose(ct.header.get_zooms(), (4, 4, 5))
        np.testing.assert_allclose(ct.affine, lab.affine)
        labels = np.asarray(lab.dataobj)
        assert set(np.unique(labels)) <= {0, 1, 2}
        lesion = np.asarray(nib.load(d / "segmentations" / f"{LESION_NAMES[organ]}.nii.gz").dataobj)
        np.testing.assert_array_equal(lesion > 0, labels == 2)
        info = json.loads((d / "tumors.json").read_text())
        assert info["plan"]["preset"]["organ"] == organ
        assert len(info["tumors"]) == len(info["plan"]["tumors"])
    assert not list(out.rglob(".*.tmp")), "temporary files left behind"


def test_demo_is_deterministic(tmp_path: Path) -> None:
    args = ["demo", "--shape", "80,64,48", "--spacing", "5,5,6", "--organs", "liver,kidney"]
    for name in ("a", "b"):
        assert runner.invoke(app, [*args, "--out", str(tmp_path / name)]).exit_code == 0
    for organ in ("liver", "kidney"):
        a = np.asarray(nib.load(tmp_path / "a" / organ / "ct.nii.gz").dataobj)
        b = np.asarray(nib.load(tmp_path / "b" / organ / "ct.nii.gz").dataobj)
        np.testing.assert_array_equal(a, b)


def test_demo_rejects_bad_options(tmp_path: Path) -> None:
    res = runner.invoke(app, ["demo", "--out", str(tmp_path), "--organs", "spleen"])
    assert res.exit_code != 0 and "unknown organ" in res.output
    res = runner.invoke(app, ["demo", "--out", str(tmp_path), "--spacing", "1,1"])
    assert res.exit_code != 0 and "3 values" in res.output
    # a grid or voxel size the phantom cannot take: usage errors (they were tracebacks, exit 1)
    for opt, bad in (("--shape", "0,0,0"), ("--shape", "-5,5,5"), ("--shape", "96.7,80,64")):
        res = runner.invoke(app, ["demo", "--out", str(tmp_path / "g"), opt, bad])
        assert res.exit_code == 2 and "positive whole" in res.output, (bad, res.output)
    for bad in ("0,4,5", "-1,4,5", "nan,4,5", "inf,4,5"):
        res = runner.invoke(app, ["demo", "--out", str(tmp_path / "g"), "--spacing", bad])
        assert res.exit_code == 2 and "positive numbers" in res.output, (bad, res.output)
    assert not (tmp_path / "g").exists()
    # a size class one of the organs lacks: a usage error before anything is written (it was a
    # traceback, exit 1, after the liver's sample)
    out = tmp_path / "sized"
    res = runner.invoke(
        app, ["demo", "--out", str(out), "--organs", "liver,pancreas", "--size", "mix"]
    )
    assert res.exit_code == 2, res.output
    assert "no size class 'mix'" in res.output
    assert not out.exists()


def test_presets_commands(tmp_path: Path) -> None:
    res = runner.invoke(app, ["presets", "list"])
    assert res.exit_code == 0 and "liver-classic" in res.output and "pancreas" in res.output
    res = runner.invoke(app, ["presets", "show", "liver-classic"])
    assert res.exit_code == 0 and '"delta_hu"' in res.output
    res = runner.invoke(app, ["presets", "show", "spleen"])
    assert res.exit_code == 2 and "unknown organ or preset" in res.output
    target = tmp_path / "mine.toml"
    res = runner.invoke(app, ["presets", "export", "kidney", "-o", str(target)])
    assert res.exit_code == 0 and target.read_text().startswith("#")
    import synthgen

    assert synthgen.load_preset(target).name == "kidney"


def test_info_command() -> None:
    res = runner.invoke(app, ["info"])
    assert res.exit_code == 0 and "numpy" in res.output and "liver-classic" in res.output


def _scan(klass, seed: int, sform_code: int):
    """``(data, affine, image)``: random int16 HU in a ``klass`` image with an anisotropic,
    flipped affine as sform (``sform_code``) and qform (code 1)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(-1024, 2000, size=(12, 10, 8)).astype(np.int16)
    affine = np.array([[-0.7, 0, 0, 10], [0, 0.7, 0, -5], [0, 0, 5.0, 3], [0, 0, 0, 1]])
    src = klass(data, affine)
    src.set_sform(affine, sform_code)
    src.set_qform(affine, 1)
    return data, affine, src


def test_nifti_round_trip_keeps_geometry(tmp_path: Path) -> None:
    data, affine, src = _scan(nib.Nifti1Image, 0, 2)
    save_nifti(tmp_path / "x.nii.gz", data, affine, header=src.header)
    arr, aff, hdr = load_nifti(tmp_path / "x.nii.gz")
    assert arr.dtype == np.int16
    np.testing.assert_array_equal(arr, data)
    np.testing.assert_allclose(aff, affine)
    assert int(hdr["sform_code"]) == 2 and int(hdr["qform_code"]) == 1
    np.testing.assert_allclose(hdr.get_zooms(), (0.7, 0.7, 5.0))
    assert [p.name for p in tmp_path.iterdir()] == ["x.nii.gz"]


@pytest.mark.parametrize("klass", [nib.Nifti1Image, nib.Nifti2Image])
def test_label_on_the_ct_header_drops_the_ct_display_window(tmp_path: Path, klass) -> None:
    """A label map written on the CT's header keeps its geometry but not the CT's display
    window (cal_min/cal_max -1024..3071 showed a 0/1/2 map all black in viewers that use
    it); the CT itself keeps it."""
    data, affine, src = _scan(klass, 0, 2)
    src.header["cal_min"], src.header["cal_max"] = -1024.0, 3071.0
    save_nifti(tmp_path / "ct.nii.gz", data, affine, header=src.header)
    save_nifti(tmp_path / "label.nii.gz", (data > 0).astype(np.uint8), affine, header=src.header)
    ct = nib.load(tmp_path / "ct.nii.gz").header
    lab = nib.load(tmp_path / "label.nii.gz").header
    assert (float(ct["cal_min"]), float(ct["cal_max"])) == (-1024.0, 3071.0)
    assert (float(lab["cal_min"]), float(lab["cal_max"])) == (0.0, 0.0)
    assert int(lab["sform_code"]) == 2 and int(lab["qform_code"]) == 1
    np.testing.assert_allclose(nib.load(tmp_path / "label.nii.gz").affine, affine)


def test_load_nifti_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"missing\.nii\.gz: file not found"):
        load_nifti(tmp_path / "missing.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    good = tmp_path / "good.nii.gz"
    save_nifti(good, np.zeros((4, 4, 4), np.int16), np.eye(4))
    bad.write_bytes(good.read_bytes()[:60])  # truncated gzip stream
    with pytest.raises(ValueError, match=r"bad\.nii\.gz: truncated or corrupt gzip"):
        load_nifti(bad)
    flat = tmp_path / "flat.nii.gz"
    save_nifti(flat, np.zeros((4, 4), np.int16), np.eye(4))
    with pytest.raises(ValueError, match="expected a 3-D image"):
        load_nifti(flat)


def test_nifti2_round_trip_keeps_version_and_header(tmp_path: Path) -> None:
    """A NIfTI-2 reference header writes NIfTI-2 (it used to fail: ``Binary block is wrong
    size``), keeping its codes, units, description and scaling as for NIfTI-1."""
    data, affine, src = _scan(nib.Nifti2Image, 1, 1)
    src.header.set_xyzt_units("mm", "sec")
    src.header["descrip"] = b"scanner"
    nib.save(src, tmp_path / "in.nii.gz")
    arr, aff, hdr = load_nifti(tmp_path / "in.nii.gz")
    assert isinstance(hdr, nib.Nifti2Header)
    for name, out in (("ct.nii.gz", arr), ("ct.nii", arr), ("mask.nii.gz", arr > 0)):
        save_nifti(tmp_path / name, out, aff, header=hdr)
        img = nib.load(tmp_path / name)
        assert type(img) is nib.Nifti2Image, name
        h = img.header
        with (gzip.open if name.endswith(".gz") else open)(tmp_path / name, "rb") as f:
            raw = f.read(544)
        assert raw[:12] == b"\x1c\x02\0\0n+2\0\r\n\x1a\n"  # sizeof_hdr 540, NIfTI-2 magic
        assert int(nib.Nifti2Header(raw[:540])["vox_offset"]) == 544
        assert int(h["sform_code"]) == 1 and int(h["qform_code"]) == 1
        assert (
            h.get_xyzt_units() == ("mm", "sec") and bytes(h["descrip"]).rstrip(b"\0") == b"scanner"
        )
        np.testing.assert_allclose(img.affine, affine)
        np.testing.assert_allclose(h.get_zooms(), (0.7, 0.7, 5.0))
        np.testing.assert_array_equal(np.asarray(img.dataobj), out)
    # float data of a scaled NIfTI-2 input goes back to its integer type and scaling
    scaled = nib.Nifti2Image(data, affine)
    scaled.header.set_data_dtype(np.int16)
    scaled.header.set_slope_inter(0.5, -10.0)
    nib.save(scaled, tmp_path / "scaled.nii.gz")
    f, aff, hdr = load_nifti(tmp_path / "scaled.nii.gz")
    assert f.dtype == np.float32
    save_nifti(tmp_path / "scaled_out.nii.gz", f, aff, header=hdr)
    img = nib.load(tmp_path / "scaled_out.nii.gz")
    assert type(img) is nib.Nifti2Image and img.get_data_dtype() == np.int16
    assert (img.dataobj.slope, img.dataobj.inter) == (0.5, -10.0)
    np.testing.assert_array_equal(img.get_fdata(dtype=np.float32), f)
    # without a header, or with a NIfTI-1 one: NIfTI-1 as before
    save_nifti(tmp_path / "plain.nii.gz", data, affine)
    assert type(nib.load(tmp_path / "plain.nii.gz")) is nib.Nifti1Image


def test_load_nifti_reads_every_member_of_a_multi_member_gzip(tmp_path: Path) -> None:
    """A .nii.gz of several gzip members (bgzip, pgzip, concatenated files; gzip and nibabel
    read it) loads whole: only the first member was read, and the file was refused as
    damaged. A member cut short is still a truncated file."""
    data = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4, order="F")
    plain = tmp_path / "one.nii"
    save_nifti(plain, data, np.diag([0.7, 0.7, 5.0, 1.0]))
    raw = plain.read_bytes()
    multi = tmp_path / "multi.nii.gz"
    cut = len(raw) // 3
    multi.write_bytes(gzip.compress(raw[:cut]) + gzip.compress(raw[cut:]) + b"\0" * 16)
    np.testing.assert_array_equal(nib.load(str(multi)).get_fdata(), data)  # the reference
    arr, aff, _ = load_nifti(multi)
    np.testing.assert_array_equal(arr, data)
    np.testing.assert_allclose(aff, np.diag([0.7, 0.7, 5.0, 1.0]))
    bad = tmp_path / "bad.nii.gz"
    second = gzip.compress(raw[cut:])
    bad.write_bytes(gzip.compress(raw[:cut]) + second[: len(second) // 2])
    with pytest.raises(ValueError, match=r"bad\.nii\.gz: truncated or corrupt gzip"):
        load_nifti(bad)


def test_unwritable_outputs_are_one_line_errors(tmp_path: Path) -> None:
    """qa, preview and presets export crashed with a traceback (FileExistsError,
    IsADirectoryError, FileNotFoundError) when their output could not be written; now exit 2
    with a line naming the target."""
    afile = tmp_path / "afile"
    afile.write_text("keep me\n")
    demo = tmp_path / "demo"
    res = runner.invoke(
        app, ["demo", "--out", str(demo), "--organs", "liver", "--shape", "64,56,48",
              "--spacing", "5,5,6", "--no-preview"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    sample = demo / "liver"
    cases = [
        (["qa", str(demo), "--out", str(afile)], afile),
        (["preview", str(sample), "-o", str(afile / "p.png")], afile / "p.png"),
        (["preview", str(sample), "-o", str(tmp_path)], tmp_path),
        (["presets", "export", "liver", "-o", str(tmp_path / "no" / "x.toml")], "x.toml"),
        (["demo", "--out", str(afile), "--organs", "kidney", "--shape", "40,40,40"], afile),
    ]
    for args, target in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert not isinstance(res.exception, OSError), (args, res.exception)
        text = res.output.replace("\n", "")  # (rich wraps at 80 columns)
        assert "cannot write" in text and str(target) in text, (args, res.output)
    assert afile.read_text() == "keep me\n"


def test_demo_an_organ_the_grid_crops_out_fails_alone(tmp_path: Path) -> None:
    # a small field of view holds no uterus: that organ fails with its reason and exit 1, the
    # others are written (it was a traceback at the first such organ)
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--shape", "24,24,24", "--spacing", "4,4,5"]
    res = runner.invoke(app, [*args, "--organs", "uterus,liver", "--no-preview"])
    assert res.exit_code == 1, res.output
    assert not isinstance(res.exception, ValueError), res.exception
    assert "failed uterus: organ mask is empty" in res.output.replace("\n", " ")
    assert (out / "liver" / "ct.nii.gz").is_file() and not (out / "uterus").exists()


def test_demo_organ_mask_is_the_pushed_one(tmp_path: Path) -> None:
    # A mass-effect tumor warps the organ: segmentations/<organ>.nii.gz must be the warped mask
    # that label.nii.gz is built from (it was the phantom's unwarped mask, so a tumor voxel lay
    # outside the written organ and qa reported an inside share below 1).
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--shape", "96,80,64", "--spacing", "4,4,5"]
    args += ["--organs", "uterus", "--seed", "5", "--size", "large", "--no-preview"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    d = out / "uterus"
    info = json.loads((d / "tumors.json").read_text())
    assert info["plan"]["preset"]["mass_effect"]["enabled"]
    labels = np.asarray(nib.load(d / "label.nii.gz").dataobj)
    organ = np.asarray(nib.load(d / "segmentations" / "uterus.nii.gz").dataobj) > 0
    lesion = np.asarray(nib.load(d / "segmentations" / "endometrioma_tumor.nii.gz").dataobj) > 0
    assert lesion.any()
    np.testing.assert_array_equal(labels > 0, organ | lesion)
    assert organ[lesion].all()


def test_synth_rejects_an_unknown_size_class_up_front(tmp_path: Path) -> None:
    # as batch does: exit 2 naming the classes, nothing in OUT (it wrote a manifest with a
    # failed sample and exited 1, as if the scan were bad)
    ct, mask = tmp_path / "ct.nii.gz", tmp_path / "liver.nii.gz"
    save_nifti(ct, np.zeros((8, 8, 8), np.int16), np.eye(4))
    save_nifti(mask, np.ones((8, 8, 8), np.uint8), np.eye(4))
    out = tmp_path / "out"
    args = ["synth", str(ct), "--mask", str(mask), "--organ", "pancreas", "--out", str(out)]
    res = runner.invoke(app, [*args, "--size", "mix"])
    assert res.exit_code == 2, res.output
    assert "no size class 'mix'" in res.output
    assert not out.exists()


@pytest.mark.parametrize("command", ["synth", "batch"])
def test_help_shows_the_mass_effect_section_name(command: str) -> None:
    # rich markup took "[mass_effect]" for a style tag and printed "the preset's )"
    res = runner.invoke(app, [command, "--help"], env={"COLUMNS": "300"})
    assert res.exit_code == 0
    assert "[mass_effect]" in res.output, res.output


def test_python_dash_m_synthgen_runs_the_cli() -> None:
    # `python -m synthgen ...` failed: "No module named synthgen.__main__"
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "synthgen", "presets", "list"], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    assert "liver-classic" in res.stdout
