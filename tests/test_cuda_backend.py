"""The CUDA backend against the CPU path.

Every test runs the backend's driver (``synthgen._cuda``) twice over: on the host stand-in
(``tests/_cuda_emu.py``: the same CUDA C sources compiled for the CPU, NumPy as the array
module), which needs no GPU and runs in CI, and on a real GPU through CuPy
(``@pytest.mark.gpu``, skipped where there is none). The acceptance bar is the issue's: tumor
masks agree on at least 99.9% of the tumor's voxels, image values differ by at most 1 HU and
by at most 0.05 HU on average inside the tumor boxes. The reference is the CPU engine
(:func:`synthgen.rendering.render`: the plan's tumors without the preset's mass effect, which
is a warp applied before the engine on either backend).
"""

from __future__ import annotations

import functools
import itertools
import math
import pickle
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from _cuda_emu import KERNELS, DeviceArray, HostBackend, gpu_backend, signatures, to_device

import synthgen
from synthgen import _cpu_kernels as k
from synthgen import _cuda, _segments, rendering
from synthgen._device import DeviceError, array_kind, parse_device, resolve_device
from synthgen._seg_tables import CHAINS_B, chain_schedules_nb, schedules_nb
from synthgen.presets import load_preset

ORGANS = [
    ("liver-classic", "liver", "mix"),
    ("liver-classic", "liver", "large"),
    ("liver", "liver", None),
    ("pancreas", "pancreas", None),
    ("kidney", "kidney_left", "large"),
    ("colon", "colon", None),
    ("esophagus", "esophagus", None),
    ("uterus", "uterus", None),
]


def _count_downloads(be, monkeypatch) -> list[int]:
    """The bytes of each download ``be`` makes from now on (the list grows)."""
    sizes: list[int] = []
    download = be.download

    def counted(d):
        host = download(d)
        sizes.append(host.nbytes)
        return host

    monkeypatch.setattr(be, "download", counted)
    return sizes


@pytest.fixture(scope="module")
def emu(tmp_path_factory) -> HostBackend:
    try:
        return HostBackend(tmp_path_factory.mktemp("cuda-emu"))
    except RuntimeError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def emu_blocks(tmp_path_factory) -> HostBackend:
    """The stand-in with many blocks per segment, as on a GPU (at most 4 elements a block,
    64 blocks a segment: longer segments loop), each block one thread, the blocks of a
    launch run in a shuffled order, as a GPU may run them: the schedules' block to segment
    mapping and the kernels' block-stride loops, without a GPU, and no kernel test passes
    only because blocks ran ascending."""
    try:
        be = HostBackend(tmp_path_factory.mktemp("cuda-emu-blocks"), block_rule=(4, 64))
    except RuntimeError as e:
        pytest.skip(str(e))
    be.block_order = 0
    return be


def _simt(build, threads: int = 64, kernels=KERNELS) -> HostBackend:
    """The SIMT stand-in built in ``build`` from ``kernels``: ``threads`` a block, many blocks
    a segment, blocks and threads run in shuffled orders (skipped without a C++ compiler)."""
    try:
        be = HostBackend(build, block_rule=(4 * threads, 64), threads=threads, kernels=kernels)
    except RuntimeError as e:
        pytest.skip(str(e))
    be.block_order = be.thread_order = 0
    return be


@pytest.fixture(scope="module")
def emu_simt(tmp_path_factory) -> HostBackend:
    """The SIMT stand-in (``tests/_cuda_emu.py``): the kernels' GPU branches (warp votes and
    shuffles, block reductions in shared memory, barriers) on blocks of 64 threads, each
    thread a fiber; the warps of a block overtake each other as far as the barriers let them,
    in an order drawn anew at each barrier, and shared memory starts undefined in each block;
    many blocks a segment, run in a shuffled order, as ``emu_blocks``."""
    return _simt(tmp_path_factory.mktemp("cuda-emu-simt64"), 64)


@pytest.fixture(scope="module")
def emu_simt_256(tmp_path_factory) -> HostBackend:
    """The SIMT stand-in with a GPU launch's 256 threads a block (``_cuda.THREADS``; eight
    warps): slower, so for a few tests only."""
    return _simt(tmp_path_factory.mktemp("cuda-emu-simt256"), _cuda.THREADS)


@pytest.fixture(autouse=True)
def _poisoned_scratch(monkeypatch):
    """Scratch buffers start as NaN / 255: an element a kernel forgets shows in the result."""
    monkeypatch.setattr(_segments, "POISON", True)


@pytest.fixture(
    params=["emu", "emu-blocks", "emu-simt", pytest.param("gpu", marks=pytest.mark.gpu)]
)
def backend(request):
    """``(backend, to_device)``: the host stand-in (one block per segment, or many), or
    CuPy on GPU 0."""
    if request.param == "emu":
        return request.getfixturevalue("emu"), to_device
    if request.param == "emu-blocks":
        return request.getfixturevalue("emu_blocks"), to_device
    if request.param == "emu-simt":
        return request.getfixturevalue("emu_simt"), to_device
    return gpu_backend()


@pytest.fixture(scope="module")
def organ_masks(small_phantom) -> dict[str, np.ndarray]:
    return {n: small_phantom.mask(n) for n in ("liver", "pancreas", "kidney_left", "colon",
                                               "esophagus", "uterus")}  # fmt: skip


def _plan(ph, mask, preset, seed, size):
    return synthgen.plan(ph.image, mask, organ=preset, seed=seed, spacing=ph.spacing, size=size)


def _compare(ref: synthgen.RenderResult, got: synthgen.RenderResult, be) -> None:
    img = be.download(got.image) if be.on_device(got.image) else np.asarray(got.image)
    tm_ref = ref.tumor_mask
    tm = got.tumor_mask
    tm = be.download(tm) if be.on_device(tm) else np.asarray(tm)
    n_ref = int(tm_ref.sum())
    if n_ref:
        agree = 1.0 - np.count_nonzero(tm != tm_ref) / n_ref
        assert agree >= 0.999, f"tumor masks agree on {agree:.5f} of the voxels"
    else:
        assert not tm.any()
    diff = np.abs(img.astype(np.float64) - ref.image.astype(np.float64))
    assert diff.max() <= 1.0, f"max |GPU - CPU| = {diff.max()} HU"
    for rec in ref.tumors:
        if rec.box:
            sl = tuple(slice(a, b) for a, b in rec.box)
            assert diff[sl].mean() <= 0.05
    assert (
        [r.voxels for r in got.tumors] == [r.voxels for r in ref.tumors]
        or n_ref == 0
        or (
            abs(sum(r.voxels for r in got.tumors) - sum(r.voxels for r in ref.tumors))
            <= 0.001 * n_ref
        )
    )
    for a, b in zip(ref.tumors, got.tumors, strict=True):
        assert a.box == b.box
        assert abs(a.mean_contrast_hu - b.mean_contrast_hu) <= 0.05


def test_device_render_returns_before_its_statistics(backend, small_phantom, organ_masks,
                                                     monkeypatch):  # fmt: skip
    """Images, masks and label maps on the device: the call waits for the device once (the
    boxes), not for the statistics; the first read of any result's records fetches them for
    the whole batch, once, and they are the CPU's. A label map on the host needs the masks
    now: that call waits for everything before it returns, its records a plain list. The
    records themselves are made when first read (a training loop reads none), each result's
    once."""
    be, dev = backend
    downloads, waits, made = [], [], []
    real = be.download
    monkeypatch.setattr(be, "download", lambda a: downloads.append(1) or real(a))
    real_records = rendering._records
    monkeypatch.setattr(rendering, "_records", lambda *a: made.append(1) or real_records(*a))

    class Event:  # the render's fence (a CUDA event on a GPU): counts the host's waits
        def synchronize(self):
            waits.append(len(downloads))

    monkeypatch.setattr(be, "fence", Event, raising=False)
    ph, mask = small_phantom, organ_masks["liver"]
    plans = [_plan(ph, mask, "liver-classic", s, "mix") for s in (21, 22)]
    refs = [rendering.render(p, ph.image, mask) for p in plans]
    made.clear()  # (the CPU's renders made theirs)
    got = _cuda.render_on_gpu(plans, [dev(ph.image)] * 2, [dev(mask)] * 2, device_id=0, be=be)
    assert len(downloads) == 1 and waits == []
    assert all(isinstance(g.tumors, rendering.LazyRecords) for g in got)
    assert [len(g.tumors) for g in got] == [len(r.tumors) for r in refs]  # (no fetch)
    assert len(downloads) == 1 and waits == [] and made == []
    # the masks (boxes, tumor mask, label) are read once the device is done
    assert len(list(got[0].boxes)) == sum(1 for r in refs[0].tumors if r.box)
    assert waits == [1] and len(downloads) == 1
    voxels = [r.voxels for r in got[1].tumors]
    assert len(downloads) == 2 and waits == [1]
    assert sum(r.voxels for r in got[0].tumors) > 0 and len(downloads) == 2  # (one fetch)
    assert voxels == [r.voxels for r in got[1].tumors] and sum(voxels) > 0
    assert len(made) == 2  # (each result's records made once, when first read)
    for ref, g in zip(refs, got, strict=True):
        _compare(ref, g, be)
        assert g.tumors == list(g.tumors) and list(g.tumors) == g.tumors
        assert pickle.loads(pickle.dumps(g.tumors)) == g.tumors
    downloads.clear()
    lab = np.zeros(ph.image.shape, np.uint8)
    res = _cuda.render_on_gpu(plans[:1], [dev(ph.image)], [dev(mask)], device_id=0, be=be,
                              label_outs=[lab])[0]  # fmt: skip
    assert type(res.tumors) is list and len(downloads) >= 2
    assert [r.voxels for r in res.tumors] == [r.voxels for r in refs[0].tumors]


def test_statistics_fetched_once_from_many_threads():
    """Records of one batch read from several threads at once: one wait for the device, one
    fetch, every thread gets the statistics."""
    calls = []

    class Event:
        def synchronize(self):
            calls.append("wait")

    def fetch():
        calls.append("fetch")
        time.sleep(0.05)  # (a slow download: the other threads arrive meanwhile)
        return np.array([[3.0, 6.0], [0.0, 0.0], [2.0, -1.0]])

    stats: list[dict] = [{}, {}]
    later = _segments._StatsLater(fetch, _segments._Fence(Event()), [(0, 0), (0, 1), (1, 0)],
                                  stats)  # fmt: skip

    class Rec:
        volume_mm3 = voxels = mean_contrast_hu = None

    recs = [[Rec(), Rec()], [Rec()]]
    jobs = [0, 1, 0, 1, 0, 1]
    threads = [threading.Thread(target=later.fill, args=(j, (1.0, 1.0, 2.0), recs[j]))
               for j in jobs]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["wait", "fetch"]
    assert [r.voxels for r in recs[0]] == [3, 0] and recs[1][0].voxels == 2
    assert recs[0][0].mean_contrast_hu == 2.0 and recs[1][0].volume_mm3 == 4.0


def test_records_made_and_filled_once_from_many_threads():
    """A result's records made when first read (:class:`rendering.LazyRecords` of a function)
    and filled then, read from several threads at once: made once, filled once, and every
    thread gets them filled."""
    calls = []

    class Rec:
        voxels = None

    def make():
        calls.append("make")
        time.sleep(0.05)  # (the other threads arrive meanwhile)
        return [Rec(), Rec()]

    def fill(records):
        calls.append("fill")
        time.sleep(0.02)
        for r in records:
            r.voxels = 5

    lazy = rendering.LazyRecords(make, n=2).then_fill(fill)
    assert len(lazy) == 2 and calls == []
    seen = []
    threads = [threading.Thread(target=lambda: seen.append([r.voxels for r in lazy]))
               for _ in range(6)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["make", "fill"] and seen == [[5, 5]] * 6


@pytest.mark.parametrize(("preset", "organ", "size"), ORGANS)
def test_render_matches_the_cpu(backend, small_phantom, organ_masks, preset, organ, size):
    be, dev = backend
    for seed in (1, 2):
        _render_against_cpu(be, dev, small_phantom, organ_masks[organ], preset, seed, size)


def _render_against_cpu(be, dev, ph, mask, preset, seed, size) -> None:
    """One plan rendered on ``be`` as the CPU renders it (:func:`_compare`)."""
    plan = _plan(ph, mask, preset, seed, size)
    ref = rendering.render(plan, ph.image, mask)
    got = _cuda.render_on_gpu([plan], [dev(ph.image)], [dev(mask)], device_id=0, be=be)[0]
    _compare(ref, got, be)
    assert ref.tumors, "the plan has tumors"


@pytest.mark.parametrize(("preset", "organ", "size"), [ORGANS[0], ORGANS[5]])
def test_render_on_blocks_of_a_gpu_launch_matches_the_cpu(
    emu_simt_256, small_phantom, organ_masks, preset, organ, size
):
    """The SIMT stand-in with a GPU launch's 256 threads a block (the other tests' 64 are
    cheaper): a mix plan and a hollow organ's, as the CPU renders them."""
    _render_against_cpu(emu_simt_256, to_device, small_phantom, organ_masks[organ], preset, 1,
                        size)  # fmt: skip


def test_tumors_off_the_scan_and_nested_rotations(backend, small_phantom, organ_masks):
    """A plan whose tumor lies off the scan (an empty, inverted conservative box) renders the
    others as the CPU does; a rotation given as three rows is the flat one."""
    import dataclasses

    be, dev = backend
    ph = small_phantom
    mask = organ_masks["liver"]
    plan = _plan(ph, mask, "liver-classic", 6, "mix")
    assert len(plan.tumors) >= 2
    far = dataclasses.replace(plan.tumors[0], center_vox=(-400, -400, -400),
                              clip_to_organ=True)  # fmt: skip
    r = plan.tumors[1].rotation
    rows = dataclasses.replace(plan.tumors[1], rotation=[list(r[0:3]), list(r[3:6]), list(r[6:9])])
    plan = dataclasses.replace(plan, tumors=[far, rows, *plan.tumors[2:]])
    ref = rendering.render(plan, ph.image, mask)
    got = _cuda.render_on_gpu([plan], [dev(ph.image)], [dev(mask)], device_id=0, be=be)[0]
    _compare(ref, got, be)
    assert ref.tumors[0].voxels == 0 and ref.tumors[1].voxels > 0


def test_a_tumor_whose_mask_is_empty_among_others(backend, small_phantom, organ_masks):
    """A clipped tumor whose box holds no organ voxel (the organ mask rendered with is cleared
    there) has an empty mask: phase B renders the other tumors alone, as the CPU does."""
    be, dev = backend
    ph = small_phantom
    mask = organ_masks["liver"]
    plan = _plan(ph, mask, "liver-classic", 4, "mix")
    q = next(i for i, t in enumerate(plan.tumors) if t.clip_to_organ)
    box = rendering.tumor_box(plan.tumors[q], plan.spacing, plan.shape, plan.organ_bbox)
    cleared = np.array(mask, copy=True)
    cleared[box] = False
    ref = rendering.render(plan, ph.image, cleared)
    assert ref.tumors[q].voxels == 0 and sum(r.voxels for r in ref.tumors) > 0
    got = _cuda.render_on_gpu([plan], [dev(ph.image)], [dev(cleared)], device_id=0, be=be)[0]
    _compare(ref, got, be)


def test_host_data_travels_as_boxes(backend, small_phantom, organ_masks):
    """NumPy inputs with a GPU backend: only the boxes go to the device; input untouched."""
    be, _ = backend
    ph = small_phantom
    mask = organ_masks["liver"]
    plan = _plan(ph, mask, "liver-classic", 5, "mix")
    before = ph.image.copy()
    got = _cuda.render_on_gpu([plan], [ph.image], [mask], device_id=0, be=be)[0]
    assert isinstance(got.image, np.ndarray) and not be.on_device(got.image)
    np.testing.assert_array_equal(ph.image, before)
    _compare(rendering.render(plan, ph.image, mask), got, be)
    assert got.label.dtype == np.uint8 and set(np.unique(got.label)) == {0, 1, 2}


def test_out_renders_in_place_on_the_device(backend, small_phantom, organ_masks):
    be, dev = backend
    ph = small_phantom
    mask = organ_masks["liver"]
    plan = _plan(ph, mask, "liver", 9, None)
    img = dev(ph.image)
    res = _cuda.render_on_gpu([plan], [img], [dev(mask)], device_id=0, outs=[img], be=be)[0]
    assert res.image is img
    _compare(rendering.render(plan, ph.image, mask), res, be)


@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.float64])
def test_dtypes(backend, small_phantom, organ_masks, dtype):
    be, dev = backend
    ph = small_phantom
    mask = organ_masks["liver"]
    image = ph.image.astype(dtype)
    if dtype != np.int16:
        image = image + np.asarray(0.25, dtype=dtype)  # fractional HU survive where untouched
    plan = _plan(ph, mask, "liver-classic", 3, "medium")
    ref = rendering.render(plan, image, mask)
    got = _cuda.render_on_gpu([plan], [dev(image)], [dev(mask)], device_id=0, be=be)[0]
    assert got.image.dtype == dtype
    _compare(ref, got, be)
    out = be.download(got.image)
    untouched = ~np.asarray(ref.tumor_mask)
    for rec in ref.tumors:
        if rec.box:
            untouched[tuple(slice(a, b) for a, b in rec.box)] = False
    np.testing.assert_array_equal(out[untouched], image[untouched])


def test_values_outside_the_ct_range(backend, small_phantom, organ_masks):
    """Voxels already outside [-1024, 3071] (padding, an extended-HU metal clip) in the
    tumors' reach: the device writes what the CPU writes, bit for bit, moving them by the
    change within its bound and never clamping them into the range."""
    be, dev = backend
    ph = small_phantom
    mask = organ_masks["liver"]
    plan = _plan(ph, mask, "liver", 6, "medium")
    image = ph.image.copy()
    first = rendering.render(plan, image, mask)
    changed = np.flatnonzero(first.image != image)
    assert changed.size > 100
    image.flat[changed[::4]] = -3024
    image.flat[changed[1::4]] = 30000
    ref = rendering.render(plan, image, mask)
    assert (ref.image.flat[changed[1::4]] > 3071).all()
    got = _cuda.render_on_gpu([plan], [dev(image)], [dev(mask)], device_id=0, be=be)[0]
    np.testing.assert_array_equal(be.download(got.image), ref.image)
    # a float scan's NaN voxels (no data) in the reach, outside the label: left NaN by both
    image = image.astype(np.float32)
    gap = np.setdiff1d(changed[2::4], np.flatnonzero(ref.tumor_mask))
    image.flat[gap] = np.nan
    ref = rendering.render(plan, image, mask)
    assert gap.size > 10 and np.isnan(ref.image.flat[gap]).all()
    got = _cuda.render_on_gpu([plan], [dev(image)], [dev(mask)], device_id=0, be=be)[0]
    out = be.download(got.image)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref.image))
    np.testing.assert_allclose(out, ref.image, rtol=0, atol=0.01)  # (float32: not rounded)


def test_batched_render_equals_one_by_one(backend, small_phantom, organ_masks):
    """Many plans of one scan and of other organs (hollow-organ wall tumors included) in one
    batch: each result as alone."""
    be, dev = backend
    ph = small_phantom
    img = dev(ph.image)
    jobs = [("liver-classic", "liver", "mix", s) for s in range(6)]
    jobs += [("kidney", "kidney_left", "large", 11), ("pancreas", "pancreas", None, 12)]
    # wall tumors (host rows) mixed with ellipsoid rows in one batch
    jobs += [("colon", "colon", None, 13), ("liver-classic", "liver", "mix", 14)]
    plans = [_plan(ph, organ_masks[o], p, s, z) for p, o, z, s in jobs]
    assert any(t.kind == "wall" for t in plans[-2].tumors)
    masks = [dev(organ_masks[o]) for _, o, _, _ in jobs]
    be_launches = len(getattr(be, "launches", []))
    batch = _cuda.render_on_gpu(plans, [img] * len(plans), masks, device_id=0, be=be)
    if hasattr(be, "launches"):
        assert len(be.launches) > be_launches
    for (_p, o, _z, _s), plan, got in zip(jobs, plans, batch, strict=True):
        alone = _cuda.render_on_gpu([plan], [img], [dev(organ_masks[o])], device_id=0, be=be)[0]
        np.testing.assert_array_equal(be.download(got.image), be.download(alone.image))
        _compare(rendering.render(plan, ph.image, organ_masks[o]), got, be)
    assert np.array_equal(be.download(img), ph.image), "the shared input was not modified"


def test_wall_and_ellipsoid_partners_on_host_and_device_images(
    backend, small_phantom, organ_masks, monkeypatch
):
    """A hollow-organ wall tumor (a host row) and an ellipsoid tumor placed on it are merge
    partners: with the image on the host (the write-back writes the merged change, which
    the host reads) and on the device (it merges without writing it), the render is the
    CPU's, and both images are the same."""
    import dataclasses

    be, dev = backend
    ph = small_phantom
    colon = organ_masks["colon"]
    plan = _plan(ph, colon, "colon", 0, None)
    wall = plan.tumors[0]
    assert wall.kind == "wall"
    ell = _plan(ph, organ_masks["liver"], "liver-classic", 3, "medium").tumors[0]
    ell = dataclasses.replace(ell, index=len(plan.tumors), center_vox=wall.center_vox,
                              clip_to_organ=False)  # fmt: skip
    plan.tumors = [*plan.tumors, ell]
    ref = rendering.render(plan, ph.image, colon)
    monkeypatch.setattr(_segments, "KEEP_LAST", True)
    on_host = _cuda.render_on_gpu([plan], [ph.image], [colon], device_id=0, be=be)[0]
    last = dict(_segments.LAST)
    ne = last["ne"]
    assert ne == 1 and last["n"] == 2 and last["partners"] == [[1], [0]]
    on_dev = _cuda.render_on_gpu([plan], [dev(ph.image)], [dev(colon)], device_id=0, be=be)[0]
    for got in (on_host, on_dev):
        _compare(ref, got, be)
    np.testing.assert_array_equal(np.asarray(on_host.image), be.download(on_dev.image))
    _segments.LAST.clear()


def test_batch_of_two_control_grid_sizes(backend, small_phantom, organ_masks, tmp_path):
    """Plans of presets with 3 and 4 control points per axis in one batch (the driver stacks
    the displacements of each grid size apart): each as alone, and as the CPU renders it."""
    from synthgen.presets import preset_path

    be, dev = backend
    ph = small_phantom
    g4 = tmp_path / "liver-g4.toml"
    text = preset_path("liver-classic").read_text()
    assert "control_points = 3" in text
    g4.write_text(text.replace("control_points = 3", "control_points = 4"))
    mask = organ_masks["liver"]
    plans = [_plan(ph, mask, "liver-classic", 21, "mix"), _plan(ph, mask, str(g4), 22, "mix"),
             _plan(ph, mask, "liver-classic", 23, "mix")]  # fmt: skip
    assert len(plans[1].tumors[0].displacement_mm[0]) == 4
    img, m = dev(ph.image), dev(mask)
    batch = _cuda.render_on_gpu(plans, [img] * 3, [m] * 3, device_id=0, be=be)
    for plan, got in zip(plans, batch, strict=True):
        alone = _cuda.render_on_gpu([plan], [img], [m], device_id=0, be=be)[0]
        np.testing.assert_array_equal(be.download(got.image), be.download(alone.image))
        _compare(rendering.render(plan, ph.image, mask), got, be)


@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.float32])
def test_label_out_gets_the_tumor_voxels_in_the_render(backend, small_phantom, organ_masks,
                                                       dtype):  # fmt: skip
    """Label maps passed to the render: one on the device (strided), one on the host beside
    a device image, one beside a host image. Each gets the tumor label on exactly its
    result's tumor voxels (ellipsoid and wall tumors of one batch) and nothing else changes;
    the CPU path's label agrees as its masks do."""
    be, dev = backend
    ph = small_phantom
    jobs = [("liver-classic", "liver", "mix", 21), ("colon", "colon", None, 13)]
    plans = [_plan(ph, organ_masks[o], p, s, z) for p, o, z, s in jobs]
    assert any(t.kind == "wall" for t in plans[1].tumors)
    base = np.zeros(ph.image.shape, dtype)
    base[organ_masks["liver"]] = 1
    base[organ_masks["colon"]] = 3
    x, y, z = base.shape
    wide = dev(np.full((x, y, 2 * z), 9, dtype))
    lab_dev = wide[:, :, 1::2]  # strided: every other element of the last axis
    lab_dev[...] = dev(base)
    lab_host = base.copy()
    img = dev(ph.image)
    orgs = [dev(organ_masks[o]) for _, o, _, _ in jobs]
    res = _cuda.render_on_gpu(plans, [img, img], orgs, device_id=0, be=be,
                              label_outs=[lab_dev, lab_host], tumor_label=7)  # fmt: skip
    tm = [be.download(r.tumor_mask) for r in res]
    assert all(m.any() for m in tm)
    for m, got in ((tm[0], be.download(lab_dev)), (tm[1], lab_host)):
        want = base.copy()
        want[m] = 7
        np.testing.assert_array_equal(got, want)
    assert (be.download(wide)[:, :, 0::2] == 9).all(), "only the label map's own elements"
    # a host image and its host label map
    lab_h2 = base.copy()
    r2 = _cuda.render_on_gpu([plans[0]], [ph.image], [organ_masks["liver"]], device_id=0, be=be,
                             label_outs=[lab_h2], tumor_label=7)[0]  # fmt: skip
    want = base.copy()
    want[np.asarray(r2.tumor_mask)] = 7
    np.testing.assert_array_equal(lab_h2, want)
    # the CPU path
    for (_p, o, _z, _s), plan, m in zip(jobs, plans, tm, strict=True):
        lab_cpu = base.copy()
        ref = rendering.render(plan, ph.image, organ_masks[o], label_out=lab_cpu, tumor_label=7)
        want = base.copy()
        want[ref.tumor_mask] = 7
        np.testing.assert_array_equal(lab_cpu, want)
        assert np.count_nonzero(m != ref.tumor_mask) <= 0.001 * ref.tumor_mask.sum()


@pytest.mark.parametrize(
    "where",
    ["emu-blocks", "emu-simt", "emu-simt-256", pytest.param("gpu", marks=pytest.mark.gpu)],
)
@pytest.mark.parametrize("fuse", [True, False])
def test_results_do_not_depend_on_the_order_blocks_run_in(small_phantom, organ_masks,
                                                          monkeypatch, fuse, where,
                                                          request):  # fmt: skip
    """A GPU runs a launch's blocks in any order, and differently from run to run: what
    one block writes must not be read by another of the same launch, and the sums the
    blocks of a row add up (the texture's rescale statistics, the records' voxels and summed
    change) must not depend on that order, or a plan re-rendered on the same GPU gives
    other records, or another image. On the stand-in with many blocks a row, the blocks run
    ascending, then in two shuffled orders (on the SIMT stand-in, the threads of each block
    too); on a GPU, the same render three times. Images,
    label maps and records are identical bit for bit. (The float64 atomics pass: the float32
    values they add span few binary orders of magnitude, so float64 holds their sums exactly,
    whatever the order. A float32 accumulator of the records' sums fails it.)"""
    monkeypatch.setattr(_segments, "FUSE_STEPS", fuse)
    if where == "gpu":
        be, dev = gpu_backend()
    else:
        be, dev = request.getfixturevalue(where.replace("-", "_")), to_device
    ph = small_phantom
    plans = [_plan(ph, organ_masks["liver"], "liver-classic", s, "mix") for s in (31, 32)]
    plans.append(_plan(ph, organ_masks["colon"], "colon", 13, None))  # a wall tumor too
    orgs = [organ_masks["liver"], organ_masks["liver"], organ_masks["colon"]]
    assert sum(len(p.tumors) for p in plans) >= 10

    def render(order):
        if hasattr(be, "block_order"):  # (the stand-in's; a GPU picks its own)
            monkeypatch.setattr(be, "block_order", order)
            monkeypatch.setattr(be, "thread_order", order)
        labs = [dev(np.zeros(ph.image.shape, np.uint8)) for _ in plans]
        # (float32: changes that are not whole HU, whose sums a changed order can round)
        img = dev(ph.image.astype(np.float32))
        res = _cuda.render_on_gpu(plans, [img] * 3, [dev(m) for m in orgs],
                                  device_id=0, be=be, label_outs=labs)  # fmt: skip
        return (
            [be.download(r.image) for r in res],
            [be.download(x) for x in labs],
            [[(t.voxels, t.mean_contrast_hu) for t in r.tumors] for r in res],
        )

    ref = render(None)
    assert any(v for recs in ref[2] for v, _ in recs)
    for order in (1, 2):
        got = render(order)
        for a, b in zip(ref[0] + ref[1], got[0] + got[1], strict=True):
            np.testing.assert_array_equal(a, b)
        assert got[2] == ref[2]


def test_kernel_label(backend):
    """sg_seg_label: each row's mask voxels get its value in its label map (dtype, strides,
    tight-box origin of its own); rows without a map (0) write nothing."""
    be, dev = backend
    rng = np.random.default_rng(8)
    rows = _Rows(be, dev, 4)
    C = rows.C
    codes = {np.dtype(np.int16): 2, np.dtype(np.float64): 1, np.dtype(np.uint32): 8}
    cases = []
    for s, (dt, val) in enumerate(((np.int16, -5), (np.float64, 4), (np.uint32, 70000), (None, 0))):
        shp = (5, 6, 7)
        mask = (rng.random(shp) < 0.4).astype(np.uint8)
        rows.put(s, "TMASK", mask)
        rows.set(s, "TN0", *shp)
        o = (s, 2 * s, 3)
        rows.set(s, "TO0", *o)
        if dt is None:  # no label map
            cases.append(None)
            continue
        full = dev(np.zeros((12, 14, 24), dt))
        lab = full[:, :, ::2]  # (12, 14, 12), strided
        rows.T[s, C.LBL] = be.ptr(lab)
        rows.set(s, "LBL_CODE", codes[np.dtype(dt)])
        rows.set(s, "LBLS0", *(st // lab.itemsize for st in lab.strides))
        rows.set(s, "LBL_VAL", val)
        rows.keep.append(full)
        cases.append((full, o, mask, dt, val))
    rows.launch("sg_seg_label", 5 * 6 * 7)
    for case in cases:
        if case is None:
            continue
        full, o, mask, dt, val = case
        want = np.zeros((12, 14, 24), dt)
        box = want[:, :, ::2][o[0] : o[0] + 5, o[1] : o[1] + 6, o[2] : o[2] + 7]
        box[mask.astype(bool)] = val
        np.testing.assert_array_equal(be.download(full), want)


def test_label_out_checks(small_phantom, organ_masks):
    """Bad label maps are refused before anything is written, with what is wrong."""
    ph = small_phantom
    mask = organ_masks["liver"]
    plan = _plan(ph, mask, "liver", 4, None)
    img = ph.image.copy()
    for lab, val, msg in (
        (np.zeros((3, 3, 3), np.uint8), 2, "shape"),
        (np.zeros(ph.image.shape, bool), 2, "boolean"),
        (np.zeros(ph.image.shape, np.int8), 300, "does not fit"),
        (np.zeros(ph.image.shape, np.uint8), 2.5, "integer"),
        (np.zeros(ph.image.shape, np.complex64), 2, "integer or float"),
    ):
        with pytest.raises(ValueError, match=msg):
            synthgen.render(plan, img, mask, out=img, label_out=lab, tumor_label=val)
        with pytest.raises(ValueError, match=msg):
            synthgen.render_batch([plan], img, mask, outs=[img], label_outs=[lab],
                                  tumor_label=val)  # fmt: skip
    np.testing.assert_array_equal(img, ph.image)
    with pytest.raises(ValueError, match="one label map per plan"):
        synthgen.render_batch([plan], img, mask, label_outs=np.zeros(ph.image.shape, np.uint8))
    # a boolean map takes the value 1; a CPU tensor is written through its NumPy view
    lab = np.zeros(ph.image.shape, bool)
    res = synthgen.render(plan, ph.image, mask, label_out=lab, tumor_label=1)
    np.testing.assert_array_equal(lab, res.tumor_mask)
    lab = mask.astype(np.uint8)
    res = synthgen.synthesize(ph.image, mask, organ="liver-classic", seed=4, spacing=ph.spacing,
                              label_out=lab)  # fmt: skip
    np.testing.assert_array_equal(lab, res.label)
    torch = pytest.importorskip("torch")
    lab_t = torch.zeros(ph.image.shape, dtype=torch.int32)
    res = synthgen.render_batch([plan], ph.image, mask, label_outs=[lab_t], tumor_label=5)[0]
    np.testing.assert_array_equal(lab_t.numpy(), 5 * res.tumor_mask.astype(np.int32))
    bf16 = torch.zeros(ph.image.shape, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="cannot write"):
        synthgen.render(plan, ph.image, mask, label_out=bf16)


def test_label_out_of_a_registered_bfloat16_is_refused(small_phantom):
    """Where ml_dtypes is imported (CuPy 14 imports it), NumPy knows bfloat16 (kind 'V'): a
    bfloat16 label map, a NumPy array or a torch tensor, gets the same error as where it
    does not (it said "must be an integer or float array, got dtype bfloat16" there)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    ph = small_phantom
    mask = ph.mask("liver")
    plan = synthgen.Synthesizer("liver-classic", spacing=ph.spacing).plan(ph.image, mask, seed=1)
    labs = [np.zeros(ph.image.shape, ml_dtypes.bfloat16)]
    torch = sys.modules.get("torch")
    if torch is not None:
        labs.append(torch.zeros(ph.image.shape, dtype=torch.bfloat16))
    for lab in labs:
        with pytest.raises(ValueError, match="cannot write: pass an integer or float"):
            synthgen.render(plan, ph.image, mask, label_out=lab)


def test_label_out_follows_the_mass_effect(small_phantom):
    """With a preset that pushes tissue, label_out is warped with the image (organ labels
    move) and then gets the tumor label: what the adapters' implant_tumors returns."""
    from synthgen import mass_effect as me
    from synthgen.augment import affine_for, implant_tumors

    ph = small_phantom
    liver = ph.mask("liver")
    syn = synthgen.Synthesizer("liver", size="large", spacing=ph.spacing)
    for seed in range(20):
        plan = syn.plan(ph.image, liver, seed=seed)
        if me.plan_fields(plan):
            break
    else:
        pytest.fail("no large liver tumor pushed in 20 seeds")
    lab = liver.astype(np.int16)
    res = synthgen.render(plan, ph.image, liver, label_out=lab, tumor_label=2)
    ref = me.render_plan(plan, ph.image, liver, labels=[liver.astype(np.int16)], device="cpu")
    want = ref.labels[0].copy()
    want[ref.result.tumor_mask] = 2
    np.testing.assert_array_equal(lab, want)
    np.testing.assert_array_equal(res.image, ref.result.image)
    assert ((lab == 1) != liver).any(), "the organ labels moved"
    imp = implant_tumors(ph.image, liver.astype(np.int16), synthesizer=syn, organ_labels=[1],
                         tumor_label=2, seed=seed, affine=affine_for(ph.spacing))  # fmt: skip
    assert imp.plan == plan
    np.testing.assert_array_equal(imp.label, want)


def test_pushing_plans_sharing_an_output_warp_in_turn(small_phantom, monkeypatch):
    """``render_batch`` of plans that push tissue into one output (and one label map): each
    warps what the plans before it rendered, as one ``render`` after another does."""
    from synthgen import mass_effect as me

    ph = small_phantom
    liver = ph.mask("liver")
    syn = synthgen.Synthesizer("liver", size="large", spacing=ph.spacing)
    pushing = [p for p in (syn.plan(ph.image, liver, seed=s) for s in range(20))
               if me.plan_fields(p)][:2]  # fmt: skip
    assert len(pushing) == 2, "two large liver tumors that push, in 20 seeds"
    plans = [pushing[0], pushing[1], pushing[0]]
    want, want_lab = ph.image.copy(), liver.astype(np.int16)
    for p in plans:
        synthgen.render(p, want, liver, out=want, label_out=want_lab)

    def batch():
        work, lab = ph.image.copy(), liver.astype(np.int16)
        synthgen.render_batch(plans, work, liver, outs=[work] * 3, label_outs=[lab] * 3)
        return work, lab

    work, lab = batch()
    np.testing.assert_array_equal(work, want)
    np.testing.assert_array_equal(lab, want_lab)
    monkeypatch.setattr(rendering, "sequential_groups", lambda images, outs: [(0, len(outs))])
    work, lab = batch()
    assert not np.array_equal(work, want)


def test_results_assembled_before_the_statistics(emu, small_phantom, organ_masks):
    """fill_stats after assemble without statistics (what the GPU driver does while the
    device runs phase B) gives the records assemble gives with them; a device render's
    records are the CPU's."""
    ph, mask = small_phantom, organ_masks["liver"]
    plan = _plan(ph, mask, "liver-classic", 6, "mix")
    ref = rendering.render(plan, ph.image, mask)
    stats = {i: (r.voxels, r.mean_contrast_hu) for i, r in enumerate(ref.tumors) if r.voxels}
    boxes = {i: (tuple(slice(*b) for b in r.box), None) for i, r in enumerate(ref.tumors)
             if r.box}  # fmt: skip
    whole = rendering.assemble(plan, ph.image, mask, stats, boxes, None)
    later = rendering.assemble(plan, ph.image, mask, {}, boxes, None)
    assert [r.voxels for r in later.tumors] == [0] * len(plan.tumors)
    rendering.fill_stats(later, stats)
    assert later.tumors == whole.tumors == ref.tumors
    got = _cuda.render_on_gpu([plan], [to_device(ph.image)], [to_device(mask)], device_id=0,
                              be=emu)[0]  # fmt: skip
    assert [r.voxels for r in got.tumors] == [r.voxels for r in ref.tumors]
    assert [r.volume_mm3 for r in got.tumors] == [r.volume_mm3 for r in ref.tumors]


def test_moved_bytes_follows_the_kernels_tests():
    """moved_bytes on hand-made tables: the blend's test (b > 0 and the value in the window;
    NaN passes), the q2 of appearance rows where the organ byte does not stop a clipped
    tumor, every voxel's change written (0 too), the texture grid once; the write-back's
    image writes at its dtype's size where the change merged with the partners' (the strongest, in
    order) is not 0, the partners' changes read where their boxes overlap the row's, and
    the merged change written where the host reads it."""
    from types import SimpleNamespace

    C = _segments._columns()
    nan = np.nan
    f32 = np.array([0, 0.5, -1, 0.2, nan, 1.0,  # row 0: blur
                    10, 10, 10, 500, 10, nan,  # orig
                    0, 1.5, 0, 0, 0, -2,  # change
                    1, 1, 1, 0,  # row 1: blur
                    0, 0, 0, 0,  # orig
                    1, 0, 0, 0,  # change
                    7, 7, 7, 7], dtype=np.float32)  # merged (written, not read)  # fmt: skip
    u8 = np.array([1, 0, 1, 0], dtype=np.uint8)  # row 1: organ

    class Arena:  # an arena's buffers at a made-up device address (_Arena's reads of it)
        at = _segments._Arena.at

        def __init__(self, dev, base) -> None:
            self.dev, self.base, self.dtype = dev, base, dev.dtype

    fa, ua = Arena(f32, 4000), Arena(u8, 9000)
    T = np.zeros((2, C.T_WIDTH), dtype=np.int64)
    TF = np.zeros((2, C.F_WIDTH), dtype=np.float32)
    T[0, C.TN0 : C.TN0 + 3], T[1, C.TN0 : C.TN0 + 3] = (1, 2, 3), (1, 1, 4)
    T[0, C.TO0 : C.TO0 + 3], T[1, C.TO0 : C.TO0 + 3] = (5, 0, 2), (5, 1, 2)
    T[0, C.G_0 : C.G_0 + 3], T[1, C.G_0 : C.G_0 + 3] = (2, 2, 2), (1, 1, 1)
    for q, cols in enumerate(((0, 6, 12), (18, 22, 26))):
        for col, at in zip((C.BLUR, C.TORIG, C.DELTA), cols, strict=True):
            T[q, col] = fa.base + 4 * at
    T[1, C.TORGAN], T[1, C.TQ2], T[1, C.CLIP] = ua.base, 12345, 1
    T[0, C.DST_CODE], T[1, C.DST_CODE] = _segments.dtype_code(np.dtype(np.int16)), 0
    TF[0, C.F_TLO], TF[0, C.F_THI], TF[1, C.F_TLO], TF[1, C.F_THI] = -100, 300, -1, 1
    last = {"n": 2, "ne": 2, "T": T, "TF": TF, "f32": fa, "u8": ua, "partners": [[], []]}
    be = SimpleNamespace(xp=np)
    # row 0: 6 voxels, kept 3 (0.5, NaN blur, NaN value), 2 changes, grid 8, int16 image
    # row 1: 4 voxels, kept 3, q2 2 (organ), 1 change, grid 1, float32 image
    blend = (12 * 6 + 3 + 4 * 8) + (12 * 4 + 3 + 4 * 2 + 4 * 1)
    assert _segments.moved_bytes(be, last) == (blend, (9 * 6 + 2 * 2) + (9 * 4 + 4 * 1))
    # partners: row 1's box (one row of 4) overlaps row 0's second row (of 3) in 3 voxels.
    # Row 0 merged: 0 1.5 0 / 1 0 -2 (3 changes); row 1 merged: 1 0 -2 0 (2 changes);
    # each reads 3 of the other's changes. Row 1's merged change is read by the host.
    last["partners"] = [[1], [0]]
    T[1, C.MERGED] = fa.base + 4 * 30
    assert _segments.moved_bytes(be, last) == (
        blend,
        (9 * 6 + 4 * 3 + 2 * 3) + (9 * 4 + 4 * 3 + 4 * 2 + 4 * 4),
    )
    T[1, C.TO0 + 2] = 5  # row 1 beside row 0: no overlap, nothing merged or read
    assert _segments.moved_bytes(be, last)[1] == (9 * 6 + 2 * 2) + (9 * 4 + 4 * 1 + 4 * 4)
    T[1, C.CLIP] = 0  # unclipped: every kept voxel reads its q2
    assert _segments.moved_bytes(be, last)[0] == 107 + 48 + 3 + 4 * 3 + 4
    with pytest.raises(ValueError, match="ellipsoid tumors only"):
        _segments.moved_bytes(be, {**last, "n": 3})


def test_moved_bytes_counts_what_the_kernels_move(emu, small_phantom, organ_masks,
                                                  monkeypatch):  # fmt: skip
    """moved_bytes (gpu_check's bandwidth): one tumor per plan (no overlaps) rendered in place
    into float32 images, the write-back's writes are (up to changes too small to alter a
    value) the voxels the render changed, 4 bytes each; every voxel of the boxes reads 8
    bytes and writes 4 in the blend, reads 9 in the write-back; the voxels the blend's test
    keeps are at least those; a render with wall tumors is refused."""
    ph = small_phantom
    monkeypatch.setattr(_segments, "KEEP_LAST", True)
    plans = []
    for seed in (0, 1):
        p = _plan(ph, organ_masks["liver"], "liver-classic", seed, "large")
        p.tumors = p.tumors[:1]
        plans.append(p)
    before = np.asarray(ph.image, dtype=np.float32)
    imgs = [to_device(before.copy()) for _ in plans]
    mask_d = to_device(organ_masks["liver"])
    _cuda.render_on_gpu(plans, imgs, [mask_d] * 2, device_id=0, outs=imgs, be=emu)
    last = dict(_segments.LAST)
    blend, apply = _segments.moved_bytes(emu, last)
    vox = last["voxels"]
    changed = sum(int(np.count_nonzero(emu.download(i) != before)) for i in imgs)
    assert changed > 1000
    writes, rem = divmod(apply - 9 * vox, 4)
    # (a change too small to alter a float32 value is still written)
    assert rem == 0 and changed <= writes <= changed * 1.001 + 2
    C = _segments._columns()
    T = last["T"]
    grid = sum(int(np.prod(T[q, C.G_0 : C.G_0 + 3])) for q in range(last["ne"]))
    reach = blend - 12 * vox - 4 * grid
    assert writes <= reach <= vox
    wall = _plan(ph, organ_masks["colon"], "colon", 0, None)
    _cuda.render_on_gpu([wall], [to_device(before.copy())], [to_device(organ_masks["colon"])],
                        device_id=0, be=emu)  # fmt: skip
    with pytest.raises(ValueError, match="ellipsoid tumors only"):
        _segments.moved_bytes(emu, dict(_segments.LAST))
    _segments.LAST.clear()


def test_device_masks_are_made_when_first_read(emu, small_phantom, organ_masks):
    """A render of device data leaves its tumor masks on the device and makes their views
    only when the boxes are first read (as the CPU's masks, box by box); a host label map
    needs them at once; pickled, the boxes are a plain list."""
    import pickle

    ph, mask = small_phantom, organ_masks["liver"]
    plan = _plan(ph, mask, "liver-classic", 4, "mix")
    ref = rendering.render(plan, ph.image, mask)
    got = _cuda.render_on_gpu([plan], [to_device(ph.image)], [to_device(mask)], device_id=0,
                              be=emu)[0]  # fmt: skip
    boxes = got.boxes
    assert isinstance(boxes, rendering.LazyBoxes) and boxes._done is None
    assert len(boxes) == len(ref.boxes) > 1 and boxes._done is None  # counted, not made
    for (b, m), (rb, rm) in zip(boxes, ref.boxes, strict=True):
        assert b == rb and emu.on_device(m)
        np.testing.assert_array_equal(np.asarray(m).astype(bool), rm)
    assert boxes[0][1] is boxes._all()[0][1]  # made once
    back = pickle.loads(pickle.dumps(boxes))
    assert type(back) is list and len(back) == len(ref.boxes)
    lab = np.zeros(ph.image.shape, np.uint8)  # a host label map: masks needed at once
    got = _cuda.render_on_gpu([plan], [to_device(ph.image)], [to_device(mask)], device_id=0,
                              be=emu, label_outs=[lab])[0]  # fmt: skip
    assert type(got.boxes) is list
    np.testing.assert_array_equal(lab == 2, ref.tumor_mask)


def test_plans_sharing_an_output_render_in_turn(backend, small_phantom, organ_masks,
                                               monkeypatch):  # fmt: skip
    """Plans of one call that share an output (or read an image an earlier plan writes)
    render as one after another, as on the CPU: the same plan twice into one image puts its
    tumor in twice; in one run of kernels both would read the original and the second
    write would undo the first."""
    be, dev = backend
    ph = small_phantom
    mask = organ_masks["liver"]
    p, q = (_plan(ph, mask, "liver-classic", s, "large") for s in (5, 6))
    want = ph.image.copy()
    for plan in (p, q, p):
        rendering.render(plan, want, mask, out=want)
    copy_of = rendering.render(p, want, mask).image  # plan 3: a copy of the image, rendered
    work = dev(ph.image)
    mask_d = dev(mask)
    got = _cuda.render_on_gpu([p, q, p, p], [work] * 4, [mask_d] * 4, device_id=0,
                              outs=[work, work, work, None], be=be)  # fmt: skip
    for img, ref in ((work, want), (got[3].image, copy_of)):
        diff = np.abs(be.download(img).astype(np.float64) - ref)
        # (each render within the GPU's 1 HU of the CPU's; renders on renders may add up)
        assert diff.max() <= 4.0 and diff.mean() <= 0.05
    # all four in one run: p's tumor once, and the copy made before any write
    monkeypatch.setattr(_cuda, "sequential_groups", lambda images, outs: [(0, len(outs))])
    work = dev(ph.image)
    got = _cuda.render_on_gpu([p, q, p, p], [work] * 4, [mask_d] * 4, device_id=0,
                              outs=[work, work, work, None], be=be)  # fmt: skip
    for img, ref in ((work, want), (got[3].image, copy_of)):
        assert np.abs(be.download(img).astype(np.float64) - ref).max() > 10.0


def test_sequential_groups():
    """Runs of plans without shared outputs, against every pair checked by hand; spans of
    views (flipped, strided, empty) and of torch tensors."""
    from synthgen.rendering import memory_extent, sequential_groups

    a = np.zeros((4, 5, 6), np.int16)
    assert memory_extent(a)[1:] == (a.ctypes.data, a.ctypes.data + a.nbytes)
    flip = a[::-1, :, ::-2]
    lo, hi = memory_extent(flip)[1:]
    assert (lo, hi) == (a.ctypes.data + 2, a.ctypes.data + a.nbytes)  # elements 5, 3, 1
    assert memory_extent(a[:0]) is None and memory_extent(None) is None
    torch = pytest.importorskip("torch")
    t = torch.zeros((3, 4, 5), dtype=torch.float32)
    assert memory_extent(t) == ("host", t.data_ptr(), t.data_ptr() + 240)
    assert memory_extent(t[:, 1:2])[1:] == (t.data_ptr() + 20, t.data_ptr() + 200)

    rng = np.random.default_rng(0)
    base = np.zeros(1000, np.uint8)
    for _ in range(300):
        n = int(rng.integers(1, 7))
        arrays = []
        for _ in range(n):
            lo = int(rng.integers(0, 990))
            arrays.append(None if rng.random() < 0.3 else base[lo : lo + int(rng.integers(1, 60))])
        images = [base[int(rng.integers(0, 900)) :][:40] for _ in range(n)]
        groups = sequential_groups(images, arrays)
        assert groups[0][0] == 0 and groups[-1][1] == n
        assert all(b == c for (_, b), (c, _) in itertools.pairwise(groups))

        def touched(i, arrays=arrays, images=images):
            return arrays[i] if arrays[i] is not None else images[i]

        for a0, b0 in groups:  # no conflict inside a run; a run starts at a conflict
            for j in range(a0, b0):
                clash = any(arrays[i] is not None and np.shares_memory(arrays[i], touched(j))
                            for i in range(a0, j))  # fmt: skip
                assert not clash
            if a0 > 0:
                prev = next(g for g in groups if g[1] == a0)
                assert any(arrays[i] is not None and np.shares_memory(arrays[i], touched(a0))
                           for i in range(prev[0], a0))  # fmt: skip


def test_unaligned_device_arrays_are_refused(emu, small_phantom, organ_masks):
    """A device array whose address or strides are not multiples of its element size would
    fault a GPU's typed loads: refused, naming the plan and the array."""
    ph = small_phantom
    mask = organ_masks["liver"]
    plan = _plan(ph, mask, "liver-classic", 3, "small")
    raw = np.zeros(ph.image.nbytes + 2, np.uint8)
    odd = raw[1 : 1 + ph.image.nbytes].view(np.int16).reshape(ph.image.shape).view(DeviceArray)
    odd[...] = ph.image
    with pytest.raises(ValueError, match=r"plan 1: the image \(out\) on the device .* not aligned"):
        _cuda.render_on_gpu([plan, plan], [to_device(ph.image), odd], [to_device(mask)] * 2,
                            device_id=0, outs=[None, odd], be=emu)  # fmt: skip
    # a batch split into runs (a shared output): refused before the first run writes
    work = to_device(ph.image)
    with pytest.raises(ValueError, match=r"plan 2: the image \(out\) on the device"):
        _cuda.render_on_gpu([plan] * 3, [work] * 3, [to_device(mask)] * 3, device_id=0,
                            outs=[work, work, odd], be=emu)  # fmt: skip
    np.testing.assert_array_equal(work, ph.image)


def test_render_batch_api_on_the_cpu(small_phantom, organ_masks):
    ph = small_phantom
    mask = organ_masks["liver"]
    plans = [_plan(ph, mask, "liver", s, None) for s in range(3)]
    res = synthgen.render_batch(plans, ph.image, mask)
    for p, r in zip(plans, res, strict=True):
        np.testing.assert_array_equal(r.image, synthgen.render(p, ph.image, mask).image)
    with pytest.raises(ValueError, match="2 given for 3 plans"):
        synthgen.render_batch(plans, [ph.image, ph.image], mask)


# ---------------------------------------------------------------------------------------
# kernel by kernel: fresh random inputs, poisoned outputs (every element must be written).
# Each launch holds two or more segments, so that a kernel reading another segment's row
# (or the wrong row) fails.
# ---------------------------------------------------------------------------------------


def test_every_kernel_is_driven_and_declared(emu):
    """KERNELS names exactly the __global__ functions of kernels/."""
    found = {}
    for src in _cuda.kernel_dir().glob("*.cu"):
        for name in signatures(src.read_text()):
            found[name] = src.name
    assert found == _cuda.KERNELS


def test_the_stand_in_rejects_wrong_argument_types(emu):
    rows = _Rows(emu, to_device, 1)
    T, W = rows.tables()[0], np.int32(_segments._columns().T_WIDTH)
    S, one = to_device(np.array([0, 1], np.int32)), np.int32(1)
    with pytest.raises(TypeError, match="argument 3"):
        emu.launch_flat("sg_seg_gather", 1, S, one, T, 135)
    with pytest.raises(TypeError, match="argument 2"):
        emu.launch_flat("sg_seg_gather", 1, S, one, T.astype(np.float64), W)
    with pytest.raises(TypeError, match="argument 0"):
        emu.launch_flat("sg_seg_gather", 1, S.astype(np.int64), one, T, W)
    with pytest.raises(TypeError, match="argument 2: expected a long long\\* address"):
        emu.launch_flat("sg_seg_gather", 1, S, one, emu.pointer(emu.ptr(T), np.float32), W)
    with pytest.raises(TypeError, match="parameters"):
        emu.launch_flat("sg_seg_gather", 1, S, one, T)


class _Rows:
    """Segment tables built column by column; arrays given to ``put`` go to the device and
    their addresses into the table (kept alive here)."""

    def __init__(self, be, dev, n: int) -> None:
        self.be, self.dev, self.C = be, dev, _segments._columns()
        self.T = np.zeros((n, self.C.T_WIDTH), np.int64)
        self.TF = np.zeros((n, self.C.F_WIDTH), np.float32)
        self.TD = np.zeros((n, self.C.D_WIDTH), np.float64)
        self.keep: list = []

    def put(self, s: int, col: str, a: np.ndarray):
        d = self.dev(np.ascontiguousarray(a))
        self.keep.append(d)
        self.T[s, getattr(self.C, col)] = self.be.ptr(d)
        return d

    def set(self, s: int, col: str, *vals) -> None:
        c = getattr(self.C, col)
        self.T[s, c : c + len(vals)] = vals

    def tables(self):
        return self.dev(self.T), self.dev(self.TF), self.dev(self.TD)

    def _schedule(self, max_total):
        n = len(self.T)
        totals = np.broadcast_to(np.asarray(max_total, np.int64), (n,)).reshape(n, 1)
        return schedules_nb(np.ascontiguousarray(totals), np.zeros(1, np.int64),
                            *self.be.block_rule)  # fmt: skip

    def row_sums(self, max_total, n_sums: int):
        """``(part, done)`` for a launch over ``max_total`` whose rows add ``n_sums`` sums
        across their blocks (sg_row_sums): each block's slots (NaN: each block writes its
        own before any is read) and the rows' counters (0)."""
        _S, nblk = self._schedule(max_total)
        part = self.dev(np.full(max(int(nblk[0]), 1) * n_sums, np.nan))
        done = self.dev(np.zeros(len(self.T), np.uint32))
        self.keep += [part, done]
        return part, done

    def launch(self, name: str, max_total, *extra, tf=False, td=False):
        """Launch ``name`` over every row, each scheduled for ``max_total`` elements (or
        ``max_total[row]``) by the backend's rule (many blocks per row on a GPU, some of
        them idle where a row has fewer elements)."""
        T, TF, TD = self.tables()
        n = len(self.T)
        S, nblk = self._schedule(max_total)
        Sd = self.dev(S[0])
        self.keep += [T, TF, TD, Sd]
        args = [Sd, np.int32(n), T, np.int32(self.C.T_WIDTH)]
        if tf:
            args += [TF, np.int32(self.C.F_WIDTH)]
        if td:
            args += [TD, np.int32(self.C.D_WIDTH)]
        self.be.launch_flat(name, int(nblk[0]), *args, *extra)


def test_kernel_lattice(backend):
    be, dev = backend
    rows = _Rows(be, dev, 2)
    cases = [((-3, 5), (4, 7), (-20, 9), (123, 456)), ((0, 2), (-511, 3), (500, 4), (7, 8))]
    outs = []
    for s, (l0, l1, l2, key) in enumerate(cases):
        rows.set(s, "LA0", l0[0], l1[0], l2[0])
        rows.set(s, "LN0", l0[1], l1[1], l2[1])
        rows.set(s, "NK0", *key)
        outs.append(rows.put(s, "NOISE", np.full((l0[1], l1[1], l2[1]), np.nan, np.float32)))
    rows.launch("sg_seg_lattice", 5 * 7 * 9)
    for (l0, l1, l2, key), out in zip(cases, outs, strict=True):
        ref = k.lattice_uniform(*key, l0[0], l0[1], l1[0], l1[1], l2[0], l2[1], np.float32(0.5))
        np.testing.assert_array_equal(be.download(out), ref)


def test_kernel_on_a_schedule_with_an_empty_segment(backend):
    """A schedule from each row's own element count: a row given no blocks (between others)
    is left alone, the others are done whole, a long one by many blocks in turn."""
    be, dev = backend
    rows = _Rows(be, dev, 4)
    sizes = [(3, 4, 5), (2, 2, 2), (7, 8, 9), (1, 1, 1)]
    outs = []
    for s, n in enumerate(sizes):
        rows.set(s, "LA0", -s, 2 * s, 5)
        rows.set(s, "LN0", *n)
        rows.set(s, "NK0", 11 + s, 99)
        outs.append(rows.put(s, "NOISE", np.full(n, np.nan, np.float32)))
    rows.launch("sg_seg_lattice", [60, 0, 504, 1])
    for s, (n, out) in enumerate(zip(sizes, outs, strict=True)):
        got = be.download(out)
        if s == 1:
            assert np.isnan(got).all()
            continue
        ref = k.lattice_uniform(11 + s, 99, -s, n[0], 2 * s, n[1], 5, n[2], np.float32(0.5))
        np.testing.assert_array_equal(got, ref)


def test_kernel_on_a_schedule_of_many_segments(backend):
    """Blocks find their segment among more than 32 * 32 of them (three rounds of the 32-ary
    search), with runs of segments given no blocks at the start, in between and at the end:
    every segment with elements is done whole by its own blocks, the others are left alone."""
    be, dev = backend
    rng = np.random.default_rng(31)
    n = 1100
    sizes = [tuple(int(x) for x in rng.integers(1, 4, 3)) for _ in range(n)]
    empty = set(range(5)) | set(range(500, 540)) | set(range(n - 7, n))
    empty |= set(rng.choice(n, 200, replace=False).tolist())
    rows = _Rows(be, dev, n)
    outs = []
    for s, shp in enumerate(sizes):
        rows.set(s, "LA0", s % 7 - 3, s % 5, -(s % 11))
        rows.set(s, "LN0", *shp)
        rows.set(s, "NK0", 1000 + s, 77)
        outs.append(rows.put(s, "NOISE", np.full(shp, np.nan, np.float32)))
    rows.launch("sg_seg_lattice", [0 if s in empty else math.prod(shp)
                                   for s, shp in enumerate(sizes)])  # fmt: skip
    for s, (shp, out) in enumerate(zip(sizes, outs, strict=True)):
        got = be.download(out)
        if s in empty:
            assert np.isnan(got).all(), s
            continue
        ref = k.lattice_uniform(1000 + s, 77, s % 7 - 3, shp[0], s % 5, shp[1], -(s % 11),
                                shp[2], np.float32(0.5))  # fmt: skip
        np.testing.assert_array_equal(got, ref, err_msg=f"segment {s}")


def test_displacements_grouped_by_their_own_grid():
    """Control grids of different sizes whose float counts happen to add up to a stack of the
    first one's are still grouped by their own shapes (each tumor read as its own grid), as
    is a batch of one grid size in one stack."""
    rng = np.random.default_rng(9)

    def grid(g):
        return rng.normal(0, 2, (3, g, g, g))

    disp = [grid(3)] + [grid(2) for _ in range(37)] + [grid(4) for _ in range(19)]
    assert sum(d.size for d in disp) == len(disp) * 81  # the trap
    by_g, stacked = _segments._stack_by_grid(disp)
    assert list(by_g) == [(3, 3, 3, 3), (3, 2, 2, 2), (3, 4, 4, 4)]
    for (shp, qs), st in zip(by_g.items(), stacked, strict=True):
        assert st.shape == (len(qs), *shp)
        for r, q in enumerate(qs):
            np.testing.assert_array_equal(st[r], np.asarray(disp[q]))
    one, st1 = _segments._stack_by_grid(disp[1:38])
    assert list(one) == [(3, 2, 2, 2)] and st1[0].shape == (37, 3, 2, 2, 2)
    assert _segments._stack_by_grid([]) == ({}, [])


def test_flat_schedules():
    """schedules_nb against the NumPy form: ceil(elements / per block) blocks per row, at
    most the cap, none for a row without elements (or, grid2d, every row the largest's);
    int32 prefix sums, one row per launch. With a limit of ``most`` blocks a launch, a
    launch past it is scheduled as with ``ceil(uncapped blocks / most)`` times the elements
    per block: at most ``most`` plus one a row, every row with elements keeping a block;
    one within it is unchanged. Many seeds: the bound must hold for every draw."""
    rng = np.random.default_rng(3)
    limited = 0
    for case in range(3000):
        n, m = int(rng.integers(0, 9)), int(rng.integers(1, 5))
        totals = rng.integers(0, 5000, (n, m)) * (rng.random((n, m)) < 0.8)
        cols = rng.integers(0, m, int(rng.integers(1, 4)))
        per, cap = int(rng.integers(1, 2048)), int(rng.integers(1, 600))
        most = int(rng.choice([0, 1, int(rng.integers(1, 60)), 10**6]))
        for grid2d in (False, True):
            S, count = schedules_nb(totals, cols, per, cap, grid2d, most)
            el = totals[:, cols]
            if grid2d:  # every row as the launch's largest
                el = np.broadcast_to(el.max(axis=0, initial=0), el.shape)
            blocks = np.minimum(-(-el // per), cap).T
            if most and not grid2d:  # (the 2-D grid is the old launch: never limited)
                for k, row in enumerate(blocks):
                    if row.sum() > most:
                        uncapped = -(-el[:, k] // per)  # (ceil divisions)
                        scale = -(-uncapped.sum() // most)
                        blocks[k] = np.minimum(-(-el[:, k] // (per * scale)), cap)
                        assert blocks[k].sum() <= most + n, case
                        limited += 1
            want = np.zeros((len(cols), n + 1), np.int32)
            want[:, 1:] = np.cumsum(blocks, axis=1)
            assert S.dtype == np.int32, case
            np.testing.assert_array_equal(S, want, err_msg=f"{case} {grid2d} {most}")
            np.testing.assert_array_equal(count, want[:, -1], err_msg=f"{case} {grid2d}")
            assert ((np.diff(S, axis=1) > 0) == (el.T > 0)).all(), case
    assert limited > 50
    # the stand-in's one block per row: a limit below the rows cannot overflow the elements
    S, count = schedules_nb(np.array([[5], [7], [0], [9]]), np.zeros(1, np.int64), 1 << 62, 1,
                            False, 2)  # fmt: skip
    assert S.tolist() == [[0, 1, 2, 2, 3]] and count.tolist() == [3]
    # rows at the cap: the limit still holds (the scale counts the blocks the cap cut off)
    big = np.full((16, 1), 2_000_000)
    _, count = schedules_nb(big, np.zeros(1, np.int64), 1024, 512, False, 0)
    assert count.tolist() == [16 * 512]
    _, count = schedules_nb(big, np.zeros(1, np.int64), 1024, 512, False, 4224)
    assert count.tolist() == [16 * 245]  # ceil(2e6 / (1024 * ceil(31,264 / 4,224)))


def test_chained_schedules():
    """chain_schedules_nb against the NumPy form: a launch of steps side by side lists the
    first step's rows with their blocks, then the second's, each row's blocks as its own
    schedule gives them, and block b then falls in row s % n of step s // n as the kernels'
    segment search finds it (``sg_segment_of``: the last s with S[s] <= b)."""
    rng = np.random.default_rng(5)
    for case in range(500):
        n, m = int(rng.integers(0, 9)), int(rng.integers(1, 6))
        totals = rng.integers(0, 3000, (n, m)) * (rng.random((n, m)) < 0.7)
        S, count = schedules_nb(totals, np.arange(m), int(rng.integers(1, 700)), 40, False,
                                int(rng.choice([0, 30])))  # fmt: skip
        chains = np.full((int(rng.integers(1, 5)), 3), -1, np.int64)
        for g in range(len(chains)):
            k = int(rng.integers(1, 4))
            chains[g, :k] = rng.integers(0, m, k)  # (a schedule may come twice)
        flat, offs, blocks = chain_schedules_nb(S, chains)
        assert flat.dtype == np.int32
        at = 0
        for g, chain in enumerate(chains):
            ks = [int(k) for k in chain if k >= 0]
            want = np.concatenate([S[k, :n] + count[ks[:i]].sum() for i, k in enumerate(ks)]
                                  + [[count[ks].sum()]])  # fmt: skip
            assert offs[g] == at and blocks[g] == want[-1], case
            got = flat[at : at + len(want)]
            np.testing.assert_array_equal(got, want, err_msg=str(case))
            at += len(want)
            for b in range(int(blocks[g])):
                seg = int(np.searchsorted(got[:-1], b, side="right")) - 1
                step, row = divmod(seg, n)
                k = ks[step]
                assert S[k, row] <= b - got[seg] + S[k, row] < S[k, row + 1], case
        assert at == len(flat)


def test_steps_side_by_side_are_the_steps_one_by_one(backend, small_phantom, organ_masks,
                                                      monkeypatch):  # fmt: skip
    """FUSE_STEPS: phase B's independent steps in one launch per group (CHAINS_B: the
    gather, the lattice and the texture coordinates; three mask-blur passes each beside a
    band pass; the write-back beside the label write) and the rescale's statistics in the
    grid's last smoothing pass give what one launch per step gives: a batch with host rows (a
    colon's wall tumors) and label maps on the device, the images, label maps, masks and
    statistics. On the stand-ins, bit for bit (the texture's sums in the same order), and 15
    launches against 22; on a GPU (whose
    texture sums are atomics in any order) within the CPU comparison's bounds."""
    be, dev = backend
    ph = small_phantom
    jobs = [("liver-classic", "liver", "mix", 4), ("colon", "colon", None, 13),
            ("liver-classic", "liver", "large", 8)]  # fmt: skip
    plans = [_plan(ph, organ_masks[o], p, s, z) for p, o, z, s in jobs]
    assert any(t.kind == "wall" for t in plans[1].tumors)
    base = np.zeros(ph.image.shape, np.uint8)
    base[organ_masks["liver"]] = 1
    base[organ_masks["colon"]] = 3
    got = {}
    for fuse in (True, False):
        monkeypatch.setattr(_segments, "FUSE_STEPS", fuse)
        imgs = [dev(ph.image) for _ in jobs]
        labs = [dev(base) for _ in jobs]
        n0 = len(getattr(be, "launches", []))
        res = _cuda.render_on_gpu(plans, imgs, [dev(organ_masks[o]) for _, o, _, _ in jobs],
                                  device_id=0, be=be, outs=imgs, label_outs=labs,
                                  tumor_label=7)  # fmt: skip
        launched = getattr(be, "launches", [])[n0:]
        got[fuse] = ([be.download(i) for i in imgs], [be.download(lab) for lab in labs],
                     [be.download(r.tumor_mask) for r in res],
                     [[(t.box, t.voxels, t.mean_contrast_hu) for t in r.tumors] for r in res],
                     launched)  # fmt: skip
    (imgs_f, labs_f, masks_f, recs_f, launched_f) = got[True]
    (imgs_1, labs_1, masks_1, recs_1, launched_1) = got[False]
    assert all(m.any() for m in masks_f)
    if hasattr(be, "launches"):  # the stand-ins: the same arithmetic in the same order
        assert len(launched_f) == 15 and len(launched_1) == 22
        assert {"sg_seg_first", "sg_seg_conv_band", "sg_seg_apply_label",
                "sg_seg_conv_stats", "sg_seg_tex_scale"} <= set(launched_f)  # fmt: skip
        assert not {"sg_seg_gather", "sg_seg_lattice", "sg_seg_label", "sg_seg_tex_stats",
                    "sg_seg_merge"} & set(launched_f)  # fmt: skip
        for a, b in zip(imgs_f + labs_f + masks_f, imgs_1 + labs_1 + masks_1, strict=True):
            np.testing.assert_array_equal(a, b)
        assert recs_f == recs_1
    else:
        for a, b in zip(imgs_f, imgs_1, strict=True):
            assert np.abs(a.astype(np.float64) - b).max() <= 1.0
        for a, b in zip(masks_f, masks_1, strict=True):
            assert np.count_nonzero(a != b) <= 0.001 * b.sum()
    for lab, m in zip(labs_f, masks_f, strict=True):  # the label write beside the write-back
        want = base.copy()
        want[m] = 7
        np.testing.assert_array_equal(lab, want)
    assert len(CHAINS_B) == 5


@pytest.mark.parametrize(
    ("grid2d", "scale", "most"), [(True, 1, None), (False, 3, None), (False, 1, 9), (False, 1, 0)]
)
def test_render_on_the_2d_grid_schedules(backend, small_phantom, organ_masks, monkeypatch,
                                         grid2d, scale, most):  # fmt: skip
    """GRID2D (the benchmarks' comparison): every row launched with the largest row's blocks,
    surplus blocks idle, host rows and all; BLOCK_SCALE: fewer blocks, each walking more
    elements (on the many-block stand-in; the one-block stand-in is unchanged by it); a
    limit of ``most`` blocks a launch (the backend's ``most_blocks``; 0: none): the large
    launches with long blocks, the small ones as they were; the render is the CPU's as on
    the default flat schedules."""
    be, dev = backend
    monkeypatch.setattr(_segments, "GRID2D", grid2d)
    monkeypatch.setattr(_segments, "BLOCK_SCALE", scale)
    if most is not None:
        monkeypatch.setattr(be, "most_blocks", most)
    ph = small_phantom
    for preset, organ, size in (("liver-classic", "liver", "mix"), ("colon", "colon", None)):
        mask = organ_masks[organ]
        plan = _plan(ph, mask, preset, 3, size)
        ref = rendering.render(plan, ph.image, mask)
        got = _cuda.render_on_gpu([plan], [dev(ph.image)], [dev(mask)], device_id=0, be=be)[0]
        _compare(ref, got, be)


def _bands(rng, n_in, m, kk=3):
    s = rng.integers(0, n_in - kk + 1, size=m).astype(np.int64)
    return s, rng.standard_normal((m, kk)).astype(np.float32)


def test_kernel_band_passes(backend):
    """Three passes (axis 2, 1, 0: the lattice sums' order) on two segments of other sizes."""
    be, dev = backend
    rng = np.random.default_rng(0)
    shapes = [((6, 7, 8), (4, 5, 3)), ((5, 9, 4), (2, 6, 4))]
    rows = _Rows(be, dev, 2)
    refs, finals = [], []
    for s, (shp, ms) in enumerate(shapes):
        core = rng.standard_normal(shp).astype(np.float32)
        bands = [_bands(rng, shp[a], ms[a]) for a in range(3)]
        refs.append(k.band_contract3(core, *bands[0], *bands[1], *bands[2]))
        rows.put(s, "NOISE", core)
        rows.set(s, "LN0", *shp)
        rows.set(s, "ZD1", shp[0], shp[1], ms[2])
        rows.set(s, "ZD2", shp[0], ms[1], ms[2])
        rows.set(s, "B0", *ms)
        for a in range(3):
            rows.put(s, f"LS{a}", bands[a][0])
            rows.put(s, f"LW{a}", bands[a][1])
            rows.set(s, f"LK{a}", 3)
        rows.put(s, "ZA", np.full((shp[0], shp[1], ms[2]), np.nan, np.float32))
        rows.put(s, "ZB", np.full((shp[0], ms[1], ms[2]), np.nan, np.float32))
        finals.append(rows.put(s, "Z0", np.full(ms, np.nan, np.float32)))
    C = rows.C
    for a, src, dims, dst in ((2, C.NOISE, C.LN0, C.ZA), (1, C.ZA, C.ZD1, C.ZB),
                              (0, C.ZB, C.ZD2, C.Z0)):  # fmt: skip
        rows.launch("sg_seg_band", 400, np.int32(a), np.int32(src), np.int32(dims),
                    np.int32(C.LS0 + a), np.int32(C.LW0 + a), np.int32(C.B0 + a),
                    np.int32(C.LK0 + a), np.int32(dst))  # fmt: skip
    for ref, out in zip(refs, finals, strict=True):
        np.testing.assert_array_equal(be.download(out), ref)


def test_kernel_conv_is_the_cpu_correlation(backend):
    """Three sg_seg_conv passes (the mask blur: centred kernels, offset -radius, and the
    block-to-grid smoothing: other offsets and sizes) on two segments equal the CPU's
    toeplitz_contract3, bit for bit."""
    be, dev = backend
    rng = np.random.default_rng(1)
    rows = _Rows(be, dev, 2)
    C = rows.C
    cases = [((9, 4, 11), (-3, -1, 2), (9, 6, 7), 7), ((6, 8, 5), (-2, -2, -2), (6, 8, 5), 5)]
    refs, finals = [], []
    for s, (shp, offs, outs, kl) in enumerate(cases):
        core = (rng.random(shp) * (rng.random(shp) > 0.4)).astype(np.float32)
        kern = rng.random(kl).astype(np.float32)
        refs.append(k.toeplitz_contract3(core, offs[0], kern, outs[0], offs[1], kern, outs[1],
                                         offs[2], kern, outs[2]))  # fmt: skip
        rows.put(s, "FRAC", core)
        rows.set(s, "B0", *shp)
        rows.set(s, "GD1", outs[0], shp[1], shp[2])
        rows.set(s, "GD2", outs[0], outs[1], shp[2])
        rows.set(s, "G_0", *outs)
        kd = rows.put(s, "GKERN0", kern)
        rows.T[s, [C.GKERN1, C.GKERN2]] = be.ptr(kd)
        rows.set(s, "GKLEN0", kl, kl, kl)
        rows.set(s, "GOFF0", *offs)
        rows.put(s, "GA", np.full((outs[0], shp[1], shp[2]), np.nan, np.float32))
        rows.put(s, "GB", np.full((outs[0], outs[1], shp[2]), np.nan, np.float32))
        finals.append(rows.put(s, "GRID", np.full(outs, np.nan, np.float32)))
    for a, src, dims, dst in ((0, C.FRAC, C.B0, C.GA), (1, C.GA, C.GD1, C.GB),
                              (2, C.GB, C.GD2, C.GRID)):  # fmt: skip
        rows.launch("sg_seg_conv", 800, np.int32(a), np.int32(src), np.int32(dims),
                    np.int32(C.GKERN0 + a), np.int32(C.GKLEN0 + a), np.int32(C.GOFF0 + a),
                    np.int32(C.G_0 + a), np.int32(dst))  # fmt: skip
    for ref, out in zip(refs, finals, strict=True):
        np.testing.assert_array_equal(be.download(out), ref)


def test_kernel_mask_blur_reads_the_mask_bytes(backend):
    """The mask blur's three sg_seg_conv passes as the render runs them: the first reads the
    tight box's uint8 tumor mask (column TMASK) as the floats 0 and 1, with no float32 copy;
    the result is the CPU's correlation of the float32 mask, bit for bit."""
    be, dev = backend
    rng = np.random.default_rng(4)
    rows = _Rows(be, dev, 2)
    C = rows.C
    refs, finals = [], []
    for s, (shp, kl) in enumerate((((9, 6, 11), 7), ((5, 8, 4), 5))):
        mask = (rng.random(shp) > 0.5).astype(np.uint8)
        kern = rng.random(kl).astype(np.float32)
        r = -(kl // 2)
        refs.append(k.toeplitz_contract3(mask.astype(np.float32), r, kern, shp[0], r, kern,
                                         shp[1], r, kern, shp[2]))  # fmt: skip
        rows.put(s, "TMASK", mask)
        rows.set(s, "TN0", *shp)
        kd = rows.put(s, "BKERN0", kern)
        rows.T[s, [C.BKERN1, C.BKERN2]] = be.ptr(kd)
        rows.set(s, "BKLEN0", kl, kl, kl)
        rows.set(s, "BOFF0", r, r, r)
        rows.put(s, "BX0", np.full(shp, np.nan, np.float32))
        rows.put(s, "BX1", np.full(shp, np.nan, np.float32))
        finals.append(rows.put(s, "BLUR", np.full(shp, np.nan, np.float32)))
    for a, (src, dst) in enumerate(((C.TMASK, C.BX0), (C.BX0, C.BX1), (C.BX1, C.BLUR))):
        rows.launch("sg_seg_conv", 600, np.int32(a), np.int32(src), np.int32(C.TN0),
                    np.int32(C.BKERN0 + a), np.int32(C.BKLEN0 + a), np.int32(C.BOFF0 + a),
                    np.int32(C.TN0 + a), np.int32(dst))  # fmt: skip
    for ref, out in zip(refs, finals, strict=True):
        assert (ref > 0).any()
        np.testing.assert_array_equal(be.download(out), ref)


def _random_box(rng, n_hi: int, c_hi: int, sp_lo: float):
    """A segment's random box, per axis: sizes (below ``n_hi``), origin, a centre up to
    ``c_hi`` past it, spacing (``sp_lo`` to 3 mm)."""
    n = rng.integers(0, n_hi, 3)
    lo = rng.integers(-5, 60, 3)
    centre = lo + rng.integers(-10, c_hi, 3)
    return n, lo, centre, rng.uniform(sp_lo, 3.0, 3)


def _interp_table(ic, grid_shape) -> np.ndarray:
    """What sg_seg_interp leaves at SG_INTERP for the per-axis texture coordinates ``ic``
    (``interp_coords_nb``'s (indices, fractions) of axes 0, 1, 2) on a grid of
    ``grid_shape``, made on the host: axis 2's indices and fractions, then per (i, j) of
    axes 0 and 1 the CPU blend's bilinear weights w00, w01, w10, w11 and the offset of grid
    row (a0, a1) (as float32 words)."""
    (i0, f0), (i1, f1), (i2, f2) = ic
    u0 = f0.astype(np.float64)[:, None]
    u1 = f1.astype(np.float64)[None, :]
    # (the CPU blend's expressions, float64 products rounded to float32)
    w = np.stack([(1.0 - u0) * (1.0 - u1), (1.0 - u0) * u1, u0 * (1.0 - u1), u0 * u1], -1)
    off = (i0.astype(np.int64)[:, None] * grid_shape[1] + i1[None, :]) * grid_shape[2]
    return np.concatenate([
        i2.astype(np.int32).view(np.float32),
        f2.astype(np.float32),
        w.astype(np.float32).ravel(),
        off.astype(np.int32).ravel().view(np.float32),
    ])  # fmt: skip


def test_kernel_interp(backend):
    """sg_seg_interp: the blend's texture coordinates per index of the last axis of a
    segment's tight box are the CPU's interp_coords_nb of its positions (index - centre) *
    spacing, bit for bit: positions before, inside and beyond the grid, a grid of one or two
    points, an empty axis; so are the per-(i, j) bilinear weights (of axes 0 and 1's
    interp_coords_nb fractions) and grid row offsets after them (the CPU blend's); nothing is
    written past a segment's tables, and host rows are left."""
    be, dev = backend
    rng = np.random.default_rng(33)
    n_seg = 8
    rows = _Rows(be, dev, n_seg)
    C = rows.C
    cases, outs = [], []
    for s in range(n_seg):
        n, to, centre, sp = _random_box(rng, 30, 40, 0.4)
        if s == 4:
            n[1] = 0  # an empty axis: no (i, j) entries
        if s == 7:
            n[2] = 0  # an empty last axis: (i, j) entries all the same
        origin = rng.uniform(-60.0, 10.0, 3)
        step = float(rng.uniform(1.0, 6.0))
        grid = rng.integers(1, 20, 3)
        if s == 5:
            grid[:] = (1, 2, 3)
        rows.set(s, "TN0", *n)
        rows.set(s, "TO0", *to)
        rows.set(s, "C0", *centre)
        rows.set(s, "G_0", *grid)
        rows.set(s, "KIND", int(s == 6))  # a host row: no tables
        rows.TD[s, C.D_SP0 : C.D_SP0 + 3] = sp
        rows.TD[s, C.D_TX0 : C.D_TX0 + 3] = origin
        rows.TD[s, C.D_STEP] = step
        size = 2 * int(n[2]) + 5 * int(n[0] * n[1])
        out = rows.put(s, "INTERP", np.full(size + 1, np.nan, np.float32))
        cases.append((n, to, centre, sp, origin, step, grid))
        outs.append(out)
    rows.launch("sg_seg_interp", [int(c[0][2] + c[0][0] * c[0][1]) for c in cases], td=True)
    for s, (case, out) in enumerate(zip(cases, outs, strict=True)):
        n, to, centre, sp, origin, step, grid = case
        got = be.download(out)
        assert np.isnan(got[-1])  # nothing past the tables
        if s == 6:
            assert np.isnan(got).all()
            continue
        ic = []
        for a in range(3):
            pos = (np.arange(to[a], to[a] + n[a]) - centre[a]) * sp[a]
            ic.append(k.interp_coords_nb(pos, origin[a], step, int(grid[a])))
        m = int(n[2])
        np.testing.assert_array_equal(got[:m].view(np.int32), ic[2][0])
        assert got[m : 2 * m].tobytes() == ic[2][1].tobytes(), s
        # the per-(i, j) weights and offsets too: every word of them the host's
        assert got[:-1].tobytes() == _interp_table(ic, grid).tobytes(), s


def test_interp_table_size():
    """Phase B's scratch sizes (phase_b_sizes_nb) hold at SG_INTERP the words sg_seg_interp
    writes (those of _interp_table), empty axes included; a texture grid or a tight box past
    the kernels' 32-bit offsets is refused with a message, not rendered wrong."""
    from synthgen._seg_tables import F32, phase_b_sizes_nb

    def sizes(tn, grid):
        tn, grid = np.asarray(tn, np.int64), np.asarray(grid, np.int64)
        m = len(tn)
        ones = np.ones((m, 3), np.int64)
        return phase_b_sizes_nb(tn, m, ones, ones, grid, np.zeros(m, bool),
                                np.zeros(m, np.int64), np.zeros(m, bool))[0]  # fmt: skip

    tn = [(7, 5, 3), (4, 0, 6), (3, 2, 0), (1, 1, 1)]
    grid = [(5, 6, 4), (3, 3, 3), (2, 2, 2), (1, 2, 3)]
    f32 = sizes(tn, grid)
    for r, (n, g) in enumerate(zip(tn, grid, strict=True)):
        ic = [k.interp_coords_nb(np.arange(n[a], dtype=np.float64), 0.0, 1.0, g[a])
              for a in range(3)]  # fmt: skip
        assert f32[r, F32.index("interp")] == len(_interp_table(ic, g)), r
    with pytest.raises(ValueError, match="32-bit offsets"):
        sizes([(1 << 15, 1 << 14, 1)], [(2, 2, 2)])  # 4 words a (i, j): 2^31
    with pytest.raises(ValueError, match="32-bit offsets"):
        sizes([(8, 8, 8)], [(1 << 11, 1 << 10, 1 << 10)])  # a grid of 2^31 values
    sizes([(1 << 14, 1 << 14, 1)], [(1 << 10, 1 << 10, 1 << 10)])  # (below both: taken)


def test_write_back_offsets_past_32_bits_refused(backend, small_phantom, organ_masks,
                                                 monkeypatch):  # fmt: skip
    """The write-back addresses a voxel from its tight box's origin in 32 bits: a row whose
    box spans 2^31 or more elements of its device image, or a host image's row whose box
    (its own buffer) holds 2^31 voxels or more, is refused by phase B's table with a
    message, not written wrong. (No such image is allocated: phase B's table is made once
    with the image's stride along axis 0, or the boxes' size along it, inflated, then again
    as it is for the launches; the bound itself: test_span_bound_is_exact.)"""
    be, dev = backend
    ph = small_phantom
    real = _segments.phase_b_nb
    plan = _plan(ph, organ_masks["liver"], "liver-classic", 3, "large")
    spans = []

    def inflated(case: str):
        def phase_b(T, TF, TD, ne, tn, to, job, img_on, img, *rest):
            n0 = int(tn[:, 0].max())  # (the largest box along axis 0: at least 2 voxels)
            big, big_tn = img.copy(), tn.copy()  # (img: address, dtype code, 3 strides a job)
            if case == "host":
                big_tn[:, 0] = 2**31 // int(tn[:, 1:].prod(axis=1).min()) + 2
            elif case == "below":  # (room left for the other axes' terms of the span)
                big[:, 2] = (2**31 - 2**24) // (n0 - 1)
            else:
                big[:, 2] = 2**31 // (n0 - 1) + 1
            if case != "host":
                spans.append(int(big[0, 2]) * (n0 - 1))
            # (ne=0: the rows' common columns only, where the destination is checked; an
            # ellipsoid row's texture tables are not made for the inflated boxes)
            real(T, TF, TD, 0, big_tn, to, job, img_on, big, *rest)
            return real(T, TF, TD, ne, tn, to, job, img_on, img, *rest)

        return phase_b

    for case in ("below", "above", "host"):
        monkeypatch.setattr(_segments, "phase_b_nb", inflated(case))
        img, organ = dev(ph.image), dev(organ_masks["liver"])
        if case == "host":  # the image on the host: its rows write their own buffers
            img = ph.image.copy()
        render = functools.partial(_cuda.render_on_gpu, [plan], [img], [organ], device_id=0,
                                   be=be, outs=[img])  # fmt: skip
        if case == "below":
            assert render()[0].tumor_mask is not None
        else:
            with pytest.raises(ValueError, match="32-bit offsets"):
                render()
    assert spans[0] < 2**31 <= spans[1]


def test_span_bound_is_exact():
    """check_span: a write-back row's span sum(|stride| * (size - 1)) of 2^31 - 1 elements is
    taken, one of 2^31 refused, whatever the strides' signs."""
    from synthgen._seg_tables import check_span

    C = _segments._columns()
    T = np.zeros((1, C.T_WIDTH), np.int64)
    tn = np.array([[3, 2, 1]], np.int64)  # span: 2 |s0| + |s1|
    cases = [((2**30 - 1, 1, 7), True), ((2**30 - 1, 2, 7), False), ((-(2**30), 0, 0), False),
             ((-(2**30) + 1, -1, 1 << 40), True)]  # fmt: skip
    for strides, ok in cases:
        T[0, C.DS0 : C.DS0 + 3] = strides
        if ok:
            check_span(T, 0, tn)
        else:
            with pytest.raises(ValueError, match="32-bit offsets"):
                check_span(T, 0, tn)


def test_kernel_weights(backend):
    """sg_seg_weights: the B-spline weight rows of each segment's box, axis after axis, are
    the CPU's (bspline_matrix of the positions rendering._shape_inputs computes), bit for
    bit, for grids of 1 to 8 points, positions beyond the grid (clamped), NaN positions and
    an empty axis; nothing is written past a segment's rows."""
    from synthgen._cpu_kernels import bspline_matrix
    from synthgen._geometry import prefilter

    be, dev = backend
    rng = np.random.default_rng(21)
    gs = (3, 1, 2, 4, 6, 8, 3, 3)
    rows = _Rows(be, dev, len(gs))
    C = rows.C
    assert max(gs) == C.G_MAX
    cases, outs = [], []
    for s, g in enumerate(gs):
        n, lo, centre, sp = _random_box(rng, 40, 50, 0.5)
        if s == 6:
            n[1] = 0  # an empty axis
        ext = rng.uniform(2.0, 30.0, 3)  # small extents: positions beyond the grid too
        if s == 7:
            ext[2] = np.nan  # a degenerate extent: NaN positions, rows of zeros as on the CPU
        rows.set(s, "N0", *n)
        rows.set(s, "O0", *lo)
        rows.set(s, "C0", *centre)
        rows.set(s, "G0", g, g, g)
        rows.TD[s, C.D_SP0 : C.D_SP0 + 3] = sp
        rows.TD[s, C.D_EXT0 : C.D_EXT0 + 3] = ext
        rows.put(s, "PRE", prefilter(g))
        out = rows.put(s, "W0", np.full(int(n.sum()) * g + 1, np.nan, np.float32))
        rows.T[s, C.W1] = rows.T[s, C.W0] + 4 * n[0] * g
        rows.T[s, C.W2] = rows.T[s, C.W1] + 4 * n[1] * g
        cases.append((g, n, lo, centre, sp, ext))
        outs.append(out)
    rows.launch("sg_seg_weights", [int(c[1].sum()) for c in cases], td=True)
    for (g, n, lo, centre, sp, ext), out in zip(cases, outs, strict=True):
        got = be.download(out)
        assert np.isnan(got[-1])  # nothing past the rows
        at = 0
        for a in range(3):
            pos = (np.arange(lo[a], lo[a] + n[a]) - centre[a]) * sp[a]
            want = bspline_matrix((pos + ext[a]) * ((g - 1) / (2.0 * ext[a])), prefilter(g))
            assert got[at : at + want.size].tobytes() == want.tobytes(), (g, a)
            at += want.size


def test_compiled_fills_mirror_the_header_columns():
    """The column numbers the compiled table fills use are the header's; a mirror that
    differs is refused with the names."""
    from types import SimpleNamespace

    from synthgen import _seg_tables

    C = _segments._columns()  # checks the mirror
    _seg_tables.check(C)
    for name, value in (("TN0", C.TN0 + 1), ("IS1", C.IS1 + 1), ("F_THI", C.F_THI + 1),
                        ("CODE_U8", 4)):  # fmt: skip
        wrong = SimpleNamespace(**{**vars(C), name: value})
        with pytest.raises(RuntimeError, match=name):
            _seg_tables.check(wrong)


def test_merge_partners_are_the_overlapping_boxes_of_the_same_plan():
    """The merge's partner lists (one numba call for the batch) are, per row, the ascending
    rows of the same plan whose boxes overlap: a plain pairwise check."""
    rng = np.random.default_rng(11)
    for case in range(200):
        n = int(rng.integers(0, 30))
        job = rng.integers(0, 4, n)
        lo = rng.integers(0, 30, (n, 3))
        hi = lo + rng.integers(1, 12, (n, 3))
        count, off, flat = k.overlap_partners_nb(job, lo, hi)
        assert flat.size >= 1  # a valid address even without partners
        for r in range(n):
            want = [c for c in range(n) if c != r and job[c] == job[r]
                    and bool(((lo[r] < hi[c]) & (lo[c] < hi[r])).all())]  # fmt: skip
            assert flat[off[r] : off[r] + count[r]].tolist() == want, (case, r)


def test_phase_a_sizes_in_one_call():
    """phase_a_sizes_nb against the NumPy form of the same sizes: box sizes (none for an
    empty or inverted box), the bounding-box accumulators, the scratch sizes of the kept
    rows, their launches' elements."""
    from synthgen._seg_tables import phase_a_sizes_nb

    rng = np.random.default_rng(14)
    for case in range(150):
        n_all = int(rng.integers(0, 12))
        lo = rng.integers(0, 40, (n_all, 3))
        hi = lo + rng.integers(-3, 15, (n_all, 3))
        g = rng.choice([3, 4], n_all)
        keep = np.flatnonzero(rng.random(n_all) < 0.8)
        n = len(keep)
        has_app = rng.random(n) < 0.5
        got = phase_a_sizes_nb(lo, hi, keep, g, has_app)
        nb_ = np.maximum(hi - lo, 0)
        bb = np.zeros((max(n, 1), 7), np.int32)
        bb[:n, 0:6:2] = nb_[keep]
        bb[:n, 1:6:2] = -1
        nv = nb_[keep].prod(axis=1)
        rows = nb_[keep, 0] * nb_[keep, 1]
        n_w = nb_[keep].sum(axis=1)
        want = (nb_, bb,
                np.stack([nv, nv * has_app, rows * (3 + 3 * g[keep]), n_w * g[keep]],
                         axis=1).reshape(n, 4),
                np.stack([nv, nv], axis=1).reshape(n, 2),
                np.stack([rows, nv, n_w], axis=1).reshape(n, 3))  # fmt: skip
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{case} {i}")
            if isinstance(b, np.ndarray):
                assert a.dtype == b.dtype, (case, i)


def test_phase_b_rows_from_the_phase_a_boxes():
    """phase_b_boxes_nb (one numba call) against the NumPy form of the same rules: live rows,
    tight boxes grown by the blur's reach and clipped to the phase-A box, their extent in mm
    (the same float64 operations, so equal bits), host rows after them, merge partners."""
    from synthgen._seg_tables import phase_b_boxes_nb

    rng = np.random.default_rng(12)
    for case in range(150):
        n_all = int(rng.integers(0, 12))
        nb_ = rng.integers(0, 20, (n_all, 3))
        lo = rng.integers(0, 50, (n_all, 3))
        pad = rng.integers(0, 4, (n_all, 3))
        centre = rng.integers(-5, 60, (n_all, 3)).astype(np.float64)
        sp = rng.uniform(0.5, 3.0, (n_all, 3))
        keep = np.flatnonzero(rng.random(n_all) < 0.8)
        n = len(keep)
        hit = np.zeros((n, 7), np.int32)
        for r, q in enumerate(keep):
            if nb_[q].min() > 0 and rng.random() < 0.7:
                a = rng.integers(0, nb_[q])
                b = a + rng.integers(0, nb_[q] - a)
                hit[r, 0:6:2], hit[r, 1:6:2], hit[r, 6] = a, b, rng.integers(1, 100)
            else:  # an empty mask: the kernel's initial values stay
                hit[r, 0:6:2], hit[r, 1:6:2] = nb_[q], -1
        jk = rng.integers(0, 3, n)
        nw = int(rng.integers(0, 3))
        w_tn = rng.integers(1, 9, (nw, 3))
        w_to = rng.integers(0, 40, (nw, 3))
        w_job = rng.integers(0, 3, nw)
        got = phase_b_boxes_nb(hit, keep, lo, pad, nb_, jk, centre, sp, w_tn, w_to, w_job)
        live = np.flatnonzero(hit[:, 6] > 0)
        qe = keep[live]
        h = hit.astype(np.int64)
        u0 = np.maximum(h[live][:, 0:6:2] - pad[qe], 0)
        u1 = np.minimum(h[live][:, 1:6:2] + pad[qe] + 1, nb_[qe])
        tn_e, to_e = u1 - u0, lo[qe] + u0
        tn, to = np.concatenate([tn_e, w_tn]), np.concatenate([to_e, w_to])
        job_of = np.concatenate([jk[live], w_job])
        want = (live, qe, u0, tn, to, job_of, tn.prod(axis=1), (to_e - centre[qe]) * sp[qe],
                (to_e + tn_e - 1 - centre[qe]) * sp[qe],
                *k.overlap_partners_nb(job_of, to, to + tn))  # fmt: skip
        assert len(got) == len(want)
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert g.dtype == w.dtype and g.shape == w.shape, (case, i)
            np.testing.assert_array_equal(g, w, err_msg=f"case {case}, output {i}")


def test_blur_kernels_in_one_call_are_the_gaussian_kernels():
    """blur_kernels_nb (both render paths' mask-blur kernels, all tumors and axes in one
    call): exp(-0.5 (x / sigma)^2) over x = -r..r divided by its NumPy sum, rounded to
    float32, bit for bit (the exponentials as libm gives them, math.exp here); the kernels of
    _geometry.gaussian_kernel1d within a float32 unit in the last place (NumPy's own exp may
    differ there on some CPUs); NumPy's summation order in _np_sum."""
    import math

    from synthgen._geometry import gaussian_kernel1d
    from synthgen.rendering import BLUR_TRUNCATE as T

    rng = np.random.default_rng(13)
    for case in range(300):
        m = int(rng.integers(1, 30))
        sig = rng.uniform(0.0, 3.0, m) if case % 3 else rng.uniform(0.0, 30.0, m)
        sig[rng.random(m) < 0.1] = 1e-3  # the single-tap kernel
        sig[rng.random(m) < 0.1] = 1.5 / T  # r exactly at a rounding boundary
        out, offs, lens = k.blur_kernels_nb(sig, T)
        assert offs.tolist() == (np.cumsum(lens) - lens).tolist() and out.size == lens.sum()
        for i, s in enumerate(sig.tolist()):
            got = out[offs[i] : offs[i] + lens[i]]
            if s <= 1e-3:
                assert got.tolist() == [1.0]
                continue
            r = int(T * s + 0.5)
            e = np.array([math.exp(-0.5 * ((x / s) * (x / s))) for x in range(-r, r + 1)])
            want = (e / np.sum(e)).astype(np.float32)
            np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
            ref = gaussian_kernel1d(s, T).astype(np.float32)
            np.testing.assert_array_max_ulp(got, ref, maxulp=1)
    for n in (0, 1, 7, 8, 9, 15, 16, 17, 127, 128, 129, 300, 1001):
        a = rng.random(n + 3) * 10.0 ** rng.integers(-6, 6, n + 3)
        assert k._np_sum(a, 2, n) == np.sum(a[2 : 2 + n]), n


def test_kernel_conv_stats_measures_what_tex_stats_measures(backend):
    """sg_seg_conv_stats: the grid's last smoothing pass (here the identity: a one-tap kernel)
    with the rescale's statistics of its output, against sg_seg_tex_stats on that output and
    against NumPy: a segment with values above the threshold, one with none (the mean of
    all then), one with values exactly at it (not above); on the many-block stand-in and a
    GPU, blocks of a segment each add their part."""
    be, dev = backend
    rng = np.random.default_rng(11)
    shapes = [(6, 7, 9), (5, 4, 11), (3, 8, 10)]
    thr = (0.5, 2.0, 0.25)
    grids = [rng.random(shapes[0]).astype(np.float32),
             rng.random(shapes[1]).astype(np.float32),  # all below 2.0
             rng.choice(np.float32([0.25, 0.75, 0.1]), shapes[2])]  # fmt: skip
    rows = _Rows(be, dev, 3)
    C = rows.C
    outs = []
    for s, (g, shp) in enumerate(zip(grids, shapes, strict=True)):
        rows.put(s, "GB", g)
        rows.set(s, "GD2", *shp)
        rows.set(s, "G_0", *shp)
        k_d = dev(np.ones(1, np.float32))
        rows.keep.append(k_d)
        rows.T[s, C.GKERN0 + 2] = be.ptr(k_d)
        rows.T[s, C.GKLEN0 + 2] = 1
        rows.T[s, C.GOFF0 + 2] = 0
        outs.append(rows.put(s, "GRID", np.full(shp, np.nan, np.float32)))
        rows.TD[s, C.D_THR] = thr[s]
    st_conv = dev(np.full((3, 3), np.nan))  # (each row's sums written by its last block)
    i32 = np.int32
    sizes = [g.size for g in grids]
    conv_sums = rows.row_sums(sizes, 3)
    rows.launch("sg_seg_conv_stats", sizes, st_conv, *conv_sums, i32(2), i32(C.GB), i32(C.GD2),
                i32(C.GKERN0 + 2), i32(C.GKLEN0 + 2), i32(C.GOFF0 + 2), i32(C.G_2), i32(C.GRID),
                td=True)  # fmt: skip
    for g, out in zip(grids, outs, strict=True):
        np.testing.assert_array_equal(be.download(out), g)
    st_tex = dev(np.full((3, 3), np.nan))
    tex_sums = rows.row_sums(sizes, 3)
    rows.launch("sg_seg_tex_stats", sizes, st_tex, *tex_sums, td=True)
    got, ref = be.download(st_conv), be.download(st_tex)
    np.testing.assert_array_equal(got, ref)  # (the same sums in the same order)
    for _part, done in (conv_sums, tex_sums):  # the counters back at 0 (a launch can rerun)
        assert not be.download(done).any()
    for s, g in enumerate(grids):
        g64 = g.astype(np.float64)
        above = g64[g > np.float32(thr[s])]
        want = (above.sum(), float(above.size), g64.sum())
        np.testing.assert_allclose(got[s], want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(ref[s], want, rtol=1e-12, atol=1e-12)
    assert got[1, 1] == 0 and 0 < got[2, 1] < grids[2].size


def test_kernel_row_sums_do_not_depend_on_the_block_order(backend, monkeypatch):
    """The texture statistics of a grid whose sums round differently in another order (one
    value 1.0, the others 2**-65: a block's sum of them, at most half an ulp of 1.0, is
    dropped by a sum that holds 1.0 already and kept by one that does not): on the
    many-block stand-in, the blocks run ascending and in three shuffled orders give the same
    bits, those of adding each block's sum in block order (sg_row_sums: the row's last block
    adds them so); on a GPU, five launches give the same bits. (Float64 atomics, which add
    the blocks' sums in the order the blocks run, fail it.)"""
    be, dev = backend
    shp = (64, 64, 64)
    g = np.full(shp, 2.0**-65, np.float32)
    g.flat[0] = 1.0
    rows = _Rows(be, dev, 2)
    C = rows.C
    for s in range(2):  # (two rows: the second's counter and slots follow the first's)
        rows.put(s, "GRID", g)
        rows.set(s, "G_0", *shp)
        rows.TD[s, C.D_THR] = 0.0

    def run(order):
        if hasattr(be, "block_order"):
            monkeypatch.setattr(be, "block_order", order)
            monkeypatch.setattr(be, "thread_order", order)  # (the SIMT stand-in's threads)
        st = dev(np.full((2, 3), np.nan))
        rows.launch("sg_seg_tex_stats", g.size, st, *rows.row_sums(g.size, 3), td=True)
        return be.download(st)

    ref = run(None)
    assert ref[0].tolist() == ref[1].tolist()
    exact = 1.0 + (g.size - 1) * 2.0**-65
    np.testing.assert_allclose(ref[0], (exact, g.size, exact), rtol=1e-14)
    if getattr(be, "threads", 0) == 1:  # the stand-in: each block one thread, walking in turn
        nb = int(rows._schedule(g.size)[1][0]) // 2  # (blocks of a row)
        flat = g.ravel().astype(np.float64).tolist()
        total = 0.0
        for b in range(nb):
            part = 0.0
            for t in range(b, len(flat), nb):
                part += flat[t]
            total += part
        assert ref[0, 2] == total
    for order in (1, 2, 3) if hasattr(be, "block_order") else (None,) * 4:
        assert run(order).tolist() == ref.tolist()


@pytest.mark.parametrize(
    "old, new",
    [
        # the block reduction's first barrier: a reduction's writes of shared memory must
        # not overtake the previous reduction's reads of it
        ("    __syncthreads();  // the previous reduction's reads of part are done\n", ""),
        # the row sums' barrier, after thread 0 has said whether the block is the row's last
        ("    __syncthreads();\n    if (!sg_last) return;\n", "    if (!sg_last) return;\n"),
        # the reduction's last warp reads all 32 slots of shared memory, not one per warp:
        # slots no thread of the block wrote (the stand-in fills them afresh at each block)
        ("v = lane < (int)((blockDim.x + 31) >> 5) ? part[lane] : identity;", "v = part[lane];"),
    ],
    ids=["reduction", "row-sums", "unwritten-shared"],
)
def test_the_simt_stand_in_fails_broken_block_synchronisation(tmp_path, emu_simt, old, new):
    """The SIMT stand-in can fail: with a barrier taken out of kernels/, or a read of shared
    memory the block has not written, the texture statistics of a grid (whole numbers:
    exact sums in any order) come out wrong, or the launch stops with the stand-in's error
    (threads waiting at a barrier others have left); the sources as they are give the exact
    sums. (The one-thread stand-ins, which run the kernels' host branches, see none of it.)"""
    g = np.random.default_rng(5).integers(0, 8, (64, 64, 64)).astype(np.float32)
    want = [float(g[g > 3.5].sum()), float((g > 3.5).sum()), float(g.sum())]
    assert _simt_tex_stats(emu_simt, g) == want
    try:
        got = _simt_tex_stats(_simt_mutated(tmp_path, old, new), g)
    except RuntimeError as e:
        assert "sg_seg_tex_stats on the SIMT stand-in" in str(e)
    else:
        assert got != want


@pytest.mark.parametrize(
    "old, new, says",
    [
        # every thread's element loop steps by 0: it never ends
        (
            "         t += sg_nb * (int)blockDim.x)",
            "         t += 0)",
            r"thread \d+: still running",
        ),
        # the block's segment far past the table: a read of unmapped memory
        (
            "            sg_sh[0] = s_;",
            "            sg_sh[0] = s_ + (1 << 28);",
            r"thread \d+: memory fault",
        ),
        # one thread (not the lowest stack's) takes more stack than it has: it reaches the
        # guard page below its stack, instead of writing over the next stack down
        (
            "    SG_SEG_LOOP(total) sg_tex_add(&sums, g[t], thr);",
            "    if (threadIdx.x == 37) ((volatile char*)__builtin_alloca(160 << 10))[0] = 1;\n"
            "    SG_SEG_LOOP(total) sg_tex_add(&sums, g[t], thr);",
            "thread 37: memory fault",
        ),
    ],
    ids=["endless-loop", "wild-read", "stack-overflow"],
)
def test_the_simt_stand_in_stops_a_kernel_that_hangs_or_faults(tmp_path, emu_simt, old, new,
                                                                says):  # fmt: skip
    """A kernel that would hang the suite (a loop that does not end, as a missing barrier
    can make) or crash its process (a read out of bounds; a thread's stack overflowing,
    which would otherwise write over its neighbour's) fails its launch on the SIMT stand-in
    instead, with an error naming the block and thread; the process goes on, and its sound
    kernels with it."""
    g = np.random.default_rng(6).integers(0, 8, (32, 32, 32)).astype(np.float32)
    bad = _simt_mutated(tmp_path, old, new, watchdog_s=1.0)
    with pytest.raises(
        RuntimeError, match=rf"sg_seg_tex_stats on the SIMT stand-in: block \d+, {says}"
    ):
        _simt_tex_stats(bad, g)
    assert _simt_tex_stats(emu_simt, g)[2] == float(g.sum())


def _mutated_kernels(tmp_path, old: str, new: str):
    """A copy of kernels/ with ``old`` (found once in segmented.cu) replaced by ``new``."""
    bad = tmp_path / "kernels"
    shutil.copytree(KERNELS, bad)
    seg = bad / "segmented.cu"
    text = seg.read_text()
    assert text.count(old) == 1
    seg.write_text(text.replace(old, new))
    return bad


def _simt_tex_stats(be: HostBackend, g: np.ndarray) -> list:
    """The texture statistics of grid ``g`` (threshold 3.5), one row, on backend ``be``."""
    rows = _Rows(be, to_device, 1)
    rows.put(0, "GRID", g)
    rows.set(0, "G_0", *g.shape)
    rows.TD[0, rows.C.D_THR] = 3.5
    st = to_device(np.full((1, 3), np.nan))
    rows.launch("sg_seg_tex_stats", g.size, st, *rows.row_sums(g.size, 3), td=True)
    return be.download(st)[0].tolist()


def _simt_mutated(tmp_path, old: str, new: str, watchdog_s: float = 120.0) -> HostBackend:
    """The SIMT stand-in (as ``emu_simt``) built from kernels/ with ``old`` replaced by
    ``new`` (:func:`_mutated_kernels`)."""
    build = tmp_path / "bad"
    build.mkdir()
    be = _simt(build, 64, _mutated_kernels(tmp_path, old, new))
    be.watchdog_s = watchdog_s
    return be


def test_kernel_blocks(backend):
    be, dev = backend
    rng = np.random.default_rng(2)
    rows = _Rows(be, dev, 2)
    C = rows.C
    cases, outs = [], []
    for s, shp in enumerate(((4, 5, 6), (3, 2, 7))):
        z = rng.standard_normal(shp).astype(np.float32)
        inv = [rng.random(n) + 0.5 for n in shp]
        par = (0.7 + s, 0.05, 0.2 + s / 10, 11 + s, 22, -2 + s, 3, 5, 8.0)
        cases.append((z, inv, par))
        rows.put(s, "Z0", z)
        for a in range(3):
            rows.put(s, f"INV{a}", inv[a])
        rows.set(s, "B0", *shp)
        rows.set(s, "BK0", par[3], par[4])
        rows.set(s, "BLK0", *par[5:8])
        rows.TD[s, [C.D_ZSCALE, C.D_BASE, C.D_SCALE, C.D_NCELLS]] = (par[0], par[1], par[2], par[8])
        outs.append(rows.put(s, "FRAC", np.full(shp, np.nan, np.float32)))
    rows.launch("sg_seg_blocks", 120, td=True)
    for (z, inv, p), out in zip(cases, outs, strict=True):
        ref = k.block_sums(z, *inv, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8])
        np.testing.assert_array_equal(be.download(out), ref)


def test_kernel_bbox(backend):
    be, dev = backend
    rng = np.random.default_rng(3)
    masks = [(rng.random((13, 17, 19)) < d).astype(np.uint8) for d in (0.0, 0.001, 0.3)]
    rows = _Rows(be, dev, 3)
    for s, m in enumerate(masks):
        rows.put(s, "MASK", m)
        rows.set(s, "N0", *m.shape)
    out = dev(np.array([[13, -1, 17, -1, 19, -1, 0]] * 3, np.int32))
    rows.launch("sg_seg_bbox", masks[0].size, out)
    got = be.download(out)
    for m, g in zip(masks, got, strict=True):
        ref = k.mask_bbox(m)
        assert g[6] == ref[6]
        if ref[6]:
            assert tuple(int(v) for v in g) == tuple(int(v) for v in ref)


def _shape_case(ph, mask, preset, seed, size):
    from synthgen.rendering import _shape_inputs, tumor_box

    plan = _plan(ph, mask, preset, seed, size)
    t = plan.tumors[0]
    box = tumor_box(t, plan.spacing, plan.shape, plan.organ_bbox)
    pos = [(np.arange(box[a].start, box[a].stop) - t.center_vox[a]) * plan.spacing[a]
           for a in range(3)]  # fmt: skip
    return plan, t, box, _shape_inputs(t, pos)


def test_kernel_shape_gathers_any_layout(backend, small_phantom, organ_masks):
    """Phase A (the per-row part of the shape test, then the gather and the per-voxel part)
    on a Fortran-ordered int16 image and a float32 organ mask: the gathered box and the
    shape test equal the CPU's, in every element."""
    be, dev = backend
    ph = small_phantom
    rows = _Rows(be, dev, 2)
    C = rows.C
    refs, outs = [], []
    img_f = np.asfortranarray(ph.image)
    for s, (preset, organ, size) in enumerate((("kidney", "kidney_left", "large"),
                                               ("liver-classic", "liver", "medium"))):  # fmt: skip
        mask = organ_masks[organ]
        _, t, box, (ctrl, w, pos32, m) = _shape_case(ph, mask, preset, 4, size)
        orig = np.ascontiguousarray(ph.image[box], dtype=np.float32)
        org = np.ascontiguousarray(mask[box])
        ref = np.empty(orig.shape, np.bool_)
        k.shape_mask(ctrl, *w, *pos32, m, org, orig, np.float32(-np.inf), np.float32(np.inf),
                     bool(t.clip_to_organ), ref)  # fmt: skip
        refs.append((orig, org, ref))
        img_d = rows.put(s, "IMG", img_f.ravel(order="K"))
        rows.set(s, "IMG_CODE", 2)
        rows.set(s, "IS0", 1, img_f.shape[0], img_f.shape[0] * img_f.shape[1])
        del img_d
        rows.put(s, "ORG", mask.astype(np.float32))
        rows.set(s, "ORG_CODE", 0)
        rows.set(s, "OS0", mask.shape[1] * mask.shape[2], mask.shape[2], 1)
        rows.set(s, "N0", *orig.shape)
        rows.set(s, "O0", *(b.start for b in box))
        rows.put(s, "CTRL", ctrl.astype(np.float32))
        rows.set(s, "G0", *ctrl.shape[1:])
        for a in range(3):
            rows.put(s, f"W{a}", np.asarray(w[a], np.float32))
        # positions come from the centre and the spacing (the kernel's own arithmetic)
        rows.set(s, "C0", *t.center_vox)
        rows.TD[s, [C.D_SP0, C.D_SP1, C.D_SP2]] = ph.spacing
        rows.TD[s, C.D_M : C.D_M + 9] = np.asarray(m, np.float64).ravel()
        rows.set(s, "CLIP", int(bool(t.clip_to_organ)))
        rows.TF[s, [rows.C.F_TLO, rows.C.F_THI]] = (-np.inf, np.inf)
        outs.append(tuple(rows.put(s, c, np.full(orig.shape, f, dt)) for c, f, dt in
                          (("ORIG", np.nan, np.float32), ("ORGAN", 255, np.uint8),
                           ("MASK", 255, np.uint8), ("Q2", np.nan, np.float32))))  # fmt: skip
        # the per-row part of the shape test (3 + 3 g2 floats per (i, j)), poisoned
        rows.put(s, "ROWS", np.full(orig.shape[0] * orig.shape[1] * (3 + 3 * ctrl.shape[3]),
                                    np.nan, np.float32))  # fmt: skip
    rows.launch("sg_seg_rows", max(r[0].shape[0] * r[0].shape[1] for r in refs), td=True)
    rows.launch("sg_seg_shape", max(r[0].size for r in refs), tf=True, td=True)
    for (orig, org, ref), (o, g, mk, q2) in zip(refs, outs, strict=True):
        np.testing.assert_array_equal(be.download(o), orig)
        np.testing.assert_array_equal(be.download(g), org.view(np.uint8))
        np.testing.assert_array_equal(be.download(mk), ref.view(np.uint8))
        assert np.isfinite(be.download(q2)).all()


def test_kernel_blend_apply(backend, small_phantom, organ_masks):
    """The texture grid's rescale in place, the blend (plain and with appearance) and the
    write-back of two overlapping tumors, which merges their changes as it reads them, into a
    strided int16 image, against the CPU kernels."""
    from synthgen._appearance import N_APP

    be, dev = backend
    rng = np.random.default_rng(5)
    shp = (9, 8, 7)
    image = (rng.normal(90, 15, (20, 20, 20))).astype(np.int16)
    rows = _Rows(be, dev, 2)
    C = rows.C
    origins = [(2, 3, 4), (6, 5, 6)]  # overlapping boxes
    cases, grids = [], []
    for s in range(2):
        o = origins[s]
        box = tuple(slice(o[a], o[a] + shp[a]) for a in range(3))
        orig = image[box].astype(np.float32)
        organ = (rng.random(shp) < 0.8).astype(np.uint8)
        mask = (rng.random(shp) < 0.5).astype(np.uint8)
        blur = (rng.random(shp) * mask).astype(np.float32)
        g = rng.random((5, 6, 4)).astype(np.float32)
        pos = [np.arange(shp[a], dtype=np.float64) * 1.3 for a in range(3)]
        ic = [k.interp_coords_nb(pos[a], -0.5, 2.0, g.shape[a]) for a in range(3)]
        q2 = rng.random(shp).astype(np.float32) * 1.2
        app = np.zeros(N_APP, np.float32)
        keys = np.arange(8, dtype=np.uint32) * 7 + 3
        if s == 1:  # rim, necrosis, specks, noise
            app[:] = (0.7, 5.0, 30.0, 0.4, 3.0, 15.0, 0.2, 0.05, 150.0, 300.0, 0.9, 6.0, 4.0)
        cases.append((box, orig, organ, mask, blur, g, ic, q2, app, keys))
        rows.put(s, "TORIG", orig)
        rows.put(s, "TORGAN", organ)
        rows.put(s, "TMASK", mask)
        rows.put(s, "BLUR", blur)
        grids.append(rows.put(s, "GRID", g))
        rows.set(s, "G_0", *g.shape)
        # the texture coordinates of voxel positions i * 1.3 on a grid at -0.5 + 2 j, as
        # sg_seg_interp leaves them
        rows.put(s, "INTERP", _interp_table(ic, g.shape))
        rows.set(s, "TN0", *shp)
        rows.set(s, "TO0", *o)
        rows.set(s, "C0", *o)
        rows.set(s, "CLIP", s)
        if s == 1:
            rows.put(s, "TQ2", q2)
            rows.put(s, "APP", app)
            rows.put(s, "KEYS", keys)
            rows.set(s, "OFF0", -4, -3, -2)
        rows.TF[s, [C.F_TLO, C.F_THI, C.F_CONTRAST, C.F_ORGAN_HU]] = (-100, 300, 40 - 70 * s, 100)
        rows.TF[s, [C.F_CMIN, C.F_CMAX, C.F_LO, C.F_HI]] = (-10, 400, -1024, 3071)
    deltas = [rows.put(s, "DELTA", np.zeros(shp, np.float32)) for s in range(2)]
    merged = [rows.put(s, "MERGED", np.full(shp, np.nan, np.float32)) for s in range(2)]
    rows.put(0, "PART", np.array([1], np.int64))
    rows.put(1, "PART", np.array([0], np.int64))
    rows.set(0, "NPART", 1)
    rows.set(1, "NPART", 1)
    img_d = dev(np.asfortranarray(image).ravel(order="K"))
    for s in range(2):
        rows.T[s, C.DST] = be.ptr(img_d)
        rows.set(s, "DST_CODE", 2)
        rows.set(s, "DS0", 1, 20, 400)
        rows.set(s, "DO0", *origins[s])
        rows.set(s, "ROUND", 1)

    def blend_ref(s, g):
        _box, orig, organ, _mask, blur, _g, ic, q2, app, keys = cases[s]
        d = np.zeros(shp, np.float32)
        k.blend_tumor(orig, organ.astype(bool), np.float32(-100), np.float32(300), blur, g,
                      ic[0][0], ic[0][1], ic[1][0], ic[1][1], ic[2][0], ic[2][1],
                      np.float32(40 - 70 * s), np.float32(100), bool(s), d,
                      q2 if s else None, app if s else None, keys if s else None,
                      -4, -3, -2)  # fmt: skip
        return d

    # the texture's statistics (sum above the threshold, count, sum of all): sg_seg_tex_scale
    # rescales the grid in place, clip(g * u0 / mean, 0, 1) (row 1: none above, the mean of
    # all), and the blend reads it
    tex_stats = np.array([[30.0, 50.0, 80.0], [0.0, 0.0, 36.0]])
    rows.TD[:, C.D_U0] = (0.9, 0.4)
    rows.launch("sg_seg_tex_scale", 120, dev(tex_stats), td=True)
    for dl in deltas:  # (poisoned: the blend writes every element)
        dl[...] = np.nan
    rows.launch("sg_seg_blend", 504, tf=True)
    ref_d = []
    for s in range(2):
        g = cases[s][5]
        mean = tex_stats[s, 0] / tex_stats[s, 1] if tex_stats[s, 1] else (
            tex_stats[s, 2] / g.size)  # fmt: skip
        # (float32 products, as the kernel's)
        g = np.clip(g * np.float32(rows.TD[s, C.D_U0] / mean), 0, 1).astype(np.float32)
        assert (g == 1).any() and (g < 1).any()
        np.testing.assert_array_equal(be.download(grids[s]), g)
        d = blend_ref(s, g)
        np.testing.assert_array_equal(be.download(deltas[s]), d)
        ref_d.append(d)
    # the write-back merges each row's change with its partner's as it reads them; row 0's
    # merged change is written too (the host reads it where its image is on the host), row
    # 1's not (0: no buffer)
    rows.T[1, C.MERGED] = 0
    ov = (slice(4, 9), slice(2, 8), slice(2, 7)), (slice(0, 5), slice(0, 6), slice(0, 5))
    m0, m1 = ref_d[0].copy(), ref_d[1].copy()
    k.merge_strongest(m0[ov[0]], ref_d[1][ov[1]])
    k.merge_strongest(m1[ov[1]], ref_d[0][ov[0]])
    assert (m0 != ref_d[0]).any() and (m1 != ref_d[1]).any()
    stats = dev(np.zeros((2, 2), np.float64))
    rows.launch("sg_seg_apply", 504, stats, *rows.row_sums(504, 2), tf=True)
    np.testing.assert_array_equal(be.download(merged[0]), m0)
    assert np.isnan(be.download(merged[1])).all()
    out = be.download(img_d).reshape(20, 20, 20, order="F")
    tgt = image.copy()
    st = be.download(stats)
    for s, m in ((0, m0), (1, m1)):  # (row 1 after row 0: in the overlap both are the same)
        box, orig, _, mask, *_ = cases[s]
        n_ref, acc = k.apply_delta(tgt[box], orig, m, mask.astype(bool), -10.0, 400.0,
                                   -1024.0, 3071.0, True)  # fmt: skip
        assert st[s, 0] == n_ref and abs(st[s, 1] - acc) <= 1e-6 * max(1.0, abs(acc))
    np.testing.assert_array_equal(out, tgt)


@pytest.fixture(scope="module")
def emu_table_backend(tmp_path_factory):
    """The host stand-in with a write-back partner cache of one partner (``SG_PMAX=1``):
    rows that two or more partners overlap merge through the table (``sg_merged_at``), as
    rows with more than eight do with the kernels as built."""
    return HostBackend(tmp_path_factory.mktemp("cuda-emu-pmax1"), defines=("SG_PMAX=1",))


@pytest.mark.parametrize("table", [False, True], ids=["cached", "table"])
def test_merge_ties_give_every_row_the_same_value(backend, table, request):
    """Overlapping tumors whose changes at a voxel are equally strong with opposite signs:
    the merge takes the larger value (the darkening), whatever the order in which the
    changes meet, on the CPU (merge_strongest, either way round) and in the write-back of
    every row, so the rows' writes of the voxel agree and the image does not depend on the
    order the GPU runs its blocks in. Three rows over one line of voxels, merged changes
    written for all; their partners merged from the write-back's shared cache, and (the
    stand-in built with a cache of one) through the table."""
    be, dev = backend
    if table:
        if request.node.callspec.params["backend"] != "emu":
            pytest.skip("the table path is checked on the plain host stand-in")
        be = request.getfixturevalue("emu_table_backend")
    rows = _Rows(be, dev, 3)
    C = rows.C
    n = 6
    d = [np.array([2, -3, 4, 5, -6, 1], np.float32),  # row 0, voxels 0..5
         np.array([-4, -5, 6, -1, 3, 8], np.float32),  # row 1, voxels 2..7
         np.array([6, 1, -3, 8, 2, 0], np.float32)]  # row 2, voxels 4..9  # fmt: skip
    starts = (0, 2, 4)
    parts = ([1, 2], [0, 2], [0, 1])
    image = np.full((1, 1, 10), 100.0, np.float32)
    img_d = dev(image.ravel())
    merged = []
    for s in range(3):
        rows.put(s, "TORIG", np.full(n, 100.0, np.float32))
        rows.put(s, "DELTA", d[s])
        rows.put(s, "TMASK", np.ones(n, np.uint8))
        merged.append(rows.put(s, "MERGED", np.full(n, np.nan, np.float32)))
        rows.put(s, "PART", np.array(parts[s], np.int64))
        rows.set(s, "NPART", 2)
        rows.set(s, "TN0", 1, 1, n)
        rows.set(s, "TO0", 0, 0, starts[s])
        rows.T[s, C.DST] = be.ptr(img_d)
        rows.set(s, "DST_CODE", 0)
        rows.set(s, "DS0", 10, 10, 1)
        rows.set(s, "DO0", 0, 0, starts[s])
        rows.TF[s, [C.F_CMIN, C.F_CMAX, C.F_LO, C.F_HI]] = (-1000, 1000, -1024, 3071)
    # the strongest change per voxel of the line, larger value on ties
    line = np.zeros(10, np.float32)
    for s in range(3):
        k.merge_strongest(line[None, None, starts[s] : starts[s] + n], d[s][None, None])
    assert list(line) == [2, -3, 4, 5, 6, 1, 3, 8, 2, 0]  # (voxels 2 to 6: ties)
    for s in range(3):  # the CPU's pairwise merge, in any order of the partners
        for order in (parts[s], parts[s][::-1]):
            m = d[s].copy()
            for q in order:
                lo, hi = max(starts[s], starts[q]), min(starts[s], starts[q]) + n
                k.merge_strongest(m[None, None, lo - starts[s] : hi - starts[s]],
                                  d[q][None, None, lo - starts[q] : hi - starts[q]])  # fmt: skip
            np.testing.assert_array_equal(m, line[starts[s] : starts[s] + n])
    stats = dev(np.zeros((3, 2), np.float64))
    rows.launch("sg_seg_apply", n, stats, *rows.row_sums(n, 2), tf=True)
    for s in range(3):
        np.testing.assert_array_equal(be.download(merged[s]), line[starts[s] : starts[s] + n])
    np.testing.assert_array_equal(be.download(img_d), 100 - line)


@pytest.fixture(params=["emu", pytest.param("gpu", marks=pytest.mark.gpu)])
def view_backend(request):
    """``(backend, to_device)`` for planning's reads (no kernels: one stand-in is enough)."""
    if request.param == "emu":
        return request.getfixturevalue("emu"), to_device
    return gpu_backend()


@pytest.mark.parametrize("preset", synthgen.list_presets())
def test_planning_reads_device_data_through_views(view_backend, small_phantom, preset,
                                                  monkeypatch):  # fmt: skip
    """A plan made from GPU-resident data (organ box reduced on the device, its mask copied
    back once as bits, the image's regions and tests against thresholds answered on the
    device) is the plan made from the host arrays: every preset, an int16 and a float32
    image, a uint8 mask and a float one of values on both sides of 0.5; a reused index
    (its cache) gives the same plans again. And at most 8 copies back a plan (10 with the
    index's two: the box and the mask's bits), where each slice drawn was one before."""
    be, dev = view_backend
    ph = small_phantom
    mask = ph.mask(load_preset(preset).organ)  # (both kidneys for "kidney")
    ref_idx = synthgen.index_organ(mask)
    sizes = _count_downloads(be, monkeypatch)
    prob = np.where(mask, 0.75, 0.25).astype(np.float32)
    for image, mask_d in ((ph.image, mask.astype(np.uint8)), (ph.image.astype(np.float32), prob)):
        img_v, mask_v, idx = _cuda.host_views(be, dev(image), dev(mask_d))
        assert idx.bbox == ref_idx.bbox and idx.count == ref_idx.count
        host_idx = synthgen.index_organ(mask)
        without_index = {}  # (the plans made without an index, once a seed)
        for seed in (3, 4, 3):  # (the last one from the index's cache)
            sizes.clear()
            a = synthgen.plan(img_v, mask_v, organ=preset, seed=seed, spacing=ph.spacing,
                              organ_index=idx)  # fmt: skip
            assert len(sizes) <= 8, sizes
            b = synthgen.plan(image, mask, organ=preset, seed=seed, spacing=ph.spacing,
                              organ_index=host_idx)  # fmt: skip
            assert a.to_json() == b.to_json()
            if seed not in without_index:
                without_index[seed] = synthgen.plan(image, mask, organ=preset, seed=seed,
                                                    spacing=ph.spacing).to_json()  # fmt: skip
            assert without_index[seed] == b.to_json()
    with pytest.raises(ValueError, match="organ mask is empty"):
        _cuda.host_views(be, dev(ph.image), dev(np.zeros(mask.shape, np.uint8)))
    with pytest.raises(ValueError, match="organ_index is for shape"):
        _cuda.host_views(be, dev(ph.image[1:]), dev(mask[1:].astype(np.uint8)), ref_idx)


def test_planning_views_of_one_device_array_and_one_host_array(view_backend, small_phantom,
                                                               organ_masks):  # fmt: skip
    """An image on the device and its mask on the host (with and without an organ index),
    or the other way round, plan as both on the host: the host array is read directly."""
    be, dev = view_backend
    ph = small_phantom
    mask = organ_masks["liver"]
    image = ph.image.astype(np.float32)
    idx = synthgen.index_organ(mask)
    want = synthgen.plan(image, mask, organ="liver", seed=5, spacing=ph.spacing).to_json()
    for img, m, ix in ((dev(image), mask, idx), (dev(image), mask, None), (image, dev(mask), None)):
        img_v, mask_v, ix_v = _cuda.host_views(be, img, m, ix)
        assert (img_v is img) == (not be.on_device(img)) and (mask_v is m) == (not be.on_device(m))
        got = synthgen.plan(img_v, mask_v, organ="liver", seed=5, spacing=ph.spacing,
                            organ_index=ix_v)  # fmt: skip
        assert got.to_json() == want


def test_planning_on_device_data_refuses_nan(view_backend, small_phantom, organ_masks,
                                             monkeypatch):  # fmt: skip
    """A NaN in the organ's box of a float image on the device is found there (one byte
    copied back, not the box), as on the host; one outside the box is not looked at (host
    and device alike)."""
    be, dev = view_backend
    sizes = _count_downloads(be, monkeypatch)
    ph = small_phantom
    mask = organ_masks["liver"]
    idx = synthgen.index_organ(mask)
    inside = tuple((b.start + b.stop) // 2 for b in idx.bbox)
    for where, bad in ((inside, True), ((0, 0, 0), False)):
        image = ph.image.astype(np.float32)
        image[where] = np.nan
        img_v, mask_v, ix = _cuda.host_views(be, dev(image), dev(mask))
        sizes.clear()
        assert img_v.all_finite(ix.bbox) is not bad and sizes == [1]
        for img, m, i in ((img_v, mask_v, ix), (image, mask, idx)):
            if bad:
                with pytest.raises(ValueError, match="NaN or inf"):
                    synthgen.plan(img, m, organ="liver-classic", seed=1, spacing=ph.spacing,
                                  organ_index=i)  # fmt: skip
            else:
                synthgen.plan(img, m, organ="liver-classic", seed=1, spacing=ph.spacing,
                              organ_index=i)  # fmt: skip


def test_planning_views_leave_host_data_alone(small_phantom, organ_masks):
    """Host arrays go to planning as they are (no backend, no copy)."""
    img, mask = small_phantom.image, organ_masks["liver"]
    idx = synthgen.index_organ(mask)
    got = _cuda.planning_views(img, mask, idx)
    assert got[0] is img and got[1] is mask and got[2] is idx


@pytest.mark.gpu
def test_synthesize_on_cupy_arrays(small_phantom, organ_masks):
    """The one-call API on CuPy data: plans from device views, renders on the GPU."""
    gpu_backend()
    import cupy

    ph = small_phantom
    mask = organ_masks["liver"]
    img = cupy.asarray(ph.image)
    res = synthgen.synthesize(img, cupy.asarray(mask), organ="liver-classic", seed=8,
                              spacing=ph.spacing, out=img)  # fmt: skip
    ref = synthgen.synthesize(ph.image, mask, organ="liver-classic", seed=8, spacing=ph.spacing)
    assert res.image is img
    assert res.plan.to_json() == ref.plan.to_json()
    assert float(cupy.abs(img.astype(cupy.float64) - cupy.asarray(ref.image)).max()) <= 1.0


@pytest.mark.gpu
def test_mass_effect_warp_is_ordered_on_the_callers_stream(small_phantom, organ_masks):
    """render_batch(stream=S), S non-blocking, with a preset whose large tumors push tissue:
    the warp reads the image after the caller's work still pending on S (before: on the
    current stream, so it read what was there before that work) and writes it back before
    the render on S."""
    gpu_backend()
    import cupy

    ph = small_phantom
    mask = organ_masks["liver"]
    plan = _plan(ph, mask, "liver", 3, "large")
    assert plan.get_preset().mass_effect.enabled
    ref = synthgen.api.render_batch([plan], [ph.image.copy()], [mask])[0]
    s = cupy.cuda.Stream(non_blocking=True)
    with s:
        img = cupy.full(ph.image.shape, -1000, dtype=ph.image.dtype)
        s.synchronize()
        a = cupy.ones((8192, 8192), dtype=cupy.float32)
        for _ in range(8):  # ~0.1 s of work on S that the scan's upload waits for
            b = a @ a
        img[...] = cupy.asarray(ph.image) + (b[0, 0] * 0).astype(img.dtype)
    synthgen.api.render_batch([plan], [img], [cupy.asarray(mask)], outs=[img], stream=s)
    s.synchronize()
    got = cupy.asnumpy(img)
    assert np.abs(got.astype(np.float64) - ref.image).max() <= 1.0


@pytest.mark.gpu
def test_host_image_with_a_gpu_organ_mask(small_phantom, organ_masks):
    """A NumPy image with a CuPy organ mask renders on the GPU with host boxes: the tumor
    mask and label map (made on the mask's side) and a host tumor mask written from them
    are the CPU's."""
    gpu_backend()
    import cupy

    ph = small_phantom
    mask = organ_masks["liver"]
    plan = _plan(ph, mask, "liver-classic", 4, "mix")
    ref = synthgen.render(plan, ph.image, mask)
    res = synthgen.render(plan, ph.image, cupy.asarray(mask))
    _compare(ref, res, _cuda.CupyBackend(0))
    assert int(cupy.count_nonzero(res.label == 2)) == int(cupy.count_nonzero(res.tumor_mask))
    host = res.write_tumor_mask(np.zeros(plan.shape, dtype=bool))
    assert np.count_nonzero(host != ref.tumor_mask) <= 0.001 * max(1, ref.tumor_mask.sum())


@pytest.mark.gpu
def test_torch_cuda_tensors_render_in_place_through_dlpack(small_phantom, organ_masks):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU for torch")
    gpu_backend()
    ph = small_phantom
    mask = organ_masks["liver"]
    plan = _plan(ph, mask, "liver-classic", 21, "mix")
    img = torch.from_numpy(ph.image.copy()).cuda()
    m = torch.from_numpy(mask).cuda()
    ptr = img.data_ptr()
    res = synthgen.render(plan, img, m, out=img)  # device="auto": follows the tensors
    assert res.image is img and img.data_ptr() == ptr
    ref = synthgen.render(plan, ph.image, mask)
    got = img.cpu().numpy()
    assert np.abs(got.astype(float) - ref.image).max() <= 1.0
    assert isinstance(res.label, torch.Tensor) and res.label.is_cuda
    n = int(ref.tumor_mask.sum())
    assert np.count_nonzero((res.label.cpu().numpy() == 2) != (ref.label == 2)) <= 0.001 * n
    tm = res.tumor_mask
    assert tm.dtype == torch.bool and abs(int(tm.sum()) - n) <= 0.001 * n


# ---------------------------------------------------------------------------------------
# device selection (no GPU needed)
# ---------------------------------------------------------------------------------------


def test_parse_device() -> None:
    assert parse_device("cuda:1") == ("cuda", 1)
    assert parse_device("AUTO") == ("auto", None)
    for bad in ("gpu", "cpu:0", "cuda:", "cuda:x", 3):
        with pytest.raises(ValueError, match="device must be"):
            parse_device(bad)  # type: ignore[arg-type]


def test_auto_follows_the_data() -> None:
    a = np.zeros((2, 2, 2))
    assert str(resolve_device("auto", a)) == "cpu"
    assert str(resolve_device("cpu", a)) == "cpu"
    assert array_kind(a) == "numpy"


class _OnGpu:
    """What the device checks read of a CuPy array on GPU ``index`` (``array_kind`` goes by
    the type's module): shape, dtype and device; no memory, so no render can start on it."""

    def __init__(self, a: np.ndarray, index: int) -> None:
        self.shape, self.dtype, self.size, self.ndim = a.shape, a.dtype, a.size, a.ndim
        self.device = type("Device", (), {"id": index})()


_OnGpu.__module__ = "cupy._core.core"


def test_a_label_map_on_another_gpu_is_refused(small_phantom, organ_masks) -> None:
    """A label map is written by a kernel on the render's GPU: one on another GPU than the
    data (``cuda:1`` beside ``cuda:0``) is refused before anything runs, as an organ mask or
    an ``out`` there is, instead of a launch writing another device's memory (an illegal
    address that takes the process's CUDA context down, or with peer access a silent
    write over the link); and ``device='cpu'`` refuses a label map on a GPU."""
    ph = small_phantom
    mask = organ_masks["liver"]
    plan = _plan(ph, mask, "liver", 0, None)
    img, org = _OnGpu(ph.image, 0), _OnGpu(mask, 0)
    lab = _OnGpu(np.zeros(ph.image.shape, np.uint8), 1)
    assert array_kind(lab) == "cupy"
    with pytest.raises(ValueError, match="different GPUs"):
        rendering.render(plan, img, org, label_out=lab)
    with pytest.raises(ValueError, match="different GPUs"):
        rendering.render_batch([plan], [img], [org], label_outs=[lab])
    with pytest.raises(ValueError, match="device='cpu' but the data is on cuda:1"):
        rendering.render(plan, ph.image, mask, label_out=lab, device="cpu")


def test_cuda_without_a_usable_gpu_says_what_is_missing(small_phantom, organ_masks) -> None:
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
        pytest.skip("CUDA is usable here")
    except ImportError:
        missing = "CuPy"
    except Exception:
        missing = "CUDA is not usable"
    ph = small_phantom
    with pytest.raises(DeviceError, match=missing):
        synthgen.synthesize(ph.image, organ_masks["liver"], organ="liver", seed=0,
                            spacing=ph.spacing, device="cuda")  # fmt: skip


def test_importing_synthgen_does_not_touch_cuda() -> None:
    code = (
        "import sys, synthgen, synthgen.rendering, synthgen.api\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('cupy', 'cupyx', 'torch')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_wall_tumors_of_a_batch_render_on_threads(view_backend, small_phantom, organ_masks,
                                                  monkeypatch):  # fmt: skip
    """A batch's hollow-organ wall tumors render on the host concurrently (the shared
    thread pool, as the CPU path renders tumors; a device image's boxes copied back first,
    by the calling thread): every plan as the CPU renders it, the same images as on one
    thread, and more than one thread did render."""
    from synthgen import _pool

    be, dev = view_backend  # (host threads, whatever the kernels' stand-in: one is enough)
    ph = small_phantom
    jobs = [("colon", "colon", s) for s in (1, 2, 5, 13)] + [("esophagus", "esophagus", 3)]
    plans = [_plan(ph, organ_masks[o], p, s, None) for p, o, s in jobs]
    n_walls = sum(t.kind == "wall" for p in plans for t in p.tumors)
    assert n_walls >= 5
    refs = [rendering.render(p, ph.image, organ_masks[o]) for p, (_, o, _) in
            zip(plans, jobs, strict=True)]  # fmt: skip
    real = _segments.render_wall
    threads: list[int] = []

    def recorded(*a):
        threads.append(threading.get_ident())
        time.sleep(0.02)  # (every thread of the pool gets an item)
        return real(*a)

    monkeypatch.setattr(_segments, "render_wall", recorded)
    monkeypatch.setattr(_pool, "MIN_PARALLEL_WORK", 0)
    monkeypatch.setattr(_pool, "ALWAYS_PARALLEL_WORK", 0)
    images = {}
    for n in (1, 4):
        monkeypatch.setattr(_pool, "_NUM_THREADS", n)
        threads.clear()
        imgs = [dev(ph.image) for _ in jobs]
        res = _cuda.render_on_gpu(plans, imgs, [dev(organ_masks[o]) for _, o, _ in jobs],
                                  device_id=0, be=be, outs=imgs)  # fmt: skip
        for ref, got in zip(refs, res, strict=True):
            _compare(ref, got, be)
        images[n] = [be.download(i) for i in imgs]
        assert len(threads) == n_walls
        assert (len(set(threads)) > 1) == (n > 1), threads
    for a, b in zip(images[1], images[4], strict=True):
        np.testing.assert_array_equal(a, b)


def test_foreign_stream_handles_use_the_stream_protocol_where_cupy_has_it():
    """A raw stream handle (a caller's, torch's) becomes a CuPy stream through CuPy 14's
    ``Stream.from_external`` (``__cuda_stream__``: version 0, the handle), which deprecated
    ``ExternalStream`` (a warning at every render of torch CUDA data on the H200 run); an
    older CuPy without it still gets ``ExternalStream``."""
    import types

    from synthgen import _cuda

    made = []

    class Stream:
        @classmethod
        def from_external(cls, obj):
            made.append(("from_external", obj.__cuda_stream__()))
            return "new"

    def external(ptr):
        made.append(("ExternalStream", ptr))
        return "old"

    new = types.SimpleNamespace(cuda=types.SimpleNamespace(Stream=Stream))
    assert _cuda._external_stream(new, 0xBEEF) == "new"

    class OldStream:
        pass

    old = types.SimpleNamespace(
        cuda=types.SimpleNamespace(Stream=OldStream, ExternalStream=external)
    )
    assert _cuda._external_stream(old, 0xBEEF) == "old"
    assert made == [("from_external", (0, 0xBEEF)), ("ExternalStream", 0xBEEF)]
