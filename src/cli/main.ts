/**
 * `tskvm`: the command line. Every failure a user can cause ends here as one line on
 * stderr and a distinct exit status (exit-codes.ts); a stack trace only with TSKVM_DEBUG=1.
 */
import { ExitCode, exitCodeForFailure, signalExitCode, type StopSignal } from "./exit-codes";
import { onStopSignal, stopSignal } from "./stop-signals";
import { BOOT_USAGE, CLI_OPTION_NAMES, COMMAND_USAGE, UsageError, parseBootArgs } from "./args";
import { attachConsole, ESCAPE_HELP } from "./console";
import { SizeError } from "../api/option-values";
import { runProbe } from "./probe";
import { exitLines, startupLine } from "./report";
import { bootBanner, runCommand, vmOptionsFrom } from "./run";
import { mkdiskCommand } from "./mkdisk";
import { startVm, type Vm } from "../api/vm";
import { VmError, VmStartError } from "../api/errors";
import { DiskBuildError } from "../api/disk";
import { toStartError } from "../api/start";
import { TSKVM_VERSION } from "../api/version";
import type { VmExit } from "../api/types";

export { InputFileError, readInputFile, guestIpArgument } from "../api/start";

const VERSION = TSKVM_VERSION;

export const USAGE = `usage: tskvm <command> [options]

Commands:
  boot     boot a Linux kernel with its console on this terminal (tskvm boot --help)
  run      boot a guest, run a command in it, exit with its status (tskvm run --help)
  mkdisk   make an ext4 disk image of a directory (tskvm mkdisk --help)
  probe    describe this host's KVM: API, capabilities, CPUID, hardware or emulated
  help     tskvm help COMMAND: that command's options (the same as tskvm COMMAND --help)

  --version, -V   print the version
  --help, -h      this help`;

/** tskvm help [COMMAND] */
function helpCommand(argv: readonly string[]): number {
  const [topic, ...extra] = argv;
  if (topic === undefined) {
    process.stdout.write(`${USAGE}\n`);
    return ExitCode.OK;
  }
  const usage = (COMMAND_USAGE as Record<string, string>)[topic];
  if (usage === undefined || extra.length > 0) {
    throw new UsageError(`${usage === undefined ? `no help for '${topic}'` : "tskvm help takes one command"}: use tskvm help ${Object.keys(COMMAND_USAGE).join("|")}`);
  }
  process.stdout.write(`${usage}\n`);
  return ExitCode.OK;
}

/** The exit status and one-line message for an error, by the layer it came from. */
export function classifyError(e: unknown): { code: number; message: string } {
  if (e instanceof UsageError || e instanceof SizeError) return { code: ExitCode.USAGE, message: e.message };
  const err = e instanceof VmError ? e : toStartError(e);
  if (err instanceof VmStartError && err.failure === "stopped") {
    const s = stopSignal() ?? "SIGTERM";
    return { code: signalExitCode(s), message: `stopped by ${s}` };
  }
  if (err instanceof VmStartError || err instanceof DiskBuildError) {
    const message = err instanceof VmStartError ? err.render(CLI_OPTION_NAMES) : err.message;
    if (err.failure !== "internal" && err.failure !== "stopped") return { code: exitCodeForFailure(err.failure), message };
  }
  return { code: ExitCode.INTERNAL, message: `internal error: ${err.message} (run with TSKVM_DEBUG=1 for details)` };
}

export function fail(e: unknown): number {
  const { code, message } = classifyError(e);
  process.stderr.write(`tskvm: ${message.split("\n")[0]}\n`);
  if (process.env.TSKVM_DEBUG && e instanceof Error) {
    const cause = (e as { cause?: unknown }).cause;
    const stack = cause instanceof Error && cause.stack ? cause.stack : e.stack;
    if (stack) process.stderr.write(`${stack}\n`);
  }
  return code;
}

export function say(line: string): void {
  process.stderr.write(`tskvm: ${line}\n`);
}

async function bootCommand(argv: readonly string[]): Promise<number> {
  const opts = parseBootArgs(argv);
  if (opts.help) {
    process.stdout.write(`${BOOT_USAGE}\n`);
    return ExitCode.OK;
  }
  if (opts.restore !== undefined) {
    const vm = await startVm({
      restore: opts.restore,
      ...(opts.disks.length > 0 ? { disks: opts.disks } : {}),
      ...(opts.shares.length > 0 ? { shares: opts.shares } : {}),
      ...(opts.kvmDevice !== undefined ? { kvmPath: opts.kvmDevice } : {}),
      console: { fd: 1 },
      onWarning: say,
    });
    say(`${bootBanner(vm)}; Ctrl-A x quits`);
    return runToEnd(vm, opts.verbose);
  }
  if (opts.kernel === undefined) say("no kernel given (-k): using the default guest (building it on first use, which takes minutes)");
  // A signal during start-up aborts it: startVm undoes what it did and rejects "stopped".
  const abort = new AbortController();
  const off = onStopSignal(() => abort.abort());
  let vm: Vm;
  try {
    vm = await startVm({ ...vmOptionsFrom(opts), agent: false, console: { fd: 1 }, onWarning: say, signal: abort.signal });
  } finally {
    off();
  }
  say(`${bootBanner(vm)}; Ctrl-A x quits`);
  // A line to paste as it is (the comment keeps the shell quiet about the rest).
  if (vm.info.sshCommand !== undefined) process.stderr.write(`${vm.info.sshCommand}    # tskvm: log into the guest\n`);
  return runToEnd(vm, opts.verbose);
}

/** Ctrl-A p: pause a running VM, resume a paused one (the terminal is in raw mode: CR LF). */
async function togglePause(vm: Vm): Promise<void> {
  if (vm.paused) {
    vm.resume();
    process.stderr.write("\r\ntskvm: resumed\r\n");
    return;
  }
  try {
    await vm.pause();
    process.stderr.write("\r\ntskvm: paused (Ctrl-A p resumes)\r\n");
  } catch (e) {
    process.stderr.write(`\r\ntskvm: cannot pause: ${(e as Error).message}\r\n`);
  }
}

/** Run a started VM with the console and signals attached; returns the exit status. */
async function runToEnd(vm: Vm, verbose = false): Promise<number> {
  let signal: StopSignal | undefined;
  const off = onStopSignal((s) => {
    signal ??= s;
    void vm.stop(s);
  });
  // The terminal is in raw mode: lines end in CR LF.
  const onRegisters = (r: { vcpu: number; dump: string }) =>
    process.stderr.write(`\r\n--- vCPU ${r.vcpu} registers ---\r\n${r.dump.replace(/\n/g, "\r\n")}\r\n`);
  vm.on("registers", onRegisters);
  const attachment = attachConsole(
    process.stdin,
    (bytes) => vm.sendConsole(bytes),
    (action) => {
      if (action === "quit") void vm.stop("Ctrl-A x");
      else if (action === "dump") vm.dumpRegisters();
      else if (action === "pause") void togglePause(vm);
      else process.stderr.write(ESCAPE_HELP);
    },
  );
  let exit: VmExit;
  try {
    exit = await vm.exited;
  } finally {
    attachment.detach();
    vm.off("registers", onRegisters);
    off();
  }
  if (verbose) {
    say(startupLine(vm));
    for (const line of exitLines(vm, exit).split("\n")) say(line);
  }
  if (signal !== undefined) {
    say(`stopped by ${signal}`);
    return signalExitCode(signal);
  }
  say(exit.reason);
  if (exit.kind === "error") {
    if (exit.dump !== undefined) process.stderr.write(`${exit.dump}\n`);
    return ExitCode.GUEST_FAILED;
  }
  return exit.kind === "panic" ? ExitCode.GUEST_PANICKED : ExitCode.OK;
}

export async function main(argv: readonly string[]): Promise<number> {
  const [command, ...rest] = argv;
  try {
    switch (command) {
      case "boot":
        return await bootCommand(rest);
      case "run":
        return await runCommand(rest);
      case "mkdisk":
        return await mkdiskCommand(rest);
      case "probe":
        return runProbe(rest);
      case "--version":
      case "-V":
      case "version":
        process.stdout.write(`tskvm ${VERSION}\n`);
        return ExitCode.OK;
      case "help":
        return helpCommand(rest);
      case undefined:
        // Asked for nothing: the usage, then the one line every refusal has, on stderr.
        process.stderr.write(`${USAGE}\n`);
        throw new UsageError("no command given: use boot, run, mkdisk or probe (tskvm --help)");
      case "--help":
      case "-h":
        process.stdout.write(`${USAGE}\n`);
        return ExitCode.OK;
      default:
        throw new UsageError(`unknown command '${command}': use boot, run, mkdisk, probe or help (tskvm --help)`);
    }
  } catch (e) {
    return fail(e);
  }
}
