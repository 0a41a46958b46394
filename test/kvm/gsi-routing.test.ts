/**
 * Tier 2: an MSI raised by writing an eventfd, through irqfd on a GSI that KVM_SET_GSI_ROUTING
 * routes to an MSI message: how virtiofsd's "call" eventfd interrupts the guest with no
 * thread of tskvm's in the path. The tiny guest counts the interrupts it takes.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import * as sys from "../../src/sys/libc";
import { GsiRoutingTable } from "../../src/kvm/gsi-routing";
import { COUNTER_ADDRESS, LOAD_ADDRESS, MSI_TO_CPU0, msiCountingGuest } from "../helpers/msi-guest";
import { runTinyGuest } from "../helpers/machine";

const noKvm = existsSync("/dev/kvm") ? false : "no /dev/kvm on this host";
const one = new Uint8Array(new BigUint64Array([1n]).buffer);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

test("an eventfd bound by irqfd to a GSI routed to an MSI interrupts the guest; re-routing and deassigning take effect", { skip: noKvm, timeout: 120_000 }, async () => {
  const counts: number[] = [];
  const { result } = await runTinyGuest({ cpus: 1, boot: { kind: "raw", code: msiCountingGuest(), address: LOAD_ADDRESS, mode: "long" } }, async (m) => {
    const table = new GsiRoutingTable();
    const gsi = table.allocateMsi(MSI_TO_CPU0);
    m.vm.setGsiRouting(table.encode());
    const efd = sys.eventfd();
    m.vm.assignIrqfd(efd, gsi);
    const counter = () => m.memory.readU32(COUNTER_ADDRESS);
    // Until the guest has enabled its APIC an MSI is dropped: signal until one lands.
    const deadline = Date.now() + 60_000;
    while (counter() === 0 && Date.now() < deadline) {
      sys.write(efd, one);
      await sleep(20);
    }
    counts.push(counter());
    // Each further signal is one more interrupt (waiting for each: none coalesce).
    for (let i = 0; i < 5; i++) {
      const before = counter();
      sys.write(efd, one);
      while (counter() === before && Date.now() < deadline) await sleep(5);
    }
    counts.push(counter());
    // Re-routed to a destination APIC that does not exist: the guest sees nothing.
    table.setMsi(gsi, { address: 0xfee0_0000n | (7n << 12n), data: MSI_TO_CPU0.data });
    m.vm.setGsiRouting(table.encode());
    const frozen = counter();
    for (let i = 0; i < 5; i++) sys.write(efd, one);
    await sleep(200);
    counts.push(counter() - frozen);
    // Back to CPU 0, then deassigned: writes go nowhere.
    table.setMsi(gsi, MSI_TO_CPU0);
    m.vm.setGsiRouting(table.encode());
    m.vm.deassignIrqfd(efd, gsi);
    const quiet = counter();
    for (let i = 0; i < 5; i++) sys.write(efd, one);
    await sleep(200);
    counts.push(counter() - quiet);
    sys.close(efd);
    m.stop("test done");
  });
  assert.ok(counts[0]! >= 1, "the first MSI arrived");
  assert.equal(counts[1]! - counts[0]!, 5, "one interrupt per signal");
  assert.equal(counts[2], 0, "routed to an absent APIC: nothing arrives");
  assert.equal(counts[3], 0, "deassigned: nothing arrives");
  assert.equal(result.stop.kind, "stopped", JSON.stringify(result.stop));
});
