/**
 * The little of the FUSE wire format (include/uapi/linux/fuse.h) that tskvm itself reads or
 * writes: the request and reply headers. virtiofsd parses everything else; tskvm only
 * answers requests itself when virtiofsd is gone (with an error, see error-responder.ts).
 */

/** struct fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding. */
export const FUSE_IN_HEADER_SIZE = 40;
/** struct fuse_out_header: len, error (negative errno), unique. */
export const FUSE_OUT_HEADER_SIZE = 16;

export const FuseOpcode = {
  LOOKUP: 1,
  FORGET: 2,
  GETATTR: 3,
  SETATTR: 4,
  MKDIR: 9,
  UNLINK: 10,
  OPEN: 14,
  READ: 15,
  WRITE: 16,
  RELEASE: 18,
  FSYNC: 20,
  FLUSH: 25,
  INIT: 26,
  OPENDIR: 27,
  READDIR: 28,
  RELEASEDIR: 29,
  INTERRUPT: 36,
  CREATE: 35,
  DESTROY: 38,
  BATCH_FORGET: 42,
  READDIRPLUS: 44,
} as const;

/** Requests that never get a reply (the driver does not wait for one). */
export function expectsReply(opcode: number): boolean {
  return opcode !== FuseOpcode.FORGET && opcode !== FuseOpcode.BATCH_FORGET && opcode !== FuseOpcode.INTERRUPT;
}

export interface FuseInHeader {
  len: number;
  opcode: number;
  unique: bigint;
  nodeid: bigint;
}

export function decodeInHeader(bytes: Uint8Array): FuseInHeader {
  if (bytes.byteLength < FUSE_IN_HEADER_SIZE) throw new RangeError(`FUSE request header of ${bytes.byteLength} bytes`);
  const dv = new DataView(bytes.buffer, bytes.byteOffset, FUSE_IN_HEADER_SIZE);
  return {
    len: dv.getUint32(0, true),
    opcode: dv.getUint32(4, true),
    unique: dv.getBigUint64(8, true),
    nodeid: dv.getBigUint64(16, true),
  };
}

export function encodeInHeader(h: FuseInHeader & { uid?: number; gid?: number; pid?: number }, into = new Uint8Array(FUSE_IN_HEADER_SIZE)): Uint8Array {
  const dv = new DataView(into.buffer, into.byteOffset, FUSE_IN_HEADER_SIZE);
  dv.setUint32(0, h.len, true);
  dv.setUint32(4, h.opcode, true);
  dv.setBigUint64(8, h.unique, true);
  dv.setBigUint64(16, h.nodeid, true);
  dv.setUint32(24, h.uid ?? 0, true);
  dv.setUint32(28, h.gid ?? 0, true);
  dv.setUint32(32, h.pid ?? 0, true);
  dv.setUint32(36, 0, true);
  return into;
}

export interface FuseOutHeader {
  len: number;
  /** 0 or a negative errno. */
  error: number;
  unique: bigint;
}

export function encodeOutHeader(h: FuseOutHeader, into = new Uint8Array(FUSE_OUT_HEADER_SIZE)): Uint8Array {
  const dv = new DataView(into.buffer, into.byteOffset, FUSE_OUT_HEADER_SIZE);
  dv.setUint32(0, h.len, true);
  dv.setInt32(4, h.error, true);
  dv.setBigUint64(8, h.unique, true);
  return into;
}

export function decodeOutHeader(bytes: Uint8Array): FuseOutHeader {
  if (bytes.byteLength < FUSE_OUT_HEADER_SIZE) throw new RangeError(`FUSE reply header of ${bytes.byteLength} bytes`);
  const dv = new DataView(bytes.buffer, bytes.byteOffset, FUSE_OUT_HEADER_SIZE);
  return { len: dv.getUint32(0, true), error: dv.getInt32(4, true), unique: dv.getBigUint64(8, true) };
}
