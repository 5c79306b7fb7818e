"""Interleaved A/B of the host work per sample: this working tree against a git revision.

The development VM's timings drift by tens of percent from run to run (other tenants), more
than the changes one wants to see. This script loads both versions of the package into one
process (the revision's ``synthgen/`` exported with ``git archive`` and imported under
another name) and alternates them round by round on the same inputs, so that both see the
same machine state. Each version renders the plans of its own planner (the same seeds, the
same numbers, each in its version's plan classes). Two measurements:

* ``render``: the GPU driver's host time of ``render_on_gpu`` (as
  ``benchmarks/bench_gpu_host.py``: recorded on the stand-in backend, each version on its
  own kernels, then replayed with launches that do nothing; allocations, fills and uploads
  subtracted), one plan per call or ``--batch`` plans per call; and the part of a call
  after its last wait for the device when nothing was launched after it (host work a GPU
  cannot overlap with its own; 0 for a call that returns while the device works); and the
  *serial* part of a call: its
  host time from the call's start, or from a wait for the device, to the next launch, plus
  the part after its last wait (a GPU idles meanwhile), as against the host time after a
  launch, which a GPU overlaps with the kernels launched (the critical path of one call on
  a GPU is about serial + max(overlapped host, device));
* ``plan``: ``Synthesizer.plan`` on the benchmark phantom.

Times are CPU time of the thread (``time.thread_time``: the VM's stolen time is not
counted); each round is the median over the samples; the figures are the least round of
each version and their ratio, and the ratio of the median rounds. ``liver-classic`` on the
1 mm benchmark phantom.

Usage::

    PYTHONPATH=. python benchmarks/ab_host.py REV [--what render|plan] [--size mix]
                                              [--batch 1] [--rounds 10] [--fresh]

``--fresh`` renders new plans in every round, each once per version: the driver's caches
then hold other samples' kernels only, as in a training loop (without it, the least of
three replays of the same plans: what the caches save on a repeated plan is not counted).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from _common import ROOT, ensure_root_on_path  # (run by path: its folder is on sys.path)

ensure_root_on_path("tests", "benchmarks")

import numpy as np  # noqa: E402


def load_revision(rev: str, where: Path):
    """The package as of git revision ``rev``, imported as ``synthgen_<rev>``."""
    tar = where / "rev.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(tar), rev, "synthgen", "kernels"],
                   check=True)  # fmt: skip
    with tarfile.open(tar) as tf:
        tf.extractall(where, filter="data")
    name = "synthgen_" + "".join(c if c.isalnum() else "_" for c in rev)
    pkg = where / "synthgen"  # (its kernel_dir() finds the revision's kernels/ beside it)
    spec = importlib.util.spec_from_file_location(
        name, pkg / "__init__.py", submodule_search_locations=[str(pkg)]
    )
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = mod
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _recorder(cls, kernels: Path):
    """A recording stand-in backend (``cls``, bench_gpu_host's) compiled from ``kernels``."""
    return cls(Path(tempfile.mkdtemp(prefix="sg-emu-")), kernels=kernels)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rev", help="git revision to compare the working tree with")
    ap.add_argument("--what", choices=("render", "plan"), default="render")
    ap.add_argument("--size", default="mix")
    ap.add_argument("--batch", type=int, default=1, help="plans per render call")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument(
        "--fresh",
        action="store_true",
        help="render: new plans in every round, each rendered once per version (what a "
        "training loop sees: caches hold other samples' kernels, not this one's)",
    )
    args = ap.parse_args()

    import synthgen
    from synthgen import _cuda
    from synthgen.phantom import benchmark_phantom

    tmp = Path(tempfile.mkdtemp(prefix="sg-ab-"))
    old = load_revision(args.rev, tmp)
    importlib.import_module(old.__name__ + "._cuda")
    ph = benchmark_phantom()
    img = np.ascontiguousarray(ph.image)
    mask = np.ascontiguousarray(ph.mask("liver"))
    versions = {"rev": old, "tree": synthgen}
    syns = {k: (m.Synthesizer("liver-classic", spacing=ph.spacing), m.index_organ(mask))
            for k, m in versions.items()}  # fmt: skip
    n, k = args.samples, args.batch

    if args.what == "plan":

        def one(version: str, i: int) -> float:
            syn, idx = syns[version]
            t0 = time.thread_time()
            syn.plan(img, mask, seed=100 + i, size=args.size, organ_index=idx)
            return time.thread_time() - t0

    else:
        import bench_gpu_host
        from _cuda_emu import to_device

        rec, rep = bench_gpu_host._backends(time.thread_time)  # device work: the same clock
        img_d, mask_d = to_device(img), to_device(mask)
        # one output per plan of a call (plans sharing one would render in turn)
        outs_d = [img_d, *(to_device(img) for _ in range(k - 1))]
        # plan sets: when fresh, one for the warm-up and one per round; each version
        # renders the plans of its own planner (the same numbers; the plan classes may
        # differ between the versions, as TumorPlan.displacement_mm did)
        sets = args.rounds + 1 if args.fresh else 1
        groups_of = {}
        for v, (syn, idx) in syns.items():
            plans = [syn.plan(img, mask, seed=777 + i, size=args.size, organ_index=idx)
                     for i in range(n * k * sets)]  # fmt: skip
            groups_of[v] = [plans[i * k : (i + 1) * k] for i in range(n * sets)]
        drivers = {"rev": sys.modules[old.__name__ + "._cuda"], "tree": _cuda}
        # what each version's calls download, recorded on the stand-in compiled from that
        # version's kernels (the versions may download differently: since 2026-11-29 a render
        # kept on the device no longer waits for its statistics)
        recs = {"tree": rec, "rev": _recorder(type(rec), tmp / "kernels")}
        logs_of = {}
        for v, drv in drivers.items():
            logs_of[v] = []
            for g in groups_of[v]:
                recs[v].log.clear()
                drv.render_on_gpu(g, [img_d] * k, [mask_d] * k, device_id=0, outs=outs_d,
                                  be=recs[v])  # fmt: skip
                logs_of[v].append(list(recs[v].log))

        def one(version: str, i: int) -> float:
            rep.log = list(logs_of[version][i])
            rep.device_s = 0.0
            t0 = time.thread_time()
            rep.start()
            drivers[version].render_on_gpu(groups_of[version][i], [img_d] * k, [mask_d] * k,
                                           device_id=0, outs=outs_d, be=rep)  # fmt: skip
            t1 = time.thread_time()
            rep.mark()
            # (a call whose last act was a launch returned while the device works: nothing
            # of it runs on an idle device after its last wait)
            tails[version].append(0.0 if rep._busy else t1 - rep.last_wait)
            spans[version].append([x for is_serial, x in rep.spans if is_serial])
            rep.keep.clear()
            return (t1 - t0 - rep.device_s) / k

    tails: dict[str, list[float]] = {v: [] for v in versions}  # host work after the last wait
    # per call, its serial spans (host work the device waits on); per round, their sum
    spans: dict[str, list[list[float]]] = {v: [] for v in versions}
    serial_rounds: dict[str, list[float]] = {v: [] for v in versions}
    fresh = args.fresh and args.what == "render"
    for v in versions:  # warm-up: numba, kernel modules, caches
        for i in range(min(n, 3)):
            one(v, i)
    rounds: dict[str, list[float]] = {v: [] for v in versions}
    for r in range(args.rounds):
        for v in ("rev", "tree") if r % 2 else ("tree", "rev"):
            if fresh:  # this round's own plans, once each
                ms = [one(v, (r + 1) * n + i) for i in range(n)]
            else:  # the least of three replays of each plan
                ms = [min(one(v, i) for _ in range(3)) for i in range(n)]
            rounds[v].append(1e3 * statistics.median(ms))
            if args.what == "render":  # this round's calls' serial parts (the least replay's
                # when replayed: every third entry is a call's first replay, so take the round's
                # median of all its replays)
                got = [sum(x) for x in spans[v][-(len(ms) if fresh else 3 * len(ms)) :]]
                serial_rounds[v].append(1e3 * statistics.median(got) / k)
    a, b = min(rounds["rev"]), min(rounds["tree"])
    ma, mb = statistics.median(rounds["rev"]), statistics.median(rounds["tree"])
    what = f"{args.what} {args.size}" + (f" x{k}" if args.what == "render" else "")
    what += ", fresh plans" if fresh else ""
    print(f"{what}: {args.rev} {a:.3f} ms (median round {ma:.3f}) | tree {b:.3f} ms (median "
          f"round {mb:.3f}) | tree/rev {b / a:.2f} (medians {mb / ma:.2f})")  # fmt: skip
    if args.what == "render":  # the part of it a GPU cannot overlap: after the last wait
        ta, tb = (1e3 * statistics.median(tails[v]) for v in ("rev", "tree"))
        print(f"  of which after the last wait, per call (median of all calls): {args.rev} "
              f"{ta:.3f} ms | tree {tb:.3f} ms")  # fmt: skip
        sa, sb = (min(serial_rounds[v]) for v in ("rev", "tree"))
        ma, mb = (statistics.median(serial_rounds[v]) for v in ("rev", "tree"))
        print(f"  of which serial (from the start or a wait to the next launch, and after the "
              f"last wait: the GPU idles), per sample: {args.rev} {sa:.3f} ms (median round "
              f"{ma:.3f}) | tree {sb:.3f} ms (median round {mb:.3f}) | tree/rev {sb / sa:.2f} "
              f"(medians {mb / ma:.2f})")  # fmt: skip
        for v in ("rev", "tree"):  # the serial spans in call order (phase A, phase B, ...)
            m = min(len(x) for x in spans[v])
            med = [1e3 * statistics.median(x[i] for x in spans[v]) for i in range(m)]
            print(f"  serial spans, median of all calls, ms: {args.rev if v == 'rev' else v} "
                  + " | ".join(f"{x:.3f}" for x in med))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
