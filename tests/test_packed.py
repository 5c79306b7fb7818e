"""Planning's reads of GPU-resident data: the packed organ mask (``synthgen._packed``) and the
device view's answers (``synthgen._cuda.DeviceView``), each against NumPy on the same array."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from _cuda_emu import NumpyDevice, gpu_backend

import synthgen
from synthgen import _cuda
from synthgen._packed import PackedMask, pack_on_device


@pytest.fixture(params=["numpy", pytest.param("gpu", marks=pytest.mark.gpu)])
def dev_backend(request):
    """``(backend, to_device)``: NumPy standing in for the device, or CuPy on GPU 0."""
    if request.param == "numpy":
        return NumpyDevice(), np.asarray
    return gpu_backend()


def _random_key(rng, shape):
    key = []
    for n in shape:
        if rng.random() < 0.25:
            key.append(int(rng.integers(-n, n)))
        else:
            step = int(rng.choice([1, 1, 2, 3, 7, -1, -2, -3]))
            a = int(rng.integers(-n - 3, n + 3)) if rng.random() < 0.8 else None
            b = int(rng.integers(-n - 3, n + 3)) if rng.random() < 0.8 else None
            key.append(slice(a, b, step))
    if rng.random() < 0.2:
        return tuple(key[: int(rng.integers(1, 4))])
    return tuple(key)


def test_packed_mask_reads_as_numpy_reads_the_volume(dev_backend):
    """Every basic index (ints of either sign, slices with any start, stop and step, fewer
    indices than axes, an Ellipsis) reads from a PackedMask what NumPy reads from the
    volume it stands for: the box's bits inside, False outside."""
    be, dev = dev_backend
    rng = np.random.default_rng(7)
    for _ in range(300):
        shape = tuple(int(n) for n in rng.integers(1, 23, 3))
        o = [int(rng.integers(0, n)) for n in shape]
        b = [int(rng.integers(1, n - oo + 1)) for n, oo in zip(shape, o, strict=True)]
        vol = np.zeros(shape, bool)
        box = rng.random(b) < 0.5
        vol[o[0] : o[0] + b[0], o[1] : o[1] + b[1], o[2] : o[2] + b[2]] = box
        packed, box_shape = pack_on_device(be.xp, dev(box))
        pm = PackedMask(shape, o, box_shape, be.download(packed))
        assert pm.shape == shape and pm.dtype == bool and pm.ndim == 3
        for _ in range(8):
            key = _random_key(rng, shape)
            got, want = pm[key], vol[key]
            assert got.dtype == bool and got.shape == want.shape, key
            np.testing.assert_array_equal(got, want, err_msg=str(key))
        np.testing.assert_array_equal(pm[..., 0], vol[..., 0])
        np.testing.assert_array_equal(np.asarray(pm), vol)
    with pytest.raises(IndexError):
        pm[shape[0]]
    for bad in (True, None, 1.0):  # (NumPy: a new axis, or an error; a PackedMask refuses)
        with pytest.raises(IndexError, match="ints and slices"):
            pm[bad]
    with pytest.raises(ValueError, match="packed bytes"):
        PackedMask(shape, o, box_shape, np.zeros(1, np.uint8)[:0])


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.int32, np.int64, np.float32, np.float64])
def test_device_view_answers_as_numpy(dev_backend, dtype):
    """``above`` and ``within`` test as NumPy compares an array of the image's type with the
    threshold (Python floats at, just below and just above representable values, where
    comparing in another type would differ; NaN; Python ints in and beyond the type's
    range; NumPy scalars, compared in their common type); ``read_many`` gives what reads one by one
    give, whether the regions travel apart or as the box around them."""
    be, dev = dev_backend
    rng = np.random.default_rng(3)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    if info is not None:
        host = rng.integers(max(info.min, -200), min(info.max, 200), (13, 11, 9)).astype(dtype)
    else:
        host = rng.normal(0, 100, (13, 11, 9)).astype(dtype)
    view = _cuda.DeviceView(dev(host), be)
    vals = [float(v) for v in host.ravel()[:5]]
    thresholds = [*vals, *(np.nextafter(v, np.inf) for v in vals),
                  *(np.nextafter(v, -np.inf) for v in vals), 0.5, -1e300, 1e300, float("nan"),
                  -7, 40, 2**40, -(2**40), np.float64(vals[0]) + 1e-9, np.float32(0.1),
                  np.float64(0.1), np.int16(-3)]  # fmt: skip
    keys = [(slice(1, 12), slice(0, 11), slice(2, 7)), (slice(None), 3, slice(None, None, 2))]
    key = keys[0]
    with np.errstate(over="ignore"):  # (1e300 as a float32: inf, for NumPy and the view)
        for t in thresholds:
            np.testing.assert_array_equal(np.asarray(view.above(key, t)), host[key] > t)
            lo, hi = t, t + 50
            np.testing.assert_array_equal(np.asarray(view.within(key, lo, hi)),
                                          (host[key] >= lo) & (host[key] <= hi))  # fmt: skip
    np.testing.assert_array_equal(view[keys[1]], host[keys[1]])
    # strided samples at lags 0, 1, 2 along each axis (as the noise measurement reads them):
    # step 1 travels as the box around them, step 4 apart; and unrelated regions
    for step in (1, 4):
        regions = []
        for a in range(3):
            for lag in (0, 1, 2):
                k = [slice(1, 12, step), slice(0, 10, step), slice(2, 9, step)]
                k[a] = slice(k[a].start + lag, k[a].stop - 2 + lag, step)
                regions.append(tuple(k))
        regions.append((slice(3, 3), slice(None), slice(None)))  # an empty one
        got = view.read_many(regions)
        for k, g in zip(regions, got, strict=True):
            assert g.dtype == host.dtype
            np.testing.assert_array_equal(g, host[k])
    assert _cuda._hull(regions[:-1], host.shape) is None  # (step 4: apart)
    assert view.read_many([]) == []
    mixed = [keys[1], (slice(0, 2), slice(0, 2), slice(0, 2))]
    for k, g in zip(mixed, view.read_many(mixed), strict=True):
        np.testing.assert_array_equal(g, host[k])
    assert view.all_finite(keys[0])
    if host.dtype.kind == "f":
        bad = host.copy()
        bad[5, 5, 5] = np.inf
        v2 = _cuda.DeviceView(dev(bad), be)
        assert not v2.all_finite(keys[0]) and v2.all_finite((slice(0, 5),) * 3)


def test_device_reads_run_with_the_data_s_gpu_current(small_phantom):
    """Every device operation of planning's views (the organ's box and bits, the image's
    regions and tests) runs with the backend's GPU current and on the data's stream: CuPy
    works on the current device and stream, data on ``cuda:N`` (a DDP rank's) must not be
    worked on from GPU 0, and a tensor written on a torch side stream must be read after
    those writes."""
    import synthgen

    class Depth:
        """A context manager counting how deep it is entered."""

        def __init__(self) -> None:
            self.depth = 0

        def __enter__(self):
            self.depth += 1

        def __exit__(self, *exc):
            self.depth -= 1

    device, stream = Depth(), Depth()

    class OnDevice(NumpyDevice):
        outside = 0

        def stream_for(self, arrays):
            return stream

        @contextlib.contextmanager
        def context(self, s, arrays):  # (the device made current, then the stream entered)
            with device, s:
                yield

        def download(self, dev):
            OnDevice.outside += device.depth == 0 or stream.depth == 0
            return super().download(dev)

    be = OnDevice()
    ph = small_phantom
    mask = ph.mask("liver")
    for preset in ("liver", "colon"):  # (the bright-voxel test, the wall search's window)
        img_v, mask_v, idx = _cuda.host_views(be, ph.image.astype(np.float32), mask.copy())
        synthgen.plan(img_v, mask_v, organ=preset, seed=2, spacing=ph.spacing, organ_index=idx)
    assert be.copies > 3 and OnDevice.outside == 0
    np.asarray(img_v)
    assert OnDevice.outside == 0 and device.depth == stream.depth == 0


@pytest.mark.gpu
def test_planning_of_data_on_a_second_gpu(small_phantom):
    """Data on GPU 1 while GPU 0 is current plans as on the host."""
    gpu_backend()
    import cupy

    import synthgen

    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")
    ph = small_phantom
    mask = ph.mask("liver")
    with cupy.cuda.Device(1):
        img, m = cupy.asarray(ph.image), cupy.asarray(mask)
    with cupy.cuda.Device(0):
        got = synthgen.plan(img, m, organ="liver", seed=3, spacing=ph.spacing)
        res = synthgen.render(got, img, m, out=img)
    want = synthgen.plan(ph.image, mask, organ="liver", seed=3, spacing=ph.spacing)
    assert got.to_json() == want.to_json()
    assert res.image.device.id == 1


def test_plan_reads_device_data_through_views(small_phantom, monkeypatch):
    """synthgen.plan (and Synthesizer.plan) on GPU data reads it through planning's views, as
    synthesize does, instead of handing device arrays to the host code: here NumPy arrays of
    a marked subclass stand for device arrays, a NumpyDevice for their GPU."""
    from synthgen import _device

    class Dev(np.ndarray):
        pass

    class OnDevice(NumpyDevice):
        def on_device(self, a) -> bool:
            return isinstance(a, Dev)

    be = OnDevice()
    monkeypatch.setattr(_device, "_array_device", lambda a: 0 if isinstance(a, Dev) else None)
    monkeypatch.setattr(_cuda, "backend", lambda device_id: be)
    ph = small_phantom
    mask = ph.mask("liver")
    for preset in ("liver", "colon"):
        m = mask if preset == "liver" else ph.mask("colon")
        want = synthgen.plan(ph.image, m, organ=preset, seed=5, spacing=ph.spacing)
        copies = be.copies
        got = synthgen.plan(ph.image.view(Dev), m.view(Dev), organ=preset, seed=5,
                            spacing=ph.spacing)  # fmt: skip
        assert got.to_json() == want.to_json()
        assert be.copies > copies  # (read through the views)
