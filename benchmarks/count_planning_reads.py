"""What planning copies back from a GPU: copies and bytes per plan, this tree against a revision.

Planning from GPU-resident data (``synthgen.synthesize`` on CuPy arrays or torch CUDA
tensors, ``synthgen.torch.BatchTumorSynthesis``) reads its image and organ mask through
views (``synthgen._cuda.host_views``); each copy back is a device-to-host transfer and a wait
for the device. This script counts them, and their bytes: deterministic, no GPU, no timing.
Both versions plan on a backend whose "device" is NumPy and which counts its downloads
(the revision's package exported with ``git archive``: ``ab_host.load_revision``); the
plans of both are checked to be the same. Every preset, in its organ of a whole-scan
phantom (``make_phantom``, 320 x 256 x 224 voxels of 1.25 x 1.25 x 1.5 mm, float32 image,
uint8 mask), sizes drawn from the preset's mix; per plan with a new organ index (as
``BatchTumorSynthesis`` plans, sample by sample: the index's own reductions counted), and
with one index reused by the plans of a scan (``organ_index=``: the scan's cache filled by
the first plan, not counted).

Usage::

    PYTHONPATH=. python benchmarks/count_planning_reads.py REV [--plans 6] [--json FILE]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from _common import (  # (run by path: its folder is on sys.path)
    count_script_main,
    ensure_root_on_path,
    preset_mask,
    whole_scan,
)

ensure_root_on_path("tests")

import numpy as np  # noqa: E402


def run(args) -> list[dict]:
    from _cuda_emu import NumpyDevice
    from ab_host import load_revision

    import synthgen

    rev, n_plans = args.rev, args.plans
    old = load_revision(rev, Path(tempfile.mkdtemp(prefix="sg-reads-")))
    versions = {rev: old, "tree": synthgen}
    ph = whole_scan()
    img = np.ascontiguousarray(ph.image, dtype=np.float32)
    rows = []
    for preset in synthgen.list_presets():
        mask = preset_mask(ph, preset).astype(np.uint8)
        plans_of = {}
        for version, pkg in versions.items():
            cuda = __import__(pkg.__name__ + "._cuda", fromlist=["host_views"])
            syn = pkg.Synthesizer(preset, spacing=ph.spacing)
            row = {"preset": preset, "organ_voxels": int(mask.sum()), "version": version}
            for how in ("fresh", "reused"):
                be = NumpyDevice()
                plans, index = [], None
                if how == "reused":  # the scan's index and cache, filled by a first plan
                    iv, mv, index = cuda.host_views(be, img, mask)
                    syn.plan(iv, mv, seed=10_000, organ_index=index)
                    be.copies = be.nbytes = 0
                for s in range(n_plans):
                    iv, mv, ix = cuda.host_views(be, img, mask, index)
                    plans.append(syn.plan(iv, mv, seed=s, organ_index=ix).to_json())
                row[f"{how}_copies"] = be.copies / n_plans
                row[f"{how}_mb"] = be.nbytes / n_plans / 1e6
                plans_of[(version, how)] = plans
            rows.append(row)
            print(f"  {row}", flush=True)
        for how in ("fresh", "reused"):
            if plans_of[("tree", how)] != plans_of[(rev, how)]:
                raise SystemExit(f"{preset}: the tree's plans differ from those of {rev}")
    return rows


def main() -> int:
    def add_args(ap) -> None:
        ap.add_argument("rev", help="git revision to compare the working tree with")
        ap.add_argument("--plans", type=int, default=6, help="plans per preset and case")

    return count_script_main(
        __doc__, run, "planning from GPU-resident data: what travels back",
        ["preset", "organ voxels", "version", "copies back per plan, new index",
         "MB per plan, new index", "copies, reused index", "MB, reused index"],
        lambda r: [r["preset"], r["organ_voxels"], r["version"], f"{r['fresh_copies']:.1f}",
                   f"{r['fresh_mb']:.2f}", f"{r['reused_copies']:.1f}", f"{r['reused_mb']:.2f}"],
        add_args,
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
