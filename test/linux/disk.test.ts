/**
 * Tier 3: virtio-blk with a real Linux guest. The guest probes virtio-pci, finds /dev/vda
 * with the image's capacity, mounts its ext4 file system, writes a file and unmounts; after
 * tskvm stops, the host finds the file in the image (debugfs) and the superblock's mount
 * count changed. A read-only disk refuses writes. A second boot with INTx and the legacy
 * virtio interface (pci=nomsi virtio_pci.force_legacy=1) reads the file back.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { bootFilesFor } from "../../src/api/default-guest";
import { RunningCli } from "../helpers/cli";
import { guestSkip, hostKvm, whereItRuns } from "../helpers/tiers";

const { guest: built, skip } = guestSkip();
const emulated = skip === false && hostKvm().kind === "emulated-pvm";
const TIMEOUT_MS = skip === false && hostKvm().softwareEmulated ? 420_000 : 60_000;
const dir = mkdtempSync(join(tmpdir(), "tskvm-disk-"));
process.on("exit", () => rmSync(dir, { recursive: true, force: true }));

function sh(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: "utf8" });
  assert.equal(r.status, 0, `${cmd} ${args.join(" ")}: ${r.stderr}`);
  return r.stdout;
}

function makeExt4(name: string, mib: number): string {
  const path = join(dir, name);
  sh("truncate", ["-s", `${mib}M`, path]);
  sh("mkfs.ext4", ["-q", "-F", path]);
  return path;
}

function mountCount(image: string): number {
  const m = /Mount count:\s+(\d+)/.exec(sh("dumpe2fs", ["-h", image]));
  return Number(m![1]);
}

const sha = (path: string) => createHash("sha256").update(readFileSync(path)).digest("hex");

/** Type a command line on the serial console and wait for its end marker. */
async function run(vm: RunningCli, command: string, marker: string): Promise<void> {
  vm.send(`${command}; echo ${marker}-$?\n`);
  await vm.waitFor(new RegExp(`${marker}-\\d+`), TIMEOUT_MS);
}

test("virtio-blk: an ext4 disk mounted, written and read back by Linux; read-only disks refuse writes", { skip, timeout: 1_200_000 }, async (t) => {
  const guest = built!;
  t.diagnostic(`tier: Linux on ${whereItRuns()}`);
  if (spawnSync("mkfs.ext4", ["-V"]).status !== 0) return t.skip("mkfs.ext4 (e2fsprogs) is not installed");
  const { kernel, initrd } = bootFilesFor(guest, emulated);
  const data = makeExt4("data.img", 64);
  const ro = makeExt4("ro.img", 16);
  const roBefore = sha(ro);
  const payload = `written-by-the-guest-${process.pid}`;

  t.diagnostic("boot 1: modern virtio-pci with MSI-X; /dev/vda read-write, /dev/vdb read-only");
  const vm = new RunningCli(["boot", "-k", kernel, "-i", initrd, "-m", "128M", "-d", data, "-d", `${ro},readonly`]);
  try {
    const probed = await vm.waitFor(/virtio_blk virtio0: \[vda\] 131072 512-byte logical blocks/, TIMEOUT_MS);
    t.diagnostic(`[vda] with the image's 131072 sectors after ${probed} ms`);
    await vm.waitFor(/virtio_blk virtio1: \[vdb\] 32768 512-byte logical blocks/, TIMEOUT_MS);
    await vm.waitFor(/built-in shell/, TIMEOUT_MS);
    await run(vm, `mount -t ext4 /dev/vda /mnt && echo ${payload} > /mnt/hello.txt && cat /mnt/hello.txt && umount /mnt`, "WROTE");
    assert.match(vm.stdout, /WROTE-0/, "mount, write and unmount succeed in the guest");
    await run(vm, "cat /sys/block/vdb/ro", "RO");
    assert.match(vm.stdout, /\n1\r?\nRO-0/, "the guest sees vdb read-only");
    await run(vm, "dd if=/dev/zero of=/dev/vdb bs=512 count=1 conv=fsync 2>/dev/null", "DD");
    assert.doesNotMatch(vm.stdout, /DD-0/, "writing to the read-only disk fails");
    vm.send("\x01x");
    assert.equal((await vm.exited).code, 0, vm.stderr);
  } finally {
    vm.kill();
  }
  assert.equal(sh("debugfs", ["-R", "cat /hello.txt", data]).trim(), payload, "the file is in the image on the host");
  assert.equal(mountCount(data), 1, "the superblock's mount count changed");
  assert.equal(sha(ro), roBefore, "the read-only image is byte-for-byte unchanged");

  t.diagnostic("boot 2: legacy virtio (force_legacy) with INTx (pci=nomsi) reads the file back");
  const cmdline = `${guest.cmdline ?? "console=ttyS0 reboot=k panic=-1"} pci=nomsi virtio_pci.force_legacy=1`;
  const vm2 = new RunningCli(["boot", "-k", kernel, "-i", initrd, "-m", "128M", "-d", data, "-p", cmdline]);
  try {
    await vm2.waitFor(/\[vda\] 131072 512-byte logical blocks/, TIMEOUT_MS);
    await vm2.waitFor(/built-in shell/, TIMEOUT_MS);
    await run(vm2, "mount -t ext4 -o ro /dev/vda /mnt && cat /mnt/hello.txt && umount /mnt", "READ");
    assert.match(vm2.stdout, new RegExp(`${payload}\\r?\\n`), "the file written in the first VM is read in the second");
    assert.match(vm2.stdout, /READ-0/);
    assert.doesNotMatch(vm2.stdout, /MSI-X|msix/i, "no MSI-X in this boot");
    vm2.send("\x01x");
    assert.equal((await vm2.exited).code, 0, vm2.stderr);
  } finally {
    vm2.kill();
  }
});
