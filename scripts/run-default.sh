#!/usr/bin/env bash
# The main job on the embedded default data: 4 Flower clients (shards of sklearn's digits), tiny UNet,
# IET-AGC, Ray simulation on the CPU. Extra arguments go to flower-simulation, e.g.
#   bash scripts/run-default.sh --run-config "num-server-rounds=2 agc-lambda=3.0"
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec flower-simulation --app . --num-supernodes 4 \
  --backend-config '{"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}' "$@"
