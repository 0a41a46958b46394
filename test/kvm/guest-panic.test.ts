/**
 * A guest whose kernel panics ends tskvm with its own status (8), never with the 0 of a
 * reboot: through pvpanic (port 0x505) at once, or, for guests that do not know the port
 * (Linux without ACPI), by "Kernel panic - not syncing" on the console before the reset
 * that panic=N asks for. Tiny guests assembled in test/helpers/guest-code.ts.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { longModeHello, pvpanicThenSpin } from "../helpers/guest-code";
import { makeElf } from "../helpers/images";
import { runTinyGuest } from "../helpers/machine";
import { runCli, scratchDir } from "../helpers/cli";
import { ExitCode } from "../../src/cli/exit-codes";
import { kvmSkip, scaled } from "../helpers/tiers";

const noKvm = kvmSkip();
const scratch = scratchDir("tskvm-panic-");
const KERNEL_AT = 0x100_0000;
const kernel = (name: string, code: Uint8Array) => {
  const p = join(scratch.dir, name);
  writeFileSync(p, makeElf({ segments: [{ paddr: KERNEL_AT, data: code }], entry: KERNEL_AT }));
  return p;
};
const raw = (code: Uint8Array) => ({ kind: "raw" as const, code, address: 0x100000, mode: "long" as const });
const PANIC_TEXT = "Kernel panic - not syncing: VFS: Unable to mount root fs\n";

test("a write of PANICKED to pvpanic ends the VM as a panic at once", { skip: noKvm, timeout: scaled(60_000) }, async () => {
  const { result, console } = await runTinyGuest({ cpus: 1, boot: raw(pvpanicThenSpin()) });
  assert.equal(console.toString("latin1"), "3", "the port offers PANICKED and CRASH_LOADED");
  assert.deepEqual(result.stop, { kind: "panic", reason: "guest kernel panicked (it said so through pvpanic)" });
});

test("\"Kernel panic\" on the console, then the reset panic=N asks for: the VM ends as a panic", { skip: noKvm, timeout: scaled(60_000) }, async () => {
  const { result, console } = await runTinyGuest({ cpus: 1, boot: raw(longModeHello(PANIC_TEXT)) });
  assert.equal(console.toString("latin1"), PANIC_TEXT);
  assert.equal(result.stop.kind, "panic");
  assert.match((result.stop as { reason: string }).reason, /^guest kernel panicked \("Kernel panic" on its console; then i8042 reset \(guest reboot\)\)$/);
});

test("a console that only talks about panics is no panic: the reset stays a reset", { skip: noKvm, timeout: scaled(60_000) }, async () => {
  const { result } = await runTinyGuest({ cpus: 1, boot: raw(longModeHello("Kernel panic - not syncin\nKernel: panic - not syncing\n")) });
  assert.equal(result.stop.kind, "reset");
});

test("tskvm boot exits 8 with one line for either kind of panic", { skip: noKvm, timeout: scaled(120_000) }, () => {
  const pv = runCli(["boot", "-k", kernel("pvpanic.elf", pvpanicThenSpin()), "-m", "32M"], { timeoutMs: scaled(60_000) });
  assert.equal(pv.status, ExitCode.GUEST_PANICKED, pv.stderr);
  assert.match(pv.stderr, /\ntskvm: guest kernel panicked \(it said so through pvpanic\)\n$/);
  const text = runCli(["boot", "-k", kernel("console-panic.elf", longModeHello(PANIC_TEXT)), "-m", "32M"], { timeoutMs: scaled(60_000) });
  assert.equal(text.status, ExitCode.GUEST_PANICKED, text.stderr);
  assert.equal(text.stdout, PANIC_TEXT);
  assert.match(text.stderr, /\ntskvm: guest kernel panicked \("Kernel panic" on its console; then i8042 reset \(guest reboot\)\)\n$/);
});
