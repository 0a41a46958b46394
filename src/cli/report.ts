/**
 * What `tskvm boot -v` and `tskvm run -v` say about a VM beyond its console: where start-up
 * time went and which exits the guest made tskvm handle.
 */
import type { Vm } from "../api/vm";
import type { VmExit } from "../api/types";
import { exitReasonName } from "../kvm/abi";
import { formatExitSummary } from "../vcpu/exit-stats";

const ms = (x: number) => (Number.isFinite(x) ? `${x.toFixed(0)} ms` : "-");

/** "start-up: machine asked for at 95 ms, built at 160 ms, first KVM_RUN at 170 ms (from process start)" */
export function startupLine(vm: Vm): string {
  const t = vm.startupTimeline();
  return `start-up (from process start): machine asked for at ${ms(t.createBegin)}, built at ${ms(t.createEnd)}, boot vCPU in KVM_RUN at ${ms(t.firstKvmRun)}`;
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
