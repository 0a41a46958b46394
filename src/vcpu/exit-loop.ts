/**
 * The vCPU run loop: KVM_RUN, then handle the exit right here in the vCPU's thread
 * (handing an exit to another thread costs more than the exit itself), until the guest or
 * the VMM ends the run. Mirrors Firecracker's run_emulation()/handle_kvm_exit().
 */
import { ExitReason, InternalErrorSuberror, MpState, SystemEvent, exitReasonName } from "../kvm/abi";
import { ExitStats } from "./exit-stats";
import type { CoalescedRing } from "../kvm/coalesced";
import { Vcpu, formatRegisterDump } from "../kvm/vcpu";
import type { InternalErrorExit, MmioExit, PioExit, VcpuExit } from "../kvm/vcpu-exit";
import type { Bus } from "../devices/bus";
import type { VmControl } from "../devices/device";

const RFLAGS_IF = 1n << 9n;

/** Why a vCPU stopped running. Plain data: it travels from the worker to the main thread. */
export type VcpuStop =
  | { kind: "stopped" }
  | { kind: "reset"; reason: string }
  | { kind: "poweroff"; reason: string }
  | { kind: "halted"; reason: string }
  | { kind: "panic"; reason: string }
  | { kind: "error"; reason: string; dump?: string };

/**
 * Cells of the run-control SharedArrayBuffer shared by the main thread and every vCPU.
 * STOP: set by whoever ends the VM; each vCPU checks it after every exit.
 * DUMP: a generation counter; a vCPU that sees it change reports its registers
 *       (Ctrl-A d on the console, for finding out where a guest is stuck).
 * HALT_PROBE: a generation counter; a vCPU that sees it change answers in the halt-status
 *       array whether it sits in HLT with interrupts disabled (see probeHalt).
 * PAUSE: set (and every vCPU kicked) to park the vCPUs out of KVM_RUN; cleared, with
 *       Atomics.notify on the cell, to let them go on.
 * PARKED: how many vCPUs are parked now (each notifies the cell as it comes and goes).
 * COALESCED_LOCK: held by the vCPU replaying KVM's coalesced-write ring (kvm/coalesced.ts).
 * PANIC: set when the guest's console said its kernel panicked; the VM, however it then
 *       ends, ends as a panic (VmControl.guestPanicked).
 */
export const RunControlCell = { STOP: 0, DUMP: 1, HALT_PROBE: 2, PAUSE: 3, PARKED: 4, COALESCED_LOCK: 5, PANIC: 6, COUNT: 7 } as const;

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
  /** Exits by reason, port and MMIO address (`tskvm boot -v`, the boot benchmark). */
  readonly stats = new ExitStats();
  private dumpSeen = 0;
  /** Where this vCPU's register dump goes when DUMP is bumped (the worker posts it to the main thread). */
  onRegisterDump: (dump: string) => void = () => undefined;
  private haltProbeSeen = 0;

  /** KVM's coalesced-write ring, replayed before each exit is handled (undefined: not used). */
  private readonly coalesced: CoalescedRing | undefined;
  private readonly replayPio = (port: number, data: Uint8Array): void => {
    this.stats.pio(port, true);
    if (!this.pio.write(port, data)) this.counters.unclaimedPio++;
  };
  private readonly replayMmio = (address: number, data: Uint8Array): void => {
    this.stats.mmioAccess(address, true);
    if (!this.mmio.write(address, data)) this.counters.unclaimedMmio++;
  };

  constructor(
    readonly vcpu: Vcpu,
    readonly pio: Bus,
    readonly mmio: Bus,
    readonly control: Int32Array,
    readonly haltStatus?: Int32Array,
    options: { coalesced?: CoalescedRing } = {},
  ) {
    this.coalesced = options.coalesced;
  }

  /** Replay the writes KVM kept in its coalesced ring (any vCPU's), oldest first. */
  private replayCoalesced(): void {
    this.coalesced!.drain(this.control, RunControlCell.COALESCED_LOCK, this.replayPio, this.replayMmio);
  }

  /** VmControl: a device (the i8042's reset line) asks to end the VM; the loop stops after this exit. */
  requestReset(reason: string): void {
    this.pending ??= { kind: "reset", reason };
  }

  /** VmControl: the guest's kernel panicked (see VmControl.guestPanicked). */
  guestPanicked(reason: string, now: boolean): void {
    Atomics.store(this.control, RunControlCell.PANIC, 1);
    if (now) this.pending ??= { kind: "panic", reason };
  }

  private stopRequested(): boolean {
    return Atomics.load(this.control, RunControlCell.STOP) !== 0;
  }

  /** Run until the guest stops, a device ends the VM, or another thread sets STOP. */
  run(): VcpuStop {
    const vcpu = this.vcpu;
    const ring = this.coalesced;
    for (;;) {
      if (this.pending !== undefined) return this.pending;
      if (this.stopRequested()) {
        if (ring?.pending()) this.replayCoalesced();
        return { kind: "stopped" };
      }
      const exit = vcpu.run();
      // Writes the guest made before this exit, held by KVM, come first.
      if (ring !== undefined && ring.pending()) this.replayCoalesced();
      if (exit.kind === "interrupted" && Atomics.load(this.control, RunControlCell.PAUSE) !== 0) {
        // Parked with the ring empty: a snapshot sees every write the guest made.
        this.park();
        continue;
      }
      const stop = this.handleExit(exit);
      if (stop !== undefined) {
        if (ring?.pending()) this.replayCoalesced();
        return stop;
      }
    }
  }

  /**
   * Sit out a pause. Only ever called right after KVM_RUN returned EINTR: KVM has then
   * completed any PIO/MMIO exit in progress (its api.rst: such an exit is finished by the
   * next KVM_RUN, and is in no state an ioctl reports), so this vCPU's KVM state is whole
   * and another thread may read or write it until the pause ends.
   */
  private park(): void {
    const c = this.control;
    Atomics.add(c, RunControlCell.PARKED, 1);
    Atomics.notify(c, RunControlCell.PARKED);
    while (Atomics.load(c, RunControlCell.PAUSE) !== 0 && !this.stopRequested()) Atomics.wait(c, RunControlCell.PAUSE, 1);
    Atomics.sub(c, RunControlCell.PARKED, 1);
    Atomics.notify(c, RunControlCell.PARKED);
    this.clearKick();
  }

  /**
   * The kick was answered: let KVM_RUN run the guest again, unless another request came
   * meanwhile. The requests are read after immediate_exit is cleared, and the main thread
   * stores a request before it sets immediate_exit, so no request is lost between the two.
   */
  private clearKick(): void {
    const c = this.control;
    this.vcpu.setImmediateExit(false);
    const more =
      Atomics.load(c, RunControlCell.PAUSE) !== 0 ||
      this.stopRequested() ||
      Atomics.load(c, RunControlCell.DUMP) !== this.dumpSeen ||
      (this.haltStatus !== undefined && Atomics.load(c, RunControlCell.HALT_PROBE) !== this.haltProbeSeen);
    if (more) this.vcpu.setImmediateExit(true);
  }

  private dumpIfAsked(): void {
    const gen = Atomics.load(this.control, RunControlCell.DUMP);
    if (gen === this.dumpSeen) return;
    this.dumpSeen = gen;
    this.clearKick();
    this.onRegisterDump(formatRegisterDump(this.vcpu.getRegisters(), this.vcpu.getSpecialRegisters()));
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
    this.clearKick();
    const state = this.vcpu.getMpState();
    const dead =
      state === MpState.UNINITIALIZED ||
      (state === MpState.HALTED && (this.vcpu.getRegisters().rflags & RFLAGS_IF) === 0n);
    Atomics.store(this.haltStatus, this.vcpu.id, dead ? gen : 0);
  }

  /** Handle one exit; undefined means "keep running". */
  handleExit(exit: VcpuExit): VcpuStop | undefined {
    switch (exit.kind) {
      case "pio":
        this.counters.pio++;
        this.stats.exit(ExitReason.IO);
        this.stats.pio(exit.port, exit.isWrite, exit.count);
        this.handlePio(exit);
        return undefined;
      case "mmio":
        this.counters.mmio++;
        this.stats.exit(ExitReason.MMIO);
        this.stats.mmioAccess(exit.address, exit.isWrite);
        this.handleMmio(exit);
        return undefined;
      case "interrupted":
        // A kick (immediate_exit or a signal): STOP is checked by the loop; answer the rest.
        this.dumpIfAsked();
        this.probeHaltIfAsked();
        return undefined;
      case "intr":
        // A signal kicked us out; the loop checks STOP.
        this.stats.exit(ExitReason.INTR);
        return undefined;
      case "hlt":
        // Only without an in-kernel irqchip: nothing can wake the vCPU again.
        return { kind: "halted", reason: `vCPU ${this.vcpu.id} halted with no interrupt controller to wake it` };
      case "shutdown":
        // A triple fault: what a PC does is reset, and Linux reboots this way (reboot=t).
        return { kind: "reset", reason: `guest reset (triple fault on vCPU ${this.vcpu.id})` };
      case "system-event":
        return this.systemEvent(exit.type);
      case "fail-entry":
        return this.failure(`KVM could not enter the guest (hardware entry failure reason 0x${exit.hardwareReason.toString(16)})`);
      case "internal-error":
        return this.failure(describeInternalError(exit));
      case "run-failed":
        return this.failure(`KVM_RUN failed: errno ${exit.errno}`);
      case "unknown":
        this.counters.other++;
        return this.failure(`unhandled KVM exit: ${exitReasonName(exit.reason)}`);
    }
  }

  private handlePio(exit: PioExit): void {
    const port = exit.port;
    for (let i = 0; i < exit.count; i++) {
      const data = exit.data(i);
      const claimed = exit.isWrite ? this.pio.write(port, data) : this.pio.read(port, data);
      if (!claimed) this.counters.unclaimedPio++;
    }
  }

  private handleMmio(exit: MmioExit): void {
    const claimed = exit.isWrite ? this.mmio.write(exit.address, exit.data) : this.mmio.read(exit.address, exit.data);
    if (!claimed) this.counters.unclaimedMmio++;
  }

  private systemEvent(type: number): VcpuStop {
    switch (type) {
      case SystemEvent.SHUTDOWN:
        return { kind: "poweroff", reason: "guest powered off" };
      case SystemEvent.RESET:
        return { kind: "reset", reason: "guest reset" };
      case SystemEvent.CRASH:
        return { kind: "panic", reason: "guest kernel panicked (it reported a crash: KVM_SYSTEM_EVENT_CRASH)" };
      default:
        return this.failure(`unhandled KVM system event ${type}`);
    }
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

function describeInternalError(exit: InternalErrorExit): string {
  const sub = exit.suberror;
  const what =
    sub === InternalErrorSuberror.EMULATION
      ? "KVM could not emulate a guest instruction (on an emulating host KVM, try the \"emulated\" CPU template)"
      : sub === InternalErrorSuberror.SIMUL_EX
        ? "KVM met an exception while delivering another"
        : sub === InternalErrorSuberror.DELIVERY_EV
          ? "KVM could not deliver an event to the guest"
          : `KVM internal error (suberror ${sub})`;
  const data = exit.data.map((d) => "0x" + d.toString(16));
  return `${what}${data.length ? ` [${data.join(" ")}]` : ""}`;
}
