/**
 * `--share` and `--rootfs` on bad input: one line, the README's exit status, nothing started.
 * All of these fail before any KVM or guest is needed.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { runCli } from "../helpers/cli";

const dir = mkdtempSync(join(tmpdir(), "tskvm-cli-shares-"));
process.on("exit", () => rmSync(dir, { recursive: true, force: true }));
const aFile = join(dir, "file");
writeFileSync(aFile, "x");

const oneLine = (stderr: string, pattern: RegExp) => {
  assert.match(stderr.trimEnd(), pattern);
  assert.equal(stderr.trimEnd().split("\n").length, 1, stderr);
  assert.doesNotMatch(stderr, /\n\s+at /, "no stack trace");
};

test("a missing share directory: exit 3", () => {
  const r = runCli(["run", "--share", join(dir, "missing"), "--", "true"]);
  assert.equal(r.status, 3);
  oneLine(r.stderr, /^tskvm: cannot share .*missing: no such directory$/);
});

test("a share that is not a directory: exit 3", () => {
  const r = runCli(["run", "--share", aFile, "--", "true"]);
  assert.equal(r.status, 3);
  oneLine(r.stderr, /^tskvm: cannot share .*file: not a directory$/);
});

test("two shares with one tag, a bad tag, an unknown share option: exit 2, naming --share", () => {
  let r = runCli(["run", "--share", `${dir},tag=t`, "--share", "/tmp,tag=t", "--", "true"]);
  assert.equal(r.status, 2);
  oneLine(r.stderr, /^tskvm: share tag "t" is used twice \(.* and \/tmp\) \(--share\)$/);
  r = runCli(["run", "--share", `${dir},tag=no space`, "--", "true"]);
  assert.equal(r.status, 2);
  oneLine(r.stderr, /share tag "no space": use 1 to 36/);
  r = runCli(["run", "--share", `${dir},writable`, "--", "true"]);
  assert.equal(r.status, 2);
  oneLine(r.stderr, /unknown share option "writable"/);
});

test("--rootfs takes host only: exit 2", () => {
  const r = runCli(["run", "--rootfs", "guest", "--", "true"]);
  assert.equal(r.status, 2);
  oneLine(r.stderr, /^tskvm: bad --rootfs 'guest': the only one is host/);
});

test("virtiofsd not installed: exit 4, naming the package", () => {
  const r = runCli(["run", "--share", dir, "--", "true"], { env: { TSKVM_VIRTIOFSD: join(dir, "no-virtiofsd") } });
  assert.equal(r.status, 4);
  oneLine(r.stderr, /^tskvm: TSKVM_VIRTIOFSD=.* is not an executable file \(virtiofsd comes with the Debian package qemu-system-common\)$/);
});

test("sharing the guest's own directories is refused: exit 2", () => {
  const r = runCli(["run", "--share", "/proc", "--", "true"]);
  assert.equal(r.status, 2);
  oneLine(r.stderr, /cannot share \/proc at the same path in the guest: the guest needs its own \/proc/);
});

test("--rootfs host with --snapshot: exit 2, one line saying to share directories instead", () => {
  const cache = join(dir, "cache");
  const r = runCli(["run", "--snapshot", cache, "--rootfs", "host", "--", "true"]);
  assert.equal(r.status, 2, r.stderr);
  oneLine(r.stderr, /^tskvm: a snapshot cache cannot keep a VM on the host's root file system \(--rootfs host: virtiofsd serves it from boot\): share directories with --share instead$/);
  assert.equal(r.stdout, "");
  assert.throws(() => readdirSync(cache), /ENOENT/, "nothing was written");
});
