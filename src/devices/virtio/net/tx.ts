/**
 * virtio-net transmit: guest -> back end, queue 1. Each chain is one frame (header
 * included), written to the back end in place (writev from guest memory) when it can,
 * else copied into txBuf. A write that would block is kept and retried when the back end
 * polls writable, in order: nothing after it goes out first.
 */
import { DescriptorChain, type Virtqueue, type VirtqueueState } from "../queue";
import { IovecArray } from "../../../memory/iovec";
import type { GuestMemory } from "../../../memory/guest-memory";
import { FrameBatch, type NetBackend } from "./backend";
import { NET_MAX_FRAME, NET_MAX_IOV, NetChainError, NetHdr, type NetLink, type NetLinkSettings } from "./header";

/** Frames handed to the back end per writeFrames call. */
export const TX_BATCH = 64;

export class NetTx {
  private queue: Virtqueue | undefined;
  private chain: DescriptorChain | undefined;
  private settings: NetLinkSettings = { hdrSize: NetHdr.MRG_SIZE, mergeable: false, guestCsum: false, directRx: false, directTx: false };
  /** Tell the driver about used buffers: the transmit queue's interrupt. */
  private signalUsed: () => void = () => undefined;

  private readonly txBuf = new Uint8Array(NET_MAX_FRAME);
  /** The frame's buffers as iovecs; kept while a blocked frame waits. */
  private readonly iov = new IovecArray(NET_MAX_IOV);
  /**
   * The frame whose write would block (pendingLength 0: none), its chain's head, and where
   * it is: txBuf (pendingIovecs 0) or the first pendingIovecs entries of iov.
   */
  private pendingLength = 0;
  private pendingHead = 0;
  private pendingIovecs = 0;

  /**
   * Batches (a back end with writeFrames, guest memory with host addresses): up to
   * TX_BATCH frames gathered from the ring and written in one call, each frame's chain
   * head and length beside it. Frames [batchFrom, batch.frames) are not written yet (the
   * back end would block): they go first, in order, when it is writable.
   */
  private readonly batch = new FrameBatch(TX_BATCH, NET_MAX_IOV * 4);
  private readonly batchHeads = new Int32Array(TX_BATCH);
  private readonly batchLens = new Int32Array(TX_BATCH);
  private batchFrom = 0;

  constructor(
    private readonly backend: NetBackend,
    private readonly link: NetLink,
  ) {}

  /** Start over on `queue` (undefined: the driver did not enable it). */
  activate(queue: Virtqueue | undefined, memory: GuestMemory, settings: NetLinkSettings, signalUsed: () => void): void {
    this.pendingLength = 0;
    this.queue = queue;
    this.settings = settings;
    this.signalUsed = signalUsed;
    this.chain = new DescriptorChain(memory);
  }

  /** Forget the queue; a frame waiting to go out is counted as dropped. */
  reset(): void {
    if (this.pendingLength > 0) this.link.stats.txDropped++;
    this.link.stats.txDropped += this.batch.frames - this.batchFrom;
    this.batch.clear();
    this.batchFrom = 0;
    this.pendingLength = 0;
    this.queue = undefined;
    this.chain = undefined;
  }

  /**
   * Snapshots: a frame waiting for the back end goes back to the ring (its chain is the
   * last one popped) and is sent again when the VM goes on.
   */
  quiesce(): void {
    if (this.pendingLength > 0) this.queue?.unpop(1);
    this.pendingLength = 0;
  }

  /** The queue's positions (after quiesce), or undefined when the driver did not enable it. */
  queueState(): VirtqueueState | undefined {
    return this.queue?.state();
  }

  /** Frames the driver queued that the device has not looked at (before DRIVER_OK, say). */
  hasPending(): boolean {
    return this.queue !== undefined && this.queue.pending() > 0;
  }

  /** A frame waits for the back end to become writable. */
  blocked(): boolean {
    return this.pendingLength > 0 || this.batchFrom < this.batch.frames;
  }

  needsNotification(): boolean {
    return this.queue?.needsNotification() ?? false;
  }

  /**
   * Drain the TX ring into the back end (after a blocked frame, if any, went out). Throws
   * NetChainError/VirtqueueError for what the guest broke.
   */
  transmit(): void {
    const q = this.queue;
    const chain = this.chain;
    if (q === undefined || chain === undefined) return;
    if (this.settings.directTx && this.backend.writeFrames !== undefined) {
      this.transmitBatches(q, chain);
      return;
    }
    const hdrSize = this.settings.hdrSize;
    if (this.pendingLength > 0) {
      if (!this.sendFrame(this.pendingHead, this.pendingLength, this.pendingIovecs, q)) return;
      this.pendingLength = 0;
    }
    do {
      q.disableNotification();
      for (let c = q.pop(chain); c !== undefined; c = q.pop(chain)) {
        if (c.writableBytes !== 0) throw new NetChainError(`TX chain (head ${c.head}) has device-writable buffers`);
        const len = c.readableBytes;
        if (len < hdrSize) {
          throw new NetChainError(`TX chain (head ${c.head}) has ${len} readable bytes, less than the ${hdrSize}-byte header`);
        }
        if (this.droppedOversized(c.head, len, q)) continue;
        // In place (writev from guest memory) when possible, else copied into txBuf.
        this.iov.clear();
        let iovecs = this.settings.directTx && c.appendIovecs(this.iov, false) ? this.iov.count : -1;
        if (iovecs < 0) {
          c.reader.readInto(len === this.txBuf.length ? this.txBuf : this.txBuf.subarray(0, len));
          iovecs = 0;
        }
        if (!this.sendFrame(c.head, len, iovecs, q)) {
          // Would block: keep it (already off the ring, still the device's) for when the
          // back end is writable, in order.
          this.pendingLength = len;
          this.pendingHead = c.head;
          this.pendingIovecs = iovecs;
          this.link.stats.txRetries++;
          if (q.needsNotification()) this.signalUsed();
          return;
        }
      }
      if (q.needsNotification()) this.signalUsed();
    } while (q.enableNotification());
  }

  /**
   * The TX drain in batches: frames are gathered in place (their buffers as iovecs) and
   * handed to the back end's writeFrames, a batch per call. A frame whose buffers are too
   * many for iovecs (more than NET_MAX_IOV) ends the batch and goes alone through txBuf.
   */
  private transmitBatches(q: Virtqueue, chain: DescriptorChain): void {
    if (!this.sendBatch(q)) return;
    const hdrSize = this.settings.hdrSize;
    const b = this.batch;
    do {
      q.disableNotification();
      for (;;) {
        b.clear();
        this.batchFrom = 0;
        // A frame too scattered for iovecs: copied into txBuf, sent after the batch.
        let odd = -1;
        let oddLen = 0;
        try {
          for (let c = q.pop(chain); c !== undefined; c = b.frames < TX_BATCH ? q.pop(chain) : undefined) {
            if (c.writableBytes !== 0) throw new NetChainError(`TX chain (head ${c.head}) has device-writable buffers`);
            const len = c.readableBytes;
            if (len < hdrSize) {
              throw new NetChainError(`TX chain (head ${c.head}) has ${len} readable bytes, less than the ${hdrSize}-byte header`);
            }
            if (this.droppedOversized(c.head, len, q)) continue;
            const k = b.begin();
            if (b.iov.capacity - b.iov.count >= NET_MAX_IOV && c.appendIovecs(b.iov, false) && b.iov.count - b.start[k]! <= NET_MAX_IOV) {
              b.end(k);
              this.batchHeads[k] = c.head;
              this.batchLens[k] = len;
              if (b.frames === TX_BATCH) break;
              continue;
            }
            b.drop(k);
            odd = c.head;
            oddLen = len;
            c.reader.readInto(len === this.txBuf.length ? this.txBuf : this.txBuf.subarray(0, len));
            break;
          }
        } catch (e) {
          // What the guest broke breaks the device, after the frames before it went out.
          this.sendBatch(q);
          throw e;
        }
        if (b.frames === 0 && odd < 0) break;
        if (!this.sendBatch(q)) {
          if (odd >= 0) this.keepOdd(odd, oddLen);
          if (q.needsNotification()) this.signalUsed();
          return;
        }
        if (odd >= 0 && !this.sendFrame(odd, oddLen, 0, q)) {
          this.keepOdd(odd, oddLen);
          if (q.needsNotification()) this.signalUsed();
          return;
        }
      }
      if (q.needsNotification()) this.signalUsed();
    } while (q.enableNotification());
  }

  /** A frame copied into txBuf waits behind the batch (or alone) for the back end. */
  private keepOdd(head: number, len: number): void {
    this.pendingLength = len;
    this.pendingHead = head;
    this.pendingIovecs = 0;
    this.link.stats.txRetries++;
  }

  /**
   * Write the batch's frames from batchFrom on, and return the written (or refused) ones'
   * chains in order. False when the back end would block: the rest stay for later (then,
   * a frame kept in txBuf goes after them).
   */
  private sendBatch(q: Virtqueue): boolean {
    const b = this.batch;
    if (this.batchFrom < b.frames && this.link.gone) {
      // The link is down: the frames go nowhere, as in sendFrame.
      for (let k = this.batchFrom; k < b.frames; k++) q.addUsed(this.batchHeads[k]!, 0);
      this.link.stats.txDropped += b.frames - this.batchFrom;
      this.batchFrom = b.frames;
    }
    if (this.batchFrom < b.frames) {
      this.backend.writeFrames!(b, this.batchFrom);
      for (let k = this.batchFrom; k < b.frames; k++) {
        const r = b.result[k]!;
        if (r === 0) {
          this.batchFrom = k;
          this.link.stats.txRetries++;
          return false;
        }
        if (r > 0) {
          this.link.stats.txFrames++;
          this.link.stats.txBytes += this.batchLens[k]!;
        } else {
          this.link.stats.txDropped++;
          this.link.note(`virtio-net: ${this.backend.name} refused a ${this.batchLens[k]}-byte frame: errno ${-r}`);
        }
        q.addUsed(this.batchHeads[k]!, 0);
      }
      this.batchFrom = b.frames;
    }
    if (this.pendingLength > 0) {
      if (!this.sendFrame(this.pendingHead, this.pendingLength, 0, q)) return false;
      this.pendingLength = 0;
    }
    return true;
  }

  /**
   * One limit whichever way a frame goes out (copied, in place, in a batch): none larger
   * than NET_MAX_FRAME, which is all a TAP takes. True when this chain was such a frame,
   * dropped and returned.
   */
  private droppedOversized(head: number, len: number, q: Virtqueue): boolean {
    if (len <= NET_MAX_FRAME) return false;
    this.link.stats.txDropped++;
    this.link.note(`virtio-net: dropped a ${len}-byte TX frame: larger than ${NET_MAX_FRAME} bytes`);
    q.addUsed(head, 0);
    return true;
  }

  /**
   * Write a frame to the back end (the first `iovecs` iov entries, or txBuf[0, len) when 0)
   * and return its chain; false (nothing done) when the write would block.
   */
  private sendFrame(head: number, len: number, iovecs: number, q: Virtqueue): boolean {
    if (this.link.gone) {
      // The link is down (the guest hears of it by a configuration change): like a cable pulled.
      this.link.stats.txDropped++;
      q.addUsed(head, 0);
      return true;
    }
    try {
      const n = iovecs > 0 ? this.backend.writev!(this.iov.bytes, iovecs) : this.backend.write(this.txBuf, len);
      if (n === 0) return false;
      this.link.stats.txFrames++;
      this.link.stats.txBytes += len;
    } catch (e) {
      // The back end refused this frame (a bad header, the link down, the TAP gone): drop it.
      this.link.stats.txDropped++;
      this.link.note(`virtio-net: ${this.backend.name} refused a ${len}-byte frame: ${(e as Error).message}`);
    }
    q.addUsed(head, 0);
    return true;
  }
}
