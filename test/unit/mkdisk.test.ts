/**
 * makeDiskImage / `tskvm mkdisk`: an ext4 image of a directory, checked with e2fsprogs'
 * debugfs; refusals leave nothing behind. Skipped without mkfs.ext4 (e2fsprogs).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { runCli } from "../helpers/cli";
import { DiskBuildError, defaultImageSize, findMkfsExt4, makeDiskImage, measureTree } from "../../src/api/disk";
import { ExitCode } from "../../src/cli/exit-codes";

const noMkfs = findMkfsExt4() === undefined ? "mkfs.ext4 (e2fsprogs) is not installed" : false;
const MiB = 1024 * 1024;
const base = mkdtempSync(join(tmpdir(), "tskvm-mkdisk-"));
process.on("exit", () => rmSync(base, { recursive: true, force: true }));

/** A small project tree: nested directories, a script, binary data, a symbolic link. */
function project(name: string): string {
  const d = join(base, name);
  mkdirSync(join(d, "tests", "deep"), { recursive: true });
  writeFileSync(join(d, "Makefile"), "check:\n\t./tests/run.sh\n");
  writeFileSync(join(d, "tests", "run.sh"), "#!/bin/sh\necho ok\n", { mode: 0o755 });
  writeFileSync(join(d, "tests", "deep", "data.bin"), Buffer.from(Array.from({ length: 300_000 }, (_, i) => (i * 7) & 0xff)));
  symlinkSync("tests/run.sh", join(d, "run"));
  return d;
}

function debugfs(image: string, request: string): string {
  const r = spawnSync("debugfs", ["-R", request, image], { encoding: "latin1" });
  assert.equal(r.status, 0, r.stderr);
  return r.stdout;
}

const imagesIn = (d: string) => readdirSync(d).filter((n) => n.includes(".img") || n.includes("tskvm-"));

test("makeDiskImage: the directory's files, modes and links, in a sparse ext4 image with room to spare", { skip: noMkfs }, async () => {
  const src = project("p1");
  const outDir = join(base, "out1");
  mkdirSync(outDir);
  const out = join(outDir, "tests.img");
  const r = await makeDiskImage(src, out, { label: "tests" });
  assert.equal(r.path, out);
  assert.equal(r.entries, 6);
  assert.equal(r.contentBytes, 300_000 + 23 + 18);
  const st = statSync(out);
  assert.equal(st.size, r.sizeBytes);
  assert.ok(st.size >= 64 * MiB, "at least 64 MiB to spare");
  assert.ok(st.blocks * 512 < st.size / 2, "sparse");
  assert.equal(debugfs(out, "cat /tests/run.sh"), "#!/bin/sh\necho ok\n");
  const data = Buffer.from(debugfs(out, "cat /tests/deep/data.bin"), "latin1");
  assert.deepEqual(data, readFileSync(join(src, "tests", "deep", "data.bin")));
  assert.match(debugfs(out, "stat /tests/run.sh"), /Mode: +0755/);
  assert.match(debugfs(out, "stat /run"), /Type: symlink/);
  const fsInfo = spawnSync("dumpe2fs", ["-h", out], { encoding: "utf8" }).stdout;
  assert.match(fsInfo, /Filesystem volume name: +tests/);
  assert.match(fsInfo, /has_journal.*extent|extent.*has_journal/);
  assert.deepEqual(imagesIn(outDir), ["tests.img"], "no temporary file left");
});

test("makeDiskImage: refusals leave nothing behind and never touch an existing image", { skip: noMkfs }, async () => {
  const src = project("p2");
  const outDir = join(base, "out2");
  mkdirSync(outDir);
  const out = join(outDir, "x.img");
  const fails = async (p: Promise<unknown>, failure: string, message: RegExp) => {
    const e = await p.then(() => undefined, (err: unknown) => err);
    assert.ok(e instanceof DiskBuildError, String(e));
    assert.equal(e.failure, failure);
    assert.match(e.message, message);
  };
  await fails(makeDiskImage(join(base, "nope"), out), "input", /directory '.*nope' does not exist/);
  await fails(makeDiskImage(join(src, "Makefile"), out), "input", /is not a directory/);
  await fails(makeDiskImage(src, join(base, "no", "dir", "x.img")), "input", /directory '.*' does not exist/);
  await fails(makeDiskImage(src, join(src, "inside.img")), "input", /inside the directory/);
  await fails(makeDiskImage(src, out, { sizeBytes: 1000 }), "options", /at least 16 MiB/);
  await fails(makeDiskImage(src, out, { label: "a-label-that-is-too-long" }), "options", /16 bytes/);
  // Too small for the content: mkfs.ext4 fails, the partial image is removed.
  const big = join(base, "big");
  mkdirSync(big);
  writeFileSync(join(big, "blob"), Buffer.alloc(40 * MiB, 1));
  await fails(makeDiskImage(big, out, { sizeBytes: 16 * MiB }), "input", /does not fit in 16 MiB/);
  assert.deepEqual(imagesIn(outDir), []);
  // An existing file is kept unless force is given; with force it is replaced whole.
  writeFileSync(out, "precious");
  await fails(makeDiskImage(src, out), "input", /exists: give --force/);
  assert.equal(readFileSync(out, "utf8"), "precious");
  const aborted = new AbortController();
  aborted.abort();
  await assert.rejects(makeDiskImage(src, out, { force: true, signal: aborted.signal }), DiskBuildError);
  assert.equal(readFileSync(out, "utf8"), "precious");
  assert.deepEqual(imagesIn(outDir), ["x.img"]);
  await makeDiskImage(src, out, { force: true, sizeBytes: 32 * MiB });
  assert.equal(statSync(out).size, 32 * MiB);
  assert.equal(debugfs(out, "cat /Makefile"), "check:\n\t./tests/run.sh\n");
  assert.deepEqual(imagesIn(outDir), ["x.img"]);
});

test("default size: content with slack plus 64 MiB, whole MiB; a tree is measured without following links", () => {
  const src = project("p3");
  const t = measureTree(src);
  assert.equal(t.entries, 6);
  assert.equal(t.contentBytes, 300_041);
  const size = defaultImageSize(t);
  assert.equal(size % MiB, 0);
  assert.ok(size >= t.blocksBytes + 64 * MiB);
  assert.ok(defaultImageSize({ entries: 0, blocksBytes: 0 }) >= 64 * MiB);
});

test("tskvm mkdisk: writes the image and says so; refusals are one line with exit 3", { skip: noMkfs }, () => {
  const src = project("p4");
  const out = join(base, "cli.img");
  const r = runCli(["mkdisk", src, out, "--size", "32M"]);
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stderr, /^tskvm: wrote .*cli\.img: 32 MiB ext4 image with 6 entries/);
  assert.equal(statSync(out).size, 32 * MiB);
  const again = runCli(["mkdisk", src, out]);
  assert.equal(again.status, ExitCode.BAD_INPUT);
  assert.equal(again.stderr, `tskvm: '${out}' exists: give --force to replace it\n`);
  assert.equal(runCli(["mkdisk", src, out, "--force"]).status, 0);
  const missing = runCli(["mkdisk", join(base, "absent"), join(base, "y.img")]);
  assert.equal(missing.status, ExitCode.BAD_INPUT);
  assert.match(missing.stderr, /^tskvm: directory '.*absent' does not exist\n$/);
});
