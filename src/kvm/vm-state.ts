/**
 * The VM-wide state KVM holds for a machine with the in-kernel irqchip and PIT: the two 8259
 * PICs, the IOAPIC, the i8254 PIT and the KVM clock (what kvmclock guests read as time).
 * Like vcpu-state.ts, the irqchip and PIT states stay the kernel's own bytes.
 *
 * Restore order: the PIT, then the clock, then the irqchips (Firecracker's order; the PIT
 * restarts its counters from the time of the call, the irqchips take their pin levels as
 * they were).
 */
import * as sys from "../sys/libc";
import {
  Cap,
  Ioctl,
  IoctlName,
  IrqchipId,
  KvmClockData,
  KvmIrqchip,
  KvmPitState2,
} from "./abi";
import type { Vm } from "./kvm";
import { StateRestoreError, restorePart } from "./vcpu-state";

export interface ClockState {
  /** kvmclock nanoseconds, as KVM_GET_CLOCK gave them. */
  clock: bigint;
  /** KVM_GET_CLOCK's flags (KVM_CLOCK_TSC_STABLE, KVM_CLOCK_REALTIME, KVM_CLOCK_HOST_TSC). */
  flags: number;
  /** The host's wall clock (ns since the epoch) taken right after KVM_GET_CLOCK. */
  hostRealtimeNs: bigint;
}

export interface VmState {
  clock?: ClockState;
  /** struct kvm_pit_state2 */
  pit?: Uint8Array;
  /** struct kvm_irqchip, chip_id 0 (master PIC), 1 (slave PIC), 2 (IOAPIC) */
  picMaster?: Uint8Array;
  picSlave?: Uint8Array;
  ioapic?: Uint8Array;
}

export const VM_STATE_SIZES = {
  pit: KvmPitState2.size,
  picMaster: KvmIrqchip.size,
  picSlave: KvmIrqchip.size,
  ioapic: KvmIrqchip.size,
} as const;
export type VmStateBlob = keyof typeof VM_STATE_SIZES;

const CHIPS = [
  ["picMaster", IrqchipId.PIC_MASTER],
  ["picSlave", IrqchipId.PIC_SLAVE],
  ["ioapic", IrqchipId.IOAPIC],
] as const;

function call(vm: Vm, name: IoctlName, buf: Uint8Array | null): number {
  return sys.ioctl(vm.fd, Ioctl[name], buf, `KVM_${name}`);
}

/** The host's wall clock in nanoseconds (the clock guests are moved on by after a restore). */
export function hostRealtimeNs(): bigint {
  return BigInt(Math.round((performance.timeOrigin + performance.now()) * 1e6));
}

export function adjustClockSupported(vm: Vm): boolean {
  return sys.ioctlValue(vm.fd, Ioctl.CHECK_EXTENSION, Cap.ADJUST_CLOCK, "KVM_CHECK_EXTENSION") > 0;
}

export function getClock(vm: Vm): ClockState {
  const buf = new Uint8Array(KvmClockData.size);
  call(vm, "GET_CLOCK", buf);
  const hostRealtime = hostRealtimeNs();
  const dv = new DataView(buf.buffer);
  return { clock: dv.getBigUint64(KvmClockData.clock, true), flags: dv.getUint32(KvmClockData.flags, true), hostRealtimeNs: hostRealtime };
}

/** KVM_SET_CLOCK to `ns`. No flags: tskvm moves the clock on itself (see restoreVmState). */
export function setClock(vm: Vm, ns: bigint): void {
  const buf = new Uint8Array(KvmClockData.size);
  new DataView(buf.buffer).setBigUint64(KvmClockData.clock, ns, true);
  call(vm, "SET_CLOCK", buf);
}

export function getIrqchip(vm: Vm, chipId: number): Uint8Array {
  const buf = new Uint8Array(KvmIrqchip.size);
  new DataView(buf.buffer).setUint32(KvmIrqchip.chip_id, chipId, true);
  call(vm, "GET_IRQCHIP", buf);
  return buf;
}

/**
 * Save the VM-wide state. Every vCPU must be out of KVM_RUN. `irqchip` says whether the
 * machine has the in-kernel irqchip and PIT; `clock` whether KVM has KVM_CAP_ADJUST_CLOCK.
 */
export function saveVmState(vm: Vm, opts: { irqchip: boolean; clock: boolean }): VmState {
  const state: VmState = {};
  if (opts.irqchip) {
    state.pit = new Uint8Array(KvmPitState2.size);
    call(vm, "GET_PIT2", state.pit);
  }
  if (opts.clock) state.clock = getClock(vm);
  if (opts.irqchip) for (const [key, id] of CHIPS) state[key] = getIrqchip(vm, id);
  return state;
}


/**
 * Write a saved VM state into a new VM built the same way. The clock is set to the saved
 * value plus `advanceNs` (the caller's policy: 0 continues where the guest stopped; the wall
 * time since the save makes guest time agree with the host's).
 */
export function restoreVmState(vm: Vm, state: VmState, opts: { advanceNs?: bigint } = {}): void {
  if (state.pit !== undefined) restorePart("PIT", () => call(vm, "SET_PIT2", state.pit!));
  if (state.clock !== undefined) {
    const ns = state.clock.clock + (opts.advanceNs ?? 0n);
    restorePart("KVM clock", () => setClock(vm, ns));
  }
  for (const [key, id] of CHIPS) {
    const chip = state[key];
    if (chip === undefined) continue;
    const got = new DataView(chip.buffer, chip.byteOffset, chip.byteLength).getUint32(KvmIrqchip.chip_id, true);
    if (got !== id) throw new StateRestoreError(`the saved ${key} state names irqchip ${got}, not ${id}`);
    restorePart(key === "ioapic" ? "IOAPIC" : `PIC (${key === "picMaster" ? "master" : "slave"})`, () => call(vm, "SET_IRQCHIP", chip));
  }
}
