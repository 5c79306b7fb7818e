"""Small phantom datasets written in every input layout synthgen reads.

``write_dataset(root, layout, n_cases)`` builds ``n_cases`` phantoms (5 x 5 x 6 mm, a fraction
of a second each) and writes them as AbdomenAtlas 1.x, AbdomenAtlas 2.0, MSD, nnU-Net v2 raw
or a CSV, with the pitfalls of REFERENCE section 4 where a layout has them: macOS ``._*`` files
(MSD), an existing cancer label (MSD), label maps (MSD, nnU-Net).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from synthgen.phantom import LABELS, Phantom, make_phantom

SHAPE = (80, 64, 56)
SPACING = (5.0, 5.0, 6.0)
ATLAS_STRUCTURES = (
    "liver",
    "pancreas",
    "kidney_left",
    "kidney_right",
    "colon",
    "esophagus",
    "uterus",
    "aorta",
)


def phantom(k: int) -> Phantom:
    return make_phantom(SHAPE, SPACING, seed=k)


def save(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def label_map(ph: Phantom, names: dict[str, int]) -> np.ndarray:
    lab = np.zeros(ph.image.shape, np.uint8)
    for name, value in names.items():
        lab[ph.mask(name)] = value
    return lab


def cancer_blob(ph: Phantom) -> np.ndarray:
    """A small sphere inside the liver: an existing lesion."""
    liver = ph.mask("liver")
    idx = np.argwhere(liver)
    c = idx[len(idx) // 2]
    ii, jj, kk = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    ball = (ii - c[0]) ** 2 + (jj - c[1]) ** 2 + (kk - c[2]) ** 2 <= 4
    return ball & liver


def write_dataset(root: Path, layout: str, n_cases: int = 3) -> Path:
    """Write a dataset; returns the path to give ``synthgen batch`` (folder or CSV)."""
    root.mkdir(parents=True, exist_ok=True)
    if layout == "csv":
        rows = [["ct", "mask", "organ", "label_id"]]
        for k in range(n_cases):
            ph = phantom(k)
            save(root / "scans" / f"scan{k}.nii.gz", ph.image, ph.affine)
            lab = label_map(ph, {"liver": 1, "pancreas": 2})
            save(root / "masks" / f"scan{k}_labels.nii.gz", lab, ph.affine)
            rows.append([f"scans/scan{k}.nii.gz", f"masks/scan{k}_labels.nii.gz", "liver", "1"])
            rows.append([f"scans/scan{k}.nii.gz", f"masks/scan{k}_labels.nii.gz", "pancreas", "2"])
        path = root / "cases.csv"
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows(rows)
        return path
    if layout in ("atlas1", "atlas2"):
        for k in range(n_cases):
            ph = phantom(k)
            cid = f"BDMAP_{k:08d}"
            ct_dir = root / cid if layout == "atlas1" else root / "ct" / cid
            seg_dir = (root / cid if layout == "atlas1" else root / "label" / cid) / "segmentations"
            save(ct_dir / "ct.nii.gz", ph.image, ph.affine)
            for s in ATLAS_STRUCTURES:
                save(seg_dir / f"{s}.nii.gz", ph.mask(s).astype(np.uint8), ph.affine)
        return root
    if layout == "msd":
        training = []
        for k in range(n_cases):
            ph = phantom(k)
            lab = label_map(ph, {"liver": 1})
            lab[cancer_blob(ph)] = 2
            save(root / "imagesTr" / f"liver_{k}.nii.gz", ph.image, ph.affine)
            save(root / "labelsTr" / f"liver_{k}.nii.gz", lab, ph.affine)
            (root / "imagesTr" / f"._liver_{k}.nii.gz").write_bytes(b"\0\5\26\7macOS junk")
            (root / "labelsTr" / f"._liver_{k}.nii.gz").write_bytes(b"\0\5\26\7macOS junk")
            training.append(
                {"image": f"./imagesTr/liver_{k}.nii.gz", "label": f"./labelsTr/liver_{k}.nii.gz"}
            )
        meta = {
            "name": "Liver",
            "modality": {"0": "CT"},
            "labels": {"0": "background", "1": "liver", "2": "cancer"},
            "numTraining": n_cases,
            "training": training,
        }
        (root / "dataset.json").write_text(json.dumps(meta, indent=2))
        return root
    if layout == "nnunet":
        names = {"liver": 1, "pancreas": 2, "kidney_left": 3, "kidney_right": 4}
        for k in range(n_cases):
            ph = phantom(k)
            save(root / "imagesTr" / f"abd_{k:03d}_0000.nii.gz", ph.image, ph.affine)
            save(root / "labelsTr" / f"abd_{k:03d}.nii.gz", label_map(ph, names), ph.affine)
        meta = {
            "channel_names": {"0": "CT"},
            "labels": {"background": 0, **names},
            "numTraining": n_cases,
            "file_ending": ".nii.gz",
        }
        (root / "dataset.json").write_text(json.dumps(meta, indent=2))
        return root
    raise ValueError(layout)


assert set(ATLAS_STRUCTURES) <= set(LABELS)
