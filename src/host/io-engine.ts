/**
 * Which I/O engine the host back ends use, chosen once when a machine is built:
 *
 *   io_uring  a whole queue drain (a virtio-blk batch, a run of TAP frames) goes to the
 *             kernel in one io_uring_enter (block-uring-engine.ts, tap.ts)
 *   sync      one system call per request or frame (pread/pwrite(v), read/write(v))
 *
 * "auto" takes io_uring when this process can use it (probeIoUring: the kernel has it, the
 * kernel.io_uring_disabled sysctl and any seccomp filter allow it) and otherwise says why
 * it took sync; the reason is shown by `tskvm probe` and in verbose output.
 */
import { probeIoUring } from "../sys/io-uring";

export type IoEngineName = "io_uring" | "sync";
export type IoEngineChoice = IoEngineName | "auto";

export interface IoEngine {
  name: IoEngineName;
  /** Why sync was taken when io_uring was not asked against ("auto"); undefined otherwise. */
  fallbackReason?: string;
}

export class IoEngineError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "IoEngineError";
  }
}

export function chooseIoEngine(choice: IoEngineChoice = "auto"): IoEngine {
  if (choice === "sync") return { name: "sync" };
  const support = probeIoUring();
  if (support.available) return { name: "io_uring" };
  if (choice === "io_uring") throw new IoEngineError(`io_uring cannot be used here: ${support.reason}`);
  return { name: "sync", fallbackReason: support.reason };
}

/** "io_uring" or "sync (io_uring_setup: EPERM ...)" */
export function describeIoEngine(e: IoEngine): string {
  return e.fallbackReason === undefined ? e.name : `${e.name} (${e.fallbackReason})`;
}
