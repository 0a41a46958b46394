/**
 * Bad input as a new user gives it: each refusal is one line starting "tskvm:", exits with
 * its own class (README's table), and comes before any long work (building the default
 * guest) and before KVM is opened, so that a host without KVM reports the same.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync, readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { ExitCode } from "../../src/cli/exit-codes";
import { expectOneLine, runCli, scratchDir } from "../helpers/cli";
import { makeBzImage } from "../helpers/images";

const scratch = scratchDir("tskvm-refusals-");
const kernel = scratch.file("bzImage", makeBzImage({ codeBytes: 64 * 1024 }));
const notKernel = scratch.file("not-a-kernel", "#!/bin/sh\necho this is no kernel\n");
const disk = scratch.file("disk.img", new Uint8Array(1024 * 1024));
/** An empty cache: the default guest is "not built", so anything that would build it would show. */
const cache = join(scratch.dir, "cache");
mkdirSync(cache);
const noKvm = { TSKVM_KVM_DEVICE: join(scratch.dir, "no-kvm-here"), XDG_CACHE_HOME: cache };

describe("tskvm with nothing or with bad values", () => {
  it("no command: the usage, then a tskvm: line; status 2", () => {
    const r = runCli([]);
    assert.equal(r.status, ExitCode.USAGE);
    assert.match(r.stderr, /^usage: tskvm <command>/);
    assert.match(r.stderr, /\ntskvm: no command given: use boot, run, mkdisk or probe \(tskvm --help\)\n$/);
  });

  it("a negative -m, -c or --timeout: one line saying what is wrong with the value", () => {
    expectOneLine(runCli(["boot", "-m", "-5"]), ExitCode.USAGE, /^tskvm: bad memory size '-5': it must be more than zero \(-m\)$/);
    expectOneLine(runCli(["boot", "-c", "-1"]), ExitCode.USAGE, /^tskvm: bad vCPU count '-1': give a whole number, at least 1 \(-c\)$/);
    expectOneLine(runCli(["run", "--timeout", "-1", "--", "true"]), ExitCode.USAGE, /^tskvm: bad --timeout '-1': a time limit cannot be negative/);
    expectOneLine(runCli(["run", "--memory", "-1G", "--", "true"]), ExitCode.USAGE, /bad memory size '-1G': it must be more than zero/);
    // A flag where its value should be: one line with the way to give such a value.
    expectOneLine(runCli(["boot", "-k", "-d", "disk.img"]), ExitCode.USAGE, /^tskvm: -k needs a value, and '-d' looks like a flag: write --kernel=-d if that is the value$/);
  });

  it("mkdisk: too small a --size names the minimum", () => {
    const src = join(scratch.dir, "src");
    mkdirSync(src, { recursive: true });
    expectOneLine(runCli(["mkdisk", src, join(scratch.dir, "small.img"), "--size", "8M"]), ExitCode.USAGE, /bad image size 8 MiB: an image is at least 16 MiB/);
  });

  it("mkdisk to a place that takes no files is a bad output path (3), not a bug (70), and leaves nothing", { skip: mkfsMissing() }, () => {
    const src = join(scratch.dir, "src2");
    mkdirSync(src, { recursive: true });
    writeFileSync(join(src, "f"), "x");
    expectOneLine(runCli(["mkdisk", src, "/proc/tskvm-test.img"]), ExitCode.BAD_INPUT, /cannot write '\/proc\/tskvm-test\.img'/);
    assert.equal(existsSync("/proc/tskvm-test.img"), false);
  });
});

describe("a KVM device that is none", () => {
  it("/dev/null or a regular file as the KVM device: the host cannot run VMs (4), not a bug", () => {
    for (const dev of ["/dev/null", notKernel]) {
      expectOneLine(runCli(["probe"], { env: { TSKVM_KVM_DEVICE: dev } }), ExitCode.HOST, new RegExp(`${dev.replace(/[/.]/g, "\\$&")} is not a KVM device \\(KVM_GET_API_VERSION: ENOTTY\\)`));
    }
  });
});

describe("on a host without KVM, every other mistake is still reported as itself, at once", () => {
  const cases: [string, string[], number, RegExp][] = [
    ["a missing disk", ["boot", "-k", kernel, "-d", join(scratch.dir, "nowhere.img")], ExitCode.BAD_INPUT, /disk image .*nowhere\.img does not exist/],
    ["a file that is no kernel", ["boot", "-k", notKernel], ExitCode.BAD_INPUT, /kernel image .*not-a-kernel is not a bzImage or ELF vmlinux/],
    ["a missing initrd", ["boot", "-k", kernel, "-i", join(scratch.dir, "no-initrd")], ExitCode.BAD_INPUT, /initrd '.*no-initrd' does not exist/],
    ["an unknown CPU template", ["boot", "-k", kernel, "--cpu-template", "foo"], ExitCode.USAGE, /unknown CPU template 'foo': use host or emulated \(--cpu-template\)/],
    ["an unknown CPU feature", ["boot", "-k", kernel, "--hide-cpu-feature", "nosuch"], ExitCode.USAGE, /unknown CPU feature 'nosuch'/],
    ["a 16-character TAP name", ["boot", "-k", kernel, "-t", "abcdefghijklmnop"], ExitCode.USAGE, /TAP name "abcdefghijklmnop" is 16 bytes/],
    ["1000 vCPUs", ["boot", "-k", kernel, "-c", "1000"], ExitCode.USAGE, /cannot give the guest 1000 vCPUs: tskvm's MP table holds 1 to 254 \(-c\)/],
    ["an unwritable console log", ["run", "--console-log", join(scratch.dir, "no", "dir", "log"), "--", "true"], ExitCode.BAD_INPUT, /console log '.*' cannot be written \(ENOENT\)/],
    ["no KVM, all else fine", ["boot", "-k", kernel, "-d", disk], ExitCode.HOST, /no-kvm-here does not exist: this host has no KVM/],
  ];
  for (const [what, args, status, pattern] of cases) {
    it(what, () => expectOneLine(runCli(args, { env: noKvm }), status, pattern));
  }

  it("boot and run without -k say there is no KVM before they would build the default guest", () => {
    for (const args of [["boot"], ["run", "--", "true"], ["run", "--snapshot", join(scratch.dir, "snaps"), "--", "true"]]) {
      const r = runCli(args, { env: noKvm, timeoutMs: 30_000 });
      expectOneLine(
        { ...r, stderr: r.stderr.replace(/^tskvm: no kernel given \(-k\).*\n/, "") },
        ExitCode.HOST,
        /no-kvm-here does not exist: this host has no KVM/,
      );
      assert.doesNotMatch(r.stderr, /building the default guest/);
      assert.deepEqual(readdirSync(cache), [], `${args.join(" ")}: nothing started in the guest cache`);
    }
  });
});

function mkfsMissing(): string | false {
  for (const dir of (process.env.PATH ?? "").split(":").concat(["/sbin", "/usr/sbin"])) {
    if (existsSync(join(dir, "mkfs.ext4"))) return false;
  }
  return "mkfs.ext4 is not installed (e2fsprogs)";
}
