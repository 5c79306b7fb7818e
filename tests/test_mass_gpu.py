"""The mass effect's warp of GPU data on the GPU (``synthgen._mass_gpu``,
``kernels/mass_effect.cu``) against the host route it replaces (each group's box copied to
the host as a C-ordered array, warped by the numba kernel, copied back): the same image and
label maps bit for bit.

Without a GPU the driver runs on the test suite's stand-ins (``tests/_cuda_emu.py``: the CUDA
C compiled for the host): one thread a block, and the SIMT stand-in (64 fibers a block, run
in shuffled orders); these ``emu`` tests are CI's (``benchmarks/gpu_check.py`` leaves them
out). On a GPU (``@pytest.mark.gpu``) the driver runs through CuPy and torch.
"""

from __future__ import annotations

import numpy as np
import pytest
from _cuda_emu import HostBackend, gpu_backend, to_device
from scipy import ndimage
from test_mass_effect import Tumor, _rot  # (the tumors and rotations of its tests)

from synthgen import _mass_gpu
from synthgen import mass_effect as me


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """The stand-in (one thread a block, blocks shuffled) and the SIMT stand-in."""
    tmp = tmp_path_factory.mktemp("me-gpu")
    (tmp / "one").mkdir()
    (tmp / "simt").mkdir()
    try:  # (mass_effect.cu alone: the segmented kernels are the other tests' and take long)
        one = HostBackend(tmp / "one", sources=("mass_effect",))
        simt = HostBackend(tmp / "simt", threads=64, sources=("mass_effect",))
    except RuntimeError as e:
        pytest.skip(str(e))
    one.block_order = 3
    simt.block_order = simt.thread_order = 4
    return {"one thread a block": one, "SIMT, 64 threads a block": simt}


def _scene(dtype, seed: int = 0):
    """A smooth image of ``dtype`` (8- and 16-bit integers over their whole range, so that
    rounding and clipping reach its ends), label maps of every element size, and fields:
    three overlapping tumors (composed in one group, two rotated), one apart, and one whose
    centre lies outside the scan (its box clipped at the corner, its sample points clamped
    to the scan)."""
    rng = np.random.default_rng(seed)
    shape = (70, 64, 50)
    base = ndimage.gaussian_filter(rng.normal(0.0, 1.0, shape), 2.0)
    base = base / np.abs(base).max()
    dt = np.dtype(dtype)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        lo, hi = (info.min, info.max) if dt.itemsize <= 2 else (-30000, 30000)
        lo = max(lo, info.min)
        img = np.clip(np.rint((base * 0.7 + 0.5) * (float(hi) - lo) + lo), lo, hi).astype(dt)
        img[5, 5, 5], img[6, 5, 5] = lo, hi  # (the range's ends)
    else:
        img = (base * 400.0 - 50.0).astype(dt)
    tumors = [
        Tumor((24.0, 22.5, 20.0), (9.0, 9.0, 9.0), index=0),
        Tumor((32.0, 27.0, 24.5), (8.0, 10.0, 6.5), _rot(seed + 1), index=1),
        Tumor((20.0, 33.0, 28.0), (7.0, 6.0, 8.0), _rot(seed + 5), index=2),
        Tumor((62.0, 55.0, 40.0), (3.0, 4.0, 3.0), _rot(seed + 2), index=3),
        Tumor((-3.0, 66.5, 52.0), (7.0, 7.0, 7.0), index=4),
    ]
    fields = me.mass_effect_fields(tumors, (1.0, 0.9, 1.4), shape, strength=0.45,
                                   min_radius_mm=0.0, ramp_mm=0.0, reach=1.7)  # fmt: skip
    organ = base > 0.1
    labels = [
        organ,  # bool
        (rng.integers(0, 4, shape)).astype(np.uint8),
        (rng.integers(-5, 300, shape)).astype(np.int16),
        rng.normal(size=shape).astype(np.float32),
        (rng.integers(0, 2**40, shape)).astype(np.int64),
    ]
    return img, labels, fields


def _host_route(img, labels, fields):
    """What ``mass_effect._warp_any`` does with GPU data the device route does not take (and
    did with all of it before): per group, the box warped on the host
    (``mass_effect._warp_by_boxes``), on copies of the arrays."""
    img, labels = img.copy(), [lab.copy() for lab in labels]
    me._warp_by_boxes(img, labels, fields)
    return img, labels


def _same(a, b) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.ascontiguousarray(a).view(np.uint8),
                                  np.ascontiguousarray(b).view(np.uint8))  # fmt: skip


DTYPES = [np.int16, np.float32, np.uint8, np.float64, np.int32, np.uint16, np.int8, np.int64,
          np.uint32]  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_emu_warp_is_the_host_route(stand_ins, dtype):
    img, labels, fields = _scene(dtype)
    assert [len(g) for g in me._clusters(fields)] == [3, 1, 1]  # three composed, two alone
    want_img, want_labs = _host_route(img, labels, fields)
    assert not np.array_equal(want_img, img)  # (something moved)
    for be in stand_ins.values():
        d_img = to_device(img)
        d_labs = [to_device(lab) for lab in labels]
        assert _mass_gpu.warp_on_device(d_img, d_labs, fields, be=be)
        _same(np.asarray(d_img), want_img)
        for got, want in zip(d_labs, want_labs, strict=True):
            _same(np.asarray(got), want)


def test_emu_strided_boxes_and_no_label_maps(stand_ins):
    """Image and label maps that are views with any strides (a batch's sample, a transposed
    scan): written through their strides, the voxels around them untouched; without label
    maps no index is kept."""
    img, labels, fields = _scene(np.int16, seed=1)
    want_img, want_labs = _host_route(img, labels[:2], fields)
    be = stand_ins["one thread a block"]
    big = to_device(np.full((2, *img.shape), 77, dtype=np.int16))
    big[1] = img
    lab_t = to_device(np.zeros(img.shape[::-1], dtype=np.uint8))
    lab_t.T[...] = labels[1]
    organ = to_device(labels[0])
    assert _mass_gpu.warp_on_device(big[1], [organ, lab_t.T], fields, be=be)
    _same(np.asarray(big[1]), want_img)
    assert (np.asarray(big[0]) == 77).all()
    _same(np.asarray(organ), want_labs[0])
    _same(np.ascontiguousarray(np.asarray(lab_t).T), want_labs[1])
    alone = to_device(img)
    assert _mass_gpu.warp_on_device(alone, [], fields, be=be)
    _same(np.asarray(alone), _host_route(img, [], fields)[0])


def test_emu_a_label_map_given_twice_is_warped_once(stand_ins):
    """Every box is copied before anything is written: a label map passed twice (a render's
    ``label_out`` that is also among the maps to warp in place) reads unwarped voxels both
    times, as on the host route."""
    img, labels, fields = _scene(np.int16, seed=4)
    lab = labels[2]
    want_img, want_labs = _host_route(img, [lab], fields)
    d_img, d_lab = to_device(img), to_device(lab)
    assert _mass_gpu.warp_on_device(
        d_img, [d_lab, d_lab], fields, be=stand_ins["one thread a block"]
    )
    _same(np.asarray(d_img), want_img)
    _same(np.asarray(d_lab), want_labs[0])


def test_emu_nothing_to_do_and_arrays_it_does_not_take(stand_ins):
    """No fields: done, nothing touched; host arrays: not taken (the caller's host route
    runs); a bool image (stored as ``v != 0`` by the host route): not taken either."""
    img, labels, fields = _scene(np.int16)
    assert _mass_gpu.warp_on_device(img, labels, [])
    assert not _mass_gpu.warp_on_device(img, labels, fields)  # NumPy: not on a GPU
    mask = to_device(img > 0)
    before = np.asarray(mask).copy()
    assert not _mass_gpu.warp_on_device(mask, [], fields, be=stand_ins["one thread a block"])
    assert np.array_equal(np.asarray(mask), before)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.uint8], ids=lambda d: np.dtype(d).name)
def test_gpu_warp_is_the_host_route(dtype):
    """On a GPU, through CuPy: every voxel of image and label maps the host route's."""
    _, upload = gpu_backend()
    import cupy

    img, labels, fields = _scene(dtype, seed=2)
    want_img, want_labs = _host_route(img, labels, fields)
    d_img = upload(img)
    d_labs = [upload(lab) for lab in labels]
    assert _mass_gpu.warp_on_device(d_img, d_labs, fields)
    _same(cupy.asnumpy(d_img), want_img)
    for got, want in zip(d_labs, want_labs, strict=True):
        _same(cupy.asnumpy(got), want)


@pytest.mark.gpu
def test_gpu_warp_of_torch_tensors_on_their_stream():
    """torch CUDA tensors (a bool organ mask, an int64 label map) warped on torch's current
    stream, a side stream: the host route's result once that stream is done."""
    gpu_backend()
    torch = pytest.importorskip("torch")
    img, labels, fields = _scene(np.int16, seed=3)
    labels = [labels[0], labels[4]]
    want_img, want_labs = _host_route(img, labels, fields)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        t_img = torch.from_numpy(img).cuda()
        t_labs = [torch.from_numpy(lab).cuda() for lab in labels]
        assert _mass_gpu.warp_on_device(t_img, t_labs, fields)
    s.synchronize()
    _same(t_img.cpu().numpy(), want_img)
    for got, want in zip(t_labs, want_labs, strict=True):
        _same(got.cpu().numpy(), want)
