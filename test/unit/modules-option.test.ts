/**
 * --modules (a distribution kernel's module directory) on the command line: parsed for
 * boot and run, refused with one line when it cannot work, before any VM exists.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseBootArgs, parseRunArgs } from "../../src/cli/args";
import { ExitCode } from "../../src/cli/exit-codes";
import { expectOneLine, runCli } from "../helpers/cli";
import { makeBzImage } from "../helpers/images";

const dir = mkdtempSync(join(tmpdir(), "tskvm-modopt-"));
process.on("exit", () => rmSync(dir, { recursive: true, force: true }));
const kernel = join(dir, "bzImage");
writeFileSync(kernel, makeBzImage({ codeBytes: 64 * 1024 }));
const initrd = join(dir, "initrd");
writeFileSync(initrd, new Uint8Array(1024));

test("--modules is a boot and a run option; --no-initrd contradicts it", () => {
  assert.equal(parseBootArgs(["-k", "k", "--modules", "/lib/modules/6.1.0-57-amd64"]).modules, "/lib/modules/6.1.0-57-amd64");
  assert.equal(parseRunArgs(["-k", "k", "--modules", "m", "--", "true"]).boot.modules, "m");
  assert.equal(parseBootArgs([]).modules, undefined);
  assert.throws(() => parseRunArgs(["-k", "k", "--no-initrd", "--modules", "m", "--", "true"]), /--modules adds the modules to an initrd: drop --no-initrd/);
});

test("a module directory that cannot be used: one line, exit 3, before KVM is opened", () => {
  const noKvm = { TSKVM_KVM_DEVICE: join(dir, "no-kvm") };
  expectOneLine(runCli(["boot", "-k", kernel, "-i", initrd, "--modules", " "], { env: noKvm }), ExitCode.USAGE, /--modules needs a file path/);
  expectOneLine(runCli(["boot", "-k", kernel, "-i", initrd, "--modules", join(dir, "nowhere")], { env: noKvm }), ExitCode.BAD_INPUT, /kernel module directory .*nowhere does not exist/);
  expectOneLine(runCli(["boot", "-k", kernel, "-i", initrd, "--modules", dir], { env: noKvm }), ExitCode.BAD_INPUT, /has no modules\.dep: .*depmod/);
  expectOneLine(runCli(["boot", "-k", kernel, "--modules", dir], { env: noKvm }), ExitCode.USAGE, /modules are added to an initrd, and this VM has none/);
});
