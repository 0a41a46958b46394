/**
 * `npm test`: every test tier, each where it can run, and a summary that says where each
 * ran. README "Test" is the user's guide; this is the mechanism.
 *
 *   tier          files                     needs
 *   unit          dist/test/unit/           nothing (fake guest memory)
 *   harness       dist/test/harness/        QEMU: the harness VM itself (always on this host)
 *   host tools    dist/test/host/           helper programs tskvm starts (virtiofsd), no VM
 *   KVM           dist/test/kvm/            a KVM device (kvm-pvm will do)
 *   Linux         dist/test/linux/          a KVM device and the default guest
 *   Linux/stock   dist/test/linux/stock/    KVM with hardware semantics: a stock kernel
 *                                           never reaches user space on kvm-pvm
 *
 * A tier runs directly on this host when the host has what it needs, otherwise inside the
 * harness VM (scripts/harness-vm.ts: QEMU TCG with emulated AMD SVM, a real kvm_amd):
 * on hardware KVM everything runs here; on kvm-pvm the stock-kernel tier goes to the VM;
 * without /dev/kvm the KVM and Linux tiers do. All tiers the VM runs share one VM.
 *
 *   node dist/scripts/test.js [--tiers=unit,harness,host,kvm,linux,stock] [--harness=auto|never|always] [FILE...]
 *
 * --harness (or TSKVM_HARNESS): auto (default) as above; never: run every tier here (tests
 * that cannot run skip, or fail where TSKVM_REQUIRE_* says they must run); always: the KVM
 * and Linux tiers in the VM even on a host with /dev/kvm (what a host without one does).
 * FILEs (test/.../x.test.ts or dist/.../x.test.js) run only those, each in its tier's place.
 * With TSKVM_REQUIRE_KVM=1 (CI) a skipped test in a tier that needs KVM fails the run.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { cpus, tmpdir } from "node:os";
import { join, relative, resolve, sep } from "node:path";
import { repoRoot } from "./lib/native";
import { catchStopSignals } from "./lib/stop";
import type { TierReport } from "./lib/tier-report";
import { HarnessError, harnessAvailable, runInHarnessVm } from "./harness-vm";
import { fetchDebianKernel } from "./lib/debian-kernel";
import { hostKvm, kvmUnavailable } from "../test/helpers/tiers";

type TierId = "unit" | "harness" | "host" | "kvm" | "linux" | "stock";
type Needs = "nothing" | "qemu" | "kvm" | "hardware-kvm";

interface Tier {
  id: TierId;
  title: string;
  needs: Needs;
  dir: string;
}

const ROOT = repoRoot();
const TEST_DIST = join(ROOT, "dist", "test");
const TIERS: readonly Tier[] = [
  { id: "unit", title: "unit", needs: "nothing", dir: join(TEST_DIST, "unit") },
  { id: "harness", title: "harness", needs: "qemu", dir: join(TEST_DIST, "harness") },
  { id: "host", title: "host tools", needs: "nothing", dir: join(TEST_DIST, "host") },
  { id: "kvm", title: "KVM", needs: "kvm", dir: join(TEST_DIST, "kvm") },
  { id: "linux", title: "Linux", needs: "kvm", dir: join(TEST_DIST, "linux") },
  { id: "stock", title: "Linux/stock", needs: "hardware-kvm", dir: join(TEST_DIST, "linux", "stock") },
];
/** No single test may run longer than this (a hung test fails instead of stalling CI). */
const TEST_TIMEOUT_MS = 20 * 60_000;
/** The harness VM's limit: well inside CI's 90 minutes. */
const HARNESS_TIMEOUT_MS = Number(process.env.TSKVM_HARNESS_TIMEOUT ?? 2400) * 1000;
/** Environment passed into the harness VM (besides what it sets itself). */
const PASSED_ENV = /^(TSKVM_(?!KVM_DEVICE$|HARNESS$).*|CI|NODE_OPTIONS|XDG_CACHE_HOME)$/;

const strict = () => ["1", "true"].includes(process.env.TSKVM_REQUIRE_KVM ?? "");

function testFiles(dir: string): string[] {
  if (!existsSync(dir)) return [];
  const out: string[] = [];
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) out.push(...testFiles(p));
    else if (e.name.endsWith(".test.js")) out.push(p);
  }
  return out.sort();
}

/** The tier a compiled test file belongs to: the most specific directory that holds it. */
function tierOf(file: string): Tier | undefined {
  return [...TIERS].reverse().find((t) => file.startsWith(t.dir + sep));
}

function filesOf(tier: Tier, only: readonly string[] | undefined): string[] {
  return (only ?? testFiles(tier.dir)).filter((f) => tierOf(f) === tier);
}

/** test/kvm/x.test.ts or dist/test/kvm/x.test.js -> the compiled file's absolute path. */
function compiledPath(arg: string): string {
  let p = resolve(arg);
  if (!p.startsWith(join(ROOT, "dist") + sep)) p = join(ROOT, "dist", relative(ROOT, p));
  p = p.replace(/\.ts$/, ".js");
  if (!existsSync(p)) throw new Error(`no compiled test ${relative(ROOT, p)} (npm run build?)`);
  return p;
}

type Place = { where: "here" | "harness"; why: string } | { where: "nowhere"; why: string };

/** Where a tier runs: here when this host has what it needs, else in the harness VM. */
function placeTier(tier: Tier, mode: string, inside: boolean): Place {
  if (tier.needs === "nothing" || tier.needs === "qemu" || inside || mode === "never") return { where: "here", why: "" };
  const noKvm = kvmUnavailable();
  if (mode !== "always") {
    if (noKvm === undefined && (tier.needs === "kvm" || hostKvm().kind !== "emulated-pvm")) return { where: "here", why: "" };
  }
  const why = mode === "always" ? "asked for: TSKVM_HARNESS=always" : noKvm ?? "stock kernels cannot reach user space on kvm-pvm";
  const missing = harnessAvailable();
  if (missing !== undefined) return { where: "nowhere", why: `${why}, and the harness VM cannot start: ${missing}` };
  return { where: "harness", why };
}

function describePlace(tier: Tier, inside: boolean): string {
  if (tier.needs === "nothing") return "this host (no KVM needed)";
  if (tier.needs === "qemu") return "this host (QEMU, no KVM needed)";
  const noKvm = kvmUnavailable();
  if (noKvm !== undefined) return `this host, without KVM (${noKvm})`;
  return inside ? `${hostKvm().label}, in the harness VM` : `${hostKvm().label}, directly on this host`;
}

let current: ChildProcess | undefined;

/** One `node --test` run; resolves with the reporter's summary. */
async function runNodeTest(files: string[], reportFile: string): Promise<TierReport | undefined> {
  const args = [
    "--test",
    `--test-timeout=${TEST_TIMEOUT_MS}`,
    "--test-reporter=spec",
    "--test-reporter-destination=stdout",
    `--test-reporter=${join(ROOT, "dist", "scripts", "lib", "tier-reporter.js")}`,
    `--test-reporter-destination=${reportFile}`,
    ...files,
  ];
  const child = spawn(process.execPath, args, { stdio: ["ignore", "inherit", "inherit"], cwd: ROOT });
  current = child;
  await new Promise<void>((r) => child.on("close", () => r()));
  current = undefined;
  try {
    return JSON.parse(readFileSync(reportFile, "utf8")) as TierReport;
  } catch {
    return undefined;
  }
}

interface TierResult {
  tier: TierId;
  title: string;
  where: string;
  wallMs: number;
  report?: TierReport;
  /** Why the tier did not run, or why its run is a failure beyond its failed tests. */
  problem?: string;
}

const seconds = (ms: number) => `${(ms / 1000).toFixed(0)} s`;

async function runTiersHere(tiers: { tier: Tier; files: string[] }[], inside: boolean, scratch: string): Promise<TierResult[]> {
  const results: TierResult[] = [];
  for (const { tier, files } of tiers) {
    const where = describePlace(tier, inside);
    console.log(`\n== ${tier.title} tier: ${files.length} file${files.length === 1 ? "" : "s"} on ${where}`);
    const t0 = Date.now();
    const report = await runNodeTest(files, join(scratch, `${tier.id}.json`));
    const result: TierResult = { tier: tier.id, title: tier.title, where, wallMs: Date.now() - t0 };
    if (report === undefined) result.problem = "node --test ended without a report";
    else result.report = report;
    console.log(`== ${tier.title} tier on ${where}: ${summary(result)}`);
    results.push(result);
  }
  return results;
}

function summary(r: TierResult): string {
  if (r.report === undefined) return `not run: ${r.problem ?? "?"}`;
  const c = r.report;
  return `${c.tests} tests, ${c.pass} passed, ${c.fail} failed, ${c.skipped} skipped in ${seconds(r.wallMs)}`;
}

async function main(argv: string[]): Promise<number> {
  const opt = (name: string) => argv.find((a) => a.startsWith(`--${name}=`))?.slice(name.length + 3);
  const inside = argv.includes("--inside");
  const mode = opt("harness") ?? process.env.TSKVM_HARNESS ?? "auto";
  if (!["auto", "never", "always"].includes(mode)) throw new Error(`--harness=${mode}: use auto, never or always`);
  const wanted = (opt("tiers") ?? process.env.TSKVM_TIERS ?? TIERS.map((t) => t.id).join(",")).split(",").map((s) => s.trim());
  for (const w of wanted) if (!TIERS.some((t) => t.id === w)) throw new Error(`unknown tier '${w}': use ${TIERS.map((t) => t.id).join(", ")}`);
  const fileArgs = argv.filter((a) => !a.startsWith("--"));
  const only = fileArgs.length > 0 ? fileArgs.map(compiledPath) : undefined;
  const resultsFile = opt("results");

  const scratch = mkdtempSync(join(tmpdir(), "tskvm-test-"));
  const stop = catchStopSignals(() => current?.kill("SIGTERM"));
  const abort = stop.abort;
  try {
    const planned = TIERS.filter((t) => wanted.includes(t.id))
      .map((tier) => ({ tier, files: filesOf(tier, only), place: placeTier(tier, mode, inside) }))
      .filter((p) => p.files.length > 0);
    const results: TierResult[] = [];
    const here = planned.filter((p) => p.place.where === "here");
    const inVm = planned.filter((p) => p.place.where === "harness");
    for (const p of planned.filter((p) => p.place.where === "nowhere")) {
      results.push({ tier: p.tier.id, title: p.tier.title, where: "nowhere", wallMs: 0, problem: p.place.why });
    }
    if (!inside && planned.some((p) => p.tier.id === "stock")) {
      // The stock kernel is fetched here (apt), where the network is; the VM sees the cache.
      await fetchDebianKernel(abort.signal).then(
        (k) => console.log(`stock kernel: ${k.package} ${k.version} (${k.vmlinuz})`),
        (e: Error) => console.log(`stock kernel: not available: ${e.message}`),
      );
    }
    results.push(...(await runTiersHere(here, inside, scratch)));
    if (inVm.length > 0 && stop.signal() === undefined) results.push(...(await runTiersInVm(inVm, scratch, abort.signal)));
    if (resultsFile !== undefined) {
      writeFileSync(resultsFile, JSON.stringify(results));
    }
    if (stop.signal() !== undefined) {
      console.log(`\ntests stopped by ${stop.signal()}`);
      return stop.exitCode();
    }
    if (inside) return results.some((r) => r.problem !== undefined || (r.report?.fail ?? 0) > 0) ? 1 : 0;
    return printSummary(results, planned.map((p) => p.tier));
  } finally {
    rmSync(scratch, { recursive: true, force: true });
  }
}

/**
 * The tiers in the harness VM; once more in a fresh VM if the first one died without
 * results (a wedged emulated CPU panics it: softlockup_panic, panic_on_rcu_stall, harness-vm.ts),
 * in QEMU's emulation rather than in tskvm, and not worth failing CI for.
 */
async function runTiersInVm(tiers: { tier: Tier; files: string[]; place: Place }[], scratch: string, signal: AbortSignal): Promise<TierResult[]> {
  const first = await runTiersInVmOnce(tiers, scratch, signal);
  if (signal.aborted || !first.every((r) => r.problem !== undefined && r.report === undefined && /reported no results/.test(r.problem))) return first;
  console.log("== the harness VM died without results: the tiers once more, in a fresh VM");
  return runTiersInVmOnce(tiers, scratch, signal);
}

async function runTiersInVmOnce(tiers: { tier: Tier; files: string[]; place: Place }[], scratch: string, signal: AbortSignal): Promise<TierResult[]> {
  const names = tiers.map((t) => t.tier.title).join(", ");
  console.log(`\n== harness VM for the ${names} tier${tiers.length > 1 ? "s" : ""} (${tiers[0]!.place.why})`);
  const shared = mkdtempSync(join(scratch, "vm-"));
  const resultsFile = join(shared, "results.json");
  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries(process.env)) if (PASSED_ENV.test(k) && v !== undefined) env[k] = v;
  const command = [
    process.execPath,
    join(ROOT, "dist", "scripts", "test.js"),
    "--inside",
    `--tiers=${tiers.map((t) => t.tier.id).join(",")}`,
    `--results=${resultsFile}`,
    ...tiers.flatMap((t) => t.files),
  ];
  const t0 = Date.now();
  const fail = (problem: string): TierResult[] =>
    tiers.map((t) => ({ tier: t.tier.id, title: t.tier.title, where: "the harness VM", wallMs: Date.now() - t0, problem }));
  let r;
  try {
    r = await runInHarnessVm({
      command,
      cwd: ROOT,
      rw: [shared],
      env,
      cpus: Math.max(2, Math.min(4, cpus().length)),
      timeoutMs: HARNESS_TIMEOUT_MS,
      signal,
      onProgress: (l) => console.log(`harness VM: ${l}`),
    });
  } catch (e) {
    if (e instanceof HarnessError) return fail(`the harness VM could not start: ${e.message}`);
    throw e;
  }
  console.log(`== harness VM ended after ${seconds(r.ms)} (status ${r.status})`);
  if (r.message !== undefined) console.log(`harness VM: ${r.message}`);
  try {
    const inner = JSON.parse(readFileSync(resultsFile, "utf8")) as TierResult[];
    if (r.reason === "timeout") for (const t of inner) t.problem ??= "the harness VM timed out";
    return inner;
  } catch {
    return fail(r.reason === "timeout" ? `the harness VM timed out after ${seconds(HARNESS_TIMEOUT_MS)}` : `the harness VM reported no results (status ${r.status})`);
  }
}

function printSummary(results: TierResult[], planned: Tier[]): number {
  const problems: string[] = [];
  console.log("\n== test summary");
  const width = Math.max(...results.map((r) => r.where.length), 5);
  console.log(`${"tier".padEnd(12)} ${"where".padEnd(width)} ${"tests".padStart(5)} ${"pass".padStart(5)} ${"fail".padStart(5)} ${"skip".padStart(5)} ${"time".padStart(7)}`);
  for (const r of results) {
    const c = r.report;
    const n = (x: number | undefined) => String(x ?? "-").padStart(5);
    console.log(`${r.title.padEnd(12)} ${r.where.padEnd(width)} ${n(c?.tests)} ${n(c?.pass)} ${n(c?.fail)} ${n(c?.skipped)} ${seconds(r.wallMs).padStart(7)}`);
    const tier = planned.find((t) => t.id === r.tier)!;
    if (r.problem !== undefined) {
      if (r.where === "nowhere" && !strict()) console.log(`  not run: ${r.problem}`);
      else problems.push(`${r.title} tier: ${r.problem}`);
    }
    for (const f of c?.failures ?? []) problems.push(`${r.title} tier: FAILED ${relative(ROOT, f.file)}: ${f.name}: ${f.error}`);
    for (const s of c?.skips ?? []) {
      const line = `${r.title} tier: skipped ${relative(ROOT, s.file)}: ${s.name} (${s.reason})`;
      if (strict() && tier.needs !== "nothing") problems.push(`${line}, but TSKVM_REQUIRE_KVM=1: this tier must run`);
      else console.log(`  ${line}`);
    }
  }
  const total = results.reduce((a, r) => a + (r.report?.fail ?? 0), 0);
  if (problems.length === 0 && total === 0) {
    console.log("all tiers passed");
    return 0;
  }
  console.log(problems.map((p) => `  ${p}`).join("\n"));
  console.log("tests FAILED");
  return 1;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (e: Error) => {
    console.error(`test: ${e.message}`);
    process.exit(2);
  },
);
