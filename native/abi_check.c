/*
 * abi_check.c - print the KVM user-space ABI as the host's C headers define it.
 *
 * test/unit/abi.test.ts compiles this file (via scripts/lib/native.ts), runs it and
 * compares every line with the value src/kvm/abi.ts exports. Output: one entry per line,
 * "name value", value in decimal. Names follow the TypeScript export paths mechanically:
 *
 *   KvmRun.io.port       offsetof(struct kvm_run, io.port)      (struct layouts: Kvm*)
 *   KvmRun.size          sizeof(struct kvm_run)
 *   KvmRegs.rip          offsetof(struct kvm_regs, rip)         (KvmRegs.fields[i])
 *   Ioctl.GET_REGS       KVM_GET_REGS                           (Ioctl.X  -> KVM_X)
 *   Cap.IRQCHIP          KVM_CAP_IRQCHIP                        (Cap.X    -> KVM_CAP_X)
 *   ExitReason.IO        KVM_EXIT_IO                            (and so on, see below)
 *   KVM_API_VERSION      KVM_API_VERSION                        (top-level constants)
 *
 * The test fails both on a line it does not know (something printed here that abi.ts
 * does not export) and on an abi.ts entry that no line covers, so adding a value to
 * abi.ts means adding its line here.
 */
#include <stddef.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

/* sizeof(struct) as "<Ts>.size". */
#define SIZE(ts, ctype) printf("%s.size %zu\n", ts, sizeof(ctype))
/* offsetof(struct, member) as "<Ts>.<member>"; member may be a path such as io.port. */
#define OFF(ts, ctype, member) printf("%s.%s %zu\n", ts, #member, offsetof(ctype, member))
/* offsetof under a TS name that differs from the C member path. */
#define OFF_AS(ts, name, ctype, member) printf("%s.%s %zu\n", ts, name, offsetof(ctype, member))
/*
 * A constant as "<group>.<name>". The wrappers below (IOCTL, CAP, ...) stringify and paste
 * their argument themselves, so a name such as DEBUG is never macro-expanded on the way.
 */
#define CONST(group, name, value) printf("%s.%s %llu\n", group, name, (unsigned long long)(value))
/* A top-level constant, same name in C and TS. */
#define TOP(x) printf("%s %llu\n", #x, (unsigned long long)(x))

static void layouts(void)
{
	/* struct kvm_regs: 18 u64; abi.ts lists them in order in KvmRegs.fields. */
	SIZE("KvmRegs", struct kvm_regs);
	OFF("KvmRegs", struct kvm_regs, rax);
	OFF("KvmRegs", struct kvm_regs, rbx);
	OFF("KvmRegs", struct kvm_regs, rcx);
	OFF("KvmRegs", struct kvm_regs, rdx);
	OFF("KvmRegs", struct kvm_regs, rsi);
	OFF("KvmRegs", struct kvm_regs, rdi);
	OFF("KvmRegs", struct kvm_regs, rsp);
	OFF("KvmRegs", struct kvm_regs, rbp);
	OFF("KvmRegs", struct kvm_regs, r8);
	OFF("KvmRegs", struct kvm_regs, r9);
	OFF("KvmRegs", struct kvm_regs, r10);
	OFF("KvmRegs", struct kvm_regs, r11);
	OFF("KvmRegs", struct kvm_regs, r12);
	OFF("KvmRegs", struct kvm_regs, r13);
	OFF("KvmRegs", struct kvm_regs, r14);
	OFF("KvmRegs", struct kvm_regs, r15);
	OFF("KvmRegs", struct kvm_regs, rip);
	OFF("KvmRegs", struct kvm_regs, rflags);

	SIZE("KvmSegment", struct kvm_segment);
	OFF("KvmSegment", struct kvm_segment, base);
	OFF("KvmSegment", struct kvm_segment, limit);
	OFF("KvmSegment", struct kvm_segment, selector);
	OFF("KvmSegment", struct kvm_segment, type);
	OFF("KvmSegment", struct kvm_segment, present);
	OFF("KvmSegment", struct kvm_segment, dpl);
	OFF("KvmSegment", struct kvm_segment, db);
	OFF("KvmSegment", struct kvm_segment, s);
	OFF("KvmSegment", struct kvm_segment, l);
	OFF("KvmSegment", struct kvm_segment, g);
	OFF("KvmSegment", struct kvm_segment, avl);
	OFF("KvmSegment", struct kvm_segment, unusable);

	SIZE("KvmDtable", struct kvm_dtable);
	OFF("KvmDtable", struct kvm_dtable, base);
	OFF("KvmDtable", struct kvm_dtable, limit);

	SIZE("KvmSregs", struct kvm_sregs);
	OFF("KvmSregs", struct kvm_sregs, cs);
	OFF("KvmSregs", struct kvm_sregs, ds);
	OFF("KvmSregs", struct kvm_sregs, es);
	OFF("KvmSregs", struct kvm_sregs, fs);
	OFF("KvmSregs", struct kvm_sregs, gs);
	OFF("KvmSregs", struct kvm_sregs, ss);
	OFF("KvmSregs", struct kvm_sregs, tr);
	OFF("KvmSregs", struct kvm_sregs, ldt);
	OFF("KvmSregs", struct kvm_sregs, gdt);
	OFF("KvmSregs", struct kvm_sregs, idt);
	OFF("KvmSregs", struct kvm_sregs, cr0);
	OFF("KvmSregs", struct kvm_sregs, cr2);
	OFF("KvmSregs", struct kvm_sregs, cr3);
	OFF("KvmSregs", struct kvm_sregs, cr4);
	OFF("KvmSregs", struct kvm_sregs, cr8);
	OFF("KvmSregs", struct kvm_sregs, efer);
	OFF("KvmSregs", struct kvm_sregs, apic_base);
	OFF("KvmSregs", struct kvm_sregs, interrupt_bitmap);

	/* struct kvm_run: the fixed header, the exit union and the sync-regs words. */
	SIZE("KvmRun", struct kvm_run);
	OFF("KvmRun", struct kvm_run, request_interrupt_window);
	OFF("KvmRun", struct kvm_run, immediate_exit);
	OFF("KvmRun", struct kvm_run, exit_reason);
	OFF("KvmRun", struct kvm_run, ready_for_interrupt_injection);
	OFF("KvmRun", struct kvm_run, if_flag);
	OFF("KvmRun", struct kvm_run, flags);
	OFF("KvmRun", struct kvm_run, cr8);
	OFF("KvmRun", struct kvm_run, apic_base);
	/* The exit union is anonymous; its first member (hw) starts where it starts. */
	OFF_AS("KvmRun", "exit", struct kvm_run, hw);
	OFF("KvmRun", struct kvm_run, io.direction);
	OFF("KvmRun", struct kvm_run, io.size);
	OFF("KvmRun", struct kvm_run, io.port);
	OFF("KvmRun", struct kvm_run, io.count);
	OFF("KvmRun", struct kvm_run, io.data_offset);
	OFF("KvmRun", struct kvm_run, mmio.phys_addr);
	OFF("KvmRun", struct kvm_run, mmio.data);
	OFF("KvmRun", struct kvm_run, mmio.len);
	OFF("KvmRun", struct kvm_run, mmio.is_write);
	OFF("KvmRun", struct kvm_run, hw.hardware_exit_reason);
	OFF("KvmRun", struct kvm_run, fail_entry.hardware_entry_failure_reason);
	OFF("KvmRun", struct kvm_run, fail_entry.cpu);
	OFF("KvmRun", struct kvm_run, ex.exception);
	OFF("KvmRun", struct kvm_run, ex.error_code);
	OFF("KvmRun", struct kvm_run, internal.suberror);
	OFF("KvmRun", struct kvm_run, internal.ndata);
	OFF("KvmRun", struct kvm_run, internal.data);
	OFF("KvmRun", struct kvm_run, system_event.type);
	OFF("KvmRun", struct kvm_run, system_event.ndata);
	OFF("KvmRun", struct kvm_run, system_event.data);
	OFF("KvmRun", struct kvm_run, kvm_valid_regs);
	OFF("KvmRun", struct kvm_run, kvm_dirty_regs);

	SIZE("KvmUserspaceMemoryRegion", struct kvm_userspace_memory_region);
	OFF("KvmUserspaceMemoryRegion", struct kvm_userspace_memory_region, slot);
	OFF("KvmUserspaceMemoryRegion", struct kvm_userspace_memory_region, flags);
	OFF("KvmUserspaceMemoryRegion", struct kvm_userspace_memory_region, guest_phys_addr);
	OFF("KvmUserspaceMemoryRegion", struct kvm_userspace_memory_region, memory_size);
	OFF("KvmUserspaceMemoryRegion", struct kvm_userspace_memory_region, userspace_addr);

	SIZE("KvmCpuidEntry2", struct kvm_cpuid_entry2);
	OFF("KvmCpuidEntry2", struct kvm_cpuid_entry2, function);
	OFF("KvmCpuidEntry2", struct kvm_cpuid_entry2, index);
	OFF("KvmCpuidEntry2", struct kvm_cpuid_entry2, flags);
	OFF("KvmCpuidEntry2", struct kvm_cpuid_entry2, eax);
	OFF("KvmCpuidEntry2", struct kvm_cpuid_entry2, ebx);
	OFF("KvmCpuidEntry2", struct kvm_cpuid_entry2, ecx);
	OFF("KvmCpuidEntry2", struct kvm_cpuid_entry2, edx);

	/* Variable-length structs: size is the header, entries[] starts right after it. */
	SIZE("KvmCpuid2", struct kvm_cpuid2);
	OFF("KvmCpuid2", struct kvm_cpuid2, nent);
	OFF("KvmCpuid2", struct kvm_cpuid2, entries);

	SIZE("KvmMsrEntry", struct kvm_msr_entry);
	OFF("KvmMsrEntry", struct kvm_msr_entry, index);
	OFF("KvmMsrEntry", struct kvm_msr_entry, data);

	SIZE("KvmMsrs", struct kvm_msrs);
	OFF("KvmMsrs", struct kvm_msrs, nmsrs);
	OFF("KvmMsrs", struct kvm_msrs, entries);

	SIZE("KvmMsrList", struct kvm_msr_list);
	OFF("KvmMsrList", struct kvm_msr_list, nmsrs);
	OFF("KvmMsrList", struct kvm_msr_list, indices);

	SIZE("KvmLapicState", struct kvm_lapic_state);

	SIZE("KvmPitConfig", struct kvm_pit_config);
	OFF("KvmPitConfig", struct kvm_pit_config, flags);

	SIZE("KvmIrqLevel", struct kvm_irq_level);
	OFF("KvmIrqLevel", struct kvm_irq_level, irq);
	OFF("KvmIrqLevel", struct kvm_irq_level, level);

	SIZE("KvmIoeventfd", struct kvm_ioeventfd);
	OFF("KvmIoeventfd", struct kvm_ioeventfd, datamatch);
	OFF("KvmIoeventfd", struct kvm_ioeventfd, addr);
	OFF("KvmIoeventfd", struct kvm_ioeventfd, len);
	OFF("KvmIoeventfd", struct kvm_ioeventfd, fd);
	OFF("KvmIoeventfd", struct kvm_ioeventfd, flags);

	SIZE("KvmCoalescedMmioZone", struct kvm_coalesced_mmio_zone);
	OFF("KvmCoalescedMmioZone", struct kvm_coalesced_mmio_zone, addr);
	OFF_AS("KvmCoalescedMmioZone", "size_", struct kvm_coalesced_mmio_zone, size);
	OFF("KvmCoalescedMmioZone", struct kvm_coalesced_mmio_zone, pio);
	OFF("KvmCoalescedMmioRing", struct kvm_coalesced_mmio_ring, first);
	OFF("KvmCoalescedMmioRing", struct kvm_coalesced_mmio_ring, last);
	OFF("KvmCoalescedMmioRing", struct kvm_coalesced_mmio_ring, coalesced_mmio);
	SIZE("KvmCoalescedMmio", struct kvm_coalesced_mmio);
	OFF("KvmCoalescedMmio", struct kvm_coalesced_mmio, phys_addr);
	OFF("KvmCoalescedMmio", struct kvm_coalesced_mmio, len);
	OFF("KvmCoalescedMmio", struct kvm_coalesced_mmio, pio);
	OFF("KvmCoalescedMmio", struct kvm_coalesced_mmio, data);

	SIZE("KvmIrqfd", struct kvm_irqfd);
	OFF("KvmIrqfd", struct kvm_irqfd, fd);
	OFF("KvmIrqfd", struct kvm_irqfd, gsi);
	OFF("KvmIrqfd", struct kvm_irqfd, flags);
	OFF("KvmIrqfd", struct kvm_irqfd, resamplefd);

	SIZE("KvmMpState", struct kvm_mp_state);
	OFF("KvmMpState", struct kvm_mp_state, mp_state);

	SIZE("KvmMsi", struct kvm_msi);
	OFF("KvmMsi", struct kvm_msi, address_lo);
	OFF("KvmMsi", struct kvm_msi, address_hi);
	OFF("KvmMsi", struct kvm_msi, data);
	OFF("KvmMsi", struct kvm_msi, flags);
	OFF("KvmMsi", struct kvm_msi, devid);

	SIZE("KvmIrqRouting", struct kvm_irq_routing);
	OFF("KvmIrqRouting", struct kvm_irq_routing, nr);
	OFF("KvmIrqRouting", struct kvm_irq_routing, flags);
	OFF("KvmIrqRouting", struct kvm_irq_routing, entries);

	SIZE("KvmIrqRoutingEntry", struct kvm_irq_routing_entry);
	OFF("KvmIrqRoutingEntry", struct kvm_irq_routing_entry, gsi);
	OFF("KvmIrqRoutingEntry", struct kvm_irq_routing_entry, type);
	OFF("KvmIrqRoutingEntry", struct kvm_irq_routing_entry, flags);
	OFF("KvmIrqRoutingEntry", struct kvm_irq_routing_entry, u);

	SIZE("KvmFpu", struct kvm_fpu);

	/* State save/restore (snapshots). */
	SIZE("KvmXsave", struct kvm_xsave);
	SIZE("KvmXcr", struct kvm_xcr);
	OFF("KvmXcr", struct kvm_xcr, xcr);
	OFF("KvmXcr", struct kvm_xcr, value);
	SIZE("KvmXcrs", struct kvm_xcrs);
	OFF("KvmXcrs", struct kvm_xcrs, nr_xcrs);
	OFF("KvmXcrs", struct kvm_xcrs, flags);
	OFF("KvmXcrs", struct kvm_xcrs, xcrs);
	SIZE("KvmDebugregs", struct kvm_debugregs);
	OFF("KvmDebugregs", struct kvm_debugregs, db);
	OFF("KvmDebugregs", struct kvm_debugregs, dr6);
	OFF("KvmDebugregs", struct kvm_debugregs, dr7);
	OFF("KvmDebugregs", struct kvm_debugregs, flags);
	SIZE("KvmVcpuEvents", struct kvm_vcpu_events);
	OFF("KvmVcpuEvents", struct kvm_vcpu_events, exception.injected);
	OFF("KvmVcpuEvents", struct kvm_vcpu_events, exception.nr);
	OFF("KvmVcpuEvents", struct kvm_vcpu_events, exception.has_error_code);
	OFF("KvmVcpuEvents", struct kvm_vcpu_events, exception.pending);
	OFF("KvmVcpuEvents", struct kvm_vcpu_events, exception.error_code);
	OFF("KvmVcpuEvents", struct kvm_vcpu_events, interrupt.injected);
	OFF("KvmVcpuEvents", struct kvm_vcpu_events, interrupt.nr);
	OFF("KvmVcpuEvents", struct kvm_vcpu_events, interrupt.soft);
	OFF("KvmVcpuEvents", struct kvm_vcpu_events, interrupt.shadow);
	OFF("KvmVcpuEvents", struct kvm_vcpu_events, nmi.injected);
	OFF("KvmVcpuEvents", struct kvm_vcpu_events, nmi.pending);
	OFF("KvmVcpuEvents", struct kvm_vcpu_events, nmi.masked);
	OFF("KvmVcpuEvents", struct kvm_vcpu_events, sipi_vector);
	OFF("KvmVcpuEvents", struct kvm_vcpu_events, flags);
	OFF("KvmVcpuEvents", struct kvm_vcpu_events, smi.smm);
	OFF("KvmVcpuEvents", struct kvm_vcpu_events, smi.pending);
	OFF("KvmVcpuEvents", struct kvm_vcpu_events, smi.smm_inside_nmi);
	OFF("KvmVcpuEvents", struct kvm_vcpu_events, smi.latched_init);
	OFF("KvmVcpuEvents", struct kvm_vcpu_events, triple_fault.pending);
	OFF("KvmVcpuEvents", struct kvm_vcpu_events, exception_has_payload);
	OFF("KvmVcpuEvents", struct kvm_vcpu_events, exception_payload);
	SIZE("KvmIrqchip", struct kvm_irqchip);
	OFF("KvmIrqchip", struct kvm_irqchip, chip_id);
	OFF("KvmIrqchip", struct kvm_irqchip, chip);
	SIZE("KvmPicState", struct kvm_pic_state);
	OFF("KvmPicState", struct kvm_pic_state, last_irr);
	OFF("KvmPicState", struct kvm_pic_state, irr);
	OFF("KvmPicState", struct kvm_pic_state, imr);
	OFF("KvmPicState", struct kvm_pic_state, isr);
	OFF("KvmPicState", struct kvm_pic_state, priority_add);
	OFF("KvmPicState", struct kvm_pic_state, irq_base);
	OFF("KvmPicState", struct kvm_pic_state, read_reg_select);
	OFF("KvmPicState", struct kvm_pic_state, poll);
	OFF("KvmPicState", struct kvm_pic_state, special_mask);
	OFF("KvmPicState", struct kvm_pic_state, init_state);
	OFF("KvmPicState", struct kvm_pic_state, auto_eoi);
	OFF("KvmPicState", struct kvm_pic_state, rotate_on_auto_eoi);
	OFF("KvmPicState", struct kvm_pic_state, special_fully_nested_mode);
	OFF("KvmPicState", struct kvm_pic_state, init4);
	OFF("KvmPicState", struct kvm_pic_state, elcr);
	OFF("KvmPicState", struct kvm_pic_state, elcr_mask);
	SIZE("KvmIoapicState", struct kvm_ioapic_state);
	OFF("KvmIoapicState", struct kvm_ioapic_state, base_address);
	OFF("KvmIoapicState", struct kvm_ioapic_state, ioregsel);
	OFF("KvmIoapicState", struct kvm_ioapic_state, id);
	OFF("KvmIoapicState", struct kvm_ioapic_state, irr);
	OFF("KvmIoapicState", struct kvm_ioapic_state, redirtbl);
	SIZE("KvmPitChannelState", struct kvm_pit_channel_state);
	OFF("KvmPitChannelState", struct kvm_pit_channel_state, count);
	OFF("KvmPitChannelState", struct kvm_pit_channel_state, latched_count);
	OFF("KvmPitChannelState", struct kvm_pit_channel_state, count_latched);
	OFF("KvmPitChannelState", struct kvm_pit_channel_state, status_latched);
	OFF("KvmPitChannelState", struct kvm_pit_channel_state, status);
	OFF("KvmPitChannelState", struct kvm_pit_channel_state, read_state);
	OFF("KvmPitChannelState", struct kvm_pit_channel_state, write_state);
	OFF("KvmPitChannelState", struct kvm_pit_channel_state, write_latch);
	OFF("KvmPitChannelState", struct kvm_pit_channel_state, rw_mode);
	OFF("KvmPitChannelState", struct kvm_pit_channel_state, mode);
	OFF("KvmPitChannelState", struct kvm_pit_channel_state, bcd);
	OFF("KvmPitChannelState", struct kvm_pit_channel_state, gate);
	OFF("KvmPitChannelState", struct kvm_pit_channel_state, count_load_time);
	SIZE("KvmPitState2", struct kvm_pit_state2);
	OFF("KvmPitState2", struct kvm_pit_state2, channels);
	OFF("KvmPitState2", struct kvm_pit_state2, flags);
	SIZE("KvmClockData", struct kvm_clock_data);
	OFF("KvmClockData", struct kvm_clock_data, clock);
	OFF("KvmClockData", struct kvm_clock_data, flags);
	OFF("KvmClockData", struct kvm_clock_data, realtime);
	OFF("KvmClockData", struct kvm_clock_data, host_tsc);
}

/* Ioctl.X is KVM_X. */
#define IOCTL(x) CONST("Ioctl", #x, KVM_##x)

static void ioctls(void)
{
	/* /dev/kvm */
	IOCTL(GET_API_VERSION);
	IOCTL(CREATE_VM);
	IOCTL(GET_MSR_INDEX_LIST);
	IOCTL(CHECK_EXTENSION);
	IOCTL(GET_VCPU_MMAP_SIZE);
	IOCTL(GET_SUPPORTED_CPUID);
	/* VM */
	IOCTL(CREATE_VCPU);
	IOCTL(SET_USER_MEMORY_REGION);
	IOCTL(SET_TSS_ADDR);
	IOCTL(SET_IDENTITY_MAP_ADDR);
	IOCTL(CREATE_IRQCHIP);
	IOCTL(IRQ_LINE);
	IOCTL(SET_GSI_ROUTING);
	IOCTL(IRQFD);
	IOCTL(CREATE_PIT2);
	IOCTL(IOEVENTFD);
	IOCTL(REGISTER_COALESCED_MMIO);
	IOCTL(UNREGISTER_COALESCED_MMIO);
	IOCTL(SIGNAL_MSI);
	/* vCPU */
	IOCTL(RUN);
	IOCTL(GET_REGS);
	IOCTL(SET_REGS);
	IOCTL(GET_SREGS);
	IOCTL(SET_SREGS);
	IOCTL(GET_MSRS);
	IOCTL(SET_MSRS);
	IOCTL(GET_FPU);
	IOCTL(SET_FPU);
	IOCTL(GET_LAPIC);
	IOCTL(SET_LAPIC);
	IOCTL(SET_CPUID2);
	IOCTL(GET_CPUID2);
	IOCTL(GET_MP_STATE);
	IOCTL(SET_MP_STATE);
	/* State save/restore (snapshots) */
	IOCTL(GET_MSR_FEATURE_INDEX_LIST);
	IOCTL(GET_IRQCHIP);
	IOCTL(SET_IRQCHIP);
	IOCTL(SET_CLOCK);
	IOCTL(GET_CLOCK);
	IOCTL(GET_PIT2);
	IOCTL(SET_PIT2);
	IOCTL(GET_VCPU_EVENTS);
	IOCTL(SET_VCPU_EVENTS);
	IOCTL(GET_DEBUGREGS);
	IOCTL(SET_DEBUGREGS);
	IOCTL(SET_TSC_KHZ);
	IOCTL(GET_TSC_KHZ);
	IOCTL(GET_XSAVE);
	IOCTL(SET_XSAVE);
	IOCTL(GET_XCRS);
	IOCTL(SET_XCRS);
	IOCTL(KVMCLOCK_CTRL);
	IOCTL(GET_XSAVE2);
}

/* Cap.X is KVM_CAP_X, ExitReason.X is KVM_EXIT_X, and so on. */
#define CAP(x) CONST("Cap", #x, KVM_CAP_##x)
#define EXIT(x) CONST("ExitReason", #x, KVM_EXIT_##x)
#define IODIR(x) CONST("IoDirection", #x, KVM_EXIT_IO_##x)
#define SYSEV(x) CONST("SystemEvent", #x, KVM_SYSTEM_EVENT_##x)
#define SUBERR(x) CONST("InternalErrorSuberror", #x, KVM_INTERNAL_ERROR_##x)
#define MPSTATE(x) CONST("MpState", #x, KVM_MP_STATE_##x)

static void constants(void)
{
	TOP(KVM_API_VERSION);

	CAP(IRQCHIP);
	CAP(HLT);
	CAP(USER_MEMORY);
	CAP(SET_TSS_ADDR);
	CAP(EXT_CPUID);
	CAP(NR_VCPUS);
	CAP(NR_MEMSLOTS);
	CAP(PIT);
	CAP(MP_STATE);
	CAP(IRQ_ROUTING);
	CAP(IRQ_INJECT_STATUS);
	CAP(IRQFD);
	CAP(PIT2);
	CAP(PIT_STATE2);
	CAP(IOEVENTFD);
	CAP(COALESCED_MMIO);
	CAP(COALESCED_PIO);
	CAP(SET_IDENTITY_MAP_ADDR);
	CAP(MAX_VCPUS);
	CAP(TSC_DEADLINE_TIMER);
	CAP(SIGNAL_MSI);
	CAP(IRQFD_RESAMPLE);
	CAP(MAX_VCPU_ID);
	CAP(IMMEDIATE_EXIT);
	CAP(ADJUST_CLOCK);
	CAP(VCPU_EVENTS);
	CAP(DEBUGREGS);
	CAP(XSAVE);
	CAP(XCRS);
	CAP(TSC_CONTROL);
	CAP(GET_TSC_KHZ);
	CAP(KVMCLOCK_CTRL);
	CAP(GET_MSR_FEATURES);
	CAP(XSAVE2);

	EXIT(UNKNOWN);
	EXIT(EXCEPTION);
	EXIT(IO);
	EXIT(HYPERCALL);
	EXIT(DEBUG);
	EXIT(HLT);
	EXIT(MMIO);
	EXIT(IRQ_WINDOW_OPEN);
	EXIT(SHUTDOWN);
	EXIT(FAIL_ENTRY);
	EXIT(INTR);
	EXIT(SET_TPR);
	EXIT(TPR_ACCESS);
	EXIT(NMI);
	EXIT(INTERNAL_ERROR);
	EXIT(SYSTEM_EVENT);
	EXIT(IOAPIC_EOI);
	EXIT(X86_RDMSR);
	EXIT(X86_WRMSR);
	EXIT(X86_BUS_LOCK);
	EXIT(NOTIFY);

	IODIR(IN);
	IODIR(OUT);

	SYSEV(SHUTDOWN);
	SYSEV(RESET);
	SYSEV(CRASH);
	SYSEV(WAKEUP);
	SYSEV(SUSPEND);
	SYSEV(SEV_TERM);

	SUBERR(EMULATION);
	SUBERR(SIMUL_EX);
	SUBERR(DELIVERY_EV);
	SUBERR(UNEXPECTED_EXIT_REASON);

	MPSTATE(RUNNABLE);
	MPSTATE(UNINITIALIZED);
	MPSTATE(INIT_RECEIVED);
	MPSTATE(HALTED);
	MPSTATE(SIPI_RECEIVED);

	/* Flag constants. */
	TOP(KVM_PIT_SPEAKER_DUMMY);
	TOP(KVM_IRQFD_FLAG_DEASSIGN);
	TOP(KVM_IRQFD_FLAG_RESAMPLE);
	TOP(KVM_IOEVENTFD_FLAG_DATAMATCH);
	TOP(KVM_IOEVENTFD_FLAG_PIO);
	TOP(KVM_IOEVENTFD_FLAG_DEASSIGN);
	TOP(KVM_COALESCED_MMIO_PAGE_OFFSET);
	/* KVM_COALESCED_MMIO_MAX uses the kernel's PAGE_SIZE: 4096 on x86-64. */
	printf("KVM_COALESCED_MMIO_MAX %zu\n", (4096 - sizeof(struct kvm_coalesced_mmio_ring)) / sizeof(struct kvm_coalesced_mmio));
	TOP(KVM_IRQ_ROUTING_IRQCHIP);
	TOP(KVM_IRQ_ROUTING_MSI);

	/* State save/restore (snapshots). */
	CONST("IrqchipId", "PIC_MASTER", KVM_IRQCHIP_PIC_MASTER);
	CONST("IrqchipId", "PIC_SLAVE", KVM_IRQCHIP_PIC_SLAVE);
	CONST("IrqchipId", "IOAPIC", KVM_IRQCHIP_IOAPIC);
	TOP(KVM_IOAPIC_NUM_PINS);
	TOP(KVM_MAX_XCRS);
	TOP(KVM_CLOCK_TSC_STABLE);
	TOP(KVM_CLOCK_REALTIME);
	TOP(KVM_CLOCK_HOST_TSC);
	TOP(KVM_VCPUEVENT_VALID_NMI_PENDING);
	TOP(KVM_VCPUEVENT_VALID_SIPI_VECTOR);
	TOP(KVM_VCPUEVENT_VALID_SHADOW);
	TOP(KVM_VCPUEVENT_VALID_SMM);
}

int main(void)
{
	layouts();
	ioctls();
	constants();
	return fflush(stdout) == 0 ? 0 : 1;
}
