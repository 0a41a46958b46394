/**
 * The vhost-user protocol's messages (QEMU docs/interop/vhost-user.rst): a 12-byte header
 * (request, flags, payload size; little-endian) and the payloads tskvm sends or expects,
 * encoded and decoded here without any I/O. Every decoder checks the size it was given:
 * what the back end sends is not trusted.
 */

/** Front-end requests (the front end is tskvm; the back end virtiofsd). */
export const Request = {
  GET_FEATURES: 1,
  SET_FEATURES: 2,
  SET_OWNER: 3,
  RESET_OWNER: 4,
  SET_MEM_TABLE: 5,
  SET_LOG_BASE: 6,
  SET_LOG_FD: 7,
  SET_VRING_NUM: 8,
  SET_VRING_ADDR: 9,
  SET_VRING_BASE: 10,
  GET_VRING_BASE: 11,
  SET_VRING_KICK: 12,
  SET_VRING_CALL: 13,
  SET_VRING_ERR: 14,
  GET_PROTOCOL_FEATURES: 15,
  SET_PROTOCOL_FEATURES: 16,
  GET_QUEUE_NUM: 17,
  SET_VRING_ENABLE: 18,
  SET_BACKEND_REQ_FD: 21,
  GET_CONFIG: 24,
  SET_CONFIG: 25,
  GET_INFLIGHT_FD: 31,
  SET_INFLIGHT_FD: 32,
  RESET_DEVICE: 34,
  GET_MAX_MEM_SLOTS: 36,
  ADD_MEM_REG: 37,
  REM_MEM_REG: 38,
  SET_STATUS: 39,
  GET_STATUS: 40,
} as const;
export type RequestName = keyof typeof Request;

export function requestName(code: number): string {
  for (const [name, value] of Object.entries(Request)) if (value === code) return name;
  return `request ${code}`;
}

/** Header flags: protocol version 1 in bits 0-1, REPLY, NEED_REPLY. */
export const VERSION = 0x1;
export const VERSION_MASK = 0x3;
export const FLAG_REPLY = 0x4;
export const FLAG_NEED_REPLY = 0x8;

/** Protocol feature bits (GET/SET_PROTOCOL_FEATURES). */
export const ProtocolFeature = {
  MQ: 0,
  LOG_SHMFD: 1,
  RARP: 2,
  REPLY_ACK: 3,
  MTU: 4,
  BACKEND_REQ: 5,
  CROSS_ENDIAN: 6,
  CRYPTO_SESSION: 7,
  PAGEFAULT: 8,
  CONFIG: 9,
  BACKEND_SEND_FD: 10,
  HOST_NOTIFIER: 11,
  INFLIGHT_SHMFD: 12,
  RESET_DEVICE: 13,
  INBAND_NOTIFICATIONS: 14,
  CONFIGURE_MEM_SLOTS: 15,
  STATUS: 16,
} as const;

/** The virtio feature bit (in GET_FEATURES) that says the back end speaks protocol features. */
export const VHOST_USER_F_PROTOCOL_FEATURES = 30;
/** Not a virtio feature either: the vhost dirty-log feature, never offered to a guest. */
export const VHOST_F_LOG_ALL = 26;

export const bit = (n: number): bigint => 1n << BigInt(n);

/** Feature bits that belong to vhost(-user) itself and must never reach the guest. */
export const VHOST_ONLY_FEATURES = bit(VHOST_USER_F_PROTOCOL_FEATURES) | bit(VHOST_F_LOG_ALL);

export const HEADER_SIZE = 12;
/** Larger than any message tskvm sends or accepts (GET_CONFIG's 12 + 256 is the largest). */
export const MAX_PAYLOAD = 4096;
/** Regions one SET_MEM_TABLE carries (VHOST_MEMORY_BASELINE_NREGIONS). */
export const MAX_MEM_REGIONS = 8;
/** The "no file descriptor" bit in SET_VRING_KICK/CALL/ERR's u64. */
export const VRING_NOFD = 0x100;
export const VRING_INDEX_MASK = 0xff;

export type VhostUserErrorKind =
  /** The back end closed the connection (it exited, or refused us). */
  | "closed"
  /** No complete answer before the deadline. */
  | "timeout"
  /** The back end sent something the protocol does not allow. */
  | "protocol"
  /** The back end answered but refused the request (a non-zero REPLY_ACK status). */
  | "refused";

/** Anything that went wrong talking to a back end; the message is one line for the user. */
export class VhostUserError extends Error {
  constructor(readonly kind: VhostUserErrorKind, message: string) {
    super(message);
    this.name = "VhostUserError";
  }
}

const malformed = (what: string): VhostUserError => new VhostUserError("protocol", `malformed ${what}`);

export interface Header {
  request: number;
  flags: number;
  size: number;
}

export function encodeHeader(h: Header, into = new Uint8Array(HEADER_SIZE)): Uint8Array {
  const dv = new DataView(into.buffer, into.byteOffset, HEADER_SIZE);
  dv.setUint32(0, h.request >>> 0, true);
  dv.setUint32(4, h.flags >>> 0, true);
  dv.setUint32(8, h.size >>> 0, true);
  return into;
}

export function decodeHeader(bytes: Uint8Array): Header {
  if (bytes.byteLength < HEADER_SIZE) throw malformed(`header of ${bytes.byteLength} bytes`);
  const dv = new DataView(bytes.buffer, bytes.byteOffset, HEADER_SIZE);
  return { request: dv.getUint32(0, true), flags: dv.getUint32(4, true), size: dv.getUint32(8, true) };
}

/** A whole message: header followed by payload. */
export function encodeMessage(request: number, flags: number, payload: Uint8Array = new Uint8Array(0)): Uint8Array {
  if (payload.byteLength > MAX_PAYLOAD) throw new RangeError(`vhost-user payload of ${payload.byteLength} bytes`);
  const out = new Uint8Array(HEADER_SIZE + payload.byteLength);
  encodeHeader({ request, flags, size: payload.byteLength }, out);
  out.set(payload, HEADER_SIZE);
  return out;
}

// ---- payloads ----

export function encodeU64(value: bigint): Uint8Array {
  const out = new Uint8Array(8);
  new DataView(out.buffer).setBigUint64(0, BigInt.asUintN(64, value), true);
  return out;
}

export function decodeU64(payload: Uint8Array, what: string): bigint {
  expectSize(payload, 8, what);
  return new DataView(payload.buffer, payload.byteOffset, 8).getBigUint64(0, true);
}

/** struct vhost_vring_state { unsigned int index; unsigned int num; } */
export interface VringState {
  index: number;
  num: number;
}

export function encodeVringState(s: VringState): Uint8Array {
  const out = new Uint8Array(8);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, s.index >>> 0, true);
  dv.setUint32(4, s.num >>> 0, true);
  return out;
}

export function decodeVringState(payload: Uint8Array, what: string): VringState {
  expectSize(payload, 8, what);
  const dv = new DataView(payload.buffer, payload.byteOffset, 8);
  return { index: dv.getUint32(0, true), num: dv.getUint32(4, true) };
}

/**
 * struct vhost_vring_addr: the rings' addresses in the FRONT END's address space (the back
 * end translates them through the memory table's user addresses).
 */
export interface VringAddr {
  index: number;
  flags: number;
  desc: bigint;
  used: bigint;
  avail: bigint;
  log: bigint;
}

export const VRING_ADDR_SIZE = 40;

export function encodeVringAddr(a: VringAddr): Uint8Array {
  const out = new Uint8Array(VRING_ADDR_SIZE);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, a.index >>> 0, true);
  dv.setUint32(4, a.flags >>> 0, true);
  dv.setBigUint64(8, a.desc, true);
  dv.setBigUint64(16, a.used, true);
  dv.setBigUint64(24, a.avail, true);
  dv.setBigUint64(32, a.log, true);
  return out;
}

export function decodeVringAddr(payload: Uint8Array): VringAddr {
  expectSize(payload, VRING_ADDR_SIZE, "vring address");
  const dv = new DataView(payload.buffer, payload.byteOffset, VRING_ADDR_SIZE);
  return {
    index: dv.getUint32(0, true),
    flags: dv.getUint32(4, true),
    desc: dv.getBigUint64(8, true),
    used: dv.getBigUint64(16, true),
    avail: dv.getBigUint64(24, true),
    log: dv.getBigUint64(32, true),
  };
}

/** One guest RAM region as the back end must map it (from the fd sent with the message). */
export interface MemoryRegion {
  guestAddress: bigint;
  size: bigint;
  /** Where the front end has it mapped (the vring addresses are in this space). */
  userAddress: bigint;
  /** Offset of the region in its file. */
  mmapOffset: bigint;
}

const MEM_REGION_SIZE = 32;

/** struct VhostUserMemory { u32 nregions; u32 padding; regions[nregions] }. */
export function encodeMemTable(regions: readonly MemoryRegion[]): Uint8Array {
  if (regions.length === 0 || regions.length > MAX_MEM_REGIONS) {
    throw new RangeError(`a memory table has 1 to ${MAX_MEM_REGIONS} regions, not ${regions.length}`);
  }
  const out = new Uint8Array(8 + MEM_REGION_SIZE * regions.length);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, regions.length, true);
  regions.forEach((r, i) => {
    const o = 8 + i * MEM_REGION_SIZE;
    dv.setBigUint64(o, r.guestAddress, true);
    dv.setBigUint64(o + 8, r.size, true);
    dv.setBigUint64(o + 16, r.userAddress, true);
    dv.setBigUint64(o + 24, r.mmapOffset, true);
  });
  return out;
}

export function decodeMemTable(payload: Uint8Array): MemoryRegion[] {
  if (payload.byteLength < 8) throw malformed(`memory table of ${payload.byteLength} bytes`);
  const dv = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
  const n = dv.getUint32(0, true);
  if (n === 0 || n > MAX_MEM_REGIONS) throw malformed(`memory table with ${n} regions`);
  expectSize(payload, 8 + n * MEM_REGION_SIZE, "memory table");
  return Array.from({ length: n }, (_, i) => {
    const o = 8 + i * MEM_REGION_SIZE;
    return {
      guestAddress: dv.getBigUint64(o, true),
      size: dv.getBigUint64(o + 8, true),
      userAddress: dv.getBigUint64(o + 16, true),
      mmapOffset: dv.getBigUint64(o + 24, true),
    };
  });
}

function expectSize(payload: Uint8Array, size: number, what: string): void {
  if (payload.byteLength !== size) {
    throw malformed(`${what}: ${payload.byteLength} bytes (expected ${size})`);
  }
}
