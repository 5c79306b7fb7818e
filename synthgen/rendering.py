"""Render a plan: deterministic, local to each tumor's box, on the CPU backend.

For every tumor, in its own box: the deformed-ellipsoid mask (B-spline displacement and
ellipsoid test fused in one pass), the edge-blurred mask ``B`` (separable Gaussian), the
texture ``T`` (:mod:`synthgen._texture`) and the blend ``I' = I - T * B * D`` inside the organ,
all into buffers of the tumor's own (phase 1, tumors concurrently). Then each group of
overlapping tumors merges its changes (union of masks, strongest change wins, the larger of
two equally strong; :func:`synthgen._cpu_kernels.merge_strongest`) and writes its
boxes (phase 2), so the result does not depend on tumor order or thread count. Nothing
scales with the scan except the optional copy of the output.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._appearance import blend_params
from ._device import array_kind
from ._geometry import prefilter
from ._pool import map_threads as _map
from ._pool import set_num_threads
from ._texture import texture_lookup
from .planning import Plan, TumorPlan, _binary, check_arrays, float64s, readable, unreadable

__all__ = [
    "HU_MAX",
    "HU_MIN",
    "RenderResult",
    "TumorRecord",
    "render",
    "render_batch",
    "set_num_threads",
]

HU_MIN = -1024.0
HU_MAX = 3071.0
BLUR_TRUNCATE = 3.0


@dataclass
class TumorRecord:
    """Per-tumor statistics measured on the rendered output.

    Attributes:
        index: Tumor index in the plan.
        size_class: Its size class.
        center_vox: Centre in voxel indices.
        center_mm: Centre in mm (world coordinates when an affine was given, else
            ``index * spacing``).
        radii_mm: Ellipsoid semi-axes, mm.
        volume_mm3: Labelled volume of this tumor, mm^3.
        voxels: Labelled voxels of this tumor.
        mean_contrast_hu: Mean of ``input - output`` over its labelled voxels (positive:
            darker than before, hypodense).
        contrast_hu: The plan's ``D``.
        clipped: Whether it was clipped to the organ.
        box: Its box as ``[[start, stop], ...]`` per axis.
    """

    index: int
    size_class: str
    center_vox: tuple[int, int, int]
    center_mm: tuple[float, float, float]
    radii_mm: tuple[float, float, float]
    volume_mm3: float
    voxels: int
    mean_contrast_hu: float
    contrast_hu: float
    clipped: bool
    box: list[list[int]]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RenderResult:
    """What a render produced.

    The full-volume ``tumor_mask`` and ``label`` are built on first access from the per-tumor
    boxes, so rendering in place (``out=``) allocates nothing of the scan's size. They live
    where the image lives: NumPy for NumPy images, CuPy for CuPy images, torch CUDA tensors
    for torch CUDA tensors (shared through DLPack, no copy). A GPU render kept on the device
    returns before the device is done; its ``tumors`` (:class:`LazyRecords`) wait for it and
    fetch the statistics when first read, its ``boxes`` wait for it when first read.
    """

    image: Any
    plan: Plan
    tumors: list[TumorRecord]
    organ_mask: Any
    boxes: list[tuple[tuple[slice, slice, slice], Any]] = field(repr=False)
    wrap: Any = field(default=None, repr=False)
    _tumor_mask: Any = field(default=None, repr=False)
    _label: Any = field(default=None, repr=False)

    def _gpu_array(self) -> Any:
        """The result's first CuPy array (organ mask, then boxes), or None: where the full
        volumes are built."""
        for a in (self.organ_mask, *(m for _, m in self.boxes)):
            if array_kind(a) == "cupy":
                return a
        return None

    def _xp(self):
        if self._gpu_array() is None:
            return np
        import cupy

        return cupy

    def _on_gpu(self):
        """A context with the GPU of the result's device arrays current (CuPy allocates on
        the current device), or none."""
        import contextlib

        a = self._gpu_array()
        return contextlib.nullcontext() if a is None else a.device

    def write_tumor_mask(self, out: Any) -> Any:
        """OR the tumor voxels into a caller-owned boolean array (boxes only): NumPy, CuPy
        or torch, on the host or a GPU (each box is moved to ``out``'s side first: a render
        of a host image with a GPU organ mask has host boxes, and CuPy and NumPy do not mix
        in one operation)."""
        import contextlib

        kind = array_kind(out)
        if kind == "torch-cpu":
            self.write_tumor_mask(out.numpy())
            return out
        if kind == "torch-cuda":
            from ._cuda import _as_cupy

            self.write_tumor_mask(_as_cupy(out))  # (a view of the tensor's memory)
            return out
        on_gpu = kind == "cupy"
        with out.device if on_gpu else contextlib.nullcontext():  # (out's GPU, not current)
            for sl, m in self.boxes:
                if on_gpu and array_kind(m) != "cupy":
                    import cupy

                    m = cupy.asarray(m)
                elif not on_gpu and array_kind(m) == "cupy":
                    m = m.get()
                out[sl] |= m.astype(bool, copy=False)
        return out

    @property
    def tumor_mask(self) -> Any:
        """Boolean mask of all tumor voxels (full volume, built once)."""
        if self._tumor_mask is None:
            xp = self._xp()
            with self._on_gpu():
                m = self.write_tumor_mask(xp.zeros(self.plan.shape, dtype=bool))
            self._tumor_mask = self.wrap(m) if self.wrap is not None else m
        return self._tumor_mask

    @property
    def label(self) -> Any:
        """uint8 label map: 0 background, 1 organ, 2 tumor (full volume, built once)."""
        if self._label is None:
            xp = self._xp()
            with self._on_gpu():
                organ = xp.asarray(self.organ_mask)
                lab = (organ if organ.dtype == bool else organ > 0.5).astype(xp.uint8)
                for sl, m in self.boxes:
                    # 2 on the tumor voxels of a 0/1 map: the maximum with 2 * mask (no
                    # masked assignment: on a GPU that would wait for the device once per
                    # tumor)
                    box = lab[sl]
                    xp.maximum(box, xp.asarray(m).astype(xp.uint8, copy=False) * 2, out=box)
            self._label = self.wrap(lab) if self.wrap is not None else lab
        return self._label


class _Lazy(Sequence):
    """A list made (or completed) on first use by ``_all()``: reads, iteration and pickling
    go through it (pickled as the plain list)."""

    __slots__ = ()

    def _all(self) -> list:
        raise NotImplementedError

    def __getitem__(self, i):
        return self._all()[i]

    def __iter__(self):
        return iter(self._all())

    def __reduce__(self):
        return (list, (self._all(),))


class LazyBoxes(_Lazy):
    """:attr:`RenderResult.boxes` whose masks are made on first use: ``items`` are (box, key)
    and the masks ``make(key)`` (a GPU render's device masks: views of its scratch, made only
    if the caller reads the boxes, the tumor mask or the label)."""

    __slots__ = ("_done", "_items", "_make")

    def __init__(self, items: list, make) -> None:
        self._items, self._make, self._done = items, make, None

    def _all(self) -> list:
        if self._done is None:
            self._done = [(box, self._make(key)) for box, key in self._items]
            self._items = self._make = None
        return self._done

    def __len__(self) -> int:
        return len(self._done if self._done is not None else self._items)

    def __repr__(self) -> str:
        return f"LazyBoxes({len(self)} boxes)"


class LazyRecords(_Lazy):
    """:attr:`RenderResult.tumors` whose measured fields (``voxels``, ``volume_mm3``,
    ``mean_contrast_hu``) are filled on first use by ``fill(records)``: a GPU render whose
    image and masks stay on the device returns without waiting for the device (as a CuPy
    operation does); the first read of its records waits for it, once, and brings its
    statistics back. Reads as the list of records (``==`` compares with a list).

    ``records``: the list, or a function making it (``n`` records), called on first use
    before ``fill``: a caller that never reads the records (a training loop) does not pay for
    making them. Safe to read from several threads: the first read makes and fills them,
    once, and the others wait for it."""

    __slots__ = ("_fill", "_lock", "_n", "_records")

    def __init__(self, records, fill=None, n: int | None = None) -> None:
        self._records, self._fill = records, fill
        self._n = len(records) if n is None else n
        self._lock = threading.Lock()

    def then_fill(self, fill) -> LazyRecords:
        """These records, filled by ``fill(records)`` on first use (given before any)."""
        self._fill = fill
        return self

    def _all(self) -> list:
        if self._fill is None and not callable(self._records):
            return self._records  # (done: no lock)
        with self._lock:
            if callable(self._records):
                self._records = self._records()
            if self._fill is not None:
                self._fill(self._records)  # (kept on failure: a later read tries again)
                self._fill = None
            return self._records

    def __len__(self) -> int:
        return self._n

    def __eq__(self, other) -> bool:
        if isinstance(other, LazyRecords):
            other = other._all()
        return self._all() == other if isinstance(other, list) else NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self._all())


def _flat9(rot) -> tuple:
    """A rotation as its 9 numbers, row major: given flat (the plan's form) or as 3 rows."""
    if len(rot) == 3:
        return (*rot[0], *rot[1], *rot[2])
    return tuple(rot)


def tumor_arrays(tumors) -> tuple[np.ndarray, ...]:
    """``(centre, rotation, radii, blur sigma, clip, control extent)`` of tumors as arrays
    (``(n, 3)``, ``(n, 3, 3)``, ``(n, 3)``, ``(n,)``, ``(n,)``, ``(n, 3)``)."""
    n = len(tumors)
    # one pass over the tumors into one flat list: 20 numbers each (centre indices are
    # exact in float64); NumPy converts a flat list of numbers at a fraction of the cost of
    # a list of tuples
    flat: list = []
    put, put1 = flat.extend, flat.append
    for t in tumors:
        c, rot, r, e = t.center_vox, t.rotation, t.radii_mm, t.control_extent_mm
        if len(rot) != 9:
            rot = _flat9(rot)
        if len(c) != 3 or len(rot) != 9 or len(r) != 3 or len(e) != 3:
            raise ValueError(f"tumor {t.index}: center_vox, radii_mm and control_extent_mm "
                             "need 3 numbers, rotation 9 (or 3 rows of 3)")  # fmt: skip
        put(c)
        put(rot)
        put(r)
        put1(t.blur_sigma_mm)
        put1(t.clip_to_organ)
        put(e)
    try:
        a = float64s(flat).reshape(n, 20)
    except TypeError as e:
        raise ValueError(f"tumor numbers (centre, rotation, radii, blur, extent): {e}") from None
    return (
        a[:, 0:3].astype(np.int64),
        np.ascontiguousarray(a[:, 3:12]).reshape(n, 3, 3),
        a[:, 12:15].copy(),
        a[:, 15].copy(),
        a[:, 16] != 0,
        a[:, 17:20].copy(),
    )


def conservative_boxes(arrays, disp_max, spacing, shape, organ_boxes):
    """The conservative boxes of ellipsoid tumors, all at once (``tumor_box`` for one).

    The mask lies within ``radius bound + max |displacement|`` of the centre, intersected
    with the organ's bounding box for a clipped tumor, clipped to the scan. ``arrays``: from
    :func:`tumor_arrays`; ``disp_max``: ``1.6 max |displacement|`` per tumor (the
    interpolating spline overshoots its control values by at most 1.6x); ``spacing``,
    ``shape``: ``(n, 3)``; ``organ_boxes``: ``(has_box, lo, hi)`` (``(n,)``, ``(n, 3)``,
    ``(n, 3)``), the organ's box per tumor where ``has_box``.
    Returns ``(lo, hi, ok, pad)``: the box without the blur, whether it is not empty and the
    blur's reach in voxels (``ceil(3 sigma / spacing) + 1``); one compiled call
    (:func:`synthgen._cpu_kernels.conservative_boxes_nb`).
    """
    from ._cpu_kernels import conservative_boxes_nb

    centre, rot, radii, blur, clip = arrays[:5]
    n = len(centre)
    has_ob, ob_lo, ob_hi = organ_boxes
    return conservative_boxes_nb(
        np.ascontiguousarray(centre, dtype=np.int64),
        np.ascontiguousarray(rot, dtype=np.float64),
        np.ascontiguousarray(radii, dtype=np.float64),
        np.ascontiguousarray(blur, dtype=np.float64),
        np.ascontiguousarray(clip, dtype=bool),
        np.ascontiguousarray(disp_max, dtype=np.float64).reshape(n),
        np.ascontiguousarray(spacing, dtype=np.float64).reshape(n, 3),
        np.ascontiguousarray(shape, dtype=np.int64).reshape(n, 3),
        np.ascontiguousarray(has_ob, dtype=bool).reshape(n),
        np.ascontiguousarray(ob_lo, dtype=np.int64).reshape(n, 3),
        np.ascontiguousarray(ob_hi, dtype=np.int64).reshape(n, 3),
        BLUR_TRUNCATE,
    )


def _shape_inputs(t: TumorPlan, pos: Sequence[np.ndarray]):
    """Arguments of the fused shape kernel for voxel positions ``pos`` (mm from the centre)."""
    from ._cpu_kernels import bspline_matrix

    disp = t.displacement
    ext = t.control_extent_mm
    w = []
    for a in range(3):
        g = disp.shape[a + 1]
        w.append(bspline_matrix((pos[a] + ext[a]) * ((g - 1) / (2.0 * ext[a])), prefilter(g)))
    m = np.ascontiguousarray((t.rotation_matrix / np.asarray(t.radii_mm)[None, :]).T)
    return disp.astype(np.float32), w, [p.astype(np.float32) for p in pos], m


COARSE_STEP_MM = 4.0


def tumor_box(
    t: TumorPlan,
    spacing: Sequence[float],
    shape: Sequence[int],
    organ_bbox: Sequence[Sequence[int]] | None = None,
    coarse: bool = True,
) -> tuple[slice, slice, slice] | None:
    """The voxel box a tumor can touch (mask, blur and blend), clipped to the scan.

    A conservative box first: the mask lies within ``radius bound + max |displacement|`` of
    the centre (the interpolating cubic spline overshoots its control values by at most
    1.6x), intersected with the organ's bounding box for a clipped tumor. The shape is then
    evaluated on a 4 mm grid inside it and the box shrunk to the hull of the inside points
    plus two grid steps, plus ``3 sigma`` of blur (``coarse=False`` skips that host pass and
    returns the conservative box). ``None`` when the tumor misses the scan. A hollow-organ
    wall tumor (``t.kind == "wall"``) has its own box (:func:`synthgen._hollow.wall_box`).
    """
    from . import _cpu_kernels as k

    if t.kind != "ellipsoid":
        from ._hollow import wall_box

        return wall_box(t, spacing, shape, organ_bbox)
    disp = t.displacement  # (parsed from the plan's nested lists: once)
    dmax = 1.6 * float(np.abs(disp).max()) if disp.size else 0.0
    ob = np.zeros((2, 3), dtype=np.int64) if organ_bbox is None else np.asarray(
        organ_bbox, dtype=np.int64).T  # fmt: skip
    lo_a, hi_a, ok, pad_a = conservative_boxes(
        tumor_arrays([t]), [dmax], [spacing], [shape], ([organ_bbox is not None], ob[0], ob[1])
    )
    if not ok[0]:
        return None
    lo, hi = lo_a[0].tolist(), hi_a[0].tolist()
    pad_mm = BLUR_TRUNCATE * t.blur_sigma_mm
    if not coarse:  # the GPU evaluates the shape on the conservative box: no host pass
        return tuple(
            slice(max(0, lo[a] - int(pad_a[0, a])), min(int(shape[a]), hi[a] + int(pad_a[0, a])))
            for a in range(3)
        )  # type: ignore[return-value]
    # Coarse pass: where is the shape really?
    step = [max(1, int(COARSE_STEP_MM / spacing[a])) for a in range(3)]
    idx = [np.arange(lo[a], hi[a], step[a]) for a in range(3)]
    pos = [(idx[a] - t.center_vox[a]) * spacing[a] for a in range(3)]
    ctrl, w, pos32, m = _shape_inputs(t, pos)
    shp = tuple(len(i) for i in idx)
    ones = np.ones((1, 1, 1), dtype=np.bool_)
    zero = np.zeros((1, 1, 1), dtype=np.float32)
    grid = np.empty(shp, dtype=np.bool_)
    bcast = [np.broadcast_to(a, shp) for a in (ones, zero)]
    k.shape_mask(ctrl, *w, *pos32, m, bcast[0], bcast[1], -np.inf, np.inf, False, grid)
    hit = k.bbox(grid)
    out = []
    for a in range(3):
        if hit[6] == 0:  # thinner than the coarse grid: keep the conservative box
            c_lo, c_hi = lo[a], hi[a]
        else:
            pad = 2 * step[a] + math.ceil(pad_mm / spacing[a]) + 1
            c_lo = int(idx[a][hit[2 * a]]) - pad
            c_hi = int(idx[a][hit[2 * a + 1]]) + pad + 1
        out.append(slice(max(0, c_lo), min(int(shape[a]), c_hi)))
    return tuple(out)  # type: ignore[return-value]


def _clusters(boxes: list[tuple[slice, slice, slice]]) -> list[list[int]]:
    """Groups of tumors whose boxes overlap (transitively), in plan order."""
    n = len(boxes)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            if all(
                boxes[i][a].start < boxes[j][a].stop and boxes[j][a].start < boxes[i][a].stop
                for a in range(3)
            ):
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def _volume(box: tuple[slice, slice, slice]) -> int:
    return math.prod(s.stop - s.start for s in box)


def _overlap(a: tuple[slice, ...], b: tuple[slice, ...]) -> tuple[slice, ...] | None:
    lo = [max(a[d].start, b[d].start) for d in range(3)]
    hi = [min(a[d].stop, b[d].stop) for d in range(3)]
    if any(h <= s for s, h in zip(lo, hi, strict=True)):
        return None
    return tuple(slice(s, h) for s, h in zip(lo, hi, strict=True))


def _rel(inner: tuple[slice, ...], outer: tuple[slice, ...]) -> tuple[slice, ...]:
    return tuple(
        slice(inner[d].start - outer[d].start, inner[d].stop - outer[d].start) for d in range(3)
    )


def _render_tumor(
    t: TumorPlan,
    box: tuple[slice, slice, slice],
    spacing: Sequence[float],
    target: np.ndarray,
    organ_mask: Any,
    work_dtype: type,
    tissue: tuple[float, float],
    organ_hu: float,
    k,
    noise: tuple[float | None, float | None] = (None, None),
):
    """Render one tumor from the untouched scan into buffers of its own.

    The shape is evaluated on ``box`` (the conservative box of :func:`tumor_box`); the box is
    then shrunk to the mask's exact extent plus the blur's reach before the blur, texture and
    blend passes. Returns ``(box, orig, delta, mask)`` on the shrunk box, or ``None`` when
    the tumor has no voxel (clipped away, outside the tissue window). A wall tumor of a
    hollow organ is rendered by :func:`synthgen._hollow.render_wall` (same return value).
    """
    if t.kind != "ellipsoid":
        from ._hollow import render_wall

        return render_wall(t, box, spacing, target, organ_mask, work_dtype)
    orig = np.array(target[box], dtype=work_dtype, copy=True)
    orig32 = orig if work_dtype == np.float32 else orig.astype(np.float32)
    organ = np.ascontiguousarray(_binary(np.asarray(organ_mask[box])))
    pos = [(np.arange(box[a].start, box[a].stop) - t.center_vox[a]) * spacing[a] for a in range(3)]
    tlo, thi = np.float32(tissue[0]), np.float32(tissue[1])
    # Shape: B-spline displacement + ellipsoid test, fused.
    ctrl, w, pos32, m = _shape_inputs(t, pos)
    mask = np.empty(orig.shape, dtype=np.bool_)
    app = blend_params(t, *noise)  # appearance modes (None: the published blend)
    if app is None:
        k.shape_mask(ctrl, *w, *pos32, m, organ, orig32, tlo, thi, t.clip_to_organ, mask)
    else:
        q2 = np.empty(orig.shape, dtype=np.float32)
        k.shape_mask(ctrl, *w, *pos32, m, organ, orig32, tlo, thi, t.clip_to_organ, mask, q2)
    lo0, hi0, lo1, hi1, lo2, hi2, count = k.bbox(mask)
    if count == 0:
        return None
    # Shrink to the mask's extent plus the blur's reach.
    tight = []
    for a, (lo, hi) in enumerate(((lo0, hi0), (lo1, hi1), (lo2, hi2))):
        pad = math.ceil(BLUR_TRUNCATE * t.blur_sigma_mm / spacing[a]) + 1
        tight.append(slice(max(0, lo - pad), min(orig.shape[a], hi + pad + 1)))
    sub = tuple(tight)
    new_box = tuple(
        slice(box[a].start + sub[a].start, box[a].start + sub[a].stop) for a in range(3)
    )
    orig = np.ascontiguousarray(orig[sub])
    orig32 = orig if work_dtype == np.float32 else orig.astype(np.float32)
    organ = np.ascontiguousarray(organ[sub])
    mask = np.ascontiguousarray(mask[sub])
    pos = [p[s] for p, s in zip(pos, sub, strict=True)]
    extra = ()
    if app is not None:
        off = [int(new_box[a].start - t.center_vox[a]) for a in range(3)]
        extra = (np.ascontiguousarray(q2[sub]), app[0], app[1], *off)
    # Edge blur B of the mask (separable, zero padded, scipy-normalised kernel).
    kp, ko, kl = k.blur_kernels_nb(
        np.array([t.blur_sigma_mm / spacing[a] for a in range(3)]), BLUR_TRUNCATE
    )
    kern = [kp[ko[a] : ko[a] + kl[a]] for a in range(3)]
    n = orig.shape
    r = [(kk.size - 1) // 2 for kk in kern]
    blur = k.toeplitz_contract3(
        mask.view(np.uint8), -r[0], kern[0], n[0], -r[1], kern[1], n[1], -r[2], kern[2], n[2]
    )
    # Texture on its block grid, interpolated inside the blend kernel.
    tgrid, ic = texture_lookup(t.seed, t.texture, pos, k=k)
    delta = np.zeros(n, dtype=np.float32)
    k.blend_tumor(
        orig32,
        organ,
        tlo,
        thi,
        blur,
        tgrid,
        ic[0][0],
        ic[0][1],
        ic[1][0],
        ic[1][1],
        ic[2][0],
        ic[2][1],
        np.float32(t.contrast_hu),
        np.float32(organ_hu),
        bool(t.clip_to_organ),
        delta,
        *extra,
    )
    return new_box, orig, delta, mask


def check_job(plan: Plan, image: Any, organ_mask: Any, out: Any) -> None:
    """The render's checks of the arrays (3-D, image and mask alike, the plan's shape,
    ``out``'s shape and dtype, in any byte order). The mass effect makes them before its
    warp writes into ``out``: a mismatch fails with the caller's arrays untouched."""
    if len(image.shape) != 3 or tuple(image.shape) != tuple(organ_mask.shape):
        raise ValueError(
            f"image {tuple(image.shape)} and organ_mask {tuple(organ_mask.shape)} must be 3-D "
            "arrays of one shape"
        )
    if tuple(image.shape) != tuple(plan.shape):
        raise ValueError(f"plan is for shape {tuple(plan.shape)}, image is {tuple(image.shape)}")
    if out is None:
        return
    if tuple(getattr(out, "shape", ())) != tuple(image.shape):
        raise ValueError(
            f"out must have the image's shape {tuple(image.shape)}, got "
            f"{tuple(out.shape) if hasattr(out, 'shape') else type(out).__name__}"
        )
    od, idt = out.dtype, image.dtype
    if isinstance(od, np.dtype) and isinstance(idt, np.dtype):
        same = od.newbyteorder("=") == idt.newbyteorder("=")
    else:
        same = str(od) == str(idt)
    if not same:
        raise ValueError(f"out has dtype {od}, image has {idt}")


def needs_readable(image: Any, organ_mask: Any, out: Any, label_out: Any = None) -> bool:
    """Whether :func:`readable_job` has an array to convert (a label map only as a NumPy
    array: :func:`label_arg` judges which tensors can be written)."""
    return any(map(unreadable, (image, organ_mask, out))) or (
        isinstance(label_out, np.ndarray) and unreadable(label_out)
    )


def readable_job(fn, image: Any, organ_mask: Any, out: Any, label_out: Any = None) -> RenderResult:
    """``fn(image, organ_mask, out, label_out)`` (a render) on arrays the compiled kernels
    take, its result given back as for the caller's arrays.

    A NumPy image or organ mask in non-native byte order is read through a native-order
    copy, a float16 one (a bfloat16 CPU tensor) through a float32 copy
    (:func:`synthgen.planning.readable`). Without
    ``out`` the render goes into that copy of the image: the result image is in native byte
    order (``>i2`` gives ``int16``), float16 for a float16 image (the float32 render, cast).
    An ``out`` (or ``label_out``) in non-native byte order or of float16 is rendered through
    such a working copy of the whole volume and written back in full, in its own dtype and
    byte order: correct, but not the boxes-only in-place render of a native one. Arrays the
    kernels take as they are go to ``fn`` untouched.
    """
    check_writable("out", out)  # (written back in full at the end)
    check_writable("label_out", label_out)
    im, om = readable(image), readable(organ_mask)
    # (a label map tensor goes to the render as it is: label_arg says which ones it writes)
    work = readable(out)
    lab = readable(label_out) if isinstance(label_out, np.ndarray) else label_out
    if im is image and om is organ_mask and work is out and lab is label_out:
        return fn(image, organ_mask, out, label_out)
    if out is not None and isinstance(out, np.ndarray) and isinstance(image, np.ndarray):
        if out.shape != image.shape:
            raise ValueError("out must be a NumPy array with the image's shape")
        if out.dtype.newbyteorder("=") != image.dtype.newbyteorder("="):
            raise ValueError(f"out has dtype {out.dtype}, image has {image.dtype}")
    if out is None and im is not image:
        work = im  # a fresh copy: render into it
    elif out is image:
        im = work  # in place: the working copy holds the image
    res = fn(im, om, work, lab)
    if lab is not label_out:
        label_out[...] = lab
    if out is not None:
        if work is not out:
            out[...] = work  # back into the caller's dtype and byte order
        res.image = out
    elif im is not image:  # cast back: float16 (bfloat16) as such, >i2 as native int16
        res.image = (
            res.image.astype(image.dtype.newbyteorder("="), copy=False)
            if isinstance(image, np.ndarray)
            else res.image.to(image.dtype)
        )
    if res.organ_mask is om and om is not organ_mask:
        res.organ_mask = organ_mask
    return res


def check_writable(name: str, a: Any) -> None:
    """``ValueError`` for a read-only NumPy array given to be written (``out``,
    ``label_out``): checked before anything is written, so a failed call leaves every
    array as it was (the compiled kernels would raise a numba typing error part way)."""
    if isinstance(a, np.ndarray) and not a.flags.writeable:
        raise ValueError(
            f"{name} is read-only (a NumPy array with writeable=False, e.g. from np.frombuffer "
            "or a memory map opened 'r'): pass a writable array, or none"
        )


def label_arg(label_out: Any, shape: Sequence[int], tumor_label: Any) -> Any:
    """A ``label_out`` argument, checked: ``ValueError`` unless it can receive
    ``tumor_label`` on the grid ``shape`` (an array of that shape, of an integer or float
    dtype whose range holds the value; a boolean map only for the value 1). A CPU tensor
    comes back as its NumPy view (written in place through it); ``None`` stays ``None``."""
    import operator

    if label_out is None:
        return None
    if isinstance(tumor_label, (bool, np.bool_)):
        raise ValueError(f"tumor_label must be an integer, got {tumor_label!r}")
    try:
        value = operator.index(tumor_label)
    except TypeError:
        raise ValueError(f"tumor_label must be an integer, got {tumor_label!r}") from None
    if not hasattr(label_out, "shape") or not hasattr(label_out, "dtype"):
        raise ValueError(f"label_out must be an array, got {type(label_out).__name__}")
    if tuple(label_out.shape) != tuple(shape):
        raise ValueError(f"label_out has shape {tuple(label_out.shape)}, the image {tuple(shape)}")
    cannot = (
        f"label_out has dtype {label_out.dtype}, which synthgen cannot write: pass an integer "
        "or float array (or a boolean one, for tumor_label 1)"
    )
    try:
        dt = np.dtype(str(label_out.dtype).replace("torch.", ""))
    except TypeError:  # (a torch dtype NumPy does not know, e.g. bfloat16 without ml_dtypes)
        raise ValueError(cannot) from None
    if dt == np.bool_:
        if value != 1:
            raise ValueError(
                f"a boolean label_out cannot hold tumor_label {value}: pass an integer map "
                "(uint8) or tumor_label=1"
            )
    elif dt.kind in "iu":
        info = np.iinfo(dt)
        if not info.min <= value <= info.max:
            raise ValueError(f"tumor_label {value} does not fit label_out's dtype {dt}")
    elif dt.kind == "f":
        if abs(value) > 2**24:
            raise ValueError(f"tumor_label {value} is not exact in label_out's dtype {dt}")
    else:
        raise ValueError(cannot)  # (complex; bfloat16 where ml_dtypes registers it: kind V)
    check_writable("label_out", label_out)
    return label_out.numpy() if array_kind(label_out) == "torch-cpu" else label_out


def label_args(plans: Sequence[Plan], label_outs: Any, tumor_label: Any) -> list[Any]:
    """``render_batch``'s ``label_outs``: one :func:`label_arg` per plan (``None``: none)."""
    if label_outs is None:
        return [None] * len(plans)
    if not isinstance(label_outs, (list, tuple)):
        raise ValueError("label_outs must be one label map per plan (a list), or None")
    (labs,) = per_plan(len(plans), label_outs=label_outs)
    return [label_arg(lab, p.shape, tumor_label) for p, lab in zip(plans, labs, strict=True)]


def per_plan(n: int, **args: Any) -> list[list[Any]]:
    """``render_batch``'s arguments as one list per plan each, in the order given: a list or
    tuple is taken as one item per plan (ValueError naming it when its length is not ``n``),
    anything else is shared by all plans; ``None`` gives ``None`` per plan."""
    out = []
    for name, x in args.items():
        if isinstance(x, (list, tuple)):
            if len(x) != n:
                raise ValueError(f"{name}: {len(x)} given for {n} plans")
            out.append(list(x))
        else:
            out.append([x] * n)
    return out


def memory_extent(a: Any) -> tuple[Any, int, int] | None:
    """``(where, first byte, end byte)`` of the memory an array's elements span (``where``:
    ``"host"`` or ``("cuda", device)``), for NumPy arrays, CuPy arrays and torch tensors;
    ``None`` for an empty array or anything else. Two arrays whose spans on the same
    ``where`` do not intersect share no element (the converse need not hold: strided views
    may interleave)."""
    if isinstance(a, np.ndarray):  # NumPy (and the test suite's stand-in device arrays)
        if a.size == 0:
            return None
        where, ptr, item = "host", a.__array_interface__["data"][0], a.itemsize
    elif (kind := array_kind(a)) == "cupy":
        if a.size == 0:
            return None
        where, ptr, item = ("cuda", int(a.device.id)), int(a.data.ptr), a.itemsize
    elif kind.startswith("torch"):
        if a.numel() == 0:  # (strides in elements)
            return None
        item = a.element_size()
        where = ("cuda", a.device.index or 0) if a.is_cuda else "host"
        ptr, strides = a.data_ptr(), [st * item for st in a.stride()]
        return _span(where, ptr, item, a.shape, strides)
    else:
        return None
    flags = a.flags
    if flags.c_contiguous or flags.f_contiguous:
        return where, ptr, ptr + a.nbytes
    return _span(where, ptr, item, a.shape, a.strides)


def _span(where: Any, ptr: int, item: int, shape, strides) -> tuple[Any, int, int]:
    lo = hi = int(ptr)
    for n, st in zip(shape, strides, strict=True):
        step = (int(n) - 1) * int(st)
        lo, hi = (lo + step, hi) if step < 0 else (lo, hi + step)
    return where, lo, hi + int(item)


def _spans_meet(a: tuple | None, b: tuple | None) -> bool:
    return a is not None and b is not None and a[0] == b[0] and a[1] < b[2] and b[1] < a[2]


def sequential_groups(images: Sequence[Any], outs: Sequence[Any]) -> list[tuple[int, int]]:
    """Consecutive runs ``[(start, stop), ...]`` of a batch's plans that can render together
    with the result of rendering the plans one after another, as the CPU does.

    A plan writes its ``out`` (read and written: it holds the image), or a copy of its image
    made before any plan of its run renders. So a later plan conflicts with an earlier one
    when the earlier one's ``out`` shares memory with the later one's ``out`` (both would
    write the same voxels from the same original) or, without an ``out``, with its image (the
    copy would miss the earlier plan's tumors): such a plan starts a new run. One run, the
    whole batch, when no ``out`` shares memory with anything (checked in ``n log n``)."""
    n = len(outs)
    if n < 2:
        return [(0, n)]
    writes = [(memory_extent(o), i) for i, o in enumerate(outs) if o is not None]
    writes = [(e, i) for e, i in writes if e is not None]
    if not writes:
        return [(0, n)]
    spans = {i: e for e, i in writes}
    reads = {i: memory_extent(images[i]) for i in range(n) if outs[i] is None}
    # the quick answer: no write span meets another write span, nor any read span
    ordered = sorted((e[0] != "host", e[0], e[1], e[2]) for e, _ in writes)
    clash = any(a[:2] == b[:2] and b[2] < a[3] for a, b in itertools.pairwise(ordered))
    if not clash and reads:
        import bisect

        for e in reads.values():
            if e is None:
                continue
            key = (e[0] != "host", e[0], e[2])  # (sorts before the writes starting at e's end)
            at = bisect.bisect_left(ordered, key) - 1  # the last write starting before e ends
            if at >= 0 and ordered[at][:2] == key[:2] and ordered[at][3] > e[1]:
                clash = True
                break
    if not clash:
        return [(0, n)]
    groups, start = [], 0
    for j in range(1, n):
        mine = spans.get(j) if outs[j] is not None else reads.get(j)
        if any(_spans_meet(spans.get(i), mine) for i in range(start, j)):
            groups.append((start, j))
            start = j
    groups.append((start, n))
    return groups


def render_batch(
    plans: Sequence[Plan],
    images: Any,
    organ_masks: Any,
    *,
    outs: Sequence[Any] | None = None,
    device: str = "auto",
    affines: Sequence[np.ndarray | None] | None = None,
    stream: Any = None,
    label_outs: Sequence[Any] | None = None,
    tumor_label: int = 2,
) -> list[RenderResult]:
    """Render many plans at once: for one scan (pass one image and mask) or many.

    On a GPU every kernel of every tumor of every plan is launched back to back, the small
    plan data is uploaded in two copies and the host waits once, for the tumors' boxes (not
    once per tumor or per plan; once per run of plans when plans share an output, see
    ``outs``), optionally on the caller's stream (a CuPy stream, a
    ``torch.cuda.Stream`` or a raw ``cudaStream_t``). With the images, organ masks and label
    maps on the device the call then returns while the device finishes, as a CuPy operation
    does (work on the same stream is ordered after it); the records of ``tumors`` (voxels,
    volume, mean contrast) and the masks of ``boxes`` (and so ``tumor_mask`` and
    ``label``) wait for the device when first read. Otherwise it waits a second
    time, for the statistics and the masks the host needs. On the CPU it renders the plans
    one after another.

    Args:
        plans: The plans.
        images: One image for all plans, or one per plan (NumPy, CuPy or torch).
        organ_masks: One organ mask for all plans, or one per plan.
        outs: One caller-owned output per plan holding its image (rendered in place; may be
            the image itself); ``None``: a copy per plan. Plans may share an output (e.g.
            several plans into one scan): the result is that of rendering them one after
            another, in order, on every backend (on a GPU such plans go to separate runs of
            launches). NumPy images, masks or outputs in non-native byte order or of float16
            are taken as :func:`render` takes them, the plans then rendered one by one.
        device: As for :func:`render`.
        affines: Optional affine per plan (world-mm centres in the records).
        stream: GPU stream to work on.
        label_outs: One caller-owned label map per plan (see :func:`render`'s
            ``label_out``), or ``None``; on a GPU every tumor voxel of the batch is labelled
            by one launch, with no per-tumor work.
        tumor_label: The value tumor voxels get in ``label_outs``.

    Returns:
        One :class:`RenderResult` per plan, in order.
    """
    n = len(plans)
    images, organ_masks, outs, affines = per_plan(
        n, images=images, organ_masks=organ_masks, outs=outs, affines=affines
    )
    label_outs = label_args(plans, label_outs, tumor_label)
    for o in outs:  # all of them before the first plan renders
        check_writable("out", o)
    if n == 0:
        return []
    from ._device import resolve_device

    # (the label maps too: a kernel writes them, so one on another GPU than the data is
    # refused here instead of faulting the launch, and one on a GPU takes the render there)
    where = resolve_device(device, *images, *organ_masks,
                           *[a for a in (*outs, *label_outs) if a is not None])  # fmt: skip
    if where.kind == "cpu" or any(map(unreadable, (*images, *organ_masks, *outs, *label_outs))):
        # (host arrays in non-native byte order or float16: plan by plan, see render)
        todo = zip(plans, images, organ_masks, outs, affines, label_outs, strict=True)
        dev = "cpu" if where.kind == "cpu" else device
        return [
            render(p, im, om, out=o, device=dev, affine=a, label_out=lab, tumor_label=tumor_label)
            for p, im, om, o, a, lab in todo
        ]
    from ._cuda import render_on_gpu

    for p, im, om, o in zip(plans, images, organ_masks, outs, strict=True):
        check_job(p, im, om, o)
    return render_on_gpu(
        plans,
        images,
        organ_masks,
        device_id=where.index,
        outs=outs,
        affines=affines,
        stream=stream,
        label_outs=label_outs,
        tumor_label=tumor_label,
    )


def _output_range(dtype: np.dtype) -> tuple[float, float]:
    lo, hi = HU_MIN, HU_MAX
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        lo, hi = max(lo, float(info.min)), min(hi, float(info.max))
    return lo, hi


def render(
    plan: Plan,
    image: np.ndarray,
    organ_mask: np.ndarray,
    *,
    out: np.ndarray | None = None,
    device: str = "auto",
    affine: np.ndarray | None = None,
    label_out: Any = None,
    tumor_label: int = 2,
) -> RenderResult:
    """Apply a plan to a scan, deterministically.

    Args:
        plan: The plan (from :func:`synthgen.plan` or :meth:`Plan.from_json`).
        image: The CT (HU) the plan was made for; never modified unless it is ``out``. A
            NumPy array in non-native byte order (nibabel's ``>i2``) is read through a
            native-order copy and the result image is in native order (``int16``); a float16
            one is rendered as its float32 values and the result cast back to float16 (see
            :func:`readable_job`).
        organ_mask: Organ mask on the same grid (bool or numbers binarised at > 0.5; any byte
            order).
        out: Caller-owned array of the image's shape and dtype that already holds the image
            (it may be ``image`` itself): only the tumors' boxes are read and written.
            Without it a copy of ``image`` is made and returned. An ``out`` in non-native byte
            order or of float16 is written correctly, through a full-volume working copy.
        device: ``"auto"`` follows the data (CuPy arrays and torch CUDA tensors render on
            their GPU, in place through DLPack; NumPy arrays on the CPU), ``"cpu"``,
            ``"cuda"`` or ``"cuda:N"`` (NumPy data then stays on the host and only the
            tumors' boxes travel to the GPU and back).
        affine: Optional voxel-to-world affine, only used to report centres in world mm.
        label_out: Caller-owned label map on the image's grid (any integer or float dtype,
            any contents, e.g. the organ labels; NumPy, CuPy or torch): every tumor voxel is
            set to ``tumor_label`` in place, in the render itself (on a GPU, one launch with
            the write-back: no full-volume label is built and the host does not wait).
        tumor_label: The value tumor voxels get in ``label_out``.

    Returns:
        A :class:`RenderResult` (image, lazily built tumor mask and label, per-tumor records).

    Raises:
        ValueError: Shapes or spacing that do not match the plan, or a bad ``out``.
        synthgen.DeviceError: ``cuda`` asked for where CuPy, a driver or the GPU is missing.
    """
    from ._device import resolve_device

    label_out = label_arg(label_out, plan.shape, tumor_label)
    check_writable("out", out)
    if needs_readable(image, organ_mask, out, label_out):
        kw = dict(device=device, affine=affine, tumor_label=tumor_label)
        return readable_job(lambda im, om, o, lab: render(plan, im, om, out=o, label_out=lab, **kw),
                            image, organ_mask, out, label_out)  # fmt: skip
    where = resolve_device(device, image, organ_mask,
                           *[a for a in (out, label_out) if a is not None])  # fmt: skip
    if where.kind == "cuda":
        from ._cuda import render_on_gpu

        check_job(plan, image, organ_mask, out)
        return render_on_gpu(
            [plan], [image], [organ_mask], device_id=where.index, outs=[out], affines=[affine],
            label_outs=[label_out], tumor_label=tumor_label,
        )[0]  # fmt: skip
    if array_kind(image) == "torch-cpu":  # CPU tensors: NumPy views, results as tensors
        import torch

        res = render(
            plan,
            image.numpy(),
            organ_mask.numpy() if array_kind(organ_mask) == "torch-cpu" else organ_mask,
            out=out.numpy() if out is not None else None,
            device="cpu",
            affine=affine,
            label_out=label_out,
            tumor_label=tumor_label,
        )
        res.image = out if out is not None else torch.from_numpy(res.image)
        res.wrap = torch.from_numpy
        return res
    check_arrays(image, organ_mask)
    if tuple(image.shape) != tuple(plan.shape):
        raise ValueError(f"plan is for shape {tuple(plan.shape)}, image is {tuple(image.shape)}")
    if label_out is not None and not isinstance(label_out, np.ndarray):
        raise ValueError(
            f"label_out is a {type(label_out).__name__}: the CPU path writes NumPy arrays "
            "(or CPU tensors); render GPU label maps with device='cuda'"
        )
    if out is None:
        target = np.array(image, copy=True)
    else:
        if not isinstance(out, np.ndarray) or out.shape != image.shape:
            raise ValueError("out must be a NumPy array with the image's shape")
        if out.dtype != np.asarray(image[:1, :1, :1]).dtype:
            raise ValueError(f"out has dtype {out.dtype}, image has {image.dtype}")
        target = out

    from . import _cpu_kernels as k

    preset = plan.get_preset()
    tissue = preset.placement.tissue_hu
    cmin, cmax = preset.contrast.min_hu, preset.contrast.max_hu
    sp = plan.spacing
    organ_hu = float(plan.organ_hu) if plan.organ_hu is not None else 0.0
    lo_out, hi_out = _output_range(target.dtype)
    work_dtype = np.float64 if target.dtype == np.float64 else np.float32

    coarse = [tumor_box(t, sp, plan.shape, plan.organ_bbox) for t in plan.tumors]
    live = [i for i, b in enumerate(coarse) if b is not None]
    tissue_win = tissue if tissue is not None else (-np.inf, np.inf)
    is_int = target.dtype.kind in "iu"

    def run_tumor(i: int):
        # Phase 1, one task per tumor: everything is read from the untouched target and
        # rendered into the tumor's own buffers.
        return _render_tumor(
            plan.tumors[i], coarse[i], sp, target, organ_mask, work_dtype, tissue_win, organ_hu, k,
            (plan.organ_noise_hu, plan.organ_noise_grain),
        )  # fmt: skip

    order = sorted(live, key=lambda i: -_volume(coarse[i]))  # big first: the pool ends evenly
    work = sum(_volume(coarse[i]) for i in live)
    rendered = {
        i: r for i, r in zip(order, _map(run_tumor, order, work), strict=True) if r is not None
    }
    boxes = {i: r[0] for i, r in rendered.items()}

    def run_cluster(ids: list[int]):
        # Phase 2, one task per group of overlapping tumors: merge their darkening (strongest
        # wins) and write each box. Writes are idempotent (computed from the copies of the
        # original), and groups have disjoint boxes, so groups run concurrently.
        # Each box gets the strongest change among the tumors overlapping it (pairwise over
        # the overlaps only; no buffer of the group's union).
        deltas = {i: rendered[i][2] for i in ids}
        for i in ids:
            for j in ids:
                if j == i:
                    continue
                ov = _overlap(boxes[i], boxes[j])
                if ov is None:
                    continue
                if deltas[i] is rendered[i][2]:
                    deltas[i] = rendered[i][2].copy()
                k.merge_strongest(deltas[i][_rel(ov, boxes[i])], rendered[j][2][_rel(ov, boxes[j])])
        out = {}
        for i in ids:
            _, orig, _, m = rendered[i]
            n, acc = k.apply_delta(
                target[boxes[i]], orig, deltas[i], m, cmin, cmax, lo_out, hi_out, is_int
            )
            out[i] = (m, int(n), acc / n if n else 0.0)
        return out

    ids_live = sorted(rendered)
    clusters = [[ids_live[g] for g in grp] for grp in _clusters([boxes[i] for i in ids_live])]
    masks: dict[int, tuple[tuple[slice, slice, slice], np.ndarray]] = {}
    stats: dict[int, tuple[int, float]] = {}
    for res in _map(run_cluster, clusters, work):
        for i, (m, n, mc) in res.items():
            masks[i] = (boxes[i], m)
            stats[i] = (n, mc)
    if label_out is not None:
        for sl, m in masks.values():
            label_out[sl][m] = tumor_label

    return assemble(plan, target, organ_mask, stats, masks, affine)


def _stat_fields(n: int, mean_change: float, voxel_mm3: float) -> tuple[float, int, float]:
    """A record's measured fields (``volume_mm3``, ``voxels``, ``mean_contrast_hu``) from
    its voxel count and mean change."""
    return n * voxel_mm3, n, mean_change


def fill_stats(result: RenderResult, stats: dict[int, tuple[int, float]]) -> None:
    """Set the measured fields of ``result``'s records from ``stats`` (tumor index ->
    (voxels, mean change); none: 0 voxels), as :func:`assemble` does: for a result
    assembled before the render's statistics were back (the GPU driver assembles while the
    device works)."""
    fill_records(result.tumors, result.plan.spacing, stats)


def fill_records(records, spacing, stats: dict[int, tuple[int, float]]) -> None:
    """:func:`fill_stats` on a list of records of a plan of voxel ``spacing``."""
    voxel_mm3 = spacing[0] * spacing[1] * spacing[2]
    for i, rec in enumerate(records):
        n, mc = stats.get(i, (0, 0.0))
        rec.volume_mm3, rec.voxels, rec.mean_contrast_hu = _stat_fields(n, mc, voxel_mm3)


def assemble(
    plan: Plan,
    image: Any,
    organ_mask: Any,
    stats: dict[int, tuple[int, float]],
    masks: dict[int, tuple[tuple[slice, slice, slice], Any]],
    affine: np.ndarray | None,
    wrap=None,
    make_mask=None,
    records_later: bool = False,
) -> RenderResult:
    """The :class:`RenderResult` of a render: per-tumor records from ``stats`` (voxel count,
    mean change) and ``masks`` (box, mask on that box), on any backend. With ``make_mask``,
    ``masks`` holds (box, key) and the result's boxes get ``make_mask(key)`` when first read
    (:class:`LazyBoxes`). With ``records_later``, the records are made when first read
    (:class:`LazyRecords`; ``masks`` must not change meanwhile)."""
    boxes = [masks[i] for i in sorted(masks)]
    if records_later:  # (the affine as it is now: a caller may reuse its array)
        aff = None if affine is None else np.array(affine, dtype=np.float64)
        records: Any = LazyRecords(functools.partial(_records, plan, stats, masks, aff),
                                   n=len(plan.tumors))  # fmt: skip
    else:
        records = _records(plan, stats, masks, affine)
    return RenderResult(
        image=image,
        plan=plan,
        tumors=records,
        organ_mask=organ_mask,
        boxes=boxes if make_mask is None else LazyBoxes(boxes, make_mask),
        wrap=wrap,
    )


def _records(plan: Plan, stats, masks, affine) -> list[TumorRecord]:
    """:func:`assemble`'s records."""
    sp = plan.spacing
    voxel_mm3 = sp[0] * sp[1] * sp[2]
    tumors = plan.tumors
    n_t = len(tumors)
    # centres and radii of all tumors at once (Python ints and floats per record)
    num = np.array([(*t.center_vox, *t.radii_mm) for t in tumors], dtype=np.float64)
    num = num.reshape(n_t, 6)
    cvs, radii = num[:, :3], num[:, 3:].tolist()
    cv_int = cvs.astype(np.int64).tolist()
    if affine is not None:
        a = np.asarray(affine, dtype=np.float64)
        # A[:3, :3] v + A[:3, 3], summed in index order, all tumors in one pass
        w = cvs[:, 0:1] * a[:3, 0] + cvs[:, 1:2] * a[:3, 1] + cvs[:, 2:3] * a[:3, 2] + a[:3, 3]
        centres_mm = w.tolist()
    else:
        centres_mm = (cvs * np.asarray(sp, dtype=np.float64)).tolist()
    records = []
    no_stats = (0, 0.0)
    for i, t in enumerate(tumors):
        n, mc = stats.get(i, no_stats)
        b = masks[i][0] if i in masks else None
        records.append(
            TumorRecord(
                t.index,
                t.size_class,
                tuple(cv_int[i]),  # type: ignore[arg-type]
                tuple(centres_mm[i]),  # type: ignore[arg-type]
                tuple(radii[i]),  # type: ignore[arg-type]
                *_stat_fields(n, mc, voxel_mm3),
                t.contrast_hu,
                t.clip_to_organ,
                [[b[0].start, b[0].stop], [b[1].start, b[1].stop], [b[2].start, b[2].stop]]
                if b is not None
                else [],
            )
        )
    return records
