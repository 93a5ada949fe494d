#!/usr/bin/env bash
# Process kill loop: N SIGKILLs (default 500) of the server or the agent at
# random moments while a writer changes the disk, in a release build. Fails if
# any acknowledged commit is lost or the replica does not converge; prints the
# report line (kills, start-up kills of the server, acknowledged and lost
# commits, recovery p50/p99, seed).
# Usage: scripts/kill-loop.sh [N]   (BLOCKREP_KILL_SEED=0x... repeats a run)
set -euo pipefail
cd "$(dirname "$0")/.."
kills=${1:-500}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# The per-kill lines go to the log; on failure it is printed whole.
if ! BLOCKREP_KILL_LOOP=$kills cargo test --release --test it \
    kill_loop::acknowledged_commits_survive_sigkill_of_server_and_agent -- --nocapture >"$log" 2>&1; then
    cat "$log"
    exit 1
fi
grep -E '^kill loop: [0-9]+ kills \(' "$log"
