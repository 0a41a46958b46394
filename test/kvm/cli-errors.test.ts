/**
 * The CLI's one-line errors for inputs that are checked once KVM is open (disk images,
 * TAPs, kernel images, vCPU counts), and `tskvm probe`. The KVM tier: needs /dev/kvm.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { spawnSync } from "node:child_process";
import { runCli, expectOneLine, scratchDir, TSKVM_BIN } from "../helpers/cli";
import { makeBzImage } from "../helpers/images";
import { ExitCode } from "../../src/cli/exit-codes";
import { kvmSkip } from "../helpers/tiers";

const noKvm = kvmSkip();
const { dir, file } = scratchDir("tskvm-clierr-");
const goodKernel = file("bzImage", makeBzImage({ codeBytes: 64 * 1024 }));

test("bad disk images and disk options: one line each, exit 3, the image untouched", { skip: noKvm }, () => {
  expectOneLine(runCli(["boot", "-k", goodKernel, "-d", join(dir, "no.img")]), ExitCode.BAD_INPUT, /disk image .*no\.img does not exist/);
  expectOneLine(runCli(["boot", "-k", goodKernel, "-d", dir]), ExitCode.BAD_INPUT, /is a directory/);
  const odd = file("odd.img", new Uint8Array(1000));
  expectOneLine(runCli(["boot", "-k", goodKernel, "-d", odd]), ExitCode.BAD_INPUT, /not a multiple of 512.*truncate -s 1024/);
  const img = file("disk.img", new Uint8Array(1024 * 1024));
  expectOneLine(runCli(["boot", "-k", goodKernel, "-d", `${img},bogus`]), ExitCode.BAD_INPUT, /unknown disk option "bogus"/);
  // Another holder of the image's lock (flock(1) here, another tskvm in real life).
  const r = spawnSync("flock", ["-x", img, process.execPath, TSKVM_BIN, "boot", "-k", goodKernel, "-d", img], { encoding: "utf8" });
  expectOneLine({ status: r.status, stdout: r.stdout, stderr: r.stderr }, ExitCode.BAD_INPUT, /in use by another/);
});

test("bad network options: one line each, nothing left behind", { skip: noKvm }, () => {
  expectOneLine(runCli(["boot", "-k", goodKernel, "-t", "a-name-far-too-long-for-linux"]), ExitCode.USAGE, /at most 15/);
  expectOneLine(runCli(["boot", "-k", goodKernel, "-t", "t0", "--mac", "zz:00"]), ExitCode.USAGE, /MAC/i);
  if (process.getuid?.() === 0) {
    // Root without CAP_NET_ADMIN: /dev/kvm opens, the TAP is refused.
    const r = spawnSync("setpriv", ["--bounding-set=-net_admin", "--inh-caps=-net_admin", process.execPath, TSKVM_BIN, "boot", "-k", goodKernel, "-t", "t0"], { encoding: "utf8" });
    expectOneLine({ status: r.status, stdout: r.stdout, stderr: r.stderr }, ExitCode.HOST, /CAP_NET_ADMIN/);
  }
});

test("kernel images tskvm cannot boot: one line each, exit 3", { skip: noKvm }, () => {
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

test("tskvm probe describes the host's KVM", { skip: noKvm }, () => {
  const r = runCli(["probe", "--json"]);
  assert.equal(r.status, 0, r.stderr);
  const report = JSON.parse(r.stdout) as { apiVersion: number; host: string; missingRequired: string[]; vcpus: { max: number } };
  assert.equal(report.apiVersion, 12);
  assert.deepEqual(report.missingRequired, []);
  assert.ok(report.vcpus.max >= 1);
  assert.match(report.host, /^(hardware|nested)-(intel|amd)$|^emulated-pvm$|^unknown$/);
  const text = runCli(["probe"]);
  assert.match(text.stdout, /Host KVM: +(hardware KVM|nested (SVM|VMX)|kvm-pvm)/);
  assert.match(text.stdout, /This host: +(a virtual machine under|not a virtual machine)/);
});

test("no permission for /dev/kvm: one line, exit 4", { skip: noKvm || (process.getuid?.() === 0 ? false : "needs root to drop to another user") }, () => {
  const r = spawnSync("setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", process.execPath, TSKVM_BIN, "boot", "-k", goodKernel], { encoding: "utf8" });
  expectOneLine({ status: r.status, stdout: r.stdout, stderr: r.stderr }, ExitCode.HOST, /no permission to open \/dev\/kvm.*kvm' group/);
});
