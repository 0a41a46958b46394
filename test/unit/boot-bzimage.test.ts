import { test } from "node:test";
import assert from "node:assert/strict";

import { GuestMemory } from "../../src/memory/guest-memory";
import {
  BOOT_STACK_POINTER,
  CMDLINE_ADDR,
  EBDA_START,
  HIGH_MEMORY_START,
  KERNEL_LOAD_ADDR,
  MiB,
  SETUP_DATA_ADDR,
  ZERO_PAGE_ADDR,
} from "../../src/arch/x86/layout";
import { RNG_SEED_BYTES, SETUP_RNG_SEED } from "../../src/boot/setup-data";
import { SELECTOR_CODE32, SELECTOR_CODE64 } from "../../src/arch/x86/boot-tables";
import { CmdlineError, InitrdError, KernelImageError, detectKernelFormat, loadKernel } from "../../src/boot";
import { parseBzImage, runtimeRange } from "../../src/boot/bzimage";
import { placeInitrd } from "../../src/boot/initrd";

import { makeBzImage } from "../helpers/images";

function load(image: Uint8Array, opts: { initrd?: Uint8Array; cmdline?: string; memMiB?: number } = {}) {
  const mem = GuestMemory.forTest((opts.memMiB ?? 128) * MiB);
  const plan = loadKernel(mem, {
    kernel: image,
    cmdline: opts.cmdline ?? "console=ttyS0",
    ...(opts.initrd === undefined ? {} : { initrd: opts.initrd }),
  });
  return { mem, plan };
}

test("parses the header fields tskvm uses", () => {
  const bz = parseBzImage(makeBzImage({ setupSects: 0, codeBytes: 8192, initSize: 0x123000 }));
  assert.equal(bz.setupSects, 4, "setup_sects 0 means 4");
  assert.equal(bz.setupBytes, 5 * 512);
  assert.equal(bz.syssize, 512);
  assert.equal(bz.protectedMode.byteLength, 8192);
  assert.equal(bz.version, 0x020f);
  assert.equal(bz.cmdlineSize, 2047);
  assert.equal(bz.initrdAddrMax, 0x7fff_ffff);
  assert.equal(bz.kernelAlignment, 0x20_0000);
  assert.equal(bz.relocatable, true);
  assert.equal(bz.prefAddress, 0x100_0000);
  assert.equal(bz.initSize, 0x123000);
  assert.equal(bz.setupHeader.byteLength, 0x26c - 0x1f1);
});

test("a file that is neither bzImage nor ELF is rejected, and the caller can add its path", () => {
  const junk = new Uint8Array(4096).fill(0x90);
  assert.throws(() => detectKernelFormat(junk), (e: unknown) => {
    assert.ok(e instanceof KernelImageError);
    assert.equal(e.message, "kernel image is not a bzImage or ELF vmlinux (no HdrS signature at 0x202, no ELF magic)");
    const named = e.withPath("/boot/x");
    assert.ok(named instanceof KernelImageError);
    assert.equal(named.message, "kernel image /boot/x is not a bzImage or ELF vmlinux (no HdrS signature at 0x202, no ELF magic)");
    assert.equal(named.path, "/boot/x");
    return true;
  });
  assert.throws(() => load(new Uint8Array(10)), KernelImageError);
});

test("rejects a bad boot flag, an old protocol and a zImage", () => {
  assert.throws(() => parseBzImage(makeBzImage({ bootFlag: 0x1234 })), /boot flag at 0x1fe is 0x1234, not 0xaa55/);
  assert.throws(
    () => parseBzImage(makeBzImage({ version: 0x0204 })),
    (e: unknown) =>
      e instanceof KernelImageError &&
      e.message === "kernel image uses boot protocol 2.04, which is too old: tskvm needs 2.06 or later (Linux 2.6.22+)",
  );
  assert.throws(() => parseBzImage(makeBzImage({ loadflags: 0 })), /is a zImage/);
});

test("detects truncated images", () => {
  assert.throws(
    () => parseBzImage(makeBzImage({ codeBytes: 4096, chop: 1000 })),
    (e: unknown) =>
      e instanceof KernelImageError &&
      e.message === "kernel image is truncated: expected 4096 bytes of protected-mode code, file has 3096",
  );
  assert.throws(() => parseBzImage(makeBzImage({ setupSects: 4, codeBytes: 16, chop: 600 })), /setup sectors need 2560 bytes/);
});

test("64-bit kernel: long mode, entry at load address + 0x200, code at 1 MiB", () => {
  const image = makeBzImage();
  const { mem, plan } = load(image);
  assert.equal(plan.format, "bzImage");
  assert.equal(plan.entry, "linux64");
  assert.equal(plan.cpu.regs.rip, KERNEL_LOAD_ADDR + 0x200);
  assert.equal(plan.cpu.regs.rsi, ZERO_PAGE_ADDR);
  assert.equal(plan.cpu.regs.rsp, BOOT_STACK_POINTER);
  assert.equal(plan.cpu.regs.rflags & 2, 2);
  assert.equal(plan.cpu.sregs.cs.selector, SELECTOR_CODE64);
  assert.equal(plan.cpu.sregs.efer & (1 << 10), 1 << 10);
  assert.deepEqual(mem.slice(KERNEL_LOAD_ADDR, 4096), image.subarray(1024));
  assert.equal(plan.bootInfoAddr, ZERO_PAGE_ADDR);
});

test("32-bit kernel (no XLF_KERNEL_64, or protocol before 2.12): protected mode at code32_start", () => {
  for (const image of [makeBzImage({ xloadflags: 0 }), makeBzImage({ version: 0x020a, xloadflags: 1 })]) {
    const { mem, plan } = load(image);
    assert.equal(plan.entry, "linux32");
    assert.equal(plan.cpu.regs.rip, KERNEL_LOAD_ADDR);
    assert.equal(mem.readU32(ZERO_PAGE_ADDR + 0x214), KERNEL_LOAD_ADDR, "code32_start");
    assert.equal(plan.cpu.regs.rsi, ZERO_PAGE_ADDR);
    assert.equal(plan.cpu.regs.rbx, 0);
    assert.equal(plan.cpu.regs.rbp, 0);
    assert.equal(plan.cpu.sregs.cs.selector, SELECTOR_CODE32);
    assert.equal(plan.cpu.sregs.cr0 >>> 31, 0, "paging off");
  }
});

test("the kernel's runtime range (pref_address + init_size) must fit in RAM", () => {
  const big = makeBzImage({ prefAddress: 16 * MiB, initSize: 32 * MiB });
  assert.deepEqual(runtimeRange(parseBzImage(big)), { start: 16 * MiB, end: 48 * MiB });
  const nonReloc = parseBzImage(makeBzImage({ relocatable: false, prefAddress: 0x40_0000, initSize: MiB }));
  assert.deepEqual(runtimeRange(nonReloc), { start: 0x40_0000, end: 0x50_0000 });
  assert.throws(
    () => load(big, { memMiB: 32 }),
    (e: unknown) => e instanceof KernelImageError && /give the guest at least 48 MiB \(-m\)$/.test(e.message),
  );
  const { plan } = load(big, { memMiB: 48 });
  assert.equal(plan.kernelStart, KERNEL_LOAD_ADDR);
  assert.equal(plan.kernelEnd, 48 * MiB);
});

test("zero page fields sit at the boot protocol's offsets", () => {
  const initrd = new Uint8Array(3 * MiB + 5).fill(0x5a);
  const cmdline = "console=ttyS0 root=/dev/vda";
  const { mem, plan } = load(makeBzImage(), { initrd, cmdline });
  const zp = ZERO_PAGE_ADDR;
  assert.equal(mem.readU16(zp + 0x1fe), 0xaa55, "boot_flag");
  assert.equal(mem.readU32(zp + 0x202), 0x5372_6448, "HdrS");
  assert.equal(mem.readU16(zp + 0x206), 0x020f, "version");
  assert.equal(mem.readU8(zp + 0x1f1), 1, "setup_sects copied");
  assert.equal(mem.readU8(zp + 0x1ef), 0, "sentinel stays 0");
  assert.equal(mem.readU8(zp + 0x210), 0xff, "type_of_loader");
  assert.equal(mem.readU8(zp + 0x211) & 0x81, 0x81, "LOADED_HIGH | CAN_USE_HEAP");
  assert.equal(mem.readU16(zp + 0x224), 0xde00, "heap_end_ptr");
  assert.equal(mem.readU32(zp + 0x228), CMDLINE_ADDR, "cmd_line_ptr");
  assert.equal(mem.readU32(zp + 0x0c8), 0, "ext_cmd_line_ptr");
  assert.equal(mem.readU32(zp + 0x218), plan.initrd!.address, "ramdisk_image");
  assert.equal(mem.readU32(zp + 0x21c), initrd.byteLength, "ramdisk_size");
  assert.equal(mem.readU32(zp + 0x0c0), 0, "ext_ramdisk_image");
  assert.equal(mem.readU32(zp + 0x0c4), 0, "ext_ramdisk_size");

  const count = mem.readU8(zp + 0x1e8);
  assert.equal(count, 3);
  const table = [];
  for (let i = 0; i < count; i++) {
    const at = zp + 0x2d0 + i * 20;
    table.push({ addr: Number(mem.readU64(at)), size: Number(mem.readU64(at + 8)), type: mem.readU32(at + 16) });
  }
  assert.deepEqual(table, [
    { addr: 0, size: EBDA_START, type: 1 },
    { addr: EBDA_START, size: HIGH_MEMORY_START - EBDA_START, type: 2 },
    { addr: HIGH_MEMORY_START, size: 127 * MiB, type: 1 },
  ]);
  assert.deepEqual(table, plan.e820);

  const written = mem.slice(CMDLINE_ADDR, cmdline.length + 1);
  assert.equal(Buffer.from(written.subarray(0, cmdline.length)).toString(), cmdline);
  assert.equal(written[cmdline.length], 0, "NUL-terminated");
});

test("command line length is checked against the kernel's cmdline_size", () => {
  assert.throws(
    () => load(makeBzImage(), { cmdline: "x".repeat(3000) }),
    (e: unknown) =>
      e instanceof CmdlineError && e.message === "kernel command line is 3000 bytes; this kernel accepts at most 2047",
  );
  assert.doesNotThrow(() => load(makeBzImage(), { cmdline: "x".repeat(2047) }));
  assert.throws(() => load(makeBzImage({ cmdlineSize: 0x100000 }), { cmdline: "x".repeat(0x10000) }), /tskvm accepts at most 65535/);
  assert.throws(() => load(makeBzImage(), { cmdline: "a\0b" }), /NUL/);
});

test("initrd goes page-aligned as high as allowed, above the kernel", () => {
  const initrd = new Uint8Array(MiB + 123).map((_, i) => i & 0xff);
  const { mem, plan } = load(makeBzImage({ initrdAddrMax: 0x3ff_ffff }), { initrd });
  const { address, size } = plan.initrd!;
  assert.equal(address % 4096, 0);
  assert.equal(size, initrd.byteLength);
  assert.ok(address + size <= 0x400_0000, "ends at or below initrd_addr_max");
  assert.ok(address + size > 0x400_0000 - 4096, "as high as possible");
  assert.ok(address >= plan.kernelEnd);
  assert.deepEqual(mem.slice(address, size), initrd);

  // With a generous initrd_addr_max, the end of RAM is the limit.
  const low = load(makeBzImage(), { initrd, memMiB: 64 }).plan.initrd!;
  assert.ok(low.address + low.size <= 64 * MiB && low.address + low.size > 64 * MiB - 4096);
});

test("an initrd that does not fit says how much memory would do", () => {
  const initrd = new Uint8Array(100 * MiB);
  let advice = 0;
  assert.throws(
    () => load(makeBzImage({ initrdAddrMax: 0x37ff_ffff }), { initrd, memMiB: 64 }),
    (e: unknown) => {
      assert.ok(e instanceof InitrdError);
      const m = /^initrd of 100 MiB does not fit below 0x37ffffff in 64 MiB of guest RAM: give the guest at least (\d+) MiB \(-m\)$/.exec(e.message);
      assert.ok(m, e.message);
      advice = Number(m[1]);
      assert.equal(e.withPath("/tmp/initrd.img").message.startsWith("initrd /tmp/initrd.img of 100 MiB"), true);
      return true;
    },
  );
  // The advice is right: that much memory is enough, and 1 MiB less is not.
  assert.doesNotThrow(() => load(makeBzImage({ initrdAddrMax: 0x37ff_ffff }), { initrd, memMiB: advice }));
  assert.throws(() => load(makeBzImage({ initrdAddrMax: 0x37ff_ffff }), { initrd, memMiB: advice - 1 }), InitrdError);

  // When initrd_addr_max is the limit, more memory does not help.
  assert.throws(
    () => placeInitrd(1024 * MiB, 100 * MiB, { kernelEnd: 48 * MiB, addrMax: 0x7ff_ffff }),
    /does not fit between the kernel's end \(0x3000000\) and 0x7ffffff.*use a smaller initrd$/,
  );
  assert.throws(() => placeInitrd(1024 * MiB, 0, { kernelEnd: 48 * MiB, addrMax: 0x7ff_ffff }), /initrd is empty/);
});

test("a random seed for the kernel's CRNG travels as setup_data (protocol 2.09+), fresh each boot", () => {
  const seedOf = (version: number) => {
    const { mem } = load(makeBzImage({ version }));
    const at = Number(mem.readU64(ZERO_PAGE_ADDR + 0x250));
    if (at === 0) return undefined;
    assert.equal(at, SETUP_DATA_ADDR);
    assert.equal(mem.readU64(at), 0n, "the only node");
    assert.equal(mem.readU32(at + 8), SETUP_RNG_SEED);
    assert.equal(mem.readU32(at + 12), RNG_SEED_BYTES);
    return Buffer.from(mem.slice(at + 16, RNG_SEED_BYTES)).toString("hex");
  };
  const a = seedOf(0x020f);
  const b = seedOf(0x0209);
  assert.ok(a !== undefined && b !== undefined);
  assert.notEqual(a, b);
  assert.notEqual(a, "00".repeat(RNG_SEED_BYTES));
  assert.equal(seedOf(0x0208), undefined, "no setup_data before protocol 2.09");
});
