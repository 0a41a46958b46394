/**
 * virtio-net receive: back end -> guest, queue 0. The back end is read only while the
 * guest has RX buffers (the device polls it for input then). A frame is placed in one
 * chain, or, with MRG_RXBUF, in as many as it needs (num_buffers says how many); a frame
 * that does not fit in the buffers available now is kept (it has been read) and finished
 * when the guest posts more (its kick).
 *
 * In place when it can (NetLinkSettings.directRx): the frame is read with readv straight
 * into the held chains' buffers, plus rxBuf for what does not fit (copied into further
 * chains). Otherwise read into rxBuf and copied.
 */
import { DescriptorChain, type Virtqueue, type VirtqueueState, VirtqueueError } from "../queue";
import { IovecArray, hostAddressOf } from "../../../memory/iovec";
import type { GuestMemory } from "../../../memory/guest-memory";
import { FrameBatch, type NetBackend } from "./backend";
import { NET_MAX_FRAME, NET_MAX_IOV, NetChainError, NetHdr, type NetLink, type NetLinkSettings } from "./header";

/** Frames moved per receive() before returning to the worker's poll loop. */
export const NET_RX_BATCH = 256;
/** Chains read into per readFrames call. */
export const RX_BATCH = 32;
/**
 * The longest frame a back end gives a guest that takes no GSO frames, header aside: an
 * Ethernet frame of a 1500-byte MTU with a VLAN tag. Chains this big are read in batches.
 */
export const RX_BATCH_ROOM = 1500 + 14 + 4;
/** Frames seen fitting RX_BATCH_ROOM, one by one, before reads go in batches. */
export const RX_BATCH_AFTER = 32;

export class NetRx {
  private queue: Virtqueue | undefined;
  private memory: GuestMemory | undefined;
  private settings: NetLinkSettings = { hdrSize: NetHdr.MRG_SIZE, mergeable: false, guestCsum: false, directRx: false, directTx: false };

  /**
   * The frame read from the back end and not yet given to the guest (length 0: none). Its
   * first `direct` bytes are already in the held chains (read there in place); the rest is
   * in rxBuf from offset 0.
   */
  private readonly rxBuf = new Uint8Array(NET_MAX_FRAME);
  private length = 0;
  private direct = 0;
  /** Chains popped and not yet returned (for the frame, or read into ahead of one). */
  private chains: DescriptorChain[] = [];
  private held = 0;
  private capacity = 0;
  /** The frame has been counted as waiting for buffers (stats.rxWaits). */
  private waiting = false;
  /** The held chains plus rxBuf, as iovecs; one entry stays for rxBuf. */
  private readonly iov = new IovecArray(NET_MAX_IOV + 1);
  /** rxBuf is an ArrayBuffer of its own, which V8 never moves: its address is fixed. */
  private rxBufAddress = 0;
  /** Reads in batches (see batching()), and whether a frame too long for them stopped them. */
  private readonly batch = new FrameBatch(RX_BATCH, RX_BATCH * (NET_MAX_IOV + 1));
  private batchOff = false;
  /**
   * Frames in a row (frame by frame) that would have fitted a batch read: batches start only
   * after RX_BATCH_AFTER of them, so a back end with a larger MTU shows itself before a
   * batch read could cut one of its frames.
   */
  private fitting = 0;

  constructor(
    private readonly backend: NetBackend,
    private readonly link: NetLink,
  ) {}

  /** Start over on `queue` (undefined: the driver did not enable it); any frame in flight is dropped. */
  activate(queue: Virtqueue | undefined, memory: GuestMemory, settings: NetLinkSettings): void {
    this.forget();
    this.queue = queue;
    this.memory = memory;
    this.settings = settings;
    this.batchOff = false;
    this.fitting = 0;
    if (settings.directRx && this.rxBufAddress === 0) this.rxBufAddress = hostAddressOf(this.rxBuf);
    // With EVENT_IDX: ask to be kicked for the next buffer posted.
    queue?.enableNotification();
  }

  /** Forget the queue; a frame in flight is counted as dropped. */
  reset(): void {
    if (this.length > 0) this.link.stats.rxDropped++;
    this.forget();
    this.queue = undefined;
  }

  /**
   * Snapshots: give the chains held back to the ring (they are the last ones popped, none
   * used) and drop a half-received frame, so the queue's positions are all its state.
   */
  quiesce(): void {
    if (this.length > 0) this.link.stats.rxDropped++;
    this.queue?.unpop(this.held);
    this.endFrame();
    this.held = 0;
    this.capacity = 0;
  }

  /** The queue's positions (after quiesce), or undefined when the driver did not enable it. */
  queueState(): VirtqueueState | undefined {
    return this.queue?.state();
  }

  /** Wants the back end read: no frame waiting for buffers, and buffers to read into. */
  wantsInput(): boolean {
    const q = this.queue;
    return q !== undefined && this.length === 0 && (this.held > 0 || q.pending() > 0);
  }

  /** The used ring of the queue, if the driver is to hear about new entries. */
  needsNotification(): boolean {
    return this.queue?.needsNotification() ?? false;
  }

  /**
   * Move frames from the back end into the RX ring until it is empty, buffers run out, or
   * a batch is done. Throws NetChainError/VirtqueueError for what the guest broke.
   */
  receive(): void {
    const q = this.queue;
    if (q === undefined) return;
    if (this.length === 0 && this.batching() && this.receiveBatches(q)) return;
    for (let done = 0; ; ) {
      if (this.length === 0) {
        if (done >= NET_RX_BATCH || this.link.gone) break;
        if (this.held === 0 && q.pending() === 0) {
          // No buffers: leave frames in the back end (the kernel queues or drops them
          // there) and ask for a kick when the guest posts some.
          if (!q.enableNotification()) break;
          continue;
        }
        if (!this.readFrame(q)) break;
        if (this.length === 0) continue; // dropped a runt; look at the next
      }
      if (!this.placeFrame(q)) {
        if (!this.waiting) {
          this.waiting = true;
          this.link.stats.rxWaits++;
        }
        if (q.enableNotification()) continue; // buffers arrived meanwhile
        break;
      }
      done++;
    }
  }

  /**
   * Frames read in batches (a back end with readFrames, in place, no GSO frames for the
   * guest): each held chain gets one read, in one crossing for the lot. Without GSO a frame
   * is at most an Ethernet frame of the back end's MTU: one chain of RX_BATCH_ROOM bytes
   * holds it, and each read has rxBuf after the chain's buffers to catch (and so detect) a
   * frame that is longer after all (a larger MTU): it is dropped and batching stops. Batches
   * start only after RX_BATCH_AFTER frames in a row fitted, one by one.
   */
  private batching(): boolean {
    const st = this.settings;
    return st.directRx && st.guestGso !== true && !this.batchOff && this.fitting >= RX_BATCH_AFTER && this.backend.readFrames !== undefined && !this.link.gone;
  }

  /** True when there is nothing more to read now; false to let the frame-by-frame path go on. */
  private receiveBatches(q: Virtqueue): boolean {
    const b = this.batch;
    const hdrSize = this.settings.hdrSize;
    for (let done = 0; done < NET_RX_BATCH; ) {
      // Gather the chains held (in order), then more from the ring, while each can take a frame.
      b.clear();
      for (let i = 0; b.frames < RX_BATCH; i++) {
        if (i === this.held && !this.holdChain(q)) break;
        const c = this.chains[i]!;
        if (c.writableBytes < RX_BATCH_ROOM + hdrSize) break;
        const k = b.begin();
        if (b.iov.capacity - b.iov.count < NET_MAX_IOV + 1 || !c.appendIovecs(b.iov, true) || b.iov.count - b.start[k]! > NET_MAX_IOV) {
          b.drop(k);
          break;
        }
        b.iov.push(this.rxBufAddress, this.rxBuf.length);
        b.end(k);
      }
      if (b.frames === 0) return false;
      this.backend.readFrames!(b);
      let placed = 0;
      let kept = 0;
      for (let k = 0; k < b.frames; k++) {
        const c = this.chains[k]!;
        const n = b.result[k]!;
        let take = false;
        if (n < 0) {
          this.link.backendGone(`reading ${this.backend.name} failed: errno ${-n}`);
        } else if (n > 0 && n < hdrSize) {
          this.link.stats.rxDropped++;
          this.link.note(`virtio-net: ${this.backend.name} gave a ${n}-byte frame; dropped`);
        } else if (n > c.writableBytes) {
          this.link.stats.rxDropped++;
          this.link.note(`virtio-net: dropped a ${n - hdrSize}-byte frame longer than its ${c.writableBytes - hdrSize}-byte RX buffer; receiving frame by frame from now on`);
          this.batchOff = true;
        } else if (n > 0) {
          take = true;
          if (!this.settings.guestCsum) c.setWritableByte(NetHdr.FLAGS, 0);
          if (hdrSize === NetHdr.MRG_SIZE) {
            c.setWritableByte(NetHdr.NUM_BUFFERS, 1);
            c.setWritableByte(NetHdr.NUM_BUFFERS + 1, 0);
          }
          q.addUsed(c.head, n);
          this.link.stats.rxFrames++;
          this.link.stats.rxBytes += n;
          placed++;
        }
        if (!take) {
          // Not used: the chain stays held, in order, for what comes next.
          c.rewind();
          this.chains[k] = this.chains[kept]!;
          this.chains[kept++] = c;
        } else {
          this.capacity -= c.writableBytes;
        }
      }
      // The chains returned go to the back of the list (their objects are reused); the
      // kept ones are at the front, then any held beyond the batch.
      if (kept < b.frames) {
        const returned = this.chains.splice(kept, b.frames - kept);
        this.chains.splice(kept + (this.held - b.frames), 0, ...returned);
      }
      this.held -= b.frames - kept;
      done += placed;
      if (placed === 0 || this.link.gone) return true;
      if (this.batchOff) return false;
    }
    return true;
  }

  /** Let go of any half-received frame and the chains held. */
  private forget(): void {
    this.endFrame();
    this.held = 0;
    this.capacity = 0;
    this.chains = [];
  }

  /** The frame is gone (given to the guest or dropped): wait for the next. */
  private endFrame(): void {
    this.length = 0;
    this.direct = 0;
    this.waiting = false;
  }

  /**
   * Read one frame: in place into the chains held (one is popped first when none is), the
   * overflow into rxBuf; or all into rxBuf. False when the back end has none.
   */
  private readFrame(q: Virtqueue): boolean {
    const hdrSize = this.settings.hdrSize;
    let n: number;
    try {
      if (this.settings.directRx) {
        if (this.held === 0 && !this.holdChain(q)) return false;
        const iov = this.iov;
        iov.clear();
        let fits = true;
        for (let i = 0; i < this.held && fits; i++) fits = this.chains[i]!.appendIovecs(iov, true);
        if (!fits || iov.count > NET_MAX_IOV) {
          // Too scattered to read in place: into rxBuf, then copied.
          this.direct = 0;
          n = this.backend.read(this.rxBuf);
        } else {
          iov.push(this.rxBufAddress, this.rxBuf.length);
          n = this.backend.readv!(iov.bytes, iov.count);
          this.direct = Math.min(n, this.capacity);
        }
      } else {
        this.direct = 0;
        n = this.backend.read(this.rxBuf);
      }
    } catch (e) {
      if (e instanceof NetChainError || e instanceof VirtqueueError) throw e;
      this.link.backendGone(`reading ${this.backend.name} failed: ${(e as Error).message}`);
      return false;
    }
    if (n === 0) return false;
    this.fitting = n <= RX_BATCH_ROOM + hdrSize ? this.fitting + 1 : 0;
    if (n < hdrSize || n - this.direct > this.rxBuf.length) {
      this.link.stats.rxDropped++;
      this.link.note(`virtio-net: ${this.backend.name} gave a ${n}-byte frame; dropped`);
      return true; // look for the next one; held chains stay held
    }
    this.length = n;
    return true;
  }

  /** Pop the next RX chain into the held list, checked; false when the ring is empty. */
  private holdChain(q: Virtqueue): boolean {
    const c = this.chains[this.held] ?? (this.chains[this.held] = new DescriptorChain(this.memory!));
    if (q.pop(c) === undefined) return false;
    const hdrSize = this.settings.hdrSize;
    if (c.readableBytes !== 0) throw new NetChainError(`RX chain (head ${c.head}) has device-readable buffers`);
    if (c.writableBytes < hdrSize) {
      throw new NetChainError(`RX chain (head ${c.head}) has ${c.writableBytes} writable bytes, less than the ${hdrSize}-byte header`);
    }
    this.held++;
    this.capacity += c.writableBytes;
    return true;
  }

  /**
   * Put the frame into the guest's RX buffers: hold chains until they can take it, copy
   * what is in rxBuf, fix the header (flags, num_buffers), return the chains. False when
   * the guest has too few buffers for now (the chains held so far are kept for later).
   */
  private placeFrame(q: Virtqueue): boolean {
    const len = this.length;
    const { hdrSize, mergeable, guestCsum } = this.settings;
    while (this.capacity < len) {
      if (this.held > 0 && !mergeable) {
        // One chain per frame without MRG_RXBUF, and this one is too small: the guest
        // broke 5.1.6.3.1 (or the back end's MTU is above what it expects). Drop the
        // frame, keep the chain for the next.
        this.dropFrame(`a ${len - hdrSize}-byte frame does not fit the guest's ${this.capacity - hdrSize}-byte RX buffer (no MRG_RXBUF)`);
        return true;
      }
      if (this.held >= q.size) {
        // Every descriptor the guest can have outstanding is held, and the frame still does not fit.
        this.dropFrame(`a ${len - hdrSize}-byte frame does not fit in ${q.size} RX buffers`);
        return true;
      }
      if (!this.holdChain(q)) return false;
    }
    // The chains this frame uses: all, unless some were held ahead of it.
    let used = 0;
    for (let cap = 0; cap < len; used++) cap += this.chains[used]!.writableBytes;
    const direct = this.direct;
    const buf = this.rxBuf;
    // The header is in rxBuf (copied below) or already in the first chain.
    if (direct === 0) {
      if (!guestCsum) buf[NetHdr.FLAGS] = 0;
      if (hdrSize === NetHdr.MRG_SIZE) {
        buf[NetHdr.NUM_BUFFERS] = used & 0xff;
        buf[NetHdr.NUM_BUFFERS + 1] = used >>> 8;
      }
    } else {
      const first = this.chains[0]!;
      // Without GUEST_CSUM the device must hand over flags 0 (section 5.1.6.4.1); the back
      // end may say DATA_VALID. (It gives no partial checksums or GSO: offloads are off then.)
      if (!guestCsum) first.setWritableByte(NetHdr.FLAGS, 0);
      if (hdrSize === NetHdr.MRG_SIZE) {
        first.setWritableByte(NetHdr.NUM_BUFFERS, used & 0xff);
        first.setWritableByte(NetHdr.NUM_BUFFERS + 1, used >>> 8);
      }
    }
    let at = 0; // stream offset of the chain's first byte
    for (let i = 0; i < used; i++) {
      const c = this.chains[i]!;
      const n = Math.min(c.writableBytes, len - at);
      if (at + n > direct) {
        // Copy this chain's part of [direct, len) from rxBuf.
        const w = c.writer;
        const skip = Math.max(0, direct - at);
        if (skip > 0) w.skip(skip);
        const from = at + skip - direct;
        w.write(buf.subarray(from, from + n - skip));
      }
      q.addUsed(c.head, n);
      at += n;
      this.capacity -= c.writableBytes;
    }
    if (used < this.held) {
      // Move the chains still held to the front, the returned ones' objects to the back.
      const rest = this.chains.splice(0, used);
      this.chains.push(...rest);
    }
    this.held -= used;
    this.link.stats.rxFrames++;
    this.link.stats.rxBytes += len;
    this.endFrame();
    return true;
  }

  /** Drop the frame, keeping the chains held for it for the next (they were not returned). */
  private dropFrame(why: string): void {
    this.link.stats.rxDropped++;
    this.link.note(`virtio-net: dropped a received frame: ${why}`);
    this.endFrame();
    // Writers may have moved: the next frame fills the chains from their start.
    for (let i = 0; i < this.held; i++) this.chains[i]!.rewind();
  }
}
