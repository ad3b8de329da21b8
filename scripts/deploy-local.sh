#!/usr/bin/env bash
# The Deployment Engine on one machine: a SuperLink and K SuperNodes on 127.0.0.1 (each SuperNode with its own
# partition-id and state-dir, as on real machines), the app submitted with `flwr run`, followed to its end, and
# everything stopped afterwards. Exit status = the run's. Arguments go to `flwr run` (e.g. -c "num-server-rounds=2").
#   K=2 PORT=9200 bash scripts/deploy-local.sh -c "num-server-rounds=1 local-epochs=1"
# Secured by default, as on real machines: scripts/make-certs.sh makes a CA, the SuperLink's TLS certificate and one
# key pair per SuperNode in the work directory; the SuperLink serves TLS with SuperNode authentication on, the K
# public keys are registered with `flwr supernode register`, and each SuperNode verifies the SuperLink with the CA
# and signs in with its private key. INSECURE=1: plain HTTP, no authentication (the old mode).
# ISOLATION=process (default): each SuperNode runs with `--isolation process` beside one long-lived ClientApp
# process (experiments/launch/warm_clientapp.py) that serves every message of the deployment, so torch, diffusers and the
# data are loaded once; it claims tasks with a per-deployment SuperExec secret. ISOLATION=subprocess: Flower's
# default, a new `flwr-clientapp` process (and every import) per message.
# Ports: the SuperLink on PORT, SuperNode i's Runtime API on PORT+100+i (127.0.0.1 only).
# WORK=DIR: use (and keep) DIR for logs, certificates and state instead of a fresh temporary directory.
# Across network namespaces (scripts/deploy-netns.sh sets these): LINK_NS = the SuperLink's namespace, NODE_NS_PREFIX
# = SuperNode i's namespace is PREFIX$i, HOST = the SuperLink's address there (it then listens on 0.0.0.0 in LINK_NS);
# the CLI (flwr run/ls/log) runs in LINK_NS too. POLL_S: the SuperNodes' idle poll (experiments/launch/supernode.py).
# SIGINT/SIGTERM stop the whole deployment (SuperLink, SuperNodes, ClientApp processes, Flower's SuperExecs and
# their apps) within seconds; exit status 130/143.
set -euo pipefail
cd "$(dirname "$0")/.."
# Settings checked before anything is installed, written or started: one line naming the setting, exit 2.
bad() { echo "deploy-local: invalid input: $*" >&2; exit 2; }
int_in() {  # int_in NAME VALUE LOW HIGH
  [[ $2 =~ ^[0-9]{1,9}$ ]] && (( 10#$2 >= $3 && 10#$2 <= $4 )) || bad "$1=${2@Q}: must be an integer in [$3, $4]"
}
K=${K:-2}
PORT=${PORT:-9200}
HOST=${HOST:-127.0.0.1}
link_exec=(); [ -n "${LINK_NS:-}" ] && link_exec=(ip netns exec "$LINK_NS")
node_exec() { [ -n "${NODE_NS_PREFIX:-}" ] && echo "ip netns exec $NODE_NS_PREFIX$1"; return 0; }
bind=$HOST; [ -n "${LINK_NS:-}" ] && bind=0.0.0.0
INSECURE=${INSECURE:-0}
ISOLATION=${ISOLATION:-process}
int_in K "$K" 1 1000
K=$((10#$K))
int_in PORT "$PORT" 1 $((65535 - 100 - K))  # SuperNode i's Runtime API listens on PORT+100+i
PORT=$((10#$PORT))
case $INSECURE in 0|1) ;; *) bad "INSECURE=${INSECURE@Q}: must be 0 or 1" ;; esac
[[ $HOST =~ ^[A-Za-z0-9]([A-Za-z0-9.:-]*[A-Za-z0-9])?$ ]] \
  || bad "HOST=${HOST@Q}: must be a host name or IP address (letters, digits, '.', '-', ':')"
case $ISOLATION in
  process|subprocess) ;;
  *) echo "deploy-local: ISOLATION=$ISOLATION: must be process or subprocess" >&2; exit 2 ;;
esac
if [ -n "${WORK:-}" ] && [ -e "$WORK" ] && [ ! -d "$WORK" ]; then
  bad "WORK=${WORK@Q}: exists and is not a directory"
fi
if [ -n "${OMP_NUM_THREADS:-}" ]; then int_in OMP_NUM_THREADS "$OMP_NUM_THREADS" 1 4096; fi
source scripts/setup.sh
# The arguments for `flwr run`, through the project's strict parser (Flower's drops what it cannot read, silently):
# every -c value, a key given twice, num-clients other than K
python -m fl_ietagc.settings.script_args --script deploy-local --fixed "num-clients=$K" -- "$@" || exit 2
# K ClientApps share this machine's cores: torch threads per process = cores / K (as Ray gives each simulated client
# its num_cpus), unless OMP_NUM_THREADS is set. More threads than cores makes OpenMP spin-wait: several times slower.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / K > 0 ? $(nproc) / K : 1 ))}
if [ -n "${WORK:-}" ]; then mkdir -p "$WORK" && work=$(cd "$WORK" && pwd); else work=$(mktemp -d); fi
pids=()    # started here: SuperLink, SuperNodes, ClientApp processes
follow=""  # the run follower (its `flwr log` child goes with it)
ports="$PORT"
for i in $(seq 0 $((K - 1))); do ports="$ports|$((PORT + 100 + i))"; done
mine() {  # this deployment's live processes: those started here, and Flower's own (SuperExecs, flwr-serverapp,
          # flwr-clientapp), which all name one of this deployment's addresses on their command line
  { for p in "${pids[@]+"${pids[@]}"}"; do kill -0 "$p" 2>/dev/null && echo "$p"; done
    if [ -n "${LINK_NS:-}" ]; then  # in namespaces: exactly the processes in them (other deployments may use
      ip netns pids "$LINK_NS" 2>/dev/null || true                    # the same ports in theirs)
      for i in $(seq 0 $((K - 1))); do ip netns pids "$NODE_NS_PREFIX$i" 2>/dev/null || true; done
    else
      pgrep -u "$(id -u)" -f -- "127\.0\.0\.1:($ports)( |\$)" || true
    fi; } | sort -u
}
cleanup() {
  trap - INT TERM
  if [ -n "$follow" ]; then pkill -P "$follow" 2>/dev/null || true; kill "$follow" 2>/dev/null || true; fi
  [ ${#pids[@]} -gt 0 ] && kill "${pids[@]}" 2>/dev/null || true
  left=$(mine)  # Flower's own processes (SuperExecs, flwr-serverapp, flwr-clientapp): told at once, not only
  [ -n "$left" ] && kill $left 2>/dev/null || true  # through their parent-pid monitors
  for _ in $(seq 50); do  # after 10 s: SIGKILL
    [ -z "$(mine)" ] && break
    sleep 0.2
  done
  left=$(mine)
  [ -n "$left" ] && { echo "deploy-local: killing what did not stop: $(echo $left)" >&2; kill -9 $left 2>/dev/null || true; }
  wait 2>/dev/null || true
  echo "deploy-local: stopped; logs were in $work" >&2
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
export FLWR_HOME=$work/cli
mkdir -p "$FLWR_HOME"
if [ "$ISOLATION" = process ]; then  # only holders of this secret can claim a SuperNode's ClientApp tasks
  secret=$work/superexec-secret
  (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$secret")
fi
if [ "$INSECURE" = 1 ]; then
  link_tls=(--insecure)
  printf '[superlink.local-deployment]\naddress = "%s:%s"\ninsecure = true\n' "$HOST" "$PORT" >"$FLWR_HOME/config.toml"
else
  certs=$work/certs
  bash scripts/make-certs.sh "$certs" -k "$K" --host "$HOST" --port "$PORT" >"$work/make-certs.txt"
  link_tls=(--ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/server.pem" --ssl-keyfile "$certs/server.key"
            --enable-supernode-auth)
  printf '[superlink.local-deployment]\naddress = "%s:%s"\nroot-certificates = "%s"\n' \
    "$HOST" "$PORT" "$certs/ca.crt" >"$FLWR_HOME/config.toml"
fi
FLWR_HOME=$work/superlink "${link_exec[@]}" flower-superlink "${link_tls[@]}" --host "$bind" --port "$PORT" \
  --disable-runtime-dependency-installation >"$work/superlink.log" 2>&1 &
pids+=($!)
up=0
for _ in $(seq 60); do  # wait for the SuperLink to accept connections
  kill -0 "${pids[0]}" 2>/dev/null || { echo "deploy-local: the SuperLink exited; see $work/superlink.log" >&2; exit 1; }
  "${link_exec[@]}" flwr ls local-deployment >/dev/null 2>&1 && { up=1; break; }
  sleep 1
done
[ $up = 1 ] || { echo "deploy-local: the SuperLink did not answer within 60 s; see $work/superlink.log" >&2; exit 1; }
for i in $(seq 0 $((K - 1))); do
  node_tls=(--insecure)
  if [ "$INSECURE" != 1 ]; then
    # With --enable-supernode-auth a SuperNode whose public key is not registered is refused, so register first.
    "${link_exec[@]}" flwr supernode register "$certs/supernode-$i.pub" local-deployment --name "supernode-$i" >/dev/null
    node_tls=(--root-certificates "$certs/ca.crt" --auth-supernode-private-key "$certs/supernode-$i")
  fi
  isolation=(--isolation subprocess)
  [ "$ISOLATION" = process ] && isolation=(--isolation process --superexec-auth-secret-file "$secret")
  # experiments/launch/supernode.py: Flower's flower-supernode, its idle poll shortened from 3 s to POLL_S (default 0.2)
  FLWR_HOME=$work/supernode$i $(node_exec "$i") python -m experiments.launch.supernode --poll-interval "${POLL_S:-0.2}" \
    "${node_tls[@]}" --superlink "$HOST:$PORT" "${isolation[@]}" \
    --port $((PORT + 100 + i)) --node-config "partition-id=$i num-partitions=$K state-dir='$work/state$i'" \
    >"$work/supernode$i.log" 2>&1 &
  pids+=($!)
  if [ "$ISOLATION" = process ]; then  # its one ClientApp process; it also ends when the SuperNode ends
    FLWR_HOME=$work/supernode$i $(node_exec "$i") python -m experiments.launch.warm_clientapp --insecure \
      --runtime-api-address "127.0.0.1:$((PORT + 100 + i))" --superexec-auth-secret-file "$secret" \
      --parent-pid "$!" --preload torch,diffusers --poll-interval "${POLL_S:-0.2}" >"$work/clientapp$i.log" 2>&1 &
    pids+=($!)
  fi
done
mode=$([ "$INSECURE" = 1 ] && echo "insecure (no TLS, no SuperNode authentication)" \
       || echo "TLS + SuperNode authentication")
mode="$mode, ClientApps: $([ "$ISOLATION" = process ] && echo "one long-lived process per SuperNode" \
       || echo "a new process per message")"
submitted=$("${link_exec[@]}" flwr run . local-deployment --format json -c "num-clients=$K output-dir='$PWD/runs'" "$@")
rid=$(python -c 'import json,sys; d=json.load(sys.stdin); print(d.get("run-id") or sys.exit(str(d)))' <<<"$submitted")
echo "deploy-local: run $rid submitted to the local SuperLink at $HOST:$PORT with $K SuperNodes, $mode"
"${link_exec[@]}" python -m experiments.launch.follow_run "$rid" --superlink local-deployment &
follow=$!
wait "$follow"  # (a trapped SIGINT/SIGTERM interrupts `wait`, not a foreground command)
