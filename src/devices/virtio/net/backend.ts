/**
 * What virtio-net needs of the network behind it: one frame per read or write, each
 * starting with a virtio-net header of the size the device sets (10 or 12 bytes). A TAP
 * with IFF_VNET_HDR speaks exactly this (src/host/tap.ts); a back end whose peer speaks
 * plain Ethernet frames (passt's length-prefixed stream) adds and strips the header, and
 * refuses offloads. In-memory fakes stand in for it in tests.
 */

import { IovecArray } from "../../../memory/iovec";

/**
 * Offloads a back end may be asked to hand the guest (the GUEST_* features it accepted):
 * partial checksums, TCP segmentation for IPv4 and IPv6, with ECN. The values are the TUN
 * bits (TUN_F_*), so a TAP passes them through.
 */
export const NetOffload = { CSUM: 0x01, TSO4: 0x02, TSO6: 0x04, TSO_ECN: 0x08 } as const;
export const ALL_NET_OFFLOADS = NetOffload.CSUM | NetOffload.TSO4 | NetOffload.TSO6 | NetOffload.TSO_ECN;

/**
 * A run of frames for one crossing to the back end (a TX drain): frame k is iovecs
 * [start[k], start[k] + count[k]) of `iov`; the back end reports each in result[k].
 */
export class FrameBatch {
  readonly iov: IovecArray;
  readonly start: Int32Array;
  readonly count: Int32Array;
  readonly result: Int32Array;
  /** Frames in the batch. */
  frames = 0;

  constructor(
    readonly maxFrames: number,
    maxIovecs: number,
  ) {
    this.iov = new IovecArray(maxIovecs);
    this.start = new Int32Array(maxFrames);
    this.count = new Int32Array(maxFrames);
    this.result = new Int32Array(maxFrames);
  }

  clear(): void {
    this.frames = 0;
    this.iov.clear();
  }

  /** Start the next frame (its iovecs are pushed to `iov` next); its index. */
  begin(): number {
    const k = this.frames++;
    this.start[k] = this.iov.count;
    this.count[k] = 0;
    return k;
  }

  /** The frame's iovecs are all pushed. */
  end(k: number): void {
    this.count[k] = this.iov.count - this.start[k]!;
  }

  /** Take frame `k` (and its iovecs) back out: it was the last one begun. */
  drop(k: number): void {
    this.iov.truncate(this.start[k]!);
    this.frames = k;
  }
}

export interface NetBackend {
  /** Polled by the I/O worker: readable when a frame is waiting, writable when a write would not block. */
  readonly fd: number;
  /** The interface or socket as messages name it (a TAP's interface name). */
  readonly name: string;
  /** Read one frame into buf; its length, or 0 when there is none. */
  read(buf: Uint8Array): number;
  /** Write buf[0, length) as one frame; length, or 0 when it would block. */
  write(buf: Uint8Array, length: number): number;
  /**
   * Optional scatter/gather forms, for guest memory that has host addresses: `iov` holds
   * `count` struct iovec {u64 base, u64 len}. readv: one frame spread over the buffers, its
   * whole length (0: none); writev: the buffers as one frame, its length (0: would block).
   */
  readv?(iov: Uint8Array, count: number): number;
  writev?(iov: Uint8Array, count: number): number;
  /**
   * Optional: write frames [from, batch.frames) in order, in as few crossings as the back
   * end can (a TAP on io_uring: one). result[k] is the length written; 0 when frame k would
   * block, and then it and every frame after it are not written (retry them in order when
   * the fd is writable); -errno when the back end refused frame k (it is dropped; the
   * frames after it still go).
   */
  writeFrames?(batch: FrameBatch, from: number): void;
  /**
   * Optional: read up to batch.frames frames, frame k into its iovecs, in as few crossings
   * as the back end can; frames land in k order as they arrived. result[k] is the frame's
   * whole length (more than its buffers hold when it did not fit: the rest is lost), 0 when
   * there was no frame for it, -errno when the back end failed.
   */
  readFrames?(batch: FrameBatch): void;
  /**
   * Optional: the I/O worker's poll found fd readable. A back end that learns from a short
   * read that nothing is left (a stream socket) skips reads until this says more came.
   */
  polledReadable?(): void;
  /** Hand the guest frames with these offloads (NetOffload bits); throws when refused. */
  setOffload(flags: number): void;
  /** Frames start with a header of this many bytes: 10 (virtio_net_hdr) or 12 (with num_buffers). */
  setVnetHeaderSize(bytes: number): void;
  /**
   * True when whoever owns the back end tells the user when it is lost (passt's process
   * watcher says how passt ended), so the device does not say it again.
   */
  readonly reportsOwnLoss?: boolean;
  /**
   * True for a stream socket whose peer may go away (passt): the device watches for that
   * (IoReady.PEER_CLOSED) even while it has no reason to read, so the link goes down at once.
   */
  readonly peerMayClose?: boolean;
  /**
   * True when every frame it hands over has complete, correct checksums (passt builds its
   * frames itself) though it takes no offloads: the device offers GUEST_CSUM alone, and
   * after setOffload(NetOffload.CSUM) the back end marks its frames DATA_VALID.
   */
  readonly validChecksums?: boolean;
}

/** Does the back end take every offload the device could offer? Leaves offloads off either way. */
export function probeOffloads(backend: NetBackend): boolean {
  let ok: boolean;
  try {
    backend.setOffload(ALL_NET_OFFLOADS);
    ok = true;
  } catch {
    ok = false;
  }
  try {
    backend.setOffload(0);
  } catch {
    // nothing to undo
  }
  return ok;
}
