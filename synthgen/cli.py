"""The ``synthgen`` command line."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape as esc
from rich.table import Table

from synthgen.presets import LESION_NAMES
from synthgen.presets import ORGANS as DEMO_ORGANS

app = typer.Typer(
    name="synthgen",
    help="Fast, reproducible synthetic tumors for abdominal CT.",
    no_args_is_help=True,
    add_completion=False,
)
presets_app = typer.Typer(help="List, show and export organ presets.", no_args_is_help=True)
app.add_typer(presets_app, name="presets")
console = Console()


def _floats(text: str, n: int, what: str) -> tuple[float, ...]:
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        vals = tuple(float(p) for p in parts)
    except ValueError:
        raise typer.BadParameter(f"{what} must be {n} numbers like 1,1,2.5") from None
    if len(vals) != n:
        raise typer.BadParameter(f"{what} must have {n} values, got {len(vals)}")
    return vals


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("demo-out"),
    seed: Annotated[int, typer.Option(help="Seed of the first organ's sample.")] = 0,
    shape: Annotated[str, typer.Option(help="Phantom grid, voxels (x,y,z).")] = "192,160,128",
    spacing: Annotated[str, typer.Option(help="Phantom voxel size, mm.")] = "2,2,2.5",
    organs: Annotated[
        str, typer.Option(help="Comma-separated organs (default: all six).")
    ] = ",".join(DEMO_ORGANS),
    size: Annotated[str | None, typer.Option(help="Force a size class.")] = None,
    preview: Annotated[bool, typer.Option(help="Write preview.png per organ.")] = True,
) -> None:
    """Synthesize tumors into the built-in phantom for every organ and write NIfTI pairs.

    For each organ, OUT/<organ>/ gets ct.nii.gz (int16 HU), label.nii.gz (0 background,
    1 organ, 2 tumor), segmentations/<lesion>.nii.gz, tumors.json (plan and per-tumor
    statistics) and preview.png (slices through each tumor); OUT/phantom_ct.nii.gz is the
    untouched phantom.
    """
    import numpy as np

    import synthgen
    from synthgen.io import save_json, save_nifti
    from synthgen.phantom import make_phantom

    shp_f = _floats(shape, 3, "--shape")
    if not all(v >= 1 and v == int(v) for v in shp_f):
        raise typer.BadParameter(f"--shape must be 3 positive whole numbers, got {shape!r}")
    shp = tuple(int(v) for v in shp_f)
    sp = _floats(spacing, 3, "--spacing")
    if not all(0 < v < float("inf") for v in sp):
        raise typer.BadParameter(f"--spacing must be 3 positive numbers (mm), got {spacing!r}")
    organ_list = [o.strip() for o in organs.split(",") if o.strip()]
    for o in organ_list:
        if o not in DEMO_ORGANS:
            raise typer.BadParameter(f"unknown organ {o!r}; valid: {', '.join(DEMO_ORGANS)}")
    if size is not None:  # before anything is written, not a traceback at the first organ
        from synthgen.presets import load_preset

        for o in organ_list:
            try:
                load_preset(o).size_class(size)
            except ValueError as e:
                raise typer.BadParameter(str(e), param_hint="--size") from None
    try:  # a file where the folder must be, no permission: one line, not a traceback
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _cannot_write(out, e) from None
    t0 = time.perf_counter()
    ph = make_phantom(shp, sp, seed=seed)  # type: ignore[arg-type]
    console.print(
        f"phantom {shp} at {sp} mm built in {time.perf_counter() - t0:.2f} s -> {esc(str(out))}"
    )
    save_nifti(out / "phantom_ct.nii.gz", ph.image, ph.affine)
    table = Table(title="synthgen demo (phantom)")
    for col in ("organ", "preset", "class", "tumors", "volume mL", "contrast HU", "time ms"):
        table.add_column(col, justify="right" if col not in ("organ", "preset") else "left")
    failed: list[str] = []
    for n, organ in enumerate(organ_list):
        mask = ph.mask(organ)
        t1 = time.perf_counter()
        try:
            res = synthgen.synthesize(
                ph.image, mask, organ=organ, affine=ph.affine, seed=seed + n, size=size
            )
        except ValueError as e:  # an organ the grid crops out or leaves too small
            console.print(f"[red]failed[/red] {organ}: {esc(str(e))}")
            failed.append(organ)
            continue
        ms = (time.perf_counter() - t1) * 1e3
        d = out / organ
        save_nifti(d / "ct.nii.gz", res.image, ph.affine)
        save_nifti(d / "label.nii.gz", res.label, ph.affine)
        # the organ as the render left it: a mass-effect preset pushes it (label.nii.gz is
        # built from the pushed mask, so the phantom's own would disagree with it)
        organ_out = np.asarray(res.organ_mask) > 0
        save_nifti(d / "segmentations" / f"{organ}.nii.gz", organ_out.astype("uint8"), ph.affine)
        save_nifti(
            d / "segmentations" / f"{LESION_NAMES[organ]}.nii.gz",
            res.tumor_mask.astype("uint8"),
            ph.affine,
        )
        save_json(
            d / "tumors.json",
            {"plan": res.plan.to_dict(), "tumors": [t.to_dict() for t in res.tumors]},
        )
        if preview:
            from synthgen.preview import preview_arrays

            centers = [t.center_vox for t in res.tumors]
            title = f"{organ}: {res.plan.preset_name} ({res.plan.size_class}), seed {seed + n}"
            preview_arrays(res.image, res.label, ph.affine, centers, d / "preview.png", title=title)
        vol = sum(t.volume_mm3 for t in res.tumors) / 1000.0
        vox = sum(t.voxels for t in res.tumors)
        contrast = (
            sum(t.mean_contrast_hu * t.voxels for t in res.tumors) / vox if vox else float("nan")
        )
        table.add_row(
            organ,
            res.plan.preset_name,
            res.plan.size_class,
            str(len(res.tumors)),
            f"{vol:.2f}",
            f"{contrast:.1f}",
            f"{ms:.0f}",
        )
    console.print(table)
    wrote = len(organ_list) - len(failed)
    console.print(f"wrote {wrote} image/label pairs under {esc(str(out))}/")
    if preview and wrote:
        console.print(f"previews: {esc(str(out))}/<organ>/preview.png")
    if failed:
        console.print(f"[red]failed:[/red] {', '.join(failed)} (see above)")
        raise typer.Exit(1)


_DEVICE_HELP = (
    "Backend: auto (the CPU for files), cpu, cuda or cuda:N (a GPU through CuPy; only the "
    "tumor boxes travel)."
)


def _organ_list(text: str) -> list[str]:
    organs = [o.strip() for o in text.split(",") if o.strip()]
    for o in organs:
        if o not in DEMO_ORGANS:
            raise typer.BadParameter(f"unknown organ {o!r}; valid: {', '.join(DEMO_ORGANS)}")
    if not organs:
        raise typer.BadParameter("give at least one organ")
    return organs


def _preset_map(specs: list[str] | None, organs: list[str]) -> dict[str, str]:
    """``--preset FILE`` (one organ) or ``--preset ORGAN=NAME_OR_FILE`` (repeatable)."""
    from synthgen.presets import load_preset

    out: dict[str, str] = {}
    for spec in specs or []:
        organ, sep, value = spec.partition("=")
        if not sep:
            if len(organs) != 1:
                raise typer.BadParameter("with several organs use --preset ORGAN=FILE")
            organ, value = organs[0], spec
        if organ not in organs:
            raise typer.BadParameter(f"--preset {spec}: {organ!r} is not one of --organ")
        try:
            p = load_preset(value)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        if p.organ != organ:
            raise typer.BadParameter(f"--preset {spec}: preset {p.name!r} is for {p.organ}")
        path = Path(value)
        out[organ] = str(path.resolve()) if path.is_file() else value
    return out


def _label_ids(option: str, text: str | None) -> tuple[int, ...] | None:
    """``--label-id`` / ``--lesion-id`` as ids (``None`` when not given)."""
    from synthgen.layouts import parse_label_ids

    if text is None:
        return None
    try:
        return parse_label_ids(text)
    except ValueError:
        raise typer.BadParameter(f"{option} {text!r}: give integer ids, e.g. 6 or 1,2") from None


def _cannot_write(target: Path, e: OSError) -> typer.Exit:
    """Print that ``target`` cannot be written (a file where a folder must be, a folder where
    a file must be, no permission...) and return the exit to raise: one line, no traceback."""
    console.print(
        f"[red]error:[/red] {esc(str(target))}: cannot write ({esc(e.strerror or str(e))})"
    )
    return typer.Exit(2)


def _check_device(device: str) -> str:
    """Validate ``--device`` and, for ``cuda``, that a GPU is usable (exit 2 saying what is
    missing, before any file is read)."""
    from ._device import DeviceError, parse_device, resolve_device

    try:
        parse_device(device)
    except ValueError:
        raise typer.BadParameter(
            f"--device must be auto, cpu, cuda or cuda:N, got {device!r}"
        ) from None
    try:
        where = resolve_device(device)
    except DeviceError as e:
        console.print(f"[red]error:[/red] --device {esc(device)}: {esc(str(e))}")
        raise typer.Exit(2) from None
    # NumPy data from files: "auto" renders on the CPU, "cuda[:N]" on that GPU (only the
    # tumors' boxes travel).
    return str(where)


def _run_batch(cases, opts, out: Path, *, source: str, **kw) -> None:
    """Run a batch with a progress bar, print the summary, exit non-zero on failures."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from synthgen.batch import run_batch

    progress = Progress(
        TextColumn("[bold]{task.description:<8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    t0 = time.perf_counter()
    tasks: dict[str, object] = {}
    left: dict[str, int] = {}
    count = [0]
    noted: set[str] = set()

    def on_start(todo: list, skipped: int) -> None:
        left.update({c.case_id: len(s) for c, s in todo})
        if skipped:
            console.print(f"resume: {skipped} samples already done, {sum(left.values())} to do")
        tasks["cases"] = progress.add_task("cases", total=len(left), rate="")
        tasks["samples"] = progress.add_task("samples", total=sum(left.values()), rate="")

    def on_record(rec: dict) -> None:
        count[0] += 1
        rate = count[0] / max(time.perf_counter() - t0, 1e-9)
        progress.update(tasks["samples"], advance=1, rate=f"{rate:.2f}/s")
        left[rec["case"]] -= 1
        if left[rec["case"]] == 0:
            progress.update(tasks["cases"], advance=1)
        for note in rec.get("notes", ()):
            if note not in noted:  # once per case
                noted.add(note)
                progress.console.print(f"[yellow]warning[/yellow] {esc(note)}")
        if rec["status"] != "done":
            progress.console.print(f"[red]failed[/red] {esc(rec['sample'])}: {esc(rec['error'])}")

    with progress:
        try:
            report = run_batch(
                cases, opts, out, on_start=on_start, on_record=on_record, source=source, **kw
            )
        except ValueError as e:
            console.print(f"[red]error:[/red] {esc(str(e))}")
            raise typer.Exit(2) from None
    _summary(report, out)
    if not report.ok:
        raise typer.Exit(1)


def _summary(report, out: Path) -> None:
    table = Table(title=f"synthgen batch -> {esc(str(out))}")
    table.add_column("samples")
    table.add_column("count", justify="right")
    table.add_row("in this shard", str(report.total))
    table.add_row("written now", str(report.done))
    table.add_row("already done (resume)", str(report.skipped))
    table.add_row("failed", f"[red]{len(report.failed)}[/red]" if report.failed else "0")
    table.add_row("written with organs skipped", str(len(report.skipped_organs)))
    rate = report.done / report.wall_s if report.wall_s > 0 else 0.0
    table.add_row("wall time", f"{report.wall_s:.1f} s ({rate:.2f} samples/s)")
    console.print(table)
    if report.failed:
        fail = Table(title="failed samples (see the manifest for details)")
        fail.add_column("sample")
        fail.add_column("reason")
        for rec in report.failed[:50]:
            fail.add_row(esc(rec["sample"]), esc(rec["error"]))
        if len(report.failed) > 50:
            fail.add_row("...", f"{len(report.failed) - 50} more")
        console.print(fail)
    if report.skipped_organs:
        by_case: dict[str, dict[str, str]] = {}
        for rec in report.skipped_organs:
            by_case.setdefault(rec["case"], {}).update(rec["skipped_organs"])
        skip = Table(title="organs skipped, per case (the samples have the other organs)")
        skip.add_column("case")
        skip.add_column("organ: reason")
        for case, organs in list(by_case.items())[:50]:
            skip.add_row(esc(case), esc("; ".join(f"{o}: {r}" for o, r in organs.items())))
        if len(by_case) > 50:
            skip.add_row("...", f"{len(by_case) - 50} more cases")
        console.print(skip)
    for w in report.warnings:
        console.print(f"[yellow]warning[/yellow] {esc(w)}")
    console.print(f"manifest: {esc(str(report.manifest))}")


@app.command()
def synth(
    ct: Annotated[Path, typer.Argument(help="CT image (NIfTI, HU).")],
    mask: Annotated[Path, typer.Option("--mask", "-m", help="Organ mask or label map (NIfTI).")],
    organ: Annotated[str, typer.Option("--organ", help="Organ: " + ", ".join(DEMO_ORGANS))],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    label_id: Annotated[
        str | None,
        typer.Option(
            "--label-id",
            help="Organ id(s) in a label map, e.g. 6, or 1,2 for an organ of two labels "
            "(without it the mask must be binary: > 0.5). Its existing tumors: --lesion-id.",
        ),
    ] = None,
    lesion_id: Annotated[
        str | None,
        typer.Option(
            "--lesion-id",
            help="Label id(s) of the organ's existing lesions in the --label-id map, e.g. 2 "
            "or 2,3: they stay tumor label, belong to the organ and new tumors keep clear.",
        ),
    ] = None,
    n: Annotated[int, typer.Option("--n", "-n", min=1, help="Samples to write.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed; the same seed gives the same bytes.")] = 0,
    size: Annotated[str | None, typer.Option(help="Force a size class (e.g. small).")] = None,
    preset: Annotated[
        str | None, typer.Option(help="Preset name or TOML file (default: the organ's).")
    ] = None,
    device: Annotated[str, typer.Option(help=_DEVICE_HELP)] = "auto",
    compression: Annotated[int, typer.Option(min=0, max=9, help="gzip level.")] = 1,
    preview: Annotated[bool, typer.Option(help="Also write preview.png per sample.")] = False,
    mass_effect: Annotated[
        bool | None,
        typer.Option(
            "--mass-effect/--no-mass-effect",
            help="Large tumors push the tissue (default: the preset's \\[mass_effect]).",
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue in OUT: keep finished samples, write the rest.")
    ] = False,
) -> None:
    """Implant tumors into one scan: N samples, each OUT/<case>_sNNN/ with ct.nii.gz,
    label.nii.gz (0/1/2), segmentations/<organ>.nii.gz and <lesion>.nii.gz, tumors.json.

    The mask may be on another grid than the CT (it is resampled by affine, nearest) and may be
    a label map (pick the organ with --label-id, its existing lesions with --lesion-id;
    without --label-id, a mask holding several non-zero values fails).

    Example: synthgen synth ct.nii.gz --mask liver.nii.gz --organ liver --out out --n 4
    """
    from synthgen.batch import BatchOptions
    from synthgen.layouts import Case, MaskSource, _stem

    organs = _organ_list(organ)
    if len(organs) != 1:
        raise typer.BadParameter("synth takes one organ; use batch with a CSV for several")
    ids = _label_ids("--label-id", label_id)
    lesion = _label_ids("--lesion-id", lesion_id)
    if lesion is not None and ids is None:
        raise typer.BadParameter(
            "--lesion-id names label ids of a label map: give the organ's with --label-id"
        )
    dev = _check_device(device)
    presets = _preset_map([preset] if preset else None, organs)
    name = _stem(ct) if ct.name.endswith((".nii", ".nii.gz")) else ct.stem
    if name == "ct" and ct.resolve().parent.name:  # BDMAP_x/ct.nii.gz: the case's folder
        name = ct.resolve().parent.name
    case = Case(
        name,
        ct,
        {organs[0]: (MaskSource(mask, ids),)},
        {organs[0]: (MaskSource(mask, lesion),)} if lesion is not None else {},
    )
    try:
        opts = BatchOptions(
            organs=tuple(organs),
            per_case=n,
            seed=seed,
            size=size,
            presets=presets,
            device=dev,
            compresslevel=compression,
            preview=preview,
            mass_effect=mass_effect,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    _run_batch([case], opts, out, source=str(ct), resume=resume)


@app.command()
def batch(
    input: Annotated[
        Path, typer.Argument(help="Dataset folder (AbdomenAtlas 1.x/2.0, MSD, nnU-Net) or CSV.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    organ: Annotated[
        str, typer.Option("--organ", help="Organ(s), comma-separated: " + ", ".join(DEMO_ORGANS))
    ],
    per_case: Annotated[int, typer.Option(min=1, help="Samples per case.")] = 1,
    seed: Annotated[int, typer.Option(help="Global seed (samples derive theirs from it).")] = 0,
    fmt: Annotated[
        str, typer.Option("--format", help="atlas (a folder per sample) or nnunet (raw dataset).")
    ] = "atlas",
    layout: Annotated[
        str | None,
        typer.Option(help="Force the input layout: atlas1, atlas2, msd, nnunet or csv."),
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="Local worker processes.")] = 1,
    shard: Annotated[
        str | None,
        typer.Option(help="I/N: do the I-th of N slices (default: SLURM array variables)."),
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(help="Dask scheduler address (tcp://host:8786), or 'local'."),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue the batch in OUT.")] = False,
    dry_run: Annotated[bool, typer.Option(help="List what would be done; write nothing.")] = False,
    size: Annotated[str | None, typer.Option(help="Force a size class.")] = None,
    preset: Annotated[
        list[str] | None,
        typer.Option(help="ORGAN=NAME_OR_FILE (repeatable), or FILE for a single organ."),
    ] = None,
    device: Annotated[str, typer.Option(help=_DEVICE_HELP)] = "auto",
    compression: Annotated[int, typer.Option(min=0, max=9, help="gzip level.")] = 1,
    preview: Annotated[bool, typer.Option(help="Also write a preview PNG per sample.")] = False,
    mass_effect: Annotated[
        bool | None,
        typer.Option(
            "--mass-effect/--no-mass-effect",
            help="Large tumors push the tissue (image and every label map warped alike); "
            "default: each preset's \\[mass_effect] section.",
        ),
    ] = None,
    lesion_id: Annotated[
        str | None,
        typer.Option(
            "--lesion-id",
            help="Label id(s) of the organ's existing lesions in its label maps (one --organ; "
            "a CSV's rows with a label_id and no lesion_id, or MSD / nnU-Net labels instead "
            "of those named like lesions): they stay tumor label.",
        ),
    ] = None,
) -> None:
    """Synthesize tumors over a whole dataset, resumably, on local processes or a cluster.

    The layout is detected (AbdomenAtlas 1.x BDMAP_*/ct.nii.gz + segmentations/, AbdomenAtlas
    2.0 ct/ + label/, MSD or nnU-Net imagesTr/ + labelsTr/ + dataset.json, or a CSV of
    ct,mask,organ[,label_id[,lesion_id]]). Each sample's seed derives from (--seed, case id, sample
    index), so the bytes do not depend on --workers, --shard or the scheduler. OUT/manifest*.jsonl
    records every sample; --resume skips finished ones and redoes partial ones. Bad cases are
    reported with a reason and the batch goes on; the exit code is 1 if any sample failed.

    Examples:

      synthgen batch AbdomenAtlas1.1 --out synth --organ liver,pancreas --per-case 2

      synthgen batch Task03_Liver --out Dataset501_SynthLiver --organ liver --format nnunet

      sbatch --array=0-15 --wrap "synthgen batch data --out synth --organ kidney"
    """
    from synthgen.batch import BatchOptions, parse_shard, prepare
    from synthgen.layouts import discover

    organs = _organ_list(organ)
    lesion = _label_ids("--lesion-id", lesion_id)
    dev = _check_device(device)
    presets = _preset_map(preset, organs)
    try:
        opts = BatchOptions(
            organs=tuple(organs),
            per_case=per_case,
            seed=seed,
            format=fmt,
            size=size,
            presets=presets,
            device=dev,
            compresslevel=compression,
            preview=preview,
            mass_effect=mass_effect,
        )
        shard_in = parse_shard(shard)
        found_layout, cases = discover(input, organs, layout, lesion_ids=lesion)
    except ValueError as e:
        console.print(f"[red]error:[/red] {esc(str(e))}")
        raise typer.Exit(2) from None
    console.print(
        f"{esc(str(input))}: {found_layout} layout, {len(cases)} cases"
        + (f"; shard {shard_in[0]}/{shard_in[1]}" if shard_in[1] > 1 else "")
    )
    if dry_run:
        try:
            todo, total, skipped = prepare(cases, opts, out, shard=shard_in, resume=resume)
        except ValueError as e:
            console.print(f"[red]error:[/red] {esc(str(e))}")
            raise typer.Exit(2) from None
        table = Table(title=f"dry run: {sum(len(s) for _, s in todo)} samples to write")
        for col in ("case", "ct", "organs found", "missing", "samples"):
            table.add_column(col)
        for case, samples in todo:
            table.add_row(
                esc(case.case_id),
                esc(str(case.ct)),
                ", ".join(case.organs),
                esc("; ".join(f"{o}: {r}" for o, r in case.missing.items())),
                esc(", ".join(s.sample_id for s in samples)),
            )
        console.print(table)
        console.print(f"{total} samples in this shard, {skipped} already done")
        return
    _run_batch(
        cases,
        opts,
        out,
        source=str(input),
        workers=workers,
        shard=shard_in,
        scheduler=scheduler,
        resume=resume,
    )


@app.command()
def preview(
    sample_dir: Annotated[
        Path, typer.Argument(help="A sample folder (ct.nii.gz, label.nii.gz, tumors.json).")
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="PNG to write (default: SAMPLE_DIR/preview.png)."),
    ] = None,
    max_tumors: Annotated[int, typer.Option(min=1, help="Rows (tumors) at most.")] = 6,
) -> None:
    """Axial, coronal and sagittal slices through each tumor's centre (abdomen window, organ
    and tumor contours, physical aspect ratio) as one PNG."""
    from synthgen.preview import write_preview

    try:
        path = write_preview(sample_dir, out, max_tumors=max_tumors)
    except ValueError as e:
        console.print(f"[red]error:[/red] {esc(str(e))}")
        raise typer.Exit(2) from None
    except OSError as e:
        raise _cannot_write(out or sample_dir / "preview.png", e) from None
    console.print(f"wrote {esc(str(path))}")


@app.command()
def qa(
    sample_root: Annotated[
        Path, typer.Argument(help="A sample folder, or a batch/demo output folder holding them.")
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Report folder (default: SAMPLE_ROOT/qa)."),
    ] = None,
    montage_max: Annotated[int, typer.Option(min=1, help="Samples in the montage at most.")] = 12,
) -> None:
    """Measure the tumors in synthesized samples (size, contrast, halo, inside share,
    impossible values) against the presets' intended ranges; writes report.md, qa.json,
    histograms and a montage. Exit code 1 when an impossible value is found."""
    from synthgen.qa import qa_report

    try:
        summary = qa_report(sample_root, out, montage_max=montage_max)
    except ValueError as e:
        console.print(f"[red]error:[/red] {esc(str(e))}")
        raise typer.Exit(2) from None
    except OSError as e:
        raise _cannot_write(out or sample_root / "qa", e) from None

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100.0 * v:.0f}%"

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    table = Table(title=f"synthgen qa: {summary['n_samples']} samples")
    cols = ("organ", "samples", "tumors", "median diam mm", "median contrast HU")
    cols += ("diam in range", "contrast in range", "count in range", "tumor out of range")
    for col in (*cols, "tumor gas voxels"):
        table.add_column(col, justify="left" if col == "organ" else "right")
    for organ, o in summary["organs"].items():
        q = o["quantiles"]
        table.add_row(
            organ,
            str(o["samples"]),
            str(o["tumors"]),
            num(q["diameter_mm"]["median"]),
            num(q["contrast_hu"]["median"]),
            pct(o["share_diameter_in_range"]),
            pct(o["share_contrast_in_range"]),
            pct(o["share_count_in_range"]),
            str(o["tumor_out_of_range"]),
            str(o["impossible"]["tumor_gas_voxels"]),
        )
    console.print(table)
    console.print(f"report: {esc(summary['report'])}")
    if summary["has_impossible"]:
        imp = summary["impossible"]
        console.print(
            f"[red]impossible values:[/red] {imp['tumor_gas_voxels']} tumor voxels below -200 HU, "
            f"{imp['label_mismatch_voxels']} voxels of label.nii.gz that disagree with the "
            "sample's masks"
        )
        raise typer.Exit(1)


@app.command()
def stream(
    input: Annotated[Path, typer.Argument(help="Dataset folder or CSV (as for batch).")],
    organ: Annotated[str, typer.Option("--organ", help="One organ: " + ", ".join(DEMO_ORGANS))],
    address: Annotated[
        str, typer.Option(help="unix:/path/to.sock or host:port to serve on.")
    ] = "unix:/tmp/synthgen-stream.sock",
    authkey: Annotated[
        str | None,
        typer.Option(help="Shared key (default: $SYNTHGEN_STREAM_KEY or a built-in one)."),
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="Producer processes.")] = 2,
    queue_size: Annotated[int, typer.Option(min=1, help="Samples kept ready.")] = 8,
    patch_size: Annotated[
        str | None, typer.Option(help="Emit patches X,Y,Z (voxels) around tumors.")
    ] = None,
    per_case: Annotated[int, typer.Option(min=1, help="Samples per case per epoch.")] = 1,
    epochs: Annotated[int, typer.Option(min=0, help="Passes over the cases (0: forever).")] = 0,
    seed: Annotated[int, typer.Option(help="Global seed.")] = 0,
    prob: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share with tumors.")] = 1.0,
    size: Annotated[str | None, typer.Option(help="Force a size class.")] = None,
    layout: Annotated[str | None, typer.Option(help="Force the input layout.")] = None,
    accept_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the consumer to connect.")
    ] = 600.0,
    rank: Annotated[
        int, typer.Option(min=0, help="Serve this rank's share of each epoch (DDP).")
    ] = 0,
    world_size: Annotated[int, typer.Option(min=1, help="Ranks sharing each epoch.")] = 1,
) -> None:
    """Serve synthesized samples to a training process on this machine.

    The training process reads them with ``synthgen.stream.connect(ADDRESS)`` (an iterable of
    dicts of NumPy arrays). Samples are made ahead by worker processes into a bounded queue;
    the consumer pulls them one by one. When the consumer goes away, this process stops; when
    this process dies, the consumer gets a StreamError. For distributed training, serve each
    rank from its own process (``--rank R --world-size W``, its own address): rank R gets
    every W-th sample of each epoch from the R-th on.
    """
    import os

    from synthgen.layouts import discover
    from synthgen.stream import (
        DEFAULT_AUTHKEY,
        Producer,
        exit_on_termination,
        format_address,
        serve,
    )

    organs = _organ_list(organ)
    if len(organs) != 1:
        raise typer.BadParameter("stream takes one organ")
    key = (authkey or os.environ.get("SYNTHGEN_STREAM_KEY") or "").encode() or DEFAULT_AUTHKEY
    try:
        _, cases = discover(input, organs, layout)
        prod = Producer(
            cases,
            organs[0],
            seed=seed,
            workers=workers,
            queue_size=queue_size,
            epochs=epochs or None,
            samples_per_case=per_case,
            prob=prob,
            patch_size=None
            if patch_size is None
            else tuple(int(v) for v in _floats(patch_size, 3, "--patch-size")),
            size=size,
            rank=rank,
            world_size=world_size,
        )
        exit_on_termination()  # (SIGTERM: a clean stop, the socket file and workers gone)
        sent = serve(
            prod,
            address,
            authkey=key,
            accept_timeout=accept_timeout,
            on_listen=lambda a: console.print(
                f"serving {len(cases)} cases ({organs[0]}) on {esc(format_address(a))}; waiting "
                "for a consumer"
            ),
        )
    except (ValueError, TimeoutError) as e:
        console.print(f"[red]error:[/red] {esc(str(e))}")
        raise typer.Exit(2) from None
    console.print(f"stream ended: {sent} samples sent")


@presets_app.command("list")
def presets_list() -> None:
    """List the built-in presets."""
    from synthgen.presets import list_presets, load_preset

    table = Table(title="built-in presets")
    for col in ("name", "organ", "classes", "contrast", "description"):
        table.add_column(col)
    for name in list_presets():
        p = load_preset(name)
        table.add_row(name, p.organ, ", ".join(p.classes), p.contrast.mode, p.description)
    console.print(table)


@presets_app.command("show")
def presets_show(name: Annotated[str, typer.Argument(help="Preset name or file.")]) -> None:
    """Print a preset (validated) as JSON."""
    from synthgen.presets import load_preset

    try:
        p = load_preset(name)
    except ValueError as e:
        console.print(f"[red]error:[/red] {esc(str(e))}")
        raise typer.Exit(2) from None
    console.print_json(json.dumps(p.to_dict()))


@presets_app.command("export")
def presets_export(
    name: Annotated[str, typer.Argument(help="Built-in preset name.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="File to write.")] = None,
) -> None:
    """Copy a built-in preset's TOML (with its comments and sources) to edit it."""
    from synthgen.presets import preset_path

    try:
        text = preset_path(name).read_text(encoding="utf-8")
    except ValueError as e:
        console.print(f"[red]error:[/red] {esc(str(e))}")
        raise typer.Exit(2) from None
    if out is None:
        typer.echo(text, nl=False)
    else:
        try:
            out.write_text(text, encoding="utf-8")
        except OSError as e:
            raise _cannot_write(out, e) from None
        console.print(f"wrote {esc(str(out))}")


@app.command()
def info() -> None:
    """Versions and available backends."""
    import numba
    import numpy
    import scipy

    import synthgen

    table = Table(title=f"synthgen {synthgen.__version__}")
    table.add_column("item")
    table.add_column("value")
    table.add_row("python", platform.python_version())
    table.add_row(
        "numpy / scipy / numba", f"{numpy.__version__} / {scipy.__version__} / {numba.__version__}"
    )
    table.add_row("cpu backend", "available (numba kernels on a thread pool)")
    from ._device import gpu_report

    status, gpus = gpu_report()
    table.add_row("cuda backend", esc(status))
    for line in gpus:
        table.add_row("", esc(line))
    from importlib.metadata import PackageNotFoundError, version

    for dist in (
        "nibabel",
        "cupy-cuda12x",
        "cupy-cuda13x",
        "torch",
        "monai",
        "batchgeneratorsv2",
        "dask",
        "distributed",
    ):
        try:
            table.add_row(dist, version(dist))
        except PackageNotFoundError:
            table.add_row(dist, "[dim]not installed[/dim]")
    table.add_row("presets", ", ".join(synthgen.list_presets()))
    console.print(table)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
