"""Appearance modes of a tumor beyond hypo/hyperdense, and the scan's noise level.

Drawn at plan time (:func:`draw_appearance`, from the preset's ``[appearance]`` section) into
``TumorPlan.appearance``; rendered by the blend kernels of both backends
(``_cpu_kernels.blend_tumor`` and ``kernels/blend.cu``) from the small parameter arrays of
:func:`blend_params`. All modes are functions of the normalised ellipsoid radius
``q = |m (x + d(x))|`` of the shape pass (``q <= 1`` is the tumor) and of counter-based hashes
of the voxel's lattice position relative to the tumor centre, so both backends agree bit
for bit.

* **Rim-enhancing capsule**: the shell ``q >= 1 - w`` (``w = rim_width_mm / r``, ``r`` the
  geometric mean radius) is brighter than the core by ``rim_boost_hu``, ramping in over a
  further ``w / 2`` inwards; the edge blur ``B`` fades it out at the boundary. It gives back at
  most :data:`RIM_MAX_SHARE` of a hypodense tumor's darkening in each voxel.
* **Necrotic core**: ``q < necrosis_fraction`` is replaced by near-fluid tissue of
  ``necrosis_hu`` (plus the scan's noise), with a soft edge ``necrosis_edge_mm`` wide.
* **Calcification specks**: inside ``q < 0.9`` a voxel is a speck with probability
  ``calcification_density`` (one hash per voxel); its HU is uniform in the planned range
  (a second hash).
* **Noise matching**: where the tumor *replaces* tissue (the exophytic part outside the organ,
  the necrotic core) the original voxels' noise is gone, so counter-hash noise of the scan's
  own level is added: ``organ_noise_hu`` (total SD) split into a white part and a correlated
  part (``organ_noise_grain``: the correlated share of the variance), both measured in the
  organ at plan time by :func:`measure_noise`. Inside the organ the blend subtracts a smooth
  field from the original voxels, which keeps their noise as it is.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._draws import uniform
from ._geometry import binary as _binary
from ._geometry import sample_step
from ._hash import stream_key
from ._packed import regions

__all__ = [
    "APPEARANCE_STREAM",
    "CALCIFICATION_Q_MAX",
    "N_APP",
    "blend_params",
    "draw_appearance",
    "equivalent_radius",
    "measure_noise",
    "modes",
    "noise_split",
]

#: Seed tag of the per-tumor generator of the appearance draws (its own stream, so the other
#: draws of a plan stay what they were before appearance modes existed).
APPEARANCE_STREAM = 0x61707065  # "appe"
STREAM_NOISE_WHITE = 3
STREAM_NOISE_CORR = 4
STREAM_SPECK = 5
STREAM_SPECK_HU = 6
#: Specks stay this far inside the tumor (normalised radius), clear of the blurred edge.
CALCIFICATION_Q_MAX = 0.9
#: Length of the float32 parameter array of the blend (layout in :func:`blend_params`).
N_APP = 13
# 3-sigma clipping keeps 99.73% of a Gaussian and shrinks its SD by this factor.
_CLIP3_SD = 0.9866


def equivalent_radius(radii_mm) -> float:
    """Geometric mean of the semi-axes (mm): the radius of the sphere of equal volume."""
    r = [float(x) for x in radii_mm]
    return float((r[0] * r[1] * r[2]) ** (1.0 / 3.0))


#: A rim gives back at most this share of the tumor's contrast, voxel by voxel (of its
#: darkening ``T * B * D``, in the blend; the boost is also capped at this share of ``|D|``
#: at plan time): a hypodense tumor's rim stays darker than the organ (and a hyperdense one's
#: brighter), whatever the scan's contrast and the texture.
RIM_MAX_SHARE = 0.8


def draw_appearance(
    params, seed: int, index: int, radii_mm, contrast_hu: float | None = None
) -> dict[str, float] | None:
    """The appearance modes of tumor ``index`` of a sample (``None``: none, plain blend).

    With ``contrast_hu`` (the tumor's ``D``) a rim's boost is capped at
    :data:`RIM_MAX_SHARE` of ``|D|``.

    Every number is drawn whether or not its mode is chosen, from a generator of its own
    (``[seed, index, APPEARANCE_STREAM]``), so each mode's odds are independent of the others
    and of every other draw of the plan. A mode needs the tumor's equivalent radius to reach
    the mode's ``*_min_radius_mm``.
    """
    p = params
    if p.rim_probability == 0 and p.necrosis_probability == 0 and p.calcification_probability == 0:
        return None
    rng = np.random.default_rng([int(seed), int(index), APPEARANCE_STREAM])
    u_rim, u_nec, u_cal = rng.random(3)
    rim_boost = uniform(rng, *p.rim_boost_hu)
    rim_width = uniform(rng, *p.rim_width_mm)
    nec_frac = uniform(rng, *p.necrosis_fraction)
    nec_edge = uniform(rng, *p.necrosis_edge_mm)
    nec_hu = uniform(rng, *p.necrosis_hu)
    cal_density = uniform(rng, *p.calcification_density)
    r = equivalent_radius(radii_mm)
    out: dict[str, float] = {}
    if r >= p.rim_min_radius_mm and u_rim < p.rim_probability:
        if contrast_hu is not None:  # the boost is capped by the tumor's own contrast
            rim_boost = min(rim_boost, RIM_MAX_SHARE * abs(float(contrast_hu)))
        out["rim_boost_hu"] = rim_boost
        out["rim_width_mm"] = rim_width
    if r >= p.necrosis_min_radius_mm and u_nec < p.necrosis_probability:
        out["necrosis_fraction"] = nec_frac
        out["necrosis_edge_mm"] = nec_edge
        out["necrosis_hu"] = nec_hu
    if r >= p.calcification_min_radius_mm and u_cal < p.calcification_probability:
        out["calcification_density"] = cal_density
        out["calcification_hu_min"] = float(p.calcification_hu[0])
        out["calcification_hu_max"] = float(p.calcification_hu[1])
    return out or None


def modes(t) -> list[str]:
    """Names of the appearance modes of a tumor: ``hypodense``/``hyperdense`` (the sign of its
    contrast) plus ``rim``, ``necrosis``, ``calcification`` as planned."""
    a = getattr(t, "appearance", None) or {}
    out = ["hyperdense" if t.contrast_hu < 0 else "hypodense"]
    if a.get("rim_boost_hu", 0.0) != 0.0:
        out.append("rim")
    if a.get("necrosis_fraction", 0.0) > 0.0:
        out.append("necrosis")
    if a.get("calcification_density", 0.0) > 0.0:
        out.append("calcification")
    return out


def noise_split(sd: float | None, grain: float | None) -> tuple[float, float]:
    """SDs of the white and the correlated part of noise of total ``sd`` (HU)."""
    if not sd:
        return 0.0, 0.0
    g = min(max(float(grain or 0.0), 0.0), 1.0)
    return float(sd) * math.sqrt(1.0 - g), float(sd) * math.sqrt(g)


def _modes(t, organ_noise_hu: float | None, organ_noise_grain: float | None):
    """The appearance numbers of tumor ``t`` that decide its blend: ``(appearance, rim
    boost, necrosis fraction, calcification density, white and correlated noise SDs)``, or
    ``None`` when it has none of them (the plain blend)."""
    a = getattr(t, "appearance", None) or {}
    if not a and (t.clip_to_organ or not organ_noise_hu):  # the common case, at once
        return None
    rim = float(a.get("rim_boost_hu", 0.0))
    nec = float(a.get("necrosis_fraction", 0.0))
    cal = float(a.get("calcification_density", 0.0))
    sw, sc = noise_split(organ_noise_hu, organ_noise_grain)
    noisy = (sw > 0 or sc > 0) and not t.clip_to_organ
    if rim == 0.0 and nec <= 0.0 and cal <= 0.0 and not noisy:
        return None
    return a, rim, nec, cal, sw, sc


def appearance_on(t, organ_noise_hu: float | None, organ_noise_grain: float | None) -> bool:
    """Whether :func:`blend_params` of tumor ``t`` is not ``None`` (without making it)."""
    return _modes(t, organ_noise_hu, organ_noise_grain) is not None


def blend_params(t, organ_noise_hu: float | None, organ_noise_grain: float | None):
    """``(app, keys)`` of the blend kernels for tumor ``t``, or ``None`` for the plain blend.

    ``app`` (float32, :data:`N_APP`): 0 rim ramp start ``1 - 1.5 w``, 1 its inverse width
    ``2 / w``, 2 rim boost (HU, 0 off), 3 necrotic core radius (normalised), 4 inverse edge
    width (0 off), 5 necrosis HU, 6 share of a darkening the rim keeps (``1 -``
    :data:`RIM_MAX_SHARE`), 7 speck probability per voxel (0 off), 8 speck
    HU low, 9 speck HU span, 10 speck zone (normalised radius), 11 white noise SD, 12
    correlated noise SD (HU). ``keys`` (uint32, 8): white noise, correlated noise, speck,
    speck HU (two words each).
    """
    modes = _modes(t, organ_noise_hu, organ_noise_grain)
    if modes is None:
        return None
    a, rim, nec, cal, sw, sc = modes
    r = equivalent_radius(t.radii_mm)
    app = np.zeros(N_APP, dtype=np.float64)
    if rim != 0.0:
        w = max(float(a["rim_width_mm"]), 1e-3) / r
        app[0], app[1], app[2] = 1.0 - 1.5 * w, 2.0 / w, rim
        app[6] = 1.0 - RIM_MAX_SHARE
    if nec > 0.0:
        e = max(float(a["necrosis_edge_mm"]), 1e-3) / r
        app[3], app[4], app[5] = nec, 1.0 / e, float(a["necrosis_hu"])
    if cal > 0.0:
        lo, hi = float(a["calcification_hu_min"]), float(a["calcification_hu_max"])
        app[7], app[8], app[9], app[10] = cal, lo, hi - lo, CALCIFICATION_Q_MAX
    app[11], app[12] = sw, sc
    keys = []
    for s in (STREAM_NOISE_WHITE, STREAM_NOISE_CORR, STREAM_SPECK, STREAM_SPECK_HU):
        keys.extend(stream_key(t.seed, s))
    return app.astype(np.float32), np.asarray(keys, dtype=np.uint32)


def _robust_sd(d: np.ndarray, integral: bool = False) -> float:
    """SD of the bulk of ``d``: 3-sigma clipped around the median (sigma from the MAD), so
    edges and vessels do not count and integer HU do not quantise the estimate.
    ``integral``: ``d`` holds whole numbers (differences of an integer image; its medians
    are then counted, the same values)."""
    from ._cpu_kernels import median, median_abs_dev

    if d.size < 16:
        return 0.0
    med = median(d, integral)
    s0 = 1.4826 * median_abs_dev(d, med, integral)
    if s0 == 0.0:
        s0 = float(np.std(d))
        if s0 == 0.0:
            return 0.0
    keep = d[np.abs(d - med) <= 3.0 * s0]
    return float(np.std(keep)) / _CLIP3_SD


def measure_noise(
    image: Any, organ_mask: Any, bbox, count: int, target: int = 20000
) -> tuple[float, float]:
    """The scan's noise in the organ: ``(sd, grain)`` in HU and [0, 1].

    From a strided sample of about ``target`` organ voxels, the differences to the voxel 1
    and 2 steps further along each axis (both ends in the organ), robust SDs ``s1``, ``s2``
    (over sqrt 2). For noise of SD ``sigma`` with lag correlations ``rho1``, ``rho2``:
    ``s_l^2 = sigma^2 (1 - rho_l)``. The render's noise model (white SD ``sw`` plus a 2x2x2
    box-correlated part ``sc``: ``rho1 = 0.5``, ``rho2 = 0``) matches both when
    ``sc^2 = 2 (s2^2 - s1^2)`` and ``sw^2 = 2 s1^2 - s2^2``, clamped to the model's range;
    ``sd^2 = sw^2 + sc^2`` and ``grain = sc^2 / sd^2``. Smooth anatomy barely moves 1-2 voxel
    differences; edges and vessels are clipped away.
    """
    step = sample_step(count, target)
    base = [slice(s.start, s.stop, step) for s in bbox]
    keys = []  # per axis long enough, the sample at lags 0, 1 and 2 along it
    for a in range(3):
        if bbox[a].stop - bbox[a].start >= 3:
            for lag in (0, 1, 2):
                sl = list(base)
                sl[a] = slice(bbox[a].start + lag, bbox[a].stop - 2 + lag, step)
                keys.append(tuple(sl))
    # (read together: one copy back for an image on a GPU)
    vals_all, ms_all = regions(image, keys), regions(organ_mask, keys)
    d1, d2 = [], []
    for k in range(0, len(keys), 3):
        vals = [np.asarray(v, dtype=np.float64) for v in vals_all[k : k + 3]]
        ms = [_binary(m) for m in ms_all[k : k + 3]]
        d1.append((vals[1] - vals[0])[ms[0] & ms[1]])
        d2.append((vals[2] - vals[0])[ms[0] & ms[2]])
    if not d1:
        return 0.0, 0.0
    whole = np.dtype(image.dtype).kind in "iu"  # (an integer image: whole-number medians)
    s1 = _robust_sd(np.concatenate(d1), whole) / math.sqrt(2.0)
    s2 = _robust_sd(np.concatenate(d2), whole) / math.sqrt(2.0)
    if s1 <= 0.0:
        return 0.0, 0.0
    if s2 <= s1:  # white (or anti-correlated): no correlated part
        return s1, 0.0
    if s2 * s2 >= 2.0 * s1 * s1:  # as correlated as the model gets: match lag 1
        return math.sqrt(2.0) * s1, 1.0
    sc2 = 2.0 * (s2 * s2 - s1 * s1)
    return s2, sc2 / (s2 * s2)
