import { describe, it } from "node:test";
import assert from "node:assert/strict";
import * as sys from "../../src/sys/libc";
import { memfdCreate, ftruncate } from "../../src/sys/memfd";
import { VhostUserChannel } from "../../src/host/vhost-user/channel";
import { VhostUserFrontend, type VringSetup } from "../../src/host/vhost-user/frontend";
import {
  FLAG_NEED_REPLY,
  HEADER_SIZE,
  ProtocolFeature,
  Request,
  VERSION,
  VhostUserError,
  bit,
  decodeHeader,
  decodeMemTable,
  decodeU64,
  decodeVringAddr,
  decodeVringState,
  encodeMemTable,
  encodeMessage,
  encodeVringAddr,
  requestName,
} from "../../src/host/vhost-user/protocol";
import {
  type Fault,
  type FakeBackendOptions,
  type LoggedRequest,
  VIRTIOFSD_FEATURES,
  startFakeBackend,
} from "../helpers/fake-vhost-backend";

function connect(opts: FakeBackendOptions = {}, timeoutMs = 2000) {
  const [ours, theirs] = sys.socketpair(sys.AF_UNIX, sys.SOCK_STREAM);
  const backend = startFakeBackend(theirs, opts);
  const frontend = new VhostUserFrontend(new VhostUserChannel(ours, { timeoutMs, peer: "fake back end" }));
  return {
    frontend,
    /** Close our end; the fake back end then posts what it saw. */
    async finish(): Promise<LoggedRequest[]> {
      frontend.close();
      return backend.log;
    },
  };
}

const u8 = (xs: number[]) => Uint8Array.from(xs);
const requestsOf = (log: LoggedRequest[]) => log.map((r) => requestName(r.request));

function vring(index: number, base = 0): VringSetup {
  return {
    index,
    size: 128,
    descAddress: 0x7f00_0000_0000n + BigInt(index) * 0x10000n,
    availAddress: 0x7f00_0000_0800n + BigInt(index) * 0x10000n,
    usedAddress: 0x7f00_0000_1000n + BigInt(index) * 0x10000n,
    base,
    kickFd: sys.eventfd(),
    callFd: sys.eventfd(),
  };
}

function closeVrings(vrings: VringSetup[]): void {
  for (const v of vrings) {
    sys.close(v.kickFd);
    sys.close(v.callFd);
  }
}

function expectVhostError(fn: () => unknown, kind: VhostUserError["kind"], message: RegExp): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof VhostUserError, `expected VhostUserError, got ${String(e)}`);
    assert.equal(e.kind, kind, e.message);
    assert.match(e.message, message);
    assert.ok(!e.message.includes("\n"));
    return true;
  });
}

describe("vhost-user messages", () => {
  it("encodes a header and payload little-endian", () => {
    const m = encodeMessage(Request.SET_VRING_NUM, VERSION | FLAG_NEED_REPLY, u8([1, 2, 3, 4, 5, 6, 7, 8]));
    assert.deepEqual([...m.subarray(0, HEADER_SIZE)], [8, 0, 0, 0, 9, 0, 0, 0, 8, 0, 0, 0]);
    assert.deepEqual(decodeHeader(m), { request: 8, flags: 9, size: 8 });
  });
  it("round-trips a vring address and a memory table", () => {
    const a = { index: 1, flags: 0, desc: 0x1000n, used: 0x3000n, avail: 0x2000n, log: 0n };
    assert.deepEqual(decodeVringAddr(encodeVringAddr(a)), a);
    const regions = [
      { guestAddress: 0n, size: 0xc000_0000n, userAddress: 0x7f00_0000_0000n, mmapOffset: 0n },
      { guestAddress: 0x1_0000_0000n, size: 0x4000_0000n, userAddress: 0x7f00_c000_0000n, mmapOffset: 0xc000_0000n },
    ];
    const t = encodeMemTable(regions);
    assert.equal(t.byteLength, 8 + 2 * 32);
    assert.deepEqual(decodeMemTable(t), regions);
  });
  it("refuses payloads of the wrong size", () => {
    expectVhostError(() => decodeU64(u8([1, 2, 3]), "GET_FEATURES"), "protocol", /GET_FEATURES: 3 bytes \(expected 8\)/);
    expectVhostError(() => decodeVringState(new Uint8Array(12), "GET_VRING_BASE"), "protocol", /12 bytes/);
    expectVhostError(() => decodeMemTable(u8([9, 0, 0, 0, 0, 0, 0, 0])), "protocol", /9 regions/);
    expectVhostError(() => decodeMemTable(u8([1, 0, 0, 0, 0, 0, 0, 0])), "protocol", /8 bytes \(expected 40\)/);
    expectVhostError(() => decodeHeader(new Uint8Array(5)), "protocol", /header of 5 bytes/);
  });
  it("refuses memory tables of 0 or more than 8 regions", () => {
    const r = { guestAddress: 0n, size: 4096n, userAddress: 0n, mmapOffset: 0n };
    assert.throws(() => encodeMemTable([]), RangeError);
    assert.throws(() => encodeMemTable(Array(9).fill(r)), RangeError);
  });
});

describe("vhost-user front end against a well-behaved back end", () => {
  it("negotiates like QEMU: features, protocol features, queue count, owner", async () => {
    const c = connect();
    const info = c.frontend.handshake();
    assert.equal(info.features, VIRTIOFSD_FEATURES);
    // virtiofsd offers MQ, REPLY_ACK and others; tskvm keeps only what it uses.
    assert.equal(info.protocolFeatures, bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK));
    assert.equal(info.queueCount, 2);
    const log = await c.finish();
    assert.deepEqual(requestsOf(log), ["GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM", "SET_OWNER"]);
    assert.equal(log[2]!.flags & FLAG_NEED_REPLY, 0, "no ack asked before REPLY_ACK is in force");
    assert.equal(log[4]!.flags & FLAG_NEED_REPLY, FLAG_NEED_REPLY, "SET_OWNER is acknowledged");
    for (const r of log) assert.equal(r.flags & 3, VERSION);
  });

  it("skips protocol features when the back end has none", async () => {
    const c = connect({ features: bit(32) });
    const info = c.frontend.handshake();
    assert.equal(info.protocolFeatures, 0n);
    assert.equal(info.queueCount, undefined);
    assert.deepEqual(requestsOf(await c.finish()), ["GET_FEATURES", "SET_OWNER"]);
  });

  it("sends the memory table with one descriptor per region, readable by the back end", async () => {
    const fd = memfdCreate("test-ram");
    ftruncate(fd, 2 * 65536);
    sys.pwrite(fd, u8([0xaa, 1, 2, 3, 4, 5, 6, 7]), 0);
    sys.pwrite(fd, u8([0xbb, 1, 2, 3, 4, 5, 6, 7]), 65536);
    const c = connect();
    c.frontend.handshake();
    c.frontend.setMemTable([
      { guestAddress: 0n, size: 65536n, userAddress: 0x7f00_0000_0000n, mmapOffset: 0n, fd },
      { guestAddress: 0x1_0000_0000n, size: 65536n, userAddress: 0x7f00_0001_0000n, mmapOffset: 65536n, fd },
    ]);
    const log = await c.finish();
    sys.close(fd);
    const m = log.find((r) => r.request === Request.SET_MEM_TABLE)!;
    assert.equal(m.fdCount, 2);
    assert.deepEqual(m.regionHeads, ["aa01020304050607", "bb01020304050607"]);
    assert.equal(decodeMemTable(u8(m.payload))[1]!.guestAddress, 0x1_0000_0000n);
  });

  it("starts queues in QEMU's order and enables them last", async () => {
    const c = connect();
    c.frontend.handshake();
    const vrings = [vring(0), vring(1, 7)];
    c.frontend.start(bit(32) | bit(29), vrings);
    assert.deepEqual(c.frontend.runningQueues, [0, 1]);
    const log = await c.finish();
    closeVrings(vrings);
    const steps = requestsOf(log).slice(5);
    const perQueue = ["SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK", "SET_VRING_CALL"];
    assert.deepEqual(steps, ["SET_FEATURES", ...perQueue, ...perQueue, "SET_VRING_ENABLE", "SET_VRING_ENABLE"]);
    const setFeatures = decodeU64(u8(log[5]!.payload), "f");
    assert.equal(setFeatures, bit(32) | bit(29) | bit(30), "the guest's features plus PROTOCOL_FEATURES");
    const base = log.filter((r) => r.request === Request.SET_VRING_BASE).map((r) => decodeVringState(u8(r.payload), "b"));
    assert.deepEqual(base, [{ index: 0, num: 0 }, { index: 1, num: 7 }]);
    const kicks = log.filter((r) => r.request === Request.SET_VRING_KICK);
    assert.deepEqual(kicks.map((k) => k.fdCount), [1, 1]);
    const addr = decodeVringAddr(u8(log.find((r) => r.request === Request.SET_VRING_ADDR)!.payload));
    assert.equal(addr.used, vrings[0]!.usedAddress);
    assert.equal(addr.avail, vrings[0]!.availAddress);
  });

  it("stops queues with GET_VRING_BASE and returns where each would resume", async () => {
    const c = connect({ served: 5 });
    c.frontend.handshake();
    const vrings = [vring(0, 3), vring(1, 0xfffe)];
    c.frontend.start(bit(32), vrings);
    const bases = c.frontend.stop();
    assert.deepEqual([...bases], [[0, 8], [1, 3]]);
    assert.deepEqual(c.frontend.runningQueues, []);
    assert.deepEqual([...c.frontend.stop()], [], "stopping twice asks nothing");
    const log = await c.finish();
    closeVrings(vrings);
    assert.deepEqual(requestsOf(log).slice(-4), ["SET_VRING_ENABLE", "SET_VRING_ENABLE", "GET_VRING_BASE", "GET_VRING_BASE"]);
    const get = log.filter((r) => r.request === Request.GET_VRING_BASE);
    assert.ok(get.every((r) => (r.flags & FLAG_NEED_REPLY) === 0), "GET_VRING_BASE has its own reply");
  });

  it("resets with RESET_DEVICE only when the back end supports it", async () => {
    const withReset = connect({ protocolFeatures: 0x8c2bn | bit(ProtocolFeature.RESET_DEVICE) });
    withReset.frontend.handshake();
    const v1 = [vring(0)];
    withReset.frontend.start(bit(32), v1);
    withReset.frontend.reset();
    assert.deepEqual(requestsOf(await withReset.finish()).slice(-3), ["SET_VRING_ENABLE", "GET_VRING_BASE", "RESET_DEVICE"]);
    const without = connect();
    without.frontend.handshake();
    const v2 = [vring(0)];
    without.frontend.start(bit(32), v2);
    without.frontend.reset();
    assert.equal(requestsOf(await without.finish()).at(-1), "GET_VRING_BASE");
    closeVrings([...v1, ...v2]);
  });
});

describe("vhost-user front end against a hostile or dying back end", () => {
  const cases: { fault: Fault; at: number; kind: VhostUserError["kind"]; message: RegExp }[] = [
    { fault: "wrong-reply-id", at: Request.GET_FEATURES, kind: "protocol", message: /sent a reply to SET_FEATURES \(expected the reply to GET_FEATURES\)/ },
    { fault: "no-reply-flag", at: Request.GET_FEATURES, kind: "protocol", message: /without the REPLY flag/ },
    { fault: "bad-version", at: Request.GET_QUEUE_NUM, kind: "protocol", message: /protocol version 2/ },
    { fault: "huge-size", at: Request.GET_PROTOCOL_FEATURES, kind: "protocol", message: /1048576-byte payload/ },
    { fault: "eof", at: Request.GET_FEATURES, kind: "closed", message: /fake back end closed the connection \(GET_FEATURES\)/ },
    { fault: "eof-mid-message", at: Request.GET_QUEUE_NUM, kind: "closed", message: /in the middle of a message \(GET_QUEUE_NUM\)/ },
    { fault: "silent", at: Request.SET_OWNER, kind: "timeout", message: /did not answer in 300 ms \(waiting for the reply to SET_OWNER\)/ },
    { fault: "refuse", at: Request.SET_OWNER, kind: "refused", message: /refused SET_OWNER \(status 1\)/ },
    { fault: "fd-flood", at: Request.GET_FEATURES, kind: "protocol", message: /file descriptors/ },
  ];
  for (const c of cases) {
    it(`${c.fault} at ${requestName(c.at)}: ${c.kind}`, async () => {
      const fdsBefore = openFdCount();
      const conn = connect({ faultAt: c.at, fault: c.fault }, 300);
      expectVhostError(() => conn.frontend.handshake(), c.kind, c.message);
      await conn.finish();
      assert.equal(openFdCount(), fdsBefore, "no descriptor left open");
    });
  }

  it("continues a reply that arrives in pieces", async () => {
    const c = connect({ faultAt: Request.GET_QUEUE_NUM, fault: "split" });
    assert.equal(c.frontend.handshake().queueCount, 2);
    await c.finish();
  });

  it("reports a back end that dies while queues run, and refuses to use a closed channel", async () => {
    const c = connect({ faultAt: Request.GET_VRING_BASE, fault: "eof" });
    c.frontend.handshake();
    const vrings = [vring(0)];
    c.frontend.start(bit(32), vrings);
    expectVhostError(() => c.frontend.stop(), "closed", /closed the connection \(GET_VRING_BASE\)/);
    expectVhostError(() => c.frontend.setVringCall(0, -1), "closed", /closed the connection \(SET_VRING_CALL\)|closed/);
    await c.finish();
    expectVhostError(() => c.frontend.handshake(), "closed", /connection to fake back end is closed/);
    closeVrings(vrings);
  });

  it("sees a back end that hung up without being asked anything", async () => {
    const c = connect({ faultAt: Request.GET_FEATURES, fault: "eof" });
    assert.equal(c.frontend.channel.peerGone(), false);
    assert.throws(() => c.frontend.handshake());
    assert.equal(c.frontend.channel.peerGone(), true);
    await c.finish();
  });
});

function openFdCount(): number {
  return require("node:fs").readdirSync("/proc/self/fd").length;
}
