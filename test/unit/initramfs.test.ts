/**
 * newc initramfs archives: what the kernel's unpacker (and GNU cpio) reads, parent
 * directories added, 4-byte alignment, and archives appended to an existing initrd.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { lstatSync, mkdtempSync, readFileSync, readlinkSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { appendInitramfs, buildInitramfs, listInitramfs } from "../../src/boot/initramfs";

const hasCpio = spawnSync("cpio", ["--version"]).status === 0;

test("buildInitramfs: files, directories, links and device nodes, parents first, every header 4-byte aligned", () => {
  const archive = buildInitramfs([
    { kind: "file", path: "/lib/modules/6.1/kernel/a.ko", data: Buffer.from("module-a"), mode: 0o644 },
    { kind: "file", path: "init", data: Buffer.from("#!/bin/sh\n"), mode: 0o755 },
    { kind: "symlink", path: "bin/sh", target: "busybox" },
    { kind: "char", path: "dev/console", major: 5, minor: 1 },
    { kind: "dir", path: "lib" },
  ]);
  const entries = listInitramfs(archive);
  assert.deepEqual(
    entries.map((e) => e.path),
    ["lib", "lib/modules", "lib/modules/6.1", "lib/modules/6.1/kernel", "lib/modules/6.1/kernel/a.ko", "init", "bin", "bin/sh", "dev", "dev/console"],
  );
  const byPath = new Map(entries.map((e) => [e.path, e]));
  assert.equal(Buffer.from(byPath.get("lib/modules/6.1/kernel/a.ko")!.data).toString(), "module-a");
  assert.equal(byPath.get("init")!.mode, 0o100755);
  assert.equal(byPath.get("bin/sh")!.mode, 0o120777);
  assert.equal(Buffer.from(byPath.get("bin/sh")!.data).toString(), "busybox");
  assert.equal(byPath.get("dev/console")!.mode, 0o020600);
  assert.deepEqual(byPath.get("dev/console")!.rdev, [5, 1]);
  assert.equal(byPath.get("lib")!.mode, 0o040755);
  // Every header starts at a multiple of 4, as the kernel's unpacker requires.
  const text = Buffer.from(archive).toString("latin1");
  for (let at = text.indexOf("070701"); at >= 0; at = text.indexOf("070701", at + 1)) {
    if (/^070701[0-9a-f]{8}/.test(text.slice(at, at + 14))) assert.equal(at % 4, 0, `header at ${at}`);
  }
  assert.match(text, /TRAILER!!!/);
  assert.equal(archive.byteLength % 4, 0);
});

test("buildInitramfs: refuses paths that leave the archive's root", () => {
  assert.throws(() => buildInitramfs([{ kind: "dir", path: "../etc" }]), RangeError);
  assert.throws(() => buildInitramfs([{ kind: "dir", path: "/" }]), RangeError);
});

test("GNU cpio unpacks what buildInitramfs writes", { skip: hasCpio ? false : "cpio is not installed" }, () => {
  const dir = mkdtempSync(join(tmpdir(), "tskvm-cpio-"));
  try {
    const archive = buildInitramfs([
      { kind: "file", path: "etc/tskvm/modules", data: Buffer.from("/lib/modules/x/a.ko\n") },
      { kind: "file", path: "odd-length-name.bin", data: Buffer.from([1, 2, 3]) },
      { kind: "symlink", path: "sbin/init", target: "../init" },
    ]);
    const r = spawnSync("cpio", ["-idm", "--quiet", "--no-absolute-filenames"], { cwd: dir, input: archive });
    assert.equal(r.status, 0, r.stderr.toString());
    assert.equal(readFileSync(join(dir, "etc/tskvm/modules"), "utf8"), "/lib/modules/x/a.ko\n");
    assert.deepEqual([...readFileSync(join(dir, "odd-length-name.bin"))], [1, 2, 3]);
    assert.ok(lstatSync(join(dir, "sbin/init")).isSymbolicLink());
    assert.equal(readlinkSync(join(dir, "sbin/init")), "../init");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("appendInitramfs: the next archive starts at a 4-byte boundary, with zeros between", () => {
  const base = Uint8Array.from([0x1f, 0x8b, 8, 0, 0, 0, 0]); // 7 bytes, e.g. the end of a gzip stream
  const extra = buildInitramfs([{ kind: "file", path: "x", data: Buffer.from("y") }]);
  const both = appendInitramfs(base, extra);
  assert.equal(both.byteLength, 8 + extra.byteLength);
  assert.deepEqual([...both.subarray(0, 7)], [...base]);
  assert.equal(both[7], 0);
  assert.deepEqual(Buffer.from(both.subarray(8)), Buffer.from(extra));
  assert.deepEqual(listInitramfs(both.subarray(8)).map((e) => e.path), ["x"]);
  assert.equal(appendInitramfs(extra).byteLength, extra.byteLength);
});
