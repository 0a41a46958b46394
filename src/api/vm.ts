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
import { VmError, VmExitedError, VmTimeoutError, GuestAgentError, VmStartError, type VmWait } from "./errors";
import { Channel, ChannelDemux, LineSplitter, POWEROFF_REQUEST, commandLine, parseControlLine, runRequest } from "./protocol";
import { checkOptions, readInputFile, resolveBootFiles, toStartError } from "./start";
import type { ConsoleMode, RunOptions, RunResult, VmExit, VmInfo, VmOptions, VmStartupTimeline } from "./types";
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
 * VmStartError, whose `failure` says why ("options", "input", "host", "internal").
 */
export async function startVm(options: VmOptions = {}): Promise<Vm> {
  let logFd: number | undefined;
  let mux: { read: number; write: number } | undefined;
  let machine: Machine | undefined;
  try {
    const checked = checkOptions(options);
    const files = resolveBootFiles(options, checked.agent);
    const kernel = readInputFile(files.kernelPath, "kernel image");
    const initrd = files.initrdPath === undefined ? undefined : readInputFile(files.initrdPath, "initrd");
    const consoleMode: ConsoleMode = options.console ?? "capture";
    if (options.consoleLog !== undefined) {
      try {
        logFd = openSync(options.consoleLog, "w");
      } catch (e) {
        throw new VmStartError("input", `console log '${options.consoleLog}' cannot be written (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`);
      }
    }
    const capture = consoleMode === "capture";
    if (capture || checked.agent) {
      const [read, write] = sys.pipe2();
      mux = { read, write };
      try {
        sys.fcntl(write, sys.F_SETPIPE_SZ, MUX_PIPE_BYTES);
      } catch {
        // A smaller pipe (the default 64 KiB) works too.
      }
    }
    const tagged = (tag: number): SerialSinkSpec | undefined => (checked.agent ? { fd: mux!.write, tag } : undefined);
    const cmdline = [files.cmdline.trim(), ...checked.extraArgs].filter((a) => a !== "").join(" ");
    try {
      machine = Machine.create({
        memoryBytes: checked.memoryBytes,
        cpus: checked.cpus,
        consoleFd: capture ? mux!.write : (consoleMode as { fd: number }).fd,
        ...(capture ? { consoleTag: Channel.CONSOLE } : {}),
        auxSerialSinks: [tagged(Channel.CONTROL), tagged(Channel.STDOUT), tagged(Channel.STDERR)],
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
        nics: checked.nics,
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
      agent: checked.agent,
      defaultGuest: files.defaultGuest,
    };
    const vm = new Vm(machine, info, {
      capture,
      mux,
      logFd,
      retain: options.consoleRetain ?? DEFAULT_CONSOLE_RETAIN,
      ...(options.onWarning !== undefined ? { onWarning: options.onWarning } : {}),
    });
    await vm.started;
    return vm;
  } catch (e) {
    if (machine === undefined) {
      if (mux !== undefined) {
        sys.close(mux.read);
        sys.close(mux.write);
      }
      if (logFd !== undefined) closeSync(logFd);
    }
    throw toStartError(e);
  }
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
  private readyInfo: { nproc: number } | undefined;
  private readyWaiters: { resolve: (r: { nproc: number }) => void; reject: (e: Error) => void }[] = [];
  private current: PendingRun | undefined;
  private runChain: Promise<void> = Promise.resolve();
  private nextId = 1;
  private muxSocket: Socket | undefined;
  private muxWriteFd: number | undefined;
  private agentBusyWithPoweroff = false;

  /** @internal Use startVm(). */
  constructor(
    private readonly machine: Machine,
    readonly info: VmInfo,
    io: {
      capture: boolean;
      mux: { read: number; write: number } | undefined;
      logFd: number | undefined;
      retain: number;
      onWarning?: (message: string) => void;
    },
  ) {
    super();
    const onWarning = io.onWarning ?? ((message: string) => this.emit("warning", message));
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
      this.readyInfo = { nproc: msg.nproc };
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
   * /init). Resolves with the guest's CPU count. Rejects with VmTimeoutError, or
   * VmExitedError when the VM ends first (a kernel panic resets it, for instance).
   */
  ready(options: { timeoutMs?: number } = {}): Promise<{ nproc: number }> {
    this.requireAgent();
    if (this.readyInfo !== undefined) return Promise.resolve(this.readyInfo);
    if (this.exitInfo !== undefined) {
      return Promise.reject(new VmExitedError("ready", this.exitInfo, `the VM ended (${this.exitInfo.reason}) before the guest became ready`));
    }
    return new Promise((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const waiter = {
        resolve: (r: { nproc: number }) => {
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
   * Run a command in the guest with `sh -c`, in /, stdin from /dev/null; commands run one at
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
      const line = commandLine(command);
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

function describeWait(what: VmWait): string {
  return what === "ready" ? "the guest to become ready" : what === "console" ? "console output" : what === "command" ? "the command" : "the power-off";
}

export function formatMs(ms: number): string {
  return ms % 1000 === 0 ? `${ms / 1000} s` : `${(ms / 1000).toFixed(1)} s`;
}
