/**
 * Where everything sits in a virtio-pci function (numbers from the virtio 1.2 spec, 4.1),
 * shared by the register side (vCPU threads) and the queue side (I/O worker).
 *
 *   BAR 0  I/O, legacy (virtio 0.9.5) register block, then the device config
 *   BAR 1  32-bit memory, 4 KiB: MSI-X table at 0x000, PBA at 0x800
 *   BAR 4  64-bit memory, 16 KiB: one 4 KiB page each for
 *            0x0000 common configuration   0x1000 ISR status
 *            0x2000 device configuration   0x3000 notifications (queue i at i * 4)
 *
 * The MSI-X table gets its own BAR, as in QEMU, so BAR 4 could be made prefetchable without
 * putting the table there (the PCI spec forbids that); BAR 4 is still non-prefetchable,
 * since reading ISR clears it.
 */

export const VIRTIO_PCI_VENDOR_ID = 0x1af4;
/** Transitional device IDs are 0x1000 + type - 1 (0x1000 net, 0x1001 block). */
export const VIRTIO_PCI_TRANSITIONAL_DEVICE_BASE = 0x1000;
/** Modern-only (non-transitional) device IDs are 0x1040 + type (0x105a virtio-fs). */
export const VIRTIO_PCI_MODERN_DEVICE_BASE = 0x1040;

export const LEGACY_BAR = 0;
export const MSIX_BAR = 1;
export const MODERN_BAR = 4;

export const MODERN_BAR_SIZE = 0x4000;
export const COMMON_CFG_OFFSET = 0x0000;
/** Through queue_reset (spec 4.1.4.3); the rest of the page reads 0. */
export const COMMON_CFG_LENGTH = 0x3c;
export const ISR_CFG_OFFSET = 0x1000;
export const DEVICE_CFG_OFFSET = 0x2000;
export const NOTIFY_CFG_OFFSET = 0x3000;
export const REGION_SIZE = 0x1000;
/** Queue i notifies at NOTIFY_CFG_OFFSET + i * NOTIFY_OFF_MULTIPLIER (queue_notify_off = i). */
export const NOTIFY_OFF_MULTIPLIER = 4;

export const MSIX_BAR_SIZE = 0x1000;
export const MSIX_TABLE_OFFSET = 0x000;
export const MSIX_PBA_OFFSET = 0x800;
export const MSIX_ENTRY_SIZE = 16;
/** The table must end before the PBA: 128 entries, so up to 127 queues plus the config vector. */
export const MSIX_MAX_ENTRIES = (MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET) / MSIX_ENTRY_SIZE;
export const MAX_QUEUES = MSIX_MAX_ENTRIES - 1;

// MSI-X capability: message control bits.
export const MSIX_CONTROL_ENABLE = 0x8000;
export const MSIX_CONTROL_FUNCTION_MASK = 0x4000;
/** Vector control bit 0. */
export const MSIX_ENTRY_MASKED = 1;

// Virtio PCI capability cfg_type values (spec 4.1.4).
export const VIRTIO_PCI_CAP_COMMON_CFG = 1;
export const VIRTIO_PCI_CAP_NOTIFY_CFG = 2;
export const VIRTIO_PCI_CAP_ISR_CFG = 3;
export const VIRTIO_PCI_CAP_DEVICE_CFG = 4;
export const VIRTIO_PCI_CAP_PCI_CFG = 5;

// struct virtio_pci_cap, offsets from the capability start.
export const CAP_LEN = 2;
export const CAP_CFG_TYPE = 3;
export const CAP_BAR = 4;
export const CAP_ID = 5;
export const CAP_OFFSET = 8;
export const CAP_LENGTH = 12;
/** virtio_pci_notify_cap.notify_off_multiplier. */
export const CAP_NOTIFY_MULTIPLIER = 16;
/** virtio_pci_cfg_cap.pci_cfg_data. */
export const CAP_PCI_CFG_DATA = 16;

// Common configuration (struct virtio_pci_common_cfg), byte offsets.
export const COMMON_DFSELECT = 0x00;
export const COMMON_DF = 0x04;
export const COMMON_GFSELECT = 0x08;
export const COMMON_GF = 0x0c;
export const COMMON_MSIX = 0x10;
export const COMMON_NUMQ = 0x12;
export const COMMON_STATUS = 0x14;
export const COMMON_CFGGENERATION = 0x15;
export const COMMON_Q_SELECT = 0x16;
export const COMMON_Q_SIZE = 0x18;
export const COMMON_Q_MSIX = 0x1a;
export const COMMON_Q_ENABLE = 0x1c;
export const COMMON_Q_NOFF = 0x1e;
export const COMMON_Q_DESCLO = 0x20;
export const COMMON_Q_DESCHI = 0x24;
export const COMMON_Q_AVAILLO = 0x28;
export const COMMON_Q_AVAILHI = 0x2c;
export const COMMON_Q_USEDLO = 0x30;
export const COMMON_Q_USEDHI = 0x34;
export const COMMON_Q_NDATA = 0x38;
export const COMMON_Q_RESET = 0x3a;

// Legacy register block (virtio 0.9.5, Linux's virtio_pci_legacy.h), byte offsets in BAR 0.
export const LEGACY_HOST_FEATURES = 0x00;
export const LEGACY_GUEST_FEATURES = 0x04;
export const LEGACY_QUEUE_PFN = 0x08;
export const LEGACY_QUEUE_NUM = 0x0c;
export const LEGACY_QUEUE_SEL = 0x0e;
export const LEGACY_QUEUE_NOTIFY = 0x10;
export const LEGACY_STATUS = 0x12;
export const LEGACY_ISR = 0x13;
/** Present only while MSI-X is enabled; the device config then starts at 0x18, else 0x14. */
export const LEGACY_MSI_CONFIG_VECTOR = 0x14;
export const LEGACY_MSI_QUEUE_VECTOR = 0x16;
export const LEGACY_CONFIG_NO_MSIX = 0x14;
export const LEGACY_CONFIG_MSIX = 0x18;
/** Legacy rings: PFN in 4 KiB pages, used ring aligned to 4 KiB. */
export const LEGACY_PFN_SHIFT = 12;
export const LEGACY_VRING_ALIGN = 4096;

/** The PCI class of each device type (class, subclass, prog-if); other types: "unclassified". */
export function virtioClassCode(deviceType: number): number {
  switch (deviceType) {
    case 1:
      return 0x020000; // network controller, ethernet
    case 2:
    case 26: // virtio-fs, as QEMU classes it
      return 0x018000; // mass storage, other
    default:
      return 0xff0000;
  }
}

/** The legacy BAR holds the 24-byte header (with MSI-X) and the device config. */
export function legacyBarSize(configLength: number): number {
  let size = 0x20;
  while (size < LEGACY_CONFIG_MSIX + configLength) size *= 2;
  return size;
}

/**
 * Where a legacy (PFN) ring's parts are: the descriptor table at the page, the available
 * ring right after it (with used_event), the used ring at the next 4 KiB boundary (Linux's
 * vring_init with VIRTIO_PCI_VRING_ALIGN).
 */
export function legacyRingAddresses(pfn: number, size: number): { desc: number; avail: number; used: number } {
  const desc = pfn * 2 ** LEGACY_PFN_SHIFT;
  const avail = desc + 16 * size;
  const availEnd = avail + 2 * (3 + size);
  const used = Math.ceil(availEnd / LEGACY_VRING_ALIGN) * LEGACY_VRING_ALIGN;
  return { desc, avail, used };
}
