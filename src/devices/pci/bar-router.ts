/**
 * The BusDevice that covers a PCI address window (memory or I/O) and hands each access to
 * the function whose BAR contains it.
 *
 * BARs move whenever the guest reprograms them, in any thread, so the router keeps no map:
 * every access reads the functions' BARs from shared configuration space (a few dozen
 * bytes under each function's lock). An access inside the window that no enabled BAR
 * claims reads all-ones and is dropped, as on a real bus (master abort).
 */
import type { BusDevice } from "../device";
import type { BarInfo, PciFunction } from "./types";

export interface PciFunctionSource {
  /** Every function behind the root complex, in slot order. */
  functions(): readonly PciFunction[];
}

export type PciSpace = "io" | "mem";

export interface BarHit {
  readonly fn: PciFunction;
  readonly bar: BarInfo;
}

export class PciBarRouter implements BusDevice {
  /** Accesses in the window that hit no BAR; a guest probing freed BARs makes some. */
  misses = 0;

  /** `base`: the address the router is registered at on its bus (offsets are relative to it). */
  constructor(
    private readonly source: PciFunctionSource,
    readonly space: PciSpace,
    readonly base: number,
  ) {}

  /** The enabled BAR of this space that contains `address`, if any (first function wins). */
  find(address: number): BarHit | undefined {
    for (const fn of this.source.functions()) {
      for (const bar of fn.bars()) {
        if (!bar.enabled || (bar.kind === "io") !== (this.space === "io")) continue;
        if (address >= bar.address && address < bar.address + bar.size) return { fn, bar };
      }
    }
    return undefined;
  }

  read(offset: number, data: Uint8Array): void {
    const address = this.base + offset;
    const hit = this.find(address);
    if (hit === undefined) {
      this.misses++;
      data.fill(0xff);
      return;
    }
    hit.fn.barRead(hit.bar.index, address - hit.bar.address, data);
  }

  write(offset: number, data: Uint8Array): void {
    const address = this.base + offset;
    const hit = this.find(address);
    if (hit === undefined) {
      this.misses++;
      return;
    }
    hit.fn.barWrite(hit.bar.index, address - hit.bar.address, data);
  }
}
