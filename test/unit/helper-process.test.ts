/**
 * src/host/helper-process.ts with small shell helpers: readiness, a helper that dies or
 * hangs during start-up, stop() with SIGTERM and SIGKILL, inherited fds, and every exit
 * path of tskvm's own process (normal exit, SIGKILL with a parent-death signal) leaving
 * no helper and no runtime directory behind.
 */
import { after, describe, it } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import * as sys from "../../src/sys/libc";
import { waitUntil } from "../helpers/wait";
import { HelperError, HelperProcess, createRuntimeDir, describeExit, findExecutable, sweepRuntimeDirs } from "../../src/host/helper-process";

const base = fs.mkdtempSync(path.join(os.tmpdir(), "tskvm-helper-test-"));
after(() => fs.rmSync(base, { recursive: true, force: true }));

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}


/** A zombie counts as gone: what matters is that it no longer runs. */
function running(pid: number): boolean {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
    return !/^\d+ \(.*\) Z /.test(stat);
  } catch {
    return false;
  }
}

/** Pids of running processes whose argv is exactly `argv`. */
function processesRunning(argv: string[]): number[] {
  const want = argv.join("\0") + "\0";
  return fs
    .readdirSync("/proc")
    .filter((d) => /^\d+$/.test(d))
    .filter((d) => {
      try {
        return fs.readFileSync(`/proc/${d}/cmdline`, "utf8") === want && running(Number(d));
      } catch {
        return false;
      }
    })
    .map(Number);
}

describe("helper processes", () => {
  it("is ready when its ready() says so, and stop() ends it and removes its runtime directory", async () => {
    const dir = createRuntimeDir("test", base);
    assert.equal(fs.statSync(dir.path).mode & 0o777, 0o700);
    assert.match(path.basename(dir.path), new RegExp(`^tskvm-${process.pid}-test-`));
    const h = await HelperProcess.start({
      name: "sleeper",
      command: "sh",
      args: ["-c", `echo up; : > "${dir.file("ready")}"; exec sleep 1000`],
      runtimeDir: dir,
      ready: () => fs.existsSync(dir.file("ready")),
    });
    assert.equal(h.running, true);
    assert.ok(alive(h.pid));
    const e = await h.stop();
    assert.deepEqual(e, { code: null, signal: "SIGTERM", expected: true });
    assert.equal(h.running, false);
    assert.equal(fs.existsSync(dir.path), false);
    assert.equal(h.lastLine(), "up");
  });

  it("reports a helper that exits during start-up with its last line, and cleans up", async () => {
    const dir = createRuntimeDir("test", base);
    await assert.rejects(
      HelperProcess.start({
        name: "failer",
        command: "sh",
        args: ["-c", "echo starting; echo 'fatal: cannot bind port 80' >&2; exit 3"],
        runtimeDir: dir,
        ready: () => false,
      }),
      (e: unknown) => {
        assert.ok(e instanceof HelperError);
        assert.equal(e.kind, "Exited");
        assert.equal(e.message, "failer exited with status 3 before it was ready: fatal: cannot bind port 80");
        assert.equal(e.exit?.code, 3);
        return true;
      },
    );
    assert.equal(fs.existsSync(dir.path), false);
  });

  it("says when the executable is not there", async () => {
    await assert.rejects(
      HelperProcess.start({ name: "ghost", command: "tskvm-no-such-helper", args: [], ready: () => true }),
      (e: unknown) => e instanceof HelperError && e.kind === "NotFound" && /"tskvm-no-such-helper" is not installed/.test(e.message),
    );
    assert.equal(findExecutable("tskvm-no-such-helper"), undefined);
    assert.ok(findExecutable("sh")?.startsWith("/"));
    assert.equal(findExecutable("/bin/sh"), "/bin/sh");
  });

  it("kills a helper that is not ready in time", async () => {
    const marker = String(900000 + (process.pid % 99999));
    await assert.rejects(
      HelperProcess.start({ name: "slow", command: "sleep", args: [marker], readyTimeoutMs: 300, ready: () => false }),
      (e: unknown) => e instanceof HelperError && e.kind === "Timeout" && e.message === "slow was not ready within 0.3 s",
    );
    assert.deepEqual(processesRunning(["sleep", marker]), []);
  });

  it("SIGKILLs a helper that ignores SIGTERM, with everything it forked", async () => {
    const dir = createRuntimeDir("test", base);
    const h = await HelperProcess.start({
      name: "stubborn",
      command: "sh",
      // The child sleep writes its pid, so we can check the whole group went.
      args: ["-c", `trap '' TERM; sh -c 'trap "" TERM; echo $$ > "${dir.file("child")}"; exec sleep 1000' & while :; do sleep 0.05; done`],
      runtimeDir: dir,
      ready: () => fs.existsSync(dir.file("child")) && fs.readFileSync(dir.file("child"), "utf8").endsWith("\n"),
    });
    const child = Number(fs.readFileSync(dir.file("child"), "utf8"));
    const t0 = Date.now();
    const e = await h.stop(300);
    assert.equal(e.signal, "SIGKILL");
    assert.ok(Date.now() - t0 >= 250, "waited for the grace period");
    await waitUntil(() => !running(child), 10_000, "the forked child to end");
  });

  it("passes file descriptors as 3, 4, ...", async () => {
    const [r1, w1] = sys.pipe2();
    const [r2, w2] = sys.pipe2();
    try {
      const h = await HelperProcess.start({
        name: "fds",
        command: "sh",
        args: ["-c", "echo three >&3; echo four >&4; exec sleep 1000"],
        passFds: [w1, w2],
        ready: () => true,
      });
      sys.close(w1);
      sys.close(w2);
      const buf = new Uint8Array(64);
      assert.equal(Buffer.from(buf.subarray(0, sys.read(r1, buf))).toString(), "three\n");
      assert.equal(Buffer.from(buf.subarray(0, sys.read(r2, buf))).toString(), "four\n");
      await h.stop();
    } finally {
      sys.close(r1);
      sys.close(r2);
    }
  });

  it("reports an unexpected end as such", async () => {
    const h = await HelperProcess.start({ name: "victim", command: "sleep", args: ["1000"], ready: () => true });
    process.kill(h.pid, "SIGKILL");
    const keepAlive = setInterval(() => {}, 1000); // the helper's handle does not hold the event loop
    const e = await h.exited;
    clearInterval(keepAlive);
    assert.deepEqual(e, { code: null, signal: "SIGKILL", expected: false });
    assert.equal(describeExit(e), "was killed by SIGKILL");
    assert.equal(describeExit({ code: 1, signal: null }), "exited with status 1");
  });
});

/** Run a node script that starts a helper, print its pid and runtime dir as JSON, then end as `how` says. */
function tskvmLike(how: "exit" | "hang", pdeathsig: boolean): { child: ReturnType<typeof spawn>; info: Promise<{ pid: number; dir: string }> } {
  const mod = path.join(__dirname, "../../src/host/helper-process.js");
  const script = `
    const hp = require(${JSON.stringify(mod)});
    (async () => {
      const dir = hp.createRuntimeDir("test", ${JSON.stringify(base)});
      const h = await hp.HelperProcess.start({ name: "sleeper", command: "sleep", args: ["1000"], runtimeDir: dir,
        ready: () => true ${pdeathsig ? ', parentDeathSignal: "SIGKILL"' : ""} });
      console.log(JSON.stringify({ pid: h.pid, dir: dir.path }));
      ${how === "exit" ? "process.exit(0);" : "setInterval(() => {}, 1000);"}
    })();`;
  const child = spawn(process.execPath, ["-e", script], { stdio: ["ignore", "pipe", "inherit"] });
  const info = new Promise<{ pid: number; dir: string }>((resolve, reject) => {
    let out = "";
    child.stdout!.on("data", (d: Buffer) => {
      out += d.toString();
      if (out.includes("\n")) resolve(JSON.parse(out.split("\n")[0]!));
    });
    child.on("exit", () => reject(new Error(`the script ended before printing: ${out}`)));
  });
  return { child, info };
}

describe("helper processes on tskvm's exit paths", () => {
  it("process exit: the helper is killed and its runtime directory removed", async () => {
    const { child, info } = tskvmLike("exit", false);
    const { pid, dir } = await info;
    await new Promise((r) => child.on("exit", r));
    await waitUntil(() => !running(pid), 10_000, "the helper to end");
    assert.equal(fs.existsSync(dir), false);
  });

  it("SIGKILL: the kernel ends the helper (parent-death signal); the directory is swept later", async (t) => {
    if (findExecutable("setpriv") === undefined) return t.skip("setpriv (util-linux) is not installed");
    const { child, info } = tskvmLike("hang", true);
    const { pid, dir } = await info;
    assert.ok(running(pid));
    child.kill("SIGKILL");
    await waitUntil(() => !running(pid), 10_000, "the helper to end");
    // Nothing ran to remove the directory; an old one of a dead pid is swept, a young one kept.
    assert.ok(fs.existsSync(dir));
    assert.deepEqual(sweepRuntimeDirs(base), []);
    const old = new Date(Date.now() - 120_000);
    fs.utimesSync(dir, old, old);
    assert.deepEqual(sweepRuntimeDirs(base), [dir]);
    assert.equal(fs.existsSync(dir), false);
  });

  it("never sweeps the directory of a running tskvm", () => {
    const mine = createRuntimeDir("test", base);
    const old = new Date(Date.now() - 120_000);
    fs.utimesSync(mine.path, old, old);
    assert.deepEqual(sweepRuntimeDirs(base), []);
    assert.ok(fs.existsSync(mine.path));
    mine.remove();
    mine.remove();
    assert.equal(fs.existsSync(mine.path), false);
  });
});
