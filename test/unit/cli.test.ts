/**
 * The CLI as a user meets it: every bad input gets one clear line on stderr, a distinct
 * non-zero exit status, no stack trace, and nothing left behind.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { chmodSync, mkdirSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { spawnSync } from "node:child_process";
import { runCli, expectOneLine, scratchDir } from "../helpers/cli";
import { makeBzImage } from "../helpers/images";
import { parseBootArgs, UsageError } from "../../src/cli/args";
import { parseSize, SizeError } from "../../src/api/option-values";
import { EscapeParser } from "../../src/cli/console";
import { vmOptionsFrom } from "../../src/cli/run";
import { ExitCode } from "../../src/cli/exit-codes";

const { dir, file } = scratchDir("tskvm-cli-");
const goodKernel = file("bzImage", makeBzImage({ codeBytes: 64 * 1024 }));


test("parseSize: units, bare numbers are MiB, bad syntax", () => {
  assert.equal(parseSize("512M"), 512 * 1024 * 1024);
  assert.equal(parseSize("2G"), 2 * 1024 ** 3);
  assert.equal(parseSize("2GiB"), 2 * 1024 ** 3);
  assert.equal(parseSize("65536K"), 64 * 1024 ** 2);
  assert.equal(parseSize("1536"), 1536 * 1024 ** 2, "a bare number is MiB, not gokvm's GiB");
  assert.equal(parseSize("1.5G"), 1.5 * 1024 ** 3);
  for (const bad of ["", "abc", "12X", "-1G", "0", "1.0001K"]) assert.throws(() => parseSize(bad), SizeError, bad);
});

test("parseBootArgs: short and long flags, defaults, repeatable disks", () => {
  const o = parseBootArgs(["-k", "bz", "-i", "rd", "-p", "console=ttyS0", "-m", "1G", "-c", "2", "-d", "a.img", "--disk", "b.img"]);
  assert.equal(o.kernel, "bz");
  assert.equal(o.initrd, "rd");
  assert.equal(o.params, "console=ttyS0");
  assert.equal(o.memoryBytes, 1024 ** 3);
  assert.equal(o.cpus, 2);
  assert.deepEqual(o.disks, ["a.img", "b.img"]);
  const d = parseBootArgs(["--kernel=bz"]);
  assert.equal(d.memoryBytes, undefined, "no -m: the API's default");
  assert.equal(d.cpus, 1);
  for (const bad of [["-c", "0"], ["-c", "two"], ["-c", "1.5"], ["-m", "lots"], ["--bogus"], ["-k"], ["--entry", "bios"], ["stray"]]) {
    assert.throws(() => parseBootArgs(bad), UsageError, bad.join(" "));
  }
});

test("Ctrl-A escapes: x quits, Ctrl-A Ctrl-A sends one Ctrl-A, split across reads", () => {
  const p = new EscapeParser();
  assert.deepEqual(p.feed(Buffer.from("ab\x01")), { forward: Uint8Array.from([0x61, 0x62]), actions: [] });
  assert.deepEqual(p.feed(Buffer.from("\x01c")), { forward: Uint8Array.from([1, 0x63]), actions: [] });
  assert.deepEqual(p.feed(Buffer.from("\x01h\x01x")).actions, ["help", "quit"]);
});

test("tskvm --version, --help, unknown command", () => {
  const v = runCli(["--version"]);
  assert.equal(v.status, 0);
  assert.match(v.stdout, /^tskvm \d+\.\d+\.\d+/);
  assert.equal(runCli(["--help"]).status, 0);
  assert.equal(runCli(["boot", "--help"]).status, 0);
  expectOneLine(runCli(["frobnicate"]), ExitCode.USAGE, /unknown command 'frobnicate'/);
});

test("bad boot flags: one line each, exit 2", () => {
  expectOneLine(runCli(["boot", "-k", goodKernel, "-m", "12X"]), ExitCode.USAGE, /bad memory size '12X'.*512M/);
  expectOneLine(runCli(["boot", "-k", goodKernel, "-c", "0"]), ExitCode.USAGE, /at least 1/);
  expectOneLine(runCli(["boot", "-k", goodKernel, "-c", "many"]), ExitCode.USAGE, /bad vCPU count 'many'/);
  expectOneLine(runCli(["boot", "-k", goodKernel, "--frob"]), ExitCode.USAGE, /frob/);
  expectOneLine(runCli(["boot", "-k", goodKernel, "-m", "100T"]), ExitCode.USAGE, /more than this host's .* of RAM/);
  expectOneLine(runCli(["boot", "-k", goodKernel, "--guest-ip", "10.0.0.2"]), ExitCode.USAGE, /--guest-ip needs a network interface/);
  expectOneLine(runCli(["boot", "-k", goodKernel, "-t", "t0", "--tap-ip", "1.2.3/24"]), ExitCode.USAGE, /bad --tap-ip/);
  expectOneLine(runCli(["boot", "-k", goodKernel, "-t", "t0", "--guest-ip", "300.1.1.1"]), ExitCode.USAGE, /bad --guest-ip/);
});

test("bad kernel and initrd files: one line each, exit 3", () => {
  expectOneLine(runCli(["boot", "-k", join(dir, "missing")]), ExitCode.BAD_INPUT, /kernel image '.*missing' does not exist/);
  expectOneLine(runCli(["boot", "-k", dir]), ExitCode.BAD_INPUT, /is a directory/);
  expectOneLine(runCli(["boot", "-k", file("empty", "")]), ExitCode.BAD_INPUT, /is empty/);
  expectOneLine(runCli(["boot", "-k", goodKernel, "-i", join(dir, "nord")]), ExitCode.BAD_INPUT, /initrd '.*nord' does not exist/);
  // Unreadable: root reads anything, so drop to nobody for this one.
  const locked = file("locked", makeBzImage());
  chmodSync(locked, 0o000);
  if (process.getuid?.() === 0) {
    const r = spawnSync("setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", process.execPath, join(__dirname, "..", "..", "..", "bin", "tskvm"), "boot", "-k", locked], { encoding: "utf8" });
    expectOneLine({ status: r.status, stdout: r.stdout, stderr: r.stderr }, ExitCode.BAD_INPUT, /cannot be read \(permission denied\)/);
  } else {
    expectOneLine(runCli(["boot", "-k", locked]), ExitCode.BAD_INPUT, /cannot be read \(permission denied\)/);
  }
});






test("no /dev/kvm: one line, exit 4", () => {
  expectOneLine(runCli(["boot", "-k", goodKernel], { env: { TSKVM_KVM_DEVICE: join(dir, "no-kvm") } }), ExitCode.HOST, /does not exist: this host has no KVM/);
  expectOneLine(runCli(["probe"], { env: { TSKVM_KVM_DEVICE: join(dir, "no-kvm") } }), ExitCode.HOST, /does not exist/);
});

test("a failed start leaves no files behind in the working directory", () => {
  const cwd = join(dir, "cwd");
  mkdirSync(cwd);
  spawnSync(process.execPath, [join(__dirname, "..", "..", "..", "bin", "tskvm"), "boot", "-k", "nothing-here"], { cwd });
  assert.deepEqual(readdirSync(cwd), []);
});

test("--no-rng and -D/--kvm-device: parsed, passed to the API, and -D is the device tskvm opens", () => {
  const d = parseBootArgs([]);
  assert.equal(d.rng, true, "virtio-rng by default");
  assert.equal(d.kvmDevice, undefined);
  assert.equal(vmOptionsFrom(d).rng, undefined, "the API's default (on)");
  assert.equal(vmOptionsFrom(d).kvmPath, undefined);
  const o = parseBootArgs(["--no-rng", "-D", "/dev/other-kvm"]);
  assert.equal(o.rng, false);
  assert.equal(o.kvmDevice, "/dev/other-kvm");
  assert.equal(vmOptionsFrom(o).rng, false);
  assert.equal(vmOptionsFrom(o).kvmPath, "/dev/other-kvm");
  assert.equal(parseBootArgs(["--kvm-device=/dev/k"]).kvmDevice, "/dev/k");
  assert.throws(() => parseBootArgs(["-D", " "]), /--kvm-device needs a device path/);
  assert.throws(() => parseBootArgs(["--restore", "snap", "--no-rng"]), /leave out --no-rng/);
  assert.equal(parseBootArgs(["--restore", "snap", "-D", "/dev/k"]).kvmDevice, "/dev/k", "-D goes with --restore");
  expectOneLine(runCli(["boot", "-k", goodKernel, "-D", join(dir, "no-kvm-D")]), ExitCode.HOST, /no-kvm-D does not exist/);
  expectOneLine(runCli(["probe", "--kvm-device", join(dir, "no-kvm-D")]), ExitCode.HOST, /no-kvm-D does not exist/);
  expectOneLine(runCli(["probe", "extra"]), ExitCode.USAGE, /takes no arguments/);
});
