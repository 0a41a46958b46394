/**
 * Tier 3: boot the default Linux guest with the tskvm CLI and watch the kernel's own
 * milestones on the serial console. On this workplace's emulating KVM (kvm-pvm) the kernel
 * reaches "Run /init" in about a minute; on hardware KVM the guest's ready marker is checked
 * too. Without KVM or a built guest the tests skip (or fail where CI requires them: helpers/tiers.ts).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { bootFilesFor } from "../../src/api/default-guest";
import { buildE820 } from "../../src/arch/x86/e820";
import { ramLayout } from "../../src/arch/x86/layout";
import { RunningCli } from "../helpers/cli";
import { guestSkip, hostKvm, whereItRuns } from "../helpers/tiers";

const MEMORY = 128 * 1024 * 1024;
const { guest, skip } = guestSkip();
const emulated = skip === false && hostKvm().kind === "emulated-pvm";
/** Generous: kvm-pvm interprets the kernel at ~1M instructions/s; TCG emulates everything. */
const MILESTONE_TIMEOUT_MS = skip === false && hostKvm().softwareEmulated ? 420_000 : 60_000;

/** "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable" lines as tskvm should have passed them. */
function expectedE820Lines(bytes: number): string[] {
  return buildE820(ramLayout(bytes)).map((e) => {
    const start = e.addr.toString(16).padStart(16, "0");
    const end = (e.addr + e.size - 1).toString(16).padStart(16, "0");
    return `[mem 0x${start}-0x${end}] ${e.type === 1 ? "usable" : "reserved"}`;
  });
}

async function bootAndCheck(t: { diagnostic: (m: string) => void }, cpus: number): Promise<void> {
  // On an emulating KVM: the ELF vmlinux (PVH, no decompression) and the uncompressed initrd.
  const { kernel, initrd } = bootFilesFor(guest!, emulated);
  t.diagnostic(`tier: Linux boot on ${whereItRuns()}; kernel ${kernel}; ${cpus} vCPU(s)`);
  const vm = new RunningCli(["boot", "-k", kernel, "-i", initrd, "-m", "128M", "-c", String(cpus)]);
  try {
    const linuxVersion = await vm.waitFor(/Linux version \d/, MILESTONE_TIMEOUT_MS);
    t.diagnostic(`"Linux version" after ${linuxVersion} ms`);
    // The MP table tskvm wrote: every processor and the in-kernel IOAPIC (printed after
    // the e820 map, so both are complete once this appears).
    await vm.waitFor(/IOAPIC\[0\]: apic_id \d+, version \d+, address 0xfec00000/, MILESTONE_TIMEOUT_MS);
    assert.match(vm.stdout, /BIOS-provided physical RAM map/);
    for (const line of expectedE820Lines(MEMORY)) {
      assert.ok(vm.stdout.includes(line), `the kernel should report the e820 entry ${line}`);
    }
    for (let id = 0; id < cpus; id++) assert.match(vm.stdout, new RegExp(`Processor #${id}\\b`));
    const smp = await vm.waitFor(new RegExp(`smp: Brought up 1 node, ${cpus} CPUs?`), MILESTONE_TIMEOUT_MS);
    t.diagnostic(`all ${cpus} CPU(s) up after ${smp} ms`);
    const runInit = await vm.waitFor(/Run \/init as init process/, MILESTONE_TIMEOUT_MS);
    t.diagnostic(`"Run /init as init process" after ${runInit} ms`);
    // The default guest's kernel carries the patches that let user space run on an
    // emulating KVM too, so its /init's marker is expected on every host.
    const ready = await vm.waitFor(new RegExp(`TSKVM-GUEST-READY nproc=${cpus}\\b`), MILESTONE_TIMEOUT_MS);
    t.diagnostic(`ready marker (nproc=${cpus}) after ${ready} ms`);
    // A command typed on the serial console runs in the guest's shell and answers.
    await vm.waitFor(/built-in shell/, MILESTONE_TIMEOUT_MS);
    vm.send("echo tskvm-$((6*7))-ok\n");
    const answered = await vm.waitFor(/tskvm-42-ok/, MILESTONE_TIMEOUT_MS);
    t.diagnostic(`shell answered over the serial console after ${answered} ms`);
    if (cpus === 1) {
      // The guest's own poweroff (no ACPI: Linux halts every CPU with interrupts off) ends
      // tskvm with status 0.
      vm.send("poweroff -f\n");
      const exit = await vm.exited;
      assert.equal(exit.code, 0, vm.stderr);
      assert.match(vm.stderr, /guest halted/);
    } else {
      // Ctrl-A x ends the VM cleanly with status 0.
      vm.send("\x01x");
      const exit = await vm.exited;
      assert.equal(exit.code, 0, vm.stderr);
      assert.match(vm.stderr, /stopped \(Ctrl-A x\)/);
    }
  } finally {
    vm.kill();
  }
}

test("Linux boots on tskvm to a shell: kernel milestones, e820, MP table, console", { skip, timeout: 900_000 }, (t) => bootAndCheck(t, 1));

test("Linux SMP on tskvm: 2 vCPUs from the MP table, both online (nproc)", { skip, timeout: 900_000 }, (t) => bootAndCheck(t, 2));
