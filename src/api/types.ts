/** The API's option and result types (see docs/api.md). */
import type { Share, ShareOptions } from "./shares";
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
  /**
   * A distribution kernel's module directory (/lib/modules/RELEASE, indexed by depmod). The
   * modules tskvm's devices need (virtio-pci, virtio-blk, virtio-net, ext4) and their
   * dependencies are appended to the initrd as one more archive, listed in load order in
   * /etc/tskvm/modules, which the default guest's /init loads before anything else.
   */
  modules?: string;
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
  /**
   * "user": eth0 on user-mode networking through passt (the Debian package `passt`), which
   * needs no privileges: the guest gets its address by DHCP (the default guest asks for one
   * when no static ip= is given) and reaches the host's 127.0.0.1 at its gateway address;
   * host ports reach the guest through `forwards`. Not together with `nics`. docs/usernet.md.
   */
  net?: "user";
  /**
   * With net "user": host ports forwarded into the guest, "tcp:HOST_PORT:GUEST_PORT" or
   * "udp:HOST_PORT:GUEST_PORT"; the host side listens on 127.0.0.1 unless an IPv4 address
   * comes first ("tcp:0.0.0.0:8080:80").
   */
  forwards?: readonly string[];
  /**
   * With net "user": forward a free port of 127.0.0.1 to the guest's SSH (port 22) unless a
   * TCP forward already targets it (Vm.sshPort says which). Default true.
   */
  sshForward?: boolean;
  /** A virtio-rng entropy device fed from the host's getrandom (/dev/hwrng in the guest). Default true. */
  rng?: boolean;
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
  /**
   * Stops the start-up when aborted (tskvm aborts it on SIGINT/SIGTERM/SIGHUP): startVm then
   * rejects with VmStartError "stopped" and leaves nothing behind (no VM, no TAP, no lock,
   * no guest build running).
   */
  signal?: AbortSignal;
  /**
   * Rebuild the VM from this snapshot directory (Vm.snapshot) and let it go on, instead of
   * booting. The snapshot fixes the machine: kernel, initrd, command line, memory, vCPUs,
   * CPU template, network interfaces (net and forwards too: a fresh passt gets the
   * snapshot's forwards) and the agent cannot be given. `disks` may name images in place of
   * the snapshot's (same number of disks): any image for a disk the snapshot took as
   * per-run input (detachDisks), the same unchanged image for any other. `shares` may name
   * the directories to serve the snapshot's shares from (same number, in order; tags and
   * read-only flags are the snapshot's); a fresh virtiofsd serves each as it is now, and
   * the agent mounts them before it is ready unless mountShares is false.
   */
  restore?: string;
  /**
   * Host directories shared with the guest over virtio-fs, each served by a virtiofsd that
   * tskvm starts and stops: a path ("path[,tag=NAME][,readonly]"), or options. The default
   * guest mounts each at the same path as on the host (docs/virtiofs.md).
   */
  shares?: readonly (string | ShareOptions)[];
  /**
   * Have the default guest mount the shares at boot (default true). false: the devices are
   * there but unused until you mount them (Vm.mountShares() or shareMountCommand(): a VM to
   * be snapshotted must not have used them). With restore: mount them after the restore
   * (default true) or not.
   */
  mountShares?: boolean;
  /**
   * "host": the default guest's user space is the host's own: its root file system,
   * read-only over virtio-fs under a tmpfs overlay (writes are thrown away, except in
   * shares); commands run there, with the host's binaries and libraries.
   */
  rootfs?: "host";
}

export interface SnapshotOptions {
  /**
   * The VM's disks are per-run input: through the agent, write out and drop everything the
   * guest caches of them first; each disk the guest does not use (mount) is then attached
   * afresh, as it is at the time, when the snapshot is restored. Default false: a restore
   * needs each image unchanged.
   */
  detachDisks?: boolean;
}

export interface SnapshotInfo {
  dir: string;
  /** Guest RAM size, and the bytes of it stored (non-zero pages). */
  ramBytes: number;
  ramDataBytes: number;
  /** RAM the guest had touched (what the host had given it): ramDataBytes is at most this. */
  ramTouchedBytes: number;
  /** Size of the state file (KVM and device state, configuration). */
  stateBytes: number;
  /** By disk: whether a restore attaches the image afresh (see detachDisks). */
  detachedDisks: boolean[];
  /** Time the VM was paused for the snapshot, ms. */
  pausedMs: number;
}

/** How the VM ended. */
export interface VmExit {
  /**
   * "halted": every vCPU halted with interrupts off (how Linux without ACPI powers off);
   * "poweroff"/"reset": the guest asked for it; "stopped": this process stopped the VM
   * (stop(), a timeout, a signal); "error": KVM could not run the guest; "panic": the
   * guest's kernel panicked (it said so through pvpanic or KVM's crash event, or its
   * console printed "Kernel panic" before it reset, halted or powered off).
   */
  kind: "halted" | "poweroff" | "reset" | "stopped" | "error" | "panic";
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
  /** Node had started (its own bootstrap, before any of tskvm's code). */
  nodeReady: number;
  /** startVm() asked for the machine: Node, module loading, options, the default guest. */
  createBegin: number;
  /** Stages of the build, each when it ended: KVM and the VM, guest RAM, virtio devices, kernel and initrd loaded, vCPUs created. */
  built: { vm: number; ram: number; devices: number; boot: number; vcpus: number };
  /** The machine was built: KVM, RAM, kernel and initrd, devices, vCPUs. */
  createEnd: number;
  /** The boot vCPU's thread had loaded its code (it starts when the build begins). */
  bootThreadLoaded: number;
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
  /** "user" when eth0 is on passt's user-mode network. */
  net: "user" | undefined;
  /** The forwards in effect, e.g. "tcp:127.0.0.1:2222:22" (the automatic SSH one included). */
  forwards: string[];
  /** The host port that reaches the guest's SSH (net "user"), else undefined. */
  sshPort: number | undefined;
  /** The default guest's SSH key (OpenSSH format) when its initrd boots, else undefined. */
  sshKey: string | undefined;
  /** A command that logs into the guest: "ssh -p PORT -i KEY root@127.0.0.1" (net "user"), else undefined. */
  sshCommand: string | undefined;
  agent: boolean;
  /** True when the kernel (and initrd) are the default guest's. */
  defaultGuest: boolean;
  /** The snapshot directory the VM was restored from. */
  restoredFrom?: string;
  /** The shares, with their tags (the host's root file system's not included). */
  shares: Share[];
  /** "host" when the guest runs in the host's root file system. */
  rootfs: "host" | undefined;
}

/** What the guest agent reports when it is ready. */
export interface ReadyInfo {
  /** The guest's CPU count. */
  nproc: number;
  /** Tags of shares the default guest's /init could not mount (empty: all mounted). */
  unmounted: string[];
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
  /** The directory to run it in, in the guest (default /): a share's path, say. */
  cwd?: string;
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
