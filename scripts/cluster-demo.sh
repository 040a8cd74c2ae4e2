#!/usr/bin/env bash
# A three-host Lazarus cluster on this machine, as network namespaces
# (needs root and iproute2): a supervisor, agents on hosts a and b, and a
# client. It runs the kv-service with a hot standby behind a VIP, writes a
# key, SIGKILLs the primary, and shows the service, the VIP and the client's
# neighbour entry moving to the standby's host. Everything is removed at
# the end, also on failure or Ctrl-C.
#
#   bash scripts/cluster-demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "cluster-demo.sh needs root (network namespaces)" >&2; exit 1; }
command -v ip >/dev/null || { echo "cluster-demo.sh needs iproute2 (apt-get install iproute2)" >&2; exit 1; }

cargo build --release -q -p lazarus -p kv-service
L=$PWD/target/release/lazarus
WORK=$(mktemp -d)
TAG=lzdemo$$
PIDS=()
cleanup() {
    # PIDS holds the background shells; the lazarus processes they started
    # carry $WORK on their command line. TERM first (agents stop their
    # workers and release VIPs), then KILL what is left.
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    pkill -TERM -f -- "$WORK" 2>/dev/null || true
    sleep 0.5
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    pkill -KILL -f -- "$WORK" 2>/dev/null || true
    for h in br sup a b cl; do ip netns del "$TAG$h" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

ip netns add "${TAG}br"
ip -n "${TAG}br" link add br0 type bridge && ip -n "${TAG}br" link set br0 up
n=1
for h in sup a b cl; do
    ip netns add "$TAG$h"
    ip -n "${TAG}br" link add "v$h" type veth peer name eth0 netns "$TAG$h"
    ip -n "${TAG}br" link set "v$h" master br0 && ip -n "${TAG}br" link set "v$h" up
    ip -n "$TAG$h" link set eth0 address "02:00:00:00:00:0$n"
    ip -n "$TAG$h" addr add "198.18.0.$n/24" dev eth0
    ip -n "$TAG$h" link set eth0 up && ip -n "$TAG$h" link set lo up
    n=$((n + 1))
done
SUP=198.18.0.1:7070
on() { local h=$1; shift; ip netns exec "$TAG$h" "$@"; }

echo "== a cluster CA and one certificate each: supervisor, agents a and b, an operator"
"$L" ca init "$WORK/pki/ca" >/dev/null
"$L" cert issue --ca "$WORK/pki/ca" --role supervisor --name sup --out "$WORK/pki/sup" >/dev/null
"$L" cert issue --ca "$WORK/pki/ca" --role operator --name demo --out "$WORK/pki/operator" >/dev/null
for h in a b; do "$L" cert issue --ca "$WORK/pki/ca" --role agent --name $h --out "$WORK/pki/$h" >/dev/null; done
# Client commands (submit, status) find the operator's certificate here.
export LAZARUS_TLS_DIR="$WORK/pki/operator"

echo "== supervisor on 198.18.0.1, agents a (198.18.0.2) and b (198.18.0.3), mutual TLS"
on sup "$L" supervisor --listen $SUP --store "file://$WORK/store" --state-dir "$WORK/sup" --tls "$WORK/pki/sup" 2>"$WORK/sup.log" &
PIDS+=($!)
sleep 0.3
for h in a b; do
    on $h "$L" agent --name $h --supervisor $SUP --iface eth0 --state-dir "$WORK/$h" --tls "$WORK/pki/$h" 2>"$WORK/$h.log" &
    PIDS+=($!)
done
sleep 1
on sup "$L" submit examples/kv-service/job.toml --supervisor $SUP
for _ in $(seq 100); do
    on sup "$L" status --supervisor $SUP --json | grep -q '"standby_checkpoint": [0-9]' && break
    sleep 0.1
done
on sup "$L" status --supervisor $SUP

echo "== client: PUT k1=hello through the VIP (answered once its checkpoint committed)"
on cl bash -c 'exec 3<>/dev/tcp/198.18.0.100/8080; printf "PUT /kv/k1 HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello" >&3; head -1 <&3'
on cl ip neigh show 198.18.0.100

PRIMARY=$(on sup "$L" status --supervisor $SUP --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["workers"][0]["primary"])' 2>/dev/null || echo a)
IP=198.18.0.$([ "$PRIMARY" = a ] && echo 2 || echo 3)
PID=""
for p in /proc/[0-9]*; do
    env=$({ tr '\0' '\n' < "$p/environ"; } 2>/dev/null) || continue
    if grep -qx "LAZARUS_WORKER=kv-0" <<<"$env" && grep -qx "LAZARUS_BIND_IP=$IP" <<<"$env"; then
        PID=${p#/proc/}
        break
    fi
done
echo "== SIGKILL the primary kv-0 on host $PRIMARY (pid $PID)"
kill -9 "$PID"
sleep 0.5
on sup "$L" status --supervisor $SUP
echo "== client: GET k1 through the VIP, now served by the other host"
on cl bash -c 'exec 3<>/dev/tcp/198.18.0.100/8080; printf "GET /kv/k1 HTTP/1.1\r\nConnection: close\r\n\r\n" >&3; cat <&3; echo'
on cl ip neigh show 198.18.0.100
