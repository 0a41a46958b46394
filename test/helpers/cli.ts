/**
 * Run the tskvm CLI as a user would (a child process of bin/tskvm), and watch its console.
 */
import { spawn, spawnSync, ChildProcess } from "node:child_process";
import { join, resolve } from "node:path";
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import assert from "node:assert/strict";

export const TSKVM_BIN = resolve(__dirname, "..", "..", "..", "bin", "tskvm");

export interface CliResult {
  status: number | null;
  stdout: string;
  stderr: string;
}

/** Run tskvm to completion (for commands that fail fast on bad input). */
export function runCli(args: string[], opts: { env?: NodeJS.ProcessEnv; input?: string; timeoutMs?: number; cwd?: string } = {}): CliResult {
  const r = spawnSync(process.execPath, [TSKVM_BIN, ...args], {
    ...(opts.cwd !== undefined ? { cwd: opts.cwd } : {}),
    encoding: "utf8",
    env: { ...process.env, ...opts.env },
    input: opts.input ?? "",
    timeout: opts.timeoutMs ?? 60_000,
  });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/**
 * Run tskvm to completion without blocking the test process, so that the test's own
 * timeout still works if it hangs; past `timeoutMs` it is killed (SIGKILL) and the result
 * says so (status null). `wrapper` runs it under another command (ip netns exec NS).
 */
export function runCliAsync(args: string[], opts: { timeoutMs: number; wrapper?: string[]; env?: NodeJS.ProcessEnv }): Promise<CliResult & { ms: number; timedOut: boolean }> {
  const argv = [...(opts.wrapper ?? []), process.execPath, TSKVM_BIN, ...args];
  const started = Date.now();
  const child = spawn(argv[0]!, argv.slice(1), { env: { ...process.env, ...opts.env }, stdio: ["ignore", "pipe", "pipe"] });
  let stdout = "";
  let stderr = "";
  child.stdout!.setEncoding("utf8").on("data", (d: string) => (stdout += d));
  child.stderr!.setEncoding("utf8").on("data", (d: string) => (stderr += d));
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    child.kill("SIGKILL");
  }, opts.timeoutMs);
  return new Promise((resolve) =>
    child.on("close", (status) => {
      clearTimeout(timer);
      resolve({ status, stdout, stderr: timedOut ? `${stderr}(killed after ${opts.timeoutMs} ms)\n` : stderr, ms: Date.now() - started, timedOut });
    }),
  );
}

/** A running tskvm whose console output can be awaited line by line. */
export class RunningCli {
  readonly child: ChildProcess;
  stdout = "";
  stderr = "";
  readonly startedAt = Date.now();
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  private waiters: { pattern: RegExp; resolve: (ms: number) => void }[] = [];

  /** `wrapper` runs tskvm under another command, e.g. ["ip", "netns", "exec", NS]. */
  constructor(args: string[], env: NodeJS.ProcessEnv = {}, wrapper: string[] = []) {
    const argv = [...wrapper, process.execPath, TSKVM_BIN, ...args];
    this.child = spawn(argv[0]!, argv.slice(1), {
      env: { ...process.env, ...env },
      stdio: ["pipe", "pipe", "pipe"],
    });
    this.child.stdout!.setEncoding("latin1").on("data", (s: string) => {
      this.stdout += s;
      this.check();
    });
    this.child.stderr!.setEncoding("utf8").on("data", (s: string) => {
      this.stderr += s;
    });
    this.exited = new Promise((res) => this.child.on("exit", (code, signal) => res({ code, signal })));
  }

  private check(): void {
    this.waiters = this.waiters.filter((w) => {
      if (!w.pattern.test(this.stdout)) return true;
      w.resolve(Date.now() - this.startedAt);
      return false;
    });
  }

  /** Resolves with the milliseconds since start when `pattern` appears on the console. */
  waitFor(pattern: RegExp, timeoutMs: number): Promise<number> {
    if (pattern.test(this.stdout)) return Promise.resolve(Date.now() - this.startedAt);
    return new Promise((res, rej) => {
      const onExit = () => {
        clearTimeout(timer);
        rej(new Error(`tskvm exited while waiting for ${pattern}; stderr:\n${this.stderr}\nconsole:\n${this.stdout.slice(-2000)}`));
      };
      const timer = setTimeout(() => {
        this.child.off("exit", onExit);
        rej(new Error(`timed out after ${timeoutMs} ms waiting for ${pattern} on the console; last output:\n${this.stdout.slice(-2000)}\nstderr:\n${this.stderr}`));
      }, timeoutMs);
      this.child.once("exit", onExit);
      this.waiters.push({
        pattern,
        resolve: (ms) => {
          clearTimeout(timer);
          this.child.off("exit", onExit);
          res(ms);
        },
      });
    });
  }

  /** Resolves with the milliseconds since start when `pattern` appears on tskvm's stderr. */
  async waitForStderr(pattern: RegExp, timeoutMs: number): Promise<number> {
    const deadline = Date.now() + timeoutMs;
    while (!pattern.test(this.stderr)) {
      if (this.child.exitCode !== null || this.child.signalCode !== null) {
        throw new Error(`tskvm exited while waiting for ${pattern} on stderr; stderr:\n${this.stderr}`);
      }
      if (Date.now() >= deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${pattern} on stderr:\n${this.stderr}`);
      await new Promise((r) => setTimeout(r, 50));
    }
    return Date.now() - this.startedAt;
  }

  send(text: string): void {
    this.child.stdin!.write(text);
  }

  kill(signal: NodeJS.Signals = "SIGKILL"): void {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill(signal);
  }
}

/**
 * A temporary directory for a test file's inputs, readable by the unprivileged user some
 * cases drop to, removed when the process exits; `file` writes one file into it.
 */
export function scratchDir(prefix: string): { dir: string; file: (name: string, data: Uint8Array | string) => string } {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  chmodSync(dir, 0o755);
  process.on("exit", () => rmSync(dir, { recursive: true, force: true }));
  return {
    dir,
    file: (name, data) => {
      const p = join(dir, name);
      writeFileSync(p, data);
      return p;
    },
  };
}

/** One line, the expected status, the expected words, no stack trace. */
export function expectOneLine(r: CliResult, status: number, pattern: RegExp): void {
  assert.equal(r.status, status, `exit status; stderr: ${r.stderr}`);
  const lines = r.stderr.trimEnd().split("\n");
  assert.equal(lines.length, 1, `exactly one line on stderr, got:\n${r.stderr}`);
  assert.match(lines[0]!, /^tskvm: /);
  assert.match(lines[0]!, pattern);
  assert.doesNotMatch(r.stderr, /\n\s+at /, "no stack trace");
}
