import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { GuestMemory } from "../../src/memory/guest-memory";
import { VirtioFeatureBit, feature } from "../../src/devices/virtio/types";
import {
  DescriptorChain,
  VIRTQ_AVAIL_F_NO_INTERRUPT,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
  VIRTQ_USED_F_NO_NOTIFY,
  Virtqueue,
  VirtqueueError,
  type VirtqueueErrorKind,
  needEvent,
} from "../../src/devices/virtio/queue";
import { VirtqDriver } from "../helpers/virtq-driver";

const RAM = 4 * 1024 * 1024;
const INDIRECT = feature(VirtioFeatureBit.RING_INDIRECT_DESC);
const EVENT_IDX = feature(VirtioFeatureBit.RING_EVENT_IDX);
const V1 = feature(VirtioFeatureBit.VERSION_1);

function setup(opts: { size?: number; features?: bigint; mem?: GuestMemory } = {}) {
  const mem = opts.mem ?? GuestMemory.forTest(RAM);
  const drv = new VirtqDriver(mem, { size: opts.size ?? 16 });
  const q = Virtqueue.create(mem, drv.config(), opts.features ?? V1 | INDIRECT);
  return { mem, drv, q };
}

const bytes = (n: number, seed = 1): Uint8Array => Uint8Array.from({ length: n }, (_, i) => (i * 7 + seed) & 0xff);

function expectQueueError(fn: () => unknown, kind: VirtqueueErrorKind, message?: RegExp): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof VirtqueueError, `expected VirtqueueError, got ${String(e)}`);
    assert.equal(e.kind, kind, e.message);
    if (message) assert.match(e.message, message);
    assert.ok(!e.message.includes("\n"), "one line");
    return true;
  });
}

describe("Virtqueue.create validates the rings", () => {
  const mem = GuestMemory.forTest(RAM);
  const good = new VirtqDriver(mem, { size: 16 }).config();
  it("accepts a well-formed queue", () => {
    assert.equal(Virtqueue.create(mem, good, V1).size, 16);
  });
  for (const size of [0, 3, 48, 65536, 1.5]) {
    it(`rejects queue size ${size}`, () => {
      expectQueueError(() => Virtqueue.create(mem, { ...good, size }, V1), "InvalidQueueConfig", /power of 2/);
    });
  }
  it("accepts sizes 1 and 32768", () => {
    assert.equal(Virtqueue.create(mem, { ...good, size: 1 }, V1).size, 1);
    assert.equal(Virtqueue.create(mem, { ...good, size: 32768, descAddr: 0x100000, availAddr: 0x80000, usedAddr: 0x200000 }, V1).size, 32768);
  });
  it("rejects misaligned rings", () => {
    expectQueueError(() => Virtqueue.create(mem, { ...good, descAddr: good.descAddr + 8 }, V1), "InvalidQueueConfig", /descriptor table.*16-byte aligned/);
    expectQueueError(() => Virtqueue.create(mem, { ...good, availAddr: good.availAddr + 1 }, V1), "InvalidQueueConfig", /available ring.*2-byte/);
    expectQueueError(() => Virtqueue.create(mem, { ...good, usedAddr: good.usedAddr + 2 }, V1), "InvalidQueueConfig", /used ring.*4-byte/);
  });
  it("rejects rings outside RAM, or straddling its end", () => {
    expectQueueError(() => Virtqueue.create(mem, { ...good, descAddr: RAM }, V1), "InvalidQueueConfig", /outside guest RAM/);
    expectQueueError(() => Virtqueue.create(mem, { ...good, availAddr: RAM - 16 }, V1), "InvalidQueueConfig", /available ring/);
    expectQueueError(() => Virtqueue.create(mem, { ...good, usedAddr: RAM - 64 }, V1), "InvalidQueueConfig", /used ring/);
    expectQueueError(() => Virtqueue.create(mem, { ...good, descAddr: 2 ** 60 }, V1), "InvalidQueueConfig");
  });
});

describe("descriptor chains", () => {
  it("an empty ring pops nothing", () => {
    const { q } = setup();
    assert.equal(q.pop(), undefined);
  });

  it("reads the readable buffers and writes the writable ones as two streams", () => {
    const { drv, q, mem } = setup();
    const a = bytes(5, 1);
    const b = bytes(300, 2);
    const w1 = drv.writable(3);
    const w2 = drv.writable(10);
    const head = drv.add([drv.readable(a), drv.readable(b), w1, w2]);
    const c = q.pop()!;
    assert.equal(c.head, head);
    assert.equal(c.readableBytes, 305);
    assert.equal(c.writableBytes, 13);
    assert.equal(c.descriptorCount, 4);
    assert.deepEqual(c.reader.read(7), Uint8Array.from([...a, ...b.subarray(0, 2)]));
    assert.equal(c.reader.remaining, 298);
    assert.equal(c.reader.skip(290), 290);
    assert.deepEqual(c.reader.read(100), b.subarray(292));
    assert.equal(c.reader.remaining, 0);
    assert.equal(c.reader.read(4).length, 0);

    assert.equal(c.writer.write(Uint8Array.from([1, 2, 3, 4, 5])), 5);
    assert.deepEqual(mem.slice(w1.addr, 3), Uint8Array.from([1, 2, 3]));
    assert.deepEqual(mem.slice(w2.addr, 2), Uint8Array.from([4, 5]));
    assert.equal(c.writer.remaining, 8);
    assert.equal(c.writer.write(new Uint8Array(20)), 8, "only what fits");
    assert.equal(c.writer.consumed, 13);
    assert.equal(c.lastWritableByte(), w2.addr + 9);

    q.addUsed(c.head, 13);
    assert.deepEqual(drv.used(), [], "not visible before the used index is published");
    q.publishUsed();
    assert.deepEqual(drv.used(), [{ id: head, len: 13 }]);
    assert.equal(q.pop(), undefined);
  });

  it("nextSlice gives zero-copy windows, one descriptor at a time", () => {
    const { drv, q, mem } = setup();
    const w1 = drv.writable(100);
    const w2 = drv.writable(50);
    drv.add([drv.readable(bytes(16)), w1, w2]);
    const c = q.pop()!;
    c.writer.limitTo(149); // keep the last byte, like a status byte
    const s1 = c.writer.nextSlice()!;
    assert.equal(s1.length, 100);
    s1.fill(0x42);
    assert.equal(mem.readU8(w1.addr + 99), 0x42, "the slice is guest memory");
    const s2 = c.writer.nextSlice(1000)!;
    assert.equal(s2.length, 49);
    assert.equal(c.writer.nextSlice(), undefined);
    assert.equal(c.lastWritableByte(), w2.addr + 49);
  });

  it("readInto and fill cross descriptor boundaries at odd sizes", () => {
    const { drv, q, mem } = setup();
    const parts = [1, 2, 3, 511, 513].map((n, i) => bytes(n, i));
    const ws = [7, 1, 9].map((n) => drv.writable(n));
    drv.add([...parts.map((p) => drv.readable(p)), ...ws]);
    const c = q.pop()!;
    const all = new Uint8Array(1030);
    assert.equal(c.reader.readInto(all), 1030);
    assert.deepEqual(all, Uint8Array.from(parts.flatMap((p) => [...p])));
    assert.equal(c.writer.fill(100, 0x11), 17);
    for (const w of ws) assert.ok(mem.slice(w.addr, w.len).every((x) => x === 0x11));
  });

  it("a reused chain object is rewritten by each pop", () => {
    const { drv, q } = setup();
    drv.add([drv.readable(bytes(4, 9)), drv.writable(1)]);
    drv.add([drv.readable(bytes(8, 3))]);
    const c = new DescriptorChain(drv.mem);
    assert.equal(q.pop(c), c);
    assert.deepEqual(c.reader.read(4), bytes(4, 9));
    assert.equal(q.pop(c), c);
    assert.equal(c.readableBytes, 8);
    assert.equal(c.writableBytes, 0);
    assert.equal(c.lastWritableByte(), -1);
    assert.deepEqual(c.reader.read(8), bytes(8, 3));
  });

  it("zero-length buffers are allowed and add nothing", () => {
    const { drv, q } = setup();
    drv.add([{ addr: 0x200000, len: 0 }, drv.readable(bytes(3)), { addr: 0x200000, len: 0, write: true }, drv.writable(2)]);
    const c = q.pop()!;
    assert.equal(c.descriptorCount, 4);
    assert.equal(c.segmentCount, 2);
    assert.equal(c.readableBytes, 3);
    assert.equal(c.writableBytes, 2);
  });

  it("a guest changing a descriptor after the pop changes nothing the device uses", () => {
    const { drv, q } = setup();
    const r = drv.readable(bytes(32));
    const head = drv.add([r]);
    const c = q.pop()!;
    drv.writeDescriptor(head, { addr: 0xffff_0000_0000n, len: 0xffffffff });
    assert.equal(c.readableBytes, 32);
    assert.deepEqual(c.reader.read(32), bytes(32));
  });

  it("follows indirect tables when negotiated", () => {
    const { drv, q, mem } = setup();
    const w = drv.writable(4);
    const head = drv.add([drv.readable(bytes(16)), drv.readable(bytes(3, 5)), w], { indirect: true });
    const c = q.pop()!;
    assert.equal(c.head, head);
    assert.equal(c.descriptorCount, 4, "the table descriptor and three in the table");
    assert.equal(c.readableBytes, 19);
    assert.equal(c.writableBytes, 4);
    c.writer.write(Uint8Array.from([9, 8, 7, 6]));
    assert.deepEqual(mem.slice(w.addr, 4), Uint8Array.from([9, 8, 7, 6]));
  });

  it("accepts direct descriptors followed by an indirect one, ignoring WRITE on the table descriptor", () => {
    const { drv, q } = setup();
    const table = drv.writeTable([{ addr: drv.writable(8).addr, len: 8, flags: VIRTQ_DESC_F_WRITE }]);
    const r = drv.readable(bytes(16));
    drv.writeDescriptor(0, { addr: r.addr, len: 16, flags: VIRTQ_DESC_F_NEXT, next: 1 });
    drv.writeDescriptor(1, { addr: table, len: 16, flags: VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE });
    drv.publish(0);
    const c = q.pop()!;
    assert.equal(c.readableBytes, 16);
    assert.equal(c.writableBytes, 8);
  });

  it("splits a buffer that spans two adjacent RAM regions", () => {
    const lo = new Uint8Array(0x100000);
    const hi = new Uint8Array(0x100000);
    const mem = GuestMemory.fromBuffers([
      { base: 0, bytes: lo },
      { base: 0x100000, bytes: hi },
    ]);
    const drv = new VirtqDriver(mem, { size: 8, dataBase: 0x80000, dataEnd: 0x200000 });
    const q = Virtqueue.create(mem, drv.config(), V1);
    const data = bytes(64, 4);
    mem.write(0xfffe0, data.subarray(0, 32));
    mem.write(0x100000, data.subarray(32));
    drv.add([{ addr: 0xfffe0, len: 64 }]);
    const c = q.pop()!;
    assert.equal(c.segmentCount, 2);
    assert.deepEqual(c.reader.read(64), data);
    drv.add([{ addr: 0x1ffff0, len: 32 }]);
    expectQueueError(() => q.pop(), "DescriptorOutOfRange");
  });
});

describe("a hostile guest", () => {
  it("buffer outside RAM", () => {
    const { drv, q } = setup();
    drv.add([{ addr: RAM, len: 16 }]);
    expectQueueError(() => q.pop(), "DescriptorOutOfRange", /descriptor 0: buffer 0x400000\+0x10 is outside guest RAM/);
  });

  it("buffer running past the end of RAM", () => {
    const { drv, q } = setup();
    drv.add([{ addr: RAM - 8, len: 16 }]);
    expectQueueError(() => q.pop(), "DescriptorOutOfRange");
  });

  it("buffer whose address + length wraps past 2^64", () => {
    const { drv, q } = setup();
    drv.writeDescriptor(0, { addr: 0xffff_ffff_ffff_fff0n, len: 0x20 });
    drv.publish(0);
    expectQueueError(() => q.pop(), "DescriptorOutOfRange");
  });

  it("address above 2^53 that would round into RAM as a double", () => {
    const { drv, q } = setup();
    drv.writeDescriptor(0, { addr: (1n << 64n) - 1n, len: 1 });
    drv.publish(0);
    expectQueueError(() => q.pop(), "DescriptorOutOfRange");
    const s = setup();
    s.drv.writeDescriptor(0, { addr: 1n << 53n, len: 1 });
    s.drv.publish(0);
    expectQueueError(() => s.q.pop(), "DescriptorOutOfRange");
  });

  it("huge length (4 GiB - 1)", () => {
    const { drv, q } = setup();
    drv.writeDescriptor(0, { addr: 0, len: 0xffffffff, flags: VIRTQ_DESC_F_WRITE });
    drv.publish(0);
    expectQueueError(() => q.pop(), "DescriptorOutOfRange");
  });

  it("a loop: next points back", () => {
    const { drv, q } = setup();
    const r = drv.readable(bytes(8));
    drv.writeDescriptor(0, { addr: r.addr, len: 8, flags: VIRTQ_DESC_F_NEXT, next: 1 });
    drv.writeDescriptor(1, { addr: r.addr, len: 8, flags: VIRTQ_DESC_F_NEXT, next: 2 });
    drv.writeDescriptor(2, { addr: r.addr, len: 8, flags: VIRTQ_DESC_F_NEXT, next: 0 });
    drv.publish(0);
    expectQueueError(() => q.pop(), "ChainTooLong", /longer than the queue size 16/);
  });

  it("a descriptor chained to itself", () => {
    const { drv, q } = setup();
    drv.writeDescriptor(5, { addr: 0x200000, len: 0, flags: VIRTQ_DESC_F_NEXT, next: 5 });
    drv.publish(5);
    expectQueueError(() => q.pop(), "ChainTooLong");
  });

  it("a chain of exactly the queue size is fine, one more is not", () => {
    const { drv, q } = setup({ size: 4 });
    const r = drv.readable(bytes(4));
    for (let i = 0; i < 4; i++) drv.writeDescriptor(i, { addr: r.addr, len: 1, flags: i < 3 ? VIRTQ_DESC_F_NEXT : 0, next: i + 1 });
    drv.publish(0);
    assert.equal(q.pop()!.descriptorCount, 4);
    drv.writeDescriptor(3, { addr: r.addr, len: 1, flags: VIRTQ_DESC_F_NEXT, next: 0 });
    drv.publish(0);
    expectQueueError(() => q.pop(), "ChainTooLong");
  });

  it("next index past the queue size", () => {
    const { drv, q } = setup();
    drv.writeDescriptor(0, { addr: 0x200000, len: 8, flags: VIRTQ_DESC_F_NEXT, next: 16 });
    drv.publish(0);
    expectQueueError(() => q.pop(), "InvalidDescriptorIndex", /chains to 16/);
  });

  it("head index past the queue size", () => {
    const { drv, q } = setup();
    drv.publish(16);
    expectQueueError(() => q.pop(), "InvalidDescriptorIndex", /head descriptor index 16/);
    const s = setup();
    s.drv.publish(0xffff);
    expectQueueError(() => s.q.pop(), "InvalidDescriptorIndex");
  });

  it("avail idx more than the queue size ahead", () => {
    const { drv, q } = setup();
    drv.setAvailIdx(17);
    expectQueueError(() => q.pop(), "AvailIndexTooFar", /17 entries past 0/);
    const s = setup();
    s.drv.setAvailIdx(0xffff); // "behind" is far ahead modulo 2^16
    expectQueueError(() => s.q.pop(), "AvailIndexTooFar");
  });

  it("avail idx exactly the queue size ahead is a full ring, not an error", () => {
    const { drv, q } = setup({ size: 4 });
    const r = drv.readable(bytes(4));
    for (let i = 0; i < 4; i++) drv.add([r]);
    for (let i = 0; i < 4; i++) assert.ok(q.pop());
    assert.equal(q.pop(), undefined);
  });

  it("a writable descriptor before a readable one", () => {
    const { drv, q } = setup();
    drv.add([drv.writable(4), drv.readable(bytes(4))]);
    expectQueueError(() => q.pop(), "InvalidChain", /readable after a device-writable/);
  });

  it("writable before readable inside an indirect table", () => {
    const { drv, q } = setup();
    drv.add([drv.readable(bytes(4)), drv.writable(4), drv.readable(bytes(4))], { indirect: true });
    expectQueueError(() => q.pop(), "InvalidChain");
  });

  it("indirect descriptor without the feature", () => {
    const { drv, q } = setup({ features: V1 });
    drv.add([drv.readable(bytes(4))], { indirect: true });
    expectQueueError(() => q.pop(), "IndirectNotNegotiated");
  });

  it("an indirect table inside an indirect table", () => {
    const { drv, q } = setup();
    const inner = drv.writeTable([{ addr: drv.readable(bytes(4)).addr, len: 4 }]);
    const outer = drv.writeTable([{ addr: inner, len: 16, flags: VIRTQ_DESC_F_INDIRECT }]);
    drv.writeDescriptor(0, { addr: outer, len: 16, flags: VIRTQ_DESC_F_INDIRECT });
    drv.publish(0);
    expectQueueError(() => q.pop(), "NestedIndirect");
  });

  for (const len of [0, 8, 15, 17, 40]) {
    it(`indirect table of ${len} bytes`, () => {
      const { drv, q } = setup();
      const table = drv.writeTable([{ addr: 0x200000, len: 4 }, { addr: 0x200000, len: 4 }, { addr: 0x200000, len: 4 }]);
      drv.writeDescriptor(0, { addr: table, len, flags: VIRTQ_DESC_F_INDIRECT });
      drv.publish(0);
      expectQueueError(() => q.pop(), "BadIndirectTable", /indirect table length/);
    });
  }

  it("indirect table larger than 32768 descriptors", () => {
    const { drv, q } = setup();
    drv.writeDescriptor(0, { addr: 0, len: 16 * 32769, flags: VIRTQ_DESC_F_INDIRECT });
    drv.publish(0);
    expectQueueError(() => q.pop(), "BadIndirectTable");
  });

  it("indirect table outside RAM", () => {
    const { drv, q } = setup();
    drv.writeDescriptor(0, { addr: RAM - 16, len: 32, flags: VIRTQ_DESC_F_INDIRECT });
    drv.publish(0);
    expectQueueError(() => q.pop(), "BadIndirectTable", /outside guest RAM/);
  });

  it("indirect descriptor with NEXT as well", () => {
    const { drv, q } = setup();
    const table = drv.writeTable([{ addr: 0x200000, len: 4 }]);
    drv.writeDescriptor(0, { addr: table, len: 16, flags: VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, next: 1 });
    drv.writeDescriptor(1, { addr: 0x200000, len: 1, flags: VIRTQ_DESC_F_WRITE });
    drv.publish(0);
    expectQueueError(() => q.pop(), "InvalidChain", /both INDIRECT and NEXT/);
  });

  it("a loop inside an indirect table", () => {
    const { drv, q } = setup();
    const table = drv.writeTable([
      { addr: 0x200000, len: 4, flags: VIRTQ_DESC_F_NEXT, next: 1 },
      { addr: 0x200000, len: 4, flags: VIRTQ_DESC_F_NEXT, next: 0 },
    ]);
    drv.writeDescriptor(0, { addr: table, len: 32, flags: VIRTQ_DESC_F_INDIRECT });
    drv.publish(0);
    expectQueueError(() => q.pop(), "ChainTooLong", /indirect table/);
  });

  it("next past the end of an indirect table", () => {
    const { drv, q } = setup();
    const table = drv.writeTable([
      { addr: 0x200000, len: 4, flags: VIRTQ_DESC_F_NEXT, next: 1 },
      { addr: 0x200000, len: 4, flags: VIRTQ_DESC_F_NEXT, next: 2 },
    ]);
    drv.writeDescriptor(0, { addr: table, len: 32, flags: VIRTQ_DESC_F_INDIRECT });
    drv.publish(0);
    expectQueueError(() => q.pop(), "InvalidDescriptorIndex", /indirect table's length 2/);
  });

  it("buffer outside RAM inside an indirect table", () => {
    const { drv, q } = setup();
    drv.add([{ addr: 0x1_0000_0000, len: 4 }], { indirect: true });
    expectQueueError(() => q.pop(), "DescriptorOutOfRange", /indirect descriptor 0 of head 0/);
  });
});

describe("used ring and notifications", () => {
  it("addUsed writes id and length, published in one go, and wraps around the ring", () => {
    const { drv, q } = setup({ size: 4 });
    const r = drv.readable(bytes(4));
    for (let round = 0; round < 3; round++) {
      const heads = [drv.add([r]), drv.add([r]), drv.add([r])];
      for (const h of heads) {
        const c = q.pop()!;
        q.addUsed(c.head, 100 + h);
      }
      q.needsNotification(); // publishes
      assert.deepEqual(drv.used(), heads.map((h) => ({ id: h, len: 100 + h })));
    }
    assert.equal(q.usedIndex, 9);
    assert.equal(drv.usedIdx(), 9);
    assert.throws(() => q.addUsed(4, 0), RangeError);
  });

  it("without EVENT_IDX: notify unless the driver set NO_INTERRUPT, and only for new entries", () => {
    const { drv, q } = setup({ features: V1 });
    assert.equal(q.needsNotification(), false, "nothing used yet");
    const r = drv.readable(bytes(4));
    drv.add([r]);
    q.addUsed(q.pop()!.head, 0);
    assert.equal(q.needsNotification(), true);
    assert.equal(q.needsNotification(), false, "already told");
    drv.setAvailFlags(VIRTQ_AVAIL_F_NO_INTERRUPT);
    drv.add([r]);
    q.addUsed(q.pop()!.head, 0);
    assert.equal(q.needsNotification(), false);
  });

  it("without EVENT_IDX: disable/enable flip used.flags NO_NOTIFY and report new work", () => {
    const { drv, q } = setup({ features: V1 });
    q.disableNotification();
    assert.equal(drv.usedFlags(), VIRTQ_USED_F_NO_NOTIFY);
    assert.equal(q.enableNotification(), false);
    assert.equal(drv.usedFlags(), 0);
    q.disableNotification();
    drv.add([drv.readable(bytes(4))]);
    assert.equal(q.enableNotification(), true, "a buffer arrived while notifications were off");
  });

  it("with EVENT_IDX: interrupt only when used.idx passes used_event", () => {
    const { drv, q } = setup({ features: V1 | EVENT_IDX });
    const r = drv.readable(bytes(4));
    const serve = (n: number): void => {
      for (let i = 0; i < n; i++) {
        drv.add([r]);
        q.addUsed(q.pop()!.head, 0);
        drv.used();
      }
    };
    serve(1);
    assert.equal(q.needsNotification(), true, "the first notification is always sent");
    drv.setUsedEvent(5); // "interrupt me when entry 5 is used"
    serve(3); // used idx 1 -> 4
    assert.equal(q.needsNotification(), false);
    serve(1); // 4 -> 5: entry 5 not yet used
    assert.equal(q.needsNotification(), false);
    serve(1); // 5 -> 6
    assert.equal(q.needsNotification(), true);
    serve(2); // 6 -> 8; used_event 5 is behind
    assert.equal(q.needsNotification(), false);
    drv.setUsedEvent(8);
    serve(3); // 8 -> 11, passes 8
    assert.equal(q.needsNotification(), true);
  });

  it("with EVENT_IDX: NO_INTERRUPT in avail.flags is ignored", () => {
    const { drv, q } = setup({ features: V1 | EVENT_IDX });
    drv.setAvailFlags(VIRTQ_AVAIL_F_NO_INTERRUPT);
    drv.add([drv.readable(bytes(4))]);
    q.addUsed(q.pop()!.head, 0);
    assert.equal(q.needsNotification(), true);
  });

  it("with EVENT_IDX: the device moves avail_event so the driver stops kicking while it works", () => {
    const { drv, q } = setup({ features: V1 | EVENT_IDX });
    const r = drv.readable(bytes(4));
    assert.equal(drv.kickNeeded(0, 1), true, "avail_event 0: the first buffer kicks");
    drv.add([r]);
    q.disableNotification(); // the device starts draining
    assert.equal(drv.availEvent(), 0);
    q.addUsed(q.pop()!.head, 0);
    drv.add([r]);
    drv.add([r]);
    assert.equal(drv.kickNeeded(1, 2), false, "no kick while the device is busy");
    assert.equal(drv.kickNeeded(2, 3), false);
    assert.equal(q.enableNotification(), true, "the re-check finds the two new buffers");
    assert.equal(drv.availEvent(), 1);
    q.pop();
    q.pop();
    assert.equal(q.enableNotification(), false);
    assert.equal(drv.availEvent(), 3);
    assert.equal(drv.kickNeeded(3, 4), true, "idle device: the next buffer kicks");
    assert.equal(drv.usedFlags(), 0, "used.flags untouched with EVENT_IDX");
  });

  it("EVENT_IDX arithmetic wraps around 2^16", () => {
    assert.equal(needEvent(0xffff, 0x0001, 0xfffe), true);
    assert.equal(needEvent(0x0000, 0x0001, 0xfffe), true);
    assert.equal(needEvent(0x0001, 0x0001, 0xfffe), false);
    assert.equal(needEvent(0xfffd, 0x0001, 0xfffe), false);
    assert.equal(needEvent(0xfffe, 0x0000, 0xfffe), true);
    assert.equal(needEvent(5, 5, 5), false, "nothing new");
  });

  it("queue indices wrap around 2^16 with event suppression still right", () => {
    const { drv, q } = setup({ size: 8, features: V1 | EVENT_IDX });
    const r = drv.readable(bytes(4));
    const c = new DescriptorChain(drv.mem);
    const head = drv.addChain([r]);
    // Drive both indices to 0xfffc.
    for (let i = 0; i < 0xfffc; i++) {
      drv.publish(head);
      q.pop(c);
      q.addUsed(c.head, 0);
    }
    q.needsNotification();
    drv.skipUsed();
    assert.equal(q.usedIndex, 0xfffc);
    assert.equal(drv.usedIdx(), 0xfffc);
    drv.setUsedEvent(0x0001); // interrupt when entry 1 (after the wrap) is used
    const step = (): boolean => {
      drv.publish(head);
      q.pop(c);
      q.addUsed(c.head, 0);
      return q.needsNotification();
    };
    assert.equal(step(), false); // -> 0xfffd
    assert.equal(step(), false); // -> 0xfffe
    assert.equal(step(), false); // -> 0xffff
    assert.equal(step(), false); // -> 0x0000
    assert.equal(step(), false); // -> 0x0001: entry 1 not used yet
    assert.equal(step(), true); //  -> 0x0002
    assert.equal(q.lastAvailIndex, 2);
    assert.equal(drv.usedIdx(), 2);
    // avail idx far ahead across the wrap is still caught.
    drv.setAvailIdx(2 + 9);
    expectQueueError(() => q.pop(), "AvailIndexTooFar");
  });
});
