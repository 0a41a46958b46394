/**
 * Tier 3: snapshots of the default guest with back ends that live in other processes,
 * re-attached on each restore: virtio-fs shares (a fresh virtiofsd on the directory as it
 * is now; the guest mounts the share after the restore, so it never sees a stale copy) and
 * user-mode networking (a fresh passt with the same forwards). A share the guest has used
 * cannot be snapshotted (its FUSE session lives in virtiofsd): one clear refusal, the VM
 * goes on. Nothing is left behind: no virtiofsd, no passt, no runtime directory.
 * Needs the default guest, virtiofsd and passt; each test says why it cannot run.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { startVm } from "../../src/api";
import { VmSnapshotError, VmStartError } from "../../src/api/errors";
import { guestSkip, scaled, virtiofsdSkip } from "../helpers/tiers";
import { freshDir, virtiofsdFor } from "../helpers/shares";
import { RunningCli, runCliAsync } from "../helpers/cli";
import { NetNs } from "../helpers/netns";
import { addUplink, passtProcesses, passtRuntimeDirs, passtSkipReason, testMark } from "../helpers/passt";

const TEST_MS = 1_800_000;
/** Boot to the agent's ready report: ~25-60 s on kvm-pvm, a few seconds on hardware KVM. */
const READY_MS = scaled(60_000);
const dir = mkdtempSync(join(tmpdir(), "tskvm-reattach-"));
process.on("exit", () => rmSync(dir, { recursive: true, force: true }));
const guest = guestSkip();
const shareSkip = guest.skip || virtiofsdSkip();

const fresh = (name: string, files: Record<string, string> = {}): string => freshDir(dir, name, files);

/** Runtime directories (virtiofsd's, passt's) that tskvm process `pid` made and left. */
function runtimeDirsOf(pid: number | undefined): string[] {
  if (pid === undefined) return [];
  return [...readdirSync(tmpdir()).filter((n) => n.startsWith(`tskvm-${pid}-`)), ...passtRuntimeDirs(pid)];
}

/** `tskvm run -v --snapshot CACHE ARGS -- sh -c SCRIPT` in `cwd`, to completion (its pid for the leftovers check). */
function run(cache: string, args: string[], script: string, opts: { cwd?: string; wrapper?: string[]; env?: Record<string, string> } = {}) {
  const started = Date.now();
  const argv = [...(opts.wrapper ?? []), process.execPath, join(__dirname, "..", "..", "..", "bin", "tskvm"), "run", "-v", "--ready-timeout", String(READY_MS / 1000), "--snapshot", cache, ...args, "--", "sh", "-c", script];
  const r = spawnSync(argv[0]!, argv.slice(1), { encoding: "utf8", timeout: READY_MS + 300_000, ...(opts.cwd !== undefined ? { cwd: opts.cwd } : {}), env: { ...process.env, ...opts.env } });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr, pid: r.pid, ms: Date.now() - started };
}

test("run --snapshot --share: each restore sees the directory as it is now, writes reach the host, read-only holds", { skip: shareSkip, timeout: TEST_MS }, (t) => {
  const cache = join(dir, "cache-share");
  const work = fresh("work", { "which.txt": "written before the snapshot\n" });
  const ro = fresh("ro", { "ro.txt": "read only\n" });
  const args = ["--share", ".", "--share", `${ro},readonly`];

  const cold = run(cache, args, "pwd; cat which.txt; echo cold > from-guest-cold.txt", { cwd: work });
  t.diagnostic(`cold run (boot, snapshot, mount, command): ${cold.ms} ms`);
  assert.equal(cold.status, 0, cold.stderr);
  assert.match(cold.stderr, /snapshot saved to /);
  assert.equal(cold.stdout, `${work}\nwritten before the snapshot\n`, "the command runs in the share, mounted after the snapshot");
  assert.equal(readFileSync(join(work, "from-guest-cold.txt"), "utf8"), "cold\n");

  for (const round of [1, 2]) {
    // Written after the snapshot, and different each run: a stale copy would show.
    writeFileSync(join(work, "which.txt"), `written for warm run ${round}\n`);
    writeFileSync(join(work, `new-${round}.txt`), `new file ${round}\n`);
    const warm = run(cache, args, `pwd; cat which.txt new-${round}.txt; echo warm ${round} > from-guest-${round}.txt; touch ${ro}/x; echo "touch $?"; cat ${ro}/ro.txt`, { cwd: work });
    t.diagnostic(`warm run ${round} (restore, virtiofsd, mount, command): ${warm.ms} ms`);
    assert.equal(warm.status, 0, warm.stderr);
    assert.match(warm.stderr, /restored from /);
    assert.equal(warm.stdout, `${work}\nwritten for warm run ${round}\nnew file ${round}\ntouch 1\nread only\n`, warm.stderr);
    assert.match(warm.stderr, /Read-only file system/, "the read-only share refuses writes after the restore");
    assert.equal(readFileSync(join(work, `from-guest-${round}.txt`), "utf8"), `warm ${round}\n`, "the guest's write is on the host");
    assert.deepEqual(readdirSync(ro), ["ro.txt"]);
    assert.deepEqual(virtiofsdFor(work), [], "no virtiofsd left");
    assert.deepEqual(virtiofsdFor(ro), [], "no virtiofsd left");
    assert.deepEqual(runtimeDirsOf(warm.pid), [], "no runtime directory left");
  }
  assert.equal(readdirSync(cache).filter((e) => !e.startsWith(".")).length, 1, "one snapshot for the option set");
});

test("API: a share the guest has used is refused with one line and the VM goes on; one snapshotted before restores onto another directory", { skip: shareSkip, timeout: TEST_MS }, async () => {
  const a = fresh("api-a", { "f.txt": "from a\n" });
  const b = fresh("api-b", { "f.txt": "from b\n" });
  const early = join(dir, "api-early");
  const late = join(dir, "api-late");
  const vm = await startVm({ shares: [a], mountShares: false, buildGuest: false });
  try {
    await vm.ready({ timeoutMs: READY_MS });
    await vm.snapshot(early);
    assert.deepEqual(await vm.mountShares(), []);
    assert.equal((await vm.run(`cat ${a}/f.txt`)).stdout, "from a\n");
    await assert.rejects(
      vm.snapshot(late),
      (e: unknown) => e instanceof VmSnapshotError && e.kind === "state" && /^the guest has used share api-a \(its FUSE session lives in virtiofsd, which a snapshot cannot keep\): snapshot before the guest mounts it \(mountShares: false\)$/.test(e.message),
    );
    assert.ok(!existsSync(late), "nothing written");
    // Paused and resumed for the refused snapshot: the share (virtiofsd's queues stopped and
    // started again) and the VM go on.
    writeFileSync(join(a, "g.txt"), "after the pause\n");
    const r = await vm.run(`cat ${a}/f.txt; for i in $(seq 50); do [ -e ${a}/g.txt ] && break; sleep 0.1; done; cat ${a}/g.txt`);
    assert.equal(r.stdout, "from a\nafter the pause\n", r.stderr);
  } finally {
    await vm.stop();
  }

  // Shares that are not the snapshot's: a bad option, one line, nothing started.
  for (const [shares, pattern] of [
    [[a, b], /^snapshot .*api-early has 1 share; 2 shares were given$/],
    [[`${b},tag=other`], /^snapshot .*api-early has share api-a in place 1: give shares with its tag and read-only flag, or none$/],
    [[`${b},readonly`], /^snapshot .*api-early has share api-a in place 1: give shares with its tag and read-only flag, or none$/],
  ] as const) {
    await assert.rejects(startVm({ restore: early, shares: [...shares] }), (e: unknown) => e instanceof VmStartError && e.failure === "options" && pattern.test(e.message));
  }
  assert.deepEqual(virtiofsdFor(b), []);

  const restored = await startVm({ restore: early, shares: [b] });
  try {
    const ready = await restored.ready({ timeoutMs: READY_MS });
    assert.deepEqual(ready.unmounted, []);
    assert.deepEqual(restored.info.shares, [{ hostPath: b, tag: "api-a", readOnly: false }]);
    const r = await restored.run("cat f.txt; echo restored > w.txt", { cwd: b });
    assert.equal(r.stdout, "from b\n", r.stderr);
    assert.equal(readFileSync(join(b, "w.txt"), "utf8"), "restored\n");
  } finally {
    await restored.stop();
  }
  assert.deepEqual([...virtiofsdFor(a), ...virtiofsdFor(b)], []);
  assert.deepEqual(runtimeDirsOf(process.pid), []);
});

test("run --snapshot --net user: the restored guest fetches from the host over a fresh passt and answers SSH on the port reported", { skip: guest.skip, timeout: TEST_MS }, async (t) => {
  const passtSkip = passtSkipReason();
  if (passtSkip !== undefined) return t.skip(passtSkip);
  if (spawnSync("busybox", ["--help"]).error !== undefined) return t.skip("busybox is not installed (Debian: busybox-static), for the HTTP server");
  if (spawnSync("dbclient", ["-h"]).error !== undefined) return t.skip("dbclient is not installed (Debian: dropbear-bin)");
  const key = guest.guest!.sshKeyDropbear;
  assert.ok(key !== undefined, "the guest build provides a dropbear key");
  const ns = NetNs.create("snapuser");
  addUplink(ns, "10.0.2.15", 24, "10.0.2.2");
  const www = fresh("www");
  const httpPort = 20000 + (process.pid % 20000);
  const httpd = spawn("ip", ["netns", "exec", ns.name, "busybox", "httpd", "-f", "-p", `127.0.0.1:${httpPort}`, "-h", www], { stdio: "ignore" });
  const mark = testMark();
  const wrapper = ["ip", "netns", "exec", ns.name];
  const cache = join(dir, "cache-user");
  const fetch = `wget -q -O - http://10.0.2.2:${httpPort}/hello.txt`;
  try {
    writeFileSync(join(www, "hello.txt"), "before the snapshot\n");
    const cold = await runCliAsync(["run", "-v", "--ready-timeout", String(READY_MS / 1000), "--snapshot", cache, "--net", "user", "--", "sh", "-c", fetch], {
      timeoutMs: READY_MS + 300_000,
      wrapper,
      env: mark.env,
    });
    t.diagnostic(`cold run: ${cold.ms} ms`);
    assert.equal(cold.status, 0, cold.stderr);
    assert.match(cold.stderr, /snapshot saved to /);
    assert.equal(cold.stdout, "before the snapshot\n");
    assert.deepEqual(passtProcesses(mark.value), [], "no passt left");

    // The warm guest first waits for an SSH login through the forward the restore reports,
    // sending nothing itself (the restore's nudge must have taught the fresh passt where the
    // guest is), then fetches a file written after the snapshot.
    writeFileSync(join(www, "hello.txt"), "after the snapshot\n");
    const warm = new RunningCli(
      ["run", "-v", "--ready-timeout", String(READY_MS / 1000), "--snapshot", cache, "--net", "user", "--", "sh", "-c",
        `echo waiting; i=0; while [ ! -e /tmp/ssh-was-here ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done; cat /tmp/ssh-was-here; ${fetch}`],
      mark.env,
      wrapper,
    );
    try {
      await warm.waitFor(/waiting\n/, READY_MS);
      assert.match(warm.stderr, /restored from /);
      const port = Number(/log in with: ssh -p (\d+)/.exec(warm.stderr)![1]);
      const ssh = ns.exec(["timeout", "120", "dbclient", "-y", "-y", "-i", key!, "-p", String(port), "root@127.0.0.1", "echo logged-in > /tmp/ssh-was-here; echo ssh-ok"], { allowFail: true });
      assert.equal(ssh.status, 0, ssh.stderr);
      assert.equal(ssh.stdout, "ssh-ok\n");
      const exit = await warm.exited;
      t.diagnostic(`warm run: ${Date.now() - warm.startedAt} ms`);
      assert.equal(exit.code, 0, warm.stderr);
      assert.equal(warm.stdout, "waiting\nlogged-in\nafter the snapshot\n");
      assert.deepEqual(passtProcesses(mark.value), [], "no passt left");
      assert.deepEqual(runtimeDirsOf(warm.child.pid), [], "no runtime directory left");
      assert.equal(ns.exec(["ss", "-Htln", `sport = :${port}`]).stdout.trim(), "", "the SSH port is closed");
    } finally {
      warm.kill();
    }
  } finally {
    httpd.kill();
    ns.destroy();
  }
});
