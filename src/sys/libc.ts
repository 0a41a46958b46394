/**
 * The one place that talks to libc through koffi. Everything above this module is typed
 * TypeScript; every failure becomes a SysError naming the call and the errno.
 *
 * koffi must be loaded and bound again inside each worker thread; Node gives each worker its
 * own module registry, so importing this module from a worker does exactly that.
 */
import koffi from "koffi";
import { constants as osConstants } from "node:os";
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
  preadAt: Fn;
  pwriteAt: Fn;
  preadv: Fn;
  pwritev: Fn;
  poll: Fn;
  flock: Fn;
  fdatasync: Fn;
  fallocate: Fn;
  fcntlPtr: Fn;
  pthreadSelf: Fn;
  pthreadKill: Fn;
  madvise: Fn;
  setns: Fn;
  socket: Fn;
  bind: Fn;
  socketpair: Fn;
  readv: Fn;
  writev: Fn;
  pipe2: Fn;
  fcntlInt: Fn;
  prctl: Fn;
  lseek: Fn;
  setsockopt: Fn;
  getsockopt: Fn;
  getrandom: Fn;
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
    // The same calls with the buffer as a plain address: no typed array to make per call.
    preadAt: lib.func("pread64", "long", ["int", "uintptr_t", "size_t", "int64_t"]),
    pwriteAt: lib.func("pwrite64", "long", ["int", "uintptr_t", "size_t", "int64_t"]),
    preadv: lib.func("preadv64", "long", ["int", "void *", "int", "int64_t"]),
    pwritev: lib.func("pwritev64", "long", ["int", "void *", "int", "int64_t"]),
    poll: lib.func("poll", "int", ["void *", "unsigned long", "int"]),
    flock: lib.func("flock", "int", ["int", "int"]),
    fdatasync: lib.func("fdatasync", "int", ["int"]),
    fallocate: lib.func("fallocate", "int", ["int", "int", "int64_t", "int64_t"]),
    // fcntl is variadic; like ioctl above, a fixed pointer third argument is ABI-identical.
    fcntlPtr: lib.func("fcntl", "int", ["int", "int", "void *"]),
    pthreadSelf: lib.func("pthread_self", "uint64_t", []),
    pthreadKill: lib.func("pthread_kill", "int", ["uint64_t", "int"]),
    madvise: lib.func("madvise", "int", ["void *", "size_t", "int"]),
    setns: lib.func("setns", "int", ["int", "int"]),
    socket: lib.func("socket", "int", ["int", "int", "int"]),
    bind: lib.func("bind", "int", ["int", "void *", "unsigned int"]),
    socketpair: lib.func("socketpair", "int", ["int", "int", "int", "void *"]),
    // struct iovec[] is built by the caller in a byte buffer: {u64 base, u64 len} each.
    readv: lib.func("readv", "long", ["int", "void *", "int"]),
    writev: lib.func("writev", "long", ["int", "void *", "int"]),
    pipe2: lib.func("pipe2", "int", ["void *", "int"]),
    // fcntl with an integer third argument (F_SETPIPE_SZ, F_GETFL, F_SETFL).
    fcntlInt: lib.func("fcntl", "int", ["int", "int", "long"]),
    // prctl is variadic; every option used here takes unsigned long arguments.
    prctl: lib.func("prctl", "int", ["int", "unsigned long", "unsigned long", "unsigned long", "unsigned long"]),
    lseek: lib.func("lseek64", "int64_t", ["int", "int64_t", "int"]),
    setsockopt: lib.func("setsockopt", "int", ["int", "int", "int", "void *", "unsigned int"]),
    getsockopt: lib.func("getsockopt", "int", ["int", "int", "int", "void *", "void *"]),
    getrandom: lib.func("getrandom", "long", ["void *", "size_t", "unsigned int"]),
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
/** A stream socket's peer closed (or shut down writing): Linux's POLLRDHUP. */
export const POLLRDHUP = 0x2000;

export const LOCK_SH = 1;
export const LOCK_EX = 2;
export const LOCK_NB = 4;
export const LOCK_UN = 8;

/** fallocate(2) modes. */
export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;

/** Open file description locks (fcntl F_OFD_*), and struct flock's lock types. */
export const F_OFD_GETLK = 36;
export const F_OFD_SETLK = 37;
export const F_RDLCK = 0;
export const F_WRLCK = 1;
export const F_UNLCK = 2;

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

export const MADV_HUGEPAGE = 14;

/** madvise(2); advice only, so a refusal (e.g. THP compiled out) is reported, not thrown. */
export function madvise(ptr: Pointer, length: number, advice: number): boolean {
  return (libc().madvise(ptr, length, advice) as number) === 0;
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

/** The 8-byte counter an eventfd is written with: 1, signalled from any thread. */
const EVENTFD_ONE = new Uint8Array(new BigUint64Array([1n]).buffer);
const eventfdCounter = new Uint8Array(8);

/** Add 1 to an eventfd's counter: wakes whoever polls it (or, for an irqfd, interrupts). */
export function signalEventfd(fd: number): void {
  write(fd, EVENTFD_ONE);
}

/** Read (and so reset) a non-blocking eventfd's counter; 0 when it was not signalled. */
export function drainEventfd(fd: number): number {
  return read(fd, eventfdCounter) > 0 ? 1 : 0;
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
 * console from vCPU threads: Node may have made a shared stdout pipe O_NONBLOCK. With
 * `giveUp`, a wait asks it every so often and, when it says so, drops the rest and
 * returns false.
 */
export function writeAll(fd: number, buf: Bytes, giveUp?: () => boolean): boolean {
  let done = 0;
  while (done < buf.byteLength) {
    const n = write(fd, done === 0 ? buf : buf.subarray(done), buf.byteLength - done);
    if (n === -Errno.EAGAIN) {
      // A reader that stopped reading must not keep the writer past `giveUp` (a VM stopping).
      if (giveUp === undefined) pollOne(fd, POLLOUT, -1);
      else if (pollOne(fd, POLLOUT, WRITE_GIVE_UP_CHECK_MS) === 0 && giveUp()) return false;
      continue;
    }
    done += n;
  }
  return true;
}

/** How often writeAll, waiting for a full non-blocking fd, asks whether to give up. */
const WRITE_GIVE_UP_CHECK_MS = 100;

export function pread(fd: number, buf: Bytes, offset: number, length = buf.byteLength): number {
  return Number(check("pread", Number(libc().pread(fd, buf, length, offset))));
}

export function pwrite(fd: number, buf: Bytes, offset: number, length = buf.byteLength): number {
  return Number(check("pwrite", Number(libc().pwrite(fd, buf, length, offset))));
}

/**
 * pread(2) into memory given by host address (guest RAM from mmap), for the I/O hot path:
 * koffi marshals a number in a register where a fresh typed array costs ~0.4 us. The caller
 * guarantees that [address, address + length) is mapped, writable memory it owns.
 */
export function preadAt(fd: number, address: number, length: number, offset: number): number {
  return check("pread", Number(libc().preadAt(fd, address, length, offset)));
}

/** pwrite(2) from memory given by host address; see preadAt. */
export function pwriteAt(fd: number, address: number, length: number, offset: number): number {
  return check("pwrite", Number(libc().pwriteAt(fd, address, length, offset)));
}

/** Most iovecs one preadv/pwritev takes (Linux UIO_MAXIOV). */
export const IOV_MAX = 1024;

/**
 * preadv(2): `iov` holds `count` struct iovec {u64 base, u64 len} (host addresses, see
 * preadAt), filled by the caller; one system call for a scattered buffer.
 */
export function preadv(fd: number, iov: Bytes, count: number, offset: number): number {
  return check("preadv", Number(libc().preadv(fd, iov, count, offset)));
}

/** pwritev(2); see preadv. */
export function pwritev(fd: number, iov: Bytes, count: number, offset: number): number {
  return check("pwritev", Number(libc().pwritev(fd, iov, count, offset)));
}

export function fdatasync(fd: number): void {
  check("fdatasync", libc().fdatasync(fd));
}

/**
 * fallocate(2). Returns false when the file system does not support `mode` (EOPNOTSUPP),
 * so callers can fall back (e.g. to writing zeroes); any other failure is a SysError.
 */
export function fallocate(fd: number, mode: number, offset: number, length: number): boolean {
  const r = libc().fallocate(fd, mode, offset, length) as number;
  if (r < 0) {
    const e = koffi.errno();
    if (e === osConstants.errno.EOPNOTSUPP || e === osConstants.errno.ENOSYS) return false;
    throw new SysError("fallocate", e);
  }
  return true;
}

/** struct flock on x86-64: l_type, l_whence (shorts), l_start, l_len (off_t), l_pid. */
function flockStruct(type: number, start: number, length: number): Uint8Array {
  const buf = new Uint8Array(32);
  const dv = new DataView(buf.buffer);
  dv.setInt16(0, type, true);
  dv.setInt16(2, 0, true); // SEEK_SET
  dv.setBigInt64(8, BigInt(start), true);
  dv.setBigInt64(16, BigInt(length), true);
  return buf;
}

/**
 * F_OFD_GETLK: the type of a lock held through another open file description that would
 * conflict with taking `type` on [start, start+length), or F_UNLCK when none would.
 */
export function ofdLockTest(fd: number, type: number, start: number, length: number): number {
  const buf = flockStruct(type, start, length);
  check("fcntl", libc().fcntlPtr(fd, F_OFD_GETLK, buf), "F_OFD_GETLK");
  return new DataView(buf.buffer).getInt16(0, true);
}

/** F_OFD_SETLK: take (or with F_UNLCK drop) a lock; false when a conflicting lock is held. */
export function ofdLock(fd: number, type: number, start: number, length: number): boolean {
  const r = libc().fcntlPtr(fd, F_OFD_SETLK, flockStruct(type, start, length)) as number;
  if (r < 0) {
    const e = koffi.errno();
    if (e === Errno.EAGAIN || e === Errno.EACCES) return false;
    throw new SysError("fcntl", e, "F_OFD_SETLK");
  }
  return true;
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

/** setns(2) namespace types. */
export const CLONE_NEWNET = 0x40000000;

/**
 * setns(2): move the calling thread into the namespace `fd` refers to (an open
 * /run/netns/<name> or /proc/<pid>/ns/net). Only this thread moves; sockets and TAP fds
 * opened meanwhile stay in that namespace after the thread leaves it.
 */
export function setns(fd: number, nstype: number): void {
  check("setns", libc().setns(fd, nstype));
}

export const AF_UNIX = 1;
export const AF_INET = 2;
export const AF_PACKET = 17;
export const SOCK_STREAM = 1;
export const SOCK_DGRAM = 2;
export const SOCK_RAW = 3;
export const SOCK_NONBLOCK = 0o4000;
export const SOCK_CLOEXEC = 0o2000000;

/** socket(2), always close-on-exec. */
export function socket(domain: number, type: number, protocol = 0): number {
  return check("socket", libc().socket(domain, type | SOCK_CLOEXEC, protocol));
}

/** bind(2) with the socket address already laid out in `addr` (e.g. a sockaddr_ll). */
export function bind(fd: number, addr: Bytes): void {
  check("bind", libc().bind(fd, addr, addr.byteLength));
}

/**
 * The host address of an ArrayBuffer's memory, for iovecs that mix guest RAM and a host
 * buffer. V8 never moves the backing store of an ArrayBuffer (typed arrays over 64 bytes
 * get one when created; asking for `.buffer` makes one for smaller ones), so the address
 * stays valid while the buffer is alive: keep a reference for as long as it is used.
 */
export function addressOf(buffer: ArrayBufferLike): number {
  return Number(koffi.address(buffer));
}

/** socketpair(2), close-on-exec: the two connected fds. */
export function socketpair(domain: number, type: number, protocol = 0): [number, number] {
  const fds = new Int32Array(2);
  check("socketpair", libc().socketpair(domain, type | SOCK_CLOEXEC, protocol, fds));
  return [fds[0]!, fds[1]!];
}

export const SOCK_SEQPACKET = 5;

/**
 * readv(2) into `count` struct iovec entries laid out in `iov` (16 bytes each: u64 base
 * address, u64 length, host byte order; the caller guarantees the memory is mapped and
 * writable); -EAGAIN when a non-blocking fd has nothing.
 */
export function readv(fd: number, iov: Bytes, count: number): number {
  const r = Number(libc().readv(fd, iov, count));
  if (r < 0) {
    const e = koffi.errno();
    if (e === Errno.EAGAIN) return -e;
    throw new SysError("readv", e);
  }
  return r;
}

/**
 * writev(2) over `count` struct iovec entries laid out in `iov` (16 bytes each: u64
 * base address, u64 length, host byte order); -EAGAIN when a non-blocking fd is full.
 */
export function writev(fd: number, iov: Bytes, count: number): number {
  const r = Number(libc().writev(fd, iov, count));
  if (r < 0) {
    const e = koffi.errno();
    if (e === Errno.EAGAIN) return -e;
    throw new SysError("writev", e);
  }
  return r;
}

/** fcntl(2) commands with an integer argument. */
export const F_GETFL = 3;
export const F_SETFL = 4;
export const F_SETPIPE_SZ = 1031;
export const F_GETPIPE_SZ = 1032;

/** pipe2(2), always close-on-exec: [read end, write end]. `flags` may add O_NONBLOCK (both ends). */
export function pipe2(flags = 0): [number, number] {
  const fds = new Int32Array(2);
  check("pipe2", libc().pipe2(fds, flags | O_CLOEXEC));
  return [fds[0]!, fds[1]!];
}

/** fcntl(2) with an integer argument; returns the call's result. */
export function fcntl(fd: number, cmd: number, arg = 0): number {
  return check("fcntl", libc().fcntlInt(fd, cmd, arg));
}

export const PR_SET_PDEATHSIG = 1;

/**
 * prctl(PR_SET_PDEATHSIG): have the kernel send `signal` to this process when the thread
 * that started it (its parent) ends, however it ends (0 turns it off).
 */
export function setParentDeathSignal(signal: number): void {
  check("prctl", libc().prctl(PR_SET_PDEATHSIG, signal, 0, 0, 0), "PR_SET_PDEATHSIG");
}

/** lseek(2) whence values that find a sparse file's data and holes. */
export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;

/**
 * lseek(2) with SEEK_DATA or SEEK_HOLE: the offset of the next data (or hole) at or after
 * `offset`, or -1 when there is none before the end of the file (ENXIO).
 */
export function seekData(fd: number, offset: number, whence: typeof SEEK_DATA | typeof SEEK_HOLE): number {
  const r = Number(libc().lseek(fd, offset, whence));
  if (r < 0) {
    const e = koffi.errno();
    if (e === Errno.ENXIO) return -1;
    throw new SysError("lseek", e, whence === SEEK_DATA ? "SEEK_DATA" : "SEEK_HOLE");
  }
  return r;
}

export { SysError, Errno, errnoName } from "./errors";

/** Socket option levels and names (<asm-generic/socket.h>) used with setsockoptInt/getsockoptInt. */
export const SOL_SOCKET = 1;
export const SO_SNDBUF = 7;
export const SO_RCVBUF = 8;

/** setsockopt(2) with an int value. */
export function setsockoptInt(fd: number, level: number, name: number, value: number): void {
  const v = new Int32Array([value]);
  check("setsockopt", libc().setsockopt(fd, level, name, v, 4));
}

/** getsockopt(2) of an int value. */
export function getsockoptInt(fd: number, level: number, name: number): number {
  const v = new Int32Array(1);
  const len = new Uint32Array([4]);
  check("getsockopt", libc().getsockopt(fd, level, name, v, len));
  return v[0]!;
}

/** ioctl(2) SIOCOUTQ (= TIOCOUTQ): for a UNIX stream socket, the send queue's memory in bytes. */
export const SIOCOUTQ = 0x5411;

/** A socket's queued, not yet received output (SIOCOUTQ). */
export function socketOutputQueue(fd: number): number {
  const v = new Int32Array(1);
  check("ioctl", libc().ioctlPtr(fd, SIOCOUTQ, v), "SIOCOUTQ");
  return v[0]!;
}

/**
 * getrandom(2) from the kernel's pool (flags 0: blocks only before the pool is first
 * initialised, early in the host's boot). Returns how many bytes were filled: at most
 * 256 bytes per call are guaranteed whole, larger requests may come back short. EINTR is
 * retried.
 */
export function getrandom(buf: Bytes, length = buf.byteLength): number {
  for (;;) {
    const n = libc().getrandom(buf, length, 0) as number;
    if (n >= 0) return n;
    const errno = koffi.errno();
    if (errno !== Errno.EINTR) throw new SysError("getrandom", errno);
  }
}
