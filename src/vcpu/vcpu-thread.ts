/**
 * The main thread's handle on one vCPU worker: start it, learn its thread id, stop it
 * promptly (immediate_exit plus a signal, because a worker blocked in KVM_RUN never sees a
 * message), and get back why it stopped.
 */
import { Worker } from "node:worker_threads";
import { join } from "node:path";
import { constants } from "node:os";
import { pthreadKill } from "../sys/libc";
import type { Vcpu, VcpuHandle } from "../kvm/vcpu";
import type { RegionDescriptor } from "../memory/guest-memory";
import type { DeviceSetSpec } from "../board/devices";
import { RunControlCell, type ExitCounters, type VcpuStop } from "./exit-loop";

export interface VcpuWorkerInit {
  vcpu: VcpuHandle;
  memory: RegionDescriptor[];
  devices: DeviceSetSpec;
  control: Int32Array;
  /** Answers to halt probes, one cell per vCPU (see ExitLoop.probeHaltIfAsked). */
  haltStatus: Int32Array;
  vmFd: number;
  consoleFd: number;
  /** The I/O worker's control eventfd, when the machine has virtio devices. */
  ioControlFd?: number;
}

export type VcpuWorkerMessage =
  | { type: "started"; id: number; thread: bigint }
  | { type: "registers"; id: number; dump: string }
  | { type: "stopped"; id: number; stop: VcpuStop; counters: ExitCounters };

/** The signal that kicks a vCPU thread out of KVM_RUN; the VMM installs a no-op handler. */
export const KICK_SIGNAL = constants.signals.SIGUSR2;
const noop = () => undefined;
let kickHandlerUsers = 0;

/** Install (or, when the last user releases it, remove) the handler that makes the kick harmless. */
export function holdKickHandler(): () => void {
  if (kickHandlerUsers++ === 0) process.on("SIGUSR2", noop);
  let released = false;
  return () => {
    if (released) return;
    released = true;
    if (--kickHandlerUsers === 0) process.off("SIGUSR2", noop);
  };
}

export interface VcpuThreadResult {
  id: number;
  stop: VcpuStop;
  counters: ExitCounters | undefined;
}

export class VcpuThread {
  private thread: bigint | undefined;
  readonly done: Promise<VcpuThreadResult>;
  private resolveDone!: (r: VcpuThreadResult) => void;
  /** Resolves when the worker is about to enter KVM_RUN for the first time. */
  readonly started: Promise<void>;
  private resolveStarted!: () => void;
  private finished = false;
  /** Called with the first stop this vCPU reports (the machine then stops the others). */
  onStop: ((r: VcpuThreadResult) => void) | undefined;
  /** Called with the vCPU's register dump, when asked for one (RunControlCell.DUMP). */
  onRegisterDump: ((dump: string) => void) | undefined;

  constructor(readonly vcpu: Vcpu, private readonly init: VcpuWorkerInit) {
    this.done = new Promise((resolve) => {
      this.resolveDone = resolve;
    });
    this.started = new Promise((resolve) => {
      this.resolveStarted = resolve;
    });
  }

  start(): void {
    const worker = new Worker(join(__dirname, "worker.js"), { workerData: this.init });
    let result: VcpuThreadResult | undefined;
    worker.on("message", (msg: VcpuWorkerMessage) => {
      if (msg.type === "started") {
        this.thread = msg.thread;
        this.resolveStarted();
        // A stop or pause may have been requested before the thread id was known.
        const c = this.init.control;
        if (Atomics.load(c, RunControlCell.STOP) !== 0 || Atomics.load(c, RunControlCell.PAUSE) !== 0) this.kick();
      } else if (msg.type === "registers") {
        this.onRegisterDump?.(msg.dump);
      } else {
        result = { id: msg.id, stop: msg.stop, counters: msg.counters };
        this.onStop?.(result);
      }
    });
    worker.on("error", (err) => {
      result ??= { id: this.vcpu.id, stop: { kind: "error", reason: `vCPU ${this.vcpu.id} thread failed: ${err.message}` }, counters: undefined };
      this.onStop?.(result);
    });
    worker.on("exit", (code) => {
      this.finished = true;
      this.resolveStarted();
      this.resolveDone(
        result ?? { id: this.vcpu.id, stop: { kind: "error", reason: `vCPU ${this.vcpu.id} thread exited (${code}) without reporting` }, counters: undefined },
      );
    });
  }

  /** Make KVM_RUN return now (or at its next entry) so the loop sees STOP. */
  kick(): void {
    if (this.finished) return;
    this.vcpu.setImmediateExit(true);
    if (this.thread !== undefined) {
      try {
        pthreadKill(this.thread, KICK_SIGNAL);
      } catch {
        // ESRCH: the thread already ended.
      }
    }
  }
}
