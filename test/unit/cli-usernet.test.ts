/**
 * The CLI's user-mode networking flags (-n/--net user, --forward): parsing, and every bad
 * input as one line with its exit status: 2 for what the command line got wrong, 4 for
 * what this host lacks (passt not installed, a port in use), and a failed start that
 * leaves no passt and no runtime directory behind.
 */
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseBootArgs, parseRunArgs } from "../../src/cli/args";
import { ExitCode } from "../../src/cli/exit-codes";
import { TSKVM_BIN, expectOneLine, runCli, type CliResult } from "../helpers/cli";
import { makeBzImage } from "../helpers/images";
import { NetNs } from "../helpers/netns";
import { addUplink, passtProcesses, passtSkipReason, testMark } from "../helpers/passt";

const dir = mkdtempSync(join(tmpdir(), "tskvm-cli-usernet-"));
chmodSync(dir, 0o755);
process.on("exit", () => rmSync(dir, { recursive: true, force: true }));
const goodKernel = join(dir, "bzImage");
writeFileSync(goodKernel, makeBzImage({ codeBytes: 64 * 1024 }));
const hasKvm = spawnSync("test", ["-r", "/dev/kvm"]).status === 0;

describe("-n/--net user and --forward on the command line", () => {
  it("parses for boot and run", () => {
    const o = parseBootArgs(["-n", "user", "--forward", "tcp:8080:80", "--forward", "udp:0.0.0.0:5353:53"]);
    assert.equal(o.net, "user");
    assert.deepEqual(o.forwards, ["tcp:8080:80", "udp:0.0.0.0:5353:53"]);
    const r = parseRunArgs(["--net", "user", "--", "true"]);
    assert.equal(r.boot.net, "user");
    assert.deepEqual(r.boot.forwards, []);
    assert.equal(parseBootArgs([]).net, undefined);
  });

  it("refuses bad combinations and malformed forwards: one line, exit 2", () => {
    const k = ["boot", "-k", goodKernel];
    expectOneLine(runCli([...k, "-n", "slirp"]), ExitCode.USAGE, /bad --net 'slirp': the one mode is user/);
    expectOneLine(runCli([...k, "--forward", "tcp:8080:80"]), ExitCode.USAGE, /--forward needs --net user/);
    expectOneLine(runCli([...k, "-n", "user", "-t", "tap0"]), ExitCode.USAGE, /--net user and --tap NAME both make eth0: use one/);
    expectOneLine(runCli([...k, "-n", "user", "--guest-ip", "10.0.2.15"]), ExitCode.USAGE, /--guest-ip is for a TAP: with --net user the guest gets its address from passt by DHCP/);
    expectOneLine(runCli([...k, "-n", "user", "--tap-ip", "10.0.2.2/24"]), ExitCode.USAGE, /--tap-ip/);
    expectOneLine(runCli([...k, "-n", "user", "--forward", "tcp:22"]), ExitCode.USAGE, /port forward "tcp:22" is not protocol, host port and guest port .*\(--forward\)$/);
    expectOneLine(runCli([...k, "-n", "user", "--forward", "tcp:80:x"]), ExitCode.USAGE, /guest port "x", not a number from 1 to 65535/);
    expectOneLine(runCli([...k, "-n", "user", "--forward", "icmp:1:1"]), ExitCode.USAGE, /does not start with "tcp:" or "udp:"/);
    expectOneLine(runCli([...k, "-n", "user", "--forward", "tcp:8080:80", "--forward", "tcp:8080:81"]), ExitCode.USAGE, /host port 8080 \(tcp\) is forwarded twice/);
    expectOneLine(runCli(["run", "-k", goodKernel, "--forward", "udp:53:53", "--", "true"]), ExitCode.USAGE, /--forward needs --net user/);
  });

  it("passt not installed: one line naming the package, exit 4", () => {
    // A PATH without passt (node is found by its full path).
    const r = runCli(["boot", "-k", goodKernel, "-n", "user"], { env: { PATH: dir } });
    expectOneLine(r, ExitCode.HOST, /user-mode networking needs passt, which is not installed: install the package "passt"/);
  });
});

const skip = passtSkipReason();

describe("-n user with the real passt, in a namespace with an uplink", { skip }, () => {
  let ns: NetNs;
  before(() => {
    ns = NetNs.create("cli-usernet");
    addUplink(ns);
  });
  after(() => ns?.destroy());
  const inNs = (args: string[], env: Record<string, string> = {}, as: string[] = []): CliResult => {
    const r = spawnSync("ip", ["netns", "exec", ns.name, ...as, "env", ...Object.entries(env).map(([k, v]) => `${k}=${v}`), process.execPath, TSKVM_BIN, ...args], {
      encoding: "utf8",
      timeout: 60_000,
    });
    return { status: r.status, stdout: r.stdout, stderr: r.stderr };
  };

  it("a host port in use: one line, exit 4, nothing started", () => {
    // Held in the namespace by a child process while tskvm checks it.
    const holder = spawnSync("ip", [
      "netns",
      "exec",
      ns.name,
      process.execPath,
      "-e",
      `const s = require("net").createServer().listen(0, "127.0.0.1", () => {
         const port = s.address().port;
         const r = require("child_process").spawnSync(process.execPath, [${JSON.stringify(TSKVM_BIN)}, "boot", "-k", ${JSON.stringify(goodKernel)}, "-n", "user", "--forward", "tcp:" + port + ":80"], { encoding: "utf8" });
         console.log(JSON.stringify({ port, status: r.status, stderr: r.stderr }));
         s.close();
       });`,
    ]);
    const out = JSON.parse(holder.stdout.toString()) as { port: number; status: number; stderr: string };
    expectOneLine({ status: out.status, stdout: "", stderr: out.stderr }, ExitCode.HOST, new RegExp(`host port ${out.port} \\(tcp on 127.0.0.1\\) is already in use: pick another host port`));
  });

  it("a port below 1024 for a user without privileges: one line, exit 2", (t) => {
    if (process.getuid?.() !== 0) {
      expectOneLine(inNs(["boot", "-k", goodKernel, "-n", "user", "--forward", "tcp:80:80"]), ExitCode.USAGE, /host port 80 .* is below 1024/);
      return;
    }
    if (spawnSync("setpriv", ["--version"]).status !== 0) return t.skip("needs setpriv to drop privileges");
    const r = inNs(["boot", "-k", goodKernel, "-n", "user", "--forward", "tcp:80:80"], {}, ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]);
    expectOneLine(r, ExitCode.USAGE, /host port 80 \(tcp on 127.0.0.1\) is below 1024 and binding it needs privileges .*: pick a higher host port/);
  });

  it("a start that fails after passt started (a file that is no kernel) leaves no passt behind", { skip: hasKvm ? false : "needs /dev/kvm" }, () => {
    const notKernel = join(dir, "text");
    writeFileSync(notKernel, "this is not a kernel\n".repeat(100));
    const mark = testMark();
    const r = inNs(["boot", "-k", notKernel, "-n", "user"], mark.env);
    expectOneLine(r, ExitCode.BAD_INPUT, /not a bzImage or ELF vmlinux/);
    assert.deepEqual(passtProcesses(mark.value), [], "no passt left");
  });

  it("no default route: one line, exit 4", () => {
    const bare = NetNs.create("cli-bare");
    try {
      const r = spawnSync("ip", ["netns", "exec", bare.name, process.execPath, TSKVM_BIN, "boot", "-k", goodKernel, "-n", "user"], { encoding: "utf8", timeout: 60_000 });
      expectOneLine({ status: r.status, stdout: r.stdout, stderr: r.stderr }, ExitCode.HOST, /passt found no host network interface with a default route/);
    } finally {
      bare.destroy();
    }
  });
});

