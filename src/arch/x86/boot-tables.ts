/**
 * The descriptor tables and page tables a kernel needs at its first instruction, and the
 * segment/control register state that goes with them. Two flavours:
 *
 *  - long mode (the 64-bit Linux boot protocol): paging on, identity map of 0..4 GiB;
 *  - flat 32-bit protected mode, paging off (the 32-bit Linux boot protocol and PVH).
 *
 * Boot GDT selectors (the order the layout.ts table lists, fixed here so both protocols are met):
 *
 *   0x00  null
 *   0x08  64-bit code     long-mode CS
 *   0x10  32-bit code     protected-mode CS: Linux's __BOOT_CS, which the 32-bit protocol requires
 *   0x18  data (4 GiB)    DS/ES/FS/GS/SS in both modes: Linux's __BOOT_DS
 *
 * The 64-bit protocol text also names __BOOT_CS (0x10) for CS, but the kernel's 64-bit
 * entry only uses CS as "whatever is loaded" before installing its own GDT, so a 64-bit code
 * segment at 0x08 is enough (Firecracker and gokvm boot the same way).
 */
import type { GuestMemory } from "../../memory/guest-memory";
import {
  BOOT_GDT_ADDR,
  BOOT_IDT_ADDR,
  GiB,
  PD_ADDR,
  PD_COUNT,
  PDPT_ADDR,
  PML4_ADDR,
} from "./layout";
import {
  CR0_ET,
  CR0_PE,
  CR0_PG,
  CR4_PAE,
  DESC_ACCESSED,
  DESC_CODE_DATA,
  DESC_DB,
  DESC_GRANULARITY,
  DESC_LONG,
  DESC_PRESENT,
  EFER_LMA,
  EFER_LME,
  gdtEntry,
  segmentFromGdtEntry,
  type BootSregs,
  type DescriptorTable,
} from "./cpu-state";

export const SELECTOR_CODE64 = 0x08;
export const SELECTOR_CODE32 = 0x10;
export const SELECTOR_DATA = 0x18;

/** Type nibbles; the accessed bit is pre-set so the CPU never writes the GDT, and VMX requires it for loaded segments. */
const TYPE_CODE_EXEC_READ = 0xa | DESC_ACCESSED;
const TYPE_DATA_READ_WRITE = 0x2 | DESC_ACCESSED;

const FLAT_LIMIT = 0xfffff; // with G set: 4 GiB
const COMMON = DESC_PRESENT | DESC_CODE_DATA | DESC_GRANULARITY;

/** The boot GDT, indexed by selector / 8. */
export const BOOT_GDT: readonly bigint[] = [
  0n,
  gdtEntry(COMMON | DESC_LONG | TYPE_CODE_EXEC_READ, 0, FLAT_LIMIT),
  gdtEntry(COMMON | DESC_DB | TYPE_CODE_EXEC_READ, 0, FLAT_LIMIT),
  gdtEntry(COMMON | DESC_DB | TYPE_DATA_READ_WRITE, 0, FLAT_LIMIT),
];

if (BOOT_GDT_ADDR + BOOT_GDT.length * 8 > BOOT_IDT_ADDR) {
  throw new Error("layout.ts: the boot GDT overlaps the boot IDT");
}

export const PAGE_SIZE = 4096;
const PTE_PRESENT = 1n << 0n;
const PTE_WRITABLE = 1n << 1n;
const PTE_HUGE = 1n << 7n; // PS: a PD entry maps a 2 MiB page
const ENTRIES_PER_TABLE = 512;
const HUGE_PAGE = 2 * 1024 * 1024;

/** How much of the address space the boot page tables identity-map. */
export const IDENTITY_MAP_END = PD_COUNT * GiB;

export function writeGdt(mem: GuestMemory): DescriptorTable {
  BOOT_GDT.forEach((entry, i) => mem.writeU64(BOOT_GDT_ADDR + i * 8, entry));
  return { base: BOOT_GDT_ADDR, limit: BOOT_GDT.length * 8 - 1 };
}

/**
 * An empty IDT (limit 0): the guest runs with interrupts off until the kernel installs its
 * own, and an early exception becomes a triple fault (a clean VM exit) rather than a jump
 * through garbage.
 */
export function writeIdt(mem: GuestMemory): DescriptorTable {
  mem.writeU64(BOOT_IDT_ADDR, 0n);
  return { base: BOOT_IDT_ADDR, limit: 0 };
}

/**
 * Identity-map guest-physical 0..4 GiB with 2 MiB pages: one PML4 entry -> one PDPT with
 * PD_COUNT entries -> PD_COUNT page directories. The 64-bit boot protocol wants the kernel,
 * the zero page and the command line identity-mapped; covering all of the low 4 GiB also
 * covers the initrd and the 32-bit MMIO hole. Returns the CR3 value.
 */
export function writeIdentityPageTables(mem: GuestMemory): number {
  const rw = PTE_PRESENT | PTE_WRITABLE;
  mem.fill(PML4_ADDR, PAGE_SIZE);
  mem.fill(PDPT_ADDR, PAGE_SIZE);
  mem.writeU64(PML4_ADDR, BigInt(PDPT_ADDR) | rw);
  for (let pd = 0; pd < PD_COUNT; pd++) {
    const pdAddr = PD_ADDR + pd * PAGE_SIZE;
    mem.writeU64(PDPT_ADDR + pd * 8, BigInt(pdAddr) | rw);
    for (let i = 0; i < ENTRIES_PER_TABLE; i++) {
      const frame = BigInt(pd * ENTRIES_PER_TABLE + i) * BigInt(HUGE_PAGE);
      mem.writeU64(pdAddr + i * 8, frame | rw | PTE_HUGE);
    }
  }
  return PML4_ADDR;
}

function flatSegments(codeSelector: number): Pick<BootSregs, "cs" | "ds" | "es" | "fs" | "gs" | "ss"> {
  const data = () => segmentFromGdtEntry(BOOT_GDT[SELECTOR_DATA / 8]!, SELECTOR_DATA);
  return {
    cs: segmentFromGdtEntry(BOOT_GDT[codeSelector / 8]!, codeSelector),
    ds: data(),
    es: data(),
    fs: data(),
    gs: data(),
    ss: data(),
  };
}

/** Write GDT, IDT and page tables; return 64-bit long mode with the identity map live. */
export function setupLongMode(mem: GuestMemory): BootSregs {
  const gdt = writeGdt(mem);
  const idt = writeIdt(mem);
  const cr3 = writeIdentityPageTables(mem);
  return {
    ...flatSegments(SELECTOR_CODE64),
    gdt,
    idt,
    cr0: (CR0_PE | CR0_ET | CR0_PG) >>> 0,
    cr3,
    cr4: CR4_PAE,
    efer: EFER_LME | EFER_LMA,
  };
}

/** Write GDT and IDT; return flat 32-bit protected mode with paging off. */
export function setupProtectedMode(mem: GuestMemory): BootSregs {
  const gdt = writeGdt(mem);
  const idt = writeIdt(mem);
  return {
    ...flatSegments(SELECTOR_CODE32),
    gdt,
    idt,
    cr0: CR0_PE | CR0_ET,
    cr3: 0,
    cr4: 0,
    efer: 0,
  };
}
