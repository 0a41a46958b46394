/**
 * Command-line parsing for `tskvm boot`, `run` and `mkdisk`: gokvm's short flags with long
 * forms. Parsing is pure (no files opened) so every bad input has a unit test. It checks
 * what is about flags (syntax, pairing); what is about the options themselves the API
 * checks (api/start.ts), once, and its messages name options by the flags below.
 */
import { parseArgs } from "node:util";
import { parseSize } from "../api/option-values";
import { DEFAULT_CMDLINE, DEFAULT_MEMORY_BYTES, checkCpus, checkEntry, checkUserNet } from "../api/start";
import { VmStartError, type OptionNames } from "../api/errors";

export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

/** The flag for each option, as the API's messages are rendered for the command line. */
export const CLI_OPTION_NAMES: OptionNames = (option) =>
  ({
    kernel: "--kernel",
    initrd: "--initrd",
    modules: "--modules",
    memory: "-m",
    cpus: "-c",
    disks: "--disk",
    nics: "--tap NAME",
    "nics.mac": "--mac",
    "nics.hostCidr": "--tap-ip",
    guestIp: "--guest-ip",
    net: "--net",
    forwards: "--forward",
    entry: "--entry",
    cpuTemplate: "--cpu-template",
    restore: "--restore",
    shares: "--share",
    rootfs: "--rootfs",
    ioEngine: "--io-engine",
  })[option];

/** Run an API check at parse time: its error becomes a UsageError naming the flag. */
function asUsage<T>(check: () => T): T {
  try {
    return check();
  } catch (e) {
    if (e instanceof VmStartError) throw new UsageError(e.render(CLI_OPTION_NAMES));
    throw e;
  }
}

export interface BootOptions {
  kernel: string | undefined;
  initrd: string | undefined;
  /** A kernel module directory (/lib/modules/RELEASE): its virtio and ext4 modules are added to the initrd. */
  modules: string | undefined;
  /** Kernel command line; undefined means the default (plus the default guest's extras). */
  params: string | undefined;
  /** Undefined: the API's default. */
  memoryBytes: number | undefined;
  cpus: number;
  disks: string[];
  taps: string[];
  /** Host-side address of each TAP, in order ("192.168.100.1/24"). */
  tapIps: string[];
  macs: string[];
  /** The guest's eth0 address; tskvm adds a matching ip= argument. */
  guestIp: string | undefined;
  /** -n user: eth0 on passt's user-mode network. */
  net: "user" | undefined;
  /** --forward tcp:HOST_PORT:GUEST_PORT, ... (checked, as given). */
  forwards: string[];
  cpuTemplate: string | undefined;
  hideFeatures: string[];
  entry: "pvh" | "linux64" | undefined;
  /** tskvm boot --restore DIR: the snapshot to continue instead of booting. */
  restore: string | undefined;
  /** --share values, as given (DIR[,tag=NAME][,readonly]). */
  shares: string[];
  rootfs: "host" | undefined;
  ioEngine: "auto" | "io_uring" | "sync" | undefined;
  /** Say on stderr what happens: the boot, start-up times, the exits at the end. */
  verbose: boolean;
  /** The virtio-rng device (--no-rng leaves it out). */
  rng: boolean;
  /** -D: the KVM device node (undefined: $TSKVM_KVM_DEVICE, else /dev/kvm). */
  kvmDevice: string | undefined;
  help: boolean;
}

const BOOT_FLAGS = {
  kernel: { type: "string", short: "k" },
  initrd: { type: "string", short: "i" },
  modules: { type: "string" },
  params: { type: "string", short: "p" },
  memory: { type: "string", short: "m" },
  cpus: { type: "string", short: "c" },
  disk: { type: "string", short: "d", multiple: true },
  tap: { type: "string", short: "t", multiple: true },
  "tap-ip": { type: "string", multiple: true },
  mac: { type: "string", multiple: true },
  "guest-ip": { type: "string" },
  net: { type: "string", short: "n" },
  forward: { type: "string", multiple: true },
  "cpu-template": { type: "string" },
  "hide-cpu-feature": { type: "string", multiple: true },
  entry: { type: "string" },
  share: { type: "string", multiple: true },
  rootfs: { type: "string" },
  "io-engine": { type: "string" },
  verbose: { type: "boolean", short: "v" },
  "no-rng": { type: "boolean" },
  "kvm-device": { type: "string", short: "D" },
  help: { type: "boolean", short: "h" },
} as const;

/** Flags of `tskvm boot` that `tskvm run` does not take. */
const BOOT_ONLY_FLAGS = {
  restore: { type: "string" },
} as const;

/** Boot flags a snapshot fixes: with --restore only --disk and --share may be given. */
const MACHINE_FLAGS: readonly [string, string][] = [
  ["kernel", "-k"], ["initrd", "-i"], ["params", "-p"], ["memory", "-m"], ["cpus", "-c"], ["tap", "-t"], ["net", "-n"], ["forward", "--forward"], ["rootfs", "--rootfs"],
  ["tap-ip", "--tap-ip"], ["mac", "--mac"], ["guest-ip", "--guest-ip"], ["cpu-template", "--cpu-template"],
  ["hide-cpu-feature", "--hide-cpu-feature"], ["entry", "--entry"], ["no-rng", "--no-rng"],
];

/** The boot flags, as `tskvm boot --help` and `tskvm run --help` list them. */
const BOOT_FLAG_HELP = `  -k, --kernel PATH        bzImage or uncompressed ELF vmlinux
  -i, --initrd PATH        initial ramdisk
      --modules DIR        a distribution kernel's /lib/modules/RELEASE: its virtio-pci,
                           virtio-blk, virtio-net and ext4 modules (and what they need) are
                           added to the initrd, whose /init loads them (the default guest's does)
  -p, --params CMDLINE     kernel command line (default: "${DEFAULT_CMDLINE}")
  -m, --memory SIZE        guest RAM: 512M, 2G, ... a bare number is MiB (default ${DEFAULT_MEMORY_BYTES / 1024 / 1024}M)
  -c, --cpus N             number of vCPUs (default 1)
  -d, --disk PATH[,readonly][,serial=ID]
                           virtio-blk disk image (repeatable: /dev/vda, vdb, ...)
  -t, --tap NAME           virtio-net on TAP device NAME (created, and removed on exit,
                           unless it exists; repeatable: eth0, eth1, ...)
      --tap-ip CIDR        bring the TAP's host end up with this address, e.g.
                           192.168.100.1/24 (repeatable, one per --tap)
      --mac MAC            the guest NIC's MAC (default: derived from the TAP name)
      --guest-ip ADDR      give the guest's eth0 this address (adds ip=ADDR::GW:MASK::eth0:off,
                           gateway and mask from the first --tap-ip)
  -n, --net user           eth0 on user-mode networking through passt (package passt): no
                           privileges needed, the guest gets its address by DHCP and reaches
                           the host's 127.0.0.1 at its gateway address; unless a --forward
                           targets port 22, a free port of 127.0.0.1 reaches the guest's SSH
                           (tskvm prints the ssh command)
      --forward tcp:HOST_PORT:GUEST_PORT
                           with --net user: forward a host port (on 127.0.0.1, or
                           tcp:ADDR:HOST_PORT:GUEST_PORT) into the guest; udp:... too
                           (repeatable)
      --cpu-template NAME  host (all KVM supports) or emulated (for kvm-pvm hosts);
                           default: chosen from the host's KVM
      --hide-cpu-feature F hide a CPUID feature (repeatable), e.g. avx2
      --entry pvh|linux64  entry point for an ELF vmlinux (default: pvh when present)
      --share DIR[,tag=NAME][,readonly]
                           share host directory DIR with the guest (virtio-fs, served by
                           virtiofsd from qemu-system-common); the default guest mounts it
                           at the same path (repeatable; readonly: writes fail with EROFS)
      --rootfs host        the host's root file system as the guest's, read-only under a
                           tmpfs overlay: run the host's own binaries (default guest only)
      --io-engine E        how disks and TAPs do host I/O: io_uring (a queue drain per
                           system call), sync (a system call per request), or auto
                           (default: io_uring where the host allows it)
      --no-rng             leave out the virtio-rng entropy device (default: there, the
                           guest's /dev/hwrng, fed from the host's getrandom)
  -D, --kvm-device PATH    the KVM device node (default: $TSKVM_KVM_DEVICE, else /dev/kvm)`;

export const BOOT_USAGE = `usage: tskvm boot [options]

Boot a Linux kernel. Without -k, the default guest (npm run guest) is built on first use.

${BOOT_FLAG_HELP}
      --restore DIR        continue the VM saved in snapshot DIR (tskvm run --snapshot
                           makes them) instead of booting; only -d and --share (the
                           directories for the snapshot's shares) may be given with it
  -v, --verbose            say on stderr what happens: the boot, where start-up time went,
                           and at the end the exits the guest made tskvm handle
  -h, --help               this help

Console: the guest's serial port is on stdin/stdout. Ctrl-A x quits, Ctrl-A p pauses and
resumes, Ctrl-A h helps.`;

function parsePositiveInt(text: string, what: string, flag: string): number {
  if (/^\s*-\s*\d+\s*$/.test(text)) throw new UsageError(`bad ${what} '${text}': give a whole number, at least 1 (${flag})`);
  if (!/^\s*\d+\s*$/.test(text)) throw new UsageError(`bad ${what} '${text}': give a whole number (${flag})`);
  return Number(text);
}

export function parseBootArgs(argv: readonly string[]): BootOptions {
  const values = parseFlags(argv, { ...BOOT_FLAGS, ...BOOT_ONLY_FLAGS }, "boot");
  const restore = values.restore as string | undefined;
  if (restore !== undefined) {
    if (restore.trim() === "") throw new UsageError("--restore needs a snapshot directory");
    const given = MACHINE_FLAGS.filter(([k]) => values[k] !== undefined).map(([, flag]) => flag);
    if (given.length > 0) throw new UsageError(`--restore continues the machine its snapshot saved: leave out ${given.join(", ")}`);
  }
  return { ...bootOptionsFrom(values), restore };
}

type FlagTable = Record<string, { type: "string" | "boolean"; short?: string; multiple?: boolean }>;

/**
 * A flag that takes a value followed by a negative number (`-m -5`, `--timeout -1`):
 * parseArgs takes "-5" for a flag and calls the value ambiguous. Given as `--memory=-5`
 * instead, the value reaches the option's own check, whose message says what is wrong
 * with it. Any other value starting with '-' is refused in one line.
 */
function joinNegativeValues(argv: readonly string[], flags: FlagTable): string[] {
  const takesValue = new Map<string, string>();
  for (const [name, f] of Object.entries(flags)) {
    if (f.type !== "string") continue;
    takesValue.set(`--${name}`, name);
    if (f.short !== undefined) takesValue.set(`-${f.short}`, name);
  }
  const out: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    const name = takesValue.get(arg);
    const next = argv[i + 1];
    if (arg === "--") return [...out, ...argv.slice(i)];
    if (name !== undefined && next !== undefined && /^-\d/.test(next)) {
      out.push(`--${name}=${next}`);
      i++;
    } else if (name !== undefined && next !== undefined && next.startsWith("-")) {
      // parseArgs' own message for this ("argument is ambiguous") runs over three lines.
      throw new UsageError(`${arg} needs a value, and '${next}' looks like a flag: write --${name}=${next} if that is the value`);
    } else {
      out.push(arg);
    }
  }
  return out;
}

function parseFlags(argv: readonly string[], flags: FlagTable, command: string, onPositional?: (arg: string) => never): Record<string, unknown> {
  try {
    const args = joinNegativeValues(argv, flags);
    const { values, positionals } = parseArgs({ args, options: flags, allowPositionals: onPositional !== undefined, strict: true });
    if (positionals.length > 0) onPositional!(positionals[0]!);
    return values;
  } catch (e) {
    if (e instanceof UsageError) throw e;
    // parseArgs' messages are already one line; make them name the fix.
    throw new UsageError(`${(e as Error).message.replace(/\.$/, "")}; see tskvm ${command} --help`);
  }
}

function bootOptionsFrom(values: Record<string, unknown>): BootOptions {
  const str = (k: string) => values[k] as string | undefined;
  const list = (k: string) => (values[k] as string[] | undefined) ?? [];
  const cpus = str("cpus") === undefined ? 1 : asUsage(() => checkCpus(parsePositiveInt(str("cpus")!, "vCPU count", "-c")));
  const entry = asUsage(() => checkEntry(str("entry")));
  const ioEngine = str("io-engine");
  if (ioEngine !== undefined && ioEngine !== "auto" && ioEngine !== "io_uring" && ioEngine !== "sync") {
    throw new UsageError(`unknown I/O engine '${ioEngine}': use auto, io_uring or sync (--io-engine)`);
  }
  if (list("tap-ip").length > list("tap").length) throw new UsageError("--tap-ip needs a --tap for each address");
  if (list("mac").length > list("tap").length) throw new UsageError("--mac needs a --tap for each address");
  const net = str("net");
  if (net !== undefined && net !== "user") throw new UsageError(`bad --net '${net}': the one mode is user (-n user)`);
  if (list("tap-ip").length > 0 && net !== undefined) throw new UsageError("--tap-ip is for a --tap, not --net user");
  asUsage(() =>
    checkUserNet({
      ...(net !== undefined ? { net } : {}),
      forwards: list("forward"),
      nics: list("tap").map((tap) => ({ tap })),
      ...(str("guest-ip") !== undefined ? { guestIp: str("guest-ip")! } : {}),
    }),
  );
  return {
    kernel: str("kernel"),
    initrd: str("initrd"),
    modules: str("modules"),
    params: str("params"),
    memoryBytes: str("memory") === undefined ? undefined : parseSizeOrUsage(str("memory")!),
    cpus,
    disks: list("disk"),
    taps: list("tap"),
    tapIps: list("tap-ip"),
    macs: list("mac"),
    guestIp: str("guest-ip"),
    net,
    forwards: list("forward"),
    cpuTemplate: str("cpu-template"),
    hideFeatures: list("hide-cpu-feature"),
    entry,
    restore: undefined,
    shares: list("share"),
    rootfs: parseRootfs(str("rootfs")),
    ioEngine,
    verbose: values.verbose === true,
    rng: values["no-rng"] !== true,
    kvmDevice: nonEmpty(str("kvm-device"), "--kvm-device needs a device path"),
    help: values.help === true,
  };
}

function nonEmpty(value: string | undefined, message: string): string | undefined {
  if (value !== undefined && value.trim() === "") throw new UsageError(message);
  return value;
}

function parseRootfs(text: string | undefined): "host" | undefined {
  if (text === undefined) return undefined;
  if (text !== "host") throw new UsageError(`bad --rootfs '${text}': the only one is host (the host's root file system)`);
  return "host";
}

function parseSizeOrUsage(text: string): number {
  try {
    return parseSize(text, "memory size");
  } catch (e) {
    throw new UsageError(`${(e as Error).message} (-m)`);
  }
}

export interface RunCliOptions {
  boot: BootOptions;
  /** The command: one argument is a shell command line, several a program and its arguments. */
  command: string[];
  /** Limit for the command, ms (undefined: none). */
  timeoutMs: number | undefined;
  /** Limit for the boot to the agent's ready report, ms (undefined: none). */
  readyTimeoutMs: number | undefined;
  consoleLog: string | undefined;
  /** Boot without an initrd (your kernel's root file system runs the agent). */
  noInitrd: boolean;
  /** --snapshot DIR: restore the snapshot for these options from DIR, or make it there. */
  snapshotDir: string | undefined;
  verbose: boolean;
  help: boolean;
}

/** Default for --ready-timeout: generous, for emulating KVM hosts (a boot takes ~25 s there). */
export const DEFAULT_READY_TIMEOUT_S = 300;

const RUN_FLAGS = {
  ...BOOT_FLAGS,
  timeout: { type: "string" },
  "ready-timeout": { type: "string" },
  "console-log": { type: "string" },
  "no-initrd": { type: "boolean" },
  snapshot: { type: "string" },
} as const;

export const RUN_USAGE = `usage: tskvm run [options] -- CMD [ARG...]

Boot a guest, run CMD in its shell, stream CMD's stdout and stderr here, power the guest
off and exit with CMD's exit status. One argument is a shell command line
(tskvm run -- 'make -C /mnt check'); several are a program and its arguments
(tskvm run -- sh -c 'exit 3'). CMD runs as root with stdin from /dev/null, in the
current directory when it is shared (--share .) or with --rootfs host, else in /.
Without -k the default guest boots; with -k and no -i, the default guest's initrd
(whose /init runs tskvm's guest agent) goes with your kernel.

      --timeout SECONDS       stop the VM and exit 6 if CMD runs longer (default: no limit;
                              also 90s, 10m, 1h)
      --ready-timeout SECONDS exit 5 if the guest is not ready this long after start
                              (default ${DEFAULT_READY_TIMEOUT_S}; 0: no limit)
      --console-log FILE      write the kernel's console (ttyS0) to FILE (default: discarded)
      --no-initrd             boot -k without an initrd (its root file system must run the agent)
      --snapshot DIR          keep a snapshot of the booted guest in DIR, one per set of boot
                              options (kernel, initrd, command line, memory, vCPUs, devices);
                              when DIR has one, restore it instead of booting (a fraction of
                              a second). Disks (-d) and shares (--share) are attached
                              as they are on each run; with --net user a fresh passt
                              gets the same forwards. Not with --rootfs host.
  -v, --verbose               say what happens (boot, ready, exit) on stderr
${BOOT_FLAG_HELP}
  -h, --help               this help

Exit status: CMD's; or 1 the guest failed (KVM could not run it), 2 bad command line,
3 a file cannot be used, 4 the host cannot run VMs, 5 the guest did not become ready
in time (or ended before), 6 CMD timed out, 7 the guest ended before CMD did,
8 the guest's kernel panicked, 128+N a signal. tskvm's own failures print one line starting "tskvm:" on stderr.`;

/** "30", "2.5", "90s", "10m", "1h" -> milliseconds; "0" -> undefined (no limit). */
export function parseDuration(text: string, flag: string): number | undefined {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$/.exec(text);
  if (m === null && /^\s*-\s*\d/.test(text)) throw new UsageError(`bad ${flag} '${text}': a time limit cannot be negative (0: no limit)`);
  if (m === null) throw new UsageError(`bad ${flag} '${text}': give seconds, e.g. 300, or 90s, 10m, 1h`);
  const ms = Number(m[1]) * { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[(m[2] ?? "s") as "s"];
  if (!Number.isFinite(ms) || ms > 2 ** 31 - 1) throw new UsageError(`bad ${flag} '${text}': at most 24 days`);
  return ms === 0 ? undefined : Math.max(1, Math.round(ms));
}

export function parseRunArgs(argv: readonly string[]): RunCliOptions {
  const dash = argv.indexOf("--");
  const optionArgs = dash < 0 ? argv : argv.slice(0, dash);
  const command = dash < 0 ? [] : argv.slice(dash + 1);
  const values = parseFlags(optionArgs, RUN_FLAGS, "run", (arg) => {
    throw new UsageError(
      dash < 0 ? `give the command after --: tskvm run [options] -- CMD [ARG...] (found '${arg}')` : `unexpected argument '${arg}' before --; see tskvm run --help`,
    );
  });
  const help = values.help === true;
  if (!help && command.length === 0) {
    throw new UsageError(dash < 0 ? "give the command after --: tskvm run [options] -- CMD [ARG...]" : "no command after --: tskvm run [options] -- CMD [ARG...]");
  }
  if (!help && command.length === 1 && command[0]!.trim() === "") throw new UsageError("the command after -- is empty");
  const str = (k: string) => values[k] as string | undefined;
  const readyTimeout = str("ready-timeout");
  const consoleLog = str("console-log");
  if (consoleLog !== undefined && consoleLog.trim() === "") throw new UsageError("--console-log needs a file path");
  const noInitrd = values["no-initrd"] === true;
  if (noInitrd && values.initrd !== undefined) throw new UsageError("--no-initrd and -i contradict each other");
  if (noInitrd && values.kernel === undefined) throw new UsageError("--no-initrd needs a kernel (-k)");
  if (noInitrd && values.modules !== undefined) throw new UsageError("--modules adds the modules to an initrd: drop --no-initrd");
  const snapshotDir = str("snapshot");
  if (snapshotDir !== undefined && snapshotDir.trim() === "") throw new UsageError("--snapshot needs a directory");
  return {
    boot: bootOptionsFrom(values),
    command,
    timeoutMs: str("timeout") === undefined ? undefined : parseDuration(str("timeout")!, "--timeout"),
    readyTimeoutMs: readyTimeout === undefined ? DEFAULT_READY_TIMEOUT_S * 1000 : parseDuration(readyTimeout, "--ready-timeout"),
    consoleLog,
    noInitrd,
    snapshotDir,
    verbose: values.verbose === true,
    help,
  };
}

export interface MkdiskCliOptions {
  dir: string;
  out: string;
  sizeBytes: number | undefined;
  force: boolean;
  label: string | undefined;
  help: boolean;
}

export const MKDISK_USAGE = `usage: tskvm mkdisk DIR OUT.img [options]

Make an ext4 disk image of directory DIR (mkfs.ext4 -d, from e2fsprogs), for
tskvm boot/run -d OUT.img; the guest mounts it with: mount /dev/vda /mnt
The image is sparse, built under a temporary name and renamed into place when complete.

      --size SIZE   image size: 512M, 2G, ... (default: the content plus room to spare,
                    at least 64 MiB free)
      --label L     file system label (at most 16 bytes)
  -f, --force       replace OUT.img if it exists (default: refuse)
  -h, --help        this help`;

const MKDISK_FLAGS = {
  size: { type: "string" },
  label: { type: "string" },
  force: { type: "boolean", short: "f" },
  help: { type: "boolean", short: "h" },
} as const;

export function parseMkdiskArgs(argv: readonly string[]): MkdiskCliOptions {
  let parsed: { values: Record<string, unknown>; positionals: string[] };
  try {
    parsed = parseArgs({ args: joinNegativeValues(argv, MKDISK_FLAGS), options: MKDISK_FLAGS, allowPositionals: true, strict: true });
  } catch (e) {
    throw new UsageError(`${(e as Error).message.replace(/\.$/, "")}; see tskvm mkdisk --help`);
  }
  const { values, positionals } = parsed;
  const help = values.help === true;
  if (!help && positionals.length !== 2) {
    throw new UsageError(`give a directory and an image file: tskvm mkdisk DIR OUT.img (got ${positionals.length} argument${positionals.length === 1 ? "" : "s"})`);
  }
  const size = values.size as string | undefined;
  let sizeBytes: number | undefined;
  if (size !== undefined) {
    try {
      sizeBytes = parseSize(size, "image size");
    } catch (e) {
      throw new UsageError(`${(e as Error).message} (--size)`);
    }
  }
  return {
    dir: positionals[0] ?? "",
    out: positionals[1] ?? "",
    sizeBytes,
    force: values.force === true,
    label: values.label as string | undefined,
    help,
  };
}

export interface ProbeCliOptions {
  json: boolean;
  kvmDevice: string | undefined;
  help: boolean;
}

export const PROBE_USAGE = `usage: tskvm probe [options]

Describe this host's KVM: API version, capabilities, CPUID, the kind of KVM (hardware,
nested under which hypervisor, or kvm-pvm's emulation) and what that means for tskvm.
Exits 4 when tskvm cannot run VMs here.

      --json               the same as JSON
  -D, --kvm-device PATH    the KVM device node (default: $TSKVM_KVM_DEVICE, else /dev/kvm)
  -h, --help               this help`;

const PROBE_FLAGS = {
  json: { type: "boolean" },
  "kvm-device": { type: "string", short: "D" },
  help: { type: "boolean", short: "h" },
} as const;

export function parseProbeArgs(argv: readonly string[]): ProbeCliOptions {
  const values = parseFlags(argv, PROBE_FLAGS, "probe", (arg) => {
    throw new UsageError(`tskvm probe takes no arguments, only options (found '${arg}'); see tskvm probe --help`);
  });
  return {
    json: values.json === true,
    kvmDevice: nonEmpty(values["kvm-device"] as string | undefined, "--kvm-device needs a device path"),
    help: values.help === true,
  };
}

/** Each command's flags as its parser takes them, for the test that holds --help to them. */
export const COMMAND_FLAGS = {
  boot: { ...BOOT_FLAGS, ...BOOT_ONLY_FLAGS },
  run: RUN_FLAGS,
  mkdisk: MKDISK_FLAGS,
  probe: PROBE_FLAGS,
} as const;

/** Each command's --help. */
export const COMMAND_USAGE: Record<keyof typeof COMMAND_FLAGS, string> = {
  boot: BOOT_USAGE,
  run: RUN_USAGE,
  mkdisk: MKDISK_USAGE,
  probe: PROBE_USAGE,
};
