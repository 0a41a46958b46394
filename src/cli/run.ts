/**
 * `tskvm run [options] -- CMD...`: boot a guest, run CMD through the guest agent, stream its
 * stdout and stderr, power the guest off, exit with CMD's status (docs/api.md). Built on the
 * API (src/api); exit statuses in exit-codes.ts.
 */
import { exitLines, startupLine } from "./report";
import { constants } from "node:os";
import { setParentDeathSignal } from "../sys/libc";
import { ExitCode, signalExitCode, type StopSignal } from "./exit-codes";
import { onStopSignal } from "./stop-signals";
import { RUN_USAGE, parseRunArgs, type BootOptions, type RunCliOptions } from "./args";
import { formatBytes } from "../vmm/machine";
import { startVm, formatMs, type Vm } from "../api/vm";
import { VmExitedError, VmSnapshotError, VmTimeoutError } from "../api/errors";
import { snapshotCacheEntry } from "../api/snapshot-cache";
import { mkdirSync } from "node:fs";
import { dirname } from "node:path";
import type { VmExit, VmOptions } from "../api/types";
import { ROOTFS_TAG, guestDirectoryFor, rootfsHostHides } from "../api/shares";

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
    ...(opts.modules !== undefined ? { modules: opts.modules } : {}),
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
    ...(opts.net !== undefined ? { net: opts.net, forwards: opts.forwards } : {}),
    ...(opts.cpuTemplate !== undefined ? { cpuTemplate: opts.cpuTemplate } : {}),
    ...(opts.ioEngine !== undefined ? { ioEngine: opts.ioEngine } : {}),
    hideCpuFeatures: opts.hideFeatures,
    ...(opts.entry !== undefined ? { entry: opts.entry } : {}),
    ...(opts.shares.length > 0 ? { shares: opts.shares } : {}),
    ...(opts.rootfs !== undefined ? { rootfs: opts.rootfs } : {}),
    ...(opts.rng ? {} : { rng: false }),
    ...(opts.kvmDevice !== undefined ? { kvmPath: opts.kvmDevice } : {}),
  };
}

/** "booting KERNEL (bzImage, ...), 2 vCPUs, 256 MiB, 1 disk, CPU template host" (or "restored from DIR: ...") */
export function bootBanner(vm: Vm): string {
  const i = vm.info;
  const extras =
    (i.disks.length === 0 ? "" : `, ${i.disks.length} disk${i.disks.length > 1 ? "s" : ""}`) +
    (i.taps.length === 0 ? "" : `, network on ${i.taps.join(", ")}`) +
    (i.net === undefined ? "" : `, user-mode network (passt)${i.forwards.length === 0 ? "" : ` forwarding ${i.forwards.join(", ")}`}`) +
    i.shares.map((s) => `, ${s.hostPath} shared as ${s.tag}${s.readOnly ? " (read-only)" : ""}`).join("") +
    (i.rootfs === "host" ? ", the host's root file system" : "");
  const what = i.restoredFrom !== undefined ? `restored from ${i.restoredFrom}: ${i.kernel}` : `booting ${i.kernel}`;
  return `${what} (${i.bootDescription}), ${i.cpus} vCPU${i.cpus > 1 ? "s" : ""}, ${formatBytes(i.memoryBytes)}${extras}, CPU template ${i.cpuTemplate}${i.ioEngine !== undefined ? `, I/O ${i.ioEngine}` : ""}`;
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
  // Before the VM exists a signal aborts its start-up; afterwards it stops the VM.
  const abort = new AbortController();
  const onSignal = (s: StopSignal) => {
    signal ??= s;
    abort.abort();
    if (vm !== undefined) void vm.stop(`stopped by ${s}`);
  };
  const off = onStopSignal(onSignal);
  // A parent that dies (a CI runner killed, a test harness gone) takes the VM with it: the
  // kernel sends us SIGTERM, handled like any other. If it is already gone, stop now.
  const parent = process.ppid;
  try {
    setParentDeathSignal(constants.signals.SIGTERM);
    if (process.ppid !== parent) process.kill(process.pid, "SIGTERM");
  } catch {
    // Not fatal: only the clean-up after a dead parent depends on it.
  }
  // A reader that went away (tskvm run ... | head) is not tskvm's failure.
  const ignore = () => undefined;
  process.stdout.on("error", ignore);
  try {
    if (opts.boot.kernel === undefined) note("no kernel given (-k): using the default guest (building it on first use, which takes minutes)");
    const t0 = Date.now();
    const options: VmOptions = {
      ...vmOptionsFrom(opts.boot),
      ...(opts.noInitrd ? { initrd: null } : {}),
      // A snapshot holds shares only while the guest has not used them: they are mounted
      // after it is taken (drive), and after each restore.
      ...(opts.snapshotDir !== undefined ? { mountShares: false } : {}),
      agent: true,
      console: "capture",
      onWarning: say,
      ...(opts.consoleLog !== undefined ? { consoleLog: opts.consoleLog } : {}),
      signal: abort.signal,
    };
    // With --snapshot: restore this option set's snapshot, or boot and make it once ready.
    const cached = opts.snapshotDir === undefined ? undefined : snapshotCacheEntry(options, opts.snapshotDir);
    if (cached?.exists === true) {
      vm = await startVm({
        restore: cached.dir,
        ...(options.disks !== undefined && options.disks.length > 0 ? { disks: options.disks } : {}),
        // The snapshot's shares, served from these directories as they are now.
        ...(options.shares !== undefined ? { shares: options.shares } : {}),
        ...(options.kvmPath !== undefined ? { kvmPath: options.kvmPath } : {}),
        console: "capture",
        onWarning: say,
        ...(opts.consoleLog !== undefined ? { consoleLog: opts.consoleLog } : {}),
        signal: abort.signal,
      });
    } else {
      vm = await startVm(options);
    }
    if (signal !== undefined) void vm.stop(`stopped by ${signal}`);
    note(bootBanner(vm));
    if (vm.info.sshCommand !== undefined) note(`log in with: ${vm.info.sshCommand}`);
    const makeSnapshot = cached !== undefined && !cached.exists ? cached.dir : undefined;
    return await drive(vm, opts, () => signal, note, t0, makeSnapshot);
  } finally {
    off();
    // Whatever happened, no VM outlives the command.
    if (vm !== undefined && vm.exit === undefined) await vm.stop("tskvm run ended");
    await new Promise<void>((resolve) => process.stdout.write("", () => resolve()));
    process.stdout.off("error", ignore);
  }
}

async function drive(
  vm: Vm,
  opts: RunCliOptions,
  signal: () => StopSignal | undefined,
  note: (s: string) => void,
  t0: number,
  makeSnapshot: string | undefined,
): Promise<number> {
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
    if (r.unmounted.length > 0) {
      // The command would run without the files it was given: not ready for it.
      say(`the guest could not mount ${r.unmounted.map((tag) => describeShare(vm, tag)).join(", ")} (does its kernel have virtio-fs? see --console-log)`);
      return ExitCode.NOT_READY;
    }
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
      if (e.exit.kind === "panic") return guestPanicked(vm, e.exit);
      say(`the guest ended before it became ready: ${e.exit.reason}${hint(vm)}`);
      showConsoleTail(vm);
      return ExitCode.NOT_READY;
    }
    throw e;
  }
  if (makeSnapshot !== undefined) {
    await saveSnapshot(vm, makeSnapshot, note);
    const unmounted = await vm.mountShares();
    if (unmounted.length > 0) {
      say(`the guest could not mount ${unmounted.map((tag) => describeShare(vm, tag)).join(", ")} (see --console-log)`);
      return ExitCode.NOT_READY;
    }
  }
  const command = opts.command.length === 1 ? opts.command[0]! : opts.command;
  const cwd = commandDirectory(vm);
  const t1 = Date.now();
  let status: number;
  try {
    const result = await vm.run(command, {
      ...(opts.timeoutMs !== undefined ? { timeoutMs: opts.timeoutMs } : {}),
      ...(cwd !== undefined ? { cwd } : {}),
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
      if (e.exit.kind === "panic") return guestPanicked(vm, e.exit);
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

/**
 * The first run of an option set: snapshot the ready guest into `dir` for the next runs.
 * A directory that cannot be written costs only the speed-up: one line, and CMD still runs.
 */
async function saveSnapshot(vm: Vm, dir: string, note: (s: string) => void): Promise<void> {
  try {
    mkdirSync(dirname(dir), { recursive: true });
  } catch (e) {
    say(`cannot write a snapshot to ${dir}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}; running without a snapshot`);
    return;
  }
  try {
    const s = await vm.snapshot(dir, { detachDisks: true });
    note(`snapshot saved to ${dir} (${formatBytes(s.ramDataBytes)} of ${formatBytes(s.ramBytes)} RAM stored; paused ${formatMs(s.pausedMs)})`);
  } catch (e) {
    if (e instanceof VmSnapshotError && e.raced) {
      note(`another tskvm saved the snapshot in ${dir} first`);
      return;
    }
    if (e instanceof VmSnapshotError) {
      say(`${e.message}; running without a snapshot`);
      return;
    }
    throw e;
  }
}

function describeShare(vm: Vm, tag: string): string {
  if (tag === ROOTFS_TAG) return "the host's root file system (--rootfs host)";
  const share = vm.info.shares.find((s) => s.tag === tag);
  return share === undefined ? `share ${tag}` : `share ${tag} (${share.hostPath})`;
}

/**
 * Where CMD runs: this directory, when the guest has it (inside a share, mounted at the same
 * path, or in the host's root file system with --rootfs host); else / (undefined). Under
 * --rootfs host the guest has its own /tmp, /run, ...: a directory there is not the host's,
 * and one line says so.
 */
function commandDirectory(vm: Vm): string | undefined {
  const here = process.cwd();
  const shared = guestDirectoryFor(here, vm.info.shares);
  if (shared !== undefined || vm.info.rootfs !== "host") return shared;
  const hiddenBy = rootfsHostHides(here);
  if (hiddenBy === undefined) return here;
  say(`the current directory ${here} is under ${hiddenBy}, which the guest has as its own (--rootfs host): the command runs in /; add --share . to run it in this directory`);
  return undefined;
}

function guestFailed(exit: VmExit): number {
  say(exit.reason);
  if (exit.dump !== undefined) process.stderr.write(`${exit.dump}\n`);
  return ExitCode.GUEST_FAILED;
}

/** The guest's kernel panicked: what the console said last is what the user needs. */
function guestPanicked(vm: Vm, exit: VmExit): number {
  say(exit.reason);
  showConsoleTail(vm);
  return ExitCode.GUEST_PANICKED;
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
