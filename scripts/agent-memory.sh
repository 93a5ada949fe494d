#!/usr/bin/env bash
# Peak resident memory of the agent during an initial sync of a SIZE (default
# 4GiB) random image, against the budget of 64 MiB + 40 bytes per chunk.
# Usage: scripts/agent-memory.sh [SIZE_GIB]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
size_gib=${1:-4}
bin=$(release_binary)
work=$(mktemp -d)
trap 'kill $server_pid 2>/dev/null || true; rm -rf "$work"' EXIT
head -c "${size_gib}G" /dev/urandom > "$work/disk.raw"
$bin cert init --dir "$work/tls" >/dev/null
$bin cert issue --dir "$work/tls" --source mem >/dev/null
$bin server --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --data "$work/data" --tls-dir "$work/tls" \
    >"$work/server.out" 2>"$work/server.err" &
server_pid=$!
wait_listening "$work/server.out" "$work/server.err"
addr=$(awk '/^listening on/ {print $3}' "$work/server.out")
/usr/bin/time -v "$bin" agent --once --disk "$work/disk.raw" --to "$addr" --source mem --tls-dir "$work/tls" \
    >"$work/agent.out" 2>"$work/agent.err"
peak_kib=$(awk -F: '/Maximum resident set size/ {gsub(/ /, "", $2); print $2}' "$work/agent.err")
wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$work/agent.err")
chunks=$(( size_gib * 1024 * 1024 / 64 ))
budget_kib=$(( 64 * 1024 + chunks * 40 / 1024 ))
echo "initial sync of ${size_gib} GiB: wall ${wall}, agent peak RSS ${peak_kib} KiB, budget ${budget_kib} KiB (64 MiB + 40 B x ${chunks} chunks)"
(( peak_kib <= budget_kib )) && echo "within budget" || { echo "OVER BUDGET"; exit 1; }
