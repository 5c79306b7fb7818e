"""What the fused blend's and write-back's warps meet on the GPU check's bandwidth batch.

No GPU needed, and no timing: counts, from the render's own buffers. The driver runs on the
test suite's stand-in backend (``tests/_cuda_emu.py``) and keeps its last batch
(``_segments.KEEP_LAST``); the plans are ``gpu_check.bench_bandwidth``'s (large
``liver-classic`` tumors on the 1 mm benchmark phantom, seeds from 7,000,000), the first
``--plans`` of its 48. Per voxel of the tight boxes, and per warp step (32 consecutive
voxels of a box, the lanes of one load), the share that:

* the blend reaches (blur > 0 and the value in the tissue window: its texture path);
* the write-back changes (the merged change, the row's or an overlapping partner's
  strongest, is not 0: its clip and image store; ``_segments.row_paths``, which
  ``moved_bytes`` counts from too);
* lies in a row with merge partners, and inside the box of that row's overlaps with them
  (the write-back's merge runs there only, since b7ece65).

A warp runs a path when any of its lanes takes it, so the warp shares are what costs issue
slots (the H200 profile in docs/gpu-host-work.md).

Usage::

    PYTHONPATH=. python benchmarks/count_lanes.py [--plans N] [--json FILE]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from _common import (  # (run by path: its folder is on sys.path)
    count_script_main,
    ensure_root_on_path,
)

ensure_root_on_path("tests", "benchmarks")

WARP = 32


def run(args) -> list[dict]:
    import numpy as np
    from _common import Scene
    from _cuda_emu import HostBackend

    from synthgen import _cuda, _segments

    be = HostBackend(Path(tempfile.mkdtemp(prefix="sg-lanes-")))
    sc = Scene(be.upload)
    n = args.plans
    plans = sc.plans(7_000_000, n, "large")
    outs = [sc.img_d.copy() for _ in plans]
    last = _segments.kept_render(_cuda.render_on_gpu, plans, [sc.img_d] * n, [sc.mask_d] * n,
                                 device_id=0, outs=outs, be=be)  # fmt: skip
    vox = {"all": 0, "reached": 0, "changed": 0, "partnered": 0, "overlap": 0}
    warps = {"all": 0, "reached": 0, "changed": 0, "overlap": 0}

    def any_lane(a: np.ndarray) -> int:
        pad = np.zeros((-a.size) % WARP, dtype=bool)
        return int(np.concatenate([a, pad]).reshape(-1, WARP).any(axis=1).sum())

    for q in range(last["ne"]):
        reached, changed, overlaps = _segments.row_paths(last, q)
        shape, m = changed.shape, changed.size
        # the box of the overlaps (the kernel's sg_overlap_box): the union of the partners'
        inbox = np.zeros(shape, dtype=bool)
        if last["partners"][q]:
            vox["partnered"] += m
        if overlaps:
            lo = [min(o[x].start for o in overlaps) for x in range(3)]
            hi = [max(o[x].stop for o in overlaps) for x in range(3)]
            inbox[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
        vox["all"] += m
        warps["all"] += -(-m // WARP)
        for key, a in (("reached", reached), ("changed", changed.ravel()),
                       ("overlap", inbox.ravel())):  # fmt: skip
            vox[key] += int(a.sum())
            warps[key] += any_lane(a)
    row = {"plans": n, "rows": int(last["ne"]), "voxels": vox["all"], "warp_steps": warps["all"]}
    row.update({f"voxels_{k}": vox[k] / vox["all"] for k in vox if k != "all"})
    row.update({f"warps_{k}": warps[k] / warps["all"] for k in warps if k != "all"})
    print(f"  {row}", flush=True)
    return [row]


def _cells(r: dict) -> list[str]:
    pct = "{:.0%}".format
    return [str(r["plans"]), str(r["rows"]), f"{r['voxels']:,}", pct(r["voxels_reached"]),
            pct(r["voxels_changed"]), pct(r["voxels_partnered"]), pct(r["voxels_overlap"]),
            pct(r["warps_reached"]), pct(r["warps_changed"]), pct(r["warps_overlap"])]  # fmt: skip


def _args(ap) -> None:
    ap.add_argument("--plans", type=int, default=8, help="the first N plans of the 48")


def main() -> int:
    return count_script_main(
        __doc__, run, "Voxels and warp steps of the bandwidth batch, by the kernels' paths",
        ["plans", "rows", "voxels", "reached", "changed", "in rows with partners",
         "in the overlap box", "warps: reached", "warps: changed", "warps: overlap box"],
        _cells, add_args=_args)  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
