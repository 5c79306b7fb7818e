"""The ``synthgen`` command line."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
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
) -> None:
    """Synthesize tumors into the built-in phantom for every organ and write NIfTI pairs.

    For each organ, OUT/<organ>/ gets ct.nii.gz (int16 HU), label.nii.gz (0 background,
    1 organ, 2 tumor), segmentations/<lesion>.nii.gz and tumors.json (plan and per-tumor
    statistics); OUT/phantom_ct.nii.gz is the untouched phantom.
    """
    import synthgen
    from synthgen.io import save_json, save_nifti
    from synthgen.phantom import make_phantom

    shp = tuple(int(v) for v in _floats(shape, 3, "--shape"))
    sp = _floats(spacing, 3, "--spacing")
    organ_list = [o.strip() for o in organs.split(",") if o.strip()]
    for o in organ_list:
        if o not in DEMO_ORGANS:
            raise typer.BadParameter(f"unknown organ {o!r}; valid: {', '.join(DEMO_ORGANS)}")
    t0 = time.perf_counter()
    ph = make_phantom(shp, sp, seed=seed)  # type: ignore[arg-type]
    console.print(f"phantom {shp} at {sp} mm built in {time.perf_counter() - t0:.2f} s -> {out}")
    save_nifti(out / "phantom_ct.nii.gz", ph.image, ph.affine)
    table = Table(title="synthgen demo (phantom)")
    for col in ("organ", "preset", "class", "tumors", "volume mL", "contrast HU", "time ms"):
        table.add_column(col, justify="right" if col not in ("organ", "preset") else "left")
    for n, organ in enumerate(organ_list):
        mask = ph.mask(organ)
        t1 = time.perf_counter()
        res = synthgen.synthesize(
            ph.image, mask, organ=organ, affine=ph.affine, seed=seed + n, size=size
        )
        ms = (time.perf_counter() - t1) * 1e3
        d = out / organ
        save_nifti(d / "ct.nii.gz", res.image, ph.affine)
        save_nifti(d / "label.nii.gz", res.label, ph.affine)
        save_nifti(d / "segmentations" / f"{organ}.nii.gz", mask.astype("uint8"), ph.affine)
        save_nifti(
            d / "segmentations" / f"{LESION_NAMES[organ]}.nii.gz",
            res.tumor_mask.astype("uint8"),
            ph.affine,
        )
        save_json(
            d / "tumors.json",
            {"plan": res.plan.to_dict(), "tumors": [t.to_dict() for t in res.tumors]},
        )
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
    console.print(f"wrote {len(organ_list)} image/label pairs under {out}/")


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
        console.print(f"[red]error:[/red] {e}")
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
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text, encoding="utf-8")
        console.print(f"wrote {out}")


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
    table.add_row("backends", "cpu (numba kernels on a thread pool)")
    table.add_row("presets", ", ".join(synthgen.list_presets()))
    console.print(table)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
