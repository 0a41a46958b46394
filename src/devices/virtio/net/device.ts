/**
 * virtio-net back end (virtio 1.2 section 5.1) over a TAP: queue 0 receives (TAP -> guest),
 * queue 1 transmits (guest -> TAP). No control queue, one queue pair.
 *
 * Every frame on either side starts with a struct virtio_net_hdr: 10 bytes, or 12 with
 * num_buffers when VIRTIO_F_VERSION_1 or VIRTIO_NET_F_MRG_RXBUF is negotiated. The TAP
 * (IFF_VNET_HDR) speaks the same header, so the device tells it the negotiated size
 * (TUNSETVNETHDRSZ) and which offloads the guest accepts (TUNSETOFFLOAD from GUEST_*),
 * and then passes headers through: TX unchanged, RX with num_buffers filled in.
 *
 * RX: the TAP is polled (pollFds) only while the guest has RX buffers. A frame read from
 * the TAP is placed in one chain (or, with MRG_RXBUF, as many as it needs, num_buffers
 * saying how many); a frame that does not fit in the buffers available now is kept (it
 * has been read) and finished when the guest posts more (its kick: queueNotified(0)).
 * TX: each chain is one frame (header included) written to the TAP; a write that would
 * block is kept and retried when the TAP polls writable (POLLOUT), in order.
 *
 * With mmap'd guest RAM and a TAP that takes iovecs, frames move in place: writev from
 * the TX chain's buffers, readv into the next RX chain's buffers plus a host buffer for
 * the overflow (copied into further chains). Otherwise (test memory, chains of more than
 * NET_MAX_IOV buffers) through host buffers. docs/net.md has the whole story.
 */
import { createHash } from "node:crypto";
import * as sys from "../../../sys/libc";
import { type VirtioActivation, type VirtioDevice, VirtioDeviceType, VirtioFeatureBit, feature } from "../types";
import { DescriptorChain, Virtqueue, VirtqueueError } from "../queue";
import { IovecArray, hostAddressOf } from "../../../memory/iovec";
import { TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, type TapLike } from "../../../host/tap";

/** Device feature bits (section 5.1.3). */
export const VirtioNetFeature = {
  CSUM: 0,
  GUEST_CSUM: 1,
  CTRL_GUEST_OFFLOADS: 2,
  MTU: 3,
  MAC: 5,
  GUEST_TSO4: 7,
  GUEST_TSO6: 8,
  GUEST_ECN: 9,
  GUEST_UFO: 10,
  HOST_TSO4: 11,
  HOST_TSO6: 12,
  HOST_ECN: 13,
  HOST_UFO: 14,
  MRG_RXBUF: 15,
  STATUS: 16,
  CTRL_VQ: 17,
  CTRL_RX: 18,
  CTRL_VLAN: 19,
  GUEST_ANNOUNCE: 21,
  MQ: 22,
  CTRL_MAC_ADDR: 23,
} as const;

/** Offsets in struct virtio_net_config (section 5.1.4). */
export const NetConfig = {
  MAC: 0, // u8[6]
  STATUS: 6, // le16
  MAX_VIRTQUEUE_PAIRS: 8, // le16
  MTU: 10, // le16
  SIZE: 12,
} as const;

/** config.status bits. */
export const VIRTIO_NET_S_LINK_UP = 1;

/** struct virtio_net_hdr (section 5.1.6): field offsets and the two sizes. */
export const NetHdr = {
  FLAGS: 0, // u8
  GSO_TYPE: 1, // u8
  HDR_LEN: 2, // le16
  GSO_SIZE: 4, // le16
  CSUM_START: 6, // le16
  CSUM_OFFSET: 8, // le16
  NUM_BUFFERS: 10, // le16, in the 12-byte header only
  SIZE: 10,
  MRG_SIZE: 12,
} as const;

export const VIRTIO_NET_HDR_F_NEEDS_CSUM = 1;
export const VIRTIO_NET_HDR_F_DATA_VALID = 2;
export const VirtioNetGso = { NONE: 0, TCPV4: 1, UDP: 3, TCPV6: 4, ECN: 0x80 } as const;

export const NET_QUEUE_SIZE = 256;
export const NET_RX_QUEUE = 0;
export const NET_TX_QUEUE = 1;

/**
 * Largest frame either way, header included: a 64 KiB GSO packet plus its Ethernet and
 * VLAN headers and the 12-byte virtio-net header, rounded up.
 */
export const NET_MAX_FRAME = 68 * 1024;

/** Frames moved per RX poll before returning to the worker's poll loop. */
export const NET_RX_BATCH = 256;

/** Most buffers one frame is read into or written from in place (readv/writev); more: copied. */
export const NET_MAX_IOV = 64;

/** Offloads the guest may be offered when the TAP accepts them, and their TUN flags. */
const GUEST_OFFLOADS: readonly [bit: number, tun: number][] = [
  [VirtioNetFeature.GUEST_CSUM, TUN_F_CSUM],
  [VirtioNetFeature.GUEST_TSO4, TUN_F_TSO4],
  [VirtioNetFeature.GUEST_TSO6, TUN_F_TSO6],
  [VirtioNetFeature.GUEST_ECN, TUN_F_TSO_ECN],
];
const ALL_TUN_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
const OFFLOAD_FEATURES =
  feature(VirtioNetFeature.CSUM) |
  feature(VirtioNetFeature.GUEST_CSUM) |
  feature(VirtioNetFeature.HOST_TSO4) |
  feature(VirtioNetFeature.HOST_TSO6) |
  feature(VirtioNetFeature.HOST_ECN) |
  feature(VirtioNetFeature.GUEST_TSO4) |
  feature(VirtioNetFeature.GUEST_TSO6) |
  feature(VirtioNetFeature.GUEST_ECN);

/** A MAC address string that does not parse. */
export class MacAddressError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "MacAddressError";
  }
}

/** "52:54:00:12:34:56" (or with "-") -> 6 bytes; a unicast address only. */
export function parseMac(text: string): Uint8Array {
  const parts = text.trim().split(/[:-]/);
  if (parts.length !== 6 || parts.some((p) => !/^[0-9a-fA-F]{1,2}$/.test(p))) {
    throw new MacAddressError(`MAC address "${text}" is not six hex bytes separated by colons (e.g. 52:54:00:12:34:56)`);
  }
  const mac = Uint8Array.from(parts.map((p) => parseInt(p, 16)));
  if ((mac[0]! & 1) !== 0) throw new MacAddressError(`MAC address "${text}" is a multicast address: a NIC needs a unicast one (even first byte)`);
  if (mac.every((b) => b === 0)) throw new MacAddressError(`MAC address "${text}" is all zeroes`);
  return mac;
}

export function formatMac(mac: Uint8Array): string {
  return Array.from(mac.subarray(0, 6), (b) => b.toString(16).padStart(2, "0")).join(":");
}

/** 52:54:00 (a locally administered unicast prefix) + 3 bytes of a hash of `seed`. */
export function defaultMac(seed: string): Uint8Array {
  const h = createHash("sha256").update(`tskvm-net:${seed}`).digest();
  return Uint8Array.of(0x52, 0x54, 0x00, h[0]!, h[1]!, h[2]!);
}

export interface VirtioNetOptions {
  /** The guest's MAC: bytes or "aa:bb:cc:dd:ee:ff"; default defaultMac(tap.name). */
  mac?: Uint8Array | string;
  /** Offer VIRTIO_NET_F_MTU with this MTU (68 to 65535). */
  mtu?: number;
  /**
   * Whether the TAP takes TUNSETOFFLOAD (checksum and TSO offloads): probed on the TAP
   * when omitted. Pass what another thread probed to skip the probe.
   */
  offloads?: boolean;
  /** Where to report what the guest did wrong or what failed on the host (one line each). */
  log?: (line: string) => void;
}

/** Counters, for tests and statistics. */
export interface NetStats {
  /** Frames (and their bytes, header included) delivered to the guest. */
  rxFrames: number;
  rxBytes: number;
  /** Frames dropped on receive: too big for any buffer the guest can post, or cut by a reset. */
  rxDropped: number;
  /** Times a frame read from the TAP had to wait for the guest to post buffers. */
  rxWaits: number;
  /** Frames (and bytes, header included) written to the TAP. */
  txFrames: number;
  txBytes: number;
  /** Frames the TAP refused (an error other than EAGAIN) or that were too big: dropped. */
  txDropped: number;
  /** Writes that would have blocked (EAGAIN): kept and retried on POLLOUT. */
  txRetries: number;
}

/** A chain the guest laid out against the spec: breaks the device (DEVICE_NEEDS_RESET). */
class NetChainError extends Error {}

const NO_FDS: readonly { fd: number; events: number }[] = [];
const LOG_LIMIT = 10;

export class VirtioNet implements VirtioDevice {
  readonly deviceType = VirtioDeviceType.NET;
  readonly queueCount = 2;
  readonly maxQueueSize = NET_QUEUE_SIZE;
  readonly deviceFeatures: bigint;
  readonly config: Uint8Array;
  readonly mac: Uint8Array;
  /** Whether the TAP accepted TUNSETOFFLOAD, so offloads are offered. */
  readonly offloads: boolean;
  readonly stats: NetStats = { rxFrames: 0, rxBytes: 0, rxDropped: 0, rxWaits: 0, txFrames: 0, txBytes: 0, txDropped: 0, txRetries: 0 };

  private readonly log: (line: string) => void;
  private logged = 0;
  private ctx: VirtioActivation | undefined;
  private rxq: Virtqueue | undefined;
  private txq: Virtqueue | undefined;
  private broken = false;
  /** The TAP reported an error on poll (it was deleted): stop polling it. */
  private tapGone = false;
  private hdrSize: number = NetHdr.MRG_SIZE;
  private mergeable = false;
  private guestCsum = false;

  /** Guest memory has host addresses and the TAP takes iovecs: move frames in place. */
  private direct = false;
  /** struct iovec arrays: RX (chains + rxBuf) and TX (kept while a blocked frame waits). */
  private readonly rxIov = new IovecArray(NET_MAX_IOV + 1);
  private readonly txIov = new IovecArray(NET_MAX_IOV);
  private rxBufAddress = 0;

  /**
   * RX: the frame read from the TAP and not yet given to the guest (rxLen 0: none). Its
   * first rxDirect bytes are already in the held chains (read there in place); the rest
   * is in rxBuf from offset 0.
   */
  private readonly rxBuf = new Uint8Array(NET_MAX_FRAME);
  private rxLen = 0;
  private rxDirect = 0;
  /** Chains popped and not yet returned (for the frame, or read into ahead of one). */
  private rxChains: DescriptorChain[] = [];
  private rxHeld = 0;
  private rxCapacity = 0;
  private rxWaiting = false;

  /**
   * TX: the frame whose write would block (txPendingLen 0: none), its chain's head, and
   * where it is: txBuf (txPendingIov 0) or the first txPendingIov entries of iov.
   */
  private readonly txBuf = new Uint8Array(NET_MAX_FRAME);
  private txChain: DescriptorChain | undefined;
  private txPendingLen = 0;
  private txPendingHead = 0;
  private txPendingIov = 0;

  private readonly pollEntry = { fd: -1, events: 0 };
  private readonly pollList: readonly { fd: number; events: number }[] = [this.pollEntry];

  constructor(
    readonly tap: TapLike,
    options: VirtioNetOptions = {},
  ) {
    this.log = options.log ?? (() => {});
    this.pollEntry.fd = tap.fd;
    const mac = options.mac === undefined ? defaultMac(tap.name) : typeof options.mac === "string" ? parseMac(options.mac) : options.mac;
    if (mac.length !== 6) throw new MacAddressError(`a MAC address has 6 bytes, not ${mac.length}`);
    this.mac = Uint8Array.from(mac);
    if (options.mtu !== undefined && (!Number.isInteger(options.mtu) || options.mtu < 68 || options.mtu > 65535)) {
      throw new RangeError(`virtio-net: MTU ${options.mtu} is not an integer from 68 to 65535`);
    }
    this.offloads = options.offloads ?? probeOffloads(tap);

    let f = feature(VirtioNetFeature.MAC) | feature(VirtioNetFeature.STATUS) | feature(VirtioNetFeature.MRG_RXBUF);
    if (this.offloads) f |= OFFLOAD_FEATURES;
    if (options.mtu !== undefined) f |= feature(VirtioNetFeature.MTU);
    this.deviceFeatures = f;

    const c = new Uint8Array(NetConfig.SIZE);
    const v = new DataView(c.buffer);
    c.set(this.mac, NetConfig.MAC);
    v.setUint16(NetConfig.STATUS, VIRTIO_NET_S_LINK_UP, true);
    v.setUint16(NetConfig.MAX_VIRTQUEUE_PAIRS, 1, true);
    if (options.mtu !== undefined) v.setUint16(NetConfig.MTU, options.mtu, true);
    this.config = c;
  }

  /** Header size in use: 12 with VERSION_1 or MRG_RXBUF, else 10. */
  get vnetHeaderSize(): number {
    return this.hdrSize;
  }

  activate(ctx: VirtioActivation): void {
    this.ctx = ctx;
    this.broken = false;
    this.tapGone = false;
    const has = (bit: number): boolean => (ctx.features & feature(bit)) !== 0n;
    this.mergeable = has(VirtioNetFeature.MRG_RXBUF);
    this.hdrSize = has(VirtioFeatureBit.VERSION_1) || this.mergeable ? NetHdr.MRG_SIZE : NetHdr.SIZE;
    this.guestCsum = has(VirtioNetFeature.GUEST_CSUM);
    this.clearTransfers();
    this.direct =
      this.tap.readv !== undefined && this.tap.writev !== undefined && ctx.memory.regions.every((r) => r.hostAddress !== undefined);
    // rxBuf is an ArrayBuffer of its own, which V8 never moves: its address is fixed.
    if (this.direct && this.rxBufAddress === 0) this.rxBufAddress = hostAddressOf(this.rxBuf);
    try {
      this.tap.setVnetHeaderSize(this.hdrSize);
      let tun = 0;
      // TSO without checksum offload is meaningless (and the TAP refuses it).
      if (this.offloads && this.guestCsum) for (const [bit, flag] of GUEST_OFFLOADS) if (has(bit)) tun |= flag;
      this.setOffload(tun);
    } catch (e) {
      this.fail(e);
      return;
    }
    const rx = ctx.queues[NET_RX_QUEUE];
    const tx = ctx.queues[NET_TX_QUEUE];
    try {
      if (rx !== undefined && rx.ready) {
        this.rxq = Virtqueue.create(ctx.memory, rx, ctx.features);
        // With EVENT_IDX: ask to be kicked for the next buffer posted.
        this.rxq.enableNotification();
      }
      if (tx !== undefined && tx.ready) this.txq = Virtqueue.create(ctx.memory, tx, ctx.features);
      this.rxChains = [];
      this.txChain = new DescriptorChain(ctx.memory);
    } catch (e) {
      this.fail(e);
      return;
    }
    // Frames the driver queued before DRIVER_OK (it kicked before we listened).
    if (this.txq !== undefined && this.txq.pending() > 0) this.transmit();
  }

  queueNotified(index: number): void {
    if (this.ctx === undefined || this.broken) return;
    if (index === NET_RX_QUEUE) this.receive();
    else if (index === NET_TX_QUEUE) this.transmit();
  }

  pollFds(): readonly { fd: number; events: number }[] {
    if (this.ctx === undefined || this.broken || this.tapGone) return NO_FDS;
    let events = 0;
    const rx = this.rxq;
    if (rx !== undefined && this.rxLen === 0 && (this.rxHeld > 0 || rx.pending() > 0)) events |= sys.POLLIN;
    if (this.txPendingLen > 0) events |= sys.POLLOUT;
    if (events === 0) return NO_FDS;
    this.pollEntry.events = events;
    return this.pollList;
  }

  pollReady(fd: number, revents: number): void {
    if (fd !== this.tap.fd || this.ctx === undefined || this.broken) return;
    if ((revents & (sys.POLLERR | sys.POLLHUP)) !== 0 && (revents & (sys.POLLIN | sys.POLLOUT)) === 0) {
      this.tapGone = true;
      this.note(`virtio-net: TAP ${this.tap.name} reports an error (deleted?); no longer reading it`);
      return;
    }
    if ((revents & sys.POLLOUT) !== 0) this.transmit();
    if ((revents & sys.POLLIN) !== 0) this.receive();
  }

  /** Forget any half-received frame and any TX chain waiting for the TAP. */
  private clearTransfers(): void {
    this.rxLen = 0;
    this.rxDirect = 0;
    this.rxHeld = 0;
    this.rxCapacity = 0;
    this.rxWaiting = false;
    this.txPendingLen = 0;
  }

  reset(): void {
    if (this.rxLen > 0) this.stats.rxDropped++;
    if (this.txPendingLen > 0) this.stats.txDropped++;
    this.clearTransfers();
    this.ctx = undefined;
    this.rxq = undefined;
    this.txq = undefined;
    this.rxChains = [];
    this.txChain = undefined;
    this.broken = false;
    // No guest to take checksum-less or GSO frames any more.
    if (this.offloads) {
      try {
        this.tap.setOffload(0);
      } catch {
        // the TAP may be gone; nothing to undo then
      }
    }
  }

  // ---- RX: TAP -> guest ----

  /** Move frames from the TAP into the RX ring until the TAP is empty, buffers run out, or a batch is done. */
  private receive(): void {
    const q = this.rxq;
    const ctx = this.ctx;
    if (q === undefined || ctx === undefined || this.broken) return;
    try {
      for (let done = 0; ; ) {
        if (this.rxLen === 0) {
          if (done >= NET_RX_BATCH || this.tapGone) break;
          if (this.rxHeld === 0 && q.pending() === 0) {
            // No buffers: leave frames in the TAP (the kernel queues or drops them there)
            // and ask for a kick when the guest posts some.
            if (!q.enableNotification()) break;
            continue;
          }
          if (!this.readFrame(q)) break;
          if (this.rxLen === 0) continue; // dropped a runt; look at the next
        }
        if (!this.placeFrame(q)) {
          if (!this.rxWaiting) {
            this.rxWaiting = true;
            this.stats.rxWaits++;
          }
          if (q.enableNotification()) continue; // buffers arrived meanwhile
          break;
        }
        done++;
      }
    } catch (e) {
      if (q.needsNotification()) ctx.signalUsed(NET_RX_QUEUE);
      this.fail(e);
      return;
    }
    if (q.needsNotification()) ctx.signalUsed(NET_RX_QUEUE);
  }

  /**
   * Read one frame from the TAP: in place into the chains held (one is popped first when
   * none is), the overflow into rxBuf; or all into rxBuf. False when the TAP has none.
   */
  private readFrame(q: Virtqueue): boolean {
    let n: number;
    try {
      if (this.direct) {
        if (this.rxHeld === 0 && !this.holdChain(q)) return false;
        const iov = this.rxIov;
        iov.clear();
        let fits = true;
        for (let i = 0; i < this.rxHeld && fits; i++) fits = this.rxChains[i]!.appendIovecs(iov, true);
        // One entry stays for rxBuf.
        if (!fits || iov.count > NET_MAX_IOV) {
          // Too scattered to read in place: into rxBuf, then copied.
          this.rxDirect = 0;
          n = this.tap.read(this.rxBuf);
        } else {
          iov.push(this.rxBufAddress, this.rxBuf.length);
          n = this.tap.readv!(iov.bytes, iov.count);
          this.rxDirect = Math.min(n, this.rxCapacity);
        }
      } else {
        this.rxDirect = 0;
        n = this.tap.read(this.rxBuf);
      }
    } catch (e) {
      if (e instanceof NetChainError || e instanceof VirtqueueError) throw e;
      this.tapGone = true;
      this.note(`virtio-net: reading TAP ${this.tap.name} failed: ${(e as Error).message}; no longer reading it`);
      return false;
    }
    if (n === 0) return false;
    if (n < this.hdrSize || n - this.rxDirect > this.rxBuf.length) {
      this.stats.rxDropped++;
      this.note(`virtio-net: TAP ${this.tap.name} gave a ${n}-byte frame; dropped`);
      return true; // look for the next one; held chains stay held
    }
    this.rxLen = n;
    return true;
  }

  /** Pop the next RX chain into the held list, checked; false when the ring is empty. */
  private holdChain(q: Virtqueue): boolean {
    const c = this.rxChains[this.rxHeld] ?? (this.rxChains[this.rxHeld] = new DescriptorChain(this.ctx!.memory));
    if (q.pop(c) === undefined) return false;
    if (c.readableBytes !== 0) throw new NetChainError(`RX chain (head ${c.head}) has device-readable buffers`);
    if (c.writableBytes < this.hdrSize) {
      throw new NetChainError(`RX chain (head ${c.head}) has ${c.writableBytes} writable bytes, less than the ${this.hdrSize}-byte header`);
    }
    this.rxHeld++;
    this.rxCapacity += c.writableBytes;
    return true;
  }

  /**
   * Put the frame into the guest's RX buffers: hold chains until they can take it, copy
   * what is in rxBuf, fix the header (flags, num_buffers), return the chains. False when
   * the guest has too few buffers for now (the chains held so far are kept for later).
   */
  private placeFrame(q: Virtqueue): boolean {
    const len = this.rxLen;
    while (this.rxCapacity < len) {
      if (this.rxHeld > 0 && !this.mergeable) {
        // One chain per frame without MRG_RXBUF, and this one is too small: the guest
        // broke 5.1.6.3.1 (or the TAP's MTU is above what it expects). Drop the frame,
        // keep the chain for the next.
        this.dropRxFrame(`a ${len - this.hdrSize}-byte frame does not fit the guest's ${this.rxCapacity - this.hdrSize}-byte RX buffer (no MRG_RXBUF)`);
        return true;
      }
      if (this.rxHeld >= q.size) {
        // Every descriptor the guest can have outstanding is held, and the frame still does not fit.
        this.dropRxFrame(`a ${len - this.hdrSize}-byte frame does not fit in ${q.size} RX buffers`);
        return true;
      }
      if (!this.holdChain(q)) return false;
    }
    // The chains this frame uses: all, unless some were held ahead of it.
    let used = 0;
    for (let cap = 0; cap < len; used++) cap += this.rxChains[used]!.writableBytes;
    const direct = this.rxDirect;
    const buf = this.rxBuf;
    // The header is in rxBuf (copied below) or already in the first chain.
    if (direct === 0) {
      if (!this.guestCsum) buf[NetHdr.FLAGS] = 0;
      if (this.hdrSize === NetHdr.MRG_SIZE) {
        buf[NetHdr.NUM_BUFFERS] = used & 0xff;
        buf[NetHdr.NUM_BUFFERS + 1] = used >>> 8;
      }
    } else {
      const first = this.rxChains[0]!;
      // Without GUEST_CSUM the device must hand over flags 0 (section 5.1.6.4.1); the TAP
      // may say DATA_VALID. (It gives no partial checksums or GSO: offloads are off then.)
      if (!this.guestCsum) first.setWritableByte(NetHdr.FLAGS, 0);
      if (this.hdrSize === NetHdr.MRG_SIZE) {
        first.setWritableByte(NetHdr.NUM_BUFFERS, used & 0xff);
        first.setWritableByte(NetHdr.NUM_BUFFERS + 1, used >>> 8);
      }
    }
    let at = 0; // stream offset of the chain's first byte
    for (let i = 0; i < used; i++) {
      const c = this.rxChains[i]!;
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
      this.rxCapacity -= c.writableBytes;
    }
    if (used < this.rxHeld) {
      // Move the chains still held to the front, the returned ones' objects to the back.
      const rest = this.rxChains.splice(0, used);
      this.rxChains.push(...rest);
    }
    this.rxHeld -= used;
    this.stats.rxFrames++;
    this.stats.rxBytes += len;
    this.rxLen = 0;
    this.rxDirect = 0;
    this.rxWaiting = false;
    return true;
  }

  /** Drop the frame, keeping the chains held for it for the next (they were not returned). */
  private dropRxFrame(why: string): void {
    this.stats.rxDropped++;
    this.note(`virtio-net: dropped a received frame: ${why}`);
    this.rxLen = 0;
    this.rxDirect = 0;
    this.rxWaiting = false;
    // Writers may have moved: the next frame fills the chains from their start.
    for (let i = 0; i < this.rxHeld; i++) this.rxChains[i]!.rewind();
  }

  // ---- TX: guest -> TAP ----

  /** Drain the TX ring into the TAP (after a blocked frame, if any, went out). */
  private transmit(): void {
    const q = this.txq;
    const ctx = this.ctx;
    const chain = this.txChain;
    if (q === undefined || ctx === undefined || chain === undefined || this.broken) return;
    try {
      if (this.txPendingLen > 0) {
        if (!this.sendFrame(this.txPendingHead, this.txPendingLen, this.txPendingIov, q)) return;
        this.txPendingLen = 0;
      }
      do {
        q.disableNotification();
        for (let c = q.pop(chain); c !== undefined; c = q.pop(chain)) {
          if (c.writableBytes !== 0) throw new NetChainError(`TX chain (head ${c.head}) has device-writable buffers`);
          const len = c.readableBytes;
          if (len < this.hdrSize) {
            throw new NetChainError(`TX chain (head ${c.head}) has ${len} readable bytes, less than the ${this.hdrSize}-byte header`);
          }
          // In place (writev from guest memory) when possible, else copied into txBuf.
          this.txIov.clear();
          let iovs = this.direct && c.appendIovecs(this.txIov, false) ? this.txIov.count : -1;
          if (iovs < 0) {
            if (len > this.txBuf.length) {
              this.stats.txDropped++;
              this.note(`virtio-net: dropped a ${len}-byte TX frame: larger than ${this.txBuf.length} bytes`);
              q.addUsed(c.head, 0);
              continue;
            }
            c.reader.readInto(len === this.txBuf.length ? this.txBuf : this.txBuf.subarray(0, len));
            iovs = 0;
          }
          if (!this.sendFrame(c.head, len, iovs, q)) {
            // Would block: keep it (already off the ring, still the device's) for POLLOUT, in order.
            this.txPendingLen = len;
            this.txPendingHead = c.head;
            this.txPendingIov = iovs;
            this.stats.txRetries++;
            if (q.needsNotification()) ctx.signalUsed(NET_TX_QUEUE);
            return;
          }
        }
        if (q.needsNotification()) ctx.signalUsed(NET_TX_QUEUE);
      } while (q.enableNotification());
    } catch (e) {
      if (q.needsNotification()) ctx.signalUsed(NET_TX_QUEUE);
      this.fail(e);
    }
  }

  /**
   * Write a frame to the TAP (the first `iovs` iov entries, or txBuf[0, len) when 0) and
   * return its chain; false (nothing done) when the write would block.
   */
  private sendFrame(head: number, len: number, iovs: number, q: Virtqueue): boolean {
    try {
      const n = iovs > 0 ? this.tap.writev!(this.txIov.bytes, iovs) : this.tap.write(this.txBuf, len);
      if (n === 0) return false;
      this.stats.txFrames++;
      this.stats.txBytes += len;
    } catch (e) {
      // The TAP refused this frame (a bad header, the link down, the TAP gone): drop it.
      this.stats.txDropped++;
      this.note(`virtio-net: TAP ${this.tap.name} refused a ${len}-byte frame: ${(e as Error).message}`);
    }
    q.addUsed(head, 0);
    return true;
  }

  // ---- common ----

  private setOffload(flags: number): void {
    if (!this.offloads) return;
    try {
      this.tap.setOffload(flags);
    } catch (e) {
      // Accepted at the probe; if not now, the kernel just sends plain frames.
      this.note(`virtio-net: TUNSETOFFLOAD ${flags} on ${this.tap.name} failed: ${(e as Error).message}`);
      this.tap.setOffload(0);
    }
  }

  private fail(e: unknown): void {
    this.broken = true;
    const reason = e instanceof VirtqueueError || e instanceof NetChainError ? `virtio-net: ${e.message}` : `virtio-net: ${(e as Error)?.message ?? String(e)}`;
    this.log(reason);
    this.ctx?.needsReset(reason);
  }

  /** Log a line, at most LOG_LIMIT times per device (a guest can cause these at line rate). */
  private note(line: string): void {
    if (this.logged >= LOG_LIMIT) return;
    this.logged++;
    this.log(this.logged === LOG_LIMIT ? `${line} (further messages suppressed)` : line);
  }
}

/** Does the TAP take every offload we could offer? Leaves offloads off either way. */
export function probeOffloads(tap: TapLike): boolean {
  let ok: boolean;
  try {
    tap.setOffload(ALL_TUN_OFFLOADS);
    ok = true;
  } catch {
    ok = false;
  }
  try {
    tap.setOffload(0);
  } catch {
    // nothing to undo
  }
  return ok;
}
