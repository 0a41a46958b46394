/**
 * src/kvm/coalesced.ts over a fake vCPU mapping laid out as KVM lays out its coalesced ring:
 * entries replayed oldest first (PIO and MMIO apart, each with its length), the slot index
 * given back after each, wrap-around at the ring's end, nothing when empty.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { CoalescedRing } from "../../src/kvm/coalesced";
import { KVM_COALESCED_MMIO_MAX, KVM_COALESCED_MMIO_PAGE_OFFSET, KvmCoalescedMmio, KvmCoalescedMmioRing } from "../../src/kvm/abi";

const PAGE = 4096;

function mapping(): { run: Uint8Array; push: (addr: number, data: number[], pio: boolean) => void; first: () => number } {
  const run = new Uint8Array((KVM_COALESCED_MMIO_PAGE_OFFSET + 1) * PAGE);
  const page = KVM_COALESCED_MMIO_PAGE_OFFSET * PAGE;
  const dv = new DataView(run.buffer, page, PAGE);
  const push = (addr: number, data: number[], pio: boolean) => {
    const last = dv.getUint32(KvmCoalescedMmioRing.last, true);
    const e = KvmCoalescedMmioRing.coalesced_mmio + last * KvmCoalescedMmio.size;
    dv.setBigUint64(e + KvmCoalescedMmio.phys_addr, BigInt(addr), true);
    dv.setUint32(e + KvmCoalescedMmio.len, data.length, true);
    dv.setUint32(e + KvmCoalescedMmio.pio, pio ? 1 : 0, true);
    data.forEach((b, i) => dv.setUint8(e + KvmCoalescedMmio.data + i, b));
    dv.setUint32(KvmCoalescedMmioRing.last, (last + 1) % KVM_COALESCED_MMIO_MAX, true);
  };
  return { run, push, first: () => dv.getUint32(KvmCoalescedMmioRing.first, true) };
}

describe("KVM's coalesced-write ring", () => {
  it("replays entries oldest first, PIO and MMIO apart, and gives each slot back", () => {
    const m = mapping();
    const ring = new CoalescedRing(m.run);
    const lock = new Int32Array(new SharedArrayBuffer(8));
    const seen: string[] = [];
    const pio = (port: number, d: Uint8Array) => seen.push(`pio ${port.toString(16)} ${[...d].join(",")}`);
    const mmio = (a: number, d: Uint8Array) => seen.push(`mmio ${a.toString(16)} ${[...d].join(",")}`);
    assert.equal(ring.pending(), false);
    assert.equal(ring.drain(lock, 1, pio, mmio), 0);
    m.push(0x3f8, [0x41], true);
    m.push(0x3f8, [0x42], true);
    m.push(0xfee00000, [1, 2, 3, 4], false);
    m.push(0x1_0000_0010, [9, 8, 7, 6, 5, 4, 3, 2], false);
    assert.equal(ring.pending(), true);
    assert.equal(ring.drain(lock, 1, pio, mmio), 4);
    assert.deepEqual(seen, ["pio 3f8 65", "pio 3f8 66", "mmio fee00000 1,2,3,4", "mmio 100000010 9,8,7,6,5,4,3,2"]);
    assert.equal(m.first(), 4);
    assert.equal(ring.pending(), false);
    assert.equal(lock[1], 0, "the lock is free again");
  });

  it("wraps around at the end of the ring", () => {
    const m = mapping();
    const ring = new CoalescedRing(m.run);
    const lock = new Int32Array(new SharedArrayBuffer(4));
    const bytes: number[] = [];
    const pio = (_: number, d: Uint8Array) => void bytes.push(d[0]!);
    for (let round = 0; round < 3; round++) {
      for (let i = 0; i < 100; i++) m.push(0x3f8, [(round * 100 + i) & 0xff], true);
      assert.equal(ring.drain(lock, 0, pio, () => assert.fail("no MMIO")), 100);
    }
    assert.deepEqual(bytes, Array.from({ length: 300 }, (_, i) => i & 0xff));
    assert.equal(m.first(), 300 % KVM_COALESCED_MMIO_MAX);
  });

  it("refuses a mapping without the ring's page", () => {
    assert.throws(() => new CoalescedRing(new Uint8Array(2 * PAGE)), RangeError);
  });
});
