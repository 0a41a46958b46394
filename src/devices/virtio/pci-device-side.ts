/**
 * A virtio-pci transport as the device side sees it (the thread serving the queues): what
 * the driver configured (status, features, queues) and the interrupt decisions for the
 * device's notifications. It is built over the same two SharedArrayBuffers as the
 * register side (VirtioPciTransport, vCPU threads) and takes the same lock; it never
 * calls KVM either: it tells the caller how to deliver (InterruptDelivery) and the caller
 * does it.
 */
import { VirtioIsr, VirtioStatus, type QueueConfig } from "./types";
import {
  Q_VECTOR,
  R_CONFIG_GENERATION,
  R_ISR,
  R_MSIX_CONFIG_VECTOR,
  R_RESET_GENERATION,
  R_STATUS,
  VirtioPciRegs,
  type InterruptDelivery,
  type MsiMessage,
  type VirtioPciState,
} from "./transport-state";

const NONE: InterruptDelivery = Object.freeze({ kind: "none" });

/** A consistent picture of the driver's setup, taken under one lock. */
export interface DriverSnapshot {
  readonly resetGeneration: number;
  readonly status: number;
  readonly features: bigint;
  readonly queues: readonly QueueConfig[];
}

export class VirtioPciDeviceSide {
  readonly regs: VirtioPciRegs;

  constructor(state: VirtioPciState) {
    this.regs = new VirtioPciRegs(state);
  }

  get deviceType(): number {
    return this.regs.deviceType;
  }

  get queueCount(): number {
    return this.regs.queueCount;
  }

  status(): number {
    return this.regs.get(R_STATUS);
  }

  driverOk(): boolean {
    return (this.status() & VirtioStatus.DRIVER_OK) !== 0;
  }

  /** The features the driver accepted (meaningful from FEATURES_OK, or DRIVER_OK for legacy). */
  negotiatedFeatures(): bigint {
    return this.regs.s.locked(() => this.regs.driverFeatures());
  }

  /**
   * Every queue as configured. Legacy queues appear with the addresses their PFN implies;
   * a queue the driver did not enable has `ready: false`.
   */
  queueConfigs(): QueueConfig[] {
    return this.regs.s.locked(() => this.queuesLocked());
  }

  /** Bumped by every device reset; a device model activated under an older one is stale. */
  resetGeneration(): number {
    return this.regs.get(R_RESET_GENERATION);
  }

  snapshot(): DriverSnapshot {
    return this.regs.s.locked(() => ({
      resetGeneration: this.regs.get(R_RESET_GENERATION),
      status: this.regs.get(R_STATUS),
      features: this.regs.driverFeatures(),
      queues: this.queuesLocked(),
    }));
  }

  /**
   * Queue `queue` has used buffers: how to interrupt the driver. Nothing is raised unless the
   * driver is running (DRIVER_OK), and, when `generation` is given, only if no reset came
   * since: a device finishing requests after a reset must not interrupt the new driver.
   */
  signalUsed(queue: number, generation?: number): InterruptDelivery {
    if (!Number.isInteger(queue) || queue < 0 || queue >= this.regs.queueCount) return NONE;
    return this.regs.s.locked(() => {
      if (!this.runningLocked(generation)) return NONE;
      return this.regs.signalLocked(VirtioIsr.QUEUE, this.regs.q(queue, Q_VECTOR));
    });
  }

  /**
   * The MSI message queue `queue`'s vector stands for, when an interrupt for it would be
   * sent as that message right now (MSI-X on, nothing masked, a vector assigned). A back
   * end in another process can then raise it itself (irqfd on a GSI routed to the
   * message); otherwise its notifications must come through signalUsed().
   */
  queueDirectMessage(queue: number): MsiMessage | undefined {
    if (!Number.isInteger(queue) || queue < 0 || queue >= this.regs.queueCount) return undefined;
    return this.regs.s.locked(() => this.regs.deliverableMessageLocked(this.regs.q(queue, Q_VECTOR)));
  }

  /** The device configuration changed (after updateDeviceConfig, say): interrupt the driver. */
  signalConfigChange(generation?: number): InterruptDelivery {
    return this.regs.s.locked(() => {
      if (!this.runningLocked(generation)) return NONE;
      return this.regs.signalLocked(VirtioIsr.CONFIG, this.regs.get(R_MSIX_CONFIG_VECTOR));
    });
  }

  /**
   * The device found the driver's data broken: set DEVICE_NEEDS_RESET and, if the driver
   * is running, send it a configuration change interrupt (spec 2.1.2).
   */
  setNeedsReset(): InterruptDelivery {
    return this.regs.s.locked(() => {
      const status = this.regs.get(R_STATUS);
      this.regs.set(R_STATUS, status | VirtioStatus.DEVICE_NEEDS_RESET);
      if ((status & VirtioStatus.DRIVER_OK) === 0) return NONE;
      return this.regs.signalLocked(VirtioIsr.CONFIG, this.regs.get(R_MSIX_CONFIG_VECTOR));
    });
  }

  /** ISR has a bit set: the INTx line should still be asserted (checked on resample). */
  isrPending(): boolean {
    return this.regs.get(R_ISR) !== 0;
  }

  msixEnabled(): boolean {
    return this.regs.msixEnabled();
  }

  /** Change device-specific configuration bytes; config_generation moves so drivers re-read. */
  updateDeviceConfig(offset: number, bytes: Uint8Array): void {
    const cfg = this.regs.deviceConfig;
    if (offset < 0 || offset + bytes.length > cfg.length) {
      throw new RangeError(`device config update [${offset}, +${bytes.length}) outside ${cfg.length} bytes`);
    }
    this.regs.s.locked(() => {
      cfg.set(bytes, offset);
      this.regs.set(R_CONFIG_GENERATION, (this.regs.get(R_CONFIG_GENERATION) + 1) | 0);
    });
  }

  readDeviceConfig(offset = 0, length = this.regs.configLength - offset): Uint8Array {
    return this.regs.s.locked(() => this.regs.deviceConfig.slice(offset, offset + length));
  }

  private runningLocked(generation: number | undefined): boolean {
    if (generation !== undefined && generation !== this.regs.get(R_RESET_GENERATION)) return false;
    return (this.regs.get(R_STATUS) & VirtioStatus.DRIVER_OK) !== 0;
  }

  private queuesLocked(): QueueConfig[] {
    const out: QueueConfig[] = [];
    for (let q = 0; q < this.regs.queueCount; q++) out.push(this.regs.queueConfig(q));
    return out;
  }
}
