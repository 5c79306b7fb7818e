"""Dataset batch synthesis: cases in, training-ready samples out, nothing lost if it stops.

The unit of work is a case (one CT and its masks, loaded once); each case yields
``per_case`` samples. Every sample is a pure function of (case, sample index, options): its
seed derives from (global seed, case id, sample index), so the output bytes are the same for
any number of workers, any sharding, a Dask cluster or a resumed run.

A sample is written completely into ``OUT/.partial/<run tag>/<sample>/`` and then moved into
place (a folder rename for ``atlas``, file renames for ``nnunet``); only then does the manifest
(``OUT/manifest*.jsonl``, one JSON object per line, appended and fsynced) record it as done.
``resume`` skips samples recorded done whose files exist and redoes everything else. A case
that cannot be used (unreadable, truncated, NaN, organ missing or empty or too small, mask grid
that cannot be mapped) is recorded as failed with a one-line reason and the batch goes on.
"""

from __future__ import annotations

import datetime as _dt
import filecmp
import json
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._pool import usable_cpus
from .layouts import (
    Case,
    _unoriented,
    grid_notes,
    load_mask,
    load_mask_file,
    load_organ,
    read_once,
)
from .presets import LESION_NAMES, ORGANS

__all__ = [
    "FORMATS",
    "BatchOptions",
    "Sample",
    "dataset_json",
    "load_case",
    "read_manifest",
    "run_case",
    "run_cases",
    "sample_seed",
    "samples_for",
]

FORMATS = ("atlas", "nnunet")
MANIFEST_GLOB = "manifest*.jsonl"


@dataclass(frozen=True)
class BatchOptions:
    """Everything that decides the bytes of a sample (plus how to write them).

    Attributes:
        organs: Organs to implant tumors in, in order (each sample gets tumors in every
            organ the case has).
        per_case: Samples per case.
        seed: Global seed.
        format: ``"atlas"`` (one folder per sample) or ``"nnunet"`` (a raw dataset).
        size: Size class to force, or ``None`` for each preset's mix.
        presets: Organ -> preset name or TOML path (default: the organ's own preset).
        device: ``"cpu"`` or ``"auto"``.
        compresslevel: gzip level of the ``.nii.gz`` outputs (1 is nibabel's default).
        preview: Also write a PNG preview of each sample.
        mass_effect: ``None``: each preset's ``[mass_effect]`` decides; ``True``/``False``:
            turn it on (with the preset's settings) or off for every organ. Every written
            label map (organ and other segmentations, lesion masks, ``label``) is warped
            with the image.
    """

    organs: tuple[str, ...]
    per_case: int = 1
    seed: int = 0
    format: str = "atlas"
    size: str | None = None
    presets: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"
    compresslevel: int = 1
    preview: bool = False
    mass_effect: bool | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown format {self.format!r}; valid: {', '.join(FORMATS)}")
        if self.per_case < 1:
            raise ValueError(f"per_case must be >= 1, got {self.per_case}")
        if not 0 <= self.compresslevel <= 9:
            raise ValueError(f"compression level must be 0-9, got {self.compresslevel}")
        for o in self.organs:
            if o not in ORGANS:
                raise ValueError(f"unknown organ {o!r}; valid: {', '.join(ORGANS)}")
        twice = sorted({o for o in self.organs if self.organs.count(o) > 1})
        if twice:  # two plans of one organ: nnU-Net ids 3/4 without 1/2, a doubled record
            raise ValueError(f"organ(s) given more than once: {', '.join(twice)}")
        if self.size is not None:  # (every sample would fail: refused at once)
            from .presets import load_preset

            for o in self.organs:
                load_preset(self.presets.get(o, o)).size_class(self.size)

    def identity(self) -> dict[str, Any]:
        """The options a resumed run must share with the run it continues."""
        ident: dict[str, Any] = {
            "organs": list(self.organs),
            "seed": self.seed,
            "format": self.format,
            "size": self.size,
            "presets": dict(sorted(self.presets.items())),
        }
        if self.mass_effect is not None:  # (absent: batches made before the option match)
            ident["mass_effect"] = self.mass_effect
        return ident


@dataclass(frozen=True)
class Sample:
    """One output sample: case, index and derived seed."""

    case_id: str
    index: int
    seed: int

    @property
    def sample_id(self) -> str:
        return f"{self.case_id}_s{self.index:03d}"


def sample_seed(seed: int, case_id: str, index: int) -> int:
    """63-bit seed of sample ``index`` of ``case_id`` (stable across runs and platforms)."""
    from ._hash import seed_of

    return seed_of(int(seed), case_id, int(index))


def samples_for(case: Case, opts: BatchOptions) -> list[Sample]:
    return [
        Sample(case.case_id, k, sample_seed(opts.seed, case.case_id, k))
        for k in range(opts.per_case)
    ]


def _organ_seed(seed: int, organ: str) -> int:
    from ._hash import derive_seed

    return derive_seed(seed, ORGANS.index(organ))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _naming(msg: str, files, prefix: str) -> str:
    """``msg`` as it is when it starts with one of ``files``' paths, else after ``prefix``."""
    return msg if any(msg.startswith(str(f.path)) for f in files) else f"{prefix}: {msg}"


def _short(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if isinstance(e, ValueError) else f"{type(e).__name__}: {msg}"


# --------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------


@dataclass
class LoadedCase:
    """A case in memory: the CT (file order), its geometry, and per-organ regions."""

    case: Case
    image: np.ndarray
    affine: np.ndarray
    header: Any
    organs: dict[str, np.ndarray]  # organ region (organ mask | existing lesions), bool
    indexes: dict[str, Any]  # organ -> OrganIndex (the region's bbox, scanned once)
    lesions: dict[str, np.ndarray | None]
    verbatim: dict[str, Path]  # organ -> input mask file that can be copied as is
    skipped: dict[str, str]  # organ -> reason it cannot be used in this case
    vessels: np.ndarray | None = None  # union of the case's vessel masks, kept clear of
    notes: list[str] = field(default_factory=list)  # what a sample's record should say
    lesion_info: dict[str, dict[str, Any]] = field(default_factory=dict)  # _lesion_record


def load_case(case: Case, opts: BatchOptions) -> LoadedCase:
    """Load a case's CT and organ regions; raises ``ValueError`` when the CT is unusable.

    An organ that is missing or empty (or whose label ids its label map lacks) goes to
    ``skipped`` with its reason instead of failing the case, so the case's other organs still
    get tumors; a mask file that cannot be read or mapped onto the CT, or a label map given
    without label ids, is bad input and fails the case (``ValueError`` naming the file).

    A CT without orientation (sform and qform codes 0) takes masks of its shape voxel for
    voxel (a mask's orientation cannot be related to it); ``notes`` says so.
    """
    from .io import load_nifti
    from .planning import index_organ

    image, affine, header = load_nifti(case.ct)
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise ValueError(f"{case.ct}: image holds NaN or inf values")

    unoriented = _unoriented(header)
    notes = []
    if unoriented:
        notes.append(
            f"{case.ct}: CT has no orientation (sform and qform codes 0): masks of its shape "
            "taken voxel for voxel, not mapped through the affines"
        )
    organs: dict[str, np.ndarray] = {}
    indexes: dict[str, Any] = {}
    lesions: dict[str, np.ndarray | None] = {}
    verbatim: dict[str, Path] = {}
    skipped: dict[str, str] = dict(case.missing)
    # (an organ's and its lesions' ids, or several organs', in one label map: read once;
    # GridWarnings: notes of the samples)
    with read_once(case.mask_paths(opts.organs)), grid_notes() as caught:
        for organ in opts.organs:
            if organ not in case.organs:
                skipped.setdefault(organ, f"no {organ} mask")
                continue
            srcs = case.organs[organ]
            names = ", ".join(str(s.path) for s in srcs)
            try:
                region, plain, absent = load_organ(srcs, image.shape, affine, unoriented=unoriented)
                absent = [" ".join(a.split()) for a in absent]  # (files lacking the ids)
                les = None
                if case.lesions.get(organ):
                    les = load_mask(case.lesions[organ], image.shape, affine, unoriented=unoriented)
                    region |= les
            except Exception as e:  # unreadable, corrupt or unmappable file: the case's error
                files = [*srcs, *case.lesions.get(organ, ())]
                raise ValueError(_naming(_short(e), files, f"{names}: {organ}")) from None
            try:
                index = index_organ(region)  # one scan: bounding box and voxel count
            except ValueError as e:  # an empty organ: skipped, the case's other organs go on
                skipped[organ] = _naming("; ".join(absent) or _short(e), srcs, f"{names}: {organ}")
                continue
            organs[organ], lesions[organ], indexes[organ] = region, les, index
            if plain and les is None:
                verbatim[organ] = srcs[0].path
    notes.extend(caught)
    vessels = None
    with grid_notes() as caught:  # (a vessel mask on another grid: noted as the organs')
        for src in case.vessels if organs else ():
            # each file alone: an unusable one loses only its own vessels, and the samples'
            # records say so (it used to drop every vessel mask of the case without a word)
            try:
                m = load_mask_file(src, image.shape, affine, unoriented=unoriented)[0]
            except ValueError as e:
                notes.append(
                    f"{_naming(_short(e), [src], str(src.path))}: vessel mask not used (tumors "
                    "keep clear of the case's other vessel masks, or of bright voxels if none is "
                    "left)"
                )
                continue
            vessels = m if vessels is None else np.logical_or(vessels, m, out=vessels)
    notes.extend(caught)
    info = {o: _lesion_record(m) for o, m in lesions.items() if m is not None}
    return LoadedCase(
        case, image, affine, header, organs, indexes, lesions, verbatim, skipped, vessels, notes,
        info,
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# one sample
# --------------------------------------------------------------------------------------


def _label_values(opts: BatchOptions) -> dict[str, tuple[int, int]]:
    """Organ -> (organ label, lesion label) in ``label.nii.gz`` / ``labelsTr``."""
    if opts.format == "atlas" or len(opts.organs) == 1:
        return {o: (1, 2) for o in opts.organs}
    return {o: (2 * i + 1, 2 * i + 2) for i, o in enumerate(opts.organs)}


def dataset_json(opts: BatchOptions, num_training: int, name: str = "synthgen") -> dict[str, Any]:
    """nnU-Net v2 ``dataset.json`` of a batch written with ``format="nnunet"``."""
    labels: dict[str, int] = {"background": 0}
    for organ, (lo, le) in _label_values(opts).items():
        labels[organ] = lo
        labels[LESION_NAMES[organ]] = le
    return {
        "channel_names": {"0": "CT"},
        "labels": labels,
        "numTraining": int(num_training),
        "file_ending": ".nii.gz",
        "name": name,
        "description": "Synthetic tumors implanted with synthgen "
        f"(organs: {', '.join(opts.organs)}; seed {opts.seed})",
    }


_OVERRIDES: dict[tuple, Any] = {}


def _synthesizer(opts: BatchOptions, organ: str):
    """The organ's shared synthesizer, its preset's ``[mass_effect]`` switched on or off
    when ``opts.mass_effect`` says so (the switch lands in the preset the plans record, so
    they replay)."""
    import dataclasses

    from .api import Synthesizer, shared_synthesizer

    syn = shared_synthesizer(opts.presets.get(organ, organ), opts.size, opts.device)
    want = opts.mass_effect
    if want is None or syn.preset.mass_effect.enabled == want:
        return syn
    if want and syn.preset.wall is not None:
        # wall tumors (colon, esophagus) push nothing, and a preset with [wall] and mass
        # effect on is refused when a plan's preset is read back: every sample failed
        return syn
    key = (opts.presets.get(organ, organ), opts.size, opts.device, want)
    if key not in _OVERRIDES:
        me = dataclasses.replace(syn.preset.mass_effect, enabled=want)
        preset = dataclasses.replace(syn.preset, mass_effect=me)
        _OVERRIDES[key] = Synthesizer(preset, size=opts.size, device=opts.device)
    return _OVERRIDES[key]


def _synthesize(lc: LoadedCase, sample: Sample, opts: BatchOptions):
    """Render one sample; returns (image, label, per-organ tumor masks, organ records,
    skipped organs, organ regions as written). An organ the preset cannot use (too small
    for its tumors) is skipped with its reason; the sample fails only when no organ is left.

    With mass effect, each organ's large tumors first push the tissue: the image and every
    map of the sample (all organ regions, existing lesions, tumor masks and label so far,
    vessels for the organs still to plan) are warped by the same fields, so all labels stay
    aligned with the image. A field reads and writes only its box, so a map with no voxel in
    any field's box is left as it is: the case's own arrays are copied (and later written
    anew) only when they move."""
    from .mass_effect import plan_fields, render_plan
    from .planning import index_organ

    image = lc.image.copy(order="K")
    label: np.ndarray | None = None
    values = _label_values(opts)
    tumors: dict[str, np.ndarray] = {}
    records = []
    skipped = dict(lc.skipped)
    regions = dict(lc.organs)  # organ -> region of this sample (warped copies once moved)
    lesions = dict(lc.lesions)
    vessels = lc.vessels
    # the maps this sample warped, keyed as in ``maps`` below (its own copies from then on)
    moved: set[tuple[str, str]] = set()
    for n_organ, organ in enumerate(opts.organs):
        region = regions.get(organ)
        if region is None:
            continue
        syn = _synthesizer(opts, organ)
        seed = _organ_seed(sample.seed, organ)
        try:
            plan = syn.plan(
                image,
                region,
                seed=seed,
                affine=lc.affine,
                organ_index=index_organ(region) if ("organ", organ) in moved else lc.indexes[organ],
                vessel_mask=vessels,
                lesion_mask=lesions.get(organ),
            )
        except ValueError as e:
            skipped[organ] = _short(e)
            continue
        maps: dict[tuple[str, str], np.ndarray] = {}
        boxes = [f.box for f in plan_fields(plan)]
        if boxes:  # something will move: every map with voxels in a field's box moves along
            later = [o for o in opts.organs[n_organ + 1 :] if o in regions]
            shared = [(("organ", o), r) for o, r in regions.items() if o != organ]
            shared += [(("lesion", o), m) for o, m in lesions.items()]
            shared += [(("vessels", ""), vessels if later else None)]
            for key, m in shared:  # the case's arrays: copied before they are first warped
                if m is not None and any(m[b].any() for b in boxes):
                    maps[key] = m if key in moved else m.copy(order="K")
            for o, m in tumors.items():  # the sample's own
                maps["tumor", o] = m
            if label is not None:
                maps["label", ""] = label
        out = render_plan(
            plan,
            image,
            region,
            labels=maps,
            out=image,
            device=opts.device,
            affine=lc.affine,
            labels_inplace=True,
        )
        res = out.result
        if out.fields:
            moved.add(("organ", organ))
            moved.update(out.labels)
            region = regions[organ] = res.organ_mask
            for (kind, o), m in out.labels.items():
                if kind == "organ":
                    regions[o] = m
                elif kind == "lesion":
                    lesions[o] = m
                elif kind == "tumor":
                    tumors[o] = m
                elif kind == "label":
                    label = m
                else:
                    vessels = m
        lo, le = values[organ]
        if label is None:  # first organ: the region itself (one pass, no mask indexing)
            label = region.view(np.uint8) * np.uint8(lo)
        else:
            np.copyto(label, np.uint8(lo), where=region & (label == 0))
        tm = np.zeros(image.shape, dtype=bool, order="F")
        for sl, m in res.boxes:  # tumor boxes only
            tm[sl] |= m
            label[sl][m] = le
        rec = {
            "organ": organ,
            "preset": res.plan.preset_name,
            "seed": seed,
            "plan": res.plan.to_dict(),
            "tumors": [t.to_dict() for t in res.tumors],
        }
        if lesions.get(organ) is not None:
            tm |= lesions[organ]
            label[lesions[organ]] = le
            # (a batch whose lesion ids match no voxel anywhere is told: a typo, likely;
            # synthgen qa tells them from synthetic ones): the case's, unless warped here
            moved_les = ("lesion", organ) in moved
            rec.update(_lesion_record(lesions[organ]) if moved_les else lc.lesion_info[organ])
        tumors[organ] = tm
        records.append(rec)
    if not records:
        reasons = "; ".join(f"{o}: {r}" for o, r in skipped.items())
        raise ValueError(f"no usable organ ({reasons})")
    written = {o: (r, ("organ", o) in moved) for o, r in regions.items()}
    return image, label, tumors, records, skipped, written


def _write_sample(
    lc: LoadedCase, sample: Sample, opts: BatchOptions, out: Path, tag: str, arrays
) -> list[str]:
    """Write a sample into the partial folder, then move it into place; returns its files."""

    sid = sample.sample_id
    part = out / ".partial" / tag / sid
    if part.exists():
        shutil.rmtree(part)
    part.mkdir(parents=True)
    try:
        return _write_files(lc, sample, opts, out, part, arrays)
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)  # a failed write leaves nothing behind
        raise


def _write_files(lc: LoadedCase, sample: Sample, opts: BatchOptions, out: Path, part: Path, arrays):
    from .io import atomic_write_bytes, save_json, save_nifti

    image, label, tumors, records, skipped, regions = arrays
    sid = sample.sample_id
    hdr, aff, lvl = lc.header, lc.affine, opts.compresslevel
    meta = {
        "sample": sid,
        "case": lc.case.case_id,
        "seed": sample.seed,
        "organs": records,
        "skipped_organs": skipped,
    }
    if lc.notes:
        meta["notes"] = list(lc.notes)
    if opts.format == "atlas":
        save_nifti(part / "ct.nii.gz", image, aff, header=hdr, compresslevel=lvl)
        save_nifti(part / "label.nii.gz", label, aff, header=hdr, compresslevel=lvl)
        seg = part / "segmentations"
        for organ, tm in tumors.items():
            region, warped = regions[organ]
            if organ in lc.verbatim and not warped:
                atomic_write_bytes(seg / f"{organ}.nii.gz", lc.verbatim[organ].read_bytes())
            else:
                reg = region.view(np.uint8)
                save_nifti(seg / f"{organ}.nii.gz", reg, aff, header=hdr, compresslevel=lvl)
            les = tm.view(np.uint8)
            save_nifti(
                seg / f"{LESION_NAMES[organ]}.nii.gz", les, aff, header=hdr, compresslevel=lvl
            )
        save_json(part / "tumors.json", meta)
        if opts.preview:
            _preview(part / "preview.png", image, label, aff, records, sid)
        final = out / sid
        if final.exists():
            shutil.rmtree(final)
        os.replace(part, final)
        return sorted(str(p.relative_to(out)) for p in final.rglob("*") if p.is_file())
    # nnU-Net raw: imagesTr / labelsTr, plus the plans beside them.
    files = {
        part / f"{sid}_0000.nii.gz": out / "imagesTr" / f"{sid}_0000.nii.gz",
        part / f"{sid}.nii.gz": out / "labelsTr" / f"{sid}.nii.gz",
        part / f"{sid}.json": out / "synthgen_tumors" / f"{sid}.json",
    }
    src = iter(files)
    save_nifti(next(src), image, aff, header=hdr, compresslevel=lvl)
    save_nifti(next(src), label, aff, header=hdr, compresslevel=lvl)
    save_json(next(src), meta)
    if opts.preview:
        prev = part / f"{sid}.png"
        _preview(prev, image, label, aff, records, sid)
        files[prev] = out / "previews" / f"{sid}.png"
    moved: list[Path] = []
    try:
        for a, b in files.items():
            b.parent.mkdir(parents=True, exist_ok=True)
            os.replace(a, b)
            moved.append(b)
    except BaseException:  # the sample fails whole: no image left in imagesTr without label
        for b in moved:
            b.unlink(missing_ok=True)
        raise
    part.rmdir()
    return sorted(str(b.relative_to(out)) for b in files.values())


def _preview(path: Path, image, label, affine, records, title: str) -> None:
    from .preview import preview_arrays

    centers = [t["center_vox"] for r in records for t in r["tumors"]]
    preview_arrays(image, label, affine, centers, path, title=title)


def _record(sample: Sample, case: Case, status: str, t0: float, **kw: Any) -> dict[str, Any]:
    rec = {
        "sample": sample.sample_id,
        "case": case.case_id,
        "index": sample.index,
        "seed": sample.seed,
        "status": status,
        "inputs": case.to_dict(),
        "time": _now(),
        "elapsed_s": round(time.perf_counter() - t0, 3),
    }
    rec.update(kw)
    return rec


def _lesion_record(mask: np.ndarray) -> dict[str, Any]:
    """An organ record's ``existing_lesion_voxels`` and, when there are any, the bounding
    boxes ``[[start, stop], ...]`` of the lesions (connected components, full connectivity;
    labelled within their bounding box, found with the voxel count in one pass)."""
    from scipy import ndimage

    from ._cpu_kernels import bbox

    lo0, hi0, lo1, hi1, lo2, hi2, n = bbox(mask)
    if not n:
        return {"existing_lesion_voxels": 0}
    crop = (slice(lo0, hi0 + 1), slice(lo1, hi1 + 1), slice(lo2, hi2 + 1))
    comps, _ = ndimage.label(mask[crop], ndimage.generate_binary_structure(3, 3))
    boxes = [
        [[s.start + c.start, s.stop + c.start] for s, c in zip(sl, crop, strict=True)]
        for sl in ndimage.find_objects(comps)
    ]
    return {"existing_lesion_voxels": int(n), "existing_lesions": boxes}


def _failed(case: Case, samples, why: str) -> list[dict[str, Any]]:
    """The failure records of every sample of ``case`` (it could not be loaded or made)."""
    t0 = time.perf_counter()
    return [_record(x, case, "failed", t0, error=why) for x in samples]


def _process(lc_or_err, case: Case, samples, opts, out, tag) -> Iterator[dict[str, Any]]:
    if isinstance(lc_or_err, BaseException):
        yield from _failed(case, samples, _short(lc_or_err))
        return
    notes = {"notes": list(lc_or_err.notes)} if lc_or_err.notes else {}
    for sample in samples:
        t0 = time.perf_counter()
        try:
            arrays = _synthesize(lc_or_err, sample, opts)
            files = _write_sample(lc_or_err, sample, opts, out, tag, arrays)
        except Exception as e:  # recorded with its type; the batch goes on
            yield _record(sample, case, "failed", t0, error=_short(e), **notes)
            continue
        organs = [dict(r) for r in arrays[3]]  # (the organs' records, as tumors.json has them)
        yield _record(
            sample,
            case,
            "done",
            t0,
            outputs=files,
            organs=organs,
            skipped_organs=arrays[4],
            **notes,
        )


def _load_or_error(case: Case, opts: BatchOptions):
    try:
        return load_case(case, opts)
    except Exception as e:  # any bad input becomes this case's error, never the batch's
        return e


def run_case(
    case: Case, samples: Sequence[Sample], opts: BatchOptions, out: str | Path, tag: str
) -> list[dict[str, Any]]:
    """Load one case and write its samples; returns one manifest record per sample.

    This is the function workers and Dask run; it never raises for a bad case.
    """
    out = Path(out)
    return list(_process(_load_or_error(case, opts), case, samples, opts, out, tag))


def run_case_from(
    cwd: str, case: Case, samples: Sequence[Sample], opts: BatchOptions, out: str, tag: str
) -> list[dict[str, Any]]:
    """:func:`run_case` in a process whose working folder may not be ``cwd``, the one the
    case's and ``out``'s relative paths are relative to (a Dask worker started elsewhere).

    In ``cwd`` itself the paths stay as given, so the samples' records and ``tumors.json``
    name them as a local run does."""
    try:
        here = os.path.samefile(os.getcwd(), cwd)
    except OSError:  # no working folder, or no ``cwd`` here (the paths then name it)
        here = False
    if not here:
        case, out = case.rooted(cwd), os.path.join(cwd, out)
    return run_case(case, samples, opts, out, tag)


def run_cases(
    work: Iterable[tuple[Case, Sequence[Sample]]], opts: BatchOptions, out: str | Path, tag: str
) -> Iterator[dict[str, Any]]:
    """``run_case`` over many cases in this process, loading the next case while the current
    one is synthesized and written (gzip I/O dominates; the decoders release the GIL)."""
    out = Path(out)
    q: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()
    items = list(work)

    def loader() -> None:
        for case, samples in items:
            if stop.is_set():
                return
            q.put((case, samples, _load_or_error(case, opts)))
        q.put(None)

    th = threading.Thread(target=loader, name="synthgen-loader", daemon=True)
    th.start()
    try:
        while (item := q.get()) is not None:
            case, samples, lc = item
            yield from _process(lc, case, samples, opts, out, tag)
    finally:
        stop.set()
        while th.is_alive():  # unblock a loader waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                th.join(0.05)


# --------------------------------------------------------------------------------------
# manifest
# --------------------------------------------------------------------------------------


def read_manifest(out: str | Path) -> dict[str, dict[str, Any]]:
    """Latest record per sample over every ``manifest*.jsonl`` in ``out``.

    A torn last line (a run killed while appending) is ignored.
    """
    latest: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(out).glob(MANIFEST_GLOB)):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "sample" in rec:
                prev = latest.get(rec["sample"])
                if prev is None or prev.get("status") != "done" or rec.get("status") == "done":
                    latest[rec["sample"]] = rec
    return latest


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


class Manifest:
    """Append-only JSON-lines writer (one line per record, flushed and fsynced)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._broken = False  # (a write failed: the close may fail on its torn line)
        path.parent.mkdir(parents=True, exist_ok=True)
        torn = path.is_file() and path.stat().st_size > 0 and not _ends_with_newline(path)
        self._f = open(path, "a", encoding="utf-8")
        if torn:  # a run killed mid-append left half a line: end it, keep it unparseable
            self._f.write("\n")

    def write(self, rec: dict[str, Any]) -> None:
        """Append ``rec``; ``ValueError`` naming the manifest when it cannot be written (a
        full disk): the batch cannot go on without recording, and what it recorded stays."""
        try:
            self._f.write(json.dumps(rec, separators=(",", ":")) + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as e:
            self._broken = True
            raise ValueError(
                f"{self.path}: cannot write ({e.strerror or e}); sample {rec.get('sample')} "
                "and those after it are not recorded: make room, then run again with --resume"
            ) from None

    def close(self) -> None:
        try:
            self._f.close()
        except OSError:
            if not self._broken:
                raise
            # the line a failed write left in the buffer: torn in the file, as a kill leaves
            # it, and told already


def is_done(rec: dict[str, Any] | None, out: Path) -> bool:
    """Whether a manifest record is a finished sample whose files all exist."""
    if not rec or rec.get("status") != "done":
        return False
    return all((out / f).is_file() for f in rec.get("outputs", []))


# --------------------------------------------------------------------------------------
# the batch driver
# --------------------------------------------------------------------------------------


def parse_shard(text: str | None, env: dict[str, str] | None = None) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)``; without it, the SLURM array variables, else ``(0, 1)``."""
    env = os.environ if env is None else env
    if text:
        try:
            i, n = (int(v) for v in text.split("/"))
        except ValueError:
            raise ValueError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    elif "SLURM_ARRAY_TASK_ID" in env and (
        "SLURM_ARRAY_TASK_COUNT" in env or "SLURM_ARRAY_TASK_MAX" in env
    ):
        lo = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        step = int(env.get("SLURM_ARRAY_TASK_STEP", "1")) or 1  # --array=0-15:4
        i = (int(env["SLURM_ARRAY_TASK_ID"]) - lo) // step
        if "SLURM_ARRAY_TASK_COUNT" in env:
            n = int(env["SLURM_ARRAY_TASK_COUNT"])
        else:
            n = (int(env["SLURM_ARRAY_TASK_MAX"]) - lo) // step + 1
    else:
        return 0, 1
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {i}/{n}: need 0 <= I < N")
    return i, n


@dataclass
class BatchReport:
    """What a batch run did."""

    total: int = 0
    done: int = 0
    skipped: int = 0  # already done by an earlier run (resume)
    failed: list[dict[str, Any]] = field(default_factory=list)
    # done samples that left out an organ: {"sample", "case", "skipped_organs"} each
    skipped_organs: list[dict[str, Any]] = field(default_factory=list)
    # organ -> [existing lesion voxels, samples] over the done samples read with lesion ids
    lesion_voxels: dict[str, list[int]] = field(default_factory=dict)
    wall_s: float = 0.0
    manifest: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def warnings(self) -> list[str]:
        """What the run should tell besides its failures: lesion ids that matched nothing."""
        return [
            f"{organ}: the lesion label ids (--lesion-id, a CSV's lesion_id or dataset.json) "
            f"matched no voxel in any of the {n} samples written now: a wrong id reads as "
            "'no lesion' (existing tumors then lose their label and new ones may land on "
            "them); fine if these scans have none"
            for organ, (voxels, n) in self.lesion_voxels.items()
            if voxels == 0
        ]


def _worker_init(threads: int) -> None:
    os.environ["SYNTHGEN_NUM_THREADS"] = str(threads)
    import multiprocessing as mp

    parent = mp.parent_process()
    if parent is not None:
        threading.Thread(
            target=_exit_with, args=(parent,), name="synthgen-parent-watch", daemon=True
        ).start()


def _exit_with(parent) -> None:
    """End this worker process as soon as the batch process that started it is gone.

    A pool worker otherwise outlives a killed batch (``kill -9``, OOM killer, a SIGTERM
    without handler): it goes on writing the cases already queued to it into OUT, beside a
    resumed run, then waits for work for ever. What it leaves in ``.partial`` is removed by
    the next run of the shard.
    """
    parent.join()  # returns when the parent's end of the spawn pipe closes: it exited
    os._exit(1)


def _execute(todo, opts, out, tag, workers, scheduler) -> Iterator[dict[str, Any]]:
    if scheduler:
        try:
            from distributed import Client, as_completed
        except ImportError:
            raise ValueError(
                "--scheduler needs dask distributed: pip install 'synthgen[dask]'"
            ) from None
        from concurrent.futures import CancelledError

        if scheduler == "local":
            from distributed import LocalCluster

            cluster = LocalCluster(n_workers=max(1, workers), threads_per_worker=1)
            client = Client(cluster)
        else:
            try:
                cluster, client = None, Client(scheduler)
            except (OSError, TimeoutError) as e:
                raise ValueError(f"cannot reach the Dask scheduler at {scheduler}: {e}") from None
        try:
            here = os.getcwd()  # a worker's may differ: it reads and writes from this one
            futs, work = [], {}
            for c, s in todo:
                futs.append(
                    client.submit(run_case_from, here, c, s, opts, str(out), tag, pure=False)
                )
                work[futs[-1].key] = (c, s)
            for fut in as_completed(futs):
                try:
                    recs = fut.result()
                except CancelledError as e:  # the scheduler is gone: the batch cannot go on
                    raise ValueError(
                        f"lost the Dask scheduler at {scheduler} ({_short(e)}); the samples "
                        "written so far are recorded: run again with --resume to go on"
                    ) from None
                except Exception as e:
                    if fut.status != "error":  # not the task's failure: this client's
                        raise
                    # this case's task failed (its worker died: memory? or it could not run)
                    case, samples = work[fut.key]
                    why = _short(e)
                    if type(e).__name__ == "KilledWorker":
                        why = (
                            "a Dask worker died making this case's samples (out of memory, or "
                            "a crash: see the workers' logs)"
                        )
                    recs = _failed(case, samples, why)
                yield from recs
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
        return
    if workers <= 1:
        yield from run_cases(todo, opts, out, tag)
        return
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    threads = max(1, usable_cpus() // workers)
    ctx = mp.get_context("spawn")  # never fork a process that holds threads
    it = iter(todo)
    # A worker process that dies (out of memory, a crash) breaks the pool, and every case it
    # held fails with it: those are redone in a new pool one at a time, so that the case that
    # kills its worker alone fails (its samples recorded so) and the others are made.
    suspects: list = []
    while True:
        broken = False
        with ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_worker_init, initargs=(threads,)
        ) as ex:
            pending: dict = {}  # future -> ((case, samples), alone in the pool)
            try:
                while not broken:
                    limit = 1 if suspects else 2 * workers  # bounded: results stream back
                    while len(pending) < limit:
                        alone = bool(suspects)
                        nxt = suspects.pop(0) if suspects else next(it, None)
                        if nxt is None:
                            break
                        f = ex.submit(run_case, nxt[0], nxt[1], opts, str(out), tag)
                        pending[f] = (nxt, alone)
                    if not pending:
                        break
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for f in finished:
                        item, alone = pending.pop(f)
                        try:
                            recs = f.result()
                        except BrokenProcessPool:
                            broken = True
                            if not alone:
                                suspects.append(item)
                                continue
                            why = (
                                "its worker process died making this case's samples (out of "
                                "memory, or a crash); fewer --workers may leave it enough memory"
                            )
                            recs = _failed(*item, why)
                        yield from recs
                if broken:  # the cases the dead pool held: made, or redone
                    for f, (item, _) in pending.items():
                        if f.exception() is None:
                            yield from f.result()
                        else:
                            suspects.append(item)
                    pending = {}
            except BaseException:
                for f in pending:
                    f.cancel()
                raise
        if not broken:
            return


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """``"seed: 5 there, 0 now; ..."`` for each option of the run's identity that differs."""

    def shown(d: dict[str, Any], key: str) -> str:
        v = d.get(key)
        if v is None or v == {}:  # absent, None or no override: each preset's own
            return "default"
        if isinstance(v, list):
            return ",".join(map(str, v))
        if isinstance(v, dict):
            return ",".join(f"{k}={x}" for k, x in v.items())
        return str(v)

    keys = [*new, *(k for k in old if k not in new)]
    return "; ".join(
        f"{k}: {shown(old, k)} there, {shown(new, k)} now"
        for k in keys
        if k not in old or k not in new or old[k] != new[k]
    )


def _same_file(a: str, b: Path) -> bool:
    """Whether the recorded input ``a`` is the file ``b`` or a copy of it with the same bytes
    (a dataset staged elsewhere); a recorded file that no longer exists (e.g. a dataset moved
    since) cannot be told apart and counts as the same. The manifest records absolute paths;
    a relative one (batches before that) is taken from the current folder."""
    if a == str(b) or not os.path.exists(a):
        return True
    try:  # the bytes are read only for two files of one size
        return os.path.samefile(a, b) or filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def _check_ids(cases: Sequence[Case], previous, out: Path, version: str | None) -> None:
    """``ValueError`` when a sample recorded done in ``out`` belongs to a case id that no case
    has now, but was made from the CT of a case now (or a copy of it): the case ids changed
    (e.g. an older synthgen's ids of CSV CTs that share a file name), and going on would make
    that scan twice under two ids."""
    ids = {c.case_id for c in cases}
    orphans: dict[str, list[str]] = {}  # recorded CT -> its samples
    for sid, rec in previous.items():
        if rec.get("status") != "done" or rec.get("case") in ids:
            continue
        ct = (rec.get("inputs") or {}).get("ct")
        if isinstance(ct, str) and ct:
            orphans.setdefault(ct, []).append(sid)
    if not orphans:
        return
    by_inode: dict[tuple[int, int], Case] = {}
    by_size: dict[int, list[Case]] = {}
    for c in sorted(cases, key=lambda c: c.case_id):
        try:
            st = os.stat(c.ct)
        except OSError:
            continue
        by_inode.setdefault((st.st_dev, st.st_ino), c)
        by_size.setdefault(st.st_size, []).append(c)

    def now(ct: str) -> Case | None:
        try:
            st = os.stat(ct)
            if (st.st_dev, st.st_ino) in by_inode:
                return by_inode[st.st_dev, st.st_ino]
            same = (c for c in by_size.get(st.st_size, ()) if filecmp.cmp(ct, c.ct, shallow=False))
            return next(same, None)
        except OSError:  # gone or unreadable: cannot be told
            return None

    # (a case that has done samples under its own id kept its id: an orphan of the same
    # bytes is another scan of the dataset, e.g. a duplicate removed since, not a renaming)
    done_ids = {r.get("case") for r in previous.values() if r.get("status") == "done"}
    hits = [
        (sorted(sids), ct, c)
        for ct, sids in sorted(orphans.items())
        if (c := now(ct)) is not None and c.case_id not in done_ids
    ]
    if hits:
        from . import __version__

        sids, ct, case = hits[0]
        old = previous[sids[0]].get("case")
        made = f"synthgen {version}" if version and version != __version__ else None
        raise ValueError(
            f"{out} holds {sum(len(h[0]) for h in hits)} samples of case ids that no case has "
            f"now, made from the CT files of cases that have other ids now (e.g. {sids[0]} of "
            f"case {old} from {ct}, which is case {case.case_id} now): the case ids changed "
            "(this synthgen tells apart CT files of one name in a CSV by their folders), and "
            "going on would make those scans twice; use another --out"
            + (f" (or {made}, which made it)" if made else "")
        )


def _label_ids_of(inputs: dict[str, Any]) -> dict[str, list[list[int]]]:
    """``{"liver organ": [[1]], "liver lesion": [[2]]}``: the label ids a case's masks are
    read with (``--label-id``, ``--lesion-id``, a CSV's columns, dataset.json), per organ;
    files read as binary masks (no ids) are left out."""
    out: dict[str, list[list[int]]] = {}
    for kind in ("organs", "lesions"):
        got = inputs.get(kind)
        for organ, srcs in (got if isinstance(got, dict) else {}).items():
            ids = sorted(
                sorted(int(i) for i in s["label_ids"])
                for s in srcs
                if isinstance(s, dict) and s.get("label_ids") is not None
            )
            if ids:
                out[f"{organ} {kind[:-1]}"] = ids
    return out


def _check_inputs(work, previous: dict[str, dict[str, Any]], out: Path) -> None:
    """``ValueError`` when a sample recorded done in ``out`` was made from another CT than the
    case that has its id now (e.g. a reordered or edited CSV), or with other label ids (e.g.
    a tumor's id given as ``--label-id`` then, as ``--lesion-id`` now)."""
    wrong, relabelled = [], []
    for case, samples in work:
        seen: dict[str, bool] = {}
        ids = _label_ids_of(case.to_dict())
        for s in samples:
            rec = previous.get(s.sample_id)
            if not rec or rec.get("status") != "done":
                continue
            inputs = rec.get("inputs") or {}
            ct = str(inputs.get("ct", case.ct))
            if ct not in seen:
                seen[ct] = _same_file(ct, case.ct)
            if not seen[ct]:
                wrong.append((s.sample_id, ct, case))
            elif (there := _label_ids_of(inputs)) != ids:
                relabelled.append((s.sample_id, there, ids))
    if wrong:
        sid, ct, case = wrong[0]
        raise ValueError(
            f"{out} holds {len(wrong)} samples made from other CT files than the cases with "
            f"their ids now (e.g. {sid} from {ct}, case {case.case_id} is now {case.ct}); use "
            "the same input, or another --out"
        )
    if relabelled:
        sid, old, new = relabelled[0]

        def shown(v: list[list[int]] | None) -> str:
            return " + ".join(",".join(map(str, i)) for i in v) if v else "none"

        diff = "; ".join(
            f"{k} ids: {shown(old.get(k))} there, {shown(new.get(k))} now"
            for k in [*new, *(k for k in old if k not in new)]
            if old.get(k) != new.get(k)
        )
        raise ValueError(
            f"{out} holds {len(relabelled)} samples made with other label ids than now (e.g. "
            f"{sid}: {diff}); use the same ids, or another --out"
        )


def _check_foreign(out: Path, work) -> None:
    """Refuse an OUT that holds files but no batch (no ``batch.json``, no manifest) under
    the names this run writes: a batch replaces its samples' folders and nnU-Net's
    ``dataset.json``, ``imagesTr``, ``labelsTr``, so what is there (another dataset, a
    folder of a sample's name) would be lost. A batch's own OUT always has a manifest from
    its start on; other files (a scheduler's log, ``lost+found``) are no obstacle."""
    from fnmatch import fnmatch

    try:
        names = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    except FileNotFoundError:
        return
    except OSError as e:
        raise ValueError(f"{out}: cannot read the output folder ({e.strerror or e})") from None
    if not names or "batch.json" in names or any(fnmatch(n, MANIFEST_GLOB) for n in names):
        return
    mine = {"dataset.json", "imagesTr", "labelsTr", "synthgen_tumors"}
    mine |= {s.sample_id for _, samples in work for s in samples}
    clash = sorted(names & mine)
    if clash:
        some = ", ".join(clash[:3]) + (" ..." if len(clash) > 3 else "")
        raise ValueError(
            f"{out} holds files that are not a synthgen batch ({some}); a batch replaces "
            "what has its samples' names there: give it a new or empty --out"
        )


def prepare(
    cases: Sequence[Case], opts: BatchOptions, out: Path, *, shard=(0, 1), resume=False
) -> tuple[list[tuple[Case, list[Sample]]], int, int]:
    """Work of this run: ``(todo, total samples of the shard, samples already done)``.

    Raises:
        ValueError: ``out`` is a file, or holds a batch and ``resume`` is off, the batch
            there was made with other options, a sample done there was made from another CT
            than the case that has its id now, or from the CT of a case that has another id
            now.
    """
    i, n = shard
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: the output folder is a file; choose another --out")
    mine = [c for k, c in enumerate(sorted(cases, key=lambda c: c.case_id)) if k % n == i]
    previous = read_manifest(out) if out.exists() else {}
    cfg_path = out / "batch.json"
    cfg: dict[str, Any] = {}
    if cfg_path.is_file() and previous:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        old = cfg.get("options") if isinstance(cfg.get("options"), dict) else {}
        if old != opts.identity():
            raise ValueError(
                f"{out} holds a batch made with other options "
                f"({_differences(old, opts.identity())}); use the same options, or another --out"
            )
    work = [(c, samples_for(c, opts)) for c in mine]
    if not previous and not cfg_path.is_file():  # (a batch's OUT: not listed again)
        _check_foreign(out, work)
    if previous:
        _check_ids(cases, previous, out, cfg.get("synthgen"))
    _check_inputs(work, previous, out)
    if not resume:
        there = [previous[s.sample_id] for _, ss in work for s in ss if s.sample_id in previous]
        if there:
            ndone = sum(1 for r in there if is_done(r, out))
            left = f"{len(there) - ndone} failed or incomplete" if ndone < len(there) else ""
            what = ", ".join(filter(None, (f"{ndone} done" if ndone else "", left)))
            raise ValueError(
                f"{out} already holds {len(there)} samples of this run ({what}): pass --resume "
                "to continue the batch (it redoes those not done), or choose another --out"
            )
    todo, total, skipped = [], 0, 0
    for case, samples in work:
        total += len(samples)
        left = [s for s in samples if not (resume and is_done(previous.get(s.sample_id), out))]
        skipped += len(samples) - len(left)
        if left:
            todo.append((case, left))
    return todo, total, skipped


def _save_json(path: Path, obj: Any) -> None:
    """Write one of OUT's own JSON files (``batch.json``, nnU-Net's ``dataset.json``);
    ``ValueError`` naming it when it cannot be written (a full disk, no permission)."""
    from .io import save_json

    try:
        save_json(path, obj)
    except OSError as e:
        raise ValueError(
            f"{path}: cannot write ({e.strerror or e}); the samples recorded so far are kept: "
            "make room, then run again with --resume"
        ) from None


def _check_running_options(out: Path, opts: BatchOptions, lock: _ShardLock) -> None:
    """Refuse to run beside a run of OUT with other options (another shard started at the
    same time with another --seed, say): before any of them recorded a sample, each would
    write its own ``batch.json`` and a --resume would take the mixed samples as one batch."""
    try:
        cfg = json.loads((out / "batch.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    old = cfg.get("options") if isinstance(cfg, dict) else None
    if isinstance(old, dict) and old != opts.identity():
        held = lock.running()
        if held:
            raise ValueError(
                f"{out} is being written now by a synthgen batch with other options "
                f"({_differences(old, opts.identity())}; it holds {held[0].name}): use the "
                "same options, or another --out"
            )


# OUT's manifest of shard I of N, and the run tag (its ``.partial`` folder) read back from a
# manifest's name, and its shard count: one naming, read and written here only.
def _manifest_name(shard: tuple[int, int]) -> str:
    """``manifest.jsonl`` unsharded, else ``manifest-shard-I-of-N.jsonl``."""
    return "manifest.jsonl" if shard[1] == 1 else f"manifest-shard-{shard[0]}-of-{shard[1]}.jsonl"


def _tag_of(manifest_name: str) -> str:
    """The ``.partial`` folder of the run that writes ``manifest_name``."""
    if manifest_name == "manifest.jsonl":
        return "main"
    return manifest_name.removeprefix("manifest-").removesuffix(".jsonl")


def _shards_of(manifest_name: str) -> str:
    """The shard count N of the run that writes ``manifest_name`` (``"1"`` unsharded)."""
    if manifest_name == "manifest.jsonl":
        return "1"
    return manifest_name.removesuffix(".jsonl").rpartition("-of-")[2]


class _ShardLock:
    """An exclusive, non-blocking ``flock`` on a shard's manifest, held by the run writing it;
    a run beside one of another shard count (it would write the same samples) is refused.

    ``take()`` locks an existing manifest (``create``: creating it); the locks go when the
    run ends or its process dies. A file system without ``flock`` (e.g. Lustre mounted
    ``noflock``), or a platform without ``fcntl``, runs unlocked.
    """

    def __init__(self, path: Path, shard: tuple[int, int]) -> None:
        self.path, self.shard, self._f = path, shard, None
        self.locked = False

    def take(self, create: bool = True) -> None:
        try:
            import fcntl
        except ImportError:  # (Windows)
            return
        if self._f is not None or (not create and not self.path.is_file()):
            return
        try:
            # (read too: NFS grants the shared lock of _lock only on a file open for reading)
            f = open(self.path, "a+", encoding="utf-8")
        except OSError as e:  # no permission, read-only file system
            raise ValueError(f"{self.path}: cannot write ({e.strerror or e})") from None
        try:
            self._lock(fcntl, f.fileno())
        except BlockingIOError:
            f.close()
            i, n = self.shard
            which = f" (shard {i}/{n})" if n > 1 else ""
            raise ValueError(
                f"{self.path.parent} is being written by another synthgen batch{which} now "
                f"(it holds {self.path.name}): wait for it to end (then --resume if needed), "
                "or choose another --out"
            ) from None
        except OSError:  # no flock here: unlocked
            self._f = f
            return
        self.locked = True  # (flock works here: the other runs' locks can be told too)
        self._f = f
        try:
            self._check_counts(fcntl)
        except BaseException:
            self.__exit__()
            raise

    @staticmethod
    def _lock(fcntl: Any, fd: int) -> None:
        """Take the exclusive lock; ``BlockingIOError`` when a run holds it. Another run's
        probe (:meth:`running`, a shared lock held for a moment) is waited out: shards started
        together probe each other's manifests, and one was refused as if it ran twice."""
        deadline = time.monotonic() + 5.0
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                try:  # shared locks only (probes): not a run
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    fcntl.flock(fd, fcntl.LOCK_UN)
                except OSError:  # a run holds it (or this cannot be told)
                    raise BlockingIOError from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def _check_counts(self, fcntl: Any) -> None:
        """Refuse to run beside a run of another shard count on OUT: each run holds its
        manifest's lock, taken before this check, so of two that start together one sees
        the other (or both stop)."""
        n = self.shard[1]
        for other in self.running(fcntl):
            m = _shards_of(other.name)
            if m == str(n):
                continue
            how = "unsharded" if m == "1" else f"in {m} shards"
            mine = "unsharded" if n == 1 else f"in {n} shards"
            raise ValueError(
                f"{other.parent} is being written by a synthgen batch {how} now (it holds "
                f"{other.name}); this run ({mine}) would write the same samples: give "
                f"it --shard I/{m}, or wait for that batch to end (then --resume)"
            )

    def running(self, fcntl: Any = None) -> list[Path]:
        """The other manifests of OUT that a run holds now (tried with a non-blocking shared
        lock, released at once); none where ``flock`` does not work.

        Shared: it conflicts with a run's exclusive lock only, not with other runs' probes
        (two runs probing one finished manifest at once took each other for its run), and
        NFS, which emulates ``flock`` with byte-range locks, grants it on a file opened for
        reading (an exclusive one fails there with EBADF: every run was taken for ended, and
        its ``.partial`` folder removed while it wrote there)."""
        if fcntl is None:
            try:
                import fcntl
            except ImportError:
                return []
        held = []
        for other in sorted(self.path.parent.glob(MANIFEST_GLOB)):
            if other == self.path:
                continue
            try:
                f = open(other, encoding="utf-8")
            except OSError:
                continue
            with f:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    held.append(other)
                except OSError:
                    continue
        return held

    def __enter__(self) -> _ShardLock:
        self.take(create=False)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def run_batch(
    cases: Sequence[Case],
    opts: BatchOptions,
    out: str | Path,
    *,
    workers: int = 1,
    shard: tuple[int, int] = (0, 1),
    scheduler: str | None = None,
    resume: bool = False,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    on_start: Callable[[list, int], None] | None = None,
    source: str | None = None,
) -> BatchReport:
    """Synthesize ``opts.per_case`` samples for each case of this shard into ``out``.

    Args:
        cases: From :func:`synthgen.layouts.discover`.
        opts: What to synthesize and how to write it.
        out: Output folder (created).
        workers: Local processes (1: in this process, loading overlapped with writing).
        shard: ``(I, N)``: this run takes the cases whose sorted position is I mod N.
        scheduler: Dask scheduler address (``"local"`` starts a LocalCluster).
        resume: Continue the batch in ``out``: skip finished samples, redo the rest.
        on_record: Called with each manifest record as it is written (progress).
        on_start: Called once with the work list ``[(case, samples), ...]`` and the number
            of samples already done.
        source: Input dataset, recorded in ``batch.json``; ``out`` may not be that folder.

    Returns:
        A :class:`BatchReport`; failed samples are listed there, never raised.
    """
    t0 = time.perf_counter()
    out = Path(out)
    if source is not None and out.is_dir() and Path(source).is_dir():
        if os.path.samefile(source, out):
            # its samples would be found as cases by the next run (a --resume), and nnU-Net
            # output would replace the dataset's own dataset.json and fill its imagesTr
            raise ValueError(
                f"{out}: the output folder is the input dataset {source}; synthgen only reads "
                "its input: choose another --out (e.g. a folder beside it)"
            )
    name = _manifest_name(shard)
    tag = _tag_of(name)
    # one run per shard of OUT at a time, locked before what is done there is read (when
    # the manifest exists already): two would remove each other's partial samples
    with _ShardLock(out / name, shard) as lock:
        todo, total, skipped = prepare(cases, opts, out, shard=shard, resume=resume)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a file on the way, no permission, read-only file system
            raise ValueError(
                f"{out}: cannot create the output folder ({e.strerror or e})"
            ) from None
        lock.take()  # (when OUT or the manifest did not exist yet)
        _check_running_options(out, opts, lock)
        # (no batch.json, or no record yet: prepare read the manifests, not parsed again)
        recorded = any(p.stat().st_size for p in out.glob(MANIFEST_GLOB))
        if not (out / "batch.json").is_file() or not recorded:
            from . import __version__

            _save_json(
                out / "batch.json",
                {"synthgen": __version__, "input": source, "options": opts.identity()},
            )
        partial = out / ".partial" / tag
        # what killed runs left: this shard's, and (where flock tells) other shards' unless
        # they run now
        held = {_tag_of(p.name) for p in lock.running()} if lock.locked else None
        for d in sorted((out / ".partial").glob("*")):
            if d.is_dir() and (d == partial or (held is not None and d.name not in held)):
                shutil.rmtree(d, ignore_errors=True)
        report = BatchReport(total=total, skipped=skipped, manifest=out / name)
        if on_start is not None:
            on_start(todo, skipped)
        manifest = Manifest(out / name)
        mine = {c.case_id: c for c, _ in todo}
        try:
            for rec in _execute(todo, opts, out, tag, workers, scheduler):
                # absolute input paths (as this process reads them), for a resume from elsewhere
                rec["inputs"] = mine[rec["case"]].to_dict(absolute=True)
                manifest.write(rec)
                if rec["status"] == "done":
                    report.done += 1
                    if rec.get("skipped_organs"):
                        keep = ("sample", "case", "skipped_organs")
                        report.skipped_organs.append({k: rec[k] for k in keep})
                    for o in rec.get("organs", ()):
                        if "existing_lesion_voxels" in o:
                            tally = report.lesion_voxels.setdefault(o["organ"], [0, 0])
                            tally[0] += o["existing_lesion_voxels"]
                            tally[1] += 1
                else:
                    report.failed.append(rec)
                if on_record is not None:
                    on_record(rec)
        finally:
            manifest.close()
            for d in (partial, out / ".partial"):
                try:
                    d.rmdir()
                except OSError:
                    pass
        if opts.format == "nnunet":
            done = [r for r in read_manifest(out).values() if is_done(r, out)]
            _save_json(out / "dataset.json", dataset_json(opts, len(done)))
        report.wall_s = time.perf_counter() - t0
        return report
