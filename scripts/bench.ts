/**
 * `npm run bench`: tskvm's speed, each figure beside a baseline measured in the same run.
 *
 *   pio-exit      PIO-exit round trips/s of a tiny guest under tskvm vs. a C KVM loop
 *                 (native/pio_exit_bench.c) running the same guest bytes. Target ratio >= 0.9.
 *   vcpu-start    process start -> all N vCPU threads about to enter KVM_RUN, N = 1, 2, 8.
 *   virtio-blk    device-model throughput (4 KiB random reads, 1 MiB sequential writes)
 *                 through the virtqueue in-process vs. plain pread/pwrite. Target >= 0.8.
 *   virtio-net    device-model packet rate TAP -> guest RX ring and TX ring -> TAP (64 B and
 *                 1500 B frames) vs. raw TAP read/write, in a namespace it makes and removes.
 *   boot          wall time to each Linux boot milestone with the default guest, beside QEMU
 *                 (microvm, KVM) booting the same kernel, initrd, command line and CPU features
 *                 when qemu-system-x86 is installed. Target: tskvm <= QEMU to the ready
 *                 marker. Skipped with the reason when the guest is not built; --no-boot.
 *
 * Results go to stdout as a table and to dist/bench.json.
 */
import { spawn, spawnSync } from "node:child_process";
import { existsSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { buildNative, repoRoot } from "./lib/native";
import { Machine } from "../src/vmm/machine";
import { pioLoop } from "../test/helpers/guest-code";
import { bootFilesFor, findDefaultGuest } from "../src/api/default-guest";
import { detectHostKvm } from "../src/kvm/host";
import { benchBlock, formatBlockBench } from "./bench-blk";
import { benchNet, formatNetBench } from "./bench-net";
import { netTestSkipReason } from "../test/helpers/netns";

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

/** Milliseconds from a fresh process's start until all N vCPUs are running. */
function vcpuStart(n: number): number {
  const script = join(repoRoot(), "dist", "scripts", "vcpu-start.js");
  const times: number[] = [];
  for (let i = 0; i < ROUNDS; i++) {
    const r = spawnSync(process.execPath, [script, String(n)], { encoding: "utf8" });
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

/**
 * QEMU's -cpu for the same guest-visible CPU as tskvm's emulated template (docs/guest.md).
 * Without -arch-capabilities QEMU 7.2 aborts on a kvm-pvm host that refuses to set MSR 0x10a
 * ("failed to set MSR 0x10a"); tskvm never sets that MSR either.
 */
const QEMU_EMULATED_CPU =
  "host,-cx16,-xsave,-popcnt,-smap,-pcid,-rdrand,-fsgsbase,-smep,-invpcid,-rdseed,-clflushopt,-clwb,-erms,-fsrm," +
  "kvm-pv-ipi=off,kvm-pv-sched-yield=off,kvm-pv-unhalt=off,-arch-capabilities";

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
  const emulated = detectHostKvm().kind === "emulated-pvm";
  const { kernel, initrd } = bootFilesFor(guest, emulated);
  const cmdline = guest.cmdline ?? "console=ttyS0 reboot=k panic=-1";
  const timeout = emulated ? 420_000 : 60_000;
  const tskvm = [process.execPath, join(repoRoot(), "bin", "tskvm"), "boot", "-k", kernel, "-i", initrd, "-m", "128M", "-p", cmdline];
  const qemuBin = ["/usr/bin/qemu-system-x86_64", "/usr/local/bin/qemu-system-x86_64"].find((p) => existsSync(p));
  const qemu =
    qemuBin === undefined
      ? undefined
      : [qemuBin, "-M", "microvm,rtc=on", "-enable-kvm", "-cpu", emulated ? QEMU_EMULATED_CPU : "host", "-m", "128", "-smp", "1",
         "-kernel", kernel, "-initrd", initrd, "-append", cmdline, "-nographic", "-no-reboot"];
  const samples: Record<string, Record<string, number[]>> = { tskvm: {}, qemu: {} };
  for (let i = 0; i < rounds; i++) {
    for (const [name, argv] of [["tskvm", tskvm], ["qemu", qemu]] as const) {
      if (argv === undefined) continue;
      const t = await timeBoot(argv, timeout);
      for (const [m, ms] of Object.entries(t)) (samples[name]![m] ??= []).push(ms);
    }
  }
  const medians = (s: Record<string, number[]>) => Object.fromEntries(Object.entries(s).map(([k, v]) => [k, median(v)]));
  return {
    rounds,
    tskvm: medians(samples.tskvm!),
    qemu: qemu === undefined ? "skipped: qemu-system-x86_64 not installed (apt-get install qemu-system-x86)" : medians(samples.qemu!),
  };
}

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  // --only=pio,vcpu,blk,net,boot runs just those sections.
  const only = args.find((a) => a.startsWith("--only="))?.slice("--only=".length).split(",");
  const want = (section: string) => only === undefined || only.includes(section);
  const host = detectHostKvm();
  console.log(`tskvm benchmarks on ${host.summary.split(":")[0]}`);
  const results: Record<string, unknown> = { host: host.kind, date: new Date().toISOString() };

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

  const netSkip = want("net") ? netTestSkipReason() : "not selected (--only)";
  if (netSkip !== undefined) {
    results["virtio-net"] = `skipped: ${netSkip}`;
    console.log(`virtio-net   skipped: ${netSkip}`);
  } else {
    const net = await benchNet();
    results["virtio-net"] = net;
    for (const line of formatNetBench(net).split("\n")) console.log(`virtio-net   ${line}`);
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
  const file = join(repoRoot(), "dist", "bench.json");
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
