/**
 * A PCI type-0 configuration header: 256 bytes in a SharedArrayBuffer, as every thread that
 * handles exits sees the same function (see src/devices/pci/types.ts).
 *
 * The model is "bytes plus masks": each byte has a write mask (which bits a guest write
 * changes) and a write-1-to-clear mask (status error bits). Everything else about the
 * header follows from how the masks are built at creation:
 *
 * - IDs, class, header type, interrupt pin, capability pointers: read-only (mask 0).
 * - Command: I/O space, memory space, bus master and INTx disable are writable.
 * - Status: the error bits are W1C; "interrupt status" and "capability list" are read-only.
 * - BARs: the address bits above the BAR's size are writable, the size and type bits below
 *   are not. Guest sizing (write all-ones, read back) therefore needs no special case: the
 *   register reads back ~(size - 1) | type bits.
 * - Cache line size, latency timer and interrupt line are plain read/write bytes.
 *
 * Creation-time setup (`create`, `defineBar`, `addCapability`) runs once, in the thread
 * that creates the machine, before any vCPU runs; guest accesses (`read`, `write`) may then
 * come from any thread and take the state's lock, so a multi-byte access is never torn.
 */
import { SharedState } from "../shared-state";
import { adoptState, type StateLike } from "../legacy/state-like";
import type { BarInfo, BarKind } from "./types";

export const PCI_CONFIG_SIZE = 256;

// Header offsets (type 0).
export const PCI_VENDOR_ID = 0x00;
export const PCI_DEVICE_ID = 0x02;
export const PCI_COMMAND = 0x04;
export const PCI_STATUS = 0x06;
export const PCI_REVISION_ID = 0x08;
/** Programming interface (0x09), subclass (0x0a), class (0x0b). */
export const PCI_CLASS_PROG = 0x09;
export const PCI_CACHE_LINE_SIZE = 0x0c;
export const PCI_LATENCY_TIMER = 0x0d;
export const PCI_HEADER_TYPE = 0x0e;
export const PCI_BAR0 = 0x10;
export const PCI_SUBSYSTEM_VENDOR_ID = 0x2c;
export const PCI_SUBSYSTEM_ID = 0x2e;
export const PCI_CAPABILITY_LIST = 0x34;
export const PCI_INTERRUPT_LINE = 0x3c;
export const PCI_INTERRUPT_PIN = 0x3d;
export const PCI_BAR_COUNT = 6;

// Command register bits.
export const PCI_COMMAND_IO = 0x1;
export const PCI_COMMAND_MEMORY = 0x2;
export const PCI_COMMAND_MASTER = 0x4;
export const PCI_COMMAND_INTX_DISABLE = 0x400;

// Status register bits.
export const PCI_STATUS_INTERRUPT = 0x8;
export const PCI_STATUS_CAP_LIST = 0x10;
/** Master data parity error, signalled/received target abort, received master abort, SERR, parity. */
export const PCI_STATUS_W1C = 0x0100 | 0x0800 | 0x1000 | 0x2000 | 0x4000 | 0x8000;

// BAR low bits.
export const PCI_BAR_IO = 0x1;
export const PCI_BAR_MEM_TYPE_64 = 0x4;
export const PCI_BAR_MEM_PREFETCH = 0x8;

// Capability IDs.
export const PCI_CAP_ID_VNDR = 0x09;
export const PCI_CAP_ID_MSIX = 0x11;

/** Capabilities start after the standard header. */
const CAP_START = 0x40;

export interface PciHeaderIds {
  readonly vendorId: number;
  readonly deviceId: number;
  /** class << 16 | subclass << 8 | programming interface, e.g. 0x018000. */
  readonly classCode: number;
  readonly revision?: number;
  readonly subsystemVendorId?: number;
  readonly subsystemId?: number;
  /** INTA..INTD as 0..3 (PciSlot.intxPin); the pin register then reads pin + 1. Absent: no INTx. */
  readonly intxPin?: number;
}

export interface BarOptions {
  /** Memory BARs only: reads have no side effects (not for registers such as an ISR). */
  readonly prefetchable?: boolean;
}

export interface CapabilityEntry {
  readonly id: number;
  readonly offset: number;
}

// Cells: what the bytes alone cannot say about the BARs, and the capability cursor.
const KIND_NONE = 0;
const KIND_IO = 1;
const KIND_MEM32 = 2;
const KIND_MEM64 = 3;
/** The upper half of the 64-bit BAR in the slot below. */
const KIND_MEM64_HIGH = 4;
const C_BAR_KIND = 0; // 6 cells
const C_BAR_LOG2 = 6; // 6 cells: log2 of the size
const C_CAP_LAST = 12; // offset of the last capability, 0 = none yet
const C_CAP_FREE = 13; // first free byte for the next capability
const CELLS = 14;
/** Bytes: the header, its write masks, its W1C masks. */
const EXTRA_BYTES = 3 * PCI_CONFIG_SIZE;

const KINDS: readonly (BarKind | undefined)[] = [undefined, "io", "mem32", "mem64", undefined];
const TWO_32 = 0x1_0000_0000;

export class PciConfigSpace {
  static readonly CELLS = CELLS;
  static readonly EXTRA_BYTES = EXTRA_BYTES;

  /** A fresh header with these IDs; post `config.state.buffer` to other threads. */
  static create(ids: PciHeaderIds): PciConfigSpace {
    const config = new PciConfigSpace(SharedState.create(CELLS, EXTRA_BYTES));
    config.initHeader(ids);
    return config;
  }

  readonly state: SharedState;
  private readonly bytes: Uint8Array;
  private readonly wmask: Uint8Array;
  private readonly w1c: Uint8Array;

  constructor(state: StateLike) {
    this.state = adoptState(state, CELLS, EXTRA_BYTES, "PCI config space");
    const all = this.state.bytes();
    this.bytes = all.subarray(0, PCI_CONFIG_SIZE);
    this.wmask = all.subarray(PCI_CONFIG_SIZE, 2 * PCI_CONFIG_SIZE);
    this.w1c = all.subarray(2 * PCI_CONFIG_SIZE, 3 * PCI_CONFIG_SIZE);
  }

  // ---- Guest accesses (any thread) ----

  /** Any size at any offset: bytes outside the 256 read all-ones, as an absent register. */
  read(offset: number, data: Uint8Array): void {
    this.state.locked(() => {
      for (let i = 0; i < data.length; i++) {
        const o = offset + i;
        data[i] = o >= 0 && o < PCI_CONFIG_SIZE ? this.bytes[o]! : 0xff;
      }
    });
  }

  /** Bytes outside the 256 are dropped; read-only bits keep their value, W1C bits clear on 1. */
  write(offset: number, data: Uint8Array): void {
    this.state.locked(() => {
      for (let i = 0; i < data.length; i++) {
        const o = offset + i;
        if (o < 0 || o >= PCI_CONFIG_SIZE) continue;
        const v = data[i]!;
        const m = this.wmask[o]!;
        this.bytes[o] = ((this.bytes[o]! & ~m & ~(v & this.w1c[o]!)) | (v & m)) & 0xff;
      }
    });
  }

  /** A little-endian value of `size` bytes (1, 2 or 4). */
  readValue(offset: number, size: 1 | 2 | 4): number {
    const d = new Uint8Array(size);
    this.read(offset, d);
    let v = 0;
    for (let i = size - 1; i >= 0; i--) v = v * 256 + d[i]!;
    return v;
  }

  writeValue(offset: number, size: 1 | 2 | 4, value: number): void {
    const d = new Uint8Array(size);
    for (let i = 0; i < size; i++) d[i] = (value >>> (8 * i)) & 0xff;
    this.write(offset, d);
  }

  command(): number {
    return this.readValue(PCI_COMMAND, 2);
  }

  /** Device side: set status bits (an error the guest then clears by writing 1). */
  raiseStatus(bits: number): void {
    this.state.locked(() => {
      this.bytes[PCI_STATUS] = this.bytes[PCI_STATUS]! | (bits & 0xff);
      this.bytes[PCI_STATUS + 1] = this.bytes[PCI_STATUS + 1]! | ((bits >>> 8) & 0xff);
    });
  }

  // ---- BARs ----

  /**
   * Declare BAR `index` (creation time). A 64-bit BAR also takes slot index + 1. Sizes are
   * powers of two, at least 4 bytes for I/O and 16 for memory.
   */
  defineBar(index: number, kind: BarKind, size: number, opts: BarOptions = {}): void {
    const slots = kind === "mem64" ? 2 : 1;
    if (!Number.isInteger(index) || index < 0 || index + slots > PCI_BAR_COUNT) {
      throw new RangeError(`PCI BAR ${index}: no such ${kind} BAR slot`);
    }
    const min = kind === "io" ? 4 : 16;
    const max = kind === "io" ? 0x10000 : kind === "mem32" ? 0x8000_0000 : 2 ** 52;
    if (!Number.isSafeInteger(size) || size < min || size > max || !isPowerOfTwo(size)) {
      throw new RangeError(`PCI BAR ${index}: bad ${kind} size ${size}`);
    }
    if (kind === "io" && opts.prefetchable === true) throw new RangeError("an I/O BAR is never prefetchable");
    this.state.locked(() => {
      for (let s = index; s < index + slots; s++) {
        if (this.state.get(C_BAR_KIND + s) !== KIND_NONE) throw new RangeError(`PCI BAR ${s} is already defined`);
      }
      const kindCode = kind === "io" ? KIND_IO : kind === "mem32" ? KIND_MEM32 : KIND_MEM64;
      this.state.set(C_BAR_KIND + index, kindCode);
      this.state.set(C_BAR_LOG2 + index, Math.log2(size));
      let typeBits = kind === "io" ? PCI_BAR_IO : kind === "mem64" ? PCI_BAR_MEM_TYPE_64 : 0;
      if (opts.prefetchable === true) typeBits |= PCI_BAR_MEM_PREFETCH;
      const reg = PCI_BAR0 + 4 * index;
      // The address bits below the size are hardwired to zero: that is what sizing reads.
      const lowMask = size >= TWO_32 ? 0 : ~(size - 1) & (kind === "io" ? ~0x3 : ~0xf);
      this.setRaw(reg, 4, typeBits, lowMask >>> 0);
      if (kind === "mem64") {
        this.state.set(C_BAR_KIND + index + 1, KIND_MEM64_HIGH);
        const highMask = size > TWO_32 ? ~(size / TWO_32 - 1) : 0xffff_ffff;
        this.setRaw(reg + 4, 4, 0, highMask >>> 0);
      }
    });
  }

  /**
   * The BARs as the guest (or the firmware step) programmed them. `enabled` means the BAR
   * decodes now: the command register's decode bit for its space is set and its address is
   * a real one (not 0, not the all-ones sizing pattern, inside the space).
   */
  bars(): BarInfo[] {
    return this.state.locked(() => {
      const command = this.rawValue(PCI_COMMAND, 2);
      const out: BarInfo[] = [];
      for (let index = 0; index < PCI_BAR_COUNT; index++) {
        const kind = KINDS[this.state.get(C_BAR_KIND + index)];
        if (kind === undefined) continue;
        const size = 2 ** this.state.get(C_BAR_LOG2 + index);
        const reg = PCI_BAR0 + 4 * index;
        const low = this.rawValue(reg, 4);
        let address: number;
        let limit: number;
        if (kind === "io") {
          address = (low & ~0x3) >>> 0;
          limit = 0x10000;
        } else if (kind === "mem32") {
          address = (low & ~0xf) >>> 0;
          // A BAR reaching the top of the 32-bit space is the sizing pattern, not an address.
          limit = TWO_32 - 1;
        } else {
          address = ((low & ~0xf) >>> 0) + this.rawValue(reg + 4, 4) * TWO_32;
          limit = 2 ** 52;
        }
        const decode = (command & (kind === "io" ? PCI_COMMAND_IO : PCI_COMMAND_MEMORY)) !== 0;
        const enabled = decode && address !== 0 && address + size <= limit;
        out.push({ index, kind, size, address, enabled });
      }
      return out;
    });
  }

  // ---- Capabilities ----

  /**
   * Append a capability (creation time): `body` is everything after the ID and next-pointer
   * bytes; `writableMask`, as long as `body` when given, says which of its bits a guest may
   * write. Returns the capability's offset in configuration space.
   */
  addCapability(id: number, body: Uint8Array, writableMask?: Uint8Array): number {
    if (writableMask !== undefined && writableMask.length !== body.length) {
      throw new RangeError("capability mask and body differ in length");
    }
    return this.state.locked(() => {
      const free = this.state.get(C_CAP_FREE) || CAP_START;
      const offset = (free + 3) & ~3; // capabilities are dword aligned
      if (offset + 2 + body.length > PCI_CONFIG_SIZE) {
        throw new RangeError(`capability 0x${id.toString(16)} does not fit in configuration space`);
      }
      this.bytes[offset] = id;
      this.bytes[offset + 1] = 0;
      this.bytes.set(body, offset + 2);
      if (writableMask !== undefined) this.wmask.set(writableMask, offset + 2);
      const last = this.state.get(C_CAP_LAST);
      this.bytes[last === 0 ? PCI_CAPABILITY_LIST : last + 1] = offset;
      this.bytes[PCI_STATUS] = this.bytes[PCI_STATUS]! | PCI_STATUS_CAP_LIST;
      this.state.set(C_CAP_LAST, offset);
      this.state.set(C_CAP_FREE, offset + 2 + body.length);
      return offset;
    });
  }

  /** The capability list as a driver walks it (bounded, in case of a loop). */
  capabilities(): CapabilityEntry[] {
    const out: CapabilityEntry[] = [];
    if ((this.readValue(PCI_STATUS, 2) & PCI_STATUS_CAP_LIST) === 0) return out;
    let offset = this.readValue(PCI_CAPABILITY_LIST, 1) & ~3;
    for (let n = 0; offset !== 0 && n < 48; n++) {
      out.push({ id: this.readValue(offset, 1), offset });
      offset = this.readValue(offset + 1, 1) & ~3;
    }
    return out;
  }

  /** The offset of the first capability with this ID, 0 when there is none. */
  findCapability(id: number): number {
    return this.capabilities().find((c) => c.id === id)?.offset ?? 0;
  }

  // ---- Internals ----

  private initHeader(ids: PciHeaderIds): void {
    const pin = ids.intxPin === undefined ? 0 : ids.intxPin + 1;
    if (pin > 4 || pin < 0 || !Number.isInteger(pin)) throw new RangeError(`bad INTx pin ${ids.intxPin}`);
    this.state.locked(() => {
      this.setRaw(PCI_VENDOR_ID, 2, ids.vendorId, 0);
      this.setRaw(PCI_DEVICE_ID, 2, ids.deviceId, 0);
      this.setRaw(PCI_COMMAND, 2, 0, PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE);
      this.setRaw(PCI_STATUS, 2, 0, 0);
      this.w1c[PCI_STATUS] = PCI_STATUS_W1C & 0xff;
      this.w1c[PCI_STATUS + 1] = PCI_STATUS_W1C >>> 8;
      this.setRaw(PCI_REVISION_ID, 1, ids.revision ?? 0, 0);
      this.setRaw(PCI_CLASS_PROG, 3, ids.classCode, 0);
      this.setRaw(PCI_CACHE_LINE_SIZE, 1, 0, 0xff);
      this.setRaw(PCI_LATENCY_TIMER, 1, 0, 0xff);
      this.setRaw(PCI_HEADER_TYPE, 1, 0, 0); // type 0, single function
      this.setRaw(PCI_SUBSYSTEM_VENDOR_ID, 2, ids.subsystemVendorId ?? 0, 0);
      this.setRaw(PCI_SUBSYSTEM_ID, 2, ids.subsystemId ?? 0, 0);
      this.setRaw(PCI_INTERRUPT_LINE, 1, 0, 0xff);
      this.setRaw(PCI_INTERRUPT_PIN, 1, pin, 0);
    });
  }

  /** Set bytes and their write mask directly (creation time, under the lock). */
  private setRaw(offset: number, size: number, value: number, mask: number): void {
    for (let i = 0; i < size; i++) {
      this.bytes[offset + i] = (value >>> (8 * i)) & 0xff;
      this.wmask[offset + i] = (mask >>> (8 * i)) & 0xff;
    }
  }

  /** Read without the lock (the caller holds it). */
  private rawValue(offset: number, size: number): number {
    let v = 0;
    for (let i = size - 1; i >= 0; i--) v = v * 256 + this.bytes[offset + i]!;
    return v;
  }
}

export function isPowerOfTwo(n: number): boolean {
  return n > 0 && Number.isSafeInteger(n) && 2 ** Math.round(Math.log2(n)) === n;
}
