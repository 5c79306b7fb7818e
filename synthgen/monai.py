"""MONAI transforms that implant synthetic tumors during training.

* :class:`RandTumorSynthesis`: array transform on a channel-first ``(C, X, Y, Z)`` image and a
  ``(1, X, Y, Z)`` label map.
* :class:`RandTumorSynthesisd` (aliases :data:`RandTumorSynthesisD`,
  :data:`RandTumorSynthesisDict`): the dictionary version, for ``keys=("image", "label")``.

Both plan and render with :func:`synthgen.augment.implant_tumors`: the organ is the voxels of
the label map equal to ``organ_label`` (one id or several), tumors are rendered into image
channel 0 and written as ``tumor_label`` into the label map. Voxels that already hold
``tumor_label`` (real lesions, e.g. MSD's "cancer") are kept the preset's ``gap_mm`` away
from, as ``synthgen batch`` keeps a case's lesion masks.

Place the transform **before any intensity scaling** (``ScaleIntensityRanged``,
``NormalizeIntensityd``...): image values are treated as Hounsfield units (HU), and the
presets' contrasts, clipping windows and texture amplitudes are in HU. Spatial transforms
before it are fine (``Orientationd``, ``Spacingd``, crops): the voxel spacing (mm) and the
cranio-caudal axis are read from the MetaTensor's affine as it is at that point.

MONAI conventions: every random number comes from ``self.R`` (a NumPy ``RandomState`` that
``set_random_state`` and MONAI's ``DataLoader`` reseed per worker), ``randomize`` draws
whether the transform fires and a 63-bit sample seed for synthgen; the same state gives the
same tumors. When the transform does not fire its inputs come back as tensors
(``convert_to_tensor(..., track_meta=get_track_meta())``); when it fires they come back in
the caller's type, dtype and device, MetaTensor metadata kept, with the sample's plan as JSON
text under ``meta["synthgen_plan"]`` of the image. It is not a lazy transform.

synthgen has a CPU engine only: CPU tensors are read through zero-copy NumPy views (the
inputs are never modified; half precision, bfloat16 or float16 as under AMP, is rendered
through a float32 copy and the result cast back); CUDA tensors make a host round trip (a
one-time warning says so) and come back on their device. Inside a DataLoader worker the
render uses one thread (``synthgen.set_num_threads(1)``, as :mod:`synthgen.torch` does): the
workers already use the cores.

This module imports ``torch`` and ``monai``; ``import synthgen`` never imports it.

Example:
    >>> from monai.transforms import Compose, LoadImaged, EnsureChannelFirstd  # doctest: +SKIP
    >>> from synthgen.monai import RandTumorSynthesisd
    >>> train = Compose([
    ...     LoadImaged(keys=["image", "label"]),
    ...     EnsureChannelFirstd(keys=["image", "label"]),
    ...     Orientationd(keys=["image", "label"], axcodes="RAS"),
    ...     RandTumorSynthesisd(keys=("image", "label"), organ="liver", organ_label=1, prob=0.5),
    ...     ScaleIntensityRanged(keys="image", a_min=-175, a_max=250, b_min=0, b_max=1, clip=True),
    ... ])
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor, get_track_meta
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_numpy, convert_to_tensor

from .api import Synthesizer
from .augment import affine_for, check_channels, implant_tumors, lesions_of, organ_mask_of
from .planning import Plan, host_readable
from .presets import Preset

__all__ = [
    "PLAN_META_KEY",
    "RandTumorSynthesis",
    "RandTumorSynthesisD",
    "RandTumorSynthesisDict",
    "RandTumorSynthesisd",
]

PLAN_META_KEY = "synthgen_plan"
"""Key of the plan's JSON text in the image MetaTensor's ``meta`` dict (set when tumors were
implanted; a string, so DataLoader collation gives a list of strings per batch)."""

# Organ voxels spanning fewer HU than this look intensity-scaled rather than CT (warned once).
_MIN_ORGAN_SPAN_HU = 5.0
_warned: set[str] = set()
_threads_set_in_pid: int | None = None


def _warn_once(kind: str, message: str) -> None:
    if kind not in _warned:
        _warned.add(kind)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _one_thread_in_worker() -> None:
    """In a DataLoader worker, render with one thread (one process per core already)."""
    global _threads_set_in_pid
    pid = os.getpid()
    if _threads_set_in_pid == pid:
        return
    _threads_set_in_pid = pid
    if torch.utils.data.get_worker_info() is not None:
        from . import set_num_threads

        set_num_threads(1)


def _organ_ids(organ_label: int | Sequence[int]) -> tuple[int, ...]:
    ids = [organ_label] if isinstance(organ_label, (int, np.integer)) else list(organ_label)
    if not ids or any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) for i in ids):
        raise ValueError(f"organ_label must be an int or a non-empty sequence of ints, got {ids}")
    return tuple(int(i) for i in ids)


def _host_view(x: Any, name: str) -> np.ndarray:
    """A NumPy view of ``x`` (zero-copy for CPU tensors and arrays; a copy from a GPU)."""
    if isinstance(x, torch.Tensor):
        t = x.as_tensor() if isinstance(x, MetaTensor) else x
        t = t.detach()
        if t.device.type != "cpu":
            _warn_once(
                "device",
                f"RandTumorSynthesis works on host arrays: {name} on {t.device} is copied to "
                "the host, synthesized on the CPU and copied back (for GPU-resident data call "
                "synthgen.synthesize or render_batch on the CUDA tensors; this warning is "
                "shown once)",
            )
            t = t.cpu()
        if t.dtype.is_complex:
            raise ValueError(f"{name} has dtype {t.dtype}; use a real integer or float dtype")
        t = t.resolve_conj().resolve_neg()
    # half precision (AMP) and non-native byte order: float32 / native copies (the engine's
    # kernels take neither; the output is cast back to the input's dtype)
    return host_readable(t if isinstance(x, torch.Tensor) else np.asarray(x))


def _affine_of(img: Any, label: Any, spacing: tuple[float, float, float] | None) -> np.ndarray:
    """Voxel-to-world affine of the spatial axes: the MetaTensor's, else from ``spacing``."""
    for x in (img, label):
        if isinstance(x, MetaTensor):
            a = convert_to_numpy(x.affine, dtype=np.float64)
            if a.shape != (4, 4):
                raise ValueError(
                    f"expected a 4x4 affine on the MetaTensor (one 3-D sample, not a batch), "
                    f"got shape {a.shape}"
                )
            return a
    if spacing is None:
        raise ValueError(
            "RandTumorSynthesis needs the voxel spacing: give MetaTensor inputs (e.g. from "
            "LoadImaged, whose affine gives spacing and orientation) or pass spacing=(sx, sy, "
            "sz) in mm to the transform for plain NumPy arrays and torch tensors"
        )
    return affine_for(spacing)


class _SeededRandomizable(RandomizableTransform):
    """``randomize`` draws whether to fire and, if so, a 63-bit sample seed, from ``self.R``."""

    _seed: int = 0

    def randomize(self, data: Any = None) -> None:
        """Draw whether to fire and, if so, the sample seed (63 bits), all from ``self.R``."""
        super().randomize(None)
        if not self._do_transform:
            return
        hi = int(self.R.randint(0, 2**31))
        lo = int(self.R.randint(0, 2**32, dtype=np.int64))
        self._seed = (hi << 32) | lo


class RandTumorSynthesis(_SeededRandomizable):
    """Randomly implant synthetic tumors into a CT image and its label map (MONAI array form).

    The organ is the set of label voxels equal to ``organ_label`` (or to any of several ids);
    tumors are planned in it with the organ's preset, clear of the lesions already labelled
    ``tumor_label`` (the preset's ``gap_mm``), rendered into image channel 0 (other
    channels are copied unchanged) and written as ``tumor_label`` into the label map. A label
    map with fewer than ``min_organ_voxels`` organ voxels (a patch beside the organ), or an
    organ too small for the drawn tumors, comes back unchanged: a normal event, not an error.

    Image values are treated as HU: use the transform before any intensity scaling. The voxel
    spacing (mm) and cranio-caudal axis come from the MetaTensor's affine; plain NumPy arrays
    and torch tensors need ``spacing``.

    Args:
        organ: Organ name (``"liver"``: its default preset), preset name
            (``"liver-classic"``), path to a preset TOML file, or a ``synthgen.Preset``.
        organ_label: The organ's id in the label map, or a sequence of ids that together are
            the organ.
        tumor_label: Id written on tumor voxels.
        prob: Probability that the transform fires.
        size: Size class to force (``"tiny"``, ``"small"``, ``"medium"``, ``"large"``,
            ``"mix"`` where defined); ``None`` draws one from the preset's mix.
        min_organ_voxels: With fewer organ voxels nothing is implanted.
        spacing: Voxel size ``(sx, sy, sz)`` in mm along the spatial axes ``(X, Y, Z)``, for
            inputs without an affine (axis ``Z`` is then taken as cranio-caudal); ignored for
            MetaTensors, whose affine is used.

    Raises:
        ValueError: Unknown organ or preset, bad size class, bad ``organ_label`` or
            ``spacing`` (at construction).
    """

    backend: ClassVar[list[TransformBackends]] = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        organ: str | Path | Preset,
        organ_label: int | Sequence[int] = 1,
        tumor_label: int = 2,
        prob: float = 1.0,
        size: str | None = None,
        min_organ_voxels: int = 64,
        spacing: Sequence[float] | None = None,
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        self.synthesizer = Synthesizer(organ, size=size)
        self.organ_labels = _organ_ids(organ_label)
        self.tumor_label = int(tumor_label)
        self.min_organ_voxels = int(min_organ_voxels)
        self.spacing: tuple[float, float, float] | None = None
        if spacing is not None:
            sp = np.diag(affine_for(spacing))[:3]  # validates: 3 positive numbers
            self.spacing = (float(sp[0]), float(sp[1]), float(sp[2]))
        self._seed = 0

    def __call__(
        self, img: NdarrayOrTensor, label: NdarrayOrTensor, randomize: bool = True
    ) -> tuple[NdarrayOrTensor, NdarrayOrTensor]:
        """Implant tumors (or not, with probability ``1 - prob``).

        Args:
            img: Channel-first image ``(C, X, Y, Z)`` in HU (NumPy array, torch tensor or
                MetaTensor; any real dtype); tumors go into channel 0.
            label: Label map ``(1, X, Y, Z)`` on the same grid (any integer or float dtype).
            randomize: Draw new random parameters first; ``False`` reuses the last ones.

        Returns:
            ``(img, label)``. When fired: new arrays of the inputs' types, dtypes and devices
            (the inputs are not modified; MetaTensor metadata kept; the plan's JSON under
            ``img.meta["synthgen_plan"]``, ``""`` when no tumor was implanted). When not
            fired: the inputs as tensors (MetaTensors if ``get_track_meta()``, with
            ``meta["synthgen_plan"] = ""``, so that every sample of a batch has the key).

        Raises:
            ValueError: Bad shapes or dtypes, no affine and no ``spacing``, NaN or inf in
                the organ, or an image of several channels with a preset that enables mass
                effect (it would warp channel 0 and the label only; the channel count is known
                only from the data: for multi-channel images pass a preset without it, e.g.
                ``synthgen.presets.without_extras("liver", keep=("vessels", "appearance"))``).
        """
        if randomize:
            self.randomize()
        if not self._do_transform:
            track = get_track_meta()
            out = convert_to_tensor(img, track_meta=track)
            if isinstance(out, MetaTensor):  # the key on every sample, so batches keep it
                out.meta = {**out.meta, PLAN_META_KEY: ""}
            lab = convert_to_tensor(label, track_meta=track)
            # a boolean label map comes out uint8 whether the sample fires or not
            return out, lab.to(torch.uint8) if lab.dtype == torch.bool else lab
        return self._implant(img, label, self._seed)

    def _implant(
        self, img: NdarrayOrTensor, label: NdarrayOrTensor, seed: int
    ) -> tuple[NdarrayOrTensor, NdarrayOrTensor]:
        """Deterministic part: implant the sample ``seed`` (caller's types out)."""
        img_np = _host_view(img, "image")
        lab_np = _host_view(label, "label")
        if img_np.ndim != 4 or lab_np.ndim != 4:
            raise ValueError(
                "expected channel-first 3-D data: image (C, X, Y, Z) and label (1, X, Y, Z), got "
                f"image {tuple(img_np.shape)} and label {tuple(lab_np.shape)}"
            )
        if lab_np.shape[0] != 1:
            raise ValueError(f"label must have one channel, got shape {tuple(lab_np.shape)}")
        if img_np.shape[0] < 1 or img_np.shape[1:] != lab_np.shape[1:]:
            raise ValueError(
                f"image {tuple(img_np.shape)} and label {tuple(lab_np.shape)} must share the "
                "spatial grid (X, Y, Z)"
            )
        if img_np.dtype.kind not in "iuf":
            raise ValueError(f"image must be numeric (int or float HU), got dtype {img_np.dtype}")
        check_channels(self.synthesizer.preset, img_np.shape[0])  # (unknown before the data)
        affine = _affine_of(img, label, self.spacing)
        _one_thread_in_worker()

        image0, label0 = img_np[0], lab_np[0]
        organ = organ_mask_of(label0, self.organ_labels)
        self._check_hu(image0, organ)
        res = implant_tumors(
            image0,
            label0,
            synthesizer=self.synthesizer,
            organ_labels=self.organ_labels,
            tumor_label=self.tumor_label,
            seed=seed,
            affine=affine,
            min_organ_voxels=self.min_organ_voxels,
            organ_mask=organ,
            lesion_mask=lesions_of(label0, self.tumor_label),  # (MSD "cancer"): kept clear of
        )
        if img_np.shape[0] == 1:
            out_img = res.image[None]
        else:
            out_img = img_np.copy()
            out_img[0] = res.image
        out_img_t = convert_to_dst_type(out_img, dst=self._dst(img))[0]
        lab_dst = self._dst(label)
        # a boolean label map comes back uint8 (0/1/tumor label), which holds the tumor label
        # (cast back to bool, every tumor voxel would read as organ)
        lab_dtype = None
        if lab_np.dtype == np.bool_:
            lab_dtype = torch.uint8 if isinstance(lab_dst, torch.Tensor) else np.uint8
        out_lab_t = convert_to_dst_type(res.label[None], dst=lab_dst, dtype=lab_dtype)[0]
        if isinstance(out_img_t, MetaTensor):  # "" when nothing was implanted
            plan: Plan | None = res.plan
            out_img_t.meta[PLAN_META_KEY] = plan.to_json() if plan is not None else ""
        return out_img_t, out_lab_t

    @staticmethod
    def _dst(x: NdarrayOrTensor) -> NdarrayOrTensor:
        # As MONAI transforms do: a MetaTensor comes back as a plain tensor without track_meta.
        if isinstance(x, MetaTensor) and not get_track_meta():
            return x.as_tensor()
        return x

    def _check_hu(self, image0: np.ndarray, organ: np.ndarray) -> None:
        """Warn once when the organ's values look intensity-scaled rather than HU."""
        vals = image0[::2, ::2, ::2][organ[::2, ::2, ::2]]
        if vals.size < 8:
            return
        span = float(vals.max()) - float(vals.min())
        if span < _MIN_ORGAN_SPAN_HU:
            _warn_once(
                "hu",
                f"the organ's values span only {span:.3g}: they look intensity-scaled, but "
                "RandTumorSynthesis treats image values as HU; place it before "
                "ScaleIntensityRanged / NormalizeIntensityd (this warning is shown once)",
            )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(preset={self.synthesizer.preset.name!r}, "
            f"organ_label={self.organ_labels}, tumor_label={self.tumor_label}, prob={self.prob})"
        )


class RandTumorSynthesisd(_SeededRandomizable, MapTransform):
    """Dictionary version of :class:`RandTumorSynthesis`: tumors into ``keys[0]`` and ``keys[1]``.

    ``d[keys[0]]`` is the channel-first image ``(C, X, Y, Z)`` in HU, ``d[keys[1]]`` its label
    map ``(1, X, Y, Z)``; other entries pass through untouched. Use it before any intensity
    scaling (values are treated as HU); spacing (mm) and orientation come from the image
    MetaTensor's affine (e.g. after ``LoadImaged``, ``Orientationd``, ``Spacingd``). When
    tumors were implanted, the plan's JSON text is stored under
    ``d[keys[0]].meta["synthgen_plan"]``; batches from MONAI's ``DataLoader`` then carry a list
    of plans (only when every sample of the batch has one: collation keeps common meta keys).

    Args:
        keys: Exactly two keys: the image's, then the label map's.
        organ: Organ name, preset name, preset TOML path or ``synthgen.Preset``.
        organ_label: The organ's id in the label map, or a sequence of ids.
        tumor_label: Id written on tumor voxels.
        prob: Probability that the transform fires.
        size: Size class to force; ``None`` draws from the preset's mix.
        min_organ_voxels: With fewer organ voxels nothing is implanted.
        spacing: Voxel size in mm for inputs without an affine (ignored for MetaTensors).
        allow_missing_keys: If a key is missing, pass the data through instead of raising.

    Raises:
        ValueError: ``keys`` not of length two, or a bad argument of
            :class:`RandTumorSynthesis`.
    """

    backend = RandTumorSynthesis.backend

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        *,
        organ: str | Path | Preset,
        organ_label: int | Sequence[int] = 1,
        tumor_label: int = 2,
        prob: float = 1.0,
        size: str | None = None,
        min_organ_voxels: int = 64,
        spacing: Sequence[float] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if len(self.keys) != 2:
            raise ValueError(
                f"keys must be exactly (image_key, label_key), got {tuple(self.keys)!r}"
            )
        self.synthesis = RandTumorSynthesis(
            organ,
            organ_label=organ_label,
            tumor_label=tumor_label,
            prob=1.0,
            size=size,
            min_organ_voxels=min_organ_voxels,
            spacing=spacing,
        )
        self._seed = 0

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, Any]:
        """Implant tumors into ``data[keys[0]]`` and ``data[keys[1]]`` (see the class doc).

        Args:
            data: A mapping holding the image and the label map.

        Returns:
            A new dict; image and label as :meth:`RandTumorSynthesis.__call__` returns them.
        """
        d = dict(data)
        self.randomize(None)
        present = list(self.key_iterator(d))
        if not self._do_transform or len(present) != 2:
            for key in present:
                d[key] = convert_to_tensor(d[key], track_meta=get_track_meta())
            img = d.get(self.keys[0])
            if isinstance(img, MetaTensor):  # the key on every sample, so batches keep it
                img.meta = {**img.meta, PLAN_META_KEY: ""}
            return d
        img_key, label_key = present
        d[img_key], d[label_key] = self.synthesis._implant(d[img_key], d[label_key], self._seed)
        return d


RandTumorSynthesisD = RandTumorSynthesisDict = RandTumorSynthesisd
