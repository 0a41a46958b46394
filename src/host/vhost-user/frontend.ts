/**
 * The vhost-user front end: tskvm's side of the conversation with a device back end in
 * another process (virtiofsd). It negotiates features, hands over guest RAM (descriptors of
 * the memfd behind it) and the virtqueues (sizes, ring addresses, the kick eventfd KVM
 * signals on a guest notify and the call eventfd that raises the guest interrupt), and
 * takes the queues back with GET_VRING_BASE when the guest resets the device or the VM stops.
 *
 * Synchronous: every request waits for its reply (or, with REPLY_ACK, its acknowledgement)
 * within the channel's deadline, so the caller knows the back end has taken each step
 * before the guest can observe it.
 */
import { VhostUserChannel, closeQuietly } from "./channel";
import {
  FLAG_NEED_REPLY,
  MAX_MEM_REGIONS,
  type MemoryRegion,
  ProtocolFeature,
  Request,
  VHOST_USER_F_PROTOCOL_FEATURES,
  VhostUserError,
  VRING_NOFD,
  bit,
  decodeU64,
  decodeVringState,
  encodeMemTable,
  encodeU64,
  encodeVringAddr,
  encodeVringState,
  requestName,
} from "./protocol";

/** Protocol features tskvm uses when the back end offers them. */
export const WANTED_PROTOCOL_FEATURES =
  bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.RESET_DEVICE);

export interface BackendInfo {
  /** The virtio feature bits the back end offers (GET_FEATURES), vhost-only bits included. */
  features: bigint;
  /** Protocol features in force: the back end's offer AND WANTED_PROTOCOL_FEATURES. */
  protocolFeatures: bigint;
  /** How many queues the back end serves (GET_QUEUE_NUM), when it supports MQ. */
  queueCount: number | undefined;
}

/** A guest RAM region for SET_MEM_TABLE, with the descriptor of the file it lives in. */
export interface SharedRegion extends MemoryRegion {
  fd: number;
}

/** One virtqueue as the back end must run it. Addresses are host (front-end) addresses. */
export interface VringSetup {
  index: number;
  size: number;
  descAddress: bigint;
  availAddress: bigint;
  usedAddress: bigint;
  /** The available-ring index to start from (0 for a fresh queue). */
  base: number;
  /** eventfd the guest's notifications arrive on (KVM ioeventfd). */
  kickFd: number;
  /** eventfd the back end writes when it has used buffers (irqfd, or a relay). */
  callFd: number;
}

export class VhostUserFrontend {
  private info: BackendInfo | undefined;
  private started: number[] = [];

  constructor(readonly channel: VhostUserChannel) {}

  /**
   * A front end over a connection whose handshake another thread already did (the main
   * thread negotiates, then the I/O worker runs the queues): same socket, same results.
   */
  static resume(channel: VhostUserChannel, info: BackendInfo): VhostUserFrontend {
    const f = new VhostUserFrontend(channel);
    f.info = { ...info };
    return f;
  }

  get backend(): BackendInfo {
    if (this.info === undefined) throw new Error("vhost-user handshake has not run");
    return this.info;
  }

  /** Queues the back end currently runs (started and not yet stopped). */
  get runningQueues(): readonly number[] {
    return this.started;
  }

  /**
   * GET_FEATURES, protocol feature negotiation, GET_QUEUE_NUM and SET_OWNER: what every
   * session starts with, before any guest exists.
   */
  handshake(): BackendInfo {
    const features = this.getU64(Request.GET_FEATURES);
    let protocolFeatures = 0n;
    if ((features & bit(VHOST_USER_F_PROTOCOL_FEATURES)) !== 0n) {
      protocolFeatures = this.getU64(Request.GET_PROTOCOL_FEATURES) & WANTED_PROTOCOL_FEATURES;
      // No NEED_REPLY here: REPLY_ACK is not in force until this message is processed.
      this.channel.send(Request.SET_PROTOCOL_FEATURES, 0, encodeU64(protocolFeatures));
    }
    this.info = { features, protocolFeatures, queueCount: undefined };
    if (this.has(ProtocolFeature.MQ)) {
      const n = this.getU64(Request.GET_QUEUE_NUM);
      if (n === 0n || n > 0xffffn) throw this.protocolError(`GET_QUEUE_NUM answered ${n}`);
      this.info.queueCount = Number(n);
    }
    this.set(Request.SET_OWNER);
    return this.info;
  }

  /** Hand over guest RAM: one descriptor per region (the same memfd may back several). */
  setMemTable(regions: readonly SharedRegion[]): void {
    if (regions.length > MAX_MEM_REGIONS) {
      throw new RangeError(`vhost-user takes at most ${MAX_MEM_REGIONS} memory regions, not ${regions.length}`);
    }
    this.set(
      Request.SET_MEM_TABLE,
      encodeMemTable(regions),
      regions.map((r) => r.fd),
    );
  }

  /**
   * Start the queues the guest driver set up: SET_FEATURES with what the driver accepted
   * (plus PROTOCOL_FEATURES when in force), then for each queue NUM, BASE, ADDR, KICK, CALL,
   * and finally SET_VRING_ENABLE on each (rings start disabled once protocol features are
   * negotiated).
   */
  start(guestFeatures: bigint, vrings: readonly VringSetup[]): void {
    const vhostBits = this.backend.features & bit(VHOST_USER_F_PROTOCOL_FEATURES);
    this.set(Request.SET_FEATURES, encodeU64(guestFeatures | vhostBits));
    for (const q of vrings) {
      this.set(Request.SET_VRING_NUM, encodeVringState({ index: q.index, num: q.size }));
      this.set(Request.SET_VRING_BASE, encodeVringState({ index: q.index, num: q.base }));
      this.set(
        Request.SET_VRING_ADDR,
        encodeVringAddr({ index: q.index, flags: 0, desc: q.descAddress, used: q.usedAddress, avail: q.availAddress, log: 0n }),
      );
      this.set(Request.SET_VRING_KICK, encodeU64(BigInt(q.index)), [q.kickFd]);
      this.set(Request.SET_VRING_CALL, encodeU64(BigInt(q.index)), [q.callFd]);
      this.started.push(q.index);
    }
    if (vhostBits !== 0n) {
      for (const q of vrings) this.set(Request.SET_VRING_ENABLE, encodeVringState({ index: q.index, num: 1 }));
    }
  }

  /** Point a running queue's interrupts at another eventfd (or at none: -1). */
  setVringCall(index: number, callFd: number): void {
    if (callFd < 0) this.set(Request.SET_VRING_CALL, encodeU64(BigInt(index) | BigInt(VRING_NOFD)));
    else this.set(Request.SET_VRING_CALL, encodeU64(BigInt(index)), [callFd]);
  }

  /**
   * Stop every running queue: disable it, then GET_VRING_BASE, which stops it for good and
   * answers the next available index the back end would have read. Returns those indices by
   * queue; they are where a later start (SET_VRING_BASE) resumes.
   */
  stop(): Map<number, number> {
    const bases = new Map<number, number>();
    const running = this.started;
    this.started = [];
    if (this.backend.features & bit(VHOST_USER_F_PROTOCOL_FEATURES)) {
      for (const index of running) this.set(Request.SET_VRING_ENABLE, encodeVringState({ index, num: 0 }));
    }
    for (const index of running) {
      this.channel.send(Request.GET_VRING_BASE, 0, encodeVringState({ index, num: 0 }));
      const state = decodeVringState(this.reply(Request.GET_VRING_BASE), "GET_VRING_BASE");
      if (state.index !== index) throw this.protocolError(`GET_VRING_BASE answered for queue ${state.index}, not ${index}`);
      if (state.num > 0xffff) throw this.protocolError(`GET_VRING_BASE answered index ${state.num}`);
      bases.set(index, state.num);
    }
    return bases;
  }

  /**
   * The guest reset the device: stop the queues and, when the back end supports it, reset
   * its device state (RESET_DEVICE). The memory table and ownership stay.
   */
  reset(): Map<number, number> {
    const bases = this.stop();
    if (this.has(ProtocolFeature.RESET_DEVICE)) this.set(Request.RESET_DEVICE);
    return bases;
  }

  close(): void {
    this.started = [];
    this.channel.close();
  }

  private has(feature: number): boolean {
    return (this.backend.protocolFeatures & bit(feature)) !== 0n;
  }

  private getU64(request: number): bigint {
    this.channel.send(request, 0);
    return decodeU64(this.reply(request), requestName(request));
  }

  /** A request without a reply of its own: acknowledged when REPLY_ACK is in force. */
  private set(request: number, payload?: Uint8Array, fds: readonly number[] = []): void {
    const ack = this.info !== undefined && this.has(ProtocolFeature.REPLY_ACK);
    this.channel.send(request, ack ? FLAG_NEED_REPLY : 0, payload, fds);
    if (!ack) return;
    const status = decodeU64(this.reply(request), `${requestName(request)} acknowledgement`);
    if (status !== 0n) {
      throw new VhostUserError("refused", `${this.channel.peer} refused ${requestName(request)} (status ${status})`);
    }
  }

  /** The payload of the reply to `request` (descriptors in a reply are not expected: closed). */
  private reply(request: number): Uint8Array {
    const m = this.channel.receiveReply(request);
    if (m.fds.length > 0) {
      closeQuietly(...m.fds);
      throw this.protocolError(`${m.fds.length} unexpected file descriptors with ${requestName(request)}`);
    }
    return m.payload;
  }

  private protocolError(what: string): VhostUserError {
    return new VhostUserError("protocol", `${this.channel.peer}: ${what}`);
  }
}
