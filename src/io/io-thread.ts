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

export const IoControlCell = { STOP: 0, COUNT: 1 } as const;

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
}

/** From the worker: a device's warning (a line for the user), or why the worker died. */
export type IoWorkerMessage = { type: "warning"; message: string } | { type: "failed"; message: string };

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
      else this.failure = m.message;
    });
    worker.on("error", (e) => {
      this.failure = e.message;
    });
    worker.on("exit", () => this.resolveDone());
  }

  /** Wake the worker to re-read device state (a driver set DRIVER_OK or reset). */
  poke(): void {
    sys.signalEventfd(this.init.controlFd);
  }

  /** Stop the worker after its back ends have flushed; resolves when it has exited. */
  stop(): Promise<void> {
    Atomics.store(this.init.control, IoControlCell.STOP, 1);
    if (this.worker !== undefined) this.poke();
    else this.resolveDone();
    return this.done;
  }
}
