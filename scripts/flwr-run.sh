#!/usr/bin/env bash
# `flwr run` for this app, plus what Flower leaves out:
#  - an isolated FLWR_HOME (./.flwr) and no per-run dependency installs, telemetry or update checks;
#  - output-dir made absolute (the ServerApp runs in the background SuperLink's working directory);
#  - the command's exit status is the run's: 0 only for finished:completed (`flwr run --stream` exits 0
#    even when the run failed).
# Arguments go to `flwr run`, e.g.
#   bash scripts/flwr-run.sh --federation-config "num-supernodes=4 client-resources-num-cpus=1" -c "agc-lambda=3.0"
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
export FLWR_HOME=${FLWR_HOME:-$PWD/.flwr}
submitted=$(flwr run . --format json -c "output-dir='$PWD/runs'" "$@")
rid=$(python -c 'import json,sys; d=json.load(sys.stdin); print(d.get("run-id") or sys.exit(str(d)))' <<<"$submitted")
echo "flwr-run: run $rid submitted (FLWR_HOME=$FLWR_HOME); following its log"
exec python -m experiments.follow_run "$rid"
