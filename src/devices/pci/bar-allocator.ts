/**
 * Address assignment for BARs, as firmware does before it boots an OS: each BAR gets a
 * naturally aligned address inside its window. A guest that keeps firmware assignments
 * (Linux does when they are valid) then finds every BAR programmed and decoding.
 */
export class PciBarAllocator {
  private next: number;

  /** Hand out addresses in [start, end). */
  constructor(
    readonly name: string,
    readonly start: number,
    readonly end: number,
  ) {
    this.next = start;
  }

  /** A naturally aligned range of `size` (a power of two) bytes. */
  allocate(size: number): number {
    const address = Math.ceil(this.next / size) * size;
    if (address + size > this.end) {
      throw new RangeError(
        `PCI ${this.name} window [0x${this.start.toString(16)}, 0x${this.end.toString(16)}) ` +
          `has no room for a BAR of 0x${size.toString(16)} bytes`,
      );
    }
    this.next = address + size;
    return address;
  }
}
