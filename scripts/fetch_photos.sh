#!/usr/bin/env bash
# Fetch the Debian packages whose photographs `uge-protect photo-data` uses and unpack them
# into DIR (default .cache/photos) without installing anything system-wide:
# `apt-get download` into a temporary directory, then `dpkg-deb -x` (no maintainer scripts run).
# Idempotent: a package already unpacked (its stamp file exists) is skipped.
# Usage: scripts/fetch_photos.sh [DIR] [PACKAGE...]
set -euo pipefail
dir=${1:-.cache/photos}
shift || true
packages=("$@")
[ ${#packages[@]} -gt 0 ] || packages=(mate-backgrounds lomiri-wallpapers-16.04)

todo=()
for pkg in "${packages[@]}"; do
    [ -e "$dir/.unpacked-$pkg" ] || todo+=("$pkg")
done
[ ${#todo[@]} -gt 0 ] || exit 0

for tool in apt-get dpkg-deb; do
    command -v "$tool" >/dev/null || {
        echo "error: make photos needs $tool (Debian/Ubuntu); or unpack ${todo[*]} into $dir yourself" >&2
        exit 2
    }
done

mkdir -p "$dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if ! (cd "$tmp" && apt-get download "${todo[@]}"); then
    echo "apt-get download failed; running apt-get update and retrying" >&2
    apt-get update
    (cd "$tmp" && apt-get download "${todo[@]}")
fi
for pkg in "${todo[@]}"; do
    debs=("$tmp/${pkg}"_*.deb)
    dpkg-deb -x "${debs[0]}" "$dir"
    touch "$dir/.unpacked-$pkg"
done
echo "unpacked ${todo[*]} into $dir"
