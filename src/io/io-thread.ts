/**
 * The I/O worker: one thread that owns the device back ends (disk image files, later TAP
 * devices). It sleeps in poll(2) on the queue-kick eventfds (which KVM signals through
 * ioeventfd without any exit to user space), the INTx resample eventfds and a control
 * eventfd, and does the device work off the vCPU threads.
 *
 * This module is the main thread's handle; io-worker.ts is the thread itself.
 */
import { Worker } from "node:worker_threads";
import { join } from "node:path";
import * as sys from "../sys/libc";
import type { RegionDescriptor } from "../memory/guest-memory";
import type { IoDeviceSpec } from "../board/virtio-devices";

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
  devices: IoDeviceSpec[];
}

export type IoWorkerMessage =
  | { type: "warning"; message: string }
  | { type: "stopped" }
  | { type: "failed"; message: string };

export class IoThread {
  private worker: Worker | undefined;
  readonly done: Promise<void>;
  private resolveDone!: () => void;
  /** Set when the worker died of an error (its message). */
  failure: string | undefined;
  onWarning: (message: string) => void = (m) => process.stderr.write(`tskvm: ${m}\n`);

  constructor(private readonly init: IoWorkerInit) {
    this.done = new Promise((r) => {
      this.resolveDone = r;
    });
  }

  start(): void {
    const worker = new Worker(join(__dirname, "io-worker.js"), { workerData: this.init });
    this.worker = worker;
    worker.on("message", (m: IoWorkerMessage) => {
      if (m.type === "warning") this.onWarning(m.message);
      else if (m.type === "failed") this.failure = m.message;
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
