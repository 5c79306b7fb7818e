"""Quality report of synthesized samples: what is actually in the files, against the presets.

:func:`qa_report` scans every sample folder under a root (a folder with ``tumors.json``,
``ct.nii.gz`` and ``label.nii.gz``, as ``synthgen batch --format atlas`` and ``synthgen demo``
write them), measures every tumor from the images and masks, and writes ``qa.json``,
``report.md``, one histogram PNG per quantity and ``montage.png`` into the output folder.

Definitions (everything is measured on the files; ``tumors.json`` only names the organs and
gives the intended values):

* **Tumors** are the connected components (full connectivity: voxels touching by a face, an
  edge or a corner; a tumor's rim voxels can meet the rest along an edge only) of the organ's
  lesion mask ``segmentations/<lesion>.nii.gz``; without it, of ``label.nii.gz == 2``
  (one-organ folders only). Touching tumors count as one. A component that matches no
  planned tumor and whose centroid lies in the box of one of the scan's own lesions
  (``existing_lesions`` in ``tumors.json``, grown by 2 voxels) is that lesion: listed apart
  (``existing_lesions``), neither counted nor measured against the preset.
* **Organ mask**: ``segmentations/<organ>.nii.gz`` (non-zero), else ``label >= 1``. For the
  hollow organs' wall tumors (colon, esophagus) the reference below is the organ's wall: its
  voxels in the soft-tissue window [-150, 300] HU, not the gas or contents of its lumen.
* **voxels**, **volume_mm3** = voxels x |det(affine[:3, :3])|, **diameter_mm** (equivalent
  sphere diameter) = ``(6 V / pi) ** (1/3)``, **mean_hu**: mean CT value over the tumor.
* **organ_median_hu**: median CT value of organ voxels that are not tumor (any organ's lesion
  mask) in a shell around the tumor, 3 to 8 mm out (Euclidean distance in mm on the scan's
  grid, so a 5 mm slice counts 5 mm; on a grid whose finest voxel is coarser than 1.5 mm,
  2 to 3 of those voxels out): past the tumor's blur and halo, near enough to be the
  tissue it replaced. When the shell holds fewer than 20 such voxels: within the
  tumor's bounding box grown by ``margin_mm`` (15 mm) per side; else the whole organ (minus
  tumors). **organ_half_iqr_hu**: half the interquartile range of those voxels.
* **contrast_hu** = organ_median_hu - mean_hu (positive: hypodense).
* **halo_ratio** = (organ_median_hu - mean HU of the ring) / contrast_hu, where the ring is the
  voxels within two of the finest voxel size (mm) outside the tumor that are organ and not
  tumor;
  0 when ``|contrast_hu| < 1``, NaN when the ring is empty. 0: no darkening just outside the
  mask; 1: the ring is as dark as the tumor.
* **inside_share**: share of the tumor's voxels inside the organ mask.
* **gas_voxels**: tumor voxels below -200 HU (tumor drawn over gas): impossible.
* **label_mismatch_voxels** (per sample, when the organ and lesion masks are files in
  ``segmentations/``): voxels where ``label.nii.gz`` disagrees with them (tumor 2 where a
  lesion mask is, else organ 1 where an organ mask is, else 0): impossible (a label map a
  training run reads that is not the sample's masks).
* **tumor_out_of_range**, **ct_out_of_range**: tumor voxels, and all the scan's voxels,
  outside [-1024, 3071] HU: reported, not flagged. The render never moves a voxel out of
  that range and leaves one already outside where it was (a scanner's -3024 HU padding, an
  extended-HU metal clip, even inside a tumor): such values come with the input.

Intended ranges (from the preset recorded in each organ's plan):

* **diameter_in_range** (null for hollow-organ wall tumors, whose classes give segment
  half-lengths): ``2 * lo <= diameter_mm <= 2 * hi`` where ``lo`` / ``hi`` are the
  smallest lower and largest upper ``radius_mm`` bound over the preset's (non-composite) size
  classes. ``diameter_in_class_range`` uses the tumor's own class (from the matched
  ``tumors.json`` record) instead, null when unmatched.
* **contrast_in_range** (absolute and relative presets alike): ``|contrast_hu - ref| <=
  max(0.25 |ref|, 10 HU, organ_half_iqr_hu)`` (the last: a reference of mixed tissue, such as
  renal cortex and medulla, is only that precise) where ``ref`` is the matched record's
  ``mean_contrast_hu`` (the
  renderer's mean intensity drop over that tumor, i.e. what the plan's ``D`` produced after
  texture and blur; the plan's ``contrast_hu`` when the record lacks it); null when unmatched,
  and for hollow-organ wall tumors, whose recorded drop is against what they replaced (mostly
  the lumen's gas), not against the wall.
* **count_in_range**: number of tumors (components) of an organ in a sample within the plan
  size class's ``count`` range (a composite class: the sums of its components' ranges).

A component is matched to the ``tumors.json`` record whose ``center_vox`` lies inside it (the
one with most recorded voxels when several do), else to the nearest record centre within
the component's equivalent diameter.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .io import atomic_write_bytes, load_nifti, save_json
from .presets import LESION_NAMES, ORGANS
from .preview import _ORGAN_COLOUR, _TUMOR_COLOUR, _contour

__all__ = ["CT_RANGE", "GAS_HU", "QUANTITIES", "find_samples", "qa_report"]

CT_RANGE = (-1024.0, 3071.0)
GAS_HU = -200.0
WALL_HU = (-150.0, 300.0)  # a hollow organ's wall: soft tissue, not its lumen's gas
_MARGIN_MM = 15.0
_MIN_REF_VOXELS = 20
_SHELL_MM = (3.0, 8.0)  # the reference shell around a tumor: past its blur and halo
_WINDOW = (40.0, 400.0)
# quantity -> (axis label, per-tumor key or None for the per-sample count)
QUANTITIES: dict[str, str] = {
    "diameter_mm": "equivalent diameter, mm",
    "volume_mm3": "volume, mm^3",
    "count": "tumors per sample and organ",
    "contrast_hu": "contrast (organ median - tumor mean), HU",
    "halo_ratio": "halo ratio",
    "inside_share": "share of tumor voxels inside the organ",
}
_TUMOR_QUANTITIES = ("diameter_mm", "volume_mm3", "contrast_hu", "halo_ratio", "inside_share")


# --------------------------------------------------------------------------------------
# discovery and reading
# --------------------------------------------------------------------------------------


def _is_sample(d: Path) -> bool:
    return all((d / n).is_file() for n in ("tumors.json", "ct.nii.gz", "label.nii.gz"))


def find_samples(root: str | Path, exclude: str | Path | None = None) -> list[Path]:
    """Sample folders under ``root`` (``root`` itself if it is one), sorted; hidden folders
    (``.partial``) and ``exclude`` are skipped."""
    root = Path(root)
    if _is_sample(root):
        return [root]
    ex = Path(exclude).resolve() if exclude is not None else None
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = sorted(
            n for n in dirnames if not n.startswith(".") and (ex is None or (d / n).resolve() != ex)
        )
        if _is_sample(d):
            found.append(d)
            dirnames[:] = []
    return sorted(found)


def _read_meta(path: Path) -> list[dict[str, Any]]:
    """``[{"organ", "plan", "tumors", "existing_lesions"}]`` from either ``tumors.json``
    schema."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON ({type(e).__name__}: {e})") from None
    try:
        entries = doc["organs"] if "organs" in doc else [doc]
        out = []
        for e in entries:
            plan = e.get("plan") or {}
            organ = e.get("organ") or (plan.get("preset") or {}).get("organ")
            if organ not in ORGANS:
                raise ValueError(f"unknown organ {organ!r}")
            tumors = e.get("tumors")
            if tumors is None:
                tumors = plan.get("tumors", [])
            boxes = e.get("existing_lesions") or []
            out.append(
                {"organ": organ, "plan": plan, "tumors": list(tumors), "existing_lesions": boxes}
            )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: malformed tumors file ({type(e).__name__}: {e})") from None
    return out


def _load(path: Path, shape: tuple[int, ...] | None) -> np.ndarray:
    arr, _, _ = load_nifti(path)
    if shape is not None and arr.shape != shape:
        raise ValueError(f"{path}: shape {arr.shape} differs from ct.nii.gz {shape}")
    return arr


# --------------------------------------------------------------------------------------
# intended ranges
# --------------------------------------------------------------------------------------


def _classes(preset: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in (preset.get("classes") or {}).items() if v.get("components") is None}


def _intended(plan: dict[str, Any]) -> dict[str, Any]:
    """Intended ranges of one organ's plan: diameter envelope, count range, contrast."""
    preset = plan.get("preset") or {}
    classes = _classes(preset)
    out: dict[str, Any] = {"preset": preset.get("name"), "size_class": plan.get("size_class")}
    # Hollow-organ wall tumors: a class's radii are the segment's half-length, not a sphere's
    # radius, so no diameter range applies (null); their contrast is against the wall.
    out["wall"] = bool(preset.get("wall"))
    if classes and not out["wall"]:
        lo = min(float(c["radius_mm"][0]) for c in classes.values())
        hi = max(float(c["radius_mm"][1]) for c in classes.values())
        out["diameter_mm"] = [2.0 * lo, 2.0 * hi]
        out["class_diameter_mm"] = {
            k: [2.0 * float(c["radius_mm"][0]), 2.0 * float(c["radius_mm"][1])]
            for k, c in classes.items()
        }
    sc = (preset.get("classes") or {}).get(plan.get("size_class"))
    if sc is not None:
        comps = sc.get("components")
        if comps is not None:
            out["count"] = [
                sum(int(r[0]) for r in comps.values()),
                sum(int(r[1]) for r in comps.values()),
            ]
        elif "count" in sc:
            out["count"] = [int(sc["count"][0]), int(sc["count"][1])]
    con = preset.get("contrast") or {}
    out["contrast_mode"] = con.get("mode", "absolute")
    if "delta_hu" in con:
        out["contrast_delta_hu"] = [float(con["delta_hu"][0]), float(con["delta_hu"][1])]
    return out


def _within(v: float, rng: Sequence[float] | None) -> bool | None:
    if rng is None or not math.isfinite(v):
        return None
    return bool(rng[0] - 1e-9 <= v <= rng[1] + 1e-9)


# --------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------


def _fl(v: Any) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _grow(sl: tuple[slice, ...], pad: Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(
        slice(max(0, s.start - p), min(n, s.stop + p))
        for s, p, n in zip(sl, pad, shape, strict=True)
    )


def _match(
    comp_box: np.ndarray,
    offset: Sequence[int],
    centroid: np.ndarray,
    diam_vox: float,
    recs,
    boxes=(),
) -> dict[str, Any] | None:
    """The record of the tumor a component is: the one whose centre lies in it (most
    voxels if several); else, unless the component is one of the scan's own lesions (its
    centroid in one of ``boxes``, grown by 2 voxels), the nearest centre within its
    equivalent diameter."""
    inside = []
    for r in recs:
        c = [round(float(v)) - o for v, o in zip(r["center_vox"], offset, strict=True)]
        if all(0 <= ci < n for ci, n in zip(c, comp_box.shape, strict=True)) and comp_box[tuple(c)]:
            inside.append(r)
    if inside:
        return max(inside, key=lambda r: int(r.get("voxels") or 0))
    if _in_boxes(centroid, boxes):
        return None
    best, dist = None, max(diam_vox, 1.0)
    for r in recs:
        d = float(np.linalg.norm(np.asarray(r["center_vox"], dtype=float) - centroid))
        if d <= dist:
            best, dist = r, d
    return best


def _in_boxes(point: np.ndarray, boxes) -> bool:
    """Whether ``point`` (voxel) lies in one of ``boxes`` (``[[start, stop], ...]``) grown
    by 2 voxels."""
    return any(
        all(b[0] - 2 <= c < b[1] + 2 for c, b in zip(point, box, strict=True)) for box in boxes
    )


def _measure_sample(d: Path) -> dict[str, Any]:
    from scipy import ndimage

    entries = _read_meta(d / "tumors.json")
    ct, affine, _ = load_nifti(d / "ct.nii.gz")
    shape = ct.shape
    label = _load(d / "label.nii.gz", shape)
    aff = np.asarray(affine, dtype=np.float64)
    voxel_mm3 = float(abs(np.linalg.det(aff[:3, :3])))
    spacing = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
    pad = [math.ceil(_MARGIN_MM / max(s, 1e-6)) for s in spacing]
    # the reference shell and the halo ring, mm from the tumor (Euclidean, on the scan's
    # grid: a thick slice is as far as it is); a coarse grid's shell is 2 to 3 of its finest
    # voxels out, past the ring
    finest = max(float(np.min(spacing)), 1e-6)
    shell_mm = (max(_SHELL_MM[0], 2.0 * finest), max(_SHELL_MM[1], 3.0 * finest))
    ring_mm = 2.0 * finest
    reach = [math.ceil(shell_mm[1] / max(float(s), 1e-6)) + 1 for s in spacing]
    seg = d / "segmentations"
    single = len(entries) == 1

    lesions: dict[str, np.ndarray] = {}
    organs: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}
    files = True  # (every mask a file: label.nii.gz can be checked against them)
    for e in entries:
        organ = e["organ"]
        lp = seg / f"{LESION_NAMES[organ]}.nii.gz"
        if lp.is_file():
            lesions[organ] = _load(lp, shape) != 0
            sources[organ] = str(lp.relative_to(d))
        elif single:
            lesions[organ] = label == 2
            sources[organ] = "label.nii.gz == 2"
        else:
            raise ValueError(f"{lp}: lesion mask missing (needed with several organs)")
        op = seg / f"{organ}.nii.gz"
        organs[organ] = _load(op, shape) != 0 if op.is_file() else label >= 1
        files &= lp.is_file() and op.is_file()
    all_tumor = np.zeros(shape, dtype=bool)
    for m in lesions.values():
        all_tumor |= m
    mismatch = 0
    if files:
        expect = np.zeros(shape, dtype=np.uint8)
        for m in organs.values():
            expect[m] = 1
        expect[all_tumor] = 2
        mismatch = int(np.count_nonzero(expect != label))
        del expect
    ctf = ct  # measured in place; float64 sums below
    out_of_range = int(np.count_nonzero((ct < CT_RANGE[0]) | (ct > CT_RANGE[1])))
    full = ndimage.generate_binary_structure(3, 3)

    organ_out: dict[str, Any] = {}
    largest: tuple[int, tuple[float, float, float]] | None = None
    for e in entries:
        organ = e["organ"]
        intended = _intended(e["plan"])
        les, org = lesions[organ], organs[organ]
        org_ref_all = org & ~all_tumor
        if intended.get("wall"):  # the wall, not the lumen's gas or contents
            org_ref_all &= (ct >= WALL_HU[0]) & (ct <= WALL_HU[1])
        whole: list[np.ndarray] = []  # (the whole organ's values, read if ever needed)
        comps, n = ndimage.label(les, full)
        objs = ndimage.find_objects(comps)
        tumors, existing = [], []
        boxes = e.get("existing_lesions") or []
        for k in range(1, n + 1):
            sl = objs[k - 1]
            comp = comps[sl] == k
            nv = int(comp.sum())
            vol = nv * voxel_mm3
            diam = (6.0 * vol / math.pi) ** (1.0 / 3.0)
            vals = ctf[sl][comp].astype(np.float64)
            mean_hu = float(vals.mean())
            gas = int(np.count_nonzero(vals < GAS_HU))
            odd_t = int(np.count_nonzero((vals < CT_RANGE[0]) | (vals > CT_RANGE[1])))
            inside = float(np.count_nonzero(comp & org[sl])) / nv
            big = _grow(sl, pad, shape)
            # mm from the tumor, in a window around it
            win = _grow(sl, reach, shape)
            dist = ndimage.distance_transform_edt(comps[win] != k, sampling=spacing)
            ref_win = org_ref_all[win]
            # reference: the organ in a shell 3 to 8 mm outside the tumor (past its blur and
            # halo, near enough to be the tissue it replaced), else the box, else all
            shell = (dist >= shell_mm[0]) & (dist <= shell_mm[1]) & ref_win
            ref = org_ref_all[big]
            if shell.sum() >= _MIN_REF_VOXELS:
                near = ctf[win][shell]
            elif ref.sum() >= _MIN_REF_VOXELS:
                near = ctf[big][ref]
            else:
                whole = whole or [ctf[org_ref_all]]
                near = whole[0]
            median, spread = float(np.median(near)), _half_iqr(near)
            contrast = median - mean_hu
            # ring: within two of the finest voxels outside the tumor, organ and not tumor
            ring = (dist > 0) & (dist <= ring_mm) & ref_win
            ring_mean = float(ctf[win][ring].astype(np.float64).mean()) if ring.any() else math.nan
            if not math.isfinite(contrast) or abs(contrast) < 1.0:
                halo = 0.0 if math.isfinite(contrast) else math.nan
            else:
                halo = (median - ring_mean) / contrast
            centroid = np.asarray(ndimage.center_of_mass(comp), dtype=float) + [s.start for s in sl]
            diam_vox = diam / float(np.min(spacing))
            rec = _match(comp, [s.start for s in sl], centroid, diam_vox, e["tumors"], boxes)
            t: dict[str, Any] = {
                "component": k,
                "centroid_vox": [round(float(c), 2) for c in centroid],
                "voxels": nv,
                "volume_mm3": vol,
                "diameter_mm": diam,
                "mean_hu": mean_hu,
                "organ_median_hu": _fl(median),
                "organ_half_iqr_hu": _fl(spread),
                "contrast_hu": _fl(contrast),
                "ring_mean_hu": _fl(ring_mean),
                "halo_ratio": _fl(halo),
                "inside_share": inside,
                "gas_voxels": gas,
                "out_of_range_voxels": odd_t,
                "matched_index": None if rec is None else rec.get("index"),
                "size_class": None if rec is None else rec.get("size_class"),
                "planned_contrast_hu": None if rec is None else _fl(rec.get("contrast_hu")),
                "recorded_mean_contrast_hu": None
                if rec is None or rec.get("mean_contrast_hu") is None
                else _fl(rec["mean_contrast_hu"]),
                "recorded_voxels": None if rec is None else rec.get("voxels"),
            }
            t["diameter_in_range"] = _within(diam, intended.get("diameter_mm"))
            cls_rng = (intended.get("class_diameter_mm") or {}).get(t["size_class"])
            t["diameter_in_class_range"] = _within(diam, cls_rng)
            t["contrast_in_range"] = _contrast_ok(t, intended)
            if rec is None and _in_boxes(centroid, boxes):
                # the scan's own lesion, kept as tumor label: not the preset's
                existing.append(t)
                continue
            tumors.append(t)
            if largest is None or nv > largest[0]:
                largest = (nv, (float(centroid[0]), float(centroid[1]), float(centroid[2])))
        organ_out[organ] = {
            "lesion_source": sources[organ],
            "preset": intended.get("preset"),
            "size_class": intended.get("size_class"),
            "intended": intended,
            "n_tumors": len(tumors),
            "planned_tumors": len(e["tumors"]),
            "count_in_range": _within(float(len(tumors)), intended.get("count")),
            "organ_voxels": int(org.sum()),
            "tumors": tumors,
            "existing_lesions": existing,
        }
    # sums over the tumors' own boxes (impossible: gas in a synthetic tumor only; a scan's
    # own lesion may hold gas, an abscess)
    gas_total = sum(t["gas_voxels"] for o in organ_out.values() for t in o["tumors"])
    tumor_out = sum(
        t["out_of_range_voxels"]
        for o in organ_out.values()
        for t in (*o["tumors"], *o["existing_lesions"])
    )
    return {
        "sample": d.name,
        "path": str(d),
        "shape": list(shape),
        "voxel_mm3": voxel_mm3,
        "ct_out_of_range": out_of_range,
        "tumor_out_of_range": tumor_out,
        "tumor_gas_voxels": gas_total,
        "label_mismatch_voxels": mismatch,
        "organs": organ_out,
        "_largest": largest,
    }


def _half_iqr(v: np.ndarray) -> float:
    """Half the interquartile range of ``v`` (HU): how far the organ's tissue around a tumor
    spreads about its median (noise, and tissues such as renal cortex and medulla)."""
    if v.size == 0:
        return math.nan
    q1, q3 = np.percentile(v.astype(np.float64), [25.0, 75.0])
    return float(q3 - q1) / 2.0


def _contrast_ok(t: dict[str, Any], intended: dict[str, Any]) -> bool | None:
    c = t["contrast_hu"]
    if c is None or intended.get("wall"):
        return None
    # The preset's D is the depth at texture 1; a tumor's mean drop is about D/2 (texture
    # mean ~0.5), so D's range is not the drop's: compare with the drop the renderer recorded
    # for this tumor (input minus output over its voxels), for absolute and relative presets.
    ref = t["recorded_mean_contrast_hu"]
    if ref is None:
        ref = t["planned_contrast_hu"]
    if ref is None:
        return None
    # the measured contrast is against the median of the organ around the tumor, the
    # recorded one against the voxels the tumor replaced: they differ by as much as the
    # tissue there spreads about its median
    spread = t.get("organ_half_iqr_hu")
    spread = spread if spread is not None and math.isfinite(spread) else 0.0
    return bool(abs(c - ref) <= max(0.25 * abs(ref), 10.0, spread))


# --------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------


def _quantiles(values: Sequence[float | None]) -> dict[str, float | None]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    keys = ("min", "p10", "median", "p90", "max")
    if v.size == 0:
        return dict.fromkeys(keys)
    q = np.percentile(v, [0, 10, 50, 90, 100])
    return {k: float(x) for k, x in zip(keys, q, strict=True)}


def _share(flags: Sequence[bool | None]) -> float | None:
    f = [x for x in flags if x is not None]
    return float(sum(f)) / len(f) if f else None


def _summarise(samples: list[dict[str, Any]]) -> dict[str, Any]:
    per: dict[str, dict[str, Any]] = {}
    for s in samples:
        for organ, o in s["organs"].items():
            acc = per.setdefault(
                organ,
                {
                    "samples": 0,
                    "tumors": [],
                    "counts": [],
                    "count_flags": [],
                    "intended": [],
                    "tumor_out_of_range": 0,
                    "tumor_gas_voxels": 0,
                    "existing_lesions": 0,
                    "presets": set(),
                },
            )
            acc["samples"] += 1
            acc["existing_lesions"] += len(o.get("existing_lesions", ()))
            acc["tumors"].extend(o["tumors"])
            acc["counts"].append(o["n_tumors"])
            acc["count_flags"].append(o["count_in_range"])
            acc["intended"].append(o["intended"])
            acc["tumor_out_of_range"] += sum(t["out_of_range_voxels"] for t in o["tumors"])
            acc["tumor_gas_voxels"] += sum(t["gas_voxels"] for t in o["tumors"])
            if o["preset"]:
                acc["presets"].add(o["preset"])
    organs: dict[str, Any] = {}
    for organ, acc in per.items():
        ts = acc["tumors"]
        diam_rngs = [i["diameter_mm"] for i in acc["intended"] if "diameter_mm" in i]
        cnt_rngs = [i["count"] for i in acc["intended"] if "count" in i]
        abs_rngs = [
            i["contrast_delta_hu"]
            for i in acc["intended"]
            if i.get("contrast_mode") == "absolute" and "contrast_delta_hu" in i
        ]
        organs[organ] = {
            "presets": sorted(acc["presets"]),
            "samples": acc["samples"],
            "tumors": len(ts),
            "existing_lesions": acc["existing_lesions"],  # the scans' own, not measured
            "quantiles": {q: _quantiles([t[q] for t in ts]) for q in _TUMOR_QUANTITIES}
            | {"count": _quantiles([float(c) for c in acc["counts"]])},
            "share_diameter_in_range": _share([t["diameter_in_range"] for t in ts]),
            "share_diameter_in_class_range": _share([t["diameter_in_class_range"] for t in ts]),
            "share_contrast_in_range": _share([t["contrast_in_range"] for t in ts]),
            "share_count_in_range": _share(acc["count_flags"]),
            "count_histogram": {
                str(c): int(n)
                for c, n in zip(*np.unique(acc["counts"], return_counts=True), strict=True)
            },
            "intended": {
                "diameter_mm": _envelope(diam_rngs),
                "volume_mm3": None
                if not diam_rngs
                else [math.pi / 6.0 * x**3 for x in _envelope(diam_rngs)],
                "count": _envelope(cnt_rngs),
                "contrast_hu": _envelope(abs_rngs) if abs_rngs else None,
                "contrast_mode": sorted({i.get("contrast_mode") for i in acc["intended"]}),
            },
            "impossible": {"tumor_gas_voxels": acc["tumor_gas_voxels"]},
            "tumor_out_of_range": acc["tumor_out_of_range"],
        }
    return organs


def _envelope(rngs: list[Sequence[float]]) -> list[float] | None:
    if not rngs:
        return None
    return [float(min(r[0] for r in rngs)), float(max(r[1] for r in rngs))]


# --------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, facecolor="white")
    return buf.getvalue()


def _histogram(
    quantity: str, data: dict[str, list[float]], ranges: dict[str, list[float] | None]
) -> bytes:
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    colours = [f"C{i}" for i in range(10)]
    allv = np.asarray([v for vs in data.values() for v in vs], dtype=np.float64)
    log = False
    if quantity == "count":
        hi = int(allv.max()) if allv.size else 1
        bins: Any = np.arange(-0.5, hi + 1.5, 1.0)
    elif allv.size == 0:
        bins = 10
    else:
        lo, hi = float(allv.min()), float(allv.max())
        log = quantity == "volume_mm3" and lo > 0 and hi / lo > 100
        if log:
            bins = np.geomspace(lo, hi * 1.0001, 25)
        else:
            bins = np.linspace(lo, hi, 25) if hi > lo else np.linspace(lo - 0.5, hi + 0.5, 3)
    for i, (organ, vs) in enumerate(sorted(data.items())):
        c = colours[i % len(colours)]
        rng = ranges.get(organ)
        if rng is not None:
            ax.axvspan(rng[0], rng[1], color=c, alpha=0.12, label=f"{organ} intended")
        if vs:
            ax.hist(
                vs,
                bins=bins,
                histtype="step",
                linewidth=1.6,
                color=c,
                label=f"{organ} (n={len(vs)})",
            )
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(QUANTITIES[quantity])
    ax.set_ylabel("count")
    ax.set_title(quantity)
    ax.legend(fontsize=7)
    return _png(fig)


def _montage(samples: list[dict[str, Any]], montage_max: int) -> bytes:
    from .preview import _canonical, _display

    picks = [s for s in samples if s["_largest"] is not None][:montage_max]
    n = max(1, len(picks))
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig = _figure(3.0 * cols, 3.2 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    level, width = _WINDOW
    for ax in axes.ravel():
        ax.set_axis_off()
    if not picks:
        axes[0, 0].text(0.5, 0.5, "no tumors", ha="center", va="center")
    for ax, s in zip(axes.ravel(), picks, strict=False):
        d = Path(s["path"])
        ct, affine, _ = load_nifti(d / "ct.nii.gz")
        organ_m = np.zeros(ct.shape, dtype=bool)
        tumor_m = np.zeros(ct.shape, dtype=bool)
        label = None
        for organ, o in s["organs"].items():
            src = o["lesion_source"]
            if src.endswith(".nii.gz"):
                tumor_m |= _load(d / src, ct.shape) != 0
            else:
                label = _load(d / "label.nii.gz", ct.shape) if label is None else label
                tumor_m |= label == 2
            op = d / "segmentations" / f"{organ}.nii.gz"
            if op.is_file():
                organ_m |= _load(op, ct.shape) != 0
            else:
                label = _load(d / "label.nii.gz", ct.shape) if label is None else label
                organ_m |= label >= 1
        canon = _canonical(affine, ct.shape)
        x, y, z = canon.index(s["_largest"][1])
        img = np.asarray(_display(canon.view(ct)[:, :, z]), dtype=np.float32)
        om = _display(canon.view(organ_m)[:, :, z])
        tm = _display(canon.view(tumor_m)[:, :, z])
        nx, ny, _ = canon.shape
        sx, sy, _ = canon.spacing
        ext = (0.0, nx * sx, 0.0, ny * sy)
        ax.set_axis_on()
        ax.set_facecolor("black")
        ax.imshow(
            img,
            cmap="gray",
            vmin=level - width / 2,
            vmax=level + width / 2,
            extent=ext,
            origin="upper",
        )
        _contour(ax, om, _ORGAN_COLOUR, ext)
        _contour(ax, tm, _TUMOR_COLOUR, ext)
        # zoom on the tumor: display x grows to patient left, y to anterior (top)
        cx = (nx - 1 - x + 0.5) * sx
        cy = (y + 0.5) * sy
        half = max(60.0, 2.0 * (6.0 * s["_largest"][0] * s["voxel_mm3"] / math.pi) ** (1 / 3))
        ax.set_xlim(max(0.0, cx - half), min(ext[1], cx + half))
        ax.set_ylim(max(0.0, cy - half), min(ext[3], cy + half))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{s['sample']} (z={z})", fontsize=7)
    fig.suptitle("largest tumor per sample, axial, L40/W400", fontsize=9)
    return _png(fig)


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------


def _f(v: float | None, nd: int = 1) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100.0 * v:.0f}%"


def _markdown(root: Path, summary: dict[str, Any], plots: dict[str, str], montage: str) -> str:
    lines = [
        "# synthgen QA report",
        "",
        f"Root: `{root}`  ",
        f"Samples: {summary['n_samples']}, tumors: {summary['n_tumors']}  ",
        f"Impossible values: {summary['impossible']['tumor_gas_voxels']} tumor voxels below "
        f"{GAS_HU:.0f} HU, {summary['impossible']['label_mismatch_voxels']} voxels of "
        "label.nii.gz that disagree with the sample's masks  ",
        f"Voxels outside [{CT_RANGE[0]:.0f}, {CT_RANGE[1]:.0f}] HU (the inputs' own: padding, "
        f"metal; not flagged): {summary['ct_out_of_range']} in the scans, "
        f"{summary['tumor_out_of_range']} in tumors",
        "",
        "## Per organ",
        "",
        "| organ | presets | samples | tumors | share diameter in range | share diameter in class "
        "range | share contrast in range | share count in range | tumor voxels out of range | "
        "tumor gas voxels |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for organ, o in summary["organs"].items():
        lines.append(
            f"| {organ} | {', '.join(o['presets'])} | {o['samples']} | {o['tumors']} | "
            f"{_pct(o['share_diameter_in_range'])} | {_pct(o['share_diameter_in_class_range'])} | "
            f"{_pct(o['share_contrast_in_range'])} | {_pct(o['share_count_in_range'])} | "
            f"{o['tumor_out_of_range']} | {o['impossible']['tumor_gas_voxels']} |"
        )
    for organ, o in summary["organs"].items():
        lines += [
            "",
            f"### {organ}",
            "",
            "| quantity | min | p10 | median | p90 | max | intended |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for q in QUANTITIES:
            qs = o["quantiles"][q]
            nd = 3 if q in ("halo_ratio", "inside_share") else 1
            rng = o["intended"].get(q)
            r = "-" if rng is None else f"[{rng[0]:.4g}, {rng[1]:.4g}]"
            lines.append(
                f"| {q} | {_f(qs['min'], nd)} | {_f(qs['p10'], nd)} | {_f(qs['median'], nd)} | "
                f"{_f(qs['p90'], nd)} | {_f(qs['max'], nd)} | {r} |"
            )
        counts = ", ".join(f"{k}: {v}" for k, v in o["count_histogram"].items())
        lines += ["", f"Tumors per sample (count: samples): {counts}"]
    lines += ["", "## Plots", ""]
    lines += [f"- [{q}]({p})" for q, p in plots.items()]
    lines += [f"- [montage]({montage})", "", f"![montage]({montage})", ""]
    lines += [
        "## Rules",
        "",
        "- diameter in range: 2 x smallest to 2 x largest radius_mm over the preset's size "
        "classes; class range: the matched tumor's own class.",
        "- contrast in range: within max(25%, 10 HU, half the IQR of the reference "
        "tissue) of the renderer's recorded "
        "mean_contrast_hu for that tumor (the preset's D is the depth at texture 1, about "
        "twice the mean drop); not applied to hollow-organ wall tumors, whose contrast is "
        f"measured against the wall (organ voxels in [{WALL_HU[0]:g}, {WALL_HU[1]:g}] HU).",
        "- count in range: the plan size class's count range (composite: sum of components).",
        "- Tumors are connected components (full 26-neighbour connectivity); touching tumors "
        "count as one.",
        "",
    ]
    return "\n".join(lines)


def qa_report(
    sample_root: str | Path, out_dir: str | Path | None = None, *, montage_max: int = 12
) -> dict[str, Any]:
    """Measure every sample under ``sample_root`` and write the QA report.

    Args:
        sample_root: A sample folder, or a folder holding sample folders (any depth).
        out_dir: Where to write ``qa.json``, ``report.md``, ``hist_<quantity>.png`` and
            ``montage.png`` (default ``sample_root/qa``).
        montage_max: Samples shown in the montage at most (the first ones, sorted by path).

    Returns:
        The summary: ``n_samples``, ``n_tumors``, ``impossible`` (``tumor_gas_voxels``),
        ``has_impossible``, ``ct_out_of_range`` and ``tumor_out_of_range`` (not flagged),
        ``organs`` (per organ: samples, tumors, quantiles, shares in range, intended ranges,
        impossible counts) and the paths written.

    Raises:
        ValueError: No sample folder under ``sample_root`` (the message names it), or a
            sample's file is unreadable or malformed (the message names the file).
    """
    if montage_max < 1:
        raise ValueError(f"montage_max must be >= 1, got {montage_max}")
    root = Path(sample_root)
    out = Path(out_dir) if out_dir is not None else root / "qa"
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder")
    dirs = find_samples(root, exclude=out)
    if not dirs:
        raise ValueError(f"{root}: no sample folder (tumors.json + ct.nii.gz + label.nii.gz)")
    samples = [_measure_sample(d) for d in dirs]
    organs = _summarise(samples)
    out.mkdir(parents=True, exist_ok=True)

    plots: dict[str, str] = {}
    for q in QUANTITIES:
        data: dict[str, list[float]] = {}
        for s in samples:
            for organ, o in s["organs"].items():
                vs = data.setdefault(organ, [])
                if q == "count":
                    vs.append(float(o["n_tumors"]))
                else:
                    vs.extend(t[q] for t in o["tumors"] if t[q] is not None)
        ranges = {organ: organs[organ]["intended"].get(q) for organ in data}
        name = f"hist_{q}.png"
        atomic_write_bytes(out / name, _histogram(q, data, ranges))
        plots[q] = name
    atomic_write_bytes(out / "montage.png", _montage(samples, montage_max))

    summary: dict[str, Any] = {
        "root": str(root),
        "out_dir": str(out),
        "report": str(out / "report.md"),
        "qa_json": str(out / "qa.json"),
        "montage": str(out / "montage.png"),
        "plots": {q: str(out / p) for q, p in plots.items()},
        "n_samples": len(samples),
        "n_tumors": sum(o["tumors"] for o in organs.values()),
        "impossible": {
            "tumor_gas_voxels": sum(s["tumor_gas_voxels"] for s in samples),
            "label_mismatch_voxels": sum(s["label_mismatch_voxels"] for s in samples),
        },
        "organs": organs,
    }
    summary["has_impossible"] = any(v > 0 for v in summary["impossible"].values())
    summary["ct_out_of_range"] = sum(s["ct_out_of_range"] for s in samples)
    summary["tumor_out_of_range"] = sum(s["tumor_out_of_range"] for s in samples)
    for s in samples:
        s.pop("_largest")
    save_json(
        out / "qa.json",
        {
            "summary": summary,
            "rules": {
                "ct_range_hu": list(CT_RANGE),
                "gas_hu": GAS_HU,
                "margin_mm": _MARGIN_MM,
                "reference_shell_mm": list(_SHELL_MM),
                "connectivity": "full (26-neighbour)",
                "wall_hu": list(WALL_HU),
            },
            "samples": samples,
        },
    )
    atomic_write_bytes(
        out / "report.md", _markdown(root, summary, plots, "montage.png").encode("utf-8")
    )
    return summary
