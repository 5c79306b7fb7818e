"""Loader benchmark: a PyTorch DataLoader with and without on-the-fly tumor synthesis.

Both loaders are :class:`synthgen.torch.SyntheticTumorDataset` over the same phantom cases on
disk (AbdomenAtlas layout, int16 CT + liver mask, gzip level 1): each sample reads its case's
NIfTI files and crops a 96^3 patch; the synthesis loader also implants liver tumors (default
``liver`` preset) before cropping around one. Same DataLoader settings (2 workers, batch 2,
spawn), one warm-up epoch each, then samples per second over the timed epochs, run
alternately (plain, synthesis, plain, ...) so that load on the machine affects both alike.

Target (issue 5): with synthesis >= 0.8x the plain loader's rate on the CPU path with 2
workers.

Usage::

    PYTHONPATH=. python benchmarks/bench_loader.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common as C

NAME = "bench_loader"
SHAPE = (256, 256, 160)
SPACING = (1.5, 1.5, 2.0)
PATCH = (96, 96, 96)
TARGET = 0.8


def data_dir() -> Path:
    return C.bench_data_root() / "loader-256"


def make_dataset(n: int) -> Path:
    """The cached phantom dataset with at least ``n`` cases; returns its folder."""
    return C.phantom_dataset(data_dir(), n, SHAPE, SPACING, seed0=100)


def _loader(cases, synthesize: bool, workers: int):
    from torch.utils.data import DataLoader

    from synthgen.torch import SyntheticTumorDataset

    ds = SyntheticTumorDataset(
        cases, "liver", seed=0, patch_size=PATCH, synthesize=synthesize, samples_per_case=2
    )
    dl = DataLoader(
        ds,
        batch_size=2,
        num_workers=workers,
        persistent_workers=workers > 0,
        multiprocessing_context="spawn" if workers else None,
    )
    return ds, dl


def _epoch(ds, dl, epoch: int) -> tuple[int, int, float]:
    ds.set_epoch(epoch)
    n = tumors = 0
    t0 = time.perf_counter()
    for batch in dl:
        n += batch["image"].shape[0]
        tumors += sum(1 for p in batch["plan"] if p)
    return n, tumors, time.perf_counter() - t0


def _rates(cases, epochs: int, workers: int) -> dict[str, dict[str, Any]]:
    """Both loaders, their timed epochs interleaved so that machine drift hits both alike."""
    loaders = {"plain": _loader(cases, False, workers), "synthesis": _loader(cases, True, workers)}
    for ds, dl in loaders.values():
        _epoch(ds, dl, 0)  # warm-up: worker start, imports, numba cache, page cache
    out = {k: {"samples": 0, "wall_s": 0.0, "with_tumors": 0} for k in loaders}
    for e in range(1, epochs + 1):
        for k, (ds, dl) in loaders.items():
            n, tumors, wall = _epoch(ds, dl, e)
            out[k]["samples"] += n
            out[k]["with_tumors"] += tumors
            out[k]["wall_s"] += wall
    for v in out.values():
        v["rate"] = v["samples"] / v["wall_s"]
    return out


def run(quick: bool = False) -> dict[str, Any]:
    C.ensure_root_on_path()
    from synthgen.layouts import discover

    n_cases = 4 if quick else 8
    epochs = 1 if quick else 6
    root = make_dataset(n_cases)
    _, cases = discover(root, ["liver"])
    cases = cases[:n_cases]
    r = _rates(cases, epochs, 2)
    plain, synth = r["plain"], r["synthesis"]
    ratio = synth["rate"] / plain["rate"]
    rows = [
        ["plain (load + crop)", 2, plain["samples"], C.fmt(plain["rate"], 2), "1.00", "—"],
        [
            "with synthesis",
            2,
            synth["samples"],
            C.fmt(synth["rate"], 2),
            f"{ratio:.2f}",
            "yes" if ratio >= TARGET else "no",
        ],
    ]
    table = {
        "title": (
            f"loader: {n_cases} phantom cases {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} int16 "
            f"({SPACING[0]}x{SPACING[1]}x{SPACING[2]} mm), {PATCH[0]}^3 patches"
        ),
        "columns": ["loader", "workers", "samples", "samples/s", "x plain", f">= {TARGET}x"],
        "rows": rows,
        "notes": (
            f"torch DataLoader, 2 spawn workers, persistent, batch 2, {epochs} timed epochs "
            "each after a warm-up epoch, the two loaders' epochs interleaved; "
            f"{synth['with_tumors']} of {synth['samples']} synthesized "
            f"samples got tumors; {C.machine_info()['cpus_usable']} usable cores."
        ),
    }
    return {
        "name": NAME,
        "tables": [table],
        "data": {"plain": plain, "synthesis": synth, "ratio": ratio},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 cases, 1 timed epoch")
    args = ap.parse_args(argv)
    print(C.markdown(run(quick=args.quick)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
