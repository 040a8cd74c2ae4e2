# Sourced by the scripts that build Lazarus: makes sure `protoc` (the
# Protocol Buffers compiler) is there, which the etcd client's build needs.
# From Debian's protobuf-compiler as root; otherwise set PROTOC=/path/to/protoc.
ensure_protoc() {
    if [ -n "${PROTOC:-}" ] && [ -x "$PROTOC" ]; then return 0; fi
    if command -v protoc >/dev/null 2>&1; then return 0; fi
    if [ "$(id -u)" != 0 ]; then
        echo "protoc (the Protocol Buffers compiler) is missing: the etcd client's build needs it." >&2
        echo "Install Debian's protobuf-compiler (needs root), or set PROTOC=/path/to/protoc." >&2
        exit 1
    fi
    echo "== installing protoc (Debian protobuf-compiler) for the etcd client's build"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler >/dev/null 2>&1 || {
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler >/dev/null
    }
}
