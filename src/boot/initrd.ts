/**
 * Initrd placement. The rule (the one boot.rst suggests and bootloaders follow): as high as
 * possible, page-aligned, ending at or below both the kernel's initrd_addr_max and the end of
 * RAM below 4 GiB, and starting above everything the kernel occupies while it boots
 * (bzImage: up to runtime start + init_size; vmlinux: the end of its last segment).
 */
import type { GuestMemory } from "../memory/guest-memory";
import { InitrdError, formatSize, hex } from "./errors";
import { lowRamEnd, memoryAdvice } from "./ram";

/**
 * initrd_addr_max for kernels that do not say (ELF vmlinux, PVH): the historical limit of
 * boot protocols before 2.03, and safe for every kernel.
 */
export const DEFAULT_INITRD_ADDR_MAX = 0x37ff_ffff;

const PAGE = 4096;

export interface InitrdPlacement {
  address: number;
  size: number;
}

export interface InitrdLimits {
  /** First byte the kernel does not need (the initrd goes at or above this, page-aligned). */
  kernelEnd: number;
  /** Highest address the initrd may occupy (initrd_addr_max, inclusive). */
  addrMax: number;
}

const alignUp = (n: number) => Math.ceil(n / PAGE) * PAGE;
const alignDown = (n: number) => Math.floor(n / PAGE) * PAGE;

/**
 * The address for an initrd of `size` bytes in a guest whose RAM below 4 GiB ends at
 * `lowEnd`. Throws InitrdError, saying how much memory would make it fit, when it cannot.
 */
export function placeInitrd(lowEnd: number, size: number, limits: InitrdLimits): number {
  if (size === 0) throw new InitrdError("is empty");
  const floor = alignUp(limits.kernelEnd);
  const ceiling = Math.min(limits.addrMax + 1, lowEnd);
  const address = alignDown(ceiling - size);
  if (ceiling >= size && address >= floor) return address;

  // Lowest end the initrd could have: right above the kernel.
  const neededEnd = floor + size;
  if (neededEnd > limits.addrMax + 1) {
    throw new InitrdError(
      `of ${formatSize(size)} does not fit between the kernel's end (${hex(floor)}) and ${hex(limits.addrMax)}, ` +
        `the highest address this kernel accepts for an initrd: use a smaller initrd`,
    );
  }
  throw new InitrdError(
    `of ${formatSize(size)} does not fit below ${hex(limits.addrMax)} in ${formatSize(lowEnd)} of guest RAM: ` +
      memoryAdvice(alignUp(neededEnd)),
  );
}

/** Place the initrd and copy it into guest RAM. */
export function loadInitrd(mem: GuestMemory, initrd: Uint8Array, limits: InitrdLimits): InitrdPlacement {
  const address = placeInitrd(lowRamEnd(mem), initrd.byteLength, limits);
  mem.write(address, initrd);
  return { address, size: initrd.byteLength };
}
