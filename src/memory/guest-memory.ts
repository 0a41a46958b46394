/**
 * Guest physical memory: a few regions of host memory, and the one place where every
 * guest-physical access is bounds-checked. Device models and loaders go through this class
 * and never index a region's bytes with an unchecked guest address.
 *
 * It is also the one map from guest addresses to host memory: the region index (regionOf,
 * and the flat per-region arrays the virtqueue's hot path reads), runs() for a range that
 * may cross regions, and host addresses for building iovecs (iovec.ts). Where RAM sits in
 * the address space is the caller's choice (an architecture's layout); this module knows
 * nothing of holes.
 */
import * as sys from "../sys/libc";
import { F_SEAL_GROW, F_SEAL_SHRINK, MFD_ALLOW_SEALING, addSeals, ftruncate, memfdCreate } from "../sys/memfd";

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

/**
 * Guest RAM another process can map (vhost-user back ends such as virtiofsd): the memfd
 * behind it, and where each stretch of guest-physical memory lies in that file and in this
 * process. Stretches are as long as guest-physical, file and host addresses all stay
 * contiguous (regions split only for koffi's 4 GiB view limit are merged), so a machine's
 * RAM needs as many as its layout has holes plus one.
 */
export interface SharedMemory {
  /** The memfd; owned by the GuestMemory (closed by free()). */
  readonly fd: number;
  readonly stretches: readonly { guestAddress: number; size: number; hostAddress: bigint; fileOffset: number }[];
}

/** koffi's per-view limit: no region is larger. */
export const MAX_REGION_BYTES = sys.MAX_VIEW_BYTES;

/** Where one range of RAM sits in the guest-physical address space. */
export interface RamRange {
  readonly base: number;
  readonly size: number;
}

/**
 * `totalBytes` of RAM from guest address 0 in regions of at most MAX_REGION_BYTES: the
 * layout of memory that has no holes (tests, benchmarks). A machine passes its
 * architecture's layout instead (arch/x86/layout.ts: ramLayout).
 */
export function contiguousLayout(totalBytes: number): RamRange[] {
  const out: RamRange[] = [];
  for (let base = 0; base < totalBytes; base += MAX_REGION_BYTES) {
    out.push({ base, size: Math.min(MAX_REGION_BYTES, totalBytes - base) });
  }
  return out;
}

/** A Run of guest memory: one contiguous piece of a guest range, inside one region. */
export interface Run {
  /** Index of the region (in GuestMemory.regions) holding it. */
  readonly region: number;
  /** Guest address and offset in the region of its first byte. */
  readonly address: number;
  readonly offset: number;
  readonly length: number;
  /** Host address of its first byte; NaN for test memory (no mmap). */
  readonly host: number;
}

/**
 * What the host memory behind guest RAM is. It decides which pages are known to be zero
 * without reading them (src/memory/ram-file.ts): in anonymous memory every page the guest
 * never touched; in a copy-on-write mapping of a snapshot's RAM file, the file's holes.
 */
export type RamBacking =
  | { kind: "anonymous" }
  /** A file mapped MAP_PRIVATE (a snapshot's RAM): the guest's writes never reach the file. */
  | { kind: "file-private"; fd: number }
  /**
   * A file mapped MAP_SHARED that other processes map too (a memfd for vhost-user back
   * ends): what they write is not in our page tables, so the file's holes say what is zero.
   */
  | { kind: "shared-fd"; fd: number };

export class GuestMemory {
  readonly regions: readonly GuestRegion[];
  readonly totalBytes: number;
  /**
   * The region index as flat arrays, by region: first guest address, end (exclusive), the
   * bytes, a little-endian view of them, and the host address of the first byte (NaN for
   * test memory). For hot paths that have found a region with regionOf.
   */
  readonly regionBases: readonly number[];
  readonly regionEnds: readonly number[];
  readonly regionBytes: readonly Uint8Array[];
  readonly regionViews: readonly DataView[];
  readonly regionHosts: readonly number[];
  /**
   * The same bytes as little-endian u32 words (host byte order: x86-64), for reading
   * 4-aligned structures such as descriptor tables; undefined for test memory whose bytes
   * do not start 4-aligned.
   */
  readonly regionWords: readonly (Uint32Array | undefined)[];
  /** Every region has a host address (mmap'd memory): buffers can be handed to the kernel. */
  readonly hasHostAddresses: boolean;
  /** The region found last: accesses cluster, so it is tried first. */
  private lastRegion = 0;
  private mapping: { address: bigint; length: number } | undefined;
  /** Set for memory this object mapped itself (allocate, adopt); undefined for views and test memory. */
  backing: RamBacking | undefined;
  /** Set when RAM is a memfd other processes can map (allocate(layout, { shared: true }), or adopted as "shared-fd"). */
  shared: SharedMemory | undefined;

  private constructor(regions: GuestRegion[], mapping?: { address: bigint; length: number }) {
    this.regions = regions.slice().sort((a, b) => a.base - b.base);
    this.totalBytes = regions.reduce((n, r) => n + r.size, 0);
    this.regionBases = this.regions.map((r) => r.base);
    this.regionEnds = this.regions.map((r) => r.base + r.size);
    this.regionBytes = this.regions.map((r) => r.bytes);
    this.regionViews = this.regions.map((r) => r.view);
    this.regionHosts = this.regions.map((r) => (r.hostAddress === undefined ? NaN : Number(r.hostAddress)));
    this.regionWords = this.regions.map((r) =>
      r.bytes.byteOffset % 4 === 0 ? new Uint32Array(r.bytes.buffer, r.bytes.byteOffset, r.bytes.byteLength >>> 2) : undefined,
    );
    this.hasHostAddresses = this.regions.every((r) => r.hostAddress !== undefined);
    this.mapping = mapping;
  }

  /**
   * Reserve guest RAM with one anonymous mapping (MAP_NORESERVE: pages are only committed
   * when the guest touches them), laid out as `layout` says: a byte count is that much RAM
   * from address 0 (contiguousLayout), a list of ranges is used as given (in order, each
   * at most MAX_REGION_BYTES).
   *
   * With `shared`, the mapping is a memfd mapped MAP_SHARED instead, so that a vhost-user
   * back end can map the same pages from the descriptor (see `shared`); the memfd is
   * sealed against shrinking and growing, so no other process can truncate guest RAM under
   * us (SIGBUS). Both ask for transparent huge pages; whether a memfd gets them depends on
   * /sys/kernel/mm/transparent_hugepage/shmem_enabled (docs/virtiofs.md).
   */
  static allocate(layout: number | readonly RamRange[], opts: { shared?: boolean } = {}): GuestMemory {
    const ranges = typeof layout === "number" ? contiguousLayout(layout) : layout;
    const totalBytes = ranges.reduce((n, r) => n + r.size, 0);
    if (!Number.isSafeInteger(totalBytes) || totalBytes <= 0 || totalBytes % 4096 !== 0) {
      throw new RangeError(`guest memory must be a positive multiple of 4 KiB, not ${totalBytes}`);
    }
    for (const r of ranges) {
      if (r.size <= 0 || r.size > MAX_REGION_BYTES || r.size % 4096 !== 0 || r.base % 4096 !== 0) {
        throw new RangeError(`a RAM region must be page-aligned and 4 KiB to 4 GiB, not 0x${r.base.toString(16)}+0x${r.size.toString(16)}`);
      }
    }
    let fd = -1;
    let address: bigint;
    try {
      if (opts.shared === true) {
        fd = memfdCreate("tskvm-guest-ram", MFD_ALLOW_SEALING);
        ftruncate(fd, totalBytes);
        addSeals(fd, F_SEAL_SHRINK | F_SEAL_GROW);
        address = sys.mmap(totalBytes, sys.PROT_READ | sys.PROT_WRITE, sys.MAP_SHARED | sys.MAP_NORESERVE, fd, 0);
      } else {
        address = sys.mmap(totalBytes, sys.PROT_READ | sys.PROT_WRITE, sys.MAP_PRIVATE | sys.MAP_ANONYMOUS | sys.MAP_NORESERVE);
      }
    } catch (e) {
      if (fd >= 0) sys.close(fd);
      throw e;
    }
    // Transparent huge pages where the host offers them on request (THP "madvise"): fewer
    // page-table levels for KVM to walk or shadow, as QEMU does for guest RAM.
    sys.madvise(address, totalBytes, sys.MADV_HUGEPAGE);
    return GuestMemory.adopt(address, ranges, fd >= 0 ? { kind: "shared-fd", fd } : { kind: "anonymous" });
  }

  /**
   * Take ownership of host memory mapped at `address`, as long as the ranges of `layout`
   * together (freed with munmap by free(), which also closes a backing file), the ranges
   * one after another in the mapping.
   */
  static adopt(address: bigint, layout: readonly RamRange[], backing: RamBacking): GuestMemory {
    let offset = 0n;
    const descriptors: RegionDescriptor[] = layout.map((r) => {
      const d = { base: r.base, size: r.size, hostAddress: address + offset };
      offset += BigInt(r.size);
      return d;
    });
    const mem = GuestMemory.attach(descriptors);
    mem.mapping = { address, length: Number(offset) };
    mem.backing = backing;
    if (backing.kind === "shared-fd") mem.shared = { fd: backing.fd, stretches: mergeStretches(descriptors, address) };
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

  /** Convenience: fake RAM of `totalBytes` from address 0, or laid out as `layout` says. */
  static forTest(totalBytes: number, layout: readonly RamRange[] = contiguousLayout(totalBytes)): GuestMemory {
    return GuestMemory.fromBuffers(layout.map((r) => ({ base: r.base, bytes: new Uint8Array(r.size) })));
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
    if (this.backing !== undefined && this.backing.kind !== "anonymous") sys.close(this.backing.fd);
    this.backing = undefined;
    this.shared = undefined;
  }

  /**
   * The index of the region holding guest address `address`, or -1. `address` must be a
   * number; anything not inside a region (negative, fractional, past 2^53) gives -1.
   */
  regionOf(address: number): number {
    const bases = this.regionBases;
    const ends = this.regionEnds;
    const l = this.lastRegion;
    if (address >= bases[l]! && address < ends[l]!) return l;
    for (let i = 0; i < bases.length; i++) {
      if (address >= bases[i]! && address < ends[i]!) {
        this.lastRegion = i;
        return i;
      }
    }
    return -1;
  }

  /** The region holding all of [address, address+length), or -1. */
  private find(address: number, length: number): number {
    if (!Number.isSafeInteger(address) || !Number.isSafeInteger(length) || address < 0 || length < 0) return -1;
    const r = this.regionOf(address);
    if (r < 0 || address - this.regionBases[r]! > this.regions[r]!.size - length) {
      // A zero-length range at the very end of a region is still "in" it.
      if (length === 0) {
        for (let i = 0; i < this.regions.length; i++) if (address === this.regionEnds[i]) return i;
      }
      return -1;
    }
    return r;
  }

  /**
   * The pieces of guest range [address, address+length) region by region, in order (as
   * vm-memory's get_slices): a range across adjacent regions (guest-physically contiguous
   * RAM split at a region boundary) gives one run per region. Throws GuestMemoryError when
   * any byte is not RAM.
   */
  *runs(address: number, length: number): Generator<Run> {
    if (!Number.isSafeInteger(address) || !Number.isSafeInteger(length) || address < 0 || length < 0) {
      throw new GuestMemoryError(address, length);
    }
    let a = address;
    let left = length;
    while (left > 0) {
      const r = this.regionOf(a);
      if (r < 0) throw new GuestMemoryError(address, length);
      const n = Math.min(left, this.regionEnds[r]! - a);
      const offset = a - this.regionBases[r]!;
      yield { region: r, address: a, offset, length: n, host: this.regionHosts[r]! + offset };
      a += n;
      left -= n;
    }
  }

  /** True when the whole range is guest RAM (in one region). */
  contains(address: number, length: number): boolean {
    return this.find(address, length) >= 0;
  }

  /**
   * A zero-copy window onto guest RAM. Throws GuestMemoryError when any byte is outside a
   * single RAM region. Callers must not keep it past the memory's lifetime.
   */
  slice(address: number, length: number): Uint8Array {
    const r = this.find(address, length);
    if (r < 0) throw new GuestMemoryError(address, length);
    const start = address - this.regionBases[r]!;
    return this.regionBytes[r]!.subarray(start, start + length);
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
    if (r < 0) throw new GuestMemoryError(address, length);
    return { view: this.regionViews[r]!, offset: address - this.regionBases[r]! };
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

/** Regions that continue each other in guest-physical and host address space, as one. */
function mergeStretches(regions: readonly RegionDescriptor[], mapping: bigint): SharedMemory["stretches"] {
  const out: { guestAddress: number; size: number; hostAddress: bigint; fileOffset: number }[] = [];
  for (const r of regions) {
    const last = out.at(-1);
    if (last !== undefined && last.guestAddress + last.size === r.base && last.hostAddress + BigInt(last.size) === r.hostAddress) {
      last.size += r.size;
    } else {
      out.push({ guestAddress: r.base, size: r.size, hostAddress: r.hostAddress, fileOffset: Number(r.hostAddress - mapping) });
    }
  }
  return out;
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
