/**
 * `npm run bench`: tskvm's speed and memory, each figure beside a baseline measured in the
 * same run, in rounds that alternate which goes first, as a ratio with its spread.
 *
 *   pio     PIO-exit round trips of a tiny guest under tskvm vs. a C KVM loop running the
 *           same guest bytes (native/pio_exit_bench.c). Target >= 0.95.
 *   start   process start -> the boot vCPU in KVM_RUN, with 1, 2 and 8 vCPUs (tskvm alone).
 *   blk     virtio-blk vs. C doing the same system calls (bench-blk.ts): random 4 KiB reads
 *           at queue depth 64 vs. pread per request (target >= 1.5 with io_uring), 256 x 4 KiB
 *           scattered writes vs. pwritev (target >= 0.9).
 *   net     virtio-net over a TAP vs. C read/write per frame (bench-net.ts). Target >= 0.9.
 *   kick    one read per kick, kick to interrupt, through tskvm's I/O worker vs. a C device
 *           loop (bench-kick.ts). Target: within 1.3x of C.
 *   boot    the default guest to each console milestone, tskvm beside QEMU (microvm, KVM,
 *           the same kernel, initrd, command line and CPU features), with tskvm's start-up
 *           (process start -> first KVM_RUN) and the exits it handled. Target: ready <= 0.8x QEMU.
 *   memory  the VMM's own memory (guest RAM excluded) at the ready marker, 1, 2 and 8 vCPUs,
 *           tskvm beside QEMU booting the same guest. Target: below QEMU's.
 *   irq     MSI injection: irqfd on a routed GSI vs. KVM_SIGNAL_MSI (bench-irq.ts).
 *   fs      a 256 MiB file and a 10,000-file tree read in the guest over virtio-fs vs. the
 *           same files on a virtio-blk ext4 image in the same VM (bench-fs.ts; boots a guest).
 *   snapshot restore of a tiny guest's snapshot (256 MiB and 8 GiB) from process start
 *           to vCPUs running, beside booting it; `tskvm run --snapshot DIR -- true`
 *           cold vs. warm (target warm <= 0.1 x cold), snapshot RAM vs. touched RAM
 *           (bench-snapshot.ts). --snapshot-rounds=N.
 *   usernet TCP throughput both ways and request/response rate between the default
 *           guest and the host over --net user (passt), beside QEMU on the same passt
 *           and tskvm on a TAP, in one run (bench-usernet.ts). Target: tskvm >= QEMU.
 *           Needs root, passt, the default guest; --no-usernet, --usernet-seconds=N.
 *
 * `--only=a,b` picks sections, `--no-boot` leaves out boot and memory, `--rounds=N` sets the
 * rounds of the in-process sections, `--boot-rounds=N` those of boot. Where the figures
 * were taken is printed first (the host's KVM, and whether this is a VM, e.g. the
 * emulated-SVM VM). Results also go to dist/bench.json (--results=FILE). --in-harness-vm
 * runs it all inside the harness VM (scripts/harness-vm.ts), results in
 * dist/bench-harness-vm.json: there tskvm and QEMU boot the same guest on the same
 * (emulated) KVM with hardware semantics.
 */
import { spawn, spawnSync } from "node:child_process";
import { copyFileSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { cpus, tmpdir } from "node:os";
import { runInHarnessVm } from "./harness-vm";
import { buildNative, repoRoot } from "./lib/native";
import { QEMU_EMULATED_CPU } from "./lib/qemu-cpu";
import { Machine } from "../src/vmm/machine";
import { pioLoop } from "../test/helpers/guest-code";
import { bootFilesFor, findDefaultGuest } from "../src/api/default-guest";
import { detectHostKvm } from "../src/kvm/host";
import { probeIoUring } from "../src/sys/io-uring";
import { benchBlock, formatBlockBench } from "./bench-blk";
import { benchNet, formatNetBench } from "./bench-net";
import { benchKick, formatKickBench } from "./bench-kick";
import { benchIrq, formatIrqBench } from "./bench-irq";
import { benchFs, formatFsBench, fsBenchSkipReason } from "./bench-fs";
import { benchUsernet, formatUsernetBench, usernetBenchSkipReason } from "./bench-usernet";
import { benchRestoreStart, benchSnapshotRun, formatSnapshotBench } from "./bench-snapshot";
import { netTestSkipReason } from "../test/helpers/netns";
import { type Spread, formatRatio, formatSpread, paired, spread } from "./lib/rounds";
import { type VmmMemory, formatMiB, vmmMemory } from "./lib/rss";

/** A port nothing claims, in KVM or tskvm: the C baseline uses the same. */
const BENCH_PORT = 0x5e0;

// ---- pio ------------------------------------------------------------------------------

/** C: exits per second over 100 000 exits. */
function cPioRate(): number {
  const r = spawnSync(buildNative("pio_exit_bench"), ["-n", "100000"], { encoding: "utf8" });
  if (r.status !== 0) throw new Error(`pio_exit_bench failed: ${r.stderr}`);
  return (JSON.parse(r.stdout.trim().split("\n").pop()!) as { exitsPerSecond: number }).exitsPerSecond;
}

/** tskvm: exits per second of its vCPU loop; two runs of different length, so start-up cancels. */
async function tskvmPioRate(): Promise<number> {
  const exitsAfter = async (ms: number): Promise<number> => {
    const m = Machine.create({
      memoryBytes: 16 * 1024 * 1024,
      cpus: 1,
      consoleFd: 2,
      irqchip: false,
      boot: { kind: "raw", code: pioLoop(BENCH_PORT), address: 0x1000, mode: "real" },
    });
    try {
      const running = m.run();
      await m.allStarted();
      await new Promise((r) => setTimeout(r, ms));
      m.stop("benchmark");
      return (await running).counters.pio;
    } finally {
      m.destroy();
    }
  };
  const short = await exitsAfter(300);
  const long = await exitsAfter(1300);
  return long - short;
}

// ---- start ----------------------------------------------------------------------------

/** Milliseconds from a fresh process's start until the boot vCPU is in KVM_RUN. */
function vcpuStart(n: number): number {
  const r = spawnSync(process.execPath, [join(repoRoot(), "dist", "scripts", "vcpu-start.js"), String(n)], { encoding: "utf8" });
  if (r.status !== 0) throw new Error(`vcpu-start ${n} failed: ${r.stderr}`);
  return Number(r.stdout.trim());
}

// ---- boot and memory ------------------------------------------------------------------

/** Console milestones a boot is timed by (milliseconds from process start). */
const MILESTONES: [string, RegExp][] = [
  ["Linux version", /Linux version \d/],
  ["Run /init", /Run \/init as init process/],
  ["ready marker", /TSKVM-GUEST-READY/],
];

interface BootRun {
  /** ms from process start to each milestone. */
  times: Record<string, number>;
  /** The VMM's memory at the ready marker, guest RAM excluded. */
  memory: VmmMemory;
  /** What tskvm -v said on stderr when it ended (start-up timeline, exits). */
  verbose: string;
}

/**
 * Boot `argv` until the ready marker; its milestones, its memory then, and (tskvm -v) what it
 * says when stopped with SIGTERM.
 */
async function timeBoot(argv: string[], guestRamBytes: number, timeoutMs: number): Promise<BootRun> {
  const started = Date.now();
  const child = spawn(argv[0]!, argv.slice(1), { stdio: ["pipe", "pipe", "pipe"] });
  let out = "";
  let err = "";
  child.stderr!.setEncoding("latin1").on("data", (d: string) => (err += d));
  const times: Record<string, number> = {};
  let memory: VmmMemory | undefined;
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  let onEarlyExit: (() => void) | undefined;
  try {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${argv[0]} boot timed out; last output: ${out.slice(-500)}`)), timeoutMs);
      onEarlyExit = () => {
        clearTimeout(timer);
        reject(new Error(`${argv[0]} exited during the boot: ${out.slice(-500)} ${err.slice(-500)}`));
      };
      child.once("exit", onEarlyExit);
      child.stdout!.setEncoding("latin1").on("data", (d: string) => {
        // Only the new text (and enough before it for a marker cut between chunks) is
        // searched: the reader runs beside the VMM it measures and must stay cheap.
        const fresh = out.slice(-64) + d;
        out += d;
        for (const [name, re] of MILESTONES) if (times[name] === undefined && re.test(fresh)) times[name] = Date.now() - started;
        if (MILESTONES.every(([name]) => times[name] !== undefined)) {
          clearTimeout(timer);
          memory = vmmMemory(child.pid!, guestRamBytes);
          resolve();
        }
      });
    });
  } finally {
    // Only the early-exit listener: `exited` must still hear the exit it waits for.
    if (onEarlyExit !== undefined) child.off("exit", onEarlyExit);
    child.kill("SIGTERM");
    const killer = setTimeout(() => child.kill("SIGKILL"), 5000);
    await exited;
    clearTimeout(killer);
  }
  return { times, memory: memory!, verbose: err };
}

interface BootSetup {
  tskvm: (cpus: number) => string[];
  qemu: ((cpus: number) => string[]) | undefined;
  qemuMissing: string | undefined;
  guestRamBytes: number;
  timeoutMs: number;
}

function bootSetup(): BootSetup | string {
  const guest = findDefaultGuest();
  if (guest === undefined) return "skipped: no default guest built (npm run guest)";
  const emulated = detectHostKvm().kind === "emulated-pvm";
  const { kernel, initrd } = bootFilesFor(guest, emulated);
  const cmdline = guest.cmdline ?? "console=ttyS0 reboot=k panic=-1";
  const qemuBin = ["/usr/bin/qemu-system-x86_64", "/usr/local/bin/qemu-system-x86_64"].find((p) => existsSync(p));
  return {
    tskvm: (cpus) => [process.execPath, join(repoRoot(), "bin", "tskvm"), "boot", "-v", "-k", kernel, "-i", initrd, "-m", "128M", "-c", String(cpus), "-p", cmdline],
    qemu:
      qemuBin === undefined
        ? undefined
        : (cpus) => [qemuBin, "-M", "microvm,rtc=on", "-enable-kvm", "-cpu", emulated ? QEMU_EMULATED_CPU : "host", "-m", "128", "-smp", String(cpus),
            "-kernel", kernel, "-initrd", initrd, "-append", cmdline, "-nographic", "-no-reboot"],
    qemuMissing: qemuBin === undefined ? "skipped: qemu-system-x86_64 not installed (apt-get install qemu-system-x86)" : undefined,
    guestRamBytes: 128 * 1024 * 1024,
    timeoutMs: emulated ? 600_000 : 120_000,
  };
}

/** The stages of tskvm -v's start-up line (src/cli/report.ts startupLine), ms from process start. */
/** [key, how the bench names it, where it is in the line] */
const STARTUP_STAGES = [
  ["nodeReady", "Node ready", /Node ready at (\d+) ms/],
  ["createBegin", "machine asked for", /machine asked for at (\d+) ms/],
  ["kernelLoaded", "kernel and initrd loaded", /kernel\+initrd (\d+)/],
  ["createEnd", "built", /built at (\d+) ms/],
  ["bootThreadLoaded", "boot vCPU thread loaded", /boot vCPU thread loaded at (\d+) ms/],
  ["firstKvmRun", "boot vCPU in KVM_RUN", /boot vCPU in KVM_RUN at (\d+) ms/],
] as const;

function parseStartup(verbose: string): Record<string, number> | undefined {
  const line = /start-up \(from process start\).*/.exec(verbose)?.[0];
  if (line === undefined) return undefined;
  const out: Record<string, number> = {};
  for (const [name, , re] of STARTUP_STAGES) {
    const m = re.exec(line);
    if (m !== null) out[name] = Number(m[1]);
  }
  return out;
}

/** tskvm -v's exit summary lines. */
function exitSummary(verbose: string): string[] {
  return verbose
    .split("\n")
    .filter((l) => /^tskvm: (exits to tskvm|  (port|mmio) )/.test(l))
    .map((l) => l.replace(/^tskvm: /, ""));
}

async function bootComparison(setup: BootSetup, rounds: number): Promise<Record<string, unknown>> {
  const t: Record<string, number[]> = {};
  const q: Record<string, number[]> = {};
  const ratios: Record<string, number[]> = {};
  const startup: Record<string, number[]> = {};
  let exits: string[] = [];
  for (let i = 0; i < rounds; i++) {
    const order = i % 2 === 0 ? ["tskvm", "qemu"] : ["qemu", "tskvm"];
    const got: Record<string, BootRun> = {};
    for (const who of order) {
      if (who === "qemu" && setup.qemu === undefined) continue;
      got[who] = await timeBoot(who === "tskvm" ? setup.tskvm(1) : setup.qemu!(1), setup.guestRamBytes, setup.timeoutMs);
    }
    for (const [m] of MILESTONES) {
      (t[m] ??= []).push(got.tskvm!.times[m]!);
      if (got.qemu !== undefined) {
        (q[m] ??= []).push(got.qemu.times[m]!);
        (ratios[m] ??= []).push(got.tskvm!.times[m]! / got.qemu.times[m]!);
      }
    }
    const s = parseStartup(got.tskvm!.verbose);
    if (s !== undefined) for (const [k, v] of Object.entries(s)) (startup[k] ??= []).push(v);
    exits = exitSummary(got.tskvm!.verbose);
  }
  const spreads = (x: Record<string, number[]>) => Object.fromEntries(Object.entries(x).map(([k, v]) => [k, spread(v)]));
  return { rounds, tskvm: spreads(t), qemu: setup.qemuMissing ?? spreads(q), ratio: spreads(ratios), startup: spreads(startup), exits };
}

async function memoryComparison(setup: BootSetup): Promise<Record<string, unknown>> {
  const out: Record<string, unknown> = {};
  for (const cpus of [1, 2, 8]) {
    const tskvm = await memoryAtReady("tskvm", setup.tskvm(cpus), setup);
    const qemu = setup.qemu === undefined ? setup.qemuMissing : await memoryAtReady("QEMU", setup.qemu(cpus), setup);
    out[cpus] = { tskvm, qemu };
  }
  return out;
}

/**
 * The VMM's memory at the ready marker. A sample that read no memory at all (smaps of a
 * process already gone reads empty) is not a figure, nor is a boot that failed: the boot
 * is measured again once, and a second failure is reported in place of the figure (the
 * other figures and sections go on).
 */
async function memoryAtReady(who: string, argv: string[], setup: BootSetup): Promise<VmmMemory | string> {
  for (let attempt = 1; ; attempt++) {
    let why: string;
    try {
      const m = (await timeBoot(argv, setup.guestRamBytes, setup.timeoutMs)).memory;
      if (m.rssKiB > 0) return m;
      why = "its sample read 0 KiB (the process was gone?)";
    } catch (e) {
      why = (e as Error).message.split("\n")[0]!.slice(0, 300);
    }
    if (attempt === 2) return `not measured: ${why}, twice`;
    console.error(`memory: ${who}: ${why}; booting it again`);
  }
}

// ---- where -----------------------------------------------------------------------------

/** The machine the figures come from: the host's KVM, and whether we run inside a VM. */
function where(): string {
  const host = detectHostKvm();
  let virt = "";
  try {
    if (/\bhypervisor\b/.test(readFileSync("/proc/cpuinfo", "utf8"))) virt = ", inside a VM";
  } catch {
    // no /proc: say nothing
  }
  const r = spawnSync("systemd-detect-virt", ["--vm"], { encoding: "utf8" });
  if (r.status === 0 && r.stdout.trim() !== "" && r.stdout.trim() !== "none") virt = `, inside a VM (${r.stdout.trim()})`;
  const uring = probeIoUring();
  return `${host.summary.split(":")[0]}${virt}; ${cpus().length} CPUs; io_uring ${uring.available ? "usable" : `unusable (${uring.reason})`}`;
}

// ---- in the harness VM ----

/**
 * --in-harness-vm: the same benchmark inside the harness VM (scripts/harness-vm.ts), where
 * tskvm and QEMU both run on KVM with hardware semantics on the same emulated CPU; its
 * results go to dist/bench-harness-vm.json.
 */
async function inHarnessVm(args: string[]): Promise<number> {
  const shared = mkdtempSync(join(tmpdir(), "tskvm-bench-"));
  try {
    const r = await runInHarnessVm({
      command: [process.execPath, join(repoRoot(), "dist", "scripts", "bench.js"), ...args, `--results=${join(shared, "bench.json")}`],
      cwd: repoRoot(),
      rw: [shared],
      timeoutMs: 3_600_000,
      onProgress: (l) => console.log(`harness VM: ${l}`),
    });
    if (r.message !== undefined) console.error(`bench: harness VM: ${r.message}`);
    if (existsSync(join(shared, "bench.json"))) {
      const file = join(repoRoot(), "dist", "bench-harness-vm.json");
      copyFileSync(join(shared, "bench.json"), file);
      console.log(`results in ${file}`);
    }
    return r.status;
  } finally {
    rmSync(shared, { recursive: true, force: true });
  }
}

// ---- main ------------------------------------------------------------------------------

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  if (args.includes("--in-harness-vm")) process.exit(await inHarnessVm(args.filter((a) => a !== "--in-harness-vm" && !a.startsWith("--results="))));
  const only = args.find((a) => a.startsWith("--only="))?.slice("--only=".length).split(",");
  const noBoot = args.includes("--no-boot");
  const want = (section: string) => (only === undefined || only.includes(section)) && !(noBoot && (section === "boot" || section === "memory" || section === "fs"));
  const num = (flag: string, dflt: number) => Number(args.find((a) => a.startsWith(`${flag}=`))?.split("=")[1] ?? dflt);
  const rounds = num("--rounds", 7);
  const bootRounds = num("--boot-rounds", 3);
  const whereLine = where();
  console.log(`tskvm benchmarks on ${whereLine}`);
  const results: Record<string, unknown> = { where: whereLine, host: detectHostKvm().kind, date: new Date().toISOString() };

  if (want("pio")) {
    await tskvmPioRate(); // warm-up
    const p = await paired(rounds, tskvmPioRate, cPioRate);
    results.pio = p;
    console.log(
      `pio     tskvm ${(1e6 / p.subject.median).toFixed(2)} us/exit, C ${(1e6 / p.baseline.median).toFixed(2)} us/exit: ratio ${formatRatio(p.ratio, 3)} (target >= 0.95)`,
    );
  }

  if (want("start")) {
    const starts: Record<number, Spread> = {};
    for (const n of [1, 2, 8]) {
      starts[n] = spread(Array.from({ length: 3 }, () => vcpuStart(n)));
      console.log(`start   ${n} vCPU${n > 1 ? "s" : " "}: process start -> boot vCPU in KVM_RUN ${formatSpread(starts[n], "ms", 0)} (tskvm alone)`);
    }
    results.start = starts;
  }

  if (want("blk")) {
    const blk = await benchBlock({ rounds });
    results.blk = blk;
    for (const line of formatBlockBench(blk).split("\n")) console.log(`blk     ${line.replace(/^blk /, "")}`);
  }

  if (want("net")) {
    const skip = netTestSkipReason();
    if (skip !== undefined) {
      results.net = `skipped: ${skip}`;
      console.log(`net     skipped: ${skip}`);
    } else {
      const net = await benchNet({ rounds });
      results.net = net;
      for (const line of formatNetBench(net).split("\n")) console.log(`net     ${line.replace(/^net /, "")}`);
    }
  }

  if (want("kick")) {
    const kick = await benchKick({ rounds: Math.max(3, Math.ceil(rounds / 2)) });
    results.kick = kick;
    for (const line of formatKickBench(kick).split("\n")) console.log(`kick    ${line.replace(/^kick /, "")}`);
  }

  if (want("boot") || want("memory")) {
    const setup = bootSetup();
    if (typeof setup === "string") {
      results.boot = setup;
      console.log(`boot    ${setup}`);
    } else {
      if (want("boot")) {
        const boot = await bootComparison(setup, bootRounds);
        results.boot = boot;
        const t = boot.tskvm as Record<string, Spread>;
        const q = boot.qemu;
        const ratio = boot.ratio as Record<string, Spread>;
        for (const [m] of MILESTONES) {
          const vs = typeof q === "string" ? "" : `, QEMU ${formatSpread((q as Record<string, Spread>)[m]!, "ms", 0)}: ratio ${formatRatio(ratio[m]!)}`;
          console.log(`boot    ${m.padEnd(13)} tskvm ${formatSpread(t[m]!, "ms", 0)}${vs}${m === "ready marker" ? " (target <= 0.8)" : ""}`);
        }
        if (typeof q === "string") console.log(`boot    QEMU ${q}`);
        const s = boot.startup as Record<string, Spread>;
        if (s.firstKvmRun !== undefined) {
          const parts = STARTUP_STAGES.filter(([k]) => s[k] !== undefined).map(([k, label]) => `${label} at ${formatSpread(s[k]!, "ms", 0)}`);
          console.log(`boot    tskvm start-up (from process start): ${parts.join(", ")}`);
        }
        for (const line of boot.exits as string[]) console.log(`boot    ${line}`);
      }
      if (want("memory")) {
        const mem = await memoryComparison(setup);
        results.memory = mem;
        for (const [cpus, v] of Object.entries(mem)) {
          const { tskvm, qemu } = v as { tskvm: VmmMemory | string; qemu: VmmMemory | string };
          const line = (x: VmmMemory | string) => (typeof x === "string" ? x : `${formatMiB(x.rssKiB)} (${formatMiB(x.anonymousKiB)} anonymous + ${formatMiB(x.fileKiB)} file)`);
          console.log(`memory  ${cpus} vCPU${cpus === "1" ? " " : "s"} at the ready marker, guest RAM excluded: tskvm ${line(tskvm)}, QEMU ${line(qemu)}`);
        }
      }
    }
  }

  if (want("irq")) {
    const irq = await benchIrq();
    results.irq = irq;
    for (const line of formatIrqBench(irq).split("\n")) console.log(`irq     ${line}`);
  }

  if (want("fs")) {
    const fsSkip = fsBenchSkipReason();
    if (fsSkip !== undefined) {
      results.fs = `skipped: ${fsSkip}`;
      console.log(`fs      skipped: ${fsSkip}`);
    } else {
      const fs = await benchFs();
      results.fs = fs;
      for (const line of formatFsBench(fs).split("\n")) console.log(`fs      ${line}`);
    }
  }

  if (want("snapshot")) {
    const snapRounds = num("--snapshot-rounds", 3);
    const start = await benchRestoreStart(snapRounds);
    const bootMs = vcpuStart(1);
    const run = noBoot ? "skipped: --no-boot" : benchSnapshotRun(snapRounds);
    results.snapshot = { ...start, bootMs, run };
    for (const line of formatSnapshotBench(start, bootMs, run).split("\n")) console.log(`snapshot ${line}`);
  }

  const usernetSkip = args.includes("--no-usernet") || !want("usernet") ? "--no-usernet or --only" : usernetBenchSkipReason();
  if (usernetSkip !== undefined) {
    results.usernet = `skipped: ${usernetSkip}`;
    console.log(`usernet skipped: ${usernetSkip}`);
  } else {
    const arg = (name: string) => args.find((a) => a.startsWith(`--${name}=`))?.split("=")[1];
    const u = await benchUsernet({
      ...(arg("usernet-seconds") !== undefined ? { seconds: Number(arg("usernet-seconds")) } : {}),
      ...(arg("usernet-rounds") !== undefined ? { rounds: Number(arg("usernet-rounds")) } : {}),
    });
    results.usernet = u;
    for (const line of formatUsernetBench(u).split("\n")) console.log(`usernet ${line}`);
  }
  const file = args.find((a) => a.startsWith("--results="))?.slice("--results=".length) ?? join(repoRoot(), "dist", "bench.json");
  writeFileSync(file, `${JSON.stringify(results, null, 2)}\n`);
  console.log(`results in ${file}`);
}

main().then(
  () => process.exit(0),
  (e: Error) => {
    console.error(`bench: ${e.message}`);
    process.exit(1);
  },
);
