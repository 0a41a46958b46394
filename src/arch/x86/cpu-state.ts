/**
 * The CPU state a kernel loader asks for at the first instruction, as plain data. It says
 * nothing about KVM's struct layout: src/kvm encodes it into kvm_regs / kvm_sregs, and
 * leaves everything not named here (TR, LDT, CR2, CR8, APIC base, the other general
 * registers) at the values KVM gives a fresh vCPU.
 */

/** A segment register as the CPU caches it: the descriptor already unpacked. */
export interface Segment {
  base: number;
  /** Byte-granular limit: a 4 KiB-granular descriptor's limit is already scaled (0xfffff -> 0xffffffff). */
  limit: number;
  selector: number;
  /** The 4-bit type field (for code/data segments: accessed, R/W, conforming/expand-down, code). */
  type: number;
  present: boolean;
  dpl: number;
  /** Default operation size (1 = 32-bit); must be 0 for a 64-bit code segment. */
  db: boolean;
  /** Descriptor type: true for code/data, false for system segments (TSS, LDT). */
  s: boolean;
  /** 64-bit code segment. */
  l: boolean;
  /** Granularity: the raw limit counts 4 KiB pages. */
  g: boolean;
  avl: boolean;
}

/** GDTR / IDTR. */
export interface DescriptorTable {
  base: number;
  limit: number;
}

export interface BootRegs {
  rip: number;
  rsp: number;
  rbp: number;
  rsi: number;
  rbx: number;
  rflags: number;
}

export interface BootSregs {
  cs: Segment;
  ds: Segment;
  es: Segment;
  fs: Segment;
  gs: Segment;
  ss: Segment;
  gdt: DescriptorTable;
  idt: DescriptorTable;
  cr0: number;
  cr3: number;
  cr4: number;
  efer: number;
}

export interface BootCpuState {
  regs: BootRegs;
  sregs: BootSregs;
}

/** RFLAGS bit 1 is reserved and always reads as 1; IF (bit 9) stays clear at boot. */
export const RFLAGS_RESERVED = 0x2;

export const CR0_PE = 1 << 0;
/** Extension type: hard-wired to 1 on every CPU since the 486. */
export const CR0_ET = 1 << 4;
export const CR0_PG = 0x8000_0000;
export const CR4_PAE = 1 << 5;
export const EFER_LME = 1 << 8;
export const EFER_LMA = 1 << 10;

/** Descriptor flag bits as they sit in bits 40..55 of a GDT entry (access byte + flags nibble). */
export const DESC_ACCESSED = 0x0001;
export const DESC_PRESENT = 0x0080;
export const DESC_CODE_DATA = 0x0010; // the S bit
export const DESC_LONG = 0x2000;
export const DESC_DB = 0x4000;
export const DESC_GRANULARITY = 0x8000;

/**
 * Encode a GDT entry. `flags` is bits 40..55 of the descriptor as one 16-bit value
 * (access byte in the low 8 bits, the G/DB/L/AVL nibble in bits 12..15), the way the
 * Intel SDM draws it; `limit` is the raw 20-bit limit.
 */
export function gdtEntry(flags: number, base: number, limit: number): bigint {
  const b = BigInt(base >>> 0);
  const l = BigInt(limit & 0xfffff);
  const f = BigInt(flags & 0xf0ff);
  return (
    ((b & 0xff00_0000n) << 32n) |
    (f << 40n) |
    ((l & 0xf_0000n) << 32n) |
    ((b & 0x00ff_ffffn) << 16n) |
    (l & 0xffffn)
  );
}

/**
 * Unpack a GDT entry into the cached form a segment register holds after loading
 * `selector`. Deriving the segment registers from the very entries written to the GDT
 * keeps the two in agreement: the guest can reload a selector and get the same segment.
 */
export function segmentFromGdtEntry(entry: bigint, selector: number): Segment {
  const bits = (shift: bigint, width: bigint): number => Number((entry >> shift) & ((1n << width) - 1n));
  const g = bits(55n, 1n) === 1;
  const rawLimit = bits(0n, 16n) | (bits(48n, 4n) << 16);
  return {
    base: (bits(16n, 24n) | (bits(56n, 8n) << 24)) >>> 0,
    // With G set the limit counts 4 KiB pages; the cached limit is in bytes.
    limit: g ? ((rawLimit << 12) | 0xfff) >>> 0 : rawLimit,
    selector,
    type: bits(40n, 4n),
    s: bits(44n, 1n) === 1,
    dpl: bits(45n, 2n),
    present: bits(47n, 1n) === 1,
    avl: bits(52n, 1n) === 1,
    l: bits(53n, 1n) === 1,
    db: bits(54n, 1n) === 1,
    g,
  };
}
