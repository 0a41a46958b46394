/**
 * The split virtqueue (virtio 1.2 section 2.7), device side, over GuestMemory.
 *
 * Everything here reads memory a running guest may change at any moment and must not
 * trust it: ring indices, descriptor indices, buffer addresses and lengths, indirect
 * tables. Every such value is checked before use and a bad one becomes a VirtqueueError,
 * which the device model turns into DEVICE_NEEDS_RESET (a bad guest breaks its own
 * device, never the VMM). Each descriptor is read once into host memory (DescriptorChain)
 * and used from there, so a guest rewriting a descriptor after it was checked changes
 * nothing.
 *
 * Memory ordering: the rings are shared with vCPU threads. The available index is read
 * with Atomics.load before the ring entries and descriptors it publishes (acquire); the
 * used index is written with Atomics.store after the used elements (release; a
 * sequentially consistent store, a full barrier on x86-64), once per batch; and the
 * event-index fields (used_event, avail.idx after avail_event) are read after such a
 * store, so the "store, fence, load" pairs of sections 2.7.7 and 2.7.10 hold.
 * Ring fields are accessed through typed arrays in host byte order: tskvm is x86-64 only,
 * which is little-endian like the virtio 1.x rings.
 */
import { GuestMemoryError, type GuestMemory } from "../../memory/guest-memory";
import type { IovecArray } from "../../memory/iovec";
import { type QueueConfig, VirtioFeatureBit, feature } from "./types";

export const VIRTQ_DESC_F_NEXT = 1;
export const VIRTQ_DESC_F_WRITE = 2;
export const VIRTQ_DESC_F_INDIRECT = 4;
/** avail.flags: the driver asks for no used-buffer notifications (without EVENT_IDX). */
export const VIRTQ_AVAIL_F_NO_INTERRUPT = 1;
/** used.flags: the device asks for no available-buffer notifications (without EVENT_IDX). */
export const VIRTQ_USED_F_NO_NOTIFY = 1;

/** Largest split queue (section 2.7: Queue Size is at most 32768). */
export const MAX_QUEUE_SIZE = 32768;
/** Largest indirect table accepted, in descriptors; a bound on the work a loop can cause. */
export const MAX_INDIRECT_DESCRIPTORS = 32768;
export const DESCRIPTOR_SIZE = 16;

/** Bytes of each ring part for a queue of `size` entries (section 2.7, table of sizes). */
export const descTableBytes = (size: number): number => DESCRIPTOR_SIZE * size;
export const availRingBytes = (size: number): number => 6 + 2 * size;
export const usedRingBytes = (size: number): number => 6 + 8 * size;

export type VirtqueueErrorKind =
  /** Queue size or ring addresses unusable at activation. */
  | "InvalidQueueConfig"
  /** avail.idx is more than Queue Size entries ahead of what the device has consumed. */
  | "AvailIndexTooFar"
  /** A head (avail ring entry) or next index is past the queue size / indirect table. */
  | "InvalidDescriptorIndex"
  /** A buffer is not (entirely) guest RAM. */
  | "DescriptorOutOfRange"
  /** More descriptors than the table holds: a loop, or a chain longer than allowed. */
  | "ChainTooLong"
  /** An indirect descriptor inside an indirect table. */
  | "NestedIndirect"
  /** An indirect table that is empty, not a multiple of 16 bytes, too big or not in RAM. */
  | "BadIndirectTable"
  /** VIRTQ_DESC_F_INDIRECT without VIRTIO_F_INDIRECT_DESC negotiated. */
  | "IndirectNotNegotiated"
  /** Chain structure the spec forbids: readable after writable, INDIRECT with NEXT. */
  | "InvalidChain";

/** The guest broke the queue. `message` is one log line naming the queue and the datum. */
export class VirtqueueError extends Error {
  constructor(
    readonly kind: VirtqueueErrorKind,
    readonly queueIndex: number,
    detail: string,
  ) {
    super(`virtqueue ${queueIndex}: ${detail}`);
    this.name = "VirtqueueError";
  }
}

const hex = (n: number): string => `0x${n.toString(16)}`;
const isPowerOf2 = (n: number): boolean => n > 0 && (n & (n - 1)) === 0;

/**
 * A descriptor chain as the device sees it: the head index (for addUsed) and the buffers,
 * device-readable ones first, as segments each inside one RAM region (a buffer that spans
 * two regions of contiguous guest-physical memory is split). Zero-length buffers are
 * dropped. Reused across pops with `queue.pop(chain)` so the hot path allocates nothing.
 */
export class DescriptorChain {
  head = 0;
  /** Descriptors visited (direct plus indirect), for statistics and tests. */
  descriptorCount = 0;
  /** Segments [0, readableSegments) are device-readable, the rest device-writable. */
  segmentCount = 0;
  readableSegments = 0;
  readableBytes = 0;
  writableBytes = 0;
  /** Per segment: guest address, length, region index, offset in the region. */
  segAddr = new Float64Array(8);
  segLen = new Float64Array(8);
  segRegion = new Int32Array(8);
  segOffset = new Float64Array(8);
  readonly reader: ChainReader;
  readonly writer: ChainWriter;

  constructor(readonly memory: GuestMemory) {
    this.reader = new ChainReader(this);
    this.writer = new ChainWriter(this);
  }

  /** Guest address of the last device-writable byte (the virtio-blk status byte), or -1. */
  lastWritableByte(): number {
    if (this.writableBytes === 0) return -1;
    const i = this.segmentCount - 1;
    return this.segAddr[i]! + this.segLen[i]! - 1;
  }

  /** Store `value` in the last device-writable byte; false when there is none. */
  setLastWritableByte(value: number): boolean {
    if (this.writableBytes === 0) return false;
    const i = this.segmentCount - 1;
    this.memory.regionBytes[this.segRegion[i]!]![this.segOffset[i]! + this.segLen[i]! - 1] = value;
    return true;
  }

  /**
   * Store `value` at byte `offset` of the device-writable stream (a header field, in
   * place); false when the stream is shorter.
   */
  setWritableByte(offset: number, value: number): boolean {
    let o = offset;
    for (let i = this.readableSegments; i < this.segmentCount; i++) {
      const len = this.segLen[i]!;
      if (o < len) {
        this.memory.regionBytes[this.segRegion[i]!]![this.segOffset[i]! + o] = value;
        return true;
      }
      o -= len;
    }
    return false;
  }

  /**
   * Append the device-writable (`writable`) or device-readable buffers to `iov` as host
   * addresses, for a readv/writev straight to or from guest memory. False, with nothing
   * appended, when they do not all fit or the memory has no host addresses (test memory).
   */
  appendIovecs(iov: IovecArray, writable: boolean): boolean {
    const first = writable ? this.readableSegments : 0;
    const end = writable ? this.segmentCount : this.readableSegments;
    if (iov.count + end - first > iov.capacity || !this.memory.hasHostAddresses) return false;
    const hosts = this.memory.regionHosts;
    for (let i = first; i < end; i++) iov.push(hosts[this.segRegion[i]!]! + this.segOffset[i]!, this.segLen[i]!);
    return true;
  }

  /** @internal */
  clear(head: number): void {
    this.head = head;
    this.descriptorCount = 0;
    this.segmentCount = 0;
    this.readableSegments = 0;
    this.readableBytes = 0;
    this.writableBytes = 0;
  }

  /** @internal A buffer GuestMemory.contains accepted, inside region `region`. */
  pushSegment(addr: number, len: number, writable: boolean, region: number): void {
    if (this.segmentCount === this.segAddr.length) this.grow();
    const i = this.segmentCount++;
    this.segAddr[i] = addr;
    this.segLen[i] = len;
    this.segRegion[i] = region;
    this.segOffset[i] = addr - this.memory.regionBases[region]!;
    if (writable) {
      this.writableBytes += len;
    } else {
      this.readableSegments = this.segmentCount;
      this.readableBytes += len;
    }
  }

  private grow(): void {
    const n = this.segAddr.length * 2;
    const a = new Float64Array(n);
    const l = new Float64Array(n);
    const r = new Int32Array(n);
    const o = new Float64Array(n);
    a.set(this.segAddr);
    l.set(this.segLen);
    r.set(this.segRegion);
    o.set(this.segOffset);
    this.segAddr = a;
    this.segLen = l;
    this.segRegion = r;
    this.segOffset = o;
  }

  /** @internal Rewind the reader and writer to the start of their streams. */
  rewind(): void {
    this.reader.reset();
    this.writer.reset();
  }
}

/** Copies up to this size go byte by byte: cheaper than making a view to copy from. */
const SMALL_COPY = 64;

/**
 * A cursor over a run of segments of a chain. The stream is consumed in runs, each a
 * contiguous piece of one segment: `nextRun` moves over one and leaves where it is in
 * `runBytes`/`runOffset` (and `runHost`, its host address, NaN for test memory), so a
 * caller can hand it to the kernel without making a view; `nextSlice` makes the view.
 */
export abstract class ChainCursor {
  protected seg = 0;
  protected off = 0;
  protected left = 0;
  protected done = 0;
  /** The region bytes holding the last run, and where in them it starts. */
  runBytes: Uint8Array = EMPTY;
  runOffset = 0;
  /** Index of the region (in the chain's GuestMemory) holding the last run. */
  runRegion = 0;
  /** Host address of the last run; NaN for memory that has none (tests). */
  runHost = NaN;

  constructor(protected readonly chain: DescriptorChain) {}

  /** Bytes not yet consumed. */
  get remaining(): number {
    return this.left;
  }

  /** Bytes consumed so far. */
  get consumed(): number {
    return this.done;
  }

  /** Whether runs have host addresses (mmap'd guest RAM), so the kernel can move them by address. */
  get hostAddressed(): boolean {
    return this.chain.memory.hasHostAddresses;
  }

  /** @internal */
  abstract reset(): void;

  /** Move over the next up to `max` bytes that lie in one segment; returns how many (0 at the end). */
  nextRun(max: number = this.left): number {
    if (this.left === 0 || max <= 0) return 0;
    const c = this.chain;
    while (this.off === c.segLen[this.seg]) {
      this.seg++;
      this.off = 0;
    }
    const n = Math.min(c.segLen[this.seg]! - this.off, max, this.left);
    const r = c.segRegion[this.seg]!;
    this.runRegion = r;
    this.runBytes = c.memory.regionBytes[r]!;
    this.runOffset = c.segOffset[this.seg]! + this.off;
    this.runHost = c.memory.regionHosts[r]! + this.runOffset;
    this.off += n;
    this.left -= n;
    this.done += n;
    return n;
  }

  /** The little-endian u32 at byte `at` of the last run (the caller keeps `at + 4` inside it). */
  runU32(at: number): number {
    return this.chain.memory.regionViews[this.runRegion]!.getUint32(this.runOffset + at, true);
  }

  /**
   * A zero-copy view of guest memory: the next up to `max` bytes of the stream that lie in
   * one segment, or undefined at the end. The cursor moves past them.
   */
  nextSlice(max: number = this.left): Uint8Array | undefined {
    const n = this.nextRun(max);
    if (n === 0) return undefined;
    const b = this.runBytes;
    return new Uint8Array(b.buffer, b.byteOffset + this.runOffset, n);
  }

  /** Move forward `n` bytes (or to the end); returns how far it moved. */
  skip(n: number): number {
    let moved = 0;
    for (let k = this.nextRun(n); k > 0; k = this.nextRun(n - moved)) moved += k;
    return moved;
  }
}

const EMPTY = new Uint8Array(0);

/** The device-readable buffers of a chain as one byte stream. */
export class ChainReader extends ChainCursor {
  /** @internal */
  reset(): void {
    this.seg = 0;
    this.off = 0;
    this.left = this.chain.readableBytes;
    this.done = 0;
  }

  /** Copy up to dst.length bytes out of the stream; returns how many were copied. */
  readInto(dst: Uint8Array): number {
    let n = 0;
    for (let k = this.nextRun(dst.length); k > 0; k = this.nextRun(dst.length - n)) {
      const b = this.runBytes;
      const o = this.runOffset;
      if (k <= SMALL_COPY) {
        for (let i = 0; i < k; i++) dst[n + i] = b[o + i]!;
      } else {
        dst.set(new Uint8Array(b.buffer, b.byteOffset + o, k), n);
      }
      n += k;
    }
    return n;
  }

  /** The next min(n, remaining) bytes, copied. */
  read(n: number): Uint8Array {
    const out = new Uint8Array(Math.min(n, this.left));
    this.readInto(out);
    return out;
  }
}

/** The device-writable buffers of a chain as one byte stream. */
export class ChainWriter extends ChainCursor {
  /** @internal */
  reset(): void {
    // Writable segments follow the readable ones.
    this.seg = this.chain.readableSegments;
    this.off = 0;
    this.left = this.chain.writableBytes;
    this.done = 0;
  }

  /**
   * Keep the stream to its first `bytes` bytes (e.g. all but a trailing status byte that
   * is written separately). Only before anything was written.
   */
  limitTo(bytes: number): void {
    if (this.done !== 0) throw new Error("ChainWriter.limitTo after writing");
    this.left = Math.max(0, Math.min(bytes, this.chain.writableBytes));
  }

  /** Copy bytes into the stream; returns how many fitted. */
  write(bytes: Uint8Array): number {
    let n = 0;
    for (let k = this.nextRun(bytes.length); k > 0; k = this.nextRun(bytes.length - n)) {
      const b = this.runBytes;
      const o = this.runOffset;
      if (k <= SMALL_COPY) {
        for (let i = 0; i < k; i++) b[o + i] = bytes[n + i]!;
      } else {
        b.set(n === 0 && k === bytes.length ? bytes : bytes.subarray(n, n + k), o);
      }
      n += k;
    }
    return n;
  }

  /** Write `n` bytes of `value` (or to the end); returns how many. */
  fill(n: number, value = 0): number {
    let k = 0;
    for (let r = this.nextRun(n); r > 0; r = this.nextRun(n - k)) {
      this.runBytes.fill(value, this.runOffset, this.runOffset + r);
      k += r;
    }
    return k;
  }
}

/**
 * One split virtqueue. Create it at activation (`Virtqueue.create` validates the rings),
 * then: pop chains, addUsed each, and ask needsNotification before interrupting.
 */
/** A queue's device-side positions (Virtqueue.state), plain data for snapshots. */
export interface VirtqueueState {
  /** The next available-ring entry the device will consume. */
  readonly nextAvail: number;
  /** The used index published to the driver. */
  readonly nextUsed: number;
  /** The used index at the last interrupt decision (EVENT_IDX), -1 before any. */
  readonly signalled: number;
  /** used.flags as the device last wrote them. */
  readonly usedFlags: number;
}

export class Virtqueue {
  readonly index: number;
  readonly size: number;
  readonly eventIdx: boolean;
  readonly indirect: boolean;
  private readonly memory: GuestMemory;
  private readonly mask: number;
  /** Descriptor table as u32 (addr lo, addr hi, len, flags|next<<16) and u16 views. */
  private readonly desc32: Uint32Array;
  private readonly desc16: Uint16Array;
  /** avail ring: [flags, idx, ring[size], used_event]. */
  private readonly avail16: Uint16Array;
  /** used ring: u16 [flags, idx, ..., avail_event at 2 + 4*size]; u32 elems from index 1. */
  private readonly used16: Uint16Array;
  private readonly used32: Uint32Array;
  private readonly usedEventAt: number;
  private readonly availEventAt: number;
  private nextAvail = 0;
  /** avail.idx as last read: entries up to it are known published. */
  private availSeen = 0;
  private nextUsed = 0;
  /** The used index as last published to the driver. */
  private published = 0;
  /** Used index at the last needsNotification that found new entries; -1 before that. */
  private signalled = -1;
  /** Used entries added since needsNotification last looked. */
  private unsignalled = 0;
  private usedFlags = 0;

  private constructor(memory: GuestMemory, config: QueueConfig, features: bigint, resume?: VirtqueueState) {
    this.memory = memory;
    this.index = config.index;
    this.size = config.size;
    this.mask = config.size - 1;
    this.eventIdx = (features & feature(VirtioFeatureBit.RING_EVENT_IDX)) !== 0n;
    this.indirect = (features & feature(VirtioFeatureBit.RING_INDIRECT_DESC)) !== 0n;
    const d = this.ringSlice(config.descAddr, descTableBytes(this.size), 16, "descriptor table");
    const a = this.ringSlice(config.availAddr, availRingBytes(this.size), 2, "available ring");
    const u = this.ringSlice(config.usedAddr, usedRingBytes(this.size), 4, "used ring");
    this.desc32 = new Uint32Array(d.buffer, d.byteOffset, d.length / 4);
    this.desc16 = new Uint16Array(d.buffer, d.byteOffset, d.length / 2);
    this.avail16 = new Uint16Array(a.buffer, a.byteOffset, a.length / 2);
    this.used16 = new Uint16Array(u.buffer, u.byteOffset, u.length / 2);
    this.used32 = new Uint32Array(u.buffer, u.byteOffset, Math.floor(u.length / 4));
    this.usedEventAt = 2 + this.size;
    this.availEventAt = 2 + 4 * this.size;
    if (resume !== undefined) {
      // A restored device goes on where it was: its rings are in guest RAM as they were.
      this.nextAvail = this.availSeen = resume.nextAvail & 0xffff;
      this.nextUsed = this.published = resume.nextUsed & 0xffff;
      this.signalled = resume.signalled;
      this.usedFlags = resume.usedFlags & 0xffff;
      return;
    }
    // A freshly reset device starts both indices at 0 (the driver zeroed the rings).
    Atomics.store(this.used16, 0, 0);
  }

  /**
   * Check a queue the driver set up and make it usable: size a power of 2 up to 32768,
   * each ring aligned (descriptors 16, available 2, used 4) and inside one RAM region.
   */
  static create(memory: GuestMemory, config: QueueConfig, features: bigint, resume?: VirtqueueState): Virtqueue {
    const s = config.size;
    if (!Number.isInteger(s) || !isPowerOf2(s) || s > MAX_QUEUE_SIZE) {
      throw new VirtqueueError("InvalidQueueConfig", config.index, `queue size ${s} is not a power of 2 from 1 to ${MAX_QUEUE_SIZE}`);
    }
    return new Virtqueue(memory, config, features, resume);
  }

  /**
   * Where the device is in the rings, for a snapshot. Valid when the device is quiesced:
   * every used element published and every chain it popped either used or given back
   * (unpop), so that this and guest RAM are the whole queue state.
   */
  state(): VirtqueueState {
    return { nextAvail: this.nextAvail, nextUsed: this.nextUsed, signalled: this.signalled, usedFlags: this.usedFlags };
  }

  /**
   * Give back the last `count` chains popped and not used: they are popped again, in the
   * same order, next time (a device quiescing for a snapshot with buffers it held on to).
   */
  unpop(count: number): void {
    if (!Number.isInteger(count) || count < 0 || count > ((this.nextAvail - this.nextUsed) & 0xffff)) {
      throw new RangeError(`virtqueue ${this.index}: cannot give back ${count} chains`);
    }
    this.nextAvail = (this.nextAvail - count) & 0xffff;
  }

  /**
   * Take over a queue that another party (a vhost-user back end that died) served until now,
   * answering in the order requests were made available: continue at its published used
   * index, so every entry made available since is popped, whether it had taken it or not.
   * Throws VirtqueueError when the rings are broken (see create) or the indices are more
   * than a queue apart.
   */
  static takeOver(memory: GuestMemory, config: QueueConfig, features: bigint): Virtqueue {
    const q = Virtqueue.create(memory, config, features);
    const used = Atomics.load(q.used16, 1);
    const pending = (Atomics.load(q.avail16, 1) - used) & 0xffff;
    if (pending > q.size) {
      throw new VirtqueueError("AvailIndexTooFar", q.index, `available index is ${pending} entries past the used index ${used}, more than the queue size ${q.size}`);
    }
    q.nextAvail = q.availSeen = q.nextUsed = q.published = used;
    return q;
  }

  private ringSlice(addr: number, length: number, align: number, what: string): Uint8Array {
    if (!Number.isSafeInteger(addr) || addr % align !== 0) {
      throw new VirtqueueError("InvalidQueueConfig", this.index, `${what} at ${hex(addr)} is not ${align}-byte aligned`);
    }
    if (!this.memory.contains(addr, length)) {
      throw new VirtqueueError("InvalidQueueConfig", this.index, `${what} ${hex(addr)}+${hex(length)} is outside guest RAM`);
    }
    const bytes = this.memory.slice(addr, length);
    if (bytes.byteOffset % align !== 0) {
      // Only possible with test memory built over an unaligned buffer.
      throw new VirtqueueError("InvalidQueueConfig", this.index, `${what} is not aligned in host memory`);
    }
    return bytes;
  }

  /** The index of the next available entry the device will consume. */
  get lastAvailIndex(): number {
    return this.nextAvail;
  }

  /** The used index after the elements added so far (published or not yet). */
  get usedIndex(): number {
    return this.nextUsed;
  }

  /** Entries the driver has made available and the device not yet consumed. */
  pending(): number {
    return (Atomics.load(this.avail16, 1) - this.nextAvail) & 0xffff;
  }

  /**
   * The next available descriptor chain, checked, or undefined when the ring is empty.
   * Pass `into` to reuse a chain object. Throws VirtqueueError for anything malformed; the
   * queue is then unusable until the driver resets the device.
   */
  pop(into?: DescriptorChain): DescriptorChain | undefined {
    if (this.nextAvail === this.availSeen) {
      // Acquire: the idx is read before the entries it publishes. Read again only when
      // the entries seen last time are used up.
      this.availSeen = Atomics.load(this.avail16, 1);
    }
    const availIdx = this.availSeen;
    const pending = (availIdx - this.nextAvail) & 0xffff;
    if (pending === 0) return undefined;
    if (pending > this.size) {
      throw new VirtqueueError(
        "AvailIndexTooFar",
        this.index,
        `available index ${availIdx} is ${pending} entries past ${this.nextAvail}, more than the queue size ${this.size}`,
      );
    }
    const head = this.avail16[2 + (this.nextAvail & this.mask)]!;
    const chain = into ?? new DescriptorChain(this.memory);
    this.parse(head, chain);
    this.nextAvail = (this.nextAvail + 1) & 0xffff;
    return chain;
  }

  private parse(head: number, chain: DescriptorChain): void {
    if (head >= this.size) {
      throw new VirtqueueError("InvalidDescriptorIndex", this.index, `head descriptor index ${head} is not below the queue size ${this.size}`);
    }
    chain.clear(head);
    // The current table: the queue's (desc32/desc16), or an indirect one: the bytes of
    // the region holding it (undefined while in the queue's) and where in them it starts.
    let table: Uint8Array | undefined;
    let tbase = 0;
    // The indirect table as u32 words when it is 4-aligned (the usual case): three loads
    // per descriptor instead of sixteen byte loads.
    let words: Uint32Array | undefined;
    let wbase = 0;
    let limit = this.size;
    let count = 0;
    let i = head;
    let sawWritable = false;
    for (;;) {
      if (++count > limit) {
        throw new VirtqueueError(
          "ChainTooLong",
          this.index,
          table === undefined
            ? `chain from head ${head} is longer than the queue size ${this.size} (a loop?)`
            : `chain in the indirect table of head ${head} is longer than its ${limit} descriptors (a loop?)`,
        );
      }
      chain.descriptorCount++;
      let lo: number, hi: number, len: number, flags: number, next: number;
      if (table === undefined) {
        const w = i * 4;
        lo = this.desc32[w]!;
        hi = this.desc32[w + 1]!;
        len = this.desc32[w + 2]!;
        flags = this.desc16[i * 8 + 6]!;
        next = this.desc16[i * 8 + 7]!;
      } else if (words !== undefined) {
        const w = wbase + i * 4;
        lo = words[w]!;
        hi = words[w + 1]!;
        len = words[w + 2]!;
        const fn = words[w + 3]!;
        flags = fn & 0xffff;
        next = fn >>> 16;
      } else {
        const o = tbase + i * 16;
        lo = readU32(table, o);
        hi = readU32(table, o + 4);
        len = readU32(table, o + 8);
        flags = table[o + 12]! | (table[o + 13]! << 8);
        next = table[o + 14]! | (table[o + 15]! << 8);
      }
      // 2^53 and beyond is never RAM; keep such addresses unsafe so every check fails.
      const addr = hi * 0x100000000 + lo;

      if (flags & VIRTQ_DESC_F_INDIRECT) {
        if (table !== undefined) {
          throw new VirtqueueError("NestedIndirect", this.index, `${where(table, i, head)} points at another indirect table`);
        }
        if (!this.indirect) {
          throw new VirtqueueError("IndirectNotNegotiated", this.index, `${where(table, i, head)} is indirect but VIRTIO_F_INDIRECT_DESC was not negotiated`);
        }
        if (flags & VIRTQ_DESC_F_NEXT) {
          throw new VirtqueueError("InvalidChain", this.index, `${where(table, i, head)} has both INDIRECT and NEXT`);
        }
        if (len === 0 || len % DESCRIPTOR_SIZE !== 0 || len / DESCRIPTOR_SIZE > MAX_INDIRECT_DESCRIPTORS) {
          throw new VirtqueueError(
            "BadIndirectTable",
            this.index,
            `${where(table, i, head)}: indirect table length ${len} is not a non-zero multiple of 16 up to ${MAX_INDIRECT_DESCRIPTORS * DESCRIPTOR_SIZE}`,
          );
        }
        if (!this.memory.contains(addr, len)) {
          throw new VirtqueueError("BadIndirectTable", this.index, `${where(table, i, head)}: indirect table ${hex(addr)}+${hex(len)} is outside guest RAM`);
        }
        // The WRITE flag of the descriptor naming the table is ignored (2.7.5.3.2).
        const r = this.memory.regionOf(addr);
        table = this.memory.regionBytes[r]!;
        tbase = addr - this.memory.regionBases[r]!;
        words = (tbase & 3) === 0 ? this.memory.regionWords[r] : undefined;
        wbase = tbase >>> 2;
        limit = len / DESCRIPTOR_SIZE;
        count = 0;
        i = 0;
        continue;
      }

      const writable = (flags & VIRTQ_DESC_F_WRITE) !== 0;
      if (writable) {
        sawWritable = true;
      } else if (sawWritable) {
        throw new VirtqueueError("InvalidChain", this.index, `${where(table, i, head)} is device-readable after a device-writable one`);
      }
      if (len > 0) this.addBuffer(chain, addr, len, writable, table, i);

      if ((flags & VIRTQ_DESC_F_NEXT) === 0) break;
      if (next >= limit) {
        throw new VirtqueueError(
          "InvalidDescriptorIndex",
          this.index,
          `${where(table, i, head)} chains to ${next}, not below ${table === undefined ? "the queue size" : "the indirect table's length"} ${limit}`,
        );
      }
      i = next;
    }
    chain.rewind();
  }

  /**
   * Record a buffer; all of it must be RAM (GuestMemory.contains). A buffer spanning two
   * adjacent regions (guest-physically contiguous, split at 4 GiB boundaries) is split.
   */
  private addBuffer(
    chain: DescriptorChain,
    addr: number,
    len: number,
    writable: boolean,
    table: Uint8Array | undefined,
    i: number,
  ): void {
    // The usual case: the whole buffer in one region, found by one lookup that tries the
    // region of the last access first. (An address of 2^53 or more is in no region.)
    const r = this.memory.regionOf(addr);
    if (r >= 0 && len <= this.memory.regionEnds[r]! - addr) {
      chain.pushSegment(addr, len, writable, r);
      return;
    }
    try {
      for (const run of this.memory.runs(addr, len)) chain.pushSegment(run.address, run.length, writable, run.region);
    } catch (e) {
      if (!(e instanceof GuestMemoryError)) throw e;
      throw new VirtqueueError("DescriptorOutOfRange", this.index, `${where(table, i, chain.head)}: buffer ${hex(addr)}+${hex(len)} is outside guest RAM`);
    }
  }

  /**
   * Return a chain to the driver: `len` bytes were written into its writable buffers.
   * The element is written now; the used index that makes it visible is published by the
   * next publishUsed, needsNotification or enableNotification (one atomic store per
   * batch instead of one per request).
   */
  addUsed(head: number, len: number): void {
    if (!Number.isInteger(head) || head < 0 || head >= this.size) {
      throw new RangeError(`virtqueue ${this.index}: addUsed head ${head} out of range`);
    }
    const slot = this.nextUsed & this.mask;
    this.used32[1 + 2 * slot] = head;
    this.used32[2 + 2 * slot] = len >>> 0;
    this.nextUsed = (this.nextUsed + 1) & 0xffff;
    this.unsignalled++;
  }

  /** Publish the used index: every element added so far becomes visible to the driver. */
  publishUsed(): void {
    if (this.published === this.nextUsed) return;
    this.published = this.nextUsed;
    // Release: the elements are visible before the index that publishes them.
    Atomics.store(this.used16, 1, this.nextUsed);
  }

  /**
   * Publish the used index, and say whether the driver wants an interrupt for the used
   * entries added since the last time this returned. With VIRTIO_F_EVENT_IDX: when
   * used_event (in the available ring) lies in [last signalled, new used idx). Without:
   * unless avail.flags has NO_INTERRUPT.
   */
  needsNotification(): boolean {
    this.publishUsed();
    if (this.unsignalled === 0) return false;
    const now = this.nextUsed;
    const old = this.signalled;
    this.signalled = now;
    this.unsignalled = 0;
    if (this.eventIdx) {
      // The used idx store (Atomics.store, a full barrier) precedes this load.
      const usedEvent = Atomics.load(this.avail16, this.usedEventAt);
      if (old < 0) return true;
      return needEvent(usedEvent, now, old);
    }
    return (Atomics.load(this.avail16, 0) & VIRTQ_AVAIL_F_NO_INTERRUPT) === 0;
  }

  /**
   * Ask the driver not to notify (kick) while the device is draining the ring. With
   * EVENT_IDX nothing is written: avail_event stays behind, so the driver does not kick
   * again until enableNotification moves it.
   */
  disableNotification(): void {
    if (this.eventIdx) return;
    if ((this.usedFlags & VIRTQ_USED_F_NO_NOTIFY) === 0) {
      this.usedFlags |= VIRTQ_USED_F_NO_NOTIFY;
      Atomics.store(this.used16, 0, this.usedFlags);
    }
  }

  /**
   * Ask for notifications again (EVENT_IDX: avail_event = next entry to consume) and
   * report whether entries arrived meanwhile: if so, drain again before sleeping.
   */
  enableNotification(): boolean {
    this.publishUsed();
    if (this.eventIdx) {
      Atomics.store(this.used16, this.availEventAt, this.nextAvail);
    } else if ((this.usedFlags & VIRTQ_USED_F_NO_NOTIFY) !== 0) {
      this.usedFlags &= ~VIRTQ_USED_F_NO_NOTIFY;
      Atomics.store(this.used16, 0, this.usedFlags);
    }
    // The store above is a full barrier: a driver that published before it is seen here,
    // one that publishes after it sees the new avail_event/flags and kicks.
    this.availSeen = Atomics.load(this.avail16, 1);
    return this.availSeen !== this.nextAvail;
  }
}

/** vring_need_event (section 2.7.10): is event_idx in [old, new) modulo 2^16? */
export function needEvent(eventIdx: number, newIdx: number, oldIdx: number): boolean {
  return ((newIdx - eventIdx - 1) & 0xffff) < ((newIdx - oldIdx) & 0xffff);
}

/** Names a descriptor in an error message (built only when there is an error). */
function where(table: Uint8Array | undefined, i: number, head: number): string {
  return table === undefined ? `descriptor ${i}` : `indirect descriptor ${i} of head ${head}`;
}

function readU32(b: Uint8Array, o: number): number {
  return (b[o]! | (b[o + 1]! << 8) | (b[o + 2]! << 16) | (b[o + 3]! << 24)) >>> 0;
}
