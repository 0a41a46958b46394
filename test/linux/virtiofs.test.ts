/**
 * Tier 3: host directories in the default guest over virtio-fs (each served by a virtiofsd
 * tskvm starts), and the host's own user space (--rootfs host). Needs the default guest
 * and virtiofsd (Debian: qemu-system-common); without them the tests say so, and fail
 * instead when TSKVM_REQUIRE_GUEST / TSKVM_REQUIRE_VIRTIOFSD is set (CI).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { startVm } from "../../src/api";
import { rootfsHostHides } from "../../src/api/shares";
import { guestSkip, scaled, virtiofsdSkip } from "../helpers/tiers";
import { freshDir, virtiofsdFor } from "../helpers/shares";
import { RunningCli, runCli } from "../helpers/cli";

const TEST_MS = 900_000;
const dir = mkdtempSync(join(tmpdir(), "tskvm-virtiofs-"));
process.on("exit", () => rmSync(dir, { recursive: true, force: true }));
const skip = guestSkip().skip || virtiofsdSkip();
/** Boot to the agent's ready report: ~25-50 s on kvm-pvm, ~15 s in the harness VM, a few seconds on hardware KVM. */
const READY_MS = scaled(60_000);

const fresh = (name: string, files: Record<string, string> = {}): string => freshDir(dir, name, files);

/** The one of those tskvm (this process, through the API) started itself. */
function ourVirtiofsd(path: string): number | undefined {
  return virtiofsdFor(path).find((pid) => {
    try {
      return Number(readFileSync(`/proc/${pid}/stat`, "utf8").replace(/^.*\) /, "").split(" ")[1]) === process.pid;
    } catch {
      return false;
    }
  });
}

async function until(what: string, check: () => boolean, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Runtime directories a tskvm with this pid made and left. */
function runtimeDirsOf(pid: number): string[] {
  return readdirSync(tmpdir()).filter((n) => n.startsWith(`tskvm-${pid}-virtiofsd-`));
}

test("API: shares written by the guest and by the host, a read-only share, a virtiofsd killed mid-run", { skip, timeout: TEST_MS }, async () => {
  const rw = fresh("rw", { "from-host.txt": "written on the host\n" });
  const ro = fresh("ro", { "ro.txt": "read only\n" });
  const warnings: string[] = [];
  const vm = await startVm({ shares: [rw, { path: ro, readOnly: true }], onWarning: (w) => warnings.push(w) });
  try {
    await vm.ready({ timeoutMs: READY_MS });
    assert.deepEqual(vm.info.shares.map((s) => [s.tag, s.readOnly]), [["rw", false], ["ro", true]]);

    // The guest reads the host's file and writes its own, in the share as its cwd.
    let r = await vm.run("pwd; cat from-host.txt && echo 'written in the guest' > from-guest.txt && mkdir sub && echo x > sub/y", { cwd: rw });
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, `${rw}\nwritten on the host\n`);
    assert.equal(readFileSync(join(rw, "from-guest.txt"), "utf8"), "written in the guest\n", "on the host before the guest ends");
    assert.equal(readFileSync(join(rw, "sub", "y"), "utf8"), "x\n");

    // A file the host writes while the guest runs (names are cached for a second).
    writeFileSync(join(rw, "late.txt"), "late\n");
    r = await vm.run(`for i in $(seq 50); do [ -e ${rw}/late.txt ] && break; sleep 0.1; done; cat ${rw}/late.txt`);
    assert.equal(r.stdout, "late\n", r.stderr);

    // Read-only: refused, and still refused after the guest remounts it read-write (the
    // host enforces it).
    r = await vm.run(`cat ${ro}/ro.txt; touch ${ro}/x; echo "touch $?"; mount -o remount,rw ${ro}; touch ${ro}/y; echo "touch again $?"`);
    assert.match(r.stdout, /^read only\ntouch 1\ntouch again 1\n$/);
    assert.match(r.stderr, /Read-only file system/);
    assert.deepEqual(readdirSync(ro), ["ro.txt"]);

    // virtiofsd dies: one warning, I/O errors on that share, the VM carries on.
    const pid = ourVirtiofsd(rw);
    assert.ok(pid !== undefined, "virtiofsd serves the share");
    process.kill(pid, "SIGKILL");
    await until("the warning", () => warnings.length > 0);
    assert.equal(warnings.length, 1);
    assert.match(warnings[0]!, /^virtiofsd for share rw \(.*\/rw\) was killed by SIGKILL; the guest now gets I\/O errors there$/);
    r = await vm.run(`cat ${rw}/from-host.txt; echo "cat $?"; ls ${rw} > /dev/null; echo "ls $?"; cat ${ro}/ro.txt`, { timeoutMs: 120_000 });
    assert.match(r.stdout, /^cat 1\nls 1\nread only\n$/, r.stderr);
    assert.match(r.stderr, /Input\/output error/);
    assert.equal((await vm.run("echo alive")).stdout, "alive\n");
  } finally {
    await vm.poweroff();
  }
  await until("every virtiofsd to end", () => virtiofsdFor(rw).length + virtiofsdFor(ro).length === 0);
  assert.deepEqual(runtimeDirsOf(process.pid), []);
});

test("tskvm run --share . -- CMD runs in the current directory and leaves its results there", { skip, timeout: TEST_MS }, () => {
  const project = fresh("project", { "check.sh": "echo \"checking in $(pwd)\"\necho ok > results.txt\necho 'a warning' >&2\nexit 4\n" });
  const r = runCli(["run", "--ready-timeout", String(READY_MS / 1000), "--share", ".", "--", "sh", "check.sh"], {
    cwd: project,
    timeoutMs: READY_MS + 120_000,
  });
  assert.equal(r.status, 4, r.stderr);
  assert.equal(r.stdout, `checking in ${project}\n`);
  assert.equal(r.stderr, "a warning\n");
  assert.equal(readFileSync(join(project, "results.txt"), "utf8"), "ok\n");
  assert.deepEqual(virtiofsdFor(project), []);
});

test("tskvm run --rootfs host runs the host's python3 and returns its status; writes outside shares are thrown away", { skip, timeout: TEST_MS }, (t) => {
  if (!existsSync("/usr/bin/python3")) return t.skip("no /usr/bin/python3 on this host");
  const out = fresh("rootfs-out");
  const probe = `/etc/tskvm-rootfs-probe-${process.pid}`;
  const script = [
    "import sys, platform",
    `open(${JSON.stringify(probe)}, "w").write("thrown away")`,
    `open(${JSON.stringify(join(out, "kept.txt"))}, "w").write("kept")`,
    "print(sys.version_info[0], platform.system())",
    "sys.exit(7)",
  ].join("; ");
  const r = runCli(["run", "--ready-timeout", String(READY_MS / 1000), "--rootfs", "host", "--share", out, "--", "/usr/bin/python3", "-c", script], {
    timeoutMs: READY_MS + 300_000,
  });
  assert.equal(r.status, 7, r.stderr);
  assert.equal(r.stdout, "3 Linux\n");
  // A checkout under /tmp (the guest's own tmpfs there) runs the command in /, and says so.
  if (rootfsHostHides(process.cwd()) !== undefined) assert.match(r.stderr, /which the guest has as its own \(--rootfs host\): the command runs in \//);
  assert.equal(existsSync(probe), false, "the overlay took the write");
  assert.equal(readFileSync(join(out, "kept.txt"), "utf8"), "kept");
  assert.deepEqual(virtiofsdFor("/"), []);
});

test("a guest without MSI-X (pci=nomsi) gets virtiofsd's answers through INTx, relayed by tskvm", { skip, timeout: TEST_MS }, async () => {
  const share = fresh("intx", { "f.txt": "over INTx\n" });
  const vm = await startVm({ shares: [share], appendCmdline: "pci=nomsi" });
  try {
    await vm.ready({ timeoutMs: READY_MS });
    const r = await vm.run(`cat ${share}/f.txt && echo back > ${share}/g.txt && grep -c virtio /proc/interrupts; grep virtio /proc/interrupts`);
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /^over INTx\n/);
    assert.doesNotMatch(r.stdout, /PCI-MSI/, "no MSI in the guest");
    assert.match(r.stdout, /IO-APIC .*virtio/);
    assert.equal(readFileSync(join(share, "g.txt"), "utf8"), "back\n");
  } finally {
    await vm.poweroff();
  }
});

test("every exit path leaves no virtiofsd and no runtime directory: failed start, SIGTERM, SIGKILL, Ctrl-A x", { skip, timeout: TEST_MS }, async () => {
  const share = fresh("exits", { "f.txt": "f\n" });
  const gone = async (what: string, pid: number | undefined) => {
    await until(`${what}: no virtiofsd left`, () => virtiofsdFor(share).length === 0);
    if (pid !== undefined) assert.deepEqual(runtimeDirsOf(pid), [], `${what}: no runtime directory left`);
  };

  // The VM cannot be built after virtiofsd has started.
  const failed = runCli(["run", "--share", share, "--", "true"], { env: { TSKVM_KVM_DEVICE: join(dir, "no-kvm") } });
  assert.equal(failed.status, 4, failed.stderr);
  assert.match(failed.stderr, /^tskvm: .*no-kvm does not exist/);
  await gone("failed start", undefined);

  for (const signal of ["SIGTERM", "SIGKILL"] as const) {
    const cli = new RunningCli(["run", "-v", "--share", share, "--", "sleep", "600"]);
    await until(`${signal}: the VM running`, () => /tskvm: booting /.test(cli.stderr), READY_MS);
    assert.equal(virtiofsdFor(share).length > 0, true);
    cli.kill(signal);
    const exit = await cli.exited;
    if (signal === "SIGTERM") assert.equal(exit.code, 143, cli.stderr);
    else assert.equal(exit.signal, "SIGKILL");
    await gone(signal, cli.child.pid);
  }

  const boot = new RunningCli(["boot", "--share", share]);
  await boot.waitFor(/Linux version/, READY_MS);
  boot.send("\x01x");
  assert.equal((await boot.exited).code, 0, boot.stderr);
  await gone("Ctrl-A x", boot.child.pid);
});
