#!/usr/bin/env bash
# On the development machine, before a GPU-machine call: the trees gpu_session.sh compares
# this working tree with, one per git revision, as untracked folders at the repository root
# (the device copy of the working tree carries untracked, non-ignored files, not .git):
#     bash benchmarks/prepare_gpu_session.sh b7ece65 ab05627 edb4cd1
# makes _baseline (the first revision: a full `gpu_check --quick` on the GPU machine) and
# _t1, _t2, ... (the others: the fused kernels' bandwidth only), checks what the call would
# carry, and prints the command to run there. `bash benchmarks/prepare_gpu_session.sh --clean`
# removes them afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
trees=(_baseline _t1 _t2 _t3 _t4 _t5 _t6 _t7 _t8)
if [ "${1:-}" = "--clean" ]; then
    rm -rf "${trees[@]}"
    exit 0
fi
[ $# -ge 1 ] || { echo "usage: $0 REV [REV ...] | --clean" >&2; exit 2; }
[ $# -le ${#trees[@]} ] || { echo "at most ${#trees[@]} revisions" >&2; exit 2; }
names=()
i=0
for rev in "$@"; do
    name=${trees[$i]}
    git rev-parse --verify --quiet "$rev^{commit}" > /dev/null \
        || { echo "$rev: not a commit" >&2; exit 2; }
    rm -rf "$name"
    mkdir "$name"
    git archive "$rev" | tar -x -C "$name"
    echo "$name: $(git rev-parse --short "$rev") $(git log -1 --format=%s "$rev" | cut -c1-70)"
    names+=("$name")
    i=$((i + 1))
done
# what the device call carries: tracked and untracked, non-ignored files (its limit: 64 MiB
# with the paths carried)
bytes=$(git ls-files -z -co --exclude-standard | xargs -0 cat 2> /dev/null | wc -c)
echo "the call carries $((bytes / 1024)) KiB of files (limit 64 MiB)"
[ "$bytes" -lt $((60 * 1024 * 1024)) ] || { echo "too large for one call" >&2; exit 1; }
echo "run there (timeout_s 560): bash benchmarks/gpu_session.sh ${names[*]} 2>&1"
