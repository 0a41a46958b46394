/**
 * virtio-blk with the io_uring engine (src/host/block-uring-engine.ts) on real image files
 * and mmap'd guest memory: byte-exact reads and writes (one buffer, scattered, indirect),
 * one io_uring_enter per queue drain, FLUSH ordered after the writes before it, DISCARD and
 * WRITE_ZEROES (and the file engine's ways round what a file system refuses), host errors
 * and short files as IOERR for that request only, more buffers than one readv takes, and
 * test memory (no host addresses) served by the file engine. The device's own checks are
 * the file engine's tests' business (virtio-blk.test.ts); these are about the engine.
 *
 * Where io_uring cannot be used the tests say why and skip (they fail instead with
 * TSKVM_REQUIRE_IO_URING=1).
 */
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import { join } from "node:path";
import * as sys from "../../src/sys/libc";
import { probeIoUring } from "../../src/sys/io-uring";
import { GuestMemory } from "../../src/memory/guest-memory";
import { VirtioFeatureBit, feature } from "../../src/devices/virtio/types";
import { VirtioBlock } from "../../src/devices/virtio/blk/device";
import { VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, VirtioBlkRequest, VirtioBlkStatus } from "../../src/devices/virtio/blk/request";
import { UringBlockEngine } from "../../src/host/block-uring-engine";
import { type DiskImage, openDiskImage } from "../../src/host/disk-image";
import { type Buf, VirtqDriver } from "../helpers/virtq-driver";

const MiB = 1024 * 1024;
const IMAGE_BYTES = 4 * MiB;
const support = probeIoUring();
const skip = support.available ? false : `io_uring unavailable here: ${support.reason}`;

let dir: string;
before(() => {
  dir = fs.mkdtempSync(join(os.tmpdir(), "tskvm-blk-uring-"));
});
after(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

let n = 0;
function makeImage(where = dir, bytes = IMAGE_BYTES): string {
  const path = join(where, `disk${n++}.img`);
  const data = new Uint8Array(bytes);
  for (let i = 0; i < bytes; i++) data[i] = (i * 13 + (i >> 9)) & 0xff;
  fs.writeFileSync(path, data);
  return path;
}
const fileBytes = (path: string, offset: number, length: number): Uint8Array => new Uint8Array(fs.readFileSync(path).subarray(offset, offset + length));
const pattern = (k: number, seed: number): Uint8Array => Uint8Array.from({ length: k }, (_, i) => (i * 31 + seed * 7 + 1) & 0xff);

interface Harness {
  mem: GuestMemory;
  drv: VirtqDriver;
  dev: VirtioBlock;
  engine: UringBlockEngine;
  image: DiskImage;
  resets: string[];
  logs: string[];
  close(): void;
}

function harness(opts: { path?: string; testMemory?: boolean; image?: DiskImage } = {}): Harness {
  const image = opts.image ?? openDiskImage(opts.path ?? makeImage());
  const mem = opts.testMemory ? GuestMemory.forTest(16 * MiB) : GuestMemory.allocate(16 * MiB);
  const drv = new VirtqDriver(mem, { size: 256 });
  // minBatch 1: single requests through the ring too, which is what these tests are about.
  const engine = new UringBlockEngine(image, { minBatch: 1 });
  const logs: string[] = [];
  const resets: string[] = [];
  const dev = new VirtioBlock(engine, { log: (l) => logs.push(l) });
  dev.activate({
    memory: mem,
    features: feature(VirtioFeatureBit.VERSION_1) | feature(VirtioFeatureBit.RING_INDIRECT_DESC) | dev.deviceFeatures,
    queues: [drv.config()],
    signalUsed: () => {},
    needsReset: (r) => resets.push(r),
  });
  return {
    mem,
    drv,
    dev,
    engine,
    image,
    resets,
    logs,
    close: () => {
      engine.close();
      image.close();
      mem.free();
    },
  };
}

function header(h: Harness, type: number, sector: number): Buf {
  const b = new Uint8Array(16);
  const v = new DataView(b.buffer);
  v.setUint32(0, type, true);
  v.setBigUint64(8, BigInt(sector), true);
  return h.drv.readable(b);
}

interface Pending {
  head: number;
  status: Buf;
  ins: Buf[];
}

/** Queue one request without kicking. */
function queue(h: Harness, type: number, sector: number, o: { out?: Uint8Array[]; inLens?: number[]; payload?: Buf[]; indirect?: boolean } = {}): Pending {
  const outs = (o.out ?? []).map((d) => h.drv.readable(d));
  const ins = (o.inLens ?? []).map((k) => h.drv.writable(k));
  const status = h.drv.writable(1, 0xee);
  const head = h.drv.add([header(h, type, sector), ...outs, ...(o.payload ?? []), ...ins, status], { indirect: o.indirect ?? false });
  return { head, status, ins };
}

/** Kick once; the status and read data of each request, in the order given. */
function serve(h: Harness, reqs: Pending[]): { status: number; data: Uint8Array }[] {
  h.dev.queueNotified(0);
  const used = h.drv.used();
  assert.equal(used.length, reqs.length, "one used entry per request");
  return reqs.map((p) => {
    const data = new Uint8Array(p.ins.reduce((k, b) => k + b.len, 0));
    let off = 0;
    for (const b of p.ins) {
      data.set(h.mem.slice(b.addr, b.len), off);
      off += b.len;
    }
    return { status: h.mem.readU8(p.status.addr), data };
  });
}

const one = (h: Harness, type: number, sector: number, o: Parameters<typeof queue>[3] = {}) => serve(h, [queue(h, type, sector, o)])[0]!;

describe("virtio-blk on the io_uring engine", { skip }, () => {
  it("writes then reads back byte-exact, one buffer and scattered, direct and indirect", () => {
    const h = harness();
    try {
      const a = pattern(4096, 1);
      assert.equal(one(h, VirtioBlkRequest.OUT, 8, { out: [a] }).status, VirtioBlkStatus.OK);
      assert.deepEqual(fileBytes(h.image.path, 8 * 512, 4096), a);
      const parts = [1, 511, 3, 1021, 512, 1, 511].map((k, i) => pattern(k, i + 30));
      const all = Uint8Array.from(parts.flatMap((p) => [...p]));
      assert.equal(one(h, VirtioBlkRequest.OUT, 300, { out: parts, indirect: true }).status, VirtioBlkStatus.OK);
      assert.deepEqual(fileBytes(h.image.path, 300 * 512, all.length), all);
      const r = one(h, VirtioBlkRequest.IN, 300, { inLens: [7, 1, 500, 4, 2048] });
      assert.equal(r.status, VirtioBlkStatus.OK);
      assert.deepEqual(r.data, all);
      const s = one(h, VirtioBlkRequest.IN, 8, { inLens: [4096], indirect: true });
      assert.deepEqual(s.data, a);
      assert.equal(h.engine.fallbacks, 0);
    } finally {
      h.close();
    }
  });

  it("a lone request goes to the file engine by default: one system call either way", () => {
    const image = openDiskImage(makeImage());
    const mem = GuestMemory.allocate(16 * MiB);
    try {
      const engine = new UringBlockEngine(image);
      const drv = new VirtqDriver(mem, { size: 256 });
      const dev = new VirtioBlock(engine);
      dev.activate({ memory: mem, features: feature(VirtioFeatureBit.VERSION_1) | dev.deviceFeatures, queues: [drv.config()], signalUsed: () => {}, needsReset: (r) => assert.fail(r) });
      const h = { mem, drv, dev, engine, image, resets: [], logs: [], close: () => undefined };
      assert.equal(one(h, VirtioBlkRequest.IN, 0, { inLens: [4096] }).status, VirtioBlkStatus.OK);
      assert.equal(engine.enters, 0);
      serve(h, [queue(h, VirtioBlkRequest.IN, 0, { inLens: [4096] }), queue(h, VirtioBlkRequest.IN, 8, { inLens: [4096] })]);
      assert.equal(engine.enters, 1);
      engine.close();
    } finally {
      image.close();
      mem.free();
    }
  });

  it("a drain of 64 requests is one io_uring_enter, each request its own result", () => {
    const h = harness();
    try {
      const reqs = Array.from({ length: 64 }, (_, i) => (i % 2 === 0 ? queue(h, VirtioBlkRequest.IN, i * 16, { inLens: [4096] }) : queue(h, VirtioBlkRequest.OUT, 4096 + i * 8, { out: [pattern(4096, i)] })));
      const before = h.engine.enters;
      const res = serve(h, reqs);
      assert.equal(h.engine.enters - before, 1);
      res.forEach((r, i) => {
        assert.equal(r.status, VirtioBlkStatus.OK, `request ${i}`);
        if (i % 2 === 0) assert.deepEqual(r.data, fileBytes(h.image.path, i * 16 * 512, 4096));
        else assert.deepEqual(fileBytes(h.image.path, (4096 + i * 8) * 512, 4096), pattern(4096, i));
      });
    } finally {
      h.close();
    }
  });

  it("FLUSH in the same drain as writes: every request OK, the writes in the file", () => {
    const h = harness();
    try {
      const w1 = queue(h, VirtioBlkRequest.OUT, 100, { out: [pattern(8192, 5)] });
      const f = queue(h, VirtioBlkRequest.FLUSH, 0);
      const w2 = queue(h, VirtioBlkRequest.OUT, 200, { out: [pattern(512, 6)] });
      const f2 = queue(h, VirtioBlkRequest.FLUSH, 0);
      assert.deepEqual(serve(h, [w1, f, w2, f2]).map((r) => r.status), [0, 0, 0, 0]);
      assert.deepEqual(fileBytes(h.image.path, 100 * 512, 8192), pattern(8192, 5));
      assert.deepEqual(fileBytes(h.image.path, 200 * 512, 512), pattern(512, 6));
      assert.equal(h.dev.stats.flushes, 2);
    } finally {
      h.close();
    }
  });

  it("DISCARD punches a hole; WRITE_ZEROES zeroes; ranges the file system refuses go the file engine's way", () => {
    const segs = (h: Harness, list: [number, number, number][]) => {
      const b = new Uint8Array(16 * list.length);
      const v = new DataView(b.buffer);
      list.forEach(([sector, count, flags], i) => {
        v.setBigUint64(16 * i, BigInt(sector), true);
        v.setUint32(16 * i + 8, count, true);
        v.setUint32(16 * i + 12, flags, true);
      });
      return h.drv.readable(b);
    };
    const zero = (k: number) => new Uint8Array(k);
    const h = harness();
    try {
      assert.equal(one(h, VirtioBlkRequest.DISCARD, 0, { payload: [segs(h, [[64, 16, 0], [256, 8, 0]])] }).status, VirtioBlkStatus.OK);
      assert.deepEqual(fileBytes(h.image.path, 64 * 512, 16 * 512), zero(16 * 512));
      assert.deepEqual(fileBytes(h.image.path, 256 * 512, 8 * 512), zero(8 * 512));
      assert.equal(one(h, VirtioBlkRequest.WRITE_ZEROES, 0, { payload: [segs(h, [[512, 8, 0], [600, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP]])] }).status, VirtioBlkStatus.OK);
      assert.deepEqual(fileBytes(h.image.path, 512 * 512, 8 * 512), zero(8 * 512));
      assert.deepEqual(fileBytes(h.image.path, 600 * 512, 8 * 512), zero(8 * 512));
      assert.equal(fs.statSync(h.image.path).size, IMAGE_BYTES);
    } finally {
      h.close();
    }
    // tmpfs cannot FALLOC_FL_ZERO_RANGE (EOPNOTSUPP): the file engine writes zeroes instead.
    if (!fs.existsSync("/dev/shm")) return;
    const shm = fs.mkdtempSync("/dev/shm/tskvm-blk-uring-");
    const t = harness({ path: makeImage(shm) });
    try {
      assert.equal(one(t, VirtioBlkRequest.WRITE_ZEROES, 0, { payload: [segs(t, [[40, 8, 0]])] }).status, VirtioBlkStatus.OK);
      assert.deepEqual(fileBytes(t.image.path, 40 * 512, 8 * 512), zero(8 * 512));
      assert.ok(t.engine.fallbacks >= 1, "the file engine took the refused range");
    } finally {
      t.close();
      fs.rmSync(shm, { recursive: true, force: true });
    }
  });

  it("a host error fails that request only (IOERR); the others in the drain succeed", () => {
    // An image open for writing only: every read fails (EBADF), as a failing disk's would.
    const path = makeImage();
    const fd = sys.open(path, 1 /* O_WRONLY */);
    const image: DiskImage = { fd, sizeBytes: IMAGE_BYTES, readOnly: false, path, close: () => sys.close(fd) };
    const h = harness({ image });
    try {
      const res = serve(h, [
        queue(h, VirtioBlkRequest.IN, 0, { inLens: [512] }),
        queue(h, VirtioBlkRequest.OUT, 8, { out: [pattern(512, 3)] }),
        queue(h, VirtioBlkRequest.IN, 0, { inLens: [256, 256] }),
      ]);
      assert.deepEqual(res.map((r) => r.status), [VirtioBlkStatus.IOERR, VirtioBlkStatus.OK, VirtioBlkStatus.IOERR]);
      assert.match(h.logs.join("\n"), /pread failed: EBADF/);
      assert.match(h.logs.join("\n"), /preadv failed: EBADF/);
      assert.deepEqual(fileBytes(path, 8 * 512, 512), pattern(512, 3));
      assert.deepEqual(h.resets, []);
    } finally {
      h.close();
    }
  });

  it("a file that shrank under the device: the short read is IOERR with the file engine's message", () => {
    const path = makeImage();
    const h = harness({ path });
    try {
      fs.truncateSync(path, 8192 + 100);
      const res = one(h, VirtioBlkRequest.IN, 16, { inLens: [4096] });
      assert.equal(res.status, VirtioBlkStatus.IOERR);
      assert.match(h.logs.join("\n"), /end of file at byte 8292/);
      const res2 = one(h, VirtioBlkRequest.IN, 16, { inLens: [1024, 1024, 2048] });
      assert.equal(res2.status, VirtioBlkStatus.IOERR);
    } finally {
      h.close();
    }
  });

  it("more buffers than one readv takes (a guest ignoring SEG_MAX): byte-exact all the same", () => {
    const h = harness();
    try {
      const parts = Array.from({ length: 1100 }, (_, i) => pattern(512, i));
      const all = Uint8Array.from(parts.flatMap((p) => [...p]));
      assert.equal(one(h, VirtioBlkRequest.OUT, 1000, { out: parts, indirect: true }).status, VirtioBlkStatus.OK);
      assert.deepEqual(fileBytes(h.image.path, 1000 * 512, all.length), all);
      const r = one(h, VirtioBlkRequest.IN, 1000, { inLens: Array.from({ length: 1100 }, () => 512), indirect: true });
      assert.deepEqual(r.data, all);
      assert.ok(h.engine.fallbacks >= 2);
    } finally {
      h.close();
    }
  });

  it("test memory (no host addresses) is served by the file engine", () => {
    const h = harness({ testMemory: true });
    try {
      const a = pattern(1024, 9);
      assert.equal(one(h, VirtioBlkRequest.OUT, 2, { out: [a] }).status, VirtioBlkStatus.OK);
      assert.deepEqual(one(h, VirtioBlkRequest.IN, 2, { inLens: [512, 512] }).data, a);
      assert.equal(h.engine.fallbacks, 2);
    } finally {
      h.close();
    }
  });
});

if (skip !== false && process.env.TSKVM_REQUIRE_IO_URING) {
  it("io_uring is required (TSKVM_REQUIRE_IO_URING)", () => assert.fail(skip));
}
