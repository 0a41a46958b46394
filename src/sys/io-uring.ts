/**
 * io_uring through its raw system calls (io_uring_setup, io_uring_enter, io_uring_register),
 * no liburing: the submission and completion rings are typed arrays over their mmap, so
 * preparing a request is a few stores into shared memory and a whole batch of requests
 * costs one FFI crossing (io_uring_enter), where the plain path costs one per system call.
 *
 * Layout facts are from <linux/io_uring.h>; test/unit/io-uring.test.ts compiles
 * native/io_uring_abi.c and compares them with the host's header.
 *
 * Threading: a ring belongs to the thread that made it (it is set up SINGLE_ISSUER where
 * the kernel allows). Memory ordering: the SQ tail is published with Atomics.store after
 * the entries it covers, the CQ tail is read with Atomics.load before the entries it
 * covers, and the CQ head is released with Atomics.store once they have been read (x86-64
 * is TSO; the Atomics keep V8 from reordering or caching the loads and stores).
 */
import koffi from "koffi";
import { readFileSync } from "node:fs";
import { constants as osConstants } from "node:os";
import { Errno, SysError } from "./errors";
import * as sys from "./libc";

type Fn = (...args: any[]) => any;

interface Bindings {
  setup: Fn;
  enter: Fn;
  register: Fn;
}

let bound: Bindings | undefined;

function calls(): Bindings {
  if (bound !== undefined) return bound;
  const lib = koffi.load("libc.so.6");
  // syscall(2) is variadic; glibc's x86-64 syscall() is assembly that moves the six
  // integer-class argument registers into the kernel's, so fixed prototypes are ABI-safe.
  bound = {
    setup: lib.func("syscall", "long", ["long", "unsigned int", "void *"]),
    enter: lib.func("syscall", "long", ["long", "int", "unsigned int", "unsigned int", "unsigned int", "void *", "size_t"]),
    register: lib.func("syscall", "long", ["long", "int", "unsigned int", "void *", "unsigned int"]),
  };
  return bound;
}

/** x86-64 system call numbers (the same on every Linux since 5.1). */
const SYS_IO_URING_SETUP = 425;
const SYS_IO_URING_ENTER = 426;
const SYS_IO_URING_REGISTER = 427;

/** Opcodes used by tskvm (enum io_uring_op). */
export const IoUringOp = {
  NOP: 0,
  READV: 1,
  WRITEV: 2,
  FSYNC: 3,
  POLL_ADD: 6,
  FALLOCATE: 17,
  READ: 22,
  WRITE: 23,
} as const;

/** sqe->flags */
export const IOSQE_IO_DRAIN = 1 << 1;
export const IOSQE_IO_LINK = 1 << 2;
export const IOSQE_IO_HARDLINK = 1 << 3;
export const IOSQE_ASYNC = 1 << 4;
/** RWF_* flags of a read or write (preadv2/pwritev2). */
export const RWF_NOWAIT = 0x8;
/** fsync_flags */
export const IORING_FSYNC_DATASYNC = 1;
/** poll: len carries these flags for POLL_ADD */
export const IORING_POLL_ADD_MULTI = 1;
/** cqe->flags */
export const IORING_CQE_F_MORE = 1 << 1;

/** io_uring_setup flags. */
export const IORING_SETUP_CLAMP = 1 << 4;
export const IORING_SETUP_SUBMIT_ALL = 1 << 7;
export const IORING_SETUP_COOP_TASKRUN = 1 << 8;
export const IORING_SETUP_SINGLE_ISSUER = 1 << 12;
export const IORING_SETUP_DEFER_TASKRUN = 1 << 13;

/** io_uring_enter flags. */
export const IORING_ENTER_GETEVENTS = 1;

/** io_uring_params->features */
export const IORING_FEAT_SINGLE_MMAP = 1 << 0;
export const IORING_FEAT_NODROP = 1 << 1;
export const IORING_FEAT_SUBMIT_STABLE = 1 << 2;

/** mmap offsets of the rings. */
const IORING_OFF_SQ_RING = 0;
const IORING_OFF_SQES = 0x10000000;
const IORING_REGISTER_PROBE = 8;
const IO_URING_OP_SUPPORTED = 1;

/** Sizes and offsets in the ABI (checked against the C header by the unit test). */
export const IoUringAbi = {
  PARAMS_SIZE: 120,
  PARAMS_SQ_ENTRIES: 0,
  PARAMS_CQ_ENTRIES: 4,
  PARAMS_FLAGS: 8,
  PARAMS_FEATURES: 20,
  PARAMS_SQ_OFF: 40,
  PARAMS_CQ_OFF: 80,
  /** Fields of io_sqring_offsets / io_cqring_offsets, as u32 indices. */
  SQ_OFF_HEAD: 0,
  SQ_OFF_TAIL: 1,
  SQ_OFF_RING_MASK: 2,
  SQ_OFF_RING_ENTRIES: 3,
  SQ_OFF_FLAGS: 4,
  SQ_OFF_DROPPED: 5,
  SQ_OFF_ARRAY: 6,
  CQ_OFF_HEAD: 0,
  CQ_OFF_TAIL: 1,
  CQ_OFF_RING_MASK: 2,
  CQ_OFF_RING_ENTRIES: 3,
  CQ_OFF_OVERFLOW: 4,
  CQ_OFF_CQES: 5,
  SQE_SIZE: 64,
  CQE_SIZE: 16,
  /** struct io_uring_sqe byte offsets. */
  SQE_OPCODE: 0,
  SQE_FLAGS: 1,
  SQE_IOPRIO: 2,
  SQE_FD: 4,
  SQE_OFF: 8,
  SQE_ADDR: 16,
  SQE_LEN: 24,
  SQE_OP_FLAGS: 28,
  SQE_USER_DATA: 32,
  SQE_BUF_INDEX: 40,
  SQE_PERSONALITY: 42,
  SQE_FILE_INDEX: 44,
  SQE_ADDR3: 48,
  /** struct io_uring_cqe byte offsets. */
  CQE_USER_DATA: 0,
  CQE_RES: 8,
  CQE_FLAGS: 12,
  PROBE_HEADER_SIZE: 16,
  PROBE_OP_SIZE: 8,
} as const;

const TWO_32 = 4294967296;
const MAP_POPULATE = 0x8000;
const ENOSYS = osConstants.errno.ENOSYS;

/** Whether this process can use io_uring, and if not, why (one line for `tskvm probe`). */
export type IoUringSupport =
  | { available: true; features: number; setupFlags: number; opcodes: ReadonlySet<number> }
  | { available: false; reason: string; errno?: number };

/** Opcodes an engine needs; probeIoUring reports a kernel without them as unavailable. */
export const REQUIRED_OPCODES: readonly number[] = [
  IoUringOp.READ,
  IoUringOp.WRITE,
  IoUringOp.READV,
  IoUringOp.WRITEV,
  IoUringOp.FSYNC,
  IoUringOp.FALLOCATE,
];

const OPCODE_NAMES: Record<number, string> = Object.fromEntries(Object.entries(IoUringOp).map(([k, v]) => [v, k]));

/** The kernel.io_uring_disabled sysctl (0 allowed, 1 only for a group / CAP_SYS_ADMIN, 2 off), or undefined. */
export function ioUringDisabledSysctl(path = "/proc/sys/kernel/io_uring_disabled"): number | undefined {
  try {
    const v = Number(readFileSync(path, "utf8").trim());
    return Number.isInteger(v) ? v : undefined;
  } catch {
    return undefined;
  }
}

let probed: IoUringSupport | undefined;

/**
 * Can this process use io_uring? Sets up (and closes) a small ring, reads which opcodes the
 * kernel supports, and says why not when it cannot: no io_uring in the kernel (ENOSYS, also
 * what some seccomp profiles return), the kernel.io_uring_disabled sysctl, or a seccomp
 * filter (EPERM). Cached per thread.
 */
export function probeIoUring(): IoUringSupport {
  if (probed !== undefined) return probed;
  probed = probeUncached();
  return probed;
}

function probeUncached(): IoUringSupport {
  let ring: IoUring;
  try {
    ring = IoUring.create(4);
  } catch (e) {
    if (!(e instanceof SysError)) return { available: false, reason: `io_uring: ${(e as Error).message}` };
    const sysctl = ioUringDisabledSysctl();
    if (e.errno === ENOSYS) {
      return { available: false, errno: e.errno, reason: "io_uring_setup: ENOSYS (a kernel without io_uring, or a seccomp filter that hides it)" };
    }
    if (e.errno === Errno.EPERM || e.errno === Errno.EACCES) {
      const why =
        sysctl === 2
          ? "kernel.io_uring_disabled=2"
          : sysctl === 1
            ? "kernel.io_uring_disabled=1 and this process is not in its io_uring group"
            : "blocked by a seccomp filter, as in a container's default profile";
      return { available: false, errno: e.errno, reason: `io_uring_setup: ${e.code} (${why})` };
    }
    return { available: false, errno: e.errno, reason: e.message };
  }
  try {
    const opcodes = ring.supportedOpcodes();
    const missing = REQUIRED_OPCODES.filter((op) => !opcodes.has(op));
    if (missing.length > 0) {
      return { available: false, reason: `io_uring lacks ${missing.map((op) => OPCODE_NAMES[op] ?? op).join(", ")} (kernel older than 5.6)` };
    }
    const need = IORING_FEAT_SINGLE_MMAP | IORING_FEAT_NODROP | IORING_FEAT_SUBMIT_STABLE;
    if ((ring.features & need) !== need) return { available: false, reason: "io_uring lacks SINGLE_MMAP/NODROP/SUBMIT_STABLE (kernel older than 5.5)" };
    return { available: true, features: ring.features, setupFlags: ring.setupFlags, opcodes };
  } finally {
    ring.close();
  }
}

/** Setup flag sets tried in order: cheapest task-work handling first, plain last. */
const SETUP_FLAG_CHOICES: readonly number[] = [
  IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_SUBMIT_ALL | IORING_SETUP_CLAMP, // 6.1
  IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SUBMIT_ALL | IORING_SETUP_CLAMP, // 5.19
  IORING_SETUP_CLAMP,
];

/**
 * One io_uring instance. Prepare requests with the prep* methods (each returns false when
 * the submission queue is full), submit them with submit() or submitAndWait(), then read
 * completions by index: completionCount(), completionTag(i), completionResult(i),
 * completionFlags(i), and consumeCompletions(n). Nothing on these paths allocates.
 */
export class IoUring {
  readonly fd: number;
  readonly sqEntries: number;
  readonly cqEntries: number;
  readonly features: number;
  readonly setupFlags: number;

  /** The SQ+CQ ring mapping (one, IORING_FEAT_SINGLE_MMAP) as u32 words, and the SQE array. */
  private readonly ring32: Uint32Array;
  private readonly cqe32: Int32Array;
  private readonly sqe32: Uint32Array;
  private readonly sqHeadAt: number;
  private readonly sqTailAt: number;
  private readonly cqHeadAt: number;
  private readonly cqTailAt: number;
  private readonly cqesAt: number;
  private readonly sqMask: number;
  private readonly cqMask: number;
  private readonly mappings: { address: bigint; length: number }[];
  private readonly enterFn: Fn;
  /** Our SQ tail (entries prepared), and how far the kernel has been told (submitted). */
  private sqTail = 0;
  private sqSubmitted = 0;
  /** Our CQ head (consumed completions). */
  private cqHead = 0;
  private closed = false;

  private constructor(fd: number, params: Uint32Array, flags: number) {
    this.fd = fd;
    this.setupFlags = flags;
    const A = IoUringAbi;
    this.sqEntries = params[A.PARAMS_SQ_ENTRIES / 4]!;
    this.cqEntries = params[A.PARAMS_CQ_ENTRIES / 4]!;
    this.features = params[A.PARAMS_FEATURES / 4]!;
    const sq = A.PARAMS_SQ_OFF / 4;
    const cq = A.PARAMS_CQ_OFF / 4;
    if ((this.features & IORING_FEAT_SINGLE_MMAP) === 0) {
      throw new SysError("io_uring_setup", Errno.EINVAL, "(kernel without IORING_FEAT_SINGLE_MMAP, older than 5.4)");
    }
    const sqArrayOff = params[sq + A.SQ_OFF_ARRAY]!;
    const cqesOff = params[cq + A.CQ_OFF_CQES]!;
    const ringBytes = Math.max(sqArrayOff + 4 * this.sqEntries, cqesOff + A.CQE_SIZE * this.cqEntries);
    const sqeBytes = A.SQE_SIZE * this.sqEntries;
    this.mappings = [];
    const ringPtr = sys.mmap(ringBytes, sys.PROT_READ | sys.PROT_WRITE, sys.MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
    this.mappings.push({ address: ringPtr, length: ringBytes });
    const sqePtr = sys.mmap(sqeBytes, sys.PROT_READ | sys.PROT_WRITE, sys.MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
    this.mappings.push({ address: sqePtr, length: sqeBytes });
    const ringBuf = sys.view(ringPtr, ringBytes);
    this.ring32 = new Uint32Array(ringBuf);
    this.cqe32 = new Int32Array(ringBuf);
    this.sqe32 = new Uint32Array(sys.view(sqePtr, sqeBytes));
    this.sqHeadAt = params[sq + A.SQ_OFF_HEAD]! / 4;
    this.sqTailAt = params[sq + A.SQ_OFF_TAIL]! / 4;
    this.cqHeadAt = params[cq + A.CQ_OFF_HEAD]! / 4;
    this.cqTailAt = params[cq + A.CQ_OFF_TAIL]! / 4;
    this.cqesAt = cqesOff / 4;
    this.sqMask = this.ring32[params[sq + A.SQ_OFF_RING_MASK]! / 4]!;
    this.cqMask = this.ring32[params[cq + A.CQ_OFF_RING_MASK]! / 4]!;
    // Entries are always used in ring order, so the indirection array is the identity,
    // written once here.
    const arrayAt = sqArrayOff / 4;
    for (let i = 0; i < this.sqEntries; i++) this.ring32[arrayAt + i] = i;
    this.sqTail = this.sqSubmitted = Atomics.load(this.ring32, this.sqTailAt);
    this.cqHead = Atomics.load(this.ring32, this.cqHeadAt);
    this.enterFn = calls().enter;
  }

  /**
   * Set up a ring of at least `entries` submission entries (rounded up to a power of two;
   * the completion queue is twice that). Throws SysError: ENOSYS (no io_uring), EPERM
   * (io_uring_disabled or seccomp), ENOMEM (locked-memory limit on old kernels).
   */
  static create(entries: number): IoUring {
    if (!Number.isInteger(entries) || entries < 1 || entries > 4096) throw new RangeError(`io_uring entries must be 1 to 4096, not ${entries}`);
    const params = new Uint32Array(IoUringAbi.PARAMS_SIZE / 4);
    let last: SysError | undefined;
    for (const flags of SETUP_FLAG_CHOICES) {
      params.fill(0);
      params[IoUringAbi.PARAMS_FLAGS / 4] = flags;
      const fd = Number(calls().setup(SYS_IO_URING_SETUP, entries, params));
      if (fd >= 0) {
        try {
          return new IoUring(fd, params, flags);
        } catch (e) {
          sys.close(fd);
          throw e;
        }
      }
      last = new SysError("io_uring_setup", koffi.errno());
      // EINVAL: a flag this kernel does not know; try the next set. Anything else is final.
      if (last.errno !== Errno.EINVAL) throw last;
    }
    throw last!;
  }

  /** Opcodes the kernel supports (IORING_REGISTER_PROBE). */
  supportedOpcodes(): Set<number> {
    const ops = 256;
    const buf = new Uint8Array(IoUringAbi.PROBE_HEADER_SIZE + ops * IoUringAbi.PROBE_OP_SIZE);
    const r = Number(calls().register(SYS_IO_URING_REGISTER, this.fd, IORING_REGISTER_PROBE, buf, ops));
    if (r < 0) throw new SysError("io_uring_register", koffi.errno(), "IORING_REGISTER_PROBE");
    const out = new Set<number>();
    const n = buf[1]!; // ops_len
    for (let i = 0; i < n; i++) {
      const o = IoUringAbi.PROBE_HEADER_SIZE + i * IoUringAbi.PROBE_OP_SIZE;
      const flags = buf[o + 2]! | (buf[o + 3]! << 8);
      if (flags & IO_URING_OP_SUPPORTED) out.add(buf[o]!);
    }
    return out;
  }

  /** Submission entries free now. */
  get sqSpace(): number {
    return this.sqEntries - ((this.sqTail - Atomics.load(this.ring32, this.sqHeadAt)) >>> 0);
  }

  /** Entries prepared and not yet handed to the kernel. */
  get unsubmitted(): number {
    return (this.sqTail - this.sqSubmitted) >>> 0;
  }

  /**
   * Prepare one request. `addr` and `offset` are numbers below 2^53 (host addresses,
   * file offsets); `tag` is a 32-bit value returned in the completion. False when full.
   */
  prep(opcode: number, fd: number, addr: number, len: number, offset: number, opFlags: number, tag: number, sqeFlags = 0): boolean {
    const tail = this.sqTail;
    if (((tail - Atomics.load(this.ring32, this.sqHeadAt)) >>> 0) >= this.sqEntries) return false;
    const s = this.sqe32;
    const o = (tail & this.sqMask) << 4;
    s[o] = opcode | (sqeFlags << 8);
    s[o + 1] = fd;
    s[o + 2] = offset >>> 0;
    s[o + 3] = (offset / TWO_32) >>> 0;
    s[o + 4] = addr >>> 0;
    s[o + 5] = (addr / TWO_32) >>> 0;
    s[o + 6] = len;
    s[o + 7] = opFlags;
    s[o + 8] = tag;
    s[o + 9] = 0;
    s[o + 10] = 0;
    s[o + 11] = 0;
    s[o + 12] = 0;
    s[o + 13] = 0;
    s[o + 14] = 0;
    s[o + 15] = 0;
    this.sqTail = (tail + 1) >>> 0;
    return true;
  }

  /**
   * read at `offset` (-1: the file position, for pipes, sockets and TAPs). `rwFlags` are
   * preadv2's RWF_* flags: with RWF_NOWAIT a read that would block completes with -EAGAIN;
   * without it, kernels since 5.x wait for data (poll-driven) even on an O_NONBLOCK fd.
   */
  prepRead(fd: number, addr: number, len: number, offset: number, tag: number, rwFlags = 0, sqeFlags = 0): boolean {
    return this.prep(IoUringOp.READ, fd, addr, len, offset, rwFlags, tag, sqeFlags);
  }

  prepWrite(fd: number, addr: number, len: number, offset: number, tag: number, rwFlags = 0, sqeFlags = 0): boolean {
    return this.prep(IoUringOp.WRITE, fd, addr, len, offset, rwFlags, tag, sqeFlags);
  }

  /** readv over `count` struct iovec at `iovAddr`; see prepRead. */
  prepReadv(fd: number, iovAddr: number, count: number, offset: number, tag: number, rwFlags = 0, sqeFlags = 0): boolean {
    return this.prep(IoUringOp.READV, fd, iovAddr, count, offset, rwFlags, tag, sqeFlags);
  }

  prepWritev(fd: number, iovAddr: number, count: number, offset: number, tag: number, rwFlags = 0, sqeFlags = 0): boolean {
    return this.prep(IoUringOp.WRITEV, fd, iovAddr, count, offset, rwFlags, tag, sqeFlags);
  }

  /** fsync, or fdatasync with `dataOnly`. */
  prepFsync(fd: number, dataOnly: boolean, tag: number, sqeFlags = 0): boolean {
    return this.prep(IoUringOp.FSYNC, fd, 0, 0, 0, dataOnly ? IORING_FSYNC_DATASYNC : 0, tag, sqeFlags);
  }

  /** fallocate(fd, mode, offset, length): the length travels in sqe->addr, the mode in sqe->len. */
  prepFallocate(fd: number, mode: number, offset: number, length: number, tag: number, sqeFlags = 0): boolean {
    return this.prep(IoUringOp.FALLOCATE, fd, length, mode, offset, 0, tag, sqeFlags);
  }

  /** Poll `fd` for `events` (POLLIN, ...) once, or with `multishot` until cancelled or failed. */
  prepPoll(fd: number, events: number, tag: number, multishot = false): boolean {
    return this.prep(IoUringOp.POLL_ADD, fd, 0, multishot ? IORING_POLL_ADD_MULTI : 0, 0, events, tag);
  }

  prepNop(tag: number, sqeFlags = 0): boolean {
    return this.prep(IoUringOp.NOP, -1, 0, 0, 0, 0, tag, sqeFlags);
  }

  /**
   * Hand every prepared entry to the kernel; with `minComplete` > 0, also wait until at
   * least that many completions are ready. One io_uring_enter in the usual case; an
   * interrupted wait (EINTR) is resumed. Returns the number of completions ready.
   */
  submitAndWait(minComplete = 0): number {
    for (;;) {
      const toSubmit = (this.sqTail - this.sqSubmitted) >>> 0;
      const ready = this.completionCount();
      const wait = minComplete > ready ? minComplete : 0;
      if (toSubmit === 0 && wait === 0) return ready;
      // Publish the tail: the entries above were written first (release).
      Atomics.store(this.ring32, this.sqTailAt, this.sqTail);
      const flags = wait > 0 || (this.setupFlags & IORING_SETUP_DEFER_TASKRUN) !== 0 ? IORING_ENTER_GETEVENTS : 0;
      const r = Number(this.enterFn(SYS_IO_URING_ENTER, this.fd, toSubmit, wait, flags, null, 0));
      if (r > 0 || (r === 0 && toSubmit === 0)) {
        this.sqSubmitted = (this.sqSubmitted + r) >>> 0;
        continue;
      }
      if (r === 0) throw new SysError("io_uring_enter", Errno.EAGAIN, "(the kernel took no entries)");
      const e = koffi.errno();
      if (e === Errno.EINTR) continue;
      // EAGAIN/EBUSY: completions must be reaped before the kernel takes more.
      throw new SysError("io_uring_enter", e);
    }
  }

  /** Completions ready to be read (loads the CQ tail: acquire). */
  completionCount(): number {
    return (Atomics.load(this.ring32, this.cqTailAt) - this.cqHead) >>> 0;
  }

  /** The tag of the i-th ready completion (0 = oldest). */
  completionTag(i: number): number {
    return this.cqe32[this.cqesAt + (((this.cqHead + i) & this.cqMask) << 2)]! >>> 0;
  }

  /** Its result: what the system call would have returned, or -errno. */
  completionResult(i: number): number {
    return this.cqe32[this.cqesAt + (((this.cqHead + i) & this.cqMask) << 2) + 2]!;
  }

  completionFlags(i: number): number {
    return this.cqe32[this.cqesAt + (((this.cqHead + i) & this.cqMask) << 2) + 3]! >>> 0;
  }

  /** Give the first `n` ready completions back to the kernel. */
  consumeCompletions(n: number): void {
    this.cqHead = (this.cqHead + n) >>> 0;
    Atomics.store(this.ring32, this.cqHeadAt, this.cqHead);
  }

  /** Unmap the rings and close the ring fd (cancelling what is still in flight). Idempotent. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const m of this.mappings) sys.munmap(m.address, m.length);
    sys.close(this.fd);
  }
}
