/**
 * The two register blocks a driver configures a virtio-pci device through: the modern
 * common configuration (spec 4.1.4.3, BAR 4) and the legacy header (virtio 0.9.5, BAR 0).
 * Both are field tables over the same shared registers, run under the regs lock; what the
 * machine must hear about is queued through `later` and happens after the lock is released.
 */
import { VIRTIO_MSI_NO_VECTOR, VirtioStatus } from "./types";
import type { Field } from "./transport-fields";
import {
  COMMON_CFGGENERATION,
  COMMON_DF,
  COMMON_DFSELECT,
  COMMON_GF,
  COMMON_GFSELECT,
  COMMON_MSIX,
  COMMON_NUMQ,
  COMMON_Q_AVAILHI,
  COMMON_Q_AVAILLO,
  COMMON_Q_DESCHI,
  COMMON_Q_DESCLO,
  COMMON_Q_ENABLE,
  COMMON_Q_MSIX,
  COMMON_Q_NDATA,
  COMMON_Q_NOFF,
  COMMON_Q_RESET,
  COMMON_Q_SELECT,
  COMMON_Q_SIZE,
  COMMON_Q_USEDHI,
  COMMON_Q_USEDLO,
  COMMON_STATUS,
  LEGACY_GUEST_FEATURES,
  LEGACY_HOST_FEATURES,
  LEGACY_ISR,
  LEGACY_MSI_CONFIG_VECTOR,
  LEGACY_MSI_QUEUE_VECTOR,
  LEGACY_QUEUE_NOTIFY,
  LEGACY_QUEUE_NUM,
  LEGACY_QUEUE_PFN,
  LEGACY_QUEUE_SEL,
  LEGACY_STATUS,
  legacyRingAddresses,
} from "./transport-layout";
import {
  Q_DESC_HI,
  Q_DESC_LO,
  Q_DEVICE_HI,
  Q_DEVICE_LO,
  Q_DRIVER_HI,
  Q_DRIVER_LO,
  Q_ENABLE,
  Q_PFN,
  Q_SIZE,
  Q_VECTOR,
  R_CONFIG_GENERATION,
  R_DEVICE_FEATURE_SELECT,
  R_DRIVER_FEATURE_SELECT,
  R_DRIVER_FEATURES_HI,
  R_DRIVER_FEATURES_LO,
  R_ISR,
  R_MSIX_CONFIG_VECTOR,
  R_QUEUE_SELECT,
  R_STATUS,
  type MsiMessage,
  type VirtioPciRegs,
} from "./transport-state";

/** What a register access asks of the machine, delivered once the lock is released. */
export type TransportEffect =
  | { readonly kind: "kick"; readonly queue: number }
  | { readonly kind: "reset" }
  | { readonly kind: "driverOk" }
  | { readonly kind: "msixChanged" }
  | { readonly kind: "msixUnmasked"; readonly vector: number; readonly message: MsiMessage };

export interface RegisterContext {
  readonly regs: VirtioPciRegs;
  later(effect: TransportEffect): void;
}

const u32 = (v: number): number => v >>> 0;

/** Writes of the status register: the state machine is shared, the effects are queued. */
function statusWrite(ctx: RegisterContext, value: number, modern: boolean): void {
  const effect = ctx.regs.writeStatusLocked(value, modern);
  if (effect !== undefined) ctx.later({ kind: effect });
}

function driverOk(regs: VirtioPciRegs): boolean {
  return (regs.get(R_STATUS) & VirtioStatus.DRIVER_OK) !== 0;
}

/** The selected queue's MSI-X vector: one register at different offsets in the two layouts. */
function queueVectorField(ctx: RegisterContext, offset: number): Field {
  const regs = ctx.regs;
  const sel = (): number => regs.selectedQueue();
  return {
    offset,
    width: 2,
    read: () => (sel() >= 0 ? regs.q(sel(), Q_VECTOR) : VIRTIO_MSI_NO_VECTOR),
    write: (v) => {
      if (sel() < 0) return;
      regs.setQ(sel(), Q_VECTOR, regs.validVector(v));
      ctx.later({ kind: "msixChanged" });
    },
  };
}

/** Reading ISR returns it and clears it (the INTx line itself is the machine's). */
export function takeIsr(regs: VirtioPciRegs): number {
  const isr = regs.get(R_ISR);
  regs.set(R_ISR, 0);
  return isr;
}

/** struct virtio_pci_common_cfg. */
export function commonConfigFields(ctx: RegisterContext): Field[] {
  const { regs } = ctx;
  const sel = (): number => regs.selectedQueue();
  /** Queue setup fields may change only while the queue is off and the driver not running. */
  const configurable = (q: number): boolean => q >= 0 && regs.q(q, Q_ENABLE) === 0 && !driverOk(regs);
  const queueAddress = (offset: number, field: number): Field => ({
    offset,
    width: 4,
    read: () => (sel() >= 0 ? u32(regs.q(sel(), field)) : 0),
    write: (v) => {
      if (configurable(sel())) regs.setQ(sel(), field, v | 0);
    },
  });
  const featureWord = (select: number, features: bigint): number =>
    select > 1 ? 0 : Number((features >> BigInt(32 * select)) & 0xffff_ffffn);

  return [
    {
      offset: COMMON_DFSELECT,
      width: 4,
      read: () => u32(regs.get(R_DEVICE_FEATURE_SELECT)),
      write: (v) => regs.set(R_DEVICE_FEATURE_SELECT, v | 0),
    },
    { offset: COMMON_DF, width: 4, read: () => featureWord(u32(regs.get(R_DEVICE_FEATURE_SELECT)), regs.deviceFeatures) },
    {
      offset: COMMON_GFSELECT,
      width: 4,
      read: () => u32(regs.get(R_DRIVER_FEATURE_SELECT)),
      write: (v) => regs.set(R_DRIVER_FEATURE_SELECT, v | 0),
    },
    {
      offset: COMMON_GF,
      width: 4,
      read: () => featureWord(u32(regs.get(R_DRIVER_FEATURE_SELECT)), regs.driverFeatures()),
      write: (v) => {
        // Features are fixed once FEATURES_OK is latched (spec 2.2.2).
        if ((regs.get(R_STATUS) & VirtioStatus.FEATURES_OK) !== 0) return;
        regs.writeDriverFeaturesLocked(u32(regs.get(R_DRIVER_FEATURE_SELECT)), v | 0);
      },
    },
    {
      offset: COMMON_MSIX,
      width: 2,
      read: () => regs.get(R_MSIX_CONFIG_VECTOR),
      write: (v) => {
        regs.set(R_MSIX_CONFIG_VECTOR, regs.validVector(v));
        ctx.later({ kind: "msixChanged" });
      },
    },
    { offset: COMMON_NUMQ, width: 2, read: () => regs.queueCount },
    { offset: COMMON_STATUS, width: 1, read: () => regs.get(R_STATUS), write: (v) => statusWrite(ctx, v, true) },
    { offset: COMMON_CFGGENERATION, width: 1, read: () => regs.get(R_CONFIG_GENERATION) & 0xff },
    { offset: COMMON_Q_SELECT, width: 2, read: () => regs.get(R_QUEUE_SELECT), write: (v) => regs.set(R_QUEUE_SELECT, v) },
    {
      offset: COMMON_Q_SIZE,
      width: 2,
      // 0 tells the driver the queue does not exist.
      read: () => (sel() >= 0 ? regs.q(sel(), Q_SIZE) : 0),
      write: (v) => {
        const q = sel();
        // Split rings: a power of two, at most the device's maximum (spec 2.7).
        if (configurable(q) && v > 0 && v <= regs.maxQueueSize && (v & (v - 1)) === 0) regs.setQ(q, Q_SIZE, v);
      },
    },
    queueVectorField(ctx, COMMON_Q_MSIX),
    {
      offset: COMMON_Q_ENABLE,
      width: 2,
      read: () => (sel() >= 0 ? regs.q(sel(), Q_ENABLE) : 0),
      write: (v) => {
        // Only 1 may be written (spec 4.1.4.3.2); disabling takes a reset.
        if (v === 1 && configurable(sel())) regs.setQ(sel(), Q_ENABLE, 1);
      },
    },
    // queue_notify_off = the queue index: queue i notifies at i * notify_off_multiplier.
    { offset: COMMON_Q_NOFF, width: 2, read: () => Math.max(sel(), 0) },
    queueAddress(COMMON_Q_DESCLO, Q_DESC_LO),
    queueAddress(COMMON_Q_DESCHI, Q_DESC_HI),
    queueAddress(COMMON_Q_AVAILLO, Q_DRIVER_LO),
    queueAddress(COMMON_Q_AVAILHI, Q_DRIVER_HI),
    queueAddress(COMMON_Q_USEDLO, Q_DEVICE_LO),
    queueAddress(COMMON_Q_USEDHI, Q_DEVICE_HI),
    // Without VIRTIO_F_NOTIF_CONFIG_DATA and VIRTIO_F_RING_RESET these read 0.
    { offset: COMMON_Q_NDATA, width: 2, read: () => 0 },
    { offset: COMMON_Q_RESET, width: 2, read: () => 0 },
  ];
}

/**
 * The legacy header. Legacy drivers see only feature bits 0-31, so VERSION_1 (bit 32) is
 * never offered to them and can never be accepted; they have no FEATURES_OK step, so the
 * accepted bits are masked with the offered ones at once. A queue is a page frame number:
 * its size is fixed at the device's maximum and its parts laid out with 4 KiB alignment.
 */
export function legacyFields(ctx: RegisterContext, withMsix: boolean): Field[] {
  const { regs } = ctx;
  const sel = (): number => regs.selectedQueue();
  const offeredLow = Number(regs.deviceFeatures & 0xffff_ffffn);
  const fields: Field[] = [
    { offset: LEGACY_HOST_FEATURES, width: 4, read: () => offeredLow },
    {
      offset: LEGACY_GUEST_FEATURES,
      width: 4,
      read: () => u32(regs.get(R_DRIVER_FEATURES_LO)),
      write: (v) => {
        if (driverOk(regs)) return;
        regs.set(R_DRIVER_FEATURES_LO, v & offeredLow);
        regs.set(R_DRIVER_FEATURES_HI, 0);
      },
    },
    {
      offset: LEGACY_QUEUE_PFN,
      width: 4,
      read: () => (sel() >= 0 ? u32(regs.q(sel(), Q_PFN)) : 0),
      write: (pfn) => {
        const q = sel();
        if (q < 0) return;
        regs.setQ(q, Q_PFN, pfn | 0);
        if (pfn === 0) {
          // The driver tears the queue down.
          regs.setQ(q, Q_ENABLE, 0);
          for (const f of [Q_DESC_LO, Q_DRIVER_LO, Q_DEVICE_LO]) regs.setQueueAddress(q, f, 0);
          return;
        }
        const size = regs.maxQueueSize;
        const ring = legacyRingAddresses(pfn, size);
        regs.setQ(q, Q_SIZE, size);
        regs.setQueueAddress(q, Q_DESC_LO, ring.desc);
        regs.setQueueAddress(q, Q_DRIVER_LO, ring.avail);
        regs.setQueueAddress(q, Q_DEVICE_LO, ring.used);
        regs.setQ(q, Q_ENABLE, 1);
      },
    },
    { offset: LEGACY_QUEUE_NUM, width: 2, read: () => (sel() >= 0 ? regs.q(sel(), Q_SIZE) : 0) },
    { offset: LEGACY_QUEUE_SEL, width: 2, read: () => regs.get(R_QUEUE_SELECT), write: (v) => regs.set(R_QUEUE_SELECT, v) },
    {
      offset: LEGACY_QUEUE_NOTIFY,
      width: 2,
      read: () => 0,
      write: (v) => {
        if (v < regs.queueCount) ctx.later({ kind: "kick", queue: v });
      },
    },
    { offset: LEGACY_STATUS, width: 1, read: () => regs.get(R_STATUS), write: (v) => statusWrite(ctx, v, false) },
    { offset: LEGACY_ISR, width: 1, read: () => takeIsr(regs) },
  ];
  if (withMsix) {
    fields.push(
      {
        offset: LEGACY_MSI_CONFIG_VECTOR,
        width: 2,
        read: () => regs.get(R_MSIX_CONFIG_VECTOR),
        write: (v) => {
          regs.set(R_MSIX_CONFIG_VECTOR, regs.validVector(v));
          ctx.later({ kind: "msixChanged" });
        },
      },
      queueVectorField(ctx, LEGACY_MSI_QUEUE_VECTOR),
    );
  }
  return fields;
}
