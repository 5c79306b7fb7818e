"""Hollow organs (colon, esophagus): tumors as thickened wall segments, never gas made darker.

A hollow-organ mask covers the wall *and* the lumen (gas, fluid, stool; REFERENCE section 3),
so the ellipsoid recipe ``I' = I - T * B * D`` would subtract HU from gas. A preset with a
``[wall]`` table draws wall tumors instead (``TumorPlan.kind == "wall"``; the numbers live in
``TumorPlan.wall``), in three modes:

* ``annular``: the wall thickens around the whole circumference ("apple core");
* ``eccentric``: the wall thickens over an arc of ``arc_deg`` degrees centred on ``normal``;
* ``polypoid``: a half-ellipsoid mass sits on the wall at ``normal`` and reaches into the lumen.

**Planning** (host, local to a box around one organ voxel; never a full-volume pass). A wall
voxel ``p0`` is drawn with the preset's placement rules. In a box of half-size ``h`` (40 mm,
grown to three local radii for a wide colon) the organ's connected component through ``p0``
and its Euclidean distance transform (EDT, mm) give the local radius ``R`` (largest EDT
within ``h / 2`` of ``p0``); the principal direction of the component's core (EDT >= R / 2)
is the local lumen axis ``axis``; the centroid of the cross-section through ``p0`` is the
centre ``center_vox`` (voxel units, float). ``reach_mm`` bounds the render region: the
component's largest distance from the axis over the segment, plus a voxel and a half.

**Geometry** (mm, in the frame of the scan's voxel axes scaled by the spacing). For a voxel
``x`` with axial coordinate ``s = (x - c) . axis``, the planned thickness is
``T(s) = thickness_mm * taper(s) * (1 + irregularity * u(x))``: ``taper`` is 1 on the central
part of the segment (``|s| <= half_length_mm - shoulder_mm``) and falls to 0 at
``|s| = half_length_mm`` along a raised cosine (the tapering shoulders); ``u`` in [-1, 1] is the
tumor's texture field, centred and scaled (a lobulated inner surface). "Outer wall" voxels are
organ voxels with a face neighbour outside the organ (annular: all of them; eccentric: those
within ``arc_deg / 2`` of ``normal`` around the axis). The wall tumor is the organ voxels of
the component whose distance to the outer wall is at most ``T(s)``: the wall grows *inward*,
replacing lumen gas, fluid or stool, from the organ's outer boundary up to ``thickness_mm``
(capped by the lumen: a thickness above the local radius closes the lumen). A polyp is the
organ voxels inside the ellipsoid centred on the outer wall point in direction ``normal``
(semi-axes ``half_length_mm`` along the axis and around it, ``height_mm`` towards the axis).

**Appearance.** Inside the region the image becomes enhancing soft tissue:
``V = tissue_hu + texture_gain_hu * (tex - 0.5) + noise`` where ``tex`` is the tumor's
published texture (:mod:`synthgen._texture`, mean about 0.5) and ``noise`` white noise (the
counter-based hash, as the appearance modes' noise) of ``noise_hu``: the scan's own noise,
measured at planning as the robust SD of the 3x3x3 high-pass of soft-tissue voxels around
the tumor. The edge towards the lumen and the shoulders blend over the edge blur
``blur_sigma_mm``: weight ``w = clip(0.5 + (T(s) - d) / (2 sigma), 0, 1) * clip(T(s) / sigma,
0, 1)`` with ``d`` the distance to the outer wall; the output is ``I + w (V - I)``, i.e.
``delta = w (I - V)`` for the shared write-back of :mod:`synthgen.rendering` (strongest change
wins where tumors overlap). Outside the organ component nothing changes (the outer boundary
is the organ's own).

**Label.** The thickened wall: every voxel with ``w >= 0.5`` whose written value is at least
-150 HU, i.e. the original wall under the segment plus the tissue that replaced lumen
content. A blended voxel below that (the partial-volume fringe facing gas) is left out of the
label, so the label never holds a voxel below -200 HU (the QA ``gas_voxels`` check).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._draws import uniform
from ._hash import stream_key

__all__ = [
    "LABEL_MIN_HU",
    "WALL_MODES",
    "draw_wall",
    "locate_wall",
    "render_wall",
    "wall_box",
]

WALL_MODES = ("annular", "eccentric", "polypoid")
#: Written value a voxel needs to be labelled tumor (HU): 50 HU of margin above the QA's gas
#: threshold of -200 HU.
LABEL_MIN_HU = -150.0
#: Planning estimates the lumen's geometry on a grid this far apart (mm).
PLAN_GRID_MM = 3.0
#: Voxels of a component's box from which its blend runs in ranges of rows on the thread
#: pool (some 6 ns a voxel of the box on one thread).
BLEND_PARALLEL_VOXELS = 65_536
#: Half-size of the box around the wall voxel where the scan's noise is measured (mm).
NOISE_BOX_MM = 20.0
#: Hash stream of a wall tumor's tissue noise (the appearance modes use 3 to 6).
STREAM_WALL_NOISE = 7
#: Half-size of the planning box around the drawn wall voxel, mm (grown for wide lumens).
PLAN_BOX_MM = 40.0
PLAN_BOX_MAX_MM = 120.0
#: Soft-tissue window of the noise measurement, HU.
NOISE_WINDOW_HU = (-150.0, 250.0)


# --------------------------------------------------------------------------------------
# planning
# --------------------------------------------------------------------------------------


def draw_wall(
    rng: np.random.Generator, wall: Any, half_length_mm: float, thickness_mm, modes=None
) -> dict:
    """Every random number of one wall tumor except its position (drawn from ``rng``).

    Args:
        rng: The plan's generator.
        wall: The preset's :class:`~synthgen.presets.WallParams`.
        half_length_mm: Half-length of the segment (the size class's radius draw), mm.
        thickness_mm: ``[low, high]`` of the wall thickness to reach, mm.
        modes: Mode weights (the size class's ``wall_modes``); ``None``: ``wall.modes``.
    """
    modes = wall.modes if modes is None else modes
    names = list(modes)
    w = np.array([modes[n] for n in names], dtype=np.float64)
    mode = names[int(rng.choice(len(names), p=w / w.sum()))]
    d = {
        "mode": mode,
        "half_length_mm": float(half_length_mm),
        "thickness_mm": uniform(rng, *thickness_mm),
        "shoulder_mm": uniform(rng, *wall.shoulder) * float(half_length_mm),
        "arc_deg": 360.0 if mode == "annular" else uniform(rng, *wall.arc_deg),
        "normal_angle": uniform(rng, 0.0, 2.0 * math.pi),
        "height_mm": uniform(rng, *wall.polyp_height) * float(half_length_mm),
        "tissue_hu": uniform(rng, *wall.tissue_hu),
        "texture_gain_hu": uniform(rng, *wall.texture_gain_hu),
        "irregularity": uniform(rng, *wall.irregularity),
    }
    return d


def _box_around(c, half_mm: float, sp, shape) -> tuple[slice, slice, slice]:
    out = []
    for a in range(3):
        r = math.ceil(half_mm / sp[a])
        ca = round(float(c[a]))
        out.append(slice(max(0, ca - r), min(int(shape[a]), ca + r + 1)))
    return tuple(out)  # type: ignore[return-value]


def _coords_mm(box, sp, origin) -> list[np.ndarray]:
    """Per-axis mm offsets of the box's voxels from ``origin`` (voxel units), broadcastable."""
    out = []
    for a in range(3):
        v = (np.arange(box[a].start, box[a].stop, box[a].step or 1) - float(origin[a])) * sp[a]
        shp = [1, 1, 1]
        shp[a] = v.size
        out.append(v.reshape(shp))
    return out


def _component(m: np.ndarray, seed_idx, pad: int = 0) -> tuple[np.ndarray, list[int]] | None:
    """The 26-connected component of ``m`` through ``seed_idx`` (or the nearest ``m`` voxel:
    the first in C order of the nearest), by a flood fill from it (``component_box``: the
    component ``ndimage.label`` gives, at the cost of the component): ``(comp, lo)``, the
    component cropped to its bounding box grown by ``pad`` voxels (within ``m``) and the
    box's first index per axis; ``None`` when ``m`` has no voxel."""
    from ._cpu_kernels import component_box

    m = np.ascontiguousarray(m, dtype=bool)
    s = tuple(int(np.clip(seed_idx[a], 0, m.shape[a] - 1)) for a in range(3))
    if not m[s]:
        idx = np.argwhere(m)
        if idx.size == 0:
            return None
        s = tuple(int(v) for v in idx[int(np.argmin(((idx - np.asarray(s)) ** 2).sum(axis=1)))])
    comp, *lo = component_box(m, *s, pad)
    return comp, lo


def _frame(axis: np.ndarray, angle: float) -> np.ndarray:
    """Unit vector perpendicular to ``axis`` at ``angle`` (a fixed basis per axis)."""
    e = np.zeros(3)
    e[int(np.argmin(np.abs(axis)))] = 1.0
    u1 = e - (e @ axis) * axis
    u1 /= np.linalg.norm(u1)
    u2 = np.cross(axis, u1)
    return math.cos(angle) * u1 + math.sin(angle) * u2


def locate_wall(
    image: Any,
    organ_mask: Any,
    p0: Sequence[int],
    spacing: Sequence[float],
    draws: dict,
) -> dict:
    """Local lumen axis, centre and reach around the wall voxel ``p0`` (see the module doc).

    Reads only a box of at most ``2 * PLAN_BOX_MAX_MM`` around ``p0``. Returns the wall dict
    of the plan (``draws`` plus ``center_vox``, ``axis``, ``normal``, ``radius_mm``,
    ``reach_mm``, ``noise_hu``).
    """
    from ._cpu_kernels import soft_residuals
    from ._edt import distance_transform_edt

    sp = np.asarray(spacing, dtype=np.float64)
    shape = organ_mask.shape
    # The geometry is estimated on a grid about PLAN_GRID_MM apart (every st-th voxel): the
    # lumen's radius, axis and centre need no finer, and the distance transform of a wide
    # colon's box costs 8-27x less.
    st = [max(1, round(PLAN_GRID_MM / sp[a])) for a in range(3)]
    spg = sp * st
    h = PLAN_BOX_MM
    for _ in range(3):
        full = _box_around(p0, h, sp, shape)
        box = tuple(slice(b.start, b.stop, st[a]) for a, b in enumerate(full))
        org = np.asarray(organ_mask[box])
        org = org if org.dtype == np.bool_ else org > 0.5
        local = [(int(p0[a]) - box[a].start) // st[a] for a in range(3)]
        # The component's bounding box and a voxel around it (where in the box): the
        # distances of its voxels are those of the whole box (each voxel's nearest voxel
        # outside the component is in that frame: moved into it, a voxel outside comes no
        # farther from any voxel inside), and everything below reads only its voxels.
        found = _component(org, local, pad=1)
        start0, cl = [b.start for b in box], [0, 0, 0]
        if found is None:
            comp = np.zeros(org.shape, dtype=bool)
        else:
            comp, cl = found
            box = tuple(
                slice(box[a].start + cl[a] * st[a], box[a].start + (cl[a] + comp.shape[a]) * st[a],
                      st[a])
                for a in range(3)
            )  # fmt: skip
        edt = distance_transform_edt(comp, sampling=spg)
        x = _coords_mm(box, sp, p0)
        d2 = x[0] ** 2 + x[1] ** 2 + x[2] ** 2
        near = comp & (d2 <= (0.5 * h) ** 2)
        radius = float(edt[near].max()) if near.any() else float(sp.max())
        if radius <= 0.35 * h or h >= PLAN_BOX_MAX_MM:
            break
        h = min(PLAN_BOX_MAX_MM, max(3.0 * radius, 1.5 * h))
    # Axis: principal direction of the component's core (the thick part around the
    # centreline), within the box's ball.
    core = comp & (edt >= 0.5 * radius) & (d2 <= h * h)
    if core.sum() < 10:
        core = comp
    idx = np.argwhere(core).astype(np.float64)
    pts = (idx * st + [b.start for b in box]) * sp
    cov = np.cov((pts - pts.mean(axis=0)).T) if len(pts) > 1 else np.eye(3)
    evals, evecs = np.linalg.eigh(cov)
    axis = evecs[:, int(np.argmax(evals))]
    axis = axis / np.linalg.norm(axis)
    if axis[int(np.argmax(np.abs(axis)))] < 0:
        axis = -axis
    # Centre: centroid of the cross-section through p0.
    s0 = x[0] * axis[0] + x[1] * axis[1] + x[2] * axis[2]
    slab = comp & (np.abs(s0) <= 0.75 * spg.max()) & (d2 <= (3.0 * radius + spg.max()) ** 2)
    if not slab.any():
        slab = comp & (d2 <= (radius + spg.max()) ** 2)
    cidx = (np.argwhere(slab) + cl).astype(np.float64)  # (the uncropped box's indices)
    centre = cidx.mean(axis=0) * st + start0
    # Reach: the component's largest distance from the axis over the segment.
    xc = _coords_mm(box, sp, centre)
    s = xc[0] * axis[0] + xc[1] * axis[1] + xc[2] * axis[2]
    rho2 = xc[0] ** 2 + xc[1] ** 2 + xc[2] ** 2 - s * s
    half = draws["half_length_mm"] + draws["thickness_mm"]
    seg = comp & (np.abs(s) <= half) & (rho2 <= (3.0 * radius + spg.max()) ** 2)
    reach = float(np.sqrt(rho2[seg].max())) if seg.any() else radius
    # capped at twice the inscribed radius: a flexure's other limb is not this segment; plus
    # a grid step and a half (the coarse grid's reach is short of the voxels' by < 1 step)
    reach = min(reach, 2.0 * radius) + 1.5 * float(spg.max())
    reach = min(reach, h)
    # The scan's noise: robust SD of the 3x3x3 high-pass over soft tissue (x sqrt(27/26):
    # exact for white noise).
    img = np.asarray(image[_box_around(p0, NOISE_BOX_MM, sp, shape)], dtype=np.float32)
    # (soft_residuals: SciPy's binary_erosion and uniform_filter, the same float32 values)
    res = soft_residuals(np.ascontiguousarray(img), *NOISE_WINDOW_HU)
    noise = 0.0
    if res.size >= 50:
        mad = float(np.median(np.abs(res - np.median(res))))
        noise = float(min(1.4826 * mad * math.sqrt(27.0 / 26.0), 50.0))
    normal = _frame(axis, draws["normal_angle"])
    out = dict(draws)
    out.update(
        center_vox=[float(v) for v in centre],
        axis=[float(v) for v in axis],
        normal=[float(v) for v in normal],
        radius_mm=radius,
        reach_mm=float(reach),
        noise_hu=noise,
    )
    return out


# --------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------


def wall_box(
    t: Any,
    spacing: Sequence[float],
    shape: Sequence[int],
    organ_bbox: Sequence[Sequence[int]] | None = None,
) -> tuple[slice, slice, slice] | None:
    """The voxel box a wall tumor reads and can touch (its cylinder, clipped to the organ's
    bounding box grown by one voxel and to the scan); ``None`` when it misses the scan."""
    w = t.wall
    axis = np.asarray(w["axis"], dtype=np.float64)
    c = w["center_vox"]
    half_ax = w["half_length_mm"] + max(w["thickness_mm"], w.get("height_mm", 0.0))
    out = []
    for a in range(3):
        ext = abs(axis[a]) * half_ax + math.sqrt(max(0.0, 1.0 - axis[a] ** 2)) * w["reach_mm"]
        r = math.ceil(ext / spacing[a]) + 2
        lo, hi = math.floor(c[a]) - r, math.ceil(c[a]) + r + 1
        if organ_bbox is not None:
            lo, hi = max(lo, organ_bbox[a][0] - 1), min(hi, organ_bbox[a][1] + 1)
        lo, hi = max(0, lo), min(int(shape[a]), hi)
        if hi <= lo:
            return None
        out.append(slice(lo, hi))
    return tuple(out)  # type: ignore[return-value]


def render_wall(
    t: Any,
    box: tuple[slice, slice, slice],
    spacing: Sequence[float],
    target: Any,
    organ_mask: Any,
    work_dtype: type = np.float32,
):
    """Render one wall tumor from the untouched scan (see the module docstring).

    The work grows with the tumor's component, not with its box: a flood fill from the centre
    tests the cylinder only at the voxels it reaches, and the outer wall, the distance
    transform, the texture's samples, the noise and the change are made on the component's
    bounding box (the texture's grid is still the whole box's: its rescale is measured
    there), the float operations of the NumPy expressions kept (``tests/test_hollow.py``
    holds them as the reference, bit for bit).

    Args:
        t: The :class:`~synthgen.planning.TumorPlan` (``kind == "wall"``).
        box: Its box from :func:`wall_box`.
        spacing: Voxel size, mm.
        target: The scan (one read: the component's bounding box within ``box``; a host
            array or anything whose items ``np.asarray`` accepts).
        organ_mask: The organ mask (one read, ``organ_mask[box]``).
        work_dtype: dtype of the returned copy of the original (float32, float64 for a
            float64 scan).

    Returns:
        ``(box, orig, delta, mask)`` shrunk to the changed voxels, as the ellipsoid renderer
        returns them (``delta`` float32, ``orig - delta`` is the new value; ``mask`` the
        label), or ``None`` when the tumor changes nothing.
    """

    from ._cpu_kernels import (
        cylinder_mask,
        outer_wall,
        wall_arc,
        wall_blend_rows,
        wall_component,
    )
    from ._edt import distance_transform_edt
    from ._pool import map_threads, row_ranges
    from ._texture import texture_lookup

    w = t.wall
    sp = np.asarray(spacing, dtype=np.float64)
    org = np.asarray(organ_mask[box])
    org = np.ascontiguousarray(org if org.dtype == np.bool_ else org > 0.5)
    c = np.asarray(w["center_vox"], dtype=np.float64)
    axis = np.asarray(w["axis"], dtype=np.float64)
    normal = np.asarray(w["normal"], dtype=np.float64)
    half = float(w["half_length_mm"])
    thick = float(w["thickness_mm"])
    mode = w["mode"]
    reach = float(w["reach_mm"])
    axial = max(half, 0.0) + max(thick, float(w.get("height_mm", 0.0))) + float(sp.max())
    # The component of the organ's voxels in the cylinder (|s| <= axial, rho <= reach)
    # through the centre: a flood fill that tests only the voxels it reaches. Everything
    # after it works on the component's bounding box ("crop"): nothing outside the
    # component changes, and the wall voxels (the distance transform's features) are in it.
    xb = [v.ravel() for v in _coords_mm(box, sp, c)]  # (the box's mm offsets per axis)
    seed = [int(np.clip(round(c[a] - box[a].start), 0, org.shape[a] - 1)) for a in range(3)]
    comp, *lo = wall_component(org, *seed, *xb, *axis, axial, reach)
    if lo[0] < 0:  # the centre is not in the cylinder: the cylinder's voxel nearest it
        found = _component(cylinder_mask(org, *xb, *axis, axial, reach), seed)
        if found is None:
            return None
        comp, lo = found
    wall = outer_wall(comp, org, *lo)
    sub = tuple(slice(lo[a], lo[a] + comp.shape[a]) for a in range(3))
    crop = tuple(slice(box[a].start + sub[a].start, box[a].start + sub[a].stop) for a in range(3))
    orig = np.array(np.asarray(target[crop]), dtype=work_dtype, copy=True)
    x = [xb[a][sub[a]] for a in range(3)]
    sigma = max(float(t.blur_sigma_mm), 1e-3)
    y = x
    dist = np.zeros((1, 1, 1))
    if mode == "polypoid":
        # The outer wall point in direction ``normal`` at s = 0: the median distance from
        # the axis of the outer wall within 25 degrees of it.
        _, rho = wall_arc(wall, *x, *axis, *normal, 1.5 * sp.max(), math.cos(math.radians(25.0)))
        r_w = float(np.median(rho)) if rho.size else float(w["radius_mm"])
        q = c * sp + r_w * normal  # mm, absolute voxel frame
        y = [v.ravel() for v in _coords_mm(crop, sp, q / sp)]
    else:
        if mode == "eccentric":
            cmin = math.cos(math.radians(0.5 * float(w["arc_deg"])))
            wall, _ = wall_arc(wall, *x, *axis, *normal, math.inf, cmin)
        if not wall.any():
            return None
        dist = distance_transform_edt(~wall, sampling=sp)
    # Texture (published recipe, positions relative to the centre; the grid and its rescale
    # are the whole box's), sampled at the component's voxels by the blend.
    grid, ti = texture_lookup(t.seed, t.texture, xb, at=x)
    # The tissue: enhancing soft tissue + texture + the scan's noise, from the counter-based
    # hash of (tumor, voxel offset from its centre), as every per-voxel random number.
    keys = np.asarray([*stream_key(t.seed, STREAM_WALL_NOISE), 0, 0], dtype=np.uint32)
    off = np.asarray([crop[a].start - round(float(c[a])) for a in range(3)], dtype=np.int64)
    prm = np.array(
        [
            1.0 if mode == "polypoid" else 0.0,
            *axis,
            *normal,
            half,
            float(w.get("shoulder_mm", 0.0)),  # (a polyp has no shoulders)
            thick,
            float(w["irregularity"]),
            sigma,
            float(w["tissue_hu"]),
            float(w["texture_gain_hu"]),
            float(w.get("noise_hu", 0.0)),
            max(half, 1e-3),
            max(float(w.get("height_mm", 0.0)), 1e-3),
            LABEL_MIN_HU,
        ]
    )
    args = (comp, orig, dist, *x, *y, prm, grid, *(v for p in ti for v in p), keys, off)
    delta = np.zeros(comp.shape, dtype=np.float32)
    mask = np.zeros(comp.shape, dtype=np.bool_)
    # (large boxes: ranges of rows on the thread pool, their bounds merged)
    rows = row_ranges(comp.shape[0], comp.size, BLEND_PARALLEL_VOXELS)
    b = np.array(map_threads(lambda r: wall_blend_rows(*args, delta, mask, *r), rows))
    lo0, lo1, lo2 = (int(b[:, k].min()) for k in (0, 2, 4))
    hi0, hi1, hi2 = (int(b[:, k].max()) for k in (1, 3, 5))
    if hi0 < lo0:
        return None
    sub = (slice(lo0, hi0 + 1), slice(lo1, hi1 + 1), slice(lo2, hi2 + 1))
    new_box = tuple(
        slice(crop[a].start + sub[a].start, crop[a].start + sub[a].stop) for a in range(3)
    )
    return (
        new_box,
        np.ascontiguousarray(orig[sub]),
        np.ascontiguousarray(delta[sub]),
        np.ascontiguousarray(mask[sub]),
    )
