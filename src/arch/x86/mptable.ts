/**
 * Intel MultiProcessor Specification 1.4 tables: how a guest without ACPI learns how many
 * CPUs it has, where its IOAPIC is, and which IOAPIC pin each ISA IRQ and PCI INTx line
 * arrives on. Linux parses them in arch/x86/kernel/mpparse.c (CONFIG_X86_MPPARSE).
 *
 * Both lie in ranges the e820 map reports reserved:
 *
 *   EBDA_START             MP floating pointer structure ("_MP_", 16 bytes), in the
 *                          first KiB of the EBDA where Linux looks for it
 *   MP_CONFIG_TABLE_ADDR   MP configuration table (in the 64 KiB BIOS area at 0xf0000, so
 *                          that a VM of up to 254 vCPUs fits): header ("PCMP", 44 bytes),
 *                          then the base table entries in the spec's order: processors,
 *                          buses, IOAPIC, I/O interrupt assignments, local interrupt
 *                          assignments
 *
 * Linux looks for "_MP_" on 16-byte boundaries in the first KiB of RAM, in the KiB below
 * 640 KiB (= EBDA_START), in the BIOS ROM, and in the first KiB of the EBDA whose segment
 * the BIOS data area holds at 0x40E; the pointer is found by the second and the last scan.
 *
 * Interrupt routing described (IOAPIC with KVM's 24 pins):
 *   ISA IRQ n     -> pin n (INT) for n = 0..15, polarity and trigger as the ISA bus says.
 *                   IRQ 0 on pin 0, not pin 2 as on a PC: KVM's default GSI routing wires
 *                   the in-kernel PIT to IOAPIC pin 0 (Firecracker describes it the same
 *                   way), so no ExtINT I/O entry is listed; the 8259 reaches the CPUs
 *                   through LINT0 (virtual wire).
 *   PCI INTx      -> the caller's pin (INT), level-triggered, active low
 *   LINT0 of every LAPIC: ExtINT (virtual-wire mode); LINT1 of every LAPIC: NMI
 */
import type { GuestMemory } from "../../memory/guest-memory";
import {
  BDA_EBDA_SEGMENT_ADDR,
  EBDA_START,
  IOAPIC_ADDR,
  LAPIC_ADDR,
  LOW_RAM_END,
  MP_CONFIG_TABLE_ADDR,
  MP_CONFIG_TABLE_MAX,
} from "./layout";

/** The MP tables do not fit or the caller asked for something they cannot describe. */
export class MpTableError extends Error {
  constructor(message: string) {
    super(`MP table: ${message}`);
    this.name = "MpTableError";
  }
}

export interface PciIrq {
  /** PCI device (slot) number on bus 0, 0..31. */
  device: number;
  /** Interrupt pin: 0 = INTA, 1 = INTB, 2 = INTC, 3 = INTD. */
  pin: number;
  /** IOAPIC input the line is wired to, 0..IOAPIC_PINS-1. */
  ioapicPin: number;
}

export interface MpTableOptions {
  /** Number of vCPUs; their LAPIC ids are 0..cpus-1 and vCPU 0 is the bootstrap processor. */
  cpus: number;
  pciIrqs?: readonly PciIrq[];
  /** The IOAPIC's id; defaults to `cpus`, the first id no LAPIC uses. */
  ioapicId?: number;
}

export interface MpTableLocation {
  /** Guest-physical address of the floating pointer structure. */
  floatingPointer: number;
  /** Guest-physical address of the configuration table header. */
  configTable: number;
  /** First byte after the configuration table. */
  end: number;
}

/** Inputs of KVM's in-kernel IOAPIC (arch/x86/kvm/ioapic.h, IOAPIC_NUM_PINS). */
export const IOAPIC_PINS = 24;
/** The 82093AA version KVM's IOAPIC reports in its version register. */
export const IOAPIC_VERSION = 0x11;
/** An integrated (xAPIC) local APIC, as Firecracker and kvmtool report. */
export const LAPIC_VERSION = 0x14;

export const MP_SPEC_REVISION = 4; // 1.4
export const PCI_BUS_ID = 0;
export const ISA_BUS_ID = 1;
export const ISA_IRQS = 16;

// Structure sizes (MP spec 1.4, chapter 4).
const FLOATING_POINTER_SIZE = 16;
const HEADER_SIZE = 44;
const PROCESSOR_ENTRY_SIZE = 20;
const SMALL_ENTRY_SIZE = 8; // bus, IOAPIC, I/O interrupt and local interrupt entries

// Entry types.
const ENTRY_PROCESSOR = 0;
const ENTRY_BUS = 1;
const ENTRY_IOAPIC = 2;
const ENTRY_IO_INTERRUPT = 3;
const ENTRY_LOCAL_INTERRUPT = 4;

// Interrupt types.
const INT_TYPE_INT = 0;
const INT_TYPE_NMI = 1;
const INT_TYPE_EXTINT = 3;

// Interrupt flags: polarity in bits 1:0, trigger mode in bits 3:2; 0 = "conforms to the bus".
const FLAGS_CONFORMING = 0;
const POLARITY_ACTIVE_LOW = 3;
const TRIGGER_LEVEL = 3 << 2;

const CPU_ENABLED = 1 << 0;
const CPU_BOOTSTRAP = 1 << 1;
const IOAPIC_ENABLED = 1 << 0;
/** CPUID-style signature: family 6, model 0, stepping 0. */
const CPU_SIGNATURE = 0x600;
/** CPUID.1:EDX bits FPU (0) and APIC (9). */
const CPU_FEATURES = (1 << 9) | (1 << 0);

/** Destination LAPIC id meaning "every local APIC". */
const ALL_LAPICS = 0xff;

const OEM_ID = "TSKVM   ";
const PRODUCT_ID = "TSKVM VM";

/** The bytes the tables take for this many vCPUs and PCI interrupt entries. */
export function mpTableSize(cpus: number, pciIrqCount = 0): number {
  const entries =
    2 /* buses */ + 1 /* IOAPIC */ + ISA_IRQS + pciIrqCount + 2; /* LINT0, LINT1 */
  return FLOATING_POINTER_SIZE + HEADER_SIZE + cpus * PROCESSOR_ENTRY_SIZE + entries * SMALL_ENTRY_SIZE;
}

/** Room for the tables: the floating pointer plus the configuration table's area. */
export const MPTABLE_SPACE = FLOATING_POINTER_SIZE + MP_CONFIG_TABLE_MAX;

/**
 * The most vCPUs the tables can describe, given how many PCI interrupt entries go with
 * them: what fits, and at most 254, because APIC ids are 8-bit, 0xff means "all", and the
 * IOAPIC takes the id after the last vCPU's.
 */
export function maxMpTableCpus(pciIrqCount = 0): number {
  const fixed = mpTableSize(0, pciIrqCount);
  return Math.min(ALL_LAPICS - 1, Math.max(0, Math.floor((MPTABLE_SPACE - fixed) / PROCESSOR_ENTRY_SIZE)));
}

/**
 * The most vCPUs the MP tables can describe (with no PCI interrupt entries; each PCI INTx
 * entry takes 8 bytes, so 5 of them cost room for 2 vCPUs).
 */
export const MAX_MPTABLE_CPUS = maxMpTableCpus(0);

/**
 * Write the floating pointer at EBDA_START and the configuration table at
 * MP_CONFIG_TABLE_ADDR, and point the BDA's EBDA segment at the EBDA. Throws MpTableError
 * when the options are invalid or describe more vCPUs than fit.
 */
export function writeMpTable(mem: GuestMemory, opts: MpTableOptions): MpTableLocation {
  const { cpus } = opts;
  const pciIrqs = opts.pciIrqs ?? [];
  if (!Number.isInteger(cpus) || cpus < 1) {
    throw new MpTableError(`needs at least one vCPU, not ${cpus}`);
  }
  const max = maxMpTableCpus(pciIrqs.length);
  if (cpus > max) {
    throw new MpTableError(
      `${cpus} vCPUs and ${pciIrqs.length} PCI interrupt entries cannot be described: ` +
        `at most ${max} vCPUs fit with them`,
    );
  }
  const ioapicId = opts.ioapicId ?? cpus;
  if (!Number.isInteger(ioapicId) || ioapicId < 0 || ioapicId >= ALL_LAPICS) {
    throw new MpTableError(`IOAPIC id ${ioapicId} is not in 0..254`);
  }
  if (ioapicId < cpus) {
    throw new MpTableError(`IOAPIC id ${ioapicId} clashes with the LAPIC id of vCPU ${ioapicId}`);
  }
  const seen = new Set<number>();
  for (const irq of pciIrqs) {
    const what = `PCI interrupt (device ${irq.device}, pin ${irq.pin}, IOAPIC pin ${irq.ioapicPin})`;
    if (!Number.isInteger(irq.device) || irq.device < 0 || irq.device > 31) {
      throw new MpTableError(`${what}: device must be 0..31`);
    }
    if (!Number.isInteger(irq.pin) || irq.pin < 0 || irq.pin > 3) {
      throw new MpTableError(`${what}: pin must be 0 (INTA) .. 3 (INTD)`);
    }
    if (!Number.isInteger(irq.ioapicPin) || irq.ioapicPin < 0 || irq.ioapicPin >= IOAPIC_PINS) {
      throw new MpTableError(`${what}: the IOAPIC has pins 0..${IOAPIC_PINS - 1}`);
    }
    const key = (irq.device << 2) | irq.pin;
    if (seen.has(key)) throw new MpTableError(`${what}: that device and pin are listed twice`);
    seen.add(key);
  }

  const size = mpTableSize(cpus, pciIrqs.length);
  const buf = new Uint8Array(MPTABLE_SPACE); // zero: also clears a stale table from before
  const dv = new DataView(buf.buffer);
  const floatingPointer = EBDA_START;
  // buf holds the floating pointer, then the configuration table that goes to its own area.
  const configTable = MP_CONFIG_TABLE_ADDR;

  // Configuration table entries, after the header.
  let off = FLOATING_POINTER_SIZE + HEADER_SIZE;
  let count = 0;
  const interrupt = (
    type: number,
    irqType: number,
    flags: number,
    bus: number,
    busIrq: number,
    dest: number,
    destPin: number,
  ) => {
    dv.setUint8(off, type);
    dv.setUint8(off + 1, irqType);
    dv.setUint16(off + 2, flags, true);
    dv.setUint8(off + 4, bus);
    dv.setUint8(off + 5, busIrq);
    dv.setUint8(off + 6, dest);
    dv.setUint8(off + 7, destPin);
    off += SMALL_ENTRY_SIZE;
    count++;
  };

  for (let id = 0; id < cpus; id++) {
    dv.setUint8(off, ENTRY_PROCESSOR);
    dv.setUint8(off + 1, id); // LAPIC id
    dv.setUint8(off + 2, LAPIC_VERSION);
    dv.setUint8(off + 3, CPU_ENABLED | (id === 0 ? CPU_BOOTSTRAP : 0));
    dv.setUint32(off + 4, CPU_SIGNATURE, true);
    dv.setUint32(off + 8, CPU_FEATURES, true);
    // 8 reserved bytes stay zero.
    off += PROCESSOR_ENTRY_SIZE;
    count++;
  }
  for (const [id, type] of [
    [PCI_BUS_ID, "PCI"],
    [ISA_BUS_ID, "ISA"],
  ] as const) {
    dv.setUint8(off, ENTRY_BUS);
    dv.setUint8(off + 1, id);
    writeAscii(buf, off + 2, type, 6); // "PCI   ", "ISA   "
    off += SMALL_ENTRY_SIZE;
    count++;
  }
  dv.setUint8(off, ENTRY_IOAPIC);
  dv.setUint8(off + 1, ioapicId);
  dv.setUint8(off + 2, IOAPIC_VERSION);
  dv.setUint8(off + 3, IOAPIC_ENABLED);
  dv.setUint32(off + 4, IOAPIC_ADDR, true);
  off += SMALL_ENTRY_SIZE;
  count++;

  for (let irq = 0; irq < ISA_IRQS; irq++) {
    interrupt(ENTRY_IO_INTERRUPT, INT_TYPE_INT, FLAGS_CONFORMING, ISA_BUS_ID, irq, ioapicId, irq);
  }
  for (const p of pciIrqs) {
    interrupt(
      ENTRY_IO_INTERRUPT,
      INT_TYPE_INT,
      POLARITY_ACTIVE_LOW | TRIGGER_LEVEL,
      PCI_BUS_ID,
      (p.device << 2) | p.pin,
      ioapicId,
      p.ioapicPin,
    );
  }
  interrupt(ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, FLAGS_CONFORMING, ISA_BUS_ID, 0, ALL_LAPICS, 0);
  interrupt(ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, FLAGS_CONFORMING, ISA_BUS_ID, 0, ALL_LAPICS, 1);
  if (off !== size) throw new Error(`mptable: wrote ${off} bytes, expected ${size}`); // an encoder bug

  // Header.
  const h = FLOATING_POINTER_SIZE;
  const tableLength = size - FLOATING_POINTER_SIZE;
  writeAscii(buf, h, "PCMP", 4);
  dv.setUint16(h + 4, tableLength, true); // base table length, header included
  dv.setUint8(h + 6, MP_SPEC_REVISION);
  writeAscii(buf, h + 8, OEM_ID, 8);
  writeAscii(buf, h + 16, PRODUCT_ID, 12);
  // h+28: OEM table pointer (u32) and h+32: its size (u16) stay zero: no OEM table.
  dv.setUint16(h + 34, count, true);
  dv.setUint32(h + 36, LAPIC_ADDR, true);
  // h+40: extended table length (u16) and checksum (u8), h+43 reserved: all zero.
  dv.setUint8(h + 7, checksumByte(buf.subarray(h, h + tableLength)));

  // Floating pointer.
  writeAscii(buf, 0, "_MP_", 4);
  dv.setUint32(4, configTable, true);
  dv.setUint8(8, FLOATING_POINTER_SIZE / 16); // length in 16-byte paragraphs
  dv.setUint8(9, MP_SPEC_REVISION);
  // 11: feature byte 1 = 0: a configuration table is present (no default configuration).
  // 12: feature byte 2 bit 7 (IMCRP) clear: virtual-wire mode, no IMCR. 13..15 reserved.
  dv.setUint8(10, checksumByte(buf.subarray(0, FLOATING_POINTER_SIZE)));

  // Clear the EBDA's first KiB too, so that no stale pointer from before survives.
  mem.fill(EBDA_START, LOW_RAM_END - EBDA_START, 0);
  mem.write(floatingPointer, buf.subarray(0, FLOATING_POINTER_SIZE));
  mem.write(configTable, buf.subarray(FLOATING_POINTER_SIZE));
  mem.writeU16(BDA_EBDA_SEGMENT_ADDR, EBDA_START >> 4);
  return { floatingPointer, configTable, end: configTable + size - FLOATING_POINTER_SIZE };
}

/** Write `text` padded with spaces (or cut) to exactly `width` bytes. */
function writeAscii(buf: Uint8Array, offset: number, text: string, width: number): void {
  for (let i = 0; i < width; i++) buf[offset + i] = i < text.length ? text.charCodeAt(i) & 0x7f : 0x20;
}

/** The byte that makes `bytes` (whose checksum field is still zero) sum to 0 mod 256. */
function checksumByte(bytes: Uint8Array): number {
  let sum = 0;
  for (const b of bytes) sum += b;
  return (0x100 - (sum & 0xff)) & 0xff;
}
