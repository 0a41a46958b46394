/**
 * Anonymous memory files (memfd_create): guest RAM that another process (virtiofsd, over
 * vhost-user) can map MAP_SHARED from the descriptor tskvm sends it.
 */
import koffi from "koffi";
import { SysError } from "./errors";
import { fcntl } from "./libc";

type Fn = (...args: any[]) => any;

let bound: { memfdCreate: Fn; ftruncate: Fn } | undefined;

function libc(): NonNullable<typeof bound> {
  if (bound !== undefined) return bound;
  const lib = koffi.load("libc.so.6");
  bound = {
    memfdCreate: lib.func("memfd_create", "int", ["str", "unsigned int"]),
    ftruncate: lib.func("ftruncate", "int", ["int", "int64_t"]),
  };
  return bound;
}

export const MFD_CLOEXEC = 0x1;
export const MFD_ALLOW_SEALING = 0x2;
export const MFD_HUGETLB = 0x4;

/** fcntl(2) seal commands and seals. */
export const F_ADD_SEALS = 1033;
export const F_GET_SEALS = 1034;
export const F_SEAL_SEAL = 0x1;
export const F_SEAL_SHRINK = 0x2;
export const F_SEAL_GROW = 0x4;

/** memfd_create(2), always close-on-exec. `name` only shows in /proc/PID/fd and maps. */
export function memfdCreate(name: string, flags = 0): number {
  const r = libc().memfdCreate(name, flags | MFD_CLOEXEC) as number;
  if (r < 0) throw new SysError("memfd_create", koffi.errno(), name);
  return r;
}

export function ftruncate(fd: number, length: number): void {
  if ((libc().ftruncate(fd, length) as number) < 0) throw new SysError("ftruncate", koffi.errno(), `to ${length} bytes`);
}

/** Add seals to a memfd made with MFD_ALLOW_SEALING (e.g. F_SEAL_SHRINK: no SIGBUS by truncation). */
export function addSeals(fd: number, seals: number): void {
  fcntl(fd, F_ADD_SEALS, seals);
}

export function getSeals(fd: number): number {
  return fcntl(fd, F_GET_SEALS, 0);
}
