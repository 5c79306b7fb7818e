"""synthgen.torch: SyntheticTumorDataset and TumorSynthesisWrapper under real DataLoaders.

Seeding (distinct tumors per worker, the same stream for any worker count, epochs and global
seeds), the shared-memory epoch reaching persistent spawn/forkserver workers, independence
from the global NumPy/torch RNGs, collation, plans that re-render the samples, the plain
loader (``synthesize=False``, ``prob=0``), pickling, no CUDA, and the map-style wrapper.

Small AbdomenAtlas 1.x phantoms (``tests/_datasets.py``, 80 x 64 x 56 voxels) and 32^3
patches keep every loader run well under a second of synthesis; the cost is worker start-up.
Helpers live at module level so that spawn/forkserver workers can unpickle them.
"""

# ruff: noqa: E402
from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import nibabel as nib
from _datasets import write_dataset
from _lesion_scene import (
    SIZE,
    lesion_scene,
    plan_with_the_lesion,
    touches,
    touching_without_the_mask,
)
from torch.utils.data import DataLoader, Dataset, get_worker_info

import synthgen
from synthgen._hash import seed_of
from synthgen.augment import affine_for
from synthgen.layouts import discover
from synthgen.presets import without_extras
from synthgen.torch import SyntheticTumorDataset, TumorSynthesisWrapper, plan_of

PATCH = (32, 32, 32)
N_CASES = 4
PER_CASE = 2
N = N_CASES * PER_CASE
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------
# helpers (module level: they must pickle into spawn/forkserver workers)
# --------------------------------------------------------------------------------------


def tag_worker(sample: dict[str, Any]) -> dict[str, Any]:
    """collate_fn for ``batch_size=None``: runs in the worker, records which one made it."""
    info = get_worker_info()
    out = dict(sample)
    out["worker"] = -1 if info is None else info.id
    out["pid"] = os.getpid()
    return out


def digest(a: Any) -> str:
    arr = a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    h = hashlib.sha1(str(arr.dtype).encode() + str(arr.shape).encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def key(s: dict[str, Any]) -> tuple:
    """Everything that identifies a sample's content."""
    return (
        s["case"],
        int(s["position"]),
        int(s["seed"]),
        digest(s["image"]),
        digest(s["label"]),
        s["plan"],
    )


def keys(ds: Any, **loader_kw: Any) -> list[tuple]:
    loader = DataLoader(ds, batch_size=None, **loader_kw)
    return [key(s) for s in loader]


def make_ds(cases: list, **kw: Any) -> SyntheticTumorDataset:
    kw.setdefault("samples_per_case", PER_CASE)
    kw.setdefault("patch_size", PATCH)
    return SyntheticTumorDataset(cases, "liver", **kw)


def read_case(case: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, liver mask, affine) straight from the files."""
    ct = nib.load(str(case.ct))
    image = np.asarray(ct.dataobj)
    liver = np.asarray(nib.load(str(case.organs["liver"][0].path)).dataobj) > 0.5
    return image, liver, np.asarray(ct.affine, dtype=np.float64)


class DictDataset(Dataset):
    """A map-style dataset of ``{"image": (C,X,Y,Z) float32 tensor, "label": (1,X,Y,Z) uint8
    tensor, "affine": 4x4 ndarray | None}`` items, returned as they are stored."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


# --------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> list:
    root = write_dataset(tmp_path_factory.mktemp("torchds") / "atlas", "atlas1", N_CASES)
    _, found = discover(root, ["liver"])
    assert len(found) == N_CASES
    return found


@pytest.fixture(scope="module")
def reference(cases: list) -> Any:
    """``reference(epoch, seed=0)``: the single-process (num_workers=0) keys, cached."""
    cache: dict[tuple[int, int], list[tuple]] = {}

    def get(epoch: int, seed: int = 0) -> list[tuple]:
        if (epoch, seed) not in cache:
            ds = make_ds(cases, seed=seed)
            ds.set_epoch(epoch)
            cache[(epoch, seed)] = keys(ds, num_workers=0)
        return cache[(epoch, seed)]

    return get


@pytest.fixture(scope="module")
def dict_items(cases: list) -> list[dict[str, Any]]:
    items = []
    for c in cases[:3]:
        image, liver, affine = read_case(c)
        items.append(
            {
                "image": torch.from_numpy(image.astype(np.float32))[None],
                "label": torch.from_numpy(liver.astype(np.uint8))[None],
                "affine": affine,
            }
        )
    return items


# --------------------------------------------------------------------------------------
# SyntheticTumorDataset
# --------------------------------------------------------------------------------------


def test_reference_stream_is_sane(cases: list, reference: Any) -> None:
    ref = reference(0)
    assert len(ref) == N
    assert sorted(k[1] for k in ref) == list(range(N))
    assert {k[0] for k in ref} == {c.case_id for c in cases}
    assert len({k[2] for k in ref}) == N, "duplicated seeds within an epoch"
    assert all(k[5] for k in ref), "prob=1: every sample has a plan"
    assert len({k[3] for k in ref}) == N, "two samples with the same image"


def test_two_workers_distinct_tumors_same_stream(cases: list, reference: Any) -> None:
    ds = make_ds(cases, seed=0)
    loader = DataLoader(ds, batch_size=None, num_workers=2, collate_fn=tag_worker)
    runs = []
    for _ in range(2):  # two runs with the same seed (fresh workers each time)
        out = list(loader)
        assert len(out) == N
        assert {s["worker"] for s in out} == {0, 1}
        assert len({s["pid"] for s in out} - {os.getpid()}) == 2
        by_worker = {w: [s for s in out if s["worker"] == w] for w in (0, 1)}
        for w, ss in by_worker.items():  # sharded by position
            assert sorted(int(s["position"]) for s in ss) == list(range(w, N, 2))
        seeds = [{int(s["seed"]) for s in by_worker[w]} for w in (0, 1)]
        assert not seeds[0] & seeds[1]
        plans = [{s["plan"] for s in by_worker[w]} for w in (0, 1)]
        assert not plans[0] & plans[1]
        assert len({int(s["seed"]) for s in out}) == N
        runs.append([key(s) for s in out])
    assert set(runs[0]) == set(runs[1]) == set(reference(0))
    # DataLoader interleaves iterable workers round-robin: the very same order as in-process
    assert runs[0] == reference(0)
    # a fresh dataset object with the same seed: same stream
    assert set(keys(make_ds(cases, seed=0), num_workers=2)) == set(reference(0))


def test_epoch_and_seed_change_samples(cases: list, reference: Any) -> None:
    e0, e1, s1 = reference(0), reference(1), reference(0, seed=1)
    for other in (e1, s1):
        assert not {k[2] for k in e0} & {k[2] for k in other}  # no seed in common
        assert not {k[3] for k in e0} & {k[3] for k in other}  # nor an image
        assert sorted(k[0] for k in other) == sorted(k[0] for k in e0)  # same cases
    ds = make_ds(cases, seed=0)
    ds.set_epoch(1)
    assert ds.epoch == 1
    assert keys(ds) == e1
    ds.set_epoch(0)  # back to an earlier epoch: the same samples again
    assert keys(ds) == e0


@pytest.mark.parametrize("context", ["spawn", "forkserver"])
def test_persistent_workers_see_set_epoch(cases: list, reference: Any, context: str) -> None:
    ds = make_ds(cases, seed=0)
    loader = DataLoader(
        ds,
        batch_size=None,
        num_workers=2,
        persistent_workers=True,
        multiprocessing_context=context,
        collate_fn=tag_worker,
    )
    try:
        ds.set_epoch(0)
        first = list(loader)
        ds.set_epoch(1)
        second = list(loader)
        ds.set_epoch(0)
        third = list(loader)
    finally:
        it = loader._iterator
        if it is not None:
            it._shutdown_workers()
    pids = [{s["pid"] for s in run} for run in (first, second, third)]
    assert pids[0] == pids[1] == pids[2], "workers were not persistent"
    assert os.getpid() not in pids[0] and len(pids[0]) == 2
    assert {int(s["epoch"]) for s in first} == {0}
    assert {int(s["epoch"]) for s in second} == {1}, "set_epoch did not reach the workers"
    assert [key(s) for s in first] == reference(0)
    assert [key(s) for s in second] == reference(1)
    assert [key(s) for s in third] == reference(0)


def test_global_rngs_are_neither_read_nor_advanced(cases: list, reference: Any) -> None:
    saved = (np.random.get_state(), torch.get_rng_state(), random.getstate())  # noqa: NPY002
    try:
        ds = make_ds(cases, seed=0)
        runs = []
        for g in (1, 12345):
            np.random.seed(g)  # noqa: NPY002
            torch.manual_seed(g)
            random.seed(g)
            np_state = np.random.get_state()  # noqa: NPY002
            torch_state = torch.get_rng_state().clone()
            py_state = random.getstate()
            # iterate the dataset itself: a DataLoader draws its base seed from torch's RNG
            runs.append([key(s) for s in ds])
            after = np.random.get_state()  # noqa: NPY002
            assert np.array_equal(np_state[1], after[1]) and np_state[2] == after[2]
            assert torch.equal(torch_state, torch.get_rng_state())
            assert py_state == random.getstate()
        assert runs[0] == runs[1] == reference(0)
        np.random.seed(99)  # noqa: NPY002
        torch.manual_seed(99)
        assert keys(ds, num_workers=0) == reference(0)
    finally:
        np.random.set_state(saved[0])  # noqa: NPY002
        torch.set_rng_state(saved[1])
        random.setstate(saved[2])


def test_batches_collate_and_plans_rerender(cases: list) -> None:
    ds = make_ds(cases, seed=0)
    batches = list(DataLoader(ds, batch_size=2, num_workers=0))
    assert len(batches) == N // 2
    by_id = {c.case_id: c for c in cases}
    full = {cid: read_case(c) for cid, c in by_id.items()}
    for b in batches:
        assert b["image"].shape == (2, 1, *PATCH) and b["image"].dtype == torch.float32
        assert b["label"].shape == (2, 1, *PATCH) and b["label"].dtype == torch.uint8
        assert b["origin"].shape == (2, 3) and b["origin"].dtype == torch.int64
        assert b["spacing"].shape == (2, 3) and b["spacing"].dtype == torch.float64
        assert b["seed"].shape == (2,)
        assert isinstance(b["plan"], list) and len(b["plan"]) == 2
        assert isinstance(b["case"], list) and len(b["case"]) == 2
        for j in range(2):
            text = b["plan"][j]
            assert isinstance(text, str)
            plan = plan_of({"plan": text})
            assert isinstance(plan, synthgen.Plan)
            assert plan.to_json() == text  # lossless round trip
            assert json.loads(text) == json.loads(synthgen.Plan.from_json(text).to_json())
            # the patch is the plan rendered into the case, cropped at ``origin``
            image, liver, affine = full[b["case"][j]]
            np.testing.assert_allclose(b["spacing"][j].numpy(), np.abs(np.diag(affine)[:3]))
            assert tuple(plan.shape) == image.shape
            res = synthgen.render(plan, image, liver, affine=affine)
            fill = min(-1024, int(image.min()))
            pad = max(PATCH)
            vol = np.pad(res.image, pad, constant_values=fill)
            lab = np.pad(res.label, pad, constant_values=0)
            o = b["origin"][j].numpy() + pad
            sl = tuple(slice(int(a), int(a) + s) for a, s in zip(o, PATCH, strict=True))
            assert np.array_equal(b["image"][j, 0].numpy(), vol[sl])
            assert np.array_equal(b["label"][j, 0].numpy(), lab[sl])
            assert (b["label"][j] == 2).any(), "the patch is centred near a tumor"
    assert plan_of({"plan": ""}) is None


def test_full_volume_sample_is_the_rendered_plan(cases: list) -> None:
    ds = make_ds(cases[:2], seed=3, samples_per_case=1, patch_size=None)
    out = list(ds)
    assert len(out) == 2
    for s in out:
        image, liver, affine = read_case(next(c for c in cases if c.case_id == s["case"]))
        assert s["image"].shape == (1, *image.shape)
        assert tuple(s["origin"].tolist()) == (0, 0, 0)
        plan = plan_of(s)
        assert isinstance(plan, synthgen.Plan) and plan.tumors
        assert plan.seed == int(s["seed"])
        res = synthgen.render(plan, image, liver, affine=affine)
        assert np.array_equal(s["image"][0].numpy(), res.image)
        assert np.array_equal(s["label"][0].numpy(), res.label)
        assert not np.array_equal(res.image, image)
        tumor = s["label"][0].numpy() == 2
        organ = np.asarray(res.organ_mask)  # warped by the preset's mass effect, if any
        assert tumor.any() and not (tumor & ~organ).any(), "tumor voxels outside the organ"


def test_plain_loader_synthesize_false_and_prob_zero(cases: list, reference: Any) -> None:
    order = [(k[0], k[1], k[2]) for k in reference(0)]
    files = {c.case_id: read_case(c) for c in cases}
    for kw in ({"synthesize": False}, {"prob": 0.0}):
        ds = make_ds(cases, seed=0, patch_size=None, **kw)
        out = list(ds)
        assert [(s["case"], int(s["position"]), int(s["seed"])) for s in out] == order
        for s in out:
            image, liver, _ = files[s["case"]]
            assert s["plan"] == "" and plan_of(s) is None
            assert s["image"].dtype == torch.float32
            assert np.array_equal(s["image"][0].numpy(), image)
            assert np.array_equal(s["label"][0].numpy(), liver.astype(np.uint8))
            assert not (s["label"] == 2).any()
    # patches without tumors are centred on an organ voxel, and untouched crops
    for s in make_ds(cases, seed=0, synthesize=False):
        assert s["plan"] == "" and not (s["label"] == 2).any()
        assert int(s["label"][0, 16, 16, 16]) == 1
        image = files[s["case"]][0]
        o = s["origin"].numpy()
        assert o.min() >= -16 and (o + 16 < np.array(image.shape)).all()
    # dtype: float32 by default, None keeps the file's
    (s,) = list(make_ds(cases[:1], seed=0, patch_size=None, samples_per_case=1))
    assert s["image"].dtype == torch.float32 and s["label"].dtype == torch.uint8
    ds = make_ds(cases[:1], seed=0, patch_size=None, samples_per_case=1, dtype=None)
    (ref,) = list(ds)
    assert ref["image"].dtype == torch.int16
    assert np.array_equal(s["image"].numpy(), ref["image"].numpy().astype(np.float32))
    assert np.array_equal(s["label"].numpy(), ref["label"].numpy())


def test_dataset_pickles_with_its_epoch(cases: list, reference: Any) -> None:
    ds = make_ds(cases, seed=0)
    ds.set_epoch(1)
    for clone in (pickle.loads(pickle.dumps(ds)), copy.deepcopy(ds)):
        assert isinstance(clone, SyntheticTumorDataset)
        assert clone.epoch == 1 and len(clone) == N
        assert keys(clone) == reference(1)
        clone.set_epoch(7)  # an independent copy, not an alias of the parent's counter
        assert ds.epoch == 1
    assert "SyntheticTumorDataset(cases=4" in repr(ds)


def test_no_cuda_initialisation(cases: list) -> None:
    code = (
        "import sys, torch\n"
        "import synthgen.torch as st\n"
        "from synthgen.layouts import discover\n"
        "_, cases = discover(sys.argv[1], ['liver'])\n"
        "assert not torch.cuda.is_initialized()\n"
        "ds = st.SyntheticTumorDataset(cases[:1], 'liver', patch_size=(16, 16, 16))\n"
        "n = sum(1 for _ in ds)\n"
        "w = st.TumorSynthesisWrapper([{'image': torch.zeros(8, 8, 8),\n"
        "    'label': torch.zeros(8, 8, 8, dtype=torch.uint8)}], 'liver', spacing=(1, 1, 1))\n"
        "w[0]\n"
        "print('RESULT', n, torch.cuda.is_initialized())\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(
        [sys.executable, "-c", code, str(cases[0].ct.parent.parent)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert "RESULT 1 False" in r.stdout
    # and in this process too (nothing above touched CUDA)
    assert not torch.cuda.is_initialized()


# --------------------------------------------------------------------------------------
# regressions of bugs found by these tests (fixed)
# --------------------------------------------------------------------------------------


def test_bool_organ_mask_label_gets_tumor_label(cases: list) -> None:
    image, liver, affine = read_case(cases[0])
    ds = SyntheticTumorDataset([(image, liver, affine)], "liver", seed=0)
    (s,) = list(ds)
    assert s["plan"] != ""
    assert (s["label"] == 2).any()


def test_patch_centre_is_organ_for_any_memory_layout() -> None:
    """Samples without tumors are centred on an organ voxel, whatever the label's memory
    layout, for compact organs (rejection in the box) and sparse ones (the fallback)."""
    shape = (80, 64, 56)
    image = np.zeros(shape, np.int16)
    compact = np.zeros(shape, np.uint8)
    compact[10:13, 40:43, 5:8] = 1
    sparse = np.zeros(shape, np.uint8)
    sparse[0, 0, 0] = sparse[79, 63, 55] = 1  # 2 voxels in a box of the whole volume
    for lab in (compact, sparse):
        # same values, axes 0 and 1 swapped in memory (e.g. a transposed load)
        lab_t = np.ascontiguousarray(lab.transpose(1, 0, 2)).transpose(1, 0, 2)
        assert not lab_t.flags.c_contiguous and not lab_t.flags.f_contiguous
        for arr in (lab, np.asfortranarray(lab), lab_t):
            ds = SyntheticTumorDataset(
                [(image, arr, affine_for((1.0, 1.0, 1.0)))],
                "liver",
                synthesize=False,
                samples_per_case=3,
                patch_size=(9, 9, 9),
            )
            for s in ds:
                assert int(s["label"][0, 4, 4, 4]) == 1
                assert s["image"].shape == (1, 9, 9, 9)
    # no organ at all: a patch anywhere, still full-size
    empty = SyntheticTumorDataset(
        [(image, np.zeros(shape, np.uint8), affine_for((1.0, 1.0, 1.0)))],
        "liver",
        patch_size=(9, 9, 9),
    )
    (s,) = list(empty)
    assert s["plan"] == "" and s["image"].shape == (1, 9, 9, 9)


def test_negative_seed(cases: list) -> None:
    ds = make_ds(cases[:1], seed=-1, samples_per_case=1)
    assert len(list(ds)) == 1


def test_unsigned_image_patches(cases: list) -> None:
    image, liver, affine = read_case(cases[0])
    img_u16 = (image.astype(np.int32) + 1024).clip(0).astype(np.uint16)
    ds = SyntheticTumorDataset(
        [(img_u16, liver.astype(np.uint8), affine)], "liver", patch_size=PATCH, dtype=None
    )
    (s,) = list(ds)
    assert s["image"].dtype == torch.uint16 and s["image"].shape == (1, *PATCH)


def test_cases_without_the_organ_are_left_out(tmp_path: Path) -> None:
    """A discovered case without a mask of the organ is left out at construction (noted in
    ``skipped``, with a warning); one whose mask is empty or tiny yields untouched samples.
    Length, order and seeds of the others do not depend on the worker count."""
    root = write_dataset(tmp_path / "atlas", "atlas1", 4)
    (root / "BDMAP_00000001" / "segmentations" / "liver.nii.gz").unlink()
    for k, n in ((2, 0), (3, 3)):  # an empty liver mask, a 27-voxel one
        path = root / f"BDMAP_{k:08d}" / "segmentations" / "liver.nii.gz"
        m = nib.load(str(path))
        mask = np.zeros(m.shape, np.uint8)
        mask[40 : 40 + n, 30 : 30 + n, 28 : 28 + n] = 1
        nib.save(nib.Nifti1Image(mask, m.affine), str(path))
    _, found = discover(root, ["liver"])
    assert len(found) == 4 and "liver" in found[1].missing
    with pytest.warns(UserWarning, match="BDMAP_00000001: no liver mask"):
        ds = make_ds(found, seed=0)
    with pytest.warns(UserWarning, match="1 of 4 cases have no 'liver' mask"):
        whole = make_ds(found, seed=0, patch_size=None)
    assert ds.skipped == {"BDMAP_00000001": found[1].missing["liver"]}
    assert len(ds) == 3 * PER_CASE
    ref = keys(ds, num_workers=0)
    assert keys(ds, num_workers=2) == ref
    assert keys(make_ds([found[0], found[2], found[3]], seed=0)) == ref
    assert {k[0] for k in ref} == {"BDMAP_00000000", "BDMAP_00000002", "BDMAP_00000003"}
    for s in whole:
        image, liver, _ = read_case(next(c for c in found if c.case_id == s["case"]))
        if s["case"] == "BDMAP_00000000":
            assert s["plan"] != ""
        else:
            assert s["plan"] == ""
            assert np.array_equal(s["image"][0].numpy(), image)
            assert np.array_equal(s["label"][0].numpy(), liver.astype(np.uint8))
    with pytest.raises(ValueError, match="no case has a mask of 'liver'"):
        make_ds(found[1:2])


def test_default_dtype_is_float32_whatever_the_files(cases: list) -> None:
    """int16 and float32 cases mixed: every batch is float32 in every epoch, the same bytes
    for batch sizes 1 and 2; ``dtype=None`` keeps each file's dtype, with the same values."""
    mixed = []
    for k, c in enumerate(cases[:2]):
        image, liver, affine = read_case(c)
        assert image.dtype == np.int16
        image = image.astype(np.float32) if k else image
        mixed.append({"id": c.case_id, "image": image, "label": liver, "affine": affine})
    ds = make_ds(mixed, seed=0)
    keep = make_ds(mixed, seed=0, dtype=None)
    for epoch in range(3):
        ds.set_epoch(epoch)
        keep.set_epoch(epoch)
        by_two = list(DataLoader(ds, batch_size=2))
        assert all(b["image"].dtype == torch.float32 for b in by_two)
        ones = [digest(b["image"][0]) for b in DataLoader(ds, batch_size=1)]
        assert ones == [digest(b["image"][j]) for b in by_two for j in range(2)]
        for s, k in zip(ds, keep, strict=True):
            want = torch.float32 if s["case"] == cases[1].case_id else torch.int16
            assert k["image"].dtype == want
            assert np.array_equal(s["image"].numpy(), k["image"].numpy().astype(np.float32))


# --------------------------------------------------------------------------------------
# TumorSynthesisWrapper
# --------------------------------------------------------------------------------------


def wrapper_key(item: dict[str, Any]) -> tuple:
    return (digest(item["image"]), digest(item["label"]), item["plan"])


def test_wrapper_outputs(dict_items: list) -> None:
    before = [{k: v.clone() for k, v in it.items() if torch.is_tensor(v)} for it in dict_items]
    base = DictDataset(dict_items)
    w = TumorSynthesisWrapper(base, "liver", seed=0)
    assert len(w) == len(base)
    for i in range(len(w)):
        out = w[i]
        src = dict_items[i]
        assert isinstance(out["image"], torch.Tensor) and out["image"].dtype == torch.float32
        assert isinstance(out["label"], torch.Tensor) and out["label"].dtype == torch.uint8
        assert out["image"].shape == src["image"].shape
        assert out["label"].shape == src["label"].shape
        assert isinstance(out["affine"], np.ndarray) and np.array_equal(
            out["affine"], src["affine"]
        )
        assert isinstance(plan_of(out), synthgen.Plan)
        tumor = out["label"] == 2
        assert tumor.any(), "label gains 2s"
        assert not (tumor & (src["label"] != 1)).any(), "2s only inside the organ"
        assert torch.equal(out["label"][~tumor], src["label"][~tumor])
        changed = out["image"] != src["image"]
        assert changed.any()
        assert not (changed & (src["label"] == 0)).any(), "image changed outside the organ"
        assert wrapper_key(w[i]) == wrapper_key(out), "same (seed, epoch, index): same item"
    for it, b in zip(dict_items, before, strict=True):  # inputs untouched
        for k, v in b.items():
            assert torch.equal(it[k], v), k
    w.set_epoch(1)
    e1 = [wrapper_key(w[i]) for i in range(len(w))]
    w.set_epoch(0)
    e0 = [wrapper_key(w[i]) for i in range(len(w))]
    assert all(a[2] != b[2] and a[0] != b[0] for a, b in zip(e0, e1, strict=True))
    other = TumorSynthesisWrapper(base, "liver", seed=1)
    assert all(wrapper_key(other[i]) != e0[i] for i in range(len(w)))
    # prob=0: nothing implanted
    none = TumorSynthesisWrapper(base, "liver", seed=0, prob=0.0)
    out = none[0]
    assert out["plan"] == "" and torch.equal(out["image"], dict_items[0]["image"])


def test_wrapper_reproducible_across_workers(dict_items: list) -> None:
    w = TumorSynthesisWrapper(DictDataset(dict_items), "liver", seed=5)
    w.set_epoch(2)
    direct = [wrapper_key(w[i]) for i in range(len(w))]
    single = [wrapper_key(s) for s in DataLoader(w, batch_size=None, num_workers=0)]
    multi = [
        wrapper_key(s)
        for s in DataLoader(w, batch_size=None, num_workers=2, multiprocessing_context="spawn")
    ]
    assert single == multi == direct
    w.set_epoch(3)
    assert [wrapper_key(s) for s in DataLoader(w, batch_size=None)] != direct


def test_wrapper_needs_an_affine_or_spacing(dict_items: list) -> None:
    items = [{k: v for k, v in it.items() if k != "affine"} for it in dict_items[:1]]
    with pytest.raises(ValueError, match="spacing"):
        TumorSynthesisWrapper(DictDataset(items), "liver")[0]
    items_none = [dict(items[0], affine=None)]
    with pytest.raises(ValueError, match="spacing"):
        TumorSynthesisWrapper(DictDataset(items_none), "liver")[0]
    sp = np.abs(np.diag(dict_items[0]["affine"])[:3])
    out = TumorSynthesisWrapper(DictDataset(items), "liver", spacing=tuple(sp))[0]
    assert (out["label"] == 2).any()
    with pytest.raises(ValueError, match="prob"):
        TumorSynthesisWrapper(DictDataset(items), "liver", prob=1.5)


def test_wrapper_refuses_unusable_data_instead_of_leaving_items_alone(dict_items: list) -> None:
    # A bad affine or NaN in the organ is the caller's error: it must not read as "organ too
    # small" (no tumors, silently, for the whole training run).
    item = dict_items[0]
    for affine, match in (
        (np.diag([5.0, 5.0, 6.0]), "4x4"),
        (np.diag([5.0, 0.0, 6.0, 1.0]), "positive and finite"),
    ):
        with pytest.raises(ValueError, match=match):
            TumorSynthesisWrapper(DictDataset([dict(item, affine=affine)]), "liver")[0]
    image = item["image"].clone()
    organ = np.argwhere(item["label"][0].numpy() == 1)
    image[(0, *organ[len(organ) // 2])] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        TumorSynthesisWrapper(DictDataset([dict(item, image=image)]), "liver")[0]


def test_wrapper_keeps_monai_metatensors_so_batches_collate(dict_items: list) -> None:
    # Items of a MONAI dataset are MetaTensors: a fired item must stay one (metadata kept),
    # or a batch of fired and unfired items fails MONAI's collation.
    monai_data = pytest.importorskip("monai.data")
    MetaTensor = monai_data.MetaTensor
    items = [
        {
            "image": MetaTensor(it["image"].clone(), affine=torch.as_tensor(it["affine"])),
            "label": MetaTensor(it["label"].clone(), affine=torch.as_tensor(it["affine"])),
            "affine": it["affine"],
        }
        for it in dict_items
    ]
    w = TumorSynthesisWrapper(DictDataset(items), "liver", prob=1.0)
    out = w[0]
    assert out["plan"] and (out["label"] == 2).any()
    for key in ("image", "label"):
        assert isinstance(out[key], MetaTensor)
        assert out[key].dtype == items[0][key].dtype
        np.testing.assert_allclose(out[key].affine.numpy(), items[0]["affine"])
    mixed = TumorSynthesisWrapper(DictDataset(items), "liver", prob=0.5, seed=3)
    fired = [bool(mixed[i]["plan"]) for i in range(len(items))]
    assert any(fired) and not all(fired)
    batch = next(iter(monai_data.DataLoader(mixed, batch_size=len(items))))
    assert isinstance(batch["image"], MetaTensor)
    # without an affine key or spacing=: the MetaTensors' own affine (it was an error asking
    # for spacing=, which also loses the orientation)
    bare = [{k: v for k, v in it.items() if k != "affine"} for it in items]
    got = TumorSynthesisWrapper(DictDataset(bare), "liver", prob=1.0)[0]
    assert got["plan"] == out["plan"]


def test_wrapper_multichannel_keeps_other_channels(dict_items: list) -> None:
    src = dict_items[0]
    extra = torch.linspace(-5.0, 5.0, src["image"].numel()).reshape(src["image"].shape)
    image = torch.cat([src["image"], extra], dim=0)  # (2, X, Y, Z)
    item = {"image": image, "label": src["label"], "affine": src["affine"]}
    # mass effect would warp channel 0 and the label only: refused for several channels
    with pytest.raises(ValueError, match="2 channels"):
        TumorSynthesisWrapper(DictDataset([item]), "liver", seed=0)[0]
    liver = without_extras("liver", keep=("vessels", "appearance"))
    out = TumorSynthesisWrapper(DictDataset([item]), liver, seed=0)[0]
    assert out["image"].shape == image.shape and out["image"].dtype == torch.float32
    assert not out["image"].is_cuda
    assert torch.equal(out["image"][1], extra[0]), "channel 1 must be untouched"
    assert not torch.equal(out["image"][0], src["image"][0])
    assert (out["label"] == 2).any()
    single = TumorSynthesisWrapper(DictDataset([dict(src)]), liver, seed=0)[0]
    assert torch.equal(out["image"][:1], single["image"])  # channel 0 as for one channel
    assert torch.equal(image[1], extra[0])  # the input was not modified


def test_samples_never_share_memory_with_the_caller_s_arrays(cases: list) -> None:
    """A float32 image given as an array, whole volumes, no tumor: the sample is a copy
    (writing to it leaves the caller's array alone)."""
    image, liver, affine = read_case(cases[0])
    img = image.astype(np.float32)
    for kw in ({"synthesize": False}, {"prob": 0.0}, {"dtype": None, "synthesize": False}):
        ds = SyntheticTumorDataset([(img, liver, affine)], "liver", patch_size=None, **kw)
        (s,) = list(ds)
        s["image"] += 5
        assert float(np.abs(img - image).max()) == 0.0, kw


def test_write_tumor_mask_into_a_tensor(cases: list) -> None:
    """A result's tumor voxels OR-ed into a caller's bool tensor (through its NumPy view)."""
    import synthgen

    image, liver, affine = read_case(cases[0])
    plan = synthgen.plan(image, liver, organ="liver", seed=1, affine=affine)
    res = synthgen.render(plan, image, liver)
    t = torch.zeros(image.shape, dtype=torch.bool)
    assert res.write_tumor_mask(t) is t
    assert np.array_equal(t.numpy(), res.tumor_mask) and res.tumor_mask.any()


def test_loader_masks_follow_the_batch_rules(tmp_path: Path) -> None:
    """The loader reads a case's organ mask as ``synthgen batch`` does: a label map without
    the organ's id fails naming its values, and a CT without orientation (sform and qform
    codes 0) takes an oriented mask of its shape voxel for voxel."""
    from synthgen._samples import SampleMaker

    root = write_dataset(tmp_path / "atlas", "atlas1", 2)
    seg0 = root / "BDMAP_00000000" / "segmentations" / "liver.nii.gz"
    m = nib.load(str(seg0))
    labels = np.asarray(m.dataobj).astype(np.uint8)
    labels[0, 0, 0] = 5  # a second label: a label map
    nib.save(nib.Nifti1Image(labels, m.affine), str(seg0))
    case1 = root / "BDMAP_00000001"
    ct = nib.load(str(case1 / "ct.nii.gz"))
    data = np.asarray(ct.dataobj)
    bare = nib.Nifti1Image(data, None)  # no orientation: sform and qform codes 0
    bare.header.set_zooms(ct.header.get_zooms())
    nib.save(bare, str(case1 / "ct.nii.gz"))
    liver = np.asarray(nib.load(str(case1 / "segmentations" / "liver.nii.gz")).dataobj)
    flipped = np.diag([*ct.header.get_zooms()[:3], 1.0])  # +x: the fallback affine has -x
    nib.save(nib.Nifti1Image(liver, flipped), str(case1 / "segmentations" / "liver.nii.gz"))
    _, found = discover(root, ["liver"])
    maker = SampleMaker.build(found, "liver")
    with pytest.raises(ValueError, match=r"several non-zero values \(1, 5\).*--label-id"):
        maker.sources[0].load()
    _, label, _ = maker.sources[1].load()
    assert np.array_equal(label != 0, liver != 0)


def test_loader_organ_from_the_rows_that_hold_its_ids(tmp_path: Path) -> None:
    """A kidney given by two CSV rows of one label map (ids 2 and 3) where id 2 is absent (a
    nephrectomy): the loader's organ is id 3's voxels, as the batch's, not nothing."""
    from synthgen._samples import SampleMaker

    root = write_dataset(tmp_path / "atlas", "atlas1", 1)
    case = root / "BDMAP_00000000"
    m = nib.load(str(case / "segmentations" / "liver.nii.gz"))
    liver = np.asarray(m.dataobj) != 0
    lab = np.where(liver, 3, 0).astype(np.uint8)  # (the liver standing in for a kidney)
    nib.save(nib.Nifti1Image(lab, m.affine), str(case / "labels.nii.gz"))
    sheet = tmp_path / "cases.csv"
    ct, labels = case / "ct.nii.gz", case / "labels.nii.gz"
    sheet.write_text(f"ct,mask,organ,label_id\n{ct},{labels},kidney,2\n{ct},{labels},kidney,3\n")
    _, found = discover(sheet, ["kidney"])
    (src,) = SampleMaker.build(found, "kidney").sources
    _, label, _ = src.load()
    assert np.array_equal(label != 0, liver)


def test_bfloat16_cpu_tensors_render_through_float32(cases: list) -> None:
    """NumPy has no bfloat16: a bfloat16 CPU tensor renders as its float32 values and the
    result is cast back (into ``out`` too)."""
    import synthgen

    image, liver, affine = read_case(cases[0])
    plan = synthgen.plan(image, liver, organ="liver-classic", seed=2, affine=affine)
    t = torch.from_numpy(image.astype(np.float32)).to(torch.bfloat16)
    m = torch.from_numpy(liver.astype(np.float32)).to(torch.bfloat16)
    ref = synthgen.render(plan, t.float().numpy(), liver)
    want = torch.from_numpy(ref.image).to(torch.bfloat16)
    res = synthgen.render(plan, t, m)
    assert res.image.dtype == torch.bfloat16 and torch.equal(res.image, want)
    out = t.clone()
    res = synthgen.render(plan, out, liver, out=out)
    assert res.image is out and torch.equal(out, want)
    assert np.array_equal(np.asarray(res.tumor_mask), ref.tumor_mask)


@pytest.mark.parametrize("dtype", [torch.int16, torch.float32, torch.float64, torch.bfloat16])
def test_synthesize_and_plan_take_cpu_tensors(cases: list, dtype: torch.dtype) -> None:
    """``synthgen.plan`` and ``synthesize`` on CPU tensors (as ``render`` already takes
    them) plan as on the NumPy values, and return tensors; the inputs are not modified.
    (Before: AttributeError 'torch.dtype' object has no attribute 'kind'.)"""
    import synthgen

    image, liver, affine = read_case(cases[0])
    t = torch.from_numpy(image.astype(np.float32)).to(dtype)
    # a transposed view of the mask: any memory layout
    m = torch.from_numpy(np.ascontiguousarray(liver.T)).permute(2, 1, 0)
    before = t.clone()
    values = t.float().numpy()  # what the engine reads (bfloat16 through float32)
    want = synthgen.plan(values, liver, organ="liver", seed=4, affine=affine)
    assert synthgen.plan(t, m, organ="liver", seed=4, affine=affine).to_json() == want.to_json()
    res = synthgen.synthesize(t, m, organ="liver", seed=4, affine=affine)
    assert res.plan.to_json() == want.to_json()
    assert isinstance(res.image, torch.Tensor) and res.image.dtype == dtype
    assert torch.equal(t, before)
    ref = synthgen.render(want, values, liver, affine=affine)
    assert np.array_equal(np.asarray(res.tumor_mask), ref.tumor_mask)


@pytest.mark.parametrize("as_tensor", [True, False])
def test_wrapper_bool_label_keeps_the_tumor_label(dict_items: list, as_tensor: bool) -> None:
    """A boolean organ mask as the items' label comes back uint8 with the tumor label, as
    from ``implant_tumors`` (before: cast back to bool, which made every tumor voxel
    "organ", the tumor label silently lost)."""
    src = dict_items[0]
    mask = src["label"][0].numpy() == 1
    item = {"image": src["image"][0], "label": torch.from_numpy(mask) if as_tensor else mask}
    item["affine"] = src["affine"]
    # channel-first items too (1, X, Y, Z): their label was still cast back to bool
    chan = {"image": src["image"], "label": item["label"][None], "affine": src["affine"]}
    for it in (item, chan):
        out = TumorSynthesisWrapper(DictDataset([it]), "liver", seed=0)[0]
        lab = np.asarray(out["label"])
        assert out["plan"] != "" and lab.dtype == np.uint8
        assert isinstance(out["label"], torch.Tensor) == as_tensor
        lab = lab[0] if it is chan else lab
        tumor = lab == 2
        assert tumor.any() and np.array_equal(lab != 0, mask | tumor)
        assert np.array_equal(tumor, np.asarray(plan_mask(out, item)))


def plan_mask(out: dict[str, Any], item: dict[str, Any]) -> np.ndarray:
    """The tumor mask of ``out``'s plan rendered into ``item``'s image."""
    image = np.asarray(item["image"])
    mask = np.asarray(item["label"]).astype(bool)
    return synthgen.render(plan_of(out), image, mask, affine=item["affine"]).tumor_mask


def test_wrapper_bfloat16_items_render_through_float32(dict_items: list) -> None:
    """bfloat16 image tensors (NumPy has none) render as their float32 values and come
    back bfloat16 (before: TypeError, unsupported ScalarType BFloat16)."""
    src = dict_items[0]
    half = {**src, "image": src["image"].to(torch.bfloat16)}
    full = {**src, "image": half["image"].float()}
    out = TumorSynthesisWrapper(DictDataset([half]), "liver", seed=0)[0]
    ref = TumorSynthesisWrapper(DictDataset([full]), "liver", seed=0)[0]
    assert out["image"].dtype == torch.bfloat16 and out["plan"] == ref["plan"] != ""
    assert torch.equal(out["image"], ref["image"].to(torch.bfloat16))
    assert torch.equal(out["label"], ref["label"])


@pytest.mark.parametrize(
    "kw", [{"synthesize": False}, {"prob": 0.0}, {"dtype": None, "synthesize": False}]
)
def test_whole_volume_samples_of_c_order_arrays_are_copies(cases: list, kw: dict) -> None:
    """C-order arrays (nibabel's are Fortran order, which a contiguous copy hid), whole
    volumes, no tumor: writing into a sample's image or label leaves the caller's arrays
    (and so the later samples of the case) alone. (Before: both were views of them.)"""
    image, liver, affine = read_case(cases[0])
    img = np.ascontiguousarray(image, dtype=np.float32)
    lab = np.ascontiguousarray(liver, dtype=np.uint8)
    img0, lab0 = img.copy(), lab.copy()
    ds = SyntheticTumorDataset([(img, lab, affine)], "liver", patch_size=None, **kw)
    (s,) = list(ds)
    s["image"] += 5
    s["label"] += 7
    assert np.array_equal(img, img0) and np.array_equal(lab, lab0)
    (again,) = list(ds)
    assert torch.equal(again["label"][0], torch.from_numpy(lab0))


def test_bool_mask_labels_are_uint8_whether_a_sample_fires_or_not(
    cases: list, dict_items: list
) -> None:
    """A boolean organ mask as the label: every sample's label is uint8, with tumors or
    without (before: uint8 when a sample fired, bool when not, so one loader gave labels of
    two dtypes)."""
    image, liver, affine = read_case(cases[0])
    srcs = [{"image": image, "label": liver, "affine": affine, "id": f"c{k}"} for k in range(6)]
    samples = list(SyntheticTumorDataset(srcs, "liver", prob=0.5, seed=1, patch_size=PATCH))
    assert {s["plan"] != "" for s in samples} == {True, False}
    assert {s["label"].dtype for s in samples} == {torch.uint8}
    (plain,) = list(SyntheticTumorDataset(srcs[:1], "liver", synthesize=False))
    assert plain["label"].dtype == torch.uint8
    assert np.array_equal(plain["label"][0].numpy(), liver.astype(np.uint8))
    src = dict_items[0]
    mask = src["label"][0] == 1
    for lab in (mask, mask.numpy()):
        item = {"image": src["image"][0], "label": lab, "affine": src["affine"]}
        out = TumorSynthesisWrapper(DictDataset([item]), "liver", prob=0.0)[0]
        assert out["plan"] == "" and np.asarray(out["label"]).dtype == np.uint8
        assert type(out["label"]) is type(lab)
        assert np.array_equal(np.asarray(out["label"]), mask.numpy().astype(np.uint8))


# --------------------------------------------------------------------------------------
# distributed training (DDP): ranks share an epoch as DistributedSampler shares indices
# --------------------------------------------------------------------------------------


def test_ranks_split_an_epoch_like_distributed_sampler(cases: list, reference: Any) -> None:
    """Rank r of 4 makes positions r, r + 4 of the epoch: the ranks' samples are disjoint and
    together the single-process run with the same seed (before: every rank made every sample,
    the same tumors on each GPU). Within a rank, its DataLoader workers share them out."""
    ref = reference(0)
    by_rank = []
    for r in range(4):
        ds = make_ds(cases, seed=0, rank=r, world_size=4)
        assert (ds.rank, ds.world_size, len(ds)) == (r, 4, N // 4)
        got = keys(ds)
        assert [k[1] for k in got] == [r, r + 4]
        by_rank.append(got)
    assert sorted(k for got in by_rank for k in got) == sorted(ref)
    # a rank's workers: the rank's samples, each once, in the in-process order
    ds = make_ds(cases, seed=0, rank=1, world_size=4)
    assert keys(ds, num_workers=2) == by_rank[1]
    # an epoch that does not divide: every rank as many samples, the last wrapping around
    # to the first positions (as DistributedSampler pads), or drop_last leaving the tail out
    for drop_last, per in ((False, 3), (True, 2)):
        share = []
        for r in range(3):
            kw = {"rank": r, "world_size": 3, "synthesize": False, "drop_last": drop_last}
            ds = make_ds(cases, seed=0, **kw)
            assert len(ds) == per
            share.append([(s["case"], int(s["position"]), int(s["seed"])) for s in ds])
        flat = [k for s in share for k in s]
        want = {(k[0], k[1], k[2]) for k in ref if drop_last is False or k[1] < 6}
        assert set(flat) == want and len(flat) == 3 * per
        if not drop_last:
            assert share[2][-1] == share[0][0], "the wrapped sample is the first position's"
    with pytest.raises(ValueError, match="rank"):
        make_ds(cases, rank=4, world_size=4)
    with pytest.raises(ValueError, match="world_size"):
        make_ds(cases, rank=1)  # no process group to read the world size from


def test_rank_and_world_size_come_from_torch_distributed(
    cases: list, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without rank=/world_size=, an initialised process group decides (torchrun); a dataset
    built before init_process_group reads it when iterated, and when pickled for a spawned
    worker (which has no group) hands the parent's rank over."""
    import torch.distributed as dist

    before = make_ds(cases, seed=0, synthesize=False)  # no group yet
    assert (before.rank, before.world_size, len(before)) == (0, 1, N)
    with monkeypatch.context() as m:  # rank 1 of 4, as torchrun would make it
        m.setattr(dist, "is_available", lambda: True)
        m.setattr(dist, "is_initialized", lambda: True)
        m.setattr(dist, "get_rank", lambda group=None: 1)
        m.setattr(dist, "get_world_size", lambda group=None: 4)
        ds = make_ds(cases, seed=0, synthesize=False)
        assert (ds.rank, ds.world_size, len(ds)) == (1, 4, N // 4)
        assert [int(s["position"]) for s in ds] == [1, 5]
        assert [int(s["position"]) for s in before] == [1, 5]
        pickled = pickle.dumps(before)
        explicit = make_ds(cases, seed=0, synthesize=False, rank=3)  # world size: the group's
        assert (explicit.rank, explicit.world_size) == (3, 4)
    assert (ds.rank, ds.world_size) == (1, 4), "read when built: kept"
    assert (before.rank, before.world_size) == (0, 1), "read when used: the group is gone"
    assert pickle.loads(pickled).rank == 1 and len(pickle.loads(pickled)) == N // 4
    # a real (gloo, one process) group: the same calls, rank 0 of 1
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ds = make_ds(cases, seed=0, synthesize=False)
        assert (ds.rank, ds.world_size, len(ds)) == (0, 1, N)
    finally:
        dist.destroy_process_group()


def test_wrapper_under_distributed_sampler(dict_items: list) -> None:
    """The map-style wrapper needs nothing of its own: item i's seed is f(seed, epoch, i),
    whoever loads it, so DistributedSampler's ranks get disjoint items whose union is the
    single-process epoch (the padded index repeats an identical item)."""
    from torch.utils.data import DistributedSampler

    w = TumorSynthesisWrapper(DictDataset(dict_items), "liver", seed=3)
    w.set_epoch(1)
    single = [wrapper_key(w[i]) for i in range(len(w))]
    assert len(set(single)) == len(w)
    got = []
    for r in range(2):
        sampler = DistributedSampler(w, num_replicas=2, rank=r, shuffle=True, seed=0)
        sampler.set_epoch(1)
        got.append([wrapper_key(s) for s in DataLoader(w, batch_size=None, sampler=sampler)])
    assert len(got[0]) == len(got[1]) == 2
    assert set(got[0]) | set(got[1]) == set(single)
    assert len(set(got[0]) & set(got[1])) <= 1  # 3 items on 2 ranks: one padded repeat


# --------------------------------------------------------------------------------------
# existing lesions: kept clear of, as synthgen batch keeps a case's lesion masks
# --------------------------------------------------------------------------------------


def test_loader_keeps_tumors_off_existing_lesions(tmp_path: Path) -> None:
    """A case whose lesion fills most of the organ: the loader passes it to planning as
    ``lesion_mask``, so no synthetic tumor touches it (before: it was only written into the
    label, and tumors were planned against it). Both a label map's tumor-label voxels (MSD's
    "cancer") and a layouts.Case's lesion mask (AbdomenAtlas ``liver_lesion``)."""
    sc = lesion_scene()
    arrays = {"image": sc["image"], "label": sc["label"], "affine": sc["affine"], "id": "msd"}
    case_dir = tmp_path / "atlas" / "BDMAP_00000000"
    seg = case_dir / "segmentations"
    seg.mkdir(parents=True)
    box = (sc["label"] > 0).astype(np.uint8)  # AbdomenAtlas: the liver mask holds its lesions
    for name, a in (
        ("ct", sc["image"]),
        ("segmentations/liver", box),
        ("segmentations/liver_lesion", sc["lesion"].astype(np.uint8)),
    ):
        nib.save(nib.Nifti1Image(a, sc["affine"]), str(case_dir / f"{name}.nii.gz"))  # fmt: skip
    _, atlas = discover(tmp_path / "atlas", ["liver"])
    assert atlas[0].lesions.get("liver")
    seeds = []
    for cases, tumor_label in (([arrays], 2), (atlas, 3)):
        ds = SyntheticTumorDataset(
            cases, "liver", size=SIZE, samples_per_case=6, patch_size=None, dtype=None,
            tumor_label=tumor_label,
        )  # fmt: skip
        for s in ds:
            label = s["label"][0].numpy()
            # the existing lesion stays labelled, with the loader's tumor label (an
            # AbdomenAtlas lesion mask was written as 2 whatever the tumor label)
            assert (label[sc["lesion"]] == tumor_label).all()
            tumor = (label == tumor_label) & ~sc["lesion"]
            assert not touches(sc, tumor), f"a tumor of sample {s['position']} touches it"
            assert s["plan"] == plan_with_the_lesion(sc, int(s["seed"]))
            seeds.append(int(s["seed"]))
    assert touching_without_the_mask(sc, seeds) >= 2


def test_wrapper_keeps_tumors_off_existing_lesions() -> None:
    """The wrapper's items: the label map's tumor-label voxels are the existing lesions."""
    sc = lesion_scene()
    item = {
        "image": torch.from_numpy(sc["image"])[None],
        "label": torch.from_numpy(sc["label"])[None],
        "affine": sc["affine"],
    }
    w = TumorSynthesisWrapper(DictDataset([item] * 6), "liver", size=SIZE)
    seeds = [seed_of(w.seed, "item", 0, i) for i in range(len(w))]
    for i, seed in enumerate(seeds):
        out = w[i]
        assert not touches(sc, (out["label"][0].numpy() == 2) & ~sc["lesion"])
        assert out["plan"] == plan_with_the_lesion(sc, seed)
    assert touching_without_the_mask(sc, seeds) >= 1
