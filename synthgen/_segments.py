"""The GPU render of a batch as segments: a fixed number of launches, whatever the tumor count.

Every tumor of every plan of a batch is a *segment*. The host describes all segments in one
int64 table (sizes, indices, device addresses), one float32 and one float64 table
(``kernels/segmented.cuh`` names their columns), packs them with every small per-tumor array
into one buffer, uploads it with one copy and launches each step of the render once for the
whole batch (``kernels/segmented.cu``): 2 launches in phase A (gather + fused shape test, box
reduction), then one copy back of all boxes, then 17 launches in phase B (tight-box gather,
three blur passes, lattice noise, three band sums, Bernoulli blocks, three grid passes, the
rescale's statistics and scaling, the fused blend, the overlap merge, the write-back), then
one copy back of the statistics.

The kernels compute every voxel's position and its trilinear coordinates on the texture grid
themselves, from the tumor's centre, the spacing and the grid's origin and step (the float64
arithmetic of the CPU path). The host keeps the per-tumor tables whose values come from
``exp`` or from BLAS on the CPU path, so that both backends read the very same numbers: the
B-spline weights of the box's rows, the blur bands, the texture's lattice bands and norms
and its smoothing bands. The band tables are cached (the texture's per axis and grid range,
the blur's per sigma and size, built by copy-only numba twins of the reference functions);
``benchmarks/bench_gpu_host.py`` measures what this preparation costs per sample.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np

from ._appearance import blend_params
from ._geometry import gaussian_kernel1d
from ._texture import texture_recipe
from .rendering import (
    BLUR_TRUNCATE,
    RenderResult,
    _output_range,
    assemble,
    tumor_box,
)

__all__ = ["POISON", "render_segments"]

#: Fill scratch buffers with NaN / 255 instead of leaving them uninitialised (tests).
POISON = False
#: Keep the last batch's phase-B launch arguments in :data:`LAST` (benchmarks re-launch the
#: fused kernels on them to measure their bandwidth).
KEEP_LAST = False
LAST: dict[str, Any] = {}


@functools.cache
def _columns() -> SimpleNamespace:
    """The SG_* column numbers of ``kernels/segmented.cuh`` (``C.N0`` for ``SG_N0``)."""
    from ._cuda import kernel_dir

    text = (kernel_dir() / "segmented.cuh").read_text()
    return SimpleNamespace(
        **{m[0][3:]: int(m[1]) for m in re.findall(r"#define (SG_\w+) (\d+)", text)}
    )


_CODES = {
    np.dtype(np.float32): 0,
    np.dtype(np.float64): 1,
    np.dtype(np.int16): 2,
    np.dtype(np.uint8): 3,
    np.dtype(np.bool_): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.uint16): 5,
    np.dtype(np.int8): 6,
    np.dtype(np.int64): 7,
    np.dtype(np.uint32): 8,
}


def dtype_code(dtype) -> int:
    try:
        return _CODES[np.dtype(str(dtype))]
    except KeyError:
        raise ValueError(f"the GPU backend does not handle dtype {dtype}") from None


class _Pack:
    """Host arrays packed at 16-byte offsets into one device buffer (one copy up)."""

    def __init__(self) -> None:
        self.parts: list[tuple[int, np.ndarray]] = []
        self.size = 0
        self.base = 0
        self.dev: Any = None
        self._shared: dict[int, int] = {}

    def add(self, a: np.ndarray) -> int:
        a = np.ascontiguousarray(a)
        off = (self.size + 15) // 16 * 16
        self.parts.append((off, a))
        self.size = off + a.nbytes
        return len(self.parts) - 1

    def add_shared(self, a: np.ndarray) -> int:
        """:meth:`add` for a cached, read-only array: packed once however often it is added
        (the pack holds it, so its ``id`` is not reused meanwhile)."""
        ref = self._shared.get(id(a))
        if ref is None:
            ref = self._shared[id(a)] = self.add(a)
        return ref

    def set(self, ref: int, a: np.ndarray) -> None:
        """Replace part ``ref`` by ``a`` of the same size (tables filled after :meth:`alloc`)."""
        off, old = self.parts[ref]
        a = np.ascontiguousarray(a, dtype=old.dtype)
        if a.nbytes != old.nbytes:
            raise ValueError("a packed part cannot change size")
        self.parts[ref] = (off, a.reshape(old.shape))

    def alloc(self, be) -> None:
        self.dev = be.alloc(self.size)
        self.base = be.ptr(self.dev)

    def addr(self, ref: int) -> int:
        return self.base + self.parts[ref][0]

    def view(self, ref: int):
        off, a = self.parts[ref]
        return self.dev[off : off + a.nbytes].view(a.dtype).reshape(a.shape)

    def upload(self, be) -> None:
        chunks, at = [], 0
        for off, a in self.parts:
            if off > at:
                chunks.append(bytes(off - at))
            chunks.append(a.tobytes())
            at = off + a.nbytes
        chunks.append(bytes(max(self.size, 16) - at))
        # a bytearray: a writable host buffer (CuPy copies from it before set() returns)
        be.copy_in(self.dev, np.frombuffer(bytearray().join(chunks), dtype=np.uint8))


class _Scratch:
    """Device buffers of one dtype carved out of one allocation."""

    def __init__(self, dtype) -> None:
        self.dtype = np.dtype(dtype)
        self.sizes: list[int] = []

    def add(self, n: int) -> int:
        self.sizes.append(int(n))
        return len(self.sizes) - 1

    def alloc(self, be, zero: bool = False) -> None:
        """One allocation for all buffers (zeroed, or poisoned when :data:`POISON` is set:
        NaN / 255, so that a kernel that leaves an element unwritten shows in the result)."""
        offs = np.zeros(len(self.sizes) + 1, dtype=np.int64)
        # 16-byte aligned starts
        align = max(1, 16 // self.dtype.itemsize)
        for i, n in enumerate(self.sizes):
            offs[i + 1] = offs[i] + (n + align - 1) // align * align
        self.offs = offs
        total = int(offs[-1]) + align
        self.dev = be.alloc(total * self.dtype.itemsize).view(self.dtype)
        if zero:
            be.fill(self.dev, 0)
        elif POISON:
            be.fill(self.dev, np.nan if self.dtype.kind == "f" else np.iinfo(self.dtype).max)
        self.base = be.ptr(self.dev)

    def addr(self, i: int) -> int:
        return self.base + int(self.offs[i]) * self.dtype.itemsize

    def view(self, i: int, shape):
        o = int(self.offs[i])
        return self.dev[o : o + self.sizes[i]].reshape(shape)


def _toeplitz_band(off: int, kern: np.ndarray, n_in: int, n_out: int):
    """Band form of ``out[o] = sum_t kern[t] in[o + off + t]`` with zero padding
    (:func:`synthgen._cpu_kernels.toeplitz_band_nb`), cached; ``kern`` is one of the texture's
    cached, read-only kernels."""
    return _toeplitz_cached(int(off), kern.tobytes(), int(n_in), int(n_out))


@functools.lru_cache(maxsize=8192)
def _toeplitz_cached(off: int, kern_bytes: bytes, n_in: int, n_out: int):
    from ._cpu_kernels import toeplitz_band_nb

    s, w = toeplitz_band_nb(off, np.frombuffer(kern_bytes, dtype=np.float32), n_in, n_out)
    s.flags.writeable = False
    w.flags.writeable = False
    return s, w


@functools.lru_cache(maxsize=4096)
def _blur_band(sigma_vox: float, n: int):
    """The mask blur's band (:func:`synthgen._geometry.blur_band`, built by the numba twin
    from the same kernel), cached per size."""
    from ._cpu_kernels import blur_band_nb

    s, w = blur_band_nb(n, _blur_kernel(sigma_vox))
    s.flags.writeable = False
    w.flags.writeable = False
    return s, w


@functools.lru_cache(maxsize=4096)
def _blur_kernel(sigma_vox: float) -> np.ndarray:
    return gaussian_kernel1d(sigma_vox, BLUR_TRUNCATE)


def clear_caches() -> None:
    """Empty the host-side caches of band tables (benchmarks time the cold case with it)."""
    from . import _texture

    for f in (_blur_band, _blur_kernel, _toeplitz_cached, _texture._axis_recipe,
              _texture._smoothing_kernel):  # fmt: skip
        f.cache_clear()


def _strides(a) -> tuple[int, int, int]:
    item = np.dtype(str(a.dtype)).itemsize
    return tuple(int(s) // item for s in a.strides)  # type: ignore[return-value]


class _Tumor:
    """A tumor plan with its JSON lists converted to arrays once (box, weights and matrix all
    read them); every other attribute is the plan's."""

    def __init__(self, t) -> None:
        self._t = t
        self.displacement = t.displacement
        self.rotation_matrix = t.rotation_matrix

    def __getattr__(self, name: str):
        return getattr(self._t, name)


class _JobInfo:
    """What every row of one job shares: device addresses, dtype codes, strides, ranges."""

    __slots__ = ("cmax", "cmin", "dst", "hi", "img", "lo", "org", "organ_hu", "round", "sp",
                 "tissue")  # fmt: skip

    def __init__(self, be, job) -> None:
        dtype = np.dtype(str(job.target.dtype))
        self.sp = tuple(float(x) for x in job.plan.spacing)
        self.img = (
            (be.ptr(job.target), dtype_code(dtype), _strides(job.target))
            if job.target_on_device
            else None
        )
        org = job.organ
        self.org = (
            (be.ptr(org), dtype_code(org.dtype), _strides(org)) if job.organ_on_device else None
        )
        self.dst = self.img
        self.round = int(dtype.kind in "iu")
        self.lo, self.hi = _output_range(dtype)
        c = job.preset.contrast
        self.cmin, self.cmax = float(c.min_hu), float(c.max_hu)
        self.organ_hu = float(job.plan.organ_hu) if job.plan.organ_hu is not None else 0.0
        self.tissue = (float(job.tissue[0]), float(job.tissue[1]))


def _weights(t, box, sp) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """``(ctrl, [w0, w1, w2], m)`` of the fused shape test on ``box`` (the kernel computes
    the voxel positions itself, from the centre and the spacing): the arithmetic of
    ``synthgen.rendering._shape_inputs``."""
    from ._cpu_kernels import bspline_matrix
    from ._geometry import prefilter

    disp = t.displacement
    ext = t.control_extent_mm
    w = []
    for a in range(3):
        g = disp.shape[a + 1]
        pos = (np.arange(box[a].start, box[a].stop) - t.center_vox[a]) * sp[a]
        w.append(bspline_matrix((pos + ext[a]) * ((g - 1) / (2.0 * ext[a])), prefilter(g)))
    m = (t.rotation_matrix / np.asarray(t.radii_mm)[None, :]).T
    return disp.astype(np.float32), w, m


def render_segments(be, jobs: Sequence[Any]) -> list[RenderResult]:
    """Render ``jobs`` (``synthgen._cuda.Job``) on backend ``be``: see the module docstring."""
    # ---------------------------------------------------------------- phase A (host)
    C = _columns()
    segs: list[dict[str, Any]] = []
    walls: list[tuple[int, int]] = []
    infos = [_JobInfo(be, job) for job in jobs]
    pack = _Pack()
    for j, job in enumerate(jobs):
        plan = job.plan
        sp = infos[j].sp
        for i, t in enumerate(plan.tumors):
            if getattr(t, "kind", "ellipsoid") != "ellipsoid":
                walls.append((j, i))  # rendered on the host in phase B
                continue
            t = _Tumor(t)
            box = tumor_box(t, sp, plan.shape, plan.organ_bbox, coarse=not job.target_on_device)
            if box is None:
                continue
            ctrl, w, m = _weights(t, box, sp)
            s = {
                "job": j,
                "i": i,
                "t": t,
                "box": box,
                "n": (box[0].stop - box[0].start, box[1].stop - box[1].start,
                      box[2].stop - box[2].start),
                "ctrl": pack.add(ctrl),
                "g": ctrl.shape[1:],
                "w": [pack.add(x) for x in w],
                "m": m,
            }  # fmt: skip
            if not job.target_on_device:
                s["img"] = pack.add(np.asarray(job.target[box], dtype=np.float32))
            if not job.organ_on_device:
                org = np.asarray(job.organ[box])
                s["org"] = pack.add(
                    np.ascontiguousarray(org if org.dtype == bool else org > 0.5).view(np.uint8)
                )
            s["app"] = blend_params(t, plan.organ_noise_hu, plan.organ_noise_grain)
            segs.append(s)
    results_stats: dict[tuple[int, int], tuple[int, float]] = {}
    masks: dict[tuple[int, int], tuple[tuple[slice, slice, slice], Any]] = {}
    if segs or walls:
        _render_segs(be, jobs, infos, segs, walls, pack, results_stats, masks, C)
    out = []
    for j, job in enumerate(jobs):
        st = {i: v for (jj, i), v in results_stats.items() if jj == j}
        mk = {i: v for (jj, i), v in masks.items() if jj == j}
        out.append(assemble(job.plan, job.target, job.organ, st, mk, job.affine))
    return out


def _render_segs(be, jobs, infos, segs, walls, pack, results_stats, masks, C) -> None:
    from ._cpu_kernels import interp_coords_nb  # noqa: F401  (numba warm: the CPU twin)

    W, FW, DW = C.T_WIDTH, C.F_WIDTH, C.D_WIDTH
    n = len(segs)
    t_ref = pack.add(np.zeros((max(n, 1), W), dtype=np.int64))
    tf_ref = pack.add(np.zeros((max(n, 1), FW), dtype=np.float32))
    td_ref = pack.add(np.zeros((max(n, 1), DW), dtype=np.float64))
    bb = np.zeros((max(n, 1), 7), dtype=np.int32)
    if n:
        bb[:n, 0:6:2] = [s["n"] for s in segs]
        bb[:n, 1:6:2] = -1
    bb_ref = pack.add(bb)
    f32a = _Scratch(np.float32)
    u8a = _Scratch(np.uint8)
    for s in segs:
        nv = s["n"][0] * s["n"][1] * s["n"][2]
        s["nv"] = nv
        s["orig"], s["organ"], s["mask"] = f32a.add(nv), u8a.add(nv), u8a.add(nv)
        if s["app"] is not None:  # the appearance modes read q^2 of the shape pass
            s["q2"] = f32a.add(nv)
    f32a.alloc(be)
    u8a.alloc(be)
    pack.alloc(be)
    rows, frows, drows = [], [], []
    for s in segs:
        info = infos[s["job"]]
        t = s["t"]
        r = [0] * W
        n0, n1, n2 = s["n"]
        r[C.N0], r[C.N1], r[C.N2] = n0, n1, n2
        r[C.CTRL] = pack.addr(s["ctrl"])
        r[C.G0], r[C.G1], r[C.G2] = s["g"]
        r[C.W0], r[C.W1], r[C.W2] = (pack.addr(x) for x in s["w"])
        r[C.C0], r[C.C1], r[C.C2] = (int(c) for c in t.center_vox)
        o0, o1, o2 = s["box"][0].start, s["box"][1].start, s["box"][2].start
        r[C.O0], r[C.O1], r[C.O2] = o0, o1, o2
        # a box that travelled from the host: its address shifted so that the kernel's
        # (origin + index) * strides lands on it
        shift = o0 * n1 * n2 + o1 * n2 + o2
        if info.img is None:
            r[C.IMG], r[C.IMG_CODE] = pack.addr(s["img"]) - 4 * shift, 0
            r[C.IS0], r[C.IS1], r[C.IS2] = n1 * n2, n2, 1
        else:
            r[C.IMG], r[C.IMG_CODE] = info.img[0], info.img[1]
            r[C.IS0], r[C.IS1], r[C.IS2] = info.img[2]
        if info.org is None:
            r[C.ORG], r[C.ORG_CODE] = pack.addr(s["org"]) - shift, 3
            r[C.OS0], r[C.OS1], r[C.OS2] = n1 * n2, n2, 1
        else:
            r[C.ORG], r[C.ORG_CODE] = info.org[0], info.org[1]
            r[C.OS0], r[C.OS1], r[C.OS2] = info.org[2]
        s["a_bufs"] = (f32a.addr(s["orig"]), u8a.addr(s["organ"]), u8a.addr(s["mask"]))
        r[C.ORIG], r[C.ORGAN], r[C.MASK] = s["a_bufs"]
        r[C.CLIP] = int(bool(t.clip_to_organ))
        if s["app"] is not None:
            r[C.Q2] = s["a_q2"] = f32a.addr(s["q2"])
        rows.append(r)
        f = [0.0] * FW
        f[C.F_TLO], f[C.F_THI] = info.tissue
        frows.append(f)
        d = [0.0] * DW
        d[C.D_SP0], d[C.D_SP1], d[C.D_SP2] = info.sp
        d[C.D_M : C.D_M + 9] = s["m"].ravel().tolist()
        drows.append(d)
    if n:
        pack.set(t_ref, np.array(rows, dtype=np.int64))
        pack.set(tf_ref, np.array(frows, dtype=np.float32))
        pack.set(td_ref, np.array(drows, dtype=np.float64))
    pack.upload(be)
    Td, TFd, TDd = pack.view(t_ref), pack.view(tf_ref), pack.view(td_ref)
    mx = max((s["nv"] for s in segs), default=0)
    i32 = np.int32
    be.launch2d("sg_seg_shape", n, mx, Td, i32(W), TFd, i32(FW), TDd, i32(DW))
    be.launch2d("sg_seg_bbox", n, mx, Td, i32(W), pack.view(bb_ref))
    hit = be.download(pack.view(bb_ref)).tolist()  # synchronisation 1: every box of the batch
    # ---------------------------------------------------------------- phase B (host)
    live = []
    for k, s in enumerate(segs):
        lo0, hi0, lo1, hi1, lo2, hi2, count = hit[k]
        if count == 0:
            continue
        t = s["t"]
        sp = infos[s["job"]].sp
        sub, tight, tn = [], [], []
        for a, (lo, hi) in enumerate(((lo0, hi0), (lo1, hi1), (lo2, hi2))):
            pad = math.ceil(BLUR_TRUNCATE * t.blur_sigma_mm / sp[a]) + 1
            u0, u1 = max(0, lo - pad), min(s["n"][a], hi + pad + 1)
            sub.append(u0)
            b0 = s["box"][a].start
            tight.append(slice(b0 + u0, b0 + u1))
            tn.append(u1 - u0)
        s["sub"] = sub
        s["tight"] = tuple(tight)
        s["tn"] = tuple(tn)
        live.append(s)
    for j, i in walls:  # hollow-organ wall tumors: rendered on the host, uploaded below
        w = _wall_segment(be, jobs[j], i)
        if w is not None:
            w["job"], w["i"] = j, i
            live.append(w)
    if not live:
        return
    n = len(live)
    pack = _Pack()
    t_ref = pack.add(np.zeros((n, W), dtype=np.int64))
    tf_ref = pack.add(np.zeros((n, FW), dtype=np.float32))
    td_ref = pack.add(np.zeros((n, DW), dtype=np.float64))
    st_ref = pack.add(np.zeros((n, 2), dtype=np.float64))
    tx_ref = pack.add(np.zeros((n, 3), dtype=np.float64))
    f32 = _Scratch(np.float32)
    u8 = _Scratch(np.uint8)
    zero = _Scratch(np.float32)
    parts = _partners(live)
    for q, s in enumerate(live):
        tn = s["tn"]
        nv = tn[0] * tn[1] * tn[2]
        s["tnv"] = nv
        b = {}
        s["b"] = b
        b["part"] = pack.add(np.asarray(parts.get(q) or [0], dtype=np.int64))
        if s.get("host"):
            b["merged"], b["out"] = f32.add(nv), f32.add(nv)
            b["torig"], b["delta"] = pack.add(s["orig"]), pack.add(s["delta"])
            b["tmask"] = pack.add(s["mask"])
            continue
        t = s["t"]
        sp = infos[s["job"]].sp
        for name in ("torig", "maskf", "bx0", "bx1", "blur", "merged", "out"):
            b[name] = f32.add(nv)
        b["torgan"], b["tmask"] = u8.add(nv), u8.add(nv)
        b["delta"] = zero.add(nv)
        for a in range(3):
            sa, wa = _blur_band(t.blur_sigma_mm / sp[a], tn[a])
            b[f"bs{a}"], b[f"bw{a}"] = pack.add_shared(sa), pack.add_shared(wa)
        lo = tuple((s["tight"][a].start - t.center_vox[a]) * sp[a] for a in range(3))
        hi = tuple((s["tight"][a].stop - 1 - t.center_vox[a]) * sp[a] for a in range(3))
        rc = texture_recipe(t.seed, t.texture, lo, hi)  # type: ignore[arg-type]
        s["rc"] = rc
        ln = [x[1] for x in rc.lattice]
        bs, gs = rc.block_shape, rc.out_shape
        b["noise"] = f32.add(ln[0] * ln[1] * ln[2])
        b["za"] = f32.add(ln[0] * ln[1] * bs[2])
        b["zb"] = f32.add(ln[0] * bs[1] * bs[2])
        b["z0"] = f32.add(bs[0] * bs[1] * bs[2])
        b["frac"] = f32.add(bs[0] * bs[1] * bs[2])
        b["ga"] = f32.add(gs[0] * bs[1] * bs[2])
        b["gb"] = f32.add(gs[0] * gs[1] * bs[2])
        b["grid"] = f32.add(gs[0] * gs[1] * gs[2])
        for a in range(3):
            b[f"ls{a}"] = pack.add(rc.bands[a][0])
            b[f"lw{a}"] = pack.add(rc.bands[a][1])
            b[f"in{a}"] = pack.add(rc.inv_norm[a])
            gs_, gw_ = _toeplitz_band(rc.offs[a], rc.kern, bs[a], gs[a])
            b[f"gs{a}"], b[f"gw{a}"] = pack.add_shared(gs_), pack.add_shared(gw_)
        if s["app"] is not None:
            b["tq2"] = f32.add(nv)
            b["app"], b["keys"] = pack.add(s["app"][0]), pack.add(s["app"][1])
    f32.alloc(be)
    u8.alloc(be)
    zero.alloc(be, zero=True)
    pack.alloc(be)
    # the phase-A buffers stay alive (referenced by the phase-B table) until the end
    rows, frows, drows = [], [], []
    for q, s in enumerate(live):
        info = infos[s["job"]]
        b = s["b"]
        r = [0] * W
        f = [0.0] * FW
        d = [0.0] * DW
        rows.append(r)
        frows.append(f)
        drows.append(d)
        r[C.TN0], r[C.TN1], r[C.TN2] = s["tn"]
        r[C.TO0], r[C.TO1], r[C.TO2] = (x.start for x in s["tight"])
        r[C.MERGED] = f32.addr(b["merged"])
        r[C.PART], r[C.NPART] = pack.addr(b["part"]), len(parts.get(q, ()))
        if info.dst is not None:
            r[C.DST], r[C.DST_CODE] = info.dst[0], info.dst[1]
            r[C.DS0], r[C.DS1], r[C.DS2] = info.dst[2]
            r[C.DO0], r[C.DO1], r[C.DO2] = r[C.TO0], r[C.TO1], r[C.TO2]
        else:
            tn = s["tn"]
            r[C.DST], r[C.DST_CODE] = f32.addr(b["out"]), 0
            r[C.DS0], r[C.DS1], r[C.DS2] = tn[1] * tn[2], tn[2], 1
        r[C.ROUND] = info.round
        f[C.F_CMIN], f[C.F_CMAX], f[C.F_LO], f[C.F_HI] = info.cmin, info.cmax, info.lo, info.hi
        if s.get("host"):  # a host-rendered tumor: only merge and write-back read its row
            r[C.KIND] = 1
            r[C.TORIG], r[C.TMASK] = pack.addr(b["torig"]), pack.addr(b["tmask"])
            r[C.DELTA] = pack.addr(b["delta"])
            continue
        t = s["t"]
        rc = s["rc"]
        r[C.N0], r[C.N1], r[C.N2] = s["n"]
        r[C.CLIP] = int(bool(t.clip_to_organ))
        r[C.U0], r[C.U1], r[C.U2] = s["sub"]
        r[C.C0], r[C.C1], r[C.C2] = (int(c) for c in t.center_vox)
        r[C.ORIG], r[C.ORGAN], r[C.MASK] = s["a_bufs"]
        for name, col in (("torig", C.TORIG), ("maskf", C.MASKF), ("bx0", C.BX0), ("bx1", C.BX1),
                          ("blur", C.BLUR), ("noise", C.NOISE), ("za", C.ZA), ("zb", C.ZB),
                          ("z0", C.Z0), ("frac", C.FRAC), ("ga", C.GA), ("gb", C.GB),
                          ("grid", C.GRID)):  # fmt: skip
            r[col] = f32.addr(b[name])
        r[C.TORGAN], r[C.TMASK] = u8.addr(b["torgan"]), u8.addr(b["tmask"])
        r[C.DELTA] = zero.addr(b["delta"])
        for a in range(3):
            r[C.BS0 + a], r[C.BW0 + a] = pack.addr(b[f"bs{a}"]), pack.addr(b[f"bw{a}"])
            r[C.BKK0 + a] = pack.parts[b[f"bw{a}"]][1].shape[1]
            r[C.LS0 + a], r[C.LW0 + a] = pack.addr(b[f"ls{a}"]), pack.addr(b[f"lw{a}"])
            r[C.LK0 + a] = rc.bands[a][1].shape[1]
            r[C.INV0 + a] = pack.addr(b[f"in{a}"])
            r[C.GS0 + a], r[C.GW0 + a] = pack.addr(b[f"gs{a}"]), pack.addr(b[f"gw{a}"])
            r[C.GK0 + a] = pack.parts[b[f"gw{a}"]][1].shape[1]
        (la0, ln0), (la1, ln1), (la2, ln2) = rc.lattice
        bs, gs = rc.block_shape, rc.out_shape
        r[C.LA0], r[C.LA1], r[C.LA2] = la0, la1, la2
        r[C.LN0], r[C.LN1], r[C.LN2] = ln0, ln1, ln2
        r[C.NK0], r[C.NK1] = rc.noise_key
        r[C.ZD1], r[C.ZD1 + 1], r[C.ZD1 + 2] = ln0, ln1, bs[2]
        r[C.ZD2], r[C.ZD2 + 1], r[C.ZD2 + 2] = ln0, bs[1], bs[2]
        r[C.B0], r[C.B1], r[C.B2] = bs
        r[C.BK0], r[C.BK1] = rc.bern_key
        r[C.BLK0], r[C.BLK1], r[C.BLK2] = rc.blocks0
        r[C.GD1], r[C.GD1 + 1], r[C.GD1 + 2] = gs[0], bs[1], bs[2]
        r[C.GD2], r[C.GD2 + 1], r[C.GD2 + 2] = gs[0], gs[1], bs[2]
        r[C.G_0], r[C.G_1], r[C.G_2] = gs
        if s["app"] is not None:
            r[C.Q2], r[C.TQ2] = s["a_q2"], f32.addr(b["tq2"])
            r[C.APP], r[C.KEYS] = pack.addr(b["app"]), pack.addr(b["keys"])
            r[C.OFF0], r[C.OFF1], r[C.OFF2] = (
                x.start - c for x, c in zip(s["tight"], t.center_vox, strict=True)
            )
        f[C.F_TLO], f[C.F_THI] = info.tissue
        f[C.F_CONTRAST], f[C.F_ORGAN_HU] = t.contrast_hu, info.organ_hu
        d[C.D_ZSCALE], d[C.D_BASE], d[C.D_SCALE] = rc.zscale, rc.base, rc.scale
        d[C.D_NCELLS], d[C.D_THR], d[C.D_U0] = rc.n_cells, rc.threshold, rc.u0
        d[C.D_SP0], d[C.D_SP1], d[C.D_SP2] = info.sp
        d[C.D_TX0], d[C.D_TX1], d[C.D_TX2] = (float(x) for x in rc.origin)
        d[C.D_STEP] = rc.step
    pack.set(t_ref, np.array(rows, dtype=np.int64))
    pack.set(tf_ref, np.array(frows, dtype=np.float32))
    pack.set(td_ref, np.array(drows, dtype=np.float64))
    pack.upload(be)
    Td, TFd, TDd = pack.view(t_ref), pack.view(tf_ref), pack.view(td_ref)
    i32 = np.int32
    WW, FF, DD = i32(W), i32(FW), i32(DW)
    tv = max(s["tnv"] for s in live)
    be.launch2d("sg_seg_gather", n, tv, Td, WW)
    for a, (src, dst) in enumerate(((C.MASKF, C.BX0), (C.BX0, C.BX1), (C.BX1, C.BLUR))):
        be.launch2d("sg_seg_band", n, tv, Td, WW, i32(a), i32(src), i32(C.TN0), i32(C.BS0 + a),
                    i32(C.BW0 + a), i32(C.TN0 + a), i32(C.BKK0 + a), i32(dst))  # fmt: skip
    dev = [s["rc"] for s in live if not s.get("host")]  # host rows only merge and write back
    lv = max((math.prod(x[1] for x in rc.lattice) for rc in dev), default=0)
    be.launch2d("sg_seg_lattice", n, lv, Td, WW)
    zmax = max((max(math.prod(rc.block_shape), lv) for rc in dev), default=0)
    for a, src, dims, dst in ((2, C.NOISE, C.LN0, C.ZA), (1, C.ZA, C.ZD1, C.ZB),
                              (0, C.ZB, C.ZD2, C.Z0)):  # fmt: skip
        be.launch2d("sg_seg_band", n, zmax, Td, WW, i32(a), i32(src), i32(dims), i32(C.LS0 + a),
                    i32(C.LW0 + a), i32(C.B0 + a), i32(C.LK0 + a), i32(dst))  # fmt: skip
    be.launch2d("sg_seg_blocks", n, zmax, Td, WW, TDd, DD)
    gmax = max(
        (max(math.prod(rc.block_shape), math.prod(rc.out_shape),
             rc.out_shape[0] * rc.block_shape[1] * rc.block_shape[2],
             rc.out_shape[0] * rc.out_shape[1] * rc.block_shape[2]) for rc in dev),
        default=0,
    )  # fmt: skip
    for a, src, dims, dst in ((0, C.FRAC, C.B0, C.GA), (1, C.GA, C.GD1, C.GB),
                              (2, C.GB, C.GD2, C.GRID)):  # fmt: skip
        be.launch2d("sg_seg_band", n, gmax, Td, WW, i32(a), i32(src), i32(dims), i32(C.GS0 + a),
                    i32(C.GW0 + a), i32(C.G_0 + a), i32(C.GK0 + a), i32(dst))  # fmt: skip
    txs = pack.view(tx_ref)
    be.launch2d("sg_seg_tex_stats", n, gmax, Td, WW, TDd, DD, txs)
    be.launch2d("sg_seg_tex_scale", n, gmax, Td, WW, TDd, DD, txs)
    be.launch2d("sg_seg_blend", n, tv, Td, WW, TFd, FF, TDd, DD)
    be.launch2d("sg_seg_merge", n, tv, Td, WW)
    stats = pack.view(st_ref)
    be.launch2d("sg_seg_apply", n, tv, Td, WW, TFd, FF, stats)
    if KEEP_LAST:
        LAST.clear()
        LAST.update(
            n=n, max_voxels=tv, voxels=sum(s["tnv"] for s in live), T=Td, TF=TFd, TD=TDd,
            stats=stats, W=WW, FW=FF, DW=DD, keep=(pack, f32a, u8a, f32, u8, zero),
        )  # fmt: skip
    host_stats = be.download(stats).tolist()  # synchronisation 2
    for q, s in enumerate(live):
        job = jobs[s["job"]]
        tn = s["tn"]
        nv, acc = host_stats[q]
        nv = int(nv)
        results_stats[(s["job"], s["i"])] = (nv, acc / nv if nv else 0.0)
        m = pack.view(s["b"]["tmask"]) if s.get("host") else u8.view(s["b"]["tmask"], tn)
        if not job.target_on_device:
            sel = be.download(f32.view(s["b"]["merged"], tn)) != 0
            o = be.download(f32.view(s["b"]["out"], tn))  # written where sel only
            job.target[s["tight"]][sel] = o[sel].astype(job.target.dtype)
            m = be.download(m).view(np.bool_)
        masks[(s["job"], s["i"])] = (s["tight"], m)
    # the device memory of both phases stays referenced until the download above synchronised
    del f32a, u8a, f32, u8, zero


def _partners(live) -> dict[int, list[int]]:
    """Per segment, the (ascending) segments of the same job whose tight boxes overlap it."""
    parts: dict[int, list[int]] = {}
    by_job: dict[int, list[int]] = {}
    for q, s in enumerate(live):
        by_job.setdefault(s["job"], []).append(q)
    for qs in by_job.values():
        if len(qs) < 2:
            continue
        lo = np.array([[x.start for x in live[q]["tight"]] for q in qs])
        hi = np.array([[x.stop for x in live[q]["tight"]] for q in qs])
        ov = ((lo[:, None, :] < hi[None, :, :]) & (lo[None, :, :] < hi[:, None, :])).all(axis=2)
        np.fill_diagonal(ov, False)
        for a_, row in zip(qs, ov, strict=True):
            if row.any():
                parts[a_] = [qs[i] for i in np.flatnonzero(row)]
    return parts


class _Shifted:
    """A host copy of ``box`` indexed with the scan's coordinates (``a[box]`` returns it)."""

    def __init__(self, a: np.ndarray, box) -> None:
        self.a, self.box = a, box

    def __getitem__(self, key):
        return self.a[
            tuple(
                slice(k.start - b.start, k.stop - b.start)
                for k, b in zip(key, self.box, strict=True)
            )
        ]


def _wall_segment(be, job, i: int) -> dict[str, Any] | None:
    """A hollow-organ wall tumor (:mod:`synthgen._hollow`), rendered on the host from host
    copies of its box (the CPU's function on the same box: the same result on both backends);
    its change then joins the others' merge and write-back on the device."""
    from ._hollow import render_wall, wall_box

    plan = job.plan
    t = plan.tumors[i]
    box = wall_box(t, plan.spacing, plan.shape, plan.organ_bbox)
    if box is None:
        return None

    def host(a, on_device):
        return be.download(a[box]) if on_device else np.asarray(a[box])

    img = _Shifted(host(job.target, job.target_on_device), box)
    org = _Shifted(host(job.organ, job.organ_on_device), box)
    r = render_wall(t, box, plan.spacing, img, org, np.float32)
    if r is None:
        return None
    tight, orig, delta, mask = r
    return {
        "host": True,
        "tight": tight,
        "tn": tuple(x.stop - x.start for x in tight),
        "orig": np.ascontiguousarray(orig, dtype=np.float32),
        "delta": np.ascontiguousarray(delta, dtype=np.float32),
        "mask": np.ascontiguousarray(mask).view(np.uint8),
    }
