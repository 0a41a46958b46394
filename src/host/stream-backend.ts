/**
 * virtio-net's back end over a `-netdev stream` socket (passt): a NetBackend whose frames
 * are NetStream's plain Ethernet frames. The stream has no virtio-net header, so this adds
 * one on receive and leaves it out on transmit. It takes no offloads but one: passt builds
 * every frame it sends with complete checksums, so when the guest takes GUEST_CSUM
 * (setOffload(CSUM)) received frames say DATA_VALID and the guest skips checking them.
 * Frames from the guest must carry their checksums (CSUM is never offered). There is no readv: a received frame is already in NetStream's buffer, so the
 * device copies it; writev sends straight from guest memory.
 *
 * When the stream goes down (passt died), read() throws: the device then stops using the
 * back end and takes the guest's link down. Who started passt says how it ended
 * (reportsOwnLoss), so the device does not add a line of its own.
 */
import { NetOffload, type NetBackend } from "../devices/virtio/net/backend";
import { NetHdr, VIRTIO_NET_HDR_F_DATA_VALID } from "../devices/virtio/net/header";
import { NetStream, type NetStreamOptions } from "./net-stream";

export class StreamNetBackend implements NetBackend {
  readonly stream: NetStream;
  readonly reportsOwnLoss: boolean;
  readonly peerMayClose = true;
  readonly validChecksums = true;
  private hdrSize = 12;
  /** VIRTIO_NET_HDR_F_DATA_VALID on received frames, once the guest takes GUEST_CSUM. */
  private rxFlags = 0;

  constructor(
    /** The connected, non-blocking socket; closed by its owner, not here. */
    readonly fd: number,
    /** For messages: "passt". */
    readonly name: string,
    options: NetStreamOptions & { reportsOwnLoss?: boolean } = {},
  ) {
    this.stream = new NetStream(fd, options);
    this.reportsOwnLoss = options.reportsOwnLoss ?? false;
  }

  read(buf: Uint8Array): number {
    const s = this.stream;
    const f = s.peekFrame();
    if (f === undefined) {
      if (s.down !== undefined) throw new Error(s.down);
      return 0;
    }
    const n = this.hdrSize + f.length;
    if (n > buf.length) {
      // Not with the device's buffer (larger than any frame the stream takes).
      s.consumeFrame();
      throw new RangeError(`a ${f.length}-byte frame does not fit a ${buf.length}-byte buffer`);
    }
    buf.fill(0, 0, this.hdrSize);
    buf[NetHdr.FLAGS] = this.rxFlags;
    buf.set(f, this.hdrSize);
    s.consumeFrame();
    return n;
  }

  polledReadable(): void {
    this.stream.socketReadable();
  }

  write(buf: Uint8Array, length: number): number {
    this.checkFrame(length);
    return this.stream.sendFrame(buf.subarray(this.hdrSize, length)) ? length : 0;
  }

  writev(iov: Uint8Array, count: number): number {
    let length = 0;
    const v = new DataView(iov.buffer, iov.byteOffset, iov.byteLength);
    for (let i = 0; i < count; i++) length += v.getUint32(16 * i + 8, true) + v.getUint32(16 * i + 12, true) * 0x1_0000_0000;
    this.checkFrame(length);
    return this.stream.sendFrameIov(iov, count, this.hdrSize) ? length : 0;
  }

  setOffload(flags: number): void {
    if ((flags & ~NetOffload.CSUM) !== 0) throw new Error(`${this.name} takes no segmentation offloads (plain Ethernet frames)`);
    this.rxFlags = (flags & NetOffload.CSUM) !== 0 ? VIRTIO_NET_HDR_F_DATA_VALID : 0;
  }

  setVnetHeaderSize(bytes: number): void {
    if (bytes !== 10 && bytes !== 12) throw new RangeError(`vnet header size must be 10 or 12, not ${bytes}`);
    this.hdrSize = bytes;
  }

  /** A frame (header included) the stream can never carry: refused (the device drops and counts it). */
  private checkFrame(length: number): void {
    const frame = length - this.hdrSize;
    if (!this.stream.frameFits(frame)) {
      throw new Error(`a ${frame}-byte Ethernet frame: ${this.name} takes 1 to ${this.stream.maxFrame} bytes`);
    }
  }
}
