#!/usr/bin/env bash
# Explores N power-loss crash states of the store (default 20,000) in a
# release build: the same test CI runs with 2,000
# (crash_states_keep_the_store_consistent in crates/store/tests/crash/).
# Usage: scripts/crash-states.sh [N] [FIRST_SEED]
# Prints "crash states explored: N (...); failures: F; T s" and, on a failure,
# the seed with a one-command reproduction.
set -euo pipefail
cd "$(dirname "$0")/.."
export BLOCKREP_CRASH_STATES="${1:-20000}"
export BLOCKREP_CRASH_SEED_BASE="${2:-0}"
cargo test --release -p blockrep-store --test crash crash_states -- --nocapture 2>&1 |
    grep -v '^blockrep-store: '
