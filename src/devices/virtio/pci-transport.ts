/**
 * A transitional virtio-pci device (virtio 1.2, 4.1): the register side, run in every vCPU
 * thread over shared state. docs/pci.md describes the layout; transport-layout.ts has the
 * numbers.
 *
 * What it does: answers configuration cycles (IDs, BARs, the virtio capabilities, MSI-X
 * capability, PCI configuration access capability), the legacy I/O BAR, the MSI-X BAR and
 * the modern BAR (common configuration, ISR, device configuration, notifications), and
 * keeps every register in shared state under one lock, so several vCPUs may drive the same
 * device. The queue side runs elsewhere (the I/O worker) and reads the same state through
 * VirtioPciDeviceSide (pci-device-side.ts).
 *
 * What it does not do: touch KVM. Everything that needs the VM goes through the hooks the
 * machine supplies (VirtioTransportHooks), so the transport is tested with fakes.
 */
import type { BarInfo, PciFunction } from "../pci/types";
import {
  DEVICE_CFG_OFFSET,
  ISR_CFG_OFFSET,
  LEGACY_BAR,
  LEGACY_CONFIG_MSIX,
  LEGACY_CONFIG_NO_MSIX,
  MODERN_BAR,
  MSIX_BAR,
  NOTIFY_CFG_OFFSET,
  NOTIFY_OFF_MULTIPLIER,
  REGION_SIZE,
  CAP_BAR,
  CAP_LENGTH,
  CAP_OFFSET,
  CAP_PCI_CFG_DATA,
} from "./transport-layout";
import { readFields, writeFields, type Field } from "./transport-fields";
import {
  commonConfigFields,
  legacyFields,
  takeIsr,
  type RegisterContext,
  type TransportEffect,
} from "./transport-registers";
import { msixRead, msixWrite, releasePending } from "./transport-msix";
import {
  VirtioPciRegs,
  createVirtioPciState,
  type MsiMessage,
  type NotifyAddress,
  type VirtioPciOptions,
  type VirtioPciState,
} from "./transport-state";
import type { VirtioDeviceDescription } from "./types";

export { VirtioPciDeviceSide } from "./pci-device-side";
export type { DriverSnapshot } from "./pci-device-side";
export {
  TRANSPORT_FEATURES,
  createVirtioPciState,
  type InterruptDelivery,
  type MsiMessage,
  type NotifyAddress,
  type VirtioPciOptions,
  type VirtioPciState,
} from "./transport-state";

/**
 * What the machine does for the transport. Called in the vCPU thread that made the access.
 *
 * `kick`, `reset`, `driverOk`, `msixChanged` and `msixUnmasked` run after the transport
 * released its lock, so they may take their time (a reset may wait for the I/O worker to
 * quiesce the device before the guest's status write completes) and may read the
 * transport. `notifyAddressChanged` and `deviceConfigWrite` run under the lock, so that
 * concurrent changes reach the machine in the order they happened: they must not call
 * back into this transport or wait for a thread that might.
 */
export interface VirtioTransportHooks {
  /** The guest notified queue `queue` by a register write (no ioeventfd caught it). */
  kick(queue: number): void;
  /** The driver reset the device (status 0); the registers are already back to reset values. */
  reset(): void;
  /** The driver set DRIVER_OK: activate the device model (VirtioPciDeviceSide has the queues). */
  driverOk(): void;
  /**
   * The BARs holding notification addresses moved, or decoding was turned on or off:
   * `now` is every address notifications now arrive at (modern: one per queue in the
   * notify region; legacy: QUEUE_NOTIFY with datamatch = queue), `before` what it was at
   * the last call (empty at first). Move the ioeventfds from those to these.
   */
  notifyAddressChanged(now: readonly NotifyAddress[], before: readonly NotifyAddress[]): void;
  /** A vector held while masked can be sent now: inject `message` (KVM_SIGNAL_MSI). */
  msixUnmasked(vector: number, message: MsiMessage): void;
  /** The MSI-X table, its enable/mask bits or a virtio vector assignment changed. */
  msixChanged?(): void;
  /**
   * The driver wrote the device-specific configuration. Return true to keep the bytes
   * (they are then stored in shared state); absent or false: the write is ignored.
   */
  deviceConfigWrite?(offset: number, data: Uint8Array): boolean;
}

const TYPE_NAMES: Record<number, string> = { 1: "net", 2: "blk", 4: "rng", 26: "fs" };

export class VirtioPciTransport implements PciFunction {
  /** Build the shared state for a device (main thread, once); post it to every thread. */
  static createState(info: VirtioDeviceDescription, opts: VirtioPciOptions = {}): VirtioPciState {
    return createVirtioPciState(info, opts);
  }

  readonly name: string;
  readonly regs: VirtioPciRegs;
  private readonly common: Field[];
  private readonly legacyPlain: Field[];
  private readonly legacyMsix: Field[];
  private readonly ctx: RegisterContext;
  /** Effects queued under the lock by the access in progress (this object is per thread). */
  private effects: TransportEffect[] = [];

  constructor(
    state: VirtioPciState,
    private readonly hooks: VirtioTransportHooks,
    name?: string,
  ) {
    this.regs = new VirtioPciRegs(state);
    this.name = name ?? `virtio-${TYPE_NAMES[this.regs.deviceType] ?? this.regs.deviceType}`;
    this.ctx = { regs: this.regs, later: (e) => this.effects.push(e) };
    this.common = commonConfigFields(this.ctx);
    this.legacyPlain = legacyFields(this.ctx, false);
    this.legacyMsix = legacyFields(this.ctx, true);
  }

  // ---- PciFunction: configuration space ----

  configRead(offset: number, data: Uint8Array): void {
    if (this.touchesPciCfgData(offset, data.length)) this.pciCfgAccess(false);
    this.regs.pci.read(offset, data);
  }

  configWrite(offset: number, data: Uint8Array): void {
    const pci = this.regs.pci;
    pci.write(offset, data);
    if (this.touchesPciCfgData(offset, data.length)) this.pciCfgAccess(true);
    const notify = VirtioPciRegs.touchesNotifyBars(offset, data.length);
    const msix = offset < this.regs.msixCap + 4 && this.regs.msixCap + 2 < offset + data.length;
    if (!notify && !msix) return;
    this.locked(() => {
      if (notify) {
        const moved = this.regs.refreshNotifyLocked();
        if (moved !== undefined) this.hooks.notifyAddressChanged(moved.now, moved.before);
      }
      if (msix) {
        releasePending(this.ctx);
        this.ctx.later({ kind: "msixChanged" });
      }
    });
  }

  bars(): readonly BarInfo[] {
    return this.regs.pci.bars();
  }

  /** Where notifications arrive now, for a machine that registers ioeventfds at start. */
  notifyAddresses(): NotifyAddress[] {
    return this.regs.notifyAddresses();
  }

  // ---- PciFunction: BARs ----

  barRead(bar: number, offset: number, data: Uint8Array): void {
    if (!this.barAccess(bar, offset, data, false)) data.fill(0xff);
  }

  barWrite(bar: number, offset: number, data: Uint8Array): void {
    this.barAccess(bar, offset, data, true);
  }

  /** One access to one of our BARs, under the lock; false for a BAR we do not have. */
  private barAccess(bar: number, offset: number, data: Uint8Array, write: boolean): boolean {
    switch (bar) {
      case LEGACY_BAR:
        this.locked(() => this.legacyAccess(offset, data, write));
        return true;
      case MSIX_BAR:
        this.locked(() => (write ? msixWrite(this.ctx, offset, data) : msixRead(this.regs, offset, data)));
        return true;
      case MODERN_BAR:
        this.locked(() => (write ? this.modernWrite(offset, data) : this.modernRead(offset, data)));
        return true;
      default:
        return false;
    }
  }

  // ---- Register blocks (under the lock) ----

  private modernRead(offset: number, data: Uint8Array): void {
    const region = offset - (offset % REGION_SIZE);
    const rel = offset - region;
    switch (region) {
      case 0:
        readFields(this.common, rel, data);
        return;
      case ISR_CFG_OFFSET:
        data.fill(0);
        if (rel === 0) data[0] = takeIsr(this.regs);
        return;
      case DEVICE_CFG_OFFSET:
        this.deviceConfigRead(rel, data);
        return;
      default:
        data.fill(0); // notifications read 0
    }
  }

  private modernWrite(offset: number, data: Uint8Array): void {
    const region = offset - (offset % REGION_SIZE);
    const rel = offset - region;
    switch (region) {
      case 0:
        writeFields(this.common, rel, data);
        return;
      case DEVICE_CFG_OFFSET:
        this.deviceConfigWrite(rel, data);
        return;
      case NOTIFY_CFG_OFFSET: {
        // The ioeventfd normally takes these; a write that exits here is a kick all the same.
        const queue = rel / NOTIFY_OFF_MULTIPLIER;
        if (Number.isInteger(queue) && queue < this.regs.queueCount) this.ctx.later({ kind: "kick", queue });
        return;
      }
      default: // ISR is read-only
    }
  }

  private legacyAccess(offset: number, data: Uint8Array, write: boolean): void {
    // The device config moves by four bytes when MSI-X is on (VIRTIO_PCI_CONFIG_OFF).
    const withMsix = this.regs.msixEnabled();
    const configStart = withMsix ? LEGACY_CONFIG_MSIX : LEGACY_CONFIG_NO_MSIX;
    if (offset >= configStart) {
      if (write) this.deviceConfigWrite(offset - configStart, data);
      else this.deviceConfigRead(offset - configStart, data);
      return;
    }
    const fields = withMsix ? this.legacyMsix : this.legacyPlain;
    if (write) writeFields(fields, offset, data);
    else readFields(fields, offset, data);
  }

  private deviceConfigRead(offset: number, data: Uint8Array): void {
    const cfg = this.regs.deviceConfig;
    for (let i = 0; i < data.length; i++) data[i] = offset + i < cfg.length ? cfg[offset + i]! : 0;
  }

  private deviceConfigWrite(offset: number, data: Uint8Array): void {
    const cfg = this.regs.deviceConfig;
    if (offset + data.length > cfg.length) return;
    if (this.hooks.deviceConfigWrite?.(offset, data) === true) cfg.set(data, offset);
  }

  // ---- PCI configuration access capability (spec 4.1.4.9) ----

  private touchesPciCfgData(offset: number, length: number): boolean {
    const data = this.regs.pciCfgCap + CAP_PCI_CFG_DATA;
    return offset < data + 4 && data < offset + length;
  }

  /** Move `length` bytes between pci_cfg_data and the BAR window the capability names. */
  private pciCfgAccess(write: boolean): void {
    const pci = this.regs.pci;
    const cap = this.regs.pciCfgCap;
    const bar = pci.readValue(cap + CAP_BAR, 1);
    const offset = pci.readValue(cap + CAP_OFFSET, 4);
    const length = pci.readValue(cap + CAP_LENGTH, 4);
    if ((length !== 1 && length !== 2 && length !== 4) || offset % length !== 0) return;
    const window = new Uint8Array(length);
    if (write) {
      pci.read(cap + CAP_PCI_CFG_DATA, window);
      this.barWrite(bar, offset, window);
    } else {
      this.barRead(bar, offset, window);
      pci.write(cap + CAP_PCI_CFG_DATA, window);
    }
  }

  // ---- Locking and effects ----

  /** Run `fn` under the regs lock, then tell the machine what it asked for. */
  private locked(fn: () => void): void {
    this.regs.s.lock();
    try {
      fn();
    } catch (err) {
      this.effects = []; // a half-done access asks nothing of the machine
      throw err;
    } finally {
      this.regs.s.unlock();
    }
    const effects = this.effects;
    if (effects.length === 0) return;
    this.effects = [];
    for (const e of effects) this.run(e);
  }

  private run(e: TransportEffect): void {
    switch (e.kind) {
      case "kick":
        this.hooks.kick(e.queue);
        return;
      case "reset":
        this.hooks.reset();
        return;
      case "driverOk":
        this.hooks.driverOk();
        return;
      case "msixChanged":
        this.hooks.msixChanged?.();
        return;
      case "msixUnmasked":
        this.hooks.msixUnmasked(e.vector, e.message);
    }
  }
}
