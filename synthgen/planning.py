"""Plan: every random choice of one sample, drawn on the host into a small JSON document.

``plan()`` reads the organ mask (bounding box, candidate slices) and, for relative contrast or
tissue windows, a strided sample of the image; it draws everything from one local
``numpy.random.Generator`` seeded by ``seed``. Rendering a :class:`Plan` is deterministic and
needs nothing else: a manifest entry (the plan's JSON) reproduces a sample exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._appearance import draw_appearance
from ._device import array_kind
from ._draws import uniform
from ._geometry import binary as _binary
from ._geometry import sample_step
from ._hash import derive_seed, derive_seeds
from ._packed import all_finite
from ._placement import Constraints, PlacementError
from .presets import Preset, SizeClass, load_preset, preset_from_dict

__all__ = [
    "PLAN_VERSION",
    "ControlGrid",
    "OrganIndex",
    "PlacementError",
    "Plan",
    "TumorPlan",
    "index_organ",
    "make_plan",
    "resolve_spacing",
]

#: The random stream of placement retries ("plac"), apart from the tumor's first draws.
PLACEMENT_STREAM = 0x706C6163

PLAN_VERSION = 1


@dataclass
class TumorPlan:
    """One tumor, fully specified. Lengths in mm, positions in voxels of the scan.

    Attributes:
        index: Position of the tumor in the plan (part of its seed).
        size_class: Name of the size class it was drawn from.
        center_vox: Centre, voxel indices (i, j, k).
        radii_mm: Semi-axes of the ellipsoid, mm.
        rotation: Row-major 3x3 rotation; its columns are the ellipsoid axes in the scan's
            voxel-axis frame (identity for the axis-aligned published recipe).
        control_extent_mm: Half-size of the cube the B-spline control grid spans, per axis.
        displacement_mm: ``(3, g, g, g)`` control-point displacements, mm: a
            :class:`ControlGrid` (nested lists or an array are taken and stored as one),
            nested lists in JSON and :meth:`Plan.to_dict`.
        elastic_sigma_mm: Standard deviation they were drawn with.
        blur_sigma_mm: Edge blur of the mask, mm.
        contrast_hu: ``D`` of ``I' = I - T * B * D`` (negative: hyperdense).
        clip_to_organ: Intersect the mask with the organ (False: exophytic growth).
        texture: One draw of the texture recipe (sigma_a_mm, sigma_b_mm, scale, base, u0,
            threshold, range_sd).
        seed: 63-bit seed of the counter-based noise of this tumor.
        kind: ``"ellipsoid"`` (the recipe above) or ``"wall"``: a hollow-organ wall tumor
            (:mod:`synthgen._hollow`; the shape fields then hold ``radii_mm`` = the segment's
            half-length three times, the local frame (axis, normal, axis x normal) as
            ``rotation``, no displacement, ``contrast_hu`` 0).
        wall: For a wall tumor, its numbers (JSON): ``mode`` (annular, eccentric,
            polypoid), ``center_vox`` (float voxels, on the local lumen axis), ``axis`` and
            ``normal`` (unit vectors in the mm frame of the voxel axes), ``half_length_mm``,
            ``shoulder_mm``, ``thickness_mm``, ``arc_deg``, ``height_mm`` (polyp),
            ``radius_mm`` (local lumen radius at planning), ``reach_mm``, ``tissue_hu``,
            ``texture_gain_hu``, ``irregularity``, ``noise_hu``, ``normal_angle``.
        appearance: Appearance modes beyond hypo/hyperdense (``None``: the published
            blend), see :mod:`synthgen._appearance`: ``rim_boost_hu``, ``rim_width_mm``
            (rim-enhancing capsule); ``necrosis_fraction``, ``necrosis_edge_mm``,
            ``necrosis_hu`` (necrotic core); ``calcification_density``,
            ``calcification_hu_min``, ``calcification_hu_max`` (specks).
    """

    index: int
    size_class: str
    center_vox: tuple[int, int, int]
    radii_mm: tuple[float, float, float]
    rotation: tuple[float, ...]
    control_extent_mm: tuple[float, float, float]
    displacement_mm: ControlGrid
    elastic_sigma_mm: float
    blur_sigma_mm: float
    contrast_hu: float
    clip_to_organ: bool
    texture: dict[str, float]
    seed: int
    kind: str = "ellipsoid"
    wall: dict[str, Any] | None = None
    appearance: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if type(self.displacement_mm) is not ControlGrid:
            try:
                self.displacement_mm = ControlGrid(self.displacement_mm)
            except ValueError as e:
                raise ValueError(f"tumor {self.index}: {e}") from None

    @property
    def rotation_matrix(self) -> np.ndarray:
        return np.asarray(self.rotation, dtype=np.float64).reshape(3, 3)

    @property
    def displacement(self) -> np.ndarray:
        """:attr:`displacement_mm` as a read-only float64 array ``(3, g, g, g)`` (``(0,)``
        for none)."""
        d = self.displacement_mm
        return d.array if type(d) is ControlGrid else ControlGrid(d).array


@dataclass
class Plan:
    """Everything needed to render one sample (JSON round-trip with :meth:`to_json`).

    Attributes:
        seed: The sample's seed.
        preset: The preset, in file schema (so a plan stays valid if the file changes).
        size_class: The class drawn or forced for this sample.
        shape: Shape of the scan the plan is for.
        spacing: Voxel size, mm.
        organ_hu: Median organ intensity measured on the scan (HU), if it was needed.
        organ_bbox: The organ's bounding box, ``[[start, stop], ...]`` per axis.
        organ_noise_hu: The scan's noise SD measured in the organ (HU), when the preset
            matches noise (``[appearance] noise_match``); tissue a tumor replaces gets it.
        organ_noise_grain: Correlated share of that noise's variance (0 white, 1 as
            correlated as the render's 2x2x2 noise model).
        tumors: The tumors.
        version: Plan format version.
    """

    seed: int
    preset: dict[str, Any]
    size_class: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    organ_hu: float | None
    organ_bbox: list[list[int]] | None = None
    organ_noise_hu: float | None = None
    organ_noise_grain: float | None = None
    tumors: list[TumorPlan] = field(default_factory=list)
    version: int = PLAN_VERSION

    @property
    def preset_name(self) -> str:
        return str(self.preset["name"])

    @property
    def organ(self) -> str:
        return str(self.preset["organ"])

    def get_preset(self) -> Preset:
        """The preset object of this plan."""
        return preset_from_dict(self.preset, source=f"plan preset {self.preset_name!r}")

    def to_dict(self) -> dict[str, Any]:
        """A plain dictionary (a copy: the plan's preset dict is shared and read-only)."""
        d = asdict(dataclasses.replace(self, preset={}))  # (the preset: copied once, below)
        d["preset"] = copy.deepcopy(self.preset)
        for t in d["tumors"]:  # (JSON's types: the control grids as nested lists)
            if isinstance(t["displacement_mm"], ControlGrid):
                t["displacement_mm"] = t["displacement_mm"].tolist()
        return d

    def to_json(self, indent: int | None = None) -> str:
        """JSON text; floats are written exactly (``repr``), so the round trip is lossless."""
        # The same document as to_dict(), without asdict's deep copy of every nested list.
        doc = {**self.__dict__, "tumors": [t.__dict__ for t in self.tumors]}
        return json.dumps(doc, indent=indent, default=_json_value)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"unsupported plan version {d.get('version')!r}")
        tumors = []
        for t in d["tumors"]:
            t = dict(t)
            for k in ("center_vox", "radii_mm", "rotation", "control_extent_mm"):
                t[k] = tuple(t[k])
            tumors.append(_checked(TumorPlan(**t)))
        return cls(
            seed=int(d["seed"]),
            preset=d["preset"],
            size_class=d["size_class"],
            shape=tuple(d["shape"]),
            spacing=tuple(float(s) for s in d["spacing"]),
            organ_hu=d["organ_hu"],
            organ_bbox=d.get("organ_bbox"),
            organ_noise_hu=d.get("organ_noise_hu"),
            organ_noise_grain=d.get("organ_noise_grain"),
            tumors=tumors,
            version=d["version"],
        )

    @classmethod
    def from_json(cls, text: str | bytes | Path) -> Plan:
        """Parse a plan from JSON text or a path to a JSON file (a :class:`~pathlib.Path`,
        or a string that is not JSON text: a plan's JSON is an object, ``{...}``)."""
        if isinstance(text, str) and not text.lstrip().startswith("{"):
            text = Path(text)
        if isinstance(text, Path):
            text = text.read_text(encoding="utf-8")
        return cls.from_dict(json.loads(text))


def _checked(t: TumorPlan) -> TumorPlan:
    """A tumor of a plan read from JSON, its numbers checked (a hand-edited plan: negative
    radii rendered, a NaN blur failed deep in the render): ``ValueError`` naming the tumor
    and the field."""

    def bad(name: str, why: str) -> ValueError:
        return ValueError(f"tumor {t.index}: {name} {why}, got {getattr(t, name)!r}")

    def finite(name: str, vals) -> list[float]:
        try:
            out = [float(v) for v in vals]
        except (TypeError, ValueError):
            raise bad(name, "must be numbers") from None
        if not all(math.isfinite(v) for v in out):
            raise bad(name, "must be finite")
        return out

    if len(t.center_vox) != 3 or not all(
        isinstance(v, int | np.integer) and not isinstance(v, bool) for v in t.center_vox
    ):
        raise bad("center_vox", "must be 3 integer voxel indices")
    if min(finite("radii_mm", t.radii_mm)) <= 0:
        raise bad("radii_mm", "must be positive")
    rot = t.rotation
    if len(rot) == 3 and all(isinstance(r, Sequence) for r in rot):  # (3 rows of 3)
        rot = [v for r in rot for v in r]
    if len(finite("rotation", rot)) != 9:
        raise bad("rotation", "must hold 9 numbers (or 3 rows of 3)")
    if min(finite("control_extent_mm", t.control_extent_mm)) < 0:
        raise bad("control_extent_mm", "must not be negative")
    for name in ("blur_sigma_mm", "elastic_sigma_mm"):
        if finite(name, [getattr(t, name)])[0] < 0:
            raise bad(name, "must not be negative")
    finite("contrast_hu", [t.contrast_hu])
    return t


def float64s(values: Sequence) -> np.ndarray:
    """A flat sequence of numbers (Python or NumPy floats, ints, bools) as a float64 array,
    packed by ``struct``: for the short lists a plan holds about half the time of
    ``np.array(values, float64)``, which inspects every element's type first. Anything but a
    number (a string, a list) is a ``TypeError``."""
    try:
        return np.frombuffer(struct.pack(f"{len(values)}d", *values), dtype=np.float64)
    except struct.error as e:
        raise TypeError(f"expected numbers: {e}") from None


_GRID_ERROR = "control displacements must be (3, g0, g1, g2) nested lists of numbers"


class ControlGrid(Sequence):
    """A tumor's control-point displacements, ``(3, g0, g1, g2)`` mm (or none, for a wall
    tumor): an immutable float64 array (:attr:`array`: read-only, over memory nobody can
    write) that reads as the nested lists of the plan's JSON: ``len``, indexing and
    iteration give nested tuples, ``==`` compares values with another grid or with nested
    lists, ``repr`` and :meth:`tolist` are the lists'; ``np.asarray(grid)`` is the array.

    A planned tumor's grid never becomes Python floats unless it is written or read as
    lists: the renderers take the array (the GPU driver spent a tenth of a mix sample's
    serial host time turning the plan's lists back into one). A new grid is a new plan
    field: ``dataclasses.replace(tumor, displacement_mm=...)``.

    ``ControlGrid(values)``: nested lists or tuples of numbers, a real-valued array (copied)
    or another grid; none is ``()``, ``[]`` or a ``(0,)`` array. Another shape or depth,
    ragged lists or anything but numbers are a ``ValueError``.
    """

    __slots__ = ("array",)
    array: np.ndarray

    def __init__(self, values: Any = ()) -> None:
        if isinstance(values, ControlGrid):
            arr = values.array
        elif isinstance(values, np.ndarray):
            if values.dtype.kind not in "biuf":
                raise ValueError(f"{_GRID_ERROR}, got an array of dtype {values.dtype}")
            # a copy over bytes: read-only, and no flag can make it writable
            arr = np.frombuffer(np.ascontiguousarray(values, dtype=np.float64).tobytes(),
                                dtype=np.float64).reshape(values.shape)  # fmt: skip
        else:
            arr = _parse_grid(values)
        if arr.shape != (0,) and (arr.ndim != 4 or arr.shape[0] != 3 or arr.size == 0):
            raise ValueError(f"{_GRID_ERROR}, got shape {arr.shape}")
        object.__setattr__(self, "array", arr)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a ControlGrid is immutable")

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    def tolist(self) -> list:
        return self.array.tolist()

    def __len__(self) -> int:
        return self.array.shape[0]

    def __getitem__(self, i):
        return _tuples(self.array[i].tolist())

    def __iter__(self):
        return iter(_tuples(self.array.tolist()))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ControlGrid):
            return self.shape == other.shape and bool(np.array_equal(self.array, other.array))
        if isinstance(other, list):
            return self.array.tolist() == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # (equal to lists, which have none)

    def __repr__(self) -> str:
        return repr(self.array.tolist())

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if dtype is not None and np.dtype(dtype) != self.array.dtype:
            if copy is False:
                raise ValueError(f"a ControlGrid as {np.dtype(dtype)} needs a copy")
            return self.array.astype(dtype)
        return self.array.copy() if copy else self.array

    def __reduce__(self):
        return (ControlGrid, (self.array,))

    def __copy__(self) -> ControlGrid:
        return self  # immutable

    def __deepcopy__(self, memo) -> ControlGrid:
        return self


def _tuples(x: Any) -> Any:
    """Nested lists as nested tuples (numbers as they are)."""
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def _parse_grid(d: Any) -> np.ndarray:
    """Nested sequences of numbers, ``(n0, n1, n2, n3)`` regular, as a read-only float64
    array (:func:`float64s` of their numbers: over bytes); ``(0,)`` for none."""
    ch = itertools.chain.from_iterable
    try:
        if len(d) == 0:
            return np.frombuffer(b"", dtype=np.float64)
        shape = (len(d), len(d[0]), len(d[0][0]), len(d[0][0][0]))
        rows2 = tuple(ch(d))
        rows3 = tuple(ch(rows2))
        if (
            any(len(x) != shape[1] for x in d)
            or any(len(x) != shape[2] for x in rows2)
            or any(len(x) != shape[3] for x in rows3)
        ):
            raise ValueError(f"{_GRID_ERROR} (ragged)")
        flat = tuple(ch(rows3))
    except (TypeError, IndexError, KeyError):  # a number where a sequence belongs
        raise ValueError(_GRID_ERROR) from None
    try:
        return float64s(flat).reshape(shape)
    except TypeError:  # a sequence or a string where a number belongs
        raise ValueError(_GRID_ERROR) from None


def _json_value(o: Any) -> Any:
    """``json.dumps``' ``default``: a control grid as its nested lists."""
    if isinstance(o, ControlGrid):
        return o.tolist()
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


# --------------------------------------------------------------------------------------
# input checks shared by plan() and render()
# --------------------------------------------------------------------------------------


def resolve_spacing(
    spacing: Sequence[float] | None, affine: np.ndarray | None
) -> tuple[float, float, float]:
    """Voxel size in mm from ``spacing`` or, failing that, from the affine's column norms."""
    if spacing is None:
        if affine is None:
            raise ValueError("give the voxel spacing in mm (spacing=...) or an affine")
        a = np.asarray(affine, dtype=np.float64)
        if a.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got shape {a.shape}")
        spacing = np.linalg.norm(a[:3, :3], axis=0)
    if isinstance(spacing, tuple | list) and any(isinstance(x, bool | np.bool_) for x in spacing):
        raise ValueError(f"spacing must be numbers (mm per voxel axis), got {spacing!r}")
    if isinstance(spacing, tuple | list) and all(isinstance(x, float | int) for x in spacing):
        sp = [float(x) for x in spacing]  # (Python numbers: no array needed)
    else:
        a = np.asarray(spacing)
        if a.dtype == np.bool_:
            raise ValueError(f"spacing must be numbers (mm per voxel axis), got {spacing!r}")
        sp = a.astype(np.float64).ravel().tolist()
    if len(sp) != 3:
        raise ValueError(f"spacing must have 3 values (mm per voxel axis), got {sp}")
    if not all(math.isfinite(x) and x > 0 for x in sp):
        raise ValueError(f"spacing must be positive and finite, got {sp}")
    return (sp[0], sp[1], sp[2])


def _warn_odd_inputs(image: Any, sp: Sequence[float], affine: Any) -> None:
    """Warnings for inputs planning takes but that are probably not what the caller meant:
    an image of 8-bit integers (it cannot hold CT values in HU: a windowed or rescaled
    image?) and a ``spacing`` that disagrees with the ``affine``'s (the spacing is used;
    ``affine`` is ``None`` when the spacing came from it: nothing to compare)."""
    import warnings

    dt = getattr(image, "dtype", None)
    if dt is not None and np.dtype(dt).kind in "iu" and np.dtype(dt).itemsize == 1:
        warnings.warn(
            f"the image is {np.dtype(dt)}, which cannot hold CT values in HU (-1024 to 3071): "
            "tumor contrast is in HU, so a windowed or rescaled image gets wrong contrast",
            UserWarning,
            stacklevel=3,
        )
    if affine is not None:
        a = np.asarray(affine, dtype=np.float64)
        if a.shape == (4, 4):
            from_affine = np.linalg.norm(a[:3, :3], axis=0)
            if not np.allclose(sp, from_affine, rtol=1e-3, atol=0):
                warnings.warn(
                    f"spacing {tuple(round(float(x), 4) for x in sp)} differs from the affine's "
                    f"{tuple(round(float(x), 4) for x in from_affine)}: the spacing is used",
                    UserWarning,
                    stacklevel=3,
                )


def craniocaudal_axis(affine: np.ndarray | None) -> int:
    """The voxel axis most aligned with the patient's superior-inferior axis (2 if unknown)."""
    if affine is None:
        return 2
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    return int(np.argmax(np.abs(a[2, :]) / np.linalg.norm(a, axis=0)))


def check_arrays(image: Any, organ_mask: Any) -> None:
    """Raise ``ValueError`` for non-3-D or mismatched image/mask (cheap, no data pass)."""
    for name, arr in (("image", image), ("organ_mask", organ_mask)):
        if not hasattr(arr, "shape") or not hasattr(arr, "dtype"):
            raise ValueError(f"{name} must be an array, got {type(arr).__name__}")
        if len(arr.shape) != 3:
            raise ValueError(f"{name} must be 3-D, got shape {tuple(arr.shape)}")
    if tuple(image.shape) != tuple(organ_mask.shape):
        raise ValueError(
            f"shape mismatch: image {tuple(image.shape)} vs organ_mask {tuple(organ_mask.shape)}"
        )
    if image.dtype.kind not in "iuf":
        raise ValueError(f"image must be numeric (int or float HU), got dtype {image.dtype}")


def unreadable(a: Any) -> bool:
    """Whether ``a`` is an array the compiled kernels cannot take as it is: a NumPy array in
    non-native byte order (nibabel's ``>i2``, ``>f4``...) or of half precision (float16), or a
    CPU tensor of bfloat16 (which NumPy lacks)."""
    if isinstance(a, np.ndarray):
        dt = a.dtype
        return not dt.isnative or (dt.kind == "f" and dt.itemsize == 2)
    return str(getattr(a, "dtype", "")) == "torch.bfloat16" and array_kind(a) == "torch-cpu"


def readable(a: Any) -> Any:
    """``a`` as the compiled kernels take it: a NumPy array in non-native byte order as a
    native-order copy (same values, same kind and size), a float16 array as a float32 copy
    and a bfloat16 CPU tensor as a float32 one (exact); anything else (native arrays, device
    arrays, other tensors) as it is."""
    if not unreadable(a):
        return a
    if not isinstance(a, np.ndarray):
        return a.float()
    dt = a.dtype
    return np.asarray(a, dtype=np.float32 if dt.kind == "f" and dt.itemsize == 2 else
                      dt.newbyteorder("="))  # fmt: skip


def _cpu_tensor_view(a: Any) -> Any:
    """A torch CPU tensor as the NumPy array planning reads (a view; a bfloat16 one as its
    float32 values, see :func:`host_readable`); anything else as it is."""
    if array_kind(a) != "torch-cpu":
        return a
    return host_readable(a.detach().resolve_conj().resolve_neg())


def host_readable(t: Any) -> np.ndarray:
    """A CPU tensor (or array) as a NumPy array the compiled kernels take (see
    :func:`readable`): a view when nothing needs converting. For the training transforms,
    whose patches may come in half precision (AMP)."""
    t = readable(t)
    return readable(t.numpy() if not isinstance(t, np.ndarray) else t)


def organ_bbox(organ_mask: np.ndarray) -> tuple[tuple[slice, slice, slice], int]:
    """Bounding box (slices) and voxel count of ``organ_mask > 0.5``; ValueError if empty."""
    from ._cpu_kernels import bbox

    lo0, hi0, lo1, hi1, lo2, hi2, count = bbox(readable(organ_mask))  # (any byte order)
    if count == 0:
        raise PlacementError("organ mask is empty (no voxel > 0.5): nothing to implant a tumor in")
    return (slice(lo0, hi0 + 1), slice(lo1, hi1 + 1), slice(lo2, hi2 + 1)), int(count)


@dataclass(frozen=True)
class OrganIndex:
    """What planning needs to know about an organ mask, computed once per scan.

    Planning reads the whole mask to find the organ's bounding box: the one cost of a sample
    that grows with the scan. Code that draws many samples from one unchanging mask (a batch
    of N per case, a loader revisiting a case) can index it once with :func:`index_organ`
    and pass ``organ_index=`` to :func:`make_plan` / :func:`synthgen.synthesize`.

    Attributes:
        bbox: The organ's bounding box, one slice per axis.
        count: Number of organ voxels.
        shape: Shape of the mask it was computed from.
    """

    bbox: tuple[slice, slice, slice]
    count: int
    shape: tuple[int, int, int]
    #: Per-scan results planning may reuse (the bright-voxel vessel fallback).
    cache: dict = field(default_factory=dict, compare=False, repr=False, hash=False)


def index_organ(organ_mask: np.ndarray) -> OrganIndex:
    """Index an organ mask once (see :class:`OrganIndex`); ``ValueError`` if it is empty."""
    if not hasattr(organ_mask, "shape") or len(organ_mask.shape) != 3:
        raise ValueError("organ_mask must be a 3-D array")
    bbox, count = organ_bbox(organ_mask)
    return OrganIndex(bbox=bbox, count=count, shape=tuple(int(n) for n in organ_mask.shape))


# --------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------


def _scan_cache(organ_index: OrganIndex | None, image, bbox) -> dict | None:
    """This scan's entry of ``organ_index.cache`` (``None`` without an index).

    What planning derives from the image and the mask (slice candidates, the bright-voxel
    vessel fallback) is kept there for the next plan of the same scan. The entry is keyed by
    a fingerprint of the image inside the organ's box (a strided sample), so an index reused
    with another image starts afresh; one scan is kept at a time.
    """
    if organ_index is None:
        return None
    sub = np.ascontiguousarray(np.asarray(image[tuple(slice(b.start, b.stop, 7) for b in bbox)]))
    key = (tuple(image.shape), str(sub.dtype), hash(sub.tobytes()))
    entry = organ_index.cache.get(key)
    if entry is None:
        organ_index.cache.clear()
        entry = organ_index.cache[key] = {}
    return entry


def _uniform(rng: np.random.Generator, lo: float, hi: float, integer: bool) -> float:
    if integer:
        return float(rng.integers(math.ceil(lo), math.floor(hi) + 1))
    return uniform(rng, lo, hi) if hi > lo else float(lo)


def _row_norm(row: Sequence[float], radii: Sequence[float]) -> float:
    """``|row * radii|``: ``np.sqrt(((row * radii) ** 2).sum())`` in NumPy's summation order
    for three terms, ``(a + b) + c``, on Python floats (the same IEEE operations)."""
    a, b, c = row[0] * radii[0], row[1] * radii[1], row[2] * radii[2]
    return math.sqrt((a * a + b * b) + c * c)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.standard_normal(4)
    q /= np.linalg.norm(q)
    w, x, y, z = q.tolist()  # Python floats: the same IEEE arithmetic, less overhead
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _measure_organ_hu(image, organ_mask, bbox, count) -> float:
    """Median HU of the organ from a strided sample of about 20,000 of its voxels."""
    step = sample_step(count)
    sl = tuple(slice(s.start, s.stop, step) for s in bbox)
    m = _binary(organ_mask[sl])
    vals = np.asarray(image[sl])[m]
    if vals.size == 0:
        vals = np.asarray(image[bbox])[_binary(organ_mask[bbox])]
    from ._cpu_kernels import median

    return median(vals)  # (np.median's value; counted for an integer image)


class _Placer:
    """Draws tumor centres following the preset's placement rules."""

    def __init__(self, image, organ_mask, preset: Preset, spacing, bbox, axis, cache=None):
        self.image = image
        self.mask = organ_mask
        self.p = preset.placement
        self.spacing = spacing
        self.bbox = bbox
        self.axis = axis
        self.inplane = [a for a in range(3) if a != axis]
        self.radius = tuple(round(self.p.erosion_mm / spacing[a]) for a in self.inplane)
        # a slice's flat candidate index -> voxel: the in-plane row length and box origin
        self._width = int(bbox[self.inplane[1]].stop - bbox[self.inplane[1]].start)
        self._origin = (int(bbox[self.inplane[0]].start), int(bbox[self.inplane[1]].start))
        # Candidates per slice; shared by every plan of a scan through its OrganIndex.
        key = ("slices", axis, self.p.tissue_hu, tuple((b.start, b.stop) for b in bbox))
        self._cache = cache if cache is not None else {}
        self._slices: dict[int, tuple[np.ndarray, np.ndarray]] = self._cache.setdefault(key, {})
        # A device image's tissue window over the box (PackedMask), made once and shared the
        # same way.
        self._window_key = ("window", *key[2:])

    def _slice(self, z: int) -> tuple[np.ndarray, np.ndarray]:
        """Organ mask of slice ``z`` (in-plane bbox) and the flat indices of its candidates
        (organ voxels, within the tissue window if the preset has one)."""
        if z in self._slices:
            return self._slices[z]
        sl = list(self.bbox)
        sl[self.axis] = z
        # a copy: the slice is cached (per scan) and must not follow later edits of the mask
        m = np.array(_binary(np.asarray(self.mask[tuple(sl)])), dtype=bool, copy=True, order="C")
        cand = m
        if self.p.tissue_hu is not None:
            lo, hi = self.p.tissue_hu
            if hasattr(self.image, "within"):  # a device view: the whole box's window, once
                window = self._cache.get(self._window_key)
                if window is None:
                    window = self._cache[self._window_key] = self.image.within(self.bbox, lo, hi)
                rel: list = [slice(None)] * 3
                rel[self.axis] = z - self.bbox[self.axis].start
                cand = m & window[tuple(rel)]
            else:
                img = np.asarray(self.image[tuple(sl)])
                cand = m & ((img >= lo) & (img <= hi))
        self._slices[z] = (m, np.flatnonzero(cand))
        return self._slices[z]

    def _eroded_ok(self, m: np.ndarray, u: int, v: int) -> bool:
        """Whether the erosion square around ``(u, v)`` lies inside the organ slice."""
        from ._cpu_kernels import window_all

        r0, r1 = self.radius
        if u - r0 < 0 or v - r1 < 0 or u + r0 >= m.shape[0] or v + r1 >= m.shape[1]:
            return False
        return window_all(m, u - r0, u + r0 + 1, v - r1, v + r1 + 1)

    def _draw_in_slice(self, rng: np.random.Generator, z: int) -> tuple[int, int, int] | None:
        """A uniform voxel of the eroded slice ``z`` (rejection sampling, exact), or None."""
        m, cand = self._slice(z)
        if cand.size == 0:
            return None
        if not any(self.radius):
            return self._to_vox(z, cand[rng.integers(cand.size)])
        for _ in range(32):
            f = int(cand[rng.integers(cand.size)])
            u, v = divmod(f, m.shape[1])
            if self._eroded_ok(m, u, v):
                return self._to_vox(z, f)
        # Mostly boundary: enumerate the eroded set once and draw from it.
        from scipy.ndimage import binary_erosion

        r0, r1 = self.radius
        er = binary_erosion(m, structure=np.ones((2 * r0 + 1, 2 * r1 + 1), bool))
        ok = cand[er.ravel()[cand]]
        if ok.size == 0:
            return None
        return self._to_vox(z, ok[rng.integers(ok.size)])

    def _to_vox(self, z: int, flat: int) -> tuple[int, int, int]:
        u, v = divmod(int(flat), self._width)
        c = [0, 0, 0]
        c[self.axis] = int(z)
        c[self.inplane[0]] = self._origin[0] + u
        c[self.inplane[1]] = self._origin[1] + v
        return (c[0], c[1], c[2])

    def center(self) -> tuple[int, int, int]:
        """The organ voxel nearest (in mm) to the centre of the organ's bounding box: the box
        centre itself for a compact organ, a voxel of the organ for a curved one (a
        pancreas, whose box centre often lies outside it)."""
        c = [int((s.start + s.stop - 1) // 2) for s in self.bbox]
        if bool(
            _binary(np.asarray(self.mask[c[0] : c[0] + 1, c[1] : c[1] + 1, c[2] : c[2] + 1])).any()
        ):
            return (c[0], c[1], c[2])
        idx = np.argwhere(_binary(np.asarray(self.mask[self.bbox])))
        rel = (idx + [s.start for s in self.bbox] - c) * np.asarray(self.spacing)
        best = idx[int(np.argmin((rel**2).sum(axis=1)))]
        return tuple(int(b + s.start) for b, s in zip(best, self.bbox, strict=True))  # type: ignore[return-value]

    def draw(self, rng: np.random.Generator, at_center: bool) -> tuple[int, int, int]:
        if at_center:
            return self.center()
        zlo, zhi = self.bbox[self.axis].start, self.bbox[self.axis].stop - 1
        for w in (self.p.z_window, *self.p.widen):
            for _ in range(8):
                z = round(zlo + uniform(rng, w[0], w[1]) * (zhi - zlo))
                c = self._draw_in_slice(rng, z)
                if c is not None:
                    return c
        # Last resort: every slice of the organ, in a random order.
        for z in rng.permutation(np.arange(zlo, zhi + 1)):
            c = self._draw_in_slice(rng, int(z))
            if c is not None:
                return c
        raise PlacementError(
            "organ too small for its placement rules: no voxel is left after "
            f"{self.p.erosion_mm} mm erosion"
            + (f" within the tissue window {self.p.tissue_hu} HU" if self.p.tissue_hu else "")
        )


def _class_counts(
    preset: Preset, size: str, rng: np.random.Generator
) -> list[tuple[SizeClass, int]]:
    c = preset.size_class(size)
    if c.composite:
        assert c.components is not None
        return [
            (preset.classes[name], int(rng.integers(lo, hi + 1)))
            for name, (lo, hi) in c.components.items()
        ]
    return [(c, int(rng.integers(c.count[0], c.count[1] + 1)))]


def make_plan(
    image: np.ndarray,
    organ_mask: np.ndarray,
    *,
    organ: str | Path | Preset,
    seed: int,
    spacing: Sequence[float] | None = None,
    affine: np.ndarray | None = None,
    size: str | None = None,
    organ_index: OrganIndex | None = None,
    vessel_mask: np.ndarray | None = None,
    lesion_mask: np.ndarray | None = None,
) -> Plan:
    """Sample every random choice of one sample into a :class:`Plan`.

    Placement is anatomy-aware when the preset asks for it (``[placement]`` keys
    ``vessel_clearance_mm``, ``gap_mm``, ``confluence``): each tumor's undeformed ellipsoid
    keeps ``vessel_clearance_mm`` from the vessels and ``gap_mm`` from existing lesions, and
    the tumors' bounding spheres stay ``gap_mm`` apart unless ``confluence``. Centres are
    rejection-sampled (a bounded number of draws); when none fits, the clearances are halved,
    then dropped, then only the centre must stay clear, and only then a ``ValueError`` is
    raised. Classes placed at the organ centre keep that centre. Only the organ's bounding
    box plus the clearance is read from the masks.

    Args:
        image: 3-D CT in HU (any numeric dtype; any array exposing ``shape``/indexing). A
            NumPy array in non-native byte order (nibabel's ``>i2``) or of float16 is read
            through a native-order (float32) copy: the plan is the native array's. Data on a
            GPU (CuPy, torch CUDA) is read through views that copy back only the organ's box
            and a few regions: the same plan as from the same values on the host.
        organ_mask: 3-D organ mask on the same grid (bool, or numbers binarised at > 0.5; any
            byte order).
        organ: Organ name (its default preset), preset name, preset file path or
            :class:`~synthgen.presets.Preset`.
        seed: Seed of this sample (any non-negative int); nothing global is used.
        spacing: Voxel size in mm per array axis; read from ``affine`` when omitted.
        affine: Optional 4x4 voxel-to-world affine: gives the spacing and the
            cranio-caudal axis (axis 2 is assumed without it).
        size: Size class to force (``"tiny"``, ``"large"``, ``"mix"``...); ``None`` draws one
            from the preset's mix.
        organ_index: The mask's :class:`OrganIndex` from :func:`index_organ`, to skip the
            whole-mask scan when sampling repeatedly from an unchanging mask.
        vessel_mask: Optional vessel mask on the same grid (bool, or numbers binarised at
            > 0.5), e.g. the union of AbdomenAtlas ``hepatic_vessel``,
            ``portal_vein_and_splenic_vein``, ``aorta`` and ``postcava``. Without it, a preset
            with ``vessel_clearance_mm > 0`` avoids bright voxels in and at the organ (brighter
            than the organ median by more than max(3 robust SD, 30 HU)); pass an all-False
            mask to avoid nothing.
        lesion_mask: Optional mask of lesions already in the scan (same grid): tumors keep
            ``gap_mm`` from them whatever the preset.

    Returns:
        The plan.

    Raises:
        ValueError: Bad shapes, spacing, organ or preset; empty organ; organ too small;
            no tumor position left clear of the vessels, lesions or other tumors.
    """
    preset = load_preset(organ)
    if organ_index is not None and not isinstance(organ_index, OrganIndex):
        raise ValueError(
            "organ_index must be an OrganIndex from synthgen.index_organ(organ_mask), got "
            f"{type(organ_index).__name__}"
        )
    # CPU tensors (any dtype, bfloat16 included) are planned from NumPy views, as rendered
    image, organ_mask, vessel_mask, lesion_mask = map(
        _cpu_tensor_view, (image, organ_mask, vessel_mask, lesion_mask)
    )
    from . import _device

    if _device._array_device(image) is not None or _device._array_device(organ_mask) is not None:
        # GPU data (CuPy arrays, torch CUDA tensors): read through planning's views, which
        # copy back the organ's box and a few regions, on the data's device and stream (as
        # synthesize does; vessel and lesion masks are read region by region, see binary)
        from ._cuda import planning_views

        image, organ_mask, organ_index = planning_views(image, organ_mask, organ_index)
    check_arrays(image, organ_mask)
    # non-native byte order and float16: read through native (float32) copies
    image, organ_mask = readable(image), readable(organ_mask)
    vessel_mask, lesion_mask = readable(vessel_mask), readable(lesion_mask)
    sp = resolve_spacing(spacing, affine)
    _warn_odd_inputs(image, sp, affine if spacing is not None else None)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    rng = np.random.default_rng(int(seed))
    names = list(preset.mix)
    if size is None:
        w = np.array([preset.mix[n] for n in names], dtype=np.float64)
        size = names[int(rng.choice(len(names), p=w / w.sum()))]
    else:
        preset.size_class(size)  # validates the name

    if organ_index is None:
        bbox, count = organ_bbox(organ_mask)
    else:
        if tuple(organ_index.shape) != tuple(organ_mask.shape):
            raise ValueError(
                f"organ_index is for shape {organ_index.shape}, mask is {tuple(organ_mask.shape)}"
            )
        bbox, count = organ_index.bbox, organ_index.count
    if not all_finite(image, bbox):
        raise ValueError("image contains NaN or inf inside the organ's bounding box")

    voxel_mm3 = sp[0] * sp[1] * sp[2]
    plan_classes = _class_counts(preset, size, rng)
    smallest = min(c.radius_mm[0] for c, n in plan_classes if n > 0) if plan_classes else 1.0
    if count * voxel_mm3 < (4.0 / 3.0) * math.pi * smallest**3:
        raise PlacementError(
            f"organ too small for class {size!r}: organ volume {count * voxel_mm3:.0f} mm^3 is "
            f"below the smallest tumor of the class ({smallest:g} mm radius)"
        )

    need_hu = preset.contrast.mode == "relative" or any(
        c.exophytic_probability > 0 or not preset.shape.clip_to_organ for c, _ in plan_classes
    )
    scan_cache = _scan_cache(organ_index, image, bbox)
    cache = scan_cache if scan_cache is not None else {}
    organ_hu = None
    if need_hu:  # per scan: measured once when an OrganIndex carries the cache
        organ_hu = cache.get("organ_hu")
        if organ_hu is None:
            organ_hu = cache["organ_hu"] = _measure_organ_hu(image, organ_mask, bbox, count)
    noise_hu = noise_grain = None
    if preset.appearance.noise_match:
        from ._appearance import measure_noise

        if "noise" not in cache:
            cache["noise"] = measure_noise(image, organ_mask, bbox, count)
        noise_hu, noise_grain = cache["noise"]
    axis = craniocaudal_axis(affine)
    placer = _Placer(image, organ_mask, preset, sp, bbox, axis, scan_cache)
    pp = preset.placement
    keep_clear = Constraints(
        image,
        organ_mask,
        bbox,
        sp,
        vessel_clearance_mm=pp.vessel_clearance_mm,
        gap_mm=pp.gap_mm,
        confluence=pp.confluence,
        vessel_mask=vessel_mask,
        lesion_mask=lesion_mask,
        cache=scan_cache,
    )
    g = preset.shape.control_points
    tumors: list[TumorPlan] = []
    tumor_seeds = derive_seeds(int(seed), sum(n for _, n in plan_classes))
    for cls, n in plan_classes:
        for _ in range(n):
            idx = len(tumors)
            if preset.wall is not None:  # hollow organ: a thickened wall segment
                tumors.append(
                    _wall_tumor(
                        preset, cls, rng, idx, int(seed), image, organ_mask, sp, placer, keep_clear
                    )
                )
                continue
            radii = tuple(_uniform(rng, *cls.radius_mm, cls.radius_integer) for _ in range(3))
            sigma = _uniform(rng, *cls.elastic_sigma_mm, cls.elastic_sigma_integer)
            rot = _random_rotation(rng) if preset.shape.rotate else np.eye(3)
            # the radius bound per axis, |row of R diag(radii)|, in NumPy's summation order
            # ((a + b) + c) on Python floats
            rows = rot.tolist()
            extent = tuple(_row_norm(row, radii) + 3.0 * sigma for row in rows)
            disp = (
                rng.normal(0.0, sigma, size=(3, g, g, g)) if sigma > 0 else np.zeros((3, g, g, g))
            )
            blur = _uniform(rng, *preset.blend.sigma_mm, False)
            centre = keep_clear.place(
                lambda gen, at=cls.at_organ_center: placer.draw(gen, at),
                rng,
                (int(seed), idx, PLACEMENT_STREAM),
                radii,
                rot,
                fixed=cls.at_organ_center,
                label=f"{cls.name} tumor {idx}",
            )
            clip = preset.shape.clip_to_organ and not (rng.random() < cls.exophytic_probability)
            contrast = _draw_contrast(preset, rng, organ_hu)
            texture = _draw_texture(preset, rng)
            tumors.append(
                TumorPlan(
                    index=idx,
                    size_class=cls.name,
                    center_vox=centre,
                    radii_mm=radii,  # type: ignore[arg-type]
                    rotation=tuple(rows[0] + rows[1] + rows[2]),
                    control_extent_mm=extent,  # type: ignore[arg-type]
                    displacement_mm=ControlGrid(disp),
                    elastic_sigma_mm=float(sigma),
                    blur_sigma_mm=float(blur),
                    contrast_hu=float(contrast),
                    clip_to_organ=bool(clip),
                    texture=texture,
                    seed=tumor_seeds[idx],
                    appearance=draw_appearance(preset.appearance, int(seed), idx, radii, contrast),
                )
            )
    return Plan(
        seed=int(seed),
        preset=preset._schema_dict,
        size_class=size,
        shape=tuple(int(s) for s in image.shape),  # type: ignore[arg-type]
        spacing=sp,
        organ_hu=organ_hu,
        organ_bbox=[[s.start, s.stop] for s in bbox],
        organ_noise_hu=noise_hu,
        organ_noise_grain=noise_grain,
        tumors=tumors,
    )


def _wall_tumor(preset, cls, rng, idx, seed, image, organ_mask, sp, placer, keep_clear):
    """A hollow-organ wall tumor (see :mod:`synthgen._hollow`): the random numbers first,
    then a wall voxel by the placement rules, then the local lumen geometry around it."""
    from ._hollow import draw_wall, locate_wall

    wp = preset.wall
    half = _uniform(rng, *cls.radius_mm, cls.radius_integer)
    thick = cls.wall_thickness_mm if cls.wall_thickness_mm is not None else wp.thickness_mm
    draws = draw_wall(rng, wp, half, thick, cls.wall_modes)
    blur = _uniform(rng, *preset.blend.sigma_mm, False)
    texture = _draw_texture(preset, rng)
    radii = (half, half, half)
    p0 = keep_clear.place(
        lambda gen: placer.draw(gen, False),
        rng,
        (seed, idx, PLACEMENT_STREAM),
        radii,
        np.eye(3),
        label=f"{cls.name} wall tumor {idx}",
    )
    wall = locate_wall(image, organ_mask, p0, sp, draws)
    axis = np.asarray(wall["axis"])
    normal = np.asarray(wall["normal"])
    rot = np.stack([axis, normal, np.cross(axis, normal)], axis=1)
    return TumorPlan(
        index=idx,
        size_class=cls.name,
        center_vox=tuple(round(v) for v in wall["center_vox"]),  # type: ignore[arg-type]
        radii_mm=radii,
        rotation=tuple(float(x) for x in rot.ravel()),
        control_extent_mm=(half, half, half),
        displacement_mm=ControlGrid(),
        elastic_sigma_mm=0.0,
        blur_sigma_mm=float(blur),
        contrast_hu=0.0,
        clip_to_organ=True,
        texture=texture,
        seed=derive_seed(seed, idx),
        kind="wall",
        wall=wall,
    )


def _draw_texture(preset: Preset, rng: np.random.Generator) -> dict[str, float]:
    """One draw of the preset's texture recipe (the published parameter sets)."""
    tx = preset.texture
    return {
        "sigma_a_mm": float(tx.sigma_a_mm[int(rng.integers(len(tx.sigma_a_mm)))]),
        "sigma_b_mm": float(tx.sigma_b_mm[int(rng.integers(len(tx.sigma_b_mm)))]),
        "scale": uniform(rng, *tx.scale),
        "base": uniform(rng, *tx.base),
        "u0": uniform(rng, *tx.u0),
        "threshold": tx.threshold,
        "range_sd": tx.range_sd,
    }


def _draw_contrast(preset: Preset, rng: np.random.Generator, organ_hu: float | None) -> float:
    c = preset.contrast
    if c.mode == "absolute":
        d = uniform(rng, *c.delta_hu)
    else:
        assert organ_hu is not None
        f = uniform(rng, *c.fraction)
        d = float(np.clip(f * (organ_hu - c.reference_hu), *c.delta_hu))
    if c.hyperdense_probability > 0 and rng.random() < c.hyperdense_probability:
        d = -d
    return d
