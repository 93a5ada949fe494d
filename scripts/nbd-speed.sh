#!/usr/bin/env bash
# Sequential nbdcopy of a launch volume served by blockrep against nbdcopy of the
# same image served by qemu-nbd, and snapshot creation time on a small and a
# large replica (constant time: a snapshot only references a root).
# Usage: scripts/nbd-speed.sh [SIZE_GIB]   (default 1; the large replica is 4x)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
size_gib=${1:-1}
for tool in nbdcopy qemu-nbd; do
    command -v "$tool" >/dev/null || { apt-get update -qq && apt-get install -y -qq libnbd-bin qemu-utils; break; }
done
bin=$(release_binary)
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
now() { date +%s.%N; }
elapsed() { echo "$(now) - $1" | bc -l; }

$bin cert init --dir "$work/tls" >/dev/null
# Admin commands below send this server's token.
export BLOCKREP_ADMIN_TOKEN_FILE="$work/tls/admin.token"
for s in speed small large; do $bin cert issue --dir "$work/tls" --source $s >/dev/null; done
$bin server --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --nbd-listen 127.0.0.1:0 --retention off \
    --data "$work/data" --tls-dir "$work/tls" >"$work/server.out" 2>"$work/server.err" &
pids+=($!)
wait_listening "$work/server.out" "$work/server.err"
read -r _ _ addr _ admin _ nbd < "$work/server.out"

# A mostly-random image with some zero regions, replicated, snapshotted, launched.
head -c "$((size_gib * 768))M" /dev/urandom > "$work/disk.raw"
truncate -s "${size_gib}G" "$work/disk.raw"
$bin agent --once --disk "$work/disk.raw" --to "$addr" --source speed --tls-dir "$work/tls" >/dev/null 2>&1
$bin snapshot create --admin "$admin" --source speed --name s >/dev/null
# The agent read the disk live: its snapshot is labelled live (nothing writes it here).
$bin launch create --admin "$admin" --source speed --snapshot s --name vol --allow-live >/dev/null

best() { # best of 3 wall-clock seconds of a command
    local b=999999
    for _ in 1 2 3; do
        local t0; t0=$(now); "$@" >/dev/null 2>&1; local t; t=$(elapsed "$t0")
        b=$(echo "if ($t < $b) $t else $b" | bc -l)
    done
    echo "$b"
}
t_blockrep=$(best nbdcopy "nbd://$nbd/vol" null:)
# qemu-nbd does not report an ephemeral port: take one that is free now.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
qemu-nbd -f raw -r -b 127.0.0.1 -p "$port" -x vol --persistent "$work/disk.raw" >"$work/qemu.out" 2>&1 &
pids+=($!)
for _ in $(seq 50); do nbdinfo "nbd://127.0.0.1:$port/vol" >/dev/null 2>&1 && break; sleep 0.1; done
t_qemu=$(best nbdcopy "nbd://127.0.0.1:$port/vol" null:)
echo "sequential nbdcopy of a ${size_gib} GiB volume (best of 3):"
printf '  blockrep launch volume   %8.3f s  %7.0f MiB/s\n' "$t_blockrep" "$(echo "$size_gib * 1024 / $t_blockrep" | bc -l)"
printf '  qemu-nbd on the raw image %7.3f s  %7.0f MiB/s\n' "$t_qemu" "$(echo "$size_gib * 1024 / $t_qemu" | bc -l)"
printf '  blockrep / qemu-nbd throughput: %.2f\n' "$(echo "$t_qemu / $t_blockrep" | bc -l)"

# Snapshot creation on a 64 MiB and a (4 x SIZE) GiB replica.
head -c 64M /dev/urandom > "$work/small.raw"
truncate -s "$((size_gib * 4))G" "$work/large.raw"
head -c 512M /dev/urandom | dd of="$work/large.raw" conv=notrunc status=none
$bin agent --once --disk "$work/small.raw" --to "$addr" --source small --tls-dir "$work/tls" >/dev/null 2>&1
$bin agent --once --disk "$work/large.raw" --to "$addr" --source large --tls-dir "$work/tls" >/dev/null 2>&1
for s in small large; do
    t=$(best "$bin" snapshot create --admin "$admin" --source $s)
    echo "  snapshot create on the $s replica: $t s (CLI process included, best of 3)"
done
