# Sourced by the measuring scripts, not run: the blockrep binary they measure
# and the wait for the server they start, done one way for all of them.
# (Each script has already moved to the tree's root when it sources this.)

# release_binary [GIVEN]: GIVEN when set (a path the caller resolved before
# moving to the tree, as from BLOCKREP_BIN), else this tree built in release.
# Prints the binary's path.
release_binary() {
    if [[ -n ${1:-} ]]; then
        echo "$1"
        return
    fi
    echo "building blockrep (release)..." >&2
    # Inside $(...) set -e is off: a failed build must fail the caller.
    cargo build --release --quiet >&2 || return 1
    echo "${CARGO_TARGET_DIR:-$PWD/target}/release/blockrep"
}

# wait_listening OUT ERR: waits up to 10 s for the "listening on ..." line a
# `blockrep server` prints first to OUT; fails with the server's ERR when it
# does not come.
wait_listening() {
    local _
    for _ in $(seq 100); do
        grep -q '^listening on' "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "blockrep server did not start:" >&2
    cat "$2" >&2
    return 1
}
