import { test } from "node:test";
import assert from "node:assert/strict";

import { GuestMemory } from "../../src/memory/guest-memory";
import {
  BOOT_GDT_ADDR,
  BOOT_IDT_ADDR,
  BOOT_STACK_POINTER,
  CMDLINE_ADDR,
  EBDA_START,
  GiB,
  HIGH_MEMORY_START,
  MiB,
  PD_ADDR,
  PD_COUNT,
  PDPT_ADDR,
  PML4_ADDR,
  PVH_INFO_ADDR,
  PVH_INFO_END,
  ZERO_PAGE_ADDR,
} from "../../src/arch/x86/layout";
import { gdtEntry, segmentFromGdtEntry } from "../../src/arch/x86/cpu-state";
import {
  BOOT_GDT,
  SELECTOR_CODE32,
  SELECTOR_CODE64,
  SELECTOR_DATA,
  setupLongMode,
  setupProtectedMode,
} from "../../src/arch/x86/boot-tables";
import { E820_RAM, E820_RESERVED, buildE820 } from "../../src/arch/x86/e820";

test("boot GDT entries are the flat 4 GiB descriptors everyone uses", () => {
  // Independent expectations: the classic encodings (Linux's GDT_ENTRY(0xa09b, 0, 0xfffff) etc.).
  assert.equal(BOOT_GDT[0], 0n);
  assert.equal(BOOT_GDT[SELECTOR_CODE64 / 8], 0x00af_9b00_0000_ffffn);
  assert.equal(BOOT_GDT[SELECTOR_CODE32 / 8], 0x00cf_9b00_0000_ffffn);
  assert.equal(BOOT_GDT[SELECTOR_DATA / 8], 0x00cf_9300_0000_ffffn);
  // Linux's 32-bit boot protocol needs __BOOT_CS = 0x10 and __BOOT_DS = 0x18.
  assert.equal(SELECTOR_CODE32, 0x10);
  assert.equal(SELECTOR_DATA, 0x18);
});

test("gdtEntry and segmentFromGdtEntry agree on odd bases and limits", () => {
  const entry = gdtEntry(0x4093 | 0x1000, 0x1234_5678, 0xabcde); // DB, AVL, present data, byte granular
  const seg = segmentFromGdtEntry(entry, 0x28);
  assert.deepEqual(seg, {
    base: 0x1234_5678,
    limit: 0xabcde,
    selector: 0x28,
    type: 3,
    present: true,
    dpl: 0,
    db: true,
    s: true,
    l: false,
    g: false,
    avl: true,
  });
  const high = segmentFromGdtEntry(gdtEntry(0xc0fb, 0xff00_0000, 0xfffff), 0x33);
  assert.equal(high.base, 0xff00_0000);
  assert.equal(high.limit, 0xffff_ffff);
  assert.equal(high.dpl, 3);
});

test("long mode: GDT in memory matches the segment registers, paging and EFER set", () => {
  const mem = GuestMemory.forTest(16 * MiB);
  const s = setupLongMode(mem);
  assert.deepEqual(s.gdt, { base: BOOT_GDT_ADDR, limit: BOOT_GDT.length * 8 - 1 });
  assert.deepEqual(s.idt, { base: BOOT_IDT_ADDR, limit: 0 });
  for (let i = 0; i < BOOT_GDT.length; i++) assert.equal(mem.readU64(BOOT_GDT_ADDR + i * 8), BOOT_GDT[i]);

  assert.deepEqual(s.cs, segmentFromGdtEntry(mem.readU64(BOOT_GDT_ADDR + s.cs.selector), s.cs.selector));
  assert.equal(s.cs.selector, SELECTOR_CODE64);
  assert.equal(s.cs.l, true);
  assert.equal(s.cs.db, false);
  for (const seg of [s.ds, s.es, s.fs, s.gs, s.ss]) {
    assert.equal(seg.selector, SELECTOR_DATA);
    assert.deepEqual(seg, segmentFromGdtEntry(mem.readU64(BOOT_GDT_ADDR + SELECTOR_DATA), SELECTOR_DATA));
    assert.equal(seg.limit, 0xffff_ffff);
    assert.equal(seg.type, 3);
  }
  assert.equal(s.cr0 & 1, 1, "CR0.PE");
  assert.equal(s.cr0 >>> 31, 1, "CR0.PG");
  assert.equal(s.cr4 & (1 << 5), 1 << 5, "CR4.PAE");
  assert.equal(s.efer, (1 << 8) | (1 << 10), "EFER.LME|LMA");
  assert.equal(s.cr3, PML4_ADDR);
});

/** Walk the 4-level page tables for `va`; returns the physical address or undefined. */
function translate(mem: GuestMemory, cr3: number, va: number): number | undefined {
  const index = (shift: number) => Math.floor(va / 2 ** shift) % 512;
  const pml4e = mem.readU64(cr3 + index(39) * 8);
  if ((pml4e & 1n) === 0n) return undefined;
  const pdpte = mem.readU64(Number(pml4e & 0x000f_ffff_ffff_f000n) + index(30) * 8);
  if ((pdpte & 1n) === 0n) return undefined;
  assert.equal(pdpte & 0x80n, 0n, "no 1 GiB pages");
  const pde = mem.readU64(Number(pdpte & 0x000f_ffff_ffff_f000n) + index(21) * 8);
  if ((pde & 1n) === 0n) return undefined;
  assert.equal(pde & 0x80n, 0x80n, "2 MiB pages");
  assert.equal(pde & 2n, 2n, "writable");
  return Number(pde & 0x000f_ffff_ffe0_0000n) + (va % (2 * MiB));
}

test("page tables identity-map 0..4 GiB with 2 MiB pages and nothing above", () => {
  const mem = GuestMemory.forTest(16 * MiB);
  const { cr3 } = setupLongMode(mem);
  for (const va of [0, 0x1234, HIGH_MEMORY_START + 0x200, 0x37ff_f123, 0x8000_0000 + 7, 0xfee0_0000, 4 * GiB - 1]) {
    assert.equal(translate(mem, cr3, va), va, `va 0x${va.toString(16)}`);
  }
  assert.equal(translate(mem, cr3, 4 * GiB), undefined);
  assert.equal(PD_COUNT * GiB, 4 * GiB);
  assert.equal(mem.readU64(PML4_ADDR + 8), 0n, "only PML4[0] present");
  assert.equal(Number(mem.readU64(PDPT_ADDR) & ~0xfffn), PD_ADDR);
});

test("protected mode: flat 32-bit segments, paging off", () => {
  const mem = GuestMemory.forTest(16 * MiB);
  const s = setupProtectedMode(mem);
  assert.equal(s.cs.selector, SELECTOR_CODE32);
  assert.equal(s.cs.db, true);
  assert.equal(s.cs.l, false);
  assert.equal(s.cs.base, 0);
  assert.equal(s.cs.limit, 0xffff_ffff);
  assert.equal(s.cs.type, 0xb);
  assert.equal(s.ss.selector, SELECTOR_DATA);
  assert.equal(s.cr0 & 1, 1, "CR0.PE");
  assert.equal(s.cr0 >>> 31, 0, "CR0.PG clear");
  assert.equal(s.cr4, 0);
  assert.equal(s.efer, 0);
});

test("boot structures in layout.ts do not overlap", () => {
  const ranges: [string, number, number][] = [
    ["gdt", BOOT_GDT_ADDR, BOOT_GDT_ADDR + BOOT_GDT.length * 8],
    ["idt", BOOT_IDT_ADDR, BOOT_IDT_ADDR + 8],
    ["pvh", PVH_INFO_ADDR, PVH_INFO_END],
    ["zero page", ZERO_PAGE_ADDR, ZERO_PAGE_ADDR + 4096],
    ["stack", BOOT_STACK_POINTER - 16, BOOT_STACK_POINTER],
    ["page tables", PML4_ADDR, PD_ADDR + PD_COUNT * 4096],
    ["cmdline", CMDLINE_ADDR, CMDLINE_ADDR + 0x10000],
  ];
  ranges.sort((a, b) => a[1] - b[1]);
  for (let i = 1; i < ranges.length; i++) {
    assert.ok(ranges[i - 1]![2] <= ranges[i]![1], `${ranges[i - 1]![0]} overlaps ${ranges[i]![0]}`);
  }
  assert.ok(ranges[ranges.length - 1]![2] <= EBDA_START);
});

test("e820 for a small guest: conventional RAM, reserved EBDA/hole, RAM from 1 MiB", () => {
  const mem = GuestMemory.forTest(128 * MiB);
  assert.deepEqual(buildE820(mem.regions), [
    { addr: 0, size: EBDA_START, type: E820_RAM },
    { addr: EBDA_START, size: HIGH_MEMORY_START - EBDA_START, type: E820_RESERVED },
    { addr: HIGH_MEMORY_START, size: 128 * MiB - HIGH_MEMORY_START, type: E820_RAM },
  ]);
});

test("e820 for a guest above 4 GiB: the hole is absent and split high regions merge", () => {
  const regions = [
    { base: 0, size: 3 * GiB },
    { base: 4 * GiB, size: 1 * GiB },
    { base: 5 * GiB, size: 512 * MiB },
  ];
  assert.deepEqual(buildE820(regions), [
    { addr: 0, size: EBDA_START, type: E820_RAM },
    { addr: EBDA_START, size: HIGH_MEMORY_START - EBDA_START, type: E820_RESERVED },
    { addr: HIGH_MEMORY_START, size: 3 * GiB - HIGH_MEMORY_START, type: E820_RAM },
    { addr: 4 * GiB, size: 1.5 * GiB, type: E820_RAM },
  ]);
});
