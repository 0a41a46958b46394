/**
 * Tier 3: `tskvm run` and the API with the default Linux guest, whose /init runs the guest
 * agent: exit statuses, output streams kept apart from the kernel's console and from the
 * control channel, a test disk made with mkdisk, clean power-off, SIGTERM. Each boot takes
 * ~25 s on this workplace's emulating KVM; the limits are generous. Without a built guest
 * the tests say so (and fail when TSKVM_REQUIRE_GUEST=1, as in CI).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { spawnSync } from "node:child_process";
import { READY_MS, guestOrSkip } from "../helpers/linux-tier";
import { RunningCli, runCli } from "../helpers/cli";
import { startVm, makeDiskImage } from "../../src/api";
import { findMkfsExt4 } from "../../src/api/disk";

const TEST_MS = 900_000;
const dir = mkdtempSync(join(tmpdir(), "tskvm-run-"));
process.on("exit", () => rmSync(dir, { recursive: true, force: true }));

const run = (args: string[]) => {
  const started = Date.now();
  const r = runCli(["run", "--ready-timeout", String(READY_MS / 1000), ...args], { timeoutMs: READY_MS + 120_000 });
  return { ...r, ms: Date.now() - started };
};

test("tskvm run -- sh -c 'exit 3' exits 3", { timeout: TEST_MS }, (t) => {
  if (!guestOrSkip(t)) return;
  const r = run(["--", "sh", "-c", "exit 3"]);
  t.diagnostic(`tskvm run -- sh -c 'exit 3': ${r.ms} ms`);
  assert.equal(r.status, 3, r.stderr);
  assert.equal(r.stdout, "");
  assert.equal(r.stderr, "");
});

test("tskvm run -- echo hi prints hi; the console log has the kernel's messages and none of the output", { timeout: TEST_MS }, (t) => {
  if (!guestOrSkip(t)) return;
  const log = join(dir, "console.log");
  const r = run(["--console-log", log, "--", "echo", "hi"]);
  t.diagnostic(`tskvm run -- echo hi: ${r.ms} ms`);
  assert.equal(r.status, 0, r.stderr);
  assert.equal(r.stdout, "hi\n");
  assert.equal(r.stderr, "");
  const console = spawnSync("cat", [log], { encoding: "latin1" }).stdout;
  assert.match(console, /Linux version \d/);
  assert.match(console, /TSKVM-GUEST-READY nproc=1/);
  assert.match(console, /serial8250: ttyS3 at I\/O 0x2e8 \(irq = 3/, "the kernel found COM4");
  assert.doesNotMatch(console, /TSKVM-CTL/);
});

test("API: commands in one guest: statuses, stdout and stderr apart from the console and the control channel, a test disk, clean power-off", { timeout: TEST_MS }, async (t) => {
  if (!guestOrSkip(t)) return;
  if (findMkfsExt4() === undefined) return t.skip("mkfs.ext4 (e2fsprogs) is not installed");
  // A project's tests, carried in on an ext4 disk.
  const src = join(dir, "project");
  mkdirSync(src);
  writeFileSync(join(src, "check.sh"), "#!/bin/sh\necho \"checking in $(pwd)\"\necho 'a warning' >&2\nexit 4\n", { mode: 0o755 });
  const img = join(dir, "tests.img");
  await makeDiskImage(src, img);

  const started = Date.now();
  const vm = await startVm({ disks: [img], buildGuest: false });
  try {
    const { nproc } = await vm.ready({ timeoutMs: READY_MS });
    t.diagnostic(`guest agent ready after ${Date.now() - started} ms`);
    assert.equal(nproc, 1);
    await vm.waitForConsole("TSKVM-GUEST-READY nproc=1", { timeoutMs: 10_000 });

    const t1 = Date.now();
    const hi = await vm.run("echo hi");
    t.diagnostic(`echo hi in a booted guest: ${Date.now() - t1} ms`);
    assert.deepEqual([hi.status, hi.stdout, hi.stderr], [0, "hi\n", ""]);

    const tests = await vm.run("mount /dev/vda /mnt && cd /mnt && ./check.sh", { timeoutMs: 60_000 });
    assert.deepEqual([tests.status, tests.stdout, tests.stderr], [4, "checking in /mnt\n", "a warning\n"]);

    // Program output that looks like a control message is just output.
    const fake = await vm.run("echo 'TSKVM-CTL EXIT 1 9'; echo 'TSKVM-CTL READY nproc=9' >&2; exit 5");
    assert.deepEqual([fake.status, fake.stdout, fake.stderr], [5, "TSKVM-CTL EXIT 1 9\n", "TSKVM-CTL READY nproc=9\n"]);

    // A kernel message printed during a command goes to the console, not into the output.
    const mark = vm.consoleLength;
    const kmsg = await vm.run("echo out-before; echo '<3>tskvm-kernel-message' > /dev/kmsg; echo out-after");
    assert.equal(kmsg.stdout, "out-before\nout-after\n");
    await vm.waitForConsole("tskvm-kernel-message", { after: mark, timeoutMs: 10_000 });

    // Arguments with quotes, UTF-8 and newlines arrive unchanged; binary output comes back whole.
    const args = await vm.run(["printf", "[%s]", "it's", "ünï ✓", "a\nb", ""]);
    assert.equal(args.stdout, "[it's][ünï ✓][a\nb][]");
    const t2 = Date.now();
    const bulk = await vm.run("head -c 65536 /dev/urandom | od -An -v -tx1 | tr -d ' \\n' | head -c 65536", { timeoutMs: 120_000 });
    t.diagnostic(`64 KiB of output through COM3: ${Date.now() - t2} ms`);
    assert.equal(bulk.stdout.length, 65536);
    assert.match(bulk.stdout, /^[0-9a-f]+$/);
    // Signals: 128 + N, as a shell reports them.
    assert.equal((await vm.run("kill -TERM $$")).status, 143);

    // Write on the disk, power off through the agent: the file system is synced first.
    assert.equal((await vm.run("echo passed > /mnt/result")).status, 0);
    const t3 = Date.now();
    const exit = await vm.poweroff({ timeoutMs: 60_000 });
    t.diagnostic(`power-off: ${Date.now() - t3} ms`);
    assert.equal(exit.kind, "halted", exit.reason);
  } finally {
    await vm.stop();
  }
  const result = spawnSync("debugfs", ["-R", "cat /result", img], { encoding: "utf8" });
  assert.equal(result.stdout, "passed\n", result.stderr);
});

test("tskvm run: --timeout stops a command that hangs (exit 6); SIGTERM during a command exits 143 and frees the disk", { timeout: TEST_MS }, async (t) => {
  if (!guestOrSkip(t)) return;
  const img = join(dir, "scratch.img");
  writeFileSync(img, new Uint8Array(4 * 1024 * 1024));
  const vm = new RunningCli(["run", "-v", "--ready-timeout", String(READY_MS / 1000), "-d", img, "--", "echo started; sleep 600"]);
  try {
    await vm.waitFor(/started/, READY_MS);
    assert.notEqual(spawnSync("flock", ["-n", "-x", img, "true"]).status, 0, "the image is locked while the VM runs");
    vm.kill("SIGTERM");
    const exit = await vm.exited;
    assert.equal(exit.code, 143, vm.stderr);
    assert.match(vm.stderr, /tskvm: stopped by SIGTERM\n$/);
    assert.equal(spawnSync("flock", ["-n", "-x", img, "true"]).status, 0, "the lock is released");
  } finally {
    vm.kill();
  }
  // No tskvm of this test is left (vCPU threads die with the process; no child processes).
  assert.equal(spawnSync("pgrep", ["-f", `tskvm run .*${img}`]).status, 1);

  const started = Date.now();
  const r = run(["--timeout", "5", "--", "sleep 600"]);
  t.diagnostic(`--timeout 5 with a hanging command: ${Date.now() - started} ms in all`);
  assert.equal(r.status, 6, r.stderr);
  assert.equal(r.stderr, "tskvm: the command did not finish within 5 s (--timeout); the VM was stopped\n");
});
