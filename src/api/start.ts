/**
 * From VmOptions to a MachineConfig: validate the options, choose the kernel, initrd and
 * command line (the default guest's when none is given), read the files. Every failure
 * becomes a VmStartError whose `failure` says whose problem it is.
 */
import { readFileSync } from "node:fs";
import { totalmem } from "node:os";
import { IoEngineError } from "../host/io-engine";
import { ConfigError } from "../vmm/errors";
import { SnapshotError } from "../vmm/snapshot/format";
import { formatBytes, type DiskConfig, type TapNicConfig } from "../vmm/machine";
import { Kvm, KvmUnavailableError } from "../kvm/kvm";
import { CPU_TEMPLATES, CpuidError, resolveHiddenFeatures } from "../kvm/cpuid";
import { maxMpTableCpus } from "../arch/x86/mptable";
import { KernelImageError, detectKernelFormat } from "../boot";
import { parseBzImage } from "../boot/bzimage";
import { parseElf } from "../boot/elf";
import { detectHostKvm } from "../kvm/host";
import { BootError } from "../boot/errors";
import { GuestBuildError, bootFilesFor, buildDefaultGuest, findDefaultGuest, type GuestManifest } from "./default-guest";
import { GUEST_DRIVER_MODULES, kernelRelease, moduleArchive } from "../boot/kernel-modules";
import { appendInitramfs } from "../boot/initramfs";
import { DiskImageError, openDiskImage } from "../host/disk-image";
import { TapError, parseCidr, validateTapName } from "../host/tap";
import { PasstError, checkForwards, parseForward, type PortForward } from "../host/passt";
import { MacAddressError, SizeError, parseDiskOption, parseMac, parseSize } from "./option-values";
import { VmStartError, VmError, type OptionMessage, type OptionName } from "./errors";
import { AGENT_CMDLINE_ARG } from "./protocol";
import { type Share, ShareOptionError, parseShareOption, resolveShares, shareKernelArgs } from "./shares";
import { VirtiofsdError } from "../host/virtiofsd";
import type { VmOptions } from "./types";

export const DEFAULT_MEMORY_BYTES = 256 * 1024 * 1024;
/** The command line for a kernel that is not the default guest's. */
export const DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=1";

/** A file named in the options that cannot be used as what it was meant to be. */
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

const IO_ENGINES: readonly string[] = ["auto", "io_uring", "sync"];

/** The API's names of the MachineConfig fields a ConfigError can be about. */
const MACHINE_OPTIONS: Record<NonNullable<ConfigError["option"]>, OptionName> = {
  memoryBytes: "memory",
  cpus: "cpus",
  cpuTemplate: "cpuTemplate",
};

/** Which VmStartError an error from the layers below becomes. */
export function toStartError(e: unknown): VmError {
  if (e instanceof VmError) return e;
  const message = e instanceof Error ? e.message.split("\n")[0]! : String(e);
  const wrap = (failure: VmStartError["failure"]) => new VmStartError(failure, message, { cause: e });
  if (e instanceof ConfigError && e.option !== undefined) {
    const option = MACHINE_OPTIONS[e.option];
    return new VmStartError("options", (n) => `${message} (${n(option)})`, { cause: e, option });
  }
  if (e instanceof ShareOptionError) return new VmStartError("options", (n) => `${message} (${n("shares")})`, { cause: e, option: "shares" });
  if (e instanceof VirtiofsdError) return wrap(e.failure);
  if (e instanceof SizeError || e instanceof ConfigError || e instanceof CpuidError || e instanceof MacAddressError) return wrap("options");
  if (e instanceof InputFileError || e instanceof BootError || e instanceof GuestBuildError || e instanceof DiskImageError) return wrap("input");
  // A snapshot that cannot be restored here (bad, foreign, another version or host, a
  // changed disk) is an input file that cannot be used.
  if (e instanceof SnapshotError) return wrap("input");
  if (e instanceof TapError) return wrap(e.kind === "NameTooLong" || e.kind === "InvalidName" ? "options" : "host");
  // A port below 1024 or a malformed forward: change the option. A port in use, no passt,
  // no default route: this host's state.
  if (e instanceof PasstError) return wrap(e.kind === "BadForward" || e.kind === "PortPrivileged" ? "options" : "host");
  if (e instanceof IoEngineError) return new VmStartError("host", (n) => `${message} (${n("ioEngine")})`, { cause: e, option: "ioEngine" });
  if (e instanceof KvmUnavailableError) return wrap("host");
  return wrap("internal");
}

function optionsError(message: string | OptionMessage, option?: OptionName): VmStartError {
  return new VmStartError("options", message, option !== undefined ? { option } : {});
}

/** A vCPU count: a whole number, at least 1. The one check of it (the CLI's -c uses it too). */
export function checkCpus(cpus: number): number {
  if (!Number.isInteger(cpus) || cpus < 1) throw optionsError((n) => `bad vCPU count ${cpus}: a guest needs at least 1 (${n("cpus")})`, "cpus");
  return cpus;
}

/** An ELF kernel's entry point to prefer, if given. The one check of it (the CLI's --entry uses it too). */
export function checkEntry(entry: string | undefined): "pvh" | "linux64" | undefined {
  if (entry !== undefined && entry !== "pvh" && entry !== "linux64") throw optionsError((n) => `bad ${n("entry")} '${entry}': use pvh or linux64`, "entry");
  return entry;
}

/** The options, checked, in the machine's terms. */
export interface CheckedOptions {
  memoryBytes: number;
  cpus: number;
  disks: DiskConfig[];
  nics: TapNicConfig[];
  /** net "user": what passt is to forward. */
  userNet: UserNetConfig | undefined;
  /** Arguments for the end of the command line (ip=, tskvm.agent=1, tskvm.share=, appendCmdline). */
  extraArgs: string[];
  agent: boolean;
  shares: Share[];
  rootfsHost: boolean;
  rng: boolean;
}

/** Validate everything that needs no file and no KVM. Throws VmStartError("options"/"input"). */
export function checkOptions(o: VmOptions): CheckedOptions {
  let memoryBytes = DEFAULT_MEMORY_BYTES;
  if (typeof o.memory === "string") {
    try {
      memoryBytes = parseSize(o.memory, "memory size");
    } catch (e) {
      throw optionsError((e as Error).message);
    }
  } else if (o.memory !== undefined) {
    if (!Number.isSafeInteger(o.memory) || o.memory <= 0 || o.memory % 4096 !== 0) {
      throw optionsError(`bad memory size ${o.memory}: give a positive number of bytes, a multiple of 4 KiB`);
    }
    memoryBytes = o.memory;
  }
  if (memoryBytes > totalmem()) {
    throw optionsError((n) => `guest memory ${formatBytes(memoryBytes)} is more than this host's ${formatBytes(totalmem())} of RAM: use a smaller ${n("memory")}`, "memory");
  }
  const cpus = checkCpus(o.cpus ?? 1);
  if (o.ioEngine !== undefined && !IO_ENGINES.includes(o.ioEngine)) {
    throw optionsError((n) => `unknown I/O engine '${String(o.ioEngine)}': use ${IO_ENGINES.join(", ")} (${n("ioEngine")})`, "ioEngine");
  }
  for (const [option, path] of [["kernel", o.kernel], ["initrd", o.initrd], ["modules", o.modules]] as const) {
    if (typeof path === "string" && path.trim() === "") throw optionsError((n) => `${n(option)} needs a file path`, option);
  }
  const disks: DiskConfig[] = (o.disks ?? []).map((d) => {
    if (typeof d === "string") {
      const p = parseDiskOption(d);
      return { path: p.path, readOnly: p.readOnly, ...(p.serial !== undefined ? { serial: p.serial } : {}) };
    }
    if (typeof d.path !== "string" || d.path === "") throw optionsError("a disk needs a path");
    return { path: d.path, readOnly: d.readOnly ?? false, ...(d.serial !== undefined ? { serial: d.serial } : {}) };
  });
  const nics: TapNicConfig[] = (o.nics ?? []).map((n) => {
    if (n.hostCidr !== undefined) {
      try {
        parseCidr(n.hostCidr);
      } catch (e) {
        throw optionsError((n) => `bad ${n("nics.hostCidr")}: ${(e as Error).message}`, "nics.hostCidr");
      }
    }
    return { tap: n.tap, ...(n.mac !== undefined ? { mac: parseMac(n.mac) } : {}), ...(n.hostCidr !== undefined ? { hostCidr: n.hostCidr } : {}) };
  });
  const userNet = checkUserNet(o);
  const extraArgs: string[] = [];
  if (o.guestIp !== undefined) {
    if (nics.length === 0) throw optionsError((n) => `${n("guestIp")} needs a network interface: add ${n("nics")}`, "guestIp");
    extraArgs.push(guestIpArgument(o.guestIp, nics[0]!.hostCidr));
  }
  if (o.rootfs !== undefined && o.rootfs !== "host") throw optionsError((n) => `bad ${n("rootfs")} '${String(o.rootfs)}': the only one is host`, "rootfs");
  const rootfsHost = o.rootfs === "host";
  const shares = resolveShares((o.shares ?? []).map((s) => (typeof s === "string" ? parseShareOption(s) : s)), { rootfsHost });
  extraArgs.push(...shareKernelArgs(o.mountShares === false ? [] : shares, rootfsHost));
  const agent = o.agent ?? true;
  if (agent) extraArgs.push(AGENT_CMDLINE_ARG);
  const append = o.appendCmdline === undefined ? [] : typeof o.appendCmdline === "string" ? [o.appendCmdline] : [...o.appendCmdline];
  extraArgs.push(...append.map((a) => a.trim()).filter((a) => a !== ""));
  checkEntry(o.entry);
  if (o.consoleLog !== undefined && o.console !== undefined && o.console !== "capture") {
    throw optionsError("consoleLog needs console: \"capture\"");
  }
  return { memoryBytes, cpus, disks, nics, userNet, extraArgs, agent, shares, rootfsHost, rng: o.rng ?? true };
}

/** User-mode networking, checked: the forwards parsed, whether to add the SSH one. */
export interface UserNetConfig {
  forwards: PortForward[];
  sshForward: boolean;
}

/**
 * The one check of net, forwards and sshForward and how they go with the TAP options (the
 * CLI's -n/--forward use it too). Undefined without net "user".
 */
export function checkUserNet(o: Pick<VmOptions, "net" | "forwards" | "sshForward" | "nics" | "guestIp">): UserNetConfig | undefined {
  if (o.net !== undefined && o.net !== "user") throw optionsError((n) => `bad ${n("net")} '${String(o.net)}': the one mode is user (passt)`, "net");
  const texts = o.forwards ?? [];
  if (o.net === undefined) {
    if (texts.length > 0) throw optionsError((n) => `${n("forwards")} needs ${n("net")} user`, "forwards");
    return undefined;
  }
  if ((o.nics ?? []).length > 0) throw optionsError((n) => `${n("net")} user and ${n("nics")} both make eth0: use one`, "net");
  if (o.guestIp !== undefined) {
    throw optionsError((n) => `${n("guestIp")} is for a TAP: with ${n("net")} user the guest gets its address from passt by DHCP`, "guestIp");
  }
  let forwards: PortForward[];
  try {
    forwards = texts.map(parseForward);
    checkForwards(forwards);
  } catch (e) {
    throw optionsError((n) => `${(e as Error).message} (${n("forwards")})`, "forwards");
  }
  return { forwards, sshForward: o.sshForward ?? true };
}

/** What checkBeforeStart read, for the start to use instead of reading it again. */
export interface PreflightFiles {
  kernel?: { path: string; bytes: Uint8Array };
  initrd?: { path: string; bytes: Uint8Array };
}

/**
 * Everything about a start that can be checked before any long work (building the default
 * guest takes minutes) and before the machine is built, in the order of the exit classes:
 * the options themselves, then the files they name; checkKvmBeforeStart then checks this
 * host's KVM. So each bad input is reported as what it is, at once, on a host with KVM or
 * without. Throws what toStartError classifies.
 */
export function checkBeforeStart(o: VmOptions, checked: CheckedOptions): PreflightFiles {
  // Options.
  if (o.cpuTemplate !== undefined && CPU_TEMPLATES[o.cpuTemplate] === undefined) {
    throw optionsError((n) => `unknown CPU template '${o.cpuTemplate}': use ${Object.keys(CPU_TEMPLATES).join(" or ")} (${n("cpuTemplate")})`, "cpuTemplate");
  }
  resolveHiddenFeatures(o.hideCpuFeatures ?? []);
  // One PCI function per disk, NIC (passt's too), share and the host root file system.
  const functions = checked.disks.length + checked.nics.length + (checked.userNet !== undefined ? 1 : 0) + checked.shares.length + (checked.rootfsHost ? 1 : 0);
  const mpMax = maxMpTableCpus(functions);
  if (checked.cpus > mpMax) {
    throw optionsError((n) => `cannot give the guest ${checked.cpus} vCPUs: tskvm's MP table holds 1 to ${mpMax} (${n("cpus")})`, "cpus");
  }
  for (const nic of checked.nics) validateTapName(nic.tap);
  // Files.
  const files: PreflightFiles = {};
  if (typeof o.kernel === "string") {
    const bytes = readInputFile(o.kernel, "kernel image");
    try {
      if (detectKernelFormat(bytes) === "elf") parseElf(bytes);
      else parseBzImage(bytes);
    } catch (e) {
      throw e instanceof KernelImageError ? e.withPath(o.kernel) : e;
    }
    files.kernel = { path: o.kernel, bytes };
  }
  if (typeof o.initrd === "string") files.initrd = { path: o.initrd, bytes: readInputFile(o.initrd, "initrd") };
  if (o.modules !== undefined) {
    // Without -i and without the agent, a kernel of one's own boots with no initrd at all.
    const noInitrd = o.initrd === null || (o.kernel !== undefined && o.initrd === undefined && !checked.agent);
    if (noInitrd) withDriverModules(undefined, new Uint8Array(0), o.modules);
    moduleArchive(o.modules, GUEST_DRIVER_MODULES, files.kernel !== undefined ? kernelRelease(files.kernel.bytes) : undefined);
  }
  // Opened and closed again: exists, a whole number of sectors, not locked by another VM.
  for (const d of checked.disks) openDiskImage(d.path, { readOnly: d.readOnly }).close();
  return files;
}

/** The last check before any long work: this host's KVM opens, has what tskvm needs, takes the vCPUs. */
export function checkKvmBeforeStart(o: VmOptions, checked: CheckedOptions): void {
  const kvm = Kvm.open(o.kvmPath);
  try {
    kvm.requireCapabilities();
    const { max } = kvm.vcpuLimits();
    if (checked.cpus > max) {
      throw optionsError((n) => `cannot give the guest ${checked.cpus} vCPUs: this host's KVM allows 1 to ${max} (${n("cpus")})`, "cpus");
    }
  } finally {
    kvm.close();
  }
}

/**
 * The kernel's static IP argument for eth0 ("ip=client::gateway:netmask::eth0:off"), with
 * the gateway and netmask taken from the host end of the first TAP.
 */
export function guestIpArgument(guestIp: string, hostCidr: string | undefined): string {
  if (!/^\d{1,3}(\.\d{1,3}){3}$/.test(guestIp) || guestIp.split(".").some((o) => Number(o) > 255)) {
    throw optionsError((n) => `bad ${n("guestIp")} '${guestIp}': give an IPv4 address such as 192.168.100.2`, "guestIp");
  }
  if (hostCidr === undefined) return `ip=${guestIp}:::255.255.255.0::eth0:off`;
  const { address, prefix } = parseCidr(hostCidr);
  const mask = prefix === 0 ? 0 : (0xffffffff << (32 - prefix)) >>> 0;
  const dotted = [24, 16, 8, 0].map((s) => (mask >>> s) & 0xff).join(".");
  return `ip=${guestIp}::${[...address].join(".")}:${dotted}::eth0:off`;
}

export interface BootFiles {
  kernelPath: string;
  initrdPath: string | undefined;
  cmdline: string;
  defaultGuest: boolean;
  /** The default guest's SSH key when its initrd (which authorises it) boots. */
  sshKey: string | undefined;
}

/** Whether the boot files come (in part) from the default guest. */
export function needsDefaultGuest(o: VmOptions, agent: boolean): boolean {
  return o.kernel === undefined || (o.initrd === undefined && agent);
}

/**
 * The kernel, initrd and command line to boot: the caller's, completed from the default
 * guest (`built`, when the caller has found or built it already).
 */
export function resolveBootFiles(o: VmOptions, agent: boolean, built?: GuestManifest): BootFiles {
  const needGuest = needsDefaultGuest(o, agent);
  let guest: GuestManifest | undefined = needGuest ? built : undefined;
  if (needGuest && guest === undefined) {
    o.onProgress?.(
      o.kernel === undefined
        ? "using the default guest (building it on first use, which takes minutes)"
        : "using the default guest's initrd for its agent (building the guest on first use, which takes minutes)",
    );
    guest = o.buildGuest === false ? findDefaultGuest() : buildDefaultGuest();
    if (guest === undefined) {
      throw new VmStartError("input", "the default guest is not built: run `npm run guest` (bash guest/build.sh), or give a kernel and an initrd");
    }
  }
  const files = guest !== undefined ? bootFilesFor(guest, detectHostKvm().kind === "emulated-pvm") : undefined;
  // The key is authorised by the default guest's initrd: it is any use only with that initrd.
  const sshKey = o.initrd === undefined ? guest?.sshKey : undefined;
  if (o.kernel !== undefined) {
    const initrdPath = o.initrd === null ? undefined : (o.initrd ?? files?.initrd);
    return { kernelPath: o.kernel, initrdPath, cmdline: o.cmdline ?? DEFAULT_CMDLINE, defaultGuest: false, sshKey };
  }
  return {
    kernelPath: files!.kernel,
    initrdPath: o.initrd === null ? undefined : (o.initrd ?? files!.initrd),
    cmdline: o.cmdline ?? guest!.cmdline ?? DEFAULT_CMDLINE,
    defaultGuest: o.initrd === undefined,
    sshKey,
  };
}

/**
 * The initrd with the kernel modules of `modulesDir` that tskvm's devices need appended
 * (VmOptions.modules), checked against the kernel's release.
 */
export function withDriverModules(initrd: Uint8Array | undefined, kernel: Uint8Array, modulesDir: string): Uint8Array {
  if (initrd === undefined) {
    throw optionsError((n) => `${n("modules")} are added to an initrd, and this VM has none: give ${n("initrd")}`, "modules");
  }
  const { archive } = moduleArchive(modulesDir, GUEST_DRIVER_MODULES, kernelRelease(kernel));
  return appendInitramfs(initrd, archive);
}
