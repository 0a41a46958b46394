/**
 * What kind of KVM a host has (tskvm probe, the CPU template, where CI runs each tier):
 * hardware, nested (under a hardware hypervisor, or on QEMU's emulated SVM), kvm-pvm.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { defaultCpuTemplate, detectHostKvm, hypervisorName, probeHostCpu } from "../../src/kvm/host";
import { hostCpuid } from "../../src/sys/cpuid";

const root = mkdtempSync(join(tmpdir(), "tskvm-host-"));
process.on("exit", () => rmSync(root, { recursive: true, force: true }));
function modules(...names: string[]): string {
  const dir = mkdtempSync(join(root, "sys-module-"));
  for (const n of names) mkdirSync(join(dir, n));
  return dir;
}

test("kvm-pvm: emulated template, software speed, whatever the CPU says", () => {
  const h = detectHostKvm(modules("kvm", "kvm_pvm"), { isVm: true, hypervisorSignature: "KVMKVMKVM\0\0\0" });
  assert.equal(h.kind, "emulated-pvm");
  assert.equal(h.label, "kvm-pvm");
  assert.equal(h.softwareEmulated, true);
  assert.equal(h.hypervisor, "KVM");
  assert.equal(defaultCpuTemplate(h.kind), "emulated");
  assert.match(h.summary, /interpreted.*cannot\s+reach user space/);
});

test("hardware KVM: not a VM by CPUID", () => {
  const h = detectHostKvm(modules("kvm", "kvm_intel"), { isVm: false });
  assert.deepEqual([h.kind, h.label, h.softwareEmulated, h.hypervisor], ["hardware-intel", "hardware KVM (VT-x)", false, undefined]);
  assert.equal(defaultCpuTemplate(h.kind), "host");
  assert.equal(detectHostKvm(modules("kvm", "kvm_amd"), { isVm: false }).label, "hardware KVM (AMD-V)");
});

test("nested on QEMU's emulated SVM (the harness VM): hardware semantics, software speed", () => {
  const h = detectHostKvm(modules("kvm", "kvm_amd"), { isVm: true, hypervisorSignature: "TCGTCGTCGTCG" });
  assert.deepEqual([h.kind, h.label, h.hypervisor, h.softwareEmulated], ["nested-amd", "nested SVM on QEMU TCG", "QEMU TCG", true]);
  assert.equal(defaultCpuTemplate(h.kind), "host");
  assert.match(h.summary, /stock kernels boot/);
});

test("nested under a hardware hypervisor: near-native speed, costlier exits", () => {
  const h = detectHostKvm(modules("kvm", "kvm_intel"), { isVm: true, hypervisorSignature: "Microsoft Hv" });
  assert.deepEqual([h.kind, h.label, h.softwareEmulated], ["nested-intel", "nested VMX under Hyper-V", false]);
  assert.match(h.summary, /hardware speed/);
  assert.equal(detectHostKvm(modules("kvm_amd"), { isVm: true }).label, "nested SVM under a hypervisor");
  assert.equal(detectHostKvm(modules(), { isVm: false }).kind, "unknown");
});

test("hypervisor signatures by name", () => {
  assert.equal(hypervisorName("KVMKVMKVM\0\0\0"), "KVM");
  assert.equal(hypervisorName("TCGTCGTCGTCG"), "QEMU TCG");
  assert.equal(hypervisorName("VMwareVMware"), "VMware");
  assert.equal(hypervisorName("NewVisor\0\0\0\0"), "NewVisor");
  assert.equal(hypervisorName("\0\0\0\0"), "an unnamed hypervisor");
});

test("the host's CPUID agrees with /proc/cpuinfo", { skip: process.arch === "x64" ? false : "x86-64 only" }, () => {
  const leaf0 = hostCpuid(0);
  assert.ok(leaf0 !== undefined, "CPUID can be executed");
  const vendor = Buffer.alloc(12);
  vendor.writeUInt32LE(leaf0.ebx, 0);
  vendor.writeUInt32LE(leaf0.edx, 4);
  vendor.writeUInt32LE(leaf0.ecx, 8);
  const cpuinfo = readFileSync("/proc/cpuinfo", "latin1");
  assert.equal(vendor.toString("latin1"), /^vendor_id\s*:\s*(\S+)/m.exec(cpuinfo)![1]);
  assert.equal(probeHostCpu().isVm, /^flags\s*:.*\bhypervisor\b/m.test(cpuinfo));
});
