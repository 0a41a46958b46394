import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { type RingSnapshot, inFlightHeads } from "../../src/devices/virtio/fs/in-flight";

/** A split ring's indices and slots, a driver with a free list, and a device we script. */
class Ring implements RingSnapshot {
  availIdx = 0;
  usedIdx = 0;
  readonly avail: number[];
  readonly used: number[];
  private readonly free: number[];
  /** Heads the device has taken and not answered, oldest first. */
  readonly taken: number[] = [];
  private nextTake = 0;

  constructor(readonly size: number, startAt = 0) {
    this.avail = new Array(size).fill(0);
    this.used = new Array(size).fill(0);
    this.free = Array.from({ length: size }, (_, i) => i);
    this.availIdx = this.usedIdx = this.nextTake = startAt & 0xffff;
  }
  availEntry(slot: number): number {
    return this.avail[slot]!;
  }
  submit(n = 1): void {
    for (let i = 0; i < n; i++) {
      const head = this.free.shift();
      if (head === undefined) throw new Error("ring full");
      this.avail[this.availIdx % this.size] = head;
      this.availIdx = (this.availIdx + 1) & 0xffff;
    }
  }
  /** The device pops everything available. */
  take(): void {
    while (this.nextTake !== this.availIdx) {
      this.taken.push(this.avail[this.nextTake % this.size]!);
      this.nextTake = (this.nextTake + 1) & 0xffff;
    }
  }
  /** The device answers taken request `i` (0 = oldest). */
  answer(i = 0): void {
    const [head] = this.taken.splice(i, 1);
    this.used[this.usedIdx % this.size] = head!;
    this.usedIdx = (this.usedIdx + 1) & 0xffff;
    this.free.push(head!);
  }
  /** Unanswered heads: taken or not yet taken. */
  truth(): number[] {
    const notTaken: number[] = [];
    for (let k = this.nextTake; k !== this.availIdx; k = (k + 1) & 0xffff) notTaken.push(this.avail[k % this.size]!);
    return [...this.taken, ...notTaken];
  }
}

describe("in-flight requests of a dead back end that answered in order", () => {
  it("none when every request was answered", () => {
    const r = new Ring(8);
    r.submit(3);
    r.take();
    r.answer();
    r.answer();
    r.answer();
    assert.deepEqual(inFlightHeads(r), []);
  });

  it("taken and untaken requests, long after the indices wrapped", () => {
    const r = new Ring(16, 0xfff0);
    for (let i = 0; i < 100; i++) {
      r.submit(1 + (i % 5));
      r.take();
      while (r.taken.length > 0) r.answer();
    }
    r.submit(6);
    r.take();
    r.answer();
    r.answer();
    r.submit(3); // not taken yet
    assert.deepEqual(inFlightHeads(r), r.truth());
    assert.equal(inFlightHeads(r)!.length, 7);
  });

  it("is exact through random batches answered in order", () => {
    let seed = 7;
    const rand = (n: number) => ((seed = (seed * 1103515245 + 12345) & 0x7fffffff) % n);
    for (let trial = 0; trial < 300; trial++) {
      const size = [4, 8, 16, 64][trial % 4]!;
      const r = new Ring(size, rand(0x10000));
      for (let step = 0; step < 40; step++) {
        const room = size - r.truth().length;
        if (room > 0) r.submit(1 + rand(room));
        if (rand(2) === 0) r.take();
        for (let n = rand(r.taken.length + 1); n > 0; n--) r.answer();
      }
      assert.deepEqual(inFlightHeads(r), r.truth(), `trial ${trial}`);
    }
  });

  it("refuses rings a driver cannot have written", () => {
    const r = new Ring(8);
    r.availIdx = 20;
    assert.equal(inFlightHeads(r), undefined, "indices more than a queue apart");
    const s = new Ring(8);
    s.submit(2);
    s.avail[1] = s.avail[0]!;
    assert.equal(inFlightHeads(s), undefined, "one head twice");
    s.avail[1] = 9;
    assert.equal(inFlightHeads(s), undefined, "a head past the queue");
  });
});
