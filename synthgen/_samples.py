"""On-the-fly samples: cases (files or arrays) -> deterministic synthesized samples.

Shared by ``synthgen.torch`` and ``synthgen.stream``. A :class:`SampleMaker` is a small,
picklable description (case sources, preset, seed, options); ``make(epoch, position)`` is a
pure function of its arguments, so any worker in any process produces the same sample for the
same (seed, epoch, position), and no global random state is ever read.
"""

from __future__ import annotations

import json
import sys
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._hash import seed_of

__all__ = [
    "CaseSource",
    "SampleMaker",
    "as_sources",
    "crop_patch",
    "distributed",
    "rank_positions",
    "with_organ",
]


_INDEXES: OrderedDict[tuple, Any] = OrderedDict()
_INDEXES_MAX = 32


def _case_index(src: CaseSource, organ: np.ndarray, index_organ) -> Any:
    """The OrganIndex of a case in this process (a small LRU), so that planning's per-scan
    measurements (cached in it) survive reloading the case from its files. Keyed by the
    image and the label (paths, or the arrays' identities) and the organ; checked against
    the mask's voxel count."""
    from .layouts import Case

    def ident(x: Any) -> Any:
        if isinstance(x, (str, Path)):
            return str(x)
        return repr(x) if isinstance(x, Case) else id(x)

    key = (src.case_id, ident(src.image), ident(src.label), src.organ_labels, src.organ,
           tuple(organ.shape))  # fmt: skip
    index = _INDEXES.get(key)
    # the same key with another mask (a file rewritten, an id reused): index again
    if index is not None and index.count != int(np.count_nonzero(organ)):
        index = None
    if index is None:
        from .planning import PlacementError

        try:
            index = index_organ(organ)
        except PlacementError:  # no organ: implant_tumors leaves the sample alone
            return None
        _INDEXES[key] = index
        while len(_INDEXES) > _INDEXES_MAX:
            _INDEXES.popitem(last=False)
    else:
        _INDEXES.move_to_end(key)
    return index


@dataclass(frozen=True)
class CaseSource:
    """One case: an image and a label map (or organ mask), as paths or arrays.

    Attributes:
        case_id: Identifier (part of every sample's seed).
        image: CT in HU: a NIfTI path or a 3-D array.
        label: Label map or organ mask: a NIfTI path, a 3-D array, or for a
            :class:`synthgen.layouts.Case` the case itself (its masks are combined).
        organ_labels: Ids of the organ in ``label``.
        affine: Voxel-to-world affine for arrays (read from the file for paths).
        organ: For a ``layouts.Case``: which of its organs.
    """

    case_id: str
    image: Any
    label: Any
    organ_labels: tuple[int, ...] = (1,)
    affine: Any = None
    organ: str | None = None

    @property
    def owns_arrays(self) -> bool:
        """Whether :meth:`load` returns fresh arrays (read from files) a sample may modify."""
        from .layouts import Case

        return isinstance(self.image, (str, Path)) and isinstance(self.label, (str, Path, Case))

    def load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(image, label, affine)`` as arrays on one grid (files are read each call); a
        :class:`~synthgen.layouts.Case`'s label is its organ (1) and lesion masks (2)."""
        from .io import load_nifti
        from .layouts import Case, _unoriented, load_mask, load_organ, read_once, snap_label_values

        unoriented = False
        if isinstance(self.image, (str, Path)):
            image, affine, header = load_nifti(self.image)
            unoriented = _unoriented(header)  # (same-shape masks voxel for voxel)
        else:
            image, affine = np.asarray(self.image), self.affine
        if affine is None:
            raise ValueError(
                f"case {self.case_id}: arrays need an affine: give the case as (image, label, "
                "affine) or a dict with an 'affine', e.g. synthgen.augment.affine_for(spacing_mm)"
            )
        if isinstance(self.label, Case):
            case, organ = self.label, self.organ
            if organ not in case.organs:
                raise ValueError(f"case {self.case_id}: {case.missing.get(organ, 'no mask')}")
            # as in a batch (no organ in any file: samples without tumors)
            srcs, les_srcs = case.organs[organ], case.lesions.get(organ, ())
            with read_once(case.mask_paths([organ])):  # (one label map: read once)
                region = load_organ(srcs, image.shape, affine, unoriented=unoriented)[0]
                label = region.view(np.uint8)
                if les_srcs:
                    les = load_mask(les_srcs, image.shape, affine, unoriented=unoriented)
                    label = label.copy()
                    label[les] = 2
        elif isinstance(self.label, (str, Path)):
            label, laff, _ = load_nifti(self.label)
            label = snap_label_values(label)  # (ids are compared with ==)
            if label.shape != image.shape or not np.allclose(laff, affine, atol=1e-3):
                what = (
                    f"shape {label.shape} differs from the image's {image.shape}"
                    if label.shape != image.shape
                    else "affine differs from the image's (by more than 1e-3: another origin, "
                    f"voxel size or orientation):\n{np.round(laff, 4)}\nvs\n{np.round(affine, 4)}"
                )
                raise ValueError(
                    f"{self.label}: label grid {what}; resample it first (synthgen batch does that)"
                )
        else:
            label = np.asarray(self.label)
        if label.shape != image.shape:
            raise ValueError(f"case {self.case_id}: label {label.shape} vs image {image.shape}")
        return image, label, np.asarray(affine, dtype=np.float64)


def _is_case(x: Any) -> bool:
    from .layouts import Case

    return isinstance(x, Case)


def _case_id(x: Any, k: int) -> str:
    from .layouts import _stem

    if isinstance(x, (str, Path)):
        p = Path(x)
        return _stem(p) if p.name.endswith((".nii.gz", ".nii")) else p.name
    return f"case{k:05d}"


def as_sources(cases: Iterable[Any], organ: str) -> list[CaseSource]:
    """Normalise cases given as :class:`synthgen.layouts.Case`, ``CaseSource``, dicts
    (``{"image", "label", "organ_labels"?, "affine"?, "id"?}``) or ``(image, label[, affine])``
    tuples; images and labels may be paths or arrays."""
    from .layouts import Case

    out: list[CaseSource] = []
    for k, c in enumerate(cases):
        if isinstance(c, CaseSource):
            out.append(c)
        elif isinstance(c, Case):
            out.append(CaseSource(c.case_id, c.ct, c, (1,), None, organ))
        elif isinstance(c, dict):
            ids = c.get("organ_labels", c.get("organ_label", 1))
            ids = tuple(int(i) for i in np.atleast_1d(ids))
            cid = str(c.get("id", _case_id(c["image"], k)))
            out.append(CaseSource(cid, c["image"], c["label"], ids, c.get("affine")))
        elif isinstance(c, (tuple, list)) and len(c) in (2, 3):
            aff = c[2] if len(c) == 3 else None
            out.append(CaseSource(_case_id(c[0], k), c[0], c[1], (1,), aff))
        else:
            raise ValueError(
                f"case {k}: expected a layouts.Case, a dict with image/label, or an "
                f"(image, label[, affine]) tuple, got {type(c).__name__}"
            )
    ids = [s.case_id for s in out]
    if len(set(ids)) != len(ids):
        raise ValueError("case ids must be unique (give dicts an 'id')")
    if not out:
        raise ValueError("no cases given")
    return out


def crop_patch(
    arrays: Sequence[np.ndarray], center: Sequence[int], size: Sequence[int], fill: Sequence[Any]
) -> tuple[list[np.ndarray], tuple[int, int, int]]:
    """Crop ``size`` voxels centred on ``center`` from each array, padding with ``fill``.

    Returns the patches and the patch origin (voxel index of its first voxel, may be < 0).
    """
    shape = arrays[0].shape
    lo = [int(c) - int(s) // 2 for c, s in zip(center, size, strict=True)]
    src = tuple(slice(max(0, a), min(n, a + s)) for a, s, n in zip(lo, size, shape, strict=True))
    dst = tuple(slice(sl.start - a, sl.stop - a) for sl, a in zip(src, lo, strict=True))
    out = []
    for arr, f in zip(arrays, fill, strict=True):
        p = np.full(tuple(int(s) for s in size), f, dtype=arr.dtype)
        p[dst] = arr[src]
        out.append(p)
    return out, (lo[0], lo[1], lo[2])


def with_organ(cases: Iterable[Any], organ: str) -> tuple[list[CaseSource], dict[str, str]]:
    """:func:`as_sources` of ``cases``, without those that have no mask of ``organ``, and
    the ids of those -> why (``layouts.Case.missing``). Only ``layouts.Case`` objects can
    lack one: a label map or mask given directly is the organ's annotation, even when
    empty (its samples then come without tumors)."""
    from .layouts import Case

    kept: list[CaseSource] = []
    skipped: dict[str, str] = {}
    for src in as_sources(cases, organ):
        case = src.label
        if isinstance(case, Case) and src.organ not in case.organs:
            skipped[src.case_id] = case.missing.get(src.organ, f"no {src.organ} mask")
        else:
            kept.append(src)
    return kept, skipped


@dataclass(frozen=True)
class SampleMaker:
    """Everything that decides a sample; ``make(epoch, position)`` renders it.

    Attributes:
        sources: The cases.
        organ: Organ name, preset name or preset path.
        seed: Global seed.
        samples_per_case: Samples of each case per epoch.
        prob: Probability that a sample gets tumors (decided by its own seed).
        tumor_label: Label id written on tumor voxels.
        size: Size class to force (``None``: the preset's mix).
        patch_size: Crop a patch of this many voxels around a tumor (or, without tumors,
            an organ voxel); ``None`` returns whole volumes.
        shuffle: Visit the epoch's samples in a seeded random order.
        min_organ_voxels: Below this many organ voxels nothing is implanted.
        synthesize: ``False`` makes the same samples without tumors (a plain loader).
        skipped: Ids of the cases left out for having no mask of the organ -> why
            (:meth:`build`).
    """

    sources: tuple[CaseSource, ...]
    organ: str
    seed: int = 0
    samples_per_case: int = 1
    prob: float = 1.0
    tumor_label: int = 2
    size: str | None = None
    patch_size: tuple[int, int, int] | None = None
    shuffle: bool = True
    min_organ_voxels: int = 64
    synthesize: bool = True
    skipped: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        from .presets import load_preset

        preset = load_preset(self.organ)  # fail early, in the parent process
        if self.size is not None:  # (not in a worker, at the first sample)
            preset.size_class(self.size)
        for name, kind in (("seed", int), ("samples_per_case", int), ("prob", float)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        object.__setattr__(self, "tumor_label", int(self.tumor_label))
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {self.prob}")
        if self.samples_per_case < 1:
            raise ValueError("samples_per_case must be >= 1")
        if self.patch_size is not None and (len(self.patch_size) != 3 or min(self.patch_size) < 1):
            raise ValueError(f"patch_size must be 3 positive ints, got {self.patch_size}")

    @classmethod
    def build(
        cls,
        cases: Iterable[Any],
        organ: str,
        *,
        patch_size: Sequence[int] | None = None,
        _stacklevel: int = 2,
        **kw: Any,
    ) -> SampleMaker:
        """A maker over ``cases`` in any form :func:`as_sources` takes (the constructor of
        ``synthgen.torch.SyntheticTumorDataset`` and ``synthgen.stream.Producer``). A
        ``layouts.Case`` without a mask of the organ (``Case.missing``, e.g. a uterus in a
        male scan) is left out, with a warning, and noted in :attr:`skipped`; ValueError
        when no case has one."""
        import warnings

        sources, skipped = with_organ(cases, organ)
        if skipped:
            why = "; ".join(f"{c}: {r}" for c, r in list(skipped.items())[:3])
            if not sources:
                raise ValueError(f"no case has a mask of {organ!r} ({why})")
            n = len(sources) + len(skipped)
            warnings.warn(
                f"{len(skipped)} of {n} cases have no {organ!r} mask and are left out "
                f"(.skipped lists them): {why}",
                stacklevel=_stacklevel,
            )
        patch = None if patch_size is None else tuple(int(s) for s in patch_size)
        return cls(tuple(sources), organ, patch_size=patch, skipped=skipped, **kw)

    def __len__(self) -> int:
        return len(self.sources) * self.samples_per_case

    def order(self, epoch: int) -> np.ndarray:
        """Item of each position in ``epoch`` (a seeded permutation when shuffling)."""
        n = len(self)
        if not self.shuffle:
            return np.arange(n)
        s = self.seed & 0xFFFFFFFFFFFFFFFF  # any int seed, negative included
        key = [s & 0xFFFFFFFF, s >> 32, int(epoch) & 0xFFFFFFFFFFFFFFFF]
        return np.random.default_rng(key).permutation(n)

    def sample_seed(self, epoch: int, item: int) -> int:
        case = self.sources[item // self.samples_per_case]
        return seed_of(self.seed, case.case_id, epoch, item % self.samples_per_case)

    def make(self, epoch: int, position: int) -> dict[str, Any]:
        """Sample at ``position`` of ``epoch`` as NumPy arrays (channel-first ``(1, ...)``).

        Keys: ``image``, ``label``, ``case``, ``epoch``, ``position``, ``seed``, ``plan``
        (JSON string, ``""`` when no tumor was implanted), ``origin`` (patch origin, voxels),
        ``spacing`` (mm).
        """
        from .api import shared_synthesizer
        from .augment import implant_tumors, lesions_of, organ_mask_of
        from .planning import index_organ, resolve_spacing

        item = int(self.order(epoch)[position])
        src = self.sources[item // self.samples_per_case]
        seed = self.sample_seed(epoch, item)
        rng = np.random.default_rng(seed)
        image, label, affine = src.load()
        if self.tumor_label != 2 and _is_case(src.label):
            label[label == 2] = self.tumor_label  # (a Case's lesions: fresh, 0/1/2 only)
        if label.dtype == np.bool_:  # an organ mask: uint8 whether the sample fires or not
            label = label.view(np.uint8)
        organ = organ_mask_of(label, src.organ_labels)
        fire = self.synthesize and rng.random() < self.prob
        plan = None
        if fire:
            # One OrganIndex per case and process: planning's per-scan measurements are
            # cached in it, keyed by a fingerprint of the image, so reloading the case from
            # its files reuses them.
            index = _case_index(src, organ, index_organ)
            # The lesions already in the case (a layouts.Case's lesion masks, which load()
            # writes as the tumor label; else the label map's tumor label, e.g. MSD's
            # "cancer"): kept the preset's gap_mm away, as synthgen batch keeps them.
            lesions = lesions_of(label, self.tumor_label)
            res = implant_tumors(
                image,
                label,
                synthesizer=shared_synthesizer(self.organ, self.size),
                organ_labels=src.organ_labels,
                tumor_label=self.tumor_label,
                seed=seed,
                affine=affine,
                min_organ_voxels=self.min_organ_voxels,
                organ_mask=organ,
                copy=not src.owns_arrays,  # a freshly read case is ours to modify
                organ_index=index,
                lesion_mask=lesions,
            )
            image, label, plan = res.image, res.label, res.plan
        origin = (0, 0, 0)
        if self.patch_size is not None:
            center = self._patch_center(rng, plan, organ)
            fill = (_air(image), 0)
            (image, label), origin = crop_patch([image, label], center, self.patch_size, fill)
        # A sample never shares memory with the caller's arrays (writing into it must not
        # change the case for later samples): without a render or a crop, copy them.
        fresh = src.owns_arrays or fire or self.patch_size is not None
        contiguous = np.ascontiguousarray if fresh else _c_copy
        return {
            "image": contiguous(image)[None],
            "label": contiguous(label)[None],
            "case": src.case_id,
            "epoch": int(epoch),
            "position": int(position),
            "seed": int(seed),
            "plan": plan.to_json() if plan is not None else "",
            "origin": np.asarray(origin, dtype=np.int64),
            "spacing": np.asarray(resolve_spacing(None, affine), dtype=np.float64),
        }

    def _patch_center(self, rng, plan, organ) -> tuple[int, int, int]:
        if plan is not None and plan.tumors:
            t = plan.tumors[int(rng.integers(len(plan.tumors)))]
            jitter = [int(rng.integers(-(s // 4), s // 4 + 1)) for s in self.patch_size]
            return tuple(int(c) + j for c, j in zip(t.center_vox, jitter, strict=True))
        return _random_voxel(rng, organ)


def _random_voxel(rng: np.random.Generator, mask: np.ndarray) -> tuple[int, int, int]:
    """A uniformly drawn voxel of ``mask`` (rejection inside its bounding box), or a random
    voxel of the volume when the mask is empty."""
    from ._cpu_kernels import bbox

    lo0, hi0, lo1, hi1, lo2, hi2, count = bbox(mask)
    if count == 0:
        return tuple(int(rng.integers(n)) for n in mask.shape)
    lo = np.array([lo0, lo1, lo2])
    hi = np.array([hi0, hi1, hi2]) + 1
    for _ in range(64):  # an organ fills a fair share of its box: a few rounds suffice
        pts = rng.integers(lo, hi, size=(64, 3))
        hit = mask[pts[:, 0], pts[:, 1], pts[:, 2]]
        if hit.any():
            return tuple(int(v) for v in pts[int(np.argmax(hit))])
    idx = np.argwhere(mask[lo0 : hi0 + 1, lo1 : hi1 + 1, lo2 : hi2 + 1])
    return tuple(int(v) for v in idx[int(rng.integers(len(idx)))] + lo)


def _dist_live() -> Any:
    """``torch.distributed`` when a process group is initialised in this process, else
    ``None`` (torch is never imported here: a process without it has no group)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist
    return None


def distributed(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process in distributed training.

    Each one given wins; one not given is read from ``torch.distributed`` when a process
    group is initialised (``torchrun``, ``init_process_group``); without a group and with
    neither given it is ``(0, 1)``, a single process.

    Raises:
        ValueError: Only one of the two given and no process group to read the other from,
            ``world_size < 1``, or ``rank`` outside ``[0, world_size)``.
    """
    if rank is None or world_size is None:
        dist = _dist_live()
        if dist is not None:
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
        elif rank is None and world_size is None:
            rank, world_size = 0, 1
        else:
            raise ValueError(
                "give both rank= and world_size= (no torch.distributed process group is "
                "initialised to read the other from)"
            )
    for name, v in (("rank", rank), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{name} must be an int, got {v!r}")
    rank, world_size = int(rank), int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


def rank_positions(n: int, rank: int, world_size: int, drop_last: bool = False) -> list[int]:
    """The positions of an epoch of ``n`` samples that ``rank`` of ``world_size`` makes, as
    ``torch.utils.data.DistributedSampler`` splits indices: every ``world_size``-th position
    from ``rank``, and every rank the same number of them (a DDP step needs a batch on every
    rank): ``ceil(n / world_size)``, the last ranks wrapping around to the first positions,
    or with ``drop_last`` ``n // world_size``, the last ``n % world_size`` positions left out.
    Over all ranks: each position once (plus the wrapped ones), whatever ``world_size``."""
    per = n // world_size if drop_last else -(-n // world_size)
    return [(rank + k * world_size) % n for k in range(per)]


def _c_copy(a: np.ndarray) -> np.ndarray:
    return np.array(a, order="C", copy=True)


def _air(image: np.ndarray) -> Any:
    """Padding value of an image: -1024 HU, or the lowest value the dtype and data allow."""
    lo = image.min() if image.size else 0
    if image.dtype.kind == "f":
        return min(-1024.0, float(lo))
    if image.dtype.kind == "u":
        return lo  # stored without the intercept: its darkest voxel stands for air
    return max(np.iinfo(image.dtype).min, min(-1024, int(lo)))


def plan_of(sample: dict[str, Any]) -> Any:
    """The :class:`synthgen.Plan` of a sample (``None`` if it got no tumor)."""
    from .planning import Plan

    text = sample.get("plan")
    return Plan.from_dict(json.loads(text)) if text else None
