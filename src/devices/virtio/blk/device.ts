/**
 * virtio-blk (virtio 1.2 section 5.2): the device model. One request queue; each drain of
 * it pops every chain the driver made available, turns them into checked requests
 * (request.ts), hands those the back end must serve to it as one batch (backend.ts), and
 * returns the chains with their status bytes in the order they came. It makes no system
 * call: the bytes move in the back end, straight between the disk and guest memory.
 */
import { createHash } from "node:crypto";
import { resolve } from "node:path";
import { type VirtioActivation, type VirtioDevice, type VirtioDeviceDescription, VirtioDeviceType, feature } from "../types";
import { DescriptorChain, Virtqueue, type VirtqueueState } from "../queue";
import { failureReason, serveQueue } from "../serve";
import { BlockOp, BlockRequest, type BlockBackend } from "./backend";
import {
  BLK_DISCARD_SECTOR_ALIGNMENT,
  BLK_MAX_DISCARD_SECTORS,
  BLK_MAX_DISCARD_SEG,
  BlkRequestParser,
  SECTOR_SIZE,
  VIRTIO_BLK_ID_BYTES,
  VirtioBlkRequest,
  VirtioBlkStatus,
} from "./request";

/** Device feature bits (section 5.2.3). */
export const VirtioBlkFeature = {
  SIZE_MAX: 1,
  SEG_MAX: 2,
  GEOMETRY: 4,
  RO: 5,
  BLK_SIZE: 6,
  FLUSH: 9,
  TOPOLOGY: 10,
  CONFIG_WCE: 11,
  MQ: 12,
  DISCARD: 13,
  WRITE_ZEROES: 14,
} as const;

/** Offsets in struct virtio_blk_config (section 5.2.4). */
export const BlkConfig = {
  CAPACITY: 0, // le64, in 512-byte sectors
  SIZE_MAX: 8, // le32
  SEG_MAX: 12, // le32
  GEOMETRY_CYLINDERS: 16, // le16
  GEOMETRY_HEADS: 18, // u8
  GEOMETRY_SECTORS: 19, // u8
  BLK_SIZE: 20, // le32
  TOPOLOGY_PHYSICAL_BLOCK_EXP: 24, // u8
  TOPOLOGY_ALIGNMENT_OFFSET: 25, // u8
  TOPOLOGY_MIN_IO_SIZE: 26, // le16
  TOPOLOGY_OPT_IO_SIZE: 28, // le32
  WRITEBACK: 32, // u8
  NUM_QUEUES: 34, // le16
  MAX_DISCARD_SECTORS: 36, // le32
  MAX_DISCARD_SEG: 40, // le32
  DISCARD_SECTOR_ALIGNMENT: 44, // le32
  MAX_WRITE_ZEROES_SECTORS: 48, // le32
  MAX_WRITE_ZEROES_SEG: 52, // le32
  WRITE_ZEROES_MAY_UNMAP: 56, // u8, then 3 unused bytes
  SIZE: 60,
} as const;

export const BLK_QUEUE_SIZE = 256;
/** Data segments per request: the queue size less the header and status descriptors. */
export const BLK_SEG_MAX = BLK_QUEUE_SIZE - 2;

/** The disk as the guest sees it: all a virtio-blk description depends on. */
export interface BlkDisk {
  readonly sizeBytes: number;
  readonly readOnly: boolean;
}

/** The device's identity, features and configuration space for `disk` (no back end needed). */
export function blkDescription(disk: BlkDisk): VirtioDeviceDescription {
  if (disk.sizeBytes <= 0 || disk.sizeBytes % SECTOR_SIZE !== 0) {
    throw new RangeError(`virtio-blk: image size ${disk.sizeBytes} is not a positive multiple of ${SECTOR_SIZE}`);
  }
  let f = feature(VirtioBlkFeature.SEG_MAX) | feature(VirtioBlkFeature.BLK_SIZE) | feature(VirtioBlkFeature.FLUSH);
  if (disk.readOnly) f |= feature(VirtioBlkFeature.RO);
  else f |= feature(VirtioBlkFeature.DISCARD) | feature(VirtioBlkFeature.WRITE_ZEROES);

  const c = new Uint8Array(BlkConfig.SIZE);
  const v = new DataView(c.buffer);
  v.setBigUint64(BlkConfig.CAPACITY, BigInt(disk.sizeBytes / SECTOR_SIZE), true);
  v.setUint32(BlkConfig.SEG_MAX, BLK_SEG_MAX, true);
  v.setUint32(BlkConfig.BLK_SIZE, SECTOR_SIZE, true);
  v.setUint16(BlkConfig.NUM_QUEUES, 1, true);
  if (!disk.readOnly) {
    v.setUint32(BlkConfig.MAX_DISCARD_SECTORS, BLK_MAX_DISCARD_SECTORS, true);
    v.setUint32(BlkConfig.MAX_DISCARD_SEG, BLK_MAX_DISCARD_SEG, true);
    v.setUint32(BlkConfig.DISCARD_SECTOR_ALIGNMENT, BLK_DISCARD_SECTOR_ALIGNMENT, true);
    v.setUint32(BlkConfig.MAX_WRITE_ZEROES_SECTORS, BLK_MAX_DISCARD_SECTORS, true);
    v.setUint32(BlkConfig.MAX_WRITE_ZEROES_SEG, BLK_MAX_DISCARD_SEG, true);
    v.setUint8(BlkConfig.WRITE_ZEROES_MAY_UNMAP, 1);
  }
  return Object.freeze({ deviceType: VirtioDeviceType.BLOCK, queueCount: 1, maxQueueSize: BLK_QUEUE_SIZE, deviceFeatures: f, config: c });
}

export interface VirtioBlockOptions {
  /** GET_ID string, up to 20 ASCII bytes; default "tskvm-" + a hash of the back end's name. */
  serial?: string;
  /** Where to report what the guest did wrong or what failed on the host (one line each). */
  log?: (line: string) => void;
}

/** Counters, for tests and statistics. */
export interface BlockStats {
  requests: number;
  readBytes: number;
  writtenBytes: number;
  flushes: number;
  errors: number;
  unsupported: number;
}

/** The default serial: stable for a given image path, 20 characters. */
export function defaultSerial(path: string): string {
  const hash = createHash("sha256").update(resolve(path)).digest("hex");
  return `tskvm-${hash.slice(0, VIRTIO_BLK_ID_BYTES - 6)}`;
}

/** Per-request log lines before the device stops logging them (until a reset). */
const MAX_NOTES = 20;

/** A popped chain and what the device made of it. */
class Slot {
  readonly request = new BlockRequest();
  /** The status to answer; -1 while the back end has the request. */
  status = 0;
  /** For messages: the request's sector. */
  sector = 0;

  constructor(readonly chain: DescriptorChain) {}
}

export class VirtioBlock implements VirtioDevice {
  readonly deviceType: number;
  readonly queueCount: number;
  readonly maxQueueSize: number;
  readonly deviceFeatures: bigint;
  readonly config: Uint8Array;
  readonly serial: string;
  readonly capacitySectors: number;
  readonly stats: BlockStats = { requests: 0, readBytes: 0, writtenBytes: 0, flushes: 0, errors: 0, unsupported: 0 };

  private readonly log: (line: string) => void;
  private readonly idBytes = new Uint8Array(VIRTIO_BLK_ID_BYTES);
  private readonly parser: BlkRequestParser;
  /** Chains popped in this drain, in order, and the requests among them for the back end. */
  private slots: Slot[] = [];
  private readonly batch: BlockRequest[] = [];

  private ctx: VirtioActivation | undefined;
  private queue: Virtqueue | undefined;
  private broken = false;
  /** Writes were done since the last successful flush. */
  private dirty = false;
  private noted = 0;

  constructor(
    readonly backend: BlockBackend,
    options: VirtioBlockOptions = {},
  ) {
    const d = blkDescription(backend);
    this.deviceType = d.deviceType;
    this.queueCount = d.queueCount;
    this.maxQueueSize = d.maxQueueSize;
    this.deviceFeatures = d.deviceFeatures;
    this.config = d.config;
    this.log = options.log ?? (() => {});
    this.serial = options.serial ?? defaultSerial(backend.name);
    const id = Buffer.from(this.serial, "latin1");
    if (id.length > VIRTIO_BLK_ID_BYTES) throw new RangeError(`virtio-blk: serial "${this.serial}" is longer than 20 bytes`);
    this.idBytes.set(id); // NUL-padded
    this.capacitySectors = backend.sizeBytes / SECTOR_SIZE;
    this.parser = new BlkRequestParser({ capacitySectors: this.capacitySectors, readOnly: backend.readOnly, discard: false, writeZeroes: false });
  }

  activate(ctx: VirtioActivation): void {
    this.ctx = ctx;
    this.broken = false;
    const readOnly = this.backend.readOnly;
    this.parser.policy = {
      capacitySectors: this.capacitySectors,
      readOnly,
      discard: (ctx.features & feature(VirtioBlkFeature.DISCARD)) !== 0n && !readOnly,
      writeZeroes: (ctx.features & feature(VirtioBlkFeature.WRITE_ZEROES)) !== 0n && !readOnly,
    };
    const q = ctx.queues[0];
    if (q === undefined || !q.ready) return; // nothing to serve; kicks are ignored
    try {
      this.queue = Virtqueue.create(ctx.memory, q, ctx.features, ctx.queueStates?.[0]);
      if (this.slots[0]?.chain.memory !== ctx.memory) this.slots = [];
    } catch (e) {
      this.fail(e);
    }
  }

  queueNotified(index: number): void {
    const q = this.queue;
    const ctx = this.ctx;
    if (index !== 0 || q === undefined || ctx === undefined || this.broken) return;
    try {
      serveQueue(q, () => ctx.signalUsed(0), () => {
        while (this.drain(q, ctx)) {
          // a full batch: go on with the rest of the ring
        }
      });
    } catch (e) {
      // Completed requests got their interrupt; the device waits for a reset.
      this.fail(e);
    }
  }

  /** Requests complete within a drain: nothing is ever in flight between kicks. */
  quiesce(): void {}

  queueStates(): (VirtqueueState | undefined)[] {
    return [this.queue?.state()];
  }

  reset(): void {
    this.flush();
    this.queue = undefined;
    this.ctx = undefined;
    this.broken = false;
    this.noted = 0;
  }

  /** Make every completed write durable, if there were writes since the last flush. */
  flush(): void {
    if (!this.dirty) return;
    try {
      this.backend.flush();
      this.dirty = false;
      this.stats.flushes++;
    } catch (e) {
      this.log(`virtio-blk ${this.backend.name}: flush failed: ${(e as Error).message}`);
    }
  }

  /**
   * Pop up to a queue's worth of chains, have the back end serve their requests as one
   * batch, and return them all in pop order. True when the ring may hold more.
   */
  private drain(q: Virtqueue, ctx: VirtioActivation): boolean {
    let popped = 0;
    let batched = 0;
    let failure: unknown;
    try {
      while (popped < q.size) {
        const slot = this.slots[popped] ?? (this.slots[popped] = new Slot(new DescriptorChain(ctx.memory)));
        if (q.pop(slot.chain) === undefined) break;
        popped++;
        this.stats.requests++;
        if (!this.prepare(slot)) {
          // Not even a status byte to answer with: the device is broken after this batch.
          popped--;
          failure = new Error(`request (head ${slot.chain.head}) has no device-writable status byte`);
          break;
        }
        if (slot.status < 0) this.batch[batched++] = slot.request;
      }
    } catch (e) {
      failure = e;
    }
    if (batched > 0) this.backend.execute(this.batch, batched);
    for (let i = 0; i < popped; i++) this.complete(q, this.slots[i]!);
    if (failure !== undefined) throw failure;
    return popped === q.size;
  }

  /** Read a popped chain's request: its status now, or -1 and a request for the back end. */
  private prepare(slot: Slot): boolean {
    const chain = slot.chain;
    if (chain.writableBytes === 0) return false;
    chain.writer.limitTo(chain.writableBytes - 1);
    const parser = this.parser;
    if (!parser.readHeader(chain)) {
      this.note(`virtio-blk ${this.backend.name}: request (head ${chain.head}) header is shorter than 16 bytes`);
      slot.status = VirtioBlkStatus.IOERR;
      return true;
    }
    slot.sector = parser.sector;
    if (parser.type === VirtioBlkRequest.GET_ID) {
      chain.writer.write(this.idBytes);
      slot.status = VirtioBlkStatus.OK;
      return true;
    }
    slot.status = parser.prepare(chain, slot.request);
    return true;
  }

  /** Settle a slot's status (from the back end's outcome), write it and return the chain. */
  private complete(q: Virtqueue, slot: Slot): void {
    let status = slot.status;
    if (status < 0) status = this.outcome(slot);
    if (status === VirtioBlkStatus.IOERR) this.stats.errors++;
    else if (status === VirtioBlkStatus.UNSUPP) this.stats.unsupported++;
    const chain = slot.chain;
    chain.setLastWritableByte(status);
    // Used length: what was written into the chain. Only a success fills the data part
    // (a failed read may have stopped anywhere), so a failure counts the status byte.
    q.addUsed(chain.head, status === VirtioBlkStatus.OK ? chain.writer.consumed + 1 : 1);
  }

  private outcome(slot: Slot): number {
    const r = slot.request;
    const error = r.error;
    switch (r.op) {
      case BlockOp.READ:
        if (error !== undefined) return this.failed(`read at sector ${slot.sector} failed: ${error}`);
        this.stats.readBytes += r.length;
        return VirtioBlkStatus.OK;
      case BlockOp.WRITE:
        this.dirty = true;
        if (error !== undefined) return this.failed(`write at sector ${slot.sector} failed: ${error}`);
        this.stats.writtenBytes += r.length;
        return VirtioBlkStatus.OK;
      case BlockOp.FLUSH:
        if (error !== undefined) return this.failed(`flush failed: ${error}`);
        this.dirty = false;
        this.stats.flushes++;
        return VirtioBlkStatus.OK;
      default:
        this.dirty = true;
        if (error !== undefined) return this.failed(`${r.op === BlockOp.WRITE_ZEROES ? "write zeroes" : "discard"} failed: ${error}`);
        return VirtioBlkStatus.OK;
    }
  }

  private failed(what: string): number {
    this.note(`virtio-blk ${this.backend.name}: ${what}`);
    return VirtioBlkStatus.IOERR;
  }

  /** Log a per-request problem; a guest (or a failing disk) cannot flood the log. */
  private note(line: string): void {
    if (this.noted < MAX_NOTES) this.log(line);
    else if (this.noted === MAX_NOTES) this.log(`virtio-blk ${this.backend.name}: further request errors are not logged`);
    this.noted++;
  }

  private fail(e: unknown): void {
    this.broken = true;
    const reason = failureReason("virtio-blk", e);
    this.log(reason);
    this.ctx?.needsReset(reason);
  }
}
