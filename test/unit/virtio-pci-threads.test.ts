/**
 * The virtio-pci transport's state is driven from several threads at once: vCPU workers
 * (register accesses) and the I/O worker (interrupt decisions). These tests run real
 * worker_threads over the same SharedArrayBuffers and check that nothing is lost or torn.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { Worker } from "node:worker_threads";
import { VirtioPciTransport, VirtioPciDeviceSide, type VirtioPciState } from "../../src/devices/virtio/pci-transport";
import { PCI_COMMAND, PCI_COMMAND_MEMORY } from "../../src/devices/pci/config-space";
import * as L from "../../src/devices/virtio/transport-layout";
import { feature, VirtioFeatureBit } from "../../src/devices/virtio/types";

const noHooks = {
  kick: () => {},
  reset: () => {},
  driverOk: () => {},
  notifyAddressChanged: () => {},
  msixUnmasked: () => {},
};

function makeState(): VirtioPciState {
  return VirtioPciTransport.createState({
    deviceType: 2,
    queueCount: 2,
    maxQueueSize: 256,
    deviceFeatures: feature(2),
    config: new Uint8Array(8),
  });
}

function write(dev: VirtioPciTransport, bar: number, offset: number, size: number, value: number): void {
  const d = new Uint8Array(size);
  for (let i = 0; i < size; i++) d[i] = (value >>> (8 * i)) & 0xff;
  dev.barWrite(bar, offset, d);
}

/** Each worker owns one vector: mask it, signal (held), unmask (released once), signal (sent). */
const MSIX_WORKER = `
const { workerData } = require("node:worker_threads");
const { VirtioPciTransport, VirtioPciDeviceSide } = require(workerData.modulePath);
const { state, control, results, tid, rounds } = workerData;
const ctl = new Int32Array(control);
const out = new Int32Array(results);
const vector = tid; // queue tid uses vector tid
let released = 0;
let lastMessage = null;
const hooks = {
  kick() {}, reset() {}, driverOk() {}, notifyAddressChanged() {},
  msixUnmasked(v, message) { if (v === vector) { released++; lastMessage = message; } else out[tid * 4 + 3]++; },
};
const dev = new VirtioPciTransport(state, hooks);
const io = new VirtioPciDeviceSide(state);
const ctrl = vector * 16 + 12;
const masked = Uint8Array.of(1, 0, 0, 0);
const unmasked = Uint8Array.of(0, 0, 0, 0);
Atomics.add(ctl, 1, 1);
while (Atomics.load(ctl, 0) === 0) Atomics.wait(ctl, 0, 0, 100);
let bad = 0;
for (let k = 0; k < rounds; k++) {
  dev.barWrite(1, ctrl, masked);
  if (io.signalUsed(tid).kind !== "none") bad++;
  const before = released;
  dev.barWrite(1, ctrl, unmasked);
  if (released !== before + 1 || lastMessage.data !== 0x4000 + vector) bad++;
  const d = io.signalUsed(tid);
  if (d.kind !== "msix" || d.data !== 0x4000 + vector) bad++;
}
out[tid * 4] = bad;
out[tid * 4 + 1] = released;
Atomics.add(ctl, 2, 1);
`;

/** A vCPU thread initialising the device through the modern BAR. */
const INIT_WORKER = `
const { workerData } = require("node:worker_threads");
const { VirtioPciTransport } = require(workerData.modulePath);
const { state, L, control } = workerData;
const ctl = new Int32Array(control);
const dev = new VirtioPciTransport(state, {
  kick() {}, reset() {}, notifyAddressChanged() {}, msixUnmasked() {},
  driverOk() { Atomics.add(ctl, 0, 1); },
});
function w(off, size, v) {
  const d = new Uint8Array(size);
  for (let i = 0; i < size; i++) d[i] = (v >>> (8 * i)) & 0xff;
  dev.barWrite(4, off, d);
}
w(L.COMMON_STATUS, 1, 0);
w(L.COMMON_STATUS, 1, 3);
w(L.COMMON_GFSELECT, 4, 0); w(L.COMMON_GF, 4, 4);
w(L.COMMON_GFSELECT, 4, 1); w(L.COMMON_GF, 4, 1);
w(L.COMMON_STATUS, 1, 11);
w(L.COMMON_Q_SELECT, 2, 1);
w(L.COMMON_Q_SIZE, 2, 64);
w(L.COMMON_Q_DESCLO, 4, 0x10000); w(L.COMMON_Q_AVAILLO, 4, 0x11000); w(L.COMMON_Q_USEDLO, 4, 0x12000);
w(L.COMMON_Q_ENABLE, 2, 1);
w(L.COMMON_STATUS, 1, 15);
`;

function startWorker(source: string, workerData: Record<string, unknown>): Worker {
  const w = new Worker(source, {
    eval: true,
    workerData: { modulePath: require.resolve("../../src/devices/virtio/pci-transport"), ...workerData },
  });
  w.on("error", (e) => assert.fail(e));
  return w;
}

const exited = (w: Worker): Promise<unknown> => new Promise((r) => w.once("exit", r));

describe("virtio-pci shared between threads", () => {
  it("loses no MSI-X pending bit when two threads mask, signal and unmask at once", async () => {
    const ROUNDS = 20_000;
    const state = makeState();
    const dev = new VirtioPciTransport(state, noHooks);
    // Program the table (data 0x4000 + vector), route queue q to vector q, enable MSI-X,
    // and run the driver so that signals are raised.
    for (const v of [0, 1]) {
      write(dev, L.MSIX_BAR, v * 16, 4, 0xfee0_0000);
      write(dev, L.MSIX_BAR, v * 16 + 8, 4, 0x4000 + v);
    }
    const msix = dev.regs.msixCap;
    dev.configWrite(msix + 2, Uint8Array.of(0, 0x80));
    for (const q of [0, 1]) {
      write(dev, L.MODERN_BAR, L.COMMON_Q_SELECT, 2, q);
      write(dev, L.MODERN_BAR, L.COMMON_Q_MSIX, 2, q);
    }
    // A modern driver accepts VERSION_1 before FEATURES_OK, without which DRIVER_OK is refused.
    write(dev, L.MODERN_BAR, L.COMMON_GFSELECT, 4, 1);
    write(dev, L.MODERN_BAR, L.COMMON_GF, 4, 1);
    write(dev, L.MODERN_BAR, L.COMMON_STATUS, 1, 0x0f);

    const control = new Int32Array(new SharedArrayBuffer(16)); // go, ready, done
    const results = new Int32Array(new SharedArrayBuffer(4 * 8));
    const workers = [0, 1].map((tid) =>
      startWorker(MSIX_WORKER, { state, control: control.buffer, results: results.buffer, tid, rounds: ROUNDS }),
    );
    const deadline = Date.now() + 30_000;
    while (Atomics.load(control, 1) < 2) {
      assert.ok(Date.now() < deadline, "workers did not start");
      await new Promise((r) => setTimeout(r, 5));
    }
    Atomics.store(control, 0, 1);
    Atomics.notify(control, 0);
    await Promise.all(workers.map(exited));
    assert.equal(Atomics.load(control, 2), 2);
    for (const tid of [0, 1]) {
      assert.equal(results[tid * 4], 0, `thread ${tid}: wrong deliveries`);
      assert.equal(results[tid * 4 + 1], ROUNDS, `thread ${tid}: one release per round`);
      assert.equal(results[tid * 4 + 3], 0, `thread ${tid}: released the other thread's vector`);
    }
    const pba = new Uint8Array(8);
    dev.barRead(L.MSIX_BAR, L.MSIX_PBA_OFFSET, pba);
    assert.deepEqual([...pba], [0, 0, 0, 0, 0, 0, 0, 0]);
  });

  it("never shows a torn BAR while another thread reprograms it", async () => {
    const state = makeState();
    const dev = new VirtioPciTransport(state, noHooks);
    dev.configWrite(PCI_COMMAND, Uint8Array.of(PCI_COMMAND_MEMORY, 0));
    const A = 0xe000_1000;
    const B = 0xf7ff_e000;
    const control = new Int32Array(new SharedArrayBuffer(16));
    const source = `
      const { workerData } = require("node:worker_threads");
      const { VirtioPciTransport } = require(workerData.modulePath);
      const ctl = new Int32Array(workerData.control);
      const h = { kick() {}, reset() {}, driverOk() {}, notifyAddressChanged() {}, msixUnmasked() {} };
      const dev = new VirtioPciTransport(workerData.state, h);
      const le = (v) => Uint8Array.of(v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, v >>> 24);
      for (let k = 0; k < 20000; k++) dev.configWrite(0x14, le(k & 1 ? ${B} : ${A}));
      Atomics.store(ctl, 0, 1);
    `;
    const worker = startWorker(source, { state, control: control.buffer });
    const seen = new Set<number>();
    const deadline = Date.now() + 30_000;
    while (Atomics.load(control, 0) === 0) {
      assert.ok(Date.now() < deadline, "writer did not finish");
      const bar = dev.bars().find((b) => b.index === L.MSIX_BAR)!;
      if (bar.address !== 0 && bar.address !== A && bar.address !== B) assert.fail(`torn BAR 0x${bar.address.toString(16)}`);
      seen.add(bar.address);
    }
    await exited(worker);
    assert.equal(dev.bars()[1]!.address, B);
    assert.ok(seen.has(A) || seen.has(B), "the reader saw the writer at work");
  });

  it("shows the I/O worker what a vCPU thread configured", async () => {
    const state = makeState();
    const io = new VirtioPciDeviceSide(state);
    const control = new Int32Array(new SharedArrayBuffer(4));
    const layout = Object.fromEntries(Object.entries(L).filter(([, v]) => typeof v === "number"));
    await exited(startWorker(INIT_WORKER, { state, control: control.buffer, L: layout }));
    assert.equal(Atomics.load(control, 0), 1, "driverOk hook ran in the vCPU thread");
    assert.equal(io.driverOk(), true);
    assert.equal(io.negotiatedFeatures(), feature(2) | feature(VirtioFeatureBit.VERSION_1));
    assert.deepEqual(io.queueConfigs()[1], { index: 1, size: 64, ready: true, descAddr: 0x10000, availAddr: 0x11000, usedAddr: 0x12000 });
    assert.equal(io.resetGeneration(), 1);
  });
});
