"""Where the fused kernels' instructions go: an Nsight Compute source page, summed by region.

Reads the per-SASS-instruction CSV that ``ncu --import REPORT --page source --print-source
sass --csv`` writes for a report with the SourceCounters section (``gpu_session.sh`` makes
one of ``sg_seg_blend`` and ``sg_seg_apply`` on ``gpu_check``'s bandwidth batch), and prints
per kernel: warp instructions executed in all and per warp step (``--voxels`` voxels, 32
lanes of ``--ilp`` elements each), the share of each instruction class and of each stall
reason, and the runs of consecutive instructions executed equally often (a straight-line
region, e.g. a loop's body or a branch) that hold at least ``--min-share`` of the kernel's
instructions: their executions per warp step, share and stall samples. A region executed
once per warp step is the loop; one executed in a fraction of them is a path that fraction
of the warps take.

No GPU needed (it reads a file). Usage::

    python benchmarks/ncu_regions.py src.csv.gz [--voxels 41391799] [--ilp 4]
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import io
import sys
from pathlib import Path


def kernels(text: str) -> dict[str, list[dict[str, str]]]:
    """The CSV's kernels: name -> rows (one per SASS instruction, by column name)."""
    out: dict[str, list[dict[str, str]]] = {}
    blocks = text.split('"Kernel Name",')[1:]
    for block in blocks:
        head, _, body = block.partition("\n")
        name = head.strip().strip(",").strip('"')
        rows = list(csv.reader(io.StringIO(body)))
        cols = rows[0]
        out[name] = [dict(zip(cols, r, strict=True)) for r in rows[1:] if len(r) == len(cols)]
    return out


def _num(row: dict[str, str], col: str) -> float:
    try:
        return float(row.get(col, "").replace(",", ""))
    except ValueError:
        return 0.0


def opcode(ins: str) -> str:
    """A SASS instruction's opcode: ``@P0 LDG.E.64 R2, ...`` -> ``LDG``."""
    words = ins.split()
    if words and words[0].startswith("@"):  # (a predicate)
        words = words[1:]
    return words[0].split(".")[0] if words else "?"


def report(name: str, rows: list[dict[str, str]], steps: float, min_share: float) -> None:
    ex = [_num(r, "Instructions Executed") for r in rows]
    samples = [_num(r, "Warp Stall Sampling (All Samples)") for r in rows]
    total, n_samples = sum(ex), sum(samples) or 1.0
    print(f"## {name}: {len(rows)} SASS instructions, {total:.4g} warp instructions executed, "
          f"{total / steps:.0f} per warp step")  # fmt: skip
    ops: collections.Counter[str] = collections.Counter()
    for r, e in zip(rows, ex, strict=True):
        ops[opcode(r["Source"])] += e
    print("instruction classes: " + ", ".join(
        f"{k} {v / total:.0%}" for k, v in ops.most_common(10)))  # fmt: skip
    stalls = {c[len("stall_"):]: sum(_num(r, c) for r in rows) for c in rows[0]
              if c.startswith("stall_") and "Not Issued" not in c}  # fmt: skip
    top = sorted(stalls.items(), key=lambda kv: -kv[1])[:8]
    print("stall samples: " + ", ".join(f"{k} {v / n_samples:.0%}" for k, v in top))
    print()
    print("| instructions | count | executions per warp step | share | stall samples | first ops |")
    print("|---|---|---|---|---|---|")
    runs: list[list] = []  # [first, last, executions, stall samples, ops]
    for i, (r, e, s) in enumerate(zip(rows, ex, samples, strict=True)):
        if runs and abs(runs[-1][2] - e) <= 0.02 * max(e, 1.0):
            runs[-1][1] = i
            runs[-1][3] += s
            runs[-1][4].append(opcode(r["Source"]))
        else:
            runs.append([i, i, e, s, [opcode(r["Source"])]])
    for first, last, e, s, o in runs:
        n = last - first + 1
        if e * n / total >= min_share:
            print(f"| {first}-{last} | {n} | {e / steps:.3f} | {e * n / total:.1%} | "
                  f"{s / n_samples:.1%} | {' '.join(o[:8])} |")  # fmt: skip
    print()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", type=Path, help="ncu's source page as CSV (.gz or plain)")
    ap.add_argument("--voxels", type=float, default=41_391_799,
                    help="voxels the launch walks (gpu_check's bandwidth batch)")  # fmt: skip
    ap.add_argument("--ilp", type=int, default=4, help="elements per lane and step (SG_ILP)")
    ap.add_argument("--min-share", type=float, default=0.01)
    args = ap.parse_args()
    raw = args.csv.read_bytes()
    text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode()
    found = kernels(text)
    if not found:
        print(f"{args.csv}: no kernel in it", file=sys.stderr)
        return 1
    for name, rows in found.items():
        report(name, rows, args.voxels / (32 * args.ilp), args.min_share)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
