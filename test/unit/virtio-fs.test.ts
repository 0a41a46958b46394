import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { GuestMemory } from "../../src/memory/guest-memory";
import { IoReady, type QueueConfig, type VirtioActivation, VirtioFeatureBit, feature } from "../../src/devices/virtio/types";
import { BACKEND_GONE_ERRNO, FS_QUEUE_SIZE, FsConfig, VirtioFs, fsDescription } from "../../src/devices/virtio/fs/device";
import type { FsBackend } from "../../src/devices/virtio/fs/backend";
import { FUSE_IN_HEADER_SIZE, FuseOpcode, decodeOutHeader, encodeInHeader } from "../../src/devices/virtio/fs/fuse";
import { VirtqDriver, type Buf } from "../helpers/virtq-driver";

const V1 = feature(VirtioFeatureBit.VERSION_1);
const EIO = -BACKEND_GONE_ERRNO;

/** A back end that records what the device asks of it; the test plays its process. */
class FakeBackend implements FsBackend {
  readonly name = "virtiofsd for /tmp/share";
  readonly kickFds = [101, 102];
  readonly callFds = [201, 202];
  readonly watchFd = 300;
  gone = false;
  failStart: string | undefined;
  direct = [true, true];
  readonly calls: string[] = [];
  started: { features: bigint; queues: readonly QueueConfig[]; bases: readonly (number | undefined)[] } | undefined;
  /** What suspend() answers (the back end's next available index by queue). */
  bases = new Map<number, number>();

  start(features: bigint, queues: readonly QueueConfig[], bases: readonly (number | undefined)[] = []): void {
    this.calls.push("start");
    if (this.failStart !== undefined) throw new Error(this.failStart);
    this.started = { features, queues, bases };
  }
  suspend(): ReadonlyMap<number, number> | undefined {
    this.calls.push("suspend");
    return this.gone ? undefined : this.bases;
  }
  stop(): void {
    this.calls.push("stop");
  }
  isGone(): boolean {
    return this.gone;
  }
  clearEvent(fd: number): void {
    this.calls.push(`clear ${fd}`);
  }
  routeInterrupts(): readonly boolean[] {
    this.calls.push("route");
    return this.direct;
  }
  unrouteInterrupts(): void {
    this.calls.push("unroute");
  }
}

function harness(opts: { queueSize?: number } = {}) {
  const mem = GuestMemory.forTest(8 * 1024 * 1024);
  const size = opts.queueSize ?? 16;
  const hiprio = new VirtqDriver(mem, { size, index: 0, ringBase: 0x10000, dataBase: 0x100000, dataEnd: 0x200000 });
  const requests = new VirtqDriver(mem, { size, index: 1, ringBase: 0x30000, dataBase: 0x200000, dataEnd: 0x800000 });
  const backend = new FakeBackend();
  const logs: string[] = [];
  const dev = new VirtioFs(backend, { tag: "src", backendFeatures: 0n, log: (l) => logs.push(l) });
  const signals: number[] = [];
  const resets: string[] = [];
  const ctx: VirtioActivation = {
    memory: mem,
    features: V1,
    queues: [hiprio.config(), requests.config()],
    signalUsed: (q) => signals.push(q),
    needsReset: (r) => resets.push(r),
  };
  let unique = 100n;
  /** A FUSE request on the request queue (not kicked: the back end would read the kick). */
  const request = (opcode: number, replyBytes = 64): { head: number; unique: bigint; reply: Buf } => {
    const u = unique++;
    const input = encodeInHeader({ len: FUSE_IN_HEADER_SIZE, opcode, unique: u, nodeid: 1n });
    const reply = requests.writable(replyBytes, 0xee);
    return { head: requests.add([requests.readable(input), reply]), unique: u, reply };
  };
  /** The back end answers the oldest requests itself (as virtiofsd does, in order). */
  const backendAnswers = (n: number): void => {
    for (let i = 0; i < n; i++) {
      const at = requests.usedAddr + 4 + 8 * (requests.usedIdx() % requests.size);
      const head = mem.readU16(requests.availAddr + 4 + 2 * (requests.usedIdx() % requests.size));
      mem.writeU32(at, head);
      mem.writeU32(at + 4, 16);
      mem.writeU16(requests.usedAddr + 2, (requests.usedIdx() + 1) & 0xffff);
    }
  };
  const replyOf = (r: { reply: Buf }) => decodeOutHeader(mem.slice(r.reply.addr, 16));
  return { mem, hiprio, requests, backend, dev, ctx, signals, resets, logs, request, backendAnswers, replyOf };
}

describe("virtio-fs: the device as the guest sees it", () => {
  it("is device 26, modern only, with a hiprio and one request queue and the tag in its config", () => {
    const d = fsDescription({ tag: "src", backendFeatures: 0x1_7500_0000n });
    assert.equal(d.deviceType, 26);
    assert.equal(d.queueCount, 2);
    assert.equal(d.maxQueueSize, FS_QUEUE_SIZE);
    assert.equal(d.modernOnly, true);
    assert.equal(d.deviceFeatures, 0n, "vhost-user's and the ring's bits are not device features");
    assert.equal(d.config.byteLength, FsConfig.SIZE);
    assert.equal(Buffer.from(d.config.subarray(0, 3)).toString(), "src");
    assert.ok(d.config.subarray(3, 36).every((b) => b === 0), "NUL padded");
    assert.equal(new DataView(d.config.buffer).getUint32(FsConfig.NUM_REQUEST_QUEUES, true), 1);
    assert.equal(fsDescription({ tag: "t".repeat(36), backendFeatures: 0n }).config[35], "t".charCodeAt(0), "36 bytes, no NUL");
    assert.throws(() => fsDescription({ tag: "t".repeat(37), backendFeatures: 0n }), RangeError);
    assert.throws(() => fsDescription({ tag: "", backendFeatures: 0n }), RangeError);
  });
});

describe("virtio-fs: with its back end running", () => {
  it("starts the back end with the driver's features and queues, then routes interrupts", () => {
    const h = harness();
    h.dev.activate(h.ctx);
    assert.equal(h.dev.mode, "running");
    assert.deepEqual(h.backend.calls, ["start", "route"]);
    assert.equal(h.backend.started!.features, V1);
    assert.deepEqual(h.backend.started!.queues.map((q) => q.index), [0, 1]);
    // Routed interrupts need nothing from the I/O worker but a watch on the connection.
    assert.deepEqual(h.dev.pollFds(), [{ fd: 300, events: IoReady.READABLE }]);
  });

  it("relays the call eventfds of queues whose interrupts the transport must raise itself", () => {
    const h = harness();
    h.backend.direct = [true, false];
    h.dev.activate(h.ctx);
    assert.deepEqual(h.dev.pollFds().map((p) => p.fd), [300, 202]);
    h.dev.pollReady(202, IoReady.READABLE);
    assert.deepEqual(h.signals, [1]);
    assert.ok(h.backend.calls.includes("clear 202"));
    // The driver unmasked the vector: routed again, no more relaying.
    h.backend.direct = [true, true];
    h.dev.transportChanged();
    assert.deepEqual(h.dev.pollFds().map((p) => p.fd), [300]);
    assert.equal(h.backend.calls.filter((c) => c === "route").length, 2);
  });

  it("knows whether the driver has made any request (a snapshot needs none made)", () => {
    const h = harness();
    assert.equal(h.dev.requestsMade(), false);
    h.dev.activate(h.ctx);
    assert.equal(h.dev.requestsMade(), false, "probed, not mounted");
    h.request(FuseOpcode.INIT);
    assert.equal(h.dev.requestsMade(), true);
  });

  it("stops the back end's queues for a pause, reports its positions, and starts them from there", () => {
    const h = harness();
    h.dev.activate(h.ctx);
    h.backend.bases = new Map([[0, 0], [1, 7]]);
    h.dev.quiesce();
    assert.equal(h.dev.mode, "suspended");
    assert.deepEqual(h.dev.queueStates().map((q) => q?.nextAvail), [0, 7], "virtiofsd's own counts, not guest RAM's");
    assert.deepEqual(h.dev.pollFds(), [], "nothing to watch while paused");
    h.dev.resumed();
    assert.equal(h.dev.mode, "running");
    assert.deepEqual(h.backend.calls, ["start", "route", "suspend", "start"]);
    assert.deepEqual(h.backend.started!.bases, [0, 7]);
  });

  it("starts a restored device's back end at the saved positions", () => {
    const h = harness();
    const saved = { nextAvail: 3, nextUsed: 3, signalled: -1, usedFlags: 0 };
    h.dev.activate({ ...h.ctx, queueStates: [undefined, saved] });
    assert.deepEqual(h.backend.started!.bases, [undefined, 3]);
  });

  it("takes the queues over when the back end is gone at a pause or cannot start again after it", () => {
    const h = harness();
    h.dev.activate(h.ctx);
    h.backend.gone = true;
    h.dev.quiesce();
    assert.equal(h.dev.mode, "failed");
    const h2 = harness();
    h2.dev.activate(h2.ctx);
    h2.dev.quiesce();
    h2.backend.failStart = "virtiofsd refused SET_VRING_BASE";
    h2.dev.resumed();
    assert.equal(h2.dev.mode, "failed");
    assert.match(h2.logs.join("\n"), /could not start the queues again after a pause/);
  });

  it("takes the queues back on reset, and starts again on the next DRIVER_OK", () => {
    const h = harness();
    h.dev.activate(h.ctx);
    h.dev.reset();
    assert.equal(h.dev.mode, "idle");
    assert.deepEqual(h.backend.calls.slice(-2), ["unroute", "stop"]);
    assert.deepEqual(h.dev.pollFds(), []);
    h.dev.activate(h.ctx);
    assert.equal(h.dev.mode, "running");
  });

  it("gives up on a back end that talks out of turn (an unasked message would spin the worker)", () => {
    const h = harness();
    h.dev.activate(h.ctx);
    h.dev.pollReady(300, IoReady.READABLE);
    assert.equal(h.dev.mode, "failed");
    assert.match(h.logs[0]!, /sent a message it was not asked for; the guest gets I\/O errors on this share/);
  });
});

describe("virtio-fs: when its back end dies", () => {
  it("answers what the back end left unanswered with EIO, and everything after", () => {
    const h = harness();
    h.dev.activate(h.ctx);
    const answered = [h.request(FuseOpcode.LOOKUP), h.request(FuseOpcode.GETATTR)];
    const left = [h.request(FuseOpcode.READ), h.request(FuseOpcode.OPEN)];
    h.backendAnswers(2);
    const before = h.mem.slice(answered[0]!.reply.addr, 16).slice();
    const forget = h.hiprio.add([h.hiprio.readable(encodeInHeader({ len: 40, opcode: FuseOpcode.FORGET, unique: 0n, nodeid: 5n }))]);
    h.backend.gone = true;
    h.dev.pollReady(300, IoReady.HANGUP);
    assert.equal(h.dev.mode, "failed");
    assert.ok(h.backend.calls.includes("unroute"));
    // Exactly the unanswered two, each with its own unique and -EIO; the answered untouched.
    const used = h.requests.used();
    assert.deepEqual(used.map((u) => u.id), [answered[0]!.head, answered[1]!.head, left[0]!.head, left[1]!.head]);
    assert.deepEqual(used.slice(2).map((u) => u.len), [16, 16]);
    for (const r of left) assert.deepEqual(h.replyOf(r), { len: 16, error: EIO, unique: r.unique });
    assert.deepEqual(h.mem.slice(answered[0]!.reply.addr, 16), before);
    assert.deepEqual(h.hiprio.used(), [{ id: forget, len: 0 }], "FORGET wants no reply");
    assert.deepEqual(h.signals.sort(), [0, 1]);
    // From now on the device reads the kicks itself.
    assert.deepEqual(h.dev.pollFds().map((p) => p.fd), [101, 102]);
    const later = h.request(FuseOpcode.MKDIR);
    h.dev.pollReady(102, IoReady.READABLE);
    assert.ok(h.backend.calls.includes("clear 102"));
    assert.deepEqual(h.replyOf(later), { len: 16, error: EIO, unique: later.unique });
    // A reset and a new driver: still errors, never the dead back end.
    h.dev.reset();
    assert.ok(!h.backend.calls.slice(-1).includes("stop"));
    h.dev.activate(h.ctx);
    assert.equal(h.dev.mode, "failed");
    assert.equal(h.backend.calls.filter((c) => c === "start").length, 1);
  });

  it("asks the driver for the next kick, whatever the dead back end had said (EVENT_IDX)", () => {
    const h = harness();
    h.ctx.features = V1 | feature(VirtioFeatureBit.RING_EVENT_IDX);
    h.dev.activate(h.ctx);
    h.request(FuseOpcode.LOOKUP);
    h.request(FuseOpcode.LOOKUP);
    // The back end had said "kick me when avail.idx passes 0" and died before taking these.
    h.mem.writeU16(h.requests.usedAddr + 4 + 8 * h.requests.size, 0);
    h.backend.gone = true;
    h.dev.pollReady(300, IoReady.HANGUP);
    assert.equal(h.requests.used().length, 2);
    assert.equal(h.requests.availEvent(), 2, "the next request is kicked");
    assert.equal(h.requests.kickNeeded(2, 3), true);
  });

  it("answers requests without a reply (INTERRUPT, BATCH_FORGET) with nothing", () => {
    const h = harness();
    h.dev.activate(h.ctx);
    const r = h.request(FuseOpcode.BATCH_FORGET);
    h.backend.gone = true;
    h.dev.pollReady(300, IoReady.HANGUP);
    assert.deepEqual(h.requests.used(), [{ id: r.head, len: 0 }]);
  });

  it("serves with errors from the start when the back end cannot take the queues", () => {
    const h = harness();
    const r = h.request(FuseOpcode.INIT);
    h.backend.failStart = "virtiofsd for /tmp/share closed the connection (SET_VRING_KICK)";
    h.dev.activate(h.ctx);
    assert.equal(h.dev.mode, "failed");
    assert.match(h.logs[0]!, /could not start the queues \(.*SET_VRING_KICK\)\); the guest gets I\/O errors on this share/);
    assert.deepEqual(h.replyOf(r), { len: 16, error: EIO, unique: r.unique });
  });

  it("sets DEVICE_NEEDS_RESET, not crash, on rings a driver cannot have written", () => {
    const h = harness();
    h.dev.activate(h.ctx);
    h.requests.setAvailIdx(40); // more than a queue past used.idx
    const bad = h.hiprio.addChain([{ addr: 0x7fff_fff0, len: 64 }]); // outside guest RAM
    h.hiprio.publish(bad);
    h.backend.gone = true;
    h.dev.pollReady(300, IoReady.HANGUP);
    assert.equal(h.resets.length, 2);
    assert.match(h.resets.join(" | "), /available index is 40 entries past the used index 0/);
    assert.match(h.resets.join(" | "), /outside guest RAM/);
    // Nothing more is served on broken queues, and nothing throws.
    h.dev.pollReady(101, IoReady.READABLE);
    h.dev.pollReady(102, IoReady.READABLE);
  });

  it("answers a request too short to carry a FUSE header with nothing", () => {
    const h = harness();
    h.dev.activate(h.ctx);
    const head = h.requests.add([h.requests.readable(Uint8Array.from([1, 2, 3])), h.requests.writable(32)]);
    h.backend.gone = true;
    h.dev.pollReady(300, IoReady.HANGUP);
    assert.deepEqual(h.requests.used(), [{ id: head, len: 0 }]);
  });
});
