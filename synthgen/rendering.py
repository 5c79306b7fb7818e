"""Render a plan: deterministic, local to each tumor's box, on the CPU backend.

For every tumor, in its own box: the deformed-ellipsoid mask (B-spline displacement and
ellipsoid test fused in one pass), the edge-blurred mask ``B`` (separable Gaussian), the
texture ``T`` (:mod:`synthgen._texture`) and the blend ``I' = I - T * B * D`` inside the organ,
all into buffers of the tumor's own (phase 1, tumors concurrently). Then each group of
overlapping tumors merges its changes (union of masks, strongest change wins) and writes its
boxes (phase 2), so the result does not depend on tumor order or thread count. Nothing
scales with the scan except the optional copy of the output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._geometry import gaussian_kernel1d, prefilter
from ._pool import map_threads as _map
from ._pool import set_num_threads
from ._texture import texture_grid
from .planning import Plan, TumorPlan, _binary, check_arrays

__all__ = ["HU_MAX", "HU_MIN", "RenderResult", "TumorRecord", "render", "set_num_threads"]

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
    boxes, so rendering in place (``out=``) allocates nothing of the scan's size.
    """

    image: np.ndarray
    plan: Plan
    tumors: list[TumorRecord]
    organ_mask: Any
    boxes: list[tuple[tuple[slice, slice, slice], np.ndarray]] = field(repr=False)
    _tumor_mask: np.ndarray | None = field(default=None, repr=False)
    _label: np.ndarray | None = field(default=None, repr=False)

    def write_tumor_mask(self, out: np.ndarray) -> np.ndarray:
        """OR the tumor voxels into a caller-owned boolean array (boxes only)."""
        for sl, m in self.boxes:
            out[sl] |= m
        return out

    @property
    def tumor_mask(self) -> np.ndarray:
        """Boolean mask of all tumor voxels (full volume, built once)."""
        if self._tumor_mask is None:
            self._tumor_mask = self.write_tumor_mask(np.zeros(self.plan.shape, dtype=bool))
        return self._tumor_mask

    @property
    def label(self) -> np.ndarray:
        """uint8 label map: 0 background, 1 organ, 2 tumor (full volume, built once)."""
        if self._label is None:
            lab = _binary(np.asarray(self.organ_mask)).astype(np.uint8)
            for sl, m in self.boxes:
                lab[sl][m] = 2
            self._label = lab
        return self._label


def _bound_mm(t: TumorPlan) -> np.ndarray:
    rot = t.rotation_matrix
    return np.sqrt(((rot * np.asarray(t.radii_mm)[None, :]) ** 2).sum(axis=1))


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
) -> tuple[slice, slice, slice] | None:
    """The voxel box a tumor can touch (mask, blur and blend), clipped to the scan.

    A conservative box first: the mask lies within ``radius bound + max |displacement|`` of
    the centre (the interpolating cubic spline overshoots its control values by at most
    1.6x), intersected with the organ's bounding box for a clipped tumor. The shape is then
    evaluated on a 4 mm grid inside it and the box shrunk to the hull of the inside points
    plus two grid steps, plus ``3 sigma`` of blur. ``None`` when the tumor misses the scan.
    """
    from . import _cpu_kernels as k

    dmax = 1.6 * float(np.abs(t.displacement).max()) if t.displacement.size else 0.0
    ext = _bound_mm(t) + dmax
    lo, hi = [], []
    for a in range(3):
        r = math.ceil(ext[a] / spacing[a]) + 1
        a_lo, a_hi = t.center_vox[a] - r, t.center_vox[a] + r + 1
        if organ_bbox is not None and t.clip_to_organ:
            a_lo, a_hi = max(a_lo, organ_bbox[a][0]), min(a_hi, organ_bbox[a][1])
        lo.append(max(0, a_lo))
        hi.append(min(int(shape[a]), a_hi))
        if hi[a] <= lo[a]:
            return None
    # Coarse pass: where is the shape really?
    step = [max(1, int(COARSE_STEP_MM / spacing[a])) for a in range(3)]
    idx = [np.arange(lo[a], hi[a], step[a]) for a in range(3)]
    pos = [(idx[a] - t.center_vox[a]) * spacing[a] for a in range(3)]
    ctrl, w, pos32, m = _shape_inputs(t, pos)
    shp = tuple(len(i) for i in idx)
    ones = np.ones((1, 1, 1), dtype=np.bool_)
    zero = np.zeros((1, 1, 1), dtype=np.float32)
    coarse = np.empty(shp, dtype=np.bool_)
    bcast = [np.broadcast_to(a, shp) for a in (ones, zero)]
    k.shape_mask(ctrl, *w, *pos32, m, bcast[0], bcast[1], -np.inf, np.inf, False, coarse)
    pad_mm = BLUR_TRUNCATE * t.blur_sigma_mm
    hit = k.bbox(coarse)
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
):
    """Render one tumor from the untouched scan into buffers of its own.

    The shape is evaluated on ``box`` (the conservative box of :func:`tumor_box`); the box is
    then shrunk to the mask's exact extent plus the blur's reach before the blur, texture and
    blend passes. Returns ``(box, orig, delta, mask)`` on the shrunk box, or ``None`` when
    the tumor has no voxel (clipped away, outside the tissue window).
    """
    orig = np.array(target[box], dtype=work_dtype, copy=True)
    orig32 = orig if work_dtype == np.float32 else orig.astype(np.float32)
    organ = np.ascontiguousarray(_binary(np.asarray(organ_mask[box])))
    pos = [(np.arange(box[a].start, box[a].stop) - t.center_vox[a]) * spacing[a] for a in range(3)]
    tlo, thi = np.float32(tissue[0]), np.float32(tissue[1])
    # Shape: B-spline displacement + ellipsoid test, fused.
    ctrl, w, pos32, m = _shape_inputs(t, pos)
    mask = np.empty(orig.shape, dtype=np.bool_)
    k.shape_mask(ctrl, *w, *pos32, m, organ, orig32, tlo, thi, t.clip_to_organ, mask)
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
    # Edge blur B of the mask (separable, zero padded, scipy-normalised kernel).
    kern = [
        gaussian_kernel1d(t.blur_sigma_mm / spacing[a], BLUR_TRUNCATE).astype(np.float32)
        for a in range(3)
    ]
    n = orig.shape
    r = [(kk.size - 1) // 2 for kk in kern]
    blur = k.toeplitz_contract3(
        mask.view(np.uint8), -r[0], kern[0], n[0], -r[1], kern[1], n[1], -r[2], kern[2], n[2]
    )
    # Texture on its block grid, interpolated inside the blend kernel.
    lo = tuple(float(p[0]) for p in pos)
    hi = tuple(float(p[-1]) for p in pos)
    tgrid, origin, step = texture_grid(t.seed, t.texture, lo, hi, k)
    ic = [k.interp_coords_nb(pos[a], origin[a], step, tgrid.shape[a]) for a in range(3)]
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
    )
    return new_box, orig, delta, mask


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
    device: str = "cpu",
    affine: np.ndarray | None = None,
) -> RenderResult:
    """Apply a plan to a scan, deterministically.

    Args:
        plan: The plan (from :func:`synthgen.plan` or :meth:`Plan.from_json`).
        image: The CT (HU) the plan was made for; never modified unless it is ``out``.
        organ_mask: Organ mask on the same grid (bool or numbers binarised at > 0.5).
        out: Caller-owned array of the image's shape and dtype that already holds the image
            (it may be ``image`` itself): only the tumors' boxes are read and written.
            Without it a copy of ``image`` is made and returned.
        device: ``"cpu"`` (``"auto"`` picks it for NumPy arrays).
        affine: Optional voxel-to-world affine, only used to report centres in world mm.

    Returns:
        A :class:`RenderResult` (image, lazily built tumor mask and label, per-tumor records).

    Raises:
        ValueError: Shapes or spacing that do not match the plan, or a bad ``out``.
    """
    if device not in ("cpu", "auto"):
        raise ValueError(
            f"device {device!r} is not available in this version of synthgen (CPU backend "
            "only); use device='cpu'"
        )
    check_arrays(image, organ_mask)
    if tuple(image.shape) != tuple(plan.shape):
        raise ValueError(f"plan is for shape {tuple(plan.shape)}, image is {tuple(image.shape)}")
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
            plan.tumors[i], coarse[i], sp, target, organ_mask, work_dtype, tissue_win, organ_hu, k
        )

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

    voxel_mm3 = sp[0] * sp[1] * sp[2]
    records = []
    for i, t in enumerate(plan.tumors):
        n, mc = stats.get(i, (0, 0.0))
        cv = np.asarray(t.center_vox, dtype=np.float64)
        if affine is not None:
            cmm = np.asarray(affine, dtype=np.float64) @ np.append(cv, 1.0)
            center_mm = tuple(float(x) for x in cmm[:3])
        else:
            center_mm = tuple(float(x) for x in cv * np.asarray(sp))
        b = boxes.get(i)
        records.append(
            TumorRecord(
                index=t.index,
                size_class=t.size_class,
                center_vox=tuple(int(x) for x in t.center_vox),  # type: ignore[arg-type]
                center_mm=center_mm,  # type: ignore[arg-type]
                radii_mm=tuple(float(r) for r in t.radii_mm),  # type: ignore[arg-type]
                volume_mm3=n * voxel_mm3,
                voxels=n,
                mean_contrast_hu=mc,
                contrast_hu=t.contrast_hu,
                clipped=t.clip_to_organ,
                box=[[s.start, s.stop] for s in b] if b is not None else [],
            )
        )
    return RenderResult(
        image=target,
        plan=plan,
        tumors=records,
        organ_mask=organ_mask,
        boxes=[masks[i] for i in sorted(masks)],
    )
