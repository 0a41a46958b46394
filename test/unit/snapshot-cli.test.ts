/**
 * The snapshot parts of the command line and of the agent protocol: --restore and
 * --snapshot parsing, Ctrl-A p, the guest-side commands around a snapshot.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { UsageError, parseBootArgs, parseRunArgs } from "../../src/cli/args";
import { EscapeParser } from "../../src/cli/console";
import { NETWORK_NUDGE_COMMAND, diskName, mountedDisks, restorePrepareCommand, unmountedShares } from "../../src/api/protocol";

test("tskvm boot --restore DIR takes -d and --share and nothing else that shapes the machine", () => {
  assert.equal(parseBootArgs(["--restore", "/s"]).restore, "/s");
  assert.deepEqual(parseBootArgs(["--restore", "/s", "-d", "t.img"]).disks, ["t.img"]);
  assert.deepEqual(parseBootArgs(["--restore", "/s", "--share", "/w"]).shares, ["/w"]);
  assert.throws(() => parseBootArgs(["--restore", "/s", "--net", "user"]), /leave out -n/);
  assert.throws(() => parseBootArgs(["--restore", "/s", "-m", "1G", "-c", "2"]), (e: unknown) => e instanceof UsageError && /leave out -m, -c/.test(e.message));
  assert.throws(() => parseBootArgs(["--restore", ""]), /--restore needs a snapshot directory/);
  assert.equal(parseBootArgs([]).restore, undefined);
});

test("tskvm run --snapshot DIR; run takes no --restore", () => {
  assert.equal(parseRunArgs(["--snapshot", "/cache", "--", "true"]).snapshotDir, "/cache");
  assert.equal(parseRunArgs(["--", "true"]).snapshotDir, undefined);
  assert.throws(() => parseRunArgs(["--snapshot", " ", "--", "true"]), /--snapshot needs a directory/);
  assert.throws(() => parseRunArgs(["--restore", "/s", "--", "true"]), UsageError);
});

test("Ctrl-A p pauses (and resumes) the VM", () => {
  const p = new EscapeParser();
  assert.deepEqual(p.feed(Uint8Array.of(0x61, 0x01, 0x70, 0x62)), { forward: Uint8Array.of(0x61, 0x62), actions: ["pause"] });
});

test("the guest-side commands around a snapshot", () => {
  assert.equal(diskName(0), "vda");
  assert.equal(diskName(2), "vdc");
  assert.deepEqual([...mountedDisks("mounted vdb\nnoise\nmounted vda\n")].sort(), [0, 1]);
  const cmd = restorePrepareCommand(1_700_000_000.6, [{ index: 1, sectors: 2048 }]);
  assert.match(cmd, /^date -u -s @1700000001 >\/dev\/null; /);
  assert.match(cmd, /cat \/sys\/block\/vdb\/size\)" != 2048 \]/);
  assert.match(cmd, /blockdev --rereadpt \/dev\/vdb/);
  assert.match(cmd, /; true$/);
  assert.doesNotMatch(cmd, /mount|ping/, "no shares to mount, no network to nudge");
});

test("after a restore: the shares are mounted (a failure reported by tag), the network nudged", () => {
  const cmd = restorePrepareCommand(1_700_000_000, [], {
    mounts: [{ tag: "src", command: "mkdir -p -- /w && mount -t virtiofs -o rw src /w" }, { tag: "ro", command: "false" }],
    nudgeNetwork: true,
  });
  assert.match(cmd, /\{ mkdir -p -- \/w && mount -t virtiofs -o rw src \/w; \} >\/dev\/null 2>&1 \|\| echo tskvm-unmounted src; /);
  assert.ok(cmd.includes(NETWORK_NUDGE_COMMAND));
  assert.match(cmd, /; true$/);
  assert.deepEqual(unmountedShares("noise\ntskvm-unmounted ro\ntskvm-unmounted src-2\n"), ["ro", "src-2"]);
  assert.deepEqual(unmountedShares(""), []);
});
