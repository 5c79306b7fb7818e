"""The GPU render of a batch as segments: a fixed number of launches, whatever the tumor count.

Every tumor of every plan of a batch is a *segment*. The host describes all segments in one
int64 table (sizes, indices, device addresses), one float32 and one float64 table
(``kernels/segmented.cuh`` names their columns), packs them with every small per-tumor array
into one buffer, uploads it with one copy and launches each step of the render once for the
whole batch (``kernels/segmented.cu``): 4 launches in phase A (the B-spline weight rows of
the boxes, the shape test's B-spline sum per box row, gather + the per-voxel shape test, box
reduction), then one copy back of all boxes, then 11 launches in phase B: the steps that do
not depend on each other run side by side, each block one step of one row (tight-box gather,
lattice noise and the blend's texture coordinates in one launch; three mask-blur passes,
each beside one of the texture's three band sums; the write-back, beside the label write
where label maps on the device take the tumor label, merging overlapping tumors' changes
as it reads them), then Bernoulli blocks, three grid passes (the last measuring the
rescale's statistics too), the rescale of the grid in place and the fused blend, one
launch each: 15 launches a call instead of the 21 (22) of one launch per step. The
statistics come back in one copy: when
first read where the images, masks and label maps all stay on the device, at once
otherwise.
Each launch runs a flat grid over a schedule (:func:`synthgen._seg_tables.schedules_nb`,
packed with the tables): every row gets the blocks its own elements need, so small tumors
beside a large one cost no idle blocks. Kernel arguments are device addresses (``_Pack.arg``),
not device array views.

The host's work per batch is vectorised over the tumors: compiled (numba) calls over all
tumors for the conservative boxes, the blur kernels, the texture's per-axis tables, the
stream keys and the merge partners, and each phase's whole segment table is filled by one
call (:mod:`synthgen._seg_tables`). Host work the device would wait on is kept short: what
phase B needs of the plan and does not depend on the boxes (texture parameters, keys and
smoothing kernels, contrasts, blur kernels, appearance parameters) is made after phase A's
launches, while the device runs them, and the results are assembled after phase B's.
What stays per tumor in Python is reading the plan's fields, a few cached kernel lookups,
the appearance parameters and the result records. The kernels compute what is exact
arithmetic on a few numbers: each voxel's position and its trilinear coordinates on the
texture grid (from the centre, the spacing and the grid's origin and step), the B-spline
weight rows of the boxes (from the positions, the control extent and the g x g prefilter:
``sg_seg_weights``, the CPU's float64 operations in its order), and the bands of the mask
blur and of the texture's block-to-grid smoothing (from the float32 kernel, its offset and
the sizes: ``sg_seg_conv``). Tables whose values come from ``exp`` or from a matrix
inverse on the CPU path are made on the host, so that both backends read the very same
numbers (each made by the function the CPU path uses): the B-spline prefilter, the blur and
smoothing kernels, the texture's lattice bands and norms. ``benchmarks/bench_gpu_host.py``
measures what this preparation costs, ``benchmarks/ab_host.py`` how much of it the device
waits on.
"""

from __future__ import annotations

import functools
import math
import re
import threading
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np

from ._appearance import appearance_on, blend_params
from ._cpu_kernels import (
    blur_kernels_nb,
    conservative_boxes_nb,
    texture_axes_nb,
    texture_consts_nb,
)
from ._geometry import prefilter
from ._hash import stream_keys
from ._hollow import render_wall, wall_box
from ._pool import map_threads
from ._seg_tables import (
    _CHAINS_B_IDX,
    _SCHED_B_COLS,
    BASES,
    CHAINS_B,
    F32,
    SCHED_B,
    chain_schedules_nb,
    layout_nb,
    phase_a_nb,
    phase_a_sizes_nb,
    phase_b_boxes_nb,
    phase_b_nb,
    phase_b_sizes_nb,
    schedules_nb,
)
from ._texture import (
    STREAM_BERNOULLI,
    STREAM_NOISE,
    _axis_recipe,
    _smoothing_kernel,
    texture_params,
)
from .rendering import (
    BLUR_TRUNCATE,
    RenderResult,
    _output_range,
    assemble,
    fill_records,
    fill_stats,
    tumor_arrays,
    tumor_box,
)

__all__ = ["POISON", "render_segments"]

#: Fill scratch buffers with NaN / 255 instead of leaving them uninitialised (tests).
POISON = False
#: Launch every row with the blocks of the launch's largest row, as the 2-D grid before the
#: flat schedules did (benchmarks: ``gpu_check`` times both on a GPU).
GRID2D = False
#: Elements per block of the schedules: the backend's ``block_rule`` times this (benchmarks:
#: ``gpu_check`` tries 1 to 8 on a GPU: fewer, longer blocks spread each block's start, its
#: schedule search and row reads, over more elements, at the cost of fewer blocks).
BLOCK_SCALE = 1
#: Hold each launch to the backend's ``most_blocks`` blocks (``CupyBackend``: 32 per SM):
#: past it, blocks walk proportionally more elements (``schedules_nb``'s ``most``;
#: benchmarks: ``gpu_check`` times the render and the fused kernels with and without it).
LIMIT_BLOCKS = True
#: Run phase B's independent steps side by side, one launch per group of them
#: (``_seg_tables.CHAINS_B``), and the rescale's statistics in the texture grid's last
#: smoothing pass: 15 launches a call instead of 21 (22 with label maps) of one launch per
#: step (benchmarks: ``gpu_check`` times both; tests compare them).
FUSE_STEPS = True
#: Keep the last batch's phase-B launch arguments in :data:`LAST` (benchmarks re-launch the
#: fused kernels on them to measure their bandwidth).
KEEP_LAST = False
LAST: dict[str, Any] = {}


def kept_render(render, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``render(*args, **kwargs)`` with ``KEEP_LAST`` on, and what it kept: ``LAST``'s
    entries (its buffers alive in the dict returned), ``LAST`` then cleared and
    ``KEEP_LAST`` off."""
    global KEEP_LAST
    KEEP_LAST = True
    try:
        render(*args, **kwargs)
        return dict(LAST)
    finally:
        KEEP_LAST = False
        LAST.clear()


def moved_bytes(be, last: dict[str, Any]) -> tuple[int, int]:
    """The bytes the fused blend and the write-back of a render kept in ``last`` (``LAST``
    after a render with ``KEEP_LAST``; its buffers still hold the render's values) read and
    write, element by element as the kernels take them (counted on the device):

    * blend: every voxel of a tight box reads its blur and original value; one the blend's
      test keeps (``b > 0`` and the value in the tissue window; a NaN passes, as in the
      kernel) reads its organ byte and, with appearance modes, its q2 unless the organ byte
      stops a clipped tumor; every voxel's change is written (0 where there is none); the
      texture grid counts once (its gathers mostly hit the cache). The per-row parameters
      and sg_seg_interp's tables (per index of a box's last axis, per (i, j)) are not
      counted.
    * write-back: every voxel reads its original value, change and mask byte, and where a
      merge partner's box holds it that partner's change; a merged change that is not 0
      writes the image (its dtype's size); a row whose merged change the host reads writes
      it (4 bytes a voxel). The partners' table rows are not counted.

    A figure per voxel of the boxes overstates what moves: most of a box is out of the
    tumor's reach. Renders of ellipsoid tumors only (host rows are kept elsewhere)."""
    if last["n"] != last["ne"]:
        raise ValueError("moved_bytes counts renders of ellipsoid tumors only")
    C = _columns()
    T, u8 = last["T"], last["u8"]
    xp = be.xp
    size = {code: np.dtype(dt).itemsize for dt, code in _CODES.items()}

    def count(a) -> int:
        return int(xp.count_nonzero(a))

    blend = apply = 0
    for q in range(last["ne"]):
        n = math.prod(int(x) for x in T[q, C.TN0 : C.TN0 + 3])
        kept, changed, overlaps = row_paths(last, q)
        grid = math.prod(int(x) for x in T[q, C.G_0 : C.G_0 + 3])
        blend += 12 * n + count(kept) + 4 * grid
        if T[q, C.TQ2]:  # appearance modes: q2 where the organ byte does not stop it
            q2 = kept & (u8.at(T[q, C.TORGAN], n) != 0) if T[q, C.CLIP] else kept
            blend += 4 * count(q2)
        reads = sum(math.prod(x.stop - x.start for x in in_q) for in_q in overlaps)
        apply += 9 * n + 4 * reads + size[int(T[q, C.DST_CODE])] * count(changed)
        apply += 4 * n if T[q, C.MERGED] else 0
    return blend, apply


def row_paths(last: dict[str, Any], q: int) -> tuple[Any, Any, list[tuple[slice, ...]]]:
    """Which voxels of row ``q``'s tight box take the fused kernels' paths, in a render kept
    in ``LAST`` (its buffers still hold the render's values): ``kept`` (flat), those the
    blend's test keeps (``b > 0`` and the value in the tissue window; a NaN passes, as in the
    kernel); ``changed`` (the box's shape), those whose merged change is not 0 (the strongest
    of the row's and its overlapping merge partners' changes: the write-back's test before
    it clips and stores); ``overlaps``, per overlapping partner the overlap as slices of this
    box (where the write-back reads that partner's change)."""
    C = _columns()
    T, TF, f32 = last["T"], last["TF"], last["f32"]

    def box(r: int):  # (tight box origin, shape)
        return [int(x) for x in T[r, C.TO0 : C.TO0 + 3]], [int(x) for x in T[r, C.TN0 : C.TN0 + 3]]

    def delta(r: int):
        _, shp = box(r)
        return f32.at(T[r, C.DELTA], math.prod(shp)).reshape(shp)

    (to_q, tn_q) = box(q)
    n = math.prod(tn_q)
    b, o = f32.at(T[q, C.BLUR], n), f32.at(T[q, C.TORIG], n)
    kept = ~((b <= 0) | (o < TF[q, C.F_TLO]) | (o > TF[q, C.F_THI]))
    # the write-back's merge: its merged change (the strongest) is not 0 where the row's or
    # an overlapping partner's change is not 0
    changed, overlaps = delta(q) != 0, []
    for p in last["partners"][q]:
        to_p, tn_p = box(p)
        lo = [max(to_q[a], to_p[a]) for a in range(3)]
        hi = [min(to_q[a] + tn_q[a], to_p[a] + tn_p[a]) for a in range(3)]
        if any(h <= lo_ for lo_, h in zip(lo, hi, strict=True)):
            continue
        in_q = tuple(slice(lo[a] - to_q[a], hi[a] - to_q[a]) for a in range(3))
        in_p = tuple(slice(lo[a] - to_p[a], hi[a] - to_p[a]) for a in range(3))
        changed[in_q] |= delta(p)[in_p] != 0
        overlaps.append(in_q)
    return kept, changed, overlaps


@functools.cache
def _pass_args() -> tuple[tuple, tuple]:
    """The column arguments (int32 scalars, as the kernels take them) of phase B's separable
    passes, the same for every call (made once): per axis ``a``, the mask blur's pass
    (``sg_seg_conv``: axes 0, 1, 2 of the tight box) and beside it the texture's band
    contraction (``sg_seg_band``: axes 2, 1, 0 of the lattice); and per axis, the texture
    grid's smoothing pass (its output buffer's name and its ``sg_seg_conv`` arguments)."""
    C, i32 = _columns(), np.int32
    blur = []
    for a, (src, dst), (b, b_src, b_dims, b_dst) in zip(
        range(3),
        ((C.TMASK, C.BX0), (C.BX0, C.BX1), (C.BX1, C.BLUR)),
        ((2, C.NOISE, C.LN0, C.ZA), (1, C.ZA, C.ZD1, C.ZB), (0, C.ZB, C.ZD2, C.Z0)),
        strict=True,
    ):
        conv = (i32(a), i32(src), i32(C.TN0), i32(C.BKERN0 + a), i32(C.BKLEN0 + a),
                i32(C.BOFF0 + a), i32(C.TN0 + a), i32(dst))  # fmt: skip
        band = (i32(b), i32(b_src), i32(b_dims), i32(C.LS0 + b), i32(C.LW0 + b), i32(C.B0 + b),
                i32(C.LK0 + b), i32(b_dst))  # fmt: skip
        blur.append((conv, band))
    grid = []
    for a, src, dims, dst, buf in ((0, C.FRAC, C.B0, C.GA, "ga"), (1, C.GA, C.GD1, C.GB, "gb"),
                                   (2, C.GB, C.GD2, C.GRID, "grid")):  # fmt: skip
        grid.append((buf, (i32(a), i32(src), i32(dims), i32(C.GKERN0 + a), i32(C.GKLEN0 + a),
                           i32(C.GOFF0 + a), i32(C.G_0 + a), i32(dst))))  # fmt: skip
    return tuple(blur), tuple(grid)


@functools.cache
def _columns() -> SimpleNamespace:
    """The SG_* column numbers of ``kernels/segmented.cuh`` (``C.N0`` for ``SG_N0``) and the
    numbers ``kernels/shape.cuh`` defines (``C.G_MAX``)."""
    from ._cuda import kernel_dir
    from ._seg_tables import check

    text = "".join((kernel_dir() / f).read_text() for f in ("segmented.cuh", "shape.cuh"))
    C = SimpleNamespace(
        **{m[0][3:]: int(m[1]) for m in re.findall(r"#define (SG_\w+) (\d+)", text)}
    )
    check(C)
    return C


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
    code = _CODES.get(dtype) if isinstance(dtype, np.dtype) else None
    if code is not None:
        return code
    for spec in (dtype, str(dtype)):  # (a dtype, a scalar type, or a name: torch's too)
        try:
            return _CODES[np.dtype(spec)]
        except (KeyError, TypeError):
            pass
    raise ValueError(f"the GPU backend does not handle dtype {dtype}")


@functools.lru_cache(maxsize=64)
def _dtype_facts(dtype: np.dtype) -> tuple[int, int, float, float]:
    """(dtype code, rounds to integers, output range lo, hi) of an image dtype."""
    return dtype_code(dtype), int(dtype.kind in "iu"), *_output_range(dtype)


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

    def set(self, ref: int, a: np.ndarray) -> None:
        """Replace part ``ref`` by ``a`` of the same size (tables filled after :meth:`alloc`)."""
        off, old = self.parts[ref]
        a = np.ascontiguousarray(a, dtype=old.dtype)
        if a.nbytes != old.nbytes:
            raise ValueError("a packed part cannot change size")
        self.parts[ref] = (off, a.reshape(old.shape))

    def alloc(self, be, arenas: Sequence[_Arena] = ()) -> None:
        """One device allocation for the pack and the ``arenas`` placed after it."""
        self.span = max(self.size, 16)  # (the bytes the upload writes)
        self.dev, self.base = _allocate(be, self.span, arenas)

    def addr(self, ref: int) -> int:
        return self.base + self.parts[ref][0]

    def addrs(self) -> np.ndarray:
        """Device addresses of every part (after :meth:`alloc`)."""
        return self.base + np.array([off for off, _ in self.parts], dtype=np.int64)

    def download(self, be, ref: int) -> np.ndarray:
        """Part ``ref`` copied back to the host (its bytes: one device slice; typed there)."""
        return self.fetcher(be, ref)()

    def fetcher(self, be, ref: int):
        """A function making :meth:`download` of part ``ref`` later, which holds the pack's
        device buffer only (not the pack and its host tables; a view of the part would hold
        the same allocation), and makes the part's device view when called (none for
        statistics never read)."""
        off, a = self.parts[ref]
        dev, end, dtype, shape = self.dev, off + a.nbytes, a.dtype, a.shape
        return lambda: be.download(dev[off:end]).view(dtype).reshape(shape)

    def arg(self, be, ref: int, row: int = 0):
        """Part ``ref`` (from its ``row``-th row on) as a kernel argument: its device address
        (no device array view built)."""
        off, a = self.parts[ref]
        return be.pointer(self.base + off + row * (a.strides[0] if a.ndim else 0), a.dtype)

    def upload(self, be) -> None:
        chunks, at = [], 0
        for off, a in self.parts:
            if off > at:
                chunks.append(bytes(off - at))
            chunks.append(a.tobytes())
            at = off + a.nbytes
        chunks.append(bytes(self.span - at))
        # a bytearray: a writable host buffer (CuPy copies from it before set() returns)
        dev = self.dev if self.dev.size == self.span else self.dev[: self.span]
        be.copy_in(dev, np.frombuffer(bytearray().join(chunks), dtype=np.uint8))


def _texture_consts(P, keys) -> SimpleNamespace:
    """What the texture recipes (:func:`synthgen._texture.texture_recipe`) of tumors with
    parameters ``P`` (:func:`synthgen._texture.texture_params`) and stream keys ``keys``
    (``(n, 4)``: noise, Bernoulli) take from their parameters alone, not from their boxes
    (made while the device runs phase A): the block sizes ``h_b`` ``(n,)``, the recipe's
    ``scalars`` ``(n, 6)`` (:func:`synthgen._texture.texture_consts`), the keys
    ``noise_key``, ``bern_key`` ``(n, 2)``, and the smoothing kernels (block sums -> grid)
    packed, each distinct (block size, sigma_b) once, cached: ``kern``, ``koff``, ``klen``.
    :meth:`take` selects rows."""
    h_b, scalars = texture_consts_nb(P)  # (texture_consts' compiled call, called directly)
    kern, koff, klen = _packed(list(zip(h_b.tolist(), P[:, 1].tolist(), strict=True)),
                               lambda key: _smoothing_kernel(*key))  # fmt: skip
    c = np.ascontiguousarray
    return _Rows(h_b=h_b, scalars=scalars, noise_key=c(keys[:, 0:2]), bern_key=c(keys[:, 2:4]),
                 koff=koff, klen=klen, kern=kern)  # fmt: skip


class _Rows(SimpleNamespace):
    """Per-row arrays (all but ``kern``, which rows address by offset), C-contiguous."""

    def take(self, rows) -> _Rows:
        """The rows ``rows`` (ascending, without repeats)."""
        n = len(self.h_b)
        if len(rows) == n and (n == 0 or (rows[0] == 0 and rows[-1] == n - 1)):
            return self  # every row, in order (rows ascend without repeats): as they are
        return _Rows(**{k: v if k == "kern" else np.ascontiguousarray(v[rows])
                        for k, v in vars(self).items()})  # fmt: skip


def _texture_tables(P, tc, lo_mm, hi_mm) -> SimpleNamespace:
    """The texture recipes of tumors with parameters ``P`` and :func:`_texture_consts`
    ``tc`` (of these rows) over their tight boxes (``lo_mm``/``hi_mm``: ``(n, 3)`` mm from the
    centre), vectorised: the per-axis tables of all axes from one numba call (the function
    the CPU path's recipe uses).

    Fields, ``(n, 3)`` per axis unless noted: ``lat0``, ``n_lat`` (noise lattice), ``block0``,
    ``blocks`` (Bernoulli blocks), ``goff``, ``grid`` (grid offset and size), ``kk`` (band
    width), ``row``/``woff`` (offsets into the packed ``starts``, ``inv`` and ``weights``),
    ``origin`` (mm); ``step`` ``(n,)``; and those of ``tc``.
    """
    ne = len(P)
    # block sizes, grid ranges and the per-axis tables of all axes in one call; the nine
    # per-axis fields each a contiguous (n, 3) array
    fields, origin, h_b, starts, weights, inv, ok = texture_axes_nb(
        np.ascontiguousarray(np.reshape(lo_mm, (ne, 3)), dtype=np.float64),
        np.ascontiguousarray(np.reshape(hi_mm, (ne, 3)), dtype=np.float64),
        np.ascontiguousarray(P[:, 0]), np.ascontiguousarray(P[:, 1]))  # fmt: skip
    if not ok.all():
        raise ValueError("texture lattice exceeds +-512 cells; tumor box too large")
    lat0, n_lat, block0, blocks, goff, grid, kk, row, woff = fields
    return SimpleNamespace(
        lat0=lat0, n_lat=n_lat, block0=block0, blocks=blocks, goff=goff, grid=grid, kk=kk,
        row=row, woff=woff, origin=origin, step=h_b.astype(np.float64), starts=starts,
        weights=weights, inv=inv, **vars(tc),
    )  # fmt: skip


def _packed(keys, make) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The float32 kernels ``make(key)`` of many keys packed into one array (each distinct
    key once): ``(packed, offset per key, length per key)``."""
    at: dict[Any, tuple[int, int]] = {}
    parts: list[np.ndarray] = []
    offs = np.empty(len(keys), dtype=np.int64)
    lens = np.empty(len(keys), dtype=np.int64)
    n = 0
    for q, key in enumerate(keys):
        hit = at.get(key)
        if hit is None:
            k = make(key)
            hit = at[key] = (n, k.size)
            parts.append(k)
            n += k.size
        offs[q], lens[q] = hit
    packed = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    return packed.astype(np.float32, copy=False), offs, lens


def clear_caches() -> None:
    """Empty the host-side caches of kernels and band tables (benchmarks time the cold case)."""
    for f in (_axis_recipe, _smoothing_kernel):
        f.cache_clear()


def _address(be, a, job: int, what: str, code: int | None = None) -> tuple[int, ...]:
    """``(address, dtype code, three strides in elements)`` of ``a``, a device array of job
    ``job`` (``code``: its dtype code when known, else derived); ValueError where address or
    strides are not multiples of its element size (a kernel's typed load there would fault
    on a GPU, and strides in elements would round)."""
    item = a.itemsize
    ptr = int(be.ptr(a))
    s0, s1, s2 = (int(s) for s in a.strides)
    if ptr % item or s0 % item or s1 % item or s2 % item:
        raise ValueError(
            f"plan {job}: the {what} on the device ({a.dtype}, address {ptr:#x}, strides "
            f"{tuple(a.strides)} bytes) is not aligned to its {item}-byte elements; pass an "
            "aligned array (e.g. a contiguous copy)"
        )
    cd = dtype_code(a.dtype) if code is None else code
    return ptr, cd, s0 // item, s1 // item, s2 // item


class _Jobs:
    """What every row of a job shares, as arrays over the jobs (a row reads its job's): the
    spacing and shape, the organ's box (``ob``, where ``ob_on``), where phase A reads the
    image and the organ (device address, dtype code, strides: ``img``/``org``, ``(n, 5)``,
    where ``img_on``/``org_on``), the write-back's range and rounding, and the label map
    written on the device (``lab`` as ``img``, where ``lab_on``; value ``lab_val``)."""

    def __init__(self, be, jobs) -> None:
        nj = len(jobs)
        # per job, its integers and its floats one after another (two conversions to arrays
        # in all, instead of one per field: each was several us of host time per call)
        ints: list = []
        flts: list = []
        none5 = (0, 0, 0, 0, 0)
        for q, job in enumerate(jobs):
            plan = job.plan
            dt = job.target.dtype
            code, rnd, out_lo, out_hi = _dtype_facts(
                dt if isinstance(dt, np.dtype) else np.dtype(str(dt))
            )
            ob = plan.organ_bbox
            org = job.organ
            c = job.preset.contrast
            ints.extend(plan.shape)  # 0:3
            if ob is None:  # 3:9 (the organ's box: starts, then stops)
                ints.extend((0, 0, 0, 0, 0, 0))
            else:
                ints.extend((ob[0][0], ob[1][0], ob[2][0], ob[0][1], ob[1][1], ob[2][1]))
            for on, a, what, cd in (
                (job.target_on_device, job.target, "image (out)", code),  # 9:14
                (job.organ_on_device, org, "organ mask", None),  # 14:19
                (job.label_on_device, job.label, "label map", None),  # 19:24
            ):
                ints.extend(_address(be, a, q, what, cd) if on else none5)
            ints.extend((rnd, job.tumor_label, ob is not None, job.target_on_device,
                         job.organ_on_device, job.label_on_device))  # 24:30  # fmt: skip
            flts.extend(plan.spacing)  # 0:3
            flts.extend((float(c.min_hu), float(c.max_hu), out_lo, out_hi))  # 3:7
            flts.extend(job.tissue)  # 7:9
            flts.append(float(plan.organ_hu) if plan.organ_hu is not None else 0.0)  # 9
        i_ = np.array(ints, dtype=np.int64).reshape(nj, 30)
        f_ = np.array(flts, dtype=np.float64).reshape(nj, 10)
        c_ = np.ascontiguousarray
        self.shape = c_(i_[:, 0:3])
        self.ob = c_(i_[:, 3:9]).reshape(nj, 2, 3)
        self.img, self.org, self.lab = c_(i_[:, 9:14]), c_(i_[:, 14:19]), c_(i_[:, 19:24])
        self.round, self.lab_val = i_[:, 24].copy(), i_[:, 25].copy()
        flags = i_[:, 26:30] != 0
        self.ob_on, self.img_on = c_(flags[:, 0]), c_(flags[:, 1])
        self.org_on, self.lab_on = c_(flags[:, 2]), c_(flags[:, 3])
        self.sp = c_(f_[:, 0:3])
        f32 = f_[:, 3:10].astype(np.float32)  # (float32, rounded from float64 as before)
        self.ranges = c_(f32[:, 0:4])  # cmin, cmax, lo, hi
        self.tissue, self.organ_hu = c_(f32[:, 4:6]), c_(f32[:, 6])


def _allocate(be, head: int, arenas: Sequence[_Arena]) -> tuple[Any, int]:
    """One device allocation (uint8) of ``head`` bytes and the ``arenas`` placed after them
    (16-byte aligned starts): one CuPy allocation instead of one each. Poisoned when
    :data:`POISON` is set (every byte 255: NaN in a float32 buffer, 255 in a uint8 one), so
    that a kernel that leaves an element unwritten shows in the result. ``(buffer, its
    device address)``."""
    at, starts = head, []
    for a in arenas:
        at = (at + 15) // 16 * 16
        starts.append(at)
        at += a.nbytes
    dev = be.alloc(at)
    if POISON:
        be.fill(dev, 255)
    base = be.ptr(dev)
    for a, start in zip(arenas, starts, strict=True):
        a.place(dev, start, base + start)
    return dev, base


class _Arena:
    """Device buffers of one dtype laid out from a (segments x buffers) size matrix (16-byte
    aligned starts), placed in a device allocation by :func:`_allocate`."""

    def __init__(self, dtype, sizes: np.ndarray) -> None:
        self.dtype = np.dtype(dtype)
        self.offs, self.total = layout_nb(np.asarray(sizes, dtype=np.int64), self.dtype.itemsize)
        self.nbytes = int(self.total) * self.dtype.itemsize
        self._dev = None

    def place(self, buf, start: int, base: int) -> None:
        """At byte ``start`` of the uint8 device buffer ``buf`` (device address ``base``)."""
        self._buf, self._start, self.base = buf, start, base

    @property
    def dev(self):
        """The arena as a device array of its dtype (a view, made when first needed: kernels
        get addresses)."""
        if self._dev is None:
            self._dev = self._buf[self._start : self._start + self.nbytes].view(self.dtype)
        return self._dev

    def view(self, row: int, col: int, shape):
        o = int(self.offs[row, col])
        return self.dev[o : o + math.prod(shape)].reshape(shape)

    def at(self, address: int, n: int):
        """The ``n`` elements of the arena from device address ``address`` (a table column's)."""
        o = (int(address) - self.base) // self.dtype.itemsize
        return self.dev[o : o + n]

    def arg(self, be, row: int, col: int):
        """Buffer ``(row, col)`` as a kernel argument: its device address."""
        return be.pointer(self.base + self.dtype.itemsize * int(self.offs[row, col]), self.dtype)


def render_segments(be, jobs: Sequence[Any]) -> list[RenderResult]:
    """Render ``jobs`` (``synthgen._cuda.Job``) on backend ``be``: see the module docstring."""
    C = _columns()
    J = _Jobs(be, jobs)
    ts, jidx, iidx, walls = [], [], [], []
    for j, job in enumerate(jobs):
        for i, t in enumerate(job.plan.tumors):
            if getattr(t, "kind", "ellipsoid") != "ellipsoid":
                walls.append((j, i))  # rendered on the host in phase B
            else:
                ts.append(t)
                jidx.append(j)
                iidx.append(i)
    # per plan: tumor index -> (voxels, mean change) and -> (tight box, mask on it)
    results_stats: list[dict[int, tuple[int, float]]] = [{} for _ in jobs]
    masks: list[dict[int, tuple[tuple[slice, slice, slice], Any]]] = [{} for _ in jobs]
    out: list[RenderResult | None] = [None] * len(jobs)
    deferred = [_masks_deferred(job) for job in jobs]

    def before_wait(mask_of, stats_later: bool) -> None:
        """The results of the jobs whose masks stay on the device, statistics aside: host
        work done while the device runs phase B instead of after its last wait (``_render``
        says whether it returns before the statistics are back)."""
        for j, job in enumerate(jobs):
            if deferred[j]:
                # (with the statistics later, the records made when first read: a caller that
                # reads only the image and the label map never pays for them)
                out[j] = assemble(job.plan, job.target, job.organ, {}, masks[j], job.affine,
                                  make_mask=mask_of, records_later=stats_later)  # fmt: skip

    later = None
    if ts or walls:
        later = _render(be, jobs, J, ts, jidx, iidx, walls, results_stats, masks, C, deferred,
                        before_wait)  # fmt: skip
    for j, job in enumerate(jobs):
        res = out[j]
        if res is None:
            out[j] = assemble(job.plan, job.target, job.organ, results_stats[j], masks[j],
                              job.affine)  # fmt: skip
        elif later is not None:  # the statistics when the records are first read
            res.tumors.then_fill(functools.partial(later.fill, j, job.plan.spacing))
        else:
            fill_stats(res, results_stats[j])
    return out  # type: ignore[return-value]


class _Fence:
    """The end of a render that returned while the device works: ``wait()`` blocks the host
    until the device has done it (once; an event recorded on the render's stream, None on
    the host stand-in, whose launches finish before they return)."""

    def __init__(self, event) -> None:
        self._event = event

    def wait(self) -> None:
        ev = self._event
        if ev is not None:
            ev.synchronize()
            self._event = None


class _StatsLater:
    """The statistics of a render that returned before the device finished them (every job's
    image and masks on the device, so nothing else needed the device's results): fetched for
    all jobs at once when the first of their results' records is read
    (:class:`synthgen.rendering.LazyRecords`), once the render's :class:`_Fence` is passed
    (the stream current then may be another). Safe to read from several threads."""

    def __init__(self, fetch, fence: _Fence, keys, stats) -> None:
        self._fetch, self._fence, self._keys, self._stats = fetch, fence, keys, stats
        self._lock = threading.Lock()

    def fill(self, j: int, spacing, records) -> None:
        with self._lock:
            if self._fetch is not None:
                self._fence.wait()
                _put_stats(self._fetch().tolist(), self._keys, self._stats)
                self._fetch = None
        fill_records(records, spacing, self._stats[j])


def _put_stats(host_stats, keys, results_stats) -> None:
    """Row ``q``'s (voxels, summed change) as its plan's tumor's (voxels, mean change)."""
    for (j, i), (cnt, acc) in zip(keys, host_stats, strict=True):
        cnt = int(cnt)
        results_stats[j][i] = (cnt, acc / cnt if cnt else 0.0)


def _masks_deferred(job) -> bool:
    """Whether a job's tumor masks stay on the device, made into views only when its result's
    ``boxes`` are first read (two CuPy operations a tumor, which a caller reading only the
    image, or labelling through ``label_outs``, never needs): its image is on the device and
    no label map on the host needs them now."""
    return job.target_on_device and (job.label is None or job.label_on_device)


def _stack_by_grid(disp) -> tuple[dict[tuple[int, ...], list[int]], list[np.ndarray]]:
    """The control displacement arrays ``disp`` (one per tumor, ``TumorPlan.displacement``:
    made when the plan was) grouped by shape: ``{shape: tumor indices}`` and each group's
    arrays stacked, in the same order. One group as a rule (one preset). (Stacked by
    concatenation: np.stack took four times as long for a mix sample's small arrays.)"""
    shapes = [d.shape for d in disp]
    if shapes and shapes.count(shapes[0]) == len(shapes):
        return {shapes[0]: list(range(len(disp)))}, [_stack(disp, shapes[0])]
    by_g: dict[tuple[int, ...], list[int]] = {}
    for q, shp in enumerate(shapes):
        by_g.setdefault(shp, []).append(q)
    return by_g, [_stack([disp[q] for q in qs], shp) for shp, qs in by_g.items()]


def _stack(arrays, shape) -> np.ndarray:
    return np.concatenate(arrays).reshape(len(arrays), *shape)


#: Phase A's schedules: the columns of phase_a_sizes_nb's elements per row (rows, voxels,
#: weight rows).
_A_COLS = np.arange(3, dtype=np.int64)


def _render(
    be, jobs, J, ts, jidx, iidx, walls, results_stats, masks, C, deferred, before_wait
) -> _StatsLater | None:
    """Phase A, the wait for the boxes, phase B and the wait for the statistics of all
    ellipsoid tumors ``ts`` (plan ``jidx[q]``, tumor ``iidx[q]``) and wall tumors ``walls``.
    The rows of jobs whose masks are ``deferred`` (:func:`_masks_deferred`, per job) are given
    as ``masks[j][i] = (tight box, q)``; ``before_wait`` is called, once phase B is launched
    and before the wait for its statistics, with the function making row ``q``'s device
    mask and whether the statistics come later. When every job's masks are deferred there
    is no such wait: the statistics come later, from the :class:`_StatsLater` returned (None
    otherwise)."""

    W, FW, DW = C.T_WIDTH, C.F_WIDTH, C.D_WIDTH
    i32 = np.int32
    # ---------------------------------------------------------------- phase A (host)
    pack = _Pack()
    n_all = len(ts)
    # control displacements: one array per grid size g (one per preset, as a rule)
    by_g, stacked = _stack_by_grid([t.displacement for t in ts])
    disp_max = np.zeros(n_all)
    ctrl_ref = np.zeros(n_all, dtype=np.int64)  # (pack part, element offset) per tumor
    ctrl_off = np.zeros(n_all, dtype=np.int64)
    pre_ref = np.zeros(n_all, dtype=np.int64)  # pack part of the grid's prefilter
    g_of = np.zeros(n_all, dtype=np.int64)
    for (shp, qs), d in zip(by_g.items(), stacked, strict=True):
        qa = np.asarray(qs, dtype=np.int64)
        flat = d.reshape(len(qs), -1)
        disp_max[qa] = 1.6 * np.abs(flat).max(axis=1) if flat.shape[1] else 0.0
        ctrl_ref[qa] = pack.add(d.astype(np.float32))
        ctrl_off[qa] = np.arange(len(qs)) * flat.shape[1]
        g_of[qa] = g = shp[1] if len(shp) == 4 else 0
        if not 1 <= g <= C.G_MAX or shp != (3, g, g, g):
            raise ValueError(f"control displacements of shape {shp}: the GPU backend takes "
                             f"(3, g, g, g) with 1 <= g <= {C.G_MAX}")  # fmt: skip
        pre_ref[qa] = pack.add(prefilter(shp[1]))
    arrays = tumor_arrays(ts)
    centre, rot, radii, blur_mm, clip, ext = arrays
    ja = np.asarray(jidx, dtype=np.int64)
    sp, shapes = J.sp[ja], J.shape[ja]
    # (rendering.conservative_boxes without its conversions: these arrays are its types)
    lo, hi, ok, pad = conservative_boxes_nb(centre, rot, radii, blur_mm, clip, disp_max, sp,
                                            shapes, J.ob_on[ja], J.ob[ja, 0], J.ob[ja, 1],
                                            BLUR_TRUNCATE)  # fmt: skip
    lo, hi = np.maximum(lo - pad, 0), np.minimum(hi + pad, shapes)  # plus the blur's reach
    # host-resident images: the host pass of tumor_box shrinks the box (what travels)
    host_rows = np.flatnonzero(ok & ~J.img_on[ja]).tolist() if not J.img_on.all() else ()
    for q in host_rows:
        j = jidx[q]
        box = tumor_box(ts[q], tuple(J.sp[j].tolist()), tuple(J.shape[j].tolist()),
                        jobs[j].plan.organ_bbox, coarse=True)  # fmt: skip
        if box is None:
            ok[q] = False
        else:
            lo[q] = [b.start for b in box]
            hi[q] = [b.stop for b in box]
    keep = np.flatnonzero(ok)
    n = len(keep)
    # which rows have appearance modes (their parameters are made while the device works)
    noise = [(job.plan.organ_noise_hu, job.plan.organ_noise_grain) for job in jobs]
    has_app = np.array([appearance_on(ts[q], *noise[jidx[q]]) for q in keep.tolist()],
                       dtype=bool).reshape(len(keep))  # fmt: skip
    # box sizes, bounding-box accumulators, scratch sizes, launch elements: one call
    nb, bb, fa_sizes, ua_sizes, tot_a = phase_a_sizes_nb(lo, hi, keep, g_of, has_app)
    # the flat schedules of phase A's launches: the boxes' (i, j) rows, their voxels, their
    # B-spline weight rows
    per_block, cap = be.block_rule
    most = getattr(be, "most_blocks", 0) if LIMIT_BLOCKS else 0
    rule = (min(per_block * BLOCK_SCALE, 1 << 62), cap, GRID2D, most)
    sched_a, nblk_a = schedules_nb(tot_a, _A_COLS, *rule)
    host_img, host_org = {}, {}
    for k, q in enumerate(keep if not (J.img_on.all() and J.org_on.all()) else ()):
        job = jobs[jidx[q]]
        if job.target_on_device and job.organ_on_device:
            continue
        box = tuple(slice(int(lo[q, a]), int(hi[q, a])) for a in range(3))
        if not job.target_on_device:
            host_img[k] = pack.add(np.asarray(job.target[box], dtype=np.float32))
        if not job.organ_on_device:
            org = np.asarray(job.organ[box])
            host_org[k] = pack.add(
                np.ascontiguousarray(org if org.dtype == bool else org > 0.5).view(np.uint8)
            )
    t_ref = pack.add(np.zeros((max(n, 1), W), dtype=np.int64))
    tf_ref = pack.add(np.zeros((max(n, 1), FW), dtype=np.float32))
    td_ref = pack.add(np.zeros((max(n, 1), DW), dtype=np.float64))
    bb_ref = pack.add(bb)
    sa_ref = pack.add(sched_a)
    fa = _Arena(np.float32, fa_sizes)  # orig, q2, shape rows, weight rows
    ua = _Arena(np.uint8, ua_sizes)  # organ, mask
    pack.alloc(be, (fa, ua))  # one allocation: the pack, then the scratch
    jk = ja[keep]
    T = np.zeros((max(n, 1), W), dtype=np.int64)
    TF = np.zeros((max(n, 1), FW), dtype=np.float32)
    TD = np.zeros((max(n, 1), DW), dtype=np.float64)
    if n:
        addrs = pack.addrs()
        phase_a_nb(T, TF, TD, keep, nb, lo, centre, g_of, addrs[ctrl_ref] + 4 * ctrl_off,
                   addrs[pre_ref], ext, fa.base, fa.offs, ua.base, ua.offs, has_app, clip, ja,
                   J.img_on, J.img, J.org_on, J.org, J.tissue, sp, rot, radii)  # fmt: skip
        for k in sorted(set(host_img) | set(host_org)):
            q = keep[k]
            box_strides = (int(nb[q, 1] * nb[q, 2]), int(nb[q, 2]), 1)
            # a box that travelled from the host: its address shifted so that the kernel's
            # (origin + index) * strides lands on it
            shift = int(lo[q] @ np.array(box_strides))
            if k in host_img:
                T[k, C.IMG], T[k, C.IMG_CODE] = pack.addr(host_img[k]) - 4 * shift, 0
                T[k, C.IS0 : C.IS2 + 1] = box_strides
            if k in host_org:
                T[k, C.ORG], T[k, C.ORG_CODE] = pack.addr(host_org[k]) - shift, 3
                T[k, C.OS0 : C.OS2 + 1] = box_strides
    pack.set(t_ref, T)
    pack.set(tf_ref, TF)
    pack.set(td_ref, TD)
    pack.upload(be)
    Td, TFd, TDd = pack.arg(be, t_ref), pack.arg(be, tf_ref), pack.arg(be, td_ref)
    S_rows, S_box, nS = pack.arg(be, sa_ref, 0), pack.arg(be, sa_ref, 1), i32(n)
    be.launch_flat("sg_seg_weights", nblk_a[2], pack.arg(be, sa_ref, 2), nS, Td, i32(W), TDd,
                   i32(DW))  # fmt: skip
    be.launch_flat("sg_seg_rows", nblk_a[0], S_rows, nS, Td, i32(W), TDd, i32(DW))
    be.launch_flat("sg_seg_shape", nblk_a[1], S_box, nS, Td, i32(W), TFd, i32(FW), TDd, i32(DW))
    be.launch_flat("sg_seg_bbox", nblk_a[1], S_box, nS, Td, i32(W), pack.arg(be, bb_ref))
    # while the device works: what phase B needs of every kept tumor (texture parameters and
    # keys, contrast, the blur kernels, as rendering builds them, cached per sigma, packed)
    apps = {k: blend_params(ts[q], *noise[jidx[q]])
            for k, q in enumerate(keep.tolist()) if has_app[k]}  # fmt: skip
    tex_p = texture_params([ts[q].texture for q in keep])
    tex_keys = stream_keys([ts[q].seed for q in keep], STREAM_NOISE, STREAM_BERNOULLI)
    tex_c = _texture_consts(tex_p, tex_keys)
    contrast = np.array([ts[q].contrast_hu for q in keep], dtype=np.float64)
    bpack, boffs, blen = blur_kernels_nb((blur_mm[keep][:, None] / sp[keep]).ravel(),
                                         BLUR_TRUNCATE)  # fmt: skip
    walls_r = _wall_segments(be, jobs, walls)  # rendered on the host, uploaded below
    hit = pack.download(be, bb_ref)[:n]  # synchronisation 1
    pack_a, TA = pack, T  # the phase-A buffers stay referenced until the end
    # ---------------------------------------------------------------- phase B (host)
    nw = len(walls_r)
    if nw:
        w_tn = np.array([w["tn"] for w in walls_r], np.int64).reshape(nw, 3)
        w_to = np.array([[x.start for x in w["tight"]] for w in walls_r], np.int64).reshape(nw, 3)
        w_job = np.array([w["job"] for w in walls_r], np.int64)
    else:
        w_tn = w_to = np.zeros((0, 3), np.int64)
        w_job = np.zeros(0, np.int64)
    # the rows (live ellipsoid rows, then host rows): tight boxes, their extent in mm, jobs,
    # merge partners
    (live, qe, u0, tn, to, job_of, tnv, lo_mm, hi_mm, n_part, part_off,
     part_flat) = phase_b_boxes_nb(hit, keep, lo, pad, nb, jk, centre, sp, w_tn, w_to,
                                   w_job)  # fmt: skip
    ne = len(live)
    nl = ne + nw
    if nl == 0:
        return
    # texture recipes (all axes in one call)
    tx = _texture_tables(tex_p[live], tex_c.take(live), lo_mm, hi_mm)
    pack = _Pack()
    t_ref = pack.add(np.zeros((nl, W), dtype=np.int64))
    tf_ref = pack.add(np.zeros((nl, FW), dtype=np.float32))
    td_ref = pack.add(np.zeros((nl, DW), dtype=np.float64))
    st_ref = pack.add(np.zeros((nl, 2), dtype=np.float64))
    tx_ref = pack.add(np.zeros((nl, 3), dtype=np.float64))
    # per row, the count of its blocks done with their sums (kernels' sg_row_sums): the
    # texture statistics' launch, the write-back's
    done_ref = pack.add(np.zeros((2, nl), dtype=np.uint32))
    boffs, blen = boffs.reshape(n, 3)[live], blen.reshape(n, 3)[live]
    blur_ref, smooth_ref = pack.add(bpack), pack.add(tx.kern)
    # the lattice bands of all axes: three packed arrays, rows addressed by offset
    band_refs = (pack.add(tx.starts), pack.add(tx.weights), pack.add(tx.inv))
    part_ref = pack.add(part_flat)
    app_e = has_app[live]
    ka = np.flatnonzero(app_e)  # rows with appearance modes: their parameters and keys
    app_step = key_step = 0
    if ka.size:
        app_all = np.stack([apps[int(live[k])][0] for k in ka.tolist()])
        key_all = np.stack([apps[int(live[k])][1] for k in ka.tolist()])
        app_ref, key_ref = pack.add(app_all), pack.add(key_all)
        app_step, key_step = app_all[0].nbytes, key_all[0].nbytes
    host_refs = [(pack.add(w["orig"]), pack.add(w["delta"]), pack.add(w["mask"]))
                 for w in walls_r]  # fmt: skip
    # scratch: float32 buffers per row (host rows: out, and merged where their image is on
    # the host), uint8
    ln, bs, gs = tx.n_lat, tx.blocks, tx.grid
    sizes_f, sizes_u = phase_b_sizes_nb(tn, ne, ln, bs, gs, app_e, n_part, ~J.img_on[job_of])
    # the flat schedules of phase B's launches (one per distinct elements-per-row count)
    sched_b, nblk_b = schedules_nb(sizes_f, _SCHED_B_COLS, *rule)
    sb_ref = pack.add(sched_b)
    # and those of the launches of independent steps side by side (CHAINS_B)
    chain_b, chain_off, nblk_c = chain_schedules_nb(sched_b, _CHAINS_B_IDX)
    sc_ref, chain_off = pack.add(chain_b), chain_off.tolist()
    f32 = _Arena(np.float32, sizes_f)
    u8 = _Arena(np.uint8, sizes_u)
    # each block's sums (sg_row_sums: the rows' last blocks add them in block order), 3 a block
    # of the texture statistics' launch (the grid's schedule), 2 of the write-back's (the out
    # schedule's; beside the label write its blocks come first)
    k_grid, k_out = SCHED_B.index("grid"), SCHED_B.index("out")
    slots = _Arena(np.float64, np.array([[3 * nblk_b[k_grid], 2 * nblk_b[k_out]]], np.int64))
    # two allocations: the masks (u8) with the pack, whose host rows' masks results may keep,
    # and the float32 scratch (and the sums' slots) apart (a result's masks keep their
    # allocation alive)
    f32_dev, _ = _allocate(be, 0, (f32, slots))  # (held until the statistics are back)
    pack.alloc(be, (u8,))
    base = pack.addrs()
    T = np.zeros((nl, W), dtype=np.int64)
    TF = np.zeros((nl, FW), dtype=np.float32)
    TD = np.zeros((nl, DW), dtype=np.float64)
    app_row = np.full(ne, -1, dtype=np.int64)
    app_row[ka] = np.arange(ka.size)
    refs = {
        "part": part_ref,
        "blur": blur_ref,
        "smooth": smooth_ref,
        "band_starts": band_refs[0],
        "band_weights": band_refs[1],
        "band_inv": band_refs[2],
    }
    if ka.size:
        refs.update(app=app_ref, keys=key_ref)
    bases = np.array([base[refs[k]] if k in refs else 0 for k in BASES], dtype=np.int64)
    phase_b_nb(T, TF, TD, ne, tn, to, job_of, J.img_on, J.img, J.round, J.ranges, J.tissue,
               J.organ_hu, J.lab_on, J.lab, J.lab_val, f32.base, f32.offs, u8.base, u8.offs,
               bases, part_off, n_part, qe, live, nb, clip, centre, sp, u0,
               TA, app_row, app_step, key_step, boffs, blen, tx.row, tx.woff, tx.koff, tx.klen,
               tx.kk, tx.goff, tx.lat0, ln, tx.noise_key, tx.bern_key, bs, tx.block0, gs,
               contrast, tx.scalars, tx.origin, tx.step)  # fmt: skip
    # host rows: only the write-back reads them (and its merge of its partners' changes)
    for w_, (r_orig, r_delta, r_mask) in enumerate(host_refs):
        q = ne + w_
        T[q, C.KIND] = 1
        T[q, C.TORIG], T[q, C.DELTA], T[q, C.TMASK] = base[r_orig], base[r_delta], base[r_mask]
    pack.set(t_ref, T)
    pack.set(tf_ref, TF)
    pack.set(td_ref, TD)
    pack.upload(be)
    Td, TFd, TDd = pack.arg(be, t_ref), pack.arg(be, tf_ref), pack.arg(be, td_ref)
    WW, FF, DD, nS = i32(W), i32(FW), i32(DW), i32(nl)

    def launch(name, buf, *args):  # a launch on the schedule of the F32 buffer it writes
        k = SCHED_B.index(buf)
        be.launch_flat(name, nblk_b[k], pack.arg(be, sb_ref, k), nS, Td, WW, *args)

    def steps(name, g, *steps_):
        """The steps ``steps_`` (``(kernel, its arguments after T's width)``, on
        ``CHAINS_B[g]``'s schedules) in one launch of ``name`` side by side (their arguments
        one after another), or one launch each without :data:`FUSE_STEPS`."""
        if FUSE_STEPS:
            args = [a for _, step_args in steps_ for a in step_args]
            be.launch_flat(name, nblk_c[g], pack.arg(be, sc_ref, chain_off[g]), nS, Td, WW,
                           *args)  # fmt: skip
        else:
            for (kernel, step_args), buf in zip(steps_, CHAINS_B[g], strict=True):
                launch(kernel, buf, *step_args)

    # the gather, the lattice noise and the blend's texture coordinates; then the mask blur's
    # passes (axes 0, 1, 2) beside the texture's band contractions (axes 2, 1, 0)
    steps("sg_seg_first", 0, ("sg_seg_gather", ()), ("sg_seg_lattice", ()),
          ("sg_seg_interp", (TDd, DD)))  # fmt: skip
    blur_passes, grid_passes = _pass_args()
    for a, (conv, band) in enumerate(blur_passes):
        steps("sg_seg_conv_band", 1 + a, ("sg_seg_conv", conv), ("sg_seg_band", band))
    launch("sg_seg_blocks", "frac", TDd, DD)
    txs = pack.arg(be, tx_ref)
    tex_sums = (slots.arg(be, 0, 0), pack.arg(be, done_ref, 0))
    out_sums = (slots.arg(be, 0, 1), pack.arg(be, done_ref, 1))
    for a, (buf, conv) in enumerate(grid_passes):
        if a == 2 and FUSE_STEPS:  # the last pass measures the rescale's statistics too
            launch("sg_seg_conv_stats", buf, TDd, DD, txs, *tex_sums, *conv)
        else:
            launch("sg_seg_conv", buf, *conv)
    if not FUSE_STEPS:
        launch("sg_seg_tex_stats", "grid", TDd, DD, txs, *tex_sums)
    launch("sg_seg_tex_scale", "grid", TDd, DD, txs)  # the grid rescaled in place
    blend = (TFd, FF)
    launch("sg_seg_blend", "torig", *blend)
    apply = ("sg_seg_apply", (TFd, FF, pack.arg(be, st_ref), *out_sums))
    if J.lab_on.any():  # the label maps on the device: every row's mask, beside the write-back
        steps("sg_seg_apply_label", 4, apply, ("sg_seg_label", ()))
    else:
        launch(apply[0], "out", *apply[1])
    if KEEP_LAST:
        k_vox, k_all = SCHED_B.index("torig"), SCHED_B.index("out")
        LAST.clear()
        LAST.update(
            n=nl, voxels=int(tnv.sum()), keep=(pack, pack_a, fa, ua, f32, u8, slots), ne=ne,
            T=T,
            TF=TF, f32=f32, u8=u8,
            partners=[part_flat[part_off[q] : part_off[q] + n_part[q]].tolist()
                      for q in range(nl)],
            blend=(nblk_b[k_vox], pack.arg(be, sb_ref, k_vox), nS, Td, WW, *blend),
            scale=(nblk_b[k_grid], pack.arg(be, sb_ref, k_grid), nS, Td, WW, TDd, DD, txs),
            apply=(nblk_b[k_all], pack.arg(be, sb_ref, k_all), nS, Td, WW, TFd, FF,
                   pack.arg(be, st_ref), *out_sums),
        )  # fmt: skip
    # while the device runs phase B: the rows' tight boxes and (plan, tumor) keys, the masks
    # of the jobs that keep them on the device, and those jobs' results (``before_wait``)
    tn_l, to_l, hi_l = tn.tolist(), to.tolist(), (to + tn).tolist()

    # what the masks need, and no more (results may keep mask_of): the u8 arena, and the
    # device pack with the byte offsets and shapes of the host rows' masks in it
    pack_dev = pack.dev
    wall_masks = [(pack.parts[r][0], pack.parts[r][1].shape) for _, _, r in host_refs]

    def mask_of(q: int):
        """Row ``q``'s tumor mask on the device: a view of the scratch (or the host row's)."""
        if q < ne:
            return u8.view(q, 1, tuple(tn_l[q]))
        off, shp = wall_masks[q - ne]
        return pack_dev[off : off + math.prod(shp)].reshape(shp)

    keys = list(zip(job_of.tolist(), np.asarray(iidx, dtype=np.int64)[qe].tolist()
                    + [w["i"] for w in walls_r], strict=True))  # fmt: skip
    tights, eager = [], []
    for q in range(nl):
        j, i = keys[q]
        lo_q, hi_q = to_l[q], hi_l[q]
        tight = (slice(lo_q[0], hi_q[0]), slice(lo_q[1], hi_q[1]), slice(lo_q[2], hi_q[2]))
        tights.append(tight)
        if deferred[j]:  # the mask stays on the device, a view made when read
            masks[j][i] = (tight, q)
        else:
            eager.append(q)
    if all(deferred):
        # nothing of the device's results is needed now (images, masks and label maps on
        # the device, in the stream's order): return without waiting for the device, as a
        # CuPy operation does. What the host reads later waits for this fence first (on the
        # host: the reader's stream may be unordered with this one): the statistics, when
        # the records are read, and the masks, when the boxes (the tumor mask, the label)
        # are. (The scratch freed meanwhile goes back to the memory pool's arena of this
        # stream, whose later work is ordered after these kernels.)
        fence = _Fence(be.fence() if hasattr(be, "fence") else None)

        def fenced_mask_of(q: int):  # (the device's mask, once the render is done)
            fence.wait()
            return mask_of(q)

        before_wait(fenced_mask_of, True)
        return _StatsLater(pack.fetcher(be, st_ref), fence, keys, results_stats)
    before_wait(mask_of, False)
    _put_stats(pack.download(be, st_ref).tolist(), keys, results_stats)  # synchronisation 2
    for q in eager:  # jobs with a host image or a host label map: their rows now
        j, i = keys[q]
        job, tight = jobs[j], tights[q]
        m = mask_of(q)
        if not job.target_on_device:
            shp = tuple(tn_l[q])
            final = "merged" if sizes_f[q, F32.index("merged")] else "delta"
            sel = be.download(f32.view(q, F32.index(final), shp)) != 0
            o = be.download(f32.view(q, F32.index("out"), shp))  # written where sel only
            job.target[tight][sel] = o[sel].astype(job.target.dtype)
            m = be.download(m).view(np.bool_)
        if job.label is not None and not job.label_on_device:  # a host label map
            mh = m if not job.target_on_device else be.download(m).view(np.bool_)
            job.label[tight][mh] = job.tumor_label
        masks[j][i] = (tight, m)
    # the device memory of both phases stays referenced until the download above synchronised
    # (mask_of keeps what the results' masks need: u8 and the phase-B device buffer)
    del pack_a, fa, ua, f32, slots, f32_dev


class _Shifted:
    """A host copy of ``box`` indexed with the scan's coordinates (``a[key]`` for ``key``
    within ``box``)."""

    def __init__(self, a: np.ndarray, box) -> None:
        self.a, self.box = a, box

    def __getitem__(self, key):
        return self.a[
            tuple(
                slice(k.start - b.start, k.stop - b.start)
                for k, b in zip(key, self.box, strict=True)
            )
        ]


def _wall_segments(be, jobs, walls) -> list[dict[str, Any]]:
    """The hollow-organ wall tumors ``walls`` (``(job, tumor)`` pairs;
    :mod:`synthgen._hollow`), rendered on the host (the CPU's function on the same box: the
    same result on both backends), concurrently on the shared thread pool as the CPU path
    renders them (the numba kernels release the GIL); their changes then join the others'
    merge and write-back on the device. A device array's box is copied back here, by this
    thread, before the threads start."""

    def inputs(j: int, i: int):
        job = jobs[j]
        plan = job.plan
        box = wall_box(plan.tumors[i], plan.spacing, plan.shape, plan.organ_bbox)
        if box is None:
            return None

        def host(a, on_device: bool):
            return _Shifted(be.download(a[box]), box) if on_device else a

        img = host(job.target, job.target_on_device)
        return plan.tumors[i], box, plan.spacing, img, host(job.organ, job.organ_on_device)

    todo = [(j, i, inputs(j, i)) for j, i in walls]
    todo = [x for x in todo if x[2] is not None]
    # (no size threshold: a wall tumor is milliseconds of mostly compiled work, a small
    # esophagus's too)
    rendered = map_threads(lambda x: render_wall(*x[2], np.float32), todo)
    out = []
    for (j, i, _), r in zip(todo, rendered, strict=True):
        if r is None:
            continue
        tight, orig, delta, mask = r
        out.append(
            {
                "host": True,
                "job": j,
                "i": i,
                "tight": tight,
                "tn": tuple(x.stop - x.start for x in tight),
                "orig": orig,  # (render_wall's: contiguous, float32 as asked)
                "delta": delta,
                "mask": mask.view(np.uint8),
            }
        )
    return out
