#!/bin/sh
# /init of the harness VM (scripts/harness-vm.ts), run by busybox in the VM's initramfs.
#
# Loads the kernel modules listed in /etc/tskvm/modules (9p, overlay, kvm_amd, ...), shows
# the host's root file system read-only over virtio-9p with a tmpfs overlay on top, mounts
# the directories the host shares read-write (9p tags rw0, rw1, ... at the paths listed in
# the control directory's "rw" file), then runs the host's command script (ctl/cmd.sh)
# with the host's /bin/sh in that root: stdin /dev/null, stdout on ttyS1, stderr on ttyS2
# (the host streams both), the kernel's console on ttyS0. The command's exit status goes
# to ctl/status; then the VM powers off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

say() { echo "harness-vm-init: $*" >/dev/kmsg; }
fail() {
	say "$*"
	echo "harness-vm: inside the VM: $*" >/dev/ttyS2
	poweroff -f
}

while read -r ko; do
	insmod "$ko" || say "insmod $ko failed"
done </etc/tskvm/modules

P9=trans=virtio,version=9p2000.L,msize=512000
mkdir -p /mnt/lower /mnt/upper /mnt/ctl /newroot
mount -t 9p -o "$P9,ro,cache=loose" hostroot /mnt/lower || fail "cannot mount the host's root (9p)"
mount -t 9p -o "$P9" ctl /mnt/ctl || fail "cannot mount the control directory (9p)"
mount -t tmpfs -o mode=0755 tmpfs /mnt/upper
mkdir -p /mnt/upper/data /mnt/upper/work
mount -t overlay -o lowerdir=/mnt/lower,upperdir=/mnt/upper/data,workdir=/mnt/upper/work overlay /newroot ||
	fail "cannot mount the overlay root"

R=/newroot
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mount -t tmpfs -o mode=0755 tmpfs $R/run
mkdir -p $R/run/harness
mount --bind /mnt/ctl $R/run/harness
while read -r tag dir; do
	[ -n "$tag" ] || continue
	mkdir -p "$R$dir"
	mount -t 9p -o "$P9" "$tag" "$R$dir" || fail "cannot mount $dir read-write (9p)"
done </mnt/ctl/rw

hostname harness
ip link set lo up 2>/dev/null
stty -F /dev/ttyS1 raw -echo
stty -F /dev/ttyS2 raw -echo
[ -c /dev/kvm ] || say "no /dev/kvm (kvm_amd did not load: does the CPU model have svm?)"
say "running the command"
# Not a plain chroot: the kernel refuses a chrooted process user namespaces (passt and
# virtiofsd make one), so the command gets a mount namespace whose root is $R, as
# switch_root would make it: $R moved onto / there, then chroot to it. PID 1 keeps the
# initramfs and writes the status below.
unshare -m /bin/sh -c "cd $R && mount --move . / && exec chroot . /bin/sh /run/harness/cmd.sh" </dev/null >/dev/ttyS1 2>/dev/ttyS2
status=$?
say "the command exited with status $status"
echo $status >/mnt/ctl/status
sync
poweroff -f
