/**
 * The one place that talks to libc through koffi. Everything above this module is typed
 * TypeScript; every failure becomes a SysError naming the call and the errno.
 *
 * koffi must be loaded and bound again inside each worker thread; Node gives each worker its
 * own module registry, so importing this module from a worker does exactly that.
 */
import koffi from "koffi";
import { Errno, SysError } from "./errors";

type Fn = (...args: any[]) => any;

interface Bindings {
  open: Fn;
  close: Fn;
  ioctlPtr: Fn;
  ioctlInt: Fn;
  mmap: Fn;
  munmap: Fn;
  eventfd: Fn;
  read: Fn;
  write: Fn;
  pread: Fn;
  pwrite: Fn;
  poll: Fn;
  flock: Fn;
  fdatasync: Fn;
  pthreadSelf: Fn;
  pthreadKill: Fn;
}

let bound: Bindings | undefined;

function libc(): Bindings {
  if (bound !== undefined) return bound;
  const lib = koffi.load("libc.so.6");
  bound = {
    open: lib.func("open", "int", ["str", "int", "int"]),
    close: lib.func("close", "int", ["int"]),
    // ioctl is variadic; on x86-64 a fixed third argument of pointer or integer class is
    // ABI-identical, so two fixed prototypes of the same symbol are safe and fast.
    ioctlPtr: lib.func("ioctl", "int", ["int", "unsigned long", "void *"]),
    ioctlInt: lib.func("ioctl", "int", ["int", "unsigned long", "unsigned long"]),
    mmap: lib.func("mmap", "void *", ["void *", "size_t", "int", "int", "int", "int64_t"]),
    munmap: lib.func("munmap", "int", ["void *", "size_t"]),
    eventfd: lib.func("eventfd", "int", ["unsigned int", "int"]),
    read: lib.func("read", "long", ["int", "void *", "size_t"]),
    write: lib.func("write", "long", ["int", "void *", "size_t"]),
    pread: lib.func("pread64", "long", ["int", "void *", "size_t", "int64_t"]),
    pwrite: lib.func("pwrite64", "long", ["int", "void *", "size_t", "int64_t"]),
    poll: lib.func("poll", "int", ["void *", "unsigned long", "int"]),
    flock: lib.func("flock", "int", ["int", "int"]),
    fdatasync: lib.func("fdatasync", "int", ["int"]),
    pthreadSelf: lib.func("pthread_self", "uint64_t", []),
    pthreadKill: lib.func("pthread_kill", "int", ["uint64_t", "int"]),
  };
  return bound;
}

/** Guest-visible and host pointers are 64-bit; koffi hands them over as BigInt. */
export type Pointer = bigint;
export type Bytes = Uint8Array;

export const O_RDONLY = 0;
export const O_RDWR = 2;
export const O_CLOEXEC = 0o2000000;
export const O_NONBLOCK = 0o4000;

export const PROT_NONE = 0;
export const PROT_READ = 1;
export const PROT_WRITE = 2;
export const MAP_SHARED = 0x01;
export const MAP_PRIVATE = 0x02;
export const MAP_ANONYMOUS = 0x20;
export const MAP_NORESERVE = 0x4000;

export const EFD_CLOEXEC = 0o2000000;
export const EFD_NONBLOCK = 0o4000;

export const POLLIN = 0x001;
export const POLLOUT = 0x004;
export const POLLERR = 0x008;
export const POLLHUP = 0x010;

export const LOCK_SH = 1;
export const LOCK_EX = 2;
export const LOCK_NB = 4;
export const LOCK_UN = 8;

function check(call: string, result: number, detail?: string): number {
  if (result < 0) throw new SysError(call, koffi.errno(), detail);
  return result;
}

export function open(path: string, flags: number, mode = 0): number {
  return check("open", libc().open(path, flags | O_CLOEXEC, mode), path);
}

export function close(fd: number): void {
  check("close", libc().close(fd));
}

/** ioctl with a pointer argument (a struct in a buffer, or null). */
export function ioctl(fd: number, request: number, arg: Bytes | null, name?: string): number {
  return check("ioctl", libc().ioctlPtr(fd, request, arg), name);
}

/** ioctl with an integer argument (KVM_CREATE_VCPU, KVM_CHECK_EXTENSION, ...). */
export function ioctlValue(fd: number, request: number, value: number, name?: string): number {
  return check("ioctl", libc().ioctlInt(fd, request, value), name);
}

/**
 * ioctl that reports failure as a negative errno instead of throwing: for KVM_RUN's EINTR
 * on the hot path, where an exception per exit would cost more than the exit.
 */
export function ioctlRaw(fd: number, request: number, arg: Bytes | null): number {
  const r = libc().ioctlPtr(fd, request, arg) as number;
  return r < 0 ? -koffi.errno() : r;
}

/**
 * The hot-path form for ioctls without an argument (KVM_RUN): returns a function bound once
 * per thread, so each call is a single FFI transition with integer arguments only.
 */
export function ioctlNoArg(fd: number, request: number): () => number {
  const fn = libc().ioctlInt;
  const errno = koffi.errno;
  return () => {
    const r = fn(fd, request, 0) as number;
    return r < 0 ? -errno() : r;
  };
}

export function mmap(length: number, prot: number, flags: number, fd = -1, offset = 0): Pointer {
  const p = libc().mmap(null, length, prot, flags, fd, offset) as bigint | null;
  // MAP_FAILED is (void *)-1.
  if (p === null || p === 0xffffffffffffffffn || p === -1n) {
    throw new SysError("mmap", koffi.errno(), `of ${length} bytes`);
  }
  return p;
}

export function munmap(ptr: Pointer, length: number): void {
  check("munmap", libc().munmap(ptr, length));
}

/**
 * A zero-copy ArrayBuffer over foreign memory. koffi caps one view at 4 GiB (a larger one
 * aborts the process), and a view has no finalizer: never munmap memory a view may still use.
 */
export const MAX_VIEW_BYTES = 4 * 1024 * 1024 * 1024;

export function view(ptr: Pointer, length: number): ArrayBuffer {
  if (length <= 0 || length > MAX_VIEW_BYTES) {
    throw new RangeError(`a memory view must be 1 byte to 4 GiB, not ${length}`);
  }
  return koffi.view(ptr as unknown as any, length) as ArrayBuffer;
}

export function eventfd(initial = 0, flags = EFD_CLOEXEC): number {
  return check("eventfd", libc().eventfd(initial, flags | EFD_CLOEXEC));
}

/** read(2); returns bytes read, or -EAGAIN for a non-blocking fd with nothing to read. */
export function read(fd: number, buf: Bytes, length = buf.byteLength): number {
  const r = Number(libc().read(fd, buf, length));
  if (r < 0) {
    const e = koffi.errno();
    if (e === Errno.EAGAIN) return -e;
    throw new SysError("read", e);
  }
  return r;
}

/** write(2); returns bytes written, or -EAGAIN for a non-blocking fd that is full. */
export function write(fd: number, buf: Bytes, length = buf.byteLength): number {
  const r = Number(libc().write(fd, buf, length));
  if (r < 0) {
    const e = koffi.errno();
    if (e === Errno.EAGAIN) return -e;
    throw new SysError("write", e);
  }
  return r;
}

/**
 * Write all of buf, waiting in poll(2) when the fd is non-blocking and full. Used for the
 * console from vCPU threads: Node may have made a shared stdout pipe O_NONBLOCK.
 */
export function writeAll(fd: number, buf: Bytes): void {
  let done = 0;
  while (done < buf.byteLength) {
    const n = write(fd, done === 0 ? buf : buf.subarray(done), buf.byteLength - done);
    if (n === -Errno.EAGAIN) {
      pollOne(fd, POLLOUT, -1);
      continue;
    }
    done += n;
  }
}

export function pread(fd: number, buf: Bytes, offset: number, length = buf.byteLength): number {
  return Number(check("pread", Number(libc().pread(fd, buf, length, offset))));
}

export function pwrite(fd: number, buf: Bytes, offset: number, length = buf.byteLength): number {
  return Number(check("pwrite", Number(libc().pwrite(fd, buf, length, offset))));
}

export function fdatasync(fd: number): void {
  check("fdatasync", libc().fdatasync(fd));
}

/** flock(2); returns false when LOCK_NB was given and another holder has the lock. */
export function flock(fd: number, operation: number): boolean {
  const r = libc().flock(fd, operation) as number;
  if (r < 0) {
    const e = koffi.errno();
    if (e === Errno.EWOULDBLOCK) return false;
    throw new SysError("flock", e);
  }
  return true;
}

export interface PollFd {
  fd: number;
  events: number;
  revents: number;
}

/** poll(2) over a set of fds; fills in revents and returns how many are ready (0 on timeout). */
export function poll(fds: PollFd[], timeoutMs: number): number {
  const buf = new Uint8Array(8 * fds.length);
  const dv = new DataView(buf.buffer);
  fds.forEach((p, i) => {
    dv.setInt32(i * 8, p.fd, true);
    dv.setInt16(i * 8 + 4, p.events, true);
    dv.setInt16(i * 8 + 6, 0, true);
  });
  for (;;) {
    const r = libc().poll(buf, fds.length, timeoutMs) as number;
    if (r < 0) {
      const e = koffi.errno();
      if (e === Errno.EINTR) continue;
      throw new SysError("poll", e);
    }
    fds.forEach((p, i) => {
      p.revents = dv.getInt16(i * 8 + 6, true) & 0xffff;
    });
    return r;
  }
}

export function pollOne(fd: number, events: number, timeoutMs: number): number {
  const p: PollFd = { fd, events, revents: 0 };
  poll([p], timeoutMs);
  return p.revents;
}

/** This thread's pthread_t, so another thread can signal it out of a blocking KVM_RUN. */
export function pthreadSelf(): bigint {
  return BigInt(libc().pthreadSelf());
}

export function pthreadKill(thread: bigint, signal: number): void {
  const r = libc().pthreadKill(thread, signal) as number;
  // pthread_kill returns the error number instead of setting errno.
  if (r !== 0) throw new SysError("pthread_kill", r);
}

export { SysError, Errno, errnoName } from "./errors";
