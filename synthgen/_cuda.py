"""The CUDA backend: the kernels of ``kernels/`` driven through CuPy, the same result as the CPU.

Imported only when a render runs on a GPU (``import synthgen`` never touches CUDA).

A batch of plans renders in two phases, with no host synchronisation per tumor:

* **Phase A.** The host computes each tumor's conservative box and the small shape inputs
  (B-spline weight rows, positions, the 3x3 metric) for every tumor of every plan, packs them
  into one buffer and uploads it once. The fused shape kernel (B-spline displacement and
  ellipsoid test in one pass) writes each tumor's mask; a reduction kernel writes every
  mask's bounding box into one small array, copied back in one go (synchronisation 1).
* **Phase B.** With the exact boxes known the host builds the texture recipes, blur bands and
  interpolation coordinates (one more upload); then, back to back for all tumors: the
  separable mask blur, the texture (lattice noise, Gaussian band sums, Bernoulli block
  fractions, block-to-grid smoothing, the published rescale with its mean kept on the device),
  the fused blend, the strongest-change merge of overlapping tumors and the write-back into
  the image in place. The per-tumor statistics come back in one copy (synchronisation 2).

Every kernel is the CUDA C twin of a numba kernel of the CPU path (same operations, same
order, compiled without FMA contraction), and every random number comes from the same
counter-based hash, so one plan renders the same tumor on both backends.

The backend object (:class:`CupyBackend`) is all this module knows of CuPy: array creation
through ``xp`` and kernel launches through ``launch``. The test suite runs this very driver
without a GPU through a stand-in whose ``xp`` is NumPy and whose kernels are the same CUDA C
sources compiled for the host (``tests/_cuda_emu.py``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._geometry import gaussian_kernel1d
from ._texture import TextureRecipe, texture_recipe
from .planning import Plan
from .rendering import (
    BLUR_TRUNCATE,
    RenderResult,
    _clusters,
    _output_range,
    _overlap,
    _rel,
    _shape_inputs,
    assemble,
    tumor_box,
)

__all__ = ["KERNELS", "NVRTC_OPTIONS", "CupyBackend", "kernel_dir", "render_jobs"]

#: Each kernel and the source file in ``kernels/`` that defines it.
KERNELS = {
    "sg_lattice_uniform": "noise.cu",
    "sg_shape_mask": "shape.cu",
    "sg_mask_bbox": "reduce.cu",
    "sg_band_axis": "texture.cu",
    "sg_block_sums": "texture.cu",
    "sg_blend_tumor": "blend.cu",
    "sg_apply_delta": "blend.cu",
}

#: No FMA contraction: the kernels round as the CPU path does.
NVRTC_OPTIONS = ("--std=c++14", "--fmad=false")

THREADS = 256
MAX_BLOCKS = 8192


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


def launch_shape(total: int) -> tuple[tuple[int], tuple[int]]:
    """Grid and block of a grid-stride launch over ``total`` elements."""
    return (max(1, min((total + THREADS - 1) // THREADS, MAX_BLOCKS)),), (THREADS,)


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
        return self.module(KERNELS[name]).get_function(name)

    def launch(self, name: str, total: int, *args) -> None:
        if total <= 0:
            return
        grid, block = launch_shape(total)
        self.function(name)(grid, block, args)

    def upload(self, host: np.ndarray):
        return self.xp.asarray(host)

    def on_device(self, a) -> bool:
        from ._device import array_kind

        return array_kind(a) == "cupy"

    def context(self, stream, arrays):
        """This GPU current, and the stream to work on (see :func:`_stream_for`)."""
        import contextlib

        ctx = contextlib.ExitStack()
        ctx.enter_context(self.device)
        ctx.enter_context(_stream_for(stream, arrays))
        return ctx

    def download(self, dev) -> np.ndarray:
        return self.xp.asnumpy(dev)

    def compile_all(self) -> None:
        """Compile and load every kernel now (otherwise on first use)."""
        for name in KERNELS:
            self.function(name)


class _Arena:
    """Small host arrays packed into one buffer and uploaded with one copy."""

    def __init__(self) -> None:
        self._parts: list[tuple[int, np.ndarray]] = []
        self._size = 0
        self._views: list[Any] = []

    def add(self, a: np.ndarray) -> int:
        a = np.ascontiguousarray(a)
        off = (self._size + 15) // 16 * 16
        self._parts.append((off, a))
        self._size = off + a.nbytes
        return len(self._parts) - 1

    def upload(self, be) -> None:
        buf = np.zeros(max(self._size, 16), dtype=np.uint8)
        for off, a in self._parts:
            buf[off : off + a.nbytes] = a.reshape(-1).view(np.uint8)
        dev = be.upload(buf)
        self._views = [
            dev[off : off + a.nbytes].view(a.dtype).reshape(a.shape) for off, a in self._parts
        ]

    def __getitem__(self, ref: int):
        return self._views[ref]


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
    tumors: list[_Tumor] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.preset = self.plan.get_preset()
        tissue = self.preset.placement.tissue_hu or (-np.inf, np.inf)
        self.tissue = (np.float32(tissue[0]), np.float32(tissue[1]))


@dataclass
class _Tumor:
    i: int
    box: tuple[slice, slice, slice]
    pos: list[np.ndarray]
    refs: dict[str, int] = field(default_factory=dict)
    orig: Any = None
    organ: Any = None
    mask: Any = None
    bbox_row: int = -1
    tight: tuple[slice, slice, slice] | None = None
    sub: tuple[slice, slice, slice] | None = None
    recipe: TextureRecipe | None = None
    delta: Any = None
    out: Any = None
    stats_row: int = -1


def _binary_u8(xp, a):
    return xp.ascontiguousarray(a if a.dtype == xp.bool_ else a > 0.5, dtype=xp.uint8)


def _toeplitz_band(off: int, kern: np.ndarray, n_in: int, n_out: int):
    """Band form of ``out[o] = sum_t kern[t] in[o + off + t]`` with zero padding.

    Every row reads a window of ``min(len(kern), n_in)`` inputs that lies inside the array;
    taps outside it get weight 0, so the sum runs over the same inputs in the same order as
    the CPU's ``toeplitz_contract3``.
    """
    k = kern.size
    kk = min(k, n_in)
    c0 = np.arange(n_out, dtype=np.int64) + off
    s = np.clip(c0, 0, n_in - kk)
    tap = s[:, None] + np.arange(kk)[None, :] - c0[:, None]
    ok = (tap >= 0) & (tap < k)
    w = np.where(ok, kern[np.clip(tap, 0, k - 1)], 0.0).astype(np.float32)
    return s.astype(np.int64), np.ascontiguousarray(w)


def _band(be, arena: _Arena, x, axis: int, s_ref: int, w_ref: int, m: int):
    """One banded contraction pass of ``x`` along ``axis`` (a new array)."""
    xp = be.xp
    w = arena[w_ref]
    shp = list(x.shape)
    shp[axis] = m
    out = xp.empty(tuple(shp), dtype=xp.float32)
    be.launch(
        "sg_band_axis",
        out.size,
        x,
        out,
        np.int32(x.shape[0]),
        np.int32(x.shape[1]),
        np.int32(x.shape[2]),
        np.int32(axis),
        arena[s_ref],
        w,
        np.int32(m),
        np.int32(w.shape[1]),
    )
    return out


def _phase_a(be, jobs: Sequence[Job]) -> None:
    """Boxes, shape masks and their bounding boxes for every tumor; one upload, one copy back."""
    xp = be.xp
    arena = _Arena()
    rows: list[np.ndarray] = []
    for job in jobs:
        plan = job.plan
        sp = plan.spacing
        for i, t in enumerate(plan.tumors):
            # Device data: the shape kernel runs on the conservative box (cheap on a GPU) and
            # the host skips the coarse pass; host data: the coarse box, fewer bytes to move.
            box = tumor_box(t, sp, plan.shape, plan.organ_bbox, coarse=not job.target_on_device)
            if box is None:
                continue
            pos = [
                (np.arange(box[a].start, box[a].stop) - t.center_vox[a]) * sp[a] for a in range(3)
            ]
            ctrl, w, pos32, m = _shape_inputs(t, pos)
            tu = _Tumor(i=i, box=box, pos=pos)
            for name, arr in (
                ("ctrl", ctrl),
                ("w0", w[0]),
                ("w1", w[1]),
                ("w2", w[2]),
                ("p0", pos32[0]),
                ("p1", pos32[1]),
                ("p2", pos32[2]),
            ):
                tu.refs[name] = arena.add(np.asarray(arr, dtype=np.float32))
            tu.refs["m"] = arena.add(np.asarray(m, dtype=np.float64))
            if not job.target_on_device:
                tu.refs["orig"] = arena.add(np.asarray(job.target[box], dtype=np.float32))
            if not job.organ_on_device:
                org = np.asarray(job.organ[box])
                org = np.ascontiguousarray(org if org.dtype == bool else org > 0.5)
                tu.refs["organ"] = arena.add(org.view(np.uint8))
            n = [s.stop - s.start for s in box]
            tu.bbox_row = len(rows)
            rows.append(np.array([n[0], -1, n[1], -1, n[2], -1, 0], dtype=np.int32))
            job.tumors.append(tu)
    if not rows:
        return
    bb_ref = arena.add(np.stack(rows))
    arena.upload(be)
    bboxes = arena[bb_ref]
    for job in jobs:
        tlo, thi = job.tissue
        for tu in job.tumors:
            t = job.plan.tumors[tu.i]
            r = tu.refs
            if "orig" in r:
                tu.orig = arena[r["orig"]]
            else:
                tu.orig = xp.ascontiguousarray(job.target[tu.box], dtype=xp.float32)
            tu.organ = arena[r["organ"]] if "organ" in r else _binary_u8(xp, job.organ[tu.box])
            ctrl = arena[r["ctrl"]]
            shp = tu.orig.shape
            tu.mask = xp.empty(shp, dtype=xp.uint8)
            be.launch(
                "sg_shape_mask",
                tu.mask.size,
                ctrl,
                np.int32(ctrl.shape[1]),
                np.int32(ctrl.shape[2]),
                np.int32(ctrl.shape[3]),
                arena[r["w0"]],
                arena[r["w1"]],
                arena[r["w2"]],
                arena[r["p0"]],
                arena[r["p1"]],
                arena[r["p2"]],
                arena[r["m"]],
                tu.organ,
                tu.orig,
                tlo,
                thi,
                np.int32(bool(t.clip_to_organ)),
                np.int32(shp[0]),
                np.int32(shp[1]),
                np.int32(shp[2]),
                tu.mask,
            )
            be.launch(
                "sg_mask_bbox",
                tu.mask.size,
                tu.mask,
                np.int32(shp[0]),
                np.int32(shp[1]),
                np.int32(shp[2]),
                bboxes[tu.bbox_row],
            )
    host = be.download(bboxes)  # synchronisation 1 (all tumors of all jobs)
    for job in jobs:
        sp = job.plan.spacing
        keep = []
        for tu in job.tumors:
            lo0, hi0, lo1, hi1, lo2, hi2, count = (int(v) for v in host[tu.bbox_row])
            if count == 0:
                continue
            t = job.plan.tumors[tu.i]
            sub = []
            for a, (lo, hi) in enumerate(((lo0, hi0), (lo1, hi1), (lo2, hi2))):
                pad = math.ceil(BLUR_TRUNCATE * t.blur_sigma_mm / sp[a]) + 1
                sub.append(slice(max(0, lo - pad), min(tu.orig.shape[a], hi + pad + 1)))
            tu.sub = tuple(sub)  # type: ignore[assignment]
            tu.tight = tuple(
                slice(tu.box[a].start + sub[a].start, tu.box[a].start + sub[a].stop)
                for a in range(3)
            )  # type: ignore[assignment]
            tu.pos = [p[s] for p, s in zip(tu.pos, sub, strict=True)]
            keep.append(tu)
        job.tumors = keep


def _phase_b(be, jobs: Sequence[Job]):
    """Blur, texture, blend, merge and write-back for every tumor; returns the stats array."""
    from ._cpu_kernels import interp_coords_nb

    xp = be.xp
    arena = _Arena()
    n_stats = 0
    for job in jobs:
        sp = job.plan.spacing
        for tu in job.tumors:
            t = job.plan.tumors[tu.i]
            n = [s.stop - s.start for s in tu.tight]
            for a in range(3):
                kern = gaussian_kernel1d(t.blur_sigma_mm / sp[a], BLUR_TRUNCATE).astype(np.float32)
                r = (kern.size - 1) // 2
                s_, w_ = _toeplitz_band(-r, kern, n[a], n[a])
                tu.refs[f"bs{a}"], tu.refs[f"bw{a}"] = arena.add(s_), arena.add(w_)
            lo = tuple(float(p[0]) for p in tu.pos)
            hi = tuple(float(p[-1]) for p in tu.pos)
            rc = texture_recipe(t.seed, t.texture, lo, hi)  # type: ignore[arg-type]
            tu.recipe = rc
            for a in range(3):
                tu.refs[f"ls{a}"] = arena.add(rc.bands[a][0].astype(np.int64))
                tu.refs[f"lw{a}"] = arena.add(rc.bands[a][1].astype(np.float32))
                tu.refs[f"in{a}"] = arena.add(rc.inv_norm[a].astype(np.float64))
                s_, w_ = _toeplitz_band(rc.offs[a], rc.kern, rc.block_shape[a], rc.out_shape[a])
                tu.refs[f"gs{a}"], tu.refs[f"gw{a}"] = arena.add(s_), arena.add(w_)
                i0, f0 = interp_coords_nb(tu.pos[a], rc.origin[a], rc.step, rc.out_shape[a])
                tu.refs[f"ii{a}"], tu.refs[f"if{a}"] = arena.add(i0), arena.add(f0)
            tu.stats_row = n_stats
            n_stats += 1
    if n_stats == 0:
        return None
    arena.upload(be)
    stats = xp.zeros((n_stats, 2), dtype=xp.float64)
    for job in jobs:
        _render_job_b(be, arena, job, stats)
    return stats


def _render_job_b(be, arena: _Arena, job: Job, stats) -> None:
    xp = be.xp
    plan = job.plan
    preset = job.preset
    tlo, thi = job.tissue
    organ_hu = np.float32(plan.organ_hu if plan.organ_hu is not None else 0.0)
    for tu in job.tumors:
        t = plan.tumors[tu.i]
        r = tu.refs
        rc = tu.recipe
        assert rc is not None and tu.sub is not None
        tu.orig = xp.ascontiguousarray(tu.orig[tu.sub])
        tu.organ = xp.ascontiguousarray(tu.organ[tu.sub])
        tu.mask = xp.ascontiguousarray(tu.mask[tu.sub])
        n = tu.orig.shape
        # Edge blur B of the mask: axis 0, then 1, then 2 (the CPU's toeplitz order).
        b = tu.mask.astype(xp.float32)
        for a in range(3):
            b = _band(be, arena, b, a, r[f"bs{a}"], r[f"bw{a}"], n[a])
        # Texture: lattice noise -> Gaussian sums (axis 2, 1, 0) -> block fractions ->
        # block-to-grid smoothing (axis 0, 1, 2) -> the published rescale, mean on the device.
        (a0, m0), (a1, m1), (a2, m2) = rc.lattice
        noise = xp.empty((m0, m1, m2), dtype=xp.float32)
        be.launch(
            "sg_lattice_uniform",
            noise.size,
            noise,
            np.uint32(rc.noise_key[0]),
            np.uint32(rc.noise_key[1]),
            np.int32(a0),
            np.int32(m0),
            np.int32(a1),
            np.int32(m1),
            np.int32(a2),
            np.int32(m2),
            np.float32(0.5),
        )
        z = noise
        for a in (2, 1, 0):
            z = _band(be, arena, z, a, r[f"ls{a}"], r[f"lw{a}"], rc.block_shape[a])
        frac = xp.empty(rc.block_shape, dtype=xp.float32)
        be.launch(
            "sg_block_sums",
            frac.size,
            z,
            arena[r["in0"]],
            arena[r["in1"]],
            arena[r["in2"]],
            np.float64(rc.zscale),
            np.float64(rc.base),
            np.float64(rc.scale),
            np.uint32(rc.bern_key[0]),
            np.uint32(rc.bern_key[1]),
            np.int32(rc.blocks0[0]),
            np.int32(rc.blocks0[1]),
            np.int32(rc.blocks0[2]),
            np.float64(rc.n_cells),
            np.int32(rc.block_shape[0]),
            np.int32(rc.block_shape[1]),
            np.int32(rc.block_shape[2]),
            frac,
        )
        g = frac
        for a in range(3):
            g = _band(be, arena, g, a, r[f"gs{a}"], r[f"gw{a}"], rc.out_shape[a])
        g = _rescale(xp, g, rc)
        delta = xp.zeros(n, dtype=xp.float32)
        be.launch(
            "sg_blend_tumor",
            delta.size,
            tu.orig,
            tu.organ,
            tlo,
            thi,
            b,
            g,
            np.int32(g.shape[1]),
            np.int32(g.shape[2]),
            arena[r["ii0"]],
            arena[r["if0"]],
            arena[r["ii1"]],
            arena[r["if1"]],
            arena[r["ii2"]],
            arena[r["if2"]],
            np.float32(t.contrast_hu),
            organ_hu,
            np.int32(bool(t.clip_to_organ)),
            np.int32(n[0]),
            np.int32(n[1]),
            np.int32(n[2]),
            delta,
        )
        tu.delta = delta
    # Overlapping tumors: each box gets the strongest change among the tumors covering it,
    # merged from the unmerged deltas (order-independent), then written from its copy of
    # the original: overlapping boxes write identical values.
    boxes = [tu.tight for tu in job.tumors]
    merged = {k: tu.delta for k, tu in enumerate(job.tumors)}
    for grp in _clusters(boxes):  # type: ignore[arg-type]
        for i in grp:
            for j in grp:
                if i == j:
                    continue
                ov = _overlap(boxes[i], boxes[j])  # type: ignore[arg-type]
                if ov is None:
                    continue
                if merged[i] is job.tumors[i].delta:
                    merged[i] = job.tumors[i].delta.copy()
                dst = merged[i][_rel(ov, boxes[i])]  # type: ignore[arg-type]
                src = job.tumors[j].delta[_rel(ov, boxes[j])]  # type: ignore[arg-type]
                xp.copyto(dst, src, where=xp.abs(src) > xp.abs(dst))
    dtype = np.dtype(job.target.dtype)
    lo_out, hi_out = _output_range(dtype)
    cmin, cmax = preset.contrast.min_hu, preset.contrast.max_hu
    for k, tu in enumerate(job.tumors):
        out = tu.orig.copy()
        be.launch(
            "sg_apply_delta",
            out.size,
            out,
            tu.orig,
            merged[k],
            tu.mask,
            np.float32(cmin),
            np.float32(cmax),
            np.float32(lo_out),
            np.float32(hi_out),
            np.int32(dtype.kind in "iu"),
            np.int64(out.size),
            stats[tu.stats_row],
        )
        tu.delta = merged[k]
        tu.out = out
        if job.target_on_device:
            xp.copyto(job.target[tu.tight], out.astype(dtype), where=merged[k] != 0)


def _rescale(xp, g, rc: TextureRecipe):
    """``g *= u0 / mean(g[g > threshold])`` (mean of all if none), then clip to [0, 1]; the
    mean stays on the device (no synchronisation)."""
    above = g > np.float32(rc.threshold)
    cnt = above.sum()
    s_above = xp.where(above, g, np.float32(0)).sum(dtype=xp.float64)
    mean = xp.where(cnt > 0, s_above / xp.maximum(cnt, 1), g.mean(dtype=xp.float64))
    fac = xp.where(mean > 0, rc.u0 / xp.where(mean > 0, mean, 1.0), 1.0).astype(xp.float32)
    g = g * fac
    return xp.clip(g, np.float32(0.0), np.float32(1.0))


def render_jobs(be, jobs: Sequence[Job], wrap=None) -> list[RenderResult]:
    """Render every job with two synchronisations in all (see the module docstring)."""
    _phase_a(be, jobs)
    stats_dev = _phase_b(be, jobs)
    stats = be.download(stats_dev) if stats_dev is not None else None  # synchronisation 2
    results = []
    for job in jobs:
        st: dict[int, tuple[int, float]] = {}
        masks: dict[int, tuple[tuple[slice, slice, slice], Any]] = {}
        host_out = []
        for tu in job.tumors:
            assert stats is not None and tu.tight is not None
            n, acc = int(stats[tu.stats_row, 0]), float(stats[tu.stats_row, 1])
            st[tu.i] = (n, acc / n if n else 0.0)
            masks[tu.i] = (tu.tight, tu.mask)
            if not job.target_on_device:
                host_out.append(tu)
        if host_out:
            dtype = np.dtype(job.target.dtype)
            for tu in host_out:
                d = be.download(tu.delta)
                o = be.download(tu.out).astype(dtype)
                np.copyto(job.target[tu.tight], o, where=d != 0)
            masks = {i: (b, be.download(m).view(np.bool_)) for i, (b, m) in masks.items()}
        results.append(assemble(job.plan, job.target, job.organ, st, masks, job.affine, wrap))
    return results


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
        if isinstance(stream, (cupy.cuda.Stream, cupy.cuda.ExternalStream)):
            return stream
        ptr = getattr(stream, "cuda_stream", stream)
        return cupy.cuda.ExternalStream(int(ptr))
    for a in arrays:
        if array_kind(a) == "torch-cuda":
            import torch

            return cupy.cuda.ExternalStream(torch.cuda.current_stream(a.device).cuda_stream)
    return cupy.cuda.get_current_stream()


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
) -> list[RenderResult]:
    """Render plans on one GPU; see :func:`synthgen.render_batch` for the contract.

    Data already on the GPU (CuPy arrays, torch CUDA tensors through DLPack) is rendered in
    place (``out``) or into a device copy; NumPy data stays on the host and only the tumor
    boxes travel to the GPU and back.
    """
    from ._device import array_kind

    if be is None:
        be = backend(device_id)
    n = len(plans)
    outs = list(outs) if outs is not None else [None] * n
    affines = list(affines) if affines is not None else [None] * n
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
            jobs.append(
                Job(
                    plan=plans[i],
                    target=target,
                    organ=org,
                    target_on_device=be.on_device(target),
                    organ_on_device=be.on_device(org),
                    affine=affines[i],
                )
            )
        results = render_jobs(be, jobs)
    for i, res in enumerate(results):
        if torch_data[i]:
            res.image = outs[i] if outs[i] is not None else _to_torch(res.image)
            res.wrap = _to_torch
    return results


class DeviceView:
    """Host reads of a GPU array, region by region, for planning (which reads the organ's
    box, a strided sample and a few slices: never the whole scan)."""

    def __init__(self, a, be) -> None:
        self.a = _as_cupy(a)
        self._be = be
        self.shape = tuple(int(n) for n in self.a.shape)
        self.dtype = np.dtype(str(self.a.dtype))
        self.ndim = len(self.shape)

    def __getitem__(self, key) -> np.ndarray:
        return self._be.download(self.a[key])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self._be.download(self.a)
        return out if dtype is None else out.astype(dtype)


def host_views(be, image, organ_mask, organ_index=None):
    """``(image_view, mask_view, organ_index)`` for planning on GPU-resident data: the organ's
    bounding box and voxel count are reduced on the device (one small copy back)."""
    from .planning import OrganIndex

    img, org = DeviceView(image, be), DeviceView(organ_mask, be)
    if organ_index is None:
        xp = be.xp
        m = org.a if org.a.dtype == xp.bool_ else org.a > 0.5
        proj = [m.any(axis=(1, 2)), m.any(axis=(0, 2)), m.any(axis=(0, 1))]
        host = be.download(xp.concatenate([*(p.astype(xp.int64) for p in proj),
                                           m.sum(dtype=xp.int64).reshape(1)]))  # fmt: skip
        count = int(host[-1])
        if count == 0:
            raise ValueError("organ mask is empty (no voxel > 0.5): nothing to implant a tumor in")
        bbox, start = [], 0
        for n in org.shape:
            hit = np.flatnonzero(host[start : start + n])
            bbox.append(slice(int(hit[0]), int(hit[-1]) + 1))
            start += n
        organ_index = OrganIndex(bbox=tuple(bbox), count=count, shape=org.shape)  # type: ignore[arg-type]
    return img, org, organ_index
