/**
 * What the BSP starts running: a Linux kernel through the boot protocol, or raw machine code
 * at an address (tiny test guests and benchmarks), in real or long mode.
 */
import type { BootCpuState, Segment } from "../arch/x86/cpu-state";
import { RFLAGS_RESERVED } from "../arch/x86/cpu-state";
import { setupLongMode } from "../arch/x86/boot-tables";
import { BOOT_STACK_POINTER } from "../arch/x86/layout";
import type { GuestMemory } from "../memory/guest-memory";
import { loadKernel } from "../boot";
import { writeMpTable, type PciIrq } from "../arch/x86/mptable";

export type BootSource =
  | {
      kind: "linux";
      kernel: Uint8Array;
      initrd?: Uint8Array;
      cmdline: string;
      /** Entry for an ELF vmlinux that has both: PVH (default) or the 64-bit boot protocol. */
      prefer?: "pvh" | "linux64";
    }
  | {
      kind: "raw";
      code: Uint8Array;
      /** Guest-physical address the code is loaded at and started from. */
      address: number;
      mode: "real" | "long";
      /** More bytes to place in guest RAM (say, an AP start-up trampoline). */
      data?: readonly { address: number; bytes: Uint8Array }[];
    };

export interface BootSummary {
  /** One line for the console banner, e.g. "bzImage, 64-bit entry at 0x100200". */
  description: string;
  cpu: BootCpuState;
  /** The kernel command line as passed (Linux boots only). */
  cmdline?: string;
}

export interface BootContext {
  cpus: number;
  /** Arguments the machine adds to a Linux command line (the CPU template's hiding args). */
  extraCmdline: readonly string[];
  /** PCI INTx wiring for the MP table. */
  pciIrqs?: readonly PciIrq[];
}

export function prepareBoot(memory: GuestMemory, source: BootSource, ctx: BootContext): BootSummary {
  if (source.kind === "raw") return prepareRaw(memory, source);
  const cmdline = withExtraArgs(source.cmdline, ctx.extraCmdline);
  const plan = loadKernel(memory, {
    kernel: source.kernel,
    ...(source.initrd !== undefined ? { initrd: source.initrd } : {}),
    cmdline,
    ...(source.prefer !== undefined ? { prefer: source.prefer } : {}),
  });
  // Without ACPI, Linux learns the CPUs, the IOAPIC and interrupt routing from these.
  writeMpTable(memory, { cpus: ctx.cpus, pciIrqs: [...(ctx.pciIrqs ?? [])] });
  const initrd = plan.initrd === undefined ? "" : `, initrd at 0x${plan.initrd.address.toString(16)}`;
  return {
    description: `${plan.format}, ${plan.entry} entry at 0x${plan.cpu.regs.rip.toString(16)}${initrd}`,
    cpu: plan.cpu,
    cmdline,
  };
}

/** Append the machine's arguments, leaving out any the user already gave by name. */
export function withExtraArgs(cmdline: string, extra: readonly string[]): string {
  const given = new Set(cmdline.split(/\s+/).filter(Boolean).map((a) => a.split("=")[0]));
  const add = extra.filter((a) => !given.has(a.split("=")[0]));
  return [cmdline.trim(), ...add].filter(Boolean).join(" ");
}

function prepareRaw(memory: GuestMemory, source: Extract<BootSource, { kind: "raw" }>): BootSummary {
  memory.write(source.address, source.code);
  for (const d of source.data ?? []) memory.write(d.address, d.bytes);
  if (source.mode === "long") {
    return {
      description: `raw 64-bit code at 0x${source.address.toString(16)}`,
      cpu: {
        regs: { rip: source.address, rsp: BOOT_STACK_POINTER, rbp: BOOT_STACK_POINTER, rsi: 0, rbx: 0, rflags: RFLAGS_RESERVED },
        sregs: setupLongMode(memory),
      },
    };
  }
  if (source.address + source.code.byteLength > 0x10000) {
    throw new RangeError("raw real-mode code must fit in the first 64 KiB");
  }
  const seg = (type: number): Segment => ({
    base: 0, limit: 0xffff, selector: 0, type, present: true, dpl: 0,
    db: false, s: true, l: false, g: false, avl: false,
  });
  const data = seg(3);
  return {
    description: `raw real-mode code at 0x${source.address.toString(16)}`,
    cpu: {
      regs: { rip: source.address, rsp: 0xfff0, rbp: 0, rsi: 0, rbx: 0, rflags: RFLAGS_RESERVED },
      sregs: {
        cs: seg(0xb), ds: data, es: data, fs: data, gs: data, ss: data,
        gdt: { base: 0, limit: 0xffff },
        idt: { base: 0, limit: 0x3ff },
        cr0: 0x10, cr3: 0, cr4: 0, efer: 0,
      },
    },
  };
}
