/**
 * virtio-net back end over fake guest memory and an in-memory fake TAP: both directions,
 * merged RX buffers, no buffers (TAP not polled, nothing lost), frames waiting for
 * buffers, offload headers passed through, feature/offload negotiation, and hostile or
 * malformed chains (DEVICE_NEEDS_RESET, the VMM carries on).
 */
import { after, describe, it } from "node:test";
import assert from "node:assert/strict";
import { GuestMemory } from "../../src/memory/guest-memory";
import { type VirtioActivation, VirtioDeviceType, VirtioFeatureBit, feature } from "../../src/devices/virtio/types";
import { NET_QUEUE_SIZE, NetConfig, VIRTIO_NET_S_LINK_UP, VirtioNet, VirtioNetFeature, defaultMac } from "../../src/devices/virtio/net/device";
import { NET_MAX_FRAME, NET_MAX_IOV, NetHdr, VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM, VirtioNetGso } from "../../src/devices/virtio/net/header";
import type { FrameBatch, NetBackend } from "../../src/devices/virtio/net/backend";
import { MacAddressError, formatMac, parseMac } from "../../src/api/option-values";
import { TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN } from "../../src/host/tap";
import { VIRTQ_DESC_F_WRITE } from "../../src/devices/virtio/queue";
import * as sys from "../../src/sys/libc";
import { type Buf, VirtqDriver } from "../helpers/virtq-driver";

const MiB = 1024 * 1024;
const V1 = feature(VirtioFeatureBit.VERSION_1);
const EVENT_IDX = feature(VirtioFeatureBit.RING_EVENT_IDX);
const INDIRECT = feature(VirtioFeatureBit.RING_INDIRECT_DESC);
const f = (bit: number): bigint => feature(bit);
const MRG = f(VirtioNetFeature.MRG_RXBUF);
const GUEST_CSUM = f(VirtioNetFeature.GUEST_CSUM);
const GUEST_TSO4 = f(VirtioNetFeature.GUEST_TSO4);
const GUEST_TSO6 = f(VirtioNetFeature.GUEST_TSO6);
const GUEST_ECN = f(VirtioNetFeature.GUEST_ECN);

/** An in-memory TAP: frames queued for the guest, frames the guest sent. */
class FakeTap implements NetBackend {
  readonly fd: number = 777;
  readonly name: string;
  /** Frames (vnet header first) the TAP will hand out, oldest first. */
  toGuest: Uint8Array[] = [];
  fromGuest: Uint8Array[] = [];
  offloads: number[] = [];
  hdrSizes: number[] = [];
  reads = 0;
  /** Frames written through writev, and reads through readv (in place). */
  vectored = 0;
  readvs = 0;
  /** write returns 0 (EAGAIN) while set. */
  blocked = false;
  /** write throws this (the TAP refused the frame). */
  writeError: Error | undefined;
  acceptOffload = true;

  constructor(name = "faketap0") {
    this.name = name;
  }
  read(buf: Uint8Array): number {
    const fr = this.toGuest.shift();
    if (fr === undefined) return 0;
    this.reads++;
    buf.set(fr.subarray(0, Math.min(fr.length, buf.length)));
    return fr.length;
  }
  write(buf: Uint8Array, length: number): number {
    if (this.writeError !== undefined) throw this.writeError;
    if (this.blocked) return 0;
    this.fromGuest.push(buf.slice(0, length));
    return length;
  }
  setOffload(flags: number): void {
    if (!this.acceptOffload && flags !== 0) throw new Error("ioctl TUNSETOFFLOAD failed: EINVAL (invalid argument)");
    this.offloads.push(flags);
  }
  setVnetHeaderSize(bytes: number): void {
    this.hdrSizes.push(bytes);
  }
}

/**
 * The same fake, with readv/writev that go through a real kernel socket (SOCK_SEQPACKET
 * socketpair, one message per frame): with mmap'd guest memory the device then moves
 * frames in place, through iovecs of host addresses, as it does with a real TAP.
 */
class SocketBackedTap extends FakeTap {
  override readonly fd: number;
  private readonly peer: number;
  private readonly scratch = new Uint8Array(80 * 1024);

  constructor() {
    super();
    [this.fd, this.peer] = sys.socketpair(sys.AF_UNIX, sys.SOCK_SEQPACKET | sys.SOCK_NONBLOCK);
    sockets.push(this.fd, this.peer);
  }
  readv(iov: Uint8Array, count: number): number {
    const fr = this.toGuest.shift();
    if (fr === undefined) return 0;
    this.reads++;
    this.readvs++;
    sys.write(this.peer, fr);
    const n = sys.readv(this.fd, iov, count);
    assert.ok(n > 0);
    return fr.length; // a TAP reports the whole frame even when the buffers were short
  }
  writev(iov: Uint8Array, count: number): number {
    if (this.writeError !== undefined) throw this.writeError;
    if (this.blocked) return 0;
    const n = sys.writev(this.fd, iov, count);
    const m = sys.read(this.peer, this.scratch);
    assert.equal(m, n);
    this.fromGuest.push(this.scratch.slice(0, m));
    this.vectored++;
    return n;
  }
}
/**
 * The socket-backed fake with writeFrames: TX goes out in batches, frame by frame through
 * writev, and a frame that would block (or is refused) shows in the batch's results as a
 * TAP on io_uring reports it. `calls` counts writeFrames calls.
 */
class BatchingTap extends SocketBackedTap {
  calls = 0;
  readCalls = 0;
  readFrames(batch: FrameBatch): void {
    this.readCalls++;
    const iov = batch.iov.bytes;
    for (let k = 0; k < batch.frames; k++) batch.result[k] = this.readv(iov.subarray(16 * batch.start[k]!), batch.count[k]!);
  }
  writeFrames(batch: FrameBatch, from: number): void {
    this.calls++;
    const iov = batch.iov.bytes;
    for (let k = from; k < batch.frames; k++) {
      if (this.blocked) {
        for (let j = k; j < batch.frames; j++) batch.result[j] = 0;
        return;
      }
      if (this.writeError !== undefined) {
        batch.result[k] = -22; // EINVAL
        continue;
      }
      batch.result[k] = this.writev(iov.subarray(16 * batch.start[k]!), batch.count[k]!);
    }
  }
}
const sockets: number[] = [];
after(() => {
  for (const fd of sockets) sys.close(fd);
});

const pattern = (n: number, seed: number): Uint8Array => Uint8Array.from({ length: n }, (_, i) => (i * 13 + seed * 31 + 5) & 0xff);

/** A virtio-net header (12 bytes unless hdrSize says 10) followed by `payload`. */
function frame(payload: Uint8Array, hdr: Partial<Record<"flags" | "gsoType" | "hdrLen" | "gsoSize" | "csumStart" | "csumOffset" | "numBuffers", number>> = {}, hdrSize = 12): Uint8Array {
  const b = new Uint8Array(hdrSize + payload.length);
  const v = new DataView(b.buffer);
  b[0] = hdr.flags ?? 0;
  b[1] = hdr.gsoType ?? 0;
  v.setUint16(2, hdr.hdrLen ?? 0, true);
  v.setUint16(4, hdr.gsoSize ?? 0, true);
  v.setUint16(6, hdr.csumStart ?? 0, true);
  v.setUint16(8, hdr.csumOffset ?? 0, true);
  if (hdrSize === 12) v.setUint16(10, hdr.numBuffers ?? 0, true);
  b.set(payload, hdrSize);
  return b;
}

interface Harness {
  mem: GuestMemory;
  rx: VirtqDriver;
  tx: VirtqDriver;
  tap: FakeTap;
  dev: VirtioNet;
  ctx: VirtioActivation;
  signals: number[];
  resets: string[];
  /** updateConfig calls: [offset, bytes]. */
  configUpdates: [number, number[]][];
  logs: string[];
  /** Buffers of each RX chain by head. */
  rxBufs: Map<number, Buf[]>;
}

type Mode = "copied" | "in place" | "batches";

function harness(opts: { mode?: Mode; features?: bigint; tap?: FakeTap; activate?: boolean; mac?: string; mtu?: number } = {}): Harness {
  const inPlace = opts.mode === "in place" || opts.mode === "batches";
  const mem = inPlace ? GuestMemory.allocate(32 * MiB) : GuestMemory.forTest(32 * MiB);
  const rx = new VirtqDriver(mem, { size: NET_QUEUE_SIZE, index: 0, ringBase: 0x10000, dataBase: 0x100000, dataEnd: 0x800000 });
  const tx = new VirtqDriver(mem, { size: NET_QUEUE_SIZE, index: 1, ringBase: 0x20000, dataBase: 0x800000, dataEnd: 0x1000000 });
  const tap = opts.tap ?? (opts.mode === "batches" ? new BatchingTap() : inPlace ? new SocketBackedTap() : new FakeTap());
  const logs: string[] = [];
  const dev = new VirtioNet(tap, {
    log: (l) => logs.push(l),
    ...(opts.mac !== undefined ? { mac: parseMac(opts.mac) } : {}),
    ...(opts.mtu !== undefined ? { mtu: opts.mtu } : {}),
  });
  const signals: number[] = [];
  const resets: string[] = [];
  const configUpdates: [number, number[]][] = [];
  const ctx: VirtioActivation = {
    memory: mem,
    features: opts.features ?? (V1 | dev.deviceFeatures),
    queues: [rx.config(), tx.config()],
    signalUsed: (i) => signals.push(i),
    needsReset: (r) => resets.push(r),
    updateConfig: (offset, bytes) => configUpdates.push([offset, [...bytes]]),
  };
  if (opts.activate ?? true) dev.activate(ctx);
  return { mem, rx, tx, tap, dev, ctx, signals, resets, configUpdates, logs, rxBufs: new Map() };
}

/** Post `count` RX chains of one writable buffer of `size` bytes each. */
function postRx(h: Harness, count: number, size = 1526): number[] {
  const heads: number[] = [];
  for (let i = 0; i < count; i++) {
    const b = h.rx.writable(size);
    const head = h.rx.add([b]);
    h.rxBufs.set(head, [b]);
    heads.push(head);
  }
  return heads;
}

/** The bytes the device wrote into an RX chain (its buffers in order, up to len). */
function rxBytes(h: Harness, head: number, len: number): Uint8Array {
  const out = new Uint8Array(len);
  let off = 0;
  for (const b of h.rxBufs.get(head)!) {
    const n = Math.min(b.len, len - off);
    out.set(h.mem.slice(b.addr, n), off);
    off += n;
    if (off === len) break;
  }
  return out;
}

/** Used RX entries since last time, grouped into frames by num_buffers. */
function rxFrames(h: Harness): { bytes: Uint8Array; numBuffers: number; lens: number[] }[] {
  const used = h.rx.used();
  const out: { bytes: Uint8Array; numBuffers: number; lens: number[] }[] = [];
  for (let i = 0; i < used.length; ) {
    const first = rxBytes(h, used[i]!.id, used[i]!.len);
    const n = new DataView(first.buffer).getUint16(NetHdr.NUM_BUFFERS, true);
    assert.ok(n >= 1 && i + n <= used.length, `num_buffers ${n} at used entry ${i} of ${used.length}`);
    const parts = used.slice(i, i + n);
    const total = parts.reduce((s, u) => s + u.len, 0);
    const bytes = new Uint8Array(total);
    let off = 0;
    for (const u of parts) {
      bytes.set(rxBytes(h, u.id, u.len), off);
      off += u.len;
    }
    out.push({ bytes, numBuffers: n, lens: parts.map((u) => u.len) });
    i += n;
  }
  return out;
}

/** The header bytes with num_buffers replaced, for comparing what the TAP gave with what the guest got. */
function withNumBuffers(fr: Uint8Array, n: number): Uint8Array {
  const c = fr.slice();
  new DataView(c.buffer).setUint16(NetHdr.NUM_BUFFERS, n, true);
  return c;
}

const pollEvents = (h: Harness): number => {
  const fds = h.dev.pollFds();
  assert.ok(fds.length <= 1);
  if (fds.length === 0) return 0;
  assert.equal(fds[0]!.fd, h.tap.fd);
  return fds[0]!.events;
};

/** Act as the I/O worker: while the device polls the TAP for input and it has some, deliver POLLIN. */
function pump(h: Harness): void {
  for (let i = 0; i < 1000 && (pollEvents(h) & sys.POLLIN) !== 0 && h.tap.toGuest.length > 0; i++) h.dev.pollReady(h.tap.fd, sys.POLLIN);
}

/** Send one TX chain over `bufs` and kick. */
function sendTx(h: Harness, bufs: Buf[], opts: { indirect?: boolean } = {}): number {
  const head = h.tx.add(bufs, opts);
  h.dev.queueNotified(1);
  return head;
}

for (const mode of ["copied", "in place", "batches"] as const) {
  describe(`virtio-net identity and configuration (${mode})`, () => {
    it("is device type 1 with an RX and a TX queue of 256", () => {
      const h = harness({ mode, activate: false });
      assert.equal(h.dev.deviceType, VirtioDeviceType.NET);
      assert.equal(h.dev.queueCount, 2);
      assert.equal(h.dev.maxQueueSize, 256);
    });

    it("config space: MAC, link up, one queue pair; MTU only when asked", () => {
      const h = harness({ mode, activate: false, mac: "02:00:00:aa:bb:cc" });
      const c = new DataView(h.dev.config.buffer);
      assert.equal(h.dev.config.length, NetConfig.SIZE);
      assert.equal(formatMac(h.dev.config.subarray(NetConfig.MAC, NetConfig.MAC + 6)), "02:00:00:aa:bb:cc");
      assert.equal(c.getUint16(NetConfig.STATUS, true), VIRTIO_NET_S_LINK_UP);
      assert.equal(c.getUint16(NetConfig.MAX_VIRTQUEUE_PAIRS, true), 1);
      assert.equal(c.getUint16(NetConfig.MTU, true), 0);
      assert.equal(h.dev.deviceFeatures & f(VirtioNetFeature.MTU), 0n);
      const m = harness({ mode, activate: false, mtu: 9000 });
      assert.equal(new DataView(m.dev.config.buffer).getUint16(NetConfig.MTU, true), 9000);
      assert.notEqual(m.dev.deviceFeatures & f(VirtioNetFeature.MTU), 0n);
      assert.throws(() => new VirtioNet(new FakeTap(), { mtu: 20 }), /MTU 20 is not an integer from 68 to 65535/);
    });

    it("offers MAC, STATUS, MRG_RXBUF and, when the TAP takes TUNSETOFFLOAD, the checksum and TSO offloads", () => {
      const h = harness({ mode, activate: false });
      const want = [
        VirtioNetFeature.MAC,
        VirtioNetFeature.STATUS,
        VirtioNetFeature.MRG_RXBUF,
        VirtioNetFeature.CSUM,
        VirtioNetFeature.GUEST_CSUM,
        VirtioNetFeature.HOST_TSO4,
        VirtioNetFeature.HOST_TSO6,
        VirtioNetFeature.HOST_ECN,
        VirtioNetFeature.GUEST_TSO4,
        VirtioNetFeature.GUEST_TSO6,
        VirtioNetFeature.GUEST_ECN,
      ];
      assert.equal(h.dev.deviceFeatures, want.reduce((a, b) => a | f(b), 0n));
      assert.deepEqual(h.tap.offloads, [TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN, 0], "probed, then left off");
      assert.equal(h.dev.offloads, true);

      const plain = new FakeTap();
      plain.acceptOffload = false;
      const p = harness({ mode, activate: false, tap: plain });
      assert.equal(p.dev.offloads, false);
      assert.equal(p.dev.deviceFeatures, f(VirtioNetFeature.MAC) | f(VirtioNetFeature.STATUS) | f(VirtioNetFeature.MRG_RXBUF));
      // The probe result can come from elsewhere (no ioctl then).
      const told = new FakeTap();
      const d = new VirtioNet(told, { offloads: false });
      assert.equal(d.deviceFeatures & f(VirtioNetFeature.CSUM), 0n);
      assert.deepEqual(told.offloads, []);
    });

    it("default MAC: 52:54:00 + a hash of the TAP name, stable; parseMac checks its input", () => {
      const a = defaultMac("tap0");
      assert.deepEqual(Array.from(a.subarray(0, 3)), [0x52, 0x54, 0x00]);
      assert.equal((a[0]! & 2) !== 0 && (a[0]! & 1) === 0, true, "locally administered unicast");
      assert.deepEqual(defaultMac("tap0"), a);
      assert.notDeepEqual(defaultMac("tap1"), a);
      assert.deepEqual(harness({ mode, activate: false }).dev.mac, defaultMac("faketap0"));
      assert.deepEqual(Array.from(parseMac("52:54:00:AB:cd:0f")), [0x52, 0x54, 0, 0xab, 0xcd, 0x0f]);
      assert.deepEqual(Array.from(parseMac("2-0-0-1-2-3")), [2, 0, 0, 1, 2, 3]);
      for (const bad of ["52:54:00:ab:cd", "52:54:00:ab:cd:0g", "525400abcd0f", "52:54:00:ab:cd:0f:11", "", "123:4:5:6:7:8"]) {
        assert.throws(() => parseMac(bad), (e: unknown) => e instanceof MacAddressError && /is not six hex bytes separated by colons/.test(e.message));
      }
      assert.throws(() => parseMac("01:00:5e:00:00:01"), /multicast/);
      assert.throws(() => parseMac("00:00:00:00:00:00"), /all zeroes/);
    });

    it("sets the TAP's header size from the negotiated features: 12 with VERSION_1 or MRG_RXBUF, else 10", () => {
      for (const [features, size] of [
        [V1, 12],
        [V1 | MRG, 12],
        [MRG, 12],
        [0n, 10],
      ] as const) {
        const h = harness({ mode, features });
        assert.equal(h.dev.vnetHeaderSize, size);
        assert.equal(h.tap.hdrSizes.at(-1), size);
      }
    });

    it("turns on the TAP offloads the guest accepted (GUEST_*), and off at reset", () => {
      const h = harness({ mode, features: V1 | MRG | GUEST_CSUM | GUEST_TSO4 });
      assert.equal(h.tap.offloads.at(-1), TUN_F_CSUM | TUN_F_TSO4);
      h.dev.reset();
      assert.equal(h.tap.offloads.at(-1), 0);
      const all = harness({ mode, features: V1 | GUEST_CSUM | GUEST_TSO4 | GUEST_TSO6 | GUEST_ECN });
      assert.equal(all.tap.offloads.at(-1), TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN);
      // TSO without checksum offload means nothing (the TAP would refuse it): none.
      const noCsum = harness({ mode, features: V1 | GUEST_TSO4 });
      assert.equal(noCsum.tap.offloads.at(-1), 0);
    });
  });

  describe(`virtio-net TX: guest -> TAP (${mode})`, () => {
    it("writes each chain (header + frame) to the TAP as one frame, however it is split", () => {
      const h = harness({ mode });
      const a = frame(pattern(60, 1));
      const b = frame(pattern(1514, 2));
      const c = frame(pattern(3000, 3));
      sendTx(h, [h.tx.readable(a)]);
      // Header alone, then the frame over three buffers.
      sendTx(h, [h.tx.readable(b.subarray(0, 12)), h.tx.readable(b.subarray(12, 100)), h.tx.readable(b.subarray(100, 1000)), h.tx.readable(b.subarray(1000))]);
      assert.deepEqual(h.tap.fromGuest, [a, b]);
      const used = h.tx.used();
      assert.deepEqual(
        used.map((u) => u.len),
        [0, 0],
        "TX buffers come back with nothing written",
      );
      assert.ok(h.signals.includes(1));
      // A batch of several, and one through an indirect table.
      const hi = harness({ mode, features: V1 | INDIRECT | MRG });
      hi.tx.addChain([hi.tx.readable(a)]);
      hi.tx.publish(hi.tx.addChain([hi.tx.readable(b)]));
      hi.tx.publish(0);
      hi.tx.add([hi.tx.readable(c.subarray(0, 12)), hi.tx.readable(c.subarray(12))], { indirect: true });
      hi.dev.queueNotified(1);
      assert.deepEqual(hi.tap.fromGuest, [b, a, c]);
      assert.equal(hi.dev.stats.txFrames, 3);
      assert.equal(hi.dev.stats.txBytes, a.length + b.length + c.length);
    });

    it("passes the offload header through unchanged (partial checksum, TSO)", () => {
      const h = harness({ mode });
      const gso = frame(pattern(20000, 4), {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
        gsoType: VirtioNetGso.TCPV4 | VirtioNetGso.ECN,
        hdrLen: 54,
        gsoSize: 1448,
        csumStart: 34,
        csumOffset: 16,
      });
      sendTx(h, [h.tx.readable(gso)]);
      assert.deepEqual(h.tap.fromGuest, [gso]);
    });

    it("uses the 10-byte header when neither VERSION_1 nor MRG_RXBUF was negotiated", () => {
      const h = harness({ mode, features: 0n });
      const fr = frame(pattern(100, 5), { flags: 0 }, 10);
      sendTx(h, [h.tx.readable(fr)]);
      assert.deepEqual(h.tap.fromGuest, [fr]);
    });

    it("a write that would block keeps the frame, polls for POLLOUT, and sends in order", () => {
      const h = harness({ mode });
      const frames = [1, 2, 3].map((s) => frame(pattern(200, s)));
      h.tap.blocked = true;
      for (const fr of frames) h.tx.add([h.tx.readable(fr)]);
      h.dev.queueNotified(1);
      assert.deepEqual(h.tap.fromGuest, []);
      assert.equal(pollEvents(h) & sys.POLLOUT, sys.POLLOUT);
      assert.equal(h.tx.used().length, 0, "the blocked chain is not returned yet");
      assert.equal(h.dev.stats.txRetries, 1);
      h.dev.queueNotified(1); // a kick while still blocked changes nothing
      assert.deepEqual(h.tap.fromGuest, []);
      // Receiving meanwhile does not disturb the frame that waits.
      postRx(h, 1);
      const incoming = frame(pattern(300, 9));
      h.tap.toGuest.push(incoming);
      pump(h);
      assert.deepEqual(rxFrames(h).map((g) => g.bytes), [withNumBuffers(incoming, 1)]);
      h.tap.blocked = false;
      h.dev.pollReady(h.tap.fd, sys.POLLOUT);
      assert.deepEqual(h.tap.fromGuest, frames);
      assert.equal(h.tx.used().length, 3);
      assert.equal(pollEvents(h) & sys.POLLOUT, 0);
      assert.equal(h.dev.stats.txDropped, 0);
    });

    it("a frame the TAP refuses is dropped and counted; the queue goes on", () => {
      const h = harness({ mode });
      h.tap.writeError = new Error("write failed: EINVAL (invalid argument)");
      sendTx(h, [h.tx.readable(frame(pattern(100, 1)))]);
      h.tap.writeError = undefined;
      const ok = frame(pattern(100, 2));
      sendTx(h, [h.tx.readable(ok)]);
      assert.deepEqual(h.tap.fromGuest, [ok]);
      assert.equal(h.tx.used().length, 2);
      assert.equal(h.dev.stats.txDropped, 1);
      assert.deepEqual(h.resets, []);
      assert.match(h.logs[0]!, /refused a 112-byte frame: (write failed: EINVAL|errno 22)/);
    });

    it(`a TX chain over ${NET_MAX_FRAME} bytes is dropped, in place or batched as when copied; the queue goes on`, () => {
      const h = harness({ mode, features: V1 | MRG });
      const big = frame(pattern(100 * 1024, 5));
      sendTx(h, [h.tx.readable(big.subarray(0, 12)), h.tx.readable(big.subarray(12))]);
      const atLimit = frame(pattern(NET_MAX_FRAME - 12, 6));
      sendTx(h, [h.tx.readable(atLimit.subarray(0, 12)), h.tx.readable(atLimit.subarray(12))]);
      assert.deepEqual(h.tap.fromGuest, [atLimit], "only the frame within the limit reached the TAP");
      assert.equal(h.tap.vectored, mode === "copied" ? 0 : 1, "the frame within the limit went the usual way");
      assert.equal(h.tx.used().length, 2, "both chains went back to the driver");
      assert.equal(h.dev.stats.txDropped, 1);
      assert.deepEqual(h.resets, []);
      assert.match(h.logs.join("\n"), new RegExp(`dropped a ${big.length}-byte TX frame: larger than ${NET_MAX_FRAME} bytes`));
    });
  });

  describe(`virtio-net RX: TAP -> guest (${mode})`, () => {
    it("polls the TAP only while the guest has RX buffers, and delivers frames with num_buffers 1", () => {
      const h = harness({ mode, features: V1 });
      const frames = [frame(pattern(60, 1)), frame(pattern(1514, 2))];
      h.tap.toGuest.push(...frames);
      assert.equal(pollEvents(h), 0, "no buffers: the TAP is not polled");
      postRx(h, 4);
      assert.equal(pollEvents(h), sys.POLLIN);
      h.dev.pollReady(h.tap.fd, sys.POLLIN);
      const got = rxFrames(h);
      assert.deepEqual(
        got.map((g) => g.bytes),
        frames.map((fr) => withNumBuffers(fr, 1)),
      );
      assert.deepEqual(
        got.map((g) => g.lens),
        [[72], [1526]],
      );
      assert.deepEqual(h.signals, [0]);
      assert.equal(h.dev.stats.rxFrames, 2);
      assert.equal(h.dev.stats.rxBytes, 72 + 1526);
    });

    it("spreads a large frame over several buffers with MRG_RXBUF, num_buffers saying how many", () => {
      const h = harness({ mode, features: V1 | MRG | GUEST_CSUM | GUEST_TSO4 });
      postRx(h, 50, 1526);
      const big = frame(pattern(65000, 9), { flags: VIRTIO_NET_HDR_F_NEEDS_CSUM, gsoType: VirtioNetGso.TCPV4, hdrLen: 66, gsoSize: 1448, csumStart: 34, csumOffset: 16 });
      const small = frame(pattern(100, 3));
      h.tap.toGuest.push(big, small);
      pump(h);
      const got = rxFrames(h);
      assert.equal(got.length, 2);
      const need = Math.ceil(big.length / 1526);
      assert.equal(got[0]!.numBuffers, need);
      assert.deepEqual(got[0]!.lens, [...Array(need - 1).fill(1526), big.length - (need - 1) * 1526]);
      assert.deepEqual(got[0]!.bytes, withNumBuffers(big, need), "header (offload fields kept) and frame intact");
      assert.deepEqual(got[1]!.bytes, withNumBuffers(small, 1));
    });

    it("with no buffers nothing is read from the TAP; frames wait there and arrive when buffers do", () => {
      const h = harness({ mode, features: V1 | MRG | EVENT_IDX });
      const frames = Array.from({ length: 5 }, (_, i) => frame(pattern(500 + i, i)));
      h.tap.toGuest.push(...frames);
      h.dev.pollReady(h.tap.fd, sys.POLLIN); // a spurious wake-up
      assert.equal(h.tap.reads, 0);
      assert.equal(pollEvents(h), 0);
      // With EVENT_IDX the device has asked for a kick when the guest posts a buffer.
      const before = h.rx.availIdx;
      postRx(h, 2);
      assert.equal(h.rx.kickNeeded(before, h.rx.availIdx), true);
      h.dev.queueNotified(0); // the kick: the device reads the TAP at once
      assert.equal(h.tap.reads, 2, "read only as many frames as there were buffers");
      assert.equal(pollEvents(h), 0, "out of buffers again: TAP not polled");
      assert.equal(h.tap.toGuest.length, 3);
      postRx(h, 10);
      h.dev.queueNotified(0);
      pump(h);
      const got = rxFrames(h).map((g) => g.bytes);
      assert.deepEqual(
        got,
        frames.map((fr) => withNumBuffers(fr, 1)),
        "every frame, in order, none lost",
      );
      assert.equal(h.dev.stats.rxDropped, 0);
    });

    it("a frame bigger than the buffers posted waits (already read) until more buffers come", () => {
      const h = harness({ mode, features: V1 | MRG });
      postRx(h, 1, 1526);
      const big = frame(pattern(3000, 7));
      const next = frame(pattern(64, 8));
      h.tap.toGuest.push(big, next);
      pump(h);
      assert.equal(h.tap.reads, 1);
      assert.equal(h.rx.used().length, 0, "nothing returned: the frame is incomplete");
      assert.equal(pollEvents(h), 0, "the TAP is not read while a frame waits");
      assert.equal(h.dev.stats.rxWaits, 1);
      postRx(h, 1, 1000); // still not enough: 1526 + 1000 < 3012
      h.dev.queueNotified(0);
      assert.equal(h.rx.used().length, 0);
      postRx(h, 2, 1526);
      h.dev.queueNotified(0);
      pump(h);
      const got = rxFrames(h);
      assert.equal(got.length, 2);
      assert.equal(got[0]!.numBuffers, 3);
      assert.deepEqual(got[0]!.lens, [1526, 1000, big.length - 2526]);
      assert.deepEqual(got[0]!.bytes, withNumBuffers(big, 3));
      assert.deepEqual(got[1]!.bytes, withNumBuffers(next, 1));
      assert.equal(h.dev.stats.rxDropped, 0);
    });

    it("without MRG_RXBUF a frame goes in one chain; one too big for it is dropped and the chain reused", () => {
      const h = harness({ mode, features: V1 });
      const bufs = [h.rx.writable(12), h.rx.writable(2000), h.rx.writable(63000)];
      const head = h.rx.add(bufs);
      h.rxBufs.set(head, bufs);
      const fr = frame(pattern(40000, 1));
      h.tap.toGuest.push(fr);
      pump(h);
      const got = rxFrames(h);
      assert.deepEqual(got.map((g) => g.bytes), [withNumBuffers(fr, 1)]);
      postRx(h, 1, 1526);
      const tooBig = frame(pattern(3000, 2));
      const fits = frame(pattern(1000, 3));
      h.tap.toGuest.push(tooBig, fits);
      pump(h);
      assert.deepEqual(
        rxFrames(h).map((g) => g.bytes),
        [withNumBuffers(fits, 1)],
      );
      assert.equal(h.dev.stats.rxDropped, 1);
      assert.match(h.logs.join("\n"), /dropped a received frame: a 3000-byte frame does not fit the guest's 1514-byte RX buffer/);
      assert.deepEqual(h.resets, []);
    });

    it("passes the TAP's offload header to a guest that took GUEST_CSUM, and clears flags for one that did not", () => {
      const hdr = { flags: VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID, gsoType: VirtioNetGso.TCPV6, hdrLen: 74, gsoSize: 1428, csumStart: 54, csumOffset: 16 };
      const fr = frame(pattern(800, 6), hdr);
      const h = harness({ mode, features: V1 | MRG | GUEST_CSUM | GUEST_TSO6 });
      postRx(h, 1);
      h.tap.toGuest.push(fr);
      pump(h);
      assert.deepEqual(rxFrames(h)[0]!.bytes, withNumBuffers(fr, 1));

      const plain = harness({ mode, features: V1 | MRG });
      postRx(plain, 1);
      plain.tap.toGuest.push(frame(pattern(800, 6), { flags: VIRTIO_NET_HDR_F_DATA_VALID }));
      pump(plain);
      assert.equal(rxFrames(plain)[0]!.bytes[NetHdr.FLAGS], 0, "no GUEST_CSUM: flags must be 0");
    });

    it("RX chains may use several descriptors and indirect tables", () => {
      const h = harness({ mode, features: V1 | MRG | INDIRECT });
      const bufs = [h.rx.writable(10), h.rx.writable(5), h.rx.writable(2000)];
      const head = h.rx.add(bufs, { indirect: true });
      h.rxBufs.set(head, bufs);
      const fr = frame(pattern(1500, 2));
      h.tap.toGuest.push(fr);
      pump(h);
      assert.deepEqual(rxFrames(h)[0]!.bytes, withNumBuffers(fr, 1));
    });

    it("drops a runt from the TAP (shorter than the header) and goes on", () => {
      const h = harness({ mode, features: V1 | MRG });
      postRx(h, 2);
      const fr = frame(pattern(100, 1));
      h.tap.toGuest.push(new Uint8Array(5), fr);
      pump(h);
      assert.deepEqual(rxFrames(h).map((g) => g.bytes), [withNumBuffers(fr, 1)]);
      assert.equal(h.dev.stats.rxDropped, 1);
      assert.equal(h.dev.stats.rxFrames, 1);
    });

    it("moves frames in place when guest memory has host addresses, and copies otherwise", () => {
      const h = harness({ mode, features: V1 | MRG });
      postRx(h, 4);
      const fr = frame(pattern(1000, 1));
      h.tap.toGuest.push(fr);
      pump(h);
      assert.deepEqual(rxFrames(h)[0]!.bytes, withNumBuffers(fr, 1));
      const out = frame(pattern(1000, 2));
      sendTx(h, [h.tx.readable(out.subarray(0, 12)), h.tx.readable(out.subarray(12))]);
      assert.deepEqual(h.tap.fromGuest, [out]);
      assert.equal(h.tap.readvs, mode === "copied" ? 0 : 1);
      assert.equal(h.tap.vectored, mode === "copied" ? 0 : 1);
    });

    it(`a chain scattered over more than ${NET_MAX_IOV} buffers is copied instead`, () => {
      const h = harness({ mode, features: V1 | MRG });
      const bufs = Array.from({ length: 100 }, () => h.rx.writable(20));
      const head = h.rx.add(bufs);
      h.rxBufs.set(head, bufs);
      const fr = frame(pattern(1500, 3));
      h.tap.toGuest.push(fr);
      pump(h);
      assert.deepEqual(rxFrames(h)[0]!.bytes, withNumBuffers(fr, 1));
      assert.equal(h.tap.readvs, 0, "read into the host buffer");
      const out = frame(pattern(1900, 4));
      sendTx(h, Array.from({ length: 100 }, (_, i) => h.tx.readable(out.subarray(i * 19, i === 99 ? out.length : (i + 1) * 19))));
      assert.deepEqual(h.tap.fromGuest, [out]);
      assert.equal(h.tap.vectored, 0, "copied, then written");
    });

    it("reads no more frames than there are buffers, and resumes when more are posted", () => {
      const h = harness({ mode, features: V1 | MRG });
      postRx(h, 256, 200);
      for (let i = 0; i < 300; i++) h.tap.toGuest.push(frame(pattern(60, i)));
      h.dev.pollReady(h.tap.fd, sys.POLLIN);
      assert.equal(h.tap.reads, 256);
      assert.equal(h.rx.used().length, 256);
      postRx(h, 100, 200);
      assert.equal(pollEvents(h), sys.POLLIN);
      pump(h);
      assert.equal(h.tap.toGuest.length, 0);
    });

    it("a reset drops a half-placed frame; the next activation starts clean", () => {
      const h = harness({ mode, features: V1 | MRG });
      postRx(h, 1, 100);
      h.tap.toGuest.push(frame(pattern(500, 1)));
      pump(h);
      h.dev.reset();
      assert.equal(h.dev.stats.rxDropped, 1);
      assert.deepEqual(h.dev.pollFds(), []);
      // The driver re-initialises its rings and activates again.
      const rx = new VirtqDriver(h.mem, { size: NET_QUEUE_SIZE, index: 0, ringBase: 0x10000, dataBase: 0x100000, dataEnd: 0x800000 });
      const tx = new VirtqDriver(h.mem, { size: NET_QUEUE_SIZE, index: 1, ringBase: 0x20000, dataBase: 0x800000, dataEnd: 0x1000000 });
      const h2: Harness = { ...h, rx, tx, rxBufs: new Map() };
      h.dev.activate({ ...h.ctx, queues: [rx.config(), tx.config()] });
      postRx(h2, 2);
      const fr = frame(pattern(300, 2));
      h.tap.toGuest.push(fr);
      pump(h2);
      assert.deepEqual(rxFrames(h2).map((g) => g.bytes), [withNumBuffers(fr, 1)]);
    });

    it("a TAP that reports an error on poll (deleted) is no longer polled, and the link goes down", () => {
      const h = harness({ mode });
      postRx(h, 1);
      h.dev.pollReady(h.tap.fd, sys.POLLERR);
      assert.deepEqual(h.dev.pollFds(), []);
      assert.equal(h.logs.length, 1);
      assert.match(h.logs[0]!, /reports an error .*; no longer using it, the link is down/);
      assert.deepEqual(h.configUpdates, [[NetConfig.STATUS, [0, 0]]], "status: LINK_UP cleared, the driver told");
    });

    it("a lost back end: link down once, TX frames dropped (not written), nothing polled after a driver reset either", () => {
      class LosingTap extends FakeTap {
        readonly reportsOwnLoss = true;
        override read(): number {
          throw new Error("the peer closed the connection");
        }
      }
      const tap = new LosingTap();
      const h = harness({ mode, tap });
      postRx(h, 2);
      h.dev.pollReady(h.tap.fd, sys.POLLIN);
      assert.deepEqual(h.configUpdates, [[NetConfig.STATUS, [0, 0]]]);
      assert.deepEqual(h.logs, [], "its owner reports the loss: no line from the device");
      assert.deepEqual(h.dev.pollFds(), []);
      sendTx(h, [h.tx.readable(frame(pattern(100, 1)))]);
      assert.deepEqual(h.tap.fromGuest, [], "nothing written to a lost back end");
      assert.equal(h.dev.stats.txDropped, 1);
      assert.equal(h.tx.used().length, 1, "the chain is returned all the same");
      // Lost for good: a driver reset and re-activation keep the link down and say so again.
      h.dev.reset();
      h.configUpdates.length = 0;
      h.dev.activate(h.ctx);
      assert.deepEqual(h.configUpdates, [[NetConfig.STATUS, [0, 0]]]);
      assert.deepEqual(h.dev.pollFds(), []);
      h.dev.pollReady(h.tap.fd, sys.POLLIN);
      assert.equal(h.configUpdates.length, 1);
    });
  });

  describe(`virtio-net with a misbehaving driver (${mode})`, () => {
    function expectBroken(h: Harness, pattern: RegExp): void {
      assert.equal(h.resets.length, 1, `needsReset once: ${h.resets.join("; ")}`);
      assert.match(h.resets[0]!, pattern);
      assert.deepEqual(h.dev.pollFds(), [], "a broken device polls nothing");
      // Further kicks and polls are ignored, without throwing into the worker.
      h.dev.queueNotified(0);
      h.dev.queueNotified(1);
      h.dev.pollReady(h.tap.fd, sys.POLLIN | sys.POLLOUT);
      assert.equal(h.resets.length, 1);
    }

    it("a TX chain with a device-writable buffer breaks the device (after the frames before it)", () => {
      const h = harness({ mode });
      const good = frame(pattern(100, 1));
      h.tx.add([h.tx.readable(good)]);
      h.tx.add([h.tx.readable(frame(pattern(100, 2))), h.tx.writable(10)]);
      h.dev.queueNotified(1);
      assert.deepEqual(h.tap.fromGuest, [good]);
      expectBroken(h, /TX chain \(head \d+\) has device-writable buffers/);
    });

    it("a TX chain shorter than the header breaks the device", () => {
      const h = harness({ mode });
      sendTx(h, [h.tx.readable(new Uint8Array(8))]);
      expectBroken(h, /TX chain \(head \d+\) has 8 readable bytes, less than the 12-byte header/);
      assert.deepEqual(h.tap.fromGuest, []);
    });

    it("an RX chain with a device-readable buffer, or smaller than the header, breaks the device", () => {
      const h = harness({ mode });
      h.rx.add([h.rx.readable(new Uint8Array(100)), h.rx.writable(1500)]);
      h.tap.toGuest.push(frame(pattern(100, 1)));
      h.dev.pollReady(h.tap.fd, sys.POLLIN);
      expectBroken(h, /RX chain \(head \d+\) has device-readable buffers/);

      const s = harness({ mode, features: V1 | MRG });
      s.rx.add([s.rx.writable(8)]);
      s.tap.toGuest.push(frame(pattern(100, 1)));
      s.dev.pollReady(s.tap.fd, sys.POLLIN);
      expectBroken(s, /RX chain \(head \d+\) has 8 writable bytes, less than the 12-byte header/);
    });

    it("a hostile ring (avail index far ahead, descriptors outside RAM) breaks the device, not the VMM", () => {
      const h = harness({ mode });
      h.rx.setAvailIdx(1000);
      h.tap.toGuest.push(frame(pattern(100, 1)));
      h.dev.pollReady(h.tap.fd, sys.POLLIN);
      expectBroken(h, /virtqueue 0: available index 1000 is 1000 entries past 0/);

      const t = harness({ mode });
      t.tx.writeDescriptor(0, { addr: 0x7fff_0000_0000, len: 100 });
      t.tx.publish(0);
      t.dev.queueNotified(1);
      expectBroken(t, /virtqueue 1: descriptor 0: buffer 0x7fff00000000\+0x64 is outside guest RAM/);

      const w = harness({ mode });
      w.rx.writeDescriptor(0, { addr: 0x100000, len: 100, flags: VIRTQ_DESC_F_WRITE | 1, next: 0 });
      w.rx.publish(0);
      w.tap.toGuest.push(frame(pattern(100, 1)));
      w.dev.pollReady(w.tap.fd, sys.POLLIN);
      expectBroken(w, /virtqueue 0: chain from head 0 is longer than the queue size 256/);
    });

    it("after needsReset the driver can reset and start again", () => {
      const h = harness({ mode });
      sendTx(h, [h.tx.readable(new Uint8Array(4))]);
      assert.equal(h.resets.length, 1);
      h.dev.reset();
      const rx = new VirtqDriver(h.mem, { size: NET_QUEUE_SIZE, index: 0, ringBase: 0x10000, dataBase: 0x100000, dataEnd: 0x800000 });
      const tx = new VirtqDriver(h.mem, { size: NET_QUEUE_SIZE, index: 1, ringBase: 0x20000, dataBase: 0x800000, dataEnd: 0x1000000 });
      h.dev.activate({ ...h.ctx, queues: [rx.config(), tx.config()] });
      const fr = frame(pattern(100, 1));
      tx.add([tx.readable(fr)]);
      h.dev.queueNotified(1);
      assert.deepEqual(h.tap.fromGuest, [fr]);
    });

    it("queues that are not ready are ignored", () => {
      const h = harness({ mode, activate: false });
      h.dev.activate({ ...h.ctx, queues: [{ ...h.rx.config(), ready: false }, { ...h.tx.config(), ready: false }] });
      h.dev.queueNotified(0);
      h.dev.queueNotified(1);
      assert.deepEqual(h.dev.pollFds(), []);
      assert.deepEqual(h.resets, []);
    });
  });
}

describe("virtio-net TX in batches (a back end with writeFrames)", () => {
  it("a back end that is gone (a deleted TAP) takes no batch: the frames are dropped quietly, one line in all", () => {
    const h = harness({ mode: "batches" });
    const tap = h.tap as BatchingTap;
    postRx(h, 1);
    h.dev.pollReady(h.tap.fd, sys.POLLERR);
    tap.writeError = new Error("gone");
    for (let i = 0; i < 5; i++) h.tx.add([h.tx.readable(frame(pattern(100, i)))]);
    h.dev.queueNotified(1);
    assert.equal(tap.calls, 0, "nothing handed to the back end");
    assert.equal(h.tx.used().length, 5, "every chain goes back to the driver");
    assert.equal(h.dev.stats.txDropped, 5);
    assert.equal(h.logs.length, 1, h.logs.join("\n"));
  });

  it("a whole drain is one writeFrames call; a frame that would block stops the batch there, the rest follow in order", () => {
    const h = harness({ mode: "batches" });
    const tap = h.tap as BatchingTap;
    const frames = Array.from({ length: 10 }, (_, i) => frame(pattern(100 + i, i)));
    for (const fr of frames.slice(0, 5)) h.tx.add([h.tx.readable(fr)]);
    h.dev.queueNotified(1);
    assert.equal(tap.calls, 1);
    assert.deepEqual(tap.fromGuest, frames.slice(0, 5));
    // Blocked after two more frames have gone out: the other three wait, in order.
    let left = 2;
    const writev = tap.writev.bind(tap);
    tap.writev = (iov, count) => {
      const n = writev(iov, count);
      if (--left === 0) tap.blocked = true;
      return n;
    };
    for (const fr of frames.slice(5)) h.tx.add([h.tx.readable(fr)]);
    h.dev.queueNotified(1);
    assert.deepEqual(tap.fromGuest, frames.slice(0, 7));
    assert.equal(h.tx.used().length, 7);
    assert.equal(pollEvents(h) & sys.POLLOUT, sys.POLLOUT);
    tap.blocked = false;
    h.dev.pollReady(h.tap.fd, sys.POLLOUT);
    assert.deepEqual(tap.fromGuest, frames);
    assert.equal(h.tx.used().length, 3);
    assert.equal(pollEvents(h) & sys.POLLOUT, 0);
    assert.equal(h.dev.stats.txFrames, 10);
    assert.equal(h.dev.stats.txDropped, 0);
  });

  it("more buffers than iovecs take go alone through a copy, after the frames before them", () => {
    const h = harness({ mode: "batches", features: V1 | INDIRECT | MRG });
    const a = frame(pattern(100, 1));
    const big = frame(pattern(70 * 20, 2));
    const c = frame(pattern(100, 3));
    h.tx.add([h.tx.readable(a)]);
    // 70 buffers of 20 bytes (plus the header's): more than NET_MAX_IOV.
    const parts = [h.tx.readable(big.subarray(0, 12)), ...Array.from({ length: 70 }, (_, i) => h.tx.readable(big.subarray(12 + 20 * i, 32 + 20 * i)))];
    h.tx.add(parts, { indirect: true });
    h.tx.add([h.tx.readable(c)]);
    h.dev.queueNotified(1);
    assert.deepEqual(h.tap.fromGuest, [a, big, c]);
    assert.equal(h.tx.used().length, 3);
  });
});

describe("virtio-net RX in batches (a back end with readFrames)", () => {
  it("after 32 frames that fitted, reads frames into whole RX chains a batch at a time, in arrival order, num_buffers 1", () => {
    const h = harness({ mode: "batches", features: V1 | MRG });
    const tap = h.tap as BatchingTap;
    postRx(h, 32, 2048);
    h.tap.toGuest.push(...Array.from({ length: 32 }, (_, i) => frame(pattern(100, i))));
    pump(h);
    assert.equal(rxFrames(h).length, 32);
    assert.equal(tap.readCalls, 0, "frame by frame so far");
    postRx(h, 40, 2048);
    const frames = Array.from({ length: 50 }, (_, i) => frame(pattern(60 + 30 * i, i)));
    h.tap.toGuest.push(...frames);
    pump(h);
    assert.ok(tap.readCalls >= 2, "batches of chains");
    const got = rxFrames(h);
    assert.deepEqual(got.map((g) => g.bytes), frames.slice(0, 40).map((f) => withNumBuffers(f, 1)));
    // The rest arrive once the guest posts more buffers.
    postRx(h, 20, 2048);
    h.dev.queueNotified(0);
    pump(h);
    assert.deepEqual(rxFrames(h).map((g) => g.bytes), frames.slice(40).map((f) => withNumBuffers(f, 1)));
    assert.equal(h.dev.stats.rxFrames, 32 + 50);
    assert.equal(h.dev.stats.rxDropped, 0);
  });

  it("a frame longer than its chain (a jumbo MTU) is dropped, and RX goes on frame by frame, merging buffers", () => {
    const h = harness({ mode: "batches", features: V1 | MRG });
    const tap = h.tap as BatchingTap;
    postRx(h, 32, 1600);
    h.tap.toGuest.push(...Array.from({ length: 32 }, (_, i) => frame(pattern(100, i))));
    pump(h);
    assert.equal(rxFrames(h).length, 32);
    postRx(h, 8, 1600);
    const small = frame(pattern(100, 1));
    const jumbo = frame(pattern(3000, 2));
    const after = frame(pattern(3000, 3));
    h.tap.toGuest.push(small, jumbo);
    pump(h);
    assert.deepEqual(rxFrames(h).map((g) => g.bytes), [withNumBuffers(small, 1)]);
    assert.equal(h.dev.stats.rxDropped, 1);
    assert.match(h.logs.join("\n"), /receiving frame by frame from now on/);
    const calls = tap.readCalls;
    h.tap.toGuest.push(after);
    pump(h);
    assert.equal(tap.readCalls, calls, "no more batches");
    const got = rxFrames(h);
    assert.equal(got.length, 1);
    assert.equal(got[0]!.numBuffers, 2);
    assert.deepEqual(got[0]!.bytes, withNumBuffers(after, 2));
  });
});
