#!/usr/bin/env bash
# The Deployment Engine across emulated machines: the SuperLink in one network namespace, each SuperNode with its
# ClientApp in its own, joined by veth pairs to a bridge in the SuperLink's namespace, each link shaped with tc's
# token bucket (tbf) to RATE in both directions. TLS and SuperNode authentication on (the certificate names the
# SuperLink's namespace address). Then scripts/deploy-local.sh runs the app there; exit status = the run's.
#   sudo RATE=1gbit K=2 bash scripts/deploy-netns.sh -c "num-server-rounds=2 local-epochs=1"
# RATE: a tc rate (1gbit, 100mbit, ...; "" = unshaped veth). SUBNET: the first three octets of the namespaces'
# private addresses (default 10.213.0; SuperLink .1, SuperNode i .(10+i)); these addresses exist only inside the
# namespaces made here. Every other variable of deploy-local.sh (PORT, WORK, ISOLATION, INSECURE, POLL_S) applies.
# Needs root (ip netns, tc). Everything made here (namespaces, their links, the processes in them) is removed when
# the script ends, also on SIGINT/SIGTERM, and, if the script itself is SIGKILLed, by a watcher it starts first.
#   bash scripts/deploy-netns.sh --check   only says whether namespaces and tbf work here (exit 0) or why not (1)
set -euo pipefail
cd "$(dirname "$0")/.."
K=${K:-2}
RATE=${RATE-1gbit}
SUBNET=${SUBNET:-10.213.0}
[[ $K =~ ^[1-9][0-9]?$ ]] && [ "$K" -le 50 ] || { echo "deploy-netns: K=$K: must be an integer in 1..50" >&2; exit 2; }
[[ $SUBNET =~ ^10\.([0-9]{1,3})\.([0-9]{1,3})$ ]] && [ "${BASH_REMATCH[1]}" -le 255 ] && [ "${BASH_REMATCH[2]}" -le 255 ] \
  || { echo "deploy-netns: SUBNET=$SUBNET: must be 10.X.Y with X, Y in 0..255" >&2; exit 2; }
[[ -z $RATE || $RATE =~ ^[0-9]+(\.[0-9]+)?([kmg]?bit|[kmg]?bps)$ ]] \
  || { echo "deploy-netns: RATE=$RATE: must be a tc rate such as 1gbit or 100mbit (or empty: unshaped)" >&2; exit 2; }
tag=fl$$  # names of everything made here: namespaces $tag-link, $tag-n<i>; links $tag-l<i> / $tag-p<i>
LINK_NS=$tag-link

teardown() {  # idempotent: what this invocation (tag) made, and nothing else
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$1-(link|n[0-9]+)\$" || true); do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill "$p" 2>/dev/null || true; done
  done
  sleep 1
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$1-(link|n[0-9]+)\$" || true); do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
}

shape() {  # shape <ns> <dev>: tbf at RATE on the device's egress (each end of a link: both directions)
  [ -z "$RATE" ] && return 0
  # burst >= rate / HZ so the bucket can pass line rate; 1 MB covers 1 Gbit/s at HZ 125+
  ip netns exec "$1" tc qdisc add dev "$2" root tbf rate "$RATE" burst 1mb latency 100ms
}

if [ "${1:-}" = --check ]; then
  probe=flprobe$$
  trap 'ip netns del $probe 2>/dev/null || true' EXIT
  ip netns add "$probe" 2>/dev/null || { echo "deploy-netns: cannot create a network namespace here (needs root and ip netns)"; exit 1; }
  ip -n "$probe" link add p0 type veth peer name p1 2>/dev/null \
    || { echo "deploy-netns: cannot create a veth pair inside a namespace"; exit 1; }
  ip netns exec "$probe" tc qdisc add dev p0 root tbf rate 1gbit burst 1mb latency 100ms 2>/dev/null \
    || { echo "deploy-netns: tc cannot attach a tbf qdisc (sch_tbf missing)"; exit 1; }
  echo "deploy-netns: namespaces, veth and tbf work here"
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "deploy-netns: needs root (ip netns, tc)" >&2; exit 2; }

# The watcher: a detached process that removes everything once this script is gone, however it ended (SIGKILL too).
setsid bash -c "while kill -0 $$ 2>/dev/null; do sleep 1; done; $(declare -f teardown); teardown $tag" \
  >/dev/null 2>&1 </dev/null &
trap 'teardown $tag' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ip netns add "$LINK_NS"
ip -n "$LINK_NS" link set lo up
ip -n "$LINK_NS" link add br0 type bridge
ip -n "$LINK_NS" addr add "$SUBNET.1/24" dev br0
ip -n "$LINK_NS" link set br0 up
for i in $(seq 0 $((K - 1))); do
  ns=$tag-n$i
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip -n "$ns" link add eth0 type veth peer name "p$i" netns "$LINK_NS"
  ip -n "$ns" addr add "$SUBNET.$((10 + i))/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$LINK_NS" link set "p$i" master br0 up
  shape "$ns" eth0        # SuperNode -> SuperLink
  shape "$LINK_NS" "p$i"  # SuperLink -> SuperNode
done
echo "deploy-netns: SuperLink in namespace $LINK_NS at $SUBNET.1, $K SuperNodes in $tag-n0..$tag-n$((K - 1)), links ${RATE:-unshaped}"
status=0
LINK_NS=$LINK_NS NODE_NS_PREFIX=$tag-n HOST=$SUBNET.1 K=$K bash scripts/deploy-local.sh "$@" || status=$?
exit $status
