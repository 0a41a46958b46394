/**
 * Virtio 1.x vocabulary shared by the transport (register side, run in vCPU threads) and
 * the device models (queue side, run in the I/O worker). Numbers from the virtio 1.2
 * specification.
 */
import type { GuestMemory } from "../../memory/guest-memory";
import type { VirtqueueState } from "./queue";

export const VirtioDeviceType = { NET: 1, BLOCK: 2, ENTROPY: 4, FS: 26 } as const;

/** Device status bits (spec 2.1). */
export const VirtioStatus = {
  ACKNOWLEDGE: 1,
  DRIVER: 2,
  DRIVER_OK: 4,
  FEATURES_OK: 8,
  DEVICE_NEEDS_RESET: 0x40,
  FAILED: 0x80,
} as const;

/** Transport feature bits (spec 6), as bit numbers. */
export const VirtioFeatureBit = {
  RING_INDIRECT_DESC: 28,
  RING_EVENT_IDX: 29,
  VERSION_1: 32,
} as const;

export const feature = (bit: number): bigint => 1n << BigInt(bit);

/** ISR status bits (spec 4.1.4.5). */
export const VirtioIsr = { QUEUE: 1, CONFIG: 2 } as const;

/** "No MSI-X vector" (spec 4.1.5.1.2). */
export const VIRTIO_MSI_NO_VECTOR = 0xffff;

/** A queue as the driver configured it: what the I/O side needs to use it. */
export interface QueueConfig {
  readonly index: number;
  readonly size: number;
  readonly ready: boolean;
  readonly descAddr: number;
  readonly availAddr: number;
  readonly usedAddr: number;
}

/**
 * What a virtio device is, fixed when it is made and known without its back end: all the
 * transport needs (the device ID, queues, features offered, initial configuration space).
 * Each device model has a function that computes it from the device's spec.
 */
export interface VirtioDeviceDescription {
  readonly deviceType: number;
  readonly queueCount: number;
  readonly maxQueueSize: number;
  /** Device-specific feature bits offered (the transport adds VERSION_1, EVENT_IDX, INDIRECT). */
  readonly deviceFeatures: bigint;
  /** Initial contents of the device-specific configuration space. */
  readonly config: Uint8Array;
  /**
   * No legacy (virtio 0.9) interface: device ID 0x1040 + type, revision 1, no legacy I/O
   * BAR. For device types the legacy interface never had (virtio-fs).
   */
  readonly modernOnly?: boolean;
}

/**
 * A virtio device model: the queue side of a device, run by the thread that serves its
 * queues (the I/O worker). VirtioDeviceRunner activates it when the driver sets
 * DRIVER_OK and resets it when the driver writes status 0. A model makes no system call:
 * it reaches the host through the back end interface it declares (blk/backend.ts,
 * net/backend.ts).
 */
export interface VirtioDevice extends VirtioDeviceDescription {
  activate(ctx: VirtioActivation): void;
  /** The driver kicked queue `index` (an ioeventfd fired). */
  queueNotified(index: number): void;
  /** Drop all queue state (driver reset or VM stop); flush what must reach the host. */
  reset(): void;
  /**
   * Host file descriptors the I/O worker should poll for this device (a TAP, say), each with
   * the readiness wanted right now (IoReady bits; 0: not now, e.g. no guest RX buffers).
   * Asked again before every poll.
   */
  pollFds?(): readonly { fd: number; events: number }[];
  /** One of pollFds() is ready with `revents` (IoReady bits). */
  pollReady?(fd: number, revents: number): void;
  /**
   * Snapshots: finish or give back everything in flight, so that the queues' positions and
   * guest RAM are the device's whole state: every completed request on the used ring (and
   * its interrupt sent), every chain popped and not used given back (Virtqueue.unpop), a
   * half-received frame dropped. The device stays active; the runner kicks every queue
   * when the VM goes on, so what was given back is served again.
   */
  quiesce(): void;
  /** After quiesce(): each queue's positions, undefined for a queue not in use. */
  queueStates(): (VirtqueueState | undefined)[];
  /**
   * The VM goes on after quiesce() (before the runner serves every queue): for a device whose
   * queues another process serves (vhost-user), which quiesce() stopped.
   */
  resumed?(): void;
  /**
   * While active: the driver changed the transport's interrupt setup (MSI-X table, masks,
   * vector assignments). For a device whose back end raises interrupts itself (vhost-user).
   */
  transportChanged?(): void;
}

/**
 * Readiness of a polled fd, as pollFds/pollReady speak it. The values are poll(2)'s
 * POLLIN/POLLOUT/POLLERR/POLLHUP/POLLRDHUP (a socket's peer closed), so the I/O worker passes them through unchanged
 * (io/io-worker.ts checks that they agree).
 */
export const IoReady = { READABLE: 0x001, WRITABLE: 0x004, ERROR: 0x008, HANGUP: 0x010, PEER_CLOSED: 0x2000 } as const;

export interface VirtioActivation {
  memory: GuestMemory;
  /** Features the driver accepted. */
  features: bigint;
  queues: readonly QueueConfig[];
  /** Tell the driver that queue `index` has used buffers (interrupt, subject to suppression). */
  signalUsed(index: number): void;
  /** The device found the driver's data broken: set DEVICE_NEEDS_RESET, tell the driver. */
  needsReset(reason: string): void;
  /**
   * A restored device's queue positions (from queueStates() at the snapshot), by queue:
   * each queue goes on from there instead of from a reset.
   */
  queueStates?: readonly (VirtqueueState | undefined)[];
  /**
   * Change bytes of the device-specific configuration space (a network link going down)
   * and send the driver a configuration change interrupt. Absent in tests that need none.
   */
  updateConfig?(offset: number, bytes: Uint8Array): void;
}
