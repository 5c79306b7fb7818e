"""Bytes the GPU render's last kernels move, and those the current kernels no longer move.

No GPU needed, and no timing: counts. The driver runs on the test suite's stand-in backend
(``tests/_cuda_emu.py``) with the GPU's schedule rule, keeping its last batch
(``_segments.KEEP_LAST``). Per case: the rows (tumors) and those with merge partners, the
voxels of their tight boxes, the bytes the fused blend and the write-back move
(``_segments.moved_bytes``), and what the kernels before 90425fe moved on top, counted
from the same buffers:

* the merge launch: its read of a partner row's change and its write of the merged change,
  which the write-back then read instead of the change (8 bytes a voxel of every row with
  partners; the partners' reads moved into the write-back);
* the gather's zeroing of the blend's change buffer (4 bytes a voxel), less the blend's
  writes of the zeros it now writes itself (4 bytes a voxel without change);
* the gather's float32 copy of the mask (4 bytes a voxel) and the first blur pass's reads
  of it (counted once per input: 3 bytes a voxel more than the uint8 mask it reads now).

``liver-classic`` on the 1 mm benchmark phantom, image on the "device", rendered in place.

Usage::

    PYTHONPATH=. python benchmarks/count_bytes.py [--json FILE]
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from _common import (  # (run by path: its folder is on sys.path)
    count_script_main,
    ensure_root_on_path,
)

ensure_root_on_path("tests", "benchmarks")

CASES = (("mix", 1), ("mix", 16), ("large", 8), ("tiny", 16))


def run() -> list[dict]:
    import bench_gpu_host
    import numpy as np
    from _cuda_emu import HostBackend, to_device

    from synthgen import _cuda, _segments

    be = HostBackend(Path(tempfile.mkdtemp(prefix="sg-bytes-")))
    sc = bench_gpu_host.scene()
    C = _segments._columns()
    rows = []
    for size, k in CASES:
        plans = sc.plans(9_000, k, size)
        outs = [to_device(sc.img_h) for _ in plans]
        last = _segments.kept_render(_cuda.render_on_gpu, plans, outs, [sc.mask_d] * k,
                                     device_id=0, outs=outs, be=be)  # fmt: skip
        T, f32 = last["T"], last["f32"]
        vox = [math.prod(int(x) for x in T[q, C.TN0 : C.TN0 + 3]) for q in range(last["n"])]
        with_part = [q for q in range(last["n"]) if last["partners"][q]]
        changed = 0
        for q in range(last["ne"]):
            changed += int(np.count_nonzero(f32.at(T[q, C.DELTA], vox[q])))
        n = sum(vox[: last["ne"]])
        blend, apply = _segments.moved_bytes(be, last)
        rows.append({"class": size, "plans": k, "rows": last["n"], "rows_with_partners":
                     len(with_part), "voxels": sum(vox), "voxels_with_partners":
                     sum(vox[q] for q in with_part), "blend_bytes": blend,
                     "write_back_bytes": apply,
                     "merge_bytes": 8 * sum(vox[q] for q in with_part),
                     "zeroing_bytes": 4 * changed, "float_mask_bytes": 4 * n,
                     "float_mask_taps_bytes": 3 * n})  # fmt: skip
        print(f"  {rows[-1]}", flush=True)
    return rows


def _cells(r: dict) -> list[str]:
    mb = 1e-6
    gone = (r["merge_bytes"] + r["zeroing_bytes"] + r["float_mask_bytes"]
            + r["float_mask_taps_bytes"])  # fmt: skip
    return [r["class"], str(r["plans"]), f"{r['rows']} ({r['rows_with_partners']})",
            f"{r['voxels']:,} ({r['voxels_with_partners']:,})", f"{r['blend_bytes'] * mb:.2f}",
            f"{r['write_back_bytes'] * mb:.2f}", f"{r['merge_bytes'] * mb:.2f}",
            f"{r['zeroing_bytes'] * mb:.2f}", f"{r['float_mask_bytes'] * mb:.2f}",
            f"{r['float_mask_taps_bytes'] * mb:.2f}", f"{gone * mb:.1f}"]  # fmt: skip


def main() -> int:
    return count_script_main(
        __doc__, run, "Bytes the fused blend and the write-back move, and those no longer moved",
        ["class", "plans", "rows (with partners)", "voxels (in rows with partners)", "blend MB",
         "write-back MB", "no longer moved, MB: merge", "zeros (net)", "float mask", "its taps",
         "all"], _cells)  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
