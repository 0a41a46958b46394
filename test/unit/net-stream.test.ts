/**
 * src/host/net-stream.ts against a fake peer on the other end of a real UNIX stream
 * socketpair: framing both ways, frames cut anywhere by the kernel or the peer, a frame
 * held back while the guest has no buffers, back-pressure without a lost or cut frame,
 * a short write's remainder, the peer closing or breaking the protocol.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import * as sys from "../../src/sys/libc";
import { NetStream, STREAM_MAX_FRAME } from "../../src/host/net-stream";
import { decodeFrames, drain, encodeFrames, streamPair, writeAll } from "../helpers/stream";


/** [ours (non-blocking), peer's (blocking unless asked)] */
function pair(peerNonBlocking = false): [number, number] {
  const [a, b] = streamPair();
  sys.fcntl(a, sys.F_SETFL, sys.fcntl(a, sys.F_GETFL) | sys.O_NONBLOCK);
  if (peerNonBlocking) sys.fcntl(b, sys.F_SETFL, sys.fcntl(b, sys.F_GETFL) | sys.O_NONBLOCK);
  return [a, b];
}

const pattern = (n: number, seed: number): Uint8Array => Uint8Array.from({ length: n }, (_, i) => (i * 7 + seed * 131 + 3) & 0xff);

/** Take every whole frame the stream has now. */
function receiveAll(s: NetStream): Uint8Array[] {
  const out: Uint8Array[] = [];
  for (let f = s.peekFrame(); f !== undefined; f = s.peekFrame()) {
    out.push(f.slice());
    s.consumeFrame();
  }
  return out;
}

describe("net stream: receiving (peer -> guest)", () => {
  it("hands out several frames that came in one read, in order, as views", () => {
    const [ours, peer] = pair();
    const s = new NetStream(ours);
    const frames = [pattern(60, 1), pattern(1514, 2), pattern(STREAM_MAX_FRAME, 3), pattern(14, 4)];
    writeAll(peer, encodeFrames(...frames));
    const got = receiveAll(s);
    assert.deepEqual(got, frames);
    assert.equal(s.stats.rxFrames, 4);
    assert.ok(s.stats.rxReads <= 2, `reads: ${s.stats.rxReads}`);
    assert.equal(s.down, undefined);
  });

  it("under a poller, makes no read it knows would find nothing, and reads again when told the socket is readable", () => {
    const [ours, peer] = pair();
    const s = new NetStream(ours);
    // Without a poller's reports every peek that finds no frame reads (and finds nothing).
    assert.equal(s.peekFrame(), undefined);
    assert.equal(s.stats.rxEmptyReads, 1);
    s.socketReadable();
    writeAll(peer, encodeFrames(pattern(60, 1)));
    assert.deepEqual(receiveAll(s), [pattern(60, 1)]);
    // That read came short: the socket is empty until the poller says otherwise.
    assert.equal(s.peekFrame(), undefined);
    assert.equal(s.stats.rxEmptyReads, 1, "no read after a short one");
    writeAll(peer, encodeFrames(pattern(61, 2)));
    assert.equal(s.peekFrame(), undefined, "not read before the poller reports it");
    s.socketReadable();
    assert.deepEqual(receiveAll(s), [pattern(61, 2)]);
    // A frame cut by the sender: its first part came short; the rest is read once reported.
    const bytes = encodeFrames(pattern(1000, 3));
    writeAll(peer, bytes.subarray(0, 500));
    s.socketReadable();
    assert.equal(s.peekFrame(), undefined);
    writeAll(peer, bytes.subarray(500));
    s.socketReadable();
    assert.deepEqual(receiveAll(s), [pattern(1000, 3)]);
    // The peer's close is read once reported.
    sys.close(peer);
    s.socketReadable();
    assert.equal(s.peekFrame(), undefined);
    assert.match(s.down ?? "", /closed/);
    assert.equal(s.stats.rxEmptyReads, 1);
    sys.close(ours);
  });

  it("waits for the rest of a frame cut anywhere, length word included", () => {
    const [ours, peer] = pair();
    const s = new NetStream(ours, { readBufferBytes: 2 * (STREAM_MAX_FRAME + 4) });
    const frames = [pattern(100, 5), pattern(3000, 6), pattern(70, 7)];
    const bytes = encodeFrames(...frames);
    const got: Uint8Array[] = [];
    // Byte by byte through the first 200 bytes (inside both length words), then in odd pieces.
    let at = 0;
    // 104 bytes hold frame 1 and its length word; 3004 frame 2; 74 frame 3.
    const cuts = [1, 1, 1, 1, 1, 2, 50, 47, 1, 1, 1, 1, 1, 1, 500, 1000, 1498, 4, 69, 1];
    for (const c of cuts) {
      writeAll(peer, bytes.subarray(at, at + c));
      at += c;
      got.push(...receiveAll(s));
      const whole = decodePrefix(bytes.subarray(0, at));
      assert.equal(got.length, whole, `after ${at} bytes: ${got.length} frames, expected ${whole}`);
    }
    assert.equal(at, bytes.length);
    assert.deepEqual(got, frames);
  });

  it("keeps a frame the guest cannot take yet and reads nothing more meanwhile", () => {
    const [ours, peer] = pair();
    const s = new NetStream(ours);
    writeAll(peer, encodeFrames(pattern(500, 8)));
    const first = s.peekFrame();
    assert.ok(first !== undefined);
    const reads = s.stats.rxReads;
    writeAll(peer, encodeFrames(pattern(600, 9)));
    // Not consumed: the same frame again, and the socket left alone.
    const again = s.peekFrame();
    assert.deepEqual(again, pattern(500, 8));
    assert.equal(s.stats.rxReads, reads);
    assert.ok(s.hasBufferedFrame);
    s.consumeFrame();
    assert.deepEqual(s.peekFrame(), pattern(600, 9));
  });

  it("compacts the buffer so that a largest frame always fits, over many rounds", () => {
    const [ours, peer] = pair();
    const s = new NetStream(ours, { readBufferBytes: 2 * (STREAM_MAX_FRAME + 4) });
    const sizes = [65535, 1, 40000, 65535, 9000, 65535, 65535, 14, 30000];
    let n = 0;
    for (let round = 0; round < 6; round++) {
      for (const size of sizes) {
        const f = pattern(size, n);
        writeAll(peer, encodeFrames(f));
        const got = s.peekFrame();
        assert.ok(got !== undefined, `frame ${n} (${size} bytes)`);
        assert.deepEqual(got, f);
        s.consumeFrame();
        n++;
      }
    }
  });

  it("skips empty frames", () => {
    const [ours, peer] = pair();
    const s = new NetStream(ours);
    writeAll(peer, encodeFrames(new Uint8Array(0), pattern(20, 1), new Uint8Array(0)));
    assert.deepEqual(receiveAll(s), [pattern(20, 1)]);
  });

  it("goes down on a frame longer than the limit and delivers nothing after it", () => {
    const [ours, peer] = pair();
    const s = new NetStream(ours);
    const bad = new Uint8Array(8);
    new DataView(bad.buffer).setUint32(0, STREAM_MAX_FRAME + 1, false);
    writeAll(peer, encodeFrames(pattern(30, 1)));
    writeAll(peer, bad);
    writeAll(peer, encodeFrames(pattern(30, 2)));
    assert.deepEqual(receiveAll(s), [pattern(30, 1)]);
    assert.match(s.down ?? "", /protocol error: the peer sent a 65536-byte frame \(at most 65535\)/);
    assert.equal(s.peekFrame(), undefined);
  });

  it("delivers what came before the peer closed, then is down", () => {
    const [ours, peer] = pair();
    const s = new NetStream(ours);
    writeAll(peer, encodeFrames(pattern(40, 1), pattern(41, 2)));
    sys.close(peer);
    assert.deepEqual(receiveAll(s), [pattern(40, 1), pattern(41, 2)]);
    assert.equal(s.down, "the peer closed the connection");
  });

  it("says so when the peer closes in the middle of a frame", () => {
    const [ours, peer] = pair();
    const s = new NetStream(ours);
    writeAll(peer, encodeFrames(pattern(100, 1)).subarray(0, 50));
    sys.close(peer);
    assert.equal(s.peekFrame(), undefined);
    assert.equal(s.down, "the peer closed the connection in the middle of a frame");
  });
});

/** How many whole frames a stream prefix holds. */
function decodePrefix(bytes: Uint8Array): number {
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let at = 0;
  let n = 0;
  while (bytes.length - at >= 4 && bytes.length - at - 4 >= v.getUint32(at, false)) {
    at += 4 + v.getUint32(at, false);
    n++;
  }
  return n;
}

/** A frame in a buffer of its own, as struct iovec entries cut at the given sizes (host addresses). */
function iovOf(bytes: Uint8Array, cuts: number[]): { iov: Uint8Array; count: number; keep: Uint8Array } {
  const keep = new Uint8Array(new ArrayBuffer(Math.max(bytes.length, 128)));
  keep.set(bytes);
  const base = sys.addressOf(keep.buffer);
  const iov = new Uint8Array(16 * cuts.length);
  const v = new DataView(iov.buffer);
  let at = 0;
  cuts.forEach((size, i) => {
    v.setBigUint64(16 * i, BigInt(base + at), true);
    v.setBigUint64(16 * i + 8, BigInt(size), true);
    at += size;
  });
  assert.equal(at, bytes.length);
  return { iov, count: cuts.length, keep };
}

describe("net stream: sending (guest -> peer)", () => {
  it("writes each frame after its big-endian length", () => {
    const [ours, peer] = pair(true);
    const s = new NetStream(ours);
    const frames = [pattern(60, 1), pattern(1514, 2), pattern(STREAM_MAX_FRAME, 3)];
    for (const f of frames) assert.equal(s.sendFrame(f), true);
    assert.deepEqual(decodeFrames(drain(peer)), frames);
    assert.equal(s.stats.txFrames, 3);
    assert.equal(s.wantsWrite, false);
  });

  it("sends from iovecs, leaving out the virtio-net header even when it spans buffers", () => {
    const [ours, peer] = pair(true);
    const s = new NetStream(ours);
    const hdr = new Uint8Array(12).fill(0xee);
    const body = pattern(3000, 4);
    const whole = Buffer.concat([hdr, body]);
    // Header cut 5 + 7, then the body in three pieces (one of them empty).
    const a = iovOf(whole, [5, 7, 1000, 0, 2000]);
    assert.equal(s.sendFrameIov(a.iov, a.count, 12), true);
    // Header and body start in the same buffer.
    const b = iovOf(whole, [100, 2912]);
    assert.equal(s.sendFrameIov(b.iov, b.count, 12), true);
    assert.deepEqual(decodeFrames(drain(peer)), [body, body]);
  });

  it("refuses a frame the peer could not take, and one when down", () => {
    const [ours, peer] = pair(true);
    const s = new NetStream(ours);
    assert.equal(s.frameFits(STREAM_MAX_FRAME + 1), false);
    assert.equal(s.frameFits(0), false);
    assert.equal(s.sendFrame(new Uint8Array(STREAM_MAX_FRAME + 1)), true, "dropped, not kept");
    assert.equal(drain(peer).length, 0);
    assert.equal(s.stats.txFrames, 0);
  });

  it("under back-pressure never starts a frame it cannot finish, and loses none", () => {
    const [ours, peer] = pair(true);
    const s = new NetStream(ours, { sendBufferBytes: 128 * 1024 });
    const sent: Uint8Array[] = [];
    const received: Uint8Array[] = [];
    let tail = new Uint8Array(0);
    let blocked = 0;
    // The peer reads only every few rounds; the guest keeps sending frames of mixed sizes.
    for (let i = 0; i < 400; i++) {
      const f = pattern([65535, 60, 1514, 32768, 9000, 36000][i % 6]!, i);
      while (!s.sendFrame(f)) {
        blocked++;
        assert.equal(s.wantsWrite, true);
        // What the peer has at this moment always ends on a frame boundary.
        const got = drain(peer);
        tail = Buffer.concat([tail, got]);
        const frames = decodeFrames(tail);
        received.push(...frames);
        tail = new Uint8Array(0);
        assert.ok(sys.pollOne(ours, sys.POLLOUT, 1000) & sys.POLLOUT, "writable after the peer read");
      }
      sent.push(f);
      if (i % 50 === 0) {
        tail = Buffer.concat([tail, drain(peer)]);
        received.push(...decodeFrames(tail));
        tail = new Uint8Array(0);
      }
    }
    received.push(...decodeFrames(drain(peer)));
    assert.ok(blocked > 0, "the socket filled up at least once");
    assert.equal(s.stats.txShort, 0, "no write was cut short");
    assert.equal(received.length, sent.length);
    for (let i = 0; i < sent.length; i++) assert.deepEqual(received[i], sent[i], `frame ${i}`);
  });

  it("finishes at once a frame the kernel cut short (a send buffer smaller than one frame)", async () => {
    const [ours, peer] = pair();
    // A reader in another process (cat), as passt is: it copies the stream to a pipe we collect.
    const cat = spawn("cat", [], { stdio: [peer, "pipe", "inherit"] });
    sys.close(peer);
    const chunks: Buffer[] = [];
    cat.stdout!.on("data", (d: Buffer) => chunks.push(d));
    const ended = new Promise((r) => cat.on("exit", r));
    // The smallest SO_SNDBUF the kernel allows (4608 effective): a 64 KiB frame cannot go in one write.
    const s = new NetStream(ours, { sendBufferBytes: 1 });
    const frames = [pattern(65535, 1), pattern(100, 2), pattern(20000, 3)];
    for (const f of frames) {
      while (!s.sendFrame(f)) sys.pollOne(ours, sys.POLLOUT, 1000);
    }
    assert.ok(s.stats.txShort > 0, "a write was cut short");
    assert.equal(s.down, undefined);
    sys.close(ours);
    await ended;
    assert.deepEqual(decodeFrames(Buffer.concat(chunks)), frames);
  });

  it("goes down when the peer stops reading in the middle of a frame", () => {
    const [ours] = pair(true);
    const s = new NetStream(ours, { sendBufferBytes: 1, shortWriteTimeoutMs: 100 });
    assert.equal(s.sendFrame(pattern(65535, 1)), true);
    assert.match(s.down ?? "", /^the peer stopped reading in the middle of a frame \(\d+ of 65539 bytes unsent\)$/);
  });

  it("is down after the peer closed, and drops instead of keeping frames", () => {
    const [ours, peer] = pair(true);
    const s = new NetStream(ours);
    sys.close(peer);
    // EPIPE (Node ignores SIGPIPE): reported, not fatal.
    assert.equal(s.sendFrame(pattern(100, 1)), true);
    assert.match(s.down ?? "", /writing to the socket failed: writev failed: EPIPE/);
    assert.equal(s.wantsWrite, false);
    assert.equal(s.sendFrame(pattern(100, 2)), true);
  });
});
