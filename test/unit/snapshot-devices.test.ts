/**
 * What snapshots need of the device side, over fake guest memory: a virtqueue's positions
 * saved and resumed, chains given back, a virtio-net device quiescing with RX buffers held
 * and a TX frame blocked, and the machine-state encoding of device buffers.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { GuestMemory } from "../../src/memory/guest-memory";
import { VirtioFeatureBit, feature } from "../../src/devices/virtio/types";
import { DescriptorChain, Virtqueue } from "../../src/devices/virtio/queue";
import { VirtioNet } from "../../src/devices/virtio/net/device";
import type { NetBackend } from "../../src/devices/virtio/net/backend";
import { Reader, SnapshotError } from "../../src/vmm/snapshot/format";
import { decodeDevices, decodeMachine, encodeDevices, encodeMachine, restoreBuffers, type SavedMachine } from "../../src/vmm/snapshot/machine-state";
import { VirtqDriver } from "../helpers/virtq-driver";

const RAM = 4 * 1024 * 1024;
const V1 = feature(VirtioFeatureBit.VERSION_1);
const EVENT_IDX = feature(VirtioFeatureBit.RING_EVENT_IDX);

test("a virtqueue resumed from its saved positions goes on where it was, its rings untouched", () => {
  const mem = GuestMemory.forTest(RAM);
  const drv = new VirtqDriver(mem, { size: 8 });
  const q = Virtqueue.create(mem, drv.config(), V1 | EVENT_IDX);
  for (let i = 0; i < 5; i++) drv.add([drv.writable(16)]);
  const chain = new DescriptorChain(mem);
  for (let i = 0; i < 3; i++) {
    const c = q.pop(chain)!;
    q.addUsed(c.head, 16);
  }
  assert.equal(q.needsNotification(), true);
  const saved = q.state();
  assert.deepEqual(saved, { nextAvail: 3, nextUsed: 3, signalled: 3, usedFlags: 0 });
  const ringsBefore = mem.slice(drv.descAddr, 0x4000).slice();
  // A new queue object over the same rings (a restored VM's), from the saved positions.
  const resumed = Virtqueue.create(mem, drv.config(), V1 | EVENT_IDX, saved);
  assert.deepEqual(mem.slice(drv.descAddr, 0x4000), ringsBefore, "resuming wrote to the rings");
  assert.equal(resumed.pending(), 2);
  const c = resumed.pop(chain)!;
  resumed.addUsed(c.head, 16);
  // The driver asks to hear of the next used entry: the resumed queue knows what it signalled.
  drv.setUsedEvent(3);
  assert.equal(resumed.needsNotification(), true);
  assert.equal(drv.usedIdx(), 4);
  // A fresh queue (a device reset) starts over at 0.
  assert.equal(Virtqueue.create(mem, drv.config(), V1 | EVENT_IDX).lastAvailIndex, 0);
});

test("chains given back are popped again, in order; only popped, unused chains can be", () => {
  const mem = GuestMemory.forTest(RAM);
  const drv = new VirtqDriver(mem, { size: 8 });
  const q = Virtqueue.create(mem, drv.config(), V1);
  const heads = [drv.add([drv.writable(8)]), drv.add([drv.writable(8)]), drv.add([drv.writable(8)])];
  const a = new DescriptorChain(mem);
  q.pop(a);
  q.addUsed(a.head, 0);
  q.pop(a);
  q.pop(a);
  assert.throws(() => q.unpop(3), RangeError);
  q.unpop(2);
  assert.equal(q.state().nextAvail, 1);
  assert.equal(q.pop(a)!.head, heads[1]);
  assert.equal(q.pop(a)!.head, heads[2]);
});

/** A back end with nothing to read and writes that would block, for quiescing tests. */
function fakeBackend(blocked: boolean): NetBackend & { frames: Uint8Array[] } {
  const frames: Uint8Array[] = [];
  return {
    name: "fake",
    fd: 99,
    frames,
    read: () => 0,
    write: (frame: Uint8Array, length: number): number => {
      if (blocked) return 0;
      frames.push(frame.slice(0, length));
      return length;
    },
    setVnetHeaderSize: () => undefined,
    setOffload: () => undefined,
  };
}

test("virtio-net quiesces: a blocked TX frame goes back to its ring, and is sent after the restore", () => {
  const mem = GuestMemory.forTest(RAM);
  const rx = new VirtqDriver(mem, { size: 8, index: 0, ringBase: 0x10000, dataBase: 0x100000, dataEnd: 0x200000 });
  const tx = new VirtqDriver(mem, { size: 8, index: 1, ringBase: 0x20000, dataBase: 0x200000, dataEnd: 0x300000 });
  const net = new VirtioNet(fakeBackend(true), { offloads: false });
  const signals: number[] = [];
  const ctx = { memory: mem, features: V1, queues: [rx.config(), tx.config()], signalUsed: (q: number) => signals.push(q), needsReset: (r: string) => assert.fail(r) };
  net.activate(ctx);
  const frame = new Uint8Array(12 + 60).fill(7);
  tx.add([tx.readable(frame)]);
  net.queueNotified(1);
  assert.equal(tx.usedIdx(), 0, "the frame is blocked in the back end");
  net.quiesce();
  const states = net.queueStates();
  assert.deepEqual(states[1], { nextAvail: 0, nextUsed: 0, signalled: -1, usedFlags: states[1]!.usedFlags });
  // The restored device, on a back end that takes the frame now.
  const backend2 = fakeBackend(false);
  const restored = new VirtioNet(backend2, { offloads: false });
  restored.activate({ ...ctx, queueStates: states });
  restored.queueNotified(1);
  assert.equal(backend2.frames.length, 1);
  assert.equal(tx.usedIdx(), 1);
});

const machine: SavedMachine = {
  memoryBytes: 256 << 20,
  cpus: 2,
  cpuTemplate: "emulated",
  hideFeatures: ["avx2"],
  irqchip: true,
  rng: true,
  bootDescription: "ELF vmlinux, PVH entry at 0x1000000",
  cmdline: "console=ttyS0",
  disks: [{ path: "/t.img", readOnly: false, serial: "tskvm-123", detached: true, identity: { path: "/t.img", size: 1 << 20, mtimeNs: "1700000000000000000", ino: "12", dev: "2049" } }],
  nics: [
    { kind: "tap", tap: "tap0", mac: "52:54:00:12:34:56", hostCidr: "192.168.100.1/24" },
    { kind: "stream", name: "passt", mac: "52:54:00:ab:cd:ef" },
  ],
  shares: [{ tag: "src" }],
};

test("the machine's configuration and device state survive their JSON", () => {
  const r = new Reader("/snap", "test");
  assert.deepEqual(decodeMachine(r, JSON.parse(JSON.stringify(encodeMachine(machine)))), machine);
  const devices = {
    buffers: new Map([["com1", Uint8Array.of(1, 2, 3)], ["cmos", new Uint8Array(0)]]),
    queues: [[{ nextAvail: 5, nextUsed: 4, signalled: -1, usedFlags: 1 }, undefined], undefined],
  };
  assert.deepEqual(decodeDevices(r, JSON.parse(JSON.stringify(encodeDevices(devices)))), devices);
  assert.throws(() => decodeMachine(r, { ...(encodeMachine(machine) as object), cpus: 0 }), /machine.cpus is not an integer/);
  assert.throws(() => decodeMachine(r, { ...(encodeMachine(machine) as object), nics: [{ tap: "t", mac: "zz" }] }), /is not a MAC address/);
  // A snapshot from before virtio-rng had none.
  const { rng: _, ...older } = encodeMachine(machine) as { rng: boolean };
  assert.equal(decodeMachine(r, older).rng, false);
  // Snapshots from before shares and stream NICs were saved: no shares, every NIC a TAP.
  const { shares: __, ...noShares } = encodeMachine(machine) as { shares: unknown };
  const old = decodeMachine(r, { ...noShares, nics: [{ tap: "tap0", mac: "52:54:00:12:34:56" }] });
  assert.deepEqual(old.shares, []);
  assert.deepEqual(old.nics, [{ kind: "tap", tap: "tap0", mac: "52:54:00:12:34:56" }]);
  assert.throws(() => decodeMachine(r, { ...(encodeMachine(machine) as object), nics: [{ kind: "vde", mac: "52:54:00:12:34:56" }] }), /is not tap or stream/);
});

test("device buffers go back only into a machine with the same devices, the same sizes", () => {
  const fresh = (): [string, SharedArrayBuffer][] => [["com1", new SharedArrayBuffer(4)], ["cmos", new SharedArrayBuffer(8)]];
  const f = fresh();
  restoreBuffers("/snap", new Map([["com1", Uint8Array.of(1, 2, 3, 4)], ["cmos", new Uint8Array(8).fill(9)]]), f);
  assert.deepEqual([...new Uint8Array(f[0]![1])], [1, 2, 3, 4]);
  const refused = (saved: Map<string, Uint8Array>, pattern: RegExp) =>
    assert.throws(() => restoreBuffers("/snap", saved, fresh()), (e: unknown) => e instanceof SnapshotError && e.kind === "corrupted" && pattern.test(e.message));
  refused(new Map([["com1", new Uint8Array(4)]]), /no state for device cmos/);
  refused(new Map([["com1", new Uint8Array(4)], ["cmos", new Uint8Array(8)], ["pci-1-virtio", new Uint8Array(4)]]), /state for a device this machine lacks \(pci-1-virtio\)/);
  refused(new Map([["com1", new Uint8Array(5)], ["cmos", new Uint8Array(8)]]), /device com1 has 5 bytes of state, this machine's has 4/);
});
