/**
 * The guest-physical memory map tskvm builds for an x86-64 guest. docs/memory-map.md
 * draws the same picture; keep the two in step.
 *
 *   0x0000_0000  real-mode IVT and BIOS data area (zero)
 *   0x0000_0500  boot GDT: null, code64 (0x08), code32 (0x10 = __BOOT_CS), data (0x18 = __BOOT_DS); no TSS
 *   0x0000_0520  boot IDT (empty: limit 0, interrupts stay off until the kernel sets its own)
 *   0x0000_6000  PVH hvm_start_info, module list and memory map
 *   0x0000_7000  Linux boot_params ("zero page")
 *   0x0000_8ff0  initial stack pointer (grows down, below the page tables)
 *   0x0000_9000  PML4, 0x0000_a000 PDPT, 0x0000_b000 four PDs: identity map of 0..4 GiB in 2 MiB pages
 *   0x0000_f000  Linux setup_data list (the boot protocol's RNG seed)
 *   0x0002_0000  kernel command line (up to 64 KiB, and up to the kernel's cmdline_size)
 *   0x0009_fc00  EBDA: MP floating pointer (reserved in e820)
 *   0x000a_0000  VGA and BIOS ROM hole (reserved in e820)
 *   0x000f_0000  MP configuration table, up to 64 KiB (BIOS area, reserved in e820)
 *   0x0010_0000  kernel (bzImage protected-mode code; ELF segments at their own addresses)
 *   ...          initrd: as high as the kernel allows, below the PCI hole
 *   0xc000_0000  32-bit PCI hole: PCI memory BARs, IOAPIC (0xfec0_0000), LAPIC (0xfee0_0000),
 *                KVM's TSS and identity-map pages (0xfffb_c000)
 *   0x1_0000_0000 RAM above the hole, when the guest has more than 3 GiB
 */
import { MAX_REGION_BYTES, type RamRange } from "../../memory/guest-memory";

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;

export const BOOT_GDT_ADDR = 0x500;
export const BOOT_IDT_ADDR = 0x520;
export const PVH_INFO_ADDR = 0x6000;
export const PVH_INFO_END = 0x7000;
export const ZERO_PAGE_ADDR = 0x7000;
export const BOOT_STACK_POINTER = 0x8ff0;
export const PML4_ADDR = 0x9000;
export const PDPT_ADDR = 0xa000;
export const PD_ADDR = 0xb000;
/** Page directories used for the boot identity map (each covers 1 GiB). */
export const PD_COUNT = 4;
/** Linux setup_data nodes (boot protocol 2.09+): a random seed for the kernel's CRNG. */
export const SETUP_DATA_ADDR = 0xf000;
export const SETUP_DATA_END = 0x10000;
export const CMDLINE_ADDR = 0x20000;
export const CMDLINE_MAX = 0x10000;

/** Extended BIOS data area: where tskvm writes the MP tables. Its segment is stored at 0x40E. */
export const EBDA_START = 0x9fc00;
export const BDA_EBDA_SEGMENT_ADDR = 0x40e;
/** The MP configuration table: the BIOS area, roomy enough for 254 vCPUs' entries. */
export const MP_CONFIG_TABLE_ADDR = 0xf0000;
export const MP_CONFIG_TABLE_MAX = 0x10000;
/** End of conventional memory: 0xa0000..0x100000 is the VGA/ROM hole. */
export const LOW_RAM_END = 0xa0000;
export const HIGH_MEMORY_START = 0x100000;

/** Where the protected-mode part of a bzImage is loaded (the boot protocol's traditional 1 MiB). */
export const KERNEL_LOAD_ADDR = 0x100000;

export const PCI_HOLE_START = 0xc000_0000;
export const PCI_HOLE_END = 0x1_0000_0000;

export const IOAPIC_ADDR = 0xfec0_0000;
export const LAPIC_ADDR = 0xfee0_0000;

/** KVM_SET_TSS_ADDR needs three pages and KVM_SET_IDENTITY_MAP_ADDR one, outside RAM. */
export const KVM_IDENTITY_MAP_ADDR = 0xfffb_c000;
export const KVM_TSS_ADDR = 0xfffb_d000;

/** Smallest guest RAM tskvm accepts: room for the boot structures, a kernel and an initrd. */
export const MIN_GUEST_MEMORY = 16 * MiB;

/**
 * Where RAM of a given size lives in the guest-physical address space: below the 32-bit
 * PCI hole, and whatever does not fit there continues at 4 GiB (in regions no larger than
 * one host view can be).
 */
export function ramLayout(totalBytes: number): RamRange[] {
  const low = Math.min(totalBytes, PCI_HOLE_START);
  const out: RamRange[] = [{ base: 0, size: low }];
  let rest = totalBytes - low;
  let base = PCI_HOLE_END;
  while (rest > 0) {
    const size = Math.min(rest, MAX_REGION_BYTES);
    out.push({ base, size });
    base += size;
    rest -= size;
  }
  return out;
}
