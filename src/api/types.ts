/** The API's option and result types (see docs/api.md). */
import type { ExitStatsData } from "../vcpu/exit-stats";

export interface DiskOptions {
  /** A raw image file, a whole number of 512-byte sectors. */
  path: string;
  readOnly?: boolean;
  /** The disk's serial number as the guest sees it (at most 20 bytes). */
  serial?: string;
}

export interface NicOptions {
  /** The TAP device: created (and removed when the VM ends) unless a persistent one exists. Needs CAP_NET_ADMIN. */
  tap: string;
  /** The guest's MAC; default derived from the TAP name. */
  mac?: string;
  /** Bring the host end up with this address, e.g. "192.168.100.1/24". */
  hostCidr?: string;
}

/** Where the guest's serial console (COM1, ttyS0) goes. */
export type ConsoleMode =
  /** Into this process: Vm "console" events, waitForConsole(), consoleText(), the consoleLog file. */
  | "capture"
  /** Straight to a file descriptor from the vCPU threads (tskvm boot: the terminal). */
  | { fd: number };

export interface VmOptions {
  /** bzImage or ELF vmlinux. Default: the default guest's kernel (built on first use unless buildGuest is false). */
  kernel?: string;
  /**
   * Initial ramdisk. Default: the default guest's initrd when `kernel` is not given or the
   * agent is on (its /init runs the agent); otherwise none. null: none.
   */
  initrd?: string | null;
  /** The kernel command line. Default: the default guest's recommended one, or "console=ttyS0 reboot=k panic=1" for your kernel. */
  cmdline?: string;
  /** Arguments added to the command line. */
  appendCmdline?: string | readonly string[];
  /** Guest RAM: bytes, or a size such as "512M" or "2G" (a bare number is MiB). Default 256 MiB. */
  memory?: number | string;
  /** vCPUs. Default 1. */
  cpus?: number;
  /** virtio-blk disks: /dev/vda, /dev/vdb, ... */
  disks?: readonly (string | DiskOptions)[];
  /** virtio-net interfaces on TAP devices: eth0, eth1, ... */
  nics?: readonly NicOptions[];
  /** The guest's eth0 address: adds ip=ADDR::GW:MASK::eth0:off (gateway and mask from the first NIC's hostCidr). */
  guestIp?: string;
  /** "host" or "emulated"; default chosen from the host's KVM. */
  cpuTemplate?: string;
  /**
   * How virtio back ends do host I/O: "io_uring" (a queue drain per system call), "sync"
   * (a system call per request or frame), or "auto" (default): io_uring where the host
   * allows it (kernel, kernel.io_uring_disabled, seccomp), else sync.
   */
  ioEngine?: "auto" | "io_uring" | "sync";
  /** CPUID features to hide, e.g. ["avx2"]. */
  hideCpuFeatures?: readonly string[];
  /** Entry point of an ELF vmlinux that has both. */
  entry?: "pvh" | "linux64";
  /**
   * Start the guest agent (adds tskvm.agent=1 to the command line; the default guest's /init
   * runs it) so that ready() and run() work. Default true.
   */
  agent?: boolean;
  /** Default "capture". */
  console?: ConsoleMode;
  /** With console "capture": also write the console's output to this file (created or truncated). */
  consoleLog?: string;
  /** How much of the console's output consoleText() and waitForConsole() keep (bytes, default 1 MiB). */
  consoleRetain?: number;
  /** Build the default guest when it is needed and not built yet (minutes). Default true. */
  buildGuest?: boolean;
  /** One-line progress messages ("using the default guest ..."). */
  onProgress?: (message: string) => void;
  /**
   * One-line warnings while the VM runs: a guest broke its virtio device, a disk or TAP
   * failed on the host. Default: the Vm's "warning" event.
   */
  onWarning?: (message: string) => void;
  /** Another KVM device node than /dev/kvm. */
  kvmPath?: string;
}

/** How the VM ended. */
export interface VmExit {
  /**
   * "halted": every vCPU halted with interrupts off (how Linux without ACPI powers off);
   * "poweroff"/"reset": the guest asked for it; "stopped": this process stopped the VM
   * (stop(), a timeout, a signal); "error": KVM could not run the guest.
   */
  kind: "halted" | "poweroff" | "reset" | "stopped" | "error";
  /** One line. */
  reason: string;
  /** For "stopped": who asked (the reason given to stop()). */
  requestedBy?: string;
  /** For "error": every vCPU's registers, when KVM reported a failure. */
  dump?: string;
  /** The exits the guest made tskvm handle, by reason, port and MMIO address (all vCPUs). */
  exits?: ExitStatsData;
}

/** Where start-up time went, in ms since the process started (NaN for what has not happened). */
export interface VmStartupTimeline {
  /** startVm() asked for the machine: Node, module loading, options, the default guest. */
  createBegin: number;
  /** The machine was built: KVM, RAM, kernel and initrd, devices, vCPUs. */
  createEnd: number;
  /** The boot vCPU entered KVM_RUN. */
  firstKvmRun: number;
}

/** What startVm() chose and built. */
export interface VmInfo {
  kernel: string;
  initrd: string | undefined;
  /** The command line as the kernel got it (tskvm's additions included). */
  cmdline: string;
  /** e.g. "ELF vmlinux, PVH entry at 0x1000500, initrd at 0x..." */
  bootDescription: string;
  memoryBytes: number;
  cpus: number;
  cpuTemplate: string;
  /** How the virtio back ends do their I/O: "io_uring", or "sync" (with why, when io_uring was not usable); undefined without virtio devices. */
  ioEngine: string | undefined;
  disks: string[];
  taps: string[];
  agent: boolean;
  /** True when the kernel (and initrd) are the default guest's. */
  defaultGuest: boolean;
}

export interface RunOptions {
  /** Give up after this long (ms): the VM is stopped and run() rejects with VmTimeoutError. Default: no limit. */
  timeoutMs?: number;
  /** The command's stdout as it arrives. */
  onStdout?: (chunk: Buffer) => void;
  /** The command's stderr as it arrives. */
  onStderr?: (chunk: Buffer) => void;
  /** Keep stdout and stderr for the result (default true; false for long outputs you stream). */
  capture?: boolean;
}

export interface RunResult {
  /** The command's exit status; 128+N when signal N ended it. */
  status: number;
  /** Its output (UTF-8), unless capture was false. */
  stdout: string;
  stderr: string;
  /** From the agent's START to its EXIT report, as seen by the host. */
  durationMs: number;
}
