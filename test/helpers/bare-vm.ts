/**
 * A VM built from the KVM handles alone, with no worker threads: the test drives KVM_RUN on
 * its own thread and can read or replace every piece of state between exits. Built the way
 * Machine builds one (irqchip, PIT, CPUID template, boot MSRs, LAPIC wiring).
 */
import { Kvm, Vm } from "../../src/kvm/kvm";
import { Vcpu } from "../../src/kvm/vcpu";
import { CPU_TEMPLATES, resolveHiddenFeatures, vcpuCpuid } from "../../src/kvm/cpuid";
import { defaultCpuTemplate, detectHostKvm } from "../../src/kvm/host";
import { GuestMemory } from "../../src/memory/guest-memory";
import { KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR } from "../../src/arch/x86/layout";
import { applyBootMsrs, configureLapicForBoot } from "../../src/vmm/cpu-setup";
import { applyBootState } from "../../src/vmm/machine";
import { prepareBoot, type BootSource } from "../../src/vmm/boot-source";
import type { VcpuExit } from "../../src/kvm/vcpu-exit";

export interface BareVm {
  kvm: Kvm;
  vm: Vm;
  memory: GuestMemory;
  vcpus: Vcpu[];
  destroy(): void;
}

/**
 * A VM with `cpus` vCPUs and `memoryBytes` of RAM. With `boot`, the code is loaded and the
 * BSP gets the boot state; without, the VM is an empty shell for a restore.
 */
export function createBareVm(opts: { cpus: number; memoryBytes: number; boot?: BootSource; memory?: GuestMemory }): BareVm {
  const kvm = Kvm.open();
  const vm = kvm.createVm();
  vm.setIdentityMapAddress(KVM_IDENTITY_MAP_ADDR);
  vm.setTssAddress(KVM_TSS_ADDR);
  vm.createIrqchip();
  vm.createPit();
  const memory = opts.memory ?? GuestMemory.allocate(opts.memoryBytes);
  memory.regions.forEach((r, slot) => vm.setMemoryRegion(slot, r.base, r.size, r.hostAddress!));
  const template = CPU_TEMPLATES[defaultCpuTemplate(detectHostKvm().kind)]!;
  const hidden = resolveHiddenFeatures([...template.hide]);
  const supported = kvm.supportedCpuid();
  const boot = opts.boot !== undefined ? prepareBoot(memory, opts.boot, { cpus: opts.cpus, extraCmdline: [] }) : undefined;
  const vcpus: Vcpu[] = [];
  for (let id = 0; id < opts.cpus; id++) {
    const vcpu = Vcpu.map(id, vm.createVcpu(id), kvm.vcpuMmapSize());
    vcpus.push(vcpu);
    if (boot === undefined) continue;
    vcpu.setCpuid(vcpuCpuid(supported, { apicId: id, vcpuCount: opts.cpus, hidden }));
    applyBootMsrs(vcpu);
    configureLapicForBoot(vcpu);
    if (id === 0) applyBootState(vcpu, boot.cpu);
  }
  return {
    kvm,
    vm,
    memory,
    vcpus,
    destroy() {
      for (const v of vcpus) v.destroy();
      memory.free();
      vm.close();
      kvm.close();
    },
  };
}

/** Run a vCPU on this thread until its next exit to user space (signals meant for others are skipped). */
export function runToExit(vcpu: Vcpu): VcpuExit {
  for (;;) {
    const exit = vcpu.run();
    if (exit.kind !== "interrupted") return exit;
  }
}

/** The port of a PIO exit, or a failure naming the exit. */
export function ioExitPort(exit: VcpuExit): number {
  if (exit.kind !== "pio") throw new Error(`exit ${exit.kind} is not PIO`);
  return exit.port;
}

/**
 * Complete the exit just taken without running guest code: KVM_RUN with immediate_exit set
 * finishes a pending PIO/MMIO instruction and returns EINTR at once. KVM's api.rst: the
 * state of an unfinished exit is in no ioctl's answer, so this must precede a state save.
 */
export function completePendingExit(vcpu: Vcpu): void {
  vcpu.setImmediateExit(true);
  const exit = vcpu.run();
  vcpu.setImmediateExit(false);
  if (exit.kind !== "interrupted") throw new Error(`KVM_RUN with immediate_exit returned ${exit.kind} instead of EINTR`);
}
