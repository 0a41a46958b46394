/**
 * Loading a Linux kernel into guest RAM: the one entry point the VMM calls. It recognises
 * the image (bzImage or ELF vmlinux), picks the boot entry, writes the kernel, initrd,
 * command line, boot tables and zero page / PVH start info, and returns the CPU state the
 * boot vCPU must start in. docs/boot.md explains the choices.
 */
import type { GuestMemory } from "../memory/guest-memory";
import { BOOT_STACK_POINTER, KERNEL_LOAD_ADDR } from "../arch/x86/layout";
import { RFLAGS_RESERVED, type BootCpuState } from "../arch/x86/cpu-state";
import { setupLongMode, setupProtectedMode } from "../arch/x86/boot-tables";
import { buildE820, type E820Entry } from "../arch/x86/e820";
import { writeBootParams, synthesizeSetupHeader } from "./boot-params";
import { SETUP_DATA_MIN_VERSION, writeRngSeed } from "./setup-data";
import { bzImageEntry, isBzImage, loadBzImage, parseBzImage } from "./bzimage";
import { DEFAULT_CMDLINE_SIZE, encodeCmdline, writeCmdline } from "./cmdline";
import { isElf, loadElf, parseElf, entryInImage } from "./elf";
import { KernelImageError, hex } from "./errors";
import { DEFAULT_INITRD_ADDR_MAX, loadInitrd, type InitrdPlacement } from "./initrd";
import { writePvhInfo } from "./pvh";
import { Hdr } from "./setup-header";

export { BootError, CmdlineError, InitrdError, KernelImageError } from "./errors";
export type { InitrdPlacement } from "./initrd";

export type KernelFormat = "bzImage" | "elf";
/**
 * linux64: 64-bit Linux boot protocol (long mode, %rsi = zero page).
 * linux32: 32-bit Linux boot protocol (flat protected mode, %esi = zero page).
 * pvh:     Xen PVH (flat protected mode, %ebx = hvm_start_info).
 */
export type BootEntry = "linux64" | "linux32" | "pvh";

export interface LoadKernelOptions {
  /** The kernel file's contents: a bzImage or an ELF vmlinux. */
  kernel: Uint8Array;
  initrd?: Uint8Array;
  cmdline: string;
  /**
   * For a vmlinux with a PVH note: 'pvh' (the default) or 'linux64'. A vmlinux without the
   * note always boots linux64, and a bzImage always uses its own protocol entry.
   */
  prefer?: "pvh" | "linux64";
}

export interface BootPlan {
  format: KernelFormat;
  entry: BootEntry;
  /** Registers for the boot vCPU; other vCPUs wait for INIT/SIPI. */
  cpu: BootCpuState;
  /** Guest-physical range the kernel occupies while it boots. */
  kernelStart: number;
  kernelEnd: number;
  initrd?: InitrdPlacement;
  cmdline: string;
  e820: E820Entry[];
  /** The zero page (linux64/linux32) or hvm_start_info (pvh) address. */
  bootInfoAddr: number;
}

export function detectKernelFormat(image: Uint8Array): KernelFormat {
  if (isElf(image)) return "elf";
  if (isBzImage(image)) return "bzImage";
  throw new KernelImageError(
    `is not a bzImage or ELF vmlinux (no HdrS signature at ${hex(Hdr.HEADER)}, no ELF magic)`,
  );
}

/** What a parsed kernel tells the rest of the loading. */
interface KernelPlan {
  format: KernelFormat;
  entry: BootEntry;
  cmdlineMax: number;
  initrdAddrMax: number;
  /** setup_header for the zero page; code32Start only for a bzImage. */
  setupHeader: Uint8Array;
  code32Start?: number;
  /** Copy the kernel into RAM (after every check), returning where it lies and its entry. */
  load(): { kernelStart: number; kernelEnd: number; entryAddress: number };
}

function planBzImage(mem: GuestMemory, image: Uint8Array): KernelPlan {
  const bz = parseBzImage(image);
  return {
    format: "bzImage",
    entry: bzImageEntry(bz),
    cmdlineMax: bz.cmdlineSize,
    initrdAddrMax: bz.initrdAddrMax,
    setupHeader: bz.setupHeader,
    code32Start: KERNEL_LOAD_ADDR,
    load: () => loadBzImage(mem, bz),
  };
}

function planElf(mem: GuestMemory, image: Uint8Array, prefer: LoadKernelOptions["prefer"]): KernelPlan {
  const elf = parseElf(image);
  const pvh = elf.pvhEntry !== undefined && prefer !== "linux64";
  const entryAddress = pvh
    ? entryInImage(elf, elf.pvhEntry!, "PVH entry (Xen PHYS32_ENTRY note)")
    : entryInImage(elf, elf.entry, "entry point (e_entry)");
  return {
    format: "elf",
    entry: pvh ? "pvh" : "linux64",
    cmdlineMax: DEFAULT_CMDLINE_SIZE,
    initrdAddrMax: DEFAULT_INITRD_ADDR_MAX,
    setupHeader: synthesizeSetupHeader(DEFAULT_CMDLINE_SIZE),
    load: () => ({ ...loadElf(mem, elf, image), entryAddress }),
  };
}

/**
 * Load a kernel (and initrd) into guest RAM and return how to start it. Throws
 * KernelImageError, InitrdError or CmdlineError (one-line messages; add the file path with
 * withPath), or GuestMemoryError when guest RAM lacks the low 1 MiB the boot structures use.
 */
export function loadKernel(mem: GuestMemory, opts: LoadKernelOptions): BootPlan {
  const format = detectKernelFormat(opts.kernel);
  const plan = format === "elf" ? planElf(mem, opts.kernel, opts.prefer) : planBzImage(mem, opts.kernel);
  const cmdline = encodeCmdline(opts.cmdline, plan.cmdlineMax);

  const { kernelStart, kernelEnd, entryAddress } = plan.load();
  const e820 = buildE820(mem.regions);
  const initrd =
    opts.initrd === undefined
      ? undefined
      : loadInitrd(mem, opts.initrd, { kernelEnd, addrMax: plan.initrdAddrMax });
  const cmdlineAddr = writeCmdline(mem, cmdline);

  let cpu: BootCpuState;
  let bootInfoAddr: number;
  if (plan.entry === "pvh") {
    bootInfoAddr = writePvhInfo(mem, { cmdlineAddr, initrd, e820 });
    cpu = { regs: startRegs(entryAddress, { rbx: bootInfoAddr }), sregs: setupProtectedMode(mem) };
  } else {
    const version = new DataView(plan.setupHeader.buffer, plan.setupHeader.byteOffset).getUint16(Hdr.VERSION - Hdr.SETUP_SECTS, true);
    const setupData = version >= SETUP_DATA_MIN_VERSION ? writeRngSeed(mem) : undefined;
    bootInfoAddr = writeBootParams(mem, {
      setupHeader: plan.setupHeader,
      setupData,
      cmdlineAddr,
      cmdlineSize: plan.cmdlineMax,
      initrd,
      code32Start: plan.code32Start,
      e820,
    });
    const sregs = plan.entry === "linux64" ? setupLongMode(mem) : setupProtectedMode(mem);
    cpu = { regs: startRegs(entryAddress, { rsi: bootInfoAddr }), sregs };
  }

  return {
    format,
    entry: plan.entry,
    cpu,
    kernelStart,
    kernelEnd,
    ...(initrd === undefined ? {} : { initrd }),
    cmdline: opts.cmdline,
    e820,
    bootInfoAddr,
  };
}

/**
 * Registers at the first instruction. Both Linux protocols want %ebp, %edi and %ebx zero
 * and the boot_params pointer in %esi; PVH wants hvm_start_info in %ebx. Interrupts stay
 * off (IF clear) until the kernel has its own IDT.
 */
function startRegs(rip: number, pointers: { rsi?: number; rbx?: number }): BootCpuState["regs"] {
  return {
    rip,
    rsp: BOOT_STACK_POINTER,
    rbp: 0,
    rsi: pointers.rsi ?? 0,
    rbx: pointers.rbx ?? 0,
    rflags: RFLAGS_RESERVED,
  };
}
