#!/usr/bin/env bash
# The main job, on the embedded default store (a local directory):
#
#   bash scripts/run.sh
#
# Until the streaming runtime lands (issue: consistent checkpoints of a
# streaming job), the main job is the storage job: it writes a checkpoint of
# generated state (2 workers, 256 MiB, zstd) to file://target/lazarus-store,
# restores and checks it, keeps it committed, then lists and verifies the
# job's checkpoints. Run it again to add checkpoints; `gc` keeps the newest 3.
set -euo pipefail
cd "$(dirname "$0")/.."
STORE="file://$PWD/target/lazarus-store"
cargo build --release -p lazarus --quiet
LAZARUS=target/release/lazarus
"$LAZARUS" storage bench --store "$STORE" --job demo --size "${SIZE:-256MiB}" --codec zstd --keep
echo
"$LAZARUS" checkpoints list --store "$STORE" --job demo
echo
"$LAZARUS" checkpoints verify --store "$STORE" --job demo
echo
"$LAZARUS" checkpoints gc --store "$STORE" --job demo --keep 3
