/**
 * The TypeScript API: start a VM, watch its console, run commands in the guest through the
 * guest agent, stop it. `tskvm boot` and `tskvm run` are built on it. docs/api.md has the
 * guide; src/api/protocol.ts the channel layout.
 */
import { EventEmitter } from "node:events";
import { Socket } from "node:net";
import { closeSync, openSync, writeSync } from "node:fs";
import * as sys from "../sys/libc";
import { Machine, type MachineResult } from "../vmm/machine";
import { InitrdError, KernelImageError } from "../boot/errors";
import type { SerialSinkSpec } from "../board/devices";
import { VmError, VmExitedError, VmTimeoutError, GuestAgentError, VmSnapshotError, VmStartError, type VmWait } from "./errors";
import {
  Channel,
  ChannelDemux,
  LineSplitter,
  POWEROFF_REQUEST,
  SNAPSHOT_PREPARE_COMMAND,
  commandLine,
  mountedDisks,
  parseControlLine,
  restorePrepareCommand,
  runRequest,
  shellQuote,
  unmountedShares,
} from "./protocol";
import { checkBeforeStart, checkKvmBeforeStart, checkOptions, needsDefaultGuest, readInputFile, resolveBootFiles, toStartError, withDriverModules, type UserNetConfig } from "./start";
import { buildDefaultGuestAsync, findDefaultGuest, type GuestManifest } from "./default-guest";
import { SnapshotError, readSnapshotDir, type Json } from "../vmm/snapshot/format";
import { parseDiskOption } from "./option-values";
import { TSKVM_VERSION } from "./version";
import type { ConsoleMode, ReadyInfo, RunOptions, RunResult, SnapshotInfo, SnapshotOptions, VmExit, VmInfo, VmOptions, VmStartupTimeline } from "./types";
import { ShareServers } from "./share-servers";
import { checkShareDirectory, requireVirtiofsd } from "../host/virtiofsd";
import { GUEST_SSH_PORT, Passt, checkHostPort, checkPasstHost, formatForward, parseForward, type PortForward } from "../host/passt";
import { type Share, parseShareOption, resolveShares, shareMountCommand } from "./shares";
import { describeExit } from "../host/helper-process";
import { describeIoEngine } from "../host/io-engine";

/** The pipe the UARTs share, made large so that a busy event loop does not stall the vCPUs. */
const MUX_PIPE_BYTES = 1024 * 1024;
const DEFAULT_CONSOLE_RETAIN = 1024 * 1024;
const DEFAULT_POWEROFF_TIMEOUT_MS = 60_000;

/** Where a console match was found, as offsets into everything the console has printed. */
export interface ConsoleMatch {
  /** The matched text. */
  text: string;
  /** Offset of the match's first byte; pass `end` as `after` to look for what follows. */
  index: number;
  end: number;
  /** The RegExp's match (groups), for a RegExp pattern. */
  match?: RegExpExecArray;
}

export interface WaitForConsoleOptions {
  /** Default: no limit (the wait still ends when the VM does). */
  timeoutMs?: number;
  /** Only look at output from this offset on (default 0: everything retained). */
  after?: number;
}

interface PendingRun {
  id: number;
  options: RunOptions;
  stdout: Buffer[];
  stderr: Buffer[];
  sentAt: number;
  startedAt: number | undefined;
  timer: NodeJS.Timeout | undefined;
  resolve: (r: RunResult) => void;
  reject: (e: Error) => void;
}

interface ConsoleWaiter {
  pattern: string | RegExp;
  after: number;
  timer: NodeJS.Timeout | undefined;
  resolve: (m: ConsoleMatch) => void;
  reject: (e: Error) => void;
}

/**
 * Start a VM. Resolves once its vCPUs are running (the guest is booting); use ready() to
 * wait for the guest agent, waitForConsole() for console output. Rejects with a
 * VmStartError, whose `failure` says why ("options", "input", "host", "stopped", "internal").
 */
export async function startVm(options: VmOptions = {}): Promise<Vm> {
  if (options.restore !== undefined) return restoreVm(options.restore, options);
  let host: HostIo | undefined;
  let machine: Machine | undefined;
  const signal = options.signal;
  const stopped = () => new VmStartError("stopped", "the start-up was stopped (its signal was aborted)");
  let shareServers: ShareServers | undefined;
  let passt: Passt | undefined;
  try {
    if (signal?.aborted) throw stopped();
    const checked = checkOptions(options);
    // A missing share or virtiofsd is the user's to fix before anything is built or started.
    for (const share of checked.shares) checkShareDirectory(share.hostPath);
    if (checked.shares.length > 0 || checked.rootfsHost) requireVirtiofsd();
    const checkedFiles = checkBeforeStart(options, checked);
    host = openHostIo(options, checked.agent);
    // A forward to a port this user may not bind is a bad option: said before "no KVM".
    for (const f of checked.userNet?.forwards ?? []) await checkHostPort(f);
    // passt missing, or no default route for it: this host's state, said whether or not it has KVM.
    if (checked.userNet !== undefined) checkPasstHost();
    checkKvmBeforeStart(options, checked);
    // Building the default guest takes minutes: never synchronously, so a signal can stop it.
    let guest: GuestManifest | undefined;
    if (needsDefaultGuest(options, checked.agent) && options.buildGuest !== false) {
      guest = findDefaultGuest();
      if (guest === undefined) {
        options.onProgress?.("building the default guest (minutes, once)");
        guest = await buildDefaultGuestAsync(signal);
      }
    }
    if (signal?.aborted) throw stopped();
    const files = resolveBootFiles(options, checked.agent, guest);
    if (checked.rootfsHost && (options.initrd !== undefined || files.initrdPath === undefined)) {
      throw new VmStartError("options", (n) => `${n("rootfs")} host needs the default guest's initrd (its /init mounts the host's root file system): give no ${n("initrd")}`, { option: "rootfs" });
    }
    const read = (path: string, what: string, already: { path: string; bytes: Uint8Array } | undefined) =>
      already?.path === path ? already.bytes : readInputFile(path, what);
    const kernel = read(files.kernelPath, "kernel image", checkedFiles.kernel);
    let initrd = files.initrdPath === undefined ? undefined : read(files.initrdPath, "initrd", checkedFiles.initrd);
    if (options.modules !== undefined) initrd = withDriverModules(initrd, kernel, options.modules);
    const { capture, mux, logFd } = host;
    if (checked.userNet !== undefined) {
      // Last of the checks that need no KVM, first of what must be undone on failure.
      passt = await Passt.start({ forwards: checked.userNet.forwards, sshForward: checked.userNet.sshForward });
    }
    const cmdline = [files.cmdline.trim(), ...checked.extraArgs].filter((a) => a !== "").join(" ");
    shareServers = await ShareServers.start(checked.shares, checked.rootfsHost);
    try {
      machine = Machine.create({
        memoryBytes: checked.memoryBytes,
        cpus: checked.cpus,
        ...host.serial,
        boot: {
          kind: "linux",
          kernel,
          ...(initrd !== undefined ? { initrd } : {}),
          cmdline,
          ...(options.entry !== undefined ? { prefer: options.entry } : {}),
        },
        ...(options.cpuTemplate !== undefined ? { cpuTemplate: options.cpuTemplate } : {}),
        ...(options.ioEngine !== undefined ? { ioEngine: options.ioEngine } : {}),
        hideFeatures: options.hideCpuFeatures ?? [],
        disks: checked.disks,
        nics: passt === undefined ? checked.nics : [...checked.nics, { stream: { fd: passt.fd, name: "passt", reportsOwnLoss: true } }],
        shares: shareServers.configs,
        rng: checked.rng,
        ...(options.kvmPath !== undefined ? { kvmPath: options.kvmPath } : {}),
      });
    } catch (e) {
      if (e instanceof KernelImageError) throw e.withPath(files.kernelPath);
      if (e instanceof InitrdError && files.initrdPath !== undefined) throw e.withPath(files.initrdPath);
      throw e;
    }
    const info: VmInfo = {
      kernel: files.kernelPath,
      initrd: files.initrdPath,
      cmdline: machine.boot.cmdline ?? cmdline,
      bootDescription: machine.boot.description,
      memoryBytes: checked.memoryBytes,
      cpus: checked.cpus,
      cpuTemplate: machine.cpuTemplate,
      ioEngine: machine.ioEngine === undefined ? undefined : describeIoEngine(machine.ioEngine),
      disks: checked.disks.map((d) => d.path),
      taps: checked.nics.map((n) => n.tap),
      net: passt !== undefined ? "user" : undefined,
      forwards: passt?.forwards.map(formatForward) ?? [],
      sshPort: passt?.sshPort,
      sshKey: files.sshKey,
      sshCommand: passt === undefined ? undefined : sshCommand(passt, files.sshKey),
      agent: checked.agent,
      defaultGuest: files.defaultGuest,
      shares: checked.shares,
      rootfs: checked.rootfsHost ? "host" : undefined,
    };
    const vm = new Vm(machine, info, {
      capture,
      mux,
      logFd,
      passt,
      userNet: checked.userNet,
      retain: options.consoleRetain ?? DEFAULT_CONSOLE_RETAIN,
      shareServers,
      ...(options.onWarning !== undefined ? { onWarning: options.onWarning } : {}),
    });
    await vm.started;
    if (signal?.aborted) {
      await vm.stop("start-up stopped");
      throw stopped();
    }
    return vm;
  } catch (e) {
    if (machine === undefined) {
      host?.close();
      await shareServers?.stop();
      await passt?.stop();
    }
    // Whatever failed while the start-up was being stopped failed because of that.
    if (signal?.aborted) throw stopped();
    throw toStartError(e);
  }
}

/** The host ends of the serial ports: the shared output pipe, the console log. */
interface HostIo {
  capture: boolean;
  mux: { read: number; write: number } | undefined;
  logFd: number | undefined;
  /** The machine's console and aux UART settings. */
  serial: { consoleFd: number; consoleTag?: number; auxSerialSinks: (SerialSinkSpec | undefined)[] };
  close(): void;
}

function openHostIo(options: VmOptions, agent: boolean): HostIo {
  let logFd: number | undefined;
  let mux: { read: number; write: number } | undefined;
  const consoleMode: ConsoleMode = options.console ?? "capture";
  const close = () => {
    if (mux !== undefined) {
      sys.close(mux.read);
      sys.close(mux.write);
    }
    if (logFd !== undefined) closeSync(logFd);
  };
  try {
    if (options.consoleLog !== undefined) {
      try {
        logFd = openSync(options.consoleLog, "w");
      } catch (e) {
        throw new VmStartError("input", `console log '${options.consoleLog}' cannot be written (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`);
      }
    }
    const capture = consoleMode === "capture";
    if (capture || agent) {
      const [read, write] = sys.pipe2();
      mux = { read, write };
      try {
        sys.fcntl(write, sys.F_SETPIPE_SZ, MUX_PIPE_BYTES);
      } catch {
        // A smaller pipe (the default 64 KiB) works too.
      }
    }
    const tagged = (tag: number): SerialSinkSpec | undefined => (agent ? { fd: mux!.write, tag } : undefined);
    return {
      capture,
      mux,
      logFd,
      serial: {
        consoleFd: capture ? mux!.write : (consoleMode as { fd: number }).fd,
        ...(capture ? { consoleTag: Channel.CONSOLE } : {}),
        auxSerialSinks: [tagged(Channel.CONTROL), tagged(Channel.STDOUT), tagged(Channel.STDERR)],
      },
      close,
    };
  } catch (e) {
    close();
    throw e;
  }
}

/** Options that shape the machine, which a snapshot fixes. */
const MACHINE_OPTIONS = ["kernel", "initrd", "cmdline", "appendCmdline", "memory", "cpus", "nics", "net", "forwards", "sshForward", "rootfs", "rng", "guestIp", "cpuTemplate", "hideCpuFeatures", "entry", "agent"] as const;

/** What the API keeps with a snapshot (SnapshotBody.annotations). */
interface SnapshotAnnotations {
  /** The agent had reported ready (its nproc), or not (null). */
  agent: { nproc: number } | null;
  info: Pick<VmInfo, "kernel" | "initrd" | "cmdline" | "agent" | "defaultGuest" | "sshKey">;
  /** The shares (none used by the guest yet: Machine.snapshot checks), where they were and mount. */
  shares: Share[];
  /** net "user": the forwards asked for (the automatic SSH one is chosen afresh), or null. */
  userNet: { forwards: PortForward[]; sshForward: boolean } | null;
}

function readAnnotations(dir: string, v: unknown): SnapshotAnnotations {
  const bad = (): never => {
    throw new SnapshotError("corrupted", `snapshot ${dir} is corrupted: its API annotations are not what this tskvm writes`);
  };
  if (typeof v !== "object" || v === null) bad();
  const o = v as Record<string, unknown>;
  const agent = o["agent"];
  const info = o["info"] as Record<string, unknown> | undefined;
  if (agent !== null && (typeof agent !== "object" || typeof (agent as { nproc?: unknown }).nproc !== "number")) bad();
  if (typeof info !== "object" || info === null || typeof info["kernel"] !== "string" || typeof info["agent"] !== "boolean") bad();
  // Snapshots from before shares and passt could be saved have neither field.
  const shares = o["shares"] ?? [];
  if (!Array.isArray(shares)) bad();
  const savedShares = (shares as unknown[]).map((x): Share => {
    const sh = x as Record<string, unknown>;
    if (typeof sh !== "object" || sh === null || typeof sh["hostPath"] !== "string" || typeof sh["tag"] !== "string" || typeof sh["readOnly"] !== "boolean") bad();
    return { hostPath: sh["hostPath"] as string, tag: sh["tag"] as string, readOnly: sh["readOnly"] as boolean };
  });
  const net = o["userNet"] ?? null;
  let userNet: SnapshotAnnotations["userNet"] = null;
  if (net !== null) {
    const n = net as Record<string, unknown>;
    if (typeof n !== "object" || !Array.isArray(n["forwards"]) || typeof n["sshForward"] !== "boolean") bad();
    try {
      userNet = { forwards: (n["forwards"] as unknown[]).map((f) => parseForward(String(f))), sshForward: n["sshForward"] as boolean };
    } catch {
      bad();
    }
  }
  return {
    agent: agent as { nproc: number } | null,
    info: {
      kernel: info!["kernel"] as string,
      initrd: typeof info!["initrd"] === "string" ? (info!["initrd"] as string) : undefined,
      cmdline: typeof info!["cmdline"] === "string" ? (info!["cmdline"] as string) : "",
      agent: info!["agent"] as boolean,
      defaultGuest: info!["defaultGuest"] === true,
      sshKey: typeof info!["sshKey"] === "string" ? (info!["sshKey"] as string) : undefined,
    },
    shares: savedShares,
    userNet,
  };
}

/**
 * Rebuild a VM from a snapshot directory and let it go on. The guest agent, when the
 * snapshot had it ready, is ready again once the guest's wall clock is set and per-run
 * disks are re-read (see restorePrepareCommand).
 */
async function restoreVm(dir: string, options: VmOptions): Promise<Vm> {
  let host: HostIo | undefined;
  let machine: Machine | undefined;
  let shareServers: ShareServers | undefined;
  let passt: Passt | undefined;
  try {
    const given = MACHINE_OPTIONS.filter((o) => options[o] !== undefined);
    if (given.length > 0) {
      throw new VmStartError("options", `a restored VM is the machine its snapshot saved: leave out ${given.join(", ")}`, { option: "restore" });
    }
    const snapshot = readSnapshotDir(dir, { tskvmVersion: TSKVM_VERSION });
    const annotations = readAnnotations(dir, snapshot.body.annotations);
    const disks = (options.disks ?? []).map((d) => (typeof d === "string" ? parseDiskOption(d).path : d.path));
    const shares = restoredShares(dir, annotations.shares, options.shares);
    for (const share of shares) checkShareDirectory(share.hostPath);
    if (shares.length > 0) requireVirtiofsd();
    if (annotations.userNet !== null) {
      for (const f of annotations.userNet.forwards) await checkHostPort(f);
      checkPasstHost();
    }
    host = openHostIo(options, annotations.info.agent);
    // Fresh helpers, as at a boot: a virtiofsd per share on its directory as it is now (the
    // guest had never used the share), a passt with the same forwards.
    if (annotations.userNet !== null) passt = await Passt.start({ forwards: annotations.userNet.forwards, sshForward: annotations.userNet.sshForward });
    shareServers = await ShareServers.start(shares, false);
    machine = Machine.restore({
      snapshot,
      ...host.serial,
      ...(options.kvmPath !== undefined ? { kvmPath: options.kvmPath } : {}),
      diskPaths: disks,
      shares: shareServers.configs,
      streams: passt === undefined ? [] : [{ fd: passt.fd, name: "passt", reportsOwnLoss: true }],
    });
    const info: VmInfo = {
      ...annotations.info,
      bootDescription: machine.boot.description,
      memoryBytes: machine.memory.totalBytes,
      cpus: machine.cpus,
      cpuTemplate: machine.cpuTemplate,
      disks: machine.diskPaths(),
      ioEngine: machine.ioEngine === undefined ? undefined : describeIoEngine(machine.ioEngine),
      shares,
      // The host's root file system serves the guest from boot: never snapshotted.
      rootfs: undefined,
      net: passt !== undefined ? "user" : undefined,
      forwards: passt?.forwards.map(formatForward) ?? [],
      sshPort: passt?.sshPort,
      sshKey: annotations.info.sshKey,
      sshCommand: passt === undefined ? undefined : sshCommand(passt, annotations.info.sshKey),
      taps: machine.tapNames(),
      restoredFrom: dir,
    };
    const vm = new Vm(machine, info, {
      capture: host.capture,
      mux: host.mux,
      logFd: host.logFd,
      passt,
      userNet: annotations.userNet ?? undefined,
      shareServers,
      retain: options.consoleRetain ?? DEFAULT_CONSOLE_RETAIN,
      ...(options.onWarning !== undefined ? { onWarning: options.onWarning } : {}),
      restored: {
        agent: annotations.agent ?? undefined,
        detachedDisks: machine.detachedDisks(),
        mountShares: options.mountShares !== false,
        nudgeNetwork: passt !== undefined,
      },
    });
    await vm.started;
    return vm;
  } catch (e) {
    if (machine === undefined) host?.close();
    else machine.destroy();
    // After the machine (whose I/O worker used their connections); both are idempotent.
    await shareServers?.stop();
    await passt?.stop();
    throw toStartError(e);
  }
}

/**
 * The shares of a restored VM: the snapshot's tags and read-only flags, served from (and
 * mounted at) the `given` directories, in order, or without them where they were at the
 * snapshot.
 */
function restoredShares(dir: string, saved: readonly Share[], given: VmOptions["shares"]): Share[] {
  if (given === undefined || given.length === 0) return saved.map((s) => ({ ...s }));
  const asked = given.map((s) => (typeof s === "string" ? parseShareOption(s) : s));
  const resolved = resolveShares(asked);
  if (resolved.length !== saved.length) {
    throw new VmStartError("options", (n) => `snapshot ${dir} has ${saved.length} share${saved.length === 1 ? "" : "s"}; ${resolved.length} ${n("shares")} were given`, { option: "shares" });
  }
  return saved.map((s, i) => {
    const a = asked[i]!;
    if ((a.tag !== undefined && a.tag !== s.tag) || (a.readOnly !== undefined && a.readOnly !== s.readOnly)) {
      throw new VmStartError("options", (n) => `snapshot ${dir} has share ${s.tag}${s.readOnly ? " (read-only)" : ""} in place ${i + 1}: give ${n("shares")} with its tag and read-only flag, or none`, { option: "shares" });
    }
    // Mounted at the given directory's path, as at a boot (the CLI gives the same path: it is in the snapshot key).
    return { hostPath: resolved[i]!.hostPath, tag: s.tag, readOnly: s.readOnly };
  });
}

/**
 * A running VM. Events: "console" (Buffer: console output, with console "capture"),
 * "stdout" and "stderr" (Buffer: any command's output), "warning" (string, unless
 * VmOptions.onWarning takes them), "registers" ({ vcpu, dump }: after dumpRegisters()),
 * "exit" (VmExit).
 */
export class Vm extends EventEmitter {
  /** Resolves when the VM has ended and everything it held is released. Never rejects. */
  readonly exited: Promise<VmExit>;
  /** @internal */
  readonly started: Promise<void>;
  private exitInfo: VmExit | undefined;
  private readonly capture: boolean;
  private readonly logFd: number | undefined;
  private readonly retain: number;
  private consoleBuf = "";
  /** Offset (in everything the console printed) of consoleBuf's first character. */
  private consoleBase = 0;
  private consoleWaiters: ConsoleWaiter[] = [];
  private readyInfo: ReadyInfo | undefined;
  private readyWaiters: { resolve: (r: ReadyInfo) => void; reject: (e: Error) => void }[] = [];
  private current: PendingRun | undefined;
  private runChain: Promise<void> = Promise.resolve();
  private nextId = 1;
  private muxSocket: Socket | undefined;
  private muxWriteFd: number | undefined;
  private agentBusyWithPoweroff = false;
  private readonly shareServers: ShareServers | undefined;
  private readonly passt: Passt | undefined;
  private readonly userNet: UserNetConfig | undefined;

  /** @internal Use startVm(). */
  constructor(
    private readonly machine: Machine,
    readonly info: VmInfo,
    io: {
      capture: boolean;
      mux: { read: number; write: number } | undefined;
      logFd: number | undefined;
      retain: number;
      shareServers?: ShareServers;
      onWarning?: (message: string) => void;
      /**
       * A restored VM: the agent's state at the snapshot, the per-run disks to re-read,
       * whether to mount the shares (info.shares) and to nudge the network (a fresh passt).
       */
      restored?: { agent: { nproc: number } | undefined; detachedDisks: { index: number; sectors: number }[]; mountShares: boolean; nudgeNetwork: boolean };
      /** The user-mode network's passt, stopped when the VM ends. */
      passt?: Passt | undefined;
      /** net "user" as asked (the forwards without the automatic SSH one), for a snapshot. */
      userNet?: UserNetConfig | undefined;
    },
  ) {
    super();
    this.userNet = io.userNet;
    const onWarning = io.onWarning ?? ((message: string) => this.emit("warning", message));
    this.shareServers = io.shareServers;
    this.shareServers?.watch(onWarning);
    this.passt = io.passt;
    // passt dying is the guest's network going away, not the VM's end: one line, and the
    // device takes eth0's link down (it sees the socket close).
    void io.passt?.exited.then((e) => {
      if (e.expected || this.exitInfo !== undefined) return;
      // Its last words matter when it gave up by itself; after a signal they are old news.
      const last = e.signal === null ? io.passt!.lastLine() : "";
      onWarning(`passt ${describeExit(e)}${last === "" ? "" : ` (${last})`}: the guest's network (eth0) is down; the VM keeps running`);
    });
    machine.onDiagnostic = (d) => {
      if (d.kind === "warning") onWarning(d.message);
      else this.emit("registers", { vcpu: d.vcpu, dump: d.dump });
    };
    this.capture = io.capture;
    this.logFd = io.logFd;
    this.retain = Math.max(4096, io.retain);
    let muxEnded: Promise<void> = Promise.resolve();
    if (io.mux !== undefined) {
      this.muxWriteFd = io.mux.write;
      const socket = new Socket({ fd: io.mux.read, readable: true, writable: false });
      this.muxSocket = socket;
      const control = new LineSplitter((line) => this.onControlLine(line));
      const demux = new ChannelDemux((tag, bytes) => {
        if (tag === Channel.CONSOLE) this.onConsole(bytes);
        else if (tag === Channel.CONTROL) control.push(bytes);
        else if (tag === Channel.STDOUT) this.onOutput("stdout", bytes);
        else if (tag === Channel.STDERR) this.onOutput("stderr", bytes);
      });
      muxEnded = new Promise((resolve) => {
        socket.on("data", (chunk: Buffer) => demux.push(chunk));
        socket.on("end", () => resolve());
        socket.on("close", () => resolve());
        socket.on("error", () => resolve());
      });
    }
    const running = machine.run();
    this.started = machine.allStarted();
    const restoredAgent = io.restored?.agent;
    if (restoredAgent !== undefined) this.settleRestoredGuest(restoredAgent, io.restored!);
    this.exited = running.then(
      async (result) => this.finish(result, muxEnded),
      async (e: unknown) =>
        this.finish({ stop: { kind: "error", reason: `the VM failed: ${(e as Error).message}` }, requestedBy: undefined, vcpus: [], counters: { pio: 0, mmio: 0, unclaimedPio: 0, unclaimedMmio: 0, other: 0 }, exits: { reasons: [], pio: [], mmio: [] } }, muxEnded),
    );
  }

  // ---- lifecycle ----

  /** Where start-up time went (ms since the process started); firstKvmRun is NaN until the boot vCPU runs. */
  startupTimeline(): VmStartupTimeline {
    return this.machine.startupTimeline();
  }

  /** What sits at an I/O port or MMIO address ("COM1 (16550A) +5"), to name exits by. */
  deviceAt(space: "pio" | "mmio", address: number): string | undefined {
    return this.machine.deviceAt(space, address);
  }

  /** How the VM ended, once it has (else undefined). */
  get exit(): VmExit | undefined {
    return this.exitInfo;
  }

  /** The host port (on 127.0.0.1) forwarded to the guest's SSH with net "user", else undefined. */
  get sshPort(): number | undefined {
    return this.info.sshPort;
  }

  /** End the VM now from the host side (no guest shutdown). Resolves when it has ended. */
  stop(reason = "stopped through the API"): Promise<VmExit> {
    this.machine.stop(reason);
    return this.exited;
  }

  /**
   * Power the guest off: through the agent (which syncs the guest's file systems first) when
   * it is idle, otherwise, or after `timeoutMs` (default 60 s), by stopping the VM.
   */
  async poweroff(options: { timeoutMs?: number } = {}): Promise<VmExit> {
    if (this.exitInfo !== undefined) return this.exitInfo;
    if (!this.info.agent || this.readyInfo === undefined || this.current !== undefined) {
      return this.stop("power-off requested while the guest agent was not available");
    }
    this.agentBusyWithPoweroff = true;
    this.machine.sendSerialInput(1, Buffer.from(POWEROFF_REQUEST));
    const timeoutMs = options.timeoutMs ?? DEFAULT_POWEROFF_TIMEOUT_MS;
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<"timeout">((resolve) => {
      timer = setTimeout(() => resolve("timeout"), timeoutMs);
    });
    const r = await Promise.race([this.exited, timedOut]);
    clearTimeout(timer);
    if (r === "timeout") return this.stop(`the guest did not power off within ${formatMs(timeoutMs)}`);
    return r;
  }

  // ---- pause, snapshot ----

  /** True while the VM is paused. */
  get paused(): boolean {
    return this.machine.isPaused;
  }

  /**
   * Pause the VM: every vCPU out of the guest and parked, every virtio device quiesced (no
   * request in flight). The guest's clocks go on; resume() lets it run again.
   */
  async pause(): Promise<void> {
    if (this.exitInfo !== undefined) throw new VmExitedError("pause", this.exitInfo, `the VM has ended (${this.exitInfo.reason})`);
    try {
      await this.machine.pause();
    } catch (e) {
      if (this.exitInfo !== undefined || e instanceof SnapshotError) throw new VmSnapshotError("state", (e as Error).message);
      throw e;
    }
  }

  /** Let a paused VM run again (a no-op when it is not paused). */
  resume(): void {
    this.machine.resume();
  }

  /**
   * Save the VM into `dir` (which must not exist yet; its parent must): KVM, device and
   * guest agent state, the configuration, and guest RAM (sparse). The VM is paused for the
   * time it takes and then goes on (a VM paused by pause() stays paused). Start another VM
   * from it with startVm({ restore: dir }). Rejects with VmSnapshotError ("unwritable":
   * the directory; "state": a command is running, the VM ended, ...); the VM keeps running.
   */
  async snapshot(dir: string, options: SnapshotOptions = {}): Promise<SnapshotInfo> {
    if (this.exitInfo !== undefined) throw new VmSnapshotError("state", `the VM has ended (${this.exitInfo.reason})`);
    if (this.info.rootfs === "host") {
      throw new VmSnapshotError("state", "a VM on the host's root file system (rootfs host) cannot be snapshotted: virtiofsd serves it from boot, and its FUSE session cannot be saved");
    }
    let detached: boolean[] | undefined;
    if (options.detachDisks === true && this.info.disks.length > 0) {
      this.requireAgent();
      const r = await this.run(SNAPSHOT_PREPARE_COMMAND);
      if (r.status !== 0) throw new VmSnapshotError("state", `the guest could not drop its disk caches (status ${r.status}): ${r.stderr.trim().split("\n")[0] ?? ""}`);
      const mounted = mountedDisks(r.stdout);
      detached = this.info.disks.map((_, i) => !mounted.has(i));
    }
    // The agent must be idle (listening): a snapshot in the middle of a command would
    // restore a guest whose command no one waits for.
    const previous = this.runChain;
    let release!: () => void;
    this.runChain = new Promise((resolve) => (release = resolve));
    try {
      await previous;
      const wasPaused = this.machine.isPaused;
      const t0 = Date.now();
      await this.pause();
      try {
        const annotations: SnapshotAnnotations = {
          agent: this.readyInfo ?? null,
          info: { kernel: this.info.kernel, initrd: this.info.initrd, cmdline: this.info.cmdline, agent: this.info.agent, defaultGuest: this.info.defaultGuest, sshKey: this.info.sshKey },
          shares: this.info.shares,
          userNet: this.userNet === undefined ? null : { forwards: this.userNet.forwards, sshForward: this.userNet.sshForward },
        };
        // Forwards as their text (readAnnotations parses them back).
        const stored = { ...annotations, userNet: annotations.userNet === null ? null : { ...annotations.userNet, forwards: annotations.userNet.forwards.map(formatForward) } };
        const written = this.machine.snapshot(dir, {
          tskvmVersion: TSKVM_VERSION,
          ...(detached !== undefined ? { detachedDisks: detached } : {}),
          annotations: stored as unknown as Json,
        });
        return {
          dir,
          ramBytes: written.ram.bytes,
          ramDataBytes: written.ram.dataBytes,
          ramTouchedBytes: written.ram.touchedBytes,
          stateBytes: written.stateBytes,
          detachedDisks: detached ?? this.info.disks.map(() => false),
          pausedMs: Date.now() - t0,
        };
      } catch (e) {
        if (e instanceof SnapshotError) throw new VmSnapshotError(e.kind, e.message, e.raced);
        throw e;
      } finally {
        if (!wasPaused) this.machine.resume();
      }
    } finally {
      release();
    }
  }

  /**
   * A restored guest's agent was listening at the snapshot: set the guest's wall clock and
   * have it re-read its per-run disks, then report it ready. Commands wait for that.
   */
  private settleRestoredGuest(agent: { nproc: number }, restored: { detachedDisks: { index: number; sectors: number }[]; mountShares: boolean; nudgeNetwork: boolean }): void {
    const mounts = restored.mountShares ? this.info.shares.map((s) => ({ tag: s.tag, command: shareMountCommand(s) })) : [];
    const command = restorePrepareCommand(Date.now() / 1000, restored.detachedDisks, { mounts, nudgeNetwork: restored.nudgeNetwork });
    const settle = this.runNow((id) => runRequest(id, command), { capture: true });
    settle.then(
      (r) => {
        if (r.status !== 0) this.emit("warning", `setting up the restored guest failed (status ${r.status}): ${r.stderr.trim()}`);
        const ready: ReadyInfo = { ...agent, unmounted: unmountedShares(r.stdout) };
        this.readyInfo = ready;
        for (const w of this.readyWaiters.splice(0)) w.resolve(ready);
      },
      () => undefined, // the VM ended: ready() waiters are rejected by finish()
    );
  }

  /**
   * Mount the shares in the default guest through its agent, each at its path (for a VM
   * started with mountShares: false, e.g. after a snapshot). Resolves with the tags of those
   * that could not be mounted (empty: all mounted).
   */
  async mountShares(): Promise<string[]> {
    this.requireAgent();
    if (this.info.shares.length === 0) return [];
    const mounts = this.info.shares.map((s) => `{ ${shareMountCommand(s)}; } >/dev/null 2>&1 || echo tskvm-unmounted ${s.tag}`);
    const r = await this.run(mounts.join("; "), { capture: true });
    return unmountedShares(r.stdout);
  }

  /** Have every vCPU report its registers, each as a "registers" event (where is the guest?). */
  dumpRegisters(): void {
    this.machine.dumpRegisters();
  }

  private async finish(result: MachineResult, muxEnded: Promise<void>): Promise<VmExit> {
    // Every vCPU thread has ended: nothing writes to the pipe any more. Closing our write
    // end lets the reader drain what is left and see the end.
    if (this.muxWriteFd !== undefined) {
      sys.close(this.muxWriteFd);
      this.muxWriteFd = undefined;
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([muxEnded, new Promise<void>((resolve) => (timer = setTimeout(resolve, 2000)))]);
      clearTimeout(timer);
      this.muxSocket?.destroy();
    }
    let cleanup = "";
    try {
      this.machine.destroy();
    } catch (e) {
      cleanup = ` (releasing the VM failed: ${(e as Error).message})`;
    }
    // Only now: the I/O worker that used their connections (passt's socket, virtiofsd's) has ended.
    await this.shareServers?.stop();
    await this.passt?.stop();
    if (this.logFd !== undefined) closeSync(this.logFd);
    const stop = result.stop;
    const exit: VmExit =
      stop.kind === "stopped"
        ? { kind: "stopped", reason: `stopped (${result.requestedBy ?? "on request"})`, ...(result.requestedBy !== undefined ? { requestedBy: result.requestedBy } : {}) }
        : stop.kind === "error"
          ? { kind: "error", reason: stop.reason, ...(stop.dump !== undefined ? { dump: stop.dump } : {}) }
          : { kind: stop.kind, reason: stop.reason };
    exit.reason += cleanup;
    exit.exits = result.exits;
    this.exitInfo = exit;
    const ended = (what: VmWait) => new VmExitedError(what, exit, `the VM ended (${exit.reason}) while waiting for ${describeWait(what)}`);
    for (const w of this.readyWaiters.splice(0)) w.reject(ended("ready"));
    for (const w of this.consoleWaiters.splice(0)) {
      clearTimeout(w.timer);
      w.reject(ended("console"));
    }
    const run = this.current;
    if (run !== undefined) {
      this.current = undefined;
      clearTimeout(run.timer);
      run.reject(ended("command"));
    }
    this.emit("exit", exit);
    return exit;
  }

  // ---- console ----

  private onConsole(bytes: Buffer): void {
    if (this.logFd !== undefined) writeSync(this.logFd, bytes);
    this.consoleBuf += bytes.toString("latin1");
    if (this.consoleBuf.length > this.retain) {
      const drop = this.consoleBuf.length - Math.floor(this.retain / 2);
      this.consoleBuf = this.consoleBuf.slice(drop);
      this.consoleBase += drop;
    }
    this.emit("console", bytes);
    if (this.consoleWaiters.length > 0) this.consoleWaiters = this.consoleWaiters.filter((w) => !this.tryConsoleWaiter(w));
  }

  /** Everything the console printed that is still retained (one character per byte). */
  consoleText(): string {
    this.requireCapture();
    return this.consoleBuf;
  }

  /** How many bytes the console has printed so far (an offset for waitForConsole's `after`). */
  get consoleLength(): number {
    return this.consoleBase + this.consoleBuf.length;
  }

  /** Type on the guest's serial console (COM1). */
  sendConsole(data: string | Uint8Array): void {
    this.machine.sendInput(typeof data === "string" ? Buffer.from(data, "utf8") : data);
  }

  /**
   * Wait until the console shows `pattern` (a substring or a RegExp) at or after `after`.
   * Rejects with VmTimeoutError, or VmExitedError when the VM ends first.
   */
  waitForConsole(pattern: string | RegExp, options: WaitForConsoleOptions = {}): Promise<ConsoleMatch> {
    this.requireCapture();
    return new Promise((resolve, reject) => {
      const w: ConsoleWaiter = { pattern, after: options.after ?? 0, timer: undefined, resolve, reject };
      if (this.tryConsoleWaiter(w)) return;
      if (this.exitInfo !== undefined) {
        reject(new VmExitedError("console", this.exitInfo, `the VM has ended (${this.exitInfo.reason}); ${String(pattern)} never appeared`));
        return;
      }
      if (options.timeoutMs !== undefined) {
        w.timer = setTimeout(() => {
          this.consoleWaiters = this.consoleWaiters.filter((x) => x !== w);
          reject(new VmTimeoutError("console", options.timeoutMs!, `${String(pattern)} did not appear on the console within ${formatMs(options.timeoutMs!)}`));
        }, options.timeoutMs);
      }
      this.consoleWaiters.push(w);
    });
  }

  private tryConsoleWaiter(w: ConsoleWaiter): boolean {
    const from = Math.max(0, w.after - this.consoleBase);
    const text = from === 0 ? this.consoleBuf : this.consoleBuf.slice(from);
    const base = this.consoleBase + from;
    let found: ConsoleMatch | undefined;
    if (typeof w.pattern === "string") {
      const at = text.indexOf(w.pattern);
      if (at >= 0) found = { text: w.pattern, index: base + at, end: base + at + w.pattern.length };
    } else {
      const re = new RegExp(w.pattern.source, w.pattern.flags.replace(/[gy]/g, ""));
      const m = re.exec(text);
      if (m !== null) found = { text: m[0], index: base + m.index, end: base + m.index + m[0].length, match: m };
    }
    if (found === undefined) return false;
    clearTimeout(w.timer);
    w.resolve(found);
    return true;
  }

  private requireCapture(): void {
    if (!this.capture) throw new VmError("the console is not captured: start the VM with console: \"capture\"");
  }

  // ---- the guest agent ----

  private onControlLine(line: string): void {
    const msg = parseControlLine(line);
    if (msg === undefined) return;
    if (msg.type === "ready") {
      this.readyInfo = { nproc: msg.nproc, unmounted: msg.unmounted };
      for (const w of this.readyWaiters.splice(0)) w.resolve(this.readyInfo);
      return;
    }
    const run = this.current;
    if (run === undefined || run.id !== msg.id) return;
    if (msg.type === "start") {
      run.startedAt = Date.now();
      return;
    }
    this.current = undefined;
    clearTimeout(run.timer);
    const text = (chunks: Buffer[]) => Buffer.concat(chunks).toString("utf8");
    run.resolve({ status: msg.status, stdout: text(run.stdout), stderr: text(run.stderr), durationMs: Date.now() - (run.startedAt ?? run.sentAt) });
  }

  private onOutput(stream: "stdout" | "stderr", bytes: Buffer): void {
    this.emit(stream, bytes);
    const run = this.current;
    if (run === undefined) return;
    if (stream === "stdout") run.options.onStdout?.(bytes);
    else run.options.onStderr?.(bytes);
    if (run.options.capture !== false) (stream === "stdout" ? run.stdout : run.stderr).push(bytes);
  }

  private requireAgent(): void {
    if (!this.info.agent) throw new GuestAgentError("the guest agent is off: start the VM with agent: true (the default)");
  }

  /**
   * Wait until the guest agent reports that it is listening (the guest has booted to its
   * /init). Resolves with the guest's CPU count and the tags of shares its /init could not
   * mount (a kernel without virtio-fs, say). Rejects with VmTimeoutError, or VmExitedError
   * when the VM ends first (a kernel panic resets it, for instance).
   */
  ready(options: { timeoutMs?: number } = {}): Promise<ReadyInfo> {
    this.requireAgent();
    if (this.readyInfo !== undefined) return Promise.resolve(this.readyInfo);
    if (this.exitInfo !== undefined) {
      return Promise.reject(new VmExitedError("ready", this.exitInfo, `the VM ended (${this.exitInfo.reason}) before the guest became ready`));
    }
    return new Promise((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const waiter = {
        resolve: (r: ReadyInfo) => {
          clearTimeout(timer);
          resolve(r);
        },
        reject: (e: Error) => {
          clearTimeout(timer);
          reject(e);
        },
      };
      if (options.timeoutMs !== undefined) {
        timer = setTimeout(() => {
          this.readyWaiters = this.readyWaiters.filter((w) => w !== waiter);
          reject(new VmTimeoutError("ready", options.timeoutMs!, `the guest did not become ready within ${formatMs(options.timeoutMs!)}`));
        }, options.timeoutMs);
      }
      this.readyWaiters.push(waiter);
    });
  }

  /**
   * Run a command in the guest with `sh -c`, in / (or `cwd`), stdin from /dev/null; commands run one at
   * a time, in call order. A string is a shell command line; an array is a program and its
   * arguments (quoted for you). Waits for ready() first (without a limit: call ready() with
   * a timeout to bound the boot). Resolves with the exit status and output; rejects with
   * VmTimeoutError after `timeoutMs` (the VM is then stopped), VmExitedError when the VM
   * ends during the command.
   */
  async run(command: string | readonly string[], options: RunOptions = {}): Promise<RunResult> {
    this.requireAgent();
    let request: (id: number) => string;
    try {
      let line = commandLine(command);
      if (options.cwd !== undefined) line = `cd -- ${shellQuote(options.cwd)} || exit; ${line}`;
      runRequest(0, line);
      request = (id) => runRequest(id, line);
    } catch (e) {
      throw new VmError((e as Error).message);
    }
    const previous = this.runChain;
    let release!: () => void;
    this.runChain = new Promise((resolve) => (release = resolve));
    try {
      await previous;
      await this.ready();
      return await this.runNow(request, options);
    } finally {
      release();
    }
  }

  private runNow(request: (id: number) => string, options: RunOptions): Promise<RunResult> {
    return new Promise((resolve, reject) => {
      if (this.exitInfo !== undefined) {
        reject(new VmExitedError("command", this.exitInfo, `the VM has ended (${this.exitInfo.reason})`));
        return;
      }
      if (this.agentBusyWithPoweroff) {
        reject(new VmError("the guest is powering off"));
        return;
      }
      const run: PendingRun = { id: this.nextId++, options, stdout: [], stderr: [], sentAt: Date.now(), startedAt: undefined, timer: undefined, resolve, reject };
      if (options.timeoutMs !== undefined) {
        const ms = options.timeoutMs;
        run.timer = setTimeout(() => {
          if (this.current !== run) return;
          this.current = undefined;
          reject(new VmTimeoutError("command", ms, `the command did not finish within ${formatMs(ms)}; the VM is stopped`));
          this.machine.stop(`command timed out after ${formatMs(ms)}`);
        }, ms);
      }
      this.current = run;
      this.machine.sendSerialInput(1, Buffer.from(request(run.id), "latin1"));
    });
  }
}

/** "ssh -p PORT -i KEY root@ADDRESS" for the forward to the guest's port 22, if there is one. */
function sshCommand(passt: Passt, key: string | undefined): string | undefined {
  const f = passt.forwards.find((x) => x.protocol === "tcp" && x.guestPort === GUEST_SSH_PORT && x.hostPort === passt.sshPort);
  if (f === undefined) return undefined;
  const host = f.hostAddress === "0.0.0.0" ? "127.0.0.1" : f.hostAddress;
  return `ssh -p ${f.hostPort}${key === undefined ? "" : ` -i ${shellQuote(key)}`} root@${host}`;
}

function describeWait(what: VmWait): string {
  return what === "ready" ? "the guest to become ready" : what === "console" ? "console output" : what === "command" ? "the command" : "the power-off";
}

export function formatMs(ms: number): string {
  return ms % 1000 === 0 ? `${ms / 1000} s` : `${(ms / 1000).toFixed(1)} s`;
}
