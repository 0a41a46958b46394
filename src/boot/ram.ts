/**
 * "Does this fit in guest RAM?" checks shared by the loaders, with messages that tell the
 * user how much memory (-m) would make it fit.
 */
import type { GuestMemory } from "../memory/guest-memory";
import { MiB, PCI_HOLE_START } from "../arch/x86/layout";
import { KernelImageError, formatSize, hex } from "./errors";

/** End of the RAM region that starts at guest-physical 0 (RAM below the PCI hole). */
export function lowRamEnd(mem: GuestMemory): number {
  const low = mem.regions.find((r) => r.base === 0);
  return low === undefined ? 0 : low.size;
}

/**
 * The advice for memory that must reach up to `end` below 4 GiB: how much RAM to give the
 * guest, or that no amount helps because the range runs into the PCI hole.
 */
export function memoryAdvice(end: number): string {
  if (end > PCI_HOLE_START) {
    return `no guest memory size helps: RAM below 4 GiB ends at ${hex(PCI_HOLE_START)}`;
  }
  return `give the guest at least ${Math.ceil(end / MiB)} MiB (-m)`;
}

/** Throw a KernelImageError unless [start, start+length) is guest RAM. */
export function requireKernelRam(mem: GuestMemory, start: number, length: number, what: string): void {
  if (length === 0 || mem.contains(start, length)) return;
  const end = start + length;
  throw new KernelImageError(
    `needs guest RAM at ${hex(start)}-${hex(end)} (${what}) but the guest has ` +
      `${formatSize(lowRamEnd(mem))} below 4 GiB: ${memoryAdvice(end)}`,
  );
}
