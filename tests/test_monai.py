"""MONAI transforms (``synthgen.monai``): input types, MONAI random-state conventions, a real
``Compose`` + ``DataLoader`` pipeline on NIfTI files, spacing from the affine."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
monai = pytest.importorskip("monai")

from _lesion_scene import (  # noqa: E402
    SIZE,
    lesion_scene,
    plan_with_the_lesion,
    touches,
    touching_without_the_mask,
)
from monai.data import MetaTensor, get_track_meta, set_track_meta  # noqa: E402
from scipy import ndimage  # noqa: E402

from synthgen.phantom import make_phantom  # noqa: E402
from synthgen.planning import Plan  # noqa: E402
from synthgen.presets import without_extras  # noqa: E402

smonai = pytest.importorskip("synthgen.monai")
RandTumorSynthesis = smonai.RandTumorSynthesis
RandTumorSynthesisd = smonai.RandTumorSynthesisd

SHAPE = (96, 80, 64)
SPACING = (4.0, 4.0, 5.0)
FINE_SHAPE = (192, 160, 128)
FINE_SPACING = (2.0, 2.0, 2.5)
LIVER = 1
# The liver preset without its realism extras: these tests check the adapters on the plain
# recipe (only tumor voxels relabelled, tumors inside the input organ).
PLAIN = without_extras("liver")


@pytest.fixture(scope="module")
def scan() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Channel-first int16 CT (1, X, Y, Z), uint8 label map (liver = 1), affine (RAS, mm)."""
    p = make_phantom(SHAPE, SPACING, seed=0)
    image = p.image[None].copy()
    label = p.mask("liver").astype(np.uint8)[None]
    image.flags.writeable = False
    label.flags.writeable = False
    return image, label, p.affine


def _as(kind: str, a: np.ndarray, affine: np.ndarray):
    if kind == "numpy":
        return a.copy()
    if kind == "torch":
        return torch.from_numpy(a.copy())
    if kind == "cuda":
        return torch.from_numpy(a.copy()).cuda()
    return MetaTensor(torch.from_numpy(a.copy()), affine=torch.from_numpy(affine.copy()))


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


KINDS = [
    "numpy",
    "torch",
    "metatensor",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    ),
]


# 1. input types ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", ["array", "dict"])
def test_input_types(scan, kind, form):
    image, label, affine = scan
    img_in, lab_in = _as(kind, image, affine), _as(kind, label, affine)
    img_before, lab_before = _np(img_in).copy(), _np(lab_in).copy()
    spacing = None if kind == "metatensor" else SPACING
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="synthgen has no GPU backend")
        if form == "array":
            t = RandTumorSynthesis(PLAIN, organ_label=LIVER, tumor_label=2, spacing=spacing)
            t.set_random_state(seed=3)
            img_out, lab_out = t(img_in, lab_in)
        else:
            t = RandTumorSynthesisd(keys=("image", "label"), organ=PLAIN, spacing=spacing)
            t.set_random_state(seed=3)
            d = t({"image": img_in, "label": lab_in, "id": "case0"})
            img_out, lab_out = d["image"], d["label"]
            assert d["id"] == "case0"

    for out, inp in ((img_out, img_in), (lab_out, lab_in)):
        assert type(out) is type(inp)
        assert tuple(out.shape) == tuple(inp.shape)
        assert out.dtype == inp.dtype
        if isinstance(inp, torch.Tensor):
            assert out.device == inp.device
    np.testing.assert_array_equal(_np(img_in), img_before)  # inputs untouched
    np.testing.assert_array_equal(_np(lab_in), lab_before)

    organ = label[0] == LIVER
    lab_o, img_o = _np(lab_out)[0], _np(img_out)[0]
    tumor = lab_o == 2
    assert tumor.sum() > 0
    assert np.all(organ[tumor])  # tumors inside the organ (the liver preset clips to it)
    np.testing.assert_array_equal(lab_o[~tumor], label[0][~tumor])
    changed = img_o != image[0]
    assert changed.sum() > 0
    near_organ = ndimage.binary_dilation(organ, iterations=3)  # edge blur: 1-2 mm
    assert not np.any(changed & ~near_organ)

    if kind == "metatensor":
        assert np.allclose(_np(img_out.affine), affine)
        assert np.allclose(_np(lab_out.affine), affine)
        plan = Plan.from_json(img_out.meta[smonai.PLAN_META_KEY])
        assert plan.shape == SHAPE and len(plan.tumors) >= 1
        assert smonai.PLAN_META_KEY not in img_in.meta  # the input's meta dict is its own
        assert smonai.PLAN_META_KEY not in lab_out.meta


def test_cpu_tensor_input_is_read_without_copy(scan, monkeypatch):
    """CPU tensors reach the engine as zero-copy views of their storage."""
    image, label, _ = scan
    img_in, lab_in = torch.from_numpy(image.copy()), torch.from_numpy(label.copy())
    seen = {}
    real = smonai.implant_tumors

    def spy(image, label, **kw):
        seen["image"], seen["label"] = image, label
        return real(image, label, **kw)

    monkeypatch.setattr(smonai, "implant_tumors", spy)
    RandTumorSynthesis("liver", spacing=SPACING).set_random_state(0)(img_in, lab_in)
    assert np.shares_memory(seen["image"], img_in.numpy())
    assert np.shares_memory(seen["label"], lab_in.numpy())


def test_float32_and_multichannel_image(scan):
    """Float images stay float; only channel 0 gets tumors; a float label map works too."""
    image, label, _ = scan
    img = np.concatenate([image, image]).astype(np.float32)  # (2, X, Y, Z)
    lab = label.astype(np.float32)
    # mass effect warps channel 0 only: refused, saying what to pass instead
    with pytest.raises(ValueError, match=r"2 channels.*without_extras\('liver'.*'liver-classic'"):
        RandTumorSynthesis("liver", spacing=SPACING).set_random_state(seed=5)(img, lab)
    t = RandTumorSynthesis(PLAIN, spacing=SPACING).set_random_state(seed=5)
    img_out, lab_out = t(img, lab)
    assert img_out.dtype == np.float32 and lab_out.dtype == np.float32
    assert img_out.shape == img.shape
    assert np.any(img_out[0] != img[0])
    np.testing.assert_array_equal(img_out[1], img[1])
    assert set(np.unique(lab_out)) == {0.0, 1.0, 2.0}


@pytest.mark.parametrize(
    ("form", "dtype"),
    [(f, d) for f in ("tensor", "metatensor") for d in ("bfloat16", "float16")]
    + [("numpy", "float16")],  # (NumPy has no bfloat16)
)
def test_half_precision_renders_through_float32(scan, form, dtype):
    """bfloat16 / float16 images (AMP) give the float32 image's result, cast back."""
    image, label, affine = scan
    tdt = getattr(torch, dtype)
    half = torch.from_numpy(image.astype(np.float32)).to(tdt)
    full = half.float()
    if form == "metatensor":
        half, full = (MetaTensor(x, affine=torch.from_numpy(affine.copy())) for x in (half, full))
    elif form == "numpy":
        half, full = half.numpy(), full.numpy()
    outs = []
    for img in (full, half):
        t = RandTumorSynthesisd(keys=("image", "label"), organ="liver", spacing=SPACING)
        t.set_random_state(seed=4)
        kind = {"tensor": "torch"}.get(form, form)
        outs.append(t({"image": img, "label": _as(kind, label, affine)}))
    ref, out = outs
    assert out["image"].dtype == half.dtype
    assert (_np(out["label"]) == 2).any()
    if form == "numpy":
        assert out["image"].tobytes() == ref["image"].astype(np.float16).tobytes()
    else:
        assert torch.equal(out["image"].as_tensor() if form == "metatensor" else out["image"],
                           torch.as_tensor(ref["image"]).to(tdt))  # fmt: skip
    np.testing.assert_array_equal(_np(out["label"]), _np(ref["label"]))


def test_non_native_byte_order_numpy_input(scan):
    """Big-endian NumPy input (nibabel's >i2) gives the native input's result."""
    image, label, _ = scan
    outs = []
    for img, lab in ((image, label), (image.astype(">i2"), label.astype(">u2"))):
        t = RandTumorSynthesis("liver", spacing=SPACING).set_random_state(seed=4)
        outs.append(t(img, lab))
    (ref_i, ref_l), (out_i, out_l) = outs
    assert (_np(ref_l) == 2).any()
    np.testing.assert_array_equal(_np(out_i), _np(ref_i))
    np.testing.assert_array_equal(_np(out_l), _np(ref_l))


def test_several_organ_ids(scan):
    """``organ_label`` as a sequence: the union of the ids is the organ."""
    image, label, _ = scan
    split = label.copy()
    split[0, :, :, SHAPE[2] // 2 :][split[0, :, :, SHAPE[2] // 2 :] == 1] = 7
    t = RandTumorSynthesis("liver", organ_label=(1, 7), spacing=SPACING).set_random_state(1)
    _, lab_out = t(image, split)
    tumor = lab_out[0] == 2
    assert tumor.any() and np.all(label[0][tumor] == 1)


# 2. reproducibility and MONAI random-state conventions ----------------------------------


def _run(seed: int, scan):
    image, label, affine = scan
    t = RandTumorSynthesisd(organ="liver", organ_label=LIVER)
    assert t.set_random_state(seed=seed) is t
    return t({"image": _as("metatensor", image, affine), "label": _as("metatensor", label, affine)})


def test_same_state_same_output_other_state_other_output(scan):
    a, b, c = _run(7, scan), _run(7, scan), _run(8, scan)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert a["image"].meta[smonai.PLAN_META_KEY] == b["image"].meta[smonai.PLAN_META_KEY]
    assert not torch.equal(a["label"], c["label"])


def test_successive_calls_differ_and_array_form_matches_dict_form(scan):
    image, label, _ = scan
    t = RandTumorSynthesis("liver", spacing=SPACING).set_random_state(seed=7)
    first, second = t(image, label), t(image, label)
    assert not np.array_equal(first[1], second[1])
    # the array and dictionary forms draw the same numbers from the same state
    d = RandTumorSynthesisd(organ="liver", spacing=SPACING).set_random_state(seed=7)
    out = d({"image": image, "label": label})
    np.testing.assert_array_equal(out["image"], first[0])
    np.testing.assert_array_equal(out["label"], first[1])
    # replay without redrawing: randomize=False reuses the last seed
    again = t(image, label, randomize=False)
    np.testing.assert_array_equal(again[1], second[1])


def test_affine_and_spacing_give_the_same_tumors(scan):
    """A MetaTensor with a diagonal affine and a NumPy array with its spacing agree."""
    image, label, affine = scan
    meta = RandTumorSynthesis("liver").set_random_state(seed=11)(
        _as("metatensor", image, affine), _as("metatensor", label, affine)
    )
    plain = RandTumorSynthesis("liver", spacing=SPACING).set_random_state(seed=11)(image, label)
    np.testing.assert_array_equal(_np(meta[0]), plain[0])
    np.testing.assert_array_equal(_np(meta[1]), plain[1])


@pytest.mark.parametrize("kind", ["numpy", "torch", "metatensor"])
@pytest.mark.parametrize("track", [True, False])
def test_prob_zero_returns_inputs_as_tensors(scan, kind, track):
    image, label, affine = scan
    img_in, lab_in = _as(kind, image, affine), _as(kind, label, affine)
    t = RandTumorSynthesisd(organ="liver", prob=0.0).set_random_state(seed=0)
    previous = get_track_meta()
    set_track_meta(track)
    try:
        out = t({"image": img_in, "label": lab_in})
        arr = RandTumorSynthesis("liver", prob=0.0)(img_in, lab_in)  # no spacing needed
    finally:
        set_track_meta(previous)
    for got in (out["image"], out["label"], *arr):
        assert isinstance(got, torch.Tensor)
        assert isinstance(got, MetaTensor) == track
    np.testing.assert_array_equal(_np(out["image"]), image)
    np.testing.assert_array_equal(_np(out["label"]), label)
    assert out["image"].dtype == torch.int16 and out["label"].dtype == torch.uint8
    if track:  # the key is always there (batches keep it), empty without tumors
        assert out["image"].meta[smonai.PLAN_META_KEY] == ""


@pytest.mark.parametrize("kind", ["numpy", "torch", "metatensor"])
def test_bool_label_comes_back_uint8_with_the_tumor_label(scan, kind):
    """A boolean organ mask as the label: uint8 with the tumor label whether the sample
    fires or not (it was cast back to bool when fired, every tumor voxel read as organ)."""
    image, label, affine = scan
    img_in, lab_in = _as(kind, image, affine), _as(kind, label.astype(bool), affine)
    spacing = None if kind == "metatensor" else SPACING
    t = RandTumorSynthesis(PLAIN, organ_label=LIVER, tumor_label=2, spacing=spacing)
    img_out, lab_out = t.set_random_state(seed=3)(img_in, lab_in)
    lab = _np(lab_out)
    assert lab.dtype == np.uint8 and (lab == 2).any() and (_np(img_out) != image).any()
    np.testing.assert_array_equal(lab != 0, label != 0)  # (the plain recipe stays inside)
    _, lab0 = RandTumorSynthesis(PLAIN, prob=0.0)(img_in, lab_in)
    assert _np(lab0).dtype == np.uint8


def test_track_meta_off_gives_plain_tensors_when_fired(scan):
    image, label, affine = scan
    previous = get_track_meta()
    set_track_meta(False)
    try:
        img, lab = RandTumorSynthesis("liver").set_random_state(0)(
            _as("metatensor", image, affine), _as("metatensor", label, affine)
        )
    finally:
        set_track_meta(previous)
    assert type(img) is torch.Tensor and type(lab) is torch.Tensor
    assert (lab == 2).any()


def test_prob_is_respected():
    t = RandTumorSynthesis("liver", prob=0.5, spacing=SPACING).set_random_state(seed=0)
    fired = 0
    for _ in range(40):
        t.randomize()
        fired += t._do_transform
    assert 8 <= fired <= 32


# 3. a real Compose pipeline through MONAI's DataLoader -----------------------------------


@pytest.fixture(scope="module")
def nifti_cases(tmp_path_factory):
    import nibabel as nib

    root = tmp_path_factory.mktemp("monai_cases")
    cases = []
    for k in range(4):
        p = make_phantom(SHAPE, SPACING, seed=k)
        img_path, lab_path = root / f"ct_{k}.nii.gz", root / f"label_{k}.nii.gz"
        nib.save(nib.Nifti1Image(p.image.astype(np.int16), p.affine), img_path)
        nib.save(nib.Nifti1Image(p.mask("liver").astype(np.uint8), p.affine), lab_path)
        cases.append({"image": str(img_path), "label": str(lab_path)})
    return cases


def _pipeline():
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        RandCropByPosNegLabeld,
        ScaleIntensityRanged,
        Spacingd,
    )

    keys = ["image", "label"]
    return Compose(
        [
            LoadImaged(keys=keys),
            EnsureChannelFirstd(keys=keys),
            Orientationd(keys=keys, axcodes="RAS"),
            Spacingd(keys=keys, pixdim=(4.0, 4.0, 5.0), mode=("bilinear", "nearest")),
            RandTumorSynthesisd(
                keys=("image", "label"), organ="liver", organ_label=1, tumor_label=2, prob=1.0
            ),
            ScaleIntensityRanged(
                keys=["image"], a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True
            ),
            RandCropByPosNegLabeld(
                keys=keys,
                label_key="label",
                spatial_size=(32, 32, 32),
                pos=1,
                neg=1,
                num_samples=2,
            ),
        ]
    )


def _epoch(cases) -> list[dict]:
    from monai.data import DataLoader, Dataset
    from monai.utils import set_determinism

    set_determinism(seed=0)
    try:
        loader = DataLoader(Dataset(cases, transform=_pipeline()), batch_size=2, num_workers=2)
        return list(loader)
    finally:
        set_determinism(seed=None)


@pytest.mark.filterwarnings("ignore:.*Orientationd.*:FutureWarning")  # MONAI's own default
def test_compose_pipeline_through_dataloader(nifti_cases):
    first, second = _epoch(nifti_cases), _epoch(nifti_cases)
    assert len(first) == 2  # 4 cases, batch_size 2
    crops_with_tumor = 0
    for batch in first:
        img, lab = batch["image"], batch["label"]
        assert tuple(img.shape) == (4, 1, 32, 32, 32)  # 2 cases x 2 crops
        assert tuple(lab.shape) == (4, 1, 32, 32, 32)
        assert isinstance(img, MetaTensor)
        assert set(torch.unique(lab).tolist()) <= {0.0, 1.0, 2.0}
        assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
        crops_with_tumor += int(((lab == 2).flatten(1).any(dim=1)).sum())
        plans = img.meta[smonai.PLAN_META_KEY]
        assert len(plans) == 4
        for text in plans:
            plan = Plan.from_json(text)
            assert plan.shape == SHAPE and plan.spacing == SPACING
            assert json.loads(text)["preset"]["name"] == "liver"
    assert crops_with_tumor > 0
    for a, b in zip(first, second, strict=True):  # set_determinism: identical epochs
        assert torch.equal(a["image"], b["image"])
        assert torch.equal(a["label"], b["label"])
        assert a["image"].meta[smonai.PLAN_META_KEY] == b["image"].meta[smonai.PLAN_META_KEY]
    # the two cases of a batch (different workers' samples) got different tumors
    plans = [p for batch in first for p in batch["image"].meta[smonai.PLAN_META_KEY]]
    assert len({json.loads(p)["seed"] for p in plans}) == 4  # 4 cases (each crop twice)


def test_transforms_pickle():
    t = RandTumorSynthesisd(organ="liver").set_random_state(seed=1)
    u = pickle.loads(pickle.dumps(t))
    assert u.R.randint(1000) == t.R.randint(1000)


# 4. spacing from the affine --------------------------------------------------------------


def test_physical_tumor_volume_does_not_depend_on_spacing():
    coarse = make_phantom(SHAPE, SPACING, seed=0)
    fine = make_phantom(FINE_SHAPE, FINE_SPACING, seed=0)
    means = []
    for p in (coarse, fine):
        img = _as("metatensor", p.image[None], p.affine)
        lab = _as("metatensor", p.mask("liver").astype(np.uint8)[None], p.affine)
        volumes = []
        for seed in range(6):  # the same seeds at both spacings: the same size classes
            t = RandTumorSynthesis("liver").set_random_state(seed=seed)
            _, out = t(img, lab)
            volumes.append(float((out == 2).sum()) * float(np.prod(p.spacing)))
        means.append(np.mean(volumes))
    assert min(means) > 0
    assert 0.5 < means[0] / means[1] < 2.0, means


def test_permuted_axes_read_from_affine(scan):
    """A volume stored z-first: spacing and cranio-caudal axis follow the affine's columns."""
    image, label, affine = scan
    perm = (0, 3, 1, 2)  # (1, Z, X, Y)
    aff = affine[:, [2, 0, 1, 3]]
    t = RandTumorSynthesis("liver").set_random_state(seed=4)
    img, lab = t(
        _as("metatensor", image.transpose(perm), aff), _as("metatensor", label.transpose(perm), aff)
    )
    plan = Plan.from_json(img.meta[smonai.PLAN_META_KEY])
    assert plan.spacing == (5.0, 4.0, 4.0)
    assert (lab == 2).any()


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_plain_arrays_need_spacing(scan, kind):
    image, label, affine = scan
    t = RandTumorSynthesis("liver")
    with pytest.raises(ValueError, match=r"spacing=\(sx, sy, sz\) in mm"):
        t(_as(kind, image, affine), _as(kind, label, affine))
    d = RandTumorSynthesisd(organ="liver")
    with pytest.raises(ValueError, match="MetaTensor"):
        d({"image": _as(kind, image, affine), "label": _as(kind, label, affine)})


# 5. nothing to do, and bad input ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["numpy", "metatensor"])
def test_label_without_the_organ_passes_through(scan, kind):
    image, _, affine = scan
    empty = np.zeros((1, *SHAPE), dtype=np.uint8)
    t = RandTumorSynthesisd(organ="liver", spacing=SPACING).set_random_state(seed=0)
    out = t({"image": _as(kind, image, affine), "label": _as(kind, empty, affine)})
    np.testing.assert_array_equal(_np(out["image"]), image)
    np.testing.assert_array_equal(_np(out["label"]), empty)
    assert _np(out["image"]).dtype == np.int16
    if kind == "metatensor":
        assert out["image"].meta[smonai.PLAN_META_KEY] == ""


def test_small_organ_passes_through(scan):
    image, _, _ = scan
    tiny = np.zeros((1, *SHAPE), dtype=np.uint8)
    tiny[0, 40:43, 40:43, 30:33] = 1  # 27 voxels < min_organ_voxels
    img, lab = RandTumorSynthesis("liver", spacing=SPACING)(image, tiny)
    np.testing.assert_array_equal(img, image)
    np.testing.assert_array_equal(lab, tiny)


def test_missing_keys(scan):
    image = scan[0]
    with pytest.raises(KeyError):
        RandTumorSynthesisd(organ="liver", spacing=SPACING)({"image": image})
    t = RandTumorSynthesisd(organ="liver", spacing=SPACING, allow_missing_keys=True)
    out = t({"image": image.copy()})
    assert isinstance(out["image"], torch.Tensor) and "label" not in out


def test_bad_arguments_and_shapes(scan):
    image, label, _ = scan
    with pytest.raises(ValueError, match="keys"):
        RandTumorSynthesisd(keys=("image",), organ="liver")
    with pytest.raises(ValueError):
        RandTumorSynthesis("no-such-organ")
    with pytest.raises(ValueError, match="organ_label"):
        RandTumorSynthesis("liver", organ_label=[])
    with pytest.raises(ValueError, match="spacing"):
        RandTumorSynthesis("liver", spacing=(1.0, 0.0, 1.0))
    t = RandTumorSynthesis("liver", spacing=SPACING)
    with pytest.raises(ValueError, match="one channel"):
        t(image, np.concatenate([label, label]))
    with pytest.raises(ValueError, match="channel-first"):
        t(image[0], label[0])
    with pytest.raises(ValueError, match="spatial grid"):
        t(image[:, :-1], label)


def test_scaled_image_warns(scan):
    image, label, _ = scan
    scaled = np.clip((image.astype(np.float32) + 175) / 425, 0, 1)
    smonai._warned.discard("hu")
    with pytest.warns(RuntimeWarning, match="treats image values as HU"):
        RandTumorSynthesis("liver", spacing=SPACING).set_random_state(0)(scaled, label)


def test_aliases_backend_and_lazy_import():
    assert smonai.RandTumorSynthesisD is RandTumorSynthesisd
    assert smonai.RandTumorSynthesisDict is RandTumorSynthesisd
    from monai.transforms import LazyTransform, RandomizableTransform
    from monai.utils import TransformBackends

    assert set(RandTumorSynthesisd.backend) == {TransformBackends.TORCH, TransformBackends.NUMPY}
    assert issubclass(RandTumorSynthesisd, RandomizableTransform)
    assert not issubclass(RandTumorSynthesisd, LazyTransform)
    code = "import sys, synthgen; assert 'synthgen.monai' not in sys.modules; print('ok')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_existing_lesions_are_kept_clear_of():
    """Voxels already labelled ``tumor_label`` (MSD's "cancer") go to planning as
    ``lesion_mask``: with a lesion filling most of the organ, no synthetic tumor touches it
    (before: they were planned against it), and the plan is the one planned with it."""
    sc = lesion_scene()
    affine = torch.from_numpy(sc["affine"])
    t = RandTumorSynthesis("liver", organ_label=1, tumor_label=2, size=SIZE)
    t.set_random_state(seed=0)
    seeds = []
    for _ in range(10):
        img = MetaTensor(torch.from_numpy(sc["image"])[None], affine=affine)
        lab = MetaTensor(torch.from_numpy(sc["label"])[None], affine=affine)
        out_img, out_lab = t(img, lab)
        label = _np(out_lab)[0]
        assert (label[sc["lesion"]] == 2).all()
        assert not touches(sc, (label == 2) & ~sc["lesion"])
        assert out_img.meta["synthgen_plan"] == plan_with_the_lesion(sc, t._seed)
        seeds.append(t._seed)
    assert touching_without_the_mask(sc, seeds) >= 1
