"""Organ presets: every number of a tumor recipe, stored as TOML data and validated on load.

A preset says what tumors to draw for one organ: size classes (radii in mm, counts, elastic
deformation), the class mix used when no class is forced, the texture recipe (scales in mm),
the edge blur (mm), the contrast (absolute HU or relative to the organ's measured intensity,
hypodense or hyperdense) and placement and clipping rules. The built-in presets live next to
this file (``<name>.toml``); a user's own file is loaded with :func:`load_preset` by path.
"""

from __future__ import annotations

import copy
import functools
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .._hollow import WALL_MODES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "LESION_NAMES",
    "ORGANS",
    "ORGAN_LABEL_NAMES",
    "VESSEL_CLEARANCE_MM",
    "AppearanceParams",
    "BlendParams",
    "ContrastParams",
    "MassEffectParams",
    "PlacementParams",
    "Preset",
    "PresetError",
    "ShapeParams",
    "SizeClass",
    "TextureParams",
    "WallParams",
    "default_preset_for",
    "list_presets",
    "load_preset",
    "preset_from_dict",
    "preset_path",
    "without_extras",
]

_DIR = Path(__file__).resolve().parent
ORGANS = ("liver", "pancreas", "kidney", "colon", "esophagus", "uterus")
# AbdomenAtlas 2.0 names of each organ's lesion mask (REFERENCE section 4).
LESION_NAMES = {
    "liver": "liver_lesion",
    "pancreas": "pancreatic_lesion",
    "kidney": "kidney_lesion",
    "colon": "colon_lesion",
    "esophagus": "esophagus_tumor",
    "uterus": "endometrioma_tumor",
}
# Default [placement] vessel_clearance_mm of a preset that does not set it (mm; 0 = off).
# Liver 3 mm: about twice the edge blur sigma (1-2 mm), so the blurred tumor edge does not
# darken a vessel and a rim of parenchyma stays visible at usual CT resolution. Pancreas and
# kidney 2 mm: thin organ / renal sinus, where real tumors often abut vessels. Hollow organs
# and uterus 0: bright voxels there are oral contrast or enhancing wall, not vessels.
VESSEL_CLEARANCE_MM = {"liver": 3.0, "pancreas": 2.0, "kidney": 2.0}
# Label names (lower case, words joined by "_") that mean each organ in a label table such
# as an MSD or nnU-Net dataset.json.
ORGAN_LABEL_NAMES: dict[str, tuple[str, ...]] = {
    "liver": ("liver",),
    "pancreas": ("pancreas",),
    "kidney": ("kidney", "kidneys", "kidney_left", "kidney_right", "left_kidney", "right_kidney"),
    "colon": ("colon",),
    "esophagus": ("esophagus", "oesophagus"),
    "uterus": ("uterus",),
}


class PresetError(ValueError):
    """A preset file is missing, malformed or inconsistent (the message names file and key)."""


@dataclass(frozen=True)
class SizeClass:
    """One tumor size class.

    Attributes:
        name: Class name (``tiny``, ``small``, ...).
        count: Inclusive range of the number of tumors drawn for one sample.
        radius_mm: Inclusive range of each semi-axis (drawn independently per axis), mm.
        radius_integer: Draw integer radii (the published recipe does).
        elastic_sigma_mm: Range of the standard deviation of the control-point
            displacements, mm.
        elastic_sigma_integer: Draw an integer sigma (the published recipe does for
            small/medium/large).
        at_organ_center: Place these tumors at the organ bounding-box centre.
        exophytic_probability: Probability that a tumor is not clipped to the organ.
        components: For a composite class (``mix``): class name -> count range; the
            component classes' own ``count`` is then ignored.
        wall_thickness_mm: Wall tumors only (a preset with ``[wall]``): this class's range
            of the wall thickness to reach, mm, instead of ``[wall] thickness_mm``.
        wall_modes: Wall tumors only: this class's mode weights (``annular``, ``eccentric``,
            ``polypoid``) instead of ``[wall.modes]`` (small colon lesions are polyps, the
            annular "apple core" a large one).
    """

    name: str
    count: tuple[int, int] = (1, 1)
    radius_mm: tuple[float, float] = (1.0, 1.0)
    radius_integer: bool = False
    elastic_sigma_mm: tuple[float, float] = (0.0, 0.0)
    elastic_sigma_integer: bool = False
    at_organ_center: bool = False
    exophytic_probability: float = 0.0
    components: dict[str, tuple[int, int]] | None = None
    wall_thickness_mm: tuple[float, float] | None = None
    wall_modes: dict[str, float] | None = None

    @property
    def composite(self) -> bool:
        return self.components is not None


@dataclass(frozen=True)
class TextureParams:
    """The smoothed-Bernoulli texture recipe (REFERENCE section 2), scales in mm."""

    sigma_a_mm: tuple[float, ...] = (3.0, 6.0, 9.0, 12.0, 15.0)
    sigma_b_mm: tuple[float, ...] = (4.0, 7.0)
    scale: tuple[float, float] = (0.19, 0.21)
    base: tuple[float, float] = (0.04, 0.06)
    u0: tuple[float, float] = (0.5, 0.55)
    threshold: float = 0.12
    range_sd: float = 4.5


@dataclass(frozen=True)
class ContrastParams:
    """Tumor contrast ``D`` of the blend ``I' = I - T * B * D`` (HU).

    ``mode="absolute"`` draws ``D`` uniformly in ``delta_hu``. ``mode="relative"`` draws
    ``D = f * (organ_hu - reference_hu)`` with ``f`` uniform in ``fraction`` and ``organ_hu``
    the organ's median measured on the scan, then clamps ``|D|`` to ``delta_hu``. A tumor is
    hyperdense (``D < 0``) with probability ``hyperdense_probability``. Altered voxels never
    go below ``min_hu`` or above ``max_hu`` unless they already were.
    """

    mode: str = "absolute"
    delta_hu: tuple[float, float] = (65.0, 145.0)
    fraction: tuple[float, float] = (0.5, 1.0)
    reference_hu: float = 0.0
    hyperdense_probability: float = 0.0
    min_hu: float = -1024.0
    max_hu: float = 3071.0


@dataclass(frozen=True)
class BlendParams:
    """Edge blur of the tumor mask before blending: Gaussian sigma range in mm."""

    sigma_mm: tuple[float, float] = (1.0, 2.0)


@dataclass(frozen=True)
class PlacementParams:
    """Where tumor centres go and what a tumor may cover.

    Attributes:
        z_window: Fraction of the organ's cranio-caudal extent the centre is drawn in.
        widen: Wider windows tried in turn when no candidate voxel is found.
        erosion_mm: In-plane erosion of the organ slice before drawing the centre, mm
            (the published 5x5 square at 1 mm is 2 mm).
        tissue_hu: Optional ``[low, high]`` HU window: only voxels inside it can be tumor
            centres, tumor voxels or blended voxels (hollow organs: never blend into gas).
        vessel_clearance_mm: Minimum distance in mm between a tumor's (undeformed) ellipsoid
            and the vessels: the ``vessel_mask`` given to planning or, without one, bright
            voxels in and at the organ. 0 disables. When the key is absent the organ's
            default applies (:data:`VESSEL_CLEARANCE_MM`).
        gap_mm: Minimum gap in mm between the bounding spheres of two tumors of one sample
            (unless ``confluence``) and between a tumor's ellipsoid and an existing lesion.
        confluence: Let the tumors of one sample overlap and merge (the published recipe).
    """

    z_window: tuple[float, float] = (0.3, 0.7)
    widen: tuple[tuple[float, float], ...] = ((0.2, 0.8), (0.1, 0.9), (0.0, 1.0))
    erosion_mm: float = 2.0
    tissue_hu: tuple[float, float] | None = None
    vessel_clearance_mm: float = 0.0
    gap_mm: float = 2.0
    confluence: bool = False


@dataclass(frozen=True)
class ShapeParams:
    """Shape of a tumor: ellipsoid, optionally rotated, warped by a 3-D B-spline field.

    ``control_points`` control points per axis span the tumor's box; ``clip_to_organ``
    intersects the mask with the organ (classes may override with an exophytic probability).
    """

    control_points: int = 3
    rotate: bool = False
    clip_to_organ: bool = True


@dataclass(frozen=True)
class AppearanceParams:
    """Appearance modes beyond hypo/hyperdense and noise matching (``[appearance]``; see
    :mod:`synthgen._appearance`). Absent section: none of them (the published blend).

    Each mode is drawn per tumor with its probability when the tumor's equivalent radius
    (geometric mean of the semi-axes) reaches the mode's ``*_min_radius_mm``; its numbers are
    drawn uniformly in the ranges.

    Attributes:
        noise_match: Measure the scan's noise in the organ at plan time and give tissue the
            tumor replaces (exophytic part, necrotic core) that noise level.
        rim_probability: Odds of a rim-enhancing capsule.
        rim_min_radius_mm: Smallest tumor with a rim, mm.
        rim_width_mm: Width of the bright shell inside the boundary, mm.
        rim_boost_hu: How much brighter the shell is than the core, HU.
        necrosis_probability: Odds of a necrotic core.
        necrosis_min_radius_mm: Smallest tumor with a necrotic core, mm.
        necrosis_fraction: Core radius as a fraction of the tumor's (normalised radius).
        necrosis_edge_mm: Width of the core's soft edge, mm.
        necrosis_hu: Intensity of the core (near fluid), HU.
        calcification_probability: Odds of calcification specks.
        calcification_min_radius_mm: Smallest tumor with specks, mm.
        calcification_density: Fraction of the tumor's voxels that are specks.
        calcification_hu: HU range of a speck (each speck uniform in it).
    """

    noise_match: bool = False
    rim_probability: float = 0.0
    rim_min_radius_mm: float = 5.0
    rim_width_mm: tuple[float, float] = (1.5, 3.0)
    rim_boost_hu: tuple[float, float] = (20.0, 50.0)
    necrosis_probability: float = 0.0
    necrosis_min_radius_mm: float = 10.0
    necrosis_fraction: tuple[float, float] = (0.3, 0.6)
    necrosis_edge_mm: tuple[float, float] = (2.0, 4.0)
    necrosis_hu: tuple[float, float] = (10.0, 20.0)
    calcification_probability: float = 0.0
    calcification_min_radius_mm: float = 5.0
    calcification_density: tuple[float, float] = (0.003, 0.015)
    calcification_hu: tuple[float, float] = (150.0, 600.0)


@dataclass(frozen=True)
class MassEffectParams:
    """Mass effect: large tumors push the surrounding tissue (and every label map) outward.

    Applied by :mod:`synthgen.mass_effect` before rendering, from the plan's tumors and these
    settings (a plan carries its preset, so a plan replays the warp). Absent section: off.

    Attributes:
        enabled: Warp image and labels around qualifying tumors.
        strength: Displacement at the tumor surface as a fraction of its radius (0-0.5).
        min_radius_mm: Equivalent radius (geometric mean of the semi-axes, mm) from which a
            tumor pushes tissue.
        ramp_mm: The strength ramps from 0 at ``min_radius_mm`` to full over this many mm.
        reach: Support of the push, in tumor radii (nothing moves beyond it; cost ~reach^3).
    """

    enabled: bool = False
    strength: float = 0.25
    min_radius_mm: float = 20.0
    ramp_mm: float = 5.0
    reach: float = 1.5


@dataclass(frozen=True)
class WallParams:
    """Hollow organs: tumors as thickened wall segments (see :mod:`synthgen._hollow`).

    With this table every tumor of the preset is a wall tumor: the size class's radius draw is
    the half-length of the segment along the organ's centreline (mm) and, for a polyp, its
    base radius.

    Attributes:
        modes: Weights of ``annular``, ``eccentric`` and ``polypoid`` tumors.
        thickness_mm: Wall thickness to reach at the segment's middle, from the organ's outer
            boundary inward, mm (a class may override it with ``wall_thickness_mm``).
        shoulder: Length of each tapering shoulder as a fraction of the half-length.
        arc_deg: Angular extent of an eccentric thickening, degrees.
        polyp_height: Height of a polyp from the outer wall, as a multiple of its base radius.
        tissue_hu: Intensity of the tumor tissue, HU.
        texture_gain_hu: HU per unit of the texture field (mean about 0.5).
        irregularity: Relative modulation of the thickness by the texture (lobulation).
    """

    modes: dict[str, float] = field(default_factory=lambda: dict.fromkeys(WALL_MODES, 1.0))
    thickness_mm: tuple[float, float] = (8.0, 20.0)
    shoulder: tuple[float, float] = (0.2, 0.5)
    arc_deg: tuple[float, float] = (90.0, 270.0)
    polyp_height: tuple[float, float] = (1.0, 2.0)
    tissue_hu: tuple[float, float] = (45.0, 90.0)
    texture_gain_hu: tuple[float, float] = (100.0, 200.0)
    irregularity: tuple[float, float] = (0.05, 0.2)


@dataclass(frozen=True)
class Preset:
    """A validated organ preset. Build with :func:`load_preset`."""

    name: str
    organ: str
    description: str
    classes: dict[str, SizeClass]
    mix: dict[str, float]
    texture: TextureParams = field(default_factory=TextureParams)
    contrast: ContrastParams = field(default_factory=ContrastParams)
    blend: BlendParams = field(default_factory=BlendParams)
    placement: PlacementParams = field(default_factory=PlacementParams)
    shape: ShapeParams = field(default_factory=ShapeParams)
    mass_effect: MassEffectParams = field(default_factory=MassEffectParams)
    sources: tuple[str, ...] = ()
    path: str | None = None
    wall: WallParams | None = None
    appearance: AppearanceParams = field(default_factory=AppearanceParams)

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-serialisable dictionary in the file schema (round-trips through
        :func:`preset_from_dict`; recorded in plans and manifests). A fresh copy."""
        return copy.deepcopy(self._schema_dict)

    @functools.cached_property
    def _schema_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("path", None)
        d["sources"] = list(self.sources)
        classes = {}
        for name, c in d["classes"].items():
            c.pop("name")
            for k in ("wall_thickness_mm", "wall_modes"):
                if c.get(k) is None:
                    c.pop(k, None)
            if c["components"] is None:
                c.pop("components")
                classes[name] = c
            else:
                classes[name] = {"components": c["components"]}
        d["classes"] = classes
        if d["placement"]["tissue_hu"] is None:
            d["placement"].pop("tissue_hu")
        if d.get("wall") is None:
            d.pop("wall", None)
        if self.appearance == AppearanceParams():  # no [appearance]: plans as before
            d.pop("appearance", None)
        # JSON's types (lists, not tuples): a plan's preset then equals the one it reads back.
        # Read-only: every plan drawn from this preset holds this very dict.
        return _json_lists(d, frozen=True)

    def size_class(self, name: str) -> SizeClass:
        """The class ``name``; raises ``ValueError`` listing the valid names."""
        try:
            return self.classes[name]
        except KeyError:
            raise ValueError(
                f"preset {self.name!r} has no size class {name!r}; valid: {', '.join(self.classes)}"
            ) from None


_READ_ONLY = (
    "this preset dictionary is shared by the preset and every plan drawn from it, so it is "
    "read-only; change a copy (Preset.to_dict(), Plan.to_dict() or copy.deepcopy) and build "
    "a preset from it with preset_from_dict"
)


def _refuse(self: Any, *args: Any, **kwargs: Any) -> Any:
    raise TypeError(_READ_ONLY)


class _FrozenDict(dict):  # type: ignore[type-arg]
    """A dict that refuses changes. Copies (``copy``, ``deepcopy``, pickle) are plain dicts."""

    __slots__ = ()
    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    def __copy__(self) -> dict[str, Any]:
        return dict(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        return {k: copy.deepcopy(v, memo) for k, v in self.items()}

    def __reduce__(self) -> Any:
        return (dict, (dict(self),))


class _FrozenList(list):  # type: ignore[type-arg]
    """A list that refuses changes. Copies (``copy``, ``deepcopy``, pickle) are plain lists."""

    __slots__ = ()
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse

    def __copy__(self) -> list[Any]:
        return list(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return [copy.deepcopy(v, memo) for v in self]

    def __reduce__(self) -> Any:
        return (list, (list(self),))


def _json_lists(x: Any, frozen: bool = False) -> Any:
    """``x`` with every tuple a list, recursively (what a JSON round trip gives); with
    ``frozen``, its dicts and lists refuse changes."""
    if isinstance(x, dict):
        d = {k: _json_lists(v, frozen) for k, v in x.items()}
        return _FrozenDict(d) if frozen else d
    if isinstance(x, (list, tuple)):
        v = [_json_lists(v, frozen) for v in x]
        return _FrozenList(v) if frozen else v
    return x


# --------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------


class _Ctx:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, msg: str) -> PresetError:
        return PresetError(f"{self.source}: [{key}] {msg}")


def _take(ctx: _Ctx, table: dict[str, Any], key: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ctx.fail(key, f"must be a table, got {type(table).__name__}")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ctx.fail(key, f"unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    return table


def _table(ctx: _Ctx, table: Any, key: str) -> dict[str, Any]:
    """A table whose keys are the user's names (classes, components): any key, but a table."""
    if not isinstance(table, dict):
        raise ctx.fail(key, f"must be a table, got {type(table).__name__}")
    return table


def _num(ctx: _Ctx, key: str, v: Any, *, lo: float | None = None, hi: float | None = None):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ctx.fail(key, f"must be a finite number, got {v!r}")
    if lo is not None and v < lo:
        raise ctx.fail(key, f"must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise ctx.fail(key, f"must be <= {hi}, got {v}")
    return float(v)


def _range(ctx: _Ctx, key: str, v: Any, *, lo: float | None = None, hi: float | None = None):
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise ctx.fail(key, f"must be a [low, high] pair, got {v!r}")
    a, b = (_num(ctx, key, x, lo=lo, hi=hi) for x in v)
    if a > b:
        raise ctx.fail(key, f"low {a} is above high {b}")
    return (a, b)


def _int_range(ctx: _Ctx, key: str, v: Any, *, lo: int = 0) -> tuple[int, int]:
    a, b = _range(ctx, key, v, lo=lo)
    if a != int(a) or b != int(b):
        raise ctx.fail(key, f"must be integers, got {v!r}")
    return (int(a), int(b))


def _choices(ctx: _Ctx, key: str, v: Any, *, lo: float) -> tuple[float, ...]:
    if not isinstance(v, (list, tuple)) or not v:
        raise ctx.fail(key, f"must be a non-empty list of numbers, got {v!r}")
    return tuple(_num(ctx, key, x, lo=lo) for x in v)


def _bool(ctx: _Ctx, key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ctx.fail(key, f"must be true or false, got {v!r}")
    return v


_CLASS_KEYS = {
    "count",
    "radius_mm",
    "radius_integer",
    "elastic_sigma_mm",
    "elastic_sigma_integer",
    "at_organ_center",
    "exophytic_probability",
    "components",
    "wall_thickness_mm",
    "wall_modes",
}


def _parse_class(ctx: _Ctx, name: str, t: dict[str, Any]) -> SizeClass:
    key = f"classes.{name}"
    _take(ctx, t, key, _CLASS_KEYS)
    if "components" in t:
        comps = _table(ctx, t["components"], key + ".components")
        if not comps:
            raise ctx.fail(key + ".components", "must name at least one class")
        parsed = {c: _int_range(ctx, f"{key}.components.{c}", r) for c, r in comps.items()}
        extra = sorted(set(t) - {"components"})
        if extra:
            raise ctx.fail(key, f"a composite class takes only 'components', also got {extra}")
        return SizeClass(name=name, components=parsed)
    for req in ("count", "radius_mm"):
        if req not in t:
            raise ctx.fail(key, f"missing required key {req!r}")
    count = _int_range(ctx, key + ".count", t["count"], lo=1)
    radius = _range(ctx, key + ".radius_mm", t["radius_mm"], lo=0.5, hi=500)
    sigma = _range(ctx, key + ".elastic_sigma_mm", t.get("elastic_sigma_mm", [0, 0]), lo=0)
    wall_t = t.get("wall_thickness_mm")
    radius_int = _bool(ctx, key + ".radius_integer", t.get("radius_integer", False))
    sigma_int = _bool(ctx, key + ".elastic_sigma_integer", t.get("elastic_sigma_integer", False))
    # integer draws need an integer in the range (planning draws from ceil(lo)..floor(hi))
    for k, (lo, hi), on in (("radius", radius, radius_int), ("elastic_sigma", sigma, sigma_int)):
        if on and math.ceil(lo) > math.floor(hi):
            raise ctx.fail(
                f"{key}.{k}_mm", f"[{lo:g}, {hi:g}] holds no integer, but {k}_integer = true"
            )
    return SizeClass(
        name=name,
        count=count,
        radius_mm=radius,
        radius_integer=radius_int,
        elastic_sigma_mm=sigma,
        elastic_sigma_integer=sigma_int,
        at_organ_center=_bool(ctx, key + ".at_organ_center", t.get("at_organ_center", False)),
        exophytic_probability=_num(
            ctx, key + ".exophytic_probability", t.get("exophytic_probability", 0.0), lo=0, hi=1
        ),
        wall_thickness_mm=None
        if wall_t is None
        else _range(ctx, key + ".wall_thickness_mm", wall_t, lo=0.5, hi=100),
        wall_modes=None
        if "wall_modes" not in t
        else _modes(ctx, t["wall_modes"], key + ".wall_modes"),
    )


def _modes(ctx: _Ctx, t: Any, key: str) -> dict[str, float]:
    """Wall-mode weights (``[wall.modes]``, a class's ``wall_modes``): known modes, numbers
    >= 0, not all zero."""
    modes_t = _take(ctx, t, key, set(WALL_MODES))
    modes = {n: _num(ctx, f"{key}.{n}", v, lo=0) for n, v in modes_t.items()}
    if sum(modes.values()) <= 0:
        raise ctx.fail(key, "weights must not all be zero")
    return modes


def _parse_wall(ctx: _Ctx, t: Any) -> WallParams:
    wl = _take(ctx, t, "wall", set(WallParams.__dataclass_fields__))
    d = WallParams()
    modes = _modes(ctx, wl.get("modes", d.modes), "wall.modes")

    def rng(key: str, lo: float, hi: float) -> tuple[float, float]:
        return _range(ctx, f"wall.{key}", wl.get(key, getattr(d, key)), lo=lo, hi=hi)

    return WallParams(
        modes=modes,
        thickness_mm=rng("thickness_mm", 0.5, 100),
        shoulder=rng("shoulder", 0, 1),
        arc_deg=rng("arc_deg", 10, 359),
        polyp_height=rng("polyp_height", 0.1, 5),
        tissue_hu=rng("tissue_hu", -100, 400),
        texture_gain_hu=rng("texture_gain_hu", 0, 1000),
        irregularity=rng("irregularity", 0, 0.9),
    )


def _parse_mass_effect(ctx: _Ctx, t: Any) -> MassEffectParams:
    from ..mass_effect import MAX_STRENGTH, REACH_RANGE

    me = _take(ctx, t, "mass_effect", set(MassEffectParams.__dataclass_fields__))
    d = MassEffectParams()
    return MassEffectParams(
        enabled=_bool(ctx, "mass_effect.enabled", me.get("enabled", d.enabled)),
        strength=_num(
            ctx, "mass_effect.strength", me.get("strength", d.strength), lo=0, hi=MAX_STRENGTH
        ),
        min_radius_mm=_num(
            ctx, "mass_effect.min_radius_mm", me.get("min_radius_mm", d.min_radius_mm), lo=0
        ),
        ramp_mm=_num(ctx, "mass_effect.ramp_mm", me.get("ramp_mm", d.ramp_mm), lo=0),
        reach=_num(
            ctx, "mass_effect.reach", me.get("reach", d.reach), lo=REACH_RANGE[0], hi=REACH_RANGE[1]
        ),
    )


def _parse_appearance(ctx: _Ctx, t: Any) -> AppearanceParams:
    ap = _take(ctx, t, "appearance", set(AppearanceParams.__dataclass_fields__))
    d = AppearanceParams()

    def prob(key: str) -> float:
        return _num(ctx, f"appearance.{key}", ap.get(key, getattr(d, key)), lo=0, hi=1)

    def mm(key: str) -> float:
        return _num(ctx, f"appearance.{key}", ap.get(key, getattr(d, key)), lo=0, hi=500)

    def rng(key: str, lo: float, hi: float) -> tuple[float, float]:
        return _range(ctx, f"appearance.{key}", ap.get(key, getattr(d, key)), lo=lo, hi=hi)

    return AppearanceParams(
        noise_match=_bool(ctx, "appearance.noise_match", ap.get("noise_match", d.noise_match)),
        rim_probability=prob("rim_probability"),
        rim_min_radius_mm=mm("rim_min_radius_mm"),
        rim_width_mm=rng("rim_width_mm", 0.1, 50),
        rim_boost_hu=rng("rim_boost_hu", -500, 500),
        necrosis_probability=prob("necrosis_probability"),
        necrosis_min_radius_mm=mm("necrosis_min_radius_mm"),
        necrosis_fraction=rng("necrosis_fraction", 0.01, 0.95),
        necrosis_edge_mm=rng("necrosis_edge_mm", 0.1, 50),
        necrosis_hu=rng("necrosis_hu", -200, 200),
        calcification_probability=prob("calcification_probability"),
        calcification_min_radius_mm=mm("calcification_min_radius_mm"),
        calcification_density=rng("calcification_density", 0, 0.5),
        calcification_hu=rng("calcification_hu", -1024, 3071),
    )


def _parse(data: dict[str, Any], source: str, path: str | None) -> Preset:
    ctx = _Ctx(source)
    top = {
        "name",
        "organ",
        "description",
        "sources",
        "classes",
        "mix",
        "texture",
        "contrast",
        "blend",
        "placement",
        "shape",
        "mass_effect",
        "wall",
        "appearance",
    }
    _take(ctx, data, "top level", top)
    for req in ("name", "organ", "classes", "mix"):
        if req not in data:
            raise ctx.fail("top level", f"missing required key {req!r}")
    name, organ = data["name"], data["organ"]
    if not isinstance(name, str) or not name:
        raise ctx.fail("name", "must be a non-empty string")
    if organ not in ORGANS:
        raise ctx.fail("organ", f"unknown organ {organ!r}; valid: {', '.join(ORGANS)}")
    sources = data.get("sources", [])
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise ctx.fail("sources", "must be a list of strings")

    classes_t = _table(ctx, data["classes"], "classes")
    if not classes_t:
        raise ctx.fail("classes", "must define at least one size class")
    classes = {n: _parse_class(ctx, n, t) for n, t in classes_t.items()}
    for c in classes.values():
        for comp in c.components or {}:
            if comp not in classes or classes[comp].composite:
                raise ctx.fail(
                    f"classes.{c.name}.components",
                    f"{comp!r} is not a plain size class of this preset",
                )

    mix_t = _take(ctx, data["mix"], "mix", set(classes))
    mix = {n: _num(ctx, f"mix.{n}", w, lo=0) for n, w in mix_t.items()}
    if sum(mix.values()) <= 0:
        raise ctx.fail("mix", "weights must not all be zero")

    tx = _take(ctx, data.get("texture", {}), "texture", set(TextureParams.__dataclass_fields__))
    d = TextureParams()
    texture = TextureParams(
        sigma_a_mm=_choices(ctx, "texture.sigma_a_mm", tx.get("sigma_a_mm", d.sigma_a_mm), lo=0.5),
        sigma_b_mm=_choices(ctx, "texture.sigma_b_mm", tx.get("sigma_b_mm", d.sigma_b_mm), lo=0.5),
        scale=_range(ctx, "texture.scale", tx.get("scale", d.scale), lo=0, hi=1),
        base=_range(ctx, "texture.base", tx.get("base", d.base), lo=0, hi=1),
        u0=_range(ctx, "texture.u0", tx.get("u0", d.u0), lo=0.01, hi=1),
        threshold=_num(ctx, "texture.threshold", tx.get("threshold", d.threshold), lo=0, hi=1),
        range_sd=_num(ctx, "texture.range_sd", tx.get("range_sd", d.range_sd), lo=0.5),
    )
    if texture.base[1] + texture.scale[1] > 1:
        raise ctx.fail("texture", "base + scale must stay a probability (<= 1)")

    ct = _take(ctx, data.get("contrast", {}), "contrast", set(ContrastParams.__dataclass_fields__))
    dc = ContrastParams()
    mode = ct.get("mode", dc.mode)
    if mode not in ("absolute", "relative"):
        raise ctx.fail("contrast.mode", f"must be 'absolute' or 'relative', got {mode!r}")
    contrast = ContrastParams(
        mode=mode,
        delta_hu=_range(ctx, "contrast.delta_hu", ct.get("delta_hu", dc.delta_hu), lo=0, hi=2000),
        fraction=_range(ctx, "contrast.fraction", ct.get("fraction", dc.fraction), lo=0, hi=10),
        reference_hu=_num(ctx, "contrast.reference_hu", ct.get("reference_hu", dc.reference_hu)),
        hyperdense_probability=_num(
            ctx,
            "contrast.hyperdense_probability",
            ct.get("hyperdense_probability", dc.hyperdense_probability),
            lo=0,
            hi=1,
        ),
        min_hu=_num(ctx, "contrast.min_hu", ct.get("min_hu", dc.min_hu)),
        max_hu=_num(ctx, "contrast.max_hu", ct.get("max_hu", dc.max_hu)),
    )
    if contrast.min_hu >= contrast.max_hu:
        raise ctx.fail("contrast", "min_hu must be below max_hu")

    bl = _take(ctx, data.get("blend", {}), "blend", {"sigma_mm"})
    # (an edge blur wider than a large tumor spreads its change below a rounding step:
    # labelled tumors with an unchanged image)
    blend = BlendParams(
        sigma_mm=_range(ctx, "blend.sigma_mm", bl.get("sigma_mm", (1, 2)), lo=0, hi=20)
    )

    pl = _take(
        ctx, data.get("placement", {}), "placement", set(PlacementParams.__dataclass_fields__)
    )
    dp = PlacementParams()
    widen = pl.get("widen", dp.widen)
    if not isinstance(widen, (list, tuple)):
        raise ctx.fail("placement.widen", "must be a list of [low, high] pairs")
    tissue = pl.get("tissue_hu")
    placement = PlacementParams(
        z_window=_range(ctx, "placement.z_window", pl.get("z_window", dp.z_window), lo=0, hi=1),
        widen=tuple(_range(ctx, "placement.widen", w, lo=0, hi=1) for w in widen),
        erosion_mm=_num(
            ctx, "placement.erosion_mm", pl.get("erosion_mm", dp.erosion_mm), lo=0, hi=50
        ),
        tissue_hu=None if tissue is None else _range(ctx, "placement.tissue_hu", tissue),
        vessel_clearance_mm=_num(
            ctx,
            "placement.vessel_clearance_mm",
            pl.get("vessel_clearance_mm", VESSEL_CLEARANCE_MM.get(organ, 0.0)),
            lo=0,
            hi=50,
        ),
        gap_mm=_num(ctx, "placement.gap_mm", pl.get("gap_mm", dp.gap_mm), lo=0, hi=50),
        confluence=_bool(ctx, "placement.confluence", pl.get("confluence", dp.confluence)),
    )

    sh = _take(ctx, data.get("shape", {}), "shape", set(ShapeParams.__dataclass_fields__))
    ds = ShapeParams()
    cp = sh.get("control_points", ds.control_points)
    if isinstance(cp, bool) or not isinstance(cp, int) or not 2 <= cp <= 8:
        raise ctx.fail("shape.control_points", f"must be an integer in [2, 8], got {cp!r}")
    shape = ShapeParams(
        control_points=cp,
        rotate=_bool(ctx, "shape.rotate", sh.get("rotate", ds.rotate)),
        clip_to_organ=_bool(ctx, "shape.clip_to_organ", sh.get("clip_to_organ", True)),
    )
    mass_effect = _parse_mass_effect(ctx, data.get("mass_effect", {}))
    desc = data.get("description", "")
    if not isinstance(desc, str):
        raise ctx.fail("description", "must be a string")
    # a preset file with both (accepted, it did nothing); a plan's preset dict may hold both
    # (batch --mass-effect set it on every organ's preset): it stays replayable
    if data.get("wall") is not None and mass_effect.enabled and path is not None:
        raise ctx.fail(
            "mass_effect.enabled",
            "wall tumors ([wall]) grow into the lumen and push no tissue: leave it false",
        )
    if data.get("wall") is None:  # (class keys of wall tumors without them: not ignored)
        for n, c in classes.items():
            for k in ("wall_thickness_mm", "wall_modes"):
                if getattr(c, k) is not None:
                    raise ctx.fail(f"classes.{n}.{k}", "applies to wall tumors: add a [wall] table")
    return Preset(
        name=name,
        organ=organ,
        description=desc,
        classes=classes,
        mix=mix,
        texture=texture,
        contrast=contrast,
        blend=blend,
        placement=placement,
        shape=shape,
        mass_effect=mass_effect,
        sources=tuple(sources),
        path=path,
        wall=None if data.get("wall") is None else _parse_wall(ctx, data["wall"]),
        appearance=_parse_appearance(ctx, data.get("appearance", {})),
    )


def list_presets() -> list[str]:
    """Names of the built-in presets, sorted."""
    return sorted(p.stem for p in _DIR.glob("*.toml"))


def default_preset_for(organ: str) -> str:
    """The built-in preset used when only an organ name is given (same name as the organ)."""
    if organ not in ORGANS:
        raise ValueError(f"unknown organ {organ!r}; valid organs: {', '.join(ORGANS)}")
    return organ


def preset_path(name: str) -> Path:
    """Path of the built-in preset ``name`` (raises ``ValueError`` when there is none)."""
    p = _DIR / f"{name}.toml"
    if not p.is_file():
        raise ValueError(
            f"unknown organ or preset {name!r}; built-in presets: {', '.join(list_presets())} "
            "(or give a path to a .toml preset file)"
        )
    return p


_CACHE: dict[str, Preset] = {}


def is_preset_file(spec: str | Path) -> bool:
    """Whether :func:`load_preset` reads ``spec`` as a file path (a ``Path``, a ``.toml``
    name or anything with a path separator) rather than as a preset or organ name."""
    s = str(spec)
    return isinstance(spec, Path) or s.endswith(".toml") or "/" in s or "\\" in s


def load_preset(spec: str | Path | Preset) -> Preset:
    """Load a preset by organ name, preset name or file path.

    Args:
        spec: An organ (``"liver"`` means its default preset), a built-in preset name
            (``"liver-classic"``), a path to a TOML file, or a :class:`Preset` (returned as is).

    Returns:
        The validated :class:`Preset`.

    Raises:
        ValueError: Unknown name, missing file, or (as :class:`PresetError`) an invalid file,
            with the file and the offending key in the message.
    """
    if isinstance(spec, Preset):
        return spec
    s = str(spec)
    looks_like_path = is_preset_file(spec)
    path = Path(s) if looks_like_path else preset_path(s)
    key = str(path.resolve()) if path.exists() else s
    if not looks_like_path and key in _CACHE:
        return _CACHE[key]
    if not path.is_file():
        raise ValueError(f"preset file {s!r} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PresetError(f"{path}: not valid TOML: {e}") from None
    preset = _parse(data, str(path), str(path))
    if not looks_like_path:
        _CACHE[key] = preset
    return preset


_FROM_DICT: dict[int, tuple[dict[str, Any], Preset]] = {}


EXTRAS = ("vessels", "mass_effect", "appearance")


def without_extras(spec: str | Path | Preset, keep: tuple[str, ...] = ()) -> Preset:
    """The preset with its realism extras off: the published recipe's steps with the organ's
    numbers (no vessel avoidance, no ``[mass_effect]``, no ``[appearance]`` modes).

    Args:
        spec: Preset (name, path or object).
        keep: Extras left on, among :data:`EXTRAS`.
    """
    bad = set(keep) - set(EXTRAS)
    if bad:
        raise ValueError(f"unknown extras {sorted(bad)}; known: {', '.join(EXTRAS)}")
    d = load_preset(spec).to_dict()  # a fresh copy
    d["name"] = f"{d['name']}-plain"
    if "vessels" not in keep:
        d.setdefault("placement", {})["vessel_clearance_mm"] = 0.0
    for section in ("mass_effect", "appearance"):
        if section not in keep:
            d.pop(section, None)
    return preset_from_dict(d, source=f"{d['name']} (without extras)")


def preset_from_dict(data: dict[str, Any], source: str = "<dict>") -> Preset:
    """Validate a preset given as a dictionary (as stored in a plan).

    The result is remembered for the same dictionary object while it is unchanged, so
    rendering many plans that share one preset dictionary validates it once.
    """
    hit = _FROM_DICT.get(id(data))
    # (a preset's own read-only dictionary, which its plans hold, cannot have changed)
    if hit is not None and hit[0] is data:
        if type(data) is _FrozenDict or hit[1]._schema_dict == data:
            return hit[1]
    preset = _parse(data, source, None)
    if len(_FROM_DICT) > 64:
        _FROM_DICT.clear()
    _FROM_DICT[id(data)] = (data, preset)
    return preset
