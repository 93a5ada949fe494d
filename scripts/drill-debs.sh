# shellcheck shell=bash
# Sourced by scripts/drill-kernel.sh and scripts/drill-disk.sh: fetches a
# Debian package's candidate .deb with `apt-get download` into a cache
# directory, without installing anything.
#
#   fetch_deb PACKAGE CACHE_DIR   prints the .deb's path (fetched once)

# apt's download sandbox user cannot write into a root-owned private temporary
# directory; as root, download as root rather than print a notice each time.
drill_apt_opts=()
[[ $(id -u) -eq 0 ]] && drill_apt_opts=(-o APT::Sandbox::User=root)

# Brings the package lists in: a machine whose lists were never fetched knows
# no candidate for anything.
drill_apt_update() {
    local sudo=""
    [[ $(id -u) -ne 0 ]] && sudo="sudo"
    $sudo apt-get update -qq
}

fetch_deb() {
    local pkg=$1 cache=$2 version deb
    version=$(apt-cache policy "$pkg" | sed -n 's/^ *Candidate: *//p')
    if [[ -z $version || $version == "(none)" ]]; then
        drill_apt_update
        version=$(apt-cache policy "$pkg" | sed -n 's/^ *Candidate: *//p')
    fi
    [[ -n $version && $version != "(none)" ]] || {
        echo "$(basename "$0"): no candidate for $pkg" >&2
        return 1
    }
    # .deb file names encode the epoch's colon as %3a.
    deb="$cache/${pkg}_${version//:/%3a}_amd64.deb"
    if [[ ! -s $deb ]]; then
        (cd "$cache" && apt-get download -qq "${drill_apt_opts[@]}" "$pkg=$version") >&2
    fi
    [[ -s $deb ]] || {
        echo "$(basename "$0"): apt-get download $pkg=$version left no $deb" >&2
        return 1
    }
    echo "$deb"
}
