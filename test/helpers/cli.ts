/**
 * Run the tskvm CLI as a user would (a child process of bin/tskvm), and watch its console.
 */
import assert from "node:assert/strict";
import { spawn, spawnSync, ChildProcess } from "node:child_process";
import { resolve } from "node:path";

export const TSKVM_BIN = resolve(__dirname, "..", "..", "..", "bin", "tskvm");

export interface CliResult {
  status: number | null;
  stdout: string;
  stderr: string;
}

/** Run tskvm to completion (for commands that fail fast on bad input). */
export function runCli(args: string[], opts: { env?: NodeJS.ProcessEnv; input?: string; timeoutMs?: number } = {}): CliResult {
  const r = spawnSync(process.execPath, [TSKVM_BIN, ...args], {
    encoding: "utf8",
    env: { ...process.env, ...opts.env },
    input: opts.input ?? "",
    timeout: opts.timeoutMs ?? 60_000,
  });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
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

  send(text: string): void {
    this.child.stdin!.write(text);
  }

  kill(signal: NodeJS.Signals = "SIGKILL"): void {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill(signal);
  }
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
