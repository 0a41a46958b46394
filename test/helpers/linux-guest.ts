/**
 * What the Linux-tier tests share: whether the default guest can run here, and how long a
 * boot to the agent's ready report may take.
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { findDefaultGuest } from "../../src/api/default-guest";
import { detectHostKvm } from "../../src/kvm/host";

export const emulatedKvm = existsSync("/dev/kvm") && detectHostKvm().kind === "emulated-pvm";

/** Boot to the agent's ready report: ~25 s on an emulating KVM, a few seconds on hardware KVM. */
export const READY_MS = emulatedKvm ? 300_000 : 60_000;

/**
 * True when the default guest can boot here; otherwise skips the test saying why (and
 * fails it when TSKVM_REQUIRE_GUEST is set, as in CI).
 */
export function guestOrSkip(t: { skip: (msg: string) => void }): boolean {
  if (!existsSync("/dev/kvm")) {
    t.skip("no /dev/kvm on this host");
    return false;
  }
  if (findDefaultGuest() === undefined) {
    if (process.env.TSKVM_REQUIRE_GUEST) assert.fail("the default guest is not built (npm run guest) but TSKVM_REQUIRE_GUEST is set");
    t.skip("no default guest built: run `npm run guest` to enable the Linux tests");
    return false;
  }
  return true;
}
