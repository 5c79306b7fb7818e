"""The demo command, the presets commands and NIfTI input/output."""

from __future__ import annotations

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


def test_nifti_round_trip_keeps_geometry(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(-1024, 2000, size=(12, 10, 8)).astype(np.int16)
    affine = np.array([[-0.7, 0, 0, 10], [0, 0.7, 0, -5], [0, 0, 5.0, 3], [0, 0, 0, 1]])
    src = nib.Nifti1Image(data, affine)
    src.set_sform(affine, 2)
    src.set_qform(affine, 1)
    save_nifti(tmp_path / "x.nii.gz", data, affine, header=src.header)
    arr, aff, hdr = load_nifti(tmp_path / "x.nii.gz")
    assert arr.dtype == np.int16
    np.testing.assert_array_equal(arr, data)
    np.testing.assert_allclose(aff, affine)
    assert int(hdr["sform_code"]) == 2 and int(hdr["qform_code"]) == 1
    np.testing.assert_allclose(hdr.get_zooms(), (0.7, 0.7, 5.0))
    assert [p.name for p in tmp_path.iterdir()] == ["x.nii.gz"]


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
