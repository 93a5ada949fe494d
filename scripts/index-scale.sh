#!/usr/bin/env bash
# The blob index at scale: builds a store of BLOBS small blobs (default 16
# million: the index of 1 TiB of 64 KiB chunks, in about 1 GiB of packs)
# twice, once with the index in runs on disk and once wholly in memory, then
# opens each in a fresh process and prints start-up time, lookup and insert
# rates and memory (RSS) side by side.
#
#   scripts/index-scale.sh [BLOBS] [WORK_DIR]
set -euo pipefail
blobs=${1:-16000000}
work=${2:-$(mktemp -d /var/tmp/blockrep-index-scale.XXXXXX)}
cd "$(dirname "$0")/.."
cargo build --release -q -p blockrep-store --example index_scale
bin=target/release/examples/index_scale
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
for kind in runs in-memory; do
    flag=()
    [[ $kind == in-memory ]] && flag=(--in-memory)
    "$bin" build "$work/$kind" "$blobs" "${flag[@]}"
    # Warm cache, as a restarted server finds it.
    cat "$work/$kind"/packs/* "$work/$kind"/index/* >/dev/null 2>&1 || true
    "$bin" open "$work/$kind" "$blobs" "${flag[@]}"
    rm -rf "${work:?}/$kind"
done
