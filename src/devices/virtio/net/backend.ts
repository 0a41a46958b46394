/**
 * What virtio-net needs of the network behind it: one frame per read or write, each
 * starting with a virtio-net header of the size the device sets (10 or 12 bytes). A TAP
 * with IFF_VNET_HDR speaks exactly this (src/host/tap.ts); a back end whose peer speaks
 * plain Ethernet frames (passt's length-prefixed stream) adds and strips the header, and
 * refuses offloads. In-memory fakes stand in for it in tests.
 */

/**
 * Offloads a back end may be asked to hand the guest (the GUEST_* features it accepted):
 * partial checksums, TCP segmentation for IPv4 and IPv6, with ECN. The values are the TUN
 * bits (TUN_F_*), so a TAP passes them through.
 */
export const NetOffload = { CSUM: 0x01, TSO4: 0x02, TSO6: 0x04, TSO_ECN: 0x08 } as const;
export const ALL_NET_OFFLOADS = NetOffload.CSUM | NetOffload.TSO4 | NetOffload.TSO6 | NetOffload.TSO_ECN;

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
