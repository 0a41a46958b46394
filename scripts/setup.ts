/**
 * `npm start`: set up everything the default guest needs and boot it, saying at each
 * stage what it does, how long it took and what was already there (cached):
 *   1. the Debian packages of guest/deps.sh: installed when we are root or have sudo
 *      without a password; otherwise the one command to run is printed and we stop;
 *   2. the TypeScript build (npm ci already ran it through `prepare`; again only when a
 *      source is newer than dist/);
 *   3. the default guest (guest/build.sh, ~5 minutes on 2 cores the first time, cached by
 *      a hash of its inputs), with its stages and a count of compiled files as it goes;
 *   4. `tskvm boot` with the arguments given (npm start -- -m 1G -c 2).
 * `--no-boot` stops after 3. Re-running it finds everything cached and boots at once.
 */
import { spawn, spawnSync } from "node:child_process";
import { existsSync, readdirSync, statSync } from "node:fs";
import { join, relative } from "node:path";
import { findDefaultGuest, guestBuildScript } from "../src/api/default-guest";
import { formatSeconds, missingPackages, packagePlan } from "./lib/setup-plan";

const ROOT = join(__dirname, "..", "..");
const T0 = Date.now();
const elapsed = () => formatSeconds((Date.now() - T0) / 1000);

function stage(n: number, text: string): void {
  process.stdout.write(`[${n}/4] ${text}\n`);
}

function note(text: string): void {
  process.stdout.write(`      ${text}\n`);
}

class SetupStop extends Error {}

function packages(): void {
  const wanted = spawnSync("bash", [join(ROOT, "guest", "deps.sh")], { encoding: "utf8" }).stdout.trim().split(/\s+/).filter((p) => p !== "");
  const apt = spawnSync("sh", ["-c", "command -v apt-get && command -v dpkg-query"], { stdio: "ignore" }).status === 0;
  const dpkg = apt ? spawnSync("dpkg-query", ["-W", "-f", "${Package} ${db:Status-Status}\\n", ...wanted], { encoding: "utf8" }).stdout : "";
  const missing = apt ? missingPackages(wanted, dpkg) : wanted;
  const root = process.getuid?.() === 0;
  const sudo = !root && spawnSync("sudo", ["-n", "true"], { stdio: "ignore" }).status === 0;
  const plan = packagePlan(missing, { root, sudo, apt });
  switch (plan.kind) {
    case "none":
      stage(1, `Debian packages for the default guest: all ${wanted.length} installed (cached)`);
      return;
    case "ask":
      stage(1, `Debian packages for the default guest: ${missing.length} missing (${missing.join(" ")})`);
      process.stdout.write(`\n${plan.why}. Run this once, then npm start again:\n\n  ${plan.command}\n\n`);
      throw new SetupStop();
    case "install": {
      stage(1, `Debian packages for the default guest: installing ${missing.length} (${missing.join(" ")})`);
      const sudo = plan.argv[0] === "sudo" ? ["sudo", "-n"] : [];
      const env = { ...process.env, DEBIAN_FRONTEND: "noninteractive" };
      for (const argv of [[...sudo, "apt-get", "update", "-qq"], plan.argv]) {
        note(`$ ${argv.join(" ")}`);
        const r = spawnSync(argv[0]!, argv.slice(1), { stdio: "inherit", env });
        if (r.status !== 0) throw new Error(`${argv.join(" ")} failed (exit ${r.status ?? r.signal})`);
      }
      note(`installed (${elapsed()})`);
      return;
    }
  }
}

/** The newest modification time of the .ts files under `dir`. */
function newestSource(dir: string): number {
  let newest = 0;
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) newest = Math.max(newest, newestSource(path));
    else if (entry.name.endsWith(".ts")) newest = Math.max(newest, statSync(path).mtimeMs);
  }
  return newest;
}

function typescript(): void {
  const built = join(ROOT, "dist", "src", "cli", "main.js");
  const sources = Math.max(...["src", "scripts", "test"].map((d) => newestSource(join(ROOT, d))));
  if (existsSync(built) && statSync(built).mtimeMs >= sources) {
    stage(2, `TypeScript: ${relative(process.cwd(), join(ROOT, "dist")) || "dist"}/ is up to date (cached)`);
    return;
  }
  stage(2, "TypeScript: building (npm run build)");
  const t = Date.now();
  const r = spawnSync("npm", ["run", "--silent", "build"], { cwd: ROOT, stdio: "inherit" });
  if (r.status !== 0) throw new Error(`npm run build failed (exit ${r.status ?? r.signal})`);
  note(`built in ${formatSeconds((Date.now() - t) / 1000)}`);
}

async function guest(): Promise<void> {
  const found = findDefaultGuest();
  if (found !== undefined) {
    stage(3, `default guest: ${found.hash} (cached in ${join(found.kernel, "..")})`);
    return;
  }
  stage(3, "default guest: building (Linux 6.1 and a busybox initrd, about 5 minutes on 2 cores, once)");
  const t = Date.now();
  const child = spawn("bash", [guestBuildScript()], { stdio: ["ignore", "ignore", "pipe"] });
  let compiled = 0;
  const tail: string[] = [];
  let partial = "";
  child.stderr!.setEncoding("utf8").on("data", (d: string) => {
    const lines = (partial + d).split("\n");
    partial = lines.pop()!;
    for (const line of lines) {
      tail.push(line);
      if (tail.length > 40) tail.shift();
      if (/^\s+(CC|AS|LD|AR)\s/.test(line)) compiled++;
      else if (line.startsWith("[guest")) note(line);
    }
  });
  const ticker = setInterval(() => note(`... ${compiled} kernel files compiled, ${formatSeconds((Date.now() - t) / 1000)} so far`), 20_000);
  const code = await new Promise<number | null>((resolve) => child.on("close", resolve));
  clearInterval(ticker);
  if (code !== 0) {
    process.stdout.write(`${tail.join("\n")}\n`);
    throw new Error(`building the default guest failed (bash guest/build.sh exited ${code}); its last lines are above`);
  }
  note(`built in ${formatSeconds((Date.now() - t) / 1000)}`);
}

function boot(args: string[]): number {
  stage(4, `booting the default guest: ${["tskvm", "boot", ...args].join(" ")} (Ctrl-A x quits; set up in ${elapsed()})`);
  const r = spawnSync(process.execPath, [join(ROOT, "bin", "tskvm"), "boot", ...args], { stdio: "inherit" });
  return r.status ?? 1;
}

async function main(argv: string[]): Promise<number> {
  const noBoot = argv.includes("--no-boot");
  const bootArgs = argv.filter((a) => a !== "--no-boot" && a !== "--boot");
  try {
    packages();
    typescript();
    await guest();
  } catch (e) {
    if (e instanceof SetupStop) return 1;
    process.stderr.write(`setup: ${(e as Error).message}\n`);
    return 1;
  }
  if (noBoot) {
    process.stdout.write(`ready in ${elapsed()}: ./bin/tskvm boot (or npm start) boots the default guest\n`);
    return 0;
  }
  return boot(bootArgs);
}

main(process.argv.slice(2)).then((code) => process.exit(code));
