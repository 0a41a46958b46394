import { test } from "node:test";
import assert from "node:assert/strict";

import { GuestMemory } from "../../src/memory/guest-memory";
import {
  BOOT_STACK_POINTER,
  CMDLINE_ADDR,
  EBDA_START,
  HIGH_MEMORY_START,
  MiB,
  PVH_INFO_ADDR,
  ZERO_PAGE_ADDR,
} from "../../src/arch/x86/layout";
import { SELECTOR_CODE32, SELECTOR_CODE64 } from "../../src/arch/x86/boot-tables";
import { CmdlineError, KernelImageError, loadKernel } from "../../src/boot";
import { parseElf } from "../../src/boot/elf";

import { makeElf, pvhNote, u32le, type Note } from "../helpers/images";

const KERNEL = 16 * MiB;
const text = new Uint8Array(8192).map((_, i) => (i * 13) & 0xff);
const data = new Uint8Array(4096).fill(0xd4);
const vmlinux = (notes?: Note[]) =>
  makeElf({
    segments: [
      { paddr: KERNEL, data: text },
      { paddr: KERNEL + 0x10_0000, data, memsz: 0x3000 }, // 8 KiB of .bss after the data
    ],
    entry: KERNEL + 0x40,
    ...(notes === undefined ? {} : { notes }),
  });

function load(image: Uint8Array, opts: { prefer?: "pvh" | "linux64"; initrd?: Uint8Array; cmdline?: string; memMiB?: number } = {}) {
  const mem = GuestMemory.forTest((opts.memMiB ?? 64) * MiB);
  mem.fill(KERNEL, 2 * MiB, 0xaa); // stale bytes the loader must zero where .bss lies
  const plan = loadKernel(mem, {
    kernel: image,
    cmdline: opts.cmdline ?? "console=ttyS0",
    ...(opts.initrd === undefined ? {} : { initrd: opts.initrd }),
    ...(opts.prefer === undefined ? {} : { prefer: opts.prefer }),
  });
  return { mem, plan };
}

test("PT_LOAD segments land at p_paddr, .bss is zeroed, 64-bit entry is e_entry", () => {
  const { mem, plan } = load(vmlinux());
  assert.equal(plan.format, "elf");
  assert.equal(plan.entry, "linux64");
  assert.deepEqual(mem.slice(KERNEL, text.byteLength), text);
  assert.deepEqual(mem.slice(KERNEL + 0x10_0000, data.byteLength), data);
  assert.ok(mem.slice(KERNEL + 0x10_0000 + data.byteLength, 0x2000).every((b) => b === 0), ".bss zeroed");
  assert.equal(mem.readU8(KERNEL + 0x10_3000), 0xaa, "nothing written past memsz");
  assert.equal(plan.kernelStart, KERNEL);
  assert.equal(plan.kernelEnd, KERNEL + 0x10_3000);
  assert.equal(plan.cpu.regs.rip, KERNEL + 0x40);
  assert.equal(plan.cpu.regs.rsi, ZERO_PAGE_ADDR);
  assert.equal(plan.cpu.regs.rsp, BOOT_STACK_POINTER);
  assert.equal(plan.cpu.sregs.cs.selector, SELECTOR_CODE64);
  assert.equal(plan.cpu.sregs.cs.l, true);
});

test("a vmlinux gets a synthesised setup header in its zero page", () => {
  const { mem } = load(vmlinux());
  const zp = ZERO_PAGE_ADDR;
  assert.equal(mem.readU16(zp + 0x1fe), 0xaa55);
  assert.equal(mem.readU32(zp + 0x202), 0x5372_6448);
  assert.equal(mem.readU16(zp + 0x206), 0x020f);
  assert.equal(mem.readU8(zp + 0x210), 0xff);
  assert.equal(mem.readU8(zp + 0x211) & 0x01, 0x01);
  assert.equal(mem.readU32(zp + 0x228), CMDLINE_ADDR);
  assert.equal(mem.readU32(zp + 0x238), 2047);
  assert.equal(mem.readU32(zp + 0x214), 0, "code32_start is a bzImage thing");
  assert.equal(mem.readU8(zp + 0x1e8), 3);
  assert.equal(Number(mem.readU64(zp + 0x2d0 + 2 * 20)), HIGH_MEMORY_START);
});

test("the default command line limit for a vmlinux is 2047 bytes", () => {
  assert.throws(() => load(vmlinux(), { cmdline: "y".repeat(2048) }), (e: unknown) => e instanceof CmdlineError && /at most 2047$/.test(e.message));
});

test("initrd for a vmlinux goes below 0x37ffffff and above the kernel", () => {
  const initrd = new Uint8Array(2 * MiB).fill(7);
  const { plan } = load(vmlinux(), { initrd, memMiB: 1024 });
  assert.ok(plan.initrd!.address + plan.initrd!.size <= 0x3800_0000);
  assert.ok(plan.initrd!.address + plan.initrd!.size > 0x3800_0000 - 4096);
  assert.ok(plan.initrd!.address >= plan.kernelEnd);
});

test("segments outside RAM or in the boot area are rejected before anything is written", () => {
  const high = makeElf({ segments: [{ paddr: KERNEL, data: text }, { paddr: 100 * MiB, data, memsz: 8 * MiB }] });
  const mem = GuestMemory.forTest(64 * MiB);
  assert.throws(
    () => loadKernel(mem, { kernel: high, cmdline: "" }),
    (e: unknown) =>
      e instanceof KernelImageError && /ELF segment 1.*give the guest at least 108 MiB \(-m\)$/.test(e.message),
  );
  assert.equal(mem.readU8(KERNEL), 0, "first segment not written");
  const low = makeElf({ segments: [{ paddr: 0x8000, data: text }] });
  assert.throws(() => load(low), /at 0x8000, below 1 MiB/);
});

test("bad ELF headers give clear errors", () => {
  const seg = [{ paddr: KERNEL, data: text }];
  assert.throws(() => load(makeElf({ segments: seg, elfClass: 1 })), /32-bit ELF/);
  assert.throws(() => load(makeElf({ segments: seg, dataEncoding: 2 })), /big-endian/);
  assert.throws(() => load(makeElf({ segments: seg, machine: 183 })), /machine 183, not x86-64/);
  assert.throws(() => load(makeElf({ segments: seg, type: 3 })), /ET_DYN/);
  assert.throws(() => load(makeElf({ segments: seg, type: 1 })), /type 1, not an executable/);
  assert.throws(() => load(makeElf({ segments: seg, entry: 0xffff_ffff_8100_0000 })), /entry point \(e_entry\) at 0xffffffff81000000, outside every loaded segment/);

  const good = makeElf({ segments: seg });
  assert.throws(() => parseElf(good.subarray(0, 40)), /is truncated: the ELF header/);
  assert.throws(() => parseElf(good.subarray(0, 100)), /is truncated: the ELF program header table \(1 entries\)/);
  assert.throws(() => parseElf(good.subarray(0, good.byteLength - 1)), /is truncated: ELF segment 0/);
  const swapped = good.slice();
  new DataView(swapped.buffer).setBigUint64(64 + 0x28, 16n, true); // memsz < filesz
  assert.throws(() => parseElf(swapped), /file size 0x2000 exceeds memory size 0x10/);
  const none = good.slice();
  new DataView(none.buffer).setUint16(0x38, 0, true);
  assert.throws(() => parseElf(none), /no program headers/);
});

test("a PVH note makes PVH the default entry; prefer linux64 overrides it", () => {
  const other: Note = { name: "GNU", type: 3, desc: new Uint8Array(20).fill(1) };
  const image = vmlinux([other, pvhNote(KERNEL + 0x100)]);
  assert.equal(parseElf(image).pvhEntry, KERNEL + 0x100);
  assert.equal(parseElf(vmlinux([pvhNote(KERNEL + 0x104, 8)])).pvhEntry, KERNEL + 0x104);
  assert.equal(parseElf(vmlinux([other])).pvhEntry, undefined);
  assert.equal(parseElf(vmlinux([{ name: "Linux", type: 18, desc: u32le(5) }])).pvhEntry, undefined, "name must be Xen");

  const pvh = load(image).plan;
  assert.equal(pvh.entry, "pvh");
  assert.equal(pvh.cpu.regs.rip, KERNEL + 0x100);
  assert.equal(pvh.cpu.regs.rbx, PVH_INFO_ADDR);
  assert.equal(pvh.cpu.regs.rsi, 0);
  assert.equal(pvh.cpu.sregs.cs.selector, SELECTOR_CODE32);
  assert.equal(pvh.cpu.sregs.cs.db, true);
  assert.equal(pvh.cpu.sregs.cr0 & 1, 1);
  assert.equal(pvh.cpu.sregs.cr0 >>> 31, 0, "paging off");
  assert.equal(pvh.cpu.sregs.cr4, 0);
  assert.equal(pvh.bootInfoAddr, PVH_INFO_ADDR);

  const linux = load(image, { prefer: "linux64" }).plan;
  assert.equal(linux.entry, "linux64");
  assert.equal(linux.cpu.regs.rip, KERNEL + 0x40);
  assert.equal(load(vmlinux(), { prefer: "pvh" }).plan.entry, "linux64", "no note: linux64 regardless");
  assert.throws(() => load(vmlinux([pvhNote(0x1234_5678)])), /PVH entry .* outside every loaded segment/);
});

test("hvm_start_info decodes to the command line, the initrd module and the e820 map", () => {
  const initrd = new Uint8Array(MiB).fill(3);
  const cmdline = "console=hvc0 quiet";
  const { mem, plan } = load(vmlinux([pvhNote(KERNEL)]), { initrd, cmdline });
  const si = PVH_INFO_ADDR;
  assert.equal(mem.readU32(si), 0x336e_c578, "magic");
  assert.equal(mem.readU32(si + 4), 1, "version");
  assert.equal(mem.readU32(si + 8), 0, "flags");
  assert.equal(mem.readU32(si + 0x0c), 1, "nr_modules");
  assert.equal(mem.readU64(si + 0x20), 0n, "rsdp_paddr");
  const cmdlineAddr = Number(mem.readU64(si + 0x18));
  assert.equal(Buffer.from(mem.slice(cmdlineAddr, cmdline.length + 1)).toString("latin1"), cmdline + "\0");

  const modlist = Number(mem.readU64(si + 0x10));
  assert.ok(modlist >= PVH_INFO_ADDR && modlist < PVH_INFO_ADDR + 0x1000);
  assert.equal(Number(mem.readU64(modlist)), plan.initrd!.address);
  assert.equal(Number(mem.readU64(modlist + 8)), initrd.byteLength);
  assert.deepEqual(mem.slice(plan.initrd!.address, initrd.byteLength), initrd);

  const memmap = Number(mem.readU64(si + 0x28));
  const entries = mem.readU32(si + 0x30);
  const map = [];
  for (let i = 0; i < entries; i++) {
    const at = memmap + i * 24;
    map.push({ addr: Number(mem.readU64(at)), size: Number(mem.readU64(at + 8)), type: mem.readU32(at + 16) });
    assert.equal(mem.readU32(at + 20), 0, "reserved");
  }
  assert.ok(memmap + entries * 24 <= PVH_INFO_ADDR + 0x1000);
  assert.deepEqual(map, [
    { addr: 0, size: EBDA_START, type: 1 },
    { addr: EBDA_START, size: HIGH_MEMORY_START - EBDA_START, type: 2 },
    { addr: HIGH_MEMORY_START, size: 63 * MiB, type: 1 },
  ]);

  const noInitrd = load(vmlinux([pvhNote(KERNEL)])).mem;
  assert.equal(noInitrd.readU32(si + 0x0c), 0);
  assert.equal(noInitrd.readU64(si + 0x10), 0n, "no module list");
});
