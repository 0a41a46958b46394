/**
 * The VMM's end of QEMU's `-netdev stream` protocol, which passt speaks: Ethernet frames
 * on a UNIX stream socket, each after its length as a 32-bit big-endian number, and
 * nothing else (no virtio-net header, so no checksum or segmentation offloads).
 *
 * RX reads whatever the socket holds into one buffer (one system call for many frames)
 * and hands out whole frames as views into it; a frame cut by a read waits there for its
 * end. Reading stops while the caller leaves a frame unconsumed (the guest has no
 * buffers): passt then finds the socket full and holds back.
 *
 * TX writes each frame whole, with its length, in one writev(2), and only when the socket
 * has room for all of it. passt 2023.03 (Debian 12) cannot read a frame that arrives in
 * pieces: it waits once for the rest, and if that read returns short its parser loses the
 * frame boundaries for good. So a frame that would not fit is not started: sendFrame()
 * returns false, the caller keeps the frame (nothing is dropped) and tries again when the
 * socket polls writable. Room: the kernel accepts a write while the queue's memory
 * (SIOCOUTQ) is below SO_SNDBUF, and a frame costs at most its bytes plus a page and a
 * skb header per 32 KiB. Should the kernel cut a write short all the same, the rest of the
 * frame is written at once, waiting for the socket (passt is reading: it is blocked on
 * exactly that rest); a peer that stops reading in the middle of a frame for
 * `shortWriteTimeoutMs` takes the stream down.
 *
 * The socket fd is non-blocking and is not closed here: its owner (the passt handle on
 * the main thread) closes it. Once the peer closes or the protocol breaks, the stream is
 * down for good (`down` says why) and moves nothing more.
 */
import * as sys from "../sys/libc";

/** Bytes of the length before each frame. */
export const STREAM_LENGTH_BYTES = 4;

/**
 * Largest frame either way: passt's ETH_MAX_MTU (65535), the largest it reads and the
 * bound on what it writes (its MTU 65520 plus the Ethernet header).
 */
export const STREAM_MAX_FRAME = 65535;

/** Most buffers one frame is written from (plus one for the length). */
export const STREAM_MAX_IOV = 64;

/** Default read buffer: several largest frames, so one read drains what passt queued. */
const DEFAULT_READ_BUFFER = 512 * 1024;

/** Asked for as SO_SNDBUF (the kernel caps it at net.core.wmem_max, doubled). */
const DEFAULT_SEND_BUFFER = 1024 * 1024;

export interface NetStreamOptions {
  /** Largest frame accepted either way (default STREAM_MAX_FRAME). */
  maxFrame?: number;
  /** Bytes of the read buffer (at least twice the largest frame; default 512 KiB). */
  readBufferBytes?: number;
  /** SO_SNDBUF to ask for; 0 leaves the socket's own (default 1 MiB, capped by the kernel). */
  sendBufferBytes?: number;
  /** How long the rest of a frame cut short may wait for the peer to read (default 2 s). */
  shortWriteTimeoutMs?: number;
}

export interface NetStreamStats {
  /** Frames handed out by peekFrame and consumed. */
  rxFrames: number;
  /** read(2) calls that returned data. */
  rxReads: number;
  /** read(2) calls that found the socket empty (EAGAIN). */
  rxEmptyReads: number;
  /** Frames written (whole). */
  txFrames: number;
  /** sendFrame calls refused for want of room (the caller kept the frame). */
  txBlocked: number;
  /** Writes the kernel cut short despite the accounting (the rest written at once). */
  txShort: number;
  /** SIOCOUTQ queries made to refresh the room estimate. */
  txRoomQueries: number;
}

/** Memory a frame of `len` bytes takes in a UNIX stream socket's send queue, at most. */
function queueCost(len: number): number {
  const bytes = STREAM_LENGTH_BYTES + len;
  // Data in pages (frags) plus a skb header each 32 KiB (768 bytes measured; 1 KiB kept).
  return ((bytes + 4095) & ~4095) + 1024 * (1 + (bytes >>> 15));
}

export class NetStream {
  readonly stats: NetStreamStats = { rxFrames: 0, rxReads: 0, rxEmptyReads: 0, txFrames: 0, txBlocked: 0, txShort: 0, txRoomQueries: 0 };
  readonly maxFrame: number;
  /** SO_SNDBUF in effect. */
  readonly sendBuffer: number;

  private downReason: string | undefined;

  // ---- RX: [rStart, rEnd) of rbuf is received and not consumed ----
  private readonly rbuf: Uint8Array;
  private rStart = 0;
  private rEnd = 0;
  /**
   * The owner polls the socket and says when it polled readable (socketReadable()): a read
   * that came back short, or with EAGAIN, then means the socket is empty until the next
   * such report, so fill() does not make a read(2) it knows would find nothing. A 1-byte
   * request/response pays that read once per frame otherwise.
   */
  private polled = false;
  private empty = false;

  // ---- TX ----
  /** The length word, and the iovec array (entry 0 points at it). Own ArrayBuffers: fixed addresses. */
  private readonly lengthWord = new Uint8Array(new ArrayBuffer(64));
  private readonly lengthView = new DataView(this.lengthWord.buffer);
  private readonly iov = new Uint8Array(16 * (STREAM_MAX_IOV + 1));
  private readonly iovView = new DataView(this.iov.buffer);
  private readonly lengthAddress: number;
  /** Upper bound of the send queue's memory: SIOCOUTQ when last asked plus what was written since. */
  private queued = 0;
  private wantWrite = false;
  private readonly shortWriteTimeoutMs: number;
  /** The buffer sendFrame() last sent from, and its address (one FFI call per new buffer). */
  private lastBuffer: ArrayBufferLike | undefined;
  private lastAddress = 0;

  constructor(
    readonly fd: number,
    options: NetStreamOptions = {},
  ) {
    this.maxFrame = options.maxFrame ?? STREAM_MAX_FRAME;
    if (!Number.isInteger(this.maxFrame) || this.maxFrame < 14 || this.maxFrame > 0x7fffffff) {
      throw new RangeError(`net stream: largest frame ${this.maxFrame} is not an integer from 14 up`);
    }
    const rbytes = options.readBufferBytes ?? Math.max(DEFAULT_READ_BUFFER, 4 * (this.maxFrame + STREAM_LENGTH_BYTES));
    if (rbytes < 2 * (this.maxFrame + STREAM_LENGTH_BYTES)) {
      throw new RangeError(`net stream: a ${rbytes}-byte read buffer holds fewer than two ${this.maxFrame}-byte frames`);
    }
    this.rbuf = new Uint8Array(rbytes);
    this.shortWriteTimeoutMs = options.shortWriteTimeoutMs ?? 2000;
    const sndbuf = options.sendBufferBytes ?? DEFAULT_SEND_BUFFER;
    if (sndbuf > 0) sys.setsockoptInt(fd, sys.SOL_SOCKET, sys.SO_SNDBUF, sndbuf);
    this.sendBuffer = sys.getsockoptInt(fd, sys.SOL_SOCKET, sys.SO_SNDBUF);
    this.lengthAddress = sys.addressOf(this.lengthWord.buffer);
    setIov(this.iovView, 0, this.lengthAddress, STREAM_LENGTH_BYTES);
  }

  /** Why the stream stopped (peer closed, a failed call, a protocol error); undefined while up. */
  get down(): string | undefined {
    return this.downReason;
  }

  /** Stop using the stream (e.g. the helper exited); idempotent, the first reason stays. */
  markDown(reason: string): void {
    if (this.downReason === undefined) this.downReason = reason;
  }

  // ---- RX ----

  /**
   * The next whole frame (without its length): a view into the read buffer, valid until
   * consumeFrame() and the next peekFrame(). Reads the socket only when no whole frame is
   * buffered. Undefined when none is complete now, or the stream is down.
   */
  peekFrame(): Uint8Array | undefined {
    for (;;) {
      // Frames received before the peer closed are still delivered.
      const avail = this.rEnd - this.rStart;
      if (avail >= STREAM_LENGTH_BYTES) {
        const len = this.frameLength();
        if (len > this.maxFrame) {
          this.markDown(`protocol error: the peer sent a ${len}-byte frame (at most ${this.maxFrame})`);
          this.rStart = this.rEnd = 0; // nothing after it can be trusted
          return undefined;
        }
        if (len === 0) {
          // Nothing to deliver; skip the empty frame.
          this.rStart += STREAM_LENGTH_BYTES;
          continue;
        }
        if (avail >= STREAM_LENGTH_BYTES + len) {
          const at = this.rStart + STREAM_LENGTH_BYTES;
          return this.rbuf.subarray(at, at + len);
        }
      }
      if (this.downReason !== undefined || !this.fill()) return undefined;
    }
  }

  /** Done with the frame peekFrame() returned: the next peek moves on. */
  consumeFrame(): void {
    if (this.rEnd - this.rStart < STREAM_LENGTH_BYTES) return;
    const len = this.frameLength();
    if (this.rEnd - this.rStart < STREAM_LENGTH_BYTES + len) return;
    this.rStart += STREAM_LENGTH_BYTES + len;
    if (this.rStart === this.rEnd) this.rStart = this.rEnd = 0;
    this.stats.rxFrames++;
  }

  /** The owner's poll found the socket readable: read it again (see `polled`). */
  socketReadable(): void {
    this.polled = true;
    this.empty = false;
  }

  /** Whether a whole frame is buffered (the caller need not poll the socket for one). */
  get hasBufferedFrame(): boolean {
    const avail = this.rEnd - this.rStart;
    return avail >= STREAM_LENGTH_BYTES && avail >= STREAM_LENGTH_BYTES + this.frameLength();
  }

  private frameLength(): number {
    const b = this.rbuf;
    const i = this.rStart;
    return ((b[i]! << 24) | (b[i + 1]! << 16) | (b[i + 2]! << 8) | b[i + 3]!) >>> 0;
  }

  /** One read into the free end of the buffer (compacted first when a largest frame would not fit); false: nothing came. */
  private fill(): boolean {
    if (this.rStart > 0 && this.rbuf.length - this.rEnd < STREAM_LENGTH_BYTES + this.maxFrame) {
      this.rbuf.copyWithin(0, this.rStart, this.rEnd);
      this.rEnd -= this.rStart;
      this.rStart = 0;
    }
    if (this.empty) return false;
    const room = this.rbuf.length - this.rEnd;
    let n: number;
    try {
      n = sys.read(this.fd, this.rbuf.subarray(this.rEnd));
    } catch (e) {
      this.markDown(`reading the socket failed: ${(e as Error).message}`);
      return false;
    }
    // A UNIX stream read returns all that is queued, up to the room given: less means the
    // queue is empty now.
    this.empty = this.polled && n < room;
    if (n < 0) {
      this.stats.rxEmptyReads++; // EAGAIN
      return false;
    }
    if (n === 0) {
      this.markDown(this.rEnd > this.rStart ? "the peer closed the connection in the middle of a frame" : "the peer closed the connection");
      return false;
    }
    this.rEnd += n;
    this.stats.rxReads++;
    return true;
  }

  // ---- TX ----

  /** True after sendFrame() refused a frame for want of room: poll for POLLOUT. */
  get wantsWrite(): boolean {
    return this.downReason === undefined && this.wantWrite;
  }

  /**
   * Send `frame` (one Ethernet frame, no header) whole. True: it is written, or dropped
   * because the stream is down or it is larger than maxFrame (see `down`; the caller
   * counts a drop by checking frameFits()). False: no room now; nothing was written, keep
   * the frame and call again after the socket polls writable.
   */
  sendFrame(frame: Uint8Array): boolean {
    if (frame.buffer !== this.lastBuffer) {
      this.lastBuffer = frame.buffer;
      this.lastAddress = sys.addressOf(frame.buffer);
    }
    setIov(this.iovView, 1, this.lastAddress + frame.byteOffset, frame.byteLength);
    return this.writeFrame(2, frame.byteLength);
  }

  /**
   * The same from guest memory: `count` struct iovec entries {u64 host address, u64
   * length} in `iov`, of which the first `skip` bytes are not part of the frame (the
   * virtio-net header). `count` is at most STREAM_MAX_IOV.
   */
  sendFrameIov(iov: Uint8Array, count: number, skip: number): boolean {
    if (count > STREAM_MAX_IOV) throw new RangeError(`net stream: ${count} buffers for one frame (at most ${STREAM_MAX_IOV})`);
    const src = new DataView(iov.buffer, iov.byteOffset, iov.byteLength);
    let n = 1;
    let len = 0;
    let toSkip = skip;
    for (let i = 0; i < count; i++) {
      let base = getU64(src, 16 * i);
      let size = getU64(src, 16 * i + 8);
      if (toSkip > 0) {
        const s = Math.min(toSkip, size);
        base += s;
        size -= s;
        toSkip -= s;
      }
      if (size === 0) continue;
      setIov(this.iovView, n++, base, size);
      len += size;
    }
    return this.writeFrame(n, len);
  }

  /** Whether a frame of `length` bytes can ever be sent (else sendFrame drops it). */
  frameFits(length: number): boolean {
    return length > 0 && length <= this.maxFrame;
  }

  /** iov entries 1..n-1 hold the frame (`len` bytes): write it with its length word, or not at all. */
  private writeFrame(entries: number, len: number): boolean {
    if (this.downReason !== undefined || !this.frameFits(len)) return true;
    if (!this.hasRoom(len)) {
      this.wantWrite = true;
      this.stats.txBlocked++;
      return false;
    }
    this.lengthView.setUint32(0, len, false);
    const total = STREAM_LENGTH_BYTES + len;
    let n: number;
    try {
      n = sys.writev(this.fd, this.iov, entries);
    } catch (e) {
      this.markDown(`writing to the socket failed: ${(e as Error).message}`);
      return true;
    }
    if (n < 0) {
      // EAGAIN with nothing written: the room estimate was right to be refreshed.
      this.queued = this.sendBuffer;
      this.wantWrite = true;
      this.stats.txBlocked++;
      return false;
    }
    this.wantWrite = false;
    this.queued += queueCost(len);
    this.stats.txFrames++;
    if (n < total) this.finishShortWrite(entries, n, total);
    return true;
  }

  /** Is there room for a frame of `len` bytes in the send queue? Asks the kernel (SIOCOUTQ) when the estimate says no. */
  private hasRoom(len: number): boolean {
    const cost = queueCost(len);
    if (this.queued + cost <= this.sendBuffer) return true;
    try {
      this.queued = sys.socketOutputQueue(this.fd);
    } catch (e) {
      this.markDown(`SIOCOUTQ on the socket failed: ${(e as Error).message}`);
      return true;
    }
    this.stats.txRoomQueries++;
    // An empty queue takes any frame, even one larger than the whole buffer would hold.
    return this.queued === 0 || this.queued + cost <= this.sendBuffer;
  }

  /**
   * Write the rest of a frame the kernel cut short (iov entries 0..entries-1, `written` of
   * `total` bytes sent), waiting for the socket: a frame left half-sent would wedge the
   * peer. Takes the stream down if the peer does not read it in time.
   */
  private finishShortWrite(entries: number, written: number, total: number): void {
    this.stats.txShort++;
    const rest = new Uint8Array(total - written);
    let at = 0; // stream offset of entry i
    let out = 0;
    for (let i = 0; i < entries; i++) {
      const base = getU64(this.iovView, 16 * i);
      const size = getU64(this.iovView, 16 * i + 8);
      const from = Math.max(0, written - at);
      if (from < size) {
        rest.set(new Uint8Array(sys.view(BigInt(base + from), size - from)), out);
        out += size - from;
      }
      at += size;
    }
    const deadline = Date.now() + this.shortWriteTimeoutMs;
    for (let done = 0; done < rest.length; ) {
      let n: number;
      try {
        n = sys.write(this.fd, rest.subarray(done));
      } catch (e) {
        this.markDown(`writing to the socket failed: ${(e as Error).message}`);
        return;
      }
      if (n > 0) {
        done += n;
        continue;
      }
      const left = deadline - Date.now();
      if (left <= 0 || (sys.pollOne(this.fd, sys.POLLOUT, left) & sys.POLLOUT) === 0) {
        this.markDown(`the peer stopped reading in the middle of a frame (${rest.length - done} of ${total} bytes unsent)`);
        return;
      }
    }
  }
}

/** iov entry i = {u64 address, u64 length}, little-endian (numbers below 2^53, split without BigInt). */
function setIov(v: DataView, i: number, address: number, length: number): void {
  const o = 16 * i;
  v.setUint32(o, address >>> 0, true);
  v.setUint32(o + 4, Math.floor(address / 0x1_0000_0000), true);
  v.setUint32(o + 8, length >>> 0, true);
  v.setUint32(o + 12, Math.floor(length / 0x1_0000_0000), true);
}

function getU64(v: DataView, o: number): number {
  return v.getUint32(o, true) + v.getUint32(o + 4, true) * 0x1_0000_0000;
}
