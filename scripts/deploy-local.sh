#!/usr/bin/env bash
# The Deployment Engine on one machine: a SuperLink and K SuperNodes on 127.0.0.1 (each SuperNode with its own
# partition-id and state-dir, as on real machines), the app submitted with `flwr run`, followed to its end, and
# everything stopped afterwards. Exit status = the run's. Arguments go to `flwr run` (e.g. -c "num-server-rounds=2").
#   K=2 PORT=9200 bash scripts/deploy-local.sh -c "num-server-rounds=1 local-epochs=1"
# Secured by default, as on real machines: scripts/make-certs.sh makes a CA, the SuperLink's TLS certificate and one
# key pair per SuperNode in the work directory; the SuperLink serves TLS with SuperNode authentication on, the K
# public keys are registered with `flwr supernode register`, and each SuperNode verifies the SuperLink with the CA
# and signs in with its private key. INSECURE=1: plain HTTP, no authentication (the old mode).
# WORK=DIR: use (and keep) DIR for logs, certificates and state instead of a fresh temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
K=${K:-2}
PORT=${PORT:-9200}
INSECURE=${INSECURE:-0}
if [ -n "${WORK:-}" ]; then mkdir -p "$WORK" && work=$(cd "$WORK" && pwd); else work=$(mktemp -d); fi
pids=()
cleanup() {
  [ ${#pids[@]} -gt 0 ] && kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  echo "deploy-local: stopped; logs were in $work" >&2
}
trap cleanup EXIT
export FLWR_HOME=$work/cli
mkdir -p "$FLWR_HOME"
if [ "$INSECURE" = 1 ]; then
  link_tls=(--insecure)
  printf '[superlink.local-deployment]\naddress = "127.0.0.1:%s"\ninsecure = true\n' "$PORT" >"$FLWR_HOME/config.toml"
else
  certs=$work/certs
  bash scripts/make-certs.sh "$certs" -k "$K" --host 127.0.0.1 --port "$PORT" >"$work/make-certs.txt"
  link_tls=(--ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/server.pem" --ssl-keyfile "$certs/server.key"
            --enable-supernode-auth)
  printf '[superlink.local-deployment]\naddress = "127.0.0.1:%s"\nroot-certificates = "%s"\n' \
    "$PORT" "$certs/ca.crt" >"$FLWR_HOME/config.toml"
fi
FLWR_HOME=$work/superlink flower-superlink "${link_tls[@]}" --host 127.0.0.1 --port "$PORT" \
  --disable-runtime-dependency-installation >"$work/superlink.log" 2>&1 &
pids+=($!)
up=0
for _ in $(seq 60); do  # wait for the SuperLink to accept connections
  kill -0 "${pids[0]}" 2>/dev/null || { echo "deploy-local: the SuperLink exited; see $work/superlink.log" >&2; exit 1; }
  flwr ls local-deployment >/dev/null 2>&1 && { up=1; break; }
  sleep 1
done
[ $up = 1 ] || { echo "deploy-local: the SuperLink did not answer within 60 s; see $work/superlink.log" >&2; exit 1; }
for i in $(seq 0 $((K - 1))); do
  node_tls=(--insecure)
  if [ "$INSECURE" != 1 ]; then
    # With --enable-supernode-auth a SuperNode whose public key is not registered is refused, so register first.
    flwr supernode register "$certs/supernode-$i.pub" local-deployment --name "supernode-$i" >/dev/null
    node_tls=(--root-certificates "$certs/ca.crt" --auth-supernode-private-key "$certs/supernode-$i")
  fi
  FLWR_HOME=$work/supernode$i flower-supernode "${node_tls[@]}" --superlink "127.0.0.1:$PORT" \
    --port $((PORT + 100 + i)) --node-config "partition-id=$i num-partitions=$K state-dir='$work/state$i'" \
    >"$work/supernode$i.log" 2>&1 &
  pids+=($!)
done
mode=$([ "$INSECURE" = 1 ] && echo "insecure (no TLS, no SuperNode authentication)" \
       || echo "TLS + SuperNode authentication")
submitted=$(flwr run . local-deployment --format json -c "num-clients=$K output-dir='$PWD/runs'" "$@")
rid=$(python -c 'import json,sys; d=json.load(sys.stdin); print(d.get("run-id") or sys.exit(str(d)))' <<<"$submitted")
echo "deploy-local: run $rid submitted to the local SuperLink with $K SuperNodes, $mode"
python -m experiments.follow_run "$rid" --superlink local-deployment
