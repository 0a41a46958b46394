#!/usr/bin/env bash
# Boot the cached default guest under QEMU/KVM and time the console
# milestones. A verification aid only: QEMU is not a tskvm dependency
# (apt-get install qemu-system-x86).
#
#   bash guest/qemu-boot.sh [options]
#     -M pc|microvm   machine type (default pc)
#     -s N            vCPUs (default 1)
#     -m MiB          memory (default 128)
#     -k vmlinux|bzImage   kernel image from the manifest (default vmlinux)
#     -i gz|raw|FILE  initrd: the manifest's gzip initrd.img (default), its
#                     uncompressed initrd.cpio, or a file
#     -c CPU          QEMU -cpu value (default: host minus the features the
#                     kvm-pvm emulator lacks and minus the hypercall-based KVM
#                     PV features, see docs/guest.md; "host" = unfiltered)
#     -a ARGS         extra kernel command-line arguments
#     -A CMDLINE      replace the whole command line (default: manifest's)
#     -n              virtio-net (user mode, ssh forwarded to 127.0.0.1) and
#                     an ssh login with the manifest's key
#     -d              virtio-blk disk (ext4 image) mounted over the console
#     -x COMMAND      run a shell command on the guest console at the end and
#                     show its output
#     -t SECONDS      give up after this long (default 300)
#     -l FILE         console log (default: a temp file, printed path)
# Exit status 0 when the ready marker (and the requested checks) were seen.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
machine=pc smp=1 mem=128 kimg=vmlinux net=0 disk=0 timeout=300 extra= cmdline= log= xcmd= xsent=0
cpu="host,-cx16,-xsave,-popcnt,-smap,-pcid,-rdrand,-fsgsbase,-smep,-invpcid,-rdseed,-clflushopt,-clwb,-erms,-fsrm,kvm-pv-ipi=off,kvm-pv-sched-yield=off,kvm-pv-unhalt=off"
initrd=
while getopts "M:s:m:k:i:c:a:A:ndx:t:l:h" o; do
	case $o in
	M) machine=$OPTARG ;; s) smp=$OPTARG ;; m) mem=$OPTARG ;; k) kimg=$OPTARG ;;
	i) initrd=$OPTARG ;; c) cpu=$OPTARG ;; a) extra=$OPTARG ;; A) cmdline=$OPTARG ;; n) net=1 ;; d) disk=1 ;; x) xcmd=$OPTARG ;;
	t) timeout=$OPTARG ;; l) log=$OPTARG ;;
	*) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 2 ;;
	esac
done

manifest=$(bash "$HERE/build.sh" --print) || { echo "guest not built: npm run guest" >&2; exit 1; }
field() { printf '%s' "$manifest" | sed -n "s/.*\"$1\": \"\([^\"]*\)\".*/\1/p"; }
case $kimg in vmlinux) kernel=$(field vmlinux) ;; bzImage) kernel=$(field kernel) ;; *) echo "bad -k" >&2; exit 2 ;; esac
case $initrd in
"" | gz) initrd=$(field initrd) ;;
raw) initrd=$(field initrdUncompressed) ;;
esac
key=$(field sshKey)
[ -n "$cmdline" ] || cmdline=$(field cmdline)

work=$(mktemp -d /tmp/tskvm-qemu.XXXXXX)
qpid=
cleanup() {
	[ -n "$qpid" ] && kill "$qpid" 2>/dev/null && wait "$qpid" 2>/dev/null
	exec 3>&- 2>/dev/null || true
	rm -rf -- "$work"
}
trap cleanup EXIT
[ -n "$log" ] || log="$work/console.log"

args=(-M "$machine" -enable-kvm -cpu "$cpu" -m "$mem" -smp "$smp"
	-kernel "$kernel" -initrd "$initrd" -nographic -no-reboot)
if [ "$machine" = microvm ]; then
	args[1]="microvm,rtc=on"
fi
port=
if [ $net = 1 ]; then
	port=$((20000 + RANDOM % 20000))
	args+=(-netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$port-:22" -device virtio-net-pci,netdev=n0)
	extra="$extra ip=10.0.2.15::10.0.2.2:255.255.255.0:tskvm:eth0:off"
fi
if [ $disk = 1 ]; then
	mkdir -p "$work/d"
	echo "tskvm-disk-ok" >"$work/d/hello"
	mke2fs -q -t ext4 -d "$work/d" "$work/disk.img" 16M
	args+=(-drive "file=$work/disk.img,format=raw,if=none,id=d0" -device virtio-blk-pci,drive=d0)
fi
[ $machine = microvm ] && [ $((net + disk)) -gt 0 ] && echo "note: microvm has no PCI; -n/-d need -M pc" >&2
args+=(-append "$cmdline${extra:+ $extra}")

echo "qemu-system-x86_64 ${args[*]}" >&2
mkfifo "$work/in"
t0=$EPOCHREALTIME
qemu-system-x86_64 "${args[@]}" <"$work/in" >"$work/out" 2>&1 &
qpid=$!
exec 3>"$work/in"

elapsed() { awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
milestones='Linux version|console \[ttyS0\] enabled|smpboot: Total of|virtio_blk|IP-Config: Complete|Freeing unused kernel|Run /init|TSKVM-GUEST-READY|SERIAL-OK|DISK:|Kernel panic|emulation failure|Attempted to kill'
rc=
: >"$log"
deadline=$((SECONDS + timeout))
while [ -z "$rc" ]; do
	if ! IFS= read -r -t 2 line; then
		if ! kill -0 "$qpid" 2>/dev/null; then
			echo "qemu exited:" >&2; tail -5 "$work/out" >&2; rc=1
		elif [ $SECONDS -ge $deadline ]; then
			echo "timeout after $timeout s" >&2; rc=1
		fi
		continue
	fi
	line=${line%$'\r'}
	printf '%7.2f %s\n' "$(elapsed)" "$line" >>"$log"
	if [[ $line =~ $milestones ]]; then
		printf '%7s s  %s\n' "$(elapsed)" "$line" >&2
	fi
	step=
	case $line in
	*TSKVM-GUEST-READY*)
		printf 'echo SERIAL-OK $((6*7)) $(nproc)\n' >&3
		;;
	*"SERIAL-OK 42"*)
		if [ $disk = 1 ]; then
			printf 'mount /dev/vda /mnt && echo DISK: $(cat /mnt/hello) && umount /mnt\n' >&3
		else
			step=net
		fi
		;;
	*"DISK: tskvm-disk-ok"*) step=net ;;
	*XCMD-DONE*) [ $xsent = 1 ] && rc=0 ;;
	esac
	[ $xsent = 1 ] && [ -z "$rc" ] && printf '%7s s  | %s\n' "$(elapsed)" "$line" >&2
	if [ "$step" = net ]; then
		if [ $net = 1 ]; then
			t1=$(elapsed)
			if out=$(timeout 120 ssh -i "$key" -p "$port" -o StrictHostKeyChecking=no \
				-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes \
				root@127.0.0.1 'echo SSH-OK $(hostname) $(nproc); ip -4 addr show eth0 | grep inet' 2>&1); then
				printf '%7s s  ssh (started at %s s): %s\n' "$(elapsed)" "$t1" "$(echo $out)" >&2
				rc=0
				if command -v dbclient >/dev/null; then
					t1=$(elapsed)
					if out=$(timeout 120 dbclient -y -y -i "$(field sshKeyDropbear)" -p "$port" \
						root@127.0.0.1 'echo DBCLIENT-OK' 2>&1); then
						printf '%7s s  dbclient (started at %s s): %s\n' "$(elapsed)" "$t1" "$(echo $out)" >&2
					else
						printf '%7s s  dbclient FAILED: %s\n' "$(elapsed)" "$(echo $out)" >&2
						rc=1
					fi
				fi
			else
				printf '%7s s  ssh FAILED: %s\n' "$(elapsed)" "$(echo $out)" >&2
				rc=1
			fi
		else
			rc=0
		fi
	fi
	if [ "$rc" = 0 ] && [ -n "$xcmd" ] && [ $xsent = 0 ]; then
		rc=
		xsent=1
		printf '%s; echo XCMD""-DONE\n' "$xcmd" >&3
	fi
	case $line in
	*"Kernel panic"* | *"emulation failure"* | *"Attempted to kill init"*) rc=1 ;;
	esac
	[ $SECONDS -lt $deadline ] || { echo "timeout after $timeout s" >&2; rc=1; }
done < <(tail -n +1 -f --pid="$qpid" "$work/out" 2>/dev/null)
echo "console log: $log" >&2
exit $rc
