import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { feature, VirtioFeatureBit, VirtioStatus, VIRTIO_MSI_NO_VECTOR, type VirtioDeviceDescription } from "../../src/devices/virtio/types";
import { Bus } from "../../src/devices/bus";
import { PciRootComplex } from "../../src/devices/pci/root-complex";
import {
  VirtioPciTransport,
  VirtioPciDeviceSide,
  type MsiMessage,
  type NotifyAddress,
  type VirtioPciState,
  type VirtioTransportHooks,
} from "../../src/devices/virtio/pci-transport";
import * as L from "../../src/devices/virtio/transport-layout";

// ---- Harness ----
// A guest's-eye view: a root complex on port and MMIO buses, firmware resource assignment,
// configuration cycles through 0xCF8/0xCFC, and the capability walk Linux's
// virtio_pci_modern_dev.c does. The machine's hooks are recorded.

const SLOT = 3;
const GSI = 18;

/** virtio-blk-like: SEG_MAX (2) and BLK_SIZE (6); config = capacity (8 bytes) and more. */
function blkInfo(overrides: Partial<VirtioDeviceDescription> = {}): VirtioDeviceDescription {
  const config = new Uint8Array(24);
  for (let i = 0; i < config.length; i++) config[i] = i + 1;
  return {
    deviceType: 2,
    queueCount: 2,
    maxQueueSize: 256,
    deviceFeatures: feature(2) | feature(6),
    config,
    ...overrides,
  };
}

class RecordingHooks implements VirtioTransportHooks {
  readonly kicks: number[] = [];
  resets = 0;
  driverOks = 0;
  readonly notify: NotifyAddress[][] = [];
  readonly unmasked: { vector: number; message: MsiMessage }[] = [];
  msixChanges = 0;
  acceptConfigWrites = false;
  readonly configWrites: string[] = [];

  kick(queue: number): void {
    this.kicks.push(queue);
  }
  reset(): void {
    this.resets++;
  }
  driverOk(): void {
    this.driverOks++;
  }
  /** What each report said notifications arrived at before. */
  readonly notifyBefore: NotifyAddress[][] = [];
  notifyAddressChanged(queues: readonly NotifyAddress[], before: readonly NotifyAddress[]): void {
    this.notify.push([...queues]);
    this.notifyBefore.push([...before]);
  }
  msixUnmasked(vector: number, message: MsiMessage): void {
    this.unmasked.push({ vector, message });
  }
  msixChanged(): void {
    this.msixChanges++;
  }
  deviceConfigWrite(offset: number, data: Uint8Array): boolean {
    this.configWrites.push(`${offset}:${[...data].join(",")}`);
    return this.acceptConfigWrites;
  }
}

function le(value: number, size: number): Uint8Array {
  const d = new Uint8Array(size);
  let v = value;
  for (let i = 0; i < size; i++) {
    d[i] = v % 256;
    v = Math.floor(v / 256);
  }
  return d;
}

function value(d: Uint8Array): number {
  let v = 0;
  for (let i = d.length - 1; i >= 0; i--) v = v * 256 + d[i]!;
  return v;
}

interface VirtioCap {
  offset: number;
  cfgType: number;
  bar: number;
  barOffset: number;
  length: number;
}

class Guest {
  readonly pio = new Bus("port I/O", 0x10000);
  readonly mmio = new Bus("MMIO");
  readonly root = new PciRootComplex(PciRootComplex.createState());
  readonly state: VirtioPciState;
  readonly hooks = new RecordingHooks();
  readonly dev: VirtioPciTransport;
  readonly io: VirtioPciDeviceSide;

  constructor(info: VirtioDeviceDescription = blkInfo()) {
    this.state = VirtioPciTransport.createState(info, { intxPin: 0 });
    this.dev = new VirtioPciTransport(this.state, this.hooks);
    this.io = new VirtioPciDeviceSide(this.state);
    this.root.add({ device: SLOT, intxPin: 0, gsi: GSI }, this.dev);
    this.root.registerOn(this.pio, this.mmio);
    this.root.assignResources();
  }

  // ---- Configuration cycles (mechanism #1) ----

  cfgRead(reg: number, size: number): number {
    this.pio.write(0xcf8, le(0x8000_0000 | (SLOT << 11) | (reg & 0xfc), 4));
    const d = new Uint8Array(size);
    this.pio.read(0xcfc + (reg & 3), d);
    return value(d);
  }

  cfgWrite(reg: number, size: number, v: number): void {
    this.pio.write(0xcf8, le(0x8000_0000 | (SLOT << 11) | (reg & 0xfc), 4));
    this.pio.write(0xcfc + (reg & 3), le(v, size));
  }

  /** A BAR's address as the guest reads it from the BAR registers. */
  barAddress(index: number): number {
    const low = this.cfgRead(0x10 + 4 * index, 4);
    if (low & 1) return low & ~3;
    const lowAddr = (low & ~0xf) >>> 0;
    return (low & 0x6) === 0x4 ? lowAddr + this.cfgRead(0x14 + 4 * index, 4) * 2 ** 32 : lowAddr;
  }

  /** The vendor capabilities, walked like virtio_pci_find_capability. */
  virtioCaps(): VirtioCap[] {
    const caps: VirtioCap[] = [];
    if ((this.cfgRead(0x06, 2) & 0x10) === 0) return caps;
    for (let p = this.cfgRead(0x34, 1); p !== 0; p = this.cfgRead(p + 1, 1)) {
      if (this.cfgRead(p, 1) !== 0x09) continue;
      caps.push({
        offset: p,
        cfgType: this.cfgRead(p + 3, 1),
        bar: this.cfgRead(p + 4, 1),
        barOffset: this.cfgRead(p + 8, 4),
        length: this.cfgRead(p + 12, 4),
      });
    }
    return caps;
  }

  capability(id: number): number {
    for (let p = this.cfgRead(0x34, 1); p !== 0; p = this.cfgRead(p + 1, 1)) {
      if (this.cfgRead(p, 1) === id) return p;
    }
    return 0;
  }

  /** Guest-physical address of a virtio structure (cfg_type). */
  structure(cfgType: number): number {
    const cap = this.virtioCaps().find((c) => c.cfgType === cfgType);
    if (cap === undefined) throw new Error(`no virtio capability of type ${cfgType}`);
    return this.barAddress(cap.bar) + cap.barOffset;
  }

  // ---- Bus accesses ----

  readMem(address: number, size: number): number {
    const d = new Uint8Array(size);
    this.mmio.read(address, d);
    return value(d);
  }

  writeMem(address: number, size: number, v: number): void {
    this.mmio.write(address, le(v, size));
  }

  common(offset: number, size: number): number {
    return this.readMem(this.structure(1) + offset, size);
  }

  setCommon(offset: number, size: number, v: number): void {
    this.writeMem(this.structure(1) + offset, size, v);
  }

  inPort(port: number, size: number): number {
    const d = new Uint8Array(size);
    this.pio.read(port, d);
    return value(d);
  }

  outPort(port: number, size: number, v: number): void {
    this.pio.write(port, le(v, size));
  }

  legacy(offset: number, size: number): number {
    return this.inPort(this.barAddress(0) + offset, size);
  }

  setLegacy(offset: number, size: number, v: number): void {
    this.outPort(this.barAddress(0) + offset, size, v);
  }

  /** MSI-X table entry `vector` (BAR and offset from the MSI-X capability). */
  msixEntry(vector: number): number {
    const cap = this.capability(0x11);
    const table = this.cfgRead(cap + 4, 4);
    return this.barAddress(table & 7) + (table & ~7) + 16 * vector;
  }

  msixPba(): number {
    const cap = this.capability(0x11);
    const pba = this.cfgRead(cap + 8, 4);
    return this.barAddress(pba & 7) + (pba & ~7);
  }

  enableMsix(on = true, functionMask = false): void {
    const cap = this.capability(0x11);
    this.cfgWrite(cap + 2, 2, (on ? 0x8000 : 0) | (functionMask ? 0x4000 : 0));
  }
}

// ---- Tests ----

const { ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK, DEVICE_NEEDS_RESET } = VirtioStatus;
const VERSION_1 = feature(VirtioFeatureBit.VERSION_1);
/** Device bits 2 and 6 plus INDIRECT_DESC (28) and EVENT_IDX (29); VERSION_1 is bit 32. */
const OFFERED_LOW = 0x3000_0044;

/** The modern init sequence up to FEATURES_OK (spec 3.1.1), accepting `accept`. */
function negotiate(g: Guest, accept: bigint): number {
  g.setCommon(L.COMMON_STATUS, 1, 0);
  g.setCommon(L.COMMON_STATUS, 1, ACKNOWLEDGE);
  g.setCommon(L.COMMON_STATUS, 1, ACKNOWLEDGE | DRIVER);
  g.setCommon(L.COMMON_GFSELECT, 4, 0);
  g.setCommon(L.COMMON_GF, 4, Number(accept & 0xffff_ffffn));
  g.setCommon(L.COMMON_GFSELECT, 4, 1);
  g.setCommon(L.COMMON_GF, 4, Number(accept >> 32n));
  g.setCommon(L.COMMON_STATUS, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK);
  return g.common(L.COMMON_STATUS, 1);
}

/** Reset, ACKNOWLEDGE, DRIVER, then write driver feature words as [select, value]. */
function writeFeatureWords(g: Guest, words: [number, number][]): void {
  g.setCommon(L.COMMON_STATUS, 1, 0);
  g.setCommon(L.COMMON_STATUS, 1, ACKNOWLEDGE | DRIVER);
  for (const [select, value] of words) {
    g.setCommon(L.COMMON_GFSELECT, 4, select);
    g.setCommon(L.COMMON_GF, 4, value);
  }
}

/** Queue setup like vp_modern's setup_vq: select, size, addresses (lo/hi), vector, enable. */
function setupQueue(g: Guest, q: number, size: number, base: number, vector = VIRTIO_MSI_NO_VECTOR): void {
  g.setCommon(L.COMMON_Q_SELECT, 2, q);
  g.setCommon(L.COMMON_Q_SIZE, 2, size);
  const parts: [number, number][] = [
    [L.COMMON_Q_DESCLO, base],
    [L.COMMON_Q_AVAILLO, base + 0x1000],
    [L.COMMON_Q_USEDLO, base + 0x2000],
  ];
  for (const [off, addr] of parts) {
    g.setCommon(off, 4, addr % 2 ** 32);
    g.setCommon(off + 4, 4, Math.floor(addr / 2 ** 32));
  }
  g.setCommon(L.COMMON_Q_MSIX, 2, vector);
  g.setCommon(L.COMMON_Q_ENABLE, 2, 1);
}

function fullInit(g: Guest): void {
  assert.ok(negotiate(g, VERSION_1 | feature(2) | feature(VirtioFeatureBit.RING_EVENT_IDX)) & FEATURES_OK);
  setupQueue(g, 0, 128, 0x1_2345_0000);
  g.setCommon(L.COMMON_STATUS, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
}

describe("virtio-pci: identity and capabilities", () => {
  it("is a transitional virtio-blk function", () => {
    const g = new Guest();
    assert.equal(g.cfgRead(0x00, 4), 0x1001_1af4);
    assert.equal(g.cfgRead(0x08, 4), 0x0180_0000, "class 01/80/00, revision 0");
    assert.equal(g.cfgRead(0x2c, 4), 0x0002_1af4, "subsystem: virtio type 2");
    assert.equal(g.cfgRead(0x3d, 1), 1, "INTA");
    assert.equal(g.cfgRead(0x3c, 1), GSI, "firmware wrote the interrupt line");
    assert.equal(g.dev.name, "virtio-blk");
  });

  it("is a transitional virtio-net function for type 1", () => {
    const g = new Guest(blkInfo({ deviceType: 1, config: new Uint8Array(12) }));
    assert.equal(g.cfgRead(0x00, 4), 0x1000_1af4);
    assert.equal(g.cfgRead(0x08, 4) >>> 8, 0x020000);
    assert.equal(g.cfgRead(0x2e, 2), 1);
  });

  it("has programmed, decoding BARs: legacy I/O, MSI-X, 64-bit modern", () => {
    const g = new Guest();
    const bars = g.dev.bars();
    assert.deepEqual(
      bars.map((b) => [b.index, b.kind, b.size, b.enabled]),
      [
        [0, "io", 0x40, true],
        [1, "mem32", 0x1000, true],
        [4, "mem64", 0x4000, true],
      ],
    );
    assert.equal(g.cfgRead(0x20, 4) & 0xf, 0x4, "64-bit, not prefetchable");
    assert.equal(g.cfgRead(0x04, 2) & 3, 3, "I/O and memory decode on");
  });

  it("lists the virtio capabilities a driver walks for", () => {
    const g = new Guest();
    const caps = g.virtioCaps();
    assert.deepEqual(
      caps.map((c) => [c.cfgType, c.bar, c.barOffset, c.length]),
      [
        [1, 4, 0x0000, 0x3c],
        [2, 4, 0x3000, 2 * 4],
        [3, 4, 0x1000, 1],
        [4, 4, 0x2000, 24],
        [5, 0, 0, 0],
      ],
    );
    const notify = caps[1]!.offset;
    assert.equal(g.cfgRead(notify + 2, 1), 20, "notify cap_len includes the multiplier");
    assert.equal(g.cfgRead(notify + 16, 4), 4, "notify_off_multiplier");
    assert.equal(g.cfgRead(caps[0]!.offset + 2, 1), 16);
    // MSI-X: table size 3 (2 queues + config), table in BAR 1 at 0, PBA at 0x800.
    const msix = g.capability(0x11);
    assert.notEqual(msix, 0);
    assert.equal(g.cfgRead(msix + 2, 2), 0x0002);
    assert.equal(g.cfgRead(msix + 4, 4), 0x0000_0001);
    assert.equal(g.cfgRead(msix + 8, 4), 0x0000_0801);
    assert.equal(g.common(L.COMMON_NUMQ, 2), 2);
  });

  it("answers the PCI configuration access capability", () => {
    const g = new Guest();
    const cap = g.virtioCaps().find((c) => c.cfgType === 5)!.offset;
    g.cfgWrite(cap + 4, 1, 4); // bar
    g.cfgWrite(cap + 8, 4, L.COMMON_NUMQ); // offset
    g.cfgWrite(cap + 12, 4, 2); // length
    assert.equal(g.cfgRead(cap + 16, 2), 2, "num_queues through config space");
    g.cfgWrite(cap + 8, 4, L.COMMON_STATUS);
    g.cfgWrite(cap + 12, 4, 1);
    g.cfgWrite(cap + 16, 1, ACKNOWLEDGE);
    assert.equal(g.io.status(), ACKNOWLEDGE, "a status write through config space");
    g.cfgWrite(cap + 12, 4, 3); // a bad length does nothing
    assert.equal(g.cfgRead(cap + 16, 1), ACKNOWLEDGE);
  });
});

describe("virtio-pci: modern initialisation", () => {
  it("offers device features plus VERSION_1, EVENT_IDX and INDIRECT_DESC", () => {
    const g = new Guest();
    g.setCommon(L.COMMON_DFSELECT, 4, 0);
    assert.equal(g.common(L.COMMON_DF, 4), OFFERED_LOW);
    g.setCommon(L.COMMON_DFSELECT, 4, 1);
    assert.equal(g.common(L.COMMON_DF, 4), 1, "VERSION_1");
    g.setCommon(L.COMMON_DFSELECT, 4, 2);
    assert.equal(g.common(L.COMMON_DF, 4), 0);
  });

  it("runs reset, ACK, DRIVER, features, FEATURES_OK, queues and DRIVER_OK", () => {
    const g = new Guest();
    const accepted = VERSION_1 | feature(2) | feature(VirtioFeatureBit.RING_EVENT_IDX);
    assert.equal(negotiate(g, accepted), ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert.equal(g.hooks.resets, 1, "the initial status 0 is a reset");
    assert.equal(g.io.resetGeneration(), 1);
    g.setCommon(L.COMMON_GFSELECT, 4, 0);
    assert.equal(g.common(L.COMMON_GF, 4), Number(accepted & 0xffff_ffffn));

    g.setCommon(L.COMMON_Q_SELECT, 2, 0);
    assert.equal(g.common(L.COMMON_Q_SIZE, 2), 256, "the maximum, until the driver shrinks it");
    assert.equal(g.common(L.COMMON_Q_NOFF, 2), 0);
    setupQueue(g, 0, 128, 0x1_2345_0000, VIRTIO_MSI_NO_VECTOR);
    g.setCommon(L.COMMON_Q_SELECT, 2, 1);
    assert.equal(g.common(L.COMMON_Q_NOFF, 2), 1);
    assert.equal(g.common(L.COMMON_Q_ENABLE, 2), 0);
    g.setCommon(L.COMMON_Q_SELECT, 2, 0);
    assert.equal(g.common(L.COMMON_Q_ENABLE, 2), 1);
    assert.equal(g.common(L.COMMON_Q_DESCLO, 4), 0x2345_0000);
    assert.equal(g.common(L.COMMON_Q_DESCHI, 4), 1);
    assert.equal(g.readMem(g.structure(1) + L.COMMON_Q_DESCLO, 8), 0x1_2345_0000, "a 64-bit read");
    assert.equal(g.hooks.driverOks, 0);
    assert.equal(g.io.driverOk(), false);

    g.setCommon(L.COMMON_STATUS, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    assert.equal(g.hooks.driverOks, 1);
    assert.equal(g.io.driverOk(), true);
    assert.equal(g.io.negotiatedFeatures(), accepted);
    assert.deepEqual(g.io.queueConfigs(), [
      { index: 0, size: 128, ready: true, descAddr: 0x1_2345_0000, availAddr: 0x1_2345_1000, usedAddr: 0x1_2345_2000 },
      { index: 1, size: 256, ready: false, descAddr: 0, availAddr: 0, usedAddr: 0 },
    ]);
    const snap = g.io.snapshot();
    assert.equal(snap.status, 0x0f);
    assert.equal(snap.resetGeneration, 1);
    assert.equal(snap.queues.length, 2);
    // Writing DRIVER_OK again is no new activation.
    g.setCommon(L.COMMON_STATUS, 1, 0x0f);
    assert.equal(g.hooks.driverOks, 1);
  });

  it("refuses FEATURES_OK for bits not offered, or without VERSION_1", () => {
    const g = new Guest();
    assert.equal(negotiate(g, VERSION_1 | feature(3)) & FEATURES_OK, 0, "bit 3 was not offered");
    assert.equal(negotiate(g, VERSION_1 | feature(40)) & FEATURES_OK, 0, "bit 40 was not offered");
    assert.equal(negotiate(g, feature(2)) & FEATURES_OK, 0, "a modern driver must accept VERSION_1");
    assert.equal(negotiate(g, VERSION_1) & FEATURES_OK, FEATURES_OK);
    // Once FEATURES_OK is latched, the features are fixed.
    g.setCommon(L.COMMON_GFSELECT, 4, 0);
    g.setCommon(L.COMMON_GF, 4, 0x4);
    assert.equal(g.io.negotiatedFeatures(), VERSION_1);
  });

  it("keeps only offered bits in the guest-features register; one unoffered bit refuses FEATURES_OK", () => {
    const g = new Guest();
    const all = (1n << 64n) - 1n;
    assert.equal(negotiate(g, all) & FEATURES_OK, 0, "a driver accepting every bit is refused");
    g.setCommon(L.COMMON_GFSELECT, 4, 0);
    assert.equal(g.common(L.COMMON_GF, 4), OFFERED_LOW, "bits 0-31: the offered ones only");
    g.setCommon(L.COMMON_GFSELECT, 4, 1);
    assert.equal(g.common(L.COMMON_GF, 4), 1, "bits 32-63: VERSION_1 only");
    assert.equal((g.io.negotiatedFeatures() & ~(BigInt(OFFERED_LOW) | VERSION_1)), 0n);
    // Rewriting the offered subset does not clear the refusal: only a reset does.
    g.setCommon(L.COMMON_GFSELECT, 4, 0);
    g.setCommon(L.COMMON_GF, 4, OFFERED_LOW);
    g.setCommon(L.COMMON_STATUS, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert.equal(g.common(L.COMMON_STATUS, 1) & FEATURES_OK, 0);
    assert.equal(negotiate(g, VERSION_1 | feature(2)) & FEATURES_OK, FEATURES_OK, "after a reset, a clean negotiation works");
    // A feature word beyond 63 accepts nothing and taints the negotiation the same way.
    writeFeatureWords(g, [[2, 1], [1, 1]]);
    g.setCommon(L.COMMON_STATUS, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert.equal(g.common(L.COMMON_STATUS, 1) & FEATURES_OK, 0);
  });

  it("refuses DRIVER_OK without FEATURES_OK: nothing is activated", () => {
    const g = new Guest();
    writeFeatureWords(g, [[0, 0xffff_ffff], [1, 0xffff_ffff]]);
    setupQueue(g, 0, 128, 0x1_0000);
    g.setCommon(L.COMMON_STATUS, 1, ACKNOWLEDGE | DRIVER | DRIVER_OK);
    assert.equal(g.common(L.COMMON_STATUS, 1) & DRIVER_OK, 0, "DRIVER_OK not latched");
    assert.equal(g.hooks.driverOks, 0);
    assert.equal(g.io.driverOk(), false);
    // A refused FEATURES_OK in the same write leaves DRIVER_OK refused too.
    g.setCommon(L.COMMON_STATUS, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    assert.equal(g.common(L.COMMON_STATUS, 1) & (FEATURES_OK | DRIVER_OK), 0);
    assert.equal(g.hooks.driverOks, 0);
    // The legacy interface has no FEATURES_OK step: DRIVER_OK alone starts the device.
    const legacy = new Guest();
    legacy.setLegacy(L.LEGACY_STATUS, 1, ACKNOWLEDGE | DRIVER | DRIVER_OK);
    assert.equal(legacy.hooks.driverOks, 1);
  });

  it("accepts only valid queue sizes, and only before the queue is enabled", () => {
    const g = new Guest();
    negotiate(g, VERSION_1);
    g.setCommon(L.COMMON_Q_SELECT, 2, 1);
    for (const bad of [0, 3, 512, 100]) {
      g.setCommon(L.COMMON_Q_SIZE, 2, bad);
      assert.equal(g.common(L.COMMON_Q_SIZE, 2), 256, `size ${bad}`);
    }
    g.setCommon(L.COMMON_Q_SIZE, 2, 1);
    assert.equal(g.common(L.COMMON_Q_SIZE, 2), 1);
    g.setCommon(L.COMMON_Q_SIZE, 2, 64);
    g.setCommon(L.COMMON_Q_ENABLE, 2, 1);
    g.setCommon(L.COMMON_Q_SIZE, 2, 32);
    g.setCommon(L.COMMON_Q_DESCLO, 4, 0x5000);
    assert.equal(g.common(L.COMMON_Q_SIZE, 2), 64, "enabled: size fixed");
    assert.equal(g.common(L.COMMON_Q_DESCLO, 4), 0, "enabled: addresses fixed");
    g.setCommon(L.COMMON_Q_ENABLE, 2, 0);
    assert.equal(g.common(L.COMMON_Q_ENABLE, 2), 1, "disabling takes a reset");
    // A queue that does not exist reads size 0 and ignores writes.
    g.setCommon(L.COMMON_Q_SELECT, 2, 2);
    assert.equal(g.common(L.COMMON_Q_SIZE, 2), 0);
    g.setCommon(L.COMMON_Q_ENABLE, 2, 1);
    assert.equal(g.common(L.COMMON_Q_ENABLE, 2), 0);
    assert.equal(g.common(L.COMMON_Q_MSIX, 2), VIRTIO_MSI_NO_VECTOR);
    // After DRIVER_OK, a queue can no longer be enabled.
    g.setCommon(L.COMMON_STATUS, 1, 0x0f);
    g.setCommon(L.COMMON_Q_SELECT, 2, 0);
    g.setCommon(L.COMMON_Q_ENABLE, 2, 1);
    assert.equal(g.common(L.COMMON_Q_ENABLE, 2), 0);
  });

  it("resets everything when the driver writes status 0", () => {
    const g = new Guest();
    g.enableMsix();
    fullInit(g);
    g.setCommon(L.COMMON_MSIX, 2, 0);
    g.setCommon(L.COMMON_Q_SELECT, 2, 0);
    g.setCommon(L.COMMON_Q_MSIX, 2, 1);
    assert.equal(g.common(L.COMMON_Q_MSIX, 2), 1);
    const gen = g.io.resetGeneration();
    const resets = g.hooks.resets;
    g.setCommon(L.COMMON_STATUS, 1, 0);
    assert.equal(g.hooks.resets, resets + 1);
    assert.equal(g.io.resetGeneration(), gen + 1);
    assert.equal(g.common(L.COMMON_STATUS, 1), 0, "the driver's reset poll sees 0 at once");
    assert.equal(g.io.status(), 0);
    assert.equal(g.io.negotiatedFeatures(), 0n);
    assert.equal(g.common(L.COMMON_MSIX, 2), VIRTIO_MSI_NO_VECTOR);
    assert.equal(g.common(L.COMMON_Q_SELECT, 2), 0);
    assert.equal(g.common(L.COMMON_Q_MSIX, 2), VIRTIO_MSI_NO_VECTOR);
    assert.equal(g.common(L.COMMON_Q_SIZE, 2), 256);
    for (const q of g.io.queueConfigs()) assert.equal(q.ready, false);
    assert.equal(g.io.queueConfigs()[0]!.descAddr, 0);
    assert.equal(g.io.isrPending(), false);
  });

  it("bumps config_generation when the device changes its configuration", () => {
    const g = new Guest();
    assert.equal(g.readMem(g.structure(4), 4), 0x0403_0201);
    assert.equal(g.readMem(g.structure(4) + 22, 2), 0x1817);
    assert.equal(g.readMem(g.structure(4) + 24, 4), 0, "past the config: 0");
    const gen = g.common(L.COMMON_CFGGENERATION, 1);
    g.io.updateDeviceConfig(0, Uint8Array.of(0xaa, 0xbb));
    assert.equal(g.common(L.COMMON_CFGGENERATION, 1), (gen + 1) & 0xff);
    assert.equal(g.readMem(g.structure(4), 2), 0xbbaa);
    assert.deepEqual([...g.io.readDeviceConfig(0, 3)], [0xaa, 0xbb, 3]);
    assert.throws(() => g.io.updateDeviceConfig(23, Uint8Array.of(1, 2)), RangeError);
  });

  it("ignores device config writes unless the machine accepts them", () => {
    const g = new Guest();
    const cfg = g.structure(4);
    g.writeMem(cfg + 20, 1, 0x77);
    assert.equal(g.readMem(cfg + 20, 1), 21);
    g.hooks.acceptConfigWrites = true;
    g.writeMem(cfg + 20, 1, 0x77);
    assert.equal(g.readMem(cfg + 20, 1), 0x77);
    assert.deepEqual(g.hooks.configWrites, ["20:119", "20:119"]);
  });
});

describe("virtio-pci: notifications", () => {
  it("passes notify-region writes that exit to the VMM to kick()", () => {
    const g = new Guest();
    const notify = g.structure(2);
    g.writeMem(notify + 0, 2, 0);
    g.writeMem(notify + 4, 2, 1);
    g.writeMem(notify + 8, 2, 2); // no queue 2
    g.writeMem(notify + 2, 2, 0); // not a queue's address
    assert.deepEqual(g.hooks.kicks, [0, 1]);
    assert.equal(g.readMem(notify, 2), 0);
  });

  it("reports notify addresses when firmware programs the BARs and when the guest moves them", () => {
    const g = new Guest();
    const modern = g.barAddress(4);
    const legacy = g.barAddress(0);
    assert.equal(g.hooks.notify.length, 1, "firmware's programming was reported once");
    const expected = [
      { index: 0, address: modern + 0x3000, pio: false, length: 2 },
      { index: 1, address: modern + 0x3004, pio: false, length: 2 },
      { index: 0, address: legacy + 0x10, pio: true, length: 2, datamatch: 0 },
      { index: 1, address: legacy + 0x10, pio: true, length: 2, datamatch: 1 },
    ];
    assert.deepEqual(g.hooks.notify[0], expected);
    assert.deepEqual(g.dev.notifyAddresses(), expected);

    // Linux's BAR sizing: decode off, all-ones, restore, decode on.
    const command = g.cfgRead(0x04, 2);
    g.cfgWrite(0x04, 2, command & ~3);
    assert.deepEqual(g.hooks.notify[1], [], "nothing decodes");
    g.cfgWrite(0x20, 4, 0xffff_ffff);
    g.cfgWrite(0x24, 4, 0xffff_ffff);
    assert.equal(g.hooks.notify.length, 2, "no change while decoding is off");
    g.cfgWrite(0x20, 4, 0xf000_0000);
    g.cfgWrite(0x24, 4, 0);
    g.cfgWrite(0x04, 2, command);
    assert.deepEqual(g.hooks.notify[2], [
      { index: 0, address: 0xf000_3000, pio: false, length: 2 },
      { index: 1, address: 0xf000_3004, pio: false, length: 2 },
      expected[2],
      expected[3],
    ]);
    // Rewriting the same values reports nothing.
    g.cfgWrite(0x20, 4, 0xf000_0000);
    g.cfgWrite(0x04, 2, command);
    assert.equal(g.hooks.notify.length, 3);
    // Each report also says where notifications arrived before it: what to take out.
    assert.deepEqual(g.hooks.notifyBefore, [[], g.hooks.notify[0], g.hooks.notify[1]]);
    // The moved BAR works.
    g.writeMem(0xf000_3004, 2, 1);
    assert.deepEqual(g.hooks.kicks, [1]);
    // I/O decode off: the legacy entries go.
    g.cfgWrite(0x04, 2, command & ~1);
    assert.deepEqual(g.hooks.notify[3]!.map((n) => n.pio), [false, false]);
  });
});

describe("virtio-pci: legacy interface", () => {
  it("runs the virtio 0.9.5 init sequence through the I/O BAR", () => {
    const g = new Guest();
    g.setLegacy(L.LEGACY_STATUS, 1, 0);
    assert.equal(g.hooks.resets, 1);
    g.setLegacy(L.LEGACY_STATUS, 1, ACKNOWLEDGE | DRIVER);
    assert.equal(g.legacy(L.LEGACY_HOST_FEATURES, 4), OFFERED_LOW, "low 32 bits only: no VERSION_1");
    g.setLegacy(L.LEGACY_GUEST_FEATURES, 4, 0x3000_004c); // bit 3 was not offered
    assert.equal(g.legacy(L.LEGACY_GUEST_FEATURES, 4), 0x3000_0044);
    g.setLegacy(L.LEGACY_QUEUE_SEL, 2, 1);
    assert.equal(g.legacy(L.LEGACY_QUEUE_NUM, 2), 256);
    g.setLegacy(L.LEGACY_QUEUE_PFN, 4, 0x1234);
    assert.equal(g.legacy(L.LEGACY_QUEUE_PFN, 4), 0x1234);
    g.setLegacy(L.LEGACY_QUEUE_SEL, 2, 2);
    assert.equal(g.legacy(L.LEGACY_QUEUE_NUM, 2), 0, "no queue 2");
    g.setLegacy(L.LEGACY_STATUS, 1, ACKNOWLEDGE | DRIVER | DRIVER_OK);
    assert.equal(g.hooks.driverOks, 1);
    assert.equal(g.io.negotiatedFeatures(), 0x3000_0044n);
    const desc = 0x1234 * 4096;
    const avail = desc + 16 * 256;
    // avail ring: flags, idx, 256 entries, used_event = 2 * 259 bytes; then align to 4 KiB.
    const used = Math.ceil((avail + 2 * 259) / 4096) * 4096;
    assert.deepEqual(g.io.queueConfigs()[1], { index: 1, size: 256, ready: true, descAddr: desc, availAddr: avail, usedAddr: used });
    assert.equal(used, desc + 0x2000, "4 KiB of descriptors, the avail ring, then the next page");
    assert.equal(g.io.queueConfigs()[0]!.ready, false);
    // A kick through QUEUE_NOTIFY.
    g.setLegacy(L.LEGACY_QUEUE_NOTIFY, 2, 1);
    g.setLegacy(L.LEGACY_QUEUE_NOTIFY, 2, 7);
    assert.deepEqual(g.hooks.kicks, [1]);
    // PFN 0 tears the queue down.
    g.setLegacy(L.LEGACY_QUEUE_SEL, 2, 1);
    g.setLegacy(L.LEGACY_QUEUE_PFN, 4, 0);
    assert.equal(g.io.queueConfigs()[1]!.ready, false);
  });

  it("moves the device config behind the MSI-X vector registers when MSI-X is on", () => {
    const g = new Guest();
    assert.equal(g.legacy(L.LEGACY_CONFIG_NO_MSIX, 4), 0x0403_0201);
    g.enableMsix();
    assert.equal(g.legacy(L.LEGACY_CONFIG_MSIX, 4), 0x0403_0201);
    g.setLegacy(L.LEGACY_MSI_CONFIG_VECTOR, 2, 0);
    assert.equal(g.legacy(L.LEGACY_MSI_CONFIG_VECTOR, 2), 0);
    g.setLegacy(L.LEGACY_QUEUE_SEL, 2, 1);
    g.setLegacy(L.LEGACY_MSI_QUEUE_VECTOR, 2, 2);
    assert.equal(g.legacy(L.LEGACY_MSI_QUEUE_VECTOR, 2), 2);
    g.setLegacy(L.LEGACY_MSI_QUEUE_VECTOR, 2, 3);
    assert.equal(g.legacy(L.LEGACY_MSI_QUEUE_VECTOR, 2), VIRTIO_MSI_NO_VECTOR, "only vectors 0..2 exist");
    // The same registers as the modern view.
    g.setCommon(L.COMMON_Q_SELECT, 2, 1);
    assert.equal(g.common(L.COMMON_Q_MSIX, 2), VIRTIO_MSI_NO_VECTOR);
  });

  it("reads and clears ISR at offset 0x13", () => {
    const g = new Guest();
    g.setLegacy(L.LEGACY_STATUS, 1, ACKNOWLEDGE | DRIVER | DRIVER_OK);
    assert.deepEqual(g.io.signalUsed(0), { kind: "intx" });
    assert.equal(g.legacy(L.LEGACY_ISR, 1), 1);
    assert.equal(g.legacy(L.LEGACY_ISR, 1), 0);
  });
});

describe("virtio-pci: interrupts", () => {
  it("uses ISR and INTx without MSI-X; reading ISR clears it", () => {
    const g = new Guest();
    fullInit(g);
    const isr = g.structure(3);
    assert.equal(g.io.isrPending(), false);
    assert.deepEqual(g.io.signalUsed(0), { kind: "intx" });
    assert.equal(g.io.isrPending(), true);
    assert.deepEqual(g.io.signalConfigChange(), { kind: "intx" });
    assert.equal(g.readMem(isr, 1), 3, "queue and config bits");
    assert.equal(g.io.isrPending(), false);
    assert.equal(g.readMem(isr, 1), 0);
    // INTx disabled in the command register: ISR is set, nothing asserted.
    g.cfgWrite(0x04, 2, g.cfgRead(0x04, 2) | 0x400);
    assert.deepEqual(g.io.signalUsed(0), { kind: "none" });
    assert.equal(g.io.isrPending(), true);
    assert.deepEqual(g.io.signalUsed(5), { kind: "none" }, "no queue 5");
  });

  it("raises nothing before DRIVER_OK or for a stale generation", () => {
    const g = new Guest();
    negotiate(g, VERSION_1);
    assert.deepEqual(g.io.signalUsed(0), { kind: "none" });
    assert.equal(g.io.isrPending(), false);
    g.setCommon(L.COMMON_STATUS, 1, 0x0f);
    const gen = g.io.resetGeneration();
    assert.deepEqual(g.io.signalUsed(0, gen), { kind: "intx" });
    assert.deepEqual(g.io.signalUsed(0, gen - 1), { kind: "none" });
  });

  it("sends MSI-X messages, holds them while masked and releases them on unmask", () => {
    const g = new Guest();
    fullInit(g);
    g.setCommon(L.COMMON_Q_SELECT, 2, 0);
    g.setCommon(L.COMMON_Q_MSIX, 2, 1);
    g.setCommon(L.COMMON_MSIX, 2, 0);
    assert.equal(g.common(L.COMMON_Q_MSIX, 2), 1);
    g.setCommon(L.COMMON_Q_MSIX, 2, 9);
    assert.equal(g.common(L.COMMON_Q_MSIX, 2), VIRTIO_MSI_NO_VECTOR, "the table has 3 entries");
    g.setCommon(L.COMMON_Q_MSIX, 2, 1);
    // Program entries 0 and 1 (they come out of reset masked).
    for (const v of [0, 1]) {
      const e = g.msixEntry(v);
      assert.equal(g.readMem(e + 12, 4), 1, "masked at reset");
      g.writeMem(e, 4, 0xfee0_1000);
      g.writeMem(e + 4, 4, 0);
      g.writeMem(e + 8, 4, 0x4020 + v);
    }
    assert.equal(g.readMem(g.msixEntry(1) + 8, 4), 0x4021);
    const changes = g.hooks.msixChanges;
    g.enableMsix();
    assert.ok(g.hooks.msixChanges > changes);
    assert.equal(g.io.msixEnabled(), true);

    // Masked: pending bit, no message, no ISR.
    assert.deepEqual(g.io.signalUsed(0), { kind: "none" });
    assert.equal(g.readMem(g.msixPba(), 8), 0b010);
    assert.equal(g.io.isrPending(), false, "ISR is not used with MSI-X");
    assert.deepEqual(g.hooks.unmasked, []);
    g.writeMem(g.msixEntry(1) + 12, 4, 0); // unmask
    assert.deepEqual(g.hooks.unmasked, [{ vector: 1, message: { address: 0xfee0_1000, data: 0x4021 } }]);
    assert.equal(g.readMem(g.msixPba(), 8), 0);

    // Unmasked: a message.
    assert.deepEqual(g.io.signalUsed(0), { kind: "msix", vector: 1, address: 0xfee0_1000, data: 0x4021 });
    // Vector 0 is still masked: the config change is held.
    assert.deepEqual(g.io.signalConfigChange(), { kind: "none" });
    assert.equal(g.readMem(g.msixPba(), 1), 0b001);

    // Function mask holds everything; clearing it releases what is pending and unmasked.
    g.enableMsix(true, true);
    assert.deepEqual(g.io.signalUsed(0), { kind: "none" });
    assert.equal(g.readMem(g.msixPba(), 1), 0b011);
    g.enableMsix(true, false);
    assert.deepEqual(g.hooks.unmasked.slice(1), [{ vector: 1, message: { address: 0xfee0_1000, data: 0x4021 } }]);
    assert.equal(g.readMem(g.msixPba(), 1), 0b001, "vector 0 is still masked");

    // NO_VECTOR: nothing at all.
    g.setCommon(L.COMMON_Q_MSIX, 2, VIRTIO_MSI_NO_VECTOR);
    assert.deepEqual(g.io.signalUsed(0), { kind: "none" });
    // PBA writes are ignored; vector control keeps only the mask bit.
    g.writeMem(g.msixPba(), 4, 0);
    assert.equal(g.readMem(g.msixPba(), 1), 0b001);
    g.writeMem(g.msixEntry(2) + 12, 4, 0xffff_ffff);
    assert.equal(g.readMem(g.msixEntry(2) + 12, 4), 1);
    // MSI-X off again: back to INTx.
    g.enableMsix(false);
    assert.deepEqual(g.io.signalUsed(0), { kind: "intx" });
  });

  it("sets DEVICE_NEEDS_RESET and sends a config interrupt", () => {
    const g = new Guest();
    fullInit(g);
    assert.deepEqual(g.io.setNeedsReset(), { kind: "intx" });
    assert.equal(g.common(L.COMMON_STATUS, 1), 0x0f | DEVICE_NEEDS_RESET);
    assert.equal(g.readMem(g.structure(3), 1), 2, "config change");
    g.setCommon(L.COMMON_STATUS, 1, 0x0f);
    assert.equal(g.common(L.COMMON_STATUS, 1) & DEVICE_NEEDS_RESET, DEVICE_NEEDS_RESET, "the driver cannot clear it");
    g.setCommon(L.COMMON_STATUS, 1, 0);
    assert.equal(g.common(L.COMMON_STATUS, 1), 0, "a reset does");
  });
});

describe("virtio-pci: construction", () => {
  it("refuses impossible devices", () => {
    assert.throws(() => VirtioPciTransport.createState(blkInfo({ queueCount: 0 })), RangeError);
    assert.throws(() => VirtioPciTransport.createState(blkInfo({ queueCount: 128 })), RangeError);
    assert.throws(() => VirtioPciTransport.createState(blkInfo({ maxQueueSize: 100 })), RangeError);
    assert.throws(() => VirtioPciTransport.createState(blkInfo({ deviceType: 0 })), RangeError);
  });

  it("rebuilds from posted buffers alone", () => {
    const g = new Guest();
    fullInit(g);
    const posted = structuredClone(g.state);
    const io = new VirtioPciDeviceSide(posted);
    assert.equal(io.queueCount, 2);
    assert.equal(io.deviceType, 2);
    assert.equal(io.queueConfigs()[0]!.size, 128);
    const other = new VirtioPciTransport(posted, new RecordingHooks());
    assert.deepEqual(other.bars(), g.dev.bars());
  });
});
