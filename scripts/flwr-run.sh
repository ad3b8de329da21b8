#!/usr/bin/env bash
# `flwr run` for this app, plus what Flower leaves out:
#  - an isolated FLWR_HOME (./.flwr) and no per-run dependency installs, telemetry or update checks;
#  - output-dir made absolute (the ServerApp runs in the background SuperLink's working directory);
#  - `--resume RUN_DIR` continues a killed, failed or interrupted run with the config it was started with;
#  - the command's exit status is the run's: 0 only for finished:completed (`flwr run --stream` exits 0
#    even when the run failed); 2 for bad input.
# Arguments go to `flwr run`, e.g.
#   bash scripts/flwr-run.sh --federation-config "num-supernodes=4 client-resources-num-cpus=1" -c "agc-lambda=3.0"
#   bash scripts/flwr-run.sh --federation-config "num-supernodes=4 client-resources-num-cpus=1" --resume runs/NAME
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
export FLWR_HOME=${FLWR_HOME:-$PWD/.flwr}
args=()
resume=""
while [ $# -gt 0 ]; do
  case "$1" in
    --resume) [ $# -ge 2 ] || { echo "flwr-run: --resume needs a run directory" >&2; exit 2; }
              resume=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
# Flower's own -c parser silently drops what it cannot read ('lr=', 'rounds = 1'): check every -c strictly first,
# and --federation-config's client resources against this machine (more GPUs per client than exist: Ray would
# wait for ever, after the SuperLink started)
python -m fl_ietagc.script_args --script flwr-run -- "${args[@]+"${args[@]}"}" || exit 2
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
exec python -m experiments.follow_run "$rid"
