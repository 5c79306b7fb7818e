"""Helpers shared by the benchmark modules: timing statistics, machine facts, markdown, and
child processes.

A benchmark module exposes ``run(quick: bool) -> dict`` returning::

    {"name": str, "tables": [{"title", "columns", "rows", "notes"?}], "data": {...}}

``rows`` are lists of cells (numbers or strings); :func:`markdown` renders them.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
"""Repository root (the directory holding ``synthgen/`` and ``benchmarks/``)."""


def ensure_root_on_path(*folders: str) -> None:
    """Make ``synthgen`` and ``benchmarks`` importable when a script is run by its path, and
    the modules of the repository's ``folders`` too (``"tests"``: the stand-in backend)."""
    for p in (ROOT, *(ROOT / f for f in folders)):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))


class Scene:
    """The GPU benchmarks' scan, once: ``liver-classic`` on the 1 mm benchmark phantom, on
    the host and on a device (``upload``: a backend's host-to-device copy), and plans of it."""

    def __init__(self, upload) -> None:
        import synthgen
        from synthgen.phantom import benchmark_phantom

        ph = benchmark_phantom()
        self.img_h = np.ascontiguousarray(ph.image)
        self.mask_h = np.ascontiguousarray(ph.mask("liver"))
        self.idx = synthgen.index_organ(self.mask_h)
        self.spacing = ph.spacing
        self.syn = synthgen.Synthesizer("liver-classic", spacing=ph.spacing)
        self.img_d, self.mask_d = upload(self.img_h), upload(self.mask_h)
        self._upload, self._outs = upload, [self.img_d]

    def outs(self, k: int) -> list:
        """``k`` device images, one output per plan of a call (plans sharing one render in
        turn): ``img_d`` and copies, made once."""
        while len(self._outs) < k:
            self._outs.append(self._upload(self.img_h))
        return self._outs[:k]

    def plans(self, seed: int, n: int, size: str) -> list:
        return [self.syn.plan(self.img_h, self.mask_h, seed=seed + i, size=size,
                              organ_index=self.idx) for i in range(n)]  # fmt: skip


# ------------------------------------------------------------------------------ statistics


def now() -> float:
    """Seconds on the system-wide monotonic clock (comparable across processes on Linux)."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def stats_ms(seconds: Sequence[float]) -> dict[str, float]:
    """Median, p90, min, max and count of a list of durations, in milliseconds."""
    a = np.asarray(seconds, dtype=np.float64) * 1e3
    if a.size == 0:
        return {"n": 0, "median": float("nan"), "p90": float("nan"), "min": float("nan")}
    return {
        "n": int(a.size),
        "median": float(np.median(a)),
        "p90": float(np.percentile(a, 90)),
        "min": float(a.min()),
        "max": float(a.max()),
    }


def interleaved_rounds(keys: Sequence, rounds: int, measure) -> dict:
    """``measure(key)`` for every key in each of ``rounds`` rounds, the keys' order reversed
    every other round (A/B runs in one process: every key sees the machine's drift alike);
    per key, its rounds' values in order."""
    keys = list(keys)
    out: dict = {k: [] for k in keys}
    for r in range(rounds):
        for k in keys if r % 2 == 0 else keys[::-1]:
            out[k].append(measure(k))
    return out


def fmt(x: Any, digits: int = 1) -> str:
    """A table cell: floats with ``digits`` decimals, NaN/None as an em dash."""
    if x is None:
        return "—"
    if isinstance(x, (float, np.floating)):
        if not np.isfinite(x):
            return "—"
        return f"{float(x):.{digits}f}"
    return str(x)


# ------------------------------------------------------------------------------ machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _version(mod: str) -> str | None:
    try:
        m = __import__(mod)
    except Exception:  # a missing optional package is reported as None
        return None
    return str(getattr(m, "__version__", "?"))


def usable_cpus() -> int:
    """CPUs this process may run on (``synthgen._pool.usable_cpus``)."""
    ensure_root_on_path()
    from synthgen._pool import usable_cpus as cpus

    return cpus()


def machine_info() -> dict[str, Any]:
    """CPU, cores, load, library versions, date and git commit of this run."""
    ensure_root_on_path()
    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable_cpus(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]
        if hasattr(os, "getloadavg")
        else None,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": _version("numpy"),
        "scipy": _version("scipy"),
        "numba": _version("numba"),
        "synthgen": _version("synthgen"),
    }
    try:
        import numba

        info["numba_threads"] = int(numba.get_num_threads())
        info["numba_threading_layer_config"] = str(numba.config.THREADING_LAYER)
    except Exception:
        pass
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["mem_total_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    commit = _git("rev-parse", "HEAD")
    info["git_commit"] = commit
    if commit is not None:
        status = _git("status", "--porcelain", "--untracked-files=no")
        info["git_dirty"] = bool(status)
    return info


# ------------------------------------------------------------------------------ memory


def proc_status_kib() -> dict[str, int]:
    """VmRSS and VmHWM of this process in KiB (empty off Linux)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > /proc/self/clear_refs``); False if denied."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
    except OSError:
        return False
    return True


# ------------------------------------------------------------------------------ datasets


#: The whole-scan phantom of the per-preset benchmarks (:func:`whole_scan`).
WHOLE_SCAN = ((320, 256, 224), (1.25, 1.25, 1.5))


@functools.lru_cache(maxsize=1)
def whole_scan():
    """The all-organ phantom of a whole scan (``WHOLE_SCAN``: 320 x 256 x 224 voxels of
    1.25 x 1.25 x 1.5 mm, seed 0) that the per-preset benchmarks plan and render in."""
    from synthgen.phantom import make_phantom

    return make_phantom(*WHOLE_SCAN, seed=0)


def preset_mask(ph, preset: str) -> np.ndarray:
    """The organ mask of phantom ``ph`` that ``preset`` plans in (C order; both kidneys for
    ``kidney``)."""
    from synthgen.presets import load_preset

    return np.ascontiguousarray(ph.mask(load_preset(preset).organ))


def bench_data_root() -> Path:
    """Where benchmark datasets are cached (``SYNTHGEN_BENCH_DATA`` or ``bench-data/``)."""
    return Path(os.environ.get("SYNTHGEN_BENCH_DATA", ROOT / "bench-data"))


def phantom_dataset(
    root: Path, n: int, shape: Sequence[int], spacing: Sequence[float], seed0: int = 0
) -> Path:
    """At least ``n`` phantom cases (int16 CT + liver mask, AbdomenAtlas layout, nibabel's
    default gzip level) in ``root``, written once: each case appears by a folder rename."""
    import shutil

    import nibabel as nib

    from synthgen.phantom import make_phantom

    for k in range(n):
        case = root / f"PHANTOM_{k:04d}"
        if (case / "segmentations" / "liver.nii.gz").is_file():
            continue
        ph = make_phantom(tuple(shape), tuple(spacing), seed=seed0 + k)
        tmp = root / f".{case.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "segmentations").mkdir(parents=True)
        ct = np.asfortranarray(ph.image)  # as a scanner's NIfTI stores it
        nib.save(nib.Nifti1Image(ct, ph.affine), str(tmp / "ct.nii.gz"))
        liver = np.asfortranarray(ph.mask("liver").astype(np.uint8))
        nib.save(nib.Nifti1Image(liver, ph.affine), str(tmp / "segmentations" / "liver.nii.gz"))
        shutil.rmtree(case, ignore_errors=True)
        tmp.rename(case)
    return root


# ------------------------------------------------------------------------------ children


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a child ``python``: this one, with the repo root on PYTHONPATH."""
    env = dict(os.environ)
    pp = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + pp if pp else "")
    if extra:
        env.update(extra)
    return env


def run_child(
    code: str,
    args: Sequence[str] = (),
    env_extra: dict[str, str] | None = None,
    timeout: float = 900.0,
) -> tuple[dict[str, Any], float, float]:
    """Run ``python -c code args...`` in a fresh interpreter (``sys.argv[1:]`` is ``args``).

    The child's last stdout line must be a JSON object. Returns ``(that object, t_before,
    t_after)`` where the times are :func:`now` readings taken in this process immediately
    before starting and after reaping the child (same clock as the child's :func:`now`).
    """
    env = child_env(env_extra)
    t0 = now()
    r = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    t1 = now()
    if r.returncode != 0:
        raise RuntimeError(f"child failed (rc {r.returncode}):\n{r.stderr[-4000:]}")
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    if not lines:
        raise RuntimeError(f"child printed nothing; stderr:\n{r.stderr[-4000:]}")
    return json.loads(lines[-1]), t0, t1


# ------------------------------------------------------------------------------ markdown


def markdown_table(table: dict[str, Any]) -> str:
    """One ``{"title", "columns", "rows", "notes"?}`` table as markdown."""
    cols = [str(c) for c in table["columns"]]
    lines = [f"### {table['title']}", ""]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for row in table["rows"]:
        lines.append("| " + " | ".join(fmt(c) for c in row) + " |")
    notes = table.get("notes")
    if notes:
        lines.append("")
        for n in [notes] if isinstance(notes, str) else notes:
            lines.append(f"- {n}")
    lines.append("")
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    """A module result (``{"name", "tables", ...}``) as markdown."""
    parts = [f"## {result['name']}", ""]
    if result.get("error"):
        parts.append(f"**failed:** `{result['error']}`\n")
    parts.extend(markdown_table(t) for t in result.get("tables", []))
    return "\n".join(parts)


def count_script_main(doc: str, run, title: str, columns: Sequence[str], cells,
                      add_args=None) -> int:  # fmt: skip
    """``main()`` of a counting script (``count_bytes``, ``count_blocks``,
    ``count_planning_reads``, ``count_device_ops``): ``--json FILE``, and the script's own
    arguments where ``add_args(parser)`` adds them (then ``run(args)``, else ``run()``); its
    rows (dicts), printed as one markdown table of ``cells(row)`` under ``columns``, and
    written to the JSON file if asked."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--json", type=Path)
    if add_args is not None:
        add_args(ap)
    args = ap.parse_args()
    rows = run(args) if add_args is not None else run()
    print()
    print(markdown_table({"title": title, "columns": columns, "rows": [cells(r) for r in rows]}))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` for NumPy scalars and arrays and paths."""
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
