#!/usr/bin/env bash
# Build the tskvm default Linux guest (kernel + initramfs) from Debian
# packages only, and cache it outside the repository.
#
#   bash guest/build.sh          build if needed, print the manifest JSON
#   bash guest/build.sh --print  print the manifest if the cache entry is
#                                complete, exit 1 otherwise (never builds)
#
# Cache: ${XDG_CACHE_HOME:-$HOME/.cache}/tskvm/guest/<hash>/ where <hash>
# covers every file under guest/, the versions of the Debian packages used,
# the toolchain and the binaries copied into the initramfs. An entry is built
# in a temporary directory beside it and renamed into place when complete.
# The kernel source tree stays extracted in .../tskvm/src/ so that a rebuild
# after a config or patch change is incremental.
#
# The manifest JSON is the last line of stdout; everything else goes to
# stderr. Packages: apt-get install -y $(bash guest/deps.sh). See docs/guest.md.
#
# Environment: TSKVM_GUEST_JOBS (make -j, default nproc).
set -euo pipefail
umask 022
shopt -s nullglob

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE_BASE="${XDG_CACHE_HOME:-$HOME/.cache}/tskvm"
GUEST_CACHE="$CACHE_BASE/guest"
SRC_CACHE="$CACHE_BASE/src"
JOBS="${TSKVM_GUEST_JOBS:-$(nproc)}"

KSRC_PKG=linux-source-6.1
KSRC_TAR=/usr/src/linux-source-6.1.tar.xz
KSRC_TOPDIR=linux-source-6.1
# Debian packages whose contents end up in the guest.
PKGS="$KSRC_PKG busybox-static dropbear-bin libc6 libtomcrypt1 libtommath1 zlib1g libcrypt1 libgmp10"
BUSYBOX=/bin/busybox
DROPBEAR_BINS="/usr/sbin/dropbear /usr/bin/dbclient /usr/bin/dropbearkey"

# Recommended kernel command line (tskvm passes its own; see docs/guest.md).
# noxsave + clearcpuid: keep the kernel off instructions that a software
# hypervisor's emulator lacks even when the VMM does not hide them in CPUID
# (141 CX16, 145 PCID, 151 POPCNT, 158 RDRAND, 288 FSGSBASE, 295 SMEP,
# 298 INVPCID, 306 RDSEED, 308 SMAP, 311 CLFLUSHOPT, 312 CLWB), and off
# ERMS/FSRM (297, 580) so that memcpy/memset/clear_page use "rep movsq/stosq"
# (8 bytes per emulated iteration instead of 1: ~4 s faster boot there).
CMDLINE="console=ttyS0 reboot=k panic=-1 noxsave clearcpuid=141,145,151,158,288,295,297,298,306,308,311,312,580"

T0=$SECONDS
log() { printf '[guest %4ds] %s\n' "$((SECONDS - T0))" "$*" >&2; }
die() { printf '[guest] error: %s\n' "$*" >&2; exit 1; }

mode=build
case "${1:-}" in
"") ;;
--print) mode=print ;;
-h | --help)
	awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
	exit 0
	;;
*) die "unknown argument: $1 (use --print or no argument)" ;;
esac

TMPDIRS=()
cleanup() {
	local d
	for d in "${TMPDIRS[@]}"; do
		[ -n "$d" ] && rm -rf -- "$d"
	done
	return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- inputs ---

# Shared libraries of the dropbear binaries, as ldd resolves them (path list).
dropbear_libs() {
	local b
	for b in $DROPBEAR_BINS; do
		ldd "$b" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
	done | LC_ALL=C sort -u
}

compute_inputs() {
	local f p
	(
		cd "$HERE"
		find build.sh deps.sh kernel initrd -type f ! -name '*~' ! -name '.*.swp' |
			LC_ALL=C sort | while read -r f; do
				echo "file $f $(sha256sum <"$f" | cut -d' ' -f1)"
			done
	)
	for p in $PKGS; do
		echo "pkg $p=$(dpkg-query -W -f='${Version}' "$p" 2>/dev/null || echo missing)"
	done
	echo "tool $(gcc --version 2>/dev/null | head -n1 || echo gcc-missing)"
	echo "tool $(ld --version 2>/dev/null | head -n1 || echo ld-missing)"
	for f in $BUSYBOX $DROPBEAR_BINS $(dropbear_libs 2>/dev/null); do
		if [ -e "$f" ]; then
			echo "bin $f $(sha256sum <"$f" | cut -d' ' -f1)"
		else
			echo "bin $f missing"
		fi
	done
}

json_str() { # JSON string literal
	local s=$1
	s=${s//\\/\\\\}
	s=${s//\"/\\\"}
	printf '"%s"' "$s"
}

is_complete() { # dir
	local d=$1 f
	for f in manifest.json bzImage vmlinux initrd.img initrd.cpio id_ed25519; do
		[ -s "$d/$f" ] || return 1
	done
}

print_manifest() { # dir
	tr -d '\n' <"$1/manifest.json"
	echo
}

# ---------------------------------------------------------------- kernel ---

extract_source() { # src
	local src=$1 tmp
	log "extracting $KSRC_TAR into $src"
	rm -rf -- "$src" "$src-build"
	tmp=$(mktemp -d "$SRC_CACHE/.extract.XXXXXX")
	TMPDIRS+=("$tmp")
	tar -C "$tmp" -xf "$KSRC_TAR"
	[ -d "$tmp/$KSRC_TOPDIR" ] || die "$KSRC_TAR has no $KSRC_TOPDIR/"
	mkdir -p "$tmp/$KSRC_TOPDIR/.tskvm-patches"
	mv -T "$tmp/$KSRC_TOPDIR" "$src"
	rmdir -- "$tmp"
}

# Bring the tree's applied patch set in line with guest/kernel/patches.
# The applied set is recorded in .tskvm-patches/ (copies, in order). Patches
# after the first one that differs are reversed (newest first) and the new
# ones applied, so only the files they touch get rebuilt.
sync_patches() { # src; returns 1 if the tree must be re-extracted
	local src=$1 applied="$1/.tskvm-patches" p i keep olds news
	olds=("$applied"/*.patch)
	news=("$HERE"/kernel/patches/*.patch)
	keep=0
	while [ $keep -lt ${#olds[@]} ] && [ $keep -lt ${#news[@]} ] &&
		[ "$(basename "${olds[keep]}")" = "$(basename "${news[keep]}")" ] &&
		cmp -s "${olds[keep]}" "${news[keep]}"; do
		keep=$((keep + 1))
	done
	[ $keep -eq ${#olds[@]} ] && [ $keep -eq ${#news[@]} ] && return 0
	touch "$src/.tskvm-dirty"
	for ((i = ${#olds[@]} - 1; i >= keep; i--)); do
		p=${olds[i]}
		log "reversing $(basename "$p")"
		patch -d "$src" -p1 -R -s -f --no-backup-if-mismatch <"$p" >&2 || return 1
		rm -f -- "$p"
	done
	for ((i = keep; i < ${#news[@]}; i++)); do
		p=${news[i]}
		log "applying $(basename "$p")"
		patch -d "$src" -p1 -s -f --no-backup-if-mismatch <"$p" >&2 || return 1
		cp -- "$p" "$applied/"
	done
	rm -f -- "$src/.tskvm-dirty"
}

build_kernel() { # outdir
	local out=$1 ver src obj frag cfghash missing opt
	ver=$(dpkg-query -W -f='${Version}' "$KSRC_PKG")
	src="$SRC_CACHE/linux-$ver"
	obj="$SRC_CACHE/linux-$ver-build"
	mkdir -p "$SRC_CACHE"
	exec 8>"$SRC_CACHE/.lock-linux-$ver"
	flock 8

	if [ ! -d "$src" ] || [ -e "$src/.tskvm-dirty" ]; then
		extract_source "$src"
	fi
	if ! sync_patches "$src"; then
		log "patch set could not be updated in place; re-extracting"
		extract_source "$src"
		sync_patches "$src" || die "kernel patches do not apply to $KSRC_PKG $ver"
	fi

	frag="$HERE/kernel/tskvm.config"
	cfghash=$(cat "$src/kernel/configs/tiny-base.config" "$src/kernel/configs/tiny.config" \
		"$src/arch/x86/configs/tiny.config" "$frag" | sha256sum | cut -d' ' -f1)
	if [ ! -s "$obj/.config" ] || [ "$(cat "$obj/.tskvm-config" 2>/dev/null)" != "$cfghash" ]; then
		log "configuring (tinyconfig + $(basename "$frag"), allnoconfig semantics)"
		mkdir -p "$obj"
		rm -f -- "$obj/.tskvm-config"
		(cd "$src" && scripts/kconfig/merge_config.sh -n -O "$obj" \
			kernel/configs/tiny-base.config kernel/configs/tiny.config \
			arch/x86/configs/tiny.config "$frag") >&2
		missing=
		while read -r opt; do
			grep -qx -- "$opt" "$obj/.config" || missing="$missing $opt"
		done < <(grep -E '^CONFIG_[A-Z0-9_]+=' "$frag")
		while read -r opt; do
			if grep -q -- "^${opt}=" "$obj/.config"; then missing="$missing $opt(off)"; fi
		done < <(sed -n 's/^# \(CONFIG_[A-Z0-9_]*\) is not set$/\1/p' "$frag")
		[ -z "$missing" ] || die "kernel config lacks:$missing"
		echo "$cfghash" >"$obj/.tskvm-config"
	fi

	log "make -j$JOBS bzImage (kernel $ver; incremental if the tree was built before)"
	make -C "$src" O="$obj" -j"$JOBS" KBUILD_BUILD_USER=tskvm KBUILD_BUILD_HOST=tskvm \
		bzImage >&2
	cp -- "$obj/arch/x86/boot/bzImage" "$out/bzImage"
	cp -- "$obj/vmlinux" "$out/vmlinux"
	cp -- "$obj/System.map" "$out/System.map"
	cp -- "$obj/.config" "$out/config"
	# gen_init_cpio lets the initramfs hold device nodes without root.
	cc -O2 -o "$out/.gen_init_cpio" "$src/usr/gen_init_cpio.c"
	exec 8>&-
	log "kernel done: bzImage $(stat -c %s "$out/bzImage") bytes, vmlinux $(stat -c %s "$out/vmlinux") bytes"
}

# ---------------------------------------------------------------- initrd ---

build_initrd() { # outdir
	local out=$1 root="$1/.rootfs" a f b list pub
	rm -rf -- "$root"
	mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc/dropbear,root/.ssh,proc,sys,dev,tmp,run,var/log,mnt}

	# busybox-static and its applet links
	ldd "$BUSYBOX" >/dev/null 2>&1 && die "$BUSYBOX is dynamically linked (need busybox-static)"
	cp -- "$BUSYBOX" "$root/bin/busybox"
	for a in $("$BUSYBOX" --list-full); do
		[ -e "$root/$a" ] || [ -L "$root/$a" ] && continue
		mkdir -p "$root/$(dirname "$a")"
		ln -s /bin/busybox "$root/$a"
	done

	# dropbear, dbclient, dropbearkey and the shared libraries they need
	for b in $DROPBEAR_BINS; do
		cp -- "$b" "$root$b"
	done
	for f in $(dropbear_libs); do
		mkdir -p "$root$(dirname "$f")"
		cp -L -- "$f" "$root$f"
	done

	# /init and /etc
	cp -- "$HERE/initrd/init" "$root/init"
	chmod 755 "$root/init"
	cp -- "$HERE"/initrd/etc/* "$root/etc/"
	chmod 600 "$root/etc/shadow"

	# keys: a host key for dropbear, a client key pair for the host side
	log "generating ssh keys"
	dropbearkey -t ed25519 -f "$root/etc/dropbear/dropbear_ed25519_host_key" >/dev/null 2>&1
	dropbearkey -y -f "$root/etc/dropbear/dropbear_ed25519_host_key" 2>/dev/null |
		awk '/^ssh-ed25519 / { print $1, $2, "tskvm-guest-host" }' >"$out/host_ed25519.pub"
	dropbearkey -t ed25519 -f "$out/id_ed25519.dropbear" >/dev/null 2>&1
	dropbearkey -y -f "$out/id_ed25519.dropbear" 2>/dev/null |
		awk '/^ssh-ed25519 / { print $1, $2, "tskvm-host" }' >"$out/id_ed25519.pub"
	dropbearconvert dropbear openssh "$out/id_ed25519.dropbear" "$out/id_ed25519" >/dev/null 2>&1
	chmod 600 "$out/id_ed25519" "$out/id_ed25519.dropbear"
	[ -s "$out/id_ed25519.pub" ] && [ -s "$out/host_ed25519.pub" ] && [ -s "$out/id_ed25519" ] ||
		die "ssh key generation failed"
	cp -- "$out/id_ed25519.pub" "$root/root/.ssh/authorized_keys"
	chmod 700 "$root/root" "$root/root/.ssh"
	chmod 600 "$root/root/.ssh/authorized_keys"
	chmod 1777 "$root/tmp"

	# cpio list for gen_init_cpio: everything owned by root, plus device nodes
	list="$out/.initramfs.list"
	{
		(cd "$root" && find . -mindepth 1 | LC_ALL=C sort) | while read -r f; do
			f=${f#.}
			if [ -L "$root$f" ]; then
				echo "slink $f $(readlink "$root$f") 0777 0 0"
			elif [ -d "$root$f" ]; then
				echo "dir $f $(stat -c %a "$root$f") 0 0"
			else
				echo "file $f $root$f $(stat -c %a "$root$f") 0 0"
			fi
		done
		echo "nod /dev/console 0600 0 0 c 5 1"
		echo "nod /dev/null 0666 0 0 c 1 3"
	} >"$list"
	log "packing initrd.img and initrd.cpio ($(wc -l <"$list") entries)"
	"$out/.gen_init_cpio" -t 0 "$list" >"$out/initrd.cpio"
	gzip -9 -n <"$out/initrd.cpio" >"$out/initrd.img"
	rm -rf -- "$root" "$list" "$out/.gen_init_cpio"
	log "initrd done: initrd.img $(stat -c %s "$out/initrd.img") bytes (gzip)," \
		"initrd.cpio $(stat -c %s "$out/initrd.cpio") bytes (same content, uncompressed)"
}

# ------------------------------------------------------------------ main ---

command -v dpkg-query >/dev/null || die "dpkg-query not found (Debian host expected)"
mkdir -p "$GUEST_CACHE"
INPUTS=$(compute_inputs)
HASH=$(printf '%s\n' "$INPUTS" | sha256sum | cut -c1-16)
FINAL="$GUEST_CACHE/$HASH"

if is_complete "$FINAL"; then
	print_manifest "$FINAL"
	exit 0
fi
if [ "$mode" = print ]; then
	log "no complete guest build for hash $HASH in $GUEST_CACHE (run: npm run guest)"
	exit 1
fi

# everything needed must be there before a long build starts
missing=
for p in $PKGS; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing="$missing $p"
done
for c in make gcc cc ld flex bison bc cpio gzip xz patch flock dropbearkey dropbearconvert; do
	command -v "$c" >/dev/null || missing="$missing $c"
done
[ -e "$KSRC_TAR" ] || missing="$missing $KSRC_TAR"
[ -z "$missing" ] || die "missing:$missing -- run: apt-get install -y \$(bash guest/deps.sh)"

exec 9>"$GUEST_CACHE/.lock-$HASH"
flock 9
if is_complete "$FINAL"; then # built by a concurrent run
	print_manifest "$FINAL"
	exit 0
fi
rm -rf -- "$FINAL" # an incomplete leftover (never produced by this script)

log "building guest $HASH into $FINAL"
TMP=$(mktemp -d "$GUEST_CACHE/.tmp-$HASH.XXXXXX")
TMPDIRS+=("$TMP")
printf '%s\n' "$INPUTS" >"$TMP/inputs.txt"

build_kernel "$TMP"
build_initrd "$TMP"

{
	printf '{"kernel": %s, ' "$(json_str "$FINAL/bzImage")"
	printf '"vmlinux": %s, ' "$(json_str "$FINAL/vmlinux")"
	printf '"initrd": %s, ' "$(json_str "$FINAL/initrd.img")"
	printf '"initrdUncompressed": %s, ' "$(json_str "$FINAL/initrd.cpio")"
	printf '"sshKey": %s, ' "$(json_str "$FINAL/id_ed25519")"
	printf '"sshKeyDropbear": %s, ' "$(json_str "$FINAL/id_ed25519.dropbear")"
	printf '"hostKey": %s, ' "$(json_str "$FINAL/host_ed25519.pub")"
	printf '"hash": %s, ' "$(json_str "$HASH")"
	printf '"cmdline": %s}\n' "$(json_str "$CMDLINE")"
} >"$TMP/manifest.json"

chmod 755 "$TMP"
mv -T -- "$TMP" "$FINAL"
TMPDIRS=()
log "done in $((SECONDS - T0)) s: $FINAL"
print_manifest "$FINAL"
