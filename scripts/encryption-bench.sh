#!/usr/bin/env bash
# The full sync into a store encrypted at rest beside the full sync into a
# clear one: `blockrep bench` in pairs on the same seeded disk, clear then
# --encrypt-at-rest (the order alternating), for each agent compression mode; each
# pair's throughput ratio, CPU and bytes sent, and the median ratio.
#
# A single pair says little on a noisy 2-core machine (the same clear run
# moves by 15% from one run to the next), hence pairs and a median; and the
# agent's compression is fixed per row (`none`, then `auto`), so both runs
# of a pair do the same work.
#
# Usage: scripts/encryption-bench.sh [SIZE]    SIZE like 1GiB (default) or 256MiB
# Environment: PAIRS (default 4), MODES (default "none auto"), SEED (default 1),
# TMPDIR for the work directories (default /var/tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

size=${1:-1GiB}
seed=${SEED:-1}
pairs=${PAIRS:-4}
modes=${MODES:-none auto}
export TMPDIR=${TMPDIR:-/var/tmp}
blockrep=$(release_binary)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

bench() {
    "$blockrep" bench --size "$size" --seed "$seed" --duration 3s --json "$work/$1.json" "${@:2}" \
        >"$work/$1.txt" 2>"$work/$1.err" || { cat "$work/$1.err" >&2; exit 1; }
}
for mode in $modes; do
    for i in $(seq 1 "$pairs"); do
        # Which run of a pair goes first alternates: a run pays for the
        # write-back of the one before it.
        if ((i % 2)); then
            echo "pair $i, --compress $mode: clear, then encrypted ($size)..." >&2
            bench "$mode-$i-clear" --compress "$mode"
            bench "$mode-$i-encrypted" --compress "$mode" --encrypt-at-rest
        else
            echo "pair $i, --compress $mode: encrypted, then clear ($size)..." >&2
            bench "$mode-$i-encrypted" --compress "$mode" --encrypt-at-rest
            bench "$mode-$i-clear" --compress "$mode"
        fi
    done
done

python3 - "$work" "$pairs" $modes <<'PY'
import json, statistics, sys
work, pairs, modes = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
print(f"{'compress':<8} {'pair':>4} {'clear MiB/s':>12} {'encr. MiB/s':>12} {'ratio':>6} "
      f"{'agent CPU s':>12} {'server CPU s':>13} {'sent MiB':>10} {'choice changes':>15}")
for mode in modes:
    ratios = []
    for i in range(1, pairs + 1):
        c, e = (json.load(open(f"{work}/{mode}-{i}-{k}.json"))["initial_sync"]
                for k in ("clear", "encrypted"))
        ratio = e["disk_mib_per_second"] / c["disk_mib_per_second"]
        ratios.append(ratio)
        print(f"{mode:<8} {i:>4} {c['disk_mib_per_second']:>12.1f} {e['disk_mib_per_second']:>12.1f} "
              f"{ratio:>6.2f} {c['agent_cpu_seconds']:>5.2f}/{e['agent_cpu_seconds']:<6.2f} "
              f"{c['server_cpu_seconds']:>6.2f}/{e['server_cpu_seconds']:<6.2f} "
              f"{c['bytes_on_wire'] / 2**20:>4.0f}/{e['bytes_on_wire'] / 2**20:<5.0f} "
              f"{c['compression_choice_changes']:>7}/{e['compression_choice_changes']}")
    print(f"{mode:<8} median encrypted / clear throughput: {statistics.median(ratios):.2f}x")
PY
