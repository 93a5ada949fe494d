#!/usr/bin/env bash
# The full sync's CPU with each end in a process of its own: `blockrep
# agent --once` of a disk to a fresh `blockrep server`, RUNS times, CPU of
# both from /usr/bin/time, and both together per GiB of chunk data sent
# (the agent's raw_bytes_sent: the disk's non-zero chunks); and the same at
# the first commit, the full sync itself, before --once reads the disk again.
#
# Usage: scripts/sync-cpu.sh [RUNS] [DISK]
#   RUNS defaults to 5. Without DISK, a 1 GiB `fs` disk (ext4 filled from
#   /usr) is made first by `blockrep bench --disk-kind fs`.
# Environment: TMPDIR for the work directory (default /var/tmp);
# BLOCKREP_BIN, a blockrep binary to measure instead of building this tree
# (to run two builds in alternation, one run each).
set -euo pipefail
# Paths given are the caller's: resolved before moving to the tree.
disk=${2:+$(realpath "$2")}
given_bin=${BLOCKREP_BIN:+$(realpath "$BLOCKREP_BIN")}
cd "$(dirname "$0")/.."
source scripts/lib.sh

runs=${1:-5}
export TMPDIR=${TMPDIR:-/var/tmp}
command -v /usr/bin/time >/dev/null || { echo "needs /usr/bin/time (Debian: apt-get install time)" >&2; exit 1; }
bin=$(release_binary "$given_bin")

work=$(mktemp -d)
server_pid=
cleanup() {
    [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

if [[ -z $disk ]]; then
    echo "making a 1 GiB fs disk (blockrep bench --disk-kind fs)..." >&2
    "$bin" bench --disk-kind fs --size 1GiB --duration 1s --workdir "$work/bench" >/dev/null 2>"$work/bench.err" ||
        { cat "$work/bench.err" >&2; exit 1; }
    disk=$work/bench/disk.raw
fi
"$bin" cert init --dir "$work/tls" >/dev/null
"$bin" cert issue --dir "$work/tls" --source cpu >/dev/null
cat "$disk" >/dev/null # the page cache warm, as for every run

# CPU seconds (user + system) of a process so far, from /proc (USER_HZ 100).
cpu_of() { awk '{ sub(/.*\) /, ""); print ($12 + $13) / 100 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
now() { date +%s.%N; }

printf '%-4s %10s %10s %10s %10s %14s   %s\n' run "server s" "agent s" "both s" "wall s" "both s / GiB" \
    "to the commit: wall s, both s, both s / GiB"
for run in $(seq "$runs"); do
    rm -rf "$work/data"
    /usr/bin/time -o "$work/server.time" -f '%U %S' "$bin" server --listen 127.0.0.1:0 \
        --admin-listen 127.0.0.1:0 --retention off --data "$work/data" --tls-dir "$work/tls" \
        >"$work/server.out" 2>"$work/server.err" &
    server_pid=$!
    wait_listening "$work/server.out" "$work/server.err"
    addr=$(awk '/^listening on/ { print $3 }' "$work/server.out")
    sync
    started=$(now)
    /usr/bin/time -o "$work/agent.time" -f '%U %S %e' "$bin" agent --once --disk "$disk" \
        --to "$addr" --source cpu --tls-dir "$work/tls" >"$work/agent.out" 2>"$work/agent.err" &
    agent_time_pid=$!
    # The full sync ends at its first commit; --once then reads the disk once
    # more to see that it did not change. Both processes' CPU is read when the
    # agent prints that commit (polled every 5 ms).
    agent_pid= committed=
    while kill -0 "$agent_time_pid" 2>/dev/null; do
        [[ -n $agent_pid ]] || agent_pid=$(pgrep -P "$agent_time_pid" || true)
        if [[ -n $agent_pid ]] && grep -q '^epoch 1 committed' "$work/agent.out"; then
            committed="$(now) $(cpu_of "$(pgrep -P "$server_pid")") $(cpu_of "$agent_pid")"
            break
        fi
        sleep 0.005
    done
    wait "$agent_time_pid" || { cat "$work/agent.err" >&2; exit 1; }
    # /usr/bin/time waits for the server, which stops cleanly on SIGINT.
    pkill -INT -P "$server_pid" || true
    wait "$server_pid" || true
    server_pid=
    sent=$(grep -o ' raw_bytes_sent=[0-9]*' "$work/agent.out" | awk -F= '{ s += $2 } END { print s + 0 }')
    read -r su ss <"$work/server.time"
    read -r au as aw <"$work/agent.time"
    read -r ct cs ca <<<"${committed:-0 0 0}"
    awk -v r="$run" -v su="$su" -v ss="$ss" -v au="$au" -v as="$as" -v aw="$aw" -v sent="$sent" \
        -v started="$started" -v ct="$ct" -v cs="$cs" -v ca="$ca" 'BEGIN {
        s = su + ss; a = au + as; gib = sent / 1073741824
        printf "%-4s %10.2f %10.2f %10.2f %10.2f %14.2f", r, s, a, s + a, aw, (s + a) / gib
        if (ct > 0) printf "   %.2f, %.2f, %.2f", ct - started, cs + ca, (cs + ca) / gib
        printf "\n"
    }'
done
