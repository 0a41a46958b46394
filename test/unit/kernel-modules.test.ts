/**
 * Kernel modules for a distribution kernel (tskvm --modules): load order from depmod's
 * index (dependencies, soft dependencies through aliases, built-ins), the archive the
 * guest's /init reads, and the refusals (no index, compressed modules, another release).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import {
  GUEST_DRIVER_MODULES,
  KernelModulesError,
  MODULE_LIST_PATH,
  kernelRelease,
  moduleArchive,
  planModules,
  readModuleIndex,
} from "../../src/boot/kernel-modules";
import { listInitramfs } from "../../src/boot/initramfs";
import { Hdr } from "../../src/boot/setup-header";
import { makeBzImage, makeElf } from "../helpers/images";

const root = mkdtempSync(join(tmpdir(), "tskvm-mods-"));
process.on("exit", () => rmSync(root, { recursive: true, force: true }));

/** A module tree as depmod leaves it, modelled on Debian's 6.1 kernel. */
function tree(name: string, release = "6.1.0-57-amd64", extra: Record<string, string> = {}): string {
  const dir = join(root, name);
  const ko = (path: string) => {
    mkdirSync(dirname(join(dir, path)), { recursive: true });
    writeFileSync(join(dir, path), Buffer.from(`\x7fELF...\0name=${path}\0vermagic=${release} SMP preempt mod_unload modversions \0`));
  };
  const files = {
    "kernel/drivers/virtio/virtio.ko": "",
    "kernel/drivers/virtio/virtio_ring.ko": "",
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko": "",
    "kernel/drivers/virtio/virtio_pci_legacy_dev.ko": "",
    "kernel/drivers/virtio/virtio_pci.ko": "kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/block/virtio_blk.ko": "kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko",
    "kernel/net/core/failover.ko": "",
    "kernel/drivers/net/net_failover.ko": "kernel/net/core/failover.ko",
    "kernel/drivers/net/virtio_net.ko": "kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko",
    "kernel/lib/crc16.ko": "",
    "kernel/fs/mbcache.ko": "",
    "kernel/fs/jbd2/jbd2.ko": "",
    "kernel/fs/ext4/ext4.ko": "kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko",
    "kernel/crypto/crc32c_generic.ko": "",
    "kernel/arch/x86/crypto/crc32c-intel.ko": "",
    ...extra,
  };
  for (const f of Object.keys(files)) if (!f.startsWith("modules.")) ko(f);
  writeFileSync(join(dir, "modules.dep"), Object.entries(files).filter(([f]) => !f.startsWith("modules.")).map(([f, d]) => `${f}: ${d}`.trimEnd() + "\n").join(""));
  writeFileSync(join(dir, "modules.softdep"), "# Soft dependencies extracted from modules themselves.\nsoftdep ext4 pre: crypto-crc32c\nsoftdep jbd2 pre: crypto-crc32c\n");
  writeFileSync(join(dir, "modules.alias"), "alias crypto-crc32c crc32c_intel\nalias crypto-crc32c crc32c_generic\nalias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci\n");
  writeFileSync(join(dir, "modules.builtin"), "kernel/drivers/tty/serial/8250/8250.ko\n");
  return dir;
}

test("planModules: dependencies before each module, soft dependencies (an alias) before, in modprobe's order", () => {
  const plan = planModules(readModuleIndex(tree("debian")), GUEST_DRIVER_MODULES);
  const order = plan.load.map((m) => m.name);
  assert.deepEqual(order, [
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
    "virtio_blk", "failover", "net_failover", "virtio_net",
    "crc32c_intel", "crc32c_generic", "jbd2", "mbcache", "crc16", "ext4",
  ]);
  for (const m of plan.load) for (const d of readModuleIndex(tree("debian")).modules.get(m.name)!.deps) {
    assert.ok(order.indexOf(d) < order.indexOf(m.name), `${d} before ${m.name}`);
  }
  assert.equal(plan.load.find((m) => m.name === "crc32c_intel")!.file, "kernel/arch/x86/crypto/crc32c-intel.ko");
  assert.deepEqual(plan.missing, []);
  const builtin = planModules(readModuleIndex(tree("debian")), ["8250", "no_such_driver"]);
  assert.deepEqual([builtin.builtin, builtin.missing, builtin.load], [["8250"], ["no_such_driver"], []]);
});

test("moduleArchive: the .ko files under lib/modules/RELEASE and the load list the guest's /init reads", () => {
  const dir = tree("archive");
  const { archive, release, plan } = moduleArchive(dir, ["virtio_blk"], "6.1.0-57-amd64");
  assert.equal(release, "6.1.0-57-amd64");
  const entries = listInitramfs(archive);
  const list = Buffer.from(entries.find((e) => e.path === MODULE_LIST_PATH)!.data).toString();
  assert.equal(list, plan.load.map((m) => `/lib/modules/6.1.0-57-amd64/${m.file}\n`).join(""));
  assert.deepEqual(list.trim().split("\n"), [
    "/lib/modules/6.1.0-57-amd64/kernel/drivers/virtio/virtio_ring.ko",
    "/lib/modules/6.1.0-57-amd64/kernel/drivers/virtio/virtio.ko",
    "/lib/modules/6.1.0-57-amd64/kernel/drivers/block/virtio_blk.ko",
  ]);
  for (const path of list.trim().split("\n")) assert.ok(entries.some((e) => `/${e.path}` === path && e.data.byteLength > 0), path);
});

test("refusals name the directory and the fix: no index, a missing dependency, compressed modules, another release", () => {
  const bare = join(root, "bare");
  mkdirSync(bare);
  assert.throws(() => moduleArchive(bare, GUEST_DRIVER_MODULES), (e: Error) => e instanceof KernelModulesError && /bare has no modules\.dep: .*depmod/.test(e.message));
  assert.throws(() => moduleArchive(join(root, "nowhere"), GUEST_DRIVER_MODULES), /nowhere does not exist/);
  const broken = tree("broken", "6.1.0-57-amd64", { "kernel/fs/vfat.ko": "kernel/fs/fat.ko" });
  assert.throws(() => moduleArchive(broken, ["vfat"]), /lists vfat as needing fat, which it does not have/);
  const xz = tree("xz", "6.1.0-57-amd64", { "kernel/drivers/block/loop.ko.xz": "" });
  assert.throws(() => moduleArchive(xz, ["loop"]), /holds loop compressed .*decompress them/);
  assert.throws(() => moduleArchive(tree("other", "6.1.0-40-amd64"), GUEST_DRIVER_MODULES, "6.1.0-57-amd64"), /modules for Linux 6\.1\.0-40-amd64, but the kernel is 6\.1\.0-57-amd64/);
});

test("kernelRelease: a bzImage's kernel_version string, a vmlinux's banner", () => {
  const bz = makeBzImage({ codeBytes: 8192 });
  const at = 0x400;
  Buffer.from(bz.buffer, bz.byteOffset).write("6.1.0-57-amd64 (debian-kernel@lists.debian.org) #1 SMP PREEMPT_DYNAMIC\0", at, "latin1");
  new DataView(bz.buffer, bz.byteOffset).setUint16(Hdr.KERNEL_VERSION, at - 0x200, true);
  assert.equal(kernelRelease(bz), "6.1.0-57-amd64");
  const elf = makeElf({ segments: [{ paddr: 0x100_0000, data: Buffer.from("\0\0Linux version 6.1.192-tskvm (tskvm@tskvm) (gcc) #1\0") }] });
  assert.equal(kernelRelease(elf), "6.1.192-tskvm");
  assert.equal(kernelRelease(makeBzImage()), undefined);
});
