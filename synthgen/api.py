"""The one-call API: ``synthesize`` and the reusable ``Synthesizer``."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._device import array_kind
from .planning import OrganIndex, Plan, make_plan, unreadable
from .presets import Preset, list_presets, load_preset
from .rendering import RenderResult, needs_readable, readable_job
from .rendering import render as _render
from .rendering import render_batch as _render_batch

__all__ = ["SynthesisResult", "Synthesizer", "render", "render_batch", "synthesize"]

SynthesisResult = RenderResult


def synthesize(
    image: np.ndarray,
    organ_mask: np.ndarray,
    *,
    organ: str | Path | Preset,
    spacing: Sequence[float] | None = None,
    seed: int,
    size: str | None = None,
    device: str = "auto",
    out: np.ndarray | None = None,
    affine: np.ndarray | None = None,
    organ_index: OrganIndex | None = None,
    vessel_mask: np.ndarray | None = None,
    lesion_mask: np.ndarray | None = None,
    label_out=None,
    tumor_label: int = 2,
) -> SynthesisResult:
    """Implant synthetic tumors into one CT scan.

    Args:
        image: 3-D CT in HU, any numeric dtype (int16 stays int16: rounded and clipped to
            [-1024, 3071]): a NumPy or CuPy array or a torch tensor (a CPU tensor, bfloat16
            too, is read through NumPy views and the result image is a tensor). A NumPy
            array in non-native byte order (what nibabel gives for ``>i2`` files) is read
            through a native-order copy; the result image is then in native order, of the
            same kind and size (``>i2`` gives ``int16``). A float16 image is rendered as its
            float32 values and the result cast back to float16.
        organ_mask: 3-D organ mask on the same grid (bool, or numbers binarised at > 0.5; any
            byte order).
        organ: Organ name (``"liver"``: its default preset), preset name
            (``"liver-classic"``), path to a preset TOML file, or a ``Preset``.
        spacing: Voxel size in mm per array axis (e.g. ``(0.7, 0.7, 5.0)``); read from
            ``affine`` when omitted.
        seed: Seed of this sample; the same seed gives identical bytes.
        size: Size class to force (``"tiny"``, ``"small"``, ``"medium"``, ``"large"``,
            ``"mix"`` where defined); ``None`` draws one from the preset's mix.
        device: ``"auto"`` (follows the data: CuPy arrays and torch CUDA tensors on their
            GPU, NumPy on the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        out: Render into this caller-owned array, which already holds the image (it may be
            ``image`` itself for in-place use): only the tumors' boxes are touched, no
            full-volume copy is made. An ``out`` in non-native byte order or of float16 is
            written correctly too (keeping its dtype and byte order), through a full-volume
            working copy in native order (float32).
        affine: Optional voxel-to-world affine (spacing, cranio-caudal axis, world mm).
        organ_index: ``synthgen.index_organ(organ_mask)``, computed once for many samples
            from an unchanging mask: the per-sample cost then no longer grows with the scan.
        vessel_mask: Optional vessel mask on the same grid: tumors keep the preset's
            ``[placement] vessel_clearance_mm`` from it (without it, from bright voxels in
            and at the organ; an all-False mask avoids nothing). Only the organ's bounding
            box plus the clearance is read.
        lesion_mask: Optional mask of lesions already in the scan: tumors keep the preset's
            ``gap_mm`` from them.
        label_out: Optional caller-owned label map on the same grid (any integer or float
            dtype, any byte order): its tumor voxels are set to ``tumor_label`` in place by
            the render itself (warped first along with the image by a mass effect).
        tumor_label: The value tumor voxels get in ``label_out``.

    Returns:
        A result with ``.image``, ``.tumor_mask`` (bool), ``.label`` (uint8: 0 background,
        1 organ, 2 tumor), ``.plan`` and ``.tumors`` (one record per tumor). When the preset
        enables ``[mass_effect]``, large tumors first push the surrounding tissue (the image
        and the organ mask are warped alike, see :mod:`synthgen.mass_effect`): then
        ``.organ_mask`` is the warped mask and ``.label`` is built from it.

    Raises:
        ValueError: Non-3-D or mismatched arrays, empty or too small organ, NaN/inf in the
            image, non-positive spacing, unknown organ or preset, invalid preset file.
    """
    return Synthesizer(organ, device=device)(
        image,
        organ_mask,
        seed=seed,
        spacing=spacing,
        affine=affine,
        size=size,
        out=out,
        organ_index=organ_index,
        vessel_mask=vessel_mask,
        lesion_mask=lesion_mask,
        label_out=label_out,
        tumor_label=tumor_label,
    )


class Synthesizer:
    """A preset and settings held for repeated calls (a loader, a batch).

    Args:
        organ: Organ name, preset name, preset path or ``Preset``; loaded and validated once.
        spacing: Default voxel size (mm) for calls that give none.
        size: Default size class (``None``: the preset's mix).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (see :func:`synthesize`).

    Example:
        >>> syn = Synthesizer("liver-classic", spacing=(1.0, 1.0, 1.0))  # doctest: +SKIP
        >>> res = syn(ct, liver_mask, seed=7)  # doctest: +SKIP
    """

    def __init__(
        self,
        organ: str | Path | Preset,
        *,
        spacing: Sequence[float] | None = None,
        size: str | None = None,
        device: str = "auto",
    ) -> None:
        self.preset = load_preset(organ)
        self.spacing = spacing
        self.size = size
        self.device = device
        if size is not None:
            self.preset.size_class(size)

    def plan(
        self,
        image: np.ndarray,
        organ_mask: np.ndarray,
        *,
        seed: int,
        spacing: Sequence[float] | None = None,
        affine: np.ndarray | None = None,
        size: str | None = None,
        organ_index: OrganIndex | None = None,
        vessel_mask: np.ndarray | None = None,
        lesion_mask: np.ndarray | None = None,
    ) -> Plan:
        """Sample a plan with this synthesizer's preset (see :func:`synthgen.plan`; the
        optional ``vessel_mask`` and ``lesion_mask`` are kept clear of)."""
        return make_plan(
            image,
            organ_mask,
            organ=self.preset,
            seed=seed,
            spacing=spacing if spacing is not None else self.spacing,
            affine=affine,
            size=size if size is not None else self.size,
            organ_index=organ_index,
            vessel_mask=vessel_mask,
            lesion_mask=lesion_mask,
        )

    def __call__(
        self,
        image: np.ndarray,
        organ_mask: np.ndarray,
        *,
        seed: int,
        spacing: Sequence[float] | None = None,
        affine: np.ndarray | None = None,
        size: str | None = None,
        out: np.ndarray | None = None,
        organ_index: OrganIndex | None = None,
        vessel_mask: np.ndarray | None = None,
        lesion_mask: np.ndarray | None = None,
        label_out=None,
        tumor_label: int = 2,
    ) -> SynthesisResult:
        """Synthesize one sample (see :func:`synthesize`)."""
        from .rendering import check_writable

        check_writable("out", out)  # (before planning: a read-only output fails at once)
        check_writable("label_out", label_out)
        if needs_readable(image, organ_mask, out, label_out):
            # non-native byte order or float16: read once through native copies, for the
            # plan and the render alike
            kw = dict(seed=seed, spacing=spacing, affine=affine, size=size,
                      organ_index=organ_index, vessel_mask=vessel_mask, lesion_mask=lesion_mask,
                      tumor_label=tumor_label)  # fmt: skip
            return readable_job(lambda im, om, o, lab: self(im, om, out=o, label_out=lab, **kw),
                                image, organ_mask, out, label_out)  # fmt: skip
        from ._device import resolve_device

        # (device='cpu' with GPU data fails here, before planning; planning itself reads GPU
        # data through views of the organ's box and a few slices, see make_plan)
        resolve_device(self.device, image, organ_mask)
        p = self.plan(
            image,
            organ_mask,
            seed=seed,
            spacing=spacing,
            affine=affine,
            size=size,
            organ_index=organ_index,
            vessel_mask=vessel_mask,
            lesion_mask=lesion_mask,
        )
        return render(p, image, organ_mask, out=out, device=self.device, affine=affine,
                      label_out=label_out, tumor_label=tumor_label)  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"Synthesizer(preset={self.preset.name!r}, size={self.size!r}, device={self.device!r})"
        )


def render(
    plan: Plan,
    image: np.ndarray,
    organ_mask: np.ndarray,
    *,
    out: np.ndarray | None = None,
    device: str = "auto",
    affine: np.ndarray | None = None,
    label_out=None,
    tumor_label: int = 2,
) -> RenderResult:
    """Apply a plan to a scan, deterministically, with its preset's mass effect.

    :func:`synthgen.rendering.render` (same arguments and result) preceded, when the plan's
    preset enables ``[mass_effect]``, by the warp of the image (into ``out`` or a copy) and
    of the organ mask (a copy; the result's ``organ_mask`` and ``label`` use it). The
    settings travel in ``plan.preset``, so a stored plan replays the warped sample bit for
    bit. To warp other label maps along, use :func:`synthgen.mass_effect.render_plan`.
    ``label_out`` (a label map that receives ``tumor_label`` on the tumor voxels, in place)
    is warped along.
    """
    lab = {"label_out": label_out, "tumor_label": tumor_label}
    if needs_readable(image, organ_mask, out, label_out):  # (the warp's too)
        return readable_job(
            lambda im, om, o, lb: render(plan, im, om, out=o, device=device, affine=affine,
                                         label_out=lb, tumor_label=tumor_label),
            image, organ_mask, out, label_out,
        )  # fmt: skip
    if not plan.get_preset().mass_effect.enabled:
        return _render(plan, image, organ_mask, out=out, device=device, affine=affine, **lab)
    from .mass_effect import render_plan

    return render_plan(plan, image, organ_mask, out=out, device=device, affine=affine, **lab).result


def render_batch(
    plans: Sequence[Plan],
    images,
    organ_masks,
    *,
    outs=None,
    device: str = "auto",
    affines=None,
    stream=None,
    label_outs=None,
    tumor_label: int = 2,
) -> list[RenderResult]:
    """:func:`synthgen.rendering.render_batch` with each plan's mass effect (see
    :func:`render`): plans whose tumors push tissue get their image (into its ``out`` or a
    copy), organ mask (a copy) and label map of ``label_outs`` (in place) warped first; the
    others are rendered as given."""
    from .rendering import check_job, check_writable, label_args, per_plan, sequential_groups

    ims, oms, os_ = per_plan(len(plans), images=images, organ_masks=organ_masks, outs=outs)
    labs = label_args(plans, label_outs, tumor_label)  # checked before anything is warped
    for o in os_:
        check_writable("out", o)
    if any(p.get_preset().mass_effect.enabled for p in plans):
        for p, im, om, o in zip(plans, ims, oms, os_, strict=True):
            check_job(p, im, om, o)  # all of them before the first warp writes
    afs = per_plan(len(plans), affines=affines)[0]
    if any(map(unreadable, (*ims, *oms, *os_, *labs))):  # non-native byte order or float16
        todo = zip(plans, ims, oms, os_, afs, labs, strict=True)
        return [render(p, im, om, out=o, device=device, affine=a, label_out=lab,
                       tumor_label=tumor_label) for p, im, om, o, a, lab in todo]  # fmt: skip
    kw = {"device": device, "stream": stream, "tumor_label": tumor_label}
    if not any(p.get_preset().mass_effect.enabled for p in plans):
        return _render_batch(plans, ims, oms, outs=os_, affines=afs, label_outs=labs, **kw)
    # images and label maps shared between plans: warp and render in turn, as one by one
    starts = {a for a, _ in sequential_groups(ims, os_)}
    starts |= {a for a, _ in sequential_groups(labs, labs)}  # (label maps: read and written)
    stops = [*sorted(starts)[1:], len(plans)]
    out: list[RenderResult] = []
    last: list[RenderResult] = []
    for a, b in zip(sorted(starts), stops, strict=True):
        for r in last:  # the last run finished first (on a GPU it may still run on the
            list(r.tumors)  # caller's stream): this run's warp reads its output
        last = _warp_and_render(plans[a:b], ims[a:b], oms[a:b], os_[a:b], afs[a:b], labs[a:b],
                                **kw)  # fmt: skip
        out += last
    return out


def _warp_and_render(plans, ims, oms, os_, afs, labs, **kw) -> list[RenderResult]:
    """One run of plans that share no output: each plan's mass effect warps its image (into
    its ``out`` or a copy), organ mask (a copy) and label map first, then one render."""
    from .mass_effect import prepare_render

    plans_r, ims, oms, os_ = list(plans), list(ims), list(oms), list(os_)
    warped = False
    on_gpu = [a for a in (*ims, *oms, *os_, *labs) if array_kind(a) in ("cupy", "torch-cuda")]
    ordered = contextlib.nullcontext()
    if kw.get("stream") is not None and on_gpu:  # (the warp's copies on the caller's stream)
        from ._cuda import caller_stream

        ordered = caller_stream(kw["stream"], on_gpu)
    with ordered:
        for i, p in enumerate(plans):
            if not p.get_preset().mass_effect.enabled:
                continue
            prep = prepare_render(p, ims[i], oms[i], out=os_[i], label_out=labs[i])
            if prep.fields:
                plans_r[i], ims[i], oms[i] = prep.plan, prep.image, prep.organ_mask
                os_[i] = prep.image
                warped = True
    res = _render_batch(plans_r, ims, oms, outs=os_, affines=afs, label_outs=labs, **kw)
    if warped:
        for r, p in zip(res, plans, strict=True):
            r.plan = p
    return res


def without_mass_effect_hint(preset: Preset) -> str:
    """What to pass instead of ``preset``, whose mass effect warps channel 0 of a
    multi-channel image only (the error messages of the training transforms)."""
    plain = [n for n in list_presets() if (p := load_preset(n)).organ == preset.organ
             and not p.mass_effect.enabled]  # fmt: skip
    return (
        f"pass a preset without it as organ=: synthgen.presets.without_extras({preset.organ!r}, "
        "keep=('vessels', 'appearance'))"
        + (f", or {' / '.join(repr(n) for n in plain)}" if plain else "")
        + ", or the path of a preset file with [mass_effect] enabled = false"
    )


@functools.lru_cache(maxsize=64)
def shared_synthesizer(spec: str, size: str | None = None, device: str = "auto") -> Synthesizer:
    """One :class:`Synthesizer` per (preset, size, device) in this process.

    For code that draws many samples (a batch, a loader worker): a preset given as a TOML
    path is read and validated once, not once per sample.
    """
    return Synthesizer(spec, size=size, device=device)
