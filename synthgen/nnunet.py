"""nnU-Net v2: synthetic tumors as a training-time augmentation.

nnU-Net v2 augments every patch on CPU in background processes with batchgeneratorsv2
transforms. This module gives it a tumor step:

* :class:`TumorSynthesisTransform`, a batchgeneratorsv2 ``BasicTransform`` that implants
  tumors into channel 0 of a patch and writes the tumor label into its segmentation;
* :func:`synthesis_transform`, which builds it (wrapped in ``RandomTransform``) from nnU-Net's
  plans and ``dataset.json``;
* :func:`make_trainer`, an ``nnUNetTrainer`` subclass that puts the step first in the training
  pipeline, before spatial augmentation (validation is untouched);
* :func:`trainer_module_source`, the source of a file that registers such trainers.

Patches reach the transforms intensity-normalised. For CT (``CTNormalization``) nnU-Net clips
to the dataset's foreground 0.5 / 99.5 percentiles and z-scores with its foreground mean and
standard deviation; :class:`CTIntensity` converts between those units and HU, so the presets'
HU contrast applies unchanged.

Registering a trainer: nnU-Net finds trainers only by class name inside its own package, so
write the module that :func:`trainer_module_source` returns into
``nnunetv2/training/nnUNetTrainer/variants/`` and select it with ``-tr``::

    NNUNET=$(python -c 'import nnunetv2, os; print(os.path.dirname(nnunetv2.__file__))')
    python -c "import synthgen.nnunet as n; print(n.trainer_module_source('liver'))" \\
        > $NNUNET/training/nnUNetTrainer/variants/synthgen_trainers.py
    nnUNetv2_train DATASET 3d_fullres 0 -tr nnUNetTrainerSynthgenLiver

``dataset.json`` must name the organ (``"liver"``) and its tumor (``"liver_lesion"`` or any
name with tumor / tumour / cancer / lesion); see ``docs/nnunet.md``.

This module imports torch and batchgeneratorsv2 (an nnU-Net environment has both; elsewhere
``pip install synthgen[nnunet]``); ``import synthgen`` does not import it, and nnunetv2 is
imported only by :func:`make_trainer`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform

from .api import Synthesizer
from .augment import affine_for, check_channels, implant_tumors, lesions_of
from .planning import host_readable
from .presets import LESION_NAMES, ORGAN_LABEL_NAMES, ORGANS, Preset, load_preset

__all__ = [
    "CTIntensity",
    "TumorSynthesisTransform",
    "make_trainer",
    "synthesis_transform",
    "trainer_module_source",
    "trainer_name",
]

_ArrayT = TypeVar("_ArrayT", np.ndarray, torch.Tensor, float)

# Seeds are drawn in [0, 2**62): any non-negative int is a valid synthgen seed.
_SEED_HIGH = 2**62


@dataclass(frozen=True)
class CTIntensity:
    """nnU-Net's ``CTNormalization`` of one channel, and its inverse.

    nnU-Net maps HU to network units as ``(clip(hu, lower, upper) - mean) / std`` with the
    dataset's foreground statistics (from the plans). HU outside ``[lower, upper]`` are lost
    by that clipping: :meth:`to_hu` of a normalised value is always inside the window.

    Attributes:
        mean: Foreground mean intensity, HU.
        std: Foreground standard deviation, HU (nnU-Net divides by ``max(std, 1e-8)``).
        lower: Lower clip, HU (the foreground's 0.5th percentile, ``percentile_00_5``).
        upper: Upper clip, HU (the foreground's 99.5th percentile, ``percentile_99_5``).
    """

    mean: float
    std: float
    lower: float
    upper: float

    def __post_init__(self) -> None:
        vals = (self.mean, self.std, self.lower, self.upper)
        if not all(np.isfinite(v) for v in vals):
            raise ValueError(f"CTIntensity needs finite numbers, got {vals}")
        if self.std < 0:
            raise ValueError(f"std must be >= 0, got {self.std}")
        if self.lower > self.upper:
            raise ValueError(f"lower ({self.lower}) must not exceed upper ({self.upper})")

    @classmethod
    def from_plans(cls, plans: Mapping[str, Any], channel: int = 0) -> CTIntensity:
        """Read a channel's statistics from an nnU-Net plans dictionary.

        Args:
            plans: The plans (``nnUNetPlans.json`` loaded, or ``PlansManager.plans``).
            channel: Input channel (the keys of ``foreground_intensity_properties_per_channel``
                are strings in plans.json; integers are accepted too).

        Returns:
            The channel's :class:`CTIntensity`.

        Raises:
            ValueError: The plans lack the channel or one of ``mean``, ``std``,
                ``percentile_00_5``, ``percentile_99_5``.
        """
        props = plans.get("foreground_intensity_properties_per_channel")
        if not isinstance(props, Mapping):
            raise ValueError("plans have no 'foreground_intensity_properties_per_channel'")
        p = props.get(str(channel), props.get(channel))
        if not isinstance(p, Mapping):
            raise ValueError(
                f"plans have no foreground intensity properties for channel {channel} "
                f"(channels: {', '.join(map(str, props))})"
            )
        keys = ("mean", "std", "percentile_00_5", "percentile_99_5")
        missing = [k for k in keys if k not in p]
        if missing:
            raise ValueError(
                f"foreground intensity properties of channel {channel} lack {', '.join(missing)}"
            )
        return cls(
            mean=float(p["mean"]),
            std=float(p["std"]),
            lower=float(p["percentile_00_5"]),
            upper=float(p["percentile_99_5"]),
        )

    @property
    def _scale(self) -> float:
        return max(float(self.std), 1e-8)

    @property
    def window(self) -> tuple[float, float]:
        """The clip window ``(lower, upper)`` in normalised units."""
        return (self.lower - self.mean) / self._scale, (self.upper - self.mean) / self._scale

    def to_hu(self, x: _ArrayT) -> _ArrayT:
        """Normalised units -> HU: ``x * std + mean`` (keeps a float32 array float32).

        Args:
            x: Normalised intensities (NumPy array, torch tensor or number).

        Returns:
            HU, inside ``[lower, upper]`` for values nnU-Net produced.
        """
        return x * self._scale + self.mean

    def from_hu(self, hu: _ArrayT) -> _ArrayT:
        """HU -> normalised units exactly as nnU-Net: clip to ``[lower, upper]``, z-score.

        Args:
            hu: Intensities in HU (NumPy array, torch tensor or number).

        Returns:
            ``(clip(hu, lower, upper) - mean) / std``, same type (and float dtype).
        """
        if isinstance(hu, torch.Tensor):
            clipped = hu.clamp(self.lower, self.upper)
        elif isinstance(hu, np.ndarray):
            clipped = np.clip(hu, self.lower, self.upper)
        else:
            clipped = min(max(float(hu), self.lower), self.upper)
        return (clipped - self.mean) / self._scale


# (pid, salt) of this process; see TumorSynthesisTransform.get_parameters.
_SALT: tuple[int, int] | None = None


def _process_salt(owner_pid: int) -> int:
    """0 in the process that built the transform; else a per-process value from NumPy."""
    global _SALT
    pid = os.getpid()
    if pid == owner_pid:
        return 0
    if _SALT is None or _SALT[0] != pid:
        # The legacy global generator on purpose: batchgenerators reseeds it per worker.
        _SALT = (pid, int(np.random.randint(1, _SEED_HIGH, dtype=np.int64)))  # noqa: NPY002
    return _SALT[1]


class TumorSynthesisTransform(BasicTransform):
    """Implant synthetic tumors into an nnU-Net patch (batchgeneratorsv2 transform).

    Channel 0 of ``image`` is converted to HU, tumors are planned and rendered into the organ
    (the voxels of ``segmentation`` channel 0 equal to one of ``organ_labels``; nnU-Net's
    ``-1`` padding is never organ) the preset's ``gap_mm`` away from the lesions already in
    the patch (its voxels labelled ``tumor_label``), the result is converted back (and
    clipped to the normalisation window again) and ``tumor_label`` is written on the tumor
    voxels. Other channels, and every voxel the tumors do not touch, are left bit-identical;
    the input tensors are not modified (new tensors of the same dtype and device are
    returned; a bfloat16 or float16 patch is worked on in float32 and the changed voxels
    cast back). A
    patch with too little organ (fewer than ``min_organ_voxels``, or too small for the
    preset's tumors) is returned unchanged. Other channels do not show the tumors; with a
    preset that enables mass effect (which would warp channel 0 and the segmentation only) a
    patch of several channels is a ``ValueError``.

    Wrap it in ``RandomTransform(..., apply_probability=p)`` (see :func:`synthesis_transform`)
    and put it before spatial augmentation, where the patch still has the preprocessed
    spacing.

    Args:
        organ: Organ name (``"liver"``), preset name (``"liver-classic"``), preset file path,
            or a :class:`synthgen.Preset`.
        organ_labels: Label ids that together are the organ.
        tumor_label: Label id written on tumor voxels (not one of ``organ_labels``).
        spacing: Voxel size in mm, in the order of the patch's spatial axes (nnU-Net's
            configuration ``spacing``, which is already in ``transpose_forward`` order).
        intensity: The normalisation of channel 0, or ``None`` when the image is in HU.
        craniocaudal_axis: Spatial axis (0, 1 or 2) running head to feet: 0 for nnU-Net's
            readers with ``transpose_forward == [0, 1, 2]``.
        size: Size class to force (``None``: the preset's mix).
        min_organ_voxels: Below this many organ voxels in the patch nothing is implanted.

    Raises:
        ValueError: Invalid labels, spacing, axis, organ / preset or size class.
    """

    def __init__(
        self,
        organ: str | Path | Preset,
        organ_labels: Sequence[int],
        tumor_label: int,
        spacing: Sequence[float],
        intensity: CTIntensity | None = None,
        craniocaudal_axis: int = 0,
        size: str | None = None,
        min_organ_voxels: int = 64,
    ) -> None:
        super().__init__()
        ids = tuple(int(i) for i in organ_labels)
        if not ids or min(ids) <= 0:
            raise ValueError(f"organ_labels must be positive label ids, got {organ_labels}")
        tumor = int(tumor_label)
        if tumor <= 0 or tumor in ids:
            raise ValueError(
                f"tumor_label must be a positive id not in organ_labels {ids}, got {tumor_label}"
            )
        self.synthesizer = Synthesizer(organ, size=size)
        self.organ = self.synthesizer.preset.name
        self.organ_labels = ids
        self.tumor_label = tumor
        self.spacing = tuple(float(s) for s in spacing)
        self.affine = affine_for(self.spacing, craniocaudal_axis)
        self.intensity = intensity
        self.craniocaudal_axis = int(craniocaudal_axis)
        self.size = size
        self.min_organ_voxels = int(min_organ_voxels)
        self._owner_pid = os.getpid()

    def get_parameters(self, **data_dict: Any) -> dict[str, Any]:
        """Draw this sample's seed.

        The seed is ``torch.randint`` on torch's global generator, the convention of
        batchgeneratorsv2 transforms: ``torch.manual_seed`` reproduces it exactly in the
        process that built the transform (the main process, or nnU-Net without background
        workers). batchgenerators reseeds only NumPy in its background workers, so forked
        workers draw identical torch sequences; there the draw is mixed (XOR) with a
        per-process value taken once from NumPy's global generator, which batchgenerators
        does reseed per worker, so workers implant different tumors.

        Returns:
            ``{"seed": int}`` with ``0 <= seed < 2**62``.
        """
        seed = int(torch.randint(0, _SEED_HIGH, (1,)).item())
        return {"seed": seed ^ _process_salt(self._owner_pid)}

    def apply(self, data_dict: dict[str, Any], **params: Any) -> dict[str, Any]:
        """Implant tumors with ``params["seed"]`` (see the class docstring).

        Args:
            data_dict: ``image`` (float tensor ``(C, X, Y, Z)``) and ``segmentation`` (integer
                tensor ``(C, X, Y, Z)``), as nnU-Net's data loader passes them.
            **params: ``seed`` from :meth:`get_parameters`.

        Returns:
            ``data_dict`` with new ``image`` and ``segmentation`` tensors, or unchanged when
            nothing was implanted.

        Raises:
            ValueError: Missing keys, not a 3-D patch (2-D configurations are not
                supported), or several channels with a mass-effect preset.
        """
        image = data_dict.get("image")
        seg = data_dict.get("segmentation")
        if not isinstance(image, torch.Tensor) or not isinstance(seg, torch.Tensor):
            raise ValueError(
                "TumorSynthesisTransform needs 'image' and 'segmentation' tensors; put it "
                "first in the pipeline (before deep-supervision downsampling)"
            )
        if image.ndim != 4 or seg.ndim != 4 or image.shape[1:] != seg.shape[1:]:
            raise ValueError(
                "TumorSynthesisTransform needs 3-D patches (C, X, Y, Z) of equal spatial "
                f"shape, got image {tuple(image.shape)} and segmentation {tuple(seg.shape)} "
                "(2-D configurations are not supported)"
            )
        check_channels(self.synthesizer.preset, image.shape[0], warped="segmentation")
        # (a cascade's second segmentation channel, the previous stage's, would not be warped)
        check_channels(self.synthesizer.preset, seg.shape[0], "the segmentation has", "channel 0")
        img0, lab0 = _host(image[0]), _host(seg[0])
        hu = self.intensity.to_hu(img0) if self.intensity is not None else img0
        res = implant_tumors(
            hu,
            lab0,
            synthesizer=self.synthesizer,
            organ_labels=self.organ_labels,
            tumor_label=self.tumor_label,
            seed=int(params["seed"]),
            affine=self.affine,
            min_organ_voxels=self.min_organ_voxels,
            lesion_mask=lesions_of(lab0, self.tumor_label),  # the case's own: kept clear of
        )
        if res.plan is None:
            return data_dict
        # Write back only what the tumors changed: the other voxels keep their exact bits
        # (a round trip through HU would perturb them by rounding).
        changed = res.image != hu
        values = res.image[changed]
        if self.intensity is not None:
            values = self.intensity.from_hu(values)
        out_image = image.detach().clone()
        out_image[0][torch.from_numpy(changed).to(image.device)] = torch.from_numpy(
            np.ascontiguousarray(values)
        ).to(device=image.device, dtype=image.dtype)
        # The whole label channel: the tumors, and the preset's mass effect (if any) moved
        # the organ boundaries with the image.
        out_seg = seg.detach().clone()
        out_seg[0] = torch.from_numpy(np.ascontiguousarray(res.label)).to(
            device=seg.device, dtype=seg.dtype
        )
        data_dict["image"] = out_image
        data_dict["segmentation"] = out_seg
        return data_dict

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(organ={self.organ!r}, organ_labels={self.organ_labels}, "
            f"tumor_label={self.tumor_label}, spacing={self.spacing}, "
            f"intensity={self.intensity!r}, craniocaudal_axis={self.craniocaudal_axis}, "
            f"size={self.size!r}, min_organ_voxels={self.min_organ_voxels})"
        )


def _host(t: torch.Tensor) -> np.ndarray:
    """A patch channel on the host as NumPy; half precision (bfloat16, which NumPy lacks, or
    float16, as under AMP) as float32: rendered in float32, cast back when written."""
    return host_readable(t.detach().cpu())


# --------------------------------------------------------------------------------------
# reading nnU-Net's plans and dataset.json
# --------------------------------------------------------------------------------------

_LESION_WORD = re.compile(r"(tumou?r|cancer|lesion|metasta)")


def _norm(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", str(name).strip().lower())


def _configuration(plans: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A configuration of the plans with ``inherits_from`` resolved (as PlansManager does)."""
    confs = plans.get("configurations")
    if not isinstance(confs, Mapping) or not confs:
        raise ValueError("plans have no 'configurations'")
    seen: list[str] = []
    chain: list[Mapping[str, Any]] = []
    cur: str | None = name
    while cur is not None:
        if cur not in confs:
            where = f" (inherited by {seen[-1]!r})" if seen else ""
            raise ValueError(
                f"plans have no configuration {cur!r}{where}; available: {', '.join(confs)}"
            )
        if cur in seen:
            raise ValueError(f"configuration {name!r} inherits from itself ({' -> '.join(seen)})")
        seen.append(cur)
        chain.append(confs[cur])
        cur = confs[cur].get("inherits_from")
    out: dict[str, Any] = {}
    for c in reversed(chain):
        out.update(c)
    out.pop("inherits_from", None)
    return out


def _ids(value: Any) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def _labels(dataset_json: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    labels = dataset_json.get("labels")
    if not isinstance(labels, Mapping) or not labels:
        raise ValueError("dataset_json has no 'labels' mapping (name -> id)")
    out: dict[str, tuple[int, ...]] = {}
    for k, v in labels.items():
        try:
            out[_norm(k)] = out.get(_norm(k), ()) + _ids(v)
        except (TypeError, ValueError):
            raise ValueError(
                f"dataset_json labels must map names to integer ids, got {k!r}: {v!r}"
            ) from None
    return out


def _organ_names(organ: str) -> tuple[str, ...]:
    return ORGAN_LABEL_NAMES.get(organ, (_norm(organ),))


def _lesion_name(organ: str) -> str:
    return _norm(LESION_NAMES.get(organ, f"{organ}_lesion"))


def _tumor_label(organ: str, labels: Mapping[str, tuple[int, ...]]) -> int:
    own = _organ_names(organ)
    other_organs = [o for o in ORGANS if o != organ]
    other_prefixes = tuple(f"{n}_" for o in other_organs for n in _organ_names(o))
    other_lesions = {_lesion_name(o) for o in other_organs}
    exact = {_lesion_name(organ)} | {f"{n}_{w}" for n in own for w in ("lesion", "tumor")}
    lesion_like = {n: v for n, v in labels.items() if n not in own and _LESION_WORD.search(n)}
    tiers = (
        {n: v for n, v in lesion_like.items() if n in exact},
        {n: v for n, v in lesion_like.items() if n.startswith(tuple(f"{o}_" for o in own))},
        {
            n: v
            for n, v in lesion_like.items()
            if not n.startswith(other_prefixes) and n not in other_lesions
        },
    )
    for tier in tiers:
        ids = {i for v in tier.values() for i in v if i != 0}
        if len(ids) == 1:
            return ids.pop()
        if len(ids) > 1:
            raise ValueError(
                f"dataset_json has several tumor labels for {organ}: "
                f"{', '.join(f'{n}={list(v)}' for n, v in tier.items())}; pass tumor_label="
            )
    raise ValueError(
        f"dataset_json labels ({', '.join(labels)}) have no tumor label for {organ}: looked "
        f"for {_lesion_name(organ)!r} or a name containing tumor, tumour, cancer or lesion; "
        "add one to dataset.json or pass tumor_label="
    )


def synthesis_transform(
    plans: Mapping[str, Any],
    dataset_json: Mapping[str, Any],
    configuration: str,
    organ: str | Path | Preset,
    probability: float = 0.5,
    organ_labels: Sequence[int] | None = None,
    tumor_label: int | None = None,
    size: str | None = None,
    craniocaudal_axis: int | None = None,
) -> RandomTransform:
    """The tumor step for an nnU-Net configuration, applied with ``probability``.

    Reads from the plans the configuration's spacing (in the preprocessed arrays' axis
    order), the intensity properties of channel 0 (when its normalisation is
    ``CTNormalization``; with ``NoNormalization`` the patches are HU already) and
    ``transpose_forward`` (the cranio-caudal axis is the one that array axis 0 of nnU-Net's
    readers moved to); from ``dataset_json`` the organ's and the tumor's label ids.

    Args:
        plans: nnU-Net plans (``nnUNetPlans.json`` loaded, or ``PlansManager.plans``).
        dataset_json: The dataset's ``dataset.json`` (its ``labels``: name -> id).
        configuration: Configuration name (``"3d_fullres"``, ``"3d_lowres"``, ...).
        organ: Organ name, preset name or path, or a :class:`synthgen.Preset`.
        probability: Probability that a patch gets tumors (``RandomTransform``).
        organ_labels: Organ ids (default: the labels named like the preset's organ, e.g.
            ``liver``; ``kidney`` also matches ``kidney_left`` / ``kidney_right``).
        tumor_label: Tumor id (default: the label named ``LESION_NAMES[organ]``, e.g.
            ``liver_lesion``, else ``<organ>_...`` or any name with tumor / tumour / cancer /
            lesion, when exactly one id matches).
        size: Size class to force (``None``: the preset's mix).
        craniocaudal_axis: Override of the cranio-caudal axis of the patches (for readers
            whose array axis 0 is not head to feet).

    Returns:
        ``RandomTransform(TumorSynthesisTransform(...), apply_probability=probability)``.

    Raises:
        ValueError: Unknown configuration, a 2-D configuration, channel 0 not normalised with
            ``CTNormalization`` (or ``NoNormalization``), missing intensity properties, an
            organ / tumor label that ``dataset_json`` does not define, or several
            ``channel_names`` with a preset that enables mass effect (it would warp channel 0
            and the segmentation only: pass a preset without it, e.g.
            ``synthgen.presets.without_extras("liver", keep=("vessels", "appearance"))``).
    """
    p = float(probability)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    preset = load_preset(organ)
    conf = _configuration(plans, configuration)
    patch = conf.get("patch_size")
    spacing = conf.get("spacing")
    if patch is not None and len(patch) != 3:
        raise ValueError(
            f"configuration {configuration!r} is {len(patch)}-D; tumor synthesis needs a 3-D "
            "configuration (3d_fullres, 3d_lowres, 3d_cascade_fullres)"
        )
    if spacing is None or len(spacing) != 3:
        raise ValueError(f"configuration {configuration!r} has no 3-D 'spacing' ({spacing})")
    schemes = conf.get("normalization_schemes") or []
    scheme = schemes[0] if schemes else None
    if scheme == "CTNormalization":
        intensity: CTIntensity | None = CTIntensity.from_plans(plans, 0)
    elif scheme == "NoNormalization":
        intensity = None
    else:
        raise ValueError(
            f"channel 0 of configuration {configuration!r} uses {scheme!r}; tumor synthesis "
            "needs HU, i.e. 'CTNormalization' (nnU-Net's default for a channel named 'CT' in "
            "dataset.json channel_names) or 'NoNormalization'"
        )
    if craniocaudal_axis is None:
        tf = [int(a) for a in plans.get("transpose_forward", [0, 1, 2])]
        if sorted(tf) != [0, 1, 2]:
            raise ValueError(f"plans transpose_forward must permute [0, 1, 2], got {tf}")
        craniocaudal_axis = tf.index(0)
    if organ_labels is None or tumor_label is None:
        labels = _labels(dataset_json)
        if tumor_label is None:
            tumor_label = _tumor_label(preset.organ, labels)
        if organ_labels is None:
            names = _organ_names(preset.organ)
            found = sorted({i for n in names for i in labels.get(n, ()) if i != 0})
            organ_labels = [i for i in found if i != int(tumor_label)]
            if not organ_labels:
                raise ValueError(
                    f"dataset_json labels ({', '.join(labels)}) have no label for organ "
                    f"{preset.organ!r} (looked for {', '.join(names)}); pass organ_labels="
                )
    channels = dataset_json.get("channel_names")
    if isinstance(channels, Mapping):  # known now: fail here, not in every augmentation worker
        check_channels(preset, len(channels), "dataset_json channel_names lists", "segmentation")
    if conf.get("previous_stage"):  # its patches carry the previous stage's segmentation too
        check_channels(
            preset,
            2,
            f"configuration {configuration!r} is a cascade: its segmentation (with the "
            f"previous stage's, {conf['previous_stage']!r}) has",
            "channel 0",
        )
    step = TumorSynthesisTransform(
        preset,
        organ_labels,
        int(tumor_label),
        spacing,
        intensity=intensity,
        craniocaudal_axis=craniocaudal_axis,
        size=size,
    )
    return RandomTransform(step, apply_probability=p)


# --------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------


def trainer_name(organ: str | Path | Preset) -> str:
    """Default trainer class name: ``nnUNetTrainerSynthgen`` + the preset's name in CamelCase.

    ``"liver"`` -> ``nnUNetTrainerSynthgenLiver``; ``"liver-classic"`` ->
    ``nnUNetTrainerSynthgenLiverClassic``; a preset file gives its ``name``.
    """
    name = load_preset(organ).name
    parts = [w for w in re.split(r"[^0-9A-Za-z]+", name) if w]
    return "nnUNetTrainerSynthgen" + "".join(w[:1].upper() + w[1:] for w in parts)


def make_trainer(
    organ: str | Path | Preset,
    probability: float = 0.5,
    name: str | None = None,
    *,
    base: type | None = None,
    module: str | None = None,
) -> type:
    """An ``nnUNetTrainer`` subclass that implants tumors into training patches.

    Its ``get_training_transforms`` calls the parent's and inserts
    :func:`synthesis_transform` (reading plans, ``dataset.json`` and configuration from the
    trainer) at position 0, before spatial augmentation. It also sets
    ``SYNTHGEN_NUM_THREADS=1`` unless already set, inherited by nnU-Net's augmentation
    workers, which run in parallel already. nnunetv2 is imported here, not at module import.

    Args:
        organ: Organ name, preset name or path, or a :class:`synthgen.Preset`.
        probability: Probability that a training patch gets tumors.
        name: Class name (default :func:`trainer_name`); nnU-Net selects trainers by it
            (``-tr``) and names its output folders after it.
        base: Trainer class to extend (default ``nnUNetTrainer``; e.g. a ResEnc variant).
        module: ``__module__`` of the class (the module that defines it at top level, so
            pickle and nnU-Net can find it there).

    Returns:
        The trainer class.

    Raises:
        ValueError: Unknown organ / preset or a probability outside [0, 1].
        ImportError: nnunetv2 is not installed.
    """
    p = float(probability)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    preset = load_preset(organ)
    cls_name = name or trainer_name(preset)
    if not cls_name.isidentifier():
        raise ValueError(f"trainer name must be a Python identifier, got {cls_name!r}")
    if base is None:
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        base = nnUNetTrainer

    def get_training_transforms(self, *args: Any, **kwargs: Any) -> BasicTransform:
        transforms = super(cls, self).get_training_transforms(*args, **kwargs)
        step = synthesis_transform(
            self.plans_manager.plans,
            self.dataset_json,
            self.configuration_name,
            preset,
            probability=p,
        )
        os.environ.setdefault("SYNTHGEN_NUM_THREADS", "1")
        log = getattr(self, "print_to_log_file", None)
        if callable(log):
            log(f"synthgen: {step!r} first in the training transforms")
        if isinstance(transforms, ComposeTransforms):
            transforms.transforms.insert(0, step)
            return transforms
        return ComposeTransforms([step, transforms])

    get_training_transforms.__doc__ = (
        f"The parent's training transforms with synthgen's {preset.name!r} tumors (p={p}) first."
    )
    cls = type(
        cls_name,
        (base,),
        {
            "get_training_transforms": get_training_transforms,
            "synthgen_organ": preset.name,
            "synthgen_probability": p,
            "__doc__": f"nnU-Net trainer with synthgen {preset.name!r} tumors (p={p}).",
            "__module__": module or __name__,
        },
    )
    get_training_transforms.__qualname__ = f"{cls_name}.get_training_transforms"
    return cls


_SOURCE_HEAD = '''"""nnU-Net trainers with synthgen tumor synthesis (written by synthgen.nnunet).

Select one with -tr, e.g.: nnUNetv2_train DATASET 3d_fullres 0 -tr {first}
"""

import warnings

try:
    from synthgen.nnunet import make_trainer
except ImportError as e:  # keep nnU-Net's other trainers usable without synthgen
    warnings.warn(f"synthgen trainers unavailable: {{e}}", stacklevel=1)
else:
'''


def _preset_spec(organ: str | Path) -> str:
    """How the generated module names a preset: a name as it is, a preset file by its
    absolute path (nnU-Net imports the module from whatever folder it runs in; a relative
    path would not be found there, and the module's failure would break nnU-Net's lookup of
    every other trainer too)."""
    from .presets import is_preset_file

    return str(Path(organ).resolve()) if is_preset_file(organ) else str(organ)


def trainer_module_source(
    organ: str | Path | Sequence[str | Path] = "liver", probability: float = 0.5
) -> str:
    """Source of a module that defines synthgen trainers for nnU-Net.

    nnU-Net looks trainers up by class name inside ``nnunetv2.training.nnUNetTrainer``, so
    write this into ``nnunetv2/training/nnUNetTrainer/variants/synthgen_trainers.py``. The
    module defines ``nnUNetTrainerSynthgenLiver = make_trainer("liver", ...)`` (one class
    per organ); if synthgen cannot be imported it warns and defines nothing, so nnU-Net's
    other trainers keep working.

    Args:
        organ: An organ / preset name or path, or several of them.
        probability: Probability that a training patch gets tumors.

    Returns:
        Python source.

    Raises:
        ValueError: Unknown organ / preset or a probability outside [0, 1].
    """
    organs = [organ] if isinstance(organ, (str, Path)) else list(organ)
    if not organs:
        raise ValueError("give at least one organ")
    p = float(probability)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    names = [trainer_name(o) for o in organs]
    if len(set(names)) != len(names):
        raise ValueError(f"organs give duplicate trainer names: {names}")
    lines = [_SOURCE_HEAD.format(first=names[0])]
    for o, n in zip(organs, names, strict=True):
        lines.append(
            "    try:\n"
            f"        {n} = make_trainer(\n"
            f"            {json.dumps(_preset_spec(o))},\n"
            f"            probability={p!r},\n"
            f"            name={json.dumps(n)},\n"
            f"            module=__name__,\n"
            f"        )\n"
            "    except Exception as e:  # (a deleted or invalid preset: the others stay usable)\n"
            "        warnings.warn(\n"
            f'            f"synthgen trainer {n} unavailable: {{e}}",\n'
            "            stacklevel=1,\n"
            "        )\n"
        )
    return "".join(lines)
