/**
 * GuestMemory as the one map of guest memory: the region index, runs() across regions,
 * layouts given by the caller, and the iovec encoder chains hand their buffers out with.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { GuestMemory, GuestMemoryError, MAX_REGION_BYTES, contiguousLayout } from "../../src/memory/guest-memory";
import { IovecArray } from "../../src/memory/iovec";
import { ramLayout, PCI_HOLE_END, PCI_HOLE_START } from "../../src/arch/x86/layout";

const KiB = 1024;

describe("GuestMemory's region index", () => {
  // Two adjacent regions (contiguous guest-physically, as RAM split at a region boundary)
  // and one after a hole.
  const mem = GuestMemory.fromBuffers([
    { base: 0, bytes: new Uint8Array(16 * KiB) },
    { base: 16 * KiB, bytes: new Uint8Array(16 * KiB) },
    { base: 64 * KiB, bytes: new Uint8Array(4 * KiB) },
  ]);

  it("finds the region of an address, and -1 outside RAM", () => {
    assert.equal(mem.regionOf(0), 0);
    assert.equal(mem.regionOf(16 * KiB - 1), 0);
    assert.equal(mem.regionOf(16 * KiB), 1);
    assert.equal(mem.regionOf(64 * KiB + 5), 2);
    assert.equal(mem.regionOf(40 * KiB), -1, "the hole");
    assert.equal(mem.regionOf(-1), -1);
    assert.equal(mem.regionOf(2 ** 60), -1);
    assert.equal(mem.regionBases.length, 3);
    assert.ok(Number.isNaN(mem.regionHosts[0]!), "test memory has no host addresses");
    assert.equal(mem.hasHostAddresses, false);
  });

  it("runs() splits a range at region boundaries and refuses what is not RAM", () => {
    const runs = [...mem.runs(16 * KiB - 10, 30)].map((r) => [r.region, r.address, r.offset, r.length]);
    assert.deepEqual(runs, [
      [0, 16 * KiB - 10, 16 * KiB - 10, 10],
      [1, 16 * KiB, 0, 20],
    ]);
    assert.deepEqual([...mem.runs(100, 0)], []);
    assert.throws(() => [...mem.runs(30 * KiB, 4 * KiB)], GuestMemoryError, "runs into the hole");
    assert.throws(() => [...mem.runs(-5, 10)], GuestMemoryError);
    // One bounds check: slice() still wants a single region.
    assert.throws(() => mem.slice(16 * KiB - 10, 30), GuestMemoryError);
  });
});

describe("layouts", () => {
  it("memory takes the layout it is given; x86's puts RAM around the PCI hole", () => {
    assert.deepEqual(contiguousLayout(8 * KiB), [{ base: 0, size: 8 * KiB }]);
    assert.deepEqual(ramLayout(256 * 1024 * KiB), [{ base: 0, size: 256 * 1024 * KiB }]);
    const big = ramLayout(PCI_HOLE_START + 2 * MAX_REGION_BYTES);
    assert.deepEqual(big, [
      { base: 0, size: PCI_HOLE_START },
      { base: PCI_HOLE_END, size: MAX_REGION_BYTES },
      { base: PCI_HOLE_END + MAX_REGION_BYTES, size: MAX_REGION_BYTES },
    ]);
    const mem = GuestMemory.allocate([{ base: 0, size: 64 * KiB }, { base: 1024 * KiB, size: 64 * KiB }]);
    try {
      assert.deepEqual(mem.regions.map((r) => r.base), [0, 1024 * KiB]);
      assert.equal(mem.hasHostAddresses, true);
      assert.equal(mem.regionHosts[1]! - mem.regionHosts[0]!, 64 * KiB, "one mapping, regions back to back");
    } finally {
      mem.free();
    }
    assert.throws(() => GuestMemory.allocate([{ base: 0, size: 1000 }]), RangeError);
  });
});

describe("IovecArray", () => {
  it("encodes {u64 base, u64 len} entries and refuses more than it holds", () => {
    const iov = new IovecArray(2);
    assert.equal(iov.push(0x1_2345_6789, 300), true);
    assert.equal(iov.push(7, 1), true);
    assert.equal(iov.full, true);
    assert.equal(iov.push(9, 9), false);
    assert.equal(iov.count, 2);
    assert.equal(iov.totalBytes, 301);
    const dv = new DataView(iov.bytes.buffer);
    assert.equal(dv.getBigUint64(0, true), 0x1_2345_6789n);
    assert.equal(dv.getBigUint64(8, true), 300n);
    assert.equal(dv.getBigUint64(16, true), 7n);
    iov.clear();
    assert.equal(iov.count, 0);
    assert.equal(iov.totalBytes, 0);
  });
});
