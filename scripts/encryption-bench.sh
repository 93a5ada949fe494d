#!/usr/bin/env bash
# The full sync into a store encrypted at rest beside the full sync into a
# clear one, in one run on the same seeded disk: `blockrep bench` twice, the
# second with --encrypt-at-rest, then the ratio of the two initial syncs'
# throughput and their CPU.
#
# Usage: scripts/encryption-bench.sh [SIZE]    SIZE like 1GiB (default) or 256MiB
# Environment: SEED (default 1); TMPDIR for the work directories (default /var/tmp).
set -euo pipefail
cd "$(dirname "$0")/.."

size=${1:-1GiB}
seed=${SEED:-1}
export TMPDIR=${TMPDIR:-/var/tmp}
cargo build --release -q
blockrep=target/release/blockrep
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

bench() {
    "$blockrep" bench --size "$size" --seed "$seed" --json "$work/$1.json" "${@:2}" \
        >"$work/$1.txt" 2>"$work/$1.err" || { cat "$work/$1.err" >&2; exit 1; }
}
echo "bench in clear ($size)..." >&2
bench clear
echo "bench encrypted at rest ($size)..." >&2
bench encrypted --encrypt-at-rest

python3 - "$work/clear.json" "$work/encrypted.json" <<'PY'
import json, sys
clear, sealed = (json.load(open(p)) for p in sys.argv[1:3])
def row(name, key):
    a, b = clear["initial_sync"][key], sealed["initial_sync"][key]
    return f"{name:<28} {a:>10.2f} {b:>10.2f}"
print(f"{'initial sync':<28} {'clear':>10} {'encrypted':>10}")
print(row("seconds", "seconds"))
print(row("disk MiB/s", "disk_mib_per_second"))
print(row("agent CPU s", "agent_cpu_seconds"))
print(row("server CPU s", "server_cpu_seconds"))
ratio = sealed["initial_sync"]["disk_mib_per_second"] / clear["initial_sync"]["disk_mib_per_second"]
print(f"encrypted / clear throughput: {ratio:.2f}x")
for name, data in (("clear", clear), ("encrypted", sealed)):
    print(f"{name}: delta {data['delta_sync']['seconds']:.2f} s, cutover downtime "
          f"{data['cutover']['downtime_seconds']:.3f} s")
PY
