"""Plain NumPy/SciPy baseline of the published rule-based liver tumor recipe.

Written from the published description in shared/REFERENCE.md section 2, for benchmarking
only, not from the original source (which is under a no-derivatives licence and was not
consulted). It is the speed baseline the fast engine is compared against: single-threaded,
float64 where the published bank is float64, doing the same steps the plain way (neither
optimised nor deliberately slowed down).

Conventions: volumes are indexed (x, y, z) at 1 mm isotropic, intensities in HU, z is the
cranio-caudal axis (axis 2). Labels: 0 background, 1 organ, 2 tumor.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = ["SIZE_CLASSES", "build_texture_bank", "make_texture", "published_recipe"]

SIGMA_A_CHOICES = (3, 6, 9, 12, 15)
SIGMA_B_CHOICES = (4, 7)

# Base radius r (voxels = mm), count range (inclusive) per size class.
SIZE_CLASSES = {
    "tiny": (4, 3, 10),
    "small": (8, 3, 10),
    "medium": (16, 2, 5),
    "large": (32, 1, 3),
}
MIX_COUNTS = {"tiny": (3, 10), "small": (5, 10), "medium": (2, 5), "large": (1, 3)}


# --------------------------------------------------------------------------- texture


def make_texture(
    shape: tuple[int, int, int],
    rng: np.random.Generator,
    sigma_a: float | None = None,
    sigma_b: float | None = None,
) -> np.ndarray:
    """One procedural texture field T (float64, mean about 0.5, values in [0, 1]).

    Args:
        shape: texture shape in voxels.
        rng: random generator (the only source of randomness).
        sigma_a: first smoothing sigma (voxels); drawn from {3, 6, 9, 12, 15} if None.
        sigma_b: second smoothing sigma (voxels); drawn from {4, 7} if None.
    """
    if sigma_a is None:
        sigma_a = float(rng.choice(SIGMA_A_CHOICES))
    if sigma_b is None:
        sigma_b = float(rng.choice(SIGMA_B_CHOICES))
    scale = rng.uniform(0.19, 0.21)
    base = rng.uniform(0.04, 0.06)
    u0 = rng.uniform(0.5, 0.55)

    a = ndimage.gaussian_filter(rng.uniform(0.0, 1.0, size=shape), sigma_a)
    a = (a - a.min()) / (a.max() - a.min())
    prob = scale * a + base  # probability field, about 0.04-0.27
    b = (rng.uniform(0.0, 1.0, size=shape) < prob).astype(np.float64)  # Bernoulli
    b = ndimage.gaussian_filter(b, sigma_b)
    b = b * (u0 / b[b > 0.12].mean())
    return np.clip(b, 0.0, 1.0)


def build_texture_bank(
    shape: tuple[int, int, int], n: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Pre-build ``n`` textures of ``shape`` (done once per process, as published).

    The published bank is 10 textures of 420x300x320 float64.
    """
    return [make_texture(tuple(int(s) for s in shape), rng) for _ in range(n)]


def _texture_crop(
    bank: list[np.ndarray], shape: tuple[int, ...], rng: np.random.Generator
) -> np.ndarray:
    """Random crop of ``shape`` from a random bank texture (wrap-padded if too small)."""
    tex = bank[int(rng.integers(len(bank)))]
    short = [max(0, s - t) for s, t in zip(shape, tex.shape, strict=True)]
    if any(short):
        tex = np.pad(tex, [(0, k) for k in short], mode="wrap")
    start = [int(rng.integers(0, t - s + 1)) for s, t in zip(shape, tex.shape, strict=True)]
    return tex[tuple(slice(o, o + s) for o, s in zip(start, shape, strict=True))]


# --------------------------------------------------------------------------- shape


def _ellipsoid(radii: tuple[int, int, int], pad: int) -> np.ndarray:
    """Boolean axis-aligned ellipsoid centred in a sub-box of half-size radius + pad."""
    half = [r + pad for r in radii]
    grids = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    d = sum((g / float(r)) ** 2 for g, r in zip(grids, radii, strict=True))
    return d <= 1.0


def _elastic_2d(
    mask: np.ndarray, axes: tuple[int, int], sigma: float, rng: np.random.Generator
) -> np.ndarray:
    """Random 2-D elastic deformation over ``axes``, applied slice-wise over the third axis.

    3x3 control grid of Gaussian displacements (std ``sigma`` voxels), cubic B-spline
    interpolation to a dense field, nearest-neighbour resampling of the mask.
    """
    other = 3 - axes[0] - axes[1]
    src = np.moveaxis(mask, (axes[0], axes[1], other), (0, 1, 2))
    n0, n1, n2 = src.shape

    control = rng.normal(0.0, sigma, size=(2, 3, 3))
    g0, g1 = np.meshgrid(np.linspace(0.0, 2.0, n0), np.linspace(0.0, 2.0, n1), indexing="ij")
    disp = np.stack([ndimage.map_coordinates(c, [g0, g1], order=3, mode="mirror") for c in control])
    i0, i1 = np.meshgrid(np.arange(n0), np.arange(n1), indexing="ij")
    coords = np.stack([i0 + disp[0], i1 + disp[1]])

    out = np.empty(src.shape, dtype=np.uint8)
    src_u8 = src.astype(np.uint8)
    for k in range(n2):
        out[:, :, k] = ndimage.map_coordinates(
            src_u8[:, :, k], coords, order=0, mode="constant", cval=0
        )
    return np.moveaxis(out, (0, 1, 2), (axes[0], axes[1], other)).astype(bool)


def _tumor_shape(radii: tuple[int, int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Ellipsoid in its padded sub-box, deformed over (0,1), (1,2), (0,2)."""
    pad = math.ceil(3.0 * sigma) + 1
    shape = _ellipsoid(radii, pad)
    for axes in ((0, 1), (1, 2), (0, 2)):
        shape = _elastic_2d(shape, axes, sigma, rng)
    return shape


# --------------------------------------------------------------------------- location


def _tumor_centre(organ_box: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int]:
    """Centre voxel (box coordinates): z in the middle 40 % of the organ's z-range, in-plane
    a uniform voxel of the 5x5-eroded organ slice; the z-window widens if the slice is empty.
    """
    z_lo, z_hi = 0, organ_box.shape[2] - 1  # the box is the organ's bounding box
    struct = np.ones((5, 5), dtype=bool)
    windows = ((0.3, 0.7), (0.2, 0.8), (0.1, 0.9)) + ((0.0, 1.0),) * 100
    for lo, hi in windows:
        a = z_lo + round(lo * (z_hi - z_lo))
        b = z_lo + round(hi * (z_hi - z_lo))
        z = int(rng.integers(a, b + 1))
        eroded = ndimage.binary_erosion(organ_box[:, :, z], structure=struct)
        cand = np.argwhere(eroded)
        if len(cand):
            x, y = cand[int(rng.integers(len(cand)))]
            return int(x), int(y), z
    raise ValueError("organ too thin for a 5x5 erosion on any slice")


def _paste(canvas: np.ndarray, shape: np.ndarray, centre: tuple[int, int, int]) -> None:
    """OR ``shape`` (centred on ``centre``) into ``canvas``, clipped to the canvas."""
    dst, src = [], []
    for c, s, n in zip(centre, shape.shape, canvas.shape, strict=True):
        start = c - s // 2
        lo, hi = max(start, 0), min(start + s, n)
        dst.append(slice(lo, hi))
        src.append(slice(lo - start, hi - start))
    canvas[tuple(dst)] |= shape[tuple(src)]


def _draw_tumors(
    kind: str, count: int, organ_box: np.ndarray, canvas: np.ndarray, rng: np.random.Generator
) -> None:
    r = SIZE_CLASSES[kind][0]
    for _ in range(count):
        radii = tuple(int(rng.integers(int(0.75 * r), int(1.25 * r) + 1)) for _ in range(3))
        if kind == "tiny":
            sigma = float(rng.uniform(0.5, 1.0))
        elif kind == "small":
            sigma = float(rng.integers(1, 3))
        elif kind == "medium":
            sigma = float(rng.integers(3, 7))
        else:
            sigma = float(rng.integers(5, 11))
        centre = _tumor_centre(organ_box, rng)
        _paste(canvas, _tumor_shape(radii, sigma, rng), centre)


# --------------------------------------------------------------------------- recipe


def published_recipe(
    image: np.ndarray,
    organ_mask: np.ndarray,
    size: str,
    rng: np.random.Generator,
    bank: list[np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """Insert rule-based hypodense liver tumors, as the published recipe does.

    Args:
        image: CT volume in HU, (x, y, z), 1 mm isotropic.
        organ_mask: organ mask on the same grid (nonzero = organ).
        size: "tiny", "small", "medium", "large" or "mix".
        rng: the only source of randomness.
        bank: textures from :func:`build_texture_bank`.

    Returns:
        (new image float32 full volume, label uint8 full volume: 0/1 organ/2 tumor).
    """
    if size not in SIZE_CLASSES and size != "mix":
        raise ValueError(f"unknown size class {size!r}")
    organ = organ_mask > 0
    out = image.astype(np.float32)  # modified copy of the full scan
    label = organ.astype(np.uint8)

    bounds = []
    for ax in range(3):  # organ bounding box from the per-axis projections
        hit = np.nonzero(organ.any(axis=tuple(a for a in range(3) if a != ax)))[0]
        bounds.append(slice(int(hit[0]), int(hit[-1]) + 1))
    box = tuple(bounds)
    organ_box = organ[box]

    canvas = np.zeros(organ_box.shape, dtype=bool)
    if size == "mix":
        for kind, (lo, hi) in MIX_COUNTS.items():
            _draw_tumors(kind, int(rng.integers(lo, hi + 1)), organ_box, canvas, rng)
    else:
        _, lo, hi = SIZE_CLASSES[size]
        _draw_tumors(size, int(rng.integers(lo, hi + 1)), organ_box, canvas, rng)
    tumor = canvas & organ_box

    texture = _texture_crop(bank, organ_box.shape, rng)
    blur = ndimage.gaussian_filter(tumor.astype(np.float64), rng.uniform(1.0, 2.0))
    contrast = rng.uniform(65.0, 145.0)

    img_box = out[box].astype(np.float64)
    new_box = np.where(organ_box, img_box - texture * blur * contrast, img_box)
    out[box] = new_box.astype(np.float32)
    label_box = label[box]
    label_box[tumor] = 2
    return out, label
