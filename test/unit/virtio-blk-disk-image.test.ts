import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import { join, resolve } from "node:path";
import { spawnSync } from "node:child_process";
import * as sys from "../../src/sys/libc";
import { DiskImageError, openDiskImage } from "../../src/host/disk-image";
import { parseDiskOption } from "../../src/api/option-values";

let dir: string;
before(() => {
  dir = fs.mkdtempSync(join(os.tmpdir(), "tskvm-img-"));
  fs.chmodSync(dir, 0o755);
});
after(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

let n = 0;
function file(bytes: number, mode = 0o644): string {
  const p = join(dir, `img${n++}.raw`);
  fs.writeFileSync(p, new Uint8Array(bytes));
  fs.chmodSync(p, mode);
  return p;
}

/** The DiskImageError message of fn, checked to be one line. */
function errorOf(fn: () => unknown): string {
  try {
    fn();
  } catch (e) {
    assert.ok(e instanceof DiskImageError, `expected DiskImageError, got ${String(e)}`);
    assert.ok(!e.message.includes("\n"), `one line: ${e.message}`);
    return e.message;
  }
  assert.fail("no error");
}

const isRoot = process.getuid?.() === 0;

/**
 * openDiskImage as an unprivileged user: root ignores file permissions, so when the tests
 * run as root the open happens in a child process running as nobody.
 */
function openAsUser(path: string, readOnly: boolean): string {
  if (!isRoot) {
    try {
      openDiskImage(path, { readOnly }).close();
      return "ok";
    } catch (e) {
      return (e as Error).message;
    }
  }
  const module = resolve(__dirname, "../../src/host/disk-image.js");
  const script = `
    const { openDiskImage } = require(${JSON.stringify(module)});
    try { openDiskImage(${JSON.stringify(path)}, { readOnly: ${readOnly} }).close(); console.log("ok"); }
    catch (e) { console.log(e.message); }`;
  const r = spawnSync(process.execPath, ["-e", script], { uid: 65534, gid: 65534, encoding: "utf8" });
  assert.equal(r.status, 0, r.stderr);
  return r.stdout.trim();
}

describe("parseDiskOption", () => {
  it("a path, read-write by default", () => {
    assert.deepEqual(parseDiskOption("/images/root.img"), { path: "/images/root.img", readOnly: false });
  });
  it("readonly (and ro, readonly=on/off)", () => {
    assert.deepEqual(parseDiskOption("a.img,readonly"), { path: "a.img", readOnly: true });
    assert.deepEqual(parseDiskOption("a.img,ro"), { path: "a.img", readOnly: true });
    assert.deepEqual(parseDiskOption("a.img,readonly=on"), { path: "a.img", readOnly: true });
    assert.deepEqual(parseDiskOption("a.img,readonly,readonly=off"), { path: "a.img", readOnly: false });
  });
  it("serial=ID", () => {
    assert.deepEqual(parseDiskOption("a.img,serial=data-1,readonly"), { path: "a.img", readOnly: true, serial: "data-1" });
    assert.match(errorOf(() => parseDiskOption("a.img,serial=123456789012345678901")), /serial must be up to 20 printable ASCII/);
    assert.match(errorOf(() => parseDiskOption("a.img,serial=é")), /serial must be/);
  });
  it("unknown options and a missing path are errors", () => {
    assert.equal(errorOf(() => parseDiskOption("a.img,cache=none")), `unknown disk option "cache=none" in "a.img,cache=none" (known: readonly, serial=ID)`);
    assert.match(errorOf(() => parseDiskOption("a.img,")), /unknown disk option ""/);
    assert.match(errorOf(() => parseDiskOption("")), /has no image path/);
    assert.match(errorOf(() => parseDiskOption(",readonly")), /has no image path/);
    assert.match(errorOf(() => parseDiskOption("a.img,readonly=maybe")), /readonly takes on or off/);
  });
});

describe("openDiskImage", () => {
  it("opens an image: fd, size, mode; close releases it", () => {
    const p = file(1024 * 1024);
    const img = openDiskImage(p);
    assert.equal(img.sizeBytes, 1024 * 1024);
    assert.equal(img.readOnly, false);
    assert.equal(img.path, p);
    assert.ok(img.fd >= 0);
    img.close();
    img.close(); // idempotent
    openDiskImage(p).close();
  });

  it("a missing file", () => {
    const p = join(dir, "nope.img");
    assert.equal(errorOf(() => openDiskImage(p)), `disk image ${p} does not exist`);
  });

  it("a directory", () => {
    assert.equal(errorOf(() => openDiskImage(dir)), `disk image ${dir} is a directory, not an image file`);
  });

  it("not a regular file", () => {
    assert.match(errorOf(() => openDiskImage("/dev/null")), /is not a regular file/);
  });

  it("an empty file", () => {
    const p = file(0);
    assert.match(errorOf(() => openDiskImage(p)), /is empty; make it a whole number of 512-byte sectors/);
  });

  it("a size that is not a multiple of 512", () => {
    const p = file(1000);
    assert.equal(errorOf(() => openDiskImage(p)), `disk image ${p} is 1000 bytes, not a multiple of 512; pad it with truncate -s 1024 ${p}`);
  });

  it("a file the user may read but not write: suggests ,readonly", () => {
    const p = file(4096, 0o444);
    assert.equal(openAsUser(p, false), `disk image ${p} is not writable (permission denied); attach it with ,readonly to use it read-only`);
    assert.equal(openAsUser(p, true), "ok");
  });

  it("a file the user may not read", () => {
    const p = file(4096, 0o200);
    assert.equal(openAsUser(p, true), `disk image ${p} is not readable (permission denied)`);
    assert.equal(openAsUser(join(dir, "img-missing"), true), `disk image ${join(dir, "img-missing")} does not exist`);
  });

  it("an image already in use read-write by another VM", () => {
    const p = file(4096);
    const first = openDiskImage(p);
    assert.equal(errorOf(() => openDiskImage(p)), `disk image ${p} is in use by another tskvm (or QEMU); stop it or attach with ,readonly`);
    assert.equal(errorOf(() => openDiskImage(p, { readOnly: true })), `disk image ${p} is in use read-write by another tskvm (or QEMU); stop it first`);
    first.close();
    openDiskImage(p).close();
  });

  it("read-only users share an image; a writer is refused", () => {
    const p = file(4096);
    const a = openDiskImage(p, { readOnly: true });
    const b = openDiskImage(p, { readOnly: true });
    assert.match(errorOf(() => openDiskImage(p)), /is in use by another tskvm/);
    a.close();
    assert.match(errorOf(() => openDiskImage(p)), /is in use by another tskvm/);
    b.close();
    openDiskImage(p).close();
  });

  it("QEMU's image locks are honoured (OFD locks on bytes 100+ / 200+)", () => {
    const p = file(4096);
    // A QEMU that writes the image: holds "write" (byte 101) and denies write (byte 201).
    const qemu = sys.open(p, sys.O_RDWR);
    try {
      assert.ok(sys.ofdLock(qemu, sys.F_RDLCK, 101, 1));
      assert.ok(sys.ofdLock(qemu, sys.F_RDLCK, 201, 1));
      assert.match(errorOf(() => openDiskImage(p)), /in use by another tskvm \(or QEMU\)/);
      assert.match(errorOf(() => openDiskImage(p, { readOnly: true })), /in use read-write/);
    } finally {
      sys.close(qemu);
    }
    // And QEMU sees tskvm's: a writer holds byte 201, which QEMU tests before writing.
    const img = openDiskImage(p);
    const probe = sys.open(p, sys.O_RDWR);
    try {
      assert.equal(sys.ofdLockTest(probe, sys.F_WRLCK, 201, 1), sys.F_RDLCK);
      assert.equal(sys.ofdLockTest(probe, sys.F_WRLCK, 101, 1), sys.F_RDLCK);
    } finally {
      sys.close(probe);
      img.close();
    }
    const probe2 = sys.open(p, sys.O_RDWR);
    assert.equal(sys.ofdLockTest(probe2, sys.F_WRLCK, 201, 1), sys.F_UNLCK, "close released the locks");
    sys.close(probe2);
  });
});
