/**
 * Tier 2: pause, snapshot and restore of a whole Machine (vCPU threads, devices, RAM file),
 * with a tiny guest that counts in memory and in a device register and prints the count.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Machine } from "../../src/vmm/machine";
import { RAM_FILE, SnapshotError, readSnapshotDir } from "../../src/vmm/snapshot/format";
import { COUNTER_ADDRESS, counterWithDevice } from "../helpers/guest-code";

const noKvm = existsSync("/dev/kvm") ? false : "no /dev/kvm on this host";
const VERSION = "test";
const MEMORY = 64 * 1024 * 1024;

/** Wait until `ok()` or fail after `ms`. */
async function until(ok: () => boolean, ms: number, what: string): Promise<void> {
  const end = Date.now() + ms;
  while (!ok()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

function scratchRegister(m: Machine): number {
  const b = new Uint8Array(1);
  m.devices.pio.read(0x3f8 + 7, b);
  return b[0]!;
}

/** Bytes printed so far in a console file. */
const consoleOf = (path: string): Buffer => readFileSync(path);

test("a paused machine's snapshot restores twice, each time going on from the same point", { skip: noKvm, timeout: 180_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "tskvm-snapshot-"));
  const snapDir = join(dir, "snap");
  try {
    const console1 = join(dir, "console1");
    const fd1 = openSync(console1, "w");
    let printed: number;
    let count: bigint;
    let scr: number;
    const m1 = Machine.create({
      memoryBytes: MEMORY,
      cpus: 2,
      consoleFd: fd1,
      boot: { kind: "raw", code: counterWithDevice(), address: 0x100000, mode: "long" },
    });
    let running: Promise<unknown> | undefined;
    try {
      running = m1.run();
      await until(() => statSync(console1).size >= 300, 60_000, "the guest to count to 300");
      await m1.pause();
      assert.equal(m1.isPaused, true);
      // Parked: nothing moves any more, and memory, the device register and the console agree.
      printed = consoleOf(console1).length;
      await new Promise((r) => setTimeout(r, 200));
      assert.equal(consoleOf(console1).length, printed, "the guest ran while paused");
      // The guest is parked at some instruction of its loop (inc memory; copy it to the
      // register; print it), so memory, register and console are each at most one step
      // apart: printed <= register <= memory <= printed + 1.
      count = m1.memory.readU64(COUNTER_ADDRESS);
      scr = scratchRegister(m1);
      assert.ok(count === BigInt(printed) || count === BigInt(printed) + 1n, `counter ${count}, console ${printed}`);
      assert.ok(scr === printed % 256 || scr === Number(count % 256n), `register ${scr}, counter ${count}, console ${printed}`);
      const written = m1.snapshot(snapDir, { tskvmVersion: VERSION });
      assert.ok(written.ram.dataBytes < MEMORY / 4, `snapshot RAM data ${written.ram.dataBytes} bytes: zero pages must be holes`);
      assert.equal(statSync(join(snapDir, RAM_FILE)).size, MEMORY);
      // Resumed, the original goes on too.
      m1.resume();
      await until(() => consoleOf(console1).length > printed + 50, 60_000, "the resumed guest to go on");
      m1.stop("test");
      await running;
    } finally {
      // Also when an assertion failed with the machine paused: its vCPU threads must end.
      m1.stop("test");
      await running;
      m1.destroy();
      closeSync(fd1);
    }
    const first = consoleOf(console1);
    for (let i = 1; i < first.length; i++) assert.equal(first[i], (first[i - 1]! + 1) & 0xff, `the count skipped at byte ${i} across pause/resume`);

    const runs: Buffer[] = [];
    for (const round of [1, 2]) {
      const path = join(dir, `console-restored-${round}`);
      const fd = openSync(path, "w");
      const m = Machine.restore({ snapshot: readSnapshotDir(snapDir, { tskvmVersion: VERSION }), consoleFd: fd });
      let running: Promise<unknown> | undefined;
      try {
        assert.equal(m.boot.restoredFrom, snapDir);
        // Restored but not yet running: RAM and the device register are as saved.
        assert.equal(m.memory.readU64(COUNTER_ADDRESS), count);
        assert.equal(scratchRegister(m), scr);
        running = m.run();
        await until(() => statSync(path).size >= 100, 60_000, `restored guest ${round} to count on`);
        m.stop("test");
        await running;
        assert.ok(m.memory.readU64(COUNTER_ADDRESS) > count);
      } finally {
        m.stop("test");
        await running;
        m.destroy();
        closeSync(fd);
      }
      runs.push(consoleOf(path));
    }
    for (const [round, out] of runs.entries()) {
      assert.equal(out[0], (printed + 1) & 0xff, `restore ${round + 1} did not go on from the saved count`);
      for (let i = 1; i < out.length; i++) assert.equal(out[i], (out[i - 1]! + 1) & 0xff, `restore ${round + 1} skipped at byte ${i}`);
    }
    // The snapshot's RAM was never written by the restored guests.
    assert.equal(readFileSync(join(snapDir, RAM_FILE)).readBigUInt64LE(COUNTER_ADDRESS), count);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a snapshot of a running (not paused) machine is refused; pause and resume are idempotent", { skip: noKvm, timeout: 60_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "tskvm-snapshot-"));
  const fd = openSync(join(dir, "console"), "w");
  const m = Machine.create({ memoryBytes: MEMORY, cpus: 1, consoleFd: fd, boot: { kind: "raw", code: counterWithDevice(), address: 0x100000, mode: "long" } });
  try {
    const running = m.run();
    assert.throws(() => m.snapshot(join(dir, "s"), { tskvmVersion: VERSION }), (e: unknown) => e instanceof SnapshotError && e.kind === "state");
    await Promise.all([m.pause(), m.pause()]);
    await m.pause();
    m.resume();
    m.resume();
    assert.equal(m.isPaused, false);
    m.stop("test");
    await running;
    await assert.rejects(m.pause(), (e: unknown) => e instanceof SnapshotError && /not running/.test(e.message));
  } finally {
    m.destroy();
    closeSync(fd);
    rmSync(dir, { recursive: true, force: true });
  }
});
