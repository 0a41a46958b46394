/**
 * virtio-blk requests (virtio 1.2 section 5.2.6) as they arrive in a descriptor chain:
 * header {le32 type, le32 reserved, le64 sector} in the device-readable part, then data
 * (readable for OUT/DISCARD/WRITE_ZEROES, writable for IN/GET_ID), then one status byte,
 * the last device-writable byte of the chain. This module turns a chain into a checked
 * BlockRequest for the back end, or into the status the device answers at once.
 */
import type { ChainCursor, DescriptorChain } from "../queue";
import { BLOCK_MAX_RANGES, BlockOp, type BlockOpCode, type BlockRequest } from "./backend";

/** Request types (section 5.2.6). */
export const VirtioBlkRequest = {
  IN: 0,
  OUT: 1,
  FLUSH: 4,
  GET_ID: 8,
  GET_LIFETIME: 10,
  DISCARD: 11,
  WRITE_ZEROES: 13,
  SECURE_ERASE: 14,
} as const;

export const VirtioBlkStatus = { OK: 0, IOERR: 1, UNSUPP: 2 } as const;

/** virtio-blk addresses the disk in 512-byte sectors whatever the back end's block size. */
export const SECTOR_SIZE = 512;

/** virtio_blk_discard_write_zeroes.flags */
export const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1;

/** GET_ID answers this many bytes: the serial, NUL-padded. */
export const VIRTIO_BLK_ID_BYTES = 20;
export const BLK_REQUEST_HEADER_BYTES = 16;
export const BLK_SEGMENT_BYTES = 16;

/** Largest DISCARD / WRITE_ZEROES segment: 4 GiB - 4 KiB worth of sectors. */
export const BLK_MAX_DISCARD_SECTORS = 0x7ffff8;
export const BLK_MAX_DISCARD_SEG = BLOCK_MAX_RANGES;
/** Discard granularity hint: 4 KiB (file systems punch whole blocks). */
export const BLK_DISCARD_SECTOR_ALIGNMENT = 8;

/** What the device lets through: decided at activation from the negotiated features. */
export interface RequestPolicy {
  readonly capacitySectors: number;
  readonly readOnly: boolean;
  readonly discard: boolean;
  readonly writeZeroes: boolean;
}

/**
 * Reads requests out of chains. One per device, with its scratch buffers, so that parsing
 * allocates nothing; `type` and `sector` are the last header read.
 */
export class BlkRequestParser {
  type = 0;
  sector = 0;
  policy: RequestPolicy;
  private readonly header = new Uint8Array(BLK_REQUEST_HEADER_BYTES);
  private readonly headerView = new DataView(this.header.buffer);
  private readonly segments = new Uint8Array(BLK_SEGMENT_BYTES * BLK_MAX_DISCARD_SEG);
  private readonly segmentView = new DataView(this.segments.buffer);

  constructor(policy: RequestPolicy) {
    this.policy = policy;
  }

  /** Read the chain's header into type and sector; false when it is shorter than 16 bytes. */
  readHeader(chain: DescriptorChain): boolean {
    const r = chain.reader;
    if (r.nextRun(BLK_REQUEST_HEADER_BYTES) === BLK_REQUEST_HEADER_BYTES) {
      // The usual case: the header in one descriptor, read in place.
      this.type = r.runU32(0);
      this.sector = r.runU32(12) * 0x100000000 + r.runU32(8);
      return true;
    }
    r.reset();
    if (r.readInto(this.header) < BLK_REQUEST_HEADER_BYTES) return false;
    const h = this.headerView;
    this.type = h.getUint32(0, true);
    this.sector = h.getUint32(12, true) * 0x100000000 + h.getUint32(8, true);
    return true;
  }

  /**
   * Fill `req` for the request whose header was just read, or return the status to answer
   * without the back end (-1: `req` is for the back end). A sector beyond 2^53 is
   * inexact, but beyond any capacity either way.
   */
  prepare(chain: DescriptorChain, req: BlockRequest): number {
    const policy = this.policy;
    const sector = this.sector;
    switch (this.type) {
      case VirtioBlkRequest.IN: {
        const w = chain.writer;
        if (w.remaining % SECTOR_SIZE !== 0 || !this.inRange(sector, w.remaining)) return VirtioBlkStatus.IOERR;
        return transfer(req, BlockOp.READ, w, sector);
      }
      case VirtioBlkRequest.OUT: {
        const r = chain.reader;
        if (policy.readOnly || r.remaining % SECTOR_SIZE !== 0 || !this.inRange(sector, r.remaining)) return VirtioBlkStatus.IOERR;
        return transfer(req, BlockOp.WRITE, r, sector);
      }
      case VirtioBlkRequest.FLUSH:
        req.op = BlockOp.FLUSH;
        return -1;
      case VirtioBlkRequest.DISCARD:
        // A read-only disk refuses anything that would change it with IOERR, like OUT.
        if (policy.readOnly) return VirtioBlkStatus.IOERR;
        return policy.discard ? this.ranges(chain, req, false) : VirtioBlkStatus.UNSUPP;
      case VirtioBlkRequest.WRITE_ZEROES:
        if (policy.readOnly) return VirtioBlkStatus.IOERR;
        return policy.writeZeroes ? this.ranges(chain, req, true) : VirtioBlkStatus.UNSUPP;
      default:
        return VirtioBlkStatus.UNSUPP;
    }
  }

  /** Whether [sector, sector + bytes/512) is inside the disk. */
  private inRange(sector: number, bytes: number): boolean {
    const capacity = this.policy.capacitySectors;
    return sector <= capacity && bytes / SECTOR_SIZE <= capacity - sector;
  }

  /**
   * DISCARD and WRITE_ZEROES: a list of {le64 sector, le32 num_sectors, le32 flags}. All
   * segments are checked before any is acted on, so a bad one changes nothing.
   */
  private ranges(chain: DescriptorChain, req: BlockRequest, zeroes: boolean): number {
    const r = chain.reader;
    const bytes = r.remaining;
    if (bytes === 0 || bytes % BLK_SEGMENT_BYTES !== 0 || bytes / BLK_SEGMENT_BYTES > BLK_MAX_DISCARD_SEG) {
      return VirtioBlkStatus.IOERR;
    }
    const count = bytes / BLK_SEGMENT_BYTES;
    r.readInto(this.segments.subarray(0, bytes));
    const v = this.segmentView;
    // Unknown flags, or UNMAP on a discard: UNSUPP (section 5.2.6.2).
    const allowed = zeroes ? VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP : 0;
    for (let i = 0; i < count; i++) {
      const o = i * BLK_SEGMENT_BYTES;
      const sector = v.getUint32(o + 4, true) * 0x100000000 + v.getUint32(o, true);
      const sectors = v.getUint32(o + 8, true);
      const flags = v.getUint32(o + 12, true);
      if ((flags & ~allowed) !== 0) return VirtioBlkStatus.UNSUPP;
      if (sectors > BLK_MAX_DISCARD_SECTORS || !this.inRange(sector, sectors * SECTOR_SIZE)) return VirtioBlkStatus.IOERR;
    }
    req.op = zeroes ? BlockOp.WRITE_ZEROES : BlockOp.DISCARD;
    req.rangeCount = count;
    for (let i = 0; i < count; i++) {
      const o = i * BLK_SEGMENT_BYTES;
      req.rangeOffsets[i] = (v.getUint32(o + 4, true) * 0x100000000 + v.getUint32(o, true)) * SECTOR_SIZE;
      req.rangeLengths[i] = v.getUint32(o + 8, true) * SECTOR_SIZE;
      req.rangeUnmap[i] = !zeroes || (v.getUint32(o + 12, true) & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) !== 0 ? 1 : 0;
    }
    return -1;
  }
}

function transfer(req: BlockRequest, op: BlockOpCode, data: ChainCursor, sector: number): number {
  req.op = op;
  req.offset = sector * SECTOR_SIZE;
  req.length = data.remaining;
  req.data = data;
  return -1;
}
