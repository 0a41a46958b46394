/**
 * virtio-fs's back end (devices/virtio/fs/backend.ts) as a vhost-user connection to
 * virtiofsd, run in the I/O worker. The main thread started virtiofsd and negotiated
 * (host/virtiofsd.ts); this side hands it guest RAM (SET_MEM_TABLE, once), starts and stops
 * the queues the guest driver sets up, and notices when virtiofsd has gone.
 *
 * Descriptors it uses but does not own (the connection, the memfd, the kick and call
 * eventfds) stay open until the main thread closes them, after this thread has ended.
 */
import * as sys from "../../sys/libc";
import type { GuestMemory, SharedMemory } from "../../memory/guest-memory";
import type { QueueConfig } from "../../devices/virtio/types";
import type { FsBackend } from "../../devices/virtio/fs/backend";
import { VhostUserChannel } from "./channel";
import { type BackendInfo, VhostUserFrontend } from "./frontend";

/** Everything the I/O worker needs to talk to one virtiofsd. Plain data (postMessage). */
export interface VhostUserFsSpec {
  /** For messages: "virtiofsd for /home/me/tree". */
  name: string;
  /** The connected vhost-user socket (the handshake is done). */
  connFd: number;
  backend: BackendInfo;
  /** Guest RAM's memfd and where guest memory lies in it. */
  memory: SharedMemory;
  /** Per queue: the eventfd virtiofsd answers on. */
  callFds: number[];
}

/** Whoever routes the call eventfds to the guest's interrupts (board/: irqfd + GSI routes). */
export interface CallRouter {
  /** Per queue: true when its call eventfd now raises the interrupt by itself. */
  route(): boolean[];
  unroute(): void;
}

export class VhostUserFsBackend implements FsBackend {
  readonly name: string;
  readonly kickFds: readonly number[];
  readonly callFds: readonly number[];
  readonly watchFd: number;
  private readonly frontend: VhostUserFrontend;
  private gone = false;
  private memTableSent = false;

  /** `kickFds`: per queue, the eventfd the guest's kicks arrive on (KVM ioeventfd). */
  constructor(
    private readonly spec: VhostUserFsSpec,
    kickFds: readonly number[],
    private readonly memory: GuestMemory,
    private readonly router: CallRouter,
    opts: { timeoutMs?: number } = {},
  ) {
    this.name = spec.name;
    this.kickFds = kickFds;
    this.callFds = spec.callFds;
    this.watchFd = spec.connFd;
    const channel = new VhostUserChannel(spec.connFd, { peer: spec.name, ...(opts.timeoutMs !== undefined ? { timeoutMs: opts.timeoutMs } : {}) });
    this.frontend = VhostUserFrontend.resume(channel, spec.backend);
  }

  start(features: bigint, queues: readonly QueueConfig[], bases: readonly (number | undefined)[] = []): void {
    if (this.gone) throw new Error(`${this.name} has gone`);
    try {
      if (!this.memTableSent) {
        this.frontend.setMemTable(
          this.spec.memory.stretches.map((s) => ({
            guestAddress: BigInt(s.guestAddress),
            size: BigInt(s.size),
            userAddress: s.hostAddress,
            mmapOffset: BigInt(s.fileOffset),
            fd: this.spec.memory.fd,
          })),
        );
        this.memTableSent = true;
      }
      this.frontend.start(
        features,
        queues.map((q) => ({
          index: q.index,
          size: q.size,
          descAddress: this.hostAddress(q.descAddr, 16 * q.size, q.index, "descriptor table"),
          availAddress: this.hostAddress(q.availAddr, 6 + 2 * q.size, q.index, "available ring"),
          usedAddress: this.hostAddress(q.usedAddr, 6 + 8 * q.size, q.index, "used ring"),
          base: bases[q.index] ?? 0,
          kickFd: this.kickFds[q.index]!,
          callFd: this.callFds[q.index]!,
        })),
      );
    } catch (e) {
      // Never leave it running some of the queues: the device model takes them all over.
      try {
        this.frontend.stop();
      } catch {
        // Gone already.
      }
      this.noteGone();
      throw e;
    }
  }

  stop(): void {
    if (this.gone || this.frontend.runningQueues.length === 0) return;
    try {
      this.frontend.reset();
    } catch {
      // Gone, or unable to answer: either way it serves the queues no more.
      this.noteGone();
    }
  }

  suspend(): ReadonlyMap<number, number> | undefined {
    if (this.isGone()) return undefined;
    try {
      return this.frontend.stop();
    } catch {
      // Gone, or unable to answer: it serves the queues no more either way.
      this.gone = true;
      return undefined;
    }
  }

  isGone(): boolean {
    this.noteGone();
    return this.gone;
  }

  clearEvent(fd: number): void {
    sys.drainEventfd(fd);
  }

  routeInterrupts(): readonly boolean[] {
    return this.router.route();
  }

  unrouteInterrupts(): void {
    this.router.unroute();
  }

  private noteGone(): void {
    if (!this.gone && this.frontend.channel.peerGone()) this.gone = true;
  }

  /** The ring at guest address `gpa` as a host address virtiofsd can translate; checked to be in RAM. */
  private hostAddress(gpa: number, length: number, queue: number, what: string): bigint {
    const m = this.memory;
    const r = m.regionOf(gpa);
    if (r < 0 || !m.contains(gpa, length)) {
      throw new Error(`queue ${queue}'s ${what} at 0x${gpa.toString(16)} is outside guest RAM`);
    }
    return BigInt(m.regionHosts[r]!) + BigInt(gpa - m.regionBases[r]!);
  }
}
