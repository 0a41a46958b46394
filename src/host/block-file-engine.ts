/**
 * The file engine of virtio-blk: serves the device's request batches (BlockBackend) on a
 * raw image file with pread/pwrite, straight between the file and guest memory. Guest
 * memory with host addresses (mmap'd RAM) moves by address: one pread/pwrite for a
 * request whose data is one buffer, one preadv/pwritev for a scattered one. Test memory
 * (plain buffers) moves through views of it.
 */
import * as sys from "../sys/libc";
import { transferAt, transferBuffer, transferVector } from "../sys/full-io";
import { IovecArray } from "../memory/iovec";
import type { ChainCursor } from "../devices/virtio/queue";
import { BlockOp, type BlockBackend, type BlockRequest } from "../devices/virtio/blk/backend";

/** The file operations the engine uses; replaceable to observe or fail them in tests. */
export interface FileOps {
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

export const systemFileOps: FileOps = {
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

/** What the engine needs of an open image (DiskImage from disk-image.ts fits). */
export interface ImageFile {
  readonly fd: number;
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  readonly path: string;
}

const ZERO_CHUNK = 1024 * 1024;

export class FileBlockEngine implements BlockBackend {
  readonly name: string;
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  private readonly fd: number;
  private readonly ops: FileOps;
  private readonly preadAt: FileOps["preadAt"];
  private readonly pwriteAt: FileOps["pwriteAt"];
  private readonly preadv: FileOps["preadv"];
  private readonly pwritev: FileOps["pwritev"];
  /** The runs of one request gathered for one vectored call. */
  private readonly iov = new IovecArray(sys.IOV_MAX);
  /** Host address of the first run in iov (a single run goes by address). */
  private firstHost = 0;
  private zeroes: Uint8Array | undefined;

  constructor(image: ImageFile, options: { ops?: Partial<FileOps> } = {}) {
    this.name = image.path;
    this.sizeBytes = image.sizeBytes;
    this.readOnly = image.readOnly;
    this.fd = image.fd;
    const custom = options.ops ?? {};
    this.ops = { ...systemFileOps, ...custom };
    // A replaced pread/pwrite must see every transfer: drop the address forms it lacks.
    const ownRead = custom.pread !== undefined;
    const ownWrite = custom.pwrite !== undefined;
    this.preadAt = ownRead && custom.preadAt === undefined ? undefined : this.ops.preadAt;
    this.pwriteAt = ownWrite && custom.pwriteAt === undefined ? undefined : this.ops.pwriteAt;
    this.preadv = (ownRead || custom.preadAt !== undefined) && custom.preadv === undefined ? undefined : this.ops.preadv;
    this.pwritev = (ownWrite || custom.pwriteAt !== undefined) && custom.pwritev === undefined ? undefined : this.ops.pwritev;
  }

  execute(requests: readonly BlockRequest[], count: number): void {
    for (let i = 0; i < count; i++) {
      const r = requests[i]!;
      r.error = undefined;
      try {
        switch (r.op) {
          case BlockOp.READ:
            this.stream(r.data!, r.offset, false);
            break;
          case BlockOp.WRITE:
            this.stream(r.data!, r.offset, true);
            break;
          case BlockOp.FLUSH:
            this.ops.flush(this.fd);
            break;
          default:
            this.ranges(r);
        }
      } catch (e) {
        r.error = (e as Error).message;
      }
    }
  }

  flush(): void {
    this.ops.flush(this.fd);
  }

  /**
   * Move the rest of a chain's data stream from or to the file at `offset`, straight
   * from guest memory: runs with a host address are gathered into one preadv/pwritev
   * (one pread/pwrite for a single run), others go one by one through views. Also how
   * another engine finishes a request it started (from where the cursor stands).
   */
  stream(c: ChainCursor, offset: number, toFile: boolean): void {
    let n = c.nextRun();
    if (n === 0) return;
    const at = toFile ? this.pwriteAt : this.preadAt;
    if (c.remaining === 0 && at !== undefined && !Number.isNaN(c.runHost)) {
      // The usual case, one data descriptor: one call by address.
      transferAt(at, toFile, this.fd, c.runHost, n, offset);
      return;
    }
    const vec = toFile ? this.pwritev : this.preadv;
    const iov = this.iov;
    iov.clear();
    let start = offset;
    for (; n > 0; n = c.nextRun()) {
      const host = c.runHost;
      if (vec !== undefined && !Number.isNaN(host)) {
        if (iov.full) {
          this.vectored(start, toFile);
          iov.clear();
        }
        if (iov.count === 0) {
          start = offset;
          this.firstHost = host;
        }
        iov.push(host, n);
      } else {
        if (iov.count > 0) this.vectored(start, toFile);
        iov.clear();
        this.throughView(c, n, offset, toFile);
      }
      offset += n;
    }
    if (iov.count > 0) this.vectored(start, toFile);
  }

  /** Transfer the gathered runs at file offset `offset`: by address when there is one run. */
  private vectored(offset: number, toFile: boolean): void {
    const iov = this.iov;
    const at = toFile ? this.pwriteAt : this.preadAt;
    if (iov.count === 1 && at !== undefined) {
      transferAt(at, toFile, this.fd, this.firstHost, iov.totalBytes, offset);
      return;
    }
    transferVector((toFile ? this.pwritev : this.preadv)!, toFile, this.fd, iov.bytes, iov.count, offset, iov.totalBytes);
  }

  /** Move the cursor's last run (n bytes of guest memory) through a view of it. */
  private throughView(c: ChainCursor, n: number, offset: number, toFile: boolean): void {
    const b = c.runBytes;
    const view = new Uint8Array(b.buffer, b.byteOffset + c.runOffset, n);
    transferBuffer(toFile ? this.ops.pwrite : this.ops.pread, toFile, this.fd, view, offset);
  }

  /** DISCARD and WRITE_ZEROES, range by range (the device checked them all first). */
  private ranges(r: BlockRequest): void {
    const zeroes = r.op === BlockOp.WRITE_ZEROES;
    for (let i = 0; i < r.rangeCount; i++) {
      const offset = r.rangeOffsets[i]!;
      const length = r.rangeLengths[i]!;
      if (length === 0) continue;
      // A punched hole reads as zeroes, so it serves both; otherwise zero in place.
      if (r.rangeUnmap[i] !== 0 && this.ops.punchHole(this.fd, offset, length)) continue;
      if (zeroes && this.ops.zeroRange(this.fd, offset, length)) continue;
      this.writeZeroes(offset, length);
    }
  }

  private writeZeroes(offset: number, length: number): void {
    const z = (this.zeroes ??= new Uint8Array(ZERO_CHUNK));
    for (let done = 0; done < length; done += z.length) {
      const n = Math.min(length - done, z.length);
      transferBuffer(this.ops.pwrite, true, this.fd, n === z.length ? z : z.subarray(0, n), offset + done);
    }
  }
}
