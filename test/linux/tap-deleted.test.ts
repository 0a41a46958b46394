/**
 * Tier 3: the TAP is deleted under a running guest (`ip link del`). The guest's network
 * goes away; tskvm carries on (the console still answers), says so in one line, and ends
 * cleanly on Ctrl-A x. Runs in a network namespace the test makes.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { bootFilesFor } from "../../src/api/default-guest";
import { RunningCli } from "../helpers/cli";
import { NetNs, netTestSkipReason } from "../helpers/netns";
import { guestSkip, hostKvm, scaled } from "../helpers/tiers";

const { guest, skip } = guestSkip();
const emulated = skip === false && hostKvm().kind === "emulated-pvm";
const BOOT_MS = scaled(120_000);

test("a TAP deleted under the guest: the VMM carries on, one warning, a clean end", { skip, timeout: BOOT_MS + 300_000 }, async (t) => {
  const netSkip = netTestSkipReason();
  if (netSkip !== undefined) return t.skip(netSkip);
  const { kernel, initrd } = bootFilesFor(guest!, emulated);
  const ns = NetNs.create("tapdel");
  const vm = new RunningCli(
    ["boot", "-k", kernel, "-i", initrd, "-m", "128M", "-t", "tap0", "--tap-ip", "192.168.100.1/24", "--guest-ip", "192.168.100.2"],
    {},
    ["ip", "netns", "exec", ns.name],
  );
  try {
    await vm.waitFor(/TSKVM-GUEST-READY/, BOOT_MS);
    ns.exec(["ip", "link", "del", "tap0"]);
    assert.equal(ns.linkExists("tap0"), false);
    // The guest sends (its ARP requests go to the vanished TAP), then shows it is still served.
    vm.send("ping -c 3 -W 1 192.168.100.1; echo still-$((6*7))-here\n");
    await vm.waitFor(/still-42-here/, scaled(120_000));
    vm.send("\x01x");
    const exit = await vm.exited;
    assert.equal(exit.code, 0, vm.stderr);
    const lines = vm.stderr.trimEnd().split("\n");
    assert.ok(lines.every((l) => l.startsWith("tskvm: ")), vm.stderr);
    assert.ok(lines.filter((l) => /tap0/.test(l) && !/booting/.test(l)).length <= 1, `at most one line about the TAP:\n${vm.stderr}`);
    assert.match(vm.stderr, /stopped \(Ctrl-A x\)/);
  } finally {
    vm.kill();
    ns.destroy();
  }
});
