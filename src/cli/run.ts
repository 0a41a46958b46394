/**
 * `tskvm run [options] -- CMD...`: boot a guest, run CMD through the guest agent, stream its
 * stdout and stderr, power the guest off, exit with CMD's status (docs/api.md). Built on the
 * API (src/api); exit statuses in exit-codes.ts.
 */
import { exitLines, startupLine } from "./report";
import { constants } from "node:os";
import { setParentDeathSignal } from "../sys/libc";
import { ExitCode, STOP_SIGNALS, signalExitCode, type StopSignal } from "./exit-codes";
import { RUN_USAGE, parseRunArgs, type BootOptions, type RunCliOptions } from "./args";
import { formatBytes } from "../vmm/machine";
import { startVm, formatMs, type Vm } from "../api/vm";
import { VmExitedError, VmTimeoutError } from "../api/errors";
import type { VmExit, VmOptions } from "../api/types";

/** How long the guest gets to power off after CMD before tskvm stops it. */
const POWEROFF_TIMEOUT_MS = 30_000;
/** Console lines shown when the guest fails to come up. */
const CONSOLE_TAIL_LINES = 20;

function say(line: string): void {
  process.stderr.write(`tskvm: ${line}\n`);
}

/** The API's options for the boot flags both `boot` and `run` take. */
export function vmOptionsFrom(opts: BootOptions): VmOptions {
  return {
    ...(opts.kernel !== undefined ? { kernel: opts.kernel } : {}),
    ...(opts.initrd !== undefined ? { initrd: opts.initrd } : {}),
    ...(opts.params !== undefined ? { cmdline: opts.params } : {}),
    ...(opts.memoryBytes !== undefined ? { memory: opts.memoryBytes } : {}),
    cpus: opts.cpus,
    disks: opts.disks,
    nics: opts.taps.map((tap, i) => ({
      tap,
      ...(opts.macs[i] !== undefined ? { mac: opts.macs[i]! } : {}),
      ...(opts.tapIps[i] !== undefined ? { hostCidr: opts.tapIps[i]! } : {}),
    })),
    ...(opts.guestIp !== undefined ? { guestIp: opts.guestIp } : {}),
    ...(opts.cpuTemplate !== undefined ? { cpuTemplate: opts.cpuTemplate } : {}),
    ...(opts.ioEngine !== undefined ? { ioEngine: opts.ioEngine } : {}),
    hideCpuFeatures: opts.hideFeatures,
    ...(opts.entry !== undefined ? { entry: opts.entry } : {}),
  };
}

/** "booting KERNEL (bzImage, ...), 2 vCPUs, 256 MiB, 1 disk, CPU template host" */
export function bootBanner(vm: Vm): string {
  const i = vm.info;
  const extras =
    (i.disks.length === 0 ? "" : `, ${i.disks.length} disk${i.disks.length > 1 ? "s" : ""}`) +
    (i.taps.length === 0 ? "" : `, network on ${i.taps.join(", ")}`);
  return `booting ${i.kernel} (${i.bootDescription}), ${i.cpus} vCPU${i.cpus > 1 ? "s" : ""}, ${formatBytes(i.memoryBytes)}${extras}, CPU template ${i.cpuTemplate}${i.ioEngine !== undefined ? `, I/O ${i.ioEngine}` : ""}`;
}

export async function runCommand(argv: readonly string[]): Promise<number> {
  const opts = parseRunArgs(argv);
  if (opts.help) {
    process.stdout.write(`${RUN_USAGE}\n`);
    return ExitCode.OK;
  }
  const note = opts.verbose ? say : () => undefined;
  let signal: StopSignal | undefined;
  let vm: Vm | undefined;
  const onSignal = (s: NodeJS.Signals) => {
    signal ??= s as StopSignal;
    if (vm !== undefined) void vm.stop(`stopped by ${s}`);
  };
  const signals = Object.keys(STOP_SIGNALS) as StopSignal[];
  for (const s of signals) process.on(s, onSignal);
  // A parent that dies (a CI runner killed, a test harness gone) takes the VM with it: the
  // kernel sends us SIGTERM, handled like any other. If it is already gone, stop now.
  const parent = process.ppid;
  try {
    setParentDeathSignal(constants.signals.SIGTERM);
    if (process.ppid !== parent) onSignal("SIGTERM");
  } catch {
    // Not fatal: only the clean-up after a dead parent depends on it.
  }
  // A reader that went away (tskvm run ... | head) is not tskvm's failure.
  const ignore = () => undefined;
  process.stdout.on("error", ignore);
  try {
    if (opts.boot.kernel === undefined) note("no kernel given (-k): using the default guest (building it on first use, which takes minutes)");
    const t0 = Date.now();
    vm = await startVm({
      ...vmOptionsFrom(opts.boot),
      ...(opts.noInitrd ? { initrd: null } : {}),
      agent: true,
      console: "capture",
      onWarning: say,
      ...(opts.consoleLog !== undefined ? { consoleLog: opts.consoleLog } : {}),
    });
    if (signal !== undefined) void vm.stop(`stopped by ${signal}`);
    note(bootBanner(vm));
    return await drive(vm, opts, () => signal, note, t0);
  } finally {
    for (const s of signals) process.off(s, onSignal);
    // Whatever happened, no VM outlives the command.
    if (vm !== undefined && vm.exit === undefined) await vm.stop("tskvm run ended");
    await new Promise<void>((resolve) => process.stdout.write("", () => resolve()));
    process.stdout.off("error", ignore);
  }
}

async function drive(vm: Vm, opts: RunCliOptions, signal: () => StopSignal | undefined, note: (s: string) => void, t0: number): Promise<number> {
  const since = (t: number) => formatMs(Date.now() - t);
  const stopped = (): number | undefined => {
    const s = signal();
    if (s === undefined) return undefined;
    say(`stopped by ${s}`);
    return signalExitCode(s);
  };
  try {
    const r = await vm.ready(opts.readyTimeoutMs !== undefined ? { timeoutMs: opts.readyTimeoutMs } : {});
    note(`guest ready after ${since(t0)} (${r.nproc} CPU${r.nproc > 1 ? "s" : ""})`);
  } catch (e) {
    const bySignal = stopped();
    if (bySignal !== undefined) return bySignal;
    if (e instanceof VmTimeoutError) {
      await vm.stop("the guest was not ready in time");
      say(`the guest did not become ready within ${formatMs(e.timeoutMs)} (--ready-timeout)${hint(vm)}`);
      showConsoleTail(vm);
      return ExitCode.NOT_READY;
    }
    if (e instanceof VmExitedError) {
      if (e.exit.kind === "error") return guestFailed(e.exit);
      say(`the guest ended before it became ready: ${e.exit.reason}${hint(vm)}`);
      showConsoleTail(vm);
      return ExitCode.NOT_READY;
    }
    throw e;
  }
  const command = opts.command.length === 1 ? opts.command[0]! : opts.command;
  const t1 = Date.now();
  let status: number;
  try {
    const result = await vm.run(command, {
      ...(opts.timeoutMs !== undefined ? { timeoutMs: opts.timeoutMs } : {}),
      onStdout: (chunk) => process.stdout.write(chunk),
      onStderr: (chunk) => process.stderr.write(chunk),
      capture: false,
    });
    status = result.status;
  } catch (e) {
    const bySignal = stopped();
    if (bySignal !== undefined) return bySignal;
    if (e instanceof VmTimeoutError) {
      await vm.exited;
      say(`the command did not finish within ${formatMs(e.timeoutMs)} (--timeout); the VM was stopped`);
      return ExitCode.COMMAND_TIMEOUT;
    }
    if (e instanceof VmExitedError) {
      if (e.exit.kind === "error") return guestFailed(e.exit);
      say(`the guest ended before the command did: ${e.exit.reason}`);
      return ExitCode.GUEST_ENDED;
    }
    throw e;
  }
  note(`the command exited with status ${status} after ${since(t1)}`);
  const exit = await vm.poweroff({ timeoutMs: POWEROFF_TIMEOUT_MS });
  const bySignal = stopped();
  if (bySignal !== undefined) return bySignal;
  note(`${exit.reason}; ${since(t0)} in all`);
  note(startupLine(vm));
  for (const line of exitLines(vm, exit).split("\n")) note(line);
  return status;
}

function guestFailed(exit: VmExit): number {
  say(exit.reason);
  if (exit.dump !== undefined) process.stderr.write(`${exit.dump}\n`);
  return ExitCode.GUEST_FAILED;
}

function hint(vm: Vm): string {
  return vm.info.defaultGuest ? "" : " (does your initrd's /init run tskvm's guest agent? see docs/api.md)";
}

/** The guest's last console lines, for a guest that did not come up. */
function showConsoleTail(vm: Vm): void {
  const lines = vm
    .consoleText()
    .replace(/\r/g, "")
    .split("\n")
    .filter((l) => l.trim() !== "")
    .slice(-CONSOLE_TAIL_LINES);
  if (lines.length === 0) {
    say("the guest printed nothing on its console");
    return;
  }
  say(`the guest's console ended with:\n${lines.map((l) => `  ${l}`).join("\n")}`);
}
