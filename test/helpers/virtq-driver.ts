/**
 * The driver side of a split virtqueue, for tests and benchmarks: lays out the descriptor
 * table, available and used rings in (fake or real) guest memory, builds chains (direct or
 * through an indirect table) over buffers it allocates, publishes them, and reads the used
 * ring back. Raw writers let hostile-guest tests put anything anywhere.
 */
import type { GuestMemory } from "../../src/memory/guest-memory";
import type { QueueConfig } from "../../src/devices/virtio/types";
import {
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
  availRingBytes,
  descTableBytes,
  needEvent,
  usedRingBytes,
} from "../../src/devices/virtio/queue";

/** A buffer of a chain: guest address, length, and whether the device writes it. */
export interface Buf {
  addr: number;
  len: number;
  write?: boolean;
}

/** A raw descriptor; addr may be a bigint to reach past 2^53. */
export interface RawDesc {
  addr: number | bigint;
  len: number;
  flags?: number;
  next?: number;
}

export interface UsedElem {
  id: number;
  len: number;
}

export interface DriverOptions {
  size?: number;
  index?: number;
  /** Where the rings go (descriptor table first; 4 KiB aligned parts). */
  ringBase?: number;
  /** Data area for buffers and indirect tables: [dataBase, dataEnd). */
  dataBase?: number;
  dataEnd?: number;
}

const align = (n: number, a: number): number => Math.ceil(n / a) * a;

export class VirtqDriver {
  readonly size: number;
  readonly index: number;
  readonly descAddr: number;
  readonly availAddr: number;
  readonly usedAddr: number;
  /** avail.idx as the driver last published it. */
  availIdx = 0;
  /** used.idx as the driver last consumed it. */
  lastUsed = 0;
  private free: number[];
  private readonly chains = new Map<number, number[]>();
  private dataNext: number;
  private readonly dataEnd: number;

  constructor(
    readonly mem: GuestMemory,
    options: DriverOptions = {},
  ) {
    this.size = options.size ?? 16;
    this.index = options.index ?? 0;
    const base = options.ringBase ?? 0x10000;
    this.descAddr = base;
    this.availAddr = align(base + descTableBytes(this.size), 4096);
    this.usedAddr = align(this.availAddr + availRingBytes(this.size), 4096);
    const ringsEnd = align(this.usedAddr + usedRingBytes(this.size), 4096);
    this.dataNext = options.dataBase ?? Math.max(ringsEnd, 0x100000);
    this.dataEnd = options.dataEnd ?? mem.regions[0]!.base + mem.regions[0]!.size;
    mem.fill(this.descAddr, ringsEnd - this.descAddr, 0);
    this.free = Array.from({ length: this.size }, (_, i) => i);
  }

  config(): QueueConfig {
    return {
      index: this.index,
      size: this.size,
      ready: true,
      descAddr: this.descAddr,
      availAddr: this.availAddr,
      usedAddr: this.usedAddr,
    };
  }

  /** Reserve `len` bytes of the data area. */
  alloc(len: number, alignment = 16): number {
    const addr = align(this.dataNext, alignment);
    if (addr + len > this.dataEnd) throw new Error(`test driver: data area exhausted (${len} bytes wanted)`);
    this.dataNext = addr + len;
    return addr;
  }

  /** A device-readable buffer holding `bytes`. */
  readable(bytes: Uint8Array): Buf {
    const addr = this.alloc(Math.max(bytes.length, 1));
    this.mem.write(addr, bytes);
    return { addr, len: bytes.length };
  }

  /** A device-writable buffer of `len` bytes, filled with `fill`. */
  writable(len: number, fill = 0xee): Buf {
    const addr = this.alloc(Math.max(len, 1));
    this.mem.fill(addr, Math.max(len, 1), fill);
    return { addr, len, write: true };
  }

  writeDescriptor(i: number, d: RawDesc, table = this.descAddr): void {
    const at = table + 16 * i;
    this.mem.writeU64(at, BigInt(d.addr));
    this.mem.writeU32(at + 8, d.len >>> 0);
    this.mem.writeU16(at + 12, d.flags ?? 0);
    this.mem.writeU16(at + 14, d.next ?? 0);
  }

  /** Write raw descriptors as an indirect table at `addr` (allocated when omitted). */
  writeTable(descs: RawDesc[], addr = this.alloc(16 * Math.max(descs.length, 1))): number {
    descs.forEach((d, i) => this.writeDescriptor(i, d, addr));
    return addr;
  }

  private takeDescriptors(n: number): number[] {
    if (n > this.free.length) throw new Error(`test driver: ${n} descriptors wanted, ${this.free.length} free`);
    return this.free.splice(0, n);
  }

  /**
   * Build a chain over `bufs` (in order) and return its head; not yet published. With
   * `indirect`, one queue descriptor points at a table holding the buffers.
   */
  addChain(bufs: Buf[], opts: { indirect?: boolean } = {}): number {
    if (bufs.length === 0) throw new Error("test driver: a chain needs a buffer");
    const link = (b: Buf, i: number, n: number): RawDesc => ({
      addr: b.addr,
      len: b.len,
      flags: (b.write ? VIRTQ_DESC_F_WRITE : 0) | (i < n - 1 ? VIRTQ_DESC_F_NEXT : 0),
      next: i < n - 1 ? i + 1 : 0,
    });
    if (opts.indirect) {
      const table = this.writeTable(bufs.map((b, i) => link(b, i, bufs.length)));
      const [head] = this.takeDescriptors(1) as [number];
      this.writeDescriptor(head, { addr: table, len: 16 * bufs.length, flags: VIRTQ_DESC_F_INDIRECT });
      this.chains.set(head, [head]);
      return head;
    }
    const ids = this.takeDescriptors(bufs.length);
    bufs.forEach((b, i) => {
      const d = link(b, i, bufs.length);
      this.writeDescriptor(ids[i]!, { ...d, next: i < bufs.length - 1 ? ids[i + 1]! : 0 });
    });
    this.chains.set(ids[0]!, ids);
    return ids[0]!;
  }

  /** Put `head` in the available ring and publish the new avail.idx. */
  publish(head: number): void {
    this.mem.writeU16(this.availAddr + 4 + 2 * (this.availIdx % this.size), head);
    this.availIdx = (this.availIdx + 1) & 0xffff;
    this.mem.writeU16(this.availAddr + 2, this.availIdx);
  }

  /** addChain + publish. */
  add(bufs: Buf[], opts: { indirect?: boolean } = {}): number {
    const head = this.addChain(bufs, opts);
    this.publish(head);
    return head;
  }

  /** Write avail.idx directly (hostile tests). */
  setAvailIdx(idx: number): void {
    this.availIdx = idx & 0xffff;
    this.mem.writeU16(this.availAddr + 2, this.availIdx);
  }

  /** Write an available ring entry directly. */
  setAvailEntry(slot: number, head: number): void {
    this.mem.writeU16(this.availAddr + 4 + 2 * slot, head);
  }

  setAvailFlags(flags: number): void {
    this.mem.writeU16(this.availAddr, flags);
  }

  /** used_event: "interrupt me when used.idx passes this". */
  setUsedEvent(idx: number): void {
    this.mem.writeU16(this.availAddr + 4 + 2 * this.size, idx & 0xffff);
  }

  usedIdx(): number {
    return this.mem.readU16(this.usedAddr + 2);
  }

  usedFlags(): number {
    return this.mem.readU16(this.usedAddr);
  }

  /** avail_event as the device wrote it. */
  availEvent(): number {
    return this.mem.readU16(this.usedAddr + 4 + 8 * this.size);
  }

  /** Would a driver kick after moving avail.idx from `oldIdx` to `newIdx` (EVENT_IDX)? */
  kickNeeded(oldIdx: number, newIdx: number): boolean {
    return needEvent(this.availEvent(), newIdx, oldIdx);
  }

  /** The used elements since the last call; their descriptors go back on the free list. */
  used(): UsedElem[] {
    const out: UsedElem[] = [];
    const idx = this.usedIdx();
    while (this.lastUsed !== idx) {
      const slot = this.lastUsed % this.size;
      const at = this.usedAddr + 4 + 8 * slot;
      const e = { id: this.mem.readU32(at), len: this.mem.readU32(at + 4) };
      out.push(e);
      const ids = this.chains.get(e.id);
      if (ids !== undefined) {
        this.chains.delete(e.id);
        this.free.push(...ids);
      }
      this.lastUsed = (this.lastUsed + 1) & 0xffff;
    }
    return out;
  }

  /** Consume used entries without freeing descriptors: for chains that are republished. */
  skipUsed(): number {
    const idx = this.usedIdx();
    const n = (idx - this.lastUsed) & 0xffff;
    this.lastUsed = idx;
    return n;
  }
}
