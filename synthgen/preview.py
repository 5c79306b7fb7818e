"""Quick-look PNG previews of synthesized samples: axial, coronal and sagittal slices per tumor.

One row per tumor (at most ``max_tumors``), three columns (axial, coronal, sagittal) through the
tumor centre, with the CT windowed (default abdomen window L40/W400 HU), the organ outlined in
cyan and the tumor in red. The volume is reoriented with nibabel's orientation tools to RAS+
voxel order (a view: no copy), so any axis order or flip of the scan displays correctly, and
each slice is drawn in millimetres so anisotropic scans keep their physical aspect ratio.
Display follows the radiological convention: patient right on the image left, anterior up in
axial slices, superior up in coronal and sagittal slices (sagittal: anterior on the left).

Matplotlib is imported lazily inside the rendering functions (``import synthgen.preview`` does
not import it) and used through its object API with the Agg canvas: no pyplot, no global state.

Example:
    >>> from synthgen.preview import write_preview  # doctest: +SKIP
    >>> write_preview("demo-out/liver")  # writes demo-out/liver/preview.png  # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from nibabel.affines import voxel_sizes
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)

from .io import atomic_write_bytes, load_nifti

__all__ = ["preview_arrays", "write_preview"]

_RAS = axcodes2ornt(("R", "A", "S"))
_PANEL_IN = 3.2  # width and height of one panel, inches
_TITLE_IN = 0.35  # extra figure height for the figure title, inches
_DPI = 100
_ORGAN_COLOUR = "#00e5ff"
_TUMOR_COLOUR = "red"
_VIEWS = ("axial", "coronal", "sagittal")


# --------------------------------------------------------------------------------------
# reorientation
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Canonical:
    """How to view an array of shape ``in_shape`` in RAS+ voxel order.

    Attributes:
        transform: ``(3, 2)`` nibabel orientation transform from the array's axes to RAS+:
            array axis ``i`` becomes axis ``transform[i, 0]``, flipped if ``transform[i, 1]``
            is -1.
        in_shape: Shape of the original array.
        shape: Shape of the reoriented array (axes: left->right, posterior->anterior,
            inferior->superior).
        affine: 4x4 voxel-to-world affine of the reoriented array, mm.
        spacing: Voxel size of the reoriented array along (R, A, S), mm.
    """

    transform: np.ndarray
    in_shape: tuple[int, int, int]
    shape: tuple[int, int, int]
    affine: np.ndarray
    spacing: tuple[float, float, float]

    def view(self, arr: np.ndarray) -> np.ndarray:
        """The array in RAS+ voxel order (a flipped/transposed view, no copy)."""
        return apply_orientation(arr, self.transform)

    def index(self, ijk: Sequence[float]) -> tuple[int, int, int]:
        """Map a voxel index of the original array to the reoriented one.

        Args:
            ijk: ``(i, j, k)`` in the original array's index order; non-integers are rounded.

        Returns:
            The same voxel's index in :meth:`view` of the array.

        Raises:
            ValueError: Not three values, or outside the array.
        """
        if len(ijk) != 3:
            raise ValueError(f"a voxel centre needs 3 indices, got {list(ijk)!r}")
        out = [0, 0, 0]
        for ax in range(3):
            n = self.in_shape[ax]
            v = int(np.floor(float(ijk[ax]) + 0.5))
            if not 0 <= v < n:
                raise ValueError(
                    f"voxel centre {tuple(ijk)} is outside the array of shape {self.in_shape}"
                )
            if self.transform[ax, 1] < 0:
                v = n - 1 - v
            out[int(self.transform[ax, 0])] = v
        return out[0], out[1], out[2]


def _canonical(affine: np.ndarray, shape: Sequence[int]) -> _Canonical:
    """Orientation transform of an array with this affine and shape to RAS+ voxel order.

    Args:
        affine: 4x4 voxel-to-world matrix (mm); oblique affines map to the closest axes.
        shape: Shape of the 3-D array.

    Raises:
        ValueError: Not a finite 4x4 matrix, or its axes are degenerate.
    """
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {aff.shape}")
    shp = tuple(int(s) for s in shape)
    if len(shp) != 3:
        raise ValueError(f"expected a 3-D array, got shape {shp}")
    ornt = io_orientation(aff)
    if np.isnan(ornt).any():
        raise ValueError("affine is singular: cannot tell the axial/coronal/sagittal axes")
    t = ornt_transform(ornt, _RAS)
    new_aff = aff @ inv_ornt_aff(t, shp)
    new_shape = [0, 0, 0]
    for ax in range(3):
        new_shape[int(t[ax, 0])] = shp[ax]
    sp = voxel_sizes(new_aff)
    return _Canonical(
        transform=t,
        in_shape=(shp[0], shp[1], shp[2]),
        shape=(new_shape[0], new_shape[1], new_shape[2]),
        affine=new_aff,
        spacing=(float(sp[0]), float(sp[1]), float(sp[2])),
    )


# --------------------------------------------------------------------------------------
# slices
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Panel:
    """One 2-D slice ready to draw (display orientation: row 0 at the top).

    Attributes:
        view: ``"axial"``, ``"coronal"`` or ``"sagittal"``.
        image: The CT slice, HU, float32.
        label: The label slice (same dtype as the label map).
        extent: ``(left, right, bottom, top)`` for ``imshow``, mm.
        sides: Patient directions at the (left, right, top, bottom) image edges.
    """

    view: str
    image: np.ndarray
    label: np.ndarray
    extent: tuple[float, float, float, float]
    sides: tuple[str, str, str, str]


def _display(s: np.ndarray) -> np.ndarray:
    # A RAS+ slice indexed (horizontal axis, vertical axis) -> rows top-down, columns
    # left-right with both axes reversed: patient right / anterior on the left, anterior /
    # superior at the top (radiological convention).
    return s.T[::-1, ::-1]


def _panels(
    image_ras: np.ndarray, label_ras: np.ndarray, spacing: Sequence[float], c: Sequence[int]
) -> list[_Panel]:
    """Axial, coronal and sagittal panels through voxel ``c`` of RAS+-ordered arrays.

    Args:
        image_ras: CT in RAS+ voxel order, HU.
        label_ras: Label map in RAS+ voxel order.
        spacing: Voxel size along (R, A, S), mm.
        c: Centre, RAS+ voxel index.
    """
    x, y, z = (int(v) for v in c)
    nx, ny, nz = image_ras.shape
    sx, sy, sz = (float(s) for s in spacing)
    cuts = (
        ("axial", (slice(None), slice(None), z), nx * sx, ny * sy, ("R", "L", "A", "P")),
        ("coronal", (slice(None), y, slice(None)), nx * sx, nz * sz, ("R", "L", "S", "I")),
        ("sagittal", (x, slice(None), slice(None)), ny * sy, nz * sz, ("A", "P", "S", "I")),
    )
    out = []
    for view, sl, w, h, sides in cuts:
        out.append(
            _Panel(
                view=view,
                image=np.asarray(_display(image_ras[sl]), dtype=np.float32),  # 2-D copy only
                label=np.ascontiguousarray(_display(label_ras[sl])),
                extent=(0.0, w, 0.0, h),
                sides=sides,
            )
        )
    return out


def _default_centre(label: np.ndarray) -> tuple[tuple[int, int, int], str]:
    """Centre of the organ's (``label >= 1``) bounding box, else of the volume (array order)."""
    m = label >= 1
    if not m.any():
        return tuple(int(n) // 2 for n in label.shape), "volume centre"  # type: ignore[return-value]
    c = []
    for ax in range(3):
        hit = np.flatnonzero(m.any(axis=tuple(a for a in range(3) if a != ax)))
        c.append((int(hit[0]) + int(hit[-1])) // 2)
    return (c[0], c[1], c[2]), "organ centre"


# --------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------


def _contour(ax: Any, mask: np.ndarray, colour: str, extent: tuple[float, ...]) -> None:
    if min(mask.shape) < 2 or not mask.any() or mask.all():
        return  # nothing to outline (and contour() would warn)
    ax.contour(
        mask.astype(np.float32),
        levels=[0.5],
        colors=[colour],
        linewidths=0.9,
        origin="upper",
        extent=extent,
    )


def _render_png(
    rows: Sequence[tuple[str, str | None, list[_Panel]]],
    title: str | None,
    window: tuple[float, float],
) -> bytes:
    """Draw the panel grid with the Agg canvas and return the PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    level, width = float(window[0]), float(window[1])
    lo, hi = level - width / 2.0, level + width / 2.0
    n = len(rows)
    fig = Figure(
        figsize=(3 * _PANEL_IN, n * _PANEL_IN + (_TITLE_IN if title else 0.0)),
        dpi=_DPI,
        layout="constrained",
    )
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, 3, squeeze=False)
    for r, (name, note, panels) in enumerate(rows):
        for col, p in enumerate(panels):
            ax = axes[r, col]
            ax.set_facecolor("black")
            ax.imshow(p.image, cmap="gray", vmin=lo, vmax=hi, extent=p.extent, origin="upper")
            _contour(ax, p.label >= 1, _ORGAN_COLOUR, p.extent)
            _contour(ax, p.label == 2, _TUMOR_COLOUR, p.extent)
            ax.set_xlim(p.extent[0], p.extent[1])
            ax.set_ylim(p.extent[2], p.extent[3])
            ax.set_xticks([])
            ax.set_yticks([])
            head = f"{name} {p.view}"
            if note and col == 0:
                head += f"\n{note}"
            ax.set_title(head, fontsize=8)
            style = {"transform": ax.transAxes, "color": "yellow", "fontsize": 7}
            left, right, top, bottom = p.sides
            ax.text(0.02, 0.5, left, ha="left", va="center", **style)
            ax.text(0.98, 0.5, right, ha="right", va="center", **style)
            ax.text(0.5, 0.98, top, ha="center", va="top", **style)
            ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
    if title:
        fig.suptitle(title, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, facecolor="white")
    return buf.getvalue()


def preview_arrays(
    image: np.ndarray,
    label: np.ndarray,
    affine: np.ndarray,
    centers_vox: Sequence[Sequence[float]],
    out_png: str | Path,
    *,
    title: str | None = None,
    window: tuple[float, float] = (40.0, 400.0),
    max_tumors: int = 6,
    row_notes: Sequence[str | None] | None = None,
) -> Path:
    """Write a PNG with axial, coronal and sagittal slices through each tumor centre.

    Args:
        image: 3-D CT in HU, any numeric dtype and any axis order (read from ``affine``).
        label: Label map on the same grid: 0 background, 1 organ, 2 tumor.
        affine: 4x4 voxel-to-world matrix, mm.
        centers_vox: Tumor centres as ``(i, j, k)`` voxel indices in the arrays' own index
            order (floats are rounded). Empty: one row through the centre of the organ's
            (``label >= 1``) bounding box, or of the volume when there is no organ.
        out_png: Output path; written atomically (temporary file, then rename).
        title: Figure title.
        window: CT display window ``(level, width)``, HU (default abdomen L40/W400).
        max_tumors: Most rows drawn; later centres are left out (the title says so).
        row_notes: Optional second title line per centre (e.g. diameter and contrast);
            same length as ``centers_vox``.

    Returns:
        ``out_png`` as a ``Path``.

    Raises:
        ValueError: Non-3-D or mismatched arrays, bad affine, centre outside the volume,
            non-positive window width or ``max_tumors`` below 1, ``row_notes`` of the wrong
            length.
    """
    img = np.asanyarray(image)
    lab = np.asanyarray(label)
    if img.ndim != 3:
        raise ValueError(f"image must be 3-D, got shape {img.shape}")
    if lab.shape != img.shape:
        raise ValueError(f"label shape {lab.shape} differs from image shape {img.shape}")
    if not float(window[1]) > 0:
        raise ValueError(f"window width must be > 0 HU, got {window[1]!r}")
    if max_tumors < 1:
        raise ValueError(f"max_tumors must be >= 1, got {max_tumors}")
    centres = list(centers_vox)
    notes: list[str | None] = list(row_notes) if row_notes is not None else [None] * len(centres)
    if len(notes) != len(centres):
        raise ValueError(f"row_notes has {len(notes)} entries for {len(centres)} centres")
    canon = _canonical(affine, img.shape)
    img_ras, lab_ras = canon.view(img), canon.view(lab)

    rows: list[tuple[str, str | None, list[_Panel]]] = []
    if centres:
        for n, (c, note) in enumerate(zip(centres[:max_tumors], notes, strict=False)):
            panels = _panels(img_ras, lab_ras, canon.spacing, canon.index(c))
            rows.append((f"tumor {n + 1}", note, panels))
    else:
        c, name = _default_centre(lab)
        rows.append((name, None, _panels(img_ras, lab_ras, canon.spacing, canon.index(c))))
    if len(centres) > max_tumors:
        more = f"showing {max_tumors} of {len(centres)} tumors"
        title = f"{title} ({more})" if title else more
    out = Path(out_png)
    atomic_write_bytes(out, _render_png(rows, title, window))
    return out


# --------------------------------------------------------------------------------------
# sample folders
# --------------------------------------------------------------------------------------


def _tumor_note(t: dict[str, Any], organ: str | None) -> str | None:
    parts = [organ] if organ else []
    radii = t.get("radii_mm")
    if radii:
        parts.append(f"d {2.0 * max(float(r) for r in radii):.1f} mm")
    contrast = t.get("mean_contrast_hu", t.get("contrast_hu"))
    if contrast is not None and np.isfinite(float(contrast)):
        parts.append(f"contrast {float(contrast):.0f} HU")
    if t.get("volume_mm3") is not None:
        parts.append(f"{float(t['volume_mm3']) / 1000.0:.2f} mL")
    return ", ".join(parts) or None


def _read_tumors_json(path: Path) -> tuple[list[tuple[float, ...]], list[str | None], str]:
    """Centres, row notes and a title suffix from a ``tumors.json`` (one organ or ``organs``).

    Raises:
        ValueError: Unreadable or malformed file (the message names it).
    """
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON ({type(e).__name__}: {e})") from None
    try:
        multi = isinstance(doc, dict) and "organs" in doc
        entries = doc["organs"] if multi else [doc]
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise TypeError("expected an object, or one with an 'organs' list of objects")
        centres: list[tuple[float, ...]] = []
        notes: list[str | None] = []
        info: list[str] = []
        for entry in entries:
            plan = entry.get("plan") or {}
            organ = entry.get("organ") or (plan.get("preset") or {}).get("organ")
            tumors = entry.get("tumors")
            if tumors is None:
                tumors = plan.get("tumors", [])
            for t in tumors:
                c = tuple(float(v) for v in t["center_vox"])
                if len(c) != 3:
                    raise ValueError(f"center_vox needs 3 values, got {t['center_vox']!r}")
                centres.append(c)
                notes.append(_tumor_note(t, organ if multi else None))
            if plan.get("size_class") and not multi:
                info.append(f"{plan.get('preset', {}).get('name', organ)} ({plan['size_class']})")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: malformed tumors file ({type(e).__name__}: {e})") from None
    return centres, notes, ", ".join(info)


def _component_centres(
    label: np.ndarray, voxel_mm3: float
) -> tuple[list[tuple[float, ...]], list[str | None]]:
    """Centroids of the connected components of ``label == 2``, largest first (array order)."""
    from scipy import ndimage

    comps, n = ndimage.label(label == 2)
    if n == 0:
        return [], []
    sizes = np.bincount(comps.ravel(), minlength=n + 1)[1:]
    order = np.argsort(-sizes, kind="stable")
    com = ndimage.center_of_mass(comps > 0, comps, [int(i) + 1 for i in order])
    notes: list[str | None] = [f"{sizes[i] * voxel_mm3 / 1000.0:.2f} mL" for i in order]
    return [tuple(float(v) for v in c) for c in com], notes


def write_preview(sample_dir: str | Path, out_png: str | Path | None = None, **kw: Any) -> Path:
    """Write the preview PNG of a sample folder (``ct.nii.gz``, ``label.nii.gz``, ...).

    Tumor centres (and the diameter ``2 * max(radii_mm)``, contrast and volume shown in the row
    titles) come from ``tumors.json`` when present, either one organ's
    ``{"plan": ..., "tumors": [...]}`` or ``{"organs": [{"organ": ..., "plan": ...,
    "tumors": [...]}, ...]}``; without it, from the centroids of the connected components of
    ``label == 2``, largest first.

    Args:
        sample_dir: Folder holding ``ct.nii.gz`` (HU) and ``label.nii.gz`` (0/1/2).
        out_png: Output path (default ``sample_dir / "preview.png"``).
        **kw: Passed to :func:`preview_arrays` (``title``, ``window``, ``max_tumors``,
            ``row_notes``).

    Returns:
        The PNG path.

    Raises:
        ValueError: ``ct.nii.gz`` or ``label.nii.gz`` missing or unreadable, shapes that
            differ, or a malformed ``tumors.json`` (the message names the file).
    """
    d = Path(sample_dir)
    ct_path, label_path, json_path = d / "ct.nii.gz", d / "label.nii.gz", d / "tumors.json"
    image, affine, _ = load_nifti(ct_path)
    label, _, _ = load_nifti(label_path)
    if label.shape != image.shape:
        raise ValueError(
            f"{label_path}: shape {label.shape} differs from {ct_path.name} {image.shape}"
        )
    if json_path.is_file():
        centres, notes, info = _read_tumors_json(json_path)
    else:
        voxel_mm3 = float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])))
        centres, notes = _component_centres(label, voxel_mm3)
        info = ""
    n = len(centres)
    default_title = f"{d.name}: " + (f"{info}, " if info else "") + f"{n} tumor{'s' * (n != 1)}"
    kw.setdefault("title", default_title)
    kw.setdefault("row_notes", notes)
    return preview_arrays(
        image, label, affine, centres, d / "preview.png" if out_png is None else out_png, **kw
    )
