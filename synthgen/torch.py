"""PyTorch datasets that synthesize tumors on the fly.

* :class:`SyntheticTumorDataset`: an ``IterableDataset`` over cases (file paths or arrays)
  yielding dicts of tensors plus the plan.
* :class:`TumorSynthesisWrapper`: wraps an existing map-style dataset of image/label dicts.

Seeding: every sample's seed is a pure function of (``seed``, case, epoch, sample index), so
a run is reproducible for a given (seed, epoch) whatever ``num_workers`` is, every worker
draws different tumors (they make different samples), and neither the global NumPy RNG nor
torch's RNG is read. Call ``set_epoch(e)`` before each epoch: the epoch lives in shared
memory, so ``persistent_workers=True`` workers see it too. Nothing here touches CUDA, and
everything pickles (``spawn`` and ``forkserver`` workers work).

Distributed training (DDP, ``torchrun``): :class:`SyntheticTumorDataset` splits an epoch
between ranks as ``DistributedSampler`` does (rank and world size from ``torch.distributed``,
or ``rank=`` / ``world_size=``), then between each rank's workers: the ranks together make
the samples of one process with the same seed, each once. :class:`TumorSynthesisWrapper` is
map-style (the seed of item ``i`` does not depend on who loads it): give its DataLoader a
``DistributedSampler``. :class:`BatchTumorSynthesis` seeds rank ``r``'s sample ``b`` as sample
``r * B + b`` of one global batch.

Example:
    >>> from torch.utils.data import DataLoader  # doctest: +SKIP
    >>> ds = SyntheticTumorDataset(cases, organ="liver", seed=0, patch_size=(96, 96, 96))
    >>> loader = DataLoader(ds, batch_size=2, num_workers=2)
    >>> for epoch in range(100):
    ...     ds.set_epoch(epoch)
    ...     for batch in loader:  # batch["image"]: (2, 1, 96, 96, 96), batch["plan"]: JSON
    ...         ...
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ._hash import seed_of
from ._samples import SampleMaker, _dist_live, distributed, plan_of, rank_positions
from .planning import PlacementError

__all__ = ["BatchTumorSynthesis", "SyntheticTumorDataset", "TumorSynthesisWrapper", "plan_of"]


class _SharedEpoch:
    """An epoch counter in shared memory when handed to worker processes at their start.

    Pickled for a process being started (DataLoader workers, fork or spawn) it travels as
    shared memory, so ``set_epoch`` in the parent reaches persistent workers; pickled in any
    other situation (``copy.deepcopy``, a queue) it travels as its current value.
    """

    def __init__(self, value: int = 0) -> None:
        self._v = mp.get_context().RawValue("q", int(value))

    @property
    def value(self) -> int:
        return int(self._v.value)

    @value.setter
    def value(self, v: int) -> None:
        self._v.value = int(v)

    def __getstate__(self) -> dict[str, Any]:
        from multiprocessing.context import get_spawning_popen

        if get_spawning_popen() is not None:
            return {"shared": self._v}
        return {"value": self.value}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "shared" in state:
            self._v = state["shared"]
        else:
            self._v = mp.get_context().RawValue("q", int(state["value"]))


def _in_worker() -> tuple[int, int]:
    info = get_worker_info()
    if info is None:
        return 0, 1
    from . import set_num_threads

    set_num_threads(1)  # one process per core already: no thread pool inside workers
    return info.id, info.num_workers


def _to_tensors(sample: dict[str, Any]) -> dict[str, Any]:
    out = dict(sample)
    for k in ("image", "label", "origin", "spacing"):
        out[k] = torch.from_numpy(np.ascontiguousarray(sample[k]))
    return out


class SyntheticTumorDataset(IterableDataset):
    """Cases in, synthesized samples out, sharded across distributed ranks and DataLoader
    workers.

    Args:
        cases: :class:`synthgen.layouts.Case` objects (``synthgen.layouts.discover``), dicts
            ``{"image", "label", "organ_labels"?, "affine"?, "id"?}`` or ``(image, label[,
            affine])`` tuples; images and labels may be NIfTI paths or 3-D arrays (arrays
            need an affine for the spacing, mm).
        organ: Organ name, preset name or preset TOML path.
        seed: Global seed.
        samples_per_case: Samples per case per epoch.
        prob: Probability that a sample gets tumors.
        tumor_label: Label id of tumor voxels.
        size: Size class to force.
        patch_size: Return patches of this many voxels around a tumor (or an organ voxel
            when the sample has none); ``None`` returns whole volumes.
        shuffle: Seeded random order within an epoch.
        dtype: NumPy dtype of the images: float32 by default (as MONAI's ``LoadImage``),
            whatever each file stores, so that batches of int16 and float32 cases are alike;
            ``None`` keeps each file's dtype. Tumors are rendered on the file's values and
            converted after: a sample is its plan rendered into the file's data.
        synthesize: ``False`` gives the same loader without tumors (a baseline).
        rank: This process's rank in distributed training; ``None`` reads it from
            ``torch.distributed`` when a process group is initialised (else 0).
        world_size: The number of ranks; ``None`` as for ``rank`` (else 1).
        drop_last: With several ranks, leave out the last ``len % world_size`` samples of
            an epoch instead of repeating the first ones (as ``DistributedSampler``).

    Distributed training: rank ``r`` of ``W`` makes the positions ``r, r + W, ...`` of each
    epoch's (shuffled) order, ``ceil(n / W)`` of them (``n // W`` with ``drop_last``), the
    last ranks wrapping around to the first positions so that every rank has as many
    batches; within a rank its DataLoader workers share them out. Over all ranks that is
    every sample of a single-process run with the same seed and epoch, each made once (the
    wrapped ones twice, identical), reproducible. ``len(ds)`` is the rank's count. The rank
    and world size are read when the dataset is built or, if no process group was
    initialised then, when it is iterated, measured or pickled for a worker.

    A ``layouts.Case`` without a mask of the organ (``Case.missing``, e.g. a uterus in a male
    scan) is left out, with a warning; :attr:`skipped` maps its id to the reason. A case whose
    organ mask is empty or too small for the preset's tumors yields its samples untouched
    (``plan`` ``""``), as with ``prob`` < 1.

    Yields:
        ``{"image": (1, X, Y, Z) tensor (HU), "label": (1, X, Y, Z) tensor, "case": str,
        "epoch": int, "position": int, "seed": int, "plan": JSON str ("" without tumors),
        "origin": (3,) int64 patch origin, "spacing": (3,) float64 mm}``.
    """

    def __init__(
        self,
        cases: Iterable[Any],
        organ: str,
        *,
        seed: int = 0,
        samples_per_case: int = 1,
        prob: float = 1.0,
        tumor_label: int = 2,
        size: str | None = None,
        patch_size: Sequence[int] | None = None,
        shuffle: bool = True,
        dtype: Any = np.float32,
        synthesize: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        pinned = distributed(rank, world_size)  # (validates them now)
        # known for good when given or read from a process group; else read again later
        known = (rank is not None and world_size is not None) or _dist_live() is not None
        self._dist: tuple[int, int] | None = pinned if known else None
        self.drop_last = bool(drop_last)
        self.maker = SampleMaker.build(
            cases,
            organ,
            seed=seed,
            samples_per_case=samples_per_case,
            prob=prob,
            tumor_label=tumor_label,
            size=size,
            patch_size=patch_size,
            shuffle=shuffle,
            synthesize=synthesize,
            _stacklevel=3,  # (the warning points at the caller)
        )
        self.skipped = self.maker.skipped
        self.dtype = None if dtype is None else np.dtype(dtype)
        self._epoch = _SharedEpoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (new tumors for each; the same epoch gives the same samples)."""
        self._epoch.value = int(epoch)

    @property
    def epoch(self) -> int:
        return self._epoch.value

    @property
    def rank(self) -> int:
        """This process's rank (0 outside distributed training)."""
        return (self._dist or distributed())[0]

    @property
    def world_size(self) -> int:
        """The number of ranks sharing each epoch (1 outside distributed training)."""
        return (self._dist or distributed())[1]

    def positions(self) -> list[int]:
        """The positions of an epoch that this rank makes (all its workers together)."""
        rank, world = self._dist or distributed()
        return rank_positions(len(self.maker), rank, world, self.drop_last)

    def __len__(self) -> int:
        return len(self.positions())

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if state["_dist"] is None and _dist_live() is not None:
            # pickled for a spawned worker, which has no process group: the parent's rank
            state["_dist"] = distributed()
        return state

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, nworkers = _in_worker()
        epoch = self.epoch
        for position in self.positions()[worker::nworkers]:
            s = self.maker.make(epoch, position)
            if self.dtype is not None:
                s["image"] = s["image"].astype(self.dtype)  # (a copy: never the caller's)
            yield _to_tensors(s)

    def __repr__(self) -> str:
        m = self.maker
        return (
            f"SyntheticTumorDataset(cases={len(m.sources)}, organ={m.organ!r}, seed={m.seed}, "
            f"samples_per_case={m.samples_per_case}, prob={m.prob}, patch_size={m.patch_size}"
            f"{'' if self.world_size == 1 else f', rank={self.rank}/{self.world_size}'})"
        )


def _to_numpy(x: Any) -> tuple[np.ndarray, Any]:
    if isinstance(x, torch.Tensor):
        if x.is_cuda:
            raise ValueError(
                "TumorSynthesisWrapper got a CUDA tensor: move data to the GPU after the "
                "loader (the CPU engine runs in the workers)"
            )
        from .planning import host_readable

        # (a view; bfloat16, which NumPy lacks, as its float32 values: cast back by _like)
        return host_readable(x.detach()), x
    return np.asarray(x), x


def _is_meta_tensor(x: Any) -> bool:
    """Whether ``x`` is a MONAI MetaTensor (told without importing MONAI)."""
    return isinstance(x, torch.Tensor) and hasattr(x, "meta") and hasattr(x, "copy_meta_from")


def _like(arr: np.ndarray, ref: Any, *, label: bool = False) -> Any:
    """``arr`` in the type and dtype of ``ref``; a label map of a boolean ``ref`` stays
    uint8 (0/1/tumor label: a bool cannot hold the tumor label)."""
    if isinstance(ref, torch.Tensor):
        t = torch.from_numpy(np.ascontiguousarray(arr))
        t = t if label and ref.dtype == torch.bool else t.to(ref.dtype)
        if _is_meta_tensor(ref):
            # a MONAI MetaTensor: one again, its metadata kept (a batch of fired and unfired
            # items must collate, and the affine travel on)
            from monai.utils import convert_to_dst_type

            return convert_to_dst_type(t, dst=ref, dtype=t.dtype)[0]
        return t
    dtype = np.asarray(ref).dtype
    return arr if label and dtype == np.bool_ else arr.astype(dtype, copy=False)


class TumorSynthesisWrapper(Dataset):
    """Add tumors to the items of a map-style dataset of ``{image, label, ...}`` dicts.

    Item ``i`` of epoch ``e`` gets the seed ``f(seed, e, i)``: reproducible for (seed, epoch)
    with any worker count. Channel-first ``(1, X, Y, Z)`` or plain ``(X, Y, Z)`` arrays or
    CPU tensors, in HU, before intensity normalisation.

    Args:
        dataset: The map-style dataset.
        organ: Organ name, preset name or preset path.
        image_key: Key of the image in an item.
        label_key: Key of the label map.
        organ_labels: Label ids of the organ.
        tumor_label: Label id written on tumor voxels.
        prob: Probability that an item gets tumors.
        seed: Global seed.
        spacing: Voxel size (mm) when items carry no affine.
        affine_key: Key of a 4x4 affine in the items (used first; then a MONAI MetaTensor
            image's or label's own affine, then ``spacing``).
        size: Size class to force.
    """

    def __init__(
        self,
        dataset: Dataset,
        organ: str,
        *,
        image_key: str = "image",
        label_key: str = "label",
        organ_labels: int | Sequence[int] = 1,
        tumor_label: int = 2,
        prob: float = 1.0,
        seed: int = 0,
        spacing: Sequence[float] | None = None,
        affine_key: str | None = "affine",
        size: str | None = None,
    ) -> None:
        from .api import Synthesizer

        self.dataset = dataset
        self.synthesizer = Synthesizer(organ, size=size)
        self.image_key, self.label_key, self.affine_key = image_key, label_key, affine_key
        self.organ_labels = tuple(int(i) for i in np.atleast_1d(organ_labels))
        self.tumor_label = int(tumor_label)
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        self.prob, self.seed, self.spacing = float(prob), int(seed), spacing
        self._epoch = _SharedEpoch(0)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _affine(self, item: dict[str, Any]) -> np.ndarray:
        from .augment import affine_for

        if self.affine_key and item.get(self.affine_key) is not None:
            a = item[self.affine_key]
            return np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, np.float64)
        for key in (self.image_key, self.label_key):  # a MONAI MetaTensor's own affine
            x = item.get(key)
            a = x.affine if _is_meta_tensor(x) else None
            if isinstance(a, torch.Tensor) and tuple(a.shape) == (4, 4):
                return np.asarray(a.detach().cpu(), np.float64)
        if self.spacing is not None:
            return affine_for(self.spacing)
        raise ValueError(
            f"items have no {self.affine_key!r} affine: give TumorSynthesisWrapper(spacing=...)"
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        from .augment import check_channels, implant_tumors, lesions_of

        _in_worker()
        item = dict(self.dataset[index])
        seed = seed_of(self.seed, "item", self._epoch.value, int(index))
        if np.random.default_rng(seed).random() >= self.prob:
            lab = item[self.label_key]
            if lab.dtype in (torch.bool, np.bool_):  # as when it fires: 0/1 uint8
                item[self.label_key] = _like(_to_numpy(lab)[0].astype(np.uint8), lab, label=True)
            item["plan"] = ""
            return item
        img, img_ref = _to_numpy(item[self.image_key])
        lab, lab_ref = _to_numpy(item[self.label_key])
        chan = img.ndim == 4
        check_channels(self.synthesizer.preset, img.shape[0] if chan else 1)
        res = implant_tumors(
            img[0] if chan else img,
            lab[0] if chan else lab,
            synthesizer=self.synthesizer,
            organ_labels=self.organ_labels,
            tumor_label=self.tumor_label,
            seed=seed,
            affine=self._affine(item),
            lesion_mask=lesions_of(lab[0] if chan else lab, self.tumor_label),
        )
        if chan:  # other channels are kept as they are
            # (a boolean label map becomes uint8: a bool cannot hold the tumor label)
            new_img = img.copy()
            new_lab = lab.astype(np.uint8) if lab.dtype == np.bool_ else lab.copy()
            new_img[0], new_lab[0] = res.image, res.label
        else:
            new_img, new_lab = res.image, res.label
        item[self.image_key] = _like(new_img, img_ref)
        item[self.label_key] = _like(new_lab, lab_ref, label=True)
        item["plan"] = res.plan.to_json() if res.plan is not None else ""
        return item


class BatchTumorSynthesis:
    """Implant tumors into a collated batch where it lives: on the GPU, after the loader.

    For training loops that move each batch to the GPU: call it on the batch's ``image``
    ``(B, C, X, Y, Z)`` (HU, before intensity normalisation; tumors go into channel 0) and
    ``label`` ``(B, 1, X, Y, Z)``. Sample ``b`` of step ``s`` fires with probability ``prob``
    and gets the plan seeded by ``(seed, s, b)``; every plan of the batch renders in one
    :func:`synthgen.render_batch` call (on a GPU: the kernels of all tumors back to back, the
    host waits twice per batch), in place, through DLPack (no copies). Planning reads the
    organ's box and a few slices back from the GPU. CPU tensors take the CPU engine, with the
    same results. Needs CuPy for CUDA tensors (``pip install "synthgen[cuda12]"``).

    Args:
        organ: Organ name, preset name or preset path.
        organ_labels: Label ids of the organ.
        tumor_label: Label id written on tumor voxels.
        spacing: Voxel size (mm) of the batch's grid (axis 2 cranio-caudal), or give
            ``affine=`` per call.
        prob: Probability that a sample gets tumors.
        seed: Global seed.
        size: Size class to force.
        min_organ_voxels: Below this many organ voxels a sample is left alone.
        rank: This process's rank in distributed training; ``None`` reads it from
            ``torch.distributed`` when a process group is initialised (else 0).
        world_size: The number of ranks; ``None`` as for ``rank`` (else 1).

    Distributed training: rank ``r``'s batch is part ``r`` of one global batch of
    ``world_size * B`` samples (the ranks' batches one after the other, as DDP makes them), so
    its sample ``b`` gets the plan seeded by ``(seed, s, r * B + b)``: ranks draw different
    tumors, and their batches together get what one process gets for the global batch.

    Example:
        >>> synth = BatchTumorSynthesis("liver", spacing=(1.5, 1.5, 2.0))  # doctest: +SKIP
        >>> for batch in loader:  # (step counts up by itself, across epochs too)
        ...     img, lab = batch["image"].cuda(), batch["label"].cuda()
        ...     plans = synth(img, lab)  # in place; plans[b] is None if not fired
        ...     # with step=: a global step (an epoch's enumerate() repeats the seeds)
    """

    def __init__(
        self,
        organ: str,
        *,
        organ_labels: int | Sequence[int] = 1,
        tumor_label: int = 2,
        spacing: Sequence[float] | None = None,
        prob: float = 1.0,
        seed: int = 0,
        size: str | None = None,
        min_organ_voxels: int = 64,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        from .api import Synthesizer

        self.synthesizer = Synthesizer(organ, size=size)
        self.organ_labels = tuple(int(i) for i in np.atleast_1d(organ_labels))
        self.tumor_label = int(tumor_label)
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        self.prob, self.seed, self.spacing = float(prob), int(seed), spacing
        self.min_organ_voxels = int(min_organ_voxels)
        self.step = 0
        distributed(rank, world_size)  # (validates them now; read per call from a group)
        self._dist_args = (rank, world_size)

    @property
    def rank(self) -> int:
        """This process's rank (0 outside distributed training)."""
        return distributed(*self._dist_args)[0]

    def __call__(
        self,
        image: torch.Tensor,
        label: torch.Tensor,
        *,
        step: int | None = None,
        affine: np.ndarray | None = None,
    ) -> list[Any]:
        """Implant in place; returns one :class:`~synthgen.Plan` (or ``None``) per sample."""
        from .augment import affine_for, check_channels, lesions_of
        from .mass_effect import prepare_render
        from .rendering import label_arg, render_batch

        if image.ndim != 5 or label.ndim != 5 or label.shape[1] != 1:
            raise ValueError(
                "expected image (B, C, X, Y, Z) and label (B, 1, X, Y, Z), got "
                f"{tuple(image.shape)} and {tuple(label.shape)}"
            )
        if image.shape[0] != label.shape[0] or image.shape[2:] != label.shape[2:]:
            raise ValueError(f"image {tuple(image.shape)} and label {tuple(label.shape)} differ")
        if image.device != label.device:
            raise ValueError(f"image on {image.device}, label on {label.device}")
        if label.dtype == torch.bool or label.dtype.is_complex:
            raise ValueError(
                f"label is {label.dtype}: it is written in place and must hold the tumor label "
                f"{self.tumor_label}; pass an integer (or float) label map, e.g. "
                "label.to(torch.uint8)"
            )
        # the render's own rule for a label map (the tumor label fits its dtype, a dtype it can
        # write, writable), before a step is taken or an image warped: render_batch would
        # refuse the same map only after the mass effect had changed the batch
        label_arg(label[0, 0], label.shape[2:], self.tumor_label)
        check_channels(self.synthesizer.preset, image.shape[1])
        step = self.step if step is None else int(step)
        self.step = step + 1
        if affine is None:
            if self.spacing is None:
                raise ValueError("give BatchTumorSynthesis(spacing=...) or affine=")
            affine = affine_for(self.spacing)
        ids = torch.tensor(self.organ_labels, device=label.device)
        first = self.rank * image.shape[0]  # this rank's part of the global batch
        plans: list[Any] = []
        jobs = []
        for b in range(image.shape[0]):
            seed = seed_of(self.seed, "batch", step, first + b)
            plan = None
            if np.random.default_rng(seed).random() < self.prob:
                organ = torch.isin(label[b, 0], ids)
                if int(organ.sum()) >= self.min_organ_voxels:
                    lesions = lesions_of(label[b, 0], self.tumor_label)
                    plan = self._plan(image[b, 0], organ, seed, affine, lesions)
                    if plan is not None:
                        jobs.append((b, plan, organ))
            plans.append(plan)
        if jobs:
            # The preset's mass effect (if any) warps image and label map alike, per sample
            # (GPU data on the GPU, synthgen._mass_gpu); then one batched render that writes
            # the tumor label into the label maps too (on a GPU: one launch for the batch).
            preps = [
                prepare_render(p, image[b, 0], o, out=image[b, 0], label_out=label[b, 0])
                for b, p, o in jobs
            ]
            results = render_batch(
                [q.plan for q in preps],
                [q.image for q in preps],
                [q.organ_mask for q in preps],
                outs=[q.image for q in preps],
                affines=[affine] * len(jobs),
                label_outs=[label[b, 0] for b, _, _ in jobs],
                tumor_label=self.tumor_label,
            )
            for (_, p, _), res in zip(jobs, results, strict=True):
                res.plan = p
        return plans

    def _plan(self, image0: torch.Tensor, organ: torch.Tensor, seed: int, affine, lesions):
        # (planning reads CUDA tensors through views of the organ's box, CPU tensors, bfloat16
        # included, through NumPy views; the lesions already in the patch, rare, are copied
        # to the host whole, a patch's size)
        les_v = None if lesions is None else lesions.cpu().numpy()
        try:
            return self.synthesizer.plan(image0, organ, seed=seed, affine=affine, lesion_mask=les_v)
        except PlacementError:  # organ too small for the preset's tumors: leave the sample
            return None  # alone (a bad affine, NaN in the organ's box: raised)

    def __repr__(self) -> str:
        return (
            f"BatchTumorSynthesis(preset={self.synthesizer.preset.name!r}, prob={self.prob}, "
            f"seed={self.seed}{'' if self.rank == 0 else f', rank={self.rank}'})"
        )
