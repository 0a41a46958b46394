/**
 * What the Linux tier's tests with the default guest share: how long a boot may take here,
 * and whether the test can run at all (it says why not, and fails instead of skipping when
 * CI asks for the tier: TSKVM_REQUIRE_GUEST, TSKVM_REQUIRE_VIRTIOFSD).
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { findDefaultGuest } from "../../src/api/default-guest";
import { detectHostKvm } from "../../src/kvm/host";
import { findVirtiofsd } from "../../src/host/virtiofsd";

export const emulated = existsSync("/dev/kvm") && detectHostKvm().kind === "emulated-pvm";
/** Boot to the agent's ready report: ~25-50 s on an emulating KVM, a few seconds on hardware. */
export const READY_MS = emulated ? 300_000 : 60_000;

/** True when the default guest can boot here; otherwise skips `t` with the reason. */
export function guestOrSkip(t: { skip: (msg: string) => void }, needs: { virtiofsd?: boolean } = {}): boolean {
  if (!existsSync("/dev/kvm")) {
    t.skip("no /dev/kvm on this host");
    return false;
  }
  if (findDefaultGuest() === undefined) {
    if (process.env.TSKVM_REQUIRE_GUEST) assert.fail("the default guest is not built (npm run guest) but TSKVM_REQUIRE_GUEST is set");
    t.skip("no default guest built: run `npm run guest` to enable the Linux tests");
    return false;
  }
  if (needs.virtiofsd === true && findVirtiofsd() === undefined) {
    if (process.env.TSKVM_REQUIRE_VIRTIOFSD) assert.fail("virtiofsd is not installed but TSKVM_REQUIRE_VIRTIOFSD is set");
    t.skip("virtiofsd is not installed (Debian: apt-get install qemu-system-common)");
    return false;
  }
  return true;
}
