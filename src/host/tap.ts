/**
 * A Linux TAP device for virtio-net: /dev/net/tun with TUNSETIFF (IFF_TAP | IFF_NO_PI |
 * IFF_VNET_HDR), non-blocking, one whole Ethernet frame (after a virtio-net header) per
 * read or write.
 *
 * Lifetime: a TAP this process created (not persistent) exists exactly as long as an fd
 * refers to it; the kernel unregisters it when the last one closes, on every exit path
 * (close(), a crash, SIGKILL). A TAP that already existed (made persistent with
 * `ip tuntap add`) is attached to and left in place. `created` says which.
 *
 * Numbers from <linux/if_tun.h> and <linux/if.h>; test/unit/tap.test.ts compiles
 * native/tun_abi.c and compares them with the host's headers.
 */
import { spawnSync } from "node:child_process";
import * as sys from "../sys/libc";
import { ior, iow } from "../sys/ioctl-number";
import { NetOffload, type FrameBatch, type NetBackend } from "../devices/virtio/net/backend";
import { IOSQE_IO_LINK, type IoUring, RWF_NOWAIT } from "../sys/io-uring";
import { IOVEC_BYTES, hostAddressOf } from "../memory/iovec";
import { constants as osConstants } from "node:os";

const EAGAIN = osConstants.errno.EAGAIN;
const ECANCELED = osConstants.errno.ECANCELED;
/** What io_uring answers RWF_NOWAIT on a TAP whose kernel cannot do it (Debian 6.1's tun). */
const EOPNOTSUPP = osConstants.errno.EOPNOTSUPP;

const T = 0x54; // 'T'

/** TUN/TAP ioctls and flags (<linux/if_tun.h>), and struct ifreq facts (<linux/if.h>). */
export const TunAbi = {
  TUNSETIFF: iow(T, 202, 4),
  TUNSETPERSIST: iow(T, 203, 4),
  TUNGETFEATURES: ior(T, 207, 4),
  TUNSETOFFLOAD: iow(T, 208, 4),
  TUNGETIFF: ior(T, 210, 4),
  TUNSETVNETHDRSZ: iow(T, 216, 4),
  IFF_TUN: 0x0001,
  IFF_TAP: 0x0002,
  IFF_MULTI_QUEUE: 0x0100,
  IFF_PERSIST: 0x0800,
  IFF_NO_PI: 0x1000,
  IFF_VNET_HDR: 0x4000,
  TUN_F_CSUM: 0x01,
  TUN_F_TSO4: 0x02,
  TUN_F_TSO6: 0x04,
  TUN_F_TSO_ECN: 0x08,
  TUN_F_UFO: 0x10,
  IFNAMSIZ: 16,
  /** sizeof(struct ifreq), and where ifr_name and ifr_flags are in it. */
  IFREQ_SIZE: 40,
  IFR_NAME: 0,
  IFR_FLAGS: 16,
} as const;

// virtio-net's offload bits are the TUN ones, so setOffload hands them over unchanged.
export const TUN_F_CSUM: typeof NetOffload.CSUM = TunAbi.TUN_F_CSUM;
export const TUN_F_TSO4: typeof NetOffload.TSO4 = TunAbi.TUN_F_TSO4;
export const TUN_F_TSO6: typeof NetOffload.TSO6 = TunAbi.TUN_F_TSO6;
export const TUN_F_TSO_ECN: typeof NetOffload.TSO_ECN = TunAbi.TUN_F_TSO_ECN;
export const TUN_F_UFO = TunAbi.TUN_F_UFO;

export const TUN_DEVICE = "/dev/net/tun";

export type TapErrorKind =
  /** Empty, or a character the kernel refuses in interface names. */
  | "InvalidName"
  /** 16 bytes or more (IFNAMSIZ includes the NUL). */
  | "NameTooLong"
  /** No CAP_NET_ADMIN (EPERM/EACCES). */
  | "NoPermission"
  /** /dev/net/tun is missing or the tun module is not loaded. */
  | "NoTunDevice"
  /** The TAP exists and another fd holds its one queue (EBUSY). */
  | "Busy"
  /** An interface of that name exists and is not a single-queue TAP. */
  | "NotTap"
  /** `ip` failed to configure the host side. */
  | "HostSetup"
  /** Anything else, with the failing call. */
  | "Failed";

/** A TAP problem, as one line that says what to do about it. */
export class TapError extends Error {
  constructor(
    readonly kind: TapErrorKind,
    message: string,
    readonly errno?: number,
  ) {
    super(message);
    this.name = "TapError";
  }
}

export interface OpenTapOptions {
  /** Bytes of virtio-net header before each frame: 10, or 12 with num_buffers (default). */
  vnetHeaderSize?: 10 | 12;
  /** The clone device (tests point it elsewhere). */
  devicePath?: string;
}

/**
 * An open TAP queue. openTap makes one; another thread of the process (the I/O worker)
 * can wrap the same fd with `new Tap(name, fd, created, vnetHeaderSize)`, and must leave
 * closing it to the owner.
 */
export class Tap implements NetBackend {
  private closed = false;
  private ring: IoUring | undefined;
  private hdrSize: number;

  constructor(
    /** The interface name the kernel gave it (differs from the request for "tap%d"). */
    readonly name: string,
    readonly fd: number,
    /** True when this open created it: it goes away with the fd. False: it existed. */
    readonly created: boolean,
    vnetHeaderSize: number,
  ) {
    this.hdrSize = vnetHeaderSize;
  }

  get vnetHeaderSize(): number {
    return this.hdrSize;
  }

  get isClosed(): boolean {
    return this.closed;
  }

  read(buf: Uint8Array): number {
    const n = sys.read(this.fd, buf);
    return n < 0 ? 0 : n;
  }

  write(buf: Uint8Array, length: number = buf.byteLength): number {
    const n = sys.write(this.fd, buf, length);
    return n < 0 ? 0 : n;
  }

  readv(iov: Uint8Array, count: number): number {
    const n = sys.readv(this.fd, iov, count);
    return n < 0 ? 0 : n;
  }

  writev(iov: Uint8Array, count: number): number {
    const n = sys.writev(this.fd, iov, count);
    return n < 0 ? 0 : n;
  }

  /**
   * Write batches through `ring` from now on (made in the thread that uses it: the I/O
   * worker); close() does not close it. Without a ring, writeFrames makes a writev per frame.
   */
  useRing(ring: IoUring | undefined): void {
    this.ring = ring;
  }

  writeFrames(batch: FrameBatch, from: number): void {
    const ring = this.ring;
    if (ring === undefined) {
      this.writeFramesOneByOne(batch, from);
      return;
    }
    const iovAddress = hostAddressOf(batch.iov.bytes);
    while (from < batch.frames) {
      // Linked writes: frame k starts after k-1 is done, and a frame that would block
      // (RWF_NOWAIT: -EAGAIN) cancels the ones after it, which keeps them in order.
      const n = Math.min(batch.frames - from, ring.sqEntries);
      for (let k = from; k < from + n; k++) {
        const link = k < from + n - 1 ? IOSQE_IO_LINK : 0;
        ring.prepWritev(this.fd, iovAddress + IOVEC_BYTES * batch.start[k]!, batch.count[k]!, -1, k, RWF_NOWAIT, link);
      }
      ring.submitAndWait(n);
      let next = from + n;
      let blocked = false;
      let unsupported = false;
      const ready = ring.completionCount();
      for (let i = 0; i < ready; i++) {
        const k = ring.completionTag(i);
        const res = ring.completionResult(i);
        if (res >= 0) batch.result[k] = res;
        else if (res === -EOPNOTSUPP) {
          // This kernel's TAP cannot do RWF_NOWAIT: the frame and those linked after it
          // were not written; they go out by writev, and so does everything from now on.
          batch.result[k] = 0;
          unsupported = true;
          if (k < next) next = k;
        } else if (res === -EAGAIN) {
          batch.result[k] = 0;
          blocked = true;
        } else if (res === -ECANCELED) {
          batch.result[k] = 0;
          if (k < next) next = k; // to go again (after a refused frame) or stay blocked
        } else batch.result[k] = res;
      }
      ring.consumeCompletions(ready);
      if (unsupported) {
        this.ring = undefined;
        this.writeFramesOneByOne(batch, next);
        return;
      }
      if (blocked) {
        for (let k = from; k < batch.frames; k++) if (k >= next || batch.result[k] === 0) batch.result[k] = 0;
        return;
      }
      from = next;
    }
  }

  readFrames(batch: FrameBatch): void {
    const ring = this.ring;
    const iov = batch.iov.bytes;
    if (ring === undefined) {
      this.readFramesOneByOne(batch, 0);
      return;
    }
    // Independent RWF_NOWAIT reads, in order: each takes the next frame there is, or
    // completes with -EAGAIN when there is none (then so will the rest, bar a frame that
    // arrives meanwhile, which still lands after the ones before it).
    const iovAddress = hostAddressOf(iov);
    for (let from = 0; from < batch.frames; ) {
      const n = Math.min(batch.frames - from, ring.sqEntries);
      for (let k = from; k < from + n; k++) ring.prepReadv(this.fd, iovAddress + IOVEC_BYTES * batch.start[k]!, batch.count[k]!, -1, k, RWF_NOWAIT);
      ring.submitAndWait(n);
      const ready = ring.completionCount();
      let none = false;
      let unsupported = from + n;
      for (let i = 0; i < ready; i++) {
        const k = ring.completionTag(i);
        const res = ring.completionResult(i);
        if (res === -EAGAIN) {
          batch.result[k] = 0;
          none = true;
        } else if (res === -EOPNOTSUPP) {
          // No RWF_NOWAIT on this kernel's TAP (every read says so alike): readv from here on.
          batch.result[k] = 0;
          if (k < unsupported) unsupported = k;
        } else batch.result[k] = res;
      }
      ring.consumeCompletions(ready);
      if (unsupported < from + n) {
        this.ring = undefined;
        this.readFramesOneByOne(batch, unsupported);
        return;
      }
      from += n;
      if (none) {
        for (let k = from; k < batch.frames; k++) batch.result[k] = 0;
        return;
      }
    }
  }

  private readFramesOneByOne(batch: FrameBatch, from: number): void {
    const iov = batch.iov.bytes;
    for (let k = from; k < batch.frames; k++) {
      let n: number;
      try {
        n = sys.readv(this.fd, iov.subarray(IOVEC_BYTES * batch.start[k]!), batch.count[k]!);
      } catch (e) {
        batch.result[k] = -((e as sys.SysError).errno ?? 5);
        for (let j = k + 1; j < batch.frames; j++) batch.result[j] = 0;
        return;
      }
      batch.result[k] = n < 0 ? 0 : n;
      if (n < 0) {
        for (let j = k + 1; j < batch.frames; j++) batch.result[j] = 0;
        return;
      }
    }
  }

  private writeFramesOneByOne(batch: FrameBatch, from: number): void {
    const iov = batch.iov.bytes;
    for (let k = from; k < batch.frames; k++) {
      let n: number;
      try {
        n = sys.writev(this.fd, iov.subarray(IOVEC_BYTES * batch.start[k]!), batch.count[k]!);
      } catch (e) {
        batch.result[k] = -((e as sys.SysError).errno ?? 5);
        continue;
      }
      if (n < 0) {
        for (let j = k; j < batch.frames; j++) batch.result[j] = 0;
        return;
      }
      batch.result[k] = n;
    }
  }

  /** TUNSETOFFLOAD: what the kernel may hand us (TUN_F_*, the same bits as NetOffload); throws when refused. */
  setOffload(flags: number): void {
    sys.ioctlValue(this.fd, TunAbi.TUNSETOFFLOAD, flags >>> 0, "TUNSETOFFLOAD");
  }

  /** TUNSETVNETHDRSZ: 10 (virtio_net_hdr) or 12 (with num_buffers). */
  setVnetHeaderSize(bytes: number): void {
    if (bytes !== 10 && bytes !== 12) throw new RangeError(`TAP ${this.name}: vnet header size must be 10 or 12, not ${bytes}`);
    const b = new Uint8Array(4);
    new DataView(b.buffer).setInt32(0, bytes, true);
    sys.ioctl(this.fd, TunAbi.TUNSETVNETHDRSZ, b, "TUNSETVNETHDRSZ");
    this.hdrSize = bytes;
  }

  /** Close the fd: a TAP we created disappears now; one we attached to stays. Idempotent. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    sys.close(this.fd);
  }
}

/** Checks a name the way the kernel's dev_valid_name does; throws TapError. */
export function validateTapName(name: string): void {
  const bytes = Buffer.byteLength(name, "utf8");
  if (bytes === 0) throw new TapError("InvalidName", "TAP name is empty");
  if (bytes >= TunAbi.IFNAMSIZ) {
    throw new TapError(
      "NameTooLong",
      `TAP name "${name}" is ${bytes} bytes: an interface name has at most ${TunAbi.IFNAMSIZ - 1} (IFNAMSIZ ${TunAbi.IFNAMSIZ} includes the NUL)`,
    );
  }
  if (name === "." || name === ".." || /[/:\s\0]/.test(name)) {
    throw new TapError("InvalidName", `TAP name "${name}" is not a valid interface name (no "/", ":", spaces, "." or "..")`);
  }
}

/**
 * Open (creating if absent, attaching if it exists) the TAP `name` for virtio-net: IFF_TAP
 * | IFF_NO_PI | IFF_VNET_HDR, O_NONBLOCK, the given vnet header size, no offloads yet.
 * A name with "%d" lets the kernel pick (the result's `name` says what it picked).
 */
export function openTap(name: string, opts: OpenTapOptions = {}): Tap {
  validateTapName(name);
  const hdr = opts.vnetHeaderSize ?? 12;
  if (hdr !== 10 && hdr !== 12) throw new RangeError(`vnet header size must be 10 or 12, not ${String(hdr)}`);
  const device = opts.devicePath ?? TUN_DEVICE;
  let fd: number;
  try {
    fd = sys.open(device, sys.O_RDWR | sys.O_NONBLOCK);
  } catch (e) {
    throw openError(e, device, name);
  }
  try {
    const ifr = new Uint8Array(TunAbi.IFREQ_SIZE);
    ifr.set(Buffer.from(name, "utf8"), TunAbi.IFR_NAME);
    const dv = new DataView(ifr.buffer);
    dv.setUint16(TunAbi.IFR_FLAGS, TunAbi.IFF_TAP | TunAbi.IFF_NO_PI | TunAbi.IFF_VNET_HDR, true);
    try {
      sys.ioctl(fd, TunAbi.TUNSETIFF, ifr, "TUNSETIFF");
    } catch (e) {
      throw setIffError(e, name);
    }
    const actual = cString(ifr.subarray(TunAbi.IFR_NAME, TunAbi.IFR_NAME + TunAbi.IFNAMSIZ));
    // A TAP that outlives its fds is persistent; ours never is, so PERSIST means it existed.
    const got = new Uint8Array(TunAbi.IFREQ_SIZE);
    sys.ioctl(fd, TunAbi.TUNGETIFF, got, "TUNGETIFF");
    const flags = new DataView(got.buffer).getUint16(TunAbi.IFR_FLAGS, true);
    const created = (flags & TunAbi.IFF_PERSIST) === 0;
    const tap = new Tap(actual, fd, created, hdr);
    tap.setOffload(0);
    tap.setVnetHeaderSize(hdr);
    return tap;
  } catch (e) {
    sys.close(fd);
    if (e instanceof TapError) throw e;
    throw new TapError("Failed", `TAP "${name}": ${(e as Error).message}`, (e as sys.SysError).errno);
  }
}

const PERMISSION_HINT = "needs CAP_NET_ADMIN: run as root or give the binary the capability (setcap cap_net_admin+ep)";

function openError(e: unknown, device: string, name: string): TapError {
  if (!(e instanceof sys.SysError)) return new TapError("Failed", `TAP "${name}": ${(e as Error).message}`);
  const errno = e.errno;
  if (errno === sys.Errno.ENOENT || errno === sys.Errno.ENODEV || errno === sys.Errno.ENXIO) {
    return new TapError(
      "NoTunDevice",
      `TAP "${name}": ${device} is missing (${e.code}): load the tun module (modprobe tun) or create the node (mknod ${device} c 10 200)`,
      errno,
    );
  }
  if (errno === sys.Errno.EACCES || errno === sys.Errno.EPERM) {
    return new TapError("NoPermission", `TAP "${name}": opening ${device} ${PERMISSION_HINT}`, errno);
  }
  return new TapError("Failed", `TAP "${name}": ${e.message}`, errno);
}

function setIffError(e: unknown, name: string): TapError {
  if (!(e instanceof sys.SysError)) return new TapError("Failed", `TAP "${name}": ${(e as Error).message}`);
  const errno = e.errno;
  if (errno === sys.Errno.EPERM || errno === sys.Errno.EACCES) {
    return new TapError("NoPermission", `TAP "${name}": creating or attaching a TAP ${PERMISSION_HINT}`, errno);
  }
  if (errno === sys.Errno.EBUSY) {
    return new TapError(
      "Busy",
      `TAP "${name}" is busy: another process has it open (a single-queue TAP takes one fd), or it is multi-queue`,
      errno,
    );
  }
  if (errno === sys.Errno.EINVAL) {
    const info = describeInterface(name);
    if (info !== undefined) {
      if (info.kind !== "tun") {
        return new TapError(
          "NotTap",
          `interface "${name}" exists and is not a TAP (it is ${info.kind === "unknown" ? "not a TUN/TAP interface" : `a "${info.kind}" interface`}): pick another name or remove it (ip link del ${name})`,
          errno,
        );
      }
      if (info.type === "tun") {
        return new TapError("NotTap", `interface "${name}" is a TUN (layer 3) device, not a TAP: pick another name or remove it (ip link del ${name})`, errno);
      }
      if (info.multiQueue) {
        return new TapError("NotTap", `TAP "${name}" is multi-queue and tskvm opens a single queue: recreate it without multi_queue`, errno);
      }
    }
    return new TapError("Failed", `TAP "${name}": ${e.message}`, errno);
  }
  return new TapError("Failed", `TAP "${name}": ${e.message}`, errno);
}

interface InterfaceInfo {
  /** rtnetlink kind: "tun" for TUN/TAP, "dummy", "veth", ...; "unknown" without linkinfo. */
  kind: string;
  type?: string;
  multiQueue: boolean;
}

/**
 * What interface `name` is, from `ip -d -j link show` in the calling thread's network
 * namespace; undefined when it does not exist or `ip` is not available. Error path only.
 */
function describeInterface(name: string): InterfaceInfo | undefined {
  const r = spawnSync("ip", ["-d", "-j", "link", "show", "dev", name], { encoding: "utf8" });
  if (r.error !== undefined || r.status !== 0) return undefined;
  try {
    const links = JSON.parse(r.stdout) as { linkinfo?: { info_kind?: string; info_data?: { type?: string; multi_queue?: boolean } } }[];
    const l = links[0];
    if (l === undefined) return undefined;
    const kind = l.linkinfo?.info_kind ?? "unknown";
    const data = l.linkinfo?.info_data;
    return { kind, ...(data?.type !== undefined ? { type: data.type } : {}), multiQueue: data?.multi_queue === true };
  } catch {
    return undefined;
  }
}

function cString(b: Uint8Array): string {
  const end = b.indexOf(0);
  return Buffer.from(b.subarray(0, end < 0 ? b.length : end)).toString("utf8");
}

export interface HostSideOptions {
  /** Run `ip -n <netns>`: configure the TAP inside that named network namespace. */
  netns?: string;
}

/**
 * The host end of the link: give the TAP `cidr` (an IPv4 address with prefix length, e.g.
 * "192.168.100.1/24") and bring it up, with iproute2's `ip`. Replaces an address the TAP
 * already has of the same value; throws TapError("HostSetup") with ip's own message.
 */
export function configureHostSide(name: string, cidr: string, opts: HostSideOptions = {}): void {
  validateTapName(name);
  parseCidr(cidr);
  const ns = opts.netns !== undefined ? ["-n", opts.netns] : [];
  runIp([...ns, "addr", "replace", cidr, "dev", name], `give TAP "${name}" the address ${cidr}`);
  runIp([...ns, "link", "set", "dev", name, "up"], `bring TAP "${name}" up`);
}

/** "a.b.c.d/n" -> address octets and prefix; throws TapError("HostSetup") when malformed. */
export function parseCidr(cidr: string): { address: Uint8Array; prefix: number } {
  const m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})\/(\d{1,2})$/.exec(cidr);
  const octets = m === null ? [] : m.slice(1, 5).map(Number);
  const prefix = m === null ? NaN : Number(m[5]);
  if (m === null || octets.some((o) => o > 255) || prefix < 1 || prefix > 30) {
    throw new TapError("HostSetup", `host address "${cidr}" is not an IPv4 address with a prefix length from 1 to 30 (e.g. 192.168.100.1/24)`);
  }
  return { address: Uint8Array.from(octets), prefix };
}

function runIp(args: string[], what: string): void {
  const r = spawnSync("ip", args, { encoding: "utf8" });
  if (r.error !== undefined) {
    const code = (r.error as NodeJS.ErrnoException).code;
    const why = code === "ENOENT" ? "the `ip` command (iproute2) is not installed" : r.error.message;
    throw new TapError("HostSetup", `could not ${what}: ${why}`);
  }
  if (r.status !== 0) {
    const line = (r.stderr || r.stdout).trim().split("\n")[0] ?? "";
    throw new TapError("HostSetup", `could not ${what}: ip ${args.join(" ")}: ${line || `exit status ${r.status}`}`);
  }
}
