#!/usr/bin/env bash
# The stock Debian kernel: an unmodified linux-image-*-amd64 package, the kernel the
# Linux tier boots as a distribution kernel and the one the harness VM
# (scripts/harness-vm.ts) runs on. Fetched with apt-get download, unpacked with
# dpkg-deb -x, its modules indexed with depmod, and cached outside the repository.
#
#   bash guest/debian-kernel.sh            fetch if needed, print the manifest JSON
#   bash guest/debian-kernel.sh --print    print the manifest if cached, exit 1 otherwise
#   bash guest/debian-kernel.sh --package  print the package name it uses
#
# The manifest is the last line of stdout (progress goes to stderr):
#   {"package": ..., "version": ..., "release": "6.1.0-57-amd64",
#    "vmlinuz": ".../boot/vmlinuz-RELEASE", "modules": ".../lib/modules/RELEASE", "hash": ...}
# Cache: ${XDG_CACHE_HOME:-$HOME/.cache}/tskvm/debian-kernel/<hash>/, <hash> from the
# package name and this script's layout version; ~70 MB download, ~400 MB unpacked.
# Needs apt-get (with the package in its lists: apt-get update), dpkg-deb and depmod
# (Debian package kmod). TSKVM_DEBIAN_KERNEL=linux-image-... uses another package.
set -euo pipefail
umask 022

# The pin: the one place that names the stock kernel. Debian's security archive keeps
# several ABI versions; when this one has left it, pin one that
# `apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$'` lists.
# (The -cloud-amd64 flavour cannot be used: it lacks CONFIG_X86_MPPARSE.)
PINNED=linux-image-6.1.0-57-amd64
PKG=${TSKVM_DEBIAN_KERNEL:-$PINNED}
LAYOUT=1

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/tskvm/debian-kernel"
die() { echo "debian-kernel: $*" >&2; exit 1; }
log() { echo "[debian-kernel] $*" >&2; }

mode=fetch
case "${1:-}" in
"") ;;
--print) mode=print ;;
--package) echo "$PKG"; exit 0 ;;
-h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
*) die "unknown argument: $1 (use --print, --package or no argument)" ;;
esac

case "$PKG" in
linux-image-*-amd64) ;;
*) die "'$PKG' is not a linux-image-*-amd64 package name" ;;
esac
RELEASE=${PKG#linux-image-}
HASH=$(printf 'package=%s layout=%s\n' "$PKG" "$LAYOUT" | sha256sum | cut -c1-16)
FINAL=$CACHE/$HASH

manifest() {
	local d=$1
	printf '{"package": "%s", "version": "%s", "release": "%s", "vmlinuz": "%s", "modules": "%s", "hash": "%s"}\n' \
		"$PKG" "$(cat "$d/version")" "$RELEASE" "$d/root/boot/vmlinuz-$RELEASE" "$d/root/lib/modules/$RELEASE" "$HASH"
}
complete() { [ -s "$1/version" ] && [ -s "$1/root/boot/vmlinuz-$RELEASE" ] && [ -s "$1/root/lib/modules/$RELEASE/modules.dep" ]; }

if complete "$FINAL"; then
	manifest "$FINAL"
	exit 0
fi
[ "$mode" = print ] && { log "$PKG is not fetched yet (bash guest/debian-kernel.sh fetches it)"; exit 1; }

for c in apt-get dpkg-deb sha256sum flock; do
	command -v "$c" >/dev/null || die "$c not found (a Debian host with apt is needed)"
done
DEPMOD=$(PATH=$PATH:/usr/sbin:/sbin command -v depmod || true)
[ -n "$DEPMOD" ] || die "depmod not found: apt-get install kmod"

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock-$HASH"
flock 9
if complete "$FINAL"; then # fetched by a concurrent run
	manifest "$FINAL"
	exit 0
fi
rm -rf -- "$FINAL"
TMP=$(mktemp -d "$CACHE/.tmp-$HASH.XXXXXX")
trap 'rm -rf -- "$TMP"' EXIT
trap 'exit 130' INT TERM

log "fetching $PKG with apt-get download"
# (As root apt would drop privileges to _apt, who cannot write into root's cache.)
if ! (cd "$TMP" && apt-get download -q -o APT::Sandbox::User=root "$PKG" >"$TMP/apt.log" 2>&1); then
	why=$(grep -m1 '^E:' "$TMP/apt.log" | sed 's/^E: *//' || true)
	die "apt-get download $PKG failed (${why:-see apt-get}): is it in apt's lists (apt-get update; apt-cache policy $PKG)? Otherwise pin another package in guest/debian-kernel.sh"
fi
deb=$(ls "$TMP"/*.deb 2>/dev/null | head -n1)
[ -n "$deb" ] || die "apt-get download $PKG produced no .deb"
dpkg-deb -f "$deb" Version >"$TMP/version"
log "unpacking $(basename "$deb")"
dpkg-deb -x "$deb" "$TMP/root"
rm -f -- "$deb"
[ -s "$TMP/root/boot/vmlinuz-$RELEASE" ] || die "$PKG has no boot/vmlinuz-$RELEASE"
[ -d "$TMP/root/lib/modules/$RELEASE" ] || die "$PKG has no lib/modules/$RELEASE"
# Debian generates the module index at install time (postinst); do the same here.
"$DEPMOD" -b "$TMP/root" "$RELEASE" || die "depmod -b $TMP/root $RELEASE failed"
mv -T -- "$TMP" "$FINAL"
trap - EXIT
log "cached in $FINAL"
manifest "$FINAL"
