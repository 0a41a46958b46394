/**
 * Linux boot protocol setup_data (2.09+): a list of typed blobs the kernel reads early,
 * linked from boot_params.hdr.setup_data. tskvm passes one: SETUP_RNG_SEED, 32 random
 * bytes the kernel credits to its CRNG at boot, as QEMU does for -kernel. Without it a
 * guest without RDRAND (or told not to use it) has no entropy early, and the first
 * getrandom() in user space (dropbear, sshd, anything seeding a PRNG) blocks until the
 * kernel has collected timer jitter: measured 0.7 s of a 5 s boot in the emulated-SVM VM.
 */
import { randomFillSync } from "node:crypto";
import type { GuestMemory } from "../memory/guest-memory";
import { SETUP_DATA_ADDR, SETUP_DATA_END } from "../arch/x86/layout";

/** setup_data types (arch/x86/include/uapi/asm/bootparam.h). */
export const SETUP_RNG_SEED = 9;
/** struct setup_data {u64 next; u32 type; u32 len; u8 data[]}. */
export const SETUP_DATA_HEADER_BYTES = 16;
export const RNG_SEED_BYTES = 32;
/** The first boot protocol version that has setup_data. */
export const SETUP_DATA_MIN_VERSION = 0x0209;

/** Write the RNG seed node at SETUP_DATA_ADDR; returns its address for hdr.setup_data. */
export function writeRngSeed(mem: GuestMemory): number {
  const node = new Uint8Array(SETUP_DATA_HEADER_BYTES + RNG_SEED_BYTES);
  const v = new DataView(node.buffer);
  v.setBigUint64(0, 0n, true); // last node
  v.setUint32(8, SETUP_RNG_SEED, true);
  v.setUint32(12, RNG_SEED_BYTES, true);
  randomFillSync(node, SETUP_DATA_HEADER_BYTES, RNG_SEED_BYTES);
  if (SETUP_DATA_ADDR + node.byteLength > SETUP_DATA_END) throw new RangeError("setup_data does not fit its area");
  mem.write(SETUP_DATA_ADDR, node);
  return SETUP_DATA_ADDR;
}
