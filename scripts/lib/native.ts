/**
 * Builds the C helpers in native/ for tests and benchmarks.
 *
 * buildNative("abi_check") compiles native/abi_check.c with `cc -O2 -Wall` (or $CC) into
 * dist/native/abi_check and returns the binary's absolute path. The binary is reused while
 * it is newer than its source; a build goes to a temporary name and is renamed into place,
 * so test files running in parallel never see a half-written binary.
 */
import { spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";

/** The repository root: the nearest ancestor directory holding package.json and native/. */
export function repoRoot(): string {
  let dir = __dirname;
  for (;;) {
    if (fs.existsSync(path.join(dir, "package.json")) && fs.existsSync(path.join(dir, "native"))) {
      return dir;
    }
    const parent = path.dirname(dir);
    if (parent === dir) throw new Error(`native.ts: no repository root above ${__dirname}`);
    dir = parent;
  }
}

const built = new Map<string, string>();

/**
 * Compiles native/<name>.c (name with or without ".c") and returns the path of the
 * binary in dist/native/. Throws with the compiler's own message when the build fails,
 * and with an install hint when there is no C compiler.
 */
export function buildNative(name: string, options: { static?: boolean } = {}): string {
  const base = name.endsWith(".c") ? name.slice(0, -2) : name;
  if (!/^[A-Za-z0-9_-]+$/.test(base)) throw new Error(`buildNative: bad helper name ${JSON.stringify(name)}`);
  // A static binary (-static) runs anywhere, a guest's initrd included: dist/native/<name>-static.
  const binName = options.static === true ? `${base}-static` : base;
  const cached = built.get(binName);
  if (cached !== undefined) return cached;

  const root = repoRoot();
  const src = path.join(root, "native", `${base}.c`);
  const outDir = path.join(root, "dist", "native");
  const bin = path.join(outDir, binName);
  const srcStat = fs.statSync(src); // throws ENOENT naming the file if it is missing

  const binStat = fs.statSync(bin, { throwIfNoEntry: false });
  if (binStat === undefined || binStat.mtimeMs < srcStat.mtimeMs) {
    fs.mkdirSync(outDir, { recursive: true });
    const tmp = `${bin}.tmp-${process.pid}`;
    const cc = process.env["CC"] || "cc";
    const args = ["-O2", "-Wall", ...(options.static === true ? ["-static"] : []), "-o", tmp, src];
    const r = spawnSync(cc, args, { encoding: "utf8" });
    if (r.error !== undefined) {
      const code = (r.error as NodeJS.ErrnoException).code;
      if (code === "ENOENT") {
        throw new Error(
          `C compiler "${cc}" not found on PATH: it is needed to build native/${base}.c ` +
            `(install gcc, e.g. "apt-get install gcc", or set CC)`,
        );
      }
      throw new Error(`running ${cc}: ${r.error.message}`);
    }
    if (r.status !== 0) {
      fs.rmSync(tmp, { force: true });
      const why = r.signal !== null ? `signal ${r.signal}` : `exit status ${r.status}`;
      throw new Error(`${cc} ${args.join(" ")} failed (${why}):\n${r.stderr}${r.stdout}`);
    }
    fs.renameSync(tmp, bin);
  }
  built.set(binName, bin);
  return bin;
}
