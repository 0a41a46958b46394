/**
 * What `tskvm boot -v` and `tskvm run -v` say about a VM beyond its console: where start-up
 * time went and which exits the guest made tskvm handle.
 */
import type { Vm } from "../api/vm";
import type { VmExit } from "../api/types";
import { exitReasonName } from "../kvm/abi";
import { formatExitSummary } from "../vcpu/exit-stats";

/** A time in whole ms, or "-" for one that has not happened (NaN). */
const num = (x: number) => (Number.isFinite(x) ? x.toFixed(0) : "-");
const ms = (x: number) => (Number.isFinite(x) ? `${num(x)} ms` : "-");

/**
 * "start-up (from process start): Node ready at 40 ms, machine asked for at 95 ms (VM 97,
 * RAM 98, devices 99, kernel+initrd 150, vCPUs 158), built at 160 ms, boot vCPU thread
 * loaded at 120 ms, in KVM_RUN at 170 ms"
 */
export function startupLine(vm: Vm): string {
  const t = vm.startupTimeline();
  const b = t.built;
  return (
    `start-up (from process start): Node ready at ${ms(t.nodeReady)}, machine asked for at ${ms(t.createBegin)} ` +
    `(VM ${num(b.vm)}, RAM ${num(b.ram)}, devices ${num(b.devices)}, kernel+initrd ${num(b.boot)}, vCPUs ${num(b.vcpus)}), built at ${ms(t.createEnd)}, ` +
    `boot vCPU thread loaded at ${ms(t.bootThreadLoaded)}, boot vCPU in KVM_RUN at ${ms(t.firstKvmRun)}`
  );
}

/** Exits by reason, then the busiest ports and MMIO addresses with what sits there. */
export function exitLines(vm: Vm, exit: VmExit): string {
  if (exit.exits === undefined) return "exits: not reported";
  return formatExitSummary(exit.exits, {
    top: 8,
    reasonName: exitReasonName,
    portName: (p) => vm.deviceAt("pio", p),
    mmioName: (a) => vm.deviceAt("mmio", a),
  });
}
