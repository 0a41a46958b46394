/**
 * The KVM user-space ABI from <linux/kvm.h> and <asm/kvm.h>, x86-64: ioctl numbers built
 * with the kernel's _IO/_IOR/_IOW/_IOWR rules from struct sizes, and struct layouts as byte
 * offsets. test/unit/abi.test.ts compiles native/abi_check.c against the host's headers and
 * compares every number here with what the C compiler says.
 */

import { io, ior, iow, iowr } from "../sys/ioctl-number";

const KVMIO = 0xae;

// ---- struct layouts: sizes and field offsets ----

export const KvmRegs = {
  size: 144,
  // 18 u64 in this order.
  fields: [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
  ] as const,
} as const;
export type RegName = (typeof KvmRegs.fields)[number];

export const KvmSegment = {
  size: 24,
  base: 0, limit: 8, selector: 12, type: 14, present: 15, dpl: 16,
  db: 17, s: 18, l: 19, g: 20, avl: 21, unusable: 22,
} as const;

export const KvmDtable = { size: 16, base: 0, limit: 8 } as const;

export const KvmSregs = {
  size: 312,
  cs: 0, ds: 24, es: 48, fs: 72, gs: 96, ss: 120, tr: 144, ldt: 168,
  gdt: 192, idt: 208,
  cr0: 224, cr2: 232, cr3: 240, cr4: 248, cr8: 256, efer: 264, apic_base: 272,
  interrupt_bitmap: 280,
} as const;

export const KvmRun = {
  request_interrupt_window: 0,
  immediate_exit: 1,
  exit_reason: 8,
  ready_for_interrupt_injection: 12,
  if_flag: 13,
  flags: 14,
  cr8: 16,
  apic_base: 24,
  /** Start of the exit-reason union. */
  exit: 32,
  io: { direction: 32, size: 33, port: 34, count: 36, data_offset: 40 },
  mmio: { phys_addr: 32, data: 40, len: 48, is_write: 52 },
  hw: { hardware_exit_reason: 32 },
  fail_entry: { hardware_entry_failure_reason: 32, cpu: 40 },
  ex: { exception: 32, error_code: 36 },
  internal: { suberror: 32, ndata: 36, data: 40 },
  system_event: { type: 32, ndata: 36, data: 40 },
  kvm_valid_regs: 288,
  kvm_dirty_regs: 296,
  /** sizeof(struct kvm_run) */
  size: 2352,
} as const;

export const KvmUserspaceMemoryRegion = {
  size: 32, slot: 0, flags: 4, guest_phys_addr: 8, memory_size: 16, userspace_addr: 24,
} as const;

export const KvmCpuidEntry2 = {
  size: 40, function: 0, index: 4, flags: 8, eax: 12, ebx: 16, ecx: 20, edx: 24,
} as const;
export const KvmCpuid2 = { size: 8, nent: 0, entries: 8 } as const;

export const KvmMsrEntry = { size: 16, index: 0, data: 8 } as const;
export const KvmMsrs = { size: 8, nmsrs: 0, entries: 8 } as const;
export const KvmMsrList = { size: 4, nmsrs: 0, indices: 4 } as const;

export const KvmLapicState = { size: 1024 } as const;
export const KvmPitConfig = { size: 64, flags: 0 } as const;
export const KvmIrqLevel = { size: 8, irq: 0, level: 4 } as const;
export const KvmIoeventfd = { size: 64, datamatch: 0, addr: 8, len: 16, fd: 20, flags: 24 } as const;
export const KvmIrqfd = { size: 32, fd: 0, gsi: 4, flags: 8, resamplefd: 12 } as const;
/** struct kvm_coalesced_mmio_zone: `pio` is a union with `pad`. */
export const KvmCoalescedMmioZone = { size: 16, addr: 0, size_: 8, pio: 12 } as const;
/** The coalesced ring (struct kvm_coalesced_mmio_ring) and its entries (struct kvm_coalesced_mmio). */
export const KvmCoalescedMmioRing = { first: 0, last: 4, coalesced_mmio: 8 } as const;
export const KvmCoalescedMmio = { size: 24, phys_addr: 0, len: 8, pio: 12, data: 16 } as const;
export const KvmMpState = { size: 4, mp_state: 0 } as const;
export const KvmMsi = { size: 32, address_lo: 0, address_hi: 4, data: 8, flags: 12, devid: 16 } as const;
export const KvmIrqRouting = { size: 8, nr: 0, flags: 4, entries: 8 } as const;
export const KvmIrqRoutingEntry = {
  size: 48, gsi: 0, type: 4, flags: 8,
  /** union u: irqchip {irqchip, pin} or msi {address_lo, address_hi, data, devid} */
  u: 16,
} as const;
export const KvmFpu = { size: 416 } as const;

// State save/restore (snapshots). Kernel structs kept whole as bytes by src/kvm/vcpu-state.ts
// and vm-state.ts; the offsets are for the fields tskvm reads or checks.

/** struct kvm_xsave: the legacy 4 KiB buffer; KVM_GET_XSAVE2 may want more (KVM_CAP_XSAVE2). */
export const KvmXsave = { size: 4096 } as const;
export const KvmXcr = { size: 16, xcr: 0, value: 8 } as const;
export const KvmXcrs = { size: 392, nr_xcrs: 0, flags: 4, xcrs: 8 } as const;
export const KvmDebugregs = { size: 128, db: 0, dr6: 32, dr7: 40, flags: 48 } as const;
export const KvmVcpuEvents = {
  size: 64,
  exception: { injected: 0, nr: 1, has_error_code: 2, pending: 3, error_code: 4 },
  interrupt: { injected: 8, nr: 9, soft: 10, shadow: 11 },
  nmi: { injected: 12, pending: 13, masked: 14 },
  sipi_vector: 16,
  flags: 20,
  smi: { smm: 24, pending: 25, smm_inside_nmi: 26, latched_init: 27 },
  triple_fault: { pending: 28 },
  exception_has_payload: 55,
  exception_payload: 56,
} as const;
/** struct kvm_irqchip: chip_id, then a 512-byte union (PIC or IOAPIC state). */
export const KvmIrqchip = { size: 520, chip_id: 0, chip: 8 } as const;
export const KvmPicState = {
  size: 16, last_irr: 0, irr: 1, imr: 2, isr: 3, priority_add: 4, irq_base: 5, read_reg_select: 6,
  poll: 7, special_mask: 8, init_state: 9, auto_eoi: 10, rotate_on_auto_eoi: 11,
  special_fully_nested_mode: 12, init4: 13, elcr: 14, elcr_mask: 15,
} as const;
export const KvmIoapicState = { size: 216, base_address: 0, ioregsel: 8, id: 12, irr: 16, redirtbl: 24 } as const;
export const KvmPitChannelState = {
  size: 24, count: 0, latched_count: 4, count_latched: 6, status_latched: 7, status: 8, read_state: 9,
  write_state: 10, write_latch: 11, rw_mode: 12, mode: 13, bcd: 14, gate: 15, count_load_time: 16,
} as const;
export const KvmPitState2 = { size: 112, channels: 0, flags: 72 } as const;
export const KvmClockData = { size: 48, clock: 0, flags: 8, realtime: 16, host_tsc: 24 } as const;

// ---- ioctls ----

export const Ioctl = {
  // /dev/kvm
  GET_API_VERSION: io(KVMIO, 0x00),
  CREATE_VM: io(KVMIO, 0x01),
  GET_MSR_INDEX_LIST: iowr(KVMIO, 0x02, KvmMsrList.size),
  CHECK_EXTENSION: io(KVMIO, 0x03),
  GET_VCPU_MMAP_SIZE: io(KVMIO, 0x04),
  GET_SUPPORTED_CPUID: iowr(KVMIO, 0x05, KvmCpuid2.size),
  // VM
  CREATE_VCPU: io(KVMIO, 0x41),
  SET_USER_MEMORY_REGION: iow(KVMIO, 0x46, KvmUserspaceMemoryRegion.size),
  SET_TSS_ADDR: io(KVMIO, 0x47),
  SET_IDENTITY_MAP_ADDR: iow(KVMIO, 0x48, 8),
  CREATE_IRQCHIP: io(KVMIO, 0x60),
  IRQ_LINE: iow(KVMIO, 0x61, KvmIrqLevel.size),
  SET_GSI_ROUTING: iow(KVMIO, 0x6a, KvmIrqRouting.size),
  IRQFD: iow(KVMIO, 0x76, KvmIrqfd.size),
  CREATE_PIT2: iow(KVMIO, 0x77, KvmPitConfig.size),
  IOEVENTFD: iow(KVMIO, 0x79, KvmIoeventfd.size),
  REGISTER_COALESCED_MMIO: iow(KVMIO, 0x67, KvmCoalescedMmioZone.size),
  UNREGISTER_COALESCED_MMIO: iow(KVMIO, 0x68, KvmCoalescedMmioZone.size),
  SIGNAL_MSI: iow(KVMIO, 0xa5, KvmMsi.size),
  // vCPU
  RUN: io(KVMIO, 0x80),
  GET_REGS: ior(KVMIO, 0x81, KvmRegs.size),
  SET_REGS: iow(KVMIO, 0x82, KvmRegs.size),
  GET_SREGS: ior(KVMIO, 0x83, KvmSregs.size),
  SET_SREGS: iow(KVMIO, 0x84, KvmSregs.size),
  GET_MSRS: iowr(KVMIO, 0x88, KvmMsrs.size),
  SET_MSRS: iow(KVMIO, 0x89, KvmMsrs.size),
  GET_FPU: ior(KVMIO, 0x8c, KvmFpu.size),
  SET_FPU: iow(KVMIO, 0x8d, KvmFpu.size),
  GET_LAPIC: ior(KVMIO, 0x8e, KvmLapicState.size),
  SET_LAPIC: iow(KVMIO, 0x8f, KvmLapicState.size),
  SET_CPUID2: iow(KVMIO, 0x90, KvmCpuid2.size),
  GET_CPUID2: iowr(KVMIO, 0x91, KvmCpuid2.size),
  GET_MP_STATE: ior(KVMIO, 0x98, KvmMpState.size),
  SET_MP_STATE: iow(KVMIO, 0x99, KvmMpState.size),
  // State save/restore (snapshots)
  GET_MSR_FEATURE_INDEX_LIST: iowr(KVMIO, 0x0a, KvmMsrList.size),
  GET_IRQCHIP: iowr(KVMIO, 0x62, KvmIrqchip.size),
  // _IOR although user space passes the state in: a historical mistake the ABI keeps.
  SET_IRQCHIP: ior(KVMIO, 0x63, KvmIrqchip.size),
  SET_CLOCK: iow(KVMIO, 0x7b, KvmClockData.size),
  GET_CLOCK: ior(KVMIO, 0x7c, KvmClockData.size),
  GET_PIT2: ior(KVMIO, 0x9f, KvmPitState2.size),
  SET_PIT2: iow(KVMIO, 0xa0, KvmPitState2.size),
  GET_VCPU_EVENTS: ior(KVMIO, 0x9f, KvmVcpuEvents.size),
  SET_VCPU_EVENTS: iow(KVMIO, 0xa0, KvmVcpuEvents.size),
  GET_DEBUGREGS: ior(KVMIO, 0xa1, KvmDebugregs.size),
  SET_DEBUGREGS: iow(KVMIO, 0xa2, KvmDebugregs.size),
  SET_TSC_KHZ: io(KVMIO, 0xa2),
  GET_TSC_KHZ: io(KVMIO, 0xa3),
  GET_XSAVE: ior(KVMIO, 0xa4, KvmXsave.size),
  SET_XSAVE: iow(KVMIO, 0xa5, KvmXsave.size),
  GET_XCRS: ior(KVMIO, 0xa6, KvmXcrs.size),
  SET_XCRS: iow(KVMIO, 0xa7, KvmXcrs.size),
  KVMCLOCK_CTRL: io(KVMIO, 0xad),
  GET_XSAVE2: ior(KVMIO, 0xcf, KvmXsave.size),
} as const;
export type IoctlName = keyof typeof Ioctl;

// ---- constants ----

export const KVM_API_VERSION = 12;

export const Cap = {
  IRQCHIP: 0,
  HLT: 1,
  USER_MEMORY: 3,
  SET_TSS_ADDR: 4,
  EXT_CPUID: 7,
  NR_VCPUS: 9,
  NR_MEMSLOTS: 10,
  PIT: 11,
  MP_STATE: 14,
  COALESCED_MMIO: 15,
  IRQ_ROUTING: 25,
  IRQ_INJECT_STATUS: 26,
  IRQFD: 32,
  PIT2: 33,
  PIT_STATE2: 35,
  IOEVENTFD: 36,
  SET_IDENTITY_MAP_ADDR: 37,
  MAX_VCPUS: 66,
  TSC_DEADLINE_TIMER: 72,
  SIGNAL_MSI: 77,
  IRQFD_RESAMPLE: 82,
  MAX_VCPU_ID: 128,
  IMMEDIATE_EXIT: 136,
  // State save/restore (snapshots)
  ADJUST_CLOCK: 39,
  VCPU_EVENTS: 41,
  DEBUGREGS: 50,
  XSAVE: 55,
  XCRS: 56,
  TSC_CONTROL: 60,
  GET_TSC_KHZ: 61,
  KVMCLOCK_CTRL: 76,
  GET_MSR_FEATURES: 153,
  XSAVE2: 208,
  COALESCED_PIO: 162,
} as const;
export type CapName = keyof typeof Cap;

export const ExitReason = {
  UNKNOWN: 0,
  EXCEPTION: 1,
  IO: 2,
  HYPERCALL: 3,
  DEBUG: 4,
  HLT: 5,
  MMIO: 6,
  IRQ_WINDOW_OPEN: 7,
  SHUTDOWN: 8,
  FAIL_ENTRY: 9,
  INTR: 10,
  SET_TPR: 11,
  TPR_ACCESS: 12,
  NMI: 16,
  INTERNAL_ERROR: 17,
  SYSTEM_EVENT: 24,
  IOAPIC_EOI: 26,
  X86_RDMSR: 29,
  X86_WRMSR: 30,
  X86_BUS_LOCK: 33,
  NOTIFY: 37,
} as const;

export function exitReasonName(reason: number): string {
  for (const [name, value] of Object.entries(ExitReason)) if (value === reason) return name;
  return `exit reason ${reason}`;
}

export const IoDirection = { IN: 0, OUT: 1 } as const;

export const SystemEvent = {
  SHUTDOWN: 1,
  RESET: 2,
  CRASH: 3,
  WAKEUP: 4,
  SUSPEND: 5,
  SEV_TERM: 6,
} as const;

export const InternalErrorSuberror = {
  EMULATION: 1,
  SIMUL_EX: 2,
  DELIVERY_EV: 3,
  UNEXPECTED_EXIT_REASON: 4,
} as const;

export const MpState = {
  RUNNABLE: 0,
  UNINITIALIZED: 1,
  INIT_RECEIVED: 2,
  HALTED: 3,
  SIPI_RECEIVED: 4,
} as const;

export const KVM_PIT_SPEAKER_DUMMY = 1;
export const KVM_IRQFD_FLAG_DEASSIGN = 1;
export const KVM_IRQFD_FLAG_RESAMPLE = 2;
export const KVM_IOEVENTFD_FLAG_DATAMATCH = 1;
export const KVM_IOEVENTFD_FLAG_PIO = 2;
export const KVM_IOEVENTFD_FLAG_DEASSIGN = 4;
/** The page of the vCPU mapping that holds the coalesced ring (x86), and its entry count. */
export const KVM_COALESCED_MMIO_PAGE_OFFSET = 2;
export const KVM_COALESCED_MMIO_MAX = 170;
export const KVM_IRQ_ROUTING_IRQCHIP = 1;
export const KVM_IRQ_ROUTING_MSI = 2;

/** KVM_GET/SET_IRQCHIP chip ids. */
export const IrqchipId = { PIC_MASTER: 0, PIC_SLAVE: 1, IOAPIC: 2 } as const;
export const KVM_IOAPIC_NUM_PINS = 24;
export const KVM_MAX_XCRS = 16;
/** kvm_clock_data.flags: KVM_GET_CLOCK reports them; KVM_SET_CLOCK accepts only KVM_CLOCK_REALTIME. */
export const KVM_CLOCK_TSC_STABLE = 2;
export const KVM_CLOCK_REALTIME = 4;
export const KVM_CLOCK_HOST_TSC = 8;
export const KVM_VCPUEVENT_VALID_NMI_PENDING = 1;
export const KVM_VCPUEVENT_VALID_SIPI_VECTOR = 2;
export const KVM_VCPUEVENT_VALID_SHADOW = 4;
export const KVM_VCPUEVENT_VALID_SMM = 8;
