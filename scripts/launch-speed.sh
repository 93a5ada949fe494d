#!/usr/bin/env bash
# A blockrep launch volume against qemu-nbd serving a raw copy of the same
# image, with fio's own NBD engine (libnbd), in one run, rounds alternating.
#
# Usage: scripts/launch-speed.sh [SIZE_MIB]   (default 512)
#
# Workloads (fio, one job, queue depth 16, direct to the NBD server):
#   randwrite-4k  4 KiB random writes, crc32c verification headers, read back
#                 and checked by fio after the timed part
#   randread-4k   4 KiB random reads of the whole volume (a launch reads what
#                 it has not written from the replica, through the chunk cache)
#   seqread-1m    1 MiB sequential reads of the whole volume
#   seqwrite-1m   1 MiB sequential writes, crc32c verified like randwrite-4k
# Every job has a fixed seed, so both servers receive the same requests; the
# write jobs' data is checked by fio's own verification (crc32c headers read
# back after the timed part), which fails the run on any mismatch.
#
# Fairness: qemu-nbd serves through the page cache (--cache=writeback
# --aio=threads), detect-zeroes off, and both images are read once before
# the first round. blockrep serves its launch over its NBD listener (no TLS,
# loopback), with the default chunk cache and background folding.
#
# Environment: SERVER_ARGS (more flags for `blockrep server`), ROUNDS (3), RUNTIME (seconds per timed job, 10),
# WORKLOADS (some of the four names, space-separated; default all), MIN_RATIO
# (unset: report only; e.g. 0.8: exit 1 when a 4 KiB ratio is below it).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
size_mib=${1:-512}
rounds=${ROUNDS:-3}
runtime=${RUNTIME:-10}
for tool in fio qemu-nbd nbdcopy nbdinfo; do
    command -v "$tool" >/dev/null || {
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio qemu-utils libnbd-bin
        break
    }
done
bin=$(release_binary)
work=$(mktemp -d "${TMPDIR:-/var/tmp}/launch-speed.XXXXXX")
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

$bin cert init --dir "$work/tls" >/dev/null
export BLOCKREP_ADMIN_TOKEN_FILE="$work/tls/admin.token"
$bin cert issue --dir "$work/tls" --source speed >/dev/null
$bin server --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --nbd-listen 127.0.0.1:0 \
    --retention off --data "$work/data" --tls-dir "$work/tls" ${SERVER_ARGS:-} >"$work/server.out" 2>"$work/server.err" &
pids+=($!)
wait_listening "$work/server.out" "$work/server.err"
read -r _ _ addr _ admin _ nbd <"$work/server.out"

# A random image: nothing to compress, nothing to dedup.
head -c "${size_mib}M" /dev/urandom >"$work/disk.raw"
$bin agent --once --disk "$work/disk.raw" --to "$addr" --source speed --tls-dir "$work/tls" >/dev/null 2>&1
$bin snapshot create --admin "$admin" --source speed --name s >/dev/null
$bin launch create --admin "$admin" --source speed --snapshot s --name vol --allow-live >/dev/null
cp "$work/disk.raw" "$work/qemu.raw"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
qemu-nbd -f raw --cache=writeback --aio=threads --detect-zeroes=off --discard=ignore \
    --persistent -b 127.0.0.1 -p "$port" -x vol "$work/qemu.raw" >"$work/qemu.out" 2>&1 &
pids+=($!)
declare -A uri=([ours]="nbd://$nbd/vol" [qemu]="nbd://127.0.0.1:$port/vol")
for side in ours qemu; do
    for _ in $(seq 100); do nbdinfo "${uri[$side]}" >/dev/null 2>&1 && break; sleep 0.1; done
    nbdcopy "${uri[$side]}" null:
done

common=(--ioengine=nbd --iodepth=16 --numjobs=1 --direct=1 --randrepeat=1 --randseed=7
    --output-format=json --group_reporting)
declare -A opts=(
    [randwrite-4k]="--rw=randwrite --bs=4k --size=${size_mib}M --number_ios=$((size_mib * 64)) --verify=crc32c --verify_fatal=1 --do_verify=1"
    [randread-4k]="--rw=randread --bs=4k --size=${size_mib}M --time_based --runtime=$runtime"
    [seqread-1m]="--rw=read --bs=1M --size=${size_mib}M"
    [seqwrite-1m]="--rw=write --bs=1M --size=${size_mib}M --verify=crc32c --verify_fatal=1 --do_verify=1"
)
declare -A unit=([randwrite-4k]=iops [randread-4k]=iops [seqread-1m]=bw [seqwrite-1m]=bw)
declare -A dir=([randwrite-4k]=write [randread-4k]=read [seqread-1m]=read [seqwrite-1m]=write)
read -r -a workloads <<<"${WORKLOADS:-randwrite-4k randread-4k seqread-1m seqwrite-1m}"

run() { # side workload -> appends IOPS or MiB/s to $work/side.workload
    local out
    # shellcheck disable=SC2086 # the options are split into words on purpose
    # In the work directory: fio leaves its verify state files where it runs.
    out=$(cd "$work" && fio --name="$2" "${common[@]}" --uri="${uri[$1]}" ${opts[$2]} 2>"$work/fio.err") || {
        echo "fio $2 on $1 failed:" >&2
        cat "$work/fio.err" >&2
        echo "$out" >&2
        return 1
    }
    printf '%s' "$out" >"$work/fio.json"
    python3 - "${dir[$2]}" "${unit[$2]}" "$work/fio.json" >>"$work/$1.$2" <<'EOF'
import json, sys
text = open(sys.argv[3]).read()
# fio may print notes before its JSON.
job = json.loads(text[text.index("\n{") + 1 if not text.startswith("{") else 0:])["jobs"][0]
if job.get("error"):
    sys.exit(f"fio reported error {job['error']}")
side = job[sys.argv[1]]
print(side["iops"] if sys.argv[2] == "iops" else side["bw_bytes"] / 1048576)
EOF
}
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

echo "fio (NBD engine, qd16), ${size_mib} MiB volume, $rounds alternating rounds"
for round in $(seq "$rounds"); do
    if ((round % 2)); then order=(ours qemu); else order=(qemu ours); fi
    for w in "${workloads[@]}"; do
        for side in "${order[@]}"; do run "$side" "$w"; done
    done
done

status=0
printf '%-13s %14s %14s %8s\n' workload "blockrep" qemu-nbd ratio
for w in "${workloads[@]}"; do
    ours=$(median <"$work/ours.$w")
    qemu=$(median <"$work/qemu.$w")
    ratio=$(echo "$ours / $qemu" | bc -l)
    label=IOPS
    [[ ${unit[$w]} == bw ]] && label=MiB/s
    printf '%-13s %9.0f %-5s%9.0f %-5s%7.2fx\n' "$w" "$ours" $label "$qemu" $label "$ratio"
    if [[ -n ${MIN_RATIO:-} && $w == *-4k ]] && (($(echo "$ratio < $MIN_RATIO" | bc -l))); then status=1; fi
done

# What the writes cost later: folding them into the store (hash, compress,
# store, sync), which the server does once a volume is idle, or when a root
# is needed.
overlay_mib=$(du -sm "$work/data/overlays" 2>/dev/null | cut -f1)
t0=$(date +%s.%N)
folded=$($bin launch fold --admin "$admin" --name vol)
t=$(echo "$(date +%s.%N) - $t0" | bc -l)
printf 'fold of the %s MiB overlay left after the last round: %.2f s (%s)\n' "${overlay_mib:-0}" "$t" "$folded"

# Live materialization: the whole volume copied to a local file (it waits
# for the end), against nbdcopy of qemu-nbd's export to a file, the same
# bytes over the same loopback. Each starts on a clean page cache (`sync`):
# both make their copy durable, and neither should pay for the writeback
# of what the rounds above left dirty (qemu-nbd's writes are never flushed).
sync
t0=$(date +%s.%N)
$bin launch materialize --admin "$admin" --name vol --to vol.raw >/dev/null
t=$(echo "$(date +%s.%N) - $t0" | bc -l)
sync
t0=$(date +%s.%N)
nbdcopy "${uri[qemu]}" "$work/nbdcopy.raw"
sync -f "$work/nbdcopy.raw"
tq=$(echo "$(date +%s.%N) - $t0" | bc -l)
printf 'materialize %s MiB: %.2f s (%.0f MiB/s); nbdcopy from qemu-nbd: %.2f s; ratio %.2fx\n' \
    "$size_mib" "$t" "$(echo "$size_mib / $t" | bc -l)" "$tq" "$(echo "$tq / $t" | bc -l)"
exit "$status"
