#!/usr/bin/env bash
# Usage: scripts/drill-disk.sh OUT.raw MARKER_TEXT [SIZE_MIB]
#
# Builds a small bootable disk for `blockrep launch create --check-boot`
# drills: a raw ext4 file system (no partition table, so the guest sees it as
# root=/dev/vda) made by mke2fs -d with its default features, metadata
# checksums included, holding
#   /bin/busybox   busybox-static's busybox, with links for the applets used
#   /marker        MARKER_TEXT exactly, with no newline added
#   /sbin/init     a busybox sh script that prints one console line,
#                  `blockrep-drill-marker: <sha256 of /marker>`, and powers off
# The initramfs of scripts/drill-kernel.sh mounts it read-only and starts
# /sbin/init. A boot that prints the expected line therefore read the kernel's
# view of the file system correctly end to end; one that prints another hash,
# or a `blockrep-drill:` failure line, did not.
#
# SIZE_MIB defaults to 48. On success the expected console line is printed on
# stdout, alone. busybox-static is fetched with `apt-get download` and only
# unpacked; it goes to a temporary directory, or is kept in
# $BLOCKREP_DRILL_CACHE when that is set.
set -euo pipefail

if (($# < 2 || $# > 3)); then
    echo "usage: $0 OUT.raw MARKER_TEXT [SIZE_MIB]" >&2
    exit 2
fi
out=$1
marker=$2
size=${3:-48}
[[ $size =~ ^[1-9][0-9]*$ ]] || {
    echo "drill-disk: SIZE_MIB must be a positive whole number, not $size" >&2
    exit 2
}

for tool in apt-get apt-cache dpkg-deb mke2fs sha256sum truncate find; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "drill-disk: $tool is needed" >&2
        exit 1
    }
done

work=$(mktemp -d "${TMPDIR:-/tmp}/drill-disk.XXXXXX")
trap 'rm -rf "$work"' EXIT
cache=${BLOCKREP_DRILL_CACHE:-$work/debs}
mkdir -p "$cache"

# shellcheck source=scripts/drill-debs.sh
. "$(dirname "$0")/drill-debs.sh"
deb=$(fetch_deb busybox-static "$cache")
dpkg-deb -x "$deb" "$work/busybox"
busybox=$(find "$work/busybox" -path '*bin/busybox' -type f | head -n1)
[[ -n $busybox ]] || {
    echo "drill-disk: busybox-static has no busybox binary" >&2
    exit 1
}

stage=$work/root
# /dev, /proc and /sys are mount points: the initramfs moves its devtmpfs onto
# /dev, since the disk is mounted read-only and holds no device nodes.
mkdir -p "$stage"/{bin,sbin,dev,proc,sys}
install -m 0755 "$busybox" "$stage/bin/busybox"
for applet in sh mount sha256sum printf sync poweroff; do
    ln -s busybox "$stage/bin/$applet"
done
printf '%s' "$marker" >"$stage/marker"
chmod 0644 "$stage/marker"

cat >"$stage/sbin/init" <<'EOF'
#!/bin/sh
# Proves the disk was read correctly: prints the sha256 of /marker as one
# console line, then powers off at once so that QEMU exits.
PATH=/bin
export PATH
[ -c /dev/console ] && exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
set -- $(sha256sum /marker 2>/dev/null)
# The leading newline puts the line on its own: with `quiet` the firmware's
# last output on the serial console is not ended by a newline.
if [ -n "$1" ]; then
    printf '\nblockrep-drill-marker: %s\n' "$1"
else
    printf '\nblockrep-drill: cannot read /marker\n'
fi
sync
poweroff -f
EOF
chmod 0755 "$stage/sbin/init"

expected=$(sha256sum "$stage/marker")
expected=${expected%% *}

# Written beside OUT.raw and renamed, so an interrupted run leaves no half-made
# image under the final name.
tmp="$out.tmp.$$"
trap 'rm -rf "$work" "$tmp"' EXIT
rm -f "$tmp"
truncate -s "${size}M" "$tmp"
mke2fs -q -F -t ext4 -L drill -E root_owner=0:0 -d "$stage" "$tmp"
mv -f "$tmp" "$out"

echo "blockrep-drill-marker: $expected"
