"""synthgen.nnunet: the batchgeneratorsv2 tumor step and the nnU-Net trainer factory.

nnunetv2 itself is not installed here: the trainer tests install a minimal fake
``nnunetv2.training.nnUNetTrainer.nnUNetTrainer`` module tree into ``sys.modules``.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import pickle
import subprocess
import sys
import types
import warnings
from typing import ClassVar

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("batchgeneratorsv2")

from _lesion_scene import (  # noqa: E402
    SIZE,
    lesion_scene,
    plan_with_the_lesion,
    touches,
    touching_without_the_mask,
)
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform  # noqa: E402
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms  # noqa: E402
from batchgeneratorsv2.transforms.utils.random import RandomTransform  # noqa: E402
from scipy import ndimage  # noqa: E402

import synthgen.nnunet as nn_mod  # noqa: E402
from synthgen import load_preset  # noqa: E402
from synthgen.augment import affine_for, implant_tumors  # noqa: E402
from synthgen.nnunet import (  # noqa: E402
    CTIntensity,
    TumorSynthesisTransform,
    make_trainer,
    synthesis_transform,
    trainer_module_source,
    trainer_name,
)
from synthgen.phantom import make_phantom  # noqa: E402
from synthgen.presets import without_extras  # noqa: E402

CT = CTIntensity(mean=60.0, std=40.0, lower=-100.0, upper=240.0)
SPACING_ZYX = (5.0, 4.0, 4.0)
BORDER = 3  # voxels of -1 padding around the patch


def _plans(scheme: str = "CTNormalization", transpose=(0, 1, 2)) -> dict:
    """A plans dictionary shaped like nnU-Net v2's nnUNetPlans.json (MSD liver-like)."""
    common = {
        "preprocessor_name": "DefaultPreprocessor",
        "normalization_schemes": [scheme],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "UNet_class_name": "PlainConvUNet",
        "batch_dice": False,
    }
    return {
        "dataset_name": "Dataset003_Liver",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0, 0.767578125, 0.767578125],
        "original_median_shape_after_transp": [432, 512, 512],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": list(transpose),
        "transpose_backward": list(np.argsort(transpose)),
        "configurations": {
            "2d": {
                **common,
                "data_identifier": "nnUNetPlans_2d",
                "batch_size": 12,
                "patch_size": [512, 512],
                "median_image_size_in_voxels": [512.0, 512.0],
                "spacing": [0.767578125, 0.767578125],
            },
            "3d_lowres": {
                **common,
                "data_identifier": "nnUNetPlans_3d_lowres",
                "batch_size": 2,
                "patch_size": [128, 128, 128],
                "median_image_size_in_voxels": [195, 223, 223],
                "spacing": [2.2, 1.76, 1.76],
                "next_stage": "3d_cascade_fullres",
            },
            "3d_fullres": {
                **common,
                "data_identifier": "nnUNetPlans_3d_fullres",
                "batch_size": 2,
                "patch_size": [128, 128, 128],
                "median_image_size_in_voxels": [432.0, 512.0, 512.0],
                "spacing": [1.0, 0.767578125, 0.767578125],
            },
            "3d_cascade_fullres": {
                "inherits_from": "3d_fullres",
                "previous_stage": "3d_lowres",
            },
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": 3071.0,
                "mean": 99.4,
                "median": 101.0,
                "min": -1024.0,
                "percentile_00_5": -17.0,
                "percentile_99_5": 201.0,
                "std": 37.5,
            }
        },
    }


DATASET_JSON = {
    "channel_names": {"0": "CT"},
    "labels": {"background": 0, "liver": 1, "liver_lesion": 2},
    "numTraining": 131,
    "file_ending": ".nii.gz",
}


@pytest.fixture(scope="module")
def patch_hu() -> tuple[np.ndarray, np.ndarray]:
    """(z, y, x) HU image (float32) and label map (int16: liver 1, -1 border) like nnU-Net's."""
    ph = make_phantom((96, 80, 64), (4.0, 4.0, 5.0), seed=0)
    # SimpleITK order: array axis 0 is z (cranio-caudal), spacing reversed.
    img = np.ascontiguousarray(ph.image.transpose(2, 1, 0)).astype(np.float32)
    lab = (np.ascontiguousarray(ph.labels.transpose(2, 1, 0)) == 1).astype(np.int16)
    border = np.ones(lab.shape, bool)
    border[BORDER:-BORDER, BORDER:-BORDER, BORDER:-BORDER] = False
    lab[border] = -1
    img.flags.writeable = False
    lab.flags.writeable = False
    return img, lab


def _data(img: np.ndarray, lab: np.ndarray) -> dict:
    return {
        "image": torch.from_numpy(np.array(img, dtype=np.float32))[None],
        "segmentation": torch.from_numpy(np.array(lab, dtype=np.int16))[None],
    }


def _liver_transform(**kw) -> TumorSynthesisTransform:
    # The liver preset without its realism extras (mass effect, appearance modes): these
    # tests check the plain recipe's invariants (only tumor voxels relabelled, changes within
    # the blur, one contrast sign); the extras have their own tests.
    return TumorSynthesisTransform(without_extras("liver"), [1], 2, SPACING_ZYX, **kw)


# --------------------------------------------------------------------------------------
# 1. CTIntensity
# --------------------------------------------------------------------------------------


def test_ct_intensity_round_trip_and_clipping():
    hu = np.array([-1000.0, -100.0, 0.0, 60.0, 100.0, 240.0, 3000.0], dtype=np.float32)
    x = CT.from_hu(hu)
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, [-4.0, -4.0, -1.5, 0.0, 1.0, 4.5, 4.5], rtol=1e-6)
    assert CT.window == (-4.0, 4.5)
    # Inside the window the round trip is exact (to float32 rounding); outside it clips.
    np.testing.assert_allclose(CT.to_hu(x), [-100, -100, 0, 60, 100, 240, 240], atol=1e-4)
    inside = np.linspace(-100, 240, 101)
    np.testing.assert_allclose(CT.to_hu(CT.from_hu(inside)), inside, atol=1e-9)
    assert CT.from_hu(500.0) == pytest.approx(4.5)
    t = CT.from_hu(torch.tensor([-500.0, 100.0]))
    assert isinstance(t, torch.Tensor)
    assert t.tolist() == pytest.approx([-4.0, 1.0])
    # nnU-Net divides by max(std, 1e-8): a zero std does not divide by zero.
    flat = CTIntensity(10.0, 0.0, 0.0, 20.0)
    assert np.isfinite(flat.from_hu(15.0))
    assert flat.to_hu(flat.from_hu(15.0)) == pytest.approx(15.0)
    with pytest.raises(ValueError, match="lower"):
        CTIntensity(0.0, 1.0, 10.0, -10.0)
    with pytest.raises(ValueError, match="std"):
        CTIntensity(0.0, -1.0, -10.0, 10.0)


def test_ct_intensity_from_plans():
    ct = CTIntensity.from_plans(_plans())
    assert ct == CTIntensity(mean=99.4, std=37.5, lower=-17.0, upper=201.0)
    plans = _plans()
    props = plans["foreground_intensity_properties_per_channel"]
    props[1] = props.pop("0")  # integer keys (a PlansManager built in Python) work too
    assert CTIntensity.from_plans(plans, channel=1) == ct
    with pytest.raises(ValueError, match="channel 0"):
        CTIntensity.from_plans(plans, channel=0)
    del props[1]["std"]
    with pytest.raises(ValueError, match="std"):
        CTIntensity.from_plans(plans, channel=1)
    with pytest.raises(ValueError, match="foreground_intensity_properties_per_channel"):
        CTIntensity.from_plans({})


# --------------------------------------------------------------------------------------
# 2. The transform on an nnU-Net-shaped patch
# --------------------------------------------------------------------------------------


def test_transform_on_normalised_patch(patch_hu):
    img, lab = patch_hu
    norm = CT.from_hu(img)
    data = _data(norm, lab)
    image_in, seg_in = data["image"].clone(), data["segmentation"].clone()
    t = _liver_transform(intensity=CT)
    torch.manual_seed(0)
    out = t(**data)
    image, seg = out["image"], out["segmentation"]
    # The caller's tensors are not modified; dtype, device and shape are kept.
    assert torch.equal(data["image"], image_in) and torch.equal(data["segmentation"], seg_in)
    assert image.dtype == torch.float32 and seg.dtype == torch.int16
    assert image.device == image_in.device and seg.device == seg_in.device
    assert image.shape == image_in.shape and seg.shape == seg_in.shape

    new_img, new_lab = image[0].numpy(), seg[0].numpy()
    tumor = new_lab == 2
    assert tumor.sum() > 50
    assert np.all(lab[tumor] == 1), "tumor voxels must lie in the liver"
    assert np.array_equal(new_lab[~tumor], lab[~tumor]), "only tumor voxels are relabelled"
    assert np.array_equal(new_lab == -1, lab == -1), "the -1 padding is untouched"

    # The image changes in the tumor and its blurred edge only, inside the liver.
    changed = new_img != norm
    assert changed[tumor].all()
    assert np.all(lab[changed] == 1)
    sigma = load_preset("liver").blend.sigma_mm[1]
    dist = ndimage.distance_transform_edt(~tumor, sampling=SPACING_ZYX)
    assert dist[changed].max() <= 5 * sigma + max(SPACING_ZYX)

    # Values stay inside the normalised clip window.
    lo, hi = CT.window
    assert new_img.min() >= lo - 1e-5 and new_img.max() <= hi + 1e-5

    # Contrast in HU is the preset's: D = f * organ HU (clamped to delta_hu), one sign per
    # sample; a voxel is darkened by at most D and never below min_hu (nor the clip window).
    c = load_preset("liver").contrast
    organ_hu = float(np.median(img[lab == 1]))
    d_max = min(c.fraction[1] * organ_hu, c.delta_hu[1])
    d_min = max(c.fraction[0] * organ_hu, c.delta_hu[0])
    hu_out = CT.to_hu(new_img)
    drop = (np.clip(img, CT.lower, CT.upper) - hu_out)[tumor]
    sign = np.sign(drop.mean())
    drop = drop * sign
    assert drop.min() >= -1e-3
    assert drop.max() <= d_max + 1e-3
    assert d_min * 0.1 <= drop.mean() <= d_max
    if sign > 0:
        assert hu_out[tumor].min() >= min(c.min_hu, img[tumor].min()) - 1e-3

    # Channels beyond 0 are untouched.
    two = {
        "image": torch.stack([image_in[0], -image_in[0]]),
        "segmentation": torch.cat([seg_in, seg_in]),
    }
    torch.manual_seed(0)
    out2 = t(**two)
    assert torch.equal(out2["image"][0], image[0])
    assert torch.equal(out2["image"][1], -image_in[0])
    assert torch.equal(out2["segmentation"][1], seg_in[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_transform_half_precision_patch_renders_through_float32(patch_hu, dtype):
    """A bfloat16 / float16 patch (AMP) gives the float32 patch's result, cast back."""
    img, lab = patch_hu
    half = _data(CT.from_hu(img), lab)
    half["image"] = half["image"].to(dtype)
    full = {"image": half["image"].float(), "segmentation": half["segmentation"].clone()}
    t = _liver_transform(intensity=CT)
    torch.manual_seed(3)
    ref = t(**full)
    torch.manual_seed(3)
    out = t(**half)
    assert out["image"].dtype == dtype
    assert (out["segmentation"][0] == 2).any()
    assert torch.equal(out["image"], ref["image"].to(dtype))
    assert torch.equal(out["segmentation"], ref["segmentation"])


def test_several_channels_with_mass_effect_fail_at_construction(patch_hu):
    """dataset.json names two channels: a preset with mass effect (it would warp channel 0
    only) is refused when the transform is built, saying what to pass instead; a preset
    without it implants into channel 0 and leaves channel 1 bit-identical."""
    two = {**DATASET_JSON, "channel_names": {"0": "CT", "1": "PET"}}
    with pytest.raises(ValueError, match=r"channel_names lists 2 channels.*'liver' enables "
                       r"mass effect.*without_extras\('liver'.*'liver-classic'"):  # fmt: skip
        synthesis_transform(_plans(), two, "3d_fullres", "liver")
    assert synthesis_transform(_plans(), DATASET_JSON, "3d_fullres", "liver")  # one channel
    plain = without_extras("liver", keep=("vessels", "appearance"))
    assert synthesis_transform(_plans(), two, "3d_fullres", plain).transform.organ == plain.name
    t = TumorSynthesisTransform(plain, [1], 2, SPACING_ZYX)  # (the patch's spacing, HU)
    img, lab = patch_hu
    data = _data(img, lab)
    pet = torch.rand(data["image"].shape[1:])
    data["image"] = torch.cat([data["image"], pet[None]])
    torch.manual_seed(0)
    out = t(**data)
    assert (out["segmentation"][0] == 2).any()
    assert not torch.equal(out["image"][0], data["image"][0])
    assert torch.equal(out["image"][1], pet)
    # built by hand (no channel names), the patch is refused, with the same advice
    with pytest.raises(ValueError, match=r"image has 2 channels.*without_extras\('liver'"):
        TumorSynthesisTransform("liver", [1], 2, SPACING_ZYX)(**data)
    # a cascade's segmentation of two channels (the previous stage's): the same
    data = _data(img, lab)
    data["segmentation"] = torch.cat([data["segmentation"], data["segmentation"]])
    with pytest.raises(ValueError, match=r"segmentation has 2 channels.*without_extras"):
        TumorSynthesisTransform("liver", [1], 2, SPACING_ZYX)(**data)
    out = t(**data)  # without mass effect: channel 1 left as it was
    assert (out["segmentation"][0] == 2).any() and not (out["segmentation"][1] == 2).any()


def test_transform_reclips_to_the_window(patch_hu):
    # A window whose lower clip (70 HU) lies above the darkest tumors: nnU-Net would have
    # clipped those HU, so the written values are clipped again.
    img, lab = patch_hu
    ct = CTIntensity(mean=100.0, std=30.0, lower=70.0, upper=240.0)
    norm = ct.from_hu(img)
    torch.manual_seed(0)
    out = _liver_transform(intensity=ct)(**_data(norm, lab))
    new_img = out["image"][0].numpy()
    tumor = out["segmentation"][0].numpy() == 2
    lo, hi = ct.window
    assert new_img.min() >= lo - 1e-6 and new_img.max() <= hi + 1e-6
    at_floor = np.isclose(new_img[tumor], lo, atol=1e-6)
    assert at_floor.sum() > 10, "darker tumor voxels are clipped to the window"


def test_transform_reproducible_with_torch_seed(patch_hu):
    img, lab = patch_hu
    norm = CT.from_hu(img)
    t = _liver_transform(intensity=CT)
    runs = []
    for s in (5, 5, 6):
        torch.manual_seed(s)
        runs.append(t(**_data(norm, lab)))
    assert torch.equal(runs[0]["image"], runs[1]["image"])
    assert torch.equal(runs[0]["segmentation"], runs[1]["segmentation"])
    assert not torch.equal(runs[0]["segmentation"], runs[2]["segmentation"])


def test_transform_hu_patch_equals_implant_tumors(patch_hu):
    img, lab = patch_hu
    t = _liver_transform(intensity=None)
    data = _data(img, lab)
    torch.manual_seed(11)
    seed = t.get_parameters(**data)["seed"]
    torch.manual_seed(11)
    out = t(**data)
    ref = implant_tumors(
        np.array(img),
        np.array(lab),
        synthesizer=t.synthesizer,
        organ_labels=[1],
        tumor_label=2,
        seed=seed,
        affine=affine_for(SPACING_ZYX, 0),
    )
    assert ref.plan is not None
    np.testing.assert_array_equal(out["image"][0].numpy(), ref.image)
    np.testing.assert_array_equal(out["segmentation"][0].numpy(), ref.label)


def test_transform_without_organ_returns_data_unchanged(patch_hu):
    img, lab = patch_hu
    t = _liver_transform(intensity=CT)
    data = _data(CT.from_hu(img), np.where(lab == 1, 0, lab))
    image, seg = data["image"], data["segmentation"]
    out = t(**data)
    assert out["image"] is image and out["segmentation"] is seg
    # A sliver of organ below min_organ_voxels: unchanged too.
    sliver = np.zeros(lab.shape, np.int16)
    sliver[30, 40, 40:45] = 1
    data = _data(CT.from_hu(img), sliver)
    assert t(**data)["segmentation"] is data["segmentation"]


def test_transform_rejects_bad_input():
    t = _liver_transform(intensity=CT)
    with pytest.raises(ValueError, match="3-D patches"):
        t(image=torch.zeros(1, 8, 8), segmentation=torch.zeros(1, 8, 8, dtype=torch.int16))
    with pytest.raises(ValueError, match="segmentation"):
        t(image=torch.zeros(1, 8, 8, 8))
    with pytest.raises(ValueError, match="organ_labels"):
        TumorSynthesisTransform("liver", [], 2, SPACING_ZYX)
    with pytest.raises(ValueError, match="tumor_label"):
        TumorSynthesisTransform("liver", [1, 2], 2, SPACING_ZYX)
    with pytest.raises(ValueError, match="spacing"):
        TumorSynthesisTransform("liver", [1], 2, (1.0, 1.0))
    with pytest.raises(ValueError, match="craniocaudal_axis"):
        TumorSynthesisTransform("liver", [1], 2, SPACING_ZYX, craniocaudal_axis=3)
    with pytest.raises(ValueError, match="unknown organ or preset"):
        TumorSynthesisTransform("lung", [1], 2, SPACING_ZYX)


def test_transform_pickles(patch_hu):
    # Spawn / forkserver workers receive the pipeline pickled.
    img, lab = patch_hu
    t = RandomTransform(_liver_transform(intensity=CT), apply_probability=1.0)
    t2 = pickle.loads(pickle.dumps(t))
    assert "TumorSynthesisTransform(organ='liver-plain'" in repr(t2)
    norm = CT.from_hu(img)
    torch.manual_seed(3)
    a = t(**_data(norm, lab))
    torch.manual_seed(3)
    b = t2(**_data(norm, lab))
    assert torch.equal(a["image"], b["image"])


def _child_seed(q, np_seed):
    # What batchgenerators' producer does: it reseeds NumPy's global RNG, not torch's.
    np.random.seed(np_seed)  # noqa: NPY002
    q.put(_FORK_T.get_parameters()["seed"])


_FORK_T: TumorSynthesisTransform | None = None


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method"
)
def test_forked_workers_draw_different_seeds():
    global _FORK_T
    _FORK_T = _liver_transform(intensity=CT)
    ctx = multiprocessing.get_context("fork")
    torch.manual_seed(0)
    q = ctx.Queue()
    seeds = []
    for np_seed in (None, None, 7, 7):
        p = ctx.Process(target=_child_seed, args=(q, np_seed))
        p.start()
        seeds.append(q.get(timeout=30))
        p.join(timeout=30)
    own = _FORK_T.get_parameters()["seed"]  # the same torch state, in the owner process
    assert len({own, seeds[0], seeds[1], seeds[2]}) == 4
    assert seeds[2] == seeds[3], "workers seeded alike (numpy) draw alike"
    assert all(0 <= s < 2**62 for s in seeds)


# --------------------------------------------------------------------------------------
# 3. synthesis_transform from plans and dataset.json
# --------------------------------------------------------------------------------------


def test_synthesis_transform_from_plans():
    rt = synthesis_transform(_plans(), DATASET_JSON, "3d_fullres", "liver", probability=0.3)
    assert isinstance(rt, RandomTransform)
    assert rt.apply_probability == 0.3
    t = rt.transform
    assert isinstance(t, TumorSynthesisTransform)
    assert t.spacing == (1.0, 0.767578125, 0.767578125)
    assert t.organ_labels == (1,) and t.tumor_label == 2
    assert t.intensity == CTIntensity(99.4, 37.5, -17.0, 201.0)
    assert t.craniocaudal_axis == 0 and t.organ == "liver"
    # A configuration that inherits, a lowres one, a transposed dataset.
    casc = synthesis_transform(_plans(), DATASET_JSON, "3d_cascade_fullres", "liver-classic")
    assert casc.transform.spacing == (1.0, 0.767578125, 0.767578125)
    # a cascade's patches carry the previous stage's segmentation as a second channel, which
    # a mass effect would not warp (4-6k voxels disagreed on the organ): refused, with advice
    with pytest.raises(ValueError, match=r"is a cascade.*mass effect.*without_extras"):
        synthesis_transform(_plans(), DATASET_JSON, "3d_cascade_fullres", "liver")
    low = synthesis_transform(_plans(), DATASET_JSON, "3d_lowres", "liver").transform
    assert low.spacing == (2.2, 1.76, 1.76)
    tr = synthesis_transform(_plans(transpose=(2, 0, 1)), DATASET_JSON, "3d_fullres", "liver")
    assert tr.transform.craniocaudal_axis == 1
    # NoNormalization: the patches are HU already.
    raw = synthesis_transform(_plans("NoNormalization"), DATASET_JSON, "3d_fullres", "liver")
    assert raw.transform.intensity is None
    # Explicit ids, a preset name, a forced size class.
    ex = synthesis_transform(
        _plans(),
        {"labels": {"background": 0, "organ": 5}},
        "3d_fullres",
        "liver-classic",
        organ_labels=[5],
        tumor_label=9,
        size="small",
    ).transform
    assert (ex.organ_labels, ex.tumor_label, ex.organ, ex.size) == (
        (5,),
        9,
        "liver-classic",
        "small",
    )


@pytest.mark.parametrize(
    ("organ", "labels", "organ_ids", "tumor_id"),
    [
        ("liver", {"background": 0, "liver": 1, "cancer": 2}, (1,), 2),  # MSD Task03 style
        ("liver", {"background": 0, "liver": [1, 2], "liver_lesion": 2}, (1,), 2),  # regions
        ("liver", {"background": 0, "Liver": 1, "Liver Tumor": 2}, (1,), 2),
        (
            "kidney",
            {"background": 0, "kidney_left": 1, "kidney_right": 2, "kidney_tumor": 3},
            (1, 2),
            3,
        ),
        (
            "pancreas",
            {"background": 0, "liver": 1, "liver_tumor": 2, "pancreas": 3, "pancreatic_lesion": 4},
            (3,),
            4,
        ),
        (
            "liver",
            {"background": 0, "liver": 1, "liver_tumor": 2, "pancreas": 3, "pancreatic_lesion": 4},
            (1,),
            2,
        ),
    ],
)
def test_synthesis_transform_label_lookup(organ, labels, organ_ids, tumor_id):
    t = synthesis_transform(_plans(), {"labels": labels}, "3d_fullres", organ).transform
    assert t.organ_labels == organ_ids and t.tumor_label == tumor_id


def test_synthesis_transform_errors():
    plans = _plans()
    with pytest.raises(ValueError, match=r"no tumor label for liver.*tumor_label="):
        synthesis_transform(plans, {"labels": {"background": 0, "liver": 1}}, "3d_fullres", "liver")
    with pytest.raises(ValueError, match=r"no label for organ 'liver'.*organ_labels="):
        synthesis_transform(
            plans, {"labels": {"background": 0, "liver_lesion": 2}}, "3d_fullres", "liver"
        )
    with pytest.raises(ValueError, match="several tumor labels"):
        synthesis_transform(
            plans,
            {"labels": {"background": 0, "liver": 1, "tumor": 2, "cancer": 3}},
            "3d_fullres",
            "liver",
        )
    with pytest.raises(ValueError, match=r"ZScoreNormalization.*CTNormalization"):
        synthesis_transform(_plans("ZScoreNormalization"), DATASET_JSON, "3d_fullres", "liver")
    with pytest.raises(ValueError, match=r"2-D.*3-D configuration"):
        synthesis_transform(plans, DATASET_JSON, "2d", "liver")
    with pytest.raises(ValueError, match=r"no configuration '3d_highres'.*3d_fullres"):
        synthesis_transform(plans, DATASET_JSON, "3d_highres", "liver")
    with pytest.raises(ValueError, match="probability"):
        synthesis_transform(plans, DATASET_JSON, "3d_fullres", "liver", probability=1.5)
    with pytest.raises(ValueError, match="labels"):
        synthesis_transform(plans, {}, "3d_fullres", "liver")
    broken = copy.deepcopy(plans)
    del broken["foreground_intensity_properties_per_channel"]
    with pytest.raises(ValueError, match="foreground_intensity_properties_per_channel"):
        synthesis_transform(broken, DATASET_JSON, "3d_fullres", "liver")


# --------------------------------------------------------------------------------------
# 4. The trainer, against a FAKE nnunetv2
# --------------------------------------------------------------------------------------


class _Marker(BasicTransform):
    """Stands for nnU-Net's SpatialTransform and the rest of its pipeline."""

    def apply(self, data_dict, **params):
        data_dict["marker_saw_tumor"] = bool((data_dict["segmentation"] == 2).any())
        return data_dict


class _FakeTrainer:
    """The parts of nnunetv2's nnUNetTrainer that the synthgen trainer uses."""

    calls: ClassVar[list] = []

    def __init__(self, plans, configuration, fold, dataset_json, device=None):
        self.plans_manager = types.SimpleNamespace(plans=plans)
        self.configuration_manager = types.SimpleNamespace(
            **nn_mod._configuration(plans, configuration)
        )
        self.configuration_name = configuration
        self.dataset_json = dataset_json
        self.log: list[str] = []

    def print_to_log_file(self, *args, **kwargs):
        self.log.append(" ".join(map(str, args)))

    @staticmethod
    def get_training_transforms(
        patch_size,
        rotation_for_DA,
        deep_supervision_scales,
        mirror_axes,
        do_dummy_2d_data_aug,
        use_mask_for_norm=None,
        is_cascaded=False,
        foreground_labels=None,
        regions=None,
        ignore_label=None,
    ):
        _FakeTrainer.calls.append((patch_size, mirror_axes, foreground_labels))
        return ComposeTransforms([_Marker()])


@pytest.fixture
def fake_nnunetv2(monkeypatch):
    names = [
        "nnunetv2",
        "nnunetv2.training",
        "nnunetv2.training.nnUNetTrainer",
        "nnunetv2.training.nnUNetTrainer.nnUNetTrainer",
    ]
    mods = {n: types.ModuleType(n) for n in names}
    mods[names[-1]].nnUNetTrainer = _FakeTrainer
    for n, m in mods.items():
        monkeypatch.setitem(sys.modules, n, m)
    _FakeTrainer.calls.clear()
    monkeypatch.setenv("SYNTHGEN_NUM_THREADS", "3")
    return _FakeTrainer


def _get_tr(trainer):
    return trainer.get_training_transforms(
        (128, 128, 128),
        (0.5, 0.5, 0.5),
        None,
        (0, 1, 2),
        False,
        use_mask_for_norm=[False],
        is_cascaded=False,
        foreground_labels=[1, 2],
        regions=None,
        ignore_label=None,
    )


def test_make_trainer_inserts_synthesis_first(fake_nnunetv2, monkeypatch, patch_hu):
    cls = make_trainer("liver", probability=0.25)
    assert cls.__name__ == "nnUNetTrainerSynthgenLiver"
    assert issubclass(cls, fake_nnunetv2)
    trainer = cls(_plans(), "3d_fullres", 0, DATASET_JSON)
    tr = _get_tr(trainer)
    assert isinstance(tr, ComposeTransforms) and len(tr.transforms) == 2
    first, rest = tr.transforms
    assert isinstance(first, RandomTransform) and first.apply_probability == 0.25
    assert isinstance(first.transform, TumorSynthesisTransform)
    assert first.transform.spacing == (1.0, 0.767578125, 0.767578125)
    assert (first.transform.organ_labels, first.transform.tumor_label) == ((1,), 2)
    assert isinstance(rest, _Marker)
    assert fake_nnunetv2.calls == [((128, 128, 128), (0, 1, 2), [1, 2])]
    assert any("TumorSynthesisTransform" in line for line in trainer.log)
    assert os.environ["SYNTHGEN_NUM_THREADS"] == "3"  # an explicit setting is kept
    monkeypatch.delenv("SYNTHGEN_NUM_THREADS")
    _get_tr(trainer)
    assert os.environ["SYNTHGEN_NUM_THREADS"] == "1"

    # The pipeline runs on a patch: tumors first, then the rest sees them.
    img, lab = patch_hu
    plans = _plans()
    plans["configurations"]["3d_fullres"]["spacing"] = list(SPACING_ZYX)
    plans["foreground_intensity_properties_per_channel"]["0"].update(
        mean=CT.mean, std=CT.std, percentile_00_5=CT.lower, percentile_99_5=CT.upper
    )
    always = make_trainer("liver", probability=1.0, name="nnUNetTrainerAlways")
    tr = _get_tr(always(plans, "3d_fullres", 0, DATASET_JSON))
    torch.manual_seed(0)
    out = tr(**_data(CT.from_hu(img), lab))
    assert out["marker_saw_tumor"]


def test_make_trainer_options(fake_nnunetv2):
    class Custom(fake_nnunetv2):  # a variant whose transforms are an instance method
        def get_training_transforms(self, *args, **kwargs):
            return _Marker()

    cls = make_trainer("liver-classic", name="MyTrainer", base=Custom, module="my.module")
    assert cls.__name__ == "MyTrainer" and cls.__module__ == "my.module"
    assert issubclass(cls, Custom) and cls.synthgen_organ == "liver-classic"
    tr = _get_tr(cls(_plans(), "3d_fullres", 0, DATASET_JSON))
    assert isinstance(tr, ComposeTransforms)
    assert isinstance(tr.transforms[0], RandomTransform) and isinstance(tr.transforms[1], _Marker)
    assert trainer_name("liver-classic") == "nnUNetTrainerSynthgenLiverClassic"
    with pytest.raises(ValueError, match="probability"):
        make_trainer("liver", probability=-0.1)
    with pytest.raises(ValueError, match="identifier"):
        make_trainer("liver", name="not a name")


def test_trainer_module_source(fake_nnunetv2, monkeypatch):
    src = trainer_module_source("liver")
    code = compile(src, "synthgen_trainers.py", "exec")
    ns: dict = {"__name__": "nnunetv2.training.nnUNetTrainer.variants.synthgen_trainers"}
    exec(code, ns)
    cls = ns["nnUNetTrainerSynthgenLiver"]
    assert cls.__name__ == "nnUNetTrainerSynthgenLiver"
    assert cls.__module__ == ns["__name__"]
    assert issubclass(cls, fake_nnunetv2) and cls.synthgen_probability == 0.5

    many = trainer_module_source(["liver", "kidney", "pancreas"], probability=0.8)
    ns = {"__name__": "x"}
    exec(compile(many, "x", "exec"), ns)
    for name in ("Liver", "Kidney", "Pancreas"):
        assert ns[f"nnUNetTrainerSynthgen{name}"].synthgen_probability == 0.8
    assert all(len(line) <= 100 for line in many.splitlines())

    # Without synthgen the module warns and defines nothing (nnU-Net's lookup survives).
    monkeypatch.setitem(sys.modules, "synthgen.nnunet", None)
    ns = {"__name__": "y"}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        exec(code, ns)
    assert "nnUNetTrainerSynthgenLiver" not in ns
    assert any("synthgen trainers unavailable" in str(x.message) for x in w)

    with pytest.raises(ValueError, match="unknown organ or preset"):
        trainer_module_source("lung")
    with pytest.raises(ValueError, match="probability"):
        trainer_module_source("liver", probability=2)


def test_import_is_lazy():
    code = (
        "import sys, synthgen\n"
        "assert 'synthgen.nnunet' not in sys.modules\n"
        "assert 'batchgeneratorsv2' not in sys.modules\n"
        "import synthgen.nnunet\n"
        "assert 'nnunetv2' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_transform_keeps_tumors_off_existing_lesions():
    """The patch's voxels already labelled with the tumor id (the dataset's own lesions, MSD's
    "cancer") go to planning as ``lesion_mask``: with a lesion filling most of the organ, no
    synthetic tumor touches it (before: they were planned against it)."""
    sc = lesion_scene()
    t = TumorSynthesisTransform("liver", [1], 2, (1.0, 1.0, 1.0), craniocaudal_axis=2, size=SIZE)
    data = {
        "image": torch.from_numpy(sc["image"])[None],
        "segmentation": torch.from_numpy(sc["label"].astype(np.int16))[None],
    }
    seeds = list(range(100, 106))
    for seed in seeds:
        out = t.apply(dict(data), seed=seed)
        seg = out["segmentation"][0].numpy()
        assert (seg[sc["lesion"]] == 2).all()
        assert not touches(sc, (seg == 2) & ~sc["lesion"]), f"seed {seed}"
        ref = implant_tumors(
            sc["image"],
            sc["label"],
            synthesizer=t.synthesizer,
            organ_labels=[1],
            tumor_label=2,
            seed=seed,
            affine=sc["affine"],
            lesion_mask=sc["lesion"],
        )
        assert ref.plan.to_json() == plan_with_the_lesion(sc, seed)
        np.testing.assert_array_equal(out["image"][0].numpy(), ref.image)
    assert touching_without_the_mask(sc, seeds) >= 1


def test_trainer_module_source_preset_file_from_another_folder(
    fake_nnunetv2, tmp_path, monkeypatch
):
    # nnU-Net imports the written module from whatever folder nnUNetv2_train runs in: a
    # preset file given by a relative path must still be found there.
    from synthgen.presets import preset_path

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    text = preset_path("liver-classic").read_text(encoding="utf-8")
    (work / "my-liver.toml").write_text(text.replace('name = "liver-classic"', 'name = "my-liver"'))
    src = trainer_module_source("my-liver.toml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ns: dict = {"__name__": "nnunetv2.training.nnUNetTrainer.variants.synthgen_trainers"}
    exec(compile(src, "synthgen_trainers.py", "exec"), ns)
    (cls,) = [v for k, v in ns.items() if k.startswith("nnUNetTrainerSynthgen")]
    assert issubclass(cls, fake_nnunetv2)
    # the preset file deleted since: the module still imports (nnU-Net imports it to look up
    # any trainer, its own too), warns, and defines the trainers it can
    src = trainer_module_source([work / "my-liver.toml", "kidney"])
    (work / "my-liver.toml").unlink()
    ns = {"__name__": "nnunetv2.training.nnUNetTrainer.variants.synthgen_trainers"}
    with pytest.warns(UserWarning, match="unavailable: preset file .*my-liver.toml"):
        exec(compile(src, "synthgen_trainers.py", "exec"), ns)
    assert [k for k in ns if k.startswith("nnUNetTrainerSynthgen")] == [
        "nnUNetTrainerSynthgenKidney"
    ]
