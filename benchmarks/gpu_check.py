"""The GPU check of issue 3: the GPU tests, then the GPU benchmark, one table.

Run from the repository root with the GPU machine's own python3 (CuPy, NumPy, SciPy, numba,
PyTorch, pytest; no nibabel, nothing installed)::

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py [--quick] [--json FILE]

What it measures, on ``liver-classic`` and the 1 mm benchmark phantom (320x320x224, 1.6 L
liver), with the image resident on the GPU and rendered in place:

* per size class: GPU ms per sample (render of one plan and a synchronisation of the stream
  after it: host preparation, the render's wait for the boxes and the device's whole work
  included; planning is host work and reported on its own; the tumor statistics, fetched
  when a result's records are read, are not read), the part of it that is host work (the
  call's wall time less the time its downloads wait), CPU ms per
  sample on the same machine (the numba path, every core), their ratio, samples/s in
  batched mode (``render_batch`` of many plans into as many device images) and the CPU's
  time against a sample's share of a batched call (the 20x target is checked both ways: the
  issue does not say which); and that host work of one call split by kind: the time in the
  backend's launches, allocations, fills, uploads, fences and stream context (CuPy calls,
  with their counts) and the rest, the driver's own Python and numba work (and CuPy calls
  made outside the backend);
* a mix sample with a uint8 label map on the device: the render writing the tumor label
  itself (``label_outs``) against the render followed by the per-tumor labelling from the
  result's boxes;
* every preset in its organ of a whole-scan phantom, one plan per call: GPU ms per sample
  (``synthgen.render``: mass effect and wall tumors, made on the host, included) against
  the CPU path;
* the mass effect's warp of device data (``liver``, large tumors: image, organ mask and a
  label map) on the GPU (``synthgen._mass_gpu``) against the route through the host it
  replaced, ms per sample;
* the hollow organs' wall tumors (colon, esophagus; rendered on the host while the device
  works): a batch of 16 plans in one call, GPU ms per sample with them on one thread and on
  the thread pool;
* planning from GPU-resident data (every preset in its organ of a whole-scan phantom, a
  new organ index a plan) against planning from host arrays: ms per plan, copies back;
* the device time of each kernel of one render of a mix sample and of a mix batch of 16
  (CUDA events around each launch; ``--only-kernels`` runs just this, e.g. under ``ncu``);
* the flat block schedules (by default a launch past 32 blocks per SM gets longer blocks,
  and phase B's independent steps run side by side, 15 launches a call) against the same
  with one launch per step (21), without that limit, the 2-D grid of the kernels before
  them (every row launched with the largest row's blocks) and flat schedules of 4x the
  elements per block,
  alternating on the same plans: a mix sample, a mix batch of 16 and a tiny batch of 64,
  call wall time and kernel device time;
* the achieved bandwidth of the fused segmented kernels (blend, write-back, and the blend
  with the texture grid's rescale before it, which it made itself up to edb4cd1: the target
  reads this one and the write-back), re-launched on
  the tables of a batch of 48 large-tumor samples, against a measured device-to-device copy,
  on the default schedules and without the block limit at 1, 2, 4 and 8 times the default
  elements per block (the target reads the default;
  ``--only-bandwidth`` runs just this, e.g. under ``ncu -k regex:'sg_seg_(blend|apply)'``).
  The bytes are those the kernels read and write, counted element by element from the
  render's buffers (``synthgen._segments.moved_bytes``: most voxels of a box are out of the
  tumor's reach and move fewer bytes); the last column gives the fraction as counted before
  (every voxel at 13 and 11 bytes), for comparison with earlier runs.

The CPU timings run after all GPU timings (the CPU path's worker threads use every core).

``--emulate`` runs the same script without a GPU on the host stand-in of the test suite
(the CUDA C compiled for the CPU): a smoke test of the script, its numbers mean nothing.
The whole check is sized to finish in well under 6 minutes on an H100.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(tempfile.gettempdir(), "synthgen-numba"))

import synthgen  # noqa: E402
from benchmarks._common import Scene, preset_mask, usable_cpus, whole_scan  # noqa: E402
from synthgen import _cuda  # noqa: E402

CLASSES = ("tiny", "small", "medium", "large", "mix")
# Targets of issue 3 (goals, not measurements).
TARGET_MIX_MS = 2.0
TARGET_BATCHED_SPS = 1000.0  # tiny and small
TARGET_SPEEDUP = 20.0
TARGET_BW_FRACTION = 0.5


def run_tests(emulate: bool, log: Path | None = None) -> tuple[str, int]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=short",
           "tests/test_cuda_backend.py", "tests/test_torch_batch.py",
           "tests/test_kernels_nvrtc.py", "tests/test_mass_gpu.py"]  # fmt: skip
    # not the host stand-ins' runs of the backend tests (CI runs them; here they would spend
    # about a minute of the GPU session on the CPU)
    cmd += ["-k", "not emu and not simt"]
    cmd.append("-rs")  # say why anything skipped (on the GPU machine: nothing gpu-marked should)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        out, err, rc = p.stdout, p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, rc = "tests timed out after 300 s", 124
    if log is not None:
        log.write_text(out + "\n" + err)
    tail = [ln for ln in out.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
    if rc == 124:
        tail = ["timed out after 300 s"]
    print(out[-6000:], err[-2000:], sep="\n")
    print(f"tests: {tail[0]} ({time.perf_counter() - t0:.0f} s)")
    return tail[0], rc


class Gpu:
    def __init__(self, emulate: bool) -> None:
        self.emulate = emulate
        if emulate:
            sys.path.insert(0, str(ROOT / "tests"))
            from _cuda_emu import HostBackend

            self.be = HostBackend(Path(tempfile.mkdtemp()))
        else:
            self.be = _cuda.CupyBackend(0)
            self.be.compile_all()

    def sync(self) -> None:
        if not self.emulate:
            self.be.xp.cuda.get_current_stream().synchronize()

    def event(self):
        """A mark in the work stream: a recorded CUDA event (the wall clock when emulated)."""
        if self.emulate:
            return time.perf_counter()
        ev = self.be.xp.cuda.Event()
        ev.record()
        return ev

    def elapsed_ms(self, a, b) -> float:
        """ms between two marks of :meth:`event` (waits for the second)."""
        if self.emulate:
            return (b - a) * 1e3
        b.synchronize()
        return self.be.xp.cuda.get_elapsed_time(a, b)

    def timer(self):
        """``stop``: returns the ms since the call (CUDA events on a GPU)."""
        a = self.event()
        return lambda: self.elapsed_ms(a, self.event())


#: The backend's device calls :class:`_WaitTimer` times, by kind of its split.
_TIMED_CALLS = {"launch_flat": "launches", "alloc": "allocations", "fill": "fills",
                "copy_in": "uploads", "upload": "uploads", "fence": "fences"}  # fmt: skip


class _WaitTimer:
    """The backend with the time its downloads (the driver's synchronisations) block
    counted (a call's wall time less that wait is its host work), and the downloads and
    their bytes (``copies``, ``nbytes``); and the host time of its other device calls by
    kind (``split``: kind -> [seconds, calls]): launches, allocations, fills, uploads,
    fences and the stream context (made, entered, left). The rest of a call's host work is
    the driver's own (Python, numba) and the few CuPy calls the backend does not make (a
    stream lookup, the device views of a call's inputs): what a single-plan call's host
    time is made of. (The timing wraps add about a microsecond a call each.)"""

    def __init__(self, be) -> None:
        self._be = be
        self.wait_s = 0.0
        self.copies = self.nbytes = 0
        self.split: dict[str, list] = {}

    def __getattr__(self, name):
        attr = getattr(self._be, name)  # (the driver asks hasattr(be, "fence"))
        kind = _TIMED_CALLS.get(name)
        return attr if kind is None else functools.partial(self._timed, kind, attr)

    def _timed(self, kind: str, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            acc = self.split.setdefault(kind, [0.0, 0])
            acc[0] += time.perf_counter() - t0
            acc[1] += 1

    def context(self, stream, arrays):
        return _TimedContext(self, self._timed("stream context", self._be.context, stream, arrays))

    def download(self, dev):
        t0 = time.perf_counter()
        try:
            host = self._be.download(dev)
            self.copies += 1
            self.nbytes += host.nbytes
            return host
        finally:
            self.wait_s += time.perf_counter() - t0


class _TimedContext:
    """A context whose entry and exit count in its :class:`_WaitTimer`'s split."""

    def __init__(self, timer: _WaitTimer, ctx) -> None:
        self._timer, self._ctx = timer, ctx

    def __enter__(self):
        return self._timer._timed("stream context", self._ctx.__enter__)

    def __exit__(self, *exc):
        return self._timer._timed("stream context", self._ctx.__exit__, *exc)


#: The kinds of :attr:`_WaitTimer.split`, in the order the split table prints them.
SPLIT_KINDS = ("launches", "allocations", "fills", "uploads", "fences", "stream context")


def _median_ms(fn, n: int) -> float:
    ts = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def _split_row(host_ms: list[float], splits: list[dict[str, list]]) -> dict[str, float]:
    """The medians over calls of each :data:`SPLIT_KINDS` kind's host ms and calls, and of
    the rest of the host work (``driver_ms``: the driver's own)."""
    row: dict[str, float] = {}
    for kind in SPLIT_KINDS:
        row[kind + "_ms"] = statistics.median(sp.get(kind, (0.0, 0))[0] * 1e3 for sp in splits)
        row[kind + "_n"] = statistics.median(sp.get(kind, (0.0, 0))[1] for sp in splits)
    row["driver_ms"] = statistics.median(
        h - sum(acc[0] for acc in sp.values()) * 1e3 for h, sp in zip(host_ms, splits, strict=True)
    )
    return row


def bench_classes(g: Gpu, sc: Scene, quick: bool) -> list[dict]:
    be = g.be
    img_h, mask_h, img_d, mask_d = sc.img_h, sc.mask_h, sc.img_d, sc.mask_d
    n_gpu = 3 if g.emulate else (10 if quick else 40)
    n_cpu = 2 if g.emulate else (3 if quick else 8)
    rows = []
    seed = 1_000_000
    for cls in CLASSES:
        try:
            n_plans = max(n_gpu, 64 if cls in ("tiny", "small") else 16)
            if g.emulate:
                n_plans = 4
            t0 = time.perf_counter()
            plans = sc.plans(seed, n_plans, cls)
            plan_ms = (time.perf_counter() - t0) * 1e3 / n_plans
            seed += n_plans
            work_d = img_d.copy()
            tbe = _WaitTimer(be)
            host_ms: list[float] = []

            splits: list[dict[str, list]] = []

            def one(i, work_d=work_d, plans=plans, tbe=tbe, host_ms=host_ms, splits=splits):
                tbe.wait_s = 0.0
                tbe.split = {}
                t0 = time.perf_counter()
                _cuda.render_on_gpu(
                    [plans[i % len(plans)]], [work_d], [mask_d], device_id=0, outs=[work_d], be=tbe
                )
                host_ms.append((time.perf_counter() - t0 - tbe.wait_s) * 1e3)
                splits.append(tbe.split)
                g.sync()

            one(0)  # warm-up (kernel modules loaded, allocator pools filled)
            host_ms.clear()
            splits.clear()
            gpu_ms = _median_ms(one, n_gpu)
            # batched: every plan into its own device image, one call
            outs = [img_d.copy() for _ in plans]
            g.sync()
            reps = 1 if g.emulate else 5
            best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                _cuda.render_on_gpu(
                    plans,
                    [img_d] * len(plans),
                    [mask_d] * len(plans),
                    device_id=0,
                    outs=outs,
                    be=be,
                )
                g.sync()
                best = min(best, time.perf_counter() - t0)
            del outs
            rows.append(
                {
                    "class": cls,
                    "tumors_per_sample": statistics.mean(len(p.tumors) for p in plans),
                    "plan_ms": plan_ms,
                    "gpu_ms": gpu_ms,
                    "host_ms": statistics.median(host_ms),
                    "host_split": _split_row(host_ms, splits),
                    "batched_sps": len(plans) / best,
                    "batch": len(plans),
                    "plans": plans,
                }
            )
        except Exception:  # report the class and go on with the next
            traceback.print_exc()
            print(f"  {cls}: FAILED")
    # the CPU path last: its worker threads (every core) must not share the machine with the
    # GPU timings above
    work_h = img_h.copy()
    for row in rows:
        plans = row.pop("plans")

        def cpu(i, work_h=work_h, plans=plans):
            synthgen.render(plans[i % len(plans)], work_h, mask_h, out=work_h, device="cpu")

        cpu(0)
        row["cpu_ms"] = _median_ms(cpu, n_cpu)
        row["speedup"] = row["cpu_ms"] / row["gpu_ms"]
        # the same CPU time against a GPU sample's share of a batched call
        row["speedup_batched"] = row["cpu_ms"] * row["batched_sps"] / 1e3
        print(f"  {row['class']}: {row}")
    return rows


def bench_presets(g: Gpu, sc: Scene) -> list[dict]:
    """Every preset, one plan per call: GPU ms per sample (``synthgen.render`` on the device,
    in place, and a synchronisation: the preset's mass effect and the hollow organs' wall
    tumors, both made on the host, included) against the CPU path on the same machine, in
    the preset's organ of the whole-scan phantom (int16 image), sizes from the preset's mix,
    plans from the host arrays with the scan's index (planning not timed). Emulated: the
    driver alone (``render_on_gpu``, no mass effect) as a smoke test."""
    ph = whole_scan()
    img_h = np.ascontiguousarray(ph.image)
    img_d = g.be.upload(img_h)
    n_gpu, n_cpu = (2, 1) if g.emulate else (10, 3)
    rows, cases = [], []
    for preset in synthgen.list_presets():
        mask_h = preset_mask(ph, preset)
        mask_d = g.be.upload(mask_h)
        syn = synthgen.Synthesizer(preset, spacing=ph.spacing)
        idx = synthgen.index_organ(mask_h)
        plans = [syn.plan(img_h, mask_h, seed=700 + i, organ_index=idx) for i in range(n_gpu)]
        work_d = img_d.copy()

        def gpu(i, plans=plans, work_d=work_d, mask_d=mask_d):
            if g.emulate:
                _cuda.render_on_gpu([plans[i]], [work_d], [mask_d], device_id=0, outs=[work_d],
                                    be=g.be)  # fmt: skip
            else:
                synthgen.render(plans[i], work_d, mask_d, out=work_d, device="cuda")
            g.sync()

        try:  # (a preset that fails is reported; the others still run)
            gpu(0)
            gpu_ms = _median_ms(gpu, n_gpu)
        except Exception:
            traceback.print_exc()
            print(f"  {preset}: FAILED")
            continue
        rows.append({"preset": preset, "tumors": statistics.mean(len(p.tumors) for p in plans),
                     "gpu_ms": gpu_ms})  # fmt: skip
        cases.append((plans, mask_h))
        print(f"  {rows[-1]}", flush=True)
    work_h = img_h.copy()  # the CPU last: its threads use every core
    for row, (plans, mask_h) in zip(rows, cases, strict=True):

        def cpu(i, plans=plans, mask_h=mask_h):
            synthgen.render(plans[i], work_h, mask_h, out=work_h, device="cpu")

        cpu(0)
        row["cpu_ms"] = _median_ms(cpu, n_cpu)
        row["speedup"] = row["cpu_ms"] / row["gpu_ms"]
        print(f"  {row}", flush=True)
    return rows


def bench_mass_effect(g: Gpu, sc: Scene) -> list[dict]:
    """The mass effect's warp of device data (``mass_effect.prepare_render``: image, organ
    mask and a uint8 label map, in place, and a synchronisation) for ``liver`` plans of the
    large class on the 1 mm phantom (2-3 tumors of 24-40 mm, most of which push): on the GPU
    (``synthgen._mass_gpu``) against the route through the host it replaces, alternating,
    ms per sample. Emulated: the stand-in's arrays are NumPy, both rows the host kernel."""
    from synthgen import _mass_gpu, mass_effect

    syn = synthgen.Synthesizer("liver", spacing=sc.spacing)
    n = 2 if g.emulate else 10
    plans = [syn.plan(sc.img_h, sc.mask_h, seed=4242 + i, size="large", organ_index=sc.idx)
             for i in range(n)]  # fmt: skip
    fields = [len(mass_effect.plan_fields(p)) for p in plans]
    work_d = sc.img_d.copy()
    mask_d = g.be.upload(sc.mask_h.astype(np.uint8))
    lab_d = g.be.upload(sc.mask_h.astype(np.uint8))
    real = _mass_gpu.warp_on_device

    def warp(i, device: bool) -> None:
        _mass_gpu.warp_on_device = real if device else (lambda *a, **k: False)
        try:
            mass_effect.prepare_render(plans[i % n], work_d, mask_d, out=work_d,
                                       organ_inplace=True, label_out=lab_d)  # fmt: skip
            g.sync()
        finally:
            _mass_gpu.warp_on_device = real

    for device in (True, False):  # (kernels compiled, pools filled)
        warp(0, device)
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(n):
        for device in (True, False):
            t0 = time.perf_counter()
            warp(i, device)
            times[device].append((time.perf_counter() - t0) * 1e3)
    row = {"plans": n, "fields": statistics.mean(fields),
           "device_ms": statistics.median(times[True]),
           "host_ms": statistics.median(times[False])}  # fmt: skip
    row["speedup"] = row["host_ms"] / row["device_ms"]
    print(f"  {row}", flush=True)
    return [row]


def bench_walls(g: Gpu, sc: Scene) -> list[dict]:
    """The hollow organs' wall tumors, rendered on the host while the device works: a batch
    of 16 plans in one call (``synthgen.render_batch`` on the device, in place, and a
    synchronisation), ms per sample with the wall tumors on one thread and on the thread
    pool (every core), whole-scan phantom, the scan's index (planning not timed).
    Emulated: the driver alone (``render_on_gpu``)."""
    ph = whole_scan()
    img_h = np.ascontiguousarray(ph.image)
    n_plans, n_calls = (4, 1) if g.emulate else (16, 3)
    rows = []
    for preset in ("colon", "esophagus"):
        mask_h = preset_mask(ph, preset)
        mask_d = g.be.upload(mask_h)
        syn = synthgen.Synthesizer(preset, spacing=ph.spacing)
        idx = synthgen.index_organ(mask_h)
        plans = [syn.plan(img_h, mask_h, seed=900 + i, organ_index=idx) for i in range(n_plans)]
        works = [g.be.upload(img_h) for _ in plans]
        row = {"preset": preset, "plans": n_plans,
               "walls": sum(t.kind == "wall" for p in plans for t in p.tumors)}  # fmt: skip
        for key, threads in (("one_thread_ms", 1), ("pool_ms", None)):
            synthgen.set_num_threads(threads)

            def call(i, plans=plans, works=works, mask_d=mask_d):
                if g.emulate:
                    _cuda.render_on_gpu(plans, works, [mask_d] * len(plans), device_id=0,
                                        outs=works, be=g.be)  # fmt: skip
                else:
                    synthgen.render_batch(plans, works, [mask_d] * len(plans), outs=works,
                                          device="cuda")  # fmt: skip
                g.sync()

            try:
                call(0)
                row[key] = _median_ms(call, n_calls) / n_plans
            finally:
                synthgen.set_num_threads(None)
        row["speedup"] = row["one_thread_ms"] / row["pool_ms"]
        rows.append(row)
        print(f"  {row}", flush=True)
    return rows


def bench_planning(g: Gpu, sc: Scene) -> list[dict]:
    """Planning from GPU-resident data (``_cuda.host_views``: the organ's box reduced on the
    device, its mask copied back as bits, the image's regions and tests copied back as
    answers) against planning from the same arrays on the host: ms per plan, a new organ
    index per plan (as ``BatchTumorSynthesis`` plans), every preset in its organ of a
    whole-scan phantom (320 x 256 x 224 voxels of 1.25 x 1.25 x 1.5 mm, float32 image),
    sizes from the preset's mix, with the copies back and their bytes."""
    ph = whole_scan()
    img = np.ascontiguousarray(ph.image, dtype=np.float32)
    img_d = g.be.upload(img)
    n = 2 if g.emulate else 9
    rows = []
    for preset in synthgen.list_presets():
        mask = preset_mask(ph, preset).astype(np.uint8)
        mask_d = g.be.upload(mask)
        syn = synthgen.Synthesizer(preset, spacing=ph.spacing)
        tbe = _WaitTimer(g.be)
        copies: list[int] = []

        def on_device(i, syn=syn, mask_d=mask_d, tbe=tbe, copies=copies):
            n0 = tbe.copies
            iv, mv, ix = _cuda.host_views(tbe, img_d, mask_d)
            syn.plan(iv, mv, seed=500 + i, organ_index=ix)
            copies.append(tbe.copies - n0)

        def on_host(i, syn=syn, mask=mask):
            syn.plan(img, mask, seed=500 + i)

        g.sync()
        on_device(0)
        on_host(0)
        copies.clear()
        rows.append({"preset": preset, "device_ms": _median_ms(on_device, n),
                     "host_ms": _median_ms(on_host, n), "copies": statistics.median(copies),
                     "mb": tbe.nbytes / 1e6 / (n + 1)})  # fmt: skip
        print(f"  {rows[-1]}", flush=True)
    return rows


def bench_labels(g: Gpu, sc: Scene) -> list[dict]:
    """A label map on the device (uint8, the organ labelled 1): a mix sample rendered with
    ``label_outs`` (the tumor label written by one launch beside the write-back), against
    the render followed by the per-tumor labelling from the result's boxes (a masked
    assignment per tumor: what a training loop had to do before)."""
    be = g.be
    n = 3 if g.emulate else 20
    plans = sc.plans(3_000_000, n, "mix")
    work_d = sc.img_d.copy()
    lab_d = be.upload(sc.mask_h.astype(np.uint8))

    def fused(i):
        _cuda.render_on_gpu([plans[i % n]], [work_d], [sc.mask_d], device_id=0, outs=[work_d],
                            be=be, label_outs=[lab_d], tumor_label=2)  # fmt: skip
        g.sync()

    def boxes(i):
        res = _cuda.render_on_gpu([plans[i % n]], [work_d], [sc.mask_d], device_id=0,
                                  outs=[work_d], be=be)[0]  # fmt: skip
        for sl, m in res.boxes:
            lab_d[sl][m.astype(bool)] = 2
        g.sync()

    rows = []
    for name, fn in (("render + label_out (fused)", fused),
                     ("render, then label per tumor from the boxes", boxes)):  # fmt: skip
        fn(0)
        rows.append({"how": name, "ms": _median_ms(fn, n)})
        print(f"  {name}: {rows[-1]['ms']:.2f} ms/sample")
    return rows


class _KernelTimer:
    """The backend with every launch bracketed by CUDA events (wall clock when emulated):
    each kernel's device time, summed by name."""

    def __init__(self, g: Gpu) -> None:
        self._g = g
        self._be = g.be
        self.marks: list[tuple[str, Any, Any]] = []

    def __getattr__(self, name):
        return getattr(self._be, name)

    def launch_flat(self, name, *args):
        a = self._g.event()
        self._be.launch_flat(name, *args)
        self.marks.append((name, a, self._g.event()))

    def per_kernel(self) -> dict[str, list[float]]:
        """ms per launch by kernel name (after the work is done)."""
        out: dict[str, list[float]] = {}
        for name, a, b in self.marks:
            out.setdefault(name, []).append(self._g.elapsed_ms(a, b))
        return out


def bench_kernels(g: Gpu, sc: Scene) -> list[dict]:
    """Device time of each kernel of one render of a ``mix`` batch of 16 plans (and of one
    plan), from CUDA events around each launch: where the device's time goes."""
    be, img_d, mask_d = g.be, sc.img_d, sc.mask_d
    rows = []
    for n_plans in (1, 2 if g.emulate else 16):
        plans = sc.plans(9_000_000, n_plans, "mix")
        outs = [img_d.copy() for _ in plans]
        args = (plans, [img_d] * n_plans, [mask_d] * n_plans)
        _cuda.render_on_gpu(*args, device_id=0, outs=outs, be=be)  # warm-up
        g.sync()
        kt = _KernelTimer(g)
        t0 = time.perf_counter()
        _cuda.render_on_gpu(*args, device_id=0, outs=outs, be=kt)
        g.sync()
        wall = (time.perf_counter() - t0) * 1e3
        per = kt.per_kernel()
        busy = sum(sum(v) for v in per.values())
        for name, ts in sorted(per.items(), key=lambda kv: -sum(kv[1])):
            rows.append({"plans": n_plans, "kernel": name, "launches": len(ts),
                         "ms": sum(ts), "share": sum(ts) / busy})  # fmt: skip
        rows.append({"plans": n_plans, "kernel": "(all kernels)", "launches": len(kt.marks),
                     "ms": busy, "share": 1.0, "wall_ms": wall})  # fmt: skip
        print(f"  {n_plans} plan(s): wall {wall:.2f} ms, kernels {busy:.2f} ms")
        del outs
    return rows


#: bench_schedules' launch geometries: (name, _segments.GRID2D, _segments.BLOCK_SCALE,
#: _segments.LIMIT_BLOCKS, _segments.FUSE_STEPS); the first is the default.
GEOMETRIES = (("flat, at most 32 blocks per SM a launch (default)", False, 1, True, True),
              ("default, but one launch per step of phase B", False, 1, True, False),
              ("flat, no limit", False, 1, False, True),
              ("2-D grid (before), one launch per step", True, 1, False, False),
              ("flat, 4x elements per block, no limit", False, 4, False, True))  # fmt: skip


def bench_schedules(g: Gpu, sc: Scene) -> list[dict]:
    """The flat block schedules (by default a launch past 32 blocks per SM gets longer
    blocks: ``_segments.LIMIT_BLOCKS``; phase B's independent steps side by side:
    ``_segments.FUSE_STEPS``) against the same with one launch per step, without the
    limit, against the 2-D grid before them (``_segments.GRID2D``: every row launched with
    the largest row's blocks) and against flat schedules of fewer, longer blocks everywhere
    (``_segments.BLOCK_SCALE`` 4), on the same plans, alternating: the call's wall time
    (host work included, device synchronised) and its kernels' device time."""
    from synthgen import _segments

    be, img_d, mask_d = g.be, sc.img_d, sc.mask_d
    cases = ((1, "mix"), (2, "mix")) if g.emulate else ((1, "mix"), (16, "mix"), (64, "tiny"))
    rows = []
    for n_plans, size in cases:
        plans = sc.plans(11_000_000, n_plans, size)
        outs = [img_d.copy() for _ in plans]
        args = (plans, [img_d] * n_plans, [mask_d] * n_plans)
        best = {name: [np.inf, np.inf] for name, *_ in GEOMETRIES}
        try:
            for _ in range(1 if g.emulate else 4):
                for name, grid2d, scale, limit, fuse in GEOMETRIES:
                    _segments.GRID2D, _segments.BLOCK_SCALE = grid2d, scale
                    _segments.LIMIT_BLOCKS, _segments.FUSE_STEPS = limit, fuse
                    for o in outs:  # fresh images: each call renders the same work
                        o[...] = img_d
                    g.sync()
                    t0 = time.perf_counter()
                    _cuda.render_on_gpu(*args, device_id=0, outs=outs, be=be)
                    g.sync()
                    wall = (time.perf_counter() - t0) * 1e3
                    for o in outs:
                        o[...] = img_d
                    kt = _KernelTimer(g)
                    _cuda.render_on_gpu(*args, device_id=0, outs=outs, be=kt)
                    g.sync()
                    busy = sum(sum(v) for v in kt.per_kernel().values())
                    b = best[name]
                    b[0], b[1] = min(b[0], wall), min(b[1], busy)
        finally:
            _segments.GRID2D, _segments.BLOCK_SCALE, _segments.LIMIT_BLOCKS = False, 1, True
            _segments.FUSE_STEPS = True
        for name, *_ in GEOMETRIES:
            rows.append({"plans": n_plans, "class": size, "schedule": name,
                         "wall_ms": best[name][0], "kernels_ms": best[name][1]})  # fmt: skip
            print(f"  {rows[-1]}")
        del outs
    return rows


BLEND_WITH_SCALE = "sg_seg_tex_scale + sg_seg_blend (the blend with its grid's rescale)"
#: The kernel of each launch a render keeps in ``_segments.LAST`` (its arguments there).
_KEPT_KERNELS = {"blend": "sg_seg_blend", "apply": "sg_seg_apply", "scale": "sg_seg_tex_scale"}


def _grid_values(last: dict) -> int:
    """The texture grids' values of a render kept in ``_segments.LAST``."""
    from synthgen import _segments

    C = _segments._columns()
    T = last["T"]
    return sum(math.prod(int(x) for x in T[q, C.G_0 : C.G_0 + 3]) for q in range(last["ne"]))


def bench_bandwidth(g: Gpu, sc: Scene) -> list[dict]:
    """Bandwidth of the fused segmented kernels on a batch of large tumors (re-launched on the
    batch's own tables) against a device-to-device copy: on the default schedules (a launch
    past 32 blocks per SM gets longer blocks: ``_segments.LIMIT_BLOCKS``; the target reads
    these), and without that limit at 1, 2, 4 and 8 times the backend's elements per block
    (``_segments.BLOCK_SCALE``)."""
    from synthgen import _segments

    be = g.be
    xp = be.xp
    n_plans = 2 if g.emulate else 48
    plans = sc.plans(7_000_000, n_plans, "large")
    img_d, mask_d = sc.img_d, sc.mask_d
    reps = 1 if g.emulate else 20
    nbytes = (16 << 20) if g.emulate else (1 << 30)
    a = xp.zeros(nbytes // 4, dtype=xp.float32)
    b = xp.empty_like(a)
    b[...] = a
    stop = g.timer()
    for _ in range(reps):
        b[...] = a
    copy_gbs = 2 * nbytes * reps / (stop() * 1e-3) / 1e9
    del a, b
    rows = [{"kernel": "device copy (reference)", "gb_s": copy_gbs, "fraction": 1.0}]
    variants = [(1, True)] + [(s, False) for s in ((1, 4) if g.emulate else (1, 2, 4, 8))]
    moved = None
    for scale, limit in variants:
        outs = [img_d.copy() for _ in plans]
        _segments.BLOCK_SCALE, _segments.LIMIT_BLOCKS = scale, limit
        try:
            last = _segments.kept_render(_cuda.render_on_gpu, plans, [img_d] * n_plans,
                                         [mask_d] * n_plans, device_id=0, outs=outs,
                                         be=be)  # fmt: skip
        finally:
            _segments.BLOCK_SCALE, _segments.LIMIT_BLOCKS = 1, True
        g.sync()
        n, vox = last["n"], last["voxels"]
        if moved is None:  # (blend, write-back), as the kernels take them (the same plans after)
            moved = _segments.moved_bytes(be, last)
        kernels = {
            # name: (the launches kept in ``last``, in order; bytes moved; bytes per voxel of
            # the tight boxes as counted before (the figure of the README's 467e559 run, with
            # the blend's read of the change that is gone: blur, organ, image, change
            # written; original, change, mask, an int16 image): every voxel counted as
            # reached and changed)
            "sg_seg_blend (fused blend)": (("blend",), moved[0], 4 + 1 + 4 + 4),
            "sg_seg_apply (fused write-back)": (("apply",), moved[1], 4 + 4 + 1 + 2),
            # the blend with the grid's rescale in place before it (the blend did the rescale
            # itself up to edb4cd1: this row compares with the trees before): the grid's
            # values read and written once more (the rescale's repeats here move them on,
            # and so the blend's changes: timed last, after the write-back, whose stores
            # follow the changes)
            BLEND_WITH_SCALE: (("scale", "blend"), moved[0] + 8 * _grid_values(last),
                               4 + 1 + 4 + 4),
        }  # fmt: skip
        for name, (keys, nbytes_k, per_voxel) in kernels.items():

            def fn(keys=keys, last=last):
                for k in keys:
                    be.launch_flat(_KEPT_KERNELS[k], *last[k])

            fn()
            stop = g.timer()
            for _ in range(reps):
                fn()
            ms = stop() / reps
            gbs = nbytes_k / (ms * 1e-3) / 1e9
            nominal = vox * per_voxel / (ms * 1e-3) / 1e9
            launches = sum(int(last[k][0]) for k in keys)
            label = (
                f"{name}, {launches} blocks"
                if limit
                else f"{name}, no limit, {scale}x elements per block, {launches} blocks"
            )
            rows.append({"kernel": label, "ms": ms, "gb_s": gbs, "fraction": gbs / copy_gbs,
                         "bytes": nbytes_k, "bytes_per_voxel": nbytes_k / vox,
                         "gb_s_nominal": nominal, "fraction_nominal": nominal / copy_gbs,
                         "voxels": vox, "segments": n, "block_scale": scale,
                         "limit_blocks": limit, "blocks": launches})  # fmt: skip
            print(f"  {rows[-1]}")
        del outs, last
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--emulate", action="store_true", help="no GPU: smoke-test the script")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--log", type=Path, help="write the whole test output here")
    ap.add_argument(
        "--only-kernels",
        action="store_true",
        help="only the per-kernel device times (e.g. under a profiler)",
    )
    ap.add_argument(
        "--only-bandwidth",
        action="store_true",
        help="only the fused kernels' bandwidth (e.g. under a profiler)",
    )
    args = ap.parse_args()
    t_all = time.perf_counter()
    test_line, rc = ("skipped", 0) if args.skip_tests else run_tests(args.emulate, args.log)
    g = Gpu(args.emulate)
    sc = Scene(g.be.upload)
    if args.only_kernels:
        bench_kernels(g, sc)
        return 0
    if args.only_bandwidth:
        bench_bandwidth(g, sc)
        return 0
    if not args.emulate:
        from synthgen._device import gpu_report

        print(gpu_report())
    print("benchmark: size classes")
    rows = bench_classes(g, sc, args.quick)

    def part(title: str, bench) -> list[dict]:
        """One benchmark part; a failure is printed and the other tables still print."""
        print(f"benchmark: {title}")
        try:
            return bench(g, sc)
        except Exception:
            traceback.print_exc()
            return []

    labs = part("label maps on the device", bench_labels)
    plan_rows = part("planning from device data", bench_planning)
    preset_rows = part("every preset, one plan per call", bench_presets)
    wall_rows = part("wall tumors of a batch: one thread, the pool", bench_walls)
    me_rows = part("mass effect of device data: on the GPU, through the host", bench_mass_effect)
    kern = part("device time per kernel", bench_kernels)
    bw = part("fused kernel bandwidth", bench_bandwidth)
    sched = part("launch geometries: flat schedules, 2-D grid, longer blocks", bench_schedules)
    print()
    print(f"## GPU check ({'EMULATED, numbers meaningless' if args.emulate else 'GPU'})")
    print(f"tests: {test_line}")
    print()
    print("| class | tumors | plan ms (host) | GPU ms/sample | of which host ms | "
          "CPU ms/sample | CPU/GPU | batched samples/s (batch) | CPU/GPU batched |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['class']} | {r['tumors_per_sample']:.1f} | {r['plan_ms']:.2f} | "
              f"{r['gpu_ms']:.2f} | {r['host_ms']:.2f} | {r['cpu_ms']:.1f} | "
              f"{r['speedup']:.1f}x | {r['batched_sps']:.0f} ({r['batch']}) | "
              f"{r['speedup_batched']:.1f}x |")  # fmt: skip
    print()
    print("| class: host ms of one call | all | " + " | ".join(SPLIT_KINDS)
          + " | the rest: the driver's own |")  # fmt: skip
    print("|---|---|" + "---|" * len(SPLIT_KINDS) + "---|")
    for r in rows:
        sp = r["host_split"]
        cells = " | ".join(f"{sp[k + '_ms']:.3f} ({sp[k + '_n']:.0f})" for k in SPLIT_KINDS)
        print(f"| {r['class']} | {r['host_ms']:.3f} | {cells} | {sp['driver_ms']:.3f} |")
    print()
    print("| mix sample with a device label map (uint8) | ms/sample |")
    print("|---|---|")
    for r in labs:
        print(f"| {r['how']} | {r['ms']:.2f} |")
    print()
    print("| preset: planning, new index a plan | ms/plan, device data | ms/plan, host data | "
          "copies back a plan | MB back a plan |")  # fmt: skip
    print("|---|---|---|---|---|")
    for r in plan_rows:
        print(f"| {r['preset']} | {r['device_ms']:.2f} | {r['host_ms']:.2f} | {r['copies']:.0f} | "
              f"{r['mb']:.2f} |")  # fmt: skip
    print()
    print("| preset (whole scan, one plan per call) | tumors | GPU ms/sample | CPU ms/sample | "
          "CPU/GPU |")  # fmt: skip
    print("|---|---|---|---|---|")
    for r in preset_rows:
        print(f"| {r['preset']} | {r['tumors']:.1f} | {r['gpu_ms']:.2f} | {r['cpu_ms']:.1f} | "
              f"{r['speedup']:.1f}x |")  # fmt: skip
    print()
    print(f"| preset (batch of plans, {usable_cpus()} CPUs) | plans | wall tumors | "
          "GPU ms/sample, walls on one thread | on the pool | speed-up |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in wall_rows:
        print(f"| {r['preset']} | {r['plans']} | {r['walls']} | {r['one_thread_ms']:.2f} | "
              f"{r['pool_ms']:.2f} | {r['speedup']:.1f}x |")  # fmt: skip
    print()
    print("| mass effect of device data (liver, large) | plans | fields a plan | "
          "ms/sample on the GPU | through the host | speed-up |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in me_rows:
        print(f"| warp of image, organ mask, label map | {r['plans']} | {r['fields']:.1f} | "
              f"{r['device_ms']:.2f} | {r['host_ms']:.2f} | {r['speedup']:.1f}x |")  # fmt: skip
    print()
    print("| kernel | ms | bytes/voxel moved | GB/s | of copy | of copy, 13 and 11 B/voxel |")
    print("|---|---|---|---|---|---|")
    for r in bw:
        ms = f"{r['ms']:.3f}" if "ms" in r else "-"
        bpv = f"{r['bytes_per_voxel']:.2f}" if "bytes_per_voxel" in r else "-"
        nom = f"{100 * r['fraction_nominal']:.0f}%" if "fraction_nominal" in r else "-"
        print(f"| {r['kernel']} | {ms} | {bpv} | {r['gb_s']:.0f} | {100 * r['fraction']:.0f}% "
              f"| {nom} |")  # fmt: skip
    print()
    print("| plans | class | schedule | call ms (wall, synchronised) | kernels ms (device) |")
    print("|---|---|---|---|---|")
    for r in sched:
        print(f"| {r['plans']} | {r['class']} | {r['schedule']} | {r['wall_ms']:.3f} | "
              f"{r['kernels_ms']:.3f} |")  # fmt: skip
    print()
    print("| plans | kernel | launches | device ms | share |")
    print("|---|---|---|---|---|")
    for r in kern:
        extra = f" (call's wall time {r['wall_ms']:.2f} ms)" if "wall_ms" in r else ""
        print(f"| {r['plans']} | {r['kernel']}{extra} | {r['launches']} | {r['ms']:.3f} | "
              f"{100 * r['share']:.0f}% |")  # fmt: skip
    by = {r["class"]: r for r in rows}
    # (the write-back, and the blend with the grid's rescale it did itself up to edb4cd1)
    fused = [r for r in bw if r["kernel"].startswith(("sg_seg_apply", BLEND_WITH_SCALE))
             and r["limit_blocks"]]  # fmt: skip

    def check(need, fn):
        return fn() if need else None  # None: not measured (a class or kernel failed)

    checks = [
        (f"mix <= {TARGET_MIX_MS} ms/sample",
         check("mix" in by, lambda: by["mix"]["gpu_ms"] <= TARGET_MIX_MS)),
        (f"tiny and small >= {TARGET_BATCHED_SPS:.0f} samples/s batched",
         check("tiny" in by and "small" in by,
               lambda: min(by["tiny"]["batched_sps"], by["small"]["batched_sps"])
               >= TARGET_BATCHED_SPS)),
        (f"every class >= {TARGET_SPEEDUP:.0f}x the CPU (one plan per call)",
         check(len(rows) == len(CLASSES),
               lambda: min(r["speedup"] for r in rows) >= TARGET_SPEEDUP)),
        (f"every class >= {TARGET_SPEEDUP:.0f}x the CPU (per sample of a batched call)",
         check(len(rows) == len(CLASSES),
               lambda: min(r["speedup_batched"] for r in rows) >= TARGET_SPEEDUP)),
        (f"fused blend/write-back >= {100 * TARGET_BW_FRACTION:.0f}% of copy bandwidth",
         check(len(fused) == 2, lambda: min(r["fraction"] for r in fused) >= TARGET_BW_FRACTION)),
    ]  # fmt: skip
    print()
    for what, ok in checks:
        print(f"target {what}: {'not measured' if ok is None else 'met' if ok else 'NOT met'}")
    print(f"total {time.perf_counter() - t_all:.0f} s")
    if args.json:
        data = {"tests": test_line, "classes": rows, "kernels": kern, "bandwidth": bw,
                "labels": labs, "schedules": sched, "planning": plan_rows,
                "presets": preset_rows, "walls": wall_rows}  # fmt: skip
        args.json.write_text(json.dumps(data, indent=1))
    failed = len(rows) < len(CLASSES) or len(fused) < 2
    return rc or int(failed)


if __name__ == "__main__":
    sys.exit(main())
