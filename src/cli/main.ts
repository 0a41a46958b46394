/**
 * `tskvm`: the command line. Every failure a user can cause ends here as one line on
 * stderr and a distinct exit status (exit-codes.ts); a stack trace only with TSKVM_DEBUG=1.
 */
import { readFileSync } from "node:fs";
import { totalmem } from "node:os";
import { resolve } from "node:path";
import { ExitCode } from "./exit-codes";
import { BOOT_USAGE, BootOptions, DEFAULT_CMDLINE, UsageError, parseBootArgs } from "./args";
import { attachConsole, ESCAPE_HELP } from "./console";
import { SizeError } from "./sizes";
import { runProbe } from "./probe";
import { Machine, MachineResult, formatBytes } from "../vmm/machine";
import { ConfigError } from "../vmm/errors";
import { KvmUnavailableError } from "../kvm/kvm";
import { CpuidError } from "../kvm/cpuid";
import { detectHostKvm } from "../kvm/host";
import { BootError, InitrdError, KernelImageError } from "../boot/errors";
import { GuestBuildError, bootFilesFor, buildDefaultGuest } from "../guest/default-guest";
import { DiskImageError, parseDiskOption } from "../devices/virtio/disk-image";
import { TapError, parseCidr } from "../net/tap";
import { MacAddressError } from "../devices/virtio/net";

const VERSION: string = (() => {
  try {
    return (JSON.parse(readFileSync(resolve(__dirname, "..", "..", "..", "package.json"), "utf8")) as { version: string }).version;
  } catch {
    return "unknown";
  }
})();

const USAGE = `usage: tskvm <command> [options]

Commands:
  boot     boot a Linux kernel (tskvm boot --help)
  probe    describe this host's KVM: API, capabilities, CPUID, hardware or emulated

  --version, -V   print the version
  --help, -h      this help`;

/** A file the user named that cannot be used as what it was meant to be. */
export class InputFileError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "InputFileError";
  }
}

export function readInputFile(path: string, what: string): Uint8Array {
  let data: Buffer;
  try {
    data = readFileSync(path);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    const why =
      code === "ENOENT" ? "does not exist"
      : code === "EACCES" || code === "EPERM" ? "cannot be read (permission denied)"
      : code === "EISDIR" ? "is a directory"
      : `cannot be read (${code ?? (e as Error).message})`;
    throw new InputFileError(`${what} '${path}' ${why}`);
  }
  if (data.byteLength === 0) throw new InputFileError(`${what} '${path}' is empty`);
  return data;
}

/** The exit status and one-line message for an error, by the layer it came from. */
export function classifyError(e: unknown): { code: number; message: string } {
  const message = e instanceof Error ? e.message : String(e);
  if (e instanceof UsageError || e instanceof SizeError || e instanceof ConfigError || e instanceof CpuidError) {
    return { code: ExitCode.USAGE, message };
  }
  if (e instanceof InputFileError || e instanceof BootError || e instanceof GuestBuildError || e instanceof DiskImageError) {
    return { code: ExitCode.BAD_INPUT, message };
  }
  if (e instanceof MacAddressError) return { code: ExitCode.USAGE, message };
  if (e instanceof TapError) {
    return { code: e.kind === "NameTooLong" || e.kind === "InvalidName" ? ExitCode.USAGE : ExitCode.HOST, message };
  }
  if (e instanceof KvmUnavailableError) return { code: ExitCode.HOST, message };
  return { code: ExitCode.INTERNAL, message: `internal error: ${message} (run with TSKVM_DEBUG=1 for details)` };
}

function fail(e: unknown): number {
  const { code, message } = classifyError(e);
  process.stderr.write(`tskvm: ${message.split("\n")[0]}\n`);
  if (process.env.TSKVM_DEBUG && e instanceof Error && e.stack) process.stderr.write(`${e.stack}\n`);
  return code;
}

function say(line: string): void {
  process.stderr.write(`tskvm: ${line}\n`);
}

interface ResolvedBoot {
  kernelPath: string;
  initrdPath: string | undefined;
  cmdline: string;
}

/** Which kernel, initrd and command line to boot: the user's, or the default guest. */
function resolveBoot(opts: BootOptions): ResolvedBoot {
  if (opts.kernel !== undefined) {
    return { kernelPath: opts.kernel, initrdPath: opts.initrd, cmdline: opts.params ?? DEFAULT_CMDLINE };
  }
  say("no kernel given (-k): using the default guest (building it on first use, which takes minutes)");
  const guest = buildDefaultGuest();
  const files = bootFilesFor(guest, detectHostKvm().kind === "emulated-pvm");
  return {
    kernelPath: files.kernel,
    initrdPath: opts.initrd ?? files.initrd,
    cmdline: opts.params ?? guest.cmdline ?? DEFAULT_CMDLINE,
  };
}

/**
 * The kernel's static IP argument for eth0 ("ip=client::gateway:netmask::eth0:off"), with
 * the gateway and netmask taken from the host end of the first TAP.
 */
export function guestIpArgument(guestIp: string, hostCidr: string | undefined): string {
  if (!/^\d{1,3}(\.\d{1,3}){3}$/.test(guestIp) || guestIp.split(".").some((o) => Number(o) > 255)) {
    throw new UsageError(`bad --guest-ip '${guestIp}': give an IPv4 address such as 192.168.100.2`);
  }
  if (hostCidr === undefined) return `ip=${guestIp}:::255.255.255.0::eth0:off`;
  const { address, prefix } = parseCidr(hostCidr);
  const mask = prefix === 0 ? 0 : (0xffffffff << (32 - prefix)) >>> 0;
  const dotted = [24, 16, 8, 0].map((s) => (mask >>> s) & 0xff).join(".");
  return `ip=${guestIp}::${[...address].join(".")}:${dotted}::eth0:off`;
}

export function checkHostMemory(bytes: number): void {
  if (bytes > totalmem()) {
    throw new ConfigError(
      `guest memory ${formatBytes(bytes)} is more than this host's ${formatBytes(totalmem())} of RAM: use a smaller -m`,
    );
  }
}

async function bootCommand(argv: readonly string[]): Promise<number> {
  const opts = parseBootArgs(argv);
  if (opts.help) {
    process.stdout.write(`${BOOT_USAGE}\n`);
    return ExitCode.OK;
  }
  const disks = opts.disks.map(parseDiskOption);
  for (const cidr of opts.tapIps) {
    try {
      parseCidr(cidr);
    } catch (e) {
      throw new UsageError(`bad --tap-ip: ${(e as Error).message}`);
    }
  }
  const nics = opts.taps.map((tap, i) => ({
    tap,
    ...(opts.macs[i] !== undefined ? { mac: opts.macs[i]! } : {}),
    ...(opts.tapIps[i] !== undefined ? { hostCidr: opts.tapIps[i]! } : {}),
  }));
  checkHostMemory(opts.memoryBytes);
  const boot = resolveBoot(opts);
  if (opts.guestIp !== undefined) boot.cmdline = `${boot.cmdline} ${guestIpArgument(opts.guestIp, opts.tapIps[0])}`;
  const kernel = readInputFile(boot.kernelPath, "kernel image");
  const initrd = boot.initrdPath === undefined ? undefined : readInputFile(boot.initrdPath, "initrd");

  let machine: Machine;
  try {
    machine = Machine.create({
      memoryBytes: opts.memoryBytes,
      cpus: opts.cpus,
      consoleFd: 1,
      boot: {
        kind: "linux",
        kernel,
        ...(initrd !== undefined ? { initrd } : {}),
        cmdline: boot.cmdline,
        ...(opts.entry !== undefined ? { prefer: opts.entry } : {}),
      },
      ...(opts.cpuTemplate !== undefined ? { cpuTemplate: opts.cpuTemplate } : {}),
      hideFeatures: opts.hideFeatures,
      nics,
      disks: disks.map((d) => ({ path: d.path, readOnly: d.readOnly, ...(d.serial !== undefined ? { serial: d.serial } : {}) })),
    });
  } catch (e) {
    if (e instanceof KernelImageError) throw e.withPath(boot.kernelPath);
    if (e instanceof InitrdError && boot.initrdPath !== undefined) throw e.withPath(boot.initrdPath);
    throw e;
  }
  const diskNote =
    (disks.length === 0 ? "" : `, ${disks.length} disk${disks.length > 1 ? "s" : ""}`) +
    (nics.length === 0 ? "" : `, network on ${nics.map((n) => n.tap).join(", ")}`);
  say(
    `booting ${boot.kernelPath} (${machine.boot.description}), ${opts.cpus} vCPU${opts.cpus > 1 ? "s" : ""}, ` +
      `${formatBytes(opts.memoryBytes)}${diskNote}, CPU template ${machine.cpuTemplate}; Ctrl-A x quits`,
  );
  return runToEnd(machine);
}

/** Run a built machine with the console and signals attached; returns the exit status. */
async function runToEnd(machine: Machine): Promise<number> {
  let signal: NodeJS.Signals | undefined;
  const onSignal = (s: NodeJS.Signals) => {
    signal ??= s;
    machine.stop(s);
  };
  const signals: NodeJS.Signals[] = ["SIGINT", "SIGTERM", "SIGHUP"];
  for (const s of signals) process.on(s, onSignal);
  const attachment = attachConsole(
    process.stdin,
    (bytes) => machine.sendInput(bytes),
    (action) => {
      if (action === "quit") machine.stop("Ctrl-A x");
      else if (action === "dump") machine.dumpRegisters();
      else process.stderr.write(ESCAPE_HELP);
    },
  );
  let result: MachineResult;
  try {
    result = await machine.run();
  } finally {
    attachment.detach();
    for (const s of signals) process.off(s, onSignal);
    machine.destroy();
  }
  return reportResult(result, signal);
}

function reportResult(result: MachineResult, signal: NodeJS.Signals | undefined): number {
  const { stop } = result;
  if (signal !== undefined) {
    say(`stopped by ${signal}`);
    const signo = { SIGINT: 2, SIGTERM: 15, SIGHUP: 1 }[signal as "SIGINT"] ?? 15;
    return ExitCode.SIGNAL_BASE + signo;
  }
  switch (stop.kind) {
    case "stopped":
      say(`stopped (${result.requestedBy ?? "on request"})`);
      return ExitCode.OK;
    case "reset":
    case "poweroff":
    case "halted":
      say(stop.reason);
      return ExitCode.OK;
    case "error":
      say(stop.reason);
      if (stop.dump !== undefined) process.stderr.write(`${stop.dump}\n`);
      return ExitCode.GUEST_FAILED;
  }
}

export async function main(argv: readonly string[]): Promise<number> {
  const [command, ...rest] = argv;
  try {
    switch (command) {
      case "boot":
        return await bootCommand(rest);
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
        throw new UsageError(`unknown command '${command}': use boot or probe (tskvm --help)`);
    }
  } catch (e) {
    return fail(e);
  }
}
