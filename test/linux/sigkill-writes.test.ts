/**
 * Tier 3: tskvm killed with SIGKILL while the guest writes. The guest writes numbered
 * records to its raw disk, each flushed (dd conv=fsync: a FLUSH request after the write)
 * before it prints the record's number; every number the test saw must be in the image
 * afterwards. (What the guest saw completed went to the file with pwrite before the used
 * ring said so; a killed process loses none of that.)
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { openSync, closeSync, ftruncateSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { RunningCli, scratchDir } from "../helpers/cli";
import { guestSkip, scaled } from "../helpers/tiers";

const { skip } = guestSkip();
const READY_MS = scaled(60_000);
const scratch = scratchDir("tskvm-sigkill-");
const RECORDS_BEFORE_KILL = 20;

const WRITER = [
  "i=0",
  "while [ $i -lt 100000 ]; do",
  "  i=$((i+1))",
  "  printf 'tskvm-record %08d\\n' $i | dd of=/dev/vda bs=512 seek=$i conv=sync,notrunc,fsync 2>/dev/null || exit 9",
  "  echo $i",
  "done",
].join("\n");

test("SIGKILL while the guest writes flushed records: every record it saw completed is in the image", { skip, timeout: READY_MS + 300_000 }, async () => {
  const image = join(scratch.dir, "records.img");
  const fd = openSync(image, "w");
  ftruncateSync(fd, 64 * 1024 * 1024);
  closeSync(fd);
  const vm = new RunningCli(["run", "--ready-timeout", String(READY_MS / 1000), "-d", image, "--", "sh", "-c", WRITER]);
  try {
    await vm.waitFor(new RegExp(`(^|\\n)${RECORDS_BEFORE_KILL}\\n`), READY_MS + 120_000);
    vm.kill("SIGKILL");
    const exit = await vm.exited;
    assert.equal(exit.signal, "SIGKILL");
  } finally {
    vm.kill("SIGKILL");
  }
  // Only whole lines: the number being printed as the kill came may be cut short.
  const acked = vm.stdout.split("\n").slice(0, -1).map(Number);
  assert.ok(acked.length >= RECORDS_BEFORE_KILL, vm.stdout);
  assert.deepEqual(acked, acked.map((_, i) => i + 1), "records are acknowledged in order");
  const disk = readFileSync(image);
  for (const n of acked) {
    const want = `tskvm-record ${String(n).padStart(8, "0")}\n`;
    assert.equal(disk.subarray(n * 512, n * 512 + want.length).toString("latin1"), want, `record ${n}`);
  }
});
