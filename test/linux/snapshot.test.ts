/**
 * Tier 3: snapshots of the default Linux guest. `tskvm run --snapshot DIR` boots once and
 * snapshots the ready guest; later runs restore it, each from the same clean state, with a
 * per-run test disk as it is now, the guest's clock right, 1 and 2 vCPUs, the network
 * working. Every bad snapshot is refused with one line and status 3, nothing started.
 * Without a built guest the tests say so (and fail when TSKVM_REQUIRE_GUEST=1, as in CI).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { chmodSync, cpSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, truncateSync, utimesSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createHash } from "node:crypto";
import { guestSkip, scaled } from "../helpers/tiers";
import { findMkfsExt4 } from "../../src/api/disk";
import { makeDiskImage, startVm } from "../../src/api";
import { runCli, TSKVM_BIN } from "../helpers/cli";
import { NetNs, netTestSkipReason } from "../helpers/netns";

const { skip } = guestSkip();
/** Boot to the agent's ready report: ~25 s on kvm-pvm, ~15 s in the harness VM, a few seconds on hardware KVM. */
const READY_MS = scaled(60_000);
const TEST_MS = 1_800_000;
const dir = mkdtempSync(join(tmpdir(), "tskvm-snapshot-linux-"));
process.on("exit", () => rmSync(dir, { recursive: true, force: true }));

/** `tskvm run --snapshot CACHE ARGS -- sh -c SCRIPT`, timed. */
function run(cache: string, args: string[], script: string, wrapper: string[] = []) {
  const started = Date.now();
  const argv = [...wrapper, process.execPath, TSKVM_BIN, "run", "-v", "--ready-timeout", String(READY_MS / 1000), "--snapshot", cache, ...args, "--", "sh", "-c", script];
  const r = spawnSync(argv[0]!, argv.slice(1), { encoding: "utf8", timeout: READY_MS + 300_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr, ms: Date.now() - started };
}

/** The one snapshot directory in a cache, and a fingerprint of its files. */
function cacheEntry(cache: string): { dir: string; fingerprint: string } {
  const entries = readdirSync(cache).filter((e) => !e.startsWith("."));
  assert.equal(entries.length, 1, `cache holds ${entries.join(", ")}`);
  const d = join(cache, entries[0]!);
  const h = createHash("sha256");
  for (const f of readdirSync(d).sort()) {
    const st = statSync(join(d, f));
    h.update(`${f} ${st.size} ${st.mtimeMs}\n`);
    h.update(readFileSync(join(d, f)));
  }
  return { dir: d, fingerprint: h.digest("hex") };
}

test("run --snapshot: boot once; each restore runs its command from the same clean state, with this run's disk and the right time", { skip, timeout: TEST_MS }, async (t) => {
  if (findMkfsExt4() === undefined) return t.skip("mkfs.ext4 (e2fsprogs) is not installed");
  const cache = join(dir, "cache-1");
  const src = join(dir, "tree");
  mkdirSync(src, { recursive: true });
  writeFileSync(join(src, "which"), "first\n");
  const img = join(dir, "tests.img");
  await makeDiskImage(src, img);

  const cold = run(cache, ["-d", img], "echo cold > /tmp/mark; mount -o ro /dev/vda /mnt && cat /mnt/which");
  t.diagnostic(`cold run (boot, snapshot, command): ${cold.ms} ms`);
  assert.equal(cold.status, 0, cold.stderr);
  assert.equal(cold.stdout, "first\n");
  assert.match(cold.stderr, /snapshot saved to /);
  const before = cacheEntry(cache);

  // This run's tree is another: new contents, another size.
  writeFileSync(join(src, "which"), "second\n");
  writeFileSync(join(src, "more"), "x".repeat(100_000));
  await makeDiskImage(src, img, { force: true, sizeBytes: 96 * 1024 * 1024 });

  for (const round of [1, 2]) {
    const hostBefore = Math.floor(Date.now() / 1000);
    const warm = run(cache, ["-d", img], `test ! -e /tmp/mark && echo clean; mount -o ro /dev/vda /mnt && cat /mnt/which; date +%s; echo ${round} > /tmp/mark`);
    const hostAfter = Math.ceil(Date.now() / 1000);
    t.diagnostic(`warm run ${round} (restore, command): ${warm.ms} ms`);
    assert.equal(warm.status, 0, warm.stderr);
    assert.match(warm.stderr, /restored from /);
    const [clean, which, date] = warm.stdout.split("\n");
    assert.equal(clean, "clean", "the restored guest saw an earlier run's file");
    assert.equal(which, "second", "the restored guest read a stale copy of the disk");
    const guestTime = Number(date);
    assert.ok(guestTime >= hostBefore - 2 && guestTime <= hostAfter + 2, `guest time ${guestTime}, host ${hostBefore}..${hostAfter}`);
  }
  assert.equal(cacheEntry(cache).fingerprint, before.fingerprint, "a run changed the snapshot");
});

test("run --snapshot with 2 vCPUs: the restored guest has both, and they work", { skip, timeout: TEST_MS }, (t) => {
  const cache = join(dir, "cache-2");
  const cold = run(cache, ["-c", "2"], "nproc");
  assert.equal(cold.status, 0, cold.stderr);
  assert.equal(cold.stdout, "2\n");
  // Work on both CPUs at once, and time that moves on: uptime grows across two reads.
  const warm = run(cache, ["-c", "2"], "nproc; (i=0; while [ $i -lt 2000 ]; do i=$((i+1)); done) & (i=0; while [ $i -lt 2000 ]; do i=$((i+1)); done) & wait; cut -d' ' -f1 /proc/uptime; sleep 1; cut -d' ' -f1 /proc/uptime");
  t.diagnostic(`cold ${cold.ms} ms, warm ${warm.ms} ms`);
  assert.equal(warm.status, 0, warm.stderr);
  const [nproc, up1, up2] = warm.stdout.trim().split("\n");
  assert.equal(nproc, "2");
  const step = Number(up2) - Number(up1);
  assert.ok(step >= 0.9 && step < 30, `uptime went from ${up1} to ${up2}`);
});

test("run --snapshot with a TAP: the network works after a restore", { skip, timeout: TEST_MS }, (t) => {
  const skip = netTestSkipReason();
  if (skip !== undefined) return t.skip(skip);
  const ns = NetNs.create("snap");
  try {
    const cache = join(dir, "cache-net");
    const args = ["-t", "tap0", "--tap-ip", "192.168.100.1/24", "--guest-ip", "192.168.100.2"];
    const wrapper = ["ip", "netns", "exec", ns.name];
    const cold = run(cache, args, "ping -c 1 -W 5 192.168.100.1 >/dev/null && echo reachable", wrapper);
    assert.equal(cold.status, 0, cold.stderr);
    assert.equal(cold.stdout, "reachable\n");
    const warm = run(cache, args, "ping -c 1 -W 5 192.168.100.1 >/dev/null && echo reachable again", wrapper);
    t.diagnostic(`cold ${cold.ms} ms, warm ${warm.ms} ms`);
    assert.equal(warm.status, 0, warm.stderr);
    assert.equal(warm.stdout, "reachable again\n");
  } finally {
    ns.destroy();
  }
});

/** A snapshot of the default guest made through the API, with a disk the guest has mounted. */
async function apiSnapshot(t: { diagnostic: (s: string) => void }): Promise<{ snap: string; img: string }> {
  const img = join(dir, "pinned.img");
  const src = join(dir, "pinned-tree");
  mkdirSync(src, { recursive: true });
  writeFileSync(join(src, "f"), "pinned\n");
  await makeDiskImage(src, img);
  const snap = join(dir, "api-snap");
  const vm = await startVm({ disks: [img], buildGuest: false });
  try {
    await vm.ready({ timeoutMs: READY_MS });
    assert.equal((await vm.run("mount /dev/vda /mnt")).status, 0);
    const info = await vm.snapshot(snap);
    t.diagnostic(`API snapshot: ${info.ramDataBytes} of ${info.ramBytes} RAM bytes stored (touched ${info.ramTouchedBytes}), paused ${info.pausedMs} ms`);
    assert.ok(info.ramDataBytes <= info.ramTouchedBytes, "stored more RAM than the guest touched");
    assert.deepEqual(info.detachedDisks, [false]);
    // The VM went on after the snapshot.
    assert.equal((await vm.run("cat /mnt/f")).stdout, "pinned\n");
  } finally {
    await vm.stop();
  }
  return { snap, img };
}

test("bad snapshots are refused with one line and status 3, nothing started; a restore that works goes on", { skip, timeout: TEST_MS }, async (t) => {
  if (findMkfsExt4() === undefined) return t.skip("mkfs.ext4 (e2fsprogs) is not installed");
  const { snap, img } = await apiSnapshot(t);

  // The good one, through the API: the agent is ready at once, the disk still mounted.
  const vm = await startVm({ restore: snap });
  try {
    assert.equal((await vm.run("cat /mnt/f")).stdout, "pinned\n");
  } finally {
    await vm.stop();
  }

  const bad = (name: string, damage: (d: string) => void): string => {
    const d = join(dir, `bad-${name}`);
    cpSync(snap, d, { recursive: true });
    for (const f of readdirSync(d)) chmodSync(join(d, f), 0o644);
    damage(d);
    return d;
  };
  const rewrite = (d: string, edit: (env: { tskvm: string; checksum: string; body: { host: { cpuVendor: string } } }) => void, keepChecksum = false) => {
    const path = join(d, "snapshot.json");
    const env = JSON.parse(readFileSync(path, "utf8"));
    edit(env);
    if (!keepChecksum) env.checksum = "sha256:" + createHash("sha256").update(JSON.stringify(env.body)).digest("hex");
    writeFileSync(path, JSON.stringify(env));
  };
  const cases: [string, string, RegExp][] = [
    ["truncated", bad("truncated", (d) => truncateSync(join(d, "snapshot.json"), 1000)), /is corrupted: snapshot.json is truncated or not JSON/],
    ["corrupted", bad("corrupted", (d) => rewrite(d, (e) => (e.body.host.cpuVendor += "x"), true)), /is corrupted: its checksum does not match its contents/],
    ["RAM truncated", bad("ram", (d) => truncateSync(join(d, "memory.ram"), 4096)), /is corrupted: its RAM file holds 4096 bytes/],
    ["foreign", bad("foreign", (d) => writeFileSync(join(d, "snapshot.json"), JSON.stringify({ format: "something else" }))), /is not a tskvm snapshot/],
    ["another version", bad("version", (d) => rewrite(d, (e) => (e.tskvm = "0.0.1"))), /was made by tskvm 0\.0\.1 .*make the snapshot again/],
    ["another host", bad("host", (d) => rewrite(d, (e) => (e.body.host.cpuVendor = e.body.host.cpuVendor === "GenuineIntel" ? "AuthenticAMD" : "GenuineIntel"))), /cannot run on this host: it was made on a .* CPU, this host has/],
    ["missing", join(dir, "no-such-snapshot"), /no snapshot at .*: it does not exist/],
  ];
  for (const [what, d, pattern] of cases) {
    const started = Date.now();
    const r = runCli(["boot", "--restore", d], { timeoutMs: 60_000 });
    t.diagnostic(`${what}: refused in ${Date.now() - started} ms`);
    assert.equal(r.status, 3, `${what}: ${r.stderr}`);
    assert.match(r.stderr, pattern, what);
    assert.match(r.stderr, /^tskvm: [^\n]*\n$/, `${what}: one line`);
    assert.equal(r.stdout, "", `${what}: the guest ran`);
  }

  // A disk the guest had mounted must not change under it.
  utimesSync(img, new Date(), new Date(Date.now() + 60_000));
  const changed = runCli(["boot", "--restore", snap], { timeoutMs: 60_000 });
  assert.equal(changed.status, 3, changed.stderr);
  assert.match(changed.stderr, /^tskvm: disk image .*pinned\.img is not as snapshot .* saw it \(it was written since\), and the guest holds parts of it in memory: make the snapshot again\n$/);

  // A snapshot directory that cannot be written: one line, and the command still runs.
  writeFileSync(join(dir, "a-file"), "");
  const unwritable = run(join(dir, "a-file", "cache"), [], "echo still ran");
  assert.equal(unwritable.status, 0, unwritable.stderr);
  assert.equal(unwritable.stdout, "still ran\n");
  assert.match(unwritable.stderr, /tskvm: cannot write a snapshot to .*; running without a snapshot\n/);
});
