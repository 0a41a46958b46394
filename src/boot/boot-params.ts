/**
 * struct boot_params, the "zero page" (arch/x86/include/uapi/asm/bootparam.h): what the
 * 32- and 64-bit Linux boot protocols hand the kernel in %esi / %rsi. tskvm fills the setup
 * header (copied from the bzImage, or synthesised for a vmlinux), the command line and initrd
 * pointers, and the e820 map. Everything else stays zero; in particular the `sentinel` byte
 * at 0x1ef must be zero, or the kernel decides the loader is broken and wipes fields.
 */
import type { GuestMemory } from "../memory/guest-memory";
import { ZERO_PAGE_ADDR } from "../arch/x86/layout";
import { E820_MAX_ENTRIES_ZEROPAGE, type E820Entry } from "../arch/x86/e820";
import type { InitrdPlacement } from "./initrd";
import {
  BOOT_FLAG_MAGIC,
  CAN_USE_HEAP,
  DEFAULT_HEAP_END_PTR,
  HDRS_MAGIC,
  Hdr,
  LOADED_HIGH,
  LOADER_TYPE_UNDEFINED,
} from "./setup-header";

export const BOOT_PARAMS_SIZE = 4096;

/** boot_params fields outside the setup header. */
export const BootParams = {
  EXT_RAMDISK_IMAGE: 0x0c0, // u32: initrd address, high 32 bits
  EXT_RAMDISK_SIZE: 0x0c4, // u32: initrd size, high 32 bits
  EXT_CMD_LINE_PTR: 0x0c8, // u32: command line address, high 32 bits
  E820_ENTRIES: 0x1e8, // u8
  SENTINEL: 0x1ef, // u8: must stay 0
  HDR: 0x1f1, // struct setup_header
  EDD_MBR_SIG_BUFFER: 0x290, // first field after the setup header and its padding
  E820_TABLE: 0x2d0, // struct boot_e820_entry[128]: u64 addr, u64 size, u32 type (packed, 20 bytes)
} as const;

export const E820_ENTRY_SIZE = 20;

/** Protocol version tskvm claims in a synthesised header: 2.15, as recent kernels have. */
export const SYNTHETIC_PROTOCOL_VERSION = 0x020f;
/** kernel_alignment in a synthesised header: 16 MiB, the x86-64 default (CONFIG_PHYSICAL_ALIGN-compatible). */
const SYNTHETIC_KERNEL_ALIGNMENT = 0x100_0000;

export interface BootParamsOptions {
  /** setup_header bytes from offset 0x1f1: the bzImage's own, or synthesiseSetupHeader()'s. */
  setupHeader: Uint8Array;
  cmdlineAddr: number;
  /** The kernel's cmdline_size, stored back for kernels that read it. */
  cmdlineSize: number;
  initrd?: InitrdPlacement;
  /** For a bzImage: where its protected-mode code was loaded (its 32-bit entry). */
  code32Start?: number;
  e820: readonly E820Entry[];
  /** Guest address of the first setup_data node (boot protocol 2.09+), if any. */
  setupData?: number;
}

/**
 * A setup header for a kernel that has none (an ELF vmlinux): just what the kernel checks
 * and reads, the way other VMMs synthesise it.
 */
export function synthesizeSetupHeader(cmdlineSize: number): Uint8Array {
  const page = new Uint8Array(Hdr.END);
  const v = view(page);
  v.setUint16(Hdr.BOOT_FLAG, BOOT_FLAG_MAGIC, true);
  v.setUint32(Hdr.HEADER, HDRS_MAGIC, true);
  v.setUint16(Hdr.VERSION, SYNTHETIC_PROTOCOL_VERSION, true);
  v.setUint32(Hdr.KERNEL_ALIGNMENT, SYNTHETIC_KERNEL_ALIGNMENT, true);
  v.setUint32(Hdr.CMDLINE_SIZE, cmdlineSize, true);
  return page.subarray(Hdr.SETUP_SECTS);
}

/** Build the 4096-byte zero page. */
export function buildBootParams(opts: BootParamsOptions): Uint8Array {
  if (opts.e820.length > E820_MAX_ENTRIES_ZEROPAGE) {
    throw new RangeError(`${opts.e820.length} e820 entries do not fit the zero page (at most ${E820_MAX_ENTRIES_ZEROPAGE})`);
  }
  const page = new Uint8Array(BOOT_PARAMS_SIZE);
  const hdrEnd = Math.min(BootParams.HDR + opts.setupHeader.byteLength, BootParams.EDD_MBR_SIG_BUFFER);
  page.set(opts.setupHeader.subarray(0, hdrEnd - BootParams.HDR), BootParams.HDR);
  const v = view(page);

  v.setUint8(Hdr.TYPE_OF_LOADER, LOADER_TYPE_UNDEFINED);
  // LOADED_HIGH: the protected-mode code is at 1 MiB. CAN_USE_HEAP with heap_end_ptr as a
  // boot loader that ran the setup code would leave them.
  v.setUint8(Hdr.LOADFLAGS, v.getUint8(Hdr.LOADFLAGS) | LOADED_HIGH | CAN_USE_HEAP);
  v.setUint16(Hdr.HEAP_END_PTR, DEFAULT_HEAP_END_PTR, true);
  // A bzImage's 32-bit entry is its load address; tell the kernel where that is.
  if (opts.code32Start !== undefined) v.setUint32(Hdr.CODE32_START, opts.code32Start, true);
  v.setUint32(Hdr.CMDLINE_SIZE, opts.cmdlineSize, true);

  setSplit(v, Hdr.CMD_LINE_PTR, BootParams.EXT_CMD_LINE_PTR, opts.cmdlineAddr);
  setSplit(v, Hdr.RAMDISK_IMAGE, BootParams.EXT_RAMDISK_IMAGE, opts.initrd?.address ?? 0);
  setSplit(v, Hdr.RAMDISK_SIZE, BootParams.EXT_RAMDISK_SIZE, opts.initrd?.size ?? 0);

  if (opts.setupData !== undefined) v.setBigUint64(Hdr.SETUP_DATA, BigInt(opts.setupData), true);

  v.setUint8(BootParams.E820_ENTRIES, opts.e820.length);
  opts.e820.forEach((e, i) => {
    const at = BootParams.E820_TABLE + i * E820_ENTRY_SIZE;
    v.setBigUint64(at, BigInt(e.addr), true);
    v.setBigUint64(at + 8, BigInt(e.size), true);
    v.setUint32(at + 16, e.type, true);
  });
  return page;
}

/** Build the zero page and write it at ZERO_PAGE_ADDR; returns that address (for %rsi). */
export function writeBootParams(mem: GuestMemory, opts: BootParamsOptions): number {
  mem.write(ZERO_PAGE_ADDR, buildBootParams(opts));
  return ZERO_PAGE_ADDR;
}

/** A 64-bit value split into a 32-bit header field and its ext_* high half. */
function setSplit(v: DataView, lowOffset: number, highOffset: number, value: number): void {
  v.setUint32(lowOffset, value % 2 ** 32, true);
  v.setUint32(highOffset, Math.floor(value / 2 ** 32), true);
}

function view(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}
