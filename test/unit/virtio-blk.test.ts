import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import { join } from "node:path";
import { createHash } from "node:crypto";
import { GuestMemory } from "../../src/memory/guest-memory";
import { type VirtioActivation, VirtioFeatureBit, feature } from "../../src/devices/virtio/types";
import { BLK_SEG_MAX, BlkConfig, VirtioBlkFeature, VirtioBlock, defaultSerial } from "../../src/devices/virtio/blk/device";
import {
  BLK_MAX_DISCARD_SECTORS,
  BLK_MAX_DISCARD_SEG,
  VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
  VirtioBlkRequest,
  VirtioBlkStatus,
} from "../../src/devices/virtio/blk/request";
import { FileBlockEngine, type FileOps as BlockIo, systemFileOps as fileIo } from "../../src/host/block-file-engine";
import { type DiskImage, openDiskImage } from "../../src/host/disk-image";
import { VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE } from "../../src/devices/virtio/queue";
import { type Buf, VirtqDriver } from "../helpers/virtq-driver";

const MiB = 1024 * 1024;
const IMAGE_BYTES = 8 * MiB;
const SECTORS = IMAGE_BYTES / 512;
const V1 = feature(VirtioFeatureBit.VERSION_1);
const INDIRECT = feature(VirtioFeatureBit.RING_INDIRECT_DESC);
const EVENT_IDX = feature(VirtioFeatureBit.RING_EVENT_IDX);

let dir: string;
before(() => {
  dir = fs.mkdtempSync(join(os.tmpdir(), "tskvm-blk-"));
});
after(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

let imageCounter = 0;
/** A temp image full of a recognisable pattern (allocated on disk). */
function makeImage(bytes = IMAGE_BYTES): string {
  const path = join(dir, `disk${imageCounter++}.img`);
  const data = new Uint8Array(bytes);
  for (let i = 0; i < bytes; i += 4) {
    const v = (i / 4) * 2654435761;
    data[i] = v & 0xff;
    data[i + 1] = (v >>> 8) & 0xff;
    data[i + 2] = (v >>> 16) & 0xff;
    data[i + 3] = 0x5a;
  }
  fs.writeFileSync(path, data);
  return path;
}

const fileBytes = (path: string, offset: number, length: number): Uint8Array =>
  new Uint8Array(fs.readFileSync(path).subarray(offset, offset + length));
const fileHash = (path: string): string => createHash("sha256").update(fs.readFileSync(path)).digest("hex");
const pattern = (n: number, seed: number): Uint8Array => Uint8Array.from({ length: n }, (_, i) => (i * 31 + seed * 7 + 1) & 0xff);

interface Harness {
  mem: GuestMemory;
  drv: VirtqDriver;
  dev: VirtioBlock;
  image: DiskImage;
  signals: number[];
  resets: string[];
  logs: string[];
  calls: { flush: number; punch: number; zeroRange: number };
  close(): void;
}

function harness(opts: {
  readOnly?: boolean;
  path?: string;
  features?: bigint;
  serial?: string;
  io?: Partial<BlockIo>;
  activate?: boolean;
  /** mmap'd guest memory (host addresses: the pread/preadv-by-address paths). */
  realMemory?: boolean;
} = {}): Harness {
  const path = opts.path ?? makeImage();
  const image = openDiskImage(path, { readOnly: opts.readOnly ?? false });
  const mem = opts.realMemory ? GuestMemory.allocate(16 * MiB) : GuestMemory.forTest(16 * MiB);
  const drv = new VirtqDriver(mem, { size: 256 });
  const calls = { flush: 0, punch: 0, zeroRange: 0 };
  const logs: string[] = [];
  const ops: Partial<BlockIo> = {
      flush: (fd) => {
        calls.flush++;
        fileIo.flush(fd);
      },
      punchHole: (fd, o, l) => {
        calls.punch++;
        return fileIo.punchHole(fd, o, l);
      },
      zeroRange: (fd, o, l) => {
        calls.zeroRange++;
        return fileIo.zeroRange(fd, o, l);
      },
      ...opts.io,
  };
  const dev = new VirtioBlock(new FileBlockEngine(image, { ops }), {
    ...(opts.serial !== undefined ? { serial: opts.serial } : {}),
    log: (l) => logs.push(l),
  });
  const signals: number[] = [];
  const resets: string[] = [];
  const ctx: VirtioActivation = {
    memory: mem,
    features: opts.features ?? (V1 | INDIRECT | dev.deviceFeatures),
    queues: [drv.config()],
    signalUsed: (i) => signals.push(i),
    needsReset: (r) => resets.push(r),
  };
  if (opts.activate ?? true) dev.activate(ctx);
  return {
    mem,
    drv,
    dev,
    image,
    signals,
    resets,
    logs,
    calls,
    close: () => {
      image.close();
      mem.free();
    },
  };
}

function header(h: Harness, type: number, sector: number | bigint): Buf {
  const b = new Uint8Array(16);
  const v = new DataView(b.buffer);
  v.setUint32(0, type, true);
  v.setBigUint64(8, BigInt(sector), true);
  return h.drv.readable(b);
}

function segments(h: Harness, segs: { sector: number | bigint; count: number; flags?: number }[]): Buf {
  const b = new Uint8Array(16 * segs.length);
  const v = new DataView(b.buffer);
  segs.forEach((s, i) => {
    v.setBigUint64(16 * i, BigInt(s.sector), true);
    v.setUint32(16 * i + 8, s.count, true);
    v.setUint32(16 * i + 12, s.flags ?? 0, true);
  });
  return h.drv.readable(b);
}

interface Result {
  status: number;
  usedLen: number;
  data: Uint8Array;
}

/**
 * Send one request: header, readable payload buffers, writable data buffers of the given
 * sizes, then a status byte; returns the status, used length and the writable data.
 */
function request(
  h: Harness,
  type: number,
  sector: number | bigint,
  opts: { out?: Uint8Array[]; inLens?: number[]; payload?: Buf[]; indirect?: boolean } = {},
): Result {
  const outs = (opts.out ?? []).map((d) => h.drv.readable(d));
  const ins = (opts.inLens ?? []).map((n) => h.drv.writable(n));
  const status = h.drv.writable(1, 0xee);
  const head = h.drv.add([header(h, type, sector), ...outs, ...(opts.payload ?? []), ...ins, status], { indirect: opts.indirect ?? false });
  h.dev.queueNotified(0);
  const used = h.drv.used();
  assert.equal(used.length, 1, "one used entry");
  assert.equal(used[0]!.id, head);
  const data = new Uint8Array(ins.reduce((n, b) => n + b.len, 0));
  let o = 0;
  for (const b of ins) {
    data.set(h.mem.slice(b.addr, b.len), o);
    o += b.len;
  }
  return { status: h.mem.readU8(status.addr), usedLen: used[0]!.len, data };
}

describe("virtio-blk configuration", () => {
  it("offers SEG_MAX, BLK_SIZE, FLUSH, DISCARD, WRITE_ZEROES for a writable disk", () => {
    const h = harness({ activate: false });
    const f = h.dev.deviceFeatures;
    for (const bit of [VirtioBlkFeature.SEG_MAX, VirtioBlkFeature.BLK_SIZE, VirtioBlkFeature.FLUSH, VirtioBlkFeature.DISCARD, VirtioBlkFeature.WRITE_ZEROES]) {
      assert.ok((f & feature(bit)) !== 0n, `feature bit ${bit}`);
    }
    assert.equal(f & feature(VirtioBlkFeature.RO), 0n);
    assert.equal(h.dev.deviceType, 2);
    assert.equal(h.dev.maxQueueSize, 256);
    assert.equal(h.dev.queueCount, 1);
    h.close();
  });

  it("lays out the config space at the spec's offsets", () => {
    const h = harness({ activate: false });
    const v = new DataView(h.dev.config.buffer, h.dev.config.byteOffset, h.dev.config.byteLength);
    assert.equal(h.dev.config.length, 60);
    assert.equal(v.getBigUint64(0, true), BigInt(SECTORS), "capacity in 512-byte sectors");
    assert.equal(v.getUint32(12, true), BLK_SEG_MAX, "seg_max");
    assert.equal(v.getUint32(20, true), 512, "blk_size");
    assert.equal(v.getUint32(36, true), BLK_MAX_DISCARD_SECTORS, "max_discard_sectors");
    assert.equal(v.getUint32(40, true), BLK_MAX_DISCARD_SEG, "max_discard_seg");
    assert.equal(v.getUint32(44, true), 8, "discard_sector_alignment");
    assert.equal(v.getUint32(48, true), BLK_MAX_DISCARD_SECTORS, "max_write_zeroes_sectors");
    assert.equal(v.getUint32(52, true), BLK_MAX_DISCARD_SEG, "max_write_zeroes_seg");
    assert.equal(v.getUint8(56), 1, "write_zeroes_may_unmap");
    assert.equal(BlkConfig.WRITE_ZEROES_MAY_UNMAP, 56);
    h.close();
  });

  it("a read-only disk offers RO and neither DISCARD nor WRITE_ZEROES", () => {
    const h = harness({ readOnly: true, activate: false });
    const f = h.dev.deviceFeatures;
    assert.ok((f & feature(VirtioBlkFeature.RO)) !== 0n);
    assert.equal(f & feature(VirtioBlkFeature.DISCARD), 0n);
    assert.equal(f & feature(VirtioBlkFeature.WRITE_ZEROES), 0n);
    assert.equal(new DataView(h.dev.config.buffer).getUint32(36, true), 0);
    h.close();
  });
});

describe("virtio-blk requests", () => {
  it("OUT writes byte-for-byte into the file, then IN reads it back", () => {
    const h = harness();
    const data = pattern(4096, 1);
    const w = request(h, VirtioBlkRequest.OUT, 100, { out: [data] });
    assert.equal(w.status, VirtioBlkStatus.OK);
    assert.equal(w.usedLen, 1, "only the status byte was written into the chain");
    assert.deepEqual(fileBytes(h.image.path, 100 * 512, 4096), data);
    const r = request(h, VirtioBlkRequest.IN, 100, { inLens: [4096] });
    assert.equal(r.status, VirtioBlkStatus.OK);
    assert.equal(r.usedLen, 4097, "data + status");
    assert.deepEqual(r.data, data);
    h.close();
  });

  it("IN returns the file's bytes", () => {
    const h = harness();
    const r = request(h, VirtioBlkRequest.IN, 7, { inLens: [1024] });
    assert.equal(r.status, VirtioBlkStatus.OK);
    assert.deepEqual(r.data, fileBytes(h.image.path, 7 * 512, 1024));
    h.close();
  });

  it("multi-descriptor reads and writes with odd segment sizes", () => {
    const h = harness();
    const parts = [1, 511, 3, 1021, 512, 1].map((n, i) => pattern(n, i + 10)); // 2049? -> sum 2049
    const total = parts.reduce((n, p) => n + p.length, 0);
    const extra = pattern(512 * Math.ceil(total / 512) - total, 99);
    const all = Uint8Array.from([...parts.flatMap((p) => [...p]), ...extra]);
    assert.equal(all.length % 512, 0);
    const w = request(h, VirtioBlkRequest.OUT, 2000, { out: [...parts, extra] });
    assert.equal(w.status, VirtioBlkStatus.OK);
    assert.deepEqual(fileBytes(h.image.path, 2000 * 512, all.length), all);
    const r = request(h, VirtioBlkRequest.IN, 2000, { inLens: [7, 1, 500, 4, all.length - 512] });
    assert.equal(r.status, VirtioBlkStatus.OK);
    assert.deepEqual(r.data, all);
    h.close();
  });

  it("requests through indirect tables", () => {
    const h = harness();
    const data = pattern(8192, 3);
    assert.equal(request(h, VirtioBlkRequest.OUT, 0, { out: [data.subarray(0, 4096), data.subarray(4096)], indirect: true }).status, 0);
    const r = request(h, VirtioBlkRequest.IN, 0, { inLens: [8192], indirect: true });
    assert.deepEqual(r.data, data);
    h.close();
  });

  it("the last sectors of the disk are reachable; one past is IOERR with the file unchanged", () => {
    const h = harness();
    const data = pattern(1024, 5);
    assert.equal(request(h, VirtioBlkRequest.OUT, SECTORS - 2, { out: [data] }).status, VirtioBlkStatus.OK);
    assert.deepEqual(fileBytes(h.image.path, IMAGE_BYTES - 1024, 1024), data);
    const before = fileHash(h.image.path);
    assert.equal(request(h, VirtioBlkRequest.OUT, SECTORS - 1, { out: [pattern(1024, 6)] }).status, VirtioBlkStatus.IOERR);
    assert.equal(request(h, VirtioBlkRequest.OUT, SECTORS, { out: [pattern(512, 6)] }).status, VirtioBlkStatus.IOERR);
    assert.equal(request(h, VirtioBlkRequest.OUT, 1n << 60n, { out: [pattern(512, 6)] }).status, VirtioBlkStatus.IOERR);
    assert.equal(request(h, VirtioBlkRequest.OUT, (1n << 64n) - 1n, { out: [pattern(512, 6)] }).status, VirtioBlkStatus.IOERR);
    const r = request(h, VirtioBlkRequest.IN, SECTORS - 1, { inLens: [1024] });
    assert.equal(r.status, VirtioBlkStatus.IOERR);
    assert.equal(r.usedLen, 1);
    assert.ok(r.data.every((b) => b === 0xee), "nothing was read into the buffer");
    assert.equal(fs.statSync(h.image.path).size, IMAGE_BYTES);
    assert.equal(fileHash(h.image.path), before);
    h.close();
  });

  it("data not a multiple of 512 bytes is IOERR", () => {
    const h = harness();
    const before = fileHash(h.image.path);
    assert.equal(request(h, VirtioBlkRequest.OUT, 0, { out: [pattern(100, 1)] }).status, VirtioBlkStatus.IOERR);
    assert.equal(request(h, VirtioBlkRequest.IN, 0, { inLens: [513] }).status, VirtioBlkStatus.IOERR);
    assert.equal(fileHash(h.image.path), before);
    h.close();
  });

  it("FLUSH calls fdatasync", () => {
    const h = harness();
    request(h, VirtioBlkRequest.OUT, 0, { out: [pattern(512, 1)] });
    const r = request(h, VirtioBlkRequest.FLUSH, 0);
    assert.equal(r.status, VirtioBlkStatus.OK);
    assert.equal(r.usedLen, 1);
    assert.equal(h.calls.flush, 1);
    h.close();
  });

  it("a failing flush is IOERR", () => {
    const h = harness({
      io: {
        flush: () => {
          throw new Error("EIO");
        },
      },
    });
    assert.equal(request(h, VirtioBlkRequest.FLUSH, 0).status, VirtioBlkStatus.IOERR);
    assert.match(h.logs.join("\n"), /flush failed/);
    h.close();
  });

  it("GET_ID returns the 20-byte serial, NUL-padded", () => {
    const h = harness();
    const r = request(h, VirtioBlkRequest.GET_ID, 0, { inLens: [20] });
    assert.equal(r.status, VirtioBlkStatus.OK);
    assert.equal(r.usedLen, 21);
    const id = Buffer.from(r.data).toString("latin1");
    assert.equal(id, defaultSerial(h.image.path));
    assert.match(id, /^tskvm-[0-9a-f]{14}$/);
    assert.equal(defaultSerial(h.image.path), defaultSerial(h.image.path), "stable");
    h.close();
    const h2 = harness({ serial: "disk-A" });
    const r2 = request(h2, VirtioBlkRequest.GET_ID, 0, { inLens: [20] });
    assert.deepEqual(r2.data, Uint8Array.from([...Buffer.from("disk-A"), ...new Uint8Array(14)]));
    h2.close();
  });

  it("unknown request types are UNSUPP", () => {
    const h = harness();
    for (const type of [2, 3, VirtioBlkRequest.GET_LIFETIME, VirtioBlkRequest.SECURE_ERASE, 0xffffffff]) {
      const r = request(h, type, 0, { inLens: [512] });
      assert.equal(r.status, VirtioBlkStatus.UNSUPP, `type ${type}`);
      assert.equal(r.usedLen, 1);
    }
    assert.equal(h.dev.stats.unsupported, 5);
    h.close();
  });

  it("a header shorter than 16 bytes with a status byte is IOERR", () => {
    const h = harness();
    const status = h.drv.writable(1);
    h.drv.add([h.drv.readable(new Uint8Array(8)), status]);
    h.dev.queueNotified(0);
    assert.deepEqual(h.drv.used().map((u) => u.len), [1]);
    assert.equal(h.mem.readU8(status.addr), VirtioBlkStatus.IOERR);
    assert.deepEqual(h.resets, []);
    assert.match(h.logs[0]!, /request \(head \d+\) header is shorter than 16 bytes/);
    for (let i = 0; i < 30; i++) {
      h.drv.add([h.drv.readable(new Uint8Array(4)), h.drv.writable(1)]);
      h.dev.queueNotified(0);
      h.drv.used();
    }
    assert.equal(h.logs.length, 21, "20 lines, then one saying the rest are not logged");
    assert.match(h.logs[20]!, /further request errors are not logged/);
    h.close();
  });

  it("a host read error is IOERR and the device keeps going", () => {
    let fail = true;
    const h = harness({
      io: {
        pread: (fd, buf, off) => {
          if (fail) throw new Error("pread failed: EIO (input/output error)");
          return fileIo.pread(fd, buf, off);
        },
      },
    });
    assert.equal(request(h, VirtioBlkRequest.IN, 0, { inLens: [512] }).status, VirtioBlkStatus.IOERR);
    fail = false;
    assert.equal(request(h, VirtioBlkRequest.IN, 0, { inLens: [512] }).status, VirtioBlkStatus.OK);
    assert.match(h.logs[0]!, /read at sector 0 failed: pread failed: EIO/);
    h.close();
  });

  it("the image's file system full (ENOSPC, from /dev/full) or failing (EIO): that write is IOERR, what was acknowledged stays, the device goes on", () => {
    const full = fs.openSync("/dev/full", "w");
    let failing: "ENOSPC" | "EIO" | undefined;
    const h = harness({
      io: {
        pwrite: (fd, buf, off) => {
          if (failing === "ENOSPC") return fileIo.pwrite(full, buf, off); // the kernel's own ENOSPC
          if (failing === "EIO") throw new Error("pwrite failed: EIO (input/output error)");
          return fileIo.pwrite(fd, buf, off);
        },
      },
    });
    try {
      const acked = pattern(4096, 1);
      assert.equal(request(h, VirtioBlkRequest.OUT, 8, { out: [acked] }).status, VirtioBlkStatus.OK);
      assert.equal(request(h, VirtioBlkRequest.FLUSH, 0).status, VirtioBlkStatus.OK);
      const before16 = fileBytes(h.image.path, 16 * 512, 4096);
      for (const kind of ["ENOSPC", "EIO"] as const) {
        failing = kind;
        assert.equal(request(h, VirtioBlkRequest.OUT, 16, { out: [pattern(4096, 2)] }).status, VirtioBlkStatus.IOERR, kind);
        assert.equal(request(h, VirtioBlkRequest.FLUSH, 0).status, VirtioBlkStatus.OK, "a flush after a failed write: what was acknowledged is on disk");
      }
      failing = undefined;
      const later = pattern(512, 3);
      assert.equal(request(h, VirtioBlkRequest.OUT, 32, { out: [later] }).status, VirtioBlkStatus.OK, "the device goes on once the host recovers");
      assert.deepEqual(h.resets, [], "an I/O error is the guest's to see, not a broken device");
      assert.deepEqual(fileBytes(h.image.path, 8 * 512, 4096), acked);
      assert.deepEqual(fileBytes(h.image.path, 16 * 512, 4096), before16, "the failed writes changed nothing");
      assert.deepEqual(fileBytes(h.image.path, 32 * 512, 512), later);
      assert.match(h.logs.join("\n"), /write at sector 16 failed: .*ENOSPC/);
      assert.match(h.logs.join("\n"), /write at sector 16 failed: .*EIO/);
    } finally {
      fs.closeSync(full);
      h.close();
    }
  });

  it("a file that shrank under the device: short read is IOERR", () => {
    const h = harness();
    fs.truncateSync(h.image.path, 4096);
    assert.equal(request(h, VirtioBlkRequest.IN, 4, { inLens: [4096] }).status, VirtioBlkStatus.IOERR);
    h.close();
  });
});

describe("virtio-blk over mmap'd guest memory (I/O by host address)", () => {
  const spying = () => {
    const n = { preadAt: 0, pwriteAt: 0, preadv: 0, pwritev: 0 };
    const io: Partial<BlockIo> = {
      preadAt: (fd, a, l, o) => (n.preadAt++, fileIo.preadAt!(fd, a, l, o)),
      pwriteAt: (fd, a, l, o) => (n.pwriteAt++, fileIo.pwriteAt!(fd, a, l, o)),
      preadv: (fd, iov, c, o) => (n.preadv++, fileIo.preadv!(fd, iov, c, o)),
      pwritev: (fd, iov, c, o) => (n.pwritev++, fileIo.pwritev!(fd, iov, c, o)),
    };
    return { n, io };
  };

  it("one data descriptor: one pread/pwrite by address", () => {
    const { n, io } = spying();
    const h = harness({ realMemory: true, io });
    const data = pattern(8192, 21);
    assert.equal(request(h, VirtioBlkRequest.OUT, 64, { out: [data] }).status, VirtioBlkStatus.OK);
    assert.deepEqual(fileBytes(h.image.path, 64 * 512, 8192), data);
    const r = request(h, VirtioBlkRequest.IN, 64, { inLens: [8192] });
    assert.deepEqual(r.data, data);
    assert.deepEqual(n, { preadAt: 1, pwriteAt: 1, preadv: 0, pwritev: 0 });
    h.close();
  });

  it("scattered data: one preadv/pwritev per request, byte-exact", () => {
    const { n, io } = spying();
    const h = harness({ realMemory: true, io });
    const parts = [1, 511, 3, 1021, 512, 1, 511].map((k, i) => pattern(k, i + 30));
    const all = Uint8Array.from(parts.flatMap((p) => [...p]));
    assert.equal(all.length, 2560);
    assert.equal(request(h, VirtioBlkRequest.OUT, 300, { out: parts }).status, VirtioBlkStatus.OK);
    assert.deepEqual(fileBytes(h.image.path, 300 * 512, all.length), all);
    const r = request(h, VirtioBlkRequest.IN, 300, { inLens: [7, 1, 500, 4, 2048] });
    assert.equal(r.status, VirtioBlkStatus.OK);
    assert.deepEqual(r.data, all);
    assert.deepEqual(n, { preadAt: 0, pwriteAt: 0, preadv: 1, pwritev: 1 });
    h.close();
  });

  it("short vectored transfers are continued where they stopped", () => {
    let calls = 0;
    const h = harness({
      realMemory: true,
      io: {
        // Transfer only the first iovec each time, like a file system that stops early.
        preadv: (fd, iov, _c, o) => (calls++, fileIo.preadv!(fd, iov, 1, o)),
        pwritev: (fd, iov, _c, o) => (calls++, fileIo.pwritev!(fd, iov, 1, o)),
      },
    });
    const parts = [100, 412, 1000, 24].map((k, i) => pattern(k, i + 50));
    const all = Uint8Array.from(parts.flatMap((p) => [...p]));
    assert.equal(request(h, VirtioBlkRequest.OUT, 9, { out: parts }).status, VirtioBlkStatus.OK);
    assert.deepEqual(fileBytes(h.image.path, 9 * 512, all.length), all);
    assert.equal(calls, 4);
    const r = request(h, VirtioBlkRequest.IN, 9, { inLens: [3, 509, 512, 512] });
    assert.deepEqual(r.data, all);
    assert.equal(calls, 8);
    h.close();
  });

  it("a replaced pread sees every read (no by-address bypass)", () => {
    let n = 0;
    const h = harness({ realMemory: true, io: { pread: (fd, b, o) => (n++, fileIo.pread(fd, b, o)) } });
    const r = request(h, VirtioBlkRequest.IN, 0, { inLens: [512, 512] });
    assert.equal(r.status, VirtioBlkStatus.OK);
    assert.deepEqual(r.data, fileBytes(h.image.path, 0, 1024));
    assert.equal(n, 2);
    h.close();
  });
});

describe("virtio-blk DISCARD and WRITE_ZEROES", () => {
  const blocks = (path: string): number => fs.statSync(path).blocks;

  it("DISCARD punches a hole: the range reads as zeroes and takes no space", () => {
    const h = harness();
    const before = blocks(h.image.path);
    const r = request(h, VirtioBlkRequest.DISCARD, 0, { payload: [segments(h, [{ sector: 2048, count: 4096 }])] });
    assert.equal(r.status, VirtioBlkStatus.OK);
    assert.equal(h.calls.punch, 1);
    assert.ok(fileBytes(h.image.path, 2048 * 512, 4096 * 512).every((b) => b === 0));
    assert.ok(blocks(h.image.path) <= before - (2 * MiB) / 512, `blocks ${before} -> ${blocks(h.image.path)}`);
    assert.equal(fs.statSync(h.image.path).size, IMAGE_BYTES, "size kept");
    assert.ok(!fileBytes(h.image.path, 2047 * 512, 512).every((b) => b === 0), "the sector before is untouched");
    assert.ok(!fileBytes(h.image.path, 6144 * 512, 512).every((b) => b === 0), "the next sector is untouched");
    h.close();
  });

  it("DISCARD with several segments", () => {
    const h = harness();
    const segs = [
      { sector: 0, count: 8 },
      { sector: 100, count: 1 },
      { sector: SECTORS - 8, count: 8 },
    ];
    assert.equal(request(h, VirtioBlkRequest.DISCARD, 0, { payload: [segments(h, segs)] }).status, VirtioBlkStatus.OK);
    for (const s of segs) assert.ok(fileBytes(h.image.path, s.sector * 512, s.count * 512).every((b) => b === 0));
    assert.ok(!fileBytes(h.image.path, 101 * 512, 512).every((b) => b === 0));
    h.close();
  });

  it("DISCARD writes zeroes where the file system cannot punch holes", () => {
    const h = harness({ io: { punchHole: () => false } });
    assert.equal(request(h, VirtioBlkRequest.DISCARD, 0, { payload: [segments(h, [{ sector: 10, count: 3000 }])] }).status, VirtioBlkStatus.OK);
    assert.ok(fileBytes(h.image.path, 10 * 512, 3000 * 512).every((b) => b === 0));
    assert.ok(!fileBytes(h.image.path, 9 * 512, 512).every((b) => b === 0));
    h.close();
  });

  it("DISCARD with the UNMAP flag or an unknown flag is UNSUPP", () => {
    const h = harness();
    const before = fileHash(h.image.path);
    assert.equal(request(h, VirtioBlkRequest.DISCARD, 0, { payload: [segments(h, [{ sector: 0, count: 8, flags: 1 }])] }).status, VirtioBlkStatus.UNSUPP);
    assert.equal(request(h, VirtioBlkRequest.DISCARD, 0, { payload: [segments(h, [{ sector: 0, count: 8, flags: 4 }])] }).status, VirtioBlkStatus.UNSUPP);
    assert.equal(request(h, VirtioBlkRequest.WRITE_ZEROES, 0, { payload: [segments(h, [{ sector: 0, count: 8, flags: 2 }])] }).status, VirtioBlkStatus.UNSUPP);
    assert.equal(fileHash(h.image.path), before);
    h.close();
  });

  it("DISCARD out of range, too long, too many or malformed segments: IOERR, nothing touched", () => {
    const h = harness();
    const before = fileHash(h.image.path);
    const cases: Buf[] = [
      segments(h, [{ sector: 0, count: 8 }, { sector: SECTORS - 4, count: 8 }]), // second one out of range
      segments(h, [{ sector: 1n << 62n, count: 1 }]),
      segments(h, [{ sector: 0, count: BLK_MAX_DISCARD_SECTORS + 1 }]),
      segments(h, Array.from({ length: BLK_MAX_DISCARD_SEG + 1 }, (_, i) => ({ sector: i, count: 1 }))),
      h.drv.readable(new Uint8Array(15)),
      h.drv.readable(new Uint8Array(0)),
    ];
    for (const payload of cases) {
      assert.equal(request(h, VirtioBlkRequest.DISCARD, 0, { payload: [payload] }).status, VirtioBlkStatus.IOERR);
    }
    assert.equal(request(h, VirtioBlkRequest.DISCARD, 0).status, VirtioBlkStatus.IOERR, "no segment at all");
    assert.equal(h.calls.punch, 0);
    assert.equal(fileHash(h.image.path), before);
    h.close();
  });

  it("WRITE_ZEROES zeroes the range and keeps it allocated", () => {
    const h = harness();
    const before = blocks(h.image.path);
    assert.equal(request(h, VirtioBlkRequest.WRITE_ZEROES, 0, { payload: [segments(h, [{ sector: 8, count: 2048 }])] }).status, VirtioBlkStatus.OK);
    assert.ok(fileBytes(h.image.path, 8 * 512, 2048 * 512).every((b) => b === 0));
    assert.ok(!fileBytes(h.image.path, 0, 512).every((b) => b === 0));
    assert.equal(h.calls.punch, 0, "no UNMAP flag: no hole");
    assert.equal(h.calls.zeroRange, 1, "zeroed in place");
    assert.ok(blocks(h.image.path) >= before - 8, "still allocated");
    h.close();
  });

  it("WRITE_ZEROES with UNMAP punches a hole", () => {
    const h = harness();
    const before = blocks(h.image.path);
    const seg = segments(h, [{ sector: 4096, count: 4096, flags: VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP }]);
    assert.equal(request(h, VirtioBlkRequest.WRITE_ZEROES, 0, { payload: [seg] }).status, VirtioBlkStatus.OK);
    assert.equal(h.calls.punch, 1);
    assert.ok(fileBytes(h.image.path, 4096 * 512, 4096 * 512).every((b) => b === 0));
    assert.ok(blocks(h.image.path) <= before - (2 * MiB) / 512);
    h.close();
  });

  it("WRITE_ZEROES falls back to writing zeroes", () => {
    const h = harness({ io: { punchHole: () => false, zeroRange: () => false } });
    const seg = segments(h, [{ sector: 1, count: 5, flags: VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP }, { sector: 20, count: 2 }]);
    assert.equal(request(h, VirtioBlkRequest.WRITE_ZEROES, 0, { payload: [seg] }).status, VirtioBlkStatus.OK);
    assert.ok(fileBytes(h.image.path, 512, 5 * 512).every((b) => b === 0));
    assert.ok(fileBytes(h.image.path, 20 * 512, 2 * 512).every((b) => b === 0));
    assert.ok(!fileBytes(h.image.path, 0, 512).every((b) => b === 0));
    assert.ok(!fileBytes(h.image.path, 6 * 512, 512).every((b) => b === 0));
    h.close();
  });

  it("DISCARD / WRITE_ZEROES the driver did not negotiate are UNSUPP", () => {
    const h = harness({ features: V1 });
    assert.equal(request(h, VirtioBlkRequest.DISCARD, 0, { payload: [segments(h, [{ sector: 0, count: 1 }])] }).status, VirtioBlkStatus.UNSUPP);
    assert.equal(request(h, VirtioBlkRequest.WRITE_ZEROES, 0, { payload: [segments(h, [{ sector: 0, count: 1 }])] }).status, VirtioBlkStatus.UNSUPP);
    h.close();
  });
});

describe("virtio-blk on a read-only disk", () => {
  it("reads work; OUT, DISCARD and WRITE_ZEROES are IOERR and the file is unchanged", () => {
    const path = makeImage();
    const before = fileHash(path);
    const h = harness({ path, readOnly: true });
    assert.equal(request(h, VirtioBlkRequest.IN, 0, { inLens: [512] }).status, VirtioBlkStatus.OK);
    assert.equal(request(h, VirtioBlkRequest.OUT, 0, { out: [pattern(512, 1)] }).status, VirtioBlkStatus.IOERR);
    assert.equal(request(h, VirtioBlkRequest.DISCARD, 0, { payload: [segments(h, [{ sector: 0, count: 8 }])] }).status, VirtioBlkStatus.IOERR);
    assert.equal(request(h, VirtioBlkRequest.WRITE_ZEROES, 0, { payload: [segments(h, [{ sector: 0, count: 8 }])] }).status, VirtioBlkStatus.IOERR);
    assert.equal(request(h, VirtioBlkRequest.FLUSH, 0).status, VirtioBlkStatus.OK);
    assert.equal(request(h, VirtioBlkRequest.GET_ID, 0, { inLens: [20] }).status, VirtioBlkStatus.OK);
    h.close();
    assert.equal(fileHash(path), before);
  });
});

describe("virtio-blk and a broken driver", () => {
  it("a request with no writable status byte: needsReset, later kicks ignored, no throw", () => {
    const h = harness();
    const ok = h.drv.writable(1);
    h.drv.add([header(h, VirtioBlkRequest.FLUSH, 0), ok]);
    h.drv.add([header(h, VirtioBlkRequest.IN, 0), h.drv.readable(new Uint8Array(512))]);
    h.dev.queueNotified(0);
    assert.equal(h.resets.length, 1);
    assert.match(h.resets[0]!, /^virtio-blk: request \(head \d+\) has no device-writable status byte$/);
    assert.deepEqual(h.drv.used().length, 1, "the good request before it completed");
    assert.deepEqual(h.signals, [0], "and was signalled");
    h.drv.add([header(h, VirtioBlkRequest.FLUSH, 0), h.drv.writable(1)]);
    h.dev.queueNotified(0);
    assert.equal(h.drv.used().length, 0, "a broken device serves nothing until reset");
    h.close();
  });

  it("a descriptor loop: needsReset with the queue's message", () => {
    const h = harness();
    const hd = header(h, VirtioBlkRequest.IN, 0);
    h.drv.writeDescriptor(0, { addr: hd.addr, len: 16, flags: VIRTQ_DESC_F_NEXT, next: 1 });
    const st = h.drv.writable(1).addr;
    h.drv.writeDescriptor(1, { addr: st, len: 1, flags: VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, next: 2 });
    h.drv.writeDescriptor(2, { addr: st, len: 1, flags: VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, next: 1 });
    h.drv.publish(0);
    assert.doesNotThrow(() => h.dev.queueNotified(0));
    assert.equal(h.resets.length, 1);
    assert.match(h.resets[0]!, /virtqueue 0: .*longer than the queue size/);
    h.close();
  });

  it("a buffer outside guest RAM: needsReset", () => {
    const h = harness();
    h.drv.add([header(h, VirtioBlkRequest.IN, 0), { addr: 0x7fff_0000, len: 512, write: true }, h.drv.writable(1)]);
    h.dev.queueNotified(0);
    assert.match(h.resets[0]!, /outside guest RAM/);
    h.close();
  });

  it("a bad queue at activation: needsReset, kicks ignored", () => {
    const path = makeImage();
    const image = openDiskImage(path);
    const mem = GuestMemory.forTest(4 * MiB);
    const dev = new VirtioBlock(new FileBlockEngine(image));
    const resets: string[] = [];
    dev.activate({
      memory: mem,
      features: V1,
      queues: [{ index: 0, size: 256, ready: true, descAddr: 0x10008, availAddr: 0x20000, usedAddr: 0x30000 }],
      signalUsed: () => {},
      needsReset: (r) => resets.push(r),
    });
    assert.match(resets[0]!, /descriptor table at 0x10008 is not 16-byte aligned/);
    assert.doesNotThrow(() => dev.queueNotified(0));
    image.close();
  });

  it("reset brings a broken device back", () => {
    const h = harness();
    h.drv.publish(300); // bad head
    h.dev.queueNotified(0);
    assert.equal(h.resets.length, 1);
    h.dev.reset();
    const drv = new VirtqDriver(h.mem, { size: 256 });
    h.dev.activate({ memory: h.mem, features: V1, queues: [drv.config()], signalUsed: () => {}, needsReset: () => assert.fail("no reset") });
    const s = drv.writable(1);
    drv.add([drv.readable(new Uint8Array(16).fill(0).map((_, i) => (i === 0 ? VirtioBlkRequest.FLUSH : 0))), s]);
    h.dev.queueNotified(0);
    assert.equal(drv.used().length, 1);
    assert.equal(h.mem.readU8(s.addr), VirtioBlkStatus.OK);
    h.close();
  });
});

describe("virtio-blk notifications and reset", () => {
  it("one interrupt for a batch", () => {
    const h = harness();
    for (let i = 0; i < 10; i++) {
      h.drv.add([header(h, VirtioBlkRequest.IN, i), h.drv.writable(512), h.drv.writable(1)]);
    }
    h.dev.queueNotified(0);
    assert.equal(h.drv.used().length, 10);
    assert.deepEqual(h.signals, [0]);
    h.close();
  });

  it("with EVENT_IDX, no interrupt until used_event is passed", () => {
    const h = harness({ features: V1 | EVENT_IDX | feature(VirtioBlkFeature.FLUSH) });
    h.drv.add([header(h, VirtioBlkRequest.IN, 0), h.drv.writable(512), h.drv.writable(1)]);
    h.dev.queueNotified(0);
    assert.deepEqual(h.signals, [0], "first completion");
    h.drv.setUsedEvent(3);
    for (let i = 0; i < 2; i++) {
      h.drv.add([header(h, VirtioBlkRequest.IN, 0), h.drv.writable(512), h.drv.writable(1)]);
      h.dev.queueNotified(0);
    }
    assert.deepEqual(h.signals, [0], "used idx 3: entry 3 not used yet");
    h.drv.add([header(h, VirtioBlkRequest.IN, 0), h.drv.writable(512), h.drv.writable(1)]);
    h.dev.queueNotified(0);
    assert.deepEqual(h.signals, [0, 0]);
    assert.equal(h.drv.availEvent(), 4, "avail_event follows what the device consumed");
    h.close();
  });

  it("kicks for other queues or before activation are ignored", () => {
    const h = harness({ activate: false });
    assert.doesNotThrow(() => h.dev.queueNotified(0));
    assert.doesNotThrow(() => h.dev.queueNotified(3));
    h.close();
  });

  it("reset flushes completed writes with fdatasync (only when something was written)", () => {
    const h = harness();
    h.dev.reset();
    assert.equal(h.calls.flush, 0, "nothing written");
    const h2 = harness();
    request(h2, VirtioBlkRequest.OUT, 0, { out: [pattern(512, 1)] });
    h2.dev.reset();
    assert.equal(h2.calls.flush, 1);
    assert.equal(h2.dev.stats.flushes, 1);
    h.close();
    h2.close();
  });
});
