/**
 * The snapshot parts of the command line and of the agent protocol: --restore and
 * --snapshot parsing, Ctrl-A p, the guest-side commands around a snapshot.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { UsageError, parseBootArgs, parseRunArgs } from "../../src/cli/args";
import { EscapeParser } from "../../src/cli/console";
import { diskName, mountedDisks, restorePrepareCommand } from "../../src/api/protocol";

test("tskvm boot --restore DIR takes -d and nothing else that shapes the machine", () => {
  assert.equal(parseBootArgs(["--restore", "/s"]).restore, "/s");
  assert.deepEqual(parseBootArgs(["--restore", "/s", "-d", "t.img"]).disks, ["t.img"]);
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
});
