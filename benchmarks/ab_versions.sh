#!/usr/bin/env bash
# A/B of this checkout's code against another revision's, in alternating pairs (A B A B ...), so that a drift in
# the machine's speed hits both: `bash benchmarks/ab_versions.sh REV PAIRS -- BENCHMARK ARGS...`, e.g.
#   bash benchmarks/ab_versions.sh 62b3b82 3 -- deployment_modes.py --rounds 6 --config test --only process
# B runs REV's fl_ietagc/, clients/ and strategies/ (a git worktree under a temporary folder, first on PYTHONPATH,
# which every process the benchmark starts inherits) with THIS checkout's benchmarks/, so only the product code
# differs. Each run's last AB_LINES lines (default 4) are printed under "== A|B i"; the worktree is removed at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:?usage: ab_versions.sh REV PAIRS -- BENCHMARK ARGS...}
pairs=${2:?usage: ab_versions.sh REV PAIRS -- BENCHMARK ARGS...}
[[ "$pairs" =~ ^[1-9][0-9]?$ ]] || { echo "ab_versions.sh: PAIRS = $pairs: must be an integer in [1, 99]" >&2; exit 2; }
shift 2
[ "${1:-}" = "--" ] && shift
[ $# -ge 1 ] || { echo "ab_versions.sh: no benchmark given after --" >&2; exit 2; }
git rev-parse --verify -q "$rev^{commit}" >/dev/null || { echo "ab_versions.sh: REV = $rev: not a commit here" >&2; exit 2; }
here=$PWD
work=$(mktemp -d /tmp/ab-versions.XXXXXX)
cleanup() { git -C "$here" worktree remove --force "$work/b" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
git worktree add -q --detach "$work/b" "$rev"
rm -rf "$work/b/benchmarks" && cp -r benchmarks "$work/b/benchmarks"
script=$1
shift
for i in $(seq 1 "$pairs"); do
  for side in A B; do
    dir=$here
    [ "$side" = B ] && dir=$work/b
    echo "== $side $i $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)"
    (cd "$dir" && PYTHONPATH="$dir${PYTHONPATH:+:$PYTHONPATH}" python "benchmarks/$script" "$@" 2>&1 | tail -n "${AB_LINES:-4}")
  done
done
