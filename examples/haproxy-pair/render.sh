#!/usr/bin/env bash
# Renders the example's configs for your hosts into OUT (default ./out):
# haproxy.cfg, lb.toml and api-1.toml .. api-N.toml, ready for
# `lazarus submit`. Settings come from the environment:
#
#   VIP=198.18.0.100/24        the service address clients use
#   LB_HOSTS="lb1 lb2"         the agents that run HAProxy (active-passive)
#   BACKENDS="be1=198.18.0.4 be2=198.18.0.5 be3=198.18.0.6"
#                              agent name = address of each API server
#   DB="host=198.18.0.7 user=postgres dbname=postgres"
#   API=/usr/local/lib/lazarus/workers/employees-api
#   HAPROXY=/usr/sbin/haproxy  NOTIFY=/usr/local/bin/lazarus-notify
#   CFG_DIR=/etc/haproxy       where haproxy.cfg will be on the LB hosts
#   PORT=80  API_PORT=8000
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-out}"
: "${VIP:?set VIP}" "${LB_HOSTS:?set LB_HOSTS}" "${BACKENDS:?set BACKENDS}" "${DB:?set DB}" "${API:?set API}"
HAPROXY="${HAPROXY:-/usr/sbin/haproxy}"
NOTIFY="${NOTIFY:-/usr/local/bin/lazarus-notify}"
CFG_DIR="${CFG_DIR:-/etc/haproxy}"
PORT="${PORT:-80}"
API_PORT="${API_PORT:-8000}"
mkdir -p "$out"

servers=""
i=0
for b in $BACKENDS; do
    i=$((i + 1))
    addr="${b#*=}"
    servers+="    server api$i $addr:$API_PORT check"$'\n'
done
sed -e "s|@PORT@|$PORT|" -e '/@SERVERS@/d' "$here/haproxy.cfg.in" >"$out/haproxy.cfg"
printf '%s' "$servers" >>"$out/haproxy.cfg"

hosts=""
for h in $LB_HOSTS; do hosts+="${hosts:+, }\"$h\""; done
sed -e "s|@NOTIFY@|$NOTIFY|g" -e "s|@VIP@|$VIP|" -e "s|@PORT@|$PORT|" \
    -e "s|@LB_HOSTS@|$hosts|" -e "s|@HAPROXY@|$HAPROXY|" \
    -e "s|@HAPROXY_CFG@|$CFG_DIR/haproxy.cfg|" "$here/lb.toml.in" >"$out/lb.toml"

i=0
for b in $BACKENDS; do
    i=$((i + 1))
    sed -e "s|@N@|$i|g" -e "s|@HOST@|${b%%=*}|" -e "s|@API_PORT@|$API_PORT|g" \
        -e "s|@DB@|$DB|" -e "s|@API@|$API|" "$here/api.toml.in" >"$out/api-$i.toml"
done
if grep -l '@[A-Z_]*@' "$out"/* >/dev/null; then
    echo "render.sh: a placeholder was left in $(grep -l '@[A-Z_]*@' "$out"/*)" >&2
    exit 1
fi
echo "rendered into $out: $(ls "$out" | tr '\n' ' ')"
