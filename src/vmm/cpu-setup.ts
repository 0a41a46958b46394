/**
 * Per-vCPU state a PC BIOS would leave behind before jumping to a kernel: model-specific
 * registers and the local APIC's LINT0/LINT1 wiring.
 */
import type { MsrEntry, Vcpu } from "../kvm/vcpu";

export const Msr = {
  IA32_TSC: 0x10,
  IA32_SYSENTER_CS: 0x174,
  IA32_SYSENTER_ESP: 0x175,
  IA32_SYSENTER_EIP: 0x176,
  IA32_MISC_ENABLE: 0x1a0,
  MTRR_DEF_TYPE: 0x2ff,
  STAR: 0xc0000081,
  LSTAR: 0xc0000082,
  CSTAR: 0xc0000083,
  SYSCALL_MASK: 0xc0000084,
  KERNEL_GS_BASE: 0xc0000102,
} as const;

const MISC_ENABLE_FAST_STRING = 1n;
/** MTRRs enabled, default memory type write-back. */
const MTRR_DEF_TYPE_ENABLED_WB = (1n << 11n) | 6n;

export function bootMsrs(): MsrEntry[] {
  return [
    { index: Msr.IA32_SYSENTER_CS, data: 0n },
    { index: Msr.IA32_SYSENTER_ESP, data: 0n },
    { index: Msr.IA32_SYSENTER_EIP, data: 0n },
    { index: Msr.STAR, data: 0n },
    { index: Msr.CSTAR, data: 0n },
    { index: Msr.KERNEL_GS_BASE, data: 0n },
    { index: Msr.SYSCALL_MASK, data: 0n },
    { index: Msr.LSTAR, data: 0n },
    { index: Msr.IA32_TSC, data: 0n },
    { index: Msr.IA32_MISC_ENABLE, data: MISC_ENABLE_FAST_STRING },
    { index: Msr.MTRR_DEF_TYPE, data: MTRR_DEF_TYPE_ENABLED_WB },
  ];
}

/**
 * Set the boot MSRs one by one: KVM_SET_MSRS stops at the first MSR it refuses, and an
 * emulating KVM may not know all of them. Returns the indices it refused.
 */
export function applyBootMsrs(vcpu: Vcpu): number[] {
  const refused: number[] = [];
  for (const msr of bootMsrs()) if (vcpu.setMsrs([msr]) !== 1) refused.push(msr.index);
  return refused;
}

const APIC_LVT_LINT0 = 0x350;
const APIC_LVT_LINT1 = 0x360;
const APIC_DELIVERY_MODE_MASK = 0x700;
const APIC_MODE_NMI = 4;
const APIC_MODE_EXTINT = 7;

/**
 * LINT0 delivers the 8259 PIC's interrupts (ExtINT) and LINT1 is the NMI line, as on a PC
 * and as the MP table's local interrupt entries say. Needs the in-kernel irqchip.
 */
export function configureLapicForBoot(vcpu: Vcpu): void {
  const lapic = vcpu.getLapic();
  const dv = new DataView(lapic.buffer, lapic.byteOffset, lapic.byteLength);
  const setMode = (reg: number, mode: number) =>
    dv.setUint32(reg, ((dv.getUint32(reg, true) & ~APIC_DELIVERY_MODE_MASK) | (mode << 8)) >>> 0, true);
  setMode(APIC_LVT_LINT0, APIC_MODE_EXTINT);
  setMode(APIC_LVT_LINT1, APIC_MODE_NMI);
  vcpu.setLapic(lapic);
}
