import { constants } from "node:os";

/** errno number -> symbolic name (EACCES, EINVAL, ...), built from Node's own table. */
const ERRNO_NAMES: ReadonlyMap<number, string> = new Map(
  Object.entries(constants.errno).map(([name, value]) => [value, name]),
);

export function errnoName(errno: number): string {
  return ERRNO_NAMES.get(errno) ?? `errno ${errno}`;
}

/** Numeric errno values used by callers that branch on a specific failure. */
export const Errno = {
  EPERM: constants.errno.EPERM,
  ENOENT: constants.errno.ENOENT,
  EINTR: constants.errno.EINTR,
  EAGAIN: constants.errno.EAGAIN,
  EACCES: constants.errno.EACCES,
  EBUSY: constants.errno.EBUSY,
  EEXIST: constants.errno.EEXIST,
  EINVAL: constants.errno.EINVAL,
  ENOMEM: constants.errno.ENOMEM,
  ENOTTY: constants.errno.ENOTTY,
  ENODEV: constants.errno.ENODEV,
  ENXIO: constants.errno.ENXIO,
  EWOULDBLOCK: constants.errno.EWOULDBLOCK,
} as const;

/**
 * A failed system call. The message names the call, what it was doing and the errno,
 * e.g. "ioctl KVM_CREATE_VM failed: EINVAL (Invalid argument)".
 */
export class SysError extends Error {
  readonly call: string;
  readonly errno: number;
  readonly code: string;

  constructor(call: string, errno: number, detail?: string) {
    const code = errnoName(errno);
    const what = detail === undefined ? call : `${call} ${detail}`;
    super(`${what} failed: ${code} (${describeErrno(errno)})`);
    this.name = "SysError";
    this.call = call;
    this.errno = errno;
    this.code = code;
  }
}

function describeErrno(errno: number): string {
  // libc's strerror text would need another FFI call; these cover what KVM users meet.
  const texts: Record<string, string> = {
    EPERM: "operation not permitted",
    ENOENT: "no such file or directory",
    EINTR: "interrupted system call",
    EAGAIN: "resource temporarily unavailable",
    ENOMEM: "out of memory",
    EACCES: "permission denied",
    EFAULT: "bad address",
    EBUSY: "device or resource busy",
    EEXIST: "already exists",
    ENODEV: "no such device",
    ENXIO: "no such device or address",
    EINVAL: "invalid argument",
    ENOTTY: "inappropriate ioctl for device",
    ENOSPC: "no space left on device",
    E2BIG: "argument list too long",
    ENOSYS: "function not implemented",
    EOPNOTSUPP: "operation not supported",
  };
  return texts[errnoName(errno)] ?? "see errno(3)";
}
