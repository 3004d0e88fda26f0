#!/usr/bin/env bash
# Run benchmark studies one after another on a pinned commit, and commit each one's results as it finishes.
#
#   bash scripts/bench_queue.sh COMMIT "paradigms --steps 1" "hermes-ablation --collection shared2d" ...
#
# Why: the long studies take more CPU-hours than a sitting has, and only what is committed outlives it (`work/`,
# with the runs and checkpoints, does not). Each study records its finished steps in
# benchmarks/results/ledger/ (see benchmarks/common.py, Ledger); this script runs the studies in a worktree
# checked out at COMMIT (so that editing the main checkout cannot change code under a running study), and after
# each invocation — finished, stopped by --steps, or failed — copies the result files it wrote into this checkout,
# regenerates BENCHMARKS.md here and commits just those paths. The worktree's work/ is this checkout's work/
# (a link), so runs are shared with studies started from here. Log: work/bench/logs/queue.log.
set -uo pipefail
cd "$(dirname "$0")/.."
main=$PWD
if [ $# -lt 2 ]; then
  echo "usage: bash scripts/bench_queue.sh COMMIT \"STUDY [FLAGS]\" ..." >&2
  exit 2
fi
commit=$(git rev-parse --short "$1") || { echo "unknown commit $1" >&2; exit 2; }
shift
tree=${MOSAICSEG_BENCH_TREE:-$main/../benchwt}
# one queue per worktree: checking out another commit under a running study would change its code
exec 9>"$tree.lock"
flock -n 9 || { echo "another queue runs in $tree (lock $tree.lock); wait for it or set MOSAICSEG_BENCH_TREE" >&2; exit 1; }
if [ ! -d "$tree" ]; then
  git worktree add --detach "$tree" "$commit" >/dev/null
else
  git -C "$tree" checkout --detach -q "$commit"
fi
mkdir -p "$main/work/bench/logs"
[ -e "$tree/work" ] || ln -s "$main/work" "$tree/work"
log=$main/work/bench/logs/queue.log
python=${MOSAICSEG_PYTHON:-$main/.venv/bin/python}
for study in "$@"; do
  echo "$(date -u '+%F %T') start: $study (at $commit)" >>"$log"
  # shellcheck disable=SC2086  # a study's flags are split on purpose
  (cd "$tree" && PYTHONPATH="$tree/src:$tree" "$python" -m benchmarks $study) >>"$log" 2>&1
  rc=$?
  echo "$(date -u '+%F %T') end: $study (exit $rc)" >>"$log"
  # only the files this study wrote (the worktree's others are COMMIT's, maybe older than this checkout's);
  # then BENCHMARKS.md regenerated here, from every result this checkout has
  git -C "$tree" status --porcelain --untracked-files=all -- benchmarks/results | cut -c4- | while read -r f; do
    mkdir -p "$(dirname "$main/$f")" && cp "$tree/$f" "$main/$f"
  done
  "$python" -m benchmarks report >>"$log" 2>&1
  git -C "$main" add benchmarks/results BENCHMARKS.md
  git -C "$main" commit -q -m "benchmarks: $study (at $commit, exit $rc)" -- benchmarks/results BENCHMARKS.md \
    >>"$log" 2>&1 || echo "nothing new to commit after: $study" >>"$log"
done
