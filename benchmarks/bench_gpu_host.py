"""Host time of the GPU render: what the CPU spends per sample preparing the GPU's work.

Issue 3: "Host-side planning must not become the bottleneck (profile it; vectorise it)". On a
GPU, ``render_on_gpu`` of one ``liver-classic`` mix sample (about 18 tumors) is host work (box
tables, per-tumor weight tables, texture recipes, packing, one upload) around 15 launches and
one small download. The device's own time is small, so the 2 ms mix target is a bound on this
host time above all.

This script needs no GPU. It runs the very driver (``synthgen._segments``) twice per call:
once on the test suite's stand-in backend (``tests/_cuda_emu.py``, the CUDA C compiled for
the host), recording what the driver downloads (the boxes of phase A, the statistics of phase
B), then, timed, on a backend whose launches do nothing and whose downloads replay that
record, with the time spent in allocations, fills and uploads subtracted. What is left is the host
time of the driver on this machine's CPU, without the emulated kernels' effect on the CPU's
caches. Two cases: *cold*, the driver's band-table caches emptied before the call (the least
of a few replays); *steady*, the caches filled by 30 other mix samples first (a long run:
tables reused between samples; the least of a few such replays). This VM's timings vary by
tens of percent from run to run and between plan sets.
``benchmarks/gpu_check.py`` reports the same figure measured on the GPU machine.

Rows: ``liver-classic`` on the 1 mm benchmark phantom (320x320x224, 1.6 L liver), per size
class, the image "resident on the device" and rendered in place, one plan per call; then
tiny, small and mix in batches of 16 plans per call. Planning (``Synthesizer.plan``) is host
work too and is reported in its own column.

Usage::

    PYTHONPATH=. python benchmarks/bench_gpu_host.py [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

CLASSES = ("tiny", "small", "medium", "large", "mix")
REPLAYS = 5


def _backends(clock=time.perf_counter):
    """``(record, replay)``: the stand-in backend that records what each call downloads, and
    a backend whose launches do nothing, whose downloads replay the record and whose device
    work (allocations, fills, uploads) is timed apart, by ``clock``."""
    sys.path.insert(0, str(ROOT / "tests"))
    from _cuda_emu import HostBackend

    from synthgen._cuda import CupyBackend

    class Record(HostBackend):
        def __init__(self, build_dir, **kw) -> None:
            super().__init__(build_dir, **kw)
            self.log: list[np.ndarray] = []

        def download(self, dev):
            out = super().download(dev)
            self.log.append(out.copy())
            return out

    class Replay:
        xp = np
        ptr = HostBackend.ptr
        on_device = HostBackend.on_device
        context = HostBackend.context

        def __init__(self) -> None:
            self.log: list[np.ndarray] = []
            self.device_s = 0.0
            self.last_wait = 0.0
            self.keep: list = []
            self.start()

        def start(self) -> None:
            """Before a timed call: the split of its host time (:meth:`mark`) starts."""
            self._seg_dev = 0.0
            self._busy, self._t_last = False, clock()
            self.spans: list[tuple[bool, float]] = []  # (serial, seconds) per span

        def mark(self) -> None:
            """A span ends: the host time since the last launch or wait (device work not
            counted), *overlapped* when a launch came last (a GPU runs its kernels
            meanwhile), else *serial* (the device waits for the host). Called at every launch
            and wait, and by the caller after the call."""
            now = clock()
            self.spans.append((not self._busy, now - self._t_last - self._seg_dev))
            self._t_last, self._seg_dev = now, 0.0

        def _t(self, fn, *a):
            t0 = clock()
            try:
                return fn(*a)
            finally:
                dt = clock() - t0
                self.device_s += dt
                self._seg_dev += dt

        block_rule = CupyBackend.block_rule  # the GPU's schedules, computed on the host

        def launch_flat(self, name, n_blocks, *args) -> None:
            self.mark()  # device work: nothing on the host
            self._busy = True

        def launch2d(self, name, n_seg, max_total, *args) -> None:
            self.launch_flat(name, 0)  # (the launches before the flat schedules, ab_host.py)

        def pointer(self, address, dtype=None):
            return np.uint64(address)  # as CupyBackend.pointer

        def alloc(self, nbytes):
            out = self._t(HostBackend.alloc, self, nbytes)
            self.keep.append(out)  # freed after the timing (a device pool frees nothing)
            return out

        def fill(self, dev, value) -> None:
            self._t(dev.fill, value)

        def copy_in(self, dev, host) -> None:
            self._t(HostBackend.copy_in, self, dev, host)

        def download(self, dev):
            # the recorded bytes as the array asked for (another revision of the driver, in
            # ab_host.py, may download the same data typed where this one takes bytes)
            out = self.log.pop(0)
            out = out.reshape(-1).view(np.uint8).view(dev.dtype).reshape(dev.shape)
            self.mark()  # (a download is a wait for the device on a GPU)
            self._busy = False
            self.last_wait = clock()
            return out

    return Record(Path(tempfile.mkdtemp(prefix="sg-emu-"))), Replay()


def scene():
    """The GPU benchmarks' :class:`benchmarks._common.Scene` on the stand-in "device"."""
    sys.path.insert(0, str(ROOT / "tests"))
    from _cuda_emu import to_device

    from benchmarks._common import Scene

    return Scene(to_device)


def run(quick: bool = False) -> dict[str, Any]:
    from synthgen import _cuda, _segments

    rec, rep = _backends()
    sc = scene()
    img_d, mask_d = sc.img_d, sc.mask_d
    n = 6 if quick else 25
    rows = []
    seed = 5_000_000

    def record(plans) -> list[np.ndarray]:
        """Render ``plans`` in one call on the stand-in; what the driver downloaded."""
        k = len(plans)
        rec.log.clear()
        _cuda.render_on_gpu(plans, [img_d] * k, [mask_d] * k, device_id=0, outs=sc.outs(k),
                            be=rec)  # fmt: skip
        return list(rec.log)

    def replay(plans, log, cold: bool) -> float:
        """Host ms of the same call replayed (``cold``: band-table caches emptied first)."""
        k = len(plans)
        if cold:
            _segments.clear_caches()
        rep.log = list(log)
        rep.device_s = 0.0
        t0 = time.perf_counter()
        _cuda.render_on_gpu(plans, [img_d] * k, [mask_d] * k, device_id=0, outs=sc.outs(k),
                            be=rep)  # fmt: skip
        ms = (time.perf_counter() - t0 - rep.device_s) * 1e3
        rep.keep.clear()
        return ms

    # the steady state of a long run: caches filled by earlier samples (these), not by the
    # measured sample itself
    warm = [sc.plans(seed - 1 - i, 1, "mix")[0] for i in range(10 if quick else 30)]
    warm_logs = [record([p]) for p in warm]

    def steady_replay(plans, log) -> float:
        _segments.clear_caches()
        for p, lg in zip(warm, warm_logs, strict=True):
            replay([p], lg, False)
        return replay(plans, log, False)

    for cls in CLASSES:
        t0 = time.perf_counter()
        plans = sc.plans(seed, n, cls)
        plan_ms = (time.perf_counter() - t0) * 1e3 / n
        seed += n
        logs = [record([p]) for p in plans]
        # cold: the least of a few replays, caches emptied before each
        cold = [min(replay([p], lg, True) for _ in range(REPLAYS))
                for p, lg in zip(plans, logs, strict=True)]  # fmt: skip
        steady = [min(steady_replay([p], lg) for _ in range(REPLAYS))
                  for p, lg in zip(plans, logs, strict=True)]  # fmt: skip
        tumors = [len(p.tumors) for p in plans]
        rows.append([cls, round(statistics.mean(tumors), 1), round(plan_ms, 2),
                     round(statistics.median(cold), 2), round(1e3 * sum(cold) / sum(tumors)),
                     round(statistics.median(steady), 2),
                     round(1e3 * sum(steady) / sum(tumors))])  # fmt: skip
        print(f"  {cls}: host {rows[-1][3]} (cold) / {rows[-1][5]} ms/sample", file=sys.stderr)
    # batched: 16 plans per call (render_batch, BatchTumorSynthesis)
    for cls in ("tiny", "small", "mix"):
        plans = sc.plans(seed, 16, cls)
        seed += 16
        log = record(plans)
        reps = 2 if quick else 4
        cold_b = min(replay(plans, log, True) for _ in range(reps)) / len(plans)
        steady_b = min(steady_replay(plans, log) for _ in range(reps)) / len(plans)
        tumors = sum(len(p.tumors) for p in plans)
        rows.append([f"{cls}, 16 plans per call", round(tumors / 16, 1), None, round(cold_b, 2),
                     round(1e3 * cold_b * 16 / tumors), round(steady_b, 2),
                     round(1e3 * steady_b * 16 / tumors)])  # fmt: skip
    return {
        "name": "bench_gpu_host",
        "tables": [
            {
                "title": "GPU driver host time per sample (liver-classic, 1 mm benchmark "
                "phantom, stand-in backend: device work subtracted)",
                "columns": [
                    "class",
                    "tumors/sample",
                    "plan ms",
                    "host ms/sample, cold",
                    "host us/tumor, cold",
                    "host ms/sample, steady",
                    "host us/tumor, steady",
                ],
                "rows": rows,
            }
        ],
        "data": {"samples_per_class": n, "replays_cold": REPLAYS, "warm_up_plans": len(warm)},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    res = run(a.quick)
    from benchmarks import _common as C

    print(C.markdown(res))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1, default=C.json_default))
    return 0


if __name__ == "__main__":
    sys.exit(main())
