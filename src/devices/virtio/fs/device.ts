/**
 * virtio-fs (virtio 1.2 section 5.11): the device model. Its queues (one hiprio queue for
 * FORGET and INTERRUPT, one request queue) are served by another process, virtiofsd, which
 * speaks FUSE with the guest kernel through them (backend.ts); guest-parsed file system
 * data never enters tskvm. The model starts the back end when the driver sets DRIVER_OK,
 * stops it on reset, relays the back end's notifications where the transport cannot take
 * them directly (INTx, masked vectors), and keeps the device alive when the back end dies:
 *
 * When virtiofsd is gone, the model takes the queues over and answers every request, the
 * ones virtiofsd had taken and never answered included, with EIO: the guest sees I/O
 * errors on the share instead of requests that wait forever. virtiofsd answers each
 * queue's requests in the order they were made available (docs/virtiofs.md), so the
 * unanswered ones are exactly those after the used ring's index.
 */
import type { VirtqueueState } from "../queue";
import { IoReady, type VirtioActivation, type VirtioDevice, type VirtioDeviceDescription, VirtioDeviceType, type QueueConfig } from "../types";
import { DescriptorChain, Virtqueue, VirtqueueError } from "../queue";
import { FUSE_IN_HEADER_SIZE, FUSE_OUT_HEADER_SIZE, decodeInHeader, encodeOutHeader, expectsReply } from "./fuse";
import type { FsBackend } from "./backend";

/** Offsets in struct virtio_fs_config (section 5.11.4). */
export const FsConfig = {
  /** The tag: UTF-8, NUL-padded, not NUL-terminated when it fills all 36 bytes. */
  TAG: 0,
  TAG_BYTES: 36,
  /** le32 */
  NUM_REQUEST_QUEUES: 36,
  SIZE: 40,
} as const;

/** Queue 0 is the hiprio queue; the request queues follow (virtiofsd serves one). */
export const FS_HIPRIO_QUEUE = 0;
export const FS_REQUEST_QUEUES = 1;
/** virtiofsd's (libvhost-user's) largest queue. */
export const FS_QUEUE_SIZE = 1024;

/** What the guest sees as the errno of every request once the back end has gone. */
export const BACKEND_GONE_ERRNO = 5; // EIO

/** The device's identity for a share tagged `tag`, with the back end's device feature bits. */
export function fsDescription(share: { tag: string; backendFeatures: bigint }): VirtioDeviceDescription {
  const tag = new TextEncoder().encode(share.tag);
  if (tag.byteLength === 0 || tag.byteLength > FsConfig.TAG_BYTES) {
    throw new RangeError(`virtio-fs tag "${share.tag}" must be 1 to ${FsConfig.TAG_BYTES} bytes`);
  }
  const config = new Uint8Array(FsConfig.SIZE);
  config.set(tag, FsConfig.TAG);
  new DataView(config.buffer).setUint32(FsConfig.NUM_REQUEST_QUEUES, FS_REQUEST_QUEUES, true);
  return {
    deviceType: VirtioDeviceType.FS,
    queueCount: 1 + FS_REQUEST_QUEUES,
    maxQueueSize: FS_QUEUE_SIZE,
    // Device-specific bits only (0-23); the transport offers the ring features itself, and
    // the back end was checked to support them when it started.
    deviceFeatures: share.backendFeatures & 0xff_ffffn,
    config,
    // virtio-fs has no legacy interface (virtio 1.2, 5.11).
    modernOnly: true,
  };
}

type State =
  | { kind: "idle" }
  /** The back end runs the queues; `direct[q]`: its notifications reach the driver without us. */
  | { kind: "running"; ctx: VirtioActivation; direct: readonly boolean[] }
  /** Paused (quiesce): the back end stopped the queues at `bases` (its next available index, by queue). */
  | { kind: "suspended"; ctx: VirtioActivation; direct: readonly boolean[]; bases: ReadonlyMap<number, number> }
  /** The back end is gone: the model answers every request with an error. */
  | { kind: "failed"; ctx: VirtioActivation; queues: (Virtqueue | undefined)[] };

export class VirtioFs implements VirtioDevice {
  readonly deviceType: number;
  readonly queueCount: number;
  readonly maxQueueSize: number;
  readonly deviceFeatures: bigint;
  readonly config: Uint8Array;
  readonly modernOnly = true;
  private state: State = { kind: "idle" };
  private chain: DescriptorChain | undefined;
  private readonly header = new Uint8Array(FUSE_IN_HEADER_SIZE);
  private readonly reply = new Uint8Array(FUSE_OUT_HEADER_SIZE);
  private readonly log: (line: string) => void;

  constructor(
    private readonly backend: FsBackend,
    opts: { tag: string; backendFeatures: bigint; log?: (line: string) => void },
  ) {
    const d = fsDescription(opts);
    this.deviceType = d.deviceType;
    this.queueCount = d.queueCount;
    this.maxQueueSize = d.maxQueueSize;
    this.deviceFeatures = d.deviceFeatures;
    this.config = d.config;
    this.log = opts.log ?? (() => undefined);
  }

  /** "running", "suspended" (paused), "failed" (the back end is gone, requests get EIO) or "idle". */
  get mode(): State["kind"] {
    return this.state.kind;
  }

  /**
   * Has the driver ever made a request available (any queue's avail.idx moved)? A Linux
   * guest probes the device at boot but sends FUSE_INIT only when it mounts the share; until
   * then the FUSE session's state is nowhere, so a snapshot can be taken (issue 14).
   */
  requestsMade(): boolean {
    if (this.state.kind === "idle") return false;
    const { memory, queues } = this.state.ctx;
    return queues.some((q) => q.ready && memory.contains(q.availAddr, 4) && memory.readU16(q.availAddr + 2) !== 0);
  }

  activate(ctx: VirtioActivation): void {
    if (this.backend.isGone()) {
      this.takeOver(ctx);
      return;
    }
    try {
      // A restored device goes on from the saved positions (0 for a share never used).
      const bases = ctx.queues.map((q) => ctx.queueStates?.[q.index]?.nextAvail);
      this.backend.start(ctx.features, ctx.queues.filter((q) => q.ready), bases);
      this.state = { kind: "running", ctx, direct: this.backend.routeInterrupts() };
    } catch (e) {
      this.log(`${this.backend.name} could not start the queues (${(e as Error).message}); the guest gets I/O errors on this share`);
      this.takeOver(ctx);
    }
  }

  /**
   * Pause: the back end (virtiofsd) stops the queues (GET_VRING_BASE), so it writes nothing
   * into guest RAM while the VM is paused or saved, and says how many requests it took from
   * each. resumed() starts them again from there. A back end that is gone is taken over.
   */
  quiesce(): void {
    const s = this.state;
    if (s.kind !== "running") return;
    const bases = this.backend.suspend();
    if (bases === undefined) {
      this.takeOver(s.ctx);
      return;
    }
    this.state = { kind: "suspended", ctx: s.ctx, direct: s.direct, bases };
  }

  /**
   * After quiesce(): while suspended, each started queue at the back end's next available
   * index (virtiofsd answers in order and has finished what it took before it answers
   * GET_VRING_BASE, so the used index is the same); taken over, the model's own positions.
   * A snapshot may be taken only while every one is 0: the guest never made a request, so
   * the FUSE session (which lives in virtiofsd) has not begun (vmm/machine.ts).
   */
  queueStates(): (VirtqueueState | undefined)[] {
    const s = this.state;
    if (s.kind === "failed") return s.queues.map((q) => q?.state());
    if (s.kind !== "suspended") return [];
    return s.ctx.queues.map((q) => {
      const base = s.bases.get(q.index);
      return base === undefined ? undefined : { nextAvail: base, nextUsed: base, signalled: -1, usedFlags: 0 };
    });
  }

  resumed(): void {
    const s = this.state;
    if (s.kind !== "suspended") return;
    try {
      this.backend.start(s.ctx.features, s.ctx.queues.filter((q) => q.ready), s.ctx.queues.map((q) => s.bases.get(q.index)));
      this.state = { kind: "running", ctx: s.ctx, direct: s.direct };
    } catch (e) {
      this.log(`${this.backend.name} could not start the queues again after a pause (${(e as Error).message}); the guest gets I/O errors on this share`);
      this.takeOver(s.ctx);
    }
  }

  transportChanged(): void {
    if (this.state.kind !== "running") return;
    this.state = { ...this.state, direct: this.backend.routeInterrupts() };
  }

  pollFds(): readonly { fd: number; events: number }[] {
    const readable = IoReady.READABLE;
    const s = this.state;
    if (s.kind === "running") {
      const out = [{ fd: this.backend.watchFd, events: readable }];
      this.backend.callFds.forEach((fd, q) => {
        if (s.direct[q] !== true) out.push({ fd, events: readable });
      });
      return out;
    }
    if (s.kind === "failed") return this.backend.kickFds.map((fd) => ({ fd, events: readable }));
    return [];
  }

  pollReady(fd: number, _revents: number): void {
    const s = this.state;
    if (s.kind === "running") {
      if (fd === this.backend.watchFd) {
        // The back end only ever answers requests: anything else on its connection (an
        // unasked message, a hang-up) means it is gone or broken. Reading on would spin.
        if (!this.backend.isGone()) this.log(`${this.backend.name} sent a message it was not asked for; the guest gets I/O errors on this share`);
        this.takeOver(s.ctx);
        return;
      }
      const q = this.backend.callFds.indexOf(fd);
      if (q < 0) return;
      // Relayed: the transport raises what the driver set up (INTx with ISR, or a masked
      // vector's pending bit).
      this.backend.clearEvent(fd);
      s.ctx.signalUsed(q);
      return;
    }
    if (s.kind === "failed") {
      const q = this.backend.kickFds.indexOf(fd);
      if (q < 0) return;
      this.backend.clearEvent(fd);
      this.answerWithErrors(q);
    }
  }

  queueNotified(index: number): void {
    // A kick the I/O worker saw itself: only while the model serves the queues.
    if (this.state.kind === "failed") this.answerWithErrors(index);
  }

  reset(): void {
    if (this.state.kind === "running" || this.state.kind === "suspended") {
      this.backend.unrouteInterrupts();
      this.backend.stop();
    }
    this.state = { kind: "idle" };
  }

  /** The back end is gone: answer what it left unanswered and everything from now on. */
  private takeOver(ctx: VirtioActivation): void {
    this.backend.unrouteInterrupts();
    const queues = ctx.queues.map((config: QueueConfig) => {
      if (!config.ready) return undefined;
      try {
        return Virtqueue.takeOver(ctx.memory, config, ctx.features);
      } catch (e) {
        if (!(e instanceof VirtqueueError)) throw e;
        ctx.needsReset(e.message);
        return undefined;
      }
    });
    this.state = { kind: "failed", ctx, queues };
    for (let q = 0; q < queues.length; q++) this.answerWithErrors(q);
  }

  /**
   * Pop every request on queue `q` and answer it: FORGET and INTERRUPT (no reply expected)
   * with nothing, anything else with a FUSE reply header carrying -EIO.
   */
  private answerWithErrors(q: number): void {
    const s = this.state;
    if (s.kind !== "failed") return;
    const queue = s.queues[q];
    if (queue === undefined) return;
    const chain = this.chainFor(s.ctx);
    try {
      // Drain, then ask for the next kick (avail_event, or the NO_NOTIFY flag): the dead
      // back end may have left either saying "don't kick"; if more came meanwhile, drain again.
      do {
        queue.disableNotification();
        while (queue.pop(chain) !== undefined) {
          let written = 0;
          chain.reader.reset();
          if (q !== FS_HIPRIO_QUEUE && chain.reader.readInto(this.header) === FUSE_IN_HEADER_SIZE) {
            const h = decodeInHeader(this.header);
            if (expectsReply(h.opcode)) {
              encodeOutHeader({ len: FUSE_OUT_HEADER_SIZE, error: -BACKEND_GONE_ERRNO, unique: h.unique }, this.reply);
              chain.writer.reset();
              written = chain.writer.write(this.reply);
            }
          }
          queue.addUsed(chain.head, written);
        }
      } while (queue.enableNotification());
    } catch (e) {
      if (!(e instanceof VirtqueueError)) throw e;
      s.queues[q] = undefined;
      s.ctx.needsReset(e.message);
      return;
    }
    if (queue.needsNotification()) s.ctx.signalUsed(q);
  }

  private chainFor(ctx: VirtioActivation): DescriptorChain {
    if (this.chain === undefined || this.chain.memory !== ctx.memory) this.chain = new DescriptorChain(ctx.memory);
    return this.chain;
  }
}
