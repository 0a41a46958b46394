/**
 * Helper processes that a VM's back ends run beside tskvm (passt, virtiofsd): started in
 * a private runtime directory, watched, and stopped on every exit path.
 *
 * - Start-up: the helper runs detached (its own session, so a Ctrl-C on tskvm's terminal
 *   does not reach it: tskvm decides when it stops), stdin /dev/null, stdout and stderr
 *   captured (their last lines go into error messages), `passFds` as fds 3, 4, ... It is
 *   started when `ready()` says so (a pid file or socket it made); if it exits first or
 *   takes too long, start() kills it, removes its runtime directory and throws a
 *   HelperError with its last output.
 * - Stopping: stop() sends SIGTERM to its process group, SIGKILL after a grace period,
 *   and removes the runtime directory. When tskvm's process exits any other way (an error,
 *   SIGTERM after cleanup, process.exit), an 'exit' hook SIGKILLs every live helper and
 *   removes every runtime directory, synchronously.
 * - SIGKILL of tskvm runs no code of ours. Helpers must then end by themselves: passt and
 *   virtiofsd exit when their socket's other end (tskvm) goes away, and `parentDeathSignal`
 *   runs the helper under `setpriv --pdeathsig` (util-linux) so the kernel signals it when
 *   tskvm dies. (The kernel clears that setting when the helper changes its user id, as
 *   passt does when started as root, and a tskvm killed in the millisecond between the
 *   fork and setpriv's prctl leaves the helper without it.) A runtime directory cannot be removed then; keep it
 *   only for start-up (remove it once the helper is connected: runtimeDir.remove()), and
 *   createRuntimeDir() sweeps directories of tskvm processes that no longer exist.
 */
import { spawn, type ChildProcess } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";

export type HelperErrorKind =
  /** The executable is not there (or not executable). */
  | "NotFound"
  /** It exited before it was ready. */
  | "Exited"
  /** It was not ready in time. */
  | "Timeout";

/** A helper that could not be started; `output` holds its last lines of output. */
export class HelperError extends Error {
  constructor(
    readonly kind: HelperErrorKind,
    message: string,
    readonly output: string = "",
    readonly exit?: HelperExit,
  ) {
    super(message);
    this.name = "HelperError";
  }
}

/** How a helper ended. */
export interface HelperExit {
  /** Exit status, or null when a signal ended it. */
  code: number | null;
  signal: NodeJS.Signals | null;
  /** True when tskvm asked it to stop (stop(), or a failed start). */
  expected: boolean;
}

/** "exited with status 1", "was killed by SIGKILL". */
export function describeExit(e: Pick<HelperExit, "code" | "signal">): string {
  if (e.signal !== null) return `was killed by ${e.signal}`;
  return e.code === 0 ? "exited" : `exited with status ${e.code}`;
}

// ---- runtime directories ----

const RUNTIME_DIR = /^tskvm-(\d+)-[a-z0-9-]+-[A-Za-z0-9]{6}$/;
/** A directory younger than this is never swept: its tskvm may live in another PID namespace. */
const SWEEP_MIN_AGE_MS = 60_000;

const liveDirs = new Set<RuntimeDir>();
const liveHelpers = new Set<HelperProcess>();
let exitHookInstalled = false;

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on("exit", () => {
    for (const h of liveHelpers) h.killNow();
    for (const d of liveDirs) d.remove();
  });
}

/** A private (0700) directory for one helper's files; removed by remove() or at process exit. */
export class RuntimeDir {
  private removed = false;

  constructor(readonly path: string) {
    liveDirs.add(this);
    installExitHook();
  }

  /** A path inside the directory. */
  file(name: string): string {
    return path.join(this.path, name);
  }

  get exists(): boolean {
    return !this.removed;
  }

  /** Remove the directory and what is in it; idempotent, never throws. */
  remove(): void {
    if (this.removed) return;
    this.removed = true;
    liveDirs.delete(this);
    try {
      fs.rmSync(this.path, { recursive: true, force: true });
    } catch {
      // best effort: a later createRuntimeDir() sweeps what is left
    }
  }
}

/** Where runtime directories go: $XDG_RUNTIME_DIR when usable, else the temporary directory. */
export function runtimeBase(): string {
  const xdg = process.env["XDG_RUNTIME_DIR"];
  if (xdg !== undefined && xdg !== "" && path.isAbsolute(xdg)) {
    try {
      fs.accessSync(xdg, fs.constants.W_OK | fs.constants.X_OK);
      if (fs.statSync(xdg).isDirectory()) return xdg;
    } catch {
      // not usable: fall through
    }
  }
  return os.tmpdir();
}

/**
 * A new runtime directory `tskvm-<pid>-<tag>-XXXXXX` under runtimeBase() (mkdtemp: mode
 * 0700). First removes such directories of ours whose tskvm no longer runs.
 */
export function createRuntimeDir(tag: string, base: string = runtimeBase()): RuntimeDir {
  if (!/^[a-z0-9-]+$/.test(tag)) throw new RangeError(`runtime directory tag "${tag}": use a-z, 0-9 and "-"`);
  sweepRuntimeDirs(base);
  return new RuntimeDir(fs.mkdtempSync(path.join(base, `tskvm-${process.pid}-${tag}-`)));
}

/** Remove runtime directories owned by this user whose tskvm process is gone; returns their paths. */
export function sweepRuntimeDirs(base: string = runtimeBase()): string[] {
  const swept: string[] = [];
  let names: string[];
  try {
    names = fs.readdirSync(base);
  } catch {
    return swept;
  }
  const uid = process.getuid?.();
  const now = Date.now();
  for (const name of names) {
    const m = RUNTIME_DIR.exec(name);
    if (m === null) continue;
    const pid = Number(m[1]);
    if (pid === process.pid || processExists(pid)) continue;
    const p = path.join(base, name);
    try {
      const st = fs.lstatSync(p);
      if (!st.isDirectory() || (uid !== undefined && st.uid !== uid) || now - st.mtimeMs < SWEEP_MIN_AGE_MS) continue;
      fs.rmSync(p, { recursive: true, force: true });
      swept.push(p);
    } catch {
      // raced with another sweeper, or not ours to remove
    }
  }
  return swept;
}

/**
 * Has process `pid` exec'd something other than `wrapper`? Its /proc/PID/comm (readable
 * even once a helper like passt has made itself non-dumpable, unlike /proc/PID/exe).
 */
function execed(pid: number, wrapper: string): boolean {
  try {
    return fs.readFileSync(`/proc/${pid}/comm`, "utf8").trim() !== path.basename(wrapper).slice(0, 15);
  } catch {
    return false;
  }
}

/** Is process `pid` alive (a zombie, ended but not yet reaped, is not)? */
function processExists(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
  try {
    return !/^\d+ \(.*\) Z /s.test(fs.readFileSync(`/proc/${pid}/stat`, "utf8"));
  } catch {
    return true;
  }
}

// ---- executables ----

/**
 * The absolute path of executable `name`: as given when it contains "/", else the first
 * match in $PATH, then in `extraDirs` (e.g. /usr/lib/qemu for virtiofsd). Undefined if none.
 */
export function findExecutable(name: string, extraDirs: readonly string[] = []): string | undefined {
  const candidates = name.includes("/") ? [path.resolve(name)] : [...(process.env["PATH"] ?? "").split(":").filter((d) => d !== ""), ...extraDirs].map((d) => path.join(d, name));
  for (const c of candidates) {
    try {
      fs.accessSync(c, fs.constants.X_OK);
      if (fs.statSync(c).isFile()) return c;
    } catch {
      // not here
    }
  }
  return undefined;
}

// ---- the process ----

export interface HelperStartOptions {
  /** For messages: "passt", "virtiofsd". */
  name: string;
  /** The executable: a path, or a name looked up with findExecutable(). */
  command: string;
  args: readonly string[];
  /** File descriptors the helper inherits, as fds 3, 4, ... in this order. */
  passFds?: readonly number[];
  env?: NodeJS.ProcessEnv;
  /** Removed by stop(), on a failed start, and at process exit. */
  runtimeDir?: RuntimeDir;
  /** Started yet? Polled every few milliseconds until true. */
  ready: () => boolean;
  /** Default 10 s. */
  readyTimeoutMs?: number;
  /** Have the kernel send this signal to the helper when tskvm's main thread ends (needs setpriv). */
  parentDeathSignal?: NodeJS.Signals;
}

/** Output kept for error messages. */
const OUTPUT_KEEP = 8192;
const READY_POLL_MS = 5;

export class HelperProcess {
  readonly name: string;
  readonly pid: number;
  /** Resolves when the helper has ended, however it ended. */
  readonly exited: Promise<HelperExit>;
  readonly runtimeDir: RuntimeDir | undefined;

  private readonly child: ChildProcess;
  private output = "";
  private exitInfo: HelperExit | undefined;
  private stopping = false;

  private constructor(name: string, child: ChildProcess, runtimeDir: RuntimeDir | undefined) {
    this.name = name;
    this.child = child;
    this.pid = child.pid!;
    this.runtimeDir = runtimeDir;
    const keep = (chunk: Buffer) => {
      this.output = (this.output + chunk.toString("utf8")).slice(-OUTPUT_KEEP);
    };
    child.stdout?.on("data", keep);
    child.stderr?.on("data", keep);
    this.exited = new Promise((resolve) => {
      child.on("exit", (code, signal) => {
        this.exitInfo = { code, signal, expected: this.stopping };
        liveHelpers.delete(this);
        resolve(this.exitInfo);
      });
    });
    // A helper never keeps tskvm's event loop alive; whoever waits for it does.
    child.unref();
    (child.stdout as { unref?: () => void } | null)?.unref?.();
    (child.stderr as { unref?: () => void } | null)?.unref?.();
    liveHelpers.add(this);
    installExitHook();
  }

  /** Start a helper and wait until it is ready; see the module comment. */
  static async start(opts: HelperStartOptions): Promise<HelperProcess> {
    const command = findExecutable(opts.command);
    if (command === undefined) {
      opts.runtimeDir?.remove();
      throw new HelperError("NotFound", `${opts.name}: "${opts.command}" is not installed (not found in PATH)`);
    }
    let file = command;
    let args = [...opts.args];
    let viaSetpriv = false;
    if (opts.parentDeathSignal !== undefined) {
      const setpriv = findExecutable("setpriv");
      if (setpriv !== undefined) {
        args = ["--pdeathsig", opts.parentDeathSignal.replace(/^SIG/, ""), "--", command, ...args];
        file = setpriv;
        viaSetpriv = true;
      }
    }
    const child = spawn(file, args, {
      stdio: ["ignore", "pipe", "pipe", ...(opts.passFds ?? [])],
      detached: true,
      env: opts.env ?? process.env,
    });
    // spawn() reports a failed exec (EACCES, ENOENT after all) as an event, with no pid.
    const spawnError = await new Promise<Error | undefined>((resolve) => {
      child.once("error", (e) => resolve(e));
      child.once("spawn", () => resolve(undefined));
    });
    if (spawnError !== undefined || child.pid === undefined) {
      opts.runtimeDir?.remove();
      throw new HelperError("NotFound", `${opts.name}: cannot run ${command}: ${spawnError?.message ?? "no process"}`);
    }
    const h = new HelperProcess(opts.name, child, opts.runtimeDir);
    const timeout = opts.readyTimeoutMs ?? 10_000;
    const deadline = Date.now() + timeout;
    for (;;) {
      if (h.exitInfo !== undefined) {
        // Let the last of its output arrive before quoting it.
        await new Promise((r) => setImmediate(r));
        h.runtimeDir?.remove();
        throw new HelperError("Exited", `${opts.name} ${describeExit(h.exitInfo)} before it was ready${h.lastLineSuffix()}`, h.output, h.exitInfo);
      }
      let ok = false;
      try {
        // Through setpriv: not before it has set the signal and exec'd the helper.
        ok = (!viaSetpriv || execed(h.pid, file)) && opts.ready();
      } catch {
        ok = false;
      }
      if (ok) return h;
      if (Date.now() >= deadline) {
        await h.stop(500);
        throw new HelperError("Timeout", `${opts.name} was not ready within ${timeout / 1000} s${h.lastLineSuffix()}`, h.output);
      }
      await new Promise((r) => setTimeout(r, READY_POLL_MS));
    }
  }

  /** True until the process has ended. */
  get running(): boolean {
    return this.exitInfo === undefined;
  }

  /** The last lines it printed (stdout and stderr together), at most 8 KiB. */
  outputTail(): string {
    return this.output;
  }

  /** Its last non-empty line of output, or "". */
  lastLine(): string {
    const lines = this.output.split("\n").map((l) => l.trim()).filter((l) => l !== "");
    return lines[lines.length - 1] ?? "";
  }

  private lastLineSuffix(): string {
    const l = this.lastLine();
    return l === "" ? "" : `: ${l}`;
  }

  /**
   * Wait up to `timeoutMs` for it to end by itself (e.g. after its socket was closed);
   * true when it has. Marks the end as expected.
   */
  async waitExit(timeoutMs: number): Promise<boolean> {
    this.stopping = true;
    if (this.exitInfo !== undefined) return true;
    this.child.ref();
    let timer: NodeJS.Timeout | undefined;
    const ended = await Promise.race([this.exited.then(() => true), new Promise<boolean>((r) => (timer = setTimeout(() => r(false), timeoutMs)))]);
    clearTimeout(timer);
    return ended;
  }

  /** SIGTERM to its process group, SIGKILL after `graceMs`; resolves when it has ended. Removes the runtime dir. */
  async stop(graceMs = 2000): Promise<HelperExit> {
    this.stopping = true;
    if (this.exitInfo === undefined) {
      // Waiting for it keeps the event loop alive (the child is unref'd otherwise).
      this.child.ref();
      this.signal("SIGTERM");
      let timer: NodeJS.Timeout | undefined;
      const killed = new Promise<void>((resolve) => {
        timer = setTimeout(() => {
          this.signal("SIGKILL");
          resolve();
        }, graceMs);
      });
      await Promise.race([this.exited, killed]);
      clearTimeout(timer);
    }
    const e = await this.exited;
    this.runtimeDir?.remove();
    return e;
  }

  /** The exit path: SIGKILL now, remove the runtime dir, no waiting. */
  killNow(): void {
    this.stopping = true;
    if (this.exitInfo === undefined) this.signal("SIGKILL");
    this.runtimeDir?.remove();
  }

  private signal(sig: NodeJS.Signals): void {
    try {
      // Its own process group (detached): whatever it forked goes too.
      process.kill(-this.pid, sig);
    } catch {
      try {
        process.kill(this.pid, sig);
      } catch {
        // already gone
      }
    }
  }
}
