#!/usr/bin/env bash
# One prepared GPU-machine call: the GPU check of this tree, the same benchmark of a baseline
# tree on the same machine (host times drift from machine to machine), and an Nsight Compute
# profile of the fused kernels on the bandwidth batch. Everything lands in $OUT.
#
# Before the call, on the development machine (the device copy has no .git; an untracked,
# non-ignored folder travels with the working tree):
#     mkdir _baseline && git archive <rev> | tar -x -C _baseline
# (or `bash benchmarks/prepare_gpu_session.sh REV [REV ...]`, which makes _baseline, _t1, ...
# and prints this script's command line)
# then run, from the repository root on the GPU machine:
#     bash benchmarks/gpu_session.sh [_baseline [_tree ...]]
# (about 4 minutes on an H100 or H200; remove _baseline afterwards). Each further tree (made
# the same way, e.g. the commits between the baseline and this tree) gets the fused kernels'
# bandwidth only (`--only-bandwidth`; its numba cache and NVRTC compiles are cold: allow
# 30-60 s each, and keep to one or two so the call stays within the device's 600 s): which
# commit moved it, on one machine.
set -o pipefail
export NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-/tmp/nbc} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
base=${1:-}
# The whole call within GPU_SESSION_SECONDS (default 540: a device call's limit is 600 s, the
# caller's timeout_s 560): each step's timeout is its own bound or what is left, and a step
# with less than 20 s left is skipped, so a slow step costs the later ones, not the output.
DEADLINE=${GPU_SESSION_SECONDS:-540}
# (each step takes its budget once, into t, and runs only with t > 0: `timeout 0` would
# mean no limit at all)
budget() {
    local left=$((DEADLINE - SECONDS - 5))
    if [ "$left" -lt "$1" ]; then echo $((left > 20 ? left : 0)); else echo "$1"; fi
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
echo "=== gpu_check (this tree)"
t=$(budget 280)
[ "$t" -gt 0 ] && timeout "$t" python3 benchmarks/gpu_check.py --json "$OUT/gpu.json" \
    --log "$OUT/tests.log" 2>&1 | tee "$OUT/check.log" | tail -60
t=$(budget 150)
if [ -n "$base" ] && [ -d "$base" ] && [ "$t" -gt 0 ]; then
    echo "=== gpu_check of $base (--quick --skip-tests, same machine)"
    (cd "$base" && timeout "$t" python3 benchmarks/gpu_check.py --skip-tests --quick \
        --json "$OUT/base.json" > "$OUT/base.log" 2>&1; echo "rc=$?")
    grep -A8 "^| class" "$OUT/base.log"
    grep -A4 "^| kernel" "$OUT/base.log"
fi
shift 2> /dev/null
for tree in "$@"; do
    [ -d "$tree" ] || { echo "=== $tree: not a folder, skipped"; continue; }
    t=$(budget 75)
    [ "$t" -gt 0 ] || { echo "=== $tree: no time left, skipped"; continue; }
    name=$(printf %s "$tree" | tr -c 'A-Za-z0-9._-' _)
    echo "=== bandwidth of $tree (--only-bandwidth, same machine)"
    (cd "$tree" && timeout "$t" python3 benchmarks/gpu_check.py --skip-tests \
        --only-bandwidth > "$OUT/bw-$name.log" 2>&1; echo "rc=$?")
    grep "'kernel'" "$OUT/bw-$name.log" | head -12
done
t=$(budget 150)
if command -v ncu > /dev/null && [ "$t" -gt 30 ]; then
    echo "=== ncu: blend and write-back on the bandwidth batch"
    # (the report, its details page, and its source page per SASS instruction, summed by
    # region with benchmarks/ncu_regions.py: docs/gpu-host-work.md, "The fused kernels on an
    # H200")
    timeout "$t" ncu --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats --section MemoryWorkloadAnalysis --section InstructionStats \
        --section SourceCounters -k regex:'sg_seg_(apply|blend)$' --launch-count 2 \
        -o "$OUT/prof" -f python3 benchmarks/gpu_check.py --skip-tests --only-bandwidth \
        > "$OUT/ncu.log" 2>&1
    echo "ncu rc=$?"
    ncu --import "$OUT/prof.ncu-rep" --page details > "$OUT/ncu.txt" 2>&1
    ncu --import "$OUT/prof.ncu-rep" --page source --print-source sass --csv 2> /dev/null \
        | gzip > "$OUT/src.csv.gz"
    rm -f "$OUT/ncu.log"
    grep -E "sg_seg_|Registers Per Thread|Achieved Occupancy|Memory Throughput|DRAM Throughput|Duration" \
        "$OUT/ncu.txt" | head -40
    python3 benchmarks/ncu_regions.py "$OUT/src.csv.gz" --min-share 0.03
fi
