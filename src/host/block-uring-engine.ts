/**
 * The io_uring engine of virtio-blk: serves the device's request batch (BlockBackend) with
 * one io_uring_enter for the whole queue drain, where the file engine makes one system
 * call per request. Reads and writes go straight between the image file and guest memory
 * by host address (one READ/WRITE for a request whose data is one buffer, one READV/WRITEV
 * for a scattered one); a FLUSH is an fdatasync marked IOSQE_IO_DRAIN, so it starts only
 * after everything submitted before it has completed, and nothing after it starts before
 * it is done: the order the file engine's one-by-one loop gives. DISCARD and WRITE_ZEROES
 * are one fallocate per range.
 *
 * The file engine still does what io_uring does not take, from where the request stands:
 * guest memory without host addresses (test memory), a transfer the kernel completed in
 * part (continued where it stopped, or failing with the file engine's message), a request
 * of more buffers than one readv takes, and a range operation the file system refuses
 * (EOPNOTSUPP: the file engine punches, zeroes or writes zeroes as it can). Failures are
 * per request, as with the file engine: a failing request gets its `error` line and the
 * others carry on.
 *
 * A drain of one request goes to the file engine: one system call either way, and the
 * plain one is the cheaper. The ring is made on first use, in the thread that uses it
 * (the I/O worker), unless one is given.
 */
import * as sys from "../sys/libc";
import { IORING_FSYNC_DATASYNC, IOSQE_IO_DRAIN, IoUring, IoUringOp } from "../sys/io-uring";
import { ShortTransferError, transferAt, transferVector } from "../sys/full-io";
import { IOVEC_BYTES } from "../memory/iovec";
import { BlockOp, type BlockBackend, type BlockRequest } from "../devices/virtio/blk/backend";
import { FileBlockEngine, type ImageFile } from "./block-file-engine";

/** Submission entries: a whole queue of 256 one-buffer requests fits in one enter. */
export const BLOCK_RING_ENTRIES = 256;
/** Most iovecs one readv/writev takes (Linux UIO_MAXIOV). */
const MAX_IOV = sys.IOV_MAX;
/** struct iovec entries shared by one batch's vectored requests (64 KiB). */
const IOV_POOL = 4 * MAX_IOV;

const EOPNOTSUPP = 95;
const ENOSYS = 38;
const TWO_32 = 4294967296;

export interface UringBlockEngineOptions {
  /** A ring to use instead of making one (tests). */
  ring?: IoUring;
  /** The engine for what io_uring does not take (default: a FileBlockEngine on the image). */
  fallback?: FileBlockEngine;
  /** Smaller batches go to the file engine (default 2: a lone request is one pread either way). */
  minBatch?: number;
}

export class UringBlockEngine implements BlockBackend {
  readonly name: string;
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  /** Requests (or their rest) the file engine served, for tests and statistics. */
  fallbacks = 0;
  /** io_uring_enter calls made, for tests and statistics. */
  enters = 0;
  private readonly fd: number;
  private ring: IoUring | undefined;
  private readonly fallback: FileBlockEngine;
  private readonly iov = new Uint32Array((IOV_POOL * IOVEC_BYTES) / 4);
  private readonly iovBytes = new Uint8Array(this.iov.buffer);
  private iovAddress = 0;
  private iovUsed = 0;
  /** Per request of the batch: what was asked of the kernel, to check its completion. */
  private expected = new Float64Array(BLOCK_RING_ENTRIES);
  private iovStart = new Int32Array(BLOCK_RING_ENTRIES);
  private iovCount = new Int32Array(BLOCK_RING_ENTRIES);
  private runHost = new Float64Array(BLOCK_RING_ENTRIES);
  /** Range requests the file system refused (EOPNOTSUPP), for the file engine. */
  private retries: number[] = [];
  private inFlight = 0;
  private readonly one: BlockRequest[] = [];
  private readonly minBatch: number;

  constructor(image: ImageFile, options: UringBlockEngineOptions = {}) {
    this.name = image.path;
    this.sizeBytes = image.sizeBytes;
    this.readOnly = image.readOnly;
    this.fd = image.fd;
    this.ring = options.ring;
    this.fallback = options.fallback ?? new FileBlockEngine(image);
    this.minBatch = options.minBatch ?? 2;
  }

  execute(requests: readonly BlockRequest[], count: number): void {
    // One request costs one system call either way: the plain one is cheaper than a ring
    // round trip (preparing, entering, reaping).
    if (count < this.minBatch) {
      this.fallback.execute(requests, count);
      return;
    }
    if (count > this.expected.length) this.grow(count);
    const ring = (this.ring ??= IoUring.create(BLOCK_RING_ENTRIES));
    if (this.iovAddress === 0) this.iovAddress = sys.addressOf(this.iov.buffer);
    this.iovUsed = 0;
    for (let i = 0; i < count; i++) {
      const r = requests[i]!;
      r.error = undefined;
      switch (r.op) {
        case BlockOp.READ:
        case BlockOp.WRITE:
          this.prepTransfer(ring, requests, i, r);
          break;
        case BlockOp.FLUSH:
          this.room(ring, requests);
          ring.prep(IoUringOp.FSYNC, this.fd, 0, 0, 0, IORING_FSYNC_DATASYNC, i, IOSQE_IO_DRAIN);
          this.inFlight++;
          break;
        default:
          this.prepRanges(ring, requests, i, r);
      }
    }
    this.complete(ring, requests);
  }

  flush(): void {
    this.fallback.flush();
  }

  /** Close the ring (the image stays open: its owner closes it). */
  close(): void {
    this.ring?.close();
    this.ring = undefined;
  }

  /** Prepare request i's read or write (its cursor walked to the end, as the file engine would). */
  private prepTransfer(ring: IoUring, requests: readonly BlockRequest[], i: number, r: BlockRequest): void {
    const c = r.data!;
    const write = r.op === BlockOp.WRITE;
    if (!c.hostAddressed) {
      this.onFallback(r, () => this.fallback.stream(c, r.offset, write));
      return;
    }
    let n = c.nextRun();
    if (n === 0) return;
    if (c.remaining === 0) {
      this.room(ring, requests);
      ring.prep(write ? IoUringOp.WRITE : IoUringOp.READ, this.fd, c.runHost, n, r.offset, 0, i);
      this.expected[i] = n;
      this.runHost[i] = c.runHost;
      this.iovCount[i] = 0;
      this.inFlight++;
      return;
    }
    // Scattered: the runs as iovecs in the pool, with room for one whole readv's worth.
    if (IOV_POOL - this.iovUsed < MAX_IOV) this.complete(ring, requests);
    const start = this.iovUsed;
    let total = 0;
    for (;;) {
      const w = 4 * this.iovUsed++;
      const host = c.runHost;
      this.iov[w] = host >>> 0;
      this.iov[w + 1] = (host / TWO_32) >>> 0;
      this.iov[w + 2] = n;
      this.iov[w + 3] = 0;
      total += n;
      if (c.remaining === 0) break;
      if (this.iovUsed - start === MAX_IOV) {
        // More buffers than one readv takes (only a guest that ignores SEG_MAX): these
        // now, synchronously, and the file engine goes on from where the cursor is.
        this.onFallback(r, () => {
          const iov = this.iovBytes.subarray(IOVEC_BYTES * start, IOVEC_BYTES * this.iovUsed);
          transferVector(write ? sys.pwritev : sys.preadv, write, this.fd, iov, MAX_IOV, r.offset, total);
          this.fallback.stream(c, r.offset + total, write);
        });
        this.iovUsed = start;
        return;
      }
      n = c.nextRun();
    }
    this.room(ring, requests);
    const count = this.iovUsed - start;
    ring.prep(write ? IoUringOp.WRITEV : IoUringOp.READV, this.fd, this.iovAddress + IOVEC_BYTES * start, count, r.offset, 0, i);
    this.expected[i] = total;
    this.iovStart[i] = start;
    this.iovCount[i] = count;
    this.inFlight++;
  }

  /** DISCARD / WRITE_ZEROES: one fallocate per range (the device checked them all). */
  private prepRanges(ring: IoUring, requests: readonly BlockRequest[], i: number, r: BlockRequest): void {
    const zeroes = r.op === BlockOp.WRITE_ZEROES;
    for (let k = 0; k < r.rangeCount; k++) {
      const length = r.rangeLengths[k]!;
      if (length === 0) continue;
      // A punched hole reads as zeroes, so it serves both; otherwise zero in place.
      const mode = r.rangeUnmap[k] !== 0 || !zeroes ? sys.FALLOC_FL_PUNCH_HOLE : sys.FALLOC_FL_ZERO_RANGE;
      this.room(ring, requests);
      ring.prepFallocate(this.fd, mode | sys.FALLOC_FL_KEEP_SIZE, r.rangeOffsets[k]!, length, i);
      this.inFlight++;
    }
  }

  /** A request (or its rest) done synchronously here; its failure is its own. */
  private onFallback(r: BlockRequest, run: () => void): void {
    this.fallbacks++;
    try {
      run();
    } catch (e) {
      r.error = (e as Error).message;
    }
  }

  /** Make sure one more submission entry fits: submit and complete what is prepared if not. */
  private room(ring: IoUring, requests: readonly BlockRequest[]): void {
    if (ring.sqSpace === 0) this.complete(ring, requests);
  }

  /** Submit everything prepared, wait for all of it, and settle each request. */
  private complete(ring: IoUring, requests: readonly BlockRequest[]): void {
    if (this.inFlight === 0) return;
    this.enters++;
    ring.submitAndWait(this.inFlight);
    const ready = ring.completionCount();
    for (let k = 0; k < ready; k++) this.settle(requests, ring.completionTag(k), ring.completionResult(k));
    ring.consumeCompletions(ready);
    this.inFlight -= ready;
    this.iovUsed = 0;
    // Range operations the file system refused: the file engine knows the ways round.
    for (const i of this.retries) {
      const r = requests[i]!;
      r.error = undefined;
      this.fallbacks++;
      this.one[0] = r;
      this.fallback.execute(this.one, 1);
    }
    this.retries.length = 0;
  }

  private settle(requests: readonly BlockRequest[], i: number, res: number): void {
    const r = requests[i]!;
    switch (r.op) {
      case BlockOp.FLUSH:
        if (res < 0) r.error = new sys.SysError("fdatasync", -res).message;
        return;
      case BlockOp.DISCARD:
      case BlockOp.WRITE_ZEROES:
        if (res === -EOPNOTSUPP || res === -ENOSYS) {
          if (!this.retries.includes(i)) this.retries.push(i);
        } else if (res < 0) {
          r.error ??= new sys.SysError("fallocate", -res).message;
        }
        return;
    }
    const write = r.op === BlockOp.WRITE;
    const single = this.iovCount[i] === 0;
    if (res < 0) {
      r.error = new sys.SysError(single ? (write ? "pwrite" : "pread") : write ? "pwritev" : "preadv", -res).message;
      return;
    }
    const want = this.expected[i]!;
    if (res === want) return;
    // Part done: continue from where the kernel stopped, as the file engine would.
    this.onFallback(r, () => {
      if (res === 0) throw new ShortTransferError(write, r.offset);
      if (single) {
        transferAt(write ? sys.pwriteAt : sys.preadAt, write, this.fd, this.runHost[i]! + res, want - res, r.offset + res);
        return;
      }
      const start = this.iovStart[i]!;
      const count = this.iovCount[i]!;
      const iov = this.iovBytes.subarray(IOVEC_BYTES * start, IOVEC_BYTES * (start + count));
      transferVector(write ? sys.pwritev : sys.preadv, write, this.fd, iov, count, r.offset, want, res);
    });
  }

  private grow(count: number): void {
    const n = Math.max(count, 2 * this.expected.length);
    this.expected = new Float64Array(n);
    this.iovStart = new Int32Array(n);
    this.iovCount = new Int32Array(n);
    this.runHost = new Float64Array(n);
  }
}
