/**
 * src/sys/io-uring.ts: the ABI against <linux/io_uring.h> (native/io_uring_abi.c); the
 * availability probe, including io_uring blocked by a seccomp filter (EPERM, as a
 * container profile does) and hidden by one (ENOSYS, as on a kernel without io_uring);
 * and real requests on real files: reads, writes, vectored I/O, fdatasync, fallocate,
 * short reads at the end of a file, errors as -errno, EAGAIN from an empty non-blocking
 * pipe, polls, and more requests than the ring holds.
 *
 * On a host where io_uring cannot be used the request tests say why and skip, and fail
 * instead when TSKVM_REQUIRE_IO_URING=1.
 */
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import * as sys from "../../src/sys/libc";
import * as uring from "../../src/sys/io-uring";
import { IoUring, IoUringAbi, IoUringOp, probeIoUring } from "../../src/sys/io-uring";
import { buildNative, repoRoot } from "../../scripts/lib/native";
import { assertAbiMatches } from "../helpers/abi-lines";

const EAGAIN = os.constants.errno.EAGAIN;
const EBADF = os.constants.errno.EBADF;
const EINVAL = os.constants.errno.EINVAL;

describe("io_uring ABI against the host's <linux/io_uring.h>", () => {
  it("every offset, size, opcode and flag matches native/io_uring_abi.c", () => {
    const ts = new Map<string, number>();
    for (const [k, v] of Object.entries(IoUringAbi)) ts.set(`IoUringAbi.${k}`, v);
    for (const [k, v] of Object.entries(IoUringOp)) ts.set(`IoUringOp.${k}`, v);
    for (const [k, v] of Object.entries(uring)) {
      if (typeof v === "number" && /^(IOSQE_|IORING_|RWF_)/.test(k)) ts.set(k, v);
    }
    assertAbiMatches("io_uring_abi", ts);
  });
});

/** Run the probe in a child node under a seccomp filter making io_uring_setup fail with `errno`. */
function probeUnderSeccomp(errno: number): uring.IoUringSupport {
  const deny = buildNative("seccomp_deny");
  const mod = path.join(repoRoot(), "dist", "src", "sys", "io-uring.js");
  const script = `process.stdout.write(JSON.stringify(require(${JSON.stringify(mod)}).probeIoUring()))`;
  const r = spawnSync(deny, [String(errno), "425", "--", process.execPath, "-e", script], { encoding: "utf8" });
  assert.equal(r.status, 0, `seccomp_deny: ${r.stderr}`);
  return JSON.parse(r.stdout) as uring.IoUringSupport;
}

describe("io_uring availability probe", () => {
  it("says why io_uring is unavailable when a seccomp filter returns EPERM", () => {
    const p = probeUnderSeccomp(os.constants.errno.EPERM);
    assert.equal(p.available, false);
    if (p.available) return;
    assert.equal(p.errno, os.constants.errno.EPERM);
    assert.match(p.reason, /^io_uring_setup: EPERM \(.*(seccomp|io_uring_disabled)/);
    assert.ok(!p.reason.includes("\n"));
  });

  it("says so when io_uring_setup does not exist (ENOSYS)", () => {
    const p = probeUnderSeccomp(os.constants.errno.ENOSYS);
    assert.equal(p.available, false);
    if (p.available) return;
    assert.equal(p.errno, os.constants.errno.ENOSYS);
    assert.match(p.reason, /^io_uring_setup: ENOSYS \(a kernel without io_uring/);
  });

  it("reads the kernel.io_uring_disabled sysctl, and nothing where it is absent", () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "tskvm-uring-sysctl-"));
    try {
      fs.writeFileSync(path.join(dir, "v"), "2\n");
      assert.equal(uring.ioUringDisabledSysctl(path.join(dir, "v")), 2);
      assert.equal(uring.ioUringDisabledSysctl(path.join(dir, "absent")), undefined);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it("on this host: available with every opcode tskvm needs, or a one-line reason", (t) => {
    const p = probeIoUring();
    if (!p.available) {
      assert.ok(p.reason.length > 0 && !p.reason.includes("\n"));
      if (process.env.TSKVM_REQUIRE_IO_URING) assert.fail(`io_uring unavailable but TSKVM_REQUIRE_IO_URING is set: ${p.reason}`);
      t.skip(`io_uring unavailable here: ${p.reason}`);
      return;
    }
    for (const op of uring.REQUIRED_OPCODES) assert.ok(p.opcodes.has(op), `opcode ${op}`);
  });
});

describe("io_uring requests on real files", () => {
  const support = probeIoUring();
  const skip = support.available ? false : `io_uring unavailable here: ${support.reason}`;
  if (skip !== false && process.env.TSKVM_REQUIRE_IO_URING) {
    it("is required (TSKVM_REQUIRE_IO_URING)", () => assert.fail(skip));
    return;
  }
  let dir = "";
  let file = "";
  let fd = -1;
  let ring: IoUring;
  /** A host buffer and its address (V8 never moves an ArrayBuffer's backing store). */
  const buf = new Uint8Array(64 * 1024);
  let bufAddr = 0;
  const FILE_BYTES = 256 * 1024;

  before(() => {
    if (skip !== false) return;
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "tskvm-uring-"));
    file = path.join(dir, "data.img");
    const content = Buffer.alloc(FILE_BYTES);
    for (let i = 0; i < content.length; i++) content[i] = (i * 7 + (i >> 12)) & 0xff;
    fs.writeFileSync(file, content);
    fd = sys.open(file, sys.O_RDWR);
    ring = IoUring.create(8);
    bufAddr = sys.addressOf(buf.buffer);
  });
  after(() => {
    if (skip !== false) return;
    ring.close();
    sys.close(fd);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  /** Submit what is prepared, wait for `n` completions, return [tag, result] pairs in order. */
  const complete = (n: number): [number, number][] => {
    ring.submitAndWait(n);
    const out: [number, number][] = [];
    const c = ring.completionCount();
    for (let i = 0; i < c; i++) out.push([ring.completionTag(i), ring.completionResult(i)]);
    ring.consumeCompletions(c);
    return out;
  };
  const expected = (offset: number, length: number): Uint8Array => new Uint8Array(fs.readFileSync(file)).subarray(offset, offset + length);

  it("rounds the ring up to a power of two with a completion queue twice as big", { skip }, () => {
    assert.equal(ring.sqEntries, 8);
    assert.equal(ring.cqEntries, 16);
    assert.equal(ring.sqSpace, 8);
    assert.throws(() => IoUring.create(0), RangeError);
  });

  it("reads at offsets, one crossing for a batch, completions tagged", { skip }, () => {
    buf.fill(0);
    for (let k = 0; k < 4; k++) assert.ok(ring.prepRead(fd, bufAddr + k * 4096, 4096, k * 8192 + 512, 100 + k));
    assert.equal(ring.unsubmitted, 4);
    const got = complete(4);
    assert.equal(ring.unsubmitted, 0);
    assert.deepEqual(got.map(([t]) => t).sort(), [100, 101, 102, 103]);
    for (const [, res] of got) assert.equal(res, 4096);
    for (let k = 0; k < 4; k++) assert.deepEqual(buf.subarray(k * 4096, (k + 1) * 4096), expected(k * 8192 + 512, 4096));
  });

  it("reports a short read at the end of the file, and 0 past it", { skip }, () => {
    ring.prepRead(fd, bufAddr, 4096, FILE_BYTES - 1000, 1);
    ring.prepRead(fd, bufAddr + 8192, 4096, FILE_BYTES + 4096, 2);
    const got = new Map(complete(2));
    assert.equal(got.get(1), 1000);
    assert.equal(got.get(2), 0);
    assert.deepEqual(buf.subarray(0, 1000), expected(FILE_BYTES - 1000, 1000));
  });

  it("writes, vectored writes and reads, fdatasync and fallocate", { skip }, () => {
    buf.fill(0xa5, 0, 4096);
    buf.fill(0x5a, 8192, 8192 + 4096);
    ring.prepWrite(fd, bufAddr, 4096, 65536, 1);
    // iovecs: two separate 2 KiB pieces written as one 4 KiB run at 131072.
    const iov = new Uint32Array(8);
    const iovAddr = sys.addressOf(iov.buffer);
    const setIov = (i: number, addr: number, len: number) => {
      iov[4 * i] = addr >>> 0;
      iov[4 * i + 1] = Math.floor(addr / 4294967296);
      iov[4 * i + 2] = len;
      iov[4 * i + 3] = 0;
    };
    setIov(0, bufAddr, 2048);
    setIov(1, bufAddr + 8192, 2048);
    ring.prepWritev(fd, iovAddr, 2, 131072, 2);
    assert.deepEqual(complete(2).map(([, r]) => r), [4096, 4096]);
    ring.prepFsync(fd, true, 3);
    assert.deepEqual(complete(1), [[3, 0]]);
    const onDisk = fs.readFileSync(file);
    assert.ok(onDisk.subarray(65536, 65536 + 4096).every((b) => b === 0xa5));
    assert.ok(onDisk.subarray(131072, 131072 + 2048).every((b) => b === 0xa5));
    assert.ok(onDisk.subarray(131072 + 2048, 131072 + 4096).every((b) => b === 0x5a));
    // Read the same two pieces back in one readv.
    buf.fill(0);
    ring.prepReadv(fd, iovAddr, 2, 65536, 4);
    assert.deepEqual(complete(1), [[4, 4096]]);
    assert.ok(buf.subarray(0, 2048).every((b) => b === 0xa5));
    assert.ok(buf.subarray(8192, 8192 + 2048).every((b) => b === 0xa5));
    // Punch a hole (keep size): reads back as zeroes.
    ring.prepFallocate(fd, sys.FALLOC_FL_PUNCH_HOLE | sys.FALLOC_FL_KEEP_SIZE, 65536, 4096, 5);
    const [[tag, res]] = complete(1) as [[number, number]];
    assert.equal(tag, 5);
    if (res === -os.constants.errno.EOPNOTSUPP) return; // a file system without holes
    assert.equal(res, 0);
    assert.ok(fs.readFileSync(file).subarray(65536, 65536 + 4096).every((b) => b === 0));
    assert.equal(fs.statSync(file).size, FILE_BYTES);
  });

  it("returns errors as -errno in the completion, and carries on with the rest", { skip }, () => {
    const ro = sys.open(file, sys.O_RDONLY);
    try {
      ring.prepWrite(ro, bufAddr, 512, 0, 1); // EBADF: not open for writing
      ring.prepRead(fd, bufAddr, 512, 0, 2);
      ring.prepRead(1 << 30, bufAddr, 512, 0, 3); // no such fd
      ring.prepFallocate(fd, 0xffff, 0, 4096, 4); // unknown mode bits
      const got = new Map(complete(4));
      assert.equal(got.get(1), -EBADF);
      assert.equal(got.get(2), 512);
      assert.equal(got.get(3), -EBADF);
      assert.ok(got.get(4) === -EINVAL || got.get(4) === -os.constants.errno.EOPNOTSUPP, `fallocate with bad mode: ${got.get(4)}`);
    } finally {
      sys.close(ro);
    }
  });

  it("returns -EAGAIN for a RWF_NOWAIT read of an empty pipe; a plain read waits for data or says EAGAIN", { skip }, () => {
    const [r, w] = sys.pipe2(sys.O_NONBLOCK);
    try {
      ring.prepRead(r, bufAddr, 100, -1, 7, uring.RWF_NOWAIT);
      assert.deepEqual(complete(1), [[7, -EAGAIN]]);
      // Without RWF_NOWAIT, kernels differ for an O_NONBLOCK fd: older ones complete with
      // -EAGAIN at once, newer ones arm a poll and complete when data arrives.
      ring.prepRead(r, bufAddr, 100, -1, 8);
      ring.submitAndWait(0);
      if (ring.completionCount() > 0) {
        assert.deepEqual(complete(1), [[8, -EAGAIN]]);
        ring.prepRead(r, bufAddr, 100, -1, 8);
      }
      sys.write(w, Uint8Array.of(1, 2, 3));
      assert.deepEqual(complete(1), [[8, 3]]);
      assert.deepEqual([...buf.subarray(0, 3)], [1, 2, 3]);
    } finally {
      sys.close(r);
      sys.close(w);
    }
  });

  it("polls an eventfd: a poll completes when it is signalled", { skip }, () => {
    const efd = sys.eventfd(0, sys.EFD_NONBLOCK);
    try {
      ring.prepPoll(efd, sys.POLLIN, 9);
      ring.submitAndWait(0);
      assert.equal(ring.completionCount(), 0);
      sys.write(efd, new Uint8Array(new BigUint64Array([1n]).buffer));
      const got = complete(1);
      assert.equal(got.length, 1);
      assert.equal(got[0]![0], 9);
      assert.ok((got[0]![1] & sys.POLLIN) !== 0);
    } finally {
      sys.close(efd);
    }
  });

  it("refuses to prepare past a full queue; the caller submits and goes on", { skip }, () => {
    let prepared = 0;
    while (ring.prepNop(prepared)) prepared++;
    assert.equal(prepared, ring.sqEntries);
    assert.equal(ring.sqSpace, 0);
    assert.equal(complete(prepared).length, prepared);
    assert.equal(ring.sqSpace, ring.sqEntries);
    // Many more requests than entries, in rounds: all complete, in some order, once each.
    const seen = new Set<number>();
    for (let round = 0; round < 50; round++) {
      for (let k = 0; k < ring.sqEntries; k++) ring.prepRead(fd, bufAddr + k * 512, 512, (round * 8 + k) * 512, round * 8 + k);
      for (const [tag, res] of complete(ring.sqEntries)) {
        assert.equal(res, 512);
        seen.add(tag);
      }
    }
    assert.equal(seen.size, 400);
  });
});
