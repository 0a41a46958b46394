/**
 * The CLI's lifecycle with tiny 64-bit "kernels" (ELF files made here, booted through the
 * 64-bit Linux entry): console output to a pipe, input from a pipe, guest reset, Ctrl-A x,
 * signals, and the terminal restored after raw mode.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { spawnSync } from "node:child_process";
import { writeTinyKernel } from "../helpers/images";
import { ECHO_UNTIL_Q, SPIN, longModeHello } from "../helpers/guest-code";
import { RunningCli, TSKVM_BIN, runCli } from "../helpers/cli";
import { kvmSkip, scaled } from "../helpers/tiers";

const noKvm = kvmSkip();
const dir = mkdtempSync(join(tmpdir(), "tskvm-life-"));
process.on("exit", () => rmSync(dir, { recursive: true, force: true }));
const kernel = (name: string, code: Uint8Array) => writeTinyKernel(dir, name, code);
const hello = kernel("hello.elf", longModeHello("hello from a tiny kernel\n"));
const spin = kernel("spin.elf", SPIN);
const echo = kernel("echo.elf", ECHO_UNTIL_Q);
const boot = (k: string) => ["boot", "-k", k, "-m", "32M"];

test("guest output reaches a piped stdout; an i8042 reset ends tskvm with status 0 and one line", { skip: noKvm }, () => {
  const r = runCli(boot(hello));
  assert.equal(r.status, 0, r.stderr);
  assert.equal(r.stdout, "hello from a tiny kernel\n");
  assert.match(r.stderr, /^tskvm: booting .*\ntskvm: i8042 reset \(guest reboot\)\n$/);
});

test("input from a pipe reaches the guest's UART and comes back", { skip: noKvm }, () => {
  const r = runCli(boot(echo), { input: "echo me q" });
  assert.equal(r.status, 0, r.stderr);
  assert.equal(r.stdout, "echo me ");
});

test("Ctrl-A x on stdin quits with status 0", { skip: noKvm, timeout: scaled(60_000) }, async () => {
  const vm = new RunningCli(boot(spin));
  // The banner comes once the vCPUs run, right before the console is attached.
  await vm.waitForStderr(/tskvm: booting /, scaled(30_000));
  vm.send("\x01x");
  const exit = await vm.exited;
  assert.equal(exit.code, 0, vm.stderr);
  assert.match(vm.stderr, /stopped \(Ctrl-A x\)/);
});

for (const [signal, code] of [["SIGTERM", 143], ["SIGINT", 130]] as const) {
  test(`${signal} stops a spinning guest promptly with status ${code}`, { skip: noKvm, timeout: scaled(60_000) }, async () => {
    const vm = new RunningCli(boot(spin));
    await vm.waitForStderr(/tskvm: booting /, scaled(30_000));
    vm.kill(signal);
    const exit = await vm.exited;
    assert.equal(exit.code, code, vm.stderr);
    assert.match(vm.stderr, new RegExp(`stopped by ${signal}\\n$`));
  });
}

test("a signal at any point of start-up ends tskvm with 128+N and leaves nothing behind", { skip: noKvm, timeout: scaled(300_000) }, async (t) => {
  // Signals at points spread over start-up (argument parsing, module loading, opening KVM,
  // locking the disk, starting the vCPUs): wherever one lands, tskvm ends with 128+N, or,
  // before Node has run any of tskvm's code, is ended by the signal itself (a shell shows
  // 128+N either way, and nothing exists yet). Nothing is left: no process, no disk lock.
  const img = join(dir, "startup.img");
  writeFileSync(img, new Uint8Array(1024 * 1024));
  const probe = new RunningCli([...boot(spin), "-d", img]);
  const bootMs = await probe.waitForStderr(/tskvm: booting /, scaled(30_000));
  probe.kill("SIGKILL");
  await probe.exited;
  t.diagnostic(`start-up to the banner: ${bootMs} ms`);
  const delays = [0, 0.02, 0.1, 0.25, 0.5, 0.75, 1].map((f) => Math.round(f * bootMs));
  for (const [i, delay] of delays.entries()) {
    const [signal, code] = i % 2 === 0 ? (["SIGTERM", 143] as const) : (["SIGINT", 130] as const);
    const vm = new RunningCli([...boot(spin), "-d", img]);
    if (delay > 0) await new Promise((r) => setTimeout(r, delay));
    vm.kill(signal);
    const exit = await vm.exited;
    const where = `${signal} after ${delay} ms; stderr: ${JSON.stringify(vm.stderr)}`;
    if (exit.code === null) {
      assert.equal(exit.signal, signal, where);
      assert.equal(vm.stderr, "", `only a process that had not started tskvm's code may die of the signal: ${where}`);
    } else {
      assert.equal(exit.code, code, where);
      assert.match(vm.stderr, new RegExp(`stopped by ${signal}\\n$`), where);
    }
    assert.equal(spawnSync("flock", ["-n", "-x", img, "true"]).status, 0, `the disk lock is released: ${where}`);
    assert.notEqual(spawnSync("pgrep", ["-f", `tskvm boot -k ${spin}`]).status, 0, `no tskvm is left: ${where}`);
  }
});

test("a terminal put in raw mode is restored when tskvm ends", { skip: noKvm || (existsSync("/usr/bin/script") ? false : "needs script(1)"), timeout: scaled(60_000) }, () => {
  // script(1) gives tskvm a pseudo-terminal; stty -g shows its settings before and after.
  // The helper waits (with a deadline) until the terminal's settings change, which is the
  // sign that tskvm has put it in raw mode, then stops tskvm.
  const before = join(dir, "stty-before");
  const after = join(dir, "stty-after");
  const during = join(dir, "stty-during");
  const polls = Math.ceil(scaled(30_000) / 100);
  const inner =
    `stty -g < /dev/tty > ${before}; ` +
    `(i=0; while [ $i -lt ${polls} ] && [ "$(stty -g < /dev/tty)" = "$(cat ${before})" ]; do sleep 0.1; i=$((i+1)); done; ` +
    `stty -g < /dev/tty > ${during}; pkill -TERM -f "^${process.execPath} ${TSKVM_BIN} boot -k ${spin}") & ` +
    `${process.execPath} ${TSKVM_BIN} ${boot(spin).join(" ")}; ` +
    `stty -g < /dev/tty > ${after}`;
  const r = spawnSync("script", ["-qec", inner, "/dev/null"], { encoding: "utf8", timeout: scaled(50_000) });
  assert.equal(r.status, 0, `${r.stdout}\n${r.stderr}`);
  assert.notEqual(readFileSync(during, "utf8"), readFileSync(before, "utf8"), "raw mode while running");
  assert.equal(readFileSync(after, "utf8"), readFileSync(before, "utf8"), "terminal settings restored");
});
