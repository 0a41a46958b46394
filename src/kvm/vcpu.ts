/**
 * A vCPU file descriptor and its shared kvm_run page. The same vCPU may be wrapped in two
 * threads: the main thread configures it (registers, CPUID, MSRs, LAPIC) and sets
 * immediate_exit to stop it; its worker thread calls run() and gets decoded exits.
 */
import * as sys from "../sys/libc";
import {
  Ioctl,
  IoctlName,
  KvmDtable,
  KvmMsrEntry,
  KvmMsrs,
  KvmRegs,
  KvmRun,
  KvmSegment,
  KvmSregs,
  KvmLapicState,
  KvmMpState,
  RegName,
} from "./abi";
import { encodeCpuidEntries } from "./kvm";
import { VcpuExitDecoder, type VcpuExit } from "./vcpu-exit";
import { CoalescedRing } from "./coalesced";
import type { CpuidEntry } from "./cpuid";
import type { DescriptorTable, Segment } from "../arch/x86/cpu-state";

export type Registers = Record<RegName, bigint>;

export interface SpecialRegisters {
  cs: Segment;
  ds: Segment;
  es: Segment;
  fs: Segment;
  gs: Segment;
  ss: Segment;
  tr: Segment;
  ldt: Segment;
  gdt: DescriptorTable;
  idt: DescriptorTable;
  cr0: bigint;
  cr2: bigint;
  cr3: bigint;
  cr4: bigint;
  cr8: bigint;
  efer: bigint;
  apicBase: bigint;
}

export interface MsrEntry {
  index: number;
  data: bigint;
}

const SEGMENT_NAMES = ["cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"] as const;

/** Where a vCPU's kvm_run mapping lives; plain data so it can be posted to a worker. */
export interface VcpuHandle {
  readonly id: number;
  readonly fd: number;
  readonly runAddress: bigint;
  readonly runSize: number;
}

export class Vcpu {
  /** The whole kvm_run mapping (exit data, and the PIO data page after it). */
  private readonly kvmRun: Uint8Array;
  /** The KVM_RUN ioctl, bound once: called for every exit. */
  private readonly kvmRunIoctl: () => number;
  private readonly exits: VcpuExitDecoder;

  private constructor(readonly handle: VcpuHandle) {
    this.kvmRunIoctl = sys.ioctlNoArg(handle.fd, Ioctl.RUN);
    this.kvmRun = new Uint8Array(sys.view(handle.runAddress, handle.runSize));
    this.exits = new VcpuExitDecoder(this.kvmRun);
  }

  /**
   * Enter the guest (KVM_RUN) until it exits; why, decoded. The exit object is reused by
   * the next run(): take what you need from it before calling again.
   */
  run(): VcpuExit {
    return this.exits.decode(this.kvmRunIoctl());
  }

  /** Map the kvm_run page of a freshly created vCPU fd. */
  static map(id: number, fd: number, runSize: number): Vcpu {
    const runAddress = sys.mmap(runSize, sys.PROT_READ | sys.PROT_WRITE, sys.MAP_SHARED, fd, 0);
    return new Vcpu({ id, fd, runAddress, runSize });
  }

  /** View an already mapped vCPU from another thread. */
  static attach(handle: VcpuHandle): Vcpu {
    return new Vcpu(handle);
  }

  get id(): number {
    return this.handle.id;
  }

  /** The VM's coalesced MMIO/PIO ring, as this vCPU's mapping shows it. */
  coalescedRing(): CoalescedRing {
    return new CoalescedRing(this.kvmRun);
  }

  get fd(): number {
    return this.handle.fd;
  }

  /** Unmap and close; only once no thread uses this vCPU any more. */
  destroy(): void {
    sys.munmap(this.handle.runAddress, this.handle.runSize);
    sys.close(this.handle.fd);
  }

  /** Ask KVM_RUN to return at once (now, or on its next entry). */
  setImmediateExit(on: boolean): void {
    Atomics.store(this.kvmRun, KvmRun.immediate_exit, on ? 1 : 0);
  }

  private call(name: IoctlName, buf: Uint8Array | null): void {
    sys.ioctl(this.handle.fd, Ioctl[name], buf, `KVM_${name}`);
  }

  getRegisters(): Registers {
    const buf = new Uint8Array(KvmRegs.size);
    this.call("GET_REGS", buf);
    return decodeRegisters(buf);
  }

  setRegisters(regs: Partial<Record<RegName, bigint | number>>): void {
    const buf = new Uint8Array(KvmRegs.size);
    const dv = new DataView(buf.buffer);
    KvmRegs.fields.forEach((name, i) => {
      const v = regs[name];
      // rflags bit 1 is reserved and must be set.
      const value = v === undefined ? (name === "rflags" ? 2n : 0n) : BigInt(v);
      dv.setBigUint64(i * 8, value, true);
    });
    this.call("SET_REGS", buf);
  }

  getSpecialRegisters(): SpecialRegisters {
    const buf = new Uint8Array(KvmSregs.size);
    this.call("GET_SREGS", buf);
    return decodeSregs(new DataView(buf.buffer));
  }

  /**
   * Read-modify-write the special registers: KVM_SET_SREGS takes the whole struct, and the
   * fields a caller does not name (apic_base, the pending-interrupt bitmap) must be kept.
   */
  updateSpecialRegisters(change: (s: SpecialRegisters) => void): void {
    const buf = new Uint8Array(KvmSregs.size);
    this.call("GET_SREGS", buf);
    const dv = new DataView(buf.buffer);
    const s = decodeSregs(dv);
    change(s);
    encodeSregs(dv, s);
    this.call("SET_SREGS", buf);
  }

  setCpuid(entries: readonly CpuidEntry[]): void {
    this.call("SET_CPUID2", encodeCpuidEntries(entries));
  }

  /** KVM_SET_MSRS; returns how many of the entries KVM accepted (it stops at the first refusal). */
  setMsrs(entries: readonly MsrEntry[]): number {
    const buf = new Uint8Array(KvmMsrs.size + entries.length * KvmMsrEntry.size);
    const dv = new DataView(buf.buffer);
    dv.setUint32(KvmMsrs.nmsrs, entries.length, true);
    entries.forEach((e, i) => {
      const o = KvmMsrs.entries + i * KvmMsrEntry.size;
      dv.setUint32(o + KvmMsrEntry.index, e.index, true);
      dv.setBigUint64(o + KvmMsrEntry.data, e.data, true);
    });
    return sys.ioctl(this.handle.fd, Ioctl.SET_MSRS, buf, "KVM_SET_MSRS");
  }

  getMsrs(indices: readonly number[]): MsrEntry[] {
    const buf = new Uint8Array(KvmMsrs.size + indices.length * KvmMsrEntry.size);
    const dv = new DataView(buf.buffer);
    dv.setUint32(KvmMsrs.nmsrs, indices.length, true);
    indices.forEach((index, i) => dv.setUint32(KvmMsrs.entries + i * KvmMsrEntry.size, index, true));
    const n = sys.ioctl(this.handle.fd, Ioctl.GET_MSRS, buf, "KVM_GET_MSRS");
    return indices.slice(0, n).map((index, i) => ({
      index,
      data: dv.getBigUint64(KvmMsrs.entries + i * KvmMsrEntry.size + KvmMsrEntry.data, true),
    }));
  }

  getLapic(): Uint8Array {
    const buf = new Uint8Array(KvmLapicState.size);
    this.call("GET_LAPIC", buf);
    return buf;
  }

  setLapic(state: Uint8Array): void {
    this.call("SET_LAPIC", state);
  }

  getMpState(): number {
    const buf = new Uint8Array(KvmMpState.size);
    this.call("GET_MP_STATE", buf);
    return new DataView(buf.buffer).getUint32(0, true);
  }

  setMpState(state: number): void {
    const buf = new Uint8Array(KvmMpState.size);
    new DataView(buf.buffer).setUint32(0, state, true);
    this.call("SET_MP_STATE", buf);
  }
}

/** struct kvm_regs bytes -> named registers. */
export function decodeRegisters(buf: Uint8Array): Registers {
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const regs = {} as Registers;
  KvmRegs.fields.forEach((name, i) => {
    regs[name] = dv.getBigUint64(i * 8, true);
  });
  return regs;
}

function decodeSegment(dv: DataView, o: number): Segment {
  return {
    base: Number(dv.getBigUint64(o + KvmSegment.base, true)),
    limit: dv.getUint32(o + KvmSegment.limit, true),
    selector: dv.getUint16(o + KvmSegment.selector, true),
    type: dv.getUint8(o + KvmSegment.type),
    present: dv.getUint8(o + KvmSegment.present) !== 0,
    dpl: dv.getUint8(o + KvmSegment.dpl),
    db: dv.getUint8(o + KvmSegment.db) !== 0,
    s: dv.getUint8(o + KvmSegment.s) !== 0,
    l: dv.getUint8(o + KvmSegment.l) !== 0,
    g: dv.getUint8(o + KvmSegment.g) !== 0,
    avl: dv.getUint8(o + KvmSegment.avl) !== 0,
  };
}

function encodeSegment(dv: DataView, o: number, s: Segment): void {
  dv.setBigUint64(o + KvmSegment.base, BigInt(s.base), true);
  dv.setUint32(o + KvmSegment.limit, s.limit >>> 0, true);
  dv.setUint16(o + KvmSegment.selector, s.selector, true);
  dv.setUint8(o + KvmSegment.type, s.type);
  dv.setUint8(o + KvmSegment.present, s.present ? 1 : 0);
  dv.setUint8(o + KvmSegment.dpl, s.dpl);
  dv.setUint8(o + KvmSegment.db, s.db ? 1 : 0);
  dv.setUint8(o + KvmSegment.s, s.s ? 1 : 0);
  dv.setUint8(o + KvmSegment.l, s.l ? 1 : 0);
  dv.setUint8(o + KvmSegment.g, s.g ? 1 : 0);
  dv.setUint8(o + KvmSegment.avl, s.avl ? 1 : 0);
  // A present segment is usable; KVM derives "unusable" for null selectors itself otherwise.
  dv.setUint8(o + KvmSegment.unusable, s.present ? 0 : 1);
}

function decodeSregs(dv: DataView): SpecialRegisters {
  const seg = (name: (typeof SEGMENT_NAMES)[number]) => decodeSegment(dv, KvmSregs[name]);
  const table = (o: number): DescriptorTable => ({
    base: Number(dv.getBigUint64(o + KvmDtable.base, true)),
    limit: dv.getUint16(o + KvmDtable.limit, true),
  });
  const u64 = (o: number) => dv.getBigUint64(o, true);
  return {
    cs: seg("cs"), ds: seg("ds"), es: seg("es"), fs: seg("fs"),
    gs: seg("gs"), ss: seg("ss"), tr: seg("tr"), ldt: seg("ldt"),
    gdt: table(KvmSregs.gdt),
    idt: table(KvmSregs.idt),
    cr0: u64(KvmSregs.cr0), cr2: u64(KvmSregs.cr2), cr3: u64(KvmSregs.cr3),
    cr4: u64(KvmSregs.cr4), cr8: u64(KvmSregs.cr8), efer: u64(KvmSregs.efer),
    apicBase: u64(KvmSregs.apic_base),
  };
}

function encodeSregs(dv: DataView, s: SpecialRegisters): void {
  for (const name of SEGMENT_NAMES) encodeSegment(dv, KvmSregs[name], s[name]);
  for (const [o, t] of [[KvmSregs.gdt, s.gdt], [KvmSregs.idt, s.idt]] as const) {
    dv.setBigUint64(o + KvmDtable.base, BigInt(t.base), true);
    dv.setUint16(o + KvmDtable.limit, t.limit, true);
  }
  dv.setBigUint64(KvmSregs.cr0, s.cr0, true);
  dv.setBigUint64(KvmSregs.cr2, s.cr2, true);
  dv.setBigUint64(KvmSregs.cr3, s.cr3, true);
  dv.setBigUint64(KvmSregs.cr4, s.cr4, true);
  dv.setBigUint64(KvmSregs.cr8, s.cr8, true);
  dv.setBigUint64(KvmSregs.efer, s.efer, true);
  dv.setBigUint64(KvmSregs.apic_base, s.apicBase, true);
}

/** A readable register dump for a vCPU that failed, in the layout people know from QEMU. */
export function formatRegisterDump(regs: Registers, sregs: SpecialRegisters): string {
  const hex = (v: bigint | number, w = 16) => BigInt(v).toString(16).padStart(w, "0");
  const r = regs;
  const lines = [
    `RAX=${hex(r.rax)} RBX=${hex(r.rbx)} RCX=${hex(r.rcx)} RDX=${hex(r.rdx)}`,
    `RSI=${hex(r.rsi)} RDI=${hex(r.rdi)} RBP=${hex(r.rbp)} RSP=${hex(r.rsp)}`,
    `R8 =${hex(r.r8)} R9 =${hex(r.r9)} R10=${hex(r.r10)} R11=${hex(r.r11)}`,
    `R12=${hex(r.r12)} R13=${hex(r.r13)} R14=${hex(r.r14)} R15=${hex(r.r15)}`,
    `RIP=${hex(r.rip)} RFL=${hex(r.rflags, 8)}`,
  ];
  for (const name of SEGMENT_NAMES) {
    const s = sregs[name];
    lines.push(
      `${name.toUpperCase().padEnd(3)}=${hex(s.selector, 4)} ${hex(s.base)} ${hex(s.limit, 8)} type=${s.type} dpl=${s.dpl} ${s.l ? "L" : ""}${s.db ? "DB" : ""}${s.present ? "" : " not-present"}`,
    );
  }
  lines.push(`GDT=     ${hex(sregs.gdt.base)} ${hex(sregs.gdt.limit, 8)}`);
  lines.push(`IDT=     ${hex(sregs.idt.base)} ${hex(sregs.idt.limit, 8)}`);
  lines.push(
    `CR0=${hex(sregs.cr0, 8)} CR2=${hex(sregs.cr2)} CR3=${hex(sregs.cr3)} CR4=${hex(sregs.cr4, 8)} EFER=${hex(sregs.efer, 8)}`,
  );
  return lines.join("\n");
}
