"""``synthgen qa``: measurements checked against an independent recomputation on a small batch.

The batch is two phantom cases of ``tests/_datasets.py`` (80 x 64 x 56 at 5 x 5 x 6 mm) with
liver and kidney tumors, two samples per case.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _datasets import write_dataset
from scipy import ndimage
from typer.testing import CliRunner

from synthgen.cli import app
from synthgen.presets import LESION_NAMES
from synthgen.qa import QUANTITIES, qa_report

runner = CliRunner()
ORGANS = ("liver", "kidney")


def cli(*args: object, code: int | None = 0):
    res = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "400"})
    if code is not None:
        assert res.exit_code == code, f"exit {res.exit_code}\n{res.output}\n{res.exception!r}"
    return res


@pytest.fixture(scope="module")
def batch_out(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qa")
    ds = write_dataset(root / "ds", "atlas1", 2)
    out = root / "out"
    cli("batch", ds, "--out", out, "--organ", ",".join(ORGANS), "--per-case", 2, "--device", "cpu")
    return out


def _samples(out: Path) -> list[Path]:
    return sorted(p.parent for p in out.glob("*/tumors.json"))


def test_qa_report_matches_independent_measurement(batch_out: Path, tmp_path: Path) -> None:
    qa_dir = tmp_path / "qa"
    res = cli("qa", batch_out, "-o", qa_dir)
    assert "liver" in res.output and "kidney" in res.output
    assert "report.md" in res.output
    for name in ("report.md", "qa.json", "montage.png"):
        assert (qa_dir / name).is_file(), name
    import matplotlib.image as mpimg

    for q in QUANTITIES:
        img = mpimg.imread(qa_dir / f"hist_{q}.png")
        assert img.ndim == 3 and img.shape[0] > 100
    assert mpimg.imread(qa_dir / "montage.png").shape[0] > 100
    report = (qa_dir / "report.md").read_text()
    assert "| liver |" in report and "hist_diameter_mm.png" in report

    doc = json.loads((qa_dir / "qa.json").read_text())
    samples = {s["sample"]: s for s in doc["samples"]}
    dirs = _samples(batch_out)
    assert sorted(samples) == [d.name for d in dirs] and len(dirs) == 4
    n_total = n_shell = 0
    for d in dirs:
        s = samples[d.name]
        assert s["tumor_out_of_range"] == 0 and s["tumor_gas_voxels"] == 0
        img = nib.load(str(d / "ct.nii.gz"))
        vox_mm3 = abs(np.linalg.det(img.affine[:3, :3]))
        assert vox_mm3 == pytest.approx(150.0)
        ct = np.asarray(img.dataobj, dtype=np.float64)
        seg = d / "segmentations"
        tumor = np.zeros(ct.shape, bool)
        for organ in ORGANS:
            tumor |= np.asarray(nib.load(str(seg / f"{LESION_NAMES[organ]}.nii.gz")).dataobj) != 0
        for organ in ORGANS:
            les = np.asarray(
                nib.load(str(d / "segmentations" / f"{LESION_NAMES[organ]}.nii.gz")).dataobj
            )
            comps, n = ndimage.label(les != 0, np.ones((3, 3, 3)))
            o = s["organs"][organ]
            assert o["n_tumors"] == n
            n_total += n
            expect = sorted(np.bincount(comps.ravel())[1:].tolist())
            got = sorted(t["voxels"] for t in o["tumors"])
            assert got == expect
            for t in o["tumors"]:
                assert t["volume_mm3"] == pytest.approx(t["voxels"] * vox_mm3)
                d_eq = (6 * t["volume_mm3"] / np.pi) ** (1 / 3)
                assert t["diameter_mm"] == pytest.approx(d_eq)
                m = comps == t["component"]
                assert t["mean_hu"] == pytest.approx(ct[m].mean())
                # the reference: the organ in a shell of 3 to 8 mm, on this 5 mm grid 10 to
                # 15 mm (2 to 3 of its finest voxels), Euclidean distance in mm
                organ_m = np.asarray(nib.load(str(seg / f"{organ}.nii.gz")).dataobj) != 0
                sp = np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0))
                dist = ndimage.distance_transform_edt(~m, sampling=sp)
                fine = float(sp.min())
                shell = (dist >= max(3.0, 2 * fine)) & (dist <= max(8.0, 3 * fine))
                shell &= organ_m & ~tumor
                if shell.sum() >= 20:
                    near = ct[shell]
                    assert t["organ_median_hu"] == pytest.approx(np.median(near))
                    q1, q3 = np.percentile(near, [25, 75])
                    assert t["organ_half_iqr_hu"] == pytest.approx((q3 - q1) / 2)
                    n_shell += 1
                assert t["gas_voxels"] == 0
                if organ == "liver":
                    assert t["inside_share"] == 1.0
                assert 0.0 <= t["inside_share"] <= 1.0
    assert n_shell > 0
    summary = doc["summary"]
    assert summary["n_tumors"] == n_total and summary["n_samples"] == 4
    assert summary["has_impossible"] is False
    liver = summary["organs"]["liver"]
    assert liver["quantiles"]["inside_share"]["min"] == 1.0
    assert liver["samples"] == 4
    assert 0.0 <= liver["share_diameter_in_range"] <= 1.0
    assert liver["intended"]["diameter_mm"] == [5.0, 90.0]  # liver radii 2.5 .. 45 mm


def test_qa_flags_impossible_values(batch_out: Path, tmp_path: Path) -> None:
    src = _samples(batch_out)[0]
    root = tmp_path / "bad"
    d = root / src.name
    shutil.copytree(src, d)
    img = nib.load(str(d / "ct.nii.gz"))
    ct = np.asarray(img.dataobj).astype(np.int16)
    les = np.asarray(nib.load(str(d / "segmentations" / "liver_lesion.nii.gz")).dataobj) != 0
    tumor_vox = tuple(np.argwhere(les)[0])
    others = [np.asarray(nib.load(str(f)).dataobj) != 0
              for f in sorted((d / "segmentations").glob("*_lesion.nii.gz"))]  # fmt: skip
    tumor_vox2 = next(tuple(v) for m in others for v in np.argwhere(m) if tuple(v) != tumor_vox)
    outside = tuple(np.argwhere(~les)[0])
    ct[outside] = -3000  # the input's own padding: reported, not flagged
    save = nib.Nifti1Image(ct, img.affine)
    nib.save(save, str(d / "ct.nii.gz"))
    cli("qa", root, code=0)
    assert qa_report(root, tmp_path / "qa1")["ct_out_of_range"] == 1

    ct[tumor_vox] = -500
    ct[tumor_vox2] = 4000
    nib.save(nib.Nifti1Image(ct, img.affine), str(d / "ct.nii.gz"))
    res = cli("qa", root, code=1)
    assert "impossible" in res.output
    summary = qa_report(root, tmp_path / "qa2")
    # (a tumor voxel outside the CT range came with the input: reported, not flagged)
    assert summary["impossible"] == {"tumor_gas_voxels": 1, "label_mismatch_voxels": 0}
    assert summary["ct_out_of_range"] == 2 and summary["tumor_out_of_range"] == 1
    assert summary["has_impossible"] is True
    assert (root / "qa" / "report.md").is_file()  # the CLI's default output folder

    # a label map that is not the sample's masks (all zero; a tumor voxel made organ): it
    # passed as 100% fine
    ct[tumor_vox] = 0
    nib.save(nib.Nifti1Image(ct, img.affine), str(d / "ct.nii.gz"))
    lab_img = nib.load(str(d / "label.nii.gz"))
    lab = np.asarray(lab_img.dataobj).astype(np.uint8)
    n_labelled = int(np.count_nonzero(lab))
    lab[tumor_vox] = 1
    nib.save(nib.Nifti1Image(lab, lab_img.affine), str(d / "label.nii.gz"))
    assert qa_report(root, tmp_path / "qa3")["impossible"]["label_mismatch_voxels"] == 1
    nib.save(nib.Nifti1Image(np.zeros_like(lab), lab_img.affine), str(d / "label.nii.gz"))
    res = cli("qa", root, code=1)
    assert f"{n_labelled} voxels of label.nii.gz that disagree" in " ".join(res.output.split())


def test_qa_single_sample_and_bad_input(batch_out: Path, tmp_path: Path) -> None:
    one = _samples(batch_out)[0]
    summary = qa_report(one, tmp_path / "one", montage_max=1)
    assert summary["n_samples"] == 1
    res = cli("qa", tmp_path / "missing", code=2)
    assert "missing" in res.output
    empty = tmp_path / "empty"
    empty.mkdir()
    res = cli("qa", empty, code=2)
    assert "no sample folder" in res.output
    with pytest.raises(ValueError, match="no sample folder"):
        qa_report(empty)


def test_qa_reads_demo_folders(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    cli(
        "demo",
        "--out",
        out,
        "--shape",
        "80,64,56",
        "--spacing",
        "5,5,6",
        "--organs",
        "liver,kidney",
        "--no-preview",
    )
    summary = qa_report(out)
    assert summary["n_samples"] == 2
    assert set(summary["organs"]) == {"liver", "kidney"}
    doc = json.loads((out / "qa" / "qa.json").read_text())
    for s in doc["samples"]:
        organ = Path(s["path"]).name
        les = nib.load(str(out / organ / "segmentations" / f"{LESION_NAMES[organ]}.nii.gz"))
        _, n = ndimage.label(np.asarray(les.dataobj) != 0, np.ones((3, 3, 3)))
        assert s["organs"][organ]["n_tumors"] == n
        assert s["organs"][organ]["planned_tumors"] >= 1


def test_wall_tumors_get_no_diameter_range() -> None:
    """A hollow-organ preset's classes are segment half-lengths: no sphere-diameter range."""
    from synthgen.presets import load_preset
    from synthgen.qa import _intended

    for organ in ("colon", "esophagus"):
        plan = {"preset": load_preset(organ).to_dict(), "size_class": "small"}
        got = _intended(plan)
        assert "diameter_mm" not in got and "class_diameter_mm" not in got
        assert got["count"]
    liver = _intended({"preset": load_preset("liver").to_dict(), "size_class": "small"})
    assert liver["diameter_mm"][0] > 0


def test_wall_tumors_one_component_contrast_against_the_wall(tmp_path: Path) -> None:
    """Colon and esophagus demo samples: a wall tumor is one component (its rim voxels may
    meet the rest along an edge only), its reference is the wall (soft tissue), not the
    lumen's gas, and no contrast range applies."""
    out = tmp_path / "demo"
    # (this demo's large colon tumor, seed 3, splits into 10 face-connected parts)
    cli("demo", "--out", out, "--no-preview", "--organs", "colon,esophagus", "--seed", "3",
        "--size", "large")  # fmt: skip
    qa_report(out)
    doc = json.loads((out / "qa" / "qa.json").read_text())
    face_split = 0
    for s in doc["samples"]:
        organ = Path(s["path"]).name
        if organ not in ("colon", "esophagus"):
            continue
        o = s["organs"][organ]
        d = Path(s["path"])
        les = np.asarray(
            nib.load(str(d / "segmentations" / f"{LESION_NAMES[organ]}.nii.gz")).dataobj
        )
        face_split += ndimage.label(les != 0)[1] - o["n_tumors"]
        assert 1 <= o["n_tumors"] <= o["planned_tumors"]  # (touching tumors count as one)
        assert o["intended"]["wall"] is True
        for t in o["tumors"]:
            assert -150.0 <= t["organ_median_hu"] <= 300.0
            assert t["contrast_in_range"] is None and t["diameter_in_range"] is None
    assert face_split > 0, "face connectivity splits a wall tumor of the demo"


def test_reference_shell_is_in_mm_on_thick_slices(tmp_path: Path) -> None:
    """On 0.8 x 0.8 x 5 mm voxels the reference shell (3-8 mm) reaches one slice above and
    below the tumor, not two: in voxel steps of the finest size it reached 10 mm along z
    (and the halo ring the slices 5 mm away). The organ two slices away from the tumor is
    made 60 HU brighter: a shell that reaches it measures the wrong reference."""
    sp = (0.8, 0.8, 5.0)
    shape = (96, 96, 24)
    ct = np.full(shape, -100, np.int16)
    organ = np.zeros(shape, bool)
    organ[8:88, 8:88, 2:22] = True
    ct[organ] = 40
    aff = np.diag([*sp, 1.0])
    d = tmp_path / "in"
    d.mkdir()
    nib.save(nib.Nifti1Image(ct, aff), str(d / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(organ.astype(np.uint8), aff), str(d / "liver.nii.gz"))
    out = tmp_path / "out"
    cli("synth", d / "ct.nii.gz", "--mask", d / "liver.nii.gz", "--organ", "liver",
        "--preset", "liver-classic",
        "--out", out, "--seed", "2", "--size", "small")  # fmt: skip
    (sample,) = [p.parent for p in out.glob("*/tumors.json")]
    img = nib.load(str(sample / "ct.nii.gz"))
    got = np.asarray(img.dataobj).astype(np.int16)
    les = np.asarray(nib.load(str(sample / "segmentations" / "liver_lesion.nii.gz")).dataobj)
    zs = np.flatnonzero((les != 0).any(axis=(0, 1)))
    far = organ.copy()
    far[:, :, zs.min() - 1 : zs.max() + 2] = False  # two slices and more from the tumor
    assert far.any() and (got[far] == 40).all()
    got[far] = 100
    nib.save(nib.Nifti1Image(got, img.affine), str(sample / "ct.nii.gz"))
    summary = qa_report(out, tmp_path / "qa")
    doc = json.loads((tmp_path / "qa" / "qa.json").read_text())
    tumors = doc["samples"][0]["organs"]["liver"]["tumors"]
    assert summary["n_tumors"] == len(tumors) >= 1
    for t in tumors:
        assert t["organ_median_hu"] == pytest.approx(40.0)


def test_an_existing_lesion_near_a_planned_tumor_is_not_matched_to_it() -> None:
    """The nearest-centre fallback would give a scan's own lesion the record of a planned
    tumor close by (within the lesion's diameter); a lesion's box comes first."""
    from synthgen.qa import _match

    comp = np.ones((4, 4, 4), dtype=bool)  # the component, at (10..14)^3
    rec = {"center_vox": [16, 12, 12], "voxels": 50, "index": 0}  # outside it, 4 voxels away
    centroid = np.array([11.5, 11.5, 11.5])
    assert _match(comp, [10, 10, 10], centroid, 5.0, [rec]) is rec  # (no lesion box)
    box = [[10, 14], [10, 14], [10, 14]]
    assert _match(comp, [10, 10, 10], centroid, 5.0, [rec], [box]) is None
    inside = {"center_vox": [12, 12, 12], "voxels": 9, "index": 1}
    assert _match(comp, [10, 10, 10], centroid, 5.0, [rec, inside], [box]) is inside
