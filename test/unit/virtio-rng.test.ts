import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { GuestMemory } from "../../src/memory/guest-memory";
import { type VirtioActivation, VirtioDeviceType, VirtioFeatureBit, feature } from "../../src/devices/virtio/types";
import { MAX_BYTES_PER_REQUEST, RNG_QUEUE_SIZE, VirtioRng, rngDescription } from "../../src/devices/virtio/rng/device";
import type { EntropySource } from "../../src/devices/virtio/rng/backend";
import { VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE } from "../../src/devices/virtio/queue";
import { describeVirtioDevice } from "../../src/board/virtio-devices";
import { hostEntropy } from "../../src/host/entropy";
import { VirtqDriver } from "../helpers/virtq-driver";

const MiB = 1024 * 1024;
const V1 = feature(VirtioFeatureBit.VERSION_1);
const INDIRECT = feature(VirtioFeatureBit.RING_INDIRECT_DESC);
const EVENT_IDX = feature(VirtioFeatureBit.RING_EVENT_IDX);

/** A source that counts: byte i of everything it ever handed out is (i * 7 + 3) & 0xff. */
class CountingSource implements EntropySource {
  given = 0;
  calls = 0;
  /** Hand out at most this many bytes in all (a source that runs dry). */
  limit = Infinity;
  failWith: Error | undefined;
  fill(buf: Uint8Array): number {
    this.calls++;
    if (this.failWith !== undefined) throw this.failWith;
    const n = Math.min(buf.length, this.limit - this.given);
    for (let i = 0; i < n; i++) buf[i] = ((this.given + i) * 7 + 3) & 0xff;
    this.given += n;
    return n;
  }
}

const expected = (from: number, n: number): Uint8Array => Uint8Array.from({ length: n }, (_, i) => ((from + i) * 7 + 3) & 0xff);

function harness(opts: { features?: bigint; size?: number; memBytes?: number } = {}) {
  const mem = GuestMemory.forTest(opts.memBytes ?? 4 * MiB);
  const drv = new VirtqDriver(mem, { size: opts.size ?? 16 });
  const source = new CountingSource();
  const logs: string[] = [];
  const dev = new VirtioRng(source, { log: (l) => logs.push(l) });
  const signals: number[] = [];
  const resets: string[] = [];
  const ctx: VirtioActivation = {
    memory: mem,
    features: opts.features ?? (V1 | INDIRECT),
    queues: [drv.config()],
    signalUsed: (i) => signals.push(i),
    needsReset: (r) => resets.push(r),
  };
  dev.activate(ctx);
  return { mem, drv, source, dev, signals, resets, logs, ctx };
}

describe("virtio-rng identity", () => {
  it("is device type 4 with one queue, no features and no configuration space", () => {
    const d = rngDescription();
    assert.equal(d.deviceType, VirtioDeviceType.ENTROPY);
    assert.equal(d.deviceType, 4);
    assert.equal(d.queueCount, 1);
    assert.equal(d.maxQueueSize, RNG_QUEUE_SIZE);
    assert.equal(d.deviceFeatures, 0n);
    assert.equal(d.config.length, 0);
    assert.deepEqual(describeVirtioDevice({ kind: "virtio-rng" }), d);
  });
});

describe("virtio-rng requests", () => {
  it("fills each device-writable buffer with the source's bytes; the used length is what was written", () => {
    const h = harness();
    const a = h.drv.writable(64);
    const head = h.drv.add([a]);
    h.dev.queueNotified(0);
    assert.deepEqual(h.drv.used(), [{ id: head, len: 64 }]);
    assert.deepEqual(h.mem.slice(a.addr, 64), expected(0, 64));
    assert.deepEqual(h.signals, [0]);
    assert.deepEqual(h.resets, []);
  });

  it("a chain of several buffers, direct or through an indirect table, is filled in order", () => {
    for (const indirect of [false, true]) {
      const h = harness();
      const bufs = [h.drv.writable(3), h.drv.writable(100), h.drv.writable(1)];
      const head = h.drv.add(bufs, { indirect });
      h.dev.queueNotified(0);
      assert.deepEqual(h.drv.used(), [{ id: head, len: 104 }]);
      assert.deepEqual(h.mem.slice(bufs[0]!.addr, 3), expected(0, 3));
      assert.deepEqual(h.mem.slice(bufs[1]!.addr, 100), expected(3, 100));
      assert.deepEqual(h.mem.slice(bufs[2]!.addr, 1), expected(103, 1));
    }
  });

  it("serves every chain made available before the kick, with one interrupt", () => {
    const h = harness();
    const heads = [h.drv.add([h.drv.writable(16)]), h.drv.add([h.drv.writable(32)]), h.drv.add([h.drv.writable(8)])];
    h.dev.queueNotified(0);
    assert.deepEqual(h.drv.used(), heads.map((id, i) => ({ id, len: [16, 32, 8][i]! })));
    assert.deepEqual(h.signals, [0]);
    assert.deepEqual(h.dev.stats, { requests: 3, bytes: 56 });
  });

  it(`a huge buffer gets at most ${MAX_BYTES_PER_REQUEST} bytes; the rest is left alone`, () => {
    const h = harness({ memBytes: 8 * MiB });
    const big = h.drv.writable(3 * MiB, 0xee);
    const head = h.drv.add([big]);
    h.dev.queueNotified(0);
    assert.deepEqual(h.drv.used(), [{ id: head, len: MAX_BYTES_PER_REQUEST }]);
    assert.equal(h.source.given, MAX_BYTES_PER_REQUEST);
    assert.equal(h.mem.readU8(big.addr + MAX_BYTES_PER_REQUEST), 0xee, "nothing written past the bound");
    assert.deepEqual(h.resets, []);
  });

  it("a source with nothing right now: the driver gets what there was", () => {
    const h = harness();
    h.source.limit = 10;
    const h1 = h.drv.add([h.drv.writable(16)]);
    const h2 = h.drv.add([h.drv.writable(16)]);
    h.dev.queueNotified(0);
    assert.deepEqual(h.drv.used(), [{ id: h1, len: 10 }, { id: h2, len: 0 }]);
    assert.deepEqual(h.resets, []);
  });

  it("with EVENT_IDX, no interrupt until used_event is passed", () => {
    const h = harness({ features: V1 | EVENT_IDX });
    h.drv.setUsedEvent(1);
    h.drv.add([h.drv.writable(4)]);
    h.dev.queueNotified(0);
    assert.deepEqual(h.signals, [0], "the first one always signals");
    h.drv.add([h.drv.writable(4)]);
    h.dev.queueNotified(0);
    assert.deepEqual(h.signals, [0, 0], "used.idx moved past used_event 1");
    h.drv.add([h.drv.writable(4)]);
    h.dev.queueNotified(0);
    assert.deepEqual(h.signals, [0, 0], "used_event still 1: no interrupt");
    assert.equal(h.drv.used().length, 3);
  });

  it("kicks for other queues, before activation or after reset are ignored", () => {
    const h = harness();
    h.drv.add([h.drv.writable(4)]);
    h.dev.queueNotified(1);
    assert.equal(h.drv.usedIdx(), 0);
    h.dev.reset();
    h.dev.queueNotified(0);
    assert.equal(h.drv.usedIdx(), 0);
    const fresh = new VirtioRng(new CountingSource());
    assert.doesNotThrow(() => fresh.queueNotified(0));
  });

  it("a restored device goes on from the queue positions it saved", () => {
    const h = harness();
    h.drv.add([h.drv.writable(4)]);
    h.dev.queueNotified(0);
    h.dev.quiesce();
    const states = h.dev.queueStates();
    assert.equal(states[0]?.nextAvail, 1);
    const again = new VirtioRng(new CountingSource());
    again.activate({ ...h.ctx, queueStates: states });
    const head = h.drv.add([h.drv.writable(4)]);
    again.queueNotified(0);
    assert.deepEqual(h.drv.used(), [{ id: 0, len: 4 }, { id: head, len: 4 }]);
  });
});

describe("virtio-rng and a hostile driver", () => {
  it("a device-readable buffer breaks the device after the requests before it; later kicks are ignored", () => {
    const h = harness();
    const good = h.drv.add([h.drv.writable(8)]);
    h.drv.add([h.drv.readable(new Uint8Array(8)), h.drv.writable(8)]);
    assert.doesNotThrow(() => h.dev.queueNotified(0));
    assert.deepEqual(h.drv.used(), [{ id: good, len: 8 }]);
    assert.deepEqual(h.signals, [0], "the good request was signalled");
    assert.equal(h.resets.length, 1);
    assert.match(h.resets[0]!, /^virtio-rng: request \(head \d+\) has a device-readable buffer$/);
    assert.deepEqual(h.logs, h.resets);
    h.drv.add([h.drv.writable(8)]);
    h.dev.queueNotified(0);
    assert.equal(h.drv.used().length, 0, "a broken device serves nothing until reset");
  });

  it("a chain with only device-readable buffers breaks the device, nothing written into it", () => {
    const h = harness();
    const r = h.drv.readable(new Uint8Array(8).fill(0x55));
    h.drv.add([r]);
    h.dev.queueNotified(0);
    assert.match(h.resets[0]!, /has a device-readable buffer/);
    assert.deepEqual(h.mem.slice(r.addr, 8), new Uint8Array(8).fill(0x55));
    assert.equal(h.source.given, 0);
  });

  it("a zero-length writable buffer is a request with nothing to fill: the device breaks", () => {
    const h = harness();
    h.drv.add([{ addr: h.drv.alloc(16), len: 0, write: true }]);
    h.dev.queueNotified(0);
    assert.match(h.resets[0]!, /has no device-writable buffer/);
  });

  it("a descriptor loop breaks the device, not the VMM", () => {
    const h = harness();
    const b = h.drv.writable(8).addr;
    h.drv.writeDescriptor(0, { addr: b, len: 8, flags: VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, next: 1 });
    h.drv.writeDescriptor(1, { addr: b, len: 8, flags: VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, next: 0 });
    h.drv.publish(0);
    assert.doesNotThrow(() => h.dev.queueNotified(0));
    assert.match(h.resets[0]!, /^virtio-rng: virtqueue 0: .*longer than the queue size/);
    assert.equal(h.source.given, 0);
  });

  it("a loop inside an indirect table, or a nested indirect table, breaks the device", () => {
    const h = harness();
    const b = h.drv.writable(8).addr;
    const table = h.drv.writeTable([
      { addr: b, len: 8, flags: VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, next: 1 },
      { addr: b, len: 8, flags: VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, next: 0 },
    ]);
    h.drv.writeDescriptor(0, { addr: table, len: 32, flags: VIRTQ_DESC_F_INDIRECT });
    h.drv.publish(0);
    h.dev.queueNotified(0);
    assert.match(h.resets[0]!, /indirect table .*longer/);

    const n = harness();
    const inner = n.drv.writeTable([{ addr: n.drv.writable(8).addr, len: 8, flags: VIRTQ_DESC_F_WRITE }]);
    const outer = n.drv.writeTable([{ addr: inner, len: 16, flags: VIRTQ_DESC_F_INDIRECT }]);
    n.drv.writeDescriptor(0, { addr: outer, len: 16, flags: VIRTQ_DESC_F_INDIRECT });
    n.drv.publish(0);
    n.dev.queueNotified(0);
    assert.match(n.resets[0]!, /indirect/);
  });

  it("huge lengths and addresses outside guest RAM break the device without touching memory", () => {
    for (const d of [
      { addr: 0x10_0000, len: 0xffff_ffff },
      { addr: 0x7fff_f000, len: 4096 },
      { addr: 2n ** 64n - 8n, len: 16 },
    ]) {
      const h = harness();
      h.drv.writeDescriptor(0, { ...d, flags: VIRTQ_DESC_F_WRITE });
      h.drv.publish(0);
      assert.doesNotThrow(() => h.dev.queueNotified(0));
      assert.match(h.resets[0]!, /outside guest RAM|not .*RAM/, `${d.addr}+${d.len}`);
      assert.equal(h.source.given, 0);
    }
  });

  it("an available index far ahead, or a head past the queue size, breaks the device", () => {
    const h = harness();
    h.drv.setAvailIdx(1000);
    h.dev.queueNotified(0);
    assert.match(h.resets[0]!, /available index 1000/);
    const b = harness();
    b.drv.publish(300);
    b.dev.queueNotified(0);
    assert.match(b.resets[0]!, /head descriptor index 300/);
  });

  it("a bad queue at activation: needsReset, kicks ignored", () => {
    const mem = GuestMemory.forTest(MiB);
    const dev = new VirtioRng(new CountingSource());
    const resets: string[] = [];
    dev.activate({
      memory: mem,
      features: V1,
      queues: [{ index: 0, size: 16, ready: true, descAddr: 0x10008, availAddr: 0x20000, usedAddr: 0x30000 }],
      signalUsed: () => {},
      needsReset: (r) => resets.push(r),
    });
    assert.match(resets[0]!, /descriptor table at 0x10008 is not 16-byte aligned/);
    assert.doesNotThrow(() => dev.queueNotified(0));
  });

  it("a failing entropy source breaks the device with its message", () => {
    const h = harness();
    h.source.failWith = new Error("getrandom failed: EIO");
    h.drv.add([h.drv.writable(8)]);
    assert.doesNotThrow(() => h.dev.queueNotified(0));
    assert.deepEqual(h.resets, ["virtio-rng: getrandom failed: EIO"]);
  });

  it("reset brings a broken device back", () => {
    const h = harness();
    h.drv.publish(300);
    h.dev.queueNotified(0);
    assert.equal(h.resets.length, 1);
    h.dev.reset();
    const drv = new VirtqDriver(h.mem, { size: 16 });
    h.dev.activate({ ...h.ctx, queues: [drv.config()], needsReset: () => assert.fail("no reset") });
    const head = drv.add([drv.writable(8)]);
    h.dev.queueNotified(0);
    assert.deepEqual(drv.used(), [{ id: head, len: 8 }]);
  });
});

describe("the host's entropy source", () => {
  it("fills buffers of any size from getrandom, differently each time", () => {
    for (const n of [1, 255, 256, 257, 4096, MAX_BYTES_PER_REQUEST]) {
      const a = new Uint8Array(n);
      const b = new Uint8Array(n);
      assert.equal(hostEntropy.fill(a), n);
      assert.equal(hostEntropy.fill(b), n);
      if (n >= 16) {
        assert.notDeepEqual(a, b, `${n} bytes twice`);
        assert.ok(new Set(a).size > 8, `${n} random bytes are not all alike`);
      }
    }
  });
});
