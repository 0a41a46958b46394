/**
 * bzImage parsing and loading (Documentation/arch/x86/boot.rst).
 *
 * A bzImage is: a 512-byte boot sector whose tail holds the start of the setup header,
 * setup_sects more 512-byte sectors of real-mode setup code (rest of the header included),
 * then syssize * 16 bytes of protected-mode code: the self-decompressing kernel. tskvm skips
 * the real-mode code: it builds the zero page itself, copies the protected-mode part to
 * KERNEL_LOAD_ADDR and enters through the 64-bit (or 32-bit) boot protocol.
 */
import type { GuestMemory } from "../memory/guest-memory";
import { KERNEL_LOAD_ADDR } from "../arch/x86/layout";
import { KernelImageError, formatSize, hex } from "./errors";
import { ImageReader } from "./image-reader";
import { requireKernelRam } from "./ram";
import {
  BOOT_FLAG_MAGIC,
  HDRS_MAGIC,
  Hdr,
  LOADED_HIGH,
  MIN_BOOT_PROTOCOL,
  XLF_KERNEL_64,
  formatProtocol,
} from "./setup-header";

const SECTOR = 512;
/** setup_sects == 0 means 4, for compatibility with ancient kernels. */
const DEFAULT_SETUP_SECTS = 4;
/** The 64-bit entry (startup_64) sits 0x200 bytes into the protected-mode code. */
export const BZIMAGE_ENTRY64_OFFSET = 0x200;
/** setup_header ends no later than the padding before edd_mbr_sig_buffer (0x290) in boot_params. */
const SETUP_HEADER_LIMIT = 0x290;

export interface BzImage {
  /** Boot protocol version, e.g. 0x020f for 2.15. */
  version: number;
  /** Setup sectors after the boot sector (0 already replaced by 4). */
  setupSects: number;
  /** Bytes before the protected-mode code: (setupSects + 1) * 512. */
  setupBytes: number;
  /** Protected-mode code size in 16-byte paragraphs. */
  syssize: number;
  loadflags: number;
  /** 0 for protocols before 2.12, which had no xloadflags. */
  xloadflags: number;
  code32Start: number;
  /** Longest command line the kernel takes, without the NUL. */
  cmdlineSize: number;
  /** Highest address the initrd may occupy. */
  initrdAddrMax: number;
  kernelAlignment: number;
  relocatable: boolean;
  /** Preferred load address; 0 before protocol 2.10. */
  prefAddress: number;
  /** Memory the kernel needs from its runtime start before it reads the memory map; 0 before 2.10. */
  initSize: number;
  /** setup_header bytes (image offsets 0x1f1 up to the header's end) for the zero page. */
  setupHeader: Uint8Array;
  /** The protected-mode code: syssize * 16 bytes after the setup sectors. */
  protectedMode: Uint8Array;
}

/** True when the image carries the "HdrS" signature of a Linux boot-protocol kernel. */
export function isBzImage(image: Uint8Array): boolean {
  const r = new ImageReader(image);
  return r.has(Hdr.HEADER, 4) && r.u32(Hdr.HEADER) === HDRS_MAGIC;
}

/** Validate a bzImage's header and locate its parts. Throws KernelImageError. */
export function parseBzImage(image: Uint8Array): BzImage {
  const r = new ImageReader(image);
  if (!isBzImage(image)) {
    throw new KernelImageError(`is not a bzImage (no HdrS signature at ${hex(Hdr.HEADER)})`);
  }
  const bootFlag = r.u16(Hdr.BOOT_FLAG);
  if (bootFlag !== BOOT_FLAG_MAGIC) {
    throw new KernelImageError(
      `is not a bzImage: boot flag at ${hex(Hdr.BOOT_FLAG)} is ${hex(bootFlag)}, not 0xaa55`,
    );
  }
  const version = r.u16(Hdr.VERSION);
  if (version < MIN_BOOT_PROTOCOL) {
    throw new KernelImageError(
      `uses boot protocol ${formatProtocol(version)}, which is too old: tskvm needs ` +
        `${formatProtocol(MIN_BOOT_PROTOCOL)} or later (Linux 2.6.22+)`,
    );
  }
  const loadflags = r.u8(Hdr.LOADFLAGS);
  if ((loadflags & LOADED_HIGH) === 0) {
    throw new KernelImageError("is a zImage (loaded at 0x10000), not a bzImage: tskvm boots bzImages only");
  }

  const setupSects = r.u8(Hdr.SETUP_SECTS) || DEFAULT_SETUP_SECTS;
  const setupBytes = (setupSects + 1) * SECTOR;
  if (image.byteLength < setupBytes) {
    throw new KernelImageError(
      `is truncated: its ${setupSects} setup sectors need ${setupBytes} bytes, the file has ${image.byteLength}`,
    );
  }
  const syssize = r.u32(Hdr.SYSSIZE);
  const protectedBytes = syssize * 16;
  const available = image.byteLength - setupBytes;
  if (syssize === 0) {
    throw new KernelImageError("has syssize 0: the header describes no protected-mode code");
  }
  if (available < protectedBytes) {
    throw new KernelImageError(
      `is truncated: expected ${protectedBytes} bytes of protected-mode code, file has ${available}`,
    );
  }

  const atLeast = (minor: number) => version >= 0x0200 + minor;
  return {
    version,
    setupSects,
    setupBytes,
    syssize,
    loadflags,
    xloadflags: atLeast(12) ? r.u16(Hdr.XLOADFLAGS) : 0,
    code32Start: r.u32(Hdr.CODE32_START),
    cmdlineSize: r.u32(Hdr.CMDLINE_SIZE),
    initrdAddrMax: r.u32(Hdr.INITRD_ADDR_MAX),
    kernelAlignment: r.u32(Hdr.KERNEL_ALIGNMENT),
    relocatable: r.u8(Hdr.RELOCATABLE_KERNEL) !== 0,
    prefAddress: atLeast(10) ? r.u64(Hdr.PREF_ADDRESS, "pref_address") : 0,
    initSize: atLeast(10) ? r.u32(Hdr.INIT_SIZE) : 0,
    setupHeader: image.subarray(Hdr.SETUP_SECTS, setupHeaderEnd(r, setupBytes)),
    protectedMode: image.subarray(setupBytes, setupBytes + protectedBytes),
  };
}

/** The header ends where the jump at 0x200 lands: 0x202 + its displacement byte. */
function setupHeaderEnd(r: ImageReader, setupBytes: number): number {
  const end = Hdr.HEADER + r.u8(Hdr.JUMP + 1);
  return Math.max(Hdr.HEADER + 4, Math.min(end, SETUP_HEADER_LIMIT, setupBytes));
}

/**
 * Where the kernel will run once it has moved itself (boot.rst, init_size): a relocatable
 * kernel loaded below pref_address moves up to it, aligned to kernel_alignment; a
 * non-relocatable one always runs at pref_address. The decompressor uses init_size bytes
 * from there, so nothing else (the initrd) may live in that range.
 */
export function runtimeRange(bz: BzImage, loadAddress = KERNEL_LOAD_ADDR): { start: number; end: number } {
  if (bz.prefAddress === 0 || bz.initSize === 0) {
    // Protocols before 2.10 say neither; all we know is the loaded code.
    return { start: loadAddress, end: loadAddress + bz.protectedMode.byteLength };
  }
  let start: number;
  if (bz.relocatable) {
    const align = bz.kernelAlignment > 0 ? bz.kernelAlignment : 1;
    start = Math.ceil(Math.max(loadAddress, bz.prefAddress) / align) * align;
  } else {
    start = bz.prefAddress;
  }
  return { start, end: start + bz.initSize };
}

/** A kernel that declares XLF_KERNEL_64 has the 64-bit entry; older or 32-bit ones get the 32-bit one. */
export function bzImageEntry(bz: BzImage): "linux64" | "linux32" {
  return (bz.xloadflags & XLF_KERNEL_64) !== 0 ? "linux64" : "linux32";
}

export interface LoadedBzImage {
  /** Lowest guest-physical address the kernel occupies, now or while it decompresses. */
  kernelStart: number;
  /** End of that range (exclusive): the initrd must start at or above it. */
  kernelEnd: number;
  entry: "linux64" | "linux32";
  /** Guest-physical address of the first instruction. */
  entryAddress: number;
}

/**
 * Copy the protected-mode code to KERNEL_LOAD_ADDR after checking that both it and the
 * kernel's runtime range fit in guest RAM.
 */
export function loadBzImage(mem: GuestMemory, bz: BzImage): LoadedBzImage {
  const code = bz.protectedMode;
  requireKernelRam(mem, KERNEL_LOAD_ADDR, code.byteLength, `${formatSize(code.byteLength)} of protected-mode code`);
  const runtime = runtimeRange(bz);
  requireKernelRam(
    mem,
    runtime.start,
    runtime.end - runtime.start,
    `init_size ${formatSize(runtime.end - runtime.start)} at its runtime address`,
  );
  mem.write(KERNEL_LOAD_ADDR, code);

  const entry = bzImageEntry(bz);
  return {
    kernelStart: Math.min(KERNEL_LOAD_ADDR, runtime.start),
    kernelEnd: Math.max(KERNEL_LOAD_ADDR + code.byteLength, runtime.end),
    entry,
    // The 32-bit entry is the start of the protected-mode code: code32_start, which the
    // zero page sets to the load address.
    entryAddress: entry === "linux64" ? KERNEL_LOAD_ADDR + BZIMAGE_ENTRY64_OFFSET : KERNEL_LOAD_ADDR,
  };
}
