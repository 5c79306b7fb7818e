"""Where a hollow organ's wall tumor spends its render, step by step, on one thread and on all.

Both backends render the colon's and the esophagus's wall tumors on the host
(``synthgen._hollow.render_wall``). This script renders each wall tumor of a few plans
(whole-scan phantom, the scan's organ index) directly, from host arrays, and times the whole
render and its steps: the flood fill (``_cpu_kernels.wall_component``: the component through
the centre), the distance transform to the outer wall (``_edt.distance_transform_edt``;
annular and eccentric tumors), the texture grid (``_texture.texture_lookup``) and the rest
(the blend, the outer wall, copies). Each thread count is a round over all tumors,
alternating (``interleaved_rounds``); ms per tumor, least round. Run it in a worktree of an
older revision to compare (its modules need only those names).

``--edt`` adds the distance transform alone on smooth random masks of growing size (the
complement of a thin shell, as a wall tumor's): one range against the default split over
the threads (this tree's ``parts``), the least of 20 calls each.

Usage::

    PYTHONPATH=. python benchmarks/bench_wall_steps.py [--plans 12] [--rounds 5] [--edt]
                                                        [--presets colon,esophagus]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from _common import (  # (run by path: its folder is on sys.path)
    ensure_root_on_path,
    interleaved_rounds,
    markdown_table,
    preset_mask,
    usable_cpus,
    whole_scan,
)

ensure_root_on_path()

import numpy as np  # noqa: E402

STEPS = (("flood fill", "_cpu_kernels", "wall_component"),
         ("distance transform", "_edt", "distance_transform_edt"),
         ("texture grid", "_texture", "texture_lookup"))  # fmt: skip


def _timed_steps() -> dict[str, float]:
    """Wrap each step's function (looked up by ``render_wall`` at call time) with a timer;
    the seconds spent in each, by step name (reset by the caller)."""
    import importlib

    spent = {name: 0.0 for name, _, _ in STEPS}
    for name, mod, fn in STEPS:
        m = importlib.import_module(f"synthgen.{mod}")
        real = getattr(m, fn)

        def timed(*a, _real=real, _name=name, **k):
            t0 = time.perf_counter()
            try:
                return _real(*a, **k)
            finally:
                spent[_name] += time.perf_counter() - t0

        setattr(m, fn, timed)
    return spent


def walls(presets: list[str], n_plans: int, rounds: int) -> list[list]:
    import synthgen
    from synthgen._hollow import render_wall, wall_box

    spent = _timed_steps()
    ph = whole_scan()
    img = np.ascontiguousarray(ph.image)
    counts = sorted({1, usable_cpus()})
    rows = []
    for preset in presets:
        mask = preset_mask(ph, preset)
        syn = synthgen.Synthesizer(preset, spacing=ph.spacing)
        index = synthgen.index_organ(mask)
        plans = [syn.plan(img, mask, seed=s, organ_index=index) for s in range(n_plans)]
        jobs = [(t, wall_box(t, p.spacing, p.shape, p.organ_bbox), p.spacing)
                for p in plans for t in p.tumors if t.kind == "wall"]  # fmt: skip
        jobs = [j for j in jobs if j[1] is not None]

        def one_round(threads: int, jobs=jobs, mask=mask) -> dict[str, float]:
            synthgen.set_num_threads(threads)
            for k in spent:
                spent[k] = 0.0
            t0 = time.perf_counter()
            for t, box, sp in jobs:
                render_wall(t, box, sp, img, mask, np.float32)
            total = time.perf_counter() - t0
            out = {k: 1e3 * v / len(jobs) for k, v in spent.items()}
            out["rest"] = 1e3 * total / len(jobs) - sum(out.values())
            out["render"] = 1e3 * total / len(jobs)
            return out

        for n in counts:  # (numba compiled, caches filled)
            one_round(n)
        res = interleaved_rounds(counts, rounds, one_round)
        for n in counts:
            best = min(res[n], key=lambda r: r["render"])
            med = statistics.median(r["render"] for r in res[n])
            rows.append([preset, len(jobs), n, f"{best['render']:.2f}", f"{med:.2f}",
                         *(f"{best[k]:.2f}" for k in (*spent, "rest"))])  # fmt: skip
            print(f"  {preset}, {n} threads: {rows[-1][3:]}", flush=True)
    synthgen.set_num_threads(None)
    return rows


def edt_sizes() -> list[list]:
    from scipy import ndimage

    import synthgen
    from synthgen import _edt

    rows = []
    rng = np.random.default_rng(5)
    threads = usable_cpus()
    synthgen.set_num_threads(threads)
    for n in (20, 27, 32, 40, 64):
        b = ndimage.gaussian_filter(rng.random((n, n, n)), 2.0) > 0.5
        m = np.ascontiguousarray(~(b & ~ndimage.binary_erosion(b)))
        sp = (1.25, 1.25, 1.5)
        ms = {}
        for key, parts in (("one range", 1), ("split", 4 * threads)):
            _edt.distance_transform_edt(m, sp, parts=parts)
            ts = []
            for _ in range(20):
                t0 = time.perf_counter()
                _edt.distance_transform_edt(m, sp, parts=parts)
                ts.append(time.perf_counter() - t0)
            ms[key] = 1e3 * min(ts)
        rows.append([f"{n}^3", n**3, threads, f"{ms['one range']:.3f}", f"{ms['split']:.3f}"])
        print(f"  edt {rows[-1]}", flush=True)
    synthgen.set_num_threads(None)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plans", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--presets", default="colon,esophagus")
    ap.add_argument("--edt", action="store_true", help="also the transform alone, by size")
    args = ap.parse_args()
    rows = walls(args.presets.split(","), args.plans, args.rounds)
    print()
    print(markdown_table({
        "title": f"a wall tumor's render, ms per tumor ({usable_cpus()} CPUs; least round)",
        "columns": ["preset", "wall tumors", "threads", "render", "render (median round)",
                    *(name for name, _, _ in STEPS), "rest"],
        "rows": rows,
    }))  # fmt: skip
    if args.edt:
        print(markdown_table({
            "title": "distance transform of a shell's complement, ms (least of 20)",
            "columns": ["box", "voxels", "threads", "one range", "split (4 a thread)"],
            "rows": edt_sizes(),
        }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
