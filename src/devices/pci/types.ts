/**
 * The interfaces between the PCI root complex and the functions behind it.
 *
 * Threads: a PCI function is instantiated in every thread that handles exits (each vCPU
 * worker, the main thread) over shared state, like every other device (see
 * src/devices/shared-state.ts). Its configuration space therefore lives in a
 * SharedArrayBuffer, and BAR addresses the guest programs are seen by all threads.
 */

/** What a BAR decodes. */
export type BarKind = "io" | "mem32" | "mem64";

export interface BarInfo {
  readonly index: number;
  readonly kind: BarKind;
  /** Size in bytes, a power of two (I/O BARs >= 4, memory BARs >= 16; we use >= 4 KiB). */
  readonly size: number;
  /** The address the guest (or tskvm, as firmware would) programmed; 0 when unassigned. */
  readonly address: number;
  /**
   * The BAR decodes: the command register's I/O or memory decode bit for its kind is set,
   * and its address is a real one (not 0, not the all-ones pattern of BAR sizing).
   */
  readonly enabled: boolean;
}

/**
 * One PCI function. The root complex routes type-1 configuration cycles to `config*` and
 * port/MMIO accesses that fall inside an enabled BAR to `bar*`.
 */
export interface PciFunction {
  /** For messages: "virtio-blk", "host bridge", ... */
  readonly name: string;
  configRead(offset: number, data: Uint8Array): void;
  configWrite(offset: number, data: Uint8Array): void;
  /** The function's BARs as currently programmed (read from shared config space). */
  bars(): readonly BarInfo[];
  barRead(bar: number, offset: number, data: Uint8Array): void;
  barWrite(bar: number, offset: number, data: Uint8Array): void;
}

/** Where a function sits and how its INTx is wired (plain data, for the MP table). */
export interface PciSlot {
  readonly device: number; // 0..31 on bus 0, function 0
  /** INTA..INTD as 0..3; the function's interrupt pin register says pin + 1. */
  readonly intxPin: number;
  /** The IOAPIC input (GSI) this INTx is wired to. */
  readonly gsi: number;
}
