"""The CUDA backend: the kernels of ``kernels/`` driven through CuPy, the same result as the CPU.

Imported only when a render runs on a GPU (``import synthgen`` never touches CUDA).

This module holds what is CuPy-specific: the backend object (:class:`CupyBackend`: kernel
modules compiled by NVRTC once per device, launches, transfers, device addresses), device
arrays and torch CUDA tensors (DLPack, no copies), the caller's stream, planning views of
device data and the entry point :func:`render_on_gpu`. The render itself is
:mod:`synthgen._segments`: every tumor of a batch in one launch per step or group of
independent steps (15 launches and one host wait per batch, whatever the number of
tumors), each kernel the CUDA C twin of a numba kernel of the CPU path (same operations,
same order, compiled without FMA contraction), every random number from the same
counter-based hash, so one plan renders the same tumor on both backends.

The test suite runs the same driver without a GPU through a stand-in backend whose ``xp`` is
NumPy and whose kernels are the same CUDA C sources compiled for the host
(``tests/_cuda_emu.py``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._device import array_kind
from .planning import Plan
from .rendering import RenderResult, sequential_groups

__all__ = ["KERNELS", "NVRTC_OPTIONS", "CupyBackend", "kernel_dir", "render_on_gpu"]

#: Each kernel and the source file in ``kernels/`` that defines it.
KERNELS = {
    name: "segmented.cu"
    for name in (
        "sg_seg_weights",
        "sg_seg_rows",
        "sg_seg_shape",
        "sg_seg_bbox",
        "sg_seg_gather",
        "sg_seg_band",
        "sg_seg_conv",
        "sg_seg_lattice",
        "sg_seg_blocks",
        "sg_seg_tex_stats",
        "sg_seg_tex_scale",
        "sg_seg_interp",
        "sg_seg_blend",
        "sg_seg_apply",
        "sg_seg_label",
        # launches of independent steps side by side (the steps above, as functions)
        "sg_seg_first",
        "sg_seg_conv_band",
        "sg_seg_apply_label",
        # the texture grid's last pass with the rescale's statistics
        "sg_seg_conv_stats",
    )
}
# the mass effect's warp of GPU data (synthgen._mass_gpu)
KERNELS.update({name: "mass_effect.cu" for name in ("sg_me_warp", "sg_me_gather")})

#: No FMA contraction: the kernels round as the CPU path does.
NVRTC_OPTIONS = ("--std=c++14", "--fmad=false")

THREADS = 256


_MODULES: dict[tuple[int, str], Any] = {}
_LOCK = threading.Lock()
_BACKENDS: dict[int, CupyBackend] = {}


def kernel_dir() -> Path:
    """The folder holding the CUDA C sources (``synthgen/kernels`` in a wheel, ``kernels/`` in
    a source checkout)."""
    here = Path(__file__).resolve().parent
    for cand in (here / "kernels", here.parent / "kernels"):
        if (cand / "hash.cuh").is_file():
            return cand
    try:
        from importlib.resources import files

        cand = Path(str(files("synthgen.kernels")))
        if (cand / "hash.cuh").is_file():
            return cand
    except (ModuleNotFoundError, TypeError):
        pass
    raise FileNotFoundError("synthgen's CUDA C sources (kernels/*.cu) are not installed")


class CupyBackend:
    """CuPy on one GPU: ``xp`` is :mod:`cupy`; kernels compiled once per device (NVRTC).

    Modules are memoised per (device, source file) for the life of the process, as
    ``cupyx.scipy.ndimage`` memoises its kernels; CuPy also caches the compiled binaries on
    disk (``~/.cupy/kernel_cache``), so a new process pays the compile once per machine.
    """

    def __init__(self, device_id: int = 0) -> None:
        import cupy

        self.xp = cupy
        self.device_id = int(device_id)
        self.device = cupy.cuda.Device(self.device_id)
        self._functions: dict[str, Any] = {}

    def module(self, filename: str):
        key = (self.device_id, filename)
        with _LOCK:
            mod = _MODULES.get(key)
            if mod is None:
                d = kernel_dir()
                opts = (*NVRTC_OPTIONS, f"-I{d}")
                with self.device:
                    mod = self.xp.RawModule(
                        code=(d / filename).read_text(), options=opts, name_expressions=None
                    )
                _MODULES[key] = mod
        return mod

    def function(self, name: str):
        fn = self._functions.get(name)  # (get_function looks the kernel up anew each call)
        if fn is None:
            fn = self._functions[name] = self.module(KERNELS[name]).get_function(name)
        return fn

    #: The flat schedules' rule (``synthgen._seg_tables.schedules_nb``): a segment gets one
    #: block of THREADS threads per 4 * THREADS elements (about four per thread, as SG_ILP
    #: kernels take in one step), at most 512; a larger segment's blocks loop over it.
    block_rule = (4 * THREADS, 512)

    @functools.cached_property
    def most_blocks(self) -> int:
        """The blocks a launch keeps at most (``schedules_nb``'s ``most``): 32 per SM, eight
        waves of the four blocks of THREADS threads an SM holds at the kernels' 64-register
        bound. A larger launch (a batch of large tumors: tens of thousands of blocks of
        4 * THREADS elements) gets longer blocks instead, each block's start (its segment
        search, its row reads, its reduction) spread over more elements; a single sample's
        launches stay below it."""
        sms = self.xp.cuda.runtime.getDeviceProperties(self.device_id)["multiProcessorCount"]
        return 32 * int(sms)

    def launch_flat(self, name: str, n_blocks: int, *args) -> None:
        """A segmented launch: ``n_blocks`` blocks in a 1-D grid, which the kernel maps to
        its segments through the schedule it gets as first argument."""
        if n_blocks > 0:
            self.function(name)((int(n_blocks),), (THREADS,), args)

    def pointer(self, address: int, dtype=None):
        """A device address as a kernel argument (passed by value: 8 bytes), instead of a
        CuPy view of the buffer (a slice, a view and a reshape, each a Python-level op)."""
        return np.uint64(address)

    def ptr(self, a) -> int:
        return int(a.data.ptr)

    def alloc(self, nbytes: int):
        return self.xp.empty(max(int(nbytes), 16), dtype=self.xp.uint8)

    def fill(self, dev, value) -> None:
        dev.fill(value)

    def copy_in(self, dev, host: np.ndarray) -> None:
        dev.set(host)

    def upload(self, host: np.ndarray):
        return self.xp.asarray(host)

    def on_device(self, a) -> bool:
        from ._device import array_kind

        return array_kind(a) == "cupy"

    def context(self, stream, arrays):
        """This GPU current, and the stream to work on (see :func:`_stream_for`)."""

        ctx = contextlib.ExitStack()
        ctx.enter_context(self.current())
        ctx.enter_context(_stream_for(stream, arrays))
        return ctx

    def current(self):
        """A context with this GPU current: a fresh ``Device`` each time (a ``Device`` keeps
        the devices it restores on one stack per object, which threads entering a shared one
        would interleave)."""
        return self.xp.cuda.Device(self.device_id)

    def stream_for(self, arrays):
        """The stream work on ``arrays`` is ordered on (:func:`_stream_for`), this GPU's."""
        with self.current():
            return _stream_for(None, arrays)

    def download(self, dev) -> np.ndarray:
        # (on this GPU's current stream whatever device is current: a render's statistics
        # are fetched later, from wherever its records are first read)
        with self.current():
            return self.xp.asnumpy(dev)

    def fence(self):
        """An event recorded on the current stream: its ``synchronize()`` waits for the work
        launched so far (a render that returned before the device finished)."""
        ev = self.xp.cuda.Event(block=False, disable_timing=True)
        ev.record()
        return ev

    def compile_all(self) -> None:
        """Compile and load every kernel now (otherwise on first use)."""
        for name in KERNELS:
            self.function(name)


@dataclass
class Job:
    """One plan to render: ``target`` holds the image and receives the tumors (on the device,
    or on the host where only the tumor boxes travel); ``organ`` likewise."""

    plan: Plan
    target: Any
    organ: Any
    target_on_device: bool
    organ_on_device: bool
    affine: np.ndarray | None = None
    label: Any = None  # the caller's label map: tumor voxels get ``tumor_label``
    label_on_device: bool = False
    tumor_label: int = 2

    def __post_init__(self) -> None:
        self.preset = self.plan.get_preset()
        tissue = self.preset.placement.tissue_hu or (-np.inf, np.inf)
        self.tissue = (np.float32(tissue[0]), np.float32(tissue[1]))


def backend(device_id: int) -> CupyBackend:
    """The (memoised) CuPy backend of one GPU."""
    with _LOCK:
        be = _BACKENDS.get(device_id)
        if be is None:
            be = _BACKENDS[device_id] = CupyBackend(device_id)
    return be


def _as_cupy(a):
    """A CuPy view of a CuPy array or a torch CUDA tensor (DLPack, no copy); bool tensors
    travel as uint8 (same bytes)."""
    from ._device import array_kind

    if array_kind(a) != "torch-cuda":
        return a
    import cupy
    import torch

    if a.dtype == torch.bool:
        return cupy.from_dlpack(a.view(torch.uint8)).view(cupy.bool_)
    return cupy.from_dlpack(a)


def _to_torch(a):
    import cupy
    import torch

    if a.dtype == cupy.bool_:
        return torch.from_dlpack(a.view(cupy.uint8)).view(torch.bool)
    return torch.from_dlpack(a)


def _stream_for(stream, arrays):
    """The CuPy stream to work on: the caller's (CuPy stream, torch stream or raw handle),
    torch's current stream for torch data (so the work is ordered with the caller's), else
    CuPy's current stream."""
    import cupy

    from ._device import array_kind

    if stream is not None:
        if isinstance(stream, cupy.cuda.Stream) or type(stream).__name__ == "ExternalStream":
            return stream
        return _external_stream(cupy, int(getattr(stream, "cuda_stream", stream)))
    for a in arrays:
        if array_kind(a) == "torch-cuda":
            import torch

            return _external_stream(cupy, torch.cuda.current_stream(a.device).cuda_stream)
    return cupy.cuda.get_current_stream()


class _StreamHandle:
    """A raw ``cudaStream_t`` under the CUDA stream protocol (``__cuda_stream__``: version 0,
    the handle), which CuPy 14's ``Stream.from_external`` takes."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.ptr)


def _external_stream(cupy, ptr: int):
    """A CuPy stream on someone else's stream handle (torch's, a caller's): CuPy 14's
    ``Stream.from_external`` (it deprecated ``ExternalStream``, warning at every call), else
    ``ExternalStream``."""
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None:
        return from_external(_StreamHandle(int(ptr)))
    return cupy.cuda.ExternalStream(int(ptr))


@contextlib.contextmanager
def caller_stream(stream, arrays):
    """The caller's ``stream`` (as for :func:`_stream_for`) current on the arrays' GPU, for
    CuPy and, with torch data, for torch: host steps between renders (the mass effect's
    warp reads a box of the image and writes it back) are then ordered with the caller's
    work on that stream, as the renders are."""
    import cupy

    from ._device import _array_device, array_kind

    dev = next((d for d in map(_array_device, arrays) if d is not None), None)
    with contextlib.ExitStack() as st:
        if dev is not None:
            st.enter_context(cupy.cuda.Device(dev))
        s = _stream_for(stream, arrays)
        st.enter_context(s)
        if any(array_kind(a) == "torch-cuda" for a in arrays):
            import torch

            ts = torch.cuda.ExternalStream(s.ptr, device=torch.device("cuda", dev or 0))
            st.enter_context(torch.cuda.stream(ts))
        yield


def render_on_gpu(
    plans: Sequence[Plan],
    images: Sequence[Any],
    organ_masks: Sequence[Any],
    *,
    device_id: int,
    outs: Sequence[Any] | None = None,
    affines: Sequence[np.ndarray | None] | None = None,
    stream=None,
    be=None,
    label_outs: Sequence[Any] | None = None,
    tumor_label: int = 2,
) -> list[RenderResult]:
    """Render plans on one GPU; see :func:`synthgen.render_batch` for the contract.

    Data already on the GPU (CuPy arrays, torch CUDA tensors through DLPack) is rendered in
    place (``out``) or into a device copy; NumPy data stays on the host and only the tumor
    boxes travel to the GPU and back. A label map of ``label_outs`` on the device gets its
    tumor voxels from one launch for the whole batch; one on the host from the masks that
    come back.
    """
    if be is None:
        be = backend(device_id)
    n = len(plans)
    outs = list(outs) if outs is not None else [None] * n
    affines = list(affines) if affines is not None else [None] * n
    labels = list(label_outs) if label_outs is not None else [None] * n
    groups = sequential_groups(images, outs)
    if len(groups) > 1:  # outputs shared between plans: in turn, as the CPU renders them
        from ._segments import _address

        for i in range(n):  # (refused before any run writes, named by the batch's index)
            for what, a in (("image (out)", outs[i]), ("organ mask", organ_masks[i]),
                            ("label map", labels[i])):  # fmt: skip
                if a is not None and be.on_device(a := _as_cupy(a)):
                    _address(be, a, i, what)
        return [
            res
            for a, b in groups
            for res in render_on_gpu(
                plans[a:b], images[a:b], organ_masks[a:b], device_id=device_id, outs=outs[a:b],
                affines=affines[a:b], stream=stream, be=be, label_outs=labels[a:b],
                tumor_label=tumor_label,
            )
        ]  # fmt: skip
    torch_data = [array_kind(images[i]) == "torch-cuda" for i in range(n)]
    with be.context(stream, [*images, *organ_masks]):
        jobs = []
        for i in range(n):
            img, org, out = _as_cupy(images[i]), _as_cupy(organ_masks[i]), outs[i]
            if out is not None:
                target = _as_cupy(out)
            elif be.on_device(img):
                target = img.copy()
            else:
                target = np.array(img, copy=True)
            lab = _as_cupy(labels[i]) if labels[i] is not None else None
            jobs.append(
                Job(
                    plan=plans[i],
                    target=target,
                    organ=org,
                    target_on_device=be.on_device(target),
                    organ_on_device=be.on_device(org),
                    affine=affines[i],
                    label=lab,
                    label_on_device=lab is not None and be.on_device(lab),
                    tumor_label=tumor_label,
                )
            )
        from ._segments import render_segments

        results = render_segments(be, jobs)
    for i, res in enumerate(results):
        if torch_data[i]:
            res.image = outs[i] if outs[i] is not None else _to_torch(res.image)
            res.wrap = _to_torch
    return results


class DeviceView:
    """Host reads of a GPU array, region by region, for planning (which reads the organ's
    box, a strided sample and a few slices: never the whole scan).

    Beyond plain reads (``view[key]``: one copy back each) it answers planning's questions
    on the device and copies back only the answer: :meth:`all_finite`, :meth:`read_many`
    (several regions, one copy), :meth:`above` and :meth:`within` (a test against
    thresholds, copied back as bits). Planning asks these of any array that has them
    (through :mod:`synthgen._packed`'s ``all_finite``, ``regions`` and ``above``; the
    placement's tissue window through ``within``), and reads NumPy arrays directly: the
    same values either way."""

    def __init__(self, a, be, where=None) -> None:
        self.a = _as_cupy(a)
        self._be = be
        self._where = where if where is not None else _on_data(be, [a])
        self.shape = tuple(int(n) for n in self.a.shape)
        self.dtype = np.dtype(str(self.a.dtype))
        self.ndim = len(self.shape)

    def __getitem__(self, key) -> np.ndarray:
        with self._where():
            return self._be.download(self.a[key])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        with self._where():
            out = self._be.download(self.a)
        return out if dtype is None else out.astype(dtype)

    def all_finite(self, key) -> bool:
        """Whether region ``key`` holds no NaN or infinity (reduced on the device; planning
        asks only of a float image: ``_packed.all_finite``)."""
        xp = self._be.xp
        with self._where():
            return bool(self._be.download(xp.isfinite(self.a[key]).all().reshape(1))[0])

    def read_many(self, keys) -> list[np.ndarray]:
        """The regions ``keys`` (one copy back for all; each as ``view[key]`` would give)."""
        with self._where():
            return self._read_many(keys)

    def _read_many(self, keys) -> list[np.ndarray]:
        xp = self._be.xp
        keys = list(keys)
        if not keys:
            return []
        hull = _hull(keys, self.shape)
        if hull is not None:  # the box around them is fewer voxels: it travels, cut on the host
            box, rel = hull
            host = self._be.download(self.a[box])
            return [host[r] for r in rel]
        parts = [self.a[k] for k in keys]
        flat = self._be.download(xp.concatenate([x.ravel() for x in parts]))
        out, at = [], 0
        for x in parts:
            n = int(x.size)
            out.append(flat[at : at + n].reshape(tuple(int(d) for d in x.shape)))
            at += n
        return out

    def _test(self, key, fn):
        """``fn(region)`` (a bool device array) of the 3-D region ``key``, copied back as bits:
        a :class:`~synthgen._packed.PackedMask` of the region's shape."""
        from ._packed import PackedMask, pack_on_device

        with self._where():
            packed, shape = pack_on_device(self._be.xp, fn(self.a[key]))
            return PackedMask(shape, (0, 0, 0), shape, self._be.download(packed))

    def _cmp(self, r, op: str, value):
        """``r op value`` (``op`` one of ``>``, ``>=``, ``<=``) as NumPy compares an array of
        the image's type with ``value`` (a Python float: in the array's float type, in
        float64 for integers; a NumPy scalar: in their common type), so that the device's
        test is the host's bit for bit. Images of integers of up to 32 bits are compared
        with an integer bound of their type instead (the same answers: their values are
        exact in float64), without a float64 copy of the region."""
        if isinstance(value, int) and not isinstance(value, np.generic):
            value = float(value)  # (exact: the same answers as NumPy's for a Python int)
        if self.dtype.kind in "iu" and self.dtype.itemsize <= 4 and np.ndim(value) == 0:
            xp, v, info = self._be.xp, float(value), np.iinfo(self.dtype)
            if v != v:  # NaN: no value compares true
                return xp.zeros(r.shape, dtype=xp.bool_)
            if op == "<=":  # x <= v <=> x <= floor(v)
                bound = math.floor(v)
                if bound < info.min or bound >= info.max:
                    return xp.full(r.shape, bound >= info.max, dtype=xp.bool_)
                return r <= self.dtype.type(bound)
            # x > v <=> x >= floor(v) + 1; x >= v <=> x >= ceil(v)
            bound = math.floor(v) + 1 if op == ">" else math.ceil(v)
            if bound > info.max or bound <= info.min:
                return xp.full(r.shape, bound <= info.min, dtype=xp.bool_)
            return r >= self.dtype.type(bound)
        rt = np.result_type(self.dtype, value)
        r = r if r.dtype == rt else r.astype(rt)
        t = rt.type(value)
        return r > t if op == ">" else (r >= t if op == ">=" else r <= t)

    def above(self, key, value):
        """``region > value`` of the 3-D region ``key`` (as a ``PackedMask``)."""
        return self._test(key, lambda r: self._cmp(r, ">", value))

    def within(self, key, lo, hi):
        """``(region >= lo) & (region <= hi)`` of the 3-D region ``key`` (a ``PackedMask``)."""
        return self._test(key, lambda r: self._cmp(r, ">=", lo) & self._cmp(r, "<=", hi))


def _hull(keys, shape):
    """For regions ``keys`` (tuples of slices of positive step, one per axis) whose voxels
    outnumber those of the box around them (strided samples of a box at a few offsets, with
    steps of 1 or 2): ``(box, keys relative to it)``; else None."""
    lo, hi, rel, total = [], [], [], 0
    for key in keys:
        if not isinstance(key, tuple) or len(key) != len(shape):
            return None
        rs = []
        for k, n in zip(key, shape, strict=True):
            if not isinstance(k, slice):
                return None
            r = range(*k.indices(n))
            if r.step <= 0:
                return None
            rs.append(r)
        total += int(np.prod([len(r) for r in rs]))
        rel.append(rs)
    for a in range(len(shape)):
        nonempty = [rs[a] for rs in rel if len(rs[a])]
        if not nonempty:
            return None
        lo.append(min(r.start for r in nonempty))
        hi.append(max(r[-1] for r in nonempty) + 1)
    if total <= int(np.prod([b - a for a, b in zip(lo, hi, strict=True)])):
        return None
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    cut = [tuple(slice(r.start - a, r.stop - a, r.step) if len(r) else slice(0, 0)
                 for r, a in zip(rs, lo, strict=True)) for rs in rel]  # fmt: skip
    return box, cut


def host_views(be, image, organ_mask, organ_index=None):
    """``(image_view, mask_view, organ_index)`` for planning on GPU-resident data.

    The organ's bounding box and voxel count are reduced on the device (one small copy back;
    none when ``organ_index`` gives them); the box of the binarised mask is packed to bits
    there and copied back once: the mask view is a :class:`~synthgen._packed.PackedMask`
    that answers every read of planning on the host (False outside the organ's box). The
    image view is a :class:`DeviceView`."""

    img_a, org = _as_cupy(image), _as_cupy(organ_mask)
    where = _on_data(be, [image, organ_mask])
    # (one of the two may be a host array: planning reads that one directly)
    img = DeviceView(img_a, be, where) if be.on_device(img_a) else image
    shape = tuple(int(n) for n in org.shape)
    if organ_index is not None and tuple(organ_index.shape) != shape:
        raise ValueError(f"organ_index is for shape {organ_index.shape}, mask is {shape}")
    if not be.on_device(org):  # (without an index, planning finds the box as for host data)
        return img, organ_mask, organ_index
    with where():
        return img, *_packed_organ(be, org, shape, organ_index)


def _on_data(be, arrays):
    """``with where():`` (``where = _on_data(be, arrays)``) makes the data's GPU current and
    its stream (:func:`_stream_for`: torch's current stream for torch tensors, found once)
    the one CuPy works on: data on another GPU (``cuda:N``, a DDP rank's) must not be worked
    on from GPU 0, and reads of a tensor written on a torch side stream are ordered after
    those writes. :meth:`CupyBackend.context`, a fresh context each time."""
    return functools.partial(be.context, be.stream_for(arrays), ())


def _packed_organ(be, org, shape, organ_index):
    """``(mask view, organ_index)`` of a device organ mask: see :func:`host_views`."""
    from ._packed import PackedMask, pack_on_device
    from .planning import OrganIndex

    xp = be.xp

    def binary(a):
        return a if a.dtype == xp.bool_ else a > 0.5

    m = None
    if organ_index is None:
        m = binary(org)
        proj = [m.any(axis=(1, 2)), m.any(axis=(0, 2)), m.any(axis=(0, 1))]
        host = be.download(xp.concatenate([*(p.astype(xp.int64) for p in proj),
                                           m.sum(dtype=xp.int64).reshape(1)]))  # fmt: skip
        count = int(host[-1])
        if count == 0:
            raise ValueError("organ mask is empty (no voxel > 0.5): nothing to implant a tumor in")
        bbox, start = [], 0
        for n in shape:
            hit = np.flatnonzero(host[start : start + n])
            bbox.append(slice(int(hit[0]), int(hit[-1]) + 1))
            start += n
        organ_index = OrganIndex(bbox=tuple(bbox), count=count, shape=shape)  # type: ignore[arg-type]
    box = tuple(organ_index.bbox)
    packed, box_shape = pack_on_device(xp, m[box] if m is not None else binary(org[box]))
    return PackedMask(shape, [b.start for b in box], box_shape, be.download(packed)), organ_index


def planning_views(image, organ_mask, organ_index=None):
    """What planning reads, for data on a GPU (CuPy arrays, torch CUDA tensors): views that
    copy only the organ's box and a few slices to the host (:func:`host_views`, on the data's
    device); host data is returned as it is."""
    from ._device import _array_device

    dev = _array_device(image)
    if dev is None:
        dev = _array_device(organ_mask)
    if dev is None:
        return image, organ_mask, organ_index
    return host_views(backend(dev), image, organ_mask, organ_index)
