/**
 * The shared state of one virtio-pci function and the rules that both sides apply to it.
 *
 * A function has two SharedArrayBuffers (plain data, postable to any thread):
 * - `config`: its PCI configuration header (PciConfigSpace), capabilities included;
 * - `regs`: the virtio registers in 32-bit cells, queue by queue, the MSI-X table and PBA,
 *   and after the cells the device-specific configuration bytes.
 * The device's constants (type, queue count, features, config length) are cells too, so
 * a thread needs nothing but the two buffers to rebuild the function.
 *
 * Locking: `regs` has the lock that covers every virtio register. The configuration header
 * has its own lock; code holding the regs lock may take the header's (to read the MSI-X
 * enable bit, say), never the other way round.
 */
import { SharedState } from "../shared-state";
import { adoptState } from "../legacy/state-like";
import {
  PCI_CAP_ID_MSIX,
  PCI_CAP_ID_VNDR,
  PCI_COMMAND,
  PCI_COMMAND_INTX_DISABLE,
  PciConfigSpace,
} from "../pci/config-space";
import {
  VIRTIO_MSI_NO_VECTOR,
  VirtioFeatureBit,
  VirtioStatus,
  feature,
  type QueueConfig,
  type VirtioDeviceDescription,
} from "./types";
import {
  COMMON_CFG_LENGTH,
  COMMON_CFG_OFFSET,
  DEVICE_CFG_OFFSET,
  ISR_CFG_OFFSET,
  LEGACY_BAR,
  LEGACY_QUEUE_NOTIFY,
  MAX_QUEUES,
  MODERN_BAR,
  MODERN_BAR_SIZE,
  MSIX_BAR,
  MSIX_BAR_SIZE,
  MSIX_CONTROL_ENABLE,
  MSIX_CONTROL_FUNCTION_MASK,
  MSIX_ENTRY_MASKED,
  MSIX_PBA_OFFSET,
  MSIX_TABLE_OFFSET,
  NOTIFY_CFG_OFFSET,
  NOTIFY_OFF_MULTIPLIER,
  REGION_SIZE,
  VIRTIO_PCI_CAP_COMMON_CFG,
  VIRTIO_PCI_CAP_DEVICE_CFG,
  VIRTIO_PCI_CAP_ISR_CFG,
  VIRTIO_PCI_CAP_NOTIFY_CFG,
  VIRTIO_PCI_CAP_PCI_CFG,
  VIRTIO_PCI_MODERN_DEVICE_BASE,
  VIRTIO_PCI_TRANSITIONAL_DEVICE_BASE,
  VIRTIO_PCI_VENDOR_ID,
  legacyBarSize,
  virtioClassCode,
} from "./transport-layout";

/** Plain data for postMessage. */
export interface VirtioPciState {
  readonly regs: SharedArrayBuffer;
  readonly config: SharedArrayBuffer;
}

export interface VirtioPciOptions {
  /** INTA..INTD as 0..3 (PciSlot.intxPin); default INTA. */
  readonly intxPin?: number;
}

/** How the caller should raise an interrupt the transport decided on. */
export type InterruptDelivery =
  | { readonly kind: "msix"; readonly vector: number; readonly address: number; readonly data: number }
  | { readonly kind: "intx" }
  | { readonly kind: "none" };

export interface MsiMessage {
  readonly address: number;
  readonly data: number;
}

/** One place a queue notification can arrive: what KVM_IOEVENTFD needs. */
export interface NotifyAddress {
  readonly index: number;
  /** Guest-physical address (MMIO) or port (PIO). */
  readonly address: number;
  readonly pio: boolean;
  /** Access width drivers use: 2 (Linux writes the queue index with a 16-bit store). */
  readonly length: number;
  /** Legacy: every queue shares QUEUE_NOTIFY, told apart by the value written. */
  readonly datamatch?: number;
}

/** The transport features every device offers on top of its own. */
export const TRANSPORT_FEATURES =
  feature(VirtioFeatureBit.VERSION_1) |
  feature(VirtioFeatureBit.RING_EVENT_IDX) |
  feature(VirtioFeatureBit.RING_INDIRECT_DESC);

const NONE: InterruptDelivery = Object.freeze({ kind: "none" });
const INTX: InterruptDelivery = Object.freeze({ kind: "intx" });
const TWO_32 = 0x1_0000_0000;

// ---- Cells ----
// Constants, written at creation.
const K_TYPE = 0;
const K_QUEUES = 1;
const K_MAX_QUEUE_SIZE = 2;
const K_FEATURES_LO = 3;
const K_FEATURES_HI = 4;
const K_CONFIG_LENGTH = 5;
const K_MSIX_CAP = 6;
const K_PCI_CFG_CAP = 7;
// Device registers.
export const R_STATUS = 8;
export const R_DEVICE_FEATURE_SELECT = 9;
export const R_DRIVER_FEATURE_SELECT = 10;
export const R_DRIVER_FEATURES_LO = 11;
export const R_DRIVER_FEATURES_HI = 12;
export const R_MSIX_CONFIG_VECTOR = 13;
export const R_CONFIG_GENERATION = 14;
export const R_QUEUE_SELECT = 15;
export const R_ISR = 16;
export const R_RESET_GENERATION = 17;
// The notify addresses last reported to the machine (see refreshNotifyLocked).
const R_NOTIFY_MODERN_VALID = 18;
const R_NOTIFY_MODERN_LO = 19;
const R_NOTIFY_MODERN_HI = 20;
const R_NOTIFY_LEGACY_PORT = 21; // -1: none
/** 1 when the driver wrote a feature bit the device does not offer since the last reset. */
const R_UNOFFERED_FEATURES = 22;
const HEADER_CELLS = 24;
// Per queue, Q_CELLS cells from queueBase(q).
export const Q_SIZE = 0;
export const Q_ENABLE = 1;
export const Q_DESC_LO = 2;
export const Q_DESC_HI = 3;
export const Q_DRIVER_LO = 4;
export const Q_DRIVER_HI = 5;
export const Q_DEVICE_LO = 6;
export const Q_DEVICE_HI = 7;
export const Q_VECTOR = 8;
/** Legacy: the page frame number last written (the addresses are derived from it). */
export const Q_PFN = 9;
const Q_CELLS = 10;
// MSI-X table entry dwords.
export const MSIX_ADDR_LO = 0;
export const MSIX_ADDR_HI = 1;
export const MSIX_DATA = 2;
export const MSIX_VECTOR_CONTROL = 3;

interface Layout {
  queueBase: number;
  tableBase: number;
  pbaBase: number;
  cells: number;
  extraBytes: number;
}

function layout(queueCount: number, configLength: number): Layout {
  const tableSize = queueCount + 1;
  const tableBase = HEADER_CELLS + queueCount * Q_CELLS;
  const pbaBase = tableBase + 4 * tableSize;
  const cells = pbaBase + Math.ceil(tableSize / 32);
  return { queueBase: HEADER_CELLS, tableBase, pbaBase, cells, extraBytes: (configLength + 3) & ~3 };
}

/**
 * Build a function's state: its configuration header (IDs, BARs, capabilities) and its
 * registers as after a reset. Run once, in the thread that creates the machine.
 */
export function createVirtioPciState(info: VirtioDeviceDescription, opts: VirtioPciOptions = {}): VirtioPciState {
  const { deviceType, queueCount, maxQueueSize } = info;
  const modernOnly = info.modernOnly === true;
  if (!Number.isInteger(deviceType) || deviceType < 1 || deviceType > 0x3f) {
    throw new RangeError(`virtio-pci: device type ${deviceType} has no ${modernOnly ? "" : "transitional "}device ID`);
  }
  if (!Number.isInteger(queueCount) || queueCount < 1 || queueCount > MAX_QUEUES) {
    throw new RangeError(`virtio-pci: ${queueCount} queues (1..${MAX_QUEUES} supported)`);
  }
  if (!Number.isInteger(maxQueueSize) || maxQueueSize < 1 || maxQueueSize > 32768 || (maxQueueSize & (maxQueueSize - 1)) !== 0) {
    throw new RangeError(`virtio-pci: queue size ${maxQueueSize} is not a power of two up to 32768`);
  }
  if (info.config.length > REGION_SIZE) throw new RangeError("virtio-pci: device config larger than 4 KiB");

  const pci = PciConfigSpace.create({
    vendorId: VIRTIO_PCI_VENDOR_ID,
    deviceId: modernOnly ? VIRTIO_PCI_MODERN_DEVICE_BASE + deviceType : VIRTIO_PCI_TRANSITIONAL_DEVICE_BASE + deviceType - 1,
    classCode: virtioClassCode(deviceType),
    // A transitional device: Linux's legacy driver insists on ABI version 0. A modern-only
    // one should say 1 (virtio 1.2, 4.1.2.1).
    revision: modernOnly ? 1 : 0,
    subsystemVendorId: VIRTIO_PCI_VENDOR_ID,
    subsystemId: deviceType,
    intxPin: opts.intxPin ?? 0,
  });
  if (!modernOnly) pci.defineBar(LEGACY_BAR, "io", legacyBarSize(info.config.length));
  pci.defineBar(MSIX_BAR, "mem32", MSIX_BAR_SIZE);
  pci.defineBar(MODERN_BAR, "mem64", MODERN_BAR_SIZE);

  pci.addCapability(PCI_CAP_ID_VNDR, virtioCap(VIRTIO_PCI_CAP_COMMON_CFG, COMMON_CFG_OFFSET, COMMON_CFG_LENGTH));
  pci.addCapability(
    PCI_CAP_ID_VNDR,
    virtioCap(VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY_CFG_OFFSET, queueCount * NOTIFY_OFF_MULTIPLIER, le32(NOTIFY_OFF_MULTIPLIER)),
  );
  pci.addCapability(PCI_CAP_ID_VNDR, virtioCap(VIRTIO_PCI_CAP_ISR_CFG, ISR_CFG_OFFSET, 1));
  if (info.config.length > 0) {
    pci.addCapability(PCI_CAP_ID_VNDR, virtioCap(VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_CFG_OFFSET, info.config.length));
  }
  // PCI configuration access (spec 4.1.4.9): the driver writes bar, offset and length, then
  // reads or writes pci_cfg_data. Those four fields are the writable ones.
  const cfgBody = virtioCap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, new Uint8Array(4));
  const cfgMask = new Uint8Array(cfgBody.length);
  cfgMask.fill(0xff, 2, 3); // bar
  cfgMask.fill(0xff, 6, 18); // offset, length, pci_cfg_data
  const pciCfgCap = pci.addCapability(PCI_CAP_ID_VNDR, cfgBody, cfgMask);
  // MSI-X: table size - 1 in the low bits; enable and function mask writable.
  const tableSize = queueCount + 1;
  const msixBody = new Uint8Array(10);
  msixBody.set(le16(tableSize - 1), 0);
  msixBody.set(le32(MSIX_TABLE_OFFSET | MSIX_BAR), 2);
  msixBody.set(le32(MSIX_PBA_OFFSET | MSIX_BAR), 6);
  const msixMask = new Uint8Array(10);
  msixMask[1] = (MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK) >>> 8;
  const msixCap = pci.addCapability(PCI_CAP_ID_MSIX, msixBody, msixMask);

  const l = layout(queueCount, info.config.length);
  const s = SharedState.create(l.cells, l.extraBytes);
  const features = info.deviceFeatures | TRANSPORT_FEATURES;
  s.set(K_TYPE, deviceType);
  s.set(K_QUEUES, queueCount);
  s.set(K_MAX_QUEUE_SIZE, maxQueueSize);
  s.set(K_FEATURES_LO, Number(features & 0xffff_ffffn) | 0);
  s.set(K_FEATURES_HI, Number((features >> 32n) & 0xffff_ffffn) | 0);
  s.set(K_CONFIG_LENGTH, info.config.length);
  s.set(K_MSIX_CAP, msixCap);
  s.set(K_PCI_CFG_CAP, pciCfgCap);
  s.bytes().set(info.config);
  const state = { regs: s.buffer, config: pci.state.buffer };
  const regs = new VirtioPciRegs(state);
  s.locked(() => {
    regs.resetLocked();
    s.set(R_RESET_GENERATION, 0);
    s.set(R_NOTIFY_LEGACY_PORT, -1);
    // The MSI-X table comes out of reset with every vector masked.
    for (let v = 0; v < tableSize; v++) regs.setEntry(v, MSIX_VECTOR_CONTROL, MSIX_ENTRY_MASKED);
  });
  return state;
}

/**
 * Typed access to the shared state, and the rules both sides share: reset, the status
 * state machine, feature checks, interrupt decisions. Methods named `...Locked` expect the
 * caller to hold the regs lock (`regs.s.lock()`).
 */
export class VirtioPciRegs {
  readonly s: SharedState;
  readonly pci: PciConfigSpace;
  readonly deviceType: number;
  readonly queueCount: number;
  readonly maxQueueSize: number;
  readonly tableSize: number;
  readonly configLength: number;
  readonly deviceFeatures: bigint;
  /** The device-specific configuration bytes (shared; touch under the lock). */
  readonly deviceConfig: Uint8Array;
  /** Offsets of the MSI-X and PCI-configuration-access capabilities in config space. */
  readonly msixCap: number;
  readonly pciCfgCap: number;
  private readonly l: Layout;

  constructor(state: VirtioPciState) {
    const raw = new Int32Array(state.regs, 0, Math.min(state.regs.byteLength >> 2, HEADER_CELLS + 1));
    const queueCount = raw[1 + K_QUEUES] ?? 0;
    const configLength = raw[1 + K_CONFIG_LENGTH] ?? 0;
    this.l = layout(queueCount, configLength);
    this.s = adoptState(state.regs, this.l.cells, this.l.extraBytes, "virtio-pci registers");
    this.pci = new PciConfigSpace(state.config);
    this.deviceType = this.s.get(K_TYPE);
    this.queueCount = queueCount;
    this.maxQueueSize = this.s.get(K_MAX_QUEUE_SIZE);
    this.tableSize = queueCount + 1;
    this.configLength = configLength;
    this.deviceFeatures = (BigInt(this.s.get(K_FEATURES_HI) >>> 0) << 32n) | BigInt(this.s.get(K_FEATURES_LO) >>> 0);
    this.deviceConfig = this.s.bytes().subarray(0, configLength);
    this.msixCap = this.s.get(K_MSIX_CAP);
    this.pciCfgCap = this.s.get(K_PCI_CFG_CAP);
  }

  get(cell: number): number {
    return this.s.get(cell);
  }

  set(cell: number, value: number): void {
    this.s.set(cell, value);
  }

  q(queue: number, field: number): number {
    return this.s.get(this.l.queueBase + queue * Q_CELLS + field);
  }

  setQ(queue: number, field: number, value: number): void {
    this.s.set(this.l.queueBase + queue * Q_CELLS + field, value);
  }

  entry(vector: number, dword: number): number {
    return this.s.get(this.l.tableBase + vector * 4 + dword) >>> 0;
  }

  setEntry(vector: number, dword: number, value: number): void {
    this.s.set(this.l.tableBase + vector * 4 + dword, value | 0);
  }

  pending(vector: number): boolean {
    return ((this.s.get(this.l.pbaBase + (vector >> 5)) >>> (vector & 31)) & 1) === 1;
  }

  /** A 32-bit word of the PBA (for reads of the PBA region). */
  pbaWord(index: number): number {
    return index < Math.ceil(this.tableSize / 32) ? this.s.get(this.l.pbaBase + index) >>> 0 : 0;
  }

  private setPending(vector: number, on: boolean): void {
    const cell = this.l.pbaBase + (vector >> 5);
    const bit = 1 << (vector & 31);
    this.s.set(cell, on ? this.s.get(cell) | bit : this.s.get(cell) & ~bit);
  }

  // ---- Queues and features ----

  /** The selected queue, or -1 when queue_select names no queue. */
  selectedQueue(): number {
    const q = this.s.get(R_QUEUE_SELECT);
    return q < this.queueCount ? q : -1;
  }

  driverFeatures(): bigint {
    return (BigInt(this.s.get(R_DRIVER_FEATURES_HI) >>> 0) << 32n) | BigInt(this.s.get(R_DRIVER_FEATURES_LO) >>> 0);
  }

  queueConfig(queue: number): QueueConfig {
    const addr = (lo: number, hi: number): number => (this.q(queue, lo) >>> 0) + (this.q(queue, hi) >>> 0) * TWO_32;
    return {
      index: queue,
      size: this.q(queue, Q_SIZE),
      ready: this.q(queue, Q_ENABLE) === 1,
      descAddr: addr(Q_DESC_LO, Q_DESC_HI),
      availAddr: addr(Q_DRIVER_LO, Q_DRIVER_HI),
      usedAddr: addr(Q_DEVICE_LO, Q_DEVICE_HI),
    };
  }

  setQueueAddress(queue: number, loField: number, value: number): void {
    this.setQ(queue, loField, value % TWO_32 | 0);
    this.setQ(queue, loField + 1, Math.floor(value / TWO_32) | 0);
  }

  /** A vector the table has, or NO_VECTOR: what a driver reads back to learn it was refused. */
  validVector(vector: number): number {
    return vector < this.tableSize ? vector : VIRTIO_MSI_NO_VECTOR;
  }

  // ---- Status and reset ----

  /**
   * The driver writes 32 bits of the features it accepts (`select` 0: bits 0-31, 1: 32-63).
   * Only offered bits are kept, so no back end is ever activated with a feature it never
   * offered; a driver that accepted others has FEATURES_OK refused (spec 2.2.2).
   */
  writeDriverFeaturesLocked(select: number, value: number): void {
    if (select !== 0 && select !== 1) {
      if (value !== 0) this.s.set(R_UNOFFERED_FEATURES, 1);
      return;
    }
    const offered = Number((this.deviceFeatures >> BigInt(32 * select)) & 0xffff_ffffn);
    if ((value & ~offered) !== 0) this.s.set(R_UNOFFERED_FEATURES, 1);
    this.s.set(select === 0 ? R_DRIVER_FEATURES_LO : R_DRIVER_FEATURES_HI, value & offered);
  }

  /** Device reset (status 0): what the driver configured is gone; the I/O side sees a new generation. */
  resetLocked(): void {
    for (const cell of [R_STATUS, R_DEVICE_FEATURE_SELECT, R_DRIVER_FEATURE_SELECT, R_DRIVER_FEATURES_LO, R_DRIVER_FEATURES_HI, R_QUEUE_SELECT, R_ISR, R_UNOFFERED_FEATURES]) {
      this.s.set(cell, 0);
    }
    this.s.set(R_MSIX_CONFIG_VECTOR, VIRTIO_MSI_NO_VECTOR);
    for (let q = 0; q < this.queueCount; q++) {
      for (let f = 0; f < Q_CELLS; f++) this.setQ(q, f, 0);
      this.setQ(q, Q_SIZE, this.maxQueueSize);
      this.setQ(q, Q_VECTOR, VIRTIO_MSI_NO_VECTOR);
    }
    // Pending messages were for queues that no longer exist.
    for (let v = 0; v < this.tableSize; v++) this.setPending(v, false);
    this.s.set(R_RESET_GENERATION, (this.s.get(R_RESET_GENERATION) + 1) | 0);
  }

  /**
   * A status write from the driver. `modern`: it came through the common configuration,
   * where FEATURES_OK also requires VERSION_1 (a legacy driver never negotiates it).
   * Returns what the caller must tell the machine once the lock is released.
   */
  writeStatusLocked(value: number, modern: boolean): "reset" | "driverOk" | undefined {
    value &= 0xff;
    if (value === 0) {
      this.resetLocked();
      return "reset";
    }
    const old = this.s.get(R_STATUS);
    if ((value & VirtioStatus.FEATURES_OK) !== 0 && (old & VirtioStatus.FEATURES_OK) === 0 && !this.featuresAcceptable(modern)) {
      // Not latched: the driver reads status back and gives up ("device refuses features").
      value &= ~VirtioStatus.FEATURES_OK;
    }
    if (modern && (value & VirtioStatus.DRIVER_OK) !== 0 && (old & VirtioStatus.DRIVER_OK) === 0 && (value & VirtioStatus.FEATURES_OK) === 0) {
      // A modern driver starts the device only after the device took its features (spec
      // 3.1.1); without that there is nothing agreed to run the device with. (A legacy
      // driver has no FEATURES_OK step.)
      value &= ~VirtioStatus.DRIVER_OK;
    }
    // DEVICE_NEEDS_RESET is the device's bit; a driver write does not clear it.
    this.s.set(R_STATUS, value | (old & VirtioStatus.DEVICE_NEEDS_RESET));
    return (value & VirtioStatus.DRIVER_OK) !== 0 && (old & VirtioStatus.DRIVER_OK) === 0 ? "driverOk" : undefined;
  }

  private featuresAcceptable(modern: boolean): boolean {
    const accepted = this.driverFeatures();
    if (this.s.get(R_UNOFFERED_FEATURES) !== 0 || (accepted & ~this.deviceFeatures) !== 0n) return false;
    return !modern || (accepted & feature(VirtioFeatureBit.VERSION_1)) !== 0n;
  }

  // ---- Interrupts ----

  msixControl(): number {
    return this.pci.readValue(this.msixCap + 2, 2);
  }

  msixEnabled(): boolean {
    return (this.msixControl() & MSIX_CONTROL_ENABLE) !== 0;
  }

  message(vector: number): MsiMessage {
    return { address: this.entry(vector, MSIX_ADDR_LO) + this.entry(vector, MSIX_ADDR_HI) * TWO_32, data: this.entry(vector, MSIX_DATA) };
  }

  /**
   * Raise an interrupt for `isrBit` (queue or config) on `vector`. With MSI-X enabled the
   * message goes to the vector, or to the PBA while it is masked, and ISR is not used (spec
   * 4.1.5.3-4); without MSI-X the ISR bit is set and INTx asserted, unless the command
   * register disables INTx.
   */
  signalLocked(isrBit: number, vector: number): InterruptDelivery {
    const control = this.msixControl();
    if ((control & MSIX_CONTROL_ENABLE) === 0) {
      this.s.set(R_ISR, this.s.get(R_ISR) | isrBit);
      return (this.pci.command() & PCI_COMMAND_INTX_DISABLE) !== 0 ? NONE : INTX;
    }
    if (vector === VIRTIO_MSI_NO_VECTOR || vector >= this.tableSize) return NONE;
    if ((control & MSIX_CONTROL_FUNCTION_MASK) !== 0 || (this.entry(vector, MSIX_VECTOR_CONTROL) & MSIX_ENTRY_MASKED) !== 0) {
      this.setPending(vector, true);
      return NONE;
    }
    return { kind: "msix", vector, ...this.message(vector) };
  }

  /**
   * The message `vector` would be sent as right now, when it would be sent at all: MSI-X
   * enabled, neither the function nor the vector masked, the vector in the table. For a
   * back end that raises the vector itself (irqfd): otherwise it must go through
   * signalLocked, which keeps the pending bit of a masked vector and the ISR for INTx.
   */
  deliverableMessageLocked(vector: number): MsiMessage | undefined {
    const control = this.msixControl();
    if ((control & MSIX_CONTROL_ENABLE) === 0 || (control & MSIX_CONTROL_FUNCTION_MASK) !== 0) return undefined;
    if (vector === VIRTIO_MSI_NO_VECTOR || vector >= this.tableSize) return undefined;
    if ((this.entry(vector, MSIX_VECTOR_CONTROL) & MSIX_ENTRY_MASKED) !== 0) return undefined;
    return this.message(vector);
  }

  /** Pending vectors that may now be sent (enabled, unmasked): clears their PBA bits. */
  takeDeliverableLocked(): { vector: number; message: MsiMessage }[] {
    const out: { vector: number; message: MsiMessage }[] = [];
    const control = this.msixControl();
    if ((control & MSIX_CONTROL_ENABLE) === 0 || (control & MSIX_CONTROL_FUNCTION_MASK) !== 0) return out;
    for (let v = 0; v < this.tableSize; v++) {
      if (!this.pending(v) || (this.entry(v, MSIX_VECTOR_CONTROL) & MSIX_ENTRY_MASKED) !== 0) continue;
      this.setPending(v, false);
      out.push({ vector: v, message: this.message(v) });
    }
    return out;
  }

  // ---- Notification addresses ----

  /** Every address a queue notification can be written to now (decoding BARs only). */
  notifyAddresses(): NotifyAddress[] {
    const { modern, legacy } = this.notifyBases();
    return this.notifyAddressesAt(modern, legacy);
  }

  /** The notification addresses for a modern BAR at `modern` and a legacy one at `legacy` (-1: off). */
  private notifyAddressesAt(modern: number, legacy: number): NotifyAddress[] {
    const out: NotifyAddress[] = [];
    for (let q = 0; q < this.queueCount; q++) {
      if (modern >= 0) out.push({ index: q, address: modern + NOTIFY_CFG_OFFSET + q * NOTIFY_OFF_MULTIPLIER, pio: false, length: 2 });
    }
    for (let q = 0; q < this.queueCount; q++) {
      if (legacy >= 0) out.push({ index: q, address: legacy + LEGACY_QUEUE_NOTIFY, pio: true, length: 2, datamatch: q });
    }
    return out;
  }

  /**
   * Compare the notify BARs with what was last reported (the R_NOTIFY_* cells: shared, so
   * that whichever thread sees a change reports it once, and the one record of where the
   * machine registered them); record the new ones and return both address lists, or
   * undefined when nothing moved.
   */
  refreshNotifyLocked(): { now: NotifyAddress[]; before: NotifyAddress[] } | undefined {
    const { modern, legacy } = this.notifyBases();
    const valid = modern >= 0 ? 1 : 0;
    const lo = modern >= 0 ? modern % TWO_32 | 0 : 0;
    const hi = modern >= 0 ? Math.floor(modern / TWO_32) | 0 : 0;
    const wasValid = this.s.get(R_NOTIFY_MODERN_VALID);
    const wasLo = this.s.get(R_NOTIFY_MODERN_LO);
    const wasHi = this.s.get(R_NOTIFY_MODERN_HI);
    const wasLegacy = this.s.get(R_NOTIFY_LEGACY_PORT);
    if (wasValid === valid && wasLo === lo && wasHi === hi && wasLegacy === legacy) return undefined;
    this.s.set(R_NOTIFY_MODERN_VALID, valid);
    this.s.set(R_NOTIFY_MODERN_LO, lo);
    this.s.set(R_NOTIFY_MODERN_HI, hi);
    this.s.set(R_NOTIFY_LEGACY_PORT, legacy);
    const wasModern = wasValid === 1 ? (wasLo >>> 0) + (wasHi >>> 0) * TWO_32 : -1;
    return { now: this.notifyAddressesAt(modern, legacy), before: this.notifyAddressesAt(wasModern, wasLegacy) };
  }

  private notifyBases(): { modern: number; legacy: number } {
    let modern = -1;
    let legacy = -1;
    for (const bar of this.pci.bars()) {
      if (!bar.enabled) continue;
      if (bar.index === MODERN_BAR) modern = bar.address;
      if (bar.index === LEGACY_BAR) legacy = bar.address;
    }
    return { modern, legacy };
  }

  /** Config space offsets a write must touch to move a notify BAR or change decoding. */
  static touchesNotifyBars(offset: number, length: number): boolean {
    const overlaps = (start: number, len: number): boolean => offset < start + len && start < offset + length;
    return overlaps(PCI_COMMAND, 2) || overlaps(0x10 + 4 * LEGACY_BAR, 4) || overlaps(0x10 + 4 * MODERN_BAR, 8);
  }
}

/** struct virtio_pci_cap after its ID and next bytes, plus any trailing fields. */
function virtioCap(cfgType: number, offset: number, length: number, extra: Uint8Array = new Uint8Array(0)): Uint8Array {
  const body = new Uint8Array(14 + extra.length);
  body[0] = 16 + extra.length; // cap_len counts the ID and next bytes too
  body[1] = cfgType;
  body[2] = cfgType === VIRTIO_PCI_CAP_PCI_CFG ? 0 : MODERN_BAR;
  body[3] = 0; // id: one structure of each type
  body.set(le32(offset), 6);
  body.set(le32(length), 10);
  body.set(extra, 14);
  return body;
}

function le16(v: number): Uint8Array {
  return Uint8Array.of(v & 0xff, (v >>> 8) & 0xff);
}

function le32(v: number): Uint8Array {
  return Uint8Array.of(v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, (v >>> 24) & 0xff);
}
