/**
 * The CLI as a user meets it: every bad input gets one clear line on stderr, a distinct
 * non-zero exit status, no stack trace, and nothing left behind.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { chmodSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { spawnSync } from "node:child_process";
import { expectOneLine, runCli } from "../helpers/cli";
import { makeBzImage } from "../helpers/images";
import { parseBootArgs, UsageError } from "../../src/cli/args";
import { parseSize, SizeError } from "../../src/api/option-values";
import { EscapeParser } from "../../src/cli/console";
import { ExitCode } from "../../src/cli/exit-codes";

const dir = mkdtempSync(join(tmpdir(), "tskvm-cli-"));
// Readable by the unprivileged user some cases drop to.
chmodSync(dir, 0o755);
process.on("exit", () => rmSync(dir, { recursive: true, force: true }));
const file = (name: string, data: Uint8Array | string) => {
  const p = join(dir, name);
  writeFileSync(p, data);
  return p;
};
const goodKernel = file("bzImage", makeBzImage({ codeBytes: 64 * 1024 }));
const hasKvm = spawnSync("test", ["-r", "/dev/kvm"]).status === 0;


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

test("bad disk images and disk options: one line each, exit 3, the image untouched", { skip: hasKvm ? false : "needs /dev/kvm" }, () => {
  expectOneLine(runCli(["boot", "-k", goodKernel, "-d", join(dir, "no.img")]), ExitCode.BAD_INPUT, /disk image .*no\.img does not exist/);
  expectOneLine(runCli(["boot", "-k", goodKernel, "-d", dir]), ExitCode.BAD_INPUT, /is a directory/);
  const odd = file("odd.img", new Uint8Array(1000));
  expectOneLine(runCli(["boot", "-k", goodKernel, "-d", odd]), ExitCode.BAD_INPUT, /not a multiple of 512.*truncate -s 1024/);
  const img = file("disk.img", new Uint8Array(1024 * 1024));
  expectOneLine(runCli(["boot", "-k", goodKernel, "-d", `${img},bogus`]), ExitCode.BAD_INPUT, /unknown disk option "bogus"/);
  // Another holder of the image's lock (flock(1) here, another tskvm in real life).
  const r = spawnSync("flock", ["-x", img, process.execPath, join(__dirname, "..", "..", "..", "bin", "tskvm"), "boot", "-k", goodKernel, "-d", img], { encoding: "utf8" });
  expectOneLine({ status: r.status, stdout: r.stdout, stderr: r.stderr }, ExitCode.BAD_INPUT, /in use by another/);
});

test("bad network options: one line each, nothing left behind", { skip: hasKvm ? false : "needs /dev/kvm" }, () => {
  expectOneLine(runCli(["boot", "-k", goodKernel, "-t", "a-name-far-too-long-for-linux"]), ExitCode.USAGE, /at most 15/);
  expectOneLine(runCli(["boot", "-k", goodKernel, "-t", "t0", "--mac", "zz:00"]), ExitCode.USAGE, /MAC/i);
  if (process.getuid?.() === 0) {
    // Root without CAP_NET_ADMIN: /dev/kvm opens, the TAP is refused.
    const r = spawnSync("setpriv", ["--bounding-set=-net_admin", "--inh-caps=-net_admin", process.execPath, join(__dirname, "..", "..", "..", "bin", "tskvm"), "boot", "-k", goodKernel, "-t", "t0"], { encoding: "utf8" });
    expectOneLine({ status: r.status, stdout: r.stdout, stderr: r.stderr }, ExitCode.HOST, /CAP_NET_ADMIN/);
  }
});

test("kernel images tskvm cannot boot: one line each, exit 3", { skip: hasKvm ? false : "needs /dev/kvm (the image is checked after the VM is created)" }, () => {
  expectOneLine(runCli(["boot", "-k", file("text", "this is not a kernel\n".repeat(100))]), ExitCode.BAD_INPUT, /not a bzImage or ELF vmlinux/);
  expectOneLine(runCli(["boot", "-k", file("trunc", makeBzImage({ codeBytes: 64 * 1024, chop: 4096 }))]), ExitCode.BAD_INPUT, /truncated/);
  expectOneLine(runCli(["boot", "-k", file("old", makeBzImage({ version: 0x0204 }))]), ExitCode.BAD_INPUT, /2\.04.*too old.*2\.06/);
  expectOneLine(runCli(["boot", "-k", goodKernel, "-p", "x".repeat(5000)]), ExitCode.BAD_INPUT, /command line is \d+ bytes/);
  const bigInitrd = file("big-initrd", new Uint8Array(40 * 1024 * 1024));
  expectOneLine(runCli(["boot", "-k", goodKernel, "-i", bigInitrd, "-m", "32M"]), ExitCode.BAD_INPUT, /initrd .* does not fit.*-m/);
  expectOneLine(runCli(["boot", "-k", goodKernel, "-m", "4M"]), ExitCode.USAGE, /too small/);
  expectOneLine(runCli(["boot", "-k", goodKernel, "-c", "5000"]), ExitCode.USAGE, /cannot give the guest 5000 vCPUs/);
  expectOneLine(runCli(["boot", "-k", goodKernel, "--cpu-template", "fancy"]), ExitCode.USAGE, /unknown CPU template 'fancy'/);
  expectOneLine(runCli(["boot", "-k", goodKernel, "--hide-cpu-feature", "warp"]), ExitCode.USAGE, /unknown CPU feature 'warp'/);
});

test("no /dev/kvm, or no permission for it: one line, exit 4", () => {
  expectOneLine(runCli(["boot", "-k", goodKernel], { env: { TSKVM_KVM_DEVICE: join(dir, "no-kvm") } }), ExitCode.HOST, /does not exist: this host has no KVM/);
  expectOneLine(runCli(["probe"], { env: { TSKVM_KVM_DEVICE: join(dir, "no-kvm") } }), ExitCode.HOST, /does not exist/);
  if (process.getuid?.() === 0 && hasKvm) {
    const r = spawnSync("setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", process.execPath, join(__dirname, "..", "..", "..", "bin", "tskvm"), "boot", "-k", goodKernel], { encoding: "utf8" });
    expectOneLine({ status: r.status, stdout: r.stdout, stderr: r.stderr }, ExitCode.HOST, /no permission to open \/dev\/kvm.*kvm' group/);
  }
});

test("tskvm probe describes the host's KVM", { skip: hasKvm ? false : "needs /dev/kvm" }, () => {
  const r = runCli(["probe", "--json"]);
  assert.equal(r.status, 0, r.stderr);
  const report = JSON.parse(r.stdout) as { apiVersion: number; host: string; missingRequired: string[]; vcpus: { max: number } };
  assert.equal(report.apiVersion, 12);
  assert.deepEqual(report.missingRequired, []);
  assert.ok(report.vcpus.max >= 1);
  assert.match(report.host, /hardware-intel|hardware-amd|emulated-pvm|unknown/);
  const text = runCli(["probe"]);
  assert.match(text.stdout, /Host KVM: +.*(hardware|emulating)/);
});

test("a failed start leaves no files behind in the working directory", () => {
  const cwd = join(dir, "cwd");
  mkdirSync(cwd);
  spawnSync(process.execPath, [join(__dirname, "..", "..", "..", "bin", "tskvm"), "boot", "-k", "nothing-here"], { cwd });
  assert.deepEqual(readdirSync(cwd), []);
});
