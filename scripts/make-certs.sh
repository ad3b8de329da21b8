#!/usr/bin/env bash
# Credentials for a secured Deployment Engine (Flower 1.41: TLS + SuperNode authentication), written into DIR:
#   ca.crt, ca.key          the certificate authority (ca.key signs; keep it off the federation's machines)
#   server.pem, server.key  the SuperLink's TLS certificate (subjectAltName: --host, 127.0.0.1, localhost) and key
#   supernode-I, .pub       SuperNode I's authentication key pair (ECDSA P-384, OpenSSH format), I = 0..K-1
# and prints the commands to start the SuperLink and the K SuperNodes and the CLI's config.toml block.
#   bash scripts/make-certs.sh DIR [-k K] [--host HOST[,HOST...]] [--port PORT] [--days DAYS]
# HOST: the names/IPs SuperNodes and the CLI use to reach the SuperLink (default 127.0.0.1). 127.0.0.1 is always
# included: the SuperLink's own SuperExec connects to it there. Needs the `openssl` CLI, and `ssh-keygen` or
# Python's `cryptography` (which Flower installs). Refuses to overwrite an existing DIR/ca.crt.
set -euo pipefail
usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 1 ] || usage
case $1 in -h|--help) usage ;; esac
# Every argument checked before anything is written: one line naming the argument and its range, exit 2.
bad() { echo "make-certs: invalid input: $*" >&2; exit 2; }
int_in() {  # int_in NAME VALUE LOW HIGH
  [[ $2 =~ ^[0-9]{1,9}$ ]] && (( 10#$2 >= $3 && 10#$2 <= $4 )) || bad "$1 ${2@Q}: must be an integer in [$3, $4]"
}
dir=$1; shift
case $dir in
  "") bad "DIR '': empty; the first argument is the directory to write" ;;
  -*) bad "DIR ${dir@Q}: the first argument is the directory to write, not an option" ;;
esac
[ ! -e "$dir" ] || [ -d "$dir" ] || bad "DIR ${dir@Q}: exists and is not a directory"
K=2; HOSTS=127.0.0.1; PORT=9200; DAYS=825; seen=" "
while [ $# -gt 0 ]; do
  opt=$1 value=""
  case $opt in
    -k|--host|--port|--days) [ $# -ge 2 ] || bad "$opt: needs a value"; value=$2; shift 2 ;;
    -k=*|--host=*|--port=*|--days=*) value=${opt#*=}; opt=${opt%%=*}; shift ;;
    *) bad "$opt: unknown argument (DIR [-k K] [--host HOST[,HOST...]] [--port PORT] [--days DAYS])" ;;
  esac
  case $seen in *" $opt "*) bad "$opt: given twice; give it once" ;; esac
  seen="$seen$opt "
  case $opt in
    -k) int_in -k "$value" 1 1000; K=$((10#$value)) ;;
    --port) int_in --port "$value" 1 65535; PORT=$((10#$value)) ;;
    --days) int_in --days "$value" 1 36500; DAYS=$((10#$value)) ;;
    --host)
      [ -n "$value" ] || bad "--host '': empty; give a host name or IP address (comma-separated for several)"
      IFS=, read -r -a hosts <<<"$value,"
      for h in "${hosts[@]}"; do
        [[ $h =~ ^[A-Za-z0-9]([A-Za-z0-9.:-]*[A-Za-z0-9])?$ ]] \
          || bad "--host ${value@Q}: ${h@Q} is not a host name or IP address (letters, digits, '.', '-', ':')"
      done
      HOSTS=$value ;;
  esac
done
if [ -e "$dir/ca.crt" ]; then
  echo "make-certs: $dir/ca.crt exists; not overwriting (use a new directory)" >&2; exit 2
fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
umask 077  # private keys readable by their owner only

# subjectAltName: each HOST as IP: or DNS:, plus the loopback names the SuperLink's own SuperExec uses.
san=""; first_host=${HOSTS%%,*}
for h in ${HOSTS//,/ } 127.0.0.1 localhost; do
  if [[ $h =~ ^[0-9]+(\.[0-9]+){3}$ || $h == *:* ]]; then e="IP:$h"; else e="DNS:$h"; fi
  case ",$san," in *",$e,"*) ;; *) san="${san:+$san,}$e" ;; esac
done

# CA, then the server key + CSR, signed by the CA with the SAN and serverAuth usage.
openssl req -x509 -newkey rsa:4096 -sha256 -days "$DAYS" -nodes -subj "/CN=fl-ietagc Flower CA" \
  -keyout "$dir/ca.key" -out "$dir/ca.crt" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey rsa:4096 -sha256 -nodes -subj "/CN=$first_host" \
  -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\n' \
  "$san" >"$dir/server.ext"
openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
  -days "$DAYS" -sha256 -extfile "$dir/server.ext" -out "$dir/server.pem" 2>/dev/null
rm -f "$dir/server.csr" "$dir/server.ext" "$dir/ca.srl"
openssl verify -CAfile "$dir/ca.crt" "$dir/server.pem" >/dev/null

# One ECDSA P-384 key pair per SuperNode, OpenSSH format (what flower-supernode and `flwr supernode register` read).
for i in $(seq 0 $((K - 1))); do
  key="$dir/supernode-$i"
  if command -v ssh-keygen >/dev/null; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "fl-ietagc-supernode-$i" -f "$key"
  else
    python3 - "$key" "$i" <<'EOF'
import sys
from cryptography.hazmat.primitives import serialization as s
from cryptography.hazmat.primitives.asymmetric import ec
path, i = sys.argv[1], sys.argv[2]
k = ec.generate_private_key(ec.SECP384R1())
open(path, "wb").write(k.private_bytes(s.Encoding.PEM, s.PrivateFormat.OpenSSH, s.NoEncryption()))
pub = k.public_key().public_bytes(s.Encoding.OpenSSH, s.PublicFormat.OpenSSH)
open(path + ".pub", "wb").write(pub + b" fl-ietagc-supernode-" + i.encode() + b"\n")
EOF
  fi
done
chmod 644 "$dir/ca.crt" "$dir/server.pem" "$dir"/supernode-*.pub

cat <<EOF
make-certs: wrote $dir (server certificate for $san; $K SuperNode key pairs)

# 1. SuperLink machine (copy ca.crt server.pem server.key there; never copy ca.key anywhere):
flower-superlink --host 0.0.0.0 --port $PORT --disable-runtime-dependency-installation \\
  --ssl-ca-certfile $dir/ca.crt --ssl-certfile $dir/server.pem --ssl-keyfile $dir/server.key \\
  --enable-supernode-auth

# 2. The CLI machine (ca.crt and the supernode-*.pub files), with this block in \$FLWR_HOME/config.toml
#    (default ~/.flwr/config.toml):
[superlink.mycluster]
address = "$first_host:$PORT"
root-certificates = "$dir/ca.crt"

# 3. Register each SuperNode's public key once (the SuperLink refuses unregistered keys):
EOF
for i in $(seq 0 $((K - 1))); do
  echo "flwr supernode register $dir/supernode-$i.pub mycluster --name supernode-$i"
done
cat <<EOF

# 4. SuperNode machine i of $K (copy ca.crt and supernode-i there; the private key stays on that machine):
EOF
for i in $(seq 0 $((K - 1))); do
  echo "flower-supernode --superlink $first_host:$PORT --root-certificates $dir/ca.crt \\"
  echo "  --auth-supernode-private-key $dir/supernode-$i \\"
  echo "  --node-config \"partition-id=$i num-partitions=$K state-dir='/local/fl-ietagc-state'\""
done
cat <<EOF

# 5. Anywhere with the config.toml above:
flwr run . mycluster --format json -c "num-clients=$K output-dir='/srv/runs'"
EOF
