/**
 * The host facts a snapshot records, and the check that this host can run it: the same kind
 * of KVM, the capabilities the saved state needs, every CPU feature the guest was shown,
 * every MSR it saved, the same XSAVE layout. A restore onto a host that fails the check
 * would run a guest that meets a missing instruction or a state KVM refuses half-way; the
 * check says so in one line before anything is built.
 */
import type { Kvm } from "../../kvm/kvm";
import type { CapName } from "../../kvm/abi";
import { CPU_FEATURES, vendorString, type CpuidEntry } from "../../kvm/cpuid";
import { detectHostKvm } from "../../kvm/host";
import { msrIndexList, type VcpuState } from "../../kvm/vcpu-state";
import { KvmXsave } from "../../kvm/abi";
import { SnapshotError, type HostFacts } from "./format";

/** Capabilities whose presence decides what state is saved and how it is restored. */
export const SNAPSHOT_CAPS: readonly CapName[] = [
  "IRQCHIP", "PIT2", "PIT_STATE2", "MP_STATE", "XSAVE", "XSAVE2", "XCRS", "DEBUGREGS",
  "VCPU_EVENTS", "ADJUST_CLOCK", "GET_TSC_KHZ", "TSC_CONTROL", "KVMCLOCK_CTRL",
];

/** Collect this host's facts. `tscKhz` comes from a vCPU (KVM_GET_TSC_KHZ), 0 when unknown. */
export function collectHostFacts(kvm: Kvm, tscKhz = 0): HostFacts {
  const caps: Record<string, number> = {};
  for (const cap of SNAPSHOT_CAPS) caps[cap] = kvm.checkExtension(cap);
  const supported = kvm.supportedCpuid();
  return {
    kvmKind: detectHostKvm().kind,
    apiVersion: kvm.apiVersion(),
    caps,
    cpuVendor: vendorString(supported),
    cpuSignature: supported.find((e) => e.function === 1 && e.index === 0)?.eax ?? 0,
    supportedCpuid: supported,
    msrIndexList: msrIndexList(kvm),
    tscKhz,
  };
}

type Reg = "eax" | "ebx" | "ecx" | "edx";

/** CPUID registers that hold feature bits a guest may depend on. */
const FEATURE_REGISTERS: readonly { leaf: number; subleaf: number; reg: Reg }[] = [
  { leaf: 1, subleaf: 0, reg: "ecx" },
  { leaf: 1, subleaf: 0, reg: "edx" },
  { leaf: 7, subleaf: 0, reg: "ebx" },
  { leaf: 7, subleaf: 0, reg: "ecx" },
  { leaf: 7, subleaf: 0, reg: "edx" },
  { leaf: 7, subleaf: 1, reg: "eax" },
  { leaf: 0xd, subleaf: 0, reg: "eax" },
  { leaf: 0xd, subleaf: 1, reg: "eax" },
  { leaf: 0x8000_0001, subleaf: 0, reg: "ecx" },
  { leaf: 0x8000_0001, subleaf: 0, reg: "edx" },
  { leaf: 0x8000_0008, subleaf: 0, reg: "ebx" },
  { leaf: 0x4000_0001, subleaf: 0, reg: "eax" },
];

/**
 * The CPU's feature words (the registers of FEATURE_REGISTERS, in order): what a guest may
 * depend on, without the fields that vary with the CPU a process happens to run on (leaf 1
 * and leaf 0xB carry the APIC id of the CPU that executed CPUID).
 */
export function cpuFeatureWords(entries: readonly CpuidEntry[]): number[] {
  return FEATURE_REGISTERS.map(({ leaf, subleaf, reg }) => register(entries, leaf, subleaf, reg));
}

function register(entries: readonly CpuidEntry[], leaf: number, subleaf: number, reg: Reg): number {
  return entries.find((e) => e.function === leaf && e.index === subleaf)?.[reg] ?? 0;
}

function featureName(leaf: number, subleaf: number, reg: Reg, bit: number): string {
  const known = CPU_FEATURES.find((f) => f.leaf === leaf && f.subleaf === subleaf && f.reg === reg && f.bit === bit);
  return known?.name ?? `CPUID 0x${leaf.toString(16)}.${subleaf} ${reg} bit ${bit}`;
}

/**
 * Features the guest was shown that this host cannot give: set in the guest's CPUID and in
 * the saved host's supported CPUID (bits tskvm sets itself, like "hypervisor", are in
 * neither host's list), but not in this host's.
 */
export function missingFeatures(guest: readonly CpuidEntry[], savedSupported: readonly CpuidEntry[], supported: readonly CpuidEntry[]): string[] {
  const missing: string[] = [];
  for (const { leaf, subleaf, reg } of FEATURE_REGISTERS) {
    const lost = register(guest, leaf, subleaf, reg) & register(savedSupported, leaf, subleaf, reg) & ~register(supported, leaf, subleaf, reg);
    for (let bit = 0; bit < 32; bit++) if ((lost >>> bit) & 1) missing.push(featureName(leaf, subleaf, reg, bit));
  }
  return missing;
}

/**
 * Throw a SnapshotError("host") when this host cannot run the saved vCPUs: it names the
 * first difference that matters. `xsaveSize` is what KVM_GET_XSAVE(2) fills here.
 */
export function checkHostFacts(dir: string, saved: HostFacts, current: HostFacts, vcpus: readonly VcpuState[], xsaveSize: number): void {
  const refuse = (why: string): never => {
    throw new SnapshotError("host", `snapshot ${dir} cannot run on this host: ${why}`);
  };
  if (saved.kvmKind !== current.kvmKind) refuse(`it was made with ${saved.kvmKind} KVM, this host has ${current.kvmKind}`);
  if (saved.apiVersion !== current.apiVersion) refuse(`it was made with KVM API ${saved.apiVersion}, this host has ${current.apiVersion}`);
  if (saved.cpuVendor !== current.cpuVendor) refuse(`it was made on a ${saved.cpuVendor} CPU, this host has a ${current.cpuVendor} one`);
  for (const [cap, value] of Object.entries(saved.caps)) {
    if (value > 0 && (current.caps[cap] ?? 0) <= 0) refuse(`this host's KVM lacks KVM_CAP_${cap}, which it was made with`);
  }
  const guest = vcpus[0]!.cpuid;
  const missing = missingFeatures(guest, saved.supportedCpuid, current.supportedCpuid);
  if (missing.length > 0) refuse(`this host's CPU or KVM lacks ${missing.join(", ")}, which the guest uses`);
  const msrs = new Set(current.msrIndexList);
  for (const v of vcpus) {
    const absent = v.msrs.find((m) => !msrs.has(m.index));
    if (absent !== undefined) refuse(`this host's KVM cannot restore MSR 0x${absent.index.toString(16)}`);
  }
  const savedXsave = vcpus[0]!.xsave?.length;
  if (savedXsave !== undefined && savedXsave !== xsaveSize) {
    refuse(`its XSAVE state is ${savedXsave} bytes, this host's KVM uses ${xsaveSize} (another CPU)`);
  }
  if (vcpus.some((v) => v.xsave !== undefined) && (current.caps["XSAVE"] ?? 0) <= 0) refuse("this host's KVM has no XSAVE state");
}

/** What KVM_GET_XSAVE(2) fills on this host: KVM_CAP_XSAVE2's size, or the 4 KiB of KVM_GET_XSAVE. */
export function hostXsaveSize(caps: Record<string, number>): number {
  const xsave2 = caps["XSAVE2"] ?? 0;
  return xsave2 > KvmXsave.size ? xsave2 : KvmXsave.size;
}
