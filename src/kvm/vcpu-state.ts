/**
 * A vCPU's whole architectural state as KVM holds it, read and written in the order KVM
 * needs (snapshots, and tests that move a running guest into a new VM).
 *
 * Each piece is kept as the kernel struct's bytes: KVM gave them, KVM takes them back, and no
 * field can be lost in a translation. The pieces are named and sized (see VCPU_STATE_SIZES),
 * so a snapshot reader can check every blob before any ioctl sees it, and the few fields
 * tskvm reads itself have decoders here.
 *
 * Ordering facts (KVM's api.rst, and Firecracker's and QEMU's comments where they met them):
 * - KVM_GET_MP_STATE runs kvm_apic_accept_events(), which can change LAPIC and vCPU state:
 *   read it first. KVM_GET_VCPU_EVENTS may be changed by the other GETs: read it last.
 * - Every vCPU of the VM must be out of KVM_RUN (events are unsafe otherwise), and any
 *   in-progress PIO/MMIO exit must have been completed by re-entering KVM_RUN with
 *   immediate_exit set: that completion is not part of any state KVM reports.
 * - Restore: CPUID first (MSRs and SREGS are checked against it); SET_REGS clears a pending
 *   exception, so events come last; SET_SREGS sets the APIC base, so the LAPIC comes after
 *   it; the TSC-deadline MSR only takes a value once the LAPIC is in TSC-deadline mode and
 *   the TSC is set, so the LAPIC precedes the MSRs and the deadline is written last.
 */
import * as sys from "../sys/libc";
import {
  Ioctl,
  IoctlName,
  KvmDebugregs,
  KvmFpu,
  KvmLapicState,
  KvmMsrList,
  KvmRegs,
  KvmSregs,
  KvmVcpuEvents,
  KvmXcrs,
  KvmXsave,
  KvmCpuid2,
  KvmCpuidEntry2,
  Cap,
  CapName,
} from "./abi";
import { decodeCpuidEntries, type Kvm, type Vm } from "./kvm";
import type { CpuidEntry } from "./cpuid";
import type { MsrEntry, Registers, Vcpu } from "./vcpu";
import { decodeRegisters } from "./vcpu";

export const MSR_IA32_TSC = 0x10;
export const MSR_IA32_TSC_DEADLINE = 0x6e0;

/** What this host's KVM can save and restore beyond the basics (regs, sregs, MSRs, MP state). */
export interface VcpuStateSupport {
  /** KVM_GET/SET_XSAVE; without it the FPU goes through KVM_GET/SET_FPU. */
  xsave: boolean;
  /** Bytes KVM_GET_XSAVE2 fills (KVM_CAP_XSAVE2 on the VM), or 0 to use KVM_GET_XSAVE's 4 KiB. */
  xsave2Size: number;
  xcrs: boolean;
  debugRegs: boolean;
  vcpuEvents: boolean;
  /** KVM_GET_TSC_KHZ. */
  tscKhz: boolean;
  /** KVM_SET_TSC_KHZ (TSC scaling): a snapshot can be restored on a host whose TSC runs at another rate. */
  tscControl: boolean;
  kvmclockCtrl: boolean;
}

function vmCap(vm: Vm, cap: CapName): number {
  // Asked on the VM fd: some answers (KVM_CAP_XSAVE2's size) depend on the VM.
  return sys.ioctlValue(vm.fd, Ioctl.CHECK_EXTENSION, Cap[cap], "KVM_CHECK_EXTENSION");
}

export function vcpuStateSupport(vm: Vm): VcpuStateSupport {
  const xsave2 = vmCap(vm, "XSAVE2");
  return {
    xsave: vmCap(vm, "XSAVE") > 0,
    xsave2Size: xsave2 > KvmXsave.size ? xsave2 : 0,
    xcrs: vmCap(vm, "XCRS") > 0,
    debugRegs: vmCap(vm, "DEBUGREGS") > 0,
    vcpuEvents: vmCap(vm, "VCPU_EVENTS") > 0,
    tscKhz: vmCap(vm, "GET_TSC_KHZ") > 0,
    tscControl: vmCap(vm, "TSC_CONTROL") > 0,
    kvmclockCtrl: vmCap(vm, "KVMCLOCK_CTRL") > 0,
  };
}

/** One vCPU's state. Optional pieces are those the host's KVM (or the machine) may lack. */
export interface VcpuState {
  /** KVM_MP_STATE_* (RUNNABLE, HALTED, INIT_RECEIVED, ...). */
  mpState: number;
  /** struct kvm_regs */
  regs: Uint8Array;
  /** struct kvm_sregs (with the pending-interrupt bitmap) */
  sregs: Uint8Array;
  /** struct kvm_xsave (x87, SSE, AVX, ...), 4 KiB or KVM_CAP_XSAVE2's size */
  xsave?: Uint8Array;
  /** struct kvm_fpu, only where KVM has no XSAVE */
  fpu?: Uint8Array;
  /** struct kvm_xcrs */
  xcrs?: Uint8Array;
  /** struct kvm_debugregs */
  debugRegs?: Uint8Array;
  /** struct kvm_lapic_state: the in-kernel LAPIC's register page (machines with an irqchip) */
  lapic?: Uint8Array;
  /** Every MSR KVM lists (KVM_GET_MSR_INDEX_LIST) that it let us read, TSC and kvmclock included. */
  msrs: MsrEntry[];
  /** struct kvm_vcpu_events: pending exception, interrupt, NMI, SIPI, SMI */
  events?: Uint8Array;
  /** The vCPU's TSC rate. */
  tscKhz?: number;
  /** The CPUID the vCPU runs with (KVM_GET_CPUID2). */
  cpuid: CpuidEntry[];
}

/** The exact size each blob of a VcpuState must have; xsave may be larger (KVM_CAP_XSAVE2). */
export const VCPU_STATE_SIZES = {
  regs: KvmRegs.size,
  sregs: KvmSregs.size,
  xsave: KvmXsave.size,
  fpu: KvmFpu.size,
  xcrs: KvmXcrs.size,
  debugRegs: KvmDebugregs.size,
  lapic: KvmLapicState.size,
  events: KvmVcpuEvents.size,
} as const;
export type VcpuStateBlob = keyof typeof VCPU_STATE_SIZES;

function call(vcpu: Vcpu, name: IoctlName, buf: Uint8Array | null): number {
  return sys.ioctl(vcpu.fd, Ioctl[name], buf, `KVM_${name}`);
}

function get(vcpu: Vcpu, name: IoctlName, size: number): Uint8Array {
  const buf = new Uint8Array(size);
  call(vcpu, name, buf);
  return buf;
}

/**
 * KVM_GET_MSR_INDEX_LIST: every MSR KVM saves and restores for a vCPU (architectural ones,
 * the TSC, and KVM's own such as the kvmclock MSRs).
 */
export function msrIndexList(kvm: Kvm): number[] {
  const probe = new Uint8Array(KvmMsrList.size);
  try {
    sys.ioctl(kvm.fd, Ioctl.GET_MSR_INDEX_LIST, probe, "KVM_GET_MSR_INDEX_LIST");
  } catch (e) {
    // E2BIG with nmsrs set to the count is the expected answer to an empty buffer.
    if (!(e instanceof sys.SysError && e.code === "E2BIG")) throw e;
  }
  const count = new DataView(probe.buffer).getUint32(KvmMsrList.nmsrs, true);
  const buf = new Uint8Array(KvmMsrList.size + 4 * count);
  const dv = new DataView(buf.buffer);
  dv.setUint32(KvmMsrList.nmsrs, count, true);
  sys.ioctl(kvm.fd, Ioctl.GET_MSR_INDEX_LIST, buf, "KVM_GET_MSR_INDEX_LIST");
  const n = dv.getUint32(KvmMsrList.nmsrs, true);
  return Array.from({ length: n }, (_, i) => dv.getUint32(KvmMsrList.indices + 4 * i, true));
}

/** KVM_GET_CPUID2: the CPUID the vCPU was given, growing the buffer while KVM says E2BIG. */
export function getCpuid(vcpu: Vcpu): CpuidEntry[] {
  for (let capacity = 64; capacity <= 4096; capacity *= 2) {
    const buf = new Uint8Array(KvmCpuid2.size + capacity * KvmCpuidEntry2.size);
    const dv = new DataView(buf.buffer);
    dv.setUint32(KvmCpuid2.nent, capacity, true);
    try {
      call(vcpu, "GET_CPUID2", buf);
    } catch (e) {
      if (e instanceof sys.SysError && e.code === "E2BIG") continue;
      throw e;
    }
    return decodeCpuidEntries(dv, dv.getUint32(KvmCpuid2.nent, true));
  }
  throw new Error("KVM_GET_CPUID2 returned more than 4096 entries");
}

/**
 * Read the MSRs KVM will give: KVM_GET_MSRS stops at the first it refuses (one the vCPU's
 * CPUID does not enable, say) and returns how many it read, so refused ones are dropped and
 * the rest read on. Returns what was read and what was refused.
 */
export function readMsrs(vcpu: Vcpu, indices: readonly number[]): { msrs: MsrEntry[]; refused: number[] } {
  const msrs: MsrEntry[] = [];
  const refused: number[] = [];
  let rest = indices.slice();
  while (rest.length > 0) {
    const got = vcpu.getMsrs(rest);
    msrs.push(...got);
    if (got.length === rest.length) break;
    refused.push(rest[got.length]!);
    rest = rest.slice(got.length + 1);
  }
  return { msrs, refused };
}

/**
 * Save a vCPU's state. The vCPU (and every other of the VM) must be out of KVM_RUN, with any
 * in-progress exit completed (see the module comment). `msrIndices` is msrIndexList().
 */
export function saveVcpuState(
  vcpu: Vcpu,
  opts: { support: VcpuStateSupport; msrIndices: readonly number[]; irqchip: boolean },
): VcpuState {
  const s = opts.support;
  const mpState = vcpu.getMpState();
  const state: VcpuState = {
    mpState,
    regs: get(vcpu, "GET_REGS", KvmRegs.size),
    sregs: get(vcpu, "GET_SREGS", KvmSregs.size),
    msrs: [],
    cpuid: [],
  };
  if (s.xsave) {
    state.xsave = s.xsave2Size > 0 ? get(vcpu, "GET_XSAVE2", s.xsave2Size) : get(vcpu, "GET_XSAVE", KvmXsave.size);
  } else {
    state.fpu = get(vcpu, "GET_FPU", KvmFpu.size);
  }
  if (s.xcrs) state.xcrs = get(vcpu, "GET_XCRS", KvmXcrs.size);
  if (s.debugRegs) state.debugRegs = get(vcpu, "GET_DEBUGREGS", KvmDebugregs.size);
  if (opts.irqchip) state.lapic = vcpu.getLapic();
  if (s.tscKhz) state.tscKhz = call(vcpu, "GET_TSC_KHZ", null);
  state.cpuid = getCpuid(vcpu);
  state.msrs = readMsrs(vcpu, opts.msrIndices).msrs;
  if (s.vcpuEvents) state.events = get(vcpu, "GET_VCPU_EVENTS", KvmVcpuEvents.size);
  return state;
}

/** Thrown when KVM refuses part of a saved vCPU or VM state; the message names the part. */
export class StateRestoreError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "StateRestoreError";
  }
}

/** Do one step of a restore; KVM's refusal becomes a StateRestoreError naming the part. */
export function restorePart(part: string, action: () => void): void {
  try {
    action();
  } catch (e) {
    throw new StateRestoreError(`KVM refused the saved ${part}: ${(e as Error).message}`);
  }
}

/**
 * The MSRs in the order KVM must take them: the TSC before the TSC deadline. A deadline of 0
 * (disarmed) becomes the saved TSC, which fires at once: a deadline timer that expired just
 * before the save may have been disarmed with its interrupt not yet in the LAPIC, and a
 * tickless guest would wait forever for it (Firecracker met exactly this); a spurious timer
 * interrupt is harmless. KVM ignores the write when the LAPIC is not in TSC-deadline mode.
 */
export function msrsInRestoreOrder(msrs: readonly MsrEntry[]): MsrEntry[] {
  const tsc = msrs.find((m) => m.index === MSR_IA32_TSC);
  const deadline = msrs.filter((m) => m.index === MSR_IA32_TSC_DEADLINE);
  const rest = msrs.filter((m) => m.index !== MSR_IA32_TSC_DEADLINE);
  return [
    ...rest,
    ...deadline.map((m) => (m.data === 0n && tsc !== undefined ? { index: m.index, data: tsc.data } : m)),
  ];
}

/**
 * KVM takes a host write of IA32_TSC that lands within one second of the TSC it expects
 * (the VM's last TSC write plus the time since) as an attempt to synchronize the vCPUs, and
 * gives the vCPU the VM's current TSC offset instead of the value written ("UAPI baggage"
 * in kvm_synchronize_tsc). A new VM's vCPUs start at TSC 0, so the saved TSC of a guest
 * that had run for less than a second would be dropped (measured on hardware KVM: the
 * guest's TSC went back to the new VM's). Writing a value far from both first makes the
 * saved one stick on the first vCPU; the others' saved values then do match it, which
 * keeps their TSCs in step as they were.
 */
export function breakTscSynchronization(vcpu: Vcpu, state: VcpuState): void {
  const tsc = state.msrs.find((m) => m.index === MSR_IA32_TSC);
  if (tsc === undefined) return;
  const tenSeconds = BigInt(state.tscKhz ?? 4_000_000) * 10_000n;
  vcpu.setMsrs([{ index: MSR_IA32_TSC, data: (tsc.data + tenSeconds) & 0xffff_ffff_ffff_ffffn }]);
}

/**
 * Write a saved state into a freshly created vCPU of a VM built the same way (same irqchip).
 * Every vCPU of the VM must be out of KVM_RUN. Restore the first vCPU with `firstVcpu` (see
 * breakTscSynchronization). Throws StateRestoreError naming the piece KVM refused.
 */
export function restoreVcpuState(vcpu: Vcpu, state: VcpuState, opts: { kvmclockCtrl?: boolean; firstVcpu?: boolean } = {}): void {
  restorePart("CPUID", () => vcpu.setCpuid(state.cpuid));
  restorePart("MP state", () => vcpu.setMpState(state.mpState));
  restorePart("registers", () => call(vcpu, "SET_REGS", state.regs));
  restorePart("special registers", () => call(vcpu, "SET_SREGS", state.sregs));
  if (state.xsave !== undefined) restorePart("XSAVE state", () => call(vcpu, "SET_XSAVE", state.xsave!));
  if (state.fpu !== undefined) restorePart("FPU state", () => call(vcpu, "SET_FPU", state.fpu!));
  if (state.xcrs !== undefined) restorePart("XCRs", () => call(vcpu, "SET_XCRS", state.xcrs!));
  if (state.debugRegs !== undefined) restorePart("debug registers", () => call(vcpu, "SET_DEBUGREGS", state.debugRegs!));
  if (state.lapic !== undefined) restorePart("LAPIC", () => vcpu.setLapic(state.lapic!));
  if (opts.firstVcpu === true) restorePart("TSC", () => breakTscSynchronization(vcpu, state));
  for (const msr of msrsInRestoreOrder(state.msrs)) {
    let accepted = 0;
    restorePart(`MSR 0x${msr.index.toString(16)}`, () => {
      accepted = vcpu.setMsrs([msr]);
    });
    if (accepted !== 1) throw new StateRestoreError(`KVM refused the saved MSR 0x${msr.index.toString(16)}`);
  }
  if (state.events !== undefined) restorePart("pending events", () => call(vcpu, "SET_VCPU_EVENTS", state.events!));
  if (opts.kvmclockCtrl === true) kvmclockStopped(vcpu);
}

/**
 * KVM_KVMCLOCK_CTRL: tell the guest (through its kvmclock page) that it was stopped by the
 * host, so its soft-lockup watchdog does not take the jump in time for a hung CPU. KVM
 * answers EINVAL when the guest has not enabled kvmclock: nothing to tell then.
 */
export function kvmclockStopped(vcpu: Vcpu): boolean {
  const r = sys.ioctlRaw(vcpu.fd, Ioctl.KVMCLOCK_CTRL, null);
  return r >= 0;
}

/** KVM_SET_TSC_KHZ: run this vCPU's TSC at `khz` (TSC scaling; needs KVM_CAP_TSC_CONTROL). */
export function setTscKhz(vcpu: Vcpu, khz: number): void {
  sys.ioctlValue(vcpu.fd, Ioctl.SET_TSC_KHZ, khz, "KVM_SET_TSC_KHZ");
}

export function getTscKhz(vcpu: Vcpu): number {
  return call(vcpu, "GET_TSC_KHZ", null);
}

/** The general registers of a saved state. */
export function savedRegisters(state: VcpuState): Registers {
  return decodeRegisters(state.regs);
}

export interface VcpuEvents {
  exception: { injected: boolean; nr: number; pending: boolean };
  interrupt: { injected: boolean; nr: number; shadow: number };
  nmi: { injected: boolean; pending: boolean; masked: boolean };
  flags: number;
}

/** The fields of struct kvm_vcpu_events a reader most often wants (diagnostics, tests). */
export function decodeVcpuEvents(bytes: Uint8Array): VcpuEvents {
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const e = KvmVcpuEvents;
  return {
    exception: { injected: dv.getUint8(e.exception.injected) !== 0, nr: dv.getUint8(e.exception.nr), pending: dv.getUint8(e.exception.pending) !== 0 },
    interrupt: { injected: dv.getUint8(e.interrupt.injected) !== 0, nr: dv.getUint8(e.interrupt.nr), shadow: dv.getUint8(e.interrupt.shadow) },
    nmi: { injected: dv.getUint8(e.nmi.injected) !== 0, pending: dv.getUint8(e.nmi.pending) !== 0, masked: dv.getUint8(e.nmi.masked) !== 0 },
    flags: dv.getUint32(e.flags, true),
  };
}
