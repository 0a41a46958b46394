/**
 * Why KVM_RUN returned, decoded from the kvm_run page: the one place that knows the page's
 * exit layout (rust-vmm's kvm-ioctls VcpuExit). The caller's exit loop is a plain switch
 * on `kind`.
 *
 * Nothing is allocated per exit: each vCPU has one object per kind, filled in place and
 * valid until its next run(). PIO data is handed out as windows into the kvm_run mapping
 * (data(i) for the i-th access of a string instruction), cached by offset and size.
 */
import { Errno } from "../sys/errors";
import { ExitReason, IoDirection, KvmRun } from "./abi";

/** IN/OUT: `count` accesses of `size` bytes at `port` (count > 1 for INS/OUTS). */
export interface PioExit {
  readonly kind: "pio";
  readonly port: number;
  readonly size: number;
  readonly count: number;
  /** OUT (the guest writes); IN otherwise: data(i) is to be filled. */
  readonly isWrite: boolean;
  /** The bytes of access `i` (0 <= i < count), inside the kvm_run page. */
  data(i: number): Uint8Array;
}

/** An MMIO access of up to 8 bytes; for a read, fill `data`. */
export interface MmioExit {
  readonly kind: "mmio";
  readonly address: number;
  readonly isWrite: boolean;
  readonly data: Uint8Array;
}

export interface SystemEventExit {
  readonly kind: "system-event";
  /** KVM_SYSTEM_EVENT_* (abi.ts SystemEvent). */
  readonly type: number;
}

export interface FailEntryExit {
  readonly kind: "fail-entry";
  readonly hardwareReason: bigint;
}

export interface InternalErrorExit {
  readonly kind: "internal-error";
  /** KVM_INTERNAL_ERROR_* (abi.ts InternalErrorSuberror). */
  readonly suberror: number;
  readonly data: readonly bigint[];
}

/** An exit reason this decoder does not handle (abi.ts exitReasonName names it). */
export interface UnknownExit {
  readonly kind: "unknown";
  readonly reason: number;
}

/** KVM_RUN itself failed with `errno` (not EINTR/EAGAIN: those are "interrupted"). */
export interface RunFailedExit {
  readonly kind: "run-failed";
  readonly errno: number;
}

export type VcpuExit =
  | PioExit
  | MmioExit
  /** KVM_RUN returned EINTR or EAGAIN: immediate_exit was set or a signal kicked the thread. */
  | { readonly kind: "interrupted" }
  /** KVM_EXIT_INTR: a signal was pending when KVM would have entered the guest. */
  | { readonly kind: "intr" }
  /** HLT, seen only without an in-kernel irqchip. */
  | { readonly kind: "hlt" }
  /** A triple fault. */
  | { readonly kind: "shutdown" }
  | SystemEventExit
  | FailEntryExit
  | InternalErrorExit
  | UnknownExit
  | RunFailedExit;

const INTERRUPTED: VcpuExit = Object.freeze({ kind: "interrupted" });
const INTR: VcpuExit = Object.freeze({ kind: "intr" });
const HLT: VcpuExit = Object.freeze({ kind: "hlt" });
const SHUTDOWN: VcpuExit = Object.freeze({ kind: "shutdown" });

/** At most this many PIO data windows are kept (string I/O makes a few per size). */
const MAX_PIO_WINDOWS = 64;

class PioExitState implements PioExit {
  readonly kind = "pio" as const;
  port = 0;
  size = 0;
  count = 0;
  isWrite = false;
  dataOffset = 0;
  private readonly windows = new Map<number, Uint8Array>();

  constructor(private readonly page: Uint8Array) {}

  data(i: number): Uint8Array {
    const offset = this.dataOffset + i * this.size;
    const key = offset * 16 + this.size;
    let w = this.windows.get(key);
    if (w === undefined) {
      // KVM places the data inside the kvm_run mapping; refuse anything that is not.
      if (offset < KvmRun.size || offset + this.size > this.page.byteLength) {
        throw new Error(`KVM reported PIO data at offset ${offset}, outside kvm_run`);
      }
      w = this.page.subarray(offset, offset + this.size);
      if (this.windows.size < MAX_PIO_WINDOWS) this.windows.set(key, w);
    }
    return w;
  }
}

class MmioExitState implements MmioExit {
  readonly kind = "mmio" as const;
  address = 0;
  isWrite = false;
  data: Uint8Array;
  /** mmio.data windows by length 0..8. */
  private readonly windows: Uint8Array[];

  constructor(page: Uint8Array) {
    this.windows = Array.from({ length: 9 }, (_, n) => page.subarray(KvmRun.mmio.data, KvmRun.mmio.data + n));
    this.data = this.windows[0]!;
  }

  setLength(len: number): void {
    this.data = this.windows[Math.min(len, 8)]!;
  }
}

/** Decodes the exits of one vCPU's kvm_run page into reused objects. */
export class VcpuExitDecoder {
  private readonly view: DataView;
  private readonly pio: PioExitState;
  private readonly mmio: MmioExitState;
  private readonly systemEvent = { kind: "system-event" as const, type: 0 };
  private readonly failEntry = { kind: "fail-entry" as const, hardwareReason: 0n };
  private readonly unknown = { kind: "unknown" as const, reason: 0 };
  private readonly runFailed = { kind: "run-failed" as const, errno: 0 };

  constructor(page: Uint8Array) {
    this.view = new DataView(page.buffer, page.byteOffset, page.byteLength);
    this.pio = new PioExitState(page);
    this.mmio = new MmioExitState(page);
  }

  /** The exit for KVM_RUN's return value `r` (negative: -errno). */
  decode(r: number): VcpuExit {
    if (r < 0) {
      if (r === -Errno.EINTR || r === -Errno.EAGAIN) return INTERRUPTED;
      this.runFailed.errno = -r;
      return this.runFailed;
    }
    const dv = this.view;
    const reason = dv.getUint32(KvmRun.exit_reason, true);
    switch (reason) {
      case ExitReason.IO: {
        const p = this.pio;
        p.isWrite = dv.getUint8(KvmRun.io.direction) === IoDirection.OUT;
        p.size = dv.getUint8(KvmRun.io.size);
        p.port = dv.getUint16(KvmRun.io.port, true);
        p.count = dv.getUint32(KvmRun.io.count, true);
        // data_offset is a u64 but always inside the kvm_run mapping: the low half is enough.
        p.dataOffset = dv.getUint32(KvmRun.io.data_offset, true);
        return p;
      }
      case ExitReason.MMIO: {
        const m = this.mmio;
        m.address = dv.getUint32(KvmRun.mmio.phys_addr, true) + dv.getUint32(KvmRun.mmio.phys_addr + 4, true) * 0x1_0000_0000;
        m.isWrite = dv.getUint8(KvmRun.mmio.is_write) !== 0;
        m.setLength(dv.getUint32(KvmRun.mmio.len, true));
        return m;
      }
      case ExitReason.INTR:
        return INTR;
      case ExitReason.HLT:
        return HLT;
      case ExitReason.SHUTDOWN:
        return SHUTDOWN;
      case ExitReason.SYSTEM_EVENT:
        this.systemEvent.type = dv.getUint32(KvmRun.system_event.type, true);
        return this.systemEvent;
      case ExitReason.FAIL_ENTRY:
        this.failEntry.hardwareReason = dv.getBigUint64(KvmRun.fail_entry.hardware_entry_failure_reason, true);
        return this.failEntry;
      case ExitReason.INTERNAL_ERROR: {
        const ndata = Math.min(dv.getUint32(KvmRun.internal.ndata, true), 16);
        const data: bigint[] = [];
        for (let i = 0; i < ndata; i++) data.push(dv.getBigUint64(KvmRun.internal.data + 8 * i, true));
        // Fatal for the vCPU: a fresh object is fine here.
        return { kind: "internal-error", suberror: dv.getUint32(KvmRun.internal.suberror, true), data };
      }
      default:
        this.unknown.reason = reason;
        return this.unknown;
    }
  }
}
