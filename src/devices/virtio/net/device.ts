/**
 * virtio-net (virtio 1.2 section 5.1): the device model. Queue 0 receives (rx.ts), queue 1
 * transmits (tx.ts); no control queue, one queue pair. It reaches the network only
 * through a NetBackend (backend.ts): a TAP (src/host/tap.ts), later other back ends.
 *
 * Every frame on either side starts with a struct virtio_net_hdr (header.ts): 10 bytes,
 * or 12 with num_buffers when VIRTIO_F_VERSION_1 or VIRTIO_NET_F_MRG_RXBUF is negotiated.
 * The back end speaks the same header, so the device tells it the negotiated size and
 * which offloads the guest accepts (from GUEST_*), and then passes headers through: TX
 * unchanged, RX with num_buffers filled in. docs/net.md has the whole story.
 */
import { createHash } from "node:crypto";
import {
  IoReady,
  type VirtioActivation,
  type VirtioDevice,
  type VirtioDeviceDescription,
  VirtioDeviceType,
  VirtioFeatureBit,
  feature,
} from "../types";
import { Virtqueue, VirtqueueError, type VirtqueueState } from "../queue";
import { NetOffload, probeOffloads, type NetBackend } from "./backend";
import { NetChainError, NetHdr, type NetLink, type NetStats } from "./header";
import { NetRx } from "./rx";
import { NetTx } from "./tx";

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

export const NET_QUEUE_SIZE = 256;
export const NET_RX_QUEUE = 0;
export const NET_TX_QUEUE = 1;

/** Offloads the guest may be offered when the back end takes them, and the back end's flag for each. */
const GUEST_OFFLOADS: readonly [bit: number, offload: number][] = [
  [VirtioNetFeature.GUEST_CSUM, NetOffload.CSUM],
  [VirtioNetFeature.GUEST_TSO4, NetOffload.TSO4],
  [VirtioNetFeature.GUEST_TSO6, NetOffload.TSO6],
  [VirtioNetFeature.GUEST_ECN, NetOffload.TSO_ECN],
];
const OFFLOAD_FEATURES =
  feature(VirtioNetFeature.CSUM) |
  feature(VirtioNetFeature.GUEST_CSUM) |
  feature(VirtioNetFeature.HOST_TSO4) |
  feature(VirtioNetFeature.HOST_TSO6) |
  feature(VirtioNetFeature.HOST_ECN) |
  feature(VirtioNetFeature.GUEST_TSO4) |
  feature(VirtioNetFeature.GUEST_TSO6) |
  feature(VirtioNetFeature.GUEST_ECN);

/** 52:54:00 (a locally administered unicast prefix) + 3 bytes of a hash of `seed`. */
export function defaultMac(seed: string): Uint8Array {
  const h = createHash("sha256").update(`tskvm-net:${seed}`).digest();
  return Uint8Array.of(0x52, 0x54, 0x00, h[0]!, h[1]!, h[2]!);
}

/** What a virtio-net description depends on. */
export interface NetIdentity {
  /** The guest's MAC, 6 bytes. */
  readonly mac: Uint8Array;
  /** Offer VIRTIO_NET_F_MTU with this MTU (68 to 65535). */
  readonly mtu?: number;
  /** The back end takes every offload (probeOffloads): offer checksum and TSO offloads. */
  readonly offloads: boolean;
  /**
   * Without offloads: every frame the back end hands over has complete, correct checksums
   * (passt builds its frames itself). Offer GUEST_CSUM alone, and the guest need not check
   * them (DATA_VALID).
   */
  readonly validChecksums?: boolean;
}

/** The device's identity, features and configuration space (no back end needed). */
export function netDescription(id: NetIdentity): VirtioDeviceDescription {
  if (id.mac.length !== 6) throw new RangeError(`virtio-net: a MAC address has 6 bytes, not ${id.mac.length}`);
  if (id.mtu !== undefined && (!Number.isInteger(id.mtu) || id.mtu < 68 || id.mtu > 65535)) {
    throw new RangeError(`virtio-net: MTU ${id.mtu} is not an integer from 68 to 65535`);
  }
  let f = feature(VirtioNetFeature.MAC) | feature(VirtioNetFeature.STATUS) | feature(VirtioNetFeature.MRG_RXBUF);
  if (id.offloads) f |= OFFLOAD_FEATURES;
  else if (id.validChecksums === true) f |= feature(VirtioNetFeature.GUEST_CSUM);
  if (id.mtu !== undefined) f |= feature(VirtioNetFeature.MTU);
  const c = new Uint8Array(NetConfig.SIZE);
  const v = new DataView(c.buffer);
  c.set(id.mac, NetConfig.MAC);
  v.setUint16(NetConfig.STATUS, VIRTIO_NET_S_LINK_UP, true);
  v.setUint16(NetConfig.MAX_VIRTQUEUE_PAIRS, 1, true);
  if (id.mtu !== undefined) v.setUint16(NetConfig.MTU, id.mtu, true);
  return Object.freeze({ deviceType: VirtioDeviceType.NET, queueCount: 2, maxQueueSize: NET_QUEUE_SIZE, deviceFeatures: f, config: c });
}

export interface VirtioNetOptions {
  /** The guest's MAC (6 bytes); default defaultMac(backend.name). */
  mac?: Uint8Array;
  /** Offer VIRTIO_NET_F_MTU with this MTU (68 to 65535). */
  mtu?: number;
  /**
   * Whether the back end takes the offloads (probeOffloads): probed when omitted. Pass
   * what another thread probed to skip the probe.
   */
  offloads?: boolean;
  /** The back end's frames have valid checksums (NetIdentity.validChecksums); default from the back end. */
  validChecksums?: boolean;
  /** Where to report what the guest did wrong or what failed on the host (one line each). */
  log?: (line: string) => void;
}

export type { NetStats } from "./header";

const NO_FDS: readonly { fd: number; events: number }[] = [];
const LOG_LIMIT = 10;

export class VirtioNet implements VirtioDevice, NetLink {
  readonly deviceType: number;
  readonly queueCount: number;
  readonly maxQueueSize: number;
  readonly deviceFeatures: bigint;
  readonly config: Uint8Array;
  readonly mac: Uint8Array;
  /** Whether the back end takes the offloads, so they are offered. */
  readonly offloads: boolean;
  /** Without offloads: GUEST_CSUM is offered, and the back end marks frames DATA_VALID when the guest takes it. */
  readonly validChecksums: boolean;
  readonly stats: NetStats = { rxFrames: 0, rxBytes: 0, rxDropped: 0, rxWaits: 0, txFrames: 0, txBytes: 0, txDropped: 0, txRetries: 0 };

  private readonly log: (line: string) => void;
  private logged = 0;
  private ctx: VirtioActivation | undefined;
  private broken = false;
  /**
   * The back end failed for good (it reported an error on poll, a read failed, passt
   * died): no longer polled or written, and the link is down (config status), for the rest
   * of the device's life: a driver reset does not bring a lost back end back.
   */
  private backendFailed = false;
  private hdrSize: number = NetHdr.MRG_SIZE;
  private readonly rx: NetRx;
  private readonly tx: NetTx;
  private readonly signalRx = () => this.ctx?.signalUsed(NET_RX_QUEUE);
  private readonly signalTx = () => this.ctx?.signalUsed(NET_TX_QUEUE);

  private readonly pollEntry = { fd: -1, events: 0 };
  private readonly pollList: readonly { fd: number; events: number }[] = [this.pollEntry];

  constructor(
    readonly backend: NetBackend,
    options: VirtioNetOptions = {},
  ) {
    this.log = options.log ?? (() => {});
    this.pollEntry.fd = backend.fd;
    this.mac = Uint8Array.from(options.mac ?? defaultMac(backend.name));
    this.offloads = options.offloads ?? probeOffloads(backend);
    this.validChecksums = !this.offloads && (options.validChecksums ?? backend.validChecksums === true);
    const d = netDescription({
      mac: this.mac,
      offloads: this.offloads,
      validChecksums: this.validChecksums,
      ...(options.mtu !== undefined ? { mtu: options.mtu } : {}),
    });
    this.deviceType = d.deviceType;
    this.queueCount = d.queueCount;
    this.maxQueueSize = d.maxQueueSize;
    this.deviceFeatures = d.deviceFeatures;
    this.config = d.config;
    this.rx = new NetRx(backend, this);
    this.tx = new NetTx(backend, this);
  }

  /** Header size in use: 12 with VERSION_1 or MRG_RXBUF, else 10. */
  get vnetHeaderSize(): number {
    return this.hdrSize;
  }

  /** NetLink: the back end failed for good. */
  get gone(): boolean {
    return this.backendFailed;
  }

  activate(ctx: VirtioActivation): void {
    this.ctx = ctx;
    this.broken = false;
    // Lost while no driver ran: tell this one.
    if (this.backendFailed) ctx.updateConfig?.(NetConfig.STATUS, this.config.subarray(NetConfig.STATUS, NetConfig.STATUS + 2));
    const has = (bit: number): boolean => (ctx.features & feature(bit)) !== 0n;
    const mergeable = has(VirtioNetFeature.MRG_RXBUF);
    const guestCsum = has(VirtioNetFeature.GUEST_CSUM);
    this.hdrSize = has(VirtioFeatureBit.VERSION_1) || mergeable ? NetHdr.MRG_SIZE : NetHdr.SIZE;
    const backend = this.backend;
    const settings = {
      hdrSize: this.hdrSize,
      mergeable,
      guestCsum,
      directRx: backend.readv !== undefined && ctx.memory.hasHostAddresses,
      directTx: backend.writev !== undefined && ctx.memory.hasHostAddresses,
      guestGso: this.offloads && guestCsum && (has(VirtioNetFeature.GUEST_TSO4) || has(VirtioNetFeature.GUEST_TSO6) || has(VirtioNetFeature.GUEST_UFO)),
    };
    try {
      backend.setVnetHeaderSize(this.hdrSize);
      let offloads = 0;
      // TSO without checksum offload is meaningless (and a TAP refuses it).
      if (this.offloads && guestCsum) for (const [bit, flag] of GUEST_OFFLOADS) if (has(bit)) offloads |= flag;
      // Checksums only: the back end says DATA_VALID on what it hands over.
      if (this.validChecksums && guestCsum) offloads = NetOffload.CSUM;
      this.setOffload(offloads);
    } catch (e) {
      this.fail(e);
      return;
    }
    const rx = ctx.queues[NET_RX_QUEUE];
    const tx = ctx.queues[NET_TX_QUEUE];
    let rxq: Virtqueue | undefined;
    let txq: Virtqueue | undefined;
    try {
      if (rx !== undefined && rx.ready) rxq = Virtqueue.create(ctx.memory, rx, ctx.features, ctx.queueStates?.[NET_RX_QUEUE]);
      if (tx !== undefined && tx.ready) txq = Virtqueue.create(ctx.memory, tx, ctx.features, ctx.queueStates?.[NET_TX_QUEUE]);
    } catch (e) {
      this.fail(e);
      return;
    }
    this.rx.activate(rxq, ctx.memory, settings);
    this.tx.activate(txq, ctx.memory, settings, this.signalTx);
    // Frames the driver queued before DRIVER_OK (it kicked before we listened).
    if (this.tx.hasPending()) this.transmit();
  }

  queueNotified(index: number): void {
    if (this.ctx === undefined || this.broken) return;
    if (index === NET_RX_QUEUE) this.receive();
    else if (index === NET_TX_QUEUE) this.transmit();
  }

  pollFds(): readonly { fd: number; events: number }[] {
    if (this.ctx === undefined || this.broken || this.backendFailed) return NO_FDS;
    let events = this.backend.peerMayClose === true ? IoReady.PEER_CLOSED : 0;
    if (this.rx.wantsInput()) events |= IoReady.READABLE;
    if (this.tx.blocked()) events |= IoReady.WRITABLE;
    if (events === 0) return NO_FDS;
    this.pollEntry.events = events;
    return this.pollList;
  }

  pollReady(fd: number, revents: number): void {
    if (fd !== this.backend.fd || this.ctx === undefined || this.broken) return;
    if ((revents & (IoReady.ERROR | IoReady.HANGUP)) !== 0 && (revents & (IoReady.READABLE | IoReady.WRITABLE)) === 0) {
      this.backendGone(`${this.backend.name} reports an error (deleted?)`);
      return;
    }
    if ((revents & IoReady.WRITABLE) !== 0) this.transmit();
    if ((revents & IoReady.READABLE) !== 0) {
      this.backend.polledReadable?.();
      this.receive();
    }
    // The peer went away. While reading, receive() takes what it sent first and then finds
    // the end; otherwise nothing will read it: the back end is lost now.
    if ((revents & IoReady.PEER_CLOSED) !== 0 && !this.rx.wantsInput()) this.backendGone(`${this.backend.name} closed the connection`);
  }

  quiesce(): void {
    this.rx.quiesce();
    this.tx.quiesce();
  }

  queueStates(): (VirtqueueState | undefined)[] {
    return [this.rx.queueState(), this.tx.queueState()];
  }

  reset(): void {
    this.rx.reset();
    this.tx.reset();
    this.ctx = undefined;
    this.broken = false;
    // No guest to take checksum-less or GSO frames any more.
    if (this.offloads || this.validChecksums) {
      try {
        this.backend.setOffload(0);
      } catch {
        // the back end may be gone; nothing to undo then
      }
    }
  }

  /** NetLink: stop using the back end, and tell the driver the link is down (VIRTIO_NET_S_LINK_UP cleared). */
  backendGone(why: string): void {
    if (this.backendFailed) return;
    this.backendFailed = true;
    this.config[NetConfig.STATUS] = 0;
    this.config[NetConfig.STATUS + 1] = 0;
    this.ctx?.updateConfig?.(NetConfig.STATUS, this.config.subarray(NetConfig.STATUS, NetConfig.STATUS + 2));
    if (this.backend.reportsOwnLoss !== true) this.note(`virtio-net: ${why}; no longer using it, the link is down`);
  }

  /** NetLink: log a line, at most LOG_LIMIT times per device (a guest can cause these at line rate). */
  note(line: string): void {
    if (this.logged >= LOG_LIMIT) return;
    this.logged++;
    this.log(this.logged === LOG_LIMIT ? `${line} (further messages suppressed)` : line);
  }

  private receive(): void {
    if (this.ctx === undefined || this.broken) return;
    try {
      this.rx.receive();
    } catch (e) {
      if (this.rx.needsNotification()) this.signalRx();
      this.fail(e);
      return;
    }
    if (this.rx.needsNotification()) this.signalRx();
  }

  private transmit(): void {
    if (this.ctx === undefined || this.broken) return;
    try {
      this.tx.transmit();
    } catch (e) {
      if (this.tx.needsNotification()) this.signalTx();
      this.fail(e);
    }
  }

  private setOffload(flags: number): void {
    if (!this.offloads && !this.validChecksums) return;
    try {
      this.backend.setOffload(flags);
    } catch (e) {
      // Accepted at the probe; if not now, the back end just sends plain frames.
      this.note(`virtio-net: setting offloads ${flags} on ${this.backend.name} failed: ${(e as Error).message}`);
      this.backend.setOffload(0);
    }
  }

  private fail(e: unknown): void {
    this.broken = true;
    const reason = e instanceof VirtqueueError || e instanceof NetChainError ? `virtio-net: ${e.message}` : `virtio-net: ${(e as Error)?.message ?? String(e)}`;
    this.log(reason);
    this.ctx?.needsReset(reason);
  }
}
