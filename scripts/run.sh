#!/usr/bin/env bash
# The main job: exactly-once word count with checkpoints, on the embedded
# default store (a local directory).
#
#   bash scripts/run.sh                 # 2,000,000 words
#   WORDS=20000000 bash scripts/run.sh  # bigger
#   CHAOS=500ms bash scripts/run.sh     # SIGKILL a random worker about every 500 ms
#
# It builds the lazarus binary and the wordcount worker (release), generates
# a corpus, runs the job to the end (source -> tokenizer x2 -> counter x2 ->
# transactional file sink x2, checkpoints every 250 ms), checks the output
# against an independent count, and lists and verifies the checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/protoc.sh
ensure_protoc
cargo build --release --quiet -p lazarus -p wordcount
BIN=target/release
DIR=target/wordcount
rm -rf "$DIR/output" "$DIR/state"
mkdir -p "$DIR"
"$BIN/wordcount" generate "${WORDS:-2000000}" "$DIR/input.txt"
chaos=()
if [ -n "${CHAOS:-}" ]; then chaos=(--chaos-kill-every "$CHAOS"); fi
"$BIN/lazarus" run examples/wordcount/job.toml \
    --set input="$DIR/input.txt" --set output="$DIR/output" \
    --state-dir "$DIR/state" "${chaos[@]}"
STORE="file://$PWD/$DIR/state/store"
echo
echo "== output check: every word w seen N times must appear as lines 'w 1' ... 'w N', each once"
"$BIN/wordcount" check "$DIR/input.txt" "$DIR/output"
echo
"$BIN/lazarus" checkpoints list --store "$STORE" --job wordcount
"$BIN/lazarus" checkpoints verify --store "$STORE" --job wordcount
