"""Mass effect as part of the product: presets switch it on, ``synthesize``/``render`` apply it,
plans replay it, and ``synthgen batch`` warps every written label map with the image.

Alignment is checked with encodings of voxel indices: coordinate ramps as the image (which
trilinear interpolation reproduces exactly, so the warped image holds the source coordinates)
and a label map of unique voxel ids (whose warp names each voxel's source voxel).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _datasets import write_dataset
from _grids import ramps
from typer.testing import CliRunner

import synthgen
from synthgen import mass_effect as me
from synthgen.cli import app
from synthgen.presets import load_preset
from synthgen.rendering import render as plain_render

SPACING = (1.5, 1.5, 1.5)


@pytest.fixture(scope="module")
def scan(ellipsoid_scan):
    return ellipsoid_scan(SPACING)


def _sample(scan, preset="liver", seed=11, size="large"):
    image, organ = scan
    return synthgen.synthesize(image, organ, organ=preset, spacing=SPACING, seed=seed, size=size)


def _outside_tumor_boxes(res) -> np.ndarray:
    keep = np.ones(res.plan.shape, bool)
    for sl, _m in res.boxes:
        keep[sl] = False
    return keep


def test_presets_switch_mass_effect():
    on = {n: load_preset(n).mass_effect for n in ("liver", "pancreas", "kidney", "uterus")}
    assert all(m.enabled and 0 < m.strength <= me.MAX_STRENGTH for m in on.values())
    for name in ("liver-classic", "colon", "esophagus"):  # published recipe, hollow organs
        assert not load_preset(name).mass_effect.enabled, name
    # the settings travel in the plan's preset (file schema), so a plan replays the warp
    d = load_preset("liver").to_dict()
    assert d["mass_effect"] == {
        "enabled": True,
        "strength": 0.25,
        "min_radius_mm": 20.0,
        "ramp_mm": 5.0,
        "reach": 1.35,
    }
    with pytest.raises(ValueError, match=r"mass_effect\.strength"):
        synthgen.presets.preset_from_dict({**d, "mass_effect": {"strength": 0.9}})
    with pytest.raises(ValueError, match=r"mass_effect"):
        synthgen.presets.preset_from_dict({**d, "mass_effect": {"push": 1}})


def test_synthesize_warps_image_and_organ_from_the_same_source_voxels(scan):
    image, organ = scan
    res = _sample(scan)
    fields = me.plan_fields(res.plan)
    assert fields, "the large class must push tissue"
    assert res.organ_mask is not organ and not np.array_equal(res.organ_mask, organ)
    # The label is built from the warped organ mask.
    assert np.array_equal(res.label == 2, res.tumor_mask)
    assert np.array_equal(res.label == 1, res.organ_mask & ~res.tumor_mask)
    # Replay the plan on images that encode the voxel coordinates: outside the tumor boxes the
    # output holds the source coordinate s(x) of each voxel. Every organ voxel must be the
    # input organ at the voxel nearest to s(x): the same source as its image voxel.
    keep = _outside_tumor_boxes(res)
    src = []
    for ramp in ramps(image.shape):
        r = synthgen.render(res.plan, ramp, organ)
        assert np.array_equal(r.organ_mask, res.organ_mask)  # the warp depends on the plan only
        src.append(r.image)
    near = [
        np.clip(np.floor(s + 0.5).astype(np.int64), 0, n - 1)
        for s, n in zip(src, image.shape, strict=True)
    ]
    from_src = organ[near[0], near[1], near[2]]
    assert np.array_equal(res.organ_mask[keep], from_src[keep])
    moved = np.any(np.stack(near) != np.indices(image.shape), axis=0) & keep
    assert moved.sum() > 500
    # Everywhere (tumor boxes included): a label of unique voxel ids warped along with the
    # organ names the source voxel of each organ voxel.
    ids = np.arange(image.size, dtype=np.int32).reshape(image.shape)
    s = me.render_plan(res.plan, image, organ, labels={"ids": ids}, device="cpu")
    assert np.array_equal(s.image, res.image) and np.array_equal(s.label, res.label)
    assert np.array_equal(organ.ravel()[s.labels["ids"]], res.organ_mask)
    got = np.stack(np.unravel_index(s.labels["ids"], image.shape))
    assert np.array_equal(got[:, keep], np.stack(near)[:, keep])
    assert np.array_equal(ids, np.arange(image.size).reshape(image.shape))  # input untouched


def test_plan_json_round_trip_reproduces_the_warped_sample(scan):
    image, organ = scan
    keep_img, keep_org = image.copy(), organ.copy()
    res = _sample(scan)
    assert me.plan_fields(res.plan)
    plan = synthgen.Plan.from_json(res.plan.to_json())
    again = synthgen.render(plan, image, organ)
    assert again.image.tobytes() == res.image.tobytes()
    assert again.label.tobytes() == res.label.tobytes()
    assert again.organ_mask.tobytes() == res.organ_mask.tobytes()
    assert [t.to_dict() for t in again.tumors] == [t.to_dict() for t in res.tumors]
    assert again.plan.to_json() == res.plan.to_json()  # the plan as drawn, not the render's
    # in place into a caller-owned buffer, and through render_batch
    buf = image.copy()
    inplace = synthgen.render(plan, image, organ, out=buf)
    assert inplace.image is buf and buf.tobytes() == res.image.tobytes()
    [batched] = synthgen.render_batch([plan], image, organ)
    assert batched.image.tobytes() == res.image.tobytes()
    assert batched.label.tobytes() == res.label.tobytes()
    # Synthesizer, same seed: same bytes; the inputs are never modified
    syn = synthgen.Synthesizer("liver", spacing=SPACING, size="large")
    assert syn(image, organ, seed=11).image.tobytes() == res.image.tobytes()
    assert np.array_equal(image, keep_img) and np.array_equal(organ, keep_org)
    # without the warp (the bare renderer) the sample differs: the warp is really applied
    assert plain_render(plan, image, organ).image.tobytes() != res.image.tobytes()


def test_liver_classic_is_unchanged(scan):
    image, organ = scan
    res = _sample(scan, preset="liver-classic", size="large")
    assert res.plan.preset["mass_effect"]["enabled"] is False
    assert not me.plan_fields(res.plan)
    assert res.organ_mask is organ
    bare = plain_render(res.plan, image, organ)
    assert bare.image.tobytes() == res.image.tobytes()
    assert bare.label.tobytes() == res.label.tobytes()


def test_small_tumors_do_not_push(scan):
    _, organ = scan
    res = _sample(scan, size="tiny")
    assert not me.plan_fields(res.plan)
    assert res.organ_mask is organ


# --------------------------------------------------------------------------------------
# batch
# --------------------------------------------------------------------------------------

runner = CliRunner()


def _load(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def _oracle(lab: np.ndarray, fields) -> np.ndarray:
    """``lab`` warped by ``fields`` (nearest source voxel), from the NumPy oracle."""
    out = lab.copy()
    if not fields:
        return out
    box = me._bbox(fields)
    s = me.source_voxels(fields, box)
    idx = [np.floor(s[a] + 0.5).astype(np.int64) for a in range(3)]
    out[box] = lab[idx[0], idx[1], idx[2]]
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("realism"), "atlas1", 2)


def test_batch_warps_every_label_map_with_the_image(dataset, tmp_path):
    out = tmp_path / "out"
    args = ["batch", str(dataset), "--out", str(out), "--organ", "liver,kidney"]
    res = runner.invoke(app, [*args, "--size", "large", "--seed", "3"])
    assert res.exit_code == 0, res.output
    pushed = 0
    for case in sorted(p for p in dataset.iterdir() if p.name.startswith("BDMAP")):
        sdir = out / f"{case.name}_s000"
        meta = json.loads((sdir / "tumors.json").read_text())
        seg_in = case / "segmentations"
        ct_in = _load(case / "ct.nii.gz")
        maps = {
            "liver": _load(seg_in / "liver.nii.gz") > 0,
            "kidney": (_load(seg_in / "kidney_left.nii.gz") > 0)
            | (_load(seg_in / "kidney_right.nii.gz") > 0),
        }
        seg = sdir / "segmentations"
        got = {o: _load(seg / f"{o}.nii.gz") > 0 for o in maps}
        lesions = {o: _load(seg / f"{o}_lesion.nii.gz") > 0 for o in maps}
        label = _load(sdir / "label.nii.gz")
        ct = _load(sdir / "ct.nii.gz")
        # Organ segmentations: the inputs pushed by every organ's fields, in organ order.
        expect = dict(maps)
        image = ct_in.copy()
        for rec in meta["organs"]:
            plan = synthgen.Plan.from_dict(rec["plan"])
            fields = me.plan_fields(plan)
            pushed += bool(fields)
            expect = {o: _oracle(m, fields) for o, m in expect.items()}
            # the public replay of each organ's plan on the sample so far
            organ = rec["organ"]
            others = {o: m for o, m in maps.items() if o != organ}
            r = me.render_plan(plan, image, maps[organ], labels=others, out=image, device="cpu")
            maps = {organ: r.result.organ_mask, **r.labels}
        for o in got:
            assert np.array_equal(got[o], expect[o]), o
            assert np.array_equal(got[o], maps[o]), o
        assert np.array_equal(ct, image)  # the written CT is the replayed one
        # label.nii.gz and the lesion masks agree with the (warped) segmentations
        tumor = lesions["liver"] | lesions["kidney"]
        assert np.array_equal(label == 2, tumor)
        assert np.array_equal(label == 1, (got["liver"] | got["kidney"]) & ~tumor)
        assert (lesions["liver"] & ~got["liver"]).sum() == 0
    assert pushed >= 2, "large tumors must push in these samples"

    # --no-mass-effect: the organ masks are the inputs as they were (copied verbatim)
    out2 = tmp_path / "plain"
    args2 = ["batch", str(dataset), "--out", str(out2), "--organ", "liver"]
    res = runner.invoke(app, [*args2, "--size", "large", "--seed", "3", "--no-mass-effect"])
    assert res.exit_code == 0, res.output
    for case in sorted(p for p in dataset.iterdir() if p.name.startswith("BDMAP")):
        sdir = out2 / f"{case.name}_s000"
        a = (sdir / "segmentations" / "liver.nii.gz").read_bytes()
        assert a == (case / "segmentations" / "liver.nii.gz").read_bytes()
        rec = json.loads((sdir / "tumors.json").read_text())["organs"][0]
        assert rec["plan"]["preset"]["mass_effect"]["enabled"] is False
    batch_json = json.loads((out2 / "batch.json").read_text())
    assert batch_json["options"]["mass_effect"] is False


def test_adapters_with_mass_effect_warp_the_whole_label_and_refuse_extra_channels(small_phantom):
    """implant_tumors (behind every adapter) returns the warped label map, organ boundaries
    moved with the image; the adapters refuse multi-channel images when mass effect would warp
    channel 0 only."""
    torch = pytest.importorskip("torch")
    from synthgen.augment import affine_for, implant_tumors
    from synthgen.torch import BatchTumorSynthesis

    ph = small_phantom
    liver = ph.mask("liver")
    lab = liver.astype(np.int16)
    syn = synthgen.Synthesizer("liver", size="large")
    pushed = None
    for seed in range(20):
        res = implant_tumors(ph.image, lab, synthesizer=syn, organ_labels=[1], tumor_label=2,
                             seed=seed, affine=affine_for(ph.spacing))  # fmt: skip
        if res.plan is not None and me.plan_fields(res.plan):
            pushed = res
            break
    assert pushed is not None, "no large liver tumor pushed in 20 seeds"
    moved = ((pushed.label == 1) != liver) & (pushed.label != 2)
    assert moved.any(), "the organ boundary moved with the image"
    img = torch.from_numpy(np.stack([ph.image, ph.image])[None].astype(np.float32))
    lab_t = torch.from_numpy(lab[None, None].copy())
    with pytest.raises(ValueError, match=r"2 channels.*mass effect"):
        BatchTumorSynthesis("liver", spacing=ph.spacing)(img, lab_t)


def test_batch_warps_only_the_maps_a_push_reaches(dataset, tmp_path):
    """A field reads and writes only its box: an organ region with no voxel in any field's
    box is not copied, warped or marked as moved (it is written as the input was), and one
    with voxels there is. The kidneys' preset here has no mass effect, so only the liver's
    tumors push."""
    from importlib.resources import files

    from synthgen.batch import BatchOptions, Sample, _synthesize, load_case, sample_seed
    from synthgen.layouts import discover

    on, off = "[mass_effect]\nenabled = true", "[mass_effect]\nenabled = false"
    toml = files("synthgen.presets").joinpath("kidney.toml").read_text()
    assert on in toml
    still = tmp_path / "kidney-still.toml"
    still.write_text(toml.replace(on, off))
    opts = BatchOptions(organs=("liver", "kidney"), size="large", seed=3,
                        presets={"kidney": str(still)})  # fmt: skip
    _, cases = discover(dataset, list(opts.organs))
    seen_untouched = seen_touched = 0
    for case in cases:
        lc = load_case(case, opts)
        sample = Sample(case.case_id, 0, sample_seed(opts.seed, case.case_id, 0))
        *_, records, _, written = _synthesize(lc, sample, opts)
        boxes = [f.box for rec in records
                 for f in me.plan_fields(synthgen.Plan.from_dict(rec["plan"]))]  # fmt: skip
        rendered = {rec["organ"] for rec in records
                    if me.plan_fields(synthgen.Plan.from_dict(rec["plan"]))}  # fmt: skip
        for organ, (region, warped) in written.items():
            if organ in rendered:
                assert warped, organ  # an organ's own push moves its region
                continue
            reached = any(lc.organs[organ][b].any() for b in boxes)
            assert warped == reached, organ
            if reached:
                seen_touched += 1
            else:
                assert region is lc.organs[organ], organ  # the case's array, not a copy
                seen_untouched += 1
    assert seen_untouched >= 1, "no organ stayed out of every push in these samples"
