/**
 * The main thread's handle on one vCPU worker: start it, learn its thread id, stop it
 * promptly (immediate_exit plus a signal, because a worker blocked in KVM_RUN never sees a
 * message), and get back why it stopped.
 */
import type { Worker } from "node:worker_threads";
import { performance } from "node:perf_hooks";
import { startWorker } from "../sys/threads";
import { join } from "node:path";
import { constants } from "node:os";
import { pthreadKill } from "../sys/libc";
import type { Vcpu, VcpuHandle } from "../kvm/vcpu";
import type { RegionDescriptor } from "../memory/guest-memory";
import type { DeviceSetSpec } from "../board/devices";
import { RunControlCell, type ExitCounters, type VcpuStop } from "./exit-loop";
import type { ExitStatsData } from "./exit-stats";

export interface VcpuWorkerInit {
  vcpu: VcpuHandle;
  memory: RegionDescriptor[];
  devices: DeviceSetSpec;
  control: Int32Array;
  /** Answers to halt probes, one cell per vCPU (see ExitLoop.probeHaltIfAsked). */
  haltStatus: Int32Array;
  vmFd: number;
  consoleFd: number;
  /** KVM keeps some guest writes in its coalesced ring (COM1's THR): replay it before each exit. */
  coalescing?: boolean;
  /** The I/O worker's control eventfd, when the machine has virtio devices. */
  ioControlFd?: number;
}

/**
 * Heap limits of a vCPU worker's V8 isolate. Without them V8 sizes each worker's heap for
 * the whole machine's memory and lets start-up garbage stay; with a cap it collects early.
 * Measured (8 vCPUs spinning, guest RAM excluded): 141 MiB without, 119 MiB with. A vCPU
 * worker's heap holds the device models' objects (their state is in SharedArrayBuffers)
 * and stays under 10 MiB; running out would end the VM with a clear error, not hang it.
 */
export const VCPU_WORKER_LIMITS = { maxOldGenerationSizeMb: 32, maxYoungGenerationSizeMb: 2 } as const;

export type VcpuWorkerMessage =
  | { type: "started"; id: number; thread: bigint; at: number; loadedAt: number }
  | { type: "registers"; id: number; dump: string }
  | { type: "warning"; message: string }
  | { type: "stopped"; id: number; stop: VcpuStop; counters: ExitCounters; exits: ExitStatsData };

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
  /** Exits by reason, port and address (undefined when the thread died without reporting). */
  exits?: ExitStatsData;
}

/** A vCPU worker started before its vCPU exists; see prestartVcpuWorker. */
export interface PrestartedWorker {
  readonly worker: Worker;
  /** Given to a VcpuThread (which then owns its errors and exit). */
  claimed: boolean;
}

/**
 * Start a vCPU worker thread now, before the machine is built: starting a thread and
 * loading its modules costs about as much as building the machine (50 ms here, a second
 * in an emulated VM), so the two overlap and the boot vCPU enters KVM_RUN sooner. It waits
 * for its init message (VcpuThread.start). Terminate it if it is never claimed.
 */
export function prestartVcpuWorker(): PrestartedWorker {
  const early = earlyWorker;
  earlyWorker = undefined;
  if (early !== undefined) {
    early.worker.ref();
    return early;
  }
  return startIdleWorker();
}

/** A vCPU worker waiting for its init message. */
function startIdleWorker(): PrestartedWorker {
  const worker = startWorker(join(__dirname, "worker.js"), { resourceLimits: VCPU_WORKER_LIMITS });
  // Until claimed, a failure to start is reported when it is (the thread's 'exit').
  worker.on("error", () => undefined);
  return { worker, claimed: false };
}

let earlyWorker: PrestartedWorker | undefined;

/**
 * Start the next machine's boot vCPU worker now, before the rest of tskvm has even loaded
 * (bin/tskvm does, for the commands that start a VM). A thread needs Node's own bootstrap
 * and tskvm's code, which in an emulated VM takes longer than loading the CLI and building
 * the machine together (~2 s there, 50 ms on a plain host): started this early it is
 * ready sooner. It does not keep the process alive until a machine takes it
 * (prestartVcpuWorker), and a process that ends without one simply ends it.
 */
export function prestartEarlyVcpuWorker(): void {
  if (earlyWorker !== undefined) return;
  earlyWorker = startIdleWorker();
  earlyWorker.worker.unref();
}

export class VcpuThread {
  private thread: bigint | undefined;
  readonly done: Promise<VcpuThreadResult>;
  private resolveDone!: (r: VcpuThreadResult) => void;
  /** Resolves when the worker is about to enter KVM_RUN for the first time. */
  readonly started: Promise<void>;
  /** When that was, in ms since this process started (performance.now() time); NaN before. */
  firstRunAt = NaN;
  /** When the thread had loaded its code, on the same clock; NaN before it reported. */
  loadedAt = NaN;
  private resolveStarted!: () => void;
  private finished = false;
  /** Called with the first stop this vCPU reports (the machine then stops the others). */
  onStop: ((r: VcpuThreadResult) => void) | undefined;
  /** Called with the vCPU's register dump, when asked for one (RunControlCell.DUMP). */
  onRegisterDump: ((dump: string) => void) | undefined;
  /** Called with a device's one-line warning (a KVM call a guest access triggered failed). */
  onWarning: ((message: string) => void) | undefined;

  constructor(readonly vcpu: Vcpu, private readonly init: VcpuWorkerInit) {
    this.done = new Promise((resolve) => {
      this.resolveDone = resolve;
    });
    this.started = new Promise((resolve) => {
      this.resolveStarted = resolve;
    });
  }

  /**
   * Run the vCPU: in `worker` when one was started ahead (prestartVcpuWorker: it has loaded
   * its modules while the machine was built and takes its init as a message), else in a
   * new one.
   */
  start(prestarted?: PrestartedWorker): void {
    let worker: Worker;
    if (prestarted !== undefined) {
      worker = prestarted.worker;
      prestarted.claimed = true;
      worker.postMessage({ type: "init", init: this.init });
    } else {
      worker = startWorker(join(__dirname, "worker.js"), { workerData: this.init, resourceLimits: VCPU_WORKER_LIMITS });
    }
    let result: VcpuThreadResult | undefined;
    worker.on("message", (msg: VcpuWorkerMessage) => {
      if (msg.type === "started") {
        this.thread = msg.thread;
        this.firstRunAt = msg.at - performance.timeOrigin;
        this.loadedAt = msg.loadedAt - performance.timeOrigin;
        this.resolveStarted();
        // A stop or pause may have been requested before the thread id was known.
        const c = this.init.control;
        if (Atomics.load(c, RunControlCell.STOP) !== 0 || Atomics.load(c, RunControlCell.PAUSE) !== 0) this.kick();
      } else if (msg.type === "registers") {
        this.onRegisterDump?.(msg.dump);
      } else if (msg.type === "warning") {
        this.onWarning?.(msg.message);
      } else {
        result = { id: msg.id, stop: msg.stop, counters: msg.counters, exits: msg.exits };
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
