/**
 * The kernel command line: NUL-terminated bytes at CMDLINE_ADDR, for both the zero page
 * (cmd_line_ptr) and PVH (cmdline_paddr).
 */
import type { GuestMemory } from "../memory/guest-memory";
import { CMDLINE_ADDR, CMDLINE_MAX } from "../arch/x86/layout";
import { CmdlineError } from "./errors";

/**
 * x86 COMMAND_LINE_SIZE is 2048 including the NUL; a bzImage states its own limit in
 * cmdline_size, a vmlinux does not, so ELF kernels get the x86 default.
 */
export const DEFAULT_CMDLINE_SIZE = 2047;

/**
 * Encode `cmdline` NUL-terminated, checking it against the kernel's limit (`kernelMax`,
 * without the NUL, as the header's cmdline_size counts it) and the space tskvm reserves.
 */
export function encodeCmdline(cmdline: string, kernelMax: number): Uint8Array {
  const text = Buffer.from(cmdline, "utf8");
  if (text.includes(0)) throw new CmdlineError("contains a NUL byte, which would end it early");
  const tskvmMax = CMDLINE_MAX - 1;
  if (text.byteLength > Math.min(kernelMax, tskvmMax)) {
    const who = kernelMax <= tskvmMax ? `this kernel accepts at most ${kernelMax}` : `tskvm accepts at most ${tskvmMax}`;
    throw new CmdlineError(`is ${text.byteLength} bytes; ${who}`);
  }
  const bytes = new Uint8Array(text.byteLength + 1);
  bytes.set(text);
  return bytes;
}

/** Write an encoded command line at CMDLINE_ADDR; returns that address. */
export function writeCmdline(mem: GuestMemory, encoded: Uint8Array): number {
  mem.write(CMDLINE_ADDR, encoded);
  return CMDLINE_ADDR;
}
