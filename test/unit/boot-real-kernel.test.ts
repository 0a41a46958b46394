import { test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";

import { GuestMemory } from "../../src/memory/guest-memory";
import { KERNEL_LOAD_ADDR, MiB, ZERO_PAGE_ADDR, PVH_INFO_ADDR } from "../../src/arch/x86/layout";
import { loadKernel } from "../../src/boot";
import { parseBzImage } from "../../src/boot/bzimage";

interface Manifest {
  kernel: string;
  vmlinux: string;
  initrd?: string;
}

/** The guest kernel `npm run guest` builds, if any: its manifest names the files. */
function findGuestKernel(): { dir: string; manifest: Manifest } | undefined {
  const cache = process.env["XDG_CACHE_HOME"] || path.join(os.homedir(), ".cache");
  const root = path.join(cache, "tskvm", "guest");
  if (!fs.existsSync(root)) return undefined;
  for (const entry of fs.readdirSync(root).sort()) {
    const file = path.join(root, entry, "manifest.json");
    if (!fs.existsSync(file)) continue;
    const manifest = JSON.parse(fs.readFileSync(file, "utf8")) as Manifest;
    const dir = path.dirname(file);
    const resolve = (p: string) => path.resolve(dir, p);
    if (fs.existsSync(resolve(manifest.kernel)) && fs.existsSync(resolve(manifest.vmlinux))) {
      const initrd = manifest.initrd === undefined ? {} : { initrd: resolve(manifest.initrd) };
      return { dir, manifest: { kernel: resolve(manifest.kernel), vmlinux: resolve(manifest.vmlinux), ...initrd } };
    }
  }
  return undefined;
}

const guest = findGuestKernel();
const SKIP = "no built guest kernel: run npm run guest";

/** The built initrd when there is one, else a stand-in page. */
function guestInitrd(manifest: Manifest): Uint8Array {
  if (manifest.initrd !== undefined && fs.existsSync(manifest.initrd)) return new Uint8Array(fs.readFileSync(manifest.initrd));
  return new Uint8Array(4096).fill(1);
}

test("loads the built guest bzImage", (t) => {
  if (guest === undefined) return t.skip(SKIP);
  const image = new Uint8Array(fs.readFileSync(guest.manifest.kernel));
  const initrd = guestInitrd(guest.manifest);
  const bz = parseBzImage(image);
  assert.ok(bz.version >= 0x020c, `protocol 0x${bz.version.toString(16)}`);
  const mem = GuestMemory.forTest(256 * MiB);
  const plan = loadKernel(mem, { kernel: image, cmdline: "console=ttyS0", initrd });
  assert.equal(plan.format, "bzImage");
  assert.equal(plan.entry, "linux64");
  assert.equal(plan.cpu.regs.rip, KERNEL_LOAD_ADDR + 0x200);
  assert.equal(plan.cpu.regs.rsi, ZERO_PAGE_ADDR);
  assert.ok(plan.kernelEnd > KERNEL_LOAD_ADDR + bz.protectedMode.byteLength - 1);
  assert.ok(plan.initrd!.address >= plan.kernelEnd);
  assert.equal(plan.initrd!.size, initrd.byteLength);
  assert.deepEqual(mem.slice(KERNEL_LOAD_ADDR, 512), image.subarray(bz.setupBytes, bz.setupBytes + 512));
});

test("loads the built guest vmlinux, through PVH when it has the note", (t) => {
  if (guest === undefined) return t.skip(SKIP);
  const image = new Uint8Array(fs.readFileSync(guest.manifest.vmlinux));
  const mem = GuestMemory.forTest(256 * MiB);
  const plan = loadKernel(mem, { kernel: image, cmdline: "console=ttyS0", initrd: guestInitrd(guest.manifest) });
  assert.equal(plan.format, "elf");
  assert.ok(plan.initrd!.address >= plan.kernelEnd);
  assert.ok(plan.cpu.regs.rip >= plan.kernelStart && plan.cpu.regs.rip < plan.kernelEnd);
  if (plan.entry === "pvh") {
    assert.equal(plan.cpu.regs.rbx, PVH_INFO_ADDR);
    assert.equal(mem.readU32(PVH_INFO_ADDR), 0x336e_c578);
  } else {
    t.diagnostic("this vmlinux has no PVH note (CONFIG_PVH off)");
  }
  const linux = loadKernel(GuestMemory.forTest(256 * MiB), { kernel: image, cmdline: "", prefer: "linux64" });
  assert.equal(linux.entry, "linux64");
  assert.ok(linux.cpu.regs.rip >= linux.kernelStart && linux.cpu.regs.rip < linux.kernelEnd);
});
