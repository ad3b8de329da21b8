#!/usr/bin/env bash
# `flwr run` for this app, plus what Flower leaves out:
#  - an isolated FLWR_HOME (./.flwr) and no per-run dependency installs, telemetry or update checks;
#  - output-dir made absolute (the ServerApp runs in the background SuperLink's working directory);
#  - `--resume RUN_DIR` continues a killed, failed or interrupted run with the config it was started with;
#  - the command's exit status is the run's: 0 only for finished:completed (`flwr run --stream` exits 0
#    even when the run failed); 2 for bad input;
#  - the local SuperLink (and its SuperExec) that `flwr run` starts in the background is stopped when this
#    script ends (Ctrl-C included), by PID; with --keep-superlink it is left running for the next run and its
#    PIDs are printed and written to $FLWR_HOME/local-superlink/fl-ietagc-superlink.pid, which
#    `bash scripts/flwr-run.sh stop` reads to stop exactly those processes. A SuperLink that was already
#    answering before this script started is not ours: it is used and left as it is.
# Arguments go to `flwr run`, e.g.
#   bash scripts/flwr-run.sh --federation-config "num-supernodes=4 client-resources-num-cpus=1" -c "agc-lambda=3.0"
#   bash scripts/flwr-run.sh --federation-config "num-supernodes=4 client-resources-num-cpus=1" --resume runs/NAME
#   bash scripts/flwr-run.sh --keep-superlink ...     # then, when done:  bash scripts/flwr-run.sh stop
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
export FLWR_HOME=${FLWR_HOME:-$PWD/.flwr}
if [ "${1-}" = stop ]; then
  [ $# -eq 1 ] || { echo "flwr-run: stop takes no arguments" >&2; exit 2; }
  exec python -m experiments.launch.local_superlink stop
fi
args=()
resume=""
keep=""
while [ $# -gt 0 ]; do
  case "$1" in
    --keep-superlink) keep=1; shift ;;
    --resume) [ $# -ge 2 ] || { echo "flwr-run: --resume needs a run directory" >&2; exit 2; }
              resume=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
# Flower's own -c parser silently drops what it cannot read ('lr=', 'rounds = 1'): check every -c strictly first,
# and --federation-config's client resources against this machine (more GPUs per client than exist: Ray would
# wait for ever, after the SuperLink started)
python -m fl_ietagc.settings.script_args --script flwr-run -- "${args[@]+"${args[@]}"}" || exit 2
started=""
if python -m experiments.launch.local_superlink running; then
  echo "flwr-run: using the local SuperLink already answering on 127.0.0.1:${FLWR_LOCAL_SUPERLINK_HTTP_API_PORT:-39091}" \
       "(not started by this run, so left running; if an earlier --keep-superlink left it: bash scripts/flwr-run.sh stop)"
else
  started=1
fi
cleanup() {
  code=$?
  trap - EXIT INT TERM
  [ -n "$started" ] || exit "$code"
  if [ -n "$keep" ]; then
    left=$(python -m experiments.launch.local_superlink record) || true
    if [ -n "$left" ]; then
      echo "flwr-run: left running (--keep-superlink): $left; pid file $FLWR_HOME/local-superlink/fl-ietagc-superlink.pid"
      echo "flwr-run: stop exactly these with: bash scripts/flwr-run.sh stop"
    fi
  elif python -m experiments.launch.local_superlink record >/dev/null; then  # nothing found: nothing was started
    python -m experiments.launch.local_superlink stop || true
  fi
  exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
if [ -n "$resume" ]; then
  for a in "${args[@]+"${args[@]}"}"; do
    case "$a" in -c|--run-config|-c=*|--run-config=*)
      echo "flwr-run: --resume keeps the run's own config; drop $a" >&2; exit 2 ;;
    esac
  done
  toml=$(mktemp --suffix=.toml)
  fl-ietagc resume "$resume" --print-config >"$toml" || exit 2
  submitted=$(flwr run . --format json -c "$toml" "${args[@]+"${args[@]}"}")
else
  submitted=$(flwr run . --format json -c "output-dir='$PWD/runs'" "${args[@]+"${args[@]}"}")
fi
rid=$(python -c 'import json,sys; d=json.load(sys.stdin); print(d.get("run-id") or sys.exit(str(d)))' <<<"$submitted")
echo "flwr-run: run $rid submitted (FLWR_HOME=$FLWR_HOME); following its log"
python -m experiments.launch.follow_run "$rid"
