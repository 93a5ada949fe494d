#!/usr/bin/env bash
# blockrep next to rsync on the same disk (synthetic, dense or a real file system) and the same seeded change,
# in one run, with one pass of b3sum over the disk as the floor of a rescan.
#
# Usage: scripts/compare.sh [--disk-kind synthetic|dense|fs] [SIZE]
#   SIZE like 1GiB (default), 256MiB, 2GiB. The disk (as `blockrep bench
#   --disk-kind`): `synthetic` (default) the seeded mix of holes, text, records,
#   random bytes and duplicated extents; `dense` the same without holes; `fs`
#   an ext4 file system filled to 70% from this machine's files under /usr
#   (mke2fs -d), as real disks are.
# Environment: SEED (default 1) picks the disk and the change; CHANGE_PERCENT
# (default 1) is the share of 4 KiB blocks rewritten; TMPDIR is where the work
# directory goes (default /var/tmp: it needs about 5x SIZE of disk, not RAM);
# BLOCKREP_BIN is a blockrep binary to compare instead of building this tree.
#
# Everything runs on 127.0.0.1 with ephemeral ports. blockrep goes through mutual
# TLS, verifies every chunk and fsyncs before acknowledging; rsync talks to its
# own daemon without encryption and does not fsync. Beside them, the floor of
# blockrep's full sync: the CPU of its mandatory work (blake3 on both ends,
# AES-GCM both ways, loopback TCP, page-cache writes), each part measured alone
# over the bytes of this run, divided by the cores. Installs rsync, iperf3,
# openssl and time (apt-get) and b3sum (cargo install) when missing, and
# builds blockrep in release.
set -euo pipefail
# A binary given is the caller's path: resolved before moving to the tree.
given_bin=${BLOCKREP_BIN:+$(realpath "$BLOCKREP_BIN")}
cd "$(dirname "$0")/.."
source scripts/lib.sh

disk_kind=synthetic
if [[ ${1:-} == --disk-kind ]]; then
    disk_kind=${2:?--disk-kind needs synthetic, dense or fs}
    shift 2
fi
case $disk_kind in
    synthetic | dense | fs) ;;
    *) echo "unknown --disk-kind $disk_kind: use synthetic, dense or fs" >&2; exit 2 ;;
esac
size_arg=${1:-1GiB}
seed=${SEED:-1}
change_percent=${CHANGE_PERCENT:-1}

size_bytes=$(python3 - "$size_arg" <<'EOF'
import re, sys
m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", sys.argv[1], re.IGNORECASE)
if not m:
    sys.exit(f"cannot parse size {sys.argv[1]!r}: use e.g. 1GiB or 256MiB")
shift = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()]
print(int(m.group(1)) << shift)
EOF
)
(( size_bytes >= 1048576 )) || { echo "SIZE must be at least 1MiB" >&2; exit 2; }

# Tools, each installed only when absent: b3sum from crates.io; rsync and the
# floor's tools (see below) from the distribution, each with its package.
export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"
if ! command -v b3sum >/dev/null; then
    echo "installing b3sum..." >&2
    cargo install --locked --quiet b3sum
fi
for tool in rsync:rsync iperf3:iperf3 openssl:openssl /usr/bin/time:time; do
    if ! command -v "${tool%%:*}" >/dev/null; then
        echo "installing ${tool#*:}..." >&2
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${tool#*:}" >/dev/null
    fi
done
bin=$(release_binary "$given_bin")

work=$(mktemp -d "${TMPDIR:-/var/tmp}/blockrep-compare.XXXXXX")
server_pid=
rsyncd_pid=
iperf_pid=
cleanup() {
    [[ -n $iperf_pid ]] && kill "$iperf_pid" 2>/dev/null || true
    [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null || true
    [[ -n $rsyncd_pid ]] && kill "$rsyncd_pid" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
disk=$work/disk.raw

now() { date +%s.%N; }
seconds_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "n/a" }'; }
mib() { awk -v a="$1" 'BEGIN { printf "%.1f", a / 1048576 }'; }

# The disk: 1 MiB extents, each a hole, text-like, structured records, random,
# or a copy of an earlier extent, in the shares `blockrep bench` uses (its
# generator is internal to the binary, so this is a seeded equivalent).
echo "making a $size_arg $disk_kind disk (seed $seed)..." >&2
if [[ $disk_kind == fs ]]; then
    # Files of /usr in path order, hard-linked (or copied) into a staging
    # directory until their blocks fill 70% of the disk, then mke2fs -d.
    python3 - "$work/files" "$size_bytes" <<'EOF'
import os, shutil, sys
staging, size = sys.argv[1], int(sys.argv[2])
budget, used, BLOCK = size * 70 // 100, 0, 4096
for root, dirs, files in os.walk("/usr"):
    dirs.sort()
    for name in sorted(files):
        src = os.path.join(root, name)
        if os.path.islink(src) or not os.path.isfile(src):
            continue
        length = os.path.getsize(src)
        if length > budget // 8:
            continue
        dst = os.path.join(staging, os.path.relpath(src, "/usr"))
        parent = os.path.dirname(dst)
        takes = -(-length // BLOCK) * BLOCK + (0 if os.path.isdir(parent) else BLOCK)
        if used + takes > budget:
            continue
        os.makedirs(parent, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            try:
                shutil.copyfile(src, dst)
            except OSError:
                continue
        used += takes
EOF
    truncate -s "$size_bytes" "$disk"
    mke2fs -q -F -t ext4 -b 4096 -E root_owner=0:0 -d "$work/files" "$disk"
    rm -rf "$work/files"
    sync "$disk"
else
python3 - "$disk" "$size_bytes" "$seed" "$disk_kind" <<'EOF'
import os, random, struct, sys

path, size, seed, dense = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "dense"
EXTENT = 1 << 20
LAYOUT = [("zero", 30), ("text", 25), ("structured", 15), ("random", 20), ("duplicate", 10)]
WORDS = [w.encode() for w in "block replica epoch kernel inode journal the of disk write "
         "sector commit server agent root page".split()]
RECORD_TAIL = bytes((i ^ 0x5A) for i in range(8, 64))
rng = random.Random(seed)

def kind_of(roll):
    acc = 0
    for kind, share in LAYOUT:
        acc += share
        if roll < acc:
            return kind
    return "random"

with open(path, "w+b") as f:
    f.truncate(size)
    fd = f.fileno()
    written = []
    offset = 0
    while offset < size:
        n = min(EXTENT, size - offset)
        # A dense disk rolls past the zero band (the layout's first).
        kind = kind_of(30 + rng.randrange(70) if dense else rng.randrange(100))
        if kind == "zero":
            offset += n  # a hole
            continue
        if kind == "text":
            data = b""
            while len(data) < n:
                data += b" ".join(rng.choices(WORDS, k=n // 4)) + b" "
            data = data[:n]
        elif kind == "structured":
            first = offset // 64
            records = []
            for r in range(n // 64):
                record = struct.pack("<Q", first + r) + RECORD_TAIL
                if rng.randrange(4) == 0:
                    record = record[:8] + bytes([rng.randrange(256)]) + record[9:]
                records.append(record)
            data = b"".join(records).ljust(n, b"\x5a")
        elif kind == "duplicate" and written:
            data = os.pread(fd, n, rng.choice(written))
        else:
            data = rng.randbytes(n)
        os.pwrite(fd, data, offset)
        if n == EXTENT:
            written.append(offset)
        offset += n
    os.fsync(fd)
EOF
fi

# The change: CHANGE_PERCENT of the 4 KiB blocks rewritten with random bytes at
# random positions (seeded, so every tool sees the same change).
change_disk() {
    python3 - "$disk" "$change_percent" "$seed" <<'EOF'
import os, random, sys
path, percent, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
blocks = os.path.getsize(path) // 4096
count = round(blocks * percent / 100)
rng = random.Random(seed ^ 0xC0FFEE00)
fd = os.open(path, os.O_WRONLY)
for _ in range(count):
    data = rng.randbytes(4096)
    os.pwrite(fd, data, rng.randrange(blocks) * 4096)
os.fsync(fd)
os.close(fd)
print(count)
EOF
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Writes from one phase must not be flushed on the next phase's clock.
settle() { sync; }

# blockrep: certificates, a server on ephemeral ports, one agent run per sync.
"$bin" cert init --dir "$work/tls" >/dev/null
"$bin" cert issue --dir "$work/tls" --source cmp >/dev/null
"$bin" cert issue --dir "$work/tls" --source cmp-whole >/dev/null
"$bin" server --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --retention off \
    --data "$work/data" --tls-dir "$work/tls" >"$work/server.out" 2>"$work/server.err" &
server_pid=$!
wait_listening "$work/server.out" "$work/server.err"
addr=$(awk '/^listening on/ { print $3 }' "$work/server.out")

# agent_sync NAME [SOURCE [ARGS...]]: one `agent --once` run, output kept as NAME.
agent_sync() {
    local name=$1 source=${2:-cmp}
    shift $(( $# < 2 ? $# : 2 ))
    "$bin" agent --once --disk "$disk" --to "$addr" --source "$source" --tls-dir "$work/tls" "$@" \
        >"$work/agent-$name.out" 2>"$work/agent-$name.err"
}
# agent_sync_to_commit NAME: agent_sync NAME, and the moment (now) its first
# epoch committed, in $committed_at: the copy itself ends there, and --once
# then reads the disk once more to see that it did not change. Polled every 5 ms.
agent_sync_to_commit() {
    committed_at=
    agent_sync "$@" &
    local pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        if grep -q '^epoch 1 committed' "$work/agent-$1.out" 2>/dev/null; then
            committed_at=$(now)
            break
        fi
        sleep 0.005
    done
    wait "$pid"
    # An agent that ended between two polls committed by now at the latest.
    [[ -n $committed_at ]] || committed_at=$(now)
}
agent_bytes() { grep -o ' bytes_sent=[0-9]*' "$work/agent-$1.out" | awk -F= '{ s += $2 } END { print s + 0 }'; }

# rsync: its daemon on 127.0.0.1, a module over a directory of the work dir.
mkdir -p "$work/rsync"
rsync_port=$(free_port)
cat >"$work/rsyncd.conf" <<EOF
pid file = $work/rsyncd.pid
use chroot = no
[cmp]
    path = $work/rsync
    read only = no
    uid = 0
    gid = 0
EOF
rsync --daemon --no-detach --address 127.0.0.1 --port "$rsync_port" --config "$work/rsyncd.conf" \
    2>"$work/rsyncd.err" &
rsyncd_pid=$!
for _ in $(seq 100); do rsync "rsync://127.0.0.1:$rsync_port/" >/dev/null 2>&1 && break; sleep 0.1; done
module=rsync://127.0.0.1:$rsync_port/cmp
# --ignore-times: the change lands within a second of the full copy, and rsync's
# quick check (size and whole-second mtime) would then skip the file unread.
rsync_to() {
    local name=$1
    shift
    rsync --inplace --ignore-times --stats "$@" "$disk" "$module/$name" >"$work/rsync-$name.out"
}
rsync_bytes() { awk -F': ' '/^Total bytes sent/ { gsub(/,/, "", $2); print $2 + 0 }' "$work/rsync-$1.out"; }

settle
echo "full sync: blockrep..." >&2
t=$(now); agent_sync_to_commit full; blockrep_full=$(seconds_since "$t")
blockrep_commit=$(awk -v a="$t" -v b="$committed_at" 'BEGIN { printf "%.3f", b - a }')
blockrep_full_bytes=$(agent_bytes full)
# A second replica of the same disk that takes every delta as whole changed
# chunks (--no-patches), to compare with patches over the same change.
agent_sync full-whole cmp-whole --no-patches
settle
echo "full copy: rsync..." >&2
t=$(now); rsync_to a.raw; rsync_full=$(seconds_since "$t")
rsync_full_bytes=$(rsync_bytes a.raw)
# A second basis in the same pre-change state, for the run with 4 KiB blocks.
cp "$work/rsync/a.raw" "$work/rsync/b.raw"
settle

blocks_changed=$(change_disk)
settle
echo "delta after $blocks_changed changed blocks: blockrep..." >&2
t=$(now); agent_sync delta; blockrep_delta=$(seconds_since "$t")
blockrep_delta_bytes=$(agent_bytes delta)
settle
echo "delta: blockrep --no-patches..." >&2
t=$(now); agent_sync delta-whole cmp-whole --no-patches; blockrep_delta_whole=$(seconds_since "$t")
blockrep_delta_whole_bytes=$(agent_bytes delta-whole)
settle
echo "delta: rsync (default block size)..." >&2
t=$(now); rsync_to a.raw --no-whole-file; rsync_delta=$(seconds_since "$t")
rsync_delta_bytes=$(rsync_bytes a.raw)
settle
echo "delta: rsync -B 4096..." >&2
t=$(now); rsync_to b.raw --no-whole-file -B 4096; rsync_delta_4k=$(seconds_since "$t")
rsync_delta_4k_bytes=$(rsync_bytes b.raw)
settle

# The floor of a rescan: one blake3 pass over the (cached) disk. Best of three,
# since it is short enough for process start-up to show.
b3sum --num-threads 2 "$disk" >/dev/null
b3sum_best=
for _ in 1 2 3; do
    t=$(now); b3sum --num-threads 2 "$disk" >/dev/null; s=$(seconds_since "$t")
    b3sum_best=$(awk -v a="$s" -v b="${b3sum_best:-$s}" 'BEGIN { print (a < b) ? a : b }')
done

# The floor of the full sync's work on this machine: the CPU its mandatory
# parts cost when each is measured alone (once, each in its fastest form:
# AES-GCM in cache, TCP with large writes), over the bytes this run moved,
# spread over every core with no overhead at all. No tool that hashes
# every chunk on both ends (blake3, one thread each, as b3sum), encrypts and
# decrypts them (AES-128-GCM, as `openssl speed`), moves them over loopback TCP
# (iperf3, both ends) and writes them into the page cache (dd) can finish a
# full sync faster; fsync, framing and start-up come on top. CPU is counted in
# 10 ms ticks: the floor means something from a few hundred MiB up.
echo "the floor: blake3, AES-GCM, loopback TCP and page-cache writes alone..." >&2
raw_bytes=$(grep -o ' raw_bytes_sent=[0-9]*' "$work/agent-full.out" | awk -F= '{ s += $2 } END { print s + 0 }')
cpu_seconds() { awk '{ printf "%.3f", $1 + $2 }' "$1"; }
/usr/bin/time -o "$work/b3.time" -f '%U %S' b3sum --num-threads 1 "$disk" >/dev/null
floor_blake3=$(awk -v c="$(cpu_seconds "$work/b3.time")" -v raw="$raw_bytes" -v size="$size_bytes" \
    'BEGIN { printf "%.3f", 2 * c * raw / size }')
# `openssl speed` prints thousands of bytes a second ("6541942.78k"); the
# cipher's name is upper case in OpenSSL 3, lower case before.
aes_rate=$(openssl speed -seconds 1 -bytes 16384 -evp aes-128-gcm 2>"$work/openssl.err" |
    awk 'toupper($1) == "AES-128-GCM" { sub(/k$/, "", $2); print $2 * 1000 }') || true
[[ -n $aes_rate ]] || { echo "cannot read the AES-GCM rate from openssl speed:" >&2; cat "$work/openssl.err" >&2; exit 1; }
floor_aes=$(awk -v wire="$blockrep_full_bytes" -v rate="$aes_rate" 'BEGIN { printf "%.3f", 2 * wire / rate }')
iperf_port=$(free_port)
iperf3 --server --one-off --bind 127.0.0.1 --port "$iperf_port" >/dev/null 2>&1 &
iperf_pid=$!
iperf_ok=
for _ in $(seq 50); do
    if iperf3 --client 127.0.0.1 --port "$iperf_port" --bytes "$blockrep_full_bytes" --length 128K --json \
        >"$work/iperf.json" 2>/dev/null; then
        iperf_ok=1
        break
    fi
    sleep 0.1
done
kill "$iperf_pid" 2>/dev/null || true
wait "$iperf_pid" 2>/dev/null || true
iperf_pid=
# A failed client still writes JSON (with an "error" key): its status decides.
[[ -n $iperf_ok ]] || { echo "iperf3 did not measure loopback TCP:" >&2; cat "$work/iperf.json" >&2; exit 1; }
floor_tcp=$(python3 -c '
import json, sys
end = json.load(open(sys.argv[1]))["end"]
cpu = end["cpu_utilization_percent"]
print("%.3f" % ((cpu["host_total"] + cpu["remote_total"]) / 100 * end["sum_sent"]["seconds"]))
' "$work/iperf.json")
/usr/bin/time -o "$work/dd.time" -f '%U %S' dd if=/dev/zero of="$work/floor-write" bs=1M \
    count=$(((blockrep_full_bytes + 1048575) / 1048576)) status=none
floor_write=$(cpu_seconds "$work/dd.time")
rm -f "$work/floor-write"
floor_cpu=$(awk -v a="$floor_blake3" -v b="$floor_aes" -v c="$floor_tcp" -v d="$floor_write" \
    'BEGIN { printf "%.3f", a + b + c + d }')
floor=$(awk -v cpu="$floor_cpu" -v cores="$(nproc)" 'BEGIN { printf "%.3f", cpu / cores }')

"$bin" export --data "$work/data" --source cmp --out "$work/export.raw" >/dev/null
verified=ok
cmp "$disk" "$work/export.raw" || verified=FAILED
"$bin" export --data "$work/data" --source cmp-whole --out "$work/export.raw" >/dev/null
cmp "$disk" "$work/export.raw" || verified=FAILED
cmp "$disk" "$work/rsync/a.raw" || verified=FAILED
cmp "$disk" "$work/rsync/b.raw" || verified=FAILED

row() { printf '  %-46s %9s %12s\n' "$@"; }
echo "compare: $size_arg $disk_kind disk ($(mib "$size_bytes") MiB), seed $seed, $blocks_changed of $((size_bytes / 4096)) 4 KiB blocks changed, $(nproc) cores"
row "" "seconds" "wire MiB"
row "blockrep full (mTLS, verified, fsync)" "$blockrep_full" "$(mib "$blockrep_full_bytes")"
row "rsync full (--inplace, daemon, no fsync)" "$rsync_full" "$(mib "$rsync_full_bytes")"
row "  blockrep / rsync" "$(ratio "$blockrep_full" "$rsync_full")" ""
row "blockrep full, to its first commit (the copy)" "$blockrep_commit" ""
row "  blockrep to the commit / rsync" "$(ratio "$blockrep_commit" "$rsync_full")" ""
changed_bytes=$((blocks_changed * 4096))
row "changed by the delta (4 KiB blocks)" "" "$(mib "$changed_bytes")"
row "blockrep delta (patches)" "$blockrep_delta" "$(mib "$blockrep_delta_bytes")"
row "  wire / changed" "" "$(ratio "$blockrep_delta_bytes" "$changed_bytes")"
row "blockrep delta --no-patches (whole chunks)" "$blockrep_delta_whole" "$(mib "$blockrep_delta_whole_bytes")"
row "  wire / changed" "" "$(ratio "$blockrep_delta_whole_bytes" "$changed_bytes")"
row "rsync delta (--no-whole-file, default -B)" "$rsync_delta" "$(mib "$rsync_delta_bytes")"
row "rsync delta (--no-whole-file -B 4096)" "$rsync_delta_4k" "$(mib "$rsync_delta_4k_bytes")"
row "  blockrep / rsync default" "$(ratio "$blockrep_delta" "$rsync_delta")" ""
row "  blockrep / rsync -B 4096" "$(ratio "$blockrep_delta" "$rsync_delta_4k")" ""
row "  rsync -B 4096 wire / changed" "" "$(ratio "$rsync_delta_4k_bytes" "$changed_bytes")"
row "b3sum --num-threads 2 (rescan floor, best of 3)" "$b3sum_best" ""
row "  blockrep delta / b3sum" "$(ratio "$blockrep_delta" "$b3sum_best")" ""
row "floor of the full sync on $(nproc) cores (below)" "$floor" ""
row "  blockrep to the commit / floor" "$(ratio "$blockrep_commit" "$floor")" ""
row "  floor / rsync" "$(ratio "$floor" "$rsync_full")" ""
echo "  the floor: CPU s of blake3 on both ends $floor_blake3, AES-128-GCM both ways $floor_aes,"
echo "    loopback TCP $floor_tcp, page-cache writes $floor_write; $floor_cpu in all, over $(nproc) cores"
echo "  replicas equal to the disk (both blockrep exports, both rsync copies): $verified"
# A virtual machine whose balloon device reports free pages (virtio feature
# bit 5) hands freed memory back to its host, and the first write into each
# such page then faults in the host: writes into the page cache cost several
# times their usual CPU, for both tools, and by how much varies from run to
# run (docs/performance.md, "Free page reporting"). An order above the
# kernel's largest (10) reports nothing.
order=$(cat /sys/module/page_reporting/parameters/page_reporting_order 2>/dev/null || echo 99)
for features in /sys/bus/virtio/drivers/virtio_balloon/virtio*/features; do
    if [[ -r $features && $(cut -c6 "$features") == 1 ]] && ((order <= 10)); then
        echo "  note: this machine reports free pages to its host; the figures vary with it (docs/performance.md)"
        break
    fi
done
[[ $verified == ok ]]
