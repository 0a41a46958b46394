/**
 * The PCI root complex: bus 0, configuration mechanism #1 (ports 0xCF8-0xCFF), the host
 * bridge at 00:00.0, the functions added in fixed slots, and the BAR routers that forward
 * port and MMIO accesses in the PCI windows to whichever BAR decodes them.
 *
 * Mechanism #1: a 32-bit write to 0xCF8 selects a configuration register
 *
 *   bit 31 enable | 30:24 reserved | 23:16 bus | 15:11 device | 10:8 function | 7:2 register
 *
 * and 0xCFC-0xCFF then read or write it, the port's low two bits adding to the register
 * offset. Bus 0 is the only bus; absent devices, functions other than 0, and every access
 * with the enable bit clear read all-ones (what a PC returns for a master abort). Only a
 * 32-bit access to 0xCF8 reaches the address register; narrower ones at 0xCF8-0xCFB belong
 * to other chipset registers on a real PC and are ignored here.
 *
 * Threads: the address register lives in shared state, because a guest may select the
 * register on one vCPU and, after migration of its thread, read the data port on another
 * (Linux serialises config cycles with a global lock, not per CPU). Each thread builds its
 * own root complex over the same state and adds the same functions in the same slots.
 */
import type { Bus } from "../bus";
import type { BusDevice } from "../device";
import { SharedState } from "../shared-state";
import { adoptState } from "../legacy/state-like";
import { PciBarAllocator } from "./bar-allocator";
import { PciBarRouter, type PciFunctionSource } from "./bar-router";
import {
  PCI_BAR0,
  PCI_COMMAND,
  PCI_COMMAND_IO,
  PCI_COMMAND_MEMORY,
  PCI_INTERRUPT_LINE,
  PCI_INTERRUPT_PIN,
} from "./config-space";
import { HostBridge } from "./host-bridge";
import type { BarInfo, PciFunction, PciSlot } from "./types";

/** Configuration mechanism #1: address at 0xCF8, data at 0xCFC-0xCFF. */
export const PCI_CONFIG_ADDRESS_PORT = 0xcf8;
export const PCI_CONFIG_PORT_COUNT = 8;
export const PCI_CONFIG_ENABLE = 0x8000_0000;

/**
 * The windows BARs are assigned in (guest-physical memory and ports); see
 * src/arch/x86/layout.ts for the rest of the 32-bit PCI hole. The memory window ends where
 * the IOAPIC starts; the I/O window is the top quarter of the port space, clear of every
 * legacy device.
 */
export const PCI_MMIO_WINDOW_START = 0xe000_0000;
export const PCI_MMIO_WINDOW_END = 0xfec0_0000;
export const PCI_IO_WINDOW_START = 0xc000;
export const PCI_IO_WINDOW_END = 0x10000;

/** Slot 0 is the host bridge; 31 devices follow. */
export const PCI_MAX_DEVICES = 32;

/** Plain data for postMessage: the address register and the host bridge's header. */
export interface PciRootState {
  readonly regs: SharedArrayBuffer;
  readonly hostBridge: SharedArrayBuffer;
}

const C_ADDRESS = 0;
const CELLS = 1;
/** Writable bits of the address register: enable, bus, device, function, register. */
const ADDRESS_MASK = 0x80ff_fffc;

interface Entry {
  readonly slot: PciSlot;
  readonly fn: PciFunction;
}

export class PciRootComplex implements BusDevice, PciFunctionSource {
  static createState(): PciRootState {
    return { regs: SharedState.create(CELLS).buffer, hostBridge: HostBridge.createState() };
  }

  readonly hostBridge: HostBridge;
  /** Route accesses in the I/O and memory windows; register them with `registerOn`. */
  readonly ioRouter: PciBarRouter;
  readonly mmioRouter: PciBarRouter;
  private readonly s: SharedState;
  private readonly slots: (Entry | undefined)[] = new Array<Entry | undefined>(PCI_MAX_DEVICES);
  private list: PciFunction[];

  constructor(state: PciRootState) {
    this.s = adoptState(state.regs, CELLS, 0, "PCI root complex");
    this.hostBridge = new HostBridge(state.hostBridge);
    this.slots[0] = { slot: { device: 0, intxPin: 0, gsi: 0 }, fn: this.hostBridge };
    this.list = [this.hostBridge];
    this.ioRouter = new PciBarRouter(this, "io", PCI_IO_WINDOW_START);
    this.mmioRouter = new PciBarRouter(this, "mem", PCI_MMIO_WINDOW_START);
  }

  /**
   * Put `fn` at 00:`slot.device`.0 (creation time, the same in every thread). The function's
   * interrupt pin register must agree with the slot's wiring, since the MP table is built
   * from the slot.
   */
  add(slot: PciSlot, fn: PciFunction): void {
    const d = slot.device;
    if (!Number.isInteger(d) || d < 1 || d >= PCI_MAX_DEVICES) {
      throw new RangeError(`PCI slot ${d} for ${fn.name}: slots are 1..31 (0 is the host bridge)`);
    }
    const taken = this.slots[d];
    if (taken !== undefined) throw new RangeError(`PCI slot ${d} for ${fn.name} is taken by ${taken.fn.name}`);
    const pin = readConfig(fn, PCI_INTERRUPT_PIN, 1);
    if (pin !== 0 && pin !== slot.intxPin + 1) {
      throw new RangeError(`PCI slot ${d}: ${fn.name} interrupts on pin ${pin - 1}, the slot wires pin ${slot.intxPin}`);
    }
    this.slots[d] = { slot, fn };
    this.list = this.slots.filter((e): e is Entry => e !== undefined).map((e) => e.fn);
  }

  functions(): readonly PciFunction[] {
    return this.list;
  }

  /** The function at 00:`device`.0, if any. */
  function(device: number): PciFunction | undefined {
    return this.slots[device]?.fn;
  }

  /** Claim 0xCF8-0xCFF and both windows on a thread's buses. */
  registerOn(pio: Bus, mmio: Bus): void {
    pio.register(PCI_CONFIG_ADDRESS_PORT, PCI_CONFIG_PORT_COUNT, this, "PCI config (0xcf8)");
    pio.register(PCI_IO_WINDOW_START, PCI_IO_WINDOW_END - PCI_IO_WINDOW_START, this.ioRouter, "PCI I/O window");
    mmio.register(PCI_MMIO_WINDOW_START, PCI_MMIO_WINDOW_END - PCI_MMIO_WINDOW_START, this.mmioRouter, "PCI MMIO window");
  }

  /**
   * Do what firmware does before the OS runs (once, in the thread that creates the
   * machine): give every BAR an address in its window, largest first so that natural
   * alignment wastes nothing, turn on the decode bits the function needs, and write the
   * interrupt line register with the GSI the slot's INTx is wired to.
   */
  assignResources(): void {
    const io = new PciBarAllocator("I/O", PCI_IO_WINDOW_START, PCI_IO_WINDOW_END);
    const mem = new PciBarAllocator("memory", PCI_MMIO_WINDOW_START, PCI_MMIO_WINDOW_END);
    const entries = this.slots.filter((e): e is Entry => e !== undefined && e.slot.device !== 0);
    const wanted: { fn: PciFunction; bar: BarInfo }[] = [];
    for (const e of entries) for (const bar of e.fn.bars()) wanted.push({ fn: e.fn, bar });
    // Stable sort: equal sizes keep slot and BAR order, so the layout is deterministic.
    wanted.sort((a, b) => b.bar.size - a.bar.size);
    for (const { fn, bar } of wanted) {
      const address = (bar.kind === "io" ? io : mem).allocate(bar.size);
      const reg = PCI_BAR0 + 4 * bar.index;
      writeConfig(fn, reg, 4, address % 0x1_0000_0000);
      if (bar.kind === "mem64") writeConfig(fn, reg + 4, 4, Math.floor(address / 0x1_0000_0000));
    }
    for (const e of entries) {
      const bars = e.fn.bars();
      let command = readConfig(e.fn, PCI_COMMAND, 2);
      if (bars.some((b) => b.kind === "io")) command |= PCI_COMMAND_IO;
      if (bars.some((b) => b.kind !== "io")) command |= PCI_COMMAND_MEMORY;
      writeConfig(e.fn, PCI_COMMAND, 2, command);
      if (readConfig(e.fn, PCI_INTERRUPT_PIN, 1) !== 0) writeConfig(e.fn, PCI_INTERRUPT_LINE, 1, e.slot.gsi);
    }
  }

  // ---- BusDevice: ports 0xCF8-0xCFF ----

  read(offset: number, data: Uint8Array): void {
    if (offset === 0 && data.length === 4) {
      writeLe(data, this.s.get(C_ADDRESS) >>> 0);
      return;
    }
    const target = offset >= 4 ? this.target(offset - 4) : undefined;
    if (target === undefined) {
      data.fill(0xff);
      return;
    }
    target.fn.configRead(target.register, data);
  }

  write(offset: number, data: Uint8Array): void {
    if (offset === 0 && data.length === 4) {
      this.s.set(C_ADDRESS, readLe(data) & ADDRESS_MASK);
      return;
    }
    const target = offset >= 4 ? this.target(offset - 4) : undefined;
    target?.fn.configWrite(target.register, data);
  }

  /** The function and register the address register selects, with `byte` (0..3) added. */
  private target(byte: number): { fn: PciFunction; register: number } | undefined {
    const address = this.s.get(C_ADDRESS) >>> 0;
    if ((address & PCI_CONFIG_ENABLE) === 0) return undefined;
    const bus = (address >>> 16) & 0xff;
    const device = (address >>> 11) & 0x1f;
    const fn = (address >>> 8) & 0x7;
    if (bus !== 0 || fn !== 0) return undefined;
    const entry = this.slots[device];
    return entry === undefined ? undefined : { fn: entry.fn, register: (address & 0xfc) + byte };
  }
}

function readLe(data: Uint8Array): number {
  let v = 0;
  for (let i = data.length - 1; i >= 0; i--) v = v * 256 + data[i]!;
  return v;
}

function writeLe(data: Uint8Array, value: number): void {
  for (let i = 0; i < data.length; i++) data[i] = (value >>> (8 * i)) & 0xff;
}

function readConfig(fn: PciFunction, offset: number, size: number): number {
  const d = new Uint8Array(size);
  fn.configRead(offset, d);
  return readLe(d);
}

function writeConfig(fn: PciFunction, offset: number, size: number, value: number): void {
  const d = new Uint8Array(size);
  writeLe(d, value);
  fn.configWrite(offset, d);
}
