"""A scan whose existing lesion fills most of the organ, for the adapters' lesion tests.

The organ is a 56 x 56 x 40 mm box at 1 mm; an existing lesion (label 2, as MSD's "cancer")
fills the part of it with ``x < 40``, 64 % of the box, and the organ label (1) is the rest.
Tiny liver tumors (``size="tiny"``: 1-4 of 2.5-5 mm radius, room for all of them in the
organ label's 20 mm slab) planned without the lesion mask touch the lesion in about a third
of the samples; with it, planning keeps each ``gap_mm`` (2 mm) away and none touches it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from synthgen.augment import affine_for

SPACING = (1.0, 1.0, 1.0)
SHAPE = (64, 64, 48)
SIZE = "tiny"
TOUCH_MM = float(np.sqrt(3.0)) + 1e-6  # a 26-neighbour of a lesion voxel


def lesion_scene() -> dict:
    """``image`` (float32 HU), ``label`` (uint8: 1 organ, 2 lesion), ``lesion`` (bool),
    ``affine``, ``dist`` (mm from each voxel to the lesion)."""
    rng = np.random.default_rng(0)
    box = np.zeros(SHAPE, bool)
    box[4:60, 4:60, 4:44] = True
    lesion = box.copy()
    lesion[40:] = False
    label = box.astype(np.uint8)
    label[lesion] = 2
    image = np.where(box, 100.0, -80.0) + rng.normal(0.0, 8.0, SHAPE)
    image[lesion] = 40.0 + rng.normal(0.0, 8.0, int(lesion.sum()))
    return {
        "image": image.astype(np.float32),
        "label": label,
        "lesion": lesion,
        "affine": affine_for(SPACING),
        "dist": ndimage.distance_transform_edt(~lesion, sampling=SPACING),
    }


def touches(scene: dict, tumor: np.ndarray) -> bool:
    """Whether a synthetic tumor mask comes within a voxel of the scene's lesion (or into
    it)."""
    tumor = np.asarray(tumor, bool)
    assert tumor.any(), "no synthetic tumor to measure"
    return bool((scene["dist"][tumor] <= TOUCH_MM).any())


def touching_without_the_mask(scene: dict, seeds: list[int]) -> int:
    """How many of ``seeds`` give tumors that touch the lesion when planned without it (the
    control: the scene does put tumors against the lesion unless planning sees it)."""
    import synthgen

    organ = scene["label"] == 1
    n = 0
    for seed in seeds:
        res = synthgen.synthesize(
            scene["image"], organ, organ="liver", size=SIZE, seed=seed, affine=scene["affine"]
        )
        n += touches(scene, res.tumor_mask)
    return n


def plan_with_the_lesion(scene: dict, seed: int) -> str:
    """The plan's JSON planned with the lesion as ``lesion_mask`` (what the adapters do)."""
    import synthgen

    return synthgen.plan(
        scene["image"],
        scene["label"] == 1,
        organ="liver",
        size=SIZE,
        seed=seed,
        affine=scene["affine"],
        lesion_mask=scene["lesion"],
    ).to_json()
