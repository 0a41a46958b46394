/**
 * Guest physical memory: a few regions of host memory, and the one place where every
 * guest-physical access is bounds-checked. Device models and loaders go through this class
 * and never index a region's bytes with an unchecked guest address.
 */
import * as sys from "../sys/libc";
import { PCI_HOLE_START, PCI_HOLE_END } from "../arch/x86/layout";

/** A guest-physical access outside RAM (or an integer overflow dressed as an address). */
export class GuestMemoryError extends Error {
  constructor(readonly address: number, readonly length: number) {
    super(`guest address range 0x${address.toString(16)}+0x${length.toString(16)} is outside guest RAM`);
    this.name = "GuestMemoryError";
  }
}

/** What another thread needs to see the same RAM: plain data, safe for postMessage. */
export interface RegionDescriptor {
  /** Guest-physical address of the first byte. */
  readonly base: number;
  readonly size: number;
  /** Host virtual address of the first byte (from mmap). */
  readonly hostAddress: bigint;
}

export interface GuestRegion {
  readonly base: number;
  readonly size: number;
  readonly bytes: Uint8Array;
  readonly view: DataView;
  /** Host address, present for real (mmap'd) memory and absent for test memory. */
  readonly hostAddress: bigint | undefined;
}

/** koffi's per-view limit; regions larger than this are split. */
const MAX_REGION_BYTES = sys.MAX_VIEW_BYTES;

/**
 * Where RAM of a given size lives in the guest-physical address space: below the 32-bit
 * PCI hole, and whatever does not fit there continues at 4 GiB.
 */
export function ramLayout(totalBytes: number): { base: number; size: number }[] {
  const low = Math.min(totalBytes, PCI_HOLE_START);
  const out: { base: number; size: number }[] = [{ base: 0, size: low }];
  let rest = totalBytes - low;
  let base = PCI_HOLE_END;
  while (rest > 0) {
    const size = Math.min(rest, MAX_REGION_BYTES);
    out.push({ base, size });
    base += size;
    rest -= size;
  }
  return out;
}

export class GuestMemory {
  readonly regions: readonly GuestRegion[];
  readonly totalBytes: number;
  private mapping: { address: bigint; length: number } | undefined;

  private constructor(regions: GuestRegion[], mapping?: { address: bigint; length: number }) {
    this.regions = regions.slice().sort((a, b) => a.base - b.base);
    this.totalBytes = regions.reduce((n, r) => n + r.size, 0);
    this.mapping = mapping;
  }

  /**
   * Reserve guest RAM with one anonymous mapping (MAP_NORESERVE: pages are only committed
   * when the guest touches them) and lay it out around the PCI hole.
   */
  static allocate(totalBytes: number): GuestMemory {
    if (!Number.isSafeInteger(totalBytes) || totalBytes <= 0 || totalBytes % 4096 !== 0) {
      throw new RangeError(`guest memory must be a positive multiple of 4 KiB, not ${totalBytes}`);
    }
    const address = sys.mmap(
      totalBytes,
      sys.PROT_READ | sys.PROT_WRITE,
      sys.MAP_PRIVATE | sys.MAP_ANONYMOUS | sys.MAP_NORESERVE,
    );
    // Transparent huge pages where the host offers them on request (THP "madvise"): fewer
    // page-table levels for KVM to walk or shadow, as QEMU does for guest RAM.
    sys.madvise(address, totalBytes, sys.MADV_HUGEPAGE);
    let offset = 0n;
    const descriptors: RegionDescriptor[] = ramLayout(totalBytes).map((r) => {
      const d = { base: r.base, size: r.size, hostAddress: address + offset };
      offset += BigInt(r.size);
      return d;
    });
    const mem = GuestMemory.attach(descriptors);
    mem.mapping = { address, length: totalBytes };
    return mem;
  }

  /** Views over RAM another thread allocated (each thread must make its own views). */
  static attach(descriptors: readonly RegionDescriptor[]): GuestMemory {
    return new GuestMemory(
      descriptors.map((d) => {
        const buffer = sys.view(d.hostAddress, d.size);
        return makeRegion(d.base, new Uint8Array(buffer), d.hostAddress);
      }),
    );
  }

  /** Memory backed by ordinary JS buffers: for unit tests of loaders and device models. */
  static fromBuffers(regions: readonly { base: number; bytes: Uint8Array }[]): GuestMemory {
    return new GuestMemory(regions.map((r) => makeRegion(r.base, r.bytes, undefined)));
  }

  /** Convenience: fake RAM of `size` bytes laid out like the real thing. */
  static forTest(totalBytes: number): GuestMemory {
    return GuestMemory.fromBuffers(
      ramLayout(totalBytes).map((r) => ({ base: r.base, bytes: new Uint8Array(r.size) })),
    );
  }

  describe(): RegionDescriptor[] {
    return this.regions.map((r) => {
      if (r.hostAddress === undefined) throw new Error("test memory cannot be shared with KVM");
      return { base: r.base, size: r.size, hostAddress: r.hostAddress };
    });
  }

  /** Release the mapping. Only after every thread that viewed it has stopped using it. */
  free(): void {
    if (this.mapping !== undefined) {
      sys.munmap(this.mapping.address, this.mapping.length);
      this.mapping = undefined;
    }
  }

  /** The region holding [address, address+length), or undefined. */
  private find(address: number, length: number): GuestRegion | undefined {
    if (!Number.isSafeInteger(address) || !Number.isSafeInteger(length) || address < 0 || length < 0) {
      return undefined;
    }
    for (const r of this.regions) {
      if (address >= r.base && address - r.base <= r.size - length) return r;
    }
    return undefined;
  }

  /** True when the whole range is guest RAM (in one region). */
  contains(address: number, length: number): boolean {
    return this.find(address, length) !== undefined;
  }

  /**
   * A zero-copy window onto guest RAM. Throws GuestMemoryError when any byte is outside a
   * single RAM region. Callers must not keep it past the memory's lifetime.
   */
  slice(address: number, length: number): Uint8Array {
    const r = this.find(address, length);
    if (r === undefined) throw new GuestMemoryError(address, length);
    const start = address - r.base;
    return r.bytes.subarray(start, start + length);
  }

  read(address: number, into: Uint8Array): void {
    into.set(this.slice(address, into.byteLength));
  }

  write(address: number, from: Uint8Array): void {
    this.slice(address, from.byteLength).set(from);
  }

  fill(address: number, length: number, value = 0): void {
    this.slice(address, length).fill(value);
  }

  private at(address: number, length: number): { view: DataView; offset: number } {
    const r = this.find(address, length);
    if (r === undefined) throw new GuestMemoryError(address, length);
    return { view: r.view, offset: address - r.base };
  }

  readU8(address: number): number {
    const { view, offset } = this.at(address, 1);
    return view.getUint8(offset);
  }
  readU16(address: number): number {
    const { view, offset } = this.at(address, 2);
    return view.getUint16(offset, true);
  }
  readU32(address: number): number {
    const { view, offset } = this.at(address, 4);
    return view.getUint32(offset, true);
  }
  readU64(address: number): bigint {
    const { view, offset } = this.at(address, 8);
    return view.getBigUint64(offset, true);
  }
  writeU8(address: number, value: number): void {
    const { view, offset } = this.at(address, 1);
    view.setUint8(offset, value);
  }
  writeU16(address: number, value: number): void {
    const { view, offset } = this.at(address, 2);
    view.setUint16(offset, value, true);
  }
  writeU32(address: number, value: number): void {
    const { view, offset } = this.at(address, 4);
    view.setUint32(offset, value >>> 0, true);
  }
  writeU64(address: number, value: bigint | number): void {
    const { view, offset } = this.at(address, 8);
    view.setBigUint64(offset, BigInt(value), true);
  }
}

function makeRegion(base: number, bytes: Uint8Array, hostAddress: bigint | undefined): GuestRegion {
  return {
    base,
    size: bytes.byteLength,
    bytes,
    view: new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength),
    hostAddress,
  };
}
