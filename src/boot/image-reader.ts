/**
 * Little-endian reads from a kernel image file held in memory. Every read is bounds-checked
 * and a read past the end is reported as a truncated image, never as a RangeError.
 */
import { KernelImageError, hex } from "./errors";

export class ImageReader {
  private readonly view: DataView;

  constructor(readonly bytes: Uint8Array) {
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }

  get length(): number {
    return this.bytes.byteLength;
  }

  /** True when [offset, offset+length) lies inside the file. */
  has(offset: number, length: number): boolean {
    return offset >= 0 && length >= 0 && offset <= this.length && length <= this.length - offset;
  }

  /** Throw "truncated" unless [offset, offset+length) lies inside the file. */
  need(offset: number, length: number, what: string): void {
    if (!this.has(offset, length)) {
      throw new KernelImageError(
        `is truncated: ${what} at file offset ${hex(offset)} needs ${length} bytes, the file has ${this.length}`,
      );
    }
  }

  u8(offset: number): number {
    this.need(offset, 1, "a header field");
    return this.view.getUint8(offset);
  }
  u16(offset: number): number {
    this.need(offset, 2, "a header field");
    return this.view.getUint16(offset, true);
  }
  u32(offset: number): number {
    this.need(offset, 4, "a header field");
    return this.view.getUint32(offset, true);
  }
  /** A 64-bit field, exactly. */
  u64n(offset: number): bigint {
    this.need(offset, 8, "a header field");
    return this.view.getBigUint64(offset, true);
  }

  /** A 64-bit field as a number; values beyond 2^53 cannot be guest addresses tskvm uses. */
  u64(offset: number, field: string): number {
    const v = this.u64n(offset);
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw new KernelImageError(`has an impossible ${field} (0x${v.toString(16)})`);
    }
    return Number(v);
  }

  /** A zero-copy window onto the file. */
  slice(offset: number, length: number, what: string): Uint8Array {
    this.need(offset, length, what);
    return this.bytes.subarray(offset, offset + length);
  }
}
