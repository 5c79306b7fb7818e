"""Run every synthgen benchmark module and write ``results.json`` and ``results.md``.

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/run.py            # full run (minutes; use a quiet machine)
    PYTHONPATH=. python benchmarks/run.py --quick    # smoke test: few repetitions
    PYTHONPATH=. python benchmarks/run.py --only bench_engine --out /tmp/bench

Each module listed in :data:`MODULES` lives in ``benchmarks/<name>.py`` and exposes
``run(quick: bool) -> dict`` returning ``{"name", "tables": [{"title", "columns", "rows"}],
"data": {...}}``. A module that fails is recorded with its error and the others still run;
the exit status is then 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run by path: make `benchmarks` and `synthgen` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common as C

# Benchmark modules, in the order they run (add bench_batch, bench_loader, gpu_check here).
MODULES: list[str] = ["bench_engine", "bench_batch", "bench_loader", "bench_realism",
                      "bench_gpu_host"]  # fmt: skip


def run_module(name: str, quick: bool) -> dict[str, Any]:
    """Import ``benchmarks.<name>`` and run it; a failure becomes an ``error`` entry."""
    t0 = time.perf_counter()
    try:
        mod = importlib.import_module(f"benchmarks.{name}")
        result = dict(mod.run(quick=quick))
    except Exception as e:  # keep the other modules' results
        result = {
            "name": name,
            "tables": [],
            "data": {"traceback": traceback.format_exc()},
            "error": f"{type(e).__name__}: {e}",
        }
    result.setdefault("name", name)
    result["wall_s"] = time.perf_counter() - t0
    return result


def render_markdown(report: dict[str, Any]) -> str:
    """The whole report as markdown: machine facts, then each module's tables."""
    m = report["machine"]
    lines = [
        "# synthgen benchmarks",
        "",
        f"- date (UTC): {m.get('date_utc')}",
        f"- mode: {'quick (smoke test, few repetitions)' if report['quick'] else 'full'}",
        f"- CPU: {m.get('cpu_model')}, {m.get('cpu_count')} cores "
        f"({m.get('cpus_usable')} usable), {m.get('mem_total_gib')} GiB RAM",
        f"- load average at start / end: {m.get('load_average_1_5_15')} / "
        f"{report.get('load_average_end')}",
        f"- python {m.get('python')}, numpy {m.get('numpy')}, scipy {m.get('scipy')}, "
        f"numba {m.get('numba')} ({m.get('numba_threads')} threads), synthgen "
        f"{m.get('synthgen')}",
        f"- git commit: {m.get('git_commit')}"
        + (" (working tree modified)" if m.get("git_dirty") else ""),
        f"- total wall time: {report['wall_s']:.1f} s",
        "",
    ]
    for res in report["results"]:
        lines.append(C.markdown(res))
        lines.append(f"_{res['name']}: {res['wall_s']:.1f} s_\n")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the synthgen benchmarks.")
    ap.add_argument("--quick", action="store_true", help="few repetitions (smoke test)")
    ap.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help=f"run only this module (repeatable or comma-separated); one of {MODULES}",
    )
    ap.add_argument("--out", type=Path, default=Path("bench-results"), help="output directory")
    a = ap.parse_args(argv)

    names = list(MODULES)
    if a.only:
        wanted = [n.strip() for item in a.only for n in item.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in MODULES]
        if unknown:
            ap.error(f"unknown module(s) {unknown}; known: {MODULES}")
        names = [n for n in MODULES if n in wanted]

    t0 = time.perf_counter()
    report: dict[str, Any] = {"quick": a.quick, "machine": C.machine_info(), "results": []}
    for name in names:
        print(f"running {name}{' (quick)' if a.quick else ''} ...", file=sys.stderr, flush=True)
        res = run_module(name, a.quick)
        report["results"].append(res)
        status = f"failed: {res['error']}" if res.get("error") else "ok"
        print(f"  {name}: {status} in {res['wall_s']:.1f} s", file=sys.stderr, flush=True)
    report["wall_s"] = time.perf_counter() - t0
    report["load_average_end"] = (
        [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    )

    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(
        json.dumps(report, indent=2, default=C.json_default), encoding="utf-8"
    )
    md = render_markdown(report)
    (a.out / "results.md").write_text(md, encoding="utf-8")
    print(md)
    print(f"wrote {a.out / 'results.json'} and {a.out / 'results.md'}", file=sys.stderr)
    return 1 if any(r.get("error") for r in report["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
