"""Device-side operations the GPU driver issues per render call: this tree against a revision.

On a GPU every one of them is a CuPy call made from Python (an allocation, a fill, a copy
in or out, a kernel launch, a device-array view: a slice, a ``view`` or a ``reshape``), each
some microseconds of host time that the host-time benchmarks (``bench_gpu_host``,
``ab_host``), which replay the driver without CuPy, cannot see. This script counts them
instead: deterministic, no GPU, no timing. Both versions of the driver are replayed
(``ab_host.load_revision``; downloads replayed from a recording on the stand-in backend) on
a backend that counts each kind of call and whose device arrays count their views.
``liver-classic`` on the 1 mm benchmark phantom, image on the "device", rendered in place.

Usage::

    PYTHONPATH=. python benchmarks/count_device_ops.py REV [--json FILE]
"""

from __future__ import annotations

import importlib
import tempfile
from collections import Counter
from pathlib import Path

from _common import (  # (run by path: its folder is on sys.path)
    count_script_main,
    ensure_root_on_path,
)

ensure_root_on_path("tests", "benchmarks")

import numpy as np  # noqa: E402

CASES = (("mix", 1), ("tiny", 1), ("mix", 16))
KINDS = ("alloc", "fill", "copy_in", "download", "launch", "event", "view")


def run(args) -> list[dict]:
    """The counts of each case, for both versions of the driver."""
    import bench_gpu_host
    from _cuda_emu import DeviceArray
    from ab_host import _recorder, load_revision

    from synthgen import _cuda

    counts: Counter = Counter()

    class Counted(DeviceArray):
        """A stand-in device array that counts the views made of it."""

        def __getitem__(self, key):
            counts["view"] += 1
            return super().__getitem__(key)

        def view(self, *a, **k):
            counts["view"] += 1
            return super().view(*a, **k)

        def reshape(self, *a, **k):
            counts["view"] += 1
            return super().reshape(*a, **k)

    rec, rep = bench_gpu_host._backends()
    Replay = type(rep)

    class Counting(Replay):
        def alloc(self, nbytes):
            counts["alloc"] += 1
            return np.empty(max(int(nbytes), 16), dtype=np.uint8).view(Counted)

        def fill(self, dev, value) -> None:
            counts["fill"] += 1

        def copy_in(self, dev, host) -> None:
            counts["copy_in"] += 1

        def download(self, dev):
            counts["download"] += 1
            return super().download(dev)

        def launch_flat(self, name, n_blocks, *args) -> None:
            counts["launch"] += 1

        def launch2d(self, name, n_seg, max_total, *args) -> None:
            counts["launch"] += 1

        def fence(self):
            counts["event"] += 2  # (CupyBackend.fence: an event made, then recorded)

    be = Counting()
    where = Path(tempfile.mkdtemp(prefix="sg-ops-"))
    old = load_revision(args.rev, where)
    drivers = {args.rev: importlib.import_module(old.__name__ + "._cuda"), "tree": _cuda}
    # each version's downloads recorded on the stand-in compiled from its own kernels (the
    # versions may download differently)
    recs = {args.rev: _recorder(type(rec), where / "kernels"), "tree": rec}
    sc = bench_gpu_host.scene()
    img_d, mask_d = sc.img_d, sc.mask_d
    rows = []
    for size, k in CASES:
        plans = sc.plans(4_000, k, size)
        outs_d = sc.outs(k)  # one output a plan
        for version, drv in drivers.items():
            recs[version].log.clear()
            drv.render_on_gpu(plans, [img_d] * k, [mask_d] * k, device_id=0, outs=outs_d,
                              be=recs[version])  # fmt: skip
            counts.clear()
            be.log = list(recs[version].log)
            drv.render_on_gpu(plans, [img_d] * k, [mask_d] * k, device_id=0,
                              outs=outs_d, be=be)  # fmt: skip
            be.keep.clear()
            rows.append({"class": size, "plans": k, "version": version,
                         "tumors": sum(len(p.tumors) for p in plans),
                         **{kind: counts[kind] for kind in KINDS}})  # fmt: skip
            print(f"  {rows[-1]}", flush=True)
    return rows


def main() -> int:
    def add_args(ap) -> None:
        ap.add_argument("rev", help="git revision to compare the working tree with")

    return count_script_main(
        __doc__, run, "device-side calls per render call",
        ["class", "plans", "tumors", "version", *KINDS, "all"],
        lambda r: [r["class"], r["plans"], r["tumors"], r["version"],
                   *(r[kind] for kind in KINDS), sum(r[kind] for kind in KINDS)],
        add_args,
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
