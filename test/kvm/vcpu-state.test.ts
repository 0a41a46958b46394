/**
 * Tier 2: a running guest's whole KVM state (every vCPU, the irqchips, the PIT, the clock)
 * taken from one VM and put into new VMs, which continue from the same instruction.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { KvmIrqchip, KvmPicState, KvmSregs } from "../../src/kvm/abi";
import {
  MSR_IA32_TSC,
  MSR_IA32_TSC_DEADLINE,
  msrIndexList,
  restoreVcpuState,
  saveVcpuState,
  savedRegisters,
  vcpuStateSupport,
  type VcpuState,
} from "../../src/kvm/vcpu-state";
import { adjustClockSupported, getClock, getIrqchip, restoreVmState, saveVmState, type VmState } from "../../src/kvm/vm-state";
import { IrqchipId, MpState } from "../../src/kvm/abi";
import { completePendingExit, createBareVm, ioExitPort, runToExit, type BareVm } from "../helpers/bare-vm";
import { COUNTER_ADDRESS, COUNTER_PORT, counterLoop } from "../helpers/guest-code";
import { RAM_FILE, readSnapshotDir, writeSnapshotDir } from "../../src/vmm/snapshot/format";
import { checkHostFacts, collectHostFacts, hostXsaveSize } from "../../src/vmm/snapshot/host-facts";
import { mapRamFile, writeRamFile } from "../../src/memory/ram-file";
import { ramLayout } from "../../src/arch/x86/layout";

const noKvm = existsSync("/dev/kvm") ? false : "no /dev/kvm on this host";
const MEMORY = 16 * 1024 * 1024;
const CODE = 0x100000;

/** Run the BSP to its next counter exit; returns the guest's register and memory counters. */
function step(vm: BareVm): { rbx: bigint; memory: bigint } {
  const bsp = vm.vcpus[0]!;
  assert.equal(ioExitPort(runToExit(bsp)), COUNTER_PORT);
  return { rbx: bsp.getRegisters().rbx, memory: vm.memory.readU64(COUNTER_ADDRESS) };
}

interface Saved {
  vm: VmState;
  vcpus: VcpuState[];
  /** The snapshot directory holding the RAM file. */
  dir: string;
}

/**
 * Take the source's state and write it, with its RAM, as a snapshot directory; read it back
 * (every check a restore makes) for the restores.
 */
function save(source: BareVm, dir: string): Saved {
  // Every vCPU out of KVM_RUN with its last exit completed (the APs never entered it).
  completePendingExit(source.vcpus[0]!);
  const support = vcpuStateSupport(source.vm);
  const msrIndices = msrIndexList(source.kvm);
  // VM state after the vCPUs': KVM_GET_MP_STATE may move pending LAPIC events first.
  const vcpus = source.vcpus.map((v) => saveVcpuState(v, { support, msrIndices, irqchip: true }));
  const vm = saveVmState(source.vm, { irqchip: true, clock: adjustClockSupported(source.vm) });
  writeSnapshotDir(dir, {
    tskvmVersion: "test",
    body: { host: collectHostFacts(source.kvm, vcpus[0]!.tscKhz), machine: null, vm, vcpus, devices: null, annotations: null },
    writeRam: (fd) => writeRamFile(source.memory, fd),
  });
  const read = readSnapshotDir(dir, { tskvmVersion: "test", verifyRam: true });
  checkHostFacts(dir, read.body.host, collectHostFacts(source.kvm), read.body.vcpus, hostXsaveSize(read.body.host.caps));
  return { vm: read.body.vm, vcpus: read.body.vcpus, dir };
}

/** A new VM over the snapshot's RAM (mapped copy-on-write) with the saved state. */
function restore(saved: Saved, advanceNs = 0n): BareVm {
  const memory = mapRamFile(join(saved.dir, RAM_FILE), ramLayout(MEMORY));
  let target: BareVm;
  try {
    target = createBareVm({ cpus: saved.vcpus.length, memoryBytes: MEMORY, memory });
  } catch (e) {
    memory.free();
    throw e;
  }
  try {
    restoreVmState(target.vm, saved.vm, { advanceNs });
    saved.vcpus.forEach((s, i) => restoreVcpuState(target.vcpus[i]!, s, { kvmclockCtrl: true, firstVcpu: i === 0 }));
    return target;
  } catch (e) {
    target.destroy();
    throw e;
  }
}

function withDir<T>(fn: (dir: string) => T): T {
  const dir = mkdtempSync(join(tmpdir(), "tskvm-vcpu-state-"));
  try {
    return fn(join(dir, "snapshot"));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

const LAPIC_TIMER_CURRENT_COUNT = 0x390;

function withoutTimerCount(lapic: Uint8Array | undefined): Uint8Array | undefined {
  if (lapic === undefined) return undefined;
  const copy = lapic.slice();
  copy.fill(0, LAPIC_TIMER_CURRENT_COUNT, LAPIC_TIMER_CURRENT_COUNT + 4);
  return copy;
}

/**
 * MSRs that move with time or are rewritten on restore (msrsInRestoreOrder): the TSC and its
 * deadline, and (hardware KVM lists them) Hyper-V's reference counter and vCPU run time.
 */
const HV_X64_MSR_VP_RUNTIME = 0x4000_0010;
const HV_X64_MSR_TIME_REF_COUNT = 0x4000_0020;
const TIME_MSRS = new Set([MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE, HV_X64_MSR_VP_RUNTIME, HV_X64_MSR_TIME_REF_COUNT]);

test("a guest's KVM state moved into a new VM, twice, continues from the same point both times", { skip: noKvm, timeout: 120_000 }, () =>
  withDir((dir) => {
    const source = createBareVm({ cpus: 2, memoryBytes: MEMORY, boot: { kind: "raw", code: counterLoop(), address: CODE, mode: "long" } });
    let saved: Saved;
    try {
      let last = { rbx: 0n, memory: 0n };
      for (let i = 1; i <= 5; i++) {
        last = step(source);
        assert.deepEqual(last, { rbx: BigInt(i), memory: BigInt(i) });
      }
      // Something for the irqchip state to carry: ISA IRQ 4 raised (the master PIC's IRR).
      source.vm.setIrqLine(4, true);
      saved = save(source, dir);
      assert.equal(savedRegisters(saved.vcpus[0]!).rbx, 5n);
      // The source goes on as if nothing happened.
      assert.deepEqual(step(source), { rbx: 6n, memory: 6n });
    } finally {
      source.destroy();
    }

    for (const round of [1, 2]) {
      const advanceNs = 2_000_000_000n;
      const target = restore(saved, advanceNs);
      try {
        // Every piece reads back as saved, before the guest runs again.
        const support = vcpuStateSupport(target.vm);
        const again = target.vcpus.map((v) => saveVcpuState(v, { support, msrIndices: saved.vcpus[0]!.msrs.map((m) => m.index), irqchip: true }));
        again.forEach((s, i) => {
          const want = saved.vcpus[i]!;
          const what = `round ${round}, vCPU ${i}`;
          assert.equal(s.mpState, want.mpState, `${what}: MP state`);
          assert.deepEqual(s.regs, want.regs, `${what}: registers`);
          assert.deepEqual(s.sregs, want.sregs, `${what}: special registers`);
          assert.deepEqual(s.xsave, want.xsave, `${what}: XSAVE`);
          assert.deepEqual(s.fpu, want.fpu, `${what}: FPU`);
          assert.deepEqual(s.xcrs, want.xcrs, `${what}: XCRs`);
          assert.deepEqual(s.debugRegs, want.debugRegs, `${what}: debug registers`);
          assert.deepEqual(withoutTimerCount(s.lapic), withoutTimerCount(want.lapic), `${what}: LAPIC`);
          assert.deepEqual(s.events, want.events, `${what}: events`);
          assert.deepEqual(s.cpuid, want.cpuid, `${what}: CPUID`);
          assert.deepEqual(
            s.msrs.filter((m) => !TIME_MSRS.has(m.index)),
            want.msrs.filter((m) => !TIME_MSRS.has(m.index)),
            `${what}: MSRs`,
          );
          // The TSC continues from the saved value (not from the new VM's zero, nor from far
          // ahead); this guest ran for well under a second, which KVM would take for a
          // synchronization attempt (breakTscSynchronization).
          const tsc = (st: VcpuState) => st.msrs.find((m) => m.index === MSR_IA32_TSC)!.data;
          const second = BigInt(want.tscKhz ?? 4_000_000) * 1000n;
          // KVM takes the other vCPUs' writes for synchronization with the first
          // (breakTscSynchronization): their TSCs follow vCPU 0's and may come out below
          // their own saved values by the time between the save's reads of the two, never
          // below vCPU 0's saved TSC.
          const first = tsc(saved.vcpus[0]!);
          const floor = i === 0 || tsc(want) < first ? tsc(want) : first;
          assert.ok(tsc(s) >= floor && tsc(s) < tsc(want) + 5n * second, `${what}: TSC ${tsc(s)}, saved ${tsc(want)} (vCPU 0 saved ${first})`);
        });
        assert.equal(saved.vcpus[1]!.mpState === MpState.RUNNABLE, false, "the AP never got a SIPI: it must still wait for one");
        const irr = (chip: Uint8Array) => chip[KvmIrqchip.chip + KvmPicState.irr]!;
        assert.equal(irr(getIrqchip(target.vm, IrqchipId.PIC_MASTER)) & 0x10, 0x10, "IRQ 4 still requested at the PIC");
        assert.deepEqual(getIrqchip(target.vm, IrqchipId.IOAPIC), saved.vm.ioapic, "IOAPIC");
        if (saved.vm.clock !== undefined) {
          const clock = getClock(target.vm).clock;
          const from = saved.vm.clock.clock + advanceNs;
          assert.ok(clock >= from && clock < from + 60_000_000_000n, `kvmclock ${clock}, expected a little over ${from}`);
        }
        // And the guest continues from the saved instruction, in memory and in its registers.
        for (let i = 6n; i <= 8n; i++) assert.deepEqual(step(target), { rbx: i, memory: i }, `round ${round}`);
      } finally {
        target.destroy();
      }
    }
    // The guest's writes after each restore stayed in its own copy of RAM.
    assert.equal(readFileSync(join(dir, RAM_FILE)).readBigUInt64LE(COUNTER_ADDRESS), 5n);
  }));

test("a saved state that KVM refuses is reported by the piece it refused", { skip: noKvm, timeout: 60_000 }, () =>
  withDir((dir) => {
    const source = createBareVm({ cpus: 1, memoryBytes: MEMORY, boot: { kind: "raw", code: counterLoop(), address: CODE, mode: "long" } });
    let saved: Saved;
    try {
      step(source);
      saved = save(source, dir);
    } finally {
      source.destroy();
    }
    // CR0.PG without CR0.PE is an invalid combination KVM_SET_SREGS refuses.
    const bad = saved.vcpus[0]!.sregs.slice();
    const dv = new DataView(bad.buffer);
    dv.setBigUint64(KvmSregs.cr0, (dv.getBigUint64(KvmSregs.cr0, true) | 0x8000_0000n) & ~1n, true);
    assert.throws(
      () => restore({ ...saved, vcpus: [{ ...saved.vcpus[0]!, sregs: bad }] }).destroy(),
      /KVM refused the saved special registers/,
    );
    // An irqchip blob naming another chip is refused before KVM sees it.
    const ioapic = saved.vm.ioapic!.slice();
    new DataView(ioapic.buffer).setUint32(KvmIrqchip.chip_id, 7, true);
    assert.throws(() => restore({ ...saved, vm: { ...saved.vm, ioapic } }).destroy(), /names irqchip 7/);
  }));
