/**
 * What the KVM and Linux tiers need, and whether this host has it. A test that cannot run
 * here is skipped with the reason, unless CI requires it (TSKVM_REQUIRE_KVM,
 * TSKVM_REQUIRE_GUEST, TSKVM_REQUIRE_STOCK_KERNEL set to 1): then a failing test says
 * what is missing, so a tier that should have run can never pass by skipping. Where each
 * tier runs (here or in the harness VM) is scripts/test.ts's business; README "Test".
 *
 *   const noKvm = kvmSkip();                        // at the top of a test file
 *   test("...", { skip: noKvm, timeout: scaled(60_000) }, ...)
 *   const guest = guestSkip();                      // Linux tier, default guest
 *   const stock = stockKernelSkip();                // Linux tier, stock Debian kernel
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { accessSync, constants } from "node:fs";
import { detectHostKvm, type HostKvmInfo } from "../../src/kvm/host";
import { kvmDevicePath } from "../../src/kvm/kvm";
import { findDefaultGuest, type GuestManifest } from "../../src/api/default-guest";
import { findVirtiofsd } from "../../src/host/virtiofsd";
import { findDebianKernel, debianKernelPackage, type DebianKernel } from "../../scripts/lib/debian-kernel";

/** Why /dev/kvm (or $TSKVM_KVM_DEVICE) cannot be used, or undefined when it can. */
export function kvmUnavailable(): string | undefined {
  const path = kvmDevicePath();
  try {
    accessSync(path, constants.R_OK | constants.W_OK);
    return undefined;
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    return code === "ENOENT" ? `no ${path} on this host` : `${path} cannot be opened read-write (${code})`;
  }
}

let hostInfo: HostKvmInfo | undefined;
/** This host's kind of KVM (meaningful only where kvmUnavailable() is undefined). */
export function hostKvm(): HostKvmInfo {
  return (hostInfo ??= detectHostKvm());
}

/**
 * A deadline or test timeout for a normal host, stretched where guest code runs in
 * software (kvm-pvm, or nested under QEMU's TCG): never a fixed sleep, always a limit.
 */
export function scaled(ms: number): number {
  return kvmUnavailable() === undefined && hostKvm().softwareEmulated ? ms * 5 : ms;
}

const required = (name: string) => process.env[name] === "1" || process.env[name] === "true";
const reported = new Set<string>();

/** The skip reason, or, when CI requires what is missing, one failing test that says so. */
function requirement(envVar: string, missing: string | undefined): string | false {
  if (missing === undefined) return false;
  if (required(envVar) && !reported.has(envVar)) {
    reported.add(envVar);
    test(`${envVar}=1: ${missing}`, () => assert.fail(`${missing}, but ${envVar}=1 says this tier must run here`));
  }
  return missing;
}

/** For the KVM and Linux tiers: false when KVM can be used, else why not. */
export function kvmSkip(): string | false {
  return requirement("TSKVM_REQUIRE_KVM", kvmUnavailable());
}

/** For Linux-tier tests of the default guest: its build, or the skip reason. */
export function guestSkip(): { guest: GuestManifest; skip: false } | { guest: undefined; skip: string } {
  const noKvm = kvmSkip();
  if (noKvm !== false) return { guest: undefined, skip: noKvm };
  const guest = findDefaultGuest();
  if (guest !== undefined) return { guest, skip: false };
  const skip = requirement("TSKVM_REQUIRE_GUEST", "the default guest is not built (npm run guest)");
  return { guest: undefined, skip: skip || "the default guest is not built" };
}

/** For tests of shares (virtio-fs): false when virtiofsd is installed, else why not (TSKVM_REQUIRE_VIRTIOFSD). */
export function virtiofsdSkip(): string | false {
  return requirement("TSKVM_REQUIRE_VIRTIOFSD", findVirtiofsd() === undefined ? "virtiofsd is not installed (Debian: apt-get install qemu-system-common)" : undefined);
}

/**
 * For Linux-tier tests of a stock distribution kernel: the Debian kernel
 * (guest/debian-kernel.sh), or the skip reason. A stock kernel needs KVM with hardware
 * semantics: on kvm-pvm it never reaches user space, so those tests run in the harness VM.
 */
export function stockKernelSkip(): { kernel: DebianKernel; skip: false } | { kernel: undefined; skip: string } {
  const noKvm = kvmSkip();
  if (noKvm !== false) return { kernel: undefined, skip: noKvm };
  let missing: string | undefined;
  let kernel: DebianKernel | undefined;
  if (hostKvm().kind === "emulated-pvm") {
    missing = "a stock kernel cannot reach user space on kvm-pvm (npm test runs these tests in the harness VM)";
  } else {
    kernel = findDebianKernel();
    if (kernel === undefined) missing = `the stock Debian kernel (${debianKernelPackage()}) is not fetched: bash guest/debian-kernel.sh`;
  }
  if (kernel !== undefined) return { kernel, skip: false };
  const skip = requirement("TSKVM_REQUIRE_STOCK_KERNEL", missing);
  return { kernel: undefined, skip: skip || missing! };
}

/** "kvm-pvm", "nested SVM on QEMU TCG", ...: for t.diagnostic lines saying where a test ran. */
export function whereItRuns(): string {
  const why = kvmUnavailable();
  return why === undefined ? hostKvm().label : why;
}
