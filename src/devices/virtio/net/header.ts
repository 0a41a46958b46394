/**
 * The virtio-net frame header (virtio 1.2 section 5.1.6) and the limits on frames, shared
 * by the receive and transmit paths.
 */

/** struct virtio_net_hdr: field offsets and the two sizes. */
export const NetHdr = {
  FLAGS: 0, // u8
  GSO_TYPE: 1, // u8
  HDR_LEN: 2, // le16
  GSO_SIZE: 4, // le16
  CSUM_START: 6, // le16
  CSUM_OFFSET: 8, // le16
  NUM_BUFFERS: 10, // le16, in the 12-byte header only
  SIZE: 10,
  MRG_SIZE: 12,
} as const;

export const VIRTIO_NET_HDR_F_NEEDS_CSUM = 1;
export const VIRTIO_NET_HDR_F_DATA_VALID = 2;
export const VirtioNetGso = { NONE: 0, TCPV4: 1, UDP: 3, TCPV6: 4, ECN: 0x80 } as const;

/**
 * Largest frame either way, header included: a 64 KiB GSO packet plus its Ethernet and
 * VLAN headers and the 12-byte virtio-net header, rounded up.
 */
export const NET_MAX_FRAME = 68 * 1024;

/** Most buffers one frame is read into or written from in place (readv/writev); more: copied. */
export const NET_MAX_IOV = 64;

/** Counters, for tests and statistics. */
export interface NetStats {
  /** Frames (and their bytes, header included) delivered to the guest. */
  rxFrames: number;
  rxBytes: number;
  /** Frames dropped on receive: too big for any buffer the guest can post, or cut by a reset. */
  rxDropped: number;
  /** Times a frame read from the back end had to wait for the guest to post buffers. */
  rxWaits: number;
  /** Frames (and bytes, header included) written to the back end. */
  txFrames: number;
  txBytes: number;
  /** Frames the back end refused (an error other than EAGAIN) or that were too big: dropped. */
  txDropped: number;
  /** Writes that would have blocked (EAGAIN): kept and retried when writable. */
  txRetries: number;
}

/** A chain the guest laid out against the spec: breaks the device (DEVICE_NEEDS_RESET). */
export class NetChainError extends Error {}

/** What one activation fixed, for both paths. */
export interface NetLinkSettings {
  /** Header size in use: 12 with VERSION_1 or MRG_RXBUF, else 10. */
  readonly hdrSize: number;
  /** MRG_RXBUF: a frame may span several RX chains. */
  readonly mergeable: boolean;
  /** GUEST_CSUM: the guest takes partial checksums (else RX flags must be 0). */
  readonly guestCsum: boolean;
  /** Guest memory has host addresses and the back end reads into iovecs (readv): RX frames move in place. */
  readonly directRx: boolean;
  /** Guest memory has host addresses and the back end writes from iovecs (writev): TX frames move in place. */
  readonly directTx: boolean;
  /**
   * The guest takes GSO frames (GUEST_TSO4/6 negotiated with the back end): a received
   * frame may be up to NET_MAX_FRAME long, so it cannot be promised a single RX buffer.
   */
  readonly guestGso?: boolean;
}

/** What the paths need of the device around them. */
export interface NetLink {
  readonly stats: NetStats;
  /** The back end failed for good (backendGone was called): nothing more is read from or written to it. */
  readonly gone: boolean;
  /** Log a line about one frame (rate-limited). */
  note(line: string): void;
  /** The back end failed for good: stop polling and using it, and take the link down. */
  backendGone(why: string): void;
}
