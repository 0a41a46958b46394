/**
 * The PVH boot ABI (xen/include/public/arch-x86/hvm/start_info.h, Xen's docs/misc/pvh.pandoc):
 * a kernel with a XEN_ELFNOTE_PHYS32_ENTRY note is entered in flat 32-bit protected mode,
 * paging off, with %ebx pointing at struct hvm_start_info. tskvm lays out, in the page
 * [PVH_INFO_ADDR, PVH_INFO_END):
 *
 *   +0x00  hvm_start_info (version 1, 56 bytes)
 *   +0x38  hvm_modlist_entry[nr_modules]   (32 bytes each; the initrd is module 0)
 *   ...    hvm_memmap_table_entry[n]       (24 bytes each; the e820 map)
 */
import type { GuestMemory } from "../memory/guest-memory";
import { PVH_INFO_ADDR, PVH_INFO_END } from "../arch/x86/layout";
import type { E820Entry } from "../arch/x86/e820";
import type { InitrdPlacement } from "./initrd";
import { BootError, hex } from "./errors";

export const HVM_START_MAGIC = 0x336e_c578;
export const HVM_START_INFO_VERSION = 1;

/** hvm_start_info field offsets. */
export const StartInfo = {
  MAGIC: 0x00, // u32
  VERSION: 0x04, // u32
  FLAGS: 0x08, // u32
  NR_MODULES: 0x0c, // u32
  MODLIST_PADDR: 0x10, // u64
  CMDLINE_PADDR: 0x18, // u64
  RSDP_PADDR: 0x20, // u64: 0 = "search for it the legacy way"
  MEMMAP_PADDR: 0x28, // u64 (version 1)
  MEMMAP_ENTRIES: 0x30, // u32 (version 1)
  RESERVED: 0x34, // u32
  SIZE: 0x38,
} as const;

/** hvm_modlist_entry: paddr, size, cmdline_paddr, reserved (u64 each). */
export const MODLIST_ENTRY_SIZE = 32;
/** hvm_memmap_table_entry: addr (u64), size (u64), type (u32), reserved (u32). */
export const MEMMAP_ENTRY_SIZE = 24;

export interface PvhInfoOptions {
  cmdlineAddr: number;
  initrd?: InitrdPlacement;
  /** The e820 map; its types are the PVH memmap types too (RAM = 1, reserved = 2, ...). */
  e820: readonly E820Entry[];
}

/**
 * Build the bytes of the PVH area for placement at `base`: the returned array goes at
 * `base`, and the addresses inside it point into it.
 */
export function buildPvhInfo(opts: PvhInfoOptions, base = PVH_INFO_ADDR): Uint8Array {
  const modules = opts.initrd === undefined ? [] : [opts.initrd];
  const modlistOffset = StartInfo.SIZE;
  const memmapOffset = modlistOffset + modules.length * MODLIST_ENTRY_SIZE;
  const size = memmapOffset + opts.e820.length * MEMMAP_ENTRY_SIZE;
  const room = PVH_INFO_END - PVH_INFO_ADDR;
  if (size > room) {
    throw new BootError(
      "PVH start info",
      `needs ${size} bytes (${opts.e820.length} memory map entries) but tskvm reserves ${room} at ${hex(PVH_INFO_ADDR)}`,
    );
  }

  const bytes = new Uint8Array(size);
  const v = new DataView(bytes.buffer);
  const u64 = (at: number, value: number) => v.setBigUint64(at, BigInt(value), true);
  v.setUint32(StartInfo.MAGIC, HVM_START_MAGIC, true);
  v.setUint32(StartInfo.VERSION, HVM_START_INFO_VERSION, true);
  v.setUint32(StartInfo.NR_MODULES, modules.length, true);
  // Address fields are "absent" when 0 (nothing is ever loaded at 0).
  u64(StartInfo.MODLIST_PADDR, modules.length > 0 ? base + modlistOffset : 0);
  u64(StartInfo.CMDLINE_PADDR, opts.cmdlineAddr);
  u64(StartInfo.MEMMAP_PADDR, base + memmapOffset);
  v.setUint32(StartInfo.MEMMAP_ENTRIES, opts.e820.length, true);

  modules.forEach((m, i) => {
    const at = modlistOffset + i * MODLIST_ENTRY_SIZE;
    u64(at, m.address);
    u64(at + 8, m.size);
  });
  opts.e820.forEach((e, i) => {
    const at = memmapOffset + i * MEMMAP_ENTRY_SIZE;
    u64(at, e.addr);
    u64(at + 8, e.size);
    v.setUint32(at + 16, e.type, true);
  });
  return bytes;
}

/** Build and write the PVH area; returns the hvm_start_info address (for %ebx). */
export function writePvhInfo(mem: GuestMemory, opts: PvhInfoOptions): number {
  mem.fill(PVH_INFO_ADDR, PVH_INFO_END - PVH_INFO_ADDR);
  mem.write(PVH_INFO_ADDR, buildPvhInfo(opts, PVH_INFO_ADDR));
  return PVH_INFO_ADDR;
}
