"""Tumor synthesis as a training-time augmentation on one image and its label map.

:func:`implant_tumors` is the shared core of the framework adapters (``synthgen.torch``,
``synthgen.monai``, ``synthgen.nnunet``, ``synthgen.stream``): given a 3-D image, a 3-D
integer label map and the ids that make up the organ, it plans and renders one sample and
writes the tumor label into a copy of the label map. A patch that holds too little of the
organ for the preset is returned unchanged (``plan is None``) instead of raising: during
training that is a normal event, not an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .api import Synthesizer, without_mass_effect_hint
from .mass_effect import render_plan
from .planning import PlacementError
from .presets import Preset

__all__ = ["Implanted", "affine_for", "implant_tumors", "lesions_of", "organ_mask_of"]


@dataclass
class Implanted:
    """Result of :func:`implant_tumors`.

    Attributes:
        image: The image with tumors, same dtype (a new array unless ``copy=False``).
        label: The label map with ``tumor_label`` on tumor voxels, same dtype (uint8 for a
            boolean mask; a new array unless ``copy=False``).
        plan: The rendered plan, or ``None`` when nothing was implanted.
        reason: Why nothing was implanted (``None`` when ``plan`` is set).
    """

    image: np.ndarray
    label: np.ndarray
    plan: Any
    reason: str | None = None


def organ_mask_of(label: np.ndarray, organ_labels: Sequence[int]) -> np.ndarray:
    """Boolean organ mask: voxels of ``label`` equal to one of ``organ_labels``."""
    ids = [int(i) for i in organ_labels]
    if len(ids) == 1:
        return label == ids[0]
    return np.isin(label, ids)


def lesions_of(label: Any, lesion_labels: int | Sequence[int]) -> Any:
    """The lesions already in a label map: its voxels equal to one of ``lesion_labels`` (the
    tumor label the adapters write), or ``None`` when it has none (a plan without them is the
    plan of a scan without lesions). NumPy arrays and torch tensors (any device) alike."""
    ids = [int(i) for i in np.atleast_1d(lesion_labels)]
    mask = label == ids[0]
    for i in ids[1:]:
        mask |= label == i
    return mask if bool(mask.any()) else None


def check_channels(
    preset: Preset, n_channels: int, where: str = "the image has", warped: str = "label map"
) -> None:
    """Refuse multi-channel images when the preset's mass effect would warp only channel 0.

    The tumors go into channel 0; a mass-effect warp moves channel 0 and the ``warped`` map,
    so other channels (other phases, modalities) would no longer line up with them. The
    message (``where`` N channels) says what to pass instead. Used by every training
    transform (torch, MONAI, nnU-Net).
    """
    if n_channels > 1 and preset.mass_effect.enabled:
        raise ValueError(
            f"{where} {n_channels} channels, but preset {preset.name!r} enables mass effect, "
            f"which warps channel 0 and the {warped} only, so the other channels would no "
            f"longer line up; {without_mass_effect_hint(preset)}"
        )


def affine_for(spacing: Sequence[float], craniocaudal_axis: int = 2) -> np.ndarray:
    """A voxel-to-world affine with ``spacing`` (mm) whose ``craniocaudal_axis`` is world z.

    For arrays that come without an affine (nnU-Net patches, NumPy arrays): the engine reads
    the spacing and the cranio-caudal axis (where tumors are placed by slice) from it.
    """
    sp = [float(s) for s in spacing]
    if len(sp) != 3 or min(sp) <= 0:
        raise ValueError(f"spacing must be 3 positive numbers (mm), got {spacing}")
    if craniocaudal_axis not in (0, 1, 2):
        raise ValueError(f"craniocaudal_axis must be 0, 1 or 2, got {craniocaudal_axis}")
    others = [a for a in range(3) if a != craniocaudal_axis]
    aff = np.zeros((4, 4))
    aff[3, 3] = 1.0
    aff[0, others[0]] = sp[others[0]]
    aff[1, others[1]] = sp[others[1]]
    aff[2, craniocaudal_axis] = sp[craniocaudal_axis]
    return aff


def implant_tumors(
    image: np.ndarray,
    label: np.ndarray,
    *,
    synthesizer: Synthesizer,
    organ_labels: Sequence[int],
    tumor_label: int,
    seed: int,
    affine: np.ndarray,
    min_organ_voxels: int = 64,
    organ_mask: np.ndarray | None = None,
    copy: bool = True,
    organ_index: Any = None,
    lesion_mask: np.ndarray | None = None,
) -> Implanted:
    """Implant one sample of tumors into copies of ``image`` and ``label``.

    Args:
        image: 3-D image in HU (any numeric dtype).
        label: 3-D integer label map on the same grid.
        synthesizer: Preset and settings (``synthgen.Synthesizer``).
        organ_labels: Label ids that together are the organ.
        tumor_label: Id written on tumor voxels.
        seed: Seed of this sample (the same seed gives the same tumors).
        affine: Voxel-to-world affine (spacing and cranio-caudal axis); see
            :func:`affine_for` for arrays without one.
        min_organ_voxels: Below this many organ voxels nothing is implanted.
        organ_mask: The organ mask when the caller has it already (else computed).
        copy: ``False`` renders into ``image`` and ``label`` themselves (for arrays the
            caller owns, such as a freshly loaded case): no full-volume copies.
        organ_index: ``synthgen.index_organ(organ_mask)`` of this scan, kept by a caller that
            returns to the same scan (a loader): planning then reuses what it measured on the
            scan (organ box, organ HU and noise, vessel-like voxels, slice candidates).
        lesion_mask: Lesions already in the image (same grid; e.g. :func:`lesions_of` the
            label map): planning keeps the tumors the preset's ``gap_mm`` away from them, as
            ``synthgen batch`` does with a case's lesion masks.

    Returns:
        An :class:`Implanted`; ``plan`` is ``None`` (and the arrays are unchanged copies)
        when the organ is absent or too small for the preset.
    """
    if image.shape != label.shape or image.ndim != 3:
        raise ValueError(f"image {image.shape} and label {label.shape} must be the same 3-D grid")
    organ = organ_mask_of(label, organ_labels) if organ_mask is None else organ_mask
    out_image = image.copy(order="K") if copy else image
    # A boolean organ mask cannot hold a tumor id: the label becomes uint8 (0/1/tumor).
    if label.dtype == np.bool_:
        out_label = label.astype(np.uint8)
    else:
        out_label = label.copy(order="K") if copy else label
    # the index of this scan already counted the organ (a loader keeps one per case)
    count = organ_index.count if organ_index is not None else int(np.count_nonzero(organ))
    if count < min_organ_voxels:
        return Implanted(out_image, out_label, None, f"organ has {count} voxels")
    try:
        plan = synthesizer.plan(
            out_image,
            organ,
            seed=seed,
            affine=affine,
            organ_index=organ_index,
            lesion_mask=lesion_mask,
        )
    except PlacementError as e:  # too small for the preset's tumors: a normal patch (the
        # caller's errors, a bad affine or NaN in the organ, are raised: not no tumors ever)
        return Implanted(out_image, out_label, None, str(e))
    # The preset's mass effect (if any) warps the image and the whole label map alike first;
    # the render then writes the tumor label into the label map itself.
    res = render_plan(
        plan,
        out_image,
        organ,
        organ_inplace=organ_mask is None,  # a temporary built from the label: warp it as is
        out=out_image,
        device=synthesizer.device,
        affine=affine,
        label_out=out_label,
        tumor_label=tumor_label,
    ).result
    return Implanted(out_image, out_label, res.plan)
