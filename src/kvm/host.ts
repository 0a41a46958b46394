/**
 * What kind of KVM this host has. Hardware KVM (VT-x / AMD-V) runs guest code natively;
 * kvm-pvm is a software hypervisor that interprets guest kernel code (~1000x slower) and
 * lacks some instructions, so tskvm picks the "emulated" CPU template there.
 */
import { existsSync } from "node:fs";

export type HostKvmKind = "hardware-intel" | "hardware-amd" | "emulated-pvm" | "unknown";

export interface HostKvmInfo {
  kind: HostKvmKind;
  module: string;
  summary: string;
}

export function detectHostKvm(sysModuleDir = "/sys/module"): HostKvmInfo {
  const has = (m: string) => existsSync(`${sysModuleDir}/${m}`);
  if (has("kvm_pvm")) {
    return {
      kind: "emulated-pvm",
      module: "kvm_pvm",
      summary:
        "emulating KVM (kvm-pvm): guest kernel code is interpreted at roughly 1M instructions/s, " +
        "some instructions are missing (tskvm hides their CPUID bits), and an unmodified Linux cannot " +
        "reach user space; use the default guest (npm run guest), expect about a minute to boot",
    };
  }
  if (has("kvm_intel")) {
    return { kind: "hardware-intel", module: "kvm_intel", summary: "hardware KVM (Intel VT-x)" };
  }
  if (has("kvm_amd")) {
    return { kind: "hardware-amd", module: "kvm_amd", summary: "hardware KVM (AMD-V)" };
  }
  return { kind: "unknown", module: "", summary: "KVM of an unknown kind (no kvm_intel, kvm_amd or kvm_pvm module)" };
}

/** The CPU template tskvm uses by default on this kind of host. */
export function defaultCpuTemplate(kind: HostKvmKind): "host" | "emulated" {
  return kind === "emulated-pvm" ? "emulated" : "host";
}
