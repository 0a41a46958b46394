/**
 * What kind of KVM this host has, and what that means for speed and the CPU template:
 *
 * - hardware: kvm_intel / kvm_amd on a host that is not itself a VM. Guest code runs natively.
 * - nested: kvm_intel / kvm_amd on a host that is itself a VM (CPUID says so: the
 *   hypervisor bit, and the hypervisor's signature at leaf 0x40000000). Hardware semantics
 *   (stock kernels boot); speed depends on the outer hypervisor: near native under a
 *   hardware-assisted one (KVM, Hyper-V, ...), everything emulated under QEMU's TCG (the
 *   harness VM, scripts/harness-vm.ts).
 * - kvm-pvm: a software hypervisor that interprets guest kernel code (~1000x slower) and
 *   lacks some instructions, so tskvm picks the "emulated" CPU template; stock kernels
 *   cannot reach user space there.
 */
import { existsSync, readFileSync } from "node:fs";
import { hostCpuid } from "../sys/cpuid";

export type HostKvmKind = "hardware-intel" | "hardware-amd" | "nested-intel" | "nested-amd" | "emulated-pvm" | "unknown";

export interface HostKvmInfo {
  kind: HostKvmKind;
  module: string;
  /** A few words for test and benchmark output: "hardware KVM (AMD-V)", "kvm-pvm", "nested SVM on QEMU TCG". */
  label: string;
  /** What the kind means for speed and for the CPU template. */
  summary: string;
  /** The hypervisor this host itself runs under, when it is a VM ("QEMU TCG", "KVM", "Hyper-V", "a hypervisor"). */
  hypervisor?: string;
  /** True when guest code runs in software (kvm-pvm, or nested under TCG): boots take tens of seconds. */
  softwareEmulated: boolean;
}

/** What the host's own CPU says about the machine this host runs on. */
export interface HostCpu {
  /** CPUID.1:ECX[31], the "hypervisor" flag. */
  isVm: boolean;
  /** CPUID 0x40000000 EBX:ECX:EDX, e.g. "KVMKVMKVM\0\0\0", "TCGTCGTCGTCG". */
  hypervisorSignature?: string;
}

const HYPERVISORS: Record<string, string> = {
  TCGTCGTCGTCG: "QEMU TCG",
  KVMKVMKVM: "KVM",
  "Microsoft Hv": "Hyper-V",
  VMwareVMware: "VMware",
  XenVMMXenVMM: "Xen",
  VBoxVBoxVBox: "VirtualBox",
  "bhyve bhyve": "bhyve",
  ACRNACRNACRN: "ACRN",
  "lrpepyh vr": "Parallels",
};

/** The host CPU's own view: CPUID when it can be executed, else /proc/cpuinfo. */
export function probeHostCpu(): HostCpu {
  const leaf1 = hostCpuid(1);
  if (leaf1 !== undefined) {
    const isVm = (leaf1.ecx & 0x8000_0000) !== 0;
    if (!isVm) return { isVm };
    const h = hostCpuid(0x4000_0000)!;
    const b = Buffer.alloc(12);
    b.writeUInt32LE(h.ebx, 0);
    b.writeUInt32LE(h.ecx, 4);
    b.writeUInt32LE(h.edx, 8);
    return { isVm, hypervisorSignature: b.toString("latin1") };
  }
  try {
    const info = readFileSync("/proc/cpuinfo", "latin1");
    const flags = /^flags\s*:(.*)$/m.exec(info)?.[1] ?? "";
    const isVm = /\bhypervisor\b/.test(flags);
    // QEMU's TCG names its "max" CPU so; the signature is the same information.
    const tcg = /^model name\s*:\s*QEMU TCG/m.test(info);
    return { isVm, ...(tcg ? { hypervisorSignature: "TCGTCGTCGTCG" } : {}) };
  } catch {
    return { isVm: false };
  }
}

/** "QEMU TCG" for "TCGTCGTCGTCG", the trimmed signature for one not in the table. */
export function hypervisorName(signature: string): string {
  const s = signature.replace(/\0/g, "").trim().replace(/\s+/g, " ");
  return HYPERVISORS[s] ?? (s === "" ? "an unnamed hypervisor" : s);
}

export function detectHostKvm(sysModuleDir = "/sys/module", cpu: HostCpu | (() => HostCpu) = probeHostCpu): HostKvmInfo {
  const has = (m: string) => existsSync(`${sysModuleDir}/${m}`);
  let probed: HostCpu | undefined;
  const host = () => (probed ??= typeof cpu === "function" ? cpu() : cpu);
  const outer = () => (host().isVm ? { hypervisor: host().hypervisorSignature === undefined ? "a hypervisor" : hypervisorName(host().hypervisorSignature!) } : {});
  if (has("kvm_pvm")) {
    return {
      ...outer(),
      kind: "emulated-pvm",
      module: "kvm_pvm",
      label: "kvm-pvm",
      summary:
        "emulating KVM (kvm-pvm): guest kernel code is interpreted at roughly 1M instructions/s, " +
        "some instructions are missing (tskvm hides their CPUID bits: CPU template emulated), and an unmodified Linux cannot " +
        "reach user space; use the default guest (npm run guest), expect about a minute to boot",
      softwareEmulated: true,
    };
  }
  const vendor = has("kvm_intel") ? "intel" : has("kvm_amd") ? "amd" : undefined;
  if (vendor === undefined) {
    return { kind: "unknown", module: "", label: "KVM of an unknown kind", summary: "KVM of an unknown kind (no kvm_intel, kvm_amd or kvm_pvm module)", softwareEmulated: false };
  }
  const module = `kvm_${vendor}`;
  const ext = vendor === "intel" ? "VT-x" : "AMD-V";
  if (!host().isVm) {
    return {
      kind: `hardware-${vendor}`,
      module,
      label: `hardware KVM (${ext})`,
      summary: `hardware KVM (${ext}): guest code runs natively; CPU template host, stock kernels boot`,
      softwareEmulated: false,
    };
  }
  const name = outer().hypervisor!;
  const feature = vendor === "intel" ? "VMX" : "SVM";
  if (name === "QEMU TCG") {
    return {
      kind: `nested-${vendor}`,
      module,
      label: `nested ${feature} on QEMU TCG`,
      hypervisor: name,
      summary:
        `nested KVM (${module}) on ${feature} that QEMU emulates in software (TCG): hardware semantics, so stock kernels boot ` +
        "and CPU template host applies, but every instruction, the guest's and this host's, is emulated: a Linux boot takes " +
        "tens of seconds; compare speeds only side by side on this host",
      softwareEmulated: true,
    };
  }
  return {
    kind: `nested-${vendor}`,
    module,
    label: `nested ${feature} under ${name}`,
    hypervisor: name,
    summary:
      `nested KVM (${module}): this host is itself a VM under ${name}; guest code runs at hardware speed but every VM exit ` +
      "also goes through the outer hypervisor; CPU template host, stock kernels boot",
    softwareEmulated: false,
  };
}

/** The CPU template tskvm uses by default on this kind of host. */
export function defaultCpuTemplate(kind: HostKvmKind): "host" | "emulated" {
  return kind === "emulated-pvm" ? "emulated" : "host";
}
