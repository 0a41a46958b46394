/**
 * Tier 3: user-mode networking with the default guest, run the way it is meant to be used:
 * by a user WITHOUT privileges. The test (root) makes a network namespace with an uplink
 * (passt copies the guest's address and gateway from the interface with the default route;
 * nothing leaves the namespace), gives an unprivileged user (nobody) a KVM device node of its
 * own and nothing else (TSKVM_KVM_DEVICE), and runs `tskvm boot --net user` as that user.
 * Then, as that user: SSH into the guest through the forwarded port (a command's output and
 * exit status come back), the guest fetches a file from an HTTP server on the namespace's
 * 127.0.0.1 through passt's gateway mapping, passt is killed (one line from tskvm, the guest's
 * link goes down, tskvm runs on), Ctrl-A x ends it, and no passt, runtime directory or port
 * is left. The other exit paths are in test/kvm/usernet-lifecycle.test.ts.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { chmodSync, chownSync, copyFileSync, existsSync, mkdtempSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { bootFilesFor, findDefaultGuest } from "../../src/api/default-guest";
import { detectHostKvm } from "../../src/kvm/host";
import { RunningCli } from "../helpers/cli";
import { NetNs } from "../helpers/netns";
import { addUplink, passtProcesses, passtRuntimeDirs, passtSkipReason, testMark } from "../helpers/passt";

const emulated = detectHostKvm().kind === "emulated-pvm";
const TIMEOUT_MS = emulated ? 420_000 : 120_000;
const USER = 65534; // nobody
const GATEWAY = "10.0.2.2";

function which(cmd: string): boolean {
  return ["/usr/bin", "/bin", "/usr/sbin", "/sbin"].some((d) => existsSync(join(d, cmd)));
}

/** argv prefix that runs a command as the unprivileged user, no capabilities, HOME in `home`. */
const asUser = (home: string): string[] => ["setpriv", `--reuid=${USER}`, `--regid=${USER}`, "--clear-groups", "--inh-caps=-all", "env", `HOME=${home}`];

/**
 * A KVM device node only `USER` can open, in `dir` (mknod; the directory's file system must
 * allow device nodes). Undefined when that does not work here.
 */
function privateKvmNode(dir: string): string | undefined {
  const rdev = statSync("/dev/kvm").rdev;
  const node = join(dir, "kvm");
  const major = (rdev >> 8) & 0xfff;
  const minor = (rdev & 0xff) | ((rdev >> 12) & 0xfff00);
  if (spawnSync("mknod", [node, "c", String(major), String(minor)]).status !== 0) return undefined;
  chownSync(node, USER, USER);
  chmodSync(node, 0o600);
  const probe = spawnSync(asUser(dir)[0]!, [...asUser(dir).slice(1), process.execPath, "-e", `require("fs").closeSync(require("fs").openSync(${JSON.stringify(node)}, "r+"))`]);
  return probe.status === 0 ? node : undefined;
}

test("user-mode networking as an unprivileged user: SSH, HTTP to the host, passt killed, nothing left", { timeout: 1_200_000 }, async (t) => {
  if (!existsSync("/dev/kvm")) return t.skip("no /dev/kvm on this host");
  const passtSkip = passtSkipReason();
  if (passtSkip !== undefined) return t.skip(passtSkip);
  for (const tool of ["busybox", "dbclient", "setpriv", "mknod"]) {
    if (!which(tool)) return t.skip(`${tool} is not installed (Debian: busybox-static, dropbear-bin, util-linux, coreutils)`);
  }
  const guest = findDefaultGuest();
  if (guest === undefined) {
    if (process.env.TSKVM_REQUIRE_GUEST) assert.fail("the default guest is not built (npm run guest) but TSKVM_REQUIRE_GUEST is set");
    return t.skip("no default guest built: run `npm run guest` to enable the Linux network tests");
  }
  assert.ok(guest.sshKeyDropbear !== undefined, "the guest build provides a dropbear key");

  // The unprivileged user's files: the guest, its SSH key, a KVM node of its own.
  const home = mkdtempSync(join(tmpdir(), "tskvm-usernet-"));
  chmodSync(home, 0o755);
  const files = bootFilesFor(guest, emulated);
  const own = (src: string, name: string, mode: number) => {
    const dst = join(home, name);
    copyFileSync(src, dst);
    chownSync(dst, USER, USER);
    chmodSync(dst, mode);
    return dst;
  };
  const kernel = own(files.kernel, "kernel", 0o644);
  const initrd = own(files.initrd!, "initrd", 0o644);
  const key = own(guest.sshKeyDropbear!, "key", 0o600);
  chownSync(home, USER, USER);
  const kvm = privateKvmNode(home);
  if (kvm === undefined) {
    rmSync(home, { recursive: true, force: true });
    if (process.getuid?.() !== 0) return t.skip("needs root to make a namespace and a KVM device node for an unprivileged user");
    assert.fail(`cannot make a KVM device node an unprivileged user can open in ${home} (a nodev file system?): set TMPDIR elsewhere`);
  }

  const ns = NetNs.create("usernet");
  addUplink(ns, "10.0.2.15", 24, GATEWAY);
  const www = join(home, "www");
  spawnSync("mkdir", [www]);
  const served = `served-by-the-host-${process.pid}`;
  writeFileSync(join(www, "hello.txt"), `${served}\n`);
  const httpPort = 20000 + (process.pid % 20000);
  // The host's web server, on the namespace's loopback only.
  const httpd = spawn("ip", ["netns", "exec", ns.name, "busybox", "httpd", "-f", "-p", `127.0.0.1:${httpPort}`, "-h", www], { stdio: "ignore" });
  const mark = testMark();
  const vm = new RunningCli(["boot", "--net", "user", "-k", kernel, "-i", initrd, "-m", "256M"], {}, [
    "ip",
    "netns",
    "exec",
    ns.name,
    ...asUser(home),
    `TSKVM_KVM_DEVICE=${kvm}`,
    `TSKVM_TEST_MARK=${mark.value}`,
  ]);
  try {
    const ready = await vm.waitFor(/TSKVM-GUEST-READY/, TIMEOUT_MS);
    t.diagnostic(`ready marker after ${ready} ms`);
    assert.match(vm.stdout, /eth0: 10\.0\.2\.15\/24 via 10\.0\.2\.2 by DHCP/, "the guest configured eth0 by DHCP");
    // No "-i KEY": the initrd is a copy the test gives (-i), which tskvm cannot vouch for.
    const sshLine = /^ssh -p (\d+) root@127\.0\.0\.1 +# tskvm: log into the guest$/m.exec(vm.stderr);
    assert.ok(sshLine !== null, `the paste-able ssh line: ${vm.stderr}`);
    const sshPort = Number(sshLine[1]);

    // Nobody here is root.
    const uidOf = (pid: number) => /Uid:\s+(\d+)/.exec(spawnSync("cat", [`/proc/${pid}/status`], { encoding: "utf8" }).stdout)?.[1];
    assert.equal(uidOf(vm.child.pid!), String(USER), "tskvm runs unprivileged");
    const passt = passtProcesses(mark.value);
    assert.equal(passt.length, 1);
    assert.equal(uidOf(passt[0]!), String(USER), "passt runs unprivileged");

    const ssh = (command: string) =>
      ns.exec(["timeout", "120", ...asUser(home), "dbclient", "-y", "-y", "-i", key, "-p", String(sshPort), "root@127.0.0.1", command], { allowFail: true });
    const first = Date.now();
    const r = ssh("echo hello-over-ssh; id -u; exit 3");
    t.diagnostic(`SSH command round trip ${Date.now() - first} ms`);
    assert.equal(r.status, 3, `the command's exit status comes back; stderr: ${r.stderr}`);
    assert.match(r.stdout, /^hello-over-ssh\n0\n$/);

    const get = ssh(`wget -q -O - http://${GATEWAY}:${httpPort}/hello.txt`);
    assert.equal(get.status, 0, get.stderr);
    assert.equal(get.stdout, `${served}\n`, "the guest fetched the host's file through passt's gateway mapping");

    // passt dies: one line, the guest's link goes down, the VM runs on.
    process.kill(passt[0]!, "SIGKILL");
    const deadline = Date.now() + 30_000;
    while (!/passt was killed by SIGKILL/.test(vm.stderr) && Date.now() < deadline) await new Promise((res) => setTimeout(res, 100));
    const passtLines = vm.stderr.split("\n").filter((l) => l.includes("passt") && !l.startsWith("ssh ") && !l.includes("booting"));
    assert.deepEqual(passtLines, ["tskvm: passt was killed by SIGKILL: the guest's network (eth0) is down; the VM keeps running"]);
    const at = vm.stdout.length;
    vm.send("echo CARRIER=$(cat /sys/class/net/eth0/carrier)\n");
    await vm.waitFor(/CARRIER=0/, TIMEOUT_MS);
    assert.ok(vm.stdout.length > at);
    assert.equal(vm.child.exitCode, null, "tskvm keeps running");

    vm.send("\x01x");
    const exit = await vm.exited;
    assert.equal(exit.code, 0, vm.stderr);
    assert.deepEqual(passtProcesses(mark.value), [], "no passt left");
    assert.deepEqual(passtRuntimeDirs(vm.child.pid!), [], "no runtime directory left");
    assert.equal(ns.exec(["ss", "-Htln", `sport = :${sshPort}`]).stdout.trim(), "", "the SSH port is closed");
  } finally {
    vm.kill();
    httpd.kill();
    ns.destroy();
    rmSync(home, { recursive: true, force: true });
  }
});
