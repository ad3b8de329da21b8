#!/usr/bin/env bash
# The Deployment Engine on one machine: a SuperLink and K SuperNodes on 127.0.0.1 (each SuperNode with its own
# partition-id and state-dir, as on real machines), the app submitted with `flwr run`, followed to its end, and
# everything stopped afterwards. Exit status = the run's. Arguments go to `flwr run` (e.g. -c "num-server-rounds=2").
#   K=2 PORT=9200 bash scripts/deploy-local.sh -c "num-server-rounds=1 local-epochs=1"
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
K=${K:-2}
PORT=${PORT:-9200}
work=$(mktemp -d)
pids=()
cleanup() {
  [ ${#pids[@]} -gt 0 ] && kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  echo "deploy-local: stopped; logs were in $work" >&2
}
trap cleanup EXIT
FLWR_HOME=$work/superlink flower-superlink --insecure --host 127.0.0.1 --port "$PORT" \
  --disable-runtime-dependency-installation >"$work/superlink.log" 2>&1 &
pids+=($!)
for i in $(seq 0 $((K - 1))); do
  FLWR_HOME=$work/supernode$i flower-supernode --insecure --superlink "127.0.0.1:$PORT" --port $((PORT + 100 + i)) \
    --node-config "partition-id=$i num-partitions=$K state-dir='$work/state$i'" >"$work/supernode$i.log" 2>&1 &
  pids+=($!)
done
export FLWR_HOME=$work/cli
mkdir -p "$FLWR_HOME"
printf '[superlink.local-deployment]\naddress = "127.0.0.1:%s"\ninsecure = true\n' "$PORT" >"$FLWR_HOME/config.toml"
for _ in $(seq 60); do  # wait for the SuperLink to accept connections
  flwr ls local-deployment >/dev/null 2>&1 && break
  sleep 1
done
submitted=$(flwr run . local-deployment --format json -c "num-clients=$K output-dir='$PWD/runs'" "$@")
rid=$(python -c 'import json,sys; d=json.load(sys.stdin); print(d.get("run-id") or sys.exit(str(d)))' <<<"$submitted")
echo "deploy-local: run $rid submitted to the local SuperLink with $K SuperNodes"
python -m experiments.follow_run "$rid" --superlink local-deployment
