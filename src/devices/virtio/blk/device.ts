/**
 * virtio-blk back end (virtio 1.2 section 5.2) over a raw image file: one request queue,
 * requests served synchronously in the I/O worker with pread/pwrite straight between the
 * file and guest memory (each descriptor buffer is a zero-copy slice of guest RAM).
 *
 * Request: header {le32 type, le32 reserved, le64 sector} in the device-readable part,
 * then data (readable for OUT/DISCARD/WRITE_ZEROES, writable for IN/GET_ID), then one
 * status byte: the last device-writable byte of the chain.
 */
import { createHash } from "node:crypto";
import { resolve } from "node:path";
import * as sys from "../../../sys/libc";
import { type VirtioActivation, type VirtioDevice, VirtioDeviceType, feature } from "../types";
import { type ChainCursor, DescriptorChain, Virtqueue, VirtqueueError } from "../queue";
import { MAX_SERIAL_LENGTH, SECTOR_SIZE } from "../../../host/disk-image";

/** Device feature bits (section 5.2.3). */
export const VirtioBlkFeature = {
  SIZE_MAX: 1,
  SEG_MAX: 2,
  GEOMETRY: 4,
  RO: 5,
  BLK_SIZE: 6,
  FLUSH: 9,
  TOPOLOGY: 10,
  CONFIG_WCE: 11,
  MQ: 12,
  DISCARD: 13,
  WRITE_ZEROES: 14,
} as const;

/** Request types (section 5.2.6). */
export const VirtioBlkRequest = {
  IN: 0,
  OUT: 1,
  FLUSH: 4,
  GET_ID: 8,
  GET_LIFETIME: 10,
  DISCARD: 11,
  WRITE_ZEROES: 13,
  SECURE_ERASE: 14,
} as const;

export const VirtioBlkStatus = { OK: 0, IOERR: 1, UNSUPP: 2 } as const;

/** virtio_blk_discard_write_zeroes.flags */
export const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1;

export const VIRTIO_BLK_ID_BYTES = 20;
export const BLK_REQUEST_HEADER_BYTES = 16;
export const BLK_SEGMENT_BYTES = 16;

/** Offsets in struct virtio_blk_config (section 5.2.4). */
export const BlkConfig = {
  CAPACITY: 0, // le64, in 512-byte sectors
  SIZE_MAX: 8, // le32
  SEG_MAX: 12, // le32
  GEOMETRY_CYLINDERS: 16, // le16
  GEOMETRY_HEADS: 18, // u8
  GEOMETRY_SECTORS: 19, // u8
  BLK_SIZE: 20, // le32
  TOPOLOGY_PHYSICAL_BLOCK_EXP: 24, // u8
  TOPOLOGY_ALIGNMENT_OFFSET: 25, // u8
  TOPOLOGY_MIN_IO_SIZE: 26, // le16
  TOPOLOGY_OPT_IO_SIZE: 28, // le32
  WRITEBACK: 32, // u8
  NUM_QUEUES: 34, // le16
  MAX_DISCARD_SECTORS: 36, // le32
  MAX_DISCARD_SEG: 40, // le32
  DISCARD_SECTOR_ALIGNMENT: 44, // le32
  MAX_WRITE_ZEROES_SECTORS: 48, // le32
  MAX_WRITE_ZEROES_SEG: 52, // le32
  WRITE_ZEROES_MAY_UNMAP: 56, // u8, then 3 unused bytes
  SIZE: 60,
} as const;

export const BLK_QUEUE_SIZE = 256;
/** Data segments per request: the queue size less the header and status descriptors. */
export const BLK_SEG_MAX = BLK_QUEUE_SIZE - 2;
/** Largest DISCARD / WRITE_ZEROES segment: 4 GiB - 4 KiB worth of sectors. */
export const BLK_MAX_DISCARD_SECTORS = 0x7ffff8;
export const BLK_MAX_DISCARD_SEG = 32;
/** Discard granularity hint: 4 KiB (file systems punch whole blocks). */
export const BLK_DISCARD_SECTOR_ALIGNMENT = 8;

/** The file operations the device uses; replaceable to observe or fail them in tests. */
export interface BlockIo {
  pread(fd: number, buf: Uint8Array, offset: number): number;
  pwrite(fd: number, buf: Uint8Array, offset: number): number;
  /**
   * pread/pwrite with the buffer as a host address, used for guest memory that has one
   * (mmap'd RAM): no view to make per call. Without them (or for test memory) the views.
   */
  preadAt?(fd: number, address: number, length: number, offset: number): number;
  pwriteAt?(fd: number, address: number, length: number, offset: number): number;
  /** preadv/pwritev over `count` iovecs (host addresses) in `iov`: one call per request. */
  preadv?(fd: number, iov: Uint8Array, count: number, offset: number): number;
  pwritev?(fd: number, iov: Uint8Array, count: number, offset: number): number;
  /** Make completed writes durable (fdatasync). */
  flush(fd: number): void;
  /** Deallocate a range, keeping the size; false when the file system cannot. */
  punchHole(fd: number, offset: number, length: number): boolean;
  /** Zero a range keeping it allocated; false when the file system cannot. */
  zeroRange(fd: number, offset: number, length: number): boolean;
}

export const fileIo: BlockIo = {
  pread: (fd, buf, offset) => sys.pread(fd, buf, offset),
  pwrite: (fd, buf, offset) => sys.pwrite(fd, buf, offset),
  preadAt: (fd, address, length, offset) => sys.preadAt(fd, address, length, offset),
  pwriteAt: (fd, address, length, offset) => sys.pwriteAt(fd, address, length, offset),
  preadv: (fd, iov, count, offset) => sys.preadv(fd, iov, count, offset),
  pwritev: (fd, iov, count, offset) => sys.pwritev(fd, iov, count, offset),
  flush: (fd) => sys.fdatasync(fd),
  punchHole: (fd, offset, length) => sys.fallocate(fd, sys.FALLOC_FL_PUNCH_HOLE | sys.FALLOC_FL_KEEP_SIZE, offset, length),
  zeroRange: (fd, offset, length) => sys.fallocate(fd, sys.FALLOC_FL_ZERO_RANGE | sys.FALLOC_FL_KEEP_SIZE, offset, length),
};

/** What the device needs of an open image (DiskImage from disk-image.ts fits). */
export interface BlockImage {
  readonly fd: number;
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  readonly path: string;
}

export interface VirtioBlockOptions {
  /** GET_ID string, up to 20 ASCII bytes; default "tskvm-" + a hash of the image path. */
  serial?: string;
  /** Replace some of the file operations (tests). */
  io?: Partial<BlockIo>;
  /** Where to report what the guest did wrong or what failed on the host (one line each). */
  log?: (line: string) => void;
}

/** Counters, for tests and statistics. */
export interface BlockStats {
  requests: number;
  readBytes: number;
  writtenBytes: number;
  flushes: number;
  errors: number;
  unsupported: number;
}

/** The default serial: stable for a given image path, 20 characters. */
export function defaultSerial(path: string): string {
  const hash = createHash("sha256").update(resolve(path)).digest("hex");
  return `tskvm-${hash.slice(0, MAX_SERIAL_LENGTH - 6)}`;
}

const ZERO_CHUNK = 1024 * 1024;
/** Per-request log lines before the device stops logging them (until a reset). */
const MAX_NOTES = 20;

export class VirtioBlock implements VirtioDevice {
  readonly deviceType = VirtioDeviceType.BLOCK;
  readonly queueCount = 1;
  readonly maxQueueSize = BLK_QUEUE_SIZE;
  readonly deviceFeatures: bigint;
  readonly config: Uint8Array;
  readonly serial: string;
  readonly capacitySectors: number;
  readonly stats: BlockStats = { requests: 0, readBytes: 0, writtenBytes: 0, flushes: 0, errors: 0, unsupported: 0 };

  private readonly io: BlockIo;
  private readonly preadAt: BlockIo["preadAt"];
  private readonly pwriteAt: BlockIo["pwriteAt"];
  private readonly preadv: BlockIo["preadv"];
  private readonly pwritev: BlockIo["pwritev"];
  /** Runs gathered for one vectored call, and the struct iovec array built from them. */
  private readonly runHosts = new Float64Array(sys.IOV_MAX);
  private readonly runLens = new Float64Array(sys.IOV_MAX);
  private readonly iov = new Uint8Array(16 * sys.IOV_MAX);
  private readonly iov32 = new Uint32Array(this.iov.buffer);
  private readonly log: (line: string) => void;
  private readonly idBytes = new Uint8Array(VIRTIO_BLK_ID_BYTES);
  private readonly header = new Uint8Array(BLK_REQUEST_HEADER_BYTES);
  private readonly headerView = new DataView(this.header.buffer);
  private readonly segments = new Uint8Array(BLK_SEGMENT_BYTES * BLK_MAX_DISCARD_SEG);
  private readonly segmentView = new DataView(this.segments.buffer);
  private zeroes: Uint8Array | undefined;

  private ctx: VirtioActivation | undefined;
  private queue: Virtqueue | undefined;
  private chain: DescriptorChain | undefined;
  private discardOk = false;
  private writeZeroesOk = false;
  private broken = false;
  private dirty = false;
  private noted = 0;

  constructor(
    readonly image: BlockImage,
    options: VirtioBlockOptions = {},
  ) {
    if (image.sizeBytes <= 0 || image.sizeBytes % SECTOR_SIZE !== 0) {
      throw new RangeError(`virtio-blk: image size ${image.sizeBytes} is not a positive multiple of ${SECTOR_SIZE}`);
    }
    const custom = options.io ?? {};
    this.io = { ...fileIo, ...custom };
    // A replaced pread/pwrite must see every transfer: drop the address forms it lacks.
    const ownRead = custom.pread !== undefined;
    const ownWrite = custom.pwrite !== undefined;
    this.preadAt = ownRead && custom.preadAt === undefined ? undefined : this.io.preadAt;
    this.pwriteAt = ownWrite && custom.pwriteAt === undefined ? undefined : this.io.pwriteAt;
    this.preadv = (ownRead || custom.preadAt !== undefined) && custom.preadv === undefined ? undefined : this.io.preadv;
    this.pwritev = (ownWrite || custom.pwriteAt !== undefined) && custom.pwritev === undefined ? undefined : this.io.pwritev;
    this.log = options.log ?? (() => {});
    this.serial = options.serial ?? defaultSerial(image.path);
    const id = Buffer.from(this.serial, "latin1");
    if (id.length > VIRTIO_BLK_ID_BYTES) throw new RangeError(`virtio-blk: serial "${this.serial}" is longer than 20 bytes`);
    this.idBytes.set(id); // NUL-padded
    this.capacitySectors = image.sizeBytes / SECTOR_SIZE;

    let f = feature(VirtioBlkFeature.SEG_MAX) | feature(VirtioBlkFeature.BLK_SIZE) | feature(VirtioBlkFeature.FLUSH);
    if (image.readOnly) f |= feature(VirtioBlkFeature.RO);
    else f |= feature(VirtioBlkFeature.DISCARD) | feature(VirtioBlkFeature.WRITE_ZEROES);
    this.deviceFeatures = f;

    const c = new Uint8Array(BlkConfig.SIZE);
    const v = new DataView(c.buffer);
    v.setBigUint64(BlkConfig.CAPACITY, BigInt(this.capacitySectors), true);
    v.setUint32(BlkConfig.SEG_MAX, BLK_SEG_MAX, true);
    v.setUint32(BlkConfig.BLK_SIZE, SECTOR_SIZE, true);
    v.setUint16(BlkConfig.NUM_QUEUES, 1, true);
    if (!image.readOnly) {
      v.setUint32(BlkConfig.MAX_DISCARD_SECTORS, BLK_MAX_DISCARD_SECTORS, true);
      v.setUint32(BlkConfig.MAX_DISCARD_SEG, BLK_MAX_DISCARD_SEG, true);
      v.setUint32(BlkConfig.DISCARD_SECTOR_ALIGNMENT, BLK_DISCARD_SECTOR_ALIGNMENT, true);
      v.setUint32(BlkConfig.MAX_WRITE_ZEROES_SECTORS, BLK_MAX_DISCARD_SECTORS, true);
      v.setUint32(BlkConfig.MAX_WRITE_ZEROES_SEG, BLK_MAX_DISCARD_SEG, true);
      v.setUint8(BlkConfig.WRITE_ZEROES_MAY_UNMAP, 1);
    }
    this.config = c;
  }

  activate(ctx: VirtioActivation): void {
    this.ctx = ctx;
    this.broken = false;
    this.discardOk = (ctx.features & feature(VirtioBlkFeature.DISCARD)) !== 0n && !this.image.readOnly;
    this.writeZeroesOk = (ctx.features & feature(VirtioBlkFeature.WRITE_ZEROES)) !== 0n && !this.image.readOnly;
    const q = ctx.queues[0];
    if (q === undefined || !q.ready) return; // nothing to serve; kicks are ignored
    try {
      this.queue = Virtqueue.create(ctx.memory, q, ctx.features);
      this.chain = new DescriptorChain(ctx.memory);
    } catch (e) {
      this.fail(e);
    }
  }

  queueNotified(index: number): void {
    const q = this.queue;
    const ctx = this.ctx;
    if (index !== 0 || q === undefined || ctx === undefined || this.broken) return;
    const chain = this.chain!;
    try {
      do {
        q.disableNotification();
        while (q.pop(chain) !== undefined) {
          if (!this.serve(q, chain)) break;
        }
        if (q.needsNotification()) ctx.signalUsed(0);
      } while (!this.broken && q.enableNotification());
    } catch (e) {
      // Completed requests still get their interrupt; the device then waits for a reset.
      if (q.needsNotification()) ctx.signalUsed(0);
      this.fail(e);
    }
  }

  reset(): void {
    this.flush();
    this.queue = undefined;
    this.chain = undefined;
    this.ctx = undefined;
    this.broken = false;
    this.noted = 0;
  }

  /** Make every completed write durable (fdatasync), if there were writes since the last. */
  flush(): void {
    if (!this.dirty) return;
    try {
      this.io.flush(this.image.fd);
      this.dirty = false;
      this.stats.flushes++;
    } catch (e) {
      this.log(`virtio-blk ${this.image.path}: flush failed: ${(e as Error).message}`);
    }
  }

  /** Log a per-request problem; a guest (or a failing disk) cannot flood the log. */
  private note(line: string): void {
    if (this.noted < MAX_NOTES) this.log(line);
    else if (this.noted === MAX_NOTES) this.log(`virtio-blk ${this.image.path}: further request errors are not logged`);
    this.noted++;
  }

  private fail(e: unknown): void {
    this.broken = true;
    const reason = e instanceof VirtqueueError ? `virtio-blk: ${e.message}` : `virtio-blk: ${(e as Error)?.message ?? String(e)}`;
    this.log(reason);
    this.ctx?.needsReset(reason);
  }

  /** Serve one request; false when the chain cannot even be answered (device broken). */
  private serve(q: Virtqueue, chain: DescriptorChain): boolean {
    this.stats.requests++;
    if (chain.writableBytes === 0) {
      this.fail(new Error(`request (head ${chain.head}) has no device-writable status byte`));
      return false;
    }
    const writer = chain.writer;
    writer.limitTo(chain.writableBytes - 1);
    let status: number;
    const r = chain.reader;
    if (r.nextRun(BLK_REQUEST_HEADER_BYTES) === BLK_REQUEST_HEADER_BYTES) {
      // The usual case: the header in one descriptor, read in place.
      status = this.execute(chain, r.runU32(0), r.runU32(12) * 0x100000000 + r.runU32(8));
    } else {
      r.reset();
      if (r.readInto(this.header) < BLK_REQUEST_HEADER_BYTES) {
        this.note(`virtio-blk ${this.image.path}: request (head ${chain.head}) header is shorter than 16 bytes`);
        status = VirtioBlkStatus.IOERR;
      } else {
        const h = this.headerView;
        status = this.execute(chain, h.getUint32(0, true), h.getUint32(12, true) * 0x100000000 + h.getUint32(8, true));
      }
    }
    if (status === VirtioBlkStatus.IOERR) this.stats.errors++;
    else if (status === VirtioBlkStatus.UNSUPP) this.stats.unsupported++;
    chain.setLastWritableByte(status);
    // Used length: what was written into the chain. Only a success fills the data part
    // (a failed read may have stopped anywhere), so a failure counts the status byte.
    q.addUsed(chain.head, status === VirtioBlkStatus.OK ? writer.consumed + 1 : 1);
    return true;
  }

  /** `sector` beyond 2^53 is inexact, but beyond any capacity either way. */
  private execute(chain: DescriptorChain, type: number, sector: number): number {
    switch (type) {
      case VirtioBlkRequest.IN:
        return this.read(chain, sector);
      case VirtioBlkRequest.OUT:
        return this.write(chain, sector);
      case VirtioBlkRequest.FLUSH:
        return this.flushRequest();
      case VirtioBlkRequest.GET_ID:
        chain.writer.write(this.idBytes);
        return VirtioBlkStatus.OK;
      case VirtioBlkRequest.DISCARD:
        // A read-only disk refuses anything that would change it with IOERR, like OUT.
        if (this.image.readOnly) return VirtioBlkStatus.IOERR;
        return this.discardOk ? this.discardOrZero(chain, false) : VirtioBlkStatus.UNSUPP;
      case VirtioBlkRequest.WRITE_ZEROES:
        if (this.image.readOnly) return VirtioBlkStatus.IOERR;
        return this.writeZeroesOk ? this.discardOrZero(chain, true) : VirtioBlkStatus.UNSUPP;
      default:
        return VirtioBlkStatus.UNSUPP;
    }
  }

  /** Whether [sector, sector + bytes/512) is inside the disk. */
  private inRange(sector: number, bytes: number): boolean {
    return sector <= this.capacitySectors && bytes / SECTOR_SIZE <= this.capacitySectors - sector;
  }

  private read(chain: DescriptorChain, sector: number): number {
    const w = chain.writer;
    const length = w.remaining;
    if (length % SECTOR_SIZE !== 0 || !this.inRange(sector, length)) return VirtioBlkStatus.IOERR;
    try {
      this.stream(w, sector * SECTOR_SIZE, false);
    } catch (e) {
      this.note(`virtio-blk ${this.image.path}: read at sector ${sector} failed: ${(e as Error).message}`);
      return VirtioBlkStatus.IOERR;
    }
    this.stats.readBytes += length;
    return VirtioBlkStatus.OK;
  }

  private write(chain: DescriptorChain, sector: number): number {
    const r = chain.reader;
    const length = r.remaining;
    if (this.image.readOnly || length % SECTOR_SIZE !== 0 || !this.inRange(sector, length)) return VirtioBlkStatus.IOERR;
    this.dirty = true;
    try {
      this.stream(r, sector * SECTOR_SIZE, true);
    } catch (e) {
      this.note(`virtio-blk ${this.image.path}: write at sector ${sector} failed: ${(e as Error).message}`);
      return VirtioBlkStatus.IOERR;
    }
    this.stats.writtenBytes += length;
    return VirtioBlkStatus.OK;
  }

  /**
   * Move the rest of a chain's data stream from or to the file at `offset`, straight
   * from guest memory: runs with a host address are gathered into one preadv/pwritev
   * (one pread/pwrite for a single run), others go one by one through views.
   */
  private stream(c: ChainCursor, offset: number, toFile: boolean): void {
    let n = c.nextRun();
    if (n === 0) return;
    const at = toFile ? this.pwriteAt : this.preadAt;
    if (c.remaining === 0 && at !== undefined && !Number.isNaN(c.runHost)) {
      // The usual case, one data descriptor: one call by address.
      const fd = this.image.fd;
      const host = c.runHost;
      for (let done = 0; done < n; ) {
        const k = at(fd, host + done, n - done, offset + done);
        if (k <= 0) throw new Error(`${toFile ? "nothing written" : "end of file"} at byte ${offset + done}`);
        done += k;
      }
      return;
    }
    const vec = toFile ? this.pwritev : this.preadv;
    let count = 0;
    let start = offset;
    for (; n > 0; n = c.nextRun()) {
      const host = c.runHost;
      if (vec !== undefined && !Number.isNaN(host)) {
        if (count === sys.IOV_MAX) {
          this.vectored(count, start, toFile);
          count = 0;
        }
        if (count === 0) start = offset;
        this.runHosts[count] = host;
        this.runLens[count] = n;
        count++;
      } else {
        if (count > 0) this.vectored(count, start, toFile);
        count = 0;
        this.transfer(c, n, offset, toFile);
      }
      offset += n;
    }
    if (count > 0) this.vectored(count, start, toFile);
  }

  /** Transfer the `count` gathered runs at file offset `offset`, continuing short transfers. */
  private vectored(count: number, offset: number, toFile: boolean): void {
    const fd = this.image.fd;
    const hosts = this.runHosts;
    const lens = this.runLens;
    const at = toFile ? this.pwriteAt : this.preadAt;
    if (count === 1 && at !== undefined) {
      for (let done = 0; done < lens[0]!; ) {
        const k = at(fd, hosts[0]! + done, lens[0]! - done, offset + done);
        if (k <= 0) throw new Error(`${toFile ? "nothing written" : "end of file"} at byte ${offset + done}`);
        done += k;
      }
      return;
    }
    const vec = (toFile ? this.pwritev : this.preadv)!;
    const iov = this.iov32;
    let j = 0; // first run not yet done
    let skip = 0; // bytes of run j already done
    while (j < count) {
      let k = 0;
      for (let i = j; i < count; i++, k++) {
        const base = hosts[i]! + (i === j ? skip : 0);
        const len = lens[i]! - (i === j ? skip : 0);
        iov[4 * k] = base % 0x100000000;
        iov[4 * k + 1] = Math.floor(base / 0x100000000);
        iov[4 * k + 2] = len; // a descriptor's length fits 32 bits
        iov[4 * k + 3] = 0;
      }
      const done = vec(fd, this.iov, k, offset);
      if (done <= 0) throw new Error(`${toFile ? "nothing written" : "end of file"} at byte ${offset}`);
      offset += done;
      let d = done + skip;
      while (j < count && d >= lens[j]!) {
        d -= lens[j]!;
        j++;
      }
      skip = d;
    }
  }

  /**
   * Move the cursor's last run (n bytes of guest memory) from or to the file at `offset`,
   * straight from guest memory. Short transfers are continued; none at all is an error.
   */
  private transfer(c: ChainCursor, n: number, offset: number, toFile: boolean): void {
    const fd = this.image.fd;
    const host = c.runHost;
    const at = toFile ? this.pwriteAt : this.preadAt;
    let done = 0;
    if (at !== undefined && !Number.isNaN(host)) {
      while (done < n) {
        const k = at(fd, host + done, n - done, offset + done);
        if (k <= 0) throw new Error(`${toFile ? "nothing written" : "end of file"} at byte ${offset + done}`);
        done += k;
      }
      return;
    }
    const b = c.runBytes;
    const start = b.byteOffset + c.runOffset;
    const fn = toFile ? this.io.pwrite : this.io.pread;
    while (done < n) {
      const k = fn(fd, new Uint8Array(b.buffer, start + done, n - done), offset + done);
      if (k <= 0) throw new Error(`${toFile ? "nothing written" : "end of file"} at byte ${offset + done}`);
      done += k;
    }
  }

  private flushRequest(): number {
    try {
      this.io.flush(this.image.fd);
    } catch (e) {
      this.note(`virtio-blk ${this.image.path}: flush failed: ${(e as Error).message}`);
      return VirtioBlkStatus.IOERR;
    }
    this.dirty = false;
    this.stats.flushes++;
    return VirtioBlkStatus.OK;
  }

  /**
   * DISCARD and WRITE_ZEROES: a list of {le64 sector, le32 num_sectors, le32 flags}. All
   * segments are checked before any is acted on, so a bad one changes nothing.
   */
  private discardOrZero(chain: DescriptorChain, zeroes: boolean): number {
    const r = chain.reader;
    const bytes = r.remaining;
    if (bytes === 0 || bytes % BLK_SEGMENT_BYTES !== 0 || bytes / BLK_SEGMENT_BYTES > BLK_MAX_DISCARD_SEG) {
      return VirtioBlkStatus.IOERR;
    }
    const count = bytes / BLK_SEGMENT_BYTES;
    r.readInto(this.segments.subarray(0, bytes));
    const v = this.segmentView;
    for (let i = 0; i < count; i++) {
      const o = i * BLK_SEGMENT_BYTES;
      const sector = v.getUint32(o + 4, true) * 0x100000000 + v.getUint32(o, true);
      const sectors = v.getUint32(o + 8, true);
      const flags = v.getUint32(o + 12, true);
      // Unknown flags, or UNMAP on a discard: UNSUPP (section 5.2.6.2).
      const allowed = zeroes ? VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP : 0;
      if ((flags & ~allowed) !== 0) return VirtioBlkStatus.UNSUPP;
      if (sectors > BLK_MAX_DISCARD_SECTORS || !this.inRange(sector, sectors * SECTOR_SIZE)) return VirtioBlkStatus.IOERR;
    }
    this.dirty = true;
    try {
      for (let i = 0; i < count; i++) {
        const o = i * BLK_SEGMENT_BYTES;
        const offset = (v.getUint32(o + 4, true) * 0x100000000 + v.getUint32(o, true)) * SECTOR_SIZE;
        const length = v.getUint32(o + 8, true) * SECTOR_SIZE;
        if (length === 0) continue;
        const unmap = !zeroes || (v.getUint32(o + 12, true) & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) !== 0;
        // A punched hole reads as zeroes, so it serves both; otherwise zero in place.
        if (unmap && this.io.punchHole(this.image.fd, offset, length)) continue;
        if (zeroes && this.io.zeroRange(this.image.fd, offset, length)) continue;
        this.writeZeroes(offset, length);
      }
    } catch (e) {
      this.note(`virtio-blk ${this.image.path}: ${zeroes ? "write zeroes" : "discard"} failed: ${(e as Error).message}`);
      return VirtioBlkStatus.IOERR;
    }
    return VirtioBlkStatus.OK;
  }

  private writeZeroes(offset: number, length: number): void {
    const z = (this.zeroes ??= new Uint8Array(ZERO_CHUNK));
    for (let done = 0; done < length; ) {
      const n = Math.min(length - done, z.length);
      const k = this.io.pwrite(this.image.fd, n === z.length ? z : z.subarray(0, n), offset + done);
      if (k <= 0) throw new Error(`short write at byte ${offset + done}`);
      done += k;
    }
  }
}
