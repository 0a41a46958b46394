/**
 * The CLI's lifecycle with tiny 64-bit "kernels" (ELF files made here, booted through the
 * 64-bit Linux entry): console output to a pipe, input from a pipe, guest reset, Ctrl-A x,
 * signals, and the terminal restored after raw mode.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { spawnSync } from "node:child_process";
import { writeTinyKernel } from "../helpers/images";
import { ECHO_UNTIL_Q, SPIN, longModeHello } from "../helpers/guest-code";
import { RunningCli, TSKVM_BIN, runCli } from "../helpers/cli";

const noKvm = existsSync("/dev/kvm") ? false : "no /dev/kvm on this host";
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

test("Ctrl-A x on stdin quits with status 0", { skip: noKvm, timeout: 60_000 }, async () => {
  const vm = new RunningCli(boot(spin));
  await new Promise((r) => setTimeout(r, 500));
  vm.send("\x01x");
  const exit = await vm.exited;
  assert.equal(exit.code, 0, vm.stderr);
  assert.match(vm.stderr, /stopped \(Ctrl-A x\)/);
});

for (const [signal, code] of [["SIGTERM", 143], ["SIGINT", 130]] as const) {
  test(`${signal} stops a spinning guest promptly with status ${code}`, { skip: noKvm, timeout: 60_000 }, async () => {
    const vm = new RunningCli(boot(spin));
    await new Promise((r) => setTimeout(r, 500));
    vm.kill(signal);
    const exit = await vm.exited;
    assert.equal(exit.code, code, vm.stderr);
    assert.match(vm.stderr, new RegExp(`stopped by ${signal}\\n$`));
  });
}

test("a terminal put in raw mode is restored when tskvm ends", { skip: noKvm || (existsSync("/usr/bin/script") ? false : "needs script(1)"), timeout: 60_000 }, () => {
  // script(1) gives tskvm a pseudo-terminal; stty -g shows its settings before and after.
  const before = join(dir, "stty-before");
  const after = join(dir, "stty-after");
  const during = join(dir, "stty-during");
  const inner =
    `stty -g < /dev/tty > ${before}; ` +
    `(sleep 1; stty -g < /dev/tty > ${during}; pkill -TERM -f "^${process.execPath} ${TSKVM_BIN} boot -k ${spin}") & ` +
    `${process.execPath} ${TSKVM_BIN} ${boot(spin).join(" ")}; ` +
    `stty -g < /dev/tty > ${after}`;
  const r = spawnSync("script", ["-qec", inner, "/dev/null"], { encoding: "utf8", timeout: 50_000 });
  assert.equal(r.status, 0, `${r.stdout}\n${r.stderr}`);
  assert.notEqual(readFileSync(during, "utf8"), readFileSync(before, "utf8"), "raw mode while running");
  assert.equal(readFileSync(after, "utf8"), readFileSync(before, "utf8"), "terminal settings restored");
});
