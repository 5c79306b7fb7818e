"""Dataset layouts: find the CT scans and organ masks of a dataset, whatever its shape.

Supported (detected from the folder's contents, or named explicitly):

``atlas1``
    AbdomenAtlas 1.0/1.1: ``BDMAP_*/ct.nii.gz`` + ``BDMAP_*/segmentations/<structure>.nii.gz``.
``atlas2``
    AbdomenAtlas 2.0: ``ct/BDMAP_*/ct.nii.gz`` + ``label/BDMAP_*/segmentations/*.nii.gz``.
``msd``
    Medical Segmentation Decathlon: ``imagesTr/``, ``labelsTr/`` and a ``dataset.json`` whose
    ``labels`` map id -> name.
``nnunet``
    nnU-Net v2 raw: ``imagesTr/{case}_0000.nii.gz``, ``labelsTr/{case}.nii.gz`` and a
    ``dataset.json`` whose ``labels`` map name -> id.
``csv``
    A CSV file with the columns ``ct,mask,organ[,label_id[,lesion_id]]`` (paths relative to
    the file; ``lesion_id``: label ids of the organ's existing lesions in its label map);
    several rows with the same ``ct`` (the same file, however spelled) make one case with
    several organs. A case's id is its CT's file name; CTs of the same file name in several
    folders are told apart by their folders below the CSV's (``c1_ct``, ``c2_ct``), whatever
    the order of the rows or where the dataset lies.

Discovery reads folder listings and JSON only, never an image. macOS ``._*`` files are
ignored. A case that lacks a requested organ is still listed (its samples then fail with a
clear reason), so nothing is silently skipped.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import stat
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .presets import LESION_NAMES, ORGAN_LABEL_NAMES, ORGANS

__all__ = [
    "LAYOUTS",
    "VESSEL_NAMES",
    "AbsentLabelError",
    "Case",
    "LayoutError",
    "MaskSource",
    "detect_layout",
    "discover",
    "load_mask",
    "load_mask_file",
    "load_organ",
    "parse_label_ids",
]

LAYOUTS = ("atlas1", "atlas2", "msd", "nnunet", "csv")

# Structure files (AbdomenAtlas) that make up each organ; the first set found is used.
_ATLAS_FILES: dict[str, tuple[tuple[str, ...], ...]] = {
    "liver": (("liver",),),
    "pancreas": (("pancreas",),),
    "kidney": (("kidney_left", "kidney_right"), ("kidney",)),
    "colon": (("colon",),),
    "esophagus": (("esophagus",),),
    "uterus": (("uterus",),),
}
# AbdomenAtlas vessel masks: tumors keep the preset's vessel clearance from their union.
VESSEL_NAMES = ("hepatic_vessel", "portal_vein_and_splenic_vein", "aorta", "postcava")
_GENERIC_LESION = re.compile(r"(cancer|tumou?r|lesion|metasta|mass|cyst|carcinoma|neoplasm)")


class LayoutError(ValueError):
    """The input is not a dataset synthgen can read (message says what was expected)."""


class GridWarning(UserWarning):
    """A mask of the CT's shape on another grid (an affine lost or made up when it was
    saved, likely): it is mapped through the affines, as any mask on another grid is."""


class AbsentLabelError(ValueError):
    """A mask file holds none of the label ids asked for (message names the file, the ids
    and a few of the ids it holds)."""


@dataclass(frozen=True)
class MaskSource:
    """One mask file, binarised at > 0.5 or, when ``label_ids`` is set, at those label ids."""

    path: Path
    label_ids: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "label_ids": self.label_ids}


@dataclass(frozen=True)
class Case:
    """One CT scan and where its organ masks are.

    Attributes:
        case_id: Unique, file-name-safe identifier (seeds derive from it).
        ct: Path of the CT image.
        organs: Organ name -> the mask files whose union is the organ.
        lesions: Organ name -> masks of lesions already in the scan (kept as tumor label).
        missing: Organ name -> why it has no mask in this case.
        vessels: Vessel masks (AbdomenAtlas :data:`VESSEL_NAMES`) that tumors keep clear of.
    """

    case_id: str
    ct: Path
    organs: dict[str, tuple[MaskSource, ...]] = field(default_factory=dict)
    lesions: dict[str, tuple[MaskSource, ...]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    vessels: tuple[MaskSource, ...] = ()

    def rooted(self, root: str | Path) -> Case:
        """The case with its relative paths joined to ``root`` (not normalised, so symbolic
        links keep their meaning); absolute paths stay as they are."""

        def src(s: MaskSource) -> MaskSource:
            return replace(s, path=Path(root) / s.path)

        return replace(
            self,
            ct=Path(root) / self.ct,
            organs={o: tuple(map(src, v)) for o, v in self.organs.items()},
            lesions={o: tuple(map(src, v)) for o, v in self.lesions.items()},
            vessels=tuple(map(src, self.vessels)),
        )

    def mask_paths(self, organs: Sequence[str]) -> list[Path]:
        """The files that loading ``organs`` (those the case has) reads, organ masks then
        lesion masks, a path once per load: what :func:`read_once` is given."""
        return [s.path for o in organs if o in self.organs
                for s in (*self.organs[o], *self.lesions.get(o, ()))]  # fmt: skip

    def to_dict(self, absolute: bool = False) -> dict[str, Any]:
        """The case as JSON; ``absolute``: relative paths joined to the current folder
        (:meth:`rooted`)."""
        if absolute:
            return self.rooted(Path.cwd()).to_dict()
        return {
            "case_id": self.case_id,
            "ct": str(self.ct),
            "organs": {o: [s.to_dict() for s in v] for o, v in self.organs.items()},
            "lesions": {o: [s.to_dict() for s in v] for o, v in self.lesions.items()},
            "missing": dict(self.missing),
            "vessels": [s.to_dict() for s in self.vessels],
        }


def _nii(p: Path) -> bool:
    return not p.name.startswith("._") and (p.name.endswith(".nii.gz") or p.name.endswith(".nii"))


def _stem(p: Path) -> str:
    n = p.name
    return n[: -len(".nii.gz")] if n.endswith(".nii.gz") else n[: -len(".nii")]


def _find(folder: Path, stem: str) -> Path | None:
    """``folder/stem.nii.gz`` or ``.nii``, whichever is a file; ``None`` if neither is.

    A folder that cannot be looked into (no permission) gives the ``.nii.gz`` name: whether
    the file is there cannot be told, and loading it then fails the case naming the file and
    why, where ``Path.is_file`` would raise out of the whole discovery (Python < 3.14) or
    call the file missing (3.14)."""
    for ext in (".nii.gz", ".nii"):
        p = folder / f"{stem}{ext}"
        try:
            if stat.S_ISREG(p.stat().st_mode):
                return p
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:
            return folder / f"{stem}.nii.gz"
    return None


def _check_organs(organs: Sequence[str]) -> list[str]:
    out = []
    for o in organs:
        if o not in ORGANS:
            raise LayoutError(f"unknown organ {o!r}; valid: {', '.join(ORGANS)}")
        if o not in out:
            out.append(o)
    if not out:
        raise LayoutError("no organ given")
    return out


def detect_layout(path: str | Path) -> str:
    """Name the layout of ``path`` (one of :data:`LAYOUTS`); ``LayoutError`` if none fits."""
    root = Path(path)
    if root.is_file():
        if root.suffix.lower() == ".csv":
            return "csv"
        raise LayoutError(f"{root}: a file input must be a .csv of ct,mask,organ[,label_id]")
    if not root.is_dir():
        raise LayoutError(f"{root}: no such file or folder")
    ds = root / "dataset.json"
    if (root / "imagesTr").is_dir() and (root / "labelsTr").is_dir():
        meta = _read_json(ds) if ds.is_file() else {}
        if "channel_names" in meta or "file_ending" in meta:
            return "nnunet"
        if meta:
            return "msd"
        raise LayoutError(f"{root}: imagesTr/labelsTr found but no dataset.json to name labels")
    if (root / "ct").is_dir() and (root / "label").is_dir():
        return "atlas2"
    for sub in sorted(root.iterdir()):
        try:
            if sub.is_dir() and _find(sub, "ct") and (sub / "segmentations").is_dir():
                return "atlas1"
        except OSError:  # a case folder that cannot be looked into: the others tell
            continue
    raise LayoutError(
        f"{root}: not a dataset synthgen knows (expected AbdomenAtlas CASE/ct.nii.gz + "
        "CASE/segmentations/, AbdomenAtlas 2.0 ct/ + label/, MSD or nnU-Net imagesTr/ + "
        "labelsTr/ + dataset.json, or a .csv)"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LayoutError(f"{path}: cannot read JSON ({e})") from None


def _atlas_case(case_id: str, ct: Path, segdir: Path, organs: list[str]) -> Case:
    found: dict[str, tuple[MaskSource, ...]] = {}
    lesions: dict[str, tuple[MaskSource, ...]] = {}
    missing: dict[str, str] = {}
    for organ in organs:
        for names in _ATLAS_FILES[organ]:
            paths = [_find(segdir, n) for n in names]
            if all(p is not None for p in paths):
                found[organ] = tuple(MaskSource(p) for p in paths if p is not None)
                break
        else:
            want = " or ".join("+".join(n) for n in _ATLAS_FILES[organ])
            missing[organ] = f"no {want} mask in {segdir}"
        lesion = _find(segdir, LESION_NAMES[organ])
        if lesion is not None:
            lesions[organ] = (MaskSource(lesion),)
    vessels = tuple(MaskSource(p) for n in VESSEL_NAMES if (p := _find(segdir, n)) is not None)
    return Case(case_id, ct, found, lesions, missing, vessels)


def _discover_atlas1(root: Path, organs: list[str]) -> list[Case]:
    cases = []
    for sub in sorted(root.iterdir()):
        if not sub.is_dir() or sub.name.startswith("."):
            continue
        ct = _find(sub, "ct")
        if ct is None and (sub / "segmentations").is_dir():
            ct = sub / "ct.nii.gz"  # a case without its CT: loading fails it, naming the file
        if ct is not None:
            cases.append(_atlas_case(sub.name, ct, sub / "segmentations", organs))
    return cases


def _discover_atlas2(root: Path, organs: list[str]) -> list[Case]:
    cts = {}
    for sub in sorted((root / "ct").iterdir()):
        ct = _find(sub, "ct") if sub.is_dir() else None
        if ct is not None:
            cts[sub.name] = ct
    # a case with labels and no CT is a case too: loading it fails it, naming the file
    labels = root / "label"
    for sub in sorted(labels.iterdir()):
        if sub.name not in cts and (sub / "segmentations").is_dir():
            cts[sub.name] = root / "ct" / sub.name / "ct.nii.gz"
    cases = []
    for cid, ct in sorted(cts.items()):
        cases.append(_atlas_case(cid, ct, labels / cid / "segmentations", organs))
    return cases


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_")


def _label_map(meta: dict[str, Any], path: Path, name_to_id: bool) -> dict[str, tuple[int, ...]]:
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise LayoutError(f"{path}: dataset.json has no 'labels' mapping")
    out: dict[str, tuple[int, ...]] = {}
    try:
        for k, v in labels.items():
            name, ids = (k, v) if name_to_id else (v, k)
            ids = tuple(int(i) for i in ids) if isinstance(ids, list) else (int(ids),)
            out[_norm(name)] = out.get(_norm(name), ()) + ids
    except (TypeError, ValueError):
        raise LayoutError(f"{path}: dataset.json 'labels' must map names and integer ids") from None
    return out


def _label_ids(
    labels: dict[str, tuple[int, ...]],
    organs: list[str],
    where: Path,
    lesion: tuple[int, ...] | None = None,
):
    """Organ -> ids and organ -> lesion ids from a dataset's label names; ``lesion`` (the
    ``--lesion-id`` of ``organs[0]``, its only organ) replaces the lesion ids the names give."""
    organ_ids: dict[str, tuple[int, ...]] = {}
    lesion_ids: dict[str, tuple[int, ...]] = {}
    present = {o for o in ORGANS if any(n in ORGAN_LABEL_NAMES[o] for n in labels)}
    for organ in organs:
        names = ORGAN_LABEL_NAMES[organ]
        ids = tuple(sorted(i for n, v in labels.items() if n in names for i in v))
        if ids:
            organ_ids[organ] = ids
        own = {_norm(LESION_NAMES[organ]), *(f"{n}_lesion" for n in names)}
        les = set()
        for n, v in labels.items():
            if n in names:
                continue
            lesion_like = _GENERIC_LESION.search(n) is not None
            specific = n in own or (lesion_like and any(n.startswith(f"{o}_") for o in names))
            generic = lesion_like and present == {organ}
            if specific or generic:
                les.update(i for i in v if i != 0)
        if les:
            lesion_ids[organ] = tuple(sorted(les))
    if lesion is not None:
        lesion_ids = {organs[0]: lesion}
    return organ_ids, lesion_ids


def _labelled_case(
    case_id: str,
    ct: Path,
    label: Path | None,
    organ_ids: dict[str, tuple[int, ...]],
    lesion_ids: dict[str, tuple[int, ...]],
    organs: list[str],
    ds: Path,
    wanted: Path | None = None,
) -> Case:
    """``wanted``: where the case's label file should be (named when it is missing)."""
    found, lesions, missing = {}, {}, {}
    for organ in organs:
        if label is None:
            where = f" ({wanted} not found)" if wanted is not None else ""
            missing[organ] = f"no label file for {ct.name}{where}"
        elif organ not in organ_ids:
            missing[organ] = f"{ds} has no label named like {organ!r}"
        else:
            found[organ] = (MaskSource(label, organ_ids[organ]),)
            if organ in lesion_ids:
                lesions[organ] = (MaskSource(label, lesion_ids[organ]),)
    return Case(case_id, ct, found, lesions, missing)


def _in_root(root: Path, text: str) -> Path:
    """A dataset.json path (``./imagesTr/x.nii.gz``) under ``root``: only leading ``./``
    prefixes are dropped (``lstrip("./")`` made ``../x`` ``x`` and ``.x`` ``x``)."""
    while text.startswith("./"):
        text = text[2:]
    return root / text


def _discover_msd(
    root: Path, organs: list[str], lesion: tuple[int, ...] | None = None
) -> list[Case]:
    """``lesion``: the lesion ids of ``organs[0]`` (its only organ), instead of the labels
    dataset.json names like lesions."""
    ds = root / "dataset.json"
    meta = _read_json(ds)
    organ_ids, lesion_ids = _label_ids(_label_map(meta, ds, name_to_id=False), organs, ds, lesion)
    pairs: list[tuple[Path, Path | None]] = []  # image, where its label file should be
    training = meta.get("training")
    if isinstance(training, list) and training:
        for entry in training:
            img = _in_root(root, str(entry.get("image", "")))
            lab = entry.get("label")
            if _nii(img):
                pairs.append((img, _in_root(root, str(lab)) if lab else None))
    else:
        for img in sorted((root / "imagesTr").iterdir()):
            if _nii(img):
                pairs.append(
                    (img, _find(root / "labelsTr", _stem(img)) or root / "labelsTr" / img.name)
                )
    cases = []
    for img, wanted in sorted(pairs, key=lambda p: (p[0], str(p[1]))):
        lab = wanted if wanted is not None and wanted.is_file() else None
        cases.append(
            _labelled_case(_stem(img), img, lab, organ_ids, lesion_ids, organs, ds, wanted)
        )
    return cases


def _discover_nnunet(
    root: Path, organs: list[str], lesion: tuple[int, ...] | None = None
) -> list[Case]:
    """``lesion``: as for :func:`_discover_msd`."""
    ds = root / "dataset.json"
    meta = _read_json(ds)
    organ_ids, lesion_ids = _label_ids(_label_map(meta, ds, name_to_id=True), organs, ds, lesion)
    ending = str(meta.get("file_ending", ".nii.gz"))
    cases = []
    for img in sorted((root / "imagesTr").iterdir()):
        name = img.name
        if name.startswith("._") or not name.endswith(f"_0000{ending}"):
            continue
        cid = name[: -len(f"_0000{ending}")]
        lab = root / "labelsTr" / f"{cid}{ending}"
        cases.append(
            _labelled_case(
                cid, img, lab if lab.is_file() else None, organ_ids, lesion_ids, organs, ds, lab
            )
        )
    return cases


def _qualifiers(ct: Path, base: Path) -> tuple[str, ...]:
    """Folders of ``ct`` below the CSV's folder ``base``, nearest first (leading ``..`` parts
    dropped): what may tell CTs of one file name apart, never the dataset's own location."""
    try:
        rel = Path(os.path.relpath(ct, base)).parent.parts
    except ValueError:  # another drive (Windows): the path's own folders, without the anchor
        rel = ct.parent.parts[1:] if ct.is_absolute() else ct.parent.parts
    k = 0
    while k < len(rel) and rel[k] == "..":
        k += 1
    return rel[k:][::-1]


def _csv_case_ids(cts: list[Path], base: Path) -> dict[Path, str]:
    """Case id of each CT of a CSV in the folder ``base``: its file name without extension
    and ``_0000``. CTs whose ids collide (the same file name in several folders) are each
    qualified by as many of their folders below ``base`` as it takes to tell them apart; what
    still collides (``ct.nii`` and ``ct.nii.gz`` in one folder) gets ``_2``, ``_3``, ... in
    the order of the paths. No id depends on the order of the rows or where the dataset is."""
    stems = {ct: re.sub(r"_0000$", "", _stem(ct)) or "case" for ct in cts}
    parents = {ct: _qualifiers(ct, base) for ct in cts}
    depth = dict.fromkeys(cts, 0)

    def cid(ct: Path) -> str:
        return "_".join([*parents[ct][: depth[ct]][::-1], stems[ct]])

    while True:
        groups: dict[str, list[Path]] = {}
        for ct in cts:
            groups.setdefault(cid(ct), []).append(ct)
        clash = [ct for g in groups.values() if len(g) > 1 for ct in g]
        deeper = [ct for ct in clash if depth[ct] < len(parents[ct])]
        if not deeper:
            break
        for ct in deeper:
            depth[ct] += 1
    ids = {g[0]: name for name, g in groups.items() if len(g) == 1}
    used = set(ids.values())
    for name, group in sorted(groups.items()):
        if len(group) == 1:
            continue
        n = 1
        for ct in sorted(group, key=lambda c: (_rel(c, base), str(c))):
            new = name
            while new in used:
                n += 1
                new = f"{name}_{n}"
            used.add(new)
            ids[ct] = new
    return ids


def _rel(ct: Path, base: Path) -> str:
    try:
        return Path(os.path.relpath(ct, base)).as_posix()
    except ValueError:
        return ct.as_posix()


def parse_label_ids(text: str) -> tuple[int, ...]:
    """Label ids written as ``2``, ``2;3``, ``2,3``, ``2|3`` or ``2 3`` (a CSV's label_id
    column, ``synth --label-id``); ValueError when one is not an integer or there is none."""
    ids = tuple(int(v) for v in re.split(r"[,;| ]+", text.strip()) if v)
    if not ids:
        raise ValueError(f"no label id in {text!r}")
    return ids


def _csv_columns(head: list[str]) -> dict[str, int | None]:
    """Where a CSV's ``label_id`` and ``lesion_id`` are: after a ``ct,mask,organ`` header, by
    their names (a fourth column named otherwise still is ``label_id``, as it always was);
    without a header, ``label_id`` is the fourth column and there is no ``lesion_id`` (a
    fifth column of a headerless file was always ignored, and may be anything: a note)."""
    if not head:
        return {"label_id": 3, "lesion_id": None}
    cols = {k: head.index(k) if k in head else None for k in ("label_id", "lesion_id")}
    if cols["label_id"] is None and len(head) > 3 and head[3] != "lesion_id":
        cols["label_id"] = 3
    return cols


def _discover_csv(
    path: Path, organs: list[str] | None, lesion: tuple[int, ...] | None = None
) -> list[Case]:
    """``lesion``: lesion ids of the rows of ``organs[0]`` (its only organ) that have a
    ``label_id`` and no ``lesion_id``."""
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    except OSError as e:
        raise LayoutError(f"{path}: cannot read ({e})") from None
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    head: list[str] = []
    if rows and [c.strip().lower() for c in rows[0][:3]] == ["ct", "mask", "organ"]:
        head = [c.strip().lower() for c in rows[0]]
        rows = rows[1:]
    cols = _csv_columns(head)
    by_ct: dict[str, dict[str, Any]] = {}  # real path of the CT -> organ -> masks
    lesions: dict[str, dict[str, list[MaskSource]]] = {}  # ... -> organ -> lesion label ids
    spelled: dict[str, set[Path]] = {}  # real path of the CT -> its spellings in the CSV
    for n, row in enumerate(rows, start=1):
        if len(row) < 3:
            raise LayoutError(
                f"{path}: row {n} needs ct,mask,organ[,label_id[,lesion_id]], got {row}"
            )
        ct, mask, organ = (Path(c.strip()) for c in row[:3])
        organ_name = str(organ)
        if organ_name not in ORGANS:
            raise LayoutError(f"{path}: row {n}: unknown organ {organ_name!r}")
        got: dict[str, tuple[int, ...] | None] = {}
        for col, i in cols.items():
            raw = row[i] if i is not None and i < len(row) else ""
            try:
                got[col] = parse_label_ids(raw) if raw.strip() else None
            except ValueError:
                raise LayoutError(f"{path}: row {n}: {col} {raw!r} is not an int") from None
        ids, les = got["label_id"], got["lesion_id"]
        if les is None and lesion is not None and organs and organ_name == organs[0]:
            if ids is None:
                raise LayoutError(
                    f"{path}: row {n}: --lesion-id names label ids of a label map, and this "
                    "row's mask has no label_id"
                )
            les = lesion
        if les is not None and ids is None:
            raise LayoutError(
                f"{path}: row {n}: lesion_id needs a label_id (lesions are label ids of a "
                "label map whose organ ids label_id names)"
            )
        ct = ct if ct.is_absolute() else path.parent / ct
        mask = mask if mask.is_absolute() else path.parent / mask
        real = os.path.realpath(ct)  # one file under several spellings is one case
        spelled.setdefault(real, set()).add(ct)
        entry = by_ct.setdefault(real, {})
        entry.setdefault(organ_name, []).append(MaskSource(mask, ids))
        if les is not None:
            lesions.setdefault(real, {}).setdefault(organ_name, []).append(MaskSource(mask, les))
    base = path.parent
    first = {
        r: min(s, key=lambda c: (_rel(c, base), len(str(c)), str(c))) for r, s in spelled.items()
    }
    ids = _csv_case_ids(list(first.values()), base)
    cases = []
    for real, masks in by_ct.items():
        ct = first[real]
        cid = ids[ct]
        want = organs if organs else list(masks)
        found = {o: tuple(masks[o]) for o in want if o in masks}
        les = {o: tuple(v) for o, v in lesions.get(real, {}).items() if o in found}
        missing = {o: f"no {o} row for {ct} in {path}" for o in want if o not in masks}
        cases.append(Case(cid, ct, found, les, missing))
    return cases


def discover(
    path: str | Path,
    organs: Sequence[str] | None = None,
    layout: str | None = None,
    *,
    lesion_ids: Sequence[int] | None = None,
) -> tuple[str, list[Case]]:
    """List the cases of a dataset.

    Args:
        path: Dataset folder or CSV file.
        organs: Organs wanted (``None`` only for CSV: the organs its rows name).
        layout: Force a layout (one of :data:`LAYOUTS`); detected when ``None``.
        lesion_ids: Label ids of the existing lesions of the organ (exactly one in
            ``organs``) in its label maps: a CSV's rows of that organ that have a
            ``label_id`` and no ``lesion_id`` (a row without ``label_id`` is refused), or
            MSD / nnU-Net labels (instead of those dataset.json names like lesions). The
            organ is then its ids and these together, and the lesions stay tumor label.

    Returns:
        ``(layout, cases)`` with cases sorted by id.

    Raises:
        LayoutError: Unknown layout, unreadable dataset.json or CSV, unknown organ, duplicate
            case ids, no case at all, or ``lesion_ids`` with another number of organs than
            one or with an AbdomenAtlas layout (its lesions are files).
    """
    root = Path(path)
    layout = layout or detect_layout(root)
    if layout not in LAYOUTS:
        raise LayoutError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    lesion = None
    if lesion_ids is not None:
        lesion = tuple(int(i) for i in lesion_ids)
        if not lesion:
            raise LayoutError("no lesion id given")
        if not organs or len(_check_organs(organs)) != 1:
            raise LayoutError(
                "lesion ids name the existing lesions of one organ: give exactly one organ "
                "(a CSV with several: its lesion_id column)"
            )
        if layout in ("atlas1", "atlas2"):
            raise LayoutError(
                f"{root}: lesion ids are for label maps (a CSV, MSD or nnU-Net); AbdomenAtlas "
                "lesions are read from segmentations/<lesion>.nii.gz"
            )
    if layout == "csv":
        cases = _discover_csv(root, _check_organs(organs) if organs else None, lesion)
    elif layout == "msd":
        cases = _discover_msd(root, _check_organs(organs or []), lesion)
    elif layout == "nnunet":
        cases = _discover_nnunet(root, _check_organs(organs or []), lesion)
    else:
        atlas = _discover_atlas1 if layout == "atlas1" else _discover_atlas2
        cases = atlas(root, _check_organs(organs or []))
    if not cases:
        raise LayoutError(f"{root}: no CT scans found in the {layout} layout")
    ids = [c.case_id for c in cases]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise LayoutError(f"{root}: duplicate case ids {dup[:5]}")
    return layout, sorted(cases, key=lambda c: c.case_id)


def _voxel_exact(vox: np.ndarray) -> bool:
    """Whether ``vox`` (CT voxel -> mask voxel) maps voxel centres onto voxel centres: axes
    permuted or flipped, shifted by whole voxels (a mask stored in another orientation)."""
    r, t = np.asarray(vox[:3, :3]), np.asarray(vox[:3, 3])
    ok = np.allclose(r, np.rint(r), atol=1e-3) and np.allclose(t, np.rint(t), atol=1e-3)
    return bool(ok and (np.abs(np.rint(r)).sum(axis=0) == 1).all())


_GRID_NOTES = threading.local()
_READS = threading.local()


@contextlib.contextmanager
def read_once(paths: Sequence[Path]) -> Iterator[None]:
    """Within it, this thread reads each of ``paths`` (the mask files about to be loaded, a
    path once per use) from disk once: an organ and its lesions, or several organs, are
    often label ids of one label map, which was read and gunzipped once per use. A file is
    kept only until its last use."""
    from collections import Counter

    prev = getattr(_READS, "uses", None), getattr(_READS, "data", {})
    _READS.uses, _READS.data = Counter(Path(p) for p in paths), {}
    try:
        yield
    finally:
        _READS.uses, _READS.data = prev


def _read_mask_file(path: Path) -> tuple[np.ndarray, np.ndarray, Any]:
    """``load_nifti(path)``, or what :func:`read_once` kept of it."""
    from .io import load_nifti

    uses = getattr(_READS, "uses", None)
    if uses is None or (uses[path] < 2 and path not in _READS.data):
        return load_nifti(path)
    got = _READS.data.get(path)
    if got is None:
        got = _READS.data[path] = load_nifti(path)
    uses[path] -= 1
    if uses[path] <= 0:
        del _READS.data[path]
    return got


@contextlib.contextmanager
def grid_notes() -> Iterator[list[str]]:
    """Collect the :class:`GridWarning` messages of this thread's mask loads into a list
    instead of warning. Thread-local: ``warnings.catch_warnings`` swaps process-wide state,
    so loads running at once in threads (the batch's loader beside its main thread, a Dask
    worker's threads) took each other's warnings and could leave another's recorder in
    place, swallowing every later warning."""
    prev = getattr(_GRID_NOTES, "notes", None)
    _GRID_NOTES.notes = notes = []
    try:
        yield notes
    finally:
        _GRID_NOTES.notes = prev


def _warn_grid(path: Path, shape, aff: np.ndarray, affine: np.ndarray) -> None:
    """A :class:`GridWarning` for a mask of the CT's shape whose voxels are not the CT's
    (a note, inside :func:`grid_notes`)."""
    import warnings

    def sizes(a) -> str:
        return "x".join(f"{v:g}" for v in np.sqrt((np.asarray(a)[:3, :3] ** 2).sum(axis=0)))

    msg = (
        f"{path}: mask has the CT's shape {tuple(shape)} but another grid (voxel sizes "
        f"{sizes(aff)} vs the CT's {sizes(affine)} mm, or another origin or orientation): "
        "mapped through the affines; if it was drawn on the CT's voxels, its affine is wrong"
    )
    notes = getattr(_GRID_NOTES, "notes", None)
    if notes is not None:
        notes.append(msg)
        return
    warnings.warn(GridWarning(msg), stacklevel=3)


def _same_grid(shape_a, aff_a, shape_b, aff_b) -> bool:
    return tuple(shape_a) == tuple(shape_b) and np.allclose(aff_a, aff_b, atol=1e-3, rtol=0)


def _some_values(data: np.ndarray, limit: int = 8) -> str:
    """A few of the distinct non-zero values of ``data``, for messages (error paths only: it
    reads the whole volume, in slabs, never sorting it at once)."""
    flat = data.ravel(order="K")  # (a view of a loaded volume)
    found: set[Any] = set()
    for i in range(0, flat.size, 1 << 22):
        found.update(np.unique(flat[i : i + (1 << 22)]).tolist())
    found.discard(0)
    vals = sorted(v for v in found if v == v)  # (NaN is no label)
    shown = [f"{v:g}" if isinstance(v, float) else str(v) for v in vals[:limit]]
    return ", ".join(shown + (["..."] if len(vals) > limit else [])) or "none"


def _integral(v: float) -> bool:
    return bool(np.isfinite(v)) and abs(v - round(v)) <= 1e-3 * max(1.0, abs(v))


def snap_label_values(data: np.ndarray) -> np.ndarray:
    """A float label map with its near-integer values made those integers (same dtype and
    layout; other arrays as they are).

    A label map stored as integers with a scale slope a hair off 1 (``1.0000001``, written
    by some tools) or resampled in floating point loads as 0.99999994, 2.0000002 ...: those
    are label ids, as a binary mask's 1.0000000591 is 1. Compared with ``==`` they matched no
    id ("label id 2 is absent ... ids present: 1, 2"). Values farther than ``_integral``'s
    tolerance from an integer are left as they are.
    """
    if data.dtype.kind != "f":
        return data
    r = np.rint(data)
    near = np.abs(data - r) <= 1e-3 * np.maximum(1.0, np.abs(r))
    np.copyto(r, data, where=~near)
    return r


def _check_binary(path: Path, data: np.ndarray, m: np.ndarray) -> Any:
    """Raise if ``data`` (no label id given) is a label map: its voxels above 0.5 hold more
    than one value. Binary masks stored as 0/1, 0/255, 0.0/1.0 floats or scaled integers
    hold one; a float mask of fractions (a probability map) is binarised at > 0.5 as it is.
    Costs a max (and, past a 0/1 integer mask, a masked min) over the volume, no sort.
    Returns an integer mask's maximum (None for floats), which the caller reuses."""
    if data.dtype.kind in "iu":
        hi = data.max(initial=0)
        if hi <= 1:
            return hi
        lo = np.min(data, where=m, initial=hi)
        several = lo != hi
        top = hi
    elif data.dtype.kind == "f":
        if not m.any():
            return None
        lo = float(np.min(data, where=m, initial=np.inf))
        hi = float(np.max(data, where=m, initial=-np.inf))
        several = _integral(lo) and _integral(hi) and round(lo) != round(hi)
        top = None
    else:
        return None
    if several:
        raise ValueError(
            f"{path}: holds several non-zero values ({_some_values(data)}): a label map, "
            "not a binary mask; name the organ's id(s) with --label-id (e.g. 1, or 1,2 for "
            "one organ of two labels) and its existing lesions' with --lesion-id (e.g. 2; a "
            "CSV: its label_id and lesion_id columns, e.g. 1 and 2;3)"
        )
    return top


def _unoriented(header: Any) -> bool:
    """Whether a NIfTI header has neither sform nor qform (both codes 0)."""
    try:
        return int(header["sform_code"]) == 0 and int(header["qform_code"]) == 0
    except (KeyError, TypeError, ValueError):
        return False


def load_mask(
    sources: Sequence[MaskSource],
    shape: tuple[int, ...],
    affine: np.ndarray,
    *,
    unoriented: bool = False,
) -> np.ndarray:
    """Union of ``sources`` as a bool mask on the CT grid ``(shape, affine)``.

    Masks on another grid (cropped, offset, other spacing or orientation) are resampled by
    affine with nearest neighbour. Binary masks are binarised at > 0.5 (masks stored as
    1.0000000591 exist); label maps are compared with their ids (a file that holds none of
    them adds nothing). ``unoriented``: see :func:`load_mask_file`; organ masks are read by
    :func:`load_organ`.

    Raises:
        ValueError: Unreadable file, non-3-D mask, singular affine, or a mask with voxels
            none of which lands on the CT grid (message names the file).
    """

    out = np.zeros(shape, dtype=bool, order="F")
    for src in sources:
        out |= load_mask_file(src, shape, affine, unoriented=unoriented)[0]
    return out


def load_organ(
    sources: Sequence[MaskSource],
    shape: tuple[int, ...],
    affine: np.ndarray,
    *,
    unoriented: bool = False,
) -> tuple[np.ndarray, bool, list[str]]:
    """An organ's mask on the CT grid from its files, by the rules of organ masks (the batch
    and the loaders alike): each file is read with ``strict`` (:func:`load_mask_file`: a
    label map given without ids fails), a file that lacks the organ's label ids adds nothing.

    Returns:
        ``(region, plain, absent)``: the union (all False when no file holds the organ),
        whether the organ's single file already is a 0/1 uint8 gzipped mask on the grid (a
        copy of its bytes is a valid output), and the messages of the files that lack its ids.
    """
    region = np.zeros(shape, dtype=bool, order="F")
    plain, absent = False, []
    for src in sources:
        try:
            m, plain = load_mask_file(src, shape, affine, strict=True, unoriented=unoriented)
        except AbsentLabelError as e:
            absent.append(str(e))
            continue
        region |= m
    return region, plain and len(sources) == 1 and not absent, absent


def load_mask_file(
    src: MaskSource,
    shape: tuple[int, ...],
    affine: np.ndarray,
    *,
    strict: bool = False,
    unoriented: bool = False,
) -> tuple[np.ndarray, bool]:
    """One mask on the CT grid (see :func:`load_mask`), and whether the file already is a
    0/1 uint8 gzipped mask on that grid (so a copy of its bytes is a valid output).

    ``strict`` (an organ mask): a file without label ids must be a binary mask, not a label
    map (``ValueError`` listing a few of its values), and a file with label ids must hold
    one of them (:class:`AbsentLabelError` listing a few of the ids it holds).
    ``unoriented``: the CT has no orientation (sform and qform codes 0), so a mask's
    orientation cannot be related to it: a mask of the CT's shape is taken voxel for voxel,
    one of another shape is still mapped through the affines. So is a mask without
    orientation: one of the CT's shape is taken voxel for voxel.
    """
    from scipy import ndimage

    data, aff, hdr = _read_mask_file(src.path)
    if data.dtype.kind not in "biuf":
        raise ValueError(f"{src.path}: mask has dtype {data.dtype}, not numbers")
    top = None  # (an integer mask's maximum, when the check found it)
    if src.label_ids is not None:
        data = snap_label_values(data)  # (a float label map's 2.0000002 is id 2)
    if src.label_ids is None:
        m = data > 0.5
        if strict:
            top = _check_binary(src.path, data, m)
    elif len(src.label_ids) == 1:
        m = data == src.label_ids[0]
    else:
        m = np.isin(data, src.label_ids)
    if strict and src.label_ids is not None and not m.any():
        ids = ", ".join(map(str, src.label_ids))
        what = f"label ids {ids} are" if len(src.label_ids) > 1 else f"label id {ids} is"
        raise AbsentLabelError(
            f"{src.path}: {what} absent from this file (ids present: {_some_values(data)})"
        )
    same = _same_grid(m.shape, aff, shape, affine)
    # A mask without orientation (both codes 0) has only nibabel's fallback affine (x
    # flipped, centred), no place in the CT's world: one of the CT's shape is taken voxel for
    # voxel, as an oriented mask is for a CT without orientation (mapped through the
    # fallback, it landed mirrored and shifted off the organ, without a word).
    if same or ((unoriented or _unoriented(hdr)) and tuple(m.shape) == tuple(shape)):
        plain = (
            same
            and src.label_ids is None
            and data.dtype == np.uint8
            and src.path.name.endswith(".nii.gz")
            and tuple(hdr.get_data_shape()) == tuple(shape)
            and int(data.max(initial=0) if top is None else top) <= 1
        )
        return m, plain
    if not m.any():
        return np.zeros(shape, dtype=bool, order="F"), False
    try:
        vox = np.linalg.solve(np.asarray(aff, np.float64), np.asarray(affine, np.float64))
    except np.linalg.LinAlgError:
        raise ValueError(f"{src.path}: singular affine, cannot map it to the CT") from None
    if tuple(m.shape) == tuple(shape) and not _voxel_exact(vox):
        _warn_grid(src.path, shape, aff, affine)
    r = ndimage.affine_transform(
        m.view(np.uint8),
        vox[:3, :3],
        offset=vox[:3, 3],
        output_shape=tuple(shape),
        order=0,
        # a CT voxel whose centre lies in the mask's outermost voxels (less than half a mask
        # voxel outside their centres: a coarser mask of the same field of view, a shifted
        # one) takes their value; "constant" gave 0 to every point outside the centres, so
        # an organ at the scan's border lost its outer layer of voxels
        mode="grid-constant",
        cval=0,
    )
    if not r.any():
        raise ValueError(
            f"{src.path}: mask grid {m.shape} does not overlap the CT grid {tuple(shape)} "
            "after resampling by affine (wrong file or broken affine)"
        )
    return np.asfortranarray(r.astype(bool)), False
