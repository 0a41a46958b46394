/**
 * What virtio-blk needs of the disk behind it, and nothing more: the device model parses
 * and checks requests (header, ranges, alignment, what a read-only disk refuses) and hands
 * the back end whole batches of them; the back end moves the bytes. The file engine
 * (src/host/block-file-engine.ts) serves a batch with pread/pwrite(v) one request after
 * another; an io_uring engine can submit a batch in one system call and wait for it.
 */
import type { ChainCursor } from "../queue";

/** What a request asks the back end to do. */
export const BlockOp = {
  /** Read `length` bytes at `offset` into `data`. */
  READ: 0,
  /** Write `length` bytes at `offset` from `data`. */
  WRITE: 1,
  /** Make every completed write durable. */
  FLUSH: 2,
  /** Deallocate each range (reading zeroes afterwards is fine; doing nothing is not). */
  DISCARD: 3,
  /** Make each range read as zeroes; `rangeUnmap` allows deallocating it. */
  WRITE_ZEROES: 4,
} as const;
export type BlockOpCode = (typeof BlockOp)[keyof typeof BlockOp];

/** Most ranges in one DISCARD or WRITE_ZEROES request (the device's max_discard_seg). */
export const BLOCK_MAX_RANGES = 32;

/**
 * One request, checked by the device: offsets and lengths are in bytes, inside the disk,
 * sector-aligned. The device reuses these objects; a back end must not keep one past
 * execute().
 */
export class BlockRequest {
  op: BlockOpCode = BlockOp.READ;
  /** READ/WRITE: the disk range. */
  offset = 0;
  length = 0;
  /**
   * READ/WRITE: the guest buffers, a cursor over the data part of the request's chain
   * (`length` bytes from where it stands). The back end moves it as it transfers.
   */
  data: ChainCursor | undefined;
  /** DISCARD/WRITE_ZEROES: `rangeCount` disk ranges, and whether each may be unmapped. */
  rangeCount = 0;
  readonly rangeOffsets = new Float64Array(BLOCK_MAX_RANGES);
  readonly rangeLengths = new Float64Array(BLOCK_MAX_RANGES);
  readonly rangeUnmap = new Uint8Array(BLOCK_MAX_RANGES);
  /** Set by the back end: undefined when the request succeeded, else one line saying why not. */
  error: string | undefined;
}

export interface BlockBackend {
  /** The disk as messages name it (the image path). */
  readonly name: string;
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  /**
   * Carry out requests[0, count) in order. On return every one is done and its `error`
   * says how it went; a failing request does not stop the ones after it.
   */
  execute(requests: readonly BlockRequest[], count: number): void;
  /** Make completed writes durable now (a device reset, the VM stopping); throws on failure. */
  flush(): void;
}
