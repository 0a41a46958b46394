/**
 * `tskvm probe`: what this host's KVM offers and what that means for tskvm.
 */
import { Kvm, REQUIRED_CAPS } from "../kvm/kvm";
import { Cap, CapName, KVM_API_VERSION } from "../kvm/abi";
import { CPU_FEATURES, CPU_TEMPLATES, hasFeature, vendorString } from "../kvm/cpuid";
import { detectHostKvm, defaultCpuTemplate } from "../kvm/host";
import { chooseIoEngine, describeIoEngine } from "../host/io-engine";
import { ExitCode } from "./exit-codes";
import { PROBE_USAGE, parseProbeArgs } from "./args";

export function runProbe(argv: readonly string[]): number {
  const opts = parseProbeArgs(argv);
  if (opts.help) {
    process.stdout.write(`${PROBE_USAGE}\n`);
    return ExitCode.OK;
  }
  const json = opts.json;
  const kvm = Kvm.open(opts.kvmDevice);
  try {
    const host = detectHostKvm();
    const caps = Object.fromEntries((Object.keys(Cap) as CapName[]).map((c) => [c, kvm.checkExtension(c)]));
    const missing = REQUIRED_CAPS.filter(([c]) => (caps[c] ?? 0) <= 0).map(([c]) => c);
    const cpuid = kvm.supportedCpuid();
    const features = CPU_FEATURES.filter((f) => hasFeature(cpuid, f.name)).map((f) => f.name);
    const template = defaultCpuTemplate(host.kind);
    const ioEngine = chooseIoEngine("auto");
    const report = {
      device: kvm.path,
      apiVersion: kvm.apiVersion(),
      host: host.kind,
      hostModule: host.module,
      hostLabel: host.label,
      hypervisor: host.hypervisor ?? null,
      softwareEmulated: host.softwareEmulated,
      summary: host.summary,
      vcpus: kvm.vcpuLimits(),
      vcpuMmapSize: kvm.vcpuMmapSize(),
      capabilities: caps,
      missingRequired: missing,
      cpuid: { vendor: vendorString(cpuid), entries: cpuid.length, features },
      defaultCpuTemplate: template,
      ioEngine: describeIoEngine(ioEngine),
    };
    if (json) {
      process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
    } else {
      const lines = [
        `KVM device:        ${report.device} (API ${report.apiVersion}${report.apiVersion === KVM_API_VERSION ? ", ok" : ", unsupported"})`,
        `Host KVM:          ${host.label} (${host.module || "no module"}): ${host.summary}`,
        `This host:         ${host.hypervisor !== undefined ? `a virtual machine under ${host.hypervisor} (by its CPUID)` : "not a virtual machine (by its CPUID)"}`,
        `vCPUs:             recommended ${report.vcpus.recommended}, max ${report.vcpus.max}`,
        `Capabilities:      ${Object.entries(caps).map(([c, v]) => `${c}=${v}`).join(" ")}`,
        `Required by tskvm: ${missing.length === 0 ? "all present" : `MISSING ${missing.join(", ")}`}`,
        `CPUID:             ${report.cpuid.vendor}, ${report.cpuid.entries} entries; features: ${features.join(" ")}`,
        `CPU template:      ${template} (${CPU_TEMPLATES[template]!.description})`,
        `I/O engine:        ${ioEngine.name === "io_uring" ? "io_uring (a queue drain per system call)" : `sync, a system call per request: ${ioEngine.fallbackReason ?? "chosen"}`}`,
      ];
      process.stdout.write(`${lines.join("\n")}\n`);
    }
    return missing.length === 0 ? ExitCode.OK : ExitCode.HOST;
  } finally {
    kvm.close();
  }
}
