/**
 * The vCPU run loop: KVM_RUN, then handle the exit right here in the vCPU's thread
 * (handing an exit to another thread costs more than the exit itself), until the guest or
 * the VMM ends the run. Mirrors Firecracker's run_emulation()/handle_kvm_exit().
 */
import { Errno } from "../sys/errors";
import {
  ExitReason,
  InternalErrorSuberror,
  IoDirection,
  KvmRun,
  MpState,
  SystemEvent,
  exitReasonName,
} from "../kvm/abi";
import { Vcpu, formatRegisterDump } from "../kvm/vcpu";
import type { Bus } from "../devices/bus";
import type { VmControl } from "../devices/device";

const RFLAGS_IF = 1n << 9n;

/** Why a vCPU stopped running. Plain data: it travels from the worker to the main thread. */
export type VcpuStop =
  | { kind: "stopped" }
  | { kind: "reset"; reason: string }
  | { kind: "poweroff"; reason: string }
  | { kind: "halted"; reason: string }
  | { kind: "error"; reason: string; dump?: string };

/**
 * Cells of the run-control SharedArrayBuffer shared by the main thread and every vCPU.
 * STOP: set by whoever ends the VM; each vCPU checks it after every exit.
 * DUMP: a generation counter; a vCPU that sees it change prints its registers to stderr
 *       (Ctrl-A d on the console, for finding out where a guest is stuck).
 * HALT_PROBE: a generation counter; a vCPU that sees it change answers in the halt-status
 *       array whether it sits in HLT with interrupts disabled (see probeHalt).
 */
export const RunControlCell = { STOP: 0, DUMP: 1, HALT_PROBE: 2, COUNT: 3 } as const;

export function createRunControl(): Int32Array {
  return new Int32Array(new SharedArrayBuffer(4 * RunControlCell.COUNT));
}

/** One cell per vCPU: the HALT_PROBE generation at which it was found dead-halted, or 0. */
export function createHaltStatus(cpus: number): Int32Array {
  return new Int32Array(new SharedArrayBuffer(4 * cpus));
}

/** Per-vCPU exit counters, for `tskvm` statistics and benchmarks. */
export interface ExitCounters {
  pio: number;
  mmio: number;
  unclaimedPio: number;
  unclaimedMmio: number;
  other: number;
}

export class ExitLoop implements VmControl {
  private pending: VcpuStop | undefined;
  readonly counters: ExitCounters = { pio: 0, mmio: 0, unclaimedPio: 0, unclaimedMmio: 0, other: 0 };
  /** Windows into the PIO data area, by access size: allocated once, reused every exit. */
  private pioWindows = new Map<number, Uint8Array>();
  private dumpSeen = 0;
  private haltProbeSeen = 0;

  constructor(
    readonly vcpu: Vcpu,
    readonly pio: Bus,
    readonly mmio: Bus,
    readonly control: Int32Array,
    readonly haltStatus?: Int32Array,
  ) {}

  /** VmControl: a device (i8042, ...) asks to end the VM; the loop stops after this exit. */
  requestReset(reason: string): void {
    this.pending ??= { kind: "reset", reason };
  }

  requestPoweroff(reason: string): void {
    this.pending ??= { kind: "poweroff", reason };
  }

  private stopRequested(): boolean {
    return Atomics.load(this.control, RunControlCell.STOP) !== 0;
  }

  /** Run until the guest stops, a device ends the VM, or another thread sets STOP. */
  run(): VcpuStop {
    const vcpu = this.vcpu;
    for (;;) {
      if (this.pending !== undefined) return this.pending;
      if (this.stopRequested()) return { kind: "stopped" };
      const r = vcpu.runOnce();
      if (r < 0) {
        if (r === -Errno.EINTR || r === -Errno.EAGAIN) {
          this.dumpIfAsked();
          this.probeHaltIfAsked();
          continue;
        }
        return this.failure(`KVM_RUN failed: errno ${-r}`);
      }
      const stop = this.handleExit(vcpu.exitReason);
      if (stop !== undefined) return stop;
    }
  }

  private dumpIfAsked(): void {
    const gen = Atomics.load(this.control, RunControlCell.DUMP);
    if (gen === this.dumpSeen) return;
    this.dumpSeen = gen;
    this.vcpu.setImmediateExit(false);
    const dump = formatRegisterDump(this.vcpu.getRegisters(), this.vcpu.getSpecialRegisters());
    process.stderr.write(`\r\n--- vCPU ${this.vcpu.id} registers ---\r\n${dump.replace(/\n/g, "\r\n")}\r\n`);
  }

  /**
   * Is this vCPU dead-halted: in HLT with interrupts disabled (nothing but NMI or INIT can
   * wake it), or an AP that was never started? With the in-kernel irqchip such a HLT never
   * exits to us, so the main thread asks periodically; when every vCPU says yes the guest
   * has halted or powered off (Linux without ACPI ends `poweroff` exactly so).
   */
  private probeHaltIfAsked(): void {
    const gen = Atomics.load(this.control, RunControlCell.HALT_PROBE);
    if (gen === this.haltProbeSeen || this.haltStatus === undefined) return;
    this.haltProbeSeen = gen;
    this.vcpu.setImmediateExit(false);
    const state = this.vcpu.getMpState();
    const dead =
      state === MpState.UNINITIALIZED ||
      (state === MpState.HALTED && (this.vcpu.getRegisters().rflags & RFLAGS_IF) === 0n);
    Atomics.store(this.haltStatus, this.vcpu.id, dead ? gen : 0);
  }

  /** Handle one exit; undefined means "keep running". */
  handleExit(reason: number): VcpuStop | undefined {
    switch (reason) {
      case ExitReason.IO:
        this.counters.pio++;
        this.handlePio();
        return undefined;
      case ExitReason.MMIO:
        this.counters.mmio++;
        this.handleMmio();
        return undefined;
      case ExitReason.INTR:
        // A signal kicked us out; the loop checks STOP.
        return undefined;
      case ExitReason.HLT:
        // Only without an in-kernel irqchip: nothing can wake the vCPU again.
        return { kind: "halted", reason: `vCPU ${this.vcpu.id} halted with no interrupt controller to wake it` };
      case ExitReason.SHUTDOWN:
        // A triple fault: what a PC does is reset, and Linux reboots this way (reboot=t).
        return { kind: "reset", reason: `guest reset (triple fault on vCPU ${this.vcpu.id})` };
      case ExitReason.SYSTEM_EVENT:
        return this.systemEvent();
      case ExitReason.FAIL_ENTRY: {
        const hw = this.vcpu.runView.getBigUint64(KvmRun.fail_entry.hardware_entry_failure_reason, true);
        return this.failure(`KVM could not enter the guest (hardware entry failure reason 0x${hw.toString(16)})`);
      }
      case ExitReason.INTERNAL_ERROR:
        return this.failure(this.describeInternalError());
      default:
        this.counters.other++;
        return this.failure(`unhandled KVM exit: ${exitReasonName(reason)}`);
    }
  }

  private handlePio(): void {
    const dv = this.vcpu.runView;
    const direction = dv.getUint8(KvmRun.io.direction);
    const size = dv.getUint8(KvmRun.io.size);
    const port = dv.getUint16(KvmRun.io.port, true);
    const count = dv.getUint32(KvmRun.io.count, true);
    // data_offset is a u64 but always inside the kvm_run mapping: the low half is enough.
    const offset = dv.getUint32(KvmRun.io.data_offset, true);
    for (let i = 0; i < count; i++) {
      const data = this.pioWindow(offset + i * size, size);
      const claimed = direction === IoDirection.OUT ? this.pio.write(port, data) : this.pio.read(port, data);
      if (!claimed) this.counters.unclaimedPio++;
    }
  }

  private pioWindow(offset: number, size: number): Uint8Array {
    const key = offset * 16 + size;
    let w = this.pioWindows.get(key);
    if (w === undefined) {
      // KVM places the data inside the kvm_run mapping; refuse anything that is not.
      if (offset < KvmRun.size || offset + size > this.vcpu.run.byteLength) {
        throw new Error(`KVM reported PIO data at offset ${offset}, outside kvm_run`);
      }
      w = this.vcpu.run.subarray(offset, offset + size);
      if (this.pioWindows.size < 64) this.pioWindows.set(key, w);
    }
    return w;
  }

  private handleMmio(): void {
    const dv = this.vcpu.runView;
    const address = dv.getUint32(KvmRun.mmio.phys_addr, true) + dv.getUint32(KvmRun.mmio.phys_addr + 4, true) * 0x1_0000_0000;
    const len = Math.min(dv.getUint32(KvmRun.mmio.len, true), 8);
    const isWrite = dv.getUint8(KvmRun.mmio.is_write) !== 0;
    const data = this.vcpu.run.subarray(KvmRun.mmio.data, KvmRun.mmio.data + len);
    const claimed = isWrite ? this.mmio.write(address, data) : this.mmio.read(address, data);
    if (!claimed) this.counters.unclaimedMmio++;
  }

  private systemEvent(): VcpuStop {
    const type = this.vcpu.runView.getUint32(KvmRun.system_event.type, true);
    switch (type) {
      case SystemEvent.SHUTDOWN:
        return { kind: "poweroff", reason: "guest powered off" };
      case SystemEvent.RESET:
        return { kind: "reset", reason: "guest reset" };
      case SystemEvent.CRASH:
        return this.failure("guest reported a crash (KVM_SYSTEM_EVENT_CRASH)");
      default:
        return this.failure(`unhandled KVM system event ${type}`);
    }
  }

  private describeInternalError(): string {
    const dv = this.vcpu.runView;
    const sub = dv.getUint32(KvmRun.internal.suberror, true);
    const ndata = Math.min(dv.getUint32(KvmRun.internal.ndata, true), 16);
    const data: string[] = [];
    for (let i = 0; i < ndata; i++) data.push("0x" + dv.getBigUint64(KvmRun.internal.data + 8 * i, true).toString(16));
    const what =
      sub === InternalErrorSuberror.EMULATION
        ? "KVM could not emulate a guest instruction (on an emulating host KVM, try --cpu-template emulated)"
        : sub === InternalErrorSuberror.SIMUL_EX
          ? "KVM met an exception while delivering another"
          : sub === InternalErrorSuberror.DELIVERY_EV
            ? "KVM could not deliver an event to the guest"
            : `KVM internal error (suberror ${sub})`;
    return `${what}${data.length ? ` [${data.join(" ")}]` : ""}`;
  }

  private failure(reason: string): VcpuStop {
    let dump: string | undefined;
    try {
      dump = formatRegisterDump(this.vcpu.getRegisters(), this.vcpu.getSpecialRegisters());
    } catch {
      dump = undefined;
    }
    return dump === undefined ? { kind: "error", reason: `vCPU ${this.vcpu.id}: ${reason}` } : { kind: "error", reason: `vCPU ${this.vcpu.id}: ${reason}`, dump };
  }
}
