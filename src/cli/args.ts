/**
 * Command-line parsing for `tskvm boot`: gokvm's short flags with long forms. Parsing is
 * pure (no files opened) so every bad input has a unit test.
 */
import { parseArgs } from "node:util";
import { parseSize } from "./sizes";

export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

export const DEFAULT_MEMORY = 256 * 1024 * 1024;
export const DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=1";

export interface BootOptions {
  kernel: string | undefined;
  initrd: string | undefined;
  /** Kernel command line; undefined means the default (plus the default guest's extras). */
  params: string | undefined;
  memoryBytes: number;
  cpus: number;
  disks: string[];
  taps: string[];
  /** Host-side address of each TAP, in order ("192.168.100.1/24"). */
  tapIps: string[];
  macs: string[];
  /** The guest's eth0 address; tskvm adds a matching ip= argument. */
  guestIp: string | undefined;
  cpuTemplate: string | undefined;
  hideFeatures: string[];
  entry: "pvh" | "linux64" | undefined;
  help: boolean;
}

const BOOT_FLAGS = {
  kernel: { type: "string", short: "k" },
  initrd: { type: "string", short: "i" },
  params: { type: "string", short: "p" },
  memory: { type: "string", short: "m" },
  cpus: { type: "string", short: "c" },
  disk: { type: "string", short: "d", multiple: true },
  tap: { type: "string", short: "t", multiple: true },
  "tap-ip": { type: "string", multiple: true },
  mac: { type: "string", multiple: true },
  "guest-ip": { type: "string" },
  "cpu-template": { type: "string" },
  "hide-cpu-feature": { type: "string", multiple: true },
  entry: { type: "string" },
  help: { type: "boolean", short: "h" },
} as const;

export const BOOT_USAGE = `usage: tskvm boot [options]

Boot a Linux kernel. Without -k, the default guest (npm run guest) is built on first use.

  -k, --kernel PATH        bzImage or uncompressed ELF vmlinux
  -i, --initrd PATH        initial ramdisk
  -p, --params CMDLINE     kernel command line (default: "${DEFAULT_CMDLINE}")
  -m, --memory SIZE        guest RAM: 512M, 2G, ... a bare number is MiB (default 256M)
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
      --cpu-template NAME  host (all KVM supports) or emulated (for kvm-pvm hosts);
                           default: chosen from the host's KVM
      --hide-cpu-feature F hide a CPUID feature (repeatable), e.g. avx2
      --entry pvh|linux64  entry point for an ELF vmlinux (default: pvh when present)
  -h, --help               this help

Console: the guest's serial port is on stdin/stdout. Ctrl-A x quits, Ctrl-A h helps.`;

function parsePositiveInt(text: string, what: string, flag: string): number {
  if (!/^\s*\d+\s*$/.test(text)) throw new UsageError(`bad ${what} '${text}': give a whole number (${flag})`);
  return Number(text);
}

export function parseBootArgs(argv: readonly string[]): BootOptions {
  let values: Record<string, unknown>;
  try {
    ({ values } = parseArgs({ args: [...argv], options: BOOT_FLAGS, allowPositionals: false, strict: true }));
  } catch (e) {
    // parseArgs' messages are already one line; make them name the fix.
    throw new UsageError(`${(e as Error).message.replace(/\.$/, "")}; see tskvm boot --help`);
  }
  const str = (k: string) => values[k] as string | undefined;
  const list = (k: string) => (values[k] as string[] | undefined) ?? [];
  const cpus = str("cpus") === undefined ? 1 : parsePositiveInt(str("cpus")!, "vCPU count", "-c");
  if (cpus < 1) throw new UsageError(`bad vCPU count ${cpus}: a guest needs at least 1 (-c)`);
  const entry = str("entry");
  if (entry !== undefined && entry !== "pvh" && entry !== "linux64") {
    throw new UsageError(`bad --entry '${entry}': use pvh or linux64`);
  }
  if (list("tap-ip").length > list("tap").length) throw new UsageError("--tap-ip needs a --tap for each address");
  if (list("mac").length > list("tap").length) throw new UsageError("--mac needs a --tap for each address");
  if (str("guest-ip") !== undefined && list("tap").length === 0) throw new UsageError("--guest-ip needs a network interface: add --tap NAME");
  for (const [flag, v] of [["kernel", str("kernel")], ["initrd", str("initrd")]] as const) {
    if (v !== undefined && v.trim() === "") throw new UsageError(`--${flag} needs a file path`);
  }
  return {
    kernel: str("kernel"),
    initrd: str("initrd"),
    params: str("params"),
    memoryBytes: str("memory") === undefined ? DEFAULT_MEMORY : parseSizeOrUsage(str("memory")!),
    cpus,
    disks: list("disk"),
    taps: list("tap"),
    tapIps: list("tap-ip"),
    macs: list("mac"),
    guestIp: str("guest-ip"),
    cpuTemplate: str("cpu-template"),
    hideFeatures: list("hide-cpu-feature"),
    entry,
    help: values.help === true,
  };
}

function parseSizeOrUsage(text: string): number {
  try {
    return parseSize(text, "memory size");
  } catch (e) {
    throw new UsageError(`${(e as Error).message} (-m)`);
  }
}
