/**
 * `tskvm`: the command line. Every failure a user can cause ends here as one line on
 * stderr and a distinct exit status (exit-codes.ts); a stack trace only with TSKVM_DEBUG=1.
 */
import { readFileSync } from "node:fs";
import { resolve } from "node:path";
import { ExitCode, STOP_SIGNALS, exitCodeForFailure, signalExitCode, type StopSignal } from "./exit-codes";
import { BOOT_USAGE, CLI_OPTION_NAMES, UsageError, parseBootArgs } from "./args";
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
import type { VmExit } from "../api/types";

export { InputFileError, readInputFile, guestIpArgument } from "../api/start";

const VERSION: string = (() => {
  try {
    return (JSON.parse(readFileSync(resolve(__dirname, "..", "..", "..", "package.json"), "utf8")) as { version: string }).version;
  } catch {
    return "unknown";
  }
})();

const USAGE = `usage: tskvm <command> [options]

Commands:
  boot     boot a Linux kernel with its console on this terminal (tskvm boot --help)
  run      boot a guest, run a command in it, exit with its status (tskvm run --help)
  mkdisk   make an ext4 disk image of a directory (tskvm mkdisk --help)
  probe    describe this host's KVM: API, capabilities, CPUID, hardware or emulated

  --version, -V   print the version
  --help, -h      this help`;

/** The exit status and one-line message for an error, by the layer it came from. */
export function classifyError(e: unknown): { code: number; message: string } {
  if (e instanceof UsageError || e instanceof SizeError) return { code: ExitCode.USAGE, message: e.message };
  const err = e instanceof VmError ? e : toStartError(e);
  if (err instanceof VmStartError || err instanceof DiskBuildError) {
    const message = err instanceof VmStartError ? err.render(CLI_OPTION_NAMES) : err.message;
    if (err.failure !== "internal") return { code: exitCodeForFailure(err.failure), message };
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
  if (opts.kernel === undefined) say("no kernel given (-k): using the default guest (building it on first use, which takes minutes)");
  const vm = await startVm({ ...vmOptionsFrom(opts), agent: false, console: { fd: 1 }, onWarning: say });
  say(`${bootBanner(vm)}; Ctrl-A x quits`);
  return runToEnd(vm, opts.verbose);
}

/** Run a started VM with the console and signals attached; returns the exit status. */
async function runToEnd(vm: Vm, verbose = false): Promise<number> {
  let signal: StopSignal | undefined;
  const onSignal = (s: NodeJS.Signals) => {
    signal ??= s as StopSignal;
    void vm.stop(s);
  };
  const signals = Object.keys(STOP_SIGNALS) as StopSignal[];
  for (const s of signals) process.on(s, onSignal);
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
      else process.stderr.write(ESCAPE_HELP);
    },
  );
  let exit: VmExit;
  try {
    exit = await vm.exited;
  } finally {
    attachment.detach();
    vm.off("registers", onRegisters);
    for (const s of signals) process.off(s, onSignal);
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
  return ExitCode.OK;
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
      case undefined:
      case "--help":
      case "-h":
      case "help":
        process.stdout.write(`${USAGE}\n`);
        return command === undefined ? ExitCode.USAGE : ExitCode.OK;
      default:
        throw new UsageError(`unknown command '${command}': use boot, run, mkdisk or probe (tskvm --help)`);
    }
  } catch (e) {
    return fail(e);
  }
}
