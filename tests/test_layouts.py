"""Dataset layouts (detection, discovery, mask-loading pitfalls) and the CLI end to end.

The datasets are the small phantoms of ``tests/_datasets.py`` (80 x 64 x 56 at 5 x 5 x 6 mm)
written as AbdomenAtlas 1.x / 2.0, MSD, nnU-Net v2 raw and CSV; the real-data tests use the
TotalSegmentator example (``totalseg`` fixture, marked ``network``).
"""

from __future__ import annotations

import csv
import json
import re
import shlex
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _datasets import SHAPE, SPACING, cancer_blob, label_map, phantom, save, write_dataset
from typer.testing import CliRunner

from synthgen.batch import BatchOptions, prepare, read_manifest, run_batch
from synthgen.cli import app
from synthgen.layouts import (
    LAYOUTS,
    AbsentLabelError,
    Case,
    LayoutError,
    MaskSource,
    detect_layout,
    discover,
    load_mask,
    load_mask_file,
)
from synthgen.presets import LESION_NAMES, ORGANS

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"
CASE_IDS = {
    "atlas1": ["BDMAP_00000000", "BDMAP_00000001"],
    "atlas2": ["BDMAP_00000000", "BDMAP_00000001"],
    "msd": ["liver_0", "liver_1"],
    "nnunet": ["abd_000", "abd_001"],
    "csv": ["scan0", "scan1"],
}


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def cli(*args: object, code: int | None = 0):
    """Run the CLI on a wide console (rich wraps and truncates at 80 columns)."""
    res = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "400"})
    if code is not None:
        assert res.exit_code == code, f"exit {res.exit_code}\n{res.output}\n{res.exception!r}"
    return res


def flat(text: str) -> str:
    """Output without whitespace and box drawing (typer's error panel wraps at 80 columns)."""
    return re.sub(r"[\s\u2500-\u257f]+", "", text)


def arr(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    """Every layout with 2 cases (read-only: tests that change a dataset write their own)."""
    root = tmp_path_factory.mktemp("datasets")
    return {layout: write_dataset(root / layout, layout, 2) for layout in LAYOUTS}


def check_atlas_sample(
    sample: Path, ct_in: Path, organs: tuple[str, ...] = ("liver",), contained: bool = True
) -> dict:
    """The checks every atlas-format sample passes; returns its tumors.json."""
    src = nib.load(ct_in)
    ct = nib.load(sample / "ct.nii.gz")
    assert ct.shape == src.shape
    np.testing.assert_allclose(ct.affine, src.affine, atol=1e-5)
    assert int(ct.header["sform_code"]) == int(src.header["sform_code"])
    np.testing.assert_allclose(ct.header.get_qform(), src.affine, atol=1e-4)
    np.testing.assert_allclose(ct.header.get_zooms(), src.header.get_zooms())
    assert ct.get_data_dtype() == np.int16
    image = np.asarray(ct.dataobj)
    assert image.dtype == np.int16
    lab_img = nib.load(sample / "label.nii.gz")
    assert lab_img.get_data_dtype() == np.uint8 and lab_img.shape == src.shape
    np.testing.assert_allclose(lab_img.affine, src.affine, atol=1e-5)
    lab = np.asarray(lab_img.dataobj)
    assert set(np.unique(lab).tolist()) <= {0, 1, 2}
    assert (lab == 2).any() and (lab == 1).any()
    region = np.zeros(src.shape, bool)
    lesions = np.zeros(src.shape, bool)
    for organ in organs:
        seg = nib.load(sample / "segmentations" / f"{organ}.nii.gz")
        les = nib.load(sample / "segmentations" / f"{LESION_NAMES[organ]}.nii.gz")
        for m in (seg, les):
            assert m.get_data_dtype() == np.uint8 and m.shape == src.shape
            np.testing.assert_allclose(m.affine, src.affine, atol=1e-5)
        region |= np.asarray(seg.dataobj) > 0
        lesions |= np.asarray(les.dataobj) > 0
    np.testing.assert_array_equal(lab == 2, lesions)
    np.testing.assert_array_equal(lab > 0, region | lesions)
    changed = image != np.asarray(src.dataobj)
    assert changed.any(), "no voxel of the CT changed"
    if contained:  # clipped (liver) tumors never touch voxels outside the organ
        assert not (changed & (lab == 0)).any()
    meta = json.loads((sample / "tumors.json").read_text())
    assert meta["sample"] == sample.name
    assert [r["organ"] for r in meta["organs"]] == list(organs)
    for r in meta["organs"]:
        assert r["tumors"] and len(r["tumors"]) == len(r["plan"]["tumors"])
        assert tuple(r["plan"]["shape"]) == src.shape
        np.testing.assert_allclose(r["plan"]["spacing"], src.header.get_zooms())
    return meta


def check_nnunet_output(out: Path, n_labels: int) -> dict:
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "CT"}
    labels = ds["labels"]
    assert len(labels) == n_labels
    assert labels["background"] == 0
    assert all(type(v) is int for v in labels.values())
    assert sorted(labels.values()) == list(range(n_labels))
    assert ds["file_ending"] == ".nii.gz"
    label_files = sorted((out / "labelsTr").iterdir())
    assert label_files and ds["numTraining"] == len(label_files)
    assert len(list((out / "imagesTr").iterdir())) == len(label_files)
    for lab in label_files:
        assert lab.name.endswith(".nii.gz")
        case = lab.name[: -len(".nii.gz")]
        img = out / "imagesTr" / f"{case}_0000.nii.gz"
        assert img.is_file(), img
        ct, lb = nib.load(img), nib.load(lab)
        assert ct.get_data_dtype() == np.int16 and lb.get_data_dtype() == np.uint8
        assert ct.shape == lb.shape
        np.testing.assert_allclose(ct.affine, lb.affine)
        assert set(np.unique(np.asarray(lb.dataobj)).tolist()) <= set(labels.values())
    return ds


# --------------------------------------------------------------------------------------
# 1. detect_layout
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_detect_layout_names_each_layout(datasets, layout) -> None:
    assert detect_layout(datasets[layout]) == layout
    assert detect_layout(str(datasets[layout])) == layout


def test_detect_layout_rejects_what_is_no_dataset(tmp_path: Path) -> None:
    (tmp_path / "junk" / "sub").mkdir(parents=True)
    (tmp_path / "junk" / "notes.txt").write_text("no scans here")
    with pytest.raises(LayoutError) as ei:
        detect_layout(tmp_path / "junk")
    msg = str(ei.value)
    assert str(tmp_path / "junk") in msg
    for expected in ("AbdomenAtlas", "ct.nii.gz", "segmentations", "ct/", "label/"):
        assert expected in msg, expected
    for expected in ("MSD", "nnU-Net", "imagesTr", "labelsTr", "dataset.json", ".csv"):
        assert expected in msg, expected
    with pytest.raises(LayoutError, match="no such file or folder"):
        detect_layout(tmp_path / "nowhere")
    (tmp_path / "list.txt").write_text("ct,mask,organ\n")
    with pytest.raises(LayoutError, match=r"must be a \.csv"):
        detect_layout(tmp_path / "list.txt")
    (tmp_path / "raw" / "imagesTr").mkdir(parents=True)
    (tmp_path / "raw" / "labelsTr").mkdir()
    with pytest.raises(LayoutError, match=r"no dataset\.json"):
        detect_layout(tmp_path / "raw")
    res = cli("batch", tmp_path / "junk", "--out", tmp_path / "o", "--organ", "liver", code=2)
    assert "not a dataset synthgen knows" in res.output
    assert not (tmp_path / "o").exists()


def test_layout_override_on_the_command_line(tmp_path: Path) -> None:
    # An nnU-Net dataset.json without channel_names/file_ending looks like MSD ...
    root = write_dataset(tmp_path / "ds", "nnunet", 2)
    meta = json.loads((root / "dataset.json").read_text())
    del meta["channel_names"], meta["file_ending"]
    (root / "dataset.json").write_text(json.dumps(meta))
    assert detect_layout(root) == "msd"
    out = tmp_path / "out"
    res = cli("batch", root, "--out", out, "--organ", "liver", "--dry-run", code=2)
    assert "labels" in res.output
    # ... and --layout nnunet reads it.
    res = cli("batch", root, "--out", out, "--organ", "liver", "--layout", "nnunet", "--dry-run")
    assert "nnunet layout, 2 cases" in res.output
    res = cli("batch", root, "--out", out, "--organ", "liver", "--layout", "nnunet")
    assert sorted(p.name for p in out.glob("*_s000")) == ["abd_000_s000", "abd_001_s000"]
    # A CSV with another extension is not detected, but --layout csv reads it.
    src = write_dataset(tmp_path / "c", "csv", 1)
    txt = src.with_suffix(".txt")
    shutil.copy(src, txt)
    cli("batch", txt, "--out", tmp_path / "o2", "--organ", "liver", "--dry-run", code=2)
    res = cli(
        "batch", txt, "--out", tmp_path / "o2", "--organ", "liver", "--layout", "csv", "--dry-run"
    )
    assert "csv layout, 1 cases" in res.output and "scan0_s000" in res.output
    res = cli(
        "batch", txt, "--out", tmp_path / "o2", "--organ", "liver", "--layout", "bogus", code=2
    )
    assert "unknown layout 'bogus'" in res.output
    assert all(name in res.output for name in LAYOUTS)


# --------------------------------------------------------------------------------------
# 2. discover
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["atlas1", "atlas2"])
def test_discover_atlas_kidney_is_the_union_of_both_files(datasets, layout) -> None:
    root = datasets[layout]
    found, cases = discover(root, ["liver", "kidney"])
    assert found == layout
    assert [c.case_id for c in cases] == CASE_IDS[layout]
    for k, case in enumerate(cases):
        ctdir = root / case.case_id if layout == "atlas1" else root / "ct" / case.case_id
        segdir = (root if layout == "atlas1" else root / "label") / case.case_id / "segmentations"
        assert case.ct == ctdir / "ct.nii.gz"
        assert case.organs["liver"] == (MaskSource(segdir / "liver.nii.gz"),)
        assert case.organs["kidney"] == (
            MaskSource(segdir / "kidney_left.nii.gz"),
            MaskSource(segdir / "kidney_right.nii.gz"),
        )
        assert case.lesions == {} and case.missing == {}
        ph = phantom(k)
        got = load_mask(case.organs["kidney"], SHAPE, ph.affine)
        assert ph.mask("kidney_left").any() and ph.mask("kidney_right").any()
        np.testing.assert_array_equal(got, ph.mask("kidney"))


def test_discover_atlas_lesions_fallbacks_and_missing(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "a2", "atlas2", 2)
    seg0 = root / "label" / "BDMAP_00000000" / "segmentations"
    save(seg0 / "liver_lesion.nii.gz", cancer_blob(phantom(0)).astype(np.uint8), phantom(0).affine)
    for side in ("kidney_left", "kidney_right"):  # only a combined kidney file left
        (seg0 / f"{side}.nii.gz").unlink()
    save(seg0 / "kidney.nii.gz", phantom(0).mask("kidney").astype(np.uint8), phantom(0).affine)
    shutil.rmtree(root / "label" / "BDMAP_00000001")  # no labels at all for case 1
    _, (c0, c1) = discover(root, ["liver", "kidney", "liver"])
    assert list(c0.organs) == ["liver", "kidney"]
    assert c0.organs["kidney"] == (MaskSource(seg0 / "kidney.nii.gz"),)
    assert c0.lesions == {"liver": (MaskSource(seg0 / "liver_lesion.nii.gz"),)}
    assert c1.organs == {} and set(c1.missing) == {"liver", "kidney"}
    assert "BDMAP_00000001" in c1.missing["liver"]
    assert "kidney_left+kidney_right" in c1.missing["kidney"]
    with pytest.raises(LayoutError, match="unknown organ 'spleen'"):
        discover(root, ["spleen"])


def test_discover_msd_ids_cancer_label_and_macos_files(datasets, tmp_path: Path) -> None:
    root = datasets["msd"]
    assert sorted(p.name for p in (root / "imagesTr").iterdir())[0].startswith("._")
    found, cases = discover(root, ["liver", "pancreas"])
    assert found == "msd"
    assert [c.case_id for c in cases] == CASE_IDS["msd"]
    for k, case in enumerate(cases):
        lab = root / "labelsTr" / f"liver_{k}.nii.gz"
        assert case.ct == root / "imagesTr" / f"liver_{k}.nii.gz"
        assert case.organs == {"liver": (MaskSource(lab, (1,)),)}
        assert case.lesions == {"liver": (MaskSource(lab, (2,)),)}
        assert list(case.missing) == ["pancreas"]
        ph = phantom(k)
        les = load_mask(case.lesions["liver"], SHAPE, ph.affine)
        assert les.any()
        np.testing.assert_array_equal(les, cancer_blob(ph))
    # Without a "training" list the folders are listed: ._* files must not become cases.
    copy = tmp_path / "msd"
    shutil.copytree(root, copy)
    meta = json.loads((copy / "dataset.json").read_text())
    del meta["training"]
    (copy / "dataset.json").write_text(json.dumps(meta))
    _, cases = discover(copy, ["liver"])
    assert [c.case_id for c in cases] == CASE_IDS["msd"]
    assert all(c.organs["liver"][0].path.name == f"{c.case_id}.nii.gz" for c in cases)
    # Task07-like pancreas: the generic "cancer" label belongs to the only organ named.
    meta["labels"] = {"0": "background", "1": "pancreas", "2": "cancer"}
    (copy / "dataset.json").write_text(json.dumps(meta))
    _, cases = discover(copy, ["pancreas"])
    assert cases[0].organs["pancreas"][0].label_ids == (1,)
    assert cases[0].lesions["pancreas"][0].label_ids == (2,)
    # With two organs named a generic "tumor" is ambiguous: attached to neither.
    meta["labels"] = {"0": "background", "1": "liver", "2": "pancreas", "3": "tumor"}
    (copy / "dataset.json").write_text(json.dumps(meta))
    _, cases = discover(copy, ["liver", "pancreas"])
    assert cases[0].lesions == {}
    assert cases[0].organs["pancreas"][0].label_ids == (2,)


def test_discover_msd_keeps_parent_folders_of_training_paths(datasets, tmp_path: Path) -> None:
    """dataset.json paths lose only a leading "./" (``lstrip("./")`` made ``../x`` ``x``)."""
    root = tmp_path / "msd"
    shutil.copytree(datasets["msd"], root)
    shutil.move(root / "imagesTr", tmp_path / "images")  # the images beside the dataset
    (root / "imagesTr").mkdir()
    meta = json.loads((root / "dataset.json").read_text())
    for k, entry in enumerate(meta["training"]):
        entry["image"] = f"../images/liver_{k}.nii.gz"
        entry["label"] = f"././labelsTr/liver_{k}.nii.gz"
    (root / "dataset.json").write_text(json.dumps(meta))
    _, cases = discover(root, ["liver"])
    for k, case in enumerate(cases):
        assert case.ct == root / ".." / "images" / f"liver_{k}.nii.gz" and case.ct.is_file()
        lab = root / "labelsTr" / f"liver_{k}.nii.gz"
        assert case.organs == {"liver": (MaskSource(lab, (1,)),)} and case.missing == {}


def test_discover_nnunet_name_to_id_missing_organ_and_macos_files(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "nn", "nnunet", 2)
    (root / "imagesTr" / "._abd_000_0000.nii.gz").write_bytes(b"\0\5\26\7macOS junk")
    (root / "labelsTr" / "._abd_000.nii.gz").write_bytes(b"\0\5\26\7macOS junk")
    found, cases = discover(root, ["liver", "pancreas", "kidney", "uterus"])
    assert found == "nnunet"
    assert [c.case_id for c in cases] == CASE_IDS["nnunet"]
    for case in cases:
        lab = root / "labelsTr" / f"{case.case_id}.nii.gz"
        assert case.ct == root / "imagesTr" / f"{case.case_id}_0000.nii.gz"
        assert case.organs == {
            "liver": (MaskSource(lab, (1,)),),
            "pancreas": (MaskSource(lab, (2,)),),
            "kidney": (MaskSource(lab, (3, 4)),),
        }
        assert case.lesions == {}
        assert list(case.missing) == ["uterus"]
        assert "uterus" in case.missing["uterus"] and "dataset.json" in case.missing["uterus"]
    ph = phantom(1)
    np.testing.assert_array_equal(
        load_mask(cases[1].organs["kidney"], SHAPE, ph.affine), ph.mask("kidney")
    )
    # a case without label file is listed with a reason, not dropped
    (root / "labelsTr" / "abd_001.nii.gz").unlink()
    _, cases = discover(root, ["liver"])
    assert cases[1].organs == {} and "abd_001_0000.nii.gz" in cases[1].missing["liver"]
    # the dry run shows what is missing
    res = cli("batch", root, "--out", tmp_path / "o", "--organ", "liver,uterus", "--dry-run")
    assert "uterus: " in res.output and "has no label named like 'uterus'" in res.output


def test_discover_csv_merges_rows_and_resolves_paths(datasets, tmp_path, monkeypatch) -> None:
    path = datasets["csv"]
    root = path.parent
    found, cases = discover(path)
    assert found == "csv"
    assert [c.case_id for c in cases] == CASE_IDS["csv"]  # 4 rows, 2 scans
    for k, case in enumerate(cases):
        assert case.ct == root / "scans" / f"scan{k}.nii.gz"
        lab = root / "masks" / f"scan{k}_labels.nii.gz"
        assert case.organs == {
            "liver": (MaskSource(lab, (1,)),),
            "pancreas": (MaskSource(lab, (2,)),),
        }
        assert case.missing == {}
    _, cases = discover(path, ["liver", "kidney"])
    assert list(cases[0].organs) == ["liver"] and list(cases[0].missing) == ["kidney"]
    # Relative paths are relative to the CSV's folder, not to the working directory.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rel = Path("..") / "data" / "cases.csv"
    shutil.copytree(root, tmp_path / "data")
    _, cases = discover(rel)
    for case in cases:
        assert case.ct.is_file()
        assert case.ct.resolve() == (tmp_path / "data" / "scans" / f"{case.case_id}.nii.gz")
        assert all(s.path.is_file() for s in case.organs["liver"])
    # absolute paths, "2;3" label ids, the same CT under two spellings, _0000 suffix
    ph = phantom(0)
    ct = save(tmp_path / "abs" / "img_0000.nii.gz", ph.image, ph.affine)
    labels = label_map(ph, {"liver": 5, "kidney_right": 2, "kidney_left": 3})
    seg = save(tmp_path / "abs" / "seg.nii.gz", labels, ph.affine)
    sheet = tmp_path / "abs" / "list.csv"
    sheet.write_text(f"{ct},{seg},liver,5\n./img_0000.nii.gz,seg.nii.gz,kidney,2;3\n")
    _, (case,) = discover(sheet)
    assert case.case_id == "img"
    assert case.organs == {
        "liver": (MaskSource(seg, (5,)),),
        "kidney": (MaskSource(tmp_path / "abs" / "seg.nii.gz", (2, 3)),),
    }
    np.testing.assert_array_equal(
        load_mask(case.organs["kidney"], SHAPE, ph.affine), ph.mask("kidney")
    )


def test_discover_csv_lesion_id_column_and_option(tmp_path: Path) -> None:
    """``lesion_id`` (by name after a header) and ``--lesion-id`` (the rows of the one organ
    that have a label_id and no lesion_id) make lesions."""
    sheet = tmp_path / "cases.csv"
    m = tmp_path / "m.nii.gz"
    liver, les = MaskSource(m, (1,)), MaskSource(m, (2, 3))
    for text in (
        "ct,mask,organ,label_id,lesion_id\na.nii.gz,m.nii.gz,liver,1,2;3\n",
        "ct,mask,organ,lesion_id,label_id\na.nii.gz,m.nii.gz,liver,2;3,1\n",
    ):
        sheet.write_text(text)
        _, (case,) = discover(sheet, ["liver"])
        assert case.organs == {"liver": (liver,)} and case.lesions == {"liver": (les,)}
        _, (case,) = discover(sheet, ["liver"], lesion_ids=[7])  # the row's own ids win
        assert case.lesions == {"liver": (les,)}
    # an extra column of another name is no lesion_id (it was ignored, and still is), nor
    # is a headerless file's fifth column, whatever it holds
    for text in (
        "ct,mask,organ,label_id,note\na.nii.gz,m.nii.gz,liver,1,big one\n",
        "a.nii.gz,m.nii.gz,liver,1,big one\n",
        "a.nii.gz,m.nii.gz,liver,1,2\n",
    ):
        sheet.write_text(text)
        _, (case,) = discover(sheet, ["liver"])
        assert case.organs == {"liver": (liver,)} and case.lesions == {}
    # --lesion-id fills rows of its organ that have a label_id and no lesion_id
    sheet.write_text(
        "ct,mask,organ,label_id,lesion_id\na.nii.gz,m.nii.gz,liver,1,\n"
        "a.nii.gz,m.nii.gz,pancreas,4,\n"
    )
    _, (case,) = discover(sheet, ["liver"], lesion_ids=(2, 3))
    assert case.organs == {"liver": (liver,)} and case.lesions == {"liver": (les,)}
    _, (case,) = discover(sheet)
    assert case.lesions == {}
    with pytest.raises(LayoutError, match="give exactly one organ"):
        discover(sheet, ["liver", "pancreas"], lesion_ids=(2,))
    with pytest.raises(LayoutError, match="give exactly one organ"):
        discover(sheet, lesion_ids=(2,))
    sheet.write_text("ct,mask,organ\na.nii.gz,m.nii.gz,liver\n")
    with pytest.raises(LayoutError, match="row 1: --lesion-id names label ids of a label map"):
        discover(sheet, ["liver"], lesion_ids=(2,))


def test_batch_lesion_id_keeps_the_existing_tumor_as_tumor(lits_files, datasets, tmp_path):
    """A CSV's lesion_id column, and batch --lesion-id for a CSV without one or for MSD
    labels dataset.json does not name like lesions: the existing tumor stays tumor."""
    ph, ct, labels, cancer = lits_files
    liver = ph.mask("liver") & ~cancer
    sheet = tmp_path / "cases.csv"
    sheet.write_text(f"ct,mask,organ,label_id,lesion_id\n{ct},{labels},liver,1,2\n")
    cli("batch", sheet, "--out", tmp_path / "col", "--organ", "liver", "--no-mass-effect")
    check_existing_lesion(tmp_path / "col" / "scan_s000", liver, cancer)
    sheet.write_text(f"ct,mask,organ,label_id\n{ct},{labels},liver,1\n")
    res = cli("batch", sheet, "--out", tmp_path / "opt", "--organ", "liver", "--no-mass-effect",
              "--lesion-id", 2)  # fmt: skip
    check_existing_lesion(tmp_path / "opt" / "scan_s000", liver, cancer)
    rec = read_manifest(tmp_path / "opt")["scan_s000"]
    assert rec["inputs"]["lesions"] == {"liver": [{"path": str(labels), "label_ids": [2]}]}
    assert rec["organs"][0]["existing_lesion_voxels"] == np.count_nonzero(cancer)
    assert "matched no voxel" not in flat(res.output)
    # synthgen qa tells the scan's own lesion from the synthetic tumors (it counted it as
    # one more tumor, out of the planned count, and measured it against the preset)
    from synthgen.qa import qa_report

    summary = qa_report(tmp_path / "opt", tmp_path / "qa")
    (o,) = json.loads((tmp_path / "qa" / "qa.json").read_text())["samples"][0]["organs"].values()
    assert summary["organs"]["liver"]["existing_lesions"] == 1 == len(o["existing_lesions"])
    assert o["n_tumors"] == len(rec["organs"][0]["tumors"]) == o["planned_tumors"]
    assert all(t["matched_index"] is not None for t in o["tumors"])
    # a lesion id that no voxel has (a typo): the samples are made, and the run says so
    res = cli("batch", sheet, "--out", tmp_path / "typo", "--organ", "liver", "--no-mass-effect",
              "--lesion-id", 7)  # fmt: skip
    assert read_manifest(tmp_path / "typo")["scan_s000"]["organs"][0]["existing_lesion_voxels"] == 0
    assert flat("liver: the lesion label ids") in flat(res.output)
    assert flat("matched no voxel in any of the 1 samples") in flat(res.output)
    # MSD whose tumor label has a name synthgen does not take for a lesion
    msd = tmp_path / "msd"
    shutil.copytree(datasets["msd"], msd)
    meta = json.loads((msd / "dataset.json").read_text())
    meta["labels"]["2"] = "hcc"
    meta["training"] = meta["training"][:1]
    (msd / "dataset.json").write_text(json.dumps(meta))
    cli("batch", msd, "--out", tmp_path / "msd-out", "--organ", "liver", "--no-mass-effect",
        "--lesion-id", 2)  # fmt: skip
    c0 = cancer_blob(phantom(0))
    check_existing_lesion(tmp_path / "msd-out" / "liver_0_s000", phantom(0).mask("liver") & ~c0, c0)
    # refused: several organs, AbdomenAtlas (lesions are files), ids that are not integers
    for args, message in (
        ((sheet, "--organ", "liver,pancreas"), "give exactly one organ"),
        ((datasets["atlas1"], "--organ", "liver"), "lesion ids are for label maps"),
    ):
        res = cli("batch", *args, "--out", tmp_path / "bad", "--lesion-id", 2, code=2)
        assert flat(message) in flat(res.output)
    res = cli("batch", sheet, "--organ", "liver", "--out", tmp_path / "bad", "--lesion-id", "a",
              code=2)  # fmt: skip
    assert flat("--lesion-id 'a': give integer ids") in flat(res.output)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("ct,mask,organ,label_id,lesion_id\na.nii.gz,m.nii.gz,liver,1,2\n"
         "b.nii.gz,m.nii.gz,liver,1,two\n", "row 2: lesion_id 'two' is not an int"),
        ("ct,mask,organ,label_id,lesion_id\na.nii.gz,m.nii.gz,liver,,2\n",
         "row 1: lesion_id needs a label_id"),
        ("ct,mask,organ\na.nii.gz,m.nii.gz,liver\nb.nii.gz,m.nii.gz,brain\n",
         "row 2: unknown organ 'brain'"),
        ("a.nii.gz,m.nii.gz,liver\nb.nii.gz,m.nii.gz\n", "row 2 needs ct,mask,organ"),
        ("ct,mask,organ,label_id\na.nii.gz,m.nii.gz,liver,1\nb.nii.gz,m.nii.gz,liver,one\n",
         "row 2: label_id 'one' is not an int"),
    ],
)  # fmt: skip
def test_bad_csv_rows_are_named(tmp_path: Path, rows: str, message: str) -> None:
    """Rows are counted from the first data row (the header is not a row)."""
    sheet = tmp_path / "cases.csv"
    sheet.write_text(rows)
    with pytest.raises(LayoutError, match=re.escape(message)) as ei:
        discover(sheet, ["liver"])
    assert str(sheet) in str(ei.value)
    res = cli("batch", sheet, "--out", tmp_path / "o", "--organ", "liver", code=2)
    assert flat(message) in flat(res.output)
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------
# 3. load_mask pitfalls
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def liver_scan():
    ph = phantom(0)
    return ph.affine, ph.mask("liver")


def _bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argwhere(mask)
    return idx.min(axis=0), idx.max(axis=0) + 1


def test_same_grid_uint8_mask_is_plain(tmp_path, liver_scan) -> None:
    affine, liver = liver_scan
    p = save(tmp_path / "liver.nii.gz", liver.astype(np.uint8), affine)
    m, plain = load_mask_file(MaskSource(p), SHAPE, affine)
    assert plain
    np.testing.assert_array_equal(m, liver)
    m, plain = load_mask_file(MaskSource(p, (1,)), SHAPE, affine)  # label ids: not a copy
    assert not plain
    np.testing.assert_array_equal(m, liver)


@pytest.mark.parametrize("how", ["crop", "pad"])
def test_cropped_offset_mask_maps_back_exactly(tmp_path, liver_scan, how) -> None:
    """A mask cropped to its bounding box, or padded 4 voxels beyond the CT on every side,
    with the affine translated accordingly, lands on the original voxels."""
    affine, liver = liver_scan
    if how == "crop":
        lo, hi = _bbox(liver)
        crop = liver[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    else:
        lo = np.array([-4, -4, -4])
        crop = np.pad(liver, 4)
    assert crop.shape != SHAPE and crop.sum() == liver.sum()
    aff = affine.copy()
    aff[:3, 3] = (affine @ np.append(lo, 1.0))[:3]
    p = save(tmp_path / "crop.nii.gz", crop.astype(np.uint8), aff)
    m, plain = load_mask_file(MaskSource(p), SHAPE, affine)
    assert not plain
    assert m.shape == SHAPE and m.dtype == bool
    np.testing.assert_array_equal(m, liver)


def test_float_masks_binarise_above_half(tmp_path, liver_scan) -> None:
    affine, liver = liver_scan
    noise = np.where(liver, 0.0, 0.5)  # exactly 0.5 is not organ
    cases = [
        (np.float32, np.nextafter(np.float32(1), np.float32(2))),
        (np.float64, 1.0000000591),
        (np.float32, np.float32(0.9999999)),
    ]
    for dtype, one in cases:
        data = (liver * one + noise).astype(dtype)
        assert data.dtype == dtype and data.max() != 1.0
        p = save(tmp_path / f"f_{np.dtype(dtype).name}.nii.gz", data, affine)
        m = load_mask([MaskSource(p)], SHAPE, affine)
        np.testing.assert_array_equal(m, liver)
    # a float label map with exact ids
    lab = np.where(liver, 5.0, 0.0).astype(np.float32)
    p = save(tmp_path / "labels_f.nii.gz", lab, affine)
    np.testing.assert_array_equal(load_mask([MaskSource(p, (5,))], SHAPE, affine), liver)
    assert not load_mask([MaskSource(p, (1,))], SHAPE, affine).any()


@pytest.mark.parametrize("codes", [("L", "A", "S"), ("P", "S", "L"), ("I", "R", "P")])
def test_mask_in_another_orientation_maps_back_exactly(tmp_path, liver_scan, codes) -> None:
    affine, liver = liver_scan
    img = nib.Nifti1Image(liver.astype(np.uint8), affine)
    ornt = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt(codes)
    )
    other = img.as_reoriented(ornt)
    assert nib.aff2axcodes(other.affine) == codes
    data = np.asarray(other.dataobj)
    assert data.shape != SHAPE or not np.array_equal(data, liver)
    p = tmp_path / "reoriented.nii.gz"
    nib.save(other, p)
    m, plain = load_mask_file(MaskSource(p), SHAPE, affine)
    assert not plain
    np.testing.assert_array_equal(m, liver)


def test_mask_outside_the_ct_raises_naming_the_file(tmp_path, liver_scan) -> None:
    affine, liver = liver_scan
    far = affine.copy()
    far[:3, 3] += 1000.0
    p = save(tmp_path / "far_away.nii.gz", liver.astype(np.uint8), far)
    from synthgen.layouts import GridWarning

    with pytest.raises(ValueError, match=r"far_away\.nii\.gz.*does not overlap"):
        with pytest.warns(GridWarning):  # (of the CT's shape, on another grid)
            load_mask([MaskSource(p)], SHAPE, affine)
    # an empty mask on another grid is just empty (an absent structure), not an error
    empty = save(tmp_path / "empty.nii.gz", np.zeros((5, 5, 5), np.uint8), far)
    assert not load_mask([MaskSource(empty)], SHAPE, affine).any()
    with pytest.raises(ValueError, match=r"missing\.nii\.gz: file not found"):
        load_mask([MaskSource(tmp_path / "missing.nii.gz")], SHAPE, affine)


def test_batch_resamples_a_cropped_mask_onto_the_ct(tmp_path) -> None:
    """An AbdomenAtlas case whose liver mask is cropped: the output mask is on the CT grid."""
    root = write_dataset(tmp_path / "a1", "atlas1", 1)
    ph = phantom(0)
    liver = ph.mask("liver")
    lo, hi = _bbox(liver)
    aff = ph.affine.copy()
    aff[:3, 3] = (ph.affine @ np.append(lo, 1.0))[:3]
    crop = liver[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].astype(np.float32) * 1.0000001
    save(root / "BDMAP_00000000" / "segmentations" / "liver.nii.gz", crop, aff)
    out = tmp_path / "out"
    cli("batch", root, "--out", out, "--organ", "liver")
    sample = out / "BDMAP_00000000_s000"
    check_atlas_sample(sample, root / "BDMAP_00000000" / "ct.nii.gz")
    np.testing.assert_array_equal(arr(sample / "segmentations" / "liver.nii.gz") > 0, liver)


# --------------------------------------------------------------------------------------
# 4. batch end to end, every input layout
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batch_end_to_end_atlas_output(datasets, tmp_path, layout) -> None:
    out = tmp_path / "out"
    # --no-mass-effect: the checks below hold the input organ fixed (the warp has its tests)
    res = cli("batch", datasets[layout], "--out", out, "--organ", "liver", "--seed", "7",
              "--no-mass-effect")  # fmt: skip
    assert f"{layout} layout, 2 cases" in res.output
    manifest = read_manifest(out)
    ids = [f"{c}_s000" for c in CASE_IDS[layout]]
    assert sorted(manifest) == ids
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ids
    for k, sid in enumerate(ids):
        rec = manifest[sid]
        assert rec["status"] == "done", rec
        sample = out / sid
        assert sorted(rec["outputs"]) == sorted(
            str(p.relative_to(out)) for p in sample.rglob("*") if p.is_file()
        )
        meta = check_atlas_sample(sample, Path(rec["inputs"]["ct"]))
        assert meta["case"] == CASE_IDS[layout][k]
        lab = arr(sample / "label.nii.gz")
        liver = phantom(k).mask("liver")
        if layout == "msd":  # the existing cancer stays tumor
            cancer = cancer_blob(phantom(k))
            assert cancer.any() and (lab[cancer] == 2).all()
            np.testing.assert_array_equal(lab > 0, liver)
        else:
            np.testing.assert_array_equal(arr(sample / "segmentations" / "liver.nii.gz") > 0, liver)


def test_batch_keeps_a_zero_qform_code(datasets, tmp_path) -> None:
    src = nib.load(datasets["atlas1"] / "BDMAP_00000000" / "ct.nii.gz")
    assert int(src.header["sform_code"]) == 2 and int(src.header["qform_code"]) == 0
    out = tmp_path / "out"
    cli("batch", datasets["atlas1"], "--out", out, "--organ", "liver")
    for name in ("ct.nii.gz", "label.nii.gz"):
        hdr = nib.load(out / "BDMAP_00000000_s000" / name).header
        assert int(hdr["sform_code"]) == 2
        assert int(hdr["qform_code"]) == 0


def test_batch_atlas_kidney_union_and_existing_lesion(tmp_path) -> None:
    root = write_dataset(tmp_path / "a2", "atlas2", 1)
    ph = phantom(0)
    cancer = cancer_blob(ph)
    seg = root / "label" / "BDMAP_00000000" / "segmentations"
    save(seg / "liver_lesion.nii.gz", cancer.astype(np.uint8), ph.affine)
    out = tmp_path / "out"
    cli("batch", root, "--out", out, "--organ", "liver,kidney")
    sample = out / "BDMAP_00000000_s000"
    check_atlas_sample(
        sample, root / "ct" / "BDMAP_00000000" / "ct.nii.gz", ("liver", "kidney"), contained=False
    )
    np.testing.assert_array_equal(
        arr(sample / "segmentations" / "kidney.nii.gz") > 0, ph.mask("kidney")
    )
    assert (arr(sample / "label.nii.gz")[cancer] == 2).all()
    assert (arr(sample / "segmentations" / "liver_lesion.nii.gz")[cancer] == 1).all()


def test_batch_output_masks_are_3d_for_a_4d_input_mask(tmp_path) -> None:
    root = write_dataset(tmp_path / "a1", "atlas1", 1)
    ph = phantom(0)
    seg = root / "BDMAP_00000000" / "segmentations" / "liver.nii.gz"
    save(seg, ph.mask("liver").astype(np.uint8)[..., None], ph.affine)
    assert nib.load(seg).shape == (*SHAPE, 1)
    out = tmp_path / "out"
    cli("batch", root, "--out", out, "--organ", "liver")
    mask = nib.load(out / "BDMAP_00000000_s000" / "segmentations" / "liver.nii.gz")
    assert mask.shape == SHAPE


def test_sheared_ct_gets_no_contradicting_qform(tmp_path) -> None:
    ph = phantom(0)
    aff = ph.affine.copy()
    aff[0, 2] = 1.0  # 1 mm of x per slice: a tilted gantry
    img = nib.Nifti1Image(ph.image, aff)
    img.set_sform(aff, 1)
    img.set_qform(None, 0)
    nib.save(img, tmp_path / "tilt.nii.gz")
    mask = save(tmp_path / "liver.nii.gz", ph.mask("liver").astype(np.uint8), aff)
    out = tmp_path / "out"
    cli("synth", tmp_path / "tilt.nii.gz", "--mask", mask, "--organ", "liver", "--out", out)
    for name in ("ct.nii.gz", "label.nii.gz"):
        hdr = nib.load(out / "tilt_s000" / name).header
        sform, scode = hdr.get_sform(coded=True)
        assert scode == 1
        np.testing.assert_allclose(sform, aff, atol=1e-5)
        qform, qcode = hdr.get_qform(coded=True)
        assert qcode == 0 or np.allclose(qform, aff, atol=1e-3), (qcode, qform)


def test_batch_nnunet_output_from_msd(datasets, tmp_path) -> None:
    out = tmp_path / "Dataset501_Synth"
    cli("batch", datasets["msd"], "--out", out, "--organ", "liver", "--format", "nnunet",
        "--no-mass-effect")  # fmt: skip
    ds = check_nnunet_output(out, 3)
    assert ds["labels"] == {"background": 0, "liver": 1, "liver_lesion": 2}
    assert ds["numTraining"] == 2
    for k in range(2):
        lab = arr(out / "labelsTr" / f"liver_{k}_s000.nii.gz")
        assert (lab == 2).any()
        assert (lab[cancer_blob(phantom(k))] == 2).all()
        src = nib.load(datasets["msd"] / "imagesTr" / f"liver_{k}.nii.gz")
        ct = nib.load(out / "imagesTr" / f"liver_{k}_s000_0000.nii.gz")
        assert ct.shape == src.shape and ct.get_data_dtype() == np.int16
        np.testing.assert_allclose(ct.affine, src.affine)
        plan = json.loads((out / "synthgen_tumors" / f"liver_{k}_s000.json").read_text())
        assert plan["organs"][0]["organ"] == "liver" and plan["organs"][0]["tumors"]


def test_batch_nnunet_multi_organ_labels(datasets, tmp_path) -> None:
    out = tmp_path / "out"
    cli("batch", datasets["nnunet"], "--out", out, "--organ", "liver,pancreas", "--format",
        "nnunet", "--no-mass-effect")  # fmt: skip
    ds = check_nnunet_output(out, 5)
    assert ds["labels"] == {
        "background": 0,
        "liver": 1,
        "liver_lesion": 2,
        "pancreas": 3,
        "pancreatic_lesion": 4,
    }
    for k in range(2):
        lab = arr(out / "labelsTr" / f"abd_{k:03d}_s000.nii.gz")
        ph = phantom(k)
        assert set(np.unique(lab).tolist()) == {0, 1, 2, 3, 4}
        assert set(np.unique(lab[ph.mask("liver")]).tolist()) == {1, 2}
        assert set(np.unique(lab[ph.mask("pancreas")]).tolist()) == {3, 4}


# --------------------------------------------------------------------------------------
# 5. synth
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scan_files(tmp_path_factory):
    """A phantom CT with scanner sform/qform codes, its liver mask and a label map."""
    d = tmp_path_factory.mktemp("scan")
    ph = phantom(1)
    img = nib.Nifti1Image(ph.image, ph.affine)
    img.set_sform(ph.affine, 1)
    img.set_qform(ph.affine, 1)
    nib.save(img, d / "scan.nii.gz")
    mask = save(d / "liver.nii.gz", ph.mask("liver").astype(np.uint8), ph.affine)
    labels = save(d / "labels.nii.gz", label_map(ph, {"pancreas": 1, "liver": 7}), ph.affine)
    return ph, d / "scan.nii.gz", mask, labels


def test_synth_writes_distinct_reproducible_samples(scan_files, tmp_path) -> None:
    ph, ct, mask, _ = scan_files
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = tmp_path / name
        cli("synth", ct, "--mask", mask, "--organ", "liver", "--out", out, "--n", 2, "--seed", seed,
            "--no-mass-effect")  # fmt: skip
        assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["scan_s000", "scan_s001"]
        runs[name] = out
    for sid in ("scan_s000", "scan_s001"):
        meta = check_atlas_sample(runs["a"] / sid, ct)
        assert meta["case"] == "scan"
        hdr = nib.load(runs["a"] / sid / "ct.nii.gz").header
        assert int(hdr["sform_code"]) == 1 and int(hdr["qform_code"]) == 1
        np.testing.assert_array_equal(
            arr(runs["a"] / sid / "segmentations" / "liver.nii.gz") > 0, ph.mask("liver")
        )
    a0, a1 = (runs["a"] / s / "ct.nii.gz" for s in ("scan_s000", "scan_s001"))
    assert not np.array_equal(arr(a0), arr(a1)), "two samples of one scan are identical"
    files = sorted(
        str(p.relative_to(runs["a"]))
        for p in runs["a"].rglob("*")
        if p.is_file() and p.parent != runs["a"]
    )
    assert "scan_s000/ct.nii.gz" in files and "scan_s001/tumors.json" in files
    for f in files:  # same seed, separate folders: the same bytes
        assert (runs["a"] / f).read_bytes() == (runs["b"] / f).read_bytes(), f
    assert (runs["a"] / "scan_s000" / "ct.nii.gz").read_bytes() != (
        runs["c"] / "scan_s000" / "ct.nii.gz"
    ).read_bytes()


def test_synth_label_id_picks_the_organ_in_a_label_map(scan_files, tmp_path) -> None:
    _, ct, _, labels = scan_files
    out = tmp_path / "out"
    cli("synth", ct, "--mask", labels, "--label-id", 7, "--organ", "liver", "--out", out,
        "--no-mass-effect")  # fmt: skip
    sample = out / "scan_s000"
    check_atlas_sample(sample, ct)
    liver = arr(labels) == 7
    np.testing.assert_array_equal(arr(sample / "segmentations" / "liver.nii.gz") > 0, liver)
    np.testing.assert_array_equal(arr(sample / "label.nii.gz") > 0, liver)
    # an id that is not in the map: the sample fails with a reason, exit code 1
    res = cli(
        "synth",
        ct,
        "--mask",
        labels,
        "--label-id",
        9,
        "--organ",
        "liver",
        "--out",
        tmp_path / "bad",
        code=1,
    )
    rec = read_manifest(tmp_path / "bad")["scan_s000"]
    assert rec["status"] == "failed"
    # it names the file and the ids it holds (it used to say "organ mask is empty")
    assert f"{labels}: label id 9 is absent from this file (ids present: 1, 7)" in rec["error"]
    assert flat("label id 9 is absent") in flat(res.output)


# --------------------------------------------------------------------------------------
# 6. dry run and previews
# --------------------------------------------------------------------------------------


def test_dry_run_writes_nothing_and_lists_the_cases(datasets, tmp_path) -> None:
    out = tmp_path / "never"
    res = cli(
        "batch", datasets["atlas1"], "--out", out, "--organ", "liver", "--per-case", 2, "--dry-run"
    )
    assert not out.exists()
    for case in CASE_IDS["atlas1"]:
        assert case in res.output
        assert f"{case}_s000" in res.output and f"{case}_s001" in res.output
    assert "4 samples in this shard" in res.output
    assert list(tmp_path.iterdir()) == []


def test_preview_files_and_command(tmp_path) -> None:
    root = write_dataset(tmp_path / "a1", "atlas1", 1)
    out = tmp_path / "out"
    cli("batch", root, "--out", out, "--organ", "liver", "--preview")
    sample = out / "BDMAP_00000000_s000"
    png = sample / "preview.png"
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 1000
    assert "preview.png" in " ".join(read_manifest(out)["BDMAP_00000000_s000"]["outputs"])
    res = cli("preview", sample, "-o", tmp_path / "x.png")
    assert (tmp_path / "x.png").read_bytes()[:8] == PNG
    assert str(tmp_path / "x.png") in flat(res.output)
    missing = tmp_path / "no_such_sample"
    res = cli("preview", missing, "-o", tmp_path / "y.png", code=2)
    assert str(missing) in flat(res.output)
    assert not (tmp_path / "y.png").exists()


# --------------------------------------------------------------------------------------
# 7. the real CT
# --------------------------------------------------------------------------------------


@pytest.fixture
def real_files(totalseg, tmp_path):
    ct = tmp_path / "in" / "example_ct.nii.gz"
    seg = tmp_path / "in" / "example_seg.nii.gz"
    save(ct, np.array(totalseg.image), totalseg.affine)
    save(seg, np.array(totalseg.labels), totalseg.affine)
    return ct, seg


@pytest.mark.network
def test_synth_on_the_real_ct(totalseg, real_files, tmp_path) -> None:
    ct, seg = real_files
    out = tmp_path / "out"
    cli("synth", ct, "--mask", seg, "--label-id", 5, "--organ", "liver", "--out", out)
    sample = out / "example_ct_s000"
    check_atlas_sample(sample, ct)
    np.testing.assert_array_equal(
        arr(sample / "segmentations" / "liver.nii.gz") > 0, totalseg.mask(5)
    )


@pytest.mark.network
def test_batch_csv_on_the_real_ct(totalseg, real_files, tmp_path) -> None:
    ct, seg = real_files
    sheet = tmp_path / "in" / "cases.csv"
    with open(sheet, "w", newline="") as f:
        csv.writer(f).writerows(
            [
                ["ct", "mask", "organ", "label_id"],
                [ct.name, seg.name, "liver", "5"],
                [ct.name, seg.name, "kidney", "2;3"],
                [ct.name, seg.name, "pancreas", "7"],
            ]
        )
    out = tmp_path / "out"
    organs = ("liver", "kidney", "pancreas")
    cli("batch", sheet, "--out", out, "--organ", ",".join(organs), "--seed", 3, "--no-mass-effect")
    sample = out / "example_ct_s000"
    meta = check_atlas_sample(sample, ct, organs, contained=False)
    assert meta["skipped_organs"] == {}
    for organ, ids in (("liver", (5,)), ("kidney", (2, 3)), ("pancreas", (7,))):
        np.testing.assert_array_equal(
            arr(sample / "segmentations" / f"{organ}.nii.gz") > 0, totalseg.mask(*ids)
        )
    assert int(totalseg.mask(7).sum()) == 644
    # nnU-Net format from the same CSV: one label pair per organ
    nn = tmp_path / "nn"
    cli("batch", sheet, "--out", nn, "--organ", ",".join(organs), "--seed", 3, "--format", "nnunet")
    ds = check_nnunet_output(nn, 7)
    assert [ds["labels"][LESION_NAMES[o]] for o in organs] == [2, 4, 6]
    lab = arr(nn / "labelsTr" / "example_ct_s000.nii.gz")
    assert (lab == 2).any() and (lab == 4).any()


# --------------------------------------------------------------------------------------
# 8. error messages
# --------------------------------------------------------------------------------------


def test_unknown_organ_lists_the_valid_ones(datasets, scan_files, tmp_path) -> None:
    _, ct, mask, _ = scan_files
    for args in (
        ["batch", datasets["atlas1"], "--out", tmp_path / "o", "--organ", "liver,brain"],
        ["synth", ct, "--mask", mask, "--organ", "brain", "--out", tmp_path / "o"],
    ):
        res = cli(*args, code=2)
        text = flat(res.output)
        assert "unknownorgan'brain'" in text
        assert "valid:" + ",".join(ORGANS) in text
    assert not (tmp_path / "o").exists()


def test_cuda_device_is_refused_clearly(datasets, scan_files, tmp_path) -> None:
    """Without a usable GPU, --device cuda exits 2 saying what is missing (here: CuPy)."""
    try:
        import cupy  # noqa: F401

        pytest.skip("CuPy is installed here")
    except ImportError:
        pass
    _, ct, mask, _ = scan_files
    for args in (
        ["batch", datasets["atlas1"], "--out", tmp_path / "o", "--organ", "liver"],
        ["synth", ct, "--mask", mask, "--organ", "liver", "--out", tmp_path / "o"],
    ):
        for device in ("cuda", "cuda:1"):
            res = cli(*args, "--device", device, code=2)
            assert f"--device {device}" in res.output
            assert "CuPy" in res.output and "synthgen[cuda12]" in flat(res.output)
        res = cli(*args, "--device", "tpu", code=2)
        assert flat("--device must be auto, cpu, cuda or cuda:N, got 'tpu'") in flat(res.output)
    assert not (tmp_path / "o").exists()


def test_unknown_format_fails(datasets, tmp_path) -> None:
    res = cli(
        "batch",
        datasets["atlas1"],
        "--out",
        tmp_path / "o",
        "--organ",
        "liver",
        "--format",
        "foo",
        code=None,
    )
    assert res.exit_code != 0
    assert "unknown format 'foo'" in res.output and "atlas, nnunet" in res.output
    assert not (tmp_path / "o").exists()


def test_synth_names_a_ct_file_after_its_case_folder(scan_files, tmp_path) -> None:
    _, ct, mask, _ = scan_files
    case = tmp_path / "BDMAP_00000042"
    case.mkdir()
    (case / "ct.nii.gz").write_bytes(ct.read_bytes())
    out = tmp_path / "out"
    cli("synth", case / "ct.nii.gz", "--mask", mask, "--organ", "liver", "--out", out)
    assert [p.name for p in out.iterdir() if p.is_dir()] == ["BDMAP_00000042_s000"]


# --------------------------------------------------------------------------------------
# 7. case ids and resume
# --------------------------------------------------------------------------------------


def _two_ct_csv(root: Path) -> tuple[Path, Path]:
    """c1/ct.nii.gz and c2/ct.nii.gz (different scans, one file name) with their liver masks."""
    cts = []
    for k in (1, 2):
        ph = phantom(k)
        cts.append(save(root / f"c{k}" / "ct.nii.gz", ph.image, ph.affine))
        save(root / f"c{k}" / "liver.nii.gz", ph.mask("liver").astype(np.uint8), ph.affine)
    return cts[0], cts[1]


def test_csv_case_ids_do_not_depend_on_row_order(tmp_path) -> None:
    root = tmp_path / "data"
    c1, c2 = _two_ct_csv(root)
    rows = {k: f"c{k}/ct.nii.gz,c{k}/liver.nii.gz,liver\n" for k in (1, 2)}
    sheet = root / "cases.csv"
    out = tmp_path / "out"
    for n, order in enumerate(((1, 2), (2, 1))):
        sheet.write_text("".join(rows[k] for k in order))
        _, cases = discover(sheet)
        assert {c.case_id: c.ct for c in cases} == {"c1_ct": c1, "c2_ct": c2}
        args = ("batch", sheet, "--out", out, "--organ", "liver", "--no-mass-effect")
        res = cli(*args, *(["--resume"] if n else []))
    assert "resume: 2 samples already done, 0 to do" in res.output
    for k, ct in ((1, c1), (2, c2)):
        assert read_manifest(out)[f"c{k}_ct_s000"]["inputs"]["ct"] == str(ct)


def test_resume_refuses_samples_made_from_another_ct(tmp_path) -> None:
    root = tmp_path / "data"
    c1, c2 = _two_ct_csv(root)
    sheet = root / "cases.csv"
    sheet.write_text("c1/ct.nii.gz,c1/liver.nii.gz,liver\n")
    out = tmp_path / "out"
    args = ("batch", sheet, "--out", out, "--organ", "liver", "--no-mass-effect", "--resume")
    cli(*args)
    manifest = (out / "manifest.jsonl").read_bytes()
    # the same file under another spelling is the same input (not the recorded string)
    again = root / "c1" / ".." / "c1" / "ct.nii.gz"
    assert str(again) != str(c1)
    sheet.write_text(f"{again},{root / 'c1' / 'liver.nii.gz'},liver\n")
    res = cli(*args)
    assert "resume: 1 samples already done, 0 to do" in res.output
    # case "ct" is now another scan: its sample in OUT is not that scan's
    sheet.write_text("c2/ct.nii.gz,c2/liver.nii.gz,liver\n")
    res = cli(*args, code=2)
    assert flat("made from other CT files") in flat(res.output)
    assert flat(f"ct_s000 from {c1}, case ct is now {c2}") in flat(res.output)
    assert (out / "manifest.jsonl").read_bytes() == manifest


def test_resume_refuses_an_out_made_with_the_previous_csv_ids(tmp_path) -> None:
    root = tmp_path / "data"
    c1, c2 = _two_ct_csv(root)
    sheet = root / "cases.csv"
    sheet.write_text("".join(f"c{k}/ct.nii.gz,c{k}/liver.nii.gz,liver\n" for k in (1, 2)))
    _, cases = discover(sheet)
    assert [c.case_id for c in cases] == ["c1_ct", "c2_ct"]
    # the OUT of the previous version, whose ids depended on the row order: ct and c2_ct
    out = tmp_path / "out"
    old = [Case("ct", c1, cases[0].organs), Case("c2_ct", c2, cases[1].organs)]
    opts = BatchOptions(("liver",), mass_effect=False)
    assert run_batch(old, opts, out).ok
    manifest = (out / "manifest.jsonl").read_bytes()
    args = ("batch", sheet, "--out", out, "--organ", "liver", "--no-mass-effect")
    for extra in (["--resume"], ["--resume", "--shard", "1/2"], []):  # shard 1/2: c2_ct only
        res = cli(*args, *extra, code=2)
        assert flat(f"(e.g. ct_s000 of case ct from {c1}, which is case c1_ct now)") in flat(
            res.output
        )
        assert flat("use another --out") in flat(res.output)
        assert "(or synthgen" not in res.output  # (made by this version: no other to name)
    assert (out / "manifest.jsonl").read_bytes() == manifest
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["c2_ct_s000", "ct_s000"]
    # a sample of a case that is no longer in the dataset (its CT none of the cases') is kept
    todo, total, done = prepare(cases[1:], opts, out, resume=True)
    assert (todo, total, done) == ([], 1, 1)


def test_resume_keeps_samples_of_a_duplicate_scan_left_out_since(tmp_path) -> None:
    """Two CSV rows of byte-identical scans (a/ct_a, b/ct_b), both done; then a CSV with b
    only: a's samples are another scan's (b kept its id and its samples), not a renaming, so
    the resume goes on."""
    root = tmp_path / "data"
    ph = phantom(1)
    for k in ("a", "b"):
        save(root / k / "liver.nii.gz", ph.mask("liver").astype(np.uint8), ph.affine)
    save(root / "a" / "ct_a.nii.gz", ph.image, ph.affine)
    shutil.copyfile(root / "a" / "ct_a.nii.gz", root / "b" / "ct_b.nii.gz")
    sheet = root / "cases.csv"
    sheet.write_text("a/ct_a.nii.gz,a/liver.nii.gz,liver\nb/ct_b.nii.gz,b/liver.nii.gz,liver\n")
    out = tmp_path / "out"
    args = ("batch", sheet, "--out", out, "--organ", "liver", "--no-mass-effect")
    cli(*args)
    sheet.write_text("b/ct_b.nii.gz,b/liver.nii.gz,liver\n")
    cli(*args, "--resume")
    # a renaming (b's samples under another id, b's own id with none) is still refused
    manifest = out / "manifest.jsonl"
    lines = [ln for ln in manifest.read_text().splitlines() if json.loads(ln)["case"] != "ct_b"]
    assert len(lines) == 1
    manifest.write_text("\n".join(lines) + "\n")
    res = cli(*args, "--resume", code=2)
    assert flat("the case ids changed") in flat(res.output)


def test_csv_ids_do_not_depend_on_where_the_dataset_is(tmp_path) -> None:
    rows = [
        "ct.nii.gz",  # next to the CSV: ct, told apart from sub/ct.nii.gz by sub_ct
        "sub/ct.nii.gz",
        "a/scan.nii",  # one folder, one name, two files: by their sorted paths
        "a/scan.nii.gz",
        "x/y/img.nii.gz",
        "z/y/img.nii.gz",
    ]
    want = {
        "ct.nii.gz": "ct",
        "sub/ct.nii.gz": "sub_ct",
        "a/scan.nii": "a_scan",
        "a/scan.nii.gz": "a_scan_2",
        "x/y/img.nii.gz": "x_y_img",
        "z/y/img.nii.gz": "z_y_img",
    }
    first = tmp_path / "first" / "data"
    for r in rows:
        (first / r).parent.mkdir(parents=True, exist_ok=True)
        (first / r).write_bytes(b"")
    moved = tmp_path / "elsewhere" / "deeper" / "data"
    shutil.copytree(first, moved)
    for root, order in ((first, rows), (first, rows[::-1]), (moved, rows[3:] + rows[:3])):
        sheet = root / "cases.csv"
        sheet.write_text("".join(f"{r},{r},liver\n" for r in order))
        _, cases = discover(sheet)
        assert {c.case_id: c.ct for c in cases} == {v: root / k for k, v in want.items()}
    # a CSV in a folder beside the data's: the leading .. dropped, nothing above it used
    lists = tmp_path / "first" / "lists"
    lists.mkdir()
    (lists / "cases.csv").write_text(
        "../data/sub/ct.nii.gz,m.nii.gz,liver\n../data/ct.nii.gz,m.nii.gz,liver\n"
    )
    assert [c.case_id for c in discover(lists / "cases.csv")[1]] == ["data_ct", "sub_ct"]


def test_csv_rows_of_one_file_under_two_spellings_are_one_case(tmp_path) -> None:
    root = tmp_path / "data"
    c1, _ = _two_ct_csv(root)
    ph = phantom(1)
    save(root / "c1" / "pancreas.nii.gz", ph.mask("pancreas").astype(np.uint8), ph.affine)
    (root / "link.nii.gz").symlink_to(c1)
    sheet = root / "cases.csv"
    rows = [
        "c1/../c1/ct.nii.gz,c1/liver.nii.gz,liver\n",
        "link.nii.gz,c1/pancreas.nii.gz,pancreas\n",
        "c1/ct.nii.gz,c1/liver.nii.gz,liver\n",
    ]
    for order in (rows, rows[::-1]):
        sheet.write_text("".join(order))
        _, cases = discover(sheet)
        assert [(c.case_id, c.ct) for c in cases] == [("ct", c1)]
        assert sorted(cases[0].organs) == ["liver", "pancreas"]
        assert len(cases[0].organs["liver"]) == 2


def test_resume_accepts_a_byte_identical_copy_of_the_dataset(tmp_path) -> None:
    root = tmp_path / "data"
    _two_ct_csv(root)
    (root / "cases.csv").write_text("c1/ct.nii.gz,c1/liver.nii.gz,liver\n")
    out = tmp_path / "out"
    args = ("--out", out, "--organ", "liver", "--no-mass-effect", "--resume")
    cli("batch", root / "cases.csv", *args)
    scratch = tmp_path / "scratch" / "data"  # staged copy, the original still in place
    shutil.copytree(root, scratch)
    res = cli("batch", scratch / "cases.csv", *args)
    assert "resume: 1 samples already done, 0 to do" in res.output
    ct = scratch / "c1" / "ct.nii.gz"  # the same size, one byte else: another scan
    data = bytearray(ct.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ct.write_bytes(bytes(data))
    res = cli("batch", scratch / "cases.csv", *args, code=2)
    assert flat("made from other CT files") in flat(res.output)


def test_resume_from_another_folder_checks_the_recorded_ct(tmp_path, monkeypatch) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for top, k in ((a, 1), (b, 2)):  # data/c1/ct.nii.gz in both: two different scans
        ph = phantom(k)
        save(top / "data" / "c1" / "ct.nii.gz", ph.image, ph.affine)
        save(top / "data" / "c1" / "liver.nii.gz", ph.mask("liver").astype(np.uint8), ph.affine)
        (top / "data" / "cases.csv").write_text("c1/ct.nii.gz,c1/liver.nii.gz,liver\n")
    out = tmp_path / "out"
    args = ("--out", out, "--organ", "liver", "--no-mass-effect", "--resume")
    monkeypatch.chdir(a)
    cli("batch", "data/cases.csv", *args)
    rec = read_manifest(out)["ct_s000"]["inputs"]
    assert rec["ct"] == str(Path.cwd() / "data" / "c1" / "ct.nii.gz")
    assert rec["organs"]["liver"][0]["path"] == str(Path.cwd() / "data/c1/liver.nii.gz")
    monkeypatch.chdir(b)
    res = cli("batch", "../a/data/cases.csv", *args)  # a's scan, from b
    assert "resume: 1 samples already done, 0 to do" in res.output
    res = cli("batch", "data/cases.csv", *args, code=2)  # b's scan, spelled as a's was
    assert flat("made from other CT files") in flat(res.output)


def test_synth_resumes_and_its_errors_name_its_own_options(scan_files, tmp_path) -> None:
    _, ct, mask, _ = scan_files
    out = tmp_path / "out"
    base = ("synth", ct, "--mask", mask, "--organ", "liver", "--out", out, "--no-mass-effect")
    cli(*base)
    res = cli(*base, code=2)  # again: the sample is there
    assert flat("pass --resume to continue") in flat(res.output)
    res = cli(*base, "--n", 2, "--resume")
    assert "resume: 1 samples already done, 1 to do" in res.output
    assert sorted(read_manifest(out)) == ["scan_s000", "scan_s001"]
    res = cli(*base, "--seed", 1, "--resume", code=2)
    assert flat("(seed: 0 there, 1 now); use the same options, or another --out") in flat(
        res.output
    )
    assert "--format" not in res.output


def test_resume_refuses_samples_made_with_other_label_ids(lits_files, tmp_path) -> None:
    """An OUT made with the tumor's id in --label-id (the old advice) is not continued with
    --lesion-id (the samples would mix tumor-as-organ and tumor-as-tumor), nor the reverse;
    the same ids resume."""
    ph, ct, labels, _ = lits_files
    out = tmp_path / "out"
    base = ("synth", ct, "--mask", labels, "--organ", "liver", "--out", out, "--no-mass-effect")
    cli(*base, "--label-id", "1,2")
    res = cli(*base, "--label-id", 1, "--lesion-id", 2, "--n", 2, "--resume", code=2)
    assert flat(
        "holds 1 samples made with other label ids than now (e.g. scan_s000: liver organ ids: "
        "1,2 there, 1 now; liver lesion ids: none there, 2 now); use the same ids, or another "
        "--out"
    ) in flat(res.output)
    assert sorted(read_manifest(out)) == ["scan_s000"]
    cli(*base, "--label-id", "2;1", "--n", 2, "--resume")  # the same ids, however written
    assert sorted(read_manifest(out)) == ["scan_s000", "scan_s001"]
    out2 = tmp_path / "out2"
    base2 = (*base[:-2], out2, "--no-mass-effect")
    cli(*base2, "--label-id", 1, "--lesion-id", 2)
    res = cli(*base2, "--label-id", 1, "--n", 2, "--resume", code=2)
    assert flat("liver lesion ids: 2 there, none now") in flat(res.output)
    cli(*base2, "--label-id", 1, "--lesion-id", 2, "--n", 2, "--resume")
    # binary masks record no ids: nothing to compare, they resume as before
    mask = save(tmp_path / "liver.nii.gz", ph.mask("liver").astype(np.uint8), ph.affine)
    base3 = ("synth", ct, "--mask", mask, "--organ", "liver", "--out", tmp_path / "out3")
    cli(*base3, "--no-mass-effect")
    cli(*base3, "--no-mass-effect", "--n", 2, "--resume")


def test_readme_synth_examples_run_in_order(tmp_path, monkeypatch) -> None:
    text = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if ln.startswith("synthgen synth ")]
    assert len(lines) >= 2
    ph = phantom(0)
    save(tmp_path / "ct.nii.gz", ph.image, ph.affine)
    save(tmp_path / "liver.nii.gz", ph.mask("liver").astype(np.uint8), ph.affine)
    labels = label_map(ph, {"liver": 5})
    labels[cancer_blob(ph)] = 6  # an existing tumor, for --lesion-id 6
    save(tmp_path / "labels.nii.gz", labels, ph.affine)
    monkeypatch.chdir(tmp_path)
    for line in lines:
        cli(*shlex.split(line.split("#")[0])[1:])
    assert any("--lesion-id 6" in line for line in lines)
    check_existing_lesion(
        tmp_path / "out-lesions" / f"{tmp_path.name}_s000",
        ph.mask("liver") & ~cancer_blob(ph),
        cancer_blob(ph),
    )


# --------------------------------------------------------------------------------------
# 9. NIfTI-2 inputs, label maps without ids, CTs without orientation
# --------------------------------------------------------------------------------------


def test_synth_nifti2_input_writes_nifti2_outputs(tmp_path) -> None:
    """A NIfTI-2 CT and mask: every output is NIfTI-2 with the CT's header fields (it used to
    fail every sample with ``Binary block is wrong size``)."""
    ph = phantom(1)
    img = nib.Nifti2Image(ph.image, ph.affine)
    img.set_sform(ph.affine, 1)
    img.set_qform(ph.affine, 1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, tmp_path / "N2.nii.gz")
    liver = ph.mask("liver")
    for name, data in (("N2_liver", liver.astype(np.uint8)), ("N2_liver_f", liver * 1.0)):
        nib.save(nib.Nifti2Image(data, ph.affine), tmp_path / f"{name}.nii.gz")
        out = tmp_path / name
        cli("synth", tmp_path / "N2.nii.gz", "--mask", tmp_path / f"{name}.nii.gz",
            "--organ", "liver", "--out", out, "--no-mass-effect")  # fmt: skip
        sample = out / "N2_s000"
        check_atlas_sample(sample, tmp_path / "N2.nii.gz")
        for f in ("ct", "label", "segmentations/liver", "segmentations/liver_lesion"):
            got = nib.load(sample / f"{f}.nii.gz")
            assert type(got) is nib.Nifti2Image, (name, f)
            if f != "segmentations/liver" or name.endswith("_f"):  # (else: the mask's bytes)
                h = got.header
                assert int(h["sform_code"]) == 1 and int(h["qform_code"]) == 1, (name, f)
                assert h.get_xyzt_units() == ("mm", "sec"), (name, f)
        np.testing.assert_array_equal(arr(sample / "segmentations" / "liver.nii.gz") > 0, liver)


def test_synth_label_map_without_label_id_fails_naming_its_values(scan_files, tmp_path) -> None:
    """A label map given without --label-id used to become one organ (every label > 0.5)."""
    ph, ct, _, _ = scan_files
    labels = save(tmp_path / "labels.nii.gz", label_map(ph, {"liver": 1, "pancreas": 5}), ph.affine)
    out = tmp_path / "out"
    res = cli("synth", ct, "--mask", labels, "--organ", "liver", "--out", out, code=1)
    rec = read_manifest(out)["scan_s000"]
    assert rec["status"] == "failed"
    assert rec["error"].startswith(f"{labels}: holds several non-zero values (1, 5): a label map")
    assert "--label-id" in rec["error"] and "--label-id" in res.output
    assert not (out / "scan_s000").exists()
    # a CSV row without label_id: the same; the row with one works
    sheet = tmp_path / "cases.csv"
    sheet.write_text(f"ct,mask,organ,label_id\n{ct},{labels},liver,\n", encoding="utf-8")
    res = cli("batch", sheet, "--out", tmp_path / "csv", "--organ", "liver", code=1)
    err = read_manifest(tmp_path / "csv")["scan_s000"]["error"]
    assert err.startswith(f"{labels}: holds several non-zero values (1, 5)")
    sheet.write_text(f"ct,mask,organ,label_id\n{ct},{labels},liver,1\n", encoding="utf-8")
    cli("batch", sheet, "--out", tmp_path / "csv1", "--organ", "liver", "--no-mass-effect")
    seg = arr(tmp_path / "csv1" / "scan_s000" / "segmentations" / "liver.nii.gz") > 0
    np.testing.assert_array_equal(seg, ph.mask("liver"))


def test_synth_label_id_takes_several_ids(scan_files, tmp_path) -> None:
    """One organ of several labels (kidney: left 1, right 2) picked with --label-id 1,2; ids
    that are not integers are refused."""
    ph, ct, _, _ = scan_files
    labels = save(
        tmp_path / "kidneys.nii.gz",
        label_map(ph, {"kidney_left": 1, "kidney_right": 2, "liver": 3}),
        ph.affine,
    )
    out = tmp_path / "out"
    cli("synth", ct, "--mask", labels, "--label-id", "1,2", "--organ", "kidney", "--out", out,
        "--no-mass-effect")  # fmt: skip
    seg = arr(out / "scan_s000" / "segmentations" / "kidney.nii.gz") > 0
    np.testing.assert_array_equal(seg, ph.mask("kidney"))
    for opt in ("--label-id", "--lesion-id"):
        res = cli("synth", ct, "--mask", labels, "--label-id", 1, opt, "x", "--organ", "kidney",
                  "--out", tmp_path / "bad", code=2)  # fmt: skip
        assert flat(f"{opt} 'x': give integer ids") in flat(res.output)


@pytest.fixture(scope="module")
def lits_files(tmp_path_factory):
    """A phantom CT and a LiTS-like label map: liver 1, an existing tumor 2 inside it."""
    d = tmp_path_factory.mktemp("lits")
    ph = phantom(1)
    ct = save(d / "scan.nii.gz", ph.image, ph.affine)
    lab = label_map(ph, {"liver": 1, "pancreas": 3})
    cancer = cancer_blob(ph)
    assert cancer.any()
    lab[cancer] = 2
    return ph, ct, save(d / "lits.nii.gz", lab, ph.affine), cancer


def check_existing_lesion(sample: Path, liver: np.ndarray, cancer: np.ndarray) -> None:
    """The existing tumor is tumor (label 2, the lesion mask) and part of the organ; the
    organ is the liver and the tumor, nothing else of the label map."""
    lab = arr(sample / "label.nii.gz")
    assert (lab[cancer] == 2).all()
    assert (arr(sample / "segmentations" / "liver_lesion.nii.gz")[cancer] == 1).all()
    np.testing.assert_array_equal(
        arr(sample / "segmentations" / "liver.nii.gz") > 0, liver | cancer
    )
    np.testing.assert_array_equal(lab > 0, liver | cancer)


def test_synth_lesion_id_keeps_the_existing_tumor_as_tumor(lits_files, tmp_path, monkeypatch):
    """--label-id 1 --lesion-id 2: the existing tumor (2) stays tumor, is part of the organ,
    and is the lesion mask the new tumors keep clear of. (--label-id 1,2 used to be the
    README's advice: it wrote the tumor as organ, and --label-id 1 alone as background.)"""
    import synthgen.api

    ph, ct, labels, cancer = lits_files
    liver = ph.mask("liver") & ~cancer
    seen = []
    plan = synthgen.api.Synthesizer.plan

    def spy(self, *a, **kw):
        seen.append(kw.get("lesion_mask"))
        return plan(self, *a, **kw)

    monkeypatch.setattr(synthgen.api.Synthesizer, "plan", spy)
    base = ("synth", ct, "--mask", labels, "--organ", "liver", "--no-mass-effect")
    for name, ids in (("a", ("--label-id", 1, "--lesion-id", 2)),
                      ("b", ("--label-id", "1,2", "--lesion-id", 2))):  # fmt: skip
        seen.clear()
        cli(*base, *ids, "--out", tmp_path / name)
        sample = tmp_path / name / "scan_s000"
        check_atlas_sample(sample, ct)
        check_existing_lesion(sample, liver, cancer)
        assert len(seen) == 1 and seen[0] is not None
        np.testing.assert_array_equal(seen[0], cancer)
        rec = read_manifest(tmp_path / name)["scan_s000"]
        assert rec["inputs"]["lesions"] == {"liver": [{"path": str(labels), "label_ids": [2]}]}
    # two lesion ids
    lab = arr(labels).copy()
    second = (ph.mask("liver") & ~cancer) & (np.indices(lab.shape)[2] == 20)
    lab[second] = 4
    two = save(tmp_path / "two.nii.gz", lab, ph.affine)
    cli("synth", ct, "--mask", two, "--organ", "liver", "--no-mass-effect", "--label-id", 1,
        "--lesion-id", "2,4", "--out", tmp_path / "two")  # fmt: skip
    check_existing_lesion(tmp_path / "two" / "scan_s000", liver & ~second, cancer | second)
    # --label-id 1,2 alone still means "these ids are the organ" (e.g. two kidneys)
    cli(*base, "--label-id", "1,2", "--out", tmp_path / "organ")
    lab = arr(tmp_path / "organ" / "scan_s000" / "label.nii.gz")
    assert (lab[cancer] == 1).all()
    # --lesion-id names ids of a label map: without --label-id it is refused
    res = cli(*base, "--lesion-id", 2, "--out", tmp_path / "bad", code=2)
    assert flat("give the organ's with --label-id") in flat(res.output)
    assert not (tmp_path / "bad").exists()


def _scaled(data: np.ndarray, affine: np.ndarray, slope: float) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    img.header.set_slope_inter(slope, 0.0)
    return img


@pytest.mark.parametrize(
    "kind", ["uint8_0_1", "uint8_0_255", "float_0_1", "int16_scl_slope", "uint8_slope_noise",
             "float_soft"],
)  # fmt: skip
def test_binary_masks_pass_the_label_map_check(tmp_path, liver_scan, kind) -> None:
    affine, liver = liver_scan
    img = {
        "uint8_0_1": lambda: nib.Nifti1Image(liver.astype(np.uint8), affine),
        "uint8_0_255": lambda: nib.Nifti1Image(liver.astype(np.uint8) * 255, affine),
        "float_0_1": lambda: nib.Nifti1Image(liver.astype(np.float32), affine),
        "int16_scl_slope": lambda: _scaled(liver.astype(np.int16) * 100, affine, 0.01),
        "uint8_slope_noise": lambda: _scaled(liver.astype(np.uint8), affine, 1.0000000591),
        # a probability map: fractions, binarised at > 0.5 as before
        "float_soft": lambda: nib.Nifti1Image(np.where(liver, 0.9, 0.3).astype(np.float32), affine),
    }[kind]()
    p = tmp_path / "m.nii.gz"
    nib.save(img, p)
    m, _ = load_mask_file(MaskSource(p), SHAPE, affine, strict=True)
    np.testing.assert_array_equal(m, liver)


@pytest.mark.parametrize(
    "kind", ["uint8", "int16_negative", "float", "uint8_slope_noise", "other_grid"]
)
def test_label_maps_fail_the_check_and_absent_ids_say_so(tmp_path, liver_scan, kind) -> None:
    affine, liver = liver_scan
    lab = np.where(liver, 1, 0).astype(np.uint8)
    lab[0, 0, :3] = (5, 7, 5)
    img = {
        "uint8": lambda: nib.Nifti1Image(lab, affine),
        "int16_negative": lambda: nib.Nifti1Image(
            (lab.astype(np.int16) - (lab == 7) * 9).astype(np.int16), affine
        ),
        "float": lambda: nib.Nifti1Image(lab.astype(np.float32), affine),
        "uint8_slope_noise": lambda: _scaled(lab, affine, 1.0000000591),
        "other_grid": lambda: nib.Nifti1Image(np.pad(lab, 2), affine),
    }[kind]()
    p = tmp_path / "labels.nii.gz"
    nib.save(img, p)
    with pytest.raises(
        ValueError, match=r"labels\.nii\.gz: holds several non-zero values \((-2, )?1, 5"
    ) as e:
        load_mask_file(MaskSource(p), SHAPE, affine, strict=True)
    assert "--label-id" in str(e.value) and "--lesion-id" in str(e.value)
    assert "for an organ and its tumor" not in str(e.value)
    assert load_mask([MaskSource(p)], SHAPE, affine).any()  # not strict: lesions, vessels
    with pytest.raises(AbsentLabelError, match=r"labels\.nii\.gz: label id 99 is absent from "
                       r"this file \(ids present: "):  # fmt: skip
        load_mask_file(MaskSource(p, (99,)), SHAPE, affine, strict=True)
    with pytest.raises(AbsentLabelError, match=r"label ids 98, 99 are absent"):
        load_mask_file(MaskSource(p, (98, 99)), SHAPE, affine, strict=True)
    assert not load_mask([MaskSource(p, (99,))], SHAPE, affine).any()  # an absent lesion id


def test_unoriented_ct_takes_a_mask_of_its_shape_voxel_for_voxel(tmp_path) -> None:
    """A CT with sform and qform codes 0 (nibabel's fallback affine, x flipped) and an
    oriented mask of its shape: the mask used to be mapped through the affines and land
    x-flipped, off the organ. Now it is taken voxel for voxel, and the record says so."""
    ph = phantom(1)
    liver = ph.mask("liver")
    assert not np.array_equal(liver, liver[::-1])
    img = nib.Nifti1Image(ph.image, None)
    img.header.set_zooms(SPACING)
    nib.save(img, tmp_path / "ct0.nii.gz")
    ct = nib.load(tmp_path / "ct0.nii.gz")
    assert int(ct.header["sform_code"]) == int(ct.header["qform_code"]) == 0
    assert ct.affine[0, 0] == -SPACING[0]
    aff = ct.affine.copy()
    aff[0, 0], aff[0, 3] = SPACING[0], -aff[0, 3]  # oriented, the same box of space
    mask = save(tmp_path / "liver.nii.gz", liver.astype(np.uint8), aff)
    out = tmp_path / "out"
    res = cli("synth", tmp_path / "ct0.nii.gz", "--mask", mask, "--organ", "liver",
              "--out", out, "--no-mass-effect")  # fmt: skip
    sample = out / "ct0_s000"
    np.testing.assert_array_equal(arr(sample / "segmentations" / "liver.nii.gz") > 0, liver)
    lab = arr(sample / "label.nii.gz")
    np.testing.assert_array_equal(lab > 0, liver)
    assert (lab == 2).any()
    changed = arr(sample / "ct.nii.gz") != ph.image
    assert changed.any() and not (changed & ~liver).any()
    hdr = nib.load(sample / "ct.nii.gz").header
    assert int(hdr["sform_code"]) == int(hdr["qform_code"]) == 0
    note = read_manifest(out)["ct0_s000"]["notes"][0]
    assert "no orientation" in note and "voxel for voxel" in note
    assert json.loads((sample / "tumors.json").read_text())["notes"] == [note]
    assert "warning" in res.output and flat("no orientation") in flat(res.output)
    # the affines say x-flipped: a CT with an orientation still maps through them
    np.testing.assert_array_equal(
        load_mask_file(MaskSource(mask), SHAPE, ct.affine)[0], liver[::-1]
    )
    got, plain = load_mask_file(MaskSource(mask), SHAPE, ct.affine, unoriented=True)
    np.testing.assert_array_equal(got, liver)
    assert not plain  # its header is not the CT's: written anew, not copied
    # another shape: still mapped through the affines
    pad = save(tmp_path / "pad.nii.gz", np.pad(liver, 2).astype(np.uint8), aff)
    flipped = load_mask_file(MaskSource(pad), SHAPE, ct.affine, unoriented=True)[0]
    assert flipped.any() and not np.array_equal(flipped, liver)


def test_coarser_mask_of_the_same_field_of_view_covers_the_border_voxels(tmp_path) -> None:
    """A mask on a grid twice as coarse over the same field of view (an organ that fills it,
    as a liver cut by the scan's first and last slices does): every CT voxel lies inside one
    of its voxels and takes its value. The CT's outermost layer of voxels lay outside the
    mask's voxel centres (a quarter of a mask voxel) and was resampled to 0: the organ lost
    its voxels at the scan's border."""
    shape = (12, 10, 8)
    fine = np.diag([1.5, 1.5, 2.0, 1.0])
    coarse = np.diag([3.0, 3.0, 4.0, 1.0])
    coarse[:3, 3] = [0.75, 0.75, 1.0]  # voxel edges at -0.75 / -1.0 mm, as the CT's
    p = save(tmp_path / "coarse.nii.gz", np.ones((6, 5, 4), np.uint8), coarse)
    m = load_mask([MaskSource(p)], shape, fine)
    assert m.all(), np.argwhere(~m)[:4]
    # half a coarse voxel and more beyond the mask's extent stays out
    wide = np.diag([1.5, 1.5, 2.0, 1.0])
    wide[:3, 3] = [-1.5, -1.5, -2.0]  # one CT voxel more on the low side
    m = load_mask([MaskSource(p)], (13, 11, 9), wide)
    assert not m[0].any() and not m[:, 0].any() and not m[:, :, 0].any()
    assert m[1:, 1:, 1:].all()


def test_missing_label_file_is_named(tmp_path) -> None:
    """A case whose label file is missing said only 'no label file for liver_1.nii.gz': not
    which file dataset.json (or the layout) pointed to. Now the reason names it."""
    root = write_dataset(tmp_path / "msd", "msd", 2)
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][1]["label"] = "./labelsTr/renamed.nii.gz"
    (root / "dataset.json").write_text(json.dumps(meta))
    _, cases = discover(root, ["liver"])
    want = root / "labelsTr" / "renamed.nii.gz"
    assert cases[1].missing == {"liver": f"no label file for liver_1.nii.gz ({want} not found)"}
    assert "liver" in cases[0].organs
    del meta["training"]  # found by name: labelsTr/<image's name>
    (root / "dataset.json").write_text(json.dumps(meta))
    (root / "labelsTr" / "liver_1.nii.gz").unlink()
    _, cases = discover(root, ["liver"])
    want = root / "labelsTr" / "liver_1.nii.gz"
    assert cases[1].missing == {"liver": f"no label file for liver_1.nii.gz ({want} not found)"}
    root = write_dataset(tmp_path / "nn", "nnunet", 2)
    (root / "labelsTr" / "abd_001.nii.gz").unlink()
    _, cases = discover(root, ["liver"])
    want = root / "labelsTr" / "abd_001.nii.gz"
    why = f"no label file for abd_001_0000.nii.gz ({want} not found)"
    assert cases[1].missing == {"liver": why}


def test_label_map_with_near_integer_values_finds_its_ids(tmp_path, liver_scan) -> None:
    """A label map stored with a scale slope a hair off 1 loads as 1.0000001, 2.0000002:
    those are ids 1 and 2 (it was 'label id 1 is absent ... ids present: 1, 2'), in the
    batch's mask loading and in the training loaders' label files alike."""
    from synthgen._samples import CaseSource

    affine, liver = liver_scan
    lab = liver.astype(np.uint8)
    idx = np.argwhere(liver)[:20]
    lab[tuple(idx.T)] = 2
    img = nib.Nifti1Image(lab, affine)
    img.header.set_slope_inter(1.0000001, 0.0)
    p = tmp_path / "labels_scaled.nii.gz"
    nib.save(img, p)
    assert nib.load(p).get_fdata().max() != 2.0  # (the values the loaders see)
    np.testing.assert_array_equal(
        load_mask_file(MaskSource(p, (1,)), SHAPE, affine, strict=True)[0], lab == 1
    )
    np.testing.assert_array_equal(load_mask([MaskSource(p, (1, 2))], SHAPE, affine), liver)
    ct = save(tmp_path / "ct.nii.gz", np.zeros(SHAPE, np.int16), affine)
    _, label, _ = CaseSource("c", str(ct), str(p), (1,)).load()
    np.testing.assert_array_equal(label == 1, lab == 1)
    np.testing.assert_array_equal(label == 2, lab == 2)


def test_loader_label_file_on_another_grid_says_what_differs(tmp_path) -> None:
    """A training loader's label file of the image's shape on another grid: the message
    says the affine differs (it said 'label grid (X, Y, Z) differs from the image (X, Y, Z)',
    the same shape twice)."""
    from synthgen._samples import CaseSource

    ph = phantom(1)
    aff = np.diag([*SPACING, 1.0])
    ct = save(tmp_path / "ct.nii.gz", ph.image, aff)
    shifted = aff.copy()
    shifted[0, 3] = 7.5
    lab = save(tmp_path / "lab.nii.gz", ph.mask("liver").astype(np.uint8), shifted)
    with pytest.raises(ValueError, match=r"lab.nii.gz: label grid affine differs"):
        CaseSource("c", str(ct), str(lab), (1,)).load()
    small = save(tmp_path / "small.nii.gz", np.zeros((4, 4, 4), np.uint8), aff)
    with pytest.raises(ValueError, match=r"shape \(4, 4, 4\) differs from the image's"):
        CaseSource("c", str(ct), str(small), (1,)).load()


def test_mask_of_the_ct_shape_on_another_grid_is_told(tmp_path) -> None:
    """A mask of the CT's shape saved with another affine (np.eye(4): the CT's lost) is
    mapped through the affines as before, but no longer silently: a GridWarning from the
    loader, a warning of the batch and a note in the samples' records."""
    from synthgen.layouts import GridWarning

    ph = phantom(1)
    liver = ph.mask("liver")
    aff = np.diag([*SPACING, 1.0])
    ct = save(tmp_path / "ct.nii.gz", ph.image, aff)
    mask = save(tmp_path / "liver.nii.gz", liver.astype(np.uint8), np.eye(4))
    with pytest.warns(GridWarning, match=r"mask has the CT's shape .*voxel sizes 1x1x1 vs"):
        load_mask_file(MaskSource(mask), SHAPE, aff)
    out = tmp_path / "out"
    res = cli(
        "synth", ct, "--mask", mask, "--organ", "liver", "--preset", "liver-classic", "--out", out
    )
    assert flat("mask has the CT's shape") in flat(res.output)
    (rec,) = read_manifest(out).values()
    assert any("its affine is wrong" in n for n in rec["notes"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", GridWarning)  # the CT's own grid: no warning
        load_mask_file(MaskSource(save(tmp_path / "ok.nii.gz", liver.astype(np.uint8), aff)),
                       SHAPE, aff)  # fmt: skip


def test_mask_without_orientation_of_the_ct_shape_is_taken_voxel_for_voxel(tmp_path) -> None:
    """An oriented CT and a mask of its shape with sform and qform codes 0 (as written by
    ``nib.Nifti1Image(mask, None)``): the mask has no place in the CT's world, only
    nibabel's fallback affine (x flipped, centred). It was mapped through that fallback and
    landed mirrored and shifted off the organ, silently; now it is taken voxel for voxel, as
    an oriented mask is for a CT without orientation."""
    ph = phantom(1)
    liver = ph.mask("liver")
    assert not np.array_equal(liver, liver[::-1])
    aff = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])  # LPS, off centre
    aff[:3, 3] = (40.0, 25.0, -30.0)
    ct = save(tmp_path / "ct.nii.gz", ph.image, aff)
    img = nib.Nifti1Image(liver.astype(np.uint8), None)
    img.header.set_zooms(SPACING)
    nib.save(img, tmp_path / "liver0.nii.gz")
    hdr = nib.load(tmp_path / "liver0.nii.gz").header
    assert int(hdr["sform_code"]) == int(hdr["qform_code"]) == 0
    got, plain = load_mask_file(MaskSource(tmp_path / "liver0.nii.gz"), SHAPE, aff)
    np.testing.assert_array_equal(got, liver)
    assert not plain  # its header is not the CT's: written anew on the CT's, not copied
    out = tmp_path / "out"
    cli("synth", ct, "--mask", tmp_path / "liver0.nii.gz", "--organ", "liver",
        "--out", out, "--no-mass-effect")  # fmt: skip
    (sample,) = (d for d in out.iterdir() if d.name.endswith("_s000"))
    lab = arr(sample / "label.nii.gz")
    np.testing.assert_array_equal(lab > 0, liver)
    assert (lab == 2).any()


def test_discover_atlas_with_an_unreadable_folder_fails_only_that_case(tmp_path, monkeypatch):
    """A case folder or segmentations folder that cannot be looked into (no permission) must
    not stop discovery for the whole dataset: the case is found, and loading it fails the
    case naming the file (``Path.is_file`` raises PermissionError there on Python < 3.14)."""
    root = write_dataset(tmp_path / "atlas", "atlas1", 3)
    locked = {root / "BDMAP_00000001" / "segmentations", root / "BDMAP_00000002"}
    real_stat = Path.stat

    def stat(self, *a, **kw):
        if self.parent in locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, *a, **kw)

    monkeypatch.setattr(Path, "stat", stat)
    assert detect_layout(root) == "atlas1"
    _, cases = discover(root, ["liver"])
    by_id = {c.case_id: c for c in cases}
    assert sorted(by_id) == ["BDMAP_00000000", "BDMAP_00000001", "BDMAP_00000002"]
    seg = root / "BDMAP_00000001" / "segmentations"
    assert by_id["BDMAP_00000001"].organs["liver"][0].path == seg / "liver.nii.gz"
    assert by_id["BDMAP_00000002"].ct == root / "BDMAP_00000002" / "ct.nii.gz"


@pytest.mark.parametrize("layout", ["atlas1", "atlas2"])
def test_an_atlas_case_without_its_ct_fails_by_name(tmp_path: Path, layout: str) -> None:
    """A case folder whose CT is missing (an interrupted download or copy) is a bad case like
    one whose labels are missing: the batch names the file and exits 1, instead of leaving
    the case out without a word."""
    root = write_dataset(tmp_path / "in", layout, 3)
    ct_dir = root / "BDMAP_00000001" if layout == "atlas1" else root / "ct" / "BDMAP_00000001"
    (ct_dir / "ct.nii.gz").unlink()
    if layout == "atlas2":
        shutil.rmtree(root / "ct" / "BDMAP_00000002")  # no ct/ folder at all for case 2
    _, cases = discover(root, ["liver"])
    assert [c.case_id for c in cases] == [f"BDMAP_{k:08d}" for k in range(3)]
    out = tmp_path / "out"
    r = runner.invoke(app, ["batch", str(root), "--out", str(out), "--organ", "liver"])
    assert r.exit_code == 1, r.output
    recs = read_manifest(out)
    assert recs["BDMAP_00000000_s000"]["status"] == "done"
    bad = recs["BDMAP_00000001_s000"]
    assert bad["status"] == "failed" and "ct.nii.gz: file not found" in bad["error"]
    if layout == "atlas2":
        assert recs["BDMAP_00000002_s000"]["status"] == "failed"


def test_a_label_map_of_an_organ_and_its_lesions_is_read_once(lits_files, monkeypatch) -> None:
    """The organ's ids and its lesions' ids in one label map: one read (and gunzip) of the
    file per case, not one per use."""
    import synthgen.io as sio
    from synthgen.batch import BatchOptions, load_case

    ph, ct, labels, cancer = lits_files
    case = Case("c", ct, {"liver": (MaskSource(labels, (1,)),)},
                {"liver": (MaskSource(labels, (2,)),)})  # fmt: skip
    reads: list[str] = []
    real = sio.load_nifti

    def spy(path, *a, **kw):
        reads.append(Path(path).name)
        return real(path, *a, **kw)

    monkeypatch.setattr(sio, "load_nifti", spy)
    lc = load_case(case, BatchOptions(organs=("liver",)))
    assert reads == [Path(ct).name, Path(labels).name]
    np.testing.assert_array_equal(lc.lesions["liver"], cancer)
    np.testing.assert_array_equal(lc.organs["liver"], ph.mask("liver") | cancer)
