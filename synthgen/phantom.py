"""Deterministic synthetic abdominal CT phantoms.

Two generators are provided:

* :func:`make_phantom` builds a stylised contrast-enhanced (portal-venous) abdominal CT with
  body wall, spine, solid organs, vessels and hollow viscera, at any shape and voxel spacing.
* :func:`benchmark_phantom` builds the fixed benchmark phantom (body cylinder + ellipsoidal
  liver at 1 mm isotropic) used for timing and reference comparisons.

Conventions shared by both generators:

* Arrays are indexed ``[i, j, k]`` = ``(x, y, z)`` in the NIfTI RAS+ convention: ``i`` increases
  towards the patient's Right, ``j`` towards Anterior and ``k`` towards Superior.
* The affine is ``diag(spacing)`` with a translation that puts the centre of the voxel grid at
  world ``(0, 0, 0)`` mm, so world coordinate ``x = (i - (nx - 1) / 2) * spacing[0]``.
* Images are ``np.int16`` Hounsfield units (HU); label maps are ``np.uint8`` with ids from
  :data:`LABELS` (0 = background / unlabelled tissue).
* Noise comes exclusively from ``np.random.default_rng(seed)``: the same ``(shape, spacing,
  seed)`` always yields byte-identical arrays.

In :func:`make_phantom` every structure is defined in physical millimetres relative to the
volume centre, so the same anatomy has the same physical size whatever the spacing. The
anatomy fits in a field of view of about 380 x 300 x 320 mm (x, y, z); smaller fields of view
crop it. Structures are painted in a fixed order and later structures overwrite earlier ones,
so label masks never overlap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["LABELS", "Phantom", "benchmark_phantom", "make_phantom"]

LABELS: dict[str, int] = {
    "liver": 1,
    "spleen": 2,
    "pancreas": 3,
    "kidney_left": 4,
    "kidney_right": 5,
    "aorta": 6,
    "postcava": 7,
    "hepatic_vessel": 8,
    "colon": 9,
    "esophagus": 10,
    "uterus": 11,
    "stomach": 12,
    "spine": 13,
}
"""Structure name -> label id used in :attr:`Phantom.labels` (0 is background)."""

_ALIASES: dict[str, tuple[str, ...]] = {"kidney": ("kidney_left", "kidney_right")}

# Nominal HU values (before noise) of the structures painted by make_phantom.
_HU: dict[str, int] = {
    "air": -1000,
    "subcutaneous_fat": -100,
    "visceral_fat": -90,
    "muscle": 50,
    "bowel": 30,
    "cortical_bone": 700,
    "cancellous_bone": 250,
    "posterior_elements": 450,
    "disc": 90,
    "csf": 15,
    "liver": 100,
    "hepatic_vessel": 170,
    "spleen": 115,
    "pancreas": 105,
    "kidney_cortex": 170,
    "kidney_medulla": 125,
    "aorta": 180,
    "postcava": 140,
    "gi_wall": 40,
    "stomach_wall": 45,
    "gas": -1000,
    "fluid": 10,
    "stool": 20,
    "stomach_content": 15,
    "uterus": 90,
}

_HU_MIN, _HU_MAX = -1024, 3071
_NOISE_SIGMA_VOX = 0.7
_NOISE_STD_HU = 10.0

# Body cross-section (mm): outer skin ellipse, subcutaneous fat and muscle ring thicknesses.
_BODY_SEMI = (170.0, 125.0)
_FAT_MM = 15.0
_MUSCLE_MM = 12.0

_Box = tuple[slice, slice, slice]


@dataclass
class Phantom:
    """A synthetic CT volume with its label map.

    Attributes:
        image: CT intensities in HU, ``np.int16``, shape ``(nx, ny, nz)`` indexed ``(x, y, z)``
            in RAS+ voxel order.
        labels: Label map, ``np.uint8``, same shape as ``image``; ids from :data:`LABELS`,
            0 for background and unlabelled tissue.
        spacing: Voxel size in mm along ``(x, y, z)``.
        affine: 4x4 ``float64`` voxel-to-world (RAS+, mm) matrix, ``diag(spacing)`` with the
            volume centre at world ``(0, 0, 0)``.
    """

    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in mL (1 mL = 1000 mm^3)."""
        return float(np.prod(self.spacing)) / 1000.0

    @property
    def organ_names(self) -> tuple[str, ...]:
        """Names of the :data:`LABELS` structures present (>= 1 voxel), in label-id order."""
        counts = np.bincount(self.labels.ravel(), minlength=256)
        return tuple(name for name, idx in LABELS.items() if counts[idx] > 0)

    def mask(self, name: str) -> np.ndarray:
        """Boolean mask of one structure.

        Args:
            name: A key of :data:`LABELS`, or ``"kidney"`` for the union of both kidneys.

        Returns:
            ``bool`` array with the shape of :attr:`image` (all False if the structure is
            absent, e.g. cropped out of the field of view).

        Raises:
            ValueError: If ``name`` is not a known structure name.
        """
        if name in _ALIASES:
            ids = [LABELS[part] for part in _ALIASES[name]]
            return np.isin(self.labels, ids)
        if name not in LABELS:
            valid = ", ".join([*LABELS, *_ALIASES])
            raise ValueError(f"unknown structure {name!r}; valid names: {valid}")
        return self.labels == LABELS[name]

    def volume_ml(self, name: str) -> float:
        """Volume of a structure in mL (see :meth:`mask` for accepted names)."""
        return float(np.count_nonzero(self.mask(name))) * self.voxel_volume_ml


# --------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------


class _Grid:
    """Voxel-centre coordinates (mm) of a regular grid, as per-axis float32 vectors."""

    def __init__(
        self,
        shape: Sequence[int],
        spacing: Sequence[float],
        origin: Sequence[float] | None = None,
    ) -> None:
        if len(shape) != 3 or len(spacing) != 3:
            raise ValueError(f"shape and spacing must have 3 entries, got {shape}, {spacing}")
        self.shape = tuple(int(n) for n in shape)
        self.spacing = tuple(float(s) for s in spacing)
        if min(self.shape) < 1:
            raise ValueError(f"shape must be positive, got {shape}")
        if min(self.spacing) <= 0:
            raise ValueError(f"spacing must be positive, got {spacing}")
        if origin is None:
            origin = [-(n - 1) / 2.0 * s for n, s in zip(self.shape, self.spacing, strict=True)]
        self.origin = tuple(float(o) for o in origin)
        self.axes = tuple(
            (o + s * np.arange(n, dtype=np.float64)).astype(np.float32)
            for o, s, n in zip(self.origin, self.spacing, self.shape, strict=True)
        )

    @property
    def affine(self) -> np.ndarray:
        aff = np.diag([*self.spacing, 1.0])
        aff[:3, 3] = self.origin
        return aff

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> _Box | None:
        """Index slices covering the world box ``[lo, hi]`` (mm), or None if outside."""
        out = []
        for o, s, n, a, b in zip(self.origin, self.spacing, self.shape, lo, hi, strict=True):
            i0 = max(int(np.floor((a - o) / s)), 0)
            i1 = min(int(np.ceil((b - o) / s)) + 1, n)
            if i0 >= i1:
                return None
            out.append(slice(i0, i1))
        return out[0], out[1], out[2]

    def coords(self, box: _Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable world coordinates ``(nx,1,1)``, ``(1,ny,1)``, ``(1,1,nz)`` of a box."""
        return (
            self.axes[0][box[0]][:, None, None],
            self.axes[1][box[1]][None, :, None],
            self.axes[2][box[2]][None, None, :],
        )


def _box_shape(box: _Box) -> tuple[int, int, int]:
    return box[0].stop - box[0].start, box[1].stop - box[1].start, box[2].stop - box[2].start


def _rel(inner: _Box, outer: _Box) -> _Box:
    """Slices of ``inner`` relative to the start of ``outer`` (``inner`` within ``outer``)."""
    r = [slice(a.start - b.start, a.stop - b.start) for a, b in zip(inner, outer, strict=True)]
    return r[0], r[1], r[2]


def _rot_z(deg: float) -> np.ndarray:
    """Rows are the local axes (unit vectors, world components) rotated by ``deg`` about z."""
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])


def _rot_x(deg: float) -> np.ndarray:
    """Rows are the local axes (unit vectors, world components) rotated by ``deg`` about x."""
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[1.0, 0.0, 0.0], [0.0, c, s], [0.0, -s, c]])


def _ellipsoid_box(
    grid: _Grid,
    center: Sequence[float],
    semi: Sequence[float],
    axes: np.ndarray | None = None,
) -> _Box | None:
    """Bounding box of a (possibly rotated) ellipsoid; ``axes`` rows are its unit axes."""
    c = np.asarray(center, dtype=np.float64)
    a = np.asarray(semi, dtype=np.float64)
    rot = np.eye(3) if axes is None else np.asarray(axes, dtype=np.float64)
    half = np.sqrt(((rot * a[:, None]) ** 2).sum(axis=0))
    return grid.box(c - half, c + half)


def _ellipsoid_q(
    grid: _Grid,
    box: _Box,
    center: Sequence[float],
    semi: Sequence[float],
    axes: np.ndarray | None = None,
) -> np.ndarray:
    """Normalised squared radius ``sum((u_k / a_k)^2)`` on ``box`` (<= 1 inside), float32."""
    rot = np.eye(3) if axes is None else np.asarray(axes, dtype=np.float64)
    coords = grid.coords(box)
    d = [coords[i] - np.float32(center[i]) for i in range(3)]
    q: np.ndarray | None = None
    for k in range(3):
        u: np.ndarray | None = None
        for i in range(3):
            w = float(rot[k, i])
            if abs(w) < 1e-12:
                continue
            term = d[i] if w == 1.0 else d[i] * np.float32(w)
            u = term if u is None else u + term
        assert u is not None
        t = (u * np.float32(1.0 / semi[k])) ** 2
        q = t if q is None else q + t
    assert q is not None
    return np.broadcast_to(q, _box_shape(box))


def _tube(
    grid: _Grid, points: Sequence[Sequence[float]], radii: Sequence[float]
) -> tuple[_Box, np.ndarray, np.ndarray, np.ndarray] | None:
    """Tube of varying radius around a polyline, evaluated segment by segment in small boxes.

    Args:
        grid: Voxel grid.
        points: ``(N, 3)`` centre-line vertices in world mm.
        radii: ``(N,)`` outer radius in mm at each vertex (linearly interpolated).

    Returns:
        ``(box, sdist, dy_rel, seg)`` or None if the tube misses the grid. ``sdist`` is the
        signed distance (mm, float32) to the tube surface (<= 0 inside, ``inf`` far away),
        ``dy_rel`` the y offset from the nearest centre-line point divided by the local
        radius (> 0 anterior, i.e. non-dependent in a supine patient) and ``seg`` the index
        of the nearest segment.
    """
    pts = np.asarray(points, dtype=np.float64)
    rad = np.asarray(radii, dtype=np.float64)
    rmax = float(rad.max())
    box = grid.box(pts.min(axis=0) - rmax, pts.max(axis=0) + rmax)
    if box is None:
        return None
    shape = _box_shape(box)
    sdist = np.full(shape, np.inf, dtype=np.float32)
    dy_rel = np.zeros(shape, dtype=np.float32)
    seg = np.zeros(shape, dtype=np.int16)
    for k in range(len(pts) - 1):
        p0, p1 = pts[k], pts[k + 1]
        r0, r1 = float(rad[k]), float(rad[k + 1])
        rr = max(r0, r1)
        sbox = grid.box(np.minimum(p0, p1) - rr, np.maximum(p0, p1) + rr)
        if sbox is None:
            continue
        xx, yy, zz = grid.coords(sbox)
        dx, dy, dz = xx - np.float32(p0[0]), yy - np.float32(p0[1]), zz - np.float32(p0[2])
        vx, vy, vz = (np.float32(v) for v in p1 - p0)
        length2 = float(np.dot(p1 - p0, p1 - p0))
        if length2 > 0.0:
            t = (dx * vx + dy * vy + dz * vz) * np.float32(1.0 / length2)
            np.clip(t, 0.0, 1.0, out=t)
        else:
            t = np.zeros(_box_shape(sbox), dtype=np.float32)
        ex, ey, ez = dx - t * vx, dy - t * vy, dz - t * vz
        r_here = np.float32(r0) + t * np.float32(r1 - r0)
        s = np.sqrt(ex * ex + ey * ey + ez * ez) - r_here
        rel = _rel(sbox, box)
        cur = sdist[rel]
        upd = s < cur
        np.copyto(cur, s, where=upd)
        np.copyto(dy_rel[rel], ey / r_here, where=upd)
        np.copyto(seg[rel], k, where=upd)
    return box, sdist, dy_rel, seg


def _paint(
    image: np.ndarray,
    labels: np.ndarray,
    box: _Box,
    mask: np.ndarray,
    value: int | np.ndarray,
    label: int | None = None,
    protect: Sequence[int] = (),
) -> None:
    """Write ``value`` (HU) and ``label`` where ``mask`` (broadcastable to box) is True."""
    img = image[box]
    lab = labels[box]
    mask = np.broadcast_to(mask, img.shape)
    for pid in protect:
        mask = mask & (lab != pid)
    np.copyto(img, value, where=mask, casting="unsafe")
    if label is not None:
        np.copyto(lab, np.uint8(label), where=mask)


# --------------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------------


def _correlated_noise(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Gaussian white noise smoothed with sigma 0.7 voxel, rescaled to std 10 HU (float32)."""
    noise = rng.standard_normal(size=shape, dtype=np.float32)
    ndimage.gaussian_filter(noise, sigma=_NOISE_SIGMA_VOX, output=noise, mode="reflect")
    total, total2, n = 0.0, 0.0, noise.size
    step = max(1, (1 << 22) // max(1, shape[1] * shape[2]))
    for i0 in range(0, shape[0], step):
        chunk = noise[i0 : i0 + step].astype(np.float64)
        total += float(chunk.sum())
        total2 += float(np.dot(chunk.ravel(), chunk.ravel()))
    mean = total / n
    var = max(total2 / n - mean * mean, 1e-12)
    noise *= np.float32(_NOISE_STD_HU / np.sqrt(var))
    return noise


def _add_body_noise(image: np.ndarray, body2d: np.ndarray, seed: int) -> None:
    """Add correlated noise (in place) to ``image`` inside the 2-D (x, y) body mask."""
    noise = _correlated_noise(image.shape, np.random.default_rng(seed))
    step = max(1, (1 << 22) // max(1, image.shape[1] * image.shape[2]))
    for i0 in range(0, image.shape[0], step):
        sl = slice(i0, i0 + step)
        img = image[sl]
        vals = img + noise[sl]
        np.rint(vals, out=vals)
        np.clip(vals, _HU_MIN, _HU_MAX, out=vals)
        np.copyto(img, vals, where=body2d[sl][:, :, None], casting="unsafe")


# --------------------------------------------------------------------------------------------
# Anatomy of make_phantom (world mm, RAS+: +x patient right, +y anterior, +z superior)
# --------------------------------------------------------------------------------------------

# Polylines are rows of (x, y, z, radius) in mm.
_LIVER_LOBES = (  # (centre, semi-axes): right lobe, flat left lobe draped across the midline
    ((65.0, 0.0, 85.0), (68.0, 72.0, 70.0)),
    ((-15.0, 48.0, 100.0), (52.0, 24.0, 30.0)),
)
_HEPATIC_VESSELS = (
    # Right, middle and left hepatic veins draining into the IVC near the liver dome.
    ((25.0, -10.0, 135.0, 7.0), (60.0, -15.0, 115.0, 5.0), (105.0, -10.0, 85.0, 3.0)),
    ((25.0, -10.0, 135.0, 6.0), (45.0, 20.0, 110.0, 5.0), (60.0, 45.0, 75.0, 3.0)),
    ((20.0, -5.0, 138.0, 5.0), (0.0, 25.0, 120.0, 4.0), (-30.0, 45.0, 105.0, 3.0)),
    # Portal vein from the hilum with right and left branches.
    (
        (30.0, 15.0, 45.0, 7.0),
        (50.0, 15.0, 62.0, 6.5),
        (85.0, 5.0, 75.0, 5.0),
        (110.0, 0.0, 85.0, 3.0),
    ),
    ((50.0, 15.0, 62.0, 5.0), (10.0, 35.0, 85.0, 4.0), (-30.0, 48.0, 100.0, 3.0)),
)
_PANCREAS = (  # head by the duodenum (right), neck/body over the aorta, tail at the spleen
    (35.0, 20.0, 12.0, 18.0),
    (12.0, 24.0, 24.0, 13.0),
    (-25.0, 18.0, 32.0, 12.0),
    (-55.0, 5.0, 38.0, 11.0),
    (-78.0, -10.0, 44.0, 9.0),
)
_ESOPHAGUS = (  # enters from the thorax left of midline, joins the stomach cardia
    (-3.0, 6.0, 175.0, 10.0),
    (-8.0, 7.0, 145.0, 10.0),
    (-22.0, 6.0, 125.0, 10.0),
    (-40.0, 2.0, 115.0, 10.0),
)
_STOMACH = (  # fundus under the left hemidiaphragm -> body -> antrum -> pylorus
    (-50.0, 0.0, 120.0, 26.0),
    (-52.0, 8.0, 100.0, 32.0),
    (-55.0, 22.0, 75.0, 30.0),
    (-35.0, 45.0, 55.0, 24.0),
    (-5.0, 52.0, 45.0, 18.0),
    (22.0, 42.0, 40.0, 11.0),
)
_COLON = (
    (88.0, 15.0, -105.0, 26.0),  # cecum
    (92.0, 10.0, -70.0, 28.0),  # ascending colon
    (95.0, 5.0, -30.0, 25.0),
    (95.0, 20.0, -5.0, 24.0),  # hepatic flexure
    (70.0, 50.0, -10.0, 22.0),  # transverse colon (anterior, sagging)
    (30.0, 60.0, -25.0, 22.0),
    (-10.0, 60.0, -30.0, 22.0),
    (-50.0, 55.0, -15.0, 22.0),
    (-95.0, 15.0, 25.0, 22.0),  # splenic flexure
    (-100.0, 0.0, -20.0, 20.0),  # descending colon
    (-100.0, -5.0, -60.0, 20.0),
    (-80.0, -5.0, -95.0, 18.0),  # sigmoid
    (-45.0, -20.0, -110.0, 18.0),
    (-15.0, -28.0, -125.0, 18.0),
    (0.0, -28.0, -140.0, 20.0),  # rectum
    (0.0, -28.0, -175.0, 20.0),
)
_COLON_STOOL_SEGMENTS = 3  # cecum + ascending colon carry semi-solid stool
_AORTA = ((-12.0, -17.0, -75.0, 11.0), (-12.0, -17.0, 200.0, 11.0))
_IVC = (25.0, -10.0, 13.0, 10.0, -85.0)  # centre x, y, semi-axes x, y, lower end z (mm)


def _spine_y(z: np.ndarray) -> np.ndarray:
    """Antero-posterior centre (mm) of the vertebral bodies: straight, curving back below."""
    below = np.minimum(z + np.float32(40.0), np.float32(0.0))
    return np.float32(-45.0) - np.float32(0.0025) * below * below


class _Canvas:
    """Image + label map being painted, with the 2-D (x, y) body-compartment masks."""

    def __init__(self, grid: _Grid) -> None:
        self.grid = grid
        self.image = np.full(grid.shape, _HU["air"], dtype=np.int16)
        self.labels = np.zeros(grid.shape, dtype=np.uint8)
        x2, y2 = grid.axes[0][:, None], grid.axes[1][None, :]
        a, b = _BODY_SEMI

        def ellipse(inset: float) -> np.ndarray:
            return (x2 / np.float32(a - inset)) ** 2 + (y2 / np.float32(b - inset)) ** 2 <= 1.0

        self.body2d = ellipse(0.0)
        self.wall2d = ellipse(_FAT_MM)  # inside the subcutaneous fat
        self.interior2d = ellipse(_FAT_MM + _MUSCLE_MM)  # abdominal cavity + retroperitoneum

    def inside(self, box: _Box, region: np.ndarray) -> np.ndarray:
        """``(nx, ny, 1)`` view of a 2-D region mask over ``box``."""
        return region[box[0], box[1]][:, :, None]

    def paint(
        self, box: _Box, mask: np.ndarray, value: int | np.ndarray, label: int | None = None
    ) -> None:
        """Paint an organ: never overwrites the spine."""
        _paint(self.image, self.labels, box, mask, value, label, protect=(LABELS["spine"],))

    def ellipsoid(
        self,
        center: Sequence[float],
        semi: Sequence[float],
        value: int,
        label: int | None,
        axes: np.ndarray | None = None,
    ) -> None:
        box = _ellipsoid_box(self.grid, center, semi, axes)
        if box is not None:
            q = _ellipsoid_q(self.grid, box, center, semi, axes)
            self.paint(box, (q <= 1.0) & self.inside(box, self.interior2d), value, label)

    def tube(
        self, path: Sequence[Sequence[float]]
    ) -> tuple[_Box, np.ndarray, np.ndarray, np.ndarray] | None:
        rows = np.asarray(path, dtype=np.float64)
        return _tube(self.grid, rows[:, :3], rows[:, 3])

    def solid_tube(
        self,
        path: Sequence[Sequence[float]],
        value: int,
        label: int | None,
        only_in: int | None = None,
    ) -> None:
        tube = self.tube(path)
        if tube is not None:
            box, sd, _, _ = tube
            m = (sd <= 0.0) & self.inside(box, self.wall2d)
            if only_in is not None:
                m &= self.labels[box] == only_in
            self.paint(box, m, value, label)

    def hollow_tube(
        self,
        path: Sequence[Sequence[float]],
        wall_mm: float,
        wall_hu: int,
        label: int,
        lumen_hu: Callable[[np.ndarray, np.ndarray], np.ndarray],
    ) -> None:
        """Hollow viscus: wall of ``wall_mm`` around a lumen valued by ``lumen_hu``.

        ``lumen_hu(dy_rel, seg)`` gets the offset from the centre line along y relative to
        the local radius (> 0 anterior, i.e. non-dependent when supine) and the segment index.
        """
        tube = self.tube(path)
        if tube is not None:
            box, sd, dy_rel, seg = tube
            m = (sd <= 0.0) & self.inside(box, self.interior2d)
            self.paint(box, m, np.where(sd > -wall_mm, wall_hu, lumen_hu(dy_rel, seg)), label)

    def body_wall(self) -> None:
        """Subcutaneous fat, muscle ring, visceral fat, paraspinal and psoas muscles."""
        self.image[self.body2d] = _HU["subcutaneous_fat"]
        self.image[self.wall2d] = _HU["muscle"]
        self.image[self.interior2d] = _HU["visceral_fat"]
        for side in (-1.0, 1.0):
            cx = side * 30.0
            box = self.grid.box((cx - 24.0, -200.0, -1e4), (cx + 24.0, 0.0, 1e4))
            if box is not None:
                x, y, z = self.grid.coords(box)
                yc = _spine_y(z) - np.float32(48.0)
                m = ((x - np.float32(cx)) / 24.0) ** 2 + ((y - yc) / 22.0) ** 2 <= 1.0
                self.paint(box, m & self.inside(box, self.wall2d), _HU["muscle"])
            psoas = (
                (side * 28.0, -40.0, 30.0, 4.0),
                (side * 40.0, -40.0, -40.0, 17.0),
                (side * 45.0, -35.0, -110.0, 22.0),
            )
            self.solid_tube(psoas, _HU["muscle"], None)

    def spine(self) -> None:
        """Vertebrae (bodies + posterior elements, label spine), discs and spinal canal."""
        box = self.grid.box((-50.0, -170.0, -1e4), (50.0, 0.0, 1e4))
        if box is None:
            return
        x, y, z = self.grid.coords(box)
        period, disc = 36.0, 9.0
        phase = np.mod(z + np.float32(500.0), np.float32(period))  # (1, 1, nz)
        in_vert = phase >= disc
        h = (phase - disc) / np.float32(period - disc)  # 0..1 within a vertebra
        ry = y - _spine_y(z)  # y relative to the vertebral-body centre
        in_body = self.inside(box, self.body2d)
        spine = LABELS["spine"]
        img, lab = self.image, self.labels

        # Posterior elements: neural arch ring, spinous and transverse processes; canal.
        ycan = np.float32(-27.0)
        arch = ((x / 17.0) ** 2 + ((ry - ycan) / 15.0) ** 2 <= 1.0) & (ry < -10.0)
        spinous = (np.abs(x) <= 4.0) & (ry <= ycan - 10.0) & (ry >= -60.0) & (h > 0.1) & (h < 0.8)
        transverse = (np.abs(x) >= 12.0) & (np.abs(x) <= 36.0) & (np.abs(ry - ycan - 2.0) <= 5.0)
        transverse &= (h > 0.3) & (h < 0.7)
        posterior = (arch | spinous | transverse) & in_vert & in_body
        _paint(img, lab, box, posterior, _HU["posterior_elements"], spine)
        canal = (x / 10.0) ** 2 + ((ry - ycan) / 8.0) ** 2 <= 1.0
        _paint(img, lab, box, canal & in_body, _HU["csf"], 0)

        # Vertebral bodies: cortical shell and end plates around cancellous bone; discs between.
        outer = (x / 24.0) ** 2 + (ry / 17.0) ** 2 <= 1.0
        inner = (x / 21.5) ** 2 + (ry / 14.5) ** 2 <= 1.0
        height = period - disc
        endplate = (h * height < 1.5) | ((1.0 - h) * height < 1.5)
        value = np.where(outer & ~(inner & ~endplate), _HU["cortical_bone"], _HU["cancellous_bone"])
        _paint(img, lab, box, outer & in_vert & in_body, value, spine)
        _paint(img, lab, box, outer & ~in_vert & in_body, _HU["disc"], 0)

    def kidney(self, center: tuple[float, float, float], side: float, label: int) -> None:
        """Bean-shaped kidney: cortex shell over medulla, with a medial hilum notch."""
        semi = (30.0, 22.0, 55.0)
        # Local u points medially and 35 degrees anteriorly (towards the hilum).
        axes = _rot_z(35.0 if side < 0 else 145.0)
        box = _ellipsoid_box(self.grid, center, semi, axes)
        if box is None:
            return
        q = _ellipsoid_q(self.grid, box, center, semi, axes)
        q_in = _ellipsoid_q(self.grid, box, center, (23.0, 15.0, 47.0), axes)
        hilum = np.asarray(center) + 27.0 * axes[0]
        q_hilum = _ellipsoid_q(self.grid, box, hilum, (12.0, 11.0, 20.0), axes)
        m = (q <= 1.0) & (q_hilum > 1.0) & self.inside(box, self.interior2d)
        value = np.where(q_in <= 1.0, _HU["kidney_medulla"], _HU["kidney_cortex"])
        self.paint(box, m, value, label)

    def postcava(self) -> None:
        """Inferior vena cava: flattened elliptic cylinder from ``z_low`` to the top."""
        cx, cy, ax, ay, z_low = _IVC
        box = self.grid.box((cx - ax, cy - ay, z_low), (cx + ax, cy + ay, 1e4))
        if box is not None:
            x, y, z = self.grid.coords(box)
            m = ((x - np.float32(cx)) / ax) ** 2 + ((y - np.float32(cy)) / ay) ** 2 <= 1.0
            self.paint(box, m & (z >= z_low), _HU["postcava"], LABELS["postcava"])


def _colon_lumen(dy_rel: np.ndarray, seg: np.ndarray) -> np.ndarray:
    # Gas on top, a dependent fluid layer, semi-solid stool in the cecum / ascending colon.
    stool = (seg < _COLON_STOOL_SEGMENTS) & (dy_rel < 0.15)
    fluid = dy_rel < -0.5
    return np.where(stool, _HU["stool"], np.where(fluid, _HU["fluid"], _HU["gas"]))


def _esophagus_lumen(dy_rel: np.ndarray, seg: np.ndarray) -> np.ndarray:
    return np.where(dy_rel > -0.1, _HU["gas"], _HU["stool"])


def _stomach_lumen(dy_rel: np.ndarray, seg: np.ndarray) -> np.ndarray:
    return np.where(dy_rel > 0.35, _HU["gas"], _HU["stomach_content"])


def make_phantom(
    shape: Sequence[int] = (192, 160, 128),
    spacing: Sequence[float] = (2.0, 2.0, 2.5),
    seed: int = 0,
) -> Phantom:
    """Build a deterministic portal-venous abdominal CT phantom.

    All anatomy is defined in mm relative to the volume centre (world origin), so any shape
    and (anisotropic) spacing shows the same anatomy at the same physical size; a field of
    view of about 380 x 300 x 320 mm (x, y, z) contains it, smaller ones crop it. The default
    grid covers 384 x 320 x 320 mm.

    Content (nominal HU before noise): air -1000 outside an elliptic body cylinder along z
    (semi-axes 170 x 125 mm); subcutaneous fat -100; muscle ring, paraspinal and psoas
    muscles 50; visceral fat -90; a soft-tissue bowel mass 30; vertebrae (cortex 700,
    cancellous 250, posterior elements 450; discs 90, canal 15); liver 100 with hepatic and
    portal vessels 170; spleen 115; pancreas 105; kidneys (cortex 170, medulla 125); aorta
    180; inferior vena cava (``postcava``) 140; esophagus, stomach and colon with 3-4 mm walls
    (40-45 HU) and lumens of gas (-1000) plus dependent fluid / stool (10-20); uterus 90.
    Correlated noise (white Gaussian smoothed with sigma 0.7 voxel, std 10 HU) is added
    inside the body; values are clipped to [-1024, 3071] HU.

    Label masks of hollow organs (colon, esophagus, stomach) cover wall and lumen. Labels do
    not overlap: later structures overwrite earlier ones (organs never overwrite the spine).

    Args:
        shape: Grid size ``(nx, ny, nz)`` in voxels.
        spacing: Voxel size ``(sx, sy, sz)`` in mm.
        seed: Seed for ``np.random.default_rng`` (noise only; the anatomy is fixed).

    Returns:
        A :class:`Phantom` with ``image`` (int16 HU) and ``labels`` (uint8) of shape
        ``shape``, indexed ``(x, y, z)`` in RAS+ order.
    """
    grid = _Grid(shape, spacing)
    cv = _Canvas(grid)
    lab = LABELS

    # Painting order matters: later structures overwrite earlier ones (except the spine).
    cv.body_wall()
    # Unlabelled soft-tissue mass standing in for small-bowel loops / mesentery.
    cv.ellipsoid((0.0, 35.0, -45.0), (75.0, 50.0, 55.0), _HU["bowel"], None)
    cv.spine()
    for center, semi in _LIVER_LOBES:
        cv.ellipsoid(center, semi, _HU["liver"], lab["liver"])
    for path in _HEPATIC_VESSELS:
        cv.solid_tube(path, _HU["hepatic_vessel"], lab["hepatic_vessel"], only_in=lab["liver"])
    spleen_axes = _rot_z(27.0)  # long axis along the left posterolateral ribs
    cv.ellipsoid(
        (-95.0, -35.0, 95.0), (20.0, 50.0, 48.0), _HU["spleen"], lab["spleen"], spleen_axes
    )
    cv.solid_tube(_PANCREAS, _HU["pancreas"], lab["pancreas"])
    cv.kidney((-65.0, -50.0, -10.0), -1.0, lab["kidney_left"])
    cv.kidney((65.0, -50.0, -25.0), 1.0, lab["kidney_right"])
    cv.hollow_tube(_ESOPHAGUS, 3.5, _HU["gi_wall"], lab["esophagus"], _esophagus_lumen)
    cv.hollow_tube(_STOMACH, 4.0, _HU["stomach_wall"], lab["stomach"], _stomach_lumen)
    cv.hollow_tube(_COLON, 3.0, _HU["gi_wall"], lab["colon"], _colon_lumen)
    # Anteverted uterus: long axis tilted 40 degrees anteriorly from the z axis.
    cv.ellipsoid(
        (0.0, 30.0, -120.0), (27.0, 22.0, 40.0), _HU["uterus"], lab["uterus"], _rot_x(-40.0)
    )
    # Great vessels last, so they cut through whatever they traverse.
    cv.solid_tube(_AORTA, _HU["aorta"], lab["aorta"])
    cv.postcava()

    _add_body_noise(cv.image, cv.body2d, seed)
    return Phantom(image=cv.image, labels=cv.labels, spacing=grid.spacing, affine=grid.affine)


# --------------------------------------------------------------------------------------------
# Benchmark phantom
# --------------------------------------------------------------------------------------------

_BENCH_SHAPE = (320, 320, 224)


def benchmark_phantom(
    shape: Sequence[int] = _BENCH_SHAPE,
    seed: int = 0,
    liver_center: Sequence[float] | None = None,
    liver_semi_axes: Sequence[float] = (85.0, 70.0, 65.0),
) -> Phantom:
    """Build the reference benchmark phantom at 1 mm isotropic spacing.

    Geometry is given in voxel indices ``(x, y, z)`` (= mm, spacing 1 mm): air -1000 HU;
    body = elliptic cylinder along z centred at ``(160, 160)`` with semi-axes 150 (x) and
    120 (y) voxels, 25 HU; liver = ellipsoid centred at ``(110, 150, 112)`` with semi-axes
    ``(85, 70, 65)`` mm, 100 HU (about 1.62 L); inside the body correlated noise (white
    Gaussian smoothed with sigma 0.7 voxel, rescaled to std 10 HU).

    For a non-default ``shape`` the body centre and semi-axes scale with
    ``shape[:2] / (320, 320)`` and the default liver centre with ``shape / (320, 320, 224)``;
    the liver semi-axes stay in mm (voxels) and the liver is clipped by the field of view
    and the body. A 512^3 volume needs about 1 GB of RAM (float32 noise) and a few seconds.

    The geometry follows the reference notes verbatim in voxel indices; it is not tied to the
    anatomy of :func:`make_phantom` (e.g. with the RAS+ affine the liver centre, at
    ``x = 110 < 160``, lies on the patient's left, and the body axis at index 160 is half a
    voxel off the grid centre 159.5).

    Args:
        shape: Grid size ``(nx, ny, nz)`` in voxels (1 mm each).
        seed: Seed for ``np.random.default_rng`` (noise).
        liver_center: Liver centre in voxel indices ``(x, y, z)``; None for the scaled default.
        liver_semi_axes: Liver semi-axes in mm ``(x, y, z)``.

    Returns:
        A :class:`Phantom`; its only label is ``LABELS["liver"]``. The affine is the identity
        scaled by 1 mm with the volume centre at world ``(0, 0, 0)``.
    """
    grid = _Grid(shape, (1.0, 1.0, 1.0))
    index_grid = _Grid(shape, (1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    fx, fy, fz = (n / d for n, d in zip(grid.shape, _BENCH_SHAPE, strict=True))

    x2 = index_grid.axes[0][:, None]
    y2 = index_grid.axes[1][None, :]
    cx, cy, ax, ay = 160.0 * fx, 160.0 * fy, 150.0 * fx, 120.0 * fy
    body2d = ((x2 - np.float32(cx)) / np.float32(ax)) ** 2 + (
        (y2 - np.float32(cy)) / np.float32(ay)
    ) ** 2 <= 1.0

    image = np.full(grid.shape, _HU["air"], dtype=np.int16)
    labels = np.zeros(grid.shape, dtype=np.uint8)
    image[body2d] = 25

    center = (110.0 * fx, 150.0 * fy, 112.0 * fz) if liver_center is None else liver_center
    center = tuple(float(c) for c in center)
    semi = tuple(float(s) for s in liver_semi_axes)
    box = _ellipsoid_box(index_grid, center, semi)
    if box is not None:
        q = _ellipsoid_q(index_grid, box, center, semi)
        m = (q <= 1.0) & body2d[box[0], box[1]][:, :, None]
        _paint(image, labels, box, m, 100, LABELS["liver"])

    _add_body_noise(image, body2d, seed)
    return Phantom(image=image, labels=labels, spacing=grid.spacing, affine=grid.affine)
