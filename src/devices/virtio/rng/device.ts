/**
 * virtio-rng (virtio 1.2 section 5.4): the entropy device. One request queue, no feature
 * bits, no configuration space. The driver posts device-writable buffers; the device fills
 * each with random bytes from its EntropySource and returns it with the count written.
 * It makes no system call: the bytes come from the source, which the I/O worker gives it.
 *
 * A guest chooses the buffer sizes, so each chain is served at most MAX_BYTES_PER_REQUEST
 * (the used length tells the driver how many; Linux asks for far less), which bounds the
 * work one kick can cause to a queue's worth of that.
 */
import { type VirtioActivation, type VirtioDevice, type VirtioDeviceDescription, VirtioDeviceType } from "../types";
import { DescriptorChain, Virtqueue, type VirtqueueState } from "../queue";
import { failureReason, serveQueue } from "../serve";
import type { EntropySource } from "./backend";

export const RNG_QUEUE_SIZE = 256;
/** Most bytes one request gets. */
export const MAX_BYTES_PER_REQUEST = 64 * 1024;

/** The device's identity: type 4, one queue, no features, no configuration space. */
export function rngDescription(): VirtioDeviceDescription {
  return Object.freeze({ deviceType: VirtioDeviceType.ENTROPY, queueCount: 1, maxQueueSize: RNG_QUEUE_SIZE, deviceFeatures: 0n, config: new Uint8Array(0) });
}

/** Counters, for tests and statistics. */
export interface RngStats {
  requests: number;
  bytes: number;
}

export class VirtioRng implements VirtioDevice {
  readonly deviceType: number;
  readonly queueCount: number;
  readonly maxQueueSize: number;
  readonly deviceFeatures: bigint;
  readonly config: Uint8Array;
  readonly stats: RngStats = { requests: 0, bytes: 0 };

  private readonly log: (line: string) => void;
  private ctx: VirtioActivation | undefined;
  private queue: Virtqueue | undefined;
  private chain: DescriptorChain | undefined;
  private broken = false;

  constructor(
    private readonly source: EntropySource,
    options: { log?: (line: string) => void } = {},
  ) {
    const d = rngDescription();
    this.deviceType = d.deviceType;
    this.queueCount = d.queueCount;
    this.maxQueueSize = d.maxQueueSize;
    this.deviceFeatures = d.deviceFeatures;
    this.config = d.config;
    this.log = options.log ?? (() => {});
  }

  activate(ctx: VirtioActivation): void {
    this.ctx = ctx;
    this.broken = false;
    const q = ctx.queues[0];
    if (q === undefined || !q.ready) return; // nothing to serve; kicks are ignored
    try {
      this.queue = Virtqueue.create(ctx.memory, q, ctx.features, ctx.queueStates?.[0]);
      if (this.chain?.memory !== ctx.memory) this.chain = new DescriptorChain(ctx.memory);
    } catch (e) {
      this.fail(e);
    }
  }

  queueNotified(index: number): void {
    const q = this.queue;
    const ctx = this.ctx;
    const chain = this.chain;
    if (index !== 0 || q === undefined || ctx === undefined || chain === undefined || this.broken) return;
    try {
      serveQueue(q, () => ctx.signalUsed(0), () => {
        while (q.pop(chain) !== undefined) {
          this.stats.requests++;
          if (chain.readableBytes > 0 || chain.writableBytes === 0) {
            throw new Error(`request (head ${chain.head}) has ${chain.readableBytes > 0 ? "a device-readable buffer" : "no device-writable buffer"}`);
          }
          const written = this.fill(chain);
          this.stats.bytes += written;
          q.addUsed(chain.head, written);
        }
      });
    } catch (e) {
      // What was served got its interrupt; the device waits for a reset.
      this.fail(e);
    }
  }

  /** Requests complete within a kick: nothing is ever in flight. */
  quiesce(): void {}

  queueStates(): (VirtqueueState | undefined)[] {
    return [this.queue?.state()];
  }

  reset(): void {
    this.queue = undefined;
    this.ctx = undefined;
    this.broken = false;
  }

  /** Random bytes straight into the chain's buffers, up to the per-request bound. */
  private fill(chain: DescriptorChain): number {
    const w = chain.writer;
    let written = 0;
    for (let s = w.nextSlice(MAX_BYTES_PER_REQUEST); s !== undefined; s = w.nextSlice(MAX_BYTES_PER_REQUEST - written)) {
      const n = this.source.fill(s);
      written += n;
      if (n < s.length) break; // the source has no more right now: the driver gets what there is
    }
    return written;
  }

  private fail(e: unknown): void {
    this.broken = true;
    const reason = failureReason("virtio-rng", e);
    this.log(reason);
    this.ctx?.needsReset(reason);
  }
}
