/**
 * What virtio-fs needs of the process that serves its queues (virtiofsd, over vhost-user:
 * src/host/vhost-user/fs-backend.ts). The queues' data path never passes through tskvm:
 * the back end reads the guest's kicks from `kickFds` (KVM signals them through
 * ioeventfd) and answers on `callFds`, which interrupt the guest directly where the
 * transport's interrupt setup allows (MSI-X through irqfd) and are relayed by the device
 * model otherwise. The device model only starts and stops the back end, relays what must
 * be relayed, and takes the queues over when the back end dies.
 */
import type { QueueConfig } from "../types";

export interface FsBackend {
  /** For messages: "virtiofsd for /home/me/tree". */
  readonly name: string;
  /** Per queue (hiprio, then request queues): the eventfd the guest's kicks arrive on. */
  readonly kickFds: readonly number[];
  /** Per queue: the eventfd the back end signals when it has answered. */
  readonly callFds: readonly number[];
  /**
   * A descriptor that becomes readable or hung up when the back end has gone (its
   * connection): poll it, then ask isGone().
   */
  readonly watchFd: number;

  /**
   * Hand the queues the driver set up to the back end (DRIVER_OK). `bases[q]`: the
   * available-ring index queue q starts from (0 when absent: a fresh queue; a saved position
   * after a pause or a restore). Throws (one line) when the back end cannot take them: it
   * is gone or refused.
   */
  start(features: bigint, queues: readonly QueueConfig[], bases?: readonly (number | undefined)[]): void;
  /**
   * Stop the queues for a pause (vhost-user GET_VRING_BASE), keeping the memory table and the
   * interrupt routes, and return per queue the next available index the back end would have
   * read: its own count of the requests it took, which guest writes to its RAM cannot
   * change. start() with those bases goes on. Undefined when the back end is gone.
   */
  suspend(): ReadonlyMap<number, number> | undefined;
  /** Take the queues back (driver reset, VM stop). Never throws: a dead back end is just stopped. */
  stop(): void;
  /** True once the back end has gone for good (connection closed). */
  isGone(): boolean;
  /** Consume the event signalled on one of kickFds or callFds (after it polled readable). */
  clearEvent(fd: number): void;

  /**
   * Let each queue's call eventfd raise its interrupt without the device model (irqfd on the
   * vector's MSI route) where the transport allows it now; returns per queue whether it
   * does. Where it does not (INTx, a masked or absent vector), the device model relays the
   * call eventfd through the transport. Called on activation and whenever the driver
   * changes the interrupt setup.
   */
  routeInterrupts(): readonly boolean[];
  /** Undo routeInterrupts (reset, or the back end died). */
  unrouteInterrupts(): void;
}
