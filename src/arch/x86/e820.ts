/**
 * The BIOS e820 memory map tskvm reports to the guest (through the zero page for the Linux
 * boot protocol, or the PVH memmap table): which guest-physical ranges are usable RAM.
 */
import { EBDA_START, HIGH_MEMORY_START } from "./layout";

/** e820 types (the PVH memmap uses the same numbers for these five). */
export const E820_RAM = 1;
export const E820_RESERVED = 2;
export const E820_ACPI = 3;
export const E820_NVS = 4;
export const E820_UNUSABLE = 5;

/** Capacity of boot_params.e820_table. */
export const E820_MAX_ENTRIES_ZEROPAGE = 128;

export interface E820Entry {
  addr: number;
  size: number;
  type: number;
}

/**
 * Build the map from the guest's RAM regions:
 *
 *   [0, EBDA_START)                  RAM       conventional memory
 *   [EBDA_START, HIGH_MEMORY_START)  reserved  EBDA (MP tables), VGA hole, BIOS ROM area
 *   [HIGH_MEMORY_START, ...)         RAM       the rest of each region
 *
 * The EBDA and the legacy hole are backed by RAM in tskvm but must not be handed to the
 * kernel's allocator: the MP tables live in the EBDA. Adjacent RAM regions (guest memory
 * above 4 GiB may be split into several host views) are merged into one entry.
 */
export function buildE820(regions: readonly { base: number; size: number }[]): E820Entry[] {
  const entries: E820Entry[] = [];
  let coversEbda = false;
  for (const r of [...regions].sort((a, b) => a.base - b.base)) {
    const end = r.base + r.size;
    addRam(entries, r.base, Math.min(end, EBDA_START));
    addRam(entries, Math.max(r.base, HIGH_MEMORY_START), end);
    if (r.base <= EBDA_START && end > EBDA_START) coversEbda = true;
  }
  if (coversEbda) {
    entries.push({ addr: EBDA_START, size: HIGH_MEMORY_START - EBDA_START, type: E820_RESERVED });
  }
  entries.sort((a, b) => a.addr - b.addr);
  if (entries.length > E820_MAX_ENTRIES_ZEROPAGE) {
    throw new RangeError(
      `guest memory map has ${entries.length} e820 entries; the boot protocol carries at most ${E820_MAX_ENTRIES_ZEROPAGE}`,
    );
  }
  return entries;
}

function addRam(entries: E820Entry[], start: number, end: number): void {
  if (end <= start) return;
  const last = entries[entries.length - 1];
  if (last !== undefined && last.type === E820_RAM && last.addr + last.size === start) {
    last.size += end - start;
  } else {
    entries.push({ addr: start, size: end - start, type: E820_RAM });
  }
}
