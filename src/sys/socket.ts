/**
 * UNIX stream sockets beyond socket(2)/bind(2) in libc.ts: listen, connect, shutdown, and
 * sendmsg/recvmsg carrying file descriptors (SCM_RIGHTS), for vhost-user and the helper
 * processes tskvm starts. Structures (sockaddr_un, msghdr, iovec, cmsghdr) are laid out by
 * hand for x86-64 Linux (glibc); test/unit/sys-socket.test.ts passes real descriptors
 * through them.
 */
import koffi from "koffi";
import { constants as osConstants } from "node:os";
import { Errno, SysError } from "./errors";
import { addressOf, type Bytes } from "./libc";

type Fn = (...args: any[]) => any;

interface Bindings {
  listen: Fn;
  connect: Fn;
  shutdown: Fn;
  sendmsg: Fn;
  recvmsg: Fn;
  close: Fn;
}

let bound: Bindings | undefined;

function libc(): Bindings {
  if (bound !== undefined) return bound;
  const lib = koffi.load("libc.so.6");
  bound = {
    listen: lib.func("listen", "int", ["int", "int"]),
    connect: lib.func("connect", "int", ["int", "void *", "unsigned int"]),
    shutdown: lib.func("shutdown", "int", ["int", "int"]),
    sendmsg: lib.func("sendmsg", "long", ["int", "void *", "int"]),
    recvmsg: lib.func("recvmsg", "long", ["int", "void *", "int"]),
    close: lib.func("close", "int", ["int"]),
  };
  return bound;
}

function check(call: string, result: number, detail?: string): number {
  if (result < 0) throw new SysError(call, koffi.errno(), detail);
  return result;
}

export const SHUT_RD = 0;
export const SHUT_WR = 1;
export const SHUT_RDWR = 2;

export const MSG_CTRUNC = 0x8;
export const MSG_DONTWAIT = 0x40;
export const MSG_NOSIGNAL = 0x4000;
export const MSG_CMSG_CLOEXEC = 0x40000000;

const SOL_SOCKET = 1;
const SCM_RIGHTS = 1;

/** sizeof(sockaddr_un.sun_path). */
export const UNIX_PATH_MAX = 108;

/**
 * A sockaddr_un for `path`. Throws when the path does not fit (108 bytes with its NUL);
 * callers keep runtime directories short for that reason.
 */
export function unixAddress(path: string): Bytes {
  const name = Buffer.from(path, "utf8");
  if (name.length === 0 || name.length >= UNIX_PATH_MAX || name.includes(0)) {
    throw new RangeError(`a UNIX socket path must be 1 to ${UNIX_PATH_MAX - 1} bytes without NUL: ${path}`);
  }
  const addr = new Uint8Array(2 + name.length + 1);
  new DataView(addr.buffer).setUint16(0, 1 /* AF_UNIX */, true);
  addr.set(name, 2);
  return addr;
}

export function listen(fd: number, backlog: number): void {
  check("listen", libc().listen(fd, backlog));
}

/** connect(2) to an address from unixAddress(); EINTR is retried by the kernel's semantics for UNIX sockets. */
export function connect(fd: number, addr: Bytes): void {
  check("connect", libc().connect(fd, addr, addr.byteLength));
}

export function shutdown(fd: number, how: number): void {
  check("shutdown", libc().shutdown(fd, how));
}

/** Most descriptors one message may carry (vhost-user's limit is 8; the kernel's 253). */
export const MAX_FDS_PER_MESSAGE = 16;

const MSGHDR_SIZE = 56;
const IOVEC_SIZE = 16;
const CMSG_HEADER = 16;
const cmsgSpace = (fdCount: number): number => CMSG_HEADER + ((fdCount * 4 + 7) & ~7);

/**
 * One message buffer: msghdr, one iovec and room for MAX_FDS_PER_MESSAGE descriptors, in a
 * single ArrayBuffer whose address is stable (see addressOf), reused per thread.
 */
class MessageBuffer {
  readonly bytes = new Uint8Array(MSGHDR_SIZE + IOVEC_SIZE + cmsgSpace(MAX_FDS_PER_MESSAGE));
  readonly view = new DataView(this.bytes.buffer);
  readonly base = addressOf(this.bytes.buffer);

  /** Point the msghdr at `data` (its first `length` bytes) and a control area for `fdCount` fds. */
  prepare(data: Bytes, length: number, fdCount: number): void {
    this.bytes.fill(0);
    const v = this.view;
    const iov = MSGHDR_SIZE;
    const control = MSGHDR_SIZE + IOVEC_SIZE;
    v.setBigUint64(16, BigInt(this.base + iov), true); // msg_iov
    v.setBigUint64(24, 1n, true); // msg_iovlen
    v.setBigUint64(iov, BigInt(addressOf(data.buffer) + data.byteOffset), true);
    v.setBigUint64(iov + 8, BigInt(length), true);
    if (fdCount > 0) {
      v.setBigUint64(32, BigInt(this.base + control), true); // msg_control
      v.setBigUint64(40, BigInt(cmsgSpace(fdCount)), true); // msg_controllen
    }
  }
}

let messageBuffer: MessageBuffer | undefined;
const buffer = (): MessageBuffer => (messageBuffer ??= new MessageBuffer());

/**
 * sendmsg(2) of `data[0, length)` with `fds` attached (SCM_RIGHTS) to its first byte.
 * Never raises SIGPIPE (MSG_NOSIGNAL): a peer that went away is EPIPE. Returns the bytes
 * sent (possibly fewer than asked: the rest goes without the fds), or -EAGAIN.
 */
export function sendmsg(fd: number, data: Bytes, fds: readonly number[] = [], flags = 0, length = data.byteLength): number {
  if (fds.length > MAX_FDS_PER_MESSAGE) throw new RangeError(`at most ${MAX_FDS_PER_MESSAGE} fds per message`);
  if (length <= 0 || length > data.byteLength) throw new RangeError(`sendmsg length ${length} of ${data.byteLength}`);
  const m = buffer();
  m.prepare(data, length, fds.length);
  if (fds.length > 0) {
    const c = MSGHDR_SIZE + IOVEC_SIZE;
    m.view.setBigUint64(c, BigInt(CMSG_HEADER + 4 * fds.length), true); // cmsg_len
    m.view.setInt32(c + 8, SOL_SOCKET, true);
    m.view.setInt32(c + 12, SCM_RIGHTS, true);
    fds.forEach((f, i) => m.view.setInt32(c + CMSG_HEADER + 4 * i, f, true));
  }
  for (;;) {
    const r = Number(libc().sendmsg(fd, m.bytes, flags | MSG_NOSIGNAL));
    if (r >= 0) return r;
    const e = koffi.errno();
    if (e === Errno.EINTR) continue;
    if (e === Errno.EAGAIN) return -e;
    throw new SysError("sendmsg", e);
  }
}

export interface Received {
  /** Bytes read into the buffer; 0 means the peer closed its end (EOF). */
  bytes: number;
  /** Descriptors that came with them (close-on-exec), now owned by the caller. */
  fds: number[];
}

/**
 * recvmsg(2) into `into[0, length)`, collecting SCM_RIGHTS descriptors (received
 * close-on-exec). Returns null for a non-blocking socket with nothing to read. When the
 * peer sent more descriptors than MAX_FDS_PER_MESSAGE (MSG_CTRUNC), the ones that did
 * arrive are closed and a SysError (EMSGSIZE) is thrown: a peer may not flood us with fds.
 */
export function recvmsg(fd: number, into: Bytes, flags = 0, length = into.byteLength): Received | null {
  if (length <= 0 || length > into.byteLength) throw new RangeError(`recvmsg length ${length} of ${into.byteLength}`);
  const m = buffer();
  m.prepare(into, length, MAX_FDS_PER_MESSAGE);
  let r: number;
  for (;;) {
    r = Number(libc().recvmsg(fd, m.bytes, flags | MSG_CMSG_CLOEXEC));
    if (r >= 0) break;
    const e = koffi.errno();
    if (e === Errno.EINTR) continue;
    if (e === Errno.EAGAIN) return null;
    throw new SysError("recvmsg", e);
  }
  const fds: number[] = [];
  const v = m.view;
  const controlLen = Number(v.getBigUint64(40, true));
  let c = MSGHDR_SIZE + IOVEC_SIZE;
  const end = c + Math.min(controlLen, cmsgSpace(MAX_FDS_PER_MESSAGE));
  while (c + CMSG_HEADER <= end) {
    const len = Number(v.getBigUint64(c, true));
    if (len < CMSG_HEADER || c + len > end) break;
    if (v.getInt32(c + 8, true) === SOL_SOCKET && v.getInt32(c + 12, true) === SCM_RIGHTS) {
      for (let o = c + CMSG_HEADER; o + 4 <= c + len; o += 4) fds.push(v.getInt32(o, true));
    }
    c += (len + 7) & ~7;
  }
  if ((v.getInt32(48, true) & MSG_CTRUNC) !== 0) {
    for (const f of fds) libc().close(f);
    throw new SysError("recvmsg", osConstants.errno.EMSGSIZE, `(more than ${MAX_FDS_PER_MESSAGE} descriptors)`);
  }
  return { bytes: r, fds };
}
