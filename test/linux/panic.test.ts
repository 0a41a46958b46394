/**
 * Tier 3: the default guest's kernel panics (its init cannot be found), and tskvm says so
 * with its own status, 8, in `tskvm boot` and `tskvm run`, instead of taking the reboot
 * that panic=N asks for as a clean end (status 0) or the guest's going away as status 7.
 * Linux finds no pvpanic device without ACPI, so this is the console's "Kernel panic" line.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { runCli } from "../helpers/cli";
import { ExitCode } from "../../src/cli/exit-codes";
import { guestSkip, scaled } from "../helpers/tiers";

const { guest, skip } = guestSkip();
const BOOT_MS = scaled(60_000);
/** Neither the initramfs' /init nor any other: the kernel panics ("Requested init ... failed" or "Unable to mount root fs"). */
const panicking = () => `${guest!.cmdline} rdinit=/nonexistent init=/nonexistent`;

test("tskvm run: a kernel panic before the guest is ready exits 8 with the console's last lines", { skip, timeout: BOOT_MS + 180_000 }, () => {
  const r = runCli(["run", "--ready-timeout", String(BOOT_MS / 1000), "-p", panicking(), "--", "true"], { timeoutMs: BOOT_MS + 120_000 });
  assert.equal(r.status, ExitCode.GUEST_PANICKED, r.stderr);
  assert.match(r.stderr, /^tskvm: guest kernel panicked \("Kernel panic" on its console; then .*\)$/m);
  assert.match(r.stderr, /^ {2}.*Kernel panic - not syncing: /m, "the console's tail shows the panic");
});

test("tskvm boot: a kernel panic exits 8, not 0", { skip, timeout: BOOT_MS + 180_000 }, () => {
  const r = runCli(["boot", "-p", panicking()], { timeoutMs: BOOT_MS + 120_000 });
  assert.equal(r.status, ExitCode.GUEST_PANICKED, r.stderr);
  assert.match(r.stdout, /Kernel panic - not syncing: /);
  assert.match(r.stderr, /\ntskvm: guest kernel panicked \("Kernel panic" on its console; then .*\)\n$/);
});
