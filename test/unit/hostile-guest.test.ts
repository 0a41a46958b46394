/**
 * A hostile guest against the machine's side of the virtio transport: every KVM call a guest
 * register access can trigger (ioeventfd, KVM_SIGNAL_MSI, eventfd writes) fails somewhere,
 * and each failure breaks at most that device or falls back to exits, never the VMM, and
 * leaves nothing registered behind.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { closeSync, openSync } from "node:fs";
import { createDeviceSetSpec, instantiateDevices, moveIoeventfds, type IoeventfdRegistrar } from "../../src/board/devices";
import type { VirtioFunctionSpec } from "../../src/board/virtio-devices";
import { GuestMemory } from "../../src/memory/guest-memory";
import { VirtioPciTransport, VirtioPciDeviceSide, type NotifyAddress } from "../../src/devices/virtio/pci-transport";
import { VirtioDeviceRunner } from "../../src/devices/virtio/runner";
import { feature, VirtioFeatureBit, VirtioStatus, type VirtioActivation, type VirtioDevice } from "../../src/devices/virtio/types";
import * as L from "../../src/devices/virtio/transport-layout";
import type { PciFunction } from "../../src/devices/pci/types";

const MiB = 1024 * 1024;

/**
 * KVM's ioeventfd table as kvm/eventfd.c keeps it: one registration per (bus, address,
 * length, datamatch), a wildcard colliding with any datamatch; EEXIST for a collision,
 * ENOENT for a deassignment that names no registration of that eventfd.
 */
class FakeIoeventfds implements IoeventfdRegistrar {
  readonly table: { fd: number; address: number; pio: boolean; length: number; datamatch: number | undefined }[] = [];
  calls = 0;

  ioeventfd(fd: number, address: number, opts: { length?: number; pio?: boolean; datamatch?: number; deassign?: boolean } = {}): void {
    this.calls++;
    const pio = opts.pio === true;
    const length = opts.length ?? 0;
    const same = (e: (typeof this.table)[number]) => e.address === address && e.pio === pio && e.length === length;
    if (opts.deassign === true) {
      const at = this.table.findIndex((e) => same(e) && e.fd === fd && e.datamatch === opts.datamatch);
      if (at < 0) throw new Error("ioctl KVM_IOEVENTFD: ENOENT (No such file or directory)");
      this.table.splice(at, 1);
      return;
    }
    if (this.table.some((e) => same(e) && (e.datamatch === undefined || opts.datamatch === undefined || e.datamatch === opts.datamatch))) {
      throw new Error("ioctl KVM_IOEVENTFD: EEXIST (File exists)");
    }
    this.table.push({ fd, address, pio, length, datamatch: opts.datamatch });
  }

  of(fds: readonly number[]): string[] {
    return this.table.filter((e) => fds.includes(e.fd)).map((e) => `${e.fd}@${e.pio ? "pio" : "mmio"}:${e.address.toString(16)}${e.datamatch !== undefined ? `=${e.datamatch}` : ""}`);
  }
}

/** Where a two-queue function's notifications arrive with its modern BAR at `modern` and legacy BAR at `legacy`. */
function addresses(modern: number | undefined, legacy: number | undefined): NotifyAddress[] {
  const out: NotifyAddress[] = [];
  for (const q of [0, 1]) if (modern !== undefined) out.push({ index: q, address: modern + 0x3000 + 4 * q, pio: false, length: 2 });
  for (const q of [0, 1]) if (legacy !== undefined) out.push({ index: q, address: legacy + 0x10, pio: true, length: 2, datamatch: q });
  return out;
}

describe("ioeventfd registrations under a hostile guest", () => {
  const A = [10, 11];
  const B = [20, 21];

  it("registers every queue at both the modern notify address and legacy QUEUE_NOTIFY", () => {
    const kvm = new FakeIoeventfds();
    assert.equal(moveIoeventfds(kvm, A, addresses(0xe000_0000, 0xc000), []), undefined);
    assert.deepEqual(kvm.of(A), ["10@mmio:e0003000", "11@mmio:e0003004", "10@pio:c010=0", "11@pio:c010=1"]);
  });

  it("a BAR moved onto another function's notify address falls back to exits; nothing of it stays registered", () => {
    const kvm = new FakeIoeventfds();
    moveIoeventfds(kvm, A, addresses(0xe000_0000, 0xc000), []);
    const bBefore = addresses(0xe100_0000, 0xc040);
    moveIoeventfds(kvm, B, bBefore, []);
    const aTable = kvm.of(A);

    // B's modern BAR onto A's: its first queue collides.
    const bOnA = addresses(0xe000_0000, 0xc040);
    const failure = moveIoeventfds(kvm, B, bOnA, bBefore);
    assert.match(failure ?? "", /^queue notifications at address 0xe0003000 cannot be caught in the kernel \(.*EEXIST.*\); they take exits instead$/);
    assert.deepEqual(kvm.of(B), [], "what this call had registered is undone");
    assert.deepEqual(kvm.of(A), aTable, "A keeps its registrations");

    // B's legacy BAR onto A's (the same port, the same datamatch values) likewise.
    const bLegacyOnA = addresses(0xe100_0000, 0xc000);
    assert.match(moveIoeventfds(kvm, B, bLegacyOnA, bOnA) ?? "", /port 0xc010 .*EEXIST/);
    assert.deepEqual(kvm.of(B), []);
    assert.deepEqual(kvm.of(A), aTable);

    // B moves away again: it gets its eventfds back; the stale "before" names nobody else's.
    assert.equal(moveIoeventfds(kvm, B, bBefore, bLegacyOnA), undefined);
    assert.deepEqual(kvm.of(B), ["20@mmio:e1003000", "21@mmio:e1003004", "20@pio:c050=0", "21@pio:c050=1"]);
    assert.deepEqual(kvm.of(A), aTable);
  });
});

// ---- The board's hooks, over a VM fd on which every KVM call fails ----

function blkFunction(name: string, device: number, kickFds: number[]): VirtioFunctionSpec {
  const transport = VirtioPciTransport.createState({ deviceType: 2, queueCount: 2, maxQueueSize: 256, deviceFeatures: feature(2), config: new Uint8Array(8) });
  return {
    name,
    slot: { device, intxPin: 0, gsi: 16 },
    device: { kind: "virtio-blk", disk: { fd: -1, sizeBytes: 0, readOnly: true, path: "none", serial: name, engine: "sync" } },
    transport,
    kickFds,
    intxFd: -1,
    resampleFd: -1,
  };
}

function le(v: number, size: number): Uint8Array {
  const d = new Uint8Array(size);
  for (let i = 0; i < size; i++) d[i] = (v >>> (8 * i)) & 0xff;
  return d;
}

describe("the machine's virtio hooks contain failing KVM calls", () => {
  it("ioeventfd, MSI and kick failures become warnings; the vCPU's access completes", () => {
    // /dev/null as the VM fd: every KVM ioctl fails (ENOTTY); closed fds as kick eventfds.
    const vmFd = openSync("/dev/null", "r+");
    const dead = openSync("/dev/null", "r");
    closeSync(dead);
    try {
      const memory = GuestMemory.forTest(16 * MiB);
      const spec = createDeviceSetSpec({ memory, cpus: 1, virtio: [blkFunction("virtio-blk vda", 1, [dead, dead]), blkFunction("virtio-blk vdb", 2, [dead, dead])] });
      const warnings: string[] = [];
      const devices = instantiateDevices(spec, {
        vmFd,
        consoleFd: -1,
        memory,
        control: { requestReset: () => assert.fail("no reset"), guestPanicked: () => assert.fail("no panic") },
        warn: (m) => warnings.push(m),
      });
      // Firmware's assignment registers ioeventfds: each function warns once and goes on.
      devices.pci!.assignResources();
      assert.equal(warnings.length, 2, warnings.join("\n"));
      assert.match(warnings[0]!, /^virtio-blk vda: queue notifications at address 0x[0-9a-f]+ cannot be caught in the kernel \(.*\); they take exits instead$/);

      // The guest moves vdb's modern BAR onto vda's: a warning, no exception.
      const vda = devices.pci!.function(1) as PciFunction & VirtioPciTransport;
      const vdb = devices.pci!.function(2) as PciFunction & VirtioPciTransport;
      const vdaModern = vda.bars().find((b) => b.index === L.MODERN_BAR)!.address;
      vdb.configWrite(0x10 + 4 * L.MODERN_BAR, le(vdaModern % 2 ** 32, 4));
      vdb.configWrite(0x14 + 4 * L.MODERN_BAR, le(Math.floor(vdaModern / 2 ** 32), 4));
      assert.equal(warnings.length, 3);
      assert.match(warnings[2]!, /^virtio-blk vdb: /);

      // A kick that exits to the VMM goes to a (here: closed) eventfd.
      vda.barWrite(L.MODERN_BAR, L.NOTIFY_CFG_OFFSET, le(0, 2));
      assert.match(warnings[3] ?? "", /^virtio-blk vda: the kick of queue 0 failed \(.*\); the device carries on without it$/);

      // An MSI-X vector released on unmask: KVM_SIGNAL_MSI fails.
      const io = new VirtioPciDeviceSide(spec.pci!.functions[0]!.transport);
      const common = (off: number, size: number, v: number) => vda.barWrite(L.MODERN_BAR, L.COMMON_CFG_OFFSET + off, le(v, size));
      const { ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK } = VirtioStatus;
      common(L.COMMON_STATUS, 1, ACKNOWLEDGE | DRIVER);
      common(L.COMMON_GFSELECT, 4, 1);
      common(L.COMMON_GF, 4, 1);
      common(L.COMMON_STATUS, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK);
      common(L.COMMON_Q_SELECT, 2, 0);
      common(L.COMMON_Q_MSIX, 2, 0);
      common(L.COMMON_Q_ENABLE, 2, 1);
      common(L.COMMON_STATUS, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
      assert.equal(io.driverOk(), true);
      vda.configWrite(vda.regs.msixCap + 2, le(0x8000, 2)); // MSI-X enable; entries start masked
      assert.equal(io.signalUsed(0).kind, "none", "held while masked");
      vda.barWrite(L.MSIX_BAR, L.MSIX_TABLE_OFFSET + 12, le(0, 4)); // unmask vector 0
      assert.match(warnings.at(-1) ?? "", /^virtio-blk vda: MSI-X vector 0 failed \(.*\); the device carries on without it$/);
    } finally {
      closeSync(vmFd);
    }
  });
});

// ---- The I/O worker's runner ----

class ThrowingDevice implements VirtioDevice {
  readonly deviceType = 2;
  readonly queueCount = 2;
  readonly maxQueueSize = 256;
  readonly deviceFeatures = 0n;
  readonly config = new Uint8Array(8);
  activations = 0;
  notified = 0;
  resets = 0;
  throwOnNotify = true;
  activate(_ctx: VirtioActivation): void {
    this.activations++;
  }
  queueNotified(): void {
    this.notified++;
    if (this.throwOnNotify) throw new Error("something the model did not expect");
  }
  reset(): void {
    this.resets++;
  }
  quiesce(): void {}
  queueStates() {
    return [];
  }
}

describe("the I/O worker's runner under a failing device or interrupt", () => {
  function started() {
    const state = VirtioPciTransport.createState({ deviceType: 2, queueCount: 2, maxQueueSize: 256, deviceFeatures: 0n, config: new Uint8Array(8) });
    const dev = new VirtioPciTransport(state, { kick: () => {}, reset: () => {}, driverOk: () => {}, notifyAddressChanged: () => {}, msixUnmasked: () => {} });
    const common = (off: number, size: number, v: number) => dev.barWrite(L.MODERN_BAR, L.COMMON_CFG_OFFSET + off, le(v, size));
    const start = () => {
      const { ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK } = VirtioStatus;
      common(L.COMMON_STATUS, 1, 0);
      common(L.COMMON_STATUS, 1, ACKNOWLEDGE | DRIVER);
      common(L.COMMON_GFSELECT, 4, 1);
      common(L.COMMON_GF, 4, Number(feature(VirtioFeatureBit.VERSION_1) >> 32n));
      common(L.COMMON_STATUS, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    };
    start();
    const model = new ThrowingDevice();
    const warnings: string[] = [];
    let intxCalls = 0;
    const runner = new VirtioDeviceRunner(
      "virtio-blk vda",
      new VirtioPciDeviceSide(state),
      model,
      GuestMemory.forTest(MiB),
      {
        msi: () => {
          throw new Error("ioctl KVM_SIGNAL_MSI: EPERM");
        },
        intx: () => {
          intxCalls++;
          throw new Error("write: EBADF");
        },
      },
      { warn: (m) => warnings.push(m) },
    );
    runner.sync();
    return { runner, model, warnings, io: new VirtioPciDeviceSide(state), start, intxCalls: () => intxCalls };
  }

  it("a device model that throws breaks that device (DEVICE_NEEDS_RESET) until its driver resets it", () => {
    const t = started();
    assert.equal(t.model.activations, 1);
    t.runner.kicked(0);
    assert.equal(t.warnings.length, 2, t.warnings.join("\n"));
    assert.match(t.warnings[0]!, /^virtio-blk vda: something the model did not expect; the device needs a reset by its driver$/);
    assert.match(t.warnings[1]!, /^virtio-blk vda: an interrupt could not be delivered \(write: EBADF\); the device carries on$/, "the config interrupt (INTx: no MSI-X)");
    assert.notEqual(t.io.snapshot().status & VirtioStatus.DEVICE_NEEDS_RESET, 0);
    assert.equal(t.model.resets, 1);
    t.runner.kicked(0);
    t.runner.kicked(1);
    t.runner.resampled();
    assert.equal(t.model.notified, 1, "set aside: no more kicks reach it");
    assert.equal(t.warnings.length, 2, "an interrupt failure is said once");
    // The driver resets and starts it again.
    t.model.throwOnNotify = false;
    t.start();
    t.runner.sync();
    assert.equal(t.model.activations, 2);
    t.runner.kicked(0);
    assert.equal(t.model.notified, 2);
  });
});
