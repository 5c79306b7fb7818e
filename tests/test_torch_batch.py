"""BatchTumorSynthesis: tumors into a collated batch in place (CPU tensors here; the same
code on CUDA tensors renders on the GPU, ``@pytest.mark.gpu``)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _lesion_scene import (  # noqa: E402
    SIZE,
    lesion_scene,
    plan_with_the_lesion,
    touches,
    touching_without_the_mask,
)

import synthgen  # noqa: E402
from synthgen._hash import seed_of  # noqa: E402
from synthgen.augment import affine_for  # noqa: E402
from synthgen.torch import BatchTumorSynthesis  # noqa: E402

SP = (2.5, 2.5, 3.0)


@pytest.fixture(scope="module")
def batch(small_phantom):
    """Three liver crops of the phantom, as a (B, 1, X, Y, Z) batch."""
    ph = small_phantom
    liver = ph.mask("liver")
    idx = np.argwhere(liver)
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    img = ph.image[sl].astype(np.int16)
    lab = liver[sl].astype(np.uint8)
    imgs = np.stack([img, img, img])[:, None]
    labs = np.stack([lab, lab, lab])[:, None]
    return imgs, labs


def _expected(img, lab, seed):
    res = synthgen.synthesize(img, lab == 1, organ="liver", seed=seed, affine=affine_for(SP))
    out_lab = lab.copy()
    out_lab[res.tumor_mask] = 2
    return res.image, out_lab, res.plan


def test_batch_matches_one_sample_at_a_time(batch):
    imgs, labs = batch
    synth = BatchTumorSynthesis("liver", spacing=SP, seed=5)
    img_t, lab_t = torch.from_numpy(imgs.copy()), torch.from_numpy(labs.copy())
    plans = synth(img_t, lab_t, step=3)
    assert len(plans) == 3 and all(p is not None for p in plans)
    assert len({p.to_json() for p in plans}) == 3, "every sample of the batch differs"
    for b in range(3):
        e_img, e_lab, e_plan = _expected(imgs[b, 0], labs[b, 0], seed_of(5, "batch", 3, b))
        assert plans[b].to_json() == e_plan.to_json()
        np.testing.assert_array_equal(img_t[b, 0].numpy(), e_img)
        np.testing.assert_array_equal(lab_t[b, 0].numpy(), e_lab)
        assert (lab_t[b, 0].numpy() == 2).any()


def test_steps_advance_and_replay(batch):
    imgs, labs = batch
    synth = BatchTumorSynthesis("liver", spacing=SP, seed=1)
    a = synth(torch.from_numpy(imgs.copy()), torch.from_numpy(labs.copy()))
    b = synth(torch.from_numpy(imgs.copy()), torch.from_numpy(labs.copy()))
    assert synth.step == 2 and a[0].to_json() != b[0].to_json()
    again = BatchTumorSynthesis("liver", spacing=SP, seed=1)(
        torch.from_numpy(imgs.copy()), torch.from_numpy(labs.copy()), step=1
    )
    assert [p.to_json() for p in again] == [p.to_json() for p in b]


def test_prob_zero_and_missing_organ_leave_samples_alone(batch):
    imgs, labs = batch
    img_t, lab_t = torch.from_numpy(imgs.copy()), torch.from_numpy(labs.copy())
    assert BatchTumorSynthesis("liver", spacing=SP, prob=0.0)(img_t, lab_t) == [None] * 3
    np.testing.assert_array_equal(img_t.numpy(), imgs)
    lab_t[1] = 0  # no organ in sample 1
    plans = BatchTumorSynthesis("liver", spacing=SP)(img_t, lab_t)
    assert plans[1] is None and plans[0] is not None
    np.testing.assert_array_equal(img_t[1].numpy(), imgs[1])


def test_bad_shapes_are_refused(batch):
    imgs, labs = batch
    synth = BatchTumorSynthesis("liver", spacing=SP)
    with pytest.raises(ValueError, match=r"\(B, C, X, Y, Z\)"):
        synth(torch.from_numpy(imgs[:, 0].copy()), torch.from_numpy(labs.copy()))
    with pytest.raises(ValueError, match="spacing"):
        BatchTumorSynthesis("liver")(torch.from_numpy(imgs.copy()), torch.from_numpy(labs.copy()))


def test_nan_in_the_organ_or_a_bad_affine_is_raised_not_a_sample_without_tumors(batch):
    """Planning raises ValueError for an organ too small (a normal patch: left alone) and
    for the caller's errors alike: NaN in the organ, or an affine that gives no spacing,
    are raised (they silently meant no tumors for a whole training run)."""
    imgs, labs = batch
    img = torch.from_numpy(imgs.astype(np.float32))
    img[1, 0, 5, 5, 5] = float("nan")  # (inside the crop of the organ's box)
    with pytest.raises(ValueError, match="NaN"):
        BatchTumorSynthesis("liver", spacing=SP)(img, torch.from_numpy(labs.copy()))
    bad = np.diag([2.5, 0.0, 3.0, 1.0])
    img = torch.from_numpy(imgs.astype(np.float32))
    with pytest.raises(ValueError, match="spacing"):
        BatchTumorSynthesis("liver")(img, torch.from_numpy(labs.copy()), affine=bad)


def test_boolean_label_is_refused_with_a_clear_message(batch):
    # the label map is written in place: a bool tensor cannot hold the tumor label
    imgs, labs = batch
    synth = BatchTumorSynthesis("liver", spacing=SP)
    img_t, lab_t = torch.from_numpy(imgs.copy()), torch.from_numpy(labs.astype(bool))
    with pytest.raises(ValueError, match="must hold the tumor label"):
        synth(img_t, lab_t)
    assert synth.step == 0
    np.testing.assert_array_equal(img_t.numpy(), imgs)


def test_a_label_map_that_cannot_hold_the_tumor_label_is_refused_before_a_step(batch):
    """A uint8 label map and tumor_label 300: refused by the render's own rule before the
    step counter moves or an image is touched (it was raised by the render, after both)."""
    imgs, labs = batch
    synth = BatchTumorSynthesis("liver", spacing=SP, tumor_label=300)
    img_t, lab_t = torch.from_numpy(imgs.copy()), torch.from_numpy(labs.astype(np.uint8))
    with pytest.raises(ValueError, match="does not fit"):
        synth(img_t, lab_t)
    assert synth.step == 0
    np.testing.assert_array_equal(img_t.numpy(), imgs)


def test_bfloat16_cpu_batch_renders_through_float32(batch):
    """A bfloat16 CPU batch (AMP) is planned from its float32 values and rendered in place
    like that float32 batch, cast back. (Before: TypeError, unsupported ScalarType
    BFloat16, from the planning's ``.numpy()``.)"""
    imgs, labs = batch
    img_t = torch.from_numpy(imgs.astype(np.float32)).to(torch.bfloat16)
    lab_t = torch.from_numpy(labs.copy())
    ref_img = img_t.float()  # the values the engine reads
    ref_lab = lab_t.clone()
    want = BatchTumorSynthesis("liver", spacing=SP, seed=5)(ref_img, ref_lab, step=3)
    plans = BatchTumorSynthesis("liver", spacing=SP, seed=5)(img_t, lab_t, step=3)
    assert [p.to_json() for p in plans] == [p.to_json() for p in want]
    assert img_t.dtype == torch.bfloat16
    assert torch.equal(img_t, ref_img.to(torch.bfloat16))
    assert torch.equal(lab_t, ref_lab) and (lab_t == 2).any()


@pytest.mark.gpu
def test_cuda_batch_renders_on_the_gpu_like_the_cpu(batch):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU for torch")
    pytest.importorskip("cupy")
    imgs, labs = batch
    synth = BatchTumorSynthesis("liver", spacing=SP, seed=5)
    img_t, lab_t = torch.from_numpy(imgs.copy()).cuda(), torch.from_numpy(labs.copy()).cuda()
    plans = synth(img_t, lab_t, step=3)
    for b in range(3):
        e_img, e_lab, e_plan = _expected(imgs[b, 0], labs[b, 0], seed_of(5, "batch", 3, b))
        assert plans[b].to_json() == e_plan.to_json()
        got = img_t[b, 0].cpu().numpy()
        assert np.abs(got.astype(float) - e_img).max() <= 1.0
        n = int((e_lab == 2).sum())
        assert np.count_nonzero((lab_t[b, 0].cpu().numpy() == 2) != (e_lab == 2)) <= 0.001 * n


def test_ranks_draw_their_part_of_the_global_batch(batch):
    """Under DDP rank r's batch is part r of one global batch: its sample b gets the seed of
    global sample r * B + b, so ranks draw different tumors (before: every rank drew the same
    plans for the same step) and together what one process draws for the global batch."""
    imgs, labs = batch
    glob = BatchTumorSynthesis("liver", spacing=SP, seed=5)
    big_i, big_l = np.concatenate([imgs, imgs]), np.concatenate([labs, labs])
    whole = glob(torch.from_numpy(big_i), torch.from_numpy(big_l), step=2)
    parts = []
    for r in range(2):
        synth = BatchTumorSynthesis("liver", spacing=SP, seed=5, rank=r, world_size=2)
        assert synth.rank == r
        parts += synth(torch.from_numpy(imgs.copy()), torch.from_numpy(labs.copy()), step=2)
    assert [p.to_json() for p in parts] == [p.to_json() for p in whole]
    assert len({p.to_json() for p in parts}) == 6
    with pytest.raises(ValueError, match="rank"):
        BatchTumorSynthesis("liver", spacing=SP, rank=2, world_size=2)


def test_existing_lesions_are_kept_clear_of():
    """Voxels of the batch's label already holding ``tumor_label`` are planning's
    ``lesion_mask``: with a lesion filling most of the organ, no tumor touches it."""
    sc = lesion_scene()
    img = torch.from_numpy(np.stack([sc["image"]] * 4)[:, None])
    lab = torch.from_numpy(np.stack([sc["label"]] * 4)[:, None])
    synth = BatchTumorSynthesis("liver", spacing=(1.0, 1.0, 1.0), size=SIZE, seed=0)
    plans = synth(img, lab, step=0)
    seeds = [seed_of(0, "batch", 0, b) for b in range(4)]
    for b, seed in enumerate(seeds):
        label = lab[b, 0].numpy()
        assert (label[sc["lesion"]] == 2).all()
        assert not touches(sc, (label == 2) & ~sc["lesion"])
        assert plans[b].to_json() == plan_with_the_lesion(sc, seed)
    assert touching_without_the_mask(sc, seeds) >= 1
