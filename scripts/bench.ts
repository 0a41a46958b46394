/**
 * `npm run bench`: tskvm's speed, each figure beside a baseline measured in the same run.
 *
 *   pio-exit      PIO-exit round trips/s of a tiny guest under tskvm vs. a C KVM loop
 *                 (native/pio_exit_bench.c) running the same guest bytes. Target ratio >= 0.9.
 *   vcpu-start    process start -> all N vCPU threads about to enter KVM_RUN, N = 1, 2, 8.
 *   virtio-blk    device-model throughput (4 KiB random reads, 1 MiB sequential writes)
 *                 through the virtqueue in-process vs. plain pread/pwrite. Target >= 0.8.
 *   irq           cost of raising an MSI from a device thread: irqfd on a GSI routed to the
 *                 message (how virtiofsd does it) vs. KVM_SIGNAL_MSI, and the round trip.
 *   virtio-net    device-model packet rate TAP -> guest RX ring and TX ring -> TAP (64 B and
 *                 1500 B frames) vs. raw TAP read/write, in a namespace it makes and removes.
 *   virtio-fs     inside the default guest: a 256 MiB file read and a 10,000-file tree walked
 *                 over virtio-fs (virtiofsd) vs. the same files on a virtio-blk ext4 image,
 *                 in the same VM (scripts/bench-fs.ts). Skipped with --no-boot.
 *   boot          wall time to each Linux boot milestone with the default guest, beside QEMU
 *                 (microvm, KVM) booting the same kernel, initrd, command line and CPU features
 *                 when qemu-system-x86 is installed. Target: tskvm <= QEMU to the ready
 *                 marker. Skipped with the reason when the guest is not built; --no-boot.
 *   snapshot      restore of a tiny guest's snapshot (256 MiB and 8 GiB) from process start
 *                 to vCPUs running, beside booting it; `tskvm run --snapshot DIR -- true`
 *                 cold vs. warm (target warm <= 0.1 x cold), snapshot RAM vs. touched RAM
 *                 (bench-snapshot.ts). --snapshot-rounds=N.
 *   usernet       TCP throughput both ways and request/response rate between the default
 *                 guest and the host over --net user (passt), beside QEMU on the same passt
 *                 and tskvm on a TAP, in one run (bench-usernet.ts). Target: tskvm >= QEMU.
 *                 Needs root, passt, the default guest; --no-usernet, --usernet-seconds=N.
 *
 * Every run first says where it ran (hardware KVM, kvm-pvm, nested SVM on QEMU TCG) and on
 * which CPU: figures from different kinds of host are not comparable. Results go to stdout
 * as a table and to dist/bench.json (--results=FILE). --in-harness-vm runs it all inside
 * the harness VM (scripts/harness-vm.ts), results in dist/bench-harness-vm.json: there
 * tskvm and QEMU boot the same guest on the same (emulated) KVM.
 */
import { spawn, spawnSync } from "node:child_process";
import { copyFileSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { cpus, tmpdir } from "node:os";
import { runInHarnessVm } from "./harness-vm";
import { join } from "node:path";
import { buildNative, repoRoot } from "./lib/native";
import { Machine } from "../src/vmm/machine";
import { pioLoop } from "../test/helpers/guest-code";
import { bootFilesFor, findDefaultGuest } from "../src/api/default-guest";
import { detectHostKvm } from "../src/kvm/host";
import { benchBlock, formatBlockBench } from "./bench-blk";
import { benchNet, formatNetBench } from "./bench-net";
import { benchIrq, formatIrqBench } from "./bench-irq";
import { benchFs, formatFsBench, fsBenchSkipReason } from "./bench-fs";
import { benchUsernet, formatUsernetBench, usernetBenchSkipReason } from "./bench-usernet";
import { netTestSkipReason } from "../test/helpers/netns";
import { benchRestoreStart, benchSnapshotRun, formatSnapshotBench } from "./bench-snapshot";

/** A port nothing claims, in KVM or tskvm: the C baseline uses the same. */
const BENCH_PORT = 0x5e0;
const ROUNDS = 3;

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

function cBaseline(): number {
  const bin = buildNative("pio_exit_bench");
  const rates: number[] = [];
  for (let i = 0; i < ROUNDS; i++) {
    const r = spawnSync(bin, ["-n", "100000"], { encoding: "utf8" });
    if (r.status !== 0) throw new Error(`pio_exit_bench failed: ${r.stderr}`);
    rates.push((JSON.parse(r.stdout.trim().split("\n").pop()!) as { exitsPerSecond: number }).exitsPerSecond);
  }
  return median(rates);
}

/** Exits/s of tskvm's vCPU loop: two runs of different length; the difference cancels start-up. */
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
  const rates: number[] = [];
  for (let i = 0; i < ROUNDS; i++) {
    const short = await exitsAfter(500);
    const long = await exitsAfter(2500);
    rates.push((long - short) / 2.0);
  }
  return median(rates);
}

/** How long one vcpu-start process may take before the section gives up on it. */
const VCPU_START_LIMIT_MS = 120_000;

/** Milliseconds from a fresh process's start until all N vCPUs are running. */
function vcpuStart(n: number): number {
  const script = join(repoRoot(), "dist", "scripts", "vcpu-start.js");
  const times: number[] = [];
  for (let i = 0; i < ROUNDS; i++) {
    const r = spawnSync(process.execPath, [script, String(n)], { encoding: "utf8", timeout: VCPU_START_LIMIT_MS, killSignal: "SIGKILL" });
    if (r.error !== undefined || r.signal !== null) throw new Error(`vcpu-start ${n} did not finish within ${VCPU_START_LIMIT_MS / 1000} s`);
    if (r.status !== 0) throw new Error(`vcpu-start ${n} failed: ${r.stderr}`);
    times.push(Number(r.stdout.trim()));
  }
  return median(times);
}

/** Console milestones a boot is timed by (milliseconds from process start). */
const MILESTONES: [string, RegExp][] = [
  ["Linux version", /Linux version \d/],
  ["Run /init", /Run \/init as init process/],
  ["ready marker", /TSKVM-GUEST-READY/],
];

/** QEMU's -cpu for the same guest-visible CPU as tskvm's emulated template (docs/guest.md). */
const QEMU_EMULATED_CPU =
  "host,-cx16,-xsave,-popcnt,-smap,-pcid,-rdrand,-fsgsbase,-smep,-invpcid,-rdseed,-clflushopt,-clwb,-erms,-fsrm," +
  "kvm-pv-ipi=off,kvm-pv-sched-yield=off,kvm-pv-unhalt=off";

/** Time the milestones of a command's console output; kills it afterwards. */
async function timeBoot(argv: string[], timeoutMs: number): Promise<Record<string, number>> {
  const started = Date.now();
  const child = spawn(argv[0]!, argv.slice(1), { stdio: ["pipe", "pipe", "pipe"] });
  let out = "";
  const times: Record<string, number> = {};
  try {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${argv[0]} boot timed out; last output: ${out.slice(-500)}`)), timeoutMs);
      child.on("exit", () => {
        clearTimeout(timer);
        reject(new Error(`${argv[0]} exited during the boot: ${out.slice(-500)}`));
      });
      child.stdout!.setEncoding("latin1").on("data", (d: string) => {
        out += d;
        for (const [name, re] of MILESTONES) if (times[name] === undefined && re.test(out)) times[name] = Date.now() - started;
        if (MILESTONES.every(([name]) => times[name] !== undefined)) {
          clearTimeout(timer);
          resolve();
        }
      });
    });
  } finally {
    child.removeAllListeners("exit");
    child.kill("SIGKILL");
  }
  return times;
}

/**
 * Boot the default guest with tskvm and, when Debian's qemu-system-x86 is installed, with
 * QEMU (microvm, KVM, the same kernel, initrd, command line and CPU features), alternately,
 * and report the median time to each milestone.
 */
async function bootComparison(rounds: number): Promise<Record<string, unknown> | string> {
  const guest = findDefaultGuest();
  if (guest === undefined) return "skipped: no default guest built (npm run guest)";
  const host = detectHostKvm();
  const emulated = host.kind === "emulated-pvm";
  const { kernel, initrd } = bootFilesFor(guest, emulated);
  const cmdline = guest.cmdline ?? "console=ttyS0 reboot=k panic=-1";
  const timeout = host.softwareEmulated ? 420_000 : 60_000;
  const tskvm = [process.execPath, join(repoRoot(), "bin", "tskvm"), "boot", "-k", kernel, "-i", initrd, "-m", "128M", "-p", cmdline];
  const qemuBin = ["/usr/bin/qemu-system-x86_64", "/usr/local/bin/qemu-system-x86_64"].find((p) => existsSync(p));
  const qemu =
    qemuBin === undefined
      ? undefined
      : [qemuBin, "-M", "microvm,rtc=on", "-enable-kvm", "-cpu", emulated ? QEMU_EMULATED_CPU : "host", "-m", "128", "-smp", "1",
         "-kernel", kernel, "-initrd", initrd, "-append", cmdline, "-nographic", "-no-reboot"];
  const samples: Record<string, Record<string, number[]>> = { tskvm: {}, qemu: {} };
  for (let i = 0; i < rounds; i++) {
    const line: string[] = [];
    for (const [name, argv] of [["tskvm", tskvm], ["qemu", qemu]] as const) {
      if (argv === undefined) continue;
      const t = await timeBoot(argv, timeout);
      for (const [m, ms] of Object.entries(t)) (samples[name]![m] ??= []).push(ms);
      line.push(`${name} ${((t["ready marker"] ?? NaN) / 1000).toFixed(1)} s`);
    }
    // One line per round: a slow host is never silent for long.
    console.log(`boot         round ${i + 1}/${rounds}: ready marker ${line.join(", ")}`);
  }
  const medians = (s: Record<string, number[]>) => Object.fromEntries(Object.entries(s).map(([k, v]) => [k, median(v)]));
  return {
    rounds,
    tskvm: medians(samples.tskvm!),
    qemu: qemu === undefined ? "skipped: qemu-system-x86_64 not installed (apt-get install qemu-system-x86)" : medians(samples.qemu!),
  };
}

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

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  if (args.includes("--in-harness-vm")) process.exit(await inHarnessVm(args.filter((a) => a !== "--in-harness-vm" && !a.startsWith("--results="))));
  // --only=pio,vcpu,blk,irq,net,fs,boot,snapshot,usernet runs just those sections.
  const only = args.find((a) => a.startsWith("--only="))?.slice("--only=".length).split(",");
  const want = (section: string) => only === undefined || only.includes(section);
  const host = detectHostKvm();
  const cpu = /^model name\s*:\s*(.*)$/m.exec(readFileSync("/proc/cpuinfo", "latin1"))?.[1] ?? "unknown CPU";
  // Where the figures come from matters more than the figures: say it first.
  console.log(`tskvm benchmarks on ${host.label} (${cpu}, ${cpus().length} CPUs)`);
  console.log(`  ${host.summary}`);
  const results: Record<string, unknown> = {
    host: { kind: host.kind, label: host.label, hypervisor: host.hypervisor ?? null, softwareEmulated: host.softwareEmulated, cpu, cpus: cpus().length },
    date: new Date().toISOString(),
  };

  if (want("pio")) {
    const c = cBaseline();
    const ts = await tskvmPioRate();
    results["pio-exit"] = { cExitsPerSecond: Math.round(c), tskvmExitsPerSecond: Math.round(ts), ratio: ts / c };
    console.log(
      `pio-exit     C ${Math.round(c)} exits/s (${(1e6 / c).toFixed(2)} us), tskvm ${Math.round(ts)} exits/s (${(1e6 / ts).toFixed(2)} us): ratio ${(ts / c).toFixed(3)} (target >= 0.9)`,
    );
  }

  if (want("vcpu")) {
    const starts: Record<string, number> = {};
    for (const n of [1, 2, 8]) {
      starts[n] = vcpuStart(n);
      console.log(`vcpu-start   ${n} vCPU${n > 1 ? "s" : " "}: ${starts[n]!.toFixed(1)} ms from process start to all running`);
    }
    results["vcpu-start-ms"] = starts;
  }

  if (want("blk")) {
    const blk = await benchBlock();
    results["virtio-blk"] = blk;
    for (const line of formatBlockBench(blk).split("\n")) console.log(`virtio-blk   ${line}`);
  }

  if (want("irq")) {
    const irq = await benchIrq();
    results["msi-injection"] = irq;
    for (const line of formatIrqBench(irq).split("\n")) console.log(`irq          ${line}`);
  }

  const netSkip = want("net") ? netTestSkipReason() : "not selected (--only)";
  if (netSkip !== undefined) {
    results["virtio-net"] = `skipped: ${netSkip}`;
    console.log(`virtio-net   skipped: ${netSkip}`);
  } else {
    const net = await benchNet();
    results["virtio-net"] = net;
    for (const line of formatNetBench(net).split("\n")) console.log(`virtio-net   ${line}`);
  }

  // Boots a guest too: skipped with --no-boot, like the boot timing.
  const fsSkip = args.includes("--no-boot") ? "--no-boot" : !want("fs") ? "not selected (--only)" : fsBenchSkipReason();
  if (fsSkip !== undefined) {
    results["virtio-fs"] = `skipped: ${fsSkip}`;
    console.log(`virtio-fs    skipped: ${fsSkip}`);
  } else {
    const fs = await benchFs();
    results["virtio-fs"] = fs;
    for (const line of formatFsBench(fs).split("\n")) console.log(`virtio-fs    ${line}`);
  }

  if (args.includes("--no-boot") || !want("boot")) {
    results.boot = "skipped: --no-boot or --only";
  } else {
    const boot = await bootComparison(Number(args.find((a) => a.startsWith("--boot-rounds="))?.split("=")[1] ?? 3));
    results.boot = boot;
    if (typeof boot === "string") console.log(`boot         ${boot}`);
    else {
      const t = boot.tskvm as Record<string, number>;
      const q = boot.qemu;
      for (const [m] of MILESTONES) {
        const qm = typeof q === "string" ? undefined : (q as Record<string, number>)[m];
        const vs = qm === undefined ? "" : `, QEMU ${(qm / 1000).toFixed(1)} s: ratio ${((t[m] ?? NaN) / qm).toFixed(2)}`;
        console.log(`boot         ${m}: tskvm ${((t[m] ?? NaN) / 1000).toFixed(1)} s${vs} (median of ${boot.rounds})`);
      }
      if (typeof q === "string") console.log(`boot         QEMU ${q}`);
    }
  }
  if (want("snapshot")) {
    const rounds = Number(args.find((a) => a.startsWith("--snapshot-rounds="))?.split("=")[1] ?? ROUNDS);
    const start = await benchRestoreStart(rounds);
    const bootMs = vcpuStart(1);
    const run = args.includes("--no-boot") ? "skipped: --no-boot" : benchSnapshotRun(rounds);
    results.snapshot = { ...start, bootMs, run };
    for (const line of formatSnapshotBench(start, bootMs, run).split("\n")) console.log(`snapshot     ${line}`);
  }

  const usernetSkip = args.includes("--no-usernet") || !want("usernet") ? "--no-usernet or --only" : usernetBenchSkipReason();
  if (usernetSkip !== undefined) {
    results.usernet = `skipped: ${usernetSkip}`;
    console.log(`usernet      skipped: ${usernetSkip}`);
  } else {
    const arg = (name: string) => args.find((a) => a.startsWith(`--${name}=`))?.split("=")[1];
    const u = await benchUsernet({
      ...(arg("usernet-seconds") !== undefined ? { seconds: Number(arg("usernet-seconds")) } : {}),
      ...(arg("usernet-rounds") !== undefined ? { rounds: Number(arg("usernet-rounds")) } : {}),
    });
    results.usernet = u;
    for (const line of formatUsernetBench(u).split("\n")) console.log(`usernet      ${line}`);
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
