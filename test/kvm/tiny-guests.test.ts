/**
 * Tier 2: real KVM, real exits, tiny guests assembled in test/helpers/guest-code.ts.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  HALT,
  SPIN,
  TRIPLE_FAULT,
  longModeHello,
  longModeUnbacked,
  realModeHello,
  smpStart,
  AP_TRAMPOLINE,
} from "../helpers/guest-code";
import { runTinyGuest } from "../helpers/machine";
import { kvmSkip, scaled } from "../helpers/tiers";

const noKvm = kvmSkip();

test("real mode: text written to the UART reaches the console; i8042 reset ends the VM", { skip: noKvm }, async () => {
  const { result, console } = await runTinyGuest({ cpus: 1, boot: { kind: "raw", code: realModeHello(0x1000, "hello from real mode\n"), address: 0x1000, mode: "real" } });
  assert.equal(console.toString("latin1"), "hello from real mode\n");
  assert.equal(result.stop.kind, "reset");
  assert.match((result.stop as { reason: string }).reason, /i8042/);
});

test("long mode: the boot page tables and GDT run 64-bit code", { skip: noKvm }, async () => {
  const { result, console } = await runTinyGuest({ cpus: 1, boot: { kind: "raw", code: longModeHello("hello from long mode\n"), address: 0x100000, mode: "long" } });
  assert.equal(console.toString("latin1"), "hello from long mode\n");
  assert.equal(result.stop.kind, "reset");
});

test("an unbacked MMIO address and an unclaimed port read all-ones, writes are dropped, both counted", { skip: noKvm }, async () => {
  const { result, console } = await runTinyGuest({ cpus: 1, boot: { kind: "raw", code: longModeUnbacked(0xd000_0000, 0x99), address: 0x100000, mode: "long" } });
  assert.deepEqual([...console], [0xff, 0xff]);
  assert.equal(result.stop.kind, "reset");
  assert.equal(result.counters.unclaimedMmio, 2, "one read and one write");
  assert.equal(result.counters.unclaimedPio, 1);
});

test("HLT without an in-kernel irqchip stops the vCPU with a reason", { skip: noKvm }, async () => {
  const { result } = await runTinyGuest({ cpus: 1, irqchip: false, boot: { kind: "raw", code: HALT, address: 0x1000, mode: "real" } });
  assert.equal(result.stop.kind, "halted");
});

test("a triple fault resets the guest (exit reason SHUTDOWN)", { skip: noKvm }, async () => {
  const { result } = await runTinyGuest({ cpus: 1, boot: { kind: "raw", code: TRIPLE_FAULT, address: 0x100000, mode: "long" } });
  assert.equal(result.stop.kind, "reset", JSON.stringify(result.stop));
  assert.match((result.stop as { reason: string }).reason, /triple fault/);
});

test("a guest whose every vCPU halts with interrupts off ends the VM (how Linux powers off without ACPI)", { skip: noKvm, timeout: scaled(60_000) }, async () => {
  const { result } = await runTinyGuest({ cpus: 2, boot: { kind: "raw", code: HALT, address: 0x1000, mode: "real" } });
  assert.equal(result.stop.kind, "halted", JSON.stringify(result.stop));
  assert.match((result.stop as { reason: string }).reason, /every vCPU stopped with interrupts off/);
});

test("a stop request ends a vCPU that spins without exits", { skip: noKvm, timeout: scaled(60_000) }, async () => {
  const { result } = await runTinyGuest(
    { cpus: 1, boot: { kind: "raw", code: SPIN, address: 0x1000, mode: "real" } },
    async (m) => {
      // Every vCPU thread is about to enter KVM_RUN (or already spinning in it).
      await m.allStarted();
      m.stop("test");
    },
  );
  assert.equal(result.stop.kind, "stopped");
  assert.equal(result.requestedBy, "test");
});

test("a stop request ends every vCPU of an SMP guest, including APs waiting for SIPI", { skip: noKvm, timeout: scaled(60_000) }, async () => {
  const { result } = await runTinyGuest(
    { cpus: 4, boot: { kind: "raw", code: SPIN, address: 0x1000, mode: "real" } },
    async (m) => {
      // Every vCPU thread is about to enter KVM_RUN (or already spinning in it).
      await m.allStarted();
      m.stop("test");
    },
  );
  assert.equal(result.vcpus.length, 4);
  for (const v of result.vcpus) assert.equal(v.stop.kind, "stopped", `vCPU ${v.id}: ${JSON.stringify(v.stop)}`);
});

test("SMP: the BSP starts every AP with INIT-SIPI-SIPI and each reports its APIC id", { skip: noKvm, timeout: scaled(120_000) }, async () => {
  const cpus = 4;
  const { bsp, trampoline } = smpStart();
  const { result, console } = await runTinyGuest(
    {
      cpus,
      boot: { kind: "raw", code: bsp, address: 0x100000, mode: "long", data: [{ address: AP_TRAMPOLINE, bytes: trampoline }] },
    },
    async (m) => {
      // Every vCPU ends in hlt with interrupts off; stop once all have printed (or give up).
      const deadline = Date.now() + scaled(60_000);
      while (m.consoleBytesWritten() < cpus && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
      m.stop("test");
    },
  );
  const ids = [...console.toString("latin1")].sort();
  assert.deepEqual(ids, ["0", "1", "2", "3"], `APIC ids reported: ${JSON.stringify(console.toString("latin1"))}`);
  // Each vCPU ends in HLT with interrupts off: the machine may notice the guest halted
  // before the test's stop request arrives.
  assert.match(result.stop.kind, /^(stopped|halted)$/);
});
