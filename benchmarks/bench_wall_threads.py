"""Host time of a GPU render's hollow-organ wall tumors, on one thread and on the pool.

A GPU render renders the wall tumors of colon and esophagus plans on the host (the CPU's
function on the same boxes) while the device runs the ellipsoids' first phase. This script
renders a batch of plans through the GPU driver on the test suite's stand-in backend
(``tests/_cuda_emu.py``: the CUDA C compiled for the host; no GPU needed) with the images
and masks as "device" arrays, and times the driver's wall-tumor step (``_wall_segments``:
the boxes copied back, then the renders) per call, at 1 thread and at each thread count up
to the machine's CPUs (``synthgen.set_num_threads``), alternating round by round; least and
median round. Whole-scan phantom (``make_phantom``, 320 x 256 x 224 voxels of 1.25 x 1.25 x
1.5 mm, int16 image), plans with the scan's organ index.

Usage::

    PYTHONPATH=. python benchmarks/bench_wall_threads.py [--plans 16] [--rounds 5]
                                                          [--presets colon,esophagus]
                                                          [--per-call N]

``--per-call 1`` renders the plans one per call (a training loop's single samples: the
threads then split a tumor's distance transform and blend), a row's times summed over the
calls.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import (  # (run by path: its folder is on sys.path)
    ensure_root_on_path,
    interleaved_rounds,
    markdown_table,
    preset_mask,
    usable_cpus,
    whole_scan,
)

ensure_root_on_path("benchmarks", "tests")

import numpy as np  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plans", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--presets", default="colon,esophagus")
    ap.add_argument("--per-call", type=int, default=0, help="plans per call (0: all in one)")
    args = ap.parse_args()

    from _cuda_emu import HostBackend, to_device

    import synthgen
    from synthgen import _cuda, _segments

    cpus = usable_cpus()
    counts = sorted({1, *(n for n in (2, 4, 8, 16) if n <= cpus), cpus})
    be = HostBackend(Path(tempfile.mkdtemp(prefix="sg-walls-")))
    spent: list[float] = []
    real = _segments._wall_segments

    def timed(*a):
        t0 = time.perf_counter()
        try:
            return real(*a)
        finally:
            spent.append(time.perf_counter() - t0)

    _segments._wall_segments = timed
    ph = whole_scan()
    img = np.ascontiguousarray(ph.image)
    rows = []
    for preset in args.presets.split(","):
        mask = preset_mask(ph, preset)
        syn = synthgen.Synthesizer(preset, spacing=ph.spacing)
        index = synthgen.index_organ(mask)
        plans = [syn.plan(img, mask, seed=s, organ_index=index) for s in range(args.plans)]
        n_walls = sum(t.kind == "wall" for p in plans for t in p.tumors)
        dmask = to_device(mask)

        k = args.per_call or len(plans)
        calls = [plans[i : i + k] for i in range(0, len(plans), k)]

        def call(n: int, calls=calls, dmask=dmask) -> float:
            synthgen.set_num_threads(n)
            spent.clear()
            for ps in calls:
                imgs = [to_device(img) for _ in ps]
                _cuda.render_on_gpu(ps, imgs, [dmask] * len(ps), device_id=0, be=be, outs=imgs)
            return sum(spent)

        for n in counts:  # (numba compiled, caches filled)
            call(n)
        rounds = interleaved_rounds(counts, args.rounds, lambda n, call=call: 1e3 * call(n))
        one = min(rounds[1])
        for n in counts:
            least, med = min(rounds[n]), statistics.median(rounds[n])
            rows.append([preset, f"{args.plans} ({k} a call)", n_walls, n, f"{least:.1f}",
                         f"{med:.1f}", f"{least / n_walls:.2f}", f"{one / least:.2f}"])  # fmt: skip
            print(f"  {preset}: {n} threads, {least:.1f} ms ({med:.1f} median)", flush=True)
    synthgen.set_num_threads(None)
    print()
    print(markdown_table({
        "title": f"wall tumors of GPU render calls, host ms ({cpus} CPUs)",
        "columns": ["preset", "plans", "wall tumors", "threads", "ms, all calls (least)",
                    "ms (median)", "ms a tumor", "speed-up"],
        "rows": rows,
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
