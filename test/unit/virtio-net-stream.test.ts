/**
 * virtio-net over the stream back end (src/host/stream-backend.ts), with a fake passt on
 * the other end of a real UNIX stream socketpair, over fake guest memory (copied) and
 * mmap'd memory (TX written in place from guest memory): frames both ways with the
 * virtio-net header added and left out, no offloads, a guest that sends faster than the
 * peer reads (nothing dropped, nothing cut), frames the peer cannot take, and the peer
 * going away (the link goes down, the guest is told).
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import * as sys from "../../src/sys/libc";
import { GuestMemory } from "../../src/memory/guest-memory";
import { VirtioFeatureBit, feature, type VirtioActivation } from "../../src/devices/virtio/types";
import { NET_QUEUE_SIZE, NetConfig, VIRTIO_NET_S_LINK_UP, VirtioNet, VirtioNetFeature } from "../../src/devices/virtio/net/device";
import { NetHdr, VIRTIO_NET_HDR_F_DATA_VALID } from "../../src/devices/virtio/net/header";
import { StreamNetBackend } from "../../src/host/stream-backend";
import { STREAM_MAX_FRAME } from "../../src/host/net-stream";
import { decodeFrames, drain, encodeFrames, streamPair, writeAll } from "../helpers/stream";
import { VirtqDriver } from "../helpers/virtq-driver";

const MiB = 1024 * 1024;
const V1 = feature(VirtioFeatureBit.VERSION_1);
const MRG = feature(VirtioNetFeature.MRG_RXBUF);
const GUEST_CSUM = feature(VirtioNetFeature.GUEST_CSUM);

const pattern = (n: number, seed: number): Uint8Array => Uint8Array.from({ length: n }, (_, i) => (i * 11 + seed * 17 + 1) & 0xff);

/** Everything the peer can read now, as frames (whole frames only). */
function peerFrames(peer: number): Uint8Array[] {
  return decodeFrames(drain(peer));
}

interface Harness {
  mem: GuestMemory;
  rx: VirtqDriver;
  tx: VirtqDriver;
  dev: VirtioNet;
  backend: StreamNetBackend;
  peer: number;
  ctx: VirtioActivation;
  configUpdates: [number, number[]][];
  logs: string[];
}

function harness(mode: "copied" | "in place", opts: { reportsOwnLoss?: boolean; sendBufferBytes?: number; guestCsum?: boolean } = {}): Harness {
  const mem = mode === "in place" ? GuestMemory.allocate(32 * MiB) : GuestMemory.forTest(32 * MiB);
  const rx = new VirtqDriver(mem, { size: NET_QUEUE_SIZE, index: 0, ringBase: 0x10000, dataBase: 0x100000, dataEnd: 0x800000 });
  const tx = new VirtqDriver(mem, { size: NET_QUEUE_SIZE, index: 1, ringBase: 0x20000, dataBase: 0x800000, dataEnd: 0x1000000 });
  const [ours, peer] = streamPair(sys.SOCK_NONBLOCK);
  const backend = new StreamNetBackend(ours, "passt", {
    reportsOwnLoss: opts.reportsOwnLoss ?? false,
    ...(opts.sendBufferBytes !== undefined ? { sendBufferBytes: opts.sendBufferBytes } : {}),
  });
  const logs: string[] = [];
  const dev = new VirtioNet(backend, { log: (l) => logs.push(l) });
  const configUpdates: [number, number[]][] = [];
  const ctx: VirtioActivation = {
    memory: mem,
    features: (V1 | MRG | dev.deviceFeatures) & (opts.guestCsum === false ? ~GUEST_CSUM : ~0n),
    queues: [rx.config(), tx.config()],
    signalUsed: () => undefined,
    needsReset: (r) => assert.fail(`needsReset: ${r}`),
    updateConfig: (offset, bytes) => configUpdates.push([offset, [...bytes]]),
  };
  dev.activate(ctx);
  return { mem, rx, tx, dev, backend, peer, ctx, configUpdates, logs };
}

/** The virtio-net header (12 bytes, num_buffers 1) and `payload`, as the guest sends it. */
function withHeader(payload: Uint8Array, numBuffers = 0): Uint8Array {
  const b = new Uint8Array(NetHdr.MRG_SIZE + payload.length);
  new DataView(b.buffer).setUint16(NetHdr.NUM_BUFFERS, numBuffers, true);
  b.set(payload, NetHdr.MRG_SIZE);
  return b;
}

/** Act as the I/O worker until the device stops asking for input or `rounds` run out. */
function pump(h: Harness, rounds = 100): void {
  for (let i = 0; i < rounds; i++) {
    const p = h.dev.pollFds()[0];
    if (p === undefined) return;
    const revents = sys.pollOne(p.fd, p.events, 0);
    if (revents === 0) return;
    h.dev.pollReady(p.fd, revents);
  }
}

/** RX used entries as frames: [header, payload] of each (num_buffers respected). */
function received(h: Harness, bufs: Map<number, { addr: number; len: number }>): { hdr: Uint8Array; payload: Uint8Array }[] {
  const used = h.rx.used();
  const out: { hdr: Uint8Array; payload: Uint8Array }[] = [];
  for (let i = 0; i < used.length; ) {
    const first = h.mem.slice(bufs.get(used[i]!.id)!.addr, used[i]!.len);
    const n = new DataView(first.buffer, first.byteOffset).getUint16(NetHdr.NUM_BUFFERS, true);
    const parts = used.slice(i, i + n).map((u) => h.mem.slice(bufs.get(u.id)!.addr, u.len));
    const all = Buffer.concat(parts);
    out.push({ hdr: new Uint8Array(all.subarray(0, NetHdr.MRG_SIZE)), payload: new Uint8Array(all.subarray(NetHdr.MRG_SIZE)) });
    i += n;
  }
  return out;
}

for (const mode of ["copied", "in place"] as const) {
  describe(`virtio-net over a passt stream (${mode})`, () => {
    it("offers GUEST_CSUM alone: no partial checksums from the guest, no segmentation either way", () => {
      const h = harness(mode);
      assert.equal(h.dev.offloads, false);
      assert.equal(h.dev.validChecksums, true);
      assert.equal(h.dev.deviceFeatures & GUEST_CSUM, GUEST_CSUM);
      for (const bit of ["CSUM", "GUEST_TSO4", "GUEST_TSO6", "HOST_TSO4", "HOST_TSO6", "GUEST_ECN", "HOST_ECN"] as const) {
        assert.equal(h.dev.deviceFeatures & feature(VirtioNetFeature[bit]), 0n, bit);
      }
      assert.equal(new DataView(h.dev.config.buffer).getUint16(NetConfig.STATUS, true), VIRTIO_NET_S_LINK_UP);
    });

    for (const guestCsum of [true, false]) {
      it(`peer -> guest: frames arrive after a header saying ${guestCsum ? "DATA_VALID (GUEST_CSUM taken)" : "nothing (GUEST_CSUM not taken)"}, a large one over several buffers`, () => {
        const h = harness(mode, { guestCsum });
        const bufs = new Map<number, { addr: number; len: number }>();
        for (let i = 0; i < 64; i++) {
          const b = h.rx.writable(4096);
          bufs.set(h.rx.add([b]), b);
        }
        const frames = [pattern(60, 1), pattern(1514, 2), pattern(STREAM_MAX_FRAME, 3)];
        writeAll(h.peer, encodeFrames(...frames));
        pump(h);
        const got = received(h, bufs);
        assert.deepEqual(got.map((g) => g.payload), frames);
        for (const g of got) {
          assert.equal(g.hdr[NetHdr.FLAGS], guestCsum ? VIRTIO_NET_HDR_F_DATA_VALID : 0);
          assert.deepEqual([...g.hdr.subarray(1, NetHdr.NUM_BUFFERS)], new Array(NetHdr.NUM_BUFFERS - 1).fill(0), "GSO and checksum fields zero");
        }
      });
    }

    it("guest -> peer: frames leave without their header, from guest memory", () => {
      const h = harness(mode);
      const frames = [pattern(60, 4), pattern(1514, 5), pattern(STREAM_MAX_FRAME, 6)];
      for (const fr of frames) {
        const whole = withHeader(fr);
        // Header and body in separate buffers, as Linux sends them.
        h.tx.add([h.tx.readable(whole.subarray(0, NetHdr.MRG_SIZE)), h.tx.readable(whole.subarray(NetHdr.MRG_SIZE))]);
      }
      h.dev.queueNotified(1);
      assert.deepEqual(peerFrames(h.peer), frames);
      assert.equal(h.dev.stats.txFrames, 3);
    });

    it("a guest faster than the peer: frames wait in the ring, none dropped or cut", () => {
      const h = harness(mode, { sendBufferBytes: 64 * 1024 });
      const sent: Uint8Array[] = [];
      for (let i = 0; i < 120; i++) {
        const fr = pattern(i % 3 === 0 ? 65000 : 1500, i);
        sent.push(fr);
        h.tx.add([h.tx.readable(withHeader(fr))]);
      }
      h.dev.queueNotified(1);
      assert.ok(h.dev.stats.txRetries > 0, "the socket filled up");
      assert.ok(h.tx.used().length < 120, "the rest stays in the ring");
      const got: Uint8Array[] = [];
      for (let i = 0; i < 10_000 && got.length < sent.length; i++) {
        got.push(...peerFrames(h.peer));
        pump(h);
      }
      assert.equal(got.length, sent.length);
      for (let i = 0; i < sent.length; i++) assert.deepEqual(got[i], sent[i], `frame ${i}`);
      assert.equal(h.dev.stats.txDropped, 0);
    });

    it("a frame larger than passt takes is dropped and counted, the next goes out", () => {
      const h = harness(mode);
      h.tx.add([h.tx.readable(withHeader(pattern(STREAM_MAX_FRAME + 1, 7)))]);
      h.tx.add([h.tx.readable(withHeader(pattern(100, 8)))]);
      h.dev.queueNotified(1);
      assert.deepEqual(peerFrames(h.peer), [pattern(100, 8)]);
      assert.equal(h.dev.stats.txDropped, 1);
      assert.match(h.logs[0] ?? "", /passt refused a 65548-byte frame: a 65536-byte Ethernet frame: passt takes 1 to 65535 bytes/);
    });

    for (const owner of [true, false]) {
      it(`the peer going away takes the link down, even when the guest is not reading (${owner ? "its owner reports it" : "the device reports it"})`, () => {
        const h = harness(mode, { reportsOwnLoss: owner });
        const b = h.rx.writable(2048);
        h.rx.add([b]);
        writeAll(h.peer, encodeFrames(pattern(80, 9)));
        sys.close(h.peer);
        pump(h);
        assert.equal(h.rx.used().length, 1, "the frame sent before closing is delivered");
        assert.deepEqual(h.configUpdates, [[NetConfig.STATUS, [0, 0]]]);
        assert.deepEqual(h.dev.pollFds(), []);
        if (owner) assert.deepEqual(h.logs, []);
        else assert.deepEqual(h.logs, ["virtio-net: passt closed the connection; no longer using it, the link is down"]);
      });

      it(`the peer going away while the guest reads: what it sent comes first (${owner ? "owner" : "device"} reports)`, () => {
        const h = harness(mode, { reportsOwnLoss: owner });
        for (let i = 0; i < 4; i++) h.rx.add([h.rx.writable(2048)]);
        writeAll(h.peer, encodeFrames(pattern(80, 10), pattern(90, 11)));
        sys.close(h.peer);
        pump(h);
        assert.equal(h.rx.used().length, 2);
        assert.deepEqual(h.configUpdates, [[NetConfig.STATUS, [0, 0]]]);
        if (!owner) assert.deepEqual(h.logs, ["virtio-net: reading passt failed: the peer closed the connection; no longer using it, the link is down"]);
      });
    }
  });
}
