/**
 * The guest agent's control channel and the exit-status path, with a tiny 64-bit "kernel"
 * that plays the guest agent (below): the API's ready(), run(), poweroff() and timeouts, and
 * `tskvm run`'s exit statuses, output streams, console log and signals. No Linux needed.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { spawn, spawnSync } from "node:child_process";
import { writeTinyKernel } from "../helpers/images";
import { SPIN } from "../helpers/guest-code";
import { RunningCli, TSKVM_BIN, runCli } from "../helpers/cli";
import { startVm, VmTimeoutError, VmExitedError, GuestAgentError, VmError, type Vm } from "../../src/api";
import { ExitCode } from "../../src/cli/exit-codes";
import { ChannelDemux, commandLine, shellAnsiQuote } from "../../src/api/protocol";
import { sharedIrqLine, taggedFdSink, AUX_SERIAL_PORTS } from "../../src/board/devices";
import { SharedState } from "../../src/devices/shared-state";
import * as sys from "../../src/sys/libc";
import { kvmSkip, scaled } from "../helpers/tiers";
import { waitUntil } from "../helpers/wait";

const noKvm = kvmSkip();
const dir = mkdtempSync(join(tmpdir(), "tskvm-ctl-"));
process.on("exit", () => rmSync(dir, { recursive: true, force: true }));

/**
 * A guest agent in 333 bytes of 64-bit code, loaded at 0x1000000 and entered through the
 * 64-bit boot protocol (paging on, stack set). What it does:
 *
 *   puts "tiny agent on the console\n" on COM1, "TSKVM-CTL READY nproc=1\n" on COM2; then
 *   for each line read from COM2 (polling LSR bit 0):
 *     "POWEROFF"           cli; hlt (the VM ends "halted")
 *     "RUN <id> $'<cmd>'"  "TSKVM-CTL START <id>" on COM2, then by cmd's first letter:
 *        h...  jmp $ (never answers: command timeouts)
 *        q...  out 0x64, 0xfe (i8042 reset: the guest ends mid-command)
 *        else  the quoted command line as received to COM3 (stdout), "err\n" to COM4
 *              (stderr), "TSKVM-CTL EXIT <id> <s>" on COM2, s = cmd's last character if
 *              it is a digit, else 0
 *
 * Source (GNU as 2.40, `as --64`, then objcopy -O binary -j .text):
 *
 *   .intel_syntax noprefix
 *   .code64
 *   .set BUF, 0x1100000
 *   .set ID,  0x10ff000
 *   start:
 *       lea rsi, [rip + console_msg]
 *       mov dx, 0x3f8
 *       call puts
 *       lea rsi, [rip + ready_msg]
 *       mov dx, 0x2f8
 *       call puts
 *   next:
 *       mov edi, BUF
 *   readc:
 *       mov dx, 0x2fd
 *   wait:
 *       in al, dx
 *       test al, 1
 *       jz wait
 *       mov dx, 0x2f8
 *       in al, dx
 *       stosb
 *       cmp al, 10
 *       jne readc
 *       mov esi, BUF
 *       cmp byte ptr [rsi], 'P'
 *       je poweroff
 *       add rsi, 4
 *       mov ebx, ID
 *   idcopy:
 *       lodsb
 *       cmp al, ' '
 *       je idend
 *       mov [rbx], al
 *       inc rbx
 *       jmp idcopy
 *   idend:
 *       mov byte ptr [rbx], 0
 *       mov r12, rsi
 *       lea rsi, [rip + start_msg]
 *       mov dx, 0x2f8
 *       call puts
 *       mov esi, ID
 *       call puts
 *       mov al, 10
 *       out dx, al
 *       mov al, [r12 + 2]
 *       cmp al, 'h'
 *       je hang
 *       cmp al, 'q'
 *       je reset
 *       mov rsi, r12
 *       mov dx, 0x3e8
 *   outc:
 *       lodsb
 *       out dx, al
 *       cmp al, 10
 *       jne outc
 *       lea rsi, [rip + err_msg]
 *       mov dx, 0x2e8
 *       call puts
 *       mov bl, [rdi - 3]
 *       sub bl, '0'
 *       cmp bl, 9
 *       jbe have_status
 *       xor ebx, ebx
 *   have_status:
 *       lea rsi, [rip + exit_msg]
 *       mov dx, 0x2f8
 *       call puts
 *       mov esi, ID
 *       call puts
 *       mov al, ' '
 *       out dx, al
 *       mov al, bl
 *       add al, '0'
 *       out dx, al
 *       mov al, 10
 *       out dx, al
 *       jmp next
 *   hang:
 *       jmp hang
 *   reset:
 *       mov al, 0xfe
 *       out 0x64, al
 *       hlt
 *   poweroff:
 *       cli
 *       hlt
 *       jmp poweroff
 *   puts:
 *       lodsb
 *       test al, al
 *       jz puts_done
 *       out dx, al
 *       jmp puts
 *   puts_done:
 *       ret
 *   console_msg: .asciz "tiny agent on the console\n"    (and so on: the strings below)
 */
const AGENT = Buffer.from(
  "488d35ec00000066baf803e8da000000488d35f700000066baf802e8ca000000bf0000100166bafd02eca80174fb66baf802ecaa3c0a75edbe00001001" +
    "803e500f84a00000004883c604bb00f00f01ac3c207407880348ffc3ebf4c603004989f4488d35bf00000066baf802e879000000be00f00f01e86f000000" +
    "b00aee418a4424023c6874583c7174564c89e666bae803acee3c0a75fa488d35a900000066bae802e8420000008a5ffd80eb3080fb09760231db488d357c" +
    "00000066baf802e825000000be00f00f01e81b000000b020ee88d80430eeb00aeee941ffffffebfeb0fee664f4faf4ebfcac84c07403eeebf8c3" +
    Buffer.from("tiny agent on the console\n\0TSKVM-CTL READY nproc=1\n\0TSKVM-CTL START \0TSKVM-CTL EXIT \0err\n\0", "latin1").toString("hex"),
  "hex",
);
const kernel = (name: string, code: Uint8Array) => writeTinyKernel(dir, name, code);
const agentKernel = kernel("agent.elf", AGENT);
const spinKernel = kernel("spin.elf", SPIN);

test("COM1..COM4 share IRQ 4 and IRQ 3 as a wired OR: KVM sees a change only when the OR changes", () => {
  assert.deepEqual(AUX_SERIAL_PORTS.map((p) => [p.base, p.irq]), [[0x2f8, 3], [0x3e8, 4], [0x2e8, 3]]);
  const lines = SharedState.create(16);
  const calls: [number, boolean][] = [];
  const record = (_fd: number, irq: number, level: boolean) => void calls.push([irq, level]);
  const com1 = sharedIrqLine(-1, lines, 4, 0, record);
  const com3 = sharedIrqLine(-1, lines, 4, 2, record);
  const com2 = sharedIrqLine(-1, lines, 3, 1, record);
  com1.set(true);
  com3.set(true); // the line is already high: no edge
  com1.set(false); // com3 still holds it high
  com1.set(false);
  com2.set(true);
  com3.set(false);
  assert.deepEqual(calls, [[4, true], [3, true], [4, false]]);
});

test("tagged sinks: [tag, byte] pairs on one pipe come apart again in order", () => {
  const [r, w] = sys.pipe2();
  try {
    taggedFdSink(w, 2).write(Buffer.from("out"));
    taggedFdSink(w, 1).write(Buffer.from("T"));
    taggedFdSink(w, 2).write(Uint8Array.of(0x21));
    const buf = new Uint8Array(64);
    const n = sys.read(r, buf);
    const got: string[] = [];
    new ChannelDemux((tag, bytes) => got.push(`${tag}:${bytes.toString()}`)).push(buf.subarray(0, n));
    assert.deepEqual(got, ["2:out", "1:T", "2:!"]);
    assert.throws(() => taggedFdSink(w, 256), RangeError);
  } finally {
    sys.close(r);
    sys.close(w);
  }
});

async function withVm(k: string, fn: (vm: Vm) => Promise<void>): Promise<void> {
  const vm = await startVm({ kernel: k, initrd: null, memory: "32M" });
  try {
    await fn(vm);
  } finally {
    await vm.stop("test ended");
  }
}

test("API: ready, exit status, stdout and stderr on their own channels, console apart; poweroff ends the VM", { skip: noKvm, timeout: scaled(60_000) }, async () => {
  const vm = await startVm({ kernel: agentKernel, initrd: null, memory: "32M" });
  try {
    await agentSession(vm);
  } finally {
    await vm.stop("test ended");
  }
});

async function agentSession(vm: Vm): Promise<void> {
  assert.match(vm.info.cmdline, /tskvm\.agent=1/);
  const events: string[] = [];
  vm.on("stdout", (b: Buffer) => events.push(`out:${b.toString()}`));
  vm.on("stderr", (b: Buffer) => events.push(`err:${b.toString()}`));
  assert.deepEqual(await vm.ready({ timeoutMs: scaled(30_000) }), { nproc: 1, unmounted: [] });
  await vm.waitForConsole("tiny agent on the console", { timeoutMs: 10_000 });

  const streamed: Buffer[] = [];
  const r = await vm.run("exit 3", { timeoutMs: 10_000, onStdout: (c) => streamed.push(c) });
  assert.equal(r.status, 3);
  assert.equal(r.stdout, "$'exit 3'\n", "the agent got the command as a $'...' string");
  assert.equal(r.stderr, "err\n");
  assert.equal(Buffer.concat(streamed).toString(), r.stdout);
  // One command after another, each with its own id and status.
  assert.equal((await vm.run("exit 5")).status, 5);
  assert.equal((await vm.run(["echo", "it's"])).stdout, `${shellAnsiQuote(commandLine(["echo", "it's"]))}\n`);
  assert.equal((await vm.run("no digit")).status, 0);
  // Commands asked for at once run one after the other, each with its own status.
  const both = await Promise.all([vm.run("exit 1"), vm.run("exit 2"), vm.run("exit 6")]);
  assert.deepEqual(both.map((x) => x.status), [1, 2, 6]);
  // Control messages never show up as output, nor output on the console.
  assert.ok(events.every((e) => !e.includes("TSKVM-CTL")), events.join("|"));
  assert.doesNotMatch(vm.consoleText(), /TSKVM-CTL|err|exit 3/);
  assert.equal(vm.consoleText(), "tiny agent on the console\n");

  const exit = await vm.poweroff({ timeoutMs: 20_000 });
  assert.equal(exit.kind, "halted", exit.reason);
  assert.deepEqual(await vm.exited, exit);
  await assert.rejects(vm.run("exit 1"), VmExitedError);
}

test("API: a command that does not finish in time rejects with VmTimeoutError and the VM is stopped", { skip: noKvm, timeout: scaled(60_000) }, async () => {
  await withVm(agentKernel, async (vm) => {
    await vm.ready({ timeoutMs: scaled(30_000) });
    const started = Date.now();
    const err = await vm.run("hang", { timeoutMs: 1500 }).then(() => undefined, (e: unknown) => e);
    assert.ok(err instanceof VmTimeoutError, String(err));
    assert.equal(err.waitingFor, "command");
    assert.ok(Date.now() - started < 10_000);
    const exit = await vm.exited;
    assert.equal(exit.kind, "stopped");
    assert.match(exit.requestedBy ?? "", /timed out/);
  });
});

test("API: the guest ending during a command rejects with VmExitedError carrying how it ended", { skip: noKvm, timeout: scaled(60_000) }, async () => {
  await withVm(agentKernel, async (vm) => {
    await vm.ready({ timeoutMs: scaled(30_000) });
    const err = await vm.run("quit").then(() => undefined, (e: unknown) => e);
    assert.ok(err instanceof VmExitedError, String(err));
    assert.equal(err.waitingFor, "command");
    assert.equal(err.exit.kind, "reset");
  });
});

test("API: a guest that never reports ready: ready() and waitForConsole() time out; stop() ends it", { skip: noKvm, timeout: scaled(60_000) }, async () => {
  const vm = await startVm({ kernel: spinKernel, initrd: null, memory: "32M" });
  const e1 = await vm.ready({ timeoutMs: 1000 }).then(() => undefined, (e: unknown) => e);
  assert.ok(e1 instanceof VmTimeoutError && e1.waitingFor === "ready", String(e1));
  const e2 = await vm.waitForConsole(/never/, { timeoutMs: 300 }).then(() => undefined, (e: unknown) => e);
  assert.ok(e2 instanceof VmTimeoutError && e2.waitingFor === "console", String(e2));
  const waiting = vm.ready();
  const exit = await vm.stop("enough");
  assert.equal(exit.kind, "stopped");
  assert.equal(exit.requestedBy, "enough");
  await assert.rejects(waiting, VmExitedError);
});

test("API: without the agent, run() and ready() refuse; a console on a file descriptor is not captured", { skip: noKvm, timeout: scaled(60_000) }, async () => {
  const log = join(dir, "direct-console");
  const { openSync, closeSync } = await import("node:fs");
  const fd = openSync(log, "w");
  const vm = await startVm({ kernel: agentKernel, initrd: null, memory: "32M", agent: false, console: { fd } });
  try {
    assert.doesNotMatch(vm.info.cmdline, /tskvm\.agent/);
    await assert.rejects(vm.run("exit 1"), GuestAgentError);
    assert.throws(() => vm.ready(), GuestAgentError);
    assert.throws(() => vm.consoleText(), VmError);
    // The guest's console bytes go straight to the file from the vCPU thread: wait for the
    // whole line (the guest writes it byte by byte).
    await waitUntil(() => readFileSync(log, "latin1").endsWith("\n"), scaled(30_000), "the guest's console line in the file");
    const exit = await vm.poweroff();
    assert.equal(exit.kind, "stopped", "no agent: poweroff stops the VM");
  } finally {
    await vm.stop();
    closeSync(fd);
  }
  assert.equal(readFileSync(log, "latin1"), "tiny agent on the console\n");
});

// ---- tskvm run ----

const run = (args: string[], timeoutMs = 60_000) => runCli(["run", "-m", "32M", ...args], { timeoutMs });

test("tskvm run: exits with the command's status; stdout and stderr are the command's alone", { skip: noKvm, timeout: scaled(60_000) }, () => {
  const r = run(["-k", agentKernel, "--no-initrd", "--", "exit 3"]);
  assert.equal(r.status, 3, r.stderr);
  assert.equal(r.stdout, "$'exit 3'\n");
  assert.equal(r.stderr, "err\n");
  const ok = run(["-k", agentKernel, "--no-initrd", "--", "true"]);
  assert.equal(ok.status, 0, ok.stderr);
  // Several arguments are a program and its arguments, quoted for the guest's shell.
  const argv = run(["-k", agentKernel, "--no-initrd", "--", "sh", "-c", "exit 3"]);
  assert.equal(argv.stdout, "$'sh -c \\'exit 3\\''\n");
});

test("tskvm run: the console goes to --console-log, not to stdout; -v reports the steps", { skip: noKvm, timeout: scaled(60_000) }, () => {
  const log = join(dir, "console.log");
  const r = run(["-v", "-k", agentKernel, "--no-initrd", "--console-log", log, "--", "exit 4"]);
  assert.equal(r.status, 4, r.stderr);
  assert.equal(readFileSync(log, "latin1"), "tiny agent on the console\n");
  assert.doesNotMatch(r.stdout, /tiny agent/);
  assert.match(r.stderr, /tskvm: booting .*agent\.elf/);
  assert.match(r.stderr, /tskvm: guest ready after [\d.]+ s \(1 CPU\)/);
  assert.match(r.stderr, /tskvm: the command exited with status 4/);
  assert.match(r.stderr, /tskvm: guest halted/);
  const bad = run(["-k", agentKernel, "--no-initrd", "--console-log", join(dir, "no", "such", "dir"), "--", "true"]);
  assert.equal(bad.status, ExitCode.BAD_INPUT);
  assert.match(bad.stderr, /^tskvm: console log .* cannot be written/);
});

test("tskvm run: a command past --timeout stops the VM and exits 6", { skip: noKvm, timeout: scaled(60_000) }, () => {
  const started = Date.now();
  const r = run(["-k", agentKernel, "--no-initrd", "--timeout", "1.5", "--", "hang"]);
  assert.equal(r.status, ExitCode.COMMAND_TIMEOUT, r.stderr);
  assert.equal(r.stderr, "tskvm: the command did not finish within 1.5 s (--timeout); the VM was stopped\n");
  assert.ok(Date.now() - started < 30_000);
});

test("tskvm run: the guest ending before the command reports exits 7", { skip: noKvm, timeout: scaled(60_000) }, () => {
  const r = run(["-k", agentKernel, "--no-initrd", "--", "quit"]);
  assert.equal(r.status, ExitCode.GUEST_ENDED, r.stderr);
  assert.match(r.stderr, /^tskvm: the guest ended before the command did: i8042 reset/);
});

test("tskvm run: a guest that is not ready within --ready-timeout exits 5, with the console's tail", { skip: noKvm, timeout: scaled(60_000) }, () => {
  const r = run(["-k", spinKernel, "--no-initrd", "--ready-timeout", "1", "--", "true"]);
  assert.equal(r.status, ExitCode.NOT_READY, r.stderr);
  assert.match(r.stderr, /^tskvm: the guest did not become ready within 1 s \(--ready-timeout\) \(does your initrd's \/init run tskvm's guest agent/);
  assert.match(r.stderr, /the guest printed nothing on its console/);
  // A guest that resets before it is ready.
  const reset = run(["-k", kernel("reset.elf", Uint8Array.from([0xb0, 0xfe, 0xe6, 0x64, 0xf4])), "--no-initrd", "--", "true"]);
  assert.equal(reset.status, ExitCode.NOT_READY, reset.stderr);
  assert.match(reset.stderr, /^tskvm: the guest ended before it became ready: i8042 reset/);
});

test("tskvm run: SIGTERM stops the VM, exits 143 and leaves no lock on its disk", { skip: noKvm, timeout: scaled(60_000) }, async () => {
  const img = join(dir, "disk.img");
  writeFileSync(img, new Uint8Array(1024 * 1024));
  const vm = new RunningCli(["run", "-m", "32M", "-v", "-k", agentKernel, "--no-initrd", "-d", img, "--", "hang"]);
  // stderr says when the guest is ready; the command then hangs.
  await vm.waitForStderr(/guest ready/, scaled(30_000));
  // While it runs, the image is locked.
  assert.notEqual(spawnSync("flock", ["-n", "-x", img, "true"]).status, 0, "image locked while the VM runs");
  vm.kill("SIGTERM");
  const exit = await vm.exited;
  assert.equal(exit.code, 143, vm.stderr);
  assert.match(vm.stderr, /tskvm: stopped by SIGTERM\n$/);
  assert.equal(spawnSync("flock", ["-n", "-x", img, "true"]).status, 0, "lock released");
});

test("tskvm run: a parent that dies takes the VM with it (its parent-death signal is SIGTERM)", { skip: noKvm, timeout: scaled(60_000) }, async () => {
  const img = join(dir, "orphan.img");
  writeFileSync(img, new Uint8Array(1024 * 1024));
  const locked = () => spawnSync("flock", ["-n", "-x", img, "true"]).status !== 0;
  // sh starts tskvm, says its pid and waits for it; killing sh with SIGKILL orphans tskvm.
  const errFile = join(dir, "orphan.err");
  const script = `"${process.execPath}" "${TSKVM_BIN}" run -v -m 32M -k "${agentKernel}" --no-initrd -d "${img}" -- hang >/dev/null 2>"${errFile}" & echo $!; wait`;
  const sh = spawn("sh", ["-c", script], { stdio: ["ignore", "pipe", "ignore"] });
  const pid = await new Promise<number>((resolve) => sh.stdout!.once("data", (d: Buffer) => resolve(Number(d.toString().trim()))));
  const alive = () => {
    try {
      process.kill(pid, 0);
      return true;
    } catch {
      return false;
    }
  };
  try {
    const stderr = () => (existsSync(errFile) ? readFileSync(errFile, "utf8") : "");
    // Its -v line says the machine (and the disk's lock) is there; probing the lock before
    // that could take it just when tskvm tries to.
    await waitUntil(() => /tskvm: booting /.test(stderr()) || !alive(), scaled(30_000), "tskvm to start");
    assert.ok(alive(), `tskvm ended before its parent did: ${stderr()}`);
    assert.ok(locked(), "tskvm holds its disk's lock");
    sh.kill("SIGKILL");
    await waitUntil(() => !alive(), scaled(20_000), "tskvm to end after its parent died");
    assert.equal(locked(), false, "the disk is released");
  } finally {
    sh.kill("SIGKILL");
    if (alive()) process.kill(pid, "SIGKILL");
  }
});

test("tskvm run: bad options and a missing kernel fail before anything runs", { skip: noKvm, timeout: scaled(60_000) }, () => {
  const r = run(["-k", join(dir, "missing"), "--", "true"]);
  assert.equal(r.status, ExitCode.BAD_INPUT);
  assert.equal(r.stderr, `tskvm: kernel image '${join(dir, "missing")}' does not exist\n`);
  const cpus = run(["-k", agentKernel, "--no-initrd", "-c", "5000", "--", "true"]);
  assert.equal(cpus.status, ExitCode.USAGE);
  assert.match(cpus.stderr, /^tskvm: cannot give the guest 5000 vCPUs/);
});
