/**
 * Helper processes a VM needs (virtiofsd per share; passt), their private runtime
 * directory, and the socket tskvm talks to each over.
 *
 * Nothing may outlive tskvm, however it ends (poweroff, Ctrl-A x, SIGTERM, SIGKILL, a failed
 * start). The robust lifeline is the helper's connection to tskvm: it is made BEFORE the
 * helper starts (listenConnected), so the helper's only peer is this process, and the kernel
 * closes it when this process dies in any way; a helper that exits when its peer hangs up
 * (virtiofsd does, within a millisecond, measured) then needs nothing else. For a helper that
 * does not, `parentDeathSignal` has the kernel signal it when tskvm dies (PR_SET_PDEATHSIG,
 * set by util-linux's setpriv between fork and exec).
 *
 * Helpers run in a session of their own (setsid): a Ctrl-C on tskvm's terminal reaches
 * tskvm, which then stops them in order, instead of killing them under a running guest.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { accessSync, constants as fsConstants, mkdtempSync, rmSync, statSync, unlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as sys from "../sys/libc";
import { connect, listen, unixAddress } from "../sys/socket";

/** A directory only this user can enter, removed (with whatever is left in it) by remove(). */
export class RuntimeDir {
  private removed = false;
  private constructor(readonly path: string) {}

  /**
   * `$XDG_RUNTIME_DIR/tskvm-<prefix>-XXXXXX` when that is a usable directory (a tmpfs, per
   * user), else `<tmpdir>/tskvm-<prefix>-XXXXXX`. Mode 0700 (mkdtemp).
   */
  static create(prefix: string): RuntimeDir {
    return new RuntimeDir(mkdtempSync(join(runtimeBase(), `tskvm-${prefix}-`)));
  }

  remove(): void {
    if (this.removed) return;
    this.removed = true;
    rmSync(this.path, { recursive: true, force: true });
  }
}

function runtimeBase(): string {
  const xdg = process.env.XDG_RUNTIME_DIR;
  if (xdg !== undefined && xdg.startsWith("/")) {
    try {
      if (statSync(xdg).isDirectory()) {
        accessSync(xdg, fsConstants.W_OK | fsConstants.X_OK);
        return xdg;
      }
    } catch {
      // Not usable (a stale variable under su, say): fall back.
    }
  }
  return tmpdir();
}

export interface ConnectedListener {
  /** The listening socket: the helper accepts on it (e.g. virtiofsd --fd=N). */
  listenFd: number;
  /** tskvm's end, already connected (queued on listenFd until the helper accepts). */
  connFd: number;
}

/**
 * A UNIX stream socket listening at `dir/name`, with tskvm's end already connected to it,
 * and the path already unlinked: the socket file exists for microseconds, in a 0700
 * directory, so nobody else can connect first, and nothing is left on disk whatever happens
 * later. Both fds are close-on-exec; pass `listenFd` to the helper explicitly.
 */
export function listenConnected(dir: string, name: string): ConnectedListener {
  const path = join(dir, name);
  const listenFd = sys.socket(sys.AF_UNIX, sys.SOCK_STREAM);
  let connFd = -1;
  try {
    sys.bind(listenFd, unixAddress(path));
    try {
      listen(listenFd, 1);
      connFd = sys.socket(sys.AF_UNIX, sys.SOCK_STREAM);
      connect(connFd, unixAddress(path));
    } finally {
      unlinkSync(path);
    }
    return { listenFd, connFd };
  } catch (e) {
    if (connFd >= 0) sys.close(connFd);
    sys.close(listenFd);
    throw e;
  }
}

export interface HelperExit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** "exited with status 1", "was killed by SIGKILL". */
export function describeExit(e: HelperExit): string {
  if (e.signal !== null) return `was killed by ${e.signal}`;
  return `exited with status ${e.code}`;
}

export interface HelperOptions {
  /** For messages: "virtiofsd for share 'src'". */
  name: string;
  /** Program and arguments. */
  argv: readonly string[];
  /** Descriptors the helper gets as fd 3, 4, ... (in this order). */
  fds?: readonly number[];
  /** Have the kernel send this signal to the helper when tskvm dies (setpriv --pdeathsig). */
  parentDeathSignal?: NodeJS.Signals;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
}

/** How much of a helper's stderr is kept for error messages. */
const STDERR_KEEP_BYTES = 8192;

export class HelperProcess {
  readonly name: string;
  readonly exited: Promise<HelperExit>;
  private exit: HelperExit | undefined;
  private stderr = "";
  private stopping = false;
  private readonly child: ChildProcess;

  constructor(opts: HelperOptions) {
    this.name = opts.name;
    const argv = opts.parentDeathSignal !== undefined
      ? ["setpriv", `--pdeathsig=${opts.parentDeathSignal}`, "--", ...opts.argv]
      : [...opts.argv];
    const stdio: ("ignore" | "pipe" | number)[] = ["ignore", "ignore", "pipe", ...(opts.fds ?? [])];
    // spawn() runs on the main thread: PR_SET_PDEATHSIG follows the thread that forked, and
    // the main thread lives as long as the process.
    this.child = spawn(argv[0]!, argv.slice(1), {
      stdio,
      detached: true,
      env: opts.env ?? process.env,
      ...(opts.cwd !== undefined ? { cwd: opts.cwd } : {}),
    });
    this.child.stderr!.setEncoding("utf8");
    this.child.stderr!.on("data", (chunk: string) => {
      this.stderr = (this.stderr + chunk).slice(-STDERR_KEEP_BYTES);
    });
    this.exited = new Promise((resolve) => {
      const done = (e: HelperExit) => {
        if (this.exit !== undefined) return;
        this.exit = e;
        resolve(e);
      };
      this.child.once("error", (err) => {
        this.stderr += `${err.message}\n`;
        done({ code: 127, signal: null });
      });
      // "close" (not "exit"): stderr has been read to its end by then.
      this.child.once("close", (code, signal) => done({ code, signal }));
    });
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  /** Set once the helper has exited (and its stderr is complete). */
  get exitStatus(): HelperExit | undefined {
    return this.exit;
  }

  /** True after stop() was called: an exit from then on is expected. */
  get isStopping(): boolean {
    return this.stopping;
  }

  /** The last non-empty lines the helper wrote to stderr, joined with "; ". */
  stderrTail(lines = 2): string {
    return this.stderr
      .split("\n")
      .map((l) => l.trim())
      .filter((l) => l !== "")
      .slice(-lines)
      .join("; ");
  }

  /** SIGTERM, then SIGKILL after `graceMs`; resolves when the helper is gone. */
  async stop(graceMs = 2000): Promise<HelperExit> {
    this.stopping = true;
    if (this.exit !== undefined) return this.exit;
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
    return this.exited;
  }

  private signal(s: NodeJS.Signals): void {
    try {
      this.child.kill(s);
    } catch {
      // Already gone.
    }
  }
}

export function spawnHelper(opts: HelperOptions): HelperProcess {
  return new HelperProcess(opts);
}
