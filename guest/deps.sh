#!/usr/bin/env bash
# Debian packages that guest/build.sh needs. CI runs:
#   apt-get install -y $(bash guest/deps.sh)
# kernel build: build-essential flex bison bc libelf-dev libssl-dev
# kernel source: linux-source-6.1 (tarball under /usr/src)
# initrd:       cpio gzip busybox-static dropbear-bin (dropbearkey, dropbearconvert)
# helpers:      xz-utils (tarball), util-linux (flock), e2fsprogs (ext4 disk images for tests)
# test images:  dosfstools (vfat), genisoimage (ISO 9660), squashfs-tools: the file systems
#               the default guest mounts (test/linux/disks-rng.test.ts)
echo build-essential flex bison bc libelf-dev libssl-dev cpio gzip xz-utils \
	util-linux linux-source-6.1 busybox-static dropbear-bin e2fsprogs \
	dosfstools genisoimage squashfs-tools
