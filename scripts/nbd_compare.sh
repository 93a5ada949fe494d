#!/usr/bin/env bash
# qemu-img bench through an NBD server under test against qemu-nbd serving a copy
# of the same raw image, side by side in one run, runs alternating, and the
# ratio of each workload's median.
#
# Usage: scripts/nbd_compare.sh [SIZE_MIB]   (default 1024)
#
# Workloads (qemu-img bench, one connection, 16 requests in flight):
#   randwrite-4k  4 KiB writes, offsets strided over the whole image (below)
#   randread-4k   4 KiB reads, same offsets
#   seqwrite-1m   1 MiB writes from offset 0, wrapping at the end of the image
# qemu-img bench has no random mode: it adds -S to the offset after each request
# and wraps at the image's size. A step of 4096 * ODD_BLOCKS (odd, about 0.62 of
# the image's blocks) visits every 4 KiB block once per pass, consecutive
# requests landing far apart: a random-looking walk with nothing to coalesce.
#
# Fairness: both servers serve the same bytes (a random image and an identical
# copy), both through the page cache (qemu-nbd --cache=writeback --aio=threads,
# the plain example server's pread/pwrite), both make a flush an fdatasync,
# detect-zeroes off, and both images are read once beforehand so that neither
# starts cold. The client is the same qemu-img with the same options
# (-f raw -t none: no cache in the client; writes carry a pattern, not zeroes).
# Each round runs every workload on ours then qemu-nbd's, or the other way
# round on odd rounds, so drift (page-cache writeback, other load) hits both.
#
# The server under test: SERVE_CMD, a command line in which {image}, {socket}
# and {name} are replaced; it must serve nbd+unix:///{name}?socket={socket}
# until SIGTERM. Default: this crate's plain file server,
#   target/release/examples/serve_file {image} {socket} {name}
# e.g. SERVE_CMD='target/release/blockrep agent --disk {image} --serve unix:{socket} ...'
# (NAME must then be the export's name, its source id; the empty name works too.)
#
# Environment: SERVE_CMD, NAME (default disk), ROUNDS (5), COUNT_4K (100000),
# COUNT_1M (2048), DEPTH (16), MIN_RATIO (unset: report only; set, e.g. 0.8:
# exit 1 when any ratio is below it), TMPDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-1024}
name=${NAME:-disk}
rounds=${ROUNDS:-5}
count_4k=${COUNT_4K:-100000}
count_1m=${COUNT_1M:-2048}
depth=${DEPTH:-16}
for tool in qemu-img qemu-nbd; do
    command -v "$tool" >/dev/null || { apt-get update -qq && apt-get install -y -qq qemu-utils; break; }
done
if [[ -z ${SERVE_CMD:-} ]]; then
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
    cargo build --release --quiet -p blockrep-nbd --example serve_file
    SERVE_CMD="$CARGO_TARGET_DIR/release/examples/serve_file {image} {socket} {name}"
fi
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

head -c "${size_mib}M" /dev/urandom >"$work/ours.raw"
cp "$work/ours.raw" "$work/qemu.raw"
cat "$work/ours.raw" "$work/qemu.raw" >/dev/null

cmd=${SERVE_CMD//\{image\}/$work/ours.raw}
cmd=${cmd//\{socket\}/$work/ours.sock}
cmd=${cmd//\{name\}/$name}
# shellcheck disable=SC2086 # the command line is split into words on purpose
$cmd >"$work/ours.out" 2>"$work/ours.err" &
pids+=($!)
qemu-nbd -f raw --cache=writeback --aio=threads --detect-zeroes=off --discard=ignore \
    --persistent -x "$name" -k "$work/qemu.sock" "$work/qemu.raw" >"$work/qemu.out" 2>&1 &
pids+=($!)
for side in ours qemu; do
    for _ in $(seq 300); do [[ -S $work/$side.sock ]] && break; sleep 0.1; done
    [[ -S $work/$side.sock ]] || { echo "$side server did not start:"; cat "$work/$side".*; exit 1; }
done

blocks=$((size_mib * 256))
odd_blocks=$(((blocks * 618 / 1000) | 1))
step_4k=$((4096 * odd_blocks))
declare -A opts=(
    [randwrite-4k]="-w --pattern 165 -s 4096 -c $count_4k -S $step_4k"
    [randread-4k]="-s 4096 -c $count_4k -S $step_4k"
    [seqwrite-1m]="-w --pattern 165 -s 1M -c $count_1m"
)
declare -A bytes=([randwrite-4k]=4096 [randread-4k]=4096 [seqwrite-1m]=1048576)
declare -A counts=([randwrite-4k]=$count_4k [randread-4k]=$count_4k [seqwrite-1m]=$count_1m)
workloads=(randwrite-4k randread-4k seqwrite-1m)

declare -A pid_of=([ours]=${pids[0]} [qemu]=${pids[1]})
# CPU ticks (user + system, every thread) a server process has used so far.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/${pid_of[$1]}/stat"; }
ticks_per_second=$(getconf CLK_TCK)
# One run: the seconds qemu-img bench reports (its own clock, client start-up
# excluded) into $side.$workload.seconds, the server's CPU seconds into .cpu.
bench() { # side workload
    local out before
    before=$(cpu_ticks "$1")
    # shellcheck disable=SC2086
    out=$(qemu-img bench -f raw -t none -d "$depth" ${opts[$2]} \
        "nbd+unix:///$name?socket=$work/$1.sock" 2>&1) || { echo "$out" >&2; return 1; }
    echo "($(cpu_ticks "$1") - $before) / $ticks_per_second" | bc -l >>"$work/$1.$2.cpu"
    sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p' <<<"$out" >>"$work/$1.$2.seconds"
}
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

echo "qemu-img bench, ${size_mib} MiB image, depth $depth, $rounds alternating rounds"
echo "under test: $SERVE_CMD"
for round in $(seq "$rounds"); do
    if ((round % 2)); then order=(ours qemu); else order=(qemu ours); fi
    for w in "${workloads[@]}"; do
        for side in "${order[@]}"; do
            bench "$side" "$w"
        done
    done
done

status=0
printf '%-13s %14s %14s %8s %22s\n' workload "under test" qemu-nbd ratio "server CPU us/request"
for w in "${workloads[@]}"; do
    ours=$(median <"$work/ours.$w.seconds")
    qemu=$(median <"$work/qemu.$w.seconds")
    if [[ $w == seqwrite-* ]]; then
        unit=MiB/s
        rate() { echo "${counts[$w]} * ${bytes[$w]} / 1048576 / $1" | bc -l; }
    else
        unit=IOPS
        rate() { echo "${counts[$w]} / $1" | bc -l; }
    fi
    ratio=$(echo "$qemu / $ours" | bc -l)
    cpu_ours=$(echo "$(median <"$work/ours.$w.cpu") * 1000000 / ${counts[$w]}" | bc -l)
    cpu_qemu=$(echo "$(median <"$work/qemu.$w.cpu") * 1000000 / ${counts[$w]}" | bc -l)
    printf '%-13s %9.0f %-5s%9.0f %-5s%7.2fx %10.1f vs %6.1f\n' "$w" "$(rate "$ours")" $unit \
        "$(rate "$qemu")" $unit "$ratio" "$cpu_ours" "$cpu_qemu"
    if [[ -n ${MIN_RATIO:-} ]] && (($(echo "$ratio < $MIN_RATIO" | bc -l))); then status=1; fi
done
echo "(medians of $rounds runs; ratio = under test / qemu-nbd in the workload's unit;"
echo " server CPU = user + system time of the server process per request, under test vs qemu-nbd)"
exit "$status"
