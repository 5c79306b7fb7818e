"""Blocks per launch of the GPU render: the flat schedules against a 2-D grid.

No GPU needed, and no timing: counts. The driver runs on the test suite's stand-in backend
(``tests/_cuda_emu.py``) with the GPU's schedule rule (``CupyBackend.block_rule``), and every
launch is recorded: the blocks its schedule launches, and the blocks a 2-D grid sized for the
launch's largest row launched before (every row given that row's count: the grid of
``launch2d`` up to commit c39d1d6), and how many of those had elements to work on, with one
launch per step, as then (``_segments.FUSE_STEPS`` off); then the same render as by
default: the schedules of a GPU of 132 SMs (H100, H200), which hold a launch to 32 blocks
per SM (``CupyBackend.most_blocks``: longer blocks past it), phase B's independent steps
side by side (the blocks of the steps a launch runs; of the rescale's two launches, the
statistics now run in the grid's last smoothing pass and the rescale in one of its own).
``liver-classic`` on the 1 mm benchmark phantom, image on the "device", rendered in place.

Usage::

    PYTHONPATH=. python benchmarks/count_blocks.py [--json FILE]
"""

from __future__ import annotations

import ctypes
import tempfile
from collections import defaultdict
from pathlib import Path

from _common import (  # (run by path: its folder is on sys.path)
    count_script_main,
    ensure_root_on_path,
)

ensure_root_on_path("tests", "benchmarks")

import numpy as np  # noqa: E402

CASES = (("mix", 1), ("mix", 16), ("tiny", 16), ("large", 8))
#: CupyBackend.most_blocks on a GPU of 132 SMs
MOST_BLOCKS = 32 * 132


def _schedule(arg, n: int) -> np.ndarray:
    """The int32 schedule a launch got (its first argument: a stand-in address)."""
    return np.ctypeslib.as_array((ctypes.c_int32 * (n + 1)).from_address(arg.address)).copy()


def run() -> list[dict]:
    import bench_gpu_host
    from _cuda_emu import HostBackend, to_device

    from synthgen import _cuda, _segments

    class Counting(HostBackend):
        def __init__(self, build_dir) -> None:
            super().__init__(build_dir, block_rule=_cuda.CupyBackend.block_rule)
            self.counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])

        def launch_flat(self, name, n_blocks, *args) -> None:
            S = _schedule(args[0], int(args[1]))
            per_row = np.diff(S)
            c = self.counts[name]
            c[0] += int(n_blocks)
            c[1] += len(per_row) * int(per_row.max(initial=0))  # the 2-D grid
            c[2] += int(per_row.sum())  # its blocks with elements (the flat grid's)
            super().launch_flat(name, n_blocks, *args)

    be = Counting(Path(tempfile.mkdtemp(prefix="sg-blocks-")))
    sc = bench_gpu_host.scene()

    def counts_of(plans, most: int, fuse: bool) -> dict[str, list[int]]:
        """The blocks of each kernel of one render of ``plans`` (``most``: the launch limit;
        ``fuse``: FUSE_STEPS. The 2-D grid counts read a launch's schedule as one step's:
        only those of a render without it count)."""
        be.counts.clear()
        be.most_blocks = most
        outs = [to_device(sc.img_h) for _ in plans]
        k = len(plans)
        _segments.FUSE_STEPS = fuse
        try:
            _cuda.render_on_gpu(plans, outs, [sc.mask_d] * k, device_id=0, outs=outs, be=be)
        finally:
            _segments.FUSE_STEPS = True
        return dict(be.counts)

    rows = []
    for size, k in CASES:
        plans = sc.plans(9_000, k, size)
        free, limited = counts_of(plans, 0, False), counts_of(plans, MOST_BLOCKS, True)
        rows.append({"class": size, "plans": k,
                     "tumors": sum(len(p.tumors) for p in plans),
                     "flat_blocks": sum(c[0] for c in free.values()),
                     "grid2d_blocks": sum(c[1] for c in free.values()),
                     "blend_flat": free["sg_seg_blend"][0],
                     "blend_grid2d": free["sg_seg_blend"][1],
                     "apply_flat": free["sg_seg_apply"][0],
                     "limited_blocks": sum(c[0] for c in limited.values()),
                     "blend_limited": limited["sg_seg_blend"][0]})  # fmt: skip
        print(f"  {rows[-1]}", flush=True)
    return rows


def _cells(r: dict) -> list[str]:
    idle = 1 - r["flat_blocks"] / r["grid2d_blocks"]
    return [str(x) for x in (r["class"], r["plans"], r["tumors"], r["flat_blocks"],
                             r["grid2d_blocks"], f"{100 * idle:.0f}%", r["blend_flat"],
                             r["blend_grid2d"], r["apply_flat"], r["limited_blocks"],
                             r["blend_limited"])]  # fmt: skip


def main() -> int:
    return count_script_main(
        __doc__, run, "Blocks per launch: flat schedules against a 2-D grid",
        ["class", "plans", "tumors", "blocks, all launches: flat", "2-D grid", "idle in 2-D",
         "blend: flat", "2-D grid", "write-back (flat)", "all, default", "blend, default"],
        _cells)  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
