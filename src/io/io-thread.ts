/**
 * The I/O worker: one thread that serves the virtio queues, owning the device models and
 * their host back ends (disk image files, TAPs). It sleeps in poll(2) on the queue-kick
 * eventfds (which KVM signals through ioeventfd without any exit to user space), the INTx
 * resample eventfds, the back ends' fds and a control eventfd, and does the device work
 * off the vCPU threads.
 *
 * This module is the main thread's handle; io-worker.ts is the thread itself.
 */
import type { Worker } from "node:worker_threads";
import { startWorker } from "../sys/threads";
import { join } from "node:path";
import * as sys from "../sys/libc";
import type { RegionDescriptor } from "../memory/guest-memory";
import type { VirtioFunctionSpec } from "../board/virtio-devices";
import type { VirtqueueState } from "../devices/virtio/queue";

/**
 * Cells of the I/O worker's control SharedArrayBuffer. STOP: flush and exit. PAUSE: serve
 * what is signalled, quiesce every device, report their queue positions ("parked") and
 * sleep until PAUSE is cleared (Atomics.notify on the cell).
 */
export const IoControlCell = { STOP: 0, PAUSE: 1, COUNT: 2 } as const;

export function createIoControl(): Int32Array {
  return new Int32Array(new SharedArrayBuffer(4 * IoControlCell.COUNT));
}

export interface IoWorkerInit {
  memory: RegionDescriptor[];
  vmFd: number;
  /** eventfd: written by any thread that wants the worker to look at its control cells / devices. */
  controlFd: number;
  control: Int32Array;
  devices: VirtioFunctionSpec[];
  /** A restored VM: each function's queue positions at the snapshot (by function). */
  restoredQueues?: readonly (QueueStates | undefined)[];
}

/** One device's queue positions, by queue (undefined: queue not in use). */
export type QueueStates = (VirtqueueState | undefined)[];

/**
 * From the worker: a device's warning (a line for the user), why the worker died, or that
 * it parked for a pause with every device quiesced (their queue positions by function;
 * undefined for a device its driver has not started).
 */
export type IoWorkerMessage =
  | { type: "warning"; message: string }
  | { type: "failed"; message: string }
  | { type: "parked"; queues: (QueueStates | undefined)[] };

export class IoThread {
  private worker: Worker | undefined;
  /** Resolves when the worker has exited (after flushing its back ends, on stop()). */
  readonly done: Promise<void>;
  private resolveDone!: () => void;
  /** Set when the worker died of an error (its message). */
  failure: string | undefined;
  /** Where device warnings go; the machine passes them on. */
  onWarning: (message: string) => void = () => undefined;

  constructor(private readonly init: IoWorkerInit) {
    this.done = new Promise((r) => {
      this.resolveDone = r;
    });
  }

  start(): void {
    const worker = startWorker(join(__dirname, "io-worker.js"), { workerData: this.init });
    this.worker = worker;
    worker.on("message", (m: IoWorkerMessage) => {
      if (m.type === "warning") this.onWarning(m.message);
      else if (m.type === "parked") this.parked?.(m.queues);
      else this.failure = m.message;
    });
    worker.on("error", (e) => {
      this.failure = e.message;
    });
    worker.on("exit", () => {
      this.exited = true;
      this.parked?.(undefined);
      this.resolveDone();
    });
  }

  private parked: ((queues: (QueueStates | undefined)[] | undefined) => void) | undefined;
  private exited = false;

  /**
   * Park the worker: it serves what is already signalled, quiesces every device (no request
   * in flight; everything completed on the used rings, its interrupt sent) and sleeps.
   * Resolves with every device's queue positions, or undefined when the worker is gone.
   */
  pause(): Promise<(QueueStates | undefined)[] | undefined> {
    if (this.worker === undefined || this.exited) return Promise.resolve(undefined);
    const answer = new Promise<(QueueStates | undefined)[] | undefined>((resolve) => {
      this.parked = (queues) => {
        this.parked = undefined;
        resolve(queues);
      };
    });
    Atomics.store(this.init.control, IoControlCell.PAUSE, 1);
    this.poke();
    return answer;
  }

  /** Wake a parked worker; it serves every queue again (chains given back wait there). */
  resume(): void {
    Atomics.store(this.init.control, IoControlCell.PAUSE, 0);
    Atomics.notify(this.init.control, IoControlCell.PAUSE);
  }

  /** Wake the worker to re-read device state (a driver set DRIVER_OK or reset). */
  poke(): void {
    sys.signalEventfd(this.init.controlFd);
  }

  /** Stop the worker after its back ends have flushed; resolves when it has exited. */
  stop(): Promise<void> {
    Atomics.store(this.init.control, IoControlCell.STOP, 1);
    // A parked worker sleeps on the PAUSE cell.
    Atomics.notify(this.init.control, IoControlCell.PAUSE);
    if (this.worker !== undefined) this.poke();
    else this.resolveDone();
    return this.done;
  }
}
