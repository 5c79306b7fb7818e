#!/usr/bin/env bash
# One prepared GPU-machine call: the GPU check of this tree, the same benchmark of a baseline
# tree on the same machine (host times drift from machine to machine), and an Nsight Compute
# profile of the fused kernels on the bandwidth batch. Everything lands in $OUT.
#
# Before the call, on the development machine (the device copy has no .git; an untracked,
# non-ignored folder travels with the working tree):
#     mkdir _baseline && git archive <rev> | tar -x -C _baseline
# then run, from the repository root on the GPU machine:
#     bash benchmarks/gpu_session.sh [_baseline]
# (about 3-4 minutes on an H100; remove _baseline afterwards).
set -o pipefail
export NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-/tmp/nbc} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
base=${1:-}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
echo "=== gpu_check (this tree)"
timeout 280 python3 benchmarks/gpu_check.py --json "$OUT/gpu.json" --log "$OUT/tests.log" 2>&1 \
    | tee "$OUT/check.log" | tail -60
if [ -n "$base" ] && [ -d "$base" ]; then
    echo "=== gpu_check of $base (--quick --skip-tests, same machine)"
    (cd "$base" && timeout 150 python3 benchmarks/gpu_check.py --skip-tests --quick \
        --json "$OUT/base.json" > "$OUT/base.log" 2>&1; echo "rc=$?")
    grep -A8 "^| class" "$OUT/base.log"
    grep -A4 "^| kernel" "$OUT/base.log"
fi
if command -v ncu > /dev/null; then
    echo "=== ncu: blend and write-back on the bandwidth batch"
    timeout 100 ncu --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats --section MemoryWorkloadAnalysis \
        -k regex:'sg_seg_(apply|blend)' --launch-count 2 \
        python3 benchmarks/gpu_check.py --skip-tests --only-bandwidth > "$OUT/ncu.txt" 2>&1
    echo "ncu rc=$?"
    grep -E "sg_seg_|Registers Per Thread|Achieved Occupancy|Memory Throughput|DRAM Throughput|Duration" \
        "$OUT/ncu.txt" | head -40
fi
