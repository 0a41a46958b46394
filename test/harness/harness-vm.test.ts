/**
 * The harness VM itself (scripts/harness-vm.ts): the command's exit status and its stdout
 * and stderr apart, the host's files read-only with writes kept in the VM, --rw shared
 * back, a /dev/kvm inside, --timeout (124), a signal (128+N) with no QEMU left behind,
 * and one-line refusals. Needs QEMU, not KVM: this tier always runs on the host itself.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { harnessAvailable } from "../../scripts/harness-vm";
import { waitUntil } from "../helpers/wait";

const HARNESS = resolve(__dirname, "..", "..", "scripts", "harness-vm.js");
const missing = harnessAvailable();
const skip = missing === undefined ? false : `the harness VM cannot start here: ${missing}`;
const dir = mkdtempSync(join(tmpdir(), "tskvm-harness-test-"));
process.on("exit", () => rmSync(dir, { recursive: true, force: true }));
/** VM start and stop take ~10 s here; everything inside is emulated. */
const VM_MS = 300_000;

const harness = (args: string[], env: NodeJS.ProcessEnv = {}) =>
  spawnSync(process.execPath, [HARNESS, ...args], { encoding: "utf8", env: { ...process.env, ...env }, timeout: VM_MS });

/** A QEMU whose command line shares this directory (-virtfs path=DIR) is still running. */
const qemuLeft = (shared: string) => spawnSync("pgrep", ["-f", `qemu-system-x86_64.*path=${shared},`]).status === 0;

test("one VM: the exit status, stdout and stderr apart, host files read-only, --rw written through, /dev/kvm inside, user namespaces for passt and virtiofsd", { skip, timeout: VM_MS }, () => {
  const shared = mkdtempSync(join(dir, "rw-"));
  const readOnly = join(dir, "host-file");
  writeFileSync(readOnly, "from the host\n");
  const script =
    `cat ${readOnly}; echo changed > ${readOnly} && cat ${readOnly}; ` +
    `echo to-stderr >&2; echo written > ${shared}/out; test -c /dev/kvm && echo kvm; ` +
    // passt and virtiofsd need user namespaces, which a chrooted process never gets.
    `unshare -U true && echo userns; ` +
    `echo "$HARNESS_TEST_VAR"; pwd; exit 7`;
  const r = harness(["-e", "HARNESS_TEST_VAR=passed in", "-w", shared, "-C", dir, "--", "sh", "-c", script]);
  assert.equal(r.status, 7, r.stderr);
  assert.equal(r.stdout, `from the host\nchanged\nkvm\nuserns\npassed in\n${dir}\n`);
  assert.equal(r.stderr, "to-stderr\n");
  assert.equal(readFileSync(readOnly, "utf8"), "from the host\n", "writes to the host's files stay in the VM");
  assert.equal(readFileSync(join(shared, "out"), "utf8"), "written\n", "--rw directories are written through");
});

test("--timeout stops the VM with 124 and the console's tail; SIGTERM stops it with 143; no QEMU is left", { skip, timeout: 2 * VM_MS }, async () => {
  const timedOut = mkdtempSync(join(dir, "timeout-"));
  const t = harness(["-t", "60", "-w", timedOut, "--", "sh", "-c", "echo started; sleep 600"]);
  assert.equal(t.status, 124, t.stderr);
  assert.equal(t.stdout, "started\n");
  assert.match(t.stderr, /^harness-vm: timed out after 60 s; the VM's console ended with:/);
  assert.equal(qemuLeft(timedOut), false);

  const signalled = mkdtempSync(join(dir, "sigterm-"));
  const child = spawn(process.execPath, [HARNESS, "-w", signalled, "--", "sh", "-c", "echo started; sleep 600"], { stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  let err = "";
  child.stdout.setEncoding("utf8").on("data", (d: string) => (out += d));
  child.stderr.setEncoding("utf8").on("data", (d: string) => (err += d));
  const exited = new Promise<number | null>((r) => child.on("exit", (code) => r(code)));
  await waitUntil(() => out.includes("started"), VM_MS / 2, "the command to start in the VM");
  child.kill("SIGTERM");
  assert.equal(await exited, 143, err);
  assert.match(err, /harness-vm: stopped by SIGTERM\n$/);
  assert.equal(qemuLeft(signalled), false, "QEMU is stopped with the harness");
});

test("refusals: one line each, exit 125", () => {
  const one = (r: ReturnType<typeof harness>, pattern: RegExp) => {
    assert.equal(r.status, 125, r.stderr);
    assert.equal(r.stderr.trimEnd().split("\n").length, 1, r.stderr);
    assert.match(r.stderr, pattern);
  };
  one(harness([]), /^harness-vm: no command given/);
  one(harness(["--bogus", "--", "true"]), /^harness-vm: unknown option --bogus/);
  one(harness(["-w", join(dir, "nowhere"), "--", "true"]), /^harness-vm: --rw .*nowhere: no such directory/);
  one(harness(["--", "true"], { TSKVM_QEMU: join(dir, "no-qemu") }), /^harness-vm: TSKVM_QEMU=.*no-qemu: no such file/);
  assert.equal(existsSync(join(dir, "no-qemu")), false);
});
