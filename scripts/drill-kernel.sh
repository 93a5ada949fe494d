#!/usr/bin/env bash
# Usage: scripts/drill-kernel.sh OUTDIR
#
# Writes OUTDIR/vmlinuz and OUTDIR/initrd.img, the kernel and initramfs with
# which `blockrep launch create --check-boot` boots a launch volume in QEMU.
# When the kernel has a PVH entry point it also writes OUTDIR/vmlinux, the same
# kernel uncompressed: QEMU boots that ELF file through PVH, skipping the
# real-mode set-up and the in-guest decompression, which under TCG emulation
# more than halves the time of a drill boot (about 2 s instead of 5 s). Either
# file works with the same -initrd and -append.
#
# The kernel is the one Debian's linux-image-amd64 currently points at, and the
# initramfs holds busybox from busybox-static. Both packages are fetched with
# `apt-get download` and only unpacked (dpkg-deb -x): nothing is installed on
# the host, so the host's own kernel and boot set-up are never touched.
#
# The initramfs is generic rather than made for one disk: it loads just the
# modules needed to mount an ext4 root on a virtio disk, waits for the root
# device (root= on the kernel command line, /dev/vda by default), mounts it
# read-only and switches to the disk's /sbin/init. Whatever fails prints one
# line starting `blockrep-drill:` and powers the machine off, so QEMU exits
# instead of waiting for a timeout.
#
# Idempotent: when OUTDIR already holds vmlinuz and initrd.img nothing is
# fetched or made (delete them to pick up a newer kernel).
# The downloaded packages go to a temporary directory, or are kept in
# $BLOCKREP_DRILL_CACHE when that is set (scripts/drill-disk.sh uses the same).
set -euo pipefail

if (($# != 1)); then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
out=$1

if [[ -s $out/vmlinuz && -s $out/initrd.img ]]; then
    echo "drill kernel already in $out: $out/vmlinuz $out/initrd.img"
    [[ -s $out/vmlinux ]] && echo "  and $out/vmlinux"
    exit 0
fi

for tool in apt-get apt-cache dpkg-deb cpio gzip find; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "drill-kernel: $tool is needed" >&2
        exit 1
    }
done

work=$(mktemp -d "${TMPDIR:-/tmp}/drill-kernel.XXXXXX")
trap 'rm -rf "$work"' EXIT
cache=${BLOCKREP_DRILL_CACHE:-$work/debs}
mkdir -p "$cache" "$out"

# shellcheck source=scripts/drill-debs.sh
. "$(dirname "$0")/drill-debs.sh"

# The package linux-image-amd64 depends on, e.g. linux-image-6.1.0-57-amd64.
kernel_package() {
    apt-cache show --no-all-versions linux-image-amd64 2>/dev/null |
        sed -n 's/^Depends:.*\(linux-image-[0-9][^ ,]*\).*/\1/p' | head -n1
}
kpkg=$(kernel_package)
if [[ -z $kpkg ]]; then
    drill_apt_update
    kpkg=$(kernel_package)
fi
if [[ -z $kpkg ]]; then
    echo "drill-kernel: no kernel package found behind linux-image-amd64" >&2
    exit 1
fi

kdeb=$(fetch_deb "$kpkg" "$cache")
bdeb=$(fetch_deb busybox-static "$cache")
dpkg-deb -x "$kdeb" "$work/kernel"
dpkg-deb -x "$bdeb" "$work/busybox"

moddir=$(find "$work/kernel" -path '*/modules/*/kernel' -type d | head -n1)
[[ -n $moddir ]] || {
    echo "drill-kernel: $kpkg has no lib/modules/VERSION/kernel" >&2
    exit 1
}
moddir=$(dirname "$moddir")
kver=$(basename "$moddir")
vmlinuz=$(find "$work/kernel" -path "*/boot/vmlinuz-$kver" | head -n1)
[[ -n $vmlinuz ]] || {
    echo "drill-kernel: $kpkg has no boot/vmlinuz-$kver" >&2
    exit 1
}
busybox=$(find "$work/busybox" -path '*bin/busybox' -type f | head -n1)
[[ -n $busybox ]] || {
    echo "drill-kernel: busybox-static has no busybox binary" >&2
    exit 1
}

# Module name of a module file: file name without .ko[.xz|.zst|.gz], with
# dashes read as underscores as the kernel does.
modname() {
    local n=${1##*/}
    n=${n%.ko*}
    echo "${n//-/_}"
}
declare -A modpath
while IFS= read -r path; do
    modpath[$(modname "$path")]=$path
done < <(find "$moddir/kernel" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz')

# Built-in parts of the kernel need nothing loaded.
declare -A builtin
if [[ -f $moddir/modules.builtin ]]; then
    while IFS= read -r path; do builtin[$(modname "$path")]=1; done <"$moddir/modules.builtin"
fi

# Writes module file SRC uncompressed to DST, so that the initramfs's insmod
# needs no decompressor of its own.
unpack_module() {
    local src=$1 dst=$2
    case $src in
    *.ko.xz) xz -dc "$src" >"$dst" ;;
    *.ko.zst) zstd -qdc "$src" >"$dst" ;;
    *.ko.gz) gzip -dc "$src" >"$dst" ;;
    *) cp "$src" "$dst" ;;
    esac
}

root="$work/initramfs"
mkdir -p "$root"/{bin,dev,proc,sys,newroot,modules}

# The virtio PCI transport and disk, then crc32c_generic before ext4: an ext4
# with metadata checksums (mke2fs's default) asks the crypto layer for crc32c
# at mount time, and the initramfs has no modprobe to load it on demand.
wanted=(virtio_pci virtio_blk crc32c_generic ext4)
order=()
declare -A seen
# Depth-first, so that a module comes after every module it needs. Debian's
# packages ship no modules.dep (depmod makes it when the package is installed),
# so the dependencies are read where depmod reads them too: the depends= entry
# of each module's .modinfo section.
visit() {
    local name=$1 dep deps ko
    [[ -n ${seen[$name]:-} ]] && return 0
    seen[$name]=1
    if [[ -z ${modpath[$name]:-} ]]; then
        [[ -n ${builtin[$name]:-} ]] && return 0
        echo "drill-kernel: module $name is neither a module of nor built into $kver" >&2
        exit 1
    fi
    ko=$root/modules/$name.ko
    unpack_module "${modpath[$name]}" "$ko"
    deps=$(tr '\0' '\n' <"$ko" | sed -n 's/^depends=//p' | head -n1)
    for dep in ${deps//,/ }; do visit "$(modname "$dep")"; done
    order+=("$name")
}
for m in "${wanted[@]}"; do visit "$m"; done
printf '%s\n' "${order[@]}" >"$root/modules/order"

install -m 0755 "$busybox" "$root/bin/busybox"
for applet in sh mount umount insmod sleep switch_root poweroff sync cat printf; do
    ln -s busybox "$root/bin/$applet"
done
cat >"$root/init" <<'EOF'
#!/bin/sh
# Mounts the launch volume's ext4 root read-only and hands over to its
# /sbin/init. Any failure prints one `blockrep-drill:` line and powers off, so
# the virtual machine never waits for input that will not come.
PATH=/bin
export PATH

# Each message starts on a line of its own: with `quiet` the firmware's last
# output on the serial console is not ended by a newline.
fail() {
    printf '\nblockrep-drill: %s\n' "$*"
    sync
    poweroff -f
    # poweroff -f does not return; should it, leaving init panics the kernel,
    # which with panic=-1 and QEMU's -no-reboot also ends the machine.
    exit 1
}

mount -t devtmpfs devtmpfs /dev || fail "cannot mount devtmpfs on /dev"
# The kernel may have started init without a console; write to it from here.
[ -c /dev/console ] && exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc || fail "cannot mount /proc"
mount -t sysfs sysfs /sys || fail "cannot mount /sys"

for m in $(cat /modules/order); do
    insmod "/modules/$m.ko" || fail "cannot load kernel module $m"
done

root=/dev/vda
for arg in $(cat /proc/cmdline); do
    case $arg in
    root=/dev/*) root=${arg#root=} ;;
    root=*) fail "unsupported root=${arg#root=} (a /dev path is needed)" ;;
    esac
done

# virtio_blk usually creates the device while it loads; allow 10 s for slow
# emulation.
i=0
while [ ! -b "$root" ]; do
    i=$((i + 1))
    [ "$i" -gt 100 ] && fail "root device $root did not appear"
    sleep 0.1
done

if ! why=$(mount -t ext4 -o ro "$root" /newroot 2>&1); then
    echo "$why"
    # ext4 replays a journal that needs recovery even on a read-only mount,
    # which a write-protected disk (QEMU's readonly=on) refuses with EROFS.
    case $why in
    *"Read-only file system"*)
        fail "cannot mount $root read-only as ext4: its journal needs recovery and the disk is write-protected (give it a writable overlay, e.g. QEMU's snapshot=on)"
        ;;
    esac
    fail "cannot mount $root read-only as ext4"
fi
if [ ! -e /newroot/sbin/init ] && [ ! -L /newroot/sbin/init ]; then
    umount /newroot
    fail "$root has no /sbin/init"
fi
# The new root is read-only: its /dev, if any, is where devtmpfs moves to, so
# that its init still finds /dev/console.
if [ -d /newroot/dev ]; then
    mount --move /dev /newroot/dev || fail "cannot move /dev onto $root"
fi
umount /sys
umount /proc
exec switch_root /newroot /sbin/init
EOF
chmod 0755 "$root/init"

(cd "$root" && find . -print0 | LC_ALL=C sort -z |
    cpio --null --create --format=newc --owner=0:0 --quiet) |
    gzip -9 -n >"$work/initrd.img"
# The uncompressed kernel is the payload of the bzImage: the first stream, in
# any of the formats Debian has used, that decompresses to an ELF file.
vmlinux=""
config=$(find "$work/kernel" -path "*/boot/config-$kver" | head -n1)
if [[ -n $config ]] && grep -q '^CONFIG_PVH=y' "$config"; then
    for format in xz zstd gzip; do
        case $format in
        xz) magic=$'\xfd7zXZ' decompress=(xz -dc --single-stream) ;;
        zstd) magic=$'\x28\xb5\x2f\xfd' decompress=(zstd -qdc) ;;
        gzip) magic=$'\x1f\x8b\x08' decompress=(gzip -dc) ;;
        esac
        command -v "${decompress[0]}" >/dev/null 2>&1 || continue
        for offset in $(LC_ALL=C grep -Fabo "$magic" "$vmlinuz" | cut -d: -f1); do
            # Trailing data after the stream makes some decompressors
            # complain; the ELF check below is what decides.
            tail -c +$((offset + 1)) "$vmlinuz" | "${decompress[@]}" >"$work/vmlinux" 2>/dev/null || true
            if [[ $(head -c 4 "$work/vmlinux") == $'\x7fELF' ]]; then
                vmlinux=$work/vmlinux
                break 2
            fi
        done
    done
    [[ -n $vmlinux ]] || echo "drill-kernel: no uncompressed kernel found in $vmlinuz; writing vmlinuz only" >&2
fi

# The files are renamed into place, vmlinuz last, so that an interrupted run
# never leaves a set that the check at the top takes as complete.
rm -f "$out/vmlinuz"
install -m 0644 "$work/initrd.img" "$out/initrd.img.tmp"
mv -f "$out/initrd.img.tmp" "$out/initrd.img"
if [[ -n $vmlinux ]]; then
    install -m 0644 "$vmlinux" "$out/vmlinux.tmp"
    mv -f "$out/vmlinux.tmp" "$out/vmlinux"
else
    rm -f "$out/vmlinux"
fi
install -m 0644 "$vmlinuz" "$out/vmlinuz.tmp"
mv -f "$out/vmlinuz.tmp" "$out/vmlinuz"

echo "drill kernel $kver (from $kpkg) in $out:"
echo "  $out/vmlinuz ($(stat -c %s "$out/vmlinuz") bytes)"
[[ -n $vmlinux ]] && echo "  $out/vmlinux ($(stat -c %s "$out/vmlinux") bytes, uncompressed, boots through PVH)"
echo "  $out/initrd.img ($(stat -c %s "$out/initrd.img") bytes): busybox, modules ${order[*]}"
