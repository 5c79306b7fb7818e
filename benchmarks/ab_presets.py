"""Per preset, host time of planning and of the CPU render: this tree against a git revision.

``ab_host.py`` A/Bs the GPU driver and ``liver-classic``'s planning; this script does every
preset, the same way (both versions loaded in one process, ``ab_host.load_revision``,
alternating round by round on the same inputs, CPU time of the thread, least round and
median round): per sample, in the preset's organ (both kidneys for ``kidney``) of a
whole-scan phantom (``make_phantom``, 320 x 256 x 224 voxels of 1.25 x 1.25 x 1.5 mm, int16
image), sizes drawn from the preset's mix:

* ``plan``: ``Synthesizer.plan`` with the scan's organ index reused (what ``synthgen batch``
  and the loaders do; the index's cache filled before timing);
* ``plan, new index``: with a new index per plan (what ``BatchTumorSynthesis`` does, crop
  by crop; the organ's bounding box found on the whole mask each time);
* ``render``: ``synthgen.render(plan, device="cpu")`` in place, one worker thread (the
  hollow organs' wall tumors are rendered on the host by the GPU path too).

Both versions must give the same plans and renders (checked).

Usage::

    PYTHONPATH=. python benchmarks/ab_presets.py REV [--presets colon,liver] [--rounds 5]
                                                 [--samples 6]
"""

from __future__ import annotations

import argparse
import os
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
    whole_scan,
)

ensure_root_on_path("benchmarks")

import numpy as np  # noqa: E402

WHAT = ("plan", "plan, new index", "render")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rev", help="git revision to compare the working tree with")
    ap.add_argument("--presets", default="", help="comma-separated (default: all)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--samples", type=int, default=6)
    args = ap.parse_args()
    os.environ["SYNTHGEN_NUM_THREADS"] = "1"  # (thread time: the render on this thread)

    from ab_host import load_revision

    import synthgen

    old = load_revision(args.rev, Path(tempfile.mkdtemp(prefix="sg-abp-")))
    versions = {"rev": old, "tree": synthgen}
    ph = whole_scan()
    img = np.ascontiguousarray(ph.image)
    presets = args.presets.split(",") if args.presets else synthgen.list_presets()
    n = args.samples
    rows = []
    for preset in presets:
        mask = preset_mask(ph, preset)
        syn = {v: m.Synthesizer(preset, spacing=ph.spacing) for v, m in versions.items()}
        index = {v: m.index_organ(mask) for v, m in versions.items()}
        plans = {}
        for v in versions:  # the indexes' caches filled, the plans made, numba compiled
            syn[v].plan(img, mask, seed=10_000, organ_index=index[v])
            plans[v] = [syn[v].plan(img, mask, seed=s, organ_index=index[v]) for s in range(n)]
        if [p.to_json() for p in plans["rev"]] != [p.to_json() for p in plans["tree"]]:
            raise SystemExit(f"{preset}: the tree's plans differ from those of {args.rev}")
        for i in range(n):  # ... and so must their renders
            a, b = (versions[v].render(plans[v][i], img, mask, device="cpu") for v in versions)
            if not (np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)):
                raise SystemExit(f"{preset}: the tree's renders differ from those of {args.rev}")
        work = {v: img.copy() for v in versions}

        def one(v: str, what: str, i: int, syn=syn, index=index, plans=plans, work=work,
                mask=mask) -> float:  # fmt: skip
            t0 = time.thread_time()
            if what == "plan":
                syn[v].plan(img, mask, seed=i, organ_index=index[v])
            elif what == "plan, new index":
                syn[v].plan(img, mask, seed=i)
            else:
                versions[v].render(plans[v][i], work[v], mask, out=work[v], device="cpu")
            return time.thread_time() - t0

        for what in WHAT:
            for v in versions:
                one(v, what, 0)

            def round_ms(v: str, what=what) -> float:  # the median sample of a round
                return statistics.median(1e3 * one(v, what, i) for i in range(n))

            rounds = interleaved_rounds(("tree", "rev"), args.rounds, round_ms)
            a, b = min(rounds["rev"]), min(rounds["tree"])
            ma, mb = statistics.median(rounds["rev"]), statistics.median(rounds["tree"])
            rows.append([preset, what, f"{a:.2f}", f"{b:.2f}", f"{b / a:.2f} ({mb / ma:.2f})"])
            print(f"  {preset} {what}: {args.rev} {a:.2f} ms, tree {b:.2f} ms, "
                  f"tree/rev {b / a:.2f} (medians {mb / ma:.2f})", flush=True)  # fmt: skip
    print()
    print(markdown_table({"title": f"host ms per sample: {args.rev} against this tree",
                          "columns": ["preset", "what", f"{args.rev} ms", "tree ms",
                                      "tree / rev (medians)"], "rows": rows}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
