"""The GPU render of a batch as segments: a fixed number of launches, whatever the tumor count.

Every tumor of every plan of a batch is a *segment*. The host describes all segments in one
int64 table (sizes, indices, device addresses), one float32 and one float64 table
(``kernels/segmented.cuh`` names their columns), packs them with every small per-tumor array
into one buffer, uploads it with one copy and launches each step of the render once for the
whole batch (``kernels/segmented.cu``): 2 launches in phase A (gather + fused shape test, box
reduction), then one copy back of all boxes, then 17 launches in phase B (tight-box gather,
three blur passes, lattice noise, three band sums, Bernoulli blocks, three grid passes, the
rescale's statistics and scaling, the fused blend, the overlap merge, the write-back), then
one copy back of the statistics. The per-tumor work the host keeps is arithmetic on a few
small arrays (B-spline weights, band tables, texture recipe).
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
from ._geometry import blur_band
from ._texture import texture_recipe
from .rendering import (
    BLUR_TRUNCATE,
    RenderResult,
    _output_range,
    _shape_inputs,
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

    def add(self, a: np.ndarray) -> int:
        a = np.ascontiguousarray(a)
        off = (self.size + 15) // 16 * 16
        self.parts.append((off, a))
        self.size = off + a.nbytes
        return len(self.parts) - 1

    def alloc(self, be) -> None:
        self.dev = be.alloc(self.size)
        self.base = be.ptr(self.dev)

    def addr(self, ref: int) -> int:
        return self.base + self.parts[ref][0]

    def view(self, ref: int):
        off, a = self.parts[ref]
        return self.dev[off : off + a.nbytes].view(a.dtype).reshape(a.shape)

    def upload(self, be) -> None:
        host = np.zeros(max(self.size, 16), dtype=np.uint8)
        for off, a in self.parts:
            host[off : off + a.nbytes] = a.reshape(-1).view(np.uint8)
        be.copy_in(self.dev, host)


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
        xp = be.xp
        if zero:
            self.dev = xp.zeros(total, dtype=self.dtype)
        elif POISON:
            fill = np.nan if self.dtype.kind == "f" else np.iinfo(self.dtype).max
            self.dev = xp.full(total, fill, dtype=self.dtype)
        else:
            self.dev = xp.empty(total, self.dtype)
        self.base = be.ptr(self.dev)

    def addr(self, i: int) -> int:
        return self.base + int(self.offs[i]) * self.dtype.itemsize

    def view(self, i: int, shape):
        o = int(self.offs[i])
        return self.dev[o : o + self.sizes[i]].reshape(shape)


def _toeplitz_band(off: int, kern: np.ndarray, n_in: int, n_out: int):
    """Band form of ``out[o] = sum_t kern[t] in[o + off + t]`` with zero padding.

    Every row reads a window of ``min(len(kern), n_in)`` inputs that lies inside the array;
    taps outside it get weight 0, so the sum runs over the same inputs in the same order as
    the CPU's ``toeplitz_contract3``.
    """
    return _toeplitz_cached(int(off), kern.tobytes(), int(n_in), int(n_out))


@functools.lru_cache(maxsize=8192)
def _toeplitz_cached(off: int, kern_bytes: bytes, n_in: int, n_out: int):
    kern = np.frombuffer(kern_bytes, dtype=np.float32)
    k = kern.size
    kk = min(k, n_in)
    c0 = np.arange(n_out, dtype=np.int64) + off
    s = np.clip(c0, 0, n_in - kk)
    tap = s[:, None] + np.arange(kk)[None, :] - c0[:, None]
    ok = (tap >= 0) & (tap < k)
    w = np.where(ok, kern[np.clip(tap, 0, k - 1)], 0.0).astype(np.float32)
    s.flags.writeable = False
    w.flags.writeable = False
    return s, w


@functools.lru_cache(maxsize=4096)
def _blur_band(sigma_vox: float, n: int):
    """The mask blur's band (:func:`synthgen._geometry.blur_band`), cached per size."""
    s, w = blur_band(n, sigma_vox, BLUR_TRUNCATE)
    s.flags.writeable = False
    w.flags.writeable = False
    return s, w


def _strides(a) -> tuple[int, int, int]:
    item = np.dtype(str(a.dtype)).itemsize
    return tuple(int(s) // item for s in a.strides)  # type: ignore[return-value]


def render_segments(be, jobs: Sequence[Any]) -> list[RenderResult]:
    """Render ``jobs`` (``synthgen._cuda.Job``) on backend ``be``: see the module docstring."""
    from ._cpu_kernels import interp_coords_nb

    # ---------------------------------------------------------------- phase A (host)
    segs: list[dict[str, Any]] = []
    walls: list[tuple[int, int]] = []
    pack = _Pack()
    for j, job in enumerate(jobs):
        plan = job.plan
        sp = plan.spacing
        for i, t in enumerate(plan.tumors):
            if getattr(t, "kind", "ellipsoid") != "ellipsoid":
                walls.append((j, i))  # rendered on the host in phase B
                continue
            box = tumor_box(t, sp, plan.shape, plan.organ_bbox, coarse=not job.target_on_device)
            if box is None:
                continue
            pos = [
                (np.arange(box[a].start, box[a].stop) - t.center_vox[a]) * sp[a] for a in range(3)
            ]
            ctrl, w, pos32, m = _shape_inputs(t, pos)
            s = {
                "job": j,
                "i": i,
                "box": box,
                "pos": pos,
                "n": tuple(b.stop - b.start for b in box),
            }
            s["refs"] = [pack.add(np.asarray(x, dtype=np.float32)) for x in (ctrl, *w, *pos32)]
            s["refs"].append(pack.add(np.asarray(m, dtype=np.float64)))
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
        _render_segs(be, jobs, segs, walls, pack, results_stats, masks, interp_coords_nb)
    out = []
    for j, job in enumerate(jobs):
        st = {i: v for (jj, i), v in results_stats.items() if jj == j}
        mk = {i: v for (jj, i), v in masks.items() if jj == j}
        out.append(assemble(job.plan, job.target, job.organ, st, mk, job.affine))
    return out


def _render_segs(be, jobs, segs, walls, pack, results_stats, masks, interp_coords_nb) -> None:
    C = _columns()
    W, FW = C.T_WIDTH, C.F_WIDTH
    n = len(segs)
    T = np.zeros((max(n, 1), W), dtype=np.int64)
    TF = np.zeros((max(n, 1), FW), dtype=np.float32)
    t_ref, tf_ref = pack.add(T), pack.add(TF)
    bb = np.zeros((max(n, 1), 7), dtype=np.int32)
    for k, s in enumerate(segs):
        bb[k] = (s["n"][0], -1, s["n"][1], -1, s["n"][2], -1, 0)
    bb_ref = pack.add(bb)
    vox = [math.prod(s["n"]) for s in segs]
    f32a = _Scratch(np.float32)
    u8a = _Scratch(np.uint8)
    for k, s in enumerate(segs):
        s["orig"], s["organ"], s["mask"] = f32a.add(vox[k]), u8a.add(vox[k]), u8a.add(vox[k])
        if s["app"] is not None:  # the appearance modes read q^2 of the shape pass
            s["q2"] = f32a.add(vox[k])
    f32a.alloc(be)
    u8a.alloc(be)
    pack.alloc(be)
    for k, s in enumerate(segs):
        job = jobs[s["job"]]
        t = job.plan.tumors[s["i"]]
        r = T[k]
        r[C.N0 : C.N2 + 1] = s["n"]
        refs = s["refs"]
        ctrl_shape = pack.parts[refs[0]][1].shape
        r[C.CTRL] = pack.addr(refs[0])
        r[C.G0 : C.G2 + 1] = ctrl_shape[1:]
        for a in range(3):
            r[C.W0 + a] = pack.addr(refs[1 + a])
            r[C.P0 + a] = pack.addr(refs[4 + a])
        r[C.M] = pack.addr(refs[7])
        origin = tuple(b.start for b in s["box"])
        box_strides = (s["n"][1] * s["n"][2], s["n"][2], 1)
        # a box that travelled from the host: its address shifted so that the kernel's
        # (origin + index) * strides lands on it
        shift = sum(o * st for o, st in zip(origin, box_strides, strict=True))
        if "img" in s:
            r[C.IMG], r[C.IMG_CODE] = pack.addr(s["img"]) - 4 * shift, 0
            r[C.IS0 : C.IS2 + 1] = box_strides
        else:
            r[C.IMG], r[C.IMG_CODE] = be.ptr(job.target), dtype_code(job.target.dtype)
            r[C.IS0 : C.IS2 + 1] = _strides(job.target)
        if "org" in s:
            r[C.ORG], r[C.ORG_CODE] = pack.addr(s["org"]) - shift, 3
            r[C.OS0 : C.OS2 + 1] = box_strides
        else:
            org = job.organ
            r[C.ORG], r[C.ORG_CODE] = be.ptr(org), dtype_code(org.dtype)
            r[C.OS0 : C.OS2 + 1] = _strides(org)
        r[C.O0 : C.O2 + 1] = origin
        s["a_bufs"] = (f32a.addr(s["orig"]), u8a.addr(s["organ"]), u8a.addr(s["mask"]))
        r[C.ORIG], r[C.ORGAN], r[C.MASK] = s["a_bufs"]
        r[C.CLIP] = int(bool(t.clip_to_organ))
        if s["app"] is not None:
            r[C.Q2] = f32a.addr(s["q2"])
            s["a_q2"] = r[C.Q2]
        TF[k, C.F_TLO], TF[k, C.F_THI] = job.tissue
    pack.upload(be)
    Td, TFd = pack.view(t_ref), pack.view(tf_ref)
    mx = max(vox, default=0)
    be.launch2d("sg_seg_shape", n, mx, Td, np.int32(W), TFd, np.int32(FW))
    be.launch2d("sg_seg_bbox", n, mx, Td, np.int32(W), pack.view(bb_ref))
    hit = be.download(pack.view(bb_ref))  # synchronisation 1: every box of the batch
    # ---------------------------------------------------------------- phase B (host)
    live = []
    for k, s in enumerate(segs):
        lo0, hi0, lo1, hi1, lo2, hi2, count = (int(v) for v in hit[k])
        if count == 0:
            continue
        job = jobs[s["job"]]
        t = job.plan.tumors[s["i"]]
        sp = job.plan.spacing
        sub = []
        for a, (lo, hi) in enumerate(((lo0, hi0), (lo1, hi1), (lo2, hi2))):
            pad = math.ceil(BLUR_TRUNCATE * t.blur_sigma_mm / sp[a]) + 1
            sub.append(slice(max(0, lo - pad), min(s["n"][a], hi + pad + 1)))
        s["sub"] = sub
        s["tight"] = tuple(
            slice(s["box"][a].start + sub[a].start, s["box"][a].start + sub[a].stop)
            for a in range(3)
        )
        s["tn"] = tuple(x.stop - x.start for x in sub)
        s["pos"] = [p[x] for p, x in zip(s["pos"], sub, strict=True)]
        s["row"] = k
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
    T = np.zeros((n, W), dtype=np.int64)
    TF = np.zeros((n, FW), dtype=np.float32)
    TD = np.zeros((n, C.D_WIDTH), dtype=np.float64)
    t_ref, tf_ref, td_ref = pack.add(T), pack.add(TF), pack.add(TD)
    st_ref = pack.add(np.zeros((n, 2), dtype=np.float64))
    tx_ref = pack.add(np.zeros((n, 3), dtype=np.float64))
    f32 = _Scratch(np.float32)
    u8 = _Scratch(np.uint8)
    zero = _Scratch(np.float32)
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
    for q, s in enumerate(live):
        job = jobs[s["job"]]
        t = job.plan.tumors[s["i"]]
        sp = job.plan.spacing
        tn = s["tn"]
        nv = math.prod(tn)
        b = {}
        if s.get("host"):
            b["part"] = pack.add(np.asarray(sorted(parts.get(q, [])) or [0], dtype=np.int64))
            b["merged"], b["out"] = f32.add(nv), f32.add(nv)
            b["torig"], b["delta"] = pack.add(s["orig"]), pack.add(s["delta"])
            b["tmask"] = pack.add(s["mask"])
            s["b"] = b
            continue
        for name in ("torig", "maskf", "bx0", "bx1", "blur", "merged", "out"):
            b[name] = f32.add(nv)
        b["torgan"], b["tmask"] = u8.add(nv), u8.add(nv)
        b["delta"] = zero.add(nv)
        for a in range(3):
            sa, wa = _blur_band(t.blur_sigma_mm / sp[a], tn[a])
            b[f"bs{a}"], b[f"bw{a}"] = pack.add(sa), pack.add(wa)
        lo = tuple(float(p[0]) for p in s["pos"])
        hi = tuple(float(p[-1]) for p in s["pos"])
        rc = texture_recipe(t.seed, t.texture, lo, hi)  # type: ignore[arg-type]
        s["rc"] = rc
        ln = [x[1] for x in rc.lattice]
        bs, gs = rc.block_shape, rc.out_shape
        b["noise"] = f32.add(math.prod(ln))
        b["za"] = f32.add(ln[0] * ln[1] * bs[2])
        b["zb"] = f32.add(ln[0] * bs[1] * bs[2])
        b["z0"] = f32.add(math.prod(bs))
        b["frac"] = f32.add(math.prod(bs))
        b["ga"] = f32.add(gs[0] * bs[1] * bs[2])
        b["gb"] = f32.add(gs[0] * gs[1] * bs[2])
        b["grid"] = f32.add(math.prod(gs))
        for a in range(3):
            b[f"ls{a}"] = pack.add(rc.bands[a][0].astype(np.int64))
            b[f"lw{a}"] = pack.add(rc.bands[a][1].astype(np.float32))
            b[f"in{a}"] = pack.add(rc.inv_norm[a].astype(np.float64))
            gs_, gw_ = _toeplitz_band(rc.offs[a], rc.kern, bs[a], gs[a])
            b[f"gs{a}"], b[f"gw{a}"] = pack.add(gs_), pack.add(gw_)
            i0, f0 = interp_coords_nb(s["pos"][a], rc.origin[a], rc.step, gs[a])
            b[f"ii{a}"], b[f"if{a}"] = pack.add(i0), pack.add(f0)
        b["part"] = pack.add(np.asarray(sorted(parts.get(q, [])) or [0], dtype=np.int64))
        if s["app"] is not None:
            b["tq2"] = f32.add(nv)
            b["app"], b["keys"] = pack.add(s["app"][0]), pack.add(s["app"][1])
        s["b"] = b
    f32.alloc(be)
    u8.alloc(be)
    zero.alloc(be, zero=True)
    pack.alloc(be)
    # the phase-A buffers stay alive (referenced by the phase-B table) until the end
    for q, s in enumerate(live):
        job = jobs[s["job"]]
        t = job.plan.tumors[s["i"]]
        b = s["b"]
        r = T[q]
        if s.get("host"):
            _host_row(r, TF[q], s, job, pack, f32, parts.get(q, []), be)
            continue
        rc = s["rc"]
        r[C.N0 : C.N2 + 1] = s["n"]
        r[C.CLIP] = int(bool(t.clip_to_organ))
        r[C.U0 : C.U2 + 1] = [x.start for x in s["sub"]]
        r[C.TN0 : C.TN2 + 1] = s["tn"]
        r[C.TO0 : C.TO2 + 1] = [x.start for x in s["tight"]]
        for name, col in (("torig", C.TORIG), ("maskf", C.MASKF), ("bx0", C.BX0), ("bx1", C.BX1),
                          ("blur", C.BLUR), ("merged", C.MERGED), ("noise", C.NOISE),
                          ("za", C.ZA), ("zb", C.ZB), ("z0", C.Z0), ("frac", C.FRAC),
                          ("ga", C.GA), ("gb", C.GB), ("grid", C.GRID)):  # fmt: skip
            r[col] = f32.addr(b[name])
        r[C.TORGAN], r[C.TMASK] = u8.addr(b["torgan"]), u8.addr(b["tmask"])
        r[C.DELTA] = zero.addr(b["delta"])
        for a in range(3):
            r[C.BS0 + a], r[C.BW0 + a] = pack.addr(b[f"bs{a}"]), pack.addr(b[f"bw{a}"])
            r[C.BKK0 + a] = pack.parts[b[f"bw{a}"]][1].shape[1]
            r[C.LS0 + a], r[C.LW0 + a] = pack.addr(b[f"ls{a}"]), pack.addr(b[f"lw{a}"])
            r[C.LK0 + a] = pack.parts[b[f"lw{a}"]][1].shape[1]
            r[C.INV0 + a] = pack.addr(b[f"in{a}"])
            r[C.GS0 + a], r[C.GW0 + a] = pack.addr(b[f"gs{a}"]), pack.addr(b[f"gw{a}"])
            r[C.GK0 + a] = pack.parts[b[f"gw{a}"]][1].shape[1]
            r[C.II0 + a], r[C.IF0 + a] = pack.addr(b[f"ii{a}"]), pack.addr(b[f"if{a}"])
        ln = [x[1] for x in rc.lattice]
        bs, gs = rc.block_shape, rc.out_shape
        r[C.LA0 : C.LA2 + 1] = [x[0] for x in rc.lattice]
        r[C.LN0 : C.LN2 + 1] = ln
        r[C.NK0], r[C.NK1] = rc.noise_key
        r[C.ZD1 : C.ZD1 + 3] = (ln[0], ln[1], bs[2])
        r[C.ZD2 : C.ZD2 + 3] = (ln[0], bs[1], bs[2])
        r[C.B0 : C.B2 + 1] = bs
        r[C.BK0], r[C.BK1] = rc.bern_key
        r[C.BLK0 : C.BLK2 + 1] = rc.blocks0
        r[C.GD1 : C.GD1 + 3] = (gs[0], bs[1], bs[2])
        r[C.GD2 : C.GD2 + 3] = (gs[0], gs[1], bs[2])
        r[C.G_0 : C.G_2 + 1] = gs
        r[C.PART], r[C.NPART] = pack.addr(b["part"]), len(parts.get(q, []))
        if s["app"] is not None:
            r[C.Q2], r[C.TQ2] = s["a_q2"], f32.addr(b["tq2"])
            r[C.APP], r[C.KEYS] = pack.addr(b["app"]), pack.addr(b["keys"])
            r[C.OFF0 : C.OFF2 + 1] = [
                x.start - c for x, c in zip(s["tight"], t.center_vox, strict=True)
            ]
        _dst_columns(r, s, job, f32, be)
        dtype = np.dtype(str(job.target.dtype))
        lo_out, hi_out = _output_range(dtype)
        c = job.preset.contrast
        TF[q] = (
            job.tissue[0], job.tissue[1], t.contrast_hu,
            job.plan.organ_hu if job.plan.organ_hu is not None else 0.0,
            c.min_hu, c.max_hu, lo_out, hi_out,
        )  # fmt: skip
        TD[q] = (rc.zscale, rc.base, rc.scale, rc.n_cells, rc.threshold, rc.u0)
    _fill_phase_a_columns(T, live)
    for q, s in enumerate(live):  # host rows keep their own buffers
        if s.get("host"):
            T[q, C.TORIG], T[q, C.TMASK] = pack.addr(s["b"]["torig"]), pack.addr(s["b"]["tmask"])
            T[q, C.DELTA] = pack.addr(s["b"]["delta"])
    pack.upload(be)
    Td, TFd, TDd = pack.view(t_ref), pack.view(tf_ref), pack.view(td_ref)
    i32 = np.int32
    WW, FF, DD = i32(W), i32(FW), i32(C.D_WIDTH)
    tv = max(math.prod(s["tn"]) for s in live)
    be.launch2d("sg_seg_gather", n, tv, Td, WW)
    for a, (src, dst) in enumerate(((C.MASKF, C.BX0), (C.BX0, C.BX1), (C.BX1, C.BLUR))):
        be.launch2d("sg_seg_band", n, tv, Td, WW, i32(a), i32(src), i32(C.TN0), i32(C.BS0 + a),
                    i32(C.BW0 + a), i32(C.TN0 + a), i32(C.BKK0 + a), i32(dst))  # fmt: skip
    dev = [s for s in live if not s.get("host")]  # host rows only merge and write back
    lv = max((math.prod(x[1] for x in s["rc"].lattice) for s in dev), default=0)
    be.launch2d("sg_seg_lattice", n, lv, Td, WW)
    zmax = max((max(math.prod(s["rc"].block_shape), lv) for s in dev), default=0)
    for a, src, dims, dst in ((2, C.NOISE, C.LN0, C.ZA), (1, C.ZA, C.ZD1, C.ZB),
                              (0, C.ZB, C.ZD2, C.Z0)):  # fmt: skip
        be.launch2d("sg_seg_band", n, zmax, Td, WW, i32(a), i32(src), i32(dims), i32(C.LS0 + a),
                    i32(C.LW0 + a), i32(C.B0 + a), i32(C.LK0 + a), i32(dst))  # fmt: skip
    be.launch2d("sg_seg_blocks", n, zmax, Td, WW, TDd, DD)
    gmax = max(
        max(math.prod(s["rc"].block_shape), math.prod(s["rc"].out_shape),
            s["rc"].out_shape[0] * s["rc"].block_shape[1] * s["rc"].block_shape[2],
            s["rc"].out_shape[0] * s["rc"].out_shape[1] * s["rc"].block_shape[2])
        for s in dev
    ) if dev else 0  # fmt: skip
    for a, src, dims, dst in ((0, C.FRAC, C.B0, C.GA), (1, C.GA, C.GD1, C.GB),
                              (2, C.GB, C.GD2, C.GRID)):  # fmt: skip
        be.launch2d("sg_seg_band", n, gmax, Td, WW, i32(a), i32(src), i32(dims), i32(C.GS0 + a),
                    i32(C.GW0 + a), i32(C.G_0 + a), i32(C.GK0 + a), i32(dst))  # fmt: skip
    txs = pack.view(tx_ref)
    be.launch2d("sg_seg_tex_stats", n, gmax, Td, WW, TDd, DD, txs)
    be.launch2d("sg_seg_tex_scale", n, gmax, Td, WW, TDd, DD, txs)
    be.launch2d("sg_seg_blend", n, tv, Td, WW, TFd, FF)
    be.launch2d("sg_seg_merge", n, tv, Td, WW)
    stats = pack.view(st_ref)
    be.launch2d("sg_seg_apply", n, tv, Td, WW, TFd, FF, stats)
    if KEEP_LAST:
        LAST.clear()
        LAST.update(
            n=n, max_voxels=tv, voxels=sum(math.prod(s["tn"]) for s in live), T=Td, TF=TFd,
            stats=stats, W=WW, FW=FF, keep=(pack, f32a, u8a, f32, u8, zero),
        )  # fmt: skip
    host_stats = be.download(stats)  # synchronisation 2
    for q, s in enumerate(live):
        job = jobs[s["job"]]
        tn = s["tn"]
        nv, acc = int(host_stats[q, 0]), float(host_stats[q, 1])
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


def _fill_phase_a_columns(T, live) -> None:
    """Phase-B rows read the phase-A buffers (orig, organ, mask) of their segment."""
    C = _columns()
    for q, s in enumerate(live):
        if not s.get("host"):
            T[q, C.ORIG], T[q, C.ORGAN], T[q, C.MASK] = s["a_bufs"]


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


def _host_row(r, rf, s, job, pack, f32, partners, be) -> None:
    """The table row of a host-rendered tumor: only merge and write-back read it."""
    C = _columns()
    r[C.KIND] = 1
    r[C.TN0 : C.TN2 + 1] = s["tn"]
    r[C.TO0 : C.TO2 + 1] = [x.start for x in s["tight"]]
    r[C.MERGED] = f32.addr(s["b"]["merged"])
    r[C.PART], r[C.NPART] = pack.addr(s["b"]["part"]), len(partners)
    _dst_columns(r, s, job, f32, be)
    c = job.preset.contrast
    lo_out, hi_out = _output_range(np.dtype(str(job.target.dtype)))
    rf[C.F_CMIN], rf[C.F_CMAX], rf[C.F_LO], rf[C.F_HI] = c.min_hu, c.max_hu, lo_out, hi_out


def _dst_columns(r, s, job, f32, be) -> None:
    """Where the write-back goes: the device image itself, or a float32 box for the host."""
    C = _columns()
    dtype = np.dtype(str(job.target.dtype))
    if job.target_on_device:
        r[C.DST], r[C.DST_CODE] = be.ptr(job.target), dtype_code(dtype)
        r[C.DS0 : C.DS2 + 1] = _strides(job.target)
        r[C.DO0 : C.DO2 + 1] = [x.start for x in s["tight"]]
    else:
        tn = s["tn"]
        r[C.DST], r[C.DST_CODE] = f32.addr(s["b"]["out"]), 0
        r[C.DS0 : C.DS2 + 1] = (tn[1] * tn[2], tn[2], 1)
    r[C.ROUND] = int(dtype.kind in "iu")
