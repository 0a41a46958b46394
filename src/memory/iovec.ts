/**
 * struct iovec arrays, the one encoder of them: what readv/writev/preadv/pwritev (and an
 * io_uring submission) take to move bytes straight between a file or socket and guest RAM.
 * Entries are {u64 base, u64 len} in host byte order; bases are host addresses, from
 * GuestMemory.regionHosts (guest RAM) or hostAddressOf (a host buffer).
 */
import { addressOf } from "../sys/libc";

export const IOVEC_BYTES = 16;

/** A fixed-capacity, reusable iovec array: fill with push, hand `bytes` and `count` to the call. */
export class IovecArray {
  /** The struct iovec entries, `count` of them in use. */
  readonly bytes: Uint8Array;
  count = 0;
  /** Sum of the lengths pushed. */
  totalBytes = 0;
  private readonly words: Uint32Array;

  constructor(readonly capacity: number) {
    this.bytes = new Uint8Array(IOVEC_BYTES * capacity);
    this.words = new Uint32Array(this.bytes.buffer);
  }

  clear(): void {
    this.count = 0;
    this.totalBytes = 0;
  }

  /** Keep only the first `count` entries. */
  truncate(count: number): void {
    for (let i = count; i < this.count; i++) this.totalBytes -= this.words[4 * i + 2]!;
    this.count = Math.min(count, this.count);
  }

  get full(): boolean {
    return this.count === this.capacity;
  }

  /** Append {address, length}; false (nothing appended) when the array is full. */
  push(address: number, length: number): boolean {
    if (this.count === this.capacity) return false;
    const w = 4 * this.count++;
    // Addresses are below 2^53: the low word by ToUint32, the high one by a division.
    this.words[w] = address >>> 0;
    this.words[w + 1] = (address / 0x1_0000_0000) >>> 0;
    this.words[w + 2] = length; // a descriptor's length fits 32 bits
    this.words[w + 3] = 0;
    this.totalBytes += length;
    return true;
  }
}

/**
 * The host address of a typed array's first byte, for an iovec that points at a host
 * buffer. V8 never moves an ArrayBuffer's backing store (see sys addressOf): keep `bytes`
 * alive while the address is in use.
 */
export function hostAddressOf(bytes: Uint8Array): number {
  return addressOf(bytes.buffer) + bytes.byteOffset;
}
