"""Engine benchmarks: per-sample latency, per-organ latency, scaling, start-up and memory.

Parts (``--parts`` picks a subset when run on its own):

a. Latency on the 1 mm benchmark phantom (320x320x224, 1.6 L liver), preset
   ``liver-classic``, each size class: the whole ``synthgen.synthesize`` call (plan + render)
   into a caller-owned buffer, a new seed (fresh texture) every call; and the NumPy/SciPy
   re-implementation of the published recipe (``benchmarks/baseline_recipe.py``) on the same
   phantom in the same process.
b. Latency of every organ's default preset on :func:`synthgen.phantom.make_phantom` at a
   realistic grid (256x256x160, 1.5x1.5x2.0 mm), each size class.
c. Scaling with the scan size: the same liver in 256x256x128, 512x512x256 and 512x512x512
   grids at 1 mm.
d. Cold and warm start: a fresh interpreter from process start to the first sample, with a
   populated and with an empty numba cache; ``import synthgen`` alone.
e. Peak memory beyond the input and output arrays (fresh processes, VmHWM).

Every number in the tables is measured by this script, except the published figures and the
targets, which are constants below and labelled as such.

Usage::

    PYTHONPATH=. python benchmarks/bench_engine.py [--quick] [--parts abcde] [--json FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run by path: make `benchmarks` and `synthgen` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common as C
from synthgen.presets import ORGANS

NAME = "bench_engine"
CLASSES = ("tiny", "small", "medium", "large", "mix")

# Published figures (shared/REFERENCE.md section 2: median ms per call of the published CPU
# code on the same benchmark phantom, two runs where a range is given). NOT measured here.
PUBLISHED_MS = {
    "tiny": "188-260",
    "small": "196-210",
    "medium": "226-230",
    "large": "269-400",
    "mix": "449",
}
# Project targets (goals, NOT measurements).
TARGET_MS = {"tiny": 19.0, "small": 20.0, "medium": 23.0, "large": 27.0, "mix": 45.0}
TARGET_SCALING = 1.5  # 512^3 / 256x256x128 latency ratio must stay below this
TARGET_WARM_START_S = 3.0  # process start -> first sample, numba cache populated
TARGET_PEAK_MB = 300.0  # extra memory beyond input and output arrays

SPACING_1MM = (1.0, 1.0, 1.0)
ORGAN_GRID = ((256, 256, 160), (1.5, 1.5, 2.0))
SCALING_GRIDS = ((256, 256, 128), (512, 512, 256), (512, 512, 512))
SCALING_SEMI_AXES = (60.0, 50.0, 45.0)  # mm; fits in 128 slices at 1 mm
SMALL_SHAPE = (160, 160, 112)  # start-up phantom
SMALL_SEMI_AXES = (42.0, 35.0, 32.0)


def _settings(quick: bool) -> dict[str, int]:
    """Repetition counts (``quick``: a smoke test, not for reporting)."""
    if quick:
        return {
            "a_n": 5,
            "a_warmup": 3,
            "a_base_n": 2,
            "b_n": 3,
            "b_warmup": 1,
            "c_n": 3,
            "c_warmup": 1,
            "d_import_n": 3,
            "d_cold_n": 1,
            "d_warm_n": 1,
            "e_n": 3,
        }
    return {
        "a_n": 30,
        "a_warmup": 3,
        "a_base_n": 5,
        "b_n": 15,
        "b_warmup": 2,
        "c_n": 20,
        "c_warmup": 2,
        "d_import_n": 7,
        "d_cold_n": 2,
        "d_warm_n": 3,
        "e_n": 10,
    }


class _Seeds:
    """Hands out seeds that are never repeated within one run (a fresh texture every call)."""

    def __init__(self, start: int = 1_000_003) -> None:
        self._next = start

    def take(self, n: int) -> list[int]:
        out = list(range(self._next, self._next + n))
        self._next += n
        return out


def _load() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _yes(ok: bool) -> str:
    return "yes" if ok else "no"


@contextmanager
def _numba_threads(n: int | None) -> Iterator[int]:
    """Run the block with ``n`` synthgen render threads (``None``: the default); yields the
    count in effect."""
    import synthgen
    from synthgen import _pool

    old = _pool._NUM_THREADS
    if n is not None:
        synthgen.set_num_threads(n)
    try:
        yield _pool._threads()
    finally:
        synthgen.set_num_threads(old)


def _time_synthesize(
    img: np.ndarray,
    mask: np.ndarray,
    buf: np.ndarray,
    *,
    organ: str,
    spacing: Sequence[float],
    size: str | None,
    seeds: Sequence[int],
    warmup_seeds: Sequence[int] = (),
    organ_index: Any = None,
) -> dict[str, list]:
    """Time whole ``synthesize`` calls into ``buf``.

    ``buf`` must hold ``img``; after each call only the result's boxes are copied back from
    ``img`` (outside the timed region). Returns ``{"wall": [s], "cpu": [s], "tumors": [n]}``
    for the timed calls; ``cpu`` is the process CPU time (all threads): CPU well below
    wall x threads means the threads waited for a core.
    """
    import synthgen

    out: dict[str, list] = {"wall": [], "cpu": [], "tumors": []}
    gc.collect()
    nwarm = len(warmup_seeds)
    for i, s in enumerate([*warmup_seeds, *seeds]):
        c0 = time.process_time()
        t0 = time.perf_counter()
        res = synthgen.synthesize(
            img,
            mask,
            organ=organ,
            spacing=spacing,
            seed=s,
            size=size,
            out=buf,
            organ_index=organ_index,
        )
        dt = time.perf_counter() - t0
        dc = time.process_time() - c0
        for sl, _m in res.boxes:
            buf[sl] = img[sl]
        if i >= nwarm:
            out["wall"].append(dt)
            out["cpu"].append(dc)
            out["tumors"].append(len(res.tumors))
    return out


def _summary(r: dict[str, list]) -> dict[str, Any]:
    """JSON summary of a :func:`_time_synthesize` result (milliseconds)."""
    return {
        "ms": C.stats_ms(r["wall"]),
        "cpu_ms": C.stats_ms(r["cpu"]),
        "samples_ms": [t * 1e3 for t in r["wall"]],
        "tumors_per_sample_mean": float(np.mean(r["tumors"])) if r["tumors"] else None,
    }


def _bbox_shape(mask: np.ndarray) -> tuple[int, int, int]:
    shape = []
    for ax in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))
        shape.append(int(hit[-1] - hit[0] + 1))
    return shape[0], shape[1], shape[2]


# ------------------------------------------------------------------------------ a. latency


def part_a(cfg: dict[str, int], seeds: _Seeds) -> tuple[list[dict], dict]:
    from benchmarks.baseline_recipe import build_texture_bank, published_recipe
    from synthgen.phantom import LABELS, benchmark_phantom

    t0 = time.perf_counter()
    ph = benchmark_phantom()
    t_phantom = time.perf_counter() - t0
    img = ph.image
    liver = ph.labels == LABELS["liver"]
    del ph
    buf = img.copy()
    liver_l = float(np.count_nonzero(liver)) / 1e6  # 1 mm^3 voxels

    # Baseline texture bank: built once, outside the timing (2 textures of the liver box).
    box_shape = _bbox_shape(liver)
    t0 = time.perf_counter()
    bank = build_texture_bank(box_shape, 2, np.random.default_rng(20251014))
    t_bank = time.perf_counter() - t0
    # One untimed baseline call first (page-in of SciPy code and of large allocations).
    published_recipe(img, liver, "tiny", np.random.default_rng(seeds.take(1)[0]), bank)

    def synth(cls: str, threads: int | None) -> tuple[dict[str, list], int]:
        with _numba_threads(threads) as nt:
            r = _time_synthesize(
                img,
                liver,
                buf,
                organ="liver-classic",
                spacing=SPACING_1MM,
                size=cls,
                seeds=seeds.take(cfg["a_n"]),
                warmup_seeds=seeds.take(cfg["a_warmup"]),
            )
        return r, nt

    rows, data = [], {"classes": {}}
    threads = 0
    for cls in CLASSES:
        r, threads = synth(cls, None)
        r1, _ = synth(cls, 1)
        s, s1 = C.stats_ms(r["wall"]), C.stats_ms(r1["wall"])
        btimes = []
        gc.collect()
        for seed in seeds.take(cfg["a_base_n"]):
            rng = np.random.default_rng(seed)
            t0 = time.perf_counter()
            out, label = published_recipe(img, liver, cls, rng, bank)
            btimes.append(time.perf_counter() - t0)
            del out, label
        b = C.stats_ms(btimes)
        ratio = b["median"] / s["median"] if s["median"] > 0 else float("nan")
        rows.append(
            [
                cls,
                s["median"],
                s["p90"],
                s1["median"],
                b["median"],
                PUBLISHED_MS[cls],
                TARGET_MS[cls],
                f"{ratio:.1f}x",
                _yes(s["median"] <= TARGET_MS[cls]),
            ]
        )
        data["classes"][cls] = {
            "synthgen": _summary(r),
            "synthgen_1_thread": _summary(r1),
            "baseline_ms": b,
            "baseline_samples_ms": [t * 1e3 for t in btimes],
            "ratio_baseline_over_synthgen": ratio,
            "published_ms_reference": PUBLISHED_MS[cls],
            "target_ms": TARGET_MS[cls],
        }
    restored = bool(np.array_equal(buf, img))
    data.update(
        phantom_shape=list(img.shape),
        liver_l=liver_l,
        phantom_build_s=t_phantom,
        numba_threads=threads,
        baseline_bank_shape=list(box_shape),
        baseline_bank_build_s=t_bank,
        baseline_bank_mb=sum(t.nbytes for t in bank) / 2**20,
        buffer_restored_exactly=restored,
        n=cfg["a_n"],
        warmup=cfg["a_warmup"],
        baseline_n=cfg["a_base_n"],
    )
    cpu_ratio = {
        cls: d["synthgen"]["cpu_ms"]["median"] / d["synthgen"]["ms"]["median"]
        for cls, d in data["classes"].items()
    }
    data["cpu_over_wall_median"] = cpu_ratio
    table = {
        "title": (
            "a. Latency per sample, liver-classic, 1 mm benchmark phantom "
            f"{'x'.join(map(str, img.shape))} (liver {liver_l:.2f} L)"
        ),
        "columns": [
            "class",
            "synthgen median ms",
            "p90 ms",
            "synthgen 1 thread median ms",
            "baseline median ms",
            "published ms (REFERENCE, not measured)",
            "target ms",
            "baseline/synthgen",
            "meets target",
        ],
        "rows": rows,
        "notes": [
            f"synthgen: whole `synthesize` call (plan + render) into a caller-owned int16 "
            f"buffer, new seed every call, median/p90 of {cfg['a_n']} calls after "
            f"{cfg['a_warmup']} warm-up calls per class and thread setting; only the result's "
            f"boxes are copied back between calls (untimed). Buffer equal to the input after "
            f"the run: {_yes(restored)}. Default render threads: {threads}; '1 thread': "
            "`synthgen.set_num_threads(1)` (as in a data-loader worker). Process CPU / wall "
            "(default threads, median): "
            + ", ".join(f"{c} {v:.2f}" for c, v in cpu_ratio.items())
            + ".",
            f"baseline: `benchmarks/baseline_recipe.published_recipe` (single-threaded "
            f"NumPy/SciPy), median of {cfg['a_base_n']} calls per class (same process, same "
            f"phantom); like the published code it returns a full-volume float32 copy and a "
            f"uint8 label map. Its texture bank (2 textures of the liver box {box_shape}, "
            f"{data['baseline_bank_mb']:.0f} MB) was built once outside the timing in "
            f"{t_bank:.1f} s.",
            "published: figures quoted from shared/REFERENCE.md section 2 (published code, "
            "another 2-core machine); targets are project goals. Neither is measured here.",
        ],
    }
    return [table], data


# ------------------------------------------------------------------------------ b. organs


def part_b(cfg: dict[str, int], seeds: _Seeds) -> tuple[list[dict], dict]:
    from synthgen.phantom import make_phantom
    from synthgen.presets import load_preset

    shape, spacing = ORGAN_GRID
    t0 = time.perf_counter()
    ph = make_phantom(shape, spacing, seed=0)
    t_phantom = time.perf_counter() - t0
    img = ph.image
    buf = img.copy()
    cols = [*CLASSES, "preset mix"]
    rows, data = [], {"organs": {}}
    for organ in ORGANS:
        mask = ph.mask(organ)
        ml = ph.volume_ml(organ)
        preset = load_preset(organ)
        row: list[Any] = [organ, preset.name, ml]
        od: dict[str, Any] = {"organ_ml": ml, "preset": preset.name, "classes": {}}
        for cls in cols:
            size = None if cls == "preset mix" else cls
            if size is not None and size not in preset.classes:
                row.append("n/a")
                continue
            try:
                r = _time_synthesize(
                    img,
                    mask,
                    buf,
                    organ=organ,
                    spacing=spacing,
                    size=size,
                    seeds=seeds.take(cfg["b_n"]),
                    warmup_seeds=seeds.take(cfg["b_warmup"]),
                )
            except ValueError as e:
                row.append("error")
                od["classes"][cls] = {"error": str(e)}
                continue
            summary = _summary(r)
            row.append(summary["ms"]["median"])
            od["classes"][cls] = summary
        rows.append(row)
        data["organs"][organ] = od
    data.update(shape=list(shape), spacing=list(spacing), phantom_build_s=t_phantom, n=cfg["b_n"])
    table = {
        "title": (
            f"b. Latency per organ (default presets), make_phantom {'x'.join(map(str, shape))} "
            f"at {'x'.join(map(str, spacing))} mm: median ms per sample"
        ),
        "columns": ["organ", "preset", "organ mL", *cols],
        "rows": rows,
        "notes": [
            f"Whole `synthesize` call into a caller-owned int16 buffer, median of {cfg['b_n']} "
            f"samples after {cfg['b_warmup']} warm-up call(s) per cell, new seed every call. "
            "'preset mix': no class forced (the preset draws one). n/a: class not in preset.",
        ],
    }
    return [table], data


# ------------------------------------------------------------------------------ c. scaling


def part_c(cfg: dict[str, int], seeds: _Seeds) -> tuple[list[dict], dict]:
    from synthgen.phantom import LABELS, benchmark_phantom

    classes = ("mix", "large")
    # The same seeds on every grid: the liver is the same up to a translation, so every grid
    # gets the same tumors and only the scan size differs.
    run_seeds = {c: seeds.take(cfg["c_n"]) for c in classes}
    warm_seeds = {c: seeds.take(cfg["c_warmup"]) for c in classes}
    results: dict[str, Any] = {}
    for shape in SCALING_GRIDS:
        centre = tuple(n // 2 for n in shape)
        t0 = time.perf_counter()
        ph = benchmark_phantom(shape, liver_center=centre, liver_semi_axes=SCALING_SEMI_AXES)
        t_phantom = time.perf_counter() - t0
        img = ph.image
        liver = ph.labels == LABELS["liver"]
        del ph
        buf = img.copy()
        key = "x".join(map(str, shape))
        results[key] = {"phantom_build_s": t_phantom, "liver_voxels": int(liver.sum())}
        import synthgen

        synthgen.index_organ(liver)  # first call loads the kernel
        t0 = time.perf_counter()
        index = synthgen.index_organ(liver)
        results[key]["index_ms"] = (time.perf_counter() - t0) * 1e3
        for cls in classes:
            for variant, idx in (("", None), ("_indexed", index)):
                r = _time_synthesize(
                    img,
                    liver,
                    buf,
                    organ="liver-classic",
                    spacing=SPACING_1MM,
                    size=cls,
                    seeds=run_seeds[cls],
                    warmup_seeds=warm_seeds[cls],
                    organ_index=idx,
                )
                results[key][cls + variant] = _summary(r)
        del img, liver, buf
        gc.collect()

    keys = list(results)
    ref = results[keys[0]]
    variants = [c + v for c in classes for v in ("", "_indexed")]
    rows = []
    for key in keys:
        r = results[key]
        row: list[Any] = [key, r["liver_voxels"], f"{r['index_ms']:.1f}"]
        for var in variants:
            m = r[var]["ms"]["median"]
            row += [m, f"{m / ref[var]['ms']['median']:.2f}x"]
        rows.append(row)
    ratio = {
        var: results[keys[-1]][var]["ms"]["median"] / ref[var]["ms"]["median"] for var in variants
    }
    data = {
        "grids": results,
        "ratio_largest_over_smallest": ratio,
        "target_ratio": TARGET_SCALING,
        "n": cfg["c_n"],
    }
    verdict = ", ".join(
        f"{var} {ratio[var]:.2f}x ({'meets' if ratio[var] < TARGET_SCALING else 'misses'})"
        for var in variants
    )
    table = {
        "title": "c. Scaling with scan size: same liver, liver-classic, 1 mm",
        "columns": [
            "grid",
            "liver voxels",
            "index_organ ms (once)",
            "mix ms",
            "mix vs smallest",
            "mix ms, indexed",
            "vs smallest",
            "large ms",
            "large vs smallest",
            "large ms, indexed",
            "vs smallest",
        ],
        "rows": rows,
        "notes": [
            f"Liver ellipsoid with semi-axes {SCALING_SEMI_AXES} mm at the grid centre; the "
            f"same {cfg['c_n']} seeds on every grid (after {cfg['c_warmup']} warm-up "
            "call(s)), so the tumors are identical and only the scan size changes.",
            "'indexed': the mask indexed once per scan with `synthgen.index_organ` and passed "
            "as `organ_index=` (many samples from one unchanging mask); otherwise every call "
            "scans the whole mask for the organ's bounding box.",
            f"{keys[-1]} / {keys[0]}: {verdict}; target < {TARGET_SCALING}x (project goal).",
        ],
    }
    return [table], data


# ------------------------------------------------------------------------------ d. start-up

_CHILD_IMPORT = """
import json, time
t0 = time.clock_gettime(time.CLOCK_MONOTONIC)
import synthgen
t1 = time.clock_gettime(time.CLOCK_MONOTONIC)
import sys
print(json.dumps({"t_enter": t0, "t_imported": t1,
                  "numba_loaded": "numba" in sys.modules, "scipy_loaded": "scipy" in sys.modules}))
"""

_CHILD_PASS = """
import json, time
print(json.dumps({"t_enter": time.clock_gettime(time.CLOCK_MONOTONIC)}))
"""

_CHILD_FIRST_SAMPLE = """
import time
t_enter = time.clock_gettime(time.CLOCK_MONOTONIC)
import json, sys
import numpy as np
t_numpy = time.clock_gettime(time.CLOCK_MONOTONIC)
import synthgen
t_import = time.clock_gettime(time.CLOCK_MONOTONIC)
img = np.load(sys.argv[1])
mask = np.load(sys.argv[2])
t_load = time.clock_gettime(time.CLOCK_MONOTONIC)
synthgen.synthesize(img, mask, organ="liver-classic", spacing=(1.0, 1.0, 1.0), seed=1,
                    size="mix")
t_first = time.clock_gettime(time.CLOCK_MONOTONIC)
synthgen.synthesize(img, mask, organ="liver-classic", spacing=(1.0, 1.0, 1.0), seed=2,
                    size="mix")
t_second = time.clock_gettime(time.CLOCK_MONOTONIC)
print(json.dumps({"t_enter": t_enter, "t_numpy": t_numpy, "t_import": t_import,
                  "t_load": t_load, "t_first": t_first, "t_second": t_second}))
"""


def _count_cache_files(d: Path) -> int:
    return sum(1 for p in d.rglob("*") if p.suffix in (".nbi", ".nbc"))


def part_d(cfg: dict[str, int], seeds: _Seeds) -> tuple[list[dict], dict]:
    from synthgen.phantom import LABELS, benchmark_phantom

    tmp = Path(tempfile.mkdtemp(prefix="synthgen-bench-start-"))
    try:
        ph = benchmark_phantom(SMALL_SHAPE, liver_semi_axes=SMALL_SEMI_AXES)
        img_path, mask_path = tmp / "image.npy", tmp / "liver.npy"
        np.save(img_path, ph.image)
        np.save(mask_path, ph.labels == LABELS["liver"])
        small_ml = float(np.count_nonzero(ph.labels == LABELS["liver"])) / 1000.0
        del ph
        args = (str(img_path), str(mask_path))

        # Interpreter alone, and `import synthgen` alone.
        t_pass, t_imp_proc, t_imp_in = [], [], []
        loaded: dict[str, bool] = {}
        for _ in range(cfg["d_import_n"]):
            r, t0, t1 = C.run_child(_CHILD_PASS)
            t_pass.append(t1 - t0)
            r, t0, t1 = C.run_child(_CHILD_IMPORT)
            t_imp_proc.append(t1 - t0)
            t_imp_in.append(r["t_imported"] - r["t_enter"])
            loaded = {"numba": r["numba_loaded"], "scipy": r["scipy_loaded"]}

        def first_sample(cache_dir: Path) -> dict[str, float]:
            r, t0, t1 = C.run_child(_CHILD_FIRST_SAMPLE, args, {"NUMBA_CACHE_DIR": str(cache_dir)})
            return {
                "process_start_to_first_sample_s": r["t_first"] - t0,
                "interpreter_start_s": r["t_enter"] - t0,
                "import_numpy_s": r["t_numpy"] - r["t_enter"],
                "import_synthgen_s": r["t_import"] - r["t_numpy"],
                "load_arrays_s": r["t_load"] - r["t_import"],
                "first_call_s": r["t_first"] - r["t_load"],
                "second_call_s": r["t_second"] - r["t_first"],
                "process_total_s": t1 - t0,
            }

        cold, cache_files = [], []
        cache = tmp / "cache-none"
        for i in range(cfg["d_cold_n"]):
            cache = tmp / f"numba-cache-{i}"
            cache.mkdir()  # empty: every kernel is compiled
            cold.append(first_sample(cache))
            cache_files.append(_count_cache_files(cache))
        warm = [first_sample(cache) for _ in range(cfg["d_warm_n"])]  # last cold run's cache
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def med(runs: list[dict[str, float]], k: str) -> float:
        return float(np.median([r[k] for r in runs]))

    steps = [
        ("process start -> first sample done", "process_start_to_first_sample_s"),
        ("· interpreter start", "interpreter_start_s"),
        ("· import numpy", "import_numpy_s"),
        ("· import synthgen", "import_synthgen_s"),
        ("· load small phantom (.npy)", "load_arrays_s"),
        ("· first synthesize call", "first_call_s"),
        ("second synthesize call", "second_call_s"),
    ]
    warm_total = med(warm, "process_start_to_first_sample_s")
    rows = [[label, med(warm, k), med(cold, k)] for label, k in steps]
    rows.append(
        [
            f"meets target (warm <= {TARGET_WARM_START_S:g} s)",
            _yes(warm_total <= TARGET_WARM_START_S),
            "",
        ]
    )
    imp_rows = [
        ["python -c pass (process wall)", float(np.median(t_pass))],
        ["python -c 'import synthgen' (process wall)", float(np.median(t_imp_proc))],
        ["import synthgen (inside the process, incl. numpy)", float(np.median(t_imp_in))],
    ]
    data = {
        "small_phantom_shape": list(SMALL_SHAPE),
        "small_phantom_liver_ml": small_ml,
        "warm_runs": warm,
        "cold_runs": cold,
        "cold_cache_files_written": cache_files,
        "python_pass_s": t_pass,
        "import_synthgen_process_s": t_imp_proc,
        "import_synthgen_inprocess_s": t_imp_in,
        "import_synthgen_loads": loaded,
        "target_warm_s": TARGET_WARM_START_S,
    }
    t1 = {
        "title": (
            f"d. Start-up: fresh process to the first sample (liver-classic mix, "
            f"{'x'.join(map(str, SMALL_SHAPE))} phantom), seconds"
        ),
        "columns": ["step", "warm numba cache s", "cold numba cache s"],
        "rows": rows,
        "notes": [
            "Times from just before the parent starts the interpreter (CLOCK_MONOTONIC, "
            "shared by parent and child) to the end of the first `synthesize` call. "
            f"Medians of {cfg['d_warm_n']} warm / {cfg['d_cold_n']} cold run(s).",
            "cold: NUMBA_CACHE_DIR set to a new empty directory (every kernel compiled; "
            f"{cache_files} cache files written); warm: the cache the last cold run filled. "
            "The OS file cache is warm in both.",
        ],
    }
    t2 = {
        "title": "d. `import synthgen` alone, seconds",
        "columns": ["what", "median s"],
        "rows": imp_rows,
        "notes": [
            f"Median of {cfg['d_import_n']} fresh processes. After `import synthgen`: numba "
            f"imported {_yes(loaded.get('numba', False))}, scipy imported "
            f"{_yes(loaded.get('scipy', False))}."
        ],
    }
    for r in t1["rows"]:
        for j in (1, 2):
            if isinstance(r[j], float):
                r[j] = f"{r[j]:.3f}"
    for r in t2["rows"]:
        r[1] = f"{r[1]:.3f}"
    return [t1, t2], data


# ------------------------------------------------------------------------------ e. memory

_CHILD_MEMORY = """
import gc, json, sys, tracemalloc
import numpy as np
from benchmarks import _common as C
from synthgen.phantom import LABELS, benchmark_phantom

mode, n, seed0 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ph = benchmark_phantom()
img = ph.image
liver = ph.labels == LABELS["liver"]
del ph
out = {"mode": mode, "input_mb": (img.nbytes + liver.nbytes) / 2**20}

def rss():
    return C.proc_status_kib().get("VmRSS", 0) / 1024.0

def hwm():
    return C.proc_status_kib().get("VmHWM", 0) / 1024.0

if mode == "synthgen":
    import synthgen
    buf = img.copy()
    out["output_buffer_mb"] = buf.nbytes / 2**20
    def call(s):
        res = synthgen.synthesize(img, liver, organ="liver-classic", spacing=(1.0, 1.0, 1.0),
                                  seed=s, size="mix", out=buf)
        for sl, _m in res.boxes:
            buf[sl] = img[sl]
    gc.collect()
    out["can_reset_hwm"] = C.reset_peak_rss()
    r0 = rss()
    if out["can_reset_hwm"]:
        call(seed0)
        out["first_peak_extra_mb"] = hwm() - r0
        out["first_retained_mb"] = rss() - r0
        gc.collect()
        C.reset_peak_rss()
        r1 = rss()
        for i in range(n):
            call(seed0 + 1 + i)
        out["steady_peak_extra_mb"] = hwm() - r1
        out["steady_growth_mb"] = rss() - r1
        out["method"] = "VmHWM reset via /proc/self/clear_refs"
    else:
        tracemalloc.start()
        call(seed0)
        out["first_peak_extra_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
        out["first_retained_mb"] = rss() - r0
        tracemalloc.reset_peak()
        r1 = rss()
        for i in range(n):
            call(seed0 + 1 + i)
        out["steady_peak_extra_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
        out["steady_growth_mb"] = rss() - r1
        out["method"] = "tracemalloc peak (NumPy allocations) + RSS delta"
else:
    from benchmarks.baseline_recipe import build_texture_bank, published_recipe
    from benchmarks.bench_engine import _bbox_shape
    bank = build_texture_bank(_bbox_shape(liver), 2, np.random.default_rng(20251014))
    out["bank_mb"] = sum(t.nbytes for t in bank) / 2**20
    gc.collect()
    out["can_reset_hwm"] = C.reset_peak_rss()
    r0 = rss()
    if not out["can_reset_hwm"]:
        tracemalloc.start()
    res_img, res_lab = published_recipe(img, liver, "mix", np.random.default_rng(seed0), bank)
    out["returned_mb"] = (res_img.nbytes + res_lab.nbytes) / 2**20
    if out["can_reset_hwm"]:
        out["first_peak_extra_mb"] = hwm() - r0
        out["method"] = "VmHWM reset via /proc/self/clear_refs"
    else:
        out["first_peak_extra_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
        out["method"] = "tracemalloc peak (NumPy allocations)"
print(json.dumps(out))
"""


def part_e(cfg: dict[str, int], seeds: _Seeds) -> tuple[list[dict], dict]:
    n = cfg["e_n"]
    sg, _, _ = C.run_child(_CHILD_MEMORY, ("synthgen", str(n), str(seeds.take(n + 1)[0])))
    bl, _, _ = C.run_child(_CHILD_MEMORY, ("baseline", "1", str(seeds.take(1)[0])))
    t = TARGET_PEAK_MB
    rows = [
        [
            "synthgen: first mix sample in the process (incl. numba load, imports)",
            sg["first_peak_extra_mb"],
            sg["first_retained_mb"],
            _yes(sg["first_peak_extra_mb"] <= t),
        ],
        [
            f"synthgen: {n} mix samples after the first",
            sg["steady_peak_extra_mb"],
            sg["steady_growth_mb"],
            _yes(sg["steady_peak_extra_mb"] <= t),
        ],
        [
            "baseline: one mix call (incl. its returned full-volume copies)",
            bl["first_peak_extra_mb"],
            "",
            _yes(bl["first_peak_extra_mb"] <= t),
        ],
        [
            "baseline: one mix call, minus its returned arrays",
            bl["first_peak_extra_mb"] - bl["returned_mb"],
            "",
            _yes(bl["first_peak_extra_mb"] - bl["returned_mb"] <= t),
        ],
    ]
    table = {
        "title": "e. Peak memory beyond the input and output arrays, 320x320x224 phantom, MB",
        "columns": ["what", "peak extra MB", "retained after MB", f"<= {t:g} MB target"],
        "rows": rows,
        "notes": [
            f"Fresh process per engine; method: {sg['method']}. Peak extra = VmHWM during "
            "the calls minus VmRSS right before them, with the phantom image "
            f"({sg['input_mb']:.0f} MB image + mask) and, for synthgen, the caller-owned "
            f"output buffer ({sg['output_buffer_mb']:.0f} MB) already allocated.",
            f"The baseline's texture bank ({bl['bank_mb']:.0f} MB, 2 textures of the liver "
            f"box) was built before the measurement; its call returns "
            f"{bl['returned_mb']:.0f} MB of full-volume arrays.",
        ],
    }
    return [table], {"synthgen": sg, "baseline": bl, "target_mb": t, "n": n}


# ------------------------------------------------------------------------------ driver

PARTS = {"a": part_a, "b": part_b, "c": part_c, "d": part_d, "e": part_e}


def run(quick: bool = False, parts: str = "abcde") -> dict[str, Any]:
    """Run the selected parts; returns ``{"name", "tables", "data"}``."""
    C.ensure_root_on_path()
    cfg = _settings(quick)
    seeds = _Seeds()
    tables: list[dict] = []
    data: dict[str, Any] = {"quick": quick, "settings": cfg, "parts": {}}
    errors = []
    for key in parts:
        if key not in PARTS:
            raise ValueError(f"unknown part {key!r}; parts are {''.join(PARTS)}")
        load0, t0 = _load(), time.perf_counter()
        try:
            tabs, d = PARTS[key](cfg, seeds)
        except Exception as e:  # one failing part must not lose the others
            errors.append(f"{key}: {type(e).__name__}: {e}")
            tables.append(
                {
                    "title": f"{key}. failed",
                    "columns": ["error"],
                    "rows": [[f"{type(e).__name__}: {e}"]],
                }
            )
            d = {"error": f"{type(e).__name__}: {e}"}
            tabs = []
        d["wall_s"] = time.perf_counter() - t0
        d["load_average_before"], d["load_average_after"] = load0, _load()
        tables.extend(tabs)
        data["parts"][key] = d
    result: dict[str, Any] = {"name": NAME, "tables": tables, "data": data}
    if errors:
        result["error"] = "; ".join(errors)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few repetitions (smoke test)")
    ap.add_argument("--parts", default="abcde", help="subset of parts to run, e.g. 'ad'")
    ap.add_argument("--json", type=Path, help="also write the result as JSON to this file")
    a = ap.parse_args(argv)
    result = run(quick=a.quick, parts=a.parts)
    print(C.markdown(result))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2, default=C.json_default), encoding="utf-8")
    return 1 if result.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
