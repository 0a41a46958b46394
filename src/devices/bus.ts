/**
 * An address space of device ranges: the port-I/O bus (16-bit ports) or the MMIO bus
 * (guest-physical addresses). A vCPU exit is dispatched here to the device that owns the
 * address; an address nobody claims is answered like an empty bus (reads all-ones, writes
 * dropped) and counted, never fatal.
 */
import type { BusDevice } from "./device";

export interface BusRange {
  readonly base: number;
  readonly length: number;
  readonly name: string;
  readonly device: BusDevice;
}

export class BusError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "BusError";
  }
}

export class Bus {
  private ranges: BusRange[] = [];
  /**
   * For a small address space (the 64 Ki I/O ports): range index + 1 for every address, so
   * a PIO exit finds its device in one load however many ranges are registered.
   */
  private readonly table: Uint16Array | undefined;
  /** Accesses that hit no device, by kind; a guest probing for hardware makes some. */
  unclaimedReads = 0;
  unclaimedWrites = 0;
  /** The last unclaimed address, to help a person see what the guest was looking for. */
  lastUnclaimed = -1;

  /** `directSize`: build a direct lookup table over [0, directSize) (use 0x10000 for ports). */
  constructor(readonly name: string, directSize = 0) {
    this.table = directSize > 0 ? new Uint16Array(directSize) : undefined;
  }

  register(base: number, length: number, device: BusDevice, name: string): void {
    if (!Number.isSafeInteger(base) || !Number.isSafeInteger(length) || base < 0 || length <= 0) {
      throw new BusError(`${this.name}: bad range for ${name}`);
    }
    const clash = this.ranges.find((r) => base < r.base + r.length && r.base < base + length);
    if (clash !== undefined) {
      throw new BusError(
        `${this.name}: ${name} at 0x${base.toString(16)} overlaps ${clash.name} at 0x${clash.base.toString(16)}`,
      );
    }
    if (this.table !== undefined && base + length > this.table.length) {
      throw new BusError(`${this.name}: ${name} at 0x${base.toString(16)} is outside the bus`);
    }
    this.ranges.push({ base, length, name, device });
    this.ranges.sort((a, b) => a.base - b.base);
    this.reindex();
  }

  private reindex(): void {
    if (this.table === undefined) return;
    this.table.fill(0);
    this.ranges.forEach((r, i) => this.table!.fill(i + 1, r.base, r.base + r.length));
  }

  /** Remove a range (e.g. a PCI BAR the guest moved). */
  unregister(base: number): void {
    this.ranges = this.ranges.filter((r) => r.base !== base);
    this.reindex();
  }

  list(): readonly BusRange[] {
    return this.ranges;
  }

  find(address: number): BusRange | undefined {
    if (this.table !== undefined) {
      const i = address < this.table.length ? this.table[address]! : 0;
      return i === 0 ? undefined : this.ranges[i - 1];
    }
    // Few MMIO ranges: a linear scan beats a tree here.
    const ranges = this.ranges;
    for (let i = 0; i < ranges.length; i++) {
      const r = ranges[i]!;
      if (address >= r.base && address < r.base + r.length) return r;
    }
    return undefined;
  }

  read(address: number, data: Uint8Array): boolean {
    const r = this.find(address);
    if (r === undefined) {
      data.fill(0xff);
      this.unclaimedReads++;
      this.lastUnclaimed = address;
      return false;
    }
    r.device.read(address - r.base, data);
    return true;
  }

  write(address: number, data: Uint8Array): boolean {
    const r = this.find(address);
    if (r === undefined) {
      this.unclaimedWrites++;
      this.lastUnclaimed = address;
      return false;
    }
    r.device.write(address - r.base, data);
    return true;
  }
}
