/**
 * src/devices/shared-state.ts's lock under contention: threads that each add to a cell with
 * a plain read and write under the lock never lose an update, whether they take the lock
 * uncontended, spinning, or after sleeping on it; and a released lock is free (cell 0).
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { Worker } from "node:worker_threads";
import { join } from "node:path";
import { SharedState } from "../../src/devices/shared-state";

const MODULE = join(__dirname, "..", "..", "src", "devices", "shared-state.js");

/** A thread adding 1 to cell 0, `times` times, each under the lock (read, yield a little, write). */
function adder(buffer: SharedArrayBuffer, times: number, slowEvery: number): Promise<void> {
  const code = `
    const { workerData, parentPort } = require("node:worker_threads");
    const { SharedState } = require(${JSON.stringify(MODULE)});
    const s = new SharedState(workerData.buffer, 1);
    for (let i = 0; i < workerData.times; i++) {
      s.lock();
      const v = s.get(0);
      // Now and then hold the lock long enough that the others give up spinning and sleep.
      if (i % workerData.slowEvery === 0) { const until = Date.now() + 2; while (Date.now() < until); }
      s.set(0, v + 1);
      s.unlock();
    }
    parentPort.postMessage("done");`;
  return new Promise((resolve, reject) => {
    const w = new Worker(code, { eval: true, workerData: { buffer, times, slowEvery } });
    w.once("message", () => resolve());
    w.once("error", reject);
  });
}

describe("shared device state: lock", () => {
  it("loses no update among threads contending for it, sleepers included", async () => {
    const s = SharedState.create(1);
    const threads = 3;
    const times = 5000;
    await Promise.all(Array.from({ length: threads }, () => adder(s.buffer, times, 500)));
    assert.equal(s.get(0), threads * times);
    assert.equal(Atomics.load(s.cells, 0), 0, "the lock is free afterwards");
  });

  it("is free again after an uncontended lock and unlock", () => {
    const s = SharedState.create(1);
    s.lock();
    assert.equal(Atomics.load(s.cells, 0), 1);
    s.unlock();
    assert.equal(Atomics.load(s.cells, 0), 0);
    assert.equal(s.locked(() => 7), 7);
    assert.equal(Atomics.load(s.cells, 0), 0);
  });
});
