"""Batch benchmark: ``synthgen batch`` against a plain nibabel load-and-save of the same files.

Dataset: 20 phantom scans of 512 x 512 x 256 int16 (0.8 x 0.8 x 1.5 mm) with a liver mask, in
the AbdomenAtlas 1.x layout, written once and cached (``SYNTHGEN_BENCH_DATA`` or
``bench-data/`` in the repository). Every run is a fresh process, as a user runs it:

* **nibabel baseline**: for each case, ``nibabel.load`` the CT and the liver mask and
  ``nibabel.save`` them again (gzip level 1, nibabel's default);
* **synthgen batch**: ``synthgen batch DATA --out OUT --organ liver --workers N`` (gzip level
  1), which writes per sample the CT, label, organ and lesion masks and tumors.json.

The numba kernels are compiled (cached) by a small warm-up batch first, so the timings are
those of a user's second run. Target (issue 4): batch wall time within 1.3x of the baseline,
scaling with ``--workers`` on the machine's cores.

Usage::

    PYTHONPATH=. python benchmarks/bench_batch.py [--quick] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common as C

NAME = "bench_batch"
SHAPE = (512, 512, 256)
SPACING = (0.8, 0.8, 1.5)
TARGET_RATIO = 1.3

_BASELINE = r"""
import sys, time
from pathlib import Path
import nibabel as nib
import numpy as np
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
t0 = time.perf_counter()
for case in sorted(p for p in src.iterdir() if p.is_dir()):
    for rel in ("ct.nii.gz", "segmentations/liver.nii.gz"):
        img = nib.load(str(case / rel))
        data = np.asanyarray(img.dataobj)
        out = dst / case.name / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, img.affine, img.header), str(out))
print(time.perf_counter() - t0)
"""


def data_dir() -> Path:
    return C.bench_data_root() / "batch-512"


def make_dataset(n: int) -> Path:
    """The cached phantom dataset with at least ``n`` cases; returns its folder."""
    return C.phantom_dataset(data_dir(), n, SHAPE, SPACING, seed0=0)


def _subset(root: Path, n: int, where: Path) -> Path:
    """A folder of symlinks to the first ``n`` cases (the cache may hold more)."""
    sub = where / f"data-{n}"
    sub.mkdir(parents=True, exist_ok=True)
    for case in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))[:n]:
        link = sub / case.name
        if not link.exists():
            link.symlink_to(case.resolve(), target_is_directory=True)
    return sub


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _batch(data: Path, out: Path, workers: int, extra: list[str] | None = None) -> float:
    cmd = [sys.executable, "-m", "synthgen.cli", "batch", str(data), "--out", str(out)]
    cmd += ["--organ", "liver", "--workers", str(workers), "--compression", "1"]
    cmd += extra or []
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=C.child_env(), capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"batch failed ({r.returncode}): {r.stdout[-2000:]}{r.stderr[-2000:]}")
    return wall


def _baseline(data: Path, out: Path) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-c", _BASELINE, str(data), str(out)],
        env=C.child_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"baseline failed: {r.stderr[-2000:]}")
    return wall


def run(quick: bool = False, workers: tuple[int, ...] = (1, 2)) -> dict[str, Any]:
    C.ensure_root_on_path()
    n = 4 if quick else 20
    t0 = time.perf_counter()
    root = make_dataset(n)
    make_s = time.perf_counter() - t0
    rows, data = [], {"cases": n, "shape": SHAPE, "spacing_mm": SPACING, "runs": []}
    with tempfile.TemporaryDirectory(prefix="synthgen-bench-batch-") as tmp:
        tmp = Path(tmp)
        sub = _subset(root, n, tmp)
        warm = _subset(root, 1, tmp)
        _batch(warm, tmp / "warm", 1)  # compile / load the numba cache once
        base = _baseline(sub, tmp / "baseline")
        base_bytes = _du(tmp / "baseline")
        shutil.rmtree(tmp / "baseline")
        rows.append(["nibabel load + save (ct, mask)", 1, C.fmt(base), "1.00", n / base, "—"])
        data["baseline_s"] = base
        data["baseline_bytes"] = base_bytes
        for w in workers:
            out = tmp / f"out-w{w}"
            wall = _batch(sub, out, w)
            nbytes = _du(out)
            shutil.rmtree(out)
            ratio = wall / base
            ok = "yes" if ratio <= TARGET_RATIO else "no"
            rows.append(
                [f"synthgen batch --workers {w}", w, C.fmt(wall), f"{ratio:.2f}", n / wall, ok]
            )
            data["runs"].append({"workers": w, "wall_s": wall, "ratio": ratio, "bytes": nbytes})
    table = {
        "title": f"batch: {n} phantom scans {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} int16, liver, gzip 1",
        "columns": ["run", "workers", "wall s", "x baseline", "scans/s", f"<= {TARGET_RATIO}x"],
        "rows": rows,
        "notes": (
            f"fresh processes, warm numba cache; {C.machine_info()['cpus_usable']} usable cores; "
            f"dataset cached in {root} (built in {make_s:.0f} s this run). synthgen writes "
            "ct, label, liver, liver_lesion and tumors.json per sample; the baseline writes ct "
            "and liver."
        ),
    }
    return {"name": NAME, "tables": [table], "data": data}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 scans instead of 20")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    args = ap.parse_args(argv)
    res = run(quick=args.quick, workers=tuple(int(w) for w in args.workers.split(",")))
    print(C.markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
