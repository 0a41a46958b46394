/**
 * `tskvm run` and `tskvm mkdisk` on the command line: parsing, help, and bad options, each
 * a one-line error with exit status 2 before anything starts.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { runCli, type CliResult } from "../helpers/cli";
import { DEFAULT_READY_TIMEOUT_S, UsageError, parseDuration, parseMkdiskArgs, parseRunArgs } from "../../src/cli/args";
import { ExitCode } from "../../src/cli/exit-codes";

function expectUsage(r: CliResult, pattern: RegExp): void {
  assert.equal(r.status, ExitCode.USAGE, r.stderr);
  assert.equal(r.stderr.trimEnd().split("\n").length, 1, r.stderr);
  assert.match(r.stderr, /^tskvm: /);
  assert.match(r.stderr, pattern);
  assert.equal(r.stdout, "");
}

test("parseRunArgs: boot flags, run flags, the command after --", () => {
  const o = parseRunArgs(["-m", "512M", "-c", "2", "-d", "t.img", "--timeout", "90s", "--console-log", "c.log", "-v", "--", "make", "-C", "/mnt", "check"]);
  assert.equal(o.boot.memoryBytes, 512 * 1024 * 1024);
  assert.equal(o.boot.cpus, 2);
  assert.deepEqual(o.boot.disks, ["t.img"]);
  assert.equal(o.timeoutMs, 90_000);
  assert.equal(o.readyTimeoutMs, DEFAULT_READY_TIMEOUT_S * 1000);
  assert.equal(o.consoleLog, "c.log");
  assert.equal(o.verbose, true);
  assert.equal(o.noInitrd, false);
  assert.deepEqual(o.command, ["make", "-C", "/mnt", "check"]);
  // Flags after -- belong to the command.
  assert.deepEqual(parseRunArgs(["--", "ls", "-l", "--", "-v"]).command, ["ls", "-l", "--", "-v"]);
  assert.equal(parseRunArgs(["--ready-timeout", "0", "--", "true"]).readyTimeoutMs, undefined, "0: no limit");
  assert.equal(parseRunArgs(["-k", "vmlinux", "--no-initrd", "--", "true"]).noInitrd, true);
  assert.equal(parseRunArgs(["--help"]).help, true);
});

test("parseDuration: seconds by default, ms/s/m/h suffixes, 0 is no limit", () => {
  assert.equal(parseDuration("30", "--timeout"), 30_000);
  assert.equal(parseDuration("2.5", "--timeout"), 2500);
  assert.equal(parseDuration("10m", "--timeout"), 600_000);
  assert.equal(parseDuration("1h", "--timeout"), 3_600_000);
  assert.equal(parseDuration("250ms", "--timeout"), 250);
  assert.equal(parseDuration("0", "--timeout"), undefined);
  for (const bad of ["", "soon", "-1", "5d", "1e3", "999999999"]) assert.throws(() => parseDuration(bad, "--timeout"), UsageError, bad);
});

test("parseMkdiskArgs: a directory and an image, --size, --force, --label", () => {
  const o = parseMkdiskArgs(["tests", "out.img", "--size", "1G", "-f", "--label", "tests"]);
  assert.deepEqual(o, { dir: "tests", out: "out.img", sizeBytes: 1024 ** 3, force: true, label: "tests", help: false });
  assert.equal(parseMkdiskArgs(["a", "b"]).sizeBytes, undefined);
  for (const bad of [[], ["a"], ["a", "b", "c"], ["a", "b", "--size", "huge"], ["a", "b", "--bogus"]]) {
    assert.throws(() => parseMkdiskArgs(bad), UsageError, bad.join(" "));
  }
});

test("tskvm run: bad command lines, one line each, exit 2", () => {
  expectUsage(runCli(["run", "echo", "hi"]), /give the command after --/);
  expectUsage(runCli(["run", "--"]), /no command after --/);
  expectUsage(runCli(["run", "stray", "--", "true"]), /unexpected argument 'stray' before --/);
  expectUsage(runCli(["run", "--", ""]), /command after -- is empty/);
  expectUsage(runCli(["run", "--timeout", "soon", "--", "true"]), /bad --timeout 'soon'/);
  expectUsage(runCli(["run", "--ready-timeout", "x", "--", "true"]), /bad --ready-timeout 'x'/);
  expectUsage(runCli(["run", "--bogus", "--", "true"]), /bogus.*tskvm run --help/);
  expectUsage(runCli(["run", "--no-initrd", "--", "true"]), /--no-initrd needs a kernel/);
  expectUsage(runCli(["run", "-k", "k", "-i", "i", "--no-initrd", "--", "true"]), /contradict/);
  expectUsage(runCli(["run", "-m", "12X", "--", "true"]), /bad memory size '12X'/);
  expectUsage(runCli(["run", "--console-log", "", "--", "true"]), /--console-log needs a file path/);
});

test("tskvm mkdisk: bad command lines, one line each, exit 2", () => {
  expectUsage(runCli(["mkdisk"]), /give a directory and an image file/);
  expectUsage(runCli(["mkdisk", "dir"]), /got 1 argument\)/);
  expectUsage(runCli(["mkdisk", "dir", "out.img", "--size", "lots"]), /bad image size 'lots'/);
});

test("help: tskvm --help lists run and mkdisk; each has its own --help with the exit statuses", () => {
  const top = runCli(["--help"]);
  assert.equal(top.status, 0);
  assert.match(top.stdout, /\brun\b.*\n.*\bmkdisk\b/);
  const run = runCli(["run", "--help"]);
  assert.equal(run.status, 0);
  assert.match(run.stdout, /usage: tskvm run \[options\] -- CMD/);
  assert.match(run.stdout, /--timeout SECONDS/);
  assert.match(run.stdout, /-k, --kernel PATH/, "the boot flags too");
  assert.match(run.stdout, /5 the guest did not become ready/);
  const mk = runCli(["mkdisk", "--help"]);
  assert.equal(mk.status, 0);
  assert.match(mk.stdout, /usage: tskvm mkdisk DIR OUT\.img/);
});
